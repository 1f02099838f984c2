//! Presence across a cluster (PROTOCOL.md section 8): nodes joined by the
//! machine's Redis under a prefix of the test's own; a node that dies is a
//! private process the test SIGKILLs. The last section runs the nodes on a
//! real local Redis Cluster (`--redis-cluster`, `CHORUS_TEST_REDIS_CLUSTER`).

mod common;
#[path = "common/keyspace.rs"]
mod keyspace;
#[path = "common/presence.rs"]
mod presence;
#[path = "common/proxy.rs"]
mod proxy;
#[path = "common/redis_cluster.rs"]
mod redis_cluster;

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use common::*;
use presence::*;

fn redis_url() -> String {
    std::env::var("CHORUS_TEST_REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".to_owned())
}

async fn node(prefix: &str, extra: &[&str]) -> TestServer {
    let url = redis_url();
    let mut args = vec!["--redis-url", &url, "--redis-prefix", prefix];
    args.extend_from_slice(extra);
    TestServer::start(&args).await
}

fn redis_addr() -> std::net::SocketAddr {
    let url = redis_url();
    let host_port = url.trim_start_matches("redis://").split('/').next().unwrap_or("127.0.0.1:6379").to_owned();
    let host_port = host_port.rsplit('@').next().unwrap_or(&host_port).to_owned();
    std::net::ToSocketAddrs::to_socket_addrs(&host_port).unwrap().next().unwrap()
}

async fn http_presence(server: &TestServer, room: &str) -> Value {
    let response = http_client()
        .get(server.url(&format!("/rooms/{room}/presence")))
        .bearer_auth(token("reader", None, 3600))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    serde_json::from_str(&response.text().await.unwrap()).unwrap()
}

#[tokio::test]
async fn users_on_every_node_and_diffs_through_the_bus() {
    let prefix = keyspace::TestPrefix::new("presence", &redis_url());
    let a = node(prefix.as_str(), &[]).await;
    let b = node(prefix.as_str(), &[]).await;
    let room = "lobby";

    let mut alice = a.connect("/ws", &token("alice", None, 3600)).await;
    let state = join_presence(&mut alice, room).await;
    assert_eq!(subs(&state), ["alice"]);
    let mut alice_view = Tracked::from_state(&state);

    // bob joins on the other node: alice hears of him through Redis.
    let mut bob_b = b.connect("/ws", &token("bob", None, 3600)).await;
    bob_b.join(room).await;
    let diff = alice.recv_type("presence_diff").await;
    assert_eq!(diff, json!({"type":"presence_diff","room":room,"joins":["bob"],"leaves":[],"count":2}));
    alice_view.apply(&diff);

    // A subscriber on B starts from the whole cluster's users.
    let mut carol = b.connect("/ws", &token("carol", None, 3600)).await;
    let state = join_presence(&mut carol, room).await;
    assert_eq!(subs(&state), ["alice", "bob", "carol"]);
    let mut carol_view = Tracked::from_state(&state);

    // bob's second connection, on A: conns across the cluster, no diff.
    let mut bob_a = a.connect("/ws", &token("bob", None, 3600)).await;
    bob_a.join(room).await;
    let diff = alice.recv_type("presence_diff").await;
    assert_eq!(diff["joins"], json!(["carol"]));
    alice_view.apply(&diff);
    tokio::time::sleep(SETTLE).await;
    let (frames, answer) = read_until_presence(&mut alice, room).await;
    assert!(frames.is_empty(), "{frames:?}");
    assert_eq!(answer["members"], json!([{"sub":"alice","conns":1},{"sub":"bob","conns":2},{"sub":"carol","conns":1}]));
    let (frames, answer) = read_until_presence(&mut carol, room).await;
    assert!(frames.is_empty(), "{frames:?}");
    assert_eq!(answer["count"], 3);
    assert_eq!(http_presence(&b, room).await, http_presence(&a, room).await);
    assert_eq!(http_presence(&b, room).await["members"][1], json!({"sub":"bob","conns":2}));

    // bob leaves on B: still there on A, no diff; then closes on A: a leave
    // on both nodes.
    bob_b.send_json(&json!({"type": "leave", "room": room})).await;
    bob_b.recv_type("left").await;
    let (frames, answer) = read_until_presence(&mut carol, room).await;
    assert!(frames.is_empty(), "{frames:?}");
    assert_eq!(answer["members"][1], json!({"sub":"bob","conns":1}));
    bob_a.close(1000, "").await;
    let leave = json!({"type":"presence_diff","room":room,"joins":[],"leaves":["bob"],"count":2});
    let diff = alice.recv_type("presence_diff").await;
    assert_eq!(diff, leave);
    alice_view.apply(&diff);
    let diff = carol.recv_type("presence_diff").await;
    assert_eq!(diff, leave);
    carol_view.apply(&diff);

    // Churn on both nodes; every subscriber's diffs end where a fresh
    // presence does, on both nodes.
    let mut others = Vec::new();
    for i in 0..20 {
        let server = if i % 2 == 0 { &a } else { &b };
        let mut c = server.connect("/ws", &token(&format!("u{}", i % 7), None, 3600)).await;
        c.join(room).await;
        others.push(c);
        if i % 3 == 2 {
            let mut gone = others.remove(i % others.len());
            gone.close(1000, "").await;
        }
    }
    alice_view.sync_and_check(&mut alice, room).await;
    carol_view.sync_and_check(&mut carol, room).await;
    assert!(b.metric("chorus_presence_diffs_total").await >= 2.0);
}

/// A node is SIGKILLed with users in a room: a presence subscriber on a
/// live node sees them leave within --presence-ttl, but for a user who also
/// has a connection on the live node. One body for both buses: `start`
/// starts a node on the bus under test with the flags it is given.
async fn a_killed_nodes_users_leave_within_the_ttl(start: impl AsyncFn(&[&str]) -> TestServer) {
    let ttl = Duration::from_secs(2);
    let a = start(&["--presence-ttl", "2s"]).await;
    let doomed = start(&["--presence-ttl", "2s"]).await;
    let room = "lobby";
    let mut alice = a.connect("/ws", &token("alice", None, 3600)).await;
    let mut view = Tracked::from_state(&join_presence(&mut alice, room).await);
    let mut on_doomed = Vec::new();
    for sub in ["dave", "erin"] {
        let mut c = doomed.connect("/ws", &token(sub, None, 3600)).await;
        c.join(room).await;
        on_doomed.push(c);
    }
    // erin also has a connection on A: she stays.
    let mut erin_a = a.connect("/ws", &token("erin", None, 3600)).await;
    erin_a.join(room).await;
    let (frames, answer) = read_until_presence(&mut alice, room).await;
    frames.iter().for_each(|f| view.apply(f));
    assert_eq!(subs(&answer), ["alice", "dave", "erin"]);
    // Longer than a heartbeat, so the contributions were refreshed once.
    tokio::time::sleep(Duration::from_millis(800)).await;
    let (frames, answer) = read_until_presence(&mut alice, room).await;
    frames.iter().for_each(|f| view.apply(f));
    assert_eq!(answer["count"], 3, "a live node's users stay");

    doomed.signal(9);
    let killed = Instant::now();
    let diff = alice.recv_type("presence_diff").await;
    let took = killed.elapsed();
    assert_eq!(diff, json!({"type":"presence_diff","room":room,"joins":[],"leaves":["dave"],"count":2}));
    // The bound the protocol promises, with a little room for a busy machine.
    assert!(took <= ttl + Duration::from_millis(500), "left after {took:?}");
    view.apply(&diff);
    view.sync_and_check(&mut alice, room).await;
    assert_eq!(http_presence(&a, room).await["members"], json!([{"sub":"alice","conns":1},{"sub":"erin","conns":1}]));
    drop(on_doomed);
}

#[tokio::test]
async fn a_killed_node_users_leave_within_the_presence_ttl() {
    let prefix = keyspace::TestPrefix::new("presence-kill", &redis_url());
    a_killed_nodes_users_leave_within_the_ttl(async |extra: &[&str]| node(prefix.as_str(), extra).await).await;
}

#[tokio::test]
async fn a_node_that_stops_gracefully_says_goodbye() {
    let prefix = keyspace::TestPrefix::new("presence-bye", &redis_url());
    // The default --presence-ttl (30 s) is longer than every wait here: the
    // leave can only come from the stopping node's goodbye.
    let a = node(prefix.as_str(), &[]).await;
    let mut stopping = node(prefix.as_str(), &[]).await;
    let room = "lobby";
    let mut alice = a.connect("/ws", &token("alice", None, 3600)).await;
    join_presence(&mut alice, room).await;
    let mut frank = stopping.connect("/ws", &token("frank", None, 3600)).await;
    frank.join(room).await;
    assert_eq!(alice.recv_type("presence_diff").await["joins"], json!(["frank"]));
    stopping.sigterm();
    assert_eq!(frank.recv_close().await.0, 1001);
    assert!(stopping.wait_exit().await.success());
    let diff = alice.recv_type("presence_diff").await;
    assert_eq!(diff, json!({"type":"presence_diff","room":room,"joins":[],"leaves":["frank"],"count":1}));
}

#[tokio::test]
async fn redis_cut_off_answers_unavailable_and_presence_comes_back() {
    let prefix = keyspace::TestPrefix::new("presence-cut", &redis_url());
    let proxy = proxy::Proxy::start(redis_addr()).await;
    let proxied = format!("redis://{}", proxy.addr);
    let a = TestServer::start(&["--redis-url", &proxied, "--redis-prefix", prefix.as_str()]).await;
    let room = "lobby";
    let mut alice = a.connect("/ws", &token("alice", None, 3600)).await;
    join_presence(&mut alice, room).await;
    tokio::time::sleep(SETTLE).await;
    assert_eq!(ask_presence(&mut alice, room).await["count"], 1);

    proxy.cut();
    alice.send_json(&json!({"type": "presence", "room": room, "ref": "down"})).await;
    alice.recv_error("unavailable", Some("down")).await;
    let response = http_client()
        .get(a.url(&format!("/rooms/{room}/presence")))
        .bearer_auth(token("reader", None, 3600))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 503);
    let body: Value = serde_json::from_str(&response.text().await.unwrap()).unwrap();
    assert_eq!(body["error"], "unavailable");
    // The connection and the server go on.
    alice.ping_pong().await;

    proxy.restore();
    let deadline = Instant::now() + GUARD;
    loop {
        let reference = unique_ref("back");
        alice.send_json(&json!({"type": "presence", "room": room, "ref": reference})).await;
        let answer = alice.recv_json().await;
        if answer["type"] == "presence" {
            assert_eq!(answer["members"], json!([{"sub":"alice","conns":1}]));
            break;
        }
        assert_eq!(answer["code"], "unavailable", "{answer}");
        assert!(Instant::now() < deadline, "presence did not come back after redis did");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

// ---------------------------------------------------------------------------
// On a Redis Cluster
// ---------------------------------------------------------------------------

async fn cluster_node(seeds: &str, prefix: &str, extra: &[&str]) -> TestServer {
    let mut args = vec!["--redis-url", seeds, "--redis-cluster", "--redis-prefix", prefix];
    args.extend_from_slice(extra);
    TestServer::start(&args).await
}

/// Polls the cluster's presence shard channels under `prefix` until `done`
/// says they are as expected (a subscription follows a join by a moment).
async fn presence_channels_until(
    seeds: &str,
    prefix: &str,
    what: &str,
    done: impl Fn(&[(String, i64)]) -> bool,
) -> Vec<(String, i64)> {
    let deadline = Instant::now() + GUARD;
    loop {
        let channels = redis_cluster::shard_channels(seeds, &format!("{prefix}:presence:*"));
        if done(&channels) {
            return channels;
        }
        assert!(Instant::now() < deadline, "{what}: presence shard channels {channels:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Applies every presence frame `client` receives to the view of its room,
/// asks `presence` of each room in `views`, and checks each view against
/// the answer.
async fn check_views(client: &mut Client, views: &mut BTreeMap<String, Tracked>) {
    tokio::time::sleep(SETTLE).await;
    let rooms: Vec<String> = views.keys().cloned().collect();
    for room in rooms {
        let reference = unique_ref("sync");
        client.send_json(&json!({"type": "presence", "room": room, "ref": reference})).await;
        let answer = loop {
            let frame = client.recv_json().await;
            if frame["type"] == "presence" {
                assert_eq!(frame["ref"], reference);
                break frame;
            }
            let of = frame["room"].as_str().unwrap().to_owned();
            views.get_mut(&of).unwrap_or_else(|| panic!("a frame of another room: {frame}")).apply(&frame);
        };
        let view = &views[&room];
        assert_eq!(view.count, answer["count"].as_u64().unwrap(), "{room}: count after the diffs");
        let fresh: BTreeSet<String> = subs(&answer).into_iter().collect();
        assert_eq!(view.members, fresh, "{room}: members after the diffs");
    }
}

/// Three nodes on a Redis Cluster, rooms on every shard: a subscriber's
/// state holds the users of every node, diffs reach subscribers on the
/// other nodes, and the notices travel on shard channels that only the
/// nodes with presence subscribers in the room subscribe to.
#[tokio::test]
async fn on_a_redis_cluster_state_and_diffs_cross_nodes_over_shard_channels() {
    let seeds = redis_cluster::seeds();
    let prefix = redis_cluster::ClusterPrefix::new("presence-rc", &seeds);
    let a = cluster_node(&seeds, prefix.as_str(), &[]).await;
    let b = cluster_node(&seeds, prefix.as_str(), &[]).await;
    let c = cluster_node(&seeds, prefix.as_str(), &[]).await;
    let rooms: Vec<String> = (0..6).map(|i| format!("lobby-{i}")).collect();
    let mut alice = a.connect("/ws", &token("alice", None, 3600)).await;
    let mut bob = b.connect("/ws", &token("bob", None, 3600)).await;
    let mut carol = c.connect("/ws", &token("carol", None, 3600)).await;
    let mut alice_views = BTreeMap::new();
    let mut carol_views = BTreeMap::new();
    for room in &rooms {
        let state = join_presence(&mut alice, room).await;
        assert_eq!(subs(&state), ["alice"], "{room}");
        let mut alice_view = Tracked::from_state(&state);
        // bob, on B without presence, is present; alice on A hears of him.
        bob.join(room).await;
        let diff = alice.recv_type("presence_diff").await;
        assert_eq!(diff, json!({"type":"presence_diff","room":room,"joins":["bob"],"leaves":[],"count":2}));
        alice_view.apply(&diff);
        // A subscriber on C starts from every node's users.
        let state = join_presence(&mut carol, room).await;
        assert_eq!(subs(&state), ["alice", "bob", "carol"], "{room}");
        carol_views.insert(room.clone(), Tracked::from_state(&state));
        let diff = alice.recv_type("presence_diff").await;
        assert_eq!(diff["joins"], json!(["carol"]), "{room}");
        alice_view.apply(&diff);
        alice_views.insert(room.clone(), alice_view);
    }
    // Sharded: the rooms' channels are on more than one shard, each
    // subscribed by A and C (they have subscribers there) and not by B;
    // classic pub/sub carries nothing.
    let pattern = format!("{}:presence:*", prefix.as_str());
    let channels = presence_channels_until(&seeds, prefix.as_str(), "A and C subscribed", |channels| {
        !channels.is_empty() && channels.iter().all(|(_, subscribers)| *subscribers == 2)
    })
    .await;
    assert!(channels.len() <= rooms.len(), "{channels:?}");
    let shards = redis_cluster::primaries(&seeds)
        .into_iter()
        .filter(|addr| {
            let here: Vec<String> = redis::cmd("PUBSUB")
                .arg("SHARDCHANNELS")
                .arg(&pattern)
                .query(&mut redis_cluster::node_conn(addr))
                .unwrap();
            !here.is_empty()
        })
        .count();
    assert!(shards >= 2, "the rooms' presence lives on {shards} shard(s)");
    assert_eq!(redis_cluster::classic_channels(&seeds, &format!("{}*", prefix.as_str())), Vec::<String>::new());

    // bob's connection on B closes: a leave in every room, for alice on A
    // and carol on C.
    bob.close(1000, "").await;
    for (client, views) in [(&mut alice, &mut alice_views), (&mut carol, &mut carol_views)] {
        let mut left = BTreeSet::new();
        while left.len() < rooms.len() {
            let diff = client.recv_type("presence_diff").await;
            let room = diff["room"].as_str().unwrap().to_owned();
            assert_eq!(diff, json!({"type":"presence_diff","room":room,"joins":[],"leaves":["bob"],"count":2}));
            views.get_mut(&room).unwrap().apply(&diff);
            assert!(left.insert(room), "two leaves in one room: {diff}");
        }
    }

    // Churn on all three nodes; the subscribers' diffs end where a fresh
    // presence does, in every room.
    let mut others = Vec::new();
    for i in 0..24 {
        let server = [&a, &b, &c][i % 3];
        let mut other = server.connect("/ws", &token(&format!("u{}", i % 5), None, 3600)).await;
        other.join(&rooms[i % rooms.len()]).await;
        others.push(other);
        if i % 4 == 3 {
            let mut gone = others.remove(i % others.len());
            gone.close(1000, "").await;
        }
    }
    check_views(&mut alice, &mut alice_views).await;
    check_views(&mut carol, &mut carol_views).await;
    assert!(c.metric("chorus_presence_diffs_total").await >= rooms.len() as f64);

    // No subscriber left: the nodes unsubscribe.
    alice.close(1000, "").await;
    carol.close(1000, "").await;
    presence_channels_until(&seeds, prefix.as_str(), "every node unsubscribed", <[_]>::is_empty).await;
}

#[tokio::test]
async fn on_a_redis_cluster_a_killed_nodes_users_leave_within_the_presence_ttl() {
    let seeds = redis_cluster::seeds();
    let prefix = redis_cluster::ClusterPrefix::new("presence-rc-kill", &seeds);
    a_killed_nodes_users_leave_within_the_ttl(async |extra: &[&str]| {
        cluster_node(&seeds, prefix.as_str(), extra).await
    })
    .await;
}
