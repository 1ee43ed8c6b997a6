//! The router's own endpoints: `/health`, `/version`, `/metrics` and the merged
//! `/v1/models`. Each returns (status, content type, body); the pipeline writes it.

use std::sync::atomic::Ordering;

use bytes::Bytes;

use crate::config::DiscoveryMode;
use crate::ctx::WorkerCtx;
use crate::tenancy::Key;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Local {
    Health,
    Version,
    Metrics,
    Models,
}

const JSON: &str = "application/json";

/// `key`: the caller's API key, when keys are on (`/v1/models` lists what it may use).
pub fn serve(ctx: &WorkerCtx, local: Local, key: Option<&Key>) -> (u16, &'static str, Bytes) {
    match local {
        Local::Health => health(ctx),
        Local::Version => {
            let body = serde_json::json!({"name": "lmstack", "version": env!("CARGO_PKG_VERSION")});
            (200, JSON, Bytes::from(body.to_string()))
        }
        Local::Metrics => {
            // This worker's figures are current; others' lag by at most a flush interval.
            ctx.metrics.flush();
            (
                200,
                "text/plain; version=0.0.4; charset=utf-8",
                Bytes::from(ctx.shared.prometheus.render()),
            )
        }
        Local::Models => {
            let all = ctx.routing_state().models_body.clone();
            match key {
                Some(key) => (200, JSON, models_for(&all, key)),
                None => (200, JSON, all),
            }
        }
    }
}

/// The `/v1/models` list less the models `key` may not use.
fn models_for(all: &Bytes, key: &Key) -> Bytes {
    let Ok(mut list) = serde_json::from_slice::<serde_json::Value>(all) else {
        return all.clone();
    };
    if let Some(data) = list.get_mut("data").and_then(serde_json::Value::as_array_mut) {
        data.retain(|m| {
            m.get("id")
                .and_then(serde_json::Value::as_str)
                .is_some_and(|id| key.lists(id))
        });
    }
    Bytes::from(list.to_string())
}

/// 200 when at least one model has a healthy endpoint and the router is not shutting down;
/// 503 otherwise. The body tells, per model, how many endpoints are healthy, and in control
/// mode whether control's stream is up (the router keeps routing either way).
fn health(ctx: &WorkerCtx) -> (u16, &'static str, Bytes) {
    let state = ctx.routing_state();
    let models: Vec<serde_json::Value> = state
        .pools()
        .map(|pool| {
            serde_json::json!({
                "model": pool.name.as_ref(),
                "endpoints": pool.endpoints.len(),
                "healthy_endpoints": pool.healthy_count(&state),
                "policy": pool.policy.name().as_str(),
            })
        })
        .collect();
    let (status, text) = if ctx.draining() {
        (503, "draining")
    } else if state.can_route() {
        (200, "ok")
    } else {
        (503, "no_healthy_endpoint")
    };
    let mut body = serde_json::json!({
        "status": text,
        "snapshot_version": state.version,
        "models": models,
    });
    // In control mode, whether the routing view is live or the last one control sent.
    if ctx.shared.config.discovery.mode == DiscoveryMode::Control {
        let link = &ctx.shared.control;
        body["control"] = serde_json::json!({
            "url": ctx.shared.config.discovery.control.url,
            "connected": link.connected.load(Ordering::Relaxed),
            "last_message_unix_ms": link.last_message_ms.load(Ordering::Relaxed),
        });
    }
    (status, JSON, Bytes::from(body.to_string()))
}
