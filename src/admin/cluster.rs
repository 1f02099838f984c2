//! How the admin API's disconnects and bans reach every node of a cluster:
//! the node that was asked keeps the ban in Redis (`<prefix>:ban:<sub>`,
//! expiring with the ban, so a node that starts later still refuses the
//! user) and publishes the disconnect on `<prefix>:admin`; every node
//! listens there, closes its own connections of the user and records the ban.
//!
//! Each node reads every ban from Redis when it starts and again after each
//! reconnect of its admin subscription, so an announcement missed during a
//! Redis outage is made up for as soon as Redis is back.

use std::borrow::Cow;
use std::sync::Arc;
use std::time::Duration;

use futures_util::StreamExt;
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use serde::{Deserialize, Serialize};

use crate::bus::BusError;
use crate::state::{unix_millis, ServerState};

const COMMAND_TIMEOUT: Duration = Duration::from_secs(2);
const MIN_BACKOFF: Duration = Duration::from_millis(100);
const MAX_BACKOFF: Duration = Duration::from_secs(5);
/// How often ended bans are dropped from memory.
const TIDY_INTERVAL: Duration = Duration::from_secs(60);

pub struct ClusterLink {
    client: redis::Client,
    commands: ConnectionManager,
    channel: String,
    ban_prefix: String,
}

/// What goes over `<prefix>:admin`.
#[derive(Serialize, Deserialize)]
struct Announcement<'a> {
    #[serde(borrow)]
    sub: Cow<'a, str>,
    banned_until: Option<u64>,
}

impl ClusterLink {
    /// Connects lazily: a node may start before Redis.
    pub fn new(url: &str, prefix: &str) -> Result<Self, BusError> {
        let client = redis::Client::open(url).map_err(BusError::redis)?;
        let config = ConnectionManagerConfig::new()
            .set_response_timeout(Some(COMMAND_TIMEOUT))
            .set_connection_timeout(Some(COMMAND_TIMEOUT))
            .set_number_of_retries(1);
        let commands = ConnectionManager::new_lazy_with_config(client.clone(), config).map_err(BusError::redis)?;
        Ok(Self { client, commands, channel: format!("{prefix}:admin"), ban_prefix: format!("{prefix}:ban:") })
    }

    /// Keeps the ban in Redis until it ends, then tells every node.
    pub async fn announce(&self, sub: &str, banned_until: Option<u64>) -> Result<(), BusError> {
        let payload =
            serde_json::to_string(&Announcement { sub: Cow::Borrowed(sub), banned_until }).map_err(BusError::redis)?;
        let mut pipe = redis::pipe();
        if let Some(until) = banned_until {
            let ttl = until.saturating_sub(unix_millis()).max(1);
            pipe.cmd("SET").arg(format!("{}{sub}", self.ban_prefix)).arg(until).arg("PX").arg(ttl).ignore();
        }
        pipe.cmd("PUBLISH").arg(&self.channel).arg(payload).ignore();
        let mut conn = self.commands.clone();
        tokio::time::timeout(COMMAND_TIMEOUT, pipe.query_async::<()>(&mut conn))
            .await
            .map_err(|_| BusError::redis("timed out"))?
            .map_err(BusError::redis)
    }

    /// Every ban Redis holds, as `(sub, until)`.
    async fn load_bans(&self) -> Result<Vec<(String, u64)>, BusError> {
        let mut conn = self.commands.clone();
        let pattern = format!("{}*", glob_escape(&self.ban_prefix));
        let mut keys: Vec<String> = Vec::new();
        let mut cursor: u64 = 0;
        loop {
            let scan = redis::cmd("SCAN").arg(cursor).arg("MATCH").arg(&pattern).arg("COUNT").arg(1000).to_owned();
            let (next, mut batch): (u64, Vec<String>) = scan.query_async(&mut conn).await.map_err(BusError::redis)?;
            keys.append(&mut batch);
            if next == 0 {
                break;
            }
            cursor = next;
        }
        let mut bans = Vec::with_capacity(keys.len());
        for chunk in keys.chunks(1000) {
            let values: Vec<Option<u64>> =
                redis::cmd("MGET").arg(chunk).query_async(&mut conn).await.map_err(BusError::redis)?;
            for (key, until) in chunk.iter().zip(values) {
                if let (Some(sub), Some(until)) = (key.strip_prefix(&self.ban_prefix), until) {
                    bans.push((sub.to_owned(), until));
                }
            }
        }
        Ok(bans)
    }
}

/// Loads every ban before the node serves anyone, so a restarted node
/// refuses a banned user from its first request. Redis being away does not
/// stop the start: [`run`] loads them as soon as it connects.
pub async fn load_at_start(state: &ServerState) {
    let Some(link) = &state.admin.cluster else { return };
    match tokio::time::timeout(COMMAND_TIMEOUT, link.load_bans()).await {
        Ok(Ok(bans)) => record(state, bans),
        Ok(Err(e)) => tracing::warn!("cannot read the bans from redis yet: {e}"),
        Err(_) => tracing::warn!("cannot read the bans from redis yet: timed out"),
    }
}

fn record(state: &ServerState, bans: Vec<(String, u64)>) {
    for (sub, until) in bans {
        state.admin.bans.ban(&sub, until);
    }
}

/// Listens for other nodes' disconnects until shutdown, reconnecting with backoff.
pub async fn run(state: Arc<ServerState>) {
    let Some(link) = &state.admin.cluster else { return };
    let mut backoff = MIN_BACKOFF;
    loop {
        match listen(&state, link).await {
            Ok(()) => return,
            Err(e) => tracing::warn!("redis admin subscription lost: {e}"),
        }
        tokio::select! {
            () = tokio::time::sleep(backoff) => {}
            () = state.shutdown.cancelled() => return,
        }
        backoff = (backoff * 2).min(MAX_BACKOFF);
    }
}

/// One subscription's life; `Ok` only on shutdown.
async fn listen(state: &ServerState, link: &ClusterLink) -> Result<(), BusError> {
    let mut pubsub = tokio::time::timeout(COMMAND_TIMEOUT, link.client.get_async_pubsub())
        .await
        .map_err(|_| BusError::redis("connect timed out"))?
        .map_err(BusError::redis)?;
    pubsub.subscribe(&link.channel).await.map_err(BusError::redis)?;
    // Read after subscribing: a ban announced in between is caught by one or the other.
    record(state, link.load_bans().await?);
    let mut messages = pubsub.into_on_message();
    let mut tidy = tokio::time::interval(TIDY_INTERVAL);
    loop {
        tokio::select! {
            message = messages.next() => {
                let message = message.ok_or_else(|| BusError::redis("admin subscription closed"))?;
                apply(state, message.get_payload_bytes());
            }
            _ = tidy.tick() => state.admin.bans.forget_ended(unix_millis()),
            () = state.shutdown.cancelled() => return Ok(()),
        }
    }
}

/// Another node's (or this node's own) disconnect: record the ban, close
/// the user's connections here. Closing twice is harmless.
fn apply(state: &ServerState, payload: &[u8]) {
    let Ok(announcement) = serde_json::from_slice::<Announcement<'_>>(payload) else {
        tracing::warn!("unreadable admin announcement on redis");
        return;
    };
    if let Some(until) = announcement.banned_until {
        state.admin.bans.ban(&announcement.sub, until);
    }
    super::close_user(state, &announcement.sub);
}

/// `pattern` with Redis glob characters escaped, to match it literally.
fn glob_escape(pattern: &str) -> String {
    let mut out = String::with_capacity(pattern.len());
    for c in pattern.chars() {
        if matches!(c, '*' | '?' | '[' | ']' | '\\') {
            out.push('\\');
        }
        out.push(c);
    }
    out
}
