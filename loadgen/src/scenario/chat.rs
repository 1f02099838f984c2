//! `chat`: R rooms of M members each, and every member also sends, at
//! `--rate-per-user`, into its own room(s). With `--rooms-per-user K` a
//! member of room r also joins rooms r+1 .. r+K-1 (mod R) and sends to its
//! K rooms in turn. A sender is a member of the room it sends to, so it
//! receives its own message: each acked message is expected at every member
//! of the room, the sender included.

use anyhow::{bail, Result};

use super::{describe_sending, room_names, Plan, Timing};
use crate::cli::ChatArgs;
use crate::pacer::Schedule;
use crate::session::{SendSpec, Spec};

pub fn plan(a: &ChatArgs) -> Result<Plan> {
    let (r, m, k) = (a.rooms.rooms, a.rooms.members, a.rooms_per_user);
    if r == 0 || m == 0 {
        bail!("chat needs --rooms and --members of at least 1");
    }
    if k == 0 || k > r {
        bail!("--rooms-per-user must be between 1 and --rooms ({r})");
    }
    if !(a.rate_per_user > 0.0 && a.rate_per_user.is_finite()) {
        bail!("--rate-per-user must be a positive number of messages per second");
    }
    let users = r * m;
    let interval_ns = 1e9 / a.rate_per_user;
    let rooms = room_names(&a.rooms.room_prefix, r);
    let specs = (0..users)
        .map(|u| {
            let base = u / m;
            let mine: Vec<usize> = (0..k).map(|j| (base + j) % r).collect();
            Spec {
                id: u,
                joins: mine.clone(),
                send: Some(SendSpec {
                    rooms: mine,
                    // Users take turns so the total is evenly spaced.
                    schedule: Schedule { offset_ns: (u as f64 * interval_ns / users as f64) as u64, interval_ns },
                    payload: a.payload,
                }),
            }
        })
        .collect();
    let total = users as f64 * a.rate_per_user;
    Ok(Plan {
        description: format!(
            "chat: {r} rooms x {m} members, each member in {k} room(s) sending {} msg/s \
             ({total:.0} msg/s in total), {}",
            a.rate_per_user,
            describe_sending(a.payload, &a.phase)
        ),
        rooms,
        specs,
        timing: Timing::send(&a.phase),
        warnings: vec![],
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cli::{PhaseArgs, RoomArgs};
    use std::time::Duration;

    #[test]
    fn members_send_to_their_rooms() {
        let a = ChatArgs {
            rooms: RoomArgs { rooms: 3, members: 2, room_prefix: "c".into() },
            rate_per_user: 2.0,
            rooms_per_user: 2,
            payload: 64,
            phase: PhaseArgs { duration: Duration::from_secs(1), drain: Duration::from_secs(1) },
        };
        let p = plan(&a).unwrap();
        assert_eq!(p.specs.len(), 6);
        assert_eq!(p.specs[5].joins, vec![2, 0]);
        assert_eq!(p.specs[5].send.as_ref().unwrap().rooms, vec![2, 0]);
        assert_eq!(p.rooms[2], "c-2");
        assert!(p.warnings.is_empty());
    }
}
