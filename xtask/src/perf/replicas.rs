//! `cargo xtask perf --scenario replicas`: do router replicas behind one lmstack-control agree
//! on where a conversation lives? The multi-round workload (the `--mr-*` settings, variant
//! `--rep-variant`) runs against:
//!
//! - `one_replica`: one router, every round through it (the baseline: how often a router
//!   keeps a conversation on the engine of its previous round, with load balancing allowed
//!   to move it);
//! - `two_replicas_shared`: two routers sharing affinity through control, a user's rounds
//!   taking turns between them, so every follow-up round is decided by the replica that did
//!   not route the round before;
//! - `two_replicas_unshared`: the same with `share_affinity: false` (what each replica
//!   learning alone gives).
//!
//! Each run has fresh engines, control and routers. Counted: follow-up rounds started after
//! `--rep-warmup-s`, and of them those served by the previous round's engine (the simulator's
//! `x-sim-engine` header). The agreement share is the two-replica figure over the baseline's.
//!
//! The figure (`figure`): per target, the share of follow-ups on the previous round's engine,
//! hit rate, TTFT p50 and p99, and requests per engine.

use std::path::Path;

use clap::Args;
use lmstack_e2e::Proc;
use serde_json::{Value, json};

use super::multiround::{MultiRoundArgs, add_engine_stats, f, run_load, start_engines, target_panels, variant_args};
use super::plot::{Panel, Series};
use super::progress::Progress;
use super::wait_ready;

/// The targets, in the order they run and are told about.
const TARGETS: [(&str, usize, bool); 3] = [
    ("one_replica", 1, true),
    ("two_replicas_shared", 2, true),
    ("two_replicas_unshared", 2, false),
];

#[derive(Args)]
pub struct ReplicasArgs {
    /// Workload variant (as --mr-variants): no-header leaves prefixes as the only clue.
    #[arg(id = "rep-variant", long = "rep-variant", default_value = "no-header")]
    variant: String,
    /// Follow-ups started in the first seconds are not counted.
    #[arg(id = "rep-warmup-s", long = "rep-warmup-s", default_value_t = 5.0)]
    warmup_s: f64,
    /// Control's probe interval (engine load and cache figures reach routers this often).
    #[arg(id = "rep-probe-interval-ms", long = "rep-probe-interval-ms", default_value_t = 200)]
    probe_interval_ms: u64,
}

pub fn run(bins: &Path, work: &Path, mr: &MultiRoundArgs, args: &ReplicasArgs) -> anyhow::Result<Value> {
    let mut extra = variant_args(&args.variant)?;
    let warmup = args.warmup_s.to_string();
    extra.extend(["--warmup-s", &warmup]);
    let mut results = serde_json::Map::new();
    let progress = Progress::new("replicas", TARGETS.len() as u64);
    for (name, replicas, share) in TARGETS {
        progress.step(format!("{name} ({} engines, variant {})", mr.engines, args.variant));
        let sims = start_engines(bins, mr.engines, mr.blocks);
        let urls: Vec<String> = sims.iter().map(Proc::url).collect();
        let control = start_control(bins, &urls, args.probe_interval_ms)?;
        let config = work.join(format!("replicas-{name}.yaml"));
        std::fs::write(
            &config,
            format!(
                "discovery:\n  mode: control\n  control:\n    url: {}\n    share_affinity: {share}\n\
                 routing:\n  policy: prefix\n",
                control.url()
            ),
        )?;
        let routers: Vec<Proc> = (0..replicas)
            .map(|_| {
                Proc::start(
                    &bins.join("lmstack"),
                    &lmstack_e2e::args(&[
                        "--config",
                        config.to_str().unwrap_or_default(),
                        "--host",
                        "127.0.0.1",
                        "--port",
                        "0",
                        "--log-level",
                        "warn",
                    ]),
                    &[],
                )
            })
            .collect();
        for r in &routers {
            wait_ready(&r.url())?;
        }
        let router_urls: Vec<String> = routers.iter().map(Proc::url).collect();
        let mut run = run_load(bins, mr, &router_urls, name, &extra)?;
        add_engine_stats(&mut run, &sims)?;
        results.insert(name.into(), run);
    }
    progress.finish();
    let results = Value::Object(results);
    let checks = checks(&results);
    print(mr, args, &results, &checks);
    Ok(json!({
        "settings": {
            "engines": mr.engines, "blocks_per_engine": mr.blocks, "users": mr.users,
            "active": mr.active, "rounds": mr.rounds, "qps": mr.qps,
            "history_tokens": mr.history_tokens, "variant": args.variant,
            "warmup_s": args.warmup_s, "probe_interval_ms": args.probe_interval_ms,
            "engine_costs": super::multiround::ENGINE_COSTS.join(" "),
        },
        "results": results,
        "checks": checks,
    }))
}

/// The figure of a report: title, panels a row, panels.
pub fn figure(report: &Value) -> (String, usize, Vec<Panel>) {
    let results = &report["results"];
    let targets: Vec<String> = TARGETS.iter().map(|(name, _, _)| (*name).to_owned()).collect();
    let share = targets.iter().map(|t| f(&results[t], "same_engine_share")).collect();
    let mut panels = vec![Panel::Bars {
        title: "follow-up rounds on the previous round's engine".into(),
        y_label: "share".into(),
        categories: targets.clone(),
        series: vec![Series::new("share", share)],
    }];
    panels.extend(target_panels("", results, &targets));
    let s = &report["settings"];
    let title = format!(
        "replicas: routers behind one lmstack-control, variant {}; {} users, {} req/s, {} engines x {} blocks",
        s["variant"].as_str().unwrap_or("?"),
        s["users"],
        s["qps"],
        s["engines"],
        s["blocks_per_engine"]
    );
    (title, 2, panels)
}

/// Starts lmstack-control over the static `engines`, probing every `probe_interval_ms`, and
/// waits until it answers.
pub(super) fn start_control(bins: &Path, engines: &[String], probe_interval_ms: u64) -> anyhow::Result<Proc> {
    let control = Proc::start(
        &bins.join("lmstack-control"),
        &lmstack_e2e::args(&[
            "--listen",
            "127.0.0.1:0",
            "--source",
            "static",
            "--static-backends",
            &engines.join(","),
            "--probe-interval-ms",
            &probe_interval_ms.to_string(),
            "--log-level",
            "warn",
        ]),
        &[],
    );
    wait_ready(&control.url())?;
    Ok(control)
}

fn checks(results: &Value) -> Value {
    let share = |name: &str| f(&results[name], "same_engine_share");
    let agreement = share("two_replicas_shared") / share("one_replica");
    json!({
        "agreement_over_one_replica": agreement,
        "agreement_at_least_95pct": agreement >= 0.95,
        "unshared_over_one_replica": share("two_replicas_unshared") / share("one_replica"),
    })
}

fn print(mr: &MultiRoundArgs, args: &ReplicasArgs, results: &Value, checks: &Value) {
    println!(
        "\nreplicas, {}: {} users ({} at a time), {} rounds, {} req/s; {} engines x {} blocks; \
         follow-ups after {} s",
        args.variant, mr.users, mr.active, mr.rounds, mr.qps, mr.engines, mr.blocks, args.warmup_s
    );
    println!(
        "{:<24} {:>10} {:>10} {:>8} {:>9} {:>9} {:>8}",
        "target", "follow-ups", "same eng.", "share", "hit rate", "TTFT p99", "max/min"
    );
    for (name, _, _) in TARGETS {
        let r = &results[name];
        println!(
            "{name:<24} {:>10} {:>10} {:>8.3} {:>9.3} {:>9.1} {:>8.2}",
            f(r, "follow_ups"),
            f(r, "follow_ups_same_engine"),
            f(r, "same_engine_share"),
            f(r, "hit_rate"),
            f(r, "ttft_ms.p99"),
            f(r, "requests_max_over_min"),
        );
    }
    println!(
        "two replicas agree {:.3} as often as one router agrees with itself ({}); without sharing: {:.3}",
        f(checks, "agreement_over_one_replica"),
        if checks["agreement_at_least_95pct"].as_bool() == Some(true) {
            "ok"
        } else {
            "NOT MET"
        },
        f(checks, "unshared_over_one_replica"),
    );
}
