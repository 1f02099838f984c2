//! With `--redis-cluster`: this node's sharded subscriptions, and the one
//! task that keeps them.
//!
//! Each room with local members is subscribed with `SSUBSCRIBE` to its
//! channel, which carries the room's hash tag, on the shard that owns the
//! room's slot; redis-rs routes the command there and delivers the messages
//! as RESP3 pushes. Sharded pub/sub never crosses the cluster bus, so a
//! shard carries only its own rooms' traffic.
//!
//! redis-rs also resubscribes by itself: after a node's connection breaks,
//! and, following a new slot map, on the node that now owns a slot. Each
//! such resubscription is confirmed by an `ssubscribe` push; for a room
//! that was already confirmed it means messages may have been missed, so
//! the task fills the room from Redis history. When a connection to a node
//! is lost, the task also subscribes every room again itself, until each
//! is confirmed by its current owner. When a slot moves away from
//! a node (resharding, failover), Redis itself ends the subscription with a
//! `sunsubscribe` push; the task subscribes again, which reaches the new
//! owner, and that confirmation fills the gap the same way.
//!
//! With `--durable-acks` the task also keeps this node's ack channels, one
//! per partition (a shard channel in the partition's slot, where the
//! database writer's release script `SPUBLISH`es), subscribed the same way.
//! An ack lost meanwhile is found by the publish asking whether its message
//! was released.

use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use redis::{PushInfo, PushKind, RedisResult, Value};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::acks::PendingAcks;
use super::link::Conn;
use super::scripts::Scripts;
use super::subscriber::{fill_from, on_message, Command};
use super::BusError;
use crate::metrics::Metrics;
use crate::registry::Registry;
use crate::room::RoomName;

/// How often subscriptions that failed are tried again.
const RETRY_EVERY: Duration = Duration::from_secs(1);

pub struct ShardSubscriber {
    pub scripts: Arc<Scripts>,
    pub acks: Arc<PendingAcks>,
    pub registry: Arc<Registry>,
    pub metrics: Arc<Metrics>,
    pub link_up: Arc<AtomicBool>,
    pub shutdown: CancellationToken,
}

/// What the task knows of each room's subscription.
#[derive(Default)]
struct Subscriptions {
    /// Rooms the registry wants subscribed.
    wanted: HashSet<RoomName>,
    /// Wanted rooms whose subscription Redis confirmed at least once.
    confirmed: HashSet<RoomName>,
    /// Wanted rooms whose last `SSUBSCRIBE` failed (no shard answered).
    failed: HashSet<RoomName>,
    /// With durable acks: this node's ack channels not subscribed yet.
    acks_failed: HashSet<String>,
}

impl ShardSubscriber {
    pub async fn run(
        self,
        mut commands: mpsc::UnboundedReceiver<Command>,
        mut pushes: mpsc::UnboundedReceiver<PushInfo>,
    ) {
        let mut subs = Subscriptions { acks_failed: self.ack_channels(), ..Subscriptions::default() };
        let mut retry = tokio::time::interval(RETRY_EVERY);
        loop {
            tokio::select! {
                command = commands.recv() => match command {
                    Some(Command::Subscribe(room)) => {
                        subs.wanted.insert(room.clone());
                        self.subscribe(&mut subs, room).await;
                    }
                    Some(Command::Unsubscribe(room)) => {
                        subs.wanted.remove(&room);
                        subs.confirmed.remove(&room);
                        subs.failed.remove(&room);
                        let channel = self.scripts.keys.channel(&room);
                        if let Err(e) = self.sharded("SUNSUBSCRIBE", &channel).await {
                            tracing::debug!("sunsubscribe {channel}: {e}");
                        }
                        self.metrics.bus_subscriptions.set(subs.wanted.len() as i64);
                    }
                    Some(Command::Barrier(done)) => {
                        self.retry_failed(&mut subs).await;
                        let _ = done.send(subs.failed.is_empty());
                    }
                    None => return,
                },
                push = pushes.recv() => match push {
                    Some(push) => self.on_push(&mut subs, push).await,
                    None => return,
                },
                _ = retry.tick() => self.retry_failed(&mut subs).await,
                () = self.shutdown.cancelled() => return,
            }
        }
    }

    async fn subscribe(&self, subs: &mut Subscriptions, room: RoomName) {
        let channel = self.scripts.keys.channel(&room);
        match self.sharded("SSUBSCRIBE", &channel).await {
            Ok(()) => {
                subs.failed.remove(&room);
                self.link_up.store(true, Ordering::Relaxed);
            }
            Err(e) => {
                tracing::warn!("cannot subscribe {channel}: {e}");
                subs.failed.insert(room);
            }
        }
        self.metrics.bus_subscriptions.set(subs.wanted.len() as i64);
    }

    async fn retry_failed(&self, subs: &mut Subscriptions) {
        let failed: Vec<RoomName> = subs.failed.iter().cloned().collect();
        for room in failed {
            self.subscribe(subs, room).await;
        }
        let failed: Vec<String> = subs.acks_failed.iter().cloned().collect();
        for channel in failed {
            self.subscribe_acks(subs, channel).await;
        }
    }

    /// With durable acks, this node's ack channels: one per partition.
    fn ack_channels(&self) -> HashSet<String> {
        if !self.scripts.durable_acks {
            return HashSet::new();
        }
        let keys = &self.scripts.keys;
        (0..keys.partitions()).map(|p| keys.acks(p, &self.scripts.node)).collect()
    }

    async fn subscribe_acks(&self, subs: &mut Subscriptions, channel: String) {
        match self.sharded("SSUBSCRIBE", &channel).await {
            Ok(()) => {
                subs.acks_failed.remove(&channel);
            }
            Err(e) => {
                tracing::debug!("cannot subscribe {channel}: {e}");
                subs.acks_failed.insert(channel);
            }
        }
    }

    /// `SSUBSCRIBE` or `SUNSUBSCRIBE` one channel on the shard of its slot.
    async fn sharded(&self, command: &str, channel: &str) -> RedisResult<()> {
        let Conn::Cluster(mut conn) = self.scripts.link.get().await? else {
            return Err(redis::RedisError::from(std::io::Error::other("not a cluster connection")));
        };
        match command {
            "SSUBSCRIBE" => conn.ssubscribe(channel).await,
            _ => conn.sunsubscribe(channel).await,
        }
    }

    /// Delivers what was published after `seq` (from Redis, and from the
    /// database for what Redis lost, as every gap fill does); in a new epoch
    /// (the room's shard failed over meanwhile), everything of that epoch.
    async fn fill_after(&self, room: &RoomName, seq: u64) -> Result<(), BusError> {
        let snapshot = super::snapshot_with_db(&self.scripts, room, Some(seq)).await?;
        if *snapshot.epoch == *self.registry.room_epoch(room) {
            for message in snapshot.messages {
                self.registry.deliver(room, &snapshot.epoch, message, true);
            }
            return Ok(());
        }
        fill_from(&self.scripts, &self.registry, room, 0).await
    }

    async fn on_push(&self, subs: &mut Subscriptions, push: PushInfo) {
        let channel = push.data.first().and_then(text);
        match (push.kind, channel) {
            (PushKind::SMessage, Some(channel)) => {
                let Some(payload) = push.data.get(1).and_then(bytes) else { return };
                if self.scripts.keys.is_ack_channel(&channel, &self.scripts.node) {
                    if let Some(id) = std::str::from_utf8(payload).ok().and_then(|p| p.parse().ok()) {
                        self.acks.complete(id);
                    }
                    return;
                }
                if let Err(e) = on_message(&self.scripts, &self.registry, &self.metrics, &channel, payload).await {
                    // The gap stays: the next message or resubscription fills it.
                    tracing::warn!("cannot fill a gap on {channel}: {e}");
                }
            }
            (PushKind::SSubscribe, Some(channel)) => {
                let Some(room) = self.scripts.keys.room_of_channel(&channel) else { return };
                if !subs.wanted.contains(&room) {
                    return;
                }
                if !subs.confirmed.insert(room.clone()) {
                    // A resubscription: fill what was published meanwhile.
                    if let Some(seq) = self.registry.delivered_seq(&room) {
                        if let Err(e) = self.fill_after(&room, seq).await {
                            tracing::warn!("cannot fill room {room} after resubscribing: {e}");
                        }
                    }
                }
            }
            (PushKind::SUnsubscribe, Some(channel)) => {
                // Ours were forgotten already; any other one is Redis
                // moving the slot away: follow it.
                if self.scripts.keys.is_ack_channel(&channel, &self.scripts.node) {
                    self.subscribe_acks(subs, channel).await;
                    return;
                }
                let Some(room) = self.scripts.keys.room_of_channel(&channel) else { return };
                if subs.wanted.contains(&room) {
                    tracing::info!("room {room} moved to another shard: subscribing there");
                    self.subscribe(subs, room).await;
                }
            }
            (PushKind::Disconnection, _) => {
                // redis-rs resubscribes after a reconnect, but not always
                // after a failover (measured: the subscriptions stayed lost
                // when the replica was promoted after the slot refresh). So
                // every room is subscribed again here, and retried each
                // second until the shard that owns it now confirms; the
                // confirmation fills the gap.
                tracing::warn!("a redis cluster connection was lost: subscribing every room again");
                self.metrics.bus_reconnects.inc();
                subs.failed.extend(subs.wanted.iter().cloned());
                subs.acks_failed = self.ack_channels();
            }
            _ => {}
        }
    }
}

/// A push's bulk string, as bytes (a channel name or a payload).
pub(super) fn bytes(value: &Value) -> Option<&[u8]> {
    match value {
        Value::BulkString(b) => Some(b),
        _ => None,
    }
}

/// A push's bulk string, as text.
pub(super) fn text(value: &Value) -> Option<String> {
    bytes(value).and_then(|b| std::str::from_utf8(b).ok()).map(str::to_owned)
}
