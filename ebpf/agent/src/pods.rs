//! The engine pods on this node, from the Kubernetes API (a kube-rs watcher on pods with the
//! engine label and `spec.nodeName` = this node): a pod with a UID whose cgroup directory is
//! found gets the probes attached and its labels registered; a deleted pod is detached. A
//! pod whose cgroup is not there yet (containers starting) is retried every poll. Needs
//! get/list/watch on pods.

use std::collections::HashMap;
use std::path::PathBuf;

use futures_util::StreamExt;
use k8s_openapi::api::core::v1::Pod;
use kube::runtime::WatchStreamExt;
use kube::runtime::watcher::{self, Event};
use kube::{Api, Client};

use crate::Shared;
use crate::cgroups::{Labels, find_pod_dir};

#[derive(Clone, Debug)]
pub struct PodsConfig {
    pub node_name: String,
    /// Empty: all namespaces.
    pub namespace: String,
    pub label_selector: String,
    pub model_label: String,
    pub cgroup_root: PathBuf,
}

/// A pod of interest: its labels and, once found, its cgroup directory.
struct Known {
    labels: Labels,
    dir: Option<PathBuf>,
}

pub async fn run(client: Client, config: PodsConfig, shared: Shared, poll: std::time::Duration) {
    let api: Api<Pod> = if config.namespace.is_empty() {
        Api::all(client)
    } else {
        Api::namespaced(client, &config.namespace)
    };
    let mut wc = watcher::Config::default().labels(&config.label_selector);
    if !config.node_name.is_empty() {
        wc = wc.fields(&format!("spec.nodeName={}", config.node_name));
    }
    let mut stream = watcher::watcher(api, wc).default_backoff().boxed();
    let mut known: HashMap<String, Known> = HashMap::new();
    let mut relist: Option<HashMap<String, Known>> = None;
    let mut tick = tokio::time::interval(poll);
    loop {
        tokio::select! {
            event = stream.next() => {
                let Some(event) = event else { return };
                match event {
                    Ok(Event::Init) => relist = Some(HashMap::new()),
                    Ok(Event::InitApply(pod)) => {
                        if let (Some(uid), Some(labels)) = (pod.metadata.uid.clone(), labels(&pod, &config)) {
                            let dir = known.remove(&uid).and_then(|k| k.dir);
                            relist.get_or_insert_with(HashMap::new).insert(uid, Known { labels, dir });
                        }
                    }
                    Ok(Event::InitDone) => {
                        let fresh = relist.take().unwrap_or_default();
                        // Whatever was not listed again is gone (deleted while the watch was down).
                        for (_, k) in known.drain() {
                            forget(&shared, k);
                        }
                        known = fresh;
                        attach_pending(&shared, &config, &mut known);
                    }
                    Ok(Event::Apply(pod)) => {
                        if let Some(uid) = pod.metadata.uid.clone() {
                            match labels(&pod, &config) {
                                Some(labels) => {
                                    let dir = known.remove(&uid).and_then(|k| k.dir);
                                    known.insert(uid, Known { labels, dir });
                                    attach_pending(&shared, &config, &mut known);
                                }
                                None => {
                                    if let Some(k) = known.remove(&uid) {
                                        forget(&shared, k);
                                    }
                                }
                            }
                        }
                    }
                    Ok(Event::Delete(pod)) => {
                        if let Some(k) = pod.metadata.uid.as_ref().and_then(|uid| known.remove(uid)) {
                            forget(&shared, k);
                        }
                    }
                    Err(e) => tracing::warn!("pod watch: {e}"),
                }
            }
            _ = tick.tick() => attach_pending(&shared, &config, &mut known),
        }
    }
}

/// A pod's labels, or None for a pod that is finished or being deleted.
fn labels(pod: &Pod, config: &PodsConfig) -> Option<Labels> {
    if pod.metadata.deletion_timestamp.is_some() {
        return None;
    }
    let phase = pod.status.as_ref().and_then(|s| s.phase.as_deref());
    if matches!(phase, Some("Succeeded" | "Failed")) {
        return None;
    }
    let model = pod
        .metadata
        .labels
        .as_ref()
        .and_then(|l| l.get(&config.model_label))
        .cloned()
        .unwrap_or_default();
    Some(Labels {
        namespace: pod.metadata.namespace.clone().unwrap_or_default(),
        pod: pod.metadata.name.clone().unwrap_or_default(),
        model,
    })
}

fn attach_pending(shared: &Shared, config: &PodsConfig, known: &mut HashMap<String, Known>) {
    let mut state = shared.lock().unwrap_or_else(|p| p.into_inner());
    for (uid, k) in known.iter_mut().filter(|(_, k)| k.dir.is_none()) {
        let Some(dir) = find_pod_dir(&config.cgroup_root, uid) else {
            continue;
        };
        match state.attach(&dir, k.labels.clone()) {
            Ok(()) => {
                tracing::info!(pod = %k.labels.pod, namespace = %k.labels.namespace, dir = %dir.display(), "attached");
                k.dir = Some(dir);
            }
            Err(e) => tracing::warn!(pod = %k.labels.pod, "attaching to {}: {e:#}", dir.display()),
        }
    }
}

fn forget(shared: &Shared, k: Known) {
    if let Some(dir) = k.dir {
        let mut state = shared.lock().unwrap_or_else(|p| p.into_inner());
        state.detach(&dir);
        tracing::info!(pod = %k.labels.pod, namespace = %k.labels.namespace, "detached");
    }
}
