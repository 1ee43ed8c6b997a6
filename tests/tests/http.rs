//! HTTP/1.1 behaviour on both sides of the router: keep-alive, pipelining, chunked and
//! 100-continue uploads, HTTP/1.0 clients, cancellation, retries, and both IO drivers.

#![allow(clippy::unwrap_used, reason = "tests assert by unwrapping")]

use std::io::Read;
use std::sync::atomic::Ordering;

use lmstack_e2e::*;

const SMALL: &str = r#"{"model":"sim-model","prompt":"hello","max_tokens":2}"#;

#[test]
fn keep_alive_and_pipelined_requests_are_answered_in_order() {
    let e1 = sim("e1", &[]);
    let r = router(&backends(&[&e1]));
    wait_healthy(&r);
    let mut c = Raw::connect(&r);
    // Three requests in one write: the slow one first, so out-of-order answers would show.
    let slow = r#"{"model":"sim-model","prompt":"slow","max_tokens":30}"#;
    let fast = r#"{"model":"sim-model","prompt":"fast","max_tokens":1}"#;
    let mut batch = raw_post("/v1/completions", slow, "X-Request-Id: first\r\n");
    batch.extend(raw_post("/v1/completions", fast, "X-Request-Id: second\r\n"));
    batch.extend(b"GET /version HTTP/1.1\r\nHost: x\r\nX-Request-Id: third\r\n\r\n");
    c.send(&batch);
    let ids: Vec<String> = (0..3)
        .map(|_| {
            let resp = c.read_response().unwrap();
            assert_eq!(resp.status, 200);
            resp.header("x-request-id").unwrap().to_owned()
        })
        .collect();
    assert_eq!(ids, vec!["first", "second", "third"]);
    // Still open for more.
    c.send(&raw_post("/v1/completions", SMALL, ""));
    assert_eq!(c.read_response().unwrap().status, 200);
    // One client connection, and the engine saw pooled connections reused.
    let m = metrics_text(&r);
    let connects = metric_sum(&m, "lmstack_upstream_connects_total", &[]);
    assert!(connects <= 3.0, "engine connections were not reused: {connects}");
}

#[test]
fn chunked_uploads_are_forwarded_with_a_length() {
    let e1 = sim("e1", &[]);
    let r = router(&backends(&[&e1]));
    wait_healthy(&r);
    let body = r#"{"model":"sim-model","prompt":"chunked upload","max_tokens":2}"#;
    let (a, b) = body.split_at(10);
    let req = format!(
        "POST /v1/completions HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n{:x}\r\n{a}\r\n{:x};ext=1\r\n{b}\r\n0\r\nTrailer: t\r\n\r\n",
        a.len(),
        b.len()
    );
    let mut c = Raw::connect(&r);
    c.send(req.as_bytes());
    let resp = c.read_response().unwrap();
    assert_eq!(resp.status, 200, "{}", resp.text());
    assert_eq!(resp.json()["usage"]["prompt_tokens"], 4);
}

#[test]
fn expect_100_continue_is_answered_before_the_body() {
    let e1 = sim("e1", &[]);
    let r = router(&backends(&[&e1]));
    wait_healthy(&r);
    let mut c = Raw::connect(&r);
    c.send(
        format!(
            "POST /v1/completions HTTP/1.1\r\nHost: x\r\nExpect: 100-continue\r\nContent-Length: {}\r\n\r\n",
            SMALL.len()
        )
        .as_bytes(),
    );
    let interim = c.read_response().unwrap();
    assert_eq!(interim.status, 100);
    c.send(SMALL.as_bytes());
    assert_eq!(c.read_response().unwrap().status, 200);
}

#[test]
fn http10_clients_get_a_plain_stream_and_a_close() {
    let e1 = sim("e1", &[]);
    let r = router(&backends(&[&e1]));
    wait_healthy(&r);
    let body = r#"{"model":"sim-model","prompt":"old client","max_tokens":3,"stream":true}"#;
    let mut c = Raw::connect(&r);
    c.send(
        format!(
            "POST /v1/completions HTTP/1.0\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        )
        .as_bytes(),
    );
    let resp = c.read_response().unwrap();
    assert_eq!(resp.status, 200);
    assert_eq!(resp.header("transfer-encoding"), None);
    assert_eq!(resp.header("connection"), Some("close"));
    let text = resp.text();
    assert!(text.starts_with("data: {"), "{text}");
    assert!(text.ends_with("data: [DONE]\n\n"), "{text}");
}

#[test]
fn a_client_that_leaves_cancels_its_request_at_the_engine() {
    // 1000 tokens at 50 ms each: the stream would run for 50 s.
    let e1 = sim("e1", &["--decode-base-ms", "50"]);
    let r = router(&backends(&[&e1]));
    wait_healthy(&r);
    let running = || metric(&metrics_text(&e1), "vllm:num_requests_running", &[]).unwrap();

    // Streaming: leave after the first event.
    let mut c = Raw::connect(&r);
    let body = r#"{"model":"sim-model","prompt":"long","max_tokens":1000,"stream":true}"#;
    c.send(&raw_post("/v1/completions", body, ""));
    c.read_head().unwrap();
    let mut buf = [0u8; 1024];
    let _ = c.stream.read(&mut buf).unwrap();
    assert_eq!(running(), 1.0);
    c.close();
    wait_until("the engine to drop the streaming request", || running() == 0.0);
    let abort = [("finished_reason", "abort")];
    assert_eq!(
        metric(&metrics_text(&e1), "vllm:request_success_total", &abort),
        Some(1.0)
    );

    // Non-streaming: leave while the engine generates.
    let mut c = Raw::connect(&r);
    let body = r#"{"model":"sim-model","prompt":"long","max_tokens":1000}"#;
    c.send(&raw_post("/v1/completions", body, ""));
    wait_until("the engine to run the request", || running() == 1.0);
    c.close();
    wait_until("the router to drop its engine connection", || {
        metric_sum(&metrics_text(&r), "lmstack_requests_total", &[("status", "499")]) == 2.0
    });
    metrics_when(&r, "nothing running", |m| {
        metric_sum(m, "lmstack_requests_running", &[]) == 0.0
    });
}

#[test]
fn failures_before_the_first_byte_are_retried_elsewhere() {
    let e1 = sim("e1", &[]);
    let broken = FakeEngine::start(Misbehave::Reset);
    let r = router(&args(&[
        "--static-backends",
        &format!("{},{}", e1.url(), broken.url()),
        "--static-models",
        "sim-model,sim-model",
        "--health-check-interval-ms",
        "60000",
    ]));
    wait_until("both endpoints healthy", || {
        get(&r, "/health").json()["models"][0]["healthy_endpoints"] == 2
    });
    let agent = agent();
    for _ in 0..20 {
        let reply = post_with(
            &agent,
            &r,
            "/v1/completions",
            &json!({"model": "sim-model", "prompt": "x", "max_tokens": 1}),
            &[],
        );
        assert_eq!(reply.status, 200, "{}", reply.body);
        assert_eq!(reply.header("x-sim-engine"), Some("e1"));
    }
    assert!(
        broken.requests.load(Ordering::Relaxed) >= 5,
        "round robin never tried the broken endpoint"
    );
    let m = metrics_when(&r, "retries counted", |m| {
        metric_sum(m, "lmstack_upstream_retries_total", &[]) >= 5.0
    });
    assert!(metric_sum(&m, "lmstack_upstream_errors_total", &[("error_kind", "upstream_reset")]) >= 5.0);
}

#[test]
fn stale_pooled_connections_are_retried_transparently() {
    // The engine closes every connection after answering, without saying so: the router's
    // pooled connection is dead by the next request.
    let fake = FakeEngine::start(Misbehave::CloseAfterEachResponse);
    let r = router_over(&fake, &["--workers", "1"]);
    for _ in 0..10 {
        let (status, body) = {
            let reply = post(&r, "/v1/completions", &json!({"model": "m", "prompt": "x"}), &[]);
            (reply.status, reply.body)
        };
        assert_eq!(status, 200, "{body}");
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    // The pooled connection was tried and found dead, and the request went out again.
    metrics_when(&r, "retries on stale connections", |m| {
        metric_sum(m, "lmstack_upstream_retries_total", &[]) >= 5.0
    });
}

#[test]
fn unhealthy_endpoints_leave_rotation_and_come_back() {
    let e1 = sim("e1", &[]);
    let e2 = sim("e2", &[]);
    let r = router(&[backends(&[&e1, &e2]), args(&["--health-check-interval-ms", "100"])].concat());
    wait_until("both healthy", || {
        get(&r, "/health").json()["models"][0]["healthy_endpoints"] == 2
    });
    let e2_addr = e2.addr;
    drop(e2);
    wait_until("e2 out of rotation", || {
        get(&r, "/health").json()["models"][0]["healthy_endpoints"] == 1
    });
    for _ in 0..10 {
        let reply = post(
            &r,
            "/v1/completions",
            &json!({"model": "sim-model", "prompt": "x", "max_tokens": 1}),
            &[],
        );
        assert_eq!(reply.header("x-sim-engine"), Some("e1"));
    }
    // Back on the same port.
    let _e2 = Proc::start(
        &bin("lmstack-sim"),
        &args(&[
            "--host",
            "127.0.0.1",
            "--port",
            &e2_addr.port().to_string(),
            "--name",
            "e2",
        ]),
        &[],
    );
    wait_until("e2 back", || {
        get(&r, "/health").json()["models"][0]["healthy_endpoints"] == 2
    });
}

fn driver_of(pid: u32) -> Vec<String> {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .filter_map(|e| std::fs::read_link(e.ok()?.path()).ok())
        .map(|p| p.to_string_lossy().into_owned())
        .filter(|p| p.contains("io_uring") || p.contains("eventpoll"))
        .collect()
}

#[test]
fn the_epoll_fallback_serves_the_same() {
    let e1 = sim("e1", &[]);
    let r = router_env(&backends(&[&e1]), &[("MONOIO_FORCE_LEGACY_DRIVER", "1")]);
    wait_healthy(&r);
    let fds = driver_of(r.pid());
    assert!(fds.iter().any(|f| f.contains("eventpoll")), "{fds:?}");
    assert!(!fds.iter().any(|f| f.contains("io_uring")), "{fds:?}");
    assert_eq!(
        metric(&metrics_text(&r), "lmstack_workers", &[("driver", "epoll")]),
        Some(2.0)
    );
    let reply = post(
        &r,
        "/v1/completions",
        &json!({"model": "sim-model", "prompt": "x", "max_tokens": 3, "stream": true}),
        &[],
    );
    assert_eq!(reply.status, 200);
    assert!(reply.body.contains("data: [DONE]"));
    let mut c = Raw::connect(&r);
    let mut batch = raw_post("/v1/completions", SMALL, "");
    batch.extend(raw_post("/v1/completions", SMALL, ""));
    c.send(&batch);
    assert_eq!(c.read_response().unwrap().status, 200);
    assert_eq!(c.read_response().unwrap().status, 200);
}

#[test]
fn io_uring_is_used_where_the_kernel_has_it() {
    let e1 = sim("e1", &[]);
    let r = router(&backends(&[&e1]));
    wait_healthy(&r);
    let log = r.log_text();
    let uring = driver_of(r.pid()).iter().any(|f| f.contains("io_uring"));
    // Whichever driver was chosen is the one in use, and it is logged.
    if uring {
        assert!(log.contains("driver=\"io_uring\""), "{log}");
    } else {
        eprintln!("io_uring is not available here; the epoll driver was chosen");
        assert!(log.contains("driver=\"epoll\""), "{log}");
    }
}

#[test]
fn shutdown_waits_for_requests_in_flight() {
    let e1 = sim("e1", &["--decode-base-ms", "20"]);
    let r = router(&backends(&[&e1]));
    wait_healthy(&r);
    let url = r.url();
    let client = std::thread::spawn(move || {
        let reply = agent()
            .post(format!("{url}/v1/completions"))
            .send(r#"{"model":"sim-model","prompt":"x","max_tokens":25}"#)
            .unwrap();
        reply.status().as_u16()
    });
    wait_until("the request to be in flight", || {
        metric(&metrics_text(&e1), "vllm:num_requests_running", &[]) == Some(1.0)
    });
    let status = r.terminate();
    assert!(status.success(), "{status:?}");
    assert_eq!(client.join().unwrap(), 200);
}
