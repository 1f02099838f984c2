//! Redis keys of rooms expire (PROTOCOL.md section 12): every key of a room
//! lives for `--history-ttl` after its last publish or join, rooms with
//! members on a node are kept alive by it, and a room whose keys expired
//! starts a new epoch, or goes on from the database's sequence. Each test
//! runs under a key prefix of its own on the machine's Redis.

mod common;
#[path = "common/keyspace.rs"]
mod keyspace;
#[path = "common/test_db.rs"]
mod test_db;

use std::time::Duration;

use redis::AsyncCommands;
use serde_json::json;

use common::*;

fn redis_url() -> String {
    std::env::var("CHORUS_TEST_REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".to_owned())
}

async fn redis() -> redis::aio::MultiplexedConnection {
    redis::Client::open(redis_url()).unwrap().get_multiplexed_async_connection().await.unwrap()
}

async fn node(prefix: &str, extra: &[&str]) -> TestServer {
    let url = redis_url();
    let mut args = vec!["--redis-url", &url, "--redis-prefix", prefix];
    args.extend_from_slice(extra);
    TestServer::start(&args).await
}

/// The PTTL of the room's state and history keys (-2: no such key).
async fn pttls(conn: &mut redis::aio::MultiplexedConnection, prefix: &str, room: &str) -> (i64, i64) {
    let state: i64 = conn.pttl(format!("{prefix}:{{{room}}}:state")).await.unwrap();
    let history: i64 = conn.pttl(format!("{prefix}:{{{room}}}:history")).await.unwrap();
    (state, history)
}

#[tokio::test]
async fn room_keys_carry_the_history_ttl_and_publishes_renew_it() {
    let prefix = keyspace::TestPrefix::new("ttl", &redis_url());
    let server = node(prefix.as_str(), &["--history-ttl", "5s"]).await;
    let mut conn = redis().await;
    let mut writer = server.connect("/ws", &token("writer", None, 3600)).await;
    writer.publish("lived", json!(1)).await;
    let (state, history) = pttls(&mut conn, prefix.as_str(), "lived").await;
    assert!((1..=5000).contains(&state) && (1..=5000).contains(&history), "PTTLs {state} {history}");
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let (aged, _) = pttls(&mut conn, prefix.as_str(), "lived").await;
    assert!(aged <= 3600, "the TTL runs down: {aged}");
    writer.publish("lived", json!(2)).await;
    let (state, history) = pttls(&mut conn, prefix.as_str(), "lived").await;
    assert!(state > aged && history > aged, "a publish renews both keys: {state} {history} after {aged}");
}

#[tokio::test]
async fn without_a_ttl_room_keys_do_not_expire() {
    let prefix = keyspace::TestPrefix::new("nottl", &redis_url());
    let server = node(prefix.as_str(), &["--history-ttl", "0s"]).await;
    let mut writer = server.connect("/ws", &token("writer", None, 3600)).await;
    writer.publish("forever", json!(1)).await;
    assert_eq!(pttls(&mut redis().await, prefix.as_str(), "forever").await, (-1, -1));
}

/// A room with a member here outlives the TTL however quiet it is; an
/// unused one expires, and a member coming back with its old `since` finds
/// a new epoch and `recovered: false`.
#[tokio::test]
async fn rooms_with_members_stay_and_unused_rooms_expire_into_a_new_epoch() {
    let prefix = keyspace::TestPrefix::new("expire", &redis_url());
    let server = node(prefix.as_str(), &["--history-ttl", "1s"]).await;
    let (mut member, _) = server.connect_joined("busy", &token("member", None, 3600)).await;
    let mut writer = server.connect("/ws", &token("writer", None, 3600)).await;
    writer.publish("busy", json!(1)).await;
    member.recv_type("message").await;
    let mut returning = server.connect("/ws", &token("returning", None, 3600)).await;
    let epoch = returning.join("quiet").await["epoch"].as_str().unwrap().to_owned();
    writer.publish("quiet", json!(1)).await;
    assert_eq!(returning.recv_type("message").await["seq"], 1);
    returning.send_json(&json!({"type": "leave", "room": "quiet"})).await;
    returning.recv_type("left").await;

    let mut conn = redis().await;
    let deadline = tokio::time::Instant::now() + GUARD;
    while pttls(&mut conn, prefix.as_str(), "quiet").await.0 != -2 {
        assert!(tokio::time::Instant::now() < deadline, "the unused room's keys never expired");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // Two TTLs have passed since "busy" last saw a publish or join.
    tokio::time::sleep(Duration::from_millis(1200)).await;
    let (state, _) = pttls(&mut conn, prefix.as_str(), "busy").await;
    assert!(state > 0, "the room with a member was kept: {state}");
    assert_eq!(writer.publish("busy", json!(2)).await, 2);
    assert_eq!(member.recv_type("message").await["seq"], 2);

    returning.send_json(&json!({"type": "join", "room": "quiet", "since": 1, "epoch": epoch})).await;
    let joined = returning.recv_type("joined").await;
    assert_ne!(joined["epoch"], epoch.as_str(), "{joined}");
    assert_eq!((joined["seq"].clone(), joined["recovered"].clone()), (json!(0), json!(false)));
    writer.publish("quiet", json!("again")).await;
    assert_eq!(returning.recv_type("message").await["seq"], 1);
}

// ---------------------------------------------------------------------------
// With a database
// ---------------------------------------------------------------------------

/// An expired room goes on from the database's sequence: no `seq` repeats.
#[tokio::test]
async fn an_expired_room_goes_on_from_the_database() {
    let db = test_db::TestDb::create("expiry").await;
    let prefix = keyspace::TestPrefix::new("dbexpire", &redis_url());
    let server = node(prefix.as_str(), &["--history-ttl", "1s", "--database-url", &db.url]).await;
    let mut writer = server.connect("/ws", &token("writer", None, 3600)).await;
    for i in 1..=3 {
        assert_eq!(writer.publish("kept-in-db", json!(i)).await, i);
    }
    let mut conn = redis().await;
    let deadline = tokio::time::Instant::now() + GUARD;
    while pttls(&mut conn, prefix.as_str(), "kept-in-db").await.0 != -2 {
        assert!(tokio::time::Instant::now() < deadline, "the room's keys never expired");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(writer.publish("kept-in-db", json!(4)).await, 4, "the sequence goes on from the database");
    writer.send_json(&json!({"type": "history", "room": "kept-in-db"})).await;
    let history = writer.recv_type("history").await;
    let seqs: Vec<u64> = history["messages"].as_array().unwrap().iter().map(|m| m["seq"].as_u64().unwrap()).collect();
    assert_eq!(seqs, [1, 2, 3, 4]);
    drop(server);
    db.drop().await;
}
