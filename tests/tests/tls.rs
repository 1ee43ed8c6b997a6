//! TLS on the client side: real clients (curl, the official OpenAI Python SDK, a rustls
//! client) against certificates made here, keep-alive, pipelining, chunked uploads and
//! streams over TLS, a client leaving mid-stream, plain HTTP and silent clients on the TLS
//! port, certificates replaced on disk under a running router, and a drain.

#![allow(clippy::unwrap_used, reason = "tests assert by unwrapping")]

use std::io::{Read, Write};
use std::net::{IpAddr, Ipv4Addr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::Arc;
use std::thread;
use std::time::Duration;

use lmstack_e2e::*;
use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, DnType, IsCa, KeyPair, SanType, SerialNumber};
use rustls::pki_types::{CertificateDer, ServerName};
use rustls::{ClientConnection, StreamOwned};

/// A test CA and the folder its files go to.
struct Pki {
    dir: PathBuf,
    ca: CertifiedIssuer<'static, KeyPair>,
    /// The CA certificate, PEM, for curl and the SDK.
    ca_file: PathBuf,
}

/// A server certificate and its key.
struct Leaf {
    cert_pem: String,
    key_pem: String,
    der: CertificateDer<'static>,
}

impl Pki {
    fn new(name: &str) -> Pki {
        let dir = workspace_root()
            .join("target/e2e-logs")
            .join(format!("tls-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.distinguished_name.push(DnType::CommonName, "lmstack test CA");
        let ca = CertifiedIssuer::self_signed(params, KeyPair::generate().unwrap()).unwrap();
        let ca_file = dir.join("ca.pem");
        std::fs::write(&ca_file, ca.pem()).unwrap();
        Pki { dir, ca, ca_file }
    }

    /// A certificate for `localhost` and 127.0.0.1 named `cn`, with `serial`.
    fn leaf(&self, cn: &str, serial: u64) -> Leaf {
        let mut params = CertificateParams::new(vec!["localhost".to_owned()]).unwrap();
        params
            .subject_alt_names
            .push(SanType::IpAddress(IpAddr::V4(Ipv4Addr::LOCALHOST)));
        params.distinguished_name.push(DnType::CommonName, cn);
        params.serial_number = Some(SerialNumber::from(serial));
        let key = KeyPair::generate().unwrap();
        let cert = params.signed_by(&key, &self.ca).unwrap();
        Leaf {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
            der: cert.der().clone(),
        }
    }

    /// Writes `leaf` as `name`.crt / `name`.key; returns both paths.
    fn write(&self, name: &str, leaf: &Leaf) -> (PathBuf, PathBuf) {
        let cert = self.dir.join(format!("{name}.crt"));
        let key = self.dir.join(format!("{name}.key"));
        std::fs::write(&cert, &leaf.cert_pem).unwrap();
        std::fs::write(&key, &leaf.key_pem).unwrap();
        (cert, key)
    }

    fn ca_der(&self) -> CertificateDer<'static> {
        self.ca.der().clone()
    }
}

fn path(p: &Path) -> String {
    p.to_string_lossy().into_owned()
}

/// A router serving TLS with `cert`/`key` in front of `engines`; `yaml`: more configuration.
fn tls_router(pki: &Pki, engines: &[&Proc], files: (&Path, &Path), yaml: &str) -> Proc {
    tls_router_env(pki, engines, files, yaml, &[])
}

fn tls_router_env(pki: &Pki, engines: &[&Proc], (cert, key): (&Path, &Path), yaml: &str, env: &[(&str, &str)]) -> Proc {
    let config = pki.dir.join("router.yaml");
    std::fs::write(&config, yaml).unwrap();
    let mut a = backends(engines);
    a.extend(args(&[
        "--tls-cert",
        &path(cert),
        "--tls-key",
        &path(key),
        "--config",
        &path(&config),
    ]));
    let r = router_env(&a, env);
    let ca = pki.ca_der();
    wait_until("the router to report healthy over TLS", || {
        tls_get(&r, &ca, "/health").status == 200
    });
    r
}

type TlsStream = StreamOwned<ClientConnection, TcpStream>;

/// A rustls client connection to `r` trusting `ca`, its handshake done.
fn tls_client(r: &Proc, ca: &CertificateDer<'static>) -> Raw<TlsStream> {
    let mut roots = rustls::RootCertStore::empty();
    roots.add(ca.clone()).unwrap();
    let mut config = rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    let name = ServerName::IpAddress(Ipv4Addr::LOCALHOST.into());
    let conn = ClientConnection::new(Arc::new(config), name).unwrap();
    let sock = TcpStream::connect(r.addr).unwrap();
    sock.set_read_timeout(Some(DEADLINE)).unwrap();
    sock.set_nodelay(true).unwrap();
    let mut stream = StreamOwned::new(conn, sock);
    while stream.conn.is_handshaking() {
        stream.conn.complete_io(&mut stream.sock).unwrap();
    }
    assert_eq!(stream.conn.alpn_protocol(), Some(&b"http/1.1"[..]));
    Raw::over(stream)
}

/// The certificate `c`'s server presented.
fn served_certificate(c: &Raw<TlsStream>) -> CertificateDer<'static> {
    c.stream.conn.peer_certificates().unwrap()[0].clone().into_owned()
}

fn tls_get(r: &Proc, ca: &CertificateDer<'static>, path: &str) -> RawResponse {
    let mut c = tls_client(r, ca);
    c.send(format!("GET {path} HTTP/1.1\r\nHost: localhost\r\n\r\n").as_bytes());
    c.read_response().unwrap()
}

fn https(r: &Proc, path: &str) -> String {
    format!("https://127.0.0.1:{}{path}", r.addr.port())
}

fn curl(args: &[&str]) -> Output {
    Command::new("curl")
        .args(["--silent", "--show-error", "--max-time", "30"])
        .args(args)
        .output()
        .expect("running curl (install it: apt-get install curl)")
}

fn completion(prompt: &str, max_tokens: u32, stream: bool) -> String {
    json!({"model": "sim-model", "prompt": prompt, "max_tokens": max_tokens, "stream": stream}).to_string()
}

#[test]
fn curl_gets_completions_and_streams_over_tls_on_one_connection() {
    let pki = Pki::new("curl");
    let (cert, key) = pki.write("server", &pki.leaf("lmstack-one", 1));
    let e1 = sim("e1", &[]);
    let r = tls_router(&pki, &[&e1], (&cert, &key), "");
    let ca = path(&pki.ca_file);
    let url = https(&r, "/v1/completions");

    // Two requests, one answered whole, one streamed, on one kept-alive connection.
    let plain = completion("hello", 5, false);
    let streamed = completion("stream", 4, true);
    let out = curl(&[
        "--verbose",
        "--cacert",
        &ca,
        "-H",
        "content-type: application/json",
        "-d",
        &plain,
        &url,
        "--next",
        "--cacert",
        &ca,
        "-H",
        "content-type: application/json",
        "-d",
        &streamed,
        &url,
    ]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "curl failed:\n{stderr}");
    assert!(stderr.contains("ALPN: server accepted http/1.1"), "{stderr}");
    assert!(stderr.contains("subject: CN=lmstack-one"), "{stderr}");
    assert!(
        stderr.contains("Re-using existing connection"),
        "not kept alive:\n{stderr}"
    );
    let first: Value = serde_json::Deserializer::from_str(&stdout)
        .into_iter::<Value>()
        .next()
        .unwrap()
        .unwrap();
    assert_eq!(first["usage"]["completion_tokens"], 5, "{stdout}");
    assert_eq!(stdout.matches("data: {").count(), 4, "{stdout}");
    assert!(stdout.trim_end().ends_with("data: [DONE]"), "{stdout}");

    // The certificate is checked: without the CA, curl refuses it.
    let out = curl(&[&https(&r, "/health")]);
    assert_eq!(out.status.code(), Some(60), "{}", String::from_utf8_lossy(&out.stderr));
}

#[test]
fn pipelined_chunked_and_watched_requests_over_tls() {
    pipelined_chunked_and_watched(&[], "uring");
}

/// The same with the epoll driver, whose cancellation of the watch's read differs.
#[test]
fn pipelined_chunked_and_watched_requests_over_tls_with_epoll() {
    pipelined_chunked_and_watched(&[("MONOIO_FORCE_LEGACY_DRIVER", "1")], "epoll");
}

fn pipelined_chunked_and_watched(env: &[(&str, &str)], name: &str) {
    let pki = Pki::new(&format!("pipelining-{name}"));
    let (cert, key) = pki.write("server", &pki.leaf("lmstack-one", 1));
    let e1 = sim("e1", &[]);
    let r = tls_router_env(&pki, &[&e1], (&cert, &key), "", env);
    let ca = pki.ca_der();

    // Three requests in one write, the slow one first: answered in order.
    let mut c = tls_client(&r, &ca);
    let slow = completion("slow", 30, false);
    let fast = completion("fast", 1, false);
    let mut batch = raw_post("/v1/completions", &slow, "X-Request-Id: first\r\n");
    batch.extend(raw_post("/v1/completions", &fast, "X-Request-Id: second\r\n"));
    batch.extend(b"GET /version HTTP/1.1\r\nHost: x\r\nX-Request-Id: third\r\n\r\n");
    c.send(&batch);
    for id in ["first", "second", "third"] {
        let resp = c.read_response().unwrap();
        assert_eq!(resp.status, 200, "{}", resp.text());
        assert_eq!(resp.header("x-request-id"), Some(id));
    }

    // A request sent while the previous one runs (30 tokens, 10 ms each): the client watch
    // reads it from the TLS stream and cancels its read when the response is done; nothing
    // of the second request may be lost.
    c.send(&raw_post("/v1/completions", &slow, "X-Request-Id: watched\r\n"));
    thread::sleep(Duration::from_millis(150));
    c.send(&raw_post("/v1/completions", &fast, "X-Request-Id: next\r\n"));
    for id in ["watched", "next"] {
        let resp = c.read_response().unwrap();
        assert_eq!(resp.status, 200, "{}", resp.text());
        assert_eq!(resp.header("x-request-id"), Some(id));
    }

    // A chunked upload, in pieces smaller than a TLS record, then a stream.
    let body = completion("chunked upload", 2, false);
    let (a, b) = body.split_at(10);
    c.send(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n");
    c.send(format!("{:x}\r\n{a}\r\n", a.len()).as_bytes());
    c.send(format!("{:x}\r\n{b}\r\n0\r\n\r\n", b.len()).as_bytes());
    let resp = c.read_response().unwrap();
    assert_eq!(resp.status, 200, "{}", resp.text());
    assert_eq!(resp.json()["usage"]["completion_tokens"], 2);
    c.send(&raw_post("/v1/completions", &completion("stream", 20, true), ""));
    let resp = c.read_response().unwrap();
    assert!(resp.complete);
    assert_eq!(resp.text().matches("data: {").count(), 20, "{}", resp.text());
}

#[test]
fn a_client_that_leaves_a_tls_stream_cancels_it_at_the_engine() {
    let pki = Pki::new("leave");
    let (cert, key) = pki.write("server", &pki.leaf("lmstack-one", 1));
    let e1 = sim("e1", &["--decode-base-ms", "50"]);
    let r = tls_router(&pki, &[&e1], (&cert, &key), "");
    let running = || metric(&metrics_text(&e1), "vllm:num_requests_running", &[]).unwrap();
    let mut c = tls_client(&r, &pki.ca_der());
    c.send(&raw_post("/v1/completions", &completion("long", 1000, true), ""));
    assert_eq!(c.read_head().unwrap().0, 200);
    let mut buf = [0u8; 1024];
    assert!(c.stream.read(&mut buf).unwrap() > 0);
    assert_eq!(running(), 1.0);
    // Gone without a word: no close_notify, only the TCP connection closed.
    c.stream.sock.shutdown(std::net::Shutdown::Both).unwrap();
    drop(c);
    wait_until("the engine to drop the stream", || running() == 0.0);
    let abort = [("finished_reason", "abort")];
    assert_eq!(
        metric(&metrics_text(&e1), "vllm:request_success_total", &abort),
        Some(1.0)
    );
}

#[test]
fn plain_http_and_silent_clients_on_the_tls_port_fail_cleanly() {
    let pki = Pki::new("plain");
    let (cert, key) = pki.write("server", &pki.leaf("lmstack-one", 1));
    let e1 = sim("e1", &[]);
    let r = tls_router(
        &pki,
        &[&e1],
        (&cert, &key),
        "listen: {tls: {handshake_timeout_ms: 300}}\n",
    );
    let ca = pki.ca_der();

    // A TCP health check (connect, close): not a failed handshake.
    Raw::connect(&r).close();

    // Plain HTTP: no HTTP answer, the connection closed.
    let mut plain = Raw::connect(&r);
    plain.send(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n");
    let mut got = Vec::new();
    let _ = plain.stream.read_to_end(&mut got);
    assert!(!got.starts_with(b"HTTP/"), "{}", String::from_utf8_lossy(&got));
    let out = curl(&[&format!("http://{}/health", r.addr)]);
    assert!(!out.status.success());

    // A client that connects and says nothing is closed after the handshake timeout.
    let mut silent = Raw::connect(&r);
    assert!(silent.closed_by_peer());

    // A client that does not trust the certificate gives up mid-handshake.
    let out = curl(&[&https(&r, "/health")]);
    assert!(!out.status.success());

    // None of it hurt the router; each was counted, the health check not.
    assert_eq!(tls_get(&r, &ca, "/health").status, 200);
    let mut c = tls_client(&r, &ca);
    let m = loop {
        c.send(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n");
        let m = c.read_response().unwrap().text();
        if metric(&m, "lmstack_tls_handshake_failures_total", &[]).unwrap_or(0.0) >= 4.0 {
            break m;
        }
        thread::sleep(Duration::from_millis(50));
    };
    assert_eq!(
        metric(&m, "lmstack_tls_handshake_failures_total", &[]),
        Some(4.0),
        "{m}"
    );
    let mut raw = Raw::connect(&r);
    raw.stream
        .write_all(&[0x16, 0x03, 0x01, 0x00, 0x05, 1, 2, 3, 4, 5])
        .unwrap();
    assert!(raw.closed_by_peer());
    assert_eq!(tls_get(&r, &ca, "/health").status, 200);
}

/// A Secret volume as Kubernetes lays it out: `tls.crt` and `tls.key` are links into
/// `..data`, itself a link to a timestamped folder, swapped in one rename on an update.
struct SecretVolume {
    dir: PathBuf,
    version: usize,
}

impl SecretVolume {
    fn new(dir: PathBuf, cert_pem: &str, key_pem: &str) -> SecretVolume {
        std::fs::create_dir_all(&dir).unwrap();
        let mut v = SecretVolume { dir, version: 0 };
        v.update(cert_pem, key_pem);
        for name in ["tls.crt", "tls.key"] {
            std::os::unix::fs::symlink(format!("..data/{name}"), v.dir.join(name)).unwrap();
        }
        v
    }

    fn update(&mut self, cert_pem: &str, key_pem: &str) {
        self.version += 1;
        let folder = format!("..v{}", self.version);
        std::fs::create_dir_all(self.dir.join(&folder)).unwrap();
        std::fs::write(self.dir.join(&folder).join("tls.crt"), cert_pem).unwrap();
        std::fs::write(self.dir.join(&folder).join("tls.key"), key_pem).unwrap();
        let tmp = self.dir.join("..data_tmp");
        std::os::unix::fs::symlink(&folder, &tmp).unwrap();
        std::fs::rename(&tmp, self.dir.join("..data")).unwrap();
    }

    fn files(&self) -> (PathBuf, PathBuf) {
        (self.dir.join("tls.crt"), self.dir.join("tls.key"))
    }
}

#[test]
fn replaced_certificates_serve_new_connections_and_open_ones_keep_working() {
    let pki = Pki::new("reload");
    let one = pki.leaf("lmstack-one", 0x1111);
    let two = pki.leaf("lmstack-two", 0x2222);
    let three = pki.leaf("lmstack-three", 0x3333);
    let mut volume = SecretVolume::new(pki.dir.join("secret"), &one.cert_pem, &one.key_pem);
    let (cert, key) = volume.files();
    let e1 = sim("e1", &[]);
    let r = tls_router(
        &pki,
        &[&e1],
        (&cert, &key),
        "listen: {tls: {reload_interval_ms: 100}}\n",
    );
    let ca = pki.ca_der();
    let request = raw_post("/v1/completions", &completion("hi", 2, false), "");

    let mut old = tls_client(&r, &ca);
    assert_eq!(served_certificate(&old), one.der);
    old.send(&request);
    assert_eq!(old.read_response().unwrap().status, 200);

    // The Secret is updated: new connections get the new certificate.
    volume.update(&two.cert_pem, &two.key_pem);
    wait_until("a new connection to get the new certificate", || {
        served_certificate(&tls_client(&r, &ca)) == two.der
    });
    // As curl sees it.
    let out = curl(&[
        "--cacert",
        &path(&pki.ca_file),
        "--output",
        "/dev/null",
        "--write-out",
        "%{certs}",
        &https(&r, "/health"),
    ]);
    let certs = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(certs.contains("Subject:CN = lmstack-two"), "{certs}");
    let serial = certs.lines().find(|l| l.starts_with("Serial Number:")).unwrap();
    assert!(serial.ends_with("2222"), "{certs}");
    // The connection opened before goes on, with its certificate.
    old.send(&request);
    assert_eq!(old.read_response().unwrap().status, 200);
    assert_eq!(served_certificate(&old), one.der);

    // A bad update (a certificate with another certificate's key) is refused: the current
    // pair stays, and the refusal is counted once.
    volume.update(&three.cert_pem, &two.key_pem);
    let metrics = || tls_get(&r, &ca, "/metrics").text();
    wait_until("the bad pair to be refused", || {
        metric(
            &metrics(),
            "lmstack_tls_certificate_reloads_total",
            &[("outcome", "rejected")],
        ) == Some(1.0)
    });
    assert_eq!(served_certificate(&tls_client(&r, &ca)), two.der);
    let m = metrics();
    assert_eq!(
        metric(&m, "lmstack_tls_certificate_reloads_total", &[("outcome", "loaded")]),
        Some(1.0),
        "{m}"
    );
    assert!(r.log_text().contains("keeping the current certificate"));
    old.send(&request);
    assert_eq!(old.read_response().unwrap().status, 200);

    // Fixed: loaded.
    volume.update(&three.cert_pem, &three.key_pem);
    wait_until("the fixed pair to be loaded", || {
        served_certificate(&tls_client(&r, &ca)) == three.der
    });
}

#[test]
fn invalid_certificates_stop_the_router_at_start_with_a_clear_message() {
    let pki = Pki::new("invalid");
    let one = pki.leaf("lmstack-one", 1);
    let two = pki.leaf("lmstack-two", 2);
    let (cert, _) = pki.write("one", &one);
    let (_, other_key) = pki.write("two", &two);
    let garbage = pki.dir.join("garbage.pem");
    std::fs::write(&garbage, "not a certificate").unwrap();
    let missing = pki.dir.join("missing.pem");
    let check = |cert: &Path, key: &Path| {
        let out = Command::new(bin("lmstack"))
            .args(["--check", "--static-backends", "http://127.0.0.1:1"])
            .args(["--tls-cert", &path(cert), "--tls-key", &path(key)])
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(2));
        String::from_utf8_lossy(&out.stderr).into_owned()
    };
    assert!(check(&cert, &other_key).contains("refused"));
    assert!(check(&garbage, &other_key).contains("no PEM certificate"));
    assert!(check(&cert, &garbage).contains("no PEM private key"));
    assert!(check(&missing, &other_key).contains("cannot read"));
    let out = Command::new(bin("lmstack"))
        .args([
            "--check",
            "--static-backends",
            "http://127.0.0.1:1",
            "--tls-cert",
            &path(&cert),
        ])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("go together"));
}

#[test]
fn the_openai_python_sdk_works_over_tls() {
    let python = python_with_openai();
    let pki = Pki::new("sdk");
    let (cert, key) = pki.write("server", &pki.leaf("lmstack-one", 1));
    let e1 = sim("e1", &[]);
    let r = tls_router(&pki, &[&e1], (&cert, &key), "");
    let script = r#"
import sys
import openai
from openai import OpenAI

client = OpenAI(base_url=sys.argv[1] + "/v1", api_key="unused", max_retries=0,
                http_client=openai.DefaultHttpxClient(verify=sys.argv[2]))
c = client.completions.create(model="sim-model", prompt="Say this is a test", max_tokens=7)
assert c.usage.completion_tokens == 7, c.usage
pieces = []
for chunk in client.chat.completions.create(
    model="sim-model", messages=[{"role": "user", "content": "stream please"}],
    max_tokens=6, stream=True,
):
    for choice in chunk.choices:
        if choice.delta.content:
            pieces.append(choice.delta.content)
assert len(pieces) == 6, pieces
try:
    OpenAI(base_url=sys.argv[1] + "/v1", api_key="unused", max_retries=0).models.list()
    raise SystemExit("expected the certificate to be refused without the CA")
except openai.APIConnectionError:
    pass
print("OK")
"#;
    let url = format!("https://127.0.0.1:{}", r.addr.port());
    python_says_ok(&python, script, &[&url, pki.ca_file.to_str().unwrap()]);
}

#[test]
fn sigterm_closes_idle_tls_connections_and_lets_streams_finish() {
    let pki = Pki::new("drain");
    let (cert, key) = pki.write("server", &pki.leaf("lmstack-one", 1));
    let e1 = sim("e1", &["--decode-base-ms", "20"]);
    let r = tls_router(&pki, &[&e1], (&cert, &key), "");
    let ca = pki.ca_der();
    let mut streaming = tls_client(&r, &ca);
    let client = thread::spawn(move || {
        streaming.send(&raw_post("/v1/completions", &completion("drain", 40, true), ""));
        streaming.read_response().unwrap()
    });
    let mut idle = tls_client(&r, &ca);
    idle.send(&raw_post("/v1/completions", &completion("x", 1, false), ""));
    assert_eq!(idle.read_response().unwrap().status, 200);
    thread::sleep(Duration::from_millis(200));
    let addr = r.addr;
    let terminated = thread::spawn(move || r.terminate());
    wait_until("the port to close", || TcpStream::connect(addr).is_err());
    // Closed with close_notify: a clean end, not a cut.
    let mut rest = Vec::new();
    assert_eq!(idle.stream.read_to_end(&mut rest).unwrap(), 0);
    let resp = client.join().unwrap();
    assert!(resp.complete, "{}", resp.text());
    assert_eq!(resp.text().matches("data: {").count(), 40);
    assert!(resp.text().ends_with("data: [DONE]\n\n"));
    assert!(terminated.join().unwrap().success());
}
