//! The workers' backlog, read from how late a timer's task gets to run.
//!
//! The coalescing gate ([`super::coalesce`]) judges saturation by the mean
//! of half a second of CPU samples. That keeps the window shut at everyday
//! loads, whose single samples scatter around the threshold, but it opens
//! the window late: at the onset of 1 M deliveries a second on a 2-core
//! machine, half a second of unbatched writes built a backlog that took the
//! rest of the first second to drain.
//!
//! A backlog shows sooner, and more plainly, in the workers themselves. The
//! sampler asks to be woken every [`TICK`]; while every worker has tasks
//! queued ahead of it, it runs late. Over the last [`SPAN`], the share of
//! the time it spent waiting tells a backlog from a train of work: one
//! publish to a thousand members keeps the workers busy for a few
//! milliseconds, after which they catch up and the sampler runs on time
//! again, while a server past its capacity never catches up. Measured with
//! 5 ms ticks on a 2-core machine, the share over 100 ms reached 0.75
//! within 60 ms of the onset of 1 M deliveries a second, and stayed at or
//! under 0.43 at chat, at 20 messages a second to a thousand members, and
//! at loads of 60,000 to 200,000 deliveries a second, connection storms
//! included.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

/// How often the sampler asks to be woken to measure how late it runs.
/// Tokio's timer rounds a deadline up to its next millisecond, so a tick
/// runs about a millisecond late on an idle server: a tenth of the tick.
pub const TICK: Duration = Duration::from_millis(10);

/// The time over which the share of waiting is taken: long enough that a
/// train of work (a few milliseconds) cannot fill half of it, short enough
/// that a backlog opens the window within a tenth of a second.
pub const SPAN: Duration = Duration::from_millis(100);

/// One wake of the sampler.
#[derive(Clone, Copy)]
struct Tick {
    at: Instant,
    /// How long after its deadline it ran.
    late: Duration,
    /// The process's CPU time at that moment.
    cpu: Duration,
}

/// What the last [`SPAN`] showed.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Backlog {
    /// The share of the span the sampler spent waiting for a worker.
    pub lag: f64,
    /// This process's CPU time over the span, as a fraction of the cores.
    pub process: f64,
}

/// The sampler's wakes over the last [`SPAN`].
pub struct BacklogMeter {
    cores: f64,
    ticks: VecDeque<Tick>,
}

impl BacklogMeter {
    pub fn new(cores: f64) -> Self {
        Self { cores, ticks: VecDeque::new() }
    }

    /// Takes one wake: `late` past its deadline at `at`, with the process's
    /// CPU time `cpu`; returns the backlog over the last [`SPAN`] once the
    /// wakes cover one.
    pub fn record(&mut self, at: Instant, late: Duration, cpu: Duration) -> Option<Backlog> {
        self.ticks.push_back(Tick { at, late, cpu });
        // The oldest wake kept is the newest at least a span old: it marks
        // where the span starts.
        while self.ticks.get(1).is_some_and(|next| at.duration_since(next.at) >= SPAN) {
            self.ticks.pop_front();
        }
        let start = self.ticks.front()?;
        let span = at.duration_since(start.at);
        if span < SPAN {
            return None;
        }
        // Each wake's lateness lies inside the span, after the wake that
        // starts it.
        let waited: Duration = self.ticks.iter().skip(1).map(|t| t.late).sum();
        let seconds = span.as_secs_f64();
        Some(Backlog {
            lag: (waited.as_secs_f64() / seconds).min(1.0),
            process: cpu.saturating_sub(start.cpu).as_secs_f64() / (seconds * self.cores),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: Duration = Duration::from_millis(1);

    /// Feeds wakes every `TICK` after `start`, with the given lateness (ms)
    /// and CPU time used by each (ms) on top of `cpu`; returns the last reading.
    fn feed(
        meter: &mut BacklogMeter,
        (start, cpu): (Instant, Duration),
        late_ms: &[u32],
        cpu_per_tick: u32,
    ) -> Option<Backlog> {
        let (mut at, mut cpu, mut last) = (start, cpu, None);
        for &late in late_ms {
            at += TICK + late * MS;
            cpu += cpu_per_tick * MS;
            last = meter.record(at, late * MS, cpu);
        }
        last
    }

    #[test]
    fn nothing_is_read_before_the_wakes_cover_a_span() {
        let mut meter = BacklogMeter::new(2.0);
        let start = Instant::now();
        assert_eq!(meter.record(start, Duration::ZERO, Duration::ZERO), None);
        assert_eq!(feed(&mut meter, (start, Duration::ZERO), &[0; 9], 5), None, "90 ms");
        assert!(feed(&mut BacklogMeter::new(2.0), (start, Duration::ZERO), &[0; 11], 5).is_some(), "110 ms");
    }

    #[test]
    fn an_idle_server_reads_no_lag_and_its_cpu_share() {
        let mut meter = BacklogMeter::new(2.0);
        let start = Instant::now();
        meter.record(start, Duration::ZERO, Duration::ZERO);
        let backlog = feed(&mut meter, (start, Duration::ZERO), &[0; 30], 4).unwrap();
        assert_eq!(backlog.lag, 0.0);
        // 4 ms of CPU per 10 ms on two cores.
        assert!((backlog.process - 0.2).abs() < 1e-9, "{backlog:?}");
    }

    #[test]
    fn a_train_of_work_is_not_a_backlog_but_a_sustained_wait_is() {
        let start = Instant::now();
        // One wake 8 ms late in every five (a publish to a thousand members
        // every 50 ms): the share stays low.
        let mut meter = BacklogMeter::new(2.0);
        meter.record(start, Duration::ZERO, Duration::ZERO);
        let train = feed(&mut meter, (start, Duration::ZERO), &[8, 1, 1, 1, 1].repeat(6), 5).unwrap();
        assert!(train.lag < 0.25, "{train:?}");
        // Wakes 20 to 30 ms late, one after another: the workers never catch up.
        let mut meter = BacklogMeter::new(2.0);
        meter.record(start, Duration::ZERO, Duration::ZERO);
        let backlog = feed(&mut meter, (start, Duration::ZERO), &[1, 1, 1, 20, 30, 25, 20, 30], 30).unwrap();
        assert!(backlog.lag > 0.6, "{backlog:?}");
        assert!(backlog.process > 0.4, "{backlog:?}");
    }

    #[test]
    fn old_wakes_leave_the_span() {
        let start = Instant::now();
        let mut meter = BacklogMeter::new(2.0);
        meter.record(start, Duration::ZERO, Duration::ZERO);
        feed(&mut meter, (start, Duration::ZERO), &[30; 5], 20);
        let later = start + Duration::from_secs(1);
        meter.record(later, Duration::ZERO, 100 * MS);
        let caught_up = feed(&mut meter, (later, 100 * MS), &[0; 12], 0).unwrap();
        assert_eq!(caught_up, Backlog { lag: 0.0, process: 0.0 });
        assert!(meter.ticks.len() <= 12, "a span's wakes and the one before: {}", meter.ticks.len());
    }
}
