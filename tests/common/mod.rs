//! Harness of the black-box integration tests: starts the real `chorus`
//! binary on a free port and talks to it over real sockets.
//!
//! Every wait has a generous hang guard ([`GUARD`]); none of them is a timed
//! assertion, the machine running the tests may be slow and shared.

#![allow(dead_code)]

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use futures_util::{SinkExt, StreamExt};
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde_json::{json, Value};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpSocket, TcpStream};
use tokio::process::{Child, Command};
use tokio::sync::mpsc;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::handshake::client::Request;
use tokio_tungstenite::tungstenite::http::HeaderValue;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::{self, Message};
use tokio_tungstenite::WebSocketStream;

/// The HS256 secret every [`TestServer::start`] server trusts.
pub const SECRET: &str = "chorus-integration-test-secret";

/// Hang guard of every wait: long enough never to fire on a healthy but
/// busy machine, short enough that a hung test fails rather than stalls.
pub const GUARD: Duration = Duration::from_secs(10);

/// Guard of server start-up and exit.
const PROCESS_GUARD: Duration = Duration::from_secs(30);

// ---------------------------------------------------------------------------
// The server process
// ---------------------------------------------------------------------------

/// A running `chorus serve`, killed when dropped.
pub struct TestServer {
    pub addr: SocketAddr,
    /// The `--admin-listen` address, when the server has one.
    pub admin: Option<SocketAddr>,
    child: Child,
    stdout: mpsc::UnboundedReceiver<String>,
    stderr: Arc<Mutex<String>>,
}

impl TestServer {
    /// `chorus serve --listen 127.0.0.1:0 --jwt-secret SECRET <extra_args>`.
    pub async fn start(extra_args: &[&str]) -> Self {
        let mut args = vec!["--jwt-secret", SECRET];
        args.extend_from_slice(extra_args);
        Self::start_raw(&args).await
    }

    /// `chorus serve --listen 127.0.0.1:0 <args>`: no key unless `args` gives one.
    pub async fn start_raw(args: &[&str]) -> Self {
        Self::start_logging("info", args).await
    }

    /// [`TestServer::start_raw`] with `RUST_LOG` set to `rust_log`.
    pub async fn start_logging(rust_log: &str, args: &[&str]) -> Self {
        let mut command = Command::new(env!("CARGO_BIN_EXE_chorus"));
        command.arg("serve").args(["--listen", "127.0.0.1:0"]).args(args);
        // Keep the developer's environment out of the server's configuration.
        for (key, _) in std::env::vars_os() {
            if key.to_string_lossy().starts_with("CHORUS_") {
                command.env_remove(key);
            }
        }
        command
            .env("RUST_LOG", rust_log)
            // Tests stop servers at once unless they pass the drain flags (flags win).
            .env("CHORUS_DRAIN_PERIOD", "0s")
            .env("CHORUS_CLOSE_SPREAD", "0s")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true);
        let mut child = command.spawn().expect("cannot spawn the chorus binary");

        let (tx, mut stdout) = mpsc::unbounded_channel();
        let out = child.stdout.take().expect("piped stdout");
        tokio::spawn(async move {
            let mut lines = BufReader::new(out).lines();
            while let Ok(Some(line)) = lines.next_line().await {
                println!("[chorus stdout] {line}");
                let _ = tx.send(line);
            }
        });
        let stderr = Arc::new(Mutex::new(String::new()));
        let err = child.stderr.take().expect("piped stderr");
        let sink = stderr.clone();
        tokio::spawn(async move {
            let mut lines = BufReader::new(err).lines();
            while let Ok(Some(line)) = lines.next_line().await {
                eprintln!("[chorus stderr] {line}");
                let mut s = sink.lock().unwrap();
                s.push_str(&line);
                s.push('\n');
            }
        });

        let mut admin = None;
        let addr = loop {
            let line = tokio::time::timeout(PROCESS_GUARD, stdout.recv())
                .await
                .expect("the server did not print its address in time");
            let Some(line) = line else {
                // Give stderr a moment to be drained for the message.
                tokio::time::sleep(Duration::from_millis(200)).await;
                panic!("the server exited before listening; stderr:\n{}", stderr.lock().unwrap());
            };
            if let Some(addr) = line.strip_prefix("chorus admin listening on ") {
                admin = Some(addr.trim().parse().expect("unparsable admin address"));
            }
            if let Some(addr) = line.strip_prefix("chorus listening on ") {
                break addr.trim().parse().expect("unparsable listen address");
            }
        };
        Self { addr, admin, child, stdout, stderr }
    }

    /// The next line the server printed on stdout after its address line.
    pub async fn next_stdout_line(&mut self) -> Option<String> {
        tokio::time::timeout(GUARD, self.stdout.recv()).await.expect("no stdout line in time")
    }

    pub fn pid(&self) -> i32 {
        self.child.id().expect("the server already exited") as i32
    }

    pub fn signal(&self, signal: i32) {
        // SAFETY: kill(2) on our own child's pid has no memory-safety concerns.
        let rc = unsafe { libc::kill(self.pid(), signal) };
        assert_eq!(rc, 0, "kill({signal}) failed");
    }

    pub fn sigterm(&self) {
        self.signal(libc::SIGTERM);
    }

    pub fn sigint(&self) {
        self.signal(libc::SIGINT);
    }

    /// Waits for the process to exit.
    pub async fn wait_exit(&mut self) -> ExitStatus {
        tokio::time::timeout(PROCESS_GUARD, self.child.wait())
            .await
            .expect("the server did not exit in time")
            .expect("cannot wait for the server")
    }

    pub fn stderr(&self) -> String {
        self.stderr.lock().unwrap().clone()
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{}", self.addr, path)
    }

    /// A URL on the admin listener; panics when the server has none.
    pub fn admin_url(&self, path: &str) -> String {
        format!("http://{}{}", self.admin.expect("the server has no --admin-listen"), path)
    }

    pub fn ws_url(&self, path: &str) -> String {
        format!("ws://{}{}", self.addr, path)
    }

    /// Connects to `path` with `Authorization: Bearer <token>`.
    pub async fn connect(&self, path: &str, token: &str) -> Client {
        Client::connect(self.addr, path, token).await
    }

    /// Connects to `/ws/{room}` and reads the `joined` that comes first.
    pub async fn connect_joined(&self, room: &str, token: &str) -> (Client, Value) {
        let mut client = self.connect(&format!("/ws/{room}"), token).await;
        let joined = client.recv_type("joined").await;
        assert_eq!(joined["room"], room);
        (client, joined)
    }

    /// The body of `GET /metrics` (on the admin listener when there is one).
    pub async fn metrics(&self) -> String {
        let url = if self.admin.is_some() { self.admin_url("/metrics") } else { self.url("/metrics") };
        let response = reqwest::get(url).await.expect("GET /metrics");
        assert_eq!(response.status(), 200);
        response.text().await.unwrap()
    }

    /// The value of one unlabelled sample of `/metrics`, e.g. `chorus_connections`.
    pub async fn metric(&self, name: &str) -> f64 {
        let text = self.metrics().await;
        metric_value(&text, name).unwrap_or_else(|| panic!("no metric {name} in:\n{text}"))
    }
}

/// The value of the sample `name` (no labels) in a Prometheus text exposition.
pub fn metric_value(text: &str, name: &str) -> Option<f64> {
    text.lines().find_map(|line| {
        let rest = line.strip_prefix(name)?.strip_prefix(' ')?;
        rest.split_whitespace().next()?.parse().ok()
    })
}

// ---------------------------------------------------------------------------
// Tokens
// ---------------------------------------------------------------------------

pub fn unix_now() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_secs()
}

/// Claims `{sub, exp: now + ttl, iat: now, rooms?}`.
pub fn claims(sub: &str, rooms: Option<&[&str]>, ttl_secs: i64) -> Value {
    let now = unix_now() as i64;
    let mut claims = json!({"sub": sub, "exp": now + ttl_secs, "iat": now});
    if let Some(rooms) = rooms {
        claims["rooms"] = json!(rooms);
    }
    claims
}

/// An HS256 token signed with [`SECRET`].
pub fn token(sub: &str, rooms: Option<&[&str]>, ttl_secs: i64) -> String {
    sign(&claims(sub, rooms, ttl_secs))
}

/// Signs arbitrary claims with HS256 and [`SECRET`].
pub fn sign(claims: &Value) -> String {
    sign_hs(Algorithm::HS256, SECRET.as_bytes(), claims)
}

/// Signs with an HMAC algorithm and the given secret.
pub fn sign_hs(alg: Algorithm, secret: &[u8], claims: &Value) -> String {
    let key = EncodingKey::from_secret(secret).expect("HMAC key");
    jsonwebtoken::encode(&Header::new(alg), claims, &key).expect("cannot sign")
}

/// Signs with an RS256 / ES256 private key in PEM form.
pub fn sign_pem(alg: Algorithm, private_pem: &[u8], claims: &Value) -> String {
    let key = match alg {
        Algorithm::RS256 => EncodingKey::from_rsa_pem(private_pem),
        Algorithm::ES256 => EncodingKey::from_ec_pem(private_pem),
        other => panic!("no PEM signing for {other:?}"),
    }
    .expect("cannot load the private key");
    jsonwebtoken::encode(&Header::new(alg), claims, &key).expect("cannot sign")
}

/// A fresh directory under the system temp dir, removed when dropped.
pub struct TempDir(PathBuf);

impl TempDir {
    pub fn new(tag: &str) -> Self {
        static COUNTER: AtomicU64 = AtomicU64::new(0);
        let nanos = SystemTime::now().duration_since(UNIX_EPOCH).unwrap().subsec_nanos();
        let n = COUNTER.fetch_add(1, Ordering::Relaxed);
        let dir = std::env::temp_dir().join(format!("chorus-test-{tag}-{}-{n}-{nanos}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("cannot create a temp dir");
        Self(dir)
    }

    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A key pair made with the `openssl` command: `(private PKCS#8 PEM path,
/// public PEM path)`. `kind` is `"rsa"` or `"ec"` (P-256).
pub fn openssl_keypair(dir: &TempDir, kind: &str) -> (PathBuf, PathBuf) {
    let private = dir.path().join(format!("{kind}.pem"));
    let public = dir.path().join(format!("{kind}.pub.pem"));
    let opts: &[&str] = match kind {
        "rsa" => &["-algorithm", "RSA", "-pkeyopt", "rsa_keygen_bits:2048"],
        "ec" => &["-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-256"],
        other => panic!("unknown key kind {other}"),
    };
    let run = |args: &[&str]| {
        let out = std::process::Command::new("openssl")
            .args(args)
            .output()
            .expect("the `openssl` command is needed to make RS256/ES256 test keys");
        assert!(out.status.success(), "openssl {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    };
    let mut genpkey = vec!["genpkey"];
    genpkey.extend_from_slice(opts);
    genpkey.extend_from_slice(&["-out", private.to_str().unwrap()]);
    run(&genpkey);
    run(&["pkey", "-in", private.to_str().unwrap(), "-pubout", "-out", public.to_str().unwrap()]);
    (private, public)
}

// ---------------------------------------------------------------------------
// WebSocket client (tokio-tungstenite)
// ---------------------------------------------------------------------------

/// A `ws://` request for `path` with no authentication yet.
pub fn ws_request(addr: SocketAddr, path: &str) -> Request {
    format!("ws://{addr}{path}").into_client_request().expect("valid ws request")
}

/// Adds `Authorization: Bearer <token>`.
pub fn with_bearer(mut request: Request, token: &str) -> Request {
    let value = HeaderValue::from_str(&format!("Bearer {token}")).unwrap();
    request.headers_mut().insert("authorization", value);
    request
}

/// Adds an `Origin` header.
pub fn with_origin(mut request: Request, origin: &str) -> Request {
    request.headers_mut().insert("origin", HeaderValue::from_str(origin).unwrap());
    request
}

/// Opens a TCP connection, optionally with a small receive buffer (set
/// before connecting, so the advertised window is small from the start).
pub async fn tcp_connect(addr: SocketAddr, recv_buffer: Option<u32>) -> TcpStream {
    let socket = TcpSocket::new_v4().unwrap();
    if let Some(size) = recv_buffer {
        socket.set_recv_buffer_size(size).unwrap();
    }
    let stream = tokio::time::timeout(GUARD, socket.connect(addr)).await.expect("connect hung").expect("connect");
    stream.set_nodelay(true).unwrap();
    stream
}

/// The WebSocket handshake; `Err` carries the refusal (`Error::Http`).
pub async fn try_connect(
    addr: SocketAddr,
    request: Request,
    recv_buffer: Option<u32>,
) -> Result<Client, tungstenite::Error> {
    let stream = tcp_connect(addr, recv_buffer).await;
    let (ws, response) = tokio::time::timeout(GUARD, tokio_tungstenite::client_async(request, stream))
        .await
        .expect("WebSocket handshake hung")?;
    assert_eq!(response.status(), 101);
    Ok(Client { ws })
}

/// Attempts the handshake and returns the HTTP status of the refusal.
pub async fn refused_status(addr: SocketAddr, request: Request) -> u16 {
    match try_connect(addr, request, None).await {
        Ok(_) => panic!("the handshake succeeded; expected a refusal"),
        Err(tungstenite::Error::Http(response)) => response.status().as_u16(),
        Err(e) => panic!("expected an HTTP refusal, got {e}"),
    }
}

/// A WebSocket client with hang-guarded reads.
pub struct Client {
    pub ws: WebSocketStream<TcpStream>,
}

static NEXT_REF: AtomicU64 = AtomicU64::new(1);

/// A `ref` no other request of this test process uses.
pub fn unique_ref(prefix: &str) -> String {
    format!("{prefix}-{}", NEXT_REF.fetch_add(1, Ordering::Relaxed))
}

impl Client {
    pub async fn connect(addr: SocketAddr, path: &str, token: &str) -> Self {
        let request = with_bearer(ws_request(addr, path), token);
        try_connect(addr, request, None).await.unwrap_or_else(|e| panic!("connect {path}: {e}"))
    }

    /// Connects with the token in the `?token=` query parameter.
    pub async fn connect_query(addr: SocketAddr, path: &str, token: &str) -> Self {
        let sep = if path.contains('?') { '&' } else { '?' };
        let request = ws_request(addr, &format!("{path}{sep}token={token}"));
        try_connect(addr, request, None).await.unwrap_or_else(|e| panic!("connect {path}: {e}"))
    }

    pub async fn send(&mut self, message: Message) {
        tokio::time::timeout(GUARD, self.ws.send(message)).await.expect("send hung").expect("send failed");
    }

    pub async fn send_json(&mut self, value: &Value) {
        self.send(Message::text(value.to_string())).await;
    }

    pub async fn send_text(&mut self, text: &str) {
        self.send(Message::text(text.to_owned())).await;
    }

    /// The next event of the stream, `None` at its end.
    pub async fn next(&mut self) -> Option<Result<Message, tungstenite::Error>> {
        tokio::time::timeout(GUARD, self.ws.next()).await.expect("no frame from the server in time")
    }

    /// The next message of any kind (pings and pongs included).
    pub async fn recv_message(&mut self) -> Message {
        match self.next().await {
            Some(Ok(message)) => message,
            Some(Err(e)) => panic!("read failed: {e}"),
            None => panic!("the connection ended"),
        }
    }

    /// The next text frame, raw; WebSocket pings and pongs are skipped.
    pub async fn recv_text(&mut self) -> String {
        loop {
            match self.recv_message().await {
                Message::Text(text) => return text.as_str().to_owned(),
                Message::Ping(_) | Message::Pong(_) => {}
                other => panic!("expected a text frame, got {other:?}"),
            }
        }
    }

    /// The next text frame as JSON.
    pub async fn recv_json(&mut self) -> Value {
        let text = self.recv_text().await;
        serde_json::from_str(&text).unwrap_or_else(|e| panic!("server frame is not JSON ({e}): {text}"))
    }

    /// The next text frame, which must have this `type`.
    pub async fn recv_type(&mut self, kind: &str) -> Value {
        let value = self.recv_json().await;
        assert_eq!(value["type"], kind, "unexpected frame: {value}");
        value
    }

    /// The seqs of the next `count` `message` frames, skipping any other frame.
    pub async fn message_seqs(&mut self, count: usize) -> Vec<u64> {
        let mut seqs = Vec::new();
        while seqs.len() < count {
            let frame = self.recv_json().await;
            if frame["type"] == "message" {
                seqs.push(frame["seq"].as_u64().unwrap());
            }
        }
        seqs
    }

    /// The next frame must be an `error` with `code` (and `ref` when given).
    pub async fn recv_error(&mut self, code: &str, reference: Option<&str>) -> Value {
        let value = self.recv_type("error").await;
        assert_eq!(value["code"], code, "unexpected error: {value}");
        assert!(value["message"].as_str().is_some_and(|m| !m.is_empty()), "error without message: {value}");
        match reference {
            Some(r) => assert_eq!(value["ref"], r, "error without the request's ref: {value}"),
            None => assert!(value.get("ref").is_none(), "unexpected ref: {value}"),
        }
        value
    }

    /// Sends an application `ping` and expects its `pong` as the very next
    /// frame: proves the connection is open and that nothing else was queued
    /// before the pong.
    pub async fn ping_pong(&mut self) {
        let reference = unique_ref("alive");
        self.send_json(&json!({"type": "ping", "ref": reference})).await;
        let pong = self.recv_json().await;
        assert_eq!(pong, json!({"type": "pong", "ref": reference}), "expected our pong next");
    }

    /// Joins `room` and returns the `joined` reply.
    pub async fn join(&mut self, room: &str) -> Value {
        self.send_json(&json!({"type": "join", "room": room})).await;
        let joined = self.recv_type("joined").await;
        assert_eq!(joined["room"], room);
        joined
    }

    /// Sends to `room` with a fresh `ref` and returns the `ack`'s seq; the
    /// sender must not be a member of `room` (a member gets its `message` first).
    pub async fn publish(&mut self, room: &str, body: Value) -> u64 {
        let reference = unique_ref("pub");
        self.send_json(&json!({"type": "send", "room": room, "body": body, "ref": reference})).await;
        let ack = self.recv_type("ack").await;
        assert_eq!(ack["ref"], reference);
        assert_eq!(ack["room"], room);
        ack["seq"].as_u64().expect("ack seq")
    }

    /// Reads until the server's close frame (skipping everything else) and
    /// returns its code and reason; panics if the connection ends without one.
    pub async fn recv_close(&mut self) -> (u16, String) {
        let (_, close) = self.recv_until_close().await;
        close.expect("the connection ended without a close frame")
    }

    /// Every text frame until the close frame or the end of the connection,
    /// and the close's code and reason when one came.
    pub async fn recv_until_close(&mut self) -> (Vec<Value>, Option<(u16, String)>) {
        let mut texts = Vec::new();
        loop {
            match self.next().await {
                Some(Ok(Message::Text(text))) => texts.push(serde_json::from_str(text.as_str()).unwrap()),
                Some(Ok(Message::Close(frame))) => return (texts, Some(close_parts(frame))),
                Some(Ok(_)) => {}
                Some(Err(_)) | None => return (texts, None),
            }
        }
    }

    /// Fails if a text frame arrives within `within`. Use sparingly: the
    /// ping/pong fence of [`Client::ping_pong`] is the deterministic way.
    pub async fn expect_no_frame_within(&mut self, within: Duration) {
        let deadline = tokio::time::Instant::now() + within;
        loop {
            match tokio::time::timeout_at(deadline, self.ws.next()).await {
                Err(_) => return,
                Ok(Some(Ok(Message::Ping(_) | Message::Pong(_)))) => {}
                Ok(other) => panic!("expected nothing, got {other:?}"),
            }
        }
    }

    /// Sends a close frame with `code`.
    pub async fn close(&mut self, code: u16, reason: &str) {
        let frame = CloseFrame { code: CloseCode::from(code), reason: reason.into() };
        self.send(Message::Close(Some(frame))).await;
    }
}

fn close_parts(frame: Option<CloseFrame>) -> (u16, String) {
    match frame {
        Some(f) => (u16::from(f.code), f.reason.as_str().to_owned()),
        // A close frame with no status code.
        None => (1005, String::new()),
    }
}

// ---------------------------------------------------------------------------
// Raw WebSocket client, for what a well-behaved library will not do
// ---------------------------------------------------------------------------

pub const OP_CONTINUATION: u8 = 0x0;
pub const OP_TEXT: u8 = 0x1;
pub const OP_BINARY: u8 = 0x2;
pub const OP_CLOSE: u8 = 0x8;
pub const OP_PING: u8 = 0x9;
pub const OP_PONG: u8 = 0xA;

/// A hand-rolled RFC 6455 client over a plain TCP stream: it sends exactly
/// the bytes it is told to (unmasked frames included) and answers nothing
/// by itself.
pub struct RawClient {
    stream: TcpStream,
    buf: Vec<u8>,
}

impl RawClient {
    /// Performs the opening handshake for `path` with a Bearer token.
    pub async fn connect(addr: SocketAddr, path: &str, token: &str) -> Self {
        let mut stream = tcp_connect(addr, None).await;
        let request = format!(
            "GET {path} HTTP/1.1\r\nHost: {addr}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
             Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\
             Authorization: Bearer {token}\r\n\r\n"
        );
        stream.write_all(request.as_bytes()).await.unwrap();
        let mut buf = Vec::new();
        let head_end = loop {
            if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                break i + 4;
            }
            let mut chunk = [0u8; 4096];
            let n = tokio::time::timeout(GUARD, stream.read(&mut chunk)).await.expect("handshake hung").unwrap();
            assert!(n > 0, "connection closed during the handshake");
            buf.extend_from_slice(&chunk[..n]);
        };
        let head = String::from_utf8_lossy(&buf[..head_end]).into_owned();
        assert!(head.starts_with("HTTP/1.1 101"), "handshake refused: {head}");
        // RFC 6455's sample key has this well-known accept value.
        assert!(head.contains("s3pPLMBiTxaQ9kYGzzhZRbK+xOo="), "bad Sec-WebSocket-Accept: {head}");
        buf.drain(..head_end);
        Self { stream, buf }
    }

    /// The socket and the bytes already read past the handshake, for tests
    /// that read and write at once.
    pub fn into_parts(self) -> (TcpStream, Vec<u8>) {
        (self.stream, self.buf)
    }

    /// Writes one frame; `mask: None` sends it unmasked (a protocol error
    /// for a client).
    pub async fn send_frame(&mut self, fin: bool, opcode: u8, payload: &[u8], mask: Option<[u8; 4]>) {
        let mut frame = vec![(u8::from(fin) << 7) | opcode];
        let mask_bit = if mask.is_some() { 0x80 } else { 0 };
        match payload.len() {
            n if n < 126 => frame.push(mask_bit | n as u8),
            n if n <= 0xFFFF => {
                frame.push(mask_bit | 126);
                frame.extend_from_slice(&(n as u16).to_be_bytes());
            }
            n => {
                frame.push(mask_bit | 127);
                frame.extend_from_slice(&(n as u64).to_be_bytes());
            }
        }
        match mask {
            Some(mask) => {
                frame.extend_from_slice(&mask);
                frame.extend(payload.iter().enumerate().map(|(i, b)| b ^ mask[i % 4]));
            }
            None => frame.extend_from_slice(payload),
        }
        tokio::time::timeout(GUARD, self.stream.write_all(&frame)).await.expect("write hung").unwrap();
    }

    /// Sends a masked text frame.
    pub async fn send_text(&mut self, text: &str) {
        self.send_frame(true, OP_TEXT, text.as_bytes(), Some([0x12, 0x34, 0x56, 0x78])).await;
    }

    /// The next server frame `(opcode, payload)`, or `None` once the server
    /// closed the TCP connection. Server frames are never fragmented here.
    pub async fn read_frame(&mut self) -> Option<(u8, Vec<u8>)> {
        loop {
            if let Some((frame, used)) = parse_server_frame(&self.buf) {
                self.buf.drain(..used);
                return Some(frame);
            }
            let mut chunk = vec![0u8; 64 * 1024];
            let read = tokio::time::timeout(GUARD, self.stream.read(&mut chunk)).await.expect("no frame in time");
            match read {
                Ok(0) | Err(_) => return None,
                Ok(n) => self.buf.extend_from_slice(&chunk[..n]),
            }
        }
    }

    /// Reads frames until the server's close frame: returns the opcodes seen
    /// before it and the close code and reason (`None` if the connection
    /// ended without one).
    pub async fn read_until_close(&mut self) -> (Vec<u8>, Option<(u16, String)>) {
        let mut opcodes = Vec::new();
        while let Some((opcode, payload)) = self.read_frame().await {
            if opcode == OP_CLOSE {
                let code = u16::from_be_bytes([payload[0], payload[1]]);
                return (opcodes, Some((code, String::from_utf8(payload[2..].to_vec()).unwrap())));
            }
            opcodes.push(opcode);
        }
        (opcodes, None)
    }
}

/// Parses one unmasked server frame off the front of `buf`.
fn parse_server_frame(buf: &[u8]) -> Option<((u8, Vec<u8>), usize)> {
    let [b0, b1, ..] = *buf else { return None };
    assert_eq!(b1 & 0x80, 0, "server frames must not be masked");
    assert_ne!(b0 & 0x80, 0, "this raw client does not expect fragmented server frames");
    let (len, header) = match b1 & 0x7F {
        126 => (usize::from(u16::from_be_bytes([*buf.get(2)?, *buf.get(3)?])), 4),
        127 => {
            let bytes: [u8; 8] = buf.get(2..10)?.try_into().unwrap();
            (u64::from_be_bytes(bytes) as usize, 10)
        }
        n => (usize::from(n), 2),
    };
    let payload = buf.get(header..header + len)?;
    Some(((b0 & 0x0F, payload.to_vec()), header + len))
}

// ---------------------------------------------------------------------------
// HTTP
// ---------------------------------------------------------------------------

/// An HTTP client with a hang guard.
pub fn http_client() -> reqwest::Client {
    reqwest::Client::builder().timeout(GUARD).build().unwrap()
}

/// Sends the WebSocket upgrade request with plain HTTP (so the refusal's
/// body is read whole) and returns the status and the JSON body.
pub async fn upgrade_refusal(url: &str, headers: &[(&str, &str)]) -> (u16, Value) {
    let mut request = http_client()
        .get(url)
        .header("connection", "Upgrade")
        .header("upgrade", "websocket")
        .header("sec-websocket-version", "13")
        .header("sec-websocket-key", "dGhlIHNhbXBsZSBub25jZQ==");
    for (name, value) in headers {
        request = request.header(*name, *value);
    }
    let response = request.send().await.expect("upgrade request");
    let status = response.status().as_u16();
    assert_ne!(status, 101, "expected a refusal, the server upgraded");
    let content_type = response.headers().get("content-type").map(|v| v.to_str().unwrap().to_owned());
    let text = response.text().await.unwrap();
    assert_eq!(content_type.as_deref(), Some("application/json"), "refusal body: {text}");
    (status, serde_json::from_str(&text).unwrap_or_else(|e| panic!("refusal body is not JSON ({e}): {text}")))
}

/// Checks a commit a binary says it was built from against the checkout the
/// tests run in: a prefix of `git rev-parse HEAD` (at least 7 digits), or
/// `unknown` where git cannot tell (a tarball, no git installed).
pub fn assert_is_checkout_commit(printed: &str) {
    let head = std::process::Command::new("git")
        .args(["rev-parse", "HEAD"])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .ok()
        .filter(|out| out.status.success())
        .map(|out| String::from_utf8(out.stdout).unwrap().trim().to_owned());
    match head {
        Some(head) => assert!(
            printed.len() >= 7 && printed.chars().all(|c| c.is_ascii_hexdigit()) && head.starts_with(printed),
            "built from commit {printed:?}, but the checkout is at {head}"
        ),
        None => assert_eq!(printed, "unknown", "no git checkout here, yet the build names a commit"),
    }
}

/// The PostgreSQL server the tests use: `CHORUS_TEST_DATABASE_URL`, or the
/// machine's own (each test creates and drops a database of its own there).
pub fn test_database_url() -> String {
    std::env::var("CHORUS_TEST_DATABASE_URL").unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".into())
}

/// `url` with its database name replaced.
pub fn with_database(url: &str, name: &str) -> String {
    let (head, query) = url.split_once('?').map_or((url, None), |(h, q)| (h, Some(q)));
    let base = head.rsplit_once('/').map_or(head, |(b, _)| b);
    match query {
        Some(q) => format!("{base}/{name}?{q}"),
        None => format!("{base}/{name}"),
    }
}
