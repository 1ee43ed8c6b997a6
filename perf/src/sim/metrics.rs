//! The simulator's `/metrics`, with vLLM's metric names and labels (`model_name`,
//! `engine`), so that whatever scrapes vLLM (lmstack-control, Prometheus rules, dashboards)
//! reads the simulator the same way.

use metrics::{Counter, Gauge, Histogram, counter, gauge, histogram};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};

pub const NUM_REQUESTS_RUNNING: &str = "vllm:num_requests_running";
pub const NUM_REQUESTS_WAITING: &str = "vllm:num_requests_waiting";
pub const KV_CACHE_USAGE: &str = "vllm:kv_cache_usage_perc";
pub const PREFIX_CACHE_QUERIES: &str = "vllm:prefix_cache_queries_total";
pub const PREFIX_CACHE_HITS: &str = "vllm:prefix_cache_hits_total";
pub const PROMPT_TOKENS: &str = "vllm:prompt_tokens_total";
pub const GENERATION_TOKENS: &str = "vllm:generation_tokens_total";
pub const REQUEST_SUCCESS: &str = "vllm:request_success_total";
pub const NUM_PREEMPTIONS: &str = "vllm:num_preemptions_total";
pub const TTFT: &str = "vllm:time_to_first_token_seconds";
pub const ITL: &str = "vllm:inter_token_latency_seconds";
pub const E2E: &str = "vllm:e2e_request_latency_seconds";
pub const QUEUE_TIME: &str = "vllm:request_queue_time_seconds";
pub const PREFILL_TIME: &str = "vllm:request_prefill_time_seconds";
pub const DECODE_TIME: &str = "vllm:request_decode_time_seconds";
pub const CACHE_CONFIG_INFO: &str = "vllm:cache_config_info";
/// The process's start (seconds since the Unix epoch), as prometheus_client exports it: what
/// tells a restarted engine from the one before.
pub const PROCESS_START_TIME: &str = "process_start_time_seconds";

/// Installs the process-wide recorder (one engine per process).
pub fn install() -> PrometheusHandle {
    let ttft = [
        0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0,
    ];
    let itl = [
        0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0,
    ];
    let latency = [
        0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0, 240.0, 480.0, 960.0,
    ];
    let builder = PrometheusBuilder::new()
        .set_buckets_for_metric(Matcher::Full(TTFT.into()), &ttft)
        .and_then(|b| b.set_buckets_for_metric(Matcher::Full(ITL.into()), &itl))
        .and_then(|b| b.set_buckets_for_metric(Matcher::Suffix("_time_seconds".into()), &latency))
        .and_then(|b| b.set_buckets_for_metric(Matcher::Full(E2E.into()), &latency));
    let handle = match builder.and_then(|b| b.install_recorder()) {
        Ok(handle) => handle,
        Err(e) => panic!("cannot install the metrics recorder: {e}"),
    };
    let start = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64());
    gauge!(PROCESS_START_TIME).set(start);
    handle
}

/// Handles for one engine's metrics.
#[derive(Clone)]
pub struct SimMetrics {
    running: Gauge,
    waiting: Gauge,
    kv_usage: Gauge,
    queries: Counter,
    hits: Counter,
    prompt_tokens: Counter,
    pub generation_tokens: Counter,
    success_length: Counter,
    success_stop: Counter,
    success_abort: Counter,
    pub ttft: Histogram,
    pub itl: Histogram,
    pub e2e: Histogram,
    pub queue_time: Histogram,
    pub prefill_time: Histogram,
    pub decode_time: Histogram,
}

impl SimMetrics {
    pub fn new(model: &str, block_size: usize, num_blocks: usize) -> Self {
        let labels = [("model_name", model.to_owned()), ("engine", "0".to_owned())];
        let success = |reason: &'static str| counter!(REQUEST_SUCCESS, "model_name" => model.to_owned(), "engine" => "0", "finished_reason" => reason);
        counter!(NUM_PREEMPTIONS, &labels).absolute(0);
        gauge!(
            CACHE_CONFIG_INFO,
            "engine" => "0",
            "block_size" => block_size.to_string(),
            "num_gpu_blocks" => num_blocks.to_string(),
            "enable_prefix_caching" => "True",
            "prefix_caching_hash_algo" => "xxh3-sim",
            "cache_dtype" => "auto"
        )
        .set(1.0);
        let m = Self {
            running: gauge!(NUM_REQUESTS_RUNNING, &labels),
            waiting: gauge!(NUM_REQUESTS_WAITING, &labels),
            kv_usage: gauge!(KV_CACHE_USAGE, &labels),
            queries: counter!(PREFIX_CACHE_QUERIES, &labels),
            hits: counter!(PREFIX_CACHE_HITS, &labels),
            prompt_tokens: counter!(PROMPT_TOKENS, &labels),
            generation_tokens: counter!(GENERATION_TOKENS, &labels),
            success_length: success("length"),
            success_stop: success("stop"),
            success_abort: success("abort"),
            ttft: histogram!(TTFT, &labels),
            itl: histogram!(ITL, &labels),
            e2e: histogram!(E2E, &labels),
            queue_time: histogram!(QUEUE_TIME, &labels),
            prefill_time: histogram!(PREFILL_TIME, &labels),
            decode_time: histogram!(DECODE_TIME, &labels),
        };
        m.state(0, 0, 0, num_blocks);
        m
    }

    pub fn prompt(&self, prompt_tokens: usize, cached_tokens: usize) {
        self.queries.increment(prompt_tokens as u64);
        self.hits.increment(cached_tokens as u64);
        self.prompt_tokens.increment(prompt_tokens as u64);
    }

    pub fn state(&self, running: usize, waiting: usize, blocks_in_use: usize, capacity: usize) {
        self.running.set(running as f64);
        self.waiting.set(waiting as f64);
        self.kv_usage.set(if capacity == 0 {
            0.0
        } else {
            blocks_in_use as f64 / capacity as f64
        });
    }

    pub fn finished(&self, reason: FinishReason) {
        match reason {
            FinishReason::Length => self.success_length.increment(1),
            FinishReason::Stop => self.success_stop.increment(1),
            FinishReason::Abort => self.success_abort.increment(1),
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FinishReason {
    Length,
    Stop,
    Abort,
}

impl FinishReason {
    pub fn as_str(self) -> &'static str {
        match self {
            FinishReason::Length => "length",
            FinishReason::Stop => "stop",
            FinishReason::Abort => "abort",
        }
    }
}
