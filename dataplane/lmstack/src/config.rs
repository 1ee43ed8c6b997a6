//! Configuration: one set of defaults (the `Default` impls below), read from a YAML file,
//! overridden by command-line flags, and validated whole before anything starts.
//!
//! The flags include production-stack's router flags (`--static-backends`, `--routing-logic`,
//! ...) so that its deployments can switch without rewriting their arguments. Nothing here
//! falls back silently: unknown keys, unknown policy names and bad values are errors.

use std::collections::BTreeMap;
use std::net::{SocketAddr, ToSocketAddrs};
use std::path::{Path, PathBuf};
use std::time::Duration;

use clap::Parser;
use lmstack_http::head::MAX_HEADERS_CAP;
pub use lmstack_probe::{BackendUrl, HealthCheckConfig};
use lmstack_route::affinity::{SLOT_BYTES, WAYS};
use lmstack_route::{AffinityLimits, Bound, PolicyName, PolicyParams};
use serde::{Deserialize, Serialize};

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    pub listen: ListenConfig,
    /// Worker threads, one monoio runtime and one SO_REUSEPORT listener each. 0: one per
    /// available core.
    pub workers: usize,
    /// Pin worker `i` to core `i` (off by default: shared nodes and CPU limits make pinning
    /// harmful more often than not).
    pub pin_workers: bool,
    pub server: ServerConfig,
    pub upstream: UpstreamConfig,
    pub discovery: DiscoveryConfig,
    pub routing: RoutingConfig,
    pub kv_events: KvEventsConfig,
    pub resume: ResumeConfig,
    pub outlier: OutlierConfig,
    pub tenancy: TenancyConfig,
    pub admission: AdmissionConfig,
    pub log: LogConfig,
    pub tracing: TracingConfig,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ListenConfig {
    pub host: String,
    /// 0 picks a free port (printed at start).
    pub port: u16,
    /// Listen backlog per worker socket.
    pub backlog: u32,
    /// Share the port with a running lmstack (SO_REUSEPORT, same user) instead of refusing
    /// it: a zero-downtime upgrade starts the new process with this, then sends SIGTERM to
    /// the old one, which stops listening at once and drains.
    pub takeover: bool,
    pub tls: TlsConfig,
}

impl Default for ListenConfig {
    fn default() -> Self {
        Self {
            host: "0.0.0.0".into(),
            port: 8001,
            backlog: 4096,
            takeover: false,
            tls: TlsConfig::default(),
        }
    }
}

/// TLS on the client side (rustls; TLS 1.2 and 1.3, ALPN `http/1.1`): on when `cert_file`
/// and `key_file` are set. Both files are read again every `reload_interval_ms`; a changed
/// pair that loads serves new connections (open ones keep theirs), one that does not is
/// logged and counted, and the current pair stays.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TlsConfig {
    /// PEM file with the certificate chain, the router's own certificate first.
    pub cert_file: Option<PathBuf>,
    /// PEM file with the private key (PKCS#8, PKCS#1 or SEC1).
    pub key_file: Option<PathBuf>,
    /// How often both files are read again (a renewed certificate, a Kubernetes Secret
    /// updated in place).
    pub reload_interval_ms: u64,
    /// Time allowed for a client's TLS handshake, from its connection.
    pub handshake_timeout_ms: u64,
}

impl Default for TlsConfig {
    fn default() -> Self {
        Self {
            cert_file: None,
            key_file: None,
            reload_interval_ms: 5_000,
            handshake_timeout_ms: 10_000,
        }
    }
}

impl TlsConfig {
    /// The certificate and key files, when TLS is on.
    pub fn files(&self) -> Option<(&Path, &Path)> {
        Some((self.cert_file.as_deref()?, self.key_file.as_deref()?))
    }
}

/// Limits on the client side.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ServerConfig {
    /// Largest request head (request line and headers).
    pub max_header_bytes: usize,
    /// Most request header lines.
    pub max_headers: usize,
    /// Largest request body; larger ones get 413.
    pub max_body_bytes: usize,
    /// Time allowed for a request head, from its first byte.
    pub header_timeout_ms: u64,
    /// Time allowed for a request body, from the end of its head.
    pub body_timeout_ms: u64,
    /// Idle time allowed between requests on a kept-alive connection.
    pub keepalive_timeout_ms: u64,
    /// Time a single write to a client may block (a client that stops reading).
    pub write_timeout_ms: u64,
    /// Time a request runs before the router starts watching its client for a disconnect
    /// (one read, cancelled if the response ends first: about 1 us of kernel time). Quicker
    /// requests skip it; a client that leaves is noticed at most this much later, so an
    /// engine works at most this long (a few tokens) for nobody. 0: watch from the start.
    pub client_watch_delay_ms: u64,
    /// Open client connections across all workers; beyond it, accepting pauses.
    pub max_connections: usize,
    /// Time to let in-flight requests finish after SIGTERM/SIGINT.
    pub shutdown_grace_ms: u64,
    /// At start, how long to wait for the first routing snapshot before accepting
    /// connections (they wait in the listen backlog meanwhile, rather than being told no
    /// model exists: a router taking over a port starts serving ready); past it, the
    /// router accepts anyway.
    pub ready_timeout_ms: u64,
    /// While draining, how long an idle client connection may still bring a request
    /// (answered, with `connection: close`) before it is closed: a busy client's next
    /// request is not met by a closing connection.
    pub drain_idle_ms: u64,
}

impl Default for ServerConfig {
    fn default() -> Self {
        Self {
            max_header_bytes: 64 * 1024,
            max_headers: 128,
            max_body_bytes: 64 * 1024 * 1024,
            header_timeout_ms: 10_000,
            body_timeout_ms: 60_000,
            keepalive_timeout_ms: 75_000,
            write_timeout_ms: 60_000,
            client_watch_delay_ms: 50,
            max_connections: 65_536,
            shutdown_grace_ms: 10_000,
            drain_idle_ms: 1_000,
            ready_timeout_ms: 10_000,
        }
    }
}

/// The engine side.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct UpstreamConfig {
    /// Time allowed to open a TCP connection to an engine.
    pub connect_timeout_ms: u64,
    /// Time allowed from sending a request until the response head arrives. Non-streaming
    /// requests send nothing until generation ends, so this bounds their whole generation.
    pub first_byte_timeout_ms: u64,
    /// Longest silence allowed while a response body arrives (other than an SSE stream's).
    pub idle_timeout_ms: u64,
    /// Time allowed for the response head of a streaming request. vLLM sends it at once
    /// (before the first token), so an engine that has not answered by then is hung: the
    /// request goes to another endpoint (and the engine counts a failure).
    pub stream_head_timeout_ms: u64,
    /// Longest silence allowed inside an SSE stream (between events). Past it the engine
    /// counts as failed and the stream is resumed elsewhere (`resume`).
    pub stream_idle_timeout_ms: u64,
    /// Largest single SSE event accepted from an engine (a stream's events are relayed
    /// whole, so that a cut stream can end cleanly).
    pub max_event_bytes: usize,
    /// Idle pooled connections older than this are closed. vLLM (uvicorn) closes idle
    /// keep-alive connections after 5 s, so the default stays under that.
    pub pool_idle_timeout_ms: u64,
    /// Idle connections kept per endpoint, per worker.
    pub pool_max_idle_per_endpoint: usize,
    /// Further attempts, on another endpoint where there is one, when a request fails before
    /// any response byte (connection refused or reset, stale pooled connection).
    pub max_retries: u32,
    /// Largest response head accepted from an engine.
    pub max_response_header_bytes: usize,
    /// Requests in flight per endpoint across all workers; 0: no limit. When every eligible
    /// endpoint is at the limit, requests wait in the router's queue.
    pub max_inflight_per_endpoint: u32,
    /// Time a request may wait in the router's queue before a 503.
    pub queue_timeout_ms: u64,
    /// Requests waiting in the router's queue, per worker; beyond it, 503 at once.
    pub max_queued_per_worker: usize,
}

impl Default for UpstreamConfig {
    fn default() -> Self {
        Self {
            connect_timeout_ms: 3_000,
            first_byte_timeout_ms: 600_000,
            idle_timeout_ms: 300_000,
            stream_head_timeout_ms: 10_000,
            stream_idle_timeout_ms: 30_000,
            max_event_bytes: 4 * 1024 * 1024,
            pool_idle_timeout_ms: 4_000,
            pool_max_idle_per_endpoint: 256,
            max_retries: 2,
            max_response_header_bytes: 64 * 1024,
            max_inflight_per_endpoint: 0,
            queue_timeout_ms: 30_000,
            max_queued_per_worker: 4096,
        }
    }
}

/// Mid-stream continuation: a streaming `/v1/completions` or `/v1/chat/completions` request
/// whose engine fails after the response began goes on on another endpoint, and the client
/// sees one stream.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ResumeConfig {
    /// Resume cut streams (off: a cut stream ends with an error event).
    pub enabled: bool,
    /// Continuations per stream (each on an endpoint the stream has not used).
    pub max_attempts: u32,
    /// Time from a cut until the continuation's response head has come; past it the stream
    /// ends with an error event.
    pub deadline_ms: u64,
    /// What a stream's ledger keeps (the text and token ids sent); a longer stream is not
    /// resumed.
    pub max_bytes: usize,
    /// Ask engines for token ids (vLLM's `return_token_ids`, hidden from clients that did
    /// not ask), so that completions continue on the exact tokens and every count is exact.
    pub token_ids: bool,
}

impl Default for ResumeConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            max_attempts: 2,
            deadline_ms: 30_000,
            max_bytes: 1024 * 1024,
            token_ids: true,
        }
    }
}

/// Passive health: an endpoint that fails requests in a row (connect errors, resets, hangs,
/// cut streams, 5xx) is taken out of rotation for a while, next to active probing.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct OutlierConfig {
    /// Failures in a row that eject an endpoint; 0 turns ejection off.
    pub consecutive_failures: u32,
    /// First ejection's length; each further ejection without a success in between doubles it.
    pub base_ejection_ms: u64,
    /// Longest ejection.
    pub max_ejection_ms: u64,
    /// Share of a model's endpoints that may be ejected at once, percent (at least one
    /// endpoint always stays).
    pub max_ejected_percent: u32,
}

impl Default for OutlierConfig {
    fn default() -> Self {
        Self {
            consecutive_failures: 5,
            base_ejection_ms: 10_000,
            max_ejection_ms: 300_000,
            max_ejected_percent: 50,
        }
    }
}

/// Admission when engines are busy or not there yet: requests held for a model without a
/// ready endpoint, and what counts as a saturated endpoint (requests then wait in the
/// router's queue, `upstream.max_queued_per_worker` and `queue_timeout_ms`, in priority
/// and fair-share order).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AdmissionConfig {
    /// How long a request for a model whose endpoints are all unready (scaling up from
    /// zero, restarting) is held before it fails (503). 0: fail at once.
    pub hold_timeout_ms: u64,
    /// Models (names, or a prefix ending in `*`) held for even before any endpoint serves
    /// them (scaled to zero); any other model no endpoint serves is 404 at once.
    pub hold_models: Vec<String>,
    /// Requests held at once per worker; beyond it, 503.
    pub max_held_per_worker: usize,
    /// An endpoint whose engine reports more waiting requests than this (vLLM's
    /// `num_requests_waiting`, as probed) takes no new request; 0: no limit.
    pub max_engine_waiting: u32,
    /// An endpoint whose engine's KV cache usage (0 to 1, as probed) is above this takes
    /// no new request; 1: no limit.
    pub max_kv_usage: f64,
}

impl Default for AdmissionConfig {
    fn default() -> Self {
        Self {
            hold_timeout_ms: 30_000,
            hold_models: Vec::new(),
            max_held_per_worker: 1024,
            max_engine_waiting: 0,
            max_kv_usage: 1.0,
        }
    }
}

/// API keys, tenants and their budgets. Off unless `keys_file` is set: then every model
/// route and `/v1/models` needs a key (`/health`, `/version` and `/metrics` do not).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TenancyConfig {
    /// The keys file (YAML or JSON: tenants, their keys as SHA-256 hashes, allowed models,
    /// budgets; see the README), re-read when it changes.
    pub keys_file: Option<PathBuf>,
    /// How often the keys file is checked for changes.
    pub reload_interval_ms: u64,
    /// Output tokens reserved at admission for a request that sets no `max_tokens` (settled
    /// from the engine's usage when the response ends).
    pub default_max_tokens: u64,
    /// Prompt bytes per token for the estimate reserved at admission (settled from usage).
    pub prompt_bytes_per_token: u64,
}

impl Default for TenancyConfig {
    fn default() -> Self {
        Self {
            keys_file: None,
            reload_interval_ms: 2_000,
            default_max_tokens: 1_024,
            prompt_bytes_per_token: 4,
        }
    }
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DiscoveryMode {
    /// A fixed list of backends (`discovery.backends`), health-checked by the router itself.
    #[default]
    Static,
    /// Backends listed in a file (`discovery.file`), re-read when it changes, health-checked
    /// by the router itself.
    File,
    /// Snapshots streamed by lmstack-control (`discovery.control`).
    Control,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct DiscoveryConfig {
    pub mode: DiscoveryMode,
    /// Static backends.
    pub backends: Vec<BackendConfig>,
    /// File mode: a YAML (or JSON) file holding `backends:` as in this section.
    pub file: Option<PathBuf>,
    pub control: ControlConfig,
    pub health: HealthCheckConfig,
    /// Read each healthy engine's `/metrics` every interval (running and waiting requests,
    /// KV usage, prefix cache counters) for load-aware routing.
    pub scrape_metrics: bool,
}

impl Default for DiscoveryConfig {
    fn default() -> Self {
        Self {
            mode: DiscoveryMode::Static,
            backends: Vec::new(),
            file: None,
            control: ControlConfig::default(),
            health: HealthCheckConfig::default(),
            scrape_metrics: true,
        }
    }
}

/// How the router follows lmstack-control.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ControlConfig {
    /// lmstack-control's base URL, `http://host:port`.
    pub url: String,
    /// Time allowed to connect and get the stream's response head.
    pub connect_timeout_ms: u64,
    /// Silence on the stream (control sends a heartbeat every second) after which the
    /// connection is given up and opened again.
    pub stale_after_ms: u64,
    /// Wait before reconnecting; doubles after each failure up to `max_backoff_ms`.
    pub backoff_ms: u64,
    pub max_backoff_ms: u64,
    /// Largest message accepted on the stream.
    pub max_message_bytes: usize,
    /// Report this router's prefix assignments to control and apply other replicas' (so
    /// that every replica routes a prefix the same way).
    pub share_affinity: bool,
    /// How often assignments are reported (the bulk of the delay before other replicas
    /// know them).
    pub affinity_report_interval_ms: u64,
    /// Prompt blocks waiting to be reported, at most; more are dropped (and counted).
    pub affinity_max_pending_blocks: usize,
}

impl Default for ControlConfig {
    fn default() -> Self {
        Self {
            url: "http://lmstack-control:8090".into(),
            connect_timeout_ms: 2_000,
            stale_after_ms: 5_000,
            backoff_ms: 200,
            max_backoff_ms: 5_000,
            max_message_bytes: 64 * 1024 * 1024,
            share_affinity: true,
            affinity_report_interval_ms: 100,
            affinity_max_pending_blocks: 1 << 20,
        }
    }
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BackendConfig {
    /// `http://host:port` of a vLLM (or compatible) server.
    pub url: String,
    /// Models it serves; empty: ask its `/v1/models` (and keep asking, to follow LoRA
    /// adapters being loaded and unloaded).
    #[serde(default)]
    pub models: Vec<String>,
}

/// The file of `discovery.mode: file`.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BackendsFile {
    pub backends: Vec<BackendConfig>,
}

impl BackendsFile {
    pub fn parse(text: &str) -> Result<Vec<BackendConfig>, String> {
        let file: BackendsFile = serde_yaml_ng::from_str(text).map_err(|e| e.to_string())?;
        check_backends(&file.backends)?;
        Ok(file.backends)
    }
}

/// Backends must parse, be listed once and name no empty model.
pub fn check_backends(backends: &[BackendConfig]) -> Result<(), String> {
    let mut seen = std::collections::HashSet::new();
    for b in backends {
        let parsed = BackendUrl::parse(&b.url).map_err(|e| format!("backend {:?}: {e}", b.url))?;
        if !seen.insert(parsed.base.clone()) {
            return Err(format!("backend {} is listed twice", parsed.base));
        }
        if b.models.iter().any(|m| m.trim().is_empty()) {
            return Err(format!("backend {}: empty model name", b.url));
        }
    }
    Ok(())
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RoutingConfig {
    /// The policy of models without their own entry (round_robin, least_load, session,
    /// prefix), and the fallback of `session` (no session key) and `prefix` (no prompt).
    pub policy: PolicyName,
    /// Per-model overrides.
    pub models: BTreeMap<String, ModelRoutingConfig>,
    pub session: SessionConfig,
    pub prefix: PrefixConfig,
    pub affinity: AffinityConfig,
    pub responses: ResponsesConfig,
    /// Half-life of the decayed counts of requests and prompt blocks sent to each endpoint,
    /// ms: the load `prefix` balances new conversations on. Long enough to remember where
    /// conversations went between their rounds, short enough to follow shifts in traffic.
    pub recent_half_life_ms: u64,
    /// Add `x-lmstack-route: policy=...; reason=...; matched=...; endpoint=...` to routed
    /// responses.
    pub explain_header: bool,
}

impl Default for RoutingConfig {
    fn default() -> Self {
        Self {
            policy: PolicyName::RoundRobin,
            models: BTreeMap::new(),
            session: SessionConfig::default(),
            prefix: PrefixConfig::default(),
            affinity: AffinityConfig::default(),
            responses: ResponsesConfig::default(),
            recent_half_life_ms: 10_000,
            explain_header: false,
        }
    }
}

impl RoutingConfig {
    /// The policy configured for `model`.
    pub fn policy_for(&self, model: &str) -> PolicyName {
        self.models.get(model).map_or(self.policy, |m| m.policy)
    }

    pub fn params(&self) -> PolicyParams {
        PolicyParams {
            session_bound: Bound {
                factor: self.session.load_factor,
                slack: self.session.load_slack,
            },
            prefix_bound: Bound {
                factor: self.prefix.load_factor,
                slack: self.prefix.load_slack,
            },
        }
    }
}

/// The `prefix` policy: a conversation follows its cached history (or its session) while its
/// endpoint is within the load bound; new conversations go where recent load plus prefill
/// work is lowest (see ARCHITECTURE.md, Routing).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct PrefixConfig {
    /// An endpoint competes only while it holds fewer requests than `load_factor x average
    /// + load_slack` (factor at least 1): the guard against herding on a shared prefix.
    pub load_factor: f64,
    /// Requests above the factor's share allowed, so that low loads are not imbalance.
    pub load_slack: f64,
}

impl Default for PrefixConfig {
    fn default() -> Self {
        let p = PolicyParams::default();
        Self {
            load_factor: p.prefix_bound.factor,
            load_slack: p.prefix_bound.slack,
        }
    }
}

/// The prefix affinity table, shared by all workers, and how prompts are cut into blocks.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AffinityConfig {
    /// Bytes of normalised prompt per block (about 4 bytes a token).
    pub block_bytes: usize,
    /// Blocks hashed per prompt at most; longer prompts are matched on their start.
    pub max_prompt_blocks: usize,
    /// Blocks the table holds at most.
    pub max_entries: usize,
    /// Memory the table may take, in bytes (72 bytes a block).
    pub max_bytes: usize,
    /// Endpoints the table can tell apart.
    pub max_endpoints: usize,
}

impl Default for AffinityConfig {
    fn default() -> Self {
        Self {
            block_bytes: 128,
            max_prompt_blocks: 8192,
            max_entries: 1 << 20,
            max_bytes: 128 << 20,
            max_endpoints: 4096,
        }
    }
}

impl AffinityConfig {
    pub fn limits(&self) -> AffinityLimits {
        AffinityLimits {
            max_entries: self.max_entries,
            max_bytes: self.max_bytes,
            max_endpoints: self.max_endpoints,
        }
    }
}

/// Stored Responses: vLLM keeps a `/v1/responses` answer in the engine that made it, and
/// only that engine takes a follow-up naming it (`previous_response_id`), a retrieval
/// (`GET /v1/responses/{id}`) or a cancellation. The router maps response ids to endpoints
/// as answers pass (a table of its own, shared by all workers, lock-free and bounded, and
/// shared with other replicas through control), and asks the pool about an id it does not
/// know (see ARCHITECTURE.md, Stored responses).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ResponsesConfig {
    /// Send requests that name a stored response to the endpoint holding it. Off: they go
    /// where the model's policy sends them (and fail on any other engine).
    pub enabled: bool,
    /// Response ids the map holds at most (72 bytes each); the least recently used go
    /// first, and are then found by asking the pool.
    pub max_entries: usize,
    /// How long asking the pool about an unknown id may take (`GET /v1/responses/{id}` on
    /// every candidate endpoint at once), ms.
    pub ask_timeout_ms: u64,
}

impl Default for ResponsesConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            max_entries: 1 << 16,
            ask_timeout_ms: 2_000,
        }
    }
}

impl ResponsesConfig {
    pub fn limits(&self, endpoints: usize) -> AffinityLimits {
        AffinityLimits {
            max_entries: self.max_entries,
            max_bytes: usize::MAX,
            max_endpoints: endpoints,
        }
    }
}

/// Exact KV routing: `prefix` matches prompts against the blocks each engine reports holding
/// in its KV events (vLLM's `--kv-events-config`), where it can, and against the affinity
/// table elsewhere. An engine's publisher is found from its `/kv_event_sources`, else from
/// `endpoints` or `endpoint_template`; a model's tokenizer from `tokenizers`, else the model
/// card's `root` directory. `lmstack_routing_mode` says which engines are routed exactly.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct KvEventsConfig {
    /// Subscribe to engines' KV events (only models routed by `prefix` use them).
    pub enabled: bool,
    /// Per backend URL, its publisher's ZeroMQ endpoint (`tcp://host:port`), for engines that
    /// do not serve `/kv_event_sources`.
    pub endpoints: BTreeMap<String, String>,
    /// The publisher of engines without an entry in `endpoints` that do not serve
    /// `/kv_event_sources`: `{host}` becomes the engine's host, e.g. `tcp://{host}:5557`.
    /// Empty: none.
    pub endpoint_template: String,
    /// The ZeroMQ topic to subscribe to (vLLM's `topic`; empty: all).
    pub topic: String,
    /// Per model, the directory with its `tokenizer.json` and chat template.
    pub tokenizers: BTreeMap<String, PathBuf>,
    /// Blocks indexed per engine at most (about 80 bytes each); past it, stored blocks are
    /// not indexed and counted as dropped.
    pub max_blocks_per_engine: usize,
    /// Prompts longer than this (bytes of JSON) are matched on the affinity table instead of
    /// being tokenized on the request path (tokenizing costs the worker about 1 µs a token:
    /// 256 KiB, some 64k tokens, is tens of milliseconds of one core).
    pub max_prompt_bytes: usize,
    /// Time to connect to a publisher (and to read an engine's `/metrics` and
    /// `/kv_event_sources` when it registers), ms.
    pub connect_timeout_ms: u64,
    /// Time for a replay of missed events (engines with a `replay_endpoint`), ms; past it the
    /// engine's index is dropped instead.
    pub replay_timeout_ms: u64,
    /// How often engines are checked against discovery (new, gone, unhealthy), and how long
    /// to wait before subscribing again after a failure, ms.
    pub check_interval_ms: u64,
    /// In control mode, take each engine's block index from lmstack-control's stream (control
    /// follows every engine once, for all replicas) instead of subscribing to the engines.
    pub via_control: bool,
}

impl Default for KvEventsConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            endpoints: BTreeMap::new(),
            endpoint_template: String::new(),
            topic: String::new(),
            tokenizers: BTreeMap::new(),
            max_blocks_per_engine: 262_144,
            max_prompt_bytes: 256 << 10,
            connect_timeout_ms: 2_000,
            replay_timeout_ms: 2_000,
            check_interval_ms: 1_000,
            via_control: true,
        }
    }
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelRoutingConfig {
    pub policy: PolicyName,
}

/// Where a request's session key comes from: the first of these headers that is present,
/// then the body field. The default list holds the generic headers and those coding agents
/// send on every request of a conversation: Claude Code (`x-claude-code-session-id`), Qwen
/// Code (`x-qwen-code-session-id`), OpenCode (`x-session-affinity`; `x-opencode-session` to
/// its own provider), Codex (`session_id`; `conversation_id` in its older releases).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SessionConfig {
    pub headers: Vec<String>,
    /// A top-level string (or integer) field of the JSON body; null: none.
    pub body_field: Option<String>,
    /// An endpoint takes a session's request only while it holds fewer requests than
    /// `load_factor x average + load_slack` (consistent hashing with bounded loads).
    pub load_factor: f64,
    /// Requests above the factor's share allowed, so that low loads are not imbalance.
    pub load_slack: f64,
}

impl Default for SessionConfig {
    fn default() -> Self {
        Self {
            headers: [
                "x-session-id",
                "x-claude-code-session-id",
                "x-qwen-code-session-id",
                "x-session-affinity",
                "x-opencode-session",
                "session_id",
                "conversation_id",
                "x-user-id",
            ]
            .map(String::from)
            .to_vec(),
            body_field: Some("user".into()),
            load_factor: PolicyParams::default().session_bound.factor,
            load_slack: PolicyParams::default().session_bound.slack,
        }
    }
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "snake_case")]
pub enum LogFormat {
    #[default]
    Text,
    Json,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LogConfig {
    /// A tracing filter: `info`, `debug`, `lmstack=debug,warn`, ...
    pub level: String,
    pub format: LogFormat,
}

impl Default for LogConfig {
    fn default() -> Self {
        Self {
            level: "info".into(),
            format: LogFormat::Text,
        }
    }
}

/// OpenTelemetry tracing: each request's spans, exported over OTLP/HTTP (protobuf) by a
/// thread of its own. Off while `otlp_endpoint` is empty; the client's `traceparent` then
/// reaches engines untouched.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TracingConfig {
    /// The collector's OTLP/HTTP URL, `http://host:4318` (`/v1/traces` is added when the
    /// URL has no path) or the full traces URL; empty: tracing off.
    pub otlp_endpoint: String,
    /// The share of new traces recorded, 0 to 1 (by trace id, as OpenTelemetry's
    /// `TraceIdRatioBased`); a client's `traceparent` decides for its own trace (its
    /// sampled flag).
    pub sample_ratio: f64,
    /// `service.name` of the spans' resource.
    pub service_name: String,
    /// Requests whose spans may wait for the exporter thread; past that, a finished
    /// request's spans are dropped (and counted) rather than wait.
    pub queue_traces: usize,
    /// Spans per export request at most.
    pub max_export_batch_spans: usize,
    /// Longest a finished span waits before it is exported.
    pub export_interval_ms: u64,
    /// Time allowed for one export request.
    pub export_timeout_ms: u64,
}

impl Default for TracingConfig {
    fn default() -> Self {
        Self {
            otlp_endpoint: String::new(),
            sample_ratio: 1.0,
            service_name: "lmstack".into(),
            queue_traces: 4_096,
            max_export_batch_spans: 512,
            export_interval_ms: 1_000,
            export_timeout_ms: 10_000,
        }
    }
}

impl TracingConfig {
    pub fn enabled(&self) -> bool {
        !self.otlp_endpoint.is_empty()
    }

    /// The URL spans are posted to: the endpoint, with `/v1/traces` when it has no path.
    pub fn traces_url(&self) -> String {
        let url = self.otlp_endpoint.trim_end_matches('/');
        let after_scheme = url.strip_prefix("http://").unwrap_or(url);
        if after_scheme.contains('/') {
            url.to_owned()
        } else {
            format!("{url}/v1/traces")
        }
    }

    fn validate(&self) -> Result<(), ConfigError> {
        if !self.enabled() {
            return Ok(());
        }
        let host = self
            .otlp_endpoint
            .strip_prefix("http://")
            .map(|r| r.split('/').next().unwrap_or(""));
        match host {
            Some(h) if !h.is_empty() => {}
            _ => {
                return Err(invalid(format!(
                    "tracing.otlp_endpoint: expected http://host:port[/path] (OTLP over HTTP, plain; a collector beside the router), not {:?}",
                    self.otlp_endpoint
                )));
            }
        }
        if !(0.0..=1.0).contains(&self.sample_ratio) {
            return Err(invalid(format!(
                "tracing.sample_ratio must be between 0 and 1, not {}",
                self.sample_ratio
            )));
        }
        for (name, v) in [
            ("tracing.queue_traces", self.queue_traces as u64),
            ("tracing.max_export_batch_spans", self.max_export_batch_spans as u64),
            ("tracing.export_interval_ms", self.export_interval_ms),
            ("tracing.export_timeout_ms", self.export_timeout_ms),
        ] {
            if v == 0 {
                return Err(invalid(format!("{name} must be positive")));
            }
        }
        Ok(())
    }
}

/// Command-line flags. Every flag overrides the value of the same meaning in the file.
#[derive(Debug, Default, Parser)]
#[command(
    name = "lmstack",
    version,
    about = "A thread-per-core OpenAI proxy and router for vLLM engines",
    args_override_self = true
)]
pub struct Cli {
    /// YAML configuration file (flags override its values).
    #[arg(long, short = 'c', env = "LMSTACK_CONFIG")]
    pub config: Option<PathBuf>,
    /// Validate the configuration, print it in full (defaults included) and exit.
    #[arg(long)]
    pub check: bool,
    /// Address to listen on (`listen.host`).
    #[arg(long)]
    pub host: Option<String>,
    /// Port to listen on (`listen.port`).
    #[arg(long)]
    pub port: Option<u16>,
    /// Serve HTTPS: PEM file with the certificate chain, read again when it changes
    /// (`listen.tls.cert_file`; with --tls-key).
    #[arg(long)]
    pub tls_cert: Option<PathBuf>,
    /// PEM file with the private key of --tls-cert (`listen.tls.key_file`).
    #[arg(long)]
    pub tls_key: Option<PathBuf>,
    /// Worker threads (0: one per core).
    #[arg(long)]
    pub workers: Option<usize>,
    /// Where endpoints come from: `static` (production-stack compatible: --static-backends),
    /// `file` (--discovery-file, re-read on change) or `control` (--control-url).
    #[arg(long, value_enum)]
    pub service_discovery: Option<ServiceDiscoveryFlag>,
    /// The backends file of `--service-discovery file`.
    #[arg(long)]
    pub discovery_file: Option<PathBuf>,
    /// lmstack-control's URL for `--service-discovery control`.
    #[arg(long)]
    pub control_url: Option<String>,
    /// Comma-separated backend URLs (`http://host:port`).
    #[arg(long, value_delimiter = ',')]
    pub static_backends: Option<Vec<String>>,
    /// Comma-separated models, one per backend in `--static-backends` order; omitted: ask
    /// each backend's `/v1/models`.
    #[arg(long, value_delimiter = ',')]
    pub static_models: Option<Vec<String>>,
    /// Default routing policy: round_robin, least_load, session or prefix (production-stack's
    /// roundrobin and prefixaware are aliases).
    #[arg(long)]
    pub routing_logic: Option<String>,
    /// The header carrying the session key (replaces the default header list).
    #[arg(long)]
    pub session_key: Option<String>,
    /// Log filter (`info`, `debug`, ...).
    #[arg(long)]
    pub log_level: Option<String>,
    /// Log lines as plain text or JSON (`log.format`).
    #[arg(long, value_enum)]
    pub log_format: Option<LogFormat>,
    /// Largest request body accepted, bytes; larger ones get 413 (`server.max_body_bytes`).
    #[arg(long)]
    pub max_body_bytes: Option<usize>,
    /// Time to connect to an engine, ms (`upstream.connect_timeout_ms`).
    #[arg(long)]
    pub connect_timeout_ms: Option<u64>,
    /// Time for an engine's response head, ms; bounds a whole non-streaming generation
    /// (`upstream.first_byte_timeout_ms`).
    #[arg(long)]
    pub first_byte_timeout_ms: Option<u64>,
    /// Longest silence inside a streamed response, ms (`upstream.idle_timeout_ms`).
    #[arg(long)]
    pub idle_timeout_ms: Option<u64>,
    /// Failures before the first response byte retried on another engine
    /// (`upstream.max_retries`).
    #[arg(long)]
    pub max_retries: Option<u32>,
    /// Time for a streaming request's response head, ms; a hung engine's requests go
    /// elsewhere after it (`upstream.stream_head_timeout_ms`).
    #[arg(long)]
    pub stream_head_timeout_ms: Option<u64>,
    /// Longest silence inside an SSE stream, ms, before the stream is resumed elsewhere
    /// (`upstream.stream_idle_timeout_ms`).
    #[arg(long)]
    pub stream_idle_timeout_ms: Option<u64>,
    /// Share the listening port with a running lmstack, for a zero-downtime upgrade: start
    /// the new process with this flag, then SIGTERM the old one (`listen.takeover`).
    #[arg(long)]
    pub takeover: bool,
    /// Do not resume cut streams on another engine: end them with an error event
    /// (`resume.enabled: false`).
    #[arg(long)]
    pub no_resume: bool,
    /// Failures in a row that eject an endpoint for a while; 0: never
    /// (`outlier.consecutive_failures`).
    #[arg(long)]
    pub outlier_consecutive_failures: Option<u32>,
    /// First ejection's length, ms (`outlier.base_ejection_ms`).
    #[arg(long)]
    pub outlier_base_ejection_ms: Option<u64>,
    /// Time between health probes of each backend, ms (`discovery.health.interval_ms`).
    #[arg(long)]
    pub health_check_interval_ms: Option<u64>,
    /// Add an `x-lmstack-route` header to every routed response saying which policy chose
    /// the engine and why (`routing.explain_header`).
    #[arg(long)]
    pub explain_routing: bool,
    /// Do not subscribe to engines' KV events: `prefix` matches on the affinity table only
    /// (`kv_events.enabled: false`).
    #[arg(long)]
    pub no_kv_events: bool,
    /// The KV-event publisher of engines that do not serve `/kv_event_sources`, `{host}` for
    /// the engine's host, e.g. `tcp://{host}:5557` (`kv_events.endpoint_template`).
    #[arg(long)]
    pub kv_events_endpoint: Option<String>,
    /// How long a request for a model without a ready endpoint is held before it fails,
    /// ms; 0: at once (`admission.hold_timeout_ms`).
    #[arg(long)]
    pub hold_timeout_ms: Option<u64>,
    /// API keys file: every model route then needs a key (`Authorization: Bearer` or
    /// `x-api-key`), with its tenant's models and budgets (`tenancy.keys_file`).
    #[arg(long)]
    pub api_keys: Option<PathBuf>,
    /// `MODEL=DIR`: the directory with the model's `tokenizer.json` and chat template, for
    /// exact KV routing (`kv_events.tokenizers`; repeat for more models).
    #[arg(long, value_parser = parse_model_dir)]
    pub tokenizer: Vec<(String, PathBuf)>,
    /// Export OpenTelemetry traces to this OTLP/HTTP collector, `http://host:4318` (as
    /// vLLM's flag of the same name); engines get a `traceparent` continuing lmstack's
    /// spans (`tracing.otlp_endpoint`).
    #[arg(long)]
    pub otlp_traces_endpoint: Option<String>,
    /// The share of new traces recorded, 0 to 1; a client's `traceparent` decides for its
    /// own (`tracing.sample_ratio`).
    #[arg(long)]
    pub otlp_sample_ratio: Option<f64>,
}

fn parse_model_dir(s: &str) -> Result<(String, PathBuf), String> {
    match s.split_once('=') {
        Some((model, dir)) if !model.is_empty() && !dir.is_empty() => Ok((model.to_owned(), PathBuf::from(dir))),
        _ => Err(format!("expected MODEL=DIR, not {s:?}")),
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum ServiceDiscoveryFlag {
    Static,
    File,
    Control,
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read {}: {source}", path.display())]
    Read { path: PathBuf, source: std::io::Error },
    #[error("{}: {message}", path.display())]
    Parse { path: PathBuf, message: String },
    #[error("invalid configuration: {0}")]
    Invalid(String),
}

fn invalid(msg: impl Into<String>) -> ConfigError {
    ConfigError::Invalid(msg.into())
}

impl Config {
    /// Defaults, then the file (if any), then the flags; then validation.
    pub fn load(cli: &Cli) -> Result<Config, ConfigError> {
        let mut config = match &cli.config {
            Some(path) => {
                let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
                    path: path.clone(),
                    source,
                })?;
                Config::from_yaml(&text).map_err(|message| ConfigError::Parse {
                    path: path.clone(),
                    message,
                })?
            }
            None => Config::default(),
        };
        config.apply_flags(cli)?;
        config.validate()?;
        Ok(config)
    }

    pub fn from_yaml(text: &str) -> Result<Config, String> {
        if text.trim().is_empty() {
            return Ok(Config::default());
        }
        serde_yaml_ng::from_str(text).map_err(|e| e.to_string())
    }

    fn apply_flags(&mut self, cli: &Cli) -> Result<(), ConfigError> {
        if let Some(h) = &cli.host {
            self.listen.host = h.clone();
        }
        if let Some(p) = cli.port {
            self.listen.port = p;
        }
        if let Some(f) = &cli.tls_cert {
            self.listen.tls.cert_file = Some(f.clone());
        }
        if let Some(f) = &cli.tls_key {
            self.listen.tls.key_file = Some(f.clone());
        }
        if let Some(w) = cli.workers {
            self.workers = w;
        }
        if let Some(mode) = cli.service_discovery {
            self.discovery.mode = match mode {
                ServiceDiscoveryFlag::Static => DiscoveryMode::Static,
                ServiceDiscoveryFlag::File => DiscoveryMode::File,
                ServiceDiscoveryFlag::Control => DiscoveryMode::Control,
            };
        }
        if let Some(path) = &cli.discovery_file {
            self.discovery.file = Some(path.clone());
        }
        if let Some(url) = &cli.control_url {
            self.discovery.control.url = url.clone();
        }
        if let Some(urls) = &cli.static_backends {
            let targets = lmstack_probe::static_targets(urls, cli.static_models.as_deref())
                .map_err(|e| invalid(e.to_string()))?;
            self.discovery.backends = targets
                .into_iter()
                .map(|t| BackendConfig {
                    url: t.url.base,
                    models: t.models,
                })
                .collect();
        } else if cli.static_models.is_some() {
            return Err(invalid("--static-models needs --static-backends"));
        }
        if let Some(name) = &cli.routing_logic {
            self.routing.policy = name.parse().map_err(|e| invalid(format!("--routing-logic: {e}")))?;
        }
        if let Some(header) = &cli.session_key {
            self.routing.session.headers = vec![header.clone()];
        }
        if let Some(l) = &cli.log_level {
            self.log.level = l.clone();
        }
        if let Some(f) = cli.log_format {
            self.log.format = f;
        }
        if let Some(v) = cli.max_body_bytes {
            self.server.max_body_bytes = v;
        }
        if cli.explain_routing {
            self.routing.explain_header = true;
        }
        if cli.no_kv_events {
            self.kv_events.enabled = false;
        }
        if let Some(t) = &cli.kv_events_endpoint {
            self.kv_events.endpoint_template = t.clone();
        }
        for (model, dir) in &cli.tokenizer {
            self.kv_events.tokenizers.insert(model.clone(), dir.clone());
        }
        if let Some(v) = cli.connect_timeout_ms {
            self.upstream.connect_timeout_ms = v;
        }
        if let Some(v) = cli.first_byte_timeout_ms {
            self.upstream.first_byte_timeout_ms = v;
        }
        if let Some(v) = cli.idle_timeout_ms {
            self.upstream.idle_timeout_ms = v;
        }
        if let Some(v) = cli.max_retries {
            self.upstream.max_retries = v;
        }
        if let Some(v) = cli.stream_head_timeout_ms {
            self.upstream.stream_head_timeout_ms = v;
        }
        if let Some(v) = cli.stream_idle_timeout_ms {
            self.upstream.stream_idle_timeout_ms = v;
        }
        if cli.takeover {
            self.listen.takeover = true;
        }
        if cli.no_resume {
            self.resume.enabled = false;
        }
        if let Some(v) = cli.outlier_consecutive_failures {
            self.outlier.consecutive_failures = v;
        }
        if let Some(v) = cli.outlier_base_ejection_ms {
            self.outlier.base_ejection_ms = v;
        }
        if let Some(v) = cli.hold_timeout_ms {
            self.admission.hold_timeout_ms = v;
        }
        if let Some(path) = &cli.api_keys {
            self.tenancy.keys_file = Some(path.clone());
        }
        if let Some(v) = cli.health_check_interval_ms {
            self.discovery.health.interval_ms = v;
        }
        if let Some(url) = &cli.otlp_traces_endpoint {
            self.tracing.otlp_endpoint = url.clone();
        }
        if let Some(v) = cli.otlp_sample_ratio {
            self.tracing.sample_ratio = v;
        }
        Ok(())
    }

    pub fn validate(&self) -> Result<(), ConfigError> {
        self.tracing.validate()?;
        let positive = [
            ("server.max_header_bytes", self.server.max_header_bytes as u64),
            ("server.max_headers", self.server.max_headers as u64),
            ("server.max_body_bytes", self.server.max_body_bytes as u64),
            ("server.header_timeout_ms", self.server.header_timeout_ms),
            ("server.body_timeout_ms", self.server.body_timeout_ms),
            ("server.keepalive_timeout_ms", self.server.keepalive_timeout_ms),
            ("server.drain_idle_ms", self.server.drain_idle_ms),
            ("server.ready_timeout_ms", self.server.ready_timeout_ms),
            ("server.write_timeout_ms", self.server.write_timeout_ms),
            ("server.max_connections", self.server.max_connections as u64),
            ("routing.recent_half_life_ms", self.routing.recent_half_life_ms),
            ("listen.backlog", u64::from(self.listen.backlog)),
            ("listen.tls.reload_interval_ms", self.listen.tls.reload_interval_ms),
            ("listen.tls.handshake_timeout_ms", self.listen.tls.handshake_timeout_ms),
            ("upstream.connect_timeout_ms", self.upstream.connect_timeout_ms),
            ("upstream.first_byte_timeout_ms", self.upstream.first_byte_timeout_ms),
            ("upstream.idle_timeout_ms", self.upstream.idle_timeout_ms),
            ("upstream.stream_head_timeout_ms", self.upstream.stream_head_timeout_ms),
            ("upstream.stream_idle_timeout_ms", self.upstream.stream_idle_timeout_ms),
            ("upstream.max_event_bytes", self.upstream.max_event_bytes as u64),
            ("resume.deadline_ms", self.resume.deadline_ms),
            ("tenancy.reload_interval_ms", self.tenancy.reload_interval_ms),
            ("tenancy.prompt_bytes_per_token", self.tenancy.prompt_bytes_per_token),
            ("resume.max_bytes", self.resume.max_bytes as u64),
            ("outlier.base_ejection_ms", self.outlier.base_ejection_ms),
            ("upstream.pool_idle_timeout_ms", self.upstream.pool_idle_timeout_ms),
            (
                "upstream.max_response_header_bytes",
                self.upstream.max_response_header_bytes as u64,
            ),
            ("upstream.queue_timeout_ms", self.upstream.queue_timeout_ms),
            ("discovery.health.interval_ms", self.discovery.health.interval_ms),
            (
                "kv_events.max_blocks_per_engine",
                self.kv_events.max_blocks_per_engine as u64,
            ),
            ("kv_events.max_prompt_bytes", self.kv_events.max_prompt_bytes as u64),
            ("kv_events.connect_timeout_ms", self.kv_events.connect_timeout_ms),
            ("kv_events.replay_timeout_ms", self.kv_events.replay_timeout_ms),
            ("kv_events.check_interval_ms", self.kv_events.check_interval_ms),
            ("discovery.health.timeout_ms", self.discovery.health.timeout_ms),
            (
                "discovery.health.unhealthy_after",
                u64::from(self.discovery.health.unhealthy_after),
            ),
            (
                "discovery.health.healthy_after",
                u64::from(self.discovery.health.healthy_after),
            ),
        ];
        for (name, value) in positive {
            if value == 0 {
                return Err(invalid(format!("{name} must be greater than 0")));
            }
        }
        if !(self.admission.max_kv_usage > 0.0 && self.admission.max_kv_usage <= 1.0) {
            return Err(invalid("admission.max_kv_usage must be within (0, 1]"));
        }
        if self.admission.max_held_per_worker == 0 {
            return Err(invalid("admission.max_held_per_worker must be greater than 0"));
        }
        if self.outlier.max_ejection_ms < self.outlier.base_ejection_ms {
            return Err(invalid(
                "outlier.max_ejection_ms must be at least outlier.base_ejection_ms",
            ));
        }
        if self.outlier.max_ejected_percent > 100 {
            return Err(invalid("outlier.max_ejected_percent must be within 0..=100"));
        }
        if self.outlier.max_ejection_ms > u64::from(u32::MAX / 2) {
            return Err(invalid("outlier.max_ejection_ms must be under 24 days"));
        }
        if self.server.max_headers > MAX_HEADERS_CAP {
            return Err(invalid(format!("server.max_headers must be at most {MAX_HEADERS_CAP}")));
        }
        if self.server.max_header_bytes > u32::MAX as usize / 2 {
            return Err(invalid("server.max_header_bytes is too large"));
        }
        if !self.discovery.health.path.starts_with('/') {
            return Err(invalid("discovery.health.path must start with '/'"));
        }
        self.listen_addr()?;
        let tls = &self.listen.tls;
        if tls.cert_file.is_some() != tls.key_file.is_some() {
            return Err(invalid(
                "listen.tls: cert_file and key_file go together (--tls-cert, --tls-key)",
            ));
        }
        let d = &self.discovery;
        match d.mode {
            DiscoveryMode::Static if d.backends.is_empty() => {
                return Err(invalid(
                    "no backends: give --static-backends URL,URL or discovery.backends in the config file",
                ));
            }
            DiscoveryMode::Static => check_backends(&d.backends).map_err(invalid)?,
            DiscoveryMode::File => {
                let path = d
                    .file
                    .as_ref()
                    .ok_or_else(|| invalid("discovery.mode file needs discovery.file (--discovery-file)"))?;
                let text = std::fs::read_to_string(path)
                    .map_err(|e| invalid(format!("discovery.file {}: {e}", path.display())))?;
                BackendsFile::parse(&text).map_err(|e| invalid(format!("discovery.file {}: {e}", path.display())))?;
            }
            DiscoveryMode::Control => {
                BackendUrl::parse(&d.control.url).map_err(|e| invalid(format!("discovery.control.url: {e}")))?;
                let c = &d.control;
                for (name, v) in [
                    ("connect_timeout_ms", c.connect_timeout_ms),
                    ("stale_after_ms", c.stale_after_ms),
                    ("backoff_ms", c.backoff_ms),
                    ("max_backoff_ms", c.max_backoff_ms),
                    ("max_message_bytes", c.max_message_bytes as u64),
                    ("affinity_report_interval_ms", c.affinity_report_interval_ms),
                    ("affinity_max_pending_blocks", c.affinity_max_pending_blocks as u64),
                ] {
                    if v == 0 {
                        return Err(invalid(format!("discovery.control.{name} must be greater than 0")));
                    }
                }
            }
        }
        if d.mode != DiscoveryMode::Static && !d.backends.is_empty() {
            return Err(invalid(
                "discovery.backends (--static-backends) is for discovery.mode static only",
            ));
        }
        for h in &self.routing.session.headers {
            if h.is_empty() || !h.bytes().all(|c| c.is_ascii_alphanumeric() || b"-_.".contains(&c)) {
                return Err(invalid(format!("routing.session.headers: {h:?} is not a header name")));
            }
        }
        self.routing
            .params()
            .validate()
            .map_err(|e| invalid(format!("routing: {e}")))?;
        let a = &self.routing.affinity;
        if !(16..=64 * 1024).contains(&a.block_bytes) {
            return Err(invalid("routing.affinity.block_bytes must be within 16..=65536"));
        }
        if a.max_prompt_blocks == 0 {
            return Err(invalid("routing.affinity.max_prompt_blocks must be greater than 0"));
        }
        let r = &self.routing.responses;
        if r.max_entries < WAYS {
            return Err(invalid(format!(
                "routing.responses.max_entries must be at least {WAYS}"
            )));
        }
        if r.ask_timeout_ms == 0 {
            return Err(invalid("routing.responses.ask_timeout_ms must be greater than 0"));
        }
        if a.max_entries < WAYS || a.max_bytes < WAYS * SLOT_BYTES {
            return Err(invalid(format!(
                "routing.affinity must allow at least {WAYS} entries ({} bytes)",
                WAYS * SLOT_BYTES
            )));
        }
        if !(1..=u16::MAX as usize).contains(&a.max_endpoints) {
            return Err(invalid("routing.affinity.max_endpoints must be within 1..=65535"));
        }
        if self.routing.session.body_field.as_deref() == Some("") {
            return Err(invalid(
                "routing.session.body_field must not be empty (use null for none)",
            ));
        }
        let kv = &self.kv_events;
        let zmq = |e: &str| e.starts_with("tcp://") || e.starts_with("ipc://");
        for (backend, endpoint) in &kv.endpoints {
            BackendUrl::parse(backend).map_err(|e| invalid(format!("kv_events.endpoints: {backend}: {e}")))?;
            if !zmq(endpoint) {
                return Err(invalid(format!(
                    "kv_events.endpoints: {backend}: {endpoint:?} is not a tcp:// or ipc:// endpoint"
                )));
            }
        }
        if !kv.endpoint_template.is_empty() && !zmq(&kv.endpoint_template) {
            return Err(invalid(format!(
                "kv_events.endpoint_template {:?} is not a tcp:// or ipc:// endpoint",
                kv.endpoint_template
            )));
        }
        tracing_subscriber::EnvFilter::try_new(&self.log.level)
            .map_err(|e| invalid(format!("log.level {:?}: {e}", self.log.level)))?;
        Ok(())
    }

    #[expect(
        clippy::disallowed_methods,
        reason = "resolved once at start, before any worker runs"
    )]
    pub fn listen_addr(&self) -> Result<SocketAddr, ConfigError> {
        (self.listen.host.as_str(), self.listen.port)
            .to_socket_addrs()
            .map_err(|e| invalid(format!("listen address {}:{}: {e}", self.listen.host, self.listen.port)))?
            .next()
            .ok_or_else(|| invalid(format!("listen address {} resolves to nothing", self.listen.host)))
    }

    pub fn worker_count(&self) -> usize {
        if self.workers > 0 {
            self.workers
        } else {
            std::thread::available_parallelism().map_or(1, |n| n.get())
        }
    }
}

/// Whether `model` is one of `patterns`: names, or a prefix ending in `*` (`*` alone: any).
pub fn model_matches(patterns: &[String], model: &str) -> bool {
    patterns.iter().any(|p| match p.strip_suffix('*') {
        Some(prefix) => model.starts_with(prefix),
        None => p == model,
    })
}

/// Millisecond settings as durations.
pub fn ms(v: u64) -> Duration {
    Duration::from_millis(v)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cli(args: &[&str]) -> Cli {
        Cli::try_parse_from(std::iter::once("lmstack").chain(args.iter().copied())).unwrap()
    }

    #[test]
    fn production_stack_flags_build_a_static_config() {
        let c = Config::load(&cli(&[
            "--host",
            "127.0.0.1",
            "--port",
            "9000",
            "--service-discovery",
            "static",
            "--static-backends",
            "http://a:8000,http://b:8000",
            "--static-models",
            "m1,m2",
            "--routing-logic",
            "roundrobin",
            "--session-key",
            "x-user-id",
        ]))
        .unwrap();
        assert_eq!(c.listen.port, 9000);
        assert_eq!(c.discovery.backends.len(), 2);
        assert_eq!(c.discovery.backends[1].models, vec!["m2".to_owned()]);
        assert_eq!(c.routing.policy, PolicyName::RoundRobin);
        assert_eq!(c.routing.session.headers, vec!["x-user-id".to_owned()]);
    }

    #[test]
    fn mismatched_static_models_are_an_error() {
        let e = Config::load(&cli(&[
            "--static-backends",
            "http://a:1,http://b:2",
            "--static-models",
            "m",
        ]));
        assert!(e.unwrap_err().to_string().contains("one per backend"));
    }

    #[test]
    fn unknown_keys_and_policies_are_errors() {
        assert!(Config::from_yaml("listen: {port: 1, colour: red}").is_err());
        assert!(
            Config::from_yaml("routing: {policy: random}")
                .unwrap_err()
                .contains("unknown routing policy")
        );
        assert!(Config::load(&cli(&["--static-backends", "http://a:1", "--routing-logic", "kvaware"])).is_err());
    }

    #[test]
    fn policy_parameters_are_checked_at_start() {
        let base = "discovery: {backends: [{url: 'http://a:1'}]}\n";
        let c = Config::from_yaml(&format!(
            "{base}routing: {{policy: prefixaware, prefix: {{load_factor: 0.5}}}}"
        ))
        .unwrap();
        assert_eq!(c.routing.policy, PolicyName::Prefix);
        assert!(c.validate().unwrap_err().to_string().contains("prefix.load_factor"));
        let c = Config::from_yaml(&format!("{base}routing: {{session: {{load_factor: -1}}}}")).unwrap();
        assert!(c.validate().unwrap_err().to_string().contains("session.load_factor"));
        let c = Config::from_yaml(&format!("{base}routing: {{affinity: {{block_bytes: 1}}}}")).unwrap();
        assert!(c.validate().unwrap_err().to_string().contains("block_bytes"));
        assert!(Config::from_yaml(&format!("{base}routing: {{prefix: {{weight: 2}}}}")).is_err());
    }

    #[test]
    fn yaml_and_defaults_agree() {
        let c = Config::from_yaml("discovery:\n  backends:\n    - url: http://localhost:8000\n").unwrap();
        assert_eq!(c.server, ServerConfig::default());
        assert_eq!(c.upstream.pool_idle_timeout_ms, 4_000);
        c.validate().unwrap();
        // What --check prints reads back as the same configuration.
        let printed = serde_yaml_ng::to_string(&c).unwrap();
        assert_eq!(Config::from_yaml(&printed).unwrap(), c);
    }

    #[test]
    fn flags_override_the_file() {
        let dir = std::env::temp_dir().join(format!("lmstack-config-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("c.yaml");
        std::fs::write(
            &path,
            "listen: {port: 7000}\ndiscovery: {backends: [{url: 'http://a:1'}]}\n",
        )
        .unwrap();
        let c = Config::load(&cli(&["--config", path.to_str().unwrap(), "--port", "7001"])).unwrap();
        assert_eq!(c.listen.port, 7001);
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn tls_takes_a_certificate_and_its_key_together() {
        let base = ["--static-backends", "http://a:1"];
        let c = Config::load(&cli(
            &[&base[..], &["--tls-cert", "/c.pem", "--tls-key", "/k.pem"]].concat()
        ))
        .unwrap();
        assert!(c.listen.tls.files().is_some());
        assert_eq!(c.listen.tls.reload_interval_ms, TlsConfig::default().reload_interval_ms);
        let e = Config::load(&cli(&[&base[..], &["--tls-cert", "/c.pem"]].concat())).unwrap_err();
        assert!(e.to_string().contains("go together"), "{e}");
        assert!(Config::load(&cli(&base)).unwrap().listen.tls.files().is_none());
        assert!(Config::from_yaml("listen: {tls: {cert: /c.pem}}").is_err());
        let c =
            Config::from_yaml("discovery: {backends: [{url: 'http://a:1'}]}\nlisten: {tls: {handshake_timeout_ms: 0}}")
                .unwrap();
        assert!(c.validate().unwrap_err().to_string().contains("handshake_timeout_ms"));
    }

    #[test]
    fn zero_limits_are_rejected() {
        let mut c = Config::from_yaml("discovery: {backends: [{url: 'http://a:1'}]}").unwrap();
        c.upstream.connect_timeout_ms = 0;
        assert!(c.validate().unwrap_err().to_string().contains("connect_timeout_ms"));
    }

    #[test]
    fn backend_urls() {
        assert_eq!(BackendUrl::parse("http://e:8000/").unwrap().base, "http://e:8000");
        assert_eq!(BackendUrl::parse("http://e").unwrap().port, 80);
        assert_eq!(BackendUrl::parse("http://[::1]:9").unwrap().host, "[::1]");
        assert!(BackendUrl::parse("https://e:1").is_err());
        assert!(BackendUrl::parse("http://e:1/v1").is_err());
        assert!(BackendUrl::parse("http://e:x").is_err());
        assert!(BackendUrl::parse("http://:1").is_err());
    }
}
