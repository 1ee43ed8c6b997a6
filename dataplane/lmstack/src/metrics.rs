//! Metric names, their descriptions and buckets, and per-worker caches of metric handles.
//!
//! Every name the binary exports lives here as a const; label keys come from a closed set
//! (`model`, `endpoint`, `policy`, `reason`, `status`, `error_kind`, `driver`, `version`).
//! Handles are looked up once per (model, endpoint) per worker and kept, so the request
//! path does no registry lookups. Not here: what to record when (the pipeline decides).

use std::cell::RefCell;
use std::collections::HashMap;
use std::rc::Rc;
use std::sync::Arc;

use metrics::{
    Counter, Gauge, Histogram, counter, describe_counter, describe_gauge, describe_histogram, gauge, histogram,
};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};

use crate::error::ErrorKind;

pub const REQUESTS_TOTAL: &str = "lmstack_requests_total";
pub const REQUEST_DURATION: &str = "lmstack_request_duration_seconds";
pub const REQUESTS_RUNNING: &str = "lmstack_requests_running";
pub const REQUESTS_AWAITING_FIRST_BYTE: &str = "lmstack_requests_awaiting_first_byte";
pub const REQUESTS_QUEUED: &str = "lmstack_requests_queued";
pub const STREAM_TTFT: &str = "lmstack_stream_ttft_seconds";
pub const STREAM_TBT: &str = "lmstack_stream_tbt_seconds";
pub const STREAM_EVENTS_TOTAL: &str = "lmstack_stream_events_total";
pub const UPSTREAM_ERRORS_TOTAL: &str = "lmstack_upstream_errors_total";
pub const UPSTREAM_RETRIES_TOTAL: &str = "lmstack_upstream_retries_total";
pub const UPSTREAM_CONNECTS_TOTAL: &str = "lmstack_upstream_connects_total";
pub const HTTP_ERRORS_TOTAL: &str = "lmstack_http_errors_total";
pub const HTTP_CONNECTIONS: &str = "lmstack_http_connections";
pub const HTTP_CONNECTIONS_TOTAL: &str = "lmstack_http_connections_total";
pub const ROUTING_DECISIONS_TOTAL: &str = "lmstack_routing_decisions_total";
pub const ENDPOINT_HEALTHY: &str = "lmstack_endpoint_healthy";
pub const HEALTH_CHECKS_TOTAL: &str = "lmstack_health_checks_total";
pub const SNAPSHOT_VERSION: &str = "lmstack_snapshot_version";
pub const SNAPSHOT_UPDATES_TOTAL: &str = "lmstack_snapshot_updates_total";
pub const BUILD_INFO: &str = "lmstack_build_info";
pub const WORKERS: &str = "lmstack_workers";

const LATENCY_BUCKETS: &[f64] = &[
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0,
];
const TTFT_BUCKETS: &[f64] = &[
    0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 80.0,
];
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
    describe_gauge!(BUILD_INFO, "Always 1; the version label tells the build.");
    describe_gauge!(WORKERS, "Worker threads, by IO driver (io_uring or epoll).");
}

/// Handles for one (model, endpoint) pair, on one worker.
pub struct PairMetrics {
    model: Arc<str>,
    endpoint: Arc<str>,
    statuses: RefCell<Vec<(u16, Counter)>>,
    errors: RefCell<Vec<(ErrorKind, Counter)>>,
    pub duration: Histogram,
    pub running: Gauge,
    pub awaiting_first_byte: Gauge,
    pub ttft: Histogram,
    pub tbt: Histogram,
    pub events: Counter,
    pub retries: Counter,
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
            model,
            endpoint,
        }
    }

    pub fn status(&self, status: u16) {
        let mut statuses = self.statuses.borrow_mut();
        if let Some((_, c)) = statuses.iter().find(|(s, _)| *s == status) {
            c.increment(1);
            return;
        }
        let c = counter!(
            REQUESTS_TOTAL,
            "model" => self.model.to_string(),
            "endpoint" => self.endpoint.to_string(),
            "status" => status.to_string()
        );
        c.increment(1);
        statuses.push((status, c));
    }

    pub fn upstream_error(&self, kind: ErrorKind) {
        let mut errors = self.errors.borrow_mut();
        if let Some((_, c)) = errors.iter().find(|(k, _)| *k == kind) {
            c.increment(1);
            return;
        }
        let c = counter!(
            UPSTREAM_ERRORS_TOTAL,
            "model" => self.model.to_string(),
            "endpoint" => self.endpoint.to_string(),
            "error_kind" => kind.label()
        );
        c.increment(1);
        errors.push((kind, c));
    }
}

/// (model, endpoint)
type PairKey = (Arc<str>, Arc<str>);
/// (model, policy, reason)
type DecisionKey = (Arc<str>, &'static str, &'static str);

/// One worker's handle cache.
#[derive(Default)]
pub struct LocalMetrics {
    pairs: RefCell<HashMap<PairKey, Rc<PairMetrics>>>,
    http_errors: RefCell<HashMap<ErrorKind, Counter>>,
    decisions: RefCell<HashMap<DecisionKey, Counter>>,
    queued: RefCell<HashMap<Arc<str>, Gauge>>,
}

impl LocalMetrics {
    /// Handles for a (model, endpoint) pair; an empty endpoint stands for "none picked".
    pub fn pair(&self, model: &Arc<str>, endpoint: &Arc<str>) -> Rc<PairMetrics> {
        let key = (model.clone(), endpoint.clone());
        self.pairs
            .borrow_mut()
            .entry(key)
            .or_insert_with(|| Rc::new(PairMetrics::new(model.clone(), endpoint.clone())))
            .clone()
    }

    pub fn http_error(&self, kind: ErrorKind) {
        self.http_errors
            .borrow_mut()
            .entry(kind)
            .or_insert_with(|| counter!(HTTP_ERRORS_TOTAL, "error_kind" => kind.label()))
            .increment(1);
    }

    pub fn decision(&self, model: &Arc<str>, policy: &'static str, reason: &'static str) {
        self.decisions
            .borrow_mut()
            .entry((model.clone(), policy, reason))
            .or_insert_with(|| {
                counter!(ROUTING_DECISIONS_TOTAL, "model" => model.to_string(), "policy" => policy, "reason" => reason)
            })
            .increment(1);
    }

    pub fn queued(&self, model: &Arc<str>) -> Gauge {
        self.queued
            .borrow_mut()
            .entry(model.clone())
            .or_insert_with(|| gauge!(REQUESTS_QUEUED, "model" => model.to_string()))
            .clone()
    }

    /// Drops cached handles of pairs no longer in the routing state, so the cache stays
    /// bounded as endpoints come and go.
    pub fn retain_pairs(&self, live: impl Fn(&str, &str) -> bool) {
        self.pairs
            .borrow_mut()
            .retain(|(m, e), _| e.is_empty() || m.is_empty() || live(m, e));
    }
}
