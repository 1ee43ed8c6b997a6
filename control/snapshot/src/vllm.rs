//! Reading an engine's figures from vLLM's Prometheus text (`GET /metrics`).
//!
//! Metric names drift across vLLM versions; both the current and the older names are read:
//! `vllm:kv_cache_usage_perc` (old: `vllm:gpu_cache_usage_perc`),
//! `vllm:prefix_cache_{queries,hits}_total` (old: `vllm:gpu_prefix_cache_{queries,hits}_total`).
//! Series of several engines (data-parallel ranks) are summed, KV usage takes the highest.
//! A pure function of the text: the scraping is the caller's.

use crate::EngineStats;

/// The figures in `text`, or `None` when it has none of vLLM's load metrics.
pub fn engine_stats(text: &str) -> Option<EngineStats> {
    let mut stats = EngineStats::default();
    let mut found = false;
    for line in text.lines() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let Some((name, value)) = sample(line) else { continue };
        let Ok(value) = value.parse::<f64>() else { continue };
        if !value.is_finite() {
            continue;
        }
        match name {
            "vllm:num_requests_running" => add(&mut stats.running, value),
            "vllm:num_requests_waiting" => add(&mut stats.waiting, value),
            "vllm:kv_cache_usage_perc" | "vllm:gpu_cache_usage_perc" => {
                stats.kv_cache_usage = stats.kv_cache_usage.max(value.clamp(0.0, 1.0));
            }
            "vllm:prefix_cache_queries_total" | "vllm:gpu_prefix_cache_queries_total" => {
                add(&mut stats.prefix_cache_queries, value);
            }
            "vllm:prefix_cache_hits_total" | "vllm:gpu_prefix_cache_hits_total" => {
                add(&mut stats.prefix_cache_hits, value);
            }
            _ => continue,
        }
        found = true;
    }
    found.then_some(stats)
}

/// Adds a finite `value` to a sum, held within the finite range: JSON has no infinity, and a
/// snapshot carrying one is written with `null` there, which no router reads.
fn add(sum: &mut f64, value: f64) {
    *sum = (*sum + value).clamp(-f64::MAX, f64::MAX);
}

/// A sample line's metric name and value (labels and timestamp skipped).
fn sample(line: &str) -> Option<(&str, &str)> {
    let (name, rest) = match line.find(['{', ' ']) {
        Some(i) if line.as_bytes()[i] == b'{' => {
            // Skip the label set, minding quoted values.
            let mut quoted = false;
            let mut escaped = false;
            let mut end = None;
            for (j, c) in line[i..].char_indices() {
                match c {
                    _ if escaped => escaped = false,
                    '\\' if quoted => escaped = true,
                    '"' => quoted = !quoted,
                    '}' if !quoted => {
                        end = Some(i + j + 1);
                        break;
                    }
                    _ => {}
                }
            }
            (&line[..i], &line[end?..])
        }
        Some(i) => (&line[..i], &line[i..]),
        None => return None,
    };
    Some((name, rest.split_whitespace().next()?))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_current_and_old_names() {
        let text = "# TYPE vllm:num_requests_running gauge\n\
vllm:num_requests_running{engine=\"0\",model_name=\"m\"} 3.0\n\
vllm:num_requests_running{engine=\"1\",model_name=\"m\"} 2.0\n\
vllm:num_requests_waiting{model_name=\"a } b\"} 4 1700000000\n\
vllm:gpu_cache_usage_perc{model_name=\"m\"} 0.5\n\
vllm:gpu_prefix_cache_queries_total{model_name=\"m\"} 100\n\
vllm:gpu_prefix_cache_hits_total{model_name=\"m\"} 40\n";
        let s = engine_stats(text).unwrap();
        assert_eq!(s.running, 5.0);
        assert_eq!(s.waiting, 4.0);
        assert_eq!(s.kv_cache_usage, 0.5);
        assert_eq!((s.prefix_cache_queries, s.prefix_cache_hits), (100.0, 40.0));
        assert_eq!(engine_stats("process_cpu_seconds_total 5\n"), None);
    }

    #[test]
    fn sums_stay_finite_so_that_snapshots_stay_json() {
        // Caught by the engine_metrics fuzz target: two finite series summed to infinity, which
        // serde_json writes as `null`, and a router rejected every snapshot carrying it.
        let text = "vllm:num_requests_running{engine=\"0\"} 1.5e308\n\
vllm:num_requests_running{engine=\"1\"} 1.5e308\n\
vllm:prefix_cache_hits_total{engine=\"0\"} -1.5e308\n\
vllm:prefix_cache_hits_total{engine=\"1\"} -1.5e308\n";
        let s = engine_stats(text).unwrap();
        assert_eq!((s.running, s.prefix_cache_hits), (f64::MAX, -f64::MAX));
        let json = serde_json::to_string(&s).unwrap();
        assert_eq!(serde_json::from_str::<crate::EngineStats>(&json).unwrap(), s);
    }
}
