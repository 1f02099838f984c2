//! Presence (PROTOCOL.md section 8): who is in a room, counted by user
//! (`sub`), and `presence_state` / `presence_diff` frames for connections
//! that joined with `"presence": true`.
//!
//! Presence has its own sharded map rather than living in the registry's
//! rooms: the publish path never looks at it (a message costs nothing more
//! in a room with presence), and joins and leaves, which do change it, are
//! rare next to messages. Each room has its own lock, held only for map
//! updates and for queueing frames, never across an `.await`. Diffs are
//! batched: the first change after a quiet period schedules one flush task
//! for the room, at most every [`DIFF_INTERVAL`], that sends every
//! subscriber the net change since what it last received.

mod room;

use std::sync::Arc;

use bytes::Bytes;
use dashmap::DashMap;
use parking_lot::Mutex;

use crate::conn::outbox::{PushError, Pushed};
use crate::conn::{flush_all, Connection};
use crate::metrics::Metrics;
use crate::protocol::outbound;
use crate::room::RoomName;
use room::RoomPresence;
pub use room::{DIFF_INTERVAL, MAX_LISTED};

type RoomCell = Arc<Mutex<RoomPresence>>;

pub struct Presence {
    rooms: DashMap<RoomName, RoomCell>,
    metrics: Arc<Metrics>,
}

impl Presence {
    pub fn new(metrics: Arc<Metrics>) -> Self {
        Self { rooms: DashMap::new(), metrics }
    }

    /// Counts `conn` (user `sub`) as joined to `room`; with `subscribe`, it
    /// gets the room's state now and diffs from then on, and without, a
    /// subscription from an earlier join ends. Call after `joined` is queued.
    pub fn join(&self, room: &RoomName, conn: &Arc<Connection>, sub: &str, subscribe: bool) {
        self.with_room(room, |presence, to_flush| {
            presence.add_conn(conn.id, sub);
            if subscribe {
                let (new, pushed) = presence.subscribe(room, conn);
                self.metrics.presence_states.inc();
                if new {
                    self.metrics.presence_subscribers.inc();
                }
                match pushed {
                    Ok(Pushed::FlushNeeded) => to_flush.push(conn.clone()),
                    Ok(Pushed::Queued) | Err(PushError::Closed) => {}
                    Err(PushError::Full) => {
                        self.metrics.slow_consumers.inc();
                    }
                }
            } else if presence.unsubscribe(conn.id) {
                self.metrics.presence_subscribers.dec();
            }
        });
    }

    /// `conn_id` left `room` (or closed): its user leaves when it was their
    /// last connection here.
    pub fn leave(&self, room: &RoomName, conn_id: u64) {
        let Some(cell) = self.rooms.get(room).map(|r| r.clone()) else { return };
        {
            let mut presence = cell.lock();
            if presence.unsubscribe(conn_id) {
                self.metrics.presence_subscribers.dec();
            }
            if presence.remove_conn(conn_id) {
                self.schedule_flush(room, &cell, &mut presence);
            }
        }
        self.rooms.remove_if(room, |_, cell| {
            let mut presence = cell.lock();
            let idle = presence.is_idle();
            presence.removed |= idle;
            idle
        });
    }

    /// The answer to a `presence` request.
    pub fn answer(&self, room: &RoomName, reference: Option<&str>) -> Bytes {
        match self.rooms.get(room).map(|r| r.clone()) {
            Some(cell) => outbound::presence(room, cell.lock().view(), reference),
            None => outbound::presence(room, RoomPresence::default().view(), reference),
        }
    }

    /// `GET /rooms/{room}/presence`'s body.
    pub fn json(&self, room: &RoomName) -> Vec<u8> {
        match self.rooms.get(room).map(|r| r.clone()) {
            Some(cell) => outbound::presence_json(room, cell.lock().view()),
            None => outbound::presence_json(room, RoomPresence::default().view()),
        }
    }

    /// Local presence subscribers in `room` (for tests and metrics).
    pub fn subscribers(&self, room: &RoomName) -> usize {
        self.rooms.get(room).map_or(0, |cell| cell.lock().subscribers())
    }

    /// Runs `f` under the room's lock, creating the room if needed; then
    /// schedules the flush a change calls for and writes what `f` queued.
    fn with_room<R>(&self, name: &RoomName, f: impl FnOnce(&mut RoomPresence, &mut Vec<Arc<Connection>>) -> R) -> R {
        let mut to_flush = Vec::new();
        let mut f = Some(f);
        let result = loop {
            let cell = self.rooms.entry(name.clone()).or_default().clone();
            let mut presence = cell.lock();
            if presence.removed {
                continue;
            }
            if let Some(f) = f.take() {
                let result = f(&mut presence, &mut to_flush);
                self.schedule_flush(name, &cell, &mut presence);
                break result;
            }
        };
        if !to_flush.is_empty() {
            flush_all(to_flush);
        }
        result
    }

    /// Starts the task that sends the room's next diffs, when a change
    /// calls for one and none is on its way.
    fn schedule_flush(&self, name: &RoomName, cell: &RoomCell, presence: &mut RoomPresence) {
        let Some(at) = presence.flush_due() else { return };
        let (name, cell, metrics) = (name.clone(), cell.clone(), self.metrics.clone());
        tokio::spawn(async move {
            tokio::time::sleep_until(at.into()).await;
            let mut to_flush = Vec::new();
            cell.lock().flush(&name, &metrics, &mut to_flush);
            if !to_flush.is_empty() {
                flush_all(to_flush);
            }
        });
    }
}
