//! What mid-stream failover needs from lmstack-sim, over real sockets against the built binary:
//! answers that continue (a prompt extended by the first tokens of an answer gets exactly the
//! rest, as token ids, as text, or as a chat's final assistant message), `return_token_ids` in
//! vLLM's shapes, and faults (`/sim/fault`, `--fault`) that a client sees as a dying engine's:
//! resets, closes, silence, garbage, error statuses, streams cut after N events, and the
//! process exiting.
//!
//! Nothing waits on a clock for synchronisation: reads have deadlines, and the silence of a
//! hung or stalled connection is a read that times out.

#![allow(clippy::unwrap_used, reason = "tests assert by unwrapping")]

use std::io::{BufRead, BufReader, ErrorKind};
use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use lmstack_perf::sim::greedy;
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::timeout;

const MODEL: &str = "sim-model";
/// The bound on every wait.
const DEADLINE: Duration = Duration::from_secs(20);
/// How long a connection must stay silent to count as hung or stalled.
const SILENCE: Duration = Duration::from_millis(300);

/// A simulator process, killed (by its PID) when dropped.
struct Sim {
    child: Child,
    addr: SocketAddr,
}

impl Drop for Sim {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Sim {
    /// Starts the simulator on a free port with fast prefill and decode, and `extra` flags.
    fn start(extra: &[&str]) -> Sim {
        let mut args = vec!["--host", "127.0.0.1", "--port", "0", "--model", MODEL, "--name", "sim"];
        for (flag, value) in [("--prefill-base-ms", "1"), ("--decode-base-ms", "1")] {
            if !extra.contains(&flag) {
                args.extend([flag, value]);
            }
        }
        let mut child = Command::new(env!("CARGO_BIN_EXE_lmstack-sim"))
            .args(args)
            .args(extra)
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap();
        let stdout = child.stdout.take().unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if let Some(rest) = line.split("listening on http://").nth(1) {
                    let _ = tx.send(rest.split_whitespace().next().unwrap_or("").to_owned());
                }
            }
        });
        let addr = rx.recv_timeout(DEADLINE).expect("lmstack-sim did not start");
        Sim {
            child,
            addr: addr.parse().unwrap(),
        }
    }

    /// Sends one request on a fresh connection (closed by the server after the response).
    async fn send(&self, method: &str, path: &str, body: &Value) -> TcpStream {
        let body = if body.is_null() {
            Vec::new()
        } else {
            serde_json::to_vec(body).unwrap()
        };
        let mut s = TcpStream::connect(self.addr).await.unwrap();
        let head = format!(
            "{method} {path} HTTP/1.1\r\nhost: sim\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n",
            body.len()
        );
        s.write_all(head.as_bytes()).await.unwrap();
        s.write_all(&body).await.unwrap();
        s
    }

    /// One exchange that must end well: the status and the reply.
    async fn call(&self, method: &str, path: &str, body: &Value) -> Reply {
        let mut s = self.send(method, path, body).await;
        let reply = read_reply(&mut s, DEADLINE).await;
        assert_eq!(reply.end, End::Eof, "{path}: {}", String::from_utf8_lossy(&reply.bytes));
        reply
    }

    async fn post(&self, path: &str, body: &Value) -> Reply {
        self.call("POST", path, body).await
    }

    async fn arm(&self, fault: Value) {
        let r = self.post("/sim/fault", &fault).await;
        assert_eq!(r.status(), 200, "{}", r.text());
    }

    async fn fault_report(&self) -> Value {
        self.call("GET", "/sim/fault", &Value::Null).await.json()
    }
}

/// How a connection ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum End {
    /// The server closed it (FIN).
    Eof,
    /// The server reset it (RST).
    Reset,
    /// Still open, nothing for `SILENCE`.
    Silent,
}

/// What came back on one connection.
struct Reply {
    bytes: Vec<u8>,
    end: End,
}

/// Reads until the server closes or resets the connection, or it stays silent for `silence`.
async fn read_reply(s: &mut TcpStream, silence: Duration) -> Reply {
    let mut bytes = Vec::new();
    let mut buf = [0u8; 16 * 1024];
    let end = loop {
        match timeout(silence, s.read(&mut buf)).await {
            Err(_) => break End::Silent,
            Ok(Ok(0)) => break End::Eof,
            Ok(Ok(n)) => bytes.extend_from_slice(&buf[..n]),
            Ok(Err(e)) if e.kind() == ErrorKind::ConnectionReset => break End::Reset,
            Ok(Err(e)) => panic!("read: {e}"),
        }
    };
    Reply { bytes, end }
}

impl Reply {
    fn text(&self) -> String {
        String::from_utf8_lossy(&self.bytes).into_owned()
    }

    fn head(&self) -> String {
        let text = self.text();
        text.split_once("\r\n\r\n").expect("no response head").0.to_owned()
    }

    fn status(&self) -> u16 {
        self.head().split_whitespace().nth(1).unwrap().parse().unwrap()
    }

    /// The body, de-chunked when chunked, and whether it ended (its last chunk came).
    fn body(&self) -> (Vec<u8>, bool) {
        let start = self.bytes.windows(4).position(|w| w == b"\r\n\r\n").unwrap() + 4;
        let rest = &self.bytes[start..];
        if !self.head().to_ascii_lowercase().contains("transfer-encoding: chunked") {
            return (rest.to_vec(), true);
        }
        let mut body = Vec::new();
        let mut at = 0;
        while let Some(eol) = rest[at..].windows(2).position(|w| w == b"\r\n") {
            let size = usize::from_str_radix(std::str::from_utf8(&rest[at..at + eol]).unwrap(), 16).unwrap();
            if size == 0 {
                return (body, true);
            }
            let data = at + eol + 2;
            if rest.len() < data + size {
                body.extend_from_slice(&rest[data..]);
                break;
            }
            body.extend_from_slice(&rest[data..data + size]);
            at = data + size + 2;
            if at > rest.len() {
                break;
            }
        }
        (body, false)
    }

    fn json(&self) -> Value {
        serde_json::from_slice(&self.body().0).unwrap()
    }

    /// The SSE events' data, `[DONE]` left out, in order (only whole events).
    fn events(&self) -> Vec<String> {
        let body = String::from_utf8(self.body().0).unwrap();
        let mut events: Vec<String> = body
            .split_inclusive("\n\n")
            .filter(|e| e.ends_with("\n\n"))
            .map(|e| e.strip_prefix("data: ").unwrap().trim_end().to_owned())
            .collect();
        events.retain(|e| e != "[DONE]");
        events
    }
}

/// A generation's output: its token ids and text, from a response, streamed or not.
#[derive(Debug, Default, PartialEq, Eq)]
struct Output {
    prompt_ids: Vec<u32>,
    ids: Vec<u32>,
    text: String,
}

fn ids(v: &Value) -> Vec<u32> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|id| id.as_u64().unwrap() as u32)
        .collect()
}

fn output(reply: &Reply, streamed: bool) -> Output {
    assert_eq!(reply.status(), 200, "{}", reply.text());
    let mut out = Output::default();
    if !streamed {
        let body = reply.json();
        let choice = &body["choices"][0];
        out.ids = ids(&choice["token_ids"]);
        let prompt = if body["object"] == "chat.completion" {
            out.text = choice["message"]["content"].as_str().unwrap().to_owned();
            &body["prompt_token_ids"]
        } else {
            out.text = choice["text"].as_str().unwrap().to_owned();
            &choice["prompt_token_ids"]
        };
        out.prompt_ids = ids(prompt);
        return out;
    }
    for event in reply.events() {
        let chunk: Value = serde_json::from_str(&event).unwrap();
        if let Some(prompt) = chunk.get("prompt_token_ids").filter(|p| !p.is_null()) {
            out.prompt_ids = ids(prompt);
        }
        let Some(choice) = chunk["choices"].get(0) else {
            continue;
        };
        if let Some(prompt) = choice.get("prompt_token_ids").filter(|p| !p.is_null()) {
            out.prompt_ids = ids(prompt);
        }
        if let Some(t) = choice.get("token_ids") {
            out.ids.extend(ids(t));
        }
        let text = choice.get("text").or(choice.pointer("/delta/content"));
        out.text.push_str(text.and_then(Value::as_str).unwrap_or(""));
    }
    out
}

fn completion(prompt: Value, max_tokens: usize, stream: bool) -> Value {
    json!({"model": MODEL, "prompt": prompt, "max_tokens": max_tokens, "stream": stream, "return_token_ids": true})
}

#[tokio::test]
async fn a_completion_continued_from_its_token_ids_gives_the_rest() {
    let sim = Sim::start(&[]);
    const M: usize = 12;
    let prompt = json!("Tell me about the sea and the ships that sail on it.");
    let full = output(
        &sim.post("/v1/completions", &completion(prompt.clone(), M, false)).await,
        false,
    );
    assert_eq!(full.ids, greedy::expected_ids(&full.prompt_ids, M));
    assert_eq!(full.text, greedy::text(&full.ids));
    let streamed = output(
        &sim.post("/v1/completions", &completion(prompt.clone(), M, true)).await,
        true,
    );
    assert_eq!(streamed, full, "streaming and not give the same answer");
    for k in [0, 1, 5, M - 1] {
        let context = [full.prompt_ids.as_slice(), &full.ids[..k]].concat();
        for stream in [false, true] {
            let rest = output(
                &sim.post("/v1/completions", &completion(json!(context), M - k, stream))
                    .await,
                stream,
            );
            assert_eq!(rest.prompt_ids, context, "token ids are the prompt as they are");
            assert_eq!(
                (rest.ids.as_slice(), rest.text.as_str()),
                (&full.ids[k..], &full.text[k * greedy::PIECE_LEN..]),
                "k {k}"
            );
        }
        // As text too: the pieces read back as their ids.
        let text = format!("{}{}", prompt.as_str().unwrap(), &full.text[..k * greedy::PIECE_LEN]);
        let rest = output(
            &sim.post("/v1/completions", &completion(json!(text), M - k, false))
                .await,
            false,
        );
        assert_eq!(rest.ids, full.ids[k..]);
    }
}

fn chat(messages: Value, max_tokens: usize, stream: bool) -> Value {
    json!({"model": MODEL, "messages": messages, "max_tokens": max_tokens, "stream": stream, "return_token_ids": true})
}

#[tokio::test]
async fn a_chat_continued_from_its_partial_answer_gives_the_rest() {
    let sim = Sim::start(&[]);
    const M: usize = 10;
    let messages = json!([
        {"role": "system", "content": "You are brief."},
        {"role": "user", "content": "Name the planets, please."}
    ]);
    let full = output(
        &sim.post("/v1/chat/completions", &chat(messages.clone(), M, false))
            .await,
        false,
    );
    assert_eq!(full.ids, greedy::expected_ids(&full.prompt_ids, M));
    assert_eq!(full.text, greedy::text(&full.ids));
    let streamed = output(
        &sim.post("/v1/chat/completions", &chat(messages.clone(), M, true)).await,
        true,
    );
    assert_eq!(streamed, full);
    for k in [0, 1, 4, M - 1] {
        let mut continued = messages.clone();
        let partial = &full.text[..k * greedy::PIECE_LEN];
        continued
            .as_array_mut()
            .unwrap()
            .push(json!({"role": "assistant", "content": partial}));
        for stream in [false, true] {
            let mut req = chat(continued.clone(), M - k, stream);
            req["add_generation_prompt"] = json!(false);
            req["continue_final_message"] = json!(true);
            let reply = sim.post("/v1/chat/completions", &req).await;
            let rest = output(&reply, stream);
            assert_eq!(rest.prompt_ids, [full.prompt_ids.as_slice(), &full.ids[..k]].concat());
            assert_eq!(
                (rest.ids.as_slice(), rest.text.as_str()),
                (&full.ids[k..], &full.text[partial.len()..]),
                "k {k}"
            );
            let role = if stream {
                serde_json::from_str::<Value>(&reply.events()[0]).unwrap()["choices"][0]["delta"]["role"].clone()
            } else {
                reply.json()["choices"][0]["message"]["role"].clone()
            };
            assert_eq!(role, "assistant");
        }
    }
    // Text that is not the simulator's pieces is tokenized as any text: another answer.
    let mut other = messages.clone();
    other
        .as_array_mut()
        .unwrap()
        .push(json!({"role": "assistant", "content": "Mercury, Venus"}));
    let mut req = chat(other, M, false);
    req["add_generation_prompt"] = json!(false);
    req["continue_final_message"] = json!(true);
    let answer = output(&sim.post("/v1/chat/completions", &req).await, false);
    assert!(answer.prompt_ids.len() > full.prompt_ids.len());
    assert_eq!(answer.ids, greedy::expected_ids(&answer.prompt_ids, M));
    assert_ne!(answer.ids, full.ids);
}

#[tokio::test]
async fn continue_final_message_is_refused_as_vllm_refuses_it() {
    let sim = Sim::start(&[]);
    let messages = json!([{"role": "user", "content": "hi"}, {"role": "assistant", "content": " w00001"}]);
    let cases = [
        (
            json!({"add_generation_prompt": true, "continue_final_message": true}),
            "Cannot set both `continue_final_message` and `add_generation_prompt` to True.",
        ),
        (
            json!({"continue_final_message": true}),
            "continue_final_message and add_generation_prompt are not compatible.",
        ),
    ];
    for (flags, message) in cases {
        let mut req = chat(messages.clone(), 2, false);
        req.as_object_mut().unwrap().extend(flags.as_object().unwrap().clone());
        let r = sim.post("/v1/chat/completions", &req).await;
        assert_eq!(r.status(), 400);
        let error = &r.json()["error"];
        assert!(error["message"].as_str().unwrap().starts_with(message), "{error}");
        assert_eq!(
            (error["type"].as_str(), error["code"].as_u64()),
            (Some("BadRequestError"), Some(400))
        );
    }
    let mut req = chat(json!([{"role": "user", "content": "hi"}]), 2, false);
    req["add_generation_prompt"] = json!(false);
    req["continue_final_message"] = json!(true);
    let r = sim.post("/v1/chat/completions", &req).await;
    assert_eq!(r.status(), 400);
    assert_eq!(
        r.json()["error"]["message"],
        "Cannot set `continue_final_message` to True when the last message is not from the assistant."
    );
}

#[tokio::test]
async fn return_token_ids_shapes_chunks_as_vllm_does() {
    let sim = Sim::start(&[]);
    let reply = sim
        .post("/v1/completions", &completion(json!([1, 2, 3]), 3, true))
        .await;
    let events = reply.events();
    let out = greedy::expected_ids(&[1, 2, 3], 3);
    assert!(
        events[0].ends_with(&format!(
            r#""finish_reason":null,"stop_reason":null,"prompt_token_ids":[1,2,3],"token_ids":[{}]}}]}}"#,
            out[0]
        )),
        "{}",
        events[0]
    );
    assert!(events[1].ends_with(&format!(r#""prompt_token_ids":null,"token_ids":[{}]}}]}}"#, out[1])));
    assert!(events[2].contains(&format!(r#""finish_reason":"length","stop_reason":null,"prompt_token_ids":null,"token_ids":[{}]}}],"system_fingerprint""#, out[2])));

    let reply = sim
        .post(
            "/v1/chat/completions",
            &chat(json!([{"role": "user", "content": "hi"}]), 2, true),
        )
        .await;
    let events = reply.events();
    let role: Value = serde_json::from_str(&events[0]).unwrap();
    let prompt = ids(&role["prompt_token_ids"]);
    assert!(events[0].ends_with(&format!(
        r#""delta":{{"role":"assistant","content":""}},"logprobs":null,"finish_reason":null}}],"prompt_token_ids":{},"prompt_text":null}}"#,
        serde_json::to_string(&prompt).unwrap()
    )));
    let out = greedy::expected_ids(&prompt, 2);
    assert!(events[1].ends_with(&format!(
        r#""logprobs":null,"finish_reason":null,"token_ids":[{}]}}]}}"#,
        out[0]
    )));
    assert!(events[2].contains(&format!(
        r#""finish_reason":"length","stop_reason":null,"token_ids":[{}]}}]"#,
        out[1]
    )));

    // Without it, none of these fields.
    for (path, body) in [
        (
            "/v1/completions",
            json!({"model": MODEL, "prompt": "hi", "max_tokens": 2, "stream": true}),
        ),
        (
            "/v1/chat/completions",
            json!({"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2, "stream": true}),
        ),
        (
            "/v1/completions",
            json!({"model": MODEL, "prompt": "hi", "max_tokens": 2}),
        ),
        (
            "/v1/chat/completions",
            json!({"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}),
        ),
    ] {
        let text = sim.post(path, &body).await.text();
        assert!(!text.contains("token_ids") && !text.contains("prompt_text"), "{text}");
    }
}

/// A streaming completion of `max_tokens` tokens.
fn streaming(max_tokens: usize) -> Value {
    json!({"model": MODEL, "prompt": "stream me", "max_tokens": max_tokens, "stream": true})
}

#[tokio::test]
async fn before_head_faults_fail_the_connection_before_any_byte() {
    let sim = Sim::start(&[]);
    for kind in ["reset_before_head", "close_before_head", "hang_before_head", "garbage"] {
        sim.arm(json!({"kind": kind, "count": 1})).await;
        let mut s = sim.send("POST", "/v1/completions", &streaming(4)).await;
        let reply = read_reply(&mut s, SILENCE).await;
        match kind {
            "reset_before_head" => assert_eq!((reply.end, reply.bytes.len()), (End::Reset, 0)),
            "close_before_head" => assert_eq!((reply.end, reply.bytes.len()), (End::Eof, 0)),
            "hang_before_head" => assert_eq!((reply.end, reply.bytes.len()), (End::Silent, 0)),
            _ => {
                assert_eq!(reply.end, End::Eof);
                assert!(
                    !reply.bytes.is_empty() && !reply.bytes.starts_with(b"HTTP/"),
                    "{}",
                    reply.text()
                );
            }
        }
        drop(s);
        let report = sim.fault_report().await;
        assert_eq!(
            (report["kind"].as_str(), report["fired"].as_u64()),
            (Some(kind), Some(1)),
            "{report}"
        );
        assert_eq!(report["remaining"], 0);
        // Used up: the next request is answered.
        let reply = sim.post("/v1/completions", &streaming(4)).await;
        assert_eq!((reply.status(), reply.events().len()), (200, 4));
    }
    // Any model route, streaming or not.
    sim.arm(json!({"kind": "close_before_head", "count": 1})).await;
    let mut s = sim
        .send("POST", "/v1/embeddings", &json!({"model": MODEL, "input": "x"}))
        .await;
    assert_eq!(read_reply(&mut s, DEADLINE).await.bytes.len(), 0);
}

#[tokio::test]
async fn a_status_fault_answers_with_vllms_error() {
    let sim = Sim::start(&[]);
    sim.arm(json!({"kind": "status", "status": 503, "count": 2})).await;
    for _ in 0..2 {
        let r = sim
            .post(
                "/v1/chat/completions",
                &chat(json!([{"role": "user", "content": "hi"}]), 2, true),
            )
            .await;
        assert_eq!(r.status(), 503);
        let error = &r.json()["error"];
        assert_eq!(
            (error["type"].as_str(), error["code"].as_u64()),
            (Some("ServiceUnavailableError"), Some(503))
        );
    }
    assert_eq!(sim.post("/v1/completions", &streaming(2)).await.status(), 200);
    let report = sim.fault_report().await;
    assert_eq!(
        (report["matched"].as_u64(), report["fired"].as_u64()),
        (Some(2), Some(2))
    );
}

#[tokio::test]
async fn mid_stream_faults_strike_after_their_events() {
    let sim = Sim::start(&[]);
    for (kind, end) in [
        ("reset_mid_stream", End::Reset),
        ("cut_mid_stream", End::Eof),
        ("stall_mid_stream", End::Silent),
    ] {
        for after in [0, 3] {
            sim.arm(json!({"kind": kind, "after_events": after, "count": 1})).await;
            let mut s = sim.send("POST", "/v1/completions", &streaming(10)).await;
            let reply = read_reply(&mut s, SILENCE).await;
            assert_eq!(reply.end, end, "{kind} after {after}");
            assert_eq!(reply.status(), 200);
            assert!(reply.head().contains("text/event-stream"));
            let (_, ended) = reply.body();
            assert!(!ended, "{kind}: the body must not end");
            assert_eq!(reply.events().len(), after as usize, "{kind}");
            // The events are whole, and end the bytes: nothing of a next one.
            assert!(reply.bytes.ends_with(if after == 0 { b"\r\n\r\n" } else { b"\n\n" }));
        }
    }
    // A chat's role chunk counts as an event.
    sim.arm(json!({"kind": "cut_mid_stream", "after_events": 2, "count": 1}))
        .await;
    let mut s = sim
        .send(
            "POST",
            "/v1/chat/completions",
            &chat(json!([{"role": "user", "content": "hi"}]), 5, true),
        )
        .await;
    let reply = read_reply(&mut s, DEADLINE).await;
    let events = reply.events();
    assert_eq!(events.len(), 2);
    assert!(events[0].contains(r#""role":"assistant""#) && events[1].contains(r#""content":" w"#));
    // Mid-stream faults leave other requests alone: non-streaming ones, and streams shorter
    // than their events (then on the same connection, the next response is whole too).
    sim.arm(json!({"kind": "reset_mid_stream", "after_events": 50})).await;
    let r = sim
        .post(
            "/v1/completions",
            &json!({"model": MODEL, "prompt": "x", "max_tokens": 3}),
        )
        .await;
    assert_eq!(r.status(), 200);
    let mut s = TcpStream::connect(sim.addr).await.unwrap();
    for _ in 0..2 {
        let body = serde_json::to_vec(&streaming(3)).unwrap();
        let head = format!(
            "POST /v1/completions HTTP/1.1\r\nhost: sim\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n",
            body.len()
        );
        s.write_all(head.as_bytes()).await.unwrap();
        s.write_all(&body).await.unwrap();
        let mut got = Vec::new();
        while !got.ends_with(b"0\r\n\r\n") {
            let mut buf = [0u8; 4096];
            let n = timeout(DEADLINE, s.read(&mut buf)).await.unwrap().unwrap();
            assert!(n > 0, "closed: {}", String::from_utf8_lossy(&got));
            got.extend_from_slice(&buf[..n]);
        }
        let reply = Reply {
            bytes: got,
            end: End::Eof,
        };
        assert_eq!(reply.events().len(), 3);
    }
    let report = sim.fault_report().await;
    assert_eq!(
        (
            report["remaining"].clone(),
            report["matched"].as_u64(),
            report["fired"].as_u64()
        ),
        (Value::Null, Some(2), Some(0))
    );
    sim.arm(json!({"kind": "none"})).await;
    assert_eq!(sim.fault_report().await, json!({"kind": "none"}));
}

#[tokio::test]
async fn the_fault_flag_arms_a_fault_at_start() {
    let sim = Sim::start(&["--fault", "reset_mid_stream:2"]);
    for _ in 0..2 {
        let mut s = sim.send("POST", "/v1/completions", &streaming(6)).await;
        let reply = read_reply(&mut s, DEADLINE).await;
        assert_eq!((reply.end, reply.events().len()), (End::Reset, 2));
    }
    let report = sim.fault_report().await;
    assert_eq!(
        (report["kind"].as_str(), report["after_events"].as_u64()),
        (Some("reset_mid_stream"), Some(2))
    );
    let bad = Command::new(env!("CARGO_BIN_EXE_lmstack-sim"))
        .args(["--port", "0", "--fault", "explode"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .unwrap();
    assert!(!bad.success(), "an unknown fault kind is refused at start");
}

#[tokio::test]
async fn exit_mid_stream_cuts_every_stream_and_exits_137() {
    let mut sim = Sim::start(&["--decode-base-ms", "5"]);
    // A long stream under way, then one that kills the engine after two events.
    let mut long = sim.send("POST", "/v1/completions", &streaming(10_000)).await;
    let mut first = [0u8; 64];
    let n = timeout(DEADLINE, long.read(&mut first)).await.unwrap().unwrap();
    assert!(first[..n].starts_with(b"HTTP/1.1 200"));
    sim.arm(json!({"kind": "exit_mid_stream", "after_events": 2})).await;
    let mut s = sim.send("POST", "/v1/completions", &streaming(10)).await;
    let reply = read_reply(&mut s, DEADLINE).await;
    assert_eq!((reply.end, reply.events().len(), reply.body().1), (End::Eof, 2, false));
    let rest = read_reply(&mut long, DEADLINE).await;
    assert_ne!(rest.end, End::Silent);
    assert!(!rest.bytes.ends_with(b"0\r\n\r\n"), "the long stream was cut");
    let status = sim.child.wait().unwrap();
    assert_eq!(status.code(), Some(137));
}

#[tokio::test]
async fn a_streaming_head_goes_out_before_the_first_token() {
    let sim = Sim::start(&["--prefill-base-ms", "1500"]);
    let mut s = sim.send("POST", "/v1/completions", &streaming(2)).await;
    let reply = read_reply(&mut s, Duration::from_millis(700)).await;
    assert_eq!(reply.end, End::Silent, "the first token is 1.5 s away");
    assert_eq!((reply.status(), reply.events().len()), (200, 0));
    let rest = read_reply(&mut s, DEADLINE).await;
    assert_eq!(rest.end, End::Eof);
}

/// `vllm:num_requests_running`, as the simulator exports it.
async fn running(sim: &Sim) -> f64 {
    let text = sim.call("GET", "/metrics", &Value::Null).await.text();
    text.lines()
        .find(|l| l.starts_with("vllm:num_requests_running"))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap()
}

#[tokio::test]
async fn a_stalled_stream_holds_its_request_until_the_peer_leaves() {
    let sim = Sim::start(&[]);
    sim.arm(json!({"kind": "stall_mid_stream", "after_events": 1})).await;
    let mut s = sim.send("POST", "/v1/completions", &streaming(30_000)).await;
    let reply = read_reply(&mut s, SILENCE).await;
    assert_eq!((reply.end, reply.events().len()), (End::Silent, 1));
    assert_eq!(running(&sim).await, 1.0);
    drop(s);
    let deadline = tokio::time::Instant::now() + DEADLINE;
    while running(&sim).await != 0.0 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the stalled request outlived its client"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// With a model's tokenizer, token ids continue as with the hash tokenizer; a chat's final
/// message is rendered by the model's template, as vLLM renders it (its pieces are then text to
/// the real tokenizer, so the answer is not the rest of the first).
#[tokio::test]
async fn with_a_real_tokenizer_ids_continue_and_chats_render_through_its_template() {
    let fixture = concat!(env!("CARGO_MANIFEST_DIR"), "/fixtures/tiny-llama");
    let sim = Sim::start(&["--tokenizer", fixture]);
    const M: usize = 6;
    let full = output(
        &sim.post("/v1/completions", &completion(json!("Hello there"), M, false))
            .await,
        false,
    );
    let context = [full.prompt_ids.as_slice(), &full.ids[..2]].concat();
    let rest = output(
        &sim.post("/v1/completions", &completion(json!(context), M - 2, true))
            .await,
        true,
    );
    assert_eq!(rest.ids, full.ids[2..]);

    let mut req = chat(
        json!([{"role": "user", "content": "hi"}, {"role": "assistant", "content": full.text[..14]}]),
        M,
        false,
    );
    req["add_generation_prompt"] = json!(false);
    req["continue_final_message"] = json!(true);
    let answer = output(&sim.post("/v1/chat/completions", &req).await, false);
    let tokenizer = lmstack_kv::prompt::PromptTokenizer::from_dir(fixture).unwrap();
    assert_eq!(
        answer.prompt_ids,
        tokenizer.chat(&serde_json::to_vec(&req).unwrap()).unwrap()
    );
    assert_eq!(answer.ids, greedy::expected_ids(&answer.prompt_ids, M));
    req["add_generation_prompt"] = json!(true);
    assert_eq!(sim.post("/v1/chat/completions", &req).await.status(), 400);
}
