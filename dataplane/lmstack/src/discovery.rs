//! The router's own discovery: a fixed list of backends (`static`) or a file of them
//! (`file`, re-read when it changes), probed by the router itself (lmstack-probe) and turned
//! into routing snapshots. Runs on its own thread, off the workers. Not here: following
//! lmstack-control (`control.rs`), Kubernetes (lmstack-control's job).

use std::path::PathBuf;
use std::sync::Arc;
use std::thread;
use std::time::SystemTime;

use lmstack_probe::{Prober, Target};

use crate::config::{BackendConfig, BackendUrl, BackendsFile, DiscoveryMode};
use crate::ctx::Shared;
use crate::metrics;

pub fn spawn(shared: Arc<Shared>) -> std::io::Result<thread::JoinHandle<()>> {
    if shared.config.discovery.mode == DiscoveryMode::Control {
        return crate::control::spawn(shared);
    }
    thread::Builder::new()
        .name("lmstack-discovery".into())
        .spawn(move || run(&shared))
}

fn targets(backends: &[BackendConfig]) -> Vec<Target> {
    backends
        .iter()
        .filter_map(|b| {
            Some(Target {
                url: BackendUrl::parse(&b.url).ok()?,
                models: b.models.clone(),
                drained: false,
            })
        })
        .collect()
}

fn run(shared: &Shared) {
    let config = &shared.config.discovery;
    let mut prober = Prober::new(
        config.health.clone(),
        config.scrape_metrics,
        metrics::HEALTH_CHECKS_TOTAL,
    );
    let mut file = config.file.clone().map(WatchedFile::new);
    if file.is_none() {
        prober.set_targets(targets(&config.backends));
    }
    loop {
        if let Some(backends) = file.as_mut().and_then(WatchedFile::changed) {
            tracing::info!(backends = backends.len(), "backends file read");
            prober.set_targets(targets(&backends));
        }
        if let Some(snapshot) = prober.round() {
            match shared.cell.publish(&snapshot) {
                Ok(()) => {
                    tracing::info!(
                        version = snapshot.version,
                        models = snapshot.models.len(),
                        healthy = snapshot.endpoints.iter().filter(|e| e.healthy).count(),
                        endpoints = snapshot.endpoints.len(),
                        "routing snapshot published"
                    );
                    prober.published(snapshot);
                }
                Err(e) => tracing::error!("discovery built an invalid snapshot: {e}"),
            }
        }
        #[expect(clippy::disallowed_methods, reason = "the discovery thread, not a worker")]
        thread::sleep(prober.interval());
    }
}

/// The backends file of `file` mode, re-read when its modification time or size moves. A
/// file that cannot be read or parsed keeps the backends of the last good one (and counts).
struct WatchedFile {
    path: PathBuf,
    seen: Option<(SystemTime, u64)>,
}

impl WatchedFile {
    fn new(path: PathBuf) -> Self {
        Self { path, seen: None }
    }

    fn changed(&mut self) -> Option<Vec<BackendConfig>> {
        let stamp = std::fs::metadata(&self.path)
            .and_then(|m| Ok((m.modified()?, m.len())))
            .ok();
        if stamp.is_none() || stamp == self.seen {
            if stamp.is_none() && self.seen.is_some() {
                tracing::warn!(path = %self.path.display(), "backends file is gone; keeping the last backends");
                self.seen = None;
                self.count("fail");
            }
            return None;
        }
        self.seen = stamp;
        let parsed = std::fs::read_to_string(&self.path)
            .map_err(|e| e.to_string())
            .and_then(|text| BackendsFile::parse(&text));
        match parsed {
            Ok(backends) => {
                self.count("ok");
                Some(backends)
            }
            Err(e) => {
                tracing::error!(path = %self.path.display(), "backends file rejected, keeping the last backends: {e}");
                self.count("fail");
                None
            }
        }
    }

    fn count(&self, status: &'static str) {
        ::metrics::counter!(metrics::DISCOVERY_FILE_READS_TOTAL, "status" => status).increment(1);
    }
}
