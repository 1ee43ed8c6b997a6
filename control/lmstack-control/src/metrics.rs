//! lmstack-control's metric names, described once at start.

use metrics::{describe_counter, describe_gauge, describe_histogram};
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};

pub const SNAPSHOT_VERSION: &str = "lmstack_control_snapshot_version";
pub const SNAPSHOTS_TOTAL: &str = "lmstack_control_snapshots_total";
pub const ENDPOINTS: &str = "lmstack_control_endpoints";
pub const HEALTH_CHECKS_TOTAL: &str = "lmstack_control_health_checks_total";
pub const PROBE_ROUND_SECONDS: &str = "lmstack_control_probe_round_seconds";
pub const SUBSCRIBERS: &str = "lmstack_control_subscribers";
pub const STREAM_MESSAGES_TOTAL: &str = "lmstack_control_stream_messages_total";
pub const WATCH_EVENTS_TOTAL: &str = "lmstack_control_watch_events_total";
pub const WATCH_ERRORS_TOTAL: &str = "lmstack_control_watch_errors_total";
pub const PODS: &str = "lmstack_control_pods";
pub const AFFINITY_BLOCKS_TOTAL: &str = "lmstack_control_affinity_blocks_total";
pub const AFFINITY_BATCHES_LAGGED_TOTAL: &str = "lmstack_control_affinity_batches_lagged_total";
pub const KV_BATCHES_TOTAL: &str = "lmstack_control_kv_event_batches_total";
pub const KV_RESYNCS_TOTAL: &str = "lmstack_control_kv_index_resyncs_total";
pub const KV_INDEX_BLOCKS: &str = "lmstack_control_kv_index_blocks";
pub const KV_COMPAT_PROBLEM: &str = "lmstack_control_kv_compat_problem";
pub const KV_DELTA_KEYS_TOTAL: &str = "lmstack_control_kv_delta_keys_total";
pub const KV_DELTAS_LAGGED_TOTAL: &str = "lmstack_control_kv_deltas_lagged_total";

pub fn install() -> anyhow::Result<PrometheusHandle> {
    let handle = PrometheusBuilder::new().install_recorder()?;
    describe_gauge!(SNAPSHOT_VERSION, "Version of the latest snapshot published.");
    describe_counter!(SNAPSHOTS_TOTAL, "Snapshots published.");
    describe_gauge!(
        ENDPOINTS,
        "Endpoints in the latest snapshot, by status (healthy, unhealthy)."
    );
    describe_counter!(
        HEALTH_CHECKS_TOTAL,
        "Health probes of endpoints, by endpoint and status (ok, fail)."
    );
    describe_histogram!(PROBE_ROUND_SECONDS, "Time to probe every endpoint once.");
    describe_gauge!(SUBSCRIBERS, "Data plane snapshot streams open.");
    describe_counter!(
        STREAM_MESSAGES_TOTAL,
        "Messages sent on snapshot streams, by type (full, delta, heartbeat)."
    );
    describe_counter!(
        WATCH_EVENTS_TOTAL,
        "Kubernetes pod watch events, by type (init, apply, delete, init_done)."
    );
    describe_counter!(
        WATCH_ERRORS_TOTAL,
        "Kubernetes watch errors (each followed by a retry; a 410 Gone by a relist)."
    );
    describe_gauge!(PODS, "Engine pods seen, by status (routable, drained, no_ip).");
    describe_counter!(
        AFFINITY_BLOCKS_TOTAL,
        "Prompt blocks of prefix assignments reported by data plane replicas, by status (received)."
    );
    describe_counter!(
        AFFINITY_BATCHES_LAGGED_TOTAL,
        "Affinity batches a slow stream missed (its replica learns them from its own traffic)."
    );
    describe_counter!(KV_BATCHES_TOTAL, "KV event batches received from an engine.");
    describe_counter!(
        KV_RESYNCS_TOTAL,
        "Times an engine's KV block index was dropped, by reason (gap, restart, reset, identity, block_size)."
    );
    describe_gauge!(KV_INDEX_BLOCKS, "Blocks in an engine's KV block index.");
    describe_gauge!(
        KV_COMPAT_PROBLEM,
        "1 when a check made at an engine's registration failed (metric names, prefix caching, block size, KV events reachable)."
    );
    describe_counter!(
        KV_DELTA_KEYS_TOTAL,
        "Block keys relayed to router replicas in KV index deltas (added and removed)."
    );
    describe_counter!(
        KV_DELTAS_LAGGED_TOTAL,
        "KV index deltas a slow stream missed (it gets full copies again)."
    );
    Ok(handle)
}
