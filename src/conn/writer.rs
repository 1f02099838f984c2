//! Writing a connection's queue to its socket: from the flush at the end
//! of a round, or from a short-lived writer task.
//!
//! Whoever queues a frame for a quiet connection leaves its write to the
//! end of the round ([`super::cork`]); the round's flush then writes each
//! connection's whole queue with one non-blocking `sendmsg` (on loopback a
//! write costs about 6 µs; one round's task, shared by every connection it
//! flushes, well under one). A writer task starts only when the socket is
//! full, or when a saturated server holds busy connections to one write per
//! window ([`super::coalesce`]); it writes everything queued in one
//! `sendmsg` and ends when the queue runs dry.
//!
//! A round's flush is spread over the runtime's threads ([`flush_spread`]):
//! one thread writing a thousand sockets would leave the other cores idle.
//! (The chunks are spawned so that other workers can steal them; with fewer
//! than two spawned chunks tokio keeps the one in its unstealable LIFO slot,
//! and the fanout measured as slow as with no spreading at all.)

use std::io::{self, IoSlice};
use std::sync::Arc;

use bytes::Bytes;
use tokio::io::Interest;
use tokio::net::TcpStream;
use tokio::runtime::{Handle, RuntimeFlavor};

use super::coalesce::Coalescing;
use super::cork;
use super::outbox::{AfterWrite, Claim, Frames, Next, Phase};
use super::Connection;
use crate::metrics::Metrics;

/// The most frames handed to one `sendmsg` (Linux allows 1024 iovecs).
const MAX_IOVECS: usize = 256;

/// A small write's iovec array: a quiet connection's one frame, a few
/// replies.
const FEW_IOVECS: usize = 8;

/// A coalesced write's: about ten frames per 10 ms window at 1,000
/// messages a second.
const SOME_IOVECS: usize = 32;

/// Members one thread flushes before the rest are handed to other threads.
const FLUSH_CHUNK: usize = 64;

/// What every connection's writing shares.
pub struct WriterConfig {
    /// At most one write per connection per window while frames keep
    /// coming, and the server is saturated.
    pub coalescing: Coalescing,
    pub metrics: Arc<Metrics>,
}

impl WriterConfig {
    /// A fanout queued `deliveries` frames: opens the window at once when
    /// the load would need more than every core unbatched (see
    /// [`super::demand`]), and counts the opening.
    pub fn note_fanout(&self, deliveries: usize) {
        if self.coalescing.open_on_demand(deliveries) {
            self.window_opened("demand");
        }
    }

    /// Counts a spell of the window opened between samples, `by` what, and
    /// shows its length at once rather than at the next sample.
    pub fn window_opened(&self, by: &'static str) {
        self.metrics.write_window_opened(by);
        self.metrics.write_window_seconds.set(self.coalescing.window().as_secs_f64());
    }
}

/// Writes what `conn` has queued at the end of this round. Called by the
/// pusher that was told `FlushNeeded`.
pub fn flush(conn: &Arc<Connection>) {
    cork::defer_one(conn);
}

/// Writes what every connection in `pending` has queued at the end of this
/// round.
pub fn flush_all(pending: Vec<Arc<Connection>>) {
    cork::defer(pending);
}

/// Flushes every connection in `pending` now, spread over the runtime's
/// threads when there are many: the end of a round.
pub fn flush_spread(mut pending: Vec<Arc<Connection>>) {
    let multi_threaded = Handle::try_current().is_ok_and(|h| h.runtime_flavor() == RuntimeFlavor::MultiThread);
    if multi_threaded {
        while pending.len() > FLUSH_CHUNK {
            let chunk = pending.split_off(pending.len() - FLUSH_CHUNK);
            tokio::spawn(async move { flush_many(&chunk) });
        }
    }
    flush_many(&pending);
}

/// Flushes each connection in turn, counting the writes once at the end:
/// the counters are shared by every thread, and an atomic add per write
/// would bounce their cache line between the cores.
fn flush_many(conns: &[Arc<Connection>]) {
    let Some(first) = conns.first() else {
        return;
    };
    let (mut writes, mut frames) = (0, 0);
    for conn in conns {
        let written = flush_one(conn);
        writes += u64::from(written > 0);
        frames += written as u64;
    }
    first.writer.metrics.writes.inc_by(writes);
    first.writer.metrics.frames_out.inc_by(frames);
}

/// The inline flush of one connection; returns how many frames went out.
fn flush_one(conn: &Arc<Connection>) -> usize {
    let window = conn.writer.coalescing.window();
    let (frames, phase) = match conn.outbox.claim(window) {
        Claim::Nothing => return 0,
        Claim::StartWriter => {
            start_writer(conn);
            return 0;
        }
        Claim::Write(frames, phase) => (frames, phase),
    };
    let mut cursor = Cursor::default();
    let written = write_until_blocked(&conn.socket, &frames, &mut cursor);
    let close_is_out = phase == Phase::Closing && cursor.index == frames.len();
    if written.is_err() || close_is_out {
        conn.outbox.writer_finished();
        conn.finish();
        return cursor.index;
    }
    match conn.outbox.release_inline(cursor.unwritten(frames), window) {
        AfterWrite::Done => {}
        AfterWrite::StartWriter => start_writer(conn),
        AfterWrite::Finish => conn.finish(),
    }
    cursor.index
}

fn start_writer(conn: &Arc<Connection>) {
    tokio::spawn(run_writer(conn.clone()));
}

/// The writer task: waits out a saturated server's window, writes
/// everything queued (waiting for the socket as long as it takes), and ends
/// when the queue ran dry.
async fn run_writer(conn: Arc<Connection>) {
    let mut batch = Frames::new();
    loop {
        let window = conn.writer.coalescing.window();
        if let Some(due) = conn.outbox.writer_due(window) {
            tokio::time::sleep_until(due.into()).await;
        }
        let phase = match conn.outbox.next_for_writer(&mut batch) {
            Next::Retired => return conn.writer_retired(),
            Next::Finish => return conn.finish(),
            Next::Write(phase) => phase,
        };
        // A peer that stopped reading blocks the write until it is aborted.
        let written = tokio::select! {
            written = write_all(&conn.socket, &batch, || conn.outbox.refused()) => written,
            () = conn.writer_aborted() => Err(io::ErrorKind::TimedOut.into()),
        };
        if written.is_err() || phase == Phase::Closing {
            conn.outbox.writer_finished();
            return conn.finish();
        }
        conn.writer.metrics.frames_out.inc_by(batch.len() as u64);
        conn.writer.metrics.writes.inc();
        conn.outbox.wrote(window);
        batch.clear();
    }
}

/// How far a batch has been written: the frame under way, and its bytes out.
#[derive(Default)]
struct Cursor {
    index: usize,
    offset: usize,
}

impl Cursor {
    /// What is left of `frames`, the part-written frame cut to its rest.
    fn unwritten(&self, mut frames: Frames) -> Frames {
        frames.drain(..self.index);
        if let Some(first) = frames.first_mut() {
            *first = first.slice(self.offset..);
        }
        frames
    }
}

/// Writes every frame, waiting for the socket when it is full; calls
/// `refused` once when it first has to wait.
async fn write_all(socket: &TcpStream, frames: &[Bytes], refused: impl FnOnce()) -> io::Result<()> {
    let mut cursor = Cursor::default();
    let mut refused = Some(refused);
    while cursor.index < frames.len() {
        write_until_blocked(socket, frames, &mut cursor)?;
        if cursor.index < frames.len() {
            if let Some(refused) = refused.take() {
                refused();
            }
            std::future::poll_fn(|cx| socket.poll_write_ready(cx)).await?;
        }
    }
    Ok(())
}

/// Writes as much as the socket takes without waiting, as few `sendmsg`
/// calls as the kernel allows. Stops early, without error, when it is full.
fn write_until_blocked(socket: &TcpStream, frames: &[Bytes], cursor: &mut Cursor) -> io::Result<()> {
    while cursor.index < frames.len() {
        match write_some(socket, frames, cursor) {
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(()),
            other => other?,
        }
    }
    Ok(())
}

/// One non-blocking `sendmsg` of what is left, or `send` when that is one
/// frame. The iovecs live only in this synchronous call, never in a future.
/// `sendmsg` rather than `writev`: it skips the file-position lock and the
/// VFS layer, measured 0.4 µs (7%) cheaper per write on loopback. `send`
/// for a single frame, the write of a quiet connection: it spares the
/// kernel copying in a message header and an iovec array, 55-65 ns of a
/// 400 ns loopback write in `write/coalesced/1`.
fn write_some(socket: &TcpStream, frames: &[Bytes], cursor: &mut Cursor) -> io::Result<()> {
    // Most writes carry a few frames: spare them zeroing a 4 KiB iovec
    // array (at 100,000 writes a second that alone is 400 MB/s of memset).
    match frames.len() - cursor.index {
        n if n <= FEW_IOVECS => send_from::<FEW_IOVECS>(socket, frames, cursor),
        n if n <= SOME_IOVECS => send_from::<SOME_IOVECS>(socket, frames, cursor),
        _ => send_from::<MAX_IOVECS>(socket, frames, cursor),
    }
}

fn send_from<const N: usize>(socket: &TcpStream, frames: &[Bytes], cursor: &mut Cursor) -> io::Result<()> {
    let mut iovecs = [IoSlice::new(&[]); N];
    let mut count = 0;
    for (slot, frame) in iovecs.iter_mut().zip(frames.iter().skip(cursor.index)) {
        let skip = if count == 0 { cursor.offset } else { 0 };
        *slot = IoSlice::new(&frame[skip..]);
        count += 1;
    }
    let mut written = socket.try_io(Interest::WRITABLE, || {
        let socket = socket2::SockRef::from(socket);
        if count == 1 {
            // Dereferences to the frame's bytes from the cursor's offset.
            socket.send_with_flags(&iovecs[0], libc::MSG_NOSIGNAL)
        } else {
            socket.send_vectored_with_flags(&iovecs[..count], libc::MSG_NOSIGNAL)
        }
    })?;
    if written == 0 {
        return Err(io::ErrorKind::WriteZero.into());
    }
    // Step past what was written: whole frames, then into a partial one.
    while cursor.index < frames.len() && written >= frames[cursor.index].len() - cursor.offset {
        written -= frames[cursor.index].len() - cursor.offset;
        cursor.index += 1;
        cursor.offset = 0;
    }
    cursor.offset += written;
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::io::Read;
    use std::time::Duration;

    use super::*;
    use crate::conn::outbox::{PushError, Pushed};
    use crate::conn::Setup;

    /// A server-side connection over real loopback TCP, and its peer.
    async fn pair(send_queue: usize, coalesce: Duration) -> (Arc<Connection>, std::net::TcpStream) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let peer = std::net::TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        peer.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let (socket, _) = listener.accept().await.unwrap();
        let writer =
            Arc::new(WriterConfig { coalescing: Coalescing::new(coalesce, 0.0), metrics: Arc::new(Metrics::new()) });
        let setup =
            Setup { id: 1, sub: "test".into(), send_queue, expires_at: u64::MAX, now_ms: 0, writer, deflate: None };
        (Arc::new(Connection::new(socket, setup)), peer)
    }

    fn read_exactly(peer: &mut std::net::TcpStream, len: usize) -> Vec<u8> {
        let mut buf = vec![0; len];
        peer.read_exact(&mut buf).unwrap();
        buf
    }

    #[tokio::test(flavor = "current_thread")]
    async fn a_round_writes_everything_it_queued_in_one_write() {
        let (conn, mut peer) = pair(8, Duration::ZERO).await;
        conn.send(Bytes::from_static(b"hel")).unwrap();
        conn.send(Bytes::from_static(b"lo")).unwrap();
        assert_eq!(conn.writer.metrics.writes.get(), 0, "nothing is written before the round ends");
        cork::round_flushed().await;
        assert_eq!(read_exactly(&mut peer, 5), b"hello");
        assert_eq!(conn.writer.metrics.writes.get(), 1);
        // A quiet connection's next frame leaves with the next round: no window.
        conn.send(Bytes::from_static(b"!")).unwrap();
        cork::round_flushed().await;
        assert_eq!(read_exactly(&mut peer, 1), b"!");
        assert_eq!(conn.writer.metrics.writes.get(), 2);
    }

    #[tokio::test(flavor = "current_thread")]
    async fn a_full_socket_hands_the_rest_to_a_writer_task_that_ends_when_done() {
        let (conn, mut peer) = pair(16, Duration::ZERO).await;
        let big = Bytes::from(vec![7u8; 1 << 20]);
        for _ in 0..8 {
            conn.send(big.clone()).unwrap();
        }
        let reader = tokio::task::spawn_blocking(move || {
            let bytes = read_exactly(&mut peer, 8 << 20);
            assert!(bytes.iter().all(|b| *b == 7));
            peer
        });
        let mut peer = reader.await.unwrap();
        // Once the queue ran dry the writer task ended: a push owes a flush
        // again. Until then, pushes ride along with the writer.
        loop {
            match conn.outbox.push(Bytes::from_static(b"!")).unwrap() {
                Pushed::FlushNeeded => {
                    flush(&conn);
                    cork::round_flushed().await;
                    assert_eq!(read_exactly(&mut peer, 1), b"!");
                    break;
                }
                Pushed::Queued => {
                    let one = tokio::task::spawn_blocking(move || (read_exactly(&mut peer, 1), peer));
                    let (bytes, back) = one.await.unwrap();
                    assert_eq!(bytes, b"!");
                    peer = back;
                }
            }
        }
    }

    #[tokio::test(flavor = "current_thread")]
    async fn frames_inside_an_open_window_leave_together_after_it() {
        let (conn, mut peer) = pair(8, Duration::from_secs(1)).await;
        conn.send(Bytes::from_static(b"a")).unwrap();
        cork::round_flushed().await;
        conn.send(Bytes::from_static(b"b")).unwrap();
        cork::round_flushed().await;
        conn.send(Bytes::from_static(b"c")).unwrap();
        assert_eq!(read_exactly(&mut peer, 1), b"a", "the first is written at the end of its round");
        let rest = tokio::task::spawn_blocking(move || read_exactly(&mut peer, 2));
        assert_eq!(rest.await.unwrap(), b"bc");
        assert_eq!(conn.writer.metrics.writes.get(), 2, "b and c went out in one write");
    }

    #[tokio::test(flavor = "current_thread")]
    async fn batches_of_any_size_go_out_whole_and_in_order() {
        let (conn, mut peer) = pair(8, Duration::ZERO).await;
        // Both sides of each iovec array size, and past the largest.
        let batches: Vec<Vec<Bytes>> = [1, 8, 9, 32, 33, 256, 257, 600]
            .into_iter()
            .map(|n| (0..n).map(|i| Bytes::from(format!("{n}:{i};"))).collect())
            .collect();
        let expected: Vec<u8> = batches.iter().flatten().flat_map(|frame| frame.to_vec()).collect();
        let len = expected.len();
        let reader = tokio::task::spawn_blocking(move || read_exactly(&mut peer, len));
        for batch in &batches {
            write_all(&conn.socket, batch, || {}).await.unwrap();
        }
        assert_eq!(reader.await.unwrap(), expected);
    }

    #[tokio::test(flavor = "current_thread")]
    async fn close_writes_the_close_frame_then_shuts_the_socket() {
        let (conn, mut peer) = pair(8, Duration::from_millis(2)).await;
        assert!(conn.close(1000, "bye"));
        tokio::time::timeout(Duration::from_secs(10), conn.writing_finished()).await.unwrap();
        let mut rest = Vec::new();
        peer.read_to_end(&mut rest).unwrap();
        assert_eq!(rest, crate::ws::close_frame(1000, "bye"));
        assert_eq!(conn.send(Bytes::from_static(b"late")), Err(PushError::Closed));
    }
}
