//! The chat page's routes (`/`, `/demo/*`, `POST /demo/token`): served with a
//! generated secret or `--demo`, absent otherwise; a demo token works on
//! `/ws`; bad requests are refused and the server goes on.

mod common;

use serde_json::{json, Value};

use common::*;

async fn status(url: &str) -> u16 {
    reqwest::get(url).await.unwrap().status().as_u16()
}

async fn demo_token(server: &TestServer, body: &str) -> (u16, Value) {
    let response = reqwest::Client::new().post(server.url("/demo/token")).body(body.to_owned()).send().await.unwrap();
    let status = response.status().as_u16();
    (status, response.json().await.unwrap_or(Value::Null))
}

#[tokio::test]
async fn with_a_configured_key_the_page_is_off_unless_demo() {
    let server = TestServer::start(&[]).await;
    assert_eq!(status(&server.url("/")).await, 404);
    assert_eq!(status(&server.url("/demo/chorus.js")).await, 404);
    assert_eq!(demo_token(&server, r#"{"name":"alice"}"#).await.0, 404);
    assert_eq!(status(&server.url("/healthz")).await, 200);
}

#[tokio::test]
async fn with_demo_the_page_its_files_and_working_tokens_are_served() {
    let server = TestServer::start(&["--demo"]).await;
    let page = reqwest::get(server.url("/")).await.unwrap();
    assert_eq!(page.status(), 200);
    assert!(page.headers()["content-type"].to_str().unwrap().starts_with("text/html"));
    assert!(page.text().await.unwrap().contains("/demo/chat.js"));
    for file in ["chat.js", "chat.css", "chorus.js", "chorus.d.ts"] {
        assert_eq!(status(&server.url(&format!("/demo/{file}"))).await, 200, "{file}");
    }
    let module = reqwest::get(server.url("/demo/chorus.js")).await.unwrap().text().await.unwrap();
    assert_eq!(module, include_str!("../clients/js/chorus.js"), "the module served is the client's own");
    assert_eq!(status(&server.url("/demo/nope.js")).await, 404);

    let (code, answer) = demo_token(&server, r#"{"name":"alice"}"#).await;
    assert_eq!(code, 200, "{answer}");
    assert_eq!(answer["sub"], "alice");
    assert!(answer["exp"].as_u64().unwrap() > unix_now());
    let jwt = answer["token"].as_str().unwrap();
    let (mut client, joined) = server.connect_joined("lobby", jwt).await;
    assert_eq!(joined["type"], "joined");
    // A demo token may publish too (the client is not joined to "other").
    let seq = client.publish("other", json!({"text": "hi"})).await;
    assert_eq!(seq, 1);

    // Refusals, and the server goes on.
    for bad in [r#"{"name":""}"#, r#"{"name":"two words"}"#, r#"{"nom":"x"}"#, "not json"] {
        let (code, answer) = demo_token(&server, bad).await;
        assert_eq!(code, 400, "{bad}: {answer}");
        assert_eq!(answer["error"], "bad_request");
    }
    let (code, _) = demo_token(&server, r#"{"name":"bob"}"#).await;
    assert_eq!(code, 200);
    client.ping_pong().await;
}

#[tokio::test]
async fn with_no_key_the_page_is_on_and_the_banner_prints_its_address() {
    let mut server = TestServer::start_raw(&[]).await;
    let mut chat_line = None;
    for _ in 0..10 {
        match server.next_stdout_line().await {
            Some(line) if line.trim_start().starts_with("chat:") => {
                chat_line = Some(line);
                break;
            }
            Some(_) => {}
            None => break,
        }
    }
    let chat_line = chat_line.expect("the banner prints the chat page's address");
    assert!(chat_line.contains(&format!("http://{}/", server.addr)), "{chat_line}");
    assert_eq!(status(&server.url("/")).await, 200);
}

#[tokio::test]
async fn demo_with_a_public_key_is_refused_at_start() {
    let dir = TempDir::new("chat-page-key");
    let (_private, public) = openssl_keypair(&dir, "rsa");
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_chorus"))
        .args(["serve", "--listen", "127.0.0.1:0", "--demo", "--jwt-public-key"])
        .arg(&public)
        .env_remove("CHORUS_JWT_SECRET")
        .output()
        .unwrap();
    assert!(!output.status.success());
    assert!(String::from_utf8_lossy(&output.stderr).contains("--demo needs --jwt-secret"));
}
