//! The one task that writes to a connection's socket.
//!
//! It drains everything queued and writes it with vectored writes, so N
//! frames that arrived together cost one `writev`, not N `write`s. Replies,
//! pings and close frames go through the same queue, so frames reach the
//! socket in the order they were queued.

use std::collections::VecDeque;
use std::io::{self, IoSlice};
use std::sync::Arc;

use bytes::Bytes;
use tokio::io::AsyncWriteExt;
use tokio::net::tcp::OwnedWriteHalf;

use super::outbox::Phase;
use super::Connection;
use crate::metrics::Metrics;

/// The most frames handed to one `writev` (Linux allows 1024 iovecs).
const MAX_IOVECS: usize = 256;

/// Writes the connection's frames until it closes or the peer goes away.
pub async fn run(conn: Arc<Connection>, mut socket: OwnedWriteHalf, metrics: Arc<Metrics>) {
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
        }
        // Nothing is queued after a close frame, so once closing, it has been written.
        if phase == Phase::Closing {
            break;
        }
        if frames.is_empty() {
            conn.outbox.changed().await;
        }
    }
    let _ = socket.shutdown().await;
    conn.outbox.kill();
    conn.stop_reader();
}

/// Writes every frame, as few `writev` calls as the kernel allows.
async fn write_all(socket: &mut OwnedWriteHalf, frames: &VecDeque<Bytes>) -> io::Result<()> {
    let mut index = 0;
    let mut offset = 0;
    let mut iovecs = [IoSlice::new(&[]); MAX_IOVECS];
    while index < frames.len() {
        let mut count = 0;
        for (i, frame) in frames.iter().skip(index).take(MAX_IOVECS).enumerate() {
            let skip = if i == 0 { offset } else { 0 };
            iovecs[i] = IoSlice::new(&frame[skip..]);
            count += 1;
        }
        let mut written = socket.write_vectored(&iovecs[..count]).await?;
        if written == 0 {
            return Err(io::ErrorKind::WriteZero.into());
        }
        // Step past what was written: whole frames, then into a partial one.
        while index < frames.len() && written >= frames[index].len() - offset {
            written -= frames[index].len() - offset;
            index += 1;
            offset = 0;
        }
        offset += written;
    }
    Ok(())
}
