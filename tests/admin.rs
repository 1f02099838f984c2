//! The admin listener and the admin API (PROTOCOL.md section 10) against the
//! real binary: where the probes and metrics are served, disconnecting and
//! banning a user on one node and across a cluster, joined by one Redis or
//! by a real local Redis Cluster (`CHORUS_TEST_REDIS_CLUSTER`).

mod common;
#[path = "common/keyspace.rs"]
mod keyspace;
#[path = "common/redis_cluster.rs"]
mod redis_cluster;

use std::time::{Duration, Instant};

use serde_json::{json, Value};

use common::*;

fn redis_url() -> String {
    std::env::var("CHORUS_TEST_REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".to_owned())
}

/// `POST /admin/users/{sub}/disconnect{query}` on the admin listener: status and JSON body.
async fn disconnect(server: &TestServer, sub: &str, query: &str) -> (u16, Value) {
    let url = server.admin_url(&format!("/admin/users/{sub}/disconnect{query}"));
    let response = http_client().post(url).send().await.expect("POST disconnect");
    let status = response.status().as_u16();
    let text = response.text().await.unwrap();
    (status, serde_json::from_str(&text).unwrap_or_else(|e| panic!("not JSON ({e}): {text}")))
}

fn now_ms() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_millis() as u64
}

/// The upgrade refusal for `sub`'s token on `server`.
async fn refusal(server: &TestServer, sub: &str) -> (u16, Value) {
    let bearer = format!("Bearer {}", token(sub, None, 600));
    upgrade_refusal(&server.url("/ws"), &[("authorization", &bearer)]).await
}

/// Polls until `sub` may connect again (a hang guard, not a timing claim).
async fn connects_again(server: &TestServer, sub: &str) -> Client {
    let deadline = Instant::now() + GUARD;
    loop {
        let request = with_bearer(ws_request(server.addr, "/ws"), &token(sub, None, 600));
        match try_connect(server.addr, request, None).await {
            Ok(client) => return client,
            Err(e) => assert!(Instant::now() < deadline, "{sub} still refused: {e}"),
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test]
async fn the_admin_listener_takes_the_probes_and_metrics_off_the_public_port() {
    let server = TestServer::start(&["--admin-listen", "127.0.0.1:0"]).await;
    let admin = server.admin.expect("the server printed its admin address");
    assert_ne!(admin, server.addr);
    let http = http_client();
    for path in ["/healthz", "/readyz", "/metrics"] {
        let public = http.get(server.url(path)).send().await.unwrap();
        assert_eq!(public.status(), 404, "public GET {path}");
        let private = http.get(server.admin_url(path)).send().await.unwrap();
        assert_eq!(private.status(), 200, "admin GET {path}");
    }
    assert!(server.metrics().await.contains("chorus_connections"));
    // Wrong methods on the admin side are refused, and client routes are not served there.
    assert_eq!(http.post(server.admin_url("/healthz")).send().await.unwrap().status(), 405);
    let ws = http.get(server.admin_url("/ws")).bearer_auth(token("a", None, 60)).send().await.unwrap();
    assert_eq!(ws.status(), 404);
    let history = http.get(server.admin_url("/rooms/lobby/history")).bearer_auth(token("a", None, 60)).send().await;
    assert_eq!(history.unwrap().status(), 404);
    // Clients are still served on the public port, and the server goes on.
    let (mut client, _) = server.connect_joined("lobby", &token("alice", None, 60)).await;
    client.ping_pong().await;
    assert_eq!(http.get(server.admin_url("/healthz")).send().await.unwrap().status(), 200);
}

#[tokio::test]
async fn without_an_admin_listener_the_probes_stay_public_and_the_admin_api_is_off() {
    let server = TestServer::start(&[]).await;
    assert_eq!(server.admin, None);
    let http = http_client();
    for path in ["/healthz", "/readyz", "/metrics"] {
        assert_eq!(http.get(server.url(path)).send().await.unwrap().status(), 200, "GET {path}");
    }
    let response = http.post(server.url("/admin/users/alice/disconnect")).send().await.unwrap();
    assert_eq!(response.status(), 404);
}

#[tokio::test]
async fn an_unusable_admin_address_stops_the_start() {
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_chorus"))
        .args(["serve", "--jwt-secret", "s", "--listen", "127.0.0.1:0", "--admin-listen", "not-an-address"])
        .output()
        .unwrap();
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("--admin-listen"), "{stderr}");
}

#[tokio::test]
async fn disconnect_closes_every_connection_of_the_user_with_4001_and_no_one_else() {
    let server = TestServer::start(&["--admin-listen", "127.0.0.1:0"]).await;
    let alice = token("alice", None, 600);
    let (mut first, _) = server.connect_joined("lobby", &alice).await;
    let mut second = server.connect("/ws", &alice).await;
    second.ping_pong().await;
    let (mut bob, _) = server.connect_joined("lobby", &token("bob", None, 600)).await;

    let (status, body) = disconnect(&server, "alice", "").await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body, json!({"sub": "alice", "closed": 2, "banned_until": null}));
    assert_eq!(first.recv_close().await, (4001, "disconnected".to_owned()));
    assert_eq!(second.recv_close().await, (4001, "disconnected".to_owned()));
    // Bob goes on, and with no ban alice may come back at once.
    bob.ping_pong().await;
    let (mut back, _) = server.connect_joined("lobby", &alice).await;
    back.ping_pong().await;
    assert_eq!(server.metric("chorus_admin_disconnects_total").await, 2.0);
    // A user with no connection: nothing closed, still 200.
    assert_eq!(disconnect(&server, "nobody", "").await.1["closed"], 0);
}

#[tokio::test]
async fn a_ban_refuses_the_users_tokens_until_it_ends() {
    let server = TestServer::start(&["--admin-listen", "127.0.0.1:0"]).await;
    let (mut alice, _) = server.connect_joined("lobby", &token("alice", None, 600)).await;
    let before = now_ms();
    let (status, body) = disconnect(&server, "alice", "?ban=2s").await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["closed"], 1);
    let until = body["banned_until"].as_u64().expect("banned_until");
    assert!(until >= before + 2000 && until <= now_ms() + 2000, "{until} vs {before}");
    assert_eq!(alice.recv_close().await.0, 4001);

    // Refused with 401 on the upgrade, with the token in the query too, and on the HTTP API.
    let (status, body) = refusal(&server, "alice").await;
    assert_eq!((status, body["error"].as_str()), (401, Some("invalid_token")), "{body}");
    let query = format!("/ws?token={}", token("alice", None, 600));
    assert_eq!(upgrade_refusal(&server.url(&query), &[]).await.0, 401);
    let response = http_client()
        .post(server.url("/rooms/lobby/messages"))
        .bearer_auth(token("alice", None, 600))
        .body(r#"{"body":1}"#)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 401);
    // Others are not affected.
    let (mut bob, _) = server.connect_joined("lobby", &token("bob", None, 600)).await;
    bob.ping_pong().await;
    // Once the ban ends, alice is welcome again.
    let mut back = connects_again(&server, "alice").await;
    assert!(now_ms() >= until, "let in before the ban ended");
    back.ping_pong().await;
}

#[tokio::test]
async fn admin_requests_that_are_wrong_get_errors_and_the_server_goes_on() {
    let server = TestServer::start(&["--admin-listen", "127.0.0.1:0"]).await;
    let (mut alice, _) = server.connect_joined("lobby", &token("alice", None, 600)).await;
    for query in ["?ban=10", "?ban=0s", "?ban=forever", "?ban="] {
        let (status, body) = disconnect(&server, "alice", query).await;
        assert_eq!((status, body["error"].as_str()), (400, Some("bad_request")), "{query}: {body}");
    }
    let long = "a".repeat(129);
    for sub in ["", "%zz", long.as_str()] {
        let (status, body) = disconnect(&server, sub, "").await;
        assert_eq!(status, 400, "{sub:?}: {body}");
    }
    let get = http_client().get(server.admin_url("/admin/users/alice/disconnect")).send().await.unwrap();
    assert_eq!(get.status(), 405);
    // Nothing above touched alice, and the admin API still works.
    alice.ping_pong().await;
    let (status, body) = disconnect(&server, "al%69ce", "").await;
    assert_eq!((status, body["sub"].as_str(), body["closed"].as_u64()), (200, Some("alice"), Some(1)));
    assert_eq!(alice.recv_close().await.0, 4001);
}

#[tokio::test]
async fn a_cluster_that_cannot_be_told_gets_503_after_this_nodes_part() {
    // Nothing listens on this port: Redis is down for this node from the start.
    let dead = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("redis://{}", dead.local_addr().unwrap());
    drop(dead);
    let server = TestServer::start(&["--admin-listen", "127.0.0.1:0", "--redis-url", &url]).await;
    let mut alice = server.connect("/ws", &token("alice", None, 600)).await;
    alice.ping_pong().await;
    let (status, body) = disconnect(&server, "alice", "?ban=1m").await;
    assert_eq!((status, body["error"].as_str()), (503, Some("unavailable")), "{body}");
    assert!(body["message"].as_str().unwrap().contains("closed 1"), "{body}");
    assert_eq!(alice.recv_close().await.0, 4001);
    // This node keeps the ban, and goes on serving.
    assert_eq!(refusal(&server, "alice").await.0, 401);
    assert_eq!(http_client().get(server.admin_url("/healthz")).send().await.unwrap().status(), 200);
    let mut bob = server.connect("/ws", &token("bob", None, 600)).await;
    bob.ping_pong().await;
}

#[tokio::test]
async fn disconnect_and_ban_reach_every_node_and_survive_a_restart() {
    let prefix = keyspace::TestPrefix::new("admin", &redis_url());
    let url = redis_url();
    let args = ["--admin-listen", "127.0.0.1:0", "--redis-url", &url, "--redis-prefix", prefix.as_str()];
    let a = TestServer::start(&args).await;
    let b = TestServer::start(&args).await;
    let (mut on_b, _) = b.connect_joined("lobby", &token("alice", None, 600)).await;
    let (mut bob, _) = b.connect_joined("lobby", &token("bob", None, 600)).await;

    let (status, body) = disconnect(&a, "alice", "?ban=6s").await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["closed"], 0, "alice had no connection on the node asked");
    let until = body["banned_until"].as_u64().unwrap();
    let asked = Instant::now();
    assert_eq!(on_b.recv_close().await, (4001, "disconnected".to_owned()));
    assert!(asked.elapsed() < Duration::from_secs(1), "the other node closed after {:?}", asked.elapsed());
    bob.ping_pong().await;

    // Refused on both nodes, and on a node started after the ban.
    assert_eq!(refusal(&a, "alice").await.0, 401);
    assert_eq!(refusal(&b, "alice").await.0, 401);
    drop(b);
    let restarted = TestServer::start(&args).await;
    assert!(now_ms() + 500 < until, "the restart took too long to check that the ban survives it");
    assert_eq!(refusal(&restarted, "alice").await.0, 401);
    // Then everywhere welcome again once it ends.
    connects_again(&restarted, "alice").await.ping_pong().await;
    connects_again(&a, "alice").await.ping_pong().await;
    assert!(now_ms() >= until);
}

/// `--redis-cluster`: bans of several users, whose keys land on different
/// shards, issued on one node: every node refuses them and closes their
/// connections within a second, and a node started afterwards reads them
/// back from every primary.
#[tokio::test]
async fn on_a_redis_cluster_bans_reach_every_node_and_survive_a_restart() {
    let seeds = redis_cluster::seeds();
    let prefix = redis_cluster::ClusterPrefix::new("admin-rc", &seeds);
    let args =
        ["--admin-listen", "127.0.0.1:0", "--redis-url", &seeds, "--redis-cluster", "--redis-prefix", prefix.as_str()];
    let a = TestServer::start(&args).await;
    let b = TestServer::start(&args).await;
    let c = TestServer::start(&args).await;
    // Enough users that their keys are all but sure to be on several shards.
    let banned: Vec<String> = (0..12).map(|i| format!("user-{i}")).collect();
    let mut connections = Vec::new();
    for sub in &banned {
        for server in [&b, &c] {
            connections.push((sub.clone(), server.connect_joined("lobby", &token(sub, None, 600)).await.0));
        }
    }
    let (mut bob, _) = b.connect_joined("lobby", &token("bob", None, 600)).await;

    for sub in &banned {
        let (status, body) = disconnect(&a, sub, "?ban=10m").await;
        assert_eq!(status, 200, "{body}");
        assert_eq!(body["closed"], 0, "{sub} had no connection on the node asked");
        let asked = Instant::now();
        for (_, client) in connections.iter_mut().filter(|(s, _)| s == sub) {
            assert_eq!(client.recv_close().await, (4001, "disconnected".to_owned()));
        }
        assert!(asked.elapsed() < Duration::from_secs(1), "the other nodes closed after {:?}", asked.elapsed());
    }
    bob.ping_pong().await;
    // The ban keys are spread over the shards, so reading them back means
    // scanning more than one primary.
    let keys = redis_cluster::keys_by_primary(&seeds, &format!("{}:ban:*", prefix.as_str()));
    assert_eq!(keys.iter().map(|(_, k)| k.len()).sum::<usize>(), banned.len(), "{keys:?}");
    assert!(keys.iter().filter(|(_, k)| !k.is_empty()).count() >= 2, "{keys:?}");
    // The announcements are sharded: nothing on classic pub/sub.
    assert_eq!(redis_cluster::classic_channels(&seeds, &format!("{}*", prefix.as_str())), Vec::<String>::new());

    for server in [&a, &b, &c] {
        for sub in &banned {
            assert_eq!(refusal(server, sub).await.0, 401, "{sub}");
        }
    }
    drop(b);
    let restarted = TestServer::start(&args).await;
    for sub in &banned {
        assert_eq!(refusal(&restarted, sub).await.0, 401, "{sub} after a restart");
    }
    let (mut welcome, _) = restarted.connect_joined("lobby", &token("bob", None, 600)).await;
    welcome.ping_pong().await;
}
