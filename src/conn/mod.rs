//! One WebSocket connection: the handle that rooms, the liveness sweep and
//! shutdown hold ([`Connection`]). It owns the socket: the session reads
//! from it, and whoever flushes the outgoing queue writes to it.

pub mod backlog;
pub mod coalesce;
pub mod cork;
pub mod demand;
pub mod outbox;
pub mod rate;
pub mod session;
pub mod signal;
pub mod writer;

use std::net::Shutdown;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::Bytes;
use tokio::net::TcpStream;

use crate::ws;
pub use coalesce::Coalescing;
use outbox::{Outbox, PushError, Pushed};
use signal::Signal;
pub use writer::{flush_all, WriterConfig};

/// What rooms, the sweep and shutdown share of one connection.
pub struct Connection {
    pub id: u64,
    /// The user (`sub`), for the admin API's disconnect and for logs.
    pub sub: Arc<str>,
    pub outbox: Outbox,
    socket: TcpStream,
    writer: Arc<WriterConfig>,
    /// permessage-deflate, when the upgrade negotiated it.
    deflate: Option<ws::PeerDeflate>,
    /// Milliseconds on the server clock when the client last sent anything.
    last_seen: AtomicU64,
    /// Milliseconds on the server clock of the last server ping.
    last_ping: AtomicU64,
    /// The token's `exp`, seconds since the Unix epoch; `refresh` moves it.
    expires_at: AtomicU64,
    /// Tells the session to stop reading: nothing more will be written.
    stop_reading: Signal,
    /// Tells the session that writing is over (the close frame is out, or
    /// the peer is gone), so it may drop the socket.
    finished: Signal,
    /// Tells the writer task to give up, even in the middle of a write: the
    /// peer neither reads (the socket is full) nor sends anything.
    abort_writer: Signal,
}

/// What a connection starts with.
pub struct Setup {
    pub id: u64,
    pub sub: Arc<str>,
    pub send_queue: usize,
    pub expires_at: u64,
    pub now_ms: u64,
    pub writer: Arc<WriterConfig>,
    pub deflate: Option<ws::PeerDeflate>,
}

impl Connection {
    pub fn new(socket: TcpStream, setup: Setup) -> Self {
        Self {
            id: setup.id,
            sub: setup.sub,
            outbox: Outbox::new(setup.send_queue),
            socket,
            writer: setup.writer,
            deflate: setup.deflate,
            last_seen: AtomicU64::new(setup.now_ms),
            last_ping: AtomicU64::new(setup.now_ms),
            expires_at: AtomicU64::new(setup.expires_at),
            stop_reading: Signal::default(),
            finished: Signal::default(),
            abort_writer: Signal::default(),
        }
    }

    pub fn socket(&self) -> &TcpStream {
        &self.socket
    }

    /// What the upgrade negotiated for compression, if anything.
    pub fn deflate(&self) -> Option<ws::PeerDeflate> {
        self.deflate
    }

    /// Whether `frame` goes to this connection compressed: it negotiated
    /// compression and the frame's payload suits its limits.
    pub fn wants_compressed(&self, frame: &[u8]) -> bool {
        self.deflate.is_some_and(|peer| peer.wants(ws::frame::payload(frame).len()))
    }

    /// A frame made for this connection alone (a reply): compressed when it
    /// [wants it](Self::wants_compressed). Control frames and frames already
    /// compressed go as they are.
    pub fn own_frame(&self, frame: Bytes) -> Bytes {
        if self.wants_compressed(&frame) {
            ws::deflate_frame(&frame).unwrap_or(frame)
        } else {
            frame
        }
    }

    /// A frame shared by several connections (a presence diff, an epoch's
    /// `joined`), in the form this one gets: `deflated` caches the
    /// compressed twin, made at most once for all of them.
    pub fn shared_frame(&self, frame: &Bytes, deflated: &mut Option<Option<Bytes>>) -> Bytes {
        if self.wants_compressed(frame) {
            deflated.get_or_insert_with(|| ws::deflate_frame(frame)).clone().unwrap_or_else(|| frame.clone())
        } else {
            frame.clone()
        }
    }

    /// Queues a frame and writes it now if nobody else is writing; a full
    /// queue cuts the connection as a slow consumer (and says `Full`).
    pub fn send(self: &Arc<Self>, frame: Bytes) -> Result<(), PushError> {
        let pushed = self.queue(frame)?;
        self.flush_if_owed(Some(pushed));
        Ok(())
    }

    /// Tells the server's writing that a fanout queued `deliveries` frames:
    /// a load past capacity opens the coalescing window before a backlog
    /// forms ([`demand`]). Every connection shares the server's
    /// [`WriterConfig`], so any recipient can carry it.
    pub fn note_fanout(&self, deliveries: usize) {
        self.writer.note_fanout(deliveries);
    }

    /// Queues a frame, leaving an owed flush to the caller: fanout queues to
    /// every member under the room's lock and flushes after releasing it.
    pub fn queue(self: &Arc<Self>, frame: Bytes) -> Result<Pushed, PushError> {
        let pushed = self.outbox.push(frame);
        if pushed == Err(PushError::Full) {
            self.cut_slow_consumer();
        }
        pushed
    }

    /// Closes with `code` after the frames already queued.
    pub fn close(self: &Arc<Self>, code: u16, reason: &str) -> bool {
        self.flush_if_owed(self.outbox.close(ws::close_frame(code, reason), false))
    }

    /// Closes with 1013 at once, dropping what the peer did not read.
    pub fn cut_slow_consumer(self: &Arc<Self>) -> bool {
        self.flush_if_owed(self.outbox.close(ws::close_frame(1013, "slow consumer"), true))
    }

    fn flush_if_owed(self: &Arc<Self>, pushed: Option<Pushed>) -> bool {
        if pushed == Some(Pushed::FlushNeeded) {
            writer::flush(self);
        }
        pushed.is_some()
    }

    /// Stops writing without a close frame: the peer is gone.
    pub fn kill(&self) {
        if self.outbox.kill() {
            self.finish();
        }
    }

    /// Writing is over: sends FIN, stops the reader, tells the session.
    fn finish(&self) {
        let _ = socket2::SockRef::from(&self.socket).shutdown(Shutdown::Write);
        self.stop_reading.raise();
        self.finished.raise();
    }

    /// The writer task ended with nothing left to write. It leaves no waker
    /// behind: a waker would keep the ended task's memory alive.
    fn writer_retired(&self) {
        self.abort_writer.forget_waiter();
    }

    pub fn touch(&self, now_ms: u64) {
        self.last_seen.store(now_ms, Ordering::Relaxed);
    }

    pub fn last_seen(&self) -> u64 {
        self.last_seen.load(Ordering::Relaxed)
    }

    /// Queues a server ping if one is due; says whether the caller owes a flush.
    pub fn ping_if_due(self: &Arc<Self>, now_ms: u64, interval_ms: u64) -> bool {
        if now_ms.saturating_sub(self.last_ping.load(Ordering::Relaxed)) < interval_ms {
            return false;
        }
        self.last_ping.store(now_ms, Ordering::Relaxed);
        self.queue(ws::ping_frame()) == Ok(Pushed::FlushNeeded)
    }

    pub fn expires_at(&self) -> u64 {
        self.expires_at.load(Ordering::Relaxed)
    }

    pub fn set_expires_at(&self, exp: u64) {
        self.expires_at.store(exp, Ordering::Relaxed);
    }

    pub fn poll_reader_stopped(&self, cx: &mut Context<'_>) -> Poll<()> {
        self.stop_reading.poll_wait(cx)
    }

    pub async fn writing_finished(&self) {
        self.finished.wait().await;
    }

    /// Makes the writer task stop at once, dropping what it could not write.
    pub fn abort_writer(&self) {
        self.abort_writer.raise();
    }

    async fn writer_aborted(&self) {
        self.abort_writer.wait().await;
    }
}
