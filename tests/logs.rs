//! Log lines (PROTOCOL.md section 10): `--log-format json` writes one JSON
//! object per line, failed requests name their connection and user, and no
//! token ever appears in a log line, whatever the client sends.

mod common;

use serde_json::{json, Value};

use common::*;

/// Lets the server write what the requests above logged.
async fn settle(server: &TestServer) {
    assert_eq!(http_client().get(server.url("/healthz")).send().await.unwrap().status(), 200);
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
}

#[tokio::test]
async fn json_logs_name_the_connection_and_user_of_failed_requests_and_never_a_token() {
    let server = TestServer::start_logging("debug", &["--jwt-secret", SECRET, "--log-format", "json"]).await;
    let mut tokens = Vec::new();

    // Refused tokens: badly signed (header and query), expired, a room they do not allow.
    let forged = sign_hs(jsonwebtoken::Algorithm::HS256, b"another-secret", &claims("mallory", None, 600));
    let bearer = format!("Bearer {forged}");
    assert_eq!(upgrade_refusal(&server.url("/ws"), &[("authorization", &bearer)]).await.0, 401);
    assert_eq!(upgrade_refusal(&server.url(&format!("/ws?token={forged}")), &[]).await.0, 401);
    tokens.push(forged);
    let expired = token("eve", None, -3600);
    let bearer = format!("Bearer {expired}");
    assert_eq!(upgrade_refusal(&server.url("/ws/lobby"), &[("authorization", &bearer)]).await.0, 401);
    tokens.push(expired);
    let narrow = token("dora", Some(&["team-*"]), 600);
    let query = format!("/ws/lobby?token={narrow}");
    let (status, body) = upgrade_refusal(&server.url(&query), &[]).await;
    assert_eq!(status, 403, "{body}");
    tokens.push(narrow.clone());
    // The HTTP API with a bad body from a known user.
    let response = http_client()
        .post(server.url("/rooms/team-a/messages"))
        .bearer_auth(&narrow)
        .body("not json")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 400);

    // Inside a connection: a forbidden room, a refused refresh, a token where a number belongs.
    let alice = token("alice", Some(&["lobby"]), 600);
    tokens.push(alice.clone());
    let (mut client, _) = server.connect_joined("lobby", &alice).await;
    let conn_refresh = token("bob", None, 600);
    tokens.push(conn_refresh.clone());
    client.send_json(&json!({"type": "refresh", "token": conn_refresh, "ref": "r1"})).await;
    client.recv_error("forbidden", Some("r1")).await;
    client.send_json(&json!({"type": "join", "room": "elsewhere", "ref": "j1"})).await;
    client.recv_error("forbidden", Some("j1")).await;
    client.send_text(&format!(r#"{{"type":"history","room":"lobby","limit":"{alice}"}}"#)).await;
    client.recv_error("bad_request", None).await;
    client.ping_pong().await;
    settle(&server).await;

    let stderr = server.stderr();
    for token in &tokens {
        let signature = token.rsplit('.').next().unwrap();
        assert!(!stderr.contains(signature), "a token reached the log:\n{stderr}");
    }
    let lines: Vec<Value> = stderr
        .lines()
        .map(|line| serde_json::from_str(line).unwrap_or_else(|e| panic!("not a JSON line ({e}): {line}")))
        .collect();
    for line in &lines {
        for field in ["timestamp", "level", "target", "message"] {
            assert!(line.get(field).is_some(), "no {field}: {line}");
        }
    }
    let failed: Vec<&Value> =
        lines.iter().filter(|l| l["message"].as_str().is_some_and(|m| m.starts_with("request failed"))).collect();
    // Every failure inside the connection names it and its user.
    let in_connection: Vec<&&Value> = failed.iter().filter(|l| l.get("conn").is_some()).collect();
    assert_eq!(in_connection.len(), 3, "{failed:#?}");
    assert!(in_connection.iter().all(|l| l["sub"] == "alice" && l["conn"].as_u64().is_some()), "{failed:#?}");
    // HTTP refusals name the user once the token was valid.
    let room_refusal = failed.iter().find(|l| l["status"] == 403).expect("the 403 was logged");
    assert_eq!(room_refusal["sub"], "dora");
    let bad_body = failed.iter().find(|l| l["status"] == 400).expect("the 400 was logged");
    assert_eq!(bad_body["sub"], "dora");
    assert!(failed.iter().filter(|l| l["status"] == 401).count() >= 3, "{failed:#?}");
}

#[tokio::test]
async fn text_logs_stay_the_default_and_an_unknown_format_stops_the_start() {
    let server = TestServer::start(&[]).await;
    settle(&server).await;
    let stderr = server.stderr();
    assert!(stderr.lines().any(|l| l.contains("chorus ")), "{stderr}");
    assert!(stderr.lines().all(|l| serde_json::from_str::<Value>(l).is_err()), "{stderr}");
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_chorus"))
        .args(["serve", "--jwt-secret", "s", "--listen", "127.0.0.1:0", "--log-format", "xml"])
        .output()
        .unwrap();
    assert!(!output.status.success());
    assert!(String::from_utf8_lossy(&output.stderr).contains("--log-format"));
}
