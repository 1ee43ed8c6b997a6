//! One routing decision of the `prefix` policy with a 4k-token prompt (~16 KiB of text, 128
//! blocks of 128 bytes) at 8 and 64 endpoints: hashing the prompt into blocks, matching them
//! against a table holding 1,000 such prompts (this one among them, on one endpoint: a
//! follow-up round), finding the session's last endpoint, and the policy's pick; each step
//! alone; and the pick alone for every policy.

use std::hint::black_box;

use criterion::{BenchmarkId, Criterion, criterion_group, criterion_main};
use lmstack_route::blocks::hash_blocks;
use lmstack_route::{
    AffinityLimits, AffinityTable, EndpointTag, Load, Policy, PolicyName, PolicyParams, PoolView, PrefixInfo,
    RouteRequest,
};

const BLOCK_BYTES: usize = 128;
const PROMPT_BYTES: usize = 4096 * 4;

fn text(seed: u64) -> Vec<u8> {
    (0..PROMPT_BYTES)
        .map(|i| (xxhash_rust::xxh3::xxh3_64_with_seed(&(i as u64 / 8).to_le_bytes(), seed) % 251) as u8)
        .collect()
}

struct Pool {
    keys: Vec<u64>,
    loads: Vec<Load>,
}

impl PoolView for Pool {
    fn len(&self) -> usize {
        self.keys.len()
    }
    fn eligible(&self, _: usize) -> bool {
        true
    }
    fn key(&self, i: usize) -> u64 {
        self.keys[i]
    }
    fn load(&self, i: usize) -> Load {
        self.loads[i]
    }
}

fn bench(c: &mut Criterion) {
    let mut g = c.benchmark_group("pick_4k_token_prompt");
    for n in [8usize, 64] {
        let table = AffinityTable::new(AffinityLimits {
            max_entries: 1 << 24,
            max_bytes: usize::MAX,
            max_endpoints: 128,
        });
        let tags: Vec<Option<EndpointTag>> = (0..n).map(|i| table.register(&format!("http://e{i}:8000"))).collect();
        let mut blocks = Vec::new();
        for p in 0..1000u64 {
            hash_blocks(&text(p), BLOCK_BYTES, 1 << 20, &mut blocks);
            table.record(
                &blocks,
                tags[p as usize % n].unwrap_or_else(|| unreachable!()),
                p as u32,
            );
        }
        let pool = Pool {
            keys: (0..n)
                .map(|i| lmstack_route::endpoint_key(&format!("http://e{i}:8000")))
                .collect(),
            loads: (0..n)
                .map(|i| Load {
                    inflight: (i % 3) as u32,
                    prefill_blocks: (i * 7 % 40) as u64,
                    active_blocks: 0,
                    recent: 10.0 + (i % 5) as f64,
                    recent_blocks: 100.0,
                    placed: 2.0,
                    pending: (i % 2) as u32,
                    engine: None,
                })
                .collect(),
        };
        let policy = Policy::new(PolicyName::Prefix, PolicyName::RoundRobin, &PolicyParams::default());
        let prompt = text(999);
        let mut matched = vec![0u32; n];
        g.bench_function(BenchmarkId::new("hash_match_pick", n), |b| {
            b.iter(|| {
                hash_blocks(black_box(&prompt), BLOCK_BYTES, 8192, &mut blocks);
                let found = table.matched(&blocks, &tags, &mut matched);
                let session_home = table.latest(0xfeed, &tags, 1000);
                let req = RouteRequest {
                    session_key: Some("user-1"),
                    ticket: 1,
                    prefix: Some(PrefixInfo {
                        blocks: blocks.len(),
                        matched: &matched,
                        shared: found.shared,
                        session_home,
                        tie_key: 7,
                    }),
                };
                black_box(policy.pick(&pool, &req))
            });
        });
        g.bench_function(BenchmarkId::new("hash_only", n), |b| {
            b.iter(|| hash_blocks(black_box(&prompt), BLOCK_BYTES, 8192, &mut blocks));
        });
        g.bench_function(BenchmarkId::new("match_only", n), |b| {
            b.iter(|| black_box(table.matched(black_box(&blocks), &tags, &mut matched)));
        });
        for name in PolicyName::ALL {
            let policy = Policy::new(name, PolicyName::RoundRobin, &PolicyParams::default());
            let req = RouteRequest {
                session_key: Some("user-1"),
                ticket: 1,
                prefix: Some(PrefixInfo {
                    blocks: blocks.len(),
                    matched: &matched,
                    shared: 3,
                    session_home: None,
                    tie_key: 7,
                }),
            };
            g.bench_function(BenchmarkId::new(format!("pick_only_{name}"), n), |b| {
                b.iter(|| black_box(policy.pick(black_box(&pool), &req)));
            });
        }
    }
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
