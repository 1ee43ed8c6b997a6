//! `lmstack`: the data plane binary. Start-up and shutdown only: configuration, logging,
//! metrics, the listeners, discovery and the worker threads; then wait for a signal.
//!
//! See ARCHITECTURE.md for the threading model and the life of a request.

#![cfg_attr(not(test), deny(clippy::unwrap_used))]

mod admin;
mod budget;
mod bufio;
mod config;
mod control;
mod ctx;
mod discovery;
mod downstream;
mod error;
mod kv;
mod metrics;
mod otel;
mod outlier;
mod proxy;
mod queue;
mod relay;
mod response;
mod state;
mod stored;
mod tenancy;
mod time;
mod tls;
mod upstream;
mod worker;

use std::net::SocketAddr;
use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::Context;
use clap::Parser;
use nix::sys::signal::{SigSet, Signal};
use socket2::{Domain, Protocol, Socket, Type};

use crate::config::{Cli, Config, DiscoveryMode, LogFormat};

/// mimalloc: per-thread free lists suit thread-per-core workers that allocate and free
/// request buffers on the same thread (measured in perf/results: fewer cycles per request
/// than glibc's malloc).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;
use crate::ctx::Shared;
use crate::state::SnapshotCell;

fn main() -> ExitCode {
    let cli = Cli::parse();
    let config = match Config::load(&cli) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("lmstack: {e}");
            return ExitCode::from(2);
        }
    };
    if let Some(path) = &config.tenancy.keys_file
        && let Err(e) = tenancy::KeysFile::read(path)
    {
        eprintln!("lmstack: invalid configuration: tenancy.keys_file: {e}");
        return ExitCode::from(2);
    }
    // The certificate and key are checked here, so that `--check` checks them too.
    let tls = match tls::load(&config.listen.tls) {
        Ok(loaded) => loaded,
        Err(e) => {
            eprintln!("lmstack: listen.tls: {e}");
            return ExitCode::from(2);
        }
    };
    if cli.check {
        match serde_yaml_ng::to_string(&config) {
            Ok(text) => {
                println!(
                    "# lmstack configuration: valid ({} workers)\n{text}",
                    config.worker_count()
                );
                return ExitCode::SUCCESS;
            }
            Err(e) => {
                eprintln!("lmstack: cannot print the configuration: {e}");
                return ExitCode::from(2);
            }
        }
    }
    init_logging(&config);
    match run(config, tls) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e:#}");
            eprintln!("lmstack: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn init_logging(config: &Config) {
    let filter = tracing_subscriber::EnvFilter::try_new(&config.log.level)
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr);
    match config.log.format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}

fn run(config: Config, tls: Option<(tls::Acceptor, tls::Reload)>) -> anyhow::Result<()> {
    let prometheus = metrics::install().context("installing the metrics recorder")?;
    ::metrics::gauge!(metrics::BUILD_INFO, "version" => env!("CARGO_PKG_VERSION")).set(1.0);

    let workers = config.worker_count();
    let addr = config.listen_addr()?;
    let listeners = bind_listeners(addr, workers, config.listen.backlog, config.listen.takeover)?;
    let bound = listeners[0].local_addr()?;
    // The main thread's handles on the listening sockets, to stop listening at shutdown.
    let listening: Vec<Socket> = listeners
        .iter()
        .map(|l| l.try_clone().map(Socket::from))
        .collect::<Result<_, _>>()
        .context("duplicating the listening sockets")?;

    // Signals are taken by this thread only: block them before any other thread starts.
    let mut signals = SigSet::empty();
    signals.add(Signal::SIGINT);
    signals.add(Signal::SIGTERM);
    signals.thread_block().context("blocking signals")?;

    // Control mode shares prefix assignments: workers hand them to the reporter thread.
    let share = config.discovery.mode == DiscoveryMode::Control && config.discovery.control.share_affinity;
    let (affinity_out, affinity_in) = if share {
        let (tx, rx) = crossbeam_channel::bounded(256);
        (Some(tx), Some(rx))
    } else {
        (None, None)
    };
    let uses_prefix =
        config.routing.policy.uses_prefix() || config.routing.models.values().any(|m| m.policy.uses_prefix());
    let control_mode = config.discovery.mode == config::DiscoveryMode::Control;
    let kv = (config.kv_events.enabled && uses_prefix)
        .then(|| Arc::new(kv::Kv::new(config.kv_events.clone(), control_mode)));
    let tenants = tenancy::load(config.tenancy.keys_file.as_deref()).map_err(anyhow::Error::msg)?;
    if let (Some((cell, digest)), Some(path)) = (&tenants, &config.tenancy.keys_file) {
        tenancy::spawn_reloader(
            path.clone(),
            config::ms(config.tenancy.reload_interval_ms),
            cell.clone(),
            *digest,
        )
        .context("starting the keys file reloader")?;
    }
    let tenants = tenants.map(|(cell, _)| cell);
    let replica = format!("{:x}-{:x}", std::process::id(), ctx::now_nanos());
    let tracer = if config.tracing.enabled() {
        let t = otel::Tracer::start(&config.tracing, &replica).context("starting the trace exporter")?;
        tracing::info!(
            url = config.tracing.traces_url(),
            ratio = config.tracing.sample_ratio,
            "exporting traces"
        );
        Some(t)
    } else {
        None
    };
    let shared = Arc::new(Shared {
        tenants,
        tracer,
        kv: kv.clone(),
        cell: Arc::new(SnapshotCell::new(config.routing.clone())),
        config,
        prometheus,
        draining: AtomicBool::new(false),
        control: Default::default(),
        affinity_out,
        replica,
    });
    if let Some(rx) = affinity_in {
        control::spawn_reporter(shared.clone(), rx).context("starting the affinity reporter")?;
    }
    if control_mode && shared.tenants.is_some() {
        control::spawn_budget_reporter(shared.clone()).context("starting the budget reporter")?;
    }
    discovery::spawn(shared.clone()).context("starting discovery")?;
    if let Some(kv) = kv {
        kv::spawn(kv, shared.cell.clone())?;
    }
    spawn_upkeep(shared.clone())?;
    let tls = match tls {
        Some((acceptor, reload)) => {
            let acceptor = Arc::new(acceptor);
            reload
                .spawn(acceptor.clone())
                .context("starting the TLS reload thread")?;
            Some(acceptor)
        }
        None => None,
    };
    let scheme = if tls.is_some() { "https" } else { "http" };
    // Serve ready: no worker accepts before the first routing snapshot (or the deadline);
    // connections wait in the listen backlog meanwhile.
    let ready_by = Instant::now() + Duration::from_millis(shared.config.server.ready_timeout_ms);
    while shared.cell.generation() == 0 && Instant::now() < ready_by {
        #[expect(
            clippy::disallowed_methods,
            reason = "the main thread waiting for the first snapshot, before any worker runs"
        )]
        std::thread::sleep(Duration::from_millis(5));
    }
    if shared.cell.generation() == 0 {
        tracing::warn!("no routing snapshot yet: accepting anyway");
    }
    let mut threads = Vec::with_capacity(workers);
    for (id, listener) in listeners.into_iter().enumerate() {
        let shared = shared.clone();
        let tls = tls.clone();
        let thread = std::thread::Builder::new()
            .name(format!("lmstack-w{id}"))
            .spawn(move || {
                if let Err(e) = worker::run(id, workers, listener, shared, tls) {
                    tracing::error!(worker = id, "worker failed: {e}");
                    std::process::exit(1);
                }
            })
            .context("starting a worker")?;
        threads.push(thread);
    }
    // Tests and scripts read this line for the bound address.
    println!("lmstack listening on {scheme}://{bound} ({workers} workers)");
    tracing::info!(%bound, workers, scheme, "listening");

    let signal = signals.wait().context("waiting for a signal")?;
    tracing::info!(
        ?signal,
        "shutting down: no new connections; draining in-flight requests"
    );
    shared.draining.store(true, Ordering::Relaxed);
    // Stop listening at once: the port is free for a new process (and another lmstack
    // sharing it takes the new connections), and each worker's pending accept ends.
    for socket in &listening {
        if let Err(e) = socket.shutdown(std::net::Shutdown::Read) {
            tracing::warn!("cannot stop listening: {e}");
        }
    }
    drop(listening);
    // Workers end when their last connection does: idle ones close at once, the others
    // after their response (which says `connection: close`).
    let grace = Duration::from_millis(shared.config.server.shutdown_grace_ms);
    let until = Instant::now() + grace;
    while Instant::now() < until && !threads.iter().all(std::thread::JoinHandle::is_finished) {
        #[expect(
            clippy::disallowed_methods,
            reason = "the main thread waiting for the drain, not a worker"
        )]
        std::thread::sleep(Duration::from_millis(10));
    }
    if !threads.iter().all(std::thread::JoinHandle::is_finished) {
        tracing::warn!(
            grace_ms = grace.as_millis() as u64,
            "connections still open after the grace period"
        );
    }
    if let Some(tracer) = &shared.tracer {
        tracer.flush(Duration::from_millis(shared.config.tracing.export_timeout_ms));
    }
    tracing::info!("bye");
    Ok(())
}

/// One SO_REUSEPORT listener per worker, all on the same port (the first one's, when the
/// configured port is 0).
fn bind_listeners(
    addr: SocketAddr,
    workers: usize,
    backlog: u32,
    takeover: bool,
) -> anyhow::Result<Vec<std::net::TcpListener>> {
    // SO_REUSEPORT would let this process share a port another process (another lmstack
    // started by mistake) already listens on, silently splitting its traffic. A plain
    // socket cannot bind a port in use, so try one first, unless sharing is the point (an
    // upgrade: `listen.takeover`).
    if addr.port() != 0 && !takeover {
        let probe = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
        probe.set_reuse_address(true)?;
        probe
            .bind(&addr.into())
            .with_context(|| format!("{addr} is already in use"))?;
    }
    let mut listeners: Vec<std::net::TcpListener> = Vec::with_capacity(workers);
    let mut addr = addr;
    for _ in 0..workers {
        let socket = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
        socket.set_reuse_address(true)?;
        socket.set_reuse_port(true)?;
        socket.set_nonblocking(true)?;
        socket.bind(&addr.into()).with_context(|| format!("binding {addr}"))?;
        socket.listen(backlog.min(i32::MAX as u32) as i32)?;
        let listener: std::net::TcpListener = socket.into();
        addr = listener.local_addr()?;
        listeners.push(listener);
    }
    Ok(listeners)
}

/// Every second: publishes figures that live in shared state (the affinity table, each
/// endpoint's load), and drains the exporter's histogram buffers even when nobody scrapes,
/// so memory stays bounded.
fn spawn_upkeep(shared: Arc<Shared>) -> anyhow::Result<()> {
    std::thread::Builder::new()
        .name("lmstack-upkeep".into())
        .spawn(move || {
            let evictions = ::metrics::counter!(metrics::AFFINITY_EVICTIONS_TOTAL);
            loop {
                #[expect(clippy::disallowed_methods, reason = "the upkeep thread, not a worker")]
                std::thread::sleep(Duration::from_secs(1));
                let a = shared.cell.affinity.stats();
                ::metrics::gauge!(metrics::AFFINITY_ENTRIES).set(a.entries as f64);
                ::metrics::gauge!(metrics::AFFINITY_CAPACITY).set(a.capacity as f64);
                ::metrics::gauge!(metrics::AFFINITY_BYTES).set(a.bytes as f64);
                evictions.absolute(a.evictions);
                let now_ms = shared.cell.now_ms();
                for e in &shared.cell.load().endpoints {
                    let url = e.url.to_string();
                    let out = e.load.outlier.ejected(now_ms);
                    ::metrics::gauge!(metrics::ENDPOINT_EJECTED, "endpoint" => url.clone())
                        .set(f64::from(u8::from(out)));
                    ::metrics::gauge!(metrics::ENDPOINT_INFLIGHT, "endpoint" => url.clone())
                        .set(f64::from(e.load.inflight.load(Ordering::Relaxed)));
                    ::metrics::gauge!(metrics::ENDPOINT_PREFILL_BLOCKS, "endpoint" => url)
                        .set(e.load.prefill_blocks.load(Ordering::Relaxed) as f64);
                }
                shared.prometheus.run_upkeep();
            }
        })
        .context("starting the upkeep thread")?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    /// The modules each module of this crate imports (`crate::x`, `crate::{x, y}`), by file.
    fn imports() -> BTreeMap<String, Vec<String>> {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
        let mut texts = BTreeMap::new();
        for entry in std::fs::read_dir(dir).unwrap() {
            let path = entry.unwrap().path();
            if path.extension().is_some_and(|e| e == "rs") {
                let name = path.file_stem().unwrap().to_string_lossy().into_owned();
                let text = std::fs::read_to_string(&path).unwrap();
                let code: Vec<&str> = text.lines().map(|l| l.split("//").next().unwrap_or("")).collect();
                texts.insert(name, code.join("\n"));
            }
        }
        let modules: Vec<String> = texts.keys().cloned().collect();
        texts
            .into_iter()
            .map(|(name, code)| {
                let mut used: Vec<String> = Vec::new();
                for (at, _) in code.match_indices("crate::") {
                    let rest = &code[at + "crate::".len()..];
                    let names = match rest.strip_prefix('{') {
                        Some(group) => &group[..group.find('}').unwrap_or(group.len())],
                        None => rest,
                    };
                    for word in names.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_')) {
                        if modules.iter().any(|m| m == word) && word != name && !used.iter().any(|u| u == word) {
                            used.push(word.to_owned());
                        }
                        if rest.starts_with('{') {
                            continue;
                        }
                        break;
                    }
                }
                (name, used)
            })
            .collect()
    }

    /// ARCHITECTURE.md, "Invariants": the module graph is acyclic, context types sit below
    /// the loops that own them, and metrics know nothing of routing.
    #[test]
    fn module_imports_have_no_cycle() {
        let graph = imports();
        fn visit(m: &str, graph: &BTreeMap<String, Vec<String>>, path: &mut Vec<String>, done: &mut Vec<String>) {
            if done.iter().any(|d| d == m) {
                return;
            }
            assert!(
                !path.iter().any(|p| p == m),
                "import cycle: {} -> {m}",
                path.join(" -> ")
            );
            path.push(m.to_owned());
            for next in &graph[m] {
                visit(next, graph, path, done);
            }
            path.pop();
            done.push(m.to_owned());
        }
        let mut done = Vec::new();
        for m in graph.keys() {
            visit(m, &graph, &mut Vec::new(), &mut done);
        }
        for (module, forbidden) in [
            ("ctx", &["worker", "proxy", "admin"][..]),
            ("metrics", &["state", "ctx"][..]),
            ("error", &["metrics", "response", "proxy"][..]),
            ("config", &["state", "metrics", "ctx"][..]),
        ] {
            for f in forbidden {
                assert!(!graph[module].iter().any(|u| u == f), "{module} must not import {f}");
            }
        }
    }
}
