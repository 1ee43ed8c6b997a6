//! lmstack-agent's metric names, buckets and descriptions, set once at start.

use metrics::{describe_counter, describe_gauge, describe_histogram};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};

pub const TTFT_SECONDS: &str = "lmstack_ebpf_ttft_seconds";
pub const TBT_SECONDS: &str = "lmstack_ebpf_tbt_seconds";
pub const REQUESTS_TOTAL: &str = "lmstack_ebpf_requests_total";
pub const STREAMS_COMPLETED_TOTAL: &str = "lmstack_ebpf_streams_completed_total";
pub const TOKENS_TOTAL: &str = "lmstack_ebpf_tokens_total";
pub const BYTES_TOTAL: &str = "lmstack_ebpf_bytes_total";
pub const KERNEL_EVENTS_TOTAL: &str = "lmstack_ebpf_kernel_events_total";
pub const EVENTS_DROPPED_TOTAL: &str = "lmstack_ebpf_events_dropped_total";
pub const SEGMENTS_TRUNCATED_TOTAL: &str = "lmstack_ebpf_segments_truncated_total";
pub const EVENTS_READ_TOTAL: &str = "lmstack_ebpf_events_read_total";
pub const CONNECTIONS: &str = "lmstack_ebpf_connections";
pub const ATTACHED_CGROUPS: &str = "lmstack_ebpf_attached_cgroups";
pub const PROG_RUNS_TOTAL: &str = "lmstack_ebpf_prog_runs_total";
pub const PROG_RUN_NANOSECONDS_TOTAL: &str = "lmstack_ebpf_prog_run_nanoseconds_total";

/// TTFT buckets: 1 ms to 60 s, fine enough around typical first-token times that
/// `histogram_quantile` lands within a few milliseconds of the truth.
const TTFT_BUCKETS: &[f64] = &[
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.09, 0.1, 0.11, 0.125, 0.15, 0.2, 0.25, 0.3, 0.4, 0.5, 0.75, 1.0,
    1.5, 2.0, 3.0, 5.0, 10.0, 20.0, 60.0,
];
/// Time-between-tokens buckets: 0.5 ms to 2 s, 2.5 ms apart where decode steps usually are.
const TBT_BUCKETS: &[f64] = &[
    0.0005, 0.001, 0.0025, 0.005, 0.0075, 0.01, 0.0125, 0.015, 0.0175, 0.02, 0.0225, 0.025, 0.03, 0.035, 0.04, 0.05,
    0.06, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 1.0, 2.0,
];

pub fn install() -> anyhow::Result<PrometheusHandle> {
    let handle = PrometheusBuilder::new()
        .set_buckets_for_metric(Matcher::Full(TTFT_SECONDS.into()), TTFT_BUCKETS)?
        .set_buckets_for_metric(Matcher::Full(TBT_SECONDS.into()), TBT_BUCKETS)?
        .install_recorder()?;
    describe_histogram!(
        TTFT_SECONDS,
        metrics::Unit::Seconds,
        "Kernel-measured time from a request's first segment to the first response segment with an SSE event, per engine pod."
    );
    describe_histogram!(
        TBT_SECONDS,
        metrics::Unit::Seconds,
        "Kernel-measured time between token deliveries of a stream (segments within the burst window are one delivery)."
    );
    describe_counter!(
        REQUESTS_TOTAL,
        "Generation requests seen arriving at engine pods, by endpoint."
    );
    describe_counter!(STREAMS_COMPLETED_TOTAL, "Streams that ended with data: [DONE].");
    describe_counter!(TOKENS_TOTAL, "SSE events (tokens) sent by engine pods.");
    describe_counter!(BYTES_TOTAL, "TCP payload bytes of engine pods, by direction (rx, tx).");
    describe_counter!(KERNEL_EVENTS_TOTAL, "Events the probes wrote to the ring buffer.");
    describe_counter!(EVENTS_DROPPED_TOTAL, "Events lost because the ring buffer was full.");
    describe_counter!(
        SEGMENTS_TRUNCATED_TOTAL,
        "Response segments longer than the probes scan (events past the window are not counted)."
    );
    describe_counter!(EVENTS_READ_TOTAL, "Events the agent read from the ring buffer.");
    describe_gauge!(
        CONNECTIONS,
        "Engine connections tracked, by side (kernel: the probes' map, agent: the agent's state)."
    );
    describe_gauge!(ATTACHED_CGROUPS, "Cgroups the probes are attached to.");
    describe_counter!(
        PROG_RUNS_TOTAL,
        "Runs of each eBPF program (counted while kernel.bpf_stats_enabled is on)."
    );
    describe_counter!(
        PROG_RUN_NANOSECONDS_TOTAL,
        "Kernel time spent in each eBPF program (counted while kernel.bpf_stats_enabled is on)."
    );
    Ok(handle)
}
