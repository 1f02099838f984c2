//! The per-connection token bucket that limits frames per second.

use std::time::Duration;

/// The configured limit: `rate` tokens a second, holding at most `burst`.
#[derive(Debug, Clone, Copy)]
pub struct Limit {
    pub rate: f64,
    pub burst: u32,
}

/// One connection's bucket. The limit is passed in rather than stored, and
/// time is the server's uptime in microseconds rather than an `Instant`
/// (8 bytes, not 16): every connection keeps a bucket for as long as it lives.
pub struct TokenBucket {
    tokens: f64,
    refilled_us: u64,
}

impl TokenBucket {
    /// `now` is the server's uptime.
    pub fn new(limit: Limit, now: Duration) -> Self {
        Self { tokens: f64::from(limit.burst.max(1)), refilled_us: micros(now) }
    }

    /// Takes one token if there is one.
    pub fn try_take(&mut self, limit: Limit, now: Duration) -> bool {
        let now_us = micros(now);
        let elapsed = now_us.saturating_sub(self.refilled_us) as f64 / 1e6;
        self.tokens = (self.tokens + elapsed * limit.rate).min(f64::from(limit.burst.max(1)));
        self.refilled_us = now_us;
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

fn micros(uptime: Duration) -> u64 {
    u64::try_from(uptime.as_micros()).unwrap_or(u64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn burst_then_rate() {
        let t0 = Duration::from_secs(5);
        let limit = Limit { rate: 10.0, burst: 3 };
        let mut b = TokenBucket::new(limit, t0);
        assert!((0..3).all(|_| b.try_take(limit, t0)));
        assert!(!b.try_take(limit, t0));
        assert!(b.try_take(limit, t0 + Duration::from_millis(100)));
        assert!(!b.try_take(limit, t0 + Duration::from_millis(100)));
        // A long pause refills only up to the burst.
        let later = t0 + Duration::from_secs(60);
        assert!((0..3).all(|_| b.try_take(limit, later)));
        assert!(!b.try_take(limit, later));
    }
}
