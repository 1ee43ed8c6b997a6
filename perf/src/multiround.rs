//! The multi-round QA workload (after vLLM production-stack's `benchmarks/multi-round-qa`):
//! users hold chats of several rounds; every round re-sends the whole conversation (a shared
//! system prompt, optionally a shared document, the user's own long history, earlier answers)
//! plus a new question, and streams a fixed-length answer.
//!
//! `--active` users run at once; when one finishes its rounds, the next user starts. Each
//! active user paces its rounds to `--qps` across all active users (or goes as fast as
//! answers come when 0); with pacing, the first users join spread over one interval. Variants: `--no-session-header` drops `x-user-id`; `--docs N` gives
//! users one of N long documents after the system prompt (RAG); `--skew S` makes user
//! activity Zipf-distributed (heavy users get more rounds); `--api messages` holds the same
//! conversations over Anthropic's `/v1/messages`, as a coding agent does (the system prompt
//! top-level, tool definitions, each answer followed by a `tool_use` block and each tool
//! output sent back as a `tool_result`). The work is a fixed list of requests, so runs
//! against different targets do the same work.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use clap::Args;
use hdrhistogram::Histogram;
use http_body_util::{BodyExt, Full};
use hyper::Request;
use hyper::client::conn::http1;
use hyper_util::rt::TokioIo;
use serde::Serialize;
use serde_json::{Value, json};
use tokio::net::TcpStream;

use crate::load::Percentiles;

#[derive(Clone, Debug, Args)]
pub struct MultiRoundArgs {
    /// Base URL(s): http://host:port. With several (comma-separated), a user's rounds take
    /// turns among them, so every follow-up round goes through another router than the
    /// round before it (for replicas that must agree on where a conversation lives).
    #[arg(long, value_delimiter = ',', required = true)]
    pub url: Vec<String>,
    /// Model of every request.
    #[arg(long, default_value = "sim-model")]
    pub model: String,
    /// Users in all.
    #[arg(long, default_value_t = 64)]
    pub users: usize,
    /// Users chatting at once.
    #[arg(long, default_value_t = 16)]
    pub active: usize,
    /// Rounds per user (the mean, with --skew).
    #[arg(long, default_value_t = 5)]
    pub rounds: usize,
    /// Aggregate request rate to pace rounds at; 0: each user sends its next round as soon
    /// as the last answer is in.
    #[arg(long, default_value_t = 0.0)]
    pub qps: f64,
    /// System prompt every user shares, tokens.
    #[arg(long, default_value_t = 1000)]
    pub system_tokens: usize,
    /// Each user's own history, sent from the first round on.
    #[arg(long, default_value_t = 2000)]
    pub history_tokens: usize,
    /// Each round's question, tokens.
    #[arg(long, default_value_t = 50)]
    pub question_tokens: usize,
    /// Each round's answer (`max_tokens`, with `ignore_eos`), tokens.
    #[arg(long, default_value_t = 32)]
    pub answer_tokens: usize,
    /// Documents shared by users, placed after the system prompt (0: none).
    #[arg(long, default_value_t = 0)]
    pub docs: usize,
    /// Length of each shared document, tokens.
    #[arg(long, default_value_t = 2000)]
    pub doc_tokens: usize,
    /// Zipf exponent of user activity (0: every user alike).
    #[arg(long, default_value_t = 0.0)]
    pub skew: f64,
    /// Zipf exponent of document popularity (0: user u reads document u mod --docs).
    #[arg(long, default_value_t = 0.0)]
    pub doc_skew: f64,
    /// Agent-like loops: after the first round, each round appends a tool output of
    /// --tool-chars-min to --tool-chars-max characters instead of a question, --pause-ms after
    /// the previous answer.
    #[arg(long)]
    pub agent: bool,
    /// Agent loops: the shortest tool output, characters.
    #[arg(long, default_value_t = 1000)]
    pub tool_chars_min: usize,
    /// Agent loops: the longest tool output, characters.
    #[arg(long, default_value_t = 4000)]
    pub tool_chars_max: usize,
    /// Agent loops: the pause between an answer and the next round, ms.
    #[arg(long, default_value_t = 200)]
    pub pause_ms: u64,
    /// Send no `x-user-id` header.
    #[arg(long)]
    pub no_session_header: bool,
    /// The API the conversations use: `chat` (`/v1/chat/completions`) or `messages`
    /// (Anthropic's `/v1/messages`, with tools, `tool_use` and `tool_result` blocks).
    #[arg(long, value_enum, default_value_t = Api::Chat)]
    pub api: Api,
    /// Characters per token of the generated text (the simulator's default is 4).
    #[arg(long, default_value_t = 4)]
    pub chars_per_token: usize,
    /// Seed of the generated texts and of every random draw.
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
    /// Response header naming the engine that served a request (the simulator's): follow-up
    /// rounds served by the engine of the round before are counted.
    #[arg(long, default_value = "x-sim-engine")]
    pub engine_header: String,
    /// Requests started in the first seconds are warm-up: not counted in the measured window
    /// (TTFT, hit rate, requests per engine, the engine share of follow-ups). The window ends
    /// when the last user starts (from then on the load winds down).
    #[arg(long, default_value_t = 0.0)]
    pub warmup_s: f64,
    /// A name for this run in the output.
    #[arg(long, default_value = "multi-round")]
    pub label: String,
    /// Print the summary as JSON.
    #[arg(long)]
    pub json: bool,
}

#[derive(Clone, Debug, Serialize)]
pub struct MultiRoundSummary {
    pub label: String,
    pub requests: u64,
    pub errors: u64,
    pub seconds: f64,
    pub rounds_per_s: f64,
    /// Requests started after the warm-up: the measured window.
    pub measured_requests: u64,
    /// TTFT of the measured window.
    pub ttft_ms: Percentiles,
    /// Prompt tokens the engines found cached over prompt tokens, in the measured window (from
    /// each response's `usage.prompt_tokens_details.cached_tokens`).
    pub hit_rate: f64,
    /// Requests per engine in the measured window (the engine header's values).
    pub engine_requests: std::collections::BTreeMap<String, u64>,
    /// Mean gap between streamed chunks, over all requests.
    pub itl_ms_mean: f64,
    /// Follow-up rounds (after the warm-up) whose engine and the previous round's are known.
    pub follow_ups: u64,
    /// Of those, served by the engine that served the previous round (where the conversation's
    /// prefix is cached).
    pub follow_ups_same_engine: u64,
    pub same_engine_share: f64,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Api {
    Chat,
    Messages,
}

/// The tools a Messages conversation declares (a coding agent's few: their definitions are
/// part of every request's prompt, after the system prompt).
fn agent_tools() -> Value {
    let tool = |name: &str, what: &str, arg: &str| {
        json!({
            "name": name,
            "description": what,
            "input_schema": {"type": "object", "properties": {arg: {"type": "string", "description": format!("the {arg}")}}, "required": [arg]},
        })
    };
    json!([
        tool("read_file", "Read a file of the repository.", "path"),
        tool(
            "run",
            "Run a shell command in the repository and return its output.",
            "command"
        ),
        tool("search", "Search the repository for a pattern.", "pattern"),
    ])
}

/// Deterministic filler text: `tokens` words of `chars_per_token` characters.
fn text(seed: u64, tokens: usize, chars_per_token: usize) -> String {
    const LETTERS: &[u8] = b"abcdefghijklmnopqrstuvwxyz";
    let word = chars_per_token.max(2) - 1;
    let mut out = String::with_capacity(tokens * chars_per_token);
    for i in 0..tokens {
        let h = xxhash_rust::xxh3::xxh3_64_with_seed(&(i as u64).to_le_bytes(), seed);
        for k in 0..word {
            out.push(LETTERS[((h >> (k * 5)) % 26) as usize] as char);
        }
        out.push(' ');
    }
    out
}

/// The document user `user` reads: `user mod docs`, or drawn from a Zipf law of exponent
/// `doc_skew` over the documents (document 0 the most read), the same in every run.
fn doc_of(a: &MultiRoundArgs, user: usize, docs: usize) -> usize {
    if a.doc_skew <= 0.0 || docs <= 1 {
        return user % docs.max(1);
    }
    let weights: Vec<f64> = (0..docs).map(|d| 1.0 / ((d + 1) as f64).powf(a.doc_skew)).collect();
    let total: f64 = weights.iter().sum();
    let h = xxhash_rust::xxh3::xxh3_64_with_seed(&(user as u64).to_le_bytes(), a.seed ^ (3 << 40));
    let mut x = (h >> 11) as f64 / (1u64 << 53) as f64 * total;
    for (d, w) in weights.iter().enumerate() {
        if x < *w {
            return d;
        }
        x -= w;
    }
    docs - 1
}

/// Rounds of each user: `rounds` each, or Zipf-weighted around it with `skew`.
fn rounds_per_user(a: &MultiRoundArgs) -> Vec<usize> {
    if a.skew <= 0.0 {
        return vec![a.rounds.max(1); a.users];
    }
    let weights: Vec<f64> = (0..a.users).map(|u| 1.0 / ((u + 1) as f64).powf(a.skew)).collect();
    let mean = weights.iter().sum::<f64>() / a.users.max(1) as f64;
    weights
        .iter()
        .map(|w| ((a.rounds as f64 * w / mean).round() as usize).clamp(1, a.rounds * 8))
        .collect()
}

struct Recorder {
    ttft: Histogram<u64>,
    measured: u64,
    prompt_tokens: u64,
    cached_tokens: u64,
    per_engine: std::collections::BTreeMap<String, u64>,
    gaps_us: f64,
    gaps: u64,
    requests: u64,
    errors: u64,
    follow_ups: u64,
    same_engine: u64,
}

pub fn run_blocking(args: &MultiRoundArgs) -> anyhow::Result<MultiRoundSummary> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    runtime.block_on(run(args.clone()))
}

async fn run(a: MultiRoundArgs) -> anyhow::Result<MultiRoundSummary> {
    let hosts = a
        .url
        .iter()
        .map(|u| {
            u.strip_prefix("http://")
                .map(|h| h.trim_end_matches('/').to_owned())
                .ok_or_else(|| anyhow::anyhow!("--url must start with http://: {u}"))
        })
        .collect::<anyhow::Result<Vec<_>>>()?;
    anyhow::ensure!(!hosts.is_empty(), "--url is empty");
    let hosts = Arc::new(hosts);
    let a = Arc::new(a);
    let rounds = Arc::new(rounds_per_user(&a));
    let system = Arc::new(text(a.seed, a.system_tokens, a.chars_per_token));
    let docs: Arc<Vec<String>> = Arc::new(
        (0..a.docs)
            .map(|d| text(a.seed ^ (1000 + d as u64), a.doc_tokens, a.chars_per_token))
            .collect(),
    );
    let next_user = Arc::new(Mutex::new(0usize));
    // When the last user starts: from then on slots run dry and the load winds down, so the
    // measured window ends there.
    let steady_end: Arc<std::sync::OnceLock<Instant>> = Arc::new(std::sync::OnceLock::new());
    let recorder = Arc::new(Mutex::new(Recorder {
        ttft: Histogram::new_with_bounds(1, 600_000_000, 3)?,
        measured: 0,
        prompt_tokens: 0,
        cached_tokens: 0,
        per_engine: std::collections::BTreeMap::new(),
        gaps_us: 0.0,
        gaps: 0,
        requests: 0,
        errors: 0,
        follow_ups: 0,
        same_engine: 0,
    }));
    let interval = (a.qps > 0.0).then(|| Duration::from_secs_f64(a.active as f64 / a.qps));
    let start = Instant::now();
    let mut slots = Vec::new();
    for slot in 0..a.active.max(1) {
        let (a, rounds, system, docs) = (a.clone(), rounds.clone(), system.clone(), docs.clone());
        let (next_user, recorder, hosts) = (next_user.clone(), recorder.clone(), hosts.clone());
        let steady_end = steady_end.clone();
        // Users join over time (one pacing interval), not all at once.
        let join = interval.map_or(Duration::ZERO, |i| i.mul_f64(slot as f64 / a.active.max(1) as f64));
        slots.push(tokio::spawn(async move {
            tokio::time::sleep(join).await;
            loop {
                let user = {
                    let mut n = next_user.lock().unwrap_or_else(|p| p.into_inner());
                    if *n >= a.users {
                        return;
                    }
                    *n += 1;
                    if *n == a.users {
                        let _ = steady_end.set(Instant::now());
                    }
                    *n - 1
                };
                let counted_from = start + Duration::from_secs_f64(a.warmup_s.max(0.0));
                let chat = Chat {
                    a: &a,
                    hosts: &hosts,
                    system: &system,
                    docs: &docs,
                    interval,
                    counted_from,
                    steady_end: &steady_end,
                };
                chat.run(user, rounds[user], &recorder).await;
            }
        }));
    }
    for s in slots {
        s.await?;
    }
    let seconds = start.elapsed().as_secs_f64();
    let r = recorder.lock().unwrap_or_else(|p| p.into_inner());
    Ok(MultiRoundSummary {
        label: a.label.clone(),
        requests: r.requests,
        errors: r.errors,
        seconds,
        rounds_per_s: r.requests as f64 / seconds,
        measured_requests: r.measured,
        ttft_ms: Percentiles::of(&r.ttft),
        hit_rate: if r.prompt_tokens == 0 {
            0.0
        } else {
            r.cached_tokens as f64 / r.prompt_tokens as f64
        },
        engine_requests: r.per_engine.clone(),
        itl_ms_mean: if r.gaps == 0 {
            0.0
        } else {
            r.gaps_us / r.gaps as f64 / 1000.0
        },
        follow_ups: r.follow_ups,
        follow_ups_same_engine: r.same_engine,
        same_engine_share: if r.follow_ups == 0 {
            0.0
        } else {
            r.same_engine as f64 / r.follow_ups as f64
        },
    })
}

/// What every chat of a run shares.
struct Chat<'a> {
    a: &'a MultiRoundArgs,
    hosts: &'a [String],
    system: &'a str,
    docs: &'a [String],
    interval: Option<Duration>,
    /// Follow-ups started before this are warm-up, not counted for the engine share.
    counted_from: Instant,
    /// Requests started after this (once set) are not counted either.
    steady_end: &'a std::sync::OnceLock<Instant>,
}

impl Chat<'_> {
    /// One user's chat: `rounds` requests, on one keep-alive connection per target; round `r`
    /// goes to target `(user + r) % targets`.
    async fn run(&self, user: usize, rounds: usize, recorder: &Mutex<Recorder>) {
        let a = self.a;
        let cpt = a.chars_per_token;
        let history = text(a.seed ^ (1 << 40) ^ user as u64, a.history_tokens, cpt);
        let mut first = String::new();
        if !self.docs.is_empty() {
            first.push_str(&self.docs[doc_of(a, user, self.docs.len())]);
            first.push('\n');
        }
        first.push_str(&history);
        let messages_api = a.api == Api::Messages;
        let mut messages = if messages_api {
            Vec::new()
        } else {
            vec![json!({"role": "system", "content": self.system})]
        };
        let mut senders: Vec<Option<http1::SendRequest<Full<Bytes>>>> = self.hosts.iter().map(|_| None).collect();
        let mut next_at = Instant::now();
        let mut last_engine: Option<String> = None;
        for round in 0..rounds {
            if a.agent && round > 0 {
                tokio::time::sleep(Duration::from_millis(a.pause_ms)).await;
            } else if let Some(i) = self.interval {
                tokio::time::sleep_until(next_at.into()).await;
                next_at += i;
            }
            let round_seed = a.seed ^ (2 << 40) ^ ((user as u64) << 16) ^ round as u64;
            let content = if round == 0 {
                format!("{first}\n{}", text(round_seed, a.question_tokens, cpt))
            } else if a.agent {
                let span = a.tool_chars_max.saturating_sub(a.tool_chars_min) as u64 + 1;
                let chars = a.tool_chars_min + (xxhash_rust::xxh3::xxh3_64(&round_seed.to_le_bytes()) % span) as usize;
                format!("Tool output:\n{}", text(round_seed, chars.div_ceil(cpt.max(1)), cpt))
            } else {
                text(round_seed, a.question_tokens, cpt)
            };
            // A Messages agent sends a tool's output back as the result of the tool it asked
            // for in its last answer.
            let tool_id = format!("toolu_{user}_{}", round.saturating_sub(1));
            let content = if messages_api && a.agent && round > 0 {
                json!([{"type": "tool_result", "tool_use_id": tool_id, "content": content}])
            } else {
                json!(content)
            };
            messages.push(json!({"role": "user", "content": content}));
            let body = if messages_api {
                json!({
                    "model": a.model, "system": self.system, "tools": agent_tools(),
                    "messages": messages, "stream": true,
                    "max_tokens": a.answer_tokens, "ignore_eos": true,
                })
            } else {
                json!({
                    "model": a.model, "messages": messages, "stream": true,
                    "stream_options": {"include_usage": true},
                    "max_tokens": a.answer_tokens, "ignore_eos": true,
                })
            };
            let target = (user + round) % self.hosts.len();
            let now = Instant::now();
            let counted = now >= self.counted_from && self.steady_end.get().is_none_or(|end| now < *end);
            let user_header = (!a.no_session_header).then_some(user);
            let outcome = exchange(
                &mut senders[target],
                &self.hosts[target],
                (a.api, &body),
                user_header,
                &a.engine_header,
            )
            .await;
            let mut r = recorder.lock().unwrap_or_else(|p| p.into_inner());
            let answer = match outcome {
                Ok(reply) => {
                    r.requests += 1;
                    if counted {
                        r.measured += 1;
                        let _ = r.ttft.record(reply.ttft.as_micros().max(1) as u64);
                        r.prompt_tokens += reply.prompt_tokens;
                        r.cached_tokens += reply.cached_tokens;
                        if let Some(e) = &reply.engine {
                            *r.per_engine.entry(e.clone()).or_default() += 1;
                        }
                    }
                    r.gaps += reply.gaps.len() as u64;
                    r.gaps_us += reply.gaps.iter().map(|g| g.as_micros() as f64).sum::<f64>();
                    if let (true, Some(last), Some(now)) = (counted, &last_engine, &reply.engine) {
                        r.follow_ups += 1;
                        r.same_engine += u64::from(last == now);
                    }
                    drop(r);
                    last_engine = reply.engine;
                    Some(reply.answer)
                }
                Err(_) => {
                    r.errors += 1;
                    drop(r);
                    senders[target] = None;
                    last_engine = None;
                    None
                }
            };
            let answer = if messages_api && a.agent {
                // The agent's answer asks for a tool; the next round is its output.
                let tool_use = json!({"type": "tool_use", "id": format!("toolu_{user}_{round}"), "name": "read_file",
                                      "input": {"path": format!("src/module_{round}.rs")}});
                match answer {
                    Some(text) => json!([{"type": "text", "text": text}, tool_use]),
                    None => json!([tool_use]),
                }
            } else {
                json!(answer.unwrap_or_default())
            };
            messages.push(json!({"role": "assistant", "content": answer}));
        }
    }
}

/// One streamed answer.
struct Reply {
    /// Time to the first event.
    ttft: Duration,
    /// Gaps between chunks.
    gaps: Vec<Duration>,
    answer: String,
    /// The engine that served it, from the engine header.
    engine: Option<String>,
    /// From the final usage chunk.
    prompt_tokens: u64,
    cached_tokens: u64,
}

/// Sends one streaming chat (or Messages) request and reads the answer.
async fn exchange(
    sender: &mut Option<http1::SendRequest<Full<Bytes>>>,
    host: &str,
    (api, body): (Api, &Value),
    user: Option<usize>,
    engine_header: &str,
) -> anyhow::Result<Reply> {
    let s = match sender {
        Some(s) if !s.is_closed() => s,
        _ => {
            let stream = TcpStream::connect(host).await?;
            stream.set_nodelay(true)?;
            let (s, conn) = http1::handshake(TokioIo::new(stream)).await?;
            tokio::spawn(async move {
                let _ = conn.await;
            });
            sender.insert(s)
        }
    };
    let path = match api {
        Api::Chat => "/v1/chat/completions",
        Api::Messages => "/v1/messages",
    };
    let mut req = Request::post(path)
        .header("host", host)
        .header("content-type", "application/json");
    if let Some(u) = user {
        req = req.header("x-user-id", format!("user-{u}"));
    }
    let req = req.body(Full::new(Bytes::from(body.to_string())))?;
    let t0 = Instant::now();
    s.ready().await?;
    let resp = s.send_request(req).await?;
    anyhow::ensure!(resp.status().is_success(), "status {}", resp.status());
    let engine = resp
        .headers()
        .get(engine_header)
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    let mut body = resp.into_body();
    let (mut first, mut last, mut gaps) = (None, None, Vec::new());
    let mut raw = Vec::new();
    while let Some(frame) = body.frame().await {
        if let Some(d) = frame?.data_ref().filter(|d| !d.is_empty()) {
            let now = Instant::now();
            if d.windows(5).any(|w| w == b"data:") {
                match last {
                    None => first = Some(now - t0),
                    Some(l) => gaps.push(now - l),
                }
                last = Some(now);
            }
            raw.extend_from_slice(d);
        }
    }
    let events: Vec<Value> = String::from_utf8_lossy(&raw)
        .lines()
        .filter_map(|l| l.strip_prefix("data: "))
        .filter_map(|d| serde_json::from_str::<Value>(d).ok())
        .collect();
    let (answer, prompt_tokens, cached_tokens) = match api {
        Api::Chat => {
            let answer = events
                .iter()
                .filter_map(|v| v["choices"][0]["delta"]["content"].as_str())
                .collect::<String>();
            let usage = events
                .iter()
                .rev()
                .find(|v| v["usage"].is_object())
                .map(|v| &v["usage"]);
            let prompt = usage.and_then(|u| u["prompt_tokens"].as_u64()).unwrap_or(0);
            let cached = usage
                .and_then(|u| u["prompt_tokens_details"]["cached_tokens"].as_u64())
                .unwrap_or(0);
            (answer, prompt, cached)
        }
        Api::Messages => {
            let answer = events
                .iter()
                .filter(|v| v["type"] == "content_block_delta")
                .filter_map(|v| v["delta"]["text"].as_str())
                .collect::<String>();
            // Anthropic's input_tokens leave out the tokens read from (and written to) the
            // cache: the prompt is their sum. `message_start` carries them, and
            // `message_delta` may again.
            let (mut prompt, mut cached) = (0, 0);
            for v in &events {
                let u = if v["type"] == "message_start" {
                    &v["message"]["usage"]
                } else {
                    &v["usage"]
                };
                let field = |k: &str| u[k].as_u64().unwrap_or(0);
                let read = field("cache_read_input_tokens");
                let total = field("input_tokens") + read + field("cache_creation_input_tokens");
                if total > prompt {
                    (prompt, cached) = (total, read);
                }
            }
            (answer, prompt, cached)
        }
    };
    Ok(Reply {
        ttft: first.ok_or_else(|| anyhow::anyhow!("no events"))?,
        gaps,
        answer,
        engine,
        prompt_tokens,
        cached_tokens,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn text_is_deterministic_and_sized() {
        let a = text(1, 10, 4);
        assert_eq!(a, text(1, 10, 4));
        assert_eq!(a.len(), 40);
        assert_ne!(a, text(2, 10, 4));
    }

    #[test]
    fn skew_keeps_the_mean_and_favours_early_users() {
        let mut a = MultiRoundArgs {
            url: vec![],
            model: String::new(),
            users: 100,
            active: 1,
            rounds: 5,
            qps: 0.0,
            system_tokens: 1,
            history_tokens: 1,
            question_tokens: 1,
            answer_tokens: 1,
            docs: 0,
            doc_tokens: 1,
            skew: 0.0,
            doc_skew: 0.0,
            agent: false,
            tool_chars_min: 1000,
            tool_chars_max: 4000,
            pause_ms: 200,
            no_session_header: false,
            api: Api::Chat,
            chars_per_token: 4,
            seed: 1,
            engine_header: String::new(),
            warmup_s: 0.0,
            label: String::new(),
            json: false,
        };
        assert!(rounds_per_user(&a).iter().all(|&r| r == 5));
        a.skew = 1.0;
        let r = rounds_per_user(&a);
        assert!(r[0] > 5 * 4 && r[99] == 1, "{:?}", &r[..5]);
        let mean = r.iter().sum::<usize>() as f64 / 100.0;
        assert!((3.0..8.0).contains(&mean), "{mean}");
    }
}
