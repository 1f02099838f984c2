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
//! That load is measured without the window: it opens after two samples in
//! a row at or above the threshold (a burst of connections does not open
//! it), and while open it is closed for a short probe ([`PROBE_LENGTH`]) every
//! [`PROBE_EVERY`] samples, to measure again what the load would be
//! without it. A gap
//! between an opening and a closing threshold would not do: the window
//! itself lowers the load it is judged by, so it stayed open at loads that
//! do not need it once a burst had opened it. Frames held back by the
//! window never count toward the slow-consumer bound (see
//! [`super::outbox`]).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use tokio_util::sync::CancellationToken;

use super::WriterConfig;

/// How often the workers' busy time is sampled.
const SAMPLE_EVERY: Duration = Duration::from_millis(100);

/// How long a probe runs without the window: short, since past capacity a
/// server without its window falls behind at once.
const PROBE_LENGTH: Duration = Duration::from_millis(20);

/// Samples in a row at or above the threshold that open the window.
const OPEN_AFTER: u32 = 2;

/// While open, one sample in this many is a probe without the window, to
/// measure the load without it (every 2 s at 100 ms a sample).
pub const PROBE_EVERY: u32 = 20;

/// The window and whether it applies now.
pub struct Coalescing {
    busy_window: Duration,
    /// Busy fraction at which the window opens; 0 keeps it open.
    open_at: f64,
    open: AtomicBool,
    gate: Mutex<Gate>,
}

/// The sampler's memory of the last samples.
#[derive(Default)]
struct Gate {
    /// Samples in a row at or above the threshold, without the window.
    over: u32,
    /// Samples since the window opened or was last probed.
    since_probe: u32,
    /// The last sample ran without the window to measure the load.
    probing: bool,
}

impl Coalescing {
    pub fn new(window: Duration, open_at: f64) -> Self {
        Self { busy_window: window, open_at, open: AtomicBool::new(open_at <= 0.0), gate: Mutex::new(Gate::default()) }
    }

    /// The window a busy connection's writes keep now: zero unless the
    /// server is saturated.
    pub fn window(&self) -> Duration {
        if self.open.load(Ordering::Relaxed) {
            self.busy_window
        } else {
            Duration::ZERO
        }
    }

    /// Whether the next sample is a probe without the window.
    pub fn probing(&self) -> bool {
        self.gate.lock().probing
    }

    /// Takes the busy fraction of the last sample; returns whether the
    /// window applies during the next one (always, with a threshold of 0).
    pub fn observe(&self, busy: f64) -> bool {
        if self.open_at <= 0.0 {
            return true;
        }
        let mut gate = self.gate.lock();
        let open = if self.open.load(Ordering::Relaxed) {
            gate.since_probe += 1;
            if gate.since_probe >= PROBE_EVERY {
                gate.since_probe = 0;
                gate.probing = true;
                false
            } else {
                true
            }
        } else {
            gate.over = if busy >= self.open_at { gate.over + 1 } else { 0 };
            // A probe over the threshold reopens at once: the load held.
            let open = gate.over >= OPEN_AFTER || (gate.probing && gate.over > 0);
            gate.probing = false;
            if open {
                gate.since_probe = 0;
            }
            open
        };
        self.open.store(open, Ordering::Relaxed);
        open
    }
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

/// Samples the process's CPU time until shutdown and opens or closes the
/// window; exports both as metrics.
pub async fn run(writer: Arc<WriterConfig>, shutdown: CancellationToken) {
    let (coalescing, metrics) = (&writer.coalescing, &writer.metrics);
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get()) as f64;
    let (mut last_at, mut last_cpu) = (Instant::now(), process_cpu_time());
    let mut next_sample = SAMPLE_EVERY;
    loop {
        tokio::select! {
            () = tokio::time::sleep(next_sample) => {}
            () = shutdown.cancelled() => return,
        }
        let (now, cpu) = (Instant::now(), process_cpu_time());
        let capacity = now.duration_since(last_at).as_secs_f64() * cores;
        let fraction = if capacity > 0.0 { cpu.saturating_sub(last_cpu).as_secs_f64() / capacity } else { 0.0 };
        (last_at, last_cpu) = (now, cpu);
        coalescing.observe(fraction);
        next_sample = if coalescing.probing() { PROBE_LENGTH } else { SAMPLE_EVERY };
        metrics.cpu_ratio.set(fraction);
        metrics.write_window_seconds.set(coalescing.window().as_secs_f64());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_window_opens_on_a_sustained_load_and_probes_it_without_the_window() {
        let c = Coalescing::new(Duration::from_millis(10), 0.4);
        assert_eq!(c.window(), Duration::ZERO);
        assert!(!c.observe(0.5), "one busy sample (a burst) does not open it");
        assert!(!c.observe(0.39));
        assert!(!c.observe(0.4));
        assert!(c.observe(0.4), "two in a row do");
        assert_eq!(c.window(), Duration::from_millis(10));
        // The window lowers the load it is judged by: it stays open until
        // the probe, whatever it reads.
        for _ in 0..PROBE_EVERY - 1 {
            assert!(c.observe(0.1));
        }
        assert!(!c.observe(0.1), "the probe runs one sample without the window");
        assert_eq!(c.window(), Duration::ZERO);
        assert!(c.observe(0.45), "without the window the load is still over: it reopens at once");
        for _ in 0..PROBE_EVERY - 1 {
            assert!(c.observe(0.2));
        }
        assert!(!c.observe(0.2), "the next probe");
        assert!(!c.observe(0.3), "the load without the window is under the threshold: it stays closed");
        assert!(!c.observe(0.45), "and reopens only after two samples over it again");
        assert!(c.observe(0.45));
    }

    /// The sampler opens the window while two threads burn CPU and closes
    /// it once they idle.
    #[test]
    fn the_sampler_follows_the_process_cpu_time() {
        let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
        runtime.block_on(async {
            let writer = Arc::new(WriterConfig {
                // Two spinning threads are a fifth of any machine up to ten cores.
                coalescing: Coalescing::new(Duration::from_millis(10), 0.2),
                metrics: Arc::new(crate::metrics::Metrics::new()),
            });
            let shutdown = CancellationToken::new();
            tokio::spawn(run(writer.clone(), shutdown.clone()));
            let busy = Arc::new(AtomicBool::new(true));
            for _ in 0..2 {
                let busy = busy.clone();
                // A worker that spins burns CPU: it never parks.
                tokio::spawn(async move {
                    while busy.load(Ordering::Relaxed) {
                        let spin_until = Instant::now() + Duration::from_millis(1);
                        while Instant::now() < spin_until {
                            std::hint::spin_loop();
                        }
                        tokio::task::yield_now().await;
                    }
                });
            }
            let exported =
                |seconds: &str| writer.metrics.render().contains(&format!("write_window_seconds {seconds}\n"));
            eventually("the window opens", || writer.coalescing.window() == Duration::from_millis(10)).await;
            eventually("the window is exported", || exported("0.01")).await;
            busy.store(false, Ordering::Relaxed);
            eventually("the window is closed again", || writer.coalescing.window() == Duration::ZERO).await;
            eventually("the closed window is exported", || exported("0.0")).await;
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
        assert!(c.observe(0.0));
        assert_eq!(c.window(), Duration::from_millis(10));
        let never = Coalescing::new(Duration::ZERO, 0.4);
        never.observe(1.0);
        assert_eq!(never.window(), Duration::ZERO);
    }
}
