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
    /// Part `id` of `of`: the connections whose number n has n mod of = id
    /// (every room is kept, so room names and schedules stay those of the
    /// whole scenario and the parts add up to it).
    pub fn split(mut self, id: usize, of: usize) -> Result<Self> {
        if of == 0 || id >= of {
            anyhow::bail!("--id must be below --of (got --id {id} --of {of})");
        }
        if of == 1 {
            return Ok(self);
        }
        self.specs.retain(|s| s.id % of == id);
        self.description = format!("{} [part {} of {of}]", self.description, id + 1);
        Ok(self)
    }

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
        Scenario::Merge(_) | Scenario::Compare(_) | Scenario::Audit(_) => {
            anyhow::bail!("merge, compare and audit read runs, they do not run one")
        }
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cli::{FanoutArgs, PhaseArgs, RoomArgs};

    #[test]
    fn parts_split_without_overlap() {
        let a = FanoutArgs {
            rooms: RoomArgs { rooms: 4, members: 5, room_prefix: "lg".into() },
            publishers: 3,
            rate: 100.0,
            payload: 100,
            phase: PhaseArgs { duration: Duration::from_secs(1), drain: Duration::from_secs(1) },
        };
        let whole = plan(&Scenario::Fanout(a.clone())).unwrap();
        let mut ids: Vec<usize> = Vec::new();
        let mut senders = 0;
        for id in 0..3 {
            let p = plan(&Scenario::Fanout(a.clone())).unwrap().split(id, 3).unwrap();
            assert_eq!(p.rooms, whole.rooms);
            assert!(p.description.contains(&format!("part {} of 3", id + 1)));
            senders += p.senders();
            ids.extend(p.specs.iter().map(|s| s.id));
        }
        ids.sort_unstable();
        assert_eq!(ids, whole.specs.iter().map(|s| s.id).collect::<Vec<_>>());
        assert_eq!(senders, 3);
        assert!(plan(&Scenario::Fanout(a)).unwrap().split(3, 3).is_err());
    }
}
