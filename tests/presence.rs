//! Presence (PROTOCOL.md section 8) on a single node, against the real
//! binary: the `presence` answer, `presence_state` then `presence_diff`
//! frames, users counted rather than connections, presence ending however
//! a connection ends, truncation at 1,000, and the HTTP route.

mod common;
#[path = "common/presence.rs"]
mod presence;

use std::time::Duration;

use serde_json::{json, Value};

use common::*;
use presence::*;

#[tokio::test]
async fn state_then_diffs_and_users_not_connections() {
    let server = TestServer::start(&[]).await;
    let mut alice = server.connect("/ws", &token("alice", None, 3600)).await;
    let state = join_presence(&mut alice, "lobby").await;
    assert_eq!(
        state,
        json!({"type":"presence_state","room":"lobby","count":1,"members":[{"sub":"alice","conns":1}],"truncated":false})
    );

    // bob joins without asking for presence: alice hears of him.
    let mut bob = server.connect("/ws", &token("bob", None, 3600)).await;
    bob.join("lobby").await;
    let diff = alice.recv_type("presence_diff").await;
    assert_eq!(diff, json!({"type":"presence_diff","room":"lobby","joins":["bob"],"leaves":[],"count":2}));

    // A second connection of bob changes his conns and sends no diff.
    let mut bob2 = server.connect("/ws", &token("bob", None, 3600)).await;
    bob2.join("lobby").await;
    let answer = ask_presence(&mut alice, "lobby").await;
    assert_eq!(answer["count"], 2);
    assert_eq!(answer["members"], json!([{"sub":"alice","conns":1},{"sub":"bob","conns":2}]));
    assert_eq!(answer["truncated"], false);
    tokio::time::sleep(SETTLE).await;
    alice.ping_pong().await;

    // One of bob's connections leaving sends nothing either.
    bob.send_json(&json!({"type": "leave", "room": "lobby"})).await;
    bob.recv_type("left").await;
    tokio::time::sleep(SETTLE).await;
    alice.ping_pong().await;
    let answer = ask_presence(&mut alice, "lobby").await;
    assert_eq!(answer["members"], json!([{"sub":"alice","conns":1},{"sub":"bob","conns":1}]));

    // The last one closing makes him leave.
    bob2.close(1000, "bye").await;
    let diff = alice.recv_type("presence_diff").await;
    assert_eq!(diff, json!({"type":"presence_diff","room":"lobby","joins":[],"leaves":["bob"],"count":1}));

    // A joiner's state includes itself and everyone there.
    let mut carol = server.connect("/ws", &token("carol", None, 3600)).await;
    let state = join_presence(&mut carol, "lobby").await;
    assert_eq!(subs(&state), ["alice", "carol"]);
    assert_eq!(state["count"], 2);
    let diff = alice.recv_type("presence_diff").await;
    assert_eq!(diff["joins"], json!(["carol"]));
    // carol's own arrival is in her state, not in a diff to her.
    tokio::time::sleep(SETTLE).await;
    carol.ping_pong().await;

    // Leaving ends the subscription: alice's leave reaches carol, and
    // nothing more reaches alice.
    alice.send_json(&json!({"type": "leave", "room": "lobby"})).await;
    alice.recv_type("left").await;
    let diff = carol.recv_type("presence_diff").await;
    assert_eq!(diff, json!({"type":"presence_diff","room":"lobby","joins":[],"leaves":["alice"],"count":1}));
    let mut dave = server.connect("/ws", &token("dave", None, 3600)).await;
    dave.join("lobby").await;
    carol.recv_type("presence_diff").await;
    tokio::time::sleep(SETTLE).await;
    alice.ping_pong().await;

    assert_eq!(server.metric("chorus_presence_subscribers").await, 1.0);
    assert!(server.metric("chorus_presence_diffs_total").await >= 5.0);
    assert!(server.metric("chorus_presence_states_total").await >= 2.0);
}

#[tokio::test]
async fn presence_request_and_its_errors() {
    let server = TestServer::start(&[]).await;
    let mut member = server.connect("/ws", &token("member", None, 3600)).await;
    member.join("team-a").await;

    // Joining is not required; the token must allow the room.
    let mut asker = server.connect("/ws", &token("asker", Some(&["team-*"]), 3600)).await;
    let answer = ask_presence(&mut asker, "team-a").await;
    assert_eq!(answer["members"], json!([{"sub":"member","conns":1}]));
    assert_eq!(answer["count"], 1);
    asker.send_json(&json!({"type": "presence", "room": "team-a"})).await;
    let answer = asker.recv_type("presence").await;
    assert!(answer.get("ref").is_none(), "{answer}");
    // An empty room.
    let answer = ask_presence(&mut asker, "team-nobody").await;
    assert_eq!(
        answer,
        json!({"type":"presence","room":"team-nobody","count":0,"members":[],"truncated":false,"ref":answer["ref"]})
    );

    asker.send_json(&json!({"type": "presence", "room": "secret", "ref": "f1"})).await;
    asker.recv_error("forbidden", Some("f1")).await;
    asker.send_json(&json!({"type": "join", "room": "secret", "presence": true, "ref": "f2"})).await;
    asker.recv_error("forbidden", Some("f2")).await;
    asker.send_json(&json!({"type": "presence", "ref": "b1"})).await;
    asker.recv_error("bad_request", Some("b1")).await;
    asker.send_json(&json!({"type": "presence", "room": "no spaces", "ref": "b2"})).await;
    asker.recv_error("bad_request", Some("b2")).await;
    asker.send_json(&json!({"type": "join", "room": "team-a", "presence": "yes", "ref": "b3"})).await;
    // A field of the wrong type still lets the error carry the ref (PROTOCOL section 3).
    asker.recv_error("bad_request", Some("b3")).await;
    // The connection and the server go on.
    asker.ping_pong().await;
    let answer = ask_presence(&mut asker, "team-a").await;
    assert_eq!(answer["count"], 1);
    // A refused join made nobody present.
    let answer = ask_presence(&mut member, "secret").await;
    assert_eq!(answer["count"], 0);
}

#[tokio::test]
async fn http_route() {
    let server = TestServer::start(&[]).await;
    let mut alice = server.connect("/ws", &token("alice", None, 3600)).await;
    alice.join("team-a").await;
    let client = http_client();
    let get = |room: &str, token: Option<String>| {
        let mut request = client.get(server.url(&format!("/rooms/{room}/presence")));
        if let Some(token) = token {
            request = request.bearer_auth(token);
        }
        async move {
            let response = request.send().await.unwrap();
            let status = response.status().as_u16();
            let body: Value = serde_json::from_str(&response.text().await.unwrap()).unwrap();
            (status, body)
        }
    };
    let allowed = || Some(token("reader", Some(&["team-*"]), 3600));
    let (status, body) = get("team-a", allowed()).await;
    assert_eq!(status, 200);
    assert_eq!(body, json!({"room":"team-a","count":1,"members":[{"sub":"alice","conns":1}],"truncated":false}));
    let (status, body) = get("team-b", allowed()).await;
    assert_eq!((status, body["count"].clone()), (200, json!(0)));

    let (status, body) = get("team-a", None).await;
    assert_eq!((status, body["error"].as_str()), (401, Some("invalid_token")));
    let (status, _) = get("team-a", Some("not.a.jwt".into())).await;
    assert_eq!(status, 401);
    let (status, _) = get("team-a", Some(token("reader", None, -120))).await;
    assert_eq!(status, 401);
    let (status, body) = get("lobby", allowed()).await;
    assert_eq!((status, body["error"].as_str()), (403, Some("forbidden")));
    let (status, body) = get("bad%20name", allowed()).await;
    assert_eq!((status, body["error"].as_str()), (400, Some("bad_request")));
    let response = client.post(server.url("/rooms/team-a/presence")).send().await.unwrap();
    assert_eq!(response.status(), 405);

    // The server goes on.
    let (status, _) = get("team-a", allowed()).await;
    assert_eq!(status, 200);
    alice.ping_pong().await;
}

#[tokio::test]
async fn diffs_applied_in_order_equal_a_fresh_presence() {
    let server = TestServer::start(&[]).await;
    let room = "churn";
    let mut watcher = server.connect("/ws", &token("watcher", None, 3600)).await;
    let mut view = Tracked::from_state(&join_presence(&mut watcher, room).await);

    // Churn: users come and go, some with two connections, while more
    // subscribers arrive mid-way (each with its own starting point).
    let mut clients: Vec<Option<Client>> = Vec::new();
    let mut late: Vec<(Client, Tracked)> = Vec::new();
    for round in 0..6u32 {
        for i in 0..12u32 {
            let sub = format!("u{}", (round * 7 + i) % 20);
            let mut c = server.connect("/ws", &token(&sub, None, 3600)).await;
            c.join(room).await;
            clients.push(Some(c));
        }
        // Close every third connection so far, some of which are the
        // second connection of a user who stays.
        for (i, slot) in clients.iter_mut().enumerate() {
            if i % 3 == round as usize % 3 {
                if let Some(mut c) = slot.take() {
                    c.close(1000, "").await;
                }
            }
        }
        if round % 2 == 1 {
            let mut c = server.connect("/ws", &token(&format!("late{round}"), None, 3600)).await;
            let state = join_presence(&mut c, room).await;
            late.push((c, Tracked::from_state(&state)));
        }
        tokio::time::sleep(Duration::from_millis(30 * u64::from(round))).await;
    }
    view.sync_and_check(&mut watcher, room).await;
    for (client, view) in &mut late {
        view.sync_and_check(client, room).await;
    }
}

#[tokio::test]
async fn a_dead_connection_leaves_after_the_ping_timeout() {
    let server = TestServer::start(&["--ping-interval", "200ms", "--ping-timeout", "1s"]).await;
    let mut alice = server.connect("/ws", &token("alice", None, 3600)).await;
    join_presence(&mut alice, "lobby").await;
    // bob joins, then neither reads nor answers pings: a dead peer whose
    // socket is still open.
    let mut bob = server.connect("/ws", &token("bob", None, 3600)).await;
    bob.join("lobby").await;
    assert_eq!(alice.recv_type("presence_diff").await["joins"], json!(["bob"]));
    // alice keeps answering pings by reading.
    let diff = alice.recv_type("presence_diff").await;
    assert_eq!(diff, json!({"type":"presence_diff","room":"lobby","joins":[],"leaves":["bob"],"count":1}));
    drop(bob);
}

#[tokio::test]
async fn token_expiry_ends_presence() {
    let server = TestServer::start(&[]).await;
    let mut alice = server.connect("/ws", &token("alice", None, 3600)).await;
    join_presence(&mut alice, "lobby").await;
    let mut bob = server.connect("/ws", &token("bob", None, 2)).await;
    bob.join("lobby").await;
    assert_eq!(alice.recv_type("presence_diff").await["joins"], json!(["bob"]));
    let (code, _) = bob.recv_close().await;
    assert_eq!(code, 1008);
    assert_eq!(alice.recv_type("presence_diff").await["leaves"], json!(["bob"]));
}

#[tokio::test]
async fn more_than_a_thousand_users_are_truncated_and_counted() {
    let server = TestServer::start(&["--rate", "100000", "--burst", "100000"]).await;
    let room = "crowd";
    let mut watcher = server.connect("/ws", &token("aaa-watcher", None, 3600)).await;
    let mut view = Tracked::from_state(&join_presence(&mut watcher, room).await);
    let mut members = Vec::new();
    for batch in 0..21 {
        let joins = (0..50).map(|i| {
            let addr = server.addr;
            async move {
                let mut c =
                    Client::connect(addr, "/ws", &token(&format!("user{:04}", batch * 50 + i), None, 3600)).await;
                c.join(room).await;
                c
            }
        });
        members.extend(futures_util::future::join_all(joins).await);
    }
    assert_eq!(members.len(), 1050);
    // The watcher applies what it got: a few frames, not one per user;
    // its list is partial above 1,000 users, its count exact.
    let (frames, answer) = read_until_presence(&mut watcher, room).await;
    assert!(frames.len() < 105, "{} presence frames for 1,050 joins", frames.len());
    for frame in &frames {
        view.apply(frame);
    }
    assert_eq!(view.count, 1051);
    assert_eq!(answer["count"], 1051);
    assert_eq!(answer["truncated"], true);
    assert_eq!(answer["members"].as_array().unwrap().len(), 1000);
    let listed = subs(&answer);
    assert_eq!(listed[0], "aaa-watcher");
    assert_eq!(listed[999], "user0998");
    let mut sorted = listed.clone();
    sorted.sort();
    assert_eq!(listed, sorted);
    assert!(answer["members"].as_array().unwrap().iter().all(|m| m["conns"] == 1));

    // A newcomer's state is truncated the same way.
    let mut late = server.connect("/ws", &token("zzz-late", None, 3600)).await;
    let state = join_presence(&mut late, room).await;
    assert_eq!((state["count"].clone(), state["truncated"].clone()), (json!(1052), json!(true)));
    assert_eq!(state["members"].as_array().unwrap().len(), 1000);
    drop(members);
}

#[tokio::test]
async fn a_slow_consumer_cut_ends_presence_in_every_room() {
    // A cut connection whose peer reads nothing more cannot take its close
    // frame; its session, and with it its presence, ends at the ping timeout.
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
    let mut alice = server.connect("/ws", &token("alice", None, 3600)).await;
    join_presence(&mut alice, "lobby").await;
    // bob joins the lobby and a busy room, with a small receive buffer,
    // and then reads nothing.
    let request = with_bearer(ws_request(server.addr, "/ws/firehose"), &token("bob", None, 3600));
    let mut bob = try_connect(server.addr, request, Some(4096)).await.expect("bob connects");
    bob.recv_type("joined").await;
    bob.join("lobby").await;
    assert_eq!(alice.recv_type("presence_diff").await["joins"], json!(["bob"]));
    // alice keeps reading meanwhile, so that her client answers the
    // server's pings: on a busy machine the flood below can outlast her
    // ping timeout.
    let leave = tokio::spawn(async move { alice.recv_type("presence_diff").await });

    let mut publisher = server.connect("/ws", &token("pub", None, 3600)).await;
    let pad = "x".repeat(30 * 1024);
    let mut cut = false;
    for i in 1..=2000u64 {
        publisher.publish("firehose", json!({"i": i, "pad": pad})).await;
        if i % 10 == 0 && server.metric("chorus_slow_consumers_total").await >= 1.0 {
            cut = true;
            break;
        }
    }
    assert!(cut, "bob was never cut as a slow consumer");
    let diff = leave.await.unwrap();
    assert_eq!(diff, json!({"type":"presence_diff","room":"lobby","joins":[],"leaves":["bob"],"count":1}));
    drop(bob);
}
