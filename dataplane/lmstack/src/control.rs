//! Following lmstack-control: one long-lived `GET /v1/snapshots/watch`, newline-delimited
//! JSON (a full snapshot, then deltas and heartbeats), applied to the snapshot cell as it
//! comes. On its own thread, off the workers; the workers see a new version on their next
//! request.
//!
//! When control is gone (refused, silent past `stale_after_ms`, a broken message) the router
//! keeps routing on the last good snapshot, says so in `/health` and `lmstack_control_connected`,
//! and reconnects with backoff; the first message of a new stream is a full snapshot, which
//! replaces whatever the router had. Not here: probing engines (control does it).
//!
//! Shared affinity: workers hand the prefix assignments they make (prompt blocks an endpoint
//! did not hold yet) to a reporter thread, which posts them to control every
//! `affinity_report_interval_ms`; control relays every replica's batches on the stream, and
//! each router records the others' into its own affinity table, so replicas route a prefix
//! the same way.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::thread;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use lmstack_probe::client::Response;
use lmstack_snapshot::{AffinityBatch, AffinityEntry, Snapshot, StreamMessage};

use crate::config::{BackendUrl, ControlConfig, ms};
use crate::ctx::Shared;
use crate::metrics;

pub const WATCH_PATH: &str = "/v1/snapshots/watch";
pub const AFFINITY_PATH: &str = "/v1/affinity";

fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

pub fn spawn(shared: Arc<Shared>) -> std::io::Result<thread::JoinHandle<()>> {
    thread::Builder::new()
        .name("lmstack-control".into())
        .spawn(move || run(&shared))
}

fn run(shared: &Shared) {
    let config = &shared.config.discovery.control;
    let mut backoff = config.backoff_ms;
    shared.control.set_connected(false);
    loop {
        let mut progressed = false;
        let outcome = follow(shared, config, &mut progressed);
        shared.control.set_connected(false);
        ::metrics::counter!(metrics::CONTROL_DISCONNECTS_TOTAL).increment(1);
        match outcome {
            Ok(()) => {
                tracing::warn!(url = %config.url, "control closed the snapshot stream; keeping the last snapshot")
            }
            Err(e) => tracing::warn!(url = %config.url, "control unreachable ({e}); keeping the last snapshot"),
        }
        if progressed {
            backoff = config.backoff_ms;
        }
        #[expect(clippy::disallowed_methods, reason = "the control link's own thread, not a worker")]
        thread::sleep(ms(backoff));
        backoff = (backoff * 2).min(config.max_backoff_ms);
    }
}

/// One connection: until the stream ends (`Ok`) or fails.
fn follow(shared: &Shared, config: &ControlConfig, progressed: &mut bool) -> Result<(), String> {
    let url = BackendUrl::parse(&config.url).map_err(|e| e.to_string())?;
    let addr = url.resolve().map_err(|e| format!("cannot resolve {}: {e}", url.host))?;
    let mut response = Response::open(
        addr,
        &url.authority(),
        "GET",
        WATCH_PATH,
        &[],
        ms(config.connect_timeout_ms),
    )
    .map_err(|e| e.to_string())?;
    if response.status != 200 {
        return Err(format!("{WATCH_PATH} answered {}", response.status));
    }
    tracing::info!(url = %config.url, "following control's snapshot stream");
    shared.control.set_connected(true);
    // The snapshot the stream's deltas apply to; none until its first (full) message.
    let mut base: Option<Snapshot> = None;
    let mut buf = Vec::new();
    let stale = Duration::from_millis(config.stale_after_ms);
    loop {
        let more = response
            .read_body(&mut buf, stale)
            .map_err(|e| format!("stream: {e}"))?;
        let mut start = 0;
        while let Some(len) = buf[start..].iter().position(|&b| b == b'\n') {
            let line = &buf[start..start + len];
            start += len + 1;
            if line.iter().all(u8::is_ascii_whitespace) {
                continue;
            }
            shared.control.last_message_ms.store(unix_ms(), Ordering::Relaxed);
            apply(shared, line, &mut base)?;
            *progressed = true;
        }
        buf.drain(..start);
        if buf.len() > config.max_message_bytes {
            reject("too_large");
            return Err(format!("a message over {} bytes", config.max_message_bytes));
        }
        if !more {
            return Ok(());
        }
    }
}

fn reject(kind: &'static str) {
    ::metrics::counter!(metrics::SNAPSHOT_REJECTED_TOTAL, "error_kind" => kind).increment(1);
}

/// Applies one message. A message that cannot be used ends the connection: the next one
/// starts with a full snapshot, and the current one stays in use meanwhile.
fn apply(shared: &Shared, line: &[u8], base: &mut Option<Snapshot>) -> Result<(), String> {
    let message: StreamMessage = serde_json::from_slice(line).map_err(|e| {
        reject("malformed");
        format!("malformed message: {e}")
    })?;
    let next = match message {
        StreamMessage::Heartbeat { .. } => return Ok(()),
        StreamMessage::Affinity { batch } => {
            learn(shared, &batch);
            if batch.replica != shared.replica
                && let Some(tenants) = &shared.tenants
            {
                let tenants = tenants.load();
                for spend in &batch.budgets {
                    tenants.charge(spend);
                }
            }
            return Ok(());
        }
        StreamMessage::Kv { delta } => {
            if let Some(kv) = shared.kv.as_ref().filter(|kv| kv.via_control()) {
                kv.apply_relayed(&delta);
            }
            return Ok(());
        }
        StreamMessage::Full { snapshot } => {
            shared.cell.replace(&snapshot).map_err(|e| {
                reject("invalid");
                format!("invalid snapshot {}: {e}", snapshot.version)
            })?;
            snapshot
        }
        StreamMessage::Delta { delta } => {
            let Some(current) = base.as_ref() else {
                reject("out_of_order");
                return Err("a delta before any full snapshot".into());
            };
            let next = current.apply(&delta).map_err(|e| {
                reject("invalid");
                format!("delta to version {}: {e}", delta.version)
            })?;
            shared.cell.publish(&next).map_err(|e| {
                reject("invalid");
                format!("snapshot {}: {e}", next.version)
            })?;
            next
        }
    };
    tracing::debug!(
        version = next.version,
        endpoints = next.endpoints.len(),
        "snapshot from control applied"
    );
    *base = Some(next);
    Ok(())
}

/// Records another replica's assignments in this router's affinity table, and the load they
/// brought in its endpoints' recent counts. Endpoints this router does not know (yet, or any
/// more) are skipped.
fn learn(shared: &Shared, batch: &AffinityBatch) {
    if batch.replica == shared.replica {
        return;
    }
    let cell = &shared.cell;
    let state = cell.load();
    let now = cell.now_ms();
    let half_life = shared.config.routing.recent_half_life_ms as f64;
    let mut applied = 0u64;
    for entry in &batch.entries {
        let Some(endpoint) = state.endpoints.iter().find(|e| *e.url == *entry.endpoint) else {
            continue;
        };
        if let Some(tag) = endpoint.tag
            && !entry.blocks.is_empty()
        {
            cell.affinity.record(&entry.blocks, tag, now);
            applied += entry.blocks.len() as u64;
        }
        // Stored responses another replica saw answered (one entry each in the map).
        if let Some(tag) = endpoint.response_tag
            && !entry.responses.is_empty()
        {
            for &k in &entry.responses {
                cell.responses.record(&[k], tag, now);
            }
            ::metrics::counter!(metrics::RESPONSES_LEARNED_TOTAL, "status" => "shared")
                .increment(entry.responses.len() as u64);
        }
        endpoint
            .load
            .count_sent(entry.requests, entry.uncached_blocks, entry.placed, now, half_life);
    }
    ::metrics::counter!(metrics::AFFINITY_SHARED_BLOCKS_TOTAL, "status" => "applied").increment(applied);
}

pub fn spawn_reporter(
    shared: Arc<Shared>,
    rx: crossbeam_channel::Receiver<Vec<AffinityEntry>>,
) -> std::io::Result<thread::JoinHandle<()>> {
    thread::Builder::new()
        .name("lmstack-affinity".into())
        .spawn(move || report(&shared, &rx))
}

/// Collects the workers' assignments and posts them to control once per interval. What
/// cannot be sent (control away, too much pending) is dropped and counted: affinity is a
/// hint, and the table of each replica still learns from its own traffic.
fn report(shared: &Shared, rx: &crossbeam_channel::Receiver<Vec<AffinityEntry>>) {
    let config = &shared.config.discovery.control;
    let interval = ms(config.affinity_report_interval_ms);
    let dropped = |blocks: usize| {
        ::metrics::counter!(metrics::AFFINITY_SHARED_BLOCKS_TOTAL, "status" => "dropped").increment(blocks as u64);
    };
    loop {
        let Ok(first) = rx.recv() else { return };
        let deadline = std::time::Instant::now() + interval;
        let mut batch = AffinityBatch {
            replica: shared.replica.clone(),
            entries: first,
            budgets: Vec::new(),
        };
        while let Ok(more) = rx.recv_deadline(deadline) {
            if batch.blocks() + more.iter().map(|e| e.blocks.len().max(1)).sum::<usize>()
                > config.affinity_max_pending_blocks
            {
                dropped(more.iter().map(|e| e.blocks.len()).sum());
                continue;
            }
            batch.entries.extend(more);
        }
        let blocks = batch.blocks();
        match post(config, &batch) {
            Ok(()) => {
                ::metrics::counter!(metrics::AFFINITY_SHARED_BLOCKS_TOTAL, "status" => "sent").increment(blocks as u64)
            }
            Err(e) => {
                tracing::debug!("affinity report not sent: {e}");
                dropped(blocks);
            }
        }
    }
}

/// Budgets shared across replicas: every `affinity_report_interval_ms`, what this
/// replica's requests spent of each tenant's (and key's) budgets goes to control, which
/// relays it to the other replicas, which charge it to their own buckets. So a tenant's
/// budget holds across replicas within what they spend before they hear of each other:
/// about (replicas - 1) x (one report interval's spending + a full bucket's burst), more
/// while reports are lost (control away, a relay lagging).
pub fn spawn_budget_reporter(shared: Arc<Shared>) -> std::io::Result<thread::JoinHandle<()>> {
    thread::Builder::new().name("lmstack-budgets".into()).spawn(move || {
        let config = &shared.config.discovery.control;
        let Some(tenants) = &shared.tenants else { return };
        loop {
            #[expect(
                clippy::disallowed_methods,
                reason = "the budget reporter's own thread, not a worker"
            )]
            thread::sleep(ms(config.affinity_report_interval_ms));
            let budgets = tenants.load().take_spent();
            if budgets.is_empty() {
                continue;
            }
            let batch = AffinityBatch {
                replica: shared.replica.clone(),
                entries: Vec::new(),
                budgets,
            };
            if let Err(e) = post(config, &batch) {
                // The spending stays this replica's own; the others' buckets miss it.
                tracing::debug!("budget report not sent: {e}");
            }
        }
    })
}

fn post(config: &ControlConfig, batch: &AffinityBatch) -> Result<(), String> {
    let url = BackendUrl::parse(&config.url).map_err(|e| e.to_string())?;
    let addr = url.resolve().map_err(|e| e.to_string())?;
    let body = serde_json::to_vec(batch).map_err(|e| e.to_string())?;
    let timeout = ms(config.connect_timeout_ms);
    let mut response =
        Response::open(addr, &url.authority(), "POST", AFFINITY_PATH, &body, timeout).map_err(|e| e.to_string())?;
    let mut sink = Vec::new();
    while response.read_body(&mut sink, timeout).map_err(|e| e.to_string())? {}
    if !(200..300).contains(&response.status) {
        return Err(format!("{AFFINITY_PATH} answered {}", response.status));
    }
    Ok(())
}
