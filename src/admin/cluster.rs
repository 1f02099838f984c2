//! How the admin API's disconnects and bans reach every node of a cluster:
//! the node that was asked keeps the ban in Redis (`<prefix>:ban:<sub>`,
//! expiring with the ban, so a node that starts later still refuses the
//! user) and publishes the disconnect on `<prefix>:admin`; every node
//! listens there, closes its own connections of the user and records the ban.
//!
//! Each node reads every ban from Redis when it starts and again after each
//! reconnect of its admin subscription, so an announcement missed during a
//! Redis outage is made up for as soon as Redis is back.
//!
//! On a Redis Cluster the commands go through the bus's link, which routes
//! each ban key to the shard of its slot; the bans are read back with a
//! `SCAN` of every primary; and `<prefix>:admin` is a shard channel
//! (`SPUBLISH`, and every node `SSUBSCRIBE`s on the one shard that owns
//! it), which a slot move or failover does not lose: the subscription
//! follows it, and each time it is made again the bans are read again.

use std::borrow::Cow;
use std::sync::Arc;
use std::time::Duration;

use futures_util::StreamExt;
use serde::{Deserialize, Serialize};

use crate::bus::redis::{ChannelEvent, RedisAccess};
use crate::bus::BusError;
use crate::state::{unix_millis, ServerState};

const COMMAND_TIMEOUT: Duration = Duration::from_secs(2);
const MIN_BACKOFF: Duration = Duration::from_millis(100);
const MAX_BACKOFF: Duration = Duration::from_secs(5);
/// How often ended bans are dropped from memory.
const TIDY_INTERVAL: Duration = Duration::from_secs(60);
/// How often a failed read of every ban is tried again (Redis Cluster).
const RELOAD_INTERVAL: Duration = Duration::from_secs(1);

pub struct ClusterLink {
    access: RedisAccess,
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
    /// Through the bus's Redis (or Redis Cluster), which connects lazily:
    /// a node may start before Redis.
    pub fn new(access: RedisAccess, prefix: &str) -> Self {
        Self { access, channel: format!("{prefix}:admin"), ban_prefix: format!("{prefix}:ban:") }
    }

    /// Keeps the ban in Redis until it ends, then tells every node.
    pub async fn announce(&self, sub: &str, banned_until: Option<u64>) -> Result<(), BusError> {
        let payload =
            serde_json::to_string(&Announcement { sub: Cow::Borrowed(sub), banned_until }).map_err(BusError::redis)?;
        let told = async {
            if let Some(until) = banned_until {
                let ttl = until.saturating_sub(unix_millis()).max(1);
                let key = format!("{}{sub}", self.ban_prefix);
                self.access.query::<()>(redis::cmd("SET").arg(key).arg(until).arg("PX").arg(ttl)).await?;
            }
            // PUBLISH, or on a cluster SPUBLISH to the shard channel.
            let publish = self.access.keys.publish_command();
            self.access.query::<()>(redis::cmd(publish).arg(&self.channel).arg(payload)).await
        };
        tokio::time::timeout(COMMAND_TIMEOUT, told)
            .await
            .map_err(|_| BusError::redis("timed out"))?
            .map_err(BusError::redis)
    }

    /// Every ban Redis holds, as `(sub, until)`: on a cluster, from every primary.
    async fn load_bans(&self) -> Result<Vec<(String, u64)>, BusError> {
        let pattern = format!("{}*", glob_escape(&self.ban_prefix));
        let keys = self.access.scan(&pattern).await.map_err(BusError::redis)?;
        let mut bans = Vec::with_capacity(keys.len());
        for chunk in keys.chunks(1000) {
            // On a cluster redis-rs splits the MGET by slot.
            let values: Vec<Option<u64>> =
                self.access.query(redis::cmd("MGET").arg(chunk)).await.map_err(BusError::redis)?;
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
    // On a cluster the first command also connects to every primary.
    let wait = if link.access.is_cluster() { COMMAND_TIMEOUT * 2 } else { COMMAND_TIMEOUT };
    reload_bans(state, link, wait).await;
}

fn record(state: &ServerState, bans: Vec<(String, u64)>) {
    for (sub, until) in bans {
        state.admin.bans.ban(&sub, until);
    }
}

/// Listens for other nodes' disconnects until shutdown, reconnecting with backoff.
pub async fn run(state: Arc<ServerState>) {
    let Some(link) = &state.admin.cluster else { return };
    if link.access.is_cluster() {
        return listen_sharded(&state, link).await;
    }
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
    let client = redis::Client::open(link.access.url.as_str()).map_err(BusError::redis)?;
    let mut pubsub = tokio::time::timeout(COMMAND_TIMEOUT, client.get_async_pubsub())
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

/// Redis Cluster: listens on the shard channel until shutdown. Each time
/// the subscription is made (again) the bans are read again, and retried
/// every second until every primary answered.
async fn listen_sharded(state: &ServerState, link: &ClusterLink) {
    let mut channels = match link.access.shard_channels() {
        Ok(channels) => channels,
        Err(e) => {
            // The bus opened the same seeds already, so this is not expected.
            tracing::error!(
                "the admin API cannot subscribe on the redis cluster ({e}): it acts on the node asked only"
            );
            return;
        }
    };
    // Failures are retried inside; the confirmation comes as an event.
    channels.subscribe(&link.channel).await;
    let mut tidy = tokio::time::interval(TIDY_INTERVAL);
    let mut reload = tokio::time::interval(RELOAD_INTERVAL);
    let mut bans_due = false;
    loop {
        tokio::select! {
            event = channels.next() => match event {
                Some(ChannelEvent::Message { payload, .. }) => apply(state, &payload),
                // Read after subscribing: a ban announced in between is caught by one or the other.
                Some(ChannelEvent::Subscribed(_)) => bans_due = !reload_bans(state, link, COMMAND_TIMEOUT * 2).await,
                None => return,
            },
            _ = reload.tick(), if bans_due => bans_due = !reload_bans(state, link, COMMAND_TIMEOUT * 2).await,
            _ = tidy.tick() => state.admin.bans.forget_ended(unix_millis()),
            () = state.shutdown.cancelled() => return,
        }
    }
}

/// Reads every ban from Redis into this node, waiting at most `wait`;
/// false (and a warning) when Redis did not answer.
async fn reload_bans(state: &ServerState, link: &ClusterLink, wait: Duration) -> bool {
    match tokio::time::timeout(wait, link.load_bans()).await {
        Ok(Ok(bans)) => {
            record(state, bans);
            true
        }
        Ok(Err(e)) => {
            tracing::warn!("cannot read the bans from redis: {e}");
            false
        }
        Err(_) => {
            tracing::warn!("cannot read the bans from redis: timed out");
            false
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
