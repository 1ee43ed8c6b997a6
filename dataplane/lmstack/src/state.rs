//! The routing state every worker reads, and how a new snapshot reaches all cores.
//!
//! A validated [`Snapshot`] is turned into a [`RoutingState`] (pools per model with their
//! policies, the merged `/v1/models` body) and swapped into a [`SnapshotCell`]. Workers keep
//! their own reference and look at the cell's generation number only, so the request path
//! touches no shared lock. Endpoint load counters survive rebuilds (keyed by endpoint URL):
//! a new snapshot keeps the in-flight counts of the endpoints it still has.

use std::cell::RefCell;
use std::collections::HashMap;
use std::net::SocketAddr;
use std::rc::Rc;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::time::Instant;

use arc_swap::ArcSwap;
use bytes::Bytes;
use crossbeam_utils::CachePadded;
use lmstack_route::{AffinityTable, EndpointTag, EngineLoad, Load, Policy, PoolView};
use lmstack_snapshot::{Snapshot, SnapshotError};

use crate::config::RoutingConfig;
use crate::metrics::{self, Labelled, PoolLabels};
use crate::outlier::Outlier;

/// Live load of one endpoint, shared by every worker (each on its own cache line, so that
/// endpoints do not contend with one another).
#[derive(Debug, Default)]
pub struct EndpointLoad {
    /// Requests dispatched and not finished, all workers together.
    pub inflight: AtomicU32,
    /// Prompt blocks dispatched and still awaiting prefill (no first byte yet).
    pub prefill_blocks: AtomicU64,
    /// Prompt blocks of the requests in flight.
    pub active_blocks: AtomicU64,
    /// Requests dispatched recently, decaying.
    pub recent: Decayed,
    /// Prompt blocks dispatched recently for prefill (uncached there), decaying.
    pub recent_blocks: Decayed,
    /// Conversations placed here recently (new ones, or moved), decaying.
    pub placed: Decayed,
    /// Requests dispatched and still awaiting their first byte.
    pub pending: AtomicU32,
    /// Failures in a row and ejection (passive health).
    pub outlier: Outlier,
}

impl EndpointLoad {
    /// Counts what was sent to the endpoint, by this router or (relayed through control)
    /// another replica, in the decayed counts `prefix` balances on.
    pub fn count_sent(&self, requests: u32, uncached_blocks: u64, placed: u32, now_ms: u32, half_life_ms: f64) {
        for (count, n) in [
            (&self.recent, f64::from(requests)),
            (&self.recent_blocks, uncached_blocks as f64),
            (&self.placed, f64::from(placed)),
        ] {
            if n > 0.0 {
                count.add(n, now_ms, half_life_ms);
            }
        }
    }

    fn read(&self, engine: Option<EngineLoad>, now_ms: u32, half_life_ms: f64) -> Load {
        Load {
            inflight: self.inflight.load(Ordering::Relaxed),
            prefill_blocks: self.prefill_blocks.load(Ordering::Relaxed),
            active_blocks: self.active_blocks.load(Ordering::Relaxed),
            recent: self.recent.get(now_ms, half_life_ms),
            recent_blocks: self.recent_blocks.get(now_ms, half_life_ms),
            placed: self.placed.get(now_ms, half_life_ms),
            pending: self.pending.load(Ordering::Relaxed),
            engine,
        }
    }
}

/// A count that halves every `half_life_ms` (`routing.recent_half_life_ms`), updated
/// lock-free: its value (f32) and the millisecond it was last brought up to date (u32) share
/// one atomic word.
#[derive(Debug, Default)]
pub struct Decayed(AtomicU64);

impl Decayed {
    fn unpack(word: u64) -> (f64, u32) {
        (f64::from(f32::from_bits((word >> 32) as u32)), word as u32)
    }

    /// Milliseconds from `since` to `now_ms`; 0 when another core stored a later
    /// millisecond than this one read (the clock is read before the count is updated).
    fn elapsed(since: u32, now_ms: u32) -> u32 {
        let dt = now_ms.wrapping_sub(since);
        if (dt as i32) < 0 { 0 } else { dt }
    }

    fn at(word: u64, now_ms: u32, half_life_ms: f64) -> f64 {
        let (value, since) = Self::unpack(word);
        value * 0.5f64.powf(f64::from(Self::elapsed(since, now_ms)) / half_life_ms)
    }

    pub fn add(&self, n: f64, now_ms: u32, half_life_ms: f64) {
        let _ = self.0.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |word| {
            let value = (Self::at(word, now_ms, half_life_ms) + n) as f32;
            let (_, since) = Self::unpack(word);
            let at = if Self::elapsed(since, now_ms) == 0 {
                since
            } else {
                now_ms
            };
            Some((u64::from(value.to_bits()) << 32) | u64::from(at))
        });
    }

    pub fn get(&self, now_ms: u32, half_life_ms: f64) -> f64 {
        Self::at(self.0.load(Ordering::Relaxed), now_ms, half_life_ms)
    }
}

#[derive(Debug)]
pub struct EndpointState {
    /// Identity and metric label (`http://host:port`).
    pub url: Arc<str>,
    /// The `Host` header for requests to it.
    pub authority: Arc<str>,
    pub addr: SocketAddr,
    pub healthy: bool,
    /// Stable hash of the URL, for hashing policies.
    pub key: u64,
    pub load: Arc<CachePadded<EndpointLoad>>,
    /// Its name in the affinity table (`None` when the table's ids ran out).
    pub tag: Option<EndpointTag>,
    /// Its name in the map of stored responses.
    pub response_tag: Option<EndpointTag>,
    /// The engine's own figures, when scraped.
    pub engine: Option<EngineLoad>,
}

#[derive(Debug)]
pub struct ModelPool {
    /// Position in [`RoutingState::pools`] (models sorted by name).
    pub index: usize,
    pub name: Arc<str>,
    /// Indices into [`RoutingState::endpoints`].
    pub endpoints: Vec<usize>,
    /// The endpoints' affinity tags, in pool order.
    pub tags: Vec<Option<EndpointTag>>,
    pub policy: Policy,
    /// The model card's `root` when it is an absolute path (vLLM's model directory): where
    /// exact KV routing looks for the tokenizer when none is configured.
    pub root: Option<Arc<str>>,
    /// The base model when this one is a LoRA adapter (its card's `parent`, as vLLM lists
    /// adapters): exact KV routing uses the base model's tokenizer and keys blocks with the
    /// adapter's name, as vLLM hashes them.
    pub parent: Option<Arc<str>>,
}

impl ModelPool {
    pub fn healthy_count(&self, state: &RoutingState) -> usize {
        self.endpoints.iter().filter(|&&i| state.endpoints[i].healthy).count()
    }
}

#[derive(Debug)]
pub struct RoutingState {
    /// The version of the snapshot it was built from (may repeat across `replace`).
    pub version: u64,
    /// The cell's count of stored states when this one was stored: unique per cell, what
    /// workers key their views and metric tables on.
    pub generation: u64,
    pub endpoints: Vec<EndpointState>,
    /// The endpoints' tags in the map of stored responses, in `endpoints` order.
    pub response_tags: Vec<Option<EndpointTag>>,
    /// Pools sorted by model name.
    pools: Vec<ModelPool>,
    by_name: HashMap<Arc<str>, usize>,
    /// The merged `GET /v1/models` response body.
    pub models_body: Bytes,
}

impl RoutingState {
    fn empty() -> Self {
        Self {
            version: 0,
            generation: 0,
            endpoints: Vec::new(),
            response_tags: Vec::new(),
            pools: Vec::new(),
            by_name: HashMap::new(),
            models_body: Bytes::from_static(br#"{"object":"list","data":[]}"#),
        }
    }

    /// The pool of `model`, if it is served.
    pub fn model(&self, model: &str) -> Option<&ModelPool> {
        self.by_name.get(model).map(|&i| &self.pools[i])
    }

    /// All pools, sorted by model name (their `index` order).
    pub fn pools(&self) -> impl Iterator<Item = &ModelPool> {
        self.pools.iter()
    }

    /// Served model names, sorted.
    pub fn model_names(&self) -> Vec<&str> {
        self.pools.iter().map(|p| p.name.as_ref()).collect()
    }

    /// Whether any model has a healthy endpoint.
    pub fn can_route(&self) -> bool {
        self.pools.iter().any(|m| m.healthy_count(self) > 0)
    }
}

impl Labelled for RoutingState {
    fn generation(&self) -> u64 {
        self.generation
    }

    fn pool_labels(&self) -> Vec<PoolLabels> {
        self.pools
            .iter()
            .map(|pool| PoolLabels {
                model: pool.name.clone(),
                endpoints: pool
                    .endpoints
                    .iter()
                    .map(|&i| (self.endpoints[i].url.clone(), self.endpoints[i].healthy))
                    .collect(),
            })
            .collect()
    }
}

/// One model's pool as a policy sees it, with the caller's notion of eligibility.
pub struct PoolSnapshot<'a, F: Fn(usize) -> bool> {
    pub state: &'a RoutingState,
    pub pool: &'a ModelPool,
    /// Extra eligibility test on the index into `state.endpoints` (limits, retries).
    pub admit: F,
    /// The affinity clock, for decaying counts.
    pub now_ms: u32,
    /// Half-life of the decayed counts, ms.
    pub half_life_ms: f64,
}

impl<F: Fn(usize) -> bool> PoolView for PoolSnapshot<'_, F> {
    fn len(&self) -> usize {
        self.pool.endpoints.len()
    }

    fn eligible(&self, i: usize) -> bool {
        let e = self.pool.endpoints[i];
        self.state.endpoints[e].healthy && (self.admit)(e)
    }

    fn key(&self, i: usize) -> u64 {
        self.state.endpoints[self.pool.endpoints[i]].key
    }

    fn load(&self, i: usize) -> Load {
        let e = &self.state.endpoints[self.pool.endpoints[i]];
        e.load.read(e.engine, self.now_ms, self.half_life_ms)
    }
}

/// The one lock of the router: taken only while a snapshot is stored, on the discovery or
/// control thread; workers never touch it.
#[expect(
    clippy::disallowed_types,
    reason = "held only while storing a snapshot, never on the request path"
)]
type StoreLock<T> = std::sync::Mutex<T>;

/// Where snapshots are published; shared by the discovery thread and all workers.
pub struct SnapshotCell {
    /// The snapshot version in use.
    version: AtomicU64,
    /// Moves on every store (a replacing snapshot may repeat or lower the version); equal
    /// to the stored state's `generation` once the store is done.
    generation: AtomicU64,
    state: ArcSwap<RoutingState>,
    routing: RoutingConfig,
    /// Load counters by endpoint URL, kept across states. Its lock also serialises stores.
    loads: StoreLock<HashMap<String, Arc<CachePadded<EndpointLoad>>>>,
    started_unix: u64,
    /// Which endpoints served which prompt blocks; shared by all workers.
    pub affinity: AffinityTable,
    /// Which endpoint holds which stored response (hashed ids); shared by all workers.
    pub responses: AffinityTable,
    /// The affinity table's clock starts here.
    epoch: Instant,
}

impl SnapshotCell {
    pub fn new(routing: RoutingConfig) -> Self {
        Self {
            version: AtomicU64::new(0),
            generation: AtomicU64::new(0),
            state: ArcSwap::from_pointee(RoutingState::empty()),
            affinity: AffinityTable::new(routing.affinity.limits()),
            responses: AffinityTable::new(routing.responses.limits(routing.affinity.max_endpoints)),
            epoch: Instant::now(),
            routing,
            loads: StoreLock::new(HashMap::new()),
            started_unix: std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_secs()),
        }
    }

    pub fn version(&self) -> u64 {
        self.version.load(Ordering::Acquire)
    }

    /// What workers watch to know the state changed.
    pub fn generation(&self) -> u64 {
        self.generation.load(Ordering::Acquire)
    }

    /// Milliseconds on the affinity table's clock (wraps after 49 days; the table copes).
    pub fn now_ms(&self) -> u32 {
        self.epoch.elapsed().as_millis() as u32
    }

    pub fn load(&self) -> Arc<RoutingState> {
        self.state.load_full()
    }

    /// Validates and applies `snapshot`. A snapshot that fails validation, or is not newer
    /// than the current one, is rejected and the current state kept.
    pub fn publish(&self, snapshot: &Snapshot) -> Result<(), SnapshotError> {
        self.store(snapshot, false)
    }

    /// Validates and applies `snapshot` whatever its version (a new source's first word
    /// is authoritative, e.g. a restarted control process).
    pub fn replace(&self, snapshot: &Snapshot) -> Result<(), SnapshotError> {
        self.store(snapshot, true)
    }

    fn store(&self, snapshot: &Snapshot, any_version: bool) -> Result<(), SnapshotError> {
        snapshot.validate()?;
        let mut loads = self.loads.lock().unwrap_or_else(|p| p.into_inner());
        let current = self.version();
        if snapshot.version <= current && current != 0 && !any_version {
            return Ok(());
        }
        let generation = self.generation() + 1;
        let state = self.build(snapshot, generation, &mut loads);
        metrics::snapshot_applied(&**self.state.load(), &state, snapshot.version);
        // Endpoints that left: their affinity entries stop matching now, their slots return.
        if self
            .affinity
            .retain_endpoints(|url| snapshot.endpoints.iter().any(|e| e.url == url))
            > 0
        {
            self.affinity.purge();
        }
        if self
            .responses
            .retain_endpoints(|url| snapshot.endpoints.iter().any(|e| e.url == url))
            > 0
        {
            self.responses.purge();
        }
        self.state.store(Arc::new(state));
        self.version.store(snapshot.version, Ordering::Release);
        self.generation.store(generation, Ordering::Release);
        Ok(())
    }

    fn build(
        &self,
        snapshot: &Snapshot,
        generation: u64,
        loads: &mut HashMap<String, Arc<CachePadded<EndpointLoad>>>,
    ) -> RoutingState {
        let endpoints: Vec<EndpointState> = snapshot
            .endpoints
            .iter()
            .map(|e| EndpointState {
                url: e.url.as_str().into(),
                authority: e.url.strip_prefix("http://").unwrap_or(&e.url).into(),
                addr: e.addr,
                healthy: e.healthy,
                key: lmstack_route::endpoint_key(&e.url),
                load: loads.entry(e.url.clone()).or_default().clone(),
                tag: self.affinity.register(&e.url),
                response_tag: self.responses.register(&e.url),
                engine: e.engine.map(|s| EngineLoad {
                    running: s.running,
                    waiting: s.waiting,
                    kv_usage: s.kv_cache_usage,
                }),
            })
            .collect();
        loads.retain(|url, _| snapshot.endpoints.iter().any(|e| &e.url == url));

        let mut pools = Vec::new();
        let mut by_name = HashMap::new();
        let mut cards = Vec::new();
        let mut names: Vec<&str> = snapshot.models.iter().map(|m| m.name.as_str()).collect();
        names.sort_unstable();
        for name in names {
            let Some(m) = snapshot.model(name) else {
                continue;
            };
            let policy = Policy::new(
                self.routing.policy_for(&m.name),
                self.routing.policy,
                &self.routing.params(),
            );
            let name: Arc<str> = m.name.as_str().into();
            by_name.insert(name.clone(), pools.len());
            let members: Vec<usize> = m.endpoints.iter().map(|&i| i as usize).collect();
            pools.push(ModelPool {
                index: pools.len(),
                name,
                tags: members.iter().map(|&i| endpoints[i].tag).collect(),
                endpoints: members,
                policy,
                root: m
                    .card
                    .as_ref()
                    .and_then(|c| c.get("root"))
                    .and_then(|r| r.as_str())
                    .filter(|r| r.starts_with('/'))
                    .map(Arc::from),
                parent: m
                    .card
                    .as_ref()
                    .and_then(|c| c.get("parent"))
                    .and_then(|p| p.as_str())
                    .filter(|p| *p != m.name)
                    .map(Arc::from),
            });
            cards.push(m.card.clone().unwrap_or_else(|| {
                serde_json::json!({
                    "id": m.name,
                    "object": "model",
                    "created": self.started_unix,
                    "owned_by": "lmstack",
                    "root": m.name,
                    "parent": null,
                })
            }));
        }
        let body = serde_json::json!({"object": "list", "data": cards});
        RoutingState {
            version: snapshot.version,
            generation,
            response_tags: endpoints.iter().map(|e| e.response_tag).collect(),
            endpoints,
            pools,
            by_name,
            models_body: Bytes::from(serde_json::to_vec(&body).unwrap_or_default()),
        }
    }
}

/// A worker's handle on a routing state. Cloning it per request is a plain (non-atomic)
/// increment: the shared `Arc` is touched only when the version changes, so requests on
/// different cores do not contend on its reference count.
#[derive(Clone)]
pub struct StateRef(#[allow(clippy::redundant_allocation)] Rc<Arc<RoutingState>>);

impl std::ops::Deref for StateRef {
    type Target = RoutingState;

    fn deref(&self) -> &RoutingState {
        &self.0
    }
}

/// A worker's view of the current routing state: refreshed when the cell's generation moves
/// past the generation of the state it holds.
pub struct LocalRouting {
    current: RefCell<StateRef>,
}

impl LocalRouting {
    pub fn new(cell: &SnapshotCell) -> Self {
        Self {
            current: RefCell::new(StateRef(Rc::new(cell.load()))),
        }
    }

    /// The current state, and whether it changed since the last call.
    pub fn current(&self, cell: &SnapshotCell) -> (StateRef, bool) {
        let changed = cell.generation() != self.current.borrow().generation;
        if changed {
            *self.current.borrow_mut() = StateRef(Rc::new(cell.load()));
        }
        (self.current.borrow().clone(), changed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use lmstack_snapshot::{Endpoint, Model};

    fn snapshot(version: u64, urls: &[&str]) -> Snapshot {
        Snapshot {
            version,
            endpoints: urls
                .iter()
                .enumerate()
                .map(|(i, u)| Endpoint {
                    url: (*u).into(),
                    addr: SocketAddr::from(([127, 0, 0, 1], 1000 + i as u16)),
                    healthy: true,
                    engine: None,
                })
                .collect(),
            models: vec![Model {
                name: "m".into(),
                endpoints: (0..urls.len() as u32).collect(),
                card: None,
            }],
        }
    }

    #[test]
    fn load_counters_survive_a_new_snapshot() {
        let cell = SnapshotCell::new(RoutingConfig::default());
        cell.publish(&snapshot(1, &["http://a:1", "http://b:2"])).unwrap();
        let a = cell.load().endpoints[0].load.clone();
        a.inflight.store(3, Ordering::Relaxed);
        cell.publish(&snapshot(2, &["http://c:3", "http://a:1"])).unwrap();
        let state = cell.load();
        assert_eq!(state.endpoints[1].url.as_ref(), "http://a:1");
        assert_eq!(state.endpoints[1].load.inflight.load(Ordering::Relaxed), 3);
        assert_eq!(state.endpoints[0].load.inflight.load(Ordering::Relaxed), 0);
    }

    #[test]
    fn recent_counts_halve_every_half_life() {
        const HL: f64 = 10_000.0;
        let d = Decayed::default();
        d.add(8.0, 1000, HL);
        assert_eq!(d.get(1000, HL), 8.0);
        assert!((d.get(1000 + HL as u32, HL) - 4.0).abs() < 1e-3);
        d.add(1.0, 1000 + 2 * HL as u32, HL);
        assert!((d.get(1000 + 2 * HL as u32, HL) - 3.0).abs() < 1e-3);
    }

    #[test]
    fn stale_and_invalid_snapshots_are_not_applied() {
        let cell = SnapshotCell::new(RoutingConfig::default());
        cell.publish(&snapshot(5, &["http://a:1"])).unwrap();
        cell.publish(&snapshot(4, &["http://b:1"])).unwrap();
        assert_eq!(cell.load().endpoints[0].url.as_ref(), "http://a:1");
        let mut bad = snapshot(6, &["http://b:1"]);
        bad.models[0].endpoints.push(7);
        assert!(cell.publish(&bad).is_err());
        assert_eq!(cell.version(), 5);
    }

    #[test]
    fn metric_tables_follow_a_replaced_snapshot_that_repeats_the_version() {
        let cell = SnapshotCell::new(RoutingConfig::default());
        let local = LocalRouting::new(&cell);
        let metrics = crate::metrics::LocalMetrics::default();
        cell.publish(&snapshot(5, &["http://a:1"])).unwrap();
        let (state, _) = local.current(&cell);
        assert_eq!(metrics.table(&*state).models.len(), 1);

        // A new control stream's first snapshot: the same version, other models.
        let mut next = snapshot(5, &["http://b:1", "http://c:2"]);
        next.models.insert(
            0,
            Model {
                name: "a".into(),
                endpoints: vec![1],
                card: None,
            },
        );
        next.models[1].endpoints = vec![0, 1];
        cell.replace(&next).unwrap();
        let (state, changed) = local.current(&cell);
        assert!(changed);
        assert_eq!(state.version, 5);
        let table = metrics.table(&*state);
        assert_eq!(table.models.len(), 2);
        for pool in state.pools() {
            let mm = &table.models[pool.index];
            assert_eq!(mm.model(), &*pool.name);
            assert_eq!(mm.pairs.len(), pool.endpoints.len());
        }
    }

    #[test]
    fn workers_see_new_versions() {
        let cell = SnapshotCell::new(RoutingConfig::default());
        let local = LocalRouting::new(&cell);
        assert!(!local.current(&cell).1);
        cell.publish(&snapshot(1, &["http://a:1"])).unwrap();
        let (state, changed) = local.current(&cell);
        assert!(changed);
        assert_eq!(state.version, 1);
        assert!(state.can_route());
        let body: serde_json::Value = serde_json::from_slice(&state.models_body).unwrap();
        assert_eq!(body["data"][0]["id"], "m");
    }
}
