//! Passive health (outlier ejection): an endpoint that fails requests in a row is taken out
//! of rotation for a while, shared by every worker through atomics beside its load.
//!
//! A failure is what the pipeline says it is (a connect error, a reset, a hang, a cut
//! stream, a 5xx); a success clears the streak. Ejection lasts `base_ejection_ms`, doubled
//! for each further ejection without a success in between, up to `max_ejection_ms`. An
//! endpoint back from ejection is on probation: its next failure ejects it again. Not here:
//! active probing (discovery), or which endpoints a pool may lose (the caller counts them).

use std::sync::atomic::{AtomicU32, Ordering};

use crate::config::OutlierConfig;

/// One endpoint's failure streak and ejection, shared by all workers.
#[derive(Debug, Default)]
pub struct Outlier {
    /// Failures in a row.
    failures: AtomicU32,
    /// Ejections in a row (no success in between).
    ejections: AtomicU32,
    /// The router's millisecond clock (wrapping) until which the endpoint is out; 0: never
    /// ejected.
    until_ms: AtomicU32,
}

/// What a failure did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Failed {
    /// Counted; the endpoint stays.
    Counted,
    /// The streak is long enough, but the pool cannot lose another endpoint now.
    Spared,
    /// The endpoint is out for this many milliseconds.
    Ejected(u64),
}

impl Outlier {
    /// Whether the endpoint is out of rotation at `now_ms`. An ejection seen over is
    /// cleared, so that the wrapping clock cannot bring it back weeks later (the upkeep
    /// thread looks every second).
    pub fn ejected(&self, now_ms: u32) -> bool {
        let until = self.until_ms.load(Ordering::Relaxed);
        if until == 0 {
            return false;
        }
        if (until.wrapping_sub(now_ms) as i32) > 0 {
            return true;
        }
        let _ = self
            .until_ms
            .compare_exchange(until, 0, Ordering::Relaxed, Ordering::Relaxed);
        false
    }

    /// A request to the endpoint succeeded.
    pub fn success(&self) {
        if self.failures.load(Ordering::Relaxed) != 0 {
            self.failures.store(0, Ordering::Relaxed);
        }
        if self.ejections.load(Ordering::Relaxed) != 0 {
            self.ejections.store(0, Ordering::Relaxed);
        }
    }

    /// A request to the endpoint failed at `now_ms`; `may_eject` says whether its pool can
    /// lose it now (asked only when the streak is long enough).
    pub fn failure(&self, config: &OutlierConfig, now_ms: u32, may_eject: impl FnOnce() -> bool) -> Failed {
        if config.consecutive_failures == 0 {
            return Failed::Counted;
        }
        let streak = self.failures.fetch_add(1, Ordering::Relaxed) + 1;
        // Back from an ejection without a success since: one failure is enough.
        let on_probation = self.ejections.load(Ordering::Relaxed) > 0;
        if (streak < config.consecutive_failures && !on_probation) || self.ejected(now_ms) {
            return Failed::Counted;
        }
        if !may_eject() {
            return Failed::Spared;
        }
        let n = self.ejections.load(Ordering::Relaxed);
        let ms = config
            .base_ejection_ms
            .saturating_mul(1u64 << n.min(20))
            .min(config.max_ejection_ms);
        let until = now_ms.wrapping_add(ms as u32).max(1);
        // One worker ejects; another failing at the same moment only counts.
        if self
            .until_ms
            .compare_exchange(0, until, Ordering::Relaxed, Ordering::Relaxed)
            .is_err()
        {
            return Failed::Counted;
        }
        self.ejections.fetch_add(1, Ordering::Relaxed);
        self.failures.store(0, Ordering::Relaxed);
        Failed::Ejected(ms)
    }
}

/// How many of a pool's `n` endpoints may be out at once.
pub fn max_ejected(config: &OutlierConfig, n: usize) -> usize {
    let cap = n * config.max_ejected_percent as usize / 100;
    cap.min(n.saturating_sub(1))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config() -> OutlierConfig {
        OutlierConfig {
            consecutive_failures: 3,
            base_ejection_ms: 100,
            max_ejection_ms: 250,
            max_ejected_percent: 50,
        }
    }

    #[test]
    fn a_streak_ejects_and_backs_off() {
        let c = config();
        let o = Outlier::default();
        assert_eq!(o.failure(&c, 10, || true), Failed::Counted);
        assert_eq!(o.failure(&c, 11, || true), Failed::Counted);
        assert_eq!(o.failure(&c, 12, || true), Failed::Ejected(100));
        assert!(o.ejected(50) && o.ejected(111) && !o.ejected(112));
        // On probation: one failure ejects again, for twice as long, capped.
        assert_eq!(o.failure(&c, 200, || true), Failed::Ejected(200));
        assert_eq!(o.failure(&c, 500, || true), Failed::Ejected(250));
        // A success clears it all.
        o.success();
        assert_eq!(o.failure(&c, 1000, || true), Failed::Counted);
        assert!(!o.ejected(1000));
    }

    #[test]
    fn a_success_breaks_the_streak_and_the_pool_may_refuse() {
        let c = config();
        let o = Outlier::default();
        o.failure(&c, 0, || true);
        o.failure(&c, 0, || true);
        o.success();
        assert_eq!(o.failure(&c, 0, || true), Failed::Counted);
        o.failure(&c, 0, || true);
        assert_eq!(o.failure(&c, 0, || false), Failed::Spared);
        assert!(!o.ejected(0));
        let off = OutlierConfig {
            consecutive_failures: 0,
            ..c
        };
        for _ in 0..10 {
            assert_eq!(o.failure(&off, 0, || true), Failed::Counted);
        }
    }

    #[test]
    fn the_clock_may_wrap() {
        let c = config();
        let o = Outlier::default();
        for _ in 0..3 {
            o.failure(&c, u32::MAX - 10, || true);
        }
        assert!(o.ejected(u32::MAX) && o.ejected(50) && !o.ejected(100));
        // Seen over, it stays over when the clock comes round again.
        assert!(!o.ejected(u32::MAX - 5));
    }

    #[test]
    fn at_least_one_endpoint_stays() {
        let c = config();
        assert_eq!(max_ejected(&c, 1), 0);
        assert_eq!(max_ejected(&c, 2), 1);
        assert_eq!(max_ejected(&c, 5), 2);
        let all = OutlierConfig {
            max_ejected_percent: 100,
            ..c
        };
        assert_eq!(max_ejected(&all, 4), 3);
    }
}
