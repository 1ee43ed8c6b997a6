//! `round_robin`: the next eligible endpoint after the caller's ticket.

use super::{Pick, Reason};
use crate::PoolView;

pub(super) fn pick(pool: &impl PoolView, ticket: u64) -> Option<Pick> {
    let n = pool.len();
    if n == 0 {
        return None;
    }
    let start = (ticket % n as u64) as usize;
    (0..n)
        .map(|k| (start + k) % n)
        .find(|&i| pool.eligible(i))
        .map(|index| Pick {
            index,
            reason: Reason::RoundRobin,
        })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::testing::Pool;

    #[test]
    fn rotates_over_eligible_endpoints() {
        let pool = Pool(vec![(true, 0), (false, 0), (true, 0)]);
        let picks: Vec<usize> = (0..6).map(|t| pick(&pool, t).unwrap().index).collect();
        assert_eq!(picks, vec![0, 2, 2, 0, 2, 2]);
    }

    #[test]
    fn spreads_evenly_when_all_are_eligible() {
        let pool = Pool(vec![(true, 0); 3]);
        let mut counts = [0; 3];
        for t in 0..300 {
            counts[pick(&pool, t).unwrap().index] += 1;
        }
        assert_eq!(counts, [100, 100, 100]);
    }

    #[test]
    fn nothing_eligible_is_none() {
        assert_eq!(pick(&Pool(vec![(false, 0)]), 0), None);
        assert_eq!(pick(&Pool(vec![]), 0), None);
    }
}
