//! Criterion benches of the server's hot paths: parsing a client frame,
//! encoding a message frame, fanning a message out to a room's members,
//! checking a JWT, matching a room against a token's patterns, and
//! compressing a message once against compressing it per member.
//!
//! Run: `cargo bench --bench hot_paths` (add `-- --quick` for a fast pass).
//! docs/BENCHMARKS.md records the figures.

use std::hint::black_box;
use std::io::Read;
use std::sync::Arc;
use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use jsonwebtoken::{Algorithm, EncodingKey, Header};

use chorus::auth::{Expectations, NewToken, Verifier};
use chorus::conn::outbox::Pushed;
use chorus::conn::{cork, writer, Coalescing, Connection, Setup, WriterConfig};
use chorus::metrics::Metrics;
use chorus::protocol::{outbound, parse_request};
use chorus::registry::Registry;
use chorus::room::{RoomName, RoomPatterns};

/// A `send` as a chat client typically sends it.
const SEND_FRAME: &str =
    r#"{"type":"send","room":"lobby","ref":"m-1042","body":{"text":"hello, world","client_ts":1700000000000}}"#;
const BODY: &[u8] = br#"{"text":"hello, world","client_ts":1700000000000}"#;
const TS: u64 = 1_700_000_000_000;

fn room(name: &str) -> RoomName {
    RoomName::parse(name).expect("valid room name")
}

fn parse(c: &mut Criterion) {
    let mut group = c.benchmark_group("parse");
    group.throughput(Throughput::Bytes(SEND_FRAME.len() as u64));
    group.bench_function("send_frame", |b| {
        b.iter(|| parse_request(black_box(SEND_FRAME)).expect("valid frame"));
    });
    group.finish();
}

fn encode(c: &mut Criterion) {
    let lobby = room("lobby");
    let big_body = format!(r#"{{"text":"{}"}}"#, "x".repeat(1000));
    let mut group = c.benchmark_group("encode_message");
    for (name, body) in [("small_body", BODY), ("1KiB_body", big_body.as_bytes())] {
        group.throughput(Throughput::Bytes(body.len() as u64));
        group.bench_function(name, |b| {
            b.iter(|| outbound::message(black_box(&lobby), 42, black_box("alice"), TS, black_box(body)));
        });
    }
    group.finish();
}

/// Publishes between two drains of the members' queues and sockets; the
/// queues hold more than this, so no member is ever cut as a slow consumer.
const DRAIN_EVERY: u64 = 32;

/// `n` members, each the server side of a real loopback connection, and
/// the client sides to drain. `coalesce` is the connections' write window.
struct Members {
    conns: Vec<Arc<Connection>>,
    clients: Vec<std::net::TcpStream>,
    metrics: Arc<Metrics>,
}

impl Members {
    fn connect(n: usize, coalesce: Duration, runtime: &tokio::runtime::Runtime) -> Self {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let addr = listener.local_addr().expect("addr");
        let metrics = Arc::new(Metrics::new());
        let writer = Arc::new(WriterConfig { coalescing: Coalescing::new(coalesce, 0.0), metrics: metrics.clone() });
        let mut members = Members { conns: Vec::new(), clients: Vec::new(), metrics };
        for id in 0..n as u64 {
            let client = std::net::TcpStream::connect(addr).expect("connect");
            client.set_nonblocking(true).expect("nonblocking");
            let (server, _) = listener.accept().expect("accept");
            server.set_nonblocking(true).expect("nonblocking");
            let socket = tokio::net::TcpStream::from_std(server).expect("register");
            let setup = Setup {
                id,
                sub: "bench".into(),
                send_queue: DRAIN_EVERY as usize + 1,
                expires_at: u64::MAX,
                now_ms: 0,
                writer: writer.clone(),
                deflate: None,
            };
            members.conns.push(Arc::new(Connection::new(socket, setup)));
            members.clients.push(client);
        }
        // A socket counts as writable once the reactor has seen it so;
        // before that, a write would go to a writer task.
        runtime.block_on(async {
            for conn in &members.conns {
                std::future::poll_fn(|cx| conn.socket().poll_write_ready(cx)).await.expect("writable");
            }
        });
        members
    }

    /// Empties what reached the clients, and what is still queued.
    fn drain(&self) {
        let mut buf = vec![0u8; 64 * 1024];
        for client in &self.clients {
            while matches!((&*client).read(&mut buf), Ok(n) if n > 0) {}
        }
        let mut batch = chorus::conn::outbox::Frames::new();
        for conn in &self.conns {
            let _ = conn.outbox.next_for_writer(&mut batch);
            batch.clear();
        }
    }
}

/// Times `iters` calls of `run`; after every `every` of them, `drain`
/// (untimed) empties the sockets and queues they filled.
fn timed_between_drains(iters: u64, every: u64, mut run: impl FnMut(), drain: impl Fn()) -> Duration {
    let mut timed = Duration::ZERO;
    let mut done = 0;
    while done < iters {
        let batch = (iters - done).min(every);
        let started = Instant::now();
        for _ in 0..batch {
            run();
        }
        timed += started.elapsed();
        drain();
        done += batch;
    }
    timed
}

/// `fanout/to_sockets/N`: a publish to N members whose connections are
/// quiet, and the end of its round, which writes each member's socket (one
/// `sendmsg` per member, the kernel's loopback TCP path included; the
/// round's task and a `block_on` too).
/// `fanout/queued/N`: the same with every member's writer busy (a room
/// under load), so a publish only queues: the part under the room's lock.
fn fanout(c: &mut Criterion) {
    // The connections' sockets need a reactor. A writer task started for
    // `queued` sleeps out its hour-long window: it stays "busy" for the
    // whole bench.
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
    let _entered = runtime.enter();
    let mut group = c.benchmark_group("fanout");
    for (mode, coalesce) in [("to_sockets", Duration::ZERO), ("queued", Duration::from_secs(3600))] {
        for n in [1usize, 100, 1000] {
            let registry = Registry::new(1000, "bench".into());
            let lobby = room("lobby");
            let members = Members::connect(n, coalesce, &runtime);
            for conn in &members.conns {
                registry.join_local(&lobby, conn, None, None);
            }
            // A publish and the end of its round, when the members are written.
            let publish = || {
                runtime.block_on(async {
                    let delivery = registry.publish(&lobby, "alice", TS, black_box(BODY));
                    cork::round_flushed().await;
                    delivery
                })
            };
            let joined_writes = members.metrics.writes.get();
            for _ in 0..2 {
                let check = publish();
                assert_eq!((check.recipients, check.slow_consumers), (n, 0));
            }
            // In `queued`, the first publish is written at once and opens
            // each member's window: the second, and every timed one, find
            // it open and only queue.
            let inline_writes = if mode == "to_sockets" { 2 * n as u64 } else { n as u64 };
            assert_eq!(members.metrics.writes.get() - joined_writes, inline_writes, "{mode}: writes by the publisher");
            members.drain();

            // Elements are deliveries: criterion's rate is deliveries per second.
            group.throughput(Throughput::Elements(n as u64));
            group.bench_function(BenchmarkId::new(mode, n), |b| {
                b.iter_custom(|iters| {
                    timed_between_drains(iters, DRAIN_EVERY, || drop(black_box(publish())), || members.drain())
                });
            });
            let last = publish();
            assert_eq!(last.slow_consumers, 0, "a member was cut: the bench drained too late");
        }
    }
    group.finish();
}

/// `write/coalesced/K`: K message frames queued to one quiet connection,
/// then one flush: a single `sendmsg` of K iovecs, the write a busy
/// connection makes once per window (about 11 frames at 1,000 messages a
/// second and a 10 ms window). Throughput is in frames per second.
fn coalesced_write(c: &mut Criterion) {
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
    let _entered = runtime.enter();
    let members = Members::connect(1, Duration::ZERO, &runtime);
    let conn = &members.conns[0];
    let frame = outbound::message(&room("lobby"), 42, "alice", TS, BODY);
    let mut group = c.benchmark_group("write");
    for k in [1u64, 11, 48] {
        // Flushes between two reads of the client side: well under the
        // socket's buffer, so every flush is one whole write.
        let drain_every = (256 / k).clamp(1, DRAIN_EVERY);
        let write = || {
            let pushed = conn.outbox.push_all(std::iter::repeat_n(frame.clone(), k as usize));
            assert_eq!(pushed, Ok(Pushed::FlushNeeded), "the connection was not quiet");
            writer::flush_spread(vec![conn.clone()]);
        };
        let writes_before = members.metrics.writes.get();
        write();
        assert_eq!(members.metrics.writes.get() - writes_before, 1, "one write for {k} frames");
        members.drain();
        group.throughput(Throughput::Elements(k));
        group.bench_function(BenchmarkId::new("coalesced", k), |b| {
            b.iter_custom(|iters| timed_between_drains(iters, drain_every, write, || members.drain()));
        });
    }
    group.finish();
}

fn jwt(c: &mut Criterion) {
    let mut token = NewToken::new("alice", Duration::from_secs(3600));
    token.rooms = Some(vec!["lobby".into(), "team-*".into()]);
    let mut group = c.benchmark_group("jwt_verify");

    let secret = b"a bench secret of a sensible length, 32+ bytes";
    let verifier = Verifier::from_secret(secret, &Expectations::default()).expect("secret");
    let hs256 = token.sign_hs256(secret).expect("sign");
    verifier.verify(&hs256).expect("valid HS256 token");
    group.bench_function("HS256", |b| b.iter(|| verifier.verify(black_box(&hs256)).expect("valid")));

    let (private_der, public_pem) = rs256_key();
    let verifier = Verifier::from_public_key_pem(&public_pem, "bench key", &Expectations::default()).expect("key");
    let rs256 = jsonwebtoken::encode(&Header::new(Algorithm::RS256), &token, &EncodingKey::from_rsa_der(&private_der))
        .expect("sign");
    verifier.verify(&rs256).expect("valid RS256 token");
    group.bench_function("RS256_2048", |b| b.iter(|| verifier.verify(black_box(&rs256)).expect("valid")));
    group.finish();
}

/// A fresh 2048-bit RSA key: its private half as PKCS#1 DER, its public half
/// as PKCS#1 PEM (what `--jwt-public-key` reads).
fn rs256_key() -> (Vec<u8>, Vec<u8>) {
    use base64::Engine;
    use rsa::pkcs1::{EncodeRsaPrivateKey, EncodeRsaPublicKey};

    let key = rsa::PrivateKey::new(&mut ThreadRng, 2048).expect("RSA key generation");
    let private_der = key.to_pkcs1_der().expect("private DER").as_bytes().to_vec();
    let public_der = key.to_public_key().to_pkcs1_der().expect("public DER");
    let b64 = base64::engine::general_purpose::STANDARD.encode(public_der.as_bytes());
    let mut pem = String::from("-----BEGIN RSA PUBLIC KEY-----\n");
    for line in b64.as_bytes().chunks(64) {
        pem.push_str(std::str::from_utf8(line).expect("base64 is ASCII"));
        pem.push('\n');
    }
    pem.push_str("-----END RSA PUBLIC KEY-----\n");
    (private_der, pem.into_bytes())
}

/// rand's thread-local CSPRNG, seen through the rand_core version rsa uses.
struct ThreadRng;

impl rsa::rand_core::TryRng for ThreadRng {
    type Error = std::convert::Infallible;

    fn try_next_u32(&mut self) -> Result<u32, Self::Error> {
        Ok(rand::random())
    }

    fn try_next_u64(&mut self) -> Result<u64, Self::Error> {
        Ok(rand::random())
    }

    fn try_fill_bytes(&mut self, dst: &mut [u8]) -> Result<(), Self::Error> {
        rand::fill(dst);
        Ok(())
    }
}

impl rsa::rand_core::TryCryptoRng for ThreadRng {}

fn room_patterns(c: &mut Criterion) {
    let mut group = c.benchmark_group("room_patterns");
    let any = RoomPatterns::any();
    let patterns = ["lobby", "support", "news.eu", "news.us", "team-*", "dm:alice:*", "ops@*", "z*"];
    let patterns = RoomPatterns::parse(&patterns).expect("patterns");
    let cases = [
        ("no_claim", &any, room("team-blue")),
        ("exact_first", &patterns, room("lobby")),
        ("prefix_5th", &patterns, room("team-blue")),
        ("miss_of_8", &patterns, room("random-room-name")),
    ];
    for (name, patterns, room) in &cases {
        group.bench_function(*name, |b| b.iter(|| black_box(patterns).allows(black_box(room))));
    }
    group.finish();
}

/// A realistic chat `message` frame of about 300 bytes of JSON, message `i`.
fn chat_message(i: u64) -> bytes::Bytes {
    let body = format!(
        r#"{{"text":"message {i}: on my way, the train is late again, see you at the usual place in ten minutes","author":{{"id":"user-{}","name":"Alice Example"}},"mentions":["bob","carol"],"client_ts":{}}}"#,
        10_000 + i % 7,
        TS + i
    );
    outbound::message(&room("team-design"), i, "alice@example.com", TS + i, body.as_bytes())
}

/// Compression's cost: chorus compresses a message once for a whole room
/// (no context takeover); the servers that compress per connection run one
/// deflate per recipient, each with its own window (context takeover), or
/// without one. Per-delivery cost: `once_per_message` / room size, against
/// `per_member_*` (each paid once per recipient).
fn deflate(c: &mut Criterion) {
    use chorus::ws::deflate::deflate_frame;
    use flate2::{Compress, Compression, FlushCompress};
    let messages: Vec<bytes::Bytes> = (1..=64).map(chat_message).collect();
    let plain: usize = messages.iter().map(|m| m.len()).sum();
    let once: usize = messages.iter().map(|m| deflate_frame(m).expect("deflates").len()).sum();
    let mut kept = Compress::new(Compression::new(6), false);
    let mut with_context = 0;
    for m in &messages {
        let mut out = Vec::with_capacity(m.len() + 64);
        kept.compress_vec(chorus::ws::frame::payload(m), &mut out, FlushCompress::Sync).expect("deflates");
        with_context += out.len() - 4;
    }
    eprintln!(
        "deflate: {} B per message plain, {} B compressed once (no context takeover), {} B with context takeover",
        plain / messages.len(),
        once / messages.len(),
        with_context / messages.len()
    );
    let mut group = c.benchmark_group("deflate");
    group.throughput(Throughput::Elements(1));
    let mut i = 0;
    group.bench_function("once_per_message", |b| {
        b.iter(|| {
            i = (i + 1) % messages.len();
            black_box(deflate_frame(black_box(&messages[i])))
        })
    });
    let mut z = Compress::new(Compression::new(6), false);
    let mut out = Vec::with_capacity(1024);
    group.bench_function("per_member_context_takeover", |b| {
        b.iter(|| {
            i = (i + 1) % messages.len();
            out.clear();
            z.compress_vec(chorus::ws::frame::payload(&messages[i]), &mut out, FlushCompress::Sync).expect("deflates");
            black_box(&out);
        })
    });
    group.bench_function("per_member_no_context_takeover", |b| {
        b.iter(|| {
            i = (i + 1) % messages.len();
            out.clear();
            z.reset();
            z.compress_vec(chorus::ws::frame::payload(&messages[i]), &mut out, FlushCompress::Sync).expect("deflates");
            black_box(&out);
        })
    });
    group.finish();
}

criterion_group!(benches, parse, encode, deflate, fanout, coalesced_write, jwt, room_patterns);
criterion_main!(benches);
