//! The live view: once a second, one line on stderr (connections up,
//! messages per second sent, acked and delivered, this second's p99) and one
//! point of the timeline kept for the report's throughput plot.

use std::io::{IsTerminal, Write};
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::oneshot;
use tokio::task::JoinHandle;

use crate::session::Shared;
use crate::summary::Tick;

/// The phase a run is in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Phase {
    Connect = 0,
    Join = 1,
    Send = 2,
    Drain = 3,
    Hold = 4,
    Close = 5,
    Settle = 6,
}

impl Phase {
    pub fn name(self) -> &'static str {
        match self {
            Phase::Connect => "connect",
            Phase::Join => "join",
            Phase::Send => "send",
            Phase::Drain => "drain",
            Phase::Hold => "hold",
            Phase::Close => "close",
            Phase::Settle => "settle",
        }
    }

    fn from_u8(v: u8) -> Phase {
        match v {
            0 => Phase::Connect,
            1 => Phase::Join,
            2 => Phase::Send,
            3 => Phase::Drain,
            4 => Phase::Hold,
            6 => Phase::Settle,
            _ => Phase::Close,
        }
    }
}

/// The current phase, shared with the progress task.
#[derive(Clone, Default)]
pub struct PhaseCell(Arc<AtomicU8>);

impl PhaseCell {
    pub fn set(&self, p: Phase) {
        self.0.store(p as u8, Ordering::Relaxed);
    }

    pub fn get(&self) -> Phase {
        Phase::from_u8(self.0.load(Ordering::Relaxed))
    }
}

/// The running progress task.
pub struct Progress {
    stop: oneshot::Sender<()>,
    task: JoinHandle<Vec<Tick>>,
}

impl Progress {
    /// Start reporting; `planned` is the number of connections to open.
    pub fn start(sh: Arc<Shared>, phase: PhaseCell, planned: usize, quiet: bool) -> Progress {
        let (stop, mut stopped) = oneshot::channel();
        let task = tokio::spawn(async move {
            let t0 = Instant::now();
            let tty = std::io::stderr().is_terminal();
            let mut ticks = Vec::new();
            let mut iv = tokio::time::interval(Duration::from_secs(1));
            iv.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            iv.tick().await;
            let mut last = (0u64, 0u64, 0u64, Instant::now());
            loop {
                tokio::select! {
                    _ = iv.tick() => {}
                    _ = &mut stopped => break,
                }
                let st = &sh.stats;
                let (dh, ah, delivered) = st.take_interval();
                let sent = st.sent.load(Ordering::Relaxed);
                let acked = st.acked.load(Ordering::Relaxed);
                let now = Instant::now();
                let secs = now.duration_since(last.3).as_secs_f64().max(1e-3);
                let rate = |a: u64, b: u64| a.saturating_sub(b) as f64 / secs;
                let p99 = |h: &crate::stats::Hist| (!h.is_empty()).then(|| h.value_at_quantile(0.99) as f64 / 1e6);
                let tick = Tick {
                    t_s: now.duration_since(t0).as_secs_f64(),
                    phase: phase.get().name().to_string(),
                    connections: st.up.load(Ordering::Relaxed),
                    sent_per_s: rate(sent, last.0),
                    acked_per_s: rate(acked, last.1),
                    delivered_per_s: rate(delivered, last.2),
                    p99_delivery_ms: p99(&dh),
                    p99_ack_ms: p99(&ah),
                };
                last = (sent, acked, delivered, now);
                if !quiet {
                    print_line(&tick, planned, st.connect_failed.load(Ordering::Relaxed), tty);
                }
                ticks.push(tick);
            }
            if !quiet && tty {
                eprintln!();
            }
            ticks
        });
        Progress { stop, task }
    }

    /// Stop and return the timeline.
    pub async fn finish(self) -> Vec<Tick> {
        let _ = self.stop.send(());
        self.task.await.unwrap_or_default()
    }
}

fn print_line(t: &Tick, planned: usize, failed: u64, tty: bool) {
    let ms = |v: Option<f64>| match v {
        Some(v) => format!("{v:.2}ms"),
        None => "-".to_string(),
    };
    let failed = if failed > 0 { format!(" ({failed} failed)") } else { String::new() };
    let line = format!(
        "[{:>5.0}s] {:<7} conns {}/{}{}  sent {:.0}/s  acked {:.0}/s  delivered {:.0}/s  p99 delivery {} ack {}",
        t.t_s,
        t.phase,
        t.connections,
        planned,
        failed,
        t.sent_per_s,
        t.acked_per_s,
        t.delivered_per_s,
        ms(t.p99_delivery_ms),
        ms(t.p99_ack_ms),
    );
    let mut err = std::io::stderr().lock();
    if tty {
        let _ = write!(err, "\r\x1b[K{line}");
    } else {
        let _ = writeln!(err, "{line}");
    }
    let _ = err.flush();
}
