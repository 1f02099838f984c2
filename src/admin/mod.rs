//! The admin API's effects (PROTOCOL.md section 10): throwing a user out now,
//! on every node, and refusing their tokens for a while.
//!
//! A disconnect bans first (so a reconnect racing it is refused), closes this
//! node's connections of the user with 4001, then, in a cluster, tells the
//! other nodes through Redis, which also keeps the ban for nodes that start
//! later.

pub mod bans;
pub mod cluster;

use std::sync::Arc;
use std::time::Duration;

use crate::bus::redis::RedisAccess;
use crate::bus::BusError;
use crate::state::{unix_millis, ServerState};
use bans::Bans;
use cluster::ClusterLink;

/// The close code and reason of a connection thrown out by the admin API.
pub const DISCONNECT_CODE: u16 = 4001;
pub const DISCONNECT_REASON: &str = "disconnected";

pub struct Admin {
    pub bans: Bans,
    /// With `--redis-url`: how disconnects and bans reach the other nodes.
    pub cluster: Option<ClusterLink>,
}

/// What a disconnect did on this node.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Outcome {
    /// This node's connections of the user that were closed.
    pub closed: usize,
    /// When the ban ends (Unix milliseconds), if there is one.
    pub banned_until: Option<u64>,
}

impl Admin {
    /// A single node's admin state, or a cluster node's when it has the
    /// bus's Redis (or Redis Cluster) to reach the others through.
    pub fn new(redis: Option<RedisAccess>, prefix: &str) -> Self {
        let cluster = redis.map(|access| ClusterLink::new(access, prefix));
        Self { bans: Bans::default(), cluster }
    }
}

/// Closes every connection of `sub` on every node with 4001, banning the
/// user for `ban` when given. The error comes with what was done here: a
/// cluster that could not be told still had this node's part done.
pub async fn disconnect(
    state: &Arc<ServerState>,
    sub: &str,
    ban: Option<Duration>,
) -> Result<Outcome, (Outcome, BusError)> {
    let banned_until = ban.map(|ban| unix_millis().saturating_add(ban.as_millis() as u64));
    if let Some(until) = banned_until {
        state.admin.bans.ban(sub, until);
    }
    let outcome = Outcome { closed: close_user(state, sub), banned_until };
    match &state.admin.cluster {
        Some(cluster) => cluster.announce(sub, banned_until).await.map(|()| outcome).map_err(|e| (outcome, e)),
        None => Ok(outcome),
    }
}

/// Closes this node's connections of `sub` with 4001; returns how many.
pub fn close_user(state: &ServerState, sub: &str) -> usize {
    let mut closed = 0;
    for conn in state.connections.iter() {
        if &*conn.sub == sub && conn.close(DISCONNECT_CODE, DISCONNECT_REASON) {
            closed += 1;
        }
    }
    if closed > 0 {
        state.metrics.admin_disconnects.inc_by(closed as u64);
        tracing::info!(sub, closed, "admin API closed the user's connections");
    }
    closed
}
