//! `fanout`: R rooms of M members each; P separate publisher connections,
//! which do not join, send at an aggregate rate X into the rooms. Publisher
//! p gets rooms p, p+P, p+2P, ... (or room p mod R when P >= R) and sends
//! its messages to them in turn, so every room gets traffic. Every acked
//! message is expected at each of the room's M members.

use anyhow::{bail, Result};

use super::{describe_sending, room_names, Plan, Timing};
use crate::cli::FanoutArgs;
use crate::pacer::Schedule;
use crate::session::{SendSpec, Spec};

pub fn plan(a: &FanoutArgs) -> Result<Plan> {
    let (r, m, p) = (a.rooms.rooms, a.rooms.members, a.publishers);
    if r == 0 || p == 0 {
        bail!("fanout needs --rooms and --publishers of at least 1");
    }
    if !(a.rate > 0.0 && a.rate.is_finite()) {
        bail!("--rate must be a positive number of messages per second");
    }
    let rooms = room_names(&a.rooms.room_prefix, r);
    let mut specs = Vec::with_capacity(r * m + p);
    for room in 0..r {
        for j in 0..m {
            specs.push(Spec { id: room * m + j, joins: vec![room], send: None });
        }
    }
    let per_pub = a.rate / p as f64;
    let interval_ns = 1e9 / per_pub;
    for i in 0..p {
        let my_rooms: Vec<usize> = if p >= r { vec![i % r] } else { (i..r).step_by(p).collect() };
        specs.push(Spec {
            id: r * m + i,
            joins: vec![],
            send: Some(SendSpec {
                rooms: my_rooms,
                // Publishers take turns: together they send evenly spaced.
                schedule: Schedule { offset_ns: (i as f64 * 1e9 / a.rate) as u64, interval_ns },
                payload: a.payload,
            }),
        });
    }
    let mut warnings: Vec<String> = vec![];
    if m == 0 {
        warnings.push("--members 0: nothing will be delivered, only acks measured".into());
    }
    Ok(Plan {
        description: format!(
            "fanout: {r} rooms x {m} members, {p} publishers at {} msg/s in total ({per_pub:.1}/s each), {}",
            a.rate,
            describe_sending(a.payload, &a.phase)
        ),
        rooms,
        specs,
        timing: Timing::send(&a.phase),
        warnings,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cli::{PhaseArgs, RoomArgs};
    use std::time::Duration;

    fn args(rooms: usize, publishers: usize) -> FanoutArgs {
        FanoutArgs {
            rooms: RoomArgs { rooms, members: 3, room_prefix: "lg".into() },
            publishers,
            rate: 1000.0,
            payload: 100,
            phase: PhaseArgs { duration: Duration::from_secs(1), drain: Duration::from_secs(1) },
        }
    }

    #[test]
    fn every_room_gets_a_publisher() {
        let p = plan(&args(5, 2)).unwrap();
        assert_eq!(p.specs.len(), 5 * 3 + 2);
        let pubs: Vec<_> = p.specs.iter().filter_map(|s| s.send.as_ref()).collect();
        assert_eq!(pubs[0].rooms, vec![0, 2, 4]);
        assert_eq!(pubs[1].rooms, vec![1, 3]);
        assert_eq!(pubs[1].schedule.offset_ns, 1_000_000);
        assert_eq!(pubs[0].schedule.interval_ns, 2_000_000.0);
        // 500 msg/s each is above the server default, but no warning is
        // given before the server has refused anything.
        assert!(p.warnings.is_empty());
        assert_eq!(p.max_sender_rate(), 500.0);
        let p = plan(&args(2, 5)).unwrap();
        let pubs: Vec<_> = p.specs.iter().filter_map(|s| s.send.as_ref()).collect();
        assert_eq!(pubs[4].rooms, vec![0]);
        assert_eq!(p.joins(), 6);
    }
}
