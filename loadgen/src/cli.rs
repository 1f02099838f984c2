//! Command-line interface: every scenario is a subcommand, and the options
//! shared by all of them (where to connect, how to authenticate, what to
//! measure on the server, where to write reports) are global flags that may
//! be given before or after the subcommand.
//!
//! The structs double as the library's configuration: a test builds a
//! [`Cli`] (or parses one from a list of words) and hands it to
//! [`crate::run`].

use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};
use serde::Serialize;

/// Load generator for the chorus WebSocket server.
#[derive(Parser, Debug, Clone, Serialize)]
// The version line carries the commit (see ../build.rs).
#[command(name = "loadgen", version = env!("BUILD_VERSION_LINE"), about, long_about = None)]
pub struct Cli {
    #[command(flatten)]
    pub common: Common,
    #[command(subcommand)]
    pub scenario: Scenario,
}

/// Options every scenario understands.
#[derive(Args, Debug, Clone, Serialize)]
#[command(next_help_heading = "Common options (any scenario)")]
pub struct Common {
    /// WebSocket URL of a server node (ws:// or wss://host:port[/path], path default /ws).
    /// Give it more than once to spread connections over nodes, round robin.
    #[arg(long = "url", global = true, default_value = "ws://127.0.0.1:8080")]
    pub urls: Vec<String>,

    /// PEM certificate(s) to trust for wss:// URLs (the server's self-signed
    /// certificate or its private CA); wss:// needs it.
    #[arg(long, global = true)]
    pub tls_ca: Option<PathBuf>,

    /// HS256 secret to mint one token per connection (sub = <sub-prefix><n>).
    #[arg(long, global = true, env = "CHORUS_JWT_SECRET", hide_env_values = true)]
    #[serde(skip)]
    pub jwt_secret: Option<String>,

    /// File holding one token used by every connection (instead of --jwt-secret).
    #[arg(long, global = true, conflicts_with = "jwt_secret")]
    pub token_file: Option<PathBuf>,

    /// Join with `"presence": true` and count the presence frames each
    /// connection receives (and when its view first shows every member).
    #[arg(long, global = true)]
    pub presence: bool,

    /// During the send (or hold) phase, members leave one of their rooms and
    /// rejoin it (with `since`, so no message is lost or repeated) at this
    /// many events per second in total (split over --of processes).
    #[arg(long, global = true)]
    pub churn: Option<f64>,

    /// With --churn: how long a member stays out of the room before it
    /// rejoins (0: at once, on `left`). Keep it below --drain.
    #[arg(long, global = true, default_value = "0s", value_parser = humantime::parse_duration)]
    #[serde(with = "secs")]
    pub churn_away: Duration,

    /// When the server ends a connection (a node killed, drained, cut),
    /// open it again (next node first, round robin) and rejoin its rooms
    /// with `since` and `epoch`; sends while it is down are dropped.
    #[arg(long, global = true)]
    pub reconnect: bool,

    /// Write what every connection saw (joins with their epochs, each
    /// delivery, ack and error, connects and ends) to this file, one JSON
    /// object a line, for `loadgen audit`.
    #[arg(long, global = true)]
    pub record: Option<PathBuf>,

    /// Prefix of the `sub` claim of minted tokens.
    #[arg(long, global = true, default_value = "lg-")]
    pub sub_prefix: String,

    /// Spread connections to a loopback server over source addresses
    /// 127.0.0.1 ..= 127.0.0.N (ignored for other targets).
    #[arg(long, global = true, default_value_t = 16, value_parser = clap::value_parser!(u8).range(1..=254))]
    pub source_ips: u8,

    /// Offer permessage-deflate in every upgrade (as browsers do) and inflate
    /// what the server compresses; the report shows the bytes on the wire.
    #[arg(long, global = true)]
    pub compression: bool,

    /// PID of a server process to measure (CPU, RSS); repeatable.
    #[arg(long = "server-pid", global = true)]
    pub server_pids: Vec<u32>,

    /// Write every figure as JSON to this file.
    #[arg(long, global = true)]
    pub json: Option<PathBuf>,

    /// Write plots to this file (.svg, or .html with the table and inline SVG).
    #[arg(long, global = true)]
    pub report: Option<PathBuf>,

    /// Tokio worker threads.
    #[arg(long, global = true, default_value_t = 2)]
    pub threads: usize,

    /// Handshakes in flight at once while connecting.
    #[arg(long, global = true, default_value_t = 256)]
    pub connect_concurrency: usize,

    /// Open connections at this many per second (default: as fast as possible).
    #[arg(long, global = true)]
    pub connect_rate: Option<f64>,

    /// Give up on one connection attempt (TCP connect + upgrade) after this long.
    #[arg(long, global = true, default_value = "10s", value_parser = humantime::parse_duration)]
    #[serde(with = "secs")]
    pub connect_timeout: Duration,

    /// Give up waiting for every member to be joined after this long.
    #[arg(long, global = true, default_value = "30s", value_parser = humantime::parse_duration)]
    #[serde(with = "secs")]
    pub join_timeout: Duration,

    /// Pause after all connections are up before reading server RSS.
    #[arg(long, global = true, default_value = "1s", value_parser = humantime::parse_duration)]
    #[serde(with = "secs")]
    pub settle: Duration,

    /// This process's part of a scenario split over --of processes (0-based):
    /// it opens every connection whose number n has n mod OF = ID, so parts
    /// never overlap and together are the whole scenario.
    #[arg(long, global = true, default_value_t = 0)]
    pub id: usize,

    /// Number of processes the scenario is split over (see --id).
    #[arg(long, global = true, default_value_t = 1)]
    pub of: usize,

    /// Start the send phase at this Unix time (seconds, fractions allowed),
    /// so processes started a few seconds apart send together.
    #[arg(long, global = true)]
    pub start_at: Option<f64>,

    /// No live progress line on stderr.
    #[arg(long, short, global = true)]
    pub quiet: bool,

    /// Exit with status 3 when the run found problems (failed connections or
    /// joins, seq gaps, duplicates, reorders, missing deliveries, errors).
    #[arg(long, global = true)]
    pub strict: bool,
}

/// The scenarios.
#[derive(Subcommand, Debug, Clone, Serialize)]
#[serde(tag = "scenario", rename_all = "lowercase")]
pub enum Scenario {
    /// R rooms of M members; P publisher connections (not members) send at an
    /// aggregate rate into the rooms, round robin.
    Fanout(FanoutArgs),
    /// R rooms of M members; every member also sends into its own room(s).
    Chat(ChatArgs),
    /// A storm of N authenticated connections: connections/s, handshake latency.
    Connect(ConnectArgs),
    /// N authenticated connections joined to rooms and held idle: server
    /// memory per connection.
    Idle(IdleArgs),
    /// Step the send rate of a fanout or chat scenario on the same
    /// connections until a stop condition: latency against throughput, and
    /// the capacity.
    Sweep(SweepArgs),
    /// Merge the --json files of processes that split one scenario
    /// (--id/--of) into one run: counters added, histograms merged.
    Merge(FilesArgs),
    /// Compare the --json files of runs: every figure with its ratio to the
    /// first run, and the latency curves overlaid.
    Compare(FilesArgs),
    /// The verdict of a chaos run from its --record file: every acked
    /// message delivered to every member that stayed joined, in seq order,
    /// no duplicate, no gap within an epoch, a new epoch only where a fault
    /// allows it, and with --durable-acks every acked message in the
    /// database once. Exit 1 on a violation.
    Audit(AuditArgs),
}

/// What `loadgen audit` reads.
#[derive(Args, Debug, Clone, Serialize)]
pub struct AuditArgs {
    /// The --record file of the run.
    #[arg(value_name = "RECORD")]
    pub record_file: PathBuf,
    /// The run's --json file (room names, send phase start).
    #[arg(long)]
    pub run: PathBuf,
    /// The faults injected, one a line: `start_ns end_ns kind what`
    /// (kinds: pause, redis-cut, redis-wipe, kill, term, pg-cut, slow).
    #[arg(long)]
    pub faults: Option<PathBuf>,
    /// The database's messages as `room<TAB>seq<TAB>p<TAB>k` lines (p and k
    /// from each body's marker); every acked message must be there once.
    #[arg(long)]
    pub db: Option<PathBuf>,
    /// The servers ran with --durable-acks: no epoch may change, nothing
    /// acked may be lost even when Redis loses its data.
    #[arg(long)]
    pub durable: bool,
    /// The servers' --history-size.
    #[arg(long, default_value_t = 1000)]
    pub history_size: u64,
}

/// `--json` files of earlier runs.
#[derive(Args, Debug, Clone, Serialize)]
pub struct FilesArgs {
    /// The files, in order (compare: ratios are to the first).
    #[arg(required = true, num_args = 1..)]
    pub files: Vec<PathBuf>,
}

impl Scenario {
    /// The subcommand's name.
    pub fn name(&self) -> &'static str {
        match self {
            Scenario::Fanout(_) => "fanout",
            Scenario::Chat(_) => "chat",
            Scenario::Connect(_) => "connect",
            Scenario::Idle(_) => "idle",
            Scenario::Sweep(_) => "sweep",
            Scenario::Merge(_) => "merge",
            Scenario::Compare(_) => "compare",
            Scenario::Audit(_) => "audit",
        }
    }
}

/// Rooms and their members.
#[derive(Args, Debug, Clone, Serialize)]
pub struct RoomArgs {
    /// Number of rooms.
    #[arg(long, default_value_t = 10)]
    pub rooms: usize,
    /// Members (joined connections) per room.
    #[arg(long, default_value_t = 100)]
    pub members: usize,
    /// Rooms are named <prefix>-<i>.
    #[arg(long, default_value = "lg")]
    pub room_prefix: String,
}

/// The timed phases of a sending scenario.
#[derive(Args, Debug, Clone, Serialize)]
pub struct PhaseArgs {
    /// Length of the send phase.
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    #[serde(with = "secs")]
    pub duration: Duration,
    /// After the send phase, keep reading this long to collect stragglers.
    #[arg(long, default_value = "2s", value_parser = humantime::parse_duration)]
    #[serde(with = "secs")]
    pub drain: Duration,
}

#[derive(Args, Debug, Clone, Serialize)]
pub struct FanoutArgs {
    #[command(flatten)]
    pub rooms: RoomArgs,
    /// Publisher connections (they do not join; each gets rooms round robin).
    #[arg(long, default_value_t = 10)]
    pub publishers: usize,
    /// Aggregate send rate over all publishers, messages per second.
    #[arg(long, default_value_t = 1000.0)]
    pub rate: f64,
    /// Size of each message body in bytes (at least the ~70 bytes of the
    /// timestamp fields).
    #[arg(long, default_value_t = 100)]
    pub payload: usize,
    #[command(flatten)]
    pub phase: PhaseArgs,
}

#[derive(Args, Debug, Clone, Serialize)]
pub struct ChatArgs {
    #[command(flatten)]
    pub rooms: RoomArgs,
    /// Messages per second each member sends.
    #[arg(long, default_value_t = 1.0)]
    pub rate_per_user: f64,
    /// Rooms each member joins (its own room and the next ones); it sends to
    /// them round robin.
    #[arg(long, default_value_t = 1)]
    pub rooms_per_user: usize,
    /// Size of each message body in bytes.
    #[arg(long, default_value_t = 100)]
    pub payload: usize,
    #[command(flatten)]
    pub phase: PhaseArgs,
}

#[derive(Args, Debug, Clone, Serialize)]
pub struct ConnectArgs {
    /// Number of connections.
    #[arg(long, default_value_t = 1000)]
    pub connections: usize,
    /// Hold the connections this long once they are all up.
    #[arg(long, default_value = "0s", value_parser = humantime::parse_duration)]
    #[serde(with = "secs")]
    pub duration: Duration,
}

#[derive(Args, Debug, Clone, Serialize)]
pub struct IdleArgs {
    /// Number of connections.
    #[arg(long, default_value_t = 1000)]
    pub connections: usize,
    /// Connections joined to each room.
    #[arg(long, default_value_t = 100)]
    pub per_room: usize,
    /// Rooms are named <prefix>-<i>.
    #[arg(long, default_value = "lg")]
    pub room_prefix: String,
    /// Hold the connections this long once they are all joined.
    #[arg(long, default_value = "30s", value_parser = humantime::parse_duration)]
    #[serde(with = "secs")]
    pub duration: Duration,
}

/// `loadgen sweep [sweep options] fanout|chat [scenario options]`: the
/// scenario's rate (`--rate` of fanout, `--rate-per-user` of chat) is the
/// first step; its `--duration` is each step's send phase and its `--drain`
/// the pause after each step.
#[derive(Args, Debug, Clone, Serialize)]
pub struct SweepArgs {
    /// Multiply the rate by this at each step.
    #[arg(long, default_value_t = 2.0)]
    pub factor: f64,
    /// Add this to the rate at each step instead of multiplying.
    #[arg(long)]
    pub step: Option<f64>,
    /// Most steps to run.
    #[arg(long, default_value_t = 10)]
    pub steps: usize,
    /// Do not go above this rate (same unit as the scenario's rate).
    #[arg(long)]
    pub max_rate: Option<f64>,
    /// Stop when a step's p99 (delivery, or ack when nothing is delivered)
    /// is above this.
    #[arg(long, value_parser = humantime::parse_duration)]
    #[serde(with = "opt_secs")]
    pub max_p99: Option<Duration>,
    /// Stop when the server's CPU over a step's send phase reaches this
    /// percentage of one core (needs --server-pid).
    #[arg(long)]
    pub max_server_cpu: Option<f64>,
    /// Go on through seq gaps, duplicates, reorders and missing deliveries.
    #[arg(long)]
    pub allow_loss: bool,
    /// Go on through error frames (e.g. rate_limited) and unexpected closes.
    #[arg(long)]
    pub allow_errors: bool,
    #[command(subcommand)]
    pub target: SweepTarget,
}

/// The scenarios a sweep can step.
#[derive(Subcommand, Debug, Clone, Serialize)]
#[serde(tag = "scenario", rename_all = "lowercase")]
pub enum SweepTarget {
    /// Step the aggregate publish rate (--rate).
    Fanout(FanoutArgs),
    /// Step every member's send rate (--rate-per-user).
    Chat(ChatArgs),
}

impl SweepTarget {
    /// The scenario run at each step.
    pub fn scenario(&self) -> Scenario {
        match self {
            SweepTarget::Fanout(a) => Scenario::Fanout(a.clone()),
            SweepTarget::Chat(a) => Scenario::Chat(a.clone()),
        }
    }

    /// The rate of the first step.
    pub fn start_rate(&self) -> f64 {
        match self {
            SweepTarget::Fanout(a) => a.rate,
            SweepTarget::Chat(a) => a.rate_per_user,
        }
    }

    /// Each step's send and drain phases.
    pub fn phase(&self) -> &PhaseArgs {
        match self {
            SweepTarget::Fanout(a) => &a.phase,
            SweepTarget::Chat(a) => &a.phase,
        }
    }
}

/// Optional durations serialize as fractional seconds or null.
mod opt_secs {
    use serde::Serializer;
    use std::time::Duration;

    pub fn serialize<S: Serializer>(d: &Option<Duration>, s: S) -> Result<S::Ok, S::Error> {
        match d {
            Some(d) => s.serialize_f64(d.as_secs_f64()),
            None => s.serialize_none(),
        }
    }
}

/// Durations serialize as fractional seconds.
mod secs {
    use serde::Serializer;
    use std::time::Duration;

    pub fn serialize<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_f64(d.as_secs_f64())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn cli_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn parses_global_flags_after_subcommand() {
        let cli = Cli::try_parse_from([
            "loadgen",
            "fanout",
            "--rooms",
            "3",
            "--url",
            "ws://127.0.0.1:1",
            "--url",
            "ws://127.0.0.1:2",
            "--duration",
            "500ms",
            "--jwt-secret",
            "x",
        ])
        .unwrap();
        assert_eq!(cli.common.urls.len(), 2);
        match cli.scenario {
            Scenario::Fanout(f) => {
                assert_eq!(f.rooms.rooms, 3);
                assert_eq!(f.phase.duration, Duration::from_millis(500));
            }
            _ => panic!("wrong scenario"),
        }
    }

    #[test]
    fn parses_a_sweep_of_fanout() {
        let cli = Cli::try_parse_from([
            "loadgen",
            "sweep",
            "--factor",
            "1.5",
            "--max-p99",
            "20ms",
            "fanout",
            "--rate",
            "500",
            "--jwt-secret",
            "x",
        ])
        .unwrap();
        let Scenario::Sweep(s) = cli.scenario else { panic!("wrong scenario") };
        assert_eq!((s.factor, s.steps, s.max_p99), (1.5, 10, Some(Duration::from_millis(20))));
        assert_eq!(s.target.start_rate(), 500.0);
        assert_eq!(s.target.scenario().name(), "fanout");
    }
}
