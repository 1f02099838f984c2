//! Two loadgen processes' worth of one scenario against a real chorus
//! server (here two runs in this process, split with `--id/--of` and
//! started together with `--start-at`), merged, must equal one run of the
//! whole scenario: the same sends, acks, deliveries, expected deliveries and
//! histogram counts, with every member's stream gapless and every acked
//! message at every member, whichever part sent it. A gap injected into one
//! part's file must show in the merge. `loadgen merge` (the binary) is run
//! on the files too.

use std::path::PathBuf;
use std::process::Command;

mod common;

use clap::Parser;
use loadgen::{merge, report, Cli, Summary};

use common::{start_chorus, SECRET};

async fn start_server() -> chorus::Server {
    start_chorus("100000", "100000", &[]).await
}

fn temp(name: &str) -> PathBuf {
    std::env::temp_dir().join(format!("loadgen-merge-{}-{name}", std::process::id()))
}

/// The scenario: 3 rooms x 4 members, 2 publishers at 100 msg/s, 1 s.
async fn fanout(server: &chorus::Server, prefix: &str, extra: &[&str]) -> Summary {
    let url = format!("ws://{}", server.local_addr());
    let mut argv = vec![
        "loadgen",
        "fanout",
        "--rooms",
        "3",
        "--members",
        "4",
        "--publishers",
        "2",
        "--rate",
        "100",
        "--duration",
        "1s",
        "--drain",
        "700ms",
        "--room-prefix",
        prefix,
        "--quiet",
        "--url",
        &url,
        "--jwt-secret",
        SECRET,
        "--source-ips",
        "1",
    ];
    argv.extend_from_slice(extra);
    let cli = Cli::try_parse_from(&argv).expect("loadgen options");
    let s = loadgen::run(cli).await.expect("the run");
    eprintln!("{}", report::table(&s));
    s
}

fn write(s: &Summary, name: &str) -> PathBuf {
    let p = temp(name);
    report::write_json(s, &p).expect("write json");
    p
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_parts_merged_equal_one_run() {
    let server = start_server().await;
    let whole = fanout(&server, "merge-whole", &[]).await;
    assert!(whole.ok, "{:?}", whole.problems);

    let at = format!(
        "{:.3}",
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).expect("clock").as_secs_f64() + 2.0
    );
    let part0 = ["--id", "0", "--of", "2", "--start-at", &at];
    let part1 = ["--id", "1", "--of", "2", "--start-at", &at];
    let (a, b) = tokio::join!(fanout(&server, "merge-split", &part0), fanout(&server, "merge-split", &part1));
    assert!(a.description.contains("part 1 of 2") && b.description.contains("part 2 of 2"));
    assert_eq!(a.connections.planned + b.connections.planned, whole.connections.planned);
    assert!(a.warnings.iter().chain(&b.warnings).all(|w| !w.contains("--start-at")), "started late");
    // Each part alone sees only its members: its own figures do not add up.
    assert!(a.messages.delivered != whole.messages.delivered);

    let (pa, pb) = (write(&a, "a.json"), write(&b, "b.json"));
    let runs = vec![
        ("a".to_string(), merge::read(&pa).expect("read a")),
        ("b".to_string(), merge::read(&pb).expect("read b")),
    ];
    let m = merge::merge(&runs).expect("the parts merge");
    eprintln!("{}", report::table(&m));
    assert!(m.ok, "{:?}", m.problems);
    let (mm, wm) = (&m.messages, &whole.messages);
    assert_eq!((mm.sent, mm.acked, mm.delivered, mm.expected), (wm.sent, wm.acked, wm.delivered, wm.expected));
    assert_eq!((mm.missing, mm.extra, mm.gaps, mm.duplicates, mm.reorders), (0, 0, 0, 0, 0));
    assert_eq!(m.latency.delivery.count, whole.latency.delivery.count);
    assert_eq!(m.latency.ack.count, whole.latency.ack.count);
    assert_eq!(m.latency.connect.count, whole.latency.connect.count);
    assert_eq!(loadgen::histo::decode(&m.histograms.delivery).expect("merged histogram").len(), wm.delivered);
    assert_eq!(m.connections.established, whole.connections.established);
    assert_eq!(m.joins.joined, whole.joins.joined);

    // The binary: a clean merge exits 0 and writes the merged file.
    let out = temp("all.json");
    let bin = env!("CARGO_BIN_EXE_loadgen");
    let st = Command::new(bin)
        .args(["merge", pa.to_str().unwrap(), pb.to_str().unwrap(), "--strict", "--json", out.to_str().unwrap()])
        .output()
        .expect("run loadgen merge");
    assert!(st.status.success(), "{}", String::from_utf8_lossy(&st.stderr));
    assert_eq!(merge::read(&out).expect("merged json").messages.delivered, wm.delivered);

    // Compare the whole run with part 1 and with the merge: the ratios are
    // the figures' quotients, and the plot overlays the three curves.
    let pw = write(&whole, "whole.json");
    let (cj, ch) = (temp("cmp.json"), temp("cmp.html"));
    let st = Command::new(bin)
        .args(["compare", pw.to_str().unwrap(), pa.to_str().unwrap(), out.to_str().unwrap()])
        .args(["--json", cj.to_str().unwrap(), "--report", ch.to_str().unwrap()])
        .output()
        .expect("run loadgen compare");
    assert!(st.status.success(), "{}", String::from_utf8_lossy(&st.stderr));
    let table = String::from_utf8_lossy(&st.stdout);
    eprintln!("{table}");
    let c: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&cj).unwrap()).unwrap();
    let rows = c["rows"].as_array().expect("rows");
    let delivered = rows.iter().find(|r| r["figure"] == "delivered").expect("a delivered row");
    let want = a.messages.delivered as f64 / wm.delivered as f64;
    assert!((delivered["ratios"][1].as_f64().unwrap() - want).abs() < 1e-9, "{delivered}");
    assert_eq!(delivered["ratios"][2].as_f64(), Some(1.0));
    assert!(table.contains(&format!("{} (x{want:.2})", a.messages.delivered)), "{table}");
    let page = std::fs::read_to_string(&ch).unwrap();
    assert!(page.contains("run 1 delivery") && page.contains("run 3 delivery"));
    for p in [pw, cj, ch] {
        let _ = std::fs::remove_file(p);
    }

    // A gap injected on one side is flagged, and --strict exits 3.
    let mut v: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&pb).unwrap()).unwrap();
    v["messages"]["gaps"] = 1.into();
    v["messages"]["gap_seqs"] = 2.into();
    std::fs::write(&pb, v.to_string()).unwrap();
    let runs = vec![("a".to_string(), merge::read(&pa).unwrap()), ("b".to_string(), merge::read(&pb).unwrap())];
    let m = merge::merge(&runs).expect("still merges");
    assert!(!m.ok);
    assert!(m.problems.iter().any(|p| p.contains("seq gaps") && p.contains("2 seqs")), "{:?}", m.problems);
    let st =
        Command::new(bin).args(["merge", pa.to_str().unwrap(), pb.to_str().unwrap(), "--strict"]).output().unwrap();
    assert_eq!(st.status.code(), Some(3));
    // The same part twice does not merge.
    let st = Command::new(bin).args(["merge", pa.to_str().unwrap(), pa.to_str().unwrap()]).output().unwrap();
    assert_eq!(st.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&st.stderr).contains("overlap"));
    for p in [pa, pb, out] {
        let _ = std::fs::remove_file(p);
    }
}
