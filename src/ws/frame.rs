//! Encoding server-to-client frames.
//!
//! Server frames are never masked, so a frame is the same bytes for every
//! recipient: it is built once into `Bytes` and each member's queue holds a
//! refcounted clone. [`TextFrameBuilder`] writes the JSON payload after ten
//! spare bytes and then puts the header right in front of it, so a frame costs
//! one allocation and no copy.

use super::opcode;
use bytes::Bytes;

/// Room for the longest header of an unmasked frame (2 + 8 length bytes).
const MAX_HEADER: usize = 10;

pub(super) const FIN: u8 = 0x80;
/// Set on the first frame of a compressed message (RFC 7692).
pub(super) const RSV1: u8 = 0x40;

/// Builds one text frame: write the payload into [`buf`](Self::buf), then
/// [`finish`](Self::finish).
pub struct TextFrameBuilder {
    buf: Vec<u8>,
}

impl TextFrameBuilder {
    /// `payload_hint` is the expected payload size, to allocate once.
    pub fn with_capacity(payload_hint: usize) -> Self {
        let mut buf = Vec::with_capacity(MAX_HEADER + payload_hint);
        buf.resize(MAX_HEADER, 0);
        Self { buf }
    }

    /// The payload written so far; append to it.
    pub fn buf(&mut self) -> &mut Vec<u8> {
        &mut self.buf
    }

    /// Puts the header in front of the payload and returns the whole frame.
    pub fn finish(self) -> Bytes {
        let mut buf = self.buf;
        let payload_len = buf.len() - MAX_HEADER;
        let (header, header_len) = header(FIN | opcode::TEXT, payload_len);
        let start = MAX_HEADER - header_len;
        buf[start..MAX_HEADER].copy_from_slice(&header[..header_len]);
        Bytes::from(buf).slice(start..)
    }
}

/// A text frame around `payload` (one copy, for payloads that arrive as
/// bytes, such as messages from Redis).
pub fn text_frame(payload: &[u8]) -> Bytes {
    let mut builder = TextFrameBuilder::with_capacity(payload.len());
    builder.buf().extend_from_slice(payload);
    builder.finish()
}

/// The header of an unmasked frame with the given first byte and payload length.
pub(super) fn header(first: u8, len: usize) -> ([u8; MAX_HEADER], usize) {
    let mut h = [0; MAX_HEADER];
    h[0] = first;
    if len < 126 {
        h[1] = len as u8;
        (h, 2)
    } else if let Ok(short) = u16::try_from(len) {
        h[1] = 126;
        h[2..4].copy_from_slice(&short.to_be_bytes());
        (h, 4)
    } else {
        h[1] = 127;
        h[2..10].copy_from_slice(&(len as u64).to_be_bytes());
        (h, 10)
    }
}

/// The payload of a frame built by this module (its header skipped).
pub fn payload(frame: &[u8]) -> &[u8] {
    let header_len = match frame.get(1).map(|b| b & 0x7F) {
        Some(126) => 4,
        Some(127) => 10,
        _ => 2,
    };
    frame.get(header_len..).unwrap_or_default()
}

fn control(op: u8, payload: &[u8]) -> Bytes {
    // Control payloads are at most 125 bytes (RFC 6455 5.5); callers keep to it.
    let payload = &payload[..payload.len().min(125)];
    let (header, header_len) = header(FIN | op, payload.len());
    let mut frame = Vec::with_capacity(header_len + payload.len());
    frame.extend_from_slice(&header[..header_len]);
    frame.extend_from_slice(payload);
    Bytes::from(frame)
}

/// A close frame with a status code and a short reason.
pub fn close_frame(code: u16, reason: &str) -> Bytes {
    let mut payload = code.to_be_bytes().to_vec();
    // A reason is cut at a character boundary so the payload stays UTF-8.
    let mut end = reason.len().min(123);
    while !reason.is_char_boundary(end) {
        end -= 1;
    }
    payload.extend_from_slice(&reason.as_bytes()[..end]);
    control(opcode::CLOSE, &payload)
}

/// The server's keep-alive ping: empty, and the same bytes every time.
pub fn ping_frame() -> Bytes {
    static PING: [u8; 2] = [FIN | opcode::PING, 0];
    Bytes::from_static(&PING)
}

/// The answer to a client's ping, echoing its payload.
pub fn pong_frame(payload: &[u8]) -> Bytes {
    control(opcode::PONG, payload)
}

#[cfg(test)]
mod props;

#[cfg(test)]
mod tests {
    use super::*;

    fn text(payload: &[u8]) -> Bytes {
        let mut b = TextFrameBuilder::with_capacity(payload.len());
        b.buf().extend_from_slice(payload);
        b.finish()
    }

    #[test]
    fn short_text_frame_has_two_byte_header() {
        let f = text(b"{}");
        assert_eq!(&f[..], &[0x81, 2, b'{', b'}']);
        assert_eq!(payload(&f), b"{}");
    }

    #[test]
    fn medium_and_long_lengths_use_extended_fields() {
        let f = text(&[b'a'; 300]);
        assert_eq!(&f[..4], &[0x81, 126, 1, 44]);
        assert_eq!(payload(&f).len(), 300);
        let f = text(&vec![b'a'; 70_000]);
        assert_eq!(f[1], 127);
        assert_eq!(&f[2..10], &70_000u64.to_be_bytes());
        assert_eq!(payload(&f).len(), 70_000);
    }

    #[test]
    fn boundary_lengths() {
        assert_eq!(text(&[b'a'; 125])[1], 125);
        assert_eq!(text(&[b'a'; 126])[1], 126);
        assert_eq!(text(&vec![b'a'; 65_535])[1], 126);
        assert_eq!(text(&vec![b'a'; 65_536])[1], 127);
    }

    #[test]
    fn control_frames() {
        assert_eq!(&close_frame(1013, "slow consumer")[..4], &[0x88, 15, 0x03, 0xF5]);
        assert_eq!(&ping_frame()[..], &[0x89, 0]);
        assert_eq!(&pong_frame(b"hi")[..], &[0x8A, 2, b'h', b'i']);
        let long_reason = "é".repeat(100);
        let close = close_frame(1000, &long_reason);
        assert!(close.len() <= 127);
        assert!(std::str::from_utf8(&close[4..]).is_ok());
    }
}
