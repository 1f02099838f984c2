//! The server's half of the closing handshake (RFC 6455 section 7.1.1): once
//! the server has sent its close frame, it keeps reading, and discarding,
//! what the client still sends until the client's own close frame or the end
//! of the stream, within a time bound and a byte bound.
//!
//! Why: a socket closed with unread bytes in its receive queue makes the
//! kernel answer with a reset instead of a FIN. A client still writing (the
//! rest of a message the server refused as too large, the tail of a flood)
//! then fails on that reset, and a browser reports 1006 with no reason
//! instead of the close code the server sent. Draining until the client has
//! answered lets every client read the server's close frame.
//!
//! Nothing is kept while draining: whole frames are skipped by their
//! headers, and bytes are read into a scratch buffer on the stack of the
//! poll, so a lingering connection holds a few dozen bytes of state and an
//! open connection holds nothing more than before.

use std::future::Future;
use std::task::{ready, Context, Poll};
use std::time::Duration;

use bytes::BytesMut;
use tokio::net::TcpStream;

use super::opcode;

/// How much one read takes off the socket: on the stack of one poll only.
const SCRATCH: usize = 8 * 1024;

/// The longest frame header: 2 bytes, an 8-byte length, a 4-byte mask.
const MAX_HEADER: usize = 14;

/// How long and how much the server drains before it drops the connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Bounds {
    /// From the start of the drain.
    pub time: Duration,
    /// Bytes read off the socket during the drain, past those already buffered.
    pub bytes: u64,
}

impl Bounds {
    /// Two seconds and 16 MiB: enough for any client to finish writing a
    /// message of several megabytes over a real network and send its close,
    /// little enough that a client that never stops costs the server only a
    /// short, cheap read loop (no unmasking, no buffer) before it is cut.
    pub const DEFAULT: Bounds = Bounds { time: Duration::from_secs(2), bytes: 16 * 1024 * 1024 };
}

/// How a drain ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Ended {
    /// The client sent its close frame: the handshake is complete.
    ClientClose,
    /// The client closed the stream (FIN).
    Eof,
    /// Reading failed, e.g. the client reset the connection.
    Failed,
    /// The client went on past the time bound.
    TimeBound,
    /// The client went on past the byte bound.
    ByteBound,
}

impl Ended {
    /// The `ended` label of the `chorus_close_lingers_total` metric.
    pub fn label(self) -> &'static str {
        match self {
            Ended::ClientClose => "client_close",
            Ended::Eof => "eof",
            Ended::Failed => "error",
            Ended::TimeBound => "time_bound",
            Ended::ByteBound => "byte_bound",
        }
    }

    /// Whether the drain was cut at a bound while the client was still sending.
    pub fn cut(self) -> bool {
        matches!(self, Ended::TimeBound | Ended::ByteBound)
    }
}

/// Drains `stream` within `bounds`. `buffered` holds the bytes the frame
/// reader had read but not yet used; they start at a frame boundary (the
/// reader consumes whole frames only), even when the frame there is the one
/// that made the server close.
/// They are let go before the first wait.
pub async fn drain(stream: &TcpStream, buffered: BytesMut, bounds: Bounds) -> Ended {
    let mut skipper = Skipper::default();
    let closed = skipper.feed(&buffered);
    drop(buffered);
    if closed {
        return Ended::ClientClose;
    }
    let mut read = 0u64;
    let reading = std::future::poll_fn(|cx| poll_drain(cx, stream, &mut skipper, &mut read, bounds.bytes));
    timeout(bounds.time, reading).await
}

async fn timeout(limit: Duration, reading: impl Future<Output = Ended>) -> Ended {
    tokio::time::timeout(limit, reading).await.unwrap_or(Ended::TimeBound)
}

/// Reads and skips until the client's close, the end of the stream or the
/// byte bound. The read loop yields to the scheduler by itself: socket
/// readiness counts against tokio's cooperative budget.
fn poll_drain(
    cx: &mut Context<'_>,
    stream: &TcpStream,
    skipper: &mut Skipper,
    read: &mut u64,
    max_bytes: u64,
) -> Poll<Ended> {
    loop {
        if ready!(stream.poll_read_ready(cx)).is_err() {
            return Poll::Ready(Ended::Failed);
        }
        let mut scratch = [0u8; SCRATCH];
        match stream.try_read(&mut scratch) {
            Ok(0) => return Poll::Ready(Ended::Eof),
            Ok(n) => {
                if skipper.feed(&scratch[..n]) {
                    return Poll::Ready(Ended::ClientClose);
                }
                *read += n as u64;
                if *read > max_bytes {
                    return Poll::Ready(Ended::ByteBound);
                }
            }
            // Readiness was stale: poll again, which registers the waker.
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
            Err(_) => return Poll::Ready(Ended::Failed),
        }
    }
}

/// Follows frame boundaries through a byte stream without keeping any
/// payload: it collects one header at a time, then skips the payload it
/// announces. It reads the header's shape only (lengths and mask bit), never
/// its validity: the frame that made the server close may be one with
/// reserved bits set or no mask, and the stream goes on after it all the same.
#[derive(Default)]
struct Skipper {
    header: [u8; MAX_HEADER],
    have: usize,
    /// Payload bytes of the current frame still to skip.
    skip: u64,
}

impl Skipper {
    /// Takes the next bytes of the stream; true once a close frame's header
    /// has gone by (its payload is of no use to a connection that is ending).
    fn feed(&mut self, mut bytes: &[u8]) -> bool {
        loop {
            if self.skip > 0 {
                let n = usize::try_from(self.skip).unwrap_or(usize::MAX).min(bytes.len());
                self.skip -= n as u64;
                bytes = &bytes[n..];
            }
            if bytes.is_empty() {
                return false;
            }
            let need = self.header_len().unwrap_or(2);
            let take = (need - self.have).min(bytes.len());
            self.header[self.have..self.have + take].copy_from_slice(&bytes[..take]);
            self.have += take;
            bytes = &bytes[take..];
            // The first two bytes tell the header's full length: look again.
            let Some(need) = self.header_len() else { continue };
            if self.have < need {
                continue;
            }
            if self.header[0] & 0x0F == opcode::CLOSE {
                return true;
            }
            self.skip = self.payload_len();
            self.have = 0;
        }
    }

    /// The current header's length, once its first two bytes are in.
    fn header_len(&self) -> Option<usize> {
        if self.have < 2 {
            return None;
        }
        let extended = match self.header[1] & 0x7F {
            126 => 2,
            127 => 8,
            _ => 0,
        };
        let mask = if self.header[1] & 0x80 != 0 { 4 } else { 0 };
        Some(2 + extended + mask)
    }

    /// The payload length of the complete header held.
    fn payload_len(&self) -> u64 {
        match self.header[1] & 0x7F {
            126 => u64::from(u16::from_be_bytes([self.header[2], self.header[3]])),
            127 => {
                let mut len = [0; 8];
                len.copy_from_slice(&self.header[2..10]);
                u64::from_be_bytes(len)
            }
            n => u64::from(n),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(opcode: u8, payload_len: usize, masked: bool) -> Vec<u8> {
        let mask_bit = if masked { 0x80 } else { 0 };
        let mut f = vec![0x80 | opcode];
        match payload_len {
            n if n < 126 => f.push(mask_bit | n as u8),
            n if n < 65536 => {
                f.push(mask_bit | 126);
                f.extend_from_slice(&(n as u16).to_be_bytes());
            }
            n => {
                f.push(mask_bit | 127);
                f.extend_from_slice(&(n as u64).to_be_bytes());
            }
        }
        if masked {
            f.extend_from_slice(&[1, 2, 3, 4]);
        }
        // Payload bytes that look like a close header if misread as one.
        f.extend(std::iter::repeat_n(0x88, payload_len));
        f
    }

    #[test]
    fn skips_frames_of_every_length_until_the_close() {
        let mut stream = Vec::new();
        for len in [0, 5, 125, 126, 300, 65535, 65536, 200_000] {
            stream.extend(frame(opcode::TEXT, len, true));
        }
        stream.extend(frame(opcode::CLOSE, 2, true));
        assert!(Skipper::default().feed(&stream));
        // The close is found however the stream is cut into reads.
        for chunk in [1, 2, 3, 7, 13, 4096] {
            let mut skipper = Skipper::default();
            let found = stream.chunks(chunk).position(|c| skipper.feed(c));
            // The close's 6-byte header ends 2 bytes before the stream does.
            assert_eq!(found, Some((stream.len() - 3) / chunk), "chunks of {chunk}");
        }
    }

    #[test]
    fn no_close_means_no_end() {
        let mut stream = frame(opcode::TEXT, 70_000, true);
        stream.extend(frame(opcode::PING, 3, true));
        stream.extend(frame(opcode::BINARY, 10, true));
        assert!(!Skipper::default().feed(&stream));
    }

    #[test]
    fn broken_frames_are_still_followed() {
        // Unmasked, reserved bits set, unknown opcode: the shapes that made
        // the server send 1002, followed by the client's close.
        let mut rsv = frame(opcode::TEXT, 10, true);
        rsv[0] |= 0x70;
        let mut stream = frame(opcode::TEXT, 300, false);
        stream.extend(rsv);
        stream.extend(frame(0x3, 4, true));
        stream.extend(frame(opcode::CLOSE, 0, true));
        assert!(Skipper::default().feed(&stream));
    }

    #[test]
    fn a_huge_announced_length_is_skipped_without_memory() {
        let mut head = vec![0x81, 0x80 | 127];
        head.extend_from_slice(&u64::MAX.to_be_bytes());
        head.extend_from_slice(&[1, 2, 3, 4]);
        let mut skipper = Skipper::default();
        assert!(!skipper.feed(&head));
        assert!(!skipper.feed(&frame(opcode::CLOSE, 0, true)));
        assert_eq!(skipper.skip, u64::MAX - 6);
    }

    #[test]
    fn the_drain_state_is_small() {
        assert!(std::mem::size_of::<Skipper>() <= 32);
    }
}
