//! Engine pods from the Kubernetes API: a kube-rs watcher (list, then watch from the list's
//! resourceVersion; on errors it retries with backoff, and on 410 Gone it lists again), so a
//! pod deleted while the watch was down disappears at the next list: no ghost endpoints. The
//! pods seen are kept in a map replaced whole at the end of every (re)list, and turned into
//! targets: ready, not terminating, with an IP: routable; with an IP but not ready or
//! terminating: drained (kept, unhealthy); no IP yet: left out. Needs get/list/watch on pods
//! only.

use std::collections::BTreeMap;

use futures_util::StreamExt;
use k8s_openapi::api::core::v1::Pod;
use kube::runtime::watcher::{self, Event};
use kube::runtime::WatchStreamExt;
use kube::{Api, Client};
use lmstack_probe::{BackendUrl, Target};

use crate::config::PodConfig;
use crate::engines::Targets;
use crate::metrics;

/// What a pod means for routing.
#[derive(Clone, Debug, PartialEq)]
pub enum PodTarget {
    Routable(Target),
    Drained(Target),
    NoIp,
}

/// Reads one pod. Pure: the watcher logic's unit tests feed it pods.
pub fn pod_target(pod: &Pod, config: &PodConfig) -> PodTarget {
    let Some(status) = &pod.status else { return PodTarget::NoIp };
    let Some(ip) = status.pod_ip.as_deref().filter(|ip| !ip.is_empty()) else {
        return PodTarget::NoIp;
    };
    let port = pod
        .spec
        .iter()
        .flat_map(|s| &s.containers)
        .flat_map(|c| c.ports.iter().flatten())
        .find(|p| p.name.as_deref() == Some(config.engine_port_name.as_str()))
        .and_then(|p| u16::try_from(p.container_port).ok())
        .unwrap_or(config.engine_port);
    let host = if ip.contains(':') { format!("[{ip}]") } else { ip.to_owned() };
    let Ok(url) = BackendUrl::parse(&format!("http://{host}:{port}")) else {
        return PodTarget::NoIp;
    };
    let models = (!config.model_label.is_empty())
        .then(|| pod.metadata.labels.as_ref()?.get(&config.model_label).cloned())
        .flatten()
        .filter(|m| !m.is_empty())
        .into_iter()
        .collect();
    let ready = status
        .conditions
        .iter()
        .flatten()
        .any(|c| c.type_ == "Ready" && c.status == "True");
    let terminating = pod.metadata.deletion_timestamp.is_some();
    let running = status.phase.as_deref() == Some("Running");
    let target = Target {
        url,
        models,
        drained: false,
    };
    if ready && running && !terminating {
        PodTarget::Routable(target)
    } else {
        PodTarget::Drained(Target {
            drained: true,
            ..target
        })
    }
}

fn key(pod: &Pod) -> String {
    format!(
        "{}/{}",
        pod.metadata.namespace.as_deref().unwrap_or_default(),
        pod.metadata.name.as_deref().unwrap_or_default()
    )
}

/// The pods seen, kept the way the watcher's events say: replaced whole by each (re)list.
#[derive(Default)]
pub struct PodSet {
    pods: BTreeMap<String, Pod>,
    /// Pods of a list in progress.
    listing: Option<BTreeMap<String, Pod>>,
    /// A complete list has been seen.
    pub ready: bool,
}

impl PodSet {
    /// Applies one event; true when the set of pods changed in a way worth publishing.
    pub fn apply(&mut self, event: Event<Pod>) -> bool {
        match event {
            Event::Init => {
                self.listing = Some(BTreeMap::new());
                false
            }
            Event::InitApply(pod) => {
                self.listing.get_or_insert_default().insert(key(&pod), pod);
                false
            }
            Event::InitDone => {
                self.pods = self.listing.take().unwrap_or_default();
                self.ready = true;
                true
            }
            Event::Apply(pod) => {
                self.pods.insert(key(&pod), pod);
                self.ready
            }
            Event::Delete(pod) => {
                self.pods.remove(&key(&pod));
                self.ready
            }
        }
    }

    /// Targets in a stable order (pod key), each URL once.
    pub fn targets(&self, config: &PodConfig) -> Vec<Target> {
        let (mut routable, mut drained, mut no_ip) = (0, 0, 0);
        let mut targets: Vec<Target> = Vec::new();
        for pod in self.pods.values() {
            let t = match pod_target(pod, config) {
                PodTarget::Routable(t) => {
                    routable += 1;
                    t
                }
                PodTarget::Drained(t) => {
                    drained += 1;
                    t
                }
                PodTarget::NoIp => {
                    no_ip += 1;
                    continue;
                }
            };
            // An IP reused by a new pod while the old one terminates: the routable one wins.
            match targets.iter_mut().find(|x| x.url == t.url) {
                Some(x) if x.drained && !t.drained => *x = t,
                Some(_) => {}
                None => targets.push(t),
            }
        }
        ::metrics::gauge!(metrics::PODS, "status" => "routable").set(f64::from(routable));
        ::metrics::gauge!(metrics::PODS, "status" => "drained").set(f64::from(drained));
        ::metrics::gauge!(metrics::PODS, "status" => "no_ip").set(f64::from(no_ip));
        targets
    }
}

fn event_name(e: &Event<Pod>) -> &'static str {
    match e {
        Event::Init => "init",
        Event::InitApply(_) => "init_apply",
        Event::InitDone => "init_done",
        Event::Apply(_) => "apply",
        Event::Delete(_) => "delete",
    }
}

/// Follows engine pods until the process ends, handing every change to the prober.
pub async fn run(client: Client, config: PodConfig, targets: Targets) {
    let api: Api<Pod> = if config.namespace.is_empty() {
        Api::all(client)
    } else {
        Api::namespaced(client, &config.namespace)
    };
    let watch_config = watcher::Config::default().labels(&config.label_selector);
    let mut events = kube::runtime::watcher(api, watch_config).default_backoff().boxed();
    let mut pods = PodSet::default();
    let mut last: Option<Vec<Target>> = None;
    tracing::info!(selector = %config.label_selector, namespace = %config.namespace, "watching engine pods");
    while let Some(event) = events.next().await {
        let event = match event {
            Ok(e) => e,
            Err(e) => {
                ::metrics::counter!(metrics::WATCH_ERRORS_TOTAL).increment(1);
                tracing::warn!("pod watch: {e} (retrying)");
                continue;
            }
        };
        ::metrics::counter!(metrics::WATCH_EVENTS_TOTAL, "type" => event_name(&event)).increment(1);
        if pods.apply(event) {
            let next = pods.targets(&config);
            if last.as_ref() != Some(&next) {
                targets.set(next.clone());
                last = Some(next);
            }
        }
    }
}
