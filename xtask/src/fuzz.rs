//! `cargo xtask fuzz`: builds the fuzz targets in fuzz/ (cargo-fuzz on the nightly toolchain,
//! both installed here when missing) and runs each with libFuzzer for a time or a number of
//! executions, reporting executions, speed, corpus and crashes per target (`--out`: as JSON).
//! `cargo xtask test` runs every target briefly through [`smoke`].
//!
//! It is not where properties live (fuzz/fuzz_targets/, one file per parser) nor a corpus
//! manager: seeds are checked in under fuzz/corpus/<target>/ and only read; what a run adds
//! goes to target/fuzz/corpus/<target>/, crashes to fuzz/artifacts/<target>/ (both ignored).
//! The build is kept outside the checkout ([`target_dir`]), shared by every clone.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Instant;

use anyhow::{Context, bail};
use clap::{Args, ValueEnum};
use serde_json::{Value, json};

use crate::{root, run_cmd};

/// cargo-fuzz, pinned so that every machine builds the targets the same way.
const CARGO_FUZZ_VERSION: &str = "0.13.2";
/// Seconds per target in `cargo xtask test`.
const SMOKE_SECONDS: u64 = 5;
/// A single input running longer than this is a finding (libFuzzer's `-timeout`).
const INPUT_TIMEOUT_S: u64 = 10;

#[derive(Args)]
pub struct FuzzArgs {
    /// Fuzz only this target (repeatable); by default every file in fuzz/fuzz_targets/.
    #[arg(long = "target", value_name = "NAME")]
    targets: Vec<String>,
    /// Seconds to fuzz each target (60 when neither this nor --runs is given).
    #[arg(long, conflicts_with = "runs")]
    seconds: Option<u64>,
    /// Executions per target, instead of a time.
    #[arg(long)]
    runs: Option<u64>,
    /// Processes per target (libFuzzer's -fork=J); 1 fuzzs in one process.
    #[arg(long, default_value_t = 1)]
    jobs: u32,
    /// Sanitizer to build with. `none` (the default) is enough for lmstack's own code, which
    /// has no `unsafe` in the crates fuzzed (lmstack-http, lmstack-kv, lmstack-snapshot):
    /// panics, failed properties, overflows (debug assertions are on) and timeouts are caught
    /// either way. `address` adds AddressSanitizer, for unsafe code in dependencies, at
    /// about a third of the speed.
    #[arg(long, value_enum, default_value_t = Sanitizer::None)]
    sanitizer: Sanitizer,
    /// Build without optimisations: about half the build time, several times fewer
    /// executions a second (what `cargo xtask test` uses for its few seconds a target).
    #[arg(long)]
    dev: bool,
    /// Start from the seeds alone (in target/fuzz/smoke/, emptied first), not from the corpus
    /// earlier runs grew in target/fuzz/corpus/ (what `cargo xtask test` does).
    #[arg(long)]
    seeds_only: bool,
    /// Write the results (per target: executions, seconds, executions per second, corpus
    /// size, coverage, crashes) to this JSON file.
    #[arg(long)]
    out: Option<PathBuf>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Sanitizer {
    None,
    Address,
}

impl Sanitizer {
    fn name(self) -> &'static str {
        match self {
            Sanitizer::None => "none",
            Sanitizer::Address => "address",
        }
    }
}

/// How long each target runs.
#[derive(Clone, Copy, Debug)]
enum Budget {
    Seconds(u64),
    Runs(u64),
}

/// How the targets are built and run.
#[derive(Clone, Copy, Debug)]
struct Plan {
    budget: Budget,
    jobs: u32,
    sanitizer: Sanitizer,
    dev: bool,
    /// Start from the seeds alone, in a corpus emptied first (target/fuzz/smoke/<target>),
    /// rather than the one runs grow (target/fuzz/corpus/<target>): a brief run stays brief
    /// however far earlier runs grew it.
    seeds_only: bool,
}

pub fn run(args: &FuzzArgs) -> anyhow::Result<()> {
    let all = targets()?;
    let chosen = if args.targets.is_empty() {
        all
    } else {
        for t in &args.targets {
            anyhow::ensure!(all.contains(t), "no fuzz target {t}; there are: {}", all.join(", "));
        }
        args.targets.clone()
    };
    let budget = match (args.seconds, args.runs) {
        (_, Some(n)) => Budget::Runs(n),
        (s, None) => Budget::Seconds(s.unwrap_or(60)),
    };
    anyhow::ensure!(args.jobs >= 1, "--jobs must be at least 1");
    let plan = Plan {
        budget,
        jobs: args.jobs,
        sanitizer: args.sanitizer,
        dev: args.dev,
        seeds_only: args.seeds_only,
    };
    let results = fuzz(&chosen, plan)?;
    if let Some(out) = &args.out {
        let report = report(&results, budget, args)?;
        std::fs::write(out, serde_json::to_string_pretty(&report)? + "\n")
            .with_context(|| format!("writing {}", out.display()))?;
        let svg = out.with_extension("svg");
        let (title, columns, panels) = figure(&report);
        crate::perf::plot::figure(&svg, &title, columns, &panels)?;
        eprintln!("results written to {} and {}", out.display(), svg.display());
    }
    fail_on_crashes(&results)
}

/// Every target for a few seconds from its seeds, without sanitizer and unoptimised (the
/// build is most of the time this takes): what `cargo xtask test` runs, as
/// `cargo xtask fuzz --dev --seeds-only --seconds 5` would.
pub fn smoke() -> anyhow::Result<()> {
    let plan = Plan {
        budget: Budget::Seconds(SMOKE_SECONDS),
        jobs: 1,
        sanitizer: Sanitizer::None,
        dev: true,
        seeds_only: true,
    };
    let results = fuzz(&targets()?, plan)?;
    fail_on_crashes(&results)
}

/// The targets: fuzz/fuzz_targets/*.rs, by file name.
fn targets() -> anyhow::Result<Vec<String>> {
    let dir = root().join("fuzz/fuzz_targets");
    let mut names = Vec::new();
    for entry in std::fs::read_dir(&dir).with_context(|| format!("reading {}", dir.display()))? {
        let path = entry?.path();
        if path.extension().is_some_and(|e| e == "rs")
            && let Some(stem) = path.file_stem()
        {
            names.push(stem.to_string_lossy().into_owned());
        }
    }
    names.sort();
    Ok(names)
}

/// What one target's run gave.
struct Outcome {
    name: String,
    executions: u64,
    seconds: f64,
    corpus_files: usize,
    seed_files: usize,
    coverage: Option<u64>,
    crashes: Vec<PathBuf>,
    exit_code: Option<i32>,
    log: PathBuf,
}

fn fuzz(targets: &[String], plan: Plan) -> anyhow::Result<Vec<Outcome>> {
    let started = Instant::now();
    ensure_nightly()?;
    ensure_cargo_fuzz()?;
    let bins = build(plan.sanitizer, plan.dev)?;
    eprintln!("fuzz targets built in {:.0} s", started.elapsed().as_secs_f64());
    let mut results = Vec::new();
    for name in targets {
        let outcome = fuzz_one(&bins, name, plan)?;
        eprintln!(
            "fuzz {name}: {} executions in {:.0} s ({:.0}/s), corpus {} files, {} crash(es)",
            outcome.executions,
            outcome.seconds,
            outcome.executions as f64 / outcome.seconds.max(1e-9),
            outcome.corpus_files,
            outcome.crashes.len()
        );
        results.push(outcome);
    }
    Ok(results)
}

/// The nightly toolchain cargo-fuzz needs (`-Z` flags, sanitizer coverage).
fn ensure_nightly() -> anyhow::Result<()> {
    let have = nightly("rustc")
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if !have {
        run_cmd(Command::new("rustup").args(["toolchain", "install", "nightly", "--profile", "minimal"]))?;
    }
    Ok(())
}

fn ensure_cargo_fuzz() -> anyhow::Result<()> {
    let have = nightly("cargo")
        .args(["fuzz", "--version"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if !have {
        // Built with the stable toolchain; it runs cargo on nightly itself.
        run_cmd(crate::cargo().args(["install", "cargo-fuzz", "--locked", "--version", CARGO_FUZZ_VERSION]))?;
    }
    Ok(())
}

/// `program` run through rustup on nightly, with cargo's and rustup's choices for this
/// (stable) process taken out of its environment.
fn nightly(program: &str) -> Command {
    let mut cmd = Command::new("rustup");
    cmd.args(["run", "nightly", program]);
    cmd.current_dir(root())
        .env("PATH", crate::ebpf::path_with_cargo_bin())
        .env_remove("CARGO")
        .env_remove("RUSTC")
        .env_remove("RUSTDOC")
        .env_remove("RUSTUP_TOOLCHAIN")
        .env_remove("CARGO_TARGET_DIR");
    cmd
}

/// The build directory, one per sanitizer, shared by every target, every run (`cargo xtask
/// test` and `cargo xtask fuzz` alike) and every checkout on the machine, so that the
/// dependencies (tokenizers, minijinja, libFuzzer itself: minutes on two cores) are built once
/// per machine rather than per clone, as CI's fresh clone would: `$LMSTACK_FUZZ_TARGET_DIR`,
/// else `~/.cache/lmstack/fuzz-target` (`$XDG_CACHE_HOME` if set), else target/fuzz.
fn target_dir(sanitizer: Sanitizer) -> PathBuf {
    let env = |name: &str| std::env::var_os(name).filter(|v| !v.is_empty()).map(PathBuf::from);
    let base = env("LMSTACK_FUZZ_TARGET_DIR")
        .or_else(|| env("XDG_CACHE_HOME").map(|d| d.join("lmstack/fuzz-target")))
        .or_else(|| env("HOME").map(|d| d.join(".cache/lmstack/fuzz-target")))
        .unwrap_or_else(|| crate::target_dir().join("fuzz"));
    base.join(sanitizer.name())
}

/// Builds every target (one cargo invocation) and returns the directory of the binaries.
/// Both profiles keep debug assertions and overflow checks (cargo-fuzz's default).
fn build(sanitizer: Sanitizer, dev: bool) -> anyhow::Result<PathBuf> {
    let dir = target_dir(sanitizer);
    let mut cmd = nightly("cargo");
    cmd.args(["fuzz", "build", "--sanitizer", sanitizer.name(), "--target-dir"])
        .arg(&dir);
    if dev {
        cmd.arg("--dev");
    }
    run_cmd(&mut cmd)?;
    Ok(dir.join(host_triple()?).join(if dev { "debug" } else { "release" }))
}

fn host_triple() -> anyhow::Result<String> {
    let out = nightly("rustc").arg("-vV").output()?;
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .find_map(|l| l.strip_prefix("host: ").map(str::to_owned))
        .context("rustc -vV names no host")
}

fn fuzz_one(bins: &Path, name: &str, plan: Plan) -> anyhow::Result<Outcome> {
    let seeds = root().join("fuzz/corpus").join(name);
    let grown = crate::target_dir()
        .join(if plan.seeds_only { "fuzz/smoke" } else { "fuzz/corpus" })
        .join(name);
    if plan.seeds_only && grown.exists() {
        std::fs::remove_dir_all(&grown).with_context(|| format!("emptying {}", grown.display()))?;
    }
    let artifacts = root().join("fuzz/artifacts").join(name);
    let logs = crate::target_dir().join("fuzz/logs");
    for dir in [&seeds, &grown, &artifacts, &logs] {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    let log = logs.join(format!("{name}.log"));
    let mut cmd = Command::new(bins.join(name));
    match plan.budget {
        Budget::Seconds(s) => cmd.arg(format!("-max_total_time={s}")),
        Budget::Runs(n) => cmd.arg(format!("-runs={n}")),
    };
    if plan.jobs > 1 {
        cmd.arg(format!("-fork={}", plan.jobs));
    }
    // New inputs go to the first corpus directory: the grown one, never the seeds.
    cmd.arg(format!("-timeout={INPUT_TIMEOUT_S}"))
        .arg("-print_final_stats=1")
        .arg(format!("-artifact_prefix={}/", artifacts.display()))
        .arg(&grown)
        .arg(&seeds)
        .current_dir(root())
        .stdin(Stdio::null());
    let file = File::create(&log).with_context(|| format!("creating {}", log.display()))?;
    cmd.stdout(file.try_clone()?).stderr(file);
    eprintln!("$ {cmd:?} 2> {}", log.display());
    let started = Instant::now();
    let status = cmd.status().with_context(|| format!("starting fuzz target {name}"))?;
    let seconds = started.elapsed().as_secs_f64();
    let text = std::fs::read_to_string(&log).unwrap_or_default();
    let mut crashes: Vec<PathBuf> = text
        .lines()
        .filter_map(|l| l.split("Test unit written to ").nth(1))
        .map(|p| root().join(p.trim()))
        .collect();
    crashes.dedup();
    if !status.success() && crashes.is_empty() {
        bail!(
            "fuzz target {name} failed ({status}) without writing a test case; see {}",
            log.display()
        );
    }
    Ok(Outcome {
        name: name.to_owned(),
        executions: executions(&text).unwrap_or(0),
        seconds,
        corpus_files: count_files(&grown) + count_files(&seeds),
        seed_files: count_files(&seeds),
        coverage: last_stat(&text, "cov:"),
        crashes,
        exit_code: status.code(),
        log,
    })
}

/// Executions, from `-print_final_stats` (one process) or the last status line (`-fork`).
fn executions(log: &str) -> Option<u64> {
    let stat = log
        .lines()
        .find_map(|l| l.strip_prefix("stat::number_of_executed_units:"))
        .and_then(|n| n.trim().parse().ok());
    stat.or_else(|| {
        log.lines()
            .rev()
            .filter_map(|l| l.strip_prefix('#'))
            .find_map(|l| l.split(|c: char| !c.is_ascii_digit()).next()?.parse().ok())
    })
}

/// The number after `key` on the last status line that has it (e.g. `cov:`).
fn last_stat(log: &str, key: &str) -> Option<u64> {
    log.lines().rev().find_map(|l| {
        let mut words = l.split_whitespace();
        words.find(|w| *w == key)?;
        words.next()?.parse().ok()
    })
}

fn count_files(dir: &Path) -> usize {
    std::fs::read_dir(dir).map_or(0, |d| {
        d.filter(|e| e.as_ref().is_ok_and(|e| e.path().is_file())).count()
    })
}

fn fail_on_crashes(results: &[Outcome]) -> anyhow::Result<()> {
    let failed: Vec<&Outcome> = results.iter().filter(|o| !o.crashes.is_empty()).collect();
    if failed.is_empty() {
        return Ok(());
    }
    for o in &failed {
        eprintln!("fuzz target {} failed (log: {}):", o.name, o.log.display());
        for c in &o.crashes {
            eprintln!(
                "  {}\n  reproduce: cargo +nightly fuzz run --sanitizer none {} {}",
                c.display(),
                o.name,
                c.display()
            );
        }
    }
    bail!("{} fuzz target(s) found a failing input", failed.len())
}

fn report(results: &[Outcome], budget: Budget, args: &FuzzArgs) -> anyhow::Result<Value> {
    let version = |cmd: &mut Command| {
        cmd.output()
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
            .unwrap_or_default()
    };
    let targets: Vec<Value> = results
        .iter()
        .map(|o| {
            json!({
                "name": o.name,
                "executions": o.executions,
                "seconds": (o.seconds * 10.0).round() / 10.0,
                "exec_per_s": (o.executions as f64 / o.seconds.max(1e-9)).round(),
                "corpus_files": o.corpus_files,
                "seed_files": o.seed_files,
                "coverage_edges": o.coverage,
                "crashes": o.crashes.iter().map(|c| c.display().to_string()).collect::<Vec<_>>(),
                "exit_code": o.exit_code,
            })
        })
        .collect();
    let (seconds, runs) = match budget {
        Budget::Seconds(s) => (Some(s), None),
        Budget::Runs(n) => (None, Some(n)),
    };
    Ok(json!({
        "what": "cargo xtask fuzz: libFuzzer over fuzz/fuzz_targets, seeds from fuzz/corpus",
        "unix_time": std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH)?.as_secs(),
        "machine": {
            "cpus": std::thread::available_parallelism().map_or(0, usize::from),
            "kernel": version(Command::new("uname").arg("-r")),
        },
        "toolchain": version(nightly("rustc").arg("--version")),
        "cargo_fuzz": version(nightly("cargo").args(["fuzz", "--version"])),
        "sanitizer": args.sanitizer.name(),
        "profile": if args.dev { "dev" } else { "release, debug assertions" },
        "jobs": args.jobs,
        "seconds_per_target": seconds,
        "runs_per_target": runs,
        "total_executions": results.iter().map(|o| o.executions).sum::<u64>(),
        "targets": targets,
    }))
}

/// The figure of a results file (`cargo xtask perf --replot` draws it too): executions and
/// speed per target.
pub fn figure(report: &Value) -> (String, usize, Vec<crate::perf::plot::Panel>) {
    use crate::perf::plot::{Panel, Series};
    let targets = report["targets"].as_array().cloned().unwrap_or_default();
    let names: Vec<String> = targets
        .iter()
        .map(|t| t["name"].as_str().unwrap_or("?").to_owned())
        .collect();
    let per_target = |key: &str, scale: f64| targets.iter().map(|t| t[key].as_f64().unwrap_or(0.0) / scale).collect();
    let panels = vec![
        Panel::Bars {
            title: "executions per target".into(),
            y_label: "millions".into(),
            categories: names.clone(),
            series: vec![Series::new("executions", per_target("executions", 1e6))],
        },
        Panel::Bars {
            title: "speed".into(),
            y_label: "thousand executions / s".into(),
            categories: names,
            series: vec![Series::new("exec/s", per_target("exec_per_s", 1e3))],
        },
    ];
    let crashes: usize = targets
        .iter()
        .map(|t| t["crashes"].as_array().map_or(0, Vec::len))
        .sum();
    let title = format!(
        "fuzzing: {:.1} million executions, {crashes} failing input(s) (sanitizer {})",
        report["total_executions"].as_f64().unwrap_or(0.0) / 1e6,
        report["sanitizer"].as_str().unwrap_or("?")
    );
    (title, 2, panels)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_executions_and_coverage_from_libfuzzer_logs() {
        let one_process = "#1048576\tpulse  cov: 692 ft: 2347 corp: 846/190Kb exec/s: 92409 rss: 28Mb\n\
            Done 924450 runs in 11 second(s)\n\
            stat::number_of_executed_units: 924450\n\
            stat::average_exec_per_sec:     92445\n";
        assert_eq!(executions(one_process), Some(924_450));
        assert_eq!(last_stat(one_process, "cov:"), Some(692));
        let forked = "#4096: cov: 10 ft: 20 corp: 3 exec/s: 100 oom/timeout/crash: 0/0/0 time: 1s job: 1\n\
            #812345: cov: 12 ft: 25 corp: 4 exec/s: 900 oom/timeout/crash: 0/0/0 time: 9s job: 5\n\
            INFO: exiting: 0 time: 10s\n";
        assert_eq!(executions(forked), Some(812_345));
        assert_eq!(last_stat(forked, "cov:"), Some(12));
    }

    #[test]
    fn every_target_has_a_bin_and_seeds() {
        let manifest = std::fs::read_to_string(root().join("fuzz/Cargo.toml")).unwrap();
        for name in targets().unwrap() {
            assert!(
                manifest.contains(&format!("path = \"fuzz_targets/{name}.rs\"")),
                "fuzz/Cargo.toml has no [[bin]] for {name}"
            );
            assert!(
                count_files(&root().join("fuzz/corpus").join(&name)) > 0,
                "no seeds for {name}"
            );
        }
    }
}
