//! The per-connection token bucket that limits frames per second.

use std::time::Instant;

/// The configured limit: `rate` tokens a second, holding at most `burst`.
#[derive(Debug, Clone, Copy)]
pub struct Limit {
    pub rate: f64,
    pub burst: u32,
}

/// One connection's bucket. The limit is passed in rather than stored: every
/// connection keeps a bucket for as long as it lives.
pub struct TokenBucket {
    tokens: f64,
    refilled: Instant,
}

impl TokenBucket {
    pub fn new(limit: Limit, now: Instant) -> Self {
        Self { tokens: f64::from(limit.burst.max(1)), refilled: now }
    }

    /// Takes one token if there is one.
    pub fn try_take(&mut self, limit: Limit, now: Instant) -> bool {
        let elapsed = now.saturating_duration_since(self.refilled).as_secs_f64();
        self.tokens = (self.tokens + elapsed * limit.rate).min(f64::from(limit.burst.max(1)));
        self.refilled = now;
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn burst_then_rate() {
        let t0 = Instant::now();
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
