//! The single-node bus with a database: rooms start where the database
//! left them, messages are written behind (or, with `--durable-acks`,
//! delivered only once written), and recovery reaches back past memory.

use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::value::RawValue;
use tokio::sync::oneshot;

use super::{fresh_epoch, Bus, BusError, Persistence, MAX_REPLAY};
use crate::conn::Connection;
use crate::history::writer::Job;
use crate::history::PersistedMessage;
use crate::protocol::outbound;
use crate::registry::{Delivery, Since, Snapshot, StoredMessage};
use crate::room::RoomName;

/// The name a single node's run is recorded under.
pub const NODE: &str = "single";

pub async fn publish(
    bus: &Bus,
    persistence: Option<&Persistence>,
    room: &RoomName,
    from: &str,
    ts: u64,
    body: &RawValue,
) -> Result<u64, BusError> {
    let Some(p) = persistence else {
        return Ok(publish_in_memory(bus, room, from, ts, body).seq);
    };
    load_room(bus, p, room).await?;
    if p.durable_acks {
        return publish_durably(bus, p, room, from, ts, body).await;
    }
    let permit = p.writer.reserve().map_err(BusError::database)?;
    let delivery = publish_in_memory(bus, room, from, ts, body);
    permit.send(Job { message: persisted(room, delivery.seq, delivery.epoch, from, ts, body), on_commit: None });
    Ok(delivery.seq)
}

fn publish_in_memory(bus: &Bus, room: &RoomName, from: &str, ts: u64, body: &RawValue) -> Delivery {
    let started = Instant::now();
    let delivery = bus.registry.publish(room, from, ts, body.get().as_bytes());
    bus.metrics.record_fanout(started, delivery.recipients, delivery.slow_consumers);
    bus.metrics.messages_published.inc();
    delivery
}

/// Queues the message with its seq and waits for its batch to commit; the
/// writer delivers it then, in seq order.
async fn publish_durably(
    bus: &Bus,
    p: &Persistence,
    room: &RoomName,
    from: &str,
    ts: u64,
    body: &RawValue,
) -> Result<u64, BusError> {
    let permit = p.writer.reserve().map_err(BusError::database)?;
    let (committed, wait) = oneshot::channel();
    let registry = bus.registry.clone();
    let metrics = bus.metrics.clone();
    let started = Instant::now();
    bus.registry.assign_seq(room, |seq, epoch| {
        let frame = outbound::message(room, seq, from, ts, body.get().as_bytes());
        let delivered_room = room.clone();
        let on_commit = Box::new(move || {
            let (recipients, slow) = registry.deliver_committed(&delivered_room, StoredMessage::new(seq, frame));
            metrics.record_fanout(started, recipients, slow);
            let _ = committed.send(seq);
        });
        let message = persisted(room, seq, epoch.clone(), from, ts, body);
        permit.send(Job { message, on_commit: Some(on_commit) });
    });
    bus.metrics.messages_published.inc();
    wait.await.map_err(|_| BusError::database("stopped before the message was written"))
}

fn persisted(room: &RoomName, seq: u64, epoch: Arc<str>, from: &str, ts: u64, body: &RawValue) -> PersistedMessage {
    PersistedMessage { room: room.clone(), seq, epoch, from: from.into(), ts_millis: ts, body: body.get().to_owned() }
}

/// Starts a room where the database left it, the first time it is used.
async fn load_room(bus: &Bus, p: &Persistence, room: &RoomName) -> Result<(), BusError> {
    if bus.registry.is_loaded(room) {
        return Ok(());
    }
    let (seq, epoch) = p.db.room_state(room).await.map_err(BusError::database)?;
    let epoch = match epoch {
        Some(epoch) => epoch,
        None => p.db.adopt_epoch(room, &fresh_epoch()).await.map_err(BusError::database)?,
    };
    bus.registry.load(room, seq, epoch.into());
    Ok(())
}

pub async fn join(
    bus: &Bus,
    persistence: Option<&Persistence>,
    room: &RoomName,
    member: &Arc<Connection>,
    since: Option<Since<'_>>,
) -> Result<(), BusError> {
    let mut older = None;
    if let Some(p) = persistence {
        load_room(bus, p, room).await?;
        if let Some(since) = since.filter(|s| !bus.registry.recent_covers(room, s.seq)) {
            let messages = p.db.messages_after(room, since.seq, MAX_REPLAY).await.map_err(BusError::database)?;
            let seq = messages.last().map_or(since.seq, |m| m.seq);
            older = Some(Snapshot { seq, epoch: bus.registry.room_epoch(room), messages });
        }
    }
    bus.registry.join_local(room, member, since, older);
    Ok(())
}

/// Writes out the queue and, if all of it made it, records a clean stop.
pub async fn flush(p: &Persistence, grace: Duration) -> bool {
    if !p.writer.flush(grace).await {
        return false;
    }
    match p.db.end_run(NODE).await {
        Ok(()) => true,
        Err(e) => {
            tracing::warn!("could not record a clean stop: {e}");
            false
        }
    }
}
