//! loadgen against a real chorus server, started in this process: each
//! scenario runs for a moment, every expected delivery must arrive exactly
//! once and in order, and the `--json` file must hold the figures, the same
//! ones `loadgen::run` returned.
//!
//! No assertion is about time: the machine may be slow and shared. The
//! checks are counts (planned = established, sent = scheduled = acked,
//! delivered = expected), correctness (no gap, duplicate, reorder, missing,
//! extra or foreign message, no error frame or unexpected close) and the
//! presence and internal consistency of the figures (percentiles ordered,
//! one latency sample per delivery, ack and connection).

use std::path::{Path, PathBuf};
use std::time::Duration;

mod common;

use clap::Parser;
use loadgen::summary::Percentiles;
use loadgen::{report, Cli, Summary};
use serde_json::Value;

use common::{start_chorus, SECRET};

/// The latency distributions of a summary, by their JSON names.
const LATENCIES: [&str; 4] = ["delivery", "delivery_from_send", "ack", "connect"];

/// The fields of one latency distribution in the JSON file.
const PERCENTILE_FIELDS: [&str; 9] =
    ["count", "min_us", "mean_us", "p50_us", "p90_us", "p99_us", "p999_us", "p9999_us", "max_us"];

/// A chorus server on a free loopback port, with a rate limit far above
/// what the scenarios send.
async fn start_server() -> chorus::Server {
    start_server_with(&[]).await
}

/// [`start_server`] with more `chorus serve` options.
async fn start_server_with(extra: &[&str]) -> chorus::Server {
    start_chorus("100000", "100000", extra).await
}

/// A file in the temporary directory, unique to this process and name,
/// removed when dropped.
struct TempFile(PathBuf);

impl TempFile {
    fn new(name: &str) -> Self {
        let path = std::env::temp_dir().join(format!("loadgen-against-chorus-{}-{name}", std::process::id()));
        let _ = std::fs::remove_file(&path);
        Self(path)
    }

    fn path(&self) -> &Path {
        &self.0
    }

    fn arg(&self) -> &str {
        self.0.to_str().expect("temporary path is UTF-8")
    }
}

impl Drop for TempFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// Run loadgen as the command does: parse the words (plus the server's URL,
/// the secret, one source address, `--quiet` and `--json`), run, then write
/// `--json` and `--report` from the options.
async fn run_loadgen(server: &chorus::Server, json: &TempFile, words: &[&str]) -> Summary {
    let url = format!("ws://{}", server.local_addr());
    let mut argv = vec!["loadgen"];
    argv.extend_from_slice(words);
    argv.extend(["--quiet", "--url", &url, "--jwt-secret", SECRET, "--source-ips", "1", "--json", json.arg()]);
    let cli = Cli::try_parse_from(&argv).expect("loadgen options");
    let json_path = cli.common.json.clone().expect("--json was given");
    let report_path = cli.common.report.clone();
    let summary = loadgen::run(cli).await.unwrap_or_else(|e| panic!("loadgen {words:?} could not run: {e:#}"));
    // Shown when the test fails.
    eprintln!("{}", report::table(&summary));
    report::write_json(&summary, &json_path).expect("write --json");
    if let Some(path) = report_path {
        report::write_report(&summary, &path).expect("write --report");
    }
    summary
}

/// Every planned connection (and join) succeeded, nothing went wrong.
fn assert_clean(s: &Summary, connections: u64, joins: u64) {
    assert!(s.ok, "problems: {:?}", s.problems);
    assert!(s.problems.is_empty(), "problems: {:?}", s.problems);
    assert!(s.events.is_empty(), "events (errors, closes, failures): {:?}", s.events);

    let c = &s.connections;
    assert_eq!(c.planned, connections, "planned connections");
    assert_eq!(c.established, connections, "established connections");
    assert_eq!(c.failed, 0, "failed connections");
    assert_eq!(c.open_at_end, connections, "connections still open when loadgen began closing");
    assert!(c.per_second.is_finite() && c.per_second > 0.0, "connections per second: {}", c.per_second);
    assert_eq!(s.latency.connect.count, connections, "one connect latency per connection");
    assert_percentiles("connect", &s.latency.connect);
    assert_curve("connect", &s.curves.connect);

    let j = &s.joins;
    assert_eq!(j.planned, joins, "planned joins");
    assert_eq!(j.joined, joins, "joins confirmed");
    assert_eq!(j.failed, 0, "joins refused");
    assert_eq!(j.timed_out, 0, "joins unanswered");
}

/// Every scheduled message was sent and acked, and every acked message
/// reached every member of its room once, in seq order.
fn assert_every_delivery(s: &Summary, scheduled: u64, members_per_room: u64) {
    let m = &s.messages;
    assert_eq!(m.sent, scheduled, "messages sent (the schedule's count)");
    assert_eq!(m.acked, m.sent, "messages acked");
    assert_eq!(m.unacked, 0, "messages never acked");
    assert_eq!(m.expected, m.acked * members_per_room, "expected = acked x members of the room");
    assert_eq!(m.delivered, m.expected, "received == expected");
    assert_eq!((m.missing, m.extra), (0, 0), "missing and extra deliveries");
    assert_eq!((m.gaps, m.gap_seqs), (0, 0), "seq gaps");
    assert_eq!(m.duplicates, 0, "duplicate deliveries");
    assert_eq!(m.reorders, 0, "reordered deliveries");
    assert_eq!(m.foreign, 0, "foreign messages");
    assert!(
        m.sent_per_s > 0.0 && m.delivered_per_s > 0.0,
        "rates: {} sent/s, {} delivered/s",
        m.sent_per_s,
        m.delivered_per_s
    );

    let l = &s.latency;
    assert_eq!(l.delivery.count, m.delivered, "one delivery latency per delivery");
    assert_eq!(l.delivery_from_send.count, m.delivered, "one delivery-from-send latency per delivery");
    assert_eq!(l.ack.count, m.acked, "one ack latency per ack");
    assert_percentiles("delivery", &l.delivery);
    assert_percentiles("delivery_from_send", &l.delivery_from_send);
    assert_percentiles("ack", &l.ack);
    assert_curve("delivery", &s.curves.delivery);
    assert_curve("delivery_from_send", &s.curves.delivery_from_send);
    assert_curve("ack", &s.curves.ack);

    let p = &s.phases;
    assert!(p.send_s > 0.0 && p.drain_s > 0.0 && p.hold_s == 0.0, "phases: {p:?}");
}

/// A distribution with samples: finite, positive and ordered.
fn assert_percentiles(name: &str, p: &Percentiles) {
    assert!(p.count > 0, "{name}: no samples");
    let ordered = [p.min_us, p.p50_us, p.p90_us, p.p99_us, p.p999_us, p.p9999_us, p.max_us];
    assert!(ordered.iter().chain([&p.mean_us]).all(|v| v.is_finite() && *v > 0.0), "{name}: {p:?}");
    assert!(ordered.windows(2).all(|w| w[0] <= w[1]), "{name}: percentiles out of order: {p:?}");
    assert!(p.min_us <= p.mean_us && p.mean_us <= p.max_us, "{name}: mean outside [min, max]: {p:?}");
}

/// A percentile curve from 0% to 100%, rising.
fn assert_curve(name: &str, c: &[[f64; 2]]) {
    assert_eq!(c.first().map(|p| p[0]), Some(0.0), "{name}: curve starts at 0%");
    assert_eq!(c.last().map(|p| p[0]), Some(100.0), "{name}: curve ends at 100%");
    assert!(c.windows(2).all(|w| w[0][0] <= w[1][0] && w[0][1] <= w[1][1]), "{name}: curve not rising");
}

/// The `--json` file: every figure under its documented name, a number
/// where it should be one, the secret left out, and the same figures as
/// the summary `run` returned. Returns the parsed document.
fn check_json(path: &Path, s: &Summary) -> Value {
    let text = std::fs::read_to_string(path).expect("read the --json file");
    assert!(!text.contains(SECRET), "the JWT secret leaked into the JSON file");
    let v: Value = serde_json::from_str(&text).expect("the --json file is JSON");

    assert_eq!(v["scenario"], s.scenario.as_str());
    assert_eq!(v["ok"], true);
    for lat in LATENCIES {
        for field in PERCENTILE_FIELDS {
            let x = &v["latency"][lat][field];
            assert!(x.as_f64().is_some_and(f64::is_finite), "latency.{lat}.{field} is {x}");
        }
        assert!(v["curves"][lat].is_array(), "curves.{lat} is {}", v["curves"][lat]);
        // The histogram itself, decoded, holds as many samples as the table says.
        let encoded = v["histograms"][lat].as_str().expect("histograms.{lat} is a string");
        let h = loadgen::histo::decode(encoded).unwrap_or_else(|e| panic!("histograms.{lat}: {e}"));
        assert_eq!(h.len(), v["latency"][lat]["count"].as_u64().unwrap_or(u64::MAX), "histograms.{lat}");
    }
    let rooms = v["rooms"].as_array().expect("rooms");
    let delivered: u64 = rooms.iter().map(|r| r["delivered"].as_u64().unwrap_or(0)).sum();
    assert_eq!(delivered, s.messages.delivered, "per-room deliveries add up");
    for field in ["planned", "established", "failed", "open_at_end"] {
        let x = &v["connections"][field];
        assert!(x.is_u64(), "connections.{field} is {x}");
    }
    assert!(v["connections"]["per_second"].as_f64().is_some_and(|r| r > 0.0));
    for field in ["planned", "joined", "failed", "timed_out"] {
        assert!(v["joins"][field].is_u64(), "joins.{field} is {}", v["joins"][field]);
    }
    for field in [
        "sent",
        "acked",
        "unacked",
        "delivered",
        "expected",
        "missing",
        "extra",
        "gaps",
        "gap_seqs",
        "duplicates",
        "reorders",
        "foreign",
    ] {
        assert!(v["messages"][field].is_u64(), "messages.{field} is {}", v["messages"][field]);
    }
    assert_eq!(v["messages"]["delivered"], v["messages"]["expected"], "delivered == expected in the file");
    assert_eq!(v["connections"]["established"], v["connections"]["planned"]);
    assert_eq!(v["params"]["scenario"]["scenario"], s.scenario.as_str(), "the options are recorded");
    assert!(v["params"]["common"].get("jwt_secret").is_none(), "the secret is not among the options");

    // It reads back as a Summary, and holds what run() returned.
    let back: Summary = serde_json::from_str(&text).expect("the --json file reads back as a Summary");
    assert_eq!(back.messages.delivered, s.messages.delivered);
    assert_eq!(back.latency.delivery.count, s.latency.delivery.count);
    let returned = serde_json::to_value(s).expect("serialize the summary");
    same_figures(&returned, &v, "$");
    v
}

/// `a` and `b` hold the same document; floats may differ in the last bits
/// after a trip through text.
fn same_figures(a: &Value, b: &Value, at: &str) {
    match (a, b) {
        (Value::Number(x), Value::Number(y)) => match (x.as_u64(), y.as_u64()) {
            (Some(x), Some(y)) => assert_eq!(x, y, "{at}"),
            _ => {
                let (x, y) = (x.as_f64().unwrap_or(f64::NAN), y.as_f64().unwrap_or(f64::NAN));
                assert!((x - y).abs() <= 1e-9 * x.abs().max(y.abs()).max(1.0), "{at}: {x} != {y}");
            }
        },
        (Value::Object(x), Value::Object(y)) => {
            assert_eq!(x.keys().collect::<Vec<_>>(), y.keys().collect::<Vec<_>>(), "{at}: fields");
            for (k, xv) in x {
                same_figures(xv, &y[k], &format!("{at}.{k}"));
            }
        }
        (Value::Array(x), Value::Array(y)) => {
            assert_eq!(x.len(), y.len(), "{at}: length");
            for (i, (xv, yv)) in x.iter().zip(y).enumerate() {
                same_figures(xv, yv, &format!("{at}[{i}]"));
            }
        }
        _ => assert_eq!(a, b, "{at}"),
    }
}

/// 2 rooms x 20 members, 2 publishers (one per room) at 200 msg/s in total
/// for 2 s: 400 messages, each due at 20 members, 8,000 deliveries.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fanout_delivers_every_message_to_every_member() {
    let server = start_server().await;
    let json = TempFile::new("fanout.json");
    let html = TempFile::new("fanout.html");
    let s = run_loadgen(
        &server,
        &json,
        &[
            "fanout",
            "--rooms",
            "2",
            "--members",
            "20",
            "--room-prefix",
            "it-fanout",
            "--publishers",
            "2",
            "--rate",
            "200",
            "--payload",
            "200",
            "--duration",
            "2s",
            "--drain",
            "3s",
            "--report",
            html.arg(),
        ],
    )
    .await;
    server.shutdown(Duration::from_secs(5)).await;

    assert_eq!(s.scenario, "fanout");
    assert_clean(&s, 2 * 20 + 2, 2 * 20);
    // Each publisher: 100/s for 2 s, the last one due before the end.
    assert_every_delivery(&s, 400, 20);
    assert!(!s.timeline.is_empty(), "no timeline over a run of several seconds");
    assert!(s.server.is_none(), "no --server-pid, no server figures");

    let v = check_json(json.path(), &s);
    assert_eq!(v["messages"]["expected"], 8000);
    assert_eq!(v["messages"]["delivered"], 8000);
    assert_eq!(v["connections"]["established"], 42);

    let page = std::fs::read_to_string(html.path()).expect("read the --report file");
    assert!(page.contains("<svg") && page.trim_end().ends_with("</html>"), "the report is an HTML page with plots");
}

/// `--presence --churn`: 2 rooms x 10 presence subscribers take 400
/// messages while members leave, stay out 300 ms (`--churn-away`) and
/// rejoin, 20 times a second. Each rejoin carries `since`, so every acked
/// message still reaches every member once, in order, the ones published
/// while it was out replayed; every leave is rejoined and recovered; each
/// rejoin gets a fresh `presence_state`; the server's CPU per
/// churn event is measured (this test process is the server).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fanout_with_presence_churn_keeps_every_delivery() {
    let server = start_server().await;
    let json = TempFile::new("churn.json");
    let pid = std::process::id().to_string();
    let s = run_loadgen(
        &server,
        &json,
        &[
            "fanout",
            "--rooms",
            "2",
            "--members",
            "10",
            "--room-prefix",
            "it-churn",
            "--publishers",
            "2",
            "--rate",
            "200",
            "--duration",
            "2s",
            "--drain",
            "2s",
            "--presence",
            "--churn",
            "20",
            "--churn-away",
            "300ms",
            "--server-pid",
            &pid,
            "--settle",
            "100ms",
        ],
    )
    .await;
    server.shutdown(Duration::from_secs(5)).await;

    assert_clean(&s, 2 * 10 + 2, 2 * 10);
    assert_every_delivery(&s, 400, 10);

    let c = s.churn.as_ref().expect("churn figures with --churn");
    assert_eq!(c.rate, 20.0);
    // 20/s for 2 s, give or take the ends (members busy rejoining are
    // passed over, and counted).
    assert!((30..=41).contains(&(c.leaves + c.skipped)), "churn events: {c:?}");
    assert!(c.leaves >= 30, "leaves: {c:?}");
    assert_eq!(c.rejoins, c.leaves, "every leave rejoined: {c:?}");
    assert_eq!((c.unrecovered, c.failed), (0, 0), "{c:?}");
    assert!(c.presence_states >= c.rejoins, "a fresh state per rejoin: {c:?}");
    assert_eq!(c.presence_frames, c.presence_states + c.presence_diffs);
    // Out for 300 ms, longer than a presence round (100 ms): each leave
    // reaches the room's 9 other subscribers as a diff before the rejoin,
    // and a round carries few leaves at 10 a second per room.
    assert!(c.presence_diffs >= c.leaves, "the others saw the leaves as diffs: {c:?}");
    assert_eq!(c.away_s, 0.3);
    assert!(c.presence_frames_per_subscriber > 0.0);
    assert!(c.server_cpu_us_per_churn.is_some_and(|us| us.is_finite() && us >= 0.0), "{c:?}");
    let p = s.presence.as_ref().expect("presence figures with --presence");
    assert!(p.frames >= c.presence_frames && p.states >= 20 + c.rejoins, "{p:?} {c:?}");
    assert_eq!(p.frames, p.states + p.diffs);

    let v = check_json(json.path(), &s);
    for field in ["leaves", "rejoins", "unrecovered", "failed", "skipped", "presence_frames", "presence_diffs"] {
        assert!(v["churn"][field].is_u64(), "churn.{field} is {}", v["churn"][field]);
    }
    assert!(report::table(&s).contains("churn"), "the table has a churn line");
}

/// `idle --presence --churn`: churn with nothing sent, during the hold
/// phase (the other timing the engine has): 30 users in one room, 20
/// leaves and rejoins a second for 1.5 s, each rejoin answered, the
/// presence frames of that phase counted apart from the join storm's.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_with_presence_churn_rejoins_every_member() {
    let server = start_server().await;
    let json = TempFile::new("idle-churn.json");
    let pid = std::process::id().to_string();
    let s = run_loadgen(
        &server,
        &json,
        &[
            "idle",
            "--connections",
            "30",
            "--per-room",
            "30",
            "--room-prefix",
            "it-idle-churn",
            "--duration",
            "1500ms",
            "--presence",
            "--churn",
            "20",
            "--server-pid",
            &pid,
            "--settle",
            "100ms",
        ],
    )
    .await;
    server.shutdown(Duration::from_secs(5)).await;

    assert_clean(&s, 30, 30);
    assert_eq!((s.messages.sent, s.messages.delivered), (0, 0));
    let c = s.churn.as_ref().expect("churn figures with --churn");
    assert!(c.leaves >= 20 && c.leaves + c.skipped <= 31, "churn events: {c:?}");
    assert_eq!((c.rejoins, c.unrecovered, c.failed), (c.leaves, 0, 0), "{c:?}");
    assert!(c.presence_states >= c.rejoins && c.presence_frames == c.presence_states + c.presence_diffs, "{c:?}");
    assert!(c.server_cpu_us_per_churn.is_some_and(|us| us.is_finite() && us >= 0.0), "{c:?}");
    let p = s.presence.as_ref().expect("presence figures");
    assert_eq!(p.complete, 30, "every subscriber saw the whole room: {p:?}");
    // The join storm's frames are not in the churn's.
    assert!(p.frames >= c.presence_frames + 30, "{p:?} {c:?}");
    let v = check_json(json.path(), &s);
    assert_eq!(v["churn"]["rejoins"], v["churn"]["leaves"]);
}

/// `--compression` on both sides: every member negotiates permessage-deflate,
/// inflates what the server compressed (the seq and marker checks read the
/// inflated JSON), and the report counts the bytes on the wire.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fanout_with_compression_inflates_every_delivery() {
    let server = start_server_with(&["--compression"]).await;
    let json = TempFile::new("fanout-deflate.json");
    let s = run_loadgen(
        &server,
        &json,
        &[
            "fanout",
            "--rooms",
            "1",
            "--members",
            "20",
            "--room-prefix",
            "it-deflate",
            "--publishers",
            "1",
            "--rate",
            "100",
            "--payload",
            "300",
            "--duration",
            "1s",
            "--drain",
            "2s",
            "--compression",
        ],
    )
    .await;
    server.shutdown(Duration::from_secs(5)).await;
    assert_clean(&s, 20 + 1, 20);
    assert_every_delivery(&s, 100, 20);
    assert!(s.wire.compression_offered);
    assert!(s.wire.compressed_connections >= 21, "{:?}", s.wire);
    assert!(s.wire.bytes_in > 0 && s.wire.bytes_in_per_delivery > 0.0, "{:?}", s.wire);
    let v = check_json(json.path(), &s);
    assert_eq!(v["wire"]["compression_offered"], true);
}

/// 3 rooms x 4 members, each member in 2 rooms (so 8 members per room)
/// sending 4 msg/s for 1 s: 48 messages, 384 deliveries, the sender's own
/// message included.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chat_delivers_every_message_to_every_member() {
    let server = start_server().await;
    let json = TempFile::new("chat.json");
    let s = run_loadgen(
        &server,
        &json,
        &[
            "chat",
            "--rooms",
            "3",
            "--members",
            "4",
            "--room-prefix",
            "it-chat",
            "--rooms-per-user",
            "2",
            "--rate-per-user",
            "4",
            "--duration",
            "1s",
            "--drain",
            "3s",
        ],
    )
    .await;
    server.shutdown(Duration::from_secs(5)).await;

    assert_eq!(s.scenario, "chat");
    assert_clean(&s, 12, 24);
    assert_every_delivery(&s, 48, 8);
    let v = check_json(json.path(), &s);
    assert_eq!(v["messages"]["delivered"], 384);
}

/// `connect` then `idle` against one server, two runs in one process (and,
/// under `cargo test`, beside the other tests' runs): a connection storm,
/// then connections joined and held, measuring this process as the server.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connect_and_idle_run_one_after_the_other() {
    let server = start_server().await;

    let json = TempFile::new("connect.json");
    let s = run_loadgen(&server, &json, &["connect", "--connections", "20", "--duration", "0s"]).await;
    assert_eq!(s.scenario, "connect");
    assert_clean(&s, 20, 0);
    assert_eq!((s.messages.sent, s.messages.expected, s.messages.delivered), (0, 0, 0));
    assert_eq!(s.latency.delivery.count, 0);
    check_json(json.path(), &s);

    let pid = std::process::id().to_string();
    let json = TempFile::new("idle.json");
    let s = run_loadgen(
        &server,
        &json,
        &[
            "idle",
            "--connections",
            "20",
            "--per-room",
            "10",
            "--room-prefix",
            "it-idle",
            "--duration",
            "1s",
            "--server-pid",
            &pid,
            "--settle",
            "100ms",
        ],
    )
    .await;
    server.shutdown(Duration::from_secs(5)).await;

    assert_eq!(s.scenario, "idle");
    assert_clean(&s, 20, 20);
    assert_eq!((s.messages.sent, s.messages.delivered), (0, 0));
    assert!(s.phases.hold_s > 0.0 && s.phases.send_s == 0.0, "phases: {:?}", s.phases);
    let sv = s.server.as_ref().expect("server figures with --server-pid");
    assert_eq!(sv.pids, vec![std::process::id()]);
    assert!(sv.rss_before_bytes.is_some_and(|b| b > 0), "rss before: {:?}", sv.rss_before_bytes);
    assert!(sv.rss_connected_bytes.is_some_and(|b| b > 0), "rss connected: {:?}", sv.rss_connected_bytes);
    assert!(sv.bytes_per_connection.is_some_and(f64::is_finite), "bytes per connection: {:?}", sv.bytes_per_connection);
    assert!(sv.cpu_s_connect.is_some_and(|c| c >= 0.0), "cpu while connecting: {:?}", sv.cpu_s_connect);
    let v = check_json(json.path(), &s);
    assert!(v["server"]["rss_connected_bytes"].is_u64());
    assert!(v["server"]["bytes_per_connection"].is_f64());
}

/// `loadgen --version` names the commit of this checkout (a prefix of
/// `git rev-parse HEAD`), or `unknown` where git cannot tell.
#[test]
fn version_names_the_commit_it_was_built_from() {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_loadgen")).arg("--version").output().expect("run loadgen");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let stdout = String::from_utf8(out.stdout).unwrap();
    let rest = stdout
        .trim_end()
        .strip_prefix(&format!("loadgen {} (commit ", env!("CARGO_PKG_VERSION")))
        .and_then(|rest| rest.strip_suffix(')'))
        .unwrap_or_else(|| panic!("loadgen --version printed {stdout:?}"));
    let (commit, state) = rest.split_once(", ").unwrap_or((rest, "unknown"));
    assert!(["clean", "dirty", "unknown"].contains(&state), "{stdout:?}");
    let head = std::process::Command::new("git")
        .args(["rev-parse", "HEAD"])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .ok()
        .filter(|out| out.status.success())
        .map(|out| String::from_utf8(out.stdout).unwrap().trim().to_owned());
    match head {
        Some(head) => assert!(commit.len() >= 7 && head.starts_with(commit), "{stdout:?}, checkout at {head}"),
        None => assert_eq!(commit, "unknown", "{stdout:?}"),
    }
}

/// The fanout over `wss://`: chorus with a certificate made now, loadgen
/// trusting it with `--tls-ca`; every message reaches every member.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fanout_over_wss_with_a_trusted_certificate() {
    let made = rcgen::generate_simple_self_signed(vec!["localhost".to_owned()]).expect("certificate");
    let cert = TempFile::new("tls-cert.pem");
    let key = TempFile::new("tls-key.pem");
    std::fs::write(cert.path(), made.cert.pem()).unwrap();
    std::fs::write(key.path(), made.signing_key.serialize_pem()).unwrap();
    // chorus's default rate limit (100 frames/s, burst 200).
    let server = start_chorus("100", "200", &["--tls-cert", cert.arg(), "--tls-key", key.arg()]).await;
    let url = format!("wss://localhost:{}", server.local_addr().port());
    let json = TempFile::new("wss.json");
    let words = [
        "loadgen",
        "fanout",
        "--rooms",
        "1",
        "--members",
        "10",
        "--room-prefix",
        "it-wss",
        "--publishers",
        "1",
        "--rate",
        "50",
        "--duration",
        "1s",
        "--drain",
        "2s",
        "--quiet",
        "--url",
        &url,
        "--jwt-secret",
        SECRET,
        "--source-ips",
        "1",
        "--json",
        json.arg(),
    ];
    // Without the certificate to trust, wss:// is refused before anything runs.
    let untrusting = Cli::try_parse_from(words).expect("loadgen options");
    let refused = loadgen::run(untrusting).await;
    match &refused {
        Ok(s) => assert_eq!(s.connections.established, 0, "connected without --tls-ca"),
        Err(e) => {
            let why = format!("{e:#}").to_lowercase();
            assert!(why.contains("certificate") || why.contains("tls"), "refused for another reason: {why}");
        }
    }

    let mut argv = words.to_vec();
    argv.extend(["--tls-ca", cert.arg()]);
    let s = loadgen::run(Cli::try_parse_from(&argv).expect("loadgen options")).await.expect("loadgen runs");
    eprintln!("{}", report::table(&s));
    server.shutdown(Duration::from_secs(5)).await;
    assert_clean(&s, 10 + 1, 10);
    assert_every_delivery(&s, 50, 10);
}
