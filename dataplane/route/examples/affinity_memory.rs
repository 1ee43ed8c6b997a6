//! The affinity table under a synthetic load of `--prompts` prompts (default 10^6) of
//! `--blocks` blocks, many sharing prefixes: prints the process's resident memory before the
//! table exists, once it is allocated, and after the load, as one JSON line.
//!
//! `cargo run --release -p lmstack-route --example affinity_memory -- [--max-mib 64]`

use lmstack_route::{AffinityLimits, AffinityTable};

fn rss_bytes() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|kb| kb.parse::<u64>().ok())
        })
        .map_or(0, |kb| kb * 1024)
}

fn arg(name: &str, default: u64) -> u64 {
    let args: Vec<String> = std::env::args().collect();
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn main() {
    let max_mib = arg("--max-mib", 64);
    let prompts = arg("--prompts", 1_000_000);
    let blocks = arg("--blocks", 32) as usize;
    let before = rss_bytes();
    let table = AffinityTable::new(AffinityLimits {
        max_entries: usize::MAX,
        max_bytes: (max_mib as usize) << 20,
        max_endpoints: 64,
    });
    let tags: Vec<_> = (0..16)
        .filter_map(|i| table.register(&format!("http://e{i}:8000")))
        .collect();
    let allocated = rss_bytes();
    let mut chain = vec![0u64; blocks];
    let start = std::time::Instant::now();
    for p in 0..prompts {
        // One of 64 shared heads (a system prompt, a document), then the prompt's own blocks.
        let mut parent = p % 64;
        for (i, b) in chain.iter_mut().enumerate() {
            let own = if i < blocks / 4 { 0 } else { p };
            parent = xxhash_rust::xxh3::xxh3_64_with_seed(&own.to_le_bytes(), parent ^ i as u64);
            *b = parent;
        }
        table.record(&chain, tags[(p % tags.len() as u64) as usize], p as u32);
    }
    let elapsed = start.elapsed();
    let after = rss_bytes();
    let stats = table.stats();
    println!(
        "{{\"prompts\":{prompts},\"blocks_per_prompt\":{blocks},\"max_bytes\":{},\"table_bytes\":{},\"entries\":{},\"capacity\":{},\"evictions\":{},\"rss_before\":{before},\"rss_allocated\":{allocated},\"rss_after\":{after},\"growth\":{},\"seconds\":{:.2}}}",
        max_mib << 20,
        stats.bytes,
        stats.entries,
        stats.capacity,
        stats.evictions,
        after.saturating_sub(before),
        elapsed.as_secs_f64()
    );
}
