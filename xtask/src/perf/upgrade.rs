//! `cargo xtask perf --scenario upgrade`: the zero-downtime upgrade, under load. Clients must
//! see no failed request while the router is replaced by a new process on the same port.
//!
//! The procedure under test (README, "Upgrading without downtime"): start the new lmstack
//! with `--takeover` on the same port (SO_REUSEPORT: both accept), wait until it answers
//! `/health`, send SIGTERM to the old one, which stops listening at once, closes its idle
//! client connections, answers what it has in flight with `connection: close`, and exits
//! when its last connection closes.
//!
//! Here: two simulated engines (`--upgrade-decode-ms` a token), the release router
//! (`--upgrade-workers` workers) on a fixed port, and `lmstack-load mixed` over
//! `--upgrade-concurrency` keep-alive connections sending completions, streams and chats
//! (`--upgrade-mix`), each checked (a stream must end with `[DONE]`). Every
//! `--upgrade-every-s` the router is replaced, `--upgrade-count` times. "Answers /health" is
//! checked through the shared port: 20 fresh connections in a row answered 200 (the kernel
//! spreads new connections over both processes' listeners, so the new one took some).
//!
//! Linux moves connections still queued in a closed listener's accept queue to another
//! listener of the port only with `net.ipv4.tcp_migrate_req=1`; without it they are reset.
//! As root the scenario runs twice: with it set (the old value restored after) and without;
//! otherwise once, with the system's value. The run with it set (or the only run) must have
//! no failed request; failures without it are reported, not fatal.
//!
//! The figure (`figure`): per run, requests finished a second and errors a second, with the
//! upgrades' moments in the title; and failures per run.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::Context;
use clap::Args;
use lmstack_e2e::Proc;
use serde_json::{Value, json};

use super::plot::{Panel, Series};
use super::procstat::unix_ms;
use super::progress::Progress;
use super::soak::{mixed_command, mixed_summary, quick_engine, start_sims};
use super::timeline::TimeAxis;
use super::wait_ready;
use crate::start_router;

const MIGRATE_REQ: &str = "/proc/sys/net/ipv4/tcp_migrate_req";

#[derive(Args)]
pub struct UpgradeArgs {
    /// upgrade: client connections.
    #[arg(id = "upgrade-concurrency", long = "upgrade-concurrency", default_value_t = 32)]
    concurrency: usize,
    /// upgrade: router replacements per run.
    #[arg(id = "upgrade-count", long = "upgrade-count", default_value_t = 3)]
    count: usize,
    /// upgrade: seconds between replacements (and before the first, and after the last).
    #[arg(id = "upgrade-every-s", long = "upgrade-every-s", default_value_t = 10.0)]
    every_s: f64,
    /// upgrade: the routers' worker threads.
    #[arg(id = "upgrade-workers", long = "upgrade-workers", default_value_t = 2)]
    workers: usize,
    /// upgrade: shares of each kind of request (lmstack-load mixed --mix).
    #[arg(
        id = "upgrade-mix",
        long = "upgrade-mix",
        default_value = "completions=1,stream=1,chat=1,leave=1"
    )]
    mix: String,
    /// upgrade: `max_tokens` of every request.
    #[arg(id = "upgrade-max-tokens", long = "upgrade-max-tokens", default_value_t = 16)]
    max_tokens: usize,
    /// upgrade: the engines' time per output token, ms.
    #[arg(id = "upgrade-decode-ms", long = "upgrade-decode-ms", default_value_t = 5.0)]
    decode_ms: f64,
    /// upgrade: only the run with the system's tcp_migrate_req (no second run without it).
    #[arg(id = "upgrade-one-run", long = "upgrade-one-run")]
    one_run: bool,
}

fn read_migrate() -> Option<String> {
    std::fs::read_to_string(MIGRATE_REQ).ok().map(|s| s.trim().to_owned())
}

/// Sets tcp_migrate_req; false where it cannot be (no root, or the kernel lacks it).
fn write_migrate(value: &str) -> bool {
    std::fs::write(MIGRATE_REQ, value).is_ok() && read_migrate().as_deref() == Some(value)
}

/// `GET /health` on a fresh connection (which the kernel may give either process): the status.
fn health_on_fresh_connection(addr: std::net::SocketAddr) -> Option<u16> {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(2)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
    s.write_all(b"GET /health HTTP/1.1\r\nhost: upgrade\r\nconnection: close\r\n\r\n")
        .ok()?;
    let mut head = [0u8; 12];
    s.read_exact(&mut head).ok()?;
    std::str::from_utf8(&head[9..12]).ok()?.parse().ok()
}

/// Waits until `in_a_row` fresh connections in a row answer `/health` with 200.
fn wait_both_answer(addr: std::net::SocketAddr, in_a_row: usize) -> anyhow::Result<usize> {
    let start = Instant::now();
    let (mut streak, mut tries) = (0, 0);
    while streak < in_a_row {
        anyhow::ensure!(
            start.elapsed() < Duration::from_secs(30),
            "the new router never answered /health on the shared port"
        );
        tries += 1;
        if health_on_fresh_connection(addr) == Some(200) {
            streak += 1;
        } else {
            streak = 0;
            std::thread::sleep(Duration::from_millis(20));
        }
    }
    Ok(tries)
}

pub fn run(bins: &Path, args: &UpgradeArgs) -> anyhow::Result<Value> {
    let old = read_migrate();
    let root = {
        // SAFETY: geteuid has no preconditions.
        unsafe { libc::geteuid() == 0 }
    };
    let plans: Vec<(String, Option<&str>)> = match &old {
        Some(_) if root && !args.one_run => vec![
            ("tcp_migrate_req=1".into(), Some("1")),
            ("tcp_migrate_req=0".into(), Some("0")),
        ],
        Some(v) if root => vec![(format!("tcp_migrate_req={v}"), None)],
        Some(v) => vec![(format!("tcp_migrate_req={v} (not root: left as it is)"), None)],
        None => vec![("tcp_migrate_req absent".into(), None)],
    };
    let progress = Progress::new("upgrade", (plans.len() * (args.count + 1)) as u64);
    let mut runs = Vec::new();
    let mut failures = Vec::new();
    for (i, (label, value)) in plans.iter().enumerate() {
        let set = match value {
            Some(v) => write_migrate(v),
            None => false,
        };
        let result = one_run(bins, args, &progress, label);
        if set && let Some(v) = &old {
            write_migrate(v);
        }
        let mut run = result?;
        run["label"] = json!(label);
        run["tcp_migrate_req"] = json!(read_migrate_during(value, set, &old));
        run["tcp_migrate_req_set_by_scenario"] = json!(set);
        // The run that must be clean: the one with tcp_migrate_req=1, or the only one.
        let must_be_clean = i == 0;
        run["must_have_no_failures"] = json!(must_be_clean);
        let errors = run["load"]["errors"].as_u64().unwrap_or(0);
        if must_be_clean && errors > 0 {
            failures.push(format!(
                "{label}: {errors} failed requests {}",
                run["load"]["error_kinds"]
            ));
        }
        for u in run["upgrades"].as_array().into_iter().flatten() {
            if u["old_exit"] != "exit status: 0" {
                failures.push(format!("{label}: an old router ended with {}", u["old_exit"]));
            }
        }
        runs.push(run);
    }
    progress.finish();
    let report = json!({
        "scenario": "upgrade",
        "settings": {
            "concurrency": args.concurrency, "upgrades_per_run": args.count, "every_s": args.every_s,
            "router_workers": args.workers, "mix": args.mix, "max_tokens": args.max_tokens,
            "decode_ms": args.decode_ms, "engines": 2, "root": root,
            "tcp_migrate_req_before": old,
        },
        "runs": runs,
        "passed": failures.is_empty(),
        "failures": failures,
    });
    print(&report);
    Ok(report)
}

/// The value in force during a run.
fn read_migrate_during(value: &Option<&str>, set: bool, old: &Option<String>) -> Option<String> {
    match value {
        Some(v) if set => Some((*v).to_owned()),
        _ => old.clone(),
    }
}

fn one_run(bins: &Path, args: &UpgradeArgs, progress: &Progress, label: &str) -> anyhow::Result<Value> {
    progress.step(format!("{label}: engines, the first router, the load"));
    let sims = start_sims(bins, "upgrade-e", 2, &quick_engine(args.decode_ms, 4096));
    let urls: Vec<String> = sims.iter().map(Proc::url).collect();
    let port = lmstack_e2e::free_port();
    let workers = args.workers.to_string();
    let router = |takeover: bool| {
        let mut extra = vec!["--log-level", "info", "--workers", workers.as_str()];
        if takeover {
            extra.push("--takeover");
        }
        start_router(bins, port, &urls, &extra)
    };
    let mut current = router(false);
    wait_ready(&current.url())?;
    let addr = current.addr;
    let duration = args.every_s * (args.count + 1) as f64;
    let load = mixed_command(
        bins,
        &current.url(),
        &lmstack_e2e::args(&[
            "--mix",
            &args.mix,
            "--duration-s",
            &duration.to_string(),
            "--concurrency",
            &args.concurrency.to_string(),
            "--max-tokens",
            &args.max_tokens.to_string(),
            "--request-timeout-s",
            "60",
            "--label",
            label,
        ]),
    )
    .spawn()
    .context("starting lmstack-load")?;
    let started = Instant::now();
    let started_ms = unix_ms();
    let mut upgrades = Vec::new();
    for k in 1..=args.count {
        let at = Duration::from_secs_f64(args.every_s * k as f64);
        if let Some(wait) = at.checked_sub(started.elapsed()) {
            std::thread::sleep(wait);
        }
        progress.step(format!("{label}: upgrade {k} of {}", args.count));
        let spawned_ms = unix_ms();
        let next = router(true);
        let listening_ms = unix_ms();
        let tries = wait_both_answer(addr, 20)?;
        let ready_ms = unix_ms();
        let old_log = current.log.clone();
        let old = std::mem::replace(&mut current, next);
        let sigterm_ms = unix_ms();
        let status = old.terminate();
        let exited_ms = unix_ms();
        let log = std::fs::read_to_string(&old_log).unwrap_or_default();
        let notes: Vec<&str> = log
            .lines()
            .filter(|l| l.contains("WARN") || l.contains("ERROR") || l.contains("grace"))
            .take(10)
            .collect();
        let s = |ms: u64| (ms as f64 - started_ms as f64) / 1000.0;
        upgrades.push(json!({
            "spawned_s": s(spawned_ms), "listening_s": s(listening_ms), "ready_s": s(ready_ms),
            "health_checks": tries, "sigterm_s": s(sigterm_ms), "old_exited_s": s(exited_ms),
            "drain_ms": exited_ms - sigterm_ms, "old_exit": status.to_string(), "old_log": notes,
        }));
    }
    let load = mixed_summary(load)?;
    drop(current);
    drop(sims);
    // The load's clock: its first request, against ours.
    let offset = (load["started_unix_ms"].as_f64().unwrap_or(started_ms as f64) - started_ms as f64) / 1000.0;
    Ok(json!({
        "load": load,
        "upgrades": upgrades,
        "load_started_after_s": offset,
    }))
}

fn print(report: &Value) {
    println!(
        "\nupgrade: {} connections, a router replaced {} times per run, {} s apart",
        report["settings"]["concurrency"], report["settings"]["upgrades_per_run"], report["settings"]["every_s"]
    );
    for run in report["runs"].as_array().into_iter().flatten() {
        let l = &run["load"];
        println!(
            "{:<24} {} requests, {} failed {}; connections opened {}, closed by `connection: close` {}, stale {}",
            run["label"].as_str().unwrap_or("?"),
            l["requests"],
            l["errors"],
            l["error_kinds"],
            l["connections"]["opened"],
            l["connections"]["closed_by_response"],
            l["connections"]["stale"],
        );
        for u in run["upgrades"].as_array().into_iter().flatten() {
            println!(
                "    new router at {:.1} s, answering {:.1} s, SIGTERM {:.1} s, old exited after {} ms ({})",
                u["spawned_s"].as_f64().unwrap_or(0.0),
                u["ready_s"].as_f64().unwrap_or(0.0),
                u["sigterm_s"].as_f64().unwrap_or(0.0),
                u["drain_ms"],
                u["old_exit"].as_str().unwrap_or("?")
            );
        }
    }
    println!(
        "{}",
        if report["passed"] == true {
            "no failed request where tcp_migrate_req was set".to_owned()
        } else {
            format!("FAILED: {}", report["failures"])
        }
    );
}

/// The figure of a report: title, panels a row, panels.
pub fn figure(report: &Value) -> (String, usize, Vec<Panel>) {
    let runs: Vec<&Value> = report["runs"]
        .as_array()
        .map(|a| a.iter().collect())
        .unwrap_or_default();
    let mut panels = Vec::new();
    for run in &runs {
        let timeline: Vec<&Value> = run["load"]["timeline"]
            .as_array()
            .map(|a| a.iter().collect())
            .unwrap_or_default();
        // Whole seconds of load: the last one, cut short by the end, is left out.
        let span = report["settings"]["every_s"].as_f64().unwrap_or(10.0)
            * (report["settings"]["upgrades_per_run"].as_f64().unwrap_or(1.0) + 1.0);
        let axis = TimeAxis::new(span.floor(), 60);
        let per_second = |k: &str| -> Vec<f64> {
            let points: Vec<(f64, f64)> = timeline
                .iter()
                .enumerate()
                .map(|(i, s)| (i as f64, s[k].as_f64().unwrap_or(0.0)))
                .collect();
            axis.values(&points)
        };
        let moments: Vec<String> = run["upgrades"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|u| format!("{:.0}", u["sigterm_s"].as_f64().unwrap_or(f64::NAN)))
            .collect();
        panels.push(Panel::Lines {
            title: format!(
                "{}: {} failed; SIGTERM at {} s",
                run["label"].as_str().unwrap_or("?"),
                run["load"]["errors"],
                moments.join(", ")
            ),
            y_label: format!("requests a second (x: {})", axis.unit()),
            points: axis.labels(),
            series: vec![
                Series::new("ok", per_second("ok")),
                Series::new("errors", per_second("errors")),
            ],
        });
    }
    let labels: Vec<String> = runs
        .iter()
        .map(|r| r["label"].as_str().unwrap_or("?").to_owned())
        .collect();
    // Failures per run, one series per kind of failure.
    let mut kinds: Vec<String> = runs
        .iter()
        .filter_map(|r| r["load"]["error_kinds"].as_object())
        .flat_map(|m| m.keys().cloned())
        .collect();
    kinds.sort();
    kinds.dedup();
    if kinds.is_empty() {
        kinds.push("any".into());
    }
    panels.push(Panel::Bars {
        title: format!("failed requests per run, by kind ({})", kinds.join(", ")),
        y_label: "requests".into(),
        categories: labels,
        series: kinds
            .iter()
            .map(|k| {
                let values = runs
                    .iter()
                    .map(|r| r["load"]["error_kinds"][k].as_f64().unwrap_or(0.0))
                    .collect();
                Series::new(k.clone(), values)
            })
            .collect(),
    });
    let s = &report["settings"];
    let title = format!(
        "upgrade: lmstack replaced {} times a run under load ({} connections, {}), old one drained",
        s["upgrades_per_run"],
        s["concurrency"],
        s["mix"].as_str().unwrap_or("?")
    );
    (title, 3, panels)
}
