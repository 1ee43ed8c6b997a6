//! Tenancy: API keys, the tenant each belongs to, the models it may use, its priority and
//! its budgets (requests per second or minute, tokens per minute); the keys file and its
//! reload.
//!
//! Keys are kept only as SHA-256 hashes: a presented key is hashed, found by its hash and
//! compared in constant time. Budgets are GCRA buckets (`budget.rs`) shared by every
//! worker; a reload builds the new table from the old one and keeps the buckets of the
//! tenants and keys that stay, so a changed file neither resets nor loses what was spent.
//! Not here: where in a request's life admission happens (`proxy.rs`), the responses
//! (`response.rs`), budgets shared across router replicas (each replica keeps its own).

use std::collections::HashMap;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use lmstack_http::head::RequestHead;
use metrics::{Counter, counter};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use crate::budget::{Bucket, Rate, Refused, Standing, now_ns, openai_duration};
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};

use lmstack_snapshot::BudgetSpend;

use crate::error::{ErrorKind, ProxyError};
use crate::metrics::{
    AUTH_REJECTED_TOTAL, TENANCY_KEYS, TENANCY_RELOADS_TOTAL, TENANT_REQUESTS_TOTAL, TENANT_TOKENS_TOTAL,
};

/// The keys file.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KeysFile {
    /// The secret tenants' `cache_salt`s are derived from (needed when any tenant has
    /// `cache_isolation`): a salt another tenant could guess would let it probe the cache.
    #[serde(default)]
    pub cache_salt_secret: Option<String>,
    pub tenants: Vec<TenantSpec>,
}

/// Admission order when endpoints are busy: a higher class's waiting requests go first.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Priority {
    Low,
    #[default]
    Normal,
    High,
}

/// Budgets; each absent one is unlimited.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Limits {
    pub requests_per_second: Option<u64>,
    pub requests_per_minute: Option<u64>,
    pub tokens_per_minute: Option<u64>,
}

impl Limits {
    fn requests(&self) -> Option<Rate> {
        match (self.requests_per_second, self.requests_per_minute) {
            (Some(limit), _) => Some(Rate {
                limit,
                period: Duration::from_secs(1),
            }),
            (None, Some(limit)) => Some(Rate {
                limit,
                period: Duration::from_secs(60),
            }),
            (None, None) => None,
        }
    }

    fn tokens(&self) -> Option<Rate> {
        self.tokens_per_minute.map(|limit| Rate {
            limit,
            period: Duration::from_secs(60),
        })
    }

    fn check(&self, whose: &str) -> Result<(), String> {
        if self.requests_per_second.is_some() && self.requests_per_minute.is_some() {
            return Err(format!(
                "{whose}: give requests_per_second or requests_per_minute, not both"
            ));
        }
        for (name, v) in [
            ("requests_per_second", self.requests_per_second),
            ("requests_per_minute", self.requests_per_minute),
            ("tokens_per_minute", self.tokens_per_minute),
        ] {
            if v == Some(0) {
                return Err(format!("{whose}: {name} must be greater than 0 (omit it for no limit)"));
            }
        }
        Ok(())
    }
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TenantSpec {
    /// The `tenant` metric label and log field.
    pub name: String,
    #[serde(default)]
    pub priority: Priority,
    /// Models its keys may use: names, or a prefix ending in `*`; omitted: every model.
    #[serde(default)]
    pub models: Option<Vec<String>>,
    #[serde(default)]
    pub requests_per_second: Option<u64>,
    #[serde(default)]
    pub requests_per_minute: Option<u64>,
    #[serde(default)]
    pub tokens_per_minute: Option<u64>,
    /// Its requests get a `cache_salt` of their own (replacing the client's) and their own
    /// prefix affinity: its prompts neither hit nor probe another tenant's KV cache.
    #[serde(default)]
    pub cache_isolation: bool,
    pub keys: Vec<KeySpec>,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KeySpec {
    /// The key's SHA-256, in hex (`printf %s "$KEY" | sha256sum`).
    pub sha256: String,
    /// For logs.
    #[serde(default)]
    pub name: Option<String>,
    /// Narrower than the tenant's, when given.
    #[serde(default)]
    pub models: Option<Vec<String>>,
    /// The key's own budgets, within the tenant's.
    #[serde(default)]
    pub requests_per_second: Option<u64>,
    #[serde(default)]
    pub requests_per_minute: Option<u64>,
    #[serde(default)]
    pub tokens_per_minute: Option<u64>,
}

impl TenantSpec {
    fn limits(&self) -> Limits {
        Limits {
            requests_per_second: self.requests_per_second,
            requests_per_minute: self.requests_per_minute,
            tokens_per_minute: self.tokens_per_minute,
        }
    }
}

impl KeySpec {
    fn limits(&self) -> Limits {
        Limits {
            requests_per_second: self.requests_per_second,
            requests_per_minute: self.requests_per_minute,
            tokens_per_minute: self.tokens_per_minute,
        }
    }
}

impl KeysFile {
    pub fn read(path: &Path) -> Result<(KeysFile, Vec<u8>), String> {
        let bytes = std::fs::read(path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
        let file = Self::parse(&bytes).map_err(|e| format!("{}: {e}", path.display()))?;
        Ok((file, bytes))
    }

    pub fn parse(bytes: &[u8]) -> Result<KeysFile, String> {
        let file: KeysFile = serde_yaml_ng::from_slice(bytes).map_err(|e| e.to_string())?;
        file.check()?;
        Ok(file)
    }

    fn check(&self) -> Result<(), String> {
        let mut names = std::collections::HashSet::new();
        let mut hashes = std::collections::HashSet::new();
        for t in &self.tenants {
            if t.name.is_empty() || !names.insert(t.name.as_str()) {
                return Err(format!("tenant names must be unique and not empty: {:?}", t.name));
            }
            t.limits().check(&format!("tenant {}", t.name))?;
            if t.cache_isolation && self.cache_salt_secret.as_deref().is_none_or(str::is_empty) {
                return Err(format!(
                    "tenant {}: cache_isolation needs cache_salt_secret at the top of the file",
                    t.name
                ));
            }
            for k in &t.keys {
                let hash = parse_hash(&k.sha256).map_err(|e| format!("tenant {}: {e}", t.name))?;
                if !hashes.insert(hash) {
                    return Err(format!("tenant {}: a key appears twice", t.name));
                }
                k.limits()
                    .check(&format!("tenant {} key {}", t.name, k.name.as_deref().unwrap_or("")))?;
            }
        }
        Ok(())
    }
}

fn parse_hash(hex_text: &str) -> Result<[u8; 32], String> {
    let mut hash = [0u8; 32];
    hex::decode_to_slice(hex_text.trim(), &mut hash)
        .map_err(|e| format!("sha256 {hex_text:?} is not 64 hex digits: {e}"))?;
    Ok(hash)
}

/// Model names or prefixes (`foo*`); `*` alone is every model.
#[derive(Debug)]
struct Models(Vec<String>);

impl Models {
    fn allows(&self, model: &str) -> bool {
        crate::config::model_matches(&self.0, model)
    }
}

/// A budget and its bucket (kept across reloads while the budget stays the same).
#[derive(Debug)]
struct Limit {
    rate: Rate,
    bucket: Arc<Bucket>,
}

/// What a tenant's (or key's) requests spent here since the last report to control.
#[derive(Debug, Default)]
struct Unreported {
    requests: AtomicU64,
    tokens: AtomicI64,
}

impl Unreported {
    fn take(&self) -> (u64, i64) {
        (
            self.requests.swap(0, Ordering::Relaxed),
            self.tokens.swap(0, Ordering::Relaxed),
        )
    }
}

/// Charges another replica's spending to this one's buckets.
fn charge(requests: Option<&Limit>, tokens: Option<&Limit>, spend: &BudgetSpend, now: u64) {
    if let Some(l) = requests {
        l.bucket
            .settle(l.rate, i64::try_from(spend.requests).unwrap_or(i64::MAX), now);
    }
    if let Some(l) = tokens {
        l.bucket.settle(l.rate, spend.tokens, now);
    }
}

/// `old`'s bucket goes on under the new budget (a changed limit does not hand out a full
/// bucket, and requests in flight settle into the bucket in force).
fn same(old: Option<&Limit>, rate: Option<Rate>) -> Option<&Limit> {
    old.filter(|_| rate.is_some())
}

fn limit(rate: Option<Rate>, old: Option<&Limit>) -> Option<Limit> {
    let rate = rate?;
    let bucket = old.map_or_else(Arc::default, |o| o.bucket.clone());
    Some(Limit { rate, bucket })
}

#[derive(Debug)]
struct TenantMetrics {
    admitted: Counter,
    throttled_requests: Counter,
    throttled_tokens: Counter,
    too_large: Counter,
    model_not_allowed: Counter,
    prompt_tokens: Counter,
    completion_tokens: Counter,
    estimated_tokens: Counter,
}

impl TenantMetrics {
    fn new(tenant: &str) -> Self {
        let outcome = |o: &'static str| counter!(TENANT_REQUESTS_TOTAL, "tenant" => tenant.to_owned(), "outcome" => o);
        let tokens = |k: &'static str| counter!(TENANT_TOKENS_TOTAL, "tenant" => tenant.to_owned(), "kind" => k);
        Self {
            admitted: outcome("admitted"),
            throttled_requests: outcome("throttled_requests"),
            throttled_tokens: outcome("throttled_tokens"),
            too_large: outcome("too_large"),
            model_not_allowed: outcome("model_not_allowed"),
            prompt_tokens: tokens("prompt"),
            completion_tokens: tokens("completion"),
            estimated_tokens: tokens("estimated"),
        }
    }
}

#[derive(Debug)]
pub struct Tenant {
    pub name: Arc<str>,
    pub priority: Priority,
    /// Where its next waiting request's fair-queuing tag starts (tokens, virtual time).
    finish: Arc<AtomicU64>,
    unreported: Arc<Unreported>,
    models: Option<Models>,
    requests: Option<Limit>,
    tokens: Option<Limit>,
    /// The `cache_salt` its requests carry (`cache_isolation`), and the seed of its prefix
    /// affinity.
    pub cache_salt: Option<Arc<str>>,
    metrics: TenantMetrics,
}

#[derive(Debug)]
pub struct Key {
    pub name: Option<Arc<str>>,
    hash: [u8; 32],
    /// How other replicas name it (a hash of its hash).
    id: String,
    unreported: Arc<Unreported>,
    pub tenant: Arc<Tenant>,
    models: Option<Models>,
    requests: Option<Limit>,
    tokens: Option<Limit>,
}

/// The keys in force.
#[derive(Debug)]
pub struct Tenants {
    keys: HashMap<[u8; 32], Arc<Key>>,
    /// 401s: no key, an unknown one.
    missing: Counter,
    invalid: Counter,
    /// The keys by the id other replicas know them by.
    by_id: HashMap<String, Arc<Key>>,
    tenants: HashMap<String, Arc<Tenant>>,
}

impl Tenants {
    /// The table for `file`, keeping the buckets of `old`'s tenants and keys whose budgets
    /// stay the same.
    pub fn build(file: &KeysFile, old: Option<&Tenants>) -> Tenants {
        let mut keys = HashMap::new();
        let mut by_id = HashMap::new();
        let mut tenants = HashMap::new();
        for spec in &file.tenants {
            let before = old.and_then(|o| o.tenants.get(&spec.name));
            let (requests, tokens) = (spec.limits().requests(), spec.limits().tokens());
            let tenant = Arc::new(Tenant {
                name: spec.name.as_str().into(),
                priority: spec.priority,
                finish: before.map_or_else(Arc::default, |t| t.finish.clone()),
                unreported: before.map_or_else(Arc::default, |t| t.unreported.clone()),
                models: spec.models.clone().map(Models),
                requests: limit(requests, same(before.and_then(|t| t.requests.as_ref()), requests)),
                tokens: limit(tokens, same(before.and_then(|t| t.tokens.as_ref()), tokens)),
                cache_salt: spec
                    .cache_isolation
                    .then(|| cache_salt(file.cache_salt_secret.as_deref().unwrap_or(""), &spec.name).into()),
                metrics: TenantMetrics::new(&spec.name),
            });
            for k in &spec.keys {
                let Ok(hash) = parse_hash(&k.sha256) else { continue };
                let before = old.and_then(|o| o.keys.get(&hash));
                let (requests, tokens) = (k.limits().requests(), k.limits().tokens());
                let id = key_id(&hash);
                let key = Arc::new(Key {
                    name: k.name.as_deref().map(Arc::from),
                    hash,
                    id: id.clone(),
                    unreported: before.map_or_else(Arc::default, |k| k.unreported.clone()),
                    tenant: tenant.clone(),
                    models: k.models.clone().map(Models),
                    requests: limit(requests, same(before.and_then(|k| k.requests.as_ref()), requests)),
                    tokens: limit(tokens, same(before.and_then(|k| k.tokens.as_ref()), tokens)),
                });
                by_id.insert(id, key.clone());
                keys.insert(hash, key);
            }
            tenants.insert(spec.name.clone(), tenant);
        }
        Tenants {
            keys,
            missing: counter!(AUTH_REJECTED_TOTAL, "reason" => "missing"),
            invalid: counter!(AUTH_REJECTED_TOTAL, "reason" => "invalid"),
            by_id,
            tenants,
        }
    }

    /// What every tenant and key with a budget spent here since the last call.
    pub fn take_spent(&self) -> Vec<BudgetSpend> {
        let mut out = Vec::new();
        let mut push = |tenant: &str, key: Option<&str>, (requests, tokens): (u64, i64)| {
            if requests != 0 || tokens != 0 {
                out.push(BudgetSpend {
                    tenant: tenant.to_owned(),
                    key: key.map(str::to_owned),
                    requests,
                    tokens,
                });
            }
        };
        // Every count is drained (a budget added later must not see old spending); only
        // those with a budget are reported.
        for t in self.tenants.values() {
            let spent = t.unreported.take();
            if t.requests.is_some() || t.tokens.is_some() {
                push(&t.name, None, spent);
            }
        }
        for k in self.keys.values() {
            let spent = k.unreported.take();
            if k.requests.is_some() || k.tokens.is_some() {
                push(&k.tenant.name, Some(&k.id), spent);
            }
        }
        out
    }

    /// Charges another replica's spending (`take_spent` there) to this one's buckets.
    pub fn charge(&self, spend: &BudgetSpend) {
        let now = now_ns();
        match &spend.key {
            None => {
                if let Some(t) = self.tenants.get(&spend.tenant) {
                    charge(t.requests.as_ref(), t.tokens.as_ref(), spend, now);
                }
            }
            Some(id) => {
                if let Some(k) = self.by_id.get(id) {
                    charge(k.requests.as_ref(), k.tokens.as_ref(), spend, now);
                }
            }
        }
    }

    pub fn len(&self) -> usize {
        self.keys.len()
    }

    /// The key a request presents (`Authorization: Bearer KEY`, else `x-api-key: KEY`).
    pub fn authenticate(&self, head: &RequestHead) -> Result<Arc<Key>, ProxyError> {
        let presented = head
            .headers
            .get_str("authorization")
            .and_then(|v| {
                let (scheme, rest) = v.trim().split_once(' ')?;
                scheme.eq_ignore_ascii_case("bearer").then(|| rest.trim())
            })
            .or_else(|| head.headers.get_str("x-api-key").map(str::trim))
            .filter(|k| !k.is_empty());
        let Some(presented) = presented else {
            self.missing.increment(1);
            return Err(ProxyError::new(
                ErrorKind::Unauthorized,
                "You didn't provide an API key. Send it as `Authorization: Bearer KEY` or `x-api-key: KEY`.",
            ));
        };
        let hash: [u8; 32] = Sha256::digest(presented.as_bytes()).into();
        match self.keys.get(&hash) {
            Some(key) if bool::from(key.hash.ct_eq(&hash)) => Ok(key.clone()),
            _ => {
                self.invalid.increment(1);
                Err(ProxyError::new(ErrorKind::Unauthorized, "Incorrect API key provided."))
            }
        }
    }
}

/// A key's name between replicas: a hash of its hash (the file's hashes stay in the file).
fn key_id(hash: &[u8; 32]) -> String {
    hex::encode(&Sha256::digest(hash)[..8])
}

/// A tenant's `cache_salt`: not guessable without the secret, the same on every replica.
fn cache_salt(secret: &str, tenant: &str) -> String {
    let mut h = Sha256::new();
    h.update(b"lmstack cache salt\0");
    h.update(secret.as_bytes());
    h.update(b"\0");
    h.update(tenant.as_bytes());
    hex::encode(&h.finalize()[..16])
}

/// What a request holds of its key's budgets until it ends.
#[derive(Debug)]
pub struct Grant {
    key: Arc<Key>,
    reserved: u64,
    /// `x-ratelimit-*` header lines for the response.
    pub headers: String,
}

impl Key {
    /// Whether this key may use `model` (a 403 otherwise).
    pub fn allow_model(&self, model: &str) -> Result<(), ProxyError> {
        if self.lists(model) {
            return Ok(());
        }
        self.tenant.metrics.model_not_allowed.increment(1);
        Err(ProxyError::new(
            ErrorKind::ModelNotAllowed,
            format!("This API key may not use the model `{model}`."),
        )
        .with_param("model"))
    }

    /// Whether `model` is listed for this key (`/v1/models`).
    pub fn lists(&self, model: &str) -> bool {
        [&self.tenant.models, &self.models]
            .into_iter()
            .flatten()
            .all(|m| m.allows(model))
    }

    /// Spends one request and reserves `tokens` from the key's and its tenant's budgets, or
    /// says why not (429, with `Retry-After` when waiting helps).
    pub fn admit(self: &Arc<Key>, tokens: u64) -> Result<Grant, ProxyError> {
        let now = now_ns();
        let t = &self.tenant;
        // One that can never pass says so rather than "later".
        if let Some(l) = [&self.tokens, &t.tokens]
            .into_iter()
            .flatten()
            .find(|l| tokens > l.rate.limit)
        {
            return Err(self.refusal(Refused::TooLarge { limit: l.rate.limit }, true, tokens));
        }
        let mut spent: Vec<(&Limit, u64)> = Vec::with_capacity(4);
        let mut standing_requests: Option<Standing> = None;
        let mut standing_tokens: Option<Standing> = None;
        let budgets = [
            (&self.requests, 1, false),
            (&t.requests, 1, false),
            (&self.tokens, tokens, true),
            (&t.tokens, tokens, true),
        ];
        for (limit, units, is_tokens) in budgets {
            let Some(limit) = limit else { continue };
            match limit.bucket.spend(limit.rate, units, now) {
                Ok(s) => {
                    spent.push((limit, units));
                    let slot = if is_tokens {
                        &mut standing_tokens
                    } else {
                        &mut standing_requests
                    };
                    if slot.is_none_or(|o| s.remaining < o.remaining) {
                        *slot = Some(s);
                    }
                }
                Err(refused) => {
                    for (l, u) in spent {
                        l.bucket.settle(l.rate, -i64::try_from(u).unwrap_or(i64::MAX), now);
                    }
                    return Err(self.refusal(refused, is_tokens, tokens));
                }
            }
        }
        t.metrics.admitted.increment(1);
        for u in [&t.unreported, &self.unreported] {
            u.requests.fetch_add(1, Ordering::Relaxed);
            u.tokens
                .fetch_add(i64::try_from(tokens).unwrap_or(i64::MAX), Ordering::Relaxed);
        }
        Ok(Grant {
            key: self.clone(),
            reserved: tokens,
            headers: rate_headers(standing_requests, standing_tokens),
        })
    }

    fn refusal(&self, refused: Refused, tokens_budget: bool, tokens: u64) -> ProxyError {
        let what = if tokens_budget { "tokens" } else { "requests" };
        let m = &self.tenant.metrics;
        match refused {
            Refused::TooLarge { limit } => {
                m.too_large.increment(1);
                ProxyError::new(
                    ErrorKind::RateLimited,
                    format!(
                        "Request too large for tenant {}: it needs {tokens} tokens (prompt estimate + max_tokens), \
                         more than its {limit} tokens per minute.",
                        self.tenant.name
                    ),
                )
                .with_headers("x-lmstack-reason: request_too_large\r\n".to_owned())
            }
            Refused::Later { retry_after, standing } => {
                let counter = if tokens_budget {
                    &m.throttled_tokens
                } else {
                    &m.throttled_requests
                };
                counter.increment(1);
                let secs = retry_after.as_secs_f64().ceil().max(1.0) as u64;
                let (r, t) = if tokens_budget {
                    (None, Some(standing))
                } else {
                    (Some(standing), None)
                };
                let mut headers = format!(
                    "retry-after: {secs}\r\nretry-after-ms: {}\r\nx-lmstack-reason: rate_limit_{what}\r\n",
                    retry_after.as_millis()
                );
                headers.push_str(&rate_headers(r, t));
                ProxyError::new(
                    ErrorKind::RateLimited,
                    format!(
                        "Rate limit reached for tenant {} on {what}: limit {} per {}. Please try again in {}.",
                        self.tenant.name,
                        standing.limit,
                        openai_duration(standing.period),
                        openai_duration(retry_after)
                    ),
                )
                .with_headers(headers)
            }
        }
    }
}

impl Tenant {
    /// The fair-queuing tag of a request of `cost` tokens that starts waiting when the
    /// queue's clock reads `clock`: where the tenant's previous waiting request ends, or
    /// the clock if later; the tenant's next starts after this one.
    pub fn tag(&self, clock: u64, cost: u64) -> u64 {
        let mut start = clock;
        let _ = self.finish.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |f| {
            start = f.max(clock);
            Some(start.saturating_add(cost.max(1)))
        });
        start
    }
}

impl Grant {
    pub fn tenant(&self) -> &Tenant {
        &self.key.tenant
    }

    /// Tokens reserved at admission.
    pub fn reserved(&self) -> u64 {
        self.reserved
    }

    /// Settles the reservation: `used` tokens (prompt, completion) by the engine's usage;
    /// `None` when no usage came (the reservation stands); `Some((0, 0))` when the request
    /// never reached an engine.
    pub fn settle(self, used: Option<(u64, u64)>) {
        let t = &self.key.tenant;
        let Some((prompt, completion)) = used else {
            t.metrics.estimated_tokens.increment(self.reserved);
            return;
        };
        t.metrics.prompt_tokens.increment(prompt);
        t.metrics.completion_tokens.increment(completion);
        let used = i64::try_from(prompt.saturating_add(completion)).unwrap_or(i64::MAX);
        let delta = used.saturating_sub(i64::try_from(self.reserved).unwrap_or(i64::MAX));
        for u in [&t.unreported, &self.key.unreported] {
            u.tokens.fetch_add(delta, Ordering::Relaxed);
        }
        let now = now_ns();
        for l in [&self.key.tokens, &t.tokens].into_iter().flatten() {
            l.bucket.settle(l.rate, delta, now);
        }
    }
}

/// OpenAI's `x-ratelimit-*` header lines for the tightest requests and tokens budgets.
fn rate_headers(requests: Option<Standing>, tokens: Option<Standing>) -> String {
    let mut out = String::new();
    for (what, s) in [("requests", requests), ("tokens", tokens)] {
        if let Some(s) = s {
            let _ = write!(
                out,
                "x-ratelimit-limit-{what}: {}\r\nx-ratelimit-remaining-{what}: {}\r\nx-ratelimit-reset-{what}: {}\r\n",
                s.limit,
                s.remaining,
                openai_duration(s.reset)
            );
        }
    }
    out
}

/// The keys in force, swapped whole on reload.
pub type TenantsCell = Arc<ArcSwap<Tenants>>;

/// Reads the keys file; `None` when tenancy is off.
/// The keys in force, and the digest of the file they came from (for the reloader).
pub fn load(path: Option<&Path>) -> Result<Option<(TenantsCell, [u8; 32])>, String> {
    let Some(path) = path else { return Ok(None) };
    let (file, bytes) = KeysFile::read(path)?;
    let tenants = Tenants::build(&file, None);
    metrics::gauge!(TENANCY_KEYS).set(tenants.len() as f64);
    Ok(Some((
        Arc::new(ArcSwap::from_pointee(tenants)),
        Sha256::digest(&bytes).into(),
    )))
}

/// Re-reads the keys file every `interval` and swaps in a changed one; a file that does not
/// parse keeps the keys in force (logged and counted).
/// `seen`: the digest of the file the keys in force came from.
pub fn spawn_reloader(path: PathBuf, interval: Duration, cell: TenantsCell, mut seen: [u8; 32]) -> std::io::Result<()> {
    std::thread::Builder::new().name("lmstack-keys".into()).spawn(move || {
        loop {
            #[expect(clippy::disallowed_methods, reason = "the keys file thread, not a worker")]
            std::thread::sleep(interval);
            let Ok(bytes) = std::fs::read(&path) else {
                // A Secret being swapped, or gone: keep what is in force.
                continue;
            };
            let digest: [u8; 32] = Sha256::digest(&bytes).into();
            if digest == seen {
                continue;
            }
            seen = digest;
            match KeysFile::parse(&bytes) {
                Ok(file) => {
                    let new = Tenants::build(&file, Some(&cell.load()));
                    tracing::info!(keys = new.len(), tenants = new.tenants.len(), "API keys reloaded");
                    metrics::gauge!(TENANCY_KEYS).set(new.len() as f64);
                    counter!(TENANCY_RELOADS_TOTAL, "outcome" => "applied").increment(1);
                    cell.store(Arc::new(new));
                }
                Err(e) => {
                    tracing::warn!(path = %path.display(), "keys file rejected, the keys in force stay: {e}");
                    counter!(TENANCY_RELOADS_TOTAL, "outcome" => "rejected").increment(1);
                }
            }
        }
    })?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hash(key: &str) -> String {
        hex::encode(Sha256::digest(key.as_bytes()))
    }

    fn head(lines: &str) -> RequestHead {
        let raw = format!("POST /v1/completions HTTP/1.1\r\nhost: x\r\n{lines}\r\n");
        let limits = lmstack_http::head::HeadLimits {
            max_bytes: 8192,
            max_headers: 32,
        };
        let mut buf = bytes::BytesMut::from(raw.as_bytes());
        lmstack_http::head::parse_request(&mut buf, &mut Default::default(), &limits)
            .expect("head")
            .expect("whole")
    }

    fn file(extra: &str) -> KeysFile {
        let text = format!(
            "tenants:\n- name: a\n  models: [m1, 'llama-*']\n  requests_per_second: 2\n  tokens_per_minute: 1000\n  keys:\n  - sha256: {}\n    name: ci\n{extra}",
            hash("sk-a")
        );
        KeysFile::parse(text.as_bytes()).expect("keys file")
    }

    #[test]
    fn keys_are_found_by_their_hash_from_either_header() {
        let t = Tenants::build(&file(""), None);
        let key = t.authenticate(&head("authorization: Bearer sk-a\r\n")).expect("bearer");
        assert_eq!(&*key.tenant.name, "a");
        assert!(t.authenticate(&head("x-api-key: sk-a\r\n")).is_ok());
        let missing = t.authenticate(&head("")).expect_err("no key");
        assert_eq!(missing.kind, ErrorKind::Unauthorized);
        let wrong = t
            .authenticate(&head("authorization: Bearer sk-b\r\n"))
            .expect_err("wrong");
        assert_eq!(wrong.kind.status(), 401);
    }

    #[test]
    fn models_are_allowed_by_name_or_prefix() {
        let t = Tenants::build(&file(""), None);
        let key = t.authenticate(&head("x-api-key: sk-a\r\n")).expect("key");
        assert!(key.allow_model("m1").is_ok());
        assert!(key.allow_model("llama-3").is_ok());
        assert_eq!(key.allow_model("m2").map_err(|e| e.kind.status()), Err(403));
    }

    #[test]
    fn budgets_refuse_with_headers_and_are_kept_across_reloads() {
        let t = Tenants::build(&file(""), None);
        let key = t.authenticate(&head("x-api-key: sk-a\r\n")).expect("key");
        let g = key.admit(10).expect("first");
        assert!(
            g.headers.contains("x-ratelimit-remaining-requests: 1\r\n"),
            "{}",
            g.headers
        );
        assert!(
            g.headers.contains("x-ratelimit-remaining-tokens: 990\r\n"),
            "{}",
            g.headers
        );
        g.settle(Some((3, 2)));
        key.admit(10).expect("second").settle(None);
        // The table rebuilt from a changed file keeps the tenant's spent budget.
        let t2 = Tenants::build(&file(""), Some(&t));
        let key2 = t2.authenticate(&head("x-api-key: sk-a\r\n")).expect("key");
        let e = key2.admit(10).expect_err("third in a second");
        assert_eq!(e.kind.status(), 429);
        let headers = e.headers.as_deref().unwrap_or("");
        assert!(headers.contains("retry-after: 1\r\n"), "{headers}");
        assert!(headers.contains("x-ratelimit-limit-requests: 2\r\n"), "{headers}");
        let too_large = key2.admit(5000).expect_err("larger than the budget");
        assert!(too_large.message.contains("too large"), "{}", too_large.message);
    }

    #[test]
    fn what_one_replica_spends_another_charges() {
        let (a, b) = (Tenants::build(&file(""), None), Tenants::build(&file(""), None));
        let on = |t: &Tenants| t.authenticate(&head("x-api-key: sk-a\r\n")).expect("key");
        on(&a).admit(100).expect("spent on a").settle(Some((30, 20)));
        let spent = a.take_spent();
        assert_eq!(spent.len(), 1, "{spent:?}");
        assert_eq!((spent[0].requests, spent[0].tokens), (1, 50));
        assert!(a.take_spent().is_empty(), "reported once");
        for s in &spent {
            b.charge(s);
        }
        // b's tenant has one request of its two a second left, and 950 tokens of 1000.
        let g = on(&b).admit(10).expect("one left");
        assert!(
            g.headers.contains("x-ratelimit-remaining-requests: 0\r\n"),
            "{}",
            g.headers
        );
        // (The bucket refills at 1000 a minute meanwhile: a few tokens on a slow machine.)
        let remaining = g
            .headers
            .split("x-ratelimit-remaining-tokens: ")
            .nth(1)
            .and_then(|r| r.split('\r').next())
            .and_then(|r| r.parse::<u64>().ok());
        assert!(remaining.is_some_and(|r| (940..=950).contains(&r)), "{}", g.headers);
        assert_eq!(on(&b).admit(10).map_err(|e| e.kind.status()).err(), Some(429));
    }

    #[test]
    fn bad_files_say_why() {
        for (text, why) in [
            ("tenants: [{name: a, keys: [{sha256: zz}]}]", "hex"),
            ("tenants: [{name: a, keys: []}, {name: a, keys: []}]", "unique"),
            (
                "tenants: [{name: a, cache_isolation: true, keys: []}]",
                "cache_salt_secret",
            ),
            (
                "tenants: [{name: a, requests_per_second: 0, keys: []}]",
                "greater than 0",
            ),
            ("tenants: [{name: a, keys: [], extra: 1}]", "unknown field"),
        ] {
            let e = KeysFile::parse(text.as_bytes()).expect_err(text);
            assert!(e.contains(why), "{text}: {e}");
        }
    }

    #[test]
    fn isolated_tenants_get_a_salt_only_the_secret_makes() {
        let f = KeysFile::parse(
            b"cache_salt_secret: s3\ntenants: [{name: a, cache_isolation: true, keys: []}, {name: b, keys: []}]",
        )
        .expect("file");
        let t = Tenants::build(&f, None);
        let a = t.tenants["a"].cache_salt.clone().expect("salt");
        assert_eq!(a.len(), 32);
        assert_ne!(&*a, &*cache_salt("other", "a"));
        assert!(t.tenants["b"].cache_salt.is_none());
    }
}
