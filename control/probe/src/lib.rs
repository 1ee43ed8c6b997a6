//! Probing engines into routing snapshots: each target's address is resolved, its health
//! path probed, its `/v1/models` read when its models are not given (so LoRA adapters loaded
//! at run time show up) and its `/metrics` scraped for load. Consecutive failures take an
//! endpoint out of rotation, consecutive successes bring it back.
//!
//! Shared by the data plane's own discovery (static list, file) and lmstack-control (targets
//! from Kubernetes): one probe round ([`Prober::round`]), one health streak rule, one reading
//! of `--static-backends`/`--static-models` ([`static_targets`]). Blocking, meant for a thread
//! of its own: never on a request path. Not here: where targets come from, and where
//! snapshots go.

use std::net::{SocketAddr, ToSocketAddrs};
use std::thread;
use std::time::Duration;

use lmstack_snapshot::{Endpoint, EngineStats, Model, Snapshot};
use serde::{Deserialize, Serialize};

pub mod client;

const MAX_HEALTH_BODY: usize = 64 * 1024;
const MAX_MODELS_BODY: usize = 4 * 1024 * 1024;
const MAX_METRICS_BODY: usize = 8 * 1024 * 1024;

/// How engines are probed.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct HealthCheckConfig {
    /// Time between probes of each backend.
    pub interval_ms: u64,
    /// Time allowed for one probe.
    pub timeout_ms: u64,
    /// Consecutive failed probes that take a healthy endpoint out of rotation.
    pub unhealthy_after: u32,
    /// Consecutive good probes that bring it back.
    pub healthy_after: u32,
    /// Path probed with GET; 2xx is healthy.
    pub path: String,
}

impl Default for HealthCheckConfig {
    fn default() -> Self {
        Self {
            interval_ms: 5_000,
            timeout_ms: 2_000,
            unhealthy_after: 2,
            healthy_after: 1,
            path: "/health".into(),
        }
    }
}

/// Health-check settings that cannot work.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum HealthConfigError {
    #[error("health.{0} must be greater than 0")]
    Zero(&'static str),
    #[error("health.unhealthy_after and health.healthy_after must be at least 1")]
    NoStreak,
    #[error("health.path must start with '/'")]
    RelativePath,
}

impl HealthCheckConfig {
    /// Problems with these settings, for configuration errors at start.
    pub fn validate(&self) -> Result<(), HealthConfigError> {
        for (name, v) in [("interval_ms", self.interval_ms), ("timeout_ms", self.timeout_ms)] {
            if v == 0 {
                return Err(HealthConfigError::Zero(name));
            }
        }
        if self.unhealthy_after == 0 || self.healthy_after == 0 {
            return Err(HealthConfigError::NoStreak);
        }
        if !self.path.starts_with('/') {
            return Err(HealthConfigError::RelativePath);
        }
        Ok(())
    }
}

/// A backend URL that cannot be used.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum UrlError {
    #[error("only http:// backends are supported (engines speak plain HTTP inside the cluster)")]
    NotHttp,
    #[error("a backend URL cannot have a path")]
    Path,
    #[error("a backend URL cannot carry credentials")]
    Credentials,
    #[error("invalid port {0:?}")]
    Port(String),
    #[error("missing host")]
    MissingHost,
}

/// An engine's base URL, parsed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BackendUrl {
    /// Normalised `http://host:port`: the endpoint's identity and metric label.
    pub base: String,
    pub host: String,
    pub port: u16,
}

impl BackendUrl {
    pub fn parse(url: &str) -> Result<BackendUrl, UrlError> {
        let rest = url.strip_prefix("http://").ok_or(UrlError::NotHttp)?;
        let authority = rest.strip_suffix('/').unwrap_or(rest);
        if authority.contains('/') {
            return Err(UrlError::Path);
        }
        if authority.contains('@') {
            return Err(UrlError::Credentials);
        }
        let (host, port) = match authority.rsplit_once(':') {
            Some((h, p)) if !h.ends_with(']') || h.starts_with('[') => {
                let port: u16 = p.parse().map_err(|_| UrlError::Port(p.to_owned()))?;
                (h.to_owned(), port)
            }
            _ => (authority.to_owned(), 80),
        };
        if host.is_empty() {
            return Err(UrlError::MissingHost);
        }
        Ok(BackendUrl {
            base: format!("http://{host}:{port}"),
            host,
            port,
        })
    }

    /// The `Host` header value for requests to it.
    pub fn authority(&self) -> String {
        format!("{}:{}", self.host, self.port)
    }

    pub fn resolve(&self) -> std::io::Result<SocketAddr> {
        let host = self.host.trim_start_matches('[').trim_end_matches(']');
        (host, self.port)
            .to_socket_addrs()?
            .next()
            .ok_or_else(|| std::io::Error::other(format!("{} resolves to nothing", self.host)))
    }
}

/// Something to route to, as its source sees it.
#[derive(Clone, Debug, PartialEq)]
pub struct Target {
    pub url: BackendUrl,
    /// Models it serves; empty: ask its `/v1/models`.
    pub models: Vec<String>,
    /// Its source says it must take no new requests (a pod not ready, or terminating): it
    /// stays in snapshots, unhealthy, until the source drops it.
    pub drained: bool,
}

/// `--static-backends` and `--static-models` that do not fit together.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum StaticTargetsError {
    #[error("backend {url:?}: {source}")]
    Url { url: String, source: UrlError },
    #[error("backend {0} is listed twice")]
    Twice(String),
    #[error("--static-models lists {models} models for {backends} backends; give one per backend, in the same order")]
    ModelCount { models: usize, backends: usize },
}

/// The targets of `--static-backends` (comma-separated URLs) and `--static-models` (one model
/// per backend, in the same order; `None`: ask each backend's `/v1/models`). Blank entries
/// are skipped; every URL must parse and appear once. The one reading of these flags, for
/// the router and for lmstack-control.
pub fn static_targets(backends: &[String], models: Option<&[String]>) -> Result<Vec<Target>, StaticTargetsError> {
    let backends: Vec<&str> = backends.iter().map(|b| b.trim()).filter(|b| !b.is_empty()).collect();
    let models: Option<Vec<&str>> =
        models.map(|models| models.iter().map(|m| m.trim()).filter(|m| !m.is_empty()).collect());
    if let Some(models) = &models
        && models.len() != backends.len()
    {
        return Err(StaticTargetsError::ModelCount {
            models: models.len(),
            backends: backends.len(),
        });
    }
    let mut targets: Vec<Target> = Vec::with_capacity(backends.len());
    for (i, url) in backends.into_iter().enumerate() {
        let parsed = BackendUrl::parse(url).map_err(|source| StaticTargetsError::Url {
            url: url.to_owned(),
            source,
        })?;
        if targets.iter().any(|t| t.url == parsed) {
            return Err(StaticTargetsError::Twice(parsed.base));
        }
        targets.push(Target {
            url: parsed,
            models: models.as_ref().map(|m| vec![m[i].to_owned()]).unwrap_or_default(),
            drained: false,
        });
    }
    Ok(targets)
}

struct Backend {
    target: Target,
    addr: Option<SocketAddr>,
    healthy: bool,
    probed: bool,
    ok_streak: u32,
    fail_streak: u32,
    /// Models with the card `/v1/models` gave for each (configured models have none).
    models: Vec<(String, Option<serde_json::Value>)>,
    /// From its `/metrics`, when scraped.
    engine: Option<EngineStats>,
}

impl Backend {
    fn new(target: Target) -> Self {
        Self {
            addr: None,
            healthy: false,
            probed: false,
            ok_streak: 0,
            fail_streak: 0,
            models: target.models.iter().map(|m| (m.clone(), None)).collect(),
            engine: None,
            target,
        }
    }
}

/// Why one probe of an endpoint failed.
#[derive(Debug, thiserror::Error)]
pub enum ProbeError {
    #[error("cannot resolve {host}: {source}")]
    Resolve { host: String, source: std::io::Error },
    #[error("{path}: {source}")]
    Io { path: String, source: std::io::Error },
    #[error("{path} answered {status}")]
    Status { path: String, status: u16 },
    #[error("/v1/models: {0}")]
    Models(#[from] ModelsError),
    #[error("probe thread panicked")]
    Panicked,
}

/// A `/v1/models` body that lists no models.
#[derive(Debug, thiserror::Error)]
pub enum ModelsError {
    #[error("{0}")]
    Json(#[from] serde_json::Error),
    #[error("no `data` list")]
    NoData,
}

struct ProbeResult {
    /// Where the name resolved to (`None`: it did not, and `health` says why).
    addr: Option<SocketAddr>,
    health: Result<(), ProbeError>,
    models: Option<Result<Vec<(String, serde_json::Value)>, ProbeError>>,
    engine: Option<EngineStats>,
}

/// The probing state of a set of targets.
pub struct Prober {
    config: HealthCheckConfig,
    scrape_metrics: bool,
    /// The caller's counter of probes, by `endpoint` and `status` (`ok`, `fail`).
    checks_counter: &'static str,
    backends: Vec<Backend>,
    published: Option<Snapshot>,
}

impl Prober {
    /// `checks_counter`: the name (from the caller's metric names) under which every probe
    /// is counted, by `endpoint` and `status`.
    pub fn new(config: HealthCheckConfig, scrape_metrics: bool, checks_counter: &'static str) -> Self {
        Self {
            config,
            scrape_metrics,
            checks_counter,
            backends: Vec::new(),
            published: None,
        }
    }

    /// Replaces the set of targets. Targets seen before keep their state (health streaks,
    /// models, address); new ones are probed from scratch; gone ones are forgotten. Order
    /// follows `targets`.
    pub fn set_targets(&mut self, targets: Vec<Target>) {
        let mut old = std::mem::take(&mut self.backends);
        for target in targets {
            match old.iter().position(|b| b.target.url == target.url) {
                Some(i) => {
                    let mut b = old.swap_remove(i);
                    if b.target.models != target.models {
                        b.models = target.models.iter().map(|m| (m.clone(), None)).collect();
                    }
                    b.target = target;
                    self.backends.push(b);
                }
                None => self.backends.push(Backend::new(target)),
            }
        }
    }

    /// One probe round: probes every target once, all at the same time, counts each probe,
    /// applies the results to the health streaks, and returns the snapshot to publish when
    /// anything changed (hand it to [`published`](Self::published) once it went out).
    pub fn round(&mut self) -> Option<Snapshot> {
        self.probe_all();
        self.changed()
    }

    /// Probes every target once, all at the same time, and applies the results.
    fn probe_all(&mut self) {
        let (config, scrape) = (&self.config, self.scrape_metrics);
        let results: Vec<ProbeResult> = thread::scope(|s| {
            let handles: Vec<_> = self
                .backends
                .iter()
                .map(|b| s.spawn(move || probe(b, config, scrape)))
                .collect();
            handles
                .into_iter()
                .map(|h| {
                    h.join().unwrap_or(ProbeResult {
                        addr: None,
                        health: Err(ProbeError::Panicked),
                        models: None,
                        engine: None,
                    })
                })
                .collect()
        });
        for (b, r) in self.backends.iter_mut().zip(results) {
            let status = if r.health.is_ok() { "ok" } else { "fail" };
            metrics::counter!(self.checks_counter, "endpoint" => b.target.url.base.clone(), "status" => status)
                .increment(1);
            apply(b, r, &self.config);
        }
    }

    /// The next snapshot to publish, versioned one past the last one, when anything
    /// changed since; `published` tells whether the receiver took it.
    pub fn changed(&self) -> Option<Snapshot> {
        let mut snapshot = build(&self.backends);
        if let Some(p) = &self.published {
            snapshot.version = p.version;
            if *p == snapshot {
                return None;
            }
        }
        snapshot.version = self.published.as_ref().map_or(1, |p| p.version + 1);
        Some(snapshot)
    }

    /// Records that `snapshot` went out.
    pub fn published(&mut self, snapshot: Snapshot) {
        self.published = Some(snapshot);
    }

    /// Starts versions after `version` (a restarted publisher continuing a sequence).
    pub fn continue_from(&mut self, version: u64) {
        if self.published.is_none() {
            self.published = Some(Snapshot {
                version,
                ..Snapshot::default()
            });
        }
    }

    /// Waits for the next round.
    pub fn interval(&self) -> Duration {
        Duration::from_millis(self.config.interval_ms)
    }
}

fn probe(b: &Backend, health: &HealthCheckConfig, scrape: bool) -> ProbeResult {
    let timeout = Duration::from_millis(health.timeout_ms);
    let url = &b.target.url;
    let a = match url.resolve() {
        Ok(a) => a,
        Err(source) => {
            return ProbeResult {
                addr: None,
                health: Err(ProbeError::Resolve {
                    host: url.host.clone(),
                    source,
                }),
                models: None,
                engine: None,
            };
        }
    };
    let authority = url.authority();
    let get = |path: &str, max_body: usize| {
        client::get(a, &authority, path, timeout, max_body).map_err(|source| ProbeError::Io {
            path: path.to_owned(),
            source,
        })
    };
    let health_result = match get(&health.path, MAX_HEALTH_BODY) {
        Ok(r) if (200..300).contains(&r.status) => Ok(()),
        Ok(r) => Err(ProbeError::Status {
            path: health.path.clone(),
            status: r.status,
        }),
        Err(e) => Err(e),
    };
    let models = (b.target.models.is_empty() && health_result.is_ok()).then(|| {
        let r = get("/v1/models", MAX_MODELS_BODY)?;
        if r.status != 200 {
            return Err(ProbeError::Status {
                path: "/v1/models".into(),
                status: r.status,
            });
        }
        Ok(parse_models(&r.body)?)
    });
    // The engine's load and cache figures; a failed scrape just leaves them unknown.
    let engine = (scrape && health_result.is_ok())
        .then(|| get("/metrics", MAX_METRICS_BODY).ok())
        .flatten()
        .filter(|r| r.status == 200)
        .and_then(|r| lmstack_snapshot::vllm::engine_stats(&String::from_utf8_lossy(&r.body)));
    ProbeResult {
        addr: Some(a),
        health: health_result,
        models,
        engine,
    }
}

/// The model ids (and cards) of an OpenAI `/v1/models` response.
pub fn parse_models(body: &[u8]) -> Result<Vec<(String, serde_json::Value)>, ModelsError> {
    let v: serde_json::Value = serde_json::from_slice(body)?;
    let data = v.get("data").and_then(|d| d.as_array()).ok_or(ModelsError::NoData)?;
    Ok(data
        .iter()
        .filter_map(|card| {
            let id = card.get("id")?.as_str()?.to_owned();
            (!id.is_empty()).then(|| (id, card.clone()))
        })
        .collect())
}

fn apply(b: &mut Backend, r: ProbeResult, health: &HealthCheckConfig) {
    if let Some(addr) = r.addr {
        b.addr = Some(addr);
    }
    let url = &b.target.url.base;
    let was = b.healthy;
    match &r.health {
        Ok(()) => {
            b.ok_streak += 1;
            b.fail_streak = 0;
            if !b.probed || b.ok_streak >= health.healthy_after {
                b.healthy = true;
            }
        }
        Err(e) => {
            b.fail_streak += 1;
            b.ok_streak = 0;
            if !b.probed || b.fail_streak >= health.unhealthy_after {
                b.healthy = false;
            }
            tracing::debug!(endpoint = %url, "probe failed: {e}");
        }
    }
    if b.probed && was != b.healthy {
        match &r.health {
            Ok(()) => tracing::info!(endpoint = %url, "endpoint healthy again"),
            Err(e) => tracing::warn!(endpoint = %url, "endpoint unhealthy: {e}"),
        }
    } else if !b.probed
        && let Err(e) = &r.health
    {
        tracing::warn!(endpoint = %url, "endpoint not healthy at first probe: {e}");
    }
    b.probed = true;
    b.engine = if b.healthy { r.engine } else { None };
    match r.models {
        Some(Ok(models)) => b.models = models.into_iter().map(|(id, card)| (id, Some(card))).collect(),
        Some(Err(e)) => tracing::warn!(endpoint = %url, "cannot list models: {e}"),
        None => {}
    }
}

fn build(backends: &[Backend]) -> Snapshot {
    let mut endpoints = Vec::new();
    let mut models: Vec<Model> = Vec::new();
    for b in backends {
        let Some(addr) = b.addr else { continue };
        let index = endpoints.len() as u32;
        endpoints.push(Endpoint {
            url: b.target.url.base.clone(),
            addr,
            healthy: b.healthy && !b.target.drained,
            engine: b.engine,
        });
        for (name, card) in &b.models {
            match models.iter_mut().find(|m| &m.name == name) {
                Some(m) => m.endpoints.push(index),
                None => models.push(Model {
                    name: name.clone(),
                    endpoints: vec![index],
                    card: card.clone(),
                }),
            }
        }
    }
    models.sort_by(|a, b| a.name.cmp(&b.name));
    Snapshot {
        version: 0,
        endpoints,
        models,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_vllm_model_lists() {
        let body = br#"{"object":"list","data":[{"id":"tiny","object":"model","root":"tiny","parent":null},{"id":"tiny-lora","parent":"tiny"},{"id":""}]}"#;
        let models = parse_models(body).unwrap();
        assert_eq!(models.len(), 2);
        assert_eq!(models[1].0, "tiny-lora");
        assert_eq!(models[1].1["parent"], "tiny");
        assert!(parse_models(b"{}").is_err());
    }

    fn target(url: &str, models: &[&str]) -> Target {
        Target {
            url: BackendUrl::parse(url).unwrap(),
            models: models.iter().map(|m| (*m).to_owned()).collect(),
            drained: false,
        }
    }

    fn backend(url: &str, port: u16, models: &[&str]) -> Backend {
        let mut b = Backend::new(target(url, models));
        b.addr = Some(SocketAddr::from(([127, 0, 0, 1], port)));
        b.healthy = true;
        b.probed = true;
        b.ok_streak = 1;
        b
    }

    #[test]
    fn snapshots_group_endpoints_by_model() {
        let s = build(&[backend("http://a:1", 1, &["m", "n"]), backend("http://b:2", 2, &["m"])]);
        s.validate().unwrap();
        assert_eq!(s.model("m").unwrap().endpoints, vec![0, 1]);
        assert_eq!(s.model("n").unwrap().endpoints, vec![0]);
    }

    #[test]
    fn drained_targets_stay_listed_but_unhealthy() {
        let mut b = backend("http://a:1", 1, &["m"]);
        b.target.drained = true;
        let s = build(&[b]);
        assert_eq!(s.endpoints.len(), 1);
        assert!(!s.endpoints[0].healthy);
    }

    #[test]
    fn health_needs_consecutive_results() {
        let config = HealthCheckConfig {
            unhealthy_after: 2,
            healthy_after: 2,
            ..Default::default()
        };
        let mut b = backend("http://a:1", 1, &["m"]);
        let result = |ok: bool| ProbeResult {
            addr: Some(SocketAddr::from(([127, 0, 0, 1], 1))),
            health: if ok {
                Ok(())
            } else {
                Err(ProbeError::Status {
                    path: "/health".into(),
                    status: 503,
                })
            },
            models: None,
            engine: None,
        };
        apply(&mut b, result(false), &config);
        assert!(b.healthy, "one failure is not enough");
        apply(&mut b, result(false), &config);
        assert!(!b.healthy);
        apply(&mut b, result(true), &config);
        assert!(!b.healthy, "one success is not enough");
        apply(&mut b, result(true), &config);
        assert!(b.healthy);
    }

    #[test]
    fn new_targets_keep_the_state_of_known_ones() {
        let mut p = Prober::new(HealthCheckConfig::default(), false, "checks");
        p.backends.push(backend("http://a:1", 1, &["m"]));
        p.set_targets(vec![target("http://b:2", &["m"]), target("http://a:1", &["m"])]);
        assert_eq!(p.backends[0].target.url.base, "http://b:2");
        assert!(!p.backends[0].probed);
        assert!(p.backends[1].healthy && p.backends[1].probed);
    }

    #[test]
    fn versions_move_only_on_change() {
        let mut p = Prober::new(HealthCheckConfig::default(), false, "checks");
        p.backends.push(backend("http://a:1", 1, &["m"]));
        let first = p.changed().unwrap();
        assert_eq!(first.version, 1);
        p.published(first);
        assert!(p.changed().is_none());
        p.backends[0].healthy = false;
        assert_eq!(p.changed().unwrap().version, 2);
    }

    fn strings(items: &[&str]) -> Vec<String> {
        items.iter().map(|s| (*s).to_owned()).collect()
    }

    #[test]
    fn static_flags_give_targets_with_one_model_each() {
        let t = static_targets(
            &strings(&["http://a:1", " http://b:2/ ", ""]),
            Some(&strings(&["m", " n"])),
        )
        .unwrap();
        assert_eq!(t.len(), 2);
        assert_eq!(t[1].url.base, "http://b:2");
        assert_eq!(t[1].models, vec!["n".to_owned()]);
        let t = static_targets(&strings(&["http://a:1"]), None).unwrap();
        assert!(t[0].models.is_empty(), "no models: ask /v1/models");
    }

    #[test]
    fn static_flags_that_do_not_fit_are_errors() {
        let e = static_targets(&strings(&["http://a:1", "http://b:2"]), Some(&strings(&["m"]))).unwrap_err();
        assert_eq!(e, StaticTargetsError::ModelCount { models: 1, backends: 2 });
        assert!(e.to_string().contains("one per backend"));
        let e = static_targets(&strings(&["http://a:1", "http://a:1/"]), None).unwrap_err();
        assert!(e.to_string().contains("twice"));
        let e = static_targets(&strings(&["https://a:1"]), None).unwrap_err();
        assert!(matches!(
            e,
            StaticTargetsError::Url {
                source: UrlError::NotHttp,
                ..
            }
        ));
        assert!(std::error::Error::source(&e).is_some());
    }

    #[test]
    fn bad_health_settings_are_typed_errors() {
        let c = HealthCheckConfig {
            interval_ms: 0,
            ..Default::default()
        };
        assert_eq!(c.validate(), Err(HealthConfigError::Zero("interval_ms")));
        assert!(c.validate().unwrap_err().to_string().contains("interval_ms"));
    }
}
