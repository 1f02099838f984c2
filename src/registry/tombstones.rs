//! What a node remembers of the rooms it evicted: their place in their
//! sequence, so that a room used again goes on where it stopped and no `seq`
//! repeats within an epoch.
//!
//! Tombstones are small, but a client touching ever new rooms would make
//! them grow without bound too. So they are capped in bytes, and past the
//! cap the oldest are forgotten. A forgotten room cannot go on in its epoch
//! (its last `seq` is unknown), so forgetting tells the registry to start
//! new rooms in a new epoch from then on (see `Registry::forget`).

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use parking_lot::Mutex;

use super::budget::tombstone_bytes;
use crate::room::RoomName;

/// An evicted room's place in its sequence.
pub struct Tombstone {
    pub assigned: u64,
    pub epoch: Arc<str>,
}

/// One lock for all: tombstones are written when rooms are evicted and read
/// when a room is created, never on the publish path of an existing room.
pub struct Tombstones {
    inner: Mutex<Inner>,
    cap_bytes: usize,
}

#[derive(Default)]
struct Inner {
    by_name: HashMap<RoomName, (Tombstone, u64)>,
    /// Insertion number to name: the first entry is the oldest.
    order: BTreeMap<u64, RoomName>,
    next: u64,
    bytes: usize,
}

/// What an insert did to the tombstones' bytes, and how many it forgot.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Inserted {
    pub added_bytes: usize,
    pub forgotten: usize,
    pub forgotten_bytes: usize,
}

impl Tombstones {
    pub fn new(cap_bytes: usize) -> Self {
        Self { inner: Mutex::new(Inner::default()), cap_bytes }
    }

    pub fn len(&self) -> usize {
        self.inner.lock().by_name.len()
    }

    /// Remembers `name`'s place, forgetting the oldest tombstones past the cap.
    pub fn insert(&self, name: RoomName, tombstone: Tombstone) -> Inserted {
        let mut inner = self.inner.lock();
        let mut result = Inserted::default();
        let seq = inner.next;
        inner.next += 1;
        let bytes = tombstone_bytes(name.as_str());
        if let Some((_, old)) = inner.by_name.insert(name.clone(), (tombstone, seq)) {
            inner.order.remove(&old);
        } else {
            inner.bytes += bytes;
            result.added_bytes = bytes;
        }
        inner.order.insert(seq, name);
        while inner.bytes > self.cap_bytes {
            let Some((_, oldest)) = inner.order.pop_first() else { break };
            inner.by_name.remove(&oldest);
            let freed = tombstone_bytes(oldest.as_str());
            inner.bytes -= freed;
            result.forgotten += 1;
            result.forgotten_bytes += freed;
        }
        result
    }

    /// Takes `name`'s tombstone, and the bytes that freed.
    pub fn take(&self, name: &str) -> Option<(Tombstone, usize)> {
        let mut inner = self.inner.lock();
        let (tombstone, seq) = inner.by_name.remove(name)?;
        inner.order.remove(&seq);
        let freed = tombstone_bytes(name);
        inner.bytes -= freed;
        Some((tombstone, freed))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn room(name: &str) -> RoomName {
        RoomName::parse(name).unwrap()
    }

    fn stone(assigned: u64) -> Tombstone {
        Tombstone { assigned, epoch: "e".into() }
    }

    #[test]
    fn past_the_cap_the_oldest_are_forgotten() {
        let one = tombstone_bytes("r0");
        let stones = Tombstones::new(one * 3);
        for i in 0..3 {
            assert_eq!(stones.insert(room(&format!("r{i}")), stone(i)).forgotten, 0);
        }
        // Refreshing r0 makes it the newest.
        assert_eq!(stones.insert(room("r0"), stone(7)).added_bytes, 0);
        let inserted = stones.insert(room("r3"), stone(3));
        assert_eq!((inserted.forgotten, inserted.forgotten_bytes), (1, one));
        assert!(stones.take("r1").is_none(), "the oldest went first");
        assert_eq!(stones.take("r0").map(|(t, bytes)| (t.assigned, bytes)), Some((7, one)));
        assert_eq!(stones.len(), 2);
    }
}
