//! The multi-round QA workload (after vLLM production-stack's `benchmarks/multi-round-qa`):
//! users hold chats of several rounds; every round re-sends the whole conversation (a shared
//! system prompt, optionally a shared document, the user's own long history, earlier answers)
//! plus a new question, and streams a fixed-length answer.
//!
//! `--active` users run at once; when one finishes its rounds, the next user starts. Each
//! active user paces its rounds to `--qps` across all active users (or goes as fast as
//! answers come when 0); with pacing, the first users join spread over one interval. Variants: `--no-session-header` drops `x-user-id`; `--docs N` gives
//! users one of N long documents after the system prompt (RAG); `--skew S` makes user
//! activity Zipf-distributed (heavy users get more rounds). The work is a fixed list of
//! requests, so runs against different targets do the same work.

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
    /// Base URL: http://host:port
    #[arg(long)]
    pub url: String,
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
    #[arg(long, default_value_t = 1000)]
    pub system_tokens: usize,
    /// Each user's own history, sent from the first round on.
    #[arg(long, default_value_t = 2000)]
    pub history_tokens: usize,
    #[arg(long, default_value_t = 50)]
    pub question_tokens: usize,
    #[arg(long, default_value_t = 32)]
    pub answer_tokens: usize,
    /// Documents shared by users, placed after the system prompt (0: none).
    #[arg(long, default_value_t = 0)]
    pub docs: usize,
    #[arg(long, default_value_t = 2000)]
    pub doc_tokens: usize,
    /// Zipf exponent of user activity (0: every user alike).
    #[arg(long, default_value_t = 0.0)]
    pub skew: f64,
    /// Send no `x-user-id` header.
    #[arg(long)]
    pub no_session_header: bool,
    /// Characters per token of the generated text (the simulator's default is 4).
    #[arg(long, default_value_t = 4)]
    pub chars_per_token: usize,
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
    #[arg(long, default_value = "multi-round")]
    pub label: String,
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
    pub ttft_ms: Percentiles,
    /// Mean gap between streamed chunks, over all requests.
    pub itl_ms_mean: f64,
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
    gaps_us: f64,
    gaps: u64,
    requests: u64,
    errors: u64,
}

pub fn run_blocking(args: &MultiRoundArgs) -> anyhow::Result<MultiRoundSummary> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    runtime.block_on(run(args.clone()))
}

async fn run(a: MultiRoundArgs) -> anyhow::Result<MultiRoundSummary> {
    let host = a
        .url
        .strip_prefix("http://")
        .ok_or_else(|| anyhow::anyhow!("--url must start with http://"))?
        .trim_end_matches('/')
        .to_owned();
    let a = Arc::new(a);
    let rounds = Arc::new(rounds_per_user(&a));
    let system = Arc::new(text(a.seed, a.system_tokens, a.chars_per_token));
    let docs: Arc<Vec<String>> = Arc::new(
        (0..a.docs)
            .map(|d| text(a.seed ^ (1000 + d as u64), a.doc_tokens, a.chars_per_token))
            .collect(),
    );
    let next_user = Arc::new(Mutex::new(0usize));
    let recorder = Arc::new(Mutex::new(Recorder {
        ttft: Histogram::new_with_bounds(1, 600_000_000, 3)?,
        gaps_us: 0.0,
        gaps: 0,
        requests: 0,
        errors: 0,
    }));
    let interval = (a.qps > 0.0).then(|| Duration::from_secs_f64(a.active as f64 / a.qps));
    let start = Instant::now();
    let mut slots = Vec::new();
    for slot in 0..a.active.max(1) {
        let (a, rounds, system, docs) = (a.clone(), rounds.clone(), system.clone(), docs.clone());
        let (next_user, recorder, host) = (next_user.clone(), recorder.clone(), host.clone());
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
                    *n - 1
                };
                chat(&a, &host, user, rounds[user], &system, &docs, interval, &recorder).await;
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
        ttft_ms: Percentiles::of(&r.ttft),
        itl_ms_mean: if r.gaps == 0 {
            0.0
        } else {
            r.gaps_us / r.gaps as f64 / 1000.0
        },
    })
}

/// One user's chat: `rounds` requests on one keep-alive connection.
#[allow(clippy::too_many_arguments)]
async fn chat(
    a: &MultiRoundArgs,
    host: &str,
    user: usize,
    rounds: usize,
    system: &str,
    docs: &[String],
    interval: Option<Duration>,
    recorder: &Mutex<Recorder>,
) {
    let cpt = a.chars_per_token;
    let history = text(a.seed ^ (1 << 40) ^ user as u64, a.history_tokens, cpt);
    let mut first = String::new();
    if !docs.is_empty() {
        first.push_str(&docs[user % docs.len()]);
        first.push('\n');
    }
    first.push_str(&history);
    let mut messages = vec![json!({"role": "system", "content": system})];
    let mut sender: Option<http1::SendRequest<Full<Bytes>>> = None;
    let mut next_at = Instant::now();
    for round in 0..rounds {
        if let Some(i) = interval {
            tokio::time::sleep_until(next_at.into()).await;
            next_at += i;
        }
        let question = text(
            a.seed ^ (2 << 40) ^ ((user as u64) << 16) ^ round as u64,
            a.question_tokens,
            cpt,
        );
        let content = if round == 0 {
            format!("{first}\n{question}")
        } else {
            question
        };
        messages.push(json!({"role": "user", "content": content}));
        let body = json!({
            "model": a.model, "messages": messages, "stream": true,
            "max_tokens": a.answer_tokens, "ignore_eos": true,
        });
        let outcome = exchange(&mut sender, host, &body, (!a.no_session_header).then_some(user)).await;
        let mut r = recorder.lock().unwrap_or_else(|p| p.into_inner());
        match outcome {
            Ok((ttft, gaps, answer)) => {
                r.requests += 1;
                let _ = r.ttft.record(ttft.as_micros().max(1) as u64);
                r.gaps += gaps.len() as u64;
                r.gaps_us += gaps.iter().map(|g| g.as_micros() as f64).sum::<f64>();
                drop(r);
                messages.push(json!({"role": "assistant", "content": answer}));
            }
            Err(_) => {
                r.errors += 1;
                drop(r);
                sender = None;
                messages.push(json!({"role": "assistant", "content": ""}));
            }
        }
    }
}

/// Sends one streaming chat request; returns the time to the first event, the gaps between
/// chunks, and the answer's text.
async fn exchange(
    sender: &mut Option<http1::SendRequest<Full<Bytes>>>,
    host: &str,
    body: &Value,
    user: Option<usize>,
) -> anyhow::Result<(Duration, Vec<Duration>, String)> {
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
    let mut req = Request::post("/v1/chat/completions")
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
    let answer = String::from_utf8_lossy(&raw)
        .lines()
        .filter_map(|l| l.strip_prefix("data: "))
        .filter_map(|d| serde_json::from_str::<Value>(d).ok())
        .filter_map(|v| v["choices"][0]["delta"]["content"].as_str().map(str::to_owned))
        .collect::<String>();
    Ok((first.ok_or_else(|| anyhow::anyhow!("no events"))?, gaps, answer))
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
            url: String::new(),
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
            no_session_header: false,
            chars_per_token: 4,
            seed: 1,
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
