//! Reconnect delays: exponential backoff with full jitter, a server-given delay as a floor.
//!
//! Pure: the caller passes the random draw, so tests replay exact delays.

use std::time::Duration;

/// Reconnect backoff bounds.
///
/// The delay before reconnect attempt `n` (0 for the first after a loss) is
/// `min(max, min + U(0, min(max, min * 2^n)))`: at least `min` (never a hot loop, even on a
/// connection that opens and dies at once), growing exponentially, and spread uniformly ("full
/// jitter") so that thousands of clients dropped at once do not come back at once. A delay the
/// server asked for (`Retry-After`, close 1013) is added under it as a floor.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Backoff {
    /// Smallest delay, and the step the exponential starts from. Default 500 ms.
    pub min: Duration,
    /// Largest delay (before a server floor is added). Default 20 s.
    pub max: Duration,
    /// A connection that stays up this long resets the attempt count: the next loss starts
    /// again at `min`. Default 10 s.
    pub reset_after: Duration,
}

impl Default for Backoff {
    fn default() -> Self {
        Self { min: Duration::from_millis(500), max: Duration::from_secs(20), reset_after: Duration::from_secs(10) }
    }
}

/// Attempt count a protocol error (close 1002/1007/1008/1009, HTTP 400-class refusals) jumps
/// to: the client does not come back quickly to a server that refuses what it sends.
pub(crate) const PROTOCOL_ERROR_ATTEMPT: u32 = 5;

impl Backoff {
    /// Checks the bounds.
    pub(crate) fn validate(&self) -> Result<(), &'static str> {
        if self.min.is_zero() {
            return Err("backoff min must be above zero");
        }
        if self.max < self.min {
            return Err("backoff max must be at least min");
        }
        Ok(())
    }

    /// The delay before attempt `attempt`, for a uniform draw `unit` in `[0, 1)`, with `floor`
    /// (a delay the server asked for) under it.
    pub fn delay(&self, attempt: u32, unit: f64, floor: Duration) -> Duration {
        let unit = unit.clamp(0.0, 1.0);
        let step = self.min.saturating_mul(1u32 << attempt.min(31)).min(self.max);
        let jitter = step.mul_f64(unit);
        floor + (self.min + jitter).min(self.max)
    }
}

/// The wait after a `goaway`: the edge's `reconnect_after` (already drawn at random by the
/// edge, within a second) plus up to a quarter more, so clients that got the same delay still
/// spread out. Bounded, because a draining edge's own dispatch endpoint answers only a little
/// while past the drain.
pub fn goaway_delay(after: Duration, unit: f64) -> Duration {
    after + after.mul_f64(unit.clamp(0.0, 1.0) * 0.25)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn b(min_ms: u64, max_ms: u64) -> Backoff {
        Backoff { min: Duration::from_millis(min_ms), max: Duration::from_millis(max_ms), ..Backoff::default() }
    }

    #[test]
    fn grows_exponentially_within_bounds() {
        let b = b(100, 5000);
        // The top of each attempt's range doubles until the cap.
        let tops: Vec<u128> = (0..8).map(|n| b.delay(n, 0.999_999, Duration::ZERO).as_millis()).collect();
        assert_eq!(tops, vec![199, 299, 499, 899, 1699, 3299, 5000, 5000]);
        // The bottom is always min: never a hot loop.
        for n in 0..40 {
            assert_eq!(b.delay(n, 0.0, Duration::ZERO), Duration::from_millis(100));
        }
    }

    #[test]
    fn full_jitter_spreads_uniformly() {
        let b = b(100, 60_000);
        let mut rng = fastrand::Rng::with_seed(7);
        let mut buckets = [0u32; 10];
        for _ in 0..10_000 {
            // Attempt 6: range 100 ms + U(0, 6.4 s).
            let d = b.delay(6, rng.f64(), Duration::ZERO).as_millis() as u64;
            assert!((100..6500).contains(&d), "{d}");
            buckets[((d - 100) / 640) as usize] += 1;
        }
        // Ten equal slices of the range each get about a tenth.
        for (i, n) in buckets.iter().enumerate() {
            assert!((850..1150).contains(n), "bucket {i}: {n} of 10000: {buckets:?}");
        }
    }

    #[test]
    fn server_delay_is_a_floor() {
        let b = b(100, 1000);
        let floor = Duration::from_secs(3);
        for n in [0, 3, 20] {
            for u in [0.0, 0.5, 0.99] {
                let d = b.delay(n, u, floor);
                assert!(d >= floor + Duration::from_millis(100) && d <= floor + Duration::from_millis(1000), "{d:?}");
            }
        }
    }

    #[test]
    fn huge_attempts_do_not_overflow() {
        let b = b(500, 20_000);
        assert_eq!(b.delay(u32::MAX, 0.999_999_9, Duration::ZERO), Duration::from_secs(20));
    }

    #[test]
    fn goaway_wait_is_jittered_and_bounded() {
        let after = Duration::from_millis(800);
        assert_eq!(goaway_delay(after, 0.0), after);
        assert_eq!(goaway_delay(after, 1.0), Duration::from_millis(1000));
        let mut rng = fastrand::Rng::with_seed(3);
        let ds: std::collections::BTreeSet<_> = (0..100).map(|_| goaway_delay(after, rng.f64())).collect();
        assert!(ds.len() > 90, "spread: {}", ds.len());
        assert_eq!(goaway_delay(Duration::ZERO, 0.7), Duration::ZERO);
    }

    #[test]
    fn validation() {
        assert!(b(0, 10).validate().is_err());
        assert!(b(10, 5).validate().is_err());
        assert!(Backoff::default().validate().is_ok());
    }
}
