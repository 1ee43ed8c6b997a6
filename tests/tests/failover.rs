//! Failures do not reach the client: the fault matrix, through real processes.
//!
//! Two simulated engines behind the router; faults are made to happen on one of them (the
//! simulator's `/sim/fault` acts on the real socket: resets, closes, hangs, garbage, cut and
//! stalled streams) or by killing it. The simulator answers greedily and deterministically,
//! so what a stream should say is known: the same request answered whole by a healthy
//! engine. For each fault: what the client receives (status, events, one `[DONE]`, exact
//! text and token count, or an error event), what the metrics say, and that nothing hangs.

#![allow(clippy::unwrap_used, reason = "tests assert by unwrapping")]

use std::collections::BTreeSet;
use std::thread;
use std::time::{Duration, Instant};

use lmstack_e2e::{
    Proc, Raw, RawResponse, args, backends, get, metric_sum, metrics_text, metrics_when, post, raw_post, router, sim,
    wait_healthy, wait_until,
};
use serde_json::{Value, json};

const MODEL: &str = "sim-model";
/// Characters of one simulated output token (`" w" + 5 hex digits`).
const PIECE: usize = 7;
const HEAD_TIMEOUT_MS: u64 = 800;

fn engine(name: &str) -> Proc {
    sim(name, &["--model", MODEL, "--decode-base-ms", "4"])
}

/// A router over `engines` with short stream timeouts and probes far apart (so a failing
/// engine stays routable and the router's own failure handling is what is tested); one
/// worker, so that round robin alternates strictly.
fn router_over(engines: &[&Proc], extra: &[&str]) -> Proc {
    let mut a = backends(engines);
    a.extend(args(&[
        "--workers",
        "1",
        "--routing-logic",
        "round_robin",
        "--health-check-interval-ms",
        "60000",
        "--stream-head-timeout-ms",
        &HEAD_TIMEOUT_MS.to_string(),
        "--stream-idle-timeout-ms",
        "800",
        "--first-byte-timeout-ms",
        "3000",
    ]));
    a.extend(args(extra));
    let r = router(&a);
    wait_healthy(&r);
    r
}

fn arm(engine: &Proc, fault: Value) {
    let r = post(engine, "/sim/fault", &fault, &[]);
    assert_eq!(r.status, 200, "{}", r.body);
}

/// The fault armed on `engine` has struck (its count is spent).
fn struck(engine: &Proc) -> bool {
    let report = get(engine, "/sim/fault").json();
    report["kind"] == "none" || report["remaining"] == 0 || report["fired"].as_u64().is_some_and(|f| f > 0)
}

/// A client's view of an SSE response.
#[derive(Debug)]
struct Stream {
    status: u16,
    complete: bool,
    /// Content (chat) or text (completions), concatenated.
    text: String,
    ids: BTreeSet<String>,
    roles: usize,
    done: usize,
    errors: Vec<Value>,
    usage: Option<Value>,
    /// Events after `[DONE]` (there must be none).
    after_done: usize,
    raw: String,
}

impl Stream {
    fn tokens(&self) -> usize {
        self.text.len() / PIECE
    }

    /// Ended well: one `[DONE]`, last, no error, a single response id, the body terminated.
    fn whole(&self) -> bool {
        self.status == 200
            && self.complete
            && self.done == 1
            && self.after_done == 0
            && self.errors.is_empty()
            && self.ids.len() == 1
    }

    /// Ended with an error event, then `[DONE]`, the body terminated: not cut.
    fn failed_cleanly(&self) -> bool {
        self.status == 200 && self.complete && !self.errors.is_empty() && self.done == 1 && self.after_done == 0
    }
}

fn read_stream(resp: RawResponse) -> Stream {
    let raw = resp.text();
    let mut s = Stream {
        status: resp.status,
        complete: resp.complete,
        text: String::new(),
        ids: BTreeSet::new(),
        roles: 0,
        done: 0,
        errors: Vec::new(),
        usage: None,
        after_done: 0,
        raw: raw.clone(),
    };
    for event in raw.split("\n\n").filter(|e| !e.trim().is_empty()) {
        let data = event
            .strip_prefix("data: ")
            .unwrap_or_else(|| panic!("not a data event: {event:?}"));
        if s.done > 0 {
            s.after_done += 1;
        }
        if data == "[DONE]" {
            s.done += 1;
            continue;
        }
        let v: Value = serde_json::from_str(data).unwrap_or_else(|e| panic!("event is not JSON ({e}): {data}"));
        if v.get("error").is_some() {
            s.errors.push(v);
            continue;
        }
        if let Some(id) = v["id"].as_str() {
            s.ids.insert(id.to_owned());
        }
        if !v["usage"].is_null() {
            s.usage = Some(v["usage"].clone());
        }
        for c in v["choices"].as_array().unwrap() {
            assert!(
                c.get("token_ids").is_none_or(Value::is_null),
                "ids not asked for: {data}"
            );
            if let Some(t) = c["text"].as_str() {
                s.text.push_str(t);
            }
            if c["delta"].get("role").is_some() {
                s.roles += 1;
            }
            if let Some(t) = c["delta"]["content"].as_str() {
                s.text.push_str(t);
            }
        }
    }
    s
}

fn stream(router: &Proc, path: &str, body: &Value) -> Stream {
    let mut c = Raw::connect(router);
    c.send(&raw_post(path, &body.to_string(), ""));
    read_stream(c.read_response().expect("a response"))
}

fn completion(i: usize, max_tokens: usize) -> Value {
    json!({"model": MODEL, "prompt": format!("question number {i}: tell me"), "max_tokens": max_tokens,
           "stream": true, "stream_options": {"include_usage": true}, "temperature": 0.7, "seed": i})
}

fn chat(i: usize, max_tokens: usize) -> Value {
    json!({"model": MODEL, "messages": [{"role": "system", "content": "be brief"},
           {"role": "user", "content": format!("question number {i}")}],
           "max_tokens": max_tokens, "stream": true, "stream_options": {"include_usage": true}})
}

/// What an engine answers to `body` whole (not streamed): the reference text.
fn reference(engine: &Proc, path: &str, body: &Value) -> String {
    let mut whole = body.clone();
    whole["stream"] = json!(false);
    whole.as_object_mut().unwrap().remove("stream_options");
    let r = post(engine, path, &whole, &[]);
    assert_eq!(r.status, 200, "{}", r.body);
    let v = r.json();
    let c = &v["choices"][0];
    c["text"]
        .as_str()
        .or(c["message"]["content"].as_str())
        .unwrap()
        .to_owned()
}

/// `s` is the whole, exact answer to `body`: the reference text, `max_tokens` tokens, usage
/// saying so, one role for chat.
fn assert_exact(s: &Stream, reference: &str, body: &Value, chat: bool) {
    let max = body["max_tokens"].as_u64().unwrap() as usize;
    assert!(s.whole(), "not a whole stream: {s:?}");
    assert_eq!(s.text, reference, "{}", s.raw);
    assert_eq!(s.tokens(), max, "{}", s.raw);
    let usage = s.usage.as_ref().unwrap_or_else(|| panic!("no usage: {}", s.raw));
    assert_eq!(usage["completion_tokens"], max, "{usage}");
    assert_eq!(
        usage["total_tokens"].as_u64(),
        Some(usage["prompt_tokens"].as_u64().unwrap() + max as u64),
        "{usage}"
    );
    if chat {
        assert_eq!(s.roles, 1, "{}", s.raw);
    }
}

fn resumes(router: &Proc, outcome: &str) -> f64 {
    metric_sum(
        &metrics_text(router),
        "lmstack_stream_resumes_total",
        &[("outcome", outcome)],
    )
}

#[test]
fn an_engine_killed_mid_stream_leaves_every_stream_whole_and_exact() {
    let a = engine("a");
    let b = engine("b");
    let r = router_over(&[&a, &b], &[]);
    let n = 60;
    let bodies: Vec<(String, Value)> = (0..n)
        .map(|i| {
            if i % 2 == 0 {
                ("/v1/completions".to_owned(), completion(i, 80))
            } else {
                ("/v1/chat/completions".to_owned(), chat(i, 80))
            }
        })
        .collect();
    let references: Vec<String> = bodies.iter().map(|(p, b_)| reference(&b, p, b_)).collect();
    let clients: Vec<_> = bodies
        .iter()
        .cloned()
        .map(|(path, body)| {
            let addr = r.addr;
            thread::spawn(move || {
                let mut c = Raw::connect_addr(addr);
                c.send(&raw_post(&path, &body.to_string(), ""));
                let resp = c.read_response().expect("a response");
                read_stream(resp)
            })
        })
        .collect();
    // Every stream is under way (at 4 ms a token, 80 tokens take 320 ms and more).
    thread::sleep(Duration::from_millis(120));
    // SAFETY: kill(2) on a child process's PID has no memory-safety preconditions.
    unsafe {
        libc::kill(a.pid() as i32, libc::SIGKILL);
    }
    let results: Vec<Stream> = clients.into_iter().map(|c| c.join().unwrap()).collect();
    let mut whole = 0;
    for (i, s) in results.iter().enumerate() {
        if s.whole() {
            assert_exact(s, &references[i], &bodies[i].1, i % 2 == 1);
            whole += 1;
        } else {
            assert!(
                s.failed_cleanly(),
                "stream {i} is neither whole nor ended with an error: {s:?}"
            );
        }
    }
    let resumed = resumes(&r, "resumed");
    eprintln!("{whole}/{n} streams whole and exact; {resumed} resumed after the engine died");
    assert!(whole * 100 >= n * 99, "{whole}/{n} whole");
    assert!(resumed >= 1.0, "no stream was on the killed engine");
}

/// The matrix of engine faults, one engine failing and one healthy: each request gets a
/// whole, exact answer, and nothing waits past the stream head timeout.
#[test]
fn each_engine_fault_is_hidden_from_the_client() {
    let a = engine("a");
    let b = engine("b");
    let r = router_over(&[&a, &b], &["--outlier-consecutive-failures", "0"]);
    let cases: &[(&str, Value)] = &[
        ("reset before the head", json!({"kind": "reset_before_head"})),
        ("close before the head", json!({"kind": "close_before_head"})),
        ("garbage instead of HTTP", json!({"kind": "garbage"})),
        ("503", json!({"kind": "status", "status": 503})),
        ("hang before the head", json!({"kind": "hang_before_head"})),
        (
            "reset mid-stream",
            json!({"kind": "reset_mid_stream", "after_events": 5}),
        ),
        ("cut mid-stream", json!({"kind": "cut_mid_stream", "after_events": 5})),
        (
            "stall mid-stream",
            json!({"kind": "stall_mid_stream", "after_events": 5}),
        ),
    ];
    for (i, (what, fault)) in cases.iter().enumerate() {
        for (k, (path, body)) in [
            ("/v1/completions", completion(100 + i, 40)),
            ("/v1/chat/completions", chat(100 + i, 40)),
        ]
        .into_iter()
        .enumerate()
        {
            let expected = reference(&b, path, &body);
            // The fault strikes engine a's next request; round robin may send a request to b
            // first, so ask until it has struck.
            let mut f = fault.clone();
            f["count"] = json!(1);
            arm(&a, f);
            for _ in 0..4 {
                let start = Instant::now();
                let s = stream(&r, path, &body);
                let took = start.elapsed();
                assert_exact(&s, &expected, &body, k == 1);
                assert!(
                    took < Duration::from_millis(HEAD_TIMEOUT_MS + 2000),
                    "{what} ({path}): {took:?}"
                );
                if struck(&a) {
                    eprintln!("{what} ({path}): whole and exact in {took:?}");
                    break;
                }
            }
            assert!(struck(&a), "{what}: the fault never struck");
            arm(&a, json!({"kind": "none"}));
        }
    }
    // Every fault counted by kind; the three mid-stream ones (twice each) resumed.
    metrics_when(&r, "each fault counted", |m| {
        [
            "upstream_reset",
            "upstream_protocol",
            "upstream_unavailable",
            "upstream_timeout",
        ]
        .iter()
        .all(|kind| metric_sum(m, "lmstack_upstream_errors_total", &[("error_kind", kind)]) >= 1.0)
            && metric_sum(m, "lmstack_stream_resumes_total", &[("outcome", "resumed")]) >= 6.0
    });
}

/// What the client receives when the engine's answer cannot be hidden.
#[test]
fn what_cannot_be_hidden_is_said_plainly() {
    let a = engine("a");
    let b = engine("b");
    let r = router_over(&[&a, &b], &["--outlier-consecutive-failures", "0"]);
    // A 500 is the engine's answer about this request: relayed, not retried.
    arm(&a, json!({"kind": "status", "status": 500, "count": 1}));
    arm(&b, json!({"kind": "status", "status": 500, "count": 1}));
    let resp = post(
        &r,
        "/v1/completions",
        &json!({"model": MODEL, "prompt": "x", "max_tokens": 2}),
        &[],
    );
    assert_eq!(resp.status, 500, "{}", resp.body);
    assert!(
        resp.json()["error"].is_object() || resp.json()["message"].is_string(),
        "{}",
        resp.body
    );
    // A non-streaming request to a hung engine may still be running there: 504, not retried.
    arm(&a, json!({"kind": "hang_before_head", "count": 1}));
    arm(&b, json!({"kind": "hang_before_head", "count": 1}));
    let start = Instant::now();
    let resp = post(
        &r,
        "/v1/completions",
        &json!({"model": MODEL, "prompt": "x", "max_tokens": 2}),
        &[],
    );
    assert_eq!(resp.status, 504, "{}", resp.body);
    assert_eq!(resp.json()["error"]["code"], "upstream_timeout");
    assert!(start.elapsed() < Duration::from_secs(6), "{:?}", start.elapsed());
    arm(&a, json!({"kind": "none"}));
    arm(&b, json!({"kind": "none"}));
    // Both engines cut every stream: the stream ends with an error event, never cut.
    arm(&a, json!({"kind": "reset_mid_stream", "after_events": 3}));
    arm(&b, json!({"kind": "reset_mid_stream", "after_events": 3}));
    let s = stream(&r, "/v1/chat/completions", &chat(7, 30));
    assert!(s.failed_cleanly(), "{s:?}");
    assert_eq!(s.errors[0]["error"]["code"], "upstream_reset", "{}", s.raw);
    // A stream that cannot be continued (log probabilities) ends with an error event at once.
    // (Both engines cut it: wherever it goes, it is cut once, and not continued.)
    let mut body = completion(8, 30);
    body["logprobs"] = json!(1);
    let s = stream(&r, "/v1/completions", &body);
    assert!(s.failed_cleanly(), "{s:?}");
    assert!(
        s.errors[0]["error"]["message"].as_str().unwrap().contains("logprobs"),
        "{}",
        s.raw
    );
    arm(&a, json!({"kind": "none"}));
    arm(&b, json!({"kind": "none"}));
    metrics_when(&r, "every ending counted", |m| {
        metric_sum(m, "lmstack_stream_resumes_total", &[("outcome", "logprobs")]) >= 1.0
            && metric_sum(m, "lmstack_stream_resumes_total", &[("outcome", "no_endpoint")])
                + metric_sum(m, "lmstack_stream_resumes_total", &[("outcome", "exhausted")])
                >= 1.0
    });
}

/// A hung engine: new streams go elsewhere within the head timeout, then it is ejected
/// and new requests skip it at once.
#[test]
fn a_hung_engine_is_failed_over_within_the_head_timeout_then_ejected() {
    let a = engine("a");
    let b = engine("b");
    let r = router_over(
        &[&a, &b],
        &[
            "--outlier-consecutive-failures",
            "2",
            "--outlier-base-ejection-ms",
            "60000",
        ],
    );
    arm(&a, json!({"kind": "hang_before_head"}));
    let mut slowest = Duration::ZERO;
    for i in 0..12 {
        let body = completion(200 + i, 8);
        let start = Instant::now();
        let s = stream(&r, "/v1/completions", &body);
        let took = start.elapsed();
        slowest = slowest.max(took);
        assert!(s.whole(), "{s:?}");
        assert!(
            took < Duration::from_millis(HEAD_TIMEOUT_MS + 1500),
            "request {i} took {took:?}"
        );
    }
    eprintln!("slowest of 12 streams with a hung engine: {slowest:?}");
    let m = metrics_when(&r, "the hung engine ejected", |m| {
        metric_sum(m, "lmstack_endpoint_ejected", &[("endpoint", &a.url())]) == 1.0
    });
    assert_eq!(
        metric_sum(&m, "lmstack_endpoint_ejections_total", &[("endpoint", &a.url())]),
        1.0,
        "{m}"
    );
    // Ejected: requests skip it, at the speed of the healthy engine.
    let start = Instant::now();
    for i in 0..4 {
        assert!(stream(&r, "/v1/completions", &completion(300 + i, 4)).whole());
    }
    assert!(
        start.elapsed() < Duration::from_millis(HEAD_TIMEOUT_MS),
        "{:?}",
        start.elapsed()
    );
}

/// An engine that refuses connections (gone): requests go to the other one.
#[test]
fn a_refusing_engine_is_skipped() {
    let a = engine("a");
    let b = engine("b");
    let r = router_over(&[&a, &b], &[]);
    drop(a);
    for i in 0..6 {
        let s = stream(&r, "/v1/chat/completions", &chat(400 + i, 6));
        assert_exact(
            &s,
            &reference(&b, "/v1/chat/completions", &chat(400 + i, 6)),
            &chat(400 + i, 6),
            true,
        );
    }
    let m = metrics_text(&r);
    assert!(
        metric_sum(
            &m,
            "lmstack_upstream_errors_total",
            &[("error_kind", "upstream_connect")]
        ) >= 1.0,
        "{m}"
    );
}

/// SIGTERM during streams: the port is free at once, streams in flight end whole, and the
/// process exits when they have.
#[test]
fn sigterm_stops_listening_at_once_and_lets_streams_finish() {
    let a = sim("a", &["--model", MODEL, "--decode-base-ms", "20"]);
    let r = router_over(&[&a], &[]);
    let addr = r.addr;
    let expected = reference(&a, "/v1/completions", &completion(500, 40));
    let client = thread::spawn(move || {
        let mut c = Raw::connect_addr(addr);
        c.send(&raw_post("/v1/completions", &completion(500, 40).to_string(), ""));
        read_stream(c.read_response().unwrap())
    });
    // An idle keep-alive connection: closed by the router when it drains.
    let mut idle = Raw::connect(&r);
    idle.send(&raw_post(
        "/v1/completions",
        &json!({"model": MODEL, "prompt": "x", "max_tokens": 1}).to_string(),
        "",
    ));
    assert_eq!(idle.read_response().unwrap().status, 200);
    thread::sleep(Duration::from_millis(200));
    let pid = r.pid();
    let terminated = thread::spawn(move || r.terminate());
    wait_until("the port to close", || std::net::TcpStream::connect(addr).is_err());
    // The port is free for a new process right away.
    let rebound = std::net::TcpListener::bind(addr);
    assert!(rebound.is_ok(), "the port is still taken: {rebound:?}");
    drop(rebound);
    assert!(idle.closed_by_peer(), "the idle connection was not closed");
    let s = client.join().unwrap();
    assert_exact(&s, &expected, &completion(500, 40), false);
    let status = terminated.join().unwrap();
    assert!(status.success(), "router {pid} exited with {status:?}");
}

/// The client leaving mid-stream is not a failure of the engine: nothing is resumed, the
/// engine's request is cancelled.
#[test]
fn a_client_that_leaves_is_not_resumed() {
    let a = engine("a");
    let r = router_over(&[&a], &[]);
    let mut c = Raw::connect(&r);
    c.send(&raw_post("/v1/completions", &completion(600, 200).to_string(), ""));
    assert_eq!(c.read_head().unwrap().0, 200);
    c.close();
    wait_until("the engine's request cancelled", || {
        metric_sum(&metrics_text(&a), "vllm:num_requests_running", &[]) == 0.0
    });
    assert_eq!(resumes(&r, "resumed"), 0.0);
    let h = get(&r, "/health");
    assert_eq!(h.status, 200);
}

/// One of two router replicas killed mid-stream: its clients lose their connections (the
/// process is gone: nothing can be said to them), the other replica's streams are whole and
/// exact, the engines stop generating for the dead replica's streams, and new requests to
/// the surviving replica succeed.
#[test]
fn one_of_two_router_replicas_killed_leaves_the_other_whole() {
    let a = engine("a");
    let b = engine("b");
    let r1 = router_over(&[&a, &b], &[]);
    let r2 = router_over(&[&a, &b], &[]);
    let body = |i: usize| chat(700 + i, 80);
    let references: Vec<String> = (0..16)
        .map(|i| reference(&a, "/v1/chat/completions", &body(i)))
        .collect();
    let start_streams = |addr: std::net::SocketAddr, from: usize| {
        (from..from + 8)
            .map(|i| {
                let body = body(i);
                thread::spawn(move || {
                    let mut c = Raw::connect_addr(addr);
                    c.send(&raw_post("/v1/chat/completions", &body.to_string(), ""));
                    c.read_response().map(read_stream)
                })
            })
            .collect::<Vec<_>>()
    };
    let on_r1 = start_streams(r1.addr, 0);
    let on_r2 = start_streams(r2.addr, 8);
    thread::sleep(Duration::from_millis(120));
    // SAFETY: kill(2) on a child process's PID has no memory-safety preconditions.
    unsafe {
        libc::kill(r1.pid() as i32, libc::SIGKILL);
    }
    for c in on_r1 {
        let cut = c.join().unwrap();
        assert!(
            cut.is_none_or(|s| !s.complete),
            "a stream through the killed replica completed"
        );
    }
    for (k, c) in on_r2.into_iter().enumerate() {
        let s = c.join().unwrap().expect("a response");
        assert_exact(&s, &references[8 + k], &body(8 + k), true);
    }
    // The engines cancelled what the dead replica had asked for: nothing runs on.
    for e in [&a, &b] {
        wait_until("the engines idle", || {
            metric_sum(&metrics_text(e), "vllm:num_requests_running", &[]) == 0.0
        });
    }
    assert!(stream(&r2, "/v1/chat/completions", &body(99)).whole());
}

/// A zero-downtime upgrade under load: a new router takes the port over (`--takeover`),
/// the old one gets SIGTERM and drains; clients see no failed request. The clients behave
/// as HTTP clients do: a `connection: close` response makes them reconnect, and a request
/// whose reused connection closed before any response byte is sent again on a new one
/// (counted, and reported).
#[test]
fn an_upgrade_under_load_fails_no_request() {
    let a = engine("a");
    let b = engine("b");
    let port = lmstack_e2e::free_port().to_string();
    let flags = |takeover: bool| {
        let mut f = vec!["--port", port.as_str()];
        if takeover {
            f.push("--takeover");
        }
        f
    };
    // Connections still queued in the old router's listeners when it stops listening move
    // to the new one's with this sysctl (as root); without it they would be reset.
    let _migrate = MigrateQueued::enable();
    let old = router_over(&[&a, &b], &flags(false));
    let addr = old.addr;
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let clients: Vec<_> = (0..8)
        .map(|k| {
            let stop = stop.clone();
            thread::spawn(move || {
                let (mut ok, mut failed, mut resent) = (0, Vec::new(), 0);
                let mut conn: Option<Raw> = None;
                let mut i = 0;
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    i += 1;
                    let (path, body) = if (i + k) % 2 == 0 {
                        ("/v1/completions", completion(k * 100_000 + i, 6))
                    } else {
                        let mut c = completion(k * 100_000 + i, 6);
                        c["stream"] = json!(false);
                        c.as_object_mut().unwrap().remove("stream_options");
                        ("/v1/completions", c)
                    };
                    let mut tries = 0;
                    loop {
                        tries += 1;
                        let reused = conn.is_some();
                        let c = match conn.as_mut() {
                            Some(c) => c,
                            None => match Raw::try_connect(addr) {
                                Ok(c) => conn.insert(c),
                                Err(e) => {
                                    failed.push(format!("connect: {e}"));
                                    break;
                                }
                            },
                        };
                        c.send(&raw_post(path, &body.to_string(), ""));
                        match c.read_response() {
                            Some(resp) => {
                                let close = resp
                                    .header("connection")
                                    .is_some_and(|v| v.eq_ignore_ascii_case("close"));
                                let good = resp.status == 200
                                    && resp.complete
                                    && (body["stream"] == false || read_stream(resp).whole());
                                if good {
                                    ok += 1;
                                } else {
                                    failed.push(format!("request {i} failed"));
                                }
                                if close {
                                    conn = None;
                                }
                                break;
                            }
                            // Closed before any response byte on a reused connection: send
                            // it again on a new one, once.
                            None if reused && tries == 1 => {
                                conn = None;
                                resent += 1;
                            }
                            None => {
                                failed.push(format!("request {i}: no response"));
                                conn = None;
                                break;
                            }
                        }
                    }
                }
                (ok, failed, resent)
            })
        })
        .collect();
    thread::sleep(Duration::from_millis(800));
    let new = router_over(&[&a, &b], &flags(true));
    assert_eq!(new.addr, addr);
    thread::sleep(Duration::from_millis(300));
    let status = old.terminate();
    assert!(status.success(), "{status:?}");
    thread::sleep(Duration::from_millis(800));
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let (mut ok, mut failed, mut resent) = (0, Vec::new(), 0);
    for c in clients {
        let (o, f, r) = c.join().unwrap();
        ok += o;
        failed.extend(f);
        resent += r;
    }
    eprintln!(
        "upgrade under load: {ok} requests answered, {} failed, {resent} sent again",
        failed.len()
    );
    assert!(ok > 100, "too little load to say anything: {ok}");
    assert!(failed.is_empty(), "{failed:?}");
    // The new router served after the old one left.
    assert!(metric_sum(&metrics_text(&new), "lmstack_requests_total", &[("status", "200")]) > 0.0);
}

/// `net.ipv4.tcp_migrate_req` set to 1 for a test (where it can be written: as root), then
/// put back.
struct MigrateQueued(Option<String>);

const MIGRATE_REQ: &str = "/proc/sys/net/ipv4/tcp_migrate_req";

impl MigrateQueued {
    fn enable() -> Self {
        let old = std::fs::read_to_string(MIGRATE_REQ).ok();
        match std::fs::write(MIGRATE_REQ, "1") {
            Ok(()) => MigrateQueued(old),
            Err(e) => {
                eprintln!("tcp_migrate_req not set ({e}): queued connections may be reset");
                MigrateQueued(None)
            }
        }
    }
}

impl Drop for MigrateQueued {
    fn drop(&mut self) {
        if let Some(old) = &self.0 {
            let _ = std::fs::write(MIGRATE_REQ, old.trim());
        }
    }
}
