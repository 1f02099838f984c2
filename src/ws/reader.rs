//! Reading client frames: unmasking, reassembling fragments, enforcing the
//! message-size limit, and holding no memory while the connection is idle.
//!
//! An idle connection is the common case for a fanout server, so between
//! frames the reader drops its buffer and waits for readiness; it allocates a
//! read buffer only when bytes are there to read.

use super::deflate::{self, InflateError};
use super::opcode;
use std::task::{ready, Context, Poll};

use bytes::{Buf, Bytes, BytesMut};
use tokio::net::TcpStream;

/// How much to read at once when a frame starts.
const READ_CHUNK: usize = 4096;

/// A complete message or control frame from the client.
#[derive(Debug, PartialEq, Eq)]
pub enum Incoming {
    /// A whole text message, valid UTF-8.
    Text(Bytes),
    /// A whole binary message; chorus has no use for its content.
    Binary,
    Ping(Bytes),
    Pong,
    /// The client's close, with its status code when it sent one.
    Close(Option<u16>),
}

/// Why reading stopped. Each variant knows the close code it deserves.
#[derive(Debug, thiserror::Error)]
pub enum ReadError {
    #[error("connection closed by peer")]
    Eof,
    #[error("read failed: {0}")]
    Io(#[from] std::io::Error),
    #[error("protocol error: {0}")]
    Protocol(&'static str),
    #[error("text message is not valid UTF-8")]
    InvalidUtf8,
    #[error("message too large")]
    TooLarge,
    #[error("compressed message does not inflate")]
    BadCompression,
}

impl ReadError {
    /// The close frame to send for this error, if the socket still works.
    pub fn close(&self) -> Option<(u16, &'static str)> {
        match self {
            ReadError::Eof | ReadError::Io(_) => None,
            ReadError::Protocol(why) => Some((1002, why)),
            ReadError::InvalidUtf8 => Some((1007, "invalid utf-8")),
            ReadError::TooLarge => Some((1009, "message too large")),
            ReadError::BadCompression => Some((1007, "invalid compressed data")),
        }
    }
}

/// A message being reassembled from fragments.
struct Partial {
    text: bool,
    /// The message is permessage-deflate compressed (RSV1 on its first frame).
    compressed: bool,
    data: BytesMut,
}

/// Turns the bytes of one connection into [`Incoming`] frames.
pub struct FrameReader {
    buf: BytesMut,
    max_message: usize,
    /// permessage-deflate was negotiated: RSV1 marks a compressed message.
    inflate: bool,
    /// Boxed: rare, and the reader lives in every connection's future.
    partial: Option<Box<Partial>>,
}

impl FrameReader {
    /// `initial` holds bytes already read past the HTTP upgrade request;
    /// `inflate` says whether the upgrade negotiated permessage-deflate.
    pub fn new(initial: &[u8], max_message: usize, inflate: bool) -> Self {
        Self { buf: BytesMut::from(initial), max_message, inflate, partial: None }
    }

    /// Hands over the bytes read but not yet used, and drops any message
    /// half reassembled: the connection is closing. The bytes start at a
    /// frame boundary, since frames leave the buffer whole.
    pub fn take_buffered(&mut self) -> BytesMut {
        self.partial = None;
        std::mem::take(&mut self.buf)
    }

    /// Reads until a whole frame is there.
    pub async fn next(&mut self, stream: &TcpStream) -> Result<Incoming, ReadError> {
        std::future::poll_fn(|cx| self.poll_next(cx, stream)).await
    }

    /// Polls for the next whole frame. A poll function rather than an async
    /// one: the caller's future holds no state of its own for the wait,
    /// which every idle connection would carry.
    ///
    /// Between frames the buffer is let go and the wait is for readiness
    /// only: `poll_read_ready` keeps the waker in the socket's own slot.
    pub fn poll_next(&mut self, cx: &mut Context<'_>, stream: &TcpStream) -> Poll<Result<Incoming, ReadError>> {
        loop {
            if let Some(incoming) = self.parse()? {
                return Poll::Ready(Ok(incoming));
            }
            let idle = self.buf.is_empty();
            if idle {
                self.buf = BytesMut::new();
            }
            ready!(stream.poll_read_ready(cx))?;
            self.buf.reserve(READ_CHUNK);
            match stream.try_read_buf(&mut self.buf) {
                Ok(0) => return Poll::Ready(Err(ReadError::Eof)),
                Ok(_) => {}
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    if idle {
                        self.buf = BytesMut::new();
                    }
                }
                Err(e) => return Poll::Ready(Err(e.into())),
            }
        }
    }

    /// Takes one frame off the buffer, or `None` when more bytes are needed.
    fn parse(&mut self) -> Result<Option<Incoming>, ReadError> {
        loop {
            let Some(head) = FrameHead::parse(&self.buf)? else {
                return Ok(None);
            };
            // RSV1 marks the first frame of a compressed message, and only
            // once the extension was negotiated (RFC 7692 6).
            let data_start = matches!(head.opcode, opcode::TEXT | opcode::BINARY);
            if head.rsv1 && !(self.inflate && data_start) {
                return Err(ReadError::Protocol("reserved bits set"));
            }
            self.check_size(&head)?;
            let total = head.header_len + head.payload_len;
            if self.buf.len() < total {
                self.buf.reserve(total - self.buf.len());
                return Ok(None);
            }
            self.buf.advance(head.header_len);
            let mut payload = self.buf.split_to(head.payload_len);
            fastwebsockets::unmask(&mut payload, head.mask);
            if let Some(incoming) = self.accept(&head, payload)? {
                return Ok(Some(incoming));
            }
        }
    }

    fn check_size(&self, head: &FrameHead) -> Result<(), ReadError> {
        if head.opcode & 0x8 != 0 {
            return Ok(());
        }
        let so_far = self.partial.as_ref().map_or(0, |p| p.data.len());
        let compressed = self.partial.as_ref().map_or(head.rsv1, |p| p.compressed);
        // A compressed message is held to the limit once inflated; on the
        // wire it may be a little larger than its text if incompressible.
        let limit = match compressed {
            true => self.max_message.saturating_add(self.max_message / 64).saturating_add(64),
            false => self.max_message,
        };
        if so_far.saturating_add(head.payload_len) > limit {
            return Err(ReadError::TooLarge);
        }
        Ok(())
    }

    /// Interprets one unmasked frame; `None` while a fragmented message is incomplete.
    fn accept(&mut self, head: &FrameHead, payload: BytesMut) -> Result<Option<Incoming>, ReadError> {
        let fin = head.fin;
        match head.opcode {
            opcode::TEXT | opcode::BINARY => {
                if self.partial.is_some() {
                    return Err(ReadError::Protocol("expected a continuation frame"));
                }
                let text = head.opcode == opcode::TEXT;
                let compressed = head.rsv1;
                if fin {
                    return self.complete(text, compressed, payload).map(Some);
                }
                self.partial = Some(Box::new(Partial { text, compressed, data: payload }));
                Ok(None)
            }
            opcode::CONTINUATION => {
                let Some(mut partial) = self.partial.take() else {
                    return Err(ReadError::Protocol("continuation frame without a message"));
                };
                partial.data.extend_from_slice(&payload);
                if fin {
                    return self.complete(partial.text, partial.compressed, partial.data).map(Some);
                }
                self.partial = Some(partial);
                Ok(None)
            }
            opcode::CLOSE => close_code(&payload).map(|code| Some(Incoming::Close(code))),
            opcode::PING => Ok(Some(Incoming::Ping(payload.freeze()))),
            opcode::PONG => Ok(Some(Incoming::Pong)),
            _ => Err(ReadError::Protocol("unknown opcode")),
        }
    }
}

impl FrameReader {
    /// A whole message: inflated if compressed (within the size limit),
    /// then checked as UTF-8 if text.
    fn complete(&self, text: bool, compressed: bool, data: BytesMut) -> Result<Incoming, ReadError> {
        let data = match compressed {
            true => deflate::inflate(&data, self.max_message).map_err(|e| match e {
                InflateError::TooLarge => ReadError::TooLarge,
                InflateError::Corrupt => ReadError::BadCompression,
            })?,
            false => data,
        };
        complete(text, data)
    }
}

fn complete(text: bool, data: BytesMut) -> Result<Incoming, ReadError> {
    if !text {
        return Ok(Incoming::Binary);
    }
    if std::str::from_utf8(&data).is_err() {
        return Err(ReadError::InvalidUtf8);
    }
    Ok(Incoming::Text(data.freeze()))
}

/// The status code of a close frame, checked as RFC 6455 7.4 requires.
fn close_code(payload: &[u8]) -> Result<Option<u16>, ReadError> {
    match payload {
        [] => Ok(None),
        [_] => Err(ReadError::Protocol("close frame with a one-byte payload")),
        [hi, lo, reason @ ..] => {
            let code = u16::from_be_bytes([*hi, *lo]);
            let allowed = matches!(code, 1000..=1003 | 1007..=1014 | 3000..=4999);
            if !allowed {
                return Err(ReadError::Protocol("invalid close code"));
            }
            if std::str::from_utf8(reason).is_err() {
                return Err(ReadError::InvalidUtf8);
            }
            Ok(Some(code))
        }
    }
}

/// The fixed part of a frame, once enough bytes are there to read it.
struct FrameHead {
    fin: bool,
    rsv1: bool,
    opcode: u8,
    mask: [u8; 4],
    header_len: usize,
    payload_len: usize,
}

impl FrameHead {
    fn parse(buf: &[u8]) -> Result<Option<Self>, ReadError> {
        let [b0, b1, ..] = *buf else {
            return Ok(None);
        };
        let fin = b0 & 0x80 != 0;
        let opcode = b0 & 0x0F;
        // RSV1 belongs to permessage-deflate (checked by the reader); no
        // extension uses RSV2 or RSV3.
        if b0 & 0x30 != 0 {
            return Err(ReadError::Protocol("reserved bits set"));
        }
        let rsv1 = b0 & 0x40 != 0;
        if b1 & 0x80 == 0 {
            return Err(ReadError::Protocol("client frames must be masked"));
        }
        let extended = match b1 & 0x7F {
            126 => 2,
            127 => 8,
            _ => 0,
        };
        let header_len = 2 + extended + 4;
        if buf.len() < header_len {
            return Ok(None);
        }
        let payload_len = match extended {
            0 => usize::from(b1 & 0x7F),
            2 => usize::from(u16::from_be_bytes([buf[2], buf[3]])),
            _ => {
                let mut len = [0; 8];
                len.copy_from_slice(&buf[2..10]);
                usize::try_from(u64::from_be_bytes(len)).unwrap_or(usize::MAX)
            }
        };
        if opcode & 0x8 != 0 && (!fin || payload_len > 125) {
            return Err(ReadError::Protocol("control frames must be whole and at most 125 bytes"));
        }
        let mut mask = [0; 4];
        mask.copy_from_slice(&buf[header_len - 4..header_len]);
        Ok(Some(Self { fin, rsv1, opcode, mask, header_len, payload_len }))
    }
}

#[cfg(test)]
mod props;

#[cfg(test)]
mod tests {
    use super::*;

    /// A masked client frame, as a browser would send it.
    fn client_frame(fin: bool, opcode: u8, payload: &[u8]) -> Vec<u8> {
        let mask = [1, 2, 3, 4];
        let mut f = vec![(u8::from(fin) << 7) | opcode];
        match payload.len() {
            n if n < 126 => f.push(0x80 | n as u8),
            n if n < 65536 => {
                f.push(0x80 | 126);
                f.extend_from_slice(&(n as u16).to_be_bytes());
            }
            n => {
                f.push(0x80 | 127);
                f.extend_from_slice(&(n as u64).to_be_bytes());
            }
        }
        f.extend_from_slice(&mask);
        f.extend(payload.iter().enumerate().map(|(i, b)| b ^ mask[i % 4]));
        f
    }

    fn reader_with(bytes: &[u8], max: usize) -> FrameReader {
        FrameReader::new(bytes, max, false)
    }

    #[test]
    fn text_frame_is_unmasked() {
        let mut r = reader_with(&client_frame(true, opcode::TEXT, b"{\"type\":\"ping\"}"), 1024);
        assert_eq!(r.parse().unwrap(), Some(Incoming::Text(Bytes::from_static(b"{\"type\":\"ping\"}"))));
        assert_eq!(r.parse().unwrap(), None);
    }

    #[test]
    fn partial_frame_waits_for_more() {
        let frame = client_frame(true, opcode::TEXT, &[b'a'; 300]);
        let mut r = reader_with(&frame[..100], 1024);
        assert_eq!(r.parse().unwrap(), None);
        r.buf.extend_from_slice(&frame[100..]);
        assert!(matches!(r.parse().unwrap(), Some(Incoming::Text(t)) if t.len() == 300));
    }

    #[test]
    fn fragments_are_joined_and_control_frames_interleave() {
        let mut bytes = client_frame(false, opcode::TEXT, b"hel");
        bytes.extend(client_frame(true, opcode::PING, b"p"));
        bytes.extend(client_frame(true, opcode::CONTINUATION, b"lo"));
        let mut r = reader_with(&bytes, 1024);
        assert_eq!(r.parse().unwrap(), Some(Incoming::Ping(Bytes::from_static(b"p"))));
        assert_eq!(r.parse().unwrap(), Some(Incoming::Text(Bytes::from_static(b"hello"))));
    }

    #[test]
    fn size_limit_applies_to_the_whole_message() {
        let mut r = reader_with(&client_frame(true, opcode::TEXT, &[b'a'; 11]), 10);
        assert!(matches!(r.parse(), Err(ReadError::TooLarge)));
        let mut bytes = client_frame(false, opcode::TEXT, &[b'a'; 6]);
        bytes.extend(client_frame(true, opcode::CONTINUATION, &[b'a'; 6]));
        let mut r = reader_with(&bytes, 10);
        assert!(matches!(r.parse(), Err(ReadError::TooLarge)));
        let mut r = reader_with(&client_frame(true, opcode::TEXT, &[b'a'; 10]), 10);
        assert!(matches!(r.parse(), Ok(Some(Incoming::Text(_)))));
    }

    #[test]
    fn oversized_header_is_refused_before_the_payload_arrives() {
        let frame = client_frame(true, opcode::TEXT, &vec![b'a'; 70_000]);
        let mut r = reader_with(&frame[..20], 65_536);
        assert!(matches!(r.parse(), Err(ReadError::TooLarge)));
    }

    #[test]
    fn protocol_violations() {
        let mut unmasked = client_frame(true, opcode::TEXT, b"x");
        unmasked[1] &= 0x7F;
        let mut rsv = client_frame(true, opcode::TEXT, b"x");
        rsv[0] |= 0x40;
        let cases: Vec<(Vec<u8>, &str)> = vec![
            (unmasked, "masked"),
            (rsv, "reserved"),
            (client_frame(false, opcode::PING, b""), "control"),
            (client_frame(true, opcode::CONTINUATION, b"x"), "continuation"),
            (client_frame(true, 0x3, b""), "opcode"),
            (client_frame(true, opcode::CLOSE, &[3]), "one-byte"),
            (client_frame(true, opcode::CLOSE, &1005u16.to_be_bytes()), "close code"),
        ];
        for (bytes, why) in cases {
            match reader_with(&bytes, 1024).parse() {
                Err(ReadError::Protocol(msg)) => assert!(msg.contains(why), "{msg} vs {why}"),
                other => panic!("{why}: {other:?}"),
            }
        }
    }

    #[test]
    fn invalid_utf8_text_is_refused() {
        let mut r = reader_with(&client_frame(true, opcode::TEXT, &[0xFF, 0xFE]), 1024);
        assert!(matches!(r.parse(), Err(ReadError::InvalidUtf8)));
    }

    #[test]
    fn close_binary_and_pong() {
        let mut bytes = client_frame(true, opcode::BINARY, b"\x00\x01");
        bytes.extend(client_frame(true, opcode::PONG, b""));
        bytes.extend(client_frame(true, opcode::CLOSE, &1000u16.to_be_bytes()));
        bytes.extend(client_frame(true, opcode::CLOSE, b""));
        let mut r = reader_with(&bytes, 1024);
        assert_eq!(r.parse().unwrap(), Some(Incoming::Binary));
        assert_eq!(r.parse().unwrap(), Some(Incoming::Pong));
        assert_eq!(r.parse().unwrap(), Some(Incoming::Close(Some(1000))));
        assert_eq!(r.parse().unwrap(), Some(Incoming::Close(None)));
    }
}
