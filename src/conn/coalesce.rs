//! The coalescing window: only while the server is saturated.
//!
//! Batches follow the backlog ([`super::cork`]): what a connection has
//! queued by the end of a round leaves in one write, so under light load a
//! frame goes out at once and under heavy load batches grow by themselves.
//! At saturation a window (`--write-coalesce`) can still save CPU: a busy
//! connection then writes at most once per window, and frames that arrive
//! meanwhile share its `sendmsg`. It costs every frame of such a connection
//! up to a window of latency, so it applies only once the runtime's worker
//! threads were busy for at least `--write-coalesce-load` of the last
//! sample period, until they fall under half of that: the gap keeps it from
//! flapping, since the window itself lowers the load that opened it. Below
//! that no window applies at all. Frames held back by the window never count
//! toward the slow-consumer bound (see [`super::outbox`]).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::runtime::Handle;
use tokio_util::sync::CancellationToken;

use super::WriterConfig;

/// How often the workers' busy time is sampled.
const SAMPLE_EVERY: Duration = Duration::from_millis(100);

/// The window and whether it applies now.
pub struct Coalescing {
    busy_window: Duration,
    /// Busy fraction at which the window opens; 0 keeps it open.
    open_at: f64,
    open: AtomicBool,
}

impl Coalescing {
    pub fn new(window: Duration, open_at: f64) -> Self {
        Self {
            busy_window: window,
            open_at,
            open: AtomicBool::new(open_at <= 0.0),
        }
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

    /// Takes the busy fraction of the last period; returns whether the
    /// window applies now (always, with a threshold of 0).
    pub fn observe(&self, busy: f64) -> bool {
        let was_open = self.open.load(Ordering::Relaxed);
        let open = if was_open { busy >= self.open_at / 2.0 } else { busy >= self.open_at };
        self.open.store(open, Ordering::Relaxed);
        open
    }
}

/// Samples the runtime's busy time until shutdown and opens or closes the
/// window; exports both as metrics.
pub async fn run(writer: Arc<WriterConfig>, shutdown: CancellationToken) {
    let (coalescing, metrics) = (&writer.coalescing, &writer.metrics);
    let runtime = Handle::current().metrics();
    let busy_total = || (0..runtime.num_workers()).map(|w| runtime.worker_total_busy_duration(w)).sum::<Duration>();
    let mut ticks = tokio::time::interval(SAMPLE_EVERY);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let (mut last_at, mut last_busy) = (Instant::now(), busy_total());
    loop {
        tokio::select! {
            _ = ticks.tick() => {}
            () = shutdown.cancelled() => return,
        }
        let (now, busy) = (Instant::now(), busy_total());
        let capacity = now.duration_since(last_at).as_secs_f64() * runtime.num_workers() as f64;
        let fraction = if capacity > 0.0 { busy.saturating_sub(last_busy).as_secs_f64() / capacity } else { 0.0 };
        (last_at, last_busy) = (now, busy);
        coalescing.observe(fraction);
        metrics.runtime_busy_ratio.set(fraction);
        metrics.write_window_seconds.set(coalescing.window().as_secs_f64());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_window_opens_when_busy_and_closes_under_half_the_load() {
        let c = Coalescing::new(Duration::from_millis(10), 0.4);
        assert_eq!(c.window(), Duration::ZERO);
        assert!(!c.observe(0.39));
        assert!(c.observe(0.4));
        assert_eq!(c.window(), Duration::from_millis(10));
        // The window lowered the load, but not under half the threshold.
        assert!(c.observe(0.25));
        assert!(!c.observe(0.19));
        assert_eq!(c.window(), Duration::ZERO);
        assert!(!c.observe(0.3));
    }

    /// The sampler opens the window while the workers are kept busy
    /// and closes it once they idle.
    #[test]
    fn the_sampler_follows_the_workers_busy_time() {
        let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
        runtime.block_on(async {
            let writer = Arc::new(WriterConfig {
                coalescing: Coalescing::new(Duration::from_millis(10), 0.4),
                metrics: Arc::new(crate::metrics::Metrics::new()),
            });
            let shutdown = CancellationToken::new();
            tokio::spawn(run(writer.clone(), shutdown.clone()));
            let busy = Arc::new(AtomicBool::new(true));
            for _ in 0..2 {
                let busy = busy.clone();
                // A blocking loop keeps a worker busy: it never parks.
                tokio::spawn(async move {
                    while busy.load(Ordering::Relaxed) {
                        std::thread::sleep(Duration::from_millis(1));
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
