//! One WebSocket connection: the handle that rooms and the liveness sweep
//! hold ([`Connection`]), its outgoing queue, its writer task and its
//! session (the reader loop that answers requests).

pub mod outbox;
pub mod rate;
pub mod session;
pub mod signal;
pub mod writer;

use std::sync::atomic::{AtomicU64, Ordering};

use bytes::Bytes;

use crate::ws;
use outbox::{Outbox, PushError};
use signal::Signal;

/// What rooms, the sweep and shutdown share of one connection.
pub struct Connection {
    pub id: u64,
    pub outbox: Outbox,
    /// Milliseconds on the server clock when the client last sent anything.
    last_seen: AtomicU64,
    /// Milliseconds on the server clock of the last server ping.
    last_ping: AtomicU64,
    /// The token's `exp`, seconds since the Unix epoch; `refresh` moves it.
    expires_at: AtomicU64,
    /// Tells the session to stop reading (the writer stopped, or someone
    /// closed the connection).
    stop_reading: Signal,
    /// Tells the writer to give up, even in the middle of a write: the peer
    /// neither reads (the socket is full) nor sends anything.
    abort_writer: Signal,
}

impl Connection {
    pub fn new(id: u64, send_queue: usize, expires_at: u64, now_ms: u64) -> Self {
        Self {
            id,
            outbox: Outbox::new(send_queue),
            last_seen: AtomicU64::new(now_ms),
            last_ping: AtomicU64::new(now_ms),
            expires_at: AtomicU64::new(expires_at),
            stop_reading: Signal::default(),
            abort_writer: Signal::default(),
        }
    }

    /// Queues a frame; a full queue cuts the connection as a slow consumer
    /// (and says `Full`).
    pub fn send(&self, frame: Bytes) -> Result<(), PushError> {
        let pushed = self.outbox.push(frame);
        if pushed == Err(PushError::Full) {
            self.cut_slow_consumer();
        }
        pushed
    }

    /// Closes with `code` after the frames already queued.
    pub fn close(&self, code: u16, reason: &str) -> bool {
        self.outbox.close(ws::close_frame(code, reason), false)
    }

    /// Closes with 1013 at once, dropping what the peer did not read.
    pub fn cut_slow_consumer(&self) -> bool {
        self.outbox.close(ws::close_frame(1013, "slow consumer"), true)
    }

    pub fn touch(&self, now_ms: u64) {
        self.last_seen.store(now_ms, Ordering::Relaxed);
    }

    pub fn last_seen(&self) -> u64 {
        self.last_seen.load(Ordering::Relaxed)
    }

    /// Queues a server ping if one is due.
    pub fn ping_if_due(&self, now_ms: u64, interval_ms: u64) {
        if now_ms.saturating_sub(self.last_ping.load(Ordering::Relaxed)) >= interval_ms {
            self.last_ping.store(now_ms, Ordering::Relaxed);
            let _ = self.send(ws::ping_frame());
        }
    }

    pub fn expires_at(&self) -> u64 {
        self.expires_at.load(Ordering::Relaxed)
    }

    pub fn set_expires_at(&self, exp: u64) {
        self.expires_at.store(exp, Ordering::Relaxed);
    }

    pub fn stop_reader(&self) {
        self.stop_reading.raise();
    }

    pub async fn reader_stopped(&self) {
        self.stop_reading.wait().await;
    }

    /// Makes the writer stop at once, dropping what it could not write.
    pub fn abort_writer(&self) {
        self.abort_writer.raise();
    }

    pub async fn writer_aborted(&self) {
        self.abort_writer.wait().await;
    }
}
