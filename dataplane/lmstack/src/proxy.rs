//! The life of one request, top to bottom.
//!
//! 1. Read the body within its limits (every route, so the connection stays in sync).
//! 2. Local routes (`/health`, `/metrics`, `/v1/models`, ...) are answered here.
//! 3. Model routes: peek at the JSON body for `model`, `stream` and the session key.
//! 4. Find the model's pool in the worker's current routing state; a policy picks an
//!    endpoint (waiting in the router's queue if every endpoint is at its in-flight limit).
//!    A request naming a stored response (`previous_response_id`, and the model-less
//!    `GET /v1/responses/{id}` and `POST /v1/responses/{id}/cancel`) goes only to the
//!    endpoint holding it (`stored::locate`: the map, else asking the pool).
//! 5. Send the request on a pooled (or new) engine connection; a failure before any
//!    response byte is retried on another endpoint, within the retry budget. Each attempt's
//!    outcome feeds the endpoint's passive health (ejection after failures in a row).
//! 6. Relay the response as it arrives, timing SSE events; meanwhile watch the client, and
//!    drop the engine connection (cancelling the request there) if it leaves. A completions
//!    or chat stream its engine cuts goes on on another endpoint (a continuation), or ends
//!    with an error event (`end_stream`).
//! 7. Return the engine connection to the pool, record metrics (and the id of a stored
//!    response answered, in the map of stored responses), keep or close the client
//!    connection.
//!
//! Errors are turned into responses by `response::error`, called only from `fail` below
//! (the worker calls `fail` too, for a request head it could not accept); once a stream's
//! head went out, into error events by `end_stream` only.

use std::net::IpAddr;
use std::rc::Rc;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use bytes::Bytes;
use lmstack_http::anthropic::{self, StreamUsage};
use lmstack_http::head::RequestHead;
use lmstack_http::stored::StoredRoute;
use lmstack_http::stream::{Api, BodyTail, Ledger, Usage};
use lmstack_http::{Framing, Version};
use lmstack_route::blocks::BlockHasher;
use lmstack_route::{Pick, PrefixInfo, RouteRequest};
use lmstack_snapshot::AffinityEntry;
use std::time::{Duration, Instant};

use crate::admin::{self, Local};
use crate::config::SessionConfig;
use crate::ctx::{Scratch, WorkerCtx};
use crate::downstream::{Downstream, WriteHalf};
use crate::error::{Dialect, ErrorKind, ProxyError, Retry, Side};
use crate::metrics::{ModelMetrics, PairMetrics};
use crate::otel::{self, RequestTrace};
use crate::queue::{Rank, Ticket};
use crate::relay::{self, EventFraming, EventRelay, FirstByte, OutFraming, RelayError, StreamClock};
use crate::response::{self, BodyOut, REQUEST_ID};
use crate::state::{EndpointState, ModelPool, PoolSnapshot, RoutingState};
use crate::tenancy::{Grant, Key, Priority, Tenant};
use crate::{stored, upstream};

/// What to do with the client connection after a request.
#[derive(Debug, PartialEq, Eq)]
pub enum After {
    KeepAlive,
    Close,
    /// An error response was sent and the connection must close (gracefully).
    CloseAfterError,
}

/// Status recorded for requests whose client left before the response ended (nginx's).
const CLIENT_CLOSED: u16 = 499;

/// Where a request goes, by method and path.
enum Target<'p> {
    Local(Local),
    Model,
    /// A stored response, named in the path.
    Stored(StoredRoute<'p>),
    Missing(ErrorKind),
}

fn target<'p>(method: &str, path: &'p str) -> Target<'p> {
    const MODEL_ROUTES: [&str; 17] = [
        "/v1/completions",
        "/v1/chat/completions",
        "/v1/embeddings",
        "/v1/rerank",
        "/v2/rerank",
        "/rerank",
        "/v1/score",
        "/score",
        "/tokenize",
        "/detokenize",
        "/v1/responses",
        "/pooling",
        anthropic::MESSAGES,
        anthropic::COUNT_TOKENS,
        // SageMaker's route: vLLM serves any of the above by the body's shape.
        "/invocations",
        // Multipart forms, routed by their `model` field.
        "/v1/audio/transcriptions",
        "/v1/audio/translations",
    ];
    let local = match path {
        "/health" => Some(Local::Health),
        "/version" => Some(Local::Version),
        "/metrics" => Some(Local::Metrics),
        "/v1/models" => Some(Local::Models),
        _ => None,
    };
    if let Some((route, method_ok)) = lmstack_http::stored::stored_route(method, path) {
        return if method_ok {
            Target::Stored(route)
        } else {
            Target::Missing(ErrorKind::MethodNotAllowed)
        };
    }
    match (local, method) {
        (Some(l), "GET") => Target::Local(l),
        (Some(_), _) => Target::Missing(ErrorKind::MethodNotAllowed),
        (None, "POST") if MODEL_ROUTES.contains(&path) => Target::Model,
        (None, _) if MODEL_ROUTES.contains(&path) => Target::Missing(ErrorKind::MethodNotAllowed),
        (None, _) => Target::Missing(ErrorKind::NotFound),
    }
}

/// A request on its way to an engine.
struct Forward<'a> {
    head: &'a RequestHead,
    /// The body as the client sent it (with its tenant's cache salt and usage request).
    body: &'a Bytes,
    /// The body sent to the first engine (with token ids asked for, for a stream that may
    /// be resumed).
    send_body: Bytes,
    stream: bool,
    /// A completions or chat stream, which a ledger follows so that it can be resumed.
    api: Option<Api>,
    /// The client asked for token ids itself.
    keep_ids: bool,
    /// The router asked for the stream's usage, the client did not.
    hide_usage: bool,
    /// The client asked for the stream's usage (`stream_options.include_usage`).
    client_usage: bool,
    /// OpenAI's API, or Anthropic's (the Messages routes): the shape of error events.
    dialect: Dialect,
    /// The client's API key is the router's: not sent to engines; its usage is metered.
    metered: bool,
    /// `x-ratelimit-*` header lines for the response.
    rate_headers: &'a str,
    /// The key's tenant (its priority and share in the router's queue).
    tenant: Option<Arc<Tenant>>,
    /// The tokens reserved for it (its cost in the router's fair queue).
    cost: u64,
    /// Some attempt's request went out to an engine (it may have been worked on).
    reached: std::cell::Cell<bool>,
    session: Option<&'a str>,
    prefix: Option<&'a PrefixPlan<'a>>,
    request_id: &'a str,
    /// The client sent no id: send ours upstream too.
    send_id: bool,
    client: IpAddr,
    started: Instant,
    /// The only endpoint (index into the state's endpoints) that may take the request: the
    /// one holding the stored response it names.
    pinned: Option<usize>,
    /// Learn the id of the stored response the answer names (`POST /v1/responses`).
    learn: bool,
    /// Its trace (tracing on).
    trace: Option<&'a RequestTrace>,
}

pub async fn handle(ctx: &WorkerCtx, down: &mut Downstream, head: RequestHead) -> After {
    let started = Instant::now();
    let client_id = head.headers.get_str(REQUEST_ID).filter(|id| id.len() <= 256);
    let request_id = client_id.map_or_else(|| ctx.next_request_id(), str::to_owned);
    let lim = &ctx.limits;

    // 1. The body.
    let body = match down
        .reader
        .read_body(&head, &mut down.wr, lim.max_body, lim.body_timeout)
        .await
    {
        Ok(body) => body,
        Err(e) => return fail(ctx, down, Some((&head, &request_id)), &e, None).await,
    };

    // 2. Local routes (`/v1/models` needs a key when keys are on, and lists what it may use).
    match target(head.method(), head.path()) {
        Target::Local(local) => {
            let key = match local {
                Local::Models => match authenticate(ctx, &head) {
                    Ok(key) => key,
                    Err(e) => return fail(ctx, down, Some((&head, &request_id)), &e, None).await,
                },
                _ => None,
            };
            let (status, content_type, body) = admin::serve(ctx, local, key.as_deref());
            let keep_alive = head.keep_alive && !ctx.draining();
            let bytes = response::local(
                status,
                content_type,
                &body,
                keep_alive,
                head.version,
                Some(&request_id),
                "",
            );
            if !down.write(bytes, lim.write_timeout).await || !keep_alive {
                return After::Close;
            }
            return After::KeepAlive;
        }
        Target::Missing(kind) => {
            let e = ProxyError::new(kind, format!("{} {} is not served here", head.method(), head.path()));
            return fail(ctx, down, Some((&head, &request_id)), &e, None).await;
        }
        Target::Stored(route) => {
            let id = route.id().to_owned();
            let request = (&head, &body, request_id.as_str(), client_id.is_none());
            return serve_stored(ctx, down, request, &id, started).await;
        }
        Target::Model => {}
    }
    // The request's trace (tracing on): the client's context (`traceparent`) or a new one.
    // From here a refusal ends it too (`refuse`).
    let trace = ctx
        .shared
        .tracer
        .as_ref()
        .map(|t| RequestTrace::start(t, &head, started));
    if let Some(t) = &trace {
        t.annotate(|| server_attributes(&head, &request_id, down.peer.ip()));
    }
    let key = match authenticate(ctx, &head) {
        Ok(key) => key,
        Err(e) => return refuse(ctx, down, (&head, &request_id), trace, &e).await,
    };

    // 3. Peek (a form, for the audio routes, by its fields).
    let session_config = &ctx.shared.config.routing.session;
    let form = head
        .headers
        .get_str("content-type")
        .filter(|t| lmstack_http::form::is_form(t));
    let peeked = match form {
        Some(content_type) => lmstack_http::form::peek_form(&body, content_type),
        None => lmstack_http::peek(&body, session_config.body_field.as_deref()),
    };
    let peek = match peeked {
        Ok(p) => p,
        Err(e) => return refuse(ctx, down, (&head, &request_id), trace, &e.into()).await,
    };
    // SageMaker names a LoRA adapter in a header, which vLLM puts in the body's `model`.
    let adapter = (head.path() == "/invocations")
        .then(|| head.headers.get_str("x-amzn-sagemaker-adapter-identifier"))
        .flatten();
    let Some(model) = peek.model.as_deref().or(adapter) else {
        let e = ProxyError::new(ErrorKind::InvalidRequest, "the request must name a `model`").with_param("model");
        return refuse(ctx, down, (&head, &request_id), trace, &e).await;
    };
    if let Some(t) = &trace {
        t.annotate(|| model_attributes(&head, model, peek.stream));
    }

    // 4. The key's models and budgets (spent before a request is held, so that a tenant
    //    over its budget cannot fill the hold); the model's pool.
    if let Some(Err(e)) = key.as_ref().map(|k| k.allow_model(model)) {
        return refuse(ctx, down, (&head, &request_id), trace, &e).await;
    }
    let grant = match &key {
        Some(key) => {
            // Reserved now, settled from the engine's usage when the response ends.
            let tenancy = &ctx.shared.config.tenancy;
            // A form's file (audio) is not text: only `max_tokens` is reserved for it. (A
            // Messages request's system prompt and tools are outside its messages.)
            let prompt_bytes = match (form, Dialect::of_path(head.path())) {
                (Some(_), _) => 0,
                (None, Dialect::Anthropic) => body.len(),
                (None, Dialect::OpenAi) => peek.prompt.or(peek.messages).map_or(body.len(), |p| p.get().len()),
            } as u64;
            let tokens = (prompt_bytes / tenancy.prompt_bytes_per_token)
                .saturating_add(peek.max_tokens.unwrap_or(tenancy.default_max_tokens));
            match key.admit(tokens) {
                Ok(grant) => {
                    tracing::debug!(request_id, tenant = %key.tenant.name, key = key.name.as_deref(), tokens, "admitted");
                    Some(grant)
                }
                Err(e) => return refuse(ctx, down, (&head, &request_id), trace, &e).await,
            }
        }
        None => None,
    };
    // From here, a request that goes nowhere gives its reservation back.
    let refund = |grant: Option<Grant>| {
        if let Some(g) = grant {
            g.settle(Some((0, 0)));
        }
    };
    let mut state = ctx.routing_state();
    // A model with no ready endpoint (scaling up from zero, restarting) holds its request
    // a while rather than failing it.
    if let Some(hold) = must_hold(ctx, &state, model) {
        let Downstream { reader, .. } = &mut *down;
        let held = reader
            .unless_client_leaves(lim.head.max_bytes, lim.client_watch_delay, hold_for(ctx, model, hold))
            .await;
        match held {
            None => {
                tracing::debug!(request_id, "the client left while its request was held");
                refund(grant);
                return After::Close;
            }
            Some(Ok(ready)) => state = ready,
            Some(Err(e)) => {
                refund(grant);
                return refuse(ctx, down, (&head, &request_id), trace, &e).await;
            }
        }
    }
    let Some(pool) = state.model(model) else {
        // A key sees only the models it may use.
        let names: Vec<&str> = state
            .model_names()
            .into_iter()
            .filter(|m| key.as_ref().is_none_or(|k| k.lists(m)))
            .collect();
        let e = ProxyError::new(
            ErrorKind::UnknownModel,
            format!(
                "The model `{model}` does not exist. Models served here: {}",
                names.join(", ")
            ),
        )
        .with_param("model");
        refund(grant);
        return refuse(ctx, down, (&head, &request_id), trace, &e).await;
    };
    let mut grant = grant;
    let rate_headers = grant.as_mut().map(|g| std::mem::take(&mut g.headers));
    // A completions or chat stream has a ledger: it may be resumed, and it tells the usage.
    let resume = &ctx.shared.config.resume;
    let api = match head.path() {
        "/v1/completions" if peek.stream && (resume.enabled || grant.is_some()) => Some(Api::Completions),
        "/v1/chat/completions" if peek.stream && (resume.enabled || grant.is_some()) => Some(Api::Chat),
        _ => None,
    };
    let client_usage = peek.stream_options.is_some_and(|o| {
        serde_json::from_str::<serde_json::Value>(o.get())
            .ok()
            .and_then(|v| v.get("include_usage").and_then(serde_json::Value::as_bool))
            .unwrap_or(false)
    });
    // What the tenant's requests carry: its cache salt; the usage of a stream, to settle
    // its budget (not shown to a client that did not ask).
    // (A form carries no salt: vLLM has none for audio, and its encoder-decoder models
    // cache no prefix.)
    let salt = grant
        .as_ref()
        .filter(|_| form.is_none())
        .and_then(|g| g.tenant().cache_salt.clone());
    let ask_usage = grant.is_some() && api.is_some() && !client_usage;
    let tenant_body = if salt.is_some() || ask_usage {
        match tenant_body(&body, &peek, salt.as_deref(), ask_usage) {
            Some(b) => Some(b),
            None => {
                // Never forwarded with the client's own salt (isolation fails closed).
                refund(grant);
                let e = ProxyError::new(
                    ErrorKind::InvalidJson,
                    "the request body could not be rewritten for its tenant (numbers or nesting beyond JSON's usual range)",
                );
                return refuse(ctx, down, (&head, &request_id), trace, &e).await;
            }
        }
    } else {
        None
    };
    let body = tenant_body.as_ref().unwrap_or(&body);
    let session = session_key(&head, peek.session.as_deref(), session_config);
    // The prompt's blocks, and how much of them each endpoint holds, for policies that ask.
    // (Counting tokens puts nothing in an engine's cache.)
    let prefix = if pool.policy.name().uses_prefix() && head.path() != anthropic::COUNT_TOKENS {
        prefix_plan(ctx, &state, pool, &peek, session, (&head, body), salt.as_deref())
    } else {
        None
    };
    // A stream that may be resumed asks the engine for token ids (hidden from the client
    // unless it asked), so that a continuation is token-exact.
    let keep_ids = peek.return_token_ids == Some(true);
    // The first event carries the prompt's ids: asked for only when they fit in an event.
    let ids_fit = body.len() <= ctx.limits.max_event_bytes / 4;
    let send_body = match api {
        Some(_) if resume.enabled && resume.token_ids && !keep_ids && ids_fit => {
            lmstack_http::stream::ask_token_ids(body).map_or_else(|| body.clone(), Bytes::from)
        }
        _ => body.clone(),
    };
    // A follow-up of a stored response goes where that response is.
    let responses = &ctx.shared.config.routing.responses;
    let pinned = match peek.previous_response_id.as_deref() {
        Some(id) if head.path() == "/v1/responses" && responses.enabled => {
            let candidates: Vec<usize> = (pool.endpoints.iter().copied())
                .filter(|&i| state.endpoints[i].healthy)
                .collect();
            match stored::locate(ctx, &state, id, &candidates, engine_authorization(ctx, &head)).await {
                Ok(i) => Some(i),
                Err(e) => {
                    refund(grant);
                    return refuse(ctx, down, (&head, &request_id), trace, &e).await;
                }
            }
        }
        _ => None,
    };
    let request = Forward {
        head: &head,
        body,
        send_body,
        stream: peek.stream,
        api,
        keep_ids,
        hide_usage: ask_usage,
        client_usage,
        dialect: Dialect::of_path(head.path()),
        metered: key.is_some(),
        rate_headers: rate_headers.as_deref().unwrap_or(""),
        tenant: key.as_ref().map(|k| k.tenant.clone()),
        reached: std::cell::Cell::new(false),
        cost: grant.as_ref().map_or(0, Grant::reserved),
        session,
        prefix: prefix.as_ref(),
        request_id: &request_id,
        send_id: client_id.is_none(),
        client: down.peer.ip(),
        started,
        pinned,
        learn: head.path() == "/v1/responses" && responses.enabled,
        trace: trace.as_ref(),
    };
    let table = ctx.metrics.table(&*state);
    let mm = &table.models[pool.index];

    // 5-6. Forward and relay, unless the client leaves first.
    let max_buffered = lim.head.max_bytes;
    let Downstream { reader, wr, .. } = down;
    let outcome = reader
        .unless_client_leaves(
            max_buffered,
            lim.client_watch_delay,
            forward(ctx, &state, pool, mm, &request, wr),
        )
        .await;

    // 7. Record, and decide about the connection.
    if let Some(grant) = grant {
        let settled = match &outcome {
            // Counting tokens generates none.
            Some(Outcome::Done { status: 200, .. }) if head.path() == anthropic::COUNT_TOKENS => Some((0, 0)),
            Some(Outcome::Done { usage, .. }) => settled_usage(*usage, request.reached.get()),
            _ => settled_usage(None, request.reached.get()),
        };
        grant.settle(settled);
    }
    if let (Some(trace), Some(tracer)) = (trace, &ctx.shared.tracer) {
        finish_trace(trace, tracer, &head, outcome.as_ref());
    }
    finish(ctx, down, (&head, &request_id), mm, outcome, started).await
}

/// Step 7's end: records the outcome, and decides about the connection.
async fn finish(
    ctx: &WorkerCtx,
    down: &mut Downstream,
    (head, request_id): (&RequestHead, &str),
    mm: &ModelMetrics,
    outcome: Option<Outcome>,
    started: Instant,
) -> After {
    match outcome {
        None => {
            tracing::debug!(request_id, "the client left before the response ended");
            record(&mm.unrouted, CLIENT_CLOSED, started);
            After::Close
        }
        Some(Outcome::Done {
            pm, status, keep_alive, ..
        }) => {
            record(&pm, status, started);
            if keep_alive { After::KeepAlive } else { After::Close }
        }
        Some(Outcome::Aborted { pm, status }) => {
            record(&pm, status, started);
            After::Close
        }
        Some(Outcome::Failed { error, pm }) => fail(ctx, down, Some((head, request_id)), &error, Some(&pm)).await,
    }
}

/// `GET /v1/responses/{id}` and `POST /v1/responses/{id}/cancel`: no model and no body to
/// route on. They go to the endpoint holding the response (steps 4 to 7 of `handle`, with
/// the endpoint found by `stored::locate` and a pool it serves for the metrics).
async fn serve_stored(
    ctx: &WorkerCtx,
    down: &mut Downstream,
    (head, body, request_id, send_id): (&RequestHead, &Bytes, &str, bool),
    id: &str,
    started: Instant,
) -> After {
    let key = match authenticate(ctx, head) {
        Ok(key) => key,
        Err(e) => return fail(ctx, down, Some((head, request_id)), &e, None).await,
    };
    let state = ctx.routing_state();
    // The endpoints of the models the key may use (vLLM does not check who asks for a
    // stored response: its id is the capability).
    let usable = |pool: &ModelPool| key.as_ref().is_none_or(|k| k.lists(&pool.name));
    let mut candidates: Vec<usize> = (state.pools().filter(|p| usable(p)))
        .flat_map(|p| p.endpoints.iter().copied())
        .filter(|&i| state.endpoints[i].healthy)
        .collect();
    candidates.sort_unstable();
    candidates.dedup();
    let found = if ctx.shared.config.routing.responses.enabled {
        stored::locate(ctx, &state, id, &candidates, engine_authorization(ctx, head)).await
    } else if candidates.is_empty() {
        Err(ProxyError::new(
            ErrorKind::NoHealthyEndpoint,
            "no healthy endpoint right now",
        ))
    } else {
        // Without the map, where a router that knows nothing of stored responses sends it.
        Ok(candidates[(ctx.next_ticket() % candidates.len() as u64) as usize])
    };
    let found = found.and_then(|index| {
        let pool = state.pools().find(|p| usable(p) && p.endpoints.contains(&index));
        pool.map(|pool| (index, pool)).ok_or_else(|| {
            ProxyError::new(
                ErrorKind::NoHealthyEndpoint,
                "the endpoint holding the response is gone",
            )
        })
    });
    let (index, pool) = match found {
        Ok(found) => found,
        Err(e) => return fail(ctx, down, Some((head, request_id)), &e, None).await,
    };
    let request = Forward {
        head,
        body,
        send_body: body.clone(),
        stream: false,
        api: None,
        keep_ids: false,
        hide_usage: false,
        client_usage: false,
        metered: key.is_some(),
        rate_headers: "",
        tenant: key.as_ref().map(|k| k.tenant.clone()),
        cost: 0,
        reached: std::cell::Cell::new(false),
        session: None,
        prefix: None,
        request_id,
        send_id,
        client: down.peer.ip(),
        started,
        pinned: Some(index),
        learn: false,
        trace: None,
        dialect: Dialect::OpenAi,
    };
    let table = ctx.metrics.table(&*state);
    let mm = &table.models[pool.index];
    let lim = &ctx.limits;
    let Downstream { reader, wr, .. } = down;
    let outcome = reader
        .unless_client_leaves(
            lim.head.max_bytes,
            lim.client_watch_delay,
            forward(ctx, &state, pool, mm, &request, wr),
        )
        .await;
    finish(ctx, down, (head, request_id), mm, outcome, started).await
}

/// The client's `Authorization`, for the engines when the router keeps no keys (they may
/// check their own, vLLM's `--api-key`); the router's own keys never go to engines.
fn engine_authorization<'h>(ctx: &WorkerCtx, head: &'h RequestHead) -> Option<&'h str> {
    ctx.shared
        .tenants
        .is_none()
        .then(|| head.headers.get_str("authorization"))
        .flatten()
}

/// The server span's attributes known before the body is read (OpenTelemetry's HTTP
/// conventions).
fn server_attributes(head: &RequestHead, request_id: &str, client: IpAddr) -> Vec<(&'static str, otel::Value)> {
    vec![
        ("http.request.method", head.method().to_owned().into()),
        ("http.route", head.path().to_owned().into()),
        ("url.path", head.path().to_owned().into()),
        (
            "network.protocol.version",
            (if head.version == Version::Http10 { "1.0" } else { "1.1" }).into(),
        ),
        ("client.address", client.to_string().into()),
        ("lmstack.request_id", request_id.to_owned().into()),
    ]
}

/// The server span's attributes from the body (OpenTelemetry's GenAI conventions).
fn model_attributes(head: &RequestHead, model: &str, stream: bool) -> Vec<(&'static str, otel::Value)> {
    let mut a: Vec<(&'static str, otel::Value)> = vec![
        ("gen_ai.request.model", model.to_owned().into()),
        ("lmstack.stream", stream.into()),
    ];
    let operation = match head.path() {
        "/v1/chat/completions" => Some("chat"),
        "/v1/completions" => Some("text_completion"),
        "/v1/embeddings" => Some("embeddings"),
        _ => None,
    };
    if let Some(op) = operation {
        a.push(("gen_ai.operation.name", op.into()));
    }
    a
}

/// Refuses a model request before any engine was tried: its trace (when it has one) ends
/// with the error, then `fail` answers.
async fn refuse(
    ctx: &WorkerCtx,
    down: &mut Downstream,
    (head, request_id): (&RequestHead, &str),
    trace: Option<RequestTrace>,
    error: &ProxyError,
) -> After {
    if let (Some(trace), Some(tracer)) = (trace, &ctx.shared.tracer) {
        let name = format!("{} {}", head.method(), head.path());
        trace.finish(tracer, name, error.kind.status(), Some(error.kind.label()));
    }
    fail(ctx, down, Some((head, request_id)), error, None).await
}

/// Ends a request's trace with its outcome (its server span) and hands its spans to the
/// exporter thread.
fn finish_trace(trace: RequestTrace, tracer: &otel::Tracer, head: &RequestHead, outcome: Option<&Outcome>) {
    let (status, error) = match outcome {
        None => (CLIENT_CLOSED, Some("client_closed")),
        Some(Outcome::Done { status, usage, .. }) => {
            if let Some(u) = usage {
                trace.annotate(|| {
                    vec![
                        ("gen_ai.usage.input_tokens", (u.prompt_tokens as i64).into()),
                        ("gen_ai.usage.output_tokens", (u.completion_tokens as i64).into()),
                    ]
                });
            }
            (*status, None)
        }
        Some(Outcome::Aborted { status, .. }) if *status == CLIENT_CLOSED => (*status, Some("client_closed")),
        Some(Outcome::Aborted { status, .. }) => (*status, Some("response_cut")),
        Some(Outcome::Failed { error, .. }) => (error.kind.status(), Some(error.kind.label())),
    };
    let name = format!("{} {}", head.method(), head.path());
    trace.finish(tracer, name, status, error);
}

/// Whether a request for `model` must be held, and how long at most: its pool has no
/// healthy endpoint, or there is no pool yet and the model is one to hold for.
fn must_hold(ctx: &WorkerCtx, state: &RoutingState, model: &str) -> Option<Duration> {
    let a = &ctx.shared.config.admission;
    let unready = match state.model(model) {
        Some(pool) => pool.healthy_count(state) == 0,
        None => crate::config::model_matches(&a.hold_models, model),
    };
    (unready && a.hold_timeout_ms > 0).then(|| crate::config::ms(a.hold_timeout_ms))
}

/// Holds a request until its model has a healthy endpoint (checked every 20 ms, when the
/// worker's routing state may have moved), or fails it after `max`.
async fn hold_for(ctx: &WorkerCtx, model: &str, max: Duration) -> Result<crate::state::StateRef, ProxyError> {
    let limit = ctx.shared.config.admission.max_held_per_worker;
    if ctx.held.get() >= limit {
        return Err(ProxyError::new(
            ErrorKind::Overloaded,
            format!("{limit} requests are already held for models without a ready endpoint"),
        )
        .with_headers("retry-after: 1\r\nx-lmstack-reason: hold_full\r\n".to_owned()));
    }
    let _held = Held::new(ctx);
    let deadline = Instant::now() + max;
    loop {
        crate::time::sleep(Duration::from_millis(20)).await;
        let state = ctx.routing_state();
        if state.model(model).is_some_and(|p| p.healthy_count(&state) > 0) {
            return Ok(state);
        }
        if Instant::now() >= deadline {
            let what = if state.model(model).is_some() {
                "has no healthy endpoint"
            } else {
                "is served by no endpoint"
            };
            return Err(ProxyError::new(
                ErrorKind::NoHealthyEndpoint,
                format!("the model `{model}` {what} after {} ms held", max.as_millis()),
            )
            .with_headers("retry-after: 5\r\nx-lmstack-reason: no_ready_endpoint\r\n".to_owned()));
        }
    }
}

/// A request held (`hold_for`), counted on the worker and in the held gauge.
struct Held<'a>(&'a WorkerCtx);

impl<'a> Held<'a> {
    fn new(ctx: &'a WorkerCtx) -> Self {
        ctx.held.set(ctx.held.get() + 1);
        ::metrics::gauge!(crate::metrics::REQUESTS_HELD).increment(1.0);
        Self(ctx)
    }
}

impl Drop for Held<'_> {
    fn drop(&mut self) {
        self.0.held.set(self.0.held.get() - 1);
        ::metrics::gauge!(crate::metrics::REQUESTS_HELD).decrement(1.0);
    }
}

/// The tokens a metered request used, as far as known: none when no attempt's request
/// went out to an engine (whatever happened after, the client leaving included); else the
/// engine's usage (of a response relayed whole); `None` (the reservation stands) when it
/// may have been worked on and no usage came.
fn settled_usage(usage: Option<Usage>, reached: bool) -> Option<(u64, u64)> {
    if !reached {
        return Some((0, 0));
    }
    usage.map(|u| (u.prompt_tokens, u.completion_tokens))
}

/// A request's prompt blocks and what each endpoint of its pool holds of them. The buffers
/// come from the worker's scratch list and go back when the request ends.
struct PrefixPlan<'c> {
    scratch: Scratch<'c>,
    tie_key: u64,
    /// Leading blocks many prompts share.
    shared: u32,
    /// Where the session went last (pool index).
    session_home: Option<usize>,
    /// The session's key in the affinity table.
    session_block: Option<u64>,
    /// What exact KV routing found, when the pool has engines it covers.
    exact: Option<crate::kv::Exact>,
}

impl PrefixPlan<'_> {
    fn blocks(&self) -> &[u64] {
        &self.scratch.get().blocks
    }

    fn matched(&self) -> &[u32] {
        &self.scratch.get().matched
    }
}

fn prefix_plan<'c>(
    ctx: &'c WorkerCtx,
    state: &RoutingState,
    pool: &ModelPool,
    peek: &lmstack_http::Peek<'_>,
    session: Option<&str>,
    (head, body): (&RequestHead, &Bytes),
    tenant_salt: Option<&str>,
) -> Option<PrefixPlan<'c>> {
    let a = &ctx.shared.config.routing.affinity;
    let mut scratch = ctx.scratch();
    let buffers = scratch.get_mut();
    // Models with a tokenizer are matched on token blocks (the engines' own unit), others on
    // blocks of normalised prompt characters. A Messages request is rendered as the chat
    // request vLLM converts it to.
    let messages = head.path() == anthropic::MESSAGES;
    let converted = match &ctx.shared.kv {
        Some(_) if messages => anthropic::to_chat(body).ok(),
        _ => None,
    };
    let tokenized = ctx.shared.kv.as_ref().and_then(|kv| {
        let (chat, body) = match &converted {
            Some(chat) => (true, &chat[..]),
            None if messages => return None,
            None => (head.path().starts_with("/v1/chat/"), &body[..]),
        };
        kv.tokenize(&pool.name, pool.parent.as_deref(), chat, body)
    });
    match &tokenized {
        Some(t) => t.affinity_blocks(a.max_prompt_blocks, &mut buffers.blocks),
        None => {
            let mut hasher = BlockHasher::new(a.block_bytes, a.max_prompt_blocks, &mut buffers.blocks);
            let fed = if messages {
                anthropic::prompt_pieces(body, |piece| hasher.feed(piece))
            } else {
                lmstack_http::peek::prompt_pieces(peek, |piece| hasher.feed(piece))
            };
            if !fed {
                return None;
            }
        }
    }
    if buffers.blocks.is_empty() {
        return None;
    }
    // An isolated tenant's blocks (and session) are its own: it neither matches nor
    // reveals another's prompts.
    let tenant_seed = tenant_salt.map(|s| xxhash_rust::xxh3::xxh3_64(s.as_bytes()));
    if let Some(seed) = tenant_seed {
        for b in &mut buffers.blocks {
            *b = xxhash_rust::xxh3::xxh3_64_with_seed(&b.to_le_bytes(), seed);
        }
    }
    buffers.matched.resize(pool.endpoints.len(), 0);
    let found = ctx
        .shared
        .cell
        .affinity
        .matched(&buffers.blocks, &pool.tags, &mut buffers.matched);
    // Where engines report what they hold, their exact matches replace the table's.
    let exact = match (&ctx.shared.kv, &tokenized) {
        (Some(kv), Some(t)) => kv.refine(
            t,
            pool.endpoints.iter().map(|&i| &*state.endpoints[i].url),
            &mut buffers.matched,
            &mut buffers.exact,
            &mut buffers.keys,
        ),
        _ => {
            buffers.exact.clear();
            None
        }
    };
    // Where the session went last, when the request has a key.
    let session_block = session.map(|s| {
        let b = lmstack_route::blocks::session_block(s);
        tenant_seed.map_or(b, |seed| xxhash_rust::xxh3::xxh3_64_with_seed(&b.to_le_bytes(), seed))
    });
    let session_home = session_block.and_then(|b| {
        let cell = &ctx.shared.cell;
        cell.affinity.latest(b, &pool.tags, cell.now_ms())
    });
    // Ties go the same way on every replica: by the session, else by the prompt's own end.
    let tie_key = match session {
        Some(s) => xxhash_rust::xxh3::xxh3_64(s.as_bytes()),
        None => buffers.blocks.last().copied().unwrap_or(0),
    };
    Some(PrefixPlan {
        scratch,
        tie_key,
        shared: found.shared,
        session_home,
        session_block,
        exact,
    })
}

/// The session key: the first configured header present, else the body field.
fn session_key<'a>(head: &'a RequestHead, body_value: Option<&'a str>, config: &SessionConfig) -> Option<&'a str> {
    config
        .headers
        .iter()
        .find_map(|h| head.headers.get_str(h))
        .or(body_value.filter(|v| !v.is_empty()))
}

/// Answers with the error response for `error`, logs it and records it: the one place
/// errors become responses. `request` is the request's head and id; `None` when the head
/// itself could not be accepted (the worker's read loop).
pub async fn fail(
    ctx: &WorkerCtx,
    down: &mut Downstream,
    request: Option<(&RequestHead, &str)>,
    error: &ProxyError,
    pm: Option<&PairMetrics>,
) -> After {
    let request_id = request.map(|(_, id)| id);
    match pm {
        Some(pm) => record(pm, error.kind.status(), Instant::now()),
        None => ctx.metrics.http_error(error.kind),
    }
    match error.kind.side() {
        Side::Downstream => tracing::debug!(request_id, "{error}"),
        Side::Upstream | Side::Internal => tracing::warn!(request_id, "{error}"),
    }
    let (keep_alive, version, dialect) = match request {
        Some((head, _)) => (
            head.keep_alive && !ctx.draining(),
            head.version,
            Dialect::of_path(head.path()),
        ),
        None => (false, Version::Http11, Dialect::OpenAi),
    };
    let bytes = response::error(error, dialect, keep_alive, version, request_id);
    let written = down.write(bytes, ctx.limits.write_timeout).await;
    if error.kind.closes_connection() {
        if written { After::CloseAfterError } else { After::Close }
    } else if written && keep_alive {
        After::KeepAlive
    } else {
        After::Close
    }
}

fn record(pm: &PairMetrics, status: u16, started: Instant) {
    pm.status(status);
    pm.duration(started.elapsed().as_secs_f64());
}

enum Outcome {
    /// The response was relayed whole.
    Done {
        pm: Rc<PairMetrics>,
        status: u16,
        keep_alive: bool,
        /// The engine's usage, when metered and it came.
        usage: Option<Usage>,
    },
    /// The response started but could not finish (engine failed, client left).
    Aborted { pm: Rc<PairMetrics>, status: u16 },
    /// Nothing was sent to the client: answer with this error.
    Failed { error: ProxyError, pm: Rc<PairMetrics> },
}

/// Picks an endpoint and exchanges the request with it, retrying failures that happen
/// before any response byte on other endpoints; a stream cut after it began goes on
/// elsewhere (a continuation) when it can, and otherwise ends with an error event.
async fn forward(
    ctx: &WorkerCtx,
    state: &RoutingState,
    pool: &ModelPool,
    mm: &ModelMetrics,
    req: &Forward<'_>,
    wr: &mut WriteHalf,
) -> Outcome {
    // A request naming a stored response may go only where that response is.
    let mut excluded: Vec<usize> = match req.pinned {
        Some(e) => pool.endpoints.iter().copied().filter(|&i| i != e).collect(),
        None => Vec::new(),
    };
    // The endpoint whose reused connection just failed: its next attempt connects afresh.
    let mut reconnect: Option<usize> = None;
    let mut last_failure: Option<(ProxyError, Rc<PairMetrics>)> = None;
    // The stream under way to the client, once its head went out.
    let mut streaming: Option<Streaming> = None;
    let mut body = req.send_body.clone();
    let mut attempt = 0u32;
    // Continuations tried, and when the stream was last cut (and why).
    let mut resumes = 0u32;
    let mut cut: Option<(Instant, ProxyError)> = None;
    loop {
        // A cut stream's continuations are bounded in number and time.
        let spent = cut.as_ref().is_some_and(|(at, _)| {
            resumes >= ctx.shared.config.resume.max_attempts || at.elapsed() >= ctx.limits.resume_deadline
        });
        if spent && let Some((_, error)) = cut.take() {
            let pm = last_failure.map_or_else(|| mm.unrouted.clone(), |(_, pm)| pm);
            return end_stream(ctx, mm, req, wr, streaming, pm, &error, "exhausted").await;
        }
        // A retry or a continuation has waited its turn once: it goes when it can.
        let route_start = req.trace.and_then(RequestTrace::route_begins);
        let pick = match pick(ctx, state, pool, mm, req, &excluded, attempt > 0).await {
            Ok(pick) => pick,
            Err(error) => {
                if let Some(t) = req.trace {
                    t.route_ends(
                        route_start,
                        || vec![("lmstack.route.policy", pool.policy.name().as_str().into())],
                        Some(error.kind.label()),
                    );
                }
                let pm = last_failure
                    .as_ref()
                    .map_or_else(|| mm.unrouted.clone(), |(_, pm)| pm.clone());
                if streaming.is_some() {
                    let error = cut.map_or(error, |(_, e)| e);
                    return end_stream(ctx, mm, req, wr, streaming, pm, &error, "no_endpoint").await;
                }
                return match last_failure {
                    Some((error, pm)) => Outcome::Failed { error, pm },
                    None => Outcome::Failed { error, pm },
                };
            }
        };
        let index = pool.endpoints[pick.index];
        let endpoint = &state.endpoints[index];
        if let Some(t) = req.trace {
            t.route_ends(
                route_start,
                || route_attributes(pool, pick, req.prefix, &endpoint.url),
                None,
            );
        }
        mm.decision(pool.policy.name().as_str(), pick.reason.as_str());
        let pm = mm.pairs[pick.index].clone();
        if attempt > 0 && streaming.is_none() {
            pm.retry();
        }
        if streaming.is_some() {
            resumes += 1;
        }
        attempt += 1;
        let now_ms = ctx.shared.cell.now_ms();
        let (blocks, uncached) = match req.prefix {
            Some(plan) => record_prefix(ctx, pool, pick, plan, endpoint, mm, now_ms),
            None => (0, 0),
        };
        let _inflight = Inflight::start(ctx, endpoint, pm.clone(), blocks, pool.index);
        endpoint.load.count_sent(
            1,
            uncached,
            u32::from(pick.reason.places_conversation()),
            now_ms,
            ctx.shared.config.routing.recent_half_life_ms as f64,
        );
        let head_timeout = match (&cut, req.stream) {
            (Some((at, _)), _) => ctx
                .limits
                .stream_head_timeout
                .min(ctx.limits.resume_deadline.saturating_sub(at.elapsed())),
            (None, true) => ctx.limits.stream_head_timeout.min(ctx.limits.first_byte_timeout),
            (None, false) => ctx.limits.first_byte_timeout,
        };
        let traceparent = req.trace.and_then(|t| {
            t.attempt_begins(|| {
                let kind = match (streaming.is_some(), attempt) {
                    (true, _) => "continuation",
                    (false, 1) => "first",
                    (false, _) => "retry",
                };
                let mut a: Vec<(&'static str, otel::Value)> = vec![
                    ("http.request.method", req.head.method().to_owned().into()),
                    ("server.address", endpoint.authority.to_string().into()),
                    ("url.full", format!("{}{}", endpoint.url, req.head.target()).into()),
                    ("lmstack.endpoint", endpoint.url.to_string().into()),
                    ("lmstack.attempt", i64::from(attempt).into()),
                    ("lmstack.attempt.kind", kind.into()),
                ];
                if attempt > 1 {
                    a.push(("http.request.resend_count", i64::from(attempt - 1).into()));
                }
                a
            })
        });
        let try_at = Attempt {
            traceparent,
            uncached_blocks: uncached,
            fresh: reconnect.take() == Some(index),
            route: (ctx.shared.config.routing.explain_header && streaming.is_none())
                .then(|| explain(pool, pick, req.prefix, req.pinned.is_some(), &endpoint.url)),
            body: body.clone(),
            head_timeout,
            last_try: attempt > ctx.limits.max_retries,
        };
        let result = exchange(ctx, endpoint, req, wr, &pm, &try_at, &mut streaming).await;
        if let Some(t) = req.trace {
            let (outcome, status, error) = match &result {
                Exchange::Done { status, .. } => ("done", Some(*status), None),
                Exchange::Aborted { status, error: None } => ("client_closed", Some(*status), None),
                Exchange::Aborted { status, error: Some(e) } => ("cut", Some(*status), Some(e.kind.label())),
                Exchange::Failed { error } => ("failed", None, Some(error.kind.label())),
            };
            t.attempt_ends(outcome, status, error);
        }
        passive_health(ctx, state, pool, index, &result);
        match result {
            Exchange::Done {
                status,
                keep_alive,
                usage,
            } => {
                if resumes > 0 {
                    mm.resume("resumed");
                }
                return Outcome::Done {
                    pm,
                    status,
                    keep_alive,
                    usage,
                };
            }
            Exchange::Aborted { status, error: None } => return Outcome::Aborted { pm, status },
            Exchange::Aborted {
                status,
                error: Some(error),
            } => {
                pm.upstream_error(error.kind);
                tracing::warn!(request_id = req.request_id, endpoint = %endpoint.url, "response cut: {error}");
                let Some(s) = streaming.as_mut() else {
                    return Outcome::Aborted { pm, status };
                };
                excluded.push(index);
                let ledger = match s.ledger.as_mut() {
                    Some(ledger) if ctx.shared.config.resume.enabled => ledger,
                    Some(_) => return end_stream(ctx, mm, req, wr, streaming, pm, &error, "disabled").await,
                    None => {
                        let why = if ctx.shared.config.resume.enabled {
                            "not_openai"
                        } else {
                            "disabled"
                        };
                        return end_stream(ctx, mm, req, wr, streaming, pm, &error, why).await;
                    }
                };
                if ledger.done() {
                    // The end marker went out: only the body's end is missing.
                    mm.resume("finished");
                    return close_stream(ctx, wr, streaming, pm, &[]).await;
                }
                if let Err(why) = ledger.resumable() {
                    return end_stream(ctx, mm, req, wr, streaming, pm, &error, why.as_str()).await;
                }
                if ledger.finished() {
                    // The generation was over: only the usage and the end marker were missing.
                    let closing = ledger.closing_events(req.client_usage);
                    mm.resume("finished");
                    return close_stream(ctx, wr, streaming, pm, &closing).await;
                }
                match ledger.continuation(req.body) {
                    Ok(next) => {
                        ledger.start_part();
                        body = Bytes::from(next);
                        cut = Some((Instant::now(), error));
                        last_failure = None;
                        tracing::info!(
                            request_id = req.request_id,
                            tokens = ledger.tokens(),
                            "resuming the stream on another endpoint"
                        );
                    }
                    Err(why) => return end_stream(ctx, mm, req, wr, streaming, pm, &error, why.as_str()).await,
                }
            }
            Exchange::Failed { error } => {
                pm.upstream_error(error.kind);
                tracing::debug!(request_id = req.request_id, endpoint = %endpoint.url, attempt, "{error}");
                if streaming.is_some() {
                    // A continuation that did not start: the next one goes elsewhere.
                    excluded.push(index);
                    last_failure = Some((error, pm));
                    continue;
                }
                match error.retry {
                    Retry::Never => return Outcome::Failed { error, pm },
                    Retry::Elsewhere => excluded.push(index),
                    // The endpoint is not suspect: it may be picked again.
                    Retry::ReusedOnly => reconnect = Some(index),
                }
                if attempt > ctx.limits.max_retries {
                    return Outcome::Failed { error, pm };
                }
                last_failure = Some((error, pm));
            }
        }
    }
}

/// Records a prefix-routed request's blocks for the endpoint picked (and shares them with
/// the other replicas); returns the prompt's blocks and those not held there.
fn record_prefix(
    ctx: &WorkerCtx,
    pool: &ModelPool,
    pick: Pick,
    plan: &PrefixPlan<'_>,
    endpoint: &EndpointState,
    mm: &ModelMetrics,
    now_ms: u32,
) -> (u64, u64) {
    let matched = plan.matched().get(pick.index).copied().unwrap_or(0) as usize;
    if let Some(tag) = pool.tags[pick.index] {
        let affinity = &ctx.shared.cell.affinity;
        affinity.record(plan.blocks(), tag, now_ms);
        if let Some(session) = plan.session_block {
            affinity.record(&[session], tag, now_ms);
        }
    }
    // The other replicas learn the blocks this endpoint did not hold yet, a session that
    // moved, and the load this request adds.
    ctx.share_assignment(|| AffinityEntry {
        endpoint: endpoint.url.to_string(),
        blocks: if matched < plan.blocks().len() {
            plan.blocks().to_vec()
        } else {
            Vec::new()
        },
        requests: 1,
        uncached_blocks: (plan.blocks().len() - matched) as u64,
        placed: u32::from(pick.reason.places_conversation()),
        responses: Vec::new(),
    });
    if let Some(session) = plan.session_block
        && plan.session_home != Some(pick.index)
    {
        ctx.share_assignment(|| AffinityEntry {
            endpoint: endpoint.url.to_string(),
            blocks: vec![session],
            ..AffinityEntry::default()
        });
    }
    mm.match_ratio(matched as f64 / plan.blocks().len() as f64);
    (plan.blocks().len() as u64, (plan.blocks().len() - matched) as u64)
}

/// Passive health: what an attempt says about its endpoint. Failures in a row eject it for
/// a while (`outlier`), as long as its pool keeps enough endpoints.
fn passive_health(ctx: &WorkerCtx, state: &RoutingState, pool: &ModelPool, index: usize, result: &Exchange) {
    let failed = match result {
        Exchange::Done { status, .. } => *status >= 500,
        Exchange::Aborted { error, .. } => error.is_some(),
        // A pooled connection the engine had closed says nothing either way.
        Exchange::Failed { error } if error.retry == Retry::ReusedOnly => return,
        Exchange::Failed { error } => error.kind.side() == Side::Upstream,
    };
    let outlier = &state.endpoints[index].load.outlier;
    if !failed {
        outlier.success();
        return;
    }
    let config = &ctx.shared.config.outlier;
    let now_ms = ctx.shared.cell.now_ms();
    let may_eject = || {
        let out = pool
            .endpoints
            .iter()
            .filter(|&&e| state.endpoints[e].load.outlier.ejected(now_ms))
            .count();
        out < crate::outlier::max_ejected(config, pool.endpoints.len())
    };
    if let crate::outlier::Failed::Ejected(ms) = outlier.failure(config, now_ms, may_eject) {
        let url = &state.endpoints[index].url;
        tracing::warn!(endpoint = %url, ms, "endpoint ejected after failures in a row");
        crate::metrics::ejected(url);
    }
}

/// The body a tenant's request goes on with: its `cache_salt` (replacing the client's), and
/// `stream_options.include_usage`, each the body's last member (vLLM reads JSON objects
/// last-wins); through a JSON value when the client sent either field itself.
fn tenant_body(body: &Bytes, peek: &lmstack_http::Peek<'_>, salt: Option<&str>, ask_usage: bool) -> Option<Bytes> {
    use lmstack_http::stream::append_member;
    let salt_json = salt.map(|s| serde_json::Value::from(s).to_string());
    let appended = if (salt.is_some() && peek.cache_salt) || (ask_usage && peek.stream_options.is_some()) {
        None
    } else {
        let mut out = Some(body.to_vec());
        if let Some(salt) = &salt_json {
            out = out.and_then(|b| append_member(&b, "cache_salt", salt.as_bytes()));
        }
        if ask_usage {
            out = out.and_then(|b| append_member(&b, "stream_options", br#"{"include_usage":true}"#));
        }
        out
    };
    if let Some(out) = appended {
        return Some(Bytes::from(out));
    }
    let Ok(serde_json::Value::Object(mut map)) = serde_json::from_slice::<serde_json::Value>(body) else {
        return None;
    };
    if let Some(salt) = salt {
        map.insert("cache_salt".into(), salt.into());
    }
    if ask_usage {
        let options = map
            .entry("stream_options")
            .or_insert_with(|| serde_json::Value::Object(serde_json::Map::new()));
        if let Some(o) = options.as_object_mut() {
            o.insert("include_usage".into(), true.into());
            // Usage in every chunk would reach a client that did not ask for usage.
            if o.contains_key("continuous_usage_stats") {
                o.insert("continuous_usage_stats".into(), false.into());
            }
        } else {
            *options = serde_json::json!({"include_usage": true});
        }
    }
    serde_json::to_vec(&map).ok().map(Bytes::from)
}

/// The request's API key when keys are on (`None` when they are off); 401 without one.
fn authenticate(ctx: &WorkerCtx, head: &RequestHead) -> Result<Option<Arc<Key>>, ProxyError> {
    match &ctx.shared.tenants {
        Some(cell) => cell.load().authenticate(head).map(Some),
        None => Ok(None),
    }
}

/// Ends a stream that cannot go on: an error event (OpenAI's error object and the end
/// marker, as vLLM sends them mid-stream; on the Messages routes Anthropic's `event: error`)
/// and the body's end, so that the client sees a failed stream rather than a cut connection.
#[allow(clippy::too_many_arguments)]
async fn end_stream(
    ctx: &WorkerCtx,
    mm: &ModelMetrics,
    req: &Forward<'_>,
    wr: &mut WriteHalf,
    streaming: Option<Streaming>,
    pm: Rc<PairMetrics>,
    cause: &ProxyError,
    reason: &'static str,
) -> Outcome {
    mm.resume(reason);
    let error = ProxyError::new(
        cause.kind,
        format!(
            "the stream was cut and could not be resumed ({reason}): {}",
            cause.message
        ),
    );
    tracing::warn!(
        request_id = req.request_id,
        reason,
        "ending a cut stream with an error event: {error}"
    );
    let events = match req.dialect {
        Dialect::OpenAi => {
            let mut events = lmstack_http::stream::data_event(&error.body());
            events.extend_from_slice(lmstack_http::stream::DONE_EVENT);
            events
        }
        Dialect::Anthropic => anthropic::error_event(&error.body_in(Dialect::Anthropic)),
    };
    close_stream(ctx, wr, streaming, pm, &events).await
}

/// Writes the last events of a stream and ends its body.
async fn close_stream(
    ctx: &WorkerCtx,
    wr: &mut WriteHalf,
    streaming: Option<Streaming>,
    pm: Rc<PairMetrics>,
    events: &[u8],
) -> Outcome {
    let Some(s) = streaming else {
        return Outcome::Aborted { pm, status: 502 };
    };
    let timeout = ctx.limits.write_timeout;
    let mut head = None;
    let written = match relay::write_events(wr, &mut head, events, s.framing, timeout).await {
        Ok(()) => relay::end_events(wr, s.framing, timeout).await,
        Err(e) => Err(e),
    };
    match written {
        Ok(()) => Outcome::Done {
            pm,
            status: s.status,
            keep_alive: s.keep_alive,
            usage: None,
        },
        Err(_) => Outcome::Aborted {
            pm,
            status: CLIENT_CLOSED,
        },
    }
}

/// Asks the model's policy for an endpoint; when every untried healthy endpoint is at its
/// in-flight limit, waits in the router's queue for a slot.
async fn pick(
    ctx: &WorkerCtx,
    state: &RoutingState,
    pool: &ModelPool,
    mm: &ModelMetrics,
    req: &Forward<'_>,
    excluded: &[usize],
    again: bool,
) -> Result<Pick, ProxyError> {
    let lim = &ctx.limits;
    let admission = &ctx.shared.config.admission;
    let mut queued: Option<Queued<'_>> = None;
    // An engine that reports itself saturated takes no new request (it waits here, where
    // priority and fair share decide who goes next, rather than in the engine's own queue).
    let saturated = |e: usize| {
        state.endpoints[e].engine.is_some_and(|l| {
            (admission.max_engine_waiting > 0 && l.waiting > f64::from(admission.max_engine_waiting))
                || l.kv_usage > admission.max_kv_usage
        })
    };
    loop {
        let now_ms = ctx.shared.cell.now_ms();
        // Ejection never leaves a model without an endpoint: when every healthy endpoint
        // left to try is ejected, ejection is ignored (two workers may eject at once).
        let ejected = |e: usize| state.endpoints[e].load.outlier.ejected(now_ms);
        let ignore_ejection = !pool
            .endpoints
            .iter()
            .any(|&e| state.endpoints[e].healthy && !excluded.contains(&e) && !ejected(e));
        let view = PoolSnapshot {
            state,
            pool,
            now_ms,
            half_life_ms: ctx.shared.config.routing.recent_half_life_ms as f64,
            admit: |e: usize| {
                !excluded.contains(&e)
                    && (ignore_ejection || !ejected(e))
                    && (lim.max_inflight == 0
                        || state.endpoints[e].load.inflight.load(Ordering::Relaxed) < lim.max_inflight)
                    && !saturated(e)
            },
        };
        let request = RouteRequest {
            session_key: req.session,
            ticket: ctx.next_ticket(),
            prefix: req.prefix.map(|p| PrefixInfo {
                blocks: p.blocks().len(),
                matched: p.matched(),
                shared: p.shared,
                session_home: p.session_home,
                tie_key: p.tie_key,
            }),
        };
        // While others wait for this model, a request goes in its turn (a retry, which has
        // endpoints of its own to avoid, goes when it can).
        let my_turn = again
            || match &queued {
                Some(q) => q.ticket.first(),
                None => !ctx.waiters.has_group(pool.index),
            };
        if my_turn && let Some(pick) = pool.policy.pick(&view, &request) {
            // Under an in-flight limit the slot is taken here, atomically: another worker
            // may have seen the same free slot.
            let inflight = &state.endpoints[pool.endpoints[pick.index]].load.inflight;
            if lim.max_inflight == 0
                || inflight
                    .fetch_update(Ordering::AcqRel, Ordering::Relaxed, |n| {
                        (n < lim.max_inflight).then_some(n + 1)
                    })
                    .is_ok()
            {
                if let Some(q) = &queued {
                    q.ticket.served();
                    q.served.set(true);
                }
                return Ok(pick);
            }
            continue;
        }
        let untried = pool
            .endpoints
            .iter()
            .any(|&e| state.endpoints[e].healthy && !excluded.contains(&e));
        if !untried {
            return Err(ProxyError::new(
                ErrorKind::NoHealthyEndpoint,
                format!("no healthy endpoint serves the model `{}` right now", pool.name),
            ));
        }
        // Every candidate is busy, or others wait before this request.
        let q = match &queued {
            Some(q) => q,
            None => {
                if ctx.waiters.len() >= lim.max_queued {
                    return Err(
                        ProxyError::new(ErrorKind::Overloaded, "the router's queue is full; retry later")
                            .with_headers("retry-after: 1\r\nx-lmstack-reason: queue_full\r\n".to_owned()),
                    );
                }
                queued.insert(Queued::enter(ctx, mm.queued(), pool.index, req, again))
            }
        };
        let left = q.deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(ProxyError::new(
                ErrorKind::Overloaded,
                format!(
                    "every endpoint of `{}` stayed busy for {} ms",
                    pool.name,
                    lim.queue_timeout.as_millis()
                ),
            )
            .with_headers("retry-after: 1\r\nx-lmstack-reason: queue_timeout\r\n".to_owned()));
        }
        // Woken by a request finishing on this worker, or after a short tick for slots
        // freed on other workers.
        q.ticket.wait(left.min(std::time::Duration::from_millis(5))).await;
    }
}

/// A request's place in the router's queue, counted in the queued gauge (and a span of
/// its trace).
struct Queued<'a> {
    ticket: Ticket<'a>,
    gauge: metrics::Gauge,
    entered: Instant,
    deadline: Instant,
    trace: Option<&'a RequestTrace>,
    served: std::cell::Cell<bool>,
}

impl<'a> Queued<'a> {
    /// `again`: a retry, which takes no turn (it goes when it can), so it stands last and
    /// keeps no one else from theirs.
    fn enter(ctx: &'a WorkerCtx, gauge: &metrics::Gauge, group: usize, req: &Forward<'a>, again: bool) -> Self {
        let gauge = gauge.clone();
        gauge.increment(1.0);
        // The tenant's class and fair-queuing tag (without keys: the clock, first come).
        let clock = ctx.waiters.clock();
        let (class, tag) = match &req.tenant {
            _ if again => (0, u64::MAX),
            Some(t) => (t.priority as u8, t.tag(clock, req.cost)),
            None => (Priority::Normal as u8, clock),
        };
        let entered = Instant::now();
        Self {
            ticket: ctx.waiters.enter(Rank { group, class, tag }),
            gauge,
            entered,
            deadline: entered + ctx.limits.queue_timeout,
            trace: req.trace,
            served: std::cell::Cell::new(false),
        }
    }
}

impl Drop for Queued<'_> {
    fn drop(&mut self) {
        self.gauge.decrement(1.0);
        if let Some(t) = self.trace {
            t.queued(self.entered, if self.served.get() { "served" } else { "left" });
        }
    }
}

/// Counts a request (and its prompt blocks) against its endpoint, shared by all workers,
/// while it is in flight: what load-aware policies see.
struct Inflight<'a> {
    ctx: &'a WorkerCtx,
    endpoint: &'a EndpointState,
    pm: Rc<PairMetrics>,
    blocks: u64,
    /// The model's pool: whose waiters a finished request wakes first.
    group: usize,
}

impl<'a> Inflight<'a> {
    fn start(ctx: &'a WorkerCtx, endpoint: &'a EndpointState, pm: Rc<PairMetrics>, blocks: u64, group: usize) -> Self {
        // Under an in-flight limit, `pick` took the slot already.
        if ctx.limits.max_inflight == 0 {
            endpoint.load.inflight.fetch_add(1, Ordering::Relaxed);
        }
        if blocks > 0 {
            endpoint.load.active_blocks.fetch_add(blocks, Ordering::Relaxed);
        }
        pm.running(1);
        Self {
            ctx,
            endpoint,
            pm,
            blocks,
            group,
        }
    }
}

impl Drop for Inflight<'_> {
    fn drop(&mut self) {
        self.endpoint.load.inflight.fetch_sub(1, Ordering::Relaxed);
        if self.blocks > 0 {
            self.endpoint
                .load
                .active_blocks
                .fetch_sub(self.blocks, Ordering::Relaxed);
        }
        self.pm.running(-1);
        self.ctx.waiters.wake_one(self.group);
    }
}

enum Exchange {
    Done {
        status: u16,
        keep_alive: bool,
        /// The engine's usage, when metered and it came.
        usage: Option<Usage>,
    },
    /// The response head went to the client, the rest did not (an event stream's may go
    /// on elsewhere).
    Aborted { status: u16, error: Option<ProxyError> },
    /// Nothing of this attempt went to the client; `error.retry` says whether another
    /// attempt is safe.
    Failed { error: ProxyError },
}

/// What one attempt needs besides the request.
struct Attempt {
    /// The `traceparent` the engine gets instead of the client's (tracing on), and whether
    /// its trace is new.
    traceparent: Option<(String, bool)>,
    /// Prompt blocks the endpoint must prefill (not held there), for its load.
    uncached_blocks: u64,
    /// Open a new connection: the last one to this endpoint failed as a reused one.
    fresh: bool,
    /// The `x-lmstack-route` header's value, when routing is explained.
    route: Option<String>,
    /// The body to send: the client's (with token ids asked for), or a continuation's.
    body: Bytes,
    /// Time allowed for the response head.
    head_timeout: std::time::Duration,
    /// No retry will follow: relay an engine's 502/503/504 rather than try elsewhere.
    last_try: bool,
}

/// An event stream under way to the client (its head went out).
struct Streaming {
    /// What an OpenAI completions or chat stream sent, to resume it elsewhere.
    ledger: Option<Ledger>,
    /// A metered Messages stream's usage.
    messages_usage: Option<StreamUsage>,
    framing: EventFraming,
    status: u16,
    keep_alive: bool,
    /// When the client got its last event (a continuation's first is timed from it).
    last_event: Option<Instant>,
}

/// Why the request went where it went, for the `x-lmstack-route` response header:
/// `policy=prefix; reason=prefix_match; matched=31/34; shared=15; endpoint=http://...`.
fn explain(pool: &ModelPool, pick: Pick, prefix: Option<&PrefixPlan<'_>>, pinned: bool, endpoint: &str) -> String {
    use std::fmt::Write;
    let mut out = format!("policy={}; reason={}", pool.policy.name(), pick.reason.as_str());
    // The policy picked among one endpoint: the one holding the stored response.
    if pinned {
        out.push_str("; pinned=stored_response");
    }
    if let Some(plan) = prefix {
        let matched = plan.matched().get(pick.index).copied().unwrap_or(0);
        let _ = write!(
            out,
            "; matched={matched}/{}; shared={}",
            plan.blocks().len(),
            plan.shared
        );
        if plan.session_block.is_some() {
            let home = plan.session_home.map_or("none".to_owned(), |h| h.to_string());
            let _ = write!(out, "; session_home={home}");
        }
        let exact = &plan.scratch.get().exact;
        match (plan.exact, exact.get(pick.index).copied()) {
            (Some(e), Some(h)) if h != u32::MAX => {
                let _ = write!(out, "; kv=exact; kv_blocks={h}/{}; kv_tokens={}", e.blocks, e.tokens);
                if e.incomplete > 0 {
                    let _ = write!(out, "; kv_incomplete={}", e.incomplete);
                }
                // Every endpoint's own count, in pool order (`-`: not matched exactly).
                out.push_str("; kv_held=");
                for (i, h) in exact.iter().enumerate() {
                    if i > 0 {
                        out.push(',');
                    }
                    match h {
                        &u32::MAX => out.push('-'),
                        h => {
                            let _ = write!(out, "{h}");
                        }
                    }
                }
            }
            _ => out.push_str("; kv=approximate"),
        }
    }
    let _ = write!(out, "; endpoint={endpoint}");
    out
}

/// The routing decision's span attributes: the policy, its reason, the prompt blocks the
/// chosen endpoint held, the endpoint.
fn route_attributes(
    pool: &ModelPool,
    pick: Pick,
    prefix: Option<&PrefixPlan<'_>>,
    endpoint: &str,
) -> Vec<(&'static str, otel::Value)> {
    let mut a: Vec<(&'static str, otel::Value)> = vec![
        ("lmstack.route.policy", pool.policy.name().as_str().into()),
        ("lmstack.route.reason", pick.reason.as_str().into()),
        ("lmstack.route.endpoint", endpoint.to_owned().into()),
    ];
    if let Some(plan) = prefix {
        let matched = plan.matched().get(pick.index).copied().unwrap_or(0);
        a.push(("lmstack.route.matched_blocks", i64::from(matched).into()));
        a.push(("lmstack.route.prompt_blocks", (plan.blocks().len() as i64).into()));
        a.push(("lmstack.route.shared_blocks", i64::from(plan.shared).into()));
    }
    a
}

/// One attempt against one endpoint, on a pooled connection unless `attempt.fresh`. An
/// event stream's first attempt starts `streaming`; later ones continue it.
async fn exchange(
    ctx: &WorkerCtx,
    endpoint: &EndpointState,
    req: &Forward<'_>,
    wr: &mut WriteHalf,
    pm: &PairMetrics,
    attempt: &Attempt,
    streaming: &mut Option<Streaming>,
) -> Exchange {
    let lim = &ctx.limits;
    let first_byte = FirstByte::start(pm, &endpoint.load, attempt.uncached_blocks);
    let pooled = if attempt.fresh {
        None
    } else {
        ctx.pool.take(endpoint.addr)
    };
    let mut conn = match pooled {
        Some(conn) => conn,
        None => {
            let t0 = req.trace.and_then(RequestTrace::now);
            match upstream::connect(endpoint.addr, lim.connect_timeout).await {
                Ok(conn) => {
                    pm.connect();
                    if let Some(t) = req.trace {
                        t.connected(t0, &endpoint.authority, None);
                    }
                    conn
                }
                Err(error) => {
                    if let Some(t) = req.trace {
                        t.connected(t0, &endpoint.authority, Some(error.kind.label()));
                    }
                    return Exchange::Failed { error };
                }
            }
        }
    };
    let reused = conn.reused;
    let head = response::upstream_request(
        req.head,
        &endpoint.authority,
        attempt.body.len(),
        req.send_id.then_some(req.request_id),
        req.client,
        req.metered,
        attempt.traceparent.as_ref().map(|(tp, new)| (tp.as_str(), *new)),
    );
    let answered = crate::time::timeout(attempt.head_timeout, async {
        upstream::send(&mut conn, head, &attempt.body).await?;
        req.reached.set(true);
        upstream::read_head(&mut conn, &lim.response_head, false).await
    })
    .await;
    let up = match answered {
        Err(_) => {
            let error = ProxyError::new(
                ErrorKind::UpstreamTimeout,
                format!(
                    "the engine at {} did not answer within {} ms",
                    endpoint.url,
                    attempt.head_timeout.as_millis()
                ),
            );
            // vLLM answers a stream's head at once: an engine that has not is hung, and
            // another may take the request. A non-streaming request may still be running.
            let error = if req.stream { error.retry_elsewhere() } else { error };
            return Exchange::Failed { error };
        }
        Ok(Err(error)) if reused => {
            return Exchange::Failed {
                error: error.on_reused_connection(),
            };
        }
        Ok(Err(error)) => return Exchange::Failed { error },
        Ok(Ok(up)) => up,
    };
    let sse = up
        .headers
        .get_str("content-type")
        .is_some_and(|t| t.starts_with("text/event-stream"));
    let refused = streaming.is_some() && (up.status != 200 || !sse);
    // (A 504 may come from a gateway whose engine went on generating: not retried.)
    if refused || (matches!(up.status, 502 | 503) && !attempt.last_try) {
        // An engine that cannot take the request now (or a continuation) is not relayed
        // while another may take it.
        let what = if refused {
            "the stream's continuation"
        } else {
            "the request"
        };
        let error = ProxyError::new(
            ErrorKind::UpstreamUnavailable,
            format!("the engine at {} answered {} to {what}", endpoint.url, up.status),
        )
        .retry_elsewhere();
        return Exchange::Failed { error };
    }
    if req.stream && sse {
        return exchange_events(ctx, endpoint, req, wr, pm, attempt, conn, &up, &first_byte, streaming).await;
    }
    first_byte.mark();
    if let Some(t) = req.trace
        && let Some(now) = t.now()
    {
        t.first_token(now);
    }

    // The response head: from here on, failures can only cut the response short.
    let dechunk = up.framing == Framing::Chunked && req.head.version == Version::Http10;
    let delimited = up.framing != Framing::UntilClose && !dechunk;
    let keep_alive = req.head.keep_alive && delimited && !ctx.draining();
    let head_out = response::downstream_response(
        &up,
        if dechunk { BodyOut::Unframed } else { BodyOut::AsIs },
        keep_alive,
        req.head.version,
        Some(req.request_id),
        attempt.route.as_deref(),
        req.rate_headers,
    );
    let mut clock = StreamClock::new(req.started, pm, &first_byte);
    // A metered request's usage, read from the end of the body; a Responses answer's id,
    // from its start.
    let learn = req.learn && up.status == 200;
    let mut tail = if learn {
        Some(BodyTail::keeping_head())
    } else {
        (req.metered && up.status == 200).then(BodyTail::default)
    };
    let out = if dechunk {
        OutFraming::Dechunk
    } else {
        OutFraming::PassThrough
    };
    let relayed = relay::relay(
        &mut conn,
        wr,
        head_out,
        up.framing,
        out,
        sse.then_some(&mut clock),
        tail.as_mut(),
        lim.idle_timeout,
        lim.write_timeout,
    )
    .await;
    // The engine stored it whether or not the client got all of it.
    if learn
        && let Some(id) = tail
            .as_ref()
            .and_then(|t| lmstack_http::stored::body_response_id(t.head()))
    {
        stored::learn(ctx, endpoint, &id);
    }
    match relayed {
        Ok(r) => {
            if r.reusable && up.keep_alive {
                ctx.pool.put(endpoint.addr, conn);
            }
            Exchange::Done {
                status: up.status,
                keep_alive,
                usage: tail.and_then(|t| t.usage()),
            }
        }
        Err(RelayError::Downstream) => Exchange::Aborted {
            status: CLIENT_CLOSED,
            error: None,
        },
        Err(RelayError::Upstream(e)) => Exchange::Aborted {
            status: up.status,
            error: Some(e),
        },
    }
}

/// The event stream of a streaming request: the client's stream begins (its head) on the
/// first attempt and goes on with each continuation; it is ended here when the engine ends
/// it, and left open when the engine fails (the caller resumes or ends it).
#[allow(clippy::too_many_arguments)]
async fn exchange_events(
    ctx: &WorkerCtx,
    endpoint: &EndpointState,
    req: &Forward<'_>,
    wr: &mut WriteHalf,
    pm: &PairMetrics,
    attempt: &Attempt,
    mut conn: upstream::UpstreamConn,
    up: &lmstack_http::ResponseHead,
    first_byte: &FirstByte<'_>,
    streaming: &mut Option<Streaming>,
) -> Exchange {
    let lim = &ctx.limits;
    let resume = &ctx.shared.config.resume;
    let mut head = None;
    let s = match streaming {
        Some(s) => s,
        None => {
            let framing = if req.head.version == Version::Http10 {
                EventFraming::Raw
            } else {
                EventFraming::Chunked
            };
            let keep_alive = req.head.keep_alive && framing == EventFraming::Chunked && !ctx.draining();
            let body_out = match framing {
                EventFraming::Chunked => BodyOut::Chunked,
                EventFraming::Raw => BodyOut::Unframed,
            };
            head = Some(response::downstream_response(
                up,
                body_out,
                keep_alive,
                req.head.version,
                Some(req.request_id),
                attempt.route.as_deref(),
                req.rate_headers,
            ));
            streaming.insert(Streaming {
                ledger: req.api.filter(|_| up.status == 200).map(|api| {
                    let mut ledger = Ledger::new(api, req.keep_ids, resume.max_bytes);
                    if req.hide_usage {
                        ledger.hide_usage();
                    }
                    ledger
                }),
                messages_usage: (req.metered && req.dialect == Dialect::Anthropic && up.status == 200)
                    .then(StreamUsage::default),
                framing,
                status: up.status,
                keep_alive,
                last_event: None,
            })
        }
    };
    let mut clock = match s.last_event {
        Some(last) => StreamClock::resumed(last, pm, first_byte),
        None => StreamClock::new(req.started, pm, first_byte),
    };
    let learn_id = |id: &str| stored::learn(ctx, endpoint, id);
    let mut relay_state = EventRelay {
        head,
        framing: s.framing,
        ledger: s.ledger.as_mut(),
        on_response_id: (req.learn && up.status == 200).then_some(&learn_id as &dyn Fn(&str)),
        usage: s.messages_usage.as_mut(),
        clock: &mut clock,
        first_event_timeout: lim.first_byte_timeout,
        idle_timeout: lim.stream_idle_timeout,
        write_timeout: lim.write_timeout,
        max_event_bytes: lim.max_event_bytes,
    };
    let relayed = relay::relay_events(&mut conn, wr, up.framing, &mut relay_state).await;
    let head_unsent = relay_state.head.is_some();
    s.last_event = clock.last_event().or(s.last_event);
    if let (Some(t), Some(first)) = (req.trace, clock.first_event()) {
        t.first_token(first);
    }
    if head_unsent {
        // Nothing reached the client: as if the stream had not begun.
        *streaming = None;
        return match relayed {
            Err(RelayError::Upstream(error)) => Exchange::Failed {
                error: error.retry_elsewhere(),
            },
            _ => Exchange::Aborted {
                status: CLIENT_CLOSED,
                error: None,
            },
        };
    }
    // An OpenAI stream the engine ended before its end (no finish, no `[DONE]`) was cut.
    let relayed = match relayed {
        Ok(_) if s.ledger.as_ref().is_some_and(|l| !l.done() && !l.finished()) => Err(RelayError::Upstream(
            ProxyError::new(ErrorKind::UpstreamReset, "the engine ended the stream before its end"),
        )),
        other => other,
    };
    match relayed {
        Ok(r) => {
            if r.reusable && up.keep_alive {
                ctx.pool.put(endpoint.addr, conn);
            }
            match relay::end_events(wr, s.framing, lim.write_timeout).await {
                Ok(()) => Exchange::Done {
                    status: s.status,
                    keep_alive: s.keep_alive,
                    usage: s
                        .ledger
                        .as_ref()
                        .and_then(Ledger::usage)
                        .or_else(|| s.messages_usage.as_ref().and_then(StreamUsage::usage)),
                },
                Err(_) => Exchange::Aborted {
                    status: CLIENT_CLOSED,
                    error: None,
                },
            }
        }
        Err(RelayError::Downstream) => Exchange::Aborted {
            status: CLIENT_CLOSED,
            error: None,
        },
        Err(RelayError::Upstream(e)) => Exchange::Aborted {
            status: s.status,
            error: Some(e),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tenant_bodies_carry_the_salt_and_ask_for_usage_whatever_the_client_sent() {
        let cases = [
            (
                r#"{"model":"m","stream":true}"#,
                r#"{"model":"m","stream":true,"cache_salt":"s1","stream_options":{"include_usage":true}}"#,
            ),
            (
                r#"{"model":"m","cache_salt":"mine","stream_options":{"continuous_usage_stats":true}}"#,
                r#"{"cache_salt":"s1","model":"m","stream_options":{"continuous_usage_stats":false,"include_usage":true}}"#,
            ),
        ];
        for (body, want) in cases {
            let body = Bytes::from(body);
            let peek = lmstack_http::peek(&body, None).unwrap();
            let out = tenant_body(&body, &peek, Some("s1"), true).unwrap();
            let got: serde_json::Value = serde_json::from_slice(&out).unwrap();
            let want: serde_json::Value = serde_json::from_str(want).unwrap();
            assert_eq!(got, want);
            // vLLM reads the last of repeated members: no member appears twice.
            let text = std::str::from_utf8(&out).unwrap();
            assert_eq!(text.matches("cache_salt").count(), 1, "{text}");
        }
    }

    #[test]
    fn reservations_are_refunded_only_when_no_engine_had_the_request() {
        let usage = Usage {
            prompt_tokens: 3,
            completion_tokens: 4,
        };
        // The client left while the request waited, or no endpoint took it: refunded.
        assert_eq!(settled_usage(None, false), Some((0, 0)));
        assert_eq!(settled_usage(Some(usage), false), Some((0, 0)));
        // Sent: charged by the usage, or the reservation stands.
        assert_eq!(settled_usage(Some(usage), true), Some((3, 4)));
        assert_eq!(settled_usage(None, true), None);
    }

    #[test]
    fn targets() {
        assert!(matches!(target("POST", "/v1/chat/completions"), Target::Model));
        assert!(matches!(target("POST", "/v1/messages"), Target::Model));
        assert!(matches!(target("POST", "/v1/messages/count_tokens"), Target::Model));
        assert!(matches!(
            target("GET", "/v1/messages"),
            Target::Missing(ErrorKind::MethodNotAllowed)
        ));
        assert!(matches!(target("GET", "/v1/models"), Target::Local(Local::Models)));
        assert!(matches!(
            target("GET", "/v1/completions"),
            Target::Missing(ErrorKind::MethodNotAllowed)
        ));
        assert!(matches!(
            target("POST", "/health"),
            Target::Missing(ErrorKind::MethodNotAllowed)
        ));
        assert!(matches!(target("GET", "/nope"), Target::Missing(ErrorKind::NotFound)));
        assert!(matches!(
            target("GET", "/v1/responses/resp_1"),
            Target::Stored(StoredRoute::Retrieve("resp_1"))
        ));
        assert!(matches!(
            target("POST", "/v1/responses/resp_1/cancel"),
            Target::Stored(StoredRoute::Cancel("resp_1"))
        ));
        assert!(matches!(
            target("DELETE", "/v1/responses/resp_1"),
            Target::Missing(ErrorKind::MethodNotAllowed)
        ));
        assert!(matches!(target("POST", "/v1/responses"), Target::Model));
    }
}
