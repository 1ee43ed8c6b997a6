//! Metric names, their descriptions and buckets, and per-worker caches of metric handles.
//!
//! Every name the binary exports lives here as a const; label keys come from a closed set
//! (`model`, `endpoint`, `policy`, `reason`, `status`, `error_kind`, `driver`, `version`,
//! `mode`, `check`, `outcome`, `tenant`, `kind`).
//! Each worker resolves its handles once per routing state and accumulates values in its
//! own memory, flushing them to the shared exporter every [`FLUSH_INTERVAL`]: the request
//! path does no registry lookup and touches no cache line another core writes. Not here:
//! what to record when (the pipeline decides), and routing itself: a routing state is seen
//! through [`Labelled`] (state.rs implements it), so this module imports no routing code.

use std::cell::RefCell;
use std::rc::Rc;
use std::sync::Arc;

use metrics::{
    Counter, Gauge, Histogram, counter, describe_counter, describe_gauge, describe_histogram, gauge, histogram,
};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};

use crate::error::ErrorKind;

/// One model's pool as metric labels: the model and its endpoints (URL, routable), in pool
/// order.
pub struct PoolLabels {
    pub model: Arc<str>,
    pub endpoints: Vec<(Arc<str>, bool)>,
}

/// A routing state as metrics see it.
pub trait Labelled {
    /// Moves with every routing state, even when a snapshot version repeats: the key of
    /// per-worker metric tables.
    fn generation(&self) -> u64;

    /// The pools, in their index order (`ModelPool::index`).
    fn pool_labels(&self) -> Vec<PoolLabels>;
}

/// Sets the snapshot gauges when the routing state `old` gave way to `new` (built from
/// snapshot `version`): each (model, endpoint) pair's health, and 0 for pairs that are gone
/// rather than a stale 1.
pub fn snapshot_applied(old: &impl Labelled, new: &impl Labelled, version: u64) {
    let new = new.pool_labels();
    for pool in &new {
        for (url, healthy) in &pool.endpoints {
            gauge!(ENDPOINT_HEALTHY, "model" => pool.model.to_string(), "endpoint" => url.to_string())
                .set(if *healthy { 1.0 } else { 0.0 });
        }
    }
    for pool in old.pool_labels() {
        for (url, _) in &pool.endpoints {
            let still = new
                .iter()
                .any(|p| p.model == pool.model && p.endpoints.iter().any(|(u, _)| u == url));
            if !still {
                gauge!(ENDPOINT_HEALTHY, "model" => pool.model.to_string(), "endpoint" => url.to_string()).set(0.0);
            }
        }
    }
    gauge!(SNAPSHOT_VERSION).set(version as f64);
    counter!(SNAPSHOT_UPDATES_TOTAL).increment(1);
}

/// How often workers hand their accumulated metrics to the exporter; what `/metrics` shows
/// lags by at most this (plus the scrape), far below any scrape interval.
pub const FLUSH_INTERVAL: std::time::Duration = std::time::Duration::from_millis(100);

pub const REQUESTS_TOTAL: &str = "lmstack_requests_total";
pub const REQUEST_DURATION: &str = "lmstack_request_duration_seconds";
pub const REQUESTS_RUNNING: &str = "lmstack_requests_running";
pub const REQUESTS_AWAITING_FIRST_BYTE: &str = "lmstack_requests_awaiting_first_byte";
pub const REQUESTS_QUEUED: &str = "lmstack_requests_queued";
pub const REQUESTS_HELD: &str = "lmstack_requests_held";
pub const STREAM_TTFT: &str = "lmstack_stream_ttft_seconds";
pub const STREAM_TBT: &str = "lmstack_stream_tbt_seconds";
pub const STREAM_EVENTS_TOTAL: &str = "lmstack_stream_events_total";
pub const STREAM_RESUMES_TOTAL: &str = "lmstack_stream_resumes_total";
pub const ENDPOINT_EJECTIONS_TOTAL: &str = "lmstack_endpoint_ejections_total";
pub const ENDPOINT_EJECTED: &str = "lmstack_endpoint_ejected";
pub const UPSTREAM_ERRORS_TOTAL: &str = "lmstack_upstream_errors_total";
pub const UPSTREAM_RETRIES_TOTAL: &str = "lmstack_upstream_retries_total";
pub const UPSTREAM_CONNECTS_TOTAL: &str = "lmstack_upstream_connects_total";
pub const HTTP_ERRORS_TOTAL: &str = "lmstack_http_errors_total";
pub const HTTP_CONNECTIONS: &str = "lmstack_http_connections";
pub const HTTP_CONNECTIONS_TOTAL: &str = "lmstack_http_connections_total";
pub const ROUTING_DECISIONS_TOTAL: &str = "lmstack_routing_decisions_total";
pub const ROUTING_PREFIX_MATCH_RATIO: &str = "lmstack_routing_prefix_match_ratio";
pub const AFFINITY_ENTRIES: &str = "lmstack_affinity_entries";
pub const AFFINITY_CAPACITY: &str = "lmstack_affinity_capacity_entries";
pub const AFFINITY_BYTES: &str = "lmstack_affinity_bytes";
pub const AFFINITY_EVICTIONS_TOTAL: &str = "lmstack_affinity_evictions_total";
pub const ENDPOINT_INFLIGHT: &str = "lmstack_endpoint_inflight";
pub const ENDPOINT_PREFILL_BLOCKS: &str = "lmstack_endpoint_prefill_blocks";
pub const ENDPOINT_HEALTHY: &str = "lmstack_endpoint_healthy";
pub const HEALTH_CHECKS_TOTAL: &str = "lmstack_health_checks_total";
pub const SNAPSHOT_VERSION: &str = "lmstack_snapshot_version";
pub const SNAPSHOT_UPDATES_TOTAL: &str = "lmstack_snapshot_updates_total";
pub const SNAPSHOT_REJECTED_TOTAL: &str = "lmstack_snapshot_rejected_total";
pub const CONTROL_CONNECTED: &str = "lmstack_control_connected";
pub const AFFINITY_SHARED_BLOCKS_TOTAL: &str = "lmstack_affinity_shared_blocks_total";
pub const RESPONSES_LOOKUPS_TOTAL: &str = "lmstack_responses_lookups_total";
pub const RESPONSES_LEARNED_TOTAL: &str = "lmstack_responses_learned_total";
pub const CONTROL_DISCONNECTS_TOTAL: &str = "lmstack_control_disconnects_total";
pub const DISCOVERY_FILE_READS_TOTAL: &str = "lmstack_discovery_file_reads_total";
pub const ROUTING_MODE: &str = "lmstack_routing_mode";
pub const KV_BATCHES_TOTAL: &str = "lmstack_kv_event_batches_total";
pub const KV_EVENTS_APPLIED_TOTAL: &str = "lmstack_kv_events_applied_total";
pub const KV_EVENTS_DROPPED_TOTAL: &str = "lmstack_kv_events_dropped_total";
pub const KV_RESYNCS_TOTAL: &str = "lmstack_kv_index_resyncs_total";
pub const KV_REPLAYED_TOTAL: &str = "lmstack_kv_event_batches_replayed_total";
pub const KV_INDEX_BLOCKS: &str = "lmstack_kv_index_blocks";
pub const KV_LAST_EVENT_AGE: &str = "lmstack_kv_last_event_age_seconds";
pub const KV_COMPAT_PROBLEM: &str = "lmstack_kv_compat_problem";
pub const TENANT_REQUESTS_TOTAL: &str = "lmstack_tenant_requests_total";
pub const TENANT_TOKENS_TOTAL: &str = "lmstack_tenant_tokens_total";
pub const AUTH_REJECTED_TOTAL: &str = "lmstack_auth_rejected_total";
pub const TENANCY_KEYS: &str = "lmstack_tenancy_keys";
pub const TENANCY_RELOADS_TOTAL: &str = "lmstack_tenancy_reloads_total";
pub const BUILD_INFO: &str = "lmstack_build_info";
pub const WORKERS: &str = "lmstack_workers";
pub const TLS_HANDSHAKE_FAILURES_TOTAL: &str = "lmstack_tls_handshake_failures_total";
pub const TLS_CERTIFICATE_RELOADS_TOTAL: &str = "lmstack_tls_certificate_reloads_total";
pub const TRACE_SPANS_TOTAL: &str = "lmstack_trace_spans_total";
pub const TRACE_EXPORTS_TOTAL: &str = "lmstack_trace_exports_total";

const LATENCY_BUCKETS: &[f64] = &[
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0,
];
const TTFT_BUCKETS: &[f64] = &[
    0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 80.0,
];
const RATIO_BUCKETS: &[f64] = &[0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.99, 1.0];
const TBT_BUCKETS: &[f64] = &[
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.015, 0.02, 0.025, 0.03, 0.04, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5,
    0.75, 1.0, 2.5,
];

/// Installs the global Prometheus recorder and describes every metric.
pub fn install() -> Result<PrometheusHandle, metrics_exporter_prometheus::BuildError> {
    let handle = PrometheusBuilder::new()
        .set_buckets_for_metric(Matcher::Full(REQUEST_DURATION.into()), LATENCY_BUCKETS)?
        .set_buckets_for_metric(Matcher::Full(STREAM_TTFT.into()), TTFT_BUCKETS)?
        .set_buckets_for_metric(Matcher::Full(STREAM_TBT.into()), TBT_BUCKETS)?
        .set_buckets_for_metric(Matcher::Full(ROUTING_PREFIX_MATCH_RATIO.into()), RATIO_BUCKETS)?
        .install_recorder()?;
    describe();
    Ok(handle)
}

fn describe() {
    describe_counter!(
        REQUESTS_TOTAL,
        "Requests answered, by model, endpoint and HTTP status (499: client went away)."
    );
    describe_histogram!(
        REQUEST_DURATION,
        "Time from a request's head to the end of its response, seconds."
    );
    describe_gauge!(REQUESTS_RUNNING, "Requests dispatched to an endpoint and not finished.");
    describe_gauge!(
        REQUESTS_AWAITING_FIRST_BYTE,
        "Dispatched requests that have no response byte (streaming: no token) yet: queued or prefilling in the engine."
    );
    describe_gauge!(
        REQUESTS_QUEUED,
        "Requests waiting in the router for an endpoint under its in-flight limit."
    );
    describe_histogram!(
        STREAM_TTFT,
        "Streaming requests: time from the request head to the first SSE data event, seconds."
    );
    describe_histogram!(
        STREAM_TBT,
        "Streaming requests: time between reads that carry SSE data events, seconds."
    );
    describe_counter!(
        STREAM_EVENTS_TOTAL,
        "SSE data events relayed (about one per token with vLLM's defaults)."
    );
    describe_counter!(
        STREAM_RESUMES_TOTAL,
        "Streams cut by their engine after they began, by outcome: resumed (went on on another endpoint and completed), finished (the generation was over; the router ended the stream), or why it ended with an error event instead (exhausted, no_endpoint, disabled, not_openai, choices, logprobs, echo, structured, tools_or_reasoning, unreadable, too_long, request, engine_error)."
    );
    describe_counter!(
        ENDPOINT_EJECTIONS_TOTAL,
        "Times an endpoint was taken out of rotation after failures in a row (passive health)."
    );
    describe_gauge!(
        ENDPOINT_EJECTED,
        "1 while an endpoint is out of rotation after failures in a row, else 0."
    );
    describe_counter!(
        UPSTREAM_ERRORS_TOTAL,
        "Failed attempts against an endpoint, by error kind."
    );
    describe_counter!(
        UPSTREAM_RETRIES_TOTAL,
        "Attempts repeated after a failure before any response byte."
    );
    describe_counter!(UPSTREAM_CONNECTS_TOTAL, "TCP connections opened to endpoints.");
    describe_counter!(
        HTTP_ERRORS_TOTAL,
        "Requests answered with an error by the router itself, by error kind."
    );
    describe_gauge!(HTTP_CONNECTIONS, "Open client connections.");
    describe_counter!(HTTP_CONNECTIONS_TOTAL, "Client connections accepted.");
    describe_counter!(
        ROUTING_DECISIONS_TOTAL,
        "Routing decisions by model, policy and reason."
    );
    describe_histogram!(
        ROUTING_PREFIX_MATCH_RATIO,
        "Prefix routing: share of the prompt's blocks the chosen endpoint already served (matched / prompt blocks)."
    );
    describe_gauge!(AFFINITY_ENTRIES, "Prompt blocks held by the prefix affinity table.");
    describe_gauge!(AFFINITY_CAPACITY, "Prompt blocks the prefix affinity table can hold.");
    describe_gauge!(
        AFFINITY_BYTES,
        "Memory of the prefix affinity table, bytes (allocated once at start)."
    );
    describe_counter!(
        AFFINITY_EVICTIONS_TOTAL,
        "Blocks evicted from the prefix affinity table to make room."
    );
    describe_gauge!(
        ENDPOINT_INFLIGHT,
        "Requests in flight at an endpoint, all workers (what load-aware policies see)."
    );
    describe_gauge!(
        ENDPOINT_PREFILL_BLOCKS,
        "Prompt blocks dispatched to an endpoint and awaiting prefill."
    );
    describe_gauge!(
        ENDPOINT_HEALTHY,
        "1 when the endpoint is routable for the model, else 0."
    );
    describe_counter!(
        HEALTH_CHECKS_TOTAL,
        "Health probes of endpoints, by endpoint and status (ok, fail)."
    );
    describe_gauge!(SNAPSHOT_VERSION, "Version of the routing snapshot in use.");
    describe_counter!(SNAPSHOT_UPDATES_TOTAL, "Routing snapshots applied.");
    describe_counter!(
        SNAPSHOT_REJECTED_TOTAL,
        "Snapshot messages from control rejected, by error_kind (malformed, invalid, out_of_order, too_large)."
    );
    describe_gauge!(
        CONTROL_CONNECTED,
        "1 while the snapshot stream from lmstack-control is open (control mode)."
    );
    describe_counter!(
        AFFINITY_SHARED_BLOCKS_TOTAL,
        "Prompt blocks of prefix assignments shared through control, by status (sent, dropped, applied: received from another replica)."
    );
    describe_counter!(
        RESPONSES_LOOKUPS_TOTAL,
        "Requests naming a stored response (previous_response_id, GET /v1/responses/{id}, cancel), by status: hit (the map knew its endpoint), asked (found by asking the pool), not_found (no endpoint holds it), unreachable (not found, and some endpoint did not answer), unavailable (its endpoint is unhealthy)."
    );
    describe_counter!(
        RESPONSES_LEARNED_TOTAL,
        "Response ids entered in the map of stored responses, by status: answer (from an engine's answer or a pool ask here), shared (relayed from another replica through control)."
    );
    describe_counter!(
        CONTROL_DISCONNECTS_TOTAL,
        "Snapshot streams from lmstack-control lost or refused (the last snapshot stays in use)."
    );
    describe_counter!(
        DISCOVERY_FILE_READS_TOTAL,
        "Reads of the backends file (file mode), by status (ok, fail)."
    );
    describe_gauge!(
        ROUTING_MODE,
        "How prefix routing matches a model's prompts on an endpoint: 1 for the current mode (exact: the engine's KV events; approximate: the affinity table, no events or no tokenizer; degraded: events not live, or an index that may miss blocks, used as a lower bound)."
    );
    describe_counter!(KV_BATCHES_TOTAL, "KV event batches received from an endpoint.");
    describe_counter!(
        KV_EVENTS_APPLIED_TOTAL,
        "KV events applied to an endpoint's block index."
    );
    describe_counter!(
        KV_EVENTS_DROPPED_TOTAL,
        "KV events not applied, by reason (bound, unchained, other_tier, malformed, unknown)."
    );
    describe_counter!(
        KV_RESYNCS_TOTAL,
        "Times an endpoint's block index was dropped, by reason (gap, restart, reset, identity, block_size)."
    );
    describe_counter!(
        KV_REPLAYED_TOTAL,
        "KV event batches recovered from an endpoint's replay socket after a gap."
    );
    describe_gauge!(KV_INDEX_BLOCKS, "Blocks in an endpoint's KV block index.");
    describe_gauge!(
        KV_LAST_EVENT_AGE,
        "Seconds since an endpoint's last KV event batch (absent before the first)."
    );
    describe_gauge!(
        KV_COMPAT_PROBLEM,
        "1 when a check made at an endpoint's registration failed (metric names, prefix caching, block size, KV events reachable), else 0."
    );
    describe_counter!(
        TENANT_REQUESTS_TOTAL,
        "Requests with an API key, by tenant and admission outcome (admitted, throttled_requests, throttled_tokens, too_large, model_not_allowed)."
    );
    describe_counter!(
        TENANT_TOKENS_TOTAL,
        "Tokens charged to a tenant: prompt and completion from the engines' usage; estimated where no usage came (the reservation stands)."
    );
    describe_counter!(
        AUTH_REJECTED_TOTAL,
        "Requests refused 401 because their API key was missing or unknown."
    );
    describe_gauge!(TENANCY_KEYS, "API keys in force.");
    describe_counter!(
        TENANCY_RELOADS_TOTAL,
        "Changes of the keys file: applied, or rejected (the keys in force stay)."
    );
    describe_gauge!(
        REQUESTS_HELD,
        "Requests held for a model without a ready endpoint (scaling up from zero, restarting)."
    );
    gauge!(REQUESTS_HELD).set(0.0);
    describe_gauge!(BUILD_INFO, "Always 1; the version label tells the build.");
    describe_gauge!(WORKERS, "Worker threads, by IO driver (io_uring or epoll).");
    describe_counter!(
        TLS_HANDSHAKE_FAILURES_TOTAL,
        "Client connections closed because their TLS handshake failed or timed out (plain HTTP on the TLS port, a client that refuses the certificate, a client that sends nothing; not one that closes before sending a byte, such as a TCP health check)."
    );
    describe_counter!(
        TLS_CERTIFICATE_RELOADS_TOTAL,
        "Changed certificate and key files read again, by outcome: loaded (new connections use them), rejected (unreadable, invalid or mismatched: the current ones stay)."
    );
    describe_counter!(
        TRACE_SPANS_TOTAL,
        "OpenTelemetry spans of recorded requests, by status: exported (the collector took them), dropped (the exporter's queue was full), failed (their export failed)."
    );
    describe_counter!(
        TRACE_EXPORTS_TOTAL,
        "OTLP export requests to the collector, by status: ok, failed (refused, timed out, or answered other than 2xx)."
    );
}

/// An endpoint was ejected (passive health); rare, so registered on the spot.
pub fn ejected(endpoint: &str) {
    counter!(ENDPOINT_EJECTIONS_TOTAL, "endpoint" => endpoint.to_string()).increment(1);
}

/// `lmstack_routing_mode`: 1 for `mode`, 0 for the others.
pub fn kv_mode(model: &str, endpoint: &str, mode: &str, all: &[&'static str]) {
    for m in all {
        gauge!(ROUTING_MODE, "model" => model.to_owned(), "endpoint" => endpoint.to_owned(), "mode" => *m)
            .set(if *m == mode { 1.0 } else { 0.0 });
    }
}

/// An endpoint's index size and event age (`last_event_ms`: Unix ms, 0 before any).
pub fn kv_index(endpoint: &str, blocks: usize, last_event_ms: u64) {
    gauge!(KV_INDEX_BLOCKS, "endpoint" => endpoint.to_owned()).set(blocks as f64);
    if last_event_ms > 0 {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as u64);
        gauge!(KV_LAST_EVENT_AGE, "endpoint" => endpoint.to_owned())
            .set(now.saturating_sub(last_event_ms) as f64 / 1000.0);
    }
}

/// An endpoint left: its index gauges go to 0.
pub fn kv_engine_gone(endpoint: &str) {
    gauge!(KV_INDEX_BLOCKS, "endpoint" => endpoint.to_owned()).set(0.0);
}

pub fn kv_received(endpoint: &str) {
    counter!(KV_BATCHES_TOTAL, "endpoint" => endpoint.to_owned()).increment(1);
}

pub fn kv_applied(endpoint: &str, n: u64) {
    counter!(KV_EVENTS_APPLIED_TOTAL, "endpoint" => endpoint.to_owned()).increment(n);
}

pub fn kv_dropped(endpoint: &str, reason: &'static str, n: u64) {
    counter!(KV_EVENTS_DROPPED_TOTAL, "endpoint" => endpoint.to_owned(), "reason" => reason).increment(n);
}

pub fn kv_resync(endpoint: &str, reason: &'static str, n: u64) {
    counter!(KV_RESYNCS_TOTAL, "endpoint" => endpoint.to_owned(), "reason" => reason).increment(n);
}

pub fn kv_replayed(endpoint: &str, batches: u64) {
    counter!(KV_REPLAYED_TOTAL, "endpoint" => endpoint.to_owned()).increment(batches);
}

pub fn kv_problem(endpoint: &str, check: &'static str, problem: bool) {
    gauge!(KV_COMPAT_PROBLEM, "endpoint" => endpoint.to_owned(), "check" => check).set(if problem { 1.0 } else { 0.0 });
}

/// Histogram samples a worker buffers per metric before recording them early.
const MAX_PENDING_SAMPLES: usize = 1024;

/// Everything recorded for one (model, endpoint) pair on one worker since the last flush.
#[derive(Default)]
struct Pending {
    statuses: Vec<(u16, u64)>,
    errors: Vec<(ErrorKind, u64)>,
    running: i64,
    awaiting_first_byte: i64,
    events: u64,
    retries: u64,
    connects: u64,
    duration: Vec<f64>,
    ttft: Vec<f64>,
    tbt: Vec<f64>,
}

/// One (model, endpoint) pair's metrics on one worker. Recording touches only this
/// worker's memory; [`flush`](Self::flush) hands the totals to the shared exporter.
pub struct PairMetrics {
    model: Arc<str>,
    endpoint: Arc<str>,
    duration: Histogram,
    running: Gauge,
    awaiting_first_byte: Gauge,
    ttft: Histogram,
    tbt: Histogram,
    events: Counter,
    retries: Counter,
    statuses: RefCell<Vec<(u16, Counter)>>,
    errors: RefCell<Vec<(ErrorKind, Counter)>>,
    /// Connections opened to the endpoint (labelled by endpoint only), registered on first use.
    connects: RefCell<Option<Counter>>,
    pending: RefCell<Pending>,
}

fn add<K: PartialEq + Copy>(list: &mut Vec<(K, u64)>, key: K, n: u64) {
    match list.iter_mut().find(|(k, _)| *k == key) {
        Some((_, v)) => *v += n,
        None => list.push((key, n)),
    }
}

/// The counter for `key` in a small cache, registered on first use.
fn cached<K: PartialEq + Copy>(cache: &RefCell<Vec<(K, Counter)>>, key: K, make: impl FnOnce() -> Counter) -> Counter {
    let mut cache = cache.borrow_mut();
    if let Some((_, c)) = cache.iter().find(|(k, _)| *k == key) {
        return c.clone();
    }
    let c = make();
    cache.push((key, c.clone()));
    c
}

fn push_sample(samples: &mut Vec<f64>, value: f64, histogram: &Histogram) {
    samples.push(value);
    if samples.len() >= MAX_PENDING_SAMPLES {
        for v in samples.drain(..) {
            histogram.record(v);
        }
    }
}

impl PairMetrics {
    fn new(model: Arc<str>, endpoint: Arc<str>) -> Self {
        let labels = [("model", model.to_string()), ("endpoint", endpoint.to_string())];
        Self {
            duration: histogram!(REQUEST_DURATION, &labels),
            running: gauge!(REQUESTS_RUNNING, &labels),
            awaiting_first_byte: gauge!(REQUESTS_AWAITING_FIRST_BYTE, &labels),
            ttft: histogram!(STREAM_TTFT, &labels),
            tbt: histogram!(STREAM_TBT, &labels),
            events: counter!(STREAM_EVENTS_TOTAL, &labels),
            retries: counter!(UPSTREAM_RETRIES_TOTAL, &labels),
            statuses: RefCell::new(Vec::new()),
            errors: RefCell::new(Vec::new()),
            connects: RefCell::new(None),
            pending: RefCell::new(Pending::default()),
            model,
            endpoint,
        }
    }

    pub fn status(&self, status: u16) {
        add(&mut self.pending.borrow_mut().statuses, status, 1);
    }

    pub fn upstream_error(&self, kind: ErrorKind) {
        add(&mut self.pending.borrow_mut().errors, kind, 1);
    }

    pub fn duration(&self, seconds: f64) {
        push_sample(&mut self.pending.borrow_mut().duration, seconds, &self.duration);
    }

    pub fn ttft(&self, seconds: f64) {
        push_sample(&mut self.pending.borrow_mut().ttft, seconds, &self.ttft);
    }

    pub fn tbt(&self, seconds: f64) {
        push_sample(&mut self.pending.borrow_mut().tbt, seconds, &self.tbt);
    }

    pub fn events(&self, n: u64) {
        self.pending.borrow_mut().events += n;
    }

    pub fn retry(&self) {
        self.pending.borrow_mut().retries += 1;
    }

    /// A new connection to the endpoint was opened.
    pub fn connect(&self) {
        self.pending.borrow_mut().connects += 1;
    }

    pub fn running(&self, delta: i64) {
        self.pending.borrow_mut().running += delta;
    }

    pub fn awaiting_first_byte(&self, delta: i64) {
        self.pending.borrow_mut().awaiting_first_byte += delta;
    }

    /// Hands what was recorded since the last flush to the exporter.
    fn flush(&self) {
        let p = std::mem::take(&mut *self.pending.borrow_mut());
        let (model, endpoint) = (self.model.to_string(), self.endpoint.to_string());
        for (status, n) in p.statuses {
            cached(&self.statuses, status, || {
                counter!(REQUESTS_TOTAL, "model" => model.clone(), "endpoint" => endpoint.clone(), "status" => status.to_string())
            })
            .increment(n);
        }
        for (kind, n) in p.errors {
            cached(&self.errors, kind, || {
                counter!(UPSTREAM_ERRORS_TOTAL, "model" => model.clone(), "endpoint" => endpoint.clone(), "error_kind" => kind.label())
            })
            .increment(n);
        }
        if p.running != 0 {
            self.running.increment(p.running as f64);
        }
        if p.awaiting_first_byte != 0 {
            self.awaiting_first_byte.increment(p.awaiting_first_byte as f64);
        }
        self.events.increment(p.events);
        self.retries.increment(p.retries);
        if p.connects > 0 {
            self.connects
                .borrow_mut()
                .get_or_insert_with(|| counter!(UPSTREAM_CONNECTS_TOTAL, "endpoint" => endpoint.clone()))
                .increment(p.connects);
        }
        for (samples, h) in [(p.duration, &self.duration), (p.ttft, &self.ttft), (p.tbt, &self.tbt)] {
            for v in samples {
                h.record(v);
            }
        }
    }
}

/// A routing decision counted locally: (policy, reason, count since flush, handle).
type Decision = (&'static str, &'static str, u64, Option<Counter>);

/// One model's metrics on one worker, indexed like its pool in the routing state.
pub struct ModelMetrics {
    /// Per endpoint, in pool order.
    pub pairs: Vec<Rc<PairMetrics>>,
    match_ratio: Histogram,
    match_ratios: RefCell<Vec<f64>>,
    /// Requests of this model that reached no endpoint (errors, clients that left early).
    pub unrouted: Rc<PairMetrics>,
    decisions: RefCell<Vec<Decision>>,
    /// Cut streams by outcome: (outcome, count since flush, handle).
    resumes: RefCell<Vec<(&'static str, u64, Option<Counter>)>>,
    queued: Gauge,
    name: Arc<str>,
}

impl ModelMetrics {
    pub fn decision(&self, policy: &'static str, reason: &'static str) {
        let mut d = self.decisions.borrow_mut();
        match d.iter_mut().find(|(p, r, _, _)| *p == policy && *r == reason) {
            Some(entry) => entry.2 += 1,
            None => d.push((policy, reason, 1, None)),
        }
    }

    /// A stream was cut after it began; `outcome` says what became of it.
    pub fn resume(&self, outcome: &'static str) {
        let mut r = self.resumes.borrow_mut();
        match r.iter_mut().find(|(o, _, _)| *o == outcome) {
            Some(entry) => entry.1 += 1,
            None => r.push((outcome, 1, None)),
        }
    }

    /// Matched blocks over prompt blocks of a prefix-routed request.
    pub fn match_ratio(&self, ratio: f64) {
        push_sample(&mut self.match_ratios.borrow_mut(), ratio, &self.match_ratio);
    }

    pub fn queued(&self) -> &Gauge {
        &self.queued
    }

    /// The model these metrics are labelled with.
    #[cfg(test)]
    pub fn model(&self) -> &str {
        &self.name
    }

    fn flush(&self) {
        for p in &self.pairs {
            p.flush();
        }
        self.unrouted.flush();
        for v in self.match_ratios.borrow_mut().drain(..) {
            self.match_ratio.record(v);
        }
        for (policy, reason, n, counter) in self.decisions.borrow_mut().iter_mut() {
            if *n > 0 {
                counter
                    .get_or_insert_with(|| {
                        counter!(
                            ROUTING_DECISIONS_TOTAL,
                            "model" => self.name.to_string(),
                            "policy" => *policy,
                            "reason" => *reason
                        )
                    })
                    .increment(*n);
                *n = 0;
            }
        }
        for (outcome, n, counter) in self.resumes.borrow_mut().iter_mut() {
            if *n > 0 {
                counter
                    .get_or_insert_with(
                        || counter!(STREAM_RESUMES_TOTAL, "model" => self.name.to_string(), "outcome" => *outcome),
                    )
                    .increment(*n);
                *n = 0;
            }
        }
    }
}

/// A worker's metric handles for one routing state (by its generation).
pub struct MetricTable {
    generation: u64,
    /// By model index (see `ModelPool::index`).
    pub models: Vec<ModelMetrics>,
}

/// One worker's metrics: handles resolved once per routing state, values accumulated in
/// this worker's memory and flushed to the shared exporter periodically (and before every
/// `/metrics` render on this worker), so the request path shares no cache line with other
/// workers.
#[derive(Default)]
pub struct LocalMetrics {
    table: RefCell<Option<Rc<MetricTable>>>,
    http_errors: RefCell<Vec<(ErrorKind, u64, Option<Counter>)>>,
}

impl LocalMetrics {
    /// The handle table for `state`, rebuilt when its generation changes (pairs that still
    /// exist keep their handles, so nothing recorded is lost). Keyed on the generation, not
    /// the snapshot version: a replacing snapshot may repeat a version with other pools.
    pub fn table(&self, state: &impl Labelled) -> Rc<MetricTable> {
        if let Some(t) = self.table.borrow().as_ref()
            && t.generation == state.generation()
        {
            return t.clone();
        }
        let old = self.table.borrow_mut().take();
        if let Some(old) = &old {
            for m in &old.models {
                m.flush();
            }
        }
        let reuse = |model: &str, endpoint: &str| -> Option<Rc<PairMetrics>> {
            let old = old.as_ref()?;
            old.models.iter().find(|m| m.name.as_ref() == model).and_then(|m| {
                if endpoint.is_empty() {
                    Some(m.unrouted.clone())
                } else {
                    m.pairs.iter().find(|p| p.endpoint.as_ref() == endpoint).cloned()
                }
            })
        };
        let models = state
            .pool_labels()
            .into_iter()
            .map(|pool| {
                let model = pool.model;
                let pairs = pool
                    .endpoints
                    .into_iter()
                    .map(|(url, _)| {
                        reuse(&model, &url).unwrap_or_else(|| Rc::new(PairMetrics::new(model.clone(), url)))
                    })
                    .collect();
                ModelMetrics {
                    pairs,
                    match_ratio: histogram!(ROUTING_PREFIX_MATCH_RATIO, "model" => model.to_string()),
                    match_ratios: RefCell::new(Vec::new()),
                    unrouted: reuse(&model, "").unwrap_or_else(|| Rc::new(PairMetrics::new(model.clone(), "".into()))),
                    decisions: RefCell::new(Vec::new()),
                    resumes: RefCell::new(Vec::new()),
                    queued: gauge!(REQUESTS_QUEUED, "model" => model.to_string()),
                    name: model,
                }
            })
            .collect();
        let table = Rc::new(MetricTable {
            generation: state.generation(),
            models,
        });
        *self.table.borrow_mut() = Some(table.clone());
        table
    }

    pub fn http_error(&self, kind: ErrorKind) {
        let mut e = self.http_errors.borrow_mut();
        match e.iter_mut().find(|(k, _, _)| *k == kind) {
            Some(entry) => entry.1 += 1,
            None => e.push((kind, 1, None)),
        }
    }

    /// Hands everything recorded on this worker to the exporter.
    pub fn flush(&self) {
        if let Some(t) = self.table.borrow().as_ref() {
            for m in &t.models {
                m.flush();
            }
        }
        for (kind, n, counter) in self.http_errors.borrow_mut().iter_mut() {
            if *n > 0 {
                counter
                    .get_or_insert_with(|| counter!(HTTP_ERRORS_TOTAL, "error_kind" => kind.label()))
                    .increment(*n);
                *n = 0;
            }
        }
    }
}
