//! Cluster mode's write-behind: every node writes the cluster's messages to
//! the database from one Redis stream.
//!
//! The publish script appends each message to the stream in the same atomic
//! step that gives it its `seq`, so a message that was acked is in the
//! stream even if its node dies a moment later. All nodes read the stream
//! through one consumer group, so each message is written once; entries a
//! node read but never acknowledged (it died) are claimed by another node
//! after a few seconds. Writes are idempotent on `(room, seq)`, so a claimed
//! entry that had been written after all does no harm.

use std::sync::Arc;
use std::time::{Duration, Instant};

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
/// How long a read waits for new entries; also how often shutdown is noticed.
const BLOCK_MS: usize = 100;
/// An entry read by a node that has not acknowledged it for this long is
/// taken over: that node is presumed dead.
const CLAIM_IDLE: Duration = Duration::from_secs(5);
const CLAIM_EVERY: Duration = Duration::from_secs(1);
const MAX_BACKOFF: Duration = Duration::from_secs(2);
/// With `--durable-acks`, the writer's lease: another node takes over this
/// long after the writer stops renewing it.
const LEASE: Duration = Duration::from_secs(5);

pub struct Persister {
    /// A connection of its own: blocking reads would stall a shared one.
    pub link: CommandLink,
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

impl Persister {
    pub async fn run(self) {
        let mut last_claim = Instant::now();
        let mut backoff = Duration::from_millis(50);
        let mut leading = false;
        while !self.shutdown.is_cancelled() {
            // With durable acks one writer at a time releases messages, so
            // each room's releases stay in seq order.
            if self.scripts.durable_acks {
                let was_leading = leading;
                leading = self.hold_lease().await;
                if !leading {
                    tokio::time::sleep(Duration::from_millis(500)).await;
                    continue;
                }
                if !was_leading {
                    last_claim = Instant::now() - CLAIM_EVERY;
                }
            }
            let claim = last_claim.elapsed() >= CLAIM_EVERY;
            if claim {
                last_claim = Instant::now();
            }
            match self.step(claim).await {
                Ok(()) => backoff = Duration::from_millis(50),
                Err(e) => {
                    tracing::warn!("database write-behind: {e}; retrying in {backoff:?}");
                    self.metrics.persist_retries.inc();
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(MAX_BACKOFF);
                }
            }
        }
    }

    /// Takes or renews the writer's lease; whether this node holds it.
    async fn hold_lease(&self) -> bool {
        let mut take = redis::cmd("EVAL");
        take.arg(
            "if redis.call('SET', KEYS[1], ARGV[1], 'NX', 'PX', ARGV[2]) then return 1 end \
             if redis.call('GET', KEYS[1]) == ARGV[1] then redis.call('PEXPIRE', KEYS[1], ARGV[2]) return 1 end \
             return 0",
        )
        .arg(1)
        .arg(self.scripts.keys.writer_lease())
        .arg(&self.scripts.node)
        .arg(LEASE.as_millis() as u64);
        matches!(self.link.run(|mut c| async move { take.query_async::<i64>(&mut c).await }).await, Ok(1))
    }

    /// Reads (or claims) a batch, writes it, releases it (with durable
    /// acks), acknowledges it.
    async fn step(&self, claim: bool) -> Result<(), String> {
        let entries = if claim { self.claim().await? } else { self.read().await? };
        if entries.is_empty() {
            return Ok(());
        }
        let messages: Vec<PersistedMessage> = entries.iter().filter_map(parse).collect();
        // Retried in place, so batches are written (and released) in
        // stream order.
        if !write_retrying(&self.db, &messages, &self.metrics, || self.shutdown.is_cancelled()).await {
            // Shutting down: the entries stay pending for another node.
            return Ok(());
        }
        if self.scripts.durable_acks {
            let releases: Vec<Release> = entries.iter().filter_map(release).collect();
            self.scripts.release(&releases).await.map_err(|e| e.to_string())?;
        }
        let ids: Vec<&str> = entries.iter().map(|e| e.id.as_str()).collect();
        let stream = self.scripts.keys.pending();
        let mut done = redis::pipe();
        done.cmd("XACK").arg(&stream).arg(GROUP).arg(&ids).ignore();
        done.cmd("XDEL").arg(&stream).arg(&ids).ignore();
        done.cmd("XLEN").arg(&stream);
        let (depth,): (i64,) =
            self.link.run(|mut c| async move { done.query_async(&mut c).await }).await.map_err(|e| e.to_string())?;
        self.metrics.persist_queue_depth.set(depth);
        Ok(())
    }

    async fn read(&self) -> Result<Vec<StreamId>, String> {
        let mut read = redis::cmd("XREADGROUP");
        read.arg("GROUP").arg(GROUP).arg(&self.scripts.node).arg("COUNT").arg(BATCH).arg("BLOCK").arg(BLOCK_MS);
        read.arg("STREAMS").arg(self.scripts.keys.pending()).arg(">");
        let reply: Result<Option<StreamReadReply>, _> =
            self.link.run(|mut c| async move { read.query_async(&mut c).await }).await;
        match reply {
            Ok(reply) => Ok(reply.map(|r| r.keys.into_iter().flat_map(|k| k.ids).collect()).unwrap_or_default()),
            Err(e) if e.code() == Some("NOGROUP") => {
                self.create_group().await?;
                Ok(Vec::new())
            }
            Err(e) => Err(e.to_string()),
        }
    }

    /// Takes over entries another node read and never acknowledged. The
    /// durable-acks writer holds the lease, so whatever is pending belongs
    /// to a writer that lost it: taken at once, and released first.
    async fn claim(&self) -> Result<Vec<StreamId>, String> {
        let idle = if self.scripts.durable_acks { Duration::ZERO } else { CLAIM_IDLE };
        let mut claim = redis::cmd("XAUTOCLAIM");
        claim.arg(self.scripts.keys.pending()).arg(GROUP).arg(&self.scripts.node).arg(idle.as_millis() as u64);
        claim.arg("0-0").arg("COUNT").arg(BATCH);
        let reply: Result<StreamAutoClaimReply, _> =
            self.link.run(|mut c| async move { claim.query_async(&mut c).await }).await;
        match reply {
            Ok(reply) => Ok(reply.claimed),
            Err(e) if e.code() == Some("NOGROUP") => {
                self.create_group().await?;
                Ok(Vec::new())
            }
            Err(e) => Err(e.to_string()),
        }
    }

    /// Creates the group (and the stream) if missing: at first start, or
    /// after Redis lost its data.
    pub async fn create_group(&self) -> Result<(), String> {
        let mut create = redis::cmd("XGROUP");
        create.arg("CREATE").arg(self.scripts.keys.pending()).arg(GROUP).arg("0").arg("MKSTREAM");
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
