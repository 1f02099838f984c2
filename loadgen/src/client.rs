//! The client side of a connection: resolve `ws://` URLs, open the TCP
//! socket (bound to a spread of loopback source addresses when the server is
//! local), do the HTTP/1.1 upgrade by hand with the `Authorization: Bearer`
//! header, and turn the socket into a frame reader ([`crate::frames`]) plus
//! a small frame writer that batches several frames into one write.
//!
//! The handshake is hand-rolled rather than going through hyper: it is a
//! single write and a read or two, it lets a refused upgrade (401/403) be
//! reported with the server's own JSON reason, and it keeps one allocation
//! and no extra task per connection.

use std::fmt;
use std::io;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context as _, Result};
use fastwebsockets::OpCode;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};
use tokio_rustls::rustls::pki_types::pem::PemObject;
use tokio_rustls::rustls::pki_types::{CertificateDer, ServerName};
use tokio_rustls::TlsConnector;

use crate::frames::FrameReader;

/// Connections whose upgrade negotiated permessage-deflate.
pub static COMPRESSED_CONNECTIONS: AtomicU64 = AtomicU64::new(0);

/// What loadgen offers with `--compression`: what browsers offer.
const DEFLATE_OFFER: &str = "permessage-deflate; client_max_window_bits";

/// Largest upgrade response head we read.
const MAX_HEAD: usize = 16 << 10;

/// One server node.
#[derive(Clone, Debug)]
pub struct Target {
    pub url: String,
    pub addr: SocketAddr,
    /// Value of the Host header.
    pub host: String,
    /// Request path, e.g. `/ws`.
    pub path: String,
    /// `wss://`: the host name the certificate must be for.
    pub tls_name: Option<String>,
}

/// The reading and writing halves of a connection, plain or TLS.
pub type ReadHalf = Box<dyn AsyncRead + Send + Unpin>;
pub type WriteHalf = Box<dyn AsyncWrite + Send + Unpin>;

/// A TLS client that trusts only the certificates in `path` (PEM): the
/// self-signed or private-CA certificate of the servers under test.
pub fn tls_trusting(path: &std::path::Path) -> Result<TlsConnector> {
    let mut roots = tokio_rustls::rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_file_iter(path).with_context(|| format!("cannot read {}", path.display()))? {
        roots.add(cert.with_context(|| format!("bad certificate in {}", path.display()))?)?;
    }
    if roots.is_empty() {
        bail!("no certificate in {}", path.display());
    }
    let provider = Arc::new(tokio_rustls::rustls::crypto::ring::default_provider());
    let config = tokio_rustls::rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(TlsConnector::from(Arc::new(config)))
}

impl Target {
    /// Parse `ws://host[:port][/path]` and resolve the host.
    pub async fn resolve(url: &str) -> Result<Target> {
        let (host, port, path) = parse_ws_url(url)?;
        let tls_name = url.starts_with("wss://").then(|| host.clone());
        let addrs: Vec<SocketAddr> = tokio::net::lookup_host((host.as_str(), port))
            .await
            .with_context(|| format!("cannot resolve host of {url}"))?
            .collect();
        // Prefer IPv4: `localhost` servers usually listen on 127.0.0.1.
        let addr = addrs
            .iter()
            .find(|a| a.is_ipv4())
            .or_else(|| addrs.first())
            .copied()
            .ok_or_else(|| anyhow!("host of {url} resolves to no address"))?;
        let default_port = if tls_name.is_some() { 443 } else { 80 };
        let host_header = if port == default_port {
            host.clone()
        } else if host.contains(':') {
            format!("[{host}]:{port}")
        } else {
            format!("{host}:{port}")
        };
        Ok(Target { url: url.to_string(), addr, host: host_header, path, tls_name })
    }
}

/// Split a ws:// or wss:// URL into host, port and path.
pub fn parse_ws_url(url: &str) -> Result<(String, u16, String)> {
    let (rest, default_port) = if let Some(r) = url.strip_prefix("ws://") {
        (r, 80)
    } else if let Some(r) = url.strip_prefix("wss://") {
        (r, 443)
    } else {
        bail!("{url}: expected a ws://host:port or wss://host:port URL")
    };
    let (authority, path) = match rest.find('/') {
        Some(i) => (&rest[..i], &rest[i..]),
        None => (rest, ""),
    };
    let path = if path.is_empty() || path == "/" { "/ws".to_string() } else { path.trim_end_matches('/').to_string() };
    if authority.is_empty() {
        bail!("{url}: no host");
    }
    let (host, port) = if let Some(stripped) = authority.strip_prefix('[') {
        // [v6]:port
        let end = stripped.find(']').ok_or_else(|| anyhow!("{url}: unclosed ["))?;
        let host = &stripped[..end];
        let port = match stripped[end + 1..].strip_prefix(':') {
            Some(p) => p.parse().with_context(|| format!("{url}: bad port"))?,
            None => default_port,
        };
        (host.to_string(), port)
    } else {
        match authority.rsplit_once(':') {
            Some((h, p)) => (h.to_string(), p.parse().with_context(|| format!("{url}: bad port"))?),
            None => (authority.to_string(), default_port),
        }
    };
    Ok((host, port, path))
}

/// Why one connection attempt failed.
#[derive(Debug)]
pub enum ConnectError {
    /// TCP connect failed (refused, unreachable, out of ports...).
    Tcp(io::Error),
    /// No 101 within `--connect-timeout`.
    Timeout,
    /// The server answered the upgrade with another status.
    Http { status: u16, body: String },
    /// Broken or unexpected response, or the socket died mid-handshake.
    Handshake(String),
}

impl ConnectError {
    /// A short key that groups equal failures (the count is kept per key).
    pub fn key(&self) -> String {
        match self {
            ConnectError::Tcp(e) => format!("tcp connect: {}", io_kind(e)),
            ConnectError::Timeout => "timeout".to_string(),
            ConnectError::Http { status, body } => {
                let code = serde_json::from_str::<serde_json::Value>(body)
                    .ok()
                    .and_then(|v| v.get("error").and_then(|e| e.as_str()).map(str::to_string));
                match code {
                    Some(c) => format!("HTTP {status} {c}"),
                    None => format!("HTTP {status}"),
                }
            }
            ConnectError::Handshake(_) => "handshake".to_string(),
        }
    }

    /// What the failure means, in words.
    pub fn explain(&self) -> String {
        match self {
            ConnectError::Tcp(e) if e.kind() == io::ErrorKind::ConnectionRefused => {
                format!("nothing listens at the URL (connection refused: {e})")
            }
            ConnectError::Tcp(e) => format!("cannot reach the server: {e}"),
            ConnectError::Timeout => {
                "no upgrade response within --connect-timeout (server overloaded or not a chorus server?)".to_string()
            }
            ConnectError::Http { status: 401, body } => {
                format!("the server refused the token (HTTP 401): {}", short(body))
            }
            ConnectError::Http { status: 403, body } => {
                format!("the server forbade the connection (HTTP 403: rooms claim or Origin): {}", short(body))
            }
            ConnectError::Http { status: 404, body } => {
                format!("no WebSocket endpoint at this path (HTTP 404; is the URL path right?): {}", short(body))
            }
            ConnectError::Http { status, body } => {
                format!("the server did not upgrade (HTTP {status}): {}", short(body))
            }
            ConnectError::Handshake(m) => format!("broken upgrade: {m}"),
        }
    }
}

impl fmt::Display for ConnectError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.explain())
    }
}

impl std::error::Error for ConnectError {}

fn io_kind(e: &io::Error) -> String {
    match e.raw_os_error() {
        Some(code) => format!("{:?} (os error {code})", e.kind()),
        None => format!("{:?}", e.kind()),
    }
}

fn short(s: &str) -> String {
    let s = s.trim();
    if s.len() > 200 {
        let mut end = 200;
        while !s.is_char_boundary(end) {
            end -= 1;
        }
        format!("{}...", &s[..end])
    } else if s.is_empty() {
        "(empty body)".to_string()
    } else {
        s.to_string()
    }
}

/// Opens connections to the targets, round robin, from spread source
/// addresses when the target is on loopback.
pub struct Connector {
    targets: Vec<Target>,
    source_ips: u8,
    timeout: Duration,
    /// For `wss://` targets (`--tls-ca`).
    tls: Option<TlsConnector>,
    /// Offer permessage-deflate.
    compression: bool,
}

/// The frame writer of a connection, shared by the task that sends and the
/// reader (which must answer pings and close frames).
pub type SharedWriter = Arc<tokio::sync::Mutex<Writer>>;

/// An upgraded connection.
pub struct Conn {
    pub reader: FrameReader,
    pub writer: SharedWriter,
    /// TCP connect + upgrade until the 101, nanoseconds.
    pub connect_ns: u64,
    pub target: usize,
}

impl Connector {
    pub fn new(targets: Vec<Target>, source_ips: u8, timeout: Duration) -> Self {
        Self { targets, source_ips: source_ips.max(1), timeout, tls: None, compression: false }
    }

    /// Trusts this TLS client's roots for `wss://` targets.
    pub fn with_tls(mut self, tls: TlsConnector) -> Self {
        self.tls = Some(tls);
        self
    }

    /// Offers permessage-deflate in every upgrade (`--compression`).
    pub fn with_compression(mut self, compression: bool) -> Self {
        self.compression = compression;
        self
    }

    pub fn targets(&self) -> &[Target] {
        &self.targets
    }

    /// Connection `n` (picks target n mod targets, source n mod source-ips).
    pub async fn connect(&self, n: usize, token: &str) -> Result<Conn, ConnectError> {
        let ti = n % self.targets.len();
        let target = &self.targets[ti];
        let source = match target.addr.ip() {
            IpAddr::V4(ip) if ip.is_loopback() && self.source_ips > 1 => {
                let k = (n % self.source_ips as usize) as u8;
                Some(Ipv4Addr::new(127, 0, 0, 1 + k))
            }
            _ => None,
        };
        let start = Instant::now();
        let fut = async {
            let stream = tcp_connect(target.addr, source).await.map_err(ConnectError::Tcp)?;
            let Some(name) = &target.tls_name else {
                let (prefix, stream, deflate) = handshake(stream, target, token, self.compression).await?;
                let (rd, wr) = stream.into_split();
                return Ok((prefix, Box::new(rd) as ReadHalf, Box::new(wr) as WriteHalf, deflate));
            };
            let tls = self.tls.as_ref().ok_or_else(|| ConnectError::Handshake("wss:// needs --tls-ca".into()))?;
            let name = ServerName::try_from(name.clone()).map_err(|e| ConnectError::Handshake(e.to_string()))?;
            let secure = tls.connect(name, stream).await.map_err(|e| ConnectError::Handshake(format!("TLS: {e}")))?;
            let (prefix, secure, deflate) = handshake(secure, target, token, self.compression).await?;
            let (rd, wr) = tokio::io::split(secure);
            Ok((prefix, Box::new(rd) as ReadHalf, Box::new(wr) as WriteHalf, deflate))
        };
        let (prefix, rd, wr, deflate) = match tokio::time::timeout(self.timeout, fut).await {
            Ok(r) => r?,
            Err(_) => return Err(ConnectError::Timeout),
        };
        let connect_ns = start.elapsed().as_nanos() as u64;
        Ok(Conn {
            reader: FrameReader::new(rd, prefix).with_inflate(deflate),
            writer: Arc::new(tokio::sync::Mutex::new(Writer::new(wr))),
            connect_ns,
            target: ti,
        })
    }
}

async fn tcp_connect(addr: SocketAddr, source: Option<Ipv4Addr>) -> io::Result<TcpStream> {
    let sock = if addr.is_ipv4() { TcpSocket::new_v4()? } else { TcpSocket::new_v6()? };
    if let Some(src) = source {
        bind_no_port(&sock);
        sock.bind(SocketAddr::new(IpAddr::V4(src), 0))?;
    }
    let stream = sock.connect(addr).await?;
    stream.set_nodelay(true)?;
    Ok(stream)
}

/// Let the kernel pick the source port at connect time (per destination)
/// instead of at bind time, so binding does not exhaust the port range.
fn bind_no_port(sock: &TcpSocket) {
    use std::os::fd::AsRawFd;
    let one: libc::c_int = 1;
    // SAFETY: a plain setsockopt on a socket we own, with a c_int option
    // value that outlives the call. Failure only loses the optimisation.
    unsafe {
        libc::setsockopt(
            sock.as_raw_fd(),
            libc::IPPROTO_IP,
            libc::IP_BIND_ADDRESS_NO_PORT,
            &one as *const libc::c_int as *const libc::c_void,
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        );
    }
}

/// Send the upgrade request and read the response head. Returns the bytes
/// read past the head (the first frames, if the server was quick) and the
/// stream.
async fn handshake<S: AsyncRead + AsyncWrite + Unpin>(
    mut stream: S,
    target: &Target,
    token: &str,
    compression: bool,
) -> Result<(Vec<u8>, S, bool), ConnectError> {
    let key = fastwebsockets::handshake::generate_key();
    let offer = if compression { format!("Sec-WebSocket-Extensions: {DEFLATE_OFFER}\r\n") } else { String::new() };
    let req = format!(
        "GET {} HTTP/1.1\r\nHost: {}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n{offer}\
         Authorization: Bearer {token}\r\nUser-Agent: chorus-loadgen\r\n\r\n",
        target.path, target.host
    );
    let hs = |e: io::Error| ConnectError::Handshake(e.to_string());
    stream.write_all(req.as_bytes()).await.map_err(hs)?;

    let mut buf = Vec::with_capacity(512);
    let head_end = loop {
        if let Some(i) = find(&buf, b"\r\n\r\n") {
            break i + 4;
        }
        if buf.len() > MAX_HEAD {
            return Err(ConnectError::Handshake("response head too large".into()));
        }
        buf.reserve(1024);
        let n = stream.read_buf(&mut buf).await.map_err(hs)?;
        if n == 0 {
            return Err(ConnectError::Handshake("server closed the connection during the upgrade".into()));
        }
    };
    let head = String::from_utf8_lossy(&buf[..head_end]).into_owned();
    let status = parse_status(&head)
        .ok_or_else(|| ConnectError::Handshake(format!("not an HTTP response: {}", short(&head))))?;
    if status != 101 {
        // Read the (short) body for the reason, without waiting long.
        let len = header(&head, "content-length").and_then(|v| v.parse::<usize>().ok()).unwrap_or(0).min(4096);
        let mut body = buf[head_end..].to_vec();
        let _ = tokio::time::timeout(Duration::from_millis(500), async {
            while body.len() < len {
                match stream.read_buf(&mut body).await {
                    Ok(0) | Err(_) => break,
                    Ok(_) => {}
                }
            }
        })
        .await;
        let body = String::from_utf8_lossy(&body).into_owned();
        return Err(ConnectError::Http { status, body });
    }
    let upgrade_ok = header(&head, "upgrade").map(|v| v.eq_ignore_ascii_case("websocket")).unwrap_or(false);
    if !upgrade_ok {
        return Err(ConnectError::Handshake("101 without `Upgrade: websocket`".into()));
    }
    // Only an answer without context takeover on the server side can be
    // inflated message by message, which is all loadgen does.
    let deflate = match header(&head, "sec-websocket-extensions") {
        Some(ext) if ext.starts_with("permessage-deflate") => {
            if !ext.contains("server_no_context_takeover") {
                return Err(ConnectError::Handshake(format!("compression with context takeover: {ext}")));
            }
            COMPRESSED_CONNECTIONS.fetch_add(1, Ordering::Relaxed);
            true
        }
        Some(ext) => return Err(ConnectError::Handshake(format!("unexpected extension {ext}"))),
        None => false,
    };
    let rest = buf[head_end..].to_vec();
    Ok((rest, stream, deflate))
}

fn parse_status(head: &str) -> Option<u16> {
    let line = head.lines().next()?;
    let mut parts = line.split_whitespace();
    let version = parts.next()?;
    if !version.starts_with("HTTP/1.") {
        return None;
    }
    parts.next()?.parse().ok()
}

fn header<'a>(head: &'a str, name: &str) -> Option<&'a str> {
    head.lines().skip(1).find_map(|l| {
        let (k, v) = l.split_once(':')?;
        k.trim().eq_ignore_ascii_case(name).then(|| v.trim())
    })
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

/// Client frame writer: frames are masked and appended to a buffer, and
/// `flush` writes the whole batch with one `write` where possible.
pub struct Writer {
    half: WriteHalf,
    buf: Vec<u8>,
    closed: bool,
}

impl Writer {
    fn new(half: WriteHalf) -> Self {
        Self { half, buf: Vec::with_capacity(256), closed: false }
    }

    /// Append one masked text frame.
    pub fn push_text(&mut self, payload: &[u8]) {
        self.push(OpCode::Text, payload);
    }

    /// Append one masked frame.
    pub fn push(&mut self, opcode: OpCode, payload: &[u8]) {
        encode_frame(&mut self.buf, opcode, payload, rand::random());
    }

    /// Write out everything appended so far.
    pub async fn flush(&mut self) -> io::Result<()> {
        if self.closed {
            self.buf.clear();
            return Err(io::Error::new(io::ErrorKind::NotConnected, "connection closed"));
        }
        if self.buf.is_empty() {
            return Ok(());
        }
        let r = self.half.write_all(&self.buf).await;
        self.buf.clear();
        if r.is_err() {
            self.closed = true;
        }
        r
    }

    /// Send a close frame (once); later sends fail.
    pub async fn close(&mut self, code: u16) -> io::Result<()> {
        if self.closed {
            return Ok(());
        }
        self.buf.clear();
        self.push(OpCode::Close, &code.to_be_bytes());
        let r = self.flush().await;
        self.closed = true;
        let _ = self.half.shutdown().await;
        r
    }

    pub fn is_closed(&self) -> bool {
        self.closed
    }

    /// Mark closed after the peer's close was answered.
    pub fn set_closed(&mut self) {
        self.closed = true;
    }
}

/// Encode a masked client frame into `out`.
pub fn encode_frame(out: &mut Vec<u8>, opcode: OpCode, payload: &[u8], mask: [u8; 4]) {
    let len = payload.len();
    out.reserve(len + 14);
    out.push(0x80 | opcode as u8);
    if len < 126 {
        out.push(0x80 | len as u8);
    } else if len < 65536 {
        out.push(0x80 | 126);
        out.extend_from_slice(&(len as u16).to_be_bytes());
    } else {
        out.push(0x80 | 127);
        out.extend_from_slice(&(len as u64).to_be_bytes());
    }
    out.extend_from_slice(&mask);
    let start = out.len();
    out.extend_from_slice(payload);
    fastwebsockets::unmask(&mut out[start..], mask);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_urls() {
        assert_eq!(parse_ws_url("ws://127.0.0.1:8080").unwrap(), ("127.0.0.1".into(), 8080, "/ws".into()));
        assert_eq!(parse_ws_url("ws://example.com/ws/").unwrap(), ("example.com".into(), 80, "/ws".into()));
        assert_eq!(parse_ws_url("ws://[::1]:9000/chat").unwrap(), ("::1".into(), 9000, "/chat".into()));
        assert_eq!(parse_ws_url("wss://example.com").unwrap(), ("example.com".into(), 443, "/ws".into()));
        assert!(parse_ws_url("http://x").is_err());
    }

    #[test]
    fn encodes_masked_frames() {
        let mut out = Vec::new();
        encode_frame(&mut out, OpCode::Text, b"hi", [1, 2, 3, 4]);
        assert_eq!(out, vec![0x81, 0x82, 1, 2, 3, 4, b'h' ^ 1, b'i' ^ 2]);
        let mut out = Vec::new();
        encode_frame(&mut out, OpCode::Text, &[0u8; 300], [0; 4]);
        assert_eq!(&out[..4], &[0x81, 0x80 | 126, 1, 44]);
        assert_eq!(out.len(), 4 + 4 + 300);
    }

    #[test]
    fn parses_heads() {
        let head = "HTTP/1.1 401 Unauthorized\r\ncontent-length: 12\r\nX: y\r\n\r\n";
        assert_eq!(parse_status(head), Some(401));
        assert_eq!(header(head, "Content-Length"), Some("12"));
        let e = ConnectError::Http { status: 401, body: r#"{"error":"invalid_token","message":"expired"}"#.into() };
        assert_eq!(e.key(), "HTTP 401 invalid_token");
    }
}
