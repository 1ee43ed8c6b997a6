//! `cargo xtask`: everything in lmstack that is not plain cargo.
//!
//! - `demo`: the router in front of simulated engines, with sample traffic.
//! - `test`: what CI runs: formatting, lints and every test.
//! - `perf`: the latency and throughput benchmark against nginx, results under perf/results.
//! - `real-vllm`: an opt-in compatibility check against real vLLM engines on CPU.
//! - `real-kv`: exact KV routing against real vLLM engines (agreement, hit rates, restarts).
//! - `real-failover`: an engine killed mid-stream under real vLLM engines, continuations
//!   checked stream by stream.
//! - `ebpf`: installs the BPF tool chain and builds lmstack-agent with its probes.
//! - `fuzz`: the fuzz targets in fuzz/ under libFuzzer (installs nightly and cargo-fuzz).

mod demo;
mod ebpf;
mod fuzz;
mod perf;
mod real_failover;
mod real_kv;
mod real_vllm;
mod test;

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, bail};
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "cargo xtask", about = "lmstack's development tasks")]
struct Cli {
    #[command(subcommand)]
    task: Task,
}

#[derive(Subcommand)]
enum Task {
    /// Run the router in front of simulated engines, send sample traffic, print URLs to try.
    Demo(demo::DemoArgs),
    /// Formatting, lints and all tests (what CI runs).
    Test(test::TestArgs),
    /// Benchmark lmstack against a direct connection and nginx; write perf/results/.
    Perf(perf::PerfArgs),
    /// Check compatibility against real vLLM engines on CPU (opt-in; downloads ~3 GB once).
    RealVllm(real_vllm::RealVllmArgs),
    /// Exact KV routing against real vLLM engines with KV events: agreement with what the
    /// engines report storing, engine-side hit rates per policy, restart detection (opt-in).
    RealKv(real_kv::RealKvArgs),
    /// An engine killed mid-stream under two real vLLM engines: lmstack's continuations
    /// checked stream by stream against the engines' own answers (opt-in, minutes).
    RealFailover(real_failover::RealFailoverArgs),
    /// Install the eBPF tool chain (LLVM 22, rust-src, bpf-linker) and build lmstack-agent.
    Ebpf(ebpf::EbpfArgs),
    /// Run the fuzz targets in fuzz/ with libFuzzer (nightly and cargo-fuzz installed when
    /// missing); a failing input makes it exit non-zero and names its file.
    Fuzz(fuzz::FuzzArgs),
}

fn main() -> anyhow::Result<()> {
    match Cli::parse().task {
        Task::Demo(a) => demo::run(&a),
        Task::Test(a) => test::run(&a),
        Task::Perf(a) => perf::run(&a),
        Task::RealVllm(a) => real_vllm::run(&a),
        Task::RealKv(a) => real_kv::run(&a),
        Task::RealFailover(a) => real_failover::run(&a),
        Task::Ebpf(a) => ebpf::run(&a),
        Task::Fuzz(a) => fuzz::run(&a),
    }
}

pub fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_else(|| PathBuf::from("."))
}

pub fn cargo() -> Command {
    let mut c = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()));
    c.current_dir(root());
    c
}

/// Runs a command, failing with its description if it fails.
pub fn run_cmd(cmd: &mut Command) -> anyhow::Result<()> {
    let desc = format!("{cmd:?}");
    eprintln!("$ {desc}");
    let status = cmd.status().with_context(|| format!("starting {desc}"))?;
    if !status.success() {
        bail!("{desc} failed with {status}");
    }
    Ok(())
}

/// Starts the router from `bins` on 127.0.0.1:`port` (0: any) over `backends`, with `extra`
/// flags.
pub fn start_router(bins: &Path, port: u16, backends: &[String], extra: &[&str]) -> lmstack_e2e::Proc {
    let port = port.to_string();
    let list = backends.join(",");
    let mut args = lmstack_e2e::args(&["--host", "127.0.0.1", "--port", &port, "--static-backends", &list]);
    args.extend(lmstack_e2e::args(extra));
    lmstack_e2e::Proc::start(&bins.join("lmstack"), &args, &[])
}

/// Builds the binaries with `profile` and returns their directory.
pub fn build_bins(release: bool) -> anyhow::Result<PathBuf> {
    let mut cmd = cargo();
    cmd.args(["build", "--bins"]);
    for package in lmstack_e2e::BINARY_PACKAGES {
        cmd.args(["-p", package]);
    }
    if release {
        cmd.arg("--release");
    }
    run_cmd(&mut cmd)?;
    Ok(target_dir().join(if release { "release" } else { "debug" }))
}

/// Cargo's target directory.
pub fn target_dir() -> PathBuf {
    std::env::var("CARGO_TARGET_DIR").map_or_else(|_| root().join("target"), PathBuf::from)
}
