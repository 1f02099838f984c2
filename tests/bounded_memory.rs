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

// ---------------------------------------------------------------------------
// The history budget
// ---------------------------------------------------------------------------

const BUDGET: f64 = (256 << 10) as f64;

/// The value of a labelled sample, e.g. `chorus_evictions_total{reason="memory"}`.
fn labelled(text: &str, sample: &str) -> f64 {
    text.lines()
        .find_map(|line| line.strip_prefix(sample)?.strip_prefix(' ')?.split_whitespace().next()?.parse().ok())
        .unwrap_or(0.0)
}

/// One connection sends to thousands of new rooms: the server's own count
/// of history bytes never passes `--history-memory`, the flooding connection
/// keeps working, a room with a member keeps its recent history, and a room
/// idle since before the flood is forgotten: it comes back in a new epoch
/// and a member rejoining with its old `since` gets `recovered: false`.
#[tokio::test]
async fn a_flood_of_new_rooms_stays_within_the_budget() {
    let server = TestServer::start(&["--history-memory", "256KiB", "--rate", "5000", "--burst", "5000"]).await;
    let mut old = server.connect("/ws", &token("old", None, 3600)).await;
    let old_epoch = old.join("old-room").await["epoch"].as_str().unwrap().to_owned();
    let mut writer = server.connect("/ws", &token("writer", None, 3600)).await;
    writer.publish("old-room", json!(1)).await;
    writer.publish("old-room", json!(2)).await;
    assert_eq!(old.recv_type("message").await["seq"], 1);
    assert_eq!(old.recv_type("message").await["seq"], 2);
    old.send_json(&json!({"type": "leave", "room": "old-room"})).await;
    old.recv_type("left").await;

    let (mut keeper, _) = server.connect_joined("kept", &token("keeper", None, 3600)).await;
    for i in 1..=5 {
        writer.publish("kept", json!(i)).await;
        keeper.recv_type("message").await;
    }

    // Watch the server's own figure while the flood runs.
    let addr = server.addr;
    let done = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let stop = done.clone();
    let watching = tokio::spawn(async move {
        let mut highest = 0.0f64;
        let client = http_client();
        loop {
            let Ok(response) = client.get(format!("http://{addr}/metrics")).send().await else { break };
            let Ok(text) = response.text().await else { break };
            highest = highest.max(metric_value(&text, "chorus_history_bytes").unwrap_or(0.0));
            if stop.load(std::sync::atomic::Ordering::Relaxed) {
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
        highest
    });

    let mut flooder = server.connect("/ws", &token("flooder", None, 3600)).await;
    const ROOMS: usize = 4000;
    const WINDOW: usize = 200;
    let body = "x".repeat(100);
    for chunk in 0..ROOMS / WINDOW {
        for i in chunk * WINDOW..(chunk + 1) * WINDOW {
            flooder.send_json(&json!({"type": "send", "room": format!("flood-{i}"), "body": body, "ref": "f"})).await;
        }
        for _ in 0..WINDOW {
            flooder.recv_type("ack").await;
        }
    }
    let text = server.metrics().await;
    done.store(true, std::sync::atomic::Ordering::Relaxed);
    let highest = watching.await.unwrap().max(metric_value(&text, "chorus_history_bytes").unwrap());
    assert!(highest > 0.0, "no history bytes seen:\n{text}");
    // A publish adds its bytes, then evicts if they passed the budget: a
    // reader may see the budget passed by what is in flight, here the one
    // publish of the one flooding connection (a new room and its message,
    // well under 1 KiB).
    assert!(highest <= BUDGET + 1024.0, "history bytes {highest} passed the budget {BUDGET}");
    assert!(labelled(&text, "chorus_evictions_total{reason=\"memory\"}") > 0.0, "nothing evicted:\n{text}");
    assert!(labelled(&text, "chorus_evictions_total{reason=\"forgotten\"}") > 0.0, "nothing forgotten:\n{text}");
    let tombstones = metric_value(&text, "chorus_tombstones").unwrap();
    assert!(tombstones > 0.0 && tombstones < ROOMS as f64, "tombstones: {tombstones}");

    // The flooding connection works.
    flooder.ping_pong().await;
    assert_eq!(flooder.publish("after-the-flood", json!("still here")).await, 1);

    // The room with a member kept its history.
    writer.send_json(&json!({"type": "history", "room": "kept"})).await;
    let history = writer.recv_type("history").await;
    let seqs: Vec<u64> = history["messages"].as_array().unwrap().iter().map(|m| m["seq"].as_u64().unwrap()).collect();
    assert_eq!(seqs, [1, 2, 3, 4, 5]);
    writer.publish("kept", json!(6)).await;
    assert_eq!(keeper.recv_type("message").await["seq"], 6);

    // The room idle since before the flood was forgotten: a new epoch.
    old.send_json(&json!({"type": "join", "room": "old-room", "since": 2, "epoch": old_epoch})).await;
    let joined = old.recv_type("joined").await;
    assert_ne!(joined["epoch"], old_epoch, "a forgotten room cannot go on in its epoch: {joined}");
    assert_eq!(joined["recovered"], false);
    assert_eq!(joined["seq"], 0);
    writer.publish("old-room", json!("again")).await;
    let message = old.recv_type("message").await;
    assert_eq!((message["seq"].as_u64(), message["body"].as_str()), (Some(1), Some("again")));
}

/// An evicted room that is still remembered goes on in its epoch.
#[tokio::test]
async fn a_room_evicted_for_memory_goes_on_in_its_epoch() {
    let server = TestServer::start(&["--history-memory", "1MiB", "--rate", "5000", "--burst", "5000"]).await;
    let mut writer = server.connect("/ws", &token("writer", None, 3600)).await;
    let epoch = writer.join("early").await["epoch"].clone();
    writer.send_json(&json!({"type": "leave", "room": "early"})).await;
    writer.recv_type("left").await;
    for i in 1..=3 {
        assert_eq!(writer.publish("early", json!(i)).await, i);
    }
    // Enough new rooms to pass the high-water mark, too few to forget.
    let body = "y".repeat(400);
    let mut i = 0;
    while labelled(&server.metrics().await, "chorus_evictions_total{reason=\"memory\"}") == 0.0 {
        for _ in 0..200 {
            writer.publish(&format!("filler-{i}"), json!(body)).await;
            i += 1;
        }
        assert!(i < 20_000, "nothing was ever evicted");
    }
    let text = server.metrics().await;
    assert_eq!(labelled(&text, "chorus_evictions_total{reason=\"forgotten\"}"), 0.0);
    writer.send_json(&json!({"type": "history", "room": "early"})).await;
    assert_eq!(writer.recv_type("history").await["messages"], json!([]), "the oldest room was evicted");
    assert_eq!(writer.publish("early", json!(4)).await, 4, "its sequence goes on");
    writer.send_json(&json!({"type": "join", "room": "early", "since": 4, "epoch": epoch})).await;
    let joined = writer.recv_type("joined").await;
    assert_eq!((joined["epoch"].clone(), joined["recovered"].clone()), (epoch, json!(true)));
}
