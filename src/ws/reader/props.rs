//! Property tests of the frame reader: whatever bytes a client sends, cut
//! wherever TCP cuts them, the reader never panics, and it answers what
//! RFC 6455 and PROTOCOL.md section 3 say: the messages a plain model of the
//! RFC expects, then the close code (1002, 1007 or 1009) the first faulty
//! frame deserves.
//!
//! The model below reads one frame description at a time and is written
//! from the RFC, not from the reader; where a frame breaks several rules at
//! once the RFC does not say which wins, and the model takes the reader's
//! order (header rules, then the message size, then the frame's meaning).

use super::*;
use proptest::collection::vec;
use proptest::prelude::*;
use std::time::Duration;

/// The message-size limit of these tests: small, so that the limit is hit.
const MAX: usize = 300;

/// One frame as a client might put it on the wire, faults included.
#[derive(Debug, Clone)]
struct RawFrame {
    fin: bool,
    rsv: u8,
    opcode: u8,
    mask: Option<[u8; 4]>,
    payload: Vec<u8>,
}

impl RawFrame {
    fn good(fin: bool, opcode: u8, mask: [u8; 4], payload: Vec<u8>) -> Self {
        Self { fin, rsv: 0, opcode, mask: Some(mask), payload }
    }

    /// The frame's bytes, the length in its shortest form (RFC 6455 5.2).
    fn encode(&self, out: &mut Vec<u8>) {
        out.push((u8::from(self.fin) << 7) | (self.rsv << 4) | self.opcode);
        let mask_bit = if self.mask.is_some() { 0x80 } else { 0 };
        match self.payload.len() {
            n if n < 126 => out.push(mask_bit | n as u8),
            n if n < 65_536 => {
                out.push(mask_bit | 126);
                out.extend_from_slice(&(n as u16).to_be_bytes());
            }
            n => {
                out.push(mask_bit | 127);
                out.extend_from_slice(&(n as u64).to_be_bytes());
            }
        }
        match self.mask {
            Some(mask) => {
                out.extend_from_slice(&mask);
                out.extend(self.payload.iter().enumerate().map(|(i, b)| b ^ mask[i % 4]));
            }
            None => out.extend_from_slice(&self.payload),
        }
    }
}

fn encode_all(frames: &[RawFrame]) -> Vec<u8> {
    let mut out = Vec::new();
    for frame in frames {
        frame.encode(&mut out);
    }
    out
}

/// What the reader hands up, or the close code it ends with.
#[derive(Debug, PartialEq, Eq)]
enum Event {
    Text(Vec<u8>),
    Binary,
    Ping(Vec<u8>),
    Pong,
    Close(Option<u16>),
    Fail(u16),
}

/// Close codes a peer may send (RFC 6455 7.4.1 and the IANA registry:
/// 1004 to 1006 and 1015 are reserved, below 1000 and 1016 to 2999 unused).
fn sendable_close_code(code: u16) -> bool {
    matches!(code, 1000..=1003 | 1007..=1014 | 3000..=4999)
}

/// The RFC's reading of a sequence of whole frames, with a size limit on
/// whole messages.
fn model(frames: &[RawFrame], max: usize) -> Vec<Event> {
    let mut events = Vec::new();
    // The message being reassembled: whether it is text, and its bytes.
    let mut partial: Option<(bool, Vec<u8>)> = None;
    for f in frames {
        let control = f.opcode >= 8;
        if f.rsv != 0 || f.mask.is_none() || (control && (!f.fin || f.payload.len() > 125)) {
            events.push(Event::Fail(1002));
            return events;
        }
        let so_far = partial.as_ref().map_or(0, |(_, data)| data.len());
        if !control && so_far + f.payload.len() > max {
            events.push(Event::Fail(1009));
            return events;
        }
        let event = match f.opcode {
            1 | 2 if partial.is_some() => Some(Event::Fail(1002)),
            1 | 2 => {
                partial = Some((f.opcode == 1, f.payload.clone()));
                None
            }
            0 => match partial.as_mut() {
                None => Some(Event::Fail(1002)),
                Some((_, data)) => {
                    data.extend_from_slice(&f.payload);
                    None
                }
            },
            8 => Some(match f.payload.as_slice() {
                [] => Event::Close(None),
                [_] => Event::Fail(1002),
                [hi, lo, reason @ ..] => {
                    let code = u16::from_be_bytes([*hi, *lo]);
                    if !sendable_close_code(code) {
                        Event::Fail(1002)
                    } else if std::str::from_utf8(reason).is_err() {
                        Event::Fail(1007)
                    } else {
                        Event::Close(Some(code))
                    }
                }
            }),
            9 => Some(Event::Ping(f.payload.clone())),
            10 => Some(Event::Pong),
            _ => Some(Event::Fail(1002)),
        };
        let event = match event {
            Some(event) => Some(event),
            // A data frame: the message is whole when this frame ends it.
            None if f.fin => partial.take().map(|(text, data)| match (text, std::str::from_utf8(&data)) {
                (false, _) => Event::Binary,
                (true, Ok(_)) => Event::Text(data),
                (true, Err(_)) => Event::Fail(1007),
            }),
            None => None,
        };
        if let Some(event) = event {
            let failed = matches!(event, Event::Fail(_));
            events.push(event);
            if failed {
                return events;
            }
        }
    }
    events
}

fn event(incoming: Incoming) -> Event {
    match incoming {
        Incoming::Text(t) => Event::Text(t.to_vec()),
        Incoming::Binary => Event::Binary,
        Incoming::Ping(p) => Event::Ping(p.to_vec()),
        Incoming::Pong => Event::Pong,
        Incoming::Close(code) => Event::Close(code),
    }
}

/// Feeds `bytes` to a reader in the pieces `cuts` makes, taking every frame
/// it yields after each piece; stops at the first error. Also returns how
/// many bytes were left in the reader's buffer.
fn run_reader(bytes: &[u8], cuts: &[usize], max: usize) -> (Vec<Event>, usize) {
    run_reader_with(bytes, cuts, max, false)
}

/// [`run_reader`], with permessage-deflate negotiated or not.
fn run_reader_with(bytes: &[u8], cuts: &[usize], max: usize, inflate: bool) -> (Vec<Event>, usize) {
    let mut points: Vec<usize> = cuts.iter().map(|c| c % (bytes.len() + 1)).collect();
    points.push(bytes.len());
    points.sort_unstable();
    let mut reader = FrameReader::new(&[], max, inflate);
    let mut events = Vec::new();
    let mut from = 0;
    for to in points {
        reader.buf.extend_from_slice(&bytes[from..to]);
        from = to;
        loop {
            match reader.parse() {
                Ok(Some(incoming)) => events.push(event(incoming)),
                Ok(None) => break,
                Err(e) => {
                    // Every error that reaches a working socket has a close code.
                    let (code, _) = e.close().expect("a parse error has a close code");
                    events.push(Event::Fail(code));
                    return (events, reader.buf.len());
                }
            }
        }
    }
    (events, reader.buf.len())
}

fn mask() -> impl Strategy<Value = [u8; 4]> {
    any::<[u8; 4]>()
}

/// A control frame a well-behaved client sends.
fn good_control() -> impl Strategy<Value = RawFrame> {
    let close_code = prop_oneof![
        // Every edge of the allowed ranges, and the reserved codes.
        3 => prop::sample::select(vec![
            0u16, 999, 1000, 1001, 1002, 1003, 1004, 1005, 1006, 1007, 1008, 1011, 1012, 1013, 1014, 1015, 1016,
            2999, 3000, 4000, 4999, 5000, 65535,
        ]),
        1 => any::<u16>(),
    ];
    let close_payload = prop_oneof![
        Just(Vec::new()),
        (close_code, "[a-zé ]{0,40}").prop_map(|(code, reason)| {
            let mut p = code.to_be_bytes().to_vec();
            p.extend_from_slice(reason.as_bytes());
            p
        }),
    ];
    prop_oneof![
        (mask(), vec(any::<u8>(), 0..=125)).prop_map(|(m, p)| RawFrame::good(true, 9, m, p)),
        (mask(), vec(any::<u8>(), 0..=125)).prop_map(|(m, p)| RawFrame::good(true, 10, m, p)),
        (mask(), close_payload).prop_map(|(m, p)| RawFrame::good(true, 8, m, p)),
    ]
}

/// One message, text (mostly valid UTF-8, sometimes cut inside a
/// character) or binary, in one or more fragments with control frames
/// between them.
fn message() -> impl Strategy<Value = Vec<RawFrame>> {
    let body = prop_oneof![
        3 => "\\PC{0,120}".prop_map(|s| (true, s.into_bytes())),
        1 => vec(any::<u8>(), 0..400).prop_map(|b| (true, b)),
        1 => vec(any::<u8>(), 0..400).prop_map(|b| (false, b)),
    ];
    (body, vec(any::<usize>(), 0..4), vec(prop::option::weighted(0.3, good_control()), 4), mask()).prop_map(
        |((text, data), cuts, controls, m)| {
            let mut cuts: Vec<usize> = cuts.into_iter().map(|c| c % (data.len() + 1)).collect();
            cuts.sort_unstable();
            cuts.push(data.len());
            let mut frames = Vec::new();
            let mut from = 0;
            for (i, to) in cuts.iter().copied().enumerate() {
                let last = i + 1 == cuts.len();
                let opcode = if i == 0 {
                    if text {
                        1
                    } else {
                        2
                    }
                } else {
                    0
                };
                frames.push(RawFrame::good(last, opcode, m, data[from..to].to_vec()));
                from = to;
                if let (false, Some(Some(control))) = (last, controls.get(i)) {
                    frames.push(control.clone());
                }
            }
            frames
        },
    )
}

/// A session of messages and control frames, every frame well formed.
fn good_session() -> impl Strategy<Value = Vec<RawFrame>> {
    vec(prop_oneof![3 => message(), 1 => good_control().prop_map(|c| vec![c])], 0..8)
        .prop_map(|parts| parts.into_iter().flatten().collect())
}

/// A good session with one fault put in a random frame.
fn faulty_session() -> impl Strategy<Value = Vec<RawFrame>> {
    (good_session(), any::<usize>(), 0u8..6, any::<u8>()).prop_map(|(mut frames, at, fault, value)| {
        if frames.is_empty() {
            frames.push(RawFrame::good(true, 1, [0; 4], b"x".to_vec()));
        }
        let at = at % frames.len();
        let f = &mut frames[at];
        match fault {
            0 => f.rsv = (value % 7) + 1,
            1 => f.mask = None,
            2 => f.opcode = value % 16,
            3 => f.fin = !f.fin,
            4 => f.payload.resize(126 + usize::from(value), b'a'),
            _ => {
                if let Some(b) = f.payload.first_mut() {
                    *b ^= value | 0x80;
                }
            }
        }
        frames
    })
}

proptest! {
    /// Any bytes, however cut: no panic, and the cuts change nothing.
    #[test]
    fn arbitrary_bytes_never_panic_and_cuts_do_not_matter(
        bytes in vec(any::<u8>(), 0..600),
        cuts in vec(any::<usize>(), 0..8),
        max in 0usize..400,
        inflate in any::<bool>(),
    ) {
        let (whole, whole_left) = run_reader_with(&bytes, &[], max, inflate);
        let (cut, cut_left) = run_reader_with(&bytes, &cuts, max, inflate);
        prop_assert_eq!(&whole, &cut);
        // Past an error the connection closes and what is buffered is moot.
        if !matches!(whole.last(), Some(Event::Fail(_))) {
            prop_assert_eq!(whole_left, cut_left);
        }
    }

    /// Sessions of messages (fragmented, with control frames between the
    /// fragments; some not UTF-8, some past the limit) give exactly the
    /// model's events, in order, and leave nothing behind.
    #[test]
    fn good_sessions_read_as_the_model_says(
        frames in good_session(),
        cuts in vec(any::<usize>(), 0..8),
    ) {
        let bytes = encode_all(&frames);
        let (events, left) = run_reader(&bytes, &cuts, MAX);
        let expected = model(&frames, MAX);
        prop_assert_eq!(&events, &expected);
        if !matches!(expected.last(), Some(Event::Fail(_))) {
            prop_assert_eq!(left, 0);
        }
    }

    /// A fault anywhere: the messages before it, then the close code the
    /// fault deserves, however the bytes were cut.
    #[test]
    fn faults_close_with_the_code_the_model_says(
        frames in faulty_session(),
        cuts in vec(any::<usize>(), 0..8),
    ) {
        let bytes = encode_all(&frames);
        let (events, _) = run_reader(&bytes, &cuts, MAX);
        prop_assert_eq!(events, model(&frames, MAX));
    }

    /// Frames of any shape (any opcode, bits, length, mask): the model's answer.
    #[test]
    fn any_frames_read_as_the_model_says(
        frames in vec(
            (any::<bool>(), prop::sample::select(vec![0u8, 0, 0, 1, 2]), 0u8..16, prop::option::weighted(0.9, mask()), vec(any::<u8>(), 0..200))
                .prop_map(|(fin, rsv, opcode, mask, payload)| RawFrame { fin, rsv, opcode, mask, payload }),
            0..6,
        ),
        cuts in vec(any::<usize>(), 0..8),
    ) {
        let bytes = encode_all(&frames);
        let (events, _) = run_reader(&bytes, &cuts, MAX);
        prop_assert_eq!(events, model(&frames, MAX));
    }
}

/// Through a real socket: a session written in random pieces with pauses
/// between them, so that the reader waits (and lets its buffer go when idle)
/// mid-header, mid-payload and between frames; `next` gives the model's
/// events, then end of stream.
#[test]
fn a_real_socket_cut_anywhere_reads_as_the_model_says() {
    use tokio::io::AsyncWriteExt;
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
    proptest!(ProptestConfig::with_cases(32), |(frames in good_session(), cuts in vec(any::<usize>(), 0..6))| {
        let bytes = encode_all(&frames);
        let expected = model(&frames, MAX);
        let events = runtime.block_on(async move {
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
            let mut client = TcpStream::connect(listener.local_addr().expect("addr")).await.expect("connect");
            let (server, _) = listener.accept().await.expect("accept");
            client.set_nodelay(true).expect("nodelay");
            let mut points: Vec<usize> = cuts.iter().map(|c| c % (bytes.len() + 1)).collect();
            points.push(bytes.len());
            points.sort_unstable();
            let writer = tokio::spawn(async move {
                let mut from = 0;
                for to in points {
                    // The reader may have closed on a fault: later writes may fail.
                    if client.write_all(&bytes[from..to]).await.is_err() {
                        return;
                    }
                    from = to;
                    tokio::time::sleep(Duration::from_millis(1)).await;
                }
            });
            let mut reader = FrameReader::new(&[], MAX, false);
            let mut events = Vec::new();
            loop {
                match reader.next(&server).await {
                    Ok(incoming) => events.push(event(incoming)),
                    Err(ReadError::Eof) => break,
                    Err(e) => {
                        events.push(Event::Fail(e.close().expect("a close code").0));
                        break;
                    }
                }
            }
            writer.abort();
            events
        });
        prop_assert_eq!(events, expected);
    });
}

/// A message deflated as RFC 7692 says, with flate2 directly: raw deflate,
/// a sync flush with its `00 00 ff ff` tail cut off, or a final block.
fn deflated(data: &[u8], level: u32, final_block: bool) -> Vec<u8> {
    use flate2::{Compress, Compression, FlushCompress};
    let mut z = Compress::new(Compression::new(level), false);
    let mut out = Vec::with_capacity(data.len() * 2 + 64);
    let flush = if final_block { FlushCompress::Finish } else { FlushCompress::Sync };
    z.compress_vec(data, &mut out, flush).expect("deflate");
    assert_eq!(z.total_in() as usize, data.len(), "the buffer was big enough");
    if !final_block {
        assert!(out.ends_with(&[0, 0, 0xFF, 0xFF]));
        out.truncate(out.len() - 4);
    }
    out
}

proptest! {
    /// With permessage-deflate negotiated: compressed messages (RSV1 on
    /// their first frame, fragmented anywhere, control frames between the
    /// fragments) read as the text or binary that was deflated; 1009 when
    /// the inflated message passes the limit, however small on the wire;
    /// 1007 when inflated text is not UTF-8; plain messages still read.
    #[test]
    fn compressed_messages_inflate_to_what_was_sent(
        messages in vec((
            prop_oneof![
                3 => "(ab|\\PC){0,200}".prop_map(|s| (true, s.into_bytes())),
                1 => vec(prop::sample::select(vec![b'a', b'b', 0xFF]), 0..600).prop_map(|b| (true, b)),
                1 => vec(any::<u8>(), 0..300).prop_map(|b| (false, b)),
            ],
            any::<bool>(),
            0u32..=9,
            any::<bool>(),
            vec(any::<usize>(), 0..3),
            prop::option::of(good_control()),
            mask(),
        ), 1..5),
        cuts in vec(any::<usize>(), 0..8),
    ) {
        let mut frames = Vec::new();
        let mut expected = Vec::new();
        for ((text, data), compress, level, final_block, splits, control, m) in messages {
            let wire = if compress { deflated(&data, level, final_block) } else { data.clone() };
            // A message past the limit may be refused at any of its frames'
            // headers (on the wire size) or once inflated: no control frame
            // between its fragments, so that the order of events is known.
            let control = if data.len() > MAX { None } else { control };
            let mut splits: Vec<usize> = splits.into_iter().map(|c| c % (wire.len() + 1)).collect();
            splits.sort_unstable();
            splits.push(wire.len());
            let mut from = 0;
            for (i, to) in splits.iter().copied().enumerate() {
                let last = i + 1 == splits.len();
                let opcode = if i == 0 { if text { 1 } else { 2 } } else { 0 };
                let mut frame = RawFrame::good(last, opcode, m, wire[from..to].to_vec());
                frame.rsv = if compress && i == 0 { 4 } else { 0 };
                frames.push(frame);
                from = to;
                if let (false, Some(control)) = (last, &control) {
                    frames.push(control.clone());
                    expected.extend(model(std::slice::from_ref(control), MAX));
                }
            }
            let event = if data.len() > MAX {
                Event::Fail(1009)
            } else if !text {
                Event::Binary
            } else if std::str::from_utf8(&data).is_err() {
                Event::Fail(1007)
            } else {
                Event::Text(data)
            };
            let failed = matches!(event, Event::Fail(_));
            expected.push(event);
            if failed || matches!(expected.iter().rev().nth(1), Some(Event::Fail(_))) {
                break;
            }
        }
        // Stop the expectation at its first failure, as the reader stops.
        if let Some(at) = expected.iter().position(|e| matches!(e, Event::Fail(_))) {
            expected.truncate(at + 1);
        }
        let (events, _) = run_reader_with(&encode_all(&frames), &cuts, MAX, true);
        prop_assert_eq!(events, expected);
    }
}

/// The length fields the encoder above never writes: a 64-bit length with
/// its top bit set (RFC 6455 forbids it) and lengths far past the limit
/// are refused from the header alone, before any payload arrives.
#[test]
fn huge_declared_lengths_close_with_1009_from_the_header() {
    for len in [u64::MAX, 1 << 63, 1 << 40, MAX as u64 + 1] {
        let mut bytes = vec![0x81, 0x80 | 127];
        bytes.extend_from_slice(&len.to_be_bytes());
        bytes.extend_from_slice(&[1, 2, 3, 4]);
        let (events, _) = run_reader(&bytes, &[], MAX);
        assert_eq!(events, [Event::Fail(1009)], "length {len}");
    }
}
