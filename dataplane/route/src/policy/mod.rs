//! The policy set, selected per model by name.

mod round_robin;
mod session;

use std::fmt;
use std::str::FromStr;

use crate::{PoolView, RouteRequest};

/// A routing decision: an index into the pool, and why.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Pick {
    pub index: usize,
    pub reason: Reason,
}

/// Why an endpoint was picked. Also the `reason` label of the decisions metric.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Reason {
    /// Next in rotation.
    RoundRobin,
    /// The session key's preferred endpoint.
    SessionAffinity,
    /// The session's preferred endpoint was not eligible; the next in its order took it.
    SessionSpill,
    /// No session key: the fallback policy decided.
    NoSessionKey,
}

impl Reason {
    pub fn as_str(self) -> &'static str {
        match self {
            Reason::RoundRobin => "round_robin",
            Reason::SessionAffinity => "session_affinity",
            Reason::SessionSpill => "session_spill",
            Reason::NoSessionKey => "no_session_key",
        }
    }
}

/// Policy names as configured (snake_case, with production-stack's spellings as aliases).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum PolicyName {
    RoundRobin,
    Session,
}

impl PolicyName {
    pub const ALL: [PolicyName; 2] = [PolicyName::RoundRobin, PolicyName::Session];

    pub fn as_str(self) -> &'static str {
        match self {
            PolicyName::RoundRobin => "round_robin",
            PolicyName::Session => "session",
        }
    }
}

impl fmt::Display for PolicyName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum PolicyError {
    #[error("unknown routing policy {0:?} (known: round_robin, session; aliases: roundrobin)")]
    Unknown(String),
}

impl FromStr for PolicyName {
    type Err = PolicyError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "round_robin" | "roundrobin" => Ok(PolicyName::RoundRobin),
            "session" => Ok(PolicyName::Session),
            other => Err(PolicyError::Unknown(other.to_owned())),
        }
    }
}

impl<'de> serde::Deserialize<'de> for PolicyName {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

impl serde::Serialize for PolicyName {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.as_str())
    }
}

/// A configured policy for one model.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Policy {
    RoundRobin,
    /// Session affinity by rendezvous hashing; requests without a key use `fallback`.
    Session {
        fallback: Box<Policy>,
    },
}

impl Policy {
    /// Builds the policy `name`, with `default` deciding for requests it cannot place itself.
    pub fn new(name: PolicyName, default: PolicyName) -> Policy {
        let plain = |n: PolicyName| match n {
            PolicyName::RoundRobin | PolicyName::Session => Policy::RoundRobin,
        };
        match name {
            PolicyName::RoundRobin => Policy::RoundRobin,
            PolicyName::Session => Policy::Session {
                fallback: Box::new(plain(default)),
            },
        }
    }

    pub fn name(&self) -> PolicyName {
        match self {
            Policy::RoundRobin => PolicyName::RoundRobin,
            Policy::Session { .. } => PolicyName::Session,
        }
    }

    /// Picks an eligible endpoint, or `None` when no endpoint is eligible.
    pub fn pick(&self, pool: &impl PoolView, req: &RouteRequest<'_>) -> Option<Pick> {
        match self {
            Policy::RoundRobin => round_robin::pick(pool, req.ticket),
            Policy::Session { fallback } => match req.session_key {
                Some(key) => session::pick(pool, key),
                None => fallback.pick(pool, req).map(|p| Pick {
                    index: p.index,
                    reason: Reason::NoSessionKey,
                }),
            },
        }
    }
}

#[cfg(test)]
pub(crate) mod testing {
    use crate::PoolView;

    /// A pool for tests: per endpoint (eligible, inflight), keys from the index.
    pub struct Pool(pub Vec<(bool, u32)>);

    impl PoolView for Pool {
        fn len(&self) -> usize {
            self.0.len()
        }
        fn eligible(&self, i: usize) -> bool {
            self.0[i].0
        }
        fn key(&self, i: usize) -> u64 {
            crate::endpoint_key(&format!("http://10.0.0.{i}:8000"))
        }
        fn inflight(&self, i: usize) -> u32 {
            self.0[i].1
        }
    }
}

#[cfg(test)]
mod tests {
    use super::testing::Pool;
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn names_and_aliases() {
        assert_eq!("roundrobin".parse::<PolicyName>(), Ok(PolicyName::RoundRobin));
        assert_eq!("round_robin".parse::<PolicyName>(), Ok(PolicyName::RoundRobin));
        assert_eq!("session".parse::<PolicyName>(), Ok(PolicyName::Session));
        assert!(matches!("random".parse::<PolicyName>(), Err(PolicyError::Unknown(_))));
        for n in PolicyName::ALL {
            assert_eq!(n.as_str().parse::<PolicyName>(), Ok(n));
        }
    }

    #[test]
    fn session_without_key_falls_back() {
        let p = Policy::new(PolicyName::Session, PolicyName::RoundRobin);
        let pool = Pool(vec![(true, 0), (true, 0)]);
        let pick = p
            .pick(
                &pool,
                &RouteRequest {
                    session_key: None,
                    ticket: 1,
                },
            )
            .unwrap();
        assert_eq!(
            pick,
            Pick {
                index: 1,
                reason: Reason::NoSessionKey
            }
        );
    }

    proptest! {
        /// No policy ever picks an ineligible endpoint, and each picks one whenever any is eligible.
        #[test]
        fn never_picks_an_ineligible_endpoint(
            pool in prop::collection::vec((any::<bool>(), 0u32..10), 0..12),
            key in prop::option::of("[a-z0-9]{1,12}"),
            ticket in any::<u64>(),
        ) {
            let pool = Pool(pool);
            let any_eligible = (0..pool.len()).any(|i| pool.eligible(i));
            for name in PolicyName::ALL {
                let policy = Policy::new(name, PolicyName::RoundRobin);
                let req = RouteRequest { session_key: key.as_deref(), ticket };
                match policy.pick(&pool, &req) {
                    Some(pick) => prop_assert!(pool.eligible(pick.index)),
                    None => prop_assert!(!any_eligible),
                }
            }
        }
    }
}
