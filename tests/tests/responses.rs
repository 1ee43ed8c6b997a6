//! Stored Responses through lmstack: a follow-up (`previous_response_id`), a retrieval
//! (`GET /v1/responses/{id}`) or a cancellation reaches the engine holding the response,
//! with the official OpenAI SDK; without the router's map, most of them fail.

#![allow(clippy::unwrap_used, reason = "tests assert by unwrapping")]

use std::process::Command;

use lmstack_e2e::*;
use serde_json::{Value, json};

/// Conversations of follow-ups, streamed and not, each response retrieved; prints the
/// requests that named a stored response and how many of them failed.
const CHAINS: &str = r#"
import json, sys
import openai
from openai import OpenAI

client = OpenAI(base_url=sys.argv[1] + "/v1", api_key="unused", max_retries=0)
conversations, turns = int(sys.argv[2]), int(sys.argv[3])
named = failed = 0
for c in range(conversations):
    first = client.responses.create(model="sim-model", input=f"conversation {c}", max_output_tokens=3)
    assert first.id.startswith("resp_"), first
    last = first.id
    for t in range(turns):
        named += 1
        try:
            if t % 2 == 0:
                r = client.responses.create(model="sim-model", input=f"turn {t}", max_output_tokens=3,
                                            previous_response_id=last)
                rid = r.id
                assert r.previous_response_id == last, r
                assert r.output[0].content[0].text.count(" w") == 3, r
            else:
                rid, done = None, None
                for ev in client.responses.create(model="sim-model", input=f"turn {t}", max_output_tokens=3,
                                                  previous_response_id=last, stream=True):
                    if ev.type == "response.created":
                        rid = ev.response.id
                    if ev.type == "response.completed":
                        done = ev.response
                assert rid and done is not None and done.id == rid, (rid, done)
                assert done.previous_response_id == last, done
            last = rid
        except openai.NotFoundError as e:
            assert "not found" in str(e), e
            failed += 1
        named += 1
        try:
            got = client.responses.retrieve(last)
            assert got.id == last, got
        except openai.NotFoundError as e:
            failed += 1
print("RESULT " + json.dumps({"named": named, "failed": failed}))
print("OK")
"#;

/// Runs the chains through `router`: (requests naming a stored response, failed).
fn chains(router: &Proc, conversations: usize, turns: usize) -> (u64, u64) {
    let python = python_with_openai();
    let out = Command::new(&python)
        .arg("-c")
        .arg(CHAINS)
        .args([router.url(), conversations.to_string(), turns.to_string()])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && stdout.contains("OK"),
        "stdout:\n{stdout}\nstderr:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let line = stdout.lines().find_map(|l| l.strip_prefix("RESULT ")).unwrap();
    let result: Value = serde_json::from_str(line).unwrap();
    (result["named"].as_u64().unwrap(), result["failed"].as_u64().unwrap())
}

fn sims(n: usize) -> Vec<Proc> {
    (0..n).map(|i| sim(&format!("e{i}"), &[])).collect()
}

fn config_file(name: &str, text: &str) -> String {
    let path = workspace_root().join(format!("target/e2e-logs/responses-{name}.yaml"));
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    std::fs::write(&path, text).unwrap();
    path.to_str().unwrap().to_owned()
}

fn get_with(p: &Proc, path: &str, headers: &[(&str, &str)]) -> (u16, Value) {
    let mut req = agent().get(format!("{}{path}", p.url()));
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    let mut r = req.call().unwrap();
    let status = r.status().as_u16();
    let body = r.body_mut().read_to_string().unwrap();
    (status, serde_json::from_str(&body).unwrap_or(Value::Null))
}

fn create(p: &Proc, body: Value, headers: &[(&str, &str)]) -> Value {
    let reply = post(p, "/v1/responses", &body, headers);
    assert_eq!(reply.status, 200, "{}", reply.body);
    reply.json()
}

fn lookups(router: &Proc, status: &str) -> f64 {
    metric_sum(
        &metrics_text(router),
        "lmstack_responses_lookups_total",
        &[("status", status)],
    )
}

#[test]
fn follow_ups_reach_their_engine_and_fail_three_times_in_four_without_the_map() {
    let e = sims(4);
    let engines: Vec<&Proc> = e.iter().collect();
    let (conversations, turns) = (6, 6);

    let mapped = router(&backends(&engines));
    wait_healthy(&mapped);
    let (named, failed) = chains(&mapped, conversations, turns);
    println!("with the map (default policy): {failed} of {named} requests naming a stored response failed");
    assert_eq!(named, (conversations * turns * 2) as u64);
    assert_eq!(failed, 0);
    // Every one was routed from the map: learned from the answers (JSON and streams).
    let text = metrics_when(&mapped, "the lookups to show", |t| {
        metric_sum(t, "lmstack_responses_lookups_total", &[("status", "hit")]) >= named as f64
    });
    assert_eq!(
        metric_sum(&text, "lmstack_responses_lookups_total", &[("status", "asked")]),
        0.0
    );

    let off = config_file("off", "routing:\n  responses:\n    enabled: false\n");
    let mut a = backends(&engines);
    a.extend(args(&["--routing-logic", "round_robin", "--config", &off]));
    let unmapped = router(&a);
    wait_healthy(&unmapped);
    let (named_off, failed_off) = chains(&unmapped, conversations, turns);
    let share = failed_off as f64 / named_off as f64;
    println!(
        "without the map (round_robin): {failed_off} of {named_off} failed ({:.0}%)",
        share * 100.0
    );
    assert!(
        share > 0.4,
        "without the map most follow-ups should land elsewhere: {share}"
    );
}

#[test]
fn a_restarted_router_finds_a_response_by_asking_the_pool() {
    let e = sims(4);
    let engines: Vec<&Proc> = e.iter().collect();
    let first = router(&backends(&engines));
    wait_healthy(&first);
    let answer = create(
        &first,
        json!({"model": "sim-model", "input": "remember me", "max_output_tokens": 2}),
        &[],
    );
    let id = answer["id"].as_str().unwrap().to_owned();
    drop(first);

    let r = router(&[backends(&engines), args(&["--explain-routing"])].concat());
    wait_healthy(&r);
    let (status, got) = get_with(&r, &format!("/v1/responses/{id}"), &[]);
    assert_eq!(status, 200, "{got}");
    assert_eq!(got["id"], id.as_str());
    assert_eq!(lookups(&r, "asked"), 1.0);
    // Learned by asking: the next request is a hit.
    let reply = post(
        &r,
        "/v1/responses",
        &json!({"model": "sim-model", "input": "and then", "max_output_tokens": 2, "previous_response_id": id}),
        &[],
    );
    assert_eq!(reply.status, 200, "{}", reply.body);
    assert_eq!(reply.json()["previous_response_id"], id.as_str());
    // The route header says why the policy had no choice.
    let route = reply.header("x-lmstack-route").unwrap();
    assert!(route.contains("; pinned=stored_response;"), "{route}");
    let text = metrics_when(&r, "the hit to show", |t| {
        metric_sum(t, "lmstack_responses_lookups_total", &[("status", "hit")]) == 1.0
    });
    assert_eq!(
        metric_sum(&text, "lmstack_responses_lookups_total", &[("status", "asked")]),
        1.0
    );

    // No engine holds it: the client's 404, OpenAI-shaped.
    let (status, body) = get_with(&r, "/v1/responses/resp_nowhere", &[]);
    assert_eq!(status, 404, "{body}");
    assert_eq!(body["error"]["code"], "response_not_found");
    assert_eq!(body["error"]["param"], "response_id");
    assert_eq!(body["error"]["message"], "Response with id 'resp_nowhere' not found.");
    let follow = post(
        &r,
        "/v1/responses",
        &json!({"model": "sim-model", "input": "x", "previous_response_id": "resp_nowhere"}),
        &[],
    );
    assert_eq!(follow.status, 404, "{}", follow.body);

    // Cancelling: a synchronous response is the engine's 400; a background one is cancelled
    // on its engine.
    let sync = post(&r, &format!("/v1/responses/{id}/cancel"), &json!({}), &[]);
    assert_eq!(sync.status, 400, "{}", sync.body);
    assert!(
        sync.body.contains("Cannot cancel a synchronous response"),
        "{}",
        sync.body
    );
    let queued = create(
        &r,
        json!({"model": "sim-model", "input": "long", "max_output_tokens": 5000, "background": true}),
        &[],
    );
    assert_eq!(queued["status"], "queued");
    let bid = queued["id"].as_str().unwrap();
    let cancelled = post(&r, &format!("/v1/responses/{bid}/cancel"), &json!({}), &[]);
    assert_eq!(cancelled.status, 200, "{}", cancelled.body);
    assert_eq!(cancelled.json()["status"], "cancelled");
    let (status, got) = get_with(&r, &format!("/v1/responses/{bid}"), &[]);
    assert_eq!((status, &got["status"]), (200, &json!("cancelled")));
}

#[test]
fn stored_responses_need_a_key_when_keys_are_on() {
    let e = sims(2);
    let engines: Vec<&Proc> = e.iter().collect();
    let keys = keys_file(
        "responses-keys",
        "tenants:\n- name: a\n  keys:\n  - sha256: {sha256:sk-a}\n- name: b\n  keys:\n  - sha256: {sha256:sk-b}\n",
    );
    let mut a = backends(&engines);
    a.extend(args(&["--api-keys", keys.to_str().unwrap()]));
    let r = router(&a);
    wait_healthy(&r);
    let answer = create(
        &r,
        json!({"model": "sim-model", "input": "mine", "max_output_tokens": 2}),
        &[("authorization", "Bearer sk-a")],
    );
    let path = format!("/v1/responses/{}", answer["id"].as_str().unwrap());
    assert_eq!(get_with(&r, &path, &[]).0, 401);
    assert_eq!(get_with(&r, &path, &[("authorization", "Bearer sk-wrong")]).0, 401);
    let cancel = post(&r, &format!("{path}/cancel"), &json!({}), &[]);
    assert_eq!(cancel.status, 401, "{}", cancel.body);
    assert_eq!(get_with(&r, &path, &[("authorization", "Bearer sk-a")]).0, 200);
    // As in vLLM, the id is the capability: another tenant that knows it reads it.
    assert_eq!(get_with(&r, &path, &[("authorization", "Bearer sk-b")]).0, 200);
}

#[test]
fn replicas_following_one_control_share_response_ids() {
    let e = sims(4);
    let c = static_control(&e.iter().map(Proc::url).collect::<Vec<_>>(), &[]);
    let fast = config_file(
        "replicas",
        "discovery:\n  control:\n    affinity_report_interval_ms: 50\n",
    );
    let routers = [
        router_following(&c, &["--config", &fast]),
        router_following(&c, &["--config", &fast]),
    ];
    for r in &routers {
        wait_until("routers see the four engines", || {
            healthy_endpoints(r, "sim-model") == 4
        });
    }
    let mut ids = Vec::new();
    for i in 0..8 {
        let answer = create(
            &routers[0],
            json!({"model": "sim-model", "input": format!("replica {i}"), "max_output_tokens": 2}),
            &[],
        );
        ids.push(answer["id"].as_str().unwrap().to_owned());
    }
    metrics_when(&routers[1], "the other replica to learn the ids", |t| {
        metric_sum(t, "lmstack_responses_learned_total", &[("status", "shared")]) >= 8.0
    });
    for id in &ids {
        let (status, got) = get_with(&routers[1], &format!("/v1/responses/{id}"), &[]);
        assert_eq!((status, got["id"].as_str()), (200, Some(id.as_str())));
    }
    let text = metrics_when(&routers[1], "the hits to show", |t| {
        metric_sum(t, "lmstack_responses_lookups_total", &[("status", "hit")]) == 8.0
    });
    assert_eq!(
        metric_sum(&text, "lmstack_responses_lookups_total", &[("status", "asked")]),
        0.0
    );
}

#[test]
fn a_response_whose_engine_is_down_fails_clearly() {
    let mut e = sims(3);
    let engines: Vec<&Proc> = e.iter().collect();
    let mut a = backends(&engines);
    a.extend(args(&["--health-check-interval-ms", "200"]));
    let r = router(&a);
    wait_healthy(&r);
    let reply = post(
        &r,
        "/v1/responses",
        &json!({"model": "sim-model", "input": "keep it", "max_output_tokens": 2}),
        &[],
    );
    assert_eq!(reply.status, 200, "{}", reply.body);
    let id = reply.json()["id"].as_str().unwrap().to_owned();
    let holder = reply.header("x-sim-engine").unwrap().to_owned();
    // Engines are named e0, e1, ... in order.
    let at: usize = holder.trim_start_matches('e').parse().unwrap();
    drop(e.remove(at));
    wait_until("the router to see the engine down", || {
        healthy_endpoints(&r, "sim-model") == 2
    });
    // No other engine has it: a clear 503, not another engine's 404.
    let (status, body) = get_with(&r, &format!("/v1/responses/{id}"), &[]);
    assert_eq!(status, 503, "{body}");
    assert!(
        body["error"]["message"].as_str().unwrap().contains("not healthy"),
        "{body}"
    );
    let follow = post(
        &r,
        "/v1/responses",
        &json!({"model": "sim-model", "input": "x", "previous_response_id": id}),
        &[],
    );
    assert_eq!(follow.status, 503, "{}", follow.body);
    metrics_when(&r, "both to be counted", |t| {
        metric_sum(t, "lmstack_responses_lookups_total", &[("status", "unavailable")]) == 2.0
    });
}

#[test]
fn ids_pushed_out_of_a_full_map_are_found_by_asking_the_pool() {
    let e = sims(2);
    let engines: Vec<&Proc> = e.iter().collect();
    let small = config_file("small", "routing:\n  responses:\n    max_entries: 8\n");
    let mut a = backends(&engines);
    a.extend(args(&["--config", &small]));
    let r = router(&a);
    wait_healthy(&r);
    let ids: Vec<String> = (0..40)
        .map(|i| {
            let answer = create(
                &r,
                json!({"model": "sim-model", "input": format!("many {i}"), "max_output_tokens": 1}),
                &[],
            );
            answer["id"].as_str().unwrap().to_owned()
        })
        .collect();
    for id in &ids {
        let (status, got) = get_with(&r, &format!("/v1/responses/{id}"), &[]);
        assert_eq!((status, got["id"].as_str()), (200, Some(id.as_str())));
    }
    // The map holds 8 of the 40: most were asked about, none lost.
    let text = metrics_when(&r, "the lookups to show", |t| {
        metric_sum(t, "lmstack_responses_lookups_total", &[]) == 40.0
    });
    let asked = metric_sum(&text, "lmstack_responses_lookups_total", &[("status", "asked")]);
    println!("40 ids through a map of 8: {asked} asked the pool");
    assert!(asked >= 30.0, "{asked}");
}
