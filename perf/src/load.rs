//! `lmstack-load`: a closed-loop load generator for OpenAI endpoints that measures what
//! generic HTTP load tools do not: time to the first streamed event and the gaps between
//! streamed chunks, next to request latency and throughput.
//!
//! Each of `--concurrency` keep-alive connections sends one request after another for
//! `--duration-s`; requests that finish during the `--warmup-s` are not counted. The
//! summary is printed as one JSON object (for scripts) or a short table. Over TLS
//! (`https://`, `--cacert`) each connection shakes hands once and is kept.
//!
//! `mixed` (`mixed.rs`) sends checked traffic of several kinds instead (completions,
//! streams, chats, clients that leave mid-stream), for soaks and upgrades.

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use clap::{Args, Parser};
use hdrhistogram::Histogram;
use http_body_util::{BodyExt, Full};
use hyper::Request;
use hyper::client::conn::http1;
use hyper_util::rt::TokioIo;
use serde::Serialize;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;
use tokio_rustls::rustls;
use tokio_rustls::rustls::pki_types::ServerName;
use tokio_rustls::rustls::pki_types::pem::PemObject;

use crate::multiround::{self, MultiRoundArgs};

pub mod mixed;

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Mode {
    /// Non-streaming `/v1/completions`.
    Completions,
    /// Streaming `/v1/completions` (SSE).
    Stream,
}

#[derive(Clone, Debug, Args)]
pub struct LoadArgs {
    /// Base URL: http://host:port, or https://host:port (with --cacert).
    #[arg(long)]
    pub url: String,
    /// PEM file of the CA that signed an https:// target's certificate.
    #[arg(long)]
    pub cacert: Option<std::path::PathBuf>,
    /// Model of every request.
    #[arg(long, default_value = "sim-model")]
    pub model: String,
    /// What to request.
    #[arg(long, value_enum, default_value = "completions")]
    pub mode: Mode,
    /// Connections, each with one request in flight.
    #[arg(long, default_value_t = 64)]
    pub concurrency: usize,
    /// Measured time, seconds, after the warm-up.
    #[arg(long, default_value_t = 10.0)]
    pub duration_s: f64,
    /// Time under load before measuring, seconds.
    #[arg(long, default_value_t = 2.0)]
    pub warmup_s: f64,
    /// `max_tokens` of every request.
    #[arg(long, default_value_t = 4)]
    pub max_tokens: usize,
    /// Prompt of every request.
    #[arg(long, default_value = "Say hello to the load generator.")]
    pub prompt: String,
    /// Extra request header, `name: value` (repeatable).
    #[arg(long = "header")]
    pub headers: Vec<String>,
    /// Runtime threads.
    #[arg(long, default_value_t = 1)]
    pub threads: usize,
    /// A name for this run in the output.
    #[arg(long, default_value = "run")]
    pub label: String,
    /// Print the summary as JSON.
    #[arg(long)]
    pub json: bool,
}

/// Percentiles in milliseconds.
#[derive(Clone, Debug, Default, Serialize)]
pub struct Percentiles {
    pub count: u64,
    pub mean: f64,
    pub p50: f64,
    pub p90: f64,
    pub p99: f64,
    pub p999: f64,
    pub max: f64,
}

impl Percentiles {
    pub fn of(h: &Histogram<u64>) -> Self {
        let ms = |us: u64| us as f64 / 1000.0;
        if h.is_empty() {
            return Self::default();
        }
        Self {
            count: h.len(),
            mean: h.mean() / 1000.0,
            p50: ms(h.value_at_quantile(0.50)),
            p90: ms(h.value_at_quantile(0.90)),
            p99: ms(h.value_at_quantile(0.99)),
            p999: ms(h.value_at_quantile(0.999)),
            max: ms(h.max()),
        }
    }
}

#[derive(Clone, Debug, Serialize)]
pub struct Summary {
    pub label: String,
    pub mode: Mode,
    pub concurrency: usize,
    pub seconds: f64,
    pub requests: u64,
    /// Requests completed during the whole run, warmup included.
    pub all_requests: u64,
    pub errors: u64,
    pub rps: f64,
    pub latency_ms: Percentiles,
    /// Streaming: time to the first body chunk.
    pub ttfb_ms: Percentiles,
    /// Streaming: gaps between body chunks.
    pub gap_ms: Percentiles,
}

struct Recorder {
    latency: Histogram<u64>,
    ttfb: Histogram<u64>,
    gaps: Histogram<u64>,
    requests: u64,
    all_requests: u64,
    errors: u64,
}

impl Recorder {
    fn new() -> anyhow::Result<Self> {
        let h = || Histogram::<u64>::new_with_bounds(1, 600_000_000, 3);
        Ok(Self {
            latency: h()?,
            ttfb: h()?,
            gaps: h()?,
            requests: 0,
            all_requests: 0,
            errors: 0,
        })
    }

    fn merge(&mut self, other: &Recorder) -> anyhow::Result<()> {
        self.latency.add(&other.latency)?;
        self.ttfb.add(&other.ttfb)?;
        self.gaps.add(&other.gaps)?;
        self.requests += other.requests;
        self.all_requests += other.all_requests;
        self.errors += other.errors;
        Ok(())
    }
}

fn micros(d: Duration) -> u64 {
    (d.as_micros() as u64).max(1)
}

struct Target {
    host_port: String,
    /// `https://`: the client configuration and the name the certificate must have.
    tls: Option<(TlsConnector, ServerName<'static>)>,
    path: &'static str,
    body: Bytes,
    headers: Vec<(String, String)>,
}

#[derive(Parser)]
#[command(name = "lmstack-load", version, about = "Load for OpenAI endpoints")]
enum Cli {
    /// Closed-loop completions: throughput, latency, streaming time to first byte and gaps.
    Bench(LoadArgs),
    /// The multi-round QA workload: chats that re-send their history every round.
    MultiRound(MultiRoundArgs),
    /// Checked traffic of several kinds (completions, streams, chats, clients that leave
    /// mid-stream), errors counted by kind, a per-second timeline.
    Mixed(mixed::MixedArgs),
}

pub fn main() -> anyhow::Result<()> {
    match Cli::parse() {
        Cli::Bench(args) => {
            let summary = run_blocking(&args)?;
            if args.json {
                println!("{}", serde_json::to_string(&summary)?);
            } else {
                print_table(&[summary]);
            }
        }
        Cli::Mixed(args) => {
            let s = mixed::run_blocking(&args)?;
            if args.json {
                println!("{}", serde_json::to_string(&s)?);
            } else {
                mixed::print(&s);
            }
        }
        Cli::MultiRound(args) => {
            let s = multiround::run_blocking(&args)?;
            if args.json {
                println!("{}", serde_json::to_string(&s)?);
            } else {
                println!(
                    "{}: {} requests ({} errors) in {:.1} s, {:.1} rounds/s, TTFT p50 {:.1} ms p90 {:.1} ms p99 {:.1} ms, ITL mean {:.2} ms",
                    s.label,
                    s.requests,
                    s.errors,
                    s.seconds,
                    s.rounds_per_s,
                    s.ttft_ms.p50,
                    s.ttft_ms.p90,
                    s.ttft_ms.p99,
                    s.itl_ms_mean
                );
                if s.follow_ups > 0 {
                    println!(
                        "follow-up rounds on the previous round's engine: {}/{} ({:.3})",
                        s.follow_ups_same_engine, s.follow_ups, s.same_engine_share
                    );
                }
            }
        }
    }
    Ok(())
}

/// Runs the load described by `args` on its own runtime.
pub fn run_blocking(args: &LoadArgs) -> anyhow::Result<Summary> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(args.threads.max(1))
        .enable_all()
        .build()?;
    runtime.block_on(run(args.clone()))
}

async fn run(args: LoadArgs) -> anyhow::Result<Summary> {
    let (host_port, https) = match (args.url.strip_prefix("http://"), args.url.strip_prefix("https://")) {
        (Some(rest), _) => (rest, false),
        (_, Some(rest)) => (rest, true),
        _ => anyhow::bail!("--url must start with http:// or https://"),
    };
    let host_port = host_port.trim_end_matches('/').to_owned();
    let tls = if https {
        let ca = args
            .cacert
            .as_ref()
            .ok_or_else(|| anyhow::anyhow!("an https:// --url needs --cacert"))?;
        Some(tls_client(ca, &host_port)?)
    } else {
        None
    };
    let stream = args.mode == Mode::Stream;
    let body = serde_json::json!({
        "model": args.model,
        "prompt": args.prompt,
        "max_tokens": args.max_tokens,
        "stream": stream,
    });
    let headers = args
        .headers
        .iter()
        .map(|h| {
            h.split_once(':')
                .map(|(n, v)| (n.trim().to_owned(), v.trim().to_owned()))
                .ok_or_else(|| anyhow::anyhow!("--header must be `name: value`"))
        })
        .collect::<anyhow::Result<Vec<_>>>()?;
    let target = Arc::new(Target {
        host_port,
        tls,
        path: "/v1/completions",
        body: Bytes::from(body.to_string()),
        headers,
    });
    let start = Instant::now();
    let warm_at = start + Duration::from_secs_f64(args.warmup_s);
    let end_at = warm_at + Duration::from_secs_f64(args.duration_s);
    let mut tasks = Vec::new();
    for _ in 0..args.concurrency {
        let target = target.clone();
        tasks.push(tokio::spawn(connection_loop(target, warm_at, end_at)));
    }
    let mut total = Recorder::new()?;
    for t in tasks {
        total.merge(&t.await??)?;
    }
    let seconds = args.duration_s;
    Ok(Summary {
        label: args.label.clone(),
        mode: args.mode,
        concurrency: args.concurrency,
        seconds,
        requests: total.requests,
        all_requests: total.all_requests,
        errors: total.errors,
        rps: total.requests as f64 / seconds,
        latency_ms: Percentiles::of(&total.latency),
        ttfb_ms: Percentiles::of(&total.ttfb),
        gap_ms: Percentiles::of(&total.gaps),
    })
}

/// A TLS client trusting the CA in `ca` (PEM), for `host_port`'s host name (or address).
fn tls_client(ca: &std::path::Path, host_port: &str) -> anyhow::Result<(TlsConnector, ServerName<'static>)> {
    let mut roots = rustls::RootCertStore::empty();
    for cert in rustls::pki_types::CertificateDer::pem_file_iter(ca)? {
        roots.add(cert?)?;
    }
    let mut config = rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    let host = host_port.rsplit_once(':').map_or(host_port, |(h, _)| h);
    let name = ServerName::try_from(host.trim_start_matches('[').trim_end_matches(']').to_owned())?;
    Ok((TlsConnector::from(Arc::new(config)), name))
}

async fn connect(target: &Target) -> anyhow::Result<http1::SendRequest<Full<Bytes>>> {
    let stream = TcpStream::connect(&target.host_port).await?;
    stream.set_nodelay(true)?;
    match &target.tls {
        None => handshake(stream).await,
        Some((connector, name)) => handshake(connector.connect(name.clone(), stream).await?).await,
    }
}

async fn handshake<S>(io: S) -> anyhow::Result<http1::SendRequest<Full<Bytes>>>
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let (sender, conn) = http1::handshake(TokioIo::new(io)).await?;
    tokio::spawn(async move {
        let _ = conn.await;
    });
    Ok(sender)
}

async fn connection_loop(target: Arc<Target>, warm_at: Instant, end_at: Instant) -> anyhow::Result<Recorder> {
    let mut rec = Recorder::new()?;
    let mut sender: Option<http1::SendRequest<Full<Bytes>>> = None;
    while Instant::now() < end_at {
        let s = match &mut sender {
            Some(s) if !s.is_closed() => s,
            _ => match connect(&target).await {
                Ok(s) => sender.insert(s),
                Err(_) => {
                    if Instant::now() >= warm_at {
                        rec.errors += 1;
                    }
                    tokio::time::sleep(Duration::from_millis(10)).await;
                    continue;
                }
            },
        };
        let mut req = Request::post(target.path)
            .header("host", target.host_port.as_str())
            .header("content-type", "application/json");
        for (n, v) in &target.headers {
            req = req.header(n.as_str(), v.as_str());
        }
        let req = req.body(Full::new(target.body.clone()))?;
        let t0 = Instant::now();
        let outcome = exchange(s, req, t0).await;
        let done = Instant::now();
        let counted = t0 >= warm_at && done <= end_at;
        match outcome {
            Ok((ttfb, gaps)) => {
                rec.all_requests += 1;
                if counted {
                    rec.requests += 1;
                    rec.latency.record(micros(done - t0))?;
                    if let Some(t) = ttfb {
                        rec.ttfb.record(micros(t))?;
                    }
                    for g in gaps {
                        rec.gaps.record(micros(g))?;
                    }
                }
            }
            Err(_) => {
                sender = None;
                if counted {
                    rec.errors += 1;
                }
            }
        }
    }
    Ok(rec)
}

/// Sends one request and reads its body, timing the chunks.
async fn exchange(
    sender: &mut http1::SendRequest<Full<Bytes>>,
    req: Request<Full<Bytes>>,
    t0: Instant,
) -> anyhow::Result<(Option<Duration>, Vec<Duration>)> {
    sender.ready().await?;
    let resp = sender.send_request(req).await?;
    let ok = resp.status().is_success();
    let mut body = resp.into_body();
    let mut first = None;
    let mut last = None;
    let mut gaps = Vec::new();
    while let Some(frame) = body.frame().await {
        let frame = frame?;
        if frame.data_ref().is_some_and(|d| !d.is_empty()) {
            let now = Instant::now();
            match last {
                None => first = Some(now - t0),
                Some(l) => gaps.push(now - l),
            }
            last = Some(now);
        }
    }
    anyhow::ensure!(ok, "non-success status");
    Ok((first, gaps))
}

/// Prints summaries as an aligned table.
pub fn print_table(rows: &[Summary]) {
    println!(
        "{:<28} {:>10} {:>8} {:>9} {:>9} {:>9} {:>9} {:>10} {:>10} {:>9} {:>9}",
        "run",
        "req/s",
        "errors",
        "p50 ms",
        "p99 ms",
        "p99.9 ms",
        "max ms",
        "ttfb p50",
        "ttfb p99",
        "gap p50",
        "gap p99"
    );
    for s in rows {
        println!(
            "{:<28} {:>10.0} {:>8} {:>9.3} {:>9.3} {:>9.3} {:>9.3} {:>10.3} {:>10.3} {:>9.3} {:>9.3}",
            s.label,
            s.rps,
            s.errors,
            s.latency_ms.p50,
            s.latency_ms.p99,
            s.latency_ms.p999,
            s.latency_ms.max,
            s.ttfb_ms.p50,
            s.ttfb_ms.p99,
            s.gap_ms.p50,
            s.gap_ms.p99
        );
    }
}
