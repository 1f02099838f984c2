//! The Redis bus: one pipelined connection for commands, one pub/sub
//! connection per node.
//!
//! A publish is one Lua script call (EVALSHA, loaded on NOSCRIPT) that gives
//! the message its `seq`, keeps it in the room's capped history and
//! PUBLISHes it, atomically, so every node receives each room's messages in
//! `seq` order. Concurrent publishes share the multiplexed connection and are
//! pipelined: none waits for another to come back. With a database, the same
//! script queues the message for it (see its `persist` module), and history and
//! recovery reach back past what Redis holds.
//!
//! With `--redis-cluster` the same scripts run on a Redis Cluster: a room's
//! keys and channel share the hash tag of its partition (see `keys`), the
//! script `SPUBLISH`es, the `shards` module keeps this node's sharded
//! subscriptions, and the database writer reads one stream per partition.
//!
//! Presence and the admin API reach Redis through the bus's link and key
//! names (`access`), and on a cluster subscribe to sharded channels of their
//! own (`channels`).

mod access;
mod acks;
mod channels;
mod expiry;
mod keys;
mod link;
mod persist;
mod scripts;
mod shards;
mod subscriber;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use redis::Value;
use serde_json::value::RawValue;
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;

pub use keys::{cluster_room_tag, PARTITIONS};

use super::{BusError, MAX_REPLAY};
use crate::history::Database;
use crate::metrics::Metrics;
use crate::registry::{Registry, Snapshot, StoredMessage};
use crate::room::RoomName;
use acks::PendingAcks;
use keys::Keys;
use link::{CommandLink, CONNECT_TIMEOUT};
use persist::Persister;
use scripts::{stored_messages, Scripts};
use shards::ShardSubscriber;
use subscriber::{Command, Subscriber};

pub use access::RedisAccess;
pub use channels::{ChannelEvent, ShardChannels};

/// With `--durable-acks`, how long a publish waits for its ack on pub/sub
/// before it asks Redis whether the message was released (the ack may have
/// been lost in a pub/sub reconnect).
const ACK_RECHECK: Duration = Duration::from_secs(1);

pub struct RedisBus {
    scripts: Arc<Scripts>,
    acks: Arc<PendingAcks>,
    commands: mpsc::UnboundedSender<Command>,
    link_up: Arc<AtomicBool>,
    metrics: Arc<Metrics>,
    /// `--redis-url`, for what opens connections of its own beside the bus.
    url: String,
}

/// What the node needs to reach Redis.
pub struct RedisSettings<'a> {
    pub url: &'a str,
    pub prefix: &'a str,
    pub history_size: usize,
    /// Durable history, and the most messages that may wait to be written.
    pub database: Option<(Arc<Database>, usize)>,
    /// Deliver and ack only what the database holds (needs `database`).
    pub durable_acks: bool,
    /// How long a room's keys outlive its last use (`--history-ttl`); `None` keeps them.
    pub key_ttl: Option<Duration>,
    /// `url` is a comma-separated list of a Redis Cluster's seed nodes.
    pub cluster: bool,
}

impl RedisBus {
    /// Connects lazily (a node may start before Redis; `/readyz` tells) and
    /// starts this node's subscriber, and its database writer if there is a
    /// database; both run until `shutdown`.
    pub fn start(
        settings: RedisSettings<'_>,
        registry: Arc<Registry>,
        metrics: Arc<Metrics>,
        shutdown: CancellationToken,
    ) -> Result<Self, BusError> {
        if settings.cluster {
            return Self::start_cluster(settings, registry, metrics, shutdown);
        }
        let client = redis::Client::open(settings.url).map_err(BusError::redis)?;
        let link = Arc::new(CommandLink::new(client.clone()).map_err(BusError::redis)?);
        let keys = Keys::new(settings.prefix);
        let node = super::fresh_epoch();
        let db = settings.database.as_ref().map(|(db, _)| db.clone());
        let mut scripts = Scripts::new(link, keys.clone(), settings.history_size, db, node.clone());
        scripts.durable_acks = settings.durable_acks && settings.database.is_some();
        if let Some((_, queue)) = &settings.database {
            scripts.persist_queue = *queue;
        }
        // At least a millisecond: 0 would mean no expiry at all.
        scripts.key_ttl_ms = settings.key_ttl.map_or(0, |ttl| (ttl.as_millis() as u64).max(1));
        let scripts = Arc::new(scripts);
        if scripts.key_ttl_ms > 0 {
            tokio::spawn(expiry::run(scripts.clone(), registry.clone(), shutdown.clone()));
        }
        if let Some((db, _)) = settings.database {
            let persister = Persister {
                link: Arc::new(CommandLink::new(client.clone()).map_err(BusError::redis)?),
                scripts: scripts.clone(),
                db,
                metrics: metrics.clone(),
                shutdown: shutdown.clone(),
            };
            tokio::spawn(persister.run());
        }
        let acks = Arc::new(PendingAcks::default());
        let (commands, command_rx) = mpsc::unbounded_channel();
        let link_up = Arc::new(AtomicBool::new(false));
        let subscriber = Subscriber {
            client,
            scripts: scripts.clone(),
            acks: acks.clone(),
            registry,
            metrics: metrics.clone(),
            link_up: link_up.clone(),
            shutdown,
        };
        tokio::spawn(subscriber.run(command_rx));
        Ok(Self { scripts, acks, commands, link_up, metrics, url: settings.url.to_owned() })
    }

    /// The bus over a Redis Cluster: one cluster connection (a pipelined
    /// socket per shard) for commands and sharded subscriptions alike.
    fn start_cluster(
        settings: RedisSettings<'_>,
        registry: Arc<Registry>,
        metrics: Arc<Metrics>,
        shutdown: CancellationToken,
    ) -> Result<Self, BusError> {
        let (pushes, push_rx) = mpsc::unbounded_channel();
        let client = link::cluster_client(settings.url, Some(pushes)).map_err(BusError::redis)?;
        let link = Arc::new(CommandLink::cluster(client));
        let keys = Keys::for_cluster(settings.prefix);
        let db = settings.database.as_ref().map(|(db, _)| db.clone());
        let mut scripts = Scripts::new(link, keys, settings.history_size, db, super::fresh_epoch());
        scripts.durable_acks = settings.durable_acks && settings.database.is_some();
        if let Some((_, queue)) = &settings.database {
            scripts.persist_queue = *queue;
        }
        scripts.key_ttl_ms = settings.key_ttl.map_or(0, |ttl| (ttl.as_millis() as u64).max(1));
        let scripts = Arc::new(scripts);
        if scripts.key_ttl_ms > 0 {
            tokio::spawn(expiry::run(scripts.clone(), registry.clone(), shutdown.clone()));
        }
        if let Some((db, _)) = settings.database {
            // A cluster connection of its own: while a shard is down, its
            // reads of that shard's streams wait out their timeouts apart
            // from the publishes.
            let link = Arc::new(CommandLink::cluster_renewing(
                link::cluster_client(settings.url, None).map_err(BusError::redis)?,
            ));
            let persister =
                Persister { link, scripts: scripts.clone(), db, metrics: metrics.clone(), shutdown: shutdown.clone() };
            tokio::spawn(persister.run());
        }
        let acks = Arc::new(PendingAcks::default());
        let (commands, command_rx) = mpsc::unbounded_channel();
        let link_up = Arc::new(AtomicBool::new(false));
        let subscriber = ShardSubscriber {
            scripts: scripts.clone(),
            acks: acks.clone(),
            registry,
            metrics: metrics.clone(),
            link_up: link_up.clone(),
            shutdown,
        };
        tokio::spawn(subscriber.run(command_rx, push_rx));
        Ok(Self { scripts, acks, commands, link_up, metrics, url: settings.url.to_owned() })
    }

    /// The link, key names and URL that presence and the admin API use.
    pub fn access(&self) -> RedisAccess {
        RedisAccess { link: self.scripts.link.clone(), keys: self.scripts.keys.clone(), url: self.url.clone() }
    }

    /// Publishes and returns the message's seq once every current member is
    /// sure to get it; with `--durable-acks`, once the database holds it.
    pub async fn publish(&self, room: &RoomName, from: &str, ts: u64, body: &RawValue) -> Result<u64, BusError> {
        let started = Instant::now();
        let seq = if self.scripts.durable_acks {
            self.publish_durably(room, from, ts, body).await?
        } else {
            self.scripts.publish(room, from, ts, body, None).await?.seq
        };
        self.metrics.bus_publish_seconds.observe(started.elapsed().as_secs_f64());
        self.metrics.messages_published.inc();
        Ok(seq)
    }

    /// Queues the message for the database writer and waits until it was
    /// committed and released.
    async fn publish_durably(&self, room: &RoomName, from: &str, ts: u64, body: &RawValue) -> Result<u64, BusError> {
        let (request, mut acked) = self.acks.register();
        // Forgotten however this ends, the publisher's connection closing included.
        let _forget = acks::Forget(&self.acks, request);
        async {
            let seq = self.scripts.publish(room, from, ts, body, Some(request)).await?.seq;
            loop {
                if tokio::time::timeout(ACK_RECHECK, &mut acked).await.is_ok()
                    || self.scripts.is_released(room, seq).await?
                {
                    return Ok(seq);
                }
            }
        }
        .await
    }

    /// The room's seq and epoch, and the messages after `since`: from Redis,
    /// and from the database for what Redis no longer holds.
    pub async fn snapshot(&self, room: &RoomName, since: Option<u64>) -> Result<Snapshot, BusError> {
        snapshot_with_db(&self.scripts, room, since).await
    }

    /// Up to `limit` messages before `before`, oldest first: from Redis, and
    /// from the database for older ones.
    pub async fn history(&self, room: &RoomName, before: Option<u64>, limit: usize) -> Result<Vec<Bytes>, BusError> {
        let max = before.map_or_else(|| "+inf".to_owned(), |b| format!("({b}"));
        let mut query = redis::cmd("ZREVRANGEBYSCORE");
        query
            .arg(self.scripts.keys.history(room))
            .arg(max)
            .arg("-inf")
            .arg("WITHSCORES")
            .arg("LIMIT")
            .arg(0)
            .arg(limit);
        let reply: Value = self
            .scripts
            .link
            .run(|mut conn| async move { query.query_async(&mut conn).await })
            .await
            .map_err(BusError::redis)?;
        let mut recent = stored_messages(&flat_with_scores(reply));
        recent.reverse();
        let db = self.scripts.db.as_ref();
        let older = super::older_history(db, room, before, limit, &recent).await?;
        Ok(older.iter().chain(&recent).map(StoredMessage::json).collect())
    }

    /// Asks the subscriber to subscribe `room`; called under the room's
    /// lock, so commands leave in the order the registry decided them.
    pub fn subscribe(&self, room: &RoomName) {
        let _ = self.commands.send(Command::Subscribe(room.clone()));
    }

    pub fn unsubscribe(&self, room: &RoomName) {
        let _ = self.commands.send(Command::Unsubscribe(room.clone()));
    }

    /// Waits until every subscribe command sent so far is confirmed.
    pub async fn subscription_settled(&self) -> Result<(), BusError> {
        let (done, settled) = oneshot::channel();
        let _ = self.commands.send(Command::Barrier(done));
        match settled.await {
            Ok(true) => Ok(()),
            _ => Err(BusError::redis("the pub/sub connection is down")),
        }
    }

    /// The backends that do not answer: Redis (or this node's pub/sub
    /// connection to it), and the database if there is one.
    pub async fn unready(&self) -> Vec<&'static str> {
        if self.scripts.keys.is_cluster() {
            return self.unready_shards().await;
        }
        let ping =
            self.scripts.link.run(|mut conn| async move { redis::cmd("PING").query_async::<String>(&mut conn).await });
        let answered = matches!(tokio::time::timeout(CONNECT_TIMEOUT, ping).await, Ok(Ok(_)));
        let mut unready = Vec::new();
        if !answered || !self.link_up.load(Ordering::Relaxed) {
            unready.push("redis");
        }
        if let Some(db) = &self.scripts.db {
            if db.ping().await.is_err() {
                unready.push("database");
            }
        }
        unready
    }

    /// On a cluster: ready when every primary answers (so every slot has one).
    async fn unready_shards(&self) -> Vec<&'static str> {
        use redis::cluster_routing::{MultipleNodeRoutingInfo, ResponsePolicy, RoutingInfo};
        let ping = self.scripts.link.run(|conn| async move {
            let link::Conn::Cluster(mut conn) = conn else { return Ok(Value::Nil) };
            let all = RoutingInfo::MultiNode((MultipleNodeRoutingInfo::AllMasters, Some(ResponsePolicy::AllSucceeded)));
            conn.route_command(redis::cmd("PING"), all).await
        });
        match tokio::time::timeout(CONNECT_TIMEOUT * 2, ping).await {
            Ok(Ok(_)) => Vec::new(),
            _ => vec!["redis"],
        }
    }
}

/// A `WITHSCORES` reply as RESP2 gives it (member, score, member, ...):
/// RESP3, which a cluster connection speaks, nests each pair and sends the
/// score as a double.
fn flat_with_scores(reply: Value) -> Vec<Vec<u8>> {
    let Value::Array(items) = reply else { return Vec::new() };
    let mut flat = Vec::with_capacity(items.len() * 2);
    for item in items {
        match item {
            Value::Array(pair) => flat.extend(pair.into_iter().map(score_or_member)),
            other => flat.push(score_or_member(other)),
        }
    }
    flat
}

fn score_or_member(value: Value) -> Vec<u8> {
    match value {
        Value::BulkString(bytes) => bytes,
        Value::Double(score) => format!("{score}").into_bytes(),
        Value::Int(score) => score.to_string().into_bytes(),
        _ => Vec::new(),
    }
}

/// The room's seq and epoch, and the messages after `since`: from Redis,
/// and from the database for what Redis no longer holds (a Redis that lost
/// its data, a history capped shorter than the gap). Joins with `since` and
/// the subscriber's gap fills both read through it, so a message the
/// database holds is never skipped because Redis lost it.
pub(super) async fn snapshot_with_db(
    scripts: &Scripts,
    room: &RoomName,
    since: Option<u64>,
) -> Result<Snapshot, BusError> {
    let mut snapshot = scripts.snapshot(room, since).await?;
    let (Some(db), Some(since)) = (&scripts.db, since) else { return Ok(snapshot) };
    let first_held = snapshot.messages.first().map_or(snapshot.seq + 1, |m| m.seq);
    if first_held > since + 1 {
        let older = db.messages_after(room, since, MAX_REPLAY).await.map_err(BusError::database)?;
        let mut messages: Vec<StoredMessage> = older.into_iter().filter(|m| m.seq < first_held).collect();
        messages.append(&mut snapshot.messages);
        snapshot.messages = messages;
    }
    Ok(snapshot)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scored_replies_flatten_from_resp2_and_resp3() {
        let bulk = |s: &str| Value::BulkString(s.as_bytes().to_vec());
        let resp2 = Value::Array(vec![bulk("{}"), bulk("7")]);
        let resp3 = Value::Array(vec![Value::Array(vec![bulk("{}"), Value::Double(7.0)])]);
        for reply in [resp2, resp3] {
            assert_eq!(flat_with_scores(reply), vec![b"{}".to_vec(), b"7".to_vec()]);
        }
    }
}
