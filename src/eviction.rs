//! Rooms leave memory: a room with no member and no message for
//! `--history-ttl` is dropped, and past the `--history-memory` budget the
//! rooms idle longest are dropped at once (see `Registry::evict_for_memory`).
//!
//! Without it, every room that ever had a message would stay in memory
//! with up to `--history-size` messages for as long as the process runs,
//! and a token allowed every room could grow the server without bound.
//! An evicted room keeps its place in its sequence in a tombstone, so a
//! `seq` never repeats within an epoch; a client recovering past the
//! eviction is told `recovered: false`. Tombstones are bounded too: a
//! forgotten room starts a new epoch. With a database nothing is lost:
//! history reads reach into it, and a room comes back at its sequence.

use std::sync::Arc;
use std::time::Duration;

use crate::registry::Evicted;
use crate::state::ServerState;

/// How long memory eviction rests after a pass that freed nothing.
const STUCK_PAUSE: Duration = Duration::from_secs(1);

/// Runs until shutdown: checks for idle rooms a few times per `ttl` (at most
/// every minute; never without a `ttl`), and evicts for memory whenever the
/// budget's high-water mark is passed.
pub async fn run(state: Arc<ServerState>, ttl: Option<Duration>) {
    let period =
        ttl.map_or(Duration::from_secs(60), |ttl| (ttl / 2).clamp(Duration::from_millis(100), Duration::from_secs(60)));
    let mut ticks = tokio::time::interval(period);
    let registry = state.bus.registry();
    loop {
        tokio::select! {
            _ = ticks.tick() => {
                if let Some(ttl) = ttl {
                    record(&state, "idle", registry.evict_idle(ttl));
                }
                // Also a backstop, should a wake-up ever be missed.
                record(&state, "memory", registry.evict_for_memory());
            }
            () = registry.budget().over.notified() => {
                let evicted = registry.evict_for_memory();
                record(&state, "memory", evicted);
                let budget = registry.budget();
                if evicted.rooms == 0 && evicted.trimmed == 0 && budget.held() > budget.high_water() {
                    // What is left is rooms with members and no history to
                    // trim: sweeping again at once would free nothing, and
                    // every publish would pay for it. Wait a little.
                    tokio::select! {
                        () = tokio::time::sleep(STUCK_PAUSE) => {}
                        () = state.shutdown.cancelled() => return,
                    }
                }
            }
            () = state.shutdown.cancelled() => return,
        }
    }
}

fn record(state: &ServerState, reason: &'static str, mut evicted: Evicted) {
    if reason == "memory" {
        let inline = state.bus.registry().take_evicted_inline();
        evicted += inline;
    }
    state.metrics.evicted(reason, evicted.rooms, evicted.trimmed, evicted.forgotten);
    if evicted.forgotten > 0 {
        tracing::debug!(forgotten = evicted.forgotten, "tombstones forgotten: new rooms start a new epoch");
    }
}
