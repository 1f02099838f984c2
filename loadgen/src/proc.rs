//! The server's side of the bill, read from /proc: CPU seconds
//! (utime + stime of /proc/PID/stat) and resident memory (VmRSS of
//! /proc/PID/status), summed over every `--server-pid`. The same code reads
//! loadgen's own CPU, to show it was not the bottleneck.

use anyhow::{bail, Context, Result};

/// CPU seconds (user + system) used so far by a process (`"self"` works).
pub fn cpu_seconds(pid: &str) -> Result<f64> {
    let path = format!("/proc/{pid}/stat");
    let text = std::fs::read_to_string(&path).with_context(|| format!("cannot read {path}"))?;
    parse_stat_cpu(&text, clock_ticks()).with_context(|| format!("cannot parse {path}"))
}

/// Resident set size in bytes.
pub fn rss_bytes(pid: &str) -> Result<u64> {
    let path = format!("/proc/{pid}/status");
    let text = std::fs::read_to_string(&path).with_context(|| format!("cannot read {path}"))?;
    parse_status_rss(&text).with_context(|| format!("no VmRSS in {path}"))
}

fn clock_ticks() -> f64 {
    // SAFETY: sysconf has no memory effects.
    let t = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if t > 0 {
        t as f64
    } else {
        100.0
    }
}

fn parse_stat_cpu(text: &str, ticks: f64) -> Option<f64> {
    // The command name (field 2) may hold spaces and parentheses: fields
    // start after the last ')'. There, index 0 is field 3 (state), so utime
    // (field 14) is index 11 and stime (field 15) index 12.
    let rest = &text[text.rfind(')')? + 1..];
    let mut it = rest.split_whitespace().skip(11);
    let utime: u64 = it.next()?.parse().ok()?;
    let stime: u64 = it.next()?.parse().ok()?;
    Some((utime + stime) as f64 / ticks)
}

fn parse_status_rss(text: &str) -> Option<u64> {
    let line = text.lines().find(|l| l.starts_with("VmRSS:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

/// The measured server processes.
#[derive(Clone, Debug, Default)]
pub struct ServerProcs {
    pids: Vec<u32>,
}

impl ServerProcs {
    /// Checks that every pid can be read now.
    pub fn new(pids: &[u32]) -> Result<Self> {
        for pid in pids {
            if cpu_seconds(&pid.to_string()).is_err() {
                bail!("--server-pid {pid}: no such process, or its /proc entry is not readable");
            }
        }
        Ok(Self { pids: pids.to_vec() })
    }

    pub fn is_empty(&self) -> bool {
        self.pids.is_empty()
    }

    pub fn pids(&self) -> &[u32] {
        &self.pids
    }

    /// Total CPU seconds, None when there are no pids or one vanished.
    pub fn cpu(&self) -> Option<f64> {
        if self.pids.is_empty() {
            return None;
        }
        self.pids.iter().map(|p| cpu_seconds(&p.to_string()).ok()).sum()
    }

    /// Total RSS bytes, None when there are no pids or one vanished.
    pub fn rss(&self) -> Option<u64> {
        if self.pids.is_empty() {
            return None;
        }
        self.pids.iter().map(|p| rss_bytes(&p.to_string()).ok()).sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_stat_with_odd_names() {
        let line = "1234 (my (weird) srv) S 1 2 3 4 5 6 7 8 9 10 250 50 0 0 20 0 4 0 100 0 0";
        assert_eq!(parse_stat_cpu(line, 100.0), Some(3.0));
    }

    #[test]
    fn reads_self() {
        assert!(cpu_seconds("self").unwrap() >= 0.0);
        assert!(rss_bytes("self").unwrap() > 0);
        let status = "Name:\tx\nVmRSS:\t  2048 kB\n";
        assert_eq!(parse_status_rss(status), Some(2 * 1024 * 1024));
    }
}
