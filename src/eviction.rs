//! Idle rooms leave memory: a room with no member and no message for
//! `--history-ttl` drops the history it keeps in memory.
//!
//! Without it, every room that ever had a message would stay in memory
//! with up to `--history-size` messages for as long as the process runs,
//! and a token allowed every room could grow the server without bound.
//! An evicted room keeps its place in its sequence (see
//! `Registry::evict_idle`), so a `seq` never repeats within an epoch; a
//! client recovering past the eviction is told `recovered: false`. With a
//! database nothing is lost: history reads reach into it.

use std::sync::Arc;
use std::time::Duration;

use crate::state::ServerState;

/// Runs until shutdown, checking a few times per `ttl` (at most every minute).
pub async fn run(state: Arc<ServerState>, ttl: Duration) {
    let period = (ttl / 2).clamp(Duration::from_millis(100), Duration::from_secs(60));
    let mut ticks = tokio::time::interval(period);
    loop {
        tokio::select! {
            _ = ticks.tick() => {
                let evicted = state.bus.registry().evict_idle(ttl);
                state.metrics.rooms_evicted.inc_by(evicted as u64);
            }
            () = state.shutdown.cancelled() => return,
        }
    }
}
