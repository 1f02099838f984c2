//! Cluster mode: several chorus nodes joined by the machine's Redis, each
//! test under a prefix of its own. Backend failures go through a TCP proxy
//! in the test; the machine's Redis itself is never stopped or flushed.

mod common;
#[path = "common/keyspace.rs"]
mod keyspace;
#[path = "common/proxy.rs"]
mod proxy;

use std::collections::HashSet;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use common::{token, Client, TestServer, GUARD};
use proxy::Proxy;
use redis::AsyncCommands;
use serde_json::{json, Value};

fn redis_url() -> String {
    std::env::var("CHORUS_TEST_REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".to_owned())
}

fn redis_addr() -> SocketAddr {
    let url = redis_url();
    let host_port = url.trim_start_matches("redis://").split('/').next().unwrap_or("127.0.0.1:6379").to_owned();
    let host_port = host_port.rsplit('@').next().unwrap_or(&host_port).to_owned();
    std::net::ToSocketAddrs::to_socket_addrs(&host_port).unwrap().next().unwrap()
}

/// A key prefix no other test (or run) shares, wiped when the test ends.
fn unique_prefix(test: &str) -> keyspace::TestPrefix {
    keyspace::TestPrefix::new(test, &redis_url())
}

/// A node of the cluster `prefix`, reaching Redis at `redis`.
async fn node(prefix: &str, redis: &str, extra: &[&str]) -> TestServer {
    let mut args = vec!["--redis-url", redis, "--redis-prefix", prefix, "--rate", "100000", "--burst", "100000"];
    args.extend_from_slice(extra);
    TestServer::start(&args).await
}

async fn two_nodes(prefix: &str) -> (TestServer, TestServer) {
    let url = redis_url();
    (node(prefix, &url, &[]).await, node(prefix, &url, &[]).await)
}

/// Deletes every key of the test's prefix (and nothing else).
async fn wipe(prefix: &str) {
    let client = redis::Client::open(redis_url()).unwrap();
    let mut conn = client.get_multiplexed_async_connection().await.unwrap();
    let keys: Vec<String> = conn.keys(format!("{prefix}:*")).await.unwrap();
    if !keys.is_empty() {
        let _: () = conn.del(keys).await.unwrap();
    }
}

async fn member(server: &TestServer, room: &str, sub: &str) -> Client {
    let mut client = Client::connect(server.addr, &format!("/ws/{room}"), &token(sub, None, 3600)).await;
    client.recv_type("joined").await;
    client
}

/// Sends without waiting for the ack.
async fn send(client: &mut Client, room: &str, body: Value, reference: &str) {
    client.send_json(&json!({"type": "send", "room": room, "body": body, "ref": reference})).await;
}

/// The next `count` messages of `room`, skipping other frames.
async fn messages(client: &mut Client, count: usize) -> Vec<Value> {
    let mut out = Vec::with_capacity(count);
    while out.len() < count {
        let frame = client.recv_json().await;
        if frame["type"] == "message" {
            out.push(frame);
        }
    }
    out
}

fn seqs(messages: &[Value]) -> Vec<u64> {
    messages.iter().map(|m| m["seq"].as_u64().unwrap()).collect()
}

async fn http_status(server: &TestServer, path: &str) -> (u16, String) {
    let response = reqwest::get(server.url(path)).await.unwrap();
    (response.status().as_u16(), response.text().await.unwrap())
}

/// Polls `/readyz` until it answers `status` (a hang guard, not a timing claim).
async fn wait_ready(server: &TestServer, status: u16) -> String {
    let deadline = tokio::time::Instant::now() + GUARD * 2;
    loop {
        let (got, body) = http_status(server, "/readyz").await;
        if got == status {
            return body;
        }
        assert!(tokio::time::Instant::now() < deadline, "/readyz stayed {got}: {body}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn a_message_published_on_one_node_reaches_members_on_both() {
    let prefix = unique_prefix("cross");
    let (a, b) = two_nodes(prefix.as_str()).await;
    let mut on_a = member(&a, "lobby", "ann").await;
    let mut on_b = member(&b, "lobby", "bob").await;
    // In a cluster the sender's ack (the script's reply) and its own copy
    // (from pub/sub) travel different paths: either may come first.
    send(&mut on_b, "lobby", json!({"hello": "from b"}), "hi").await;
    let (first, second) = (on_b.recv_json().await, on_b.recv_json().await);
    let mut kinds = [first["type"].clone(), second["type"].clone()];
    kinds.sort_by_key(|k| k.to_string());
    assert_eq!(kinds, [json!("ack"), json!("message")]);
    for message in [on_a.recv_type("message").await, if first["type"] == "message" { first } else { second }] {
        assert_eq!(message["body"], json!({"hello": "from b"}));
        assert_eq!(message["from"], "bob");
        assert_eq!(message["seq"], 1);
    }
    wait_ready(&a, 200).await;
}

#[tokio::test]
async fn concurrent_sends_from_both_nodes_arrive_in_one_gapless_order_everywhere() {
    let prefix = unique_prefix("order");
    let (a, b) = two_nodes(prefix.as_str()).await;
    let mut members = Vec::new();
    for (i, server) in [&a, &b, &a, &b].into_iter().enumerate() {
        members.push(member(server, "race", &format!("m{i}")).await);
    }
    let publishers = [(&a, "pa"), (&b, "pb")].map(|(server, sub)| {
        let addr = server.addr;
        tokio::spawn(async move {
            let mut client = Client::connect(addr, "/ws", &token(sub, None, 3600)).await;
            for i in 0..250 {
                send(&mut client, "race", json!({"from": sub, "i": i}), &format!("{sub}-{i}")).await;
            }
            let mut acked = Vec::new();
            while acked.len() < 250 {
                let frame = client.recv_type("ack").await;
                acked.push(frame["seq"].as_u64().unwrap());
            }
            acked
        })
    });
    let mut all_acked = Vec::new();
    for publisher in publishers {
        all_acked.extend(publisher.await.unwrap());
    }
    all_acked.sort_unstable();
    assert_eq!(all_acked, (1..=500).collect::<Vec<u64>>(), "every send acked with a distinct seq");

    let mut orders = Vec::new();
    for client in &mut members {
        let received = messages(client, 500).await;
        assert_eq!(seqs(&received), (1..=500).collect::<Vec<u64>>(), "gapless, in order");
        orders.push(received.iter().map(|m| m["body"].clone()).collect::<Vec<_>>());
    }
    assert!(orders.windows(2).all(|w| w[0] == w[1]), "every member saw the same order");
}

#[tokio::test]
async fn a_client_recovers_on_another_node() {
    let prefix = unique_prefix("recover");
    let (a, b) = two_nodes(prefix.as_str()).await;
    let tok = token("rita", None, 3600);
    let mut first = Client::connect(a.addr, "/ws/news", &tok).await;
    let joined = first.recv_type("joined").await;
    let epoch = joined["epoch"].as_str().unwrap().to_owned();
    let mut publisher = Client::connect(b.addr, "/ws", &token("pub", None, 3600)).await;
    for i in 1..=5 {
        publisher.publish("news", json!(i)).await;
    }
    assert_eq!(seqs(&messages(&mut first, 5).await), vec![1, 2, 3, 4, 5]);
    drop(first);
    for i in 6..=9 {
        publisher.publish("news", json!(i)).await;
    }

    let mut again = Client::connect(b.addr, "/ws", &tok).await;
    again.send_json(&json!({"type": "join", "room": "news", "since": 5, "epoch": epoch})).await;
    assert_eq!(seqs(&messages(&mut again, 4).await), vec![6, 7, 8, 9]);
    let joined = again.recv_type("joined").await;
    assert_eq!((joined["seq"].as_u64(), joined["recovered"].as_bool()), (Some(9), Some(true)));
    publisher.publish("news", json!(10)).await;
    assert_eq!(seqs(&messages(&mut again, 1).await), vec![10], "live messages follow, no duplicate");

    let mut stale = Client::connect(a.addr, "/ws", &tok).await;
    stale.send_json(&json!({"type": "join", "room": "news", "since": 5, "epoch": "not-the-epoch"})).await;
    let joined = stale.recv_type("joined").await;
    assert_eq!(joined["recovered"], false, "another epoch replays nothing");
}

#[tokio::test]
async fn members_that_stay_lose_nothing_while_others_join_and_leave() {
    let prefix = unique_prefix("churn");
    let (a, b) = two_nodes(prefix.as_str()).await;
    let mut stayer = member(&a, "churn", "stay").await;
    let done = Arc::new(AtomicBool::new(false));
    // Node b has only churners, so it subscribes and unsubscribes the room
    // over and over; each churner checks the stream it gets while joined.
    let churners: Vec<_> = (0..3)
        .map(|i| {
            let addr = if i == 0 { a.addr } else { b.addr };
            let done = done.clone();
            tokio::spawn(async move {
                let mut client = Client::connect(addr, "/ws", &token(&format!("c{i}"), None, 3600)).await;
                let mut rounds = 0;
                while !done.load(Ordering::SeqCst) {
                    client.send_json(&json!({"type": "join", "room": "churn"})).await;
                    let joined = client.recv_type("joined").await;
                    let mut expected = joined["seq"].as_u64().unwrap() + 1;
                    client.send_json(&json!({"type": "leave", "room": "churn"})).await;
                    loop {
                        let frame = client.recv_json().await;
                        match frame["type"].as_str() {
                            Some("message") => {
                                assert_eq!(frame["seq"].as_u64(), Some(expected), "churner saw a gap");
                                expected += 1;
                            }
                            Some("left") => break,
                            other => panic!("unexpected {other:?}: {frame}"),
                        }
                    }
                    rounds += 1;
                }
                rounds
            })
        })
        .collect();
    let mut publisher = Client::connect(b.addr, "/ws", &token("pub", None, 3600)).await;
    for i in 1..=300 {
        publisher.publish("churn", json!(i)).await;
    }
    assert_eq!(seqs(&messages(&mut stayer, 300).await), (1..=300).collect::<Vec<u64>>());
    done.store(true, Ordering::SeqCst);
    for churner in churners {
        assert!(churner.await.unwrap() > 0);
    }
    // Node b ends with no member: a member joining now still receives.
    let mut late = member(&b, "churn", "late").await;
    publisher.publish("churn", json!("last")).await;
    assert_eq!(seqs(&messages(&mut late, 1).await), vec![301]);
}

#[tokio::test]
async fn redis_cut_off_answers_unavailable_then_the_gap_is_filled_in_order() {
    let prefix = unique_prefix("cut");
    let proxy = Proxy::start(redis_addr()).await;
    let proxied_url = format!("redis://{}", proxy.addr);
    let a = node(prefix.as_str(), &proxied_url, &[]).await;
    let b = node(prefix.as_str(), &redis_url(), &[]).await;
    let mut on_a = member(&a, "cut", "ann").await;
    let mut on_b = member(&b, "cut", "bob").await;
    let mut pub_a = Client::connect(a.addr, "/ws", &token("pa", None, 3600)).await;
    let mut pub_b = Client::connect(b.addr, "/ws", &token("pb", None, 3600)).await;
    for i in 1..=10 {
        pub_b.publish("cut", json!(i)).await;
    }
    assert_eq!(seqs(&messages(&mut on_a, 10).await), (1..=10).collect::<Vec<u64>>());

    proxy.cut();
    let body = wait_ready(&a, 503).await;
    assert!(body.contains("redis"), "{body}");
    send(&mut pub_a, "cut", json!("lost"), "during-cut").await;
    pub_a.recv_error("unavailable", Some("during-cut")).await;
    let post = reqwest::Client::new()
        .post(a.url("/rooms/cut/messages"))
        .bearer_auth(token("http", None, 3600))
        .json(&json!({"body": "also lost"}))
        .send()
        .await
        .unwrap();
    assert_eq!(post.status(), 503);
    assert_eq!(post.json::<Value>().await.unwrap()["error"], "unavailable");
    // Joining and reading history need Redis too: `unavailable`, and the
    // connection goes on working.
    pub_a.send_json(&json!({"type": "join", "room": "elsewhere", "ref": "join-cut"})).await;
    pub_a.recv_error("unavailable", Some("join-cut")).await;
    pub_a.send_json(&json!({"type": "history", "room": "cut", "ref": "history-cut"})).await;
    pub_a.recv_error("unavailable", Some("history-cut")).await;
    pub_a.ping_pong().await;
    let history = reqwest::Client::new()
        .get(a.url("/rooms/cut/history"))
        .bearer_auth(token("http", None, 3600))
        .send()
        .await
        .unwrap();
    assert_eq!(history.status(), 503);
    for i in 11..=30 {
        pub_b.publish("cut", json!(i)).await;
    }

    proxy.restore();
    wait_ready(&a, 200).await;
    for i in 31..=35 {
        assert_eq!(pub_a.publish("cut", json!(i)).await, i);
    }
    // A join that failed left nothing behind: joining now works.
    pub_a.send_json(&json!({"type": "join", "room": "elsewhere"})).await;
    pub_a.recv_type("joined").await;
    assert_eq!(
        seqs(&messages(&mut on_a, 25).await),
        (11..=35).collect::<Vec<u64>>(),
        "each acked message once, in order"
    );
    assert_eq!(seqs(&messages(&mut on_b, 35).await), (1..=35).collect::<Vec<u64>>());
    assert!(a.metric("chorus_bus_reconnects_total").await >= 1.0);
}

#[tokio::test]
async fn a_silent_pubsub_connection_is_noticed_and_replaced() {
    let prefix = unique_prefix("silent");
    let proxy = Proxy::start(redis_addr()).await;
    let a = node(prefix.as_str(), &format!("redis://{}", proxy.addr), &[]).await;
    let b = node(prefix.as_str(), &redis_url(), &[]).await;
    let mut on_a = member(&a, "quiet", "ann").await;
    let mut pub_b = Client::connect(b.addr, "/ws", &token("pb", None, 3600)).await;
    pub_b.publish("quiet", json!(1)).await;
    assert_eq!(seqs(&messages(&mut on_a, 1).await), vec![1]);

    proxy.freeze_subscribers();
    for i in 2..=10 {
        pub_b.publish("quiet", json!(i)).await;
    }
    // The probe goes unanswered, the node reconnects and fills the gap.
    assert_eq!(seqs(&messages(&mut on_a, 9).await), (2..=10).collect::<Vec<u64>>());
    assert!(a.metric("chorus_bus_reconnects_total").await >= 1.0);
}

#[tokio::test]
async fn redis_losing_its_data_starts_a_new_epoch_and_never_repeats_a_seq_within_one() {
    let prefix = unique_prefix("wipe");
    let (a, b) = two_nodes(prefix.as_str()).await;
    let tok = token("watcher", None, 3600);
    let mut watchers = Vec::new();
    for server in [&a, &b] {
        let mut client = Client::connect(server.addr, "/ws/lost", &tok).await;
        let joined = client.recv_type("joined").await;
        watchers.push((client, joined["epoch"].as_str().unwrap().to_owned()));
    }
    let mut pub_a = Client::connect(a.addr, "/ws", &token("pa", None, 3600)).await;
    let mut pub_b = Client::connect(b.addr, "/ws", &token("pb", None, 3600)).await;
    for i in 1..=5 {
        pub_a.publish("lost", json!(i)).await;
    }
    wipe(prefix.as_str()).await;
    for i in 1..=5 {
        pub_b.publish("lost", json!(i)).await;
    }

    for (client, first_epoch) in &mut watchers {
        let mut epoch = first_epoch.clone();
        let mut seen = HashSet::new();
        let mut epochs = HashSet::from([epoch.clone()]);
        let mut received = 0;
        while received < 10 {
            let frame = client.recv_json().await;
            match frame["type"].as_str() {
                Some("joined") => {
                    assert_eq!(frame["recovered"], false, "a new epoch is announced as not recovered");
                    epoch = frame["epoch"].as_str().unwrap().to_owned();
                    epochs.insert(epoch.clone());
                }
                Some("message") => {
                    let seq = frame["seq"].as_u64().unwrap();
                    assert!(seen.insert((epoch.clone(), seq)), "seq {seq} repeated within epoch {epoch}");
                    received += 1;
                }
                other => panic!("unexpected {other:?}: {frame}"),
            }
        }
        assert_eq!(epochs.len(), 2, "the wipe started a new epoch");
    }

    // A client recovering across the wipe learns it did not recover.
    let mut late = Client::connect(a.addr, "/ws", &tok).await;
    let old_epoch = watchers[0].1.clone();
    late.send_json(&json!({"type": "join", "room": "lost", "since": 3, "epoch": old_epoch})).await;
    let joined = late.recv_type("joined").await;
    assert_eq!(joined["recovered"], false);
    assert_ne!(joined["epoch"], json!(old_epoch));
    wipe(prefix.as_str()).await;
}
