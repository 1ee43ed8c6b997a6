//! The policy set, selected per model by name, and the bounded-load rule they share.

mod least_load;
mod prefix;
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
    /// The less loaded of two random candidates.
    LeastLoad,
    /// The session key's preferred endpoint.
    SessionAffinity,
    /// The session's preferred endpoint was not eligible or over its load bound; the next
    /// in the session's order took it.
    SessionSpill,
    /// No session key: the fallback policy decided.
    NoSessionKey,
    /// The endpoint holding the longest part of the conversation's own history.
    PrefixMatch,
    /// No endpoint holds the conversation's history; its session key went there last.
    PrefixSession,
    /// The conversation's home was over its load bound (or not eligible): placed elsewhere.
    PrefixLoad,
    /// A new conversation (nothing of it cached but prefixes many share): placed by load.
    PrefixNew,
    /// The request has no prompt to match: the fallback policy decided.
    NoPrompt,
}

impl Reason {
    pub const ALL: [Reason; 10] = [
        Reason::RoundRobin,
        Reason::LeastLoad,
        Reason::SessionAffinity,
        Reason::SessionSpill,
        Reason::NoSessionKey,
        Reason::PrefixMatch,
        Reason::PrefixSession,
        Reason::PrefixLoad,
        Reason::PrefixNew,
        Reason::NoPrompt,
    ];

    /// Whether the pick placed a conversation (a new one, or one moved off its home): what
    /// `prefix` counts in an endpoint's placements.
    pub fn places_conversation(self) -> bool {
        matches!(self, Reason::PrefixNew | Reason::PrefixLoad)
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Reason::RoundRobin => "round_robin",
            Reason::LeastLoad => "least_load",
            Reason::SessionAffinity => "session_affinity",
            Reason::SessionSpill => "session_spill",
            Reason::NoSessionKey => "no_session_key",
            Reason::PrefixMatch => "prefix_match",
            Reason::PrefixLoad => "prefix_load",
            Reason::PrefixSession => "prefix_session",
            Reason::PrefixNew => "prefix_new",
            Reason::NoPrompt => "no_prompt",
        }
    }
}

/// Policy names as configured (snake_case, with production-stack's and SGLang's spellings
/// as aliases).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum PolicyName {
    RoundRobin,
    LeastLoad,
    Session,
    Prefix,
}

impl PolicyName {
    pub const ALL: [PolicyName; 4] = [
        PolicyName::RoundRobin,
        PolicyName::LeastLoad,
        PolicyName::Session,
        PolicyName::Prefix,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            PolicyName::RoundRobin => "round_robin",
            PolicyName::LeastLoad => "least_load",
            PolicyName::Session => "session",
            PolicyName::Prefix => "prefix",
        }
    }

    /// Whether the policy needs the prompt's blocks matched against the affinity table.
    pub fn uses_prefix(self) -> bool {
        self == PolicyName::Prefix
    }
}

impl fmt::Display for PolicyName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

#[derive(Debug, thiserror::Error, PartialEq)]
pub enum PolicyError {
    #[error(
        "unknown routing policy {0:?} (known: round_robin, least_load, session, prefix; aliases: roundrobin, power_of_two, prefixaware)"
    )]
    Unknown(String),
    #[error("{name} must be {expected}, not {value}")]
    BadParameter {
        name: &'static str,
        expected: &'static str,
        value: f64,
    },
}

impl FromStr for PolicyName {
    type Err = PolicyError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "round_robin" | "roundrobin" => Ok(PolicyName::RoundRobin),
            "least_load" | "power_of_two" => Ok(PolicyName::LeastLoad),
            "session" => Ok(PolicyName::Session),
            "prefix" | "prefixaware" => Ok(PolicyName::Prefix),
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

/// The bounded-load rule's parameters: an endpoint may take one more request only while it
/// holds fewer than `ceil(factor * (total + 1) / n + slack)` (`total` requests on `n`
/// eligible endpoints). The factor bounds imbalance under load; the slack keeps a few
/// requests from counting as imbalance when load is low.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Bound {
    pub factor: f64,
    pub slack: f64,
}

impl Default for Bound {
    fn default() -> Self {
        Self {
            factor: 1.25,
            slack: 2.0,
        }
    }
}

/// Tunables of the policies.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct PolicyParams {
    /// `session`: an endpoint takes a session's request only within this bound (consistent
    /// hashing with bounded loads).
    pub session_bound: Bound,
    /// `prefix`: the same bound: a conversation stays on its home while the home is within
    /// it, and new conversations go only to endpoints within it.
    pub prefix_bound: Bound,
}

impl PolicyParams {
    pub fn validate(&self) -> Result<(), PolicyError> {
        for (name, value, least) in [
            ("session.load_factor", self.session_bound.factor, 1.0),
            ("prefix.load_factor", self.prefix_bound.factor, 1.0),
            ("session.load_slack", self.session_bound.slack, 0.0),
            ("prefix.load_slack", self.prefix_bound.slack, 0.0),
        ] {
            if !(value >= least && value.is_finite()) {
                return Err(PolicyError::BadParameter {
                    name,
                    expected: if least == 1.0 {
                        "a number of at least 1"
                    } else {
                        "a number of at least 0"
                    },
                    value,
                });
            }
        }
        Ok(())
    }
}

/// A configured policy for one model.
#[derive(Clone, Debug, PartialEq)]
pub enum Policy {
    RoundRobin,
    LeastLoad,
    /// Rendezvous hashing of the session key with bounded loads; requests without a key use
    /// `fallback`.
    Session {
        bound: Bound,
        fallback: Box<Policy>,
    },
    /// Follows a conversation's cached history (or its session) within bounded loads, and
    /// places new conversations by recent load and prefill work; requests without a prompt
    /// use `fallback`.
    Prefix {
        bound: Bound,
        fallback: Box<Policy>,
    },
}

impl Policy {
    /// Builds the policy `name`. `default` decides for requests it cannot place itself (no
    /// session key, no prompt); when that is a policy of the same kind, `least_load` does.
    pub fn new(name: PolicyName, default: PolicyName, params: &PolicyParams) -> Policy {
        let fallback = |own: PolicyName| {
            Box::new(match default {
                PolicyName::RoundRobin => Policy::RoundRobin,
                d if d == own => Policy::LeastLoad,
                PolicyName::Session | PolicyName::Prefix | PolicyName::LeastLoad => Policy::LeastLoad,
            })
        };
        match name {
            PolicyName::RoundRobin => Policy::RoundRobin,
            PolicyName::LeastLoad => Policy::LeastLoad,
            PolicyName::Session => Policy::Session {
                bound: params.session_bound,
                fallback: fallback(PolicyName::Session),
            },
            PolicyName::Prefix => Policy::Prefix {
                bound: params.prefix_bound,
                fallback: fallback(PolicyName::Prefix),
            },
        }
    }

    pub fn name(&self) -> PolicyName {
        match self {
            Policy::RoundRobin => PolicyName::RoundRobin,
            Policy::LeastLoad => PolicyName::LeastLoad,
            Policy::Session { .. } => PolicyName::Session,
            Policy::Prefix { .. } => PolicyName::Prefix,
        }
    }

    /// Picks an eligible endpoint, or `None` when no endpoint is eligible.
    pub fn pick(&self, pool: &impl PoolView, req: &RouteRequest<'_>) -> Option<Pick> {
        let with = |reason, p: Option<Pick>| p.map(|p| Pick { index: p.index, reason });
        match self {
            Policy::RoundRobin => round_robin::pick(pool, req.ticket),
            Policy::LeastLoad => least_load::pick(pool, req.ticket),
            Policy::Session { bound, fallback } => match req.session_key {
                Some(key) => session::pick(pool, key, *bound),
                None => with(Reason::NoSessionKey, fallback.pick(pool, req)),
            },
            Policy::Prefix { bound, fallback } => match &req.prefix {
                Some(prefix) if prefix.blocks > 0 => prefix::pick(pool, prefix, *bound),
                _ => with(Reason::NoPrompt, fallback.pick(pool, req)),
            },
        }
    }
}

/// The bounded-load rule (Mirrokni et al., "Consistent Hashing with Bounded Loads", plus a
/// slack; see [`Bound`]). Some eligible endpoint always admits a request.
pub(crate) struct LoadBound {
    cap: f64,
}

impl LoadBound {
    pub(crate) fn new(pool: &impl PoolView, bound: Bound) -> Self {
        let (mut total, mut n) = (0.0, 0usize);
        for i in 0..pool.len() {
            if pool.eligible(i) {
                total += pool.load(i).requests();
                n += 1;
            }
        }
        let cap = if n == 0 {
            0.0
        } else {
            (bound.factor * (total + 1.0) / n as f64 + bound.slack).ceil()
        };
        Self { cap }
    }

    pub(crate) fn admits(&self, pool: &impl PoolView, i: usize) -> bool {
        pool.load(i).requests() + 1.0 <= self.cap
    }
}

/// Rendezvous weight of `key` on endpoint `i` (the same on every router replica).
pub(crate) fn weight(key_hash: u64, endpoint_key: u64) -> u64 {
    xxhash_rust::xxh3::xxh3_64_with_seed(&key_hash.to_le_bytes(), endpoint_key)
}

#[cfg(test)]
pub(crate) mod testing {
    use crate::{Load, PoolView};

    /// A pool for tests: per endpoint (eligible, in-flight requests), keys from the index.
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
        fn load(&self, i: usize) -> Load {
            Load {
                inflight: self.0[i].1,
                ..Load::default()
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::testing::Pool;
    use super::*;
    use crate::PrefixInfo;
    use proptest::prelude::*;

    #[test]
    fn names_and_aliases() {
        assert_eq!("roundrobin".parse::<PolicyName>(), Ok(PolicyName::RoundRobin));
        assert_eq!("prefixaware".parse::<PolicyName>(), Ok(PolicyName::Prefix));
        assert_eq!("power_of_two".parse::<PolicyName>(), Ok(PolicyName::LeastLoad));
        assert!(matches!("kvaware".parse::<PolicyName>(), Err(PolicyError::Unknown(_))));
        for n in PolicyName::ALL {
            assert_eq!(n.as_str().parse::<PolicyName>(), Ok(n));
        }
    }

    #[test]
    fn bad_parameters_are_refused() {
        let mut p = PolicyParams::default();
        p.validate().unwrap();
        p.session_bound.factor = 0.5;
        assert!(matches!(
            p.validate(),
            Err(PolicyError::BadParameter {
                name: "session.load_factor",
                ..
            })
        ));
        p = PolicyParams::default();
        p.prefix_bound.slack = f64::NAN;
        assert!(p.validate().is_err());
    }

    #[test]
    fn without_a_key_or_a_prompt_the_fallback_decides() {
        let params = PolicyParams::default();
        let pool = Pool(vec![(true, 0), (true, 0)]);
        let req = RouteRequest {
            session_key: None,
            ticket: 1,
            prefix: None,
        };
        let p = Policy::new(PolicyName::Session, PolicyName::RoundRobin, &params);
        assert_eq!(
            p.pick(&pool, &req),
            Some(Pick {
                index: 1,
                reason: Reason::NoSessionKey
            })
        );
        let p = Policy::new(PolicyName::Prefix, PolicyName::Prefix, &params);
        assert_eq!(p.pick(&pool, &req).unwrap().reason, Reason::NoPrompt);
    }

    fn policies() -> Vec<Policy> {
        let params = PolicyParams::default();
        PolicyName::ALL
            .iter()
            .map(|&n| Policy::new(n, PolicyName::RoundRobin, &params))
            .collect()
    }

    proptest! {
        /// No policy ever picks an ineligible endpoint, and each picks one whenever any is
        /// eligible.
        #[test]
        fn never_picks_an_ineligible_endpoint(
            pool in prop::collection::vec((any::<bool>(), 0u32..10), 0..12),
            key in prop::option::of("[a-z0-9]{1,12}"),
            matched in prop::collection::vec(0u32..20, 12),
            shared in 0u32..25,
            session_home in prop::option::of(0usize..14),
            ticket in any::<u64>(),
        ) {
            let pool = Pool(pool);
            let any_eligible = (0..pool.len()).any(|i| pool.eligible(i));
            for policy in policies() {
                let req = RouteRequest {
                    session_key: key.as_deref(),
                    ticket,
                    prefix: Some(PrefixInfo { blocks: 20, matched: &matched[..pool.len()], shared: shared.min(20), session_home, tie_key: ticket }),
                };
                match policy.pick(&pool, &req) {
                    Some(pick) => prop_assert!(pool.eligible(pick.index)),
                    None => prop_assert!(!any_eligible),
                }
            }
        }

        /// `session` and `prefix` respect the load bound: the pick never holds as many
        /// requests as the bound allows (it can take one more).
        #[test]
        fn bounded_loads_are_respected(
            pool in prop::collection::vec((any::<bool>(), 0u32..30), 1..10),
            key in "[a-z0-9]{1,12}",
            matched in prop::collection::vec(0u32..20, 10),
        ) {
            let pool = Pool(pool);
            let params = PolicyParams::default();
            for name in [PolicyName::Session, PolicyName::Prefix] {
                let policy = Policy::new(name, PolicyName::RoundRobin, &params);
                let req = RouteRequest {
                    session_key: Some(&key),
                    ticket: 0,
                    prefix: Some(PrefixInfo { blocks: 20, matched: &matched[..pool.len()], shared: 3, session_home: Some(0), tie_key: 7 }),
                };
                if let Some(pick) = policy.pick(&pool, &req) {
                    let bound = LoadBound::new(&pool, Bound::default());
                    prop_assert!(bound.admits(&pool, pick.index), "{:?} over the bound", name);
                }
            }
        }
    }
}
