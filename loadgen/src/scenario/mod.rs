//! The scenarios, each a plan: which connections to open, which rooms each
//! joins, which of them send, at what schedule, and how the run is timed.
//! The engine runs any plan the same way, so the scenarios only differ here.

pub mod chat;
pub mod connect;
pub mod fanout;
pub mod idle;

use std::time::Duration;

use anyhow::Result;

use crate::cli::Scenario;
use crate::session::Spec;

/// The server's default per-connection rate limit, frames per second.
pub const SERVER_DEFAULT_RATE: f64 = 100.0;

/// How the measured part of a run is timed.
#[derive(Debug, Clone, Copy)]
pub enum Timing {
    /// Send for `duration`, then keep reading for `drain`.
    Send { duration: Duration, drain: Duration },
    /// Hold the connections for this long (nothing is sent).
    Hold(Duration),
}

impl Timing {
    /// The send and drain phases a sending scenario asked for.
    pub fn send(phase: &crate::cli::PhaseArgs) -> Self {
        Timing::Send { duration: phase.duration, drain: phase.drain }
    }
}

/// "`<B>` B bodies, `<send>` send + `<drain>` drain", the tail of a sending
/// scenario's description.
pub fn describe_sending(payload: usize, phase: &crate::cli::PhaseArgs) -> String {
    format!(
        "{payload} B bodies, {} send + {} drain",
        humantime::format_duration(phase.duration),
        humantime::format_duration(phase.drain)
    )
}

/// A scenario made concrete.
#[derive(Debug, Clone)]
pub struct Plan {
    /// One line saying what the run does.
    pub description: String,
    pub rooms: Vec<String>,
    pub specs: Vec<Spec>,
    pub timing: Timing,
    pub warnings: Vec<String>,
}

impl Plan {
    pub fn senders(&self) -> usize {
        self.specs.iter().filter(|s| s.send.is_some()).count()
    }

    pub fn joins(&self) -> usize {
        self.specs.iter().map(|s| s.joins.len()).sum()
    }
}

/// Build the plan of a scenario.
pub fn plan(s: &Scenario) -> Result<Plan> {
    match s {
        Scenario::Fanout(a) => fanout::plan(a),
        Scenario::Chat(a) => chat::plan(a),
        Scenario::Connect(a) => connect::plan(a),
        Scenario::Idle(a) => idle::plan(a),
        Scenario::Sweep(a) => plan(&a.target.scenario()),
    }
}

/// `<prefix>-0 .. <prefix>-(n-1)`.
pub fn room_names(prefix: &str, n: usize) -> Vec<String> {
    (0..n).map(|i| format!("{prefix}-{i}")).collect()
}

/// The warning for a run whose sends were refused with `rate_limited`:
/// said only when the server did refuse some (a server started with higher
/// limits must not get the warning), with the per-connection rate sent.
pub fn rate_limited_warning(refused: u64, per_sender_rate: f64) -> Option<String> {
    (refused > 0).then(|| {
        format!(
            "{refused} sends were refused with rate_limited: each sending connection sent up to \
             {per_sender_rate:.0} msg/s, above the server's per-connection limit (default \
             {SERVER_DEFAULT_RATE:.0}/s, burst 200); run the server with a higher --rate/--burst"
        )
    })
}

impl Plan {
    /// The highest send rate of one connection, messages per second.
    pub fn max_sender_rate(&self) -> f64 {
        self.specs.iter().filter_map(|s| s.send.as_ref()).map(|s| 1e9 / s.schedule.interval_ns).fold(0.0, f64::max)
    }
}
