//! `cargo xtask perf --scenario multi-round`: the multi-round QA workload (see
//! `lmstack-load multi-round --help`) against `--mr-engines` simulated engines whose KV caches
//! are smaller than the workload's working set, once per routing policy, and against one
//! engine holding all their cache together (the reference hit rate: what perfect placement
//! without duplication would get).
//!
//! Every target starts with fresh engines and runs the same list of requests. Reported per
//! policy: TTFT p50/p90/p99 and mean inter-token latency (client side), rounds per second,
//! the engines' own prefix-cache hit rate (`vllm:prefix_cache_hits_total /
//! vllm:prefix_cache_queries_total`), and requests per engine (max/min).
//!
//! The figure (`figure`): per variant, each policy's hit rate, TTFT p50 and p99, and
//! requests per engine.

use std::path::Path;
use std::process::{Command, Stdio};

use anyhow::Context;
use clap::Args;
use lmstack_e2e::{Proc, agent, metric_sum};
use serde_json::{Value, json};

use super::plot::{Goal, Panel, Series};
use super::progress::Progress;
use super::wait_ready;
use crate::start_router;

/// The simulated engines' costs: prefill 50 us a token (a 5k-token history takes 250 ms),
/// 5 ms a token to decode plus 0.2 ms for every other running sequence.
pub(super) const ENGINE_COSTS: [&str; 10] = [
    "--prefill-base-ms",
    "2",
    "--prefill-us-per-token",
    "50",
    "--decode-base-ms",
    "5",
    "--decode-us-per-seq",
    "200",
    "--block-size",
    "16",
];

#[derive(Args)]
pub struct MultiRoundArgs {
    /// Engines behind the router.
    #[arg(id = "mr-engines", long = "mr-engines", default_value_t = 4)]
    pub(super) engines: usize,
    /// KV cache of each engine, in 16-token blocks (the reference engine has them all).
    #[arg(id = "mr-blocks", long = "mr-blocks", default_value_t = 4000)]
    pub(super) blocks: usize,
    #[arg(id = "mr-users", long = "mr-users", default_value_t = 128)]
    pub(super) users: usize,
    #[arg(id = "mr-active", long = "mr-active", default_value_t = 32)]
    pub(super) active: usize,
    #[arg(id = "mr-rounds", long = "mr-rounds", default_value_t = 10)]
    pub(super) rounds: usize,
    /// Aggregate request rate.
    #[arg(id = "mr-qps", long = "mr-qps", default_value_t = 24.0)]
    pub(super) qps: f64,
    #[arg(id = "mr-history-tokens", long = "mr-history-tokens", default_value_t = 4000)]
    pub(super) history_tokens: usize,
    /// Policies to compare.
    #[arg(
        id = "mr-policies",
        long = "mr-policies",
        value_delimiter = ',',
        default_value = "round_robin,session,least_load,prefix"
    )]
    policies: Vec<String>,
    /// Workload variants: base (x-user-id sent), no-header, rag (8 shared 2000-token
    /// documents), skewed (Zipf user activity).
    #[arg(
        id = "mr-variants",
        long = "mr-variants",
        value_delimiter = ',',
        default_value = "base,no-header,rag,skewed"
    )]
    variants: Vec<String>,
}

pub(super) fn variant_args(variant: &str) -> anyhow::Result<Vec<&'static str>> {
    Ok(match variant {
        "base" => vec![],
        "no-header" => vec!["--no-session-header"],
        "rag" => vec!["--docs", "8", "--doc-tokens", "2000"],
        "skewed" => vec!["--skew", "1.0"],
        other => anyhow::bail!("unknown variant {other:?} (base, no-header, rag, skewed)"),
    })
}

pub fn run(bins: &Path, args: &MultiRoundArgs) -> anyhow::Result<Value> {
    anyhow::ensure!(
        args.engines > 0 && args.blocks > 0,
        "--mr-engines and --mr-blocks must be positive"
    );
    let mut variants = serde_json::Map::new();
    let progress = Progress::new("multi-round", (args.variants.len() * (1 + args.policies.len())) as u64);
    for variant in &args.variants {
        let extra = variant_args(variant)?;
        let mut results = serde_json::Map::new();
        progress.step(format!(
            "{variant}: reference (one engine, {} blocks)",
            args.engines * args.blocks
        ));
        results.insert(
            "one_big_engine".into(),
            run_target(bins, args, &extra, None, 1, args.engines * args.blocks)?,
        );
        for policy in &args.policies {
            progress.step(format!("{variant}: {policy} over {} engines", args.engines));
            results.insert(
                policy.clone(),
                run_target(bins, args, &extra, Some(policy), args.engines, args.blocks)?,
            );
        }
        let results = Value::Object(results);
        progress.suspend(|| print_variant(variant, args, &results));
        variants.insert(variant.clone(), json!({"results": results, "checks": checks(&results)}));
    }
    progress.finish();
    Ok(json!({
        "settings": {
            "engines": args.engines, "blocks_per_engine": args.blocks, "users": args.users,
            "active": args.active, "rounds": args.rounds, "qps": args.qps,
            "system_tokens": 1000, "history_tokens": args.history_tokens, "answer_tokens": 32,
            "engine_costs": ENGINE_COSTS.join(" "),
        },
        "variants": variants,
    }))
}

/// One run: fresh engines, a router with `policy` (none: straight to the one engine).
fn run_target(
    bins: &Path,
    args: &MultiRoundArgs,
    extra: &[&str],
    policy: Option<&str>,
    engines: usize,
    blocks: usize,
) -> anyhow::Result<Value> {
    let sims = start_engines(bins, engines, blocks);
    let router = policy.map(|p| {
        let urls: Vec<String> = sims.iter().map(Proc::url).collect();
        start_router(bins, 0, &urls, &["--routing-logic", p, "--log-level", "warn"])
    });
    let url = match &router {
        Some(r) => {
            wait_ready(&r.url())?;
            r.url()
        }
        None => sims[0].url(),
    };
    let mut run = run_load(bins, args, &[url], policy.unwrap_or("one_big_engine"), extra)?;
    add_engine_stats(&mut run, &sims)?;
    if let Some(r) = &router {
        // The router's own view: decisions by reason, the mean matched share.
        std::thread::sleep(std::time::Duration::from_millis(250));
        let text = agent()
            .get(format!("{}/metrics", r.url()))
            .call()?
            .body_mut()
            .read_to_string()?;
        let mut reasons = serde_json::Map::new();
        for reason in lmstack_route::Reason::ALL.map(lmstack_route::Reason::as_str) {
            let n = metric_sum(&text, "lmstack_routing_decisions_total", &[("reason", reason)]);
            if n > 0.0 {
                reasons.insert(reason.into(), json!(n));
            }
        }
        run["decisions"] = Value::Object(reasons);
        let count = metric_sum(&text, "lmstack_routing_prefix_match_ratio_count", &[]);
        if count > 0.0 {
            run["mean_match_ratio"] = json!(metric_sum(&text, "lmstack_routing_prefix_match_ratio_sum", &[]) / count);
        }
    }
    Ok(run)
}

/// Starts `n` simulated engines named e0.. with `blocks` KV blocks each and the benchmark's costs.
pub(super) fn start_engines(bins: &Path, n: usize, blocks: usize) -> Vec<Proc> {
    let blocks = blocks.to_string();
    (0..n)
        .map(|i| {
            let mut a = lmstack_e2e::args(&["--host", "127.0.0.1", "--port", "0", "--name", &format!("e{i}")]);
            a.extend(lmstack_e2e::args(&ENGINE_COSTS));
            a.extend(lmstack_e2e::args(&["--num-gpu-blocks", &blocks]));
            Proc::start(&bins.join("lmstack-sim"), &a, &[])
        })
        .collect()
}

/// Runs `lmstack-load multi-round` against `urls` (several: rounds take turns) and returns its
/// summary.
pub(super) fn run_load(
    bins: &Path,
    args: &MultiRoundArgs,
    urls: &[String],
    label: &str,
    extra: &[&str],
) -> anyhow::Result<Value> {
    let out = Command::new(bins.join("lmstack-load"))
        .args(["multi-round", "--url", &urls.join(","), "--json", "--label", label])
        .args(["--users", &args.users.to_string(), "--active", &args.active.to_string()])
        .args(["--rounds", &args.rounds.to_string(), "--qps", &args.qps.to_string()])
        .args(["--history-tokens", &args.history_tokens.to_string()])
        .args(extra)
        .stderr(Stdio::inherit())
        .output()
        .context("running lmstack-load multi-round")?;
    anyhow::ensure!(out.status.success(), "lmstack-load multi-round failed");
    Ok(serde_json::from_slice(&out.stdout)?)
}

/// Adds the engines' own figures to `run`: prefix-cache hit rate and requests per engine.
pub(super) fn add_engine_stats(run: &mut Value, sims: &[Proc]) -> anyhow::Result<()> {
    let http = agent();
    let (mut hits, mut queries, mut per_engine) = (0.0, 0.0, Vec::new());
    for s in sims {
        let text = http
            .get(format!("{}/metrics", s.url()))
            .call()?
            .body_mut()
            .read_to_string()?;
        hits += metric_sum(&text, "vllm:prefix_cache_hits_total", &[]);
        queries += metric_sum(&text, "vllm:prefix_cache_queries_total", &[]);
        per_engine.push(metric_sum(&text, "vllm:request_success_total", &[]));
    }
    let max = per_engine.iter().copied().fold(0.0, f64::max);
    let min = per_engine.iter().copied().fold(f64::INFINITY, f64::min);
    run["hit_rate"] = json!(if queries > 0.0 { hits / queries } else { 0.0 });
    run["requests_per_engine"] = json!(per_engine);
    run["requests_max_over_min"] = json!(if min > 0.0 { max / min } else { f64::INFINITY });
    Ok(())
}

/// A run's requests per engine, as `n/n/n`.
pub(super) fn per_engine(run: &Value) -> String {
    run["requests_per_engine"]
        .as_array()
        .map(|a| {
            a.iter()
                .map(|v| format!("{}", v.as_f64().unwrap_or(0.0)))
                .collect::<Vec<_>>()
        })
        .unwrap_or_default()
        .join("/")
}

pub(super) fn f(v: &Value, path: &str) -> f64 {
    path.split('.')
        .try_fold(v, |v, k| v.get(k))
        .and_then(Value::as_f64)
        .unwrap_or(f64::NAN)
}

/// Policies in the order they are told about: the reference, then from simplest to prefix;
/// others after, by name.
pub(super) fn policy_order(results: &serde_json::Map<String, Value>) -> Vec<String> {
    const ORDER: [&str; 5] = ["one_big_engine", "round_robin", "session", "least_load", "prefix"];
    let mut names: Vec<String> = results.keys().cloned().collect();
    names.sort_by_key(|n| (ORDER.iter().position(|o| o == n).unwrap_or(ORDER.len()), n.clone()));
    names
}

/// Panels of `targets` (names in `results`): hit rate, TTFT p50 and p99, requests per engine
/// (without `one_big_engine`, whose one engine serves all), each title led by `prefix`.
pub(super) fn target_panels(prefix: &str, results: &Value, targets: &[String]) -> Vec<Panel> {
    let values = |path: &str, names: &[String]| names.iter().map(|t| f(&results[t], path)).collect::<Vec<_>>();
    let spread: Vec<String> = targets.iter().filter(|t| *t != "one_big_engine").cloned().collect();
    let per_engine = |t: &String| -> Vec<f64> {
        results[t]["requests_per_engine"]
            .as_array()
            .map(|a| a.iter().map(|v| v.as_f64().unwrap_or(f64::NAN)).collect())
            .unwrap_or_default()
    };
    let engines = spread.iter().map(|t| per_engine(t).len()).max().unwrap_or(0);
    vec![
        Panel::Bars {
            title: format!("{prefix}hit rate (engines' prefix cache)"),
            y_label: "hits / queries".into(),
            categories: targets.to_vec(),
            series: vec![Series::new("hit rate", values("hit_rate", targets))],
        },
        Panel::Bars {
            title: format!("{prefix}time to first token"),
            y_label: "ms".into(),
            categories: targets.to_vec(),
            series: vec![
                Series::new("p50", values("ttft_ms.p50", targets)),
                Series::new("p99", values("ttft_ms.p99", targets)),
            ],
        },
        Panel::Bars {
            title: format!("{prefix}requests per engine"),
            y_label: "requests".into(),
            categories: spread.clone(),
            series: (0..engines)
                .map(|e| {
                    let counts = spread.iter().map(|t| per_engine(t).get(e).copied().unwrap_or(f64::NAN));
                    Series::new(format!("e{e}"), counts.collect())
                })
                .collect(),
        },
    ]
}

/// The figure of a report: title, panels a row, panels. First the targets for prefix
/// (hit rate, TTFT p99, balance) as heatmaps of every policy and variant, then each variant's
/// figures.
pub fn figure(report: &Value) -> (String, usize, Vec<Panel>) {
    let variants = report["variants"].as_object().cloned().unwrap_or_default();
    let policies: Vec<String> = variants
        .values()
        .filter_map(|v| v["results"].as_object())
        .flat_map(policy_order)
        .filter(|p| p != "one_big_engine")
        .fold(Vec::new(), |mut all, p| {
            if !all.contains(&p) {
                all.push(p);
            }
            all
        });
    // `path` of each policy over the same of `baseline`, per variant.
    let over = |path: &str, baseline: &str| -> Vec<Vec<f64>> {
        variants
            .values()
            .map(|v| {
                let r = &v["results"];
                policies
                    .iter()
                    .map(|p| f(&r[p], path) / f(&r[baseline], path))
                    .collect()
            })
            .collect()
    };
    let mut panels = vec![
        Panel::Heatmap {
            title: "hit rate / one big engine's".into(),
            rows: variants.keys().cloned().collect(),
            cols: policies.clone(),
            values: over("hit_rate", "one_big_engine"),
            goal: Goal::AtLeast(0.95),
        },
        Panel::Heatmap {
            title: "TTFT p99 / round_robin's".into(),
            rows: variants.keys().cloned().collect(),
            cols: policies.clone(),
            values: over("ttft_ms.p99", "round_robin"),
            goal: Goal::AtMost(0.5),
        },
        Panel::Heatmap {
            title: "requests per engine, max / min".into(),
            rows: variants.keys().cloned().collect(),
            cols: policies.clone(),
            values: variants
                .values()
                .map(|v| {
                    policies
                        .iter()
                        .map(|p| f(&v["results"][p], "requests_max_over_min"))
                        .collect()
                })
                .collect(),
            goal: Goal::AtMost(1.3),
        },
    ];
    for (variant, v) in &variants {
        let results = &v["results"];
        let targets = results.as_object().map(policy_order).unwrap_or_default();
        panels.extend(target_panels(&format!("{variant}: "), results, &targets));
    }
    let s = &report["settings"];
    let title = format!(
        "multi-round: {} users, {} rounds, {} req/s; {} engines x {} blocks, per routing policy",
        s["users"], s["rounds"], s["qps"], s["engines"], s["blocks_per_engine"]
    );
    (title, 3, panels)
}

/// The targets, as measured in this run.
fn checks(results: &Value) -> Value {
    let (prefix, big) = (&results["prefix"], &results["one_big_engine"]);
    if prefix.is_null() {
        return Value::Null;
    }
    let hit_ratio = f(prefix, "hit_rate") / f(big, "hit_rate");
    let mut c = json!({
        "prefix_hit_rate_over_reference": hit_ratio,
        "prefix_hit_rate_within_5pct": hit_ratio >= 0.95,
        "prefix_requests_max_over_min": f(prefix, "requests_max_over_min"),
        "prefix_balanced_within_1_3": f(prefix, "requests_max_over_min") <= 1.3,
    });
    if !results["round_robin"].is_null() {
        let r = f(prefix, "ttft_ms.p99") / f(&results["round_robin"], "ttft_ms.p99");
        c["prefix_p99_over_round_robin_p99"] = json!(r);
        c["prefix_p99_at_most_half_of_round_robin"] = json!(r <= 0.5);
    }
    if !results["session"].is_null() {
        c["prefix_p99_no_worse_than_session"] =
            json!(f(prefix, "ttft_ms.p99") <= f(&results["session"], "ttft_ms.p99"));
    }
    c
}

fn print_variant(variant: &str, args: &MultiRoundArgs, results: &Value) {
    println!(
        "\nmulti-round, {variant}: {} users ({} at a time), {} rounds, {} req/s; {} engines x {} blocks",
        args.users, args.active, args.rounds, args.qps, args.engines, args.blocks
    );
    println!(
        "{:<16} {:>8} {:>9} {:>9} {:>9} {:>8} {:>9} {:>14} {:>8}",
        "target", "hit rate", "TTFT p50", "TTFT p90", "TTFT p99", "ITL ms", "rounds/s", "req/engine", "max/min"
    );
    if let Some(map) = results.as_object() {
        for (name, r) in map {
            println!(
                "{name:<16} {:>8.3} {:>9.1} {:>9.1} {:>9.1} {:>8.2} {:>9.2} {:>14} {:>8.2}",
                f(r, "hit_rate"),
                f(r, "ttft_ms.p50"),
                f(r, "ttft_ms.p90"),
                f(r, "ttft_ms.p99"),
                f(r, "itl_ms_mean"),
                f(r, "rounds_per_s"),
                per_engine(r),
                f(r, "requests_max_over_min")
            );
        }
    }
    let c = checks(results);
    if !c.is_null() {
        let mark = |k: &str| match c[k].as_bool() {
            Some(true) => "ok",
            Some(false) => "NOT MET",
            None => "n/a",
        };
        println!(
            "prefix: hit rate {:.3} of the one big engine's ({}); TTFT p99 {:.2} of round_robin's ({}); \
             no worse than session's ({}); requests max/min {:.2} ({})",
            f(&c, "prefix_hit_rate_over_reference"),
            mark("prefix_hit_rate_within_5pct"),
            f(&c, "prefix_p99_over_round_robin_p99"),
            mark("prefix_p99_at_most_half_of_round_robin"),
            mark("prefix_p99_no_worse_than_session"),
            f(&c, "prefix_requests_max_over_min"),
            mark("prefix_balanced_within_1_3"),
        );
    }
}
