//! `cargo xtask perf --scenario soak`: does the router hold its memory and file descriptors
//! flat over a million requests of every kind?
//!
//! The release router (`--soak-workers`, 1 by default) over two simulated engines that
//! answer quickly (no prefill time, `--soak-decode-ms` a token) takes `--requests` (10^6)
//! from `lmstack-load mixed` at `--soak-rate` requests a second over `--soak-concurrency`
//! connections: non-streaming completions, streaming completions, streaming chats and
//! clients that leave after two events (`--soak-mix`). Every response is checked by the
//! load generator (a finished stream must end with `[DONE]` and no error event); leaves are
//! counted apart from errors. The router's RSS and open file descriptors are sampled every
//! second from /proc.
//!
//! Reported: requests, errors, leaves; RSS and fds before the load, after the warm-up
//! (`--soak-warmup-s`), at the end of the load, their maximum, their least-squares slope
//! after the warm-up (KiB and fds a minute), and once the router is idle again (12 s after
//! the load: past the engine connections' pool idle timeout). Single samples move with the
//! connections open at that second, so the checks compare medians of the first and the last
//! minute after the warm-up. The run fails (after writing its results) when any request
//! failed, when RSS grew more than `--soak-max-rss-growth` (10%) from the first minute to the
//! last, or fds more than `--soak-max-fd-growth` (16), or when the idle router holds more
//! than that many fds beyond what it held before the load.
//!
//! The figure (`figure`): RSS and fds over time, requests a second by outcome, and the
//! requests of each kind.

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use anyhow::Context;
use clap::Args;
use lmstack_e2e::Proc;
use serde_json::{Value, json};

use super::plot::{Panel, Series};
use super::procstat::{Sample, Sampler, slope};
use super::progress::Progress;
use super::timeline::TimeAxis;
use super::wait_ready;
use crate::start_router;

#[derive(Args)]
pub struct SoakArgs {
    /// Soak: requests in all.
    #[arg(id = "requests", long = "requests", default_value_t = 1_000_000)]
    requests: u64,
    /// Soak: requests started per second.
    #[arg(id = "soak-rate", long = "soak-rate", default_value_t = 2000.0)]
    rate: f64,
    /// Soak: client connections.
    #[arg(id = "soak-concurrency", long = "soak-concurrency", default_value_t = 64)]
    concurrency: usize,
    /// Soak: the router's worker threads.
    #[arg(id = "soak-workers", long = "soak-workers", default_value_t = 1)]
    workers: usize,
    /// Soak: shares of each kind of request (lmstack-load mixed --mix).
    #[arg(
        id = "soak-mix",
        long = "soak-mix",
        default_value = "completions=4,stream=3,chat=2,leave=1"
    )]
    mix: String,
    /// Soak: `max_tokens` of completions, streams and chats (leaving clients ask 32 and leave
    /// after 2).
    #[arg(id = "soak-max-tokens", long = "soak-max-tokens", default_value_t = 8)]
    max_tokens: usize,
    /// Soak: the engines' time per output token, ms.
    #[arg(id = "soak-decode-ms", long = "soak-decode-ms", default_value_t = 1.0)]
    decode_ms: f64,
    /// Soak: seconds of load before the baseline is taken.
    #[arg(id = "soak-warmup-s", long = "soak-warmup-s", default_value_t = 30.0)]
    warmup_s: f64,
    /// Soak: most RSS growth allowed from the baseline to the end, as a fraction.
    #[arg(id = "soak-max-rss-growth", long = "soak-max-rss-growth", default_value_t = 0.10)]
    max_rss_growth: f64,
    /// Soak: most open file descriptors allowed above the baseline at the end.
    #[arg(id = "soak-max-fd-growth", long = "soak-max-fd-growth", default_value_t = 16)]
    max_fd_growth: u64,
}

/// Flags of an engine that answers at once but for `decode_ms` a token, holding `seqs`.
pub(super) fn quick_engine(decode_ms: f64, seqs: usize) -> Vec<String> {
    lmstack_e2e::args(&[
        "--prefill-base-ms",
        "0",
        "--prefill-us-per-token",
        "0",
        "--decode-base-ms",
        &decode_ms.to_string(),
        "--decode-us-per-seq",
        "0",
        "--max-num-seqs",
        &seqs.to_string(),
    ])
}

/// Starts `n` simulated engines named `{prefix}{i}` with `extra` flags.
pub(super) fn start_sims(bins: &Path, prefix: &str, n: usize, extra: &[String]) -> Vec<Proc> {
    (0..n)
        .map(|i| {
            let mut a = lmstack_e2e::args(&["--host", "127.0.0.1", "--port", "0", "--name", &format!("{prefix}{i}")]);
            a.extend_from_slice(extra);
            Proc::start(&bins.join("lmstack-sim"), &a, &[])
        })
        .collect()
}

/// Runs `lmstack-load mixed` with `args` to its end; its JSON summary.
pub(super) fn run_mixed(bins: &Path, url: &str, args: &[String]) -> anyhow::Result<Value> {
    let child = mixed_command(bins, url, args)
        .spawn()
        .context("starting lmstack-load")?;
    mixed_summary(child)
}

pub(super) fn mixed_command(bins: &Path, url: &str, args: &[String]) -> Command {
    let mut cmd = Command::new(bins.join("lmstack-load"));
    cmd.args(["mixed", "--json", "--url", url])
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit());
    cmd
}

pub(super) fn mixed_summary(child: std::process::Child) -> anyhow::Result<Value> {
    let out = child.wait_with_output().context("waiting for lmstack-load")?;
    anyhow::ensure!(out.status.success(), "lmstack-load failed: {}", out.status);
    serde_json::from_slice(&out.stdout).context("reading lmstack-load's JSON")
}

pub fn run(bins: &Path, args: &SoakArgs) -> anyhow::Result<Value> {
    let progress = Progress::new("soak", 3);
    progress.step("two engines and the router");
    let sims = start_sims(bins, "soak-e", 2, &quick_engine(args.decode_ms, 4096));
    let urls: Vec<String> = sims.iter().map(Proc::url).collect();
    let workers = args.workers.to_string();
    let router = start_router(bins, 0, &urls, &["--log-level", "warn", "--workers", &workers]);
    wait_ready(&router.url())?;
    let pid = router.pid();
    let sampler = Sampler::start(pid, Duration::from_secs(1));
    std::thread::sleep(Duration::from_millis(1500));
    let load_start_s = sampler.now_s();
    let minutes = args.requests as f64 / args.rate / 60.0;
    progress.step(format!(
        "{} requests at {} a second (about {minutes:.1} min)",
        args.requests, args.rate
    ));
    let load = run_mixed(
        bins,
        &router.url(),
        &lmstack_e2e::args(&[
            "--mix",
            &args.mix,
            "--requests",
            &args.requests.to_string(),
            "--rate",
            &args.rate.to_string(),
            "--concurrency",
            &args.concurrency.to_string(),
            "--max-tokens",
            &args.max_tokens.to_string(),
            "--leave-after-events",
            "2",
            "--leave-max-tokens",
            "32",
            "--progress-s",
            "30",
            "--threads",
            "1",
            "--label",
            "soak",
        ]),
    )?;
    let load_end_s = sampler.now_s();
    progress.step("the router idle after the load");
    // Longer than the engine connections' pool idle timeout (4 s) and its sweep (1 s): the
    // router should be back where it was before the load.
    std::thread::sleep(Duration::from_secs(12));
    let samples = sampler.stop();
    let router_log = router.log_text();
    drop(router);
    drop(sims);
    progress.finish();

    let report = report(args, &load, &samples, load_start_s, load_end_s, &router_log)?;
    print(&report);
    Ok(report)
}

fn report(
    args: &SoakArgs,
    load: &Value,
    samples: &[Sample],
    load_start_s: f64,
    load_end_s: f64,
    router_log: &str,
) -> anyhow::Result<Value> {
    let warm_s = load_start_s + args.warmup_s;
    let before = samples.iter().rev().find(|s| s.t_s < load_start_s);
    let during: Vec<Sample> = samples
        .iter()
        .filter(|s| s.t_s >= warm_s && s.t_s <= load_end_s)
        .copied()
        .collect();
    let after = samples.last().filter(|s| s.t_s > load_end_s);
    let (Some(first), Some(last)) = (during.first(), during.last()) else {
        anyhow::bail!(
            "no sample after the warm-up of {} s: the load ran {:.0} s",
            args.warmup_s,
            load_end_s - load_start_s
        );
    };
    // The first and last minute after the warm-up, as medians: single samples move with
    // the connections open at that second (client, and pooled engine connections).
    let minute = |from: f64, to: f64, f: fn(&Sample) -> u64| {
        let mut v: Vec<u64> = during.iter().filter(|s| s.t_s >= from && s.t_s <= to).map(f).collect();
        v.sort_unstable();
        v.get(v.len() / 2).copied().unwrap_or(0)
    };
    let series = |f: fn(&Sample) -> u64| -> Value {
        let points: Vec<(f64, f64)> = during.iter().map(|s| (s.t_s, f(s) as f64)).collect();
        json!({
            "before_load": before.map(f),
            "start": f(first),
            "end": f(last),
            "first_minute_median": minute(warm_s, warm_s + 60.0, f),
            "last_minute_median": minute(load_end_s - 60.0, load_end_s, f),
            "max": during.iter().map(f).max(),
            "min": during.iter().map(f).min(),
            "after_load": after.map(f),
            "slope_per_min": slope(&points) * 60.0,
        })
    };
    let rss = series(|s| s.rss_kb);
    let fds = series(|s| s.fds);
    let n = |v: &Value, k: &str| v[k].as_u64().unwrap_or(0);
    let mut failures = Vec::new();
    if n(load, "errors") > 0 {
        failures.push(format!(
            "{} requests failed: {}",
            n(load, "errors"),
            load["error_kinds"]
        ));
    }
    if n(load, "requests") != args.requests {
        failures.push(format!(
            "{} of {} requests finished",
            n(load, "requests"),
            args.requests
        ));
    }
    let (first_min, last_min) = ("first_minute_median", "last_minute_median");
    let rss_growth = n(&rss, last_min) as f64 / n(&rss, first_min).max(1) as f64 - 1.0;
    if rss_growth > args.max_rss_growth {
        failures.push(format!(
            "RSS grew {:.1}% from the first minute after the warm-up to the last ({} -> {} KiB)",
            rss_growth * 100.0,
            n(&rss, first_min),
            n(&rss, last_min)
        ));
    }
    let fd_growth = n(&fds, last_min) as i64 - n(&fds, first_min) as i64;
    if fd_growth > args.max_fd_growth as i64 {
        failures.push(format!(
            "open fds grew by {fd_growth} from the first minute after the warm-up to the last"
        ));
    }
    // Idle again, the router holds what it held before the load (nothing leaked).
    let fds_left = n(&fds, "after_load") as i64 - n(&fds, "before_load") as i64;
    if fds_left > args.max_fd_growth as i64 {
        failures.push(format!("{fds_left} more fds open once idle again than before the load"));
    }
    let warnings: Vec<&str> = router_log
        .lines()
        .filter(|l| l.contains("WARN") || l.contains("ERROR"))
        .take(20)
        .collect();
    Ok(json!({
        "scenario": "soak",
        "settings": {
            "requests": args.requests, "rate": args.rate, "concurrency": args.concurrency,
            "router_workers": args.workers, "engines": 2, "mix": args.mix,
            "max_tokens": args.max_tokens, "leave_max_tokens": 32, "leave_after_events": 2,
            "decode_ms": args.decode_ms, "warmup_s": args.warmup_s,
            "max_rss_growth": args.max_rss_growth, "max_fd_growth": args.max_fd_growth,
        },
        "load": load,
        "router": {
            "rss_kb": rss,
            "fds": fds,
            "rss_growth": rss_growth,
            "fd_growth": fd_growth,
            "fds_left_after_load": fds_left,
            "log_warnings": warnings,
        },
        "load_window_s": [load_start_s, load_end_s],
        "warmup_end_s": warm_s,
        "samples": samples.iter().map(|s| json!([s.t_s, s.rss_kb, s.fds])).collect::<Vec<_>>(),
        "passed": failures.is_empty(),
        "failures": failures,
    }))
}

fn print(report: &Value) {
    let l = &report["load"];
    let r = &report["router"];
    let s = &report["settings"];
    println!(
        "\nsoak: {} requests in {:.0} s through the router ({} worker(s)) over 2 engines: \
         {} ok, {} left on purpose, {} errors {}",
        l["requests"],
        l["seconds"].as_f64().unwrap_or(0.0),
        s["router_workers"],
        l["ok"],
        l["left"],
        l["errors"],
        l["error_kinds"]
    );
    for (what, unit) in [("rss_kb", "KiB"), ("fds", "fds")] {
        let v = &r[what];
        println!(
            "{what:<7} before {} | after warm-up {} (first minute {}) | end {} (last minute {}) | max {} | \
             idle after the load {} | slope {:+.1} {unit}/min",
            v["before_load"],
            v["start"],
            v["first_minute_median"],
            v["end"],
            v["last_minute_median"],
            v["max"],
            v["after_load"],
            v["slope_per_min"].as_f64().unwrap_or(0.0)
        );
    }
    println!(
        "{}",
        if report["passed"] == true {
            "flat, and no request failed".to_owned()
        } else {
            format!("FAILED: {}", report["failures"])
        }
    );
}

/// The figure of a report: title, panels a row, panels.
pub fn figure(report: &Value) -> (String, usize, Vec<Panel>) {
    let samples: Vec<(f64, f64, f64)> = report["samples"]
        .as_array()
        .map(|a| {
            a.iter()
                .map(|s| {
                    let f = |i: usize| s[i].as_f64().unwrap_or(f64::NAN);
                    (f(0), f(1), f(2))
                })
                .collect()
        })
        .unwrap_or_default();
    let t0 = report["load_window_s"][0].as_f64().unwrap_or(0.0);
    let t1 = report["load_window_s"][1].as_f64().unwrap_or(0.0);
    // From the load's start to its end: the idle seconds around it are no part of the soak.
    let axis = TimeAxis::new(t1 - t0, 40);
    let rss: Vec<(f64, f64)> = samples.iter().map(|s| (s.0 - t0, s.1 / 1024.0)).collect();
    let fds: Vec<(f64, f64)> = samples.iter().map(|s| (s.0 - t0, s.2)).collect();
    let r = &report["router"];
    let l = &report["load"];
    let timeline: Vec<&Value> = l["timeline"].as_array().map(|a| a.iter().collect()).unwrap_or_default();
    let per_second = |k: &str| -> Vec<f64> {
        let points: Vec<(f64, f64)> = timeline
            .iter()
            .enumerate()
            .map(|(i, s)| (i as f64, s[k].as_f64().unwrap_or(0.0)))
            .collect();
        axis.values(&points)
    };
    let x = format!("x: {}", axis.unit());
    let kinds = ["completions", "stream", "chat", "leave"];
    let kind = |k: &str| kinds.iter().map(|n| l["kinds"][n][k].as_f64().unwrap_or(0.0)).collect();
    let f = |v: &Value| v.as_f64().unwrap_or(f64::NAN);
    let panels = vec![
        Panel::Lines {
            title: format!(
                "router RSS, MiB (first minute {:.1}, last {:.1}, slope {:+.0} KiB/min)",
                f(&r["rss_kb"]["first_minute_median"]) / 1024.0,
                f(&r["rss_kb"]["last_minute_median"]) / 1024.0,
                f(&r["rss_kb"]["slope_per_min"])
            ),
            y_label: format!("MiB ({x})"),
            points: axis.labels(),
            series: vec![Series::new("RSS", axis.values(&rss))],
        },
        Panel::Lines {
            title: format!(
                "router open fds (first minute {}, last {}; idle {} before, {} after)",
                r["fds"]["first_minute_median"],
                r["fds"]["last_minute_median"],
                r["fds"]["before_load"],
                r["fds"]["after_load"]
            ),
            y_label: format!("fds ({x})"),
            points: axis.labels(),
            series: vec![Series::new("open fds", axis.values(&fds))],
        },
        Panel::Lines {
            title: "requests finished a second".into(),
            y_label: format!("req/s ({x})"),
            points: axis.labels(),
            series: vec![
                Series::new("ok", per_second("ok")),
                Series::new("left on purpose", per_second("left")),
                Series::new("errors", per_second("errors")),
            ],
        },
        Panel::Bars {
            title: "requests by kind".into(),
            y_label: "requests".into(),
            categories: kinds.iter().map(|k| (*k).to_owned()).collect(),
            series: vec![
                Series::new("ok", kind("ok")),
                Series::new("left", kind("left")),
                Series::new("errors", kind("errors")),
            ],
        },
    ];
    let s = &report["settings"];
    let title = format!(
        "soak: {} requests ({} errors) at {} req/s through lmstack, {} worker(s), over 2 engines",
        l["requests"], l["errors"], s["rate"], s["router_workers"]
    );
    (title, 2, panels)
}
