//! permessage-deflate (RFC 7692) without a compression window per connection.
//!
//! chorus always negotiates `server_no_context_takeover` and
//! `client_no_context_takeover`: every message is deflated and inflated on
//! its own. That is what lets a room's message be compressed **once** into a
//! frame that every member who negotiated the extension shares, and it means
//! no connection keeps a deflate or inflate state between messages: the
//! (de)compressor is a per-thread scratch object, reset for each message.
//!
//! A client may ask for a smaller server window (`server_max_window_bits`).
//! With no context takeover a back-reference never reaches further than the
//! message's own length, so the shared frame is valid for such a client
//! whenever the payload is no longer than its window; longer messages go to
//! it plain, which RFC 7692 allows at any time. No frame is ever compressed
//! for one connection's window.

use std::cell::RefCell;

use bytes::{Bytes, BytesMut};
use flate2::{Compress, Compression, Decompress, FlushCompress, FlushDecompress, Status};

use super::frame::{header, payload, FIN, RSV1};
use super::opcode;

/// The four bytes a sync flush ends with; RFC 7692 7.2.1 removes them from
/// the wire and the receiver puts them back.
const SYNC_TAIL: [u8; 4] = [0x00, 0x00, 0xFF, 0xFF];

/// The largest window (`max_window_bits`) deflate has: 32 KiB.
pub const MAX_WINDOW_BITS: u8 = 15;

/// Level 6 (zlib's default): on chat-sized JSON it gives nearly all of
/// level 9's ratio for a fraction of the time (docs/BENCHMARKS.md).
const LEVEL: u32 = 6;

thread_local! {
    static DEFLATE: RefCell<Compress> = RefCell::new(Compress::new(Compression::new(LEVEL), false));
    static INFLATE: RefCell<Decompress> = RefCell::new(Decompress::new(false));
}

/// What a connection negotiated, kept by its [`Connection`](crate::conn::Connection).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PeerDeflate {
    /// Payloads shorter than this go plain (`--compression-min-bytes`).
    pub min_bytes: u32,
    /// Payloads longer than this go plain: the client's window (`server_max_window_bits`).
    pub max_input: u32,
}

impl PeerDeflate {
    pub fn new(min_bytes: usize, window_bits: u8) -> Self {
        let min_bytes = u32::try_from(min_bytes).unwrap_or(u32::MAX);
        Self { min_bytes, max_input: 1u32 << window_bits.min(MAX_WINDOW_BITS) }
    }

    /// Whether a payload of `len` bytes goes to this peer compressed.
    pub fn wants(&self, len: usize) -> bool {
        len >= self.min_bytes as usize && len <= self.max_input as usize
    }
}

/// The compressed form of a plain, final, unfragmented text frame built by
/// [`TextFrameBuilder`](super::TextFrameBuilder): same opcode, RSV1 set, the
/// payload deflated with a sync flush and its tail removed. `None` for any
/// other frame (control frames are never compressed) or if deflate failed.
pub fn deflate_frame(frame: &[u8]) -> Option<Bytes> {
    if frame.first() != Some(&(FIN | opcode::TEXT)) {
        return None;
    }
    deflate_text(payload(frame))
}

/// A compressed text frame holding `text`.
pub fn deflate_text(text: &[u8]) -> Option<Bytes> {
    const MAX_HEADER: usize = 10;
    // Incompressible input grows by 5 bytes per stored block; the sync flush
    // adds an empty stored block.
    let mut out = Vec::with_capacity(MAX_HEADER + text.len() + text.len() / 1000 + 64);
    out.resize(MAX_HEADER, 0);
    DEFLATE.with(|cell| {
        let mut z = cell.borrow_mut();
        z.reset();
        loop {
            let consumed = usize::try_from(z.total_in()).ok()?;
            let rest = text.get(consumed..)?;
            z.compress_vec(rest, &mut out, FlushCompress::Sync).ok()?;
            let done = usize::try_from(z.total_in()).ok()? == text.len() && out.len() < out.capacity();
            if done {
                return Some(());
            }
            out.reserve(out.capacity().max(64));
        }
    })?;
    if !out.ends_with(&SYNC_TAIL) {
        return None;
    }
    out.truncate(out.len() - SYNC_TAIL.len());
    let payload_len = out.len() - MAX_HEADER;
    let (head, head_len) = header(FIN | RSV1 | opcode::TEXT, payload_len);
    let start = MAX_HEADER - head_len;
    out[start..MAX_HEADER].copy_from_slice(&head[..head_len]);
    Some(Bytes::from(out).slice(start..))
}

/// Why a compressed message was refused.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum InflateError {
    #[error("inflated message larger than the limit")]
    TooLarge,
    #[error("compressed data does not inflate")]
    Corrupt,
}

/// Inflates one message's payload (the sync tail restored), refusing as soon
/// as the output would pass `max` bytes: a small frame that inflates to
/// gigabytes costs at most `max` bytes of memory.
pub fn inflate(compressed: &[u8], max: usize) -> Result<BytesMut, InflateError> {
    INFLATE.with(|cell| {
        let mut z = cell.borrow_mut();
        z.reset(false);
        let first = (compressed.len().saturating_mul(4)).clamp(256, CHUNK);
        let mut out: Vec<u8> = Vec::with_capacity(first.min(max.saturating_add(1)));
        let ended = match feed(&mut z, compressed, &mut out, max)? {
            Fed::StreamEnd { rest: 0 } => true,
            // Bytes after the final block are not deflate data.
            Fed::StreamEnd { .. } => return Err(InflateError::Corrupt),
            Fed::AllUsed => false,
        };
        // After a final block the restored tail is not part of the stream.
        if !ended {
            feed(&mut z, &SYNC_TAIL, &mut out, max)?;
        }
        Ok(BytesMut::from(&out[..]))
    })
}

/// How much the output grows at a time.
const CHUNK: usize = 16 * 1024;

enum Fed {
    AllUsed,
    StreamEnd { rest: usize },
}

/// Inflates `input` into `out`, whose capacity never passes `max + 1`.
fn feed(z: &mut Decompress, input: &[u8], out: &mut Vec<u8>, max: usize) -> Result<Fed, InflateError> {
    let mut used = 0;
    loop {
        if out.len() == out.capacity() {
            let room = out.capacity().clamp(256, CHUNK).min(max.saturating_add(1) - out.len());
            out.reserve_exact(room);
        }
        let (in_before, out_before) = (z.total_in(), out.len());
        let rest = input.get(used..).unwrap_or_default();
        let status = z.decompress_vec(rest, out, FlushDecompress::None).map_err(|_| InflateError::Corrupt)?;
        let took = usize::try_from(z.total_in() - in_before).map_err(|_| InflateError::Corrupt)?;
        used += took;
        if out.len() > max {
            return Err(InflateError::TooLarge);
        }
        if status == Status::StreamEnd {
            return Ok(Fed::StreamEnd { rest: input.len() - used });
        }
        // Inflate stops when the input runs out or the output is full.
        if used == input.len() && out.len() < out.capacity() {
            return Ok(Fed::AllUsed);
        }
        if took == 0 && out.len() == out_before && out.len() < out.capacity() {
            return Err(InflateError::Corrupt);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ws::TextFrameBuilder;

    fn plain(text: &[u8]) -> Bytes {
        let mut b = TextFrameBuilder::with_capacity(text.len());
        b.buf().extend_from_slice(text);
        b.finish()
    }

    fn chat(n: usize) -> Vec<u8> {
        let mut s = String::new();
        for i in 0..n {
            s.push_str(&format!(r#"{{"type":"message","room":"lobby","seq":{i},"from":"alice","body":"hello"}}"#));
        }
        s.into_bytes()
    }

    #[test]
    fn round_trip_and_rsv1() {
        for text in [chat(1), chat(10), chat(2000), vec![], b"x".to_vec()] {
            let frame = deflate_frame(&plain(&text)).unwrap();
            assert_eq!(frame[0], 0xC1, "FIN, RSV1, text");
            let inflated = inflate(payload(&frame), 1 << 20).unwrap();
            assert_eq!(&inflated[..], &text[..]);
        }
        assert!(deflate_frame(&plain(&chat(10))).unwrap().len() < chat(10).len() / 3);
    }

    #[test]
    fn control_frames_are_not_compressed() {
        assert_eq!(deflate_frame(&crate::ws::pong_frame(b"hi")), None);
        assert_eq!(deflate_frame(&crate::ws::close_frame(1000, "")), None);
    }

    #[test]
    fn incompressible_data_round_trips() {
        let mut x: u32 = 1;
        let noise: Vec<u8> = (0..100_000)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 17;
                x ^= x << 5;
                x as u8
            })
            .collect();
        let frame = deflate_text(&noise).unwrap();
        assert_eq!(&inflate(payload(&frame), noise.len()).unwrap()[..], &noise[..]);
    }

    #[test]
    fn the_limit_applies_to_the_inflated_size() {
        let big = vec![b'a'; 1 << 20];
        let frame = deflate_text(&big).unwrap();
        assert!(payload(&frame).len() < 2048);
        assert_eq!(inflate(payload(&frame), (1 << 20) - 1), Err(InflateError::TooLarge));
        assert_eq!(inflate(payload(&frame), 1 << 20).unwrap().len(), 1 << 20);
    }

    #[test]
    fn garbage_does_not_inflate() {
        assert_eq!(inflate(&[0xFF, 0xFF, 0xFF, 0xFF, 0x00], 1024), Err(InflateError::Corrupt));
        // A final stored block followed by more bytes.
        assert_eq!(inflate(&[0x01, 0x01, 0x00, 0xFE, 0xFF, b'a', b'b', b'c'], 1024), Err(InflateError::Corrupt));
        // A valid final block alone is fine.
        assert_eq!(&inflate(&[0x01, 0x01, 0x00, 0xFE, 0xFF, b'a'], 1024).unwrap()[..], b"a");
    }

    #[test]
    fn peer_limits() {
        let p = PeerDeflate::new(256, 9);
        assert!(!p.wants(255));
        assert!(p.wants(256));
        assert!(p.wants(512));
        assert!(!p.wants(513));
        assert_eq!(PeerDeflate::new(0, 15).max_input, 32 * 1024);
    }
}
