//! Reconnect delays: exponential with full jitter, so a fleet that lost the cloud at the same
//! moment does not come back in lockstep.

use std::time::Duration;

use rand::Rng;

/// `delay(n)` is uniform in `[0, min(cap, base * 2^n)]`.
#[derive(Debug, Clone, Copy)]
pub struct Backoff {
    pub base: Duration,
    pub cap: Duration,
}

impl Default for Backoff {
    /// 250 ms doubling to a 2 s cap: a gateway is back within seconds of its uplink (an
    /// attempt costs one QUIC Initial of about 1.2 KB). A dial the cloud refused as busy waits
    /// [`after_busy`] instead, so a large fleet reconnecting at once is paced by the cloud.
    fn default() -> Self {
        Backoff {
            base: Duration::from_millis(250),
            cap: Duration::from_secs(2),
        }
    }
}

impl Backoff {
    /// The upper bound of the delay before attempt `attempt` (0-based).
    pub fn ceiling(&self, attempt: u32) -> Duration {
        let factor = 1u32.checked_shl(attempt.min(31)).unwrap_or(u32::MAX);
        self.base.saturating_mul(factor).min(self.cap)
    }

    /// A random delay before attempt `attempt`.
    pub fn delay(&self, attempt: u32, rng: &mut impl Rng) -> Duration {
        let ceiling = self.ceiling(attempt);
        if ceiling.is_zero() {
            return ceiling;
        }
        Duration::from_nanos(rng.random_range(0..=ceiling.as_nanos().min(u64::MAX as u128) as u64))
    }
}

/// The wait after the cloud refused a connection before any handshake because it was busy
/// (its handshake queue was full: a reconnect storm): 1 s doubling to an 8 s cap, uniform in
/// `[0, ceiling]`. Longer than [`Backoff::default`]'s 2 s, so a refused fleet comes back at
/// about the rate the cloud completes handshakes instead of re-dialling every second or two;
/// capped at 8 s, so an edge refused late in a storm is not left out for long (a fleet of
/// 10,000 is back well within a 50 s node grace period). `refusals` counts the consecutive
/// refusals, from 1. A dial that times out (no answer: the uplink is down) keeps the default
/// backoff, so a single edge whose uplink returns reconnects within seconds.
pub fn after_busy(refusals: u32, rng: &mut impl Rng) -> Duration {
    Backoff {
        base: Duration::from_secs(1),
        cap: BUSY_CAP,
    }
    .delay(refusals.saturating_sub(1), rng)
}

/// The longest wait after a busy refusal ([`after_busy`]).
pub const BUSY_CAP: Duration = Duration::from_secs(8);

/// The wait after the cloud closed this node's session because another connection with the
/// same identity took over (`REPLACED`): 5 s doubling to a 5 min cap, uniform in the upper half
/// of that ceiling (never short: two gateways sharing one identity must not replace each
/// other every second). `replacements` counts the consecutive replaced sessions, from 1.
pub fn after_replaced(replacements: u32, rng: &mut impl Rng) -> Duration {
    let ceiling = Backoff {
        base: Duration::from_secs(5),
        cap: Duration::from_secs(300),
    }
    .ceiling(replacements.saturating_sub(1));
    let half = ceiling / 2;
    half + Duration::from_nanos(rng.random_range(0..=half.as_nanos().min(u64::MAX as u128) as u64))
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;
    use rand::rngs::StdRng;

    #[test]
    fn ceiling_doubles_then_caps() {
        let b = Backoff {
            base: Duration::from_secs(1),
            cap: Duration::from_secs(60),
        };
        let secs: Vec<u64> = (0..9).map(|n| b.ceiling(n).as_secs()).collect();
        assert_eq!(secs, [1, 2, 4, 8, 16, 32, 60, 60, 60]);
        assert_eq!(b.ceiling(u32::MAX), Duration::from_secs(60));
        let ms: Vec<u128> = (0..5)
            .map(|n| Backoff::default().ceiling(n).as_millis())
            .collect();
        assert_eq!(
            ms,
            [250, 500, 1000, 2000, 2000],
            "the default keeps retrying fast"
        );
    }

    #[test]
    fn delays_stay_within_the_ceiling_and_spread_across_it() {
        let b = Backoff::default();
        let mut rng = StdRng::seed_from_u64(7);
        for attempt in 0..12 {
            let ceiling = b.ceiling(attempt);
            let samples: Vec<Duration> = (0..2000).map(|_| b.delay(attempt, &mut rng)).collect();
            assert!(samples.iter().all(|d| *d <= ceiling));
            let mean = samples.iter().map(|d| d.as_secs_f64()).sum::<f64>() / samples.len() as f64;
            let half = ceiling.as_secs_f64() / 2.0;
            assert!(
                (mean - half).abs() < half * 0.1,
                "attempt {attempt}: mean {mean} vs {half}"
            );
            let low = samples
                .iter()
                .filter(|d| d.as_secs_f64() < ceiling.as_secs_f64() / 4.0)
                .count();
            assert!(
                low > 300 && low < 700,
                "a quarter of the range holds about a quarter: {low}"
            );
        }
    }

    #[test]
    fn busy_refusals_wait_longer_than_the_default_but_at_most_eight_seconds() {
        let mut rng = StdRng::seed_from_u64(11);
        for (n, ceiling) in [(1, 1.0), (2, 2.0), (3, 4.0), (4, 8.0), (5, 8.0), (60, 8.0)] {
            let samples: Vec<f64> = (0..2000)
                .map(|_| after_busy(n, &mut rng).as_secs_f64())
                .collect();
            assert!(
                samples.iter().all(|d| (0.0..=ceiling).contains(d)),
                "refusal {n}: within 0..={ceiling}s"
            );
            let mean = samples.iter().sum::<f64>() / samples.len() as f64;
            assert!(
                (mean - ceiling / 2.0).abs() < ceiling * 0.05,
                "refusal {n}: jittered over the whole range, mean {mean}"
            );
        }
        assert_eq!(BUSY_CAP, Duration::from_secs(8));
        assert!(
            BUSY_CAP > Backoff::default().cap,
            "a refused edge backs off harder than one whose dial failed"
        );
        // 0 (no refusal counted yet) is treated as the first.
        assert!(after_busy(0, &mut rng) <= Duration::from_secs(1));
    }

    #[test]
    fn replaced_sessions_wait_long_and_longer() {
        let mut rng = StdRng::seed_from_u64(3);
        for (n, low, high) in [
            (1, 2.5, 5.0),
            (2, 5.0, 10.0),
            (3, 10.0, 20.0),
            (9, 150.0, 300.0),
            (40, 150.0, 300.0),
        ] {
            for _ in 0..200 {
                let d = after_replaced(n, &mut rng).as_secs_f64();
                assert!((low..=high).contains(&d), "replacement {n}: {d}s");
            }
        }
    }
}
