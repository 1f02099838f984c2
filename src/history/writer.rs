//! The write-behind queue of a single node: publishing never waits for the
//! database.
//!
//! Messages go into a bounded queue; one task writes them in batches (one
//! multi-row INSERT per batch, as soon as a batch is full or a couple of
//! milliseconds after its first message), retrying with backoff while the
//! database is down. A full queue refuses new messages, so nothing is acked
//! that history might not hold. With `--durable-acks` each message carries
//! what to do once its batch has committed (deliver it, ack it), run in queue
//! order, which is `seq` order within each room.

use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use super::store::{Database, PersistedMessage};
use crate::metrics::Metrics;

/// Rows in one INSERT at most.
const MAX_BATCH: usize = 1000;
/// How long a batch waits for company after its first message.
const LINGER: Duration = Duration::from_millis(2);
const MIN_BACKOFF: Duration = Duration::from_millis(50);
const MAX_BACKOFF: Duration = Duration::from_secs(2);

/// What runs after a message's batch has committed.
pub type OnCommit = Box<dyn FnOnce() + Send>;

pub struct Job {
    pub message: PersistedMessage,
    pub on_commit: Option<OnCommit>,
}

/// The queue was full: the database is behind or away.
#[derive(Debug, thiserror::Error)]
#[error("the database write queue is full")]
pub struct QueueFull;

pub struct WriteBehind {
    jobs: mpsc::Sender<Job>,
    stop: CancellationToken,
    task: Mutex<Option<JoinHandle<()>>>,
}

impl WriteBehind {
    pub fn start(db: Arc<Database>, capacity: usize, metrics: Arc<Metrics>) -> Self {
        let (jobs, queue) = mpsc::channel(capacity);
        let stop = CancellationToken::new();
        let task = tokio::spawn(run(db, queue, metrics, stop.clone()));
        Self { jobs, stop, task: Mutex::new(Some(task)) }
    }

    /// A place in the queue; the job takes its turn when the permit is used.
    pub fn reserve(&self) -> Result<mpsc::Permit<'_, Job>, QueueFull> {
        self.jobs.try_reserve().map_err(|_| QueueFull)
    }

    /// Writes out everything queued, then stops; false if `grace` ran out first.
    pub async fn flush(&self, grace: Duration) -> bool {
        self.stop.cancel();
        let Some(task) = self.task.lock().take() else {
            return true;
        };
        matches!(tokio::time::timeout(grace, task).await, Ok(Ok(())))
    }
}

async fn run(db: Arc<Database>, mut queue: mpsc::Receiver<Job>, metrics: Arc<Metrics>, stop: CancellationToken) {
    let mut batch = Vec::with_capacity(MAX_BATCH);
    while gather(&mut queue, &mut batch, &stop).await {
        metrics.persist_queue_depth.set(queue.len() as i64);
        let messages: Vec<PersistedMessage> = batch.iter().map(|job| job.message.clone()).collect();
        // Flushing at shutdown keeps retrying too: `flush` bounds the wait.
        write_retrying(&db, &messages, &metrics, || false).await;
        for job in batch.drain(..) {
            if let Some(on_commit) = job.on_commit {
                on_commit();
            }
        }
    }
}

/// Fills `batch`: waits for a first job, then takes what else is there,
/// lingering briefly for more. False once stopped with nothing left.
async fn gather(queue: &mut mpsc::Receiver<Job>, batch: &mut Vec<Job>, stop: &CancellationToken) -> bool {
    let first = tokio::select! {
        job = queue.recv() => job,
        () = stop.cancelled() => queue.try_recv().ok(),
    };
    let Some(first) = first else { return false };
    batch.push(first);
    let deadline = tokio::time::Instant::now() + LINGER;
    while batch.len() < MAX_BATCH {
        match queue.try_recv() {
            Ok(job) => batch.push(job),
            Err(_) if stop.is_cancelled() => break,
            Err(_) => match tokio::time::timeout_at(deadline, queue.recv()).await {
                Ok(Some(job)) => batch.push(job),
                _ => break,
            },
        }
    }
    true
}

/// Writes one batch, retrying with backoff until the database takes it or
/// `give_up` says to stop (then false). Shared by the single node's queue
/// and the cluster's stream writer.
pub async fn write_retrying(
    db: &Database,
    batch: &[PersistedMessage],
    metrics: &Metrics,
    give_up: impl Fn() -> bool,
) -> bool {
    let mut backoff = MIN_BACKOFF;
    loop {
        let started = Instant::now();
        match db.write_batch(batch).await {
            Ok(()) => {
                metrics.persist_batch_seconds.observe(started.elapsed().as_secs_f64());
                metrics.persist_batch_rows.observe(batch.len() as f64);
                metrics.persist_rows.inc_by(batch.len() as u64);
                return true;
            }
            Err(e) => {
                metrics.persist_retries.inc();
                tracing::warn!("writing {} messages failed, retrying in {backoff:?}: {e}", batch.len());
                if give_up() {
                    return false;
                }
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(MAX_BACKOFF);
            }
        }
    }
}
