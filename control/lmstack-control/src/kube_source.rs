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
use kube::runtime::WatchStreamExt;
use kube::runtime::watcher::{self, Event};
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
    let Some(status) = &pod.status else {
        return PodTarget::NoIp;
    };
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
    let host = if ip.contains(':') {
        format!("[{ip}]")
    } else {
        ip.to_owned()
    };
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

#[cfg(test)]
mod tests {
    use super::*;
    use kube::client::Body;
    use serde_json::{Value, json};

    fn config() -> PodConfig {
        PodConfig {
            namespace: "default".into(),
            label_selector: "lmstack.io/role=engine".into(),
            engine_port_name: "container-port".into(),
            engine_port: 8000,
            model_label: "model".into(),
        }
    }

    fn pod_json(name: &str, ip: Option<&str>, ready: bool, port_name: &str) -> Value {
        json!({
            "apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": name, "namespace": "default", "resourceVersion": "1", "labels": {"model": "m"}},
            "spec": {"containers": [{"name": "vllm", "ports": [{"name": port_name, "containerPort": 9000}]}]},
            "status": {
                "phase": "Running",
                "podIP": ip,
                "conditions": [{"type": "Ready", "status": if ready { "True" } else { "False" }}],
            },
        })
    }

    fn pod(name: &str, ip: Option<&str>, ready: bool) -> Pod {
        serde_json::from_value(pod_json(name, ip, ready, "container-port")).unwrap()
    }

    #[test]
    fn ready_pods_route_unready_or_terminating_ones_drain_and_pods_without_ip_wait() {
        let c = config();
        match pod_target(&pod("a", Some("10.0.0.1"), true), &c) {
            PodTarget::Routable(t) => {
                assert_eq!(t.url.base, "http://10.0.0.1:9000");
                assert_eq!(t.models, vec!["m".to_owned()]);
            }
            other => panic!("{other:?}"),
        }
        assert!(matches!(pod_target(&pod("a", Some("10.0.0.1"), false), &c), PodTarget::Drained(t) if t.drained));
        let mut terminating = pod("a", Some("10.0.0.1"), true);
        terminating.metadata.deletion_timestamp = Some(k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(
            k8s_openapi::jiff::Timestamp::UNIX_EPOCH,
        ));
        assert!(matches!(pod_target(&terminating, &c), PodTarget::Drained(_)));
        assert_eq!(pod_target(&pod("a", None, true), &c), PodTarget::NoIp);
        // No port by that name: the configured port.
        let other: Pod = serde_json::from_value(pod_json("a", Some("fd00::1"), true, "metrics")).unwrap();
        assert!(matches!(pod_target(&other, &c), PodTarget::Routable(t) if t.url.base == "http://[fd00::1]:8000"));
    }

    #[test]
    fn a_relist_replaces_the_pods_whole() {
        let c = config();
        let mut set = PodSet::default();
        assert!(!set.apply(Event::Init));
        set.apply(Event::InitApply(pod("a", Some("10.0.0.1"), true)));
        set.apply(Event::InitApply(pod("b", Some("10.0.0.2"), true)));
        assert!(set.apply(Event::InitDone));
        assert_eq!(set.targets(&c).len(), 2);
        // The watch broke; b was deleted meanwhile and no Delete event ever comes.
        set.apply(Event::Init);
        set.apply(Event::InitApply(pod("a", Some("10.0.0.1"), true)));
        assert_eq!(
            set.targets(&c).len(),
            2,
            "the old view holds until the list is complete"
        );
        assert!(set.apply(Event::InitDone));
        let targets = set.targets(&c);
        assert_eq!(targets.len(), 1);
        assert_eq!(targets[0].url.base, "http://10.0.0.1:9000");
    }

    #[test]
    fn an_ip_reused_by_a_new_pod_routes_to_the_ready_one() {
        let c = config();
        let mut set = PodSet::default();
        set.apply(Event::Init);
        let mut old = pod("a-old", Some("10.0.0.1"), true);
        old.metadata.deletion_timestamp = Some(k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(
            k8s_openapi::jiff::Timestamp::UNIX_EPOCH,
        ));
        set.apply(Event::InitApply(old));
        set.apply(Event::InitApply(pod("b-new", Some("10.0.0.1"), true)));
        set.apply(Event::InitDone);
        let targets = set.targets(&c);
        assert_eq!(targets.len(), 1);
        assert!(!targets[0].drained);
    }

    /// The watcher against kube's tower-test mock: it lists with the selector, watches from
    /// the list's resourceVersion, and each change reaches the prober as a target set.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_watcher_lists_then_watches_and_hands_over_targets() {
        let (service, mut handle) = tower_test::mock::pair::<http::Request<Body>, http::Response<Body>>();
        let client = Client::new(service, "default");
        let (tx, rx) = std::sync::mpsc::channel();
        tokio::spawn(run(client, config(), Targets::for_tests(tx)));

        let (request, reply) = handle.next_request().await.expect("a list request");
        let uri = request.uri().to_string();
        assert!(uri.starts_with("/api/v1/namespaces/default/pods?"), "{uri}");
        assert!(uri.contains("labelSelector=lmstack.io%2Frole%3Dengine"), "{uri}");
        assert!(!uri.contains("watch=true"), "{uri}");
        let list = json!({"apiVersion": "v1", "kind": "PodList", "metadata": {"resourceVersion": "41"},
            "items": [pod_json("a", Some("10.0.0.1"), true, "container-port")]});
        reply.send_response(http::Response::new(Body::from(serde_json::to_vec(&list).unwrap())));

        let (request, reply) = handle.next_request().await.expect("a watch request");
        let uri = request.uri().to_string();
        assert!(
            uri.contains("watch=true") && uri.contains("resourceVersion=41"),
            "{uri}"
        );
        let added = json!({"type": "ADDED", "object": pod_json("b", Some("10.0.0.2"), true, "container-port")});
        let deleted = json!({"type": "DELETED", "object": pod_json("a", Some("10.0.0.1"), true, "container-port")});
        let body = format!("{added}\n{deleted}\n");
        reply.send_response(http::Response::new(Body::from(body.into_bytes())));

        // (Blocking receives: the watcher runs on the runtime's other thread.)
        let recv = || rx.recv_timeout(std::time::Duration::from_secs(10)).expect("targets");
        let urls = |t: Vec<Target>| t.into_iter().map(|t| t.url.base).collect::<Vec<_>>();
        assert_eq!(urls(recv()), vec!["http://10.0.0.1:9000"]);
        assert_eq!(urls(recv()), vec!["http://10.0.0.1:9000", "http://10.0.0.2:9000"]);
        assert_eq!(urls(recv()), vec!["http://10.0.0.2:9000"]);
    }
}
