//! The Grafana dashboards (grafana/*.json) and the alert rules, checked, not hoped:
//! - every dashboard type-checks against Grafana's own types (`@grafana/schema`, tsc);
//! - every PromQL target parses (promql-parser);
//! - the alert rules pass `promtool check rules` and `promtool test rules`;
//! - end to end: a real Prometheus scrapes the router, lmstack-control, two simulated engines
//!   under traffic, two routers in trouble (an engine that resets, a control that sends
//!   garbage) and (as root) lmstack-agent on one engine's cgroup; every target of every
//!   panel must return series. PNGs of key queries on Prometheus' graph page, rendered by
//!   headless Chromium, are left under target/dashboards/ for a person to look at.
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
    FakeEngine, Misbehave, Proc, agent, args, bin, control, get, router_following, sim, wait_healthy, workspace_root,
};
use serde_json::{Value, json};

const NAMESPACE: &str = "lmstack-e2e";
const MODEL: &str = "sim-model";

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
        .arg(root.join("helm/lmstack/files/alerts.yaml"))
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&check.stdout).into_owned() + &String::from_utf8_lossy(&check.stderr);
    assert!(
        check.status.success() && text.contains("SUCCESS: 4 rules found"),
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
    let engines = format!("{},{}", engine_a.url(), engine_b.url());
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
    let router = router_following(&control_proc, &["--routing-logic", "prefix"]);
    wait_healthy(&router);
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
        ("control", control_proc.addr.to_string(), false),
        ("engines", engine_a.addr.to_string(), false),
        ("engines", engine_b.addr.to_string(), false),
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
        workspace_root().join("helm/lmstack/files/alerts.yaml").display(),
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
    assert_eq!(
        rules["data"]["groups"][0]["rules"].as_array().map(Vec::len),
        Some(4),
        "{rules}"
    );

    pictures(&prom);
    drop((static_router, lost_router));
    drop(router);
    drop(bed);
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
