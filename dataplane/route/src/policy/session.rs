//! `session`: rendezvous (highest-random-weight) hashing of the session key over the pool.
//!
//! Every router replica ranks endpoints the same way for a key without talking to the
//! others, and adding or removing an endpoint moves only the keys that ranked it first.
//! When the first-ranked endpoint is not eligible the key spills to the next in its ranking.

use xxhash_rust::xxh3::xxh3_64_with_seed;

use super::{Pick, Reason};
use crate::PoolView;

fn weight(key_hash: u64, endpoint_key: u64) -> u64 {
    // Mix the endpoint key into the session hash; xxh3 with the endpoint key as seed is a
    // well-distributed keyed hash.
    xxh3_64_with_seed(&key_hash.to_le_bytes(), endpoint_key)
}

pub(super) fn pick(pool: &impl PoolView, session_key: &str) -> Option<Pick> {
    let key_hash = xxhash_rust::xxh3::xxh3_64(session_key.as_bytes());
    let mut best: Option<(u64, usize)> = None;
    let mut best_eligible: Option<(u64, usize)> = None;
    for i in 0..pool.len() {
        let w = weight(key_hash, pool.key(i));
        if best.is_none_or(|(bw, _)| w > bw) {
            best = Some((w, i));
        }
        if pool.eligible(i) && best_eligible.is_none_or(|(bw, _)| w > bw) {
            best_eligible = Some((w, i));
        }
    }
    let (_, index) = best_eligible?;
    let reason = if best.map(|(_, i)| i) == Some(index) {
        Reason::SessionAffinity
    } else {
        Reason::SessionSpill
    };
    Some(Pick { index, reason })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::testing::Pool;

    #[test]
    fn a_key_sticks_to_one_endpoint() {
        let pool = Pool(vec![(true, 0); 4]);
        let first = pick(&pool, "user-7").unwrap();
        assert_eq!(first.reason, Reason::SessionAffinity);
        for _ in 0..10 {
            assert_eq!(pick(&pool, "user-7").unwrap(), first);
        }
    }

    #[test]
    fn keys_spread_over_endpoints() {
        let pool = Pool(vec![(true, 0); 4]);
        let mut counts = [0u32; 4];
        for u in 0..4000 {
            counts[pick(&pool, &format!("user-{u}")).unwrap().index] += 1;
        }
        for c in counts {
            assert!((800..1200).contains(&c), "uneven spread: {counts:?}");
        }
    }

    #[test]
    fn losing_an_endpoint_moves_only_its_keys() {
        let all = Pool(vec![(true, 0); 4]);
        let mut without_2 = Pool(vec![(true, 0); 4]);
        without_2.0[2].0 = false;
        for u in 0..1000 {
            let key = format!("user-{u}");
            let before = pick(&all, &key).unwrap();
            let after = pick(&without_2, &key).unwrap();
            if before.index != 2 {
                assert_eq!(before.index, after.index);
                assert_eq!(after.reason, Reason::SessionAffinity);
            } else {
                assert_eq!(after.reason, Reason::SessionSpill);
            }
        }
    }
}
