//! Bounded memory (PROTOCOL.md section 12) against the real binary: the
//! per-connection room limit and its `too_many_rooms` error, the history
//! budget under a flood of distinct rooms, forgotten rooms starting a new
//! epoch.

mod common;

use serde_json::json;

use common::*;

// ---------------------------------------------------------------------------
// Rooms per connection
// ---------------------------------------------------------------------------

/// `/ws/{room}` counts; a join past the limit gets `too_many_rooms` with its
/// ref, and the connection stays open, in all its rooms; a rejoin is not a
/// new room, and leaving one makes space for another.
#[tokio::test]
async fn a_join_past_the_limit_gets_too_many_rooms_and_keeps_the_rooms() {
    let server = TestServer::start(&["--max-rooms-per-connection", "3"]).await;
    let (mut member, _) = server.connect_joined("cap-0", &token("member", None, 3600)).await;
    member.join("cap-1").await;
    member.join("cap-2").await;

    member.send_json(&json!({"type": "join", "room": "cap-3", "ref": "j3"})).await;
    member.recv_error("too_many_rooms", Some("j3")).await;
    member.send_json(&json!({"type": "join", "room": "cap-4"})).await;
    member.recv_error("too_many_rooms", None).await;
    member.ping_pong().await;

    // Still a member of every room it had: messages reach it.
    let mut writer = server.connect("/ws", &token("writer", None, 3600)).await;
    for room in ["cap-0", "cap-1", "cap-2"] {
        writer.publish(room, json!(room)).await;
        let message = member.recv_type("message").await;
        assert_eq!((message["room"].as_str(), message["body"].as_str()), (Some(room), Some(room)));
    }
    // A room it was refused is not one it is in.
    writer.publish("cap-3", json!("not for you")).await;
    member.ping_pong().await;

    // Rejoining a room it is in (to recover) is allowed at the limit.
    member.send_json(&json!({"type": "join", "room": "cap-1", "since": 1})).await;
    assert_eq!(member.recv_type("joined").await["room"], "cap-1");

    member.send_json(&json!({"type": "leave", "room": "cap-2"})).await;
    member.recv_type("left").await;
    member.join("cap-3").await;
    assert_eq!(server.metric("chorus_too_many_rooms_total").await, 2.0);
}

/// The room of `/ws/{room}` is one of the connection's rooms.
#[tokio::test]
async fn the_room_of_the_url_counts() {
    let server = TestServer::start(&["--max-rooms-per-connection", "1"]).await;
    let (mut member, _) = server.connect_joined("only", &token("member", None, 3600)).await;
    member.send_json(&json!({"type": "join", "room": "second", "ref": "r"})).await;
    member.recv_error("too_many_rooms", Some("r")).await;
    let mut writer = server.connect("/ws", &token("writer", None, 3600)).await;
    writer.publish("only", json!(1)).await;
    assert_eq!(member.recv_type("message").await["seq"], 1);
}

#[tokio::test]
async fn a_limit_of_zero_is_refused_at_start() {
    let mut command = tokio::process::Command::new(env!("CARGO_BIN_EXE_chorus"));
    command.args(["serve", "--listen", "127.0.0.1:0", "--jwt-secret", SECRET, "--max-rooms-per-connection", "0"]);
    let output = command.output().await.expect("runs");
    assert!(!output.status.success());
    assert!(String::from_utf8_lossy(&output.stderr).contains("--max-rooms-per-connection"));
}
