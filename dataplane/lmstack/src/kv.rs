//! Exact KV routing in the router: the engines' KV events in, per-engine block indexes out
//! to the workers, and the lookup `prefix` makes with them.
//!
//! One thread (`lmstack-kv`, a current-thread tokio runtime, since the ZeroMQ crate is
//! tokio's) follows the routing state every `kv_events.check_interval_ms`:
//! - a new engine is **registered**: its `/metrics` and `/kv_event_sources` are read once, and
//!   what routing relies on is checked (vLLM's load metrics, prefix caching on, the block
//!   size, a reachable publisher); each problem is logged as a warning and exported
//!   (`lmstack_kv_compat_problem`). Then one task per data-parallel rank subscribes (ZeroMQ
//!   SUB) and feeds the engine's [`EngineIndex`];
//! - a sequence gap is replayed from the engine's replay socket when it has one, else the
//!   engine's index is dropped (`lmstack-kv` explains why that is safe); a lost connection
//!   (the engine restarted) drops it too, and the engine is routed approximately until the
//!   subscription is back;
//! - an engine that left discovery is dropped and unsubscribed; it registers again when it
//!   comes back. One that turns unhealthy keeps its subscription (a probe timing out under
//!   load is no reason to forget its cache; a restart shows as a lost connection).
//!
//! Models' tokenizers are loaded on this thread too (`kv_events.tokenizers`, else the model
//! card's `root`), never on a worker. Workers only read: [`Kv::refine`] tokenizes the
//! request as vLLM will, keys its blocks and asks each engine's [`Held`] set how many it
//! holds, lock-free.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU8, Ordering};
use std::time::Duration;

use anyhow::Context as _;
use lmstack_kv::event::{self, Batch};
use lmstack_kv::index::{ClearReason, Dropped, EngineIndex, Held, IndexLimits, IndexStats, SeqCheck};
use lmstack_kv::key::{self, BlockKey, RequestExtras};
use lmstack_kv::prompt::PromptTokenizer;
use lmstack_probe::BackendUrl;
use zeromq::{Socket, SocketEvent, SocketRecv, SocketSend};

use crate::config::KvEventsConfig;
use crate::metrics;
use crate::state::SnapshotCell;

/// How one engine is routed by `prefix` (the `mode` label of `lmstack_routing_mode`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    /// On the blocks the engine reports holding.
    Exact,
    /// On the affinity table: the engine publishes no KV events (or the model has no
    /// tokenizer here).
    Approximate,
    /// On the affinity table because its events cannot be trusted now: the subscription is
    /// not up (yet), or was lost.
    Degraded,
}

impl Mode {
    pub const ALL: [Mode; 3] = [Mode::Exact, Mode::Approximate, Mode::Degraded];

    pub fn as_str(self) -> &'static str {
        match self {
            Mode::Exact => "exact",
            Mode::Approximate => "approximate",
            Mode::Degraded => "degraded",
        }
    }
}

const SOURCE_NONE: u8 = 0;
const SOURCE_DOWN: u8 = 1;
const SOURCE_LIVE: u8 = 2;

/// One engine as workers see it: its blocks, and whether it has a publisher at all.
#[derive(Debug, Default)]
pub struct Engine {
    pub held: Arc<Held>,
    source: AtomicU8,
}

impl Engine {
    fn mode(&self, tokenizer: bool) -> Mode {
        match self.source.load(Ordering::Acquire) {
            SOURCE_LIVE if self.live() && self.held.is_complete() && tokenizer => Mode::Exact,
            SOURCE_NONE => Mode::Approximate,
            _ if !tokenizer => Mode::Approximate,
            _ => Mode::Degraded,
        }
    }

    /// Its events are being applied (the set is true, if perhaps incomplete).
    fn live(&self) -> bool {
        self.source.load(Ordering::Acquire) == SOURCE_LIVE && self.held.is_fresh()
    }
}

/// What the workers share with the intake thread.
pub struct Kv {
    config: KvEventsConfig,
    engines: papaya::HashMap<Arc<str>, Arc<Engine>>,
    tokenizers: papaya::HashMap<Arc<str>, Arc<PromptTokenizer>>,
}

/// What an exact lookup found, for the explain header and the metrics.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Exact {
    /// The prompt's tokens, as the engine will see them.
    pub tokens: usize,
    /// Its full blocks.
    pub blocks: usize,
    /// Endpoints of the pool whose events are live.
    pub endpoints: usize,
    /// The most blocks one of them holds.
    pub best: usize,
    /// Those whose index is a lower bound (not complete): their matches are the larger of
    /// the engine's and the affinity table's.
    pub incomplete: usize,
}

impl Kv {
    pub fn new(config: KvEventsConfig) -> Self {
        Self {
            config,
            engines: papaya::HashMap::new(),
            tokenizers: papaya::HashMap::new(),
        }
    }

    /// How `prefix` routes `model` on the engine at `url` now.
    pub fn mode(&self, model: &str, url: &str) -> Mode {
        let tokenizer = self.tokenizers.pin().contains_key(model);
        match self.engines.pin().get(url) {
            Some(e) => e.mode(tokenizer),
            None => Mode::Approximate,
        }
    }

    /// Replaces the approximate matches of the pool's endpoints whose events are live with
    /// what they hold, in the affinity table's units (`affinity_blocks` for the whole
    /// prompt): the engine's count where its index is complete, the larger of the two where
    /// it is a lower bound. `held` gets, per pool index, the engine's own count of blocks
    /// (`u32::MAX` where its events are not live). `None` when no endpoint of the pool has
    /// live events, or the request cannot be tokenized exactly (it is then routed on the
    /// affinity table alone).
    #[expect(
        clippy::too_many_arguments,
        reason = "the request, the pool, and the worker's scratch buffers"
    )]
    pub fn refine<'u>(
        &self,
        model: &str,
        chat: bool,
        body: &[u8],
        urls: impl Iterator<Item = &'u str>,
        affinity_blocks: usize,
        matched: &mut [u32],
        held: &mut Vec<u32>,
        keys: &mut Vec<BlockKey>,
    ) -> Option<Exact> {
        held.clear();
        held.resize(matched.len(), u32::MAX);
        if body.len() > self.config.max_prompt_bytes {
            return None;
        }
        let tokenizers = self.tokenizers.pin();
        let tokenizer = tokenizers.get(model)?;
        let engines = self.engines.pin();
        let exact: Vec<(usize, &Arc<Engine>)> = urls
            .enumerate()
            .filter_map(|(i, url)| engines.get(url).map(|e| (i, e)))
            .filter(|(_, e)| e.live())
            .collect();
        if exact.is_empty() {
            return None;
        }
        let tokens = if chat {
            tokenizer.chat(body).ok()?
        } else {
            tokenizer.completion(body).ok()?
        };
        let salt: Salted<'_> = serde_json::from_slice(body).ok()?;
        let extras = RequestExtras {
            lora_name: None,
            cache_salt: salt.cache_salt.as_deref(),
        };
        let mut found = Exact {
            tokens: tokens.len(),
            ..Exact::default()
        };
        let mut keyed_for = 0;
        for (i, engine) in exact {
            let complete = engine.held.is_complete();
            found.incomplete += usize::from(!complete);
            let Some(block_size) = engine.held.block_size() else {
                // No block stored yet: it holds nothing of any prompt.
                if complete {
                    matched[i] = 0;
                }
                held[i] = 0;
                found.endpoints += 1;
                continue;
            };
            if keyed_for != block_size {
                key::prompt_keys(&tokens, block_size as usize, extras, keys);
                keyed_for = block_size;
            }
            let n = engine.held.matched(keys);
            held[i] = n as u32;
            found.blocks = keys.len();
            found.best = found.best.max(n);
            found.endpoints += 1;
            // In the table's units: the share of the prompt's tokens held there.
            let share = (n * block_size as usize) as f64 / tokens.len().max(1) as f64;
            let exact = (share.min(1.0) * affinity_blocks as f64).floor() as u32;
            matched[i] = if complete { exact } else { exact.max(matched[i]) };
        }
        Some(found)
    }
}

/// The request field vLLM adds to its first block's hash.
#[derive(serde::Deserialize)]
struct Salted<'a> {
    #[serde(borrow)]
    cache_salt: Option<std::borrow::Cow<'a, str>>,
}

/// Starts the intake thread.
pub fn spawn(kv: Arc<Kv>, cell: Arc<SnapshotCell>) -> anyhow::Result<()> {
    std::thread::Builder::new()
        .name("lmstack-kv".into())
        .spawn(move || {
            let runtime = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
                Ok(r) => r,
                Err(e) => {
                    tracing::error!(error = %e, "cannot start the KV events runtime; routing stays approximate");
                    return;
                }
            };
            runtime.block_on(supervise(kv, cell));
        })
        .context("starting the KV events thread")?;
    Ok(())
}

struct Running {
    task: tokio::task::JoinHandle<()>,
}

async fn supervise(kv: Arc<Kv>, cell: Arc<SnapshotCell>) {
    let every = Duration::from_millis(kv.config.check_interval_ms);
    let mut running: HashMap<Arc<str>, Running> = HashMap::new();
    let mut tried_tokenizers: HashMap<Arc<str>, Option<PathBuf>> = HashMap::new();
    loop {
        let state = cell.load();
        // Tokenizers of models routed by `prefix`, loaded once (again when the source changes).
        for pool in state.pools().filter(|p| p.policy.name().uses_prefix()) {
            let dir = kv
                .config
                .tokenizers
                .get(&*pool.name)
                .cloned()
                .or_else(|| pool.root.as_deref().map(PathBuf::from));
            if tried_tokenizers.get(&pool.name) == Some(&dir) {
                continue;
            }
            tried_tokenizers.insert(pool.name.clone(), dir.clone());
            load_tokenizer(&kv, &pool.name, dir).await;
        }
        // Engines: new ones registered, unhealthy and gone ones dropped.
        let wanted: HashMap<Arc<str>, bool> = state
            .pools()
            .filter(|p| p.policy.name().uses_prefix())
            .flat_map(|p| p.endpoints.iter().map(|&i| &state.endpoints[i]))
            .map(|e| (e.url.clone(), e.healthy))
            .collect();
        running.retain(|url, r| {
            // A health flap keeps the subscription (a restart shows as a lost connection).
            let keep = wanted.contains_key(url) && !r.task.is_finished();
            if !keep {
                r.task.abort();
                if let Some(engine) = kv.engines.pin().get(url) {
                    reset(engine, url, ClearReason::Identity);
                    engine.source.store(SOURCE_DOWN, Ordering::Release);
                }
                if !wanted.contains_key(url) {
                    kv.engines.pin().remove(url);
                    metrics::kv_engine_gone(url);
                }
            }
            keep
        });
        for (url, healthy) in &wanted {
            if !healthy || running.contains_key(url) {
                continue;
            }
            let engine = kv.engines.pin().get_or_insert_with(url.clone(), Arc::default).clone();
            let task = tokio::spawn(follow(kv.clone(), url.clone(), engine));
            running.insert(url.clone(), Running { task });
        }
        // Figures.
        for pool in state.pools().filter(|p| p.policy.name().uses_prefix()) {
            for &i in &pool.endpoints {
                let url = &state.endpoints[i].url;
                metrics::kv_mode(
                    &pool.name,
                    url,
                    kv.mode(&pool.name, url).as_str(),
                    &Mode::ALL.map(Mode::as_str),
                );
            }
        }
        for (url, engine) in kv.engines.pin().iter() {
            metrics::kv_index(url, engine.held.blocks(), engine.held.last_event_ms());
        }
        tokio::time::sleep(every).await;
    }
}

async fn load_tokenizer(kv: &Kv, model: &Arc<str>, dir: Option<PathBuf>) {
    let Some(dir) = dir else {
        tracing::warn!(
            model = %model,
            "no tokenizer for this model (kv_events.tokenizers, or a model card root directory): prefix routing stays approximate"
        );
        kv.tokenizers.pin().remove(model);
        return;
    };
    let path = dir.clone();
    match tokio::task::spawn_blocking(move || PromptTokenizer::from_dir(&path)).await {
        Ok(Ok(t)) => {
            tracing::info!(model = %model, dir = %dir.display(), "tokenizer loaded: exact KV routing possible");
            kv.tokenizers.pin().insert(model.clone(), Arc::new(t));
        }
        Ok(Err(e)) => {
            tracing::warn!(model = %model, dir = %dir.display(), error = %e, "cannot load the tokenizer: prefix routing stays approximate");
            kv.tokenizers.pin().remove(model);
        }
        Err(e) => tracing::warn!(model = %model, error = %e, "tokenizer loading failed"),
    }
}

fn reset(engine: &Engine, url: &str, reason: ClearReason) {
    if engine.held.blocks() > 0 || engine.held.is_fresh() {
        tracing::info!(endpoint = url, reason = reason.as_str(), "KV index dropped");
    }
    engine.held.set_fresh(false);
    engine.held.reset();
    metrics::kv_resync(url, reason.as_str(), 1);
}

/// Where an engine publishes, per data-parallel rank.
#[derive(Clone, Debug, PartialEq)]
struct Source {
    rank: u32,
    endpoint: String,
    replay: Option<String>,
}

/// One engine's registration and subscription, until the supervisor stops it.
async fn follow(kv: Arc<Kv>, url: Arc<str>, engine: Arc<Engine>) {
    let retry = Duration::from_millis(kv.config.check_interval_ms);
    loop {
        let (sources, compat) = register(&kv, &url, &engine).await;
        if sources.is_empty() {
            engine.source.store(SOURCE_NONE, Ordering::Release);
            // Engines may gain a publisher on restart; look again now and then.
            tokio::time::sleep(retry * 30).await;
            continue;
        }
        engine.source.store(SOURCE_DOWN, Ordering::Release);
        if let Err(e) = subscribe(&kv, &url, &engine, &sources, &compat).await {
            tracing::warn!(endpoint = %url, error = %e, "KV events subscription failed; routing this engine approximately until it is back");
            metrics::kv_problem(&url, "kv_events_unreachable", true);
        }
        engine.source.store(SOURCE_DOWN, Ordering::Release);
        reset(&engine, &url, ClearReason::Identity);
        tokio::time::sleep(retry).await;
    }
}

/// Reads what routing relies on from the engine, reports what does not match, and returns
/// its publishers.
async fn register(kv: &Kv, url: &str, engine: &Engine) -> (Vec<Source>, Compat) {
    let Ok(base) = BackendUrl::parse(url) else {
        return (Vec::new(), Compat::default());
    };
    let timeout = Duration::from_millis(kv.config.connect_timeout_ms);
    let fetch = |path: &'static str| {
        let base = base.clone();
        async move {
            tokio::task::spawn_blocking(move || {
                let addr = base.resolve().ok()?;
                let r = lmstack_probe::client::get(addr, &base.authority(), path, timeout, 4 << 20).ok()?;
                (r.status == 200).then_some(r.body)
            })
            .await
            .ok()
            .flatten()
        }
    };
    let (metrics_text, sources_body) = (fetch("/metrics").await, fetch("/kv_event_sources").await);
    let report = Compat::read(metrics_text.as_deref());
    for (check, problem) in report.problems() {
        metrics::kv_problem(url, check, problem.is_some());
        if let Some(p) = problem {
            tracing::warn!(endpoint = url, check, "{p}");
        }
    }
    if let Some(bs) = report.block_size {
        engine.held.set_block_size(bs);
    }
    let host = base.host.clone();
    let sources = if let Some(e) = kv.config.endpoints.get(url) {
        vec![Source {
            rank: 0,
            endpoint: e.clone(),
            replay: None,
        }]
    } else if let Some(s) = sources_body
        .as_deref()
        .map(|b| parse_sources(b, &host))
        .filter(|s| !s.is_empty())
    {
        s
    } else if !kv.config.endpoint_template.is_empty() {
        vec![Source {
            rank: 0,
            endpoint: kv.config.endpoint_template.replace("{host}", &host),
            replay: None,
        }]
    } else {
        Vec::new()
    };
    if sources.is_empty() {
        tracing::info!(
            endpoint = url,
            "the engine publishes no KV events (no /kv_event_sources, no kv_events.endpoints entry): routed approximately"
        );
    } else {
        tracing::info!(endpoint = url, sources = ?sources, hash_algo = report.hash_algo.as_deref().unwrap_or("?"), "subscribing to KV events");
    }
    (sources, report)
}

/// `/kv_event_sources`: `{rank: {endpoint, replay_endpoint, topic, publisher, ...}}`, the
/// endpoints as the engine bound them (`*` or an IPv6 wildcard stand for its host).
fn parse_sources(body: &[u8], host: &str) -> Vec<Source> {
    let Ok(serde_json::Value::Object(ranks)) = serde_json::from_slice(body) else {
        return Vec::new();
    };
    let mut out: Vec<Source> = ranks
        .iter()
        .filter_map(|(rank, c)| {
            if c.get("publisher").and_then(|p| p.as_str()).is_some_and(|p| p != "zmq") {
                return None;
            }
            let endpoint = connectable(c.get("endpoint")?.as_str()?, host)?;
            let replay = c
                .get("replay_endpoint")
                .and_then(|r| r.as_str())
                .and_then(|r| connectable(r, host));
            Some(Source {
                rank: rank.parse().ok()?,
                endpoint,
                replay,
            })
        })
        .collect();
    out.sort_by_key(|s| s.rank);
    out
}

/// A bound endpoint as a subscriber connects to it: `tcp://*:5557`, `tcp://[::]:5557` and
/// `tcp://[::ffff:127.0.0.1]:5557` become `tcp://HOST:5557`.
fn connectable(endpoint: &str, host: &str) -> Option<String> {
    if endpoint.starts_with("ipc://") {
        return Some(endpoint.to_owned());
    }
    let rest = endpoint.strip_prefix("tcp://")?;
    let (h, port) = rest.rsplit_once(':')?;
    port.parse::<u16>().ok()?;
    let h = h.trim_start_matches('[').trim_end_matches(']');
    let h = match h {
        "*" | "::" | "0.0.0.0" => host,
        h => h.strip_prefix("::ffff:").unwrap_or(h),
    };
    Some(if h.contains(':') {
        format!("tcp://[{h}]:{port}")
    } else {
        format!("tcp://{h}:{port}")
    })
}

/// What registration found in the engine's `/metrics`.
#[derive(Debug, Default)]
struct Compat {
    scraped: bool,
    names: Vec<&'static str>,
    prefix_caching: Option<bool>,
    block_size: Option<u32>,
    num_gpu_blocks: Option<u64>,
    hash_algo: Option<String>,
    /// `vllm:prefix_cache_queries_total`: 0 when the engine has served no request.
    queries: Option<f64>,
}

impl Compat {
    /// The metric names routing reads (any one of each group).
    const NEEDED: [(&'static str, &'static [&'static str]); 4] = [
        ("metric_running", &["vllm:num_requests_running"]),
        ("metric_waiting", &["vllm:num_requests_waiting"]),
        (
            "metric_kv_usage",
            &["vllm:kv_cache_usage_perc", "vllm:gpu_cache_usage_perc"],
        ),
        (
            "metric_prefix_hits",
            &["vllm:prefix_cache_hits_total", "vllm:gpu_prefix_cache_hits_total"],
        ),
    ];

    fn read(text: Option<&[u8]>) -> Compat {
        let Some(text) = text.and_then(|t| std::str::from_utf8(t).ok()) else {
            return Compat::default();
        };
        let mut c = Compat {
            scraped: true,
            ..Compat::default()
        };
        for line in text.lines().filter(|l| !l.starts_with('#')) {
            let name = line.split(['{', ' ']).next().unwrap_or("");
            if matches!(
                name,
                "vllm:prefix_cache_queries_total" | "vllm:gpu_prefix_cache_queries_total"
            ) {
                let v: f64 = line.rsplit(' ').next().and_then(|v| v.parse().ok()).unwrap_or(f64::NAN);
                c.queries = Some(c.queries.unwrap_or(0.0) + v);
            }
            for (check, names) in Self::NEEDED {
                if names.contains(&name) && !c.names.contains(&check) {
                    c.names.push(check);
                }
            }
            if name == "vllm:cache_config_info" {
                let label = |key: &str| {
                    let at = line.find(&format!("{key}=\""))? + key.len() + 2;
                    let end = line[at..].find('"')?;
                    Some(line[at..at + end].to_owned())
                };
                c.prefix_caching = label("enable_prefix_caching").map(|v| v == "True");
                c.block_size = label("block_size").and_then(|v| v.parse().ok());
                c.num_gpu_blocks = label("num_gpu_blocks").and_then(|v| v.parse().ok());
                c.hash_algo = label("prefix_caching_hash_algo");
            }
        }
        c
    }

    /// Each check with its problem, if any.
    fn problems(&self) -> Vec<(&'static str, Option<String>)> {
        let mut out = vec![(
            "metrics",
            (!self.scraped)
                .then(|| "its /metrics cannot be read: load figures and cache checks are missing".to_owned()),
        )];
        if !self.scraped {
            return out;
        }
        for (check, names) in Self::NEEDED {
            out.push((
                check,
                (!self.names.contains(&check))
                    .then(|| format!("its /metrics has none of {names:?}: routing cannot see that figure")),
            ));
        }
        out.push((
            "prefix_caching",
            (self.prefix_caching == Some(false))
                .then(|| "prefix caching is off (--enable-prefix-caching): nothing to route on".to_owned()),
        ));
        out.push((
            "block_size",
            self.block_size
                .is_none()
                .then(|| "vllm:cache_config_info gives no block_size: known once events arrive".to_owned()),
        ));
        out
    }
}

/// Subscribes to every rank and applies their batches until a connection is lost.
async fn subscribe(kv: &Kv, url: &str, engine: &Engine, sources: &[Source], compat: &Compat) -> anyhow::Result<()> {
    let timeout = Duration::from_millis(kv.config.connect_timeout_ms);
    let (tx, mut rx) = tokio::sync::mpsc::channel::<Input>(1024);
    let mut readers = Vec::new();
    for source in sources {
        let mut socket = zeromq::SubSocket::new();
        let monitor = socket.monitor();
        tokio::time::timeout(timeout, socket.connect(&source.endpoint))
            .await
            .map_err(|_| anyhow::anyhow!("connecting to {} timed out", source.endpoint))?
            .with_context(|| format!("connecting to {}", source.endpoint))?;
        socket.subscribe(&kv.config.topic).await?;
        readers.push(tokio::spawn(read(socket, monitor, source.rank, tx.clone())));
    }
    drop(tx);
    metrics::kv_problem(url, "kv_events_unreachable", false);
    let mut index = EngineIndex::new(
        engine.held.clone(),
        IndexLimits {
            max_blocks: kv.config.max_blocks_per_engine,
        },
    );
    if let Some(blocks) = compat.num_gpu_blocks {
        index.set_capacity(blocks);
    }
    if compat.queries == Some(0.0) {
        // It has served nothing: it holds nothing, and the index starts complete.
        index.started_empty();
    }
    engine.source.store(SOURCE_LIVE, Ordering::Release);
    engine.held.set_fresh(true);
    tracing::info!(endpoint = url, "KV events subscribed: routing this engine exactly");
    let mut published = IndexStats::default();
    let result = loop {
        let Some(input) = rx.recv().await else {
            break Ok(());
        };
        match input {
            Input::Lost(rank) => break Err(anyhow::anyhow!("rank {rank}'s publisher disconnected")),
            Input::Bad(e) => {
                metrics::kv_dropped(url, Dropped::Malformed.as_str(), 1);
                tracing::debug!(endpoint = url, error = %e, "undecodable KV event frame");
            }
            Input::Batch(rank, seq, batch) => {
                metrics::kv_received(url);
                if let SeqCheck::Gap { from, to } = index.check_seq(rank, seq)
                    && let Some(replay) = sources
                        .iter()
                        .find(|s| s.rank == rank)
                        .and_then(|s| s.replay.as_deref())
                {
                    match fetch_replay(replay, from, to, Duration::from_millis(kv.config.replay_timeout_ms)).await {
                        Ok(batches) => {
                            for (s, b) in &batches {
                                index.apply(*s, b, now_ms());
                            }
                            index.replayed(rank, to);
                            metrics::kv_replayed(url, batches.len());
                        }
                        Err(e) => {
                            tracing::warn!(endpoint = url, error = %e, from, to, "KV events replay failed; dropping the index")
                        }
                    }
                }
                let check = index.apply(seq, &batch, now_ms());
                if matches!(check, SeqCheck::Gap { .. } | SeqCheck::Backwards) {
                    tracing::info!(endpoint = url, rank, seq, verdict = ?check, "KV event sequence broke: index dropped, refilling from events");
                }
                publish(url, index.stats(), &mut published);
            }
        }
    };
    for r in readers {
        r.abort();
    }
    result
}

enum Input {
    Batch(u32, i64, Batch),
    Bad(String),
    Lost(u32),
}

async fn read(
    mut socket: zeromq::SubSocket,
    mut monitor: impl futures_util::Stream<Item = SocketEvent> + Unpin,
    rank: u32,
    tx: tokio::sync::mpsc::Sender<Input>,
) {
    use futures_util::StreamExt as _;
    loop {
        let input = tokio::select! {
            msg = socket.recv() => match msg {
                Ok(m) => decode(&m, rank),
                Err(_) => Input::Lost(rank),
            },
            ev = monitor.next() => match ev {
                Some(SocketEvent::Disconnected(_)) | None => Input::Lost(rank),
                Some(_) => continue,
            },
        };
        let lost = matches!(input, Input::Lost(_));
        if tx.send(input).await.is_err() || lost {
            return;
        }
    }
}

/// `[topic, seq, payload]` (a publisher without a topic may send `[seq, payload]`).
fn decode(m: &zeromq::ZmqMessage, rank: u32) -> Input {
    let frames: Vec<&[u8]> = m.iter().map(|b| b.as_ref()).collect();
    let (seq, payload) = match frames.as_slice() {
        [_, seq, payload] | [seq, payload] => (seq, payload),
        _ => return Input::Bad(format!("{} frames", frames.len())),
    };
    match (event::decode_seq(seq), event::decode_batch(payload)) {
        (Ok(seq), Ok(mut batch)) => {
            // The subscription's rank wins over what the batch says (older releases omit it).
            batch.dp_rank = Some(batch.dp_rank.unwrap_or(rank));
            Input::Batch(rank, seq, batch)
        }
        (Err(e), _) | (_, Err(e)) => Input::Bad(e.to_string()),
    }
}

/// Asks the engine's replay socket for batches `from..to`.
async fn fetch_replay(endpoint: &str, from: i64, to: i64, timeout: Duration) -> anyhow::Result<Vec<(i64, Batch)>> {
    tokio::time::timeout(timeout, async {
        let mut socket = zeromq::DealerSocket::new();
        socket.connect(endpoint).await?;
        let mut request = zeromq::ZmqMessage::from(bytes::Bytes::new());
        request.push_back(bytes::Bytes::copy_from_slice(&event::encode_seq(from)));
        socket.send(request).await?;
        let mut out = Vec::new();
        loop {
            let m = socket.recv().await?;
            let frames: Vec<&[u8]> = m.iter().map(|b| b.as_ref()).collect();
            // [empty, topic, seq, payload]; the end is seq -1.
            let [_, _, seq, payload] = frames.as_slice() else {
                anyhow::bail!("a replay message of {} frames", frames.len());
            };
            let seq = event::decode_seq(seq)?;
            if seq == event::END_SEQ {
                break;
            }
            if seq < to {
                out.push((seq, event::decode_batch(payload)?));
            }
        }
        let covered = out.first().is_some_and(|(s, _)| *s == from) && out.len() as i64 == to - from;
        anyhow::ensure!(covered, "the replay buffer no longer holds {from}..{to}");
        Ok(out)
    })
    .await
    .map_err(|_| anyhow::anyhow!("replay timed out"))?
}

/// Publishes what changed in `stats` since `published`.
fn publish(url: &str, stats: &IndexStats, published: &mut IndexStats) {
    let applied = stats.events_applied - published.events_applied;
    if applied > 0 {
        metrics::kv_applied(url, applied);
    }
    for why in Dropped::ALL {
        let n = stats.events_dropped.get(&why).copied().unwrap_or(0)
            - published.events_dropped.get(&why).copied().unwrap_or(0);
        if n > 0 {
            metrics::kv_dropped(url, why.as_str(), n);
        }
    }
    for reason in ClearReason::ALL {
        let n = stats.clears.get(&reason).copied().unwrap_or(0) - published.clears.get(&reason).copied().unwrap_or(0);
        if n > 0 {
            metrics::kv_resync(url, reason.as_str(), n);
        }
    }
    *published = stats.clone();
}

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bound_endpoints_become_connectable() {
        assert_eq!(
            connectable("tcp://*:5557", "10.0.0.5").as_deref(),
            Some("tcp://10.0.0.5:5557")
        );
        assert_eq!(
            connectable("tcp://[::ffff:127.0.0.1]:5557", "h").as_deref(),
            Some("tcp://127.0.0.1:5557")
        );
        assert_eq!(connectable("tcp://[::]:6000", "h").as_deref(), Some("tcp://h:6000"));
        assert_eq!(
            connectable("tcp://[fd00::1]:6000", "h").as_deref(),
            Some("tcp://[fd00::1]:6000")
        );
        assert_eq!(
            connectable("ipc:///tmp/kv.ipc", "h").as_deref(),
            Some("ipc:///tmp/kv.ipc")
        );
        assert_eq!(connectable("tcp://nohost", "h"), None);
    }

    #[test]
    fn sources_come_per_rank() {
        let body = br#"{"1": {"publisher": "zmq", "endpoint": "tcp://*:5558", "replay_endpoint": null},
                        "0": {"publisher": "zmq", "endpoint": "tcp://*:5557", "replay_endpoint": "tcp://*:5600"}}"#;
        let s = parse_sources(body, "e1");
        assert_eq!(s.len(), 2);
        assert_eq!(s[0].endpoint, "tcp://e1:5557");
        assert_eq!(s[0].replay.as_deref(), Some("tcp://e1:5600"));
        assert_eq!(s[1].rank, 1);
        assert!(parse_sources(b"{}", "h").is_empty());
        assert!(parse_sources(br#"{"0": {"publisher": "null", "endpoint": "tcp://*:1"}}"#, "h").is_empty());
    }

    #[test]
    fn registration_reads_the_real_engine_metrics() {
        let text = include_bytes!("../../../control/snapshot/tests/fixtures/vllm-0.32-cpu-metrics.txt");
        let c = Compat::read(Some(text));
        assert_eq!(c.block_size, Some(32));
        assert_eq!(c.prefix_caching, Some(true));
        assert_eq!(c.hash_algo.as_deref(), Some("sha256"));
        assert!(c.problems().iter().all(|(_, p)| p.is_none()), "{:?}", c.problems());
        let bare = Compat::read(Some(b"vllm:num_requests_running 1\n"));
        let problems: Vec<_> = bare
            .problems()
            .into_iter()
            .filter(|(_, p)| p.is_some())
            .map(|(c, _)| c)
            .collect();
        assert_eq!(
            problems,
            ["metric_waiting", "metric_kv_usage", "metric_prefix_hits", "block_size"]
        );
    }
}
