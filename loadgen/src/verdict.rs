//! What the figures mean, in words: one line per kind of problem with its
//! count (a thousand refused tokens are one line, not a thousand), and
//! warnings about the measurement itself.

use crate::summary::{Event, Summary};

/// The problems of a finished run.
pub fn problems(s: &Summary) -> Vec<String> {
    let mut out = Vec::new();
    for e in &s.events {
        out.push(describe(e, s.connections.planned, s.joins.planned));
    }
    if s.joins.timed_out > 0 {
        out.push(format!("{} joins got no answer within --join-timeout", s.joins.timed_out));
    }
    let m = &s.messages;
    if m.gaps > 0 {
        out.push(format!(
            "seq gaps: {} times a member's seq skipped ahead ({} seqs never received)",
            m.gaps, m.gap_seqs
        ));
    }
    if m.duplicates > 0 {
        out.push(format!("{} duplicate deliveries (same seq twice)", m.duplicates));
    }
    if m.reorders > 0 {
        out.push(format!("{} deliveries out of order (seq lower than one already received)", m.reorders));
    }
    if m.missing > 0 {
        out.push(format!(
            "{} of {} expected deliveries missing (acked messages x room members)",
            m.missing, m.expected
        ));
    }
    if m.unacked > 0 {
        out.push(format!("{} of {} sent messages were never acked", m.unacked, m.sent));
    }
    if let Some(c) = &s.churn {
        if c.unrecovered > 0 {
            out.push(format!(
                "{} of {} churn rejoins said recovered: false (the server could not replay what the member missed)",
                c.unrecovered, c.rejoins
            ));
        }
        let open = c.leaves.saturating_sub(c.rejoins + c.failed);
        if open > 0 {
            out.push(format!("{open} of {} churn leaves were not rejoined by the end of the run", c.leaves));
        }
    }
    out
}

/// One event kind, in words.
pub fn describe(e: &Event, planned_conns: u64, planned_joins: u64) -> String {
    let n = e.count;
    match e.kind.as_str() {
        "connect" => format!("{n} of {planned_conns} connections failed: {}", e.sample),
        "join" => {
            let what = match e.key.as_str() {
                "bad_request" => "the server rejected the room name",
                "forbidden" => "the token does not allow the room",
                _ => "the join failed",
            };
            format!("{n} of {planned_joins} joins failed: {what} ({})", e.sample)
        }
        "error" => match e.key.as_str() {
            "rate_limited" => format!(
                "{n} sends refused with rate_limited: the send rate per connection is above \
                 the server's limit; start the server with a higher --rate/--burst ({})",
                e.sample
            ),
            _ => format!("{n} error frames `{}`: {}", e.key, e.sample),
        },
        "close" => {
            let why = if e.key.starts_with("close 1013") {
                "the server dropped them as slow consumers (1013)"
            } else if e.key.starts_with("close 1008") {
                "policy close (1008: token expired or flooding)"
            } else if e.key.starts_with("close 1001") {
                "the server is going away (1001: shutdown)"
            } else if e.key.starts_with("close 1009") {
                "message too large (1009)"
            } else if e.key.starts_with("close 1011") {
                "server internal error (1011)"
            } else {
                "ended before loadgen closed them"
            };
            format!("{n} connections closed by the server: {why} [{}]", e.key)
        }
        _ => format!("{n} x {}: {}", e.key, e.sample),
    }
}
