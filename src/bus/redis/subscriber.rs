//! This node's pub/sub connection to Redis, and the one task that owns it.
//!
//! The task executes subscribe and unsubscribe commands in the order the
//! registry decided them, hands every message to the registry in `seq`
//! order, fills gaps from Redis history, and replaces the connection when
//! it breaks or goes silent (a probe the node publishes to itself every
//! second stops coming back): after a reconnect it resubscribes every room
//! with local members and delivers what was published meanwhile.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use redis::aio::PubSubSink;
use redis::AsyncCommands;
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;

use super::keys::Envelope;
use super::scripts::Scripts;
use super::BusError;
use crate::metrics::Metrics;
use crate::registry::{Delivered, Registry, StoredMessage};
use crate::room::RoomName;
use crate::ws::frame::text_frame;

const PROBE_INTERVAL: Duration = Duration::from_secs(1);
/// A pub/sub connection that has not heard its own probe for this long is
/// taken for dead even if its socket looks open.
const PROBE_TIMEOUT: Duration = Duration::from_secs(3);
const MIN_BACKOFF: Duration = Duration::from_millis(100);
const MAX_BACKOFF: Duration = Duration::from_secs(5);
const SUBSCRIBE_BATCH: usize = 1000;

pub enum Command {
    Subscribe(RoomName),
    Unsubscribe(RoomName),
    /// Answered `true` once every command before it is done.
    Barrier(oneshot::Sender<bool>),
}

pub struct Subscriber {
    pub client: redis::Client,
    /// The scripts and command connection, for gap fills and probes.
    pub scripts: Arc<Scripts>,
    /// Publishes of this node waiting for the database writer's ack.
    pub acks: Arc<super::acks::PendingAcks>,
    pub registry: Arc<Registry>,
    pub metrics: Arc<Metrics>,
    pub link_up: Arc<AtomicBool>,
    pub shutdown: CancellationToken,
}

impl Subscriber {
    pub async fn run(self, mut commands: mpsc::UnboundedReceiver<Command>) {
        let mut backoff = MIN_BACKOFF;
        loop {
            let connected_at = Instant::now();
            let ended = self.serve(&mut commands).await;
            self.link_up.store(false, Ordering::Relaxed);
            match ended {
                Ok(()) => return,
                Err(e) => tracing::warn!("redis pub/sub connection lost: {e}"),
            }
            self.metrics.bus_reconnects.inc();
            if connected_at.elapsed() > MAX_BACKOFF {
                backoff = MIN_BACKOFF;
            }
            if !self.wait_refusing(&mut commands, backoff).await {
                return;
            }
            backoff = (backoff * 2).min(MAX_BACKOFF);
        }
    }

    /// Sleeps for `backoff`, answering barriers with "down"; false on shutdown.
    async fn wait_refusing(&self, commands: &mut mpsc::UnboundedReceiver<Command>, backoff: Duration) -> bool {
        let sleep = tokio::time::sleep(backoff);
        tokio::pin!(sleep);
        loop {
            tokio::select! {
                () = &mut sleep => return true,
                () = self.shutdown.cancelled() => return false,
                command = commands.recv() => match command {
                    // The registry's flags decide what is resubscribed on reconnect.
                    Some(Command::Barrier(done)) => { let _ = done.send(false); }
                    Some(_) => {}
                    None => return false,
                },
            }
        }
    }

    /// One pub/sub connection's life; `Ok` only on shutdown.
    async fn serve(&self, commands: &mut mpsc::UnboundedReceiver<Command>) -> Result<(), BusError> {
        let pubsub = tokio::time::timeout(super::CONNECT_TIMEOUT, self.client.get_async_pubsub())
            .await
            .map_err(|_| BusError::redis("connect timed out"))?
            .map_err(BusError::redis)?;
        let (mut sink, mut stream) = pubsub.split();
        let probe_channel = self.scripts.keys.probe(&self.scripts.node);
        sink.subscribe(&probe_channel).await.map_err(BusError::redis)?;
        let ack_channel = self.scripts.keys.acks(0, &self.scripts.node);
        if self.scripts.durable_acks {
            sink.subscribe(&ack_channel).await.map_err(BusError::redis)?;
        }
        let rooms = self.registry.subscribed_rooms();
        let channels: Vec<String> = rooms.iter().map(|(room, _)| self.scripts.keys.channel(room)).collect();
        for batch in channels.chunks(SUBSCRIBE_BATCH) {
            sink.subscribe(batch).await.map_err(BusError::redis)?;
        }
        self.metrics.bus_subscriptions.set(channels.len() as i64);
        self.link_up.store(true, Ordering::Relaxed);
        for (room, delivered) in rooms {
            if let Some(seq) = delivered {
                self.fill_from(&room, seq).await?;
            }
        }
        let mut probes = tokio::time::interval(PROBE_INTERVAL);
        let mut last_probe = Instant::now();
        loop {
            tokio::select! {
                message = stream.next() => {
                    let message = message.ok_or_else(|| BusError::redis("pub/sub connection closed"))?;
                    if message.get_channel_name() == probe_channel {
                        last_probe = Instant::now();
                    } else if message.get_channel_name() == ack_channel {
                        let id = std::str::from_utf8(message.get_payload_bytes()).ok().and_then(|s| s.parse().ok());
                        if let Some(id) = id {
                            self.acks.complete(id);
                        }
                    } else {
                        self.on_message(message.get_channel_name(), message.get_payload_bytes()).await?;
                    }
                }
                command = commands.recv() => match command {
                    Some(command) => self.execute(command, &mut sink).await?,
                    None => return Ok(()),
                },
                _ = probes.tick() => {
                    if last_probe.elapsed() > PROBE_TIMEOUT {
                        return Err(BusError::redis("pub/sub connection went silent"));
                    }
                    self.send_probe(&probe_channel);
                }
                () = self.shutdown.cancelled() => return Ok(()),
            }
        }
    }

    async fn execute(&self, command: Command, sink: &mut PubSubSink) -> Result<(), BusError> {
        match command {
            Command::Subscribe(room) => {
                sink.subscribe(self.scripts.keys.channel(&room)).await.map_err(BusError::redis)?;
                self.metrics.bus_subscriptions.inc();
            }
            Command::Unsubscribe(room) => {
                sink.unsubscribe(self.scripts.keys.channel(&room)).await.map_err(BusError::redis)?;
                self.metrics.bus_subscriptions.dec();
            }
            Command::Barrier(done) => {
                let _ = done.send(true);
            }
        }
        Ok(())
    }

    /// Publishes a probe without waiting: the loop hears it come back.
    fn send_probe(&self, channel: &str) {
        let link = self.scripts.link.clone();
        let channel = channel.to_owned();
        tokio::spawn(async move {
            let _: Result<(), _> = link.run(|mut conn| async move { conn.publish(channel, "probe").await }).await;
        });
    }

    async fn on_message(&self, channel: &str, payload: &[u8]) -> Result<(), BusError> {
        on_message(&self.scripts, &self.registry, &self.metrics, channel, payload).await
    }

    async fn fill_from(&self, room: &RoomName, seq: u64) -> Result<(), BusError> {
        fill_from(&self.scripts, &self.registry, room, seq).await
    }
}

/// A message that arrived on a room's channel, handed to the registry in
/// order (shared with the sharded subscriber of a Redis Cluster).
pub(super) async fn on_message(
    scripts: &Scripts,
    registry: &Registry,
    metrics: &Metrics,
    channel: &str,
    payload: &[u8],
) -> Result<(), BusError> {
    let Some(room) = scripts.keys.room_of_channel(channel) else {
        return Ok(());
    };
    let Some(envelope) = Envelope::parse(payload) else {
        tracing::warn!("ignoring a malformed message on {channel}");
        return Ok(());
    };
    metrics.bus_messages_received.inc();
    let message = StoredMessage::new(envelope.seq, text_frame(envelope.json));
    let started = Instant::now();
    let mut outcome = registry.deliver(&room, envelope.epoch, message.clone(), false);
    // Delivers in order: when messages before this one are missing (in
    // this epoch, or from the start of a new one), they come from history
    // first.
    if let Delivered::Gap { from } = outcome {
        metrics.bus_gap_fills.inc();
        fill_from(scripts, registry, &room, from - 1).await?;
        outcome = registry.deliver(&room, envelope.epoch, message, true);
    }
    if let Delivered::Fanout { recipients, slow_consumers } = outcome {
        metrics.record_fanout(started, recipients, slow_consumers);
    }
    Ok(())
}

/// Delivers what history holds after `seq`: Redis history, and the
/// database for what Redis lost (with `--durable-acks` an acked message may
/// be released just before Redis restarts empty; members must still get it).
pub(super) async fn fill_from(
    scripts: &Scripts,
    registry: &Registry,
    room: &RoomName,
    seq: u64,
) -> Result<(), BusError> {
    let snapshot = super::snapshot_with_db(scripts, room, Some(seq)).await?;
    for message in snapshot.messages {
        registry.deliver(room, &snapshot.epoch, message, true);
    }
    Ok(())
}
