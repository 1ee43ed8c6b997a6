//! `cargo xtask perf`: lmstack's benchmarks. Scenarios:
//!
//! - `proxy`: what lmstack adds to a request against a direct connection and nginx
//!   (throughput, latency, streaming time to first byte, CPU per request).
//! - `multi-round`: the multi-round QA workload against simulated engines with tight KV
//!   caches, per routing policy, with one big engine as the reference for hit rate.
//! - `affinity-memory`: the prefix affinity table's resident memory under 10^6 prompts.
//! - `replicas`: two routers behind one lmstack-control on the multi-round workload: how
//!   often they agree on where a conversation lives, against one router alone.
//! - `routing-matrix`: the policies against the limit (one engine with the pool's cache and
//!   compute) on a matrix of workloads, one set of defaults (`--cells` to pick some).
//! - `soak`: 10^6 mixed requests (completions, streams, chats, clients that leave) through
//!   the router, its RSS and open fds sampled every second; fails when they grow.
//! - `streams-10k`: 10,000 streams open at once through one router worker: bytes per stream.
//! - `upgrade`: the router replaced under load by a new process on the same port
//!   (`--takeover`, SIGTERM to the old one); fails on any failed request.
//!
//! `soak`, `streams-10k` and `upgrade` write their results even when their checks fail, then
//! exit non-zero.
//!
//! Each shows its steps on stderr (a bar on a terminal, plain lines otherwise, see
//! `progress`), prints its tables, and writes JSON under target/perf/ (or `--out`) with an
//! SVG figure of the same name beside it (see `plot`). `--replot FILE` draws the figure of a
//! JSON written before, without running anything.

mod matrix;
mod memory;
mod multiround;
pub mod plot;
mod procstat;
pub mod progress;
mod proxy;
mod replicas;
mod soak;
mod streams;
mod tenants;
mod timeline;
mod upgrade;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::{Context, bail};
use clap::{Args, ValueEnum};
use lmstack_e2e::agent;
use serde_json::{Value, json};

use crate::{build_bins, root};

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Scenario {
    Proxy,
    MultiRound,
    AffinityMemory,
    Replicas,
    RoutingMatrix,
    Soak,
    #[value(name = "streams-10k")]
    Streams10k,
    Upgrade,
    Tenants,
    /// proxy, affinity-memory and multi-round.
    All,
}

#[derive(Args)]
pub struct PerfArgs {
    /// Which benchmark to run.
    #[arg(long, value_enum, default_value = "all")]
    scenario: Scenario,
    /// Directory for the JSON results and their SVG figures (default: target/perf).
    #[arg(long)]
    out: Option<PathBuf>,
    /// Draw the SVG figure of a results JSON (e.g. perf/results/*.json) into the output
    /// directory, and run nothing.
    #[arg(long, value_name = "FILE")]
    replot: Option<PathBuf>,
    #[command(flatten)]
    proxy: proxy::ProxyArgs,
    // Boxed: the largest of the settings, and `Task` (main.rs) holds these by value.
    #[command(flatten)]
    multi_round: Box<multiround::MultiRoundArgs>,
    #[command(flatten)]
    replicas: replicas::ReplicasArgs,
    #[command(flatten)]
    matrix: matrix::MatrixArgs,
    // Boxed too, for the same reason.
    #[command(flatten)]
    soak: Box<soak::SoakArgs>,
    #[command(flatten)]
    streams: Box<streams::StreamsArgs>,
    #[command(flatten)]
    upgrade: Box<upgrade::UpgradeArgs>,
    #[command(flatten)]
    tenants: Box<tenants::TenantsArgs>,
}

pub fn run(args: &PerfArgs) -> anyhow::Result<()> {
    let work = root().join("target/perf");
    let out = args.out.clone().unwrap_or_else(|| work.clone());
    std::fs::create_dir_all(&work)?;
    std::fs::create_dir_all(&out)?;
    if let Some(file) = &args.replot {
        return replot(file, &out);
    }
    let bins = build_bins(true)?;
    let when = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let save = |name: &str, mut report: Value| -> anyhow::Result<()> {
        report["environment"] = environment(when);
        let path = out.join(format!("{name}-{when}.json"));
        std::fs::write(&path, serde_json::to_string_pretty(&report)?)?;
        println!("\nresults: {}", path.display());
        let svg = path.with_extension("svg");
        if plot_report(&report, &svg)? {
            println!("figure:  {}", svg.display());
        }
        Ok(())
    };
    let all = args.scenario == Scenario::All;
    if all || args.scenario == Scenario::Proxy {
        save("proxy", proxy::run(&bins, &work, &args.proxy)?)?;
    }
    if all || args.scenario == Scenario::AffinityMemory {
        save("affinity-memory", memory::run()?)?;
    }
    if all || args.scenario == Scenario::MultiRound {
        save("multi-round", multiround::run(&bins, &args.multi_round)?)?;
    }
    if args.scenario == Scenario::Replicas {
        save(
            "replicas",
            replicas::run(&bins, &work, &args.multi_round, &args.replicas)?,
        )?;
    }
    if args.scenario == Scenario::RoutingMatrix
        && let Some(report) = matrix::run(&bins, &work, &args.matrix)?
    {
        save("routing-matrix", report)?;
    }
    // Scenarios with checks: the results are written, then a failed check fails the run.
    let checked = match args.scenario {
        Scenario::Soak => Some(("soak", soak::run(&bins, &args.soak)?)),
        Scenario::Streams10k => Some(("streams-10k", streams::run(&bins, &args.streams)?)),
        Scenario::Upgrade => Some(("upgrade", upgrade::run(&bins, &args.upgrade)?)),
        Scenario::Tenants => Some(("tenants", tenants::run(&bins, &args.tenants)?)),
        _ => None,
    };
    if let Some((name, report)) = checked {
        let failures = report["failures"].clone();
        let passed = report["passed"] == true;
        save(name, report)?;
        if !passed {
            bail!("{name}: {failures}");
        }
    }
    Ok(())
}

/// Draws the figure of `file`, a report written before, into `out` under the same name.
fn replot(file: &Path, out: &Path) -> anyhow::Result<()> {
    let text = std::fs::read_to_string(file).with_context(|| format!("reading {}", file.display()))?;
    let report: Value = serde_json::from_str(&text).with_context(|| format!("parsing {}", file.display()))?;
    let stem = file.file_stem().context("a results file has a name")?;
    let svg = out.join(stem).with_extension("svg");
    anyhow::ensure!(
        plot_report(&report, &svg)?,
        "{} is not a report of a perf scenario",
        file.display()
    );
    println!("figure: {}", svg.display());
    Ok(())
}

/// Draws the figure of a scenario's report to `svg`, telling the scenario by the report's
/// shape; false for a report of none of them.
fn plot_report(report: &Value, svg: &Path) -> anyhow::Result<bool> {
    let (title, columns, panels) = if report["scenario"] == "soak" {
        soak::figure(report)
    } else if report["scenario"] == "streams-10k" {
        streams::figure(report)
    } else if report["scenario"] == "upgrade" {
        upgrade::figure(report)
    } else if report["scenario"] == "tenants" {
        tenants::figure(report)
    } else if report.get("cells").is_some() {
        matrix::figure(report)
    } else if report.get("throughput").is_some() {
        proxy::figure(report)
    } else if report.get("variants").is_some() {
        multiround::figure(report)
    } else if report["results"].get("one_replica").is_some() {
        replicas::figure(report)
    } else if report.get("table_bytes").is_some() {
        memory::figure(report)
    } else if report.get("agreement").is_some() {
        crate::real_kv::figure(report)
    } else if report.get("total_executions").is_some() {
        crate::fuzz::figure(report)
    } else if report["scenario"] == "real-failover" {
        crate::real_failover::figure(report)
    } else {
        return Ok(false);
    };
    plot::figure(svg, &title, columns, &panels)?;
    Ok(true)
}

fn environment(when: u64) -> Value {
    json!({
        "when_unix": when,
        "commit": command_output("git", &["rev-parse", "--short", "HEAD"]),
        "kernel": command_output("uname", &["-r"]),
        "cores": std::thread::available_parallelism().map_or(1, |n| n.get()),
    })
}

fn command_output(cmd: &str, args: &[&str]) -> String {
    Command::new(cmd)
        .args(args)
        .output()
        .map(|o| {
            let text = if o.stdout.is_empty() { o.stderr } else { o.stdout };
            String::from_utf8_lossy(&text).trim().to_owned()
        })
        .unwrap_or_default()
}

fn wait_ready(url: &str) -> anyhow::Result<()> {
    let http = agent();
    let start = std::time::Instant::now();
    while start.elapsed() < Duration::from_secs(30) {
        if http
            .get(format!("{url}/health"))
            .call()
            .is_ok_and(|r| r.status() == 200)
        {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    bail!("{url} never became healthy")
}

#[cfg(test)]
mod tests {
    use super::*;
    use plot::tests::{svg_texts, temp_svg};

    #[test]
    fn checked_in_results_replot_as_figures_with_their_targets() {
        let dir = root().join("perf/results");
        let mut drawn = 0;
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            if path.extension().is_none_or(|e| e != "json") {
                continue;
            }
            let report: Value = serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
            let svg = temp_svg(&path.file_stem().unwrap().to_string_lossy());
            assert!(plot_report(&report, &svg).unwrap(), "{} has no figure", path.display());
            let texts = svg_texts(&svg);
            let expected = if report["scenario"] == "soak" {
                "left on purpose"
            } else if report["scenario"] == "streams-10k" {
                "streams running"
            } else if report["scenario"] == "upgrade" {
                "errors"
            } else if report["scenario"] == "tenants" {
                "calm alone"
            } else if report.get("total_executions").is_some() {
                "request_head"
            } else if report["scenario"] == "real-failover" {
                "completions, affected"
            } else if report.get("agreement").is_some() {
                "prefix (exact)"
            } else if report.get("throughput").is_some() {
                "lmstack-2-engines"
            } else if report.get("cells").is_some() || report.get("variants").is_some() {
                "prefix"
            } else {
                "two_replicas_shared"
            };
            assert!(
                texts.iter().any(|t| t == expected),
                "{expected:?} missing in {}",
                svg.display()
            );
            drawn += 1;
        }
        assert!(drawn >= 3, "only {drawn} results under {}", dir.display());
    }

    #[test]
    fn affinity_memory_draws_the_bound_the_table_and_the_growth() {
        let report = json!({"prompts": 1000000, "blocks_per_prompt": 32, "max_bytes": 64 << 20,
                            "table_bytes": 63 << 20, "growth": 64 << 20, "entries": 1, "capacity": 1});
        let svg = temp_svg("affinity-memory");
        assert!(plot_report(&report, &svg).unwrap());
        let texts = svg_texts(&svg);
        for label in ["configured bound", "table", "RSS growth", "64.0", "63.0"] {
            assert!(texts.iter().any(|t| t == label), "{label:?} missing from {texts:?}");
        }
    }

    #[test]
    fn a_report_of_no_scenario_has_no_figure() {
        assert!(!plot_report(&json!({"results": {}}), &temp_svg("none")).unwrap());
    }
}
