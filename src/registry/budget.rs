//! What the node's rooms hold in memory, against `--history-memory`.
//!
//! Every room adds what it costs (its state, its name, each message it keeps
//! and each tombstone) to one atomic counter, as a delta when its lock is
//! released, so the publish path pays one atomic add and never walks the
//! rooms. Crossing the high-water mark wakes the eviction task, which drops
//! the rooms idle longest until the counter is back under the low-water
//! mark: one sweep frees a quarter of the budget, so sweeps stay rare
//! however fast clients create rooms.
//!
//! The costs are estimates of the heap a room takes (measured with the
//! flood of docs/OPERATIONS.md), not allocator truth: the point is a bound
//! that grows with what clients do, in the right proportion.

use std::sync::atomic::{AtomicUsize, Ordering};

use tokio::sync::Notify;

/// A room's fixed cost: its state, its `Arc`, its map entry and lock.
pub const ROOM_BYTES: usize = 320;
/// A kept message's cost beyond its frame: its slot, the `Bytes` and the
/// allocation's header.
pub const MESSAGE_BYTES: usize = 64;
/// A tombstone's cost beyond its name: its map entry and its place in the
/// order of forgetting.
pub const TOMBSTONE_BYTES: usize = 112;

/// The default of `--history-memory`.
pub const DEFAULT_LIMIT: usize = 256 << 20;

pub struct Budget {
    limit: usize,
    held: AtomicUsize,
    /// Woken when `held` passes the high-water mark.
    pub over: Notify,
}

impl Budget {
    pub fn new(limit: usize) -> Self {
        Self { limit, held: AtomicUsize::new(0), over: Notify::new() }
    }

    pub fn limit(&self) -> usize {
        self.limit
    }

    /// Bytes held now.
    pub fn held(&self) -> usize {
        self.held.load(Ordering::Relaxed)
    }

    /// Eviction starts past this: 90% of the budget, leaving the eviction
    /// task room to catch up before the budget itself is reached.
    pub fn high_water(&self) -> usize {
        self.limit / 10 * 9
    }

    /// Eviction stops under this: 65% of the budget.
    pub fn low_water(&self) -> usize {
        self.limit / 100 * 65
    }

    /// Applies what a room's bytes went from and to; wakes the eviction
    /// task when that crossed the high-water mark.
    pub fn apply(&self, before: usize, after: usize) {
        if after > before {
            let grown = after - before;
            let held = self.held.fetch_add(grown, Ordering::Relaxed) + grown;
            if held > self.high_water() {
                self.over.notify_one();
            }
        } else if before > after {
            self.held.fetch_sub(before - after, Ordering::Relaxed);
        }
    }

    pub fn add(&self, bytes: usize) {
        self.apply(0, bytes);
    }

    pub fn sub(&self, bytes: usize) {
        self.apply(bytes, 0);
    }

    /// Whether eviction should go on.
    pub fn above_low_water(&self) -> bool {
        self.held() > self.low_water()
    }
}

/// What a room with no message costs.
pub fn room_bytes(name: &str) -> usize {
    ROOM_BYTES + name.len()
}

/// What keeping one message costs.
pub fn message_bytes(frame_len: usize) -> usize {
    MESSAGE_BYTES + frame_len
}

/// What remembering an evicted room's place in its sequence costs.
pub fn tombstone_bytes(name: &str) -> usize {
    TOMBSTONE_BYTES + name.len()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn deltas_move_the_count_and_wake_past_the_high_water_mark() {
        let budget = Budget::new(1000);
        budget.apply(0, 500);
        budget.apply(500, 800);
        assert_eq!(budget.held(), 800);
        budget.apply(300, 200);
        assert_eq!(budget.held(), 700);
        assert!(budget.above_low_water());
        budget.sub(100);
        assert!(!budget.above_low_water());
        budget.add(300);
        assert_eq!(budget.held(), 900);
        {
            let quiet = budget.over.notified();
            tokio::pin!(quiet);
            assert!(futures_util::FutureExt::now_or_never(quiet).is_none(), "at the mark, not past it");
        }
        budget.add(1);
        // Past 900: a waiter would be woken (the permit is stored).
        let woken = budget.over.notified();
        tokio::pin!(woken);
        assert!(futures_util::FutureExt::now_or_never(woken).is_some());
    }
}
