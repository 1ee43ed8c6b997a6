//! The router's own queue: with an in-flight limit per endpoint, requests beyond it wait
//! (bounded in count and time) instead of piling onto the engine.

#![allow(clippy::unwrap_used, reason = "tests assert by unwrapping")]

use std::time::{Duration, Instant};

use lmstack_e2e::*;

fn config(dir_name: &str, engine: &Proc, upstream: &str) -> (std::path::PathBuf, Vec<String>) {
    let dir = std::env::temp_dir().join(format!("lmstack-queue-{dir_name}-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("c.yaml");
    std::fs::write(
        &path,
        format!(
            "upstream:\n{upstream}\ndiscovery:\n  backends: [{{url: '{}', models: [sim-model]}}]\n",
            engine.url()
        ),
    )
    .unwrap();
    let args = args(&["--config", path.to_str().unwrap()]);
    (dir, args)
}

#[test]
fn requests_beyond_the_limit_wait_their_turn() {
    // Each request takes ~200 ms at the engine (10 tokens, 20 ms apart).
    let e1 = sim("e1", &["--decode-base-ms", "20"]);
    let (dir, args) = config("wait", &e1, "  max_inflight_per_endpoint: 1");
    let r = router(&args);
    wait_healthy(&r);
    let url = r.url();
    let start = Instant::now();
    let clients: Vec<_> = (0..3)
        .map(|_| {
            let url = url.clone();
            std::thread::spawn(move || {
                agent()
                    .post(format!("{url}/v1/completions"))
                    .send(r#"{"model":"sim-model","prompt":"x","max_tokens":10}"#)
                    .unwrap()
                    .status()
                    .as_u16()
            })
        })
        .collect();
    let mut saw_queue = false;
    let mut saw_engine_over_limit = false;
    while clients.iter().any(|c| !c.is_finished()) {
        let m = metrics_text(&r);
        saw_queue |= metric(&m, "lmstack_requests_queued", &[("model", "sim-model")]).unwrap_or(0.0) >= 1.0;
        let running = metric(&metrics_text(&e1), "vllm:num_requests_running", &[]).unwrap_or(0.0);
        saw_engine_over_limit |= running > 1.0;
        std::thread::sleep(Duration::from_millis(10));
    }
    for c in clients {
        assert_eq!(c.join().unwrap(), 200);
    }
    assert!(saw_queue, "no request was ever queued");
    assert!(!saw_engine_over_limit, "the engine ran more than one request at a time");
    // One at a time: three requests take at least three engine turns.
    assert!(start.elapsed() >= Duration::from_millis(550), "{:?}", start.elapsed());
    std::fs::remove_dir_all(dir).unwrap();
}

/// With the only slot of the only endpoint busy, sends one more request under the queue
/// settings `upstream`; returns its reply and how long it took.
fn one_more_while_busy(name: &str, upstream: &str) -> (Reply, Duration) {
    let e1 = sim("e1", &["--decode-base-ms", "50"]);
    let (dir, args) = config(name, &e1, upstream);
    let r = router(&args);
    wait_healthy(&r);
    // ~5 s at the engine: 100 tokens, 50 ms apart.
    let mut busy = Raw::connect(&r);
    busy.send(&raw_post(
        "/v1/completions",
        r#"{"model":"sim-model","prompt":"x","max_tokens":100}"#,
        "",
    ));
    wait_until("the slot taken", || {
        metric(&metrics_text(&e1), "vllm:num_requests_running", &[]) == Some(1.0)
    });
    let start = Instant::now();
    let reply = post(
        &r,
        "/v1/completions",
        &json!({"model": "sim-model", "prompt": "y", "max_tokens": 1}),
        &[],
    );
    let took = start.elapsed();
    busy.close();
    std::fs::remove_dir_all(dir).unwrap();
    (reply, took)
}

#[test]
fn a_request_that_waits_too_long_is_503_overloaded() {
    let (reply, took) = one_more_while_busy("timeout", "  max_inflight_per_endpoint: 1\n  queue_timeout_ms: 300");
    assert_eq!(reply.status, 503, "{}", reply.body);
    assert_eq!(reply.json()["error"]["code"], "overloaded");
    assert!(took >= Duration::from_millis(300), "{took:?}");
}

#[test]
fn a_full_queue_refuses_at_once() {
    let (reply, took) = one_more_while_busy(
        "full",
        "  max_inflight_per_endpoint: 1\n  max_queued_per_worker: 0\n  queue_timeout_ms: 30000",
    );
    assert_eq!(reply.status, 503, "{}", reply.body);
    assert_eq!(reply.json()["error"]["code"], "overloaded");
    assert!(took < Duration::from_secs(5), "it waited instead of refusing: {took:?}");
}
