//! The flood of docs/OPERATIONS.md "Bounded memory": N connections, each
//! sending one short message per frame to a new room name at a fixed rate,
//! while the server's RSS, its `chorus_history_bytes` and Redis's
//! `used_memory` are sampled. Prints one line per sample.
//!
//! ```text
//! cargo run --release --example flood -- --url ws://127.0.0.1:8080 --secret S \
//!     --pid $(pidof chorus) [--redis redis://127.0.0.1:6379] \
//!     [--connections 100] [--rate 100] [--seconds 600] [--every 10]
//! ```
//!
//! Each connection reads everything the server sends (acks are not asked
//! for), so it never becomes a slow consumer; errors it gets are counted,
//! and at the end it prints the error codes and the close codes it saw.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt};
use jsonwebtoken::{EncodingKey, Header};
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::http::HeaderValue;
use tokio_tungstenite::tungstenite::Message;

struct Args {
    url: String,
    secret: String,
    pid: Option<u32>,
    redis: Option<String>,
    connections: usize,
    rate: f64,
    seconds: u64,
    every: u64,
}

fn args() -> Args {
    let mut a = Args {
        url: "ws://127.0.0.1:8080".into(),
        secret: String::new(),
        pid: None,
        redis: None,
        connections: 100,
        rate: 100.0,
        seconds: 600,
        every: 10,
    };
    let words: Vec<String> = std::env::args().skip(1).collect();
    for pair in words.chunks(2) {
        let value = pair.get(1).cloned().unwrap_or_default();
        match pair[0].as_str() {
            "--url" => a.url = value,
            "--secret" => a.secret = value,
            "--pid" => a.pid = value.parse().ok(),
            "--redis" => a.redis = Some(value),
            "--connections" => a.connections = value.parse().expect("--connections N"),
            "--rate" => a.rate = value.parse().expect("--rate per second"),
            "--seconds" => a.seconds = value.parse().expect("--seconds N"),
            "--every" => a.every = value.parse().expect("--every N"),
            other => panic!("unknown option {other}"),
        }
    }
    a
}

fn token(secret: &str, sub: &str) -> String {
    let exp = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs() + 86_400;
    let claims = serde_json::json!({"sub": sub, "exp": exp});
    jsonwebtoken::encode(&Header::default(), &claims, &EncodingKey::from_secret(secret.as_bytes()).unwrap()).unwrap()
}

fn rss_kib(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

async fn metric(http_base: &str, name: &str) -> Option<f64> {
    let text = reqwest::get(format!("{http_base}/metrics")).await.ok()?.text().await.ok()?;
    text.lines().find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.split_whitespace().next()?.parse().ok())
}

async fn redis_used_memory(conn: &mut redis::aio::MultiplexedConnection) -> Option<u64> {
    let info: String = redis::cmd("INFO").arg("memory").query_async(conn).await.ok()?;
    info.lines().find_map(|l| l.strip_prefix("used_memory:")?.trim().parse().ok())
}

#[tokio::main]
async fn main() {
    let a = args();
    let sent = Arc::new(AtomicU64::new(0));
    let errors = Arc::new(AtomicU64::new(0));
    // Error frames by `code`, and how connections ended ("close 1008", "eof").
    let outcomes: Arc<std::sync::Mutex<BTreeMap<String, u64>>> = Arc::default();
    let deadline = Instant::now() + Duration::from_secs(a.seconds);
    let mut tasks = Vec::new();
    for c in 0..a.connections {
        let mut request = format!("{}/ws", a.url).into_client_request().unwrap();
        let bearer = format!("Bearer {}", token(&a.secret, &format!("flood-{c}")));
        request.headers_mut().insert("authorization", HeaderValue::from_str(&bearer).unwrap());
        let (ws, _) = tokio_tungstenite::connect_async(request).await.expect("connect");
        let (mut sink, mut stream) = ws.split();
        let errors = errors.clone();
        let outcomes = outcomes.clone();
        tasks.push(tokio::spawn(async move {
            let count = |key: String| *outcomes.lock().unwrap().entry(key).or_default() += 1;
            let ended = loop {
                match stream.next().await {
                    Some(Ok(Message::Text(text))) if text.contains("\"type\":\"error\"") => {
                        errors.fetch_add(1, Ordering::Relaxed);
                        let v: serde_json::Value = serde_json::from_str(&text).unwrap_or_default();
                        count(format!("error {}", v["code"].as_str().unwrap_or("?")));
                    }
                    Some(Ok(Message::Close(frame))) => {
                        break frame.map_or("close without code".into(), |f| format!("close {}", u16::from(f.code)))
                    }
                    Some(Ok(_)) => {}
                    Some(Err(e)) => break format!("read error: {e}"),
                    None => break "eof".into(),
                }
            };
            count(ended);
        }));
        let sent = sent.clone();
        let period = Duration::from_secs_f64(1.0 / a.rate);
        tasks.push(tokio::spawn(async move {
            let mut ticks = tokio::time::interval(period);
            ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            let mut i = 0u64;
            while Instant::now() < deadline {
                ticks.tick().await;
                let frame = format!(r#"{{"type":"send","room":"flood-{c}-{i}","body":"hello from the flood"}}"#);
                if sink.send(Message::text(frame)).await.is_err() {
                    break;
                }
                sent.fetch_add(1, Ordering::Relaxed);
                i += 1;
            }
            let _ = sink.close().await;
        }));
    }
    let http_base = a.url.replacen("ws://", "http://", 1);
    let mut redis = match &a.redis {
        Some(url) => Some(redis::Client::open(url.as_str()).unwrap().get_multiplexed_async_connection().await.unwrap()),
        None => None,
    };
    let started = Instant::now();
    println!("seconds,sent,errors,rss_mib,history_mib,tombstones,redis_used_mib");
    loop {
        let rss = a.pid.and_then(rss_kib).map_or(f64::NAN, |k| k as f64 / 1024.0);
        let history = metric(&http_base, "chorus_history_bytes").await.map_or(f64::NAN, |b| b / 1048576.0);
        let tombstones = metric(&http_base, "chorus_tombstones").await.unwrap_or(f64::NAN);
        let used = match redis.as_mut() {
            Some(conn) => redis_used_memory(conn).await.map_or(f64::NAN, |b| b as f64 / 1048576.0),
            None => f64::NAN,
        };
        println!(
            "{},{},{},{rss:.1},{history:.1},{tombstones},{used:.1}",
            started.elapsed().as_secs(),
            sent.load(Ordering::Relaxed),
            errors.load(Ordering::Relaxed)
        );
        if Instant::now() >= deadline {
            break;
        }
        tokio::time::sleep(Duration::from_secs(a.every)).await;
    }
    // Connections the server ended have their outcome counted by now; the
    // rest are still open, which the summary says by leaving them out.
    for (outcome, n) in outcomes.lock().unwrap().iter() {
        println!("# {outcome}: {n}");
    }
    for task in tasks {
        task.abort();
    }
}
