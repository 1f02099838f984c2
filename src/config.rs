//! Configuration of `chorus serve` (PROTOCOL.md section 7).
//!
//! Every option is a flag and a `CHORUS_*` environment variable, the flag
//! winning. [`ServeArgs`] is what the user typed; [`Config`] is the same,
//! checked once at start, so nothing on the request path re-validates it.

mod size;

use std::net::{SocketAddr, ToSocketAddrs};
use std::path::PathBuf;
use std::time::Duration;

use clap::Args;

use crate::auth::{Expectations, KeyError, Verifier};
use crate::logging::LogFormat;

#[derive(Debug, Clone, Args)]
pub struct ServeArgs {
    /// Address to listen on (WebSocket, HTTP API and metrics).
    #[arg(long, env = "CHORUS_LISTEN", default_value = "127.0.0.1:8080")]
    pub listen: String,
    /// Private plain-HTTP address for /metrics, /healthz, /readyz and the admin API (which is off without it).
    #[arg(long, env = "CHORUS_ADMIN_LISTEN")]
    pub admin_listen: Option<String>,
    /// On SIGTERM, /readyz answers 503 for this long (connections still accepted) so load balancers stop sending clients.
    #[arg(long, env = "CHORUS_DRAIN_PERIOD", default_value = "5s", value_parser = humantime::parse_duration)]
    pub drain_period: Duration,
    /// Then the open connections are closed with 1001 spread evenly over this long, so their reconnects ramp.
    #[arg(long, env = "CHORUS_CLOSE_SPREAD", default_value = "15s", value_parser = humantime::parse_duration)]
    pub close_spread: Duration,
    /// PEM certificate chain: the listener speaks TLS only (wss://, https://); SIGHUP reads it again.
    #[arg(long, env = "CHORUS_TLS_CERT", requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,
    /// PEM private key (PKCS#8, RSA or SEC1) of --tls-cert; SIGHUP reads it again.
    #[arg(long, env = "CHORUS_TLS_KEY", requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,
    /// Log lines as `text` or `json` (one object per line).
    #[arg(long, env = "CHORUS_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,
    /// HS256 shared secret for client tokens. With no key at all, a random one is made at start.
    #[arg(long, env = "CHORUS_JWT_SECRET", hide_env_values = true, conflicts_with = "jwt_public_key")]
    pub jwt_secret: Option<String>,
    /// PEM file with an RSA (RS256) or EC P-256 (ES256) public key for client tokens.
    #[arg(long, env = "CHORUS_JWT_PUBLIC_KEY")]
    pub jwt_public_key: Option<PathBuf>,
    /// Required `iss` claim.
    #[arg(long, env = "CHORUS_JWT_ISSUER")]
    pub jwt_issuer: Option<String>,
    /// Required `aud` claim.
    #[arg(long, env = "CHORUS_JWT_AUDIENCE")]
    pub jwt_audience: Option<String>,
    /// Redis URL: run as one node of a cluster.
    #[arg(long, env = "CHORUS_REDIS_URL")]
    pub redis_url: Option<String>,
    /// `--redis-url` is a comma-separated list of seed nodes of a Redis Cluster (7.0+): rooms spread over its shards by sharded pub/sub.
    #[arg(long, env = "CHORUS_REDIS_CLUSTER")]
    pub redis_cluster: bool,
    /// PostgreSQL URL: keep history durably.
    #[arg(long, env = "CHORUS_DATABASE_URL", hide_env_values = true)]
    pub database_url: Option<String>,
    /// Comma-separated origins allowed to open WebSockets (e.g. https://app.example.com).
    #[arg(long, env = "CHORUS_ALLOWED_ORIGINS", value_delimiter = ',')]
    pub allowed_origins: Vec<String>,
    /// How often the server pings each connection.
    #[arg(long, env = "CHORUS_PING_INTERVAL", default_value = "25s", value_parser = humantime::parse_duration)]
    pub ping_interval: Duration,
    /// Close a connection that sent nothing (pongs included) for this long.
    #[arg(long, env = "CHORUS_PING_TIMEOUT", default_value = "60s", value_parser = humantime::parse_duration)]
    pub ping_timeout: Duration,
    /// Largest client message in bytes; larger ones close the connection with 1009.
    #[arg(long, env = "CHORUS_MAX_MESSAGE_BYTES", default_value_t = 64 * 1024)]
    pub max_message_bytes: usize,
    /// Messages kept per room for history and recovery.
    #[arg(long, env = "CHORUS_HISTORY_SIZE", default_value_t = 1000)]
    pub history_size: usize,
    /// A room with no member and no message for this long drops the history it keeps in memory
    /// (its sequence goes on); 0s keeps it forever. The database, if any, keeps everything.
    #[arg(long, env = "CHORUS_HISTORY_TTL", default_value = "24h", value_parser = humantime::parse_duration)]
    pub history_ttl: Duration,
    /// Cluster: the users of a node that stops without a goodbye leave the
    /// presence of its rooms within this time.
    #[arg(long, env = "CHORUS_PRESENCE_TTL", default_value = "30s", value_parser = humantime::parse_duration)]
    pub presence_ttl: Duration,
    /// Memory for rooms, their in-memory history and what is remembered of evicted rooms (e.g. 256MiB);
    /// past it the rooms idle longest are evicted.
    #[arg(long, env = "CHORUS_HISTORY_MEMORY", default_value = "256MiB", value_parser = size::parse_bytes)]
    pub history_memory: usize,
    /// Rooms one connection may be joined to at once; a `join` past it gets `too_many_rooms`.
    #[arg(long, env = "CHORUS_MAX_ROOMS_PER_CONNECTION", default_value_t = 128)]
    pub max_rooms_per_connection: usize,
    /// Frames per second each connection may send.
    #[arg(long, env = "CHORUS_RATE", default_value_t = 100.0)]
    pub rate: f64,
    /// Frames a connection may send at once before the rate applies.
    #[arg(long, env = "CHORUS_BURST", default_value_t = 200)]
    pub burst: u32,
    /// Frames waiting behind a socket that refuses more before the connection counts as a slow consumer (closed with 1013).
    #[arg(long, env = "CHORUS_SEND_QUEUE", default_value_t = 1024)]
    pub send_queue: usize,
    /// While the server is saturated, a busy connection writes at most once per window; frames that arrive meanwhile leave together. The window opens at this length and never goes under it; it grows up to twice it while the machine's cores stay over 95% busy. 0 turns it off.
    #[arg(long, env = "CHORUS_WRITE_COALESCE", default_value = "10ms", value_parser = humantime::parse_duration)]
    pub write_coalesce: Duration,
    /// The window applies while writing without it takes this fraction of the machine's cores (process CPU time over half a second, measured without the window) and the machine's cores are at least 90% busy; 0 applies it always.
    #[arg(long, env = "CHORUS_WRITE_COALESCE_LOAD", default_value_t = 0.35)]
    pub write_coalesce_load: f64,
    /// Prefix of every Redis key and channel.
    #[arg(long, env = "CHORUS_REDIS_PREFIX", default_value = "chorus")]
    pub redis_prefix: String,
    /// Deliver and ack a message only once the database holds it.
    #[arg(long, env = "CHORUS_DURABLE_ACKS")]
    pub durable_acks: bool,
    /// Messages waiting to be written to the database before publishing answers `unavailable`.
    #[arg(long, env = "CHORUS_PERSIST_QUEUE", default_value_t = 100_000)]
    pub persist_queue: usize,
    /// Serve the chat page at `/` and hand anyone a token at `POST /demo/token` (on anyway with no JWT key).
    #[arg(long, env = "CHORUS_DEMO")]
    pub demo: bool,
    /// Accept permessage-deflate from clients that offer it (compressed once per message, no window per connection).
    #[arg(long, env = "CHORUS_COMPRESSION")]
    pub compression: bool,
    /// With --compression, server frames with a payload shorter than this many bytes are sent plain.
    #[arg(long, env = "CHORUS_COMPRESSION_MIN_BYTES", default_value_t = 256)]
    pub compression_min_bytes: usize,
}

/// Why the configuration cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("--listen {0:?} is not an address to listen on")]
    Listen(String),
    #[error("--admin-listen {0:?} is not an address to listen on")]
    AdminListen(String),
    #[error("cannot read --jwt-public-key {path}: {source}")]
    PublicKey { path: String, source: std::io::Error },
    #[error(transparent)]
    Key(#[from] KeyError),
    #[error("{0}")]
    Invalid(String),
}

/// Where the JWT key came from: the start-up banner mints a token only for a
/// secret it made itself.
#[derive(Clone)]
pub enum KeySource {
    Secret(String),
    GeneratedSecret(String),
    PublicKey,
}

/// The validated configuration.
pub struct Config {
    pub listen: SocketAddr,
    /// `None`: probes and metrics stay on `listen` and the admin API is off.
    pub admin_listen: Option<SocketAddr>,
    pub drain_period: Duration,
    pub close_spread: Duration,
    /// `--tls-cert` and `--tls-key`, read when the server starts.
    pub tls: Option<(PathBuf, PathBuf)>,
    pub verifier: Verifier,
    pub key_source: KeySource,
    pub jwt_issuer: Option<String>,
    pub jwt_audience: Option<String>,
    /// `None` allows every origin.
    pub allowed_origins: Option<Vec<String>>,
    pub ping_interval: Duration,
    pub ping_timeout: Duration,
    pub max_message_bytes: usize,
    pub history_size: usize,
    /// `None` keeps idle rooms' history forever.
    pub history_ttl: Option<Duration>,
    pub presence_ttl: Duration,
    pub history_memory: usize,
    pub max_rooms_per_connection: usize,
    pub rate: f64,
    pub burst: u32,
    pub send_queue: usize,
    pub write_coalesce: Duration,
    pub write_coalesce_load: f64,
    pub redis_url: Option<String>,
    pub redis_prefix: String,
    /// `redis_url` lists seed nodes of a Redis Cluster.
    pub redis_cluster: bool,
    pub database_url: Option<String>,
    pub durable_acks: bool,
    pub persist_queue: usize,
    /// The HS256 secret the chat page's tokens are signed with, when the page
    /// is served: with a generated secret, or with `--demo`.
    pub demo_secret: Option<String>,
    /// `--compression`: the smallest payload sent compressed; `None` turns
    /// the extension off.
    pub compression_min_bytes: Option<usize>,
}

impl Config {
    pub fn from_args(args: ServeArgs) -> Result<Self, ConfigError> {
        check_backends(&args)?;
        check_limits(&args)?;
        let listen = socket_addr(&args.listen).ok_or_else(|| ConfigError::Listen(args.listen.clone()))?;
        let admin_listen = match &args.admin_listen {
            Some(admin) => Some(socket_addr(admin).ok_or_else(|| ConfigError::AdminListen(admin.clone()))?),
            None => None,
        };
        let expect = Expectations { issuer: args.jwt_issuer.clone(), audience: args.jwt_audience.clone() };
        let (verifier, key_source) = load_key(&args, &expect)?;
        let demo_secret = demo_secret(args.demo, &key_source)?;
        let allowed_origins = (!args.allowed_origins.is_empty())
            .then(|| args.allowed_origins.iter().map(|o| o.trim().trim_end_matches('/').to_owned()).collect());
        Ok(Self {
            listen,
            admin_listen,
            drain_period: args.drain_period,
            close_spread: args.close_spread,
            tls: args.tls_cert.zip(args.tls_key),
            verifier,
            key_source,
            jwt_issuer: args.jwt_issuer,
            jwt_audience: args.jwt_audience,
            allowed_origins,
            ping_interval: args.ping_interval,
            ping_timeout: args.ping_timeout,
            max_message_bytes: args.max_message_bytes,
            history_size: args.history_size,
            history_ttl: (!args.history_ttl.is_zero()).then_some(args.history_ttl),
            presence_ttl: args.presence_ttl,
            history_memory: args.history_memory,
            max_rooms_per_connection: args.max_rooms_per_connection,
            rate: args.rate,
            burst: args.burst,
            send_queue: args.send_queue,
            write_coalesce: args.write_coalesce,
            write_coalesce_load: args.write_coalesce_load,
            redis_url: args.redis_url,
            redis_prefix: args.redis_prefix,
            redis_cluster: args.redis_cluster,
            database_url: args.database_url,
            durable_acks: args.durable_acks,
            persist_queue: args.persist_queue,
            demo_secret,
            compression_min_bytes: args.compression.then_some(args.compression_min_bytes),
        })
    }
}

/// The chat page mints tokens for whoever asks, so it is on by itself only
/// when the server made its own secret (a local trial); with a configured
/// key only `--demo` turns it on, and it needs a secret to sign with.
fn demo_secret(demo: bool, key_source: &KeySource) -> Result<Option<String>, ConfigError> {
    match key_source {
        KeySource::GeneratedSecret(secret) => Ok(Some(secret.clone())),
        KeySource::Secret(secret) => Ok(demo.then(|| secret.clone())),
        KeySource::PublicKey if demo => {
            Err(ConfigError::Invalid("--demo needs --jwt-secret (it signs the chat page's tokens)".into()))
        }
        KeySource::PublicKey => Ok(None),
    }
}

fn socket_addr(addr: &str) -> Option<SocketAddr> {
    addr.to_socket_addrs().ok().and_then(|mut a| a.next())
}

fn check_backends(args: &ServeArgs) -> Result<(), ConfigError> {
    if args.durable_acks && args.database_url.is_none() {
        return Err(ConfigError::Invalid("--durable-acks needs --database-url".into()));
    }
    if args.redis_cluster && args.redis_url.is_none() {
        return Err(ConfigError::Invalid("--redis-cluster needs --redis-url (the cluster's seed nodes)".into()));
    }
    Ok(())
}

fn check_limits(args: &ServeArgs) -> Result<(), ConfigError> {
    let invalid = |m: &str| Err(ConfigError::Invalid(m.to_owned()));
    if args.ping_interval.is_zero() || args.ping_timeout.is_zero() {
        return invalid("--ping-interval and --ping-timeout must be above zero");
    }
    if args.max_message_bytes == 0 || args.send_queue == 0 || args.persist_queue == 0 {
        return invalid("--max-message-bytes, --send-queue and --persist-queue must be above zero");
    }
    if args.history_memory < 64 << 10 {
        return invalid("--history-memory must be at least 64KiB");
    }
    if args.max_rooms_per_connection == 0 {
        return invalid("--max-rooms-per-connection must be above zero");
    }
    if !(args.rate.is_finite() && args.rate > 0.0) || args.burst == 0 {
        return invalid("--rate and --burst must be above zero");
    }
    if args.presence_ttl < Duration::from_millis(400) {
        return invalid("--presence-ttl must be at least 400ms");
    }
    if !(0.0..=1.0).contains(&args.write_coalesce_load) {
        return invalid("--write-coalesce-load must be between 0 and 1");
    }
    if args.redis_prefix.is_empty() || args.redis_prefix.contains(|c: char| c.is_whitespace() || c == '{') {
        return invalid("--redis-prefix must be non-empty, without spaces or braces");
    }
    Ok(())
}

fn load_key(args: &ServeArgs, expect: &Expectations) -> Result<(Verifier, KeySource), ConfigError> {
    if let Some(path) = &args.jwt_public_key {
        let pem = std::fs::read(path)
            .map_err(|source| ConfigError::PublicKey { path: path.display().to_string(), source })?;
        let verifier = Verifier::from_public_key_pem(&pem, &path.display().to_string(), expect)?;
        return Ok((verifier, KeySource::PublicKey));
    }
    let (secret, source) = match &args.jwt_secret {
        Some(secret) => (secret.clone(), KeySource::Secret(secret.clone())),
        None => {
            let secret = random_secret();
            (secret.clone(), KeySource::GeneratedSecret(secret))
        }
    };
    Ok((Verifier::from_secret(secret.as_bytes(), expect)?, source))
}

/// 256 random bits, URL-safe, for a server started with no key.
fn random_secret() -> String {
    use base64::Engine;
    let bytes: [u8; 32] = rand::random();
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::*;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        serve: ServeArgs,
    }

    fn config(args: &[&str]) -> Result<Config, ConfigError> {
        let cli = Cli::try_parse_from(std::iter::once("chorus").chain(args.iter().copied())).expect("parses");
        Config::from_args(cli.serve)
    }

    #[test]
    fn presence_ttl_has_a_default_and_a_floor() {
        assert_eq!(config(&[]).unwrap().presence_ttl, Duration::from_secs(30));
        assert_eq!(config(&["--presence-ttl", "2s"]).unwrap().presence_ttl, Duration::from_secs(2));
        assert!(config(&["--presence-ttl", "100ms"]).is_err());
    }

    #[test]
    fn redis_cluster_needs_seed_nodes_and_takes_a_database() {
        let c = config(&["--jwt-secret", "s", "--redis-url", "redis://a:1,redis://b:2", "--redis-cluster"]).unwrap();
        assert!(c.redis_cluster);
        let err = config(&["--jwt-secret", "s", "--redis-cluster"]).err().expect("no seeds");
        assert!(err.to_string().contains("--redis-url"), "{err}");
        let with_db = [
            "--jwt-secret",
            "s",
            "--redis-url",
            "redis://a:1",
            "--redis-cluster",
            "--database-url",
            "postgres://x",
            "--durable-acks",
        ];
        let c = config(&with_db).unwrap();
        assert!(c.redis_cluster && c.durable_acks && c.database_url.is_some());
    }

    #[test]
    fn the_coalescing_load_is_a_fraction() {
        let c = config(&["--jwt-secret", "s"]).unwrap();
        assert_eq!((c.write_coalesce, c.write_coalesce_load), (Duration::from_millis(10), 0.35));
        let c = config(&["--jwt-secret", "s", "--write-coalesce", "5ms", "--write-coalesce-load", "0"]).unwrap();
        assert_eq!((c.write_coalesce, c.write_coalesce_load), (Duration::from_millis(5), 0.0));
        for bad in ["1.5", "-0.1", "NaN"] {
            let arg = format!("--write-coalesce-load={bad}");
            let err = config(&["--jwt-secret", "s", &arg]).err().expect(bad);
            assert!(err.to_string().contains("--write-coalesce-load"), "{bad}: {err}");
        }
    }

    #[test]
    fn the_chat_page_is_on_with_a_generated_secret_or_demo() {
        assert!(config(&[]).unwrap().demo_secret.is_some());
        assert_eq!(config(&["--jwt-secret", "s"]).unwrap().demo_secret, None);
        assert_eq!(config(&["--jwt-secret", "s", "--demo"]).unwrap().demo_secret.as_deref(), Some("s"));
    }

    #[test]
    fn compression_is_off_unless_asked_for() {
        assert_eq!(config(&["--jwt-secret", "s"]).unwrap().compression_min_bytes, None);
        let c = config(&["--jwt-secret", "s", "--compression"]).unwrap();
        assert_eq!(c.compression_min_bytes, Some(256));
        let c = config(&["--jwt-secret", "s", "--compression", "--compression-min-bytes", "0"]).unwrap();
        assert_eq!(c.compression_min_bytes, Some(0));
    }
}
