//! The JSON peek on what the proxy reads before routing every request: a chat completion
//! whose prompt is ~4k tokens (~16 KiB of text: a system prompt and seven turns, with the
//! escapes real text has), peeked for `model`, `stream` and the session field; then
//! `prompt_pieces`, which walks the raw messages to feed the prefix hasher (here a byte
//! count, so the figure is the walk alone; hashing is benched in lmstack-route). And the same
//! prompt as an Anthropic Messages request (system, tools, and turns with thinking, tool
//! calls and tool results, as a coding agent sends them): its conversion to the chat request
//! vLLM renders (`anthropic::to_chat`, what exact KV routing tokenizes) and its prompt
//! pieces (`anthropic::prompt_pieces`, which convert it too).

use std::hint::black_box;

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use lmstack_http::anthropic;
use lmstack_http::peek::{peek, prompt_pieces};
use serde_json::json;

/// Roughly 4 bytes a token.
const PROMPT_BYTES: usize = 4096 * 4;
const MESSAGES: usize = 8;

/// `len` bytes of word-like text with the newlines and quotes that JSON escapes.
fn text(seed: usize, len: usize) -> String {
    const WORDS: [&str; 12] = [
        "the",
        "router",
        "sends",
        "each",
        "request",
        "to",
        "an",
        "engine",
        "\"replica\"",
        "that",
        "holds",
        "blocks.\n",
    ];
    let mut out = String::with_capacity(len + 16);
    let mut i = seed;
    while out.len() < len {
        out.push_str(WORDS[i % WORDS.len()]);
        out.push(' ');
        i = i.wrapping_mul(31).wrapping_add(7);
    }
    out
}

fn chat_body() -> Vec<u8> {
    let mut messages = vec![json!({"role": "system", "content": text(0, PROMPT_BYTES / MESSAGES)})];
    for m in 1..MESSAGES {
        let role = if m % 2 == 1 { "user" } else { "assistant" };
        messages.push(json!({"role": role, "content": text(m, PROMPT_BYTES / MESSAGES)}));
    }
    serde_json::to_vec(&json!({
        "model": "meta-llama/Llama-3.1-8B-Instruct",
        "messages": messages,
        "stream": true,
        "stream_options": {"include_usage": true},
        "max_tokens": 512,
        "temperature": 0.7,
        "user": "session-8f14e45f",
    }))
    .expect("a JSON value serialises")
}

/// The chat body's prompt as a coding agent's Messages request.
fn messages_body() -> Vec<u8> {
    let mut messages = Vec::new();
    for m in 1..MESSAGES {
        let chunk = text(m, PROMPT_BYTES / MESSAGES);
        messages.push(if m % 2 == 1 {
            json!({"role": "user", "content": [
                {"type": "tool_result", "tool_use_id": format!("toolu_{m}"), "content": [{"type": "text", "text": chunk}]}]})
        } else {
            json!({"role": "assistant", "content": [
                {"type": "thinking", "thinking": "Read the file next.", "signature": "c2lnbmF0dXJl"},
                {"type": "text", "text": chunk},
                {"type": "tool_use", "id": format!("toolu_{}", m + 1), "name": "read_file", "input": {"path": "src/lib.rs"}}]})
        });
    }
    serde_json::to_vec(&json!({
        "model": "claude-sonnet-4-5",
        "max_tokens": 512,
        "stream": true,
        "system": [{"type": "text", "text": "x-anthropic-billing-header: cc_version=2.0; cch=1;"},
                   {"type": "text", "text": text(0, PROMPT_BYTES / MESSAGES), "cache_control": {"type": "ephemeral"}}],
        "tools": [{"name": "read_file", "description": "Reads a file",
                   "input_schema": {"type": "object", "properties": {"path": {"type": "string"}}, "required": ["path"]}}],
        "messages": messages,
    }))
    .expect("a JSON value serialises")
}

fn bench(c: &mut Criterion) {
    let body = chat_body();
    let p = peek(&body, Some("user")).expect("the bench body must peek");
    assert_eq!(p.model.as_deref(), Some("meta-llama/Llama-3.1-8B-Instruct"));
    assert!(p.stream);
    assert_eq!(p.session.as_deref(), Some("session-8f14e45f"));
    let mut fed = 0usize;
    assert!(prompt_pieces(&p, |piece| fed += piece.len()));
    assert!(fed >= PROMPT_BYTES, "the prompt fed {fed} bytes");

    let mut g = c.benchmark_group("chat_4k_token_prompt_8_messages");
    g.throughput(Throughput::Bytes(body.len() as u64));
    g.bench_function("peek", |b| {
        b.iter(|| peek(black_box(&body), Some("user")));
    });
    g.bench_function("prompt_pieces", |b| {
        b.iter(|| {
            let mut fed = 0usize;
            prompt_pieces(black_box(&p), |piece| fed += piece.len());
            fed
        });
    });
    g.bench_function("peek_then_prompt_pieces", |b| {
        b.iter(|| {
            let mut fed = 0usize;
            if let Ok(p) = peek(black_box(&body), Some("user")) {
                prompt_pieces(&p, |piece| fed += piece.len());
            }
            fed
        });
    });
    g.finish();

    let body = messages_body();
    assert!(anthropic::to_chat(&body).is_ok());
    let mut g = c.benchmark_group("messages_4k_token_prompt_8_messages");
    g.throughput(Throughput::Bytes(body.len() as u64));
    g.bench_function("to_chat", |b| {
        b.iter(|| anthropic::to_chat(black_box(&body)).map(|c| c.len()));
    });
    g.bench_function("prompt_pieces", |b| {
        b.iter(|| {
            let mut fed = 0usize;
            anthropic::prompt_pieces(black_box(&body), |piece| fed += piece.len());
            fed
        });
    });
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
