//! `--churn RATE`: during the measured phase, members leave one of their
//! rooms and rejoin it, RATE events per second in total, so presence sees a
//! steady stream of users going and coming while messages flow.
//!
//! The driver only writes the `leave`; the member's reader rejoins on `left`
//! with `since` (see `session.rs`), so the seq checks and the expected
//! deliveries stay sound. Members are visited in a fixed shuffled order, so
//! consecutive events hit different rooms; a member still between its leave
//! and its rejoin is passed over (one churn at a time per connection).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::task::JoinHandle;

use crate::client::SharedWriter;
use crate::clock::Clock;
use crate::session::{Session, Shared};

/// Members tried per event before the event is counted as skipped.
const TRIES: usize = 8;

/// One member the driver may churn.
struct Target {
    writer: SharedWriter,
    churning: Arc<AtomicBool>,
    rooms: Vec<usize>,
}

/// The members of `sessions` in a fixed shuffled order.
fn targets(sessions: &[Session]) -> Vec<Target> {
    let mut out: Vec<Target> = sessions
        .iter()
        .filter(|s| !s.rooms.is_empty())
        .map(|s| Target { writer: s.writer.clone(), churning: s.churning.clone(), rooms: s.rooms.clone() })
        .collect();
    // Fisher-Yates with a fixed xorshift: runs churn in the same order.
    let mut x = 0x9E37_79B9_7F4A_7C15u64;
    for i in (1..out.len()).rev() {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        out.swap(i, (x % (i as u64 + 1)) as usize);
    }
    out
}

/// Churn `rate` times per second from `start_ns` to `end_ns` (Unix ns on
/// `clock`); the task ends at `end_ns` or when `stop` is set.
pub fn spawn(
    sessions: &[Session],
    rate: f64,
    start_ns: u64,
    end_ns: u64,
    sh: Arc<Shared>,
    stop: Arc<AtomicBool>,
) -> Option<JoinHandle<()>> {
    let targets = targets(sessions);
    if targets.is_empty() || !(rate > 0.0 && rate.is_finite()) {
        return None;
    }
    Some(tokio::spawn(run(targets, rate, start_ns, end_ns, sh, stop)))
}

async fn run(targets: Vec<Target>, rate: f64, start_ns: u64, end_ns: u64, sh: Arc<Shared>, stop: Arc<AtomicBool>) {
    let clock: Clock = sh.clock;
    let interval_ns = 1e9 / rate;
    let (mut done, mut next, mut visits) = (0u64, 0usize, 0u64);
    loop {
        let now = clock.now_ns();
        if now >= end_ns || stop.load(Ordering::Relaxed) {
            return;
        }
        // Events due by now: the k-th is due at start + k / rate.
        let due = if now < start_ns { 0 } else { ((now - start_ns) as f64 / interval_ns) as u64 + 1 };
        while done < due {
            done += 1;
            let mut sent = false;
            for _ in 0..TRIES.min(targets.len()) {
                let t = &targets[next];
                next = (next + 1) % targets.len();
                if t.churning.compare_exchange(false, true, Ordering::SeqCst, Ordering::SeqCst).is_err() {
                    continue;
                }
                // Each visit to a member takes its next room, in turn.
                let room = t.rooms[(visits as usize / targets.len()) % t.rooms.len()];
                visits += 1;
                let frame = format!(r#"{{"type":"leave","room":{}}}"#, sh.rooms_json[room]);
                let mut w = t.writer.lock().await;
                if w.is_closed() {
                    continue;
                }
                w.push_text(frame.as_bytes());
                if w.flush().await.is_ok() {
                    sh.stats.churn_leaves.fetch_add(1, Ordering::Relaxed);
                    sent = true;
                }
                break;
            }
            if !sent {
                sh.stats.churn_skipped.fetch_add(1, Ordering::Relaxed);
            }
        }
        let next_due = start_ns + (done as f64 * interval_ns) as u64;
        let wait = next_due.saturating_sub(clock.now_ns()).max(200_000);
        tokio::time::sleep(Duration::from_nanos(wait)).await;
    }
}
