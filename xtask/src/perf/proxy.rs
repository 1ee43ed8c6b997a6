//! `cargo xtask perf --scenario proxy`: what lmstack adds to a request, measured against a
//! direct connection and against nginx as a plain keep-alive reverse proxy, in one run on
//! the same engines.
//!
//! 1. Throughput: small non-streaming completions at `--concurrency` connections (a) straight
//!    to one engine, (b) through lmstack over two engines, (c) through nginx over the same
//!    two engines, (d) and (e) lmstack and nginx serving the clients over TLS (one ECDSA
//!    P-256 certificate, TLS 1.3; kept-alive connections, so a handshake per connection and
//!    not per request). Engines answer at once (no simulated GPU time), so the proxies and
//!    the engines' HTTP handling are what is measured.
//! 2. Streaming: time to the first chunk and the gaps between chunks, direct and through both
//!    proxies, over one engine that emits a token every 5 ms.
//!
//! Scenarios are interleaved over `--rounds` and the median of each figure reported, so slow
//! drift of a shared machine hits all targets alike. Each target's CPU time per request is
//! read from /proc around its runs.
//!
//! The figure (`figure`): latency percentiles per target, requests per second and CPU per
//! request, streaming time to first byte and gaps between chunks.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use anyhow::{Context, bail};
use clap::Args;
use lmstack_e2e::Proc;
use serde_json::{Value, json};

use super::plot::{Panel, Series};
use super::progress::Progress;
use super::{command_output, wait_ready};
use crate::start_router;

#[derive(Args)]
pub struct ProxyArgs {
    /// Measured seconds per scenario and round.
    #[arg(long, default_value_t = 10.0)]
    duration_s: f64,
    /// Unmeasured seconds before each measurement.
    #[arg(long, default_value_t = 2.0)]
    warmup_s: f64,
    /// Connections for the throughput scenario.
    #[arg(long, default_value_t = 64)]
    concurrency: usize,
    /// Concurrent streams for the streaming scenario.
    #[arg(long, default_value_t = 16)]
    stream_concurrency: usize,
    /// Interleaved repetitions; the median is reported.
    #[arg(long, default_value_t = 3)]
    rounds: usize,
    /// Skip nginx (when it cannot be installed).
    #[arg(long)]
    no_nginx: bool,
    /// Skip the TLS targets (lmstack and nginx serving HTTPS).
    #[arg(long)]
    no_tls: bool,
}

/// Runs the proxy scenario with the binaries in `bins`, nginx's files under `work`.
pub fn run(bins: &Path, work: &Path, args: &ProxyArgs) -> anyhow::Result<Value> {
    anyhow::ensure!(args.rounds > 0, "--rounds must be at least 1");
    let nginx = if args.no_nginx { None } else { Some(ensure_nginx()?) };
    let tls = if args.no_tls {
        None
    } else {
        Some(TlsFiles::make(&work.join("tls"))?)
    };
    let proxies = 1 + usize::from(nginx.is_some());
    let throughput_targets = 1 + proxies + if tls.is_some() { proxies } else { 0 };
    let progress = Progress::new("proxy", ((throughput_targets + 2 + 1 + proxies) * args.rounds) as u64);

    let instant = [
        "--prefill-base-ms",
        "0",
        "--prefill-us-per-token",
        "0",
        "--decode-base-ms",
        "0",
        "--decode-us-per-seq",
        "0",
    ];
    let sim = |name: &str, extra: &[&str]| {
        let mut a = vec![
            "--host",
            "127.0.0.1",
            "--port",
            "0",
            "--name",
            name,
            "--max-num-seqs",
            "4096",
        ];
        a.extend_from_slice(extra);
        Proc::start(&bins.join("lmstack-sim"), &lmstack_e2e::args(&a), &[])
    };
    let router = |engines: &[&Proc]| {
        let urls: Vec<String> = engines.iter().map(|e| e.url()).collect();
        start_router(bins, 0, &urls, &["--log-level", "warn"])
    };

    // Throughput.
    let e1 = sim("e1", &instant);
    let e2 = sim("e2", &instant);
    let lm = router(&[&e1, &e2]);
    let ng = match &nginx {
        Some(bin) => Some(Nginx::start(bin, &work.join("nginx-throughput"), &[&e1, &e2], None)?),
        None => None,
    };
    wait_ready(&lm.url())?;
    let mut targets = vec![
        Target::new("direct-1-engine", e1.url(), vec![e1.pid()]),
        Target::new("lmstack-2-engines", lm.url(), vec![lm.pid()]),
    ];
    if let Some(n) = &ng {
        targets.push(Target::new("nginx-2-engines", n.url(), n.pids()));
    }
    // The same two engines, through both proxies serving HTTPS.
    let mut tls_procs = (None, None);
    if let Some(t) = &tls {
        let (cert, key) = (t.cert.to_string_lossy(), t.key.to_string_lossy());
        let urls = [e1.url(), e2.url()];
        let lm_tls = start_router(
            bins,
            0,
            &urls,
            &["--log-level", "warn", "--tls-cert", &cert, "--tls-key", &key],
        );
        let url = format!("https://127.0.0.1:{}", lm_tls.addr.port());
        wait_ready_tls(&url, &t.ca)?;
        targets.push(Target::new("lmstack-tls-2-engines", url, vec![lm_tls.pid()]).with_ca(&t.ca));
        if let Some(bin) = &nginx {
            let n = Nginx::start(bin, &work.join("nginx-tls"), &[&e1, &e2], Some(t))?;
            wait_ready_tls(&n.url(), &t.ca)?;
            targets.push(Target::new("nginx-tls-2-engines", n.url(), n.pids()).with_ca(&t.ca));
            tls_procs.1 = Some(n);
        }
        tls_procs.0 = Some(lm_tls);
    }
    let throughput = measure(
        bins,
        args,
        &progress,
        &targets,
        &Load::new("completions", args.concurrency, 1),
    )?;

    // What routing costs: round_robin and prefix on the same engines, with a 1k-token prompt
    // (32 blocks to hash and match) so that prefix has work to do.
    let urls = [e1.url(), e2.url()];
    let rr = start_router(
        bins,
        0,
        &urls,
        &["--log-level", "warn", "--routing-logic", "round_robin"],
    );
    let px = start_router(bins, 0, &urls, &["--log-level", "warn", "--routing-logic", "prefix"]);
    wait_ready(&rr.url())?;
    wait_ready(&px.url())?;
    let prompt = "Routing costs little, even for a long prompt. ".repeat(90);
    let routing = measure(
        bins,
        args,
        &progress,
        &[
            Target::new("lmstack-round-robin-1k-prompt", rr.url(), vec![rr.pid()]),
            Target::new("lmstack-prefix-1k-prompt", px.url(), vec![px.pid()]),
        ],
        &Load {
            prompt: Some(&prompt),
            ..Load::new("completions", args.concurrency, 1)
        },
    )?;
    drop((rr, px, tls_procs, ng, lm, e1, e2));

    // Streaming.
    let e3 = sim(
        "e3",
        &[
            "--prefill-base-ms",
            "0",
            "--prefill-us-per-token",
            "0",
            "--decode-base-ms",
            "5",
            "--decode-us-per-seq",
            "0",
        ],
    );
    let lm = router(&[&e3]);
    let ng = match &nginx {
        Some(bin) => Some(Nginx::start(bin, &work.join("nginx-stream"), &[&e3], None)?),
        None => None,
    };
    wait_ready(&lm.url())?;
    let mut targets = vec![
        Target::new("direct-stream", e3.url(), vec![e3.pid()]),
        Target::new("lmstack-stream", lm.url(), vec![lm.pid()]),
    ];
    if let Some(n) = &ng {
        targets.push(Target::new("nginx-stream", n.url(), n.pids()));
    }
    let streaming = measure(
        bins,
        args,
        &progress,
        &targets,
        &Load::new("stream", args.stream_concurrency, 16),
    )?;
    drop((ng, lm, e3));
    progress.finish();

    let report = json!({
        "nginx": nginx.as_ref().map(|n| command_output(&n.to_string_lossy(), &["-v"])),
        "settings": {"duration_s": args.duration_s, "warmup_s": args.warmup_s, "rounds": args.rounds,
                     "concurrency": args.concurrency, "stream_concurrency": args.stream_concurrency,
                     "tls": tls.is_some()},
        "throughput": throughput,
        "routing": routing,
        "streaming": streaming,
    });
    print_report(&report);
    Ok(report)
}

/// What every request of a measurement is.
struct Load<'a> {
    mode: &'a str,
    concurrency: usize,
    max_tokens: usize,
    /// lmstack-load's default prompt when `None`.
    prompt: Option<&'a str>,
}

impl<'a> Load<'a> {
    fn new(mode: &'a str, concurrency: usize, max_tokens: usize) -> Self {
        Self {
            mode,
            concurrency,
            max_tokens,
            prompt: None,
        }
    }
}

/// Runs every target `rounds` times, interleaved, and returns per-target medians.
fn measure(
    bins: &Path,
    args: &ProxyArgs,
    progress: &Progress,
    targets: &[Target],
    load: &Load<'_>,
) -> anyhow::Result<Value> {
    let Load {
        mode,
        concurrency,
        max_tokens,
        prompt,
    } = *load;
    let mut runs: Vec<Vec<Value>> = vec![Vec::new(); targets.len()];
    for round in 0..args.rounds {
        for (i, Target { label, url, pids, ca }) in targets.iter().enumerate() {
            progress.step(format!(
                "{mode} round {}/{}: {label}, {concurrency} connections, {} s",
                round + 1,
                args.rounds,
                args.warmup_s + args.duration_s
            ));
            let cpu_before = cpu_seconds(pids);
            let out = Command::new(bins.join("lmstack-load"))
                .args(["bench", "--url", url, "--mode", mode, "--json", "--label", label])
                .args([
                    "--concurrency",
                    &concurrency.to_string(),
                    "--max-tokens",
                    &max_tokens.to_string(),
                ])
                .args([
                    "--duration-s",
                    &args.duration_s.to_string(),
                    "--warmup-s",
                    &args.warmup_s.to_string(),
                ])
                .args(prompt.map(|p| ["--prompt", p]).into_iter().flatten())
                .args(ca.iter().flat_map(|ca| [Path::new("--cacert"), ca]))
                .stderr(Stdio::inherit())
                .output()
                .context("running lmstack-load")?;
            anyhow::ensure!(out.status.success(), "lmstack-load failed for {label}");
            let cpu = cpu_seconds(pids) - cpu_before;
            let mut run: Value = serde_json::from_slice(&out.stdout).context("reading lmstack-load's JSON")?;
            let all = run["all_requests"].as_f64().unwrap_or(0.0).max(1.0);
            // What the proxy (or, direct, the engine) spent per request, warmup included.
            run["cpu_us_per_request"] = json!(cpu * 1e6 / all);
            runs[i].push(run);
        }
    }
    let fields = [
        "rps",
        "cpu_us_per_request",
        "errors",
        "latency_ms.p50",
        "latency_ms.p90",
        "latency_ms.p99",
        "latency_ms.p999",
        "ttfb_ms.p50",
        "ttfb_ms.p99",
        "ttfb_ms.p999",
        "gap_ms.p50",
        "gap_ms.p99",
        "gap_ms.p999",
    ];
    let mut result = serde_json::Map::new();
    for (Target { label, .. }, rounds) in targets.iter().zip(&runs) {
        let mut medians = serde_json::Map::new();
        for f in fields {
            let mut values: Vec<f64> = rounds
                .iter()
                .filter_map(|r| f.split('.').try_fold(r, |v, k| v.get(k)).and_then(Value::as_f64))
                .collect();
            values.sort_by(f64::total_cmp);
            if let Some(m) = values.get(values.len() / 2) {
                medians.insert(f.to_owned(), json!(m));
            }
        }
        medians.insert("rounds".into(), json!(rounds));
        result.insert((*label).to_owned(), Value::Object(medians));
    }
    Ok(Value::Object(result))
}

/// A load target, and the processes whose CPU time counts for it.
struct Target {
    label: &'static str,
    url: String,
    pids: Vec<u32>,
    /// The CA of an https:// target.
    ca: Option<PathBuf>,
}

impl Target {
    fn new(label: &'static str, url: String, pids: Vec<u32>) -> Self {
        Self {
            label,
            url,
            pids,
            ca: None,
        }
    }

    fn with_ca(self, ca: &Path) -> Self {
        Self {
            ca: Some(ca.to_owned()),
            ..self
        }
    }
}

/// A CA and a server certificate signed by it for `localhost` and 127.0.0.1 (ECDSA P-256,
/// so that both proxies' handshakes do the same work), written as PEM files.
struct TlsFiles {
    ca: PathBuf,
    cert: PathBuf,
    key: PathBuf,
}

impl TlsFiles {
    fn make(dir: &Path) -> anyhow::Result<TlsFiles> {
        use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, DnType, IsCa, KeyPair};
        std::fs::create_dir_all(dir)?;
        let mut params = CertificateParams::new(Vec::<String>::new())?;
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.distinguished_name.push(DnType::CommonName, "lmstack perf CA");
        let ca = CertifiedIssuer::self_signed(params, KeyPair::generate()?)?;
        let key = KeyPair::generate()?;
        let cert =
            CertificateParams::new(vec!["localhost".to_owned(), "127.0.0.1".to_owned()])?.signed_by(&key, &ca)?;
        let files = TlsFiles {
            ca: dir.join("ca.pem"),
            cert: dir.join("cert.pem"),
            key: dir.join("key.pem"),
        };
        std::fs::write(&files.ca, ca.pem())?;
        std::fs::write(&files.cert, cert.pem())?;
        std::fs::write(&files.key, key.serialize_pem())?;
        Ok(files)
    }
}

/// Waits for an https:// target's /health (curl: the agent here speaks plain HTTP only).
fn wait_ready_tls(url: &str, ca: &Path) -> anyhow::Result<()> {
    let start = std::time::Instant::now();
    while start.elapsed() < Duration::from_secs(30) {
        let ok = Command::new("curl")
            .args(["--silent", "--fail", "--output", "/dev/null", "--cacert"])
            .arg(ca)
            .arg(format!("{url}/health"))
            .status()
            .context("running curl")?
            .success();
        if ok {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    bail!("{url} never became healthy")
}

/// User plus system CPU time of processes (all their threads), from /proc.
fn cpu_seconds(pids: &[u32]) -> f64 {
    // SAFETY: sysconf has no preconditions.
    let ticks = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
    pids.iter()
        .filter_map(|pid| std::fs::read_to_string(format!("/proc/{pid}/stat")).ok())
        .filter_map(|stat| {
            // Fields after the command name (which may hold spaces) start at `state`.
            let rest = stat.rsplit_once(')')?.1;
            let f: Vec<&str> = rest.split_whitespace().collect();
            Some(f.get(11)?.parse::<f64>().ok()? + f.get(12)?.parse::<f64>().ok()?)
        })
        .sum::<f64>()
        / ticks
}

/// The figure of a report: title, panels a row, panels.
pub fn figure(report: &Value) -> (String, usize, Vec<Panel>) {
    let part = |name: &str| report[name].as_object().cloned().unwrap_or_default();
    let (throughput, streaming) = (part("throughput"), part("streaming"));
    let labels = |m: &serde_json::Map<String, Value>| m.keys().cloned().collect::<Vec<_>>();
    let field = |v: &Value, k: &str| v.get(k).and_then(Value::as_f64).unwrap_or(f64::NAN);
    let percentiles = |m: &serde_json::Map<String, Value>, what: &str, ps: &[&str]| -> Vec<Series> {
        m.iter()
            .map(|(label, v)| Series::new(label, ps.iter().map(|p| field(v, &format!("{what}.{p}"))).collect()))
            .collect()
    };
    let one = |m: &serde_json::Map<String, Value>, name: &str, k: &str| {
        vec![Series::new(name, m.values().map(|v| field(v, k)).collect())]
    };
    let names = |ps: &[&str]| ps.iter().map(|p| p.replace("p999", "p99.9")).collect::<Vec<_>>();
    let s = &report["settings"];
    let panels = vec![
        Panel::Lines {
            title: format!("throughput: latency ({} connections)", s["concurrency"]),
            y_label: "ms".into(),
            points: names(&["p50", "p90", "p99", "p999"]),
            series: percentiles(&throughput, "latency_ms", &["p50", "p90", "p99", "p999"]),
        },
        Panel::Bars {
            title: "throughput: requests per second".into(),
            y_label: "req/s".into(),
            categories: labels(&throughput),
            series: one(&throughput, "req/s", "rps"),
        },
        Panel::Bars {
            title: "throughput: CPU per request (proxy, or engine)".into(),
            y_label: "us".into(),
            categories: labels(&throughput),
            series: one(&throughput, "CPU us/request", "cpu_us_per_request"),
        },
        Panel::Lines {
            title: format!("streaming: time to first byte ({} streams)", s["stream_concurrency"]),
            y_label: "ms".into(),
            points: names(&["p50", "p99", "p999"]),
            series: percentiles(&streaming, "ttfb_ms", &["p50", "p99", "p999"]),
        },
        Panel::Lines {
            title: "streaming: gap between chunks (5 ms apart)".into(),
            y_label: "ms".into(),
            points: names(&["p50", "p99", "p999"]),
            series: percentiles(&streaming, "gap_ms", &["p50", "p99", "p999"]),
        },
    ];
    let title = format!(
        "proxy: lmstack against a direct connection and nginx (medians of {} rounds of {} s)",
        s["rounds"], s["duration_s"]
    );
    (title, 3, panels)
}

fn print_report(report: &Value) {
    let f = |v: &Value, k: &str| v.get(k).and_then(Value::as_f64).unwrap_or(f64::NAN);
    println!(
        "\nthroughput ({} connections, non-streaming, medians)",
        report["settings"]["concurrency"]
    );
    println!(
        "{:<20} {:>10} {:>9} {:>9} {:>9} {:>9} {:>11}",
        "target", "req/s", "p50 ms", "p99 ms", "p99.9 ms", "errors", "cpu us/req"
    );
    if let Some(t) = report["throughput"].as_object() {
        for (label, v) in t {
            println!(
                "{label:<20} {:>10.0} {:>9.3} {:>9.3} {:>9.3} {:>9} {:>11.1}",
                f(v, "rps"),
                f(v, "latency_ms.p50"),
                f(v, "latency_ms.p99"),
                f(v, "latency_ms.p999"),
                f(v, "errors"),
                f(v, "cpu_us_per_request")
            );
        }
    }
    if let Some(t) = report["routing"].as_object() {
        println!(
            "\nrouting cost (1k-token prompt, {} connections, medians)",
            report["settings"]["concurrency"]
        );
        for (label, v) in t {
            println!(
                "{label:<32} {:>10.0} req/s {:>9.3} ms p99 {:>7.1} us/req",
                f(v, "rps"),
                f(v, "latency_ms.p99"),
                f(v, "cpu_us_per_request")
            );
        }
        let ratio = f(&t["lmstack-prefix-1k-prompt"], "rps") / f(&t["lmstack-round-robin-1k-prompt"], "rps");
        println!("prefix / round_robin req/s: {ratio:.3} (target >= 0.95)");
    }
    println!(
        "\nstreaming ({} streams of 16 tokens, 5 ms apart, medians)",
        report["settings"]["stream_concurrency"]
    );
    println!(
        "{:<20} {:>10} {:>10} {:>10} {:>9} {:>9} {:>9}",
        "target", "ttfb p50", "ttfb p99", "ttfb p99.9", "gap p50", "gap p99", "gap p99.9"
    );
    if let Some(t) = report["streaming"].as_object() {
        for (label, v) in t {
            println!(
                "{label:<20} {:>10.3} {:>10.3} {:>10.3} {:>9.3} {:>9.3} {:>9.3}",
                f(v, "ttfb_ms.p50"),
                f(v, "ttfb_ms.p99"),
                f(v, "ttfb_ms.p999"),
                f(v, "gap_ms.p50"),
                f(v, "gap_ms.p99"),
                f(v, "gap_ms.p999")
            );
        }
    }
    let t = &report["throughput"];
    if t.get("nginx-tls-2-engines").is_some() {
        let (l, n) = (&t["lmstack-tls-2-engines"], &t["nginx-tls-2-engines"]);
        println!(
            "\nover TLS, lmstack / nginx: req/s x{:.2}, p99 x{:.2}, CPU per request x{:.2}",
            f(l, "rps") / f(n, "rps"),
            f(l, "latency_ms.p99") / f(n, "latency_ms.p99"),
            f(l, "cpu_us_per_request") / f(n, "cpu_us_per_request")
        );
        println!(
            "TLS / plain req/s: lmstack x{:.2}, nginx x{:.2}",
            f(l, "rps") / f(&t["lmstack-2-engines"], "rps"),
            f(n, "rps") / f(&t["nginx-2-engines"], "rps")
        );
    }
    if t.get("nginx-2-engines").is_some() {
        let (l, n) = (&t["lmstack-2-engines"], &t["nginx-2-engines"]);
        println!(
            "\nlmstack / nginx: req/s x{:.2}, p99 x{:.2}, p99.9 x{:.2}, CPU per request x{:.2}",
            f(l, "rps") / f(n, "rps"),
            f(l, "latency_ms.p99") / f(n, "latency_ms.p99"),
            f(l, "latency_ms.p999") / f(n, "latency_ms.p999"),
            f(l, "cpu_us_per_request") / f(n, "cpu_us_per_request")
        );
    }
    let s = &report["streaming"];
    println!(
        "streaming: lmstack adds {:+.3} ms to time to first byte at p50, {:+.3} ms at p99",
        f(&s["lmstack-stream"], "ttfb_ms.p50") - f(&s["direct-stream"], "ttfb_ms.p50"),
        f(&s["lmstack-stream"], "ttfb_ms.p99") - f(&s["direct-stream"], "ttfb_ms.p99")
    );
    if s.get("nginx-stream").is_some() {
        println!(
            "           nginx adds   {:+.3} ms at p50, {:+.3} ms at p99",
            f(&s["nginx-stream"], "ttfb_ms.p50") - f(&s["direct-stream"], "ttfb_ms.p50"),
            f(&s["nginx-stream"], "ttfb_ms.p99") - f(&s["direct-stream"], "ttfb_ms.p99")
        );
    }
}

/// nginx from Debian's packages, installed when missing (needs root).
fn ensure_nginx() -> anyhow::Result<PathBuf> {
    let candidates = [PathBuf::from("/usr/sbin/nginx"), PathBuf::from("/usr/bin/nginx")];
    if let Some(p) = candidates.iter().find(|p| p.exists()) {
        return Ok(p.clone());
    }
    eprintln!("nginx is missing: installing it from Debian's packages");
    let apt = |args: &[&str]| {
        Command::new("apt-get")
            .args(args)
            .env("DEBIAN_FRONTEND", "noninteractive")
            .status()
            .is_ok_and(|s| s.success())
    };
    let installed = apt(&["update", "-q"])
        && (apt(&["install", "-y", "-q", "nginx-light"]) || apt(&["install", "-y", "-q", "nginx"]));
    match candidates.iter().find(|p| p.exists()) {
        Some(p) if installed => Ok(p.clone()),
        _ => bail!("cannot install nginx (run as root with apt, or pass --no-nginx)"),
    }
}

/// nginx as a plain keep-alive reverse proxy (serving HTTPS with `tls`), in the foreground,
/// stopped by PID on drop.
struct Nginx {
    child: Child,
    port: u16,
    https: bool,
}

impl Nginx {
    fn start(bin: &Path, dir: &Path, engines: &[&Proc], tls: Option<&TlsFiles>) -> anyhow::Result<Nginx> {
        std::fs::create_dir_all(dir.join("logs"))?;
        let port = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
        let servers: String = engines.iter().map(|e| format!("    server {};\n", e.addr)).collect();
        // TLS: the router's settings as far as nginx has them (TLS 1.2 and 1.3, a session
        // cache as rustls's), and no limit on requests per connection (nginx closes a
        // connection after 1000 by default: a handshake every 1000 requests, which lmstack
        // does not make).
        let listen = match tls {
            None => format!("listen 127.0.0.1:{port} reuseport;"),
            Some(t) => format!(
                "listen 127.0.0.1:{port} ssl reuseport;\n    ssl_certificate {};\n    ssl_certificate_key {};\n\
    ssl_protocols TLSv1.2 TLSv1.3;\n    ssl_session_cache shared:SSL:10m;\n    keepalive_requests 1000000;",
                t.cert.display(),
                t.key.display()
            ),
        };
        let conf = format!(
            "worker_processes {workers};\nerror_log {dir}/logs/error.log warn;\npid {dir}/nginx.pid;\n\
events {{ worker_connections 8192; }}\n\
http {{\n  access_log off;\n  client_body_temp_path {dir}/body;\n  proxy_temp_path {dir}/proxy;\n\
  upstream engines {{\n{servers}    keepalive 256;\n  }}\n\
  server {{\n    {listen}\n    client_max_body_size 64m;\n\
    location / {{\n      proxy_pass http://engines;\n      proxy_http_version 1.1;\n\
      proxy_set_header Connection \"\";\n      proxy_buffering off;\n      proxy_read_timeout 600s;\n    }}\n  }}\n}}\n",
            workers = std::thread::available_parallelism().map_or(1, |n| n.get()),
            dir = dir.display(),
        );
        let conf_path = dir.join("nginx.conf");
        std::fs::write(&conf_path, conf)?;
        let child = Command::new(bin)
            .arg("-c")
            .arg(&conf_path)
            .arg("-p")
            .arg(dir)
            .args(["-g", "daemon off;"])
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .context("starting nginx")?;
        let start = std::time::Instant::now();
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            anyhow::ensure!(start.elapsed() < Duration::from_secs(10), "nginx did not start");
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(Nginx {
            child,
            port,
            https: tls.is_some(),
        })
    }

    fn url(&self) -> String {
        if self.https {
            format!("https://127.0.0.1:{}", self.port)
        } else {
            format!("http://127.0.0.1:{}", self.port)
        }
    }

    /// The master and its workers.
    fn pids(&self) -> Vec<u32> {
        let master = self.child.id();
        let children = std::fs::read_to_string(format!("/proc/{master}/task/{master}/children")).unwrap_or_default();
        std::iter::once(master)
            .chain(children.split_whitespace().filter_map(|p| p.parse().ok()))
            .collect()
    }
}

impl Drop for Nginx {
    fn drop(&mut self) {
        // SAFETY: kill(2) on our own child's PID; SIGQUIT is nginx's graceful stop.
        unsafe {
            libc::kill(self.child.id() as i32, libc::SIGQUIT);
        }
        let _ = self.child.wait();
    }
}
