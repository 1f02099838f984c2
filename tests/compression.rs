//! permessage-deflate against the real binary (PROTOCOL.md section 9):
//! negotiation, compressed-once fanout, per-connection replies, compressed
//! client messages and every way a compressed message can be refused.
//!
//! The client here is hand-rolled so the tests see the exact bytes on the
//! wire (RSV1, the compressed payload); real clients (Python websockets,
//! Chromium) are driven by `real_clients_negotiate_and_inflate`.

mod common;
#[path = "common/keyspace.rs"]
mod keyspace;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use common::{tcp_connect, token, TestServer, GUARD};
use flate2::{Compress, Compression, Decompress, FlushCompress, FlushDecompress};
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::process::Command;

const OFFER: &str = "permessage-deflate; client_max_window_bits";
const ANSWER: &str = "permessage-deflate; server_no_context_takeover; client_no_context_takeover";

/// One server frame as it was on the wire.
#[derive(Debug, Clone, PartialEq, Eq)]
struct WireFrame {
    first: u8,
    payload: Vec<u8>,
}

impl WireFrame {
    fn compressed(&self) -> bool {
        self.first & 0x40 != 0
    }

    fn opcode(&self) -> u8 {
        self.first & 0x0F
    }

    /// The message text, inflated if the frame was compressed.
    fn text(&self) -> String {
        let bytes = if self.compressed() { inflate(&self.payload) } else { self.payload.clone() };
        String::from_utf8(bytes).expect("utf-8")
    }

    fn json(&self) -> Value {
        serde_json::from_str(&self.text()).expect("json")
    }
}

struct Peer {
    stream: TcpStream,
    buf: Vec<u8>,
    /// The `Sec-WebSocket-Extensions` answer, if any.
    extensions: Option<String>,
}

impl Peer {
    async fn connect(addr: SocketAddr, path: &str, token: &str, offer: Option<&str>) -> Self {
        let mut stream = tcp_connect(addr, None).await;
        let offer = offer.map(|o| format!("Sec-WebSocket-Extensions: {o}\r\n")).unwrap_or_default();
        let request = format!(
            "GET {path} HTTP/1.1\r\nHost: {addr}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
             Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\
             {offer}Authorization: Bearer {token}\r\n\r\n"
        );
        stream.write_all(request.as_bytes()).await.unwrap();
        let mut buf = Vec::new();
        let head_end = loop {
            if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                break i + 4;
            }
            let mut chunk = [0u8; 4096];
            let n = tokio::time::timeout(GUARD, stream.read(&mut chunk)).await.expect("handshake hung").unwrap();
            assert!(n > 0, "closed during the handshake");
            buf.extend_from_slice(&chunk[..n]);
        };
        let head = String::from_utf8_lossy(&buf[..head_end]).into_owned();
        assert!(head.starts_with("HTTP/1.1 101"), "refused: {head}");
        let extensions = head.lines().find_map(|line| {
            let (name, value) = line.split_once(':')?;
            name.eq_ignore_ascii_case("sec-websocket-extensions").then(|| value.trim().to_owned())
        });
        buf.drain(..head_end);
        Self { stream, buf, extensions }
    }

    async fn compressing(addr: SocketAddr, path: &str, sub: &str) -> Self {
        let peer = Self::connect(addr, path, &token(sub, None, 3600), Some(OFFER)).await;
        assert_eq!(peer.extensions.as_deref(), Some(ANSWER));
        peer
    }

    async fn plain(addr: SocketAddr, path: &str, sub: &str) -> Self {
        let peer = Self::connect(addr, path, &token(sub, None, 3600), None).await;
        assert_eq!(peer.extensions, None);
        peer
    }

    /// Writes one masked frame with the given first byte.
    async fn send_raw(&mut self, first: u8, payload: &[u8]) {
        let mask = [0x11, 0x22, 0x33, 0x44];
        let mut frame = vec![first];
        match payload.len() {
            n if n < 126 => frame.push(0x80 | n as u8),
            n if n <= 0xFFFF => {
                frame.push(0x80 | 126);
                frame.extend_from_slice(&(n as u16).to_be_bytes());
            }
            n => {
                frame.push(0x80 | 127);
                frame.extend_from_slice(&(n as u64).to_be_bytes());
            }
        }
        frame.extend_from_slice(&mask);
        frame.extend(payload.iter().enumerate().map(|(i, b)| b ^ mask[i % 4]));
        // The server may close before reading it all; that is for the test to see.
        let _ = tokio::time::timeout(GUARD, self.stream.write_all(&frame)).await.expect("write hung");
    }

    async fn send_plain(&mut self, value: &Value) {
        self.send_raw(0x81, value.to_string().as_bytes()).await;
    }

    async fn send_compressed(&mut self, value: &Value) {
        self.send_raw(0xC1, &deflate(value.to_string().as_bytes())).await;
    }

    async fn frame(&mut self) -> Option<WireFrame> {
        loop {
            if let Some((frame, used)) = parse(&self.buf) {
                self.buf.drain(..used);
                return Some(frame);
            }
            let mut chunk = vec![0u8; 64 * 1024];
            match tokio::time::timeout(GUARD, self.stream.read(&mut chunk)).await.expect("no frame in time") {
                Ok(0) | Err(_) => return None,
                Ok(n) => self.buf.extend_from_slice(&chunk[..n]),
            }
        }
    }

    /// The next frame whose JSON `type` is `kind` (others skipped).
    async fn frame_of(&mut self, kind: &str) -> WireFrame {
        loop {
            let frame = self.frame().await.expect("connection ended");
            if frame.opcode() == 0x1 && frame.json()["type"] == kind {
                return frame;
            }
        }
    }

    async fn close_code(&mut self) -> Option<u16> {
        while let Some(frame) = self.frame().await {
            if frame.opcode() == 0x8 {
                return Some(u16::from_be_bytes([frame.payload[0], frame.payload[1]]));
            }
        }
        None
    }

    async fn join(&mut self, room: &str) {
        self.send_plain(&json!({"type":"join","room":room})).await;
        self.frame_of("joined").await;
    }
}

fn parse(buf: &[u8]) -> Option<(WireFrame, usize)> {
    let [first, b1, ..] = *buf else { return None };
    let (len, header) = match b1 & 0x7F {
        126 => (usize::from(u16::from_be_bytes([*buf.get(2)?, *buf.get(3)?])), 4),
        127 => (u64::from_be_bytes(buf.get(2..10)?.try_into().unwrap()) as usize, 10),
        n => (usize::from(n), 2),
    };
    let payload = buf.get(header..header + len)?.to_vec();
    Some((WireFrame { first, payload }, header + len))
}

/// RFC 7692 compression of one message, no context takeover.
fn deflate(data: &[u8]) -> Vec<u8> {
    let mut z = Compress::new(Compression::default(), false);
    let mut out = Vec::with_capacity(data.len() + 64);
    z.compress_vec(data, &mut out, FlushCompress::Sync).unwrap();
    while (z.total_in() as usize) < data.len() || out.len() == out.capacity() {
        out.reserve(out.capacity());
        z.compress_vec(&data[z.total_in() as usize..], &mut out, FlushCompress::Sync).unwrap();
    }
    assert!(out.ends_with(&[0, 0, 0xFF, 0xFF]));
    out.truncate(out.len() - 4);
    out
}

fn inflate(data: &[u8]) -> Vec<u8> {
    let mut z = Decompress::new(false);
    let mut input = data.to_vec();
    input.extend_from_slice(&[0, 0, 0xFF, 0xFF]);
    let mut out = Vec::with_capacity(data.len() * 8 + 64);
    loop {
        z.decompress_vec(&input[z.total_in() as usize..], &mut out, FlushDecompress::Sync).unwrap();
        if z.total_in() as usize == input.len() && out.len() < out.capacity() {
            return out;
        }
        out.reserve(out.capacity());
    }
}

/// A chat message body of about 300 bytes of JSON.
fn chat_body(i: u32) -> Value {
    json!({
        "text": format!("message {i}: the quick brown fox jumps over the lazy dog, again and again and again"),
        "author": {"id": "user-12345", "name": "Alice Example", "avatar": "https://example.com/a/alice.png"},
        "mentions": ["bob", "carol"],
        "client_ts": 1_700_000_000_000u64 + u64::from(i),
    })
}

#[tokio::test]
async fn negotiation_follows_the_flag_and_the_offer() {
    let on = TestServer::start(&["--compression"]).await;
    let off = TestServer::start(&[]).await;
    let t = token("neg", None, 3600);
    // Offered, flag on: accepted, context takeover off on both sides.
    let peer = Peer::connect(on.addr, "/ws", &t, Some(OFFER)).await;
    assert_eq!(peer.extensions.as_deref(), Some(ANSWER));
    // A smaller server window is echoed; the shared frames fit it.
    let peer = Peer::connect(on.addr, "/ws", &t, Some("permessage-deflate; server_max_window_bits=10")).await;
    assert_eq!(peer.extensions, Some(format!("{ANSWER}; server_max_window_bits=10")));
    // Not offered, or only offers it cannot honour: plain, still upgraded.
    for offer in [
        None,
        Some("x-webkit-deflate-frame"),
        Some("permessage-deflate; server_max_window_bits=16"),
        Some("permessage-deflate; mystery_param"),
        Some("permessage-deflate; client_no_context_takeover; client_no_context_takeover"),
    ] {
        let mut peer = Peer::connect(on.addr, "/ws", &t, offer).await;
        assert_eq!(peer.extensions, None, "{offer:?}");
        // A working plain connection, not just an upgrade.
        peer.send_raw(0x81, br#"{"type":"ping","ref":"plain"}"#).await;
        assert_eq!(peer.frame_of("pong").await.json()["ref"], "plain", "{offer:?}");
    }
    // Flag off: never.
    let peer = Peer::connect(off.addr, "/ws", &t, Some(OFFER)).await;
    assert_eq!(peer.extensions, None);
}

#[tokio::test]
async fn a_message_is_compressed_once_and_shared() {
    let server = TestServer::start(&["--compression"]).await;
    let mut a = Peer::compressing(server.addr, "/ws/lobby", "a").await;
    let mut b = Peer::compressing(server.addr, "/ws/lobby", "b").await;
    let mut plain = Peer::plain(server.addr, "/ws/lobby", "p").await;
    for p in [&mut a, &mut b, &mut plain] {
        p.frame_of("joined").await;
    }
    let body = chat_body(1);
    plain.send_plain(&json!({"type":"send","room":"lobby","body":body,"ref":"r1"})).await;

    let fa = a.frame_of("message").await;
    let fb = b.frame_of("message").await;
    let fp = plain.frame_of("message").await;
    assert!(fa.compressed() && !fp.compressed());
    // Byte-identical compressed frames: compressed once, shared.
    assert_eq!(fa, fb);
    // Inflates to exactly the JSON the plain member got.
    assert_eq!(fa.text(), String::from_utf8(fp.payload.clone()).unwrap());
    assert_eq!(fp.json()["body"], body);
    assert!(fa.payload.len() < fp.payload.len(), "{} vs {}", fa.payload.len(), fp.payload.len());

    // Below --compression-min-bytes (256): plain for everybody.
    plain.send_plain(&json!({"type":"send","room":"lobby","body":"hi"})).await;
    let small = a.frame_of("message").await;
    assert!(!small.compressed());
    assert_eq!(small.json()["body"], "hi");
    // A short ack to a compressing sender is plain too.
    a.send_plain(&json!({"type":"send","room":"lobby","body":"x","ref":"s"})).await;
    assert!(!a.frame_of("ack").await.compressed());

    // History replay (join with since) sends the same stored compressed frame.
    let mut c = Peer::compressing(server.addr, "/ws", "c").await;
    c.send_plain(&json!({"type":"join","room":"lobby","since":0})).await;
    let replayed = c.frame_of("message").await;
    assert_eq!(replayed, fa);
    // A history page is a reply: compressed for this connection when large.
    c.send_plain(&json!({"type":"history","room":"lobby"})).await;
    let page = c.frame_of("history").await;
    assert!(page.compressed());
    assert_eq!(page.json()["messages"][0]["body"], body);
}

#[tokio::test]
async fn the_threshold_is_configurable() {
    let server = TestServer::start(&["--compression", "--compression-min-bytes", "0"]).await;
    let mut a = Peer::compressing(server.addr, "/ws/room", "a").await;
    let joined = a.frame_of("joined").await;
    assert!(joined.compressed(), "every reply is compressed at 0");
    assert_eq!(joined.json()["room"], "room");
    // Control frames never are.
    a.send_raw(0x89, b"p").await;
    let pong = a.frame().await.unwrap();
    assert_eq!((pong.first, pong.payload), (0x8A, b"p".to_vec()));
}

#[tokio::test]
async fn compressed_client_messages_are_accepted() {
    let server = TestServer::start(&["--compression"]).await;
    let mut a = Peer::compressing(server.addr, "/ws", "a").await;
    let mut plain = Peer::plain(server.addr, "/ws/talk", "p").await;
    plain.frame_of("joined").await;
    a.send_compressed(&json!({"type":"join","room":"talk"})).await;
    a.frame_of("joined").await;
    let body = chat_body(7);
    a.send_compressed(&json!({"type":"send","room":"talk","body":body,"ref":"c1"})).await;
    assert_eq!(a.frame_of("ack").await.json()["ref"], "c1");
    assert_eq!(plain.frame_of("message").await.json()["body"], body);
    // Uncompressed messages on a compressing connection are fine too.
    a.send_plain(&json!({"type":"ping","ref":"x"})).await;
    assert_eq!(a.frame_of("pong").await.json()["ref"], "x");
    // A compressed message in fragments: RSV1 on the first only.
    let z = deflate(json!({"type":"ping","ref":"frag"}).to_string().as_bytes());
    let (head, tail) = z.split_at(z.len() / 2);
    a.send_raw(0x41, head).await;
    a.send_raw(0x80, tail).await;
    assert_eq!(a.frame_of("pong").await.json()["ref"], "frag");
}

#[tokio::test]
async fn a_zip_bomb_closes_with_1009_and_the_server_goes_on() {
    let server = TestServer::start(&["--compression", "--max-message-bytes", "65536"]).await;
    let mut a = Peer::compressing(server.addr, "/ws", "bomb").await;
    // 16 MiB of spaces inside a string: about 16 KiB on the wire.
    let huge = format!(r#"{{"type":"ping","ref":"{}"}}"#, " ".repeat(16 << 20));
    let bomb = deflate(huge.as_bytes());
    assert!(bomb.len() < 65536, "{}", bomb.len());
    a.send_raw(0xC1, &bomb).await;
    assert_eq!(a.close_code().await, Some(1009));
    // Just over the limit once inflated is refused too; at the limit is fine.
    let mut b = Peer::compressing(server.addr, "/ws", "edge").await;
    let ping = |len: usize| format!(r#"{{"type":"ping","ref":"{}"}}"#, "a".repeat(len - 24));
    let at_limit = ping(65536);
    assert_eq!(at_limit.len(), 65536);
    b.send_raw(0xC1, &deflate(at_limit.as_bytes())).await;
    assert_eq!(b.frame_of("pong").await.json()["ref"].as_str().unwrap().len(), 65536 - 24);
    let over = ping(65537);
    b.send_raw(0xC1, &deflate(over.as_bytes())).await;
    assert_eq!(b.close_code().await, Some(1009));
    let mut c = Peer::compressing(server.addr, "/ws", "after").await;
    c.send_compressed(&json!({"type":"ping","ref":"alive"})).await;
    assert_eq!(c.frame_of("pong").await.json()["ref"], "alive");
}

#[tokio::test]
async fn bad_compressed_frames_close_the_connection_and_the_server_goes_on() {
    let server = TestServer::start(&["--compression"]).await;
    let t = token("bad", None, 3600);
    // Garbage that does not inflate: 1007.
    let mut a = Peer::compressing(server.addr, "/ws", "bad").await;
    a.send_raw(0xC1, &[0xFF, 0xFF, 0xFF, 0xFF, 0x00, 0x12]).await;
    assert_eq!(a.close_code().await, Some(1007));
    // Inflates, but not to UTF-8: 1007.
    let mut a = Peer::compressing(server.addr, "/ws", "bad").await;
    a.send_raw(0xC1, &deflate(&[0xC3, 0x28, 0xFF])).await;
    assert_eq!(a.close_code().await, Some(1007));
    // RSV1 without negotiation: 1002.
    let mut p = Peer::connect(server.addr, "/ws", &t, None).await;
    p.send_raw(0xC1, &deflate(br#"{"type":"ping"}"#)).await;
    assert_eq!(p.close_code().await, Some(1002));
    // RSV1 on a continuation or a control frame: 1002.
    let mut a = Peer::compressing(server.addr, "/ws", "bad").await;
    a.send_raw(0x01, b"{").await;
    a.send_raw(0xC0, b"}").await;
    assert_eq!(a.close_code().await, Some(1002));
    let mut a = Peer::compressing(server.addr, "/ws", "bad").await;
    a.send_raw(0xC9, b"").await;
    assert_eq!(a.close_code().await, Some(1002));
    // A compressed binary frame is inflated, then refused like any binary frame.
    let mut a = Peer::compressing(server.addr, "/ws", "bad").await;
    a.send_raw(0xC2, &deflate(b"\x00\x01")).await;
    assert_eq!(a.frame_of("error").await.json()["code"], "bad_request");
    // ...and the connection goes on.
    a.send_compressed(&json!({"type":"ping","ref":"still"})).await;
    assert_eq!(a.frame_of("pong").await.json()["ref"], "still");
    // The server goes on.
    let mut ok = Peer::compressing(server.addr, "/ws", "ok").await;
    ok.join("fine").await;
    ok.send_compressed(&json!({"type":"send","room":"fine","body":chat_body(3)})).await;
    assert!(ok.frame_of("message").await.compressed());
}

/// Runs one close-matrix driver (tests/close_clients) on a spec: its results.
async fn run_driver(program: &Path, script: &str, spec: &Value) -> Vec<Value> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/close_clients");
    let spec_path = std::env::temp_dir().join(format!("chorus-compression-{script}-{}.json", std::process::id()));
    std::fs::write(&spec_path, spec.to_string()).unwrap();
    let child = Command::new(program)
        .arg(dir.join(script))
        .arg(&spec_path)
        .current_dir(&dir)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start {}: {e}", program.display()));
    let output =
        tokio::time::timeout(Duration::from_secs(60), child.wait_with_output()).await.expect("driver hung").unwrap();
    let _ = std::fs::remove_file(&spec_path);
    let stdout = String::from_utf8_lossy(&output.stdout);
    let line = stdout.lines().find_map(|l| l.strip_prefix("RESULTS ")).unwrap_or_else(|| {
        panic!("{script} printed no results:\n{stdout}\n{}", String::from_utf8_lossy(&output.stderr))
    });
    serde_json::from_str(line).unwrap()
}

#[tokio::test]
async fn real_clients_negotiate_and_inflate() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let python = std::env::var_os("CHORUS_TEST_PYTHON")
        .map(PathBuf::from)
        .unwrap_or_else(|| root.join("target/close-clients/venv/bin/python"));
    let chromium = std::env::var_os("CHORUS_TEST_CHROMIUM")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/usr/bin/chromium"));
    let node_ws = root.join("tests/close_clients/node_modules/ws/package.json");
    assert!(
        python.exists() && chromium.exists() && node_ws.exists(),
        "needs Python websockets, Chromium and Node ws: run scripts/setup-close-clients (scripts/test runs it)"
    );
    let server = TestServer::start(&["--compression"]).await;
    for (client, program, script) in
        [("python", python, "python_websockets.py"), ("chromium", PathBuf::from("node"), "chromium.mjs")]
    {
        let room = format!("deflate-{client}");
        // A raw member of the same room sees what went on the wire.
        let mut watcher = Peer::compressing(server.addr, &format!("/ws/{room}"), "watcher").await;
        watcher.frame_of("joined").await;
        let body = chat_body(42);
        let url = format!("ws://{}/ws/{room}?token={}", server.addr, token(client, None, 3600));
        let text = json!({"type":"send","room":room,"body":body}).to_string();
        let spec =
            json!({"timeout_ms": 20_000, "cases": [{"name": "compress", "do": "compress", "url": url, "text": text}]});
        let results = run_driver(&program, script, &spec).await;
        let result = &results[0];
        assert_eq!(result["body"], body, "{client}: {result}");
        match client {
            "python" => {
                assert_eq!(result["extensions"], json!(["permessage-deflate"]), "{result}");
                assert_eq!(result["no_context_takeover"], json!([true]), "{result}");
            }
            _ => assert_eq!(result["extensions"], ANSWER, "{result}"),
        }
        // The client's message reached the room, and the room's frame was the
        // compressed one that this client (having negotiated) got too.
        let seen = watcher.frame_of("message").await;
        assert!(seen.compressed(), "{client}");
        assert_eq!(seen.json()["body"], body);
    }
}

/// Cluster mode: a message published on one node reaches a compressing
/// member of another compressed, and a joiner replayed from Redis (not from
/// what its node delivered) gets the compressed form too.
#[tokio::test]
async fn cluster_nodes_compress_what_redis_delivers_and_replays() {
    let url = std::env::var("CHORUS_TEST_REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".to_owned());
    let prefix = keyspace::TestPrefix::new("compression", &url);
    let node = |url: String, prefix: String| async move {
        TestServer::start(&["--redis-url", &url, "--redis-prefix", &prefix, "--compression"]).await
    };
    let a = node(url.clone(), prefix.as_str().to_owned()).await;
    let b = node(url.clone(), prefix.as_str().to_owned()).await;
    let mut member = Peer::compressing(b.addr, "/ws/c-room", "m").await;
    member.frame_of("joined").await;
    let mut sender = Peer::plain(a.addr, "/ws", "s").await;
    let body = chat_body(9);
    sender.send_plain(&json!({"type":"send","room":"c-room","body":body,"ref":"x"})).await;
    sender.frame_of("ack").await;
    let live = member.frame_of("message").await;
    assert!(live.compressed());
    assert_eq!(live.json()["body"], body);
    // A joiner on a node with no member of the room: replayed from Redis.
    let c = node(url, prefix.as_str().to_owned()).await;
    let mut joiner = Peer::compressing(c.addr, "/ws", "j").await;
    joiner.send_plain(&json!({"type":"join","room":"c-room","since":0})).await;
    let replayed = joiner.frame_of("message").await;
    assert!(replayed.compressed());
    assert_eq!(replayed.text(), live.text());
    assert_eq!(joiner.frame_of("joined").await.json()["recovered"], true);
}

/// Presence frames follow the rule per connection: a compressing
/// subscriber gets its state and diffs compressed, a plain one plain.
#[tokio::test]
async fn presence_frames_are_compressed_for_those_that_negotiated() {
    let server = TestServer::start(&["--compression", "--compression-min-bytes", "0"]).await;
    let mut z = Peer::compressing(server.addr, "/ws", "zed").await;
    let mut p = Peer::plain(server.addr, "/ws", "pat").await;
    z.send_plain(&json!({"type":"join","room":"pr","presence":true})).await;
    let state = z.frame_of("presence_state").await;
    assert!(state.compressed());
    assert_eq!(state.json()["members"][0]["sub"], "zed");
    p.send_plain(&json!({"type":"join","room":"pr","presence":true})).await;
    assert!(!p.frame_of("presence_state").await.compressed());
    // pat's join reaches zed as a diff, compressed.
    let diff = z.frame_of("presence_diff").await;
    assert!(diff.compressed());
    assert_eq!(diff.json()["joins"], json!(["pat"]));
}
