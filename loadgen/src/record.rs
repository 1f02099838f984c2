//! `--record FILE`: what every connection saw, one JSON object a line, for
//! a later audit (`loadgen audit`, `audit.rs`) that needs more than counters:
//! which member got which message, in which epoch, across reconnects.
//!
//! Each line has `e` (the event), `t` (Unix ns on loadgen's clock) and `c`
//! (the connection number, which is also the `p` of its messages' marker):
//!
//! | `e` | event | other fields |
//! |---|---|---|
//! | `c` | connected (first time or after `--reconnect`) | `n` the node index (order of `--url`) |
//! | `j` | `joined` | `r` room index, `s` seq, `ep` epoch, `rc` recovered (or null), `since` (or null), `u` unsolicited (an epoch change while joined) |
//! | `l` | `left` | `r` |
//! | `m` | a message with a loadgen marker | `r`, `s`, `p`, `k` |
//! | `a` | an ack | `r`, `s`, `k` |
//! | `x` | an error frame | `k` (for a send, else null), `r` (or null), `code` |
//! | `z` | the connection ended | `why` |
//!
//! Lines are buffered and written by whoever records; `flush` at the end.

use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::Path;
use std::sync::Mutex;

use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};

use crate::stats::lock;

/// One recorded event (the line format above).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Event {
    pub e: String,
    pub t: u64,
    pub c: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub n: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub r: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub s: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ep: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rc: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub since: Option<u64>,
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub u: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub p: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub k: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub code: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub why: Option<String>,
}

impl Event {
    /// An event of kind `e` with no other field.
    pub fn new(e: &str, t: u64, c: u64) -> Self {
        Self {
            e: e.to_string(),
            t,
            c,
            n: None,
            r: None,
            s: None,
            ep: None,
            rc: None,
            since: None,
            u: false,
            p: None,
            k: None,
            code: None,
            why: None,
        }
    }
}

/// The open record file.
pub struct Recorder {
    out: Mutex<BufWriter<File>>,
}

impl Recorder {
    pub fn create(path: &Path) -> Result<Self> {
        let f = File::create(path).with_context(|| format!("cannot create --record {}", path.display()))?;
        Ok(Self { out: Mutex::new(BufWriter::with_capacity(1 << 20, f)) })
    }

    /// A delivery: the hot path, written without serde.
    pub fn message(&self, t: u64, c: u64, r: u64, s: u64, p: u64, k: u64) {
        let mut w = lock(&self.out);
        let _ = writeln!(w, r#"{{"e":"m","t":{t},"c":{c},"r":{r},"s":{s},"p":{p},"k":{k}}}"#);
    }

    pub fn event(&self, ev: &Event) {
        if let Ok(line) = serde_json::to_string(ev) {
            let mut w = lock(&self.out);
            let _ = writeln!(w, "{line}");
        }
    }

    pub fn flush(&self) -> Result<()> {
        lock(&self.out).flush().context("cannot write --record")
    }
}

/// Read a record file.
pub fn read(path: &Path) -> Result<Vec<Event>> {
    let text = std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
    let mut out = Vec::new();
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        // A line cut short by a killed loadgen is the last one: skip it.
        match serde_json::from_str(line) {
            Ok(ev) => out.push(ev),
            Err(e) if i + 1 == text.lines().count() => {
                eprintln!("loadgen: {}: last line unreadable ({e}), skipped", path.display());
            }
            Err(e) => return Err(e).with_context(|| format!("{}: line {}", path.display(), i + 1)),
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_round_trip() {
        let dir = std::env::temp_dir().join(format!("loadgen-record-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("r.jsonl");
        let rec = Recorder::create(&path).unwrap();
        rec.message(5, 1, 2, 3, 9, 4);
        let mut j = Event::new("j", 6, 1);
        j.r = Some(2);
        j.s = Some(3);
        j.ep = Some("e1".into());
        j.rc = Some(false);
        j.since = Some(1);
        j.u = true;
        rec.event(&j);
        rec.flush().unwrap();
        let evs = read(&path).unwrap();
        assert_eq!(evs.len(), 2);
        let mut m = Event::new("m", 5, 1);
        (m.r, m.s, m.p, m.k) = (Some(2), Some(3), Some(9), Some(4));
        assert_eq!(evs[0], m);
        assert_eq!(evs[1], j);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
