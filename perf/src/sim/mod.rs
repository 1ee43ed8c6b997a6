//! `lmstack-sim`: an engine simulator that behaves like a vLLM OpenAI server, so that
//! tests, demos and benchmarks need no GPU.
//!
//! It serves vLLM's routes with vLLM's response and SSE chunk shapes, exports vLLM's metric
//! names, and models an engine's costs: a KV block pool with prefix caching, time to first
//! token growing with the uncached prompt, decode time growing with the running sequences,
//! and a bounded running set with a waiting queue (see `engine.rs`). It runs on tokio and
//! hyper, a different HTTP stack from the router's, which keeps the router honest.

pub mod api;
pub mod engine;
pub mod kv;
pub mod metrics;
pub mod tokens;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use clap::Parser;
use hyper::server::conn::http1;
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;

use self::engine::{Engine, EngineConfig};

/// Every knob of the simulated engine.
#[derive(Clone, Debug, Parser)]
#[command(name = "lmstack-sim", version, about = "A vLLM-compatible engine simulator")]
pub struct SimArgs {
    /// Address to listen on.
    #[arg(long, default_value = "127.0.0.1")]
    pub host: String,
    /// 0 picks a free port (printed at start).
    #[arg(long, default_value_t = 8000)]
    pub port: u16,
    /// Served model names (repeat or comma-separate); the first is the base model.
    #[arg(long = "model", value_delimiter = ',', default_value = "sim-model")]
    pub models: Vec<String>,
    /// LoRA adapters listed by /v1/models with the base model as parent.
    #[arg(long = "lora", value_delimiter = ',')]
    pub loras: Vec<String>,
    /// Name shown in the `x-sim-engine` response header (default: host:port).
    #[arg(long)]
    pub name: Option<String>,
    /// Tokens per KV block.
    #[arg(long, default_value_t = 16)]
    pub block_size: usize,
    /// KV cache capacity, in blocks.
    #[arg(long, default_value_t = 8192)]
    pub num_gpu_blocks: usize,
    /// Most sequences running at once; more wait in the queue.
    #[arg(long, default_value_t = 256)]
    pub max_num_seqs: usize,
    /// Most tokens of a request, prompt plus `max_tokens`; a longer one is refused (400).
    #[arg(long, default_value_t = 32768)]
    pub max_model_len: usize,
    /// Prefills that run at once (1 for a vLLM engine). More lanes model one engine with the
    /// compute of several: the routing benchmark's limit, where a pool's engines are merged.
    #[arg(long, default_value_t = 1)]
    pub prefill_lanes: usize,
    /// Fixed prefill cost per request, ms.
    #[arg(long, default_value_t = 2.0)]
    pub prefill_base_ms: f64,
    /// Prefill cost per uncached prompt token, microseconds.
    #[arg(long, default_value_t = 20.0)]
    pub prefill_us_per_token: f64,
    /// Time per output token with one running sequence, ms.
    #[arg(long, default_value_t = 10.0)]
    pub decode_base_ms: f64,
    /// Added to the time per output token for every other running sequence, microseconds.
    #[arg(long, default_value_t = 50.0)]
    pub decode_us_per_seq: f64,
    /// Hit the first-token and token deadlines to within tens of microseconds instead of
    /// tokio's millisecond (a blocking-pool thread sleeps the last 2 ms of each wait; costs a
    /// thread hand-off per token). For checks that compare timings against these settings.
    #[arg(long)]
    pub precise_timers: bool,
    /// Output tokens when the request sets no max_tokens.
    #[arg(long, default_value_t = 16)]
    pub default_max_tokens: usize,
    /// Bytes of text per prompt token.
    #[arg(long, default_value_t = 4)]
    pub chars_per_token: usize,
    /// Embedding vector length.
    #[arg(long, default_value_t = 32)]
    pub embedding_dim: usize,
    /// Largest request body, bytes.
    #[arg(long, default_value_t = 64 * 1024 * 1024)]
    pub max_body_bytes: usize,
    /// Runtime worker threads (1: a current-thread runtime).
    #[arg(long, default_value_t = 1)]
    pub threads: usize,
}

fn ms(v: f64) -> Duration {
    Duration::from_secs_f64(v.max(0.0) / 1e3)
}

fn us(v: f64) -> Duration {
    Duration::from_secs_f64(v.max(0.0) / 1e6)
}

pub fn main() -> anyhow::Result<()> {
    let args = SimArgs::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr)
        .init();
    anyhow::ensure!(args.block_size > 0, "--block-size must be positive");
    anyhow::ensure!(args.num_gpu_blocks > 0, "--num-gpu-blocks must be positive");
    anyhow::ensure!(args.max_num_seqs > 0, "--max-num-seqs must be positive");
    anyhow::ensure!(args.prefill_lanes > 0, "--prefill-lanes must be positive");
    anyhow::ensure!(!args.models.is_empty(), "--model is required");
    let runtime = if args.threads <= 1 {
        tokio::runtime::Builder::new_current_thread().enable_all().build()?
    } else {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(args.threads)
            .enable_all()
            .build()?
    };
    runtime.block_on(serve(args))
}

async fn serve(args: SimArgs) -> anyhow::Result<()> {
    let prometheus = metrics::install();
    let listener = TcpListener::bind((args.host.as_str(), args.port)).await?;
    let bound: SocketAddr = listener.local_addr()?;
    let engine = Engine::new(
        EngineConfig {
            block_size: args.block_size,
            num_blocks: args.num_gpu_blocks,
            max_num_seqs: args.max_num_seqs,
            max_model_len: args.max_model_len,
            prefill_lanes: args.prefill_lanes,
            prefill_base: ms(args.prefill_base_ms),
            prefill_per_token: us(args.prefill_us_per_token),
            decode_base: ms(args.decode_base_ms),
            decode_per_seq: us(args.decode_us_per_seq),
            precise_timers: args.precise_timers,
        },
        metrics::SimMetrics::new(&args.models[0], args.block_size, args.num_gpu_blocks),
    );
    let sim = Arc::new(api::Sim::new(args, bound, engine, prometheus));
    println!("lmstack-sim listening on http://{bound} as {}", sim.name);
    loop {
        let (stream, _) = match listener.accept().await {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!("accept: {e}");
                tokio::time::sleep(Duration::from_millis(20)).await;
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        let sim = sim.clone();
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |req| api::handle(sim.clone(), req));
            if let Err(e) = http1::Builder::new()
                .keep_alive(true)
                .serve_connection(TokioIo::new(stream), service)
                .await
            {
                tracing::debug!("connection: {e}");
            }
        });
    }
}
