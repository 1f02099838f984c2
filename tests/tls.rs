//! TLS on the public listener (PROTOCOL.md section 10) against the real
//! binary, with certificates made at test time: wss and https on one port,
//! SIGHUP reloads the pair for new connections, a failed reload keeps the
//! pair in use, open connections are not affected.

mod common;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

use futures_util::{SinkExt, StreamExt};
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;
use tokio_rustls::rustls::crypto::ring;
use tokio_rustls::rustls::pki_types::{CertificateDer, ServerName};
use tokio_rustls::rustls::{ClientConfig, RootCertStore};
use tokio_rustls::TlsConnector;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::WebSocketStream;

use common::*;

/// A self-signed certificate for `localhost`: its PEM files, and its DER for clients to trust.
struct Pair {
    cert_pem: String,
    key_pem: String,
    der: CertificateDer<'static>,
}

fn new_pair() -> Pair {
    let made = rcgen::generate_simple_self_signed(vec!["localhost".to_owned()]).unwrap();
    Pair { cert_pem: made.cert.pem(), key_pem: made.signing_key.serialize_pem(), der: made.cert.der().clone() }
}

fn write_pair(dir: &TempDir, pair: &Pair) -> (PathBuf, PathBuf) {
    let (cert, key) = (dir.path().join("cert.pem"), dir.path().join("key.pem"));
    std::fs::write(&cert, &pair.cert_pem).unwrap();
    std::fs::write(&key, &pair.key_pem).unwrap();
    (cert, key)
}

fn trusting(der: &CertificateDer<'static>) -> TlsConnector {
    let mut roots = RootCertStore::empty();
    roots.add(der.clone()).unwrap();
    let config = ClientConfig::builder_with_provider(Arc::new(ring::default_provider()))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    TlsConnector::from(Arc::new(config))
}

async fn tls_connect(server: &TestServer, der: &CertificateDer<'static>) -> std::io::Result<TlsStream<TcpStream>> {
    let tcp = TcpStream::connect(server.addr).await?;
    trusting(der).connect(ServerName::try_from("localhost").unwrap(), tcp).await
}

async fn wss(server: &TestServer, der: &CertificateDer<'static>, sub: &str) -> WebSocketStream<TlsStream<TcpStream>> {
    let stream = tls_connect(server, der).await.expect("TLS handshake");
    let request = with_bearer(ws_request(server.addr, "/ws"), &token(sub, None, 600));
    let (ws, response) = tokio::time::timeout(GUARD, tokio_tungstenite::client_async(request, stream))
        .await
        .expect("handshake hung")
        .expect("WebSocket handshake over TLS");
    assert_eq!(response.status(), 101);
    ws
}

async fn ping(ws: &mut WebSocketStream<TlsStream<TcpStream>>, reference: &str) {
    ws.send(Message::text(json!({"type": "ping", "ref": reference}).to_string())).await.unwrap();
    loop {
        let frame = tokio::time::timeout(GUARD, ws.next()).await.expect("no pong in time").unwrap().unwrap();
        if let Message::Text(text) = frame {
            let value: serde_json::Value = serde_json::from_str(text.as_str()).unwrap();
            assert_eq!((value["type"].as_str(), value["ref"].as_str()), (Some("pong"), Some(reference)));
            return;
        }
    }
}

async fn start_tls(dir: &TempDir, pair: &Pair) -> TestServer {
    let (cert, key) = write_pair(dir, pair);
    TestServer::start(&["--tls-cert", cert.to_str().unwrap(), "--tls-key", key.to_str().unwrap()]).await
}

#[tokio::test]
async fn wss_and_https_on_the_one_port_and_nothing_plain() {
    let dir = TempDir::new("tls");
    let pair = new_pair();
    let server = start_tls(&dir, &pair).await;
    let mut ws = wss(&server, &pair.der, "alice").await;
    ping(&mut ws, "p1").await;

    let mut https = tls_connect(&server, &pair.der).await.unwrap();
    https.write_all(b"GET /healthz HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n").await.unwrap();
    let mut answer = String::new();
    tokio::time::timeout(GUARD, https.read_to_string(&mut answer)).await.unwrap().unwrap();
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");

    // Plain HTTP to the TLS port gets no HTTP answer.
    let plain = http_client().get(server.url("/healthz")).send().await;
    assert!(plain.is_err(), "plain HTTP was answered: {plain:?}");
    // A client that does not trust the certificate is refused; the server goes on.
    assert!(tls_connect(&server, &new_pair().der).await.is_err());
    ping(&mut ws, "p2").await;
}

/// Waits until the server's stderr contains `text` (a hang guard, not a timing claim).
async fn wait_stderr(server: &TestServer, text: &str) {
    let deadline = Instant::now() + GUARD;
    while !server.stderr().contains(text) {
        assert!(Instant::now() < deadline, "no {text:?} in:\n{}", server.stderr());
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn sighup_reloads_the_pair_for_new_connections_and_a_bad_pair_is_refused() {
    let dir = TempDir::new("tls-reload");
    let first = new_pair();
    let server = start_tls(&dir, &first).await;
    let mut open = wss(&server, &first.der, "alice").await;

    let second = new_pair();
    write_pair(&dir, &second);
    server.signal(libc::SIGHUP);
    wait_stderr(&server, "TLS certificate and key reloaded").await;
    let mut fresh = wss(&server, &second.der, "bob").await;
    ping(&mut fresh, "new").await;
    assert!(tls_connect(&server, &first.der).await.is_err(), "the old certificate is still served");
    // The connection opened before the reload is not affected.
    ping(&mut open, "old").await;

    // A broken key: the reload fails, says why, and the second pair stays.
    std::fs::write(dir.path().join("key.pem"), "not a key").unwrap();
    server.signal(libc::SIGHUP);
    wait_stderr(&server, "TLS reload failed").await;
    let mut after = wss(&server, &second.der, "carol").await;
    ping(&mut after, "still").await;
    // A key of another certificate does not pass either.
    std::fs::write(dir.path().join("key.pem"), new_pair().key_pem).unwrap();
    server.signal(libc::SIGHUP);
    wait_stderr(&server, "do not make a usable pair").await;
    ping(&mut wss(&server, &second.der, "dave").await, "again").await;
}

#[tokio::test]
async fn unusable_files_stop_the_start() {
    let dir = TempDir::new("tls-bad");
    let pair = new_pair();
    let (cert, _) = write_pair(&dir, &pair);
    let missing = dir.path().join("missing.pem");
    for (cert, key, expected) in
        [(cert.clone(), missing.clone(), "private key"), (missing.clone(), cert.clone(), "certificate chain")]
    {
        let output = std::process::Command::new(env!("CARGO_BIN_EXE_chorus"))
            .args(["serve", "--jwt-secret", "s", "--listen", "127.0.0.1:0"])
            .arg("--tls-cert")
            .arg(&cert)
            .arg("--tls-key")
            .arg(&key)
            .output()
            .unwrap();
        assert!(!output.status.success());
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(stderr.contains(expected), "{stderr}");
    }
    // One without the other is refused by the flags themselves.
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_chorus"))
        .args(["serve", "--jwt-secret", "s", "--listen", "127.0.0.1:0", "--tls-cert"])
        .arg(&cert)
        .output()
        .unwrap();
    assert!(!output.status.success());
    assert!(String::from_utf8_lossy(&output.stderr).contains("--tls-key"));
}
