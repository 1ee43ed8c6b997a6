//! A worker's context: what its tasks share (`WorkerCtx`, `!Send`, behind an `Rc`), what all
//! workers share (`Shared`), the limits converted once from the configuration, and the
//! per-worker scratch buffers of prefix routing.
//!
//! Not here: the threads and the accept loop (worker.rs), what happens to a request
//! (proxy.rs). This module sits below both: it imports neither.

use std::cell::{Cell, RefCell};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use lmstack_http::head::HeadLimits;
use lmstack_snapshot::AffinityEntry;
use metrics_exporter_prometheus::PrometheusHandle;

use crate::config::{Config, ms};
use crate::kv::Kv;
use crate::metrics::{self, LocalMetrics};
use crate::otel::Tracer;
use crate::queue::{Drain, WaitQueue};
use crate::state::{LocalRouting, SnapshotCell, StateRef};
use crate::tenancy::TenantsCell;
use crate::upstream::Pool;

/// What all workers share: configuration (read-only), the snapshot cell, the metrics
/// exporter, and the draining flag set at shutdown.
pub struct Shared {
    pub config: Config,
    pub cell: Arc<SnapshotCell>,
    pub prometheus: PrometheusHandle,
    pub draining: AtomicBool,
    /// The link to lmstack-control (control mode only).
    pub control: ControlLink,
    /// Where workers hand their prefix assignments for control (control mode with
    /// `share_affinity` only).
    pub affinity_out: Option<crossbeam_channel::Sender<Vec<AffinityEntry>>>,
    /// This process among the router's replicas.
    pub replica: String,
    /// Exact KV routing's engine indexes and tokenizers (`kv_events.enabled`).
    pub kv: Option<Arc<Kv>>,
    /// The API keys in force (`tenancy.keys_file`); `None`: no keys needed.
    pub tenants: Option<TenantsCell>,
    /// OpenTelemetry tracing (`tracing.otlp_endpoint`); `None`: off.
    pub tracer: Option<Tracer>,
}

/// Limits and timeouts, converted once from the configuration.
pub struct Limits {
    pub head: HeadLimits,
    pub response_head: HeadLimits,
    pub max_body: usize,
    pub header_timeout: Duration,
    pub body_timeout: Duration,
    pub keepalive: Duration,
    pub drain_idle: Duration,
    pub write_timeout: Duration,
    pub client_watch_delay: Duration,
    pub max_connections: usize,
    pub connect_timeout: Duration,
    pub first_byte_timeout: Duration,
    pub idle_timeout: Duration,
    pub stream_head_timeout: Duration,
    pub stream_idle_timeout: Duration,
    pub max_event_bytes: usize,
    pub resume_deadline: Duration,
    pub max_retries: u32,
    pub max_inflight: u32,
    pub queue_timeout: Duration,
    pub max_queued: usize,
}

impl Limits {
    pub fn new(c: &Config, workers: usize) -> Self {
        Self {
            head: HeadLimits {
                max_bytes: c.server.max_header_bytes,
                max_headers: c.server.max_headers,
            },
            response_head: HeadLimits {
                max_bytes: c.upstream.max_response_header_bytes,
                max_headers: lmstack_http::head::MAX_HEADERS_CAP,
            },
            max_body: c.server.max_body_bytes,
            header_timeout: ms(c.server.header_timeout_ms),
            body_timeout: ms(c.server.body_timeout_ms),
            keepalive: ms(c.server.keepalive_timeout_ms),
            drain_idle: ms(c.server.drain_idle_ms),
            write_timeout: ms(c.server.write_timeout_ms),
            client_watch_delay: ms(c.server.client_watch_delay_ms),
            max_connections: c.server.max_connections.div_ceil(workers).max(1),
            connect_timeout: ms(c.upstream.connect_timeout_ms),
            first_byte_timeout: ms(c.upstream.first_byte_timeout_ms),
            idle_timeout: ms(c.upstream.idle_timeout_ms),
            stream_head_timeout: ms(c.upstream.stream_head_timeout_ms),
            stream_idle_timeout: ms(c.upstream.stream_idle_timeout_ms),
            max_event_bytes: c.upstream.max_event_bytes,
            resume_deadline: ms(c.resume.deadline_ms),
            max_retries: c.upstream.max_retries,
            max_inflight: c.upstream.max_inflight_per_endpoint,
            queue_timeout: ms(c.upstream.queue_timeout_ms),
            max_queued: c.upstream.max_queued_per_worker,
        }
    }
}

/// Buffers for a request's prompt blocks and their matches, recycled per worker so that
/// prefix routing allocates nothing once warm.
#[derive(Default)]
pub struct PrefixBuffers {
    pub blocks: Vec<u64>,
    pub matched: Vec<u32>,
    /// Exact KV routing: the prompt's token block keys, and per pool index the blocks the
    /// engine holds (`u32::MAX`: not matched exactly).
    pub keys: Vec<u64>,
    pub exact: Vec<u32>,
}

/// Free buffers kept per worker at most.
const MAX_FREE_BUFFERS: usize = 256;

/// A request's hold on one set of [`PrefixBuffers`]; dropping it returns them.
pub struct Scratch<'a> {
    ctx: &'a WorkerCtx,
    buffers: PrefixBuffers,
}

impl Scratch<'_> {
    pub fn get(&self) -> &PrefixBuffers {
        &self.buffers
    }

    pub fn get_mut(&mut self) -> &mut PrefixBuffers {
        &mut self.buffers
    }
}

impl Drop for Scratch<'_> {
    fn drop(&mut self) {
        let mut free = self.ctx.scratch_free.borrow_mut();
        if free.len() < MAX_FREE_BUFFERS {
            free.push(std::mem::take(&mut self.buffers));
        }
    }
}

/// One worker's state; `!Send`, shared by the worker's tasks through `Rc`.
pub struct WorkerCtx {
    pub id: usize,
    pub shared: Arc<Shared>,
    pub limits: Limits,
    pub routing: LocalRouting,
    pub pool: Pool,
    pub metrics: LocalMetrics,
    pub waiters: WaitQueue,
    /// Fired once the router drains: idle client connections close.
    pub drain: Drain,
    ticket: Cell<u64>,
    request_prefix: String,
    request_seq: Cell<u64>,
    /// Client connections open on this worker (the accept loop's count).
    pub connections: Cell<usize>,
    /// Requests held for a model without a ready endpoint (`admission`).
    pub held: Cell<usize>,
    scratch_free: RefCell<Vec<PrefixBuffers>>,
    /// Prefix assignments made here since the last flush, for control (shared affinity).
    affinity_out: RefCell<Vec<AffinityEntry>>,
}

impl WorkerCtx {
    pub fn new(id: usize, workers: usize, shared: Arc<Shared>) -> Self {
        let c = &shared.config;
        let seed = format!("{}-{}-{id}", std::process::id(), now_nanos());
        Self {
            id,
            limits: Limits::new(c, workers),
            routing: LocalRouting::new(&shared.cell),
            pool: Pool::new(
                c.upstream.pool_max_idle_per_endpoint,
                ms(c.upstream.pool_idle_timeout_ms),
            ),
            metrics: LocalMetrics::default(),
            waiters: WaitQueue::default(),
            drain: Drain::default(),
            ticket: Cell::new(id as u64),
            request_prefix: format!("{:012x}", xxhash_rust::xxh3::xxh3_64(seed.as_bytes()) >> 16),
            request_seq: Cell::new(0),
            connections: Cell::new(0),
            held: Cell::new(0),
            scratch_free: RefCell::new(Vec::new()),
            affinity_out: RefCell::new(Vec::new()),
            shared,
        }
    }

    /// Notes an assignment for the other replicas (control mode with `share_affinity`
    /// only): `entry.endpoint` got `entry.blocks` (empty when it held them all already), and
    /// the requests, prefill and placements that come with them.
    pub fn share_assignment(&self, entry: impl FnOnce() -> AffinityEntry) {
        if self.shared.affinity_out.is_some() {
            self.affinity_out.borrow_mut().push(entry());
        }
    }

    /// Hands this worker's assignments to the reporter thread (never blocks: when its
    /// queue is full they are dropped and counted).
    pub fn flush_assignments(&self) {
        let Some(tx) = &self.shared.affinity_out else { return };
        let entries = std::mem::take(&mut *self.affinity_out.borrow_mut());
        if entries.is_empty() {
            return;
        }
        if let Err(e) = tx.try_send(entries) {
            let blocks: usize = e.into_inner().iter().map(|e| e.blocks.len()).sum();
            ::metrics::counter!(metrics::AFFINITY_SHARED_BLOCKS_TOTAL, "status" => "dropped").increment(blocks as u64);
        }
    }

    /// The routing state to use for a request; when it changed, closes idle connections
    /// to endpoints that are gone.
    pub fn routing_state(&self) -> StateRef {
        let (state, changed) = self.routing.current(&self.shared.cell);
        if changed {
            self.pool.sweep(|addr| state.endpoints.iter().any(|e| e.addr == *addr));
        }
        state
    }

    /// Prefix buffers for one request.
    pub fn scratch(&self) -> Scratch<'_> {
        let buffers = self.scratch_free.borrow_mut().pop().unwrap_or_default();
        Scratch { ctx: self, buffers }
    }

    pub fn next_ticket(&self) -> u64 {
        let t = self.ticket.get();
        self.ticket.set(t.wrapping_add(1));
        t
    }

    pub fn next_request_id(&self) -> String {
        let n = self.request_seq.get();
        self.request_seq.set(n + 1);
        format!("lms-{}-{:x}-{n:x}", self.request_prefix, self.id)
    }

    pub fn draining(&self) -> bool {
        self.shared.draining.load(Ordering::Relaxed)
    }
}

pub fn now_nanos() -> u128 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos())
}

/// The state of the link to control, for `/health`.
#[derive(Debug, Default)]
pub struct ControlLink {
    pub connected: AtomicBool,
    /// Unix milliseconds of the last message (0: none yet).
    pub last_message_ms: AtomicU64,
}

impl ControlLink {
    pub fn set_connected(&self, connected: bool) {
        self.connected.store(connected, Ordering::Relaxed);
        ::metrics::gauge!(metrics::CONTROL_CONNECTED).set(if connected { 1.0 } else { 0.0 });
    }
}
