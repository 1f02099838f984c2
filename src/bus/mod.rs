//! The bus gives each message its `seq` and gets it to every member: in
//! process on a single node, through Redis in a cluster.
//!
//! Sessions and the HTTP API talk only to [`Bus`]; which backend runs
//! behind it is decided once, at start, by `--redis-url`.

pub mod redis;

use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use serde_json::value::RawValue;

use self::redis::RedisBus;
use crate::conn::Connection;
use crate::metrics::Metrics;
use crate::registry::{Registry, Since};
use crate::room::RoomName;
use crate::state::unix_millis;

/// A backend could not do its part; nothing was half-done.
#[derive(Debug, thiserror::Error)]
pub enum BusError {
    #[error("{backend} is unavailable: {reason}")]
    Unavailable {
        backend: &'static str,
        reason: String,
    },
}

impl BusError {
    pub fn redis(reason: impl std::fmt::Display) -> Self {
        BusError::Unavailable {
            backend: "redis",
            reason: reason.to_string(),
        }
    }
}

/// A new random epoch (PROTOCOL.md section 2), also used as a node id.
pub fn fresh_epoch() -> String {
    format!("{:016x}", rand::random::<u64>())
}

enum Backend {
    Local,
    Redis(RedisBus),
}

pub struct Bus {
    registry: Arc<Registry>,
    metrics: Arc<Metrics>,
    backend: Backend,
}

impl Bus {
    /// The in-process bus of a single node.
    pub fn local(registry: Arc<Registry>, metrics: Arc<Metrics>) -> Self {
        Self {
            registry,
            metrics,
            backend: Backend::Local,
        }
    }

    /// A node of a cluster joined by Redis.
    pub fn redis(registry: Arc<Registry>, metrics: Arc<Metrics>, redis: RedisBus) -> Self {
        Self {
            registry,
            metrics,
            backend: Backend::Redis(redis),
        }
    }

    pub fn registry(&self) -> &Registry {
        &self.registry
    }

    /// Publishes `body` from `from` to `room`; returns its `seq` once every
    /// current member is sure to receive it.
    pub async fn publish(
        &self,
        room: &RoomName,
        from: &str,
        body: &RawValue,
    ) -> Result<u64, BusError> {
        let ts = unix_millis();
        match &self.backend {
            Backend::Local => {
                let started = Instant::now();
                let delivery = self.registry.publish(room, from, ts, body.get().as_bytes());
                self.metrics
                    .record_fanout(started, delivery.recipients, delivery.slow_consumers);
                self.metrics.messages_published.inc();
                Ok(delivery.seq)
            }
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
        let Backend::Redis(redis) = &self.backend else {
            self.registry.join_local(room, member, since);
            return Ok(());
        };
        self.registry
            .add_syncing_member(room, member, || redis.subscribe(room));
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
    pub async fn history(
        &self,
        room: &RoomName,
        before: Option<u64>,
        limit: usize,
    ) -> Result<Vec<Bytes>, BusError> {
        match &self.backend {
            Backend::Local => Ok(self
                .registry
                .history(room, before, limit)
                .iter()
                .map(|m| m.json())
                .collect()),
            Backend::Redis(redis) => redis.history(room, before, limit).await,
        }
    }

    /// The backends that do not answer, for `/readyz`.
    pub async fn unready_backends(&self) -> Vec<&'static str> {
        match &self.backend {
            Backend::Local => Vec::new(),
            Backend::Redis(redis) => redis.unready().await.into_iter().collect(),
        }
    }
}
