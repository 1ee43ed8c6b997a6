//! `cargo xtask perf`: lmstack's benchmarks. Scenarios:
//!
//! - `proxy`: what lmstack adds to a request against a direct connection and nginx
//!   (throughput, latency, streaming time to first byte, CPU per request).
//! - `multi-round`: the multi-round QA workload against simulated engines with tight KV
//!   caches, per routing policy, with one big engine as the reference for hit rate.
//! - `affinity-memory`: the prefix affinity table's resident memory under 10^6 prompts.
//! - `replicas`: two routers behind one lmstack-control on the multi-round workload: how
//!   often they agree on where a conversation lives, against one router alone.
//!
//! Each prints its tables and writes JSON under target/perf/ (or `--out`).

mod memory;
mod multiround;
mod proxy;
mod replicas;

use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use anyhow::bail;
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
    /// proxy, affinity-memory and multi-round.
    All,
}

#[derive(Args)]
pub struct PerfArgs {
    /// Which benchmark to run.
    #[arg(long, value_enum, default_value = "all")]
    scenario: Scenario,
    /// Directory for the JSON results (default: target/perf).
    #[arg(long)]
    out: Option<PathBuf>,
    #[command(flatten)]
    proxy: proxy::ProxyArgs,
    #[command(flatten)]
    multi_round: multiround::MultiRoundArgs,
    #[command(flatten)]
    replicas: replicas::ReplicasArgs,
}

pub fn run(args: &PerfArgs) -> anyhow::Result<()> {
    let bins = build_bins(true)?;
    let work = root().join("target/perf");
    let out = args.out.clone().unwrap_or_else(|| work.clone());
    std::fs::create_dir_all(&work)?;
    std::fs::create_dir_all(&out)?;
    let when = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let save = |name: &str, mut report: Value| -> anyhow::Result<()> {
        report["environment"] = environment(when);
        let path = out.join(format!("{name}-{when}.json"));
        std::fs::write(&path, serde_json::to_string_pretty(&report)?)?;
        println!("\nresults: {}", path.display());
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
    Ok(())
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
