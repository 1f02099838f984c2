//! The liveness sweep: one task for the whole server pings connections,
//! closes the silent ones and the ones whose token expired.
//!
//! A sweep over every connection a few times a ping interval costs far less
//! than a timer per connection, and keeps idle connections small.

use std::sync::Arc;
use std::time::Duration;

use tokio::time::MissedTickBehavior;

use crate::auth::unix_now;
use crate::conn::flush_all;
use crate::state::ServerState;

/// Runs until shutdown.
pub async fn run(state: Arc<ServerState>) {
    let mut ticks = tokio::time::interval(sweep_period(&state));
    ticks.set_missed_tick_behavior(MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = ticks.tick() => sweep(&state),
            () = state.shutdown.cancelled() => return,
        }
    }
}

/// Often enough to hold the ping interval and timeout to within a quarter,
/// and token expiry to within a second.
fn sweep_period(state: &ServerState) -> Duration {
    let shortest = state.config.ping_interval.min(state.config.ping_timeout);
    (shortest / 4).clamp(Duration::from_millis(10), Duration::from_secs(1))
}

fn sweep(state: &ServerState) {
    let now_ms = state.now_ms();
    let now_unix = unix_now();
    let interval_ms = state.config.ping_interval.as_millis() as u64;
    let timeout_ms = state.config.ping_timeout.as_millis() as u64;
    state.metrics.rooms.set(state.bus.registry().room_count() as i64);
    let mut pinged = Vec::new();
    for entry in state.connections.iter() {
        let conn = entry.value();
        let silent_ms = now_ms.saturating_sub(conn.last_seen());
        if silent_ms > timeout_ms.saturating_mul(2) {
            // Closed a ping timeout ago (below), yet the peer still neither
            // talks nor reads: its close frame is stuck behind a full
            // socket (a slow consumer, say). Drop it.
            conn.abort_writer();
        }
        if now_unix > conn.expires_at() {
            conn.close(1008, "token expired");
        } else if silent_ms > timeout_ms {
            conn.close(1008, "ping timeout");
        } else if conn.ping_if_due(now_ms, interval_ms) {
            pinged.push(conn.clone());
        }
    }
    // Written outside the map's shard locks, spread over the threads.
    flush_all(pinged);
}
