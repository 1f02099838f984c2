//! The bus gives each message its `seq` and gets it to every member: in
//! process on a single node, through Redis in a cluster; with a database,
//! it also keeps every message durably.
//!
//! Sessions and the HTTP API talk only to [`Bus`]; which backends run
//! behind it is decided once, at start, by `--redis-url` and
//! `--database-url`.

pub mod local;
pub mod redis;

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use serde_json::value::RawValue;

use self::redis::RedisBus;
use crate::conn::Connection;
use crate::history::writer::WriteBehind;
use crate::history::Database;
use crate::metrics::Metrics;
use crate::registry::{Registry, Since, StoredMessage};
use crate::room::RoomName;
use crate::state::unix_millis;

/// The most messages a `join` with `since` replays from the database.
pub const MAX_REPLAY: usize = 10_000;

/// A backend could not do its part; nothing was half-done.
#[derive(Debug, thiserror::Error)]
pub enum BusError {
    #[error("{backend} is unavailable: {reason}")]
    Unavailable { backend: &'static str, reason: String },
}

impl BusError {
    pub fn redis(reason: impl std::fmt::Display) -> Self {
        BusError::Unavailable { backend: "redis", reason: reason.to_string() }
    }

    pub fn database(reason: impl std::fmt::Display) -> Self {
        BusError::Unavailable { backend: "database", reason: reason.to_string() }
    }
}

/// A new random epoch (PROTOCOL.md section 2), also used as a node id.
pub fn fresh_epoch() -> String {
    format!("{:016x}", rand::random::<u64>())
}

/// Durable history of a single node: the database and its write queue.
pub struct Persistence {
    pub db: Arc<Database>,
    pub writer: WriteBehind,
    pub durable_acks: bool,
}

enum Backend {
    Local(Option<Persistence>),
    Redis(RedisBus),
}

pub struct Bus {
    registry: Arc<Registry>,
    metrics: Arc<Metrics>,
    backend: Backend,
}

impl Bus {
    /// The in-process bus of a single node, with durable history or without.
    pub fn local(registry: Arc<Registry>, metrics: Arc<Metrics>, persistence: Option<Persistence>) -> Self {
        Self { registry, metrics, backend: Backend::Local(persistence) }
    }

    /// A node of a cluster joined by Redis.
    pub fn redis(registry: Arc<Registry>, metrics: Arc<Metrics>, redis: RedisBus) -> Self {
        Self { registry, metrics, backend: Backend::Redis(redis) }
    }

    pub fn registry(&self) -> &Registry {
        &self.registry
    }

    /// In a cluster, how presence and the admin API reach the bus's Redis.
    pub fn redis_access(&self) -> Option<self::redis::RedisAccess> {
        match &self.backend {
            Backend::Local(_) => None,
            Backend::Redis(redis) => Some(redis.access()),
        }
    }

    /// Publishes `body` from `from` to `room`; returns its `seq` once every
    /// current member is sure to receive it (with `--durable-acks`, once the
    /// database holds it).
    pub async fn publish(&self, room: &RoomName, from: &str, body: &RawValue) -> Result<u64, BusError> {
        let ts = unix_millis();
        match &self.backend {
            Backend::Local(persistence) => local::publish(self, persistence.as_ref(), room, from, ts, body).await,
            Backend::Redis(redis) => redis.publish(room, from, ts, body).await,
        }
    }

    /// Adds `member` to `room` and queues, in order, the replay of what it
    /// missed since `since` and `joined`.
    pub async fn join(
        &self,
        room: &RoomName,
        member: &Arc<Connection>,
        since: Option<Since<'_>>,
    ) -> Result<(), BusError> {
        let redis = match &self.backend {
            Backend::Local(persistence) => return local::join(self, persistence.as_ref(), room, member, since).await,
            Backend::Redis(redis) => redis,
        };
        self.registry.add_syncing_member(room, member, || redis.subscribe(room));
        let synced = async {
            redis.subscription_settled().await?;
            redis.snapshot(room, since.map(|s| s.seq)).await
        };
        match synced.await {
            Ok(snapshot) => {
                self.registry.complete_join(room, member, since, snapshot);
                Ok(())
            }
            Err(e) => {
                self.leave(room, member.id);
                Err(e)
            }
        }
    }

    /// Removes a member; returns whether it was one.
    pub fn leave(&self, room: &RoomName, member_id: u64) -> bool {
        self.registry.leave(room, member_id, || {
            if let Backend::Redis(redis) = &self.backend {
                redis.unsubscribe(room);
            }
        })
    }

    /// Up to `limit` messages before `before`, oldest first, as JSON texts.
    pub async fn history(&self, room: &RoomName, before: Option<u64>, limit: usize) -> Result<Vec<Bytes>, BusError> {
        match &self.backend {
            Backend::Local(persistence) => {
                let recent = self.registry.history(room, before, limit);
                let db = persistence.as_ref().map(|p| &p.db);
                let older = older_history(db, room, before, limit, &recent).await?;
                Ok(older.iter().chain(&recent).map(StoredMessage::json).collect())
            }
            Backend::Redis(redis) => redis.history(room, before, limit).await,
        }
    }

    /// The backends that do not answer, for `/readyz`.
    pub async fn unready_backends(&self) -> Vec<&'static str> {
        match &self.backend {
            Backend::Local(None) => Vec::new(),
            Backend::Local(Some(p)) => p.db.ping().await.err().map(|_| "database").into_iter().collect(),
            Backend::Redis(redis) => redis.unready().await,
        }
    }

    /// At shutdown, after the connections closed: writes out what is queued
    /// for the database and records a clean stop; false if it could not.
    pub async fn flush(&self, grace: Duration) -> bool {
        match &self.backend {
            Backend::Local(Some(p)) => local::flush(p, grace).await,
            Backend::Local(None) | Backend::Redis(_) => true,
        }
    }
}

/// The messages before `recent` (or before `before`) that only the database
/// still holds, to make up `limit`.
pub(crate) async fn older_history(
    db: Option<&Arc<Database>>,
    room: &RoomName,
    before: Option<u64>,
    limit: usize,
    recent: &[StoredMessage],
) -> Result<Vec<StoredMessage>, BusError> {
    let Some(db) = db else { return Ok(Vec::new()) };
    let first_held = recent.first().map(|m| m.seq);
    if recent.len() >= limit || first_held == Some(1) {
        return Ok(Vec::new());
    }
    db.history_before(room, first_held.or(before), limit - recent.len()).await.map_err(BusError::database)
}
