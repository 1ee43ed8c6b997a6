//! What exact KV routing costs a router worker per request, each step alone: the prompt's token
//! ids from the request body (a ~1k- and a ~4k-token `/v1/completions` prompt; a 10-message
//! ~1k-token `/v1/chat/completions` request, template rendered then encoded) with the
//! `perf/fixtures/tiny-llama` tokenizer, its block keys (16 tokens a block), and `Held::matched`
//! over 8 engines holding 20k blocks each (fed as KV event batches: shared system prompts and
//! their follow-ups), the 4k prompt's first half on one of them; then the three together.
//!
//! It runs with the router's allocator (mimalloc): tokenizing allocates per word, and with
//! glibc's malloc it took a quarter to a third longer.
//!
//! Not measured here: reading the body, the policy's pick (`lmstack-route`'s `pick` bench), or
//! applying events (off the request path).

use std::hint::black_box;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use criterion::{BenchmarkId, Criterion, criterion_group, criterion_main};
use lmstack_kv::event::{Batch, BlockHash, Event, Stored};
use lmstack_kv::index::{EngineIndex, Held, IndexLimits};
use lmstack_kv::key::{RequestExtras, prompt_keys};
use lmstack_kv::prompt::PromptTokenizer;
use serde_json::json;
use xxhash_rust::xxh3::xxh3_64_with_seed;

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

const BLOCK_SIZE: usize = 16;
const ENGINES: usize = 8;
const BLOCKS_PER_ENGINE: usize = 20_000;
/// The engine holding the 4k prompt's first half.
const WARM_ENGINE: usize = 3;
const VOCAB: u64 = 8192;

const WORDS: [&str; 48] = [
    "the",
    "router",
    "engine",
    "cache",
    "block",
    "prompt",
    "request",
    "token",
    "model",
    "of",
    "a",
    "to",
    "and",
    "is",
    "in",
    "that",
    "for",
    "with",
    "on",
    "every",
    "prefix",
    "user",
    "answer",
    "question",
    "document",
    "summary",
    "latency",
    "memory",
    "first",
    "second",
    "system",
    "assistant",
    "write",
    "explain",
    "why",
    "how",
    "when",
    "Kubernetes",
    "replica",
    "session",
    "history",
    "report",
    "numbers",
    "table",
    "result",
    "error",
    "retry",
    "stream",
];

/// English-like text of at least `tokens` tokens (encoded without special tokens), different
/// for each `seed`.
fn text(tok: &PromptTokenizer, tokens: usize, seed: u64) -> String {
    let mut out = String::new();
    let mut i = 0u64;
    loop {
        // A sentence of 6 to 17 words.
        let words = 6 + xxh3_64_with_seed(&i.to_le_bytes(), seed) % 12;
        for w in 0..words {
            let r = xxh3_64_with_seed(&(i * 64 + w).to_le_bytes(), seed ^ 0x5eed);
            let word = WORDS[(r % WORDS.len() as u64) as usize];
            if w == 0 {
                let mut c = word.chars();
                out.extend(c.next().map(|c| c.to_ascii_uppercase()));
                out.push_str(c.as_str());
            } else {
                out.push(' ');
                out.push_str(word);
            }
        }
        out.push_str(if i % 5 == 4 { ".\n" } else { ". " });
        i += 1;
        // Encoded once it could be long enough (it runs ~4 bytes a token), then every sentence.
        if out.len() >= tokens * 3 && tok.encode(&out, false).expect("the text encodes").len() >= tokens {
            return out;
        }
    }
}

fn random_tokens(n: usize, seed: u64) -> Vec<u32> {
    (0..n as u64)
        .map(|i| (xxh3_64_with_seed(&i.to_le_bytes(), seed) % VOCAB) as u32)
        .collect()
}

/// One engine's index, fed as its KV events would feed it.
struct Engine {
    index: EngineIndex,
    seq: i64,
    next_hash: BlockHash,
}

impl Engine {
    fn new(id: usize) -> Self {
        Self {
            index: EngineIndex::new(Arc::new(Held::default()), IndexLimits::default()),
            seq: 0,
            next_hash: (id as u64) << 40,
        }
    }

    /// One batch storing `tokens`' full blocks chained to `parent`; their hashes.
    fn store(&mut self, parent: Option<BlockHash>, tokens: &[u32]) -> Vec<BlockHash> {
        let n = tokens.len() / BLOCK_SIZE;
        let hashes: Vec<BlockHash> = (0..n as u64).map(|i| self.next_hash + i).collect();
        self.next_hash += n as u64;
        let batch = Batch {
            ts: 0.0,
            events: vec![Event::Stored(Stored {
                hashes: hashes.clone(),
                parent,
                token_ids: tokens[..n * BLOCK_SIZE].to_vec(),
                block_size: BLOCK_SIZE as u32,
                lora_name: None,
                lora_id: None,
                medium: Some("GPU".into()),
                extra_keys: None,
                group: None,
                spec_kind: None,
            })],
            dp_rank: None,
        };
        self.index.apply(self.seq, &batch, 0);
        self.seq += 1;
        hashes
    }
}

/// 8 engines of 20k blocks each: 4 system prompts of 32 blocks on every engine, then requests
/// of 8 to 120 blocks after one of them; `warm` stored on [`WARM_ENGINE`] first.
fn engines(warm: &[u32]) -> Vec<Arc<Held>> {
    (0..ENGINES)
        .map(|e| {
            let mut engine = Engine::new(e);
            if e == WARM_ENGINE {
                engine.store(None, warm);
            }
            let systems: Vec<BlockHash> = (0..4)
                .map(|s| {
                    let hashes = engine.store(None, &random_tokens(32 * BLOCK_SIZE, s));
                    hashes[hashes.len() - 1]
                })
                .collect();
            let mut r = 0u64;
            while engine.index.held().blocks() < BLOCKS_PER_ENGINE {
                let seed = ((e as u64) << 32) | r;
                let blocks = 8 + (xxh3_64_with_seed(b"len", seed) % 113) as usize;
                engine.store(Some(systems[r as usize % 4]), &random_tokens(blocks * BLOCK_SIZE, seed));
                r += 1;
            }
            engine.index.held().clone()
        })
        .collect()
}

fn completion_body(prompt: &str) -> Vec<u8> {
    serde_json::to_vec(&json!({"model": "tiny-llama", "prompt": prompt, "max_tokens": 64})).expect("serializes")
}

/// A system prompt, then 4 rounds of user and assistant, then the user's question: ~100 tokens
/// each with the template's.
fn chat_body(tok: &PromptTokenizer) -> Vec<u8> {
    let messages: Vec<_> = (0..10u64)
        .map(|i| {
            let role = match i {
                0 => "system",
                i if i % 2 == 1 => "user",
                _ => "assistant",
            };
            json!({"role": role, "content": text(tok, 95, 100 + i)})
        })
        .collect();
    serde_json::to_vec(&json!({"model": "tiny-llama", "messages": messages, "max_tokens": 64})).expect("serializes")
}

fn bench(c: &mut Criterion) {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../perf/fixtures/tiny-llama");
    let tok = PromptTokenizer::from_dir(&dir).expect("tiny-llama loads");
    let completions = [
        ("1k", completion_body(&text(&tok, 1000, 1))),
        ("4k", completion_body(&text(&tok, 4000, 4))),
    ];
    let chat = chat_body(&tok);
    let chat_tokens = tok.chat(&chat).expect("the chat renders").len();
    let prompt = tok.completion(&completions[1].1).expect("the prompt encodes");
    let mut keys = Vec::new();
    prompt_keys(&prompt, BLOCK_SIZE, RequestExtras::default(), &mut keys);
    let half = keys.len() / 2;
    let helds = engines(&prompt[..half * BLOCK_SIZE]);
    let matched: Vec<usize> = helds.iter().map(|h| h.matched(&keys)).collect();
    let expected: Vec<usize> = (0..ENGINES).map(|e| if e == WARM_ENGINE { half } else { 0 }).collect();
    assert_eq!(
        matched, expected,
        "the prompt's first half must match on one engine only"
    );
    let sizes: Vec<String> = completions
        .iter()
        .map(|(name, body)| format!("{name}: {} tokens", tok.completion(body).map_or(0, |t| t.len())))
        .collect();
    eprintln!(
        "completions {}; chat: 10 messages, {chat_tokens} tokens, {} bytes; {} keys; {} blocks per engine",
        sizes.join(", "),
        chat.len(),
        keys.len(),
        helds[0].blocks()
    );

    let mut g = c.benchmark_group("kv_lookup");
    for (name, body) in &completions {
        g.bench_function(BenchmarkId::new("tokenize_completion", name), |b| {
            b.iter(|| tok.completion(black_box(body)));
        });
    }
    g.bench_function(BenchmarkId::new("tokenize_chat_10_messages", "1k"), |b| {
        b.iter(|| tok.chat(black_box(&chat)));
    });
    let mut out = Vec::new();
    g.bench_function(BenchmarkId::new("prompt_keys", "4k"), |b| {
        b.iter(|| prompt_keys(black_box(&prompt), BLOCK_SIZE, RequestExtras::default(), &mut out));
    });
    let mut found = [0usize; ENGINES];
    g.bench_function(BenchmarkId::new("matched_8_engines", "4k"), |b| {
        b.iter(|| {
            for (f, h) in found.iter_mut().zip(&helds) {
                *f = h.matched(black_box(&keys));
            }
            black_box(&found);
        });
    });
    g.bench_function(BenchmarkId::new("all_three_completion", "4k"), |b| {
        b.iter(|| {
            let tokens = tok.completion(black_box(&completions[1].1)).unwrap_or_default();
            prompt_keys(&tokens, BLOCK_SIZE, RequestExtras::default(), &mut out);
            for (f, h) in found.iter_mut().zip(&helds) {
                *f = h.matched(&out);
            }
            black_box(&found);
        });
    });
    g.finish();
}

criterion_group! {
    name = benches;
    config = Criterion::default()
        .sample_size(20)
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(2));
    targets = bench
}
criterion_main!(benches);
