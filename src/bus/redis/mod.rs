//! The Redis bus: one pipelined connection for commands, one pub/sub
//! connection per node.
//!
//! A publish is one Lua script call (EVALSHA, loaded on NOSCRIPT) that gives
//! the message its `seq`, keeps it in the room's capped history and
//! PUBLISHes it, atomically, so every node receives each room's messages in
//! `seq` order. Concurrent publishes share the multiplexed connection and are
//! pipelined: none waits for another to come back.

mod keys;
mod link;
mod subscriber;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use redis::Script;
use serde_json::value::RawValue;
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;

use super::BusError;
use crate::metrics::Metrics;
use crate::protocol::outbound::write_json_string;
use crate::registry::{Registry, Snapshot, StoredMessage};
use crate::room::RoomName;
use crate::ws::frame::text_frame;
use keys::Keys;
use link::{CommandLink, CONNECT_TIMEOUT};
use subscriber::{Command, Subscriber};

pub struct RedisBus {
    link: Arc<CommandLink>,
    keys: Keys,
    history_size: usize,
    publish_script: Script,
    snapshot_script: Script,
    commands: mpsc::UnboundedSender<Command>,
    link_up: Arc<AtomicBool>,
    metrics: Arc<Metrics>,
}

/// What the node needs to reach Redis.
pub struct RedisSettings<'a> {
    pub url: &'a str,
    pub prefix: &'a str,
    pub history_size: usize,
}

impl RedisBus {
    /// Connects lazily (a node may start before Redis; `/readyz` tells) and
    /// starts this node's subscriber, which runs until `shutdown`.
    pub fn start(
        settings: RedisSettings<'_>,
        registry: Arc<Registry>,
        metrics: Arc<Metrics>,
        shutdown: CancellationToken,
    ) -> Result<Self, BusError> {
        let client = redis::Client::open(settings.url).map_err(BusError::redis)?;
        let link = Arc::new(CommandLink::new(client.clone()).map_err(BusError::redis)?);
        let keys = Keys::new(settings.prefix);
        let snapshot_script = Script::new(include_str!("snapshot.lua"));
        let (commands, command_rx) = mpsc::unbounded_channel();
        let link_up = Arc::new(AtomicBool::new(false));
        let subscriber = Subscriber {
            client,
            link: link.clone(),
            keys: keys.clone(),
            snapshot_script: snapshot_script.clone(),
            registry,
            metrics: metrics.clone(),
            node: super::fresh_epoch(),
            link_up: link_up.clone(),
            shutdown,
        };
        tokio::spawn(subscriber.run(command_rx));
        Ok(Self {
            link,
            keys,
            history_size: settings.history_size,
            publish_script: Script::new(include_str!("publish.lua")),
            snapshot_script,
            commands,
            link_up,
            metrics,
        })
    }

    pub async fn publish(&self, room: &RoomName, from: &str, ts: u64, body: &RawValue) -> Result<u64, BusError> {
        let started = Instant::now();
        let mut from_json = Vec::with_capacity(from.len() + 2);
        write_json_string(&mut from_json, from);
        let mut call = self.publish_script.key(self.keys.state(room));
        call.key(self.keys.history(room))
            .arg(self.keys.channel(room))
            .arg(self.history_size)
            .arg(room.as_str())
            .arg(from_json)
            .arg(ts)
            .arg(body.get())
            .arg(super::fresh_epoch());
        let (seq, _epoch): (u64, String) = self
            .link
            .run(|mut conn| async move { call.invoke_async(&mut conn).await })
            .await
            .map_err(BusError::redis)?;
        self.metrics.bus_publish_seconds.observe(started.elapsed().as_secs_f64());
        self.metrics.messages_published.inc();
        Ok(seq)
    }

    /// The room's seq and epoch, and the messages after `since`, atomically.
    pub async fn snapshot(&self, room: &RoomName, since: Option<u64>) -> Result<Snapshot, BusError> {
        snapshot(&self.snapshot_script, &self.keys, &self.link, room, since).await
    }

    /// Up to `limit` messages before `before`, oldest first.
    pub async fn history(&self, room: &RoomName, before: Option<u64>, limit: usize) -> Result<Vec<Bytes>, BusError> {
        let max = before.map_or_else(|| "+inf".to_owned(), |b| format!("({b}"));
        let mut query = redis::cmd("ZREVRANGEBYSCORE");
        query.arg(self.keys.history(room)).arg(max).arg("-inf").arg("WITHSCORES").arg("LIMIT").arg(0).arg(limit);
        let flat: Vec<Vec<u8>> = self
            .link
            .run(|mut conn| async move { query.query_async(&mut conn).await })
            .await
            .map_err(BusError::redis)?;
        let mut messages: Vec<Bytes> = flat.chunks_exact(2).map(|pair| Bytes::from(pair[0].clone())).collect();
        messages.reverse();
        Ok(messages)
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

    /// `Some("redis")` when Redis does not answer or this node's pub/sub
    /// connection is down.
    pub async fn unready(&self) -> Option<&'static str> {
        let ping = self.link.run(|mut conn| async move { redis::cmd("PING").query_async::<String>(&mut conn).await });
        let answered = matches!(tokio::time::timeout(CONNECT_TIMEOUT, ping).await, Ok(Ok(_)));
        (!answered || !self.link_up.load(Ordering::Relaxed)).then_some("redis")
    }
}

/// Runs the snapshot script; shared by joins and the subscriber's gap fills.
async fn snapshot(
    script: &Script,
    keys: &Keys,
    link: &CommandLink,
    room: &RoomName,
    since: Option<u64>,
) -> Result<Snapshot, BusError> {
    let mut call = script.key(keys.state(room));
    call.key(keys.history(room)).arg(super::fresh_epoch()).arg(since.map(|s| s.to_string()).unwrap_or_default());
    let (seq, epoch, flat): (u64, String, Vec<Vec<u8>>) =
        link.run(|mut conn| async move { call.invoke_async(&mut conn).await }).await.map_err(BusError::redis)?;
    Ok(Snapshot { seq, epoch: epoch.into(), messages: stored_messages(&flat) })
}

/// Messages from a `WITHSCORES` reply: member (the JSON), then score (the seq).
fn stored_messages(flat: &[Vec<u8>]) -> Vec<StoredMessage> {
    flat.chunks_exact(2)
        .filter_map(|pair| {
            let seq = std::str::from_utf8(&pair[1]).ok()?.parse().ok()?;
            Some(StoredMessage { seq, frame: text_frame(&pair[0]) })
        })
        .collect()
}
