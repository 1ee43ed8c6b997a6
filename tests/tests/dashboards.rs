//! The Grafana dashboards (grafana/*.json) and the alert rules, checked, not hoped:
//! - every dashboard type-checks against Grafana's own types (`@grafana/schema`, tsc);
//! - every PromQL target parses (promql-parser);
//! - the alert rules pass `promtool check rules` and `promtool test rules`;
//! - end to end: a real Prometheus scrapes the router, lmstack-control, two simulated engines
//!   under traffic, two routers in trouble (an engine that resets, a control that sends
//!   garbage), two engines publishing KV events (followed by control and by a router of their
//!   own, with a replayed gap, a gap that drops an index, and an index bound that drops
//!   blocks) and (as root) lmstack-agent on one engine's cgroup; every target of every
//!   panel must return series, and every alert rule evaluates without error. PNGs of key
//!   queries on Prometheus' graph page, rendered by headless Chromium, are left under
//!   target/dashboards/ for a person to look at.
//!
//! Tools come from `cargo xtask test` (target/tools, apt); without them the case skips, and
//! fails under CI.

#![allow(clippy::unwrap_used, reason = "tests assert by unwrapping")]

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener};
use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

use lmstack_e2e::bed::{Prometheus, TestBed, ebpf_preconditions, find_exe, node_tools, skip};
use lmstack_e2e::{
    FakeEngine, Misbehave, Proc, agent, args, backends, bin, control, free_port, get, kv_index_blocks, metric,
    metrics_when, post, router_following, routing_mode_is, sim, tiny_kv_sim, tiny_tokenizer_dir, wait_healthy,
    wait_until, workspace_root,
};
use serde_json::{Value, json};

const NAMESPACE: &str = "lmstack-e2e";
const MODEL: &str = "sim-model";
/// The model of the engines that publish KV events (tokenized with its real tokenizer).
const KV_MODEL: &str = lmstack_e2e::TINY_MODEL;

fn dashboards() -> Vec<(String, Value)> {
    let mut out: Vec<(String, Value)> = std::fs::read_dir(workspace_root().join("grafana"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "json"))
        .map(|p| {
            let name = p.file_stem().unwrap().to_string_lossy().into_owned();
            (
                name,
                serde_json::from_str(&std::fs::read_to_string(&p).unwrap()).unwrap(),
            )
        })
        .collect();
    out.sort_by(|a, b| a.0.cmp(&b.0));
    assert!(out.len() >= 2, "dashboards in grafana/: {}", out.len());
    out
}

/// (dashboard, panel title, expression) for every target of every panel.
fn targets() -> Vec<(String, String, String)> {
    let mut out = Vec::new();
    for (name, d) in dashboards() {
        for p in d["panels"].as_array().unwrap() {
            if p["type"] == "row" {
                continue;
            }
            let targets = p["targets"].as_array().unwrap();
            assert!(!targets.is_empty(), "{name}: panel {} has no query", p["title"]);
            for t in targets {
                out.push((
                    name.clone(),
                    p["title"].as_str().unwrap().to_owned(),
                    t["expr"].as_str().unwrap().to_owned(),
                ));
            }
        }
    }
    out
}

/// Grafana's variables, as this test bed fills them in.
fn expand(expr: &str) -> String {
    expr.replace("$__rate_interval", "1m")
        .replace("$namespace", NAMESPACE)
        .replace("$model", MODEL)
}

#[test]
fn dashboards_have_the_panels_users_expect_and_template_variables() {
    let titles: Vec<String> = targets().into_iter().map(|(_, t, _)| t).collect();
    for want in [
        "Available engine instances",
        "Request latency distribution",
        "Time to first token distribution",
        "Running requests per instance",
        "Pending requests per instance",
        "KV cache usage",
        "KV cache hit rate",
        "Time between tokens",
        "Requests/s per model",
        "Errors/s per model",
        "Routing decisions",
        "Prefix match ratio",
        "Kernel TTFT",
        "Kernel time between tokens",
        "Engines by routing mode",
        "Routing mode per engine",
        "KV index blocks per engine",
    ] {
        assert!(titles.iter().any(|t| t == want), "no panel {want:?}");
    }
    for (name, d) in dashboards() {
        let vars: Vec<&str> = d["templating"]["list"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v["name"].as_str().unwrap())
            .collect();
        assert!(
            vars.contains(&"namespace") && vars.contains(&"model"),
            "{name}: {vars:?}"
        );
        // Panels do not overlap.
        let mut cells = std::collections::HashSet::new();
        for p in d["panels"].as_array().unwrap() {
            let g = &p["gridPos"];
            let (x, y, w, h) = (
                g["x"].as_u64().unwrap(),
                g["y"].as_u64().unwrap(),
                g["w"].as_u64().unwrap(),
                g["h"].as_u64().unwrap(),
            );
            assert!(x + w <= 24, "{name}: {} is wider than the grid", p["title"]);
            for cx in x..x + w {
                for cy in y..y + h {
                    assert!(cells.insert((cx, cy)), "{name}: {} overlaps another panel", p["title"]);
                }
            }
        }
    }
}

#[test]
fn every_panel_query_parses_as_promql() {
    let all = targets();
    for (name, title, expr) in &all {
        if let Err(e) = promql_parser::parser::parse(&expand(expr)) {
            panic!("{name}: {title}: {expr}: {e}");
        }
    }
    eprintln!("{} PromQL targets parse", all.len());
}

#[test]
fn dashboards_type_check_against_grafana_schema() {
    let Some(node) = node_tools() else {
        skip("typescript and @grafana/schema missing (cargo xtask test installs them)");
        return;
    };
    let dir = node.join("dashboard-check");
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    // The JSON as an object literal typed Dashboard (importing the .json would widen its types).
    for (name, d) in dashboards() {
        let ts = format!(
            "import type {{ Dashboard }} from \"@grafana/schema\";\nexport const dashboard: Dashboard = {};\n",
            serde_json::to_string_pretty(&d).unwrap()
        );
        std::fs::write(dir.join(format!("{name}.ts")), ts).unwrap();
    }
    std::fs::write(
        dir.join("tsconfig.json"),
        json!({"compilerOptions": {"strict": true, "noEmit": true, "module": "nodenext",
               "moduleResolution": "nodenext", "target": "es2022", "skipLibCheck": true},
               "include": ["*.ts"]})
        .to_string(),
    )
    .unwrap();
    let out = Command::new(node.join("node_modules/.bin/tsc"))
        .arg("-p")
        .arg(dir.join("tsconfig.json"))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "dashboards do not type-check against @grafana/schema:\n{}",
        String::from_utf8_lossy(&out.stdout)
    );
}

const ALERTS: &str = "helm/lmstack/files/alerts.yaml";

/// The alert rules in `ALERTS`, counted in its text.
fn alert_count() -> usize {
    std::fs::read_to_string(workspace_root().join(ALERTS))
        .unwrap()
        .matches("- alert: ")
        .count()
}

fn promtool() -> Option<PathBuf> {
    let p = find_exe(&["/usr/bin/promtool", "/usr/local/bin/promtool"]);
    if p.is_none() {
        skip("no promtool (apt-get install prometheus)");
    }
    p
}

#[test]
fn alert_rules_pass_promtool_check_and_unit_tests() {
    let Some(promtool) = promtool() else {
        return;
    };
    let root = workspace_root();
    let check = Command::new(&promtool)
        .args(["check", "rules"])
        .arg(root.join(ALERTS))
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&check.stdout).into_owned() + &String::from_utf8_lossy(&check.stderr);
    assert!(
        check.status.success() && text.contains(&format!("SUCCESS: {} rules found", alert_count())),
        "{text}"
    );
    let test = Command::new(&promtool)
        .args(["test", "rules", "alerts_test.yaml"])
        .current_dir(root.join("tests/promtool"))
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&test.stdout).into_owned() + &String::from_utf8_lossy(&test.stderr);
    assert!(test.status.success() && text.contains("SUCCESS"), "{text}");
}

/// Sends `n` streaming chat requests with prompts that share prefixes (so the caches hit).
fn traffic(router: &Proc, n: usize) {
    let url = format!("{}/v1/chat/completions", router.url());
    let handles: Vec<_> = (0..n)
        .map(|i| {
            let url = url.clone();
            std::thread::spawn(move || {
                let body = json!({"model": MODEL, "stream": true, "max_tokens": 12,
                    "messages": [{"role": "system", "content": format!("You are assistant {} of a long shared system prompt.", i % 4).repeat(20)},
                                 {"role": "user", "content": format!("question {i}")}]});
                let mut r = agent().post(&url).header("x-user-id", &format!("user-{}", i % 6)).send_json(&body).unwrap();
                let text = r.body_mut().read_to_string().unwrap();
                assert!(text.contains("data: [DONE]"), "{text}");
            })
        })
        .collect();
    for h in handles {
        h.join().unwrap();
    }
    // A stored response, retrieved (the Stored responses panel).
    let created = lmstack_e2e::post(
        router,
        "/v1/responses",
        &json!({"model": MODEL, "input": "remember", "max_output_tokens": 2}),
        &[],
    );
    assert_eq!(created.status, 200, "{}", created.body);
    let id = created.json()["id"].as_str().unwrap().to_owned();
    assert_eq!(get(router, &format!("/v1/responses/{id}")).status, 200);
}

/// A control that answers every snapshot stream with a line that is not JSON.
fn garbage_control() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    std::thread::spawn(move || {
        for mut conn in listener.incoming().map_while(Result::ok) {
            let mut buf = [0u8; 4096];
            let _ = conn.read(&mut buf);
            let _ = conn.write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 9\r\n\r\nnot json\n");
        }
    });
    addr
}

/// A simulated engine publishing KV events with the tiny model's tokenizer; `extra` adds flags.
fn kv_engine(name: &str, extra: &[&str]) -> Proc {
    tiny_kv_sim(name, free_port(), extra)
}

/// A completion whose prompt is a document only `seed` has, about a block per section.
fn kv_completion(seed: usize, sections: usize) -> Value {
    let prompt: String = (0..sections)
        .map(|i| {
            format!(
                "Section {i} of report {seed}: the figures for quarter {} were revised. ",
                i * seed % 7
            )
        })
        .collect();
    json!({"model": KV_MODEL, "prompt": prompt, "max_tokens": 2})
}

/// Polls an instant query until it returns at least one series.
fn series(prom: &Prometheus, query: &str, deadline: Instant) -> Result<usize, String> {
    loop {
        let reply = agent()
            .get(format!("{}/api/v1/query", prom.url))
            .query("query", query)
            .call();
        let body: Value = match reply {
            Ok(mut r) => r.body_mut().read_json().unwrap_or(Value::Null),
            Err(e) => Value::String(e.to_string()),
        };
        if body["status"] == "error" {
            return Err(format!("{query}: {body}"));
        }
        let n = body["data"]["result"].as_array().map_or(0, Vec::len);
        if n > 0 {
            return Ok(n);
        }
        if Instant::now() > deadline {
            return Err(format!("{query}: no series"));
        }
        std::thread::sleep(Duration::from_millis(500));
    }
}

#[test]
fn every_panel_returns_data_from_a_real_prometheus() {
    if Prometheus::exe().is_none() {
        skip("no prometheus (apt-get install prometheus)");
        return;
    }
    // As root, one engine runs in a cgroup + network namespace with lmstack-agent on it; else
    // the eBPF dashboard's panels cannot have data and are left out (a failure under CI).
    let bed_root = ebpf_preconditions();
    let bed = bed_root.as_ref().map(|r| TestBed::create(r));
    let engine_a = match &bed {
        Some(bed) => bed.start_sim("engine-a", &["--model", MODEL]),
        None => sim("engine-a", &["--model", MODEL]),
    };
    let engine_b = sim("engine-b", &["--model", MODEL]);
    // Exact KV routing: two engines publishing KV events, followed by control (which relays
    // their indexes to the router below) and by a router of their own that subscribes itself,
    // with an index bound small enough to drop blocks. kv-a keeps a replay socket, kv-b none.
    let replay_port = free_port().to_string();
    let kv_a = kv_engine("kv-a", &["--kv-events-replay-port", &replay_port]);
    let kv_b = kv_engine("kv-b", &[]);
    let tokenizer = format!("{KV_MODEL}={}", tiny_tokenizer_dir());
    let agent_proc = bed.as_ref().map(|bed| {
        Proc::start(
            &bin("lmstack-agent"),
            &args(&[
                "--listen",
                "127.0.0.1:0",
                "--cgroup",
                bed.cgroup.to_str().unwrap(),
                "--pod",
                "engine-a",
                "--namespace",
                NAMESPACE,
                "--model",
                MODEL,
                "--bpf-stats",
                "--poll-interval-ms",
                "200",
            ]),
            &[],
        )
    });
    let engines = format!("{},{},{},{}", engine_a.url(), engine_b.url(), kv_a.url(), kv_b.url());
    let control_proc = control(
        &args(&[
            "--source",
            "static",
            "--static-backends",
            &engines,
            "--probe-interval-ms",
            "200",
        ]),
        &[],
    );
    let router = router_following(&control_proc, &["--routing-logic", "prefix", "--tokenizer", &tokenizer]);
    wait_healthy(&router);
    let bound = workspace_root().join("target/e2e-logs/dashboards-kv-bound.yaml");
    std::fs::create_dir_all(bound.parent().unwrap()).unwrap();
    std::fs::write(&bound, "kv_events:\n  max_blocks_per_engine: 8\n").unwrap();
    let mut kv_args = backends(&[&kv_a, &kv_b]);
    kv_args.extend(args(&[
        "--routing-logic",
        "prefix",
        "--health-check-interval-ms",
        "200",
        "--tokenizer",
        &tokenizer,
        "--config",
        bound.to_str().unwrap(),
    ]));
    let kv_router = lmstack_e2e::router(&kv_args);
    // What an operator must see go wrong, made to happen: a router discovering one engine
    // itself (health probes) that resets every request (upstream errors), and a router whose
    // control sends garbage (rejected messages, disconnects).
    let resetting = FakeEngine::start(Misbehave::Reset);
    let static_router = lmstack_e2e::router(&args(&[
        "--static-backends",
        &resetting.url(),
        "--static-models",
        MODEL,
        "--health-check-interval-ms",
        "200",
    ]));
    wait_healthy(&static_router);
    let reset = lmstack_e2e::post(
        &static_router,
        "/v1/chat/completions",
        &json!({"model": MODEL, "messages": [{"role": "user", "content": "x"}]}),
        &[],
    );
    assert_eq!(reset.status, 502, "{}", reset.body);
    // Failures the Failures row shows: a router over the resetting engine and a healthy one
    // ejects the first after one failure (the request goes on to the other); a router over an
    // engine that stalls mid-stream, with no other to resume on, ends the stream with an
    // error event.
    let ejecting_router = lmstack_e2e::router(&args(&[
        "--static-backends",
        &format!("{},{}", resetting.url(), engine_b.url()),
        "--static-models",
        &format!("{MODEL},{MODEL}"),
        "--outlier-consecutive-failures",
        "1",
    ]));
    wait_healthy(&ejecting_router);
    for _ in 0..4 {
        let ok = lmstack_e2e::post(
            &ejecting_router,
            "/v1/chat/completions",
            &json!({"model": MODEL, "messages": [{"role": "user", "content": "x"}]}),
            &[],
        );
        assert_eq!(ok.status, 200, "{}", ok.body);
    }
    let stalling = FakeEngine::start(Misbehave::StallMidStream);
    let stalled_router = lmstack_e2e::router(&args(&[
        "--static-backends",
        &stalling.url(),
        "--static-models",
        MODEL,
        "--health-check-interval-ms",
        "60000",
        "--stream-idle-timeout-ms",
        "200",
    ]));
    wait_healthy(&stalled_router);
    let stalled = lmstack_e2e::post(
        &stalled_router,
        "/v1/completions",
        &json!({"model": MODEL, "prompt": "x", "stream": true}),
        &[],
    );
    assert!(stalled.body.contains("\"error\""), "{}", stalled.body);
    let tenant_router = tenants(&engine_b);
    let garbage = garbage_control();
    let lost_router = lmstack_e2e::router(&args(&[
        "--service-discovery",
        "control",
        "--control-url",
        &format!("http://{garbage}"),
    ]));

    let mut scrape = vec![
        ("router", router.addr.to_string(), false),
        ("router", static_router.addr.to_string(), false),
        ("router", lost_router.addr.to_string(), false),
        ("router", kv_router.addr.to_string(), false),
        ("router", ejecting_router.addr.to_string(), false),
        ("router", stalled_router.addr.to_string(), false),
        ("router", tenant_router.addr.to_string(), false),
        ("control", control_proc.addr.to_string(), false),
        ("engines", engine_a.addr.to_string(), false),
        ("engines", engine_b.addr.to_string(), false),
        ("engines", kv_a.addr.to_string(), false),
        ("engines", kv_b.addr.to_string(), false),
    ];
    if let Some(a) = &agent_proc {
        // The agent labels series with the engine pod's namespace: honour it (as the chart does).
        scrape.push(("agent", a.addr.to_string(), true));
    }
    let jobs: Vec<String> = scrape
        .iter()
        .map(|(job, target, honor)| {
            format!(
                "  - job_name: {job}-{target}\n    honor_labels: {honor}\n    static_configs: [{{targets: ['{target}'], labels: {{namespace: {NAMESPACE}}}}}]\n"
            )
        })
        .collect();
    let config = format!(
        "global: {{scrape_interval: 1s, evaluation_interval: 1s}}\nrule_files: ['{}']\nscrape_configs:\n{}",
        workspace_root().join(ALERTS).display(),
        jobs.concat()
    );
    let prom = Prometheus::start_with(&config).expect("prometheus");

    // Traffic in two waves (rates need two scrapes), errors of both kinds, affinity to share.
    traffic(&router, 24);
    let bad = lmstack_e2e::post(
        &router,
        "/v1/chat/completions",
        &json!({"model": MODEL, "max_tokens": 0, "messages": [{"role": "user", "content": "x"}]}),
        &[],
    );
    assert_eq!(bad.status, 400, "{}", bad.body);
    let unknown = lmstack_e2e::post(
        &router,
        "/v1/chat/completions",
        &json!({"model": "gpt-9", "messages": [{"role": "user", "content": "x"}]}),
        &[],
    );
    assert_eq!(unknown.status, 404, "{}", unknown.body);
    kv_events(&router, &kv_router, &kv_a, &kv_b);
    std::thread::sleep(Duration::from_secs(3));
    traffic(&router, 24);
    if let Some(a) = &agent_proc {
        let m = get(a, "/metrics").body;
        assert!(
            lmstack_e2e::metric_sum(&m, "lmstack_ebpf_requests_total", &[]) > 0.0,
            "the agent saw no request: {m}"
        );
    }

    let deadline = Instant::now() + Duration::from_secs(60);
    let mut missing = Vec::new();
    let mut checked = 0;
    for (name, title, expr) in targets() {
        if name.contains("ebpf") && agent_proc.is_none() {
            continue;
        }
        checked += 1;
        if let Err(e) = series(&prom, &expand(&expr), deadline) {
            missing.push(format!("{name}: {title}: {e}"));
        }
    }
    assert!(
        missing.is_empty(),
        "panel queries without data:\n{}",
        missing.join("\n")
    );
    eprintln!("{checked} panel queries returned series from Prometheus");
    // The alert rules load and evaluate against the live series.
    let rules: Value = agent()
        .get(format!("{}/api/v1/rules", prom.url))
        .call()
        .unwrap()
        .body_mut()
        .read_json()
        .unwrap();
    let list = rules["data"]["groups"][0]["rules"].as_array().unwrap();
    assert_eq!(list.len(), alert_count(), "{rules}");
    for rule in list {
        assert_ne!(rule["health"], "err", "{}: {}", rule["name"], rule["lastError"]);
    }

    pictures(&prom);
    drop((
        static_router,
        lost_router,
        kv_router,
        ejecting_router,
        stalled_router,
        tenant_router,
    ));
    drop(router);
    drop(bed);
}

/// What the Tenants row shows, made to happen: a router with API keys admits and throttles
/// a tenant, refuses requests without a key and with a wrong one, and takes a changed keys
/// file, then rejects a broken one.
fn tenants(engine: &Proc) -> Proc {
    let one = "tenants:\n- name: team-a\n  requests_per_second: 2\n  keys:\n  - sha256: {sha256:sk-a}\n";
    let keys = lmstack_e2e::keys_file("dashboards", one);
    let config = workspace_root().join("target/e2e-logs/dashboards-tenancy.yaml");
    std::fs::write(&config, "tenancy:\n  reload_interval_ms: 100\n").unwrap();
    let mut a = backends(&[engine]);
    a.extend(args(&[
        "--api-keys",
        keys.to_str().unwrap(),
        "--config",
        config.to_str().unwrap(),
    ]));
    let r = lmstack_e2e::router(&a);
    wait_healthy(&r);
    let body = json!({"model": MODEL, "prompt": "x", "max_tokens": 2});
    let statuses: Vec<u16> = (0..6)
        .map(|_| lmstack_e2e::post(&r, "/v1/completions", &body, &[("authorization", "Bearer sk-a")]).status)
        .collect();
    assert!(statuses.contains(&200) && statuses.contains(&429), "{statuses:?}");
    assert_eq!(lmstack_e2e::post(&r, "/v1/completions", &body, &[]).status, 401);
    assert_eq!(
        lmstack_e2e::post(&r, "/v1/completions", &body, &[("x-api-key", "sk-b")]).status,
        401
    );
    let reloads = |outcome: &str| {
        let m = get(&r, "/metrics").body;
        metric(&m, "lmstack_tenancy_reloads_total", &[("outcome", outcome)]) == Some(1.0)
    };
    lmstack_e2e::write_keys(&keys, &format!("{one}  - sha256: {{sha256:sk-b}}\n"));
    wait_until("the changed keys file to be applied", || reloads("applied"));
    lmstack_e2e::write_keys(&keys, "tenants: [ broken");
    wait_until("the broken keys file to be rejected", || reloads("rejected"));
    r
}

/// What the Exact KV routing panels show, made to happen on the KV engines: a few blocks
/// stored (within `kv_router`'s bound), then three batches lost on the wire at each engine
/// before four more of dozens of blocks (past the bound): kv-a's are replayed from its replay
/// socket, kv-b's index is dropped (and routed `degraded` until its cache turns over).
fn kv_events(router: &Proc, kv_router: &Proc, kv_a: &Proc, kv_b: &Proc) {
    // Both followers (kv_router itself, and control for `router`) must be subscribed before
    // anything is lost, else they have no sequence to see a gap in.
    for e in [kv_a, kv_b] {
        for r in [router, kv_router] {
            wait_until(&format!("{} routed exact", e.url()), || routing_mode_is(r, e, "exact"));
        }
    }
    for (e, seed) in [(kv_a, 1), (kv_b, 2)] {
        assert_eq!(post(e, "/v1/completions", &kv_completion(seed, 2), &[]).status, 200);
        for r in [router, kv_router] {
            wait_until("the blocks indexed", || kv_index_blocks(r, e) > 0.0);
        }
        assert_eq!(post(e, "/sim/kv_events", &json!({"skip": 3}), &[]).status, 200);
        for i in 0..4 {
            assert_eq!(
                post(e, "/v1/completions", &kv_completion(seed * 10 + i, 40), &[]).status,
                200
            );
        }
    }
    metrics_when(kv_router, "kv-a's gap replayed, kv-b's index dropped", |t| {
        let replayed = metric(
            t,
            "lmstack_kv_event_batches_replayed_total",
            &[("endpoint", &kv_a.url())],
        );
        let gap = metric(
            t,
            "lmstack_kv_index_resyncs_total",
            &[("endpoint", &kv_b.url()), ("reason", "gap")],
        );
        replayed.is_some_and(|v| v >= 3.0) && gap.is_some_and(|v| v >= 1.0)
    });
}

/// PNGs of key queries on Prometheus' graph page (headless Chromium), under target/dashboards.
fn pictures(prom: &Prometheus) {
    let Some(chromium) = find_exe(&["/usr/bin/chromium", "/usr/bin/chromium-browser"]) else {
        skip("no chromium (apt-get install chromium) for the panel pictures");
        return;
    };
    let out = workspace_root().join("target/dashboards");
    std::fs::create_dir_all(&out).unwrap();
    let queries = [
        ("ttft", format!("histogram_quantile(0.99, sum by (le) (rate(lmstack_stream_ttft_seconds_bucket{{model=\"{MODEL}\"}}[1m])))")),
        ("running-per-instance", "sum by (instance) (vllm:num_requests_running)".to_owned()),
        ("requests-per-second", "sum by (model, status) (rate(lmstack_requests_total[1m]))".to_owned()),
        ("kv-cache-hit-rate", "sum by (instance) (rate(vllm:prefix_cache_hits_total[1m])) / sum by (instance) (rate(vllm:prefix_cache_queries_total[1m]))".to_owned()),
        ("routing-modes", "sum by (model, mode) (max by (model, endpoint, mode) (lmstack_routing_mode))".to_owned()),
    ];
    for (name, q) in queries {
        let url = format!(
            "{}/graph?g0.expr={}&g0.tab=0&g0.range_input=1m",
            prom.url,
            urlencode(&q)
        );
        let png = out.join(format!("{name}.png"));
        let _ = std::fs::remove_file(&png);
        let profile = std::env::temp_dir().join(format!("lmstack-chromium-{}", std::process::id()));
        let run = Command::new(&chromium)
            .args([
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--disable-quic",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
                "--no-first-run",
                "--hide-scrollbars",
                "--window-size=1400,900",
                "--virtual-time-budget=8000",
            ])
            .arg(format!("--user-data-dir={}", profile.display()))
            .arg(format!("--screenshot={}", png.display()))
            .arg(&url)
            .output()
            .unwrap();
        let _ = std::fs::remove_dir_all(&profile);
        let size = std::fs::metadata(&png).map(|m| m.len()).unwrap_or(0);
        assert!(
            size > 10_000,
            "no picture of {name} ({size} bytes): {}",
            String::from_utf8_lossy(&run.stderr)
        );
        eprintln!("picture: {}", png.display());
    }
}

fn urlencode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => (b as char).to_string(),
            _ => format!("%{b:02X}"),
        })
        .collect()
}
