//! Reading the server's frames: one `read` fills the connection's buffer,
//! and every complete frame in it is handed out before the next read, all
//! stamped with the one receive time.
//!
//! Loadgen shares the machine with the server it measures, so every cycle
//! it spends is taken from the server. fastwebsockets' reader polled the
//! socket, split its buffer and checked UTF-8 once per frame, and the
//! session read the clock per frame: at a million deliveries a second that
//! was a fifth of loadgen's CPU. Here a frame is a slice of the buffer.

use std::cell::RefCell;
use std::io;
use std::sync::atomic::{AtomicU64, Ordering};

use flate2::{Decompress, FlushDecompress, Status};

use crate::client::ReadHalf;
use tokio::io::AsyncReadExt;

/// Largest message (all fragments together) accepted from the server.
const MAX_MESSAGE: usize = 16 << 20;
/// Free space a read gets at least.
const READ_CHUNK: usize = 8 << 10;
/// An emptied buffer larger than this is given back (after a big message).
const KEEP_CAPACITY: usize = 64 << 10;

/// Bytes read from every server socket, WebSocket headers included: what
/// the server put on the wire for this process.
pub static WIRE_BYTES_IN: AtomicU64 = AtomicU64::new(0);

thread_local! {
    /// One inflater per thread, reset per message: the server negotiates no
    /// context takeover, so no connection needs a window of its own.
    static INFLATE: RefCell<Decompress> = RefCell::new(Decompress::new(false));
}

/// A frame, borrowed from the reader until the next call.
#[derive(Debug, PartialEq, Eq)]
pub enum Frame<'a> {
    /// A whole text message, fragments joined.
    Text(&'a [u8]),
    /// A whole binary message.
    Binary(&'a [u8]),
    Ping(&'a [u8]),
    Pong,
    /// The close frame's payload: code and reason, or empty.
    Close(&'a [u8]),
}

/// Why reading stopped.
#[derive(Debug)]
pub enum ReadError {
    /// The server closed TCP without a close frame.
    Eof,
    Io(io::Error),
    /// The server broke RFC 6455.
    Protocol(&'static str),
}

pub struct FrameReader {
    stream: ReadHalf,
    buf: Vec<u8>,
    /// Where the unread bytes in `buf` start.
    start: usize,
    /// Bytes the incomplete frame at `start` needs in all.
    want: usize,
    /// A fragmented message being put together: opcode and bytes so far.
    fragments: Option<(u8, Vec<u8>)>,
    /// Whether the fragmented message is compressed.
    fragments_compressed: bool,
    /// permessage-deflate was negotiated: RSV1 frames are inflated.
    inflate: bool,
    /// A joined message handed out by the last call, dropped by the next.
    joined: Vec<u8>,
}

struct Header {
    fin: bool,
    rsv1: bool,
    opcode: u8,
    head: usize,
    len: usize,
}

impl FrameReader {
    /// A reader that first hands out the frames in `read_ahead` (bytes
    /// that came with the upgrade response).
    pub fn new(stream: ReadHalf, read_ahead: Vec<u8>) -> Self {
        WIRE_BYTES_IN.fetch_add(read_ahead.len() as u64, Ordering::Relaxed);
        Self {
            stream,
            buf: read_ahead,
            start: 0,
            want: 0,
            fragments: None,
            fragments_compressed: false,
            inflate: false,
            joined: Vec::new(),
        }
    }

    /// Inflates RSV1 messages (the upgrade negotiated permessage-deflate).
    pub fn with_inflate(mut self, inflate: bool) -> Self {
        self.inflate = inflate;
        self
    }

    /// Reads once from the socket (waiting for data).
    pub async fn fill(&mut self) -> Result<(), ReadError> {
        self.compact();
        // Room for the rest of a big frame in one go, else a chunk.
        self.buf.reserve(READ_CHUNK.max(self.want.saturating_sub(self.buf.len())));
        match self.stream.read_buf(&mut self.buf).await {
            Ok(0) => Err(ReadError::Eof),
            Ok(n) => {
                WIRE_BYTES_IN.fetch_add(n as u64, Ordering::Relaxed);
                Ok(())
            }
            Err(e) => Err(ReadError::Io(e)),
        }
    }

    /// Moves the unread bytes to the front, or frees an emptied big buffer.
    fn compact(&mut self) {
        if self.start == self.buf.len() {
            self.start = 0;
            self.buf.clear();
            if self.buf.capacity() > KEEP_CAPACITY {
                self.buf = Vec::new();
            }
        } else if self.start > 0 {
            self.buf.drain(..self.start);
            self.start = 0;
        }
    }

    /// The next complete frame in the buffer, or None when [`fill`] must
    /// read more.
    ///
    /// [`fill`]: FrameReader::fill
    pub fn next_frame(&mut self) -> Result<Option<Frame<'_>>, ReadError> {
        self.joined.clear();
        loop {
            let Some(h) = header(&self.buf[self.start..])? else {
                self.want = 10;
                return Ok(None);
            };
            let end = self.start + h.head + h.len;
            if self.buf.len() < end {
                self.want = h.head + h.len;
                return Ok(None);
            }
            let payload = self.start + h.head..end;
            self.start = end;
            self.want = 0;
            if h.rsv1 && !(self.inflate && matches!(h.opcode, 0x1 | 0x2) && self.fragments.is_none()) {
                return Err(ReadError::Protocol("reserved bits set"));
            }
            if h.rsv1 && h.fin {
                self.joined = inflate(&self.buf[payload])?;
                return if h.opcode == 0x1 {
                    text(&self.joined).map(Some)
                } else {
                    Ok(Some(Frame::Binary(&self.joined)))
                };
            }
            match (h.opcode, h.fin) {
                (0x1, true) if self.fragments.is_none() => return text(&self.buf[payload]).map(Some),
                (0x2, true) if self.fragments.is_none() => return Ok(Some(Frame::Binary(&self.buf[payload]))),
                (0x1 | 0x2, false) if self.fragments.is_none() => {
                    self.fragments_compressed = h.rsv1;
                    self.fragments = Some((h.opcode, self.buf[payload].to_vec()));
                }
                (0x1 | 0x2, _) => return Err(ReadError::Protocol("new message inside a fragmented one")),
                (0x0, fin) => {
                    let Some((opcode, bytes)) = self.fragments.as_mut() else {
                        return Err(ReadError::Protocol("continuation without a message"));
                    };
                    if bytes.len() + h.len > MAX_MESSAGE {
                        return Err(ReadError::Protocol("message too large"));
                    }
                    bytes.extend_from_slice(&self.buf[payload]);
                    if fin {
                        let is_text = *opcode == 0x1;
                        self.joined = self.fragments.take().map(|(_, b)| b).unwrap_or_default();
                        if self.fragments_compressed {
                            self.joined = inflate(&self.joined)?;
                        }
                        return if is_text {
                            text(&self.joined).map(Some)
                        } else {
                            Ok(Some(Frame::Binary(&self.joined)))
                        };
                    }
                }
                (0x8..=0xA, false) => return Err(ReadError::Protocol("fragmented control frame")),
                (0x8..=0xA, true) if h.len > 125 => return Err(ReadError::Protocol("control frame too long")),
                (0x8, true) => return Ok(Some(Frame::Close(&self.buf[payload]))),
                (0x9, true) => return Ok(Some(Frame::Ping(&self.buf[payload]))),
                (0xA, true) => return Ok(Some(Frame::Pong)),
                _ => return Err(ReadError::Protocol("unknown opcode")),
            }
        }
    }
}

/// Inflates one compressed message (RFC 7692: the sync tail restored).
fn inflate(compressed: &[u8]) -> Result<Vec<u8>, ReadError> {
    INFLATE.with(|cell| {
        let mut z = cell.borrow_mut();
        z.reset(false);
        let mut out = Vec::with_capacity(compressed.len() * 4 + 64);
        for input in [compressed, &[0, 0, 0xFF, 0xFF][..]] {
            let start = z.total_in();
            loop {
                let used = (z.total_in() - start) as usize;
                let status = z
                    .decompress_vec(&input[used..], &mut out, FlushDecompress::None)
                    .map_err(|_| ReadError::Protocol("compressed message does not inflate"))?;
                if status == Status::StreamEnd {
                    return Ok(out);
                }
                if (z.total_in() - start) as usize == input.len() && out.len() < out.capacity() {
                    break;
                }
                if out.len() > MAX_MESSAGE {
                    return Err(ReadError::Protocol("message too large"));
                }
                out.reserve(out.capacity().max(1024));
            }
        }
        Ok(out)
    })
}

/// A text message, which RFC 6455 requires to be UTF-8.
fn text(payload: &[u8]) -> Result<Frame<'_>, ReadError> {
    match std::str::from_utf8(payload) {
        Ok(_) => Ok(Frame::Text(payload)),
        Err(_) => Err(ReadError::Protocol("text frame is not UTF-8")),
    }
}

/// The frame header at the start of `b`, or None if it is not all there.
fn header(b: &[u8]) -> Result<Option<Header>, ReadError> {
    let [b0, b1, ..] = *b else { return Ok(None) };
    // RSV1 is permessage-deflate's, checked by the caller.
    if b0 & 0x30 != 0 {
        return Err(ReadError::Protocol("reserved bits set"));
    }
    if b1 & 0x80 != 0 {
        return Err(ReadError::Protocol("masked frame from the server"));
    }
    let (len, head) = match b1 & 0x7f {
        126 => match b.get(2..4) {
            Some(n) => (u64::from(u16::from_be_bytes([n[0], n[1]])), 4),
            None => return Ok(None),
        },
        127 => match b.get(2..10).and_then(|n| <[u8; 8]>::try_from(n).ok()) {
            Some(n) => (u64::from_be_bytes(n), 10),
            None => return Ok(None),
        },
        n => (u64::from(n), 2),
    };
    if len > MAX_MESSAGE as u64 {
        return Err(ReadError::Protocol("message too large"));
    }
    Ok(Some(Header { fin: b0 & 0x80 != 0, rsv1: b0 & 0x40 != 0, opcode: b0 & 0x0f, head, len: len as usize }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncWriteExt;
    use tokio::net::{TcpListener, TcpStream};

    fn frame(fin: bool, opcode: u8, payload: &[u8]) -> Vec<u8> {
        let mut out = vec![(u8::from(fin) << 7) | opcode];
        match payload.len() {
            n if n < 126 => out.push(n as u8),
            n if n <= 0xffff => {
                out.push(126);
                out.extend_from_slice(&(n as u16).to_be_bytes());
            }
            n => {
                out.push(127);
                out.extend_from_slice(&(n as u64).to_be_bytes());
            }
        }
        out.extend_from_slice(payload);
        out
    }

    /// A reader over a real socket pair, and the server's end.
    async fn pair(read_ahead: Vec<u8>) -> (FrameReader, TcpStream) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let client = TcpStream::connect(listener.local_addr().unwrap()).await.unwrap();
        let (server, _) = listener.accept().await.unwrap();
        let (rd, _wr) = client.into_split();
        (FrameReader::new(Box::new(rd), read_ahead), server)
    }

    /// Every frame the reader gets out of `wire`, sent in `step`-byte pieces.
    async fn read_all(wire: &[u8], step: usize) -> Result<Vec<String>, String> {
        let (mut reader, mut server) = pair(Vec::new()).await;
        let wire = wire.to_vec();
        tokio::spawn(async move {
            for piece in wire.chunks(step) {
                server.write_all(piece).await.unwrap();
                server.flush().await.unwrap();
                tokio::task::yield_now().await;
            }
        });
        let mut got = Vec::new();
        loop {
            loop {
                match reader.next_frame() {
                    Ok(Some(f)) => got.push(format!("{f:?}")),
                    Ok(None) => break,
                    Err(e) => return Err(format!("{e:?}")),
                }
            }
            match reader.fill().await {
                Ok(()) => {}
                Err(ReadError::Eof) => return Ok(got),
                Err(e) => return Err(format!("{e:?}")),
            }
        }
    }

    #[tokio::test]
    async fn compressed_messages_are_inflated_once_negotiated() {
        let text = br#"{"type":"message","body":"hello hello hello hello hello hello"}"#;
        // The server's own compressor makes the frame.
        let wire = chorus::ws::deflate::deflate_text(text).unwrap().to_vec();
        assert_eq!(wire[0], 0xC1);
        let (mut reader, mut server) = pair(wire.clone()).await;
        reader = reader.with_inflate(true);
        assert_eq!(reader.next_frame().unwrap(), Some(Frame::Text(text)));
        // Fragmented: RSV1 on the first frame only.
        let payload = &wire[2..];
        let mut fragments = frame(false, 0x41, &payload[..5]);
        fragments.extend(frame(true, 0, &payload[5..]));
        server.write_all(&fragments).await.unwrap();
        let got = loop {
            if let Some(f) = reader.next_frame().unwrap() {
                break format!("{f:?}");
            }
            reader.fill().await.unwrap();
        };
        assert_eq!(got, format!("{:?}", Frame::Text(text)));
        // Without negotiation RSV1 is a protocol error.
        let (mut plain, _server) = pair(wire).await;
        assert!(matches!(plain.next_frame(), Err(ReadError::Protocol("reserved bits set"))));
    }

    #[tokio::test]
    async fn frames_split_anywhere_come_out_whole() {
        let big = vec![b'x'; 70_000];
        let mut wire = frame(true, 1, b"hello");
        wire.extend(frame(false, 1, b"frag"));
        wire.extend(frame(true, 9, b"p"));
        wire.extend(frame(false, 0, b"men"));
        wire.extend(frame(true, 0, b"ted"));
        wire.extend(frame(true, 2, &big));
        wire.extend(frame(true, 8, &[3, 232]));
        for step in [1, 3, 7, 1000, wire.len()] {
            let got = read_all(&wire, step).await.unwrap();
            assert_eq!(got.len(), 5, "step {step}: {got:?}");
            assert_eq!(got[0], format!("{:?}", Frame::Text(b"hello")));
            assert_eq!(got[1], format!("{:?}", Frame::Ping(b"p")));
            assert_eq!(got[2], format!("{:?}", Frame::Text(b"fragmented")));
            assert_eq!(got[3], format!("{:?}", Frame::Binary(&big)));
            assert_eq!(got[4], format!("{:?}", Frame::Close(&[3, 232])));
        }
    }

    #[tokio::test]
    async fn protocol_errors_are_named() {
        let cases: [(Vec<u8>, &str); 6] = [
            (frame(true, 1, &[0xff, 0xfe]), "not UTF-8"),
            (vec![0x81 | 0x40, 0], "reserved bits"),
            (vec![0x81, 0x80, 0, 0, 0, 0], "masked"),
            (frame(true, 0, b"x"), "continuation without"),
            (frame(false, 9, b"x"), "fragmented control"),
            (frame(true, 3, b"x"), "unknown opcode"),
        ];
        for (wire, want) in cases {
            let err = read_all(&wire, wire.len()).await.unwrap_err();
            assert!(err.contains(want), "{err} should say {want}");
        }
    }

    #[tokio::test]
    async fn read_ahead_bytes_come_first() {
        let (mut reader, mut server) = pair(frame(true, 1, b"early")).await;
        server.write_all(&frame(true, 1, b"later")).await.unwrap();
        assert_eq!(reader.next_frame().unwrap(), Some(Frame::Text(b"early")));
        assert_eq!(reader.next_frame().unwrap(), None);
        reader.fill().await.unwrap();
        assert_eq!(reader.next_frame().unwrap(), Some(Frame::Text(b"later")));
    }
}
