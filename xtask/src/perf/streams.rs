//! `cargo xtask perf --scenario streams-10k`: what an open stream costs the router. `--streams`
//! (10,000) streams held open at once through one router worker (`--workers 1`), each on its
//! own client connection and its own engine connection.
//!
//! Engines: `--streams-engines` simulated engines (4), each able to run every stream at once
//! (no prefill time, no per-sequence slowdown), a token every `--streams-decode-ms` (1000)
//! for `--streams-tokens` (60) tokens, so a stream lasts about a minute. The load:
//! `lmstack-load mixed --mix stream=1`, one stream per connection, connections opened over
//! `--streams-ramp-s` (20). The open-files limit is raised for all of them (this process's
//! `RLIMIT_NOFILE`, inherited; raising the hard limit needs CAP_SYS_RESOURCE). Each stream
//! holds two of the router's descriptors (client and engine sockets), so where the hard
//! limit cannot be raised the run is cut to what fits, `(limit - 100) / 2` streams, and says
//! so (`settings.streams_asked`).
//!
//! Measured: the router's RSS and open fds idle (after a short warm-up of a few hundred
//! requests), with every stream open (the engines report them all running; the median of
//! five samples a second apart), and after the streams ended; bytes per stream = (RSS open -
//! RSS idle) / streams. Checked: every stream finished with `[DONE]` and no error event.
//!
//! The figure (`figure`): RSS over time, open streams and fds over time, and RSS idle, open
//! and after.

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use clap::Args;
use lmstack_e2e::{Proc, agent, metric_sum};
use serde_json::{Value, json};

use super::plot::{Panel, Series};
use super::procstat::{self, Sample, Sampler};
use super::progress::Progress;
use super::soak::{mixed_command, mixed_summary, quick_engine, run_mixed, start_sims};
use super::timeline::TimeAxis;
use super::wait_ready;
use crate::start_router;

#[derive(Args, Clone)]
pub struct StreamsArgs {
    /// streams-10k: streams open at once.
    #[arg(id = "streams", long = "streams", default_value_t = 10_000)]
    streams: usize,
    /// streams-10k: simulated engines sharing them.
    #[arg(id = "streams-engines", long = "streams-engines", default_value_t = 4)]
    engines: usize,
    /// streams-10k: time per output token, ms.
    #[arg(id = "streams-decode-ms", long = "streams-decode-ms", default_value_t = 1000.0)]
    decode_ms: f64,
    /// streams-10k: tokens per stream.
    #[arg(id = "streams-tokens", long = "streams-tokens", default_value_t = 60)]
    tokens: usize,
    /// streams-10k: seconds over which the client connections open.
    #[arg(id = "streams-ramp-s", long = "streams-ramp-s", default_value_t = 20.0)]
    ramp_s: f64,
}

/// Raises this process's open-files limit (inherited by what it starts) towards `want`: to
/// `want` where the hard limit allows or can be raised (root with CAP_SYS_RESOURCE), else to
/// the hard limit. Returns the limit now in force.
fn raise_nofile(want: u64) -> anyhow::Result<u64> {
    let mut r = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes into the struct we pass, which we own.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut r) } != 0 {
        bail!("getrlimit: {}", std::io::Error::last_os_error());
    }
    if r.rlim_cur >= want {
        return Ok(r.rlim_cur);
    }
    for new in [
        libc::rlimit {
            rlim_cur: want,
            rlim_max: r.rlim_max.max(want),
        },
        libc::rlimit {
            rlim_cur: r.rlim_max,
            rlim_max: r.rlim_max,
        },
    ] {
        // SAFETY: setrlimit reads the struct we pass.
        if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &new) } == 0 {
            return Ok(new.rlim_cur);
        }
    }
    bail!(
        "cannot raise the open-files limit (soft {}, hard {}): {}",
        r.rlim_cur,
        r.rlim_max,
        std::io::Error::last_os_error()
    )
}

/// Descriptors the router holds besides its streams' sockets (listener, ring, logs, probes),
/// with room to spare.
const ROUTER_RESERVED_FDS: u64 = 100;

/// Streams the engines at `urls` are running, summed (`None` when one does not answer).
fn engines_running(urls: &[String]) -> Option<f64> {
    let http = agent();
    let mut sum = 0.0;
    for u in urls {
        let mut r = http.get(format!("{u}/metrics")).call().ok()?;
        let text = r.body_mut().read_to_string().ok()?;
        sum += metric_sum(&text, "vllm:num_requests_running", &[]);
    }
    Some(sum)
}

/// Reads the engines' running streams every second on a thread of its own, until stopped:
/// (seconds on the sampler's clock, streams).
struct Follower {
    stop: Arc<AtomicBool>,
    thread: std::thread::JoinHandle<Vec<(f64, f64)>>,
}

impl Follower {
    /// `now_s`: the sampler's clock now.
    fn start(urls: Vec<String>, now_s: f64) -> Follower {
        let stop = Arc::new(AtomicBool::new(false));
        let t0 = Instant::now();
        let thread = {
            let stop = stop.clone();
            std::thread::spawn(move || {
                let mut series = Vec::new();
                while !stop.load(Ordering::Relaxed) {
                    let running = engines_running(&urls).unwrap_or(f64::NAN);
                    series.push((now_s + t0.elapsed().as_secs_f64(), running));
                    std::thread::sleep(Duration::from_secs(1));
                }
                series
            })
        };
        Follower { stop, thread }
    }

    fn stop(self) -> Vec<(f64, f64)> {
        self.stop.store(true, Ordering::Relaxed);
        self.thread.join().unwrap_or_default()
    }
}

fn median(mut v: Vec<u64>) -> u64 {
    v.sort_unstable();
    v.get(v.len() / 2).copied().unwrap_or(0)
}

pub fn run(bins: &Path, args: &StreamsArgs) -> anyhow::Result<Value> {
    anyhow::ensure!(
        args.streams > 0 && args.engines > 0,
        "--streams and --streams-engines must be positive"
    );
    // Each stream holds two of the router's descriptors: the client's socket and the engine's.
    let nofile = raise_nofile((2 * args.streams as u64 + 4096).max(65_536))?;
    let fit = (nofile.saturating_sub(ROUTER_RESERVED_FDS) / 2) as usize;
    let streams = args.streams.min(fit);
    if streams < args.streams {
        eprintln!(
            "streams-10k: the open-files limit is {nofile} and cannot be raised here (no \
             CAP_SYS_RESOURCE): the router can hold {streams} streams, not {}; running {streams}",
            args.streams
        );
    }
    let streams_asked = args.streams;
    let args = &StreamsArgs {
        streams,
        ..args.clone()
    };
    let progress = Progress::new("streams-10k", 5);
    progress.step(format!("{} engines and the router (1 worker)", args.engines));
    let mut engine = quick_engine(args.decode_ms, args.streams);
    // Every stream's blocks fit in any one engine's cache.
    let blocks = args.streams * (args.tokens / 16 + 4);
    engine.extend(lmstack_e2e::args(&["--num-gpu-blocks", &blocks.to_string()]));
    let sims = start_sims(bins, "streams-e", args.engines, &engine);
    let urls: Vec<String> = sims.iter().map(Proc::url).collect();
    let router = start_router(bins, 0, &urls, &["--log-level", "warn", "--workers", "1"]);
    wait_ready(&router.url())?;
    let pid = router.pid();

    progress.step("warm-up: 400 short requests (one token each)");
    let quick = run_mixed(
        bins,
        &router.url(),
        &lmstack_e2e::args(&[
            "--mix",
            "completions=1,stream=1",
            "--requests",
            "400",
            "--concurrency",
            "16",
            "--max-tokens",
            "1",
            "--label",
            "warm-up",
        ]),
    )?;
    anyhow::ensure!(quick["errors"] == 0, "the warm-up failed: {quick}");
    std::thread::sleep(Duration::from_secs(2));
    let sampler = Sampler::start(pid, Duration::from_secs(1));
    let idle: Vec<Sample> = (0..3)
        .filter_map(|_| {
            std::thread::sleep(Duration::from_millis(300));
            procstat::sample(pid, 0.0)
        })
        .collect();
    let rss_idle = median(idle.iter().map(|s| s.rss_kb).collect());
    let fds_idle = median(idle.iter().map(|s| s.fds).collect());

    progress.step(format!(
        "{} streams over {} s, {} tokens {} ms apart",
        args.streams, args.ramp_s, args.tokens, args.decode_ms
    ));
    let stream_s = args.tokens as f64 * args.decode_ms / 1000.0;
    let load_start_s = sampler.now_s();
    let load = mixed_command(
        bins,
        &router.url(),
        &lmstack_e2e::args(&[
            "--mix",
            "stream=1",
            "--requests",
            &args.streams.to_string(),
            "--concurrency",
            &args.streams.to_string(),
            "--ramp-s",
            &args.ramp_s.to_string(),
            "--max-tokens",
            &args.tokens.to_string(),
            "--request-timeout-s",
            &(args.ramp_s + 3.0 * stream_s + 120.0).to_string(),
            "--progress-s",
            "10",
            "--threads",
            "2",
            "--label",
            "streams-10k",
        ]),
    )
    .spawn()
    .context("starting lmstack-load")?;

    // Every stream open: the engines run them all.
    let mut open_series: Vec<(f64, f64)> = Vec::new();
    let deadline = Instant::now() + Duration::from_secs_f64(args.ramp_s + stream_s.min(120.0) + 60.0);
    let mut all_open_s = None;
    while Instant::now() < deadline {
        let running = engines_running(&urls).unwrap_or(f64::NAN);
        open_series.push((sampler.now_s(), running));
        if running >= args.streams as f64 {
            all_open_s = Some(sampler.now_s());
            break;
        }
        std::thread::sleep(Duration::from_millis(500));
    }
    let mut open = Vec::new();
    if all_open_s.is_some() {
        progress.step("every stream open: sampling the router");
        for _ in 0..5 {
            if let Some(s) = procstat::sample(pid, sampler.now_s()) {
                open.push(s);
            }
            open_series.push((sampler.now_s(), engines_running(&urls).unwrap_or(f64::NAN)));
            std::thread::sleep(Duration::from_secs(1));
        }
    } else {
        progress.step("NOT every stream opened; waiting for the load to end");
    }
    // Until the load ends, keep following the engines.
    let follower = Follower::start(urls.clone(), sampler.now_s());
    let load = mixed_summary(load)?;
    let load_end_s = sampler.now_s();
    open_series.extend(follower.stop());
    progress.step("after the streams");
    std::thread::sleep(Duration::from_secs(3));
    let after = procstat::sample(pid, sampler.now_s());
    let samples = sampler.stop();
    let router_log = router.log_text();
    drop(router);
    drop(sims);
    progress.finish();

    let rss_open = median(open.iter().map(|s| s.rss_kb).collect());
    let fds_open = median(open.iter().map(|s| s.fds).collect());
    let bytes_per_stream = (rss_open as f64 - rss_idle as f64) * 1024.0 / args.streams as f64;
    let stream_ok = load["kinds"]["stream"]["ok"].as_u64().unwrap_or(0);
    let mut failures = Vec::new();
    if all_open_s.is_none() {
        failures.push(format!(
            "the engines never ran all {} streams at once (at most {})",
            args.streams,
            open_series.iter().map(|p| p.1).fold(0.0, f64::max)
        ));
    }
    if stream_ok != args.streams as u64 || load["errors"] != 0 {
        failures.push(format!(
            "{stream_ok} of {} streams ended with [DONE]; errors {}",
            args.streams, load["error_kinds"]
        ));
    }
    let warnings: Vec<&str> = router_log
        .lines()
        .filter(|l| l.contains("WARN") || l.contains("ERROR"))
        .take(20)
        .collect();
    let report = json!({
        "scenario": "streams-10k",
        "settings": {
            "streams": args.streams, "engines": args.engines, "router_workers": 1,
            "decode_ms": args.decode_ms, "tokens": args.tokens, "ramp_s": args.ramp_s,
            "nofile_limit": nofile, "streams_asked": streams_asked,
            "engine_flags": engine.join(" "),
        },
        "router": {
            "rss_kb": {"idle": rss_idle, "open": rss_open, "after": after.map(|s| s.rss_kb),
                       "max": samples.iter().map(|s| s.rss_kb).max()},
            "fds": {"idle": fds_idle, "open": fds_open, "after": after.map(|s| s.fds),
                    "max": samples.iter().map(|s| s.fds).max()},
            "bytes_per_stream": bytes_per_stream,
            "log_warnings": warnings,
        },
        "all_open_s": all_open_s.map(|t| t - load_start_s),
        "load": load,
        "load_window_s": [load_start_s, load_end_s],
        "samples": samples.iter().map(|s| json!([s.t_s, s.rss_kb, s.fds])).collect::<Vec<_>>(),
        "engines_running": open_series.iter().map(|p| json!([p.0, p.1])).collect::<Vec<_>>(),
        "passed": failures.is_empty(),
        "failures": failures,
    });
    print(&report);
    Ok(report)
}

fn print(report: &Value) {
    let r = &report["router"];
    let l = &report["load"];
    println!(
        "\nstreams-10k: {} streams through one router worker; all open {:.1} s after the first \
         connection; {} ended with [DONE], {} errors {}",
        report["settings"]["streams"],
        report["all_open_s"].as_f64().unwrap_or(f64::NAN),
        l["kinds"]["stream"]["ok"],
        l["errors"],
        l["error_kinds"]
    );
    println!(
        "router RSS: idle {} KiB, all open {} KiB, after {} KiB, max {} KiB => {:.0} bytes per stream",
        r["rss_kb"]["idle"],
        r["rss_kb"]["open"],
        r["rss_kb"]["after"],
        r["rss_kb"]["max"],
        r["bytes_per_stream"].as_f64().unwrap_or(f64::NAN)
    );
    println!(
        "router fds: idle {}, all open {}, after {}",
        r["fds"]["idle"], r["fds"]["open"], r["fds"]["after"]
    );
    if report["passed"] != true {
        println!("FAILED: {}", report["failures"]);
    }
}

/// The figure of a report: title, panels a row, panels.
pub fn figure(report: &Value) -> (String, usize, Vec<Panel>) {
    let pairs = |k: &str, i: usize, scale: f64| -> Vec<(f64, f64)> {
        report[k]
            .as_array()
            .map(|a| {
                a.iter()
                    .map(|s| {
                        (
                            s[0].as_f64().unwrap_or(f64::NAN),
                            s[i].as_f64().unwrap_or(f64::NAN) * scale,
                        )
                    })
                    .collect()
            })
            .unwrap_or_default()
    };
    // From the load's start until the sampling ended.
    let t0 = report["load_window_s"][0].as_f64().unwrap_or(0.0);
    let shift = |v: Vec<(f64, f64)>| -> Vec<(f64, f64)> { v.into_iter().map(|(t, y)| (t - t0, y)).collect() };
    let rss = shift(pairs("samples", 1, 1.0 / 1024.0));
    let fds = shift(pairs("samples", 2, 1.0));
    let running = shift(pairs("engines_running", 1, 1.0));
    let axis = TimeAxis::new(rss.last().map_or(1.0, |p| p.0), 40);
    let x = format!("x: {} from the first connection", axis.unit());
    let r = &report["router"];
    let mib = |v: &Value| v.as_f64().unwrap_or(f64::NAN) / 1024.0;
    let panels = vec![
        Panel::Lines {
            title: "router RSS, MiB".into(),
            y_label: format!("MiB ({x})"),
            points: axis.labels(),
            series: vec![Series::new("RSS", axis.values(&rss))],
        },
        Panel::Lines {
            title: "open streams (engines) and router fds".into(),
            y_label: format!("count ({x})"),
            points: axis.labels(),
            series: vec![
                Series::new("streams running", axis.values(&running)),
                Series::new("router fds", axis.values(&fds)),
            ],
        },
        Panel::Bars {
            title: format!(
                "router RSS: {:.0} bytes per open stream",
                r["bytes_per_stream"].as_f64().unwrap_or(f64::NAN)
            ),
            y_label: "MiB".into(),
            categories: vec!["idle".into(), "all streams open".into(), "after".into()],
            series: vec![Series::new(
                "RSS",
                vec![
                    mib(&r["rss_kb"]["idle"]),
                    mib(&r["rss_kb"]["open"]),
                    mib(&r["rss_kb"]["after"]),
                ],
            )],
        },
    ];
    let s = &report["settings"];
    let title = format!(
        "streams-10k: {} streams open at once through one lmstack worker ({} ended with [DONE]){}",
        s["streams"],
        report["load"]["kinds"]["stream"]["ok"],
        if s["streams_asked"] != s["streams"] {
            format!("; {} asked, RLIMIT_NOFILE {}", s["streams_asked"], s["nofile_limit"])
        } else {
            String::new()
        }
    );
    (title, 3, panels)
}
