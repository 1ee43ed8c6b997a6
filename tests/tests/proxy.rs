//! The router in front of simulated engines: what an OpenAI client sees, and where
//! requests go.

#![allow(clippy::unwrap_used, reason = "tests assert by unwrapping")]

use std::collections::HashMap;

use lmstack_e2e::*;

fn completion(model: &str, stream: bool) -> Value {
    json!({"model": model, "prompt": "The capital of France is", "max_tokens": 5, "stream": stream})
}

#[test]
fn completions_and_chat_pass_through_unchanged() {
    let e1 = sim("e1", &[]);
    let r = router(&backends(&[&e1]));
    wait_healthy(&r);

    let direct = post(&e1, "/v1/completions", &completion("sim-model", false), &[]);
    let proxied = post(&r, "/v1/completions", &completion("sim-model", false), &[]);
    assert_eq!(proxied.status, 200);
    let (d, p) = (direct.json(), proxied.json());
    assert_eq!(p["object"], "text_completion");
    assert_eq!(p["usage"], d["usage"]);
    assert_eq!(p["choices"][0]["finish_reason"], "length");
    assert!(proxied.header("x-request-id").is_some_and(|id| id.starts_with("lms-")));

    let chat = post(
        &r,
        "/v1/chat/completions",
        &json!({"model": "sim-model", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3}),
        &[],
    );
    assert_eq!(chat.status, 200);
    assert_eq!(chat.json()["choices"][0]["message"]["role"], "assistant");
}

#[test]
fn streams_arrive_as_the_engine_sends_them() {
    let e1 = sim("e1", &["--decode-base-ms", "20"]);
    let r = router(&backends(&[&e1]));
    wait_healthy(&r);
    let body = json!({"model": "sim-model", "prompt": "count", "max_tokens": 10, "stream": true,
                      "stream_options": {"include_usage": true}})
    .to_string();
    let mut c = Raw::connect(&r);
    c.send(&raw_post("/v1/completions", &body, ""));
    let (status, headers) = c.read_head().unwrap();
    assert_eq!(status, 200);
    let te = headers
        .iter()
        .find(|(k, _)| k.eq_ignore_ascii_case("transfer-encoding"));
    assert_eq!(te.map(|(_, v)| v.as_str()), Some("chunked"));
    // Events arrive one by one, ~20 ms apart: the first long before the last is made.
    let start = std::time::Instant::now();
    // The first event may have come in the same read as the head.
    let mut raw = c.take_buffered();
    let mut first_event_at = raw.windows(5).any(|w| w == b"data:").then(|| start.elapsed());
    let mut buf = [0u8; 4096];
    while !raw.ends_with(b"0\r\n\r\n") {
        let n = std::io::Read::read(&mut c.stream, &mut buf).unwrap();
        if n == 0 {
            break;
        }
        raw.extend_from_slice(&buf[..n]);
        if first_event_at.is_none() && raw.windows(5).any(|w| w == b"data:") {
            first_event_at = Some(start.elapsed());
        }
    }
    let total = start.elapsed();
    let first = first_event_at.unwrap();
    assert!(
        total.as_millis() >= 150 && first < total / 2,
        "events were buffered: first after {first:?}, all after {total:?}"
    );
    let text = String::from_utf8_lossy(&raw);
    assert_eq!(text.matches("data: ").count(), 12, "10 tokens, usage, [DONE]:\n{text}");
    assert!(text.contains("\"usage\""));
    assert!(text.contains("data: [DONE]"));
}

#[test]
fn round_robin_spreads_requests_evenly() {
    let e1 = sim("e1", &[]);
    let e2 = sim("e2", &[]);
    let r = router(&[backends(&[&e1, &e2]), args(&["--routing-logic", "roundrobin"])].concat());
    wait_healthy(&r);
    let agent = agent();
    let mut counts: HashMap<String, usize> = HashMap::new();
    for _ in 0..40 {
        let reply = post_with(&agent, &r, "/v1/completions", &completion("sim-model", false), &[]);
        assert_eq!(reply.status, 200);
        *counts
            .entry(reply.header("x-sim-engine").unwrap().to_owned())
            .or_default() += 1;
    }
    // Each worker rotates on its own; together they stay close to even.
    let (a, b) = (counts["e1"], counts["e2"]);
    assert!(a.abs_diff(b) <= 4, "uneven: {counts:?}");
}

#[test]
fn sessions_stick_to_one_endpoint() {
    let engines: Vec<Proc> = (0..3).map(|i| sim(&format!("e{i}"), &[])).collect();
    let refs: Vec<&Proc> = engines.iter().collect();
    let r = router(&[backends(&refs), args(&["--routing-logic", "session"])].concat());
    wait_healthy(&r);
    let mut homes: HashMap<String, String> = HashMap::new();
    for round in 0..5 {
        for user in 0..12 {
            let user = format!("user-{user}");
            let reply = post(
                &r,
                "/v1/completions",
                &completion("sim-model", false),
                &[("x-user-id", &user)],
            );
            let engine = reply.header("x-sim-engine").unwrap().to_owned();
            match homes.get(&user) {
                Some(home) => assert_eq!(home, &engine, "{user} moved in round {round}"),
                None => {
                    homes.insert(user, engine);
                }
            }
        }
    }
    let distinct: std::collections::HashSet<&String> = homes.values().collect();
    assert!(distinct.len() >= 2, "all sessions on one endpoint: {homes:?}");

    // The body's `user` field is a session key too, when no header is given.
    let by_body = |u: &str| {
        let mut body = completion("sim-model", false);
        body["user"] = json!(u);
        post(&r, "/v1/completions", &body, &[])
            .header("x-sim-engine")
            .unwrap()
            .to_owned()
    };
    let first = by_body("body-user");
    for _ in 0..5 {
        assert_eq!(by_body("body-user"), first);
    }
}

#[test]
fn many_models_behind_one_address() {
    let llama = sim("llama-engine", &["--model", "llama", "--lora", "llama-sql"]);
    let qwen = sim("qwen-engine", &["--model", "qwen"]);
    // No --static-models: each backend's /v1/models says what it serves.
    let r = router(&backends(&[&llama, &qwen]));
    wait_healthy(&r);
    wait_until("all three models discovered", || {
        get(&r, "/v1/models").json()["data"]
            .as_array()
            .is_some_and(|d| d.len() == 3)
    });
    let models = get(&r, "/v1/models").json();
    let ids: Vec<&str> = models["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, vec!["llama", "llama-sql", "qwen"]);
    let lora = models["data"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["id"] == "llama-sql")
        .unwrap();
    assert_eq!(lora["parent"], "llama", "the engine's own model card is served");

    for (model, engine) in [
        ("llama", "llama-engine"),
        ("llama-sql", "llama-engine"),
        ("qwen", "qwen-engine"),
    ] {
        let reply = post(&r, "/v1/completions", &completion(model, false), &[]);
        assert_eq!(reply.status, 200, "{model}: {}", reply.body);
        assert_eq!(reply.header("x-sim-engine"), Some(engine));
        assert_eq!(reply.json()["model"], model);
    }
    let health = get(&r, "/health").json();
    assert_eq!(health["status"], "ok");
    assert_eq!(health["models"].as_array().unwrap().len(), 3);
}

#[test]
fn static_models_are_taken_as_given() {
    let e1 = sim("e1", &["--model", "real-name"]);
    let r = router(&[backends(&[&e1]), args(&["--static-models", "real-name"])].concat());
    wait_healthy(&r);
    let models = get(&r, "/v1/models").json();
    assert_eq!(models["data"][0]["id"], "real-name");
    assert_eq!(models["data"][0]["owned_by"], "lmstack");
}

#[test]
fn other_openai_routes_are_forwarded_by_model() {
    let e1 = sim("e1", &[]);
    let r = router(&backends(&[&e1]));
    wait_healthy(&r);
    let cases = [
        ("/v1/embeddings", json!({"model": "sim-model", "input": ["a", "b"]})),
        (
            "/v1/rerank",
            json!({"model": "sim-model", "query": "q", "documents": ["x", "y"]}),
        ),
        (
            "/rerank",
            json!({"model": "sim-model", "query": "q", "documents": ["x"]}),
        ),
        ("/v1/score", json!({"model": "sim-model", "text_1": "a", "text_2": "b"})),
        (
            "/score",
            json!({"model": "sim-model", "text_1": "a", "text_2": ["b", "c"]}),
        ),
        ("/tokenize", json!({"model": "sim-model", "prompt": "hello world"})),
        ("/detokenize", json!({"model": "sim-model", "tokens": [1, 2]})),
        (
            "/v1/responses",
            json!({"model": "sim-model", "input": "hi", "max_output_tokens": 2}),
        ),
    ];
    for (path, body) in cases {
        let direct = post(&e1, path, &body, &[]);
        let proxied = post(&r, path, &body, &[]);
        assert_eq!(proxied.status, 200, "{path}: {}", proxied.body);
        let (d, p) = (direct.json(), proxied.json());
        let keys = |v: &Value| v.as_object().unwrap().keys().cloned().collect::<Vec<_>>();
        assert_eq!(keys(&d), keys(&p), "{path}");
    }
    let emb = post(&r, "/v1/embeddings", &json!({"model": "sim-model", "input": "a"}), &[]).json();
    assert_eq!(emb["data"][0]["embedding"].as_array().unwrap().len(), 32);
}

#[test]
fn router_endpoints_report_health_version_and_metrics() {
    // Tokens 25 ms apart on precise timers: a late timer cannot put two tokens in one read,
    // which would count one gap fewer.
    let e1 = sim("e1", &["--decode-base-ms", "25", "--precise-timers"]);
    let r = router(&backends(&[&e1]));
    wait_healthy(&r);
    let version = get(&r, "/version").json();
    assert_eq!(version["name"], "lmstack");
    assert!(version["version"].as_str().is_some());

    for stream in [false, true] {
        assert_eq!(
            post(&r, "/v1/completions", &completion("sim-model", stream), &[]).status,
            200
        );
    }
    let url = e1.url();
    let labels = [("model", "sim-model"), ("endpoint", url.as_str())];
    let ok = [labels[0], labels[1], ("status", "200")];
    let m = metrics_when(&r, "both requests counted", |m| {
        metric(m, "lmstack_requests_total", &ok) == Some(2.0)
    });
    assert_eq!(metric(&m, "lmstack_request_duration_seconds_count", &labels), Some(2.0));
    assert_eq!(metric(&m, "lmstack_stream_ttft_seconds_count", &labels), Some(1.0));
    // 5 tokens: 4 gaps between them.
    assert_eq!(metric(&m, "lmstack_stream_tbt_seconds_count", &labels), Some(4.0));
    assert_eq!(metric(&m, "lmstack_stream_events_total", &labels), Some(5.0));
    assert_eq!(metric(&m, "lmstack_requests_running", &labels), Some(0.0));
    assert_eq!(metric(&m, "lmstack_requests_awaiting_first_byte", &labels), Some(0.0));
    assert_eq!(metric(&m, "lmstack_endpoint_healthy", &labels), Some(1.0));
    assert_eq!(
        metric(&m, "lmstack_routing_decisions_total", &[("policy", "round_robin")]),
        Some(2.0)
    );
    assert!(metric(&m, "lmstack_workers", &[]).is_some());
    assert!(m.contains("# HELP lmstack_requests_total"));
}

#[test]
fn request_ids_are_passed_through() {
    let e1 = sim("e1", &[]);
    let r = router(&backends(&[&e1]));
    wait_healthy(&r);
    let reply = post(
        &r,
        "/v1/completions",
        &completion("sim-model", false),
        &[("x-request-id", "my-id-42")],
    );
    assert_eq!(reply.header("x-request-id"), Some("my-id-42"));
}
