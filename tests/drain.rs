//! Rolling deploys (issue "production edges"): on SIGTERM `/readyz` answers
//! 503 for `--drain-period` while clients are still served, then the open
//! connections are closed with 1001 spread over `--close-spread`, then the
//! process exits 0. A second signal skips what is left.

mod common;

use std::time::{Duration, Instant};

use futures_util::future::join_all;

use common::*;

async fn ready_status(server: &TestServer) -> u16 {
    let url = if server.admin.is_some() { server.admin_url("/readyz") } else { server.url("/readyz") };
    http_client().get(url).send().await.unwrap().status().as_u16()
}

/// Polls `/readyz` until it answers `status` (a hang guard, not a timing claim).
async fn wait_ready_status(server: &TestServer, status: u16) {
    let deadline = Instant::now() + GUARD;
    while ready_status(server).await != status {
        assert!(Instant::now() < deadline, "/readyz never answered {status}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn readiness_fails_first_while_clients_are_still_served_then_1001_and_exit_0() {
    let mut server =
        TestServer::start(&["--admin-listen", "127.0.0.1:0", "--drain-period", "1500ms", "--close-spread", "200ms"])
            .await;
    let (mut alice, _) = server.connect_joined("lobby", &token("alice", None, 600)).await;
    assert_eq!(ready_status(&server).await, 200);
    let signalled = Instant::now();
    server.sigterm();
    wait_ready_status(&server, 503).await;
    // Draining: the node still serves what it has and still accepts.
    let mut bob = server.connect("/ws", &token("bob", None, 600)).await;
    bob.publish("lobby", serde_json::json!("still here")).await;
    alice.recv_type("message").await;
    assert_eq!(http_client().get(server.admin_url("/healthz")).send().await.unwrap().status(), 200);
    assert!(signalled.elapsed() < Duration::from_millis(1500), "too slow to check the drain period");
    assert_eq!(alice.recv_close().await, (1001, "going away".to_owned()));
    assert_eq!(bob.recv_close().await.0, 1001);
    assert!(signalled.elapsed() >= Duration::from_millis(1500), "closed before the drain period ended");
    // Past the drain the node stops accepting: the connection is refused,
    // or the upgrade is answered 503.
    if let Ok(stream) = tokio::net::TcpStream::connect(server.addr).await {
        let request = with_bearer(ws_request(server.addr, "/ws"), &token("carol", None, 600));
        let late = tokio::time::timeout(GUARD, tokio_tungstenite::client_async(request, stream)).await;
        match late.expect("the late handshake hung") {
            Err(tokio_tungstenite::tungstenite::Error::Http(response)) => assert_eq!(response.status(), 503),
            Err(_) => {}
            Ok(_) => panic!("a connection was upgraded after the drain"),
        }
    }
    assert!(server.wait_exit().await.success());
}

#[tokio::test]
async fn the_closes_of_a_thousand_connections_are_spread_over_the_period() {
    const N: usize = 1000;
    let spread = Duration::from_secs(3);
    let mut server = TestServer::start(&["--drain-period", "0s", "--close-spread", "3s"]).await;
    let tok = token("crowd", None, 600);
    let mut clients = Vec::with_capacity(N);
    for _ in 0..N / 100 {
        clients.extend(join_all((0..100).map(|_| server.connect("/ws", &tok))).await);
    }
    for client in clients.iter_mut().step_by(97) {
        client.ping_pong().await;
    }
    assert_eq!(server.metric("chorus_connections").await, N as f64);
    let signalled = Instant::now();
    server.sigterm();
    let closes = join_all(clients.into_iter().map(|mut client| async move {
        let (code, _) = client.recv_close().await;
        (code, signalled.elapsed())
    }))
    .await;
    assert!(server.wait_exit().await.success());
    assert!(closes.iter().all(|(code, _)| *code == 1001));
    let mut times: Vec<Duration> = closes.into_iter().map(|(_, t)| t).collect();
    times.sort();
    let at = |q: f64| times[((N - 1) as f64 * q) as usize];
    let part = |f: f64| spread.mul_f64(f);
    // Spread, not all at once: the first tenth closes early, the last tenth
    // late, the median in the middle of the period.
    assert!(at(0.1) < part(0.3), "the first tenth closed by {:?}", at(0.1));
    assert!(at(0.5) > part(0.3) && at(0.5) < part(0.8), "the median closed at {:?}", at(0.5));
    assert!(at(0.9) > part(0.75), "the last tenth started closing at {:?}", at(0.9));
}

async fn second_signal_stops_at_once(second: i32) {
    let mut server = TestServer::start(&["--drain-period", "30s", "--close-spread", "30s"]).await;
    let (mut alice, _) = server.connect_joined("lobby", &token("alice", None, 600)).await;
    let signalled = Instant::now();
    server.sigterm();
    wait_ready_status(&server, 503).await;
    alice.ping_pong().await;
    server.signal(second);
    assert_eq!(alice.recv_close().await.0, 1001);
    assert!(server.wait_exit().await.success());
    assert!(signalled.elapsed() < Duration::from_secs(15), "took {:?} of a 60 s drain", signalled.elapsed());
}

#[tokio::test]
async fn a_second_sigterm_stops_at_once() {
    second_signal_stops_at_once(libc::SIGTERM).await;
}

#[tokio::test]
async fn a_sigint_during_the_drain_stops_at_once() {
    second_signal_stops_at_once(libc::SIGINT).await;
}
