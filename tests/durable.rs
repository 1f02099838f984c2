//! Durable history in PostgreSQL, single node: each test on a database of
//! its own, created on the machine's PostgreSQL and dropped at the end.
//! Database outages go through a TCP proxy in the test.

mod common;
#[path = "common/keyspace.rs"]
mod keyspace;
#[path = "common/proxy.rs"]
mod proxy;
#[path = "common/test_db.rs"]
mod test_db;

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::time::Duration;

use common::{token, with_database, Client, TestServer, GUARD};
use proxy::Proxy;
use serde_json::{json, Value};
use test_db::{postgres_addr, TestDb};

async fn server(url: &str, extra: &[&str]) -> TestServer {
    let mut args = vec!["--database-url", url, "--rate", "100000", "--burst", "100000"];
    args.extend_from_slice(extra);
    TestServer::start(&args).await
}

async fn publisher(server: &TestServer) -> Client {
    Client::connect(server.addr, "/ws", &token("writer", None, 3600)).await
}

/// Sends `count` messages to `room` and returns the acked seqs, reading acks
/// as it goes (a client that does not read is cut as a slow consumer).
async fn publish_many(client: &mut Client, room: &str, count: usize) -> Vec<u64> {
    const WINDOW: usize = 256;
    let mut acked = Vec::with_capacity(count);
    let mut sent = 0;
    while acked.len() < count {
        while sent < count && sent - acked.len() < WINDOW {
            client
                .send_json(&json!({"type": "send", "room": room, "body": {"i": sent}, "ref": sent.to_string()}))
                .await;
            sent += 1;
        }
        let frame = client.recv_json().await;
        assert_eq!(frame["type"], "ack", "{frame}");
        acked.push(frame["seq"].as_u64().unwrap());
    }
    acked
}

async fn stop(mut server: TestServer) {
    server.sigterm();
    assert!(server.wait_exit().await.success(), "graceful stop exits 0");
}

async fn history(server: &TestServer, room: &str, query: &str) -> Vec<u64> {
    let response = reqwest::Client::new()
        .get(server.url(&format!("/rooms/{room}/history{query}")))
        .bearer_auth(token("reader", None, 3600))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let body: Value = response.json().await.unwrap();
    body["messages"].as_array().unwrap().iter().map(|m| m["seq"].as_u64().unwrap()).collect()
}

async fn joined(server: &TestServer, room: &str) -> Value {
    let mut client = Client::connect(server.addr, &format!("/ws/{room}"), &token("look", None, 3600)).await;
    client.recv_type("joined").await
}

fn range(from: u64, to: u64) -> Vec<u64> {
    (from..=to).collect()
}

#[tokio::test]
async fn messages_survive_a_restart_and_the_sequence_continues_in_the_same_epoch() {
    let db = TestDb::create("durable").await;
    let first = server(&db.url, &[]).await;
    let epoch = joined(&first, "keep").await["epoch"].clone();
    assert_eq!(publish_many(&mut publisher(&first).await, "keep", 20).await, range(1, 20));
    stop(first).await;

    let second = server(&db.url, &[]).await;
    assert_eq!(history(&second, "keep", "?limit=100").await, range(1, 20));
    let again = joined(&second, "keep").await;
    assert_eq!((again["seq"].as_u64(), &again["epoch"]), (Some(20), &epoch), "same epoch, same seq");
    assert_eq!(publish_many(&mut publisher(&second).await, "keep", 1).await, vec![21]);
    stop(second).await;
    db.drop().await;
}

#[tokio::test]
async fn a_burst_of_10000_messages_is_stored_exactly_once() {
    let db = TestDb::create("durable").await;
    let server = server(&db.url, &[]).await;
    let acked = publish_many(&mut publisher(&server).await, "burst", 10_000).await;
    assert_eq!(acked, range(1, 10_000));
    stop(server).await;
    assert_eq!(db.seqs("burst").await, range(1, 10_000), "every message once");
    db.drop().await;
}

#[tokio::test]
async fn history_pages_across_the_memory_and_database_boundary() {
    let db = TestDb::create("durable").await;
    let server = server(&db.url, &["--history-size", "10"]).await;
    publish_many(&mut publisher(&server).await, "pages", 50).await;
    assert_eq!(db.wait_rows("pages", 50).await.len(), 50);
    // Memory holds 41..=50; older pages come from the database.
    assert_eq!(history(&server, "pages", "?before=45&limit=20").await, range(25, 44));
    assert_eq!(history(&server, "pages", "?limit=100").await, range(1, 50));
    assert_eq!(history(&server, "pages", "?before=30&limit=5").await, range(25, 29));
    let mut client = publisher(&server).await;
    client.send_json(&json!({"type": "history", "room": "pages", "before": 12, "limit": 3})).await;
    let page = client.recv_type("history").await;
    let seqs: Vec<u64> = page["messages"].as_array().unwrap().iter().map(|m| m["seq"].as_u64().unwrap()).collect();
    assert_eq!(seqs, range(9, 11));
    stop(server).await;
    db.drop().await;
}

#[tokio::test]
async fn recovery_reaches_further_back_than_memory() {
    let db = TestDb::create("durable").await;
    let server = server(&db.url, &["--history-size", "10"]).await;
    let epoch = joined(&server, "deep").await["epoch"].clone();
    publish_many(&mut publisher(&server).await, "deep", 50).await;
    db.wait_rows("deep", 50).await;
    let mut client = Client::connect(server.addr, "/ws", &token("back", None, 3600)).await;
    client.send_json(&json!({"type": "join", "room": "deep", "since": 5, "epoch": epoch})).await;
    let mut replayed = Vec::new();
    let joined = loop {
        let frame = client.recv_json().await;
        if frame["type"] == "joined" {
            break frame;
        }
        replayed.push(frame["seq"].as_u64().unwrap());
    };
    assert_eq!(replayed, range(6, 50));
    assert_eq!((joined["seq"].as_u64(), joined["recovered"].as_bool()), (Some(50), Some(true)));
    stop(server).await;
    db.drop().await;
}

#[tokio::test]
async fn a_database_outage_loses_nothing_acked_and_a_full_queue_answers_unavailable() {
    let db = TestDb::create("durable").await;
    let proxy = Proxy::start(postgres_addr()).await;
    let proxied = with_database(&format!("postgres://postgres@{}/x", proxy.addr), &db.name);
    let server = server(&proxied, &["--persist-queue", "30"]).await;
    let mut client = publisher(&server).await;
    let mut acked = publish_many(&mut client, "out", 10).await;
    db.wait_rows("out", 10).await;

    proxy.cut();
    acked.extend(publish_many(&mut client, "out", 20).await);
    let ready = reqwest::get(server.url("/readyz")).await.unwrap();
    assert_eq!(ready.status(), 503);
    assert!(ready.text().await.unwrap().contains("database"));
    // Send until the queue is full: then `unavailable`, and no ack.
    let mut refused = 0;
    for i in 0..100 {
        let reference = format!("q{i}");
        client.send_json(&json!({"type": "send", "room": "out", "body": i, "ref": reference})).await;
        let frame = client.recv_json().await;
        match frame["type"].as_str() {
            Some("ack") => acked.push(frame["seq"].as_u64().unwrap()),
            Some("error") => {
                assert_eq!(frame["code"], "unavailable", "{frame}");
                assert_eq!(frame["ref"], reference.as_str());
                refused += 1;
            }
            _ => panic!("unexpected {frame}"),
        }
    }
    assert!(refused > 0, "a full write queue refuses sends");

    proxy.restore();
    // Once the backlog is written, the queue takes messages again.
    assert_eq!(db.wait_rows("out", acked.len()).await.len(), acked.len());
    acked.extend(publish_many(&mut client, "out", 5).await);
    stop(server).await;
    let stored: BTreeSet<u64> = db.seqs("out").await.into_iter().collect();
    let acked: BTreeSet<u64> = acked.into_iter().collect();
    assert!(acked.is_subset(&stored), "acked but not stored: {:?}", acked.difference(&stored).collect::<Vec<_>>());
    assert_eq!(stored.len(), acked.len(), "nothing refused was stored");
    db.drop().await;
}

/// Publishes until the connection ends; returns the acked seqs.
async fn publish_until_closed(mut client: Client, room: &str) -> Vec<u64> {
    let mut acked = Vec::new();
    for i in 0.. {
        let send = json!({"type": "send", "room": room, "body": i, "ref": i.to_string()}).to_string();
        if futures_util::SinkExt::send(&mut client.ws, tokio_tungstenite::tungstenite::Message::text(send))
            .await
            .is_err()
        {
            break;
        }
        match tokio::time::timeout(GUARD, futures_util::StreamExt::next(&mut client.ws)).await {
            Ok(Some(Ok(tokio_tungstenite::tungstenite::Message::Text(text)))) => {
                let frame: Value = serde_json::from_str(&text).unwrap();
                if frame["type"] == "ack" {
                    acked.push(frame["seq"].as_u64().unwrap());
                }
            }
            _ => break,
        }
    }
    acked
}

/// Collects the seqs a member receives until its connection ends.
async fn receive_until_closed(mut client: Client) -> Vec<u64> {
    let mut seqs = Vec::new();
    while let Ok(Some(Ok(message))) = tokio::time::timeout(GUARD, futures_util::StreamExt::next(&mut client.ws)).await {
        if let tokio_tungstenite::tungstenite::Message::Text(text) = message {
            let frame: Value = serde_json::from_str(&text).unwrap();
            if frame["type"] == "message" {
                seqs.push(frame["seq"].as_u64().unwrap());
            }
        }
    }
    seqs
}

#[tokio::test]
async fn sigterm_while_messages_flow_keeps_every_acked_message() {
    let db = TestDb::create("durable").await;
    let first = server(&db.url, &[]).await;
    let sender = tokio::spawn(publish_until_closed(publisher(&first).await, "flow"));
    tokio::time::sleep(Duration::from_millis(300)).await;
    stop(first).await;
    let acked = sender.await.unwrap();
    assert!(!acked.is_empty());
    let second = server(&db.url, &[]).await;
    let stored: BTreeSet<u64> = db.seqs("flow").await.into_iter().collect();
    assert!(acked.iter().all(|s| stored.contains(s)), "an acked message is missing");
    stop(second).await;
    db.drop().await;
}

/// SIGKILLs a node while one client publishes and another receives; returns
/// (acked, delivered, epoch before the kill).
async fn kill_while_flowing(db: &TestDb, extra: &[&str]) -> (Vec<u64>, Vec<u64>, Value) {
    let mut node = server(&db.url, extra).await;
    let mut member = Client::connect(node.addr, "/ws/crash", &token("member", None, 3600)).await;
    let epoch = member.recv_type("joined").await["epoch"].clone();
    let receiver = tokio::spawn(receive_until_closed(member));
    let sender = tokio::spawn(publish_until_closed(publisher(&node).await, "crash"));
    tokio::time::sleep(Duration::from_millis(400)).await;
    node.signal(libc::SIGKILL);
    node.wait_exit().await;
    (sender.await.unwrap(), receiver.await.unwrap(), epoch)
}

#[tokio::test]
async fn with_durable_acks_a_sigkill_loses_nothing_acked_or_delivered_and_keeps_the_epoch() {
    let db = TestDb::create("durable").await;
    let (acked, delivered, epoch) = kill_while_flowing(&db, &["--durable-acks"]).await;
    assert!(!acked.is_empty() && !delivered.is_empty());
    let node = server(&db.url, &["--durable-acks"]).await;
    let stored: BTreeSet<u64> = db.seqs("crash").await.into_iter().collect();
    for seq in acked.iter().chain(&delivered) {
        assert!(stored.contains(seq), "seq {seq} was acked or delivered but is not stored");
    }
    let after = joined(&node, "crash").await;
    assert_eq!(after["epoch"], epoch, "durable acks never change the epoch");
    let next = publish_many(&mut publisher(&node).await, "crash", 1).await[0];
    let seen = acked.iter().chain(&delivered).max().copied().unwrap_or(0);
    assert!(next > seen, "seq {next} reused after the crash (saw up to {seen})");
    stop(node).await;
    db.drop().await;
}

#[tokio::test]
async fn without_durable_acks_a_sigkill_never_reuses_a_seq_within_an_epoch() {
    let db = TestDb::create("durable").await;
    let (acked, delivered, epoch) = kill_while_flowing(&db, &[]).await;
    let seen = acked.iter().chain(&delivered).max().copied().unwrap_or(0);
    assert!(seen > 0);
    let node = server(&db.url, &[]).await;
    let after = joined(&node, "crash").await;
    let next = publish_many(&mut publisher(&node).await, "crash", 1).await[0];
    assert!(after["epoch"] != epoch || next > seen, "seq {next} reused within epoch {epoch}");
    // A client recovering across the crash is told it did not recover.
    let mut late = Client::connect(node.addr, "/ws", &token("late", None, 3600)).await;
    late.send_json(&json!({"type": "join", "room": "crash", "since": seen, "epoch": epoch})).await;
    let joined = late.recv_type("joined").await;
    if joined["epoch"] != epoch {
        assert_eq!(joined["recovered"], false);
    }
    stop(node).await;
    db.drop().await;
}

fn redis_url() -> String {
    std::env::var("CHORUS_TEST_REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".to_owned())
}

async fn cluster_node(db: &TestDb, prefix: &str) -> TestServer {
    server(&db.url, &["--redis-url", &redis_url(), "--redis-prefix", prefix]).await
}

#[tokio::test]
async fn in_a_cluster_every_acked_message_reaches_the_database_when_a_node_is_killed() {
    let db = TestDb::create("durable").await;
    let prefix = keyspace::TestPrefix::new("kill", &redis_url());
    // The doomed node reaches the database through a proxy that is then cut,
    // so it dies holding messages it read from the stream but never wrote.
    let proxy = Proxy::start(postgres_addr()).await;
    let proxied = with_database(&format!("postgres://postgres@{}/x", proxy.addr), &db.name);
    let mut doomed = server(&proxied, &["--redis-url", &redis_url(), "--redis-prefix", prefix.as_str()]).await;
    // A room's first message needs the database (where does its seq stand?).
    let mut acked = publish_many(&mut publisher(&doomed).await, "split", 1).await;
    db.wait_rows("split", 1).await;
    proxy.cut();
    acked.extend(publish_many(&mut publisher(&doomed).await, "split", 200).await);
    let on_doomed = tokio::spawn(publish_until_closed(publisher(&doomed).await, "split"));
    tokio::time::sleep(Duration::from_millis(300)).await;
    doomed.signal(libc::SIGKILL);
    doomed.wait_exit().await;
    acked.extend(on_doomed.await.unwrap());
    assert_eq!(db.seqs("split").await, vec![1], "the doomed node could not write after the cut");

    let survivor = cluster_node(&db, prefix.as_str()).await;
    acked.extend(publish_many(&mut publisher(&survivor).await, "split", 100).await);
    // The survivor writes its own messages and claims what the dead node had read.
    let stored = db.wait_for("split", &acked).await;
    let missing: Vec<_> = acked.iter().filter(|s| !stored.contains(s)).collect();
    assert!(missing.is_empty(), "acked but never stored: {} of {}", missing.len(), acked.len());
    stop(survivor).await;
    db.drop().await;
}

#[tokio::test]
async fn in_a_cluster_redis_losing_a_room_continues_from_the_database_in_a_new_epoch() {
    let db = TestDb::create("durable").await;
    let prefix = keyspace::TestPrefix::new("restore", &redis_url());
    let node = cluster_node(&db, prefix.as_str()).await;
    let epoch = joined(&node, "again").await["epoch"].clone();
    assert_eq!(publish_many(&mut publisher(&node).await, "again", 20).await, range(1, 20));
    db.wait_rows("again", 20).await;
    // Redis forgets the room (its state, history and pending stream).
    let redis = redis::Client::open(redis_url()).unwrap();
    let mut conn = redis.get_multiplexed_async_connection().await.unwrap();
    let keys: Vec<String> = redis::AsyncCommands::keys(&mut conn, format!("{}:*", prefix.as_str())).await.unwrap();
    let _: () = redis::AsyncCommands::del(&mut conn, keys).await.unwrap();

    let after = publish_many(&mut publisher(&node).await, "again", 5).await;
    assert_eq!(after, range(21, 25), "the sequence continues past what the database holds");
    let now = joined(&node, "again").await;
    assert_ne!(now["epoch"], epoch, "without durable acks the epoch changes");
    assert_eq!(db.wait_rows("again", 25).await, range(1, 25), "no row collided");
    assert_eq!(history(&node, "again", "?limit=100").await, range(1, 25), "history reaches into the database");
    stop(node).await;
    db.drop().await;
}

async fn durable_cluster_node(db: &TestDb, prefix: &str) -> TestServer {
    server(&db.url, &["--redis-url", &redis_url(), "--redis-prefix", prefix, "--durable-acks"]).await
}

#[tokio::test]
async fn in_a_cluster_with_durable_acks_an_ack_means_the_database_holds_it() {
    let db = TestDb::create("durable").await;
    let prefix = keyspace::TestPrefix::new("dack", &redis_url());
    let a = durable_cluster_node(&db, prefix.as_str()).await;
    let b = durable_cluster_node(&db, prefix.as_str()).await;
    let mut on_a = Client::connect(a.addr, "/ws/safe", &token("ann", None, 3600)).await;
    on_a.recv_type("joined").await;
    let mut on_b = Client::connect(b.addr, "/ws/safe", &token("bob", None, 3600)).await;
    on_b.recv_type("joined").await;
    let mut acked = publish_many(&mut publisher(&a).await, "safe", 30).await;
    acked.extend(publish_many(&mut publisher(&b).await, "safe", 30).await);
    // No waiting: an ack is only sent once the row is committed.
    let stored: BTreeSet<u64> = db.seqs("safe").await.into_iter().collect();
    assert!(acked.iter().all(|s| stored.contains(s)), "acked before the database held it");
    for member in [&mut on_a, &mut on_b] {
        let mut seqs = Vec::new();
        while seqs.len() < 60 {
            let frame = member.recv_json().await;
            if frame["type"] == "message" {
                seqs.push(frame["seq"].as_u64().unwrap());
            }
        }
        assert_eq!(seqs, range(1, 60), "delivered in order, once");
    }
    stop(a).await;
    stop(b).await;
    db.drop().await;
}

#[tokio::test]
async fn in_a_cluster_with_durable_acks_a_sigkill_loses_nothing_acked_or_delivered() {
    let db = TestDb::create("durable").await;
    let prefix = keyspace::TestPrefix::new("dkill", &redis_url());
    let mut doomed = durable_cluster_node(&db, prefix.as_str()).await;
    let survivor = durable_cluster_node(&db, prefix.as_str()).await;
    let mut member = Client::connect(survivor.addr, "/ws/crash", &token("member", None, 3600)).await;
    let epoch = member.recv_type("joined").await["epoch"].clone();
    let receiver = tokio::spawn(receive_until_closed(member));
    let sender = tokio::spawn(publish_until_closed(publisher(&doomed).await, "crash"));
    tokio::time::sleep(Duration::from_millis(500)).await;
    doomed.signal(libc::SIGKILL);
    doomed.wait_exit().await;
    let acked = sender.await.unwrap();
    assert!(!acked.is_empty());
    // The survivor keeps going; the member's stream ends when it stops.
    let after = publish_many(&mut publisher(&survivor).await, "crash", 5).await;
    let seen = acked.iter().max().copied().unwrap_or(0);
    assert!(after.iter().all(|s| *s > seen), "a seq was given twice");
    let now = joined(&survivor, "crash").await;
    assert_eq!(now["epoch"], epoch, "durable acks keep the epoch");
    stop(survivor).await;
    let delivered = receiver.await.unwrap();
    let stored: BTreeSet<u64> = db.seqs("crash").await.into_iter().collect();
    for seq in acked.iter().chain(&delivered).chain(&after) {
        assert!(stored.contains(seq), "seq {seq} was acked or delivered but is not stored");
    }
    db.drop().await;
}

fn redis_addr() -> SocketAddr {
    let url = redis_url();
    let host_port = url.trim_start_matches("redis://").split('/').next().unwrap_or("127.0.0.1:6379");
    std::net::ToSocketAddrs::to_socket_addrs(host_port).unwrap().next().unwrap()
}

/// Found by scripts/chaos (Redis restarted without its data under
/// `--durable-acks`): a node that missed acked messages on pub/sub filled
/// the gap from Redis history alone, so when Redis had lost them members
/// skipped them for good although the database held them. The gap fill now
/// reads the database for what Redis no longer holds.
#[tokio::test]
async fn in_a_cluster_with_durable_acks_a_gap_fill_finds_in_the_database_what_redis_lost() {
    let db = TestDb::create("durable").await;
    let prefix = keyspace::TestPrefix::new("dlost", &redis_url());
    let proxy = Proxy::start(redis_addr()).await;
    let proxied = format!("redis://{}", proxy.addr);
    let a = durable_cluster_node(&db, prefix.as_str()).await;
    let b = server(&db.url, &["--redis-url", &proxied, "--redis-prefix", prefix.as_str(), "--durable-acks"]).await;
    let mut member = Client::connect(b.addr, "/ws/lost", &token("member", None, 3600)).await;
    member.recv_type("joined").await;
    let mut writer = publisher(&a).await;
    assert_eq!(publish_many(&mut writer, "lost", 3).await, range(1, 3));
    assert_eq!(member.message_seqs(3).await, range(1, 3));

    // Node b is cut off while 4 and 5 are acked (so in the database), then
    // Redis loses the room (its state and history) before b is back.
    proxy.cut();
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(publish_many(&mut writer, "lost", 2).await, range(4, 5));
    let state = format!("{}:{{lost}}:state", prefix.as_str());
    let history = format!("{}:{{lost}}:history", prefix.as_str());
    let url = redis_url();
    tokio::task::spawn_blocking(move || {
        let mut conn = redis::Client::open(url.as_str()).unwrap().get_connection().unwrap();
        let _: () = redis::cmd("DEL").arg(&state).arg(&history).query(&mut conn).unwrap();
    })
    .await
    .unwrap();
    proxy.restore();
    // The room goes on from the database, in the same epoch; b resubscribes
    // and fills its gap, from the database.
    assert_eq!(publish_many(&mut writer, "lost", 1).await, vec![6]);
    assert_eq!(member.message_seqs(3).await, range(4, 6), "4 and 5 are acked: the member must get them");
    stop(a).await;
    stop(b).await;
    db.drop().await;
}
