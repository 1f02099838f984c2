//! The WebSocket protocol of PROTOCOL.md sections 1 to 5, against the real
//! binary: authentication before the upgrade, every client and server frame,
//! every error code a client can cause, the close codes of bad input, rate
//! limiting, concurrent ordering and recovery.

mod common;

use std::collections::HashMap;

use futures_util::{SinkExt, StreamExt};
use jsonwebtoken::Algorithm;
use serde_json::{json, Value};
use tokio_tungstenite::tungstenite::protocol::frame::coding::{Data, OpCode};
use tokio_tungstenite::tungstenite::protocol::frame::Frame;
use tokio_tungstenite::tungstenite::Message;

use common::*;

// ---------------------------------------------------------------------------
// Authentication before the upgrade (section 1)
// ---------------------------------------------------------------------------

/// Asserts that `/ws` with this bearer token is refused with 401
/// `invalid_token`, both for a real WebSocket client and on the wire.
async fn assert_invalid_token(server: &TestServer, token: Option<&str>, what: &str) {
    let mut request = ws_request(server.addr, "/ws");
    let mut headers = Vec::new();
    let bearer;
    if let Some(token) = token {
        request = with_bearer(request, token);
        bearer = format!("Bearer {token}");
        headers.push(("authorization", bearer.as_str()));
    }
    assert_eq!(refused_status(server.addr, request).await, 401, "{what}");
    let (status, body) = upgrade_refusal(&server.url("/ws"), &headers).await;
    assert_eq!(status, 401, "{what}");
    assert_eq!(body["error"], "invalid_token", "{what}: {body}");
    assert!(body["message"].as_str().is_some_and(|m| !m.is_empty()), "{what}: {body}");
}

#[tokio::test]
async fn every_bad_token_gets_401_before_the_upgrade() {
    let server = TestServer::start(&[]).await;
    let now = unix_now() as i64;

    assert_invalid_token(&server, None, "missing token").await;
    assert_invalid_token(&server, Some("not-a-jwt"), "malformed").await;
    assert_invalid_token(&server, Some("a.b.c"), "malformed parts").await;
    let other_secret = sign_hs(Algorithm::HS256, b"some other secret", &claims("alice", None, 3600));
    assert_invalid_token(&server, Some(&other_secret), "bad signature").await;
    let expired = sign(&json!({"sub": "alice", "exp": now - 10}));
    assert_invalid_token(&server, Some(&expired), "expired").await;
    let immature = sign(&json!({"sub": "alice", "exp": now + 3600, "nbf": now + 600}));
    assert_invalid_token(&server, Some(&immature), "nbf in the future").await;
    let hs512 = sign_hs(Algorithm::HS512, SECRET.as_bytes(), &claims("alice", None, 3600));
    assert_invalid_token(&server, Some(&hs512), "HS512 instead of HS256").await;
    let hs384 = sign_hs(Algorithm::HS384, SECRET.as_bytes(), &claims("alice", None, 3600));
    assert_invalid_token(&server, Some(&hs384), "HS384 instead of HS256").await;
    // alg "none": header {"alg":"none","typ":"JWT"}, claims of a valid user, no signature.
    let none = {
        use base64::Engine;
        let b64 = |s: &str| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(s);
        format!("{}.{}.", b64(r#"{"alg":"none","typ":"JWT"}"#), b64(&claims("alice", None, 3600).to_string()))
    };
    assert_invalid_token(&server, Some(&none), "alg none").await;
    let no_sub = sign(&json!({"exp": now + 3600}));
    assert_invalid_token(&server, Some(&no_sub), "no sub").await;
    let no_exp = sign(&json!({"sub": "alice"}));
    assert_invalid_token(&server, Some(&no_exp), "no exp").await;
    let long_sub = sign(&json!({"sub": "x".repeat(129), "exp": now + 3600}));
    assert_invalid_token(&server, Some(&long_sub), "sub over 128 bytes").await;
    let bad_rooms = sign(&json!({"sub": "alice", "exp": now + 3600, "rooms": ["a b"]}));
    assert_invalid_token(&server, Some(&bad_rooms), "invalid rooms pattern").await;

    // The longest allowed sub is fine, and the refusals did not hurt the server.
    let max_sub = sign(&json!({"sub": "x".repeat(128), "exp": now + 3600}));
    server.connect("/ws", &max_sub).await.ping_pong().await;
}

#[tokio::test]
async fn token_in_header_or_query_and_header_wins() {
    let server = TestServer::start(&[]).await;
    let good = token("alice", None, 3600);

    let mut by_header = server.connect("/ws", &good).await;
    by_header.ping_pong().await;
    let mut by_query = Client::connect_query(server.addr, "/ws", &good).await;
    by_query.ping_pong().await;
    let (mut room_by_query, joined) = {
        let mut c = Client::connect_query(server.addr, "/ws/lobby", &good).await;
        let joined = c.recv_type("joined").await;
        (c, joined)
    };
    assert_eq!(joined["room"], "lobby");
    room_by_query.ping_pong().await;

    // First match wins: a valid header with a bad query token is accepted...
    let request = with_bearer(ws_request(server.addr, "/ws?token=garbage"), &good);
    try_connect(server.addr, request, None).await.expect("header token wins").ping_pong().await;
    // ... and a bad header with a valid query token is refused.
    let request = with_bearer(ws_request(server.addr, &format!("/ws?token={good}")), "garbage");
    assert_eq!(refused_status(server.addr, request).await, 401);
    let (status, body) = upgrade_refusal(&server.url("/ws?token=garbage"), &[]).await;
    assert_eq!((status, body["error"].as_str()), (401, Some("invalid_token")));
}

#[tokio::test]
async fn rooms_claim_and_origin_get_403() {
    let server = TestServer::start(&["--allowed-origins", "https://ok.example,https://also.example"]).await;
    let limited = token("alice", Some(&["lobby", "team-*"]), 3600);

    // /ws/{room} outside the rooms claim.
    let request = with_bearer(ws_request(server.addr, "/ws/secret"), &limited);
    assert_eq!(refused_status(server.addr, request).await, 403);
    let bearer = format!("Bearer {limited}");
    let (status, body) = upgrade_refusal(&server.url("/ws/secret"), &[("authorization", &bearer)]).await;
    assert_eq!(status, 403);
    assert_eq!(body["error"], "forbidden", "{body}");
    // Patterns: exact names and prefixes.
    server.connect_joined("lobby", &limited).await;
    server.connect_joined("team-blue", &limited).await;
    let request = with_bearer(ws_request(server.addr, "/ws/team"), &limited);
    assert_eq!(refused_status(server.addr, request).await, 403);
    // An invalid room name in the path is a bad request, not a forbidden one.
    let (status, body) = upgrade_refusal(&server.url("/ws/a%20b"), &[("authorization", &bearer)]).await;
    assert_eq!((status, body["error"].as_str()), (400, Some("bad_request")));

    // Origin outside the allow-list.
    let good = token("alice", None, 3600);
    let request = with_origin(with_bearer(ws_request(server.addr, "/ws"), &good), "https://evil.example");
    assert_eq!(refused_status(server.addr, request).await, 403);
    let bearer = format!("Bearer {good}");
    let (status, body) =
        upgrade_refusal(&server.url("/ws"), &[("authorization", &bearer), ("origin", "https://evil.example")]).await;
    assert_eq!(status, 403);
    assert_eq!(body["error"], "forbidden", "{body}");
    // An allowed origin, and no Origin at all (not a browser), are fine.
    for origin in ["https://ok.example", "https://also.example"] {
        let request = with_origin(with_bearer(ws_request(server.addr, "/ws"), &good), origin);
        try_connect(server.addr, request, None).await.expect("allowed origin").ping_pong().await;
    }
    server.connect("/ws", &good).await.ping_pong().await;
}

#[tokio::test]
async fn issuer_and_audience_are_checked_when_configured() {
    let server = TestServer::start(&["--jwt-issuer", "https://issuer.example", "--jwt-audience", "chorus"]).await;
    let now = unix_now() as i64;
    let with = |iss: Option<&str>, aud: Option<&str>| {
        let mut c = json!({"sub": "alice", "exp": now + 3600});
        if let Some(iss) = iss {
            c["iss"] = json!(iss);
        }
        if let Some(aud) = aud {
            c["aud"] = json!(aud);
        }
        sign(&c)
    };
    let ok = with(Some("https://issuer.example"), Some("chorus"));
    server.connect("/ws", &ok).await.ping_pong().await;
    assert_invalid_token(&server, Some(&with(Some("https://evil.example"), Some("chorus"))), "wrong iss").await;
    assert_invalid_token(&server, Some(&with(Some("https://issuer.example"), Some("other"))), "wrong aud").await;
    assert_invalid_token(&server, Some(&with(None, Some("chorus"))), "missing iss").await;
    assert_invalid_token(&server, Some(&with(Some("https://issuer.example"), None)), "missing aud").await;
}

/// RS256 and ES256 with `--jwt-public-key`: the right key and algorithm
/// connect; another key pair, HS256 (even keyed with the public key's own
/// PEM, the classic algorithm-confusion attack) and the other asymmetric
/// algorithm are refused.
#[tokio::test]
async fn rs256_and_es256_public_keys() {
    let dir = TempDir::new("keys");
    let (rsa_private, rsa_public) = openssl_keypair(&dir, "rsa");
    let (ec_private, ec_public) = openssl_keypair(&dir, "ec");
    let other = TempDir::new("other-keys");
    let (other_rsa, _) = openssl_keypair(&other, "rsa");
    let (other_ec, _) = openssl_keypair(&other, "ec");
    let read = |p: &std::path::Path| std::fs::read(p).unwrap();
    let c = claims("alice", Some(&["lobby"]), 3600);

    for (alg, private, public, other_private, wrong_alg, wrong_private) in [
        (Algorithm::RS256, &rsa_private, &rsa_public, &other_rsa, Algorithm::ES256, &ec_private),
        (Algorithm::ES256, &ec_private, &ec_public, &other_ec, Algorithm::RS256, &rsa_private),
    ] {
        let server = TestServer::start_raw(&["--jwt-public-key", public.to_str().unwrap()]).await;
        let good = sign_pem(alg, &read(private), &c);
        let (mut client, _) = server.connect_joined("lobby", &good).await;
        client.ping_pong().await;
        let what = format!("{alg:?}");
        assert_invalid_token(&server, Some(&sign_pem(alg, &read(other_private), &c)), &format!("{what}: other key"))
            .await;
        assert_invalid_token(
            &server,
            Some(&sign_pem(wrong_alg, &read(wrong_private), &c)),
            &format!("{what}: other alg"),
        )
        .await;
        assert_invalid_token(&server, Some(&sign(&c)), &format!("{what}: HS256")).await;
        let confused = sign_hs(Algorithm::HS256, &read(public), &c);
        assert_invalid_token(&server, Some(&confused), &format!("{what}: HS256 keyed with the public key")).await;
        // The rooms claim applies the same way.
        let request = with_bearer(ws_request(server.addr, "/ws/elsewhere"), &good);
        assert_eq!(refused_status(server.addr, request).await, 403);
    }
}

// ---------------------------------------------------------------------------
// Frames (section 3)
// ---------------------------------------------------------------------------

#[tokio::test]
async fn join_replies_joined_and_ws_room_joins_first() {
    let server = TestServer::start(&[]).await;
    let alice = token("alice", None, 3600);

    let mut a = server.connect("/ws", &alice).await;
    let joined = a.join("lobby").await;
    let epoch = joined["epoch"].as_str().expect("epoch is a string").to_owned();
    assert!(!epoch.is_empty());
    assert_eq!(
        joined,
        json!({"type": "joined", "room": "lobby", "seq": 0, "epoch": epoch}),
        "no recovered without since"
    );

    // /ws/{room}: joined is the very first frame.
    let (mut b, joined_b) = server.connect_joined("lobby", &alice).await;
    assert_eq!(joined_b, json!({"type": "joined", "room": "lobby", "seq": 0, "epoch": epoch}));

    // joined.seq is the room's latest seq at join time.
    a.send_json(&json!({"type": "send", "room": "lobby", "body": "one"})).await;
    assert_eq!(a.recv_type("message").await["seq"], 1);
    assert_eq!(b.recv_type("message").await["seq"], 1);
    let (_c, joined_c) = server.connect_joined("lobby", &alice).await;
    assert_eq!(joined_c["seq"], 1);
    assert_eq!(joined_c["epoch"], epoch.as_str());

    // Joining again answers joined again, and does not double deliveries.
    let again = a.join("lobby").await;
    assert_eq!(again["seq"], 1);
    a.send_json(&json!({"type": "send", "room": "lobby", "body": "two", "ref": "r2"})).await;
    assert_eq!(a.recv_type("message").await["seq"], 2);
    assert_eq!(a.recv_type("ack").await["seq"], 2);
    a.ping_pong().await;

    // Several rooms on one connection.
    let other = a.join("other-room").await;
    assert_eq!(other["seq"], 0);
    assert_eq!(b.recv_type("message").await["seq"], 2);
    b.send_json(&json!({"type": "send", "room": "other-room", "body": "x", "ref": "o"})).await;
    assert_eq!(b.recv_type("ack").await["room"], "other-room");
    let message = a.recv_type("message").await;
    assert_eq!((message["room"].as_str(), message["seq"].as_u64()), (Some("other-room"), Some(1)));
}

#[tokio::test]
async fn send_delivers_message_to_every_member_then_acks() {
    let server = TestServer::start(&[]).await;
    let (mut alice, _) = server.connect_joined("chat", &token("alice", None, 3600)).await;
    let (mut bob, _) = server.connect_joined("chat", &token("bob", None, 3600)).await;

    let bodies = [
        json!({"text": "hi", "nested": {"list": [1, 2.5, -3, true, null], "empty": {}}}),
        json!(null),
        json!("héllo \"quoted\" \\ \n\t 🎉 \u{0001}"),
        json!(12345678901234567u64),
        json!([]),
        json!(false),
    ];
    let mut expected_seq = 0;
    for body in &bodies {
        expected_seq += 1;
        let before = unix_millis();
        alice.send_json(&json!({"type": "send", "room": "chat", "body": body, "ref": "k"})).await;
        // A member sender gets its own message before its ack.
        let mine = alice.recv_type("message").await;
        let ack = alice.recv_type("ack").await;
        let theirs = bob.recv_type("message").await;
        let after = unix_millis();
        assert_eq!(mine, theirs);
        let ts = mine["ts"].as_u64().expect("ts is a number");
        assert!(ts + 60_000 >= before && ts <= after + 60_000, "ts {ts} is not server time in ms");
        assert_eq!(
            mine,
            json!({"type": "message", "room": "chat", "seq": expected_seq, "from": "alice", "ts": ts, "body": body})
        );
        assert_eq!(ack, json!({"type": "ack", "ref": "k", "room": "chat", "seq": expected_seq}));
    }

    // Without ref: the message, and no ack.
    bob.send_json(&json!({"type": "send", "room": "chat", "body": {"no": "ref"}})).await;
    let m = bob.recv_type("message").await;
    assert_eq!((m["from"].as_str(), m["seq"].as_u64()), (Some("bob"), Some(expected_seq + 1)));
    bob.ping_pong().await;
    assert_eq!(alice.recv_type("message").await, m);
    alice.ping_pong().await;

    // The body is relayed as the sender wrote it (exact JSON text).
    alice.send_text(r#"{"type":"send","room":"chat","body":{ "x" : [1, 2.50] },"ref":"raw"}"#).await;
    let raw = bob.recv_text().await;
    assert!(raw.contains(r#""body":{ "x" : [1, 2.50] }"#), "body not relayed verbatim: {raw}");
}

#[tokio::test]
async fn send_without_joining_and_leave() {
    let server = TestServer::start(&[]).await;
    let (mut member, _) = server.connect_joined("news", &token("member", None, 3600)).await;
    let mut outsider = server.connect("/ws", &token("outsider", Some(&["news"]), 3600)).await;

    // A non-member whose token allows the room may send; it gets only the ack.
    let seq = outsider.publish("news", json!("extra")).await;
    assert_eq!(seq, 1);
    outsider.ping_pong().await;
    let m = member.recv_type("message").await;
    assert_eq!((m["from"].as_str(), m["body"].as_str()), (Some("outsider"), Some("extra")));

    // leave -> left, then nothing more from that room.
    member.send_json(&json!({"type": "leave", "room": "news"})).await;
    assert_eq!(member.recv_json().await, json!({"type": "left", "room": "news"}));
    assert_eq!(outsider.publish("news", json!("after leave")).await, 2);
    member.ping_pong().await;

    // Leaving again: not joined.
    member.send_json(&json!({"type": "leave", "room": "news", "ref": "l2"})).await;
    member.recv_error("not_joined", Some("l2")).await;
    member.send_json(&json!({"type": "leave", "room": "never-joined"})).await;
    member.recv_error("not_joined", None).await;
    member.ping_pong().await;

    // Rejoining works, and messages flow again.
    assert_eq!(member.join("news").await["seq"], 2);
    assert_eq!(outsider.publish("news", json!("back")).await, 3);
    assert_eq!(member.recv_type("message").await["seq"], 3);
}

#[tokio::test]
async fn history_pages_backwards_oldest_first() {
    let server = TestServer::start(&[]).await;
    let mut c = server.connect("/ws", &token("alice", None, 3600)).await;

    // An unknown room has an empty history.
    c.send_json(&json!({"type": "history", "room": "nothing-here"})).await;
    assert_eq!(c.recv_json().await, json!({"type": "history", "room": "nothing-here", "messages": []}));

    for i in 1..=60u64 {
        assert_eq!(c.publish("h", json!({"i": i})).await, i);
    }
    let seqs = |v: &Value| -> Vec<u64> {
        assert_eq!(v["type"], "history");
        assert_eq!(v["room"], "h");
        v["messages"].as_array().unwrap().iter().map(|m| m["seq"].as_u64().unwrap()).collect()
    };
    // Default limit 50: the latest 50, oldest first.
    c.send_json(&json!({"type": "history", "room": "h"})).await;
    let page = c.recv_json().await;
    assert_eq!(seqs(&page), (11..=60).collect::<Vec<_>>());
    let first = &page["messages"][0];
    assert_eq!(first["type"], "message");
    assert_eq!((first["from"].as_str(), first["body"]["i"].as_u64()), (Some("alice"), Some(11)));
    assert!(first["ts"].is_u64());

    c.send_json(&json!({"type": "history", "room": "h", "limit": 3})).await;
    assert_eq!(seqs(&c.recv_json().await), [58, 59, 60]);
    c.send_json(&json!({"type": "history", "room": "h", "before": 5, "limit": 3})).await;
    assert_eq!(seqs(&c.recv_json().await), [2, 3, 4]);
    c.send_json(&json!({"type": "history", "room": "h", "before": 3, "limit": 100})).await;
    assert_eq!(seqs(&c.recv_json().await), [1, 2]);
    c.send_json(&json!({"type": "history", "room": "h", "before": 1})).await;
    assert_eq!(seqs(&c.recv_json().await), Vec::<u64>::new());
    c.send_json(&json!({"type": "history", "room": "h", "limit": 100})).await;
    assert_eq!(seqs(&c.recv_json().await), (1..=60).collect::<Vec<_>>());
    c.send_json(&json!({"type": "history", "room": "h", "limit": 1})).await;
    assert_eq!(seqs(&c.recv_json().await), [60]);
}

#[tokio::test]
async fn refresh_and_application_ping() {
    let server = TestServer::start(&[]).await;
    let mut c = server.connect("/ws", &token("alice", None, 3600)).await;

    let new_exp = unix_now() + 7200;
    let fresh = sign(&json!({"sub": "alice", "exp": new_exp}));
    c.send_json(&json!({"type": "refresh", "token": fresh})).await;
    assert_eq!(c.recv_json().await, json!({"type": "refreshed", "exp": new_exp}));

    c.send_json(&json!({"type": "ping", "ref": "p-1"})).await;
    assert_eq!(c.recv_json().await, json!({"type": "pong", "ref": "p-1"}));
    c.send_json(&json!({"type": "ping"})).await;
    assert_eq!(c.recv_json().await, json!({"type": "pong"}));
}

// ---------------------------------------------------------------------------
// Errors (section 3): the connection stays open after each
// ---------------------------------------------------------------------------

#[tokio::test]
async fn bad_requests_get_bad_request_and_the_connection_stays_open() {
    let server = TestServer::start(&[]).await;
    let mut c = server.connect("/ws", &token("alice", None, 3600)).await;

    c.send(Message::binary(vec![1u8, 2, 3])).await;
    c.recv_error("bad_request", None).await;
    c.ping_pong().await;
    c.send(Message::binary(br#"{"type":"ping"}"#.to_vec())).await;
    c.recv_error("bad_request", None).await;
    c.ping_pong().await;

    let long_room = "r".repeat(129);
    let cases: Vec<(String, Option<&str>)> = vec![
        ("[1]".into(), None),
        ("\"x\"".into(), None),
        ("42".into(), None),
        ("null".into(), None),
        ("{".into(), None),
        ("".into(), None),
        (r#"{"room":"a"}"#.into(), None),
        (r#"{"type":"fly","ref":"u1"}"#.into(), Some("u1")),
        (r#"{"type":"fly"}"#.into(), None),
        (r#"{"type":"join","room":"a b","ref":"r1"}"#.into(), Some("r1")),
        (r#"{"type":"join","room":"","ref":"r2"}"#.into(), Some("r2")),
        (format!(r#"{{"type":"join","room":"{long_room}","ref":"r3"}}"#), Some("r3")),
        (r#"{"type":"join","room":"caf\u00e9","ref":"r4"}"#.into(), Some("r4")),
        (r#"{"type":"join","ref":"m1"}"#.into(), Some("m1")),
        (r#"{"type":"leave","ref":"m2"}"#.into(), Some("m2")),
        (r#"{"type":"send","room":"a","ref":"m3"}"#.into(), Some("m3")),
        (r#"{"type":"send","body":1,"ref":"m4"}"#.into(), Some("m4")),
        (r#"{"type":"history","ref":"m5"}"#.into(), Some("m5")),
        (r#"{"type":"refresh","ref":"m6"}"#.into(), Some("m6")),
        (r#"{"type":"history","room":"a","limit":0,"ref":"l0"}"#.into(), Some("l0")),
        (r#"{"type":"history","room":"a","limit":101,"ref":"l1"}"#.into(), Some("l1")),
        (r#"{"type":"send","room":"a/b","body":1,"ref":"s1"}"#.into(), Some("s1")),
        (r#"{"type":"history","room":"a b","ref":"h1"}"#.into(), Some("h1")),
        // A field of the wrong JSON type: the error still carries the `ref`.
        (r#"{"type":"join","room":"a","since":-1,"ref":"t1"}"#.into(), Some("t1")),
        (r#"{"ref":"t2","type":"send","room":5,"body":1}"#.into(), Some("t2")),
        (r#"{"type":"history","room":"a","limit":"ten","ref":"t3"}"#.into(), Some("t3")),
        (r#"{"type":"ping","ref":5}"#.into(), None),
    ];
    for (text, reference) in cases {
        c.send_text(&text).await;
        let error = c.recv_json().await;
        assert_eq!(error["type"], "error", "{text} -> {error}");
        assert_eq!(error["code"], "bad_request", "{text} -> {error}");
        assert!(error["message"].as_str().is_some_and(|m| !m.is_empty()), "{text} -> {error}");
        assert_eq!(error.get("ref").and_then(Value::as_str), reference, "{text} -> {error}");
        c.ping_pong().await;
    }
    // The invalid room was refused without being created or joined.
    c.send_json(&json!({"type": "leave", "room": "a"})).await;
    c.recv_error("not_joined", None).await;
}

#[tokio::test]
async fn forbidden_rooms_and_refresh() {
    let server = TestServer::start(&[]).await;
    let mut c = server.connect("/ws", &token("alice", Some(&["lobby", "team-*"]), 3600)).await;

    c.send_json(&json!({"type": "join", "room": "secret", "ref": "j"})).await;
    c.recv_error("forbidden", Some("j")).await;
    c.ping_pong().await;
    c.send_json(&json!({"type": "send", "room": "secret", "body": 1, "ref": "s"})).await;
    c.recv_error("forbidden", Some("s")).await;
    c.ping_pong().await;
    c.send_json(&json!({"type": "history", "room": "secret", "ref": "h"})).await;
    c.recv_error("forbidden", Some("h")).await;
    c.ping_pong().await;
    c.send_json(&json!({"type": "join", "room": "team"})).await;
    c.recv_error("forbidden", None).await;
    c.ping_pong().await;
    // Nothing was published to the forbidden room.
    let mut admin = server.connect("/ws", &token("admin", None, 3600)).await;
    admin.send_json(&json!({"type": "history", "room": "secret"})).await;
    assert_eq!(admin.recv_json().await["messages"], json!([]));

    // Allowed rooms work.
    assert_eq!(c.join("team-red").await["seq"], 0);
    assert_eq!(c.join("lobby").await["seq"], 0);

    // refresh: a token for another sub, an invalid one, an expired one.
    c.send_json(&json!({"type": "refresh", "token": token("mallory", None, 3600), "ref": "f1"})).await;
    c.recv_error("forbidden", Some("f1")).await;
    c.ping_pong().await;
    c.send_json(&json!({"type": "refresh", "token": "garbage", "ref": "f2"})).await;
    c.recv_error("forbidden", Some("f2")).await;
    c.ping_pong().await;
    let other_key = sign_hs(Algorithm::HS256, b"not the secret", &claims("alice", None, 3600));
    c.send_json(&json!({"type": "refresh", "token": other_key, "ref": "f3"})).await;
    c.recv_error("forbidden", Some("f3")).await;
    c.ping_pong().await;
    c.send_json(&json!({"type": "refresh", "token": token("alice", None, -60), "ref": "f4"})).await;
    c.recv_error("forbidden", Some("f4")).await;
    c.ping_pong().await;
    // The refused refreshes left the old token in place.
    c.send_json(&json!({"type": "join", "room": "secret"})).await;
    c.recv_error("forbidden", None).await;
    c.ping_pong().await;
}

#[tokio::test]
async fn rate_limited_then_closed_for_flooding() {
    let server = TestServer::start(&["--rate", "1", "--burst", "2"]).await;
    let mut c = server.connect("/ws", &token("alice", None, 3600)).await;

    // The burst of 2 is allowed; the third frame is refused, its ref echoed.
    for r in ["p1", "p2", "p3"] {
        c.send_json(&json!({"type": "ping", "ref": r})).await;
    }
    assert_eq!(c.recv_json().await, json!({"type": "pong", "ref": "p1"}));
    assert_eq!(c.recv_json().await, json!({"type": "pong", "ref": "p2"}));
    c.recv_error("rate_limited", Some("p3")).await;

    // The connection stays open: after a refill (1 frame/s), a frame goes through.
    tokio::time::sleep(std::time::Duration::from_millis(1200)).await;
    c.send_json(&json!({"type": "ping", "ref": "p4"})).await;
    assert_eq!(c.recv_json().await, json!({"type": "pong", "ref": "p4"}));

    // Keeping on after a whole burst of refused frames: closed with 1008.
    let mut flood = futures_util::stream::iter((0..20).map(|i| {
        Ok::<_, tokio_tungstenite::tungstenite::Error>(Message::text(
            json!({"type": "ping", "ref": format!("f{i}")}).to_string(),
        ))
    }));
    // The server may close while we are still writing; that is the point.
    let _ = tokio::time::timeout(GUARD, c.ws.send_all(&mut flood)).await;
    let (texts, close) = c.recv_until_close().await;
    assert_eq!(close, Some((1008, "flooding".to_owned())), "frames before: {texts:?}");
    let refused = texts.iter().filter(|t| t["type"] == "error" && t["code"] == "rate_limited").count();
    assert!(refused >= 1, "rate_limited errors came before the close: {texts:?}");
    assert!(server.metric("chorus_rate_limited_total").await >= 3.0);
}

// ---------------------------------------------------------------------------
// WebSocket-level behaviour and close codes
// ---------------------------------------------------------------------------

#[tokio::test]
async fn client_ping_gets_pong_and_close_is_echoed() {
    let server = TestServer::start(&[]).await;
    let mut c = server.connect("/ws", &token("alice", None, 3600)).await;
    c.send(Message::Ping(b"hello".to_vec().into())).await;
    loop {
        match c.recv_message().await {
            Message::Pong(payload) => {
                assert_eq!(&payload[..], b"hello");
                break;
            }
            Message::Ping(_) => {}
            other => panic!("expected a pong, got {other:?}"),
        }
    }
    c.close(1000, "bye").await;
    let (code, _) = c.recv_close().await;
    assert_eq!(code, 1000);
    // Then the connection ends.
    assert!(matches!(c.next().await, None | Some(Err(_))));
}

#[tokio::test]
async fn messages_over_the_limit_close_with_1009() {
    let server = TestServer::start(&["--max-message-bytes", "1024"]).await;
    let alice = token("alice", None, 3600);

    // Exactly at the limit is fine.
    let mut c = server.connect("/ws", &alice).await;
    let head = r#"{"type":"ping","ref":""#;
    let at_limit = format!("{head}{}\"}}", "x".repeat(1024 - head.len() - 2));
    assert_eq!(at_limit.len(), 1024);
    c.send_text(&at_limit).await;
    assert_eq!(c.recv_type("pong").await["ref"].as_str().unwrap().len(), 1024 - head.len() - 2);

    // One whole message over the limit.
    let over = json!({"type": "send", "room": "r", "body": "x".repeat(2000)}).to_string();
    c.send_text(&over).await;
    assert_eq!(c.recv_close().await.0, 1009);

    // A fragmented message whose fragments are each small but whose total is over.
    let mut f = server.connect("/ws", &alice).await;
    let chunk = vec![b' '; 400];
    f.send(Message::Frame(Frame::message(b"{\"type\":\"ping\"".to_vec(), OpCode::Data(Data::Text), false))).await;
    for _ in 0..2 {
        f.send(Message::Frame(Frame::message(chunk.clone(), OpCode::Data(Data::Continue), false))).await;
    }
    // The server may have closed before this last fragment: ignore write errors.
    let last = Frame::message(chunk.clone(), OpCode::Data(Data::Continue), true);
    let _ = tokio::time::timeout(GUARD, f.ws.send(Message::Frame(last))).await;
    assert_eq!(f.recv_close().await.0, 1009);

    // A fragmented message under the limit is reassembled and answered.
    let mut g = server.connect("/ws", &alice).await;
    for (part, opcode, fin) in [
        (&b"{\"type\":"[..], OpCode::Data(Data::Text), false),
        (&b"\"ping\",\"ref\""[..], OpCode::Data(Data::Continue), false),
        (&b":\"frag\"}"[..], OpCode::Data(Data::Continue), true),
    ] {
        g.send(Message::Frame(Frame::message(part.to_vec(), opcode, fin))).await;
    }
    assert_eq!(g.recv_json().await, json!({"type": "pong", "ref": "frag"}));
    // A ping between fragments is allowed and answered.
    g.send(Message::Frame(Frame::message(b"{\"type\":\"ping\",".to_vec(), OpCode::Data(Data::Text), false))).await;
    g.send(Message::Ping(b"mid".to_vec().into())).await;
    g.send(Message::Frame(Frame::message(b"\"ref\":\"after\"}".to_vec(), OpCode::Data(Data::Continue), true))).await;
    assert!(matches!(g.recv_message().await, Message::Pong(p) if &p[..] == b"mid"));
    assert_eq!(g.recv_json().await, json!({"type": "pong", "ref": "after"}));
}

#[tokio::test]
async fn unmasked_client_frame_closes_with_1002() {
    let server = TestServer::start(&[]).await;
    let alice = token("alice", None, 3600);

    // A well-behaved raw client first: masked frames work.
    let mut raw = RawClient::connect(server.addr, "/ws", &alice).await;
    raw.send_text(r#"{"type":"ping","ref":"raw"}"#).await;
    let (opcode, payload) = raw.read_frame().await.expect("a reply");
    assert_eq!(opcode, OP_TEXT);
    assert_eq!(serde_json::from_slice::<Value>(&payload).unwrap(), json!({"type": "pong", "ref": "raw"}));

    raw.send_frame(true, OP_TEXT, br#"{"type":"ping","ref":"unmasked"}"#, None).await;
    let (before, close) = raw.read_until_close().await;
    assert!(!before.contains(&OP_TEXT), "the unmasked frame was answered");
    assert_eq!(close.map(|(code, _)| code), Some(1002));
    // The server then ends the connection.
    assert!(raw.read_frame().await.is_none());
}

#[tokio::test]
async fn invalid_utf8_and_bad_close_payloads() {
    let server = TestServer::start(&[]).await;
    let alice = token("alice", None, 3600);
    let mask = Some([1, 2, 3, 4]);

    let mut raw = RawClient::connect(server.addr, "/ws", &alice).await;
    raw.send_frame(true, OP_TEXT, &[b'"', 0xFF, 0xFE, b'"'], mask).await;
    assert_eq!(raw.read_until_close().await.1.map(|(c, _)| c), Some(1007));

    let mut raw = RawClient::connect(server.addr, "/ws", &alice).await;
    raw.send_frame(true, OP_CONTINUATION, b"orphan", mask).await;
    assert_eq!(raw.read_until_close().await.1.map(|(c, _)| c), Some(1002));

    let mut raw = RawClient::connect(server.addr, "/ws", &alice).await;
    raw.send_frame(true, OP_PING, &[b'x'; 126], mask).await;
    assert_eq!(raw.read_until_close().await.1.map(|(c, _)| c), Some(1002));

    // A client close with a status code is echoed with that code.
    let mut raw = RawClient::connect(server.addr, "/ws", &alice).await;
    let mut payload = 4001u16.to_be_bytes().to_vec();
    payload.extend_from_slice(b"app reason");
    raw.send_frame(true, OP_CLOSE, &payload, mask).await;
    assert_eq!(raw.read_until_close().await.1.map(|(c, _)| c), Some(4001));
}

// ---------------------------------------------------------------------------
// Ordering under concurrency (section 2)
// ---------------------------------------------------------------------------

/// 4 senders x 250 messages at once: every member sees the same gapless
/// order 1..=1000, each sender's messages in the order it sent them, and
/// each ack carries the seq its message got.
#[tokio::test]
async fn concurrent_senders_every_member_sees_the_same_gapless_order() {
    const SENDERS: usize = 4;
    const PER_SENDER: u64 = 250;
    const TOTAL: u64 = SENDERS as u64 * PER_SENDER;
    let server = TestServer::start(&["--rate", "100000", "--burst", "100000", "--send-queue", "100000"]).await;

    // Two listeners that only read, plus the senders, which are members too.
    let mut tasks = Vec::new();
    let mut listeners = Vec::new();
    for i in 0..2 {
        let (c, joined) = server.connect_joined("race", &token(&format!("listener{i}"), None, 3600)).await;
        assert_eq!(joined["seq"], 0);
        listeners.push(c);
    }
    let mut senders = Vec::new();
    for s in 0..SENDERS {
        let (c, _) = server.connect_joined("race", &token(&format!("sender{s}"), None, 3600)).await;
        senders.push(c);
    }
    for listener in listeners {
        tasks.push(tokio::spawn(async move {
            let mut listener = listener;
            let mut got = Vec::new();
            while (got.len() as u64) < TOTAL {
                got.push(listener.recv_type("message").await);
            }
            (got, HashMap::new())
        }));
    }
    let start = std::sync::Arc::new(tokio::sync::Barrier::new(SENDERS));
    for (s, client) in senders.into_iter().enumerate() {
        let start = start.clone();
        tasks.push(tokio::spawn(async move {
            let (mut sink, mut stream) = client.ws.split();
            let writer = tokio::spawn(async move {
                start.wait().await;
                for n in 0..PER_SENDER {
                    let frame =
                        json!({"type": "send", "room": "race", "ref": format!("{s}-{n}"), "body": {"s": s, "n": n}});
                    sink.feed(Message::text(frame.to_string())).await.unwrap();
                }
                sink.flush().await.unwrap();
                sink
            });
            let mut got = Vec::new();
            let mut acks = HashMap::new();
            while (got.len() as u64) < TOTAL || (acks.len() as u64) < PER_SENDER {
                let message = tokio::time::timeout(GUARD, stream.next()).await.expect("frame in time");
                let Some(Ok(Message::Text(text))) = message else {
                    match message {
                        Some(Ok(Message::Ping(_) | Message::Pong(_))) => continue,
                        other => panic!("sender {s}: unexpected {other:?}"),
                    }
                };
                let v: Value = serde_json::from_str(text.as_str()).unwrap();
                match v["type"].as_str() {
                    Some("message") => got.push(v),
                    Some("ack") => {
                        acks.insert(v["ref"].as_str().unwrap().to_owned(), v["seq"].as_u64().unwrap());
                    }
                    _ => panic!("sender {s}: unexpected {v}"),
                }
            }
            let _sink = writer.await.unwrap();
            (got, acks)
        }));
    }

    let mut results = Vec::new();
    for task in tasks {
        results.push(task.await.unwrap());
    }
    let reference: Vec<(u64, String, Value)> = results[0]
        .0
        .iter()
        .map(|m| (m["seq"].as_u64().unwrap(), m["from"].as_str().unwrap().to_owned(), m["body"].clone()))
        .collect();
    // Gapless 1..=TOTAL.
    assert_eq!(reference.iter().map(|r| r.0).collect::<Vec<_>>(), (1..=TOTAL).collect::<Vec<_>>());
    // Each sender's messages in its own order, under its own name.
    for s in 0..SENDERS {
        let ns: Vec<u64> = reference
            .iter()
            .filter(|r| r.2["s"] == s)
            .map(|r| {
                assert_eq!(r.1, format!("sender{s}"));
                r.2["n"].as_u64().unwrap()
            })
            .collect();
        assert_eq!(ns, (0..PER_SENDER).collect::<Vec<_>>(), "sender {s} order");
    }
    // Every member saw the very same sequence.
    for (i, (got, _)) in results.iter().enumerate() {
        let same: Vec<(u64, String, Value)> = got
            .iter()
            .map(|m| (m["seq"].as_u64().unwrap(), m["from"].as_str().unwrap().to_owned(), m["body"].clone()))
            .collect();
        assert!(same == reference, "member {i} saw a different order");
    }
    // Each ack's seq is the seq its message got.
    let seq_of: HashMap<(u64, u64), u64> =
        reference.iter().map(|r| ((r.2["s"].as_u64().unwrap(), r.2["n"].as_u64().unwrap()), r.0)).collect();
    for (s, (_, acks)) in results.iter().skip(2).enumerate() {
        assert_eq!(acks.len() as u64, PER_SENDER);
        for n in 0..PER_SENDER {
            assert_eq!(acks[&format!("{s}-{n}")], seq_of[&(s as u64, n)], "ack of {s}-{n}");
        }
    }
    assert!(server.metric("chorus_messages_published_total").await >= TOTAL as f64);
}

// ---------------------------------------------------------------------------
// Recovery (section 4)
// ---------------------------------------------------------------------------

/// Joins `room` with `since` (and `epoch`) and returns the replayed
/// messages' seqs and the `joined` that ends the replay.
async fn join_since(c: &mut Client, room: &str, since: u64, epoch: Option<&str>) -> (Vec<u64>, Value) {
    let mut frame = json!({"type": "join", "room": room, "since": since});
    if let Some(epoch) = epoch {
        frame["epoch"] = json!(epoch);
    }
    c.send_json(&frame).await;
    let mut replayed = Vec::new();
    loop {
        let v = c.recv_json().await;
        match v["type"].as_str() {
            Some("message") => {
                assert_eq!(v["room"], room);
                replayed.push(v["seq"].as_u64().unwrap());
            }
            Some("joined") => return (replayed, v),
            _ => panic!("unexpected frame during the replay: {v}"),
        }
    }
}

#[tokio::test]
async fn recovery_with_and_without_a_gap_in_history() {
    let server = TestServer::start(&["--history-size", "10"]).await;
    let alice = token("alice", None, 3600);
    let mut publisher = server.connect("/ws", &token("pub", None, 3600)).await;

    let (mut c, joined) = server.connect_joined("rec", &alice).await;
    let epoch = joined["epoch"].as_str().unwrap().to_owned();
    for i in 1..=5 {
        assert_eq!(publisher.publish("rec", json!(i)).await, i);
    }
    let mut last_seen = 0;
    for _ in 0..5 {
        last_seen = c.recv_type("message").await["seq"].as_u64().unwrap();
    }
    assert_eq!(last_seen, 5);
    drop(c);

    // Missed 6..=8, all still in history: replayed, then joined recovered=true.
    for i in 6..=8 {
        assert_eq!(publisher.publish("rec", json!(i)).await, i);
    }
    let mut c = server.connect("/ws", &alice).await;
    let (replayed, joined) = join_since(&mut c, "rec", last_seen, Some(&epoch)).await;
    assert_eq!(replayed, [6, 7, 8]);
    assert_eq!(joined, json!({"type": "joined", "room": "rec", "seq": 8, "epoch": epoch, "recovered": true}));
    // Live messages follow with no gap and no duplicate.
    assert_eq!(publisher.publish("rec", json!(9)).await, 9);
    assert_eq!(c.recv_type("message").await["seq"], 9);
    c.ping_pong().await;
    drop(c);

    // Nothing missed: nothing replayed, recovered=true.
    let mut c = server.connect("/ws", &alice).await;
    let (replayed, joined) = join_since(&mut c, "rec", 9, Some(&epoch)).await;
    assert!(replayed.is_empty());
    assert_eq!(joined["recovered"], true);
    drop(c);

    // Missed 10..=23 but history holds only the last 10 (14..=23): a gap,
    // what is left is replayed and recovered=false.
    for i in 10..=23 {
        assert_eq!(publisher.publish("rec", json!(i)).await, i);
    }
    let mut c = server.connect("/ws", &alice).await;
    let (replayed, joined) = join_since(&mut c, "rec", 9, Some(&epoch)).await;
    assert_eq!(replayed, (14..=23).collect::<Vec<_>>());
    assert_eq!(joined, json!({"type": "joined", "room": "rec", "seq": 23, "epoch": epoch, "recovered": false}));
    assert_eq!(publisher.publish("rec", json!(24)).await, 24);
    assert_eq!(c.recv_type("message").await["seq"], 24);
    drop(c);

    // At the edge of history (it holds 15..=24): since=14 needs 15.., all there.
    let mut c = server.connect("/ws", &alice).await;
    let (replayed, joined) = join_since(&mut c, "rec", 14, Some(&epoch)).await;
    assert_eq!(replayed, (15..=24).collect::<Vec<_>>());
    assert_eq!(joined["recovered"], true);
    drop(c);

    // A wrong epoch: nothing replayed, recovered=false, the room's epoch given.
    let mut c = server.connect("/ws", &alice).await;
    let (replayed, joined) = join_since(&mut c, "rec", 20, Some("not-the-epoch")).await;
    assert!(replayed.is_empty(), "replayed {replayed:?} for a wrong epoch");
    assert_eq!(joined, json!({"type": "joined", "room": "rec", "seq": 24, "epoch": epoch, "recovered": false}));
    // Still joined: live messages arrive.
    assert_eq!(publisher.publish("rec", json!(25)).await, 25);
    assert_eq!(c.recv_type("message").await["seq"], 25);
    drop(c);

    // A since beyond the room's latest seq: nothing replayed, recovered=false.
    let mut c = server.connect("/ws", &alice).await;
    let (replayed, joined) = join_since(&mut c, "rec", 999, Some(&epoch)).await;
    assert!(replayed.is_empty());
    assert_eq!(joined["recovered"], false);
    drop(c);

    // history agrees with what recovery can replay: the last 10.
    publisher.send_json(&json!({"type": "history", "room": "rec", "limit": 100})).await;
    let h = publisher.recv_type("history").await;
    let seqs: Vec<u64> = h["messages"].as_array().unwrap().iter().map(|m| m["seq"].as_u64().unwrap()).collect();
    assert_eq!(seqs, (16..=25).collect::<Vec<_>>());
}

/// A room's seq never repeats within an epoch, even when the room keeps no
/// history and everybody left it in between.
#[tokio::test]
async fn seq_never_repeats_within_an_epoch_without_history() {
    let server = TestServer::start(&["--history-size", "0"]).await;
    let mut publisher = server.connect("/ws", &token("pub", None, 3600)).await;
    let mut member = server.connect("/ws", &token("member", None, 3600)).await;

    let epoch = member.join("ephemeral").await["epoch"].as_str().unwrap().to_owned();
    assert_eq!(publisher.publish("ephemeral", json!(1)).await, 1);
    assert_eq!(publisher.publish("ephemeral", json!(2)).await, 2);
    assert_eq!(member.recv_type("message").await["seq"], 1);
    assert_eq!(member.recv_type("message").await["seq"], 2);
    member.send_json(&json!({"type": "leave", "room": "ephemeral"})).await;
    member.recv_type("left").await;

    // Nobody is in the room and it holds nothing; it comes back where it was.
    let joined = member.join("ephemeral").await;
    assert_eq!((joined["seq"].as_u64(), joined["epoch"].as_str()), (Some(2), Some(epoch.as_str())));
    assert_eq!(publisher.publish("ephemeral", json!(3)).await, 3);
    assert_eq!(member.recv_type("message").await["seq"], 3);

    // No history: nothing to page through, and recovery over a gap says so.
    publisher.send_json(&json!({"type": "history", "room": "ephemeral"})).await;
    assert_eq!(publisher.recv_type("history").await["messages"], json!([]));
    let mut late = server.connect("/ws", &token("late", None, 3600)).await;
    let (replayed, joined) = join_since(&mut late, "ephemeral", 1, Some(&epoch)).await;
    assert!(replayed.is_empty());
    assert_eq!(joined["recovered"], false);
    let (replayed, joined) = join_since(&mut late, "ephemeral", 3, Some(&epoch)).await;
    assert!(replayed.is_empty());
    assert_eq!(joined["recovered"], true);
}

fn unix_millis() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_millis() as u64
}
