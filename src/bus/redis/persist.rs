//! The write-behind to the database, from Redis streams, for every node
//! of a cluster.
//!
//! The publish script appends each message to a stream in the same atomic
//! step that gives it its `seq`, so a message that was acked is in the
//! stream even if its node dies a moment later. With one Redis there is one
//! stream; on a Redis Cluster one per partition of rooms (see `keys`), in
//! the slot of its rooms, read here one after the other without blocking.
//! All nodes read each stream through one consumer group, so each message
//! is written once; entries a node read but never acknowledged (it died)
//! are claimed by another node after a few seconds. Writes are idempotent
//! on `(room, seq)`, so a claimed entry that had been written after all
//! does no harm.
//!
//! With `--durable-acks` one node at a time writes and releases each
//! stream (a lease per stream), so each room's releases stay in seq order.

use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::future::join_all;
use redis::streams::{StreamAutoClaimReply, StreamId, StreamReadReply};
use redis::Value;
use serde::Deserialize;
use serde_json::value::RawValue;
use tokio_util::sync::CancellationToken;

use super::link::CommandLink;
use super::scripts::{Release, Scripts};
use crate::history::writer::write_retrying;
use crate::history::{Database, PersistedMessage};
use crate::metrics::Metrics;
use crate::room::RoomName;

const GROUP: &str = "chorus-writers";
const BATCH: usize = 1000;
/// How long a read of the one stream waits for new entries; also how often
/// shutdown is noticed.
const BLOCK_MS: usize = 100;
/// On a cluster, how long the writer waits after a round over the
/// partitions' streams found nothing (reads there do not block: one
/// connection per shard serves every partition, and publishes too).
const POLL_IDLE: Duration = Duration::from_millis(100);
/// The same with `--durable-acks`, where it delays the acks: only the
/// lease holder of a partition reads it.
const POLL_IDLE_DURABLE: Duration = Duration::from_millis(20);
/// An entry read by a node that has not acknowledged it for this long is
/// taken over: that node is presumed dead.
const CLAIM_IDLE: Duration = Duration::from_secs(5);
const CLAIM_EVERY: Duration = Duration::from_secs(1);
const MAX_BACKOFF: Duration = Duration::from_secs(2);
/// With `--durable-acks`, a writer's lease: another node takes over this
/// long after the writer stops renewing it.
const LEASE: Duration = Duration::from_secs(5);
/// How often a held lease is renewed.
const RENEW_EVERY: Duration = Duration::from_secs(1);
/// How often a node tries to take a lease another node holds.
const TAKE_EVERY: Duration = Duration::from_millis(500);

pub struct Persister {
    /// With one Redis a connection of its own (blocking reads would stall a
    /// shared one); on a cluster the node's cluster connection.
    pub link: Arc<CommandLink>,
    pub scripts: Arc<Scripts>,
    pub db: Arc<Database>,
    pub metrics: Arc<Metrics>,
    pub shutdown: CancellationToken,
}

/// The message JSON as the publish script wrote it.
#[derive(Deserialize)]
struct MessageFields<'a> {
    seq: u64,
    from: String,
    ts: u64,
    #[serde(borrow)]
    body: &'a RawValue,
}

/// One stream and what this node knows of it.
struct Partition {
    stream: String,
    lease: String,
    /// With durable acks: whether this node holds the lease, and when it
    /// last took, renewed or tried to take it.
    leading: bool,
    attempted: Option<Instant>,
    /// Entries left pending by another writer are to be claimed first.
    claim_due: bool,
    /// The stream's length after this node's last acknowledgement.
    depth: i64,
}

impl Persister {
    pub async fn run(self) {
        let keys = &self.scripts.keys;
        let mut partitions: Vec<Partition> = (0..keys.partitions())
            .map(|p| Partition {
                stream: keys.pending(p),
                lease: keys.writer_lease(p),
                leading: false,
                attempted: None,
                claim_due: false,
                depth: 0,
            })
            .collect();
        let idle = if self.scripts.durable_acks { POLL_IDLE_DURABLE } else { POLL_IDLE };
        let mut last_claim = Instant::now();
        let mut backoff = Duration::from_millis(50);
        while !self.shutdown.is_cancelled() {
            // With durable acks one writer at a time releases a stream's
            // messages, so each room's releases stay in seq order.
            if self.scripts.durable_acks && !self.hold_leases(&mut partitions).await {
                tokio::time::sleep(Duration::from_millis(500)).await;
                continue;
            }
            let claim = last_claim.elapsed() >= CLAIM_EVERY;
            if claim {
                last_claim = Instant::now();
            }
            match self.round(&mut partitions, claim).await {
                Ok(written) => {
                    backoff = Duration::from_millis(50);
                    if written == 0 && partitions.len() > 1 {
                        tokio::select! {
                            () = tokio::time::sleep(idle) => {}
                            () = self.shutdown.cancelled() => {}
                        }
                    }
                }
                Err(e) => {
                    tracing::warn!("database write-behind: {e}; retrying in {backoff:?}");
                    self.metrics.persist_retries.inc();
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(MAX_BACKOFF);
                }
            }
            self.metrics.persist_queue_depth.set(partitions.iter().map(|p| p.depth).sum());
        }
    }

    /// Takes or renews the leases that are due; whether this node holds any.
    async fn hold_leases(&self, partitions: &mut [Partition]) -> bool {
        let due = |p: &Partition| {
            let every = if p.leading { RENEW_EVERY } else { TAKE_EVERY };
            p.attempted.is_none_or(|at| at.elapsed() >= every)
        };
        let attempts = join_all(partitions.iter().filter(|p| due(p)).map(|p| self.hold_lease(&p.lease))).await;
        let mut attempts = attempts.into_iter();
        for p in partitions.iter_mut().filter(|p| due(p)) {
            let held = attempts.next().unwrap_or(false);
            p.attempted = Some(Instant::now());
            // Whatever is pending belongs to a writer that lost the lease.
            p.claim_due |= held && !p.leading;
            p.leading = held;
        }
        partitions.iter().any(|p| p.leading)
    }

    /// Takes or renews one writer's lease; whether this node holds it.
    async fn hold_lease(&self, lease: &str) -> bool {
        let mut take = redis::cmd("EVAL");
        take.arg(
            "if redis.call('SET', KEYS[1], ARGV[1], 'NX', 'PX', ARGV[2]) then return 1 end \
             if redis.call('GET', KEYS[1]) == ARGV[1] then redis.call('PEXPIRE', KEYS[1], ARGV[2]) return 1 end \
             return 0",
        )
        .arg(1)
        .arg(lease)
        .arg(&self.scripts.node)
        .arg(LEASE.as_millis() as u64);
        matches!(self.link.run(|mut c| async move { take.query_async::<i64>(&mut c).await }).await, Ok(1))
    }

    /// Reads (or claims) a batch from each stream this node writes, writes
    /// them in one go, releases them (with durable acks), acknowledges
    /// them; how many entries it handled.
    async fn round(&self, partitions: &mut [Partition], claim: bool) -> Result<usize, String> {
        let block = (partitions.len() == 1).then_some(BLOCK_MS);
        let mine = |p: &Partition| !self.scripts.durable_acks || p.leading;
        let fetched = join_all(partitions.iter().filter(|p| mine(p)).map(|p| async move {
            if claim || p.claim_due {
                (true, self.claim(&p.stream).await)
            } else {
                (false, self.read(&p.stream, block).await)
            }
        }))
        .await;
        let mut error = None;
        let mut batches: Vec<(&mut Partition, Vec<StreamId>)> = Vec::new();
        for (p, (claimed, entries)) in partitions.iter_mut().filter(|p| mine(p)).zip(fetched) {
            match entries {
                Ok(entries) => {
                    if claimed {
                        p.claim_due = false;
                    }
                    if !entries.is_empty() {
                        batches.push((p, entries));
                    }
                }
                Err(e) => error = Some(e),
            }
        }
        let messages: Vec<PersistedMessage> = batches.iter().flat_map(|(_, e)| e.iter().filter_map(parse)).collect();
        let count = batches.iter().map(|(_, e)| e.len()).sum();
        // Retried in place, so batches are written (and released) in
        // stream order.
        if count > 0 && !write_retrying(&self.db, &messages, &self.metrics, || self.shutdown.is_cancelled()).await {
            // Shutting down: the entries stay pending for another node.
            return Ok(count);
        }
        let done = join_all(batches.iter().map(|(p, entries)| self.done(&p.stream, entries))).await;
        for ((p, _), depth) in batches.iter_mut().zip(done) {
            match depth {
                Ok(depth) => p.depth = depth,
                Err(e) => error = Some(e),
            }
        }
        match error {
            Some(e) => Err(e),
            None => Ok(count),
        }
    }

    /// Releases written entries of one stream (with durable acks) and
    /// acknowledges them; the stream's length afterwards.
    async fn done(&self, stream: &str, entries: &[StreamId]) -> Result<i64, String> {
        let releases: Vec<Release> =
            if self.scripts.durable_acks { entries.iter().filter_map(release).collect() } else { Vec::new() };
        if !releases.is_empty() {
            self.scripts.release(&releases).await.map_err(|e| e.to_string())?;
        }
        let ids: Vec<&str> = entries.iter().map(|e| e.id.as_str()).collect();
        let mut done = redis::pipe();
        done.cmd("XACK").arg(stream).arg(GROUP).arg(&ids).ignore();
        done.cmd("XDEL").arg(stream).arg(&ids).ignore();
        done.cmd("XLEN").arg(stream);
        let (depth,): (i64,) =
            self.link.run(|mut c| async move { done.query_async(&mut c).await }).await.map_err(|e| e.to_string())?;
        Ok(depth)
    }

    async fn read(&self, stream: &str, block: Option<usize>) -> Result<Vec<StreamId>, String> {
        let mut read = redis::cmd("XREADGROUP");
        read.arg("GROUP").arg(GROUP).arg(&self.scripts.node).arg("COUNT").arg(BATCH);
        if let Some(block) = block {
            read.arg("BLOCK").arg(block);
        }
        read.arg("STREAMS").arg(stream).arg(">");
        let reply: Result<Option<StreamReadReply>, _> =
            self.link.run(|mut c| async move { read.query_async(&mut c).await }).await;
        match reply {
            Ok(reply) => Ok(reply.map(|r| r.keys.into_iter().flat_map(|k| k.ids).collect()).unwrap_or_default()),
            Err(e) if e.code() == Some("NOGROUP") => {
                self.create_group(stream).await?;
                Ok(Vec::new())
            }
            Err(e) => Err(e.to_string()),
        }
    }

    /// Takes over entries another node read and never acknowledged. The
    /// durable-acks writer holds the lease, so whatever is pending belongs
    /// to a writer that lost it: taken at once, and released first.
    async fn claim(&self, stream: &str) -> Result<Vec<StreamId>, String> {
        let idle = if self.scripts.durable_acks { Duration::ZERO } else { CLAIM_IDLE };
        let mut claim = redis::cmd("XAUTOCLAIM");
        claim.arg(stream).arg(GROUP).arg(&self.scripts.node).arg(idle.as_millis() as u64);
        claim.arg("0-0").arg("COUNT").arg(BATCH);
        let reply: Result<StreamAutoClaimReply, _> =
            self.link.run(|mut c| async move { claim.query_async(&mut c).await }).await;
        match reply {
            Ok(reply) => Ok(reply.claimed),
            Err(e) if e.code() == Some("NOGROUP") => {
                self.create_group(stream).await?;
                Ok(Vec::new())
            }
            Err(e) => Err(e.to_string()),
        }
    }

    /// Creates the group (and the stream) if missing: at first start, or
    /// after Redis lost its data.
    async fn create_group(&self, stream: &str) -> Result<(), String> {
        let mut create = redis::cmd("XGROUP");
        create.arg("CREATE").arg(stream).arg(GROUP).arg("0").arg("MKSTREAM");
        match self.link.run(|mut c| async move { create.query_async::<Value>(&mut c).await }).await {
            Ok(_) => Ok(()),
            Err(e) if e.code() == Some("BUSYGROUP") => Ok(()),
            Err(e) => Err(e.to_string()),
        }
    }
}

/// A durable-acks entry as what to release once written.
fn release(entry: &StreamId) -> Option<Release> {
    let room = RoomName::parse(&entry.get::<String>("r")?).ok()?;
    let json: Vec<u8> = entry.get("m")?;
    let seq = serde_json::from_slice::<MessageFields>(&json).ok()?.seq;
    Some(Release { room, seq, epoch: entry.get("e")?, json, node: entry.get("n")?, request: entry.get("q")? })
}

/// A stream entry as a row; a malformed entry is skipped (and acknowledged).
fn parse(entry: &StreamId) -> Option<PersistedMessage> {
    let room = RoomName::parse(&entry.get::<String>("r")?).ok()?;
    let epoch: String = entry.get("e")?;
    let json: Vec<u8> = entry.get("m")?;
    let fields: MessageFields = serde_json::from_slice(&json).ok()?;
    Some(PersistedMessage {
        room,
        seq: fields.seq,
        epoch: epoch.into(),
        from: fields.from.into(),
        ts_millis: fields.ts,
        body: fields.body.get().to_owned(),
    })
}
