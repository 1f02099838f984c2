//! Open-loop send scheduling. Every sending connection has a schedule: its
//! k-th message is due at `start + offset + k * interval`. One OS thread
//! walks all schedules in due order and hands each due counter `k` to its
//! connection's send task; the send task stamps the message with the
//! *scheduled* time, so when the server (or the socket) stalls, the
//! messages queue up and their lateness is measured as latency instead of
//! silently lowering the send rate (no coordinated omission).
//!
//! A dedicated thread with a 1 ns timer slack wakes within microseconds of a
//! due time, where the runtime's millisecond timer wheel would add up to a
//! millisecond of artificial latency to every message.

use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use tokio::sync::mpsc::UnboundedSender;

use crate::clock::Clock;

/// One connection's send schedule.
#[derive(Debug, Clone, Copy)]
pub struct Schedule {
    /// Offset of message 0 from the phase start, ns.
    pub offset_ns: u64,
    /// Time between messages, ns.
    pub interval_ns: f64,
}

impl Schedule {
    /// Due time of message `k`, given the phase start (both Unix ns).
    #[inline]
    pub fn due(&self, start_ns: u64, k: u64) -> u64 {
        start_ns + self.offset_ns + (k as f64 * self.interval_ns) as u64
    }
}

/// Runs the schedules from `start_ns` until `end_ns` (Unix ns on `clock`)
/// on its own thread; each `tx` gets its due counters. Dropping the senders
/// at the end tells the send tasks the phase is over.
pub fn spawn(
    clock: Clock,
    start_ns: u64,
    end_ns: u64,
    senders: Vec<(Schedule, UnboundedSender<u64>)>,
    stop: Arc<AtomicBool>,
) -> std::io::Result<JoinHandle<()>> {
    std::thread::Builder::new().name("loadgen-pacer".into()).spawn(move || run(clock, start_ns, end_ns, senders, stop))
}

fn run(
    clock: Clock,
    start_ns: u64,
    end_ns: u64,
    mut senders: Vec<(Schedule, UnboundedSender<u64>)>,
    stop: Arc<AtomicBool>,
) {
    // SAFETY: prctl(PR_SET_TIMERSLACK) only changes this thread's timer
    // slack; failure just leaves the default 50 us.
    unsafe {
        libc::prctl(libc::PR_SET_TIMERSLACK, 1 as libc::c_ulong, 0, 0, 0);
    }
    let mut heap: BinaryHeap<Reverse<(u64, usize, u64)>> = BinaryHeap::new();
    for (i, (s, _)) in senders.iter().enumerate() {
        let due = s.due(start_ns, 0);
        if due < end_ns {
            heap.push(Reverse((due, i, 0)));
        }
    }
    while let Some(&Reverse((due, i, k))) = heap.peek() {
        if stop.load(Ordering::Relaxed) {
            break;
        }
        let now = clock.now_ns();
        if due > now {
            let wait = (due - now).min(50_000_000);
            std::thread::sleep(Duration::from_nanos(wait));
            continue;
        }
        heap.pop();
        let (sched, tx) = &senders[i];
        if tx.send(k).is_ok() {
            let next = sched.due(start_ns, k + 1);
            if next < end_ns {
                heap.push(Reverse((next, i, k + 1)));
            }
        }
    }
    senders.clear();
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hands_out_counters_on_time() {
        let clock = Clock::new();
        let start = clock.now_ns() + 1_000_000;
        let end = start + 50_000_000;
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        let (tx2, mut rx2) = tokio::sync::mpsc::unbounded_channel();
        let s = Schedule { offset_ns: 0, interval_ns: 10_000_000.0 };
        let s2 = Schedule { offset_ns: 5_000_000, interval_ns: 10_000_000.0 };
        let h = spawn(clock, start, end, vec![(s, tx), (s2, tx2)], Arc::new(AtomicBool::new(false))).unwrap();
        h.join().unwrap();
        let mut got = vec![];
        while let Ok(k) = rx.try_recv() {
            got.push(k);
        }
        assert_eq!(got, vec![0, 1, 2, 3, 4]);
        let mut got2 = 0;
        while rx2.try_recv().is_ok() {
            got2 += 1;
        }
        assert_eq!(got2, 5);
        assert!(clock.now_ns() >= s.due(start, 4));
    }
}
