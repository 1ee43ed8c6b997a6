//! A fake Kubernetes API server over real HTTP, for lmstack-control's pod watcher: pods in
//! memory with resourceVersions, `GET /api/v1/pods` lists (label selector ignored: every pod
//! here is an engine), watches that replay events after a resourceVersion and then stream
//! new ones (chunked), bookmarks, `410 Gone` (an `ERROR` event) for a resourceVersion older
//! than the compacted history, and an outage switch that drops every watch and answers 503,
//! the way an API server behind a failing load balancer does.

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::PathBuf;
use std::sync::{Arc, Condvar, Mutex};
use std::thread;
use std::time::Duration;

use serde_json::{Value, json};

#[derive(Default)]
struct State {
    rv: u64,
    pods: BTreeMap<String, Value>,
    /// (resourceVersion, type, object) of every change.
    events: Vec<(u64, &'static str, Value)>,
    /// Watches from before this resourceVersion get 410 Gone.
    compacted: u64,
    down: bool,
    /// Bumped to end every open watch.
    epoch: u64,
    pub lists: usize,
    pub watches: usize,
}

pub struct FakeApi {
    pub addr: SocketAddr,
    state: Arc<(Mutex<State>, Condvar)>,
}

/// A ready engine pod with its engine at 127.0.0.1:`port`.
pub fn engine_pod(name: &str, port: u16, model: &str) -> Value {
    json!({
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "name": name,
            "namespace": "default",
            "uid": format!("uid-{name}"),
            "labels": {"lmstack.io/role": "engine", "model": model},
        },
        "spec": {"containers": [{"name": "vllm", "ports": [{"name": "container-port", "containerPort": port}]}]},
        "status": {
            "phase": "Running",
            "podIP": "127.0.0.1",
            "conditions": [{"type": "Ready", "status": "True"}],
        },
    })
}

impl FakeApi {
    pub fn start() -> FakeApi {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let state = Arc::new((Mutex::new(State::default()), Condvar::new()));
        {
            let state = state.clone();
            thread::spawn(move || {
                for conn in listener.incoming().map_while(Result::ok) {
                    let state = state.clone();
                    thread::spawn(move || serve(conn, &state));
                }
            });
        }
        FakeApi { addr, state }
    }

    /// A kubeconfig file pointing at this server.
    pub fn kubeconfig(&self) -> PathBuf {
        let path = crate::workspace_root().join(format!(
            "target/e2e-logs/kubeconfig-{}-{}",
            std::process::id(),
            self.addr.port()
        ));
        let text = format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: fake\n  cluster:\n    server: http://{}\nusers:\n- name: test\n  user:\n    token: test-token\ncontexts:\n- name: fake\n  context:\n    cluster: fake\n    user: test\n    namespace: default\ncurrent-context: fake\n",
            self.addr
        );
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(&path, text).unwrap();
        path
    }

    fn change(&self, kind: &'static str, mut pod: Value) {
        let (lock, cv) = &*self.state;
        let mut s = lock.lock().unwrap();
        s.rv += 1;
        let rv = s.rv;
        pod["metadata"]["resourceVersion"] = json!(rv.to_string());
        let name = pod["metadata"]["name"].as_str().unwrap().to_owned();
        if kind == "DELETED" {
            s.pods.remove(&name);
        } else {
            s.pods.insert(name, pod.clone());
        }
        s.events.push((rv, kind, pod));
        cv.notify_all();
    }

    pub fn add(&self, pod: Value) {
        self.change("ADDED", pod);
    }

    /// Replaces a pod (a `MODIFIED` event).
    pub fn modify(&self, pod: Value) {
        self.change("MODIFIED", pod);
    }

    pub fn delete(&self, name: &str) {
        let pod = self
            .state
            .0
            .lock()
            .unwrap()
            .pods
            .get(name)
            .cloned()
            .expect("no such pod");
        self.change("DELETED", pod);
    }

    /// Forgets history: a watch from before now gets 410 Gone and must list again.
    pub fn compact(&self) {
        let mut s = self.state.0.lock().unwrap();
        s.compacted = s.rv;
    }

    /// Drops every open watch and answers 503 to everything until `up`.
    pub fn down(&self) {
        let (lock, cv) = &*self.state;
        let mut s = lock.lock().unwrap();
        s.down = true;
        s.epoch += 1;
        cv.notify_all();
    }

    pub fn up(&self) {
        self.state.0.lock().unwrap().down = false;
    }

    /// (lists, watches) served so far.
    pub fn requests(&self) -> (usize, usize) {
        let s = self.state.0.lock().unwrap();
        (s.lists, s.watches)
    }
}

fn query(target: &str) -> BTreeMap<String, String> {
    target
        .split_once('?')
        .map(|(_, q)| q)
        .unwrap_or("")
        .split('&')
        .filter_map(|kv| kv.split_once('='))
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect()
}

fn respond(conn: &mut TcpStream, status: &str, body: &Value) {
    let body = body.to_string();
    let _ = write!(
        conn,
        "HTTP/1.1 {status}\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
        body.len()
    );
}

fn chunk(conn: &mut TcpStream, line: &Value) -> bool {
    let mut text = line.to_string();
    text.push('\n');
    write!(conn, "{:x}\r\n{text}\r\n", text.len()).is_ok() && conn.flush().is_ok()
}

fn serve(mut conn: TcpStream, state: &(Mutex<State>, Condvar)) {
    let mut buf = Vec::new();
    let mut scratch = [0u8; 4096];
    while !buf.windows(4).any(|w| w == b"\r\n\r\n") {
        match conn.read(&mut scratch) {
            Ok(0) | Err(_) => return,
            Ok(n) => buf.extend_from_slice(&scratch[..n]),
        }
    }
    let head = String::from_utf8_lossy(&buf).into_owned();
    let target = head.split_whitespace().nth(1).unwrap_or("/").to_owned();
    let path = target.split('?').next().unwrap_or("");
    let q = query(&target);
    let (lock, cv) = state;
    if lock.lock().unwrap().down {
        respond(
            &mut conn,
            "503 Service Unavailable",
            &json!({"kind": "Status", "code": 503}),
        );
        return;
    }
    if path != "/api/v1/pods" && path != "/api/v1/namespaces/default/pods" {
        respond(&mut conn, "404 Not Found", &json!({"kind": "Status", "code": 404}));
        return;
    }
    if q.get("watch").map(String::as_str) != Some("true") {
        let mut s = lock.lock().unwrap();
        s.lists += 1;
        let body = json!({
            "apiVersion": "v1",
            "kind": "PodList",
            "metadata": {"resourceVersion": s.rv.to_string()},
            "items": s.pods.values().cloned().collect::<Vec<_>>(),
        });
        drop(s);
        respond(&mut conn, "200 OK", &body);
        return;
    }
    let from: u64 = q.get("resourceVersion").and_then(|v| v.parse().ok()).unwrap_or(0);
    let bookmarks = q.get("allowWatchBookmarks").map(String::as_str) == Some("true");
    let _ = write!(
        conn,
        "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ntransfer-encoding: chunked\r\n\r\n"
    );
    let mut s = lock.lock().unwrap();
    s.watches += 1;
    if from < s.compacted {
        let gone = json!({"type": "ERROR", "object": {
            "kind": "Status", "apiVersion": "v1", "status": "Failure",
            "message": format!("too old resource version: {from} ({})", s.compacted),
            "reason": "Expired", "code": 410,
        }});
        drop(s);
        chunk(&mut conn, &gone);
        let _ = write!(conn, "0\r\n\r\n");
        return;
    }
    let epoch = s.epoch;
    let mut sent = from;
    loop {
        let pending: Vec<Value> = s
            .events
            .iter()
            .filter(|(rv, _, _)| *rv > sent)
            .map(|(_, kind, object)| json!({"type": kind, "object": object}))
            .collect();
        let rv = s.rv;
        drop(s);
        for event in &pending {
            if !chunk(&mut conn, event) {
                return;
            }
        }
        if bookmarks && rv > sent {
            let bookmark = json!({"type": "BOOKMARK", "object": {
                "kind": "Pod", "apiVersion": "v1", "metadata": {"resourceVersion": rv.to_string()},
            }});
            if !chunk(&mut conn, &bookmark) {
                return;
            }
        }
        sent = rv;
        s = lock.lock().unwrap();
        while s.rv == sent && s.epoch == epoch {
            s = cv.wait_timeout(s, Duration::from_millis(500)).unwrap().0;
        }
        if s.epoch != epoch {
            // Dropped: no chunked terminator, the connection just goes.
            let _ = conn.shutdown(std::net::Shutdown::Both);
            return;
        }
    }
}
