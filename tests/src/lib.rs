//! The end-to-end test bed: starts the real binaries (`lmstack`, `lmstack-sim`) on loopback
//! with ephemeral ports, waits for them by polling (never by sleeping), talks to them over
//! real sockets, and stops them by PID when dropped.
//!
//! Also here: a blocking raw HTTP client for the cases no well-behaved client produces,
//! fake engines that misbehave on purpose, and a Prometheus text reader.

#![allow(clippy::unwrap_used)]

pub mod bed;
pub mod kube;
pub mod otlp;

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock, mpsc};
use std::thread;
use std::time::{Duration, Instant};

pub use serde_json::{Value, json};

/// How long anything in these tests may take to become true. Generous: CI machines are
/// shared and slow; a passing test never waits this long.
pub const DEADLINE: Duration = Duration::from_secs(30);

pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// The packages whose binaries the tests and `cargo xtask` run (`lmstack`; `lmstack-sim` and
/// `lmstack-load`; `lmstack-control`; `lmstack-agent`, which builds without its probes where
/// the BPF tool chain is missing): both build exactly this list with `cargo build --bins`.
pub const BINARY_PACKAGES: [&str; 4] = ["lmstack", "lmstack-perf", "lmstack-control", "lmstack-agent"];

/// The path of a workspace binary, built (once per test process) with the profile the tests
/// were built with, so tests never run stale binaries.
pub fn bin(name: &str) -> PathBuf {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    let dir = DIR.get_or_init(|| {
        let exe = std::env::current_exe().unwrap();
        // target/<profile>/deps/<test> -> target/<profile>
        let dir = exe.parent().unwrap().parent().unwrap().to_path_buf();
        let profile = dir.file_name().unwrap().to_string_lossy().into_owned();
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        let mut cmd = Command::new(cargo);
        cmd.args(["build", "--quiet", "--bins"]).current_dir(workspace_root());
        for package in BINARY_PACKAGES {
            cmd.args(["-p", package]);
        }
        if profile != "debug" {
            cmd.args(["--profile", if profile == "release" { "release" } else { &profile }]);
        }
        let status = cmd.status().expect("running cargo build for the binaries");
        assert!(status.success(), "building the binaries failed");
        dir
    });
    let path = dir.join(name);
    assert!(path.exists(), "{} was not built", path.display());
    path
}

/// Polls `f` until it is true or the deadline passes.
pub fn wait_until(what: &str, mut f: impl FnMut() -> bool) {
    let start = Instant::now();
    while start.elapsed() < DEADLINE {
        if f() {
            return;
        }
        thread::sleep(Duration::from_millis(20));
    }
    panic!("timed out waiting for: {what}");
}

/// A running child process, killed when dropped.
pub struct Proc {
    child: Child,
    pub addr: SocketAddr,
    pub log: PathBuf,
    lines: Arc<Mutex<Vec<String>>>,
}

impl Proc {
    /// Starts `program` and waits for the stdout line that says where it listens.
    pub fn start(program: &Path, args: &[String], env: &[(&str, &str)]) -> Proc {
        static SEQ: AtomicUsize = AtomicUsize::new(0);
        let logs = workspace_root().join("target/e2e-logs");
        std::fs::create_dir_all(&logs).unwrap();
        let log = logs.join(format!(
            "{}-{}-{}.log",
            program.file_name().unwrap().to_string_lossy(),
            std::process::id(),
            SEQ.fetch_add(1, Ordering::Relaxed)
        ));
        let stderr = std::fs::File::create(&log).unwrap();
        let mut cmd = Command::new(program);
        cmd.args(args)
            .stdout(Stdio::piped())
            .stderr(stderr)
            .stdin(Stdio::null());
        for (k, v) in env {
            cmd.env(k, v);
        }
        let mut child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("starting {}: {e}", program.display()));
        let stdout = child.stdout.take().unwrap();
        let lines = Arc::new(Mutex::new(Vec::new()));
        let (tx, rx) = mpsc::channel();
        {
            let lines = lines.clone();
            thread::spawn(move || {
                for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                    let rest = line.split("listening on http://").nth(1);
                    if let Some(rest) = rest.or_else(|| line.split("listening on https://").nth(1)) {
                        let addr = rest.split_whitespace().next().unwrap_or("").to_owned();
                        let _ = tx.send(addr);
                    }
                    lines.lock().unwrap().push(line);
                }
            });
        }
        let addr = match rx.recv_timeout(DEADLINE) {
            Ok(a) => a.parse().unwrap(),
            Err(_) => {
                let _ = child.kill();
                let log_text = std::fs::read_to_string(&log).unwrap_or_default();
                panic!("{} did not start:\n{log_text}", program.display());
            }
        };
        Proc {
            child,
            addr,
            log,
            lines,
        }
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub fn stdout_lines(&self) -> Vec<String> {
        self.lines.lock().unwrap().clone()
    }

    /// Sends SIGTERM and waits for the exit status.
    pub fn terminate(mut self) -> std::process::ExitStatus {
        // SAFETY: kill(2) on our own child's PID has no memory-safety preconditions.
        unsafe {
            libc::kill(self.child.id() as i32, libc::SIGTERM);
        }
        let status = self.child.wait().unwrap();
        std::mem::forget(self);
        status
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Starts a simulated engine on a free port; `extra` adds flags.
pub fn sim(name: &str, extra: &[&str]) -> Proc {
    let mut args: Vec<String> = ["--host", "127.0.0.1", "--port", "0", "--name", name]
        .iter()
        .map(|s| (*s).to_owned())
        .collect();
    args.extend(extra.iter().map(|s| (*s).to_owned()));
    Proc::start(&bin("lmstack-sim"), &args, &[])
}

/// Starts the router on a free port with `args`.
pub fn router(args: &[String]) -> Proc {
    router_env(args, &[])
}

pub fn router_env(args: &[String], env: &[(&str, &str)]) -> Proc {
    let mut all: Vec<String> = ["--host", "127.0.0.1", "--port", "0", "--workers", "2"]
        .iter()
        .map(|s| (*s).to_owned())
        .collect();
    all.extend(args.iter().cloned());
    Proc::start(&bin("lmstack"), &all, env)
}

/// Starts lmstack-control on a free port with `args`.
pub fn control(args: &[String], env: &[(&str, &str)]) -> Proc {
    let mut all = vec!["--listen".to_owned(), "127.0.0.1:0".to_owned()];
    all.extend(args.iter().cloned());
    Proc::start(&bin("lmstack-control"), &all, env)
}

/// lmstack-control over a static list of engines (`urls`), probing every 200 ms.
pub fn static_control(urls: &[String], extra: &[&str]) -> Proc {
    let mut a = args(&[
        "--source",
        "static",
        "--static-backends",
        &urls.join(","),
        "--probe-interval-ms",
        "200",
    ]);
    a.extend(args(extra));
    control(&a, &[])
}

/// Starts a router following `control`.
pub fn router_following(control: &Proc, extra: &[&str]) -> Proc {
    let mut a = args(&["--service-discovery", "control", "--control-url"]);
    a.push(control.url());
    a.extend(args(extra));
    router(&a)
}

/// Healthy endpoints of `model` in the router's /health (0 when not served).
pub fn healthy_endpoints(router: &Proc, model: &str) -> u64 {
    model_health(router, model, "healthy_endpoints")
}

/// Endpoints (healthy or not) of `model` in the router's /health.
pub fn listed_endpoints(router: &Proc, model: &str) -> u64 {
    model_health(router, model, "endpoints")
}

fn model_health(router: &Proc, model: &str, field: &str) -> u64 {
    let health = get(router, "/health").json();
    health["models"]
        .as_array()
        .and_then(|models| models.iter().find(|m| m["model"] == model))
        .and_then(|m| m[field].as_u64())
        .unwrap_or(0)
}

/// `--static-backends` for these engines.
pub fn backends(engines: &[&Proc]) -> Vec<String> {
    vec![
        "--static-backends".into(),
        engines.iter().map(|e| e.url()).collect::<Vec<_>>().join(","),
    ]
}

pub fn args(list: &[&str]) -> Vec<String> {
    list.iter().map(|s| (*s).to_owned()).collect()
}

/// Waits until the router's /health says it can route.
pub fn wait_healthy(router: &Proc) {
    wait_until("the router to report healthy", || get(router, "/health").status == 200);
}

pub struct Reply {
    pub status: u16,
    pub headers: HashMap<String, String>,
    pub body: String,
}

impl Reply {
    /// The `x-lmstack-route` explanation's `key=value` for `key`.
    pub fn explained(&self, key: &str) -> &str {
        let route = self.header("x-lmstack-route").unwrap();
        route
            .split("; ")
            .find_map(|kv| kv.strip_prefix(&format!("{key}=")))
            .unwrap_or_else(|| panic!("no {key} in {route}"))
    }

    pub fn json(&self) -> Value {
        serde_json::from_str(&self.body).unwrap_or_else(|e| panic!("not JSON ({e}): {}", self.body))
    }

    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(&name.to_ascii_lowercase()).map(String::as_str)
    }
}

pub fn agent() -> ureq::Agent {
    ureq::Agent::config_builder()
        .http_status_as_error(false)
        .timeout_global(Some(DEADLINE))
        .build()
        .into()
}

fn reply(mut r: ureq::http::Response<ureq::Body>) -> Reply {
    let status = r.status().as_u16();
    let headers = r
        .headers()
        .iter()
        .map(|(k, v)| (k.as_str().to_owned(), v.to_str().unwrap_or("").to_owned()))
        .collect();
    let body = r.body_mut().read_to_string().unwrap_or_default();
    Reply { status, headers, body }
}

pub fn get(p: &Proc, path: &str) -> Reply {
    reply(agent().get(format!("{}{path}", p.url())).call().unwrap())
}

pub fn post(p: &Proc, path: &str, body: &Value, headers: &[(&str, &str)]) -> Reply {
    post_with(&agent(), p, path, body, headers)
}

pub fn post_with(agent: &ureq::Agent, p: &Proc, path: &str, body: &Value, headers: &[(&str, &str)]) -> Reply {
    let mut req = agent
        .post(format!("{}{path}", p.url()))
        .header("content-type", "application/json");
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    reply(req.send(body.to_string()).unwrap())
}

/// A metric's value from a Prometheus text page: the first sample of `name` whose labels
/// include all of `labels`.
pub fn metric(text: &str, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    text.lines().filter(|l| !l.starts_with('#')).find_map(|line| {
        let (series, value) = line.rsplit_once(' ')?;
        let (metric_name, label_part) = match series.split_once('{') {
            Some((n, rest)) => (n, rest.trim_end_matches('}')),
            None => (series, ""),
        };
        if metric_name != name {
            return None;
        }
        let ok = labels.iter().all(|(k, v)| label_part.contains(&format!("{k}=\"{v}\"")));
        if ok { value.parse().ok() } else { None }
    })
}

/// The sum of all samples of `name` with all of `labels`.
pub fn metric_sum(text: &str, name: &str, labels: &[(&str, &str)]) -> f64 {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|line| {
            let (series, value) = line.rsplit_once(' ')?;
            let (metric_name, label_part) = series.split_once('{').unwrap_or((series, ""));
            (metric_name == name && labels.iter().all(|(k, v)| label_part.contains(&format!("{k}=\"{v}\""))))
                .then(|| value.parse::<f64>().ok())
                .flatten()
        })
        .sum()
}

pub fn metrics_text(p: &Proc) -> String {
    get(p, "/metrics").body
}

/// The router's metrics once `ready` holds for them: workers hand their figures to the
/// exporter every 100 ms, so what was just recorded may take that long to show.
pub fn metrics_when(p: &Proc, what: &str, ready: impl Fn(&str) -> bool) -> String {
    let mut text = String::new();
    wait_until(what, || {
        text = metrics_text(p);
        ready(&text)
    });
    text
}

/// The tiny model's tokenizer files (perf/fixtures/tiny-llama): the ones real vLLM serves in
/// the real-engine checks, and simulated engines tokenize with for exact KV routing.
pub fn tiny_tokenizer_dir() -> String {
    workspace_root()
        .join("perf/fixtures/tiny-llama")
        .to_string_lossy()
        .into_owned()
}

/// A loopback port free now, for a listener that must be named in advance (an engine's
/// ZeroMQ KV-event sockets).
/// The tiny model whose real tokenizer is checked in (perf/fixtures/tiny-llama).
pub const TINY_MODEL: &str = "tiny-llama";

/// A simulator's flags to serve the tiny model with its tokenizer, in blocks of 16 tokens,
/// publishing KV events on `kv_port`.
pub fn tiny_kv_flags(kv_port: u16) -> Vec<String> {
    args(&[
        "--model",
        TINY_MODEL,
        "--block-size",
        "16",
        "--tokenizer",
        &tiny_tokenizer_dir(),
        "--kv-events-port",
        &kv_port.to_string(),
    ])
}

/// A simulated engine of the tiny model publishing KV events on `kv_port`; `extra` adds flags.
pub fn tiny_kv_sim(name: &str, kv_port: u16, extra: &[&str]) -> Proc {
    let mut a = tiny_kv_flags(kv_port);
    a.extend(args(extra));
    let a: Vec<&str> = a.iter().map(String::as_str).collect();
    sim(name, &a)
}

pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .unwrap_or_else(|e| panic!("no free port: {e}"))
}

/// Whether `router` routes `engine` in exact-KV `mode` now (`lmstack_routing_mode`).
pub fn routing_mode_is(router: &Proc, engine: &Proc, mode: &str) -> bool {
    metric(
        &metrics_text(router),
        "lmstack_routing_mode",
        &[("endpoint", &engine.url()), ("mode", mode)],
    ) == Some(1.0)
}

/// Blocks in `router`'s KV index of `engine` (0 before any).
pub fn kv_index_blocks(router: &Proc, engine: &Proc) -> f64 {
    metric(
        &metrics_text(router),
        "lmstack_kv_index_blocks",
        &[("endpoint", &engine.url())],
    )
    .unwrap_or(0.0)
}

/// A raw HTTP/1.1 response as read off the wire.
#[derive(Debug)]
pub struct RawResponse {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
    /// The body ended properly (length reached or last chunk seen).
    pub complete: bool,
}

impl RawResponse {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    pub fn json(&self) -> Value {
        serde_json::from_slice(&self.body).unwrap_or_else(|e| panic!("not JSON ({e}): {}", self.text()))
    }
}

/// A raw client connection, for what well-behaved clients never send: over TCP, or over
/// any other byte stream (a TLS client's, see [`Raw::over`]).
pub struct Raw<S = TcpStream> {
    pub stream: S,
    buf: Vec<u8>,
}

impl Raw {
    pub fn connect(p: &Proc) -> Raw {
        Raw::connect_addr(p.addr)
    }

    /// Connects to `addr` (from another thread than the one holding the `Proc`).
    pub fn connect_addr(addr: SocketAddr) -> Raw {
        Raw::try_connect(addr).unwrap()
    }

    pub fn try_connect(addr: SocketAddr) -> std::io::Result<Raw> {
        let stream = TcpStream::connect(addr)?;
        stream.set_read_timeout(Some(DEADLINE))?;
        stream.set_nodelay(true)?;
        Ok(Raw::over(stream))
    }

    pub fn close(self) {
        let _ = self.stream.shutdown(Shutdown::Both);
    }
}

impl<S: Read + Write> Raw<S> {
    /// A client on `stream`, already connected.
    pub fn over(stream: S) -> Raw<S> {
        Raw {
            stream,
            buf: Vec::new(),
        }
    }

    pub fn send(&mut self, bytes: &[u8]) -> &mut Self {
        self.stream.write_all(bytes).unwrap();
        self
    }

    fn fill(&mut self) -> usize {
        let mut chunk = [0u8; 16 * 1024];
        match self.stream.read(&mut chunk) {
            Ok(n) => {
                self.buf.extend_from_slice(&chunk[..n]);
                n
            }
            Err(_) => 0,
        }
    }

    /// Reads one response head, or None if the connection closed first.
    /// What was read past the last head or response (the start of a body).
    pub fn take_buffered(&mut self) -> Vec<u8> {
        std::mem::take(&mut self.buf)
    }

    pub fn read_head(&mut self) -> Option<(u16, Vec<(String, String)>)> {
        loop {
            let mut headers = [httparse::EMPTY_HEADER; 64];
            let mut res = httparse::Response::new(&mut headers);
            if let Ok(httparse::Status::Complete(n)) = res.parse(&self.buf) {
                let status = res.code.unwrap();
                let headers = res
                    .headers
                    .iter()
                    .map(|h| (h.name.to_owned(), String::from_utf8_lossy(h.value).into_owned()))
                    .collect();
                self.buf.drain(..n);
                return Some((status, headers));
            }
            if self.fill() == 0 {
                return None;
            }
        }
    }

    /// Reads one whole response (interim 1xx responses are returned too).
    pub fn read_response(&mut self) -> Option<RawResponse> {
        let (status, headers) = self.read_head()?;
        let find = |n: &str| {
            headers
                .iter()
                .find(|(k, _)| k.eq_ignore_ascii_case(n))
                .map(|(_, v)| v.clone())
        };
        let mut body = Vec::new();
        let mut complete = true;
        if (100..200).contains(&status) || status == 204 {
        } else if let Some(len) = find("content-length") {
            let len: usize = len.trim().parse().unwrap();
            while self.buf.len() < len {
                if self.fill() == 0 {
                    complete = false;
                    break;
                }
            }
            let take = len.min(self.buf.len());
            body = self.buf.drain(..take).collect();
        } else if find("transfer-encoding").is_some_and(|t| t.eq_ignore_ascii_case("chunked")) {
            complete = self.read_chunked(&mut body);
        } else {
            while self.fill() > 0 {}
            body = std::mem::take(&mut self.buf);
        }
        Some(RawResponse {
            status,
            headers,
            body,
            complete,
        })
    }

    /// A chunked body, decoded by this independent little parser.
    fn read_chunked(&mut self, body: &mut Vec<u8>) -> bool {
        loop {
            let line_end = loop {
                if let Some(i) = self.buf.windows(2).position(|w| w == b"\r\n") {
                    break i;
                }
                if self.fill() == 0 {
                    return false;
                }
            };
            let line = String::from_utf8_lossy(&self.buf[..line_end]).into_owned();
            let size = usize::from_str_radix(line.split(';').next().unwrap().trim(), 16).unwrap();
            self.buf.drain(..line_end + 2);
            while self.buf.len() < size + 2 {
                if self.fill() == 0 {
                    body.append(&mut self.buf);
                    return false;
                }
            }
            if size == 0 {
                self.buf.drain(..2);
                return true;
            }
            body.extend(self.buf.drain(..size));
            self.buf.drain(..2);
        }
    }

    /// Whether the server closed the connection (reads EOF within the deadline).
    pub fn closed_by_peer(&mut self) -> bool {
        let start = Instant::now();
        while start.elapsed() < DEADLINE {
            let mut b = [0u8; 1024];
            match self.stream.read(&mut b) {
                Ok(0) => return true,
                Ok(_) => continue,
                // A TLS stream closed without close_notify reads as an unexpected EOF.
                Err(e)
                    if matches!(
                        e.kind(),
                        std::io::ErrorKind::ConnectionReset | std::io::ErrorKind::UnexpectedEof
                    ) =>
                {
                    return true;
                }
                Err(_) => return false,
            }
        }
        false
    }
}

/// A request with a JSON body, as raw bytes.
pub fn raw_post(path: &str, body: &str, extra_headers: &str) -> Vec<u8> {
    format!(
        "POST {path} HTTP/1.1\r\nHost: lmstack\r\nContent-Type: application/json\r\nContent-Length: {}\r\n{extra_headers}\r\n{body}",
        body.len()
    )
    .into_bytes()
}

/// What a fake engine does with requests other than its health probe.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Misbehave {
    /// Reads the request, then resets the connection.
    Reset,
    /// Reads the request and never answers.
    Hang,
    /// Sends a streaming response head and one event, then goes silent.
    StallMidStream,
    /// Answers correctly (Content-Length) but closes every connection afterwards
    /// without saying so, so pooled connections go stale.
    CloseAfterEachResponse,
}

/// A fake engine on a real socket: healthy to probes (any `GET`), misbehaving otherwise.
pub struct FakeEngine {
    pub addr: SocketAddr,
    stop: Arc<AtomicBool>,
    pub requests: Arc<AtomicUsize>,
}

impl FakeEngine {
    pub fn start(how: Misbehave) -> FakeEngine {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let stop = Arc::new(AtomicBool::new(false));
        let requests = Arc::new(AtomicUsize::new(0));
        listener.set_nonblocking(true).unwrap();
        {
            let stop = stop.clone();
            let requests = requests.clone();
            thread::spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    match listener.accept() {
                        Ok((s, _)) => {
                            s.set_nonblocking(false).unwrap();
                            let requests = requests.clone();
                            thread::spawn(move || fake_connection(s, how, &requests));
                        }
                        Err(_) => thread::sleep(Duration::from_millis(5)),
                    }
                }
                // Dropping the listener refuses new connections from now on.
            });
        }
        FakeEngine { addr, stop, requests }
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Stops listening: new connections are refused.
    pub fn stop_listening(&self) {
        self.stop.store(true, Ordering::Relaxed);
        let start = Instant::now();
        while TcpStream::connect(self.addr).is_ok() && start.elapsed() < DEADLINE {
            thread::sleep(Duration::from_millis(10));
        }
    }
}

impl Drop for FakeEngine {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

/// Reads from `s` until `buf` holds one whole request (its head and its Content-Length
/// body): the lengths of both, or `None` when the connection ends first.
pub fn read_request(s: &mut impl Read, buf: &mut Vec<u8>) -> Option<(usize, usize)> {
    let (head_len, body_len) = loop {
        if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            let len = String::from_utf8_lossy(&buf[..end])
                .lines()
                .find_map(|l| {
                    let (k, v) = l.split_once(':')?;
                    k.eq_ignore_ascii_case("content-length")
                        .then(|| v.trim().parse::<usize>().ok())?
                })
                .unwrap_or(0);
            break (end + 4, len);
        }
        read_more(s, buf)?;
    };
    while buf.len() < head_len + body_len {
        read_more(s, buf)?;
    }
    Some((head_len, body_len))
}

fn read_more(s: &mut impl Read, buf: &mut Vec<u8>) -> Option<()> {
    let mut chunk = [0u8; 8192];
    match s.read(&mut chunk) {
        Ok(0) | Err(_) => None,
        Ok(n) => {
            buf.extend_from_slice(&chunk[..n]);
            Some(())
        }
    }
}

fn fake_connection(mut s: TcpStream, how: Misbehave, requests: &AtomicUsize) {
    let mut buf = Vec::new();
    loop {
        // Read one request head and its Content-Length body.
        let Some((head_len, body_len)) = read_request(&mut s, &mut buf) else {
            return;
        };
        let line = String::from_utf8_lossy(&buf[..head_len])
            .lines()
            .next()
            .unwrap_or("")
            .to_owned();
        buf.drain(..head_len + body_len);
        // Probes (`/health`, `/metrics`) get an empty 200; only requests are misbehaved on.
        if line.starts_with("GET ") {
            let _ = s.write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n");
            continue;
        }
        requests.fetch_add(1, Ordering::Relaxed);
        match how {
            Misbehave::Reset => {
                let linger = libc::linger {
                    l_onoff: 1,
                    l_linger: 0,
                };
                // SAFETY: setsockopt on a socket we own, with a correctly sized linger value.
                unsafe {
                    libc::setsockopt(
                        std::os::fd::AsRawFd::as_raw_fd(&s),
                        libc::SOL_SOCKET,
                        libc::SO_LINGER,
                        (&linger as *const libc::linger).cast(),
                        std::mem::size_of::<libc::linger>() as libc::socklen_t,
                    );
                }
                return;
            }
            Misbehave::Hang => {
                thread::sleep(DEADLINE * 2);
                return;
            }
            Misbehave::StallMidStream => {
                let _ = s.write_all(
                    b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n\
                      f\r\ndata: {\"a\":1}\n\n\r\n",
                );
                thread::sleep(DEADLINE * 2);
                return;
            }
            Misbehave::CloseAfterEachResponse => {
                let body = br#"{"id":"x","object":"text_completion","choices":[{"index":0,"text":"ok"}]}"#;
                let _ = s.write_all(
                    format!(
                        "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n",
                        body.len()
                    )
                    .as_bytes(),
                );
                let _ = s.write_all(body);
                return;
            }
        }
    }
}

/// A router in front of one fake engine serving model `m`, healthy, with probes far apart
/// (so a misbehaving engine stays routable); `extra` adds flags.
pub fn router_over(fake: &FakeEngine, extra: &[&str]) -> Proc {
    let mut a = args(&[
        "--static-backends",
        &fake.url(),
        "--static-models",
        "m",
        "--health-check-interval-ms",
        "60000",
    ]);
    a.extend(args(extra));
    let r = router(&a);
    wait_healthy(&r);
    r
}

/// An API keys file for `--api-keys`: `tenants` is YAML (the `tenants:` list), where
/// `{sha256:KEY}` stands for the SHA-256 of `KEY`, as the file keeps keys.
pub fn keys_file(name: &str, tenants: &str) -> PathBuf {
    let path = workspace_root().join(format!("target/e2e-logs/{name}-keys.yaml"));
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    write_keys(&path, tenants);
    path
}

/// Writes a keys file (see [`keys_file`]) in one step (a rename), as a Secret update does.
pub fn write_keys(path: &std::path::Path, tenants: &str) {
    let mut text = String::new();
    let mut rest = tenants;
    while let Some(at) = rest.find("{sha256:") {
        text.push_str(&rest[..at]);
        let end = rest[at..].find('}').unwrap() + at;
        let key = &rest[at + 8..end];
        text.push_str(&hex::encode(<sha2::Sha256 as sha2::Digest>::digest(key.as_bytes())));
        rest = &rest[end + 1..];
    }
    text.push_str(rest);
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, text).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

/// Runs `script` (Python source) with `python` and `args`; it must exit 0 and print `OK`.
pub fn python_says_ok(python: &Path, script: &str, args: &[&str]) {
    let out = Command::new(python).arg("-c").arg(script).args(args).output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success() && stdout.contains("OK"),
        "stdout:\n{stdout}\nstderr:\n{stderr}"
    );
}

/// A Python venv with the official `openai` SDK, made once under target/.
pub fn python_with_openai() -> PathBuf {
    python_with("openai", "openai>=1.50,<4")
}

/// The same venv with the official `anthropic` SDK.
pub fn python_with_anthropic() -> PathBuf {
    python_with("anthropic", "anthropic>=0.40,<1")
}

/// The tests' Python venv under target/ (made once), with `module` importable: installed
/// from PyPI as `requirement` when it is not. One install at a time (tests run in threads).
pub fn python_with(module: &str, requirement: &str) -> PathBuf {
    static LOCK: Mutex<()> = Mutex::new(());
    let _one = LOCK.lock().unwrap_or_else(|e| e.into_inner());
    let venv = workspace_root().join("target/e2e-venv");
    let python = venv.join("bin/python");
    let imports = |p: &Path| {
        Command::new(p)
            .args(["-c", &format!("import {module}")])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    };
    if !imports(&python) {
        if !python.exists() {
            let status = Command::new("python3")
                .args(["-m", "venv"])
                .arg(&venv)
                .status()
                .unwrap();
            assert!(status.success(), "python3 -m venv failed");
        }
        let status = Command::new(venv.join("bin/pip"))
            .args(["install", "--quiet", "--disable-pip-version-check", requirement])
            .status()
            .unwrap();
        assert!(status.success(), "pip install {requirement} failed");
        assert!(imports(&python), "{module} does not import after installing it");
    }
    python
}
