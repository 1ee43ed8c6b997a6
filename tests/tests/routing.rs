//! Where requests go under each policy, observed through real engines (simulated).

#![allow(clippy::unwrap_used, reason = "tests assert by unwrapping")]

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

/// A new conversation's first round: the short shared system prompt and a question of its own.
fn first_round(user: usize) -> Vec<(&'static str, String)> {
    vec![
        ("system", SYSTEM.to_owned()),
        (
            "user",
            format!(
                "I am user {user} and this is my question. {}",
                "Some context of mine. ".repeat(16)
            ),
        ),
    ]
}

#[test]
fn new_conversations_spread_over_every_engine_and_follow_ups_stay() {
    // One request at a time (light load: nothing is ever in flight elsewhere), no session
    // header: the load the policy balances is where conversations went recently.
    let e = engines(4, &[]);
    let refs: Vec<&Proc> = e.iter().collect();
    let r = router(
        &[
            backends(&refs),
            args(&["--routing-logic", "prefixaware", "--explain-routing"]),
        ]
        .concat(),
    );
    wait_until("all engines healthy", || {
        get(&r, "/health").json()["models"][0]["healthy_endpoints"] == 4
    });
    let agent = agent();
    let mut homes = Vec::new();
    let mut counts: HashMap<String, usize> = HashMap::new();
    for u in 0..40 {
        let reply = post_with(&agent, &r, "/v1/chat/completions", &chat(&first_round(u)), &[]);
        assert_eq!(reply.status, 200, "{}", reply.body);
        let engine = reply.header("x-sim-engine").unwrap().to_owned();
        let route = reply.header("x-lmstack-route").unwrap().to_owned();
        assert!(route.starts_with("policy=prefix; reason=prefix_"), "{route}");
        assert!(route.contains("; matched="), "{route}");
        *counts.entry(engine.clone()).or_default() += 1;
        homes.push(engine);
    }
    let (max, min) = (counts.values().max().unwrap(), counts.values().min().unwrap());
    assert!(counts.len() == 4 && *min >= 5, "uneven: {counts:?}");
    assert!(*max <= 2 * *min, "uneven: {counts:?}");
    // Every follow-up finds its conversation where its first round went.
    for (u, home) in homes.iter().enumerate() {
        let mut history = first_round(u);
        history.push(("assistant", "An answer.".into()));
        history.push(("user", "And then?".into()));
        let reply = post_with(&agent, &r, "/v1/chat/completions", &chat(&history), &[]);
        assert_eq!(reply.header("x-sim-engine"), Some(home.as_str()), "user {u} moved");
        let route = reply.header("x-lmstack-route").unwrap();
        assert!(route.contains("reason=prefix_match"), "{route}");
        assert!(
            route.ends_with(&format!("endpoint={}", e[home[1..].parse::<usize>().unwrap()].url())),
            "{route}"
        );
    }
}

#[test]
fn a_session_keeps_its_engine_when_its_prompt_changes() {
    let e = engines(3, &[]);
    let r = router_with(&e, "prefix");
    let agent = agent();
    let ask = |user: &str, text: &str| {
        let body = chat(&[("user", text.to_owned())]);
        post_with(&agent, &r, "/v1/chat/completions", &body, &[("x-user-id", user)])
    };
    for user in ["ana", "bo", "cy", "di", "ed", "flo"] {
        let first = ask(
            user,
            &format!("{user}: {}", "a first topic, long enough to fill blocks. ".repeat(8)),
        );
        let home = first.header("x-sim-engine").unwrap().to_owned();
        // A new topic shares no prefix with the first (nor with other users' prompts): the
        // session alone says where it lives.
        let next = ask(
            user,
            &format!(
                "{user} now: {}",
                "another topic entirely, nothing in common. ".repeat(8)
            ),
        );
        assert_eq!(next.header("x-sim-engine"), Some(home.as_str()), "{user} moved");
    }
    let m = metrics_when(&r, "decisions counted", |m| {
        metric_sum(m, "lmstack_routing_decisions_total", &[("policy", "prefix")]) == 12.0
    });
    assert_eq!(
        metric_sum(&m, "lmstack_routing_decisions_total", &[("reason", "prefix_session")]),
        6.0
    );
}

#[test]
fn coding_agents_session_headers_are_session_keys_by_default() {
    let e = engines(3, &[]);
    let r = router_with(&e, "session");
    let agent = agent();
    // The headers Claude Code, Qwen Code, OpenCode and Codex send on every request of a
    // conversation. Without a key, `session` falls back to round robin, which would move
    // every second request.
    for header in [
        "x-claude-code-session-id",
        "X-Qwen-Code-Session-Id",
        "x-session-affinity",
        "x-opencode-session",
        "session_id",
        "conversation_id",
    ] {
        let mut homes = HashSet::new();
        for conversation in 0..6 {
            let id = format!("{header}-{conversation}-0d8f4a");
            let engines: Vec<String> = (0..3)
                .map(|turn| {
                    let body = chat(&[("user", format!("turn {turn} of {id}"))]);
                    let reply = post_with(&agent, &r, "/v1/chat/completions", &body, &[(header, id.as_str())]);
                    assert_eq!(reply.status, 200, "{}", reply.body);
                    reply.header("x-sim-engine").unwrap().to_owned()
                })
                .collect();
            assert!(engines.iter().all(|e| *e == engines[0]), "{header}: {engines:?}");
            homes.insert(engines[0].clone());
        }
        assert!(homes.len() > 1, "{header}: every conversation on {homes:?}");
    }
}
