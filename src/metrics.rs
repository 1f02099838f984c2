//! Every Prometheus metric the server exports, named in one place.
//!
//! Each server owns its registry (no global recorder), so several servers in
//! one process, as in tests, keep their figures apart. Hot-path updates are
//! single atomic adds; fanout adds once per message, not once per member.

use std::sync::atomic::AtomicU64;
use std::time::Instant;

use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

use crate::build_info;

/// Label set of the auth-failure counter: `reason`.
type Reason = [(&'static str, &'static str); 1];

/// Label set of the close-linger counter: `ended`.
type Ended = [(&'static str, &'static str); 1];

/// Label set of the eviction counter: `reason` (`idle`, `memory`, `trimmed`, `forgotten`).
type EvictionReason = [(&'static str, &'static str); 1];

/// Label set of the window-openings counter: `by` (`load`, `backlog`).
type OpenedBy = [(&'static str, &'static str); 1];

/// Label set of the build-info gauge: `version`, `commit`, `dirty`.
type Build = [(&'static str, &'static str); 3];

pub struct Metrics {
    registry: Registry,
    pub connections: Gauge,
    pub rooms: Gauge,
    pub frames_in: Counter,
    pub frames_out: Counter,
    /// Socket writes: frames_out / writes is how many frames a write carries.
    pub writes: Counter,
    /// The process's CPU time over the last sample, as a fraction of the cores.
    pub cpu_ratio: Gauge<f64, AtomicU64>,
    /// Every process's CPU time over the last sample, as a fraction of the cores.
    pub machine_cpu_ratio: Gauge<f64, AtomicU64>,
    /// The coalescing window in force (the full one only while the server is busy).
    pub write_window_seconds: Gauge<f64, AtomicU64>,
    /// The share of the last 100 ms the window's sampler waited for a worker.
    pub worker_lag_ratio: Gauge<f64, AtomicU64>,
    /// Spells of the coalescing window, by what opened them.
    write_window_openings: Family<OpenedBy, Counter>,
    pub messages_published: Counter,
    pub deliveries: Counter,
    pub slow_consumers: Counter,
    pub rate_limited: Counter,
    pub rooms_evicted: Counter,
    /// Joins refused by `--max-rooms-per-connection`.
    pub too_many_rooms: Counter,
    /// Bytes the rooms, their kept history and the tombstones hold (`--history-memory`).
    pub history_bytes: Gauge,
    /// Evicted rooms remembered only by their place in their sequence.
    pub tombstones: Gauge,
    evictions: Family<EvictionReason, Counter>,
    auth_failures: Family<Reason, Counter>,
    /// How the drains after a server close ended, by `ended`.
    close_lingers: Family<Ended, Counter>,
    /// Seconds from a publish's arrival to its frame queued for every local member.
    pub fanout_seconds: Histogram,
    pub bus_publish_seconds: Histogram,
    pub bus_messages_received: Counter,
    pub bus_subscriptions: Gauge,
    pub bus_reconnects: Counter,
    pub bus_gap_fills: Counter,
    pub persist_rows: Counter,
    pub persist_retries: Counter,
    pub persist_queue_depth: Gauge,
    pub persist_batch_rows: Histogram,
    pub persist_batch_seconds: Histogram,
    /// Local connections subscribed to a room's presence.
    pub presence_subscribers: Gauge,
    /// `presence_diff` frames queued to subscribers.
    pub presence_diffs: Counter,
    /// `presence_state` frames queued to subscribers (on subscribing, and
    /// for changes too large for a diff).
    pub presence_states: Counter,
    /// Connections closed with 4001 by the admin API.
    pub admin_disconnects: Counter,
}

impl Metrics {
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("chorus");
        // Constant 1; the labels say which build answers (PromQL can join on them).
        let build_info = Family::<Build, Gauge>::default();
        build_info
            .get_or_create(&[
                ("version", build_info::VERSION),
                ("commit", build_info::COMMIT),
                ("dirty", build_info::DIRTY),
            ])
            .set(1);
        registry.register("build_info", "The version and commit this server was built from", build_info);
        let connections = Gauge::default();
        let rooms = Gauge::default();
        let frames_in = Counter::default();
        let frames_out = Counter::default();
        let writes = Counter::default();
        let cpu_ratio = Gauge::<f64, AtomicU64>::default();
        let machine_cpu_ratio = Gauge::<f64, AtomicU64>::default();
        let write_window_seconds = Gauge::<f64, AtomicU64>::default();
        let worker_lag_ratio = Gauge::<f64, AtomicU64>::default();
        let write_window_openings = Family::<OpenedBy, Counter>::default();
        let messages_published = Counter::default();
        let deliveries = Counter::default();
        let slow_consumers = Counter::default();
        let rate_limited = Counter::default();
        let rooms_evicted = Counter::default();
        let too_many_rooms = Counter::default();
        let history_bytes = Gauge::default();
        let tombstones = Gauge::default();
        let evictions = Family::<EvictionReason, Counter>::default();
        let auth_failures = Family::<Reason, Counter>::default();
        let close_lingers = Family::<Ended, Counter>::default();
        // 1 µs to about 1 s.
        let fanout_seconds = Histogram::new(exponential_buckets(1e-6, 2.0, 21));
        registry.register("connections", "Open WebSocket connections", connections.clone());
        registry.register("rooms", "Rooms with local members or history", rooms.clone());
        registry.register("frames_in", "WebSocket data frames received", frames_in.clone());
        registry.register("frames_out", "WebSocket frames written", frames_out.clone());
        registry.register("writes", "Socket writes (each may carry many frames)", writes.clone());
        registry.register(
            "cpu_ratio",
            "The process's CPU time over the last sample, as a fraction of the machine's cores",
            cpu_ratio.clone(),
        );
        registry.register(
            "machine_cpu_ratio",
            "Every process's CPU time over the last sample (from /proc/stat), as a fraction of the machine's cores",
            machine_cpu_ratio.clone(),
        );
        registry.register(
            "write_window_seconds",
            "Coalescing window in force (zero unless the server is saturated)",
            write_window_seconds.clone(),
        );
        registry.register(
            "worker_lag_ratio",
            "The share of the last 100 ms that a timer's task waited for a worker (the workers' backlog)",
            worker_lag_ratio.clone(),
        );
        registry.register(
            "write_window_openings",
            "Spells of the coalescing window, by what opened it: load (half a second of CPU samples), \
             backlog (the workers kept a timer waiting half of 100 ms) or demand (the fanout's \
             deliveries would need more than every core unbatched, two 10 ms spans in a row)",
            write_window_openings.clone(),
        );
        registry.register("messages_published", "Messages given a seq", messages_published.clone());
        registry.register("deliveries", "Message frames queued to members", deliveries.clone());
        registry.register("slow_consumers", "Connections cut with 1013", slow_consumers.clone());
        registry.register("rate_limited", "Frames refused by the rate limit", rate_limited.clone());
        registry.register("rooms_evicted", "Idle rooms whose history left memory", rooms_evicted.clone());
        registry.register("too_many_rooms", "Joins refused by --max-rooms-per-connection", too_many_rooms.clone());
        registry.register(
            "history_bytes",
            "Bytes held by rooms, their in-memory history and tombstones (bounded by --history-memory)",
            history_bytes.clone(),
        );
        registry.register(
            "tombstones",
            "Evicted rooms remembered only by their place in their sequence",
            tombstones.clone(),
        );
        registry.register(
            "evictions",
            "Rooms evicted by reason: idle (--history-ttl), memory (past --history-memory), \
             trimmed (a room with members lost its kept history to the budget), forgotten (a tombstone dropped)",
            evictions.clone(),
        );
        registry.register("auth_failures", "Requests refused for their token", auth_failures.clone());
        registry.register(
            "close_lingers",
            "Drains after a server close, by how they ended (a bound cut a client still sending)",
            close_lingers.clone(),
        );
        registry.register("fanout_seconds", "Publish to queued at every local member", fanout_seconds.clone());
        let bus_publish_seconds = Histogram::new(exponential_buckets(1e-5, 2.0, 18));
        let bus_messages_received = Counter::default();
        let bus_subscriptions = Gauge::default();
        let bus_reconnects = Counter::default();
        let bus_gap_fills = Counter::default();
        registry.register("bus_publish_seconds", "Redis publish script round trip", bus_publish_seconds.clone());
        registry.register(
            "bus_messages_received",
            "Messages received from Redis pub/sub",
            bus_messages_received.clone(),
        );
        registry.register("bus_subscriptions", "Redis channels this node subscribes", bus_subscriptions.clone());
        registry.register("bus_reconnects", "Redis pub/sub reconnects", bus_reconnects.clone());
        registry.register("bus_gap_fills", "Gaps filled from Redis history", bus_gap_fills.clone());
        let persist_rows = Counter::default();
        let persist_retries = Counter::default();
        let persist_queue_depth = Gauge::default();
        let persist_batch_rows = Histogram::new(exponential_buckets(1.0, 2.0, 11));
        let persist_batch_seconds = Histogram::new(exponential_buckets(1e-4, 2.0, 16));
        registry.register("persist_rows", "Messages written to the database", persist_rows.clone());
        registry.register("persist_retries", "Database batch writes retried", persist_retries.clone());
        registry.register("persist_queue_depth", "Messages waiting to be written", persist_queue_depth.clone());
        registry.register("persist_batch_rows", "Rows per database batch", persist_batch_rows.clone());
        registry.register("persist_batch_seconds", "Database batch write latency", persist_batch_seconds.clone());
        let presence_subscribers = Gauge::default();
        let presence_diffs = Counter::default();
        let presence_states = Counter::default();
        registry.register(
            "presence_subscribers",
            "Connections subscribed to a room's presence",
            presence_subscribers.clone(),
        );
        registry.register("presence_diffs", "presence_diff frames queued to subscribers", presence_diffs.clone());
        registry.register("presence_states", "presence_state frames queued to subscribers", presence_states.clone());
        let admin_disconnects = Counter::default();
        registry.register("admin_disconnects", "Connections closed by the admin API", admin_disconnects.clone());
        Self {
            registry,
            connections,
            rooms,
            frames_in,
            frames_out,
            writes,
            cpu_ratio,
            machine_cpu_ratio,
            write_window_seconds,
            worker_lag_ratio,
            write_window_openings,
            messages_published,
            deliveries,
            slow_consumers,
            rate_limited,
            rooms_evicted,
            too_many_rooms,
            history_bytes,
            tombstones,
            evictions,
            auth_failures,
            close_lingers,
            fanout_seconds,
            bus_publish_seconds,
            bus_messages_received,
            bus_subscriptions,
            bus_reconnects,
            bus_gap_fills,
            persist_rows,
            persist_retries,
            persist_queue_depth,
            persist_batch_rows,
            persist_batch_seconds,
            presence_subscribers,
            presence_diffs,
            presence_states,
            admin_disconnects,
        }
    }

    /// One message queued to `recipients` local members, `started` when it arrived.
    pub fn record_fanout(&self, started: Instant, recipients: usize, slow_consumers: usize) {
        self.fanout_seconds.observe(started.elapsed().as_secs_f64());
        self.deliveries.inc_by(recipients as u64);
        self.slow_consumers.inc_by(slow_consumers as u64);
    }

    /// The budget's gauges, read when `/metrics` is served.
    pub fn record_memory(&self, registry: &crate::registry::Registry) {
        self.history_bytes.set(registry.budget().held() as i64);
        self.tombstones.set(registry.tombstone_count() as i64);
    }

    /// What an eviction pass did, under `reason` for the rooms it evicted.
    pub fn evicted(&self, reason: &'static str, rooms: usize, trimmed: usize, forgotten: usize) {
        for (reason, n) in [(reason, rooms), ("trimmed", trimmed), ("forgotten", forgotten)] {
            if n > 0 {
                self.evictions.get_or_create(&[("reason", reason)]).inc_by(n as u64);
            }
        }
        self.rooms_evicted.inc_by(rooms as u64);
    }

    pub fn auth_failure(&self, reason: &'static str) {
        self.auth_failures.get_or_create(&[("reason", reason)]).inc();
    }

    pub fn write_window_opened(&self, by: &'static str) {
        self.write_window_openings.get_or_create(&[("by", by)]).inc();
    }

    pub fn close_linger(&self, ended: &'static str) {
        self.close_lingers.get_or_create(&[("ended", ended)]).inc();
    }

    /// The Prometheus text exposition of every metric.
    pub fn render(&self) -> String {
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = encode(&mut out, &self.registry);
        out
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}
