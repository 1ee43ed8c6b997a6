//! Every error the router answers itself: OpenAI-shaped JSON with the right status, and
//! the connection closed where it can no longer be trusted.

#![allow(clippy::unwrap_used, reason = "tests assert by unwrapping")]

use lmstack_e2e::*;

/// Checks the OpenAI error shape and returns the error object.
fn openai_error(r: &RawResponse, status: u16, code: &str) -> Value {
    assert_eq!(r.status, status, "{}", r.text());
    assert_eq!(r.header("content-type"), Some("application/json"));
    let v = r.json();
    let e = &v["error"];
    assert_eq!(e["code"], code, "{v}");
    assert!(e["message"].as_str().is_some_and(|m| !m.is_empty()));
    assert!(e["type"].is_string());
    assert!(e.get("param").is_some());
    e.clone()
}

fn one(r: &Proc, request: &[u8]) -> (RawResponse, Raw) {
    let mut c = Raw::connect(r);
    c.send(request);
    let resp = c.read_response().expect("a response");
    (resp, c)
}

#[test]
fn malformed_http_is_400_and_closes() {
    let e1 = sim("e1", &[]);
    let r = router(&backends(&[&e1]));
    let (resp, mut c) = one(&r, b"GARBAGE GARBAGE GARBAGE\r\n\r\n");
    openai_error(&resp, 400, "malformed_request");
    assert_eq!(resp.header("connection"), Some("close"));
    assert!(c.closed_by_peer());

    let (resp, _) = one(
        &r,
        b"POST /v1/completions HTTP/1.1\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\nab",
    );
    openai_error(&resp, 400, "malformed_request");
    let (resp, _) = one(
        &r,
        b"POST /v1/completions HTTP/1.1\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n",
    );
    openai_error(&resp, 400, "malformed_request");
    let (resp, _) = one(&r, b"POST /v1/completions HTTP/1.1\r\nTransfer-Encoding: gzip\r\n\r\n");
    openai_error(&resp, 501, "unsupported_transfer_encoding");
    let (resp, _) = one(
        &r,
        b"POST /v1/completions HTTP/1.1\r\nExpect: 200-ok\r\nContent-Length: 2\r\n\r\n{}",
    );
    openai_error(&resp, 417, "expectation_failed");
    let (resp, _) = one(
        &r,
        b"POST /v1/completions HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
    );
    openai_error(&resp, 400, "malformed_request");
}

#[test]
fn bad_bodies_are_400_and_keep_the_connection() {
    let e1 = sim("e1", &[]);
    let r = router(&backends(&[&e1]));
    wait_healthy(&r);
    let mut c = Raw::connect(&r);
    c.send(&raw_post("/v1/completions", "{\"model\": ", ""));
    openai_error(&c.read_response().unwrap(), 400, "invalid_json");
    c.send(&raw_post("/v1/completions", "[1,2]", ""));
    openai_error(&c.read_response().unwrap(), 400, "invalid_json");
    c.send(&raw_post("/v1/completions", r#"{"prompt":"x"}"#, ""));
    let e = openai_error(&c.read_response().unwrap(), 400, "invalid_request");
    assert_eq!(e["param"], "model");
    c.send(&raw_post("/v1/completions", r#"{"model":7,"prompt":"x"}"#, ""));
    let e = openai_error(&c.read_response().unwrap(), 400, "invalid_request");
    assert_eq!(e["param"], "model");
    // The same connection still works.
    c.send(&raw_post(
        "/v1/completions",
        r#"{"model":"sim-model","prompt":"x","max_tokens":1}"#,
        "",
    ));
    assert_eq!(c.read_response().unwrap().status, 200);
}

#[test]
fn unknown_models_are_404_listing_what_is_served() {
    let e1 = sim("e1", &["--model", "alpha,beta"]);
    let r = router(&backends(&[&e1]));
    wait_healthy(&r);
    let (resp, _) = one(
        &r,
        &raw_post("/v1/chat/completions", r#"{"model":"gamma","messages":[]}"#, ""),
    );
    let e = openai_error(&resp, 404, "model_not_found");
    let message = e["message"].as_str().unwrap();
    assert!(
        message.contains("gamma") && message.contains("alpha") && message.contains("beta"),
        "{message}"
    );
    assert_eq!(e["param"], "model");
}

#[test]
fn unknown_paths_and_methods() {
    let e1 = sim("e1", &[]);
    let r = router(&backends(&[&e1]));
    let (resp, _) = one(&r, b"GET /v1/nothing HTTP/1.1\r\nHost: x\r\n\r\n");
    openai_error(&resp, 404, "not_found");
    let (resp, _) = one(&r, b"GET /v1/completions HTTP/1.1\r\nHost: x\r\n\r\n");
    openai_error(&resp, 405, "method_not_allowed");
    let (resp, _) = one(&r, b"DELETE /health HTTP/1.1\r\nHost: x\r\n\r\n");
    openai_error(&resp, 405, "method_not_allowed");
}

#[test]
fn bodies_over_the_limit_are_413() {
    let e1 = sim("e1", &[]);
    let r = router(&[backends(&[&e1]), args(&["--max-body-bytes", "1000"])].concat());
    wait_healthy(&r);
    // Declared too large: refused before the body is read, even with 100-continue.
    let (resp, mut c) = one(
        &r,
        b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nExpect: 100-continue\r\nContent-Length: 5000\r\n\r\n",
    );
    openai_error(&resp, 413, "body_too_large");
    assert!(c.closed_by_peer());
    // Sent anyway: the client still gets the answer, not a reset.
    let big = format!(r#"{{"model":"sim-model","prompt":"{}"}}"#, "x".repeat(5000));
    let (resp, _) = one(&r, &raw_post("/v1/completions", &big, ""));
    openai_error(&resp, 413, "body_too_large");
    // Chunked: the limit applies to the decoded size.
    let chunk = "y".repeat(600);
    let body = format!("258\r\n{chunk}\r\n258\r\n{chunk}\r\n0\r\n\r\n");
    let req = format!("POST /v1/completions HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n{body}");
    let (resp, _) = one(&r, req.as_bytes());
    openai_error(&resp, 413, "body_too_large");
}

#[test]
fn oversized_heads_are_431() {
    let e1 = sim("e1", &[]);
    let r = router(&backends(&[&e1]));
    let req = format!(
        "GET /health HTTP/1.1\r\nHost: x\r\nX-Big: {}\r\n\r\n",
        "a".repeat(70 * 1024)
    );
    let (resp, _) = one(&r, req.as_bytes());
    openai_error(&resp, 431, "header_too_large");
}

#[test]
fn slow_heads_time_out_with_408() {
    let dir = std::env::temp_dir().join(format!("lmstack-408-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let config = dir.join("c.yaml");
    std::fs::write(
        &config,
        "server:\n  header_timeout_ms: 300\ndiscovery:\n  backends: [{url: 'http://127.0.0.1:9'}]\n",
    )
    .unwrap();
    let r = router(&args(&["--config", config.to_str().unwrap()]));
    let mut c = Raw::connect(&r);
    c.send(b"GET /health HTTP/1.1\r\nHost: x\r\n");
    let resp = c.read_response().unwrap();
    openai_error(&resp, 408, "request_timeout");
    assert!(c.closed_by_peer());
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn no_healthy_endpoint_is_503() {
    // Nothing listens there: the first probe fails and the endpoint is never routable.
    let dead = FakeEngine::start(Misbehave::Hang);
    let url = dead.url();
    dead.stop_listening();
    let r = router(&args(&[
        "--static-backends",
        &url,
        "--static-models",
        "m",
        "--hold-timeout-ms",
        "0",
    ]));
    wait_until("the router to have a snapshot", || {
        get(&r, "/health").json()["snapshot_version"] == 1
    });
    assert_eq!(get(&r, "/health").status, 503);
    assert_eq!(get(&r, "/health").json()["status"], "no_healthy_endpoint");
    let (resp, _) = one(&r, &raw_post("/v1/completions", r#"{"model":"m","prompt":"x"}"#, ""));
    openai_error(&resp, 503, "no_healthy_endpoint");
    let m = metrics_text(&r);
    assert_eq!(metric(&m, "lmstack_endpoint_healthy", &[("model", "m")]), Some(0.0));
}

#[test]
fn refused_upstreams_are_502() {
    let fake = FakeEngine::start(Misbehave::Hang);
    let r = router_over(&fake, &[]);
    fake.stop_listening();
    let (resp, _) = one(&r, &raw_post("/v1/completions", r#"{"model":"m","prompt":"x"}"#, ""));
    openai_error(&resp, 502, "upstream_connect");
    metrics_when(&r, "the connect error counted", |m| {
        metric_sum(
            m,
            "lmstack_upstream_errors_total",
            &[("error_kind", "upstream_connect")],
        ) >= 1.0
    });
}

#[test]
fn reset_upstreams_are_502() {
    let fake = FakeEngine::start(Misbehave::Reset);
    let r = router_over(&fake, &[]);
    let (resp, _) = one(&r, &raw_post("/v1/completions", r#"{"model":"m","prompt":"x"}"#, ""));
    openai_error(&resp, 502, "upstream_reset");
}

#[test]
fn silent_upstreams_are_504() {
    let fake = FakeEngine::start(Misbehave::Hang);
    let r = router_over(&fake, &["--first-byte-timeout-ms", "300"]);
    let start = std::time::Instant::now();
    let (resp, _) = one(&r, &raw_post("/v1/completions", r#"{"model":"m","prompt":"x"}"#, ""));
    openai_error(&resp, 504, "upstream_timeout");
    assert!(start.elapsed().as_millis() >= 300);
    // A timeout is not retried: the engine may still be working on it.
    assert_eq!(fake.requests.load(std::sync::atomic::Ordering::Relaxed), 1);
}

#[test]
fn a_stream_that_stalls_ends_with_an_error_event_after_the_idle_timeout() {
    let fake = FakeEngine::start(Misbehave::StallMidStream);
    let r = router_over(&fake, &["--stream-idle-timeout-ms", "300"]);
    let (resp, _) = one(
        &r,
        &raw_post("/v1/completions", r#"{"model":"m","prompt":"x","stream":true}"#, ""),
    );
    assert_eq!(resp.status, 200);
    // No other engine to resume on: the stream ends, well-formed, with an error event.
    assert!(resp.complete, "the stream must end properly, not be cut");
    let text = resp.text();
    assert!(text.starts_with("data: {\"a\":1}\n\n"), "{text}");
    assert!(text.contains(r#""code":"upstream_timeout""#), "{text}");
    assert!(text.ends_with("data: [DONE]\n\n"), "{text}");
    metrics_when(&r, "the idle timeout and the stream's end counted", |m| {
        metric_sum(
            m,
            "lmstack_upstream_errors_total",
            &[("error_kind", "upstream_timeout")],
        ) >= 1.0
            && metric_sum(m, "lmstack_stream_resumes_total", &[("outcome", "no_endpoint")]) >= 1.0
    });
}
