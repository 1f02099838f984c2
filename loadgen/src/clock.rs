//! One time base for the whole process: monotonic (an `Instant`) but
//! expressed as Unix nanoseconds, so that the scheduled send time written into
//! a message body and the receive time taken by another connection of the same
//! process are comparable, immune to wall-clock steps, and still readable as
//! dates by anyone who looks at a captured frame.

use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

#[derive(Clone, Copy, Debug)]
pub struct Clock {
    base: Instant,
    base_unix_ns: u64,
}

impl Clock {
    pub fn new() -> Self {
        let base = Instant::now();
        let base_unix_ns = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_nanos() as u64).unwrap_or(0);
        Self { base, base_unix_ns }
    }

    /// Now, in Unix nanoseconds on the monotonic time base.
    #[inline]
    pub fn now_ns(&self) -> u64 {
        self.ns_at(Instant::now())
    }

    /// The Unix-nanosecond value of an `Instant`.
    #[inline]
    pub fn ns_at(&self, at: Instant) -> u64 {
        self.base_unix_ns + at.saturating_duration_since(self.base).as_nanos() as u64
    }

    /// The `Instant` of a Unix-nanosecond value.
    #[inline]
    pub fn instant_at(&self, ns: u64) -> Instant {
        self.base + Duration::from_nanos(ns.saturating_sub(self.base_unix_ns))
    }

    /// Wall-clock seconds since the epoch (for `exp` and reports).
    pub fn unix_secs(&self) -> u64 {
        self.now_ns() / 1_000_000_000
    }
}

impl Default for Clock {
    fn default() -> Self {
        Self::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips() {
        let c = Clock::new();
        let now = Instant::now();
        let ns = c.ns_at(now);
        let back = c.instant_at(ns);
        let diff = if back > now { back - now } else { now - back };
        assert!(diff < Duration::from_micros(1));
        assert!(c.unix_secs() > 1_600_000_000);
    }
}
