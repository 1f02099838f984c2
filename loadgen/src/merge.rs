//! `loadgen merge`: the runs of several processes (one scenario split with
//! `--id/--of`, send phases aligned with `--start-at`) reported as one run.
//! Counters are added; latency histograms are decoded and added (never
//! percentiles averaged); per-room members, acks and deliveries are added
//! room by room, so "every acked message delivered to every member" is
//! checked across processes, whichever process sent a message. Before that
//! the runs are checked to belong together: the same scenario, distinct
//! parts of the same split, overlapping send phases.

use std::collections::BTreeMap;
use std::path::Path;

use anyhow::{bail, Context, Result};

use crate::histo;
use crate::stats::{new_hist, Hist};
use crate::summary::{curve, ChurnFigures, Event, Percentiles, PresenceFigures, RoomCounts, ServerFigures, Summary};
use crate::verdict;

/// Read a `--json` file of a single run.
pub fn read(path: &Path) -> Result<Summary> {
    let text = std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
    serde_json::from_str(&text).with_context(|| format!("{} is not a loadgen run's --json file", path.display()))
}

/// The split a run was part of: (id, of) from its options.
fn part(s: &Summary) -> (u64, u64) {
    let c = &s.params["common"];
    (c["id"].as_u64().unwrap_or(0), c["of"].as_u64().unwrap_or(1))
}

/// Check that `runs` belong together; returns warnings for what is odd but
/// not wrong.
pub fn check(runs: &[(String, Summary)]) -> Result<Vec<String>> {
    let Some((first_name, first)) = runs.first() else {
        bail!("nothing to merge: give two or more --json files");
    };
    let mut warnings = Vec::new();
    let scenario = &first.params["scenario"];
    let (_, of) = part(first);
    let mut ids = Vec::new();
    for (name, r) in runs {
        if &r.params["scenario"] != scenario {
            bail!("{name} ran another scenario than {first_name}: {} vs {}", r.description, first.description);
        }
        let (id, o) = part(r);
        if o != of {
            bail!("{name} is part of a split over {o} processes, {first_name} of one over {of}");
        }
        if ids.contains(&id) {
            bail!("{name} is part {} of {of} like another run: the parts overlap", id + 1);
        }
        ids.push(id);
        let c = r.latency.delivery.count + r.latency.ack.count + r.latency.connect.count;
        if c > 0 && r.histograms == Default::default() {
            bail!("{name} has no histograms (written by an older loadgen?): it cannot be merged exactly");
        }
    }
    if of > 1 && ids.len() as u64 != of {
        warnings.push(format!("{} of the {of} parts were merged: the figures are not the whole scenario", ids.len()));
    }
    if of == 1 && runs.len() > 1 {
        warnings.push(
            "the runs were not split with --id/--of: each ran the whole scenario, so rooms and subs overlap".into(),
        );
    }
    let sending: Vec<_> = runs.iter().filter(|(_, r)| r.phases.send_end_unix_s > 0.0).collect();
    if sending.len() > 1 {
        let start = sending.iter().map(|(_, r)| r.phases.send_start_unix_s).fold(f64::MIN, f64::max);
        let end = sending.iter().map(|(_, r)| r.phases.send_end_unix_s).fold(f64::MAX, f64::min);
        if start >= end {
            bail!(
                "the send phases do not overlap (the latest starts {:.3} s after the earliest ends): \
                 start the processes with one --start-at",
                start - end
            );
        }
        let longest = sending.iter().map(|(_, r)| r.phases.send_end_unix_s - r.phases.send_start_unix_s);
        let longest = longest.fold(0.0, f64::max);
        let spread = sending.iter().map(|(_, r)| r.phases.send_start_unix_s).fold(f64::MIN, f64::max)
            - sending.iter().map(|(_, r)| r.phases.send_start_unix_s).fold(f64::MAX, f64::min);
        if spread > 0.01 * longest.max(1.0) {
            warnings.push(format!("the send phases started {spread:.3} s apart"));
        }
    }
    Ok(warnings)
}

fn add_hist(into: &mut Hist, name: &str, what: &str, encoded: &str) -> Result<()> {
    if encoded.is_empty() {
        return Ok(());
    }
    let h = histo::decode(encoded).with_context(|| format!("{name}: histograms.{what}"))?;
    into.add(h).with_context(|| format!("{name}: histograms.{what} does not fit"))?;
    Ok(())
}

/// Merge runs that belong together (see [`check`]) into one summary.
pub fn merge(runs: &[(String, Summary)]) -> Result<Summary> {
    let warnings = check(runs)?;
    let first = &runs[0].1;
    let mut out = Summary {
        scenario: first.scenario.clone(),
        description: format!(
            "{} (merged from {} runs)",
            first.description.split(" [part ").next().unwrap_or(&first.description),
            runs.len()
        ),
        params: first.params.clone(),
        urls: first.urls.clone(),
        started_unix: runs.iter().map(|(_, r)| r.started_unix).min().unwrap_or(0),
        ..Default::default()
    };
    if let Some(c) = out.params.get_mut("common") {
        c["id"] = serde_json::json!(0);
        c["of"] = serde_json::json!(1);
    }
    let (mut delivery, mut from_send, mut ack, mut connect) = (new_hist()?, new_hist()?, new_hist()?, new_hist()?);
    let mut rooms: BTreeMap<String, RoomCounts> = BTreeMap::new();
    let mut events: BTreeMap<(String, String), Event> = BTreeMap::new();
    for (name, r) in runs {
        add_hist(&mut delivery, name, "delivery", &r.histograms.delivery)?;
        add_hist(&mut from_send, name, "delivery_from_send", &r.histograms.delivery_from_send)?;
        add_hist(&mut ack, name, "ack", &r.histograms.ack)?;
        add_hist(&mut connect, name, "connect", &r.histograms.connect)?;
        let c = &mut out.connections;
        c.planned += r.connections.planned;
        c.established += r.connections.established;
        c.failed += r.connections.failed;
        c.per_second += r.connections.per_second;
        c.open_at_end += r.connections.open_at_end;
        let j = &mut out.joins;
        j.planned += r.joins.planned;
        j.joined += r.joins.joined;
        j.failed += r.joins.failed;
        j.timed_out += r.joins.timed_out;
        let (m, x) = (&mut out.messages, &r.messages);
        m.sent += x.sent;
        m.acked += x.acked;
        m.sent_per_s += x.sent_per_s;
        m.delivered += x.delivered;
        m.delivered_per_s += x.delivered_per_s;
        m.gaps += x.gaps;
        m.gap_seqs += x.gap_seqs;
        m.duplicates += x.duplicates;
        m.reorders += x.reorders;
        m.foreign += x.foreign;
        for room in &r.rooms {
            let e = rooms
                .entry(room.name.clone())
                .or_insert_with(|| RoomCounts { name: room.name.clone(), ..Default::default() });
            e.members += room.members;
            e.acked += room.acked;
            e.delivered += room.delivered;
        }
        for e in &r.events {
            events
                .entry((e.kind.clone(), e.key.clone()))
                .and_modify(|m| m.count += e.count)
                .or_insert_with(|| e.clone());
        }
        let p = &mut out.phases;
        p.connect_s = p.connect_s.max(r.phases.connect_s);
        p.join_s = p.join_s.max(r.phases.join_s);
        p.send_s = p.send_s.max(r.phases.send_s);
        p.drain_s = p.drain_s.max(r.phases.drain_s);
        p.hold_s = p.hold_s.max(r.phases.hold_s);
        p.total_s = p.total_s.max(r.phases.total_s);
        if r.phases.send_end_unix_s > 0.0 {
            p.send_start_unix_s = if p.send_start_unix_s == 0.0 {
                r.phases.send_start_unix_s
            } else {
                p.send_start_unix_s.min(r.phases.send_start_unix_s)
            };
            p.send_end_unix_s = p.send_end_unix_s.max(r.phases.send_end_unix_s);
        }
        let l = &mut out.loadgen;
        l.threads += r.loadgen.threads;
        l.cpu_s_connect += r.loadgen.cpu_s_connect;
        l.cpu_s += r.loadgen.cpu_s;
        l.cpu_percent += r.loadgen.cpu_percent;
        l.rss_bytes += r.loadgen.rss_bytes;
        l.open_files_limit = l.open_files_limit.max(r.loadgen.open_files_limit);
        out.warnings.extend(r.warnings.iter().map(|w| format!("{name}: {w}")));
    }
    out.warnings.extend(warnings);
    // Expected deliveries are counted over the whole: every acked message
    // of a room (from any process) at every member of it (in any process).
    let m = &mut out.messages;
    m.unacked = m.sent.saturating_sub(m.acked);
    for r in rooms.values() {
        let e = r.acked * r.members;
        m.expected += e;
        m.missing += e.saturating_sub(r.delivered);
        m.extra += r.delivered.saturating_sub(e);
    }
    out.rooms = rooms.into_values().collect();
    out.events = events.into_values().collect();
    out.server = merged_server(runs, out.messages.delivered, out.connections.established);
    out.presence = merged_presence(runs);
    out.churn = merged_churn(runs, out.presence.as_ref().map_or(0, |p| p.subscribers));
    out.latency.delivery = Percentiles::from_hist(&delivery);
    out.latency.delivery_from_send = Percentiles::from_hist(&from_send);
    out.latency.ack = Percentiles::from_hist(&ack);
    out.latency.connect = Percentiles::from_hist(&connect);
    out.curves.delivery = curve(&delivery);
    out.curves.delivery_from_send = curve(&from_send);
    out.curves.ack = curve(&ack);
    out.curves.connect = curve(&connect);
    out.histograms = histo::Histograms::encode(&delivery, &from_send, &ack, &connect);
    out.problems = verdict::problems(&out);
    out.ok = out.problems.is_empty();
    Ok(out)
}

/// The server figures of the whole. Parts that measured the same server
/// (the same `--server-pid`s) count it once: its figures are those of the
/// part whose send phase was longest. Parts that measured different servers
/// (each the nodes it talks to) add up: CPU, memory and CPU per delivery,
/// per connection and per byte are of every server over every part.
fn merged_server(runs: &[(String, Summary)], delivered: u64, established: u64) -> Option<ServerFigures> {
    let mut servers: Vec<(&ServerFigures, f64)> = Vec::new();
    for (_, r) in runs {
        let Some(s) = &r.server else { continue };
        let send_s = r.phases.send_s;
        match servers.iter_mut().find(|(known, _)| known.pids == s.pids) {
            Some(entry) if send_s > entry.1 => *entry = (s, send_s),
            Some(_) => {}
            None => servers.push((s, send_s)),
        }
    }
    let (first, rest) = servers.split_first()?;
    let mut s = first.0.clone();
    if !rest.is_empty() {
        let add = |a: Option<f64>, b: Option<f64>| Some(a? + b?);
        let add_u = |a: Option<u64>, b: Option<u64>| Some(a? + b?);
        for (other, _) in rest {
            s.pids.extend(&other.pids);
            s.cpu_s_connect = add(s.cpu_s_connect, other.cpu_s_connect);
            s.cpu_s_send = add(s.cpu_s_send, other.cpu_s_send);
            s.cpu_s_send_drain = add(s.cpu_s_send_drain, other.cpu_s_send_drain);
            s.cpu_percent_send = add(s.cpu_percent_send, other.cpu_percent_send);
            s.rss_before_bytes = add_u(s.rss_before_bytes, other.rss_before_bytes);
            s.rss_connected_bytes = add_u(s.rss_connected_bytes, other.rss_connected_bytes);
            s.rss_end_bytes = add_u(s.rss_end_bytes, other.rss_end_bytes);
        }
        s.cpu_us_per_connection = s.cpu_s_connect.filter(|_| established > 0).map(|c| c * 1e6 / established as f64);
        s.bytes_per_connection = match (s.rss_before_bytes, s.rss_connected_bytes) {
            (Some(before), Some(connected)) if established > 0 => {
                Some(connected.saturating_sub(before) as f64 / established as f64)
            }
            _ => None,
        };
    }
    s.cpu_us_per_delivery = s.cpu_s_send.filter(|_| delivered > 0).map(|c| c * 1e6 / delivered as f64);
    Some(s)
}

/// The parts' presence counters added (each part's subscribers are its own).
fn merged_presence(runs: &[(String, Summary)]) -> Option<PresenceFigures> {
    let mut out: Option<PresenceFigures> = None;
    for p in runs.iter().filter_map(|(_, r)| r.presence.as_ref()) {
        let o = out.get_or_insert_with(PresenceFigures::default);
        o.subscribers += p.subscribers;
        o.frames += p.frames;
        o.states += p.states;
        o.diffs += p.diffs;
        o.complete += p.complete;
        o.complete_after_s = match (o.complete_after_s, p.complete_after_s) {
            (Some(a), Some(b)) => Some(a.max(b)),
            (a, b) => a.or(b),
        };
    }
    if let Some(o) = &mut out {
        o.frames_per_subscriber = if o.subscribers > 0 { o.frames as f64 / o.subscribers as f64 } else { 0.0 };
    }
    out
}

/// The parts' churn added; the server's CPU per churn event is the most
/// CPU any part measured (they all measured the same server over about the
/// same phase) over every part's leaves.
fn merged_churn(runs: &[(String, Summary)], subscribers: u64) -> Option<ChurnFigures> {
    let mut out: Option<ChurnFigures> = None;
    let mut cpu_us: Option<f64> = None;
    for c in runs.iter().filter_map(|(_, r)| r.churn.as_ref()) {
        let o = out.get_or_insert_with(ChurnFigures::default);
        o.rate += c.rate;
        o.away_s = o.away_s.max(c.away_s);
        o.leaves += c.leaves;
        o.rejoins += c.rejoins;
        o.unrecovered += c.unrecovered;
        o.failed += c.failed;
        o.skipped += c.skipped;
        o.per_s += c.per_s;
        o.presence_frames += c.presence_frames;
        o.presence_states += c.presence_states;
        o.presence_diffs += c.presence_diffs;
        if let Some(us) = c.server_cpu_us_per_churn {
            cpu_us = Some(cpu_us.unwrap_or(0.0).max(us * c.leaves as f64));
        }
    }
    if let Some(o) = &mut out {
        o.presence_frames_per_subscriber =
            if subscribers > 0 { o.presence_frames as f64 / subscribers as f64 } else { 0.0 };
        o.server_cpu_us_per_churn = cpu_us.filter(|_| o.leaves > 0).map(|us| us / o.leaves as f64);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(id: u64, of: u64, scenario: &str) -> (String, Summary) {
        let mut s = Summary {
            params: serde_json::json!({"common": {"id": id, "of": of}, "scenario": {"scenario": scenario}}),
            ..Default::default()
        };
        s.phases.send_start_unix_s = 100.0;
        s.phases.send_end_unix_s = 110.0;
        (format!("run{id}"), s)
    }

    #[test]
    fn runs_must_belong_together() {
        assert!(check(&[run(0, 2, "fanout"), run(1, 2, "fanout")]).unwrap().is_empty());
        assert!(check(&[run(0, 2, "fanout"), run(1, 2, "chat")]).unwrap_err().to_string().contains("another scenario"));
        assert!(check(&[run(0, 2, "fanout"), run(0, 2, "fanout")]).unwrap_err().to_string().contains("overlap"));
        assert!(check(&[run(0, 2, "fanout"), run(1, 3, "fanout")]).is_err());
        assert!(check(&[run(0, 3, "fanout"), run(1, 3, "fanout")]).unwrap()[0].contains("2 of the 3 parts"));
        let mut late = run(1, 2, "fanout");
        late.1.phases.send_start_unix_s = 120.0;
        late.1.phases.send_end_unix_s = 130.0;
        assert!(check(&[run(0, 2, "fanout"), late]).unwrap_err().to_string().contains("do not overlap"));
    }

    #[test]
    fn rooms_are_checked_across_processes() {
        // Process 0 has the members and sent nothing; process 1 sent the
        // messages: every one of them is expected at process 0's members.
        let (mut a, mut b) = (run(0, 2, "fanout"), run(1, 2, "fanout"));
        a.1.rooms = vec![RoomCounts { name: "r".into(), members: 3, acked: 0, delivered: 29 }];
        b.1.rooms = vec![RoomCounts { name: "r".into(), members: 0, acked: 10, delivered: 0 }];
        a.1.messages.delivered = 29;
        b.1.messages.sent = 10;
        b.1.messages.acked = 10;
        let m = merge(&[a, b]).unwrap();
        assert_eq!((m.messages.expected, m.messages.missing, m.messages.delivered), (30, 1, 29));
        assert!(!m.ok);
        assert!(m.problems.iter().any(|p| p.contains("1 of 30 expected deliveries missing")));
    }

    #[test]
    fn servers_measured_by_different_parts_add_up() {
        let server = |pid: u32, cpu_s: f64, before: u64, connected: u64| ServerFigures {
            pids: vec![pid],
            cpu_s_connect: Some(cpu_s / 10.0),
            cpu_s_send: Some(cpu_s),
            rss_before_bytes: Some(before),
            rss_connected_bytes: Some(connected),
            ..Default::default()
        };
        let (mut a, mut b) = (run(0, 2, "fanout"), run(1, 2, "fanout"));
        for (part, delivered) in [(&mut a, 600), (&mut b, 400)] {
            part.1.messages.delivered = delivered;
            part.1.connections.established = 100;
        }
        // Each part measured its own node: both nodes' CPU and memory count.
        a.1.server = Some(server(1, 2.0, 1000, 101_000));
        b.1.server = Some(server(2, 3.0, 1000, 201_000));
        let m = merge(&[a.clone(), b.clone()]).unwrap().server.unwrap();
        assert_eq!(m.pids, vec![1, 2]);
        assert!((m.cpu_us_per_delivery.unwrap() - 5.0e6 / 1000.0).abs() < 1e-6);
        assert!((m.bytes_per_connection.unwrap() - 300_000.0 / 200.0).abs() < 1e-9);
        assert!((m.cpu_us_per_connection.unwrap() - 0.5e6 / 200.0).abs() < 1e-6);
        // Both measured the same node: it counts once.
        b.1.server = Some(server(1, 2.5, 1000, 101_000));
        let m = merge(&[a, b]).unwrap().server.unwrap();
        assert_eq!(m.pids, vec![1]);
        assert!(m.cpu_us_per_delivery.unwrap() <= 2.5e6 / 1000.0 + 1e-6);
    }

    #[test]
    fn presence_and_churn_add_up() {
        let (mut a, mut b) = (run(0, 2, "idle"), run(1, 2, "idle"));
        a.1.presence = Some(PresenceFigures {
            subscribers: 10,
            frames: 30,
            states: 10,
            diffs: 20,
            complete: 10,
            complete_after_s: Some(1.0),
            ..Default::default()
        });
        b.1.presence = Some(PresenceFigures {
            subscribers: 10,
            frames: 50,
            states: 20,
            diffs: 30,
            complete: 9,
            complete_after_s: Some(2.0),
            ..Default::default()
        });
        let churn = |leaves: u64, us: f64| ChurnFigures {
            rate: 5.0,
            leaves,
            rejoins: leaves,
            presence_frames: 20,
            presence_states: 5,
            presence_diffs: 15,
            server_cpu_us_per_churn: Some(us),
            ..Default::default()
        };
        a.1.churn = Some(churn(10, 100.0));
        b.1.churn = Some(churn(20, 40.0));
        let m = merge(&[a, b]).unwrap();
        let p = m.presence.unwrap();
        assert_eq!((p.subscribers, p.frames, p.states, p.diffs, p.complete), (20, 80, 30, 50, 19));
        assert_eq!((p.frames_per_subscriber, p.complete_after_s), (4.0, Some(2.0)));
        let c = m.churn.unwrap();
        assert_eq!((c.rate, c.leaves, c.rejoins, c.presence_frames, c.presence_diffs), (10.0, 30, 30, 40, 30));
        assert_eq!(c.presence_frames_per_subscriber, 2.0);
        // The server measured 1,000 us CPU (part a: 10 x 100) over 30 leaves.
        assert!((c.server_cpu_us_per_churn.unwrap() - 1000.0 / 30.0).abs() < 1e-9);
    }
}
