//! Rooms and their local members, in a sharded map.
//!
//! Each room has its own lock. Queueing a message to every member happens
//! under that lock, so every member sees the same order however many
//! connections publish at once; the lock is never held across an `.await`
//! and fanout never waits for a member (a full queue cuts that member).
//! The socket writes that queueing calls for happen after the lock is
//! released, so publishers to the same room do not wait for the kernel.
//!
//! On a single node the room's lock also assigns `seq` ([`Registry::publish`]).
//! In a cluster Redis assigns it and this node's subscriber hands each
//! message to [`Registry::deliver`] in `seq` order; a joiner first waits for
//! the subscription, then reads Redis, then [`Registry::complete_join`]
//! replays what it missed and sets the seq from which live messages reach
//! it, so that replay and live stream meet with no gap and no duplicate.

mod budget;
mod tombstones;

use std::cell::Cell;
use std::collections::VecDeque;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use dashmap::DashMap;
use parking_lot::Mutex;

use crate::conn::outbox::{PushError, Pushed};
use crate::conn::{flush_all, Connection};
use crate::protocol::outbound;
use crate::room::RoomName;
use crate::ws::deflate_frame;
use crate::ws::frame::payload;
use budget::{message_bytes, room_bytes};
pub use budget::{Budget, DEFAULT_LIMIT as DEFAULT_HISTORY_MEMORY};
use tombstones::{Tombstone, Tombstones};

/// One message as history keeps it: its complete frame, whose payload is the
/// message's JSON text, and with `--compression` the same frame compressed,
/// made once and shared by every member that negotiated permessage-deflate
/// (history keeps it too, so a replay never compresses again).
#[derive(Clone, Debug)]
pub struct StoredMessage {
    pub seq: u64,
    pub frame: Bytes,
    pub deflated: Option<Bytes>,
}

impl StoredMessage {
    pub fn new(seq: u64, frame: Bytes) -> Self {
        Self { seq, frame, deflated: None }
    }

    /// The bytes of frames this message holds (both forms when compressed),
    /// as the history memory budget counts them.
    pub fn held_len(&self) -> usize {
        self.frame.len() + self.deflated.as_ref().map_or(0, |d| d.len())
    }

    /// The frame `conn` gets: the compressed one when it negotiated
    /// compression and the payload suits its limits, else the plain one.
    pub fn frame_for(&self, conn: &Connection) -> Bytes {
        match &self.deflated {
            Some(deflated) if conn.wants_compressed(&self.frame) => deflated.clone(),
            _ => self.frame.clone(),
        }
    }

    /// The message's JSON text, sharing the frame's memory.
    pub fn json(&self) -> Bytes {
        let header = self.frame.len() - payload(&self.frame).len();
        self.frame.slice(header..)
    }
}

/// Where a joining client says it left off.
#[derive(Debug, Clone, Copy)]
pub struct Since<'a> {
    pub seq: u64,
    pub epoch: Option<&'a str>,
}

/// A room's sequence state as the bus sees it, read after subscribing.
pub struct Snapshot {
    pub seq: u64,
    pub epoch: Arc<str>,
    /// Messages after the joiner's `since`, oldest first (empty without `since`).
    pub messages: Vec<StoredMessage>,
}

/// What a publish did, for the caller's ack and metrics.
pub struct Delivery {
    pub seq: u64,
    pub epoch: Arc<str>,
    pub recipients: usize,
    pub slow_consumers: usize,
}

/// What [`Registry::deliver`] did with a message from the bus.
#[derive(Debug, PartialEq, Eq)]
pub enum Delivered {
    /// Queued to the members.
    Fanout { recipients: usize, slow_consumers: usize },
    /// Already delivered (a gap fill got there first).
    Duplicate,
    /// Messages between the last delivered one and this one are missing:
    /// fetch `from..seq` from history and deliver them first.
    Gap { from: u64 },
    /// No local member wants this room any more.
    Unwanted,
}

struct Member {
    conn: Arc<Connection>,
    /// Live messages up to this seq are not sent: the replay covered them,
    /// or (`u64::MAX`) the member is still syncing.
    skip_through: u64,
}

struct RoomState {
    members: Vec<Member>,
    /// The last seq delivered here; `None` until a cluster room is synced.
    seq: Option<u64>,
    /// Single node: the last seq given out. Ahead of `seq` while messages
    /// wait for the database (`--durable-acks`).
    assigned: u64,
    /// Single node with a database: the room's seq and epoch were read from it.
    loaded: bool,
    epoch: Arc<str>,
    recent: VecDeque<StoredMessage>,
    /// Whether this node wants the room's bus messages (cluster mode).
    subscribed: bool,
    /// Set when the room left the map; a joiner that raced with the removal
    /// must look the room up again.
    removed: bool,
    /// The last publish, join or leave: an idle room's history is evicted.
    active: Instant,
    /// Members owed a flush by what was just queued to them, written once
    /// the lock is released.
    to_flush: Vec<Arc<Connection>>,
    /// What this room holds, as counted in the [`Budget`].
    bytes: usize,
}

impl RoomState {
    fn keep(&mut self, message: StoredMessage) {
        self.bytes += message_bytes(message.held_len());
        self.recent.push_back(message);
    }

    fn drop_oldest(&mut self) {
        if let Some(message) = self.recent.pop_front() {
            self.bytes -= message_bytes(message.held_len());
        }
    }

    fn clear_recent(&mut self) {
        let freed: usize = self.recent.iter().map(|m| message_bytes(m.held_len())).sum();
        self.bytes -= freed;
        self.recent.clear();
    }

    /// No member and nothing this node is subscribed for: the room may leave memory.
    fn is_unused(&self) -> bool {
        self.members.is_empty() && !self.subscribed
    }
}

/// What an eviction pass did, for the metrics.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Evicted {
    /// Rooms that left memory (a tombstone keeps their place).
    pub rooms: usize,
    /// Rooms with members whose kept history was dropped.
    pub trimmed: usize,
    /// Tombstones forgotten: those rooms start a new epoch when used again.
    pub forgotten: usize,
}

impl std::ops::AddAssign for Evicted {
    fn add_assign(&mut self, other: Self) {
        self.rooms += other.rooms;
        self.trimmed += other.trimmed;
        self.forgotten += other.forgotten;
    }
}

struct Room {
    state: Mutex<RoomState>,
}

pub struct Registry {
    rooms: DashMap<RoomName, Arc<Room>>,
    tombstones: Tombstones,
    history_size: usize,
    /// The epoch new rooms start in: this node's, new at every start, and
    /// new again whenever a tombstone is forgotten.
    epoch: Mutex<Arc<str>>,
    budget: Budget,
    /// Held by whoever evicts past the budget itself (see [`Registry::backstop`]).
    inline_eviction: Mutex<()>,
    /// What inline evictions did, for the eviction task to record.
    evicted_inline: Mutex<Evicted>,
    /// `--compression-min-bytes` when `--compression` is on.
    compress_min: Option<usize>,
}

impl Registry {
    pub fn new(history_size: usize, epoch: Arc<str>) -> Self {
        Self::with_history_memory(history_size, epoch, DEFAULT_HISTORY_MEMORY)
    }

    /// With `history_memory` bytes for rooms, their history and tombstones
    /// (an eighth of it at most for tombstones).
    pub fn with_history_memory(history_size: usize, epoch: Arc<str>, history_memory: usize) -> Self {
        Self {
            rooms: DashMap::new(),
            tombstones: Tombstones::new(history_memory / 8),
            history_size,
            epoch: Mutex::new(epoch),
            budget: Budget::new(history_memory),
            inline_eviction: Mutex::new(()),
            evicted_inline: Mutex::new(Evicted::default()),
            compress_min: None,
        }
    }

    pub fn budget(&self) -> &Budget {
        &self.budget
    }

    pub fn tombstone_count(&self) -> usize {
        self.tombstones.len()
    }

    fn node_epoch(&self) -> Arc<str> {
        self.epoch.lock().clone()
    }

    /// Compresses every message with a payload of at least `min_bytes`, once.
    pub fn with_compression(mut self, min_bytes: Option<usize>) -> Self {
        self.compress_min = min_bytes;
        self
    }

    /// Compresses the messages a joiner that negotiated compression will be
    /// replayed from a snapshot (Redis or the database): those were read for
    /// this joiner alone. What is held here was compressed when delivered.
    fn compress_replay(&self, snapshot: &mut Snapshot, member: &Connection, since: Option<Since<'_>>) {
        let (Some(since), Some(_)) = (since, member.deflate()) else {
            return;
        };
        for message in snapshot.messages.iter_mut().filter(|m| m.seq > since.seq) {
            self.compress(message);
        }
    }

    /// Makes the message's compressed frame if it qualifies and has none.
    fn compress(&self, message: &mut StoredMessage) {
        let Some(min) = self.compress_min else {
            return;
        };
        if message.deflated.is_none() && payload(&message.frame).len() >= min {
            message.deflated = deflate_frame(&message.frame);
        }
    }

    pub fn room_count(&self) -> usize {
        self.rooms.len()
    }

    /// Runs `f` under the room's lock, creating the room if needed.
    fn with_room<R>(&self, name: &RoomName, f: impl FnOnce(&mut RoomState) -> R) -> R {
        let mut f = Some(f);
        loop {
            let room = self.rooms.entry(name.clone()).or_insert_with(|| self.new_room(name)).clone();
            let mut state = room.state.lock();
            if state.removed {
                continue;
            }
            if let Some(f) = f.take() {
                let before = state.bytes;
                let result = f(&mut state);
                self.budget.apply(before, state.bytes);
                flush_after_unlock(state);
                self.backstop();
                return result;
            }
        }
    }

    /// Runs `f` under the lock of an existing room.
    fn with_existing_room<R>(&self, name: &RoomName, f: impl FnOnce(&mut RoomState) -> R) -> Option<R> {
        let room = self.rooms.get(name).map(|r| r.clone())?;
        let mut state = room.state.lock();
        let before = state.bytes;
        let result = (!state.removed).then(|| f(&mut state));
        self.budget.apply(before, state.bytes);
        flush_after_unlock(state);
        self.backstop();
        result
    }

    /// A new room, or an evicted one coming back: then its sequence goes on
    /// where it stopped, in the same epoch.
    fn new_room(&self, name: &RoomName) -> Arc<Room> {
        let (seq, assigned, epoch) = match self.tombstones.take(name.as_str()) {
            Some((t, freed)) => {
                self.budget.sub(freed);
                (Some(t.assigned), t.assigned, t.epoch)
            }
            None => (None, 0, self.node_epoch()),
        };
        let bytes = room_bytes(name.as_str());
        self.budget.add(bytes);
        Arc::new(Room {
            state: Mutex::new(RoomState {
                members: Vec::new(),
                seq,
                assigned,
                loaded: false,
                epoch,
                recent: VecDeque::new(),
                subscribed: false,
                removed: false,
                active: Instant::now(),
                to_flush: Vec::new(),
                bytes,
            }),
        })
    }

    /// Drops the rooms that have had no member and no publish for `ttl`
    /// (a single node keeps their place in the sequence in a tombstone).
    pub fn evict_idle(&self, ttl: Duration) -> Evicted {
        let idle = |state: &RoomState| state.is_unused() && state.active.elapsed() > ttl;
        let candidates: Vec<RoomName> = self
            .rooms
            .iter()
            .filter(|entry| idle(&entry.value().state.lock()))
            .map(|entry| entry.key().clone())
            .collect();
        let mut evicted = Evicted::default();
        for name in candidates {
            self.evict(&name, idle, &mut evicted);
        }
        evicted
    }

    /// Past the budget's high-water mark: drops the rooms idle longest until
    /// it is back under the low-water mark, and if rooms with members alone
    /// hold more than that, drops their kept history too, least recently
    /// active first (their sequence and members stay). One pass over the
    /// rooms frees a quarter of the budget.
    pub fn evict_for_memory(&self) -> Evicted {
        let _evicting = self.inline_eviction.lock();
        sweeping(|| self.evict_for_memory_locked())
    }

    /// [`evict_for_memory`](Self::evict_for_memory), its caller holding `inline_eviction`.
    fn evict_for_memory_locked(&self) -> Evicted {
        let mut evicted = Evicted::default();
        if !self.budget.above_low_water() {
            return evicted;
        }
        let by_age = |wanted: fn(&RoomState) -> bool| {
            let mut rooms: Vec<(Instant, RoomName)> = self
                .rooms
                .iter()
                .filter_map(|entry| {
                    let state = entry.value().state.lock();
                    wanted(&state).then(|| (state.active, entry.key().clone()))
                })
                .collect();
            rooms.sort_unstable_by_key(|(active, _)| *active);
            rooms
        };
        for (_, name) in by_age(RoomState::is_unused) {
            if !self.budget.above_low_water() {
                return evicted;
            }
            self.evict(&name, RoomState::is_unused, &mut evicted);
        }
        for (_, name) in by_age(|state| !state.recent.is_empty()) {
            if !self.budget.above_low_water() {
                break;
            }
            self.with_existing_room(&name, RoomState::clear_recent);
            evicted.trimmed += 1;
        }
        evicted
    }

    /// The eviction task starts at the high-water mark; should it fall
    /// behind (a busy machine) and the budget itself be passed, the
    /// publisher that passed it evicts before it returns, or waits for the
    /// sweep under way: past the budget, publishing slows down rather than
    /// memory growing. The sweep's own room updates do not come back here.
    fn backstop(&self) {
        if self.budget.held() <= self.budget.limit() || SWEEPING.with(Cell::get) {
            return;
        }
        let _evicting = self.inline_eviction.lock();
        if self.budget.held() <= self.budget.limit() {
            return;
        }
        let evicted = sweeping(|| self.evict_for_memory_locked());
        *self.evicted_inline.lock() += evicted;
    }

    /// What evictions past the budget did since the last call.
    pub fn take_evicted_inline(&self) -> Evicted {
        std::mem::take(&mut *self.evicted_inline.lock())
    }

    /// Removes `name` if `evictable` still holds under its lock, leaving a
    /// tombstone when its sequence has begun.
    fn evict(&self, name: &RoomName, evictable: impl Fn(&RoomState) -> bool, evicted: &mut Evicted) {
        let removed = self.rooms.remove_if(name, |_, room| {
            let mut state = room.state.lock();
            if !evictable(&state) {
                return false;
            }
            state.removed = true;
            self.budget.sub(state.bytes);
            if state.assigned > 0 {
                evicted.forgotten +=
                    self.bury(name, Tombstone { assigned: state.assigned, epoch: state.epoch.clone() });
            }
            true
        });
        evicted.rooms += usize::from(removed.is_some());
    }

    /// Keeps an evicted room's place; returns how many older tombstones
    /// that forgot. Rooms created after a forgetting start in a new epoch:
    /// one of them may be a forgotten room, whose old `seq`s must not repeat.
    fn bury(&self, name: &RoomName, tombstone: Tombstone) -> usize {
        let inserted = self.tombstones.insert(name.clone(), tombstone);
        self.budget.apply(inserted.forgotten_bytes, inserted.added_bytes);
        if inserted.forgotten > 0 {
            *self.epoch.lock() = crate::bus::fresh_epoch().into();
        }
        inserted.forgotten
    }

    /// Single node: gives the message the room's next `seq`, stores it and
    /// queues it to every member.
    pub fn publish(&self, room: &RoomName, from: &str, ts_millis: u64, body: &[u8]) -> Delivery {
        self.with_room(room, |state| {
            state.assigned += 1;
            let seq = state.assigned;
            let message = StoredMessage::new(seq, outbound::message(room, seq, from, ts_millis, body));
            let (recipients, slow_consumers) = self.fan_out(state, message);
            Delivery { seq, epoch: state.epoch.clone(), recipients, slow_consumers }
        })
    }

    /// Single node, `--durable-acks`: gives out the room's next `seq` and
    /// hands it to `queue` under the room's lock (so the write queue holds
    /// each room's messages in `seq` order); delivery waits for
    /// [`deliver_committed`](Self::deliver_committed).
    pub fn assign_seq(&self, room: &RoomName, queue: impl FnOnce(u64, &Arc<str>)) {
        self.with_room(room, |state| {
            state.assigned += 1;
            queue(state.assigned, &state.epoch);
        });
    }

    /// Single node, `--durable-acks`: delivers a message its batch committed.
    pub fn deliver_committed(&self, room: &RoomName, message: StoredMessage) -> (usize, usize) {
        self.with_room(room, |state| self.fan_out(state, message))
    }

    /// Single node with a database: whether the room's state was read from it.
    pub fn is_loaded(&self, room: &RoomName) -> bool {
        self.with_existing_room(room, |state| state.loaded).unwrap_or(false)
    }

    /// Single node with a database: starts the room where the database says.
    pub fn load(&self, room: &RoomName, seq: u64, epoch: Arc<str>) {
        self.with_room(room, |state| {
            if !state.loaded {
                // An evicted room may be ahead of the database (its last
                // messages still queued for it).
                let seq = seq.max(state.assigned);
                state.loaded = true;
                state.seq = Some(seq);
                state.assigned = seq;
                state.epoch = epoch;
            }
        });
    }

    /// Whether the messages held here reach back to `since` (or nothing was missed).
    pub fn recent_covers(&self, room: &RoomName, since: u64) -> bool {
        self.with_existing_room(room, |state| {
            since >= state.seq.unwrap_or(0) || state.recent.front().is_some_and(|m| m.seq <= since + 1)
        })
        .unwrap_or(false)
    }

    pub fn room_epoch(&self, room: &RoomName) -> Arc<str> {
        self.with_existing_room(room, |state| state.epoch.clone()).unwrap_or_else(|| self.node_epoch())
    }

    /// Queues `message` to the members, keeps it in `recent`, moves `seq`.
    fn fan_out(&self, state: &mut RoomState, mut message: StoredMessage) -> (usize, usize) {
        state.active = Instant::now();
        self.compress(&mut message);
        let mut recipients = 0;
        let mut slow_consumers = 0;
        for member in state.members.iter().filter(|m| m.skip_through < message.seq) {
            recipients += 1;
            match member.conn.queue(message.frame_for(&member.conn)) {
                Ok(Pushed::FlushNeeded) => state.to_flush.push(member.conn.clone()),
                Ok(Pushed::Queued) | Err(PushError::Closed) => {}
                Err(PushError::Full) => slow_consumers += 1,
            }
        }
        if let Some(member) = state.members.first().filter(|_| recipients > 0) {
            member.conn.note_fanout(recipients);
        }
        state.seq = Some(state.seq.unwrap_or(0).max(message.seq));
        if self.history_size > 0 {
            if state.recent.len() >= self.history_size {
                state.drop_oldest();
            }
            state.keep(message);
        }
        (recipients, slow_consumers)
    }

    /// Single node: adds `member` (once) and queues the replay of what it
    /// missed (from `older`, read from the database, and from what is held
    /// here), then `joined`, all under the room's lock.
    pub fn join_local(
        &self,
        room: &RoomName,
        member: &Arc<Connection>,
        since: Option<Since<'_>>,
        older: Option<Snapshot>,
    ) {
        self.with_room(room, |state| {
            upsert_member(state, member, 0);
            // Without `older`, everything to replay is held here.
            let mut snapshot =
                older.unwrap_or_else(|| Snapshot { seq: 0, epoch: state.epoch.clone(), messages: Vec::new() });
            self.compress_replay(&mut snapshot, member, since);
            finish_join(state, room, member, since, snapshot);
        });
    }

    /// Cluster: adds `member` as syncing (it gets no live message yet). Runs
    /// `subscribe` under the room's lock when the node was not subscribed,
    /// so subscribe and unsubscribe commands leave in the order decided.
    pub fn add_syncing_member(&self, room: &RoomName, member: &Arc<Connection>, subscribe: impl FnOnce()) {
        self.with_room(room, |state| {
            upsert_member(state, member, u64::MAX);
            if !state.subscribed {
                state.subscribed = true;
                subscribe();
            }
        });
    }

    /// Cluster: replays to a syncing member what it missed, from the bus's
    /// `snapshot` and from what was delivered here since, then `joined`;
    /// live messages after that reach it.
    pub fn complete_join(
        &self,
        room: &RoomName,
        member: &Arc<Connection>,
        since: Option<Since<'_>>,
        mut snapshot: Snapshot,
    ) {
        self.compress_replay(&mut snapshot, member, since);
        self.with_existing_room(room, |state| {
            if state.seq.is_some() && *state.epoch != *snapshot.epoch {
                restart_epoch(state, room, &snapshot.epoch, snapshot.seq);
            }
            if state.seq.is_none() {
                state.seq = Some(snapshot.seq);
                state.epoch = snapshot.epoch.clone();
            }
            finish_join(state, room, member, since, snapshot);
        });
    }

    /// Cluster: hands a message from the bus to the members, in `seq` order.
    /// With `accept_gap`, a message past a gap is delivered anyway (history
    /// no longer held what was missing).
    ///
    /// A message of a new epoch past its first is a gap from 1: the room's
    /// Redis lost its data (or a Redis Cluster shard failed over) and this
    /// node missed the start of the new epoch while it resubscribed or
    /// followed the room to another shard. The members then get the new
    /// epoch from its start, as far as history holds it.
    pub fn deliver(&self, room: &RoomName, epoch: &str, message: StoredMessage, accept_gap: bool) -> Delivered {
        self.with_existing_room(room, |state| {
            if !state.subscribed {
                return Delivered::Unwanted;
            }
            match state.seq {
                Some(_) if *state.epoch != *epoch && message.seq > 1 && !accept_gap => {
                    return Delivered::Gap { from: 1 };
                }
                Some(_) if *state.epoch != *epoch => restart_epoch(state, room, epoch, message.seq.saturating_sub(1)),
                Some(seq) if message.seq <= seq => return Delivered::Duplicate,
                Some(seq) if message.seq > seq + 1 && !accept_gap => return Delivered::Gap { from: seq + 1 },
                Some(_) => {}
                None => {
                    state.seq = Some(message.seq.saturating_sub(1));
                    state.epoch = epoch.into();
                }
            }
            let (recipients, slow_consumers) = self.fan_out(state, message);
            Delivered::Fanout { recipients, slow_consumers }
        })
        .unwrap_or(Delivered::Unwanted)
    }

    /// Removes `member_id`; returns whether it was a member. When the last
    /// member of a subscribed room leaves, `unsubscribe` runs under the lock
    /// and the room forgets its cluster state. A room with no member and no
    /// history leaves the map.
    pub fn leave(&self, room: &RoomName, member_id: u64, unsubscribe: impl FnOnce()) -> bool {
        let was_member = self
            .with_existing_room(room, |state| {
                let before = state.members.len();
                state.members.retain(|m| m.conn.id != member_id);
                state.active = Instant::now();
                if state.members.is_empty() && state.subscribed {
                    state.subscribed = false;
                    state.seq = None;
                    state.clear_recent();
                    unsubscribe();
                }
                before != state.members.len()
            })
            .unwrap_or(false);
        self.rooms.remove_if(room, |_, r| {
            let mut state = r.state.lock();
            // A single node's room keeps its seq for as long as the process runs.
            let idle = state.members.is_empty() && state.recent.is_empty() && !state.subscribed && state.assigned == 0;
            if idle {
                state.removed = true;
                self.budget.sub(state.bytes);
            }
            idle
        });
        was_member
    }

    /// Up to `limit` messages held here before `before` (exclusive), oldest first.
    pub fn history(&self, room: &RoomName, before: Option<u64>, limit: usize) -> Vec<StoredMessage> {
        self.with_existing_room(room, |state| {
            let end = match before {
                Some(before) => state.recent.partition_point(|m| m.seq < before),
                None => state.recent.len(),
            };
            let start = end.saturating_sub(limit);
            state.recent.range(start..end).cloned().collect()
        })
        .unwrap_or_default()
    }

    /// Cluster: the subscribed rooms and the last seq each delivered, for
    /// resubscribing and filling gaps after a reconnect.
    pub fn subscribed_rooms(&self) -> Vec<(RoomName, Option<u64>)> {
        self.rooms
            .iter()
            .filter_map(|entry| {
                let state = entry.value().state.lock();
                state.subscribed.then(|| (entry.key().clone(), state.seq))
            })
            .collect()
    }

    /// The last seq delivered of `room`, if this node is subscribed to it.
    pub fn delivered_seq(&self, room: &RoomName) -> Option<u64> {
        let entry = self.rooms.get(room)?;
        let state = entry.value().state.lock();
        if state.subscribed {
            state.seq
        } else {
            None
        }
    }
}

thread_local! {
    /// Set while this thread sweeps for memory.
    static SWEEPING: Cell<bool> = const { Cell::new(false) };
}

fn sweeping<R>(f: impl FnOnce() -> R) -> R {
    SWEEPING.with(|s| s.set(true));
    let result = f();
    SWEEPING.with(|s| s.set(false));
    result
}

fn upsert_member(state: &mut RoomState, conn: &Arc<Connection>, skip_through: u64) {
    state.active = Instant::now();
    match state.members.iter_mut().find(|m| m.conn.id == conn.id) {
        Some(member) => member.skip_through = member.skip_through.min(skip_through),
        None => state.members.push(Member { conn: conn.clone(), skip_through }),
    }
}

/// Queues the replay and `joined` to `member`, and lets live messages after
/// the room's current seq reach it.
fn finish_join(
    state: &mut RoomState,
    room: &RoomName,
    member: &Arc<Connection>,
    since: Option<Since<'_>>,
    snapshot: Snapshot,
) {
    let latest = state.seq.unwrap_or(0).max(snapshot.seq);
    let (replay, recovered) = match since {
        Some(since) => {
            let pick = |m: &StoredMessage| m.frame_for(member);
            let (replay, recovered) = replay_after(&snapshot, &state.recent, latest, since, pick);
            (replay, Some(recovered))
        }
        None => (Vec::new(), None),
    };
    let joined = member.own_frame(outbound::joined(room, latest, &state.epoch, recovered));
    if member.outbox.push_all(replay.into_iter().chain([joined])) == Ok(Pushed::FlushNeeded) {
        state.to_flush.push(member.clone());
    }
    if let Some(m) = state.members.iter_mut().find(|m| m.conn.id == member.id) {
        m.skip_through = latest;
    }
}

/// The bus lost this room's sequence state: forget ours, and tell the
/// members the new epoch with an unsolicited `joined` (`recovered: false`).
fn restart_epoch(state: &mut RoomState, room: &RoomName, epoch: &str, seq: u64) {
    state.epoch = epoch.into();
    state.seq = Some(seq);
    state.clear_recent();
    let joined = outbound::joined(room, seq, epoch, Some(false));
    // Compressed at most once, and only when some member wants it that way.
    let mut deflated = None;
    for member in state.members.iter_mut().filter(|m| m.skip_through != u64::MAX) {
        member.skip_through = seq;
        let frame = member.conn.shared_frame(&joined, &mut deflated);
        if member.conn.queue(frame) == Ok(Pushed::FlushNeeded) {
            state.to_flush.push(member.conn.clone());
        }
    }
}

/// Releases the room's lock, then writes to the members owed a flush.
fn flush_after_unlock(mut state: parking_lot::MutexGuard<'_, RoomState>) {
    let pending = std::mem::take(&mut state.to_flush);
    drop(state);
    if !pending.is_empty() {
        flush_all(pending);
    }
}

/// The frames to replay for a client that saw everything up to `since`:
/// from the snapshot, then from `recent` past the snapshot, up to `latest`;
/// and whether that is everything it missed.
fn replay_after(
    snapshot: &Snapshot,
    recent: &VecDeque<StoredMessage>,
    latest: u64,
    since: Since<'_>,
    pick: impl Fn(&StoredMessage) -> Bytes,
) -> (Vec<Bytes>, bool) {
    if since.epoch.is_some_and(|e| e != &*snapshot.epoch) || since.seq > latest {
        return (Vec::new(), false);
    }
    let from_snapshot = snapshot.messages.iter().filter(|m| m.seq > since.seq);
    let after = since.seq.max(snapshot.seq);
    let from_recent = recent.iter().filter(|m| m.seq > after && m.seq <= latest);
    let mut next = since.seq + 1;
    let mut recovered = true;
    let mut frames = Vec::new();
    for message in from_snapshot.chain(from_recent) {
        if message.seq < next {
            continue;
        }
        recovered &= message.seq == next;
        next = message.seq + 1;
        frames.push(pick(message));
    }
    (frames, recovered && next > latest)
}

#[cfg(test)]
mod props;

#[cfg(test)]
mod tests {
    use super::*;

    fn messages(seqs: std::ops::RangeInclusive<u64>) -> Vec<StoredMessage> {
        seqs.map(|seq| StoredMessage::new(seq, Bytes::from(seq.to_string()))).collect()
    }

    fn snapshot(seq: u64, held: std::ops::RangeInclusive<u64>) -> Snapshot {
        Snapshot { seq, epoch: "e".into(), messages: messages(held) }
    }

    fn empty_snapshot(seq: u64) -> Snapshot {
        Snapshot { seq, epoch: "e".into(), messages: Vec::new() }
    }

    fn since(seq: u64, epoch: Option<&str>) -> Since<'_> {
        Since { seq, epoch }
    }

    fn replay(snap: &Snapshot, recent: &[StoredMessage], latest: u64, s: Since<'_>) -> (Vec<Bytes>, bool) {
        replay_after(snap, &recent.iter().cloned().collect(), latest, s, |m| m.frame.clone())
    }

    #[test]
    fn replays_everything_after_since_when_history_holds_it() {
        let snap = snapshot(10, 8..=10);
        let (frames, recovered) = replay(&snap, &[], 10, since(7, Some("e")));
        assert_eq!(frames, ["8", "9", "10"]);
        assert!(recovered);
        let (frames, recovered) = replay(&empty_snapshot(10), &[], 10, since(10, None));
        assert!(frames.is_empty() && recovered);
    }

    #[test]
    fn local_history_serves_as_the_snapshot_tail() {
        // Single node: empty snapshot messages, everything from `recent`.
        let recent = messages(1..=10);
        let (frames, recovered) = replay(&empty_snapshot(0), &recent, 10, since(7, None));
        assert_eq!(frames, ["8", "9", "10"]);
        assert!(recovered);
    }

    #[test]
    fn snapshot_and_recent_meet_without_duplicates() {
        // Redis held up to 12; this node delivered 11..=14 meanwhile.
        let (frames, recovered) = replay(&snapshot(12, 6..=12), &messages(11..=14), 14, since(8, Some("e")));
        assert_eq!(frames, ["9", "10", "11", "12", "13", "14"]);
        assert!(recovered);
    }

    #[test]
    fn partial_history_replays_what_is_left_and_says_so() {
        let (frames, recovered) = replay(&snapshot(10, 6..=10), &[], 10, since(2, Some("e")));
        assert_eq!(frames.len(), 5);
        assert!(!recovered);
        let (frames, recovered) = replay(&snapshot(10, 6..=10), &[], 10, since(5, Some("e")));
        assert_eq!(frames.len(), 5);
        assert!(recovered);
    }

    #[test]
    fn other_epoch_or_future_seq_replays_nothing() {
        assert_eq!(replay(&snapshot(3, 1..=3), &[], 3, since(1, Some("old"))), (vec![], false));
        assert_eq!(replay(&snapshot(3, 1..=3), &[], 3, since(9, Some("e"))), (vec![], false));
    }

    /// A member's connection over real loopback TCP, and the client's side.
    async fn member() -> (Arc<Connection>, std::net::TcpStream) {
        use crate::conn::{Coalescing, Setup, WriterConfig};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let client = std::net::TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        client.set_read_timeout(Some(Duration::from_millis(500))).unwrap();
        let (socket, _) = listener.accept().await.unwrap();
        let writer = Arc::new(WriterConfig {
            coalescing: Coalescing::new(Duration::ZERO, 0.0),
            metrics: Arc::new(crate::metrics::Metrics::new()),
        });
        let setup =
            Setup { id: 1, sub: "m".into(), send_queue: 64, expires_at: u64::MAX, now_ms: 0, writer, deflate: None };
        (Arc::new(Connection::new(socket, setup)), client)
    }

    /// Everything the client has received so far, as text (frame headers
    /// are a few bytes of noise around the payloads).
    fn received(client: &mut std::net::TcpStream) -> String {
        let mut all = Vec::new();
        let mut buf = [0u8; 4096];
        while let Ok(n @ 1..) = std::io::Read::read(client, &mut buf) {
            all.extend_from_slice(&buf[..n]);
        }
        String::from_utf8_lossy(&all).into_owned()
    }

    fn stored(seq: u64) -> StoredMessage {
        StoredMessage::new(seq, Bytes::from(format!("<m{seq}>")))
    }

    #[tokio::test(flavor = "current_thread")]
    async fn a_new_epoch_that_arrives_past_its_first_message_is_a_gap_from_its_start() {
        let registry = Registry::new(100, "node".into());
        let lobby = RoomName::parse("lobby").unwrap();
        let (conn, mut client) = member().await;
        registry.add_syncing_member(&lobby, &conn, || {});
        registry.complete_join(&lobby, &conn, None, Snapshot { seq: 2, epoch: "e1".into(), messages: vec![] });
        assert!(matches!(registry.deliver(&lobby, "e1", stored(3), false), Delivered::Fanout { recipients: 1, .. }));

        // The room's Redis lost it and this node missed the new epoch's start.
        assert_eq!(registry.deliver(&lobby, "e2", stored(3), false), Delivered::Gap { from: 1 });
        assert_eq!(&*registry.room_epoch(&lobby), "e1", "nothing changed before the gap is filled");
        // The fill delivers the new epoch from its start, then the message.
        for seq in 1..=3 {
            assert!(matches!(registry.deliver(&lobby, "e2", stored(seq), true), Delivered::Fanout { .. }));
        }
        assert_eq!(registry.deliver(&lobby, "e2", stored(3), false), Delivered::Duplicate);
        // Within the new epoch, a gap is the usual one.
        assert_eq!(registry.deliver(&lobby, "e2", stored(6), false), Delivered::Gap { from: 4 });
        // A new epoch that arrives at its first message needs no fill.
        assert!(matches!(registry.deliver(&lobby, "e3", stored(1), false), Delivered::Fanout { .. }));

        crate::conn::cork::round_flushed().await;
        let text = received(&mut client);
        let order = [
            r#""seq":2,"epoch":"e1""#,
            "<m3>",
            r#""seq":0,"epoch":"e2","recovered":false"#,
            "<m1>",
            "<m2>",
            "<m3>",
            r#""seq":0,"epoch":"e3","recovered":false"#,
            "<m1>",
        ];
        let mut rest = text.as_str();
        for wanted in order {
            let at = rest.find(wanted).unwrap_or_else(|| panic!("{wanted} missing or out of order in {text}"));
            rest = &rest[at + wanted.len()..];
        }
        assert!(!rest.contains("<m"), "nothing more: {text}");
    }

    #[test]
    fn empty_history_recovers_only_when_nothing_was_missed() {
        assert_eq!(replay(&empty_snapshot(0), &[], 0, since(0, None)), (vec![], true));
        assert_eq!(replay(&empty_snapshot(4), &[], 4, since(2, None)), (vec![], false));
    }
}
