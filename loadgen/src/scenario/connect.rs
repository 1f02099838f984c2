//! `connect`: a storm of N authenticated connections, as fast as
//! `--connect-concurrency` allows or at `--connect-rate`, measuring
//! connections per second and the connect latency (TCP connect + upgrade
//! until the 101). Nothing is joined or sent; the connections are held for
//! `--duration` (default 0) and closed.

use anyhow::{bail, Result};

use super::{Plan, Timing};
use crate::cli::ConnectArgs;
use crate::session::Spec;

pub fn plan(a: &ConnectArgs) -> Result<Plan> {
    if a.connections == 0 {
        bail!("--connections must be at least 1");
    }
    Ok(Plan {
        description: format!(
            "connect: {} authenticated connections, held {}",
            a.connections,
            humantime::format_duration(a.duration)
        ),
        rooms: vec![],
        specs: (0..a.connections).map(|id| Spec { id, joins: vec![], send: None }).collect(),
        timing: Timing::Hold(a.duration),
        warnings: vec![],
    })
}
