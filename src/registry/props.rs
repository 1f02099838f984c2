//! Property tests of the history ring a node keeps per room: whatever mix of
//! publishes, history reads, recovery checks and evictions, a room's `seq`
//! goes 1, 2, 3... in one epoch with no gap and no repeat (eviction
//! included), the ring holds exactly the last `history_size` messages
//! published since the room was last evicted, and `history` pages through
//! them oldest first as PROTOCOL.md section 4 says; and the replay a joiner
//! gets from a snapshot and the ring is exactly what it missed.

use super::*;
use proptest::collection::vec;
use proptest::prelude::*;
use serde_json::Value;

const ROOMS: [&str; 3] = ["a", "b", "c"];

#[derive(Debug, Clone)]
enum Op {
    Publish { room: usize, body: u32 },
    History { room: usize, before: Option<u64>, limit: usize },
    Covers { room: usize, since: u64 },
    Evict,
}

fn op() -> impl Strategy<Value = Op> {
    let room = 0..ROOMS.len();
    prop_oneof![
        8 => (room.clone(), any::<u32>()).prop_map(|(room, body)| Op::Publish { room, body }),
        3 => (room.clone(), prop::option::of(0u64..40), 1usize..=100)
            .prop_map(|(room, before, limit)| Op::History { room, before, limit }),
        2 => (room, 0u64..40).prop_map(|(room, since)| Op::Covers { room, since }),
        1 => Just(Op::Evict),
    ]
}

/// The model of one room: every message ever published (seq = index + 1,
/// with its body) and how many of them are still held in memory.
#[derive(Default)]
struct ModelRoom {
    bodies: Vec<u32>,
    /// Published since the last eviction; the ring holds the last of these.
    since_eviction: usize,
}

impl ModelRoom {
    fn held(&self, history_size: usize) -> Vec<(u64, u32)> {
        let held = self.since_eviction.min(history_size);
        let first = self.bodies.len() - held;
        (first..self.bodies.len()).map(|i| (i as u64 + 1, self.bodies[i])).collect()
    }
}

/// A stored message's seq and body, read back from its frame's JSON.
fn read(message: &StoredMessage) -> (u64, u32) {
    let json: Value = serde_json::from_slice(&message.json()).expect("a message frame holds JSON");
    let seq = json["seq"].as_u64().expect("seq");
    assert_eq!(seq, message.seq, "the frame's seq is the stored seq");
    let body = json["body"].as_u64().expect("body") as u32;
    (seq, body)
}

proptest! {
    #[test]
    fn the_ring_holds_the_last_messages_and_seqs_never_repeat(
        history_size in 0usize..12,
        ops in vec(op(), 0..80),
    ) {
        let registry = Registry::new(history_size, "e1".into());
        let names: Vec<RoomName> = ROOMS.iter().map(|r| RoomName::parse(r).expect("room name")).collect();
        let mut model: Vec<ModelRoom> = ROOMS.iter().map(|_| ModelRoom::default()).collect();
        for op in ops {
            match op {
                Op::Publish { room, body } => {
                    let delivery = registry.publish(&names[room], "u", 1, body.to_string().as_bytes());
                    let m = &mut model[room];
                    m.bodies.push(body);
                    m.since_eviction += 1;
                    prop_assert_eq!(delivery.seq, m.bodies.len() as u64);
                    // A single node's epoch never changes while it runs.
                    prop_assert_eq!(&*delivery.epoch, "e1");
                    prop_assert_eq!(delivery.recipients, 0);
                }
                Op::History { room, before, limit } => {
                    let got: Vec<(u64, u32)> = registry.history(&names[room], before, limit).iter().map(read).collect();
                    let mut want: Vec<(u64, u32)> = model[room]
                        .held(history_size)
                        .into_iter()
                        .filter(|(seq, _)| before.is_none_or(|b| *seq < b))
                        .collect();
                    want.drain(..want.len().saturating_sub(limit));
                    prop_assert_eq!(got, want);
                }
                Op::Covers { room, since } => {
                    let m = &model[room];
                    let latest = m.bodies.len() as u64;
                    let held = m.held(history_size);
                    // Everything after `since` is held, or nothing was missed.
                    let want = since >= latest || held.first().is_some_and(|(first, _)| *first <= since + 1);
                    // A room not in memory (never used, or evicted) covers
                    // nothing: the caller reads the database instead.
                    let want = want && m.since_eviction > 0;
                    prop_assert_eq!(registry.recent_covers(&names[room], since), want, "since {}", since);
                }
                Op::Evict => {
                    // No member and no subscription: every room is idle.
                    let rooms = registry.room_count();
                    let evicted = registry.evict_idle(Duration::ZERO);
                    prop_assert_eq!(evicted.rooms, rooms);
                    for m in &mut model {
                        m.since_eviction = 0;
                    }
                }
            }
        }
        for (name, m) in names.iter().zip(&model) {
            if !m.bodies.is_empty() {
                prop_assert_eq!(&*registry.room_epoch(name), "e1");
            }
        }
    }
}

/// Contiguous stored messages `range`.
fn stored(range: std::ops::RangeInclusive<u64>) -> Vec<StoredMessage> {
    range.map(|seq| StoredMessage::new(seq, Bytes::from(seq.to_string()))).collect()
}

proptest! {
    /// The replay a joiner gets: the snapshot's messages (read from the bus
    /// or the database, ending at its seq) and then the ring's; exactly the
    /// seqs after `since` that are held, once each, in order, and
    /// `recovered` only when none is missing; nothing from another epoch.
    #[test]
    fn replay_is_exactly_what_the_joiner_missed(
        snap_seq in 0u64..30,
        snap_held in 0u64..30,
        ring in prop::option::of((1u64..35, 0u64..15)),
        since in 0u64..40,
        epoch in prop::sample::select(vec![None, Some("e"), Some("old")]),
    ) {
        let snap_first = snap_seq.saturating_sub(snap_held) + 1;
        let snapshot = Snapshot { seq: snap_seq, epoch: "e".into(), messages: stored(snap_first..=snap_seq) };
        let recent: VecDeque<StoredMessage> = match ring {
            Some((first, len)) => stored(first..=first + len).into_iter().collect(),
            None => VecDeque::new(),
        };
        let latest = snap_seq.max(recent.back().map_or(0, |m| m.seq));
        let (frames, recovered) = replay_after(&snapshot, &recent, latest, Since { seq: since, epoch }, |m| m.frame.clone());

        // The model: which seqs after `since` are held. The snapshot speaks
        // for everything up to its seq (it was read after the ring's older
        // messages: what it lacks there, the bus or the database had lost);
        // the ring for what came after.
        let held = |seq: u64| {
            if seq <= snap_seq {
                seq >= snap_first
            } else {
                recent.iter().any(|m| m.seq == seq)
            }
        };
        let (want, want_recovered) = if epoch == Some("old") || since > latest {
            (Vec::new(), false)
        } else {
            let want: Vec<u64> = (since + 1..=latest).filter(|s| held(*s)).collect();
            let complete = want.len() as u64 == latest - since;
            (want, complete)
        };
        let got: Vec<u64> = frames
            .iter()
            .map(|f| std::str::from_utf8(f).expect("utf-8").parse().expect("a seq"))
            .collect();
        prop_assert_eq!(got, want);
        prop_assert_eq!(recovered, want_recovered);
    }
}
