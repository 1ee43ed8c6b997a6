//! The simulator's OpenAI surface: vLLM's routes, request checks, response bodies and SSE
//! chunk shapes (with `return_token_ids`), Anthropic's Messages API as vLLM serves it (the
//! request converted to the chat request vLLM renders, so a conversation's turns share their
//! cached prefix; vLLM's message and event shapes), and vLLM's KV-event routes (`/kv_event_sources`,
//! `/reset_prefix_cache`), with the simulator's own fault injection: `/sim/kv_events` for KV
//! events, `/sim/fault` for requests (fault.rs). Costs come from the engine (engine.rs), the
//! answers' tokens from the greedy decoder (greedy.rs); this file only shapes answers.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full, Limited, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper::{Method, Request, Response, StatusCode};
use metrics_exporter_prometheus::PrometheusHandle;
use serde_json::{Value, json};
use tokio::sync::mpsc;
use tokio::time::Instant;

use super::engine::{AdmitError, Engine};
use super::fault::{FaultKind, FaultSpec, Faults, Fire, Stage, Tap};
use super::greedy::{self, Greedy};
use super::kv::BlockExtras;
use super::kv_events::{Fault, Publisher, RequestKv};
use super::metrics::FinishReason;
use super::responses::{self, Store};
use super::tokens::{self, Tokenizer};
use super::{ReportMode, SimArgs};

pub type Body = BoxBody<Bytes, Infallible>;

pub struct Sim {
    pub name: String,
    pub(super) args: SimArgs,
    pub(super) engine: Arc<Engine>,
    prometheus: PrometheusHandle,
    pub(super) tokenizer: Tokenizer,
    /// Stored Responses (responses.rs).
    pub(super) responses: Store,
    publisher: Option<Publisher>,
    faults: Faults,
    created: u64,
    seq: AtomicU64,
}

impl Sim {
    pub fn new(
        args: SimArgs,
        bound: SocketAddr,
        engine: Arc<Engine>,
        prometheus: PrometheusHandle,
        tokenizer: Tokenizer,
        publisher: Option<Publisher>,
    ) -> Self {
        let faults = Faults::default();
        if let Some(spec) = &args.fault {
            faults.arm(spec.clone());
        }
        Self {
            name: args.name.clone().unwrap_or_else(|| bound.to_string()),
            responses: Store::new(args.max_stored_responses),
            args,
            engine,
            prometheus,
            tokenizer,
            publisher,
            faults,
            created: SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs()),
            seq: AtomicU64::new(1),
        }
    }

    /// What a generation request's blocks are hashed with and announce, as vLLM takes it from
    /// the request: its LoRA adapter (the model it names), its `cache_salt`, and its
    /// `vllm_xargs.kv_cache_report_mode`.
    pub(super) fn request_kv(&self, model: &str, req: &Value) -> RequestKv {
        let lora = self.args.loras.iter().position(|l| l == model);
        let report = req.pointer("/vllm_xargs/kv_cache_report_mode").and_then(Value::as_str);
        RequestKv {
            extras: BlockExtras {
                lora_name: lora.map(|_| model.to_owned()),
                cache_salt: req.get("cache_salt").and_then(Value::as_str).map(str::to_owned),
            },
            // vLLM numbers adapters from 1.
            lora_id: lora.map(|i| i as i64 + 1),
            report_cached: match report {
                Some(mode) => mode == "full",
                None => self.args.kv_cache_report_mode == ReportMode::Full,
            },
        }
    }

    fn serves(&self, model: &str) -> bool {
        self.args.models.iter().chain(&self.args.loras).any(|m| m == model)
    }

    pub(super) fn next_id(&self) -> u64 {
        // Distinct across engines too: mix in the engine name.
        let n = self.seq.fetch_add(1, Ordering::Relaxed);
        xxhash_rust::xxh3::xxh3_64_with_seed(self.name.as_bytes(), n)
    }
}

pub(super) fn now_unix() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

pub(super) fn full(status: StatusCode, content_type: &str, body: impl Into<Bytes>, engine: &str) -> Response<Body> {
    let mut r = Response::new(Full::new(body.into()).boxed());
    *r.status_mut() = status;
    let h = r.headers_mut();
    if let Ok(v) = content_type.parse() {
        h.insert(hyper::header::CONTENT_TYPE, v);
    }
    if let Ok(v) = engine.parse() {
        h.insert("x-sim-engine", v);
    }
    r
}

pub(super) fn json_response(status: StatusCode, body: &Value, engine: &str) -> Response<Body> {
    full(status, "application/json", body.to_string(), engine)
}

/// vLLM's error shape: `{"error": {"message", "type", "param", "code"}}`.
pub(super) fn error(
    status: StatusCode,
    kind: &str,
    message: impl Into<String>,
    param: Option<&str>,
    engine: &str,
) -> Response<Body> {
    json_response(
        status,
        &json!({"error": {"message": message.into(), "type": kind, "param": param, "code": status.as_u16()}}),
        engine,
    )
}

pub(super) fn bad_request(message: impl Into<String>, engine: &str) -> Response<Body> {
    error(StatusCode::BAD_REQUEST, "BadRequestError", message, None, engine)
}

/// vLLM's 404 for a model it does not serve.
fn unknown_model(model: &str, engine: &str) -> Response<Body> {
    error(
        StatusCode::NOT_FOUND,
        "NotFoundError",
        format!("The model `{model}` does not exist."),
        Some("model"),
        engine,
    )
}

/// The routes a router forwards (those `/sim/fault`'s before-head faults match).
const MODEL_ROUTES: &[&str] = &[
    "/v1/completions",
    "/v1/chat/completions",
    "/v1/responses",
    "/v1/embeddings",
    "/pooling",
    "/v1/rerank",
    "/rerank",
    "/v2/rerank",
    "/v1/score",
    "/score",
    "/tokenize",
    "/detokenize",
    "/v1/messages",
    "/v1/messages/count_tokens",
    "/invocations",
    "/v1/audio/transcriptions",
    "/v1/audio/translations",
];

/// Serves one request of the connection `tap` belongs to.
pub async fn handle(sim: Arc<Sim>, tap: Arc<Tap>, req: Request<Incoming>) -> Result<Response<Body>, Infallible> {
    // Prefill is timed from here (the head has arrived), not from after the body is parsed and
    // tokenised, so that TTFT seen on the wire matches the configured delays closely.
    let arrived = Instant::now();
    let name = sim.name.clone();
    let (parts, body) = req.into_parts();
    let path = parts.uri.path().to_owned();
    let response = match (parts.method.clone(), path.as_str()) {
        (Method::GET, "/health") => full(StatusCode::OK, "application/json", "", &name),
        (Method::GET, "/ping") => full(StatusCode::OK, "application/json", "", &name),
        (Method::GET, "/version") => json_response(StatusCode::OK, &json!({"version": "0.32.0+lmstack-sim"}), &name),
        (Method::GET, "/metrics") => full(
            StatusCode::OK,
            "text/plain; version=0.0.4; charset=utf-8",
            sim.prometheus.render(),
            &name,
        ),
        (Method::GET, "/v1/models") => json_response(StatusCode::OK, &models(&sim), &name),
        (Method::GET, "/sim/fault") => json_response(StatusCode::OK, &sim.faults.report(), &name),
        (Method::GET, "/kv_event_sources") => match &sim.publisher {
            Some(p) => json_response(StatusCode::OK, p.sources(), &name),
            None => error(StatusCode::NOT_FOUND, "NotFoundError", "Not Found", None, &name),
        },
        (Method::POST, "/reset_prefix_cache") => reset_prefix_cache(&sim, parts.uri.query()),
        // Stored Responses, named in the path (no body, no model).
        (Method::GET, p) if p.starts_with("/v1/responses/") => responses::retrieve(&sim, &p["/v1/responses/".len()..]),
        (Method::POST, p) if p.starts_with("/v1/responses/") && p.ends_with("/cancel") => {
            responses::cancel(&sim, &p["/v1/responses/".len()..p.len() - "/cancel".len()])
        }
        (Method::POST, _) => {
            let bytes = match Limited::new(body, sim.args.max_body_bytes).collect().await {
                Ok(b) => b.to_bytes(),
                Err(e) => {
                    return Ok(error(
                        StatusCode::PAYLOAD_TOO_LARGE,
                        "BadRequestError",
                        format!("cannot read the body: {e}"),
                        None,
                        &name,
                    ));
                }
            };
            if MODEL_ROUTES.contains(&path.as_str())
                && let Some(fire) = sim.faults.take(Stage::Request)
            {
                return Ok(before_head(&sim, &tap, fire));
            }
            if path.starts_with("/v1/audio/") {
                return Ok(audio(&sim, &parts.headers, bytes).await);
            }
            let mut request: Value = match serde_json::from_slice(&bytes) {
                Ok(v @ Value::Object(_)) => v,
                Ok(_) => return Ok(bad_request("the body must be a JSON object", &name)),
                Err(e) => return Ok(bad_request(format!("invalid JSON: {e}"), &name)),
            };
            // SageMaker's adapter header names the model of an `/invocations` body (vLLM's
            // `inject_adapter_id`).
            if path == "/invocations"
                && let Some(adapter) = parts.headers.get("x-amzn-sagemaker-adapter-identifier")
                && let Ok(adapter) = adapter.to_str()
            {
                request["model"] = Value::String(adapter.to_owned());
            }
            post(&sim, &tap, &path, &bytes, request, arrived).await
        }
        _ => error(StatusCode::NOT_FOUND, "NotFoundError", "Not Found", None, &name),
    };
    Ok(response)
}

fn models(sim: &Sim) -> Value {
    let base = &sim.args.models[0];
    let card = |id: &str, parent: Option<&str>| {
        json!({
            "id": id,
            "object": "model",
            "created": sim.created,
            "owned_by": "vllm",
            "root": parent.unwrap_or(id),
            "parent": parent,
            "max_model_len": sim.args.max_model_len,
            "permission": [],
        })
    };
    let data: Vec<Value> = sim
        .args
        .models
        .iter()
        .map(|m| card(m, None))
        .chain(sim.args.loras.iter().map(|l| card(l, Some(base))))
        .collect();
    json!({"object": "list", "data": data})
}

/// vLLM's `POST /reset_prefix_cache` (a development route there): `{"success": false}` while
/// any request holds blocks. The simulator cannot preempt, so it refuses
/// `reset_running_requests=true`.
fn reset_prefix_cache(sim: &Sim, query: Option<&str>) -> Response<Body> {
    let preempt = query
        .unwrap_or("")
        .split('&')
        .any(|kv| kv.eq_ignore_ascii_case("reset_running_requests=true"));
    if preempt {
        return bad_request(
            "the simulator cannot preempt running requests (reset_running_requests)",
            &sim.name,
        );
    }
    let success = sim.engine.reset_prefix_cache();
    json_response(StatusCode::OK, &json!({"success": success}), &sim.name)
}

/// `POST /sim/kv_events`: `{"skip": N}` loses the next N batches on the wire (they stay in the
/// replay buffer), `{"pause": true|false}` stops or restarts sending.
fn inject_fault(sim: &Sim, req: Value) -> Response<Body> {
    let Some(publisher) = &sim.publisher else {
        return error(
            StatusCode::NOT_FOUND,
            "NotFoundError",
            "KV events are off (--kv-events-port)",
            None,
            &sim.name,
        );
    };
    match serde_json::from_value::<Fault>(req) {
        Ok(fault) => {
            publisher.inject(fault);
            json_response(StatusCode::OK, &json!(fault), &sim.name)
        }
        Err(e) => bad_request(format!("expected {{\"skip\": N, \"pause\": bool}}: {e}"), &sim.name),
    }
}

/// The answer to a request a before-head fault matched: `status`'s error, or a response the
/// connection never writes (its socket carries the fault out instead).
fn before_head(sim: &Sim, tap: &Tap, fire: Fire) -> Response<Body> {
    if fire.kind != FaultKind::Status {
        tap.arm(fire);
        return full(StatusCode::INTERNAL_SERVER_ERROR, "text/plain", "", &sim.name);
    }
    fire.fired();
    let status = StatusCode::from_u16(fire.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    // vLLM's error types by status (`create_error_response`).
    let kind = match status.as_u16() {
        400 => "BadRequestError",
        404 => "NotFoundError",
        422 => "UnprocessableEntityError",
        501 => "NotImplementedError",
        503 => "ServiceUnavailableError",
        500..=599 => "InternalServerError",
        _ => status.canonical_reason().unwrap_or("Error"),
    };
    error(
        status,
        kind,
        format!("simulated fault: status {status}"),
        None,
        &sim.name,
    )
}

/// `POST /sim/fault`: arms a fault (fault.rs), `{"kind": "none"}` clears it; answers with
/// what `GET /sim/fault` shows.
fn arm_fault(sim: &Sim, req: Value) -> Response<Body> {
    let spec = serde_json::from_value::<FaultSpec>(req)
        .map_err(|e| e.to_string())
        .and_then(|spec| spec.validate().map(|()| spec));
    match spec {
        Ok(spec) => {
            sim.faults.arm(spec);
            json_response(StatusCode::OK, &sim.faults.report(), &sim.name)
        }
        Err(e) => bad_request(
            format!(r#"expected {{"kind": K, "after_events": N, "count": C, "status": S}}: {e}"#),
            &sim.name,
        ),
    }
}

async fn post(sim: &Arc<Sim>, tap: &Tap, path: &str, body: &[u8], req: Value, arrived: Instant) -> Response<Body> {
    let name = &sim.name;
    match path {
        "/sim/kv_events" => return inject_fault(sim, req),
        "/sim/fault" => return arm_fault(sim, req),
        _ => {}
    }
    let model = match req.get("model") {
        Some(Value::String(m)) => m.clone(),
        None if path == "/tokenize" || path == "/detokenize" => sim.args.models[0].clone(),
        _ => return bad_request("`model` is required", name),
    };
    if path.starts_with("/v1/messages") {
        return messages(sim, tap, path, model, body, &req, arrived).await;
    }
    if !sim.serves(&model) {
        return unknown_model(&model, name);
    }
    let tokenizer = &sim.tokenizer;
    // SageMaker's `/invocations`: vLLM serves the first request type the body validates as.
    let path = match path {
        "/invocations" if req.get("messages").is_some() => "/v1/chat/completions",
        "/invocations" if req.get("prompt").is_some() => "/v1/completions",
        "/invocations" if req.get("input").is_some() => "/v1/embeddings",
        "/invocations" => return bad_request("Cannot find suitable handler for request", name),
        other => other,
    };
    match path {
        "/v1/completions" => match tokenizer.completion(body, &req) {
            Ok(t) => generate(sim, tap, Kind::Completion, model, t, &req, arrived).await,
            Err(e) => bad_request(e, name),
        },
        "/v1/chat/completions" => match tokenizer.chat(body, &req) {
            Ok(t) => generate(sim, tap, Kind::Chat, model, t, &req, arrived).await,
            Err(e) => bad_request(e, name),
        },
        "/v1/responses" => responses::create(sim, model, req, arrived).await,
        "/v1/embeddings" | "/pooling" => embeddings(sim, model, &req).await,
        "/v1/rerank" | "/rerank" | "/v2/rerank" => rerank(sim, model, &req).await,
        "/v1/score" | "/score" => score(sim, model, &req).await,
        "/tokenize" => {
            let tokens = match (req.get("prompt"), req.get("messages")) {
                (Some(Value::String(_)), _) => tokenizer.completion(body, &req),
                (_, Some(_)) => tokenizer.chat(body, &req),
                _ => Err("`prompt` or `messages` is required".to_owned()),
            };
            match tokens {
                Ok(t) => json_response(
                    StatusCode::OK,
                    &json!({"count": t.len(), "max_model_len": sim.args.max_model_len, "tokens": t, "token_strs": null}),
                    name,
                ),
                Err(e) => bad_request(e, name),
            }
        }
        "/detokenize" => match req.get("tokens").and_then(Value::as_array) {
            Some(ids) => {
                // Output ids as their pieces, prompt ids as `<id>`.
                let ids: Vec<u32> = ids
                    .iter()
                    .filter_map(|v| v.as_u64().and_then(|id| u32::try_from(id).ok()))
                    .collect();
                json_response(StatusCode::OK, &json!({"prompt": greedy::text(&ids)}), name)
            }
            None => bad_request("`tokens` is required", name),
        },
        _ => error(StatusCode::NOT_FOUND, "NotFoundError", "Not Found", None, name),
    }
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Kind {
    Completion,
    Chat,
    /// Anthropic's Messages API.
    Messages,
}

/// vLLM's Anthropic error shape (`translate_error_response`: vLLM's error type inside).
fn anthropic_error(status: StatusCode, kind: &str, message: impl Into<String>, engine: &str) -> Response<Body> {
    json_response(
        status,
        &json!({"type": "error", "error": {"type": kind, "message": message.into()}}),
        engine,
    )
}

/// `/v1/messages` and `/v1/messages/count_tokens`: the request converted as vLLM converts it
/// (`lmstack_http::anthropic`), its prompt the chat request's, rendered and tokenized as a
/// chat's.
async fn messages(
    sim: &Arc<Sim>,
    tap: &Tap,
    path: &str,
    model: String,
    body: &[u8],
    req: &Value,
    arrived: Instant,
) -> Response<Body> {
    let name = &sim.name;
    if !sim.serves(&model) {
        return anthropic_error(
            StatusCode::NOT_FOUND,
            "NotFoundError",
            format!("The model `{model}` does not exist."),
            name,
        );
    }
    let prompt = lmstack_http::anthropic::to_chat_approx(body)
        .map_err(|e| e.to_string())
        .and_then(|chat| {
            let parsed: Value = serde_json::from_slice(&chat).map_err(|e| e.to_string())?;
            sim.tokenizer.chat(&chat, &parsed)
        });
    let prompt = match prompt {
        Ok(p) => p,
        Err(e) => return anthropic_error(StatusCode::BAD_REQUEST, "BadRequestError", e, name),
    };
    if path == "/v1/messages/count_tokens" {
        let n = prompt.len();
        return json_response(
            StatusCode::OK,
            &json!({"input_tokens": n, "context_management": {"original_input_tokens": n}}),
            name,
        );
    }
    if path != "/v1/messages" {
        return error(StatusCode::NOT_FOUND, "NotFoundError", "Not Found", None, name);
    }
    match req.get("max_tokens").and_then(Value::as_u64) {
        Some(n) if n > 0 => generate(sim, tap, Kind::Messages, model, prompt, req, arrived).await,
        _ => anthropic_error(
            StatusCode::BAD_REQUEST,
            "BadRequestError",
            "max_tokens: a positive integer is required",
            name,
        ),
    }
}

/// vLLM's `system_fingerprint`, for this simulator.
const FINGERPRINT: &str = "vllm-0.32.0-lmstack-sim";
const FINGERPRINT_FIELD: &str = r#","system_fingerprint":"vllm-0.32.0-lmstack-sim""#;

fn admit_error(e: AdmitError, name: &str) -> Response<Body> {
    bad_request(e.to_string(), name)
}

fn usage(prompt: usize, completion: usize, cached: usize) -> Value {
    json!({
        "prompt_tokens": prompt,
        "total_tokens": prompt + completion,
        "completion_tokens": completion,
        "prompt_tokens_details": {"cached_tokens": cached},
    })
}

/// A Messages usage as vLLM writes it with the prompt's token details on (as the simulator's
/// OpenAI usage always has them): `input_tokens` less the tokens read from the cache, which
/// are `cache_read_input_tokens`.
fn anthropic_usage(prompt: usize, completion: usize, cached: usize) -> Value {
    json!({
        "input_tokens": prompt.saturating_sub(cached),
        "output_tokens": completion,
        "cache_read_input_tokens": cached,
    })
}

/// `"return_token_ids": true` fields, as vLLM 0.32 writes them.
fn ids_json(ids: &[u32]) -> String {
    serde_json::to_string(ids).unwrap_or_default()
}

async fn generate(
    sim: &Arc<Sim>,
    tap: &Tap,
    kind: Kind,
    model: String,
    prompt: Vec<u32>,
    req: &Value,
    arrived: Instant,
) -> Response<Body> {
    let name = sim.name.clone();
    let max_tokens = ["max_tokens", "max_completion_tokens", "max_output_tokens"]
        .iter()
        .find_map(|k| req.get(*k).and_then(Value::as_u64))
        .map_or(sim.args.default_max_tokens, |n| n as usize);
    if max_tokens == 0 {
        return bad_request("max_tokens must be at least 1", &name);
    }
    let stream = req.get("stream").and_then(Value::as_bool).unwrap_or(false);
    let include_usage = req
        .pointer("/stream_options/include_usage")
        .and_then(Value::as_bool)
        .unwrap_or(false);
    let return_token_ids = req.get("return_token_ids").and_then(Value::as_bool) == Some(true);
    let role = Value::String(tokens::answer_role(req).to_owned());
    let kv = sim.request_kv(&model, req);
    let (lease, admitted) = match sim.engine.admit(&prompt, max_tokens, arrived, &kv).await {
        Ok(a) => a,
        Err(e) => return admit_error(e, &name),
    };
    // The answer is a function of the prompt (greedy.rs); the id only names the request.
    let mut decoder = Greedy::after(&prompt);
    let seed = sim.next_id();
    let id = match kind {
        Kind::Completion => format!("cmpl-{seed:016x}"),
        // (vLLM's Messages responses carry the chat completion's id.)
        Kind::Chat | Kind::Messages => format!("chatcmpl-{seed:016x}"),
    };
    let created = now_unix();
    let metrics = sim.engine.metrics.clone();
    metrics.queue_time.record(admitted.queued.as_secs_f64());
    let engine = sim.engine.clone();

    if !stream {
        tokio::time::sleep_until(admitted.first_token_at).await;
        let first = Instant::now();
        metrics.ttft.record(first.duration_since(arrived).as_secs_f64());
        metrics
            .prefill_time
            .record(admitted.first_token_at.duration_since(arrived).as_secs_f64() - admitted.queued.as_secs_f64());
        let mut ids = Vec::with_capacity(max_tokens);
        let mut at = first;
        for i in 0..max_tokens {
            if i > 0 {
                at += engine.decode_delay();
                tokio::time::sleep_until(at).await;
            }
            ids.extend(decoder.next());
        }
        let text = greedy::text(&ids);
        metrics.generation_tokens.increment(max_tokens as u64);
        metrics.decode_time.record(at.duration_since(first).as_secs_f64());
        metrics.e2e.record(arrived.elapsed().as_secs_f64());
        metrics.finished(FinishReason::Length);
        drop(lease);
        let u = usage(admitted.prompt_tokens, max_tokens, admitted.cached_tokens);
        let mut body = match kind {
            Kind::Completion => json!({
                "id": id, "object": "text_completion", "created": created, "model": model,
                "choices": [{"index": 0, "text": text, "logprobs": null, "finish_reason": "length",
                             "stop_reason": null, "prompt_logprobs": null}],
                "usage": u, "system_fingerprint": FINGERPRINT,
            }),
            Kind::Chat => json!({
                "id": id, "object": "chat.completion", "created": created, "model": model,
                "choices": [{"index": 0, "message": {"role": role, "content": text, "tool_calls": []},
                             "logprobs": null, "finish_reason": "length", "stop_reason": null}],
                "usage": u, "prompt_logprobs": null, "system_fingerprint": FINGERPRINT,
            }),
            // `stop_sequence` left out when null.
            Kind::Messages => json!({
                "id": id, "type": "message", "role": "assistant",
                "content": [{"type": "text", "text": text}], "model": model,
                "stop_reason": "max_tokens",
                "usage": anthropic_usage(admitted.prompt_tokens, max_tokens, admitted.cached_tokens),
            }),
        };
        // vLLM: the output ids on the choice; the prompt's on the choice of a completion, at
        // the top of a chat completion.
        if return_token_ids && matches!(kind, Kind::Completion | Kind::Chat) {
            body["choices"][0]["token_ids"] = json!(ids);
            let prompt_at = if kind == Kind::Chat {
                &mut body
            } else {
                &mut body["choices"][0]
            };
            prompt_at["prompt_token_ids"] = json!(prompt);
        }
        return json_response(StatusCode::OK, &body, &name);
    }

    // Streaming: one SSE event per token, sent as chunked frames as the engine makes them.
    if let Some(fire) = sim.faults.take(Stage::Stream) {
        tap.arm(fire);
    }
    let (tx, rx) = mpsc::channel::<Bytes>(64);
    let model_json = Value::String(model).to_string();
    tokio::spawn(async move {
        let _lease = lease;
        let send = |event: String| {
            let tx = tx.clone();
            async move { tx.send(Bytes::from(format!("data: {event}\n\n"))).await.is_ok() }
        };
        // Anthropic's events are named (vLLM's `wrap_data_with_event`).
        let send_named = |name: &'static str, data: String| {
            let tx = tx.clone();
            async move {
                tx.send(Bytes::from(format!("event: {name}\ndata: {data}\n\n")))
                    .await
                    .is_ok()
            }
        };
        let object = if kind == Kind::Chat {
            "chat.completion.chunk"
        } else {
            "text_completion"
        };
        let head = format!(r#""id":"{id}","object":"{object}","created":{created},"model":{model_json}"#);
        if !sleep_unless_gone(&tx, admitted.first_token_at, engine.precise_timers()).await {
            metrics.finished(FinishReason::Abort);
            return;
        }
        let first = Instant::now();
        metrics.ttft.record(first.duration_since(arrived).as_secs_f64());
        if kind == Kind::Messages {
            // vLLM's first chunk (the role's) becomes `message_start`, with the prompt's
            // tokens; the first text opens a text block.
            let start = format!(
                r#"{{"type":"message_start","message":{{"id":"{id}","type":"message","role":"assistant","content":[],"model":{model_json},"stop_reason":null,"stop_sequence":null,"usage":{}}}}}"#,
                anthropic_usage(admitted.prompt_tokens, 0, admitted.cached_tokens)
            );
            let block = r#"{"type":"content_block_start","content_block":{"type":"text","text":""},"index":0}"#;
            if !send_named("message_start", start).await || !send_named("content_block_start", block.to_owned()).await {
                metrics.finished(FinishReason::Abort);
                return;
            }
        }
        if kind == Kind::Chat {
            // As vLLM: the prompt's ids ride on the role chunk, at the top.
            let prompt_ids = if return_token_ids {
                format!(r#","prompt_token_ids":{},"prompt_text":null"#, ids_json(&prompt))
            } else {
                String::new()
            };
            let role = format!(
                r#"{{{head},"choices":[{{"index":0,"delta":{{"role":{role},"content":""}},"logprobs":null,"finish_reason":null}}]{prompt_ids}}}"#
            );
            if !send(role).await {
                metrics.finished(FinishReason::Abort);
                return;
            }
        }
        let mut at = first;
        let mut last_sent = first;
        let mut piece = String::with_capacity(greedy::PIECE_LEN);
        for i in 0..max_tokens {
            if i > 0 {
                at += engine.decode_delay();
                if !sleep_unless_gone(&tx, at, engine.precise_timers()).await {
                    metrics.generation_tokens.increment(i as u64);
                    metrics.finished(FinishReason::Abort);
                    return;
                }
            }
            let token = decoder.next().unwrap_or_default();
            piece.clear();
            greedy::push_piece(&mut piece, token);
            let last = i + 1 == max_tokens;
            // As vLLM: the last token carries the finish reason (and, for chat, the stop
            // reason) and the chunk the system fingerprint.
            let (finish, stop, fingerprint) = if last {
                (r#""length""#, r#","stop_reason":null"#, FINGERPRINT_FIELD)
            } else {
                ("null", "", "")
            };
            // `return_token_ids`: every choice carries its token; a completion's first one the
            // prompt's ids too (later ones a null).
            let ids = match (return_token_ids, kind, i) {
                (false, _, _) => String::new(),
                (true, Kind::Chat, _) => format!(r#","token_ids":[{token}]"#),
                (true, _, 0) => format!(r#","prompt_token_ids":{},"token_ids":[{token}]"#, ids_json(&prompt)),
                (true, _, _) => format!(r#","prompt_token_ids":null,"token_ids":[{token}]"#),
            };
            let sent = match kind {
                Kind::Chat => send(format!(
                    r#"{{{head},"choices":[{{"index":0,"delta":{{"content":"{piece}"}},"logprobs":null,"finish_reason":{finish}{stop}{ids}}}]{fingerprint}}}"#
                )).await,
                Kind::Messages => send_named("content_block_delta", format!(
                    r#"{{"type":"content_block_delta","delta":{{"type":"text_delta","text":"{piece}"}},"index":0}}"#
                )).await,
                _ => send(format!(
                    r#"{{{head},"choices":[{{"index":0,"text":"{piece}","logprobs":null,"finish_reason":{finish},"stop_reason":null{ids}}}]{fingerprint}}}"#
                )).await,
            };
            if !sent {
                metrics.generation_tokens.increment(i as u64);
                metrics.finished(FinishReason::Abort);
                return;
            }
            let now = Instant::now();
            if i > 0 {
                metrics.itl.record(now.duration_since(last_sent).as_secs_f64());
            }
            last_sent = now;
        }
        metrics.generation_tokens.increment(max_tokens as u64);
        metrics.decode_time.record(at.duration_since(first).as_secs_f64());
        if kind == Kind::Messages {
            // vLLM's usage chunk closes the block and becomes `message_delta`; `[DONE]`
            // becomes `message_stop`.
            let delta = format!(
                r#"{{"type":"message_delta","delta":{{"stop_reason":"max_tokens","stop_sequence":null}},"usage":{}}}"#,
                anthropic_usage(admitted.prompt_tokens, max_tokens, admitted.cached_tokens)
            );
            let stop = r#"{"type":"content_block_stop","index":0}"#.to_owned();
            let ended = send_named("content_block_stop", stop).await
                && send_named("message_delta", delta).await
                && send_named("message_stop", r#"{"type":"message_stop"}"#.to_owned()).await;
            metrics.e2e.record(arrived.elapsed().as_secs_f64());
            metrics.finished(if ended {
                FinishReason::Length
            } else {
                FinishReason::Abort
            });
            return;
        }
        if include_usage {
            let u = usage(admitted.prompt_tokens, max_tokens, admitted.cached_tokens);
            if !send(format!(r#"{{{head},"choices":[],"usage":{u}{FINGERPRINT_FIELD}}}"#)).await {
                metrics.finished(FinishReason::Abort);
                return;
            }
        }
        let _ = tx.send(Bytes::from_static(b"data: [DONE]\n\n")).await;
        metrics.e2e.record(arrived.elapsed().as_secs_f64());
        metrics.finished(FinishReason::Length);
    });
    event_stream(rx, &name)
}

/// An SSE response whose events are what `rx` receives, until its sender is dropped.
pub(super) fn event_stream(rx: mpsc::Receiver<Bytes>, name: &str) -> Response<Body> {
    let stream = futures_util::stream::unfold(rx, |mut rx| async move {
        rx.recv().await.map(|b| (Ok::<_, Infallible>(Frame::data(b)), rx))
    });
    let mut r = Response::new(StreamBody::new(stream).boxed());
    let h = r.headers_mut();
    h.insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_static("text/event-stream; charset=utf-8"),
    );
    if let Ok(v) = name.parse() {
        h.insert("x-sim-engine", v);
    }
    r
}

/// Sleeps until `at`; false if the client went away (the stream's receiver was dropped).
async fn sleep_unless_gone(tx: &mpsc::Sender<Bytes>, at: Instant, precise: bool) -> bool {
    tokio::select! {
        _ = sleep_until(at, precise) => true,
        _ = tx.closed() => false,
    }
}

/// Sleeps until `at`: on tokio's timer (a millisecond's resolution, rounding up), or when
/// `precise`, on it until 2 ms before and then on a blocking-pool thread.
async fn sleep_until(at: Instant, precise: bool) {
    if !precise {
        return tokio::time::sleep_until(at).await;
    }
    tokio::time::sleep_until(at - Duration::from_millis(2)).await;
    let rest = at.saturating_duration_since(Instant::now());
    if !rest.is_zero() {
        let _ = tokio::task::spawn_blocking(move || std::thread::sleep(rest)).await;
    }
}

/// Inputs of an embeddings request: a string, strings, or token id lists.
fn inputs(req: &Value, tokenizer: &Tokenizer, cpt: usize) -> Result<Vec<Vec<u32>>, String> {
    match req.get("input") {
        Some(Value::String(s)) => Ok(vec![tokenizer.text(s)?]),
        Some(Value::Array(items)) if !items.is_empty() => items
            .iter()
            .map(|i| match i {
                Value::String(s) => tokenizer.text(s),
                other => tokens::prompt_tokens(other, cpt),
            })
            .collect::<Result<_, _>>()
            .or_else(|_| tokens::prompt_tokens(&Value::Array(items.clone()), cpt).map(|t| vec![t])),
        _ => Err("`input` must be a string or a non-empty list".into()),
    }
}

fn vector(tokens: &[u32], dim: usize) -> Vec<f64> {
    let seed = tokens.iter().fold(0u64, |h, t| h.rotate_left(7) ^ u64::from(*t));
    let raw: Vec<f64> = (0..dim)
        .map(|i| (xxhash_rust::xxh3::xxh3_64_with_seed(&(i as u64).to_le_bytes(), seed) % 2001) as f64 / 1000.0 - 1.0)
        .collect();
    let norm = raw.iter().map(|x| x * x).sum::<f64>().sqrt().max(1e-9);
    raw.into_iter().map(|x| x / norm).collect()
}

/// Runs the prefill cost of `prompt` and waits for it, as a pooling request would.
async fn prefill(sim: &Sim, prompt: &[u32]) -> Result<(), AdmitError> {
    let (lease, admitted) = sim
        .engine
        .admit(prompt, 1, Instant::now(), &RequestKv::default())
        .await?;
    tokio::time::sleep_until(admitted.first_token_at).await;
    drop(lease);
    Ok(())
}

async fn embeddings(sim: &Sim, model: String, req: &Value) -> Response<Body> {
    let name = &sim.name;
    let inputs = match inputs(req, &sim.tokenizer, sim.args.chars_per_token) {
        Ok(i) => i,
        Err(e) => return bad_request(e, name),
    };
    let mut data = Vec::new();
    let mut total = 0;
    for (index, t) in inputs.iter().enumerate() {
        if let Err(e) = prefill(sim, t).await {
            return admit_error(e, name);
        }
        total += t.len();
        data.push(json!({"index": index, "object": "embedding", "embedding": vector(t, sim.args.embedding_dim)}));
    }
    json_response(
        StatusCode::OK,
        &json!({"id": format!("embd-{:016x}", sim.next_id()), "object": "list", "created": now_unix(),
                "model": model, "data": data, "usage": usage(total, 0, 0)}),
        name,
    )
}

fn similarity(a: &[u32], b: &[u32], dim: usize) -> f64 {
    let (va, vb) = (vector(a, dim), vector(b, dim));
    (va.iter().zip(&vb).map(|(x, y)| x * y).sum::<f64>() + 1.0) / 2.0
}

async fn rerank(sim: &Sim, model: String, req: &Value) -> Response<Body> {
    let name = &sim.name;
    let (Some(query), Some(docs)) = (
        req.get("query").and_then(Value::as_str),
        req.get("documents").and_then(Value::as_array),
    ) else {
        return bad_request("`query` and `documents` are required", name);
    };
    let q = match sim.tokenizer.text(query) {
        Ok(q) => q,
        Err(e) => return bad_request(e, name),
    };
    let mut results = Vec::new();
    let mut total = 0;
    for (index, d) in docs.iter().enumerate() {
        let text = d
            .as_str()
            .or_else(|| d.get("text").and_then(Value::as_str))
            .unwrap_or("");
        let t = match sim.tokenizer.text(text) {
            Ok(t) => t,
            Err(e) => return bad_request(e, name),
        };
        if let Err(e) = prefill(sim, &[q.clone(), t.clone()].concat()).await {
            return admit_error(e, name);
        }
        total += q.len() + t.len();
        results.push(json!({"index": index, "document": {"text": text},
                            "relevance_score": similarity(&q, &t, sim.args.embedding_dim)}));
    }
    results.sort_by(|a, b| {
        let s = |v: &Value| v["relevance_score"].as_f64().unwrap_or(0.0);
        s(b).total_cmp(&s(a))
    });
    if let Some(n) = req.get("top_n").and_then(Value::as_u64) {
        results.truncate(n as usize);
    }
    json_response(
        StatusCode::OK,
        &json!({"id": format!("rerank-{:016x}", sim.next_id()), "model": model,
                "usage": {"total_tokens": total}, "results": results}),
        name,
    )
}

async fn score(sim: &Sim, model: String, req: &Value) -> Response<Body> {
    let name = &sim.name;
    let text = |k: &str| match req.get(k) {
        Some(Value::String(s)) => Some(vec![s.clone()]),
        Some(Value::Array(a)) => Some(a.iter().filter_map(|v| v.as_str().map(str::to_owned)).collect()),
        _ => None,
    };
    let (Some(left), Some(right)) = (text("text_1"), text("text_2")) else {
        return bad_request("`text_1` and `text_2` are required", name);
    };
    let pairs: Vec<(String, String)> = if left.len() == 1 {
        right.iter().map(|r| (left[0].clone(), r.clone())).collect()
    } else {
        left.into_iter().zip(right).collect()
    };
    let mut data = Vec::new();
    let mut total = 0;
    for (index, (a, b)) in pairs.iter().enumerate() {
        let (ta, tb) = match (sim.tokenizer.text(a), sim.tokenizer.text(b)) {
            (Ok(ta), Ok(tb)) => (ta, tb),
            (Err(e), _) | (_, Err(e)) => return bad_request(e, name),
        };
        if let Err(e) = prefill(sim, &[ta.clone(), tb.clone()].concat()).await {
            return admit_error(e, name);
        }
        total += ta.len() + tb.len();
        data.push(json!({"index": index, "object": "score", "score": similarity(&ta, &tb, sim.args.embedding_dim)}));
    }
    json_response(
        StatusCode::OK,
        &json!({"id": format!("score-{:016x}", sim.next_id()), "object": "list", "created": now_unix(),
                "model": model, "data": data, "usage": usage(total, 0, 0)}),
        name,
    )
}

/// vLLM's audio routes (`/v1/audio/transcriptions`, `/translations`): a multipart form with
/// `model` and `file`. The simulator "transcribes" by telling the file's size.
async fn audio(sim: &Sim, headers: &hyper::HeaderMap, body: Bytes) -> Response<Body> {
    let name = &sim.name;
    let content_type = headers
        .get(hyper::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    let boundary = match multer::parse_boundary(content_type) {
        Ok(b) => b,
        Err(e) => return bad_request(format!("expected a multipart form: {e}"), name),
    };
    let once = futures_util::stream::once(std::future::ready(Ok::<_, Infallible>(body)));
    let mut form = multer::Multipart::new(once, boundary);
    let (mut model, mut file) = (None, None);
    loop {
        match form.next_field().await {
            Ok(Some(field)) => {
                let key = field.name().map(str::to_owned);
                let Ok(value) = field.bytes().await else {
                    return bad_request("a form field could not be read", name);
                };
                match key.as_deref() {
                    Some("model") => model = Some(String::from_utf8_lossy(&value).into_owned()),
                    Some("file") => file = Some(value.len()),
                    _ => {}
                }
            }
            Ok(None) => break,
            Err(e) => return bad_request(format!("invalid form: {e}"), name),
        }
    }
    let Some(model) = model else {
        return bad_request("`model` is required", name);
    };
    if !sim.serves(&model) {
        return unknown_model(&model, name);
    }
    let Some(bytes) = file else {
        return bad_request("`file` is required", name);
    };
    json_response(
        StatusCode::OK,
        &json!({"text": format!("{bytes} bytes of audio heard by {name}")}),
        name,
    )
}
