//! The affinity table at 10^6 entries: recording and matching a 4k-token prompt (~16 KiB of
//! text, 128 blocks of 128 bytes), alone and while every other core records too.

use std::hint::black_box;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use criterion::{Criterion, criterion_group, criterion_main};
use lmstack_route::blocks::hash_blocks;
use lmstack_route::{AffinityLimits, AffinityTable, EndpointTag};

const BLOCK_BYTES: usize = 128;
const PROMPT_BYTES: usize = 4096 * 4;
const ENTRIES: usize = 1_000_000;

fn prompt(seed: u64) -> Vec<u64> {
    let text: Vec<u8> = (0..PROMPT_BYTES)
        .map(|i| (xxhash_rust::xxh3::xxh3_64_with_seed(&(i as u64 / 8).to_le_bytes(), seed) % 251) as u8)
        .collect();
    let mut out = Vec::new();
    hash_blocks(&text, BLOCK_BYTES, 1 << 20, &mut out);
    out
}

fn filled() -> (Arc<AffinityTable>, Vec<EndpointTag>) {
    let table = Arc::new(AffinityTable::new(AffinityLimits {
        max_entries: ENTRIES * 2,
        max_bytes: usize::MAX,
        max_endpoints: 64,
    }));
    let tags: Vec<EndpointTag> = (0..8)
        .filter_map(|i| table.register(&format!("http://e{i}:8000")))
        .collect();
    let per_prompt = PROMPT_BYTES / BLOCK_BYTES;
    for p in 0..(ENTRIES / per_prompt) as u64 {
        table.record(&prompt(p), tags[(p % 8) as usize], p as u32);
    }
    (table, tags)
}

fn bench(c: &mut Criterion) {
    let (table, tags) = filled();
    let last = (ENTRIES / (PROMPT_BYTES / BLOCK_BYTES)) as u64 - 1;
    let known = prompt(last);
    let fresh: Vec<Vec<u64>> = (0..64).map(|i| prompt(1_000_000 + i)).collect();
    let candidates: Vec<Option<EndpointTag>> = tags.iter().copied().map(Some).collect();
    let mut out = vec![0u32; candidates.len()];
    table.matched(&known, &candidates, &mut out);
    assert_eq!(
        out[(last % 8) as usize],
        known.len() as u32,
        "the known prompt must match in full: {out:?}"
    );
    let mut g = c.benchmark_group("affinity_1M_entries_4k_token_prompt");
    g.bench_function("matched", |b| {
        b.iter(|| table.matched(black_box(&known), &candidates, &mut out));
    });
    let mut i = 0usize;
    g.bench_function("record", |b| {
        b.iter(|| {
            i += 1;
            table.record(black_box(&fresh[i % fresh.len()]), tags[i % tags.len()], i as u32);
        });
    });

    // The same while every other core records new prompts as fast as it can.
    let stop = Arc::new(AtomicBool::new(false));
    let others = std::thread::available_parallelism()
        .map_or(1, |n| n.get())
        .saturating_sub(1)
        .max(1);
    let writers: Vec<_> = (0..others)
        .map(|w| {
            let (table, stop, tag) = (table.clone(), stop.clone(), tags[w % tags.len()]);
            std::thread::spawn(move || {
                let prompts: Vec<Vec<u64>> = (0..32).map(|i| prompt(2_000_000 + (w as u64) * 100 + i)).collect();
                let mut n = 0usize;
                while !stop.load(Ordering::Relaxed) {
                    table.record(&prompts[n % prompts.len()], tag, n as u32);
                    n += 1;
                }
            })
        })
        .collect();
    g.bench_function("matched_while_all_cores_record", |b| {
        b.iter(|| table.matched(black_box(&known), &candidates, &mut out));
    });
    g.bench_function("record_while_all_cores_record", |b| {
        b.iter(|| {
            i += 1;
            table.record(black_box(&fresh[i % fresh.len()]), tags[i % tags.len()], i as u32);
        });
    });
    stop.store(true, Ordering::Relaxed);
    for w in writers {
        let _ = w.join();
    }
    g.finish();
    let stats = table.stats();
    eprintln!(
        "table: {} entries in {} slots, {} MiB, {} evictions",
        stats.entries,
        stats.capacity,
        stats.bytes >> 20,
        stats.evictions
    );
}

criterion_group!(benches, bench);
criterion_main!(benches);
