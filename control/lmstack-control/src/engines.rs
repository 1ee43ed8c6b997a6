//! The prober thread: holds the current targets (from the source), probes them every
//! interval with lmstack-probe, and publishes a snapshot to the hub whenever what a data
//! plane needs to know changed. A change of targets (a pod gone, drained or new) is
//! published at once, before the next probe round, so that removals reach the data planes
//! within one stream hop.

use std::sync::Arc;
use std::sync::mpsc::{self, RecvTimeoutError};
use std::thread;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use lmstack_probe::{Prober, Target};
use lmstack_snapshot::Snapshot;

use crate::config::Cli;
use crate::hub::Hub;
use crate::metrics;

/// Hands new target sets to the prober thread.
#[derive(Clone)]
pub struct Targets(mpsc::Sender<Vec<Target>>);

impl Targets {
    #[cfg(test)]
    pub fn for_tests(tx: mpsc::Sender<Vec<Target>>) -> Self {
        Self(tx)
    }

    pub fn set(&self, targets: Vec<Target>) {
        let _ = self.0.send(targets);
    }
}

pub fn spawn(cli: &Cli, hub: Arc<Hub>) -> std::io::Result<Targets> {
    let (tx, rx) = mpsc::channel();
    let mut prober = Prober::new(cli.health(), !cli.no_scrape_metrics, metrics::HEALTH_CHECKS_TOTAL);
    // Versions start from the clock so that a restarted control continues past what the
    // data planes already have.
    let start = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64);
    prober.continue_from(start);
    thread::Builder::new()
        .name("lmstack-prober".into())
        .spawn(move || run(prober, rx, &hub))?;
    Ok(Targets(tx))
}

fn run(mut prober: Prober, rx: mpsc::Receiver<Vec<Target>>, hub: &Hub) {
    let mut next_round = Instant::now();
    let mut have_targets = false;
    loop {
        let wait = next_round.saturating_duration_since(Instant::now());
        match rx.recv_timeout(wait) {
            Ok(mut targets) => {
                // Only the latest set matters.
                while let Ok(newer) = rx.try_recv() {
                    targets = newer;
                }
                tracing::info!(targets = targets.len(), "engine targets changed");
                prober.set_targets(targets);
                have_targets = true;
                if let Some(snapshot) = prober.changed() {
                    publish(&mut prober, snapshot, hub);
                }
                next_round = Instant::now();
                continue;
            }
            Err(RecvTimeoutError::Timeout) => {}
            Err(RecvTimeoutError::Disconnected) => return,
        }
        if have_targets {
            let started = Instant::now();
            let changed = prober.round();
            ::metrics::histogram!(metrics::PROBE_ROUND_SECONDS).record(started.elapsed().as_secs_f64());
            if let Some(snapshot) = changed {
                publish(&mut prober, snapshot, hub);
            }
        }
        next_round = Instant::now() + prober.interval();
    }
}

fn publish(prober: &mut Prober, snapshot: Snapshot, hub: &Hub) {
    if let Err(e) = snapshot.validate() {
        tracing::error!("built an invalid snapshot, not publishing it: {e}");
        return;
    }
    let healthy = snapshot.endpoints.iter().filter(|e| e.healthy).count();
    tracing::info!(
        version = snapshot.version,
        models = snapshot.models.len(),
        healthy,
        endpoints = snapshot.endpoints.len(),
        "snapshot published"
    );
    ::metrics::gauge!(metrics::SNAPSHOT_VERSION).set(snapshot.version as f64);
    ::metrics::gauge!(metrics::ENDPOINTS, "status" => "healthy").set(healthy as f64);
    ::metrics::gauge!(metrics::ENDPOINTS, "status" => "unhealthy").set((snapshot.endpoints.len() - healthy) as f64);
    ::metrics::counter!(metrics::SNAPSHOTS_TOTAL).increment(1);
    prober.published(snapshot.clone());
    hub.publish(snapshot);
}
