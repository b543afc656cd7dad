//! Keeps a log readable when the same problem repeats many times a second.

use std::time::{Duration, Instant};

/// Lets a repeated log line through at most once per period, counting what it held back.
pub struct RateLimited {
    period: Duration,
    last: Option<Instant>,
    skipped: u64,
}

impl RateLimited {
    pub fn new(period: Duration) -> RateLimited {
        RateLimited {
            period,
            last: None,
            skipped: 0,
        }
    }

    /// `Some(number held back since the last one)` when this occurrence may be logged.
    pub fn allow(&mut self) -> Option<u64> {
        let now = Instant::now();
        match self.last {
            Some(last) if now.duration_since(last) < self.period => {
                self.skipped += 1;
                None
            }
            _ => {
                self.last = Some(now);
                Some(std::mem::take(&mut self.skipped))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn repeated_lines_are_held_back_and_counted() {
        let mut limit = RateLimited::new(Duration::from_secs(60));
        assert_eq!(limit.allow(), Some(0));
        assert_eq!(limit.allow(), None);
        assert_eq!(limit.allow(), None);
        limit.last = Some(Instant::now() - Duration::from_secs(61));
        assert_eq!(limit.allow(), Some(2));
    }
}
