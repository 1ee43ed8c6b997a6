//! lmstack-agent: the privileged node agent (a DaemonSet) that loads lmstack's eBPF probes on
//! the cgroups of the engine pods of its node (found through the Kubernetes API, or given
//! with `--cgroup`), turns the kernel's per-connection events into time to first token and
//! time between tokens, and serves them with the probes' own costs on `/metrics`.
//!
//! Tasks on one tokio runtime: the events reader (ring buffer -> timings -> metrics), the
//! poller (kernel counters, traffic, connections, run-time stats; pending pods), the pod
//! watcher (kube mode), the HTTP server. The probes and the cgroup registry sit behind one
//! mutex, held briefly.

mod cgroups;
mod metrics;
mod pods;
mod probes;
mod server;
mod timing;

use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context;
use clap::{Parser, ValueEnum};
use lmstack_ebpf_common::Event;

use crate::cgroups::{Labels, Registry};
use crate::probes::Probes;
use crate::timing::{Observation, Timings};

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Source {
    /// The cgroups given with --cgroup.
    Local,
    /// Engine pods on this node, from the Kubernetes API (in cluster, or KUBECONFIG).
    Kube,
}

#[derive(Clone, Debug, Parser)]
#[command(name = "lmstack-agent", version, about)]
pub struct Cli {
    /// Address of /metrics and /health.
    #[arg(long, env = "LMSTACK_AGENT_LISTEN", default_value = "0.0.0.0:9400")]
    listen: String,
    /// Where the engines to measure come from.
    #[arg(long, value_enum, default_value = "local")]
    source: Source,
    /// (local) A cgroup v2 directory to watch; repeat for several.
    #[arg(long = "cgroup")]
    cgroups: Vec<PathBuf>,
    /// (local) Labels of the local cgroups' metrics: the pod label is the directory's name
    /// unless given.
    #[arg(long, default_value = "")]
    pod: String,
    /// (local) The namespace label of the local cgroups' metrics.
    #[arg(long, default_value = "local")]
    namespace: String,
    /// (local) The model label of the local cgroups' metrics.
    #[arg(long, default_value = "")]
    model: String,
    /// (kube) This node's name (the DaemonSet passes spec.nodeName).
    #[arg(long, env = "NODE_NAME", default_value = "")]
    node_name: String,
    /// (kube) Namespace of the engine pods (empty: all).
    #[arg(long, default_value = "")]
    watch_namespace: String,
    /// (kube) Label selector of engine pods.
    #[arg(long, default_value = "lmstack.io/role=engine")]
    label_selector: String,
    /// (kube) Pod label holding the model name.
    #[arg(long, default_value = "model")]
    model_label: String,
    /// The cgroup v2 mount (default: /sys/fs/cgroup/unified on hybrid hosts, else
    /// /sys/fs/cgroup).
    #[arg(long)]
    cgroup_root: Option<PathBuf>,
    /// Response segments closer than this count as one token delivery (vLLM writes its role
    /// chunk and first token back to back).
    #[arg(long, default_value_t = 500)]
    burst_window_us: u64,
    /// Streams tracked at once by the agent (the kernel side has its own LRU bound).
    #[arg(long, default_value_t = 65_536)]
    max_streams: usize,
    /// How often the events ring buffer is drained when the probes have not woken the agent
    /// (they do once WAKEUP_BYTES are waiting; a wake-up per event would cost more than the
    /// probe itself).
    #[arg(long, default_value_t = 10)]
    drain_interval_ms: u64,
    /// How often kernel counters are read and pending pods retried.
    #[arg(long, default_value_t = 1000)]
    poll_interval_ms: u64,
    /// Turn on the kernel's BPF run-time statistics while the agent runs (the per-event cost
    /// in lmstack_ebpf_prog_run_seconds_total; costs a few ns per run).
    #[arg(long)]
    bpf_stats: bool,
    /// Level of the probes' own log messages: error, warn, info, debug, trace.
    #[arg(long, default_value = "warn")]
    kernel_log_level: String,
    /// Log filter of the agent itself (`info`, `debug`, `lmstack_agent=debug`, ...).
    #[arg(long, env = "LMSTACK_AGENT_LOG", default_value = "info")]
    log_level: String,
    /// Append every TTFT and gap measured to this file, one JSON object a line (for checks
    /// and debugging; it grows with traffic).
    #[arg(long)]
    observations_log: Option<PathBuf>,
    /// Print the configuration and exit.
    #[arg(long)]
    check: bool,
}

impl Cli {
    fn validate(&self) -> Result<(), String> {
        if self.source == Source::Local && self.cgroups.is_empty() {
            return Err("--source local needs at least one --cgroup".into());
        }
        if self.poll_interval_ms == 0 || self.drain_interval_ms == 0 || self.max_streams == 0 {
            return Err("--poll-interval-ms, --drain-interval-ms and --max-streams must be positive".into());
        }
        kernel_level(&self.kernel_log_level)?;
        Ok(())
    }
}

/// aya-log's level numbers.
fn kernel_level(name: &str) -> Result<u8, String> {
    Ok(match name {
        "off" => 0,
        "error" => 1,
        "warn" => 2,
        "info" => 3,
        "debug" => 4,
        "trace" => 5,
        other => {
            return Err(format!(
                "--kernel-log-level {other:?}: one of off, error, warn, info, debug, trace"
            ));
        }
    })
}

/// The probes and whose cgroups they watch.
pub struct SharedState {
    probes: Probes,
    registry: Registry,
}

impl SharedState {
    pub fn attach(&mut self, dir: &Path, labels: Labels) -> anyhow::Result<()> {
        self.probes.attach(dir)?;
        self.registry.add(dir, labels);
        ::metrics::gauge!(metrics::ATTACHED_CGROUPS).set(self.registry.targets() as f64);
        Ok(())
    }

    pub fn detach(&mut self, dir: &Path) {
        self.probes.detach(dir);
        self.registry.remove(dir);
        ::metrics::gauge!(metrics::ATTACHED_CGROUPS).set(self.registry.targets() as f64);
    }
}

pub type Shared = Arc<Mutex<SharedState>>;

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    cli.validate()
        .map_err(|e| anyhow::anyhow!("invalid configuration: {e}"))?;
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_new(&cli.log_level).context("--log-level")?)
        .with_writer(std::io::stderr)
        .init();
    if cli.check {
        println!("{cli:#?}");
        println!("{}", probes::describe());
        return Ok(());
    }
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the runtime")?;
    runtime.block_on(run(cli))
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    let prometheus = metrics::install().context("installing the metrics recorder")?;
    let _stats = cli
        .bpf_stats
        .then(|| aya::sys::enable_stats(aya::sys::Stats::RunTime))
        .transpose()
        .context("enabling BPF run-time statistics")?;
    let level = kernel_level(&cli.kernel_log_level).map_err(anyhow::Error::msg)?;
    let mut probes = Probes::load(level)?;
    let events = probes.take_events()?;
    let shared: Shared = Arc::new(Mutex::new(SharedState {
        probes,
        registry: Registry::default(),
    }));
    let cgroup_root = cli.cgroup_root.clone().unwrap_or_else(cgroups::default_root);
    let poll = Duration::from_millis(cli.poll_interval_ms);
    match cli.source {
        Source::Local => {
            let mut state = shared.lock().unwrap_or_else(|p| p.into_inner());
            for dir in &cli.cgroups {
                let pod = if cli.pod.is_empty() {
                    dir.file_name()
                        .map_or_else(String::new, |n| n.to_string_lossy().into_owned())
                } else {
                    cli.pod.clone()
                };
                let labels = Labels {
                    namespace: cli.namespace.clone(),
                    pod,
                    model: cli.model.clone(),
                };
                state
                    .attach(dir, labels)
                    .with_context(|| format!("attaching to {}", dir.display()))?;
                tracing::info!(cgroup = %dir.display(), "attached");
            }
        }
        Source::Kube => {
            let client = kube::Client::try_default()
                .await
                .context("connecting to the Kubernetes API (in cluster, or KUBECONFIG)")?;
            let config = pods::PodsConfig {
                node_name: cli.node_name.clone(),
                namespace: cli.watch_namespace.clone(),
                label_selector: cli.label_selector.clone(),
                model_label: cli.model_label.clone(),
                cgroup_root,
            };
            tokio::spawn(pods::run(client, config, shared.clone(), poll));
        }
    }
    let log = match &cli.observations_log {
        Some(p) => Some(std::io::BufWriter::new(
            std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(p)
                .with_context(|| format!("opening {}", p.display()))?,
        )),
        None => None,
    };
    tokio::spawn(read_events(
        events,
        shared.clone(),
        Timings::new(cli.burst_window_us, cli.max_streams),
        log,
        Duration::from_millis(cli.drain_interval_ms),
    ));
    tokio::spawn(poll_kernel(shared.clone(), poll));
    let listener = tokio::net::TcpListener::bind(&cli.listen)
        .await
        .with_context(|| format!("binding {}", cli.listen))?;
    let bound = listener.local_addr()?;
    // Tests and scripts read this line for the bound address.
    println!("lmstack-agent listening on http://{bound}");
    tracing::info!(%bound, "listening");
    tokio::select! {
        r = server::serve(listener, prometheus, shared.clone()) => r,
        _ = tokio::signal::ctrl_c() => {
            tracing::info!("interrupted: detaching");
            Ok(())
        }
        _ = terminate() => {
            tracing::info!("terminated: detaching");
            Ok(())
        }
    }
}

async fn terminate() {
    match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
        Ok(mut s) => {
            s.recv().await;
        }
        Err(_) => std::future::pending().await,
    }
}

/// Moves every event waiting in the ring buffer into `batch`.
fn drain(ring: &mut aya::maps::RingBuf<aya::maps::MapData>, batch: &mut Vec<Event>) {
    while let Some(item) = ring.next() {
        if item.len() >= size_of::<Event>() {
            // SAFETY: the probes write whole `Event`s (repr(C), any bit pattern valid);
            // read_unaligned copes with the ring's 8-byte alignment.
            batch.push(unsafe { std::ptr::read_unaligned(item.as_ptr().cast::<Event>()) });
        }
    }
}

/// The events reader: ring buffer -> timings -> metrics.
async fn read_events(
    events: aya::maps::RingBuf<aya::maps::MapData>,
    shared: Shared,
    mut timings: Timings,
    mut log: Option<std::io::BufWriter<std::fs::File>>,
    drain_every: Duration,
) {
    // SAFETY: the ring buffer owns its map fd, which stays open and the same while it lives.
    let registered = unsafe { tokio::io::unix::AsyncFd::register_with_interest(events, tokio::io::Interest::READABLE) };
    let mut fd = match registered {
        Ok(fd) => fd,
        Err(e) => {
            tracing::error!("events ring buffer: {e}");
            return;
        }
    };
    let mut out = Vec::new();
    let mut batch = Vec::new();
    let mut last_rescan = Instant::now() - Duration::from_secs(60);
    // The probes wake this task only when the ring fills past WAKEUP_BYTES; the timer
    // drains it in between.
    let mut tick = tokio::time::interval(drain_every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        let woken = tokio::select! {
            guard = fd.readable_mut() => Some(guard),
            _ = tick.tick() => None,
        };
        match woken {
            Some(Ok(mut guard)) => {
                drain(guard.get_inner_mut(), &mut batch);
                guard.clear_ready();
            }
            Some(Err(e)) => {
                tracing::error!("events ring buffer: {e}");
                return;
            }
            None => drain(fd.get_mut(), &mut batch),
        }
        if batch.is_empty() {
            continue;
        }
        ::metrics::counter!(metrics::EVENTS_READ_TOTAL).increment(batch.len() as u64);
        for e in batch.drain(..) {
            timings.apply(&e, &mut out);
        }
        ::metrics::gauge!(metrics::CONNECTIONS, "side" => "agent").set(timings.tracked() as f64);
        if out.is_empty() {
            continue;
        }
        let mut state = shared.lock().unwrap_or_else(|p| p.into_inner());
        for o in out.drain(..) {
            let id = match &o {
                Observation::Request { cgroup_id, .. }
                | Observation::FirstToken { cgroup_id, .. }
                | Observation::Gap { cgroup_id, .. }
                | Observation::Tokens { cgroup_id, .. }
                | Observation::Done { cgroup_id, .. } => *cgroup_id,
            };
            let labels = match state.registry.labels(id) {
                Some(l) => l,
                None if last_rescan.elapsed() > Duration::from_secs(1) => {
                    // A container started below a watched pod since the last walk.
                    last_rescan = Instant::now();
                    state.registry.rescan();
                    match state.registry.labels(id) {
                        Some(l) => l,
                        None => continue,
                    }
                }
                None => continue,
            };
            record(&o, &labels);
            if let Some(w) = log.as_mut() {
                write_observation(w, &o, &labels);
            }
        }
        if let Some(w) = log.as_mut() {
            let _ = w.flush();
        }
    }
}

fn record(o: &Observation, l: &Labels) {
    let (ns, pod, model) = (l.namespace.clone(), l.pod.clone(), l.model.clone());
    match o {
        Observation::Request { endpoint, .. } => {
            ::metrics::counter!(metrics::REQUESTS_TOTAL, "namespace" => ns, "pod" => pod, "model" => model, "endpoint" => endpoint.as_str()).increment(1);
        }
        Observation::FirstToken { endpoint, ttft_s, .. } => {
            ::metrics::histogram!(metrics::TTFT_SECONDS, "namespace" => ns, "pod" => pod, "model" => model, "endpoint" => endpoint.as_str()).record(*ttft_s);
        }
        Observation::Gap { gap_s, .. } => {
            ::metrics::histogram!(metrics::TBT_SECONDS, "namespace" => ns, "pod" => pod, "model" => model)
                .record(*gap_s);
        }
        Observation::Tokens { count, .. } => {
            ::metrics::counter!(metrics::TOKENS_TOTAL, "namespace" => ns, "pod" => pod, "model" => model)
                .increment(u64::from(*count));
        }
        Observation::Done { endpoint, .. } => {
            ::metrics::counter!(metrics::STREAMS_COMPLETED_TOTAL, "namespace" => ns, "pod" => pod, "model" => model, "endpoint" => endpoint.as_str()).increment(1);
        }
    }
}

fn write_observation(w: &mut impl std::io::Write, o: &Observation, l: &Labels) {
    let (kind, seconds) = match o {
        Observation::FirstToken { ttft_s, .. } => ("ttft", *ttft_s),
        Observation::Gap { gap_s, .. } => ("tbt", *gap_s),
        _ => return,
    };
    let _ = writeln!(
        w,
        r#"{{"kind":"{kind}","seconds":{seconds},"namespace":{:?},"pod":{:?},"model":{:?}}}"#,
        l.namespace, l.pod, l.model
    );
}

/// The poller: kernel counters, traffic per pod, connections, run-time statistics.
async fn poll_kernel(shared: Shared, every: Duration) {
    let mut tick = tokio::time::interval(every);
    loop {
        tick.tick().await;
        let mut state = shared.lock().unwrap_or_else(|p| p.into_inner());
        if let Err(e) = poll_once(&mut state) {
            tracing::warn!("reading the probes' maps: {e:#}");
        }
    }
}

fn poll_once(state: &mut SharedState) -> anyhow::Result<()> {
    let s = state.probes.stats()?;
    ::metrics::counter!(metrics::KERNEL_EVENTS_TOTAL).absolute(s.events);
    ::metrics::counter!(metrics::EVENTS_DROPPED_TOTAL).absolute(s.dropped);
    ::metrics::counter!(metrics::SEGMENTS_TRUNCATED_TOTAL).absolute(s.truncated);
    ::metrics::gauge!(metrics::CONNECTIONS, "side" => "kernel").set(state.probes.kernel_connections()? as f64);
    // Traffic of the same pod's containers adds up; the counters are absolute per pod.
    let mut per_pod: std::collections::HashMap<(String, String, String), (u64, u64)> = Default::default();
    for (id, t) in state.probes.traffic()? {
        if let Some(l) = state.registry.labels(id) {
            let e = per_pod
                .entry((l.namespace.clone(), l.pod.clone(), l.model.clone()))
                .or_default();
            e.0 += t.rx_bytes;
            e.1 += t.tx_bytes;
        }
    }
    for ((ns, pod, model), (rx, tx)) in per_pod {
        ::metrics::counter!(metrics::BYTES_TOTAL, "namespace" => ns.clone(), "pod" => pod.clone(), "model" => model.clone(), "direction" => "rx").absolute(rx);
        ::metrics::counter!(metrics::BYTES_TOTAL, "namespace" => ns, "pod" => pod, "model" => model, "direction" => "tx").absolute(tx);
    }
    // Forget the counters of cgroups gone (walk again first: containers come and go).
    state.registry.rescan();
    let registry = &state.registry;
    let known: std::collections::HashSet<u64> = registry.ids().collect();
    state.probes.forget_traffic(&|id| known.contains(&id))?;
    for r in state.probes.run_stats() {
        ::metrics::counter!(metrics::PROG_RUNS_TOTAL, "program" => r.program).absolute(r.runs);
        ::metrics::counter!(metrics::PROG_RUN_NANOSECONDS_TOTAL, "program" => r.program).absolute(r.run_ns);
    }
    Ok(())
}
