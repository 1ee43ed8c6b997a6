//! `least_load`: the power of two choices. Two distinct eligible endpoints are drawn from the
//! request's ticket, and the one with fewer requests (router in-flight, or the engine's
//! running and waiting when known and larger) wins; an engine whose KV cache is nearly full
//! counts as loaded. Two choices keep the herd off the single least-loaded endpoint that
//! every router replica would otherwise pick at once.

use super::{Pick, Reason};
use crate::PoolView;

/// KV usage from which an engine counts as saturated (it would preempt or queue).
const KV_SATURATED: f64 = 0.95;

fn score(pool: &impl PoolView, i: usize) -> f64 {
    let load = pool.load(i);
    let saturated = load.engine.is_some_and(|e| e.kv_usage >= KV_SATURATED);
    load.requests() + if saturated { 1e6 } else { 0.0 }
}

pub(super) fn pick(pool: &impl PoolView, ticket: u64) -> Option<Pick> {
    let eligible = (0..pool.len()).filter(|&i| pool.eligible(i)).count();
    let nth = |k: usize| (0..pool.len()).filter(|&i| pool.eligible(i)).nth(k);
    let first = nth((mix(ticket) % eligible.max(1) as u64) as usize)?;
    let index = if eligible > 1 {
        let mut k = (mix(ticket ^ 0x5555_5555) % (eligible as u64 - 1)) as usize;
        let first_rank = (0..first).filter(|&i| pool.eligible(i)).count();
        if k >= first_rank {
            k += 1;
        }
        let second = nth(k)?;
        if score(pool, second) < score(pool, first) {
            second
        } else {
            first
        }
    } else {
        first
    };
    Some(Pick {
        index,
        reason: Reason::LeastLoad,
    })
}

fn mix(x: u64) -> u64 {
    xxhash_rust::xxh3::xxh3_64(&x.to_le_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::testing::Pool;

    #[test]
    fn the_lighter_of_two_wins() {
        let pool = Pool(vec![(true, 9), (true, 0)]);
        for t in 0..50 {
            assert_eq!(pick(&pool, t).unwrap().index, 1);
        }
    }

    #[test]
    fn a_loaded_endpoint_still_gets_some_when_drawn_with_a_worse_one() {
        let pool = Pool(vec![(true, 0), (true, 5), (true, 9)]);
        let mut counts = [0; 3];
        for t in 0..3000 {
            counts[pick(&pool, t).unwrap().index] += 1;
        }
        assert!(counts[0] > counts[1] && counts[1] > 0 && counts[2] == 0, "{counts:?}");
    }

    #[test]
    fn draws_only_eligible_endpoints() {
        let pool = Pool(vec![(false, 0), (true, 3), (false, 0), (true, 1)]);
        for t in 0..200 {
            assert!([1, 3].contains(&pick(&pool, t).unwrap().index));
        }
        assert_eq!(pick(&Pool(vec![(false, 0)]), 1), None);
    }
}
