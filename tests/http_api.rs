//! The HTTP API of PROTOCOL.md section 6 against the real binary: health,
//! readiness, metrics, publishing and reading history, and their errors.

mod common;

use std::time::Duration;

use serde_json::{json, Value};

use common::*;

/// Status, content type and JSON body of a response.
async fn json_response(response: reqwest::Response) -> (u16, Value) {
    let status = response.status().as_u16();
    let content_type = response.headers().get("content-type").map(|v| v.to_str().unwrap().to_owned());
    let text = response.text().await.unwrap();
    assert_eq!(content_type.as_deref(), Some("application/json"), "{status} {text}");
    let body = serde_json::from_str(&text).unwrap_or_else(|e| panic!("not JSON ({e}): {text}"));
    (status, body)
}

async fn post_message(server: &TestServer, room: &str, token: Option<&str>, body: &str) -> (u16, Value) {
    let mut request = http_client()
        .post(server.url(&format!("/rooms/{room}/messages")))
        .header("content-type", "application/json")
        .body(body.to_owned());
    if let Some(token) = token {
        request = request.bearer_auth(token);
    }
    json_response(request.send().await.expect("POST")).await
}

async fn get_history(server: &TestServer, room: &str, query: &str, token: Option<&str>) -> (u16, Value) {
    let mut request = http_client().get(server.url(&format!("/rooms/{room}/history{query}")));
    if let Some(token) = token {
        request = request.bearer_auth(token);
    }
    json_response(request.send().await.expect("GET history")).await
}

fn seqs(history: &Value) -> Vec<u64> {
    history["messages"].as_array().expect("messages array").iter().map(|m| m["seq"].as_u64().unwrap()).collect()
}

#[tokio::test]
async fn health_readiness_and_unknown_routes() {
    let server = TestServer::start(&[]).await;
    let client = http_client();

    let health = client.get(server.url("/healthz")).send().await.unwrap();
    assert_eq!(health.status(), 200);
    assert_eq!(health.text().await.unwrap(), "ok");
    // A single node with no backend is always ready.
    let ready = client.get(server.url("/readyz")).send().await.unwrap();
    assert_eq!(ready.status(), 200);

    for path in ["/", "/nope", "/rooms", "/rooms/lobby", "/rooms/lobby/other", "/ws/a/b", "/healthz/x"] {
        let response = client.get(server.url(path)).send().await.unwrap();
        assert_eq!(response.status(), 404, "GET {path}");
    }
    // Known routes with the wrong method are refused without side effects.
    let response = client.post(server.url("/healthz")).send().await.unwrap();
    assert_eq!(response.status(), 405);
    let response =
        client.get(server.url("/rooms/lobby/messages")).bearer_auth(token("a", None, 60)).send().await.unwrap();
    assert_eq!(response.status(), 405);
    // A plain GET of the WebSocket route (no upgrade) is not an upgrade.
    let response = client.get(server.url("/ws")).bearer_auth(token("a", None, 60)).send().await.unwrap();
    assert!(response.status().is_client_error(), "{}", response.status());
}

#[tokio::test]
async fn metrics_expose_the_documented_series() {
    let server = TestServer::start(&[]).await;
    let alice = token("alice", None, 3600);

    let (mut member, _) = server.connect_joined("m", &alice).await;
    let mut sender = server.connect("/ws", &alice).await;
    sender.publish("m", json!("hello")).await;
    member.recv_type("message").await;
    // A refused upgrade counts as an auth failure.
    let (status, _) = upgrade_refusal(&server.url("/ws"), &[]).await;
    assert_eq!(status, 401);

    let response = reqwest::get(server.url("/metrics")).await.unwrap();
    assert_eq!(response.status(), 200);
    let content_type = response.headers()["content-type"].to_str().unwrap().to_owned();
    assert!(content_type.starts_with("text/plain") || content_type.starts_with("application/openmetrics-text"));
    let text = response.text().await.unwrap();
    assert_eq!(metric_value(&text, "chorus_connections"), Some(2.0), "{text}");
    assert!(metric_value(&text, "chorus_frames_in_total").unwrap() >= 1.0, "{text}");
    assert!(metric_value(&text, "chorus_frames_out_total").unwrap() >= 1.0, "{text}");
    assert_eq!(metric_value(&text, "chorus_messages_published_total"), Some(1.0), "{text}");
    assert!(metric_value(&text, "chorus_deliveries_total").unwrap() >= 1.0, "{text}");
    assert_eq!(metric_value(&text, "chorus_slow_consumers_total"), Some(0.0), "{text}");
    assert_eq!(metric_value(&text, "chorus_rate_limited_total"), Some(0.0), "{text}");
    assert!(metric_value(&text, "chorus_rooms").unwrap() >= 1.0, "{text}");
    assert_eq!(metric_value(&text, "chorus_fanout_seconds_count"), Some(1.0), "{text}");
    assert!(metric_value(&text, "chorus_fanout_seconds_sum").is_some(), "{text}");
    assert!(text.contains("chorus_fanout_seconds_bucket{le=\"+Inf\"} 1"), "{text}");
    assert!(text.lines().any(|l| l.starts_with("chorus_auth_failures_total{")), "{text}");
    // The build this is: one constant series whose labels name it.
    let build = text
        .lines()
        .find_map(|l| l.strip_prefix("chorus_build_info{"))
        .unwrap_or_else(|| panic!("no chorus_build_info:\n{text}"));
    let (labels, value) = build.split_once("} ").unwrap();
    assert_eq!(value, "1", "{build}");
    let label = |name: &str| {
        let start =
            labels.find(&format!("{name}=\"")).unwrap_or_else(|| panic!("no {name} in {labels}")) + name.len() + 2;
        labels[start..].split('"').next().unwrap().to_owned()
    };
    assert_eq!(label("version"), env!("CARGO_PKG_VERSION"));
    assert_is_checkout_commit(&label("commit"));
    assert!(["true", "false", "unknown"].contains(&label("dirty").as_str()), "{build}");
    for kind in ["chorus_connections gauge", "chorus_build_info gauge", "chorus_fanout_seconds histogram"] {
        assert!(text.contains(&format!("# TYPE {kind}")), "no # TYPE {kind}:\n{text}");
    }

    // The connection gauge follows connections closing.
    drop(member);
    sender.close(1000, "").await;
    sender.recv_close().await;
    let deadline = tokio::time::Instant::now() + GUARD;
    while server.metric("chorus_connections").await != 0.0 {
        assert!(tokio::time::Instant::now() < deadline, "chorus_connections never went back to 0");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn publish_over_http_reaches_websocket_members() {
    let server = TestServer::start(&[]).await;
    let (mut member, _) = server.connect_joined("feed", &token("reader", None, 3600)).await;
    let backend = token("backend", Some(&["feed"]), 3600);

    let bodies = [json!({"price": 12.5, "tags": ["a", "b"]}), json!(null), json!("text"), json!(7)];
    for (i, body) in bodies.iter().enumerate() {
        let seq = i as u64 + 1;
        let (status, reply) = post_message(&server, "feed", Some(&backend), &json!({"body": body}).to_string()).await;
        assert_eq!(status, 200, "{reply}");
        assert_eq!(reply, json!({"room": "feed", "seq": seq}));
        let message = member.recv_type("message").await;
        assert_eq!(message["room"], "feed");
        assert_eq!(message["seq"], seq);
        assert_eq!(message["from"], "backend");
        assert_eq!(message["body"], *body);
        assert!(message["ts"].is_u64());
    }

    // HTTP and WebSocket publishes share the room's sequence.
    let mut ws_sender = server.connect("/ws", &token("ws", None, 3600)).await;
    assert_eq!(ws_sender.publish("feed", json!("from ws")).await, 5);
    assert_eq!(member.recv_type("message").await["seq"], 5);
    let (status, reply) = post_message(&server, "feed", Some(&backend), r#"{"body": "again"}"#).await;
    assert_eq!((status, reply["seq"].as_u64()), (200, Some(6)));
    assert_eq!(member.recv_type("message").await["seq"], 6);

    // Publishing to a room nobody joined works and lands in history.
    let (status, reply) = post_message(&server, "empty-room", None, "{}").await;
    assert_eq!(status, 401, "{reply}");
    let anyone = token("backend", None, 3600);
    let (status, reply) = post_message(&server, "empty-room", Some(&anyone), r#"{"body": 1}"#).await;
    assert_eq!((status, reply), (200, json!({"room": "empty-room", "seq": 1})));
    let (status, history) = get_history(&server, "empty-room", "", Some(&anyone)).await;
    assert_eq!(status, 200);
    assert_eq!(seqs(&history), [1]);
}

#[tokio::test]
async fn publish_errors() {
    let server = TestServer::start(&["--max-message-bytes", "1024"]).await;
    let ok = token("backend", Some(&["feed"]), 3600);
    let good = r#"{"body": {"x": 1}}"#;

    let (status, body) = post_message(&server, "feed", None, good).await;
    assert_eq!((status, body["error"].as_str()), (401, Some("invalid_token")), "{body}");
    assert!(body["message"].is_string());
    let (status, body) = post_message(&server, "feed", Some("garbage"), good).await;
    assert_eq!((status, body["error"].as_str()), (401, Some("invalid_token")), "{body}");
    let expired = token("backend", None, -10);
    let (status, body) = post_message(&server, "feed", Some(&expired), good).await;
    assert_eq!((status, body["error"].as_str()), (401, Some("invalid_token")), "{body}");
    let (status, body) = post_message(&server, "other", Some(&ok), good).await;
    assert_eq!((status, body["error"].as_str()), (403, Some("forbidden")), "{body}");

    let anyone = token("backend", None, 3600);
    for room in ["a%20b", "a*b", "caf%C3%A9", &"r".repeat(129)] {
        let (status, body) = post_message(&server, room, Some(&anyone), good).await;
        assert_eq!((status, body["error"].as_str()), (400, Some("bad_request")), "room {room}: {body}");
    }
    for bad in ["", "{", "not json", "[1]", "{}", r#"{"bodi": 1}"#, "null", r#""body""#] {
        let (status, body) = post_message(&server, "feed", Some(&ok), bad).await;
        assert_eq!((status, body["error"].as_str()), (400, Some("bad_request")), "body {bad:?}: {body}");
    }
    // A body over --max-message-bytes.
    let huge = json!({"body": "x".repeat(2000)}).to_string();
    let (status, body) = post_message(&server, "feed", Some(&ok), &huge).await;
    assert_eq!((status, body["error"].as_str()), (413, Some("too_large")), "{body}");

    // None of the refused requests published anything.
    let (status, history) = get_history(&server, "feed", "", Some(&ok)).await;
    assert_eq!(status, 200);
    assert_eq!(history["messages"], json!([]));
    let (status, reply) = post_message(&server, "feed", Some(&ok), good).await;
    assert_eq!((status, reply), (200, json!({"room": "feed", "seq": 1})));
}

#[tokio::test]
async fn history_over_http() {
    let server = TestServer::start(&[]).await;
    let reader = token("reader", Some(&["log"]), 3600);
    let writer = token("writer", None, 3600);
    for i in 1..=5 {
        let (status, reply) = post_message(&server, "log", Some(&writer), &json!({"body": {"i": i}}).to_string()).await;
        assert_eq!((status, reply["seq"].as_u64()), (200, Some(i)));
    }

    let (status, history) = get_history(&server, "log", "", Some(&reader)).await;
    assert_eq!(status, 200);
    assert_eq!(history["room"], "log");
    assert_eq!(seqs(&history), [1, 2, 3, 4, 5]);
    let first = &history["messages"][0];
    assert_eq!(first["type"], "message");
    assert_eq!(first["room"], "log");
    assert_eq!(first["from"], "writer");
    assert_eq!(first["body"], json!({"i": 1}));
    assert!(first["ts"].is_u64());

    for (query, expected) in [
        ("?limit=2", vec![4, 5]),
        ("?before=3", vec![1, 2]),
        ("?before=4&limit=1", vec![3]),
        ("?before=1", vec![]),
        ("?before=99&limit=100", vec![1, 2, 3, 4, 5]),
        ("?before=&limit=", vec![1, 2, 3, 4, 5]),
    ] {
        let (status, history) = get_history(&server, "log", query, Some(&reader)).await;
        assert_eq!(status, 200, "{query}: {history}");
        assert_eq!(seqs(&history), expected, "{query}");
    }
    for query in ["?limit=0", "?limit=101", "?limit=abc", "?before=-1", "?before=x"] {
        let (status, body) = get_history(&server, "log", query, Some(&reader)).await;
        assert_eq!((status, body["error"].as_str()), (400, Some("bad_request")), "{query}: {body}");
    }

    let (status, body) = get_history(&server, "log", "", None).await;
    assert_eq!((status, body["error"].as_str()), (401, Some("invalid_token")), "{body}");
    let (status, body) = get_history(&server, "other", "", Some(&reader)).await;
    assert_eq!((status, body["error"].as_str()), (403, Some("forbidden")), "{body}");
    let (status, body) = get_history(&server, "a%20b", "", Some(&writer)).await;
    assert_eq!((status, body["error"].as_str()), (400, Some("bad_request")), "{body}");
    // A room with no history.
    let (status, history) = get_history(&server, "never", "", Some(&writer)).await;
    assert_eq!((status, history), (200, json!({"room": "never", "messages": []})));
}
