//! Where requests go under each policy, observed through real engines (simulated).

use std::collections::{HashMap, HashSet};

use lmstack_e2e::*;

fn engines(n: usize, extra: &[&str]) -> Vec<Proc> {
    (0..n).map(|i| sim(&format!("e{i}"), extra)).collect()
}

fn router_with(engines: &[Proc], policy: &str) -> Proc {
    let refs: Vec<&Proc> = engines.iter().collect();
    let r = router(&[backends(&refs), args(&["--routing-logic", policy])].concat());
    wait_until("all engines healthy", || {
        get(&r, "/health").json()["models"][0]["healthy_endpoints"] == engines.len()
    });
    r
}

fn chat(history: &[(&str, String)]) -> Value {
    let messages: Vec<Value> = history
        .iter()
        .map(|(role, c)| json!({"role": role, "content": c}))
        .collect();
    json!({"model": "sim-model", "messages": messages, "max_tokens": 4})
}

const SYSTEM: &str = "You are a careful assistant. Answer in full sentences, cite your sources, and keep \
every answer under one hundred words. Never invent facts. When unsure, say so.";

#[test]
fn prefix_routing_follows_each_conversation() {
    let e = engines(4, &[]);
    let r = router_with(&e, "prefix");
    let agent = agent();
    let mut homes: HashMap<usize, String> = HashMap::new();
    // 12 users, 3 rounds each, no session header: the growing history alone identifies them.
    let mut histories: Vec<Vec<(&str, String)>> = (0..12)
        .map(|u| {
            vec![
                ("system", SYSTEM.to_owned()),
                (
                    "user",
                    format!("I am user {u}. {}", "Here is my long document. ".repeat(20 + u)),
                ),
            ]
        })
        .collect();
    for round in 0..3 {
        for (u, history) in histories.iter_mut().enumerate() {
            let reply = post_with(&agent, &r, "/v1/chat/completions", &chat(history), &[]);
            assert_eq!(reply.status, 200, "{}", reply.body);
            let engine = reply.header("x-sim-engine").unwrap().to_owned();
            match homes.get(&u) {
                Some(home) => assert_eq!(home, &engine, "user {u} moved in round {round}"),
                None => {
                    homes.insert(u, engine);
                }
            }
            let answer = reply.json()["choices"][0]["message"]["content"]
                .as_str()
                .unwrap()
                .to_owned();
            history.push(("assistant", answer));
            history.push(("user", format!("Round {round}: and then?")));
        }
    }
    let used: HashSet<&String> = homes.values().collect();
    assert!(used.len() >= 3, "users were not spread: {homes:?}");
    // The engines served later rounds from their prefix caches.
    let hits: f64 = e
        .iter()
        .map(|x| metric(&metrics_text(x), "vllm:prefix_cache_hits_total", &[]).unwrap_or(0.0))
        .sum();
    assert!(hits > 0.0);
    let m = metrics_when(&r, "decisions counted", |m| {
        metric_sum(m, "lmstack_routing_decisions_total", &[("policy", "prefix")]) == 36.0
    });
    assert!(metric_sum(&m, "lmstack_routing_decisions_total", &[("reason", "prefix_match")]) >= 24.0);
    assert!(metric_sum(&m, "lmstack_routing_prefix_match_ratio_count", &[]) == 36.0);
    // The table's own figures are published once a second.
    metrics_when(&r, "the table's figures", |m| {
        metric(m, "lmstack_affinity_entries", &[]).is_some_and(|v| v > 0.0)
            && metric(m, "lmstack_affinity_bytes", &[]).is_some_and(|v| v > 0.0)
    });
}

#[test]
fn a_shared_system_prompt_does_not_draw_every_request_to_one_engine() {
    // Requests overlap (20 tokens, 20 ms apart): all 32 share a long system prompt that, at
    // first, one engine holds.
    let e = engines(4, &["--decode-base-ms", "20"]);
    let r = router_with(&e, "prefix");
    let long_system = SYSTEM.repeat(12);
    let first = chat(&[("system", long_system.clone()), ("user", "warm up".into())]);
    assert_eq!(post(&r, "/v1/chat/completions", &first, &[]).status, 200);
    let url = r.url();
    let clients: Vec<_> = (0..32)
        .map(|i| {
            let url = url.clone();
            let body = json!({"model": "sim-model", "max_tokens": 20, "messages": [
                {"role": "system", "content": long_system},
                {"role": "user", "content": format!("question number {i}")}
            ]});
            std::thread::spawn(move || {
                let mut r = agent()
                    .post(format!("{url}/v1/chat/completions"))
                    .send_json(&body)
                    .unwrap();
                let engine = r.headers().get("x-sim-engine").unwrap().to_str().unwrap().to_owned();
                r.body_mut().read_to_string().unwrap();
                engine
            })
        })
        .collect();
    let mut counts: HashMap<String, usize> = HashMap::new();
    for c in clients {
        *counts.entry(c.join().unwrap()).or_default() += 1;
    }
    let max = counts.values().max().copied().unwrap_or(0);
    assert!(counts.len() == 4 && max <= 16, "herded: {counts:?}");
}

#[test]
fn least_load_prefers_the_engine_that_keeps_up() {
    // e0 is ten times slower; at a steady 8 requests in flight it piles up requests.
    let slow = sim("slow", &["--decode-base-ms", "50"]);
    let fast = sim("fast", &["--decode-base-ms", "5"]);
    let r = router(&[backends(&[&slow, &fast]), args(&["--routing-logic", "least_load"])].concat());
    wait_until("both healthy", || {
        get(&r, "/health").json()["models"][0]["healthy_endpoints"] == 2
    });
    let url = r.url();
    let workers: Vec<_> = (0..8)
        .map(|_| {
            let url = url.clone();
            std::thread::spawn(move || {
                let agent = agent();
                let mut seen = Vec::new();
                for _ in 0..6 {
                    let mut r = agent
                        .post(format!("{url}/v1/completions"))
                        .send(r#"{"model":"sim-model","prompt":"x","max_tokens":8}"#)
                        .unwrap();
                    seen.push(r.headers().get("x-sim-engine").unwrap().to_str().unwrap().to_owned());
                    r.body_mut().read_to_string().unwrap();
                }
                seen
            })
        })
        .collect();
    let all: Vec<String> = workers.into_iter().flat_map(|w| w.join().unwrap()).collect();
    let to_fast = all.iter().filter(|e| *e == "fast").count();
    assert!(
        to_fast * 10 >= all.len() * 7,
        "only {to_fast} of {} went to the fast engine",
        all.len()
    );
    let m = metrics_when(&r, "decisions counted", |m| {
        metric_sum(m, "lmstack_routing_decisions_total", &[("reason", "least_load")]) == 48.0
    });
    assert!(metric_sum(&m, "lmstack_routing_decisions_total", &[("policy", "least_load")]) == 48.0);
    metrics_when(&r, "per-endpoint in-flight figures", |m| {
        metric(m, "lmstack_endpoint_inflight", &[("endpoint", &fast.url())]).is_some()
    });
}
