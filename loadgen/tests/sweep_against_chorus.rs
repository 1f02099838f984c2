//! `loadgen sweep` against a real chorus server, started in this process
//! with a per-connection rate limit of 25 frames/s (burst 10), so the knee
//! is known in advance: a single publisher stepping 5, 10, 20, 40 msg/s is
//! served in full up to 20 and gets `rate_limited` errors at 40. The sweep
//! must stop at that step and name 20 as the capacity.
//!
//! The checks are counts and verdicts, not times: the machine may be slow
//! and shared.

mod common;

use clap::Parser;
use loadgen::{sweep, sweep_report, Cli};

use common::{start_chorus, SECRET};

async fn start_server(rate: &str, burst: &str) -> chorus::Server {
    start_chorus(rate, burst, &[]).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sweep_stops_where_rate_limited_errors_begin() {
    let server = start_server("25", "10").await;
    let url = format!("ws://{}", server.local_addr());
    let dir = std::env::temp_dir();
    let json = dir.join(format!("loadgen-sweep-{}.json", std::process::id()));
    let html = dir.join(format!("loadgen-sweep-{}.html", std::process::id()));
    let cli = Cli::try_parse_from([
        "loadgen",
        "sweep",
        "--factor",
        "2",
        "--steps",
        "6",
        "fanout",
        "--rooms",
        "2",
        "--members",
        "3",
        "--room-prefix",
        "sweep",
        "--publishers",
        "1",
        "--rate",
        "5",
        "--duration",
        "2s",
        "--drain",
        "500ms",
        "--quiet",
        "--url",
        &url,
        "--jwt-secret",
        SECRET,
        "--source-ips",
        "1",
    ])
    .expect("loadgen options");
    let s = sweep::run(cli).await.expect("the sweep runs");
    eprintln!("{}", sweep_report::table(&s));

    let rates: Vec<f64> = s.steps.iter().map(|st| st.rate).collect();
    assert_eq!(rates, vec![5.0, 10.0, 20.0, 40.0], "the sweep must stop at the first rate_limited step");
    for st in &s.steps[..3] {
        assert!(st.met, "step at {} broke: {:?}", st.rate, st.broke);
        assert!(st.sent > 0 && st.acked == st.sent, "step at {}: {} sent, {} acked", st.rate, st.sent, st.acked);
        assert_eq!(st.delivered, st.acked * 3, "step at {}: every acked message at each of 3 members", st.rate);
        assert_eq!((st.missing, st.gaps, st.duplicates, st.reorders), (0, 0, 0, 0));
        assert_eq!(st.delivery.count, st.delivered);
    }
    // Each step sent about twice the one before (on the same connections).
    assert!(s.steps[2].sent > s.steps[1].sent + s.steps[1].sent / 2, "{:?}", rates);
    let last = &s.steps[3];
    assert!(!last.met);
    assert!(
        last.events.iter().any(|e| e.kind == "error" && e.key == "rate_limited"),
        "the last step broke on rate_limited: {:?}",
        last.broke
    );
    let cap = s.capacity.as_ref().expect("a capacity");
    assert_eq!((cap.step, cap.rate), (2, 20.0));
    assert!(s.stopped.contains("step 4"), "{}", s.stopped);
    assert_eq!(s.connections.established, 7);
    assert_eq!(s.joins.joined, 6);

    // The files: JSON with every step, HTML with the table and the plot.
    sweep_report::write_json(&s, &json).expect("write --json");
    sweep_report::write_report(&s, &html).expect("write --report");
    let back: sweep::SweepSummary =
        serde_json::from_str(&std::fs::read_to_string(&json).expect("read json")).expect("parse json");
    assert_eq!(back.steps.len(), 4);
    assert_eq!(back.capacity.map(|c| c.rate), Some(20.0));
    let page = std::fs::read_to_string(&html).expect("read html");
    assert!(page.contains("<svg") && page.contains("capacity"));
    let _ = std::fs::remove_file(&json);
    let _ = std::fs::remove_file(&html);

    // The server is still fine: a plain run at a rate under the limit is clean.
    let cli = Cli::try_parse_from([
        "loadgen",
        "fanout",
        "--rooms",
        "1",
        "--members",
        "2",
        "--room-prefix",
        "after-sweep",
        "--publishers",
        "1",
        "--rate",
        "10",
        "--duration",
        "500ms",
        "--drain",
        "300ms",
        "--quiet",
        "--url",
        &url,
        "--jwt-secret",
        SECRET,
        "--source-ips",
        "1",
    ])
    .expect("loadgen options");
    let after = loadgen::run(cli).await.expect("a run after the sweep");
    assert!(after.ok, "{:?}", after.problems);
    assert!(after.warnings.is_empty(), "{:?}", after.warnings);
    assert!(s.warnings.iter().any(|w| w.starts_with("step 4:") && w.contains("rate_limited")), "{:?}", s.warnings);
}

/// One publisher at 200 msg/s for half a second, above the server's default
/// per-connection limit of 100/s.
async fn fast_publisher(server: &chorus::Server, prefix: &str) -> loadgen::Summary {
    let url = format!("ws://{}", server.local_addr());
    let cli = Cli::try_parse_from([
        "loadgen",
        "fanout",
        "--rooms",
        "1",
        "--members",
        "1",
        "--room-prefix",
        prefix,
        "--publishers",
        "1",
        "--rate",
        "200",
        "--duration",
        "500ms",
        "--drain",
        "300ms",
        "--quiet",
        "--url",
        &url,
        "--jwt-secret",
        SECRET,
        "--source-ips",
        "1",
    ])
    .expect("loadgen options");
    loadgen::run(cli).await.expect("the run")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rate_limit_warning_only_when_the_server_refused_sends() {
    // A server with limits far above 200/s: no refusal, so no warning.
    let roomy = start_server("100000", "100000").await;
    let s = fast_publisher(&roomy, "warn-roomy").await;
    assert!(s.ok, "{:?}", s.problems);
    assert!(s.warnings.iter().all(|w| !w.contains("rate_limited")), "{:?}", s.warnings);
    // A server at 25/s: refusals, and the warning says so with the rate sent.
    let tight = start_server("25", "10").await;
    let s = fast_publisher(&tight, "warn-tight").await;
    let w = s.warnings.iter().find(|w| w.contains("rate_limited")).expect("a rate_limited warning");
    assert!(w.contains("200 msg/s"), "{w}");
    assert!(s.events.iter().any(|e| e.key == "rate_limited" && e.count > 0));
}
