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
use lmstack_kv::index::{ClearReason, Dropped, Held};
use lmstack_kv::intake::{self, Counts, IntakeConfig, Observer, SourceState};
use lmstack_kv::key::{self, BlockKey, RequestExtras};
use lmstack_kv::prompt::PromptTokenizer;

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
    /// Indexes come from lmstack-control's stream, not from subscriptions.
    via_control: bool,
    engines: papaya::HashMap<Arc<str>, Arc<Engine>>,
    tokenizers: papaya::HashMap<Arc<str>, Arc<PromptTokenizer>>,
}

/// The affinity table's block, in tokens, for models with a tokenizer: their prompts are
/// matched there on token blocks (chained like the engines' index keys), so that the table's
/// matches, the engines' own and the load counts are all in one unit. vLLM's default block.
pub const AFFINITY_BLOCK_TOKENS: usize = 16;

/// A request's token ids and what else keys its blocks, as vLLM hashes them.
pub struct Tokenized<'b> {
    pub tokens: Vec<u32>,
    lora_name: Option<&'b str>,
    cache_salt: Option<std::borrow::Cow<'b, str>>,
}

impl Tokenized<'_> {
    pub fn extras(&self) -> RequestExtras<'_> {
        RequestExtras {
            lora_name: self.lora_name,
            cache_salt: self.cache_salt.as_deref(),
        }
    }

    /// Its blocks for the affinity table (at most `max` of them).
    pub fn affinity_blocks(&self, max: usize, out: &mut Vec<BlockKey>) {
        let tokens = &self.tokens[..self.tokens.len().min(max.saturating_mul(AFFINITY_BLOCK_TOKENS))];
        key::prompt_keys(tokens, AFFINITY_BLOCK_TOKENS, self.extras(), out);
    }
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
    /// `control_mode`: discovery follows lmstack-control (which relays indexes when
    /// `kv_events.via_control`).
    pub fn new(config: KvEventsConfig, control_mode: bool) -> Self {
        Self {
            via_control: control_mode && config.via_control,
            config,
            engines: papaya::HashMap::new(),
            tokenizers: papaya::HashMap::new(),
        }
    }

    pub fn via_control(&self) -> bool {
        self.via_control
    }

    /// Applies an engine's index changes relayed by lmstack-control.
    pub fn apply_relayed(&self, delta: &lmstack_snapshot::KvDelta) {
        let engines = self.engines.pin();
        let engine = engines.get_or_insert_with(Arc::from(delta.endpoint.as_str()), Arc::default);
        if delta.reset {
            engine.held.reset();
        }
        if delta.block_size > 0 {
            engine.held.set_block_size(delta.block_size);
        }
        engine.held.apply_relayed(&delta.added, &delta.removed, delta.complete);
        engine.held.set_fresh(delta.live);
        let source = match (delta.publishes, delta.live) {
            (false, _) => SOURCE_NONE,
            (true, false) => SOURCE_DOWN,
            (true, true) => SOURCE_LIVE,
        };
        engine.source.store(source, Ordering::Release);
    }

    /// How `prefix` routes `model` on the engine at `url` now.
    pub fn mode(&self, model: &str, lora_of: Option<&str>, url: &str) -> Mode {
        let tokenizers = self.tokenizers.pin();
        let tokenizer = tokenizers.contains_key(model) || lora_of.is_some_and(|p| tokenizers.contains_key(p));
        match self.engines.pin().get(url) {
            Some(e) => e.mode(tokenizer),
            None => Mode::Approximate,
        }
    }

    /// The request's token ids as the engines will see them, and what else keys its blocks;
    /// `None` when the model has no tokenizer here, the body is over
    /// `kv_events.max_prompt_bytes`, or vLLM's tokenization cannot be reproduced exactly
    /// (the request is then matched on characters, as without a tokenizer).
    pub fn tokenize<'b>(
        &self,
        model: &'b str,
        lora_of: Option<&str>,
        chat: bool,
        body: &'b [u8],
    ) -> Option<Tokenized<'b>> {
        if body.len() > self.config.max_prompt_bytes {
            return None;
        }
        let tokenizers = self.tokenizers.pin();
        // A LoRA adapter tokenizes as its base model, unless it has its own tokenizer.
        let tokenizer = tokenizers.get(model).or_else(|| tokenizers.get(lora_of?))?;
        let tokens = if chat {
            tokenizer.chat(body).ok()?
        } else {
            tokenizer.completion(body).ok()?
        };
        let salt: Salted<'b> = serde_json::from_slice(body).ok()?;
        Some(Tokenized {
            tokens,
            lora_name: lora_of.is_some().then_some(model),
            cache_salt: salt.cache_salt,
        })
    }

    /// Replaces the affinity table's matches of the pool's endpoints whose events are live
    /// with what they hold, in the table's units (blocks of [`AFFINITY_BLOCK_TOKENS`] tokens
    /// of `request`): the engine's count where its index is complete, the larger of the two
    /// where it is a lower bound. `held` gets, per pool index, the engine's own count of
    /// blocks (`u32::MAX` where its events are not live). `None` when no endpoint of the
    /// pool has live events.
    pub fn refine<'u>(
        &self,
        request: &Tokenized<'_>,
        urls: impl Iterator<Item = &'u str>,
        matched: &mut [u32],
        held: &mut Vec<u32>,
        keys: &mut Vec<BlockKey>,
    ) -> Option<Exact> {
        held.clear();
        held.resize(matched.len(), u32::MAX);
        let engines = self.engines.pin();
        let mut found = Exact {
            tokens: request.tokens.len(),
            ..Exact::default()
        };
        let mut keyed_for = 0;
        for (i, url) in urls.enumerate() {
            let Some(engine) = engines.get(url).filter(|e| e.live()) else {
                continue;
            };
            let complete = engine.held.is_complete();
            found.incomplete += usize::from(!complete);
            found.endpoints += 1;
            let Some(block_size) = engine.held.block_size() else {
                // No block stored yet: it holds nothing of any prompt.
                if complete {
                    matched[i] = 0;
                }
                held[i] = 0;
                continue;
            };
            if keyed_for != block_size {
                key::prompt_keys(&request.tokens, block_size as usize, request.extras(), keys);
                keyed_for = block_size;
            }
            let n = engine.held.matched(keys);
            held[i] = n as u32;
            found.blocks = keys.len();
            found.best = found.best.max(n);
            // In the table's units: the same tokens, cut in its block size.
            let exact = (n * block_size as usize / AFFINITY_BLOCK_TOKENS) as u32;
            matched[i] = if complete { exact } else { exact.max(matched[i]) };
        }
        (found.endpoints > 0).then_some(found)
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
    let c = &kv.config;
    let intake = Arc::new(IntakeConfig {
        endpoints: c.endpoints.clone(),
        endpoint_template: c.endpoint_template.clone(),
        topic: c.topic.clone(),
        max_blocks: c.max_blocks_per_engine,
        connect_timeout: Duration::from_millis(c.connect_timeout_ms),
        replay_timeout: Duration::from_millis(c.replay_timeout_ms),
        retry: every,
    });
    let observer: Arc<dyn Observer> = Arc::new(Observed { kv: kv.clone() });
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
            // A LoRA adapter without a tokenizer of its own uses its base model's.
            let dir = dir.filter(|_| pool.parent.is_none() || kv.config.tokenizers.contains_key(&*pool.name));
            if tried_tokenizers.get(&pool.name) == Some(&dir) || (dir.is_none() && pool.parent.is_some()) {
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
                    engine.held.set_fresh(false);
                    engine.held.reset();
                    engine.source.store(SOURCE_DOWN, Ordering::Release);
                    metrics::kv_resync(url, ClearReason::Identity.as_str(), 1);
                }
                if !wanted.contains_key(url) {
                    kv.engines.pin().remove(url);
                    metrics::kv_engine_gone(url);
                }
            }
            keep
        });
        if kv.via_control {
            // Control relays the indexes: only forget engines that left.
            let engines = kv.engines.pin();
            let gone: Vec<Arc<str>> = engines.keys().filter(|u| !wanted.contains_key(*u)).cloned().collect();
            for url in gone {
                engines.remove(&url);
                metrics::kv_engine_gone(&url);
            }
        }
        for (url, healthy) in &wanted {
            if kv.via_control || !healthy || running.contains_key(url) {
                continue;
            }
            let engine = kv.engines.pin().get_or_insert_with(url.clone(), Arc::default).clone();
            let task = tokio::spawn(intake::follow(
                intake.clone(),
                url.clone(),
                engine.held.clone(),
                observer.clone(),
            ));
            running.insert(url.clone(), Running { task });
        }
        // Figures.
        for pool in state.pools().filter(|p| p.policy.name().uses_prefix()) {
            for &i in &pool.endpoints {
                let url = &state.endpoints[i].url;
                metrics::kv_mode(
                    &pool.name,
                    url,
                    kv.mode(&pool.name, pool.parent.as_deref(), url).as_str(),
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

/// The router's [`Observer`]: metrics, and each engine's source state for routing.
struct Observed {
    kv: Arc<Kv>,
}

impl Observer for Observed {
    fn check(&self, url: &str, check: &'static str, problem: bool) {
        metrics::kv_problem(url, check, problem);
    }

    fn source(&self, url: &str, state: SourceState) {
        if let Some(e) = self.kv.engines.pin().get(url) {
            e.source.store(
                match state {
                    SourceState::None => SOURCE_NONE,
                    SourceState::Down => SOURCE_DOWN,
                    SourceState::Live => SOURCE_LIVE,
                },
                Ordering::Release,
            );
        }
    }

    fn received(&self, url: &str) {
        metrics::kv_received(url);
    }

    fn counted(&self, url: &str, c: &Counts) {
        if c.applied > 0 {
            metrics::kv_applied(url, c.applied);
        }
        for (why, n) in &c.dropped {
            metrics::kv_dropped(url, why.as_str(), *n);
        }
        if c.malformed_frames > 0 {
            metrics::kv_dropped(url, Dropped::Malformed.as_str(), c.malformed_frames);
        }
        for (reason, n) in &c.clears {
            metrics::kv_resync(url, reason.as_str(), *n);
        }
        if c.replayed > 0 {
            metrics::kv_replayed(url, c.replayed);
        }
    }

    fn dropped(&self, url: &str, reason: ClearReason) {
        metrics::kv_resync(url, reason.as_str(), 1);
    }
}
