//! `/metrics` (Prometheus text) and `/health` (what is attached) on hyper: a scrape endpoint,
//! not a request path.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use metrics_exporter_prometheus::PrometheusHandle;
use tokio::net::TcpListener;

use crate::Shared;

pub async fn serve(listener: TcpListener, prometheus: PrometheusHandle, shared: Shared) -> anyhow::Result<()> {
    let ctx = Arc::new((prometheus, shared));
    loop {
        let (stream, _) = match listener.accept().await {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!("accept: {e}");
                tokio::time::sleep(Duration::from_millis(20)).await;
                continue;
            }
        };
        let ctx = ctx.clone();
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |req| handle(ctx.clone(), req));
            if let Err(e) = http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service)
                .await
            {
                tracing::debug!("connection: {e}");
            }
        });
    }
}

async fn handle(
    ctx: Arc<(PrometheusHandle, Shared)>,
    req: Request<Incoming>,
) -> Result<Response<Full<Bytes>>, Infallible> {
    let (prometheus, shared) = &*ctx;
    let (status, content_type, body) = match req.uri().path() {
        "/metrics" => (StatusCode::OK, "text/plain; version=0.0.4", prometheus.render()),
        "/health" => {
            let state = shared.lock().unwrap_or_else(|p| p.into_inner());
            let body = format!(
                r#"{{"status":"ok","attached_cgroups":{},"sees_closes":{}}}"#,
                state.registry.targets(),
                state.probes.sees_closes
            );
            (StatusCode::OK, "application/json", body)
        }
        _ => (
            StatusCode::NOT_FOUND,
            "application/json",
            r#"{"error":{"message":"not found: try /metrics or /health","type":"not_found"}}"#.to_owned(),
        ),
    };
    let mut r = Response::new(Full::new(Bytes::from(body)));
    *r.status_mut() = status;
    r.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_static(content_type),
    );
    Ok(r)
}
