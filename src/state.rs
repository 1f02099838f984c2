//! What every part of a running server shares: configuration, the bus (and
//! through it the rooms), connections, metrics, the clock and the shutdown
//! signal.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use dashmap::DashMap;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::admin::Admin;
use crate::bus::Bus;
use crate::config::Config;
use crate::conn::{Coalescing, Connection, WriterConfig};
use crate::metrics::Metrics;
use crate::presence::Presence;

pub struct ServerState {
    pub config: Config,
    pub bus: Bus,
    pub metrics: Arc<Metrics>,
    /// Who is in each room (PROTOCOL.md section 8).
    pub presence: Presence,
    /// Bans, and how the admin API reaches the other nodes.
    pub admin: Admin,
    /// What every connection's writing shares.
    pub writer: Arc<WriterConfig>,
    /// Every open connection, for the liveness sweep and shutdown.
    pub connections: DashMap<u64, Arc<Connection>>,
    /// Cancelled when the server starts shutting down.
    pub shutdown: CancellationToken,
    /// Set at the first SIGTERM: `/readyz` answers 503 from then on.
    pub draining: AtomicBool,
    /// Cancelled when the public listener stops taking connections (after
    /// the drain period); the admin listener goes on until `shutdown`.
    pub stop_accepting: CancellationToken,
    /// Every connection task, so shutdown can wait for them.
    pub tasks: TaskTracker,
    started: Instant,
    next_connection_id: AtomicU64,
}

impl ServerState {
    pub fn new(config: Config, bus: Bus, admin: Admin, metrics: Arc<Metrics>, shutdown: CancellationToken) -> Self {
        let coalescing = Coalescing::new(config.write_coalesce, config.write_coalesce_load);
        let writer = Arc::new(WriterConfig { coalescing, metrics: metrics.clone() });
        let presence = presence(&config, &bus, metrics.clone(), &shutdown);
        Self {
            presence,
            config,
            bus,
            metrics,
            admin,
            writer,
            connections: DashMap::new(),
            shutdown,
            draining: AtomicBool::new(false),
            stop_accepting: CancellationToken::new(),
            tasks: TaskTracker::new(),
            started: Instant::now(),
            next_connection_id: AtomicU64::new(1),
        }
    }

    /// Milliseconds since the server started: the liveness clock.
    pub fn now_ms(&self) -> u64 {
        self.uptime().as_millis() as u64
    }

    /// Time since the server started: the rate limit's clock.
    pub fn uptime(&self) -> std::time::Duration {
        self.started.elapsed()
    }

    pub fn next_connection_id(&self) -> u64 {
        self.next_connection_id.fetch_add(1, Ordering::Relaxed)
    }
}

/// Presence of a single node, or, with `--redis-url`, of a cluster node:
/// its own node id, and the bus's Redis (or Redis Cluster).
fn presence(config: &Config, bus: &Bus, metrics: Arc<Metrics>, shutdown: &CancellationToken) -> Presence {
    let Some(access) = bus.redis_access() else { return Presence::new(metrics) };
    let node = crate::bus::fresh_epoch();
    let cluster = crate::presence::Cluster::new(access, &config.redis_prefix, node, config.presence_ttl);
    Presence::clustered(metrics, cluster, shutdown.clone())
}

/// Server time for a message's `ts`.
pub fn unix_millis() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64)
}
