//! The JavaScript client (clients/js) and the chat page (clients/chat, in
//! headless Chromium) under node's built-in test runner, against real chorus
//! processes.
//!
//! Why a Rust test: `cargo nextest run` (and so scripts/test and CI) runs it
//! with the binary cargo just built. The node tests start, kill and restart
//! that binary themselves (CHORUS_BIN), because recovery after a restart is
//! what they check; this test gives them a PostgreSQL database of their own
//! (CHORUS_TEST_DATABASE_URL) and fails with node's report when any fails.

mod common;
#[path = "common/test_db.rs"]
mod test_db;

use std::path::Path;
use std::process::Stdio;
use std::time::Duration;

use test_db::TestDb;
use tokio::process::Command;

/// The whole node run: a few restarts, a token that must outlive its expiry.
const NODE_GUARD: Duration = Duration::from_secs(180);

/// The arguments that give node a global `WebSocket` (built in from node 22,
/// behind a flag in node 20 and 21).
async fn websocket_flag() -> Vec<&'static str> {
    let probe = Command::new("node")
        .args(["-e", "process.exit(typeof WebSocket === 'function' ? 0 : 1)"])
        .status()
        .await
        .expect("node is needed for the JavaScript client's tests (scripts/test checks for it)");
    if probe.success() {
        vec![]
    } else {
        vec!["--experimental-websocket"]
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_javascript_client_passes_its_tests_against_a_real_server() {
    run_node_tests("clients/js/test", 16).await;
}

/// The chat page in headless Chromium (installed by scripts/setup-close-clients).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_chat_page_works_in_a_real_chromium() {
    let chromium = std::env::var("CHORUS_TEST_CHROMIUM").unwrap_or_else(|_| "/usr/bin/chromium".into());
    assert!(Path::new(&chromium).exists(), "no Chromium at {chromium}: run scripts/setup-close-clients");
    run_node_tests("clients/chat/test", 3).await;
}

/// Runs every `*.test.mjs` of `dir` under `node --test` with a database of
/// their own; fails with node's report unless all pass and at least
/// `min_passed` ran (a file that skipped everything must not look green).
async fn run_node_tests(dir: &str, min_passed: usize) {
    let db = TestDb::create("js").await;

    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join(dir);
    let mut files: Vec<String> = std::fs::read_dir(&dir)
        .unwrap()
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.to_string_lossy().ends_with(".test.mjs"))
        .map(|p| p.to_string_lossy().into_owned())
        .collect();
    files.sort();
    assert!(!files.is_empty(), "no tests in {}", dir.display());

    let mut args = websocket_flag().await;
    args.push("--test");
    let run = Command::new("node")
        .args(&args)
        .args(&files)
        .env("CHORUS_BIN", env!("CARGO_BIN_EXE_chorus"))
        .env("CHORUS_TEST_DATABASE_URL", &db.url)
        .stdin(Stdio::null())
        .kill_on_drop(true)
        .output();
    let output = tokio::time::timeout(NODE_GUARD, run).await;
    db.drop().await;
    let output = output.expect("node's tests took too long").expect("cannot run node");
    let report = String::from_utf8_lossy(&output.stdout);
    assert!(output.status.success(), "node --test failed:\n{report}\n{}", String::from_utf8_lossy(&output.stderr));
    assert!(report.contains("# fail 0"), "{report}");
    let passed: usize =
        report.lines().find_map(|l| l.strip_prefix("# pass ")).and_then(|n| n.trim().parse().ok()).unwrap_or(0);
    assert!(passed >= min_passed, "only {passed} node tests passed:\n{report}");
}
