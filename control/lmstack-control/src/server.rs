//! The HTTP side: `GET /v1/snapshots/watch` (the stream data planes follow: newline-
//! delimited JSON, a full snapshot, then deltas or full snapshots as they are published,
//! other replicas' prefix assignments, and a heartbeat when nothing changed for a while),
//! `POST /v1/affinity` (a replica's assignments), `GET /v1/snapshots` (the current one),
//! `/health` and `/metrics`. hyper on tokio: a handful of long-lived connections, not a
//! request path.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full, Limited, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper::server::conn::http1;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use lmstack_snapshot::{AffinityBatch, StreamMessage};
use metrics_exporter_prometheus::PrometheusHandle;
use tokio::net::TcpListener;
use tokio::sync::{broadcast, mpsc};

use crate::hub::Hub;
use crate::kv::KvRelay;
use crate::metrics;

type Body = BoxBody<Bytes, Infallible>;

const JSON: &str = "application/json";

/// Largest affinity report accepted.
const MAX_REPORT_BYTES: usize = 64 * 1024 * 1024;

struct Ctx {
    hub: Arc<Hub>,
    relay: Arc<KvRelay>,
    prometheus: PrometheusHandle,
    heartbeat: Duration,
}

pub async fn serve(
    listener: TcpListener,
    hub: Arc<Hub>,
    relay: Arc<KvRelay>,
    prometheus: PrometheusHandle,
    heartbeat: Duration,
) -> anyhow::Result<()> {
    let ctx = Arc::new(Ctx {
        hub,
        relay,
        prometheus,
        heartbeat,
    });
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

fn full(status: StatusCode, content_type: &'static str, body: impl Into<Bytes>) -> Response<Body> {
    let mut r = Response::new(Full::new(body.into()).boxed());
    *r.status_mut() = status;
    r.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_static(content_type),
    );
    r
}

fn error(status: StatusCode, message: &str) -> Response<Body> {
    let body = serde_json::json!({"error": {"message": message, "type": "invalid_request_error", "param": null, "code": status.as_u16()}});
    full(status, JSON, body.to_string())
}

async fn handle(ctx: Arc<Ctx>, req: Request<Incoming>) -> Result<Response<Body>, Infallible> {
    if req.method() == Method::POST && req.uri().path() == "/v1/affinity" {
        return Ok(report(&ctx, req).await);
    }
    let get = req.method() == Method::GET;
    Ok(match (get, req.uri().path()) {
        (true, "/v1/snapshots/watch") => watch(&ctx),
        (true, "/v1/snapshots") => {
            let current = ctx.hub.current();
            full(
                StatusCode::OK,
                JSON,
                serde_json::to_vec(&current.snapshot).unwrap_or_default(),
            )
        }
        (true, "/health") => {
            let current = ctx.hub.current();
            let s = &current.snapshot;
            let body = serde_json::json!({
                "status": "ok",
                "snapshot_version": s.version,
                "endpoints": s.endpoints.len(),
                "healthy_endpoints": s.endpoints.iter().filter(|e| e.healthy).count(),
                "models": s.models.iter().map(|m| m.name.as_str()).collect::<Vec<_>>(),
                "subscribers": ctx.hub.subscribers(),
            });
            full(StatusCode::OK, JSON, body.to_string())
        }
        (true, "/metrics") => full(
            StatusCode::OK,
            "text/plain; version=0.0.4; charset=utf-8",
            ctx.prometheus.render(),
        ),
        (_, "/v1/affinity") => error(StatusCode::METHOD_NOT_ALLOWED, "use POST"),
        (false, "/v1/snapshots/watch" | "/v1/snapshots" | "/health" | "/metrics") => {
            error(StatusCode::METHOD_NOT_ALLOWED, "use GET")
        }
        (_, path) => error(StatusCode::NOT_FOUND, &format!("no route for {path}")),
    })
}

async fn report(ctx: &Ctx, req: Request<Incoming>) -> Response<Body> {
    let body = match Limited::new(req.into_body(), MAX_REPORT_BYTES).collect().await {
        Ok(b) => b.to_bytes(),
        Err(e) => return error(StatusCode::PAYLOAD_TOO_LARGE, &format!("cannot read the report: {e}")),
    };
    match serde_json::from_slice::<AffinityBatch>(&body) {
        Ok(batch) => {
            ::metrics::counter!(metrics::AFFINITY_BLOCKS_TOTAL, "status" => "received")
                .increment(batch.blocks() as u64);
            ctx.hub.share(batch);
            full(StatusCode::NO_CONTENT, JSON, Bytes::new())
        }
        Err(e) => error(StatusCode::BAD_REQUEST, &format!("not an affinity batch: {e}")),
    }
}

fn line(message: &StreamMessage) -> Bytes {
    let mut out = serde_json::to_vec(message).unwrap_or_default();
    out.push(b'\n');
    Bytes::from(out)
}

fn count(message: &StreamMessage) {
    let kind = match message {
        StreamMessage::Full { .. } => "full",
        StreamMessage::Delta { .. } => "delta",
        StreamMessage::Heartbeat { .. } => "heartbeat",
        StreamMessage::Affinity { .. } => "affinity",
        StreamMessage::Kv { .. } => "kv",
    };
    ::metrics::counter!(metrics::STREAM_MESSAGES_TOTAL, "type" => kind).increment(1);
}

/// One data plane's stream. It ends when the data plane goes away (the body channel
/// closes) or the hub does.
fn watch(ctx: &Ctx) -> Response<Body> {
    let mut rx = ctx.hub.subscribe();
    let mut affinity = ctx.hub.subscribe_affinity();
    let mut kv = ctx.relay.subscribe();
    let relay = ctx.relay.clone();
    let hub = ctx.hub.clone();
    let heartbeat = ctx.heartbeat;
    // A small queue: a data plane that stops reading holds at most this much, then the
    // writer waits (and its heartbeat with it).
    let (tx, body_rx) = mpsc::channel::<Bytes>(4);
    tokio::spawn(async move {
        ::metrics::gauge!(metrics::SUBSCRIBERS).increment(1.0);
        let mut seen = 0u64;
        let mut ticker = tokio::time::interval(heartbeat);
        ticker.reset();
        loop {
            let current = rx.borrow_and_update().clone();
            if current.snapshot.version != seen && current.snapshot.version != 0 {
                let message = current.message_for(seen);
                count(&message);
                if tx.send(line(&message)).await.is_err() {
                    break;
                }
                let first = seen == 0;
                seen = current.snapshot.version;
                ticker.reset();
                // A new stream learns what other replicas assigned lately, and what every
                // engine holds.
                if first {
                    let kv = relay.dump().into_iter().map(|delta| StreamMessage::Kv { delta });
                    for message in hub
                        .recent_affinity()
                        .into_iter()
                        .map(|batch| StreamMessage::Affinity { batch })
                        .chain(kv)
                    {
                        count(&message);
                        if tx.send(line(&message)).await.is_err() {
                            return;
                        }
                    }
                }
            }
            tokio::select! {
                changed = rx.changed() => if changed.is_err() { break },
                batch = affinity.recv() => match batch {
                    Ok(batch) if seen != 0 => {
                        let message = StreamMessage::Affinity { batch: (*batch).clone() };
                        count(&message);
                        if tx.send(line(&message)).await.is_err() {
                            break;
                        }
                    }
                    Ok(_) => {}
                    Err(broadcast::error::RecvError::Lagged(n)) => {
                        ::metrics::counter!(metrics::AFFINITY_BATCHES_LAGGED_TOTAL).increment(n);
                    }
                    Err(broadcast::error::RecvError::Closed) => break,
                },
                delta = kv.recv() => {
                    let messages = match delta {
                        Ok(delta) if seen != 0 => vec![StreamMessage::Kv { delta: (*delta).clone() }],
                        Ok(_) => Vec::new(),
                        // Deltas were lost for this stream: full copies again.
                        Err(broadcast::error::RecvError::Lagged(n)) => {
                            ::metrics::counter!(metrics::KV_DELTAS_LAGGED_TOTAL).increment(n);
                            relay.dump().into_iter().map(|delta| StreamMessage::Kv { delta }).collect()
                        }
                        Err(broadcast::error::RecvError::Closed) => break,
                    };
                    for message in messages {
                        count(&message);
                        if tx.send(line(&message)).await.is_err() {
                            break;
                        }
                    }
                }
                _ = ticker.tick() => {
                    let message = StreamMessage::Heartbeat { version: seen };
                    count(&message);
                    if tx.send(line(&message)).await.is_err() {
                        break;
                    }
                }
                _ = tx.closed() => break,
            }
        }
        ::metrics::gauge!(metrics::SUBSCRIBERS).decrement(1.0);
    });
    let stream = futures_util::stream::unfold(body_rx, |mut rx| async move {
        rx.recv().await.map(|b| (Ok::<_, Infallible>(Frame::data(b)), rx))
    });
    let mut r = Response::new(StreamBody::new(stream).boxed());
    r.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_static("application/x-ndjson"),
    );
    r
}
