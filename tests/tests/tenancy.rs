//! Tenancy through the real router: API keys from a file (401, 403, `/v1/models` per key,
//! the official OpenAI SDK), budgets (429 with `Retry-After` and OpenAI's
//! `x-ratelimit-*`, tokens settled from the engines' usage), the file's reload, and a
//! tenant's prefix affinity kept to itself.

#![allow(clippy::unwrap_used, reason = "tests assert by unwrapping")]

use std::process::Command;
use std::time::{Duration, Instant};

use lmstack_e2e::*;
use serde_json::{Value, json};

const MODEL: &str = "sim-model";

fn tenant_router(name: &str, tenants: &str, engines: &[&Proc], extra: &[&str]) -> (Proc, std::path::PathBuf) {
    let keys = keys_file(name, tenants);
    let config = workspace_root().join(format!("target/e2e-logs/{name}-config.yaml"));
    std::fs::write(&config, "tenancy:\n  reload_interval_ms: 100\n").unwrap();
    let mut a = backends(engines);
    a.extend(args(&[
        "--api-keys",
        keys.to_str().unwrap(),
        "--config",
        config.to_str().unwrap(),
    ]));
    a.extend(args(extra));
    let r = router(&a);
    wait_healthy(&r);
    (r, keys)
}

fn complete(r: &Proc, model: &str, key: Option<&str>) -> Reply {
    let auth = key.map(|k| format!("Bearer {k}"));
    let headers: Vec<(&str, &str)> = auth.iter().map(|a| ("authorization", a.as_str())).collect();
    post(
        r,
        "/v1/completions",
        &json!({"model": model, "prompt": "hello there", "max_tokens": 3}),
        &headers,
    )
}

const SDK_SCRIPT: &str = r#"
import sys
import openai
from openai import OpenAI

url, key = sys.argv[1] + "/v1", sys.argv[2]
client = OpenAI(base_url=url, api_key=key, max_retries=0)
assert [m.id for m in client.models.list()] == ["sim-model"]
c = client.completions.create(model="sim-model", prompt="Say this is a test", max_tokens=7)
assert c.usage.completion_tokens == 7, c.usage

# A stream that did not ask for usage sees none (the router asks for it, to settle the
# budget, and keeps it to itself); one that asked sees it.
chunks = list(client.chat.completions.create(
    model="sim-model", messages=[{"role": "user", "content": "hi"}], max_tokens=5, stream=True))
assert all(ch.usage is None for ch in chunks), chunks
assert sum(1 for ch in chunks for c in ch.choices if c.delta.content) == 5, chunks
usage = [ch.usage for ch in client.chat.completions.create(
    model="sim-model", messages=[{"role": "user", "content": "hi"}], max_tokens=5, stream=True,
    stream_options={"include_usage": True}) if ch.usage is not None]
assert len(usage) == 1 and usage[0].completion_tokens == 5, usage

try:
    client.completions.create(model="other-model", prompt="x", max_tokens=1)
    raise SystemExit("expected PermissionDeniedError")
except openai.PermissionDeniedError as e:
    assert e.status_code == 403 and "other-model" in str(e), e

try:
    OpenAI(base_url=url, api_key="sk-wrong", max_retries=0).completions.create(
        model="sim-model", prompt="x", max_tokens=1)
    raise SystemExit("expected AuthenticationError")
except openai.AuthenticationError as e:
    assert e.status_code == 401, e
print("OK")
"#;

#[test]
fn keys_gate_the_router_and_the_openai_sdk_works_with_one() {
    let e1 = sim("tenancy-e1", &["--model", MODEL]);
    let e2 = sim("tenancy-e2", &["--model", "other-model"]);
    let (r, _) = tenant_router(
        "tenancy-keys",
        "tenants:\n- name: team-a\n  models: [sim-*]\n  keys:\n  - sha256: {sha256:sk-team-a}\n",
        &[&e1, &e2],
        &[],
    );
    // Without a key, with a wrong one: 401, OpenAI-shaped; probes and metrics need none.
    for key in [None, Some("sk-nope")] {
        let reply = complete(&r, MODEL, key);
        assert_eq!(reply.status, 401, "{}", reply.body);
        let body: Value = serde_json::from_str(&reply.body).unwrap();
        assert_eq!(body["error"]["code"], "invalid_api_key", "{body}");
        assert_eq!(body["error"]["type"], "authentication_error", "{body}");
    }
    assert_eq!(get(&r, "/v1/models").status, 401);
    assert_eq!(get(&r, "/health").status, 200);
    assert_eq!(get(&r, "/metrics").status, 200);
    // Anthropic's header works as well as OpenAI's.
    let reply = post(
        &r,
        "/v1/completions",
        &json!({"model": MODEL, "prompt": "x", "max_tokens": 1}),
        &[("x-api-key", "sk-team-a")],
    );
    assert_eq!(reply.status, 200, "{}", reply.body);
    // A model the key may not use: 403, even though the router serves it.
    let reply = complete(&r, "other-model", Some("sk-team-a"));
    assert_eq!(reply.status, 403, "{}", reply.body);
    assert!(reply.body.contains("model_not_allowed"), "{}", reply.body);
    // A model the key may use but nobody serves: 404 naming only the key's models.
    let reply = complete(&r, "sim-nope", Some("sk-team-a"));
    assert_eq!(reply.status, 404, "{}", reply.body);
    assert!(
        reply.body.contains(MODEL) && !reply.body.contains("other-model"),
        "{}",
        reply.body
    );

    python_says_ok(&python_with_openai(), SDK_SCRIPT, &[&r.url(), "sk-team-a"]);
    let m = get(&r, "/metrics").body;
    assert_eq!(
        metric(&m, "lmstack_auth_rejected_total", &[("reason", "missing")]),
        Some(2.0),
        "{m}"
    );
    assert_eq!(metric(&m, "lmstack_tenancy_keys", &[]), Some(1.0));
}

#[test]
fn a_flooding_tenant_is_throttled_with_openai_headers_and_the_other_is_not() {
    let e = sim("tenancy-flood", &["--model", MODEL]);
    let (r, _) = tenant_router(
        "tenancy-flood",
        "tenants:\n- name: flood\n  requests_per_second: 5\n  keys:\n  - sha256: {sha256:sk-flood}\n\
         - name: calm\n  requests_per_second: 5\n  keys:\n  - sha256: {sha256:sk-calm}\n",
        &[&e],
        &[],
    );
    let mut throttled = Vec::new();
    let mut admitted = 0;
    let started = Instant::now();
    for _ in 0..30 {
        let reply = complete(&r, MODEL, Some("sk-flood"));
        match reply.status {
            200 => admitted += 1,
            429 => throttled.push(reply),
            s => panic!("{s}: {}", reply.body),
        }
    }
    // A second's budget at once, then 5 a second.
    let most = 5.0 + 5.0 * started.elapsed().as_secs_f64() + 1.0;
    assert!(
        admitted >= 5 && f64::from(admitted) <= most,
        "admitted {admitted} of 30, at most {most}"
    );
    assert!(!throttled.is_empty());
    let first = &throttled[0];
    let retry: u64 = first.header("retry-after").unwrap().parse().unwrap();
    assert!((1..=1).contains(&retry), "retry-after {retry}");
    assert_eq!(first.header("x-ratelimit-limit-requests"), Some("5"));
    assert_eq!(first.header("x-ratelimit-remaining-requests"), Some("0"));
    assert!(first.header("x-ratelimit-reset-requests").unwrap().ends_with('s'));
    assert_eq!(first.header("x-lmstack-reason"), Some("rate_limit_requests"));
    let body: Value = serde_json::from_str(&first.body).unwrap();
    assert_eq!(body["error"]["code"], "rate_limit_exceeded", "{body}");
    // The other tenant's budget is its own.
    let calm = complete(&r, MODEL, Some("sk-calm"));
    assert_eq!(calm.status, 200, "{}", calm.body);
    assert_eq!(calm.header("x-ratelimit-remaining-requests"), Some("4"));
    // Waiting as told is enough.
    std::thread::sleep(Duration::from_secs(retry));
    assert_eq!(complete(&r, MODEL, Some("sk-flood")).status, 200);
    let m = get(&r, "/metrics").body;
    let outcome = |t: &str, o: &str| metric(&m, "lmstack_tenant_requests_total", &[("tenant", t), ("outcome", o)]);
    assert_eq!(outcome("flood", "throttled_requests"), Some(throttled.len() as f64));
    assert_eq!(outcome("calm", "throttled_requests"), Some(0.0));
}

#[test]
fn tokens_are_charged_from_the_engines_usage_streams_included() {
    let e = sim("tenancy-tokens", &["--model", MODEL]);
    let (r, _) = tenant_router(
        "tenancy-tokens",
        "tenants:\n- name: acct\n  tokens_per_minute: 1000000\n  keys:\n  - sha256: {sha256:sk-acct}\n",
        &[&e],
        &[],
    );
    let auth = [("authorization", "Bearer sk-acct")];
    let (mut prompt, mut completion) = (0.0, 0.0);
    // Plain completions and chats: the usage the client sees is the usage charged.
    for (path, body) in [
        (
            "/v1/completions",
            json!({"model": MODEL, "prompt": "one two three", "max_tokens": 9}),
        ),
        (
            "/v1/chat/completions",
            json!({"model": MODEL, "messages": [{"role": "user", "content": "four five"}], "max_tokens": 4}),
        ),
        (
            "/v1/chat/completions",
            json!({"model": MODEL, "messages": [{"role": "user", "content": "six"}], "max_tokens": 6,
                   "stream": true, "stream_options": {"include_usage": true}}),
        ),
    ] {
        let reply = post(&r, path, &body, &auth);
        assert_eq!(reply.status, 200, "{}", reply.body);
        let usage = if body["stream"] == true {
            let last = reply
                .body
                .lines()
                .filter_map(|l| l.strip_prefix("data: "))
                .filter(|d| *d != "[DONE]")
                .map(|d| serde_json::from_str::<Value>(d).unwrap())
                .find(|v| !v["usage"].is_null())
                .unwrap();
            last["usage"].clone()
        } else {
            serde_json::from_str::<Value>(&reply.body).unwrap()["usage"].clone()
        };
        prompt += usage["prompt_tokens"].as_f64().unwrap();
        completion += usage["completion_tokens"].as_f64().unwrap();
    }
    // A stream that did not ask for usage: charged all the same, without showing it.
    let body =
        json!({"model": MODEL, "messages": [{"role": "user", "content": "six"}], "max_tokens": 6, "stream": true});
    let reply = post(&r, "/v1/chat/completions", &body, &auth);
    assert!(!reply.body.contains("\"usage\":{"), "{}", reply.body);
    assert!(reply.body.ends_with("data: [DONE]\n\n"), "{}", reply.body);
    // (The same request as the one before it, which showed its usage.)
    let seen = post(
        &r,
        "/v1/chat/completions",
        &json!({"model": MODEL, "messages": [{"role": "user", "content": "six"}], "max_tokens": 6,
                "stream": true, "stream_options": {"include_usage": true}}),
        &auth,
    );
    let usage: Value = seen
        .body
        .lines()
        .filter_map(|l| l.strip_prefix("data: "))
        .filter_map(|d| serde_json::from_str::<Value>(d).ok())
        .find(|v| !v["usage"].is_null())
        .unwrap()["usage"]
        .clone();
    prompt += 2.0 * usage["prompt_tokens"].as_f64().unwrap();
    completion += 2.0 * usage["completion_tokens"].as_f64().unwrap();

    let m = get(&r, "/metrics").body;
    let charged = |kind: &str| metric(&m, "lmstack_tenant_tokens_total", &[("tenant", "acct"), ("kind", kind)]);
    assert_eq!(charged("prompt"), Some(prompt), "{m}");
    assert_eq!(charged("completion"), Some(completion), "{m}");
    assert_eq!(charged("estimated"), Some(0.0), "{m}");
    // (What the buckets were charged is checked where time can be held still: the unit
    // tests of tenancy.rs and budget.rs.)
}

#[test]
fn the_keys_file_is_reloaded_and_a_bad_one_keeps_the_keys_in_force() {
    let e = sim("tenancy-reload", &["--model", MODEL]);
    let one = "tenants:\n- name: a\n  keys:\n  - sha256: {sha256:sk-one}\n";
    let (r, keys) = tenant_router("tenancy-reload", one, &[&e], &[]);
    assert_eq!(complete(&r, MODEL, Some("sk-one")).status, 200);
    assert_eq!(complete(&r, MODEL, Some("sk-two")).status, 401);
    write_keys(
        &keys,
        "tenants:\n- name: a\n  keys:\n  - sha256: {sha256:sk-one}\n  - sha256: {sha256:sk-two}\n",
    );
    let deadline = Instant::now() + Duration::from_secs(20);
    while complete(&r, MODEL, Some("sk-two")).status != 200 {
        assert!(Instant::now() < deadline, "the new key was never taken");
        std::thread::sleep(Duration::from_millis(50));
    }
    write_keys(&keys, "tenants: [ this is not a keys file");
    wait_until("the bad file to be seen", || {
        metric(
            &get(&r, "/metrics").body,
            "lmstack_tenancy_reloads_total",
            &[("outcome", "rejected")],
        ) == Some(1.0)
    });
    assert_eq!(complete(&r, MODEL, Some("sk-one")).status, 200);
    assert_eq!(complete(&r, MODEL, Some("sk-two")).status, 200);
    // A key taken out is refused at once.
    write_keys(&keys, one);
    let deadline = Instant::now() + Duration::from_secs(20);
    while complete(&r, MODEL, Some("sk-two")).status != 401 {
        assert!(Instant::now() < deadline, "the removed key still works");
        std::thread::sleep(Duration::from_millis(50));
    }
    // A bad file at start is a clear error.
    let bad = keys_file("tenancy-bad", "tenants:\n- name: a\n  keys:\n  - sha256: nothex\n");
    let out = Command::new(bin("lmstack"))
        .args([
            "--static-backends",
            "http://127.0.0.1:1",
            "--static-models",
            MODEL,
            "--check",
        ])
        .arg("--api-keys")
        .arg(&bad)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("tenancy.keys_file") && stderr.contains("hex"),
        "{stderr}"
    );
}

#[test]
fn an_isolated_tenant_neither_hits_nor_probes_another_tenants_prefix() {
    let e = sim("tenancy-iso", &["--model", MODEL]);
    let (r, _) = tenant_router(
        "tenancy-iso",
        "cache_salt_secret: test-secret\ntenants:\n- name: open\n  keys:\n  - sha256: {sha256:sk-open}\n\
         - name: iso\n  cache_isolation: true\n  keys:\n  - sha256: {sha256:sk-iso}\n",
        &[&e],
        &["--routing-logic", "prefix", "--explain-routing"],
    );
    let prompt = "a long shared system prompt that spans several blocks of the affinity table ".repeat(8);
    let ask = |key: &str| {
        let reply = post(
            &r,
            "/v1/completions",
            &json!({"model": MODEL, "prompt": prompt, "max_tokens": 1}),
            &[("authorization", &format!("Bearer {key}"))],
        );
        assert_eq!(reply.status, 200, "{}", reply.body);
        let route = reply.header("x-lmstack-route").unwrap().to_owned();
        let matched = route
            .split("; ")
            .find_map(|p| p.strip_prefix("matched="))
            .unwrap()
            .to_owned();
        let (m, n) = matched.split_once('/').unwrap();
        (m.parse::<u32>().unwrap(), n.parse::<u32>().unwrap())
    };
    let (m, n) = ask("sk-open");
    assert_eq!(m, 0);
    assert!(n > 2, "{n} blocks");
    assert_eq!(ask("sk-open"), (n, n), "the open tenant's own prefix");
    assert_eq!(
        ask("sk-iso"),
        (0, n),
        "the isolated tenant must not see the open tenant's prefix"
    );
    assert_eq!(ask("sk-iso"), (n, n), "the isolated tenant's own prefix");
}

#[test]
fn router_replicas_share_a_tenants_budget_through_control() {
    let e = sim("tenancy-replicas", &["--model", MODEL]);
    let c = control(
        &args(&[
            "--source",
            "static",
            "--static-backends",
            &e.url(),
            "--probe-interval-ms",
            "200",
        ]),
        &[],
    );
    let keys = keys_file(
        "tenancy-replicas",
        "tenants:\n- name: shared\n  requests_per_second: 10\n  keys:\n  - sha256: {sha256:sk-shared}\n",
    );
    let config = workspace_root().join("target/e2e-logs/tenancy-replicas-config.yaml");
    std::fs::write(
        &config,
        "discovery:\n  control:\n    affinity_report_interval_ms: 100\n",
    )
    .unwrap();
    let extra = [
        "--api-keys",
        keys.to_str().unwrap(),
        "--config",
        config.to_str().unwrap(),
    ];
    let routers = [router_following(&c, &extra), router_following(&c, &extra)];
    for r in &routers {
        wait_healthy(r);
    }
    // 40 requests a second for 3 s, alternating between the replicas: each sees 20 a second.
    let started = Instant::now();
    let mut admitted = 0u32;
    for i in 0..120 {
        let at = Duration::from_millis(25 * i);
        if let Some(wait) = at.checked_sub(started.elapsed()) {
            std::thread::sleep(wait);
        }
        match complete(&routers[(i % 2) as usize], MODEL, Some("sk-shared")).status {
            200 => admitted += 1,
            429 => {}
            s => panic!("status {s}"),
        }
    }
    let seconds = started.elapsed().as_secs_f64();
    // One budget: a full bucket (10) and 10 a second, plus what the other replica admits
    // before it hears (a report interval's worth and its own full bucket): well under what
    // two unshared budgets let through (2 x (10 + 10 a second)).
    let shared_most = 10.0 + 10.0 * seconds + 10.0 + 10.0;
    let unshared = 2.0 * (10.0 + 10.0 * seconds);
    eprintln!("admitted {admitted} of 120 in {seconds:.1} s (shared at most {shared_most:.0}, unshared {unshared:.0})");
    assert!(
        f64::from(admitted) <= shared_most && f64::from(admitted) >= 5.0 * seconds,
        "admitted {admitted} in {seconds:.1} s: one shared budget allows at most {shared_most:.0} (two unshared: {unshared:.0})"
    );
}
