//! `loadgen audit`: the verdict of a chaos run, from what every connection
//! recorded (`--record`, see `record.rs`), the faults the run injected and,
//! with `--durable-acks`, the rows the database holds.
//!
//! Messages are told apart by their marker (publisher `p`, counter `k`), so
//! a message keeps its identity across epochs and reconnects. For each
//! member and room, the audit walks what the member saw in order:
//!
//! - within an epoch, seqs go up by one from the seq of the `joined` that
//!   started it: a skip is a **gap**, a seq already seen a **duplicate** or
//!   **reorder**, whatever the member did in between (a rejoin with `since`
//!   answered `recovered: true` must replay exactly what it missed);
//! - a new epoch (an unsolicited `joined`, or a rejoin answered `recovered:
//!   false`) is allowed only when a fault explains it: Redis lost its data
//!   (a `redis-wipe` fault between the old epoch's start and the change),
//!   and never with `--durable-acks` (the database keeps the sequence); a
//!   `recovered: false` in the same epoch only when more than the history
//!   size was missed;
//! - at the end, a member still joined must have every acked message of its
//!   epoch past the seq it started from (gaps aside, its last seq is at
//!   least the highest acked one); a member whose connection ended for good
//!   before the end is a violation of its own.
//!
//! An acked message nobody received is a violation unless Redis lost its
//! data within 10 s after the ack (without `--durable-acks`). The ack's seq must be the
//! seq members got. With `--durable-acks`, every acked and every delivered
//! message must be in the database exactly once, with that room and seq.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fmt::Write as _;

use crate::record::Event;

/// How long after its ack a message may still be lost to Redis losing its
/// data (it is normally delivered within milliseconds; a paused node
/// delivers it when it wakes).
const LOSS_WINDOW_NS: u64 = 10_000_000_000;

/// One fault the chaos script injected.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Fault {
    pub start_ns: u64,
    pub end_ns: u64,
    /// `pause`, `redis-cut`, `redis-wipe`, `kill`, `term`, `pg-cut`, `slow`.
    pub kind: String,
    pub what: String,
}

/// Parse the script's fault lines: `start_ns end_ns kind what...`.
pub fn parse_faults(text: &str) -> Result<Vec<Fault>, String> {
    let mut out = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let mut w = line.splitn(4, char::is_whitespace);
        let bad = || format!("faults line {}: expected `start_ns end_ns kind what`: {line}", i + 1);
        let start_ns = w.next().and_then(|x| x.parse().ok()).ok_or_else(bad)?;
        let end_ns = w.next().and_then(|x| x.parse().ok()).ok_or_else(bad)?;
        let kind = w.next().ok_or_else(bad)?.to_string();
        out.push(Fault { start_ns, end_ns, kind, what: w.next().unwrap_or("").trim().to_string() });
    }
    Ok(out)
}

/// A row of the database's `messages`: room, seq and the body's marker.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DbRow {
    pub room: String,
    pub seq: u64,
    pub p: u64,
    pub k: u64,
}

/// Parse `room<TAB>seq<TAB>p<TAB>k` lines (psql's unaligned output); rows
/// whose body has no marker (empty p or k) are skipped.
pub fn parse_db(text: &str) -> Vec<DbRow> {
    text.lines()
        .filter_map(|l| {
            let mut w = l.split('\t');
            let room = w.next()?.to_string();
            let seq = w.next()?.trim().parse().ok()?;
            let p = w.next()?.trim().parse().ok()?;
            let k = w.next()?.trim().parse().ok()?;
            Some(DbRow { room, seq, p, k })
        })
        .collect()
}

/// What the audit reads.
#[derive(Debug, Clone, Default)]
pub struct Input {
    pub rooms: Vec<String>,
    pub events: Vec<Event>,
    pub faults: Vec<Fault>,
    /// The database's rows, when the run had `--durable-acks`.
    pub db: Option<Vec<DbRow>>,
    pub durable: bool,
    /// The server's `--history-size`: a rejoin that missed more may be
    /// answered `recovered: false`.
    pub history_size: u64,
    /// Times are printed relative to this (Unix ns): the send phase's start.
    pub t0_ns: u64,
}

/// One broken promise.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Violation {
    pub t_ns: u64,
    pub kind: &'static str,
    pub room: String,
    pub seq: Option<u64>,
    pub what: String,
}

/// The figures and the violations.
#[derive(Debug, Clone, Default)]
pub struct Audit {
    pub acked: u64,
    pub send_errors: BTreeMap<String, u64>,
    pub delivered: u64,
    /// Deliveries of messages whose send was never acked.
    pub delivered_unacked: u64,
    pub members: u64,
    pub reconnects: u64,
    /// Connections ended by the server or the network, by how.
    pub ends: BTreeMap<String, u64>,
    pub rejoins: u64,
    pub rejoins_unrecovered: u64,
    pub epoch_changes: u64,
    /// Acked messages lost where a fault allowed it (Redis lost its data).
    pub lost_allowed: u64,
    /// Member deliveries missed across an allowed epoch change.
    pub missed_allowed: u64,
    pub db_rows: Option<u64>,
    /// Database rows of messages never acked (the ack was lost with its
    /// connection, or the send was answered `unavailable`).
    pub db_unacked: u64,
    pub violations: Vec<Violation>,
}

/// Where a member is in one room.
struct Member {
    epoch: Option<String>,
    /// When this epoch started for the member (its `joined`).
    epoch_t: u64,
    /// The seq the epoch started from (the `joined`'s).
    start: u64,
    last: u64,
    /// Time of the last delivery or join.
    last_t: u64,
}

/// Whether the connection is up (false after a `z` until the next `c`).
#[derive(Default)]
struct Conn {
    up: bool,
    ended_t: u64,
    ended_why: String,
    connects: u64,
}

pub fn audit(inp: &Input) -> Audit {
    let mut a = Audit::default();
    let room_name = |r: u64| inp.rooms.get(r as usize).cloned().unwrap_or_else(|| format!("#{r}"));
    let wipes: Vec<u64> = inp.faults.iter().filter(|f| f.kind == "redis-wipe").map(|f| f.start_ns).collect();
    let wiped_between = |from: u64, to: u64| wipes.iter().any(|&w| w >= from && w <= to);

    // Acks and send errors first: (p, k) -> (room, seq, t).
    let mut acked: HashMap<(u64, u64), (u64, u64, u64)> = HashMap::new();
    for ev in &inp.events {
        match ev.e.as_str() {
            "a" => {
                if let (Some(k), Some(r), Some(s)) = (ev.k, ev.r, ev.s) {
                    acked.insert((ev.c, k), (r, s, ev.t));
                }
            }
            "x" if ev.k.is_some() => {
                *a.send_errors.entry(ev.code.clone().unwrap_or_default()).or_default() += 1;
            }
            _ => {}
        }
    }
    a.acked = acked.len() as u64;

    let mut members: HashMap<(u64, u64), Member> = HashMap::new();
    let mut conns: HashMap<u64, Conn> = HashMap::new();
    // (p, k) -> (room, epoch, seq) as first delivered.
    let mut delivered: HashMap<(u64, u64), (u64, String, u64)> = HashMap::new();
    let mut seen: HashSet<(u64, u64, u64)> = HashSet::new();
    let mut v = Vec::new();
    for ev in &inp.events {
        let c = ev.c;
        match ev.e.as_str() {
            "c" => {
                let cn = conns.entry(c).or_default();
                cn.up = true;
                cn.connects += 1;
                if cn.connects > 1 {
                    a.reconnects += 1;
                }
            }
            "z" => {
                let cn = conns.entry(c).or_default();
                cn.up = false;
                cn.ended_t = ev.t;
                cn.ended_why = ev.why.clone().unwrap_or_default();
                *a.ends.entry(cn.ended_why.clone()).or_default() += 1;
            }
            "j" => {
                let Some(r) = ev.r else { continue };
                let (seq, epoch) = (ev.s.unwrap_or(0), ev.ep.clone());
                let Some(m) = members.get_mut(&(c, r)) else {
                    a.members += 1;
                    members.insert((c, r), Member { epoch, epoch_t: ev.t, start: seq, last: seq, last_t: ev.t });
                    continue;
                };
                let rejoin = ev.since.is_some();
                if rejoin {
                    a.rejoins += 1;
                }
                let changed = epoch != m.epoch;
                if rejoin && ev.rc == Some(true) {
                    if changed {
                        v.push(Violation {
                            t_ns: ev.t,
                            kind: "recovered-new-epoch",
                            room: room_name(r),
                            seq: Some(seq),
                            what: format!(
                                "member {c}: rejoin said recovered: true but the epoch went from {:?} to {:?}",
                                m.epoch, epoch
                            ),
                        });
                        (m.epoch, m.epoch_t, m.start, m.last) = (epoch, ev.t, seq, seq);
                    }
                    continue;
                }
                let unrecovered = rejoin && ev.rc == Some(false);
                if !changed && !unrecovered {
                    // A repeated `joined` of the same epoch: nothing lost.
                    continue;
                }
                if rejoin {
                    a.rejoins_unrecovered += 1;
                }
                // The member's coverage breaks here: allowed only when a
                // fault explains it.
                let explained = if changed {
                    a.epoch_changes += 1;
                    !inp.durable && wiped_between(m.epoch_t, ev.t)
                } else {
                    // Same epoch, recovered: false: history no longer held
                    // what the member missed.
                    seq.saturating_sub(ev.since.unwrap_or(0)) > inp.history_size
                };
                if explained {
                    let missed = acked
                        .iter()
                        .filter(|(pk, (ar, s, _))| {
                            *ar == r
                                && *s > m.last
                                && delivered.get(*pk).is_some_and(|(_, e, _)| Some(e) == m.epoch.as_ref())
                        })
                        .count();
                    a.missed_allowed += missed as u64;
                } else {
                    let why = if changed {
                        if inp.durable {
                            "with --durable-acks the epoch must never change"
                        } else {
                            "no fault made Redis lose its data"
                        }
                    } else {
                        "recovered: false although history holds what it missed"
                    };
                    v.push(Violation {
                        t_ns: ev.t,
                        kind: if changed { "new-epoch" } else { "unrecovered" },
                        room: room_name(r),
                        seq: Some(m.last),
                        what: format!(
                            "member {c}: {} from epoch {:?} seq {} to epoch {:?} seq {seq}: {why}",
                            if rejoin { "rejoin answered recovered: false" } else { "unsolicited joined" },
                            m.epoch.as_deref().unwrap_or(""),
                            m.last,
                            epoch.as_deref().unwrap_or(""),
                        ),
                    });
                }
                (m.epoch, m.epoch_t, m.start, m.last, m.last_t) = (epoch, ev.t, seq, seq, ev.t);
            }
            "m" => {
                let (Some(r), Some(s), Some(p), Some(k)) = (ev.r, ev.s, ev.p, ev.k) else { continue };
                a.delivered += 1;
                if !acked.contains_key(&(p, k)) {
                    a.delivered_unacked += 1;
                }
                let Some(m) = members.get_mut(&(c, r)) else {
                    v.push(Violation {
                        t_ns: ev.t,
                        kind: "foreign",
                        room: room_name(r),
                        seq: Some(s),
                        what: format!("member {c} got a message of a room it never joined"),
                    });
                    continue;
                };
                let epoch = m.epoch.clone().unwrap_or_default();
                if !seen.insert((c, p, k)) {
                    v.push(Violation {
                        t_ns: ev.t,
                        kind: "duplicate",
                        room: room_name(r),
                        seq: Some(s),
                        what: format!("member {c} got message {p}/{k} twice"),
                    });
                    continue;
                }
                if s == m.last + 1 {
                    m.last = s;
                } else if s > m.last + 1 {
                    v.push(Violation {
                        t_ns: ev.t,
                        kind: "gap",
                        room: room_name(r),
                        seq: Some(m.last + 1),
                        what: format!(
                            "member {c}: seqs {}..{} of epoch {epoch:?} never delivered (next came {s})",
                            m.last + 1,
                            s - 1
                        ),
                    });
                    m.last = s;
                } else {
                    v.push(Violation {
                        t_ns: ev.t,
                        kind: "reorder",
                        room: room_name(r),
                        seq: Some(s),
                        what: format!("member {c}: seq {s} after seq {} (epoch {epoch:?})", m.last),
                    });
                }
                m.last_t = ev.t;
                match delivered.get(&(p, k)) {
                    None => {
                        delivered.insert((p, k), (r, epoch, s));
                    }
                    Some((r0, e0, s0)) if (*r0, e0.as_str(), *s0) != (r, epoch.as_str(), s) => v.push(Violation {
                        t_ns: ev.t,
                        kind: "seq-mismatch",
                        room: room_name(r),
                        seq: Some(s),
                        what: format!(
                            "message {p}/{k} reached member {c} as {} seq {s} (epoch {epoch:?}), others as {} seq {s0} (epoch {e0:?})",
                            room_name(r),
                            room_name(*r0)
                        ),
                    }),
                    Some(_) => {}
                }
            }
            _ => {}
        }
    }

    // Acked messages: each with the seq members got, and delivered.
    let mut acked_in: HashMap<(u64, String), u64> = HashMap::new();
    let mut sorted: Vec<_> = acked.iter().collect();
    sorted.sort_by_key(|(_, (_, _, t))| *t);
    for (&(p, k), &(r, s, t)) in sorted {
        match delivered.get(&(p, k)) {
            Some((dr, e, ds)) => {
                if (*dr, *ds) != (r, s) {
                    v.push(Violation {
                        t_ns: t,
                        kind: "ack-mismatch",
                        room: room_name(r),
                        seq: Some(s),
                        what: format!("message {p}/{k} acked as seq {s}, delivered as {} seq {ds}", room_name(*dr)),
                    });
                }
                let top = acked_in.entry((r, e.clone())).or_default();
                *top = (*top).max(s);
            }
            None if !inp.durable && wipes.iter().any(|&w| w >= t && w - t <= LOSS_WINDOW_NS) => a.lost_allowed += 1,
            None => v.push(Violation {
                t_ns: t,
                kind: "lost",
                room: room_name(r),
                seq: Some(s),
                what: format!("message {p}/{k} was acked and reached no member"),
            }),
        }
    }

    // Members at the end: every acked message of their epoch.
    let end_t = inp.events.iter().map(|e| e.t).max().unwrap_or(0);
    let mut keys: Vec<_> = members.keys().copied().collect();
    keys.sort_unstable();
    for (c, r) in keys {
        let m = &members[&(c, r)];
        if let Some(cn) = conns.get(&c).filter(|cn| !cn.up) {
            v.push(Violation {
                t_ns: cn.ended_t,
                kind: "gone",
                room: room_name(r),
                seq: Some(m.last),
                what: format!("member {c}'s connection ended ({}) and never came back", cn.ended_why),
            });
            continue;
        }
        let top = acked_in.get(&(r, m.epoch.clone().unwrap_or_default())).copied().unwrap_or(0);
        if top > m.last {
            v.push(Violation {
                t_ns: end_t,
                kind: "missing",
                room: room_name(r),
                seq: Some(m.last + 1),
                what: format!(
                    "member {c} stayed joined but got nothing after seq {} of epoch {:?}; seq {top} was acked",
                    m.last,
                    m.epoch.as_deref().unwrap_or("")
                ),
            });
        }
    }

    // The database (--durable-acks).
    if let Some(rows) = &inp.db {
        a.db_rows = Some(rows.len() as u64);
        let mut by_pk: HashMap<(u64, u64), Vec<&DbRow>> = HashMap::new();
        for row in rows {
            by_pk.entry((row.p, row.k)).or_default().push(row);
        }
        for (pk, rs) in &by_pk {
            if rs.len() > 1 {
                v.push(Violation {
                    t_ns: end_t,
                    kind: "db-duplicate",
                    room: rs[0].room.clone(),
                    seq: Some(rs[0].seq),
                    what: format!("message {}/{} is in the database {} times", pk.0, pk.1, rs.len()),
                });
            }
            if !acked.contains_key(pk) {
                a.db_unacked += 1;
            }
        }
        for (&(p, k), &(r, s, t)) in &acked {
            match by_pk.get(&(p, k)).and_then(|rs| rs.first()) {
                None => v.push(Violation {
                    t_ns: t,
                    kind: "db-missing",
                    room: room_name(r),
                    seq: Some(s),
                    what: format!("message {p}/{k} was acked but is not in the database"),
                }),
                Some(row) if row.room != room_name(r) || row.seq != s => v.push(Violation {
                    t_ns: t,
                    kind: "db-mismatch",
                    room: room_name(r),
                    seq: Some(s),
                    what: format!("message {p}/{k} acked as seq {s}, in the database as {} seq {}", row.room, row.seq),
                }),
                Some(_) => {}
            }
        }
        for (&(p, k), (r, _, s)) in &delivered {
            if !acked.contains_key(&(p, k)) && !by_pk.contains_key(&(p, k)) {
                v.push(Violation {
                    t_ns: end_t,
                    kind: "db-missing",
                    room: room_name(*r),
                    seq: Some(*s),
                    what: format!("message {p}/{k} was delivered but is not in the database"),
                });
            }
        }
    }
    v.sort_by(|x, y| (x.t_ns, x.kind, &x.room, x.seq).cmp(&(y.t_ns, y.kind, &y.room, y.seq)));
    a.violations = v;
    a
}

/// Most violation lines printed (all are counted by kind).
const MAX_LINES: usize = 40;

impl Audit {
    /// The report: figures, then the violations with room, seq and time.
    pub fn text(&self, t0_ns: u64) -> String {
        let mut o = String::new();
        let _ = writeln!(
            o,
            "audit: acked {}, delivered {} to {} members ({} of messages never acked), send errors {:?}",
            self.acked, self.delivered, self.members, self.delivered_unacked, self.send_errors
        );
        let _ = writeln!(
            o,
            "audit: reconnects {}, rejoins with since {} ({} recovered: false), epoch changes seen {}, connection ends {:?}",
            self.reconnects, self.rejoins, self.rejoins_unrecovered, self.epoch_changes, self.ends
        );
        let _ = writeln!(
            o,
            "audit: lost where Redis lost its data: {} acked messages, {} member deliveries",
            self.lost_allowed, self.missed_allowed
        );
        if let Some(n) = self.db_rows {
            let _ = writeln!(o, "audit: database rows {n}, of messages never acked {}", self.db_unacked);
        }
        let mut kinds: BTreeMap<&str, u64> = BTreeMap::new();
        for x in &self.violations {
            *kinds.entry(x.kind).or_default() += 1;
        }
        for x in self.violations.iter().take(MAX_LINES) {
            let t = (x.t_ns as f64 - t0_ns as f64) / 1e9;
            let seq = x.seq.map(|s| format!(" seq {s}")).unwrap_or_default();
            let _ = writeln!(o, "VIOLATION t={t:+.3}s {} room {}{seq}: {}", x.kind, x.room, x.what);
        }
        if self.violations.len() > MAX_LINES {
            let _ = writeln!(o, "... {} violations in all: {kinds:?}", self.violations.len());
        } else if !self.violations.is_empty() {
            let _ = writeln!(o, "violations by kind: {kinds:?}");
        }
        o
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ev(e: &str, t: u64, c: u64) -> Event {
        Event::new(e, t, c)
    }
    #[allow(clippy::too_many_arguments)]
    fn joined(t: u64, c: u64, r: u64, s: u64, ep: &str, since: Option<u64>, rc: Option<bool>, u: bool) -> Event {
        let mut x = ev("j", t, c);
        (x.r, x.s, x.ep, x.since, x.rc, x.u) = (Some(r), Some(s), Some(ep.into()), since, rc, u);
        x
    }
    fn msg(t: u64, c: u64, r: u64, s: u64, p: u64, k: u64) -> Event {
        let mut x = ev("m", t, c);
        (x.r, x.s, x.p, x.k) = (Some(r), Some(s), Some(p), Some(k));
        x
    }
    fn ack(t: u64, p: u64, r: u64, s: u64, k: u64) -> Event {
        let mut x = ev("a", t, p);
        (x.r, x.s, x.k) = (Some(r), Some(s), Some(k));
        x
    }
    fn input(events: Vec<Event>) -> Input {
        Input { rooms: vec!["a".into(), "b".into()], events, history_size: 1000, ..Input::default() }
    }
    fn kinds(a: &Audit) -> Vec<&'static str> {
        a.violations.iter().map(|v| v.kind).collect()
    }

    /// Two members, one reconnects and rejoins with since and gets the
    /// replay: no violation, every figure counted.
    #[test]
    fn a_clean_run_with_a_reconnect() {
        let mut z = ev("z", 25, 1);
        z.why = Some("eof without close frame".into());
        let mut c1 = ev("c", 30, 1);
        c1.n = Some(1);
        let a = audit(&input(vec![
            ev("c", 1, 1),
            ev("c", 1, 2),
            ev("c", 1, 9),
            joined(2, 1, 0, 5, "e1", None, None, false),
            joined(2, 2, 0, 5, "e1", None, None, false),
            ack(10, 9, 0, 6, 0),
            msg(11, 1, 0, 6, 9, 0),
            msg(11, 2, 0, 6, 9, 0),
            ack(20, 9, 0, 7, 1),
            msg(21, 2, 0, 7, 9, 1),
            z,
            c1,
            msg(31, 1, 0, 7, 9, 1),
            joined(32, 1, 0, 7, "e1", Some(6), Some(true), false),
            ack(40, 9, 0, 8, 2),
            msg(41, 1, 0, 8, 9, 2),
            msg(41, 2, 0, 8, 9, 2),
        ]));
        assert!(a.violations.is_empty(), "{:?}", a.violations);
        assert_eq!((a.acked, a.delivered, a.members, a.reconnects, a.rejoins), (3, 6, 2, 1, 1));
        assert_eq!(a.ends["eof without close frame"], 1);
    }

    #[test]
    fn gaps_duplicates_reorders_and_missing_messages_are_violations() {
        let a = audit(&input(vec![
            joined(1, 1, 0, 0, "e1", None, None, false),
            joined(1, 2, 0, 0, "e1", None, None, false),
            ack(2, 9, 0, 1, 0),
            ack(2, 9, 0, 2, 1),
            ack(2, 9, 0, 3, 2),
            msg(3, 1, 0, 1, 9, 0),
            msg(3, 1, 0, 3, 9, 2),
            msg(4, 1, 0, 3, 9, 2),
            msg(4, 1, 0, 2, 9, 1),
            msg(5, 2, 0, 1, 9, 0),
        ]));
        assert_eq!(kinds(&a), vec!["gap", "duplicate", "reorder", "missing"], "{:?}", a.violations);
        let gap = &a.violations[0];
        assert_eq!((gap.room.as_str(), gap.seq, gap.t_ns), ("a", Some(2), 3));
        assert!(a.text(0).contains("VIOLATION t=+0.000s gap room a seq 2"), "{}", a.text(0));
    }

    /// A new epoch is allowed after Redis lost its data, and what was
    /// acked in the old epoch but never delivered is counted, not blamed;
    /// without such a fault, or with --durable-acks, it is a violation.
    #[test]
    fn a_new_epoch_needs_a_fault() {
        let events = vec![
            joined(1, 1, 0, 0, "e1", None, None, false),
            ack(2, 9, 0, 1, 0),
            msg(3, 1, 0, 1, 9, 0),
            ack(4, 9, 0, 2, 1),
            msg(5, 2, 1, 1, 9, 1),
            joined(6, 1, 0, 0, "e2", None, Some(false), true),
            ack(7, 9, 0, 1, 2),
            msg(8, 1, 0, 1, 9, 2),
        ];
        // Message 9/1 was acked in e1 and reached nobody.
        let mut inp = input(events.into_iter().filter(|e| e.c != 2).collect());
        let a = audit(&inp);
        assert_eq!(kinds(&a), vec!["lost", "new-epoch"], "{:?}", a.violations);
        inp.faults = vec![Fault { start_ns: 5, end_ns: 5, kind: "redis-wipe".into(), what: String::new() }];
        let a = audit(&inp);
        assert!(a.violations.is_empty(), "{:?}", a.violations);
        assert_eq!((a.epoch_changes, a.lost_allowed), (1, 1));
        inp.durable = true;
        assert_eq!(kinds(&audit(&inp)), vec!["lost", "new-epoch"]);
    }

    /// A rejoin answered recovered: false in the same epoch is a violation
    /// unless the member missed more than history holds.
    #[test]
    fn unrecovered_rejoins() {
        let inp = input(vec![
            joined(1, 1, 0, 10, "e1", None, None, false),
            joined(2, 1, 0, 20, "e1", Some(10), Some(false), false),
            joined(3, 1, 0, 2000, "e1", Some(20), Some(false), false),
        ]);
        let a = audit(&inp);
        assert_eq!(kinds(&a), vec!["unrecovered"]);
        assert_eq!(a.rejoins_unrecovered, 2);
    }

    #[test]
    fn a_member_that_never_came_back_is_a_violation() {
        let mut z = ev("z", 5, 1);
        z.why = Some("close 1001 (going away)".into());
        let a = audit(&input(vec![ev("c", 0, 1), joined(1, 1, 0, 0, "e1", None, None, false), z]));
        assert_eq!(kinds(&a), vec!["gone"]);
        assert!(a.violations[0].what.contains("going away"));
    }

    #[test]
    fn the_database_must_hold_every_acked_message_once() {
        let mut inp = input(vec![
            joined(1, 1, 0, 0, "e1", None, None, false),
            ack(2, 9, 0, 1, 0),
            ack(2, 9, 0, 2, 1),
            ack(2, 9, 0, 3, 2),
            msg(3, 1, 0, 1, 9, 0),
            msg(3, 1, 0, 2, 9, 1),
            msg(3, 1, 0, 3, 9, 2),
            msg(3, 1, 0, 4, 9, 3),
        ]);
        inp.durable = true;
        let row = |seq, k| DbRow { room: "a".into(), seq, p: 9, k };
        inp.db = Some(vec![row(1, 0), row(1, 0), row(5, 1)]);
        let a = audit(&inp);
        let mut k = kinds(&a);
        k.sort_unstable();
        assert_eq!(k, vec!["db-duplicate", "db-mismatch", "db-missing", "db-missing"], "{:?}", a.violations);
        assert_eq!(a.db_rows, Some(3));
        assert_eq!(a.delivered_unacked, 1);
    }

    #[test]
    fn fault_and_db_files_parse() {
        let f = parse_faults("# start end kind what\n10 20 kill node2 (pid 7)\n30 30 redis-wipe\n").unwrap();
        assert_eq!(f.len(), 2);
        assert_eq!(
            (f[0].start_ns, f[0].end_ns, f[0].kind.as_str(), f[0].what.as_str()),
            (10, 20, "kill", "node2 (pid 7)")
        );
        assert_eq!(f[1].what, "");
        assert!(parse_faults("x y z").is_err());
        let rows = parse_db("lg-0\t1\t24\t0\nlg-1\t2\t\t\n");
        assert_eq!(rows, vec![DbRow { room: "lg-0".into(), seq: 1, p: 24, k: 0 }]);
    }
}
