//! OpenTelemetry tracing: the W3C trace context a request comes with and the one its engine
//! gets (`traceparent`), the spans of one request recorded on its worker, and the exporter
//! thread that batches finished requests' spans to an OTLP/HTTP collector (protobuf,
//! `/v1/traces`).
//!
//! A worker never waits on tracing: a request's spans are plain values in its own
//! `RequestTrace` (no clock read, no allocation while the request is not recorded), handed
//! to the exporter thread through a bounded queue when the request ends, dropped and
//! counted when the queue is full. The exporter thread turns them into OTLP's messages,
//! encodes and posts them. Not here: where spans open and close (proxy.rs's numbered
//! steps), metric names (metrics.rs).

use std::borrow::Cow;
use std::cell::{Cell, RefCell};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use crossbeam_channel::{Receiver, RecvTimeoutError, Sender, TrySendError};
use lmstack_http::head::RequestHead;
use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
use opentelemetry_proto::tonic::common::v1::{AnyValue, InstrumentationScope, KeyValue, any_value};
use opentelemetry_proto::tonic::resource::v1::Resource;
use opentelemetry_proto::tonic::trace::v1::{ResourceSpans, ScopeSpans, Span, Status, span, status};

use crate::config::{TracingConfig, ms};
use crate::metrics;

pub const TRACEPARENT: &str = "traceparent";

/// A W3C `traceparent` (Trace Context, level 1): the trace, the sender's span, its
/// sampled flag.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TraceParent {
    pub trace_id: u128,
    pub span_id: u64,
    pub sampled: bool,
}

impl TraceParent {
    /// Reads a `traceparent` value; `None` when it is malformed (a new trace starts, as the
    /// specification says): not `version-traceid-parentid-flags` in lowercase hex, version
    /// `ff`, an all-zero id, or a version-00 value with anything after the flags.
    pub fn parse(value: &[u8]) -> Option<TraceParent> {
        let value = value.trim_ascii();
        if value.len() < 55 {
            return None;
        }
        let (head, rest) = value.split_at(55);
        let version = hex(&head[0..2])?;
        let ok = version != 0xff
            && head[2] == b'-'
            && head[35] == b'-'
            && head[52] == b'-'
            // Version 00 ends at the flags; a later version may add fields after a dash.
            && (rest.is_empty() || (version > 0 && rest[0] == b'-'));
        if !ok {
            return None;
        }
        let trace_id = hex(&head[3..35])?;
        let span_id = hex(&head[36..52])? as u64;
        let flags = hex(&head[53..55])?;
        (trace_id != 0 && span_id != 0).then_some(TraceParent {
            trace_id,
            span_id,
            sampled: flags & 1 == 1,
        })
    }

    pub fn header_value(&self) -> String {
        format!(
            "00-{:032x}-{:016x}-{:02x}",
            self.trace_id,
            self.span_id,
            u8::from(self.sampled)
        )
    }
}

/// Lowercase hex digits (the specification allows no uppercase) as a number.
fn hex(digits: &[u8]) -> Option<u128> {
    let mut n: u128 = 0;
    for &d in digits {
        let v = match d {
            b'0'..=b'9' => d - b'0',
            b'a'..=b'f' => d - b'a' + 10,
            _ => return None,
        };
        n = (n << 4) | u128::from(v);
    }
    Some(n)
}

fn new_trace_id() -> u128 {
    fastrand::u128(1..)
}

fn new_span_id() -> u64 {
    fastrand::u64(1..)
}

/// One request's spans, sent to the exporter thread when it ends.
struct Finished {
    trace_id: u128,
    /// The client's `tracestate`, kept on the server span.
    trace_state: String,
    /// The request's start, on both clocks: span times are kept as `Instant`s and turned
    /// into Unix time on the exporter thread.
    started: Instant,
    started_unix_ns: u64,
    spans: Vec<SpanRecord>,
}

/// What the exporter thread is handed.
enum Message {
    Spans(Finished),
    /// Export what is waiting, then answer.
    Flush(Sender<()>),
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    Server,
    Client,
    Internal,
}

/// An attribute's value.
#[derive(Debug)]
pub enum Value {
    Str(String),
    Static(&'static str),
    Int(i64),
    Bool(bool),
}

impl From<&'static str> for Value {
    fn from(s: &'static str) -> Self {
        Value::Static(s)
    }
}

impl From<String> for Value {
    fn from(s: String) -> Self {
        Value::Str(s)
    }
}

impl From<i64> for Value {
    fn from(n: i64) -> Self {
        Value::Int(n)
    }
}

impl From<bool> for Value {
    fn from(b: bool) -> Self {
        Value::Bool(b)
    }
}

pub type Attributes = Vec<(&'static str, Value)>;

/// A finished span, as the worker records it.
#[derive(Debug)]
struct SpanRecord {
    id: u64,
    parent: u64,
    /// The parent is the client's span (another process).
    remote_parent: bool,
    name: String,
    kind: Kind,
    start: Instant,
    end: Instant,
    attributes: Attributes,
    /// `error.type`: the span failed.
    error: Option<Cow<'static, str>>,
}

/// The tracer all workers share: the sampling rule and the exporter thread's queue.
pub struct Tracer {
    tx: Sender<Message>,
    /// New traces are recorded when their id's low 64 bits are below this (OpenTelemetry's
    /// `TraceIdRatioBased`); `None`: always.
    ratio_bound: Option<u64>,
}

impl Tracer {
    /// Starts the exporter thread (`tracing.otlp_endpoint` set).
    pub fn start(config: &TracingConfig, instance: &str) -> std::io::Result<Tracer> {
        let (tx, rx) = crossbeam_channel::bounded(config.queue_traces);
        let exporter = Exporter::new(config, instance);
        std::thread::Builder::new()
            .name("lmstack-otel".into())
            .spawn(move || exporter.run(&rx))?;
        let ratio_bound = (config.sample_ratio < 1.0).then_some((config.sample_ratio * u64::MAX as f64) as u64);
        Ok(Tracer { tx, ratio_bound })
    }

    fn samples(&self, trace_id: u128) -> bool {
        self.ratio_bound.is_none_or(|bound| (trace_id as u64) < bound)
    }

    /// Exports what waits and returns when done or after `timeout` (at shutdown).
    pub fn flush(&self, timeout: Duration) {
        let (tx, rx) = crossbeam_channel::bounded(1);
        if self.tx.send_timeout(Message::Flush(tx), timeout).is_ok() {
            let _ = rx.recv_timeout(timeout);
        }
    }

    fn send(&self, finished: Finished) {
        let n = finished.spans.len() as u64;
        match self.tx.try_send(Message::Spans(finished)) {
            Ok(()) => {}
            Err(TrySendError::Full(_) | TrySendError::Disconnected(_)) => {
                ::metrics::counter!(metrics::TRACE_SPANS_TOTAL, "status" => "dropped").increment(n);
            }
        }
    }
}

/// The attempt under way: its span's id and what happened in it so far.
struct Attempt {
    id: u64,
    start: Instant,
    attributes: Attributes,
    first_token: Option<Instant>,
}

/// One request's trace context and, when it is recorded, its spans so far. Hooks take
/// `&self` (the request's futures share it) and do nothing on a request not recorded.
pub struct RequestTrace {
    trace_id: u128,
    /// The server span (the request at the router).
    span_id: u64,
    /// The client's span, 0 when the trace starts here.
    parent: u64,
    recording: bool,
    /// What the engine gets when the request is not recorded: `None` keeps the client's
    /// `traceparent` (if any) untouched.
    unrecorded_parent: Option<String>,
    trace_state: String,
    started: Instant,
    started_unix_ns: u64,
    attributes: RefCell<Attributes>,
    spans: RefCell<Vec<SpanRecord>>,
    /// The routing decision under way (the parent of a wait in the queue).
    route_span: Cell<u64>,
    attempt: RefCell<Option<Attempt>>,
}

impl RequestTrace {
    /// The trace of a request that arrived at `started`: the client's, when it sent a valid
    /// `traceparent` (recorded as its sampled flag says), else a new one (recorded by the
    /// sample ratio).
    pub fn start(tracer: &Tracer, head: &RequestHead, started: Instant) -> RequestTrace {
        let mut parents = head
            .headers
            .iter()
            .filter(|(n, _)| n.eq_ignore_ascii_case(TRACEPARENT.as_bytes()));
        // Two `traceparent` headers are as good as none.
        let client = match (parents.next(), parents.next()) {
            (Some((_, v)), None) => TraceParent::parse(v),
            _ => None,
        };
        let now = SystemTime::now();
        let since = started.elapsed();
        let started_unix_ns = now
            .checked_sub(since)
            .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
            .map_or(0, |d| d.as_nanos() as u64);
        let (trace_id, parent, recording, unrecorded_parent) = match client {
            Some(p) => (p.trace_id, p.span_id, p.sampled, None),
            None => {
                let id = new_trace_id();
                let recording = tracer.samples(id);
                // A new trace not recorded still tells the engine so, as a parent-based
                // sampler there reads it.
                let unrecorded = (!recording).then(|| {
                    TraceParent {
                        trace_id: id,
                        span_id: new_span_id(),
                        sampled: false,
                    }
                    .header_value()
                });
                (id, 0, recording, unrecorded)
            }
        };
        let trace_state = match (recording, client) {
            (true, Some(_)) => head.headers.get_str("tracestate").unwrap_or("").to_owned(),
            _ => String::new(),
        };
        RequestTrace {
            trace_id,
            span_id: new_span_id(),
            parent,
            recording,
            unrecorded_parent,
            trace_state,
            started,
            started_unix_ns,
            attributes: RefCell::new(Vec::new()),
            spans: RefCell::new(Vec::new()),
            route_span: Cell::new(0),
            attempt: RefCell::new(None),
        }
    }

    /// Adds attributes to the server span.
    pub fn annotate(&self, attributes: impl FnOnce() -> Attributes) {
        if self.recording {
            self.attributes.borrow_mut().extend(attributes());
        }
    }

    fn record(&self, span: SpanRecord) {
        self.spans.borrow_mut().push(span);
    }

    /// A routing decision begins (it may wait in the router's queue).
    pub fn route_begins(&self) -> Option<Instant> {
        self.recording.then(|| {
            self.route_span.set(new_span_id());
            Instant::now()
        })
    }

    /// The routing decision that began at `start`, with what decided it.
    pub fn route_ends(
        &self,
        start: Option<Instant>,
        attributes: impl FnOnce() -> Attributes,
        error: Option<&'static str>,
    ) {
        let Some(start) = start else { return };
        let attributes = attributes();
        self.record(SpanRecord {
            id: self.route_span.get(),
            parent: self.span_id,
            remote_parent: false,
            name: "lmstack.route".into(),
            kind: Kind::Internal,
            start,
            end: Instant::now(),
            attributes,
            error: error.map(Cow::Borrowed),
        });
    }

    /// The request waited in the router's queue from `entered` until now (a child of the
    /// routing decision).
    pub fn queued(&self, entered: Instant, outcome: &'static str) {
        if !self.recording {
            return;
        }
        self.record(SpanRecord {
            id: new_span_id(),
            parent: self.route_span.get(),
            remote_parent: false,
            name: "lmstack.queue".into(),
            kind: Kind::Internal,
            start: entered,
            end: Instant::now(),
            attributes: vec![("lmstack.queue.outcome", outcome.into())],
            error: None,
        });
    }

    /// An attempt begins: returns the `traceparent` its engine gets, and whether the trace
    /// is new here (`None`: the client's, untouched).
    pub fn attempt_begins(&self, attributes: impl FnOnce() -> Attributes) -> Option<(String, bool)> {
        let new = self.parent == 0;
        if !self.recording {
            return self.unrecorded_parent.clone().map(|tp| (tp, new));
        }
        let id = new_span_id();
        *self.attempt.borrow_mut() = Some(Attempt {
            id,
            start: Instant::now(),
            attributes: attributes(),
            first_token: None,
        });
        let tp = TraceParent {
            trace_id: self.trace_id,
            span_id: id,
            sampled: true,
        };
        Some((tp.header_value(), new))
    }

    /// A new connection to the engine was made (or failed) from `start` until now.
    pub fn connected(&self, start: Option<Instant>, server: &str, error: Option<&'static str>) {
        let (Some(start), Some(attempt)) = (start, &*self.attempt.borrow()) else {
            return;
        };
        self.record(SpanRecord {
            id: new_span_id(),
            parent: attempt.id,
            remote_parent: false,
            name: "lmstack.connect".into(),
            kind: Kind::Internal,
            start,
            end: Instant::now(),
            attributes: vec![("server.address", server.to_owned().into())],
            error: error.map(Cow::Borrowed),
        });
    }

    /// A clock reading for a hook, taken only while recording.
    pub fn now(&self) -> Option<Instant> {
        self.recording.then(Instant::now)
    }

    /// The attempt's first token (an SSE data event; a non-streaming response's head).
    pub fn first_token(&self, at: Instant) {
        if let Some(a) = &mut *self.attempt.borrow_mut() {
            a.first_token.get_or_insert(at);
        }
    }

    /// The attempt ends: its span (an HTTP client span), and under it the wait for the
    /// first token and, from there, the stream to its end.
    pub fn attempt_ends(&self, outcome: &'static str, status: Option<u16>, error: Option<&'static str>) {
        let Some(a) = self.attempt.borrow_mut().take() else {
            return;
        };
        let end = Instant::now();
        let mut attributes = a.attributes;
        attributes.push(("lmstack.attempt.outcome", outcome.into()));
        if let Some(s) = status {
            attributes.push(("http.response.status_code", i64::from(s).into()));
        }
        if let Some(first) = a.first_token {
            self.record(SpanRecord {
                id: new_span_id(),
                parent: a.id,
                remote_parent: false,
                name: "lmstack.first_token".into(),
                kind: Kind::Internal,
                start: a.start,
                end: first,
                attributes: Vec::new(),
                error: None,
            });
            self.record(SpanRecord {
                id: new_span_id(),
                parent: a.id,
                remote_parent: false,
                name: "lmstack.stream".into(),
                kind: Kind::Internal,
                start: first,
                end,
                attributes: vec![("lmstack.stream.outcome", outcome.into())],
                error: error.map(Cow::Borrowed),
            });
        }
        let name = match attributes.iter().find(|(k, _)| *k == "http.request.method") {
            Some((_, Value::Str(m))) => m.clone(),
            _ => "POST".into(),
        };
        self.record(SpanRecord {
            id: a.id,
            parent: self.span_id,
            remote_parent: false,
            name,
            kind: Kind::Client,
            start: a.start,
            end,
            attributes,
            error: error.map(Cow::Borrowed),
        });
    }

    /// The request ends: its server span, and every span goes to the exporter thread.
    pub fn finish(self, tracer: &Tracer, name: String, status: u16, error: Option<&'static str>) {
        if !self.recording {
            return;
        }
        // An attempt the client's leaving cut short.
        if self.attempt.borrow().is_some() {
            self.attempt_ends("client_closed", None, Some("client_closed"));
        }
        let mut attributes = self.attributes.into_inner();
        attributes.push(("http.response.status_code", i64::from(status).into()));
        // HTTP server spans: a 4xx is the client's error, not the span's failure.
        if let Some(e) = error.filter(|_| status < 500) {
            attributes.push(("error.type", e.into()));
        }
        let mut spans = self.spans.into_inner();
        spans.push(SpanRecord {
            id: self.span_id,
            parent: self.parent,
            remote_parent: self.parent != 0,
            name,
            kind: Kind::Server,
            start: self.started,
            end: Instant::now(),
            attributes,
            error: match error {
                _ if status < 500 => None,
                Some(e) => Some(e.into()),
                None => Some(status.to_string().into()),
            },
        });
        tracer.send(Finished {
            trace_id: self.trace_id,
            trace_state: self.trace_state,
            started: self.started,
            started_unix_ns: self.started_unix_ns,
            spans,
        });
    }
}

/// The exporter thread's state: the URL, the resource, the batch under way.
struct Exporter {
    url: String,
    agent: ureq::Agent,
    resource: Resource,
    max_batch: usize,
    interval: Duration,
}

fn key_value(key: &str, value: any_value::Value) -> KeyValue {
    KeyValue {
        key: key.to_owned(),
        value: Some(AnyValue { value: Some(value) }),
        ..Default::default()
    }
}

fn unix_ns(at: Instant, started: Instant, started_unix_ns: u64) -> u64 {
    match at.checked_duration_since(started) {
        Some(d) => started_unix_ns.saturating_add(d.as_nanos() as u64),
        None => started_unix_ns.saturating_sub(started.duration_since(at).as_nanos() as u64),
    }
}

impl Exporter {
    fn new(config: &TracingConfig, instance: &str) -> Exporter {
        let agent: ureq::Agent = ureq::Agent::config_builder()
            .timeout_global(Some(ms(config.export_timeout_ms)))
            .http_status_as_error(false)
            .build()
            .into();
        let resource = Resource {
            attributes: vec![
                key_value(
                    "service.name",
                    any_value::Value::StringValue(config.service_name.clone()),
                ),
                key_value(
                    "service.version",
                    any_value::Value::StringValue(env!("CARGO_PKG_VERSION").into()),
                ),
                key_value("service.instance.id", any_value::Value::StringValue(instance.into())),
            ],
            ..Default::default()
        };
        Exporter {
            url: config.traces_url(),
            agent,
            resource,
            max_batch: config.max_export_batch_spans,
            interval: ms(config.export_interval_ms),
        }
    }

    /// Collects finished requests' spans and exports them every interval, or sooner when a
    /// batch is full; ends when every tracer is gone.
    fn run(&self, rx: &Receiver<Message>) {
        let mut batch: Vec<Span> = Vec::new();
        let mut due = Instant::now() + self.interval;
        loop {
            let flushed = match rx.recv_timeout(due.saturating_duration_since(Instant::now())) {
                Ok(Message::Spans(f)) => {
                    convert(f, &mut batch);
                    None
                }
                Ok(Message::Flush(done)) => Some(done),
                Err(RecvTimeoutError::Timeout) => None,
                Err(RecvTimeoutError::Disconnected) => {
                    self.export(&mut batch);
                    return;
                }
            };
            let now = Instant::now();
            if batch.len() >= self.max_batch || now >= due || flushed.is_some() {
                while !batch.is_empty() {
                    self.export(&mut batch);
                }
                due = now + self.interval;
            }
            if let Some(done) = flushed {
                let _ = done.send(());
            }
        }
    }

    /// Posts up to a batch of spans (they leave `batch` whatever happens) and counts them.
    fn export(&self, batch: &mut Vec<Span>) {
        if batch.is_empty() {
            return;
        }
        let spans: Vec<Span> = batch.drain(..batch.len().min(self.max_batch)).collect();
        let n = spans.len() as u64;
        let request = ExportTraceServiceRequest {
            resource_spans: vec![ResourceSpans {
                resource: Some(self.resource.clone()),
                scope_spans: vec![ScopeSpans {
                    scope: Some(InstrumentationScope {
                        name: "lmstack".into(),
                        version: env!("CARGO_PKG_VERSION").into(),
                        ..Default::default()
                    }),
                    spans,
                    schema_url: String::new(),
                }],
                schema_url: String::new(),
            }],
        };
        let body = prost::Message::encode_to_vec(&request);
        let sent = self
            .agent
            .post(&self.url)
            .header("content-type", "application/x-protobuf")
            .send(&body[..]);
        let failure = match sent {
            Ok(r) if r.status().is_success() => None,
            Ok(r) => Some(format!("the collector answered {}", r.status())),
            Err(e) => Some(e.to_string()),
        };
        match failure {
            None => {
                ::metrics::counter!(metrics::TRACE_SPANS_TOTAL, "status" => "exported").increment(n);
                ::metrics::counter!(metrics::TRACE_EXPORTS_TOTAL, "status" => "ok").increment(1);
            }
            Some(why) => {
                tracing::warn!(url = %self.url, spans = n, "trace export failed: {why}");
                ::metrics::counter!(metrics::TRACE_SPANS_TOTAL, "status" => "failed").increment(n);
                ::metrics::counter!(metrics::TRACE_EXPORTS_TOTAL, "status" => "failed").increment(1);
            }
        }
    }
}

/// One request's spans as OTLP spans.
fn convert(f: Finished, out: &mut Vec<Span>) {
    let trace_id = f.trace_id.to_be_bytes().to_vec();
    for s in f.spans {
        let kind = match s.kind {
            Kind::Server => span::SpanKind::Server,
            Kind::Client => span::SpanKind::Client,
            Kind::Internal => span::SpanKind::Internal,
        };
        let mut attributes: Vec<KeyValue> = s
            .attributes
            .into_iter()
            .map(|(k, v)| {
                let v = match v {
                    Value::Str(s) => any_value::Value::StringValue(s),
                    Value::Static(s) => any_value::Value::StringValue(s.into()),
                    Value::Int(n) => any_value::Value::IntValue(n),
                    Value::Bool(b) => any_value::Value::BoolValue(b),
                };
                key_value(k, v)
            })
            .collect();
        let status = match s.error {
            Some(e) => {
                attributes.push(key_value("error.type", any_value::Value::StringValue(e.to_string())));
                Some(Status {
                    message: e.into_owned(),
                    code: status::StatusCode::Error as i32,
                })
            }
            None => None,
        };
        // Trace flags (sampled), and whether the parent is known to be remote.
        let flags = 0x01 | 0x100 | if s.remote_parent { 0x200 } else { 0 };
        out.push(Span {
            trace_id: trace_id.clone(),
            span_id: s.id.to_be_bytes().to_vec(),
            trace_state: if s.kind == Kind::Server {
                f.trace_state.clone()
            } else {
                String::new()
            },
            parent_span_id: if s.parent == 0 {
                Vec::new()
            } else {
                s.parent.to_be_bytes().to_vec()
            },
            flags,
            name: s.name,
            kind: kind as i32,
            start_time_unix_nano: unix_ns(s.start, f.started, f.started_unix_ns),
            end_time_unix_nano: unix_ns(s.end, f.started, f.started_unix_ns),
            attributes,
            status,
            ..Default::default()
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn traceparents_are_read_as_the_specification_says() {
        let good = b"00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        let p = TraceParent::parse(good).unwrap();
        assert_eq!(p.trace_id, 0x4bf92f3577b34da6a3ce929d0e0e4736);
        assert_eq!(p.span_id, 0x00f067aa0ba902b7);
        assert!(p.sampled);
        assert_eq!(p.header_value().as_bytes(), good);
        let unsampled = TraceParent::parse(b"00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-00").unwrap();
        assert!(!unsampled.sampled);
        // Other flag bits do not make it sampled; a later version may add fields.
        assert!(
            !TraceParent::parse(b"00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-02")
                .unwrap()
                .sampled
        );
        assert!(TraceParent::parse(b"01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-what").is_some());
        for bad in [
            &b"00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01"[..],
            b"00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            b"00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
            b"ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            b"00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-extra",
            b"00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-0",
            b"00_4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            b"00-4bf92f3577b34da6a3ce929d0e0e473g-00f067aa0ba902b7-01",
            b"",
        ] {
            assert_eq!(TraceParent::parse(bad), None, "{}", String::from_utf8_lossy(bad));
        }
    }

    #[test]
    fn the_ratio_samples_by_the_trace_ids_low_half() {
        let config = TracingConfig {
            otlp_endpoint: "http://127.0.0.1:9".into(),
            sample_ratio: 0.25,
            ..TracingConfig::default()
        };
        let tracer = Tracer::start(&config, "test").unwrap();
        let n = 100_000;
        let kept = (0..n).filter(|_| tracer.samples(new_trace_id())).count();
        assert!((kept as f64 / n as f64 - 0.25).abs() < 0.01, "{kept}");
        // The same trace id is decided the same way everywhere.
        assert!(tracer.samples(0xffff_0000_0000_0000_0000_0000_0000_0001));
        assert!(!tracer.samples(0x0000_0000_0000_0000_ffff_0000_0000_0000));
    }

    #[test]
    fn a_full_queue_drops_spans_rather_than_wait() {
        let (tx, rx) = crossbeam_channel::bounded(1);
        let tracer = Tracer { tx, ratio_bound: None };
        let finished = || Finished {
            trace_id: 1,
            trace_state: String::new(),
            started: Instant::now(),
            started_unix_ns: 0,
            spans: Vec::new(),
        };
        let start = Instant::now();
        for _ in 0..3 {
            tracer.send(finished());
        }
        assert!(start.elapsed() < Duration::from_millis(100));
        assert_eq!(rx.len(), 1);
    }

    #[test]
    fn span_times_keep_their_order_in_unix_time() {
        let t0 = Instant::now();
        let later = t0 + Duration::from_millis(5);
        assert_eq!(unix_ns(later, t0, 1_000_000_000), 1_005_000_000);
        assert_eq!(unix_ns(t0, later, 1_005_000_000), 1_000_000_000);
    }
}
