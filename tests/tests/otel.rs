//! OpenTelemetry tracing end to end: an OTLP/HTTP receiver in the test (decoding with
//! OpenTelemetry's own protobuf definitions) gets lmstack's spans, and a capturing engine
//! shows the `traceparent` each request reached it with.
//!
//! Not here: the `traceparent` parser's cases and the sampling ratio (unit tests in
//! `dataplane/lmstack/src/otel.rs`).

#![allow(clippy::unwrap_used, reason = "tests assert by unwrapping")]

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use lmstack_e2e::otlp::{Receiver, hex, serve, string_attr};
use lmstack_e2e::*;
use opentelemetry_proto::tonic::trace::v1::Span;
use opentelemetry_proto::tonic::trace::v1::span::SpanKind;

const CLIENT_TRACE: &str = "4bf92f3577b34da6a3ce929d0e0e4736";
const CLIENT_SPAN: &str = "00f067aa0ba902b7";

/// An engine that answers every completion at once and keeps each request's head.
struct Capture {
    addr: SocketAddr,
    heads: Arc<Mutex<Vec<String>>>,
}

impl Capture {
    fn start() -> Capture {
        let heads = Arc::new(Mutex::new(Vec::new()));
        let kept = heads.clone();
        let addr = serve(move |head, _| {
            if head.starts_with("GET ") {
                return b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n".to_vec();
            }
            kept.lock().unwrap().push(head.to_owned());
            let body = r#"{"id":"c","object":"text_completion","created":1,"model":"m","choices":[{"index":0,"text":"ok","finish_reason":"stop"}],"usage":{"prompt_tokens":1,"completion_tokens":1,"total_tokens":2}}"#;
            format!(
                "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{body}",
                body.len()
            )
            .into_bytes()
        });
        Capture { addr, heads }
    }

    fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// A header of the `i`th request the engine got.
    fn header(&self, i: usize, name: &str) -> Option<String> {
        let heads = self.heads.lock().unwrap();
        heads[i].lines().find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.eq_ignore_ascii_case(name).then(|| v.trim().to_owned())
        })
    }

    fn count(&self) -> usize {
        self.heads.lock().unwrap().len()
    }
}

fn attr(span: &Span, key: &str) -> Option<String> {
    string_attr(&span.attributes, key)
}

fn named<'a>(spans: &'a [Span], name: &str) -> Vec<&'a Span> {
    spans.iter().filter(|s| s.name == name).collect()
}

fn only<'a>(spans: &'a [Span], name: &str) -> &'a Span {
    let found = named(spans, name);
    assert_eq!(
        found.len(),
        1,
        "one {name} span: {:#?}",
        spans.iter().map(|s| &s.name).collect::<Vec<_>>()
    );
    found[0]
}

fn server(spans: &[Span]) -> &Span {
    let found: Vec<&Span> = spans.iter().filter(|s| s.kind == SpanKind::Server as i32).collect();
    assert_eq!(found.len(), 1);
    found[0]
}

fn attempts(spans: &[Span]) -> Vec<&Span> {
    let mut a: Vec<&Span> = spans.iter().filter(|s| s.kind == SpanKind::Client as i32).collect();
    a.sort_by_key(|s| s.start_time_unix_nano);
    a
}

fn traced_router(receiver: &Receiver, backends_and_more: &[&str]) -> Proc {
    let mut a = args(&["--otlp-traces-endpoint", &receiver.url()]);
    a.extend(args(backends_and_more));
    let r = router(&a);
    wait_healthy(&r);
    r
}

fn completion() -> Value {
    json!({"model": "m", "prompt": "hello", "max_tokens": 2})
}

#[test]
fn a_clients_trace_goes_on_through_lmstack_to_the_engine() {
    let receiver = Receiver::start();
    let engine = Capture::start();
    let r = traced_router(&receiver, &["--static-backends", &engine.url(), "--static-models", "m"]);
    let traceparent = format!("00-{CLIENT_TRACE}-{CLIENT_SPAN}-01");
    let reply = post(
        &r,
        "/v1/completions",
        &completion(),
        &[("traceparent", &traceparent), ("tracestate", "vendor=abc")],
    );
    assert_eq!(reply.status, 200, "{}", reply.body);
    let spans = receiver.trace(CLIENT_TRACE);

    // The server span continues the client's span, and says what the request was.
    let s = server(&spans);
    assert_eq!(hex(&s.parent_span_id), CLIENT_SPAN);
    assert_eq!(s.name, "POST /v1/completions");
    assert_eq!(s.trace_state, "vendor=abc");
    assert_eq!(attr(s, "gen_ai.request.model").as_deref(), Some("m"));
    assert_eq!(attr(s, "gen_ai.operation.name").as_deref(), Some("text_completion"));
    assert_eq!(attr(s, "http.response.status_code").as_deref(), Some("200"));
    assert_eq!(attr(s, "lmstack.request_id").as_deref(), reply.header("x-request-id"));
    assert_eq!(
        attr(s, "gen_ai.usage.input_tokens"),
        None,
        "usage is read for metered requests only"
    );
    let server_id = hex(&s.span_id);

    // Its children: the routing decision and the attempt; under the attempt, the new
    // connection, the wait for the first byte and the rest of the response.
    let route = only(&spans, "lmstack.route");
    assert_eq!(hex(&route.parent_span_id), server_id);
    assert_eq!(attr(route, "lmstack.route.policy").as_deref(), Some("round_robin"));
    assert_eq!(attr(route, "lmstack.route.endpoint"), Some(engine.url()));
    let tries = attempts(&spans);
    assert_eq!(tries.len(), 1);
    let attempt = tries[0];
    assert_eq!(hex(&attempt.parent_span_id), server_id);
    assert_eq!(attr(attempt, "lmstack.attempt.outcome").as_deref(), Some("done"));
    assert_eq!(attr(attempt, "server.address"), Some(engine.addr.to_string()));
    let attempt_id = hex(&attempt.span_id);
    for name in ["lmstack.connect", "lmstack.first_token", "lmstack.stream"] {
        assert_eq!(hex(&only(&spans, name).parent_span_id), attempt_id, "{name}");
    }
    for span in &spans {
        assert!(span.start_time_unix_nano <= span.end_time_unix_nano, "{}", span.name);
        assert!(span.start_time_unix_nano >= s.start_time_unix_nano, "{}", span.name);
        assert!(span.end_time_unix_nano <= s.end_time_unix_nano, "{}", span.name);
        assert!(span.status.as_ref().is_none_or(|st| st.code == 0), "{}", span.name);
    }

    // The engine continues the trace from the attempt's span; tracestate goes on.
    assert_eq!(
        engine.header(0, "traceparent"),
        Some(format!("00-{CLIENT_TRACE}-{attempt_id}-01"))
    );
    assert_eq!(engine.header(0, "tracestate").as_deref(), Some("vendor=abc"));

    let m = metrics_when(&r, "exported spans counted", |m| {
        metric(m, "lmstack_trace_spans_total", &[("status", "exported")]).is_some_and(|n| n >= spans.len() as f64)
    });
    assert_eq!(metric(&m, "lmstack_trace_spans_total", &[("status", "dropped")]), None);
}

#[test]
fn unsampled_and_malformed_client_contexts_as_the_w3c_says() {
    let receiver = Receiver::start();
    let engine = Capture::start();
    let r = traced_router(&receiver, &["--static-backends", &engine.url(), "--static-models", "m"]);

    // Not sampled by the client: nothing recorded, its traceparent goes on untouched.
    let unsampled = format!("00-{CLIENT_TRACE}-{CLIENT_SPAN}-00");
    assert_eq!(
        post(&r, "/v1/completions", &completion(), &[("traceparent", &unsampled)]).status,
        200
    );
    assert_eq!(engine.header(0, "traceparent"), Some(unsampled));

    // Malformed (uppercase hex): ignored, a new trace starts here (without the client's
    // tracestate, which belonged to the malformed context).
    let malformed = "00-4BF92F3577B34DA6A3CE929D0E0E4736-00F067AA0BA902B7-01";
    let reply = post(
        &r,
        "/v1/completions",
        &completion(),
        &[("traceparent", malformed), ("tracestate", "vendor=abc")],
    );
    assert_eq!(reply.status, 200);
    assert_eq!(engine.header(1, "tracestate"), None);
    let sent = engine.header(1, "traceparent").unwrap();
    let fields: Vec<&str> = sent.split('-').collect();
    assert_eq!(fields.len(), 4, "{sent}");
    assert_ne!(fields[1], CLIENT_TRACE.to_string());
    let spans = receiver.trace(fields[1]);
    assert!(server(&spans).parent_span_id.is_empty(), "a root span");
    assert_eq!(hex(&attempts(&spans)[0].span_id), fields[2]);

    // No context at all: a new trace too.
    assert_eq!(post(&r, "/v1/completions", &completion(), &[]).status, 200);
    let sent = engine.header(2, "traceparent").unwrap();
    let spans = receiver.trace(sent.split('-').nth(1).unwrap());
    assert!(server(&spans).parent_span_id.is_empty());

    // The unsampled request's spans would have been exported before these: none were.
    assert!(receiver.all().iter().all(|s| hex(&s.trace_id) != CLIENT_TRACE));
}

#[test]
fn with_tracing_off_the_clients_traceparent_reaches_the_engine_untouched() {
    let receiver = Receiver::start();
    let engine = Capture::start();
    let r = router(&args(&["--static-models", "m", "--static-backends", &engine.url()]));
    wait_healthy(&r);
    let traceparent = format!("00-{CLIENT_TRACE}-{CLIENT_SPAN}-01");
    for _ in 0..3 {
        let reply = post(
            &r,
            "/v1/completions",
            &completion(),
            &[("traceparent", &traceparent), ("tracestate", "vendor=abc")],
        );
        assert_eq!(reply.status, 200);
    }
    assert_eq!(engine.count(), 3);
    for i in 0..3 {
        assert_eq!(engine.header(i, "traceparent"), Some(traceparent.clone()));
        assert_eq!(engine.header(i, "tracestate").as_deref(), Some("vendor=abc"));
    }
    // Nothing to export to, nothing counted.
    assert!(!metrics_text(&r).contains("lmstack_trace_spans_total"));
    assert!(receiver.all().is_empty());
}

#[test]
fn a_stream_has_its_first_token_and_its_end() {
    let receiver = Receiver::start();
    let e1 = sim("e1", &["--decode-base-ms", "10"]);
    let mut a = args(&["--otlp-traces-endpoint", &receiver.url()]);
    a.extend(backends(&[&e1]));
    let r = router(&a);
    wait_healthy(&r);
    let trace = "0af7651916cd43dd8448eb211c80319c";
    let reply = post(
        &r,
        "/v1/chat/completions",
        &json!({"model": "sim-model", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 8, "stream": true}),
        &[("traceparent", &format!("00-{trace}-b7ad6b7169203331-01"))],
    );
    assert_eq!(reply.status, 200);
    assert!(reply.body.contains("data: [DONE]"));
    let spans = receiver.trace(trace);
    let s = server(&spans);
    assert_eq!(attr(s, "lmstack.stream").as_deref(), Some("true"));
    assert_eq!(attr(s, "gen_ai.operation.name").as_deref(), Some("chat"));
    let attempt = attempts(&spans)[0];
    let first = only(&spans, "lmstack.first_token");
    let stream = only(&spans, "lmstack.stream");
    for span in [first, stream] {
        assert_eq!(span.parent_span_id, attempt.span_id);
    }
    assert_eq!(first.start_time_unix_nano, attempt.start_time_unix_nano);
    assert_eq!(first.end_time_unix_nano, stream.start_time_unix_nano);
    assert!(stream.end_time_unix_nano <= attempt.end_time_unix_nano);
    // 8 tokens 10 ms apart: most of the stream comes after its first token.
    let ms = |a: u64, b: u64| (b - a) as f64 / 1e6;
    assert!(
        ms(stream.start_time_unix_nano, stream.end_time_unix_nano) >= 50.0,
        "{:?}",
        (first, stream)
    );
    assert_eq!(attr(stream, "lmstack.stream.outcome").as_deref(), Some("done"));
}

#[test]
fn a_retried_request_has_two_attempts() {
    let receiver = Receiver::start();
    let bad = FakeEngine::start(Misbehave::Reset);
    let good = Capture::start();
    let backends = format!("{},{}", bad.url(), good.url());
    let r = traced_router(
        &receiver,
        &[
            "--static-backends",
            &backends,
            "--static-models",
            "m,m",
            "--health-check-interval-ms",
            "60000",
            "--workers",
            "1",
        ],
    );
    // Round robin on one worker: of two requests, one tries the resetting engine first.
    let mut retried = None;
    for i in 0..2 {
        let trace = format!("{:032x}", 0xabc0 + i);
        let reply = post(
            &r,
            "/v1/completions",
            &completion(),
            &[("traceparent", &format!("00-{trace}-{CLIENT_SPAN}-01"))],
        );
        assert_eq!(reply.status, 200, "{}", reply.body);
        let spans = receiver.trace(&trace);
        if attempts(&spans).len() == 2 {
            retried = Some(spans);
        }
    }
    let spans = retried.expect("one request was retried");
    let tries = attempts(&spans);
    let server_id = &server(&spans).span_id;
    assert!(tries.iter().all(|t| &t.parent_span_id == server_id));
    assert_eq!(attr(tries[0], "lmstack.attempt.outcome").as_deref(), Some("failed"));
    assert_eq!(attr(tries[0], "lmstack.endpoint"), Some(bad.url()));
    assert_eq!(attr(tries[0], "error.type").as_deref(), Some("upstream_reset"));
    assert_eq!(tries[0].status.as_ref().map(|s| s.code), Some(2), "status ERROR");
    assert_eq!(attr(tries[1], "lmstack.attempt.outcome").as_deref(), Some("done"));
    assert_eq!(attr(tries[1], "lmstack.attempt.kind").as_deref(), Some("retry"));
    assert_eq!(attr(tries[1], "http.request.resend_count").as_deref(), Some("1"));
    // Two routing decisions; the engine that answered got the second attempt's span.
    assert_eq!(named(&spans, "lmstack.route").len(), 2);
    let last = good.count() - 1;
    let sent = good.header(last, "traceparent").unwrap();
    assert!(sent.contains(&hex(&tries[1].span_id)), "{sent}");
}

#[test]
fn a_refused_request_ends_its_server_span_with_the_error() {
    let receiver = Receiver::start();
    let engine = Capture::start();
    let r = traced_router(&receiver, &["--static-backends", &engine.url(), "--static-models", "m"]);
    let traceparent = format!("00-{CLIENT_TRACE}-{CLIENT_SPAN}-01");
    let reply = post(
        &r,
        "/v1/completions",
        &json!({"model": "nope", "prompt": "hello", "max_tokens": 2}),
        &[("traceparent", &traceparent)],
    );
    assert_eq!(reply.status, 404, "{}", reply.body);
    let spans = receiver.trace(CLIENT_TRACE);
    // Only the server span: nothing was routed or tried.
    assert_eq!(
        spans.len(),
        1,
        "{:#?}",
        spans.iter().map(|s| &s.name).collect::<Vec<_>>()
    );
    let s = server(&spans);
    assert_eq!(hex(&s.parent_span_id), CLIENT_SPAN);
    assert_eq!(attr(s, "http.response.status_code").as_deref(), Some("404"));
    assert_eq!(attr(s, "error.type").as_deref(), Some("model_not_found"));
    assert_eq!(attr(s, "gen_ai.request.model").as_deref(), Some("nope"));
    assert_eq!(attr(s, "lmstack.request_id").as_deref(), reply.header("x-request-id"));
    assert_eq!(engine.count(), 0);
}
