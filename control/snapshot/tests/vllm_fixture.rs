//! The real `/metrics` of vLLM 0.32 (CPU build), captured after traffic.

#[test]
fn reads_a_real_vllm_metrics_page() {
    let text = include_str!("fixtures/vllm-0.32-cpu-metrics.txt");
    let s = lmstack_snapshot::vllm::engine_stats(text).expect("vLLM's load metrics");
    assert_eq!(s.running, 0.0);
    assert_eq!(s.waiting, 0.0);
    assert_eq!(s.kv_cache_usage, 0.0);
    assert_eq!(s.prefix_cache_queries, 464923.0);
    assert_eq!(s.prefix_cache_hits, 408288.0);
}
