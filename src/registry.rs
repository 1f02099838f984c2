//! Rooms and their local members, in a sharded map.
//!
//! Each room has its own lock. Giving a message its `seq`, storing it and
//! queueing it to every member happen under that lock, so every member sees
//! the same order however many connections publish at once; the lock is
//! never held across an `.await` and fanout never waits for a member (a full
//! queue cuts that member instead). Joining with `since` replays under the
//! same lock, so the replay, the `joined` reply and the live messages after
//! it follow each other with no gap and no duplicate.

use std::collections::VecDeque;
use std::sync::Arc;

use bytes::Bytes;
use dashmap::DashMap;
use parking_lot::Mutex;

use crate::conn::outbox::PushError;
use crate::conn::Connection;
use crate::protocol::outbound;
use crate::room::RoomName;
use crate::ws::frame::payload;

/// One message as history keeps it: its complete frame, whose payload is the
/// message's JSON text.
#[derive(Clone, Debug)]
pub struct StoredMessage {
    pub seq: u64,
    pub frame: Bytes,
}

impl StoredMessage {
    pub fn json(&self) -> &[u8] {
        payload(&self.frame)
    }
}

/// Where a joining client says it left off.
#[derive(Debug, Clone, Copy)]
pub struct Since<'a> {
    pub seq: u64,
    pub epoch: Option<&'a str>,
}

/// What a publish did, for the caller's ack and metrics.
pub struct Delivery {
    pub seq: u64,
    pub recipients: usize,
    pub slow_consumers: usize,
}

struct RoomState {
    members: Vec<Arc<Connection>>,
    seq: u64,
    recent: VecDeque<StoredMessage>,
    /// Set when the room left the map; a joiner that raced with the removal
    /// must look the room up again.
    removed: bool,
}

struct Room {
    state: Mutex<RoomState>,
}

pub struct Registry {
    rooms: DashMap<RoomName, Arc<Room>>,
    history_size: usize,
    epoch: Arc<str>,
}

impl Registry {
    /// `epoch` names this node's sequence state (PROTOCOL.md section 2).
    pub fn new(history_size: usize, epoch: Arc<str>) -> Self {
        Self { rooms: DashMap::new(), history_size, epoch }
    }

    pub fn epoch(&self) -> &str {
        &self.epoch
    }

    pub fn room_count(&self) -> usize {
        self.rooms.len()
    }

    /// Runs `f` under the room's lock, creating the room if needed.
    fn with_room<R>(&self, name: &RoomName, f: impl FnOnce(&mut RoomState) -> R) -> R {
        let mut f = Some(f);
        loop {
            let room = self.rooms.entry(name.clone()).or_insert_with(new_room).clone();
            let mut state = room.state.lock();
            if state.removed {
                continue;
            }
            if let Some(f) = f.take() {
                return f(&mut state);
            }
        }
    }

    /// Gives the message the room's next `seq`, stores it and queues it to
    /// every member; members whose queue is full are cut (1013).
    pub fn publish(&self, room: &RoomName, from: &str, ts_millis: u64, body: &[u8]) -> Delivery {
        let history_size = self.history_size;
        self.with_room(room, |state| {
            state.seq += 1;
            let seq = state.seq;
            let frame = outbound::message(room, seq, from, ts_millis, body);
            let mut slow_consumers = 0;
            for member in &state.members {
                if member.send(frame.clone()) == Err(PushError::Full) {
                    slow_consumers += 1;
                }
            }
            if history_size > 0 {
                if state.recent.len() >= history_size {
                    state.recent.pop_front();
                }
                state.recent.push_back(StoredMessage { seq, frame });
            }
            Delivery { seq, recipients: state.members.len(), slow_consumers }
        })
    }

    /// Adds `member` (once) and queues the replay of what it missed, then
    /// `joined`.
    pub fn join(&self, room: &RoomName, member: &Arc<Connection>, since: Option<Since<'_>>) {
        let epoch = self.epoch.clone();
        self.with_room(room, |state| {
            if !state.members.iter().any(|m| m.id == member.id) {
                state.members.push(member.clone());
            }
            let (replay, recovered) = match since {
                Some(since) => {
                    let (replay, recovered) = replay_after(&state.recent, state.seq, &epoch, since);
                    (replay, Some(recovered))
                }
                None => (Vec::new(), None),
            };
            let joined = outbound::joined(room, state.seq, &epoch, recovered);
            let _ = member.outbox.push_all(replay.into_iter().chain([joined]));
        });
    }

    /// Removes `member_id`; returns whether it was a member. A room with no
    /// member and no history leaves the map.
    pub fn leave(&self, room: &RoomName, member_id: u64) -> bool {
        let Some(entry) = self.rooms.get(room).map(|r| r.clone()) else {
            return false;
        };
        let was_member = {
            let mut state = entry.state.lock();
            let before = state.members.len();
            state.members.retain(|m| m.id != member_id);
            before != state.members.len()
        };
        self.rooms.remove_if(room, |_, r| {
            let mut state = r.state.lock();
            let idle = state.members.is_empty() && state.recent.is_empty();
            state.removed |= idle;
            idle
        });
        was_member
    }

    /// Up to `limit` stored messages before `before` (exclusive), oldest first.
    pub fn history(&self, room: &RoomName, before: Option<u64>, limit: usize) -> Vec<StoredMessage> {
        let Some(entry) = self.rooms.get(room).map(|r| r.clone()) else {
            return Vec::new();
        };
        let state = entry.state.lock();
        let end = match before {
            Some(before) => state.recent.partition_point(|m| m.seq < before),
            None => state.recent.len(),
        };
        let start = end.saturating_sub(limit);
        state.recent.range(start..end).cloned().collect()
    }
}

fn new_room() -> Arc<Room> {
    Arc::new(Room {
        state: Mutex::new(RoomState { members: Vec::new(), seq: 0, recent: VecDeque::new(), removed: false }),
    })
}

/// The frames to replay for a client that saw everything up to `since`, and
/// whether that is everything it missed.
fn replay_after(recent: &VecDeque<StoredMessage>, seq: u64, epoch: &str, since: Since<'_>) -> (Vec<Bytes>, bool) {
    if since.epoch.is_some_and(|e| e != epoch) || since.seq > seq {
        return (Vec::new(), false);
    }
    let first_kept = recent.front().map_or(seq + 1, |m| m.seq);
    let recovered = first_kept <= since.seq + 1;
    let start = recent.partition_point(|m| m.seq <= since.seq);
    (recent.range(start..).map(|m| m.frame.clone()).collect(), recovered)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn log(seqs: std::ops::RangeInclusive<u64>) -> VecDeque<StoredMessage> {
        seqs.map(|seq| StoredMessage { seq, frame: Bytes::from(seq.to_string()) }).collect()
    }

    fn since(seq: u64, epoch: Option<&str>) -> Since<'_> {
        Since { seq, epoch }
    }

    #[test]
    fn replays_everything_after_since_when_history_holds_it() {
        let (frames, recovered) = replay_after(&log(1..=10), 10, "e", since(7, Some("e")));
        assert_eq!(frames, ["8", "9", "10"]);
        assert!(recovered);
        let (frames, recovered) = replay_after(&log(1..=10), 10, "e", since(10, None));
        assert!(frames.is_empty() && recovered);
    }

    #[test]
    fn partial_history_replays_what_is_left_and_says_so() {
        let (frames, recovered) = replay_after(&log(6..=10), 10, "e", since(2, Some("e")));
        assert_eq!(frames.len(), 5);
        assert!(!recovered);
        let (frames, recovered) = replay_after(&log(6..=10), 10, "e", since(5, Some("e")));
        assert_eq!(frames.len(), 5);
        assert!(recovered);
    }

    #[test]
    fn other_epoch_or_future_seq_replays_nothing() {
        assert_eq!(replay_after(&log(1..=3), 3, "e", since(1, Some("old"))), (vec![], false));
        assert_eq!(replay_after(&log(1..=3), 3, "e", since(9, Some("e"))), (vec![], false));
    }

    #[test]
    fn empty_history_recovers_only_when_nothing_was_missed() {
        assert_eq!(replay_after(&VecDeque::new(), 0, "e", since(0, None)), (vec![], true));
        assert_eq!(replay_after(&VecDeque::new(), 4, "e", since(2, None)), (vec![], false));
    }
}
