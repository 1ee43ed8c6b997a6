//! Admission: requests held for a model with no ready endpoint (scaling up from zero,
//! restarting), through the real router and simulated engines that appear late.

#![allow(clippy::unwrap_used, reason = "tests assert by unwrapping")]

use std::time::{Duration, Instant};

use lmstack_e2e::*;
use serde_json::json;

/// A simulated engine serving `model` on `port`.
fn sim_on(port: u16, model: &str) -> Proc {
    Proc::start(
        &bin("lmstack-sim"),
        &args(&[
            "--host",
            "127.0.0.1",
            "--port",
            &port.to_string(),
            "--name",
            "late",
            "--model",
            model,
        ]),
        &[],
    )
}

#[test]
fn a_model_scaling_up_from_zero_holds_its_requests_until_its_engine_is_there() {
    let dir = workspace_root().join("target/e2e-logs");
    std::fs::create_dir_all(&dir).unwrap();
    let backends = dir.join(format!("admission-backends-{}.yaml", std::process::id()));
    std::fs::write(&backends, "backends: []\n").unwrap();
    let config = dir.join(format!("admission-config-{}.yaml", std::process::id()));
    std::fs::write(
        &config,
        "admission:\n  hold_models: [late-*]\n  hold_timeout_ms: 30000\n",
    )
    .unwrap();
    let r = router(&args(&[
        "--service-discovery",
        "file",
        "--discovery-file",
        backends.to_str().unwrap(),
        "--health-check-interval-ms",
        "100",
        "--config",
        config.to_str().unwrap(),
    ]));
    wait_until("the router to answer", || {
        get(&r, "/health").json()["snapshot_version"].as_u64() > Some(0)
    });
    // A model nobody said to wait for is 404 at once.
    let started = Instant::now();
    let reply = post(&r, "/v1/completions", &json!({"model": "other", "prompt": "x"}), &[]);
    assert_eq!(reply.status, 404, "{}", reply.body);
    assert!(started.elapsed() < Duration::from_secs(2));
    // The engine comes up 5 s after the request.
    let port = free_port();
    let late = std::thread::spawn({
        let backends = backends.clone();
        move || {
            std::thread::sleep(Duration::from_secs(5));
            let engine = sim_on(port, "late-model");
            wait_until("the late engine to listen", || {
                std::net::TcpStream::connect(("127.0.0.1", port)).is_ok()
            });
            std::fs::write(&backends, format!("backends:\n  - url: {}\n", engine.url())).unwrap();
            engine
        }
    });
    let started = Instant::now();
    let reply = post(
        &r,
        "/v1/completions",
        &json!({"model": "late-model", "prompt": "hello", "max_tokens": 3}),
        &[],
    );
    let waited = started.elapsed();
    assert_eq!(reply.status, 200, "{}", reply.body);
    assert!(waited >= Duration::from_millis(4900), "answered after {waited:?}");
    let _engine = late.join().unwrap();
    assert_eq!(
        metric(&get(&r, "/metrics").body, "lmstack_requests_held", &[]),
        Some(0.0)
    );
    let _ = std::fs::remove_file(&backends);
}

#[test]
fn a_model_whose_endpoints_are_all_down_holds_then_fails_with_retry_after() {
    // Nothing listens there: the endpoint is known, never healthy.
    let port = free_port();
    let r = router(&args(&[
        "--static-backends",
        &format!("http://127.0.0.1:{port}"),
        "--static-models",
        "m",
        "--hold-timeout-ms",
        "400",
    ]));
    wait_until("the router to have a snapshot", || {
        get(&r, "/health").json()["snapshot_version"] == 1
    });
    let started = Instant::now();
    let reply = post(&r, "/v1/completions", &json!({"model": "m", "prompt": "x"}), &[]);
    let waited = started.elapsed();
    assert_eq!(reply.status, 503, "{}", reply.body);
    assert!(waited >= Duration::from_millis(400), "failed after {waited:?}");
    assert!(reply.body.contains("no_healthy_endpoint"), "{}", reply.body);
    assert_eq!(reply.header("retry-after"), Some("5"));
    assert_eq!(reply.header("x-lmstack-reason"), Some("no_ready_endpoint"));
    // It comes back while a request is held: that request is answered.
    let late = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(300));
        sim_on(port, "m")
    });
    let r2 = router(&args(&[
        "--static-backends",
        &format!("http://127.0.0.1:{port}"),
        "--static-models",
        "m",
        "--health-check-interval-ms",
        "100",
    ]));
    wait_until("the second router to have a snapshot", || {
        get(&r2, "/health").json()["snapshot_version"].as_u64() > Some(0)
    });
    let reply = post(
        &r2,
        "/v1/completions",
        &json!({"model": "m", "prompt": "x", "max_tokens": 2}),
        &[],
    );
    assert_eq!(reply.status, 200, "{}", reply.body);
    drop(late.join().unwrap());
}

/// One engine taking one request at a time (`max_inflight_per_endpoint: 1`, 20 ms a token),
/// one worker (one queue), and three tenants: `flood` and `quiet` of the normal class,
/// `urgent` of the high one.
fn busy_router(name: &str) -> (Proc, Proc) {
    let e = sim(name, &["--decode-base-ms", "20"]);
    let keys = keys_file(
        name,
        "tenants:\n- name: flood\n  keys:\n  - sha256: {sha256:sk-flood}\n\
         - name: quiet\n  keys:\n  - sha256: {sha256:sk-quiet}\n\
         - name: urgent\n  priority: high\n  keys:\n  - sha256: {sha256:sk-urgent}\n",
    );
    let config = workspace_root().join(format!("target/e2e-logs/{name}-config.yaml"));
    std::fs::write(&config, "upstream:\n  max_inflight_per_endpoint: 1\n").unwrap();
    let mut a = backends(&[&e]);
    a.extend(args(&[
        "--workers",
        "1",
        "--api-keys",
        keys.to_str().unwrap(),
        "--config",
        config.to_str().unwrap(),
    ]));
    let r = router(&a);
    wait_healthy(&r);
    (r, e)
}

/// Sends `n` requests of `tokens` tokens at once for `key`; returns their threads.
fn burst(r: &Proc, key: &str, n: usize, tokens: u32) -> Vec<std::thread::JoinHandle<(u16, Duration)>> {
    (0..n)
        .map(|_| {
            let (url, key) = (r.url(), key.to_owned());
            std::thread::spawn(move || {
                let started = Instant::now();
                let status = agent()
                    .post(format!("{url}/v1/completions"))
                    .header("authorization", &format!("Bearer {key}"))
                    .send(format!(r#"{{"model":"sim-model","prompt":"x","max_tokens":{tokens}}}"#))
                    .map_or(0, |r| r.status().as_u16());
                (status, started.elapsed())
            })
        })
        .collect()
}

fn queued(r: &Proc) -> f64 {
    metric(
        &get(r, "/metrics").body,
        "lmstack_requests_queued",
        &[("model", "sim-model")],
    )
    .unwrap_or(0.0)
}

#[test]
fn a_quiet_tenant_goes_before_a_flooding_one_and_a_higher_class_before_both() {
    let (r, _e) = busy_router("admission-fair");
    // The flood: 12 requests of 10 tokens (about 200 ms each, one at a time: 2.4 s).
    let flood = burst(&r, "sk-flood", 12, 10);
    wait_until("the flood to queue", || queued(&r) >= 8.0);
    // A quiet tenant's request waits for the one in flight, not for the flood's queue.
    let quiet = burst(&r, "sk-quiet", 1, 10).pop().unwrap().join().unwrap();
    assert_eq!(quiet.0, 200);
    assert!(
        quiet.1 < Duration::from_millis(1000),
        "the quiet tenant waited {:?}",
        quiet.1
    );
    // A higher class goes first even when its tenant used more lately.
    let urgent_first = burst(&r, "sk-urgent", 3, 10);
    wait_until("the urgent requests to be admitted", || {
        let m = get(&r, "/metrics").body;
        metric(
            &m,
            "lmstack_tenant_requests_total",
            &[("tenant", "urgent"), ("outcome", "admitted")],
        ) == Some(3.0)
    });
    let quiet_again = burst(&r, "sk-quiet", 1, 10);
    let urgent: Vec<_> = urgent_first.into_iter().map(|t| t.join().unwrap()).collect();
    let quiet_again = quiet_again.into_iter().map(|t| t.join().unwrap()).next().unwrap();
    assert!(urgent.iter().all(|(s, _)| *s == 200));
    let last_urgent = urgent.iter().map(|(_, d)| *d).max().unwrap();
    assert!(
        last_urgent < quiet_again.1 + Duration::from_millis(100),
        "the high class finished after the normal one: {last_urgent:?} vs {:?}",
        quiet_again.1
    );
    let flood: Vec<_> = flood.into_iter().map(|t| t.join().unwrap()).collect();
    assert!(flood.iter().all(|(s, _)| *s == 200), "{flood:?}");
    // Without tenancy's order the quiet request would have waited for the whole flood.
    let slowest_flood = flood.iter().map(|(_, d)| *d).max().unwrap();
    assert!(slowest_flood > Duration::from_millis(2000), "{slowest_flood:?}");
}
