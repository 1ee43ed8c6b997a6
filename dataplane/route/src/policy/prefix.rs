//! `prefix`: send a conversation where its KV cache is, and place new conversations so that
//! load stays even, with no per-workload threshold.
//!
//! A prompt's leading blocks are of two kinds, told apart by the affinity table itself:
//! - the **shared** prefix: blocks that several prompts continue (a system prompt, a popular
//!   document; see `affinity.rs`). Holding it says nothing about where a conversation lives,
//!   and copying it to another engine is a one-time cost that every later request there
//!   repays, so it draws no herd;
//! - the **private** part: the conversation's own history. An endpoint holding some of it is
//!   the conversation's home.
//!
//! The decision, per request:
//! 1. **Follow.** The home is the endpoint holding the longest private part; without one,
//!    the endpoint the request's session key (header or body `user`) went to last, as the
//!    table remembers it. The request stays there while the home is eligible, within the
//!    load bound on requests in flight (consistent hashing's bounded loads, with a slack so
//!    that light load is no imbalance), and not congested: a home with two requests more
//!    awaiting their first byte than the least-waiting endpoint has a queue the others do
//!    not, and a request behind it waits at least two prefills, more when the engine's
//!    running slots are full. Even then it stays unless the endpoint it would go to has less
//!    prefill work ahead of its first token, its own re-prefill included (a long history is
//!    not moved to escape a short queue).
//! 2. **Place.** Otherwise (a new conversation, or a home it must leave) the endpoint with
//!    the lowest score among those within the bound, counted in requests:
//!    `recent + k x placed + pending + (queued prefill + this prompt's uncached blocks) /
//!    blocks per request`. `recent` is the requests sent there lately (a decayed count, so it
//!    sees load at any rate, not only what is in flight at light load); `placed` the
//!    conversations placed there lately, each worth `k`, the requests a conversation has
//!    brought lately beyond its first (pool-wide decayed requests over placements), so that a
//!    burst of new conversations spreads instead of landing where the count was lowest
//!    before any of them came back; `pending` the requests waiting there now; the prefill
//!    work queued there and what this request would add, in requests of the pool's average
//!    size. Every term is measured, none is tuned: an endpoint that holds nothing (new,
//!    restarted, scaled up) has the lowest score and takes new conversations until its
//!    share is even; one that holds a popular prefix wins ties worth less than the prefill
//!    it saves.
//!
//! Ties go to the rendezvous order of the request's tie key (its session, or its prompt's
//! last block), the same on every router replica.

use super::{Bound, LoadBound, Pick, Reason, weight};
use crate::{PoolView, PrefixInfo};

/// The most requests a placement may be counted as (a bound on a ratio of decayed counts
/// while few conversations have been placed).
const MAX_REQUESTS_PER_PLACEMENT: f64 = 64.0;

pub(super) fn pick(pool: &impl PoolView, prefix: &PrefixInfo<'_>, bound: Bound) -> Option<Pick> {
    let bound = LoadBound::new(pool, bound);
    let held = |i: usize| prefix.matched.get(i).copied().unwrap_or(0);
    let private = |i: usize| held(i).saturating_sub(prefix.shared);
    let tie = |i: usize| weight(prefix.tie_key, pool.key(i));

    // 1. Follow: the endpoint with the most of the conversation's own history, else where
    //    its session went last.
    let mut home: Option<usize> = None;
    for i in 0..pool.len() {
        if private(i) == 0 {
            continue;
        }
        let better = match home {
            None => true,
            Some(h) => (private(i), pool.eligible(i), tie(i)) > (private(h), pool.eligible(h), tie(h)),
        };
        if better {
            home = Some(i);
        }
    }
    let (home, via) = match home {
        Some(h) => (Some(h), Reason::PrefixMatch),
        None => (prefix.session_home.filter(|&h| h < pool.len()), Reason::PrefixSession),
    };
    let (mut requests, mut blocks, mut placed, mut least_pending) = (0.0, 0.0, 0.0, u32::MAX);
    for i in (0..pool.len()).filter(|&i| pool.eligible(i)) {
        let load = pool.load(i);
        requests += load.recent;
        blocks += load.recent_blocks;
        placed += load.placed;
        least_pending = least_pending.min(load.pending);
    }
    // Prefill work ahead of this request's first token there, in blocks.
    let work = |i: usize| pool.load(i).prefill_blocks as f64 + prefix.blocks.saturating_sub(held(i) as usize) as f64;
    let usable = home.filter(|&h| pool.eligible(h) && bound.admits(pool, h));
    let congested = usable.is_some_and(|h| pool.load(h).pending >= least_pending.saturating_add(2));
    if let Some(h) = usable
        && !congested
    {
        return Some(Pick { index: h, reason: via });
    }

    // 2. Place: the lowest score, in requests (see the module's doc).
    let per_request = if requests > 0.0 {
        (blocks / requests).max(1.0)
    } else {
        (prefix.blocks as f64).max(1.0)
    };
    let per_placement = if placed > 0.0 {
        (requests / placed - 1.0).clamp(0.0, MAX_REQUESTS_PER_PLACEMENT)
    } else {
        0.0
    };
    let mut best: Option<(f64, u64, usize)> = None;
    for i in 0..pool.len() {
        if !pool.eligible(i) || !bound.admits(pool, i) {
            continue;
        }
        let load = pool.load(i);
        let uncached = prefix.blocks.saturating_sub(held(i) as usize) as f64;
        let score = load.recent
            + per_placement * load.placed
            + f64::from(load.pending)
            + (load.prefill_blocks as f64 + uncached) / per_request;
        let t = tie(i);
        if best.is_none_or(|(s, bt, _)| score < s || (score == s && t > bt)) {
            best = Some((score, t, i));
        }
    }
    let (_, _, index) = best?;
    // Leaving a congested home re-prefills the conversation elsewhere: worth it only when
    // that is less prefill work than waits at home.
    if let Some(h) = usable
        && work(index) >= work(h)
    {
        return Some(Pick { index: h, reason: via });
    }
    let reason = if home.is_some() {
        Reason::PrefixLoad
    } else {
        Reason::PrefixNew
    };
    Some(Pick { index, reason })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{Load, PoolView};

    /// Per endpoint: in-flight requests, blocks queued for prefill, recent requests, recent
    /// prompt blocks.
    #[derive(Clone)]
    struct Loaded(Vec<(u32, u64, f64, f64)>);

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
            let (inflight, prefill_blocks, recent, recent_blocks) = self.0[i];
            Load {
                inflight,
                prefill_blocks,
                active_blocks: 0,
                recent,
                recent_blocks,
                placed: 0.0,
                pending: 0,
                engine: None,
            }
        }
    }

    const B: Bound = Bound {
        factor: 1.25,
        slack: 2.0,
    };

    fn info<'a>(matched: &'a [u32], shared: u32, session_home: Option<usize>) -> PrefixInfo<'a> {
        PrefixInfo {
            blocks: 100,
            matched,
            shared,
            session_home,
            tie_key: 42,
        }
    }

    fn even(n: usize) -> Loaded {
        Loaded(vec![(1, 0, 10.0, 100.0); n])
    }

    #[test]
    fn a_conversation_follows_its_own_history() {
        let p = pick(&even(3), &info(&[10, 90, 40], 10, None), B).unwrap();
        assert_eq!(
            p,
            Pick {
                index: 1,
                reason: Reason::PrefixMatch
            }
        );
    }

    #[test]
    fn a_shared_prefix_alone_draws_no_one() {
        // Endpoint 0 holds the system prompt (30 blocks every conversation shares) and has
        // been sent more than the others recently: a new conversation goes elsewhere.
        let mut pool = even(3);
        pool.0[0].2 = 14.0;
        let p = pick(&pool, &info(&[30, 0, 0], 30, None), B).unwrap();
        assert_ne!(p.index, 0);
        assert_eq!(p.reason, Reason::PrefixNew);
        // With even loads the holder wins: copying the prefix costs prefill.
        let p = pick(&even(3), &info(&[30, 0, 0], 30, None), B).unwrap();
        assert_eq!(p.index, 0);
    }

    #[test]
    fn an_endpoint_holding_nothing_takes_new_conversations() {
        // Three endpoints hold the shared prefix and served plenty; a fresh one holds nothing.
        let mut pool = even(4);
        pool.0[3] = (0, 0, 0.0, 0.0);
        for _ in 0..3 {
            let p = pick(&pool, &info(&[30, 30, 30, 0], 30, None), B).unwrap();
            assert_eq!(p.index, 3);
            pool.0[3].2 += 1.0;
            pool.0[3].3 += 10.0;
        }
    }

    #[test]
    fn a_busy_home_sends_the_conversation_elsewhere() {
        let mut pool = even(3);
        pool.0[1].0 = 9;
        let p = pick(&pool, &info(&[10, 90, 40], 10, None), B).unwrap();
        assert_eq!(
            p,
            Pick {
                index: 2,
                reason: Reason::PrefixLoad
            }
        );
    }

    #[test]
    fn a_congested_home_is_left_only_for_less_prefill_work() {
        // The home has three requests awaiting their first byte, the others none.
        let mut pool = even(3);
        pool.0[1].1 = 20;
        for e in &mut pool.0 {
            e.0 = 3;
        }
        let congested = |pool: &Loaded, held: &[u32]| {
            struct Pending<'a>(&'a Loaded, usize);
            impl PoolView for Pending<'_> {
                fn len(&self) -> usize {
                    self.0.len()
                }
                fn eligible(&self, i: usize) -> bool {
                    self.0.eligible(i)
                }
                fn key(&self, i: usize) -> u64 {
                    self.0.key(i)
                }
                fn load(&self, i: usize) -> Load {
                    let mut l = self.0.load(i);
                    l.pending = if i == self.1 { 3 } else { 0 };
                    l
                }
            }
            pick(&Pending(pool, 1), &info(held, 10, None), B).unwrap()
        };
        // The others hold 95 of the 100 blocks: moving re-prefills 5, less than the 20
        // queued ahead of it at home.
        let p = congested(&pool, &[95, 100, 95]);
        assert_eq!(p.reason, Reason::PrefixLoad);
        // They hold only the shared 10: moving re-prefills 90, and it stays.
        let p = congested(&pool, &[10, 100, 10]);
        assert_eq!(
            p,
            Pick {
                index: 1,
                reason: Reason::PrefixMatch
            }
        );
    }

    #[test]
    fn the_session_key_finds_the_home_when_the_prompt_cannot() {
        let p = pick(&even(3), &info(&[0, 0, 0], 0, Some(2)), B).unwrap();
        assert_eq!(
            p,
            Pick {
                index: 2,
                reason: Reason::PrefixSession
            }
        );
        // The prompt's own history is stronger evidence than the session's last endpoint.
        let p = pick(&even(3), &info(&[0, 50, 0], 0, Some(2)), B).unwrap();
        assert_eq!(p.index, 1);
    }

    #[test]
    fn queued_prefill_counts_against_an_endpoint() {
        let mut pool = even(2);
        pool.0[0].1 = 500;
        let p = pick(&pool, &info(&[0, 0], 0, None), B).unwrap();
        assert_eq!(p.index, 1);
    }

    #[test]
    fn new_conversations_even_out_over_time() {
        // Placing 400 new conversations, each coming back 4 more times, on 4 endpoints that
        // started uneven: recent counts even out.
        let mut pool = Loaded(vec![
            (0, 0, 40.0, 400.0),
            (0, 0, 0.0, 0.0),
            (0, 0, 10.0, 100.0),
            (0, 0, 0.0, 0.0),
        ]);
        for c in 0..400u64 {
            let i = PrefixInfo {
                blocks: 10,
                matched: &[0; 4],
                shared: 0,
                session_home: None,
                tie_key: c,
            };
            let p = pick(&pool, &i, B).unwrap();
            pool.0[p.index].2 += 5.0;
            pool.0[p.index].3 += 50.0;
        }
        let r: Vec<f64> = pool.0.iter().map(|e| e.2).collect();
        let (max, min) = (
            r.iter().copied().fold(0.0, f64::max),
            r.iter().copied().fold(f64::MAX, f64::min),
        );
        assert!(max - min <= 5.0, "{r:?}");
    }

    #[test]
    fn ties_follow_the_tie_key() {
        let pool = Loaded(vec![(0, 0, 0.0, 0.0); 4]);
        let placed = |tie_key| {
            let i = PrefixInfo {
                blocks: 10,
                matched: &[0; 4],
                shared: 0,
                session_home: None,
                tie_key,
            };
            pick(&pool, &i, B).unwrap()
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
