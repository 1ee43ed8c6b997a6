//! Static discovery: a fixed list of backends that the router probes itself, turned into
//! routing snapshots.
//!
//! Every `interval` each backend's address is resolved, its health path probed and, when
//! its models are not configured, its `/v1/models` read (so LoRA adapters loaded at run
//! time show up). Consecutive failures take an endpoint out of rotation, consecutive
//! successes bring it back. A snapshot is published only when something changed. This runs
//! on its own thread, off the workers. Not here: Kubernetes (lmstack-control's job).

use std::net::SocketAddr;
use std::sync::Arc;
use std::thread;
use std::time::Duration;

use lmstack_snapshot::{Endpoint, EngineStats, Model, Snapshot};

use crate::config::{BackendUrl, HealthCheckConfig, ms};
use crate::metrics;
use crate::probe;
use crate::worker::Shared;

const MAX_MODELS_BODY: usize = 4 * 1024 * 1024;
const MAX_METRICS_BODY: usize = 8 * 1024 * 1024;

struct Backend {
    url: BackendUrl,
    configured_models: Vec<String>,
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

struct ProbeResult {
    addr: Result<SocketAddr, String>,
    health: Result<(), String>,
    models: Option<Result<Vec<(String, serde_json::Value)>, String>>,
    engine: Option<EngineStats>,
}

pub fn spawn(shared: Arc<Shared>) -> std::io::Result<thread::JoinHandle<()>> {
    thread::Builder::new()
        .name("lmstack-discovery".into())
        .spawn(move || run(&shared))
}

fn run(shared: &Shared) {
    let config = &shared.config.discovery;
    let mut backends: Vec<Backend> = config
        .backends
        .iter()
        .filter_map(|b| BackendUrl::parse(&b.url).ok().map(|url| (url, b)))
        .map(|(url, b)| Backend {
            url,
            configured_models: b.models.clone(),
            addr: None,
            healthy: false,
            probed: false,
            ok_streak: 0,
            fail_streak: 0,
            models: b.models.iter().map(|m| (m.clone(), None)).collect(),
            engine: None,
        })
        .collect();
    let mut published: Option<Snapshot> = None;
    loop {
        let results: Vec<ProbeResult> = thread::scope(|s| {
            let handles: Vec<_> = backends
                .iter()
                .map(|b| s.spawn(|| probe_backend(b, &config.health, config.scrape_metrics)))
                .collect();
            handles
                .into_iter()
                .map(|h| {
                    h.join().unwrap_or_else(|_| ProbeResult {
                        addr: Err("probe thread panicked".into()),
                        health: Err("probe thread panicked".into()),
                        models: None,
                        engine: None,
                    })
                })
                .collect()
        });
        for (backend, result) in backends.iter_mut().zip(results) {
            apply(backend, result, &config.health);
        }
        let mut snapshot = build(&backends);
        let changed = published.as_ref().is_none_or(|p| {
            let mut p = p.clone();
            p.version = 0;
            p != snapshot
        });
        if changed {
            snapshot.version = published.as_ref().map_or(1, |p| p.version + 1);
            match shared.cell.publish(&snapshot) {
                Ok(()) => {
                    tracing::info!(
                        version = snapshot.version,
                        models = snapshot.models.len(),
                        healthy = snapshot.endpoints.iter().filter(|e| e.healthy).count(),
                        endpoints = snapshot.endpoints.len(),
                        "routing snapshot published"
                    );
                    published = Some(snapshot);
                }
                Err(e) => tracing::error!("discovery built an invalid snapshot: {e}"),
            }
        }
        thread::sleep(ms(config.health.interval_ms));
    }
}

fn probe_backend(b: &Backend, health: &HealthCheckConfig, scrape: bool) -> ProbeResult {
    let timeout = Duration::from_millis(health.timeout_ms);
    let addr = b
        .url
        .resolve()
        .map_err(|e| format!("cannot resolve {}: {e}", b.url.host));
    let Ok(a) = addr else {
        let e = addr.as_ref().err().cloned().unwrap_or_default();
        return ProbeResult {
            addr,
            health: Err(e),
            models: None,
            engine: None,
        };
    };
    let authority = b.url.authority();
    let status = probe::get(a, &authority, &health.path, timeout, 64 * 1024);
    let health_result = match status {
        Ok(r) if (200..300).contains(&r.status) => Ok(()),
        Ok(r) => Err(format!("{} answered {}", health.path, r.status)),
        Err(e) => Err(format!("{}: {e}", health.path)),
    };
    let models = (b.configured_models.is_empty() && health_result.is_ok()).then(|| {
        let r = probe::get(a, &authority, "/v1/models", timeout, MAX_MODELS_BODY)
            .map_err(|e| format!("/v1/models: {e}"))?;
        if r.status != 200 {
            return Err(format!("/v1/models answered {}", r.status));
        }
        parse_models(&r.body)
    });
    // The engine's load and cache figures; a failed scrape just leaves them unknown.
    let engine = (scrape && health_result.is_ok())
        .then(|| probe::get(a, &authority, "/metrics", timeout, MAX_METRICS_BODY).ok())
        .flatten()
        .filter(|r| r.status == 200)
        .and_then(|r| lmstack_snapshot::vllm::engine_stats(&String::from_utf8_lossy(&r.body)));
    ProbeResult {
        addr,
        health: health_result,
        models,
        engine,
    }
}

/// The model ids (and cards) of an OpenAI `/v1/models` response.
fn parse_models(body: &[u8]) -> Result<Vec<(String, serde_json::Value)>, String> {
    let v: serde_json::Value = serde_json::from_slice(body).map_err(|e| format!("/v1/models: {e}"))?;
    let data = v
        .get("data")
        .and_then(|d| d.as_array())
        .ok_or("/v1/models: no `data` list")?;
    Ok(data
        .iter()
        .filter_map(|card| {
            let id = card.get("id")?.as_str()?.to_owned();
            (!id.is_empty()).then(|| (id, card.clone()))
        })
        .collect())
}

fn apply(b: &mut Backend, r: ProbeResult, health: &HealthCheckConfig) {
    if let Ok(addr) = r.addr {
        b.addr = Some(addr);
    }
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
            tracing::debug!(endpoint = %b.url.base, "probe failed: {e}");
        }
    }
    ::metrics::counter!(
        metrics::HEALTH_CHECKS_TOTAL,
        "endpoint" => b.url.base.clone(),
        "status" => if r.health.is_ok() { "ok" } else { "fail" }
    )
    .increment(1);
    if b.probed && was != b.healthy {
        match &r.health {
            Ok(()) => tracing::info!(endpoint = %b.url.base, "endpoint healthy again"),
            Err(e) => tracing::warn!(endpoint = %b.url.base, "endpoint unhealthy: {e}"),
        }
    } else if !b.probed && !b.healthy {
        tracing::warn!(endpoint = %b.url.base, "endpoint not healthy at start: {}", r.health.as_ref().err().map_or("", |e| e));
    }
    b.probed = true;
    b.engine = if b.healthy { r.engine } else { None };
    match r.models {
        Some(Ok(models)) => b.models = models.into_iter().map(|(id, card)| (id, Some(card))).collect(),
        Some(Err(e)) => tracing::warn!(endpoint = %b.url.base, "cannot list models: {e}"),
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
            url: b.url.base.clone(),
            addr,
            healthy: b.healthy,
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

    fn backend(url: &str, port: u16, models: &[&str]) -> Backend {
        Backend {
            url: BackendUrl::parse(url).unwrap(),
            configured_models: vec![],
            addr: Some(SocketAddr::from(([127, 0, 0, 1], port))),
            healthy: true,
            probed: true,
            ok_streak: 1,
            fail_streak: 0,
            models: models.iter().map(|m| ((*m).to_owned(), None)).collect(),
            engine: None,
        }
    }

    #[test]
    fn snapshots_group_endpoints_by_model() {
        let s = build(&[backend("http://a:1", 1, &["m", "n"]), backend("http://b:2", 2, &["m"])]);
        s.validate().unwrap();
        assert_eq!(s.model("m").unwrap().endpoints, vec![0, 1]);
        assert_eq!(s.model("n").unwrap().endpoints, vec![0]);
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
            addr: Ok(SocketAddr::from(([127, 0, 0, 1], 1))),
            health: if ok { Ok(()) } else { Err("down".into()) },
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
}
