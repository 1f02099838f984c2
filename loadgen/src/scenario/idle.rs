//! `idle`: N authenticated connections, joined `--per-room` to a room, held
//! idle for `--duration`: with `--server-pid`, the server's resident memory
//! per connection (RSS with everything up minus RSS before connecting).

use anyhow::{bail, Result};

use super::{room_names, Plan, Timing};
use crate::cli::IdleArgs;
use crate::session::Spec;

pub fn plan(a: &IdleArgs) -> Result<Plan> {
    if a.connections == 0 || a.per_room == 0 {
        bail!("--connections and --per-room must be at least 1");
    }
    let n_rooms = a.connections.div_ceil(a.per_room);
    Ok(Plan {
        description: format!(
            "idle: {} connections, {} per room in {n_rooms} rooms, held {}",
            a.connections,
            a.per_room,
            humantime::format_duration(a.duration)
        ),
        rooms: room_names(&a.room_prefix, n_rooms),
        specs: (0..a.connections).map(|id| Spec { id, joins: vec![id / a.per_room], send: None }).collect(),
        timing: Timing::Hold(a.duration),
        warnings: vec![],
    })
}
