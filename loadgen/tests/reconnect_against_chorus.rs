//! `--reconnect` and `--record` against two real chorus nodes sharing a real
//! Redis (CHORUS_TEST_REDIS_URL, default redis://127.0.0.1:6379), started in
//! this process: one node stops (closing its connections with 1001) in the
//! middle of a fanout run; its members and publishers reconnect to the
//! other node and rejoin with `since`, and `loadgen audit` on the record
//! finds every acked message delivered to every member, in order, once.

use std::time::Duration;

mod common;

use clap::Parser;
use loadgen::audit::{self, Input};
use loadgen::Cli;

use common::{start_chorus, SECRET};

async fn node(redis: &str, prefix: &str) -> chorus::Server {
    start_chorus("100000", "100000", &["--redis-url", redis, "--redis-prefix", prefix]).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn members_reconnect_to_another_node_and_miss_nothing() {
    let redis = std::env::var("CHORUS_TEST_REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".into());
    let prefix = format!("lg-reconnect-{}", std::process::id());
    let (a, b) = (node(&redis, &prefix).await, node(&redis, &prefix).await);
    let dir = std::env::temp_dir().join(format!("loadgen-reconnect-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let record = dir.join("record.jsonl");
    let (url_a, url_b) = (format!("ws://{}", a.local_addr()), format!("ws://{}", b.local_addr()));
    let argv = [
        "loadgen",
        "fanout",
        "--rooms",
        "2",
        "--members",
        "4",
        "--room-prefix",
        "it-reconnect",
        "--publishers",
        "2",
        "--rate",
        "100",
        "--duration",
        "3s",
        "--drain",
        "2s",
        "--reconnect",
        "--record",
        record.to_str().expect("utf-8 path"),
        "--quiet",
        "--url",
        &url_a,
        "--url",
        &url_b,
        "--jwt-secret",
        SECRET,
        "--source-ips",
        "1",
    ];
    let cli = Cli::try_parse_from(argv).expect("loadgen options");
    let run = tokio::spawn(loadgen::run(cli));
    // Stop node a once the send phase is under way (joins take a moment).
    tokio::time::sleep(Duration::from_millis(2500)).await;
    a.shutdown(Duration::from_secs(2)).await;
    let s = run.await.expect("loadgen task").expect("loadgen runs");
    b.shutdown(Duration::from_secs(2)).await;

    let events = loadgen::record::read(&record).expect("read the record");
    let _ = std::fs::remove_dir_all(&dir);
    let input = Input {
        rooms: s.rooms.iter().map(|r| r.name.clone()).collect(),
        events,
        history_size: 1000,
        t0_ns: (s.phases.send_start_unix_s * 1e9) as u64,
        ..Input::default()
    };
    let result = audit::audit(&input);
    let text = result.text(input.t0_ns);
    eprintln!("{text}");
    assert!(result.violations.is_empty(), "{text}");
    // Half the connections were on node a: 4 members and 1 publisher.
    assert_eq!(result.reconnects, 5, "{text}");
    assert_eq!(result.rejoins, 4, "every member of node a rejoined with since: {text}");
    assert_eq!(result.rejoins_unrecovered, 0, "{text}");
    assert!(result.ends.keys().all(|k| k.starts_with("close 1001")), "{text}");
    assert!(result.acked > 100 && result.delivered >= result.acked * 4, "{text}");
    assert_eq!(s.joins.joined, 8);
}
