//! `session`: rendezvous (highest-random-weight) hashing of the session key, with bounded
//! loads.
//!
//! Every router replica ranks endpoints the same way for a key without talking to the
//! others, and adding or removing an endpoint moves only the keys that ranked it first. The
//! key goes to the highest-ranked eligible endpoint that is within the load bound, so a hot
//! session spills to its next choice instead of overloading one endpoint.

use super::{Bound, LoadBound, Pick, Reason, weight};
use crate::PoolView;

pub(super) fn pick(pool: &impl PoolView, session_key: &str, bound: Bound) -> Option<Pick> {
    let key_hash = xxhash_rust::xxh3::xxh3_64(session_key.as_bytes());
    let bound = LoadBound::new(pool, bound);
    let mut top: Option<(u64, usize)> = None;
    let mut best: Option<(u64, usize)> = None;
    for i in 0..pool.len() {
        let w = weight(key_hash, pool.key(i));
        if top.is_none_or(|(tw, _)| w > tw) {
            top = Some((w, i));
        }
        if pool.eligible(i) && bound.admits(pool, i) && best.is_none_or(|(bw, _)| w > bw) {
            best = Some((w, i));
        }
    }
    let (_, index) = best?;
    let reason = if top.map(|(_, i)| i) == Some(index) {
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

    const B: Bound = Bound {
        factor: 1.25,
        slack: 0.0,
    };

    #[test]
    fn a_key_sticks_to_one_endpoint() {
        let pool = Pool(vec![(true, 0); 4]);
        let first = pick(&pool, "user-7", B).unwrap();
        assert_eq!(first.reason, Reason::SessionAffinity);
        for _ in 0..10 {
            assert_eq!(pick(&pool, "user-7", B).unwrap(), first);
        }
    }

    #[test]
    fn keys_spread_over_endpoints() {
        let pool = Pool(vec![(true, 0); 4]);
        let mut counts = [0u32; 4];
        for u in 0..4000 {
            counts[pick(&pool, &format!("user-{u}"), B).unwrap().index] += 1;
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
            let before = pick(&all, &key, B).unwrap();
            let after = pick(&without_2, &key, B).unwrap();
            if before.index != 2 {
                assert_eq!(before.index, after.index);
                assert_eq!(after.reason, Reason::SessionAffinity);
            } else {
                assert_eq!(after.reason, Reason::SessionSpill);
            }
        }
    }

    #[test]
    fn a_hot_session_spills_instead_of_piling_up() {
        let key = "hot-user";
        let mut pool = Pool(vec![(true, 0); 4]);
        let home = pick(&pool, key, B).unwrap().index;
        // The home endpoint fills up with this session's requests.
        pool.0[home].1 = 10;
        let next = pick(&pool, key, B).unwrap();
        assert_ne!(next.index, home);
        assert_eq!(next.reason, Reason::SessionSpill);
    }
}
