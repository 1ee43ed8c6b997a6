//! Routing for the lmstack data plane: the policies, the prefix affinity table, and prompt
//! block hashing.
//!
//! A policy is a pure function from a view of one model's pool (which endpoints are
//! eligible, their stable keys and their load) and a few request features (session key,
//! prefix matches) to a [`Pick`]: no IO, no clocks, no globals. Whoever calls it decides what
//! "eligible" means (healthy, under its admission limit, not already tried for this request)
//! and measures the load.

#![cfg_attr(not(test), deny(clippy::unwrap_used))]

pub mod affinity;
pub mod blocks;
pub mod policy;

pub use affinity::{AffinityLimits, AffinityStats, AffinityTable, EndpointTag, Matches};
pub use policy::{Bound, Pick, Policy, PolicyError, PolicyName, PolicyParams, Reason};

/// Load of one endpoint, as the router sees it.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Load {
    /// Requests this router has in flight there (all workers).
    pub inflight: u32,
    /// Prompt blocks dispatched there that still await prefill (no first byte yet).
    pub prefill_blocks: u64,
    /// Prompt blocks of the requests in flight there: their KV footprint, a measure of
    /// decode work.
    pub active_blocks: u64,
    /// Requests sent there recently, decayed with a half-life of seconds: where new
    /// conversations went, which in-flight counts forget between rounds.
    pub recent: f64,
    /// Prompt blocks sent there recently for prefill (those it did not hold), decayed alike.
    pub recent_blocks: f64,
    /// Conversations placed there recently (new, or moved off their home), decayed alike.
    pub placed: f64,
    /// Requests sent there still awaiting their first byte: queued or in prefill.
    pub pending: u32,
    /// The engine's own figures, when they are scraped.
    pub engine: Option<EngineLoad>,
}

#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct EngineLoad {
    pub running: f64,
    pub waiting: f64,
    /// KV cache usage, 0 to 1.
    pub kv_usage: f64,
}

impl Load {
    /// Requests queued or running there: this router's count, or the engine's own when it
    /// is larger (other router replicas send there too).
    pub fn requests(&self) -> f64 {
        let own = f64::from(self.inflight);
        match self.engine {
            Some(e) => own.max(e.running + e.waiting),
            None => own,
        }
    }
}

/// One model's endpoints as a policy sees them. Indices run from 0 to `len() - 1`.
pub trait PoolView {
    fn len(&self) -> usize;

    fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// May this endpoint take the request (healthy, not excluded, has capacity)?
    fn eligible(&self, i: usize) -> bool;

    /// A stable hash of the endpoint's identity, the same on every router replica.
    fn key(&self, i: usize) -> u64;

    fn load(&self, i: usize) -> Load;
}

/// How much of a request's prompt each endpoint of the pool holds.
#[derive(Clone, Copy, Debug)]
pub struct PrefixInfo<'a> {
    /// Blocks of the prompt.
    pub blocks: usize,
    /// Per pool index, the leading blocks that endpoint served recently.
    pub matched: &'a [u32],
    /// Leading blocks that many prompts share (a system prompt, a popular document), as the
    /// affinity table knows them ([`crate::Matches::shared`]).
    pub shared: u32,
    /// The pool index the request's session went to last, when it has a session key.
    pub session_home: Option<usize>,
    /// Breaks cost ties the same way on every replica: a hash of the session key, or of the
    /// prompt's first blocks.
    pub tie_key: u64,
}

/// What a policy knows of the request.
#[derive(Clone, Copy, Debug, Default)]
pub struct RouteRequest<'a> {
    /// The session key (a header value or a body field), if the request has one.
    pub session_key: Option<&'a str>,
    /// A per-caller sequence number, for policies that rotate or draw.
    pub ticket: u64,
    /// Prefix matches, for policies that use them.
    pub prefix: Option<PrefixInfo<'a>>,
}

/// Hashes an endpoint identity (its URL) into a [`PoolView::key`].
pub fn endpoint_key(identity: &str) -> u64 {
    xxhash_rust::xxh3::xxh3_64(identity.as_bytes())
}
