//! The coalescing window: only while the server is saturated.
//!
//! Batches follow the backlog ([`super::cork`]): what a connection has
//! queued by the end of a round leaves in one write, so under light load a
//! frame goes out at once and under heavy load batches grow by themselves.
//! At saturation a window (`--write-coalesce`) still saves CPU: a busy
//! connection then writes at most once per window, and frames that arrive
//! meanwhile share its `sendmsg` (at a million deliveries a second, 0.4
//! instead of 0.84 µs per delivery on this project's 2-core machine). It
//! costs every frame of such a connection up to a window of latency, so it
//! applies only while writing without it would take at least
//! `--write-coalesce-load` of the machine's cores: the process's CPU time
//! over a sample, not the workers' busy wall time, which a machine shared
//! with other processes inflates (preempted workers count as busy, and the
//! window opened at everyday loads on a busy machine).
//!
//! That load is measured without the window: it opens once the mean of the
//! last [`OPEN_AFTER`] samples is at or above the threshold (neither one
//! noisy sample nor a burst of connections opens it), and while open it is
//! closed for a short probe ([`PROBE_LENGTH`]) every [`PROBE_EVERY`]
//! samples, to measure again what the load would be without it. A gap
//! between an opening and a closing threshold would not do: the window
//! itself lowers the load it is judged by, so it stayed open at loads that
//! do not need it once a burst had opened it. The window only ever lowers
//! the load, so a load still over both thresholds with the window open
//! proves what a probe would measure: a probe is due only once the load
//! with the window has fallen under them (each probe costs a burst of
//! unbatched writes, and a probe that reads low closes the window for half
//! a second). Frames held back by the window never count toward the
//! slow-consumer bound (see [`super::outbox`]).
//!
//! Half a second of samples opens the window late when a load arrives
//! past capacity all at once: the unbatched writes meanwhile build a
//! backlog that the window then takes long to drain. Such a load shows
//! first in the fanout's deliveries ([`super::demand`]): when two 10 ms
//! spans in a row queued more than every core could write one write each,
//! the window opens at once, before a backlog forms. A load past capacity
//! that the fanout's count does not show leaves a backlog of the workers
//! themselves ([`super::backlog`]), which opens it at once too: when over the
//! last 100 ms the sampler waited for a worker at least [`BACKLOG_OPENS`]
//! of the time, and the process took at least `--write-coalesce-load` of
//! the cores. Everyday loads do not leave the workers behind for that long,
//! whatever their bursts. The sampler watches the backlog (wakes every
//! 10 ms) only after a sample that read at least half that threshold: a
//! light load does not pay for the wake-ups.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use tokio_util::sync::CancellationToken;

use super::backlog::{self, Backlog, BacklogMeter};
use super::demand::DemandMeter;
use super::WriterConfig;

/// How often the workers' busy time is sampled.
const SAMPLE_EVERY: Duration = Duration::from_millis(100);

/// How long a probe runs without the window: short, since past capacity a
/// server without its window falls behind at once.
const PROBE_LENGTH: Duration = Duration::from_millis(20);

/// The samples without the window whose mean opens it: half a second.
/// One sample is too noisy to act on: a steady load of a third of the
/// cores read from 0.22 to 0.36 (median 0.33) over 100 ms samples on this
/// project's machine; two samples in a row over a threshold of 0.35 had
/// opened the window, at a load that needs it no more than it needs its
/// 10 ms of latency, once every few seconds. The mean also keeps a burst
/// of connections from opening it.
const OPEN_AFTER: usize = 5;

/// While open, one sample in this many may be a probe without the window,
/// to measure the load without it (every 2 s at 100 ms a sample): it is,
/// unless the mean load over the samples since the last one is over both
/// thresholds even with the window.
pub const PROBE_EVERY: u32 = 20;

/// The share of the last [`backlog::SPAN`] that the sampler must have spent
/// waiting for a worker to open the window at once. A tick's own timer
/// rounding accounts for about a tenth; measured over 100 ms on a 2-core
/// machine (with 5 ms ticks), everyday loads stayed at or under 0.43 and
/// the onset of 1 M deliveries a second reached 0.75.
pub const BACKLOG_OPENS: f64 = 0.5;

/// The share of `--write-coalesce-load` that the last sample must have
/// read for the sampler to watch the backlog until the next one. Each of
/// its hundred wakes a second may wake a parked worker: watching always
/// took an idle server on a 2-core machine from 2 to 6 ms of CPU a second.
/// A load past capacity shows in the first sample, and the backlog then
/// opens the window within the next span.
const WATCH_FROM: f64 = 0.5;

/// The busy fraction of the machine's cores (every process's CPU time, from
/// `/proc/stat`) under which the window never applies: with a tenth of the
/// machine idle, CPU is not scarce, and the window would buy what is not
/// short with latency. Without it the threshold on the process alone
/// decided, and it sat too close to everyday loads: a server at 0.30 to
/// 0.33 of the cores (10 rooms of 100 members, 2,000 messages a second,
/// with the machine 75 to 81% busy) read over 0.35 often enough to open the
/// window for seconds, while at 1,000,000 deliveries a second (0.42 to 0.48
/// without the window) the machine was 95 to 97% busy.
pub const MACHINE_SATURATED: f64 = 0.9;

/// While the window is open, its length is set again every this many
/// samples (0.3 s), from the mean of the machine's load over them.
const ADJUST_EVERY: u32 = 3;

/// Above this mean the machine is still short of CPU with the window open:
/// the window grows, so that writes carry more frames each.
const LENGTHEN_ABOVE: f64 = 0.95;

/// Under this mean the machine has CPU to spare: a window that had grown
/// shrinks back toward `--write-coalesce`, and frames wait less.
const SHORTEN_BELOW: f64 = 0.85;

/// How much the window grows or shrinks at one adjustment.
const ADJUST_FACTOR: f64 = 1.25;

/// The window and whether it applies now.
pub struct Coalescing {
    /// `--write-coalesce`: the length a window opens with and never goes
    /// under; it may grow to twice this.
    base_window: Duration,
    /// The length now, in microseconds.
    length_micros: AtomicU64,
    /// Busy fraction of the cores this process must take for the window to
    /// open; 0 keeps it open.
    open_at: f64,
    /// Busy fraction of the machine that must be reached too.
    machine_at: f64,
    open: AtomicBool,
    gate: Mutex<Gate>,
    /// The fanout's deliveries, as the cores they would need unbatched.
    demand: DemandMeter,
}

/// One sample of the load: this process's CPU time, and every process's,
/// each as a fraction of the machine's cores.
#[derive(Debug, Default, Clone, Copy)]
pub struct Load {
    pub process: f64,
    pub machine: f64,
}

/// Loads summed over a run of samples, for their mean.
#[derive(Default)]
struct Tally {
    samples: u32,
    sum: Load,
}

impl Tally {
    fn add(&mut self, load: Load) {
        self.samples += 1;
        self.sum.process += load.process;
        self.sum.machine += load.machine;
    }

    /// The mean once `count` samples are in, starting a new run; `None`
    /// before.
    fn mean_after(&mut self, count: u32) -> Option<Load> {
        if self.samples < count {
            return None;
        }
        let samples = f64::from(self.samples);
        let mean = Load { process: self.sum.process / samples, machine: self.sum.machine / samples };
        *self = Self::default();
        Some(mean)
    }
}

/// The sampler's memory of the last samples.
#[derive(Default)]
struct Gate {
    /// The last samples without the window, oldest first: at most
    /// [`OPEN_AFTER`], forgotten when the window opens.
    recent: VecDeque<Load>,
    /// The samples with the window since it opened or was last checked for
    /// a probe (every [`PROBE_EVERY`]).
    since_check: Tally,
    /// The samples with the window since its length was last set (every
    /// [`ADJUST_EVERY`]).
    since_adjust: Tally,
    /// The last sample ran without the window to measure the load.
    probing: bool,
}

impl Gate {
    /// Forgets the samples taken so far: a spell of the window starts, or
    /// goes on after a probe, from none.
    fn forget_samples(&mut self) {
        (self.since_check, self.since_adjust) = (Tally::default(), Tally::default());
        self.recent.clear();
    }
}

impl Coalescing {
    pub fn new(window: Duration, open_at: f64) -> Self {
        Self {
            base_window: window,
            length_micros: AtomicU64::new(window.as_micros() as u64),
            open_at,
            machine_at: MACHINE_SATURATED,
            open: AtomicBool::new(open_at <= 0.0),
            gate: Mutex::new(Gate::default()),
            demand: DemandMeter::new(machine_cores()),
        }
    }

    /// The same with another machine threshold than [`MACHINE_SATURATED`].
    pub fn with_machine_threshold(mut self, machine_at: f64) -> Self {
        self.machine_at = machine_at;
        self
    }

    /// Whether `load` is over both thresholds.
    fn saturated(&self, load: Load) -> bool {
        load.process >= self.open_at && load.machine >= self.machine_at
    }

    /// The window a busy connection's writes keep now: zero unless the
    /// server is saturated.
    pub fn window(&self) -> Duration {
        if self.open.load(Ordering::Relaxed) {
            Duration::from_micros(self.length_micros.load(Ordering::Relaxed))
        } else {
            Duration::ZERO
        }
    }

    /// Follows the machine's load while the window is open: longer while
    /// the machine is still saturated (CPU is what is short, and a longer
    /// window buys it: at 1 M deliveries a second on a slower machine, 20 ms
    /// took 0.58 to 0.62 µs a delivery and p99 31 to 39 ms, against 0.82 to
    /// 0.86 µs and 42 to 67 ms at 10 ms), back toward `--write-coalesce`
    /// once it has CPU to spare, but never shorter: on a saturated machine
    /// a shorter window does not shorten the wait. Its writes cost the CPU
    /// that every frame then queues for: at 1 M deliveries a second,
    /// letting it shrink to 5 ms took 0.81 to 0.89 µs a delivery and p99
    /// 30 to 47 ms, against 0.78 µs and 16 to 18 ms for a window held at
    /// 10 ms, in the same run.
    fn adjust_length(&self, gate: &mut Gate, load: Load) {
        gate.since_adjust.add(load);
        let Some(Load { machine: mean, .. }) = gate.since_adjust.mean_after(ADJUST_EVERY) else {
            return;
        };
        let now = self.length_micros.load(Ordering::Relaxed) as f64;
        let (shortest, longest) = (self.base_window.as_micros() as f64, self.base_window.as_micros() as f64 * 2.0);
        let length = if mean > LENGTHEN_ABOVE {
            (now * ADJUST_FACTOR).min(longest)
        } else if mean < SHORTEN_BELOW {
            (now / ADJUST_FACTOR).max(shortest)
        } else {
            now
        };
        self.length_micros.store(length as u64, Ordering::Relaxed);
    }

    /// Whether the window applies now (whatever its length).
    pub fn is_open(&self) -> bool {
        self.open.load(Ordering::Relaxed)
    }

    /// Whether the window opens and closes with the load at all: not when
    /// it is off (`--write-coalesce 0s`) or held open (a threshold of 0).
    fn follows_load(&self) -> bool {
        self.open_at > 0.0 && !self.base_window.is_zero()
    }

    /// Whether the sampler should watch the workers' backlog until the next
    /// sample, after one that read `process`: only while a backlog could
    /// open the window, and the process is busy enough to build one soon.
    pub fn watches_backlog(&self, process: f64) -> bool {
        self.follows_load() && !self.is_open() && !self.probing() && process >= self.open_at * WATCH_FROM
    }

    /// Whether the next sample is a probe without the window.
    pub fn probing(&self) -> bool {
        self.gate.lock().probing
    }

    /// Opens the window at once if it is shut, no probe runs, and `backlog`
    /// shows the workers behind while this process is busy; returns whether
    /// it opened it. The machine's load is not asked: `/proc/stat` counts in
    /// hundredths of a second, too coarse for 100 ms, and workers that keep a
    /// timer waiting half the time are short of CPU whoever else uses it.
    pub fn open_on_backlog(&self, backlog: Backlog) -> bool {
        if !self.follows_load() || self.is_open() {
            return false;
        }
        if backlog.lag < BACKLOG_OPENS || backlog.process < self.open_at {
            return false;
        }
        self.open_at_once()
    }

    /// Counts the deliveries a fanout queued, and opens the window at once
    /// if it is shut, no probe runs, and they have needed more than every
    /// core for [`demand::SPANS_OVER`](super::demand::SPANS_OVER) spans in
    /// a row; returns whether it opened it. Nothing is counted while the
    /// window is open, off or held open.
    pub fn open_on_demand(&self, deliveries: usize) -> bool {
        if !self.follows_load() || self.is_open() || !self.demand.record(deliveries as u64) {
            return false;
        }
        self.open_at_once()
    }

    /// Opens a new spell of the window between samples, unless a probe is
    /// measuring the load without it; returns whether it opened.
    fn open_at_once(&self) -> bool {
        let mut gate = self.gate.lock();
        if gate.probing {
            return false;
        }
        self.start_spell(&mut gate);
        self.open.store(true, Ordering::Relaxed);
        true
    }

    /// A new spell of saturation: the samples before it are forgotten, and
    /// the window starts from the configured length (a spell that a probe
    /// found still there keeps its own).
    fn start_spell(&self, gate: &mut Gate) {
        gate.forget_samples();
        self.length_micros.store(self.base_window.as_micros() as u64, Ordering::Relaxed);
    }

    /// Takes the load of the last sample; returns whether the window
    /// applies during the next one (always, with a threshold of 0).
    pub fn observe(&self, load: Load) -> bool {
        if self.open_at <= 0.0 {
            return true;
        }
        let mut gate = self.gate.lock();
        let open = if self.open.load(Ordering::Relaxed) {
            self.adjust_length(&mut gate, load);
            gate.since_check.add(load);
            match gate.since_check.mean_after(PROBE_EVERY) {
                // Saturated even with the window: without it, more so.
                Some(windowed) => {
                    gate.probing = !self.saturated(windowed);
                    !gate.probing
                }
                None => true,
            }
        } else {
            if gate.recent.len() == OPEN_AFTER {
                gate.recent.pop_front();
            }
            gate.recent.push_back(load);
            let mean = |part: fn(&Load) -> f64| gate.recent.iter().map(part).sum::<f64>() / OPEN_AFTER as f64;
            let sustained = gate.recent.len() == OPEN_AFTER
                && self.saturated(Load { process: mean(|l| l.process), machine: mean(|l| l.machine) });
            // A probe whose process load is over the threshold reopens at
            // once: the load held. The machine's load is not asked of a
            // probe: `/proc/stat` counts in hundredths of a second, a few
            // ticks in 20 ms, and a probe at 96% read 75% often enough to
            // close the window for half a second at a time.
            let reopened = !sustained && gate.probing && load.process >= self.open_at;
            gate.probing = false;
            if sustained {
                self.start_spell(&mut gate);
            } else if reopened {
                gate.forget_samples();
            }
            sustained || reopened
        };
        self.open.store(open, Ordering::Relaxed);
        open
    }
}

/// The cores this process may use.
fn machine_cores() -> f64 {
    std::thread::available_parallelism().map_or(1, |n| n.get()) as f64
}

/// The CPU time this process has used, user and system, all threads.
fn process_cpu_time() -> Duration {
    let mut usage = std::mem::MaybeUninit::<libc::rusage>::zeroed();
    // SAFETY: getrusage writes a whole `rusage` into the pointer it is given,
    // which points to one; RUSAGE_SELF cannot fail on Linux.
    let usage = unsafe {
        libc::getrusage(libc::RUSAGE_SELF, usage.as_mut_ptr());
        usage.assume_init()
    };
    let time = |t: libc::timeval| Duration::new(t.tv_sec as u64, t.tv_usec as u32 * 1000);
    time(usage.ru_utime) + time(usage.ru_stime)
}

/// The machine's CPU time since boot from the first line of `/proc/stat`,
/// in clock ticks: `(busy, total)`, where idle and waiting for I/O are not
/// busy. `None` where there is no such file.
fn machine_cpu_ticks() -> Option<(u64, u64)> {
    let stat = std::fs::read_to_string("/proc/stat").ok()?;
    let ticks: Vec<u64> = stat.lines().next()?.split_whitespace().skip(1).filter_map(|t| t.parse().ok()).collect();
    // user nice system idle iowait irq softirq steal (guest time is
    // already counted in user and nice).
    let total: u64 = ticks.iter().take(8).sum();
    let idle = ticks.get(3)? + ticks.get(4).unwrap_or(&0);
    Some((total - idle, total))
}

/// The busy fraction of the machine between two readings of
/// [`machine_cpu_ticks`]; saturated when it cannot be read, so that the
/// process's own load alone decides.
fn machine_fraction(before: Option<(u64, u64)>, after: Option<(u64, u64)>) -> f64 {
    match (before, after) {
        (Some((busy0, total0)), Some((busy1, total1))) if total1 > total0 => {
            busy1.saturating_sub(busy0) as f64 / (total1 - total0) as f64
        }
        _ => 1.0,
    }
}

/// Samples the process's and the machine's CPU time until shutdown, and
/// the workers' backlog in between while the process is busy, and opens or
/// closes the window; exports them as metrics.
pub async fn run(writer: Arc<WriterConfig>, shutdown: CancellationToken) {
    let (coalescing, metrics) = (&writer.coalescing, &writer.metrics);
    let cores = machine_cores();
    let mut backlog = BacklogMeter::new(cores);
    let (mut last_at, mut last_cpu, mut last_machine) = (Instant::now(), process_cpu_time(), machine_cpu_ticks());
    let (mut tick_due, mut watching) = (last_at + backlog::TICK, false);
    loop {
        let sample_due = last_at + if coalescing.probing() { PROBE_LENGTH } else { SAMPLE_EVERY };
        let due = if watching { tick_due.min(sample_due) } else { sample_due };
        tokio::select! {
            () = tokio::time::sleep_until(due.into()) => {}
            () = shutdown.cancelled() => return,
        }
        let (now, cpu) = (Instant::now(), process_cpu_time());
        if let Some(reading) = backlog.record(now, now.saturating_duration_since(due), cpu) {
            metrics.worker_lag_ratio.set(reading.lag);
            if coalescing.open_on_backlog(reading) {
                writer.window_opened("backlog");
            }
        }
        tick_due = now + backlog::TICK;
        if now < sample_due {
            continue;
        }
        let machine = machine_cpu_ticks();
        let capacity = now.duration_since(last_at).as_secs_f64() * cores;
        let process = if capacity > 0.0 { cpu.saturating_sub(last_cpu).as_secs_f64() / capacity } else { 0.0 };
        let load = Load { process, machine: machine_fraction(last_machine, machine) };
        (last_at, last_cpu, last_machine) = (now, cpu, machine);
        // A spell of saturation goes on through its probes.
        let in_spell = coalescing.is_open() || coalescing.probing();
        if coalescing.observe(load) && !in_spell && coalescing.follows_load() {
            metrics.write_window_opened("load");
        }
        watching = coalescing.watches_backlog(load.process);
        metrics.cpu_ratio.set(load.process);
        metrics.machine_cpu_ratio.set(load.machine);
        metrics.write_window_seconds.set(coalescing.window().as_secs_f64());
    }
}

#[cfg(test)]
mod tests {
    use super::super::demand;
    use super::*;

    /// A sample of `process` on a saturated machine.
    fn busy(process: f64) -> Load {
        Load { process, machine: 1.0 }
    }

    #[test]
    fn the_window_opens_on_a_sustained_load_and_probes_it_without_the_window() {
        let c = Coalescing::new(Duration::from_millis(10), 0.4);
        assert_eq!(c.window(), Duration::ZERO);
        assert!(!c.observe(busy(0.9)), "one busy sample (a burst) does not open it");
        for _ in 0..OPEN_AFTER - 1 {
            assert!(!c.observe(busy(0.2)), "nor does it tip the mean of the samples after it");
        }
        // A load under the threshold whose samples scatter around it.
        for process in [0.45, 0.3, 0.45, 0.3, 0.45, 0.3, 0.45, 0.3] {
            assert!(!c.observe(busy(process)), "a mean of at most 0.39 stays under 0.4");
        }
        for _ in 0..OPEN_AFTER - 1 {
            assert!(!c.observe(busy(0.41)), "a load over the threshold opens it once it is the last five samples");
        }
        assert!(c.observe(busy(0.41)));
        assert_eq!(c.window(), Duration::from_millis(10));
        // The window lowers the load it is judged by: it stays open until
        // the probe, whatever it reads.
        for _ in 0..PROBE_EVERY - 1 {
            assert!(c.observe(busy(0.1)));
        }
        assert!(!c.observe(busy(0.1)), "the probe runs one sample without the window");
        assert_eq!(c.window(), Duration::ZERO);
        assert!(c.observe(busy(0.45)), "without the window the load is still over: it reopens at once");
        for _ in 0..PROBE_EVERY - 1 {
            assert!(c.observe(busy(0.2)));
        }
        assert!(!c.observe(busy(0.2)), "the next probe");
        assert!(!c.observe(busy(0.3)), "the load without the window is under the threshold: it stays closed");
        for _ in 0..OPEN_AFTER - 2 {
            assert!(!c.observe(busy(0.5)), "and reopens only once the mean of five samples is over it again");
        }
        assert!(c.observe(busy(0.5)), "0.3 and four of 0.5: a mean of 0.46");
    }

    #[test]
    fn the_window_opens_only_while_the_machine_is_saturated_too() {
        let c = Coalescing::new(Duration::from_millis(10), 0.4);
        let sample = |process, machine| Load { process, machine };
        for _ in 0..3 * OPEN_AFTER {
            assert!(!c.observe(sample(0.6, 0.75)), "a quarter of the machine idle: CPU is not scarce");
        }
        for _ in 0..3 * OPEN_AFTER {
            assert!(!c.observe(sample(0.2, 1.0)), "a machine busy with other work, this process light");
        }
        for _ in 0..OPEN_AFTER {
            assert!(!c.observe(sample(0.0, 0.0)), "an idle half second");
        }
        for _ in 0..OPEN_AFTER - 1 {
            assert!(!c.observe(sample(0.6, 0.95)), "the machine's mean reaches 0.9 only with the fifth");
        }
        assert!(c.observe(sample(0.6, 0.95)), "both over their thresholds for five samples");
        for _ in 0..PROBE_EVERY {
            c.observe(sample(0.3, 0.7));
        }
        assert!(c.probing());
        assert!(c.observe(sample(0.6, 0.75)), "a probe reads the process alone: the machine's ticks are too coarse");
        for _ in 0..PROBE_EVERY {
            c.observe(sample(0.3, 1.0));
        }
        assert!(!c.observe(sample(0.3, 1.0)), "a probe under the process threshold closes it");
        for _ in 0..3 * OPEN_AFTER {
            assert!(!c.observe(sample(0.6, 0.8)), "and it stays closed while the machine has CPU to spare");
        }
    }

    #[test]
    fn an_open_window_grows_while_the_machine_stays_saturated_and_shrinks_back_when_it_has_cpu_to_spare() {
        let c = Coalescing::new(Duration::from_millis(10), 0.4);
        let sample = |machine| Load { process: 0.6, machine };
        for _ in 0..OPEN_AFTER {
            c.observe(sample(1.0));
        }
        assert_eq!(c.window(), Duration::from_millis(10), "it opens at --write-coalesce");
        let mut lengths = Vec::new();
        for _ in 0..4 {
            for _ in 0..ADJUST_EVERY {
                c.observe(sample(0.97));
            }
            lengths.push(c.window().as_micros());
        }
        assert_eq!(lengths, [12_500, 15_625, 19_531, 20_000], "still saturated: longer, up to twice the base");
        for _ in 0..ADJUST_EVERY {
            c.observe(sample(0.9));
        }
        assert_eq!(c.window().as_micros(), 20_000, "about 90% busy: it stays");
        // A probe falls among these samples; the load holds, so it reopens
        // with the length it had.
        let mut lengths = vec![20_000];
        for _ in 0..8 * ADJUST_EVERY {
            c.observe(sample(0.7));
            let now = c.window().as_micros();
            if now != 0 && Some(&now) != lengths.last() {
                lengths.push(now);
            }
        }
        assert_eq!(lengths, [20_000, 16_000, 12_800, 10_240, 10_000], "CPU to spare: shorter, down to the base");
    }

    #[test]
    fn a_load_over_both_thresholds_with_the_window_open_needs_no_probe() {
        let c = Coalescing::new(Duration::from_millis(10), 0.4);
        for _ in 0..OPEN_AFTER {
            c.observe(busy(0.6));
        }
        for _ in 0..3 * PROBE_EVERY {
            assert!(c.observe(busy(0.45)), "without the window the load would be higher still");
            assert!(!c.probing());
        }
        // The mean since the last probe decides, not the last sample.
        for _ in 0..PROBE_EVERY - 1 {
            assert!(c.observe(busy(0.35)));
        }
        assert!(!c.observe(busy(0.9)), "a mean of 0.38 with the window proves nothing: a probe");
        assert!(c.probing());
        assert!(c.observe(busy(0.5)), "which found the load still there");
        for _ in 0..PROBE_EVERY - 1 {
            assert!(c.observe(busy(0.6)));
        }
        assert!(c.observe(Load { process: 0.6, machine: 0.7 }), "the machine had CPU to spare only at the end");
        assert!(!c.probing(), "its mean over the samples was still saturated");
    }

    #[test]
    fn a_new_spell_of_saturation_starts_from_the_configured_window() {
        let c = Coalescing::new(Duration::from_millis(10), 0.4);
        for _ in 0..OPEN_AFTER + 3 * ADJUST_EVERY as usize {
            c.observe(busy(0.6));
        }
        assert!(c.window() > Duration::from_millis(10));
        // The load with the window falls under the threshold; the probe
        // that follows finds it gone too, and closes it.
        while !c.probing() {
            c.observe(busy(0.3));
        }
        assert!(!c.observe(busy(0.1)));
        for _ in 0..OPEN_AFTER {
            c.observe(busy(0.6));
        }
        assert_eq!(c.window(), Duration::from_millis(10));
    }

    #[test]
    fn a_backlog_opens_the_window_at_once_while_the_process_is_busy() {
        let c = Coalescing::new(Duration::from_millis(10), 0.4);
        assert!(!c.open_on_backlog(Backlog { lag: 0.45, process: 0.9 }), "workers that catch up: a train of work");
        assert!(
            !c.open_on_backlog(Backlog { lag: 0.8, process: 0.3 }),
            "workers kept from this process's work by others"
        );
        assert_eq!(c.window(), Duration::ZERO);
        assert!(c.open_on_backlog(Backlog { lag: 0.5, process: 0.4 }));
        assert_eq!(c.window(), Duration::from_millis(10));
        assert!(!c.open_on_backlog(Backlog { lag: 0.9, process: 0.9 }), "already open: not a new spell");
        // From here the samples judge it as any open window: it stays open
        // until a probe, whatever the load with it.
        for _ in 0..PROBE_EVERY - 1 {
            assert!(c.observe(busy(0.1)));
        }
        assert!(!c.observe(busy(0.1)), "the probe");
        assert!(!c.open_on_backlog(Backlog { lag: 0.9, process: 0.9 }), "a probe measures without the window");
        assert!(!c.observe(busy(0.1)), "the probe found no load: closed");
        assert!(c.open_on_backlog(Backlog { lag: 0.9, process: 0.9 }), "until the next backlog");
    }

    #[test]
    fn a_backlog_leaves_alone_a_window_that_is_held_open_or_off() {
        let held = Coalescing::new(Duration::from_millis(10), 0.0);
        assert!(!held.open_on_backlog(Backlog { lag: 1.0, process: 1.0 }));
        assert_eq!(held.window(), Duration::from_millis(10));
        let off = Coalescing::new(Duration::ZERO, 0.4);
        assert!(!off.open_on_backlog(Backlog { lag: 1.0, process: 1.0 }));
        assert_eq!(off.window(), Duration::ZERO);
    }

    /// Deliveries that need more than every core of any machine over a
    /// span of up to a second.
    const PAST_EVERY_CORE: usize = 100_000_000;

    /// Calls `open_on_demand` once a span has passed since the last call.
    fn fan_out_after_a_span(c: &Coalescing, deliveries: usize) -> bool {
        std::thread::sleep(demand::SPAN + Duration::from_millis(1));
        c.open_on_demand(deliveries)
    }

    #[test]
    fn a_fanout_past_every_core_opens_the_window_within_two_spans() {
        let c = Coalescing::new(Duration::from_millis(10), 0.4);
        assert!(!fan_out_after_a_span(&c, PAST_EVERY_CORE), "one span: one large publish");
        assert_eq!(c.window(), Duration::ZERO);
        assert!(fan_out_after_a_span(&c, PAST_EVERY_CORE), "the second span in a row");
        assert_eq!(c.window(), Duration::from_millis(10));
        assert!(!fan_out_after_a_span(&c, PAST_EVERY_CORE), "already open: not a new spell");
        while !c.probing() {
            c.observe(busy(0.1));
        }
        for _ in 0..demand::SPANS_OVER {
            assert!(!fan_out_after_a_span(&c, PAST_EVERY_CORE), "a probe measures without the window");
        }
        assert!(!c.observe(busy(0.1)), "the probe found no load: closed");
        assert!(fan_out_after_a_span(&c, PAST_EVERY_CORE), "the spans counted during the probe open it");
    }

    #[test]
    fn a_fanout_leaves_alone_a_window_that_is_held_open_or_off() {
        for (c, window) in [
            (Coalescing::new(Duration::from_millis(10), 0.0), Duration::from_millis(10)),
            (Coalescing::new(Duration::ZERO, 0.4), Duration::ZERO),
        ] {
            for _ in 0..=demand::SPANS_OVER {
                assert!(!fan_out_after_a_span(&c, PAST_EVERY_CORE));
            }
            assert_eq!(c.window(), window);
        }
    }

    #[test]
    fn the_backlog_is_watched_only_while_it_could_open_the_window() {
        let c = Coalescing::new(Duration::from_millis(10), 0.4);
        assert!(!c.watches_backlog(0.19), "a light load: no wake-ups between samples");
        assert!(c.watches_backlog(0.2));
        c.open_on_backlog(Backlog { lag: 0.9, process: 0.9 });
        assert!(!c.watches_backlog(0.9), "open already");
        while !c.probing() {
            c.observe(busy(0.1));
        }
        assert!(!c.watches_backlog(0.9), "a probe is judged by its own sample");
        assert!(!Coalescing::new(Duration::from_millis(10), 0.0).watches_backlog(1.0), "held open");
        assert!(!Coalescing::new(Duration::ZERO, 0.4).watches_backlog(1.0), "off");
    }

    #[test]
    fn a_spell_opened_by_a_backlog_starts_from_the_configured_window() {
        let c = Coalescing::new(Duration::from_millis(10), 0.4);
        for _ in 0..OPEN_AFTER + 3 * ADJUST_EVERY as usize {
            c.observe(busy(0.6));
        }
        assert!(c.window() > Duration::from_millis(10));
        while !c.probing() {
            c.observe(busy(0.3));
        }
        assert!(!c.observe(busy(0.1)), "the probe closes it");
        assert!(c.open_on_backlog(Backlog { lag: 0.7, process: 0.9 }));
        assert_eq!(c.window(), Duration::from_millis(10));
        // The samples of the old spell are forgotten: the first probe of the
        // new one comes a full probe period after it opened.
        for _ in 0..PROBE_EVERY - 1 {
            assert!(c.observe(busy(0.3)));
        }
        assert!(!c.observe(busy(0.3)));
    }

    #[test]
    fn the_machine_load_is_the_busy_share_of_every_cpu_tick() {
        assert_eq!(machine_fraction(Some((100, 1000)), Some((190, 1100))), 0.9);
        assert_eq!(machine_fraction(None, Some((190, 1100))), 1.0, "unreadable counts as saturated");
        assert_eq!(machine_fraction(Some((100, 1000)), Some((100, 1000))), 1.0, "no tick passed");
        let (busy, total) = machine_cpu_ticks().expect("/proc/stat on Linux");
        assert!(busy <= total && total > 0);
    }

    /// A sampler of `coalescing` running on the current runtime, and the
    /// token that stops it.
    fn start_sampler(coalescing: Coalescing) -> (Arc<WriterConfig>, CancellationToken) {
        let writer = Arc::new(WriterConfig { coalescing, metrics: Arc::new(crate::metrics::Metrics::new()) });
        let shutdown = CancellationToken::new();
        tokio::spawn(run(writer.clone(), shutdown.clone()));
        (writer, shutdown)
    }

    /// Two tasks that spin for `slice` between yields until the returned
    /// flag is cleared: a spinning worker burns CPU, and never parks.
    fn spin_two_workers(slice: Duration) -> Arc<AtomicBool> {
        let busy = Arc::new(AtomicBool::new(true));
        for _ in 0..2 {
            let busy = busy.clone();
            tokio::spawn(async move {
                while busy.load(Ordering::Relaxed) {
                    let spin_until = Instant::now() + slice;
                    while Instant::now() < spin_until {
                        std::hint::spin_loop();
                    }
                    tokio::task::yield_now().await;
                }
            });
        }
        busy
    }

    /// A gauge's value as `/metrics` renders it (None: not there).
    fn exported(metrics: &crate::metrics::Metrics, gauge: &str) -> Option<f64> {
        let text = metrics.render();
        let line = text.lines().find(|l| l.starts_with(&format!("{gauge} ")))?;
        line.rsplit(' ').next()?.parse::<f64>().ok()
    }

    fn two_worker_runtime() -> tokio::runtime::Runtime {
        tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap()
    }

    /// The sampler opens the window while two threads burn CPU and closes
    /// it once they idle.
    #[test]
    fn the_sampler_follows_the_process_cpu_time() {
        two_worker_runtime().block_on(async {
            // Two spinning threads are a fifth of any machine up to ten cores.
            // The machine's share: two threads of up to ten cores.
            let (writer, shutdown) =
                start_sampler(Coalescing::new(Duration::from_millis(10), 0.2).with_machine_threshold(0.2));
            let busy = spin_two_workers(Duration::from_millis(1));
            let window = || exported(&writer.metrics, "chorus_write_window_seconds");
            // Two spinning threads may saturate the machine, which lengthens
            // the window, up to twice its base.
            let open = |seconds: f64| (0.01..=0.02).contains(&seconds);
            eventually("the window opens", || open(writer.coalescing.window().as_secs_f64())).await;
            eventually("the window is exported", || window().is_some_and(open)).await;
            busy.store(false, Ordering::Relaxed);
            eventually("the window is closed again", || writer.coalescing.window() == Duration::ZERO).await;
            eventually("the closed window is exported", || window() == Some(0.0)).await;
            shutdown.cancel();
        });
    }

    /// Two workers kept busy 50 ms at a time keep the sampler's timer
    /// waiting: the backlog opens the window, without the half second of
    /// samples (the machine threshold, over 100%, keeps that path shut).
    #[test]
    fn the_sampler_opens_the_window_on_the_workers_backlog() {
        two_worker_runtime().block_on(async {
            let (writer, shutdown) =
                start_sampler(Coalescing::new(Duration::from_millis(10), 0.2).with_machine_threshold(1.1));
            let busy = spin_two_workers(Duration::from_millis(50));
            let opened_by_backlog =
                || writer.metrics.render().contains("chorus_write_window_openings_total{by=\"backlog\"} 1");
            eventually("a backlog opens the window", opened_by_backlog).await;
            assert!(!writer.metrics.render().contains("by=\"load\""), "the samples never opened it");
            busy.store(false, Ordering::Relaxed);
            let lag = || exported(&writer.metrics, "chorus_worker_lag_ratio");
            eventually("the idle workers read no backlog", || lag().is_some_and(|lag| lag < 0.5)).await;
            shutdown.cancel();
        });
    }

    /// Waits up to 20 s for `done`: no deadline short enough to be flaky.
    async fn eventually(what: &str, done: impl Fn() -> bool) {
        for _ in 0..2000 {
            if done() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        panic!("never: {what}");
    }

    #[test]
    fn a_zero_load_threshold_keeps_the_window_open() {
        let c = Coalescing::new(Duration::from_millis(10), 0.0);
        assert_eq!(c.window(), Duration::from_millis(10));
        assert!(c.observe(busy(0.0)));
        assert_eq!(c.window(), Duration::from_millis(10));
        let never = Coalescing::new(Duration::ZERO, 0.4);
        never.observe(busy(1.0));
        assert_eq!(never.window(), Duration::ZERO);
    }
}
