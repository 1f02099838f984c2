//! The admin listener and the admin API (PROTOCOL.md section 10) against the
//! real binary: where the probes and metrics are served, disconnecting and
//! banning a user on one node and across a cluster.

mod common;

use common::*;

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
