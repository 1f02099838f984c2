//! The result of a run, as data: every figure the table, the JSON file and
//! the plots show. Serializable both ways so that a test (or a script
//! comparing two runs) can read a `--json` file back.

use serde::{Deserialize, Serialize};

use crate::stats::{Hist, Tally};

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Summary {
    pub scenario: String,
    /// One line saying what the run did.
    pub description: String,
    /// The options of the run (the JWT secret left out).
    pub params: serde_json::Value,
    pub urls: Vec<String>,
    pub started_unix: u64,
    /// True when the run found no problem.
    pub ok: bool,
    pub phases: Phases,
    pub connections: Connections,
    pub joins: Joins,
    pub messages: Messages,
    pub latency: Latencies,
    /// (percentile, microseconds) points of each latency distribution.
    pub curves: Curves,
    /// Set with --server-pid.
    pub server: Option<ServerFigures>,
    /// Set with --presence.
    #[serde(default)]
    pub presence: Option<PresenceFigures>,
    /// Set with --churn.
    #[serde(default)]
    pub churn: Option<ChurnFigures>,
    pub loadgen: LoadgenFigures,
    /// What the server sent, as bytes on the wire.
    #[serde(default)]
    pub wire: WireFigures,
    /// Failures, errors and close codes, grouped by kind.
    pub events: Vec<Event>,
    /// Problems found, in words, one line per kind, with counts.
    pub problems: Vec<String>,
    pub warnings: Vec<String>,
    /// One point per second.
    pub timeline: Vec<Tick>,
    /// The latency histograms themselves (V2 deflate, base64), so that runs
    /// can be merged exactly (`loadgen merge`).
    #[serde(default)]
    pub histograms: crate::histo::Histograms,
    /// Per room: joined members, acked messages sent to it, deliveries
    /// received from it; a merge adds them room by room to check that every
    /// acked message reached every member, whichever process sent it.
    #[serde(default)]
    pub rooms: Vec<RoomCounts>,
}

/// One room's counters.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct RoomCounts {
    pub name: String,
    pub members: u64,
    pub acked: u64,
    pub delivered: u64,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Phases {
    /// When the send (or hold) phase started, seconds after loadgen began
    /// connecting (the timeline's time base).
    pub measure_at_s: f64,
    pub connect_s: f64,
    pub join_s: f64,
    pub send_s: f64,
    pub drain_s: f64,
    pub hold_s: f64,
    pub total_s: f64,
    /// The scheduled send phase as Unix times, seconds (0 without one): a
    /// merge checks that the runs' send phases overlap.
    #[serde(default)]
    pub send_start_unix_s: f64,
    #[serde(default)]
    pub send_end_unix_s: f64,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Connections {
    pub planned: u64,
    pub established: u64,
    pub failed: u64,
    /// Established connections per second of the connect phase.
    pub per_second: f64,
    /// Still open when loadgen started closing.
    pub open_at_end: u64,
}

/// `--presence`: what the presence subscribers received.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct PresenceFigures {
    /// Joins made with `"presence": true`.
    pub subscribers: u64,
    /// `presence_state` and `presence_diff` frames received, states among them.
    pub frames: u64,
    pub states: u64,
    /// `presence_diff` frames (frames - states).
    #[serde(default)]
    pub diffs: u64,
    pub frames_per_subscriber: f64,
    /// Subscribers whose view showed every member of their room, and how
    /// long after the first connection attempt the last of them did.
    pub complete: u64,
    pub complete_after_s: Option<f64>,
}

/// `--churn`: members leaving and rejoining during the measured phase, and
/// the presence frames that cost the subscribers meanwhile.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct ChurnFigures {
    /// Churn events per second asked for (this process's share).
    pub rate: f64,
    /// `--churn-away`: how long a member stayed out before rejoining, s.
    #[serde(default)]
    pub away_s: f64,
    /// Leaves sent; rejoins answered with `joined`; rejoins whose `joined`
    /// said `recovered: false`; rejoins refused; events passed over because
    /// every member tried was still rejoining.
    pub leaves: u64,
    pub rejoins: u64,
    pub unrecovered: u64,
    pub failed: u64,
    pub skipped: u64,
    /// Leaves per second of the measured phase.
    pub per_s: f64,
    /// Presence frames received from the start of the measured phase to the
    /// end of the drain (the join storm's excluded): states (each rejoin
    /// gets a fresh one) and diffs, and all of them per subscriber.
    pub presence_frames: u64,
    pub presence_states: u64,
    pub presence_diffs: u64,
    pub presence_frames_per_subscriber: f64,
    /// The server's CPU over the send (or hold) phase divided by the leaves:
    /// all its CPU, messages included, so run with a low --rate to see the
    /// cost of churn and presence alone. Microseconds, with --server-pid.
    pub server_cpu_us_per_churn: Option<f64>,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Joins {
    pub planned: u64,
    pub joined: u64,
    pub failed: u64,
    /// Joins neither confirmed nor refused within --join-timeout.
    pub timed_out: u64,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Messages {
    /// Messages written to sockets.
    pub sent: u64,
    /// Messages acked (each one expected at every member of its room).
    pub acked: u64,
    /// Sent but not acked by the end of the drain phase.
    pub unacked: u64,
    /// sent / send phase length.
    pub sent_per_s: f64,
    /// Deliveries received (duplicates not counted).
    pub delivered: u64,
    /// Sum over rooms of acked x joined members.
    pub expected: u64,
    /// Sum over rooms of expected - delivered, where positive.
    pub missing: u64,
    /// Sum over rooms of delivered - expected, where positive (deliveries of
    /// messages whose ack had not arrived).
    pub extra: u64,
    /// delivered / send phase length.
    pub delivered_per_s: f64,
    /// Times a member's seq skipped ahead in a room, and the seqs skipped.
    pub gaps: u64,
    pub gap_seqs: u64,
    pub duplicates: u64,
    pub reorders: u64,
    /// Messages in our rooms without a loadgen marker, or in other rooms.
    pub foreign: u64,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Latencies {
    /// Receive time minus *scheduled* send time (includes any queueing in
    /// loadgen or the socket: the figure to quote).
    pub delivery: Percentiles,
    /// Receive time minus actual send time (the server's share alone).
    pub delivery_from_send: Percentiles,
    /// Ack time minus scheduled send time.
    pub ack: Percentiles,
    /// TCP connect + upgrade until the 101.
    pub connect: Percentiles,
}

/// Microseconds.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Percentiles {
    pub count: u64,
    pub min_us: f64,
    pub mean_us: f64,
    pub p50_us: f64,
    pub p90_us: f64,
    pub p99_us: f64,
    pub p999_us: f64,
    pub p9999_us: f64,
    pub max_us: f64,
}

impl Percentiles {
    pub fn from_hist(h: &Hist) -> Self {
        if h.is_empty() {
            return Self::default();
        }
        let us = |ns: u64| ns as f64 / 1000.0;
        Self {
            count: h.len(),
            min_us: us(h.min()),
            mean_us: h.mean() / 1000.0,
            p50_us: us(h.value_at_quantile(0.5)),
            p90_us: us(h.value_at_quantile(0.9)),
            p99_us: us(h.value_at_quantile(0.99)),
            p999_us: us(h.value_at_quantile(0.999)),
            p9999_us: us(h.value_at_quantile(0.9999)),
            max_us: us(h.max()),
        }
    }
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Curves {
    pub delivery: Vec<[f64; 2]>,
    pub delivery_from_send: Vec<[f64; 2]>,
    pub ack: Vec<[f64; 2]>,
    pub connect: Vec<[f64; 2]>,
}

/// Percentile curve points: 0% to 99.999% spaced evenly on a
/// log(1/(1-p)) axis, then the maximum at 100%.
pub fn curve(h: &Hist) -> Vec<[f64; 2]> {
    if h.is_empty() {
        return vec![];
    }
    let mut out = Vec::new();
    let steps = 100;
    for i in 0..=steps {
        let x = 5.0 * i as f64 / steps as f64;
        let q = 1.0 - 10f64.powf(-x);
        out.push([q * 100.0, h.value_at_quantile(q) as f64 / 1000.0]);
    }
    out.push([100.0, h.max() as f64 / 1000.0]);
    out
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct ServerFigures {
    pub pids: Vec<u32>,
    /// Server CPU seconds while connecting (and joining).
    pub cpu_s_connect: Option<f64>,
    /// Server CPU during the send phase alone.
    pub cpu_s_send: Option<f64>,
    /// Server CPU during the send and drain phases.
    pub cpu_s_send_drain: Option<f64>,
    /// cpu_s_send / deliveries received during the send phase, microseconds.
    pub cpu_us_per_delivery: Option<f64>,
    /// cpu_s_connect / established connections, microseconds.
    pub cpu_us_per_connection: Option<f64>,
    /// Server CPU during the send phase as a share of one core, percent.
    pub cpu_percent_send: Option<f64>,
    pub rss_before_bytes: Option<u64>,
    pub rss_connected_bytes: Option<u64>,
    pub rss_end_bytes: Option<u64>,
    /// (rss_connected - rss_before) / established connections.
    pub bytes_per_connection: Option<f64>,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct WireFigures {
    /// `--compression` was given.
    pub compression_offered: bool,
    /// Connections whose upgrade negotiated permessage-deflate.
    pub compressed_connections: u64,
    /// Bytes read from the server from the start of the measured phase to
    /// the end of the drain, WebSocket headers included.
    pub bytes_in: u64,
    /// `bytes_in` per delivered message (pings, acks and replies included).
    pub bytes_in_per_delivery: f64,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct LoadgenFigures {
    pub threads: usize,
    /// loadgen's CPU while connecting and joining.
    pub cpu_s_connect: f64,
    /// loadgen's CPU during the send (or hold) phase.
    pub cpu_s: f64,
    /// The same as a share of one core, percent (100 x threads is all).
    pub cpu_percent: f64,
    pub rss_bytes: u64,
    pub open_files_limit: u64,
}

/// A kind of event and how often it happened.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Event {
    /// connect | join | error | close
    pub kind: String,
    pub key: String,
    pub count: u64,
    /// What the first one said.
    pub sample: String,
}

impl Event {
    pub fn from_tally(kind: &str, t: &Tally) -> Vec<Event> {
        t.0.iter()
            .map(|(k, (n, s))| Event { kind: kind.to_string(), key: k.clone(), count: *n, sample: s.clone() })
            .collect()
    }
}

/// One second of the run.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Tick {
    /// Seconds since loadgen started connecting.
    pub t_s: f64,
    pub phase: String,
    pub connections: u64,
    pub sent_per_s: f64,
    pub acked_per_s: f64,
    pub delivered_per_s: f64,
    /// p99 of the deliveries and acks of this second, ms.
    pub p99_delivery_ms: Option<f64>,
    pub p99_ack_ms: Option<f64>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_through_json() {
        let mut s = Summary { scenario: "fanout".into(), ..Default::default() };
        s.messages.delivered = 7;
        s.curves.ack = vec![[50.0, 12.5]];
        let text = serde_json::to_string(&s).unwrap();
        let back: Summary = serde_json::from_str(&text).unwrap();
        assert_eq!(back.messages.delivered, 7);
        assert_eq!(back.curves.ack, vec![[50.0, 12.5]]);
    }

    #[test]
    fn percentiles_and_curves() {
        let mut h = crate::stats::new_hist().unwrap();
        for v in 1..=1000u64 {
            h.record(v * 1000).unwrap();
        }
        let p = Percentiles::from_hist(&h);
        assert_eq!(p.count, 1000);
        assert!((p.p50_us - 500.0).abs() < 1.0);
        assert!((p.max_us - 1000.0).abs() < 1.0);
        let c = curve(&h);
        assert_eq!(c.first().map(|p| p[0]), Some(0.0));
        assert_eq!(c.last().map(|p| p[0]), Some(100.0));
        assert!(c.windows(2).all(|w| w[0][1] <= w[1][1]));
    }
}
