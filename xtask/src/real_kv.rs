//! `cargo xtask real-kv`: exact KV routing against real vLLM engines (CPU build, the tiny
//! local model, KV events on, small caches). Opt-in, minutes.
//!
//! 1. **Agreement**: for each of `--prompts` requests (completions and chat, many sharing a
//!    document or a conversation's history), the blocks lmstack's lookup finds on each engine
//!    (`x-lmstack-route: kv_held=...`) against the blocks that engine reported storing, read
//!    independently with pyzmq/msgspec over vLLM's own `/tokenize` ids
//!    (`xtask/real_kv_agreement.py`).
//! 2. **Hit rate**: the multi-round workload through `prefix` with KV events (exact), without
//!    (approximate), through `session`, and straight to one engine with both engines' cache
//!    (the limit); per run, the engines' own `vllm:prefix_cache_hits_total / queries` and
//!    requests max/min.
//! 3. **Restart and reset**: an engine restarted (and one whose cache is reset) is seen, its
//!    index dropped, and it is routed exactly again; the times are measured.
//!
//! Results go to `perf/results/<date>-real-kv.json`.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use clap::Args;
use lmstack_e2e::{Proc, agent, metric, metric_sum};
use serde_json::{Value, json};

use crate::{root, run_cmd, start_router};

#[derive(Args)]
pub struct RealKvArgs {
    /// The script that runs real vLLM engines (default: ../shared/tools/real-vllm.sh).
    #[arg(long, env = "LMSTACK_REAL_VLLM")]
    script: Option<PathBuf>,
    /// Engine ports (two engines); a third port for the one-engine limit.
    #[arg(long, value_delimiter = ',', default_value = "8111,8112,8113")]
    ports: Vec<u16>,
    /// The engines' first KV-event port (one per engine, in order).
    #[arg(long, default_value_t = 5611)]
    kv_base_port: u16,
    /// KV cache blocks per engine (32 tokens each): small, so that engines evict.
    #[arg(long, default_value_t = 128)]
    blocks: usize,
    /// Requests of the agreement check.
    #[arg(long, default_value_t = 240)]
    prompts: usize,
    /// Users of the multi-round workload.
    #[arg(long, default_value_t = 24)]
    users: usize,
    /// Rounds per user.
    #[arg(long, default_value_t = 5)]
    rounds: usize,
    /// Runs of each policy in the hit-rate check (taking turns).
    #[arg(long, default_value_t = 1)]
    repeat: usize,
    /// Independent router replicas in the hit-rate check (no control; a user's rounds take
    /// turns between them).
    #[arg(long, default_value_t = 1)]
    routers: usize,
    /// Added to the results file's name (`perf/results/<date>-real-kv-<tag>.json`).
    #[arg(long)]
    tag: Option<String>,
    /// Only the two prefix modes in the hit-rate check.
    #[arg(long)]
    only_prefix: bool,
    /// Skip the hit-rate runs.
    #[arg(long)]
    no_hit_rate: bool,
    /// Skip the restart and reset checks.
    #[arg(long)]
    no_restart: bool,
    /// The tiny model's directory (real-vllm.sh's MODEL_DIR).
    #[arg(long, default_value = "/tmp/tiny-llama")]
    model_dir: PathBuf,
}

const MODEL: &str = "tiny-llama";
const RUN_DIR: &str = "/tmp/vllm-real/run-kv";

struct Engines {
    script: PathBuf,
}

impl Engines {
    /// Starts engines on `ports` (pinned from core `first_core`), KV events from `kv_base`.
    fn start(&self, ports: &[u16], kv_base: u16, blocks: usize, first_core: usize) -> anyhow::Result<()> {
        let mut start = Command::new(&self.script);
        start
            .env("FIRST_CORE", first_core.to_string())
            .arg("start")
            .args(ports.iter().map(u16::to_string))
            .env("RUN_DIR", RUN_DIR)
            .env("BLOCK_SIZE", "32")
            .env("KV_EVENTS", "1")
            // /reset_prefix_cache is served only in vLLM's dev mode.
            .env("VLLM_SERVER_DEV_MODE", "1")
            .env("KV_EVENTS_BASE_PORT", kv_base.to_string())
            .env("EXTRA_ARGS", format!("--num-gpu-blocks-override {blocks}"));
        run_cmd(&mut start)
    }

    /// Kills one engine's process group (as a crash would).
    fn kill(&self, port: u16) -> anyhow::Result<()> {
        let pid = std::fs::read_to_string(format!("{RUN_DIR}/engine-{port}.pid"))?;
        let pid: i32 = pid.trim().parse()?;
        // SAFETY: kill(2) on a process group this task started has no memory-safety
        // preconditions.
        unsafe {
            libc::kill(-pid, libc::SIGKILL);
        }
        std::fs::remove_file(format!("{RUN_DIR}/engine-{port}.pid"))?;
        Ok(())
    }
}

impl Drop for Engines {
    fn drop(&mut self) {
        let _ = Command::new(&self.script).arg("stop").env("RUN_DIR", RUN_DIR).status();
    }
}

fn wait(what: &str, limit: Duration, mut f: impl FnMut() -> bool) -> anyhow::Result<Duration> {
    let start = Instant::now();
    while start.elapsed() < limit {
        if f() {
            return Ok(start.elapsed());
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    bail!("timed out after {limit:?} waiting for {what}")
}

fn text(url: &str) -> String {
    agent()
        .get(url)
        .call()
        .ok()
        .and_then(|mut r| r.body_mut().read_to_string().ok())
        .unwrap_or_default()
}

/// The router follows the engine's events (exact, or degraded while its index may still
/// miss blocks: a new router joining engines that served traffic before).
fn live(router: &str, engine: &str) -> bool {
    mode_is(router, engine, "exact") || mode_is(router, engine, "degraded")
}

fn mode_is(router: &str, engine: &str, mode: &str) -> bool {
    metric(
        &text(&format!("{router}/metrics")),
        "lmstack_routing_mode",
        &[("endpoint", engine), ("mode", mode)],
    ) == Some(1.0)
}

fn router(bins: &Path, engines: &[String], extra: &[&str], model_dir: &Path) -> anyhow::Result<Proc> {
    let tokenizer = format!("{MODEL}={}", model_dir.display());
    let mut flags = vec![
        "--explain-routing",
        "--health-check-interval-ms",
        "500",
        "--tokenizer",
        &tokenizer,
    ];
    flags.extend_from_slice(extra);
    let r = start_router(bins, 0, engines, &flags);
    let url = r.url();
    wait("lmstack healthy", Duration::from_secs(60), || {
        agent()
            .get(format!("{url}/health"))
            .call()
            .is_ok_and(|r| r.status() == 200)
    })?;
    Ok(r)
}

pub fn run(args: &RealKvArgs) -> anyhow::Result<()> {
    let script = args
        .script
        .clone()
        .unwrap_or_else(|| root().join("../shared/tools/real-vllm.sh"));
    anyhow::ensure!(
        script.exists(),
        "{} is missing: this check needs the workplace's real-vllm.sh (set LMSTACK_REAL_VLLM)",
        script.display()
    );
    anyhow::ensure!(args.ports.len() == 3, "--ports takes three ports");
    // Only what runs here: the router and the load generator.
    let mut build = crate::cargo();
    build.args(["build", "--release", "-p", "lmstack", "-p", "lmstack-perf"]);
    run_cmd(&mut build)?;
    let bins = crate::target_dir().join("release");
    let engines = Engines { script };
    let (pair, limit_port) = (&args.ports[..2], args.ports[2]);
    engines.start(pair, args.kv_base_port, args.blocks, 0)?;
    let urls: Vec<String> = pair.iter().map(|p| format!("http://127.0.0.1:{p}")).collect();
    let kv_endpoints: Vec<String> = (0..2)
        .map(|i| format!("tcp://127.0.0.1:{}", args.kv_base_port + i))
        .collect();
    let mut report = json!({"engines": urls, "blocks_per_engine": args.blocks, "block_size": 32});

    // 1. Agreement.
    {
        let r = router(&bins, &urls, &["--routing-logic", "prefix"], &args.model_dir)?;
        for u in &urls {
            wait("exact routing", Duration::from_secs(30), || {
                mode_is(&r.url(), u, "exact")
            })?;
        }
        let python = PathBuf::from(std::env::var("VENV").unwrap_or_else(|_| "/tmp/vllmcpu".into())).join("bin/python");
        let out = Command::new(&python)
            .arg(root().join("xtask/real_kv_agreement.py"))
            .args([r.url(), MODEL.to_owned(), args.prompts.to_string()])
            .args(urls.iter().zip(&kv_endpoints).map(|(u, k)| format!("{u}={k}")))
            .output()
            .context("running real_kv_agreement.py")?;
        let stdout = String::from_utf8_lossy(&out.stdout);
        anyhow::ensure!(
            out.status.success(),
            "the agreement check failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let agreement: Value = serde_json::from_str(stdout.lines().last().unwrap_or("{}"))?;
        println!(
            "agreement: {}/{} engine checks over {} requests ({} completions, {} chats); {}/{} where the engine held blocks",
            agreement["agree"],
            agreement["checks"],
            agreement["requests"],
            agreement["completions"],
            agreement["chats"],
            agreement["nonzero_agree"],
            agreement["nonzero_checks"]
        );
        report["agreement"] = agreement;
        report["router_metrics_after_agreement"] = json!(kv_figures(&text(&format!("{}/metrics", r.url()))));
    }

    // 2. Hit rate, per routing mode, on fresh caches.
    if !args.no_hit_rate {
        let mut runs = Vec::new();
        let policies = [
            ("prefix (exact)", vec!["--routing-logic", "prefix"]),
            (
                "prefix (approximate)",
                vec!["--routing-logic", "prefix", "--no-kv-events"],
            ),
            ("session", vec!["--routing-logic", "session"]),
            ("round_robin", vec!["--routing-logic", "round_robin"]),
        ];
        // Repeats take turns, so that drift on the machine touches every policy alike.
        let turns = (0..args.repeat).flat_map(|_| {
            policies
                .iter()
                .filter(|(l, _)| args.only_prefix.then_some(()).is_none() || l.starts_with("prefix"))
        });
        for (label, extra) in turns {
            let (label, extra) = (*label, extra.clone());
            reset_caches(&urls)?;
            // With --routers 2: independent replicas (no control), a user's rounds taking
            // turns between them, so that each sees half of every conversation.
            let routers: Vec<Proc> = (0..args.routers)
                .map(|_| router(&bins, &urls, &extra, &args.model_dir))
                .collect::<anyhow::Result<_>>()?;
            if label == "prefix (exact)" {
                // The reset's AllBlocksCleared comes with the engines' next step: the first
                // request makes the index complete.
                for r in &routers {
                    for u in &urls {
                        wait("events followed", Duration::from_secs(30), || live(&r.url(), u))?;
                    }
                }
            }
            let entry = routers.iter().map(Proc::url).collect::<Vec<_>>().join(",");
            let mut run = multi_round(&bins, args, &entry, &urls, label)?;
            // Why the router sent requests where it did.
            let m: String = routers.iter().map(|r| text(&format!("{}/metrics", r.url()))).collect();
            let mut reasons = serde_json::Map::new();
            for line in m.lines().filter(|l| l.starts_with("lmstack_routing_decisions_total{")) {
                if let (Some(at), Some(v)) = (line.find("reason=\""), line.rsplit(' ').next()) {
                    let reason: String = line[at + 8..].chars().take_while(|c| *c != '"').collect();
                    let n: f64 = v.parse().unwrap_or(0.0);
                    let before = reasons.get(&reason).and_then(Value::as_f64).unwrap_or(0.0);
                    reasons.insert(reason, json!(before + n));
                }
            }
            run["decisions"] = Value::Object(reasons);
            println!("{label}: {} decisions {}", summary(&run), run["decisions"]);
            runs.push(run);
        }
        // The limit: one engine with both engines' cache takes every request.
        engines.start(&[limit_port], args.kv_base_port + 2, args.blocks * 2, 0)?;
        let limit_url = format!("http://127.0.0.1:{limit_port}");
        let run = multi_round(
            &bins,
            args,
            &limit_url,
            std::slice::from_ref(&limit_url),
            "one engine, both caches",
        )?;
        println!("one engine, both caches: {}", summary(&run));
        runs.push(run);
        report["hit_rate"] = json!(runs);
    }

    // 3. Restart and reset.
    if !args.no_restart {
        let r = router(&bins, &urls, &["--routing-logic", "prefix"], &args.model_dir)?;
        let ru = r.url();
        for u in &urls {
            wait("exact routing", Duration::from_secs(30), || live(&ru, u))?;
        }
        let http = agent();
        let doc = "The quarterly figures were revised after the audit. ".repeat(60);
        for u in &urls {
            http.post(format!("{u}/v1/completions"))
                .send_json(json!({"model": MODEL, "prompt": doc, "max_tokens": 2, "ignore_eos": true}))?
                .body_mut()
                .read_to_string()?;
        }
        let blocks = |u: &str| {
            metric(
                &text(&format!("{ru}/metrics")),
                "lmstack_kv_index_blocks",
                &[("endpoint", u)],
            )
            .unwrap_or(0.0)
        };
        wait("both indexed", Duration::from_secs(10), || {
            urls.iter().all(|u| blocks(u) > 0.0)
        })?;

        // Reset engine 0's cache. vLLM publishes AllBlocksCleared with its next step, so a
        // short request follows the reset.
        http.post(format!("{}/reset_prefix_cache", urls[0])).send_empty()?;
        let t = Instant::now();
        http.post(format!("{}/v1/completions", urls[0]))
            .send_json(json!({"model": MODEL, "prompt": "hi", "max_tokens": 1}))?
            .body_mut()
            .read_to_string()?;
        wait("the reset seen", Duration::from_secs(10), || blocks(&urls[0]) == 0.0)?;
        let reset = t.elapsed();
        let resets = metric(
            &text(&format!("{ru}/metrics")),
            "lmstack_kv_index_resyncs_total",
            &[("endpoint", &urls[0]), ("reason", "reset")],
        );
        println!(
            "cache reset: index empty {reset:?} after the step that followed the reset ({resets:?} drops, reason reset)"
        );

        // Kill engine 1 and start it again.
        engines.kill(pair[1])?;
        let lost = wait("the restart seen", Duration::from_secs(30), || {
            blocks(&urls[1]) == 0.0 && !mode_is(&ru, &urls[1], "exact")
        })?;
        let restarted = Instant::now();
        // Same KV port as before: real-vllm.sh numbers them by position, so start it alone with its own base.
        engines.start(&[pair[1]], args.kv_base_port + 1, args.blocks, 1)?;
        let healthy_after = restarted.elapsed();
        let healthy_at = Instant::now();
        let exact = wait("exact again", Duration::from_secs(60), || {
            mode_is(&ru, &urls[1], "exact")
        })?;
        // Nothing stale: the restarted engine is credited with nothing of the document.
        let mut h = http.post(format!("{ru}/v1/completions")).send_json(
            json!({"model": MODEL, "prompt": format!("{doc} again"), "max_tokens": 2, "ignore_eos": true}),
        )?;
        let route = h
            .headers()
            .get("x-lmstack-route")
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
            .to_owned();
        h.body_mut().read_to_string()?;
        let m = text(&format!("{ru}/metrics"));
        let resyncs = metric_sum(&m, "lmstack_kv_index_resyncs_total", &[("endpoint", &urls[1])]);
        println!(
            "restart: index dropped {lost:?} after the kill; engine healthy {healthy_after:?} after restarting; routed exactly {exact:?} after healthy ({resyncs} resyncs); next route: {route}"
        );
        let _ = healthy_at;
        report["restart"] = json!({
            "reset_seen_ms": reset.as_millis(),
            "kill_seen_ms": lost.as_millis(),
            "engine_restart_ms": healthy_after.as_millis(),
            "exact_after_healthy_ms": exact.as_millis(),
            "resyncs": resyncs,
            "route_after_restart": route,
        });
    }

    let date = Command::new("date").arg("+%Y-%m-%d").output()?;
    let path = root().join(format!(
        "perf/results/{}-real-kv{}.json",
        String::from_utf8_lossy(&date.stdout).trim(),
        args.tag.as_deref().map(|t| format!("-{t}")).unwrap_or_default()
    ));
    std::fs::write(&path, serde_json::to_string_pretty(&report)?)?;
    println!("wrote {}", path.display());
    Ok(())
}

fn kv_figures(m: &str) -> Value {
    let names = [
        "lmstack_kv_event_batches_total",
        "lmstack_kv_events_applied_total",
        "lmstack_kv_events_dropped_total",
        "lmstack_kv_index_resyncs_total",
        "lmstack_kv_index_blocks",
    ];
    Value::Object(
        names
            .iter()
            .map(|n| ((*n).to_owned(), json!(metric_sum(m, n, &[]))))
            .collect(),
    )
}

fn reset_caches(urls: &[String]) -> anyhow::Result<()> {
    for u in urls {
        agent().post(format!("{u}/reset_prefix_cache")).send_empty()?;
    }
    Ok(())
}

/// The multi-round workload through `target`, with the engines' own figures (deltas).
fn multi_round(bins: &Path, args: &RealKvArgs, target: &str, engines: &[String], label: &str) -> anyhow::Result<Value> {
    let figures = |u: &String| {
        let t = text(&format!("{u}/metrics"));
        (
            metric_sum(&t, "vllm:prefix_cache_hits_total", &[]),
            metric_sum(&t, "vllm:prefix_cache_queries_total", &[]),
            metric_sum(&t, "vllm:request_success_total", &[]),
        )
    };
    let before: Vec<_> = engines.iter().map(figures).collect();
    let out = Command::new(bins.join("lmstack-load"))
        .args([
            "multi-round",
            "--url",
            target,
            "--json",
            "--label",
            label,
            "--model",
            MODEL,
        ])
        .args([
            "--users",
            &args.users.to_string(),
            "--active",
            &args.users.min(8).to_string(),
        ])
        .args(["--rounds", &args.rounds.to_string(), "--qps", "8"])
        .args([
            "--system-tokens",
            "120",
            "--history-tokens",
            "200",
            "--question-tokens",
            "24",
        ])
        .args(["--answer-tokens", "12", "--chars-per-token", "4"])
        .stderr(std::process::Stdio::inherit())
        .output()
        .context("running lmstack-load multi-round")?;
    anyhow::ensure!(out.status.success(), "lmstack-load multi-round failed ({label})");
    let mut run: Value = serde_json::from_slice(&out.stdout)?;
    let after: Vec<_> = engines.iter().map(figures).collect();
    let (mut hits, mut queries, mut per_engine) = (0.0, 0.0, Vec::new());
    for (b, a) in before.iter().zip(&after) {
        hits += a.0 - b.0;
        queries += a.1 - b.1;
        per_engine.push(a.2 - b.2);
    }
    let max = per_engine.iter().copied().fold(0.0, f64::max);
    let min = per_engine.iter().copied().fold(f64::INFINITY, f64::min);
    run["engine_hit_rate"] = json!(if queries > 0.0 { hits / queries } else { 0.0 });
    run["requests_per_engine"] = json!(per_engine);
    run["requests_max_over_min"] = json!(if min > 0.0 { max / min } else { 0.0 });
    run["label"] = json!(label);
    Ok(run)
}

fn summary(run: &Value) -> String {
    format!(
        "engine hit rate {:.3}, requests per engine {}, max/min {:.2}, ttft p99 {} ms, errors {}",
        run["engine_hit_rate"].as_f64().unwrap_or(0.0),
        run["requests_per_engine"],
        run["requests_max_over_min"].as_f64().unwrap_or(0.0),
        run["ttft_ms"]["p99"],
        run["errors"]
    )
}

/// The figure of a `real-kv` report: per policy, the engines' hit rate (mean of its runs)
/// against the one-engine limit, and requests max/min.
pub fn figure(report: &Value) -> (String, usize, Vec<crate::perf::plot::Panel>) {
    use crate::perf::plot::{Panel, Series};
    let runs = report["hit_rate"].as_array().cloned().unwrap_or_default();
    let mut labels: Vec<String> = Vec::new();
    for r in &runs {
        let l = r["label"].as_str().unwrap_or("?").to_owned();
        if !labels.contains(&l) {
            labels.push(l);
        }
    }
    let mean = |label: &str, key: &str| {
        let v: Vec<f64> = runs
            .iter()
            .filter(|r| r["label"] == label)
            .filter_map(|r| r[key].as_f64())
            .collect();
        if v.is_empty() {
            0.0
        } else {
            v.iter().sum::<f64>() / v.len() as f64
        }
    };
    let panels = vec![
        Panel::Bars {
            title: "engine-side prefix cache hit rate (mean of runs)".into(),
            y_label: "hits / queries".into(),
            categories: labels.clone(),
            series: vec![Series::new(
                "hit rate",
                labels.iter().map(|l| mean(l, "engine_hit_rate")).collect(),
            )],
        },
        Panel::Bars {
            title: "requests per engine, max / min".into(),
            y_label: "max / min".into(),
            categories: labels.clone(),
            series: vec![Series::new(
                "max/min",
                labels.iter().map(|l| mean(l, "requests_max_over_min")).collect(),
            )],
        },
    ];
    let a = &report["agreement"];
    let title = format!(
        "exact KV routing on real vLLM: lookups agree with the engines' reports {}/{}",
        a["agree"], a["checks"]
    );
    (title, 2, panels)
}
