//! The deliveries the fanout queues, read as a demand on the machine's
//! cores: a load past capacity announces itself before any backlog forms.
//!
//! The coalescing gate ([`super::coalesce`]) otherwise reacts to what a
//! load has already done: half a second of CPU samples, or the workers'
//! backlog ([`super::backlog`]). At the onset of a load far past capacity
//! (a thousand messages a second to a room of a thousand) both come late:
//! a backlog has to form before they see it, and on a 2-core machine the
//! one formed by then kept the first second's p99 at 23 to 60 ms, against
//! 13 to 23 ms with the window open from the first frame, however early
//! the samples were taken.
//!
//! The fanout knows the load as it arrives. Every frame it queues would,
//! left unbatched, cost a write of its own ([`WRITE_COST`]); when the
//! deliveries queued over a [`SPAN`] would need more than every core of
//! the machine, [`SPANS_OVER`] spans in a row, no server keeps up with
//! them one write at a time, and the window opens at once. One large
//! publish is a single span (and costs nothing if the window opens: each
//! member got one frame, and the window holds only a second write within
//! it); a load needs to go on to fill two.

use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// The time over which queued deliveries are counted.
pub const SPAN: Duration = Duration::from_millis(10);

/// The spans in a row that must each need more than the cores.
pub const SPANS_OVER: u32 = 2;

/// What one unbatched delivery costs the server: a loopback `sendmsg` of
/// one frame measured 4 to 7.6 µs of CPU on this project's 2-core
/// machines, the receiver's TCP input included. The rule's margins are
/// wide: at 1,000 messages a second to a room of a thousand this reads 5
/// cores, at the everyday 200,000 deliveries a second one.
pub const WRITE_COST: Duration = Duration::from_micros(5);

/// Deliveries queued in the current span, shared by every room's fanout.
pub struct DemandMeter {
    cores: f64,
    epoch: Instant,
    /// When the current span started, in µs after `epoch`.
    span_start: AtomicU64,
    queued: AtomicU64,
    /// Spans in a row, ending with the last closed, that needed more than
    /// the cores.
    spans_over: AtomicU32,
}

impl DemandMeter {
    pub fn new(cores: f64) -> Self {
        Self {
            cores,
            epoch: Instant::now(),
            span_start: AtomicU64::new(0),
            queued: AtomicU64::new(0),
            spans_over: AtomicU32::new(0),
        }
    }

    /// Counts `deliveries` queued now; returns whether the load has needed
    /// more than the cores for [`SPANS_OVER`] spans in a row.
    pub fn record(&self, deliveries: u64) -> bool {
        self.record_at(deliveries, Instant::now())
    }

    /// [`Self::record`] at `now`. A span ends at the first delivery after
    /// its length: a span that nothing closed for long counts its
    /// deliveries over all of it, so a burst followed by quiet reads low.
    fn record_at(&self, deliveries: u64, now: Instant) -> bool {
        self.queued.fetch_add(deliveries, Ordering::Relaxed);
        let now_micros = now.saturating_duration_since(self.epoch).as_micros() as u64;
        let start = self.span_start.load(Ordering::Relaxed);
        let length = now_micros.saturating_sub(start);
        if length < SPAN.as_micros() as u64 {
            return false;
        }
        // One fanout closes the span; the others carry on counting into
        // the next.
        if self.span_start.compare_exchange(start, now_micros, Ordering::Relaxed, Ordering::Relaxed).is_err() {
            return false;
        }
        let queued = self.queued.swap(0, Ordering::Relaxed);
        let cores_needed = queued as f64 * WRITE_COST.as_secs_f64() / (length as f64 / 1e6);
        if cores_needed < self.cores {
            self.spans_over.store(0, Ordering::Relaxed);
            return false;
        }
        self.spans_over.fetch_add(1, Ordering::Relaxed) + 1 >= SPANS_OVER
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Queues `per_ms` deliveries every millisecond for `ms` milliseconds
    /// after `from`; returns whether any of them said the load needs more
    /// than the cores, and the instant after the last.
    fn queue(meter: &DemandMeter, from: Instant, per_ms: u64, ms: u32) -> (bool, Instant) {
        let mut said = false;
        for i in 1..=ms {
            said |= meter.record_at(per_ms, from + Duration::from_millis(u64::from(i)));
        }
        (said, from + Duration::from_millis(u64::from(ms)))
    }

    #[test]
    fn a_load_past_the_cores_says_so_within_two_spans() {
        let meter = DemandMeter::new(2.0);
        // 1,000 messages a second to a room of 1,000: 5 cores' worth.
        let mut at = meter.epoch;
        let mut said_at = None;
        for ms in 1..=40u64 {
            at += Duration::from_millis(1);
            if meter.record_at(1_000, at) && said_at.is_none() {
                said_at = Some(ms);
            }
        }
        assert_eq!(said_at, Some(20), "the second full span of 10 ms");
    }

    #[test]
    fn everyday_loads_never_say_so() {
        let meter = DemandMeter::new(2.0);
        // 10 rooms x 100 at 2,000 msg/s: 200 deliveries a millisecond, a core.
        let (said, at) = queue(&meter, meter.epoch, 200, 2_000);
        assert!(!said);
        // Chat: a few deliveries a millisecond.
        assert!(!queue(&meter, at, 20, 2_000).0);
    }

    #[test]
    fn one_large_publish_is_one_span_and_quiet_after_it_reads_low() {
        let meter = DemandMeter::new(2.0);
        let at = meter.epoch + Duration::from_millis(10);
        // 20,000 members at once: the span it closes needs 10 cores.
        assert!(!meter.record_at(20_000, at));
        // Then a message a second later: the span since reads low.
        assert!(!meter.record_at(20_000, at + Duration::from_secs(1)));
        assert_eq!(meter.spans_over.load(Ordering::Relaxed), 0);
        // More every 10 ms are a load of 2 M deliveries/s: the second span
        // of them says so.
        assert!(!meter.record_at(20_000, at + Duration::from_millis(1_010)));
        assert!(meter.record_at(20_000, at + Duration::from_millis(1_020)));
    }

    #[test]
    fn a_span_under_the_cores_starts_the_count_again() {
        let meter = DemandMeter::new(2.0);
        let (said, at) = queue(&meter, meter.epoch, 1_000, 10);
        assert!(!said, "one span over");
        let (said, at) = queue(&meter, at, 100, 10);
        assert!(!said, "a span under");
        let (said, at) = queue(&meter, at, 1_000, 10);
        assert!(!said, "one span over again is not two in a row");
        assert!(queue(&meter, at, 1_000, 10).0);
    }

    #[test]
    fn more_cores_take_more_deliveries() {
        let meter = DemandMeter::new(8.0);
        assert!(!queue(&meter, meter.epoch, 1_000, 100).0, "5 cores' worth on 8");
        assert!(queue(&meter, meter.epoch + Duration::from_millis(100), 2_000, 100).0, "10 cores' worth");
    }
}
