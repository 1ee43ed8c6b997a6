//! Fuzz target: reading an engine's load from its Prometheus text
//! (`lmstack_snapshot::vllm::engine_stats`), as the prober does with whatever `/metrics`
//! answers (read as UTF-8, lossily).
//!
//! Input: the text. Properties:
//! - the figures it finds are finite and the KV cache usage lies within 0..=1, so that an
//!   endpoint carrying them validates and travels in a snapshot: JSON has no infinities, and
//!   one that serde_json wrote as `null` would make every router reject the snapshot;
//! - text without a `vllm:` metric name gives nothing.
//!
//! Not covered here: which metric names vLLM exports (control/snapshot/tests/vllm_fixture.rs).

#![no_main]

use libfuzzer_sys::fuzz_target;
use lmstack_snapshot::{Endpoint, Snapshot, vllm};

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    let Some(stats) = vllm::engine_stats(&text) else {
        return;
    };
    assert!(text.contains("vllm:"), "figures from text without vLLM's metrics");
    let figures = [
        stats.running,
        stats.waiting,
        stats.kv_cache_usage,
        stats.prefix_cache_queries,
        stats.prefix_cache_hits,
    ];
    assert!(figures.iter().all(|f| f.is_finite()), "{stats:?}");
    assert!((0.0..=1.0).contains(&stats.kv_cache_usage));

    let snapshot = Snapshot {
        version: 1,
        endpoints: vec![Endpoint {
            url: "http://engine:8000".into(),
            addr: ([127, 0, 0, 1], 8000).into(),
            healthy: true,
            engine: Some(stats),
        }],
        models: Vec::new(),
    };
    snapshot.validate().expect("an endpoint with these figures validates");
    let line = serde_json::to_string(&snapshot).expect("writes as JSON");
    let back: Snapshot = serde_json::from_str(&line).unwrap_or_else(|e| panic!("{line} does not read back: {e}"));
    back.validate().expect("and validates when read back");
});
