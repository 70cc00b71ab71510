//! Reconnection pacing: exponential backoff with full jitter, capped, reset on success.

use std::time::Duration;

/// Delays between reconnection attempts: 100 ms doubling up to `max`, each randomised so a
/// fleet of workers does not reconnect in lockstep.
#[derive(Debug, Clone)]
pub struct Backoff {
    base: Duration,
    max: Duration,
    attempt: u32,
}

impl Backoff {
    pub fn new(max: Duration) -> Self {
        Self {
            base: Duration::from_millis(100),
            max,
            attempt: 0,
        }
    }

    /// The next delay to wait.
    pub fn next_delay(&mut self) -> Duration {
        let exp = self.base.saturating_mul(1u32 << self.attempt.min(16));
        self.attempt = self.attempt.saturating_add(1);
        let cap = exp.min(self.max);
        // Full jitter between half the cap and the cap: never zero, never above max.
        let nanos = u64::try_from(cap.as_nanos()).unwrap_or(u64::MAX);
        Duration::from_nanos(nanos / 2 + jitter(nanos / 2 + 1))
    }

    /// Call after a success so the next failure starts small again.
    pub fn reset(&mut self) {
        self.attempt = 0;
    }
}

/// A cheap pseudo-random number below `bound`, from the clock; jitter needs no better.
fn jitter(bound: u64) -> u64 {
    let seed = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or_default();
    u64::from(seed).wrapping_mul(0x9E37_79B9_7F4A_7C15) % bound
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn delays_grow_stay_capped_and_reset() {
        let mut b = Backoff::new(Duration::from_secs(2));
        let first = b.next_delay();
        assert!(
            first >= Duration::from_millis(50) && first <= Duration::from_millis(100),
            "{first:?}"
        );
        for _ in 0..40 {
            let d = b.next_delay();
            assert!(
                d <= Duration::from_secs(2) && d >= Duration::from_millis(50),
                "{d:?}"
            );
        }
        assert!(
            b.next_delay() >= Duration::from_secs(1),
            "capped delays stay near the cap"
        );
        b.reset();
        assert!(b.next_delay() <= Duration::from_millis(100));
    }
}
