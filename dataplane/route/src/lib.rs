//! Routing policies of the lmstack data plane.
//!
//! A policy is a pure function from a view of one model's pool (which endpoints are
//! eligible, their stable keys and their load) and a few request features to a [`Pick`]:
//! no IO, no clocks, no globals. Whoever calls it decides what "eligible" means (healthy,
//! under its admission limit, not already tried for this request).

#![cfg_attr(not(test), deny(clippy::unwrap_used))]

pub mod policy;

pub use policy::{Pick, Policy, PolicyError, PolicyName, Reason};

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

    /// Requests this router has in flight on the endpoint (all cores).
    fn inflight(&self, i: usize) -> u32;
}

/// What a policy knows of the request.
#[derive(Clone, Copy, Debug, Default)]
pub struct RouteRequest<'a> {
    /// The session key (a header value or a body field), if the request has one.
    pub session_key: Option<&'a str>,
    /// A per-caller sequence number, for policies that rotate.
    pub ticket: u64,
}

/// Hashes an endpoint identity (its URL) into a [`PoolView::key`].
pub fn endpoint_key(identity: &str) -> u64 {
    xxhash_rust::xxh3::xxh3_64(identity.as_bytes())
}
