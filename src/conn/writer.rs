//! The one task that writes to a connection's socket.
//!
//! It drains everything queued and writes it with vectored writes, so N
//! frames that arrived together cost one `writev`, not N `write`s. A busy
//! connection writes at most once per `coalesce` window: frames that arrive
//! meanwhile wait for the window's end and leave together (at 1,000 messages
//! a second, a 2 ms window makes one write of two frames instead of two
//! writes). A connection that has been quiet for a window writes at once,
//! so a slow room pays no latency for it. Replies, pings and close frames
//! go through the same queue, so frames reach the socket in queue order.

use std::collections::VecDeque;
use std::io::{self, IoSlice};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use tokio::io::AsyncWriteExt;
use tokio::net::tcp::OwnedWriteHalf;
use tokio::time::Instant;

use super::outbox::Phase;
use super::Connection;
use crate::metrics::Metrics;

/// The most frames handed to one `writev` (Linux allows 1024 iovecs).
const MAX_IOVECS: usize = 256;

/// Writes the connection's frames until it closes or the peer goes away.
pub async fn run(conn: Arc<Connection>, mut socket: OwnedWriteHalf, coalesce: Duration, metrics: Arc<Metrics>) {
    let mut last_write: Option<Instant> = None;
    loop {
        let (frames, phase) = conn.outbox.take();
        if phase == Phase::Dead {
            break;
        }
        if !frames.is_empty() {
            // A peer that stopped reading blocks the write until it is aborted.
            let written = tokio::select! {
                written = write_all(&mut socket, &frames) => written,
                () = conn.writer_aborted() => Err(io::ErrorKind::TimedOut.into()),
            };
            if written.is_err() {
                break;
            }
            metrics.frames_out.inc_by(frames.len() as u64);
            metrics.writes.inc();
            last_write = Some(Instant::now());
        }
        // Nothing is queued after a close frame, so once closing, it has been written.
        if phase == Phase::Closing {
            break;
        }
        if frames.is_empty() {
            conn.outbox.changed().await;
            if let Some(due) = last_write.map(|at| at + coalesce).filter(|due| *due > Instant::now()) {
                // Boxed: only busy connections pay for a timer.
                Box::pin(tokio::time::sleep_until(due)).await;
            }
        }
    }
    let _ = socket.shutdown().await;
    conn.outbox.kill();
    conn.stop_reader();
}

/// How far a batch has been written: the frame under way, and its bytes out.
struct Cursor {
    index: usize,
    offset: usize,
}

/// Writes every frame, as few `writev` calls as the kernel allows.
async fn write_all(socket: &mut OwnedWriteHalf, frames: &VecDeque<Bytes>) -> io::Result<()> {
    let mut cursor = Cursor { index: 0, offset: 0 };
    while cursor.index < frames.len() {
        match write_some(socket, frames, &mut cursor) {
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                std::future::poll_fn(|cx| socket.as_ref().poll_write_ready(cx)).await?
            }
            other => other?,
        }
    }
    Ok(())
}

/// One non-blocking `writev` of what is left. The iovecs live only in this
/// synchronous call, never in the writer's future: an idle connection's
/// writer stays a few hundred bytes.
fn write_some(socket: &OwnedWriteHalf, frames: &VecDeque<Bytes>, cursor: &mut Cursor) -> io::Result<()> {
    let mut iovecs = [IoSlice::new(&[]); MAX_IOVECS];
    let mut count = 0;
    for (slot, frame) in iovecs.iter_mut().zip(frames.iter().skip(cursor.index)) {
        let skip = if count == 0 { cursor.offset } else { 0 };
        *slot = IoSlice::new(&frame[skip..]);
        count += 1;
    }
    let mut written = socket.try_write_vectored(&iovecs[..count])?;
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
