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

use super::keys::Keys;
use super::link::CommandLink;
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

pub struct Persister {
    /// A connection of its own: blocking reads would stall a shared one.
    pub link: CommandLink,
    pub keys: Keys,
    pub db: Arc<Database>,
    pub metrics: Arc<Metrics>,
    pub consumer: String,
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
        while !self.shutdown.is_cancelled() {
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

    /// Reads (or claims) a batch, writes it, acknowledges it.
    async fn step(&self, claim: bool) -> Result<(), String> {
        let entries = if claim { self.claim().await? } else { self.read().await? };
        if entries.is_empty() {
            return Ok(());
        }
        let messages: Vec<PersistedMessage> = entries.iter().filter_map(parse).collect();
        let started = Instant::now();
        self.db.write_batch(&messages).await.map_err(|e| e.to_string())?;
        self.metrics.persist_batch_seconds.observe(started.elapsed().as_secs_f64());
        self.metrics.persist_batch_rows.observe(messages.len() as f64);
        self.metrics.persist_rows.inc_by(messages.len() as u64);
        let ids: Vec<&str> = entries.iter().map(|e| e.id.as_str()).collect();
        let stream = self.keys.pending();
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
        read.arg("GROUP").arg(GROUP).arg(&self.consumer).arg("COUNT").arg(BATCH).arg("BLOCK").arg(BLOCK_MS);
        read.arg("STREAMS").arg(self.keys.pending()).arg(">");
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

    /// Takes over entries another node read and never acknowledged.
    async fn claim(&self) -> Result<Vec<StreamId>, String> {
        let mut claim = redis::cmd("XAUTOCLAIM");
        claim.arg(self.keys.pending()).arg(GROUP).arg(&self.consumer).arg(CLAIM_IDLE.as_millis() as u64);
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
        create.arg("CREATE").arg(self.keys.pending()).arg(GROUP).arg("0").arg("MKSTREAM");
        match self.link.run(|mut c| async move { create.query_async::<Value>(&mut c).await }).await {
            Ok(_) => Ok(()),
            Err(e) if e.code() == Some("BUSYGROUP") => Ok(()),
            Err(e) => Err(e.to_string()),
        }
    }
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
