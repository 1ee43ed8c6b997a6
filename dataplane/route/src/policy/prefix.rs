//! `prefix`: the endpoint where the request costs least, counting the prefill it would still
//! need there against the load already there (after Dynamo's `prefill + decode blocks`):
//!
//! `cost = prefill_weight * (uncached blocks + blocks queued for prefill) + blocks in flight`
//!
//! An endpoint that holds more of the prompt saves prefill; one that is busy costs its queue.
//! Guards against herding on a prefix every request shares, such as a system prompt:
//! - a request whose best match covers less than `min_match_ratio` of its prompt is new (a
//!   first round matching only the system prompt): no endpoint is credited with a match,
//!   and the requests each endpoint was sent recently add to its cost (`recent_weight` of
//!   this request's blocks each), so new conversations spread evenly, by the rate they will
//!   come back at, while later rounds, which match most of their prompt, follow their
//!   history;
//! - only endpoints within the load bound compete (consistent hashing's bounded loads), so
//!   concurrent requests cannot pile onto the holder of a popular prefix.
//!
//! Ties go to the rendezvous order of the request's tie key (its session, or its prompt's
//! last block), the same on every router replica.

use super::{Bound, LoadBound, Pick, Reason, weight};
use crate::{PoolView, PrefixInfo};

#[derive(Clone, Copy, Debug)]
pub(super) struct Weights {
    pub bound: Bound,
    pub prefill_weight: f64,
    pub min_match_ratio: f64,
    pub recent_weight: f64,
}

pub(super) fn pick(pool: &impl PoolView, prefix: &PrefixInfo<'_>, w: Weights) -> Option<Pick> {
    let bound = LoadBound::new(pool, w.bound);
    let blocks = prefix.blocks as f64;
    let held = |i: usize| prefix.matched.get(i).copied().unwrap_or(0);
    let longest = (0..pool.len())
        .filter(|&i| pool.eligible(i))
        .map(held)
        .max()
        .unwrap_or(0);
    let new = f64::from(longest) < w.min_match_ratio * blocks;
    let matched = |i: usize| if new { 0 } else { held(i) };
    let mut best: Option<(f64, u64, usize)> = None;
    for i in 0..pool.len() {
        if !pool.eligible(i) || !bound.admits(pool, i) {
            continue;
        }
        let load = pool.load(i);
        let uncached = (blocks - f64::from(matched(i))).max(0.0);
        let cost = w.prefill_weight * (uncached + load.prefill_blocks as f64) + load.active_blocks as f64;
        // A new conversation will come back for more rounds: also count where requests
        // went recently, each as a share of this request's blocks.
        let cost = if new {
            cost + w.recent_weight * load.recent * blocks
        } else {
            cost
        };
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
    let reason = if new {
        Reason::PrefixMiss
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
                recent: f64::from(inflight),
                engine: None,
            }
        }
    }

    const W: Weights = Weights {
        bound: Bound {
            factor: 1.25,
            slack: 0.0,
        },
        prefill_weight: 1.0,
        min_match_ratio: 0.0,
        recent_weight: 0.05,
    };

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
        let p = pick(&pool, &info(&[10, 90, 40]), W).unwrap();
        assert_eq!(
            p,
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
        let p = pick(
            &pool,
            &info(&[30, 0]),
            Weights {
                bound: Bound {
                    factor: 2.0,
                    slack: 0.0,
                },
                ..W
            },
        )
        .unwrap();
        assert_eq!(
            p,
            Pick {
                index: 1,
                reason: Reason::PrefixLoad
            }
        );
    }

    #[test]
    fn nothing_cached_goes_to_the_cheapest() {
        let pool = Loaded(vec![(3, 0, 300), (1, 0, 100), (2, 0, 200)]);
        let p = pick(
            &pool,
            &info(&[0, 0, 0]),
            Weights {
                min_match_ratio: 0.5,
                ..W
            },
        )
        .unwrap();
        assert_eq!(
            p,
            Pick {
                index: 1,
                reason: Reason::PrefixMiss
            }
        );
    }

    #[test]
    fn a_shared_prefix_does_not_herd_concurrent_requests() {
        // Everyone shares the prefix only endpoint 0 holds; it already has more than its
        // share of requests: the bound sends the next one elsewhere.
        let pool = Loaded(vec![(6, 0, 60), (1, 0, 10), (1, 0, 10)]);
        let p = pick(&pool, &info(&[100, 0, 0]), W).unwrap();
        assert_ne!(p.index, 0);
    }

    #[test]
    fn a_match_on_a_small_share_of_the_prompt_counts_as_new() {
        // Endpoint 0 holds 20 of 100 blocks (a system prompt, say), and has a request running.
        let pool = Loaded(vec![(1, 0, 30), (0, 0, 0)]);
        let w = Weights {
            min_match_ratio: 0.5,
            ..W
        };
        let p = pick(&pool, &info(&[20, 0]), w).unwrap();
        assert_eq!(
            p,
            Pick {
                index: 1,
                reason: Reason::PrefixMiss
            }
        );
        // 60 of 100 is the conversation itself: follow it.
        let p = pick(&pool, &info(&[60, 0]), w).unwrap();
        assert_eq!(
            p,
            Pick {
                index: 0,
                reason: Reason::PrefixMatch
            }
        );
    }

    #[test]
    fn new_conversations_go_where_the_fewest_went_recently() {
        struct Recent(Vec<f64>);
        impl PoolView for Recent {
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
                Load {
                    recent: self.0[i],
                    ..Load::default()
                }
            }
        }
        let pool = Recent(vec![50.0, 20.0, 90.0]);
        let w = Weights {
            min_match_ratio: 0.5,
            ..W
        };
        assert_eq!(pick(&pool, &info(&[0, 0, 0]), w).unwrap().index, 1);
    }

    #[test]
    fn ties_follow_the_tie_key() {
        let pool = Loaded(vec![(0, 0, 0); 4]);
        let placed = |tie_key| {
            let i = PrefixInfo {
                blocks: 10,
                matched: &[0; 4],
                tie_key,
            };
            pick(&pool, &i, W).unwrap()
        };
        let mut seen = std::collections::HashSet::new();
        for key in 0..64 {
            // Deterministic for a key, spread across keys.
            assert_eq!(placed(key), placed(key));
            seen.insert(placed(key).index);
        }
        assert_eq!(seen.len(), 4);
    }
}
