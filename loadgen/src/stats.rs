//! Everything measured while the run goes: HDR histograms (delivery latency
//! from the scheduled send time, delivery latency from the actual send time,
//! ack latency, connect latency) and the correctness counters (seq gaps,
//! duplicates, reorders, deliveries per room against acks per room, close
//! codes, errors).
//!
//! Per-message figures go to a few shards, each behind its own mutex: a
//! connection always uses the same shard, so two worker threads rarely meet
//! on one lock, and the once-a-second progress reader takes each lock once.
//! Rare events (failures, close codes) are tallied by kind with one sample
//! message each, so a thousand identical failures are reported as one line
//! with a count.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};
use std::sync::{Mutex, MutexGuard};

use anyhow::{Context, Result};
use hdrhistogram::Histogram;

/// Highest latency a histogram holds (larger values are clamped).
pub const HIST_MAX_NS: u64 = 100_000_000_000;

pub type Hist = Histogram<u64>;

/// A histogram of nanoseconds, 1 ns to 100 s, 3 significant digits.
pub fn new_hist() -> Result<Hist> {
    Histogram::new_with_bounds(1, HIST_MAX_NS, 3).context("cannot create histogram")
}

/// Lock, ignoring poisoning (a panicked holder leaves plain counters).
pub fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Per-message figures of the connections that use one shard.
pub struct Shard {
    /// Receive time minus scheduled send time (up to the last progress
    /// interval; the current interval is in `delivery_iv`).
    pub delivery: Hist,
    /// Receive time minus actual send time.
    pub delivery_from_send: Hist,
    /// Ack receive time minus scheduled send time (same split as
    /// `delivery`).
    pub ack: Hist,
    /// The current progress interval of `delivery`/`ack`.
    pub delivery_iv: Hist,
    pub ack_iv: Hist,
    /// Messages received that carried a loadgen marker.
    pub delivered: u64,
    pub delivered_room: Vec<u64>,
    /// Messages without our marker, or for a room we did not join.
    pub foreign: u64,
    /// Times a seq skipped ahead, and the seqs skipped in total.
    pub gaps: u64,
    pub gap_seqs: u64,
    /// A seq equal to the last one seen.
    pub duplicates: u64,
    /// A seq lower than the last one seen.
    pub reorders: u64,
}

impl Shard {
    fn new(template: &Hist, rooms: usize) -> Self {
        Self {
            delivery: Hist::new_from(template),
            delivery_from_send: Hist::new_from(template),
            ack: Hist::new_from(template),
            delivery_iv: Hist::new_from(template),
            ack_iv: Hist::new_from(template),
            delivered: 0,
            delivered_room: vec![0; rooms],
            foreign: 0,
            gaps: 0,
            gap_seqs: 0,
            duplicates: 0,
            reorders: 0,
        }
    }
}

/// Counts of one kind of event by key, with the first message seen.
#[derive(Default, Debug, Clone)]
pub struct Tally(pub BTreeMap<String, (u64, String)>);

impl Tally {
    pub fn add(&mut self, key: &str, sample: impl FnOnce() -> String) {
        match self.0.get_mut(key) {
            Some(e) => e.0 += 1,
            None => {
                self.0.insert(key.to_string(), (1, sample()));
            }
        }
    }

    pub fn total(&self) -> u64 {
        self.0.values().map(|v| v.0).sum()
    }
}

/// Rare events, tallied.
#[derive(Default, Debug, Clone)]
pub struct Issues {
    /// Failed connection attempts, by failure kind.
    pub connect: Tally,
    /// Joins answered with an error (or lost), by error code.
    pub join: Tally,
    /// Error frames outside joins (e.g. rate_limited on send), by code.
    pub errors: Tally,
    /// How connections ended before loadgen closed them: close code or
    /// transport error.
    pub closes: Tally,
}

/// Figures summed over all shards.
pub struct Merged {
    pub delivery: Hist,
    pub delivery_from_send: Hist,
    pub ack: Hist,
    pub delivered: u64,
    pub delivered_room: Vec<u64>,
    pub foreign: u64,
    pub gaps: u64,
    pub gap_seqs: u64,
    pub duplicates: u64,
    pub reorders: u64,
}

pub struct Stats {
    shards: Box<[Mutex<Shard>]>,
    template: Hist,
    /// Messages written to the socket.
    pub sent: AtomicU64,
    /// Acks received, in total and per room.
    pub acked: AtomicU64,
    pub acked_room: Box<[AtomicU64]>,
    /// Joined members per room.
    pub room_members: Box<[AtomicU64]>,
    /// Connections open now.
    pub up: AtomicU64,
    /// Connection attempts that got a 101, and those that failed.
    pub connected: AtomicU64,
    pub connect_failed: AtomicU64,
    /// Joins confirmed, failed, and still awaited.
    pub joined: AtomicU64,
    pub join_failed: AtomicU64,
    pub join_pending: AtomicI64,
    /// `--presence`: presence frames received, states among them, and the
    /// connections whose view showed their whole room (and when the last did, Unix ns).
    pub presence_frames: AtomicU64,
    pub presence_states: AtomicU64,
    pub presence_complete: AtomicU64,
    pub presence_complete_last_ns: AtomicU64,
    /// `--churn`: leaves sent, rejoins answered with `joined`, rejoins whose
    /// `joined` said `recovered: false` (messages lost for that member),
    /// rejoins refused, and churn events skipped because every member tried
    /// was still between its leave and its rejoin.
    pub churn_leaves: AtomicU64,
    pub churn_rejoins: AtomicU64,
    pub churn_unrecovered: AtomicU64,
    pub churn_failed: AtomicU64,
    pub churn_skipped: AtomicU64,
    /// `--reconnect`: connections opened again, rejoins after them answered
    /// (and how many said `recovered: false`), rejoins sent again after
    /// `unavailable`; unsolicited `joined` of a new epoch.
    pub reconnects: AtomicU64,
    pub resumed: AtomicU64,
    pub resume_unrecovered: AtomicU64,
    pub rejoin_retries: AtomicU64,
    pub epoch_changes: AtomicU64,
    pub connect_hist: Mutex<Hist>,
    pub issues: Mutex<Issues>,
    /// Deliveries and acks count while this is set (send and drain phases).
    pub counting: AtomicBool,
    /// Set when loadgen starts closing: connection ends no longer count.
    pub closing: AtomicBool,
}

impl Stats {
    pub fn new(rooms: usize, shards: usize) -> Result<Self> {
        let template = new_hist()?;
        let shards = (0..shards.max(1)).map(|_| Mutex::new(Shard::new(&template, rooms))).collect();
        Ok(Self {
            shards,
            connect_hist: Mutex::new(Hist::new_from(&template)),
            template,
            sent: AtomicU64::new(0),
            acked: AtomicU64::new(0),
            acked_room: (0..rooms).map(|_| AtomicU64::new(0)).collect(),
            room_members: (0..rooms).map(|_| AtomicU64::new(0)).collect(),
            up: AtomicU64::new(0),
            connected: AtomicU64::new(0),
            connect_failed: AtomicU64::new(0),
            joined: AtomicU64::new(0),
            join_failed: AtomicU64::new(0),
            join_pending: AtomicI64::new(0),
            presence_frames: AtomicU64::new(0),
            presence_states: AtomicU64::new(0),
            presence_complete: AtomicU64::new(0),
            presence_complete_last_ns: AtomicU64::new(0),
            churn_leaves: AtomicU64::new(0),
            churn_rejoins: AtomicU64::new(0),
            churn_unrecovered: AtomicU64::new(0),
            churn_failed: AtomicU64::new(0),
            churn_skipped: AtomicU64::new(0),
            reconnects: AtomicU64::new(0),
            resumed: AtomicU64::new(0),
            resume_unrecovered: AtomicU64::new(0),
            rejoin_retries: AtomicU64::new(0),
            epoch_changes: AtomicU64::new(0),
            issues: Mutex::new(Issues::default()),
            counting: AtomicBool::new(false),
            closing: AtomicBool::new(false),
        })
    }

    /// The shard connection `id` uses.
    #[inline]
    pub fn shard(&self, id: usize) -> MutexGuard<'_, Shard> {
        lock(&self.shards[id % self.shards.len()])
    }

    pub fn counting(&self) -> bool {
        self.counting.load(Ordering::Relaxed)
    }

    pub fn record_connect(&self, ns: u64) {
        lock(&self.connect_hist).saturating_record(ns.max(1));
    }

    pub fn issues(&self) -> MutexGuard<'_, Issues> {
        lock(&self.issues)
    }

    /// Take the interval histograms (delivery, ack) and the delivered
    /// count so far. Per-message figures are recorded into the interval
    /// histograms alone and folded into the run's totals here, once a
    /// second, which halves the recording cost on the hot path.
    pub fn take_interval(&self) -> (Hist, Hist, u64) {
        let mut d = Hist::new_from(&self.template);
        let mut a = Hist::new_from(&self.template);
        let mut delivered = 0;
        for s in self.shards.iter() {
            let mut guard = lock(s);
            let s = &mut *guard;
            let _ = d.add(&s.delivery_iv);
            let _ = a.add(&s.ack_iv);
            let _ = s.delivery.add(&s.delivery_iv);
            let _ = s.ack.add(&s.ack_iv);
            s.delivery_iv.reset();
            s.ack_iv.reset();
            delivered += s.delivered;
        }
        (d, a, delivered)
    }

    /// Forget the figures of the last send phase (histograms, deliveries,
    /// correctness counters, sends, acks, error frames) before a sweep's
    /// next step; connections, joins and members stay as they are.
    pub fn reset_step(&self) {
        for s in self.shards.iter() {
            let mut guard = lock(s);
            let s = &mut *guard;
            for h in [&mut s.delivery, &mut s.delivery_from_send, &mut s.ack, &mut s.delivery_iv, &mut s.ack_iv] {
                h.reset();
            }
            s.delivered = 0;
            s.delivered_room.iter_mut().for_each(|d| *d = 0);
            s.foreign = 0;
            s.gaps = 0;
            s.gap_seqs = 0;
            s.duplicates = 0;
            s.reorders = 0;
        }
        self.sent.store(0, Ordering::SeqCst);
        self.acked.store(0, Ordering::SeqCst);
        self.acked_room.iter().for_each(|a| a.store(0, Ordering::SeqCst));
        let mut issues = self.issues();
        issues.errors = Tally::default();
        issues.closes = Tally::default();
    }

    /// Deliveries counted so far.
    pub fn delivered_total(&self) -> u64 {
        self.shards.iter().map(|s| lock(s).delivered).sum()
    }

    /// Everything summed over the shards.
    pub fn merged(&self) -> Merged {
        let mut m = Merged {
            delivery: Hist::new_from(&self.template),
            delivery_from_send: Hist::new_from(&self.template),
            ack: Hist::new_from(&self.template),
            delivered: 0,
            delivered_room: vec![0; self.acked_room.len()],
            foreign: 0,
            gaps: 0,
            gap_seqs: 0,
            duplicates: 0,
            reorders: 0,
        };
        for s in self.shards.iter() {
            let s = lock(s);
            let _ = m.delivery.add(&s.delivery);
            let _ = m.delivery.add(&s.delivery_iv);
            let _ = m.delivery_from_send.add(&s.delivery_from_send);
            let _ = m.ack.add(&s.ack);
            let _ = m.ack.add(&s.ack_iv);
            m.delivered += s.delivered;
            for (a, b) in m.delivered_room.iter_mut().zip(&s.delivered_room) {
                *a += b;
            }
            m.foreign += s.foreign;
            m.gaps += s.gaps;
            m.gap_seqs += s.gap_seqs;
            m.duplicates += s.duplicates;
            m.reorders += s.reorders;
        }
        m
    }
}

/// Where a room's sequence stands for one member, and what it saw.
#[derive(Debug, Clone, Copy, Default)]
pub struct SeqTrack {
    pub last: Option<u64>,
}

/// The verdict on one received seq.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SeqCheck {
    InOrder,
    /// Skipped this many seqs.
    Gap(u64),
    Duplicate,
    Reordered,
}

impl SeqTrack {
    /// Check `seq` against the last one seen and advance.
    pub fn check(&mut self, seq: u64) -> SeqCheck {
        match self.last {
            None => {
                self.last = Some(seq);
                SeqCheck::InOrder
            }
            Some(last) if Some(seq) == last.checked_add(1) => {
                self.last = Some(seq);
                SeqCheck::InOrder
            }
            Some(last) if seq > last => {
                self.last = Some(seq);
                SeqCheck::Gap(seq - last - 1)
            }
            Some(last) if seq == last => SeqCheck::Duplicate,
            Some(_) => SeqCheck::Reordered,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seq_tracking() {
        let mut t = SeqTrack { last: Some(0) };
        assert_eq!(t.check(1), SeqCheck::InOrder);
        assert_eq!(t.check(2), SeqCheck::InOrder);
        assert_eq!(t.check(5), SeqCheck::Gap(2));
        assert_eq!(t.check(5), SeqCheck::Duplicate);
        assert_eq!(t.check(3), SeqCheck::Reordered);
        assert_eq!(t.check(6), SeqCheck::InOrder);
    }

    #[test]
    fn tallies() {
        let mut t = Tally::default();
        t.add("a", || "first".into());
        t.add("a", || "second".into());
        t.add("b", || "x".into());
        assert_eq!(t.0["a"], (2, "first".to_string()));
        assert_eq!(t.total(), 3);
    }

    #[test]
    fn shards_merge() {
        let s = Stats::new(2, 3).unwrap();
        for id in 0..6 {
            let mut sh = s.shard(id);
            sh.delivery_iv.saturating_record(1000 * (id as u64 + 1));
            sh.delivered += 1;
            sh.delivered_room[id % 2] += 1;
        }
        let (iv, _, d) = s.take_interval();
        assert_eq!((iv.len(), d), (6, 6));
        assert_eq!(s.take_interval().0.len(), 0);
        s.shard(0).delivery_iv.saturating_record(7);
        let m = s.merged();
        assert_eq!(m.delivery.len(), 7);
        assert!(m.delivery.equivalent(m.delivery.max(), 6000));
        assert_eq!(m.delivered_room, vec![3, 3]);
        s.sent.store(5, Ordering::Relaxed);
        s.issues().errors.add("rate_limited", || "x".into());
        s.reset_step();
        let m = s.merged();
        assert_eq!((m.delivery.len(), m.delivered, m.delivered_room.clone()), (0, 0, vec![0, 0]));
        assert_eq!(s.sent.load(Ordering::Relaxed), 0);
        assert_eq!(s.issues().errors.total(), 0);
    }
}
