//! Connection and process lifecycle against the real binary: token expiry
//! and refresh, keep-alive pings and the ping timeout, slow consumers,
//! graceful shutdown on SIGTERM / SIGINT, and the `chorus token` / keyless
//! `chorus serve` / `chorus --version` command lines.

mod common;

use std::time::Duration;

use serde_json::{json, Value};
use tokio_tungstenite::tungstenite::Message;

use common::*;

// ---------------------------------------------------------------------------
// Token expiry (section 1)
// ---------------------------------------------------------------------------

/// Two connections whose tokens expire at the same second: the one that
/// sent `refresh` in time stays, the other is closed with 1008.
#[tokio::test]
async fn expired_token_closes_1008_unless_refreshed() {
    let server = TestServer::start(&[]).await;
    let exp = unix_now() + 3;
    let short = sign(&json!({"sub": "alice", "exp": exp}));
    let mut stale = server.connect("/ws", &short).await;
    let mut fresh = server.connect("/ws", &short).await;

    let new_exp = unix_now() + 3600;
    fresh
        .send_json(&json!({"type": "refresh", "token": sign(&json!({"sub": "alice", "exp": new_exp})), "ref": "r"}))
        .await;
    assert_eq!(fresh.recv_json().await, json!({"type": "refreshed", "exp": new_exp}));

    // The expiry sweep runs about once a second: the stale one is closed soon
    // after `exp` passes.
    assert_eq!(stale.recv_close().await, (1008, "token expired".to_owned()));
    assert!(unix_now() >= exp, "closed before the token expired");
    // The same sweep would have closed the refreshed one too: it is still open.
    fresh.ping_pong().await;
}

// ---------------------------------------------------------------------------
// Liveness (section 5)
// ---------------------------------------------------------------------------

#[tokio::test]
async fn server_pings_and_closes_silent_connections() {
    let server = TestServer::start(&["--ping-interval", "200ms", "--ping-timeout", "1s"]).await;
    let alice = token("alice", None, 3600);

    // A client that completes the handshake and then neither reads nor sends.
    let mut silent = RawClient::connect(server.addr, "/ws", &alice).await;

    // A client that keeps reading: tungstenite answers each ping with a pong,
    // which keeps the connection alive well past the 1 s timeout.
    let mut live = server.connect("/ws", &alice).await;
    let mut pings = 0;
    while pings < 10 {
        match live.recv_message().await {
            Message::Ping(payload) => {
                assert!(payload.is_empty(), "server pings carry no payload");
                pings += 1;
            }
            other => panic!("expected only pings, got {other:?}"),
        }
    }
    live.ping_pong().await;

    let (before, close) = silent.read_until_close().await;
    assert!(before.contains(&OP_PING), "the silent client was pinged first: {before:?}");
    assert!(before.iter().all(|&op| op == OP_PING), "{before:?}");
    assert_eq!(close, Some((1008, "ping timeout".to_owned())));
    assert!(silent.read_frame().await.is_none(), "the server ends the connection");

    // Sending application frames counts as activity too, without answering pings.
    let mut chatty = RawClient::connect(server.addr, "/ws", &alice).await;
    let mut replies = 0;
    for i in 0..25 {
        chatty.send_text(&json!({"type": "ping", "ref": format!("c{i}")}).to_string()).await;
        tokio::time::sleep(Duration::from_millis(100)).await;
        // Drain: server pings and our pongs.
        loop {
            let (opcode, payload) = chatty.read_frame().await.expect("still open");
            assert_ne!(opcode, OP_CLOSE, "closed although the client kept sending");
            if opcode == OP_TEXT {
                let v: Value = serde_json::from_slice(&payload).unwrap();
                assert_eq!(v, json!({"type": "pong", "ref": format!("c{i}")}));
                replies += 1;
                break;
            }
        }
    }
    assert_eq!(replies, 25);
}

/// A member that stops reading is cut with 1013 once its queue fills, while
/// the other member of the room gets every message without a gap.
#[tokio::test]
async fn slow_consumer_is_cut_with_1013_and_the_room_does_not_wait() {
    let server = TestServer::start(&["--send-queue", "8", "--rate", "100000", "--burst", "100000"]).await;
    let alice = token("alice", None, 3600);

    // A small receive buffer, so the kernel soaks up little of what the
    // server writes to the member that never reads.
    let request = with_bearer(ws_request(server.addr, "/ws/firehose"), &alice);
    let mut slow = try_connect(server.addr, request, Some(4096)).await.expect("slow member connects");
    // It reads its `joined` (so it is a member before anything is published), then nothing.
    assert_eq!(slow.recv_type("joined").await["seq"], 0);

    // The reader publishes too, in lock-step (send, then read its message and
    // ack), so its own queue never holds more than two frames.
    let (mut reader, _) = server.connect_joined("firehose", &alice).await;
    let pad = "x".repeat(30 * 1024);
    let mut published = 0u64;
    let mut cut_after = None;
    for i in 1..=5000u64 {
        let reference = format!("m{i}");
        reader
            .send_json(&json!({"type": "send", "room": "firehose", "ref": reference, "body": {"i": i, "pad": pad}}))
            .await;
        let message = reader.recv_type("message").await;
        assert_eq!(message["seq"], i, "the reader missed a message");
        assert_eq!(message["body"]["i"], i);
        assert_eq!(
            reader.recv_type("ack").await,
            json!({"type": "ack", "ref": reference, "room": "firehose", "seq": i})
        );
        published = i;
        if cut_after.is_none() && i % 10 == 0 && server.metric("chorus_slow_consumers_total").await >= 1.0 {
            cut_after = Some(i);
        }
        // Go on a little after the cut: the room keeps flowing.
        if cut_after.is_some_and(|c| i >= c + 20) {
            break;
        }
    }
    assert!(cut_after.is_some(), "no slow consumer after {published} messages of 30 KiB");
    reader.ping_pong().await;

    // The slow member now reads what had reached it: a gapless prefix of
    // the room, then the 1013 close.
    let (messages, close) = slow.recv_until_close().await;
    let seqs: Vec<u64> = messages.iter().map(|m| m["seq"].as_u64().unwrap()).collect();
    assert_eq!(seqs, (1..=seqs.len() as u64).collect::<Vec<_>>(), "the slow member's prefix has a gap");
    assert!((seqs.len() as u64) < published, "the slow member got everything: it was not cut");
    assert_eq!(close, Some((1013, "slow consumer".to_owned())));
    assert!(server.metric("chorus_slow_consumers_total").await >= 1.0);
}

/// A flood of 4 KB messages with `--send-queue 16`: the member that stops
/// reading is cut with 1013, the member that reads at its own pace gets
/// every message in order, whatever batching the server applies (its rounds
/// alone, or a coalescing window held open throughout). Only frames the
/// socket refused count toward the bound, never frames the server chose to
/// hold back.
#[tokio::test]
async fn a_reader_that_keeps_up_is_never_cut_by_the_servers_own_batching() {
    for batching in [&["--write-coalesce", "10ms"][..], &["--write-coalesce", "10ms", "--write-coalesce-load", "0"]] {
        let mut args = vec!["--send-queue", "16", "--rate", "100000", "--burst", "100000"];
        args.extend_from_slice(batching);
        flood_with_one_stopped_and_one_reading_member(&args).await;
    }
}

async fn flood_with_one_stopped_and_one_reading_member(args: &[&str]) {
    use futures_util::{SinkExt, StreamExt};
    const MESSAGES: u64 = 3000;
    /// Sends the publisher keeps in flight: a flood, bounded by its acks.
    const IN_FLIGHT: u64 = 256;
    /// How far the publisher may run ahead of the reading member: more than
    /// `--send-queue` (16), so frames the server holds back by its own
    /// choice would cut the reader if they counted, yet little enough
    /// (100 KB) that a reader starved of CPU on a busy machine never has a
    /// socket that refuses more, and so really keeps up.
    const AHEAD_OF_READER: u64 = 24;
    let server = TestServer::start(args).await;
    let alice = token("alice", None, 3600);

    let request = with_bearer(ws_request(server.addr, "/ws/flood"), &alice);
    let mut stopped = try_connect(server.addr, request, Some(4096)).await.expect("stopped member connects");
    assert_eq!(stopped.recv_type("joined").await["seq"], 0);

    let (reading, _) = server.connect_joined("flood", &alice).await;
    let (read_tx, mut read_rx) = tokio::sync::watch::channel(0u64);
    let reading = tokio::spawn(async move {
        let mut reading = reading;
        let mut seqs = Vec::new();
        while (seqs.len() as u64) < MESSAGES {
            match reading.recv_message().await {
                Message::Text(text) => {
                    let frame: Value = serde_json::from_str(text.as_str()).unwrap();
                    assert_eq!(frame["type"], "message", "the reading member got {frame}");
                    seqs.push(frame["seq"].as_u64().unwrap());
                    let _ = read_tx.send(seqs.len() as u64);
                }
                other => panic!("the reading member got {other:?}"),
            }
        }
        seqs
    });

    let publisher = server.connect("/ws", &alice).await;
    let (mut sink, mut stream) = publisher.ws.split();
    let (acked_tx, mut acked_rx) = tokio::sync::watch::channel(0u64);
    let acks = tokio::spawn(async move {
        let mut acked = 0u64;
        while acked < MESSAGES {
            let Some(Ok(Message::Text(text))) = stream.next().await else {
                panic!("the publisher lost its connection")
            };
            let frame: Value = serde_json::from_str(text.as_str()).unwrap();
            assert_eq!(frame["type"], "ack", "the publisher got {frame}");
            acked += 1;
            let _ = acked_tx.send(acked);
        }
    });
    let pad = "x".repeat(4000);
    for i in 1..=MESSAGES {
        while i > *acked_rx.borrow() + IN_FLIGHT {
            acked_rx.changed().await.unwrap();
        }
        while i > *read_rx.borrow() + AHEAD_OF_READER {
            read_rx.changed().await.unwrap();
        }
        let frame = json!({"type": "send", "room": "flood", "ref": format!("m{i}"), "body": {"i": i, "pad": pad}});
        sink.send(Message::text(frame.to_string())).await.unwrap();
    }
    tokio::time::timeout(Duration::from_secs(60), acks).await.expect("acks hung").unwrap();
    let seqs = tokio::time::timeout(Duration::from_secs(60), reading).await.expect("the reading member hung").unwrap();
    assert_eq!(seqs, (1..=MESSAGES).collect::<Vec<_>>(), "{args:?}: the reading member missed messages");

    let (messages, close) = stopped.recv_until_close().await;
    let seqs: Vec<u64> = messages.iter().map(|m| m["seq"].as_u64().unwrap()).collect();
    assert_eq!(seqs, (1..=seqs.len() as u64).collect::<Vec<_>>(), "the stopped member's prefix has a gap");
    assert_eq!(close, Some((1013, "slow consumer".to_owned())), "{args:?}");
    assert_eq!(server.metric("chorus_slow_consumers_total").await, 1.0, "{args:?}: only the stopped member is cut");
}

/// A member that never reads at all is still released: its socket is full,
/// so the close frame queued for it (1013 when its queue filled, or 1008
/// when its ping timeout ran out first on a busy machine) never gets out,
/// and the server must drop it anyway.
#[tokio::test]
async fn a_member_that_never_reads_is_released() {
    let server = TestServer::start(&[
        "--send-queue",
        "8",
        "--rate",
        "100000",
        "--burst",
        "100000",
        "--ping-interval",
        "200ms",
        "--ping-timeout",
        "2s",
    ])
    .await;
    let alice = token("alice", None, 3600);
    let request = with_bearer(ws_request(server.addr, "/ws/stuck"), &alice);
    let mut stuck = try_connect(server.addr, request, Some(4096)).await.expect("connects");
    stuck.recv_type("joined").await;
    let (mut reader, _) = server.connect_joined("stuck", &alice).await;
    // 400 messages of 30 KiB: more than its socket buffers (a few MiB at
    // most) hold, unless its queue filled and it was cut first.
    let pad = "x".repeat(30 * 1024);
    for i in 1..=400u64 {
        reader.send_json(&json!({"type": "send", "room": "stuck", "ref": "r", "body": {"i": i, "pad": pad}})).await;
        assert_eq!(reader.recv_type("message").await["seq"], i);
        reader.recv_type("ack").await;
        if i % 10 == 0 && server.metric("chorus_slow_consumers_total").await >= 1.0 {
            break;
        }
    }
    let deadline = tokio::time::Instant::now() + GUARD + GUARD;
    loop {
        // The reader stays active, so only the stuck member is silent.
        reader.ping_pong().await;
        let open = server.metric("chorus_connections").await;
        if open == 1.0 {
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "the stuck member is still open ({open} connections)");
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    }
}

// ---------------------------------------------------------------------------
// Graceful shutdown (section 5)
// ---------------------------------------------------------------------------

async fn shutdown_closes_everything_with_1001(signal: i32) {
    let mut server = TestServer::start(&[]).await;
    let alice = token("alice", None, 3600);
    let mut clients = vec![server.connect("/ws", &alice).await];
    for _ in 0..3 {
        clients.push(server.connect_joined("lobby", &alice).await.0);
    }
    // Queued but not yet read when the signal comes: delivered before the close.
    clients[0].publish("lobby", json!("last words")).await;

    server.signal(signal);
    let mut waiting = Vec::new();
    for (i, mut client) in clients.into_iter().enumerate() {
        waiting.push(tokio::spawn(async move {
            let (texts, close) = client.recv_until_close().await;
            (i, texts, close)
        }));
    }
    for task in waiting {
        let (i, texts, close) = task.await.unwrap();
        assert_eq!(close, Some((1001, "going away".to_owned())), "connection {i}");
        if i > 0 {
            assert_eq!(texts.len(), 1, "connection {i}: {texts:?}");
            assert_eq!(texts[0]["body"], "last words");
        }
    }
    let status = server.wait_exit().await;
    assert_eq!(status.code(), Some(0), "exit status {status:?}; stderr:\n{}", server.stderr());
    // Nothing listens any more.
    assert!(tokio::net::TcpStream::connect(server.addr).await.is_err());
}

#[tokio::test]
async fn sigterm_closes_every_connection_with_1001_and_exits_0() {
    shutdown_closes_everything_with_1001(libc::SIGTERM).await;
}

#[tokio::test]
async fn sigint_closes_every_connection_with_1001_and_exits_0() {
    shutdown_closes_everything_with_1001(libc::SIGINT).await;
}

#[tokio::test]
async fn sigterm_with_no_connections_exits_0() {
    let mut server = TestServer::start(&[]).await;
    // An idle HTTP keep-alive connection must not hold up the exit.
    let http = http_client();
    assert_eq!(http.get(server.url("/healthz")).send().await.unwrap().status(), 200);
    server.sigterm();
    let status = server.wait_exit().await;
    assert_eq!(status.code(), Some(0), "stderr:\n{}", server.stderr());
}

// ---------------------------------------------------------------------------
// Command line (section 7)
// ---------------------------------------------------------------------------

fn chorus_token(args: &[&str]) -> String {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_chorus"))
        .arg("token")
        .args(args)
        .env_remove("CHORUS_JWT_SECRET")
        .output()
        .expect("run chorus token");
    assert!(out.status.success(), "chorus token {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    let stdout = String::from_utf8(out.stdout).unwrap();
    let token = stdout.trim().to_owned();
    assert_eq!(token.split('.').count(), 3, "not a JWT: {stdout:?}");
    token
}

/// The claims of a JWT, read without checking the signature.
fn jwt_claims(token: &str) -> Value {
    use base64::Engine;
    let payload = token.split('.').nth(1).unwrap();
    serde_json::from_slice(&base64::engine::general_purpose::URL_SAFE_NO_PAD.decode(payload).unwrap()).unwrap()
}

/// `chorus --version` names the crate version, the commit of this checkout
/// and whether the tree was dirty: `chorus 0.1.0 (commit 32a6c31, clean)`.
#[test]
fn version_names_the_commit_it_was_built_from() {
    for flag in ["--version", "-V"] {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_chorus")).arg(flag).output().expect("run chorus");
        assert!(out.status.success(), "chorus {flag}: {}", String::from_utf8_lossy(&out.stderr));
        let stdout = String::from_utf8(out.stdout).unwrap();
        let rest = stdout
            .trim_end()
            .strip_prefix(&format!("chorus {} (commit ", env!("CARGO_PKG_VERSION")))
            .and_then(|rest| rest.strip_suffix(')'))
            .unwrap_or_else(|| panic!("chorus {flag} printed {stdout:?}"));
        let commit = match rest.split_once(", ") {
            Some((commit, state)) => {
                assert!(state == "clean" || state == "dirty", "{stdout:?}");
                commit
            }
            None => rest,
        };
        assert_is_checkout_commit(commit);
    }
}

#[tokio::test]
async fn chorus_token_output_verifies_against_the_server() {
    let server = TestServer::start(&[]).await;
    let minted = chorus_token(&["--secret", SECRET, "--sub", "carol", "--rooms", "a,team-*", "--ttl", "1h"]);
    let c = jwt_claims(&minted);
    assert_eq!(c["sub"], "carol");
    assert_eq!(c["rooms"], json!(["a", "team-*"]));
    assert_eq!(c["exp"].as_u64().unwrap() - c["iat"].as_u64().unwrap(), 3600);
    assert!(c["exp"].as_u64().unwrap().abs_diff(unix_now() + 3600) < 120);

    let (mut member, _) = server.connect_joined("a", &minted).await;
    server.connect_joined("team-x", &minted).await;
    let request = with_bearer(ws_request(server.addr, "/ws/b"), &minted);
    assert_eq!(refused_status(server.addr, request).await, 403);
    member.send_json(&json!({"type": "send", "room": "a", "body": "hi"})).await;
    assert_eq!(member.recv_type("message").await["from"], "carol");

    // No --rooms: every room. Another secret: refused.
    let any = chorus_token(&["--secret", SECRET, "--sub", "dave"]);
    assert!(jwt_claims(&any).get("rooms").is_none());
    server.connect_joined("anything", &any).await;
    let other = chorus_token(&["--secret", "another-secret", "--sub", "eve"]);
    let (status, body) = upgrade_refusal(&server.url("/ws"), &[("authorization", &format!("Bearer {other}"))]).await;
    assert_eq!((status, body["error"].as_str()), (401, Some("invalid_token")));

    // Issuer and audience options match the server's.
    let strict = TestServer::start(&["--jwt-issuer", "me", "--jwt-audience", "us"]).await;
    let minted = chorus_token(&["--secret", SECRET, "--sub", "carol", "--issuer", "me", "--audience", "us"]);
    strict.connect("/ws", &minted).await.ping_pong().await;
}

#[tokio::test]
async fn keyless_serve_prints_a_working_token_and_url() {
    let mut server = TestServer::start_raw(&[]).await;
    let mut token = None;
    let mut url = None;
    while token.is_none() || url.is_none() {
        let line = server.next_stdout_line().await.expect("banner lines");
        let line = line.trim();
        if let Some(rest) = line.strip_prefix("token:") {
            token = rest.split_whitespace().next().map(str::to_owned);
        } else if let Some(rest) = line.strip_prefix("connect:") {
            url = Some(rest.trim().to_owned());
        }
    }
    let (token, url) = (token.unwrap(), url.unwrap());
    assert!(url.starts_with(&format!("ws://{}/ws?token=", server.addr)), "{url}");

    // The printed URL, as a user would paste it.
    let stream = tcp_connect(server.addr, None).await;
    let (ws, _) = tokio_tungstenite::client_async(url.as_str(), stream).await.expect("the printed URL connects");
    let mut by_url = Client { ws };
    by_url.ping_pong().await;
    // The printed token, in a header.
    let (mut member, _) = server.connect_joined("lobby", &token).await;
    by_url.send_json(&json!({"type": "send", "room": "lobby", "body": "hello"})).await;
    let message = member.recv_type("message").await;
    assert_eq!(message["from"], jwt_claims(&token)["sub"]);
    assert_eq!(message["body"], "hello");
}

#[tokio::test]
async fn an_idle_room_leaves_memory_and_its_sequence_goes_on() {
    let server = TestServer::start(&["--history-ttl", "300ms"]).await;
    let mut member = Client::connect(server.addr, "/ws", &token("keeper", None, 3600)).await;
    let epoch = member.join("fading").await["epoch"].clone();
    member.send_json(&json!({"type": "leave", "room": "fading"})).await;
    member.recv_type("left").await;
    let mut client = Client::connect(server.addr, "/ws", &token("writer", None, 3600)).await;
    for i in 1..=3 {
        assert_eq!(client.publish("fading", json!(i)).await, i);
    }
    // A hang guard, not a timing claim: eviction runs every 150 ms here.
    let deadline = tokio::time::Instant::now() + GUARD;
    while server.metric("chorus_rooms_evicted_total").await < 1.0 {
        assert!(tokio::time::Instant::now() < deadline, "the idle room was never evicted");
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    client.send_json(&json!({"type": "history", "room": "fading"})).await;
    assert_eq!(client.recv_type("history").await["messages"], json!([]), "its history left memory");
    assert_eq!(client.publish("fading", json!(4)).await, 4, "its sequence goes on: no seq repeats");
    client.send_json(&json!({"type": "join", "room": "fading", "since": 1, "epoch": epoch})).await;
    loop {
        let frame = client.recv_json().await;
        if frame["type"] == "joined" {
            assert_eq!(frame["epoch"], epoch, "same epoch");
            assert_eq!(frame["recovered"], false, "what was evicted cannot be replayed");
            break;
        }
    }
}
