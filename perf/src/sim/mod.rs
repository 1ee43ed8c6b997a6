//! `lmstack-sim`: an engine simulator that behaves like a vLLM OpenAI server, so that
//! tests, demos and benchmarks need no GPU.
//!
//! It serves vLLM's routes with vLLM's response and SSE chunk shapes, exports vLLM's metric
//! names, and models an engine's costs: a KV block pool with prefix caching, time to first
//! token growing with the uncached prompt, decode time growing with the running sequences,
//! and a bounded running set with a waiting queue (see `engine.rs`). It runs on tokio and
//! hyper, a different HTTP stack from the router's, which keeps the router honest.
//!
//! For exact KV routing it can also tokenize with a model's real tokenizer and chat template
//! (`--tokenizer`) and publish vLLM's KV events over ZeroMQ (`--kv-events-port`,
//! `kv_events.rs`), so that what it announces is what a vLLM engine would for the same
//! requests.
//!
//! For mid-stream failover, its output is greedy and deterministic, a function of the context
//! (`greedy.rs`): a request whose prompt is extended by the first tokens of an answer (token
//! ids, text, or a chat's final assistant message with `continue_final_message`) is answered
//! with the rest of that answer. And it fails on demand as a dying engine does, on the real
//! socket (`POST /sim/fault`, `--fault`, `fault.rs`).

pub mod api;
pub mod engine;
pub mod fault;
pub mod greedy;
pub mod kv;
pub mod kv_events;
pub mod metrics;
pub mod responses;
pub mod tokens;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use clap::{Parser, ValueEnum};
use hyper::server::conn::http1;
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;

use self::engine::{Engine, EngineConfig};
use self::fault::{FaultSpec, FaultyStream, Tap};
use self::kv_events::{KvEventsConfig, Publisher};
use self::tokens::Tokenizer;

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
    /// Tokenize prompts with this model directory's tokenizer and chat template
    /// (`tokenizer.json`, `tokenizer_config.json`, `chat_template.jinja`), as vLLM does, instead
    /// of the simulator's own hash tokenizer: prompt token ids, and so KV blocks and events,
    /// are then a real engine's.
    #[arg(long, value_name = "DIR")]
    pub tokenizer: Option<PathBuf>,
    /// Publish vLLM's KV cache events on a ZeroMQ PUB socket bound on tcp://HOST:PORT (HOST is
    /// --host); 0: no events, and no `/kv_event_sources`.
    #[arg(long, value_name = "PORT", default_value_t = 0)]
    pub kv_events_port: u16,
    /// Serve replays of recent KV event batches on a ZeroMQ ROUTER socket bound on
    /// tcp://HOST:PORT, as vLLM's `replay_endpoint`; 0: none. Needs --kv-events-port.
    #[arg(long, value_name = "PORT", default_value_t = 0)]
    pub kv_events_replay_port: u16,
    /// KV event batches kept for replay (vLLM's `buffer_steps`).
    #[arg(long, default_value_t = 10_000)]
    pub kv_events_buffer_steps: usize,
    /// The topic (first frame) of every KV event message.
    #[arg(long, default_value = "")]
    pub kv_events_topic: String,
    /// How KV events are encoded: `tagged` (maps with a "type" key, vLLM 0.9 and later) or
    /// `positional` (arrays, older releases).
    #[arg(long, value_enum, default_value_t = EventEncoding::Tagged)]
    pub kv_events_encoding: EventEncoding,
    /// Which cache hits are announced: `incremental` (vLLM's default: only newly stored blocks,
    /// unless a request asks with `vllm_xargs: {"kv_cache_report_mode": "full"}`) or `full`
    /// (every request's hit is announced again from the first block, as vLLM does for a
    /// request in `full` mode).
    #[arg(long, value_enum, default_value_t = ReportMode::Incremental)]
    pub kv_cache_report_mode: ReportMode,
    /// Arm a fault at start, for every matching request until `POST /sim/fault` changes it:
    /// KIND[:N], N the events before a mid-stream fault, or the status of `status` (see
    /// `fault.rs`: reset_before_head, close_before_head, hang_before_head, status, garbage,
    /// reset_mid_stream, cut_mid_stream, stall_mid_stream, exit_mid_stream).
    #[arg(long, value_name = "KIND[:N]")]
    pub fault: Option<FaultSpec>,
    /// Stored Responses held at most (vLLM's store never forgets; this one drops the oldest).
    #[arg(long, default_value_t = 10_000)]
    pub max_stored_responses: usize,
}

/// `--kv-events-encoding`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum EventEncoding {
    Tagged,
    Positional,
}

/// `--kv-cache-report-mode`: vLLM's per-request `kv_cache_report_mode`, for every request.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum ReportMode {
    Incremental,
    Full,
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
    anyhow::ensure!(
        args.kv_events_replay_port == 0 || args.kv_events_port != 0,
        "--kv-events-replay-port needs --kv-events-port"
    );
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
    let tokenizer = match &args.tokenizer {
        Some(dir) => Tokenizer::model(dir).with_context(|| format!("--tokenizer {}", dir.display()))?,
        None => Tokenizer::Hash {
            chars_per_token: args.chars_per_token,
        },
    };
    let listener = TcpListener::bind((args.host.as_str(), args.port)).await?;
    let bound: SocketAddr = listener.local_addr()?;
    let publisher = if args.kv_events_port == 0 {
        None
    } else {
        Some(
            Publisher::start(KvEventsConfig {
                host: args.host.clone(),
                port: args.kv_events_port,
                replay_port: Some(args.kv_events_replay_port).filter(|&p| p != 0),
                buffer_steps: args.kv_events_buffer_steps,
                topic: args.kv_events_topic.clone(),
                encoding: match args.kv_events_encoding {
                    EventEncoding::Tagged => lmstack_kv::event::Encoding::Tagged,
                    EventEncoding::Positional => lmstack_kv::event::Encoding::Positional,
                },
            })
            .await?,
        )
    };
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
        publisher.as_ref().map(Publisher::sink),
    );
    let kv_events = (args.kv_events_port, args.kv_events_replay_port);
    let sim = Arc::new(api::Sim::new(args, bound, engine, prometheus, tokenizer, publisher));
    println!("lmstack-sim listening on http://{bound} as {}", sim.name);
    if kv_events.0 != 0 {
        let replay = Some(kv_events.1)
            .filter(|&p| p != 0)
            .map_or(String::new(), |p| format!(", replays on port {p}"));
        println!("lmstack-sim publishing KV events on port {}{replay}", kv_events.0);
    }
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
            let tap = Arc::new(Tap::default());
            let stream = FaultyStream::new(stream, tap.clone());
            let service = hyper::service::service_fn(move |req| api::handle(sim.clone(), tap.clone(), req));
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
