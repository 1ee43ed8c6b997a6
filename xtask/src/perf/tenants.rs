//! `cargo xtask perf --scenario tenants`: one router shared by tenants, one of them flooding.
//! A quiet tenant's time to first token must not suffer from it, the flooder must get its
//! 429s, the tokens charged must be the tokens the engines served, and keys with budgets
//! must cost next to nothing.
//!
//! Here: two simulated engines (`--tenants-prefill-ms` to a first token, as a prefill
//! takes, so that TTFT is the engine's and not the machine's scheduling jitter;
//! `--tenants-decode-ms` a token, `--tenants-engine-seqs` at once, and the router's
//! `upstream.max_inflight_per_endpoint` the same, so it never piles more on an engine than
//! it runs) behind the release router with an API keys file of four tenants: `calm` (no
//! limit), `flood` (`--tenants-flood-budget` requests a second), `greedy` (no limit) and
//! `bench` (budgets that never refuse, for the overhead). `lmstack-load mixed` sends `calm`'s streams at `--tenants-calm-rate`
//! a second throughout; in each phase of `--tenants-phase-s`, interleaved over `--rounds`:
//! - `calm alone`;
//! - `flood at budget`: `flood` sends its budget, no more: the load a tenant within its
//!   budget may add to the engines, which no router can take back;
//! - `flood over budget`: `flood` sends `--tenants-flood-factor` times its budget
//!   (429s; what it is admitted adds the same load as at budget);
//! - `greedy, fair queue`: `greedy`, with no budget, sends `--tenants-greedy-rate` a
//!   second, more than the engines can run: the router's queue decides who goes next;
//! - `greedy, first come`: the same through a router over the same engines without keys,
//!   whose queue serves in arrival order (what the fair order buys).
//!
//! Targets: `calm`'s TTFT p99 with the flood over budget within 1.2x of its value with the
//! flood at budget (medians over the rounds): what the flood's excess costs the quiet
//! tenant, the part a router answers for. Its ratio to `calm alone`, which also holds the
//! engines' cost of the flood's admitted requests, is reported beside it. Every tenant's tokens, as lmstack charged them, within 5% of
//! what the engines report served (`vllm:prompt_tokens_total`,
//! `vllm:generation_tokens_total`; the first-come phases, without keys, left out); and the
//! overhead: closed-loop req/s through a router with keys and budgets on (a key whose
//! budgets never refuse, so that every bucket is spent and settled) against one with
//! them off, on engines of their own, `--tenants-overhead-s` each, alternating
//! `--tenants-overhead-rounds` times: the median of the paired costs at most 5%. The
//! greedy phases are reported, not targets.

use std::path::Path;
use std::process::{Command, Stdio};

use anyhow::Context;
use clap::Args;
use lmstack_e2e::Proc;
use serde_json::{Value, json};

use super::plot::{Panel, Series};
use super::progress::Progress;
use super::soak::{mixed_command, mixed_summary, quick_engine, start_sims};
use super::wait_ready;
use crate::start_router;

#[derive(Args)]
pub struct TenantsArgs {
    /// tenants: seconds of each phase.
    #[arg(id = "tenants-phase-s", long = "tenants-phase-s", default_value_t = 15.0)]
    phase_s: f64,
    /// tenants: the engines' time per output token, ms.
    #[arg(id = "tenants-decode-ms", long = "tenants-decode-ms", default_value_t = 10.0)]
    decode_ms: f64,
    /// tenants: requests each engine runs at once (and the router's in-flight limit).
    #[arg(id = "tenants-engine-seqs", long = "tenants-engine-seqs", default_value_t = 8)]
    engine_seqs: usize,
    /// tenants: the engines' fixed time to a first token (prefill), ms.
    #[arg(id = "tenants-prefill-ms", long = "tenants-prefill-ms", default_value_t = 20.0)]
    prefill_ms: f64,
    /// tenants: `max_tokens` of every request.
    #[arg(id = "tenants-max-tokens", long = "tenants-max-tokens", default_value_t = 32)]
    max_tokens: usize,
    /// tenants: the quiet tenant's streams a second.
    #[arg(id = "tenants-calm-rate", long = "tenants-calm-rate", default_value_t = 20.0)]
    calm_rate: f64,
    /// tenants: the flooding tenant's budget, requests a second.
    #[arg(id = "tenants-flood-budget", long = "tenants-flood-budget", default_value_t = 5)]
    flood_budget: u64,
    /// tenants: how many times its budget the flooding tenant sends.
    #[arg(id = "tenants-flood-factor", long = "tenants-flood-factor", default_value_t = 40.0)]
    flood_factor: f64,
    /// tenants: the greedy tenant's requests a second (no budget).
    #[arg(id = "tenants-greedy-rate", long = "tenants-greedy-rate", default_value_t = 100.0)]
    greedy_rate: f64,
    /// tenants: seconds of each closed-loop overhead measurement (keys on, keys off).
    #[arg(id = "tenants-overhead-s", long = "tenants-overhead-s", default_value_t = 3.0)]
    overhead_s: f64,
    /// tenants: interleaved rounds of the phases.
    #[arg(id = "tenants-rounds", long = "tenants-rounds", default_value_t = 3)]
    rounds: usize,
    /// tenants: alternations of the overhead measurement (keys off, keys on).
    #[arg(
        id = "tenants-overhead-rounds",
        long = "tenants-overhead-rounds",
        default_value_t = 10
    )]
    overhead_rounds: usize,
}

const PHASES: [&str; 5] = [
    "calm alone",
    "flood at budget",
    "flood over budget",
    "greedy, fair queue",
    "greedy, first come",
];

fn median(mut v: Vec<f64>) -> f64 {
    v.retain(|x| x.is_finite());
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(f64::total_cmp);
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

/// A counter's sum over every series of `name` on a Prometheus page, where the labels
/// include `label` (when given).
fn sum_metric(page: &str, name: &str, label: Option<&str>) -> f64 {
    page.lines()
        .filter(|l| !l.starts_with('#'))
        .filter(|l| l.starts_with(name) && l[name.len()..].starts_with(['{', ' ']))
        .filter(|l| label.is_none_or(|want| l.contains(want)))
        .filter_map(|l| l.rsplit_once(' ')?.1.parse::<f64>().ok())
        .sum()
}

fn metrics(p: &Proc) -> anyhow::Result<String> {
    Ok(lmstack_e2e::agent()
        .get(format!("{}/metrics", p.url()))
        .call()?
        .body_mut()
        .read_to_string()?)
}

/// `lmstack-load bench` closed-loop completions through `url` for `seconds`: req/s.
fn bench(bins: &Path, url: &str, seconds: f64, header: Option<&str>) -> anyhow::Result<f64> {
    let mut cmd = Command::new(bins.join("lmstack-load"));
    cmd.args([
        "bench",
        "--json",
        "--url",
        url,
        "--mode",
        "completions",
        "--concurrency",
        "32",
    ])
    .args([
        "--max-tokens",
        "1",
        "--warmup-s",
        "1",
        "--duration-s",
        &seconds.to_string(),
    ])
    .stdout(Stdio::piped())
    .stderr(Stdio::inherit());
    if let Some(h) = header {
        cmd.args(["--header", h]);
    }
    let out = cmd.output().context("running lmstack-load bench")?;
    anyhow::ensure!(out.status.success(), "lmstack-load bench failed: {}", out.status);
    let v: Value = serde_json::from_slice(&out.stdout).context("reading lmstack-load bench's JSON")?;
    let v = v.get(0).unwrap_or(&v);
    anyhow::ensure!(v["errors"] == 0, "bench errors: {v}");
    v["rps"].as_f64().context("bench JSON without rps")
}

/// One 429 looked at closely: its status and the headers a client needs.
fn probe_429(url: &str) -> Value {
    let body = json!({"model": "sim-model", "prompt": "x", "max_tokens": 1}).to_string();
    let agent: ureq::Agent = ureq::Agent::config_builder().http_status_as_error(false).build().into();
    for _ in 0..200 {
        let Ok(reply) = agent
            .post(format!("{url}/v1/completions"))
            .header("authorization", "Bearer sk-flood")
            .header("content-type", "application/json")
            .send(body.as_str())
        else {
            continue;
        };
        if reply.status() == 429 {
            let h = |n: &str| reply.headers().get(n).and_then(|v| v.to_str().ok()).map(str::to_owned);
            return json!({
                "status": 429,
                "retry_after": h("retry-after"),
                "limit_requests": h("x-ratelimit-limit-requests"),
                "remaining_requests": h("x-ratelimit-remaining-requests"),
                "reset_requests": h("x-ratelimit-reset-requests"),
                "reason": h("x-lmstack-reason"),
            });
        }
    }
    json!({"status": null})
}

pub fn run(bins: &Path, args: &TenantsArgs) -> anyhow::Result<Value> {
    let rounds = args.rounds.max(1);
    let progress = Progress::new("tenants", (rounds * PHASES.len() + args.overhead_rounds + 2) as u64);
    progress.step("engines and routers (keys on and off)");
    // The engines take `--tenants-prefill-ms` to a first token, as real ones take a prefill:
    // TTFT is then the engine's, not the machine's scheduling jitter.
    let engine = lmstack_e2e::args(&[
        "--prefill-base-ms",
        &args.prefill_ms.to_string(),
        "--prefill-us-per-token",
        "0",
        "--decode-base-ms",
        &args.decode_ms.to_string(),
        "--decode-us-per-seq",
        "0",
        "--max-num-seqs",
        &args.engine_seqs.to_string(),
    ]);
    let sims = start_sims(bins, "tenants-e", 2, &engine);
    let urls: Vec<String> = sims.iter().map(Proc::url).collect();
    let dir = crate::root().join("target/perf");
    std::fs::create_dir_all(&dir)?;
    let keys = dir.join("tenants-keys.yaml");
    lmstack_e2e::write_keys(
        &keys,
        &format!(
            "tenants:\n- name: calm\n  keys:\n  - sha256: {{sha256:sk-calm}}\n\
             - name: flood\n  requests_per_second: {}\n  keys:\n  - sha256: {{sha256:sk-flood}}\n\
             - name: greedy\n  keys:\n  - sha256: {{sha256:sk-greedy}}\n\
             - name: bench\n  requests_per_second: 1000000000\n  tokens_per_minute: 1000000000000\n  keys:\n  - sha256: {{sha256:sk-bench}}\n",
            args.flood_budget
        ),
    );
    let config = dir.join("tenants-config.yaml");
    std::fs::write(
        &config,
        format!("upstream:\n  max_inflight_per_endpoint: {}\n", args.engine_seqs),
    )?;
    let keys_arg = keys.to_string_lossy().into_owned();
    let config_arg = config.to_string_lossy().into_owned();
    let common = ["--log-level", "warn", "--workers", "2", "--config", &config_arg];
    let mut with_keys = common.to_vec();
    with_keys.extend(["--api-keys", &keys_arg]);
    let router = start_router(bins, 0, &urls, &with_keys);
    // The same engines without keys: one queue, first come first served.
    let fifo_router = start_router(bins, 0, &urls, &common);
    // The overhead is measured on engines of their own (so that the tokens the phases'
    // engines served are the phases' alone), through a router with keys and one without.
    let fast = start_sims(bins, "tenants-fast", 2, &quick_engine(0.0, 256));
    let fast_urls: Vec<String> = fast.iter().map(Proc::url).collect();
    let keys_router = start_router(bins, 0, &fast_urls, &with_keys);
    let open_router = start_router(bins, 0, &fast_urls, &common);
    for r in [&router, &fifo_router, &keys_router, &open_router] {
        wait_ready(&r.url())?;
    }
    let engines_served = || -> anyhow::Result<f64> {
        sims.iter()
            .map(|s| {
                metrics(s).map(|m| {
                    sum_metric(&m, "vllm:prompt_tokens_total", None)
                        + sum_metric(&m, "vllm:generation_tokens_total", None)
                })
            })
            .sum()
    };
    let engines_before = engines_served()?;
    // What the first-come phases (no keys: nothing charged) had the engines serve.
    let mut unkeyed = 0.0;

    let mixed = |url: &str, key: Option<&str>, rate: f64, mix: &str, label: &str| {
        let concurrency = ((rate * 0.5).ceil() as usize).clamp(4, 256);
        let mut a = lmstack_e2e::args(&[
            "--mix",
            mix,
            "--rate",
            &rate.to_string(),
            "--concurrency",
            &concurrency.to_string(),
            "--duration-s",
            &args.phase_s.to_string(),
            "--max-tokens",
            &args.max_tokens.to_string(),
            "--request-timeout-s",
            "60",
            "--label",
            label,
        ]);
        if let Some(key) = key {
            a.extend(lmstack_e2e::args(&[
                "--header",
                &format!("authorization: Bearer {key}"),
            ]));
        }
        mixed_command(bins, url, &a).spawn().context("starting lmstack-load")
    };

    let mut phases = Vec::new();
    for round in 0..rounds {
        for phase in PHASES {
            progress.step(format!("round {}: {phase}", round + 1));
            let first_come = phase == "greedy, first come";
            let (url, calm_key, greedy_key) = if first_come {
                (fifo_router.url(), None, None)
            } else {
                (router.url(), Some("sk-calm"), Some("sk-greedy"))
            };
            let before = if first_come { engines_served()? } else { 0.0 };
            let calm = mixed(&url, calm_key, args.calm_rate, "stream=1", "calm")?;
            let other = match phase {
                "calm alone" => None,
                "flood at budget" | "flood over budget" => Some(mixed(
                    &url,
                    Some("sk-flood"),
                    args.flood_budget as f64
                        * if phase == "flood at budget" {
                            1.0
                        } else {
                            args.flood_factor
                        },
                    "completions=1",
                    "flood",
                )?),
                _ => Some(mixed(&url, greedy_key, args.greedy_rate, "stream=1", "greedy")?),
            };
            let calm = mixed_summary(calm)?;
            let other = other.map(mixed_summary).transpose()?;
            phases.push(json!({"phase": phase, "round": round, "calm": calm, "other": other}));
            // Let the queues empty before the next phase.
            std::thread::sleep(std::time::Duration::from_secs(2));
            if first_come {
                unkeyed += engines_served()? - before;
            }
        }
    }
    let mut overhead = Vec::new();
    for round in 0..args.overhead_rounds {
        progress.step(format!(
            "req/s with keys off and on, {} of {}",
            round + 1,
            args.overhead_rounds
        ));
        let on = || {
            bench(
                bins,
                &keys_router.url(),
                args.overhead_s,
                Some("authorization: Bearer sk-bench"),
            )
        };
        let off = || bench(bins, &open_router.url(), args.overhead_s, None);
        // Alternating which goes first, so that neither always runs on a warmer machine.
        let (off, on) = if round % 2 == 0 {
            let off = off()?;
            (off, on()?)
        } else {
            let on = on()?;
            (off()?, on)
        };
        overhead.push(json!({"off": off, "on": on}));
    }
    progress.step("a 429 looked at; tokens charged against tokens served");
    let probe = probe_429(&router.url());
    // What the router charged, and what its engines served.
    let page = metrics(&router)?;
    let charged = sum_metric(&page, "lmstack_tenant_tokens_total", Some("kind=\"prompt\""))
        + sum_metric(&page, "lmstack_tenant_tokens_total", Some("kind=\"completion\""));
    let estimated = sum_metric(&page, "lmstack_tenant_tokens_total", Some("kind=\"estimated\""));
    let served = engines_served()? - engines_before - unkeyed;
    drop((router, fifo_router, keys_router, open_router, sims, fast));

    // Per phase, the medians over rounds of calm's TTFT and the other tenant's outcomes.
    let ttft = |phase: &str, q: &str| -> f64 {
        median(
            phases
                .iter()
                .filter(|p| p["phase"] == phase)
                .map(|p| p["calm"]["ttft_ms"][q].as_f64().unwrap_or(f64::NAN))
                .collect(),
        )
    };
    let by_phase = |q: &str| -> Value { PHASES.iter().map(|p| ((*p).to_owned(), json!(ttft(p, q)))).collect() };
    let alone = ttft("calm alone", "p99");
    let flooded = ttft("flood over budget", "p99");
    // What the excess costs: against the flood at its budget.
    let ratio = flooded / ttft("flood at budget", "p99");
    let flood_429: u64 = phases
        .iter()
        .filter(|p| p["phase"] == "flood over budget")
        .map(|p| p["other"]["error_kinds"]["status_429"].as_u64().unwrap_or(0))
        .sum();
    let calm_errors: u64 = phases.iter().map(|p| p["calm"]["errors"].as_u64().unwrap_or(0)).sum();
    let rps_off = median(overhead.iter().filter_map(|o| o["off"].as_f64()).collect());
    let rps_on = median(overhead.iter().filter_map(|o| o["on"].as_f64()).collect());
    // Each alternation's cost, and their median: paired, so a noisy moment counts against
    // both sides.
    let costs: Vec<f64> = overhead
        .iter()
        .filter_map(|o| Some(1.0 - o["on"].as_f64()? / o["off"].as_f64()?))
        .collect();
    let cost = median(costs.clone());
    let accounting_error = (charged - served).abs() / served.max(1.0);

    let mut failures = Vec::new();
    if ratio.is_nan() || ratio > 1.2 {
        failures.push(format!(
            "calm's TTFT p99 with the flood over budget is {ratio:.2}x its value with the flood at budget (target 1.2x)"
        ));
    }
    if flood_429 == 0 || probe["status"] != 429 || probe["retry_after"].is_null() {
        failures.push(format!(
            "the flood got no proper 429: {flood_429} counted, probe {probe}"
        ));
    }
    if accounting_error.is_nan() || accounting_error > 0.05 {
        failures.push(format!(
            "tokens charged {charged} against {served} served: {:.1}% off (target 5%)",
            accounting_error * 100.0
        ));
    }
    if cost.is_nan() || cost > 0.05 {
        failures.push(format!(
            "keys and budgets cost {:.1}% of req/s (target 5%)",
            cost * 100.0
        ));
    }
    if calm_errors > 0 {
        failures.push(format!("the calm tenant saw {calm_errors} errors"));
    }
    Ok(json!({
        "scenario": "tenants",
        "settings": {
            "phase_s": args.phase_s, "decode_ms": args.decode_ms, "engine_seqs": args.engine_seqs,
            "prefill_ms": args.prefill_ms,
            "max_tokens": args.max_tokens, "calm_rate": args.calm_rate,
            "flood_budget": args.flood_budget, "flood_factor": args.flood_factor,
            "greedy_rate": args.greedy_rate, "overhead_s": args.overhead_s, "rounds": rounds,
            "overhead_rounds": args.overhead_rounds,
        },
        "summary": {
            "calm_ttft_p50_ms": by_phase("p50"),
            "calm_ttft_p99_ms": by_phase("p99"),
            "excess_ratio": ratio,
            "flood_ratio": flooded / alone,
            "at_budget_ratio": ttft("flood at budget", "p99") / alone,
            "greedy_ratio": ttft("greedy, fair queue", "p99") / alone,
            "first_come_ratio": ttft("greedy, first come", "p99") / alone,
            "flood_429": flood_429,
            "probe_429": probe,
            "tokens": {"charged": charged, "estimated": estimated, "served": served, "error": accounting_error},
            "overhead": {"rps_off": rps_off, "rps_on": rps_on, "cost": cost, "costs": costs, "rounds": overhead},
        },
        "phases": phases,
        "passed": failures.is_empty(),
        "failures": failures,
    }))
}

pub fn figure(report: &Value) -> (String, usize, Vec<Panel>) {
    let s = &report["summary"];
    // The phases the report has (earlier runs had no `flood at budget`).
    let shown: Vec<&str> = PHASES
        .into_iter()
        .filter(|p| !s["calm_ttft_p99_ms"][p].is_null())
        .collect();
    let phases: Vec<String> = shown.iter().map(|p| (*p).to_owned()).collect();
    let at = |k: &str| -> Vec<f64> { shown.iter().map(|p| s[k][p].as_f64().unwrap_or(f64::NAN)).collect() };
    let num = |k: &str| s[k].as_f64().unwrap_or(f64::NAN);
    let title = if s["excess_ratio"].is_null() {
        format!(
            "calm tenant's TTFT p99 over alone: {:.2}x with the flood over budget (target 1.2x); beside a greedy tenant {:.1}x in fair turns, {:.1}x first come",
            num("flood_ratio"),
            num("greedy_ratio"),
            num("first_come_ratio")
        )
    } else {
        format!(
            "calm tenant's TTFT p99: flood over budget {:.2}x flood at budget (target 1.2x), {:.2}x alone; beside a greedy tenant {:.1}x in fair turns, {:.1}x first come",
            num("excess_ratio"),
            num("flood_ratio"),
            num("greedy_ratio"),
            num("first_come_ratio")
        )
    };
    let ttft = Panel::Bars {
        title,
        y_label: "ms".into(),
        categories: phases,
        series: vec![
            Series::new("p50", at("calm_ttft_p50_ms")),
            Series::new("p99", at("calm_ttft_p99_ms")),
        ],
    };
    let t = &s["tokens"];
    let tokens = Panel::Bars {
        title: format!(
            "tokens charged vs served: {:.2}% apart (target 5%)",
            t["error"].as_f64().unwrap_or(f64::NAN) * 100.0
        ),
        y_label: "tokens".into(),
        categories: vec!["tokens".into()],
        series: vec![
            Series::new("charged by lmstack", vec![t["charged"].as_f64().unwrap_or(f64::NAN)]),
            Series::new("served by the engines", vec![t["served"].as_f64().unwrap_or(f64::NAN)]),
        ],
    };
    let o = &s["overhead"];
    let overhead = Panel::Bars {
        title: format!(
            "keys and budgets cost {:.1}% of req/s (median of paired runs; target 5%)",
            o["cost"].as_f64().unwrap_or(f64::NAN) * 100.0
        ),
        y_label: "req/s".into(),
        categories: vec!["closed loop, 32 connections".into()],
        series: vec![
            Series::new("keys off", vec![o["rps_off"].as_f64().unwrap_or(f64::NAN)]),
            Series::new("keys and budgets on", vec![o["rps_on"].as_f64().unwrap_or(f64::NAN)]),
        ],
    };
    (
        format!(
            "tenants: a quiet tenant beside a flooding one ({} 429s to the flood)",
            s["flood_429"]
        ),
        3,
        vec![ttft, tokens, overhead],
    )
}
