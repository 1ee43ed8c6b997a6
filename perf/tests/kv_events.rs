//! lmstack-sim's KV events over real sockets: the simulator runs as its own process with the
//! tiny model's real tokenizer; a ZeroMQ subscriber decodes what it publishes with
//! `lmstack_kv::event` and feeds an `lmstack_kv::index::EngineIndex`, and every assertion is
//! about what that index holds against the keys `lmstack_kv::key::prompt_keys` computes from
//! `PromptTokenizer`'s tokens for the same request bodies.
//!
//! Nothing waits on a clock except deadlines: every wait is a poll that fails the test when
//! its deadline passes.

#![allow(clippy::unwrap_used, reason = "tests assert by unwrapping")]

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use lmstack_kv::event::{Batch, END_SEQ, Event, decode_batch, decode_seq, encode_seq};
use lmstack_kv::index::{EngineIndex, Held, IndexLimits, SeqCheck};
use lmstack_kv::key::{BlockKey, RequestExtras, prompt_keys};
use lmstack_kv::prompt::PromptTokenizer;
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::timeout;
use zeromq::{DealerSocket, Socket, SocketRecv, SocketSend, SubSocket, ZmqMessage};

const MODEL: &str = "tiny-llama";
const BLOCK: usize = 16;
/// The bound on every wait.
const DEADLINE: Duration = Duration::from_secs(20);

fn fixture() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("fixtures/tiny-llama")
}

fn tokenizer() -> PromptTokenizer {
    PromptTokenizer::from_dir(fixture()).unwrap()
}

/// A port free now (the simulator's ZeroMQ ports are given, not picked by it).
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A simulator process, killed (by its PID) when dropped.
struct Sim {
    child: Child,
    addr: SocketAddr,
    kv_port: u16,
    replay_port: u16,
}

impl Drop for Sim {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Sim {
    /// Starts the simulator with the tiny model's tokenizer, KV events on a free port (and a
    /// replay socket when `replay`), and `extra` flags. A port taken between the probe and the
    /// bind makes the simulator exit: tried again on others.
    fn start(replay: bool, extra: &[&str]) -> Sim {
        for _ in 0..5 {
            let (kv_port, replay_port) = (free_port(), if replay { free_port() } else { 0 });
            let mut cmd = Command::new(env!("CARGO_BIN_EXE_lmstack-sim"));
            cmd.args(["--host", "127.0.0.1", "--port", "0", "--model", MODEL, "--name", "sim"])
                .args(["--block-size", &BLOCK.to_string()])
                .arg("--tokenizer")
                .arg(fixture())
                .args(["--kv-events-port", &kv_port.to_string()])
                .args(["--kv-events-replay-port", &replay_port.to_string()])
                .args(extra)
                .stdout(Stdio::piped())
                .stderr(Stdio::inherit());
            let mut child = cmd.spawn().unwrap();
            let stdout = child.stdout.take().unwrap();
            let (tx, rx) = std::sync::mpsc::channel();
            std::thread::spawn(move || {
                for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                    if let Some(rest) = line.split("listening on http://").nth(1) {
                        let _ = tx.send(rest.split_whitespace().next().unwrap_or("").to_owned());
                    }
                }
            });
            match rx.recv_timeout(DEADLINE) {
                Ok(addr) => {
                    return Sim {
                        child,
                        addr: addr.parse().unwrap(),
                        kv_port,
                        replay_port,
                    };
                }
                Err(_) => {
                    let _ = child.kill();
                    let _ = child.wait();
                }
            }
        }
        panic!("lmstack-sim did not start");
    }

    async fn post(&self, path: &str, body: &[u8]) -> (u16, Value) {
        http(self.addr, "POST", path, body).await
    }

    async fn get(&self, path: &str) -> (u16, Value) {
        http(self.addr, "GET", path, b"").await
    }
}

/// One HTTP/1.1 exchange on a fresh connection: the status and the body as JSON (null when
/// the body is not JSON).
async fn http(addr: SocketAddr, method: &str, path: &str, body: &[u8]) -> (u16, Value) {
    let exchange = async {
        let mut s = TcpStream::connect(addr).await.unwrap();
        let head = format!(
            "{method} {path} HTTP/1.1\r\nhost: sim\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n",
            body.len()
        );
        s.write_all(head.as_bytes()).await.unwrap();
        s.write_all(body).await.unwrap();
        let mut raw = Vec::new();
        s.read_to_end(&mut raw).await.unwrap();
        raw
    };
    let raw = timeout(DEADLINE, exchange).await.expect("HTTP exchange timed out");
    let text = String::from_utf8_lossy(&raw);
    let (head, body) = text.split_once("\r\n\r\n").unwrap();
    let status = head.split_whitespace().nth(1).unwrap().parse().unwrap();
    (status, serde_json::from_str(body).unwrap_or(Value::Null))
}

/// A subscriber feeding an index, as the router's intake does (without its replay logic).
struct Subscriber {
    socket: SubSocket,
    index: EngineIndex,
    /// The sequence number of the last batch received.
    last: Option<i64>,
}

impl Subscriber {
    async fn connect(sim: &Sim, topic: &str) -> Subscriber {
        let mut socket = SubSocket::new();
        socket
            .connect(&format!("tcp://127.0.0.1:{}", sim.kv_port))
            .await
            .unwrap();
        socket.subscribe(topic).await.unwrap();
        let index = EngineIndex::new(Arc::new(Held::default()), IndexLimits::default());
        Subscriber {
            socket,
            index,
            last: None,
        }
    }

    /// The next message: its sequence number and batch.
    async fn recv(&mut self) -> Option<(i64, Batch)> {
        let m = timeout(DEADLINE, self.socket.recv()).await.ok()?.unwrap();
        let frames = m.into_vec();
        assert_eq!(frames.len(), 3, "[topic, seq, payload]");
        let seq = decode_seq(&frames[1]).unwrap();
        self.last = Some(seq);
        Some((seq, decode_batch(&frames[2]).unwrap()))
    }

    /// Receives and applies batches until `done` holds for the index.
    async fn apply_until(&mut self, what: &str, done: impl Fn(&Held) -> bool) {
        while !done(self.index.held()) {
            let Some((seq, batch)) = self.recv().await else {
                panic!("no KV events while waiting for {what}");
            };
            assert_eq!(
                self.index.apply(seq, &batch, 0),
                SeqCheck::InOrder,
                "while waiting for {what}"
            );
        }
    }

    /// Makes sure the subscription is live (a PUB socket drops what it sends before then):
    /// sends prompts of their own until one's batch arrives, then one more whose blocks mark
    /// that nothing sent before is still on the way.
    async fn warm_up(&mut self, sim: &Sim, t: &PromptTokenizer) {
        let mut live = false;
        for i in 0..50 {
            let body = completion(&format!("warm-up {i}: {}", "words of a full block ".repeat(8)));
            assert_eq!(sim.post("/v1/completions", &body).await.0, 200);
            if let Ok(Some((seq, batch))) = timeout(Duration::from_millis(200), self.recv()).await {
                assert_eq!(self.index.apply(seq, &batch, 0), SeqCheck::InOrder);
                live = true;
                break;
            }
        }
        assert!(live, "the subscription never received a batch");
        let body = completion(&format!("in sync: {}", "words of a full block ".repeat(8)));
        let k = keys(&t.completion(&body).unwrap(), RequestExtras::default());
        assert_eq!(sim.post("/v1/completions", &body).await.0, 200);
        self.apply_until("the warm-up", |h| h.matched(&k) == k.len()).await;
    }
}

fn completion(prompt: &str) -> Vec<u8> {
    serde_json::to_vec(&json!({"model": MODEL, "prompt": prompt, "max_tokens": 2})).unwrap()
}

/// A long text only `seed` has: many full blocks.
fn document(seed: usize) -> String {
    (0..30)
        .map(|i| {
            format!(
                "Section {i} of report {seed}: the figures for quarter {} were revised. ",
                i * seed % 7
            )
        })
        .collect()
}

/// The keys of a prompt's full blocks, from the tokens vLLM would compute for `body`.
fn keys(tokens: &[u32], extras: RequestExtras<'_>) -> Vec<BlockKey> {
    let mut keys = Vec::new();
    prompt_keys(tokens, BLOCK, extras, &mut keys);
    keys
}

#[tokio::test]
async fn completion_and_chat_blocks_are_indexed_under_the_prompts_own_keys() {
    let sim = Sim::start(false, &[]);
    let t = tokenizer();
    let mut sub = Subscriber::connect(&sim, "").await;
    sub.warm_up(&sim, &t).await;

    let body = completion(&document(1));
    let doc_keys = keys(&t.completion(&body).unwrap(), RequestExtras::default());
    assert!(doc_keys.len() >= 10, "{}", doc_keys.len());
    assert_eq!(sim.post("/v1/completions", &body).await.0, 200);
    sub.apply_until("the document's blocks", |h| h.matched(&doc_keys) == doc_keys.len())
        .await;

    // A chat whose first round is the same document: the chat template's tokens, not the text's.
    let chat = serde_json::to_vec(&json!({"model": MODEL, "max_tokens": 2, "messages": [
        {"role": "system", "content": "You answer from the report."},
        {"role": "user", "content": document(2)},
    ]}))
    .unwrap();
    let chat_keys = keys(&t.chat(&chat).unwrap(), RequestExtras::default());
    assert!(chat_keys.len() >= 10);
    let (status, reply) = sim.post("/v1/chat/completions", &chat).await;
    assert_eq!(status, 200, "{reply}");
    sub.apply_until("the chat's blocks", |h| h.matched(&chat_keys) == chat_keys.len())
        .await;

    // A salted request: blocks of its own, under the salted keys only.
    let salted =
        serde_json::to_vec(&json!({"model": MODEL, "prompt": document(3), "max_tokens": 2, "cache_salt": "team-a"}))
            .unwrap();
    let tokens = t.completion(&salted).unwrap();
    let salt = RequestExtras {
        cache_salt: Some("team-a"),
        ..Default::default()
    };
    let salted_keys = keys(&tokens, salt);
    assert_eq!(sim.post("/v1/completions", &salted).await.0, 200);
    sub.apply_until("the salted blocks", |h| h.matched(&salted_keys) == salted_keys.len())
        .await;
    assert_eq!(sub.index.held().matched(&keys(&tokens, RequestExtras::default())), 0);

    // The same document again: a cache hit, announced from the root only on request (vLLM's
    // `kv_cache_report_mode: full`), with nothing new to store.
    let again = serde_json::to_vec(&json!({"model": MODEL, "prompt": document(1), "max_tokens": 2,
                                            "vllm_xargs": {"kv_cache_report_mode": "full"}}))
    .unwrap();
    let (_, reply) = sim.post("/v1/completions", &again).await;
    assert!(
        reply["usage"]["prompt_tokens_details"]["cached_tokens"]
            .as_u64()
            .unwrap()
            > 0
    );
    let (_, batch) = sub.recv().await.unwrap();
    let Event::Stored(hit) = &batch.events[0] else {
        panic!("{batch:?}");
    };
    assert_eq!(hit.parent, None);
    assert_eq!(hit.token_ids, t.completion(&body).unwrap()[..hit.hashes.len() * BLOCK]);
}

#[tokio::test]
async fn evicted_blocks_leave_the_index_and_a_reset_clears_it() {
    let t = tokenizer();
    let first = completion(&document(4));
    let first_tokens = t.completion(&first).unwrap();
    let first_keys = keys(&first_tokens, RequestExtras::default());
    // Room for about two documents; positional encoding and a topic, as older releases; slow
    // decoding keeps a streamed request running while the cache is reset.
    let room = (2 * (first_keys.len() + 2)).to_string();
    let sim = Sim::start(
        false,
        &[
            "--num-gpu-blocks",
            &room,
            "--kv-events-encoding",
            "positional",
            "--kv-events-topic",
            "kv",
            "--decode-base-ms",
            "20",
        ],
    );
    let mut sub = Subscriber::connect(&sim, "kv").await;
    sub.warm_up(&sim, &t).await;
    assert_eq!(sim.post("/v1/completions", &first).await.0, 200);
    sub.apply_until("the first document", |h| h.matched(&first_keys) == first_keys.len())
        .await;

    // Two more documents push the first one's tail out.
    for seed in [5, 6] {
        let body = completion(&document(seed));
        let k = keys(&t.completion(&body).unwrap(), RequestExtras::default());
        assert_eq!(sim.post("/v1/completions", &body).await.0, 200);
        sub.apply_until("a later document", |h| h.matched(&k) == k.len()).await;
    }
    let left = sub.index.held().matched(&first_keys);
    assert!(left < first_keys.len(), "nothing of the first document was evicted");
    // What the index says is left is what the engine finds cached.
    let (_, reply) = sim.post("/v1/completions", &first).await;
    let cached = reply["usage"]["prompt_tokens_details"]["cached_tokens"]
        .as_u64()
        .unwrap() as usize;
    assert_eq!(cached, left.min((first_tokens.len() - 1) / BLOCK) * BLOCK);

    // A reset while a request holds blocks fails, as vLLM's does; then it clears.
    let mut stream = TcpStream::connect(sim.addr).await.unwrap();
    let body =
        serde_json::to_vec(&json!({"model": MODEL, "prompt": document(7), "max_tokens": 100, "stream": true})).unwrap();
    let head = format!(
        "POST /v1/completions HTTP/1.1\r\nhost: sim\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n",
        body.len()
    );
    stream.write_all(head.as_bytes()).await.unwrap();
    stream.write_all(&body).await.unwrap();
    let mut buf = vec![0u8; 4096];
    let mut seen = Vec::new();
    while !String::from_utf8_lossy(&seen).contains("data: ") {
        let n = timeout(DEADLINE, stream.read(&mut buf)).await.unwrap().unwrap();
        assert!(n > 0, "the stream ended early");
        seen.extend_from_slice(&buf[..n]);
    }
    assert_eq!(
        sim.post("/reset_prefix_cache", b"").await,
        (200, json!({"success": false}))
    );
    drop(stream);
    let deadline = tokio::time::Instant::now() + DEADLINE;
    while sim.post("/reset_prefix_cache", b"").await.1 != json!({"success": true}) {
        assert!(tokio::time::Instant::now() < deadline, "the reset never succeeded");
        tokio::task::yield_now().await;
    }
    sub.apply_until("the clear", |h| h.blocks() == 0).await;
    assert!(sub.index.held().clears() >= 1);
}

#[tokio::test]
async fn a_skip_is_a_gap_and_the_replay_returns_the_missing_batches() {
    let sim = Sim::start(true, &[]);
    let (status, sources) = sim.get("/kv_event_sources").await;
    assert_eq!(status, 200);
    assert_eq!(
        sources,
        json!({"0": {"enable_kv_cache_events": true, "publisher": "zmq",
                     "endpoint": format!("tcp://*:{}", sim.kv_port),
                     "replay_endpoint": format!("tcp://*:{}", sim.replay_port),
                     "buffer_steps": 10000, "hwm": 100000, "max_queue_size": 100000, "topic": ""}})
    );
    let t = tokenizer();
    let mut sub = Subscriber::connect(&sim, "").await;
    sub.warm_up(&sim, &t).await;

    // Two batches lost on the wire, then one that arrives.
    let (status, echo) = sim.post("/sim/kv_events", br#"{"skip": 2}"#).await;
    assert_eq!((status, echo), (200, json!({"skip": 2})));
    let bodies: Vec<Vec<u8>> = (10..13).map(|seed| completion(&document(seed))).collect();
    for body in &bodies {
        assert_eq!(sim.post("/v1/completions", body).await.0, 200);
    }
    let before = sub.last.unwrap();
    let (seq, live) = sub.recv().await.unwrap();
    let (from, to) = (before + 1, before + 3);
    assert_eq!(seq, to);
    assert_eq!(sub.index.check_seq(0, seq), SeqCheck::Gap { from, to });

    // The replay socket sends every buffered batch from `from` on, then the end marker.
    let mut dealer = DealerSocket::new();
    dealer
        .connect(&format!("tcp://127.0.0.1:{}", sim.replay_port))
        .await
        .unwrap();
    let request = ZmqMessage::try_from(vec![Bytes::new(), Bytes::copy_from_slice(&encode_seq(from))]).unwrap();
    dealer.send(request).await.unwrap();
    let mut replayed = Vec::new();
    loop {
        let frames = timeout(DEADLINE, dealer.recv()).await.unwrap().unwrap().into_vec();
        assert_eq!(frames.len(), 4, "[\"\", topic, seq, payload]");
        assert!(frames[0].is_empty());
        let s = decode_seq(&frames[2]).unwrap();
        if s == END_SEQ {
            assert!(frames[3].is_empty());
            break;
        }
        replayed.push((s, decode_batch(&frames[3]).unwrap()));
    }
    let seqs: Vec<i64> = replayed.iter().map(|(s, _)| *s).collect();
    assert_eq!(seqs, (from..=to).collect::<Vec<_>>());
    assert_eq!(
        replayed.last().unwrap().1.events,
        live.events,
        "the replay holds what was sent"
    );
    for (s, batch) in &replayed[..2] {
        assert_eq!(sub.index.apply(*s, batch, 0), SeqCheck::InOrder);
    }
    assert_eq!(sub.index.apply(seq, &live, 0), SeqCheck::InOrder);
    for body in &bodies {
        let k = keys(&t.completion(body).unwrap(), RequestExtras::default());
        assert_eq!(sub.index.held().matched(&k), k.len());
    }

    // Paused: batches are numbered and kept for replay, not sent.
    assert_eq!(sim.post("/sim/kv_events", br#"{"pause": true}"#).await.0, 200);
    assert_eq!(sim.post("/v1/completions", &completion(&document(20))).await.0, 200);
    assert_eq!(sim.post("/sim/kv_events", br#"{"pause": false}"#).await.0, 200);
    assert_eq!(sim.post("/v1/completions", &completion(&document(21))).await.0, 200);
    let (seq, _) = sub.recv().await.unwrap();
    assert_eq!(
        sub.index.check_seq(0, seq),
        SeqCheck::Gap {
            from: to + 1,
            to: to + 2
        }
    );
    assert_eq!(sim.post("/sim/kv_events", br#"{"drop": 1}"#).await.0, 400);
}

#[tokio::test]
async fn without_events_there_is_no_source_and_metrics_still_say_what_vllm_does() {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_lmstack-sim"));
    cmd.args(["--host", "127.0.0.1", "--port", "0", "--model", MODEL])
        .stdout(Stdio::piped());
    let mut child = cmd.spawn().unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let line = lines.next().unwrap().unwrap();
    let addr: SocketAddr = line
        .split("listening on http://")
        .nth(1)
        .unwrap()
        .split_whitespace()
        .next()
        .unwrap()
        .parse()
        .unwrap();
    let sim = Sim {
        child,
        addr,
        kv_port: 0,
        replay_port: 0,
    };
    assert_eq!(sim.get("/kv_event_sources").await.0, 404);
    assert_eq!(sim.post("/sim/kv_events", br#"{"skip": 1}"#).await.0, 404);
    assert_eq!(
        sim.post("/reset_prefix_cache", b"").await,
        (200, json!({"success": true}))
    );
    let metrics = timeout(DEADLINE, async {
        let mut s = TcpStream::connect(sim.addr).await.unwrap();
        s.write_all(b"GET /metrics HTTP/1.1\r\nhost: sim\r\nconnection: close\r\n\r\n")
            .await
            .unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).await.unwrap();
        out
    })
    .await
    .unwrap();
    assert!(
        metrics.lines().any(|l| l.starts_with("process_start_time_seconds ")),
        "{metrics}"
    );
    let info = metrics
        .lines()
        .find(|l| l.starts_with("vllm:cache_config_info{"))
        .unwrap();
    for label in [
        r#"block_size="16""#,
        r#"enable_prefix_caching="True""#,
        r#"num_gpu_blocks="8192""#,
    ] {
        assert!(info.contains(label), "{info}");
    }
}
