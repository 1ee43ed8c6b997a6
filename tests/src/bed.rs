//! Test beds shared by the tests that need root or outside programs: a network namespace +
//! veth + cgroup for the eBPF agent, and a real Prometheus.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use serde_json::Value;

use crate::{Proc, agent, args, bin, wait_until};

/// Skips (or fails under CI) with `why`.
pub fn skip(why: &str) {
    if std::env::var("CI").is_ok_and(|v| v == "true" || v == "1") {
        panic!("test cannot run under CI: {why}");
    }
    eprintln!("SKIPPED: {why}");
}

pub fn sh(cmd: &str, args: &[&str]) {
    let out = Command::new(cmd)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("{cmd}: {e}"));
    assert!(
        out.status.success(),
        "{cmd} {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A network namespace, a veth pair (host side `host_ip`, namespace side `engine_ip`) and a
/// cgroup; all removed on drop.
pub struct TestBed {
    pub netns: String,
    pub veth: String,
    pub cgroup: PathBuf,
    pub engine_ip: String,
}

impl TestBed {
    pub fn create(root: &Path) -> TestBed {
        let id = std::process::id();
        let netns = format!("lmstack-t{id}");
        let veth = format!("lmh{id}");
        let peer = format!("lmn{id}");
        let subnet = format!("10.201.{}", id % 250);
        let bed = TestBed {
            netns: netns.clone(),
            veth: veth.clone(),
            cgroup: root.join(format!("lmstack-test-{id}")),
            engine_ip: format!("{subnet}.2"),
        };
        sh("ip", &["netns", "add", &netns]);
        sh("ip", &["link", "add", &veth, "type", "veth", "peer", "name", &peer]);
        sh("ip", &["link", "set", &peer, "netns", &netns]);
        sh("ip", &["addr", "add", &format!("{subnet}.1/30"), "dev", &veth]);
        sh("ip", &["link", "set", &veth, "up"]);
        let in_ns = |a: &[&str]| {
            let mut all = vec!["netns", "exec", &netns];
            all.extend_from_slice(a);
            sh("ip", &all);
        };
        in_ns(&["ip", "addr", "add", &format!("{subnet}.2/30"), "dev", &peer]);
        in_ns(&["ip", "link", "set", &peer, "up"]);
        in_ns(&["ip", "link", "set", "lo", "up"]);
        std::fs::create_dir_all(&bed.cgroup).unwrap();
        bed
    }

    /// Starts the engine simulator inside the bed on `engine_ip`:8000, named `name`.
    pub fn start_sim(&self, name: &str, extra: &[&str]) -> Proc {
        let mut a = args(&["--host", &self.engine_ip, "--port", "8000", "--name", name]);
        a.extend(args(extra));
        self.start(&bin("lmstack-sim"), &a)
    }

    /// Starts `program` inside the cgroup and the namespace.
    pub fn start(&self, program: &Path, extra: &[String]) -> Proc {
        let script = format!(
            "echo $$ > {}/cgroup.procs && exec ip netns exec {} \"$@\"",
            self.cgroup.display(),
            self.netns
        );
        let mut a = args(&["-c", &script, "sh", program.to_str().unwrap()]);
        a.extend(extra.iter().cloned());
        Proc::start(Path::new("/bin/sh"), &a, &[])
    }
}

impl Drop for TestBed {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["link", "del", &self.veth]).output();
        let _ = Command::new("ip").args(["netns", "del", &self.netns]).output();
        // The cgroup is empty once the simulator (dropped first) has exited.
        for _ in 0..50 {
            if std::fs::remove_dir(&self.cgroup).is_ok() || !self.cgroup.exists() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

pub fn cgroup2_root() -> Option<PathBuf> {
    ["/sys/fs/cgroup/unified", "/sys/fs/cgroup"]
        .into_iter()
        .map(PathBuf::from)
        .find(|p| p.join("cgroup.subtree_control").exists())
}

/// A Prometheus server (Debian's package); killed on drop.
pub struct Prometheus {
    child: std::process::Child,
    pub url: String,
    dir: PathBuf,
}

impl Prometheus {
    /// The installed server (Debian's package), if any.
    pub fn exe() -> Option<PathBuf> {
        find_exe(&["/usr/bin/prometheus", "/usr/local/bin/prometheus"])
    }

    /// Scrapes one target every 500 ms.
    pub fn start(target: &str) -> Option<Prometheus> {
        Prometheus::start_with(&format!(
            "global: {{scrape_interval: 500ms, evaluation_interval: 500ms}}\n\
             scrape_configs: [{{job_name: agent, static_configs: [{{targets: ['{target}']}}]}}]\n"
        ))
    }

    /// Runs with this configuration file (scrape and rule files).
    pub fn start_with(config_yaml: &str) -> Option<Prometheus> {
        let exe = Prometheus::exe()?;
        let dir = std::env::temp_dir().join(format!("lmstack-prom-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let config = dir.join("prometheus.yml");
        std::fs::write(&config, config_yaml).unwrap();
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let child = Command::new(exe)
            .arg(format!("--config.file={}", config.display()))
            .arg(format!("--storage.tsdb.path={}", dir.join("data").display()))
            .arg(format!("--web.listen-address=127.0.0.1:{port}"))
            .stdout(std::process::Stdio::null())
            .stderr(std::fs::File::create(dir.join("log")).unwrap())
            .spawn()
            .unwrap();
        Some(Prometheus {
            child,
            url: format!("http://127.0.0.1:{port}"),
            dir,
        })
    }

    /// Polls an instant query until it returns a number.
    pub fn wait_for_value(&self, query: &str) -> f64 {
        let mut value = f64::NAN;
        wait_until(&format!("Prometheus to answer {query}"), || {
            let Ok(mut r) = agent()
                .get(format!("{}/api/v1/query", self.url))
                .query("query", query)
                .call()
            else {
                return false;
            };
            let body: Value = r.body_mut().read_json().unwrap_or(Value::Null);
            value = body["data"]["result"][0]["value"][1]
                .as_str()
                .and_then(|v| v.parse().ok())
                .unwrap_or(f64::NAN);
            value.is_finite()
        });
        value
    }
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// The cgroup v2 root when this test can run here (root, cgroup v2, an agent with probes);
/// otherwise skips (or fails under CI) and returns None.
pub fn ebpf_preconditions() -> Option<PathBuf> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        skip("needs root (BPF programs, network namespaces, cgroups)");
        return None;
    }
    let Some(root) = cgroup2_root() else {
        skip("no cgroup v2 hierarchy mounted");
        return None;
    };
    let check = Command::new(bin("lmstack-agent"))
        .args(["--check", "--cgroup", "/"])
        .output()
        .unwrap();
    let check = String::from_utf8_lossy(&check.stdout).into_owned();
    if !check.contains("probes: built in") {
        skip(&format!(
            "lmstack-agent was built without its probes (`cargo xtask ebpf` installs bpf-linker): {check}"
        ));
        return None;
    }
    Some(root)
}

/// Where `cargo xtask test` installs the outside checkers (`target/tools`).
pub fn tools_dir() -> PathBuf {
    crate::workspace_root().join("target/tools")
}

/// The Python venv with helm-python-sdk and kubernetes-validate, if installed.
pub fn tools_python() -> Option<PathBuf> {
    Some(tools_dir().join("venv/bin/python")).filter(|p| p.exists())
}

/// The npm folder with typescript, @grafana/schema and @kubernetes-models, if installed.
pub fn node_tools() -> Option<PathBuf> {
    Some(tools_dir().join("node")).filter(|p| p.join("node_modules/.bin/tsc").exists())
}

/// The first of `candidates` that exists.
pub fn find_exe(candidates: &[&str]) -> Option<PathBuf> {
    candidates.iter().map(PathBuf::from).find(|p| p.exists())
}
