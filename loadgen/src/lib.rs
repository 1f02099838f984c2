//! loadgen: a load generator for the chorus WebSocket server.
//!
//! It opens thousands of authenticated WebSocket connections, joins them to
//! rooms, sends on an open-loop schedule, and measures what a user would
//! see (delivery, ack and connect latency as HDR histograms), whether the
//! server kept its promises (no seq gaps, duplicates or reorders; every
//! acked message delivered to every member), and, given the server's pid,
//! what it cost (CPU per delivered message, memory per connection).
//!
//! The binary is a thin shell over [`run`], so a test can drive a server
//! with a scenario and check the returned [`Summary`].

pub mod audit;
pub mod churn;
pub mod cli;
pub mod client;
pub mod clock;
pub mod compare;
pub mod engine;
pub mod frames;
pub mod histo;
pub mod interrupt;
pub mod limits;
pub mod merge;
pub mod pacer;
pub mod parse;
pub mod proc;
pub mod progress;
pub mod record;
pub mod report;
pub mod scenario;
pub mod session;
pub mod stats;
pub mod summary;
pub mod sweep;
pub mod sweep_report;
pub mod token;
pub mod verdict;

pub use cli::{Cli, Scenario};
pub use summary::Summary;

/// Run the scenario described by `cli` (progress on stderr unless
/// `--quiet`) and return every figure. Writing the table, `--json` and
/// `--report` is left to the caller ([`report`]).
pub async fn run(cli: Cli) -> anyhow::Result<Summary> {
    engine::run(cli).await
}
