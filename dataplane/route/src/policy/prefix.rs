//! `prefix`: the endpoint where the request costs least, counting the prefill it would still
//! need there against the load already there (after Dynamo's `prefill + decode blocks`):
//!
//! `cost = prefill_weight * (uncached blocks + blocks queued for prefill) + blocks in flight`
//!
//! An endpoint that holds more of the prompt saves prefill; one that is busy costs its queue.
//! Guard against herding: only endpoints within the load bound compete (consistent hashing's
//! bounded loads), so a prefix every request shares, such as a system prompt, cannot draw all
//! traffic to one endpoint. Ties go to the rendezvous order of the request's own tie key (its
//! session, or its first blocks), the same on every router replica.

use super::{LoadBound, Pick, Reason, weight};
use crate::{PoolView, PrefixInfo};

pub(super) fn pick(
    pool: &impl PoolView,
    prefix: &PrefixInfo<'_>,
    load_factor: f64,
    prefill_weight: f64,
) -> Option<Pick> {
    let bound = LoadBound::new(pool, load_factor);
    let blocks = prefix.blocks as f64;
    let matched = |i: usize| prefix.matched.get(i).copied().unwrap_or(0);
    let mut best: Option<(f64, u64, usize)> = None;
    let mut longest = 0;
    for i in 0..pool.len() {
        if !pool.eligible(i) {
            continue;
        }
        longest = longest.max(matched(i));
        if !bound.admits(pool, i) {
            continue;
        }
        let load = pool.load(i);
        let uncached = (blocks - f64::from(matched(i))).max(0.0);
        let cost = prefill_weight * (uncached + load.prefill_blocks as f64) + load.active_blocks as f64;
        let tie = weight(prefix.tie_key, pool.key(i));
        let better = match best {
            None => true,
            Some((c, t, _)) => cost < c || (cost == c && tie > t),
        };
        if better {
            best = Some((cost, tie, i));
        }
    }
    let (_, _, index) = best?;
    let reason = if matched(index) == 0 {
        if longest == 0 {
            Reason::PrefixMiss
        } else {
            Reason::PrefixLoad
        }
    } else if matched(index) == longest {
        Reason::PrefixMatch
    } else {
        Reason::PrefixLoad
    };
    Some(Pick { index, reason })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{Load, PoolView};

    /// Per endpoint: (in-flight requests, blocks queued for prefill, blocks in flight).
    struct Loaded(Vec<(u32, u64, u64)>);

    impl PoolView for Loaded {
        fn len(&self) -> usize {
            self.0.len()
        }
        fn eligible(&self, _: usize) -> bool {
            true
        }
        fn key(&self, i: usize) -> u64 {
            crate::endpoint_key(&format!("e{i}"))
        }
        fn load(&self, i: usize) -> Load {
            let (inflight, prefill_blocks, active_blocks) = self.0[i];
            Load {
                inflight,
                prefill_blocks,
                active_blocks,
                engine: None,
            }
        }
    }

    fn info(matched: &[u32]) -> PrefixInfo<'_> {
        PrefixInfo {
            blocks: 100,
            matched,
            tie_key: 42,
        }
    }

    #[test]
    fn the_longest_cached_prefix_wins_when_loads_are_equal() {
        let pool = Loaded(vec![(1, 0, 50); 3]);
        let pick = pick(&pool, &info(&[10, 90, 40]), 1.25, 1.0).unwrap();
        assert_eq!(
            pick,
            Pick {
                index: 1,
                reason: Reason::PrefixMatch
            }
        );
    }

    #[test]
    fn a_busy_holder_loses_to_an_idle_endpoint() {
        // Endpoint 0 holds 30 blocks but has 200 blocks of prefill queued.
        let pool = Loaded(vec![(2, 200, 100), (2, 0, 100)]);
        let pick = pick(&pool, &info(&[30, 0]), 2.0, 1.0).unwrap();
        assert_eq!(
            pick,
            Pick {
                index: 1,
                reason: Reason::PrefixLoad
            }
        );
    }

    #[test]
    fn nothing_cached_goes_to_the_cheapest() {
        let pool = Loaded(vec![(3, 0, 300), (1, 0, 100), (2, 0, 200)]);
        let pick = pick(&pool, &info(&[0, 0, 0]), 1.25, 1.0).unwrap();
        assert_eq!(
            pick,
            Pick {
                index: 1,
                reason: Reason::PrefixMiss
            }
        );
    }

    #[test]
    fn a_shared_prefix_does_not_herd() {
        // Everyone shares the prefix only endpoint 0 holds; it already has more than its
        // share of requests: the bound sends the next one elsewhere.
        let pool = Loaded(vec![(6, 0, 60), (1, 0, 10), (1, 0, 10)]);
        let pick = pick(&pool, &info(&[100, 0, 0]), 1.25, 1.0).unwrap();
        assert_ne!(pick.index, 0);
    }

    #[test]
    fn ties_follow_the_tie_key() {
        let pool = Loaded(vec![(0, 0, 0); 4]);
        let mut seen = std::collections::HashSet::new();
        for key in 0..64 {
            let p = pick(
                &pool,
                &PrefixInfo {
                    blocks: 10,
                    matched: &[0; 4],
                    tie_key: key,
                },
                1.25,
                1.0,
            )
            .unwrap();
            // Deterministic for a key...
            let again = pick(
                &pool,
                &PrefixInfo {
                    blocks: 10,
                    matched: &[0; 4],
                    tie_key: key,
                },
                1.25,
                1.0,
            )
            .unwrap();
            assert_eq!(p, again);
            seen.insert(p.index);
        }
        // ...and spread across keys.
        assert_eq!(seen.len(), 4);
    }
}
