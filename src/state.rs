//! What every part of a running server shares: configuration, rooms,
//! connections, metrics, the clock and the shutdown signal.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use dashmap::DashMap;
use serde_json::value::RawValue;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::config::Config;
use crate::conn::Connection;
use crate::metrics::Metrics;
use crate::registry::Registry;
use crate::room::RoomName;

pub struct ServerState {
    pub config: Config,
    pub registry: Registry,
    pub metrics: Arc<Metrics>,
    /// Every open connection, for the liveness sweep and shutdown.
    pub connections: DashMap<u64, Arc<Connection>>,
    /// Cancelled when the server starts shutting down.
    pub shutdown: CancellationToken,
    /// Every connection task, so shutdown can wait for them.
    pub tasks: TaskTracker,
    started: Instant,
    next_connection_id: AtomicU64,
}

impl ServerState {
    pub fn new(config: Config, epoch: Arc<str>) -> Self {
        let registry = Registry::new(config.history_size, epoch);
        Self {
            config,
            registry,
            metrics: Arc::new(Metrics::new()),
            connections: DashMap::new(),
            shutdown: CancellationToken::new(),
            tasks: TaskTracker::new(),
            started: Instant::now(),
            next_connection_id: AtomicU64::new(1),
        }
    }

    /// Milliseconds since the server started: the liveness clock.
    pub fn now_ms(&self) -> u64 {
        self.started.elapsed().as_millis() as u64
    }

    pub fn next_connection_id(&self) -> u64 {
        self.next_connection_id.fetch_add(1, Ordering::Relaxed)
    }

    /// Publishes `body` from `from` to `room` and returns its `seq`; the one
    /// path for WebSocket `send` and the HTTP API.
    pub fn publish(&self, room: &RoomName, from: &str, body: &RawValue) -> u64 {
        let started = Instant::now();
        let delivery = self.registry.publish(room, from, unix_millis(), body.get().as_bytes());
        let m = &self.metrics;
        m.fanout_seconds.observe(started.elapsed().as_secs_f64());
        m.messages_published.inc();
        m.deliveries.inc_by(delivery.recipients as u64);
        m.slow_consumers.inc_by(delivery.slow_consumers as u64);
        delivery.seq
    }
}

/// Server time for a message's `ts`.
pub fn unix_millis() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64)
}
