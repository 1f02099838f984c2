//! `--redis-cluster`: chorus nodes over a real local Redis Cluster (7.0+),
//! found through `CHORUS_TEST_REDIS_CLUSTER` (seed URLs; `scripts/test`
//! starts one with `scripts/redis-cluster`). Each test uses a key prefix of
//! its own and deletes its keys at the end (the helpers shared with the
//! presence and admin tests are in tests/common/redis_cluster.rs). The
//! failover and slot-migration tests start a private cluster, since they
//! kill or reshard its nodes, and throw it away. The last section checks
//! PROTOCOL.md section 12 (bounded memory) on the cluster, with TTLs of a
//! second or two. The tests of durable history use a PostgreSQL database of
//! their own, created and dropped by the test.

mod common;
#[path = "common/proxy.rs"]
mod proxy;
#[path = "common/redis_cluster.rs"]
mod redis_cluster;
#[path = "common/test_db.rs"]
mod test_db;

use std::collections::{BTreeMap, HashMap};
use std::process::Command;
use std::time::Duration;

use common::{metric_value, token, with_database, Client, TempDir, TestServer, GUARD};
use redis_cluster::{
    classic_channels, first_seed, keys_by_primary, node_conn, primaries, seeds, shard_channels_on, slot_owners,
    unique_prefix, ClusterPrefix,
};
use serde_json::{json, Value};
use test_db::{postgres_addr, TestDb};

/// The shared cluster's seeds, and a key prefix of the test's own there
/// whose keys go when the test ends: how every test on it begins.
fn shared_cluster(test: &str) -> (String, ClusterPrefix) {
    let seeds = seeds();
    let prefix = ClusterPrefix::new(test, &seeds);
    (seeds, prefix)
}

/// A key of `room` on the cluster, `{prefix}:{tagged room}:{suffix}`: the
/// tagged room name carries the hash tag of the room's partition, which
/// decides the slot of every key of the room (and of its channel).
fn room_key(prefix: &str, room: &str, suffix: &str) -> String {
    format!("{prefix}:{}:{suffix}", tagged(room))
}

fn tagged(room: &str) -> String {
    chorus::bus::redis::cluster_room_tag(&chorus::room::RoomName::parse(room).unwrap())
}

/// The shard channel of `room`.
fn channel_of(prefix: &str, room: &str) -> String {
    format!("{prefix}:room:{}", tagged(room))
}

/// The slot of `key` (a key or a shard channel).
fn slot_of_key(seeds: &str, key: &str) -> u16 {
    redis::cmd("CLUSTER").arg("KEYSLOT").arg(key).query(&mut node_conn(&first_seed(seeds))).unwrap()
}

/// The primary that owns `slot` now.
fn owner_of_slot(seeds: &str, slot: u16) -> String {
    slot_owners(seeds).into_iter().find(|(a, b, _)| (*a..=*b).contains(&slot)).expect("slot served").2
}

/// The slot of `room`'s keys and channel.
fn slot_of(seeds: &str, prefix: &str, room: &str) -> u16 {
    slot_of_key(seeds, &room_key(prefix, room, "state"))
}

/// The primary that owns `room`'s slot now.
fn owner_of(seeds: &str, prefix: &str, room: &str) -> String {
    owner_of_slot(seeds, slot_of(seeds, prefix, room))
}

async fn node(seeds: &str, prefix: &str) -> TestServer {
    node_with(seeds, prefix, &[]).await
}

/// A node with more flags than `node` gives.
async fn node_with(seeds: &str, prefix: &str, extra: &[&str]) -> TestServer {
    let mut args = vec![
        "--redis-url",
        seeds,
        "--redis-cluster",
        "--redis-prefix",
        prefix,
        "--rate",
        "100000",
        "--burst",
        "100000",
    ];
    args.extend_from_slice(extra);
    TestServer::start(&args).await
}

async fn member(server: &TestServer, room: &str, sub: &str) -> Client {
    let mut client = Client::connect(server.addr, &format!("/ws/{room}"), &token(sub, None, 3600)).await;
    client.recv_type("joined").await;
    client
}

/// Room names until every primary owns at least `per_shard` of them.
fn rooms_on_every_shard(seeds: &str, prefix: &str, per_shard: usize) -> Vec<String> {
    let shards = primaries(seeds).len();
    let mut by_owner: HashMap<String, usize> = HashMap::new();
    let mut rooms = Vec::new();
    for i in 0.. {
        let room = format!("room-{i}");
        let owner = owner_of(seeds, prefix, &room);
        let count = by_owner.entry(owner).or_default();
        if *count < per_shard {
            *count += 1;
            rooms.push(room);
        }
        if by_owner.len() == shards && by_owner.values().all(|c| *c >= per_shard) {
            break;
        }
    }
    rooms
}

#[tokio::test]
async fn rooms_on_every_shard_reach_both_nodes_in_order_over_sharded_pubsub() {
    let (seeds, prefix) = shared_cluster("shards");
    let rooms = rooms_on_every_shard(&seeds, &prefix, 2);
    let (a, b) = (node(&seeds, &prefix).await, node(&seeds, &prefix).await);
    let mut members = Vec::new();
    for room in &rooms {
        members.push((room.clone(), member(&a, room, "ann").await, member(&b, room, "bob").await));
    }
    // Senders on both nodes, interleaved, without waiting for acks.
    const EACH: usize = 20;
    let mut send_a = Client::connect(a.addr, "/ws", &token("sa", None, 3600)).await;
    let mut send_b = Client::connect(b.addr, "/ws", &token("sb", None, 3600)).await;
    for i in 0..EACH {
        for room in &rooms {
            send_a.send_json(&json!({"type": "send", "room": room, "body": {"a": i}})).await;
            send_b.send_json(&json!({"type": "send", "room": room, "body": {"b": i}})).await;
        }
    }
    let expected: Vec<u64> = (1..=(2 * EACH) as u64).collect();
    for (room, on_a, on_b) in &mut members {
        assert_eq!(on_a.message_seqs(2 * EACH).await, expected, "room {room} on node a");
        assert_eq!(on_b.message_seqs(2 * EACH).await, expected, "room {room} on node b");
    }
    // Sharded: each room's channel has both nodes' subscriptions on the
    // shard that owns it, and classic pub/sub carries none of them.
    for (room, _, _) in &members {
        let owner = owner_of(&seeds, &prefix, room);
        let mut conn = node_conn(&owner);
        let channel = channel_of(&prefix, room);
        let counts: (String, i64) = redis::cmd("PUBSUB").arg("SHARDNUMSUB").arg(&channel).query(&mut conn).unwrap();
        assert_eq!(counts, (channel, 2), "room {room} on {owner}");
    }
    let classic = classic_channels(&seeds, &format!("{prefix}*"));
    assert!(classic.is_empty(), "classic channels: {classic:?}");
}

#[tokio::test]
async fn history_and_since_recovery_work_across_nodes_and_shards() {
    let (seeds, prefix) = shared_cluster("history");
    let (a, b) = (node(&seeds, &prefix).await, node(&seeds, &prefix).await);
    let mut sender = Client::connect(a.addr, "/ws", &token("sa", None, 3600)).await;
    for room in rooms_on_every_shard(&seeds, &prefix, 1) {
        for i in 1..=10u64 {
            assert_eq!(sender.publish(&room, json!(i)).await, i);
        }
        let mut late = Client::connect(b.addr, "/ws", &token("bob", None, 3600)).await;
        late.send_json(&json!({"type": "history", "room": room, "before": 9, "limit": 3})).await;
        let history = late.recv_type("history").await;
        let got: Vec<u64> =
            history["messages"].as_array().unwrap().iter().map(|m| m["seq"].as_u64().unwrap()).collect();
        assert_eq!(got, [6, 7, 8], "history of {room}");
        late.send_json(&json!({"type": "join", "room": room})).await;
        let joined = late.recv_type("joined").await;
        assert_eq!(joined["seq"], 10);
        late.send_json(&json!({"type": "leave", "room": room})).await;
        late.recv_type("left").await;
        let epoch = joined["epoch"].clone();
        late.send_json(&json!({"type": "join", "room": room, "since": 4, "epoch": epoch})).await;
        let replay = late.message_seqs(6).await;
        assert_eq!(replay, [5, 6, 7, 8, 9, 10], "replay of {room}");
        let joined = late.recv_type("joined").await;
        assert_eq!((joined["seq"].clone(), joined["recovered"].clone()), (json!(10), json!(true)));
        // Live messages follow the replay with no gap.
        assert_eq!(sender.publish(&room, json!(11)).await, 11);
        assert_eq!(late.message_seqs(1).await, [11]);
    }
}

#[tokio::test]
async fn an_unreachable_cluster_is_unready_and_sends_answer_unavailable() {
    // Nothing listens on port 1: the node starts, is not ready, refuses
    // sends with `unavailable`, and its connections go on working.
    let server = node("redis://127.0.0.1:1", &unique_prefix("down")).await;
    let response = reqwest::get(server.url("/readyz")).await.unwrap();
    assert_eq!(response.status().as_u16(), 503);
    assert!(response.text().await.unwrap().contains("redis"));
    let mut client = Client::connect(server.addr, "/ws", &token("ann", None, 3600)).await;
    client.send_json(&json!({"type": "send", "room": "lobby", "body": 1, "ref": "r1"})).await;
    client.recv_error("unavailable", Some("r1")).await;
    client.ping_pong().await;
    let response = reqwest::get(server.url("/healthz")).await.unwrap();
    assert_eq!(response.status().as_u16(), 200);
}

#[tokio::test]
async fn the_cluster_is_ready_when_every_shard_answers() {
    let (seeds, prefix) = shared_cluster("ready");
    let server = node(&seeds, &prefix).await;
    let deadline = tokio::time::Instant::now() + GUARD;
    loop {
        let response = reqwest::get(server.url("/readyz")).await.unwrap();
        if response.status().as_u16() == 200 {
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "never ready: {}", response.text().await.unwrap());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

// ---------------------------------------------------------------------------
// Failover, on a private cluster
// ---------------------------------------------------------------------------

/// A throwaway cluster of our own (scripts/redis-cluster), stopped when dropped.
struct PrivateCluster {
    dir: TempDir,
    seeds: String,
}

impl PrivateCluster {
    fn start() -> Self {
        let script = concat!(env!("CARGO_MANIFEST_DIR"), "/scripts/redis-cluster");
        for _ in 0..10 {
            // A base port of our own, below the ephemeral range; retried when taken.
            let base = 17200 + 10 * (rand::random::<u16>() % 50);
            let dir = TempDir::new("redis-cluster");
            let out = Command::new(script).arg("start").arg(dir.path()).arg(base.to_string()).output().unwrap();
            if out.status.success() {
                let seeds = String::from_utf8(out.stdout).unwrap().trim().to_owned();
                return Self { dir, seeds };
            }
            eprintln!("private cluster on {base}: {}", String::from_utf8_lossy(&out.stderr));
            let _ = Command::new(script).arg("stop").arg(dir.path()).status();
        }
        panic!("could not start a private redis cluster");
    }

    /// SIGKILLs the node listening on `addr`.
    fn kill(&self, addr: &str) {
        let port = addr.rsplit(':').next().unwrap();
        let pid = std::fs::read_to_string(self.dir.path().join(port).join("redis.pid")).unwrap();
        let pid: i32 = pid.trim().parse().unwrap();
        // SAFETY: kill(2) on a redis-server this test started.
        assert_eq!(unsafe { libc::kill(pid, libc::SIGKILL) }, 0);
    }
}

impl Drop for PrivateCluster {
    fn drop(&mut self) {
        let script = concat!(env!("CARGO_MANIFEST_DIR"), "/scripts/redis-cluster");
        let _ = Command::new(script).arg("stop").arg(self.dir.path()).status();
    }
}

/// Every frame a member received, split into epochs by `joined` frames:
/// each epoch's seqs must be 1-step increasing (no gap, no repeat).
fn check_gapless(name: &str, frames: &[Value]) -> BTreeMap<String, Vec<u64>> {
    let mut epochs: BTreeMap<String, Vec<u64>> = BTreeMap::new();
    let mut epoch = String::new();
    let mut last: Option<u64> = None;
    for frame in frames {
        match frame["type"].as_str() {
            Some("joined") => {
                epoch = frame["epoch"].as_str().unwrap().to_owned();
                last = Some(frame["seq"].as_u64().unwrap());
            }
            Some("message") => {
                let seq = frame["seq"].as_u64().unwrap();
                if let Some(last) = last {
                    assert_eq!(seq, last + 1, "{name}: gap or repeat in epoch {epoch}: {last} then {seq}");
                }
                last = Some(seq);
                epochs.entry(epoch.clone()).or_default().push(seq);
            }
            _ => {}
        }
    }
    epochs
}

#[tokio::test]
async fn a_primary_killed_under_load_loses_nothing_acked_within_an_epoch() {
    let cluster = PrivateCluster::start();
    let prefix = unique_prefix("failover");
    let room = "busy";
    let (a, b) = (node(&cluster.seeds, &prefix).await, node(&cluster.seeds, &prefix).await);
    let mut on_a = member(&a, room, "ann").await;
    let mut on_b = member(&b, room, "bob").await;
    let mut sender = Client::connect(a.addr, "/ws", &token("sa", None, 3600)).await;

    // Acked before, during and after the failover; a send may be refused
    // (`unavailable`) while no primary owns the slot.
    let mut acked: Vec<(u64, i64)> = Vec::new();
    let mut refused = 0;
    let victim = owner_of(&cluster.seeds, &prefix, room);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    let mut i = 0i64;
    let mut killed_at = None;
    let mut after_kill = 0;
    while after_kill < 50 {
        assert!(tokio::time::Instant::now() < deadline, "the room never recovered after the failover");
        i += 1;
        if i == 50 {
            cluster.kill(&victim);
            killed_at = Some(i);
        }
        let reference = format!("r{i}");
        sender.send_json(&json!({"type": "send", "room": room, "body": i, "ref": reference})).await;
        let reply = sender.recv_json().await;
        match reply["type"].as_str() {
            Some("ack") => {
                acked.push((reply["seq"].as_u64().unwrap(), i));
                if killed_at.is_some() {
                    after_kill += 1;
                }
            }
            Some("error") => {
                assert_eq!(reply["code"], "unavailable", "{reply}");
                refused += 1;
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            _ => panic!("unexpected {reply}"),
        }
    }
    assert!(owner_of(&cluster.seeds, &prefix, room) != victim, "a replica took over the slot");
    // The new epoch's keys expire too (section 12): the default --history-ttl.
    let (state, history) = pttls(&cluster.seeds, &prefix, room);
    assert!(state > 0 && history > 0, "PTTLs on the promoted replica: {state} {history}");
    // Read until every acked body arrived (a node resubscribes, and fills
    // the gap from history, once a second: on a busy machine that can come
    // well after the last ack), or until a deadline; then compare.
    let acked_bodies: std::collections::HashSet<i64> = acked.iter().map(|(_, body)| *body).collect();
    for (name, client) in [("ann", &mut on_a), ("bob", &mut on_b)] {
        let mut frames = Vec::new();
        let mut seen = std::collections::HashSet::new();
        let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
        while !acked_bodies.is_subset(&seen) {
            let Ok(Some(Ok(message))) = tokio::time::timeout_at(deadline, client.next()).await else {
                break;
            };
            if let tokio_tungstenite::tungstenite::Message::Text(text) = message {
                let frame = serde_json::from_str::<Value>(&text).unwrap();
                if frame["type"] == "message" {
                    seen.insert(frame["body"].as_i64().unwrap());
                }
                frames.push(frame);
            }
        }
        // Anything a moment later (a duplicate would show here).
        while let Ok(Some(Ok(message))) = tokio::time::timeout(Duration::from_millis(300), client.next()).await {
            if let tokio_tungstenite::tungstenite::Message::Text(text) = message {
                frames.push(serde_json::from_str::<Value>(&text).unwrap());
            }
        }
        let epochs = check_gapless(name, &frames);
        eprintln!("{name}: {refused} sends refused; seqs by epoch: {epochs:?}");
        // The promoted replica could not prove it had every acked message:
        // the room went on in a new epoch, announced by an unsolicited `joined`.
        assert_eq!(epochs.len(), 2, "{name}: {epochs:?}");
        // Every acked body reached the member, before and after the failover.
        let bodies: Vec<i64> =
            frames.iter().filter(|f| f["type"] == "message").map(|f| f["body"].as_i64().unwrap()).collect();
        for (_, body) in &acked {
            assert!(bodies.contains(body), "{name} missed acked body {body} ({refused} refused, epochs {epochs:?})");
        }
    }
}

// ---------------------------------------------------------------------------
// Slot migration, on a private cluster
// ---------------------------------------------------------------------------

/// `CLUSTER MYID` of the node at `addr`.
fn node_id(addr: &str) -> String {
    redis::cmd("CLUSTER").arg("MYID").query(&mut node_conn(addr)).unwrap()
}

/// Moves `slot` from `from` to `to` as `redis-cli --cluster reshard` does:
/// IMPORTING/MIGRATING, MIGRATE every key, then SETSLOT NODE everywhere.
fn migrate_slot(seeds: &str, slot: u16, from: &str, to: &str) {
    let (from_id, to_id) = (node_id(from), node_id(to));
    let (mut src, mut dst) = (node_conn(from), node_conn(to));
    let _: () = redis::cmd("CLUSTER").arg("SETSLOT").arg(slot).arg("IMPORTING").arg(&from_id).query(&mut dst).unwrap();
    let _: () = redis::cmd("CLUSTER").arg("SETSLOT").arg(slot).arg("MIGRATING").arg(&to_id).query(&mut src).unwrap();
    let (host, port) = to.rsplit_once(':').unwrap();
    loop {
        let keys: Vec<String> = redis::cmd("CLUSTER").arg("GETKEYSINSLOT").arg(slot).arg(100).query(&mut src).unwrap();
        if keys.is_empty() {
            break;
        }
        let _: () = redis::cmd("MIGRATE")
            .arg(host)
            .arg(port)
            .arg("")
            .arg(0)
            .arg(5000)
            .arg("KEYS")
            .arg(keys)
            .query(&mut src)
            .unwrap();
    }
    for addr in [to.to_owned(), from.to_owned()].into_iter().chain(primaries(seeds)) {
        let _: () = redis::cmd("CLUSTER")
            .arg("SETSLOT")
            .arg(slot)
            .arg("NODE")
            .arg(&to_id)
            .query(&mut node_conn(&addr))
            .unwrap();
    }
}

#[tokio::test]
async fn a_busy_rooms_slot_migrated_to_another_shard_keeps_its_epoch_and_loses_nothing() {
    let cluster = PrivateCluster::start();
    let prefix = unique_prefix("reshard");
    let room = "moving";
    let (a, b) = (node(&cluster.seeds, &prefix).await, node(&cluster.seeds, &prefix).await);
    let mut on_a = member(&a, room, "ann").await;
    let mut on_b = member(&b, room, "bob").await;
    let mut sender = Client::connect(a.addr, "/ws", &token("sa", None, 3600)).await;
    let from = owner_of(&cluster.seeds, &prefix, room);
    let to = primaries(&cluster.seeds).into_iter().find(|o| *o != from).unwrap();
    let slot = slot_of(&cluster.seeds, &prefix, room);

    let mut acked = Vec::new();
    for i in 1..=120i64 {
        if i == 40 {
            let (seeds, from, to) = (cluster.seeds.clone(), from.clone(), to.clone());
            // Migrates while sends go on: some land before, some during, some after.
            tokio::task::spawn_blocking(move || migrate_slot(&seeds, slot, &from, &to));
        }
        let reference = format!("r{i}");
        sender.send_json(&json!({"type": "send", "room": room, "body": i, "ref": reference})).await;
        let reply = sender.recv_json().await;
        // While the room's keys are split between the two shards (a script
        // call then gets TRYAGAIN), a send may be refused; nothing half-done.
        if reply["type"] == "error" {
            assert_eq!(reply["code"], "unavailable", "{reply}");
            continue;
        }
        assert_eq!(reply["type"], "ack", "{reply}");
        acked.push(i);
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    assert_eq!(owner_of(&cluster.seeds, &prefix, room), to, "the slot moved");
    let (state, history) = pttls(&cluster.seeds, &prefix, room);
    assert!(state > 0 && history > 0, "the keys kept their TTL on the new owner: {state} {history}");
    tokio::time::sleep(Duration::from_millis(500)).await;
    for (name, client) in [("ann", &mut on_a), ("bob", &mut on_b)] {
        let mut frames = Vec::new();
        while let Ok(Some(Ok(message))) = tokio::time::timeout(Duration::from_millis(300), client.next()).await {
            if let tokio_tungstenite::tungstenite::Message::Text(text) = message {
                frames.push(serde_json::from_str::<Value>(&text).unwrap());
            }
        }
        let epochs = check_gapless(name, &frames);
        assert_eq!(epochs.len(), 1, "{name}: a migration keeps the epoch: {epochs:?}");
        let bodies: Vec<i64> =
            frames.iter().filter(|f| f["type"] == "message").map(|f| f["body"].as_i64().unwrap()).collect();
        assert_eq!(bodies, acked, "{name} got every acked message once, in order");
    }
    // Both nodes now subscribe on the new owner.
    let channel = channel_of(&prefix, room);
    let counts: (String, i64) =
        redis::cmd("PUBSUB").arg("SHARDNUMSUB").arg(&channel).query(&mut node_conn(&to)).unwrap();
    assert_eq!(counts, (channel, 2));
}

#[tokio::test]
async fn three_nodes_share_rooms_on_every_shard_gaplessly() {
    let (seeds, prefix) = shared_cluster("three");
    let rooms = rooms_on_every_shard(&seeds, &prefix, 1);
    let nodes = [node(&seeds, &prefix).await, node(&seeds, &prefix).await, node(&seeds, &prefix).await];
    let mut members = Vec::new();
    for room in &rooms {
        for (n, server) in nodes.iter().enumerate() {
            members.push((format!("{room} on node {n}"), member(server, room, &format!("m{n}")).await));
        }
    }
    const EACH: usize = 10;
    let mut senders = Vec::new();
    for (n, server) in nodes.iter().enumerate() {
        senders.push(Client::connect(server.addr, "/ws", &token(&format!("s{n}"), None, 3600)).await);
    }
    for i in 0..EACH {
        for room in &rooms {
            for sender in &mut senders {
                sender.send_json(&json!({"type": "send", "room": room, "body": i})).await;
            }
        }
    }
    let expected: Vec<u64> = (1..=(3 * EACH) as u64).collect();
    for (name, client) in &mut members {
        assert_eq!(client.message_seqs(3 * EACH).await, expected, "{name}");
    }
}

/// Moves the slot of `key` (a key or a shard channel) to another primary;
/// returns where it went.
async fn move_slot_of(seeds: &str, key: &str) -> String {
    let slot = slot_of_key(seeds, key);
    let from = owner_of_slot(seeds, slot);
    let to = primaries(seeds).into_iter().find(|o| *o != from).unwrap();
    let (seeds, moved_to) = (seeds.to_owned(), to.clone());
    tokio::task::spawn_blocking(move || migrate_slot(&seeds, slot, &from, &to)).await.unwrap();
    moved_to
}

/// Presence and the admin API keep working when the slots of their shard
/// channels move to another primary: Redis ends the subscriptions, and the
/// nodes subscribe again on the new owner (and read again what they may
/// have missed).
#[tokio::test]
async fn presence_and_bans_follow_their_channels_to_another_shard() {
    let cluster = PrivateCluster::start();
    let prefix = unique_prefix("follow");
    let room = "moving";
    let admin = ["--admin-listen", "127.0.0.1:0"];
    let (a, b) = (node_with(&cluster.seeds, &prefix, &admin).await, node_with(&cluster.seeds, &prefix, &admin).await);
    let mut alice = Client::connect(a.addr, "/ws", &token("alice", None, 3600)).await;
    alice.send_json(&json!({"type": "join", "room": room, "presence": true})).await;
    alice.recv_type("joined").await;
    assert_eq!(alice.recv_type("presence_state").await["count"], 1);

    // A subscribes to the room's presence channel; its slot moves away.
    let pattern = format!("{prefix}:presence:*");
    let deadline = tokio::time::Instant::now() + GUARD;
    let channel = loop {
        let found = shard_channels_on(&cluster.seeds, &pattern);
        if let [(channel, 1, _)] = found.as_slice() {
            break channel.clone();
        }
        assert!(tokio::time::Instant::now() < deadline, "A never subscribed: {found:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let to = move_slot_of(&cluster.seeds, &channel).await;
    // bob joins on B: his presence is written on the new owner and alice hears of him.
    let mut bob = Client::connect(b.addr, "/ws", &token("bob", None, 3600)).await;
    bob.join(room).await;
    let diff = alice.recv_type("presence_diff").await;
    assert_eq!(diff, json!({"type":"presence_diff","room":room,"joins":["bob"],"leaves":[],"count":2}));
    let found = shard_channels_on(&cluster.seeds, &pattern);
    assert_eq!(found, [(channel, 1, to)], "A follows the channel to the new owner");

    // The admin channel's slot moves too; a ban on A still closes carol's
    // connection on B within a second and is refused there.
    move_slot_of(&cluster.seeds, &format!("{prefix}:admin")).await;
    let mut carol = Client::connect(b.addr, "/ws", &token("carol", None, 3600)).await;
    carol.ping_pong().await;
    let deadline = tokio::time::Instant::now() + GUARD;
    loop {
        let subscribed = shard_channels_on(&cluster.seeds, &format!("{prefix}:admin"));
        if subscribed.iter().any(|(_, count, _)| *count == 2) {
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "the nodes never subscribed again: {subscribed:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let url = format!("http://{}/admin/users/carol/disconnect?ban=1m", a.admin.unwrap());
    let response = reqwest::Client::new().post(url).send().await.unwrap();
    assert_eq!(response.status().as_u16(), 200);
    let asked = tokio::time::Instant::now();
    assert_eq!(carol.recv_close().await.0, 4001);
    assert!(asked.elapsed() < Duration::from_secs(1), "closed after {:?}", asked.elapsed());
    let request = common::with_bearer(common::ws_request(b.addr, "/ws"), &token("carol", None, 3600));
    assert_eq!(common::refused_status(b.addr, request).await, 401);
}

/// A seed that answers (the first one may be a node the test killed).
fn live_seed(seeds: &str) -> String {
    let answers = |seed: &&str| {
        let client = redis::Client::open(*seed).ok();
        client.and_then(|c| c.get_connection_with_timeout(Duration::from_millis(500)).ok()).is_some()
    };
    seeds.split(',').map(str::trim).find(answers).expect("a seed answers").to_owned()
}

/// The primary that owns the slot of `key` (a key or a shard channel) now.
fn owner_of_key(seeds: &str, key: &str) -> String {
    let seeds = live_seed(seeds);
    owner_of_slot(&seeds, slot_of_key(&seeds, key))
}

/// The primary that owns both the admin channel and a room's presence
/// channel is SIGKILLed: once its replica is promoted, the nodes subscribe
/// there again, a join on one node reaches a presence subscriber on the
/// other, and a ban on one node closes the user's connection on the other.
#[tokio::test]
async fn presence_and_bans_survive_a_failover_of_their_shard() {
    let cluster = PrivateCluster::start();
    let prefix = unique_prefix("failover-side");
    let extra = ["--admin-listen", "127.0.0.1:0", "--presence-ttl", "2s"];
    let (a, b) = (node_with(&cluster.seeds, &prefix, &extra).await, node_with(&cluster.seeds, &prefix, &extra).await);
    let admin_channel = format!("{prefix}:admin");
    let victim = owner_of_key(&cluster.seeds, &admin_channel);
    // A presence subscriber on A in a room whose presence channel the
    // victim owns too (found by trying rooms: the tag is the bus's business).
    let mut alice = Client::connect(a.addr, "/ws", &token("alice", None, 3600)).await;
    let pattern = format!("{prefix}:presence:*");
    let mut room = None;
    let mut known: Vec<String> = Vec::new();
    for i in 0..64 {
        let name = format!("side-{i}");
        alice.send_json(&json!({"type": "join", "room": name, "presence": true})).await;
        alice.recv_type("joined").await;
        alice.recv_type("presence_state").await;
        // A new channel, or none if the room shares one already followed
        // (and so already found elsewhere than on the victim).
        let deadline = tokio::time::Instant::now() + Duration::from_secs(1);
        let new = loop {
            let found = shard_channels_on(&cluster.seeds, &pattern);
            if let Some((channel, _, _)) = found.into_iter().find(|(c, _, _)| !known.contains(c)) {
                break Some(channel);
            }
            if tokio::time::Instant::now() > deadline {
                break None;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        };
        let Some(channel) = new else { continue };
        known.push(channel.clone());
        if owner_of_key(&cluster.seeds, &channel) == victim {
            room = Some((name, channel));
            break;
        }
    }
    let (room, channel) = room.expect("a room whose presence lives on the victim");
    let mut carol = Client::connect(b.addr, "/ws", &token("carol", None, 3600)).await;
    carol.ping_pong().await;

    cluster.kill(&victim);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while owner_of_key(&cluster.seeds, &admin_channel) == victim {
        assert!(tokio::time::Instant::now() < deadline, "no replica took over");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let promoted = owner_of_key(&cluster.seeds, &admin_channel);
    // Both nodes subscribe to the admin channel again, A to the room's
    // presence channel, on the promoted replica.
    let deadline = tokio::time::Instant::now() + GUARD;
    loop {
        let mut conn = node_conn(&promoted);
        let counts: Vec<(String, i64)> = [&admin_channel, &channel]
            .into_iter()
            .map(|c| redis::cmd("PUBSUB").arg("SHARDNUMSUB").arg(c).query::<(String, i64)>(&mut conn).unwrap())
            .collect();
        if counts[0].1 == 2 && counts[1].1 == 1 {
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "not subscribed again on {promoted}: {counts:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let mut bob = Client::connect(b.addr, "/ws", &token("bob", None, 3600)).await;
    bob.join(&room).await;
    let diff = alice.recv_type("presence_diff").await;
    assert_eq!(diff, json!({"type":"presence_diff","room":room,"joins":["bob"],"leaves":[],"count":2}));

    let url = format!("http://{}/admin/users/carol/disconnect?ban=1m", a.admin.unwrap());
    let response = reqwest::Client::new().post(url).send().await.unwrap();
    assert_eq!(response.status().as_u16(), 200);
    let asked = tokio::time::Instant::now();
    assert_eq!(carol.recv_close().await.0, 4001);
    assert!(asked.elapsed() < Duration::from_secs(1), "closed after {:?}", asked.elapsed());
}

// ---------------------------------------------------------------------------
// Bounded memory (PROTOCOL.md section 12): room keys expire on the cluster
// ---------------------------------------------------------------------------

/// The PTTL of `room`'s state and history keys, asked of the primary that
/// owns the room's slot (-2: no such key, -1: no expiry).
fn pttls(seeds: &str, prefix: &str, room: &str) -> (i64, i64) {
    let mut conn = node_conn(&owner_of(seeds, prefix, room));
    let mut pttl = |key: String| -> i64 { redis::cmd("PTTL").arg(key).query(&mut conn).unwrap() };
    (pttl(room_key(prefix, room, "state")), pttl(room_key(prefix, room, "history")))
}

/// Waits until `room`'s state key is gone from its shard.
async fn until_expired(seeds: &str, prefix: &str, room: &str) {
    let deadline = tokio::time::Instant::now() + GUARD;
    while pttls(seeds, prefix, room).0 != -2 {
        assert!(tokio::time::Instant::now() < deadline, "the keys of {room} never expired");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test]
async fn room_keys_on_every_shard_carry_the_history_ttl_and_publishes_and_joins_renew_it() {
    let (seeds, prefix) = shared_cluster("ttl");
    let rooms = rooms_on_every_shard(&seeds, &prefix, 1);
    let server = node_with(&seeds, &prefix, &["--history-ttl", "5s"]).await;
    let mut writer = Client::connect(server.addr, "/ws", &token("writer", None, 3600)).await;
    for room in &rooms {
        writer.publish(room, json!(1)).await;
        let (state, history) = pttls(&seeds, &prefix, room);
        assert!((1..=5000).contains(&state) && (1..=5000).contains(&history), "{room}: PTTLs {state} {history}");
    }
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let mut reader = Client::connect(server.addr, "/ws", &token("reader", None, 3600)).await;
    for (i, room) in rooms.iter().enumerate() {
        let (aged, _) = pttls(&seeds, &prefix, room);
        assert!((1..=3600).contains(&aged), "{room}: the TTL runs down: {aged}");
        // Every other room is renewed by a publish, the rest by a join.
        if i % 2 == 0 {
            assert_eq!(writer.publish(room, json!(2)).await, 2);
        } else {
            assert_eq!(reader.join(room).await["seq"], 1);
        }
        let (state, history) = pttls(&seeds, &prefix, room);
        assert!(state > aged && history > aged, "{room}: renewed: {state} {history} after {aged}");
    }
}

#[tokio::test]
async fn without_a_ttl_room_keys_on_the_cluster_do_not_expire() {
    let (seeds, prefix) = shared_cluster("nottl");
    let server = node_with(&seeds, &prefix, &["--history-ttl", "0s"]).await;
    let mut writer = Client::connect(server.addr, "/ws", &token("writer", None, 3600)).await;
    for room in rooms_on_every_shard(&seeds, &prefix, 1) {
        writer.publish(&room, json!(1)).await;
        assert_eq!(pttls(&seeds, &prefix, &room), (-1, -1), "{room}");
    }
}

/// Rooms with a member on a node outlive the TTL on every shard however
/// quiet they are (the node renews them, one command per key); an unused
/// room expires, and a member coming back with its old `since`, on the
/// other node, finds a new epoch and `recovered: false`.
#[tokio::test]
async fn on_the_cluster_rooms_with_members_stay_and_unused_rooms_expire_into_a_new_epoch() {
    let (seeds, prefix) = shared_cluster("expire");
    let busy = rooms_on_every_shard(&seeds, &prefix, 1);
    let a = node_with(&seeds, &prefix, &["--history-ttl", "1s"]).await;
    let b = node_with(&seeds, &prefix, &["--history-ttl", "1s"]).await;
    let mut writer = Client::connect(a.addr, "/ws", &token("writer", None, 3600)).await;
    let mut members = Vec::new();
    for room in &busy {
        let mut on_b = member(&b, room, "member").await;
        assert_eq!(writer.publish(room, json!(1)).await, 1);
        assert_eq!(on_b.recv_type("message").await["seq"], 1);
        members.push(on_b);
    }
    let quiet = "quiet";
    let mut returning = Client::connect(a.addr, "/ws", &token("returning", None, 3600)).await;
    let epoch = returning.join(quiet).await["epoch"].as_str().unwrap().to_owned();
    assert_eq!(writer.publish(quiet, json!(1)).await, 1);
    assert_eq!(returning.recv_type("message").await["seq"], 1);
    returning.send_json(&json!({"type": "leave", "room": quiet})).await;
    returning.recv_type("left").await;

    until_expired(&seeds, &prefix, quiet).await;
    // Two TTLs have passed since the busy rooms last saw a publish or join.
    tokio::time::sleep(Duration::from_millis(1200)).await;
    for (room, on_b) in busy.iter().zip(&mut members) {
        let (state, _) = pttls(&seeds, &prefix, room);
        assert!(state > 0, "{room} with a member was kept: {state}");
        assert_eq!(writer.publish(room, json!(2)).await, 2, "{room} goes on in its epoch");
        assert_eq!(on_b.recv_type("message").await["seq"], 2);
    }

    let mut back = Client::connect(b.addr, "/ws", &token("returning", None, 3600)).await;
    back.send_json(&json!({"type": "join", "room": quiet, "since": 1, "epoch": epoch})).await;
    let joined = back.recv_type("joined").await;
    assert_ne!(joined["epoch"], epoch.as_str(), "{joined}");
    assert_eq!((joined["seq"].clone(), joined["recovered"].clone()), (json!(0), json!(false)));
    assert_eq!(writer.publish(quiet, json!("again")).await, 1);
    assert_eq!(back.recv_type("message").await["seq"], 1);
    // And the node that served the old epoch sees the new one too.
    returning.send_json(&json!({"type": "join", "room": quiet, "since": 1, "epoch": epoch})).await;
    let joined = returning.recv_type("joined").await;
    assert_ne!(joined["epoch"], epoch.as_str(), "{joined}");
    assert_eq!(joined["recovered"], false, "{joined}");
}

/// The keys under `prefix` on every primary, each with its PTTL.
fn keys_and_pttls(seeds: &str, prefix: &str) -> Vec<(String, i64)> {
    let mut found = Vec::new();
    for (addr, keys) in keys_by_primary(seeds, &format!("{prefix}:*")) {
        let mut conn = node_conn(&addr);
        for key in keys {
            let pttl: i64 = redis::cmd("PTTL").arg(&key).query(&mut conn).unwrap();
            found.push((key, pttl));
        }
    }
    found
}

/// One connection sends to a thousand new rooms over every shard: the node
/// holds nothing for them (no members), every key they leave on the cluster
/// carries the TTL, and one TTL later only the keys of the room with a
/// member are left; the flooding connection works throughout.
#[tokio::test]
async fn a_flood_of_new_rooms_leaves_nothing_on_the_cluster_after_a_ttl() {
    let (seeds, prefix) = shared_cluster("flood");
    let server = node_with(&seeds, &prefix, &["--history-ttl", "2s"]).await;
    let mut keeper = member(&server, "kept", "keeper").await;
    let mut flooder = Client::connect(server.addr, "/ws", &token("flooder", None, 3600)).await;
    const ROOMS: usize = 1000;
    const WINDOW: usize = 200;
    for chunk in 0..ROOMS / WINDOW {
        for i in chunk * WINDOW..(chunk + 1) * WINDOW {
            flooder.send_json(&json!({"type": "send", "room": format!("flood-{i}"), "body": "x", "ref": "f"})).await;
        }
        for _ in 0..WINDOW {
            flooder.recv_type("ack").await;
        }
        let last = format!("flood-{}", (chunk + 1) * WINDOW - 1);
        let (state, history) = pttls(&seeds, &prefix, &last);
        assert!((1..=2000).contains(&state) && (1..=2000).contains(&history), "{last}: PTTLs {state} {history}");
    }
    assert_eq!(flooder.publish("kept", json!("after")).await, 1);
    assert_eq!(keeper.recv_type("message").await["seq"], 1);

    // The room with a member is present (section 8): its presence keys
    // expire by --presence-ttl (half of the default 30 s), renewed by the
    // node while the member stays; the flooded rooms have none.
    let (presence, keys): (Vec<_>, Vec<_>) =
        keys_and_pttls(&seeds, &prefix).into_iter().partition(|(k, _)| k.contains(":presence"));
    assert!(!presence.is_empty(), "the member's presence is on the cluster");
    for (key, pttl) in &presence {
        assert!(key.contains("kept") && (1..=15_000).contains(pttl), "{key}: PTTL {pttl}");
    }
    // Rooms flooded more than a TTL ago may be gone already.
    let rooms = keys.iter().filter(|(k, _)| k.ends_with(":state")).count();
    assert!(rooms > WINDOW, "{rooms} room states on the cluster");
    let lasting: Vec<_> = keys.iter().filter(|(_, pttl)| !(1..=2000).contains(pttl)).collect();
    assert!(lasting.is_empty(), "keys without the TTL: {lasting:?}");
    let text = server.metrics().await;
    let held = metric_value(&text, "chorus_history_bytes").unwrap();
    assert!(held < (8 << 10) as f64, "the node holds {held} bytes for rooms it has no member in");

    let deadline = tokio::time::Instant::now() + GUARD;
    loop {
        let mut left: Vec<String> =
            keys_and_pttls(&seeds, &prefix).into_iter().map(|(k, _)| k).filter(|k| !k.contains(":presence")).collect();
        left.sort();
        if left == [room_key(&prefix, "kept", "history"), room_key(&prefix, "kept", "state")] {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{} keys never expired: {:?}",
            left.len(),
            &left[..5.min(left.len())]
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    flooder.ping_pong().await;
    assert_eq!(flooder.publish("kept", json!("still")).await, 2, "the room with a member went on");
    assert_eq!(keeper.recv_type("message").await["seq"], 2);
    assert_eq!(flooder.publish("flood-0", json!("again")).await, 1, "an expired room starts again");
}

/// `--max-rooms-per-connection` on a cluster: a join past it gets
/// `too_many_rooms`, and the connection keeps its rooms on their shards.
#[tokio::test]
async fn on_the_cluster_a_join_past_the_limit_gets_too_many_rooms_and_keeps_the_rooms() {
    let (seeds, prefix) = shared_cluster("cap");
    let rooms = rooms_on_every_shard(&seeds, &prefix, 1);
    let limit = rooms.len().to_string();
    let server = node_with(&seeds, &prefix, &["--max-rooms-per-connection", &limit]).await;
    let mut joined = member(&server, &rooms[0], "member").await;
    for room in &rooms[1..] {
        joined.join(room).await;
    }
    joined.send_json(&json!({"type": "join", "room": "one-too-many", "ref": "j"})).await;
    joined.recv_error("too_many_rooms", Some("j")).await;
    joined.ping_pong().await;
    let mut writer = Client::connect(server.addr, "/ws", &token("writer", None, 3600)).await;
    for room in &rooms {
        writer.publish(room, json!(room)).await;
        let message = joined.recv_type("message").await;
        assert_eq!(message["room"], room.as_str());
    }
}

// ---------------------------------------------------------------------------
// Durable history (PostgreSQL) on the cluster: a persist stream per partition
// ---------------------------------------------------------------------------

/// A node with durable history in `database`.
async fn durable_node(seeds: &str, prefix: &str, database: &str, extra: &[&str]) -> TestServer {
    let mut args = vec!["--database-url", database];
    args.extend_from_slice(extra);
    node_with(seeds, prefix, &args).await
}

/// The persist stream of `room`'s partition: in the room's slot.
fn stream_of(prefix: &str, room: &str) -> String {
    let tagged = tagged(room);
    let (tag, _) = tagged.split_once('}').unwrap();
    format!("{prefix}:{tag}}}:persist")
}

#[tokio::test]
async fn history_of_rooms_on_every_shard_is_written_to_the_database_by_both_nodes() {
    let (seeds, prefix) = shared_cluster("pg");
    let db = TestDb::create("cluster").await;
    let rooms = rooms_on_every_shard(&seeds, &prefix, 2);
    // Redis keeps 5 messages a room: the rest of history comes from the database.
    let small = ["--history-size", "5"];
    let (a, b) =
        (durable_node(&seeds, &prefix, &db.url, &small).await, durable_node(&seeds, &prefix, &db.url, &small).await);
    let mut send_a = Client::connect(a.addr, "/ws", &token("sa", None, 3600)).await;
    let mut send_b = Client::connect(b.addr, "/ws", &token("sb", None, 3600)).await;
    for i in 0..10 {
        for room in &rooms {
            send_a.publish(room, json!({"a": i})).await;
            send_b.publish(room, json!({"b": i})).await;
        }
    }
    let all: Vec<u64> = (1..=20).collect();
    for room in &rooms {
        let stored = db.wait_for(room, &all).await;
        assert_eq!(stored.into_iter().collect::<Vec<_>>(), all, "{room} in the database");
        let mut reader = Client::connect(b.addr, "/ws", &token("reader", None, 3600)).await;
        reader.send_json(&json!({"type": "history", "room": room, "limit": 50})).await;
        let history = reader.recv_type("history").await;
        let got: Vec<u64> =
            history["messages"].as_array().unwrap().iter().map(|m| m["seq"].as_u64().unwrap()).collect();
        assert_eq!(got, all, "history of {room} reaches into the database");
        // The room's messages were queued on its partition's stream, in its slot.
        let owner = owner_of(&seeds, &prefix, room);
        let kind: String = redis::cmd("TYPE").arg(stream_of(&prefix, room)).query(&mut node_conn(&owner)).unwrap();
        assert_eq!(kind, "stream", "the persist stream of {room} on {owner}");
    }
    drop((a, b));
    db.drop().await;
}

#[tokio::test]
async fn a_node_killed_right_after_its_acks_still_gets_its_messages_into_the_database() {
    let (seeds, prefix) = shared_cluster("pgkill");
    let db = TestDb::create("cluster").await;
    let rooms = rooms_on_every_shard(&seeds, &prefix, 1);
    // The doomed node reaches the database through a proxy that is then cut,
    // so it dies holding messages it read from the streams but never wrote.
    let proxy = proxy::Proxy::start(postgres_addr()).await;
    let proxied = with_database(&format!("postgres://postgres@{}/x", proxy.addr), &db.name);
    let mut doomed = durable_node(&seeds, &prefix, &proxied, &[]).await;
    let mut sender = Client::connect(doomed.addr, "/ws", &token("sa", None, 3600)).await;
    let mut acked: HashMap<String, Vec<u64>> = HashMap::new();
    // A room's first message needs the database (where does its seq stand?).
    for room in &rooms {
        acked.entry(room.clone()).or_default().push(sender.publish(room, json!(0)).await);
        db.wait_for(room, &[1]).await;
    }
    proxy.cut();
    for i in 1..=50 {
        for room in &rooms {
            acked.entry(room.clone()).or_default().push(sender.publish(room, json!(i)).await);
        }
    }
    doomed.signal(libc::SIGKILL);
    doomed.wait_exit().await;
    for room in &rooms {
        assert_eq!(db.seqs(room).await, vec![1], "the doomed node could not write {room} after the cut");
    }
    // Another node claims what the dead node had read and writes it.
    let survivor = durable_node(&seeds, &prefix, &db.url, &[]).await;
    for room in &rooms {
        let stored = db.wait_for(room, &acked[room]).await;
        let missing: Vec<_> = acked[room].iter().filter(|s| !stored.contains(s)).collect();
        assert!(missing.is_empty(), "{room}: acked but never stored: {missing:?}");
    }
    drop(survivor);
    db.drop().await;
}

#[tokio::test]
async fn with_durable_acks_on_the_cluster_an_ack_means_the_database_holds_it() {
    let (seeds, prefix) = shared_cluster("dacks");
    let db = TestDb::create("cluster").await;
    let rooms = rooms_on_every_shard(&seeds, &prefix, 1);
    let durable = ["--durable-acks"];
    let (a, b) = (
        durable_node(&seeds, &prefix, &db.url, &durable).await,
        durable_node(&seeds, &prefix, &db.url, &durable).await,
    );
    let mut members = Vec::new();
    for room in &rooms {
        members.push((room.clone(), member(&a, room, "ann").await, member(&b, room, "bob").await));
    }
    let mut send_a = Client::connect(a.addr, "/ws", &token("sa", None, 3600)).await;
    let mut send_b = Client::connect(b.addr, "/ws", &token("sb", None, 3600)).await;
    let mut acked: HashMap<String, Vec<u64>> = HashMap::new();
    for i in 0..10 {
        for room in &rooms {
            let seqs = acked.entry(room.clone()).or_default();
            seqs.push(send_a.publish(room, json!({"a": i})).await);
            seqs.push(send_b.publish(room, json!({"b": i})).await);
        }
    }
    let all: Vec<u64> = (1..=20).collect();
    for (room, on_a, on_b) in &mut members {
        // No waiting: an ack is only sent once the row is committed.
        let stored = db.seqs(room).await;
        assert_eq!(stored, all, "{room}: acked before the database held it");
        let mut seqs = acked[room.as_str()].clone();
        seqs.sort_unstable();
        assert_eq!(seqs, all, "{room}: acked seqs");
        assert_eq!(on_a.message_seqs(20).await, all, "room {room} on node a");
        assert_eq!(on_b.message_seqs(20).await, all, "room {room} on node b");
    }
    drop((a, b));
    db.drop().await;
}

/// Publishes to `room` until the connection ends; returns the acked seqs.
async fn publish_until_closed(mut client: Client, room: String) -> Vec<u64> {
    let mut acked = Vec::new();
    for i in 0.. {
        let send = json!({"type": "send", "room": room, "body": i, "ref": i.to_string()}).to_string();
        if futures_util::SinkExt::send(&mut client.ws, tokio_tungstenite::tungstenite::Message::text(send))
            .await
            .is_err()
        {
            break;
        }
        match tokio::time::timeout(GUARD, client.next()).await {
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

#[tokio::test]
async fn with_durable_acks_on_the_cluster_a_sigkilled_writer_loses_nothing_acked_or_delivered() {
    let (seeds, prefix) = shared_cluster("dkill");
    let db = TestDb::create("cluster").await;
    let rooms = rooms_on_every_shard(&seeds, &prefix, 1);
    let durable = ["--durable-acks"];
    // The first node takes the partitions' writer leases; it is the one killed.
    let mut doomed = durable_node(&seeds, &prefix, &db.url, &durable).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let survivor = durable_node(&seeds, &prefix, &db.url, &durable).await;
    let mut members = Vec::new();
    for room in &rooms {
        let client = member(&survivor, room, "member").await;
        members.push((room.clone(), client));
    }
    let mut senders = Vec::new();
    for room in &rooms {
        let client = Client::connect(doomed.addr, "/ws", &token("writer", None, 3600)).await;
        senders.push((room.clone(), tokio::spawn(publish_until_closed(client, room.clone()))));
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    doomed.signal(libc::SIGKILL);
    doomed.wait_exit().await;
    let mut sender = Client::connect(survivor.addr, "/ws", &token("after", None, 3600)).await;
    for ((room, publisher), (_, on_survivor)) in senders.into_iter().zip(&mut members) {
        let acked = publisher.await.unwrap();
        assert!(!acked.is_empty(), "{room}: nothing acked before the kill");
        // The survivor takes the leases over and goes on in the same epoch.
        let next = sender.publish(&room, json!("after")).await;
        let seen = acked.iter().max().copied().unwrap_or(0);
        assert!(next > seen, "{room}: seq {next} given again (acked up to {seen})");
        let mut delivered = Vec::new();
        while delivered.last() != Some(&next) {
            let frame = on_survivor.recv_json().await;
            assert_ne!(frame["type"], "joined", "{room}: durable acks keep the epoch: {frame}");
            if frame["type"] == "message" {
                delivered.push(frame["seq"].as_u64().unwrap());
            }
        }
        let stored = db.wait_for(&room, &acked).await;
        for seq in acked.iter().chain(&delivered) {
            assert!(stored.contains(seq), "{room}: seq {seq} was acked or delivered but is not stored");
        }
    }
    drop(survivor);
    db.drop().await;
}

/// Waits until the replicas of the primary at `addr` are in sync with it.
async fn until_replicated(addr: &str) {
    let deadline = tokio::time::Instant::now() + GUARD;
    loop {
        let lines: Vec<String> =
            redis::cmd("CLUSTER").arg("REPLICAS").arg(node_id(addr)).query(&mut node_conn(addr)).unwrap();
        let replicas: Vec<String> =
            lines.iter().filter_map(|line| line.split(' ').nth(1)?.split('@').next().map(str::to_owned)).collect();
        let synced = replicas.iter().all(|replica| {
            let info: String = redis::cmd("INFO").arg("replication").query(&mut node_conn(replica)).unwrap();
            info.contains("master_link_status:up")
        });
        if !replicas.is_empty() && synced {
            return;
        }
        assert!(tokio::time::Instant::now() < deadline, "the replicas of {addr} never synced");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The stored `(seq, body)` rows of `room`.
async fn stored_bodies(db: &TestDb, room: &str) -> HashMap<u64, Value> {
    let rows = db
        .client()
        .await
        .query("SELECT seq, body::text FROM messages WHERE room = $1", &[&room])
        .await
        .expect("read the stored messages");
    rows.iter().map(|r| (r.get::<_, i64>(0) as u64, serde_json::from_str(r.get::<_, &str>(1)).unwrap())).collect()
}

/// What a failover under a publishing node with a database left behind.
struct FailoverRun {
    /// Acked `(seq, body)` before the kill, and after it.
    before: Vec<(u64, i64)>,
    after: Vec<(u64, i64)>,
    /// The room's epoch (a fresh join) before the kill, and at the end.
    epochs: (Value, Value),
    stored: HashMap<u64, Value>,
}

/// One node publishes to a room, with a database and `extra` flags, while
/// the primary that owns the room is SIGKILLed, until 30 messages were
/// acked after the kill; waits until those are stored.
async fn failover_with_database(test: &str, extra: &[&str]) -> FailoverRun {
    let cluster = PrivateCluster::start();
    let prefix = unique_prefix(test);
    let db = TestDb::create("cluster").await;
    let room = "busy";
    let server = durable_node(&cluster.seeds, &prefix, &db.url, extra).await;
    let epoch = |server: &TestServer| {
        let addr = server.addr;
        async move {
            let mut look = Client::connect(addr, &format!("/ws/{room}"), &token("look", None, 3600)).await;
            look.recv_type("joined").await["epoch"].clone()
        }
    };
    let mut sender = Client::connect(server.addr, "/ws", &token("sa", None, 3600)).await;
    let victim = owner_of(&cluster.seeds, &prefix, room);
    // A replica that never finished its first sync refuses to take over.
    until_replicated(&victim).await;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    let (mut before, mut after) = (Vec::new(), Vec::new());
    let mut epoch_before = Value::Null;
    let mut i = 0i64;
    while after.len() < 30 {
        assert!(tokio::time::Instant::now() < deadline, "the room never recovered after the failover");
        i += 1;
        if i == 40 {
            epoch_before = epoch(&server).await;
            cluster.kill(&victim);
        }
        sender.send_json(&json!({"type": "send", "room": room, "body": i, "ref": format!("r{i}")})).await;
        let reply = sender.recv_json().await;
        match reply["type"].as_str() {
            Some("ack") if i >= 40 => after.push((reply["seq"].as_u64().unwrap(), i)),
            Some("ack") => before.push((reply["seq"].as_u64().unwrap(), i)),
            Some("error") => {
                assert_eq!(reply["code"], "unavailable", "{reply}");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            _ => panic!("unexpected {reply}"),
        }
    }
    assert!(owner_of(&cluster.seeds, &prefix, room) != victim, "a replica took over the slot");
    let seqs: Vec<u64> = after.iter().map(|(seq, _)| *seq).collect();
    db.wait_for(room, &seqs).await;
    let stored = stored_bodies(&db, room).await;
    let epochs = (epoch_before, epoch(&server).await);
    drop(server);
    db.drop().await;
    FailoverRun { before, after, epochs, stored }
}

#[tokio::test]
async fn with_a_database_a_failed_over_room_continues_past_the_stored_rows() {
    let run = failover_with_database("pgfailover", &[]).await;
    // The promoted replica put the room back from the database: its seqs go
    // on past the stored rows, so every message acked after the failover is
    // stored with its own body (a seq starting again at 1 would collide).
    for (seq, body) in &run.after {
        assert_eq!(run.stored.get(seq), Some(&json!(body)), "seq {seq} acked after the failover");
    }
    assert!(run.after[0].0 > 1, "the sequence went on: {:?}", run.after);
    assert_ne!(run.epochs.0, run.epochs.1, "without durable acks the room starts a new epoch");
}

#[tokio::test]
async fn with_durable_acks_a_failed_over_room_keeps_its_epoch_and_every_acked_message() {
    let run = failover_with_database("dfailover", &["--durable-acks"]).await;
    // An ack means the database held it: before the failover and after it,
    // each acked seq is stored with its own body, and the epoch stays.
    for (seq, body) in run.before.iter().chain(&run.after) {
        assert_eq!(run.stored.get(seq), Some(&json!(body)), "acked seq {seq}");
    }
    assert_eq!(run.epochs.0, run.epochs.1, "durable acks keep the epoch across a failover");
}
