//! The simulator's Responses API with vLLM's store (`VLLM_ENABLE_RESPONSES_API_STORE=1`):
//! `POST /v1/responses` (`store`, default true; `previous_response_id`, which must be held
//! here; `stream` with vLLM's event names and shapes; `background` without `stream`),
//! `GET /v1/responses/{id}` and `POST /v1/responses/{id}/cancel`, with vLLM's 404 for an id
//! this engine does not hold. As in vLLM the store is this process's own, so only the
//! engine that answered can take a follow-up; unlike vLLM's (which never forgets), it holds
//! `--max-stored-responses` at most, the oldest going first. Not here: tools, reasoning,
//! `GET ?stream=true` replays.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use hyper::{Response, StatusCode};
use serde_json::{Value, json};
use tokio::sync::mpsc;
use tokio::task::AbortHandle;
use tokio::time::Instant;

use super::api::{Body, Sim, bad_request, error, full, now_unix};
use super::greedy::{self, Greedy};
use super::metrics::FinishReason;

/// One stored response: its body as `GET` answers it, and its conversation's tokens (the
/// prompt a follow-up continues).
#[derive(Clone)]
struct Stored {
    response: Value,
    context: Vec<u32>,
}

#[derive(Default)]
struct Inner {
    map: HashMap<String, Stored>,
    order: VecDeque<String>,
    /// Background responses still running, to cancel.
    running: HashMap<String, AbortHandle>,
}

/// This engine's stored responses, bounded.
pub struct Store {
    inner: Mutex<Inner>,
    max: usize,
}

impl Store {
    pub fn new(max: usize) -> Self {
        Self {
            inner: Mutex::new(Inner::default()),
            max: max.max(1),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn get(&self, id: &str) -> Option<Stored> {
        self.lock().map.get(id).cloned()
    }

    fn put(&self, id: &str, stored: Stored) {
        let mut inner = self.lock();
        if inner.map.insert(id.to_owned(), stored).is_none() {
            inner.order.push_back(id.to_owned());
        }
        while inner.map.len() > self.max {
            let Some(old) = inner.order.pop_front() else { break };
            inner.map.remove(&old);
        }
    }

    /// Replaces a stored response's body unless it was cancelled meanwhile.
    fn finish(&self, id: &str, stored: Stored) {
        let mut inner = self.lock();
        inner.running.remove(id);
        if let Some(s) = inner.map.get_mut(id)
            && s.response["status"] != "cancelled"
        {
            *s = stored;
        }
    }
}

/// A response object as vLLM writes it: `id` first (pydantic keeps the model's field order;
/// `serde_json` here sorts members), which is where routers read it.
fn response_json(sim: &Sim, body: &Value) -> Response<Body> {
    let mut rest = body.clone();
    let id = rest.as_object_mut().and_then(|m| m.remove("id")).unwrap_or(Value::Null);
    let rest = rest.to_string();
    let members = rest.strip_prefix('{').unwrap_or(&rest);
    let sep = if members == "}" { "" } else { "," };
    full(
        StatusCode::OK,
        "application/json",
        format!("{{\"id\":{id}{sep}{members}"),
        &sim.name,
    )
}

/// vLLM's answer for an id it does not hold.
fn not_found(id: &str, engine: &str) -> Response<Body> {
    error(
        StatusCode::NOT_FOUND,
        "invalid_request_error",
        format!("Response with id '{id}' not found."),
        Some("response_id"),
        engine,
    )
}

/// `GET /v1/responses/{id}`.
pub fn retrieve(sim: &Sim, id: &str) -> Response<Body> {
    match sim.responses.get(id) {
        Some(s) => response_json(sim, &s.response),
        None => not_found(id, &sim.name),
    }
}

/// `POST /v1/responses/{id}/cancel`: only a background response still running.
pub fn cancel(sim: &Sim, id: &str) -> Response<Body> {
    let mut inner = sim.responses.lock();
    let Some(stored) = inner.map.get_mut(id) else {
        return not_found(id, &sim.name);
    };
    if !matches!(stored.response["status"].as_str(), Some("queued" | "in_progress")) {
        return error(
            StatusCode::BAD_REQUEST,
            "invalid_request_error",
            "Cannot cancel a synchronous response.",
            Some("response_id"),
            &sim.name,
        );
    }
    stored.response["status"] = json!("cancelled");
    let body = stored.response.clone();
    if let Some(task) = inner.running.remove(id) {
        task.abort();
    }
    response_json(sim, &body)
}

/// The response object, as vLLM's `ResponsesResponse` writes it (id first).
fn response_body(req: &Value, id: &str, model: &str, created: u64, status: &str, output: Value, usage: Value) -> Value {
    let max_output_tokens = req.get("max_output_tokens").cloned().unwrap_or(Value::Null);
    json!({
        "id": id, "created_at": created,
        "incomplete_details": if status == "incomplete" { json!({"reason": "max_output_tokens"}) } else { Value::Null },
        "instructions": req.get("instructions").cloned().unwrap_or(Value::Null),
        "metadata": req.get("metadata").cloned().unwrap_or(Value::Null),
        "model": model, "object": "response", "output": output,
        "parallel_tool_calls": true, "temperature": 1.0, "tool_choice": "auto", "tools": [], "top_p": 1.0,
        "background": req.get("background").and_then(Value::as_bool).unwrap_or(false),
        "max_output_tokens": max_output_tokens,
        "max_tool_calls": null,
        "previous_response_id": req.get("previous_response_id").cloned().unwrap_or(Value::Null),
        "prompt": null, "reasoning": null, "service_tier": "auto", "status": status,
        "text": null, "top_logprobs": null, "truncation": "disabled", "usage": usage, "user": null,
    })
}

fn message(msg_id: &str, status: &str, text: &str) -> Value {
    json!({"id": msg_id, "content": [{"annotations": [], "text": text, "type": "output_text", "logprobs": null}],
           "role": "assistant", "status": status, "type": "message"})
}

fn usage(prompt: usize, cached: usize, output: usize) -> Value {
    json!({"input_tokens": prompt, "input_tokens_details": {"cached_tokens": cached},
           "output_tokens": output, "output_tokens_details": {"reasoning_tokens": 0},
           "total_tokens": prompt + output})
}

/// An SSE event as vLLM's Responses stream writes it: `event:` and `data:` lines.
fn event(kind: &str, sequence: &mut u64, mut body: Value) -> Bytes {
    body["type"] = json!(kind);
    body["sequence_number"] = json!(*sequence);
    *sequence += 1;
    Bytes::from(format!("event: {kind}\ndata: {body}\n\n"))
}

/// One admitted request's decoding.
struct Generation {
    _lease: super::engine::Lease,
    first_token_at: Instant,
    decoder: Greedy,
    engine: Arc<super::engine::Engine>,
    metrics: super::metrics::SimMetrics,
    arrived: Instant,
    max_tokens: usize,
}

/// Makes an event of a token, for a stream (`None`: no event).
type OnToken = Box<dyn FnMut(u32) -> Option<Bytes> + Send>;

impl Generation {
    /// The output ids, made at the engine's pace; each one's event goes to `tx`. `None`
    /// when the stream's client left.
    async fn run(mut self, mut each: OnToken, tx: Option<mpsc::Sender<Bytes>>) -> Option<Vec<u32>> {
        let metrics = &self.metrics;
        tokio::time::sleep_until(self.first_token_at).await;
        let first = Instant::now();
        metrics.ttft.record(first.duration_since(self.arrived).as_secs_f64());
        let mut ids = Vec::with_capacity(self.max_tokens);
        let mut at = first;
        for i in 0..self.max_tokens {
            if i > 0 {
                at += self.engine.decode_delay();
                tokio::time::sleep_until(at).await;
            }
            let token = self.decoder.next().unwrap_or_default();
            ids.push(token);
            if let (Some(tx), Some(event)) = (&tx, each(token))
                && tx.send(event).await.is_err()
            {
                metrics.generation_tokens.increment(ids.len() as u64);
                metrics.finished(FinishReason::Abort);
                return None;
            }
        }
        metrics.generation_tokens.increment(self.max_tokens as u64);
        metrics.decode_time.record(at.duration_since(first).as_secs_f64());
        metrics.e2e.record(self.arrived.elapsed().as_secs_f64());
        metrics.finished(FinishReason::Length);
        Some(ids)
    }
}

/// `POST /v1/responses`.
pub async fn create(sim: &Arc<Sim>, model: String, req: Value, arrived: Instant) -> Response<Body> {
    let name = sim.name.clone();
    let stream = req.get("stream").and_then(Value::as_bool).unwrap_or(false);
    let background = req.get("background").and_then(Value::as_bool).unwrap_or(false);
    let store = req.get("store").and_then(Value::as_bool).unwrap_or(true);
    if background && stream {
        return bad_request("the simulator does not stream background responses", &name);
    }
    if background && !store {
        return bad_request("background can be set only when store is true", &name);
    }
    let input = match sim.tokenizer.responses(&req) {
        Ok(t) => t,
        Err(e) => return bad_request(e, &name),
    };
    // A follow-up continues its previous response's conversation: held here, or vLLM's 404.
    let prompt = match req.get("previous_response_id").and_then(Value::as_str) {
        Some(prev) => match sim.responses.get(prev) {
            Some(s) => [s.context, input].concat(),
            None => return not_found(prev, &name),
        },
        None => input,
    };
    let max_tokens = req
        .get("max_output_tokens")
        .and_then(Value::as_u64)
        .map_or(sim.args.default_max_tokens, |n| n as usize);
    if max_tokens == 0 {
        return bad_request("max_output_tokens must be at least 1", &name);
    }
    let kv = sim.request_kv(&model, &req);
    let (lease, admitted) = match sim.engine.admit(&prompt, max_tokens, arrived, &kv).await {
        Ok(a) => a,
        Err(e) => return bad_request(e.to_string(), &name),
    };
    let seed = sim.next_id();
    let id = format!("resp_{seed:016x}");
    let msg_id = format!("msg_{seed:016x}");
    let created = now_unix();
    let metrics = sim.engine.metrics.clone();
    metrics.queue_time.record(admitted.queued.as_secs_f64());
    let final_body = {
        let (req, id, msg_id, model) = (req.clone(), id.clone(), msg_id.clone(), model.clone());
        let (prompt_tokens, cached) = (admitted.prompt_tokens, admitted.cached_tokens);
        move |ids: &[u32]| {
            let text = greedy::text(ids);
            let output = json!([message(&msg_id, "incomplete", &text)]);
            let usage = usage(prompt_tokens, cached, ids.len());
            response_body(&req, &id, &model, created, "incomplete", output, usage)
        }
    };
    let run = Generation {
        _lease: lease,
        first_token_at: admitted.first_token_at,
        decoder: Greedy::after(&prompt),
        engine: sim.engine.clone(),
        metrics,
        arrived,
        max_tokens,
    };
    let context = |ids: &[u32]| [prompt.as_slice(), ids].concat();

    if background {
        let queued = response_body(&req, &id, &model, created, "queued", json!([]), Value::Null);
        sim.responses.put(
            &id,
            Stored {
                response: queued.clone(),
                context: prompt.clone(),
            },
        );
        let sim2 = sim.clone();
        let id2 = id.clone();
        let prompt2 = prompt.clone();
        let task = tokio::spawn(async move {
            if let Some(ids) = run.run(Box::new(|_| None), None).await {
                let stored = Stored {
                    response: final_body(&ids),
                    context: [prompt2.as_slice(), &ids].concat(),
                };
                sim2.responses.finish(&id2, stored);
            }
        });
        sim.responses.lock().running.insert(id.clone(), task.abort_handle());
        return response_json(sim, &queued);
    }

    if !stream {
        let Some(ids) = run.run(Box::new(|_| None), None).await else {
            return bad_request("aborted", &name);
        };
        let body = final_body(&ids);
        if store {
            sim.responses.put(
                &id,
                Stored {
                    response: body.clone(),
                    context: context(&ids),
                },
            );
        }
        return response_json(sim, &body);
    }

    // Streaming, in vLLM's event order; stored once complete, as vLLM stores it.
    let (tx, rx) = mpsc::channel::<Bytes>(64);
    let sim2 = sim.clone();
    tokio::spawn(async move {
        let mut seq = 0u64;
        let initial = response_body(&req, &id, &model, created, "in_progress", json!([]), Value::Null);
        let opening = [
            event("response.created", &mut seq, json!({"response": initial})),
            event("response.in_progress", &mut seq, json!({"response": initial})),
            event(
                "response.output_item.added",
                &mut seq,
                json!({"item": {"id": msg_id, "content": [], "role": "assistant", "status": "in_progress", "type": "message"}, "output_index": 0}),
            ),
            event(
                "response.content_part.added",
                &mut seq,
                json!({"content_index": 0, "item_id": msg_id, "output_index": 0,
                       "part": {"annotations": [], "text": "", "type": "output_text", "logprobs": null}}),
            ),
        ];
        for e in opening {
            if tx.send(e).await.is_err() {
                return;
            }
        }
        let item = msg_id.clone();
        let mut delta_seq = seq;
        let each = Box::new(move |token: u32| {
            let mut piece = String::new();
            greedy::push_piece(&mut piece, token);
            Some(event(
                "response.output_text.delta",
                &mut delta_seq,
                json!({"content_index": 0, "delta": piece, "item_id": item, "output_index": 0, "logprobs": []}),
            ))
        });
        let Some(ids) = run.run(each, Some(tx.clone())).await else {
            return;
        };
        let mut seq = seq + ids.len() as u64;
        let text = greedy::text(&ids);
        let body = final_body(&ids);
        if store {
            sim2.responses.put(
                &id,
                Stored {
                    response: body.clone(),
                    context: [prompt.as_slice(), &ids].concat(),
                },
            );
        }
        let closing = [
            event(
                "response.output_text.done",
                &mut seq,
                json!({"content_index": 0, "item_id": msg_id, "output_index": 0, "text": text, "logprobs": []}),
            ),
            event(
                "response.content_part.done",
                &mut seq,
                json!({"content_index": 0, "item_id": msg_id, "output_index": 0,
                       "part": {"annotations": [], "text": text, "type": "output_text", "logprobs": null}}),
            ),
            event(
                "response.output_item.done",
                &mut seq,
                json!({"item": message(&msg_id, "incomplete", &text), "output_index": 0}),
            ),
            event("response.completed", &mut seq, json!({"response": body})),
        ];
        for e in closing {
            if tx.send(e).await.is_err() {
                return;
            }
        }
    });
    super::api::event_stream(rx, &name)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_store_keeps_the_newest_within_its_bound() {
        let store = Store::new(2);
        for id in ["a", "b", "c"] {
            let stored = Stored {
                response: json!({"id": id}),
                context: vec![1],
            };
            store.put(id, stored);
        }
        assert!(store.get("a").is_none());
        assert_eq!(store.get("c").map(|s| s.response["id"].clone()), Some(json!("c")));
        assert!(store.get("b").is_some());
    }
}
