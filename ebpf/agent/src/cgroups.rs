//! Which cgroups the probes watch and whose they are: a target is a cgroup directory (a pod's,
//! or one given with `--cgroup`) with its labels; events carry the cgroup id of the socket's
//! own cgroup (a container below the pod), so every directory below a target maps to it.
//! A cgroup's id is its directory's inode number. Not here: attaching (probes.rs).

use std::collections::HashMap;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// Labels of a target's metrics.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Labels {
    pub namespace: String,
    pub pod: String,
    pub model: String,
}

/// Deepest directory level walked below a target (pod / container / nested).
const MAX_DEPTH: usize = 6;

#[derive(Default)]
pub struct Registry {
    /// Target directory -> its labels.
    targets: HashMap<PathBuf, Arc<Labels>>,
    /// Cgroup id of every directory in or below a target -> the target's labels.
    ids: HashMap<u64, Arc<Labels>>,
}

impl Registry {
    pub fn add(&mut self, dir: &Path, labels: Labels) {
        self.targets.insert(dir.to_owned(), Arc::new(labels));
        self.rescan();
    }

    pub fn remove(&mut self, dir: &Path) {
        self.targets.remove(dir);
        self.rescan();
    }

    pub fn targets(&self) -> usize {
        self.targets.len()
    }

    /// Cgroup ids known, targets and their descendants.
    pub fn ids(&self) -> impl Iterator<Item = u64> + '_ {
        self.ids.keys().copied()
    }

    pub fn labels(&self, cgroup_id: u64) -> Option<Arc<Labels>> {
        self.ids.get(&cgroup_id).cloned()
    }

    /// Walks every target again (containers come and go below a pod's cgroup).
    pub fn rescan(&mut self) {
        self.ids.clear();
        for (dir, labels) in &self.targets {
            walk(dir, 0, &mut |id| {
                self.ids.insert(id, labels.clone());
            });
        }
    }
}

fn walk(dir: &Path, depth: usize, f: &mut impl FnMut(u64)) {
    let Ok(meta) = std::fs::metadata(dir) else {
        return;
    };
    f(meta.ino());
    if depth >= MAX_DEPTH {
        return;
    }
    if let Ok(entries) = std::fs::read_dir(dir) {
        for e in entries.flatten() {
            if e.file_type().is_ok_and(|t| t.is_dir()) {
                walk(&e.path(), depth + 1, f);
            }
        }
    }
}

/// The cgroup v2 hierarchy's mount point: `/sys/fs/cgroup` on unified hosts,
/// `/sys/fs/cgroup/unified` on hybrid ones.
pub fn default_root() -> PathBuf {
    ["/sys/fs/cgroup/unified", "/sys/fs/cgroup"]
        .into_iter()
        .map(PathBuf::from)
        // Only cgroup v2 directories have cgroup.subtree_control.
        .find(|p| p.join("cgroup.subtree_control").exists())
        .unwrap_or_else(|| PathBuf::from("/sys/fs/cgroup"))
}

/// The cgroup directory of the pod with `uid` under `root`: kubelet names it `pod<uid>` (cgroupfs
/// driver) or `kubepods-<qos>-pod<uid with _>.slice` (systemd driver), a few levels down.
pub fn find_pod_dir(root: &Path, uid: &str) -> Option<PathBuf> {
    let dashed = format!("pod{uid}");
    let underscored = format!("pod{}", uid.replace('-', "_"));
    find(root, 0, &|name: &str| {
        name == dashed || name.ends_with(&format!("-{underscored}.slice")) || name == underscored
    })
}

fn find(dir: &Path, depth: usize, matches: &dyn Fn(&str) -> bool) -> Option<PathBuf> {
    if depth > 4 {
        return None;
    }
    let entries = std::fs::read_dir(dir).ok()?;
    let mut subdirs = Vec::new();
    for e in entries.flatten() {
        if !e.file_type().is_ok_and(|t| t.is_dir()) {
            continue;
        }
        if e.file_name().to_str().is_some_and(matches) {
            return Some(e.path());
        }
        subdirs.push(e.path());
    }
    subdirs.iter().find_map(|d| find(d, depth + 1, matches))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn labels(pod: &str) -> Labels {
        Labels {
            namespace: "ns".into(),
            pod: pod.into(),
            model: "m".into(),
        }
    }

    #[test]
    fn every_directory_below_a_target_maps_to_its_labels() {
        let root = std::env::temp_dir().join(format!("lmstack-cgroups-test-{}", std::process::id()));
        let pod = root.join("kubepods/burstable/pod1234-ab");
        std::fs::create_dir_all(pod.join("container-a")).unwrap();
        std::fs::create_dir_all(pod.join("container-b/nested")).unwrap();
        let mut r = Registry::default();
        r.add(&pod, labels("p1"));
        let ino = |p: &Path| std::fs::metadata(p).unwrap().ino();
        assert_eq!(r.labels(ino(&pod.join("container-b/nested"))).unwrap().pod, "p1");
        assert_eq!(r.labels(ino(&pod)).unwrap().pod, "p1");
        assert!(r.labels(ino(&root)).is_none());
        assert_eq!(find_pod_dir(&root, "1234-ab"), Some(pod.clone()));
        assert_eq!(find_pod_dir(&root, "999"), None);
        r.remove(&pod);
        assert!(r.labels(ino(&pod)).is_none());
        std::fs::remove_dir_all(&root).unwrap();
    }

    #[test]
    fn finds_systemd_style_pod_slices() {
        let root = std::env::temp_dir().join(format!("lmstack-cgroups-systemd-{}", std::process::id()));
        let pod = root.join("kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod12_34.slice");
        std::fs::create_dir_all(&pod).unwrap();
        assert_eq!(find_pod_dir(&root, "12-34"), Some(pod));
        std::fs::remove_dir_all(&root).unwrap();
    }
}
