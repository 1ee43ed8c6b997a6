//! Rate limits as GCRA (the generic cell rate algorithm) over one atomic each: a budget of
//! `limit` units per `period`, spent by requests (1 unit) or tokens (reserved at admission,
//! settled from the engine's usage), shared by every worker without a lock.
//!
//! A bucket keeps one number, its theoretical arrival time (TAT): when it would be full
//! again if nothing more were spent. Spending `n` units moves it `n x period / limit`
//! later; a spend is allowed while the TAT stays within one period of now (a full period's
//! budget may be spent at once, then it refills evenly). Settling gives units back or
//! takes more, moving the TAT either way. Not here: which buckets a request spends from
//! (`tenancy.rs`), and the headers that report them (`response.rs`).

use std::sync::OnceLock;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// A budget: `limit` units per `period`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Rate {
    pub limit: u64,
    pub period: Duration,
}

impl Rate {
    fn period_ns(self) -> u64 {
        u64::try_from(self.period.as_nanos()).unwrap_or(u64::MAX)
    }

    /// Nanoseconds `units` move the TAT, rounded down, so that `limit` units are exactly
    /// one period (never more: a whole budget can always be spent at once).
    fn cost_ns(self, units: u64) -> u64 {
        let ns = u128::from(units) * u128::from(self.period_ns()) / u128::from(self.limit.max(1));
        u64::try_from(ns).unwrap_or(u64::MAX)
    }

    /// Whole units `ns` of the period hold.
    fn units_in(self, ns: u64) -> u64 {
        let units = u128::from(ns) * u128::from(self.limit) / u128::from(self.period_ns().max(1));
        u64::try_from(units).unwrap_or(u64::MAX)
    }
}

/// Nanoseconds since the process's first look at the clock (buckets outlive reloads).
pub fn now_ns() -> u64 {
    static EPOCH: OnceLock<Instant> = OnceLock::new();
    let epoch = *EPOCH.get_or_init(Instant::now);
    u64::try_from(epoch.elapsed().as_nanos()).unwrap_or(u64::MAX)
}

/// What a bucket says after a spend, or of itself.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Standing {
    pub limit: u64,
    pub period: Duration,
    /// Units that could still be spent now.
    pub remaining: u64,
    /// Until the bucket is full again.
    pub reset: Duration,
}

/// Why a spend was refused.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Refused {
    /// Not now: the budget allows it after `retry_after`.
    Later { retry_after: Duration, standing: Standing },
    /// Never: the spend is larger than a whole period's budget.
    TooLarge { limit: u64 },
}

#[derive(Debug, Default)]
pub struct Bucket {
    tat_ns: AtomicU64,
}

impl Bucket {
    /// Spends `units` if the budget allows it now.
    pub fn spend(&self, rate: Rate, units: u64, now: u64) -> Result<Standing, Refused> {
        if units > rate.limit {
            return Err(Refused::TooLarge { limit: rate.limit });
        }
        let cost = rate.cost_ns(units);
        let period = rate.period_ns();
        let mut tat = self.tat_ns.load(Ordering::Relaxed);
        loop {
            let next = tat.max(now).saturating_add(cost);
            let ahead = next - now;
            if ahead > period {
                return Err(Refused::Later {
                    retry_after: Duration::from_nanos(ahead - period),
                    standing: standing(rate, tat.max(now) - now),
                });
            }
            match self
                .tat_ns
                .compare_exchange_weak(tat, next, Ordering::Relaxed, Ordering::Relaxed)
            {
                Ok(_) => return Ok(standing(rate, ahead)),
                Err(seen) => tat = seen,
            }
        }
    }

    /// Settles a spend: `delta` more units (positive) or fewer (negative) than were spent.
    /// A refund never leaves the bucket fuller than full; a charge never leaves it emptier
    /// than two periods' debt (what a stale or oversized report can do is bounded).
    pub fn settle(&self, rate: Rate, delta: i64, now: u64) {
        if delta == 0 {
            return;
        }
        let cost = rate.cost_ns(delta.unsigned_abs());
        let most = now.saturating_add(rate.period_ns().saturating_mul(2));
        let _ = self.tat_ns.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |tat| {
            Some(if delta > 0 {
                tat.max(now).saturating_add(cost).min(most.max(tat))
            } else {
                tat.saturating_sub(cost).max(now.min(tat))
            })
        });
    }
}

fn standing(rate: Rate, ahead_ns: u64) -> Standing {
    let free_ns = rate.period_ns().saturating_sub(ahead_ns);
    Standing {
        limit: rate.limit,
        period: rate.period,
        remaining: rate.units_in(free_ns).min(rate.limit),
        reset: Duration::from_nanos(ahead_ns),
    }
}

/// A duration as OpenAI writes it in `x-ratelimit-reset-*`: `20ms`, `1s`, `6m0s`, `1h2m3s`.
pub fn openai_duration(d: Duration) -> String {
    let ms = d.as_millis();
    if ms < 1000 {
        return format!("{ms}ms");
    }
    let s = d.as_secs_f64();
    let whole = d.as_secs();
    let (h, m) = (whole / 3600, (whole % 3600) / 60);
    let secs = s - (h * 3600 + m * 60) as f64;
    let secs = if (secs - secs.round()).abs() < 0.0005 {
        format!("{}s", secs.round() as u64)
    } else {
        format!("{secs:.3}s")
    };
    match (h, m) {
        (0, 0) => secs,
        (0, m) => format!("{m}m{secs}"),
        (h, m) => format!("{h}h{m}m{secs}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SEC: u64 = 1_000_000_000;

    impl Bucket {
        fn standing(&self, rate: Rate, now: u64) -> Standing {
            standing(rate, self.tat_ns.load(Ordering::Relaxed).saturating_sub(now))
        }
    }

    fn per_second(limit: u64) -> Rate {
        Rate {
            limit,
            period: Duration::from_secs(1),
        }
    }

    #[test]
    fn a_full_budget_can_be_spent_at_once_then_refills_evenly() {
        let b = Bucket::default();
        let r = per_second(10);
        let now = 5 * SEC;
        for left in (0..10).rev() {
            assert_eq!(b.spend(r, 1, now).map(|s| s.remaining), Ok(left));
        }
        let Err(Refused::Later { retry_after, standing }) = b.spend(r, 1, now) else {
            panic!("the eleventh request in a second must wait");
        };
        assert_eq!(retry_after, Duration::from_millis(100));
        assert_eq!(standing.remaining, 0);
        assert_eq!(standing.reset, Duration::from_secs(1));
        // A tenth of a second later, one more.
        assert!(b.spend(r, 1, now + SEC / 10).is_ok());
        assert!(b.spend(r, 1, now + SEC / 10).is_err());
    }

    #[test]
    fn budgets_that_do_not_divide_the_period_keep_their_whole_burst() {
        for (limit, period) in [(3, 1), (7, 60), (6, 1), (1_000_003, 60)] {
            let r = Rate {
                limit,
                period: Duration::from_secs(period),
            };
            let b = Bucket::default();
            let now = 10 * SEC;
            assert_eq!(
                b.spend(r, 1, now).map(|s| s.remaining),
                Ok(limit - 1),
                "{limit}/{period}s"
            );
            assert!(
                b.spend(r, limit - 1, now).is_ok(),
                "{limit}/{period}s: the rest of the burst"
            );
            assert!(b.spend(r, 1, now).is_err(), "{limit}/{period}s: one more");
        }
    }

    #[test]
    fn a_spend_larger_than_the_budget_is_never_allowed() {
        let b = Bucket::default();
        let r = Rate {
            limit: 1000,
            period: Duration::from_secs(60),
        };
        assert_eq!(b.spend(r, 1001, SEC), Err(Refused::TooLarge { limit: 1000 }));
        assert_eq!(b.spend(r, 1000, SEC).map(|s| s.remaining), Ok(0));
    }

    #[test]
    fn settling_gives_back_what_was_not_used_and_takes_what_was() {
        let b = Bucket::default();
        let r = Rate {
            limit: 6000,
            period: Duration::from_secs(60),
        };
        let now = 100 * SEC;
        assert_eq!(b.spend(r, 5000, now).map(|s| s.remaining), Ok(1000));
        b.settle(r, -4000, now);
        assert_eq!(b.standing(r, now).remaining, 5000);
        b.settle(r, 2500, now);
        assert_eq!(b.standing(r, now).remaining, 2500);
        // A refund never fills past full.
        b.settle(r, -100_000, now);
        assert_eq!(b.standing(r, now).remaining, 6000);
        assert_eq!(b.spend(r, 6000, now).map(|s| s.remaining), Ok(0));
    }

    #[test]
    fn workers_spending_at_once_never_overspend() {
        let b = std::sync::Arc::new(Bucket::default());
        let r = Rate {
            limit: 1000,
            period: Duration::from_secs(3600),
        };
        let now = SEC;
        let threads: Vec<_> = (0..4)
            .map(|_| {
                let b = b.clone();
                std::thread::spawn(move || (0..1000).filter(|_| b.spend(r, 1, now).is_ok()).count())
            })
            .collect();
        let spent: usize = threads.into_iter().map(|t| t.join().expect("thread")).sum();
        assert_eq!(spent, 1000);
    }

    #[test]
    fn durations_read_as_openai_writes_them() {
        assert_eq!(openai_duration(Duration::from_millis(20)), "20ms");
        assert_eq!(openai_duration(Duration::from_secs(1)), "1s");
        assert_eq!(openai_duration(Duration::from_secs(360)), "6m0s");
        assert_eq!(openai_duration(Duration::from_millis(1500)), "1.500s");
        assert_eq!(openai_duration(Duration::from_secs(3723)), "1h2m3s");
    }
}
