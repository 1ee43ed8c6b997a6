//! `cargo xtask perf --scenario routing-matrix`: the routing policies on a matrix of workloads,
//! one set of router defaults for all of them.
//!
//! Each cell is one workload (multi-round chat, shared documents, agent loops; load, users,
//! cache size, session headers, engines and router replicas varied one or two at a time
//! around two base points). In every cell, at once and on fresh engines each:
//! - `limit`: one simulated engine holding all the pool's KV cache and all its compute (its
//!   prefill lanes, running slots and decode throughput merged: `--prefill-lanes N`,
//!   `--max-num-seqs` x N, `--decode-us-per-seq` / N), so that it bounds hit rate and TTFT
//!   under heavy load as well as light;
//! - `round_robin`, `session`, `prefix` over N engines, each behind its own router (or two
//!   replicas following one lmstack-control in the replica cells).
//!
//! Measured over the window after a warm-up (a quarter of the run): TTFT p50/p99 at the
//! client, the engines' hit rate (cached over prompt tokens, from each response's usage),
//! requests per engine (max/min, idle engines), the engines' mean queue time. Prints a table,
//! writes the JSON and beside it an SVG of two heatmaps (hit rate over the limit's, TTFT p99
//! over the limit's).

use std::path::Path;
use std::thread;

use anyhow::Context;
use clap::Args;
use lmstack_e2e::{Proc, agent, metric_sum};
use serde_json::{Value, json};

use super::multiround::{f, per_engine};
use super::plot::{Goal, Panel};
use super::progress::Progress;
use super::wait_ready;

/// Tokens per KV block of the simulated engines.
const BLOCK_TOKENS: usize = 16;
/// Running sequences per engine: small, so that heavy load queues requests in the engines.
const MAX_SEQS: usize = 4;
/// Engine costs (the limit merges N of these).
const PREFILL_BASE_MS: f64 = 2.0;
const PREFILL_US_PER_TOKEN: f64 = 40.0;
const DECODE_BASE_MS: f64 = 10.0;
const DECODE_US_PER_SEQ: f64 = 300.0;
/// Requests a second per engine: light keeps about one request running per engine; heavy
/// fills about 85% of the running slots, so requests queue in the engines.
const LIGHT_QPS_PER_ENGINE: f64 = 4.0;
const HEAVY_QPS_PER_ENGINE: f64 = 17.0;

#[derive(Args)]
pub struct MatrixArgs {
    /// Cells to run, comma-separated: names (`system/heavy`), or a name's start followed by
    /// `*` (`rag*`); all when empty. `--list-cells` shows them.
    #[arg(id = "cells", long = "cells", value_delimiter = ',')]
    cells: Vec<String>,
    /// List the cells and exit.
    #[arg(id = "list-cells", long = "list-cells")]
    list_cells: bool,
    /// Router policies compared with the limit in every cell. `prefix_exact` is `prefix` on
    /// the engines' KV events (exact KV routing); with it in the list, every target's engines
    /// tokenize with the tiny model's real tokenizer (perf/fixtures/tiny-llama), so that all
    /// targets count the same tokens.
    #[arg(
        id = "matrix-policies",
        long = "matrix-policies",
        value_delimiter = ',',
        default_value = "round_robin,session,prefix"
    )]
    policies: Vec<String>,
    /// Extra router flags for every router (to try a setting on the whole matrix).
    #[arg(id = "matrix-router-args", long = "matrix-router-args", allow_hyphen_values = true)]
    router_args: Option<String>,
}

/// One workload of the matrix.
#[derive(Clone, Debug)]
struct Cell {
    name: String,
    engines: usize,
    users: usize,
    rounds: usize,
    qps: f64,
    heavy: bool,
    system_tokens: usize,
    history_tokens: usize,
    question_tokens: usize,
    answer_tokens: usize,
    docs: usize,
    doc_tokens: usize,
    doc_skew: f64,
    skew: f64,
    agent: bool,
    /// The conversations over Anthropic's `/v1/messages` (tools, `tool_use` and
    /// `tool_result` blocks), as coding agents send them.
    messages: bool,
    headers: bool,
    /// The working set over the pool's KV cache.
    cache_ratio: f64,
    replicas: bool,
}

impl Cell {
    /// Base point "system": a 2,000-character system prompt, 200-character questions (a first
    /// round is ~90% system prompt), 4 engines, 48 users, light load, session headers.
    fn system() -> Cell {
        Cell {
            name: "system".into(),
            engines: 4,
            users: 48,
            rounds: 8,
            qps: 0.0,
            heavy: false,
            system_tokens: 500,
            history_tokens: 0,
            question_tokens: 50,
            answer_tokens: 16,
            docs: 0,
            doc_tokens: 0,
            doc_skew: 0.0,
            skew: 0.0,
            agent: false,
            messages: false,
            headers: true,
            cache_ratio: 1.5,
            replicas: false,
        }
    }

    /// Base point "history": a short system prompt, each user's own 1,000-token history.
    fn history() -> Cell {
        Cell {
            name: "history".into(),
            system_tokens: 100,
            history_tokens: 1000,
            ..Cell::system()
        }
    }

    fn with(&self, suffix: &str, f: impl FnOnce(&mut Cell)) -> Cell {
        let mut c = self.clone();
        c.name = format!("{}/{suffix}", self.name);
        f(&mut c);
        c
    }

    /// Requests a second: the load level's per-engine rate.
    fn rate(&self) -> f64 {
        if self.qps > 0.0 {
            return self.qps;
        }
        let per_engine = if self.heavy {
            HEAVY_QPS_PER_ENGINE
        } else {
            LIGHT_QPS_PER_ENGINE
        };
        per_engine * self.engines as f64
    }

    /// Users at once: enough to carry the rate (a round takes ~0.25 s at most here), a
    /// quarter of the users at least.
    fn active(&self) -> usize {
        ((self.rate() * 0.5).ceil() as usize)
            .max(self.users / 4)
            .clamp(1, self.users)
    }

    fn seconds(&self) -> f64 {
        (self.users * self.rounds) as f64 / self.rate()
    }

    fn round_tokens(&self) -> usize {
        let input = if self.agent { 2500 / 4 } else { self.question_tokens };
        input + self.answer_tokens
    }

    /// The KV blocks of everything the run sends: shared prefixes once, every user's
    /// conversation at its full length.
    fn working_set_blocks(&self) -> usize {
        let shared = self.system_tokens + self.docs * self.doc_tokens;
        let per_user = self.history_tokens + self.rounds * self.round_tokens();
        (shared + self.users * per_user).div_ceil(BLOCK_TOKENS)
    }

    /// KV blocks per engine: the pool's share of the working set, and room for a few of the
    /// longest requests at least.
    fn blocks_per_engine(&self) -> usize {
        let pool = (self.working_set_blocks() as f64 / self.cache_ratio) as usize;
        let longest =
            (self.system_tokens + self.doc_tokens + self.history_tokens + self.rounds * (self.round_tokens() + 400))
                .div_ceil(BLOCK_TOKENS);
        (pool / self.engines).max(MAX_SEQS * longest)
    }

    fn load_args(&self) -> Vec<String> {
        let mut a = lmstack_e2e::args(&["--users", &self.users.to_string()]);
        for (k, v) in [
            ("--active", self.active().to_string()),
            ("--rounds", self.rounds.to_string()),
            ("--qps", format!("{:.2}", self.rate())),
            ("--system-tokens", self.system_tokens.to_string()),
            ("--history-tokens", self.history_tokens.to_string()),
            ("--question-tokens", self.question_tokens.to_string()),
            ("--answer-tokens", self.answer_tokens.to_string()),
            ("--docs", self.docs.to_string()),
            ("--doc-tokens", self.doc_tokens.to_string()),
            ("--doc-skew", self.doc_skew.to_string()),
            ("--skew", self.skew.to_string()),
            ("--warmup-s", format!("{:.2}", self.seconds() / 4.0)),
        ] {
            a.push(k.into());
            a.push(v);
        }
        if self.agent {
            a.extend(lmstack_e2e::args(&["--agent", "--pause-ms", "200"]));
        }
        if !self.headers {
            a.push("--no-session-header".into());
        }
        if self.messages {
            a.extend(lmstack_e2e::args(&["--api", "messages"]));
        }
        a
    }

    fn settings(&self) -> Value {
        json!({
            "engines": self.engines, "users": self.users, "active": self.active(),
            "rounds": self.rounds, "qps": self.rate(), "heavy": self.heavy,
            "system_tokens": self.system_tokens, "history_tokens": self.history_tokens,
            "question_tokens": self.question_tokens, "answer_tokens": self.answer_tokens,
            "docs": self.docs, "doc_tokens": self.doc_tokens, "doc_skew": self.doc_skew,
            "user_skew": self.skew, "agent": self.agent, "messages_api": self.messages,
            "session_headers": self.headers,
            "working_set_blocks": self.working_set_blocks(), "cache_ratio": self.cache_ratio,
            "blocks_per_engine": self.blocks_per_engine(), "replicas": if self.replicas { 2 } else { 1 },
        })
    }
}

/// The matrix: each cell varies one or two factors from a base point.
fn cells() -> Vec<Cell> {
    let s = Cell::system();
    let h = Cell::history();
    let rag = s.with("rag", |c| {
        c.name = "rag".into();
        c.docs = 16;
        c.doc_tokens = 1000;
        c.doc_skew = 1.0;
        c.headers = false;
    });
    let agent = h.with("agent", |c| {
        c.name = "agent".into();
        c.history_tokens = 200;
        c.agent = true;
        c.rounds = 6;
        c.cache_ratio = 1.5;
    });
    let zipf = s.with("zipf-users", |c| c.skew = 1.0);
    vec![
        s.clone(),
        s.with("no-headers", |c| c.headers = false),
        s.with("heavy", |c| {
            c.heavy = true;
            c.users = 128;
        }),
        s.with("heavy-no-headers", |c| {
            c.heavy = true;
            c.users = 128;
            c.headers = false;
        }),
        s.with("16-users", |c| {
            c.users = 16;
            c.rounds = 16;
        }),
        s.with("256-users", |c| {
            c.users = 256;
            c.rounds = 4;
            c.qps = 32.0;
        }),
        s.with("cache-3x", |c| c.cache_ratio = 3.0),
        s.with("2-engines", |c| c.engines = 2),
        s.with("8-engines", |c| {
            c.engines = 8;
            c.users = 96;
        }),
        s.with("replicas", |c| c.replicas = true),
        s.with("replicas-no-headers", |c| {
            c.replicas = true;
            c.headers = false;
        }),
        s.with("heavy-cache-3x", |c| {
            c.heavy = true;
            c.users = 128;
            c.cache_ratio = 3.0;
        }),
        h.clone(),
        h.with("no-headers", |c| c.headers = false),
        h.with("heavy", |c| {
            c.heavy = true;
            c.users = 128;
        }),
        h.with("cache-3x", |c| c.cache_ratio = 3.0),
        h.with("8-engines", |c| {
            c.engines = 8;
            c.users = 96;
        }),
        h.with("2-engines", |c| c.engines = 2),
        h.with("256-users", |c| {
            c.users = 256;
            c.rounds = 4;
            c.qps = 32.0;
        }),
        rag.clone(),
        rag.with("headers", |c| c.headers = true),
        rag.with("heavy", |c| {
            c.heavy = true;
            c.users = 128;
        }),
        zipf.clone(),
        zipf.with("no-headers", |c| c.headers = false),
        agent.clone(),
        agent.with("no-headers", |c| c.headers = false),
        agent.with("heavy", |c| {
            c.heavy = true;
            c.users = 96;
        }),
        // A coding agent over Anthropic's Messages: no session header (the agent's own is
        // the session cell's business), so the prefix of the rendered conversation (system,
        // tools, turns) must hold it on one engine.
        agent.with("messages", |c| {
            c.messages = true;
            c.headers = false;
        }),
        agent.with("messages-heavy", |c| {
            c.messages = true;
            c.headers = false;
            c.heavy = true;
            c.users = 96;
        }),
        h.with("replicas-no-headers", |c| {
            c.replicas = true;
            c.headers = false;
        }),
    ]
}

/// Runs the chosen cells; `None` when only listing them.
pub fn run(bins: &Path, work: &Path, args: &MatrixArgs) -> anyhow::Result<Option<Value>> {
    let all = cells();
    let chosen: Vec<Cell> = all
        .into_iter()
        .filter(|c| args.cells.is_empty() || args.cells.iter().any(|w| matches_cell(&c.name, w)))
        .collect();
    if args.list_cells {
        for c in &chosen {
            println!("{:<28} {}", c.name, c.settings());
        }
        return Ok(None);
    }
    anyhow::ensure!(!chosen.is_empty(), "no cell matches --cells {:?}", args.cells);
    let router_extra: Vec<String> = args
        .router_args
        .as_deref()
        .map(|s| s.split_whitespace().map(str::to_owned).collect())
        .unwrap_or_default();
    let progress = Progress::new("routing-matrix", chosen.len() as u64);
    let mut results = serde_json::Map::new();
    for cell in &chosen {
        progress.step(format!(
            "{} ({} engines, {:.0} req/s, ~{:.0} s)",
            cell.name,
            cell.engines,
            cell.rate(),
            cell.seconds()
        ));
        let targets =
            run_cell(bins, work, cell, &args.policies, &router_extra).with_context(|| format!("cell {}", cell.name))?;
        let checks = checks(cell, &targets);
        progress.suspend(|| print_cell(cell, &targets, &checks));
        results.insert(
            cell.name.clone(),
            json!({"settings": cell.settings(), "targets": targets, "checks": checks}),
        );
    }
    progress.finish();
    let results = Value::Object(results);
    print_summary(&results);
    Ok(Some(json!({
        "engine": {
            "block_tokens": BLOCK_TOKENS, "max_num_seqs": MAX_SEQS,
            "prefill_base_ms": PREFILL_BASE_MS, "prefill_us_per_token": PREFILL_US_PER_TOKEN,
            "decode_base_ms": DECODE_BASE_MS, "decode_us_per_seq": DECODE_US_PER_SEQ,
            "light_qps_per_engine": LIGHT_QPS_PER_ENGINE, "heavy_qps_per_engine": HEAVY_QPS_PER_ENGINE,
        },
        "router_args": router_extra,
        "cells": results,
    })))
}

/// Runs the limit and every policy of one cell at once, each on its own engines.
fn run_cell(
    bins: &Path,
    work: &Path,
    cell: &Cell,
    policies: &[String],
    router_extra: &[String],
) -> anyhow::Result<Value> {
    let mut names = vec!["limit".to_owned()];
    names.extend(policies.iter().cloned());
    let real_tokenizer = policies.iter().any(|p| p == EXACT);
    let outcomes: Vec<anyhow::Result<Value>> = thread::scope(|s| {
        let handles: Vec<_> = names
            .iter()
            .map(|name| s.spawn(move || run_target(bins, work, cell, name, router_extra, real_tokenizer)))
            .collect();
        handles
            .into_iter()
            .map(|h| {
                h.join()
                    .unwrap_or_else(|_| Err(anyhow::anyhow!("target thread panicked")))
            })
            .collect()
    });
    let mut targets = serde_json::Map::new();
    for (name, outcome) in names.into_iter().zip(outcomes) {
        targets.insert(name.clone(), outcome.with_context(|| format!("target {name}"))?);
    }
    Ok(Value::Object(targets))
}

/// The pseudo-policy `prefix` with the engines' KV events.
const EXACT: &str = "prefix_exact";

fn engine_args(cell: &Cell, merged: usize, name: &str, extra: &[String]) -> Vec<String> {
    let n = merged as f64;
    let mut a = lmstack_e2e::args(&["--host", "127.0.0.1", "--port", "0", "--name", name]);
    a.extend(extra.iter().cloned());
    for (k, v) in [
        ("--block-size", BLOCK_TOKENS.to_string()),
        ("--num-gpu-blocks", (cell.blocks_per_engine() * merged).to_string()),
        ("--max-num-seqs", (MAX_SEQS * merged).to_string()),
        ("--prefill-lanes", merged.to_string()),
        ("--prefill-base-ms", PREFILL_BASE_MS.to_string()),
        ("--prefill-us-per-token", PREFILL_US_PER_TOKEN.to_string()),
        ("--decode-base-ms", DECODE_BASE_MS.to_string()),
        ("--decode-us-per-seq", (DECODE_US_PER_SEQ / n).to_string()),
    ] {
        a.push(k.into());
        a.push(v);
    }
    a
}

/// One target of a cell: fresh engines (one merged engine for the limit), its router(s), the
/// workload, then the figures.
fn run_target(
    bins: &Path,
    work: &Path,
    cell: &Cell,
    name: &str,
    router_extra: &[String],
    real_tokenizer: bool,
) -> anyhow::Result<Value> {
    let sim = bins.join("lmstack-sim");
    let exact = name == EXACT;
    let engine_extra = |_: usize| -> anyhow::Result<Vec<String>> {
        let mut a = Vec::new();
        if real_tokenizer {
            a.extend(["--tokenizer".to_owned(), lmstack_e2e::tiny_tokenizer_dir()]);
        }
        if exact {
            a.extend(["--kv-events-port".to_owned(), lmstack_e2e::free_port().to_string()]);
        }
        Ok(a)
    };
    let sims: Vec<Proc> = if name == "limit" {
        vec![Proc::start(
            &sim,
            &engine_args(cell, cell.engines, "limit", &engine_extra(0)?),
            &[],
        )]
    } else {
        (0..cell.engines)
            .map(|i| {
                Ok(Proc::start(
                    &sim,
                    &engine_args(cell, 1, &format!("e{i}"), &engine_extra(i)?),
                    &[],
                ))
            })
            .collect::<anyhow::Result<_>>()?
    };
    let urls: Vec<String> = sims.iter().map(Proc::url).collect();
    let mut control = None;
    let mut routers = Vec::new();
    if name != "limit" {
        let mut flags = lmstack_e2e::args(&[
            "--host",
            "127.0.0.1",
            "--port",
            "0",
            "--routing-logic",
            if exact { "prefix" } else { name },
            "--log-level",
            "warn",
            "--workers",
            "1",
        ]);
        flags.extend(router_extra.iter().cloned());
        if exact {
            flags.extend([
                "--tokenizer".to_owned(),
                format!("sim-model={}", lmstack_e2e::tiny_tokenizer_dir()),
            ]);
        } else {
            flags.push("--no-kv-events".to_owned());
        }
        if cell.replicas {
            let c = super::replicas::start_control(bins, &urls, 200)?;
            flags.extend(lmstack_e2e::args(&[
                "--service-discovery",
                "control",
                "--control-url",
                &c.url(),
            ]));
            control = Some(c);
            for _ in 0..2 {
                routers.push(Proc::start(&bins.join("lmstack"), &flags, &[]));
            }
        } else {
            flags.extend(lmstack_e2e::args(&["--static-backends", &urls.join(",")]));
            routers.push(Proc::start(&bins.join("lmstack"), &flags, &[]));
        }
        for r in &routers {
            wait_ready(&r.url())?;
        }
    }
    let entry: Vec<String> = if routers.is_empty() {
        urls.clone()
    } else {
        routers.iter().map(Proc::url).collect()
    };
    // Wait until the router(s) route to every engine (exactly, for prefix_exact: subscribed
    // before the traffic, as a router is before its engines get any).
    for r in &routers {
        lmstack_e2e::wait_until("the router sees every engine", || {
            lmstack_e2e::healthy_endpoints(r, "sim-model") == cell.engines as u64
        });
        if exact {
            lmstack_e2e::wait_until("the router follows every engine's KV events", || {
                let text = lmstack_e2e::metrics_text(r);
                urls.iter().all(|u| {
                    lmstack_e2e::metric(&text, "lmstack_routing_mode", &[("endpoint", u), ("mode", "exact")])
                        == Some(1.0)
                })
            });
        }
    }
    let safe = cell.name.replace('/', "_");
    let out = std::process::Command::new(bins.join("lmstack-load"))
        .args(["multi-round", "--url", &entry.join(","), "--json", "--label", name])
        .args(cell.load_args())
        .stderr(std::fs::File::create(work.join(format!("matrix-{safe}-{name}.log")))?)
        .output()
        .context("running lmstack-load multi-round")?;
    anyhow::ensure!(
        out.status.success(),
        "lmstack-load failed (see target/perf/matrix-{safe}-{name}.log)"
    );
    let mut run: Value = serde_json::from_slice(&out.stdout)?;
    // Requests per engine in the measured window, idle engines included.
    let per: Vec<f64> = if name == "limit" {
        vec![f(&run, "measured_requests")]
    } else {
        (0..cell.engines)
            .map(|i| run["engine_requests"][format!("e{i}")].as_f64().unwrap_or(0.0))
            .collect()
    };
    let (max, min) = (
        per.iter().copied().fold(0.0, f64::max),
        per.iter().copied().fold(f64::INFINITY, f64::min),
    );
    run["requests_per_engine"] = json!(per);
    run["requests_max_over_min"] = json!(if min > 0.0 { max / min } else { f64::INFINITY });
    run["idle_engines"] = json!(per.iter().filter(|&&n| n == 0.0).count());
    let http = agent();
    let (mut queue_sum, mut queue_count) = (0.0, 0.0);
    for s in &sims {
        let text = http
            .get(format!("{}/metrics", s.url()))
            .call()?
            .body_mut()
            .read_to_string()?;
        queue_sum += metric_sum(&text, "vllm:request_queue_time_seconds_sum", &[]);
        queue_count += metric_sum(&text, "vllm:request_queue_time_seconds_count", &[]);
    }
    run["engine_queue_ms_mean"] = json!(if queue_count > 0.0 {
        queue_sum / queue_count * 1e3
    } else {
        0.0
    });
    if let Some(r) = routers.first() {
        let mut reasons = serde_json::Map::new();
        for r in &routers {
            let text = http
                .get(format!("{}/metrics", r.url()))
                .call()?
                .body_mut()
                .read_to_string()?;
            for reason in lmstack_route::Reason::ALL.map(lmstack_route::Reason::as_str) {
                let n = metric_sum(&text, "lmstack_routing_decisions_total", &[("reason", reason)]);
                if n > 0.0 {
                    let before = reasons.get(reason).and_then(Value::as_f64).unwrap_or(0.0);
                    reasons.insert(reason.into(), json!(before + n));
                }
            }
            // Exact KV routing: what the events did to the index.
            for name in [
                "lmstack_kv_event_batches_total",
                "lmstack_kv_events_applied_total",
                "lmstack_kv_events_dropped_total",
                "lmstack_kv_index_resyncs_total",
            ] {
                let n = metric_sum(&text, name, &[]);
                if n > 0.0 {
                    let key = name.trim_start_matches("lmstack_");
                    let before = reasons.get(key).and_then(Value::as_f64).unwrap_or(0.0);
                    reasons.insert(key.into(), json!(before + n));
                }
            }
        }
        let _ = r;
        run["decisions"] = Value::Object(reasons);
    }
    drop(routers);
    drop(control);
    drop(sims);
    Ok(run)
}

fn matches_cell(name: &str, wanted: &str) -> bool {
    match wanted.strip_suffix('*') {
        Some(start) => name.starts_with(start),
        None => name == wanted,
    }
}

/// The targets for `prefix` in one cell, against the limit (and session, with headers).
fn checks(cell: &Cell, targets: &Value) -> Value {
    let (p, limit) = (&targets["prefix"], &targets["limit"]);
    if p.is_null() {
        return Value::Null;
    }
    let hit = f(p, "hit_rate") / f(limit, "hit_rate");
    let p99 = f(p, "ttft_ms.p99") / f(limit, "ttft_ms.p99");
    let mut c = json!({
        "hit_over_limit": hit,
        "hit_ok": hit >= 0.95,
        "p99_over_limit": p99,
        "p99_ok": p99 <= 1.3,
        "max_over_min": f(p, "requests_max_over_min"),
        "balance_ok": f(p, "requests_max_over_min") <= 1.3,
        "no_idle": f(p, "idle_engines") == 0.0,
    });
    let e = &targets[EXACT];
    if !e.is_null() {
        c["exact_hit_over_limit"] = json!(f(e, "hit_rate") / f(limit, "hit_rate"));
        c["exact_p99_over_limit"] = json!(f(e, "ttft_ms.p99") / f(limit, "ttft_ms.p99"));
        c["exact_max_over_min"] = json!(f(e, "requests_max_over_min"));
        c["exact_hit_over_approximate"] = json!(f(e, "hit_rate") / f(p, "hit_rate"));
    }
    let s = &targets["session"];
    if cell.headers && !s.is_null() {
        c["session_hit_over_limit"] = json!(f(s, "hit_rate") / f(limit, "hit_rate"));
        c["session_p99_over_limit"] = json!(f(s, "ttft_ms.p99") / f(limit, "ttft_ms.p99"));
        c["not_worse_than_session"] =
            json!(f(p, "hit_rate") >= f(s, "hit_rate") && f(p, "ttft_ms.p99") <= f(s, "ttft_ms.p99"));
    }
    c
}

fn print_cell(cell: &Cell, targets: &Value, checks: &Value) {
    println!(
        "\n{}: {} engines x {} blocks, {} users ({} at a time) x {} rounds, {:.0} req/s{}{}",
        cell.name,
        cell.engines,
        cell.blocks_per_engine(),
        cell.users,
        cell.active(),
        cell.rounds,
        cell.rate(),
        if cell.headers { ", x-user-id" } else { "" },
        if cell.replicas { ", 2 replicas" } else { "" },
    );
    println!(
        "  {:<12} {:>6} {:>8} {:>8} {:>8} {:>9} {:>7} {:>5}  requests per engine",
        "target", "hit", "hit/lim", "TTFT p50", "TTFT p99", "p99/lim", "max/min", "queue"
    );
    let limit = &targets["limit"];
    if let Some(map) = targets.as_object() {
        for (name, r) in map {
            println!(
                "  {name:<12} {:>6.3} {:>8.3} {:>8.1} {:>8.1} {:>9.2} {:>7.2} {:>5.0}  {}",
                f(r, "hit_rate"),
                f(r, "hit_rate") / f(limit, "hit_rate"),
                f(r, "ttft_ms.p50"),
                f(r, "ttft_ms.p99"),
                f(r, "ttft_ms.p99") / f(limit, "ttft_ms.p99"),
                f(r, "requests_max_over_min"),
                f(r, "engine_queue_ms_mean"),
                per_engine(r),
            );
        }
    }
    if !checks.is_null() {
        let mark = |k: &str| match checks[k].as_bool() {
            Some(true) => "ok",
            Some(false) => "MISSED",
            None => "-",
        };
        println!(
            "  prefix: hit {} p99 {} balance {} no idle {} vs session {}",
            mark("hit_ok"),
            mark("p99_ok"),
            mark("balance_ok"),
            mark("no_idle"),
            mark("not_worse_than_session"),
        );
    }
}

fn print_summary(results: &Value) {
    println!(
        "\n{:<30} {:>8} {:>8} {:>8} {:>8} {:>8} {:>8}",
        "cell (prefix vs limit)", "hit", "p99", "max/min", "s.hit", "s.p99", "checks"
    );
    let Some(map) = results.as_object() else { return };
    let mut met = 0;
    for (name, r) in map {
        let c = &r["checks"];
        let ok = ["hit_ok", "p99_ok", "balance_ok", "no_idle"]
            .iter()
            .all(|k| c[*k].as_bool() == Some(true))
            && c["not_worse_than_session"].as_bool() != Some(false);
        met += usize::from(ok);
        println!(
            "{name:<30} {:>8.3} {:>8.2} {:>8.2} {:>8.3} {:>8.2} {:>8}",
            f(c, "hit_over_limit"),
            f(c, "p99_over_limit"),
            f(c, "max_over_min"),
            f(c, "session_hit_over_limit"),
            f(c, "session_p99_over_limit"),
            if ok { "ok" } else { "MISSED" }
        );
    }
    println!("prefix met every target in {met} of {} cells", map.len());
}

/// The figure: heatmaps of hit rate and TTFT p99 over the limit's, per cell and policy.
pub fn figure(report: &Value) -> (String, usize, Vec<Panel>) {
    let cells = &report["cells"];
    let empty = serde_json::Map::new();
    let map = cells.as_object().unwrap_or(&empty);
    let policies: Vec<String> = map
        .values()
        .next()
        .and_then(|c| c["targets"].as_object())
        .map(|t| t.keys().filter(|k| *k != "limit").cloned().collect())
        .unwrap_or_default();
    let rows: Vec<String> = map.keys().cloned().collect();
    let ratio = |key: &str| -> Vec<Vec<f64>> {
        map.values()
            .map(|r| {
                let limit = f(&r["targets"]["limit"], key);
                policies
                    .iter()
                    .map(|p| f(&r["targets"][p.as_str()], key) / limit)
                    .collect()
            })
            .collect()
    };
    (
        "routing matrix: each policy over the limit (one engine with the pool's cache and compute)".into(),
        2,
        vec![
            Panel::Heatmap {
                title: "engine hit rate / limit's (>= 0.95 is good)".into(),
                rows: rows.clone(),
                cols: policies.clone(),
                values: ratio("hit_rate"),
                goal: Goal::AtLeast(0.95),
            },
            Panel::Heatmap {
                title: "TTFT p99 / limit's (<= 1.3 is good)".into(),
                rows,
                cols: policies.clone(),
                values: ratio("ttft_ms.p99"),
                goal: Goal::AtMost(1.3),
            },
        ],
    )
}
