//! With `--durable-acks`: the publishes of this node that wait for the
//! database writer to say their message is committed.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};

use parking_lot::Mutex;
use tokio::sync::oneshot;

#[derive(Default)]
pub struct PendingAcks {
    next: AtomicU64,
    waiting: Mutex<HashMap<u64, oneshot::Sender<()>>>,
}

impl PendingAcks {
    /// A request id, and what completes when its ack arrives.
    pub fn register(&self) -> (u64, oneshot::Receiver<()>) {
        let id = self.next.fetch_add(1, Ordering::Relaxed);
        let (done, acked) = oneshot::channel();
        self.waiting.lock().insert(id, done);
        (id, acked)
    }

    /// The writer's ack for `id`, as it arrived on this node's ack channel.
    pub fn complete(&self, id: u64) {
        if let Some(done) = self.waiting.lock().remove(&id) {
            let _ = done.send(());
        }
    }

    fn forget(&self, id: u64) {
        self.waiting.lock().remove(&id);
    }
}

/// Forgets a request when dropped: acked, failed, or abandoned.
pub struct Forget<'a>(pub &'a PendingAcks, pub u64);

impl Drop for Forget<'_> {
    fn drop(&mut self) {
        self.0.forget(self.1);
    }
}
