//! The close matrix: every close the server can send, provoked against real
//! client libraries, and the code and reason each one hands its application.
//!
//! Why: applications decide what to do after a disconnect from the close
//! code (docs/OPERATIONS.md), so every client must see the code the server
//! sent, not a 1006 because it never read the close frame. One row per close
//! (4001 included: the admin API's disconnect), one column per client:
//! headless Chromium driving a page's `WebSocket`, Python `websockets`, Node
//! `ws`. Each client is a driver script in tests/close_clients that plays
//! every case at once against real servers and prints what it was told.
//!
//! The clients are installed by scripts/setup-close-clients (scripts/test
//! runs it): a test that cannot find them fails and says so.

mod common;
#[path = "common/tamper.rs"]
mod tamper;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use tokio::process::Command;

use common::*;
use tamper::{TamperProxy, MARK_BAD_UTF8, MARK_RESERVED_BIT};

/// What one driver may take at most: the cases run at once, the slowest is
/// the stalled reader (a few seconds).
const DRIVER_GUARD: Duration = Duration::from_secs(90);

/// How long a slow consumer stops reading: long enough for the server to
/// fill its socket and queue on a busy machine and cut it.
const STALL_MS: u64 = 8000;

/// A client library and how to run its driver.
struct ClientKind {
    name: &'static str,
    column: &'static str,
    program: PathBuf,
    script: &'static str,
}

fn clients_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/close_clients")
}

/// The three clients, or a panic naming what is missing and how to get it.
fn client_kinds() -> Vec<ClientKind> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let python = std::env::var_os("CHORUS_TEST_PYTHON")
        .map(PathBuf::from)
        .unwrap_or_else(|| root.join("target/close-clients/venv/bin/python"));
    let chromium = std::env::var_os("CHORUS_TEST_CHROMIUM")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/usr/bin/chromium"));
    let mut missing = Vec::new();
    if !python.exists() {
        missing.push(format!("a Python with websockets at {}", python.display()));
    }
    if !clients_dir().join("node_modules/ws/package.json").exists() {
        missing.push("the ws package in tests/close_clients/node_modules".to_owned());
    }
    if !chromium.exists() {
        missing.push(format!("Chromium at {}", chromium.display()));
    }
    assert!(
        missing.is_empty(),
        "the close matrix needs {}: run scripts/setup-close-clients (scripts/test runs it)",
        missing.join(", ")
    );
    vec![
        ClientKind {
            name: "chromium",
            column: "Chromium (page WebSocket)",
            program: "node".into(),
            script: "chromium.mjs",
        },
        ClientKind { name: "python", column: "Python websockets", program: python, script: "python_websockets.py" },
        ClientKind { name: "node", column: "Node ws", program: "node".into(), script: "node_ws.mjs" },
    ]
}

/// One row: the close, how a client provokes it, what the server sends.
struct Row {
    name: &'static str,
    expect: (u16, &'static str),
    /// The case given to every driver, less its URL.
    case: Value,
    url: Box<dyn Fn(&str) -> String>,
}

/// The servers the rows need: most share one, a ping timeout and a
/// shutdown close every connection of theirs, and the admin API's
/// disconnect needs an admin listener.
struct Servers {
    main: TestServer,
    pings: TestServer,
    shutdown: TestServer,
    admin: TestServer,
    proxy: TamperProxy,
}

impl Servers {
    async fn start() -> Self {
        // A low rate limit makes a flood a few dozen frames; a short send
        // queue makes a stalled reader slow soon.
        let main = TestServer::start(&["--rate", "10", "--burst", "20", "--send-queue", "8"]).await;
        // Never a server ping, so a silent client stays silent until the timeout.
        let pings = TestServer::start(&["--ping-interval", "1h", "--ping-timeout", "1s"]).await;
        let shutdown = TestServer::start(&[]).await;
        let admin = TestServer::start(&["--admin-listen", "127.0.0.1:0"]).await;
        let proxy = TamperProxy::start(main.addr).await;
        Self { main, pings, shutdown, admin, proxy }
    }

    fn rows(&self) -> Vec<Row> {
        let long = token("matrix", None, 3600);
        // Valid when the clients connect (Chromium takes a moment to start),
        // expired a few seconds later.
        let short = sign(&json!({"sub": "matrix", "exp": unix_now() + 10}));
        let at = |base: String, token: &str| {
            let token = token.to_owned();
            Box::new(move |_client: &str| format!("{base}/ws?token={token}")) as Box<dyn Fn(&str) -> String>
        };
        let main = self.main.ws_url("");
        let proxied = self.proxy.ws_url("");
        let slow = {
            let (main, long) = (main.clone(), long.clone());
            Box::new(move |client: &str| format!("{main}/ws/slow-{client}?token={long}")) as Box<dyn Fn(&str) -> String>
        };
        let big = |bytes: usize| json!({"do": "big", "bytes": bytes});
        // Each client is its own user on the admin server, disconnected by name.
        let evicted = {
            let base = self.admin.ws_url("");
            Box::new(move |client: &str| format!("{base}/ws?token={}", token(&evicted_sub(client), None, 3600)))
                as Box<dyn Fn(&str) -> String>
        };
        vec![
            Row {
                name: "1000 echoed",
                expect: (1000, ""),
                case: json!({"do": "close", "code": 1000, "reason": "bye"}),
                url: at(main.clone(), &long),
            },
            Row {
                name: "1001 shutdown",
                expect: (1001, "going away"),
                case: json!({"do": "wait"}),
                url: at(self.shutdown.ws_url(""), &long),
            },
            Row {
                name: "1002 protocol error",
                expect: (1002, "reserved bits set"),
                case: json!({"do": "send", "text": MARK_RESERVED_BIT}),
                url: at(proxied.clone(), &long),
            },
            Row {
                name: "1007 bad UTF-8",
                expect: (1007, "invalid utf-8"),
                case: json!({"do": "send", "text": MARK_BAD_UTF8}),
                url: at(proxied, &long),
            },
            Row {
                name: "1008 token expired",
                expect: (1008, "token expired"),
                case: json!({"do": "wait"}),
                url: at(main.clone(), &short),
            },
            Row {
                name: "1008 ping timeout",
                expect: (1008, "ping timeout"),
                case: json!({"do": "wait"}),
                url: at(self.pings.ws_url(""), &long),
            },
            Row {
                name: "1008 flooding",
                expect: (1008, "flooding"),
                case: json!({"do": "flood", "count": 200}),
                url: at(main.clone(), &long),
            },
            Row {
                name: "1009 too large (70 KB)",
                expect: (1009, "message too large"),
                case: big(70_000),
                url: at(main.clone(), &long),
            },
            Row {
                name: "1009 too large (8 MB)",
                expect: (1009, "message too large"),
                case: big(8_000_000),
                url: at(main, &long),
            },
            Row {
                name: "1013 slow consumer",
                expect: (1013, "slow consumer"),
                case: json!({"do": "stall", "ms": STALL_MS}),
                url: slow,
            },
            Row {
                name: "4001 disconnected by the admin API",
                expect: (4001, "disconnected"),
                case: json!({"do": "wait"}),
                url: evicted,
            },
        ]
    }
}

/// The spec file a driver reads: every row's case with its URL.
fn spec(rows: &[Row], client: &str) -> Value {
    let cases: Vec<Value> = rows
        .iter()
        .map(|row| {
            let mut case = row.case.clone();
            case["name"] = json!(row.name);
            case["url"] = json!((row.url)(client));
            case
        })
        .collect();
    json!({"timeout_ms": 30_000, "cases": cases})
}

/// Runs one driver to its end: its results by case name.
async fn run_driver(kind: &ClientKind, spec_path: PathBuf) -> Result<BTreeMap<String, Value>, String> {
    let mut command = Command::new(&kind.program);
    command
        .arg(clients_dir().join(kind.script))
        .arg(&spec_path)
        .current_dir(clients_dir())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    let child = command.spawn().map_err(|e| format!("cannot start {}: {e}", kind.program.display()))?;
    let output = tokio::time::timeout(DRIVER_GUARD, child.wait_with_output())
        .await
        .map_err(|_| format!("{} did not finish in {DRIVER_GUARD:?}", kind.script))?
        .map_err(|e| e.to_string())?;
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    let Some(line) = stdout.lines().find_map(|line| line.strip_prefix("RESULTS ")) else {
        return Err(format!("{} printed no results ({}):\n{stdout}\n{stderr}", kind.script, output.status));
    };
    let results: Vec<Value> = serde_json::from_str(line).map_err(|e| format!("{}: {e}: {line}", kind.script))?;
    Ok(results.into_iter().map(|r| (r["case"].as_str().unwrap_or_default().to_owned(), r)).collect())
}

/// Sends SIGTERM to the shutdown server once every client is connected to it.
async fn shut_down_when_connected(server: &TestServer, clients: usize) {
    let deadline = Instant::now() + DRIVER_GUARD / 2;
    while server.metric("chorus_connections").await < clients as f64 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    server.sigterm();
}

/// The user a client plays on the admin server.
fn evicted_sub(client: &str) -> String {
    format!("evicted-{client}")
}

/// Disconnects each client's user through the admin API once every client
/// is connected to the admin server.
async fn disconnect_when_connected(server: &TestServer, clients: &[&str]) {
    let deadline = Instant::now() + DRIVER_GUARD / 2;
    while server.metric("chorus_connections").await < clients.len() as f64 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let http = http_client();
    for client in clients {
        let url = server.admin_url(&format!("/admin/users/{}/disconnect", evicted_sub(client)));
        let response = http.post(url).send().await.expect("the admin API answers");
        assert_eq!(response.status(), 200);
    }
}

/// Publishes 30 KB messages to every client's slow room in turn until the
/// server has cut each of them as a slow consumer (or time is up: the cells
/// then show what the clients saw).
async fn flood_slow_rooms(server: &TestServer, clients: &[&str]) {
    let http = http_client();
    let publisher = token("flood", None, 3600);
    let body = json!({"body": {"pad": "x".repeat(30_000)}}).to_string();
    let started = Instant::now();
    let deadline = started + Duration::from_millis(STALL_MS) + GUARD;
    for round in 0u64.. {
        for client in clients {
            let response = http
                .post(server.url(&format!("/rooms/slow-{client}/messages")))
                .bearer_auth(&publisher)
                .header("content-type", "application/json")
                .body(body.clone())
                .send()
                .await
                .expect("publish to a slow room");
            assert_eq!(response.status(), 200);
        }
        if round % 5 == 0 {
            let cut = server.metric("chorus_slow_consumers_total").await;
            if cut >= clients.len() as f64 || Instant::now() > deadline {
                let took = started.elapsed().as_secs_f64();
                println!("slow rooms: {cut} cut after {} rounds of 30 KB messages, {took:.1} s", round + 1);
                return;
            }
        }
    }
}

/// One cell of the table: what the client said, and a mark when it is not
/// what the server sent.
fn cell(result: Option<&Value>, expect: (u16, &str)) -> (String, bool) {
    let Some(result) = result else { return ("no result".to_owned(), false) };
    let code = result["code"].as_u64();
    let reason = result["reason"].as_str().unwrap_or_default();
    let ok = code == Some(u64::from(expect.0)) && reason == expect.1;
    let mut text = match code {
        Some(code) if reason.is_empty() => format!("{code}"),
        Some(code) => format!("{code} \"{reason}\""),
        None => format!("none ({reason})"),
    };
    if result["clean"] == json!(false) {
        text.push_str(" unclean");
    }
    if !ok {
        text.push_str(" ✗");
    }
    (text, ok)
}

#[tokio::test]
async fn every_client_hands_its_application_the_close_the_server_sent() {
    let kinds = client_kinds();
    let servers = Servers::start().await;
    let rows = servers.rows();
    let dir = TempDir::new("close-matrix");

    let started = Instant::now();
    let names: Vec<&str> = kinds.iter().map(|k| k.name).collect();
    let drivers = kinds.iter().map(|kind| {
        let path = dir.path().join(format!("{}.json", kind.name));
        std::fs::write(&path, spec(&rows, kind.name).to_string()).unwrap();
        run_driver(kind, path)
    });
    let (results, (), (), ()) = tokio::join!(
        futures_util::future::join_all(drivers),
        shut_down_when_connected(&servers.shutdown, kinds.len()),
        disconnect_when_connected(&servers.admin, &names),
        flood_slow_rooms(&servers.main, &names),
    );
    let took = started.elapsed();

    let mut table = format!(
        "| close | server sent | {} |\n|---|---|{}\n",
        kinds.iter().map(|k| k.column).collect::<Vec<_>>().join(" | "),
        "---|".repeat(kinds.len())
    );
    let mut failures = Vec::new();
    for (kind, result) in kinds.iter().zip(&results) {
        if let Err(e) = result {
            failures.push(format!("{}: {e}", kind.name));
        }
    }
    for row in &rows {
        let sent = if row.expect.1.is_empty() {
            format!("{}", row.expect.0)
        } else {
            format!("{} \"{}\"", row.expect.0, row.expect.1)
        };
        let mut cells = Vec::new();
        for (kind, result) in kinds.iter().zip(&results) {
            let (text, ok) = cell(result.as_ref().ok().and_then(|r| r.get(row.name)), row.expect);
            if !ok {
                failures.push(format!("{} / {}: {text}", row.name, kind.name));
            }
            cells.push(text);
        }
        table.push_str(&format!("| {} | {sent} | {} |\n", row.name, cells.join(" | ")));
    }
    println!("close matrix ({} clients at once, {:.1} s):\n{table}", kinds.len(), took.as_secs_f64());
    // How the server's drains ended: a bound reached means a client was cut
    // while it still sent, which a slow machine can make of the 8 MB case.
    let metrics = servers.main.metrics().await;
    for line in metrics.lines().filter(|l| l.starts_with("chorus_close_lingers_total")) {
        println!("main server: {line}");
    }
    assert!(failures.is_empty(), "cells that do not show the server's close:\n{}\n\n{table}", failures.join("\n"));
}
