//! `cargo xtask real-failover`: an engine killed mid-stream under two real vLLM engines (CPU
//! build, the tiny local model), and whether lmstack's continuation hides it. Opt-in, minutes.
//! Not a benchmark, and not a test of the simulator's faults (tests/tests/failover.rs).
//!
//! Per round (the victim alternates between the two engines):
//! 1. **References**: every request answered whole (not streamed) by each engine directly:
//!    greedy, `ignore_eos`, with a strong repetition penalty, since the random-weight model
//!    otherwise repeats one token and a duplicated or missing token would not show. vLLM's
//!    repetition penalty counts prompt and output tokens alike, so a continuation whose
//!    prompt holds the output so far is penalised as the uninterrupted request was (presence
//!    and frequency penalties count the output only; they would make continuations differ).
//!    The two engines' agreement is reported.
//! 2. **Kill**: every request streamed through lmstack at once (round_robin, probes far
//!    apart, so that lmstack's own failover meets the dead engine); once each stream on the
//!    victim has some tokens, the victim's process group gets SIGKILL.
//! 3. **Check**: per stream, whole (one `[DONE]` and nothing after it, no error event, one
//!    id, one role for chat, the body ended), usage (`max_tokens` completion tokens, the
//!    reference's prompt tokens), the text against the reference (where it first differs),
//!    and affected or not (lmstack's log names the cut streams and the tokens sent before
//!    the cut). An affected stream that is not exact is replayed: the continuation lmstack
//!    should have asked for, sent to the survivor directly, tells vLLM's own answer apart
//!    from a stitching fault. Unaffected streams are the control group: how often batching
//!    alone makes a streamed answer differ from the reference.
//! 4. The victim is started again for the next round; every engine is stopped at the end,
//!    on error too.
//!
//! Results: `perf/results/<date>-real-failover.json` and its SVG figure.

use std::collections::{BTreeMap, BTreeSet};
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::PathBuf;
use std::process::Command;
use std::sync::OnceLock;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use clap::Args;
use lmstack_e2e::{Proc, agent, metric_sum};
use serde_json::{Value, json};

use crate::{root, run_cmd, start_router};

#[derive(Args)]
pub struct RealFailoverArgs {
    /// The script that runs real vLLM engines (default: ../shared/tools/real-vllm.sh).
    #[arg(long, env = "LMSTACK_REAL_VLLM")]
    script: Option<PathBuf>,
    /// The two engines' ports.
    #[arg(long, value_delimiter = ',', default_value = "8131,8132")]
    ports: Vec<u16>,
    /// Streams per round, half completions and half chats.
    #[arg(long, default_value_t = 40)]
    requests: usize,
    /// Tokens each stream asks for (`ignore_eos`, so each gets exactly these).
    #[arg(long, default_value_t = 96)]
    max_tokens: u64,
    /// Rounds, each with its own prompts; the victim alternates between the engines.
    #[arg(long, default_value_t = 2)]
    rounds: usize,
    /// Events each stream on the victim has received when it is killed.
    #[arg(long, default_value_t = 16)]
    kill_after_events: usize,
    /// vLLM's `repetition_penalty` (greedy decoding of the random-weight model repeats one
    /// token without it).
    #[arg(long, default_value_t = 5.0)]
    repetition_penalty: f64,
    /// lmstack's `--stream-idle-timeout-ms`.
    #[arg(long, default_value_t = 3000)]
    stream_idle_timeout_ms: u64,
    /// Added to the results file's name (`perf/results/<date>-real-failover-<tag>.json`).
    #[arg(long)]
    tag: Option<String>,
}

const MODEL: &str = "tiny-llama";
const RUN_DIR: &str = "/tmp/vllm-real/run-failover";
/// Longest silence a client stream accepts before it counts as hung.
const CLIENT_READ_TIMEOUT: Duration = Duration::from_secs(60);
/// Probes far apart: the dead engine is met by requests, not by the health checker.
const HEALTH_INTERVAL_MS: &str = "600000";

struct Engines {
    script: PathBuf,
}

impl Engines {
    /// Starts engines on `ports`, engine i pinned to core `first_core + i`.
    fn start(&self, ports: &[u16], first_core: usize) -> anyhow::Result<()> {
        let mut start = Command::new(&self.script);
        start
            .arg("start")
            .args(ports.iter().map(u16::to_string))
            .env("RUN_DIR", RUN_DIR)
            .env("FIRST_CORE", first_core.to_string());
        run_cmd(&mut start)
    }

    /// Kills one engine's process group (as a crash would); `stop` still finds the others.
    fn kill(&self, port: u16) -> anyhow::Result<()> {
        let file = format!("{RUN_DIR}/engine-{port}.pid");
        let pid: i32 = std::fs::read_to_string(&file)
            .with_context(|| format!("reading {file}"))?
            .trim()
            .parse()
            .with_context(|| format!("parsing {file}"))?;
        // SAFETY: kill(2) on a process group this task started has no memory-safety
        // preconditions.
        let rc = unsafe { libc::kill(-pid, libc::SIGKILL) };
        anyhow::ensure!(rc == 0, "kill -KILL -{pid}: {}", std::io::Error::last_os_error());
        std::fs::remove_file(&file)?;
        Ok(())
    }
}

impl Drop for Engines {
    fn drop(&mut self) {
        let _ = Command::new(&self.script).arg("stop").env("RUN_DIR", RUN_DIR).status();
    }
}

#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Api {
    Completions,
    Chat,
}

impl Api {
    fn path(self) -> &'static str {
        match self {
            Api::Completions => "/v1/completions",
            Api::Chat => "/v1/chat/completions",
        }
    }

    fn name(self) -> &'static str {
        match self {
            Api::Completions => "completions",
            Api::Chat => "chat",
        }
    }
}

const TOPICS: [&str; 8] = [
    "a scheduler that batches requests",
    "the KV cache block allocator",
    "parsing chunked HTTP bodies",
    "a rendezvous hash over engines",
    "retrying a request elsewhere",
    "tokenizing a chat template",
    "draining connections on upgrade",
    "counting tokens in a stream",
];

/// Request `i` of `round`: completions and chats in pairs (so that round robin spreads both
/// over both engines), prompts of varied length and content.
fn request(round: usize, i: usize, args: &RealFailoverArgs) -> (Api, Value) {
    let topic = TOPICS[(i / 2 + round * 3) % TOPICS.len()];
    let detail = "Explain each step and its cost. ".repeat(i % 5);
    let common = json!({
        "model": MODEL,
        "max_tokens": args.max_tokens,
        "temperature": 0,
        "ignore_eos": true,
        "repetition_penalty": args.repetition_penalty,
        "stream": true,
        "stream_options": {"include_usage": true},
    });
    let mut body = common;
    if i % 4 < 2 {
        body["prompt"] = json!(format!(
            "# Round {round}, note {i}: {topic}. {detail}\ndef step_{i}(state):"
        ));
        (Api::Completions, body)
    } else {
        body["messages"] = json!([
            {"role": "system", "content": format!("You are reviewer {round}-{i}.")},
            {"role": "user", "content": format!("Tell me about {topic}. {detail}")},
        ]);
        (Api::Chat, body)
    }
}

/// An engine's whole answer to a request.
#[derive(Clone, Default)]
struct Answer {
    text: String,
    ids: Vec<u64>,
    prompt_ids: Vec<u64>,
    prompt_tokens: u64,
    completion_tokens: u64,
}

fn ids(v: &Value) -> Vec<u64> {
    v.as_array()
        .map(|a| a.iter().filter_map(Value::as_u64).collect())
        .unwrap_or_default()
}

/// `body` answered whole by the engine at `url`, with its token ids.
fn whole_answer(http: &ureq::Agent, url: &str, api: Api, body: &Value) -> anyhow::Result<Answer> {
    let mut whole = body.clone();
    whole["stream"] = json!(false);
    whole["return_token_ids"] = json!(true);
    if let Some(o) = whole.as_object_mut() {
        o.remove("stream_options");
    }
    let mut r = http
        .post(format!("{url}{}", api.path()))
        .send_json(&whole)
        .with_context(|| format!("asking {url}"))?;
    let text = r.body_mut().read_to_string()?;
    anyhow::ensure!(r.status() == 200, "{url} answered {}: {text}", r.status());
    let v: Value = serde_json::from_str(&text)?;
    let c = &v["choices"][0];
    let prompt_ids = if c["prompt_token_ids"].is_array() {
        ids(&c["prompt_token_ids"])
    } else {
        ids(&v["prompt_token_ids"])
    };
    Ok(Answer {
        text: c["text"]
            .as_str()
            .or(c["message"]["content"].as_str())
            .unwrap_or_default()
            .to_owned(),
        ids: ids(&c["token_ids"]),
        prompt_ids,
        prompt_tokens: v["usage"]["prompt_tokens"].as_u64().unwrap_or(0),
        completion_tokens: v["usage"]["completion_tokens"].as_u64().unwrap_or(0),
    })
}

/// What a client thread shares while its stream runs.
#[derive(Default)]
struct Live {
    /// Complete SSE events received (`[DONE]` excluded).
    events: AtomicUsize,
    done: AtomicBool,
    /// The endpoint of the first part (`x-lmstack-route`), once the head came.
    endpoint: OnceLock<String>,
}

/// A client's stream as read off the wire.
struct Collected {
    status: u16,
    /// The chunked body's last chunk came.
    complete: bool,
    /// Why reading stopped early (a reset, a silence past the client's timeout).
    read_error: Option<String>,
    raw: String,
    /// When each event arrived, ms from the request.
    arrivals_ms: Vec<u64>,
    /// Events received when the victim was killed, and whether `[DONE]` had come.
    at_kill: Option<(usize, bool)>,
    elapsed_ms: u64,
}

/// Streams `body` through the router at `addr` with its own connection, decoding the chunked
/// body as it comes (an independent little client: nothing of lmstack's codec).
fn stream(addr: SocketAddr, api: Api, body: &Value, request_id: &str, live: &Live) -> Collected {
    let start = Instant::now();
    let mut out = Collected {
        status: 0,
        complete: false,
        read_error: None,
        raw: String::new(),
        arrivals_ms: Vec::new(),
        at_kill: None,
        elapsed_ms: 0,
    };
    if let Err(e) = read_stream(addr, api, body, request_id, live, start, &mut out) {
        out.read_error = Some(format!("{e:#}"));
    }
    out.elapsed_ms = start.elapsed().as_millis() as u64;
    out
}

fn read_stream(
    addr: SocketAddr,
    api: Api,
    body: &Value,
    request_id: &str,
    live: &Live,
    start: Instant,
    out: &mut Collected,
) -> anyhow::Result<()> {
    let mut conn = TcpStream::connect(addr)?;
    conn.set_read_timeout(Some(CLIENT_READ_TIMEOUT))?;
    conn.set_nodelay(true)?;
    let payload = body.to_string();
    let head = format!(
        "POST {} HTTP/1.1\r\nHost: lmstack\r\nContent-Type: application/json\r\nx-request-id: {request_id}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        api.path(),
        payload.len()
    );
    conn.write_all(head.as_bytes())?;
    conn.write_all(payload.as_bytes())?;
    let mut buf: Vec<u8> = Vec::new();
    let mut chunk = [0u8; 16 * 1024];
    let mut fill = |buf: &mut Vec<u8>| -> anyhow::Result<bool> {
        let n = conn.read(&mut chunk)?;
        buf.extend_from_slice(&chunk[..n]);
        Ok(n > 0)
    };
    let head_end = loop {
        if let Some(i) = find(&buf, b"\r\n\r\n") {
            break i;
        }
        if !fill(&mut buf)? {
            bail!("closed before the response head");
        }
    };
    let head = String::from_utf8_lossy(&buf[..head_end]).into_owned();
    buf.drain(..head_end + 4);
    out.status = head.split_whitespace().nth(1).and_then(|s| s.parse().ok()).unwrap_or(0);
    let header = |name: &str| {
        head.lines().skip(1).find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.trim().eq_ignore_ascii_case(name).then(|| v.trim().to_owned())
        })
    };
    if let Some(route) = header("x-lmstack-route")
        && let Some(at) = route.find("endpoint=")
    {
        let endpoint: String = route[at + 9..].chars().take_while(|c| *c != ';').collect();
        let _ = live.endpoint.set(endpoint.trim().trim_end_matches('/').to_owned());
    }
    anyhow::ensure!(
        header("transfer-encoding").is_some_and(|t| t.eq_ignore_ascii_case("chunked")),
        "not a chunked response: {head}"
    );
    let mut body: Vec<u8> = Vec::new();
    let mut scanned = 0;
    loop {
        let Some(line_end) = find(&buf, b"\r\n") else {
            if !fill(&mut buf)? {
                return Ok(());
            }
            continue;
        };
        let line = String::from_utf8_lossy(&buf[..line_end]).into_owned();
        let size = usize::from_str_radix(line.split(';').next().unwrap_or("").trim(), 16)
            .with_context(|| format!("a chunk size: {line:?}"))?;
        while buf.len() < line_end + 2 + size + 2 {
            if !fill(&mut buf)? {
                body.extend_from_slice(&buf[(line_end + 2).min(buf.len())..]);
                out.raw = String::from_utf8_lossy(&body).into_owned();
                return Ok(());
            }
        }
        if size == 0 {
            out.complete = true;
            return Ok(());
        }
        body.extend_from_slice(&buf[line_end + 2..line_end + 2 + size]);
        buf.drain(..line_end + 2 + size + 2);
        while let Some(i) = find(&body[scanned..], b"\n\n") {
            let event = &body[scanned..scanned + i];
            scanned += i + 2;
            out.arrivals_ms.push(start.elapsed().as_millis() as u64);
            if event == b"data: [DONE]" {
                live.done.store(true, Ordering::SeqCst);
            } else {
                live.events.fetch_add(1, Ordering::SeqCst);
            }
        }
        out.raw = String::from_utf8_lossy(&body).into_owned();
    }
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

/// A client's view of an SSE body.
#[derive(Default)]
struct Parsed {
    /// Content (chat) or text (completions), concatenated.
    text: String,
    /// Where each event's text starts in `text`, in chars (events with text only).
    event_starts: Vec<usize>,
    /// Each token event's text, empty ones included (vLLM sends one event a token, its text
    /// empty while it holds back the bytes of an incomplete character); not chat's role event.
    token_texts: Vec<String>,
    ids: BTreeSet<String>,
    roles: usize,
    done: usize,
    after_done: usize,
    errors: Vec<Value>,
    usage: Option<Value>,
    /// Events that are not `data: <JSON>` lines.
    malformed: usize,
    /// Events carrying token ids the client did not ask for.
    ids_shown: usize,
}

fn parse(raw: &str) -> Parsed {
    let mut p = Parsed::default();
    for event in raw.split("\n\n").filter(|e| !e.trim().is_empty()) {
        if p.done > 0 {
            p.after_done += 1;
        }
        let Some(data) = event.strip_prefix("data: ") else {
            p.malformed += 1;
            continue;
        };
        if data == "[DONE]" {
            p.done += 1;
            continue;
        }
        let Ok(v) = serde_json::from_str::<Value>(data) else {
            p.malformed += 1;
            continue;
        };
        if v.get("error").is_some() {
            p.errors.push(v);
            continue;
        }
        if let Some(id) = v["id"].as_str() {
            p.ids.insert(id.to_owned());
        }
        if !v["usage"].is_null() {
            p.usage = Some(v["usage"].clone());
        }
        if !v["prompt_token_ids"].is_null() {
            p.ids_shown += 1;
        }
        for c in v["choices"].as_array().into_iter().flatten() {
            if !c["token_ids"].is_null() || !c["prompt_token_ids"].is_null() {
                p.ids_shown += 1;
            }
            let t = c["text"].as_str().or(c["delta"]["content"].as_str()).unwrap_or("");
            if c["delta"].get("role").is_some() {
                p.roles += 1;
            } else {
                p.token_texts.push(t.to_owned());
            }
            if !t.is_empty() {
                p.event_starts.push(p.text.chars().count());
                p.text.push_str(t);
            }
        }
    }
    p
}

/// Where `got` first differs from `want`, in chars, with a little of both around it.
fn first_difference(want: &str, got: &str) -> Option<(usize, String, String)> {
    let (w, g): (Vec<char>, Vec<char>) = (want.chars().collect(), got.chars().collect());
    let at = (0..w.len().max(g.len())).find(|&i| w.get(i) != g.get(i))?;
    let around = |s: &[char]| -> String {
        s[at.saturating_sub(16).min(s.len())..(at + 24).min(s.len())]
            .iter()
            .collect()
    };
    Some((at, around(&w), around(&g)))
}

/// From lmstack's log: per request id, the errors that cut it and the tokens sent before each
/// continuation.
#[derive(Default)]
struct Cuts {
    errors: BTreeMap<String, Vec<String>>,
    resumed_at: BTreeMap<String, Vec<u64>>,
}

fn cuts(log: &str) -> Cuts {
    let field = |line: &str, key: &str| -> Option<String> {
        let at = line.find(key)? + key.len();
        let rest = &line[at..];
        Some(match rest.strip_prefix('"') {
            Some(q) => q.chars().take_while(|c| *c != '"').collect(),
            None => rest.chars().take_while(|c| !c.is_whitespace()).collect(),
        })
    };
    let mut c = Cuts::default();
    for line in log.lines() {
        let Some(id) = field(line, "request_id=") else {
            continue;
        };
        if let Some(at) = line.find("response cut: ") {
            c.errors.entry(id).or_default().push(line[at + 14..].to_owned());
        } else if line.contains("resuming the stream on another endpoint") {
            let tokens = field(line, "tokens=").and_then(|t| t.parse().ok()).unwrap_or(0);
            c.resumed_at.entry(id).or_default().push(tokens);
        }
    }
    c
}

fn text_of(url: &str) -> String {
    agent()
        .get(url)
        .call()
        .ok()
        .and_then(|mut r| r.body_mut().read_to_string().ok())
        .unwrap_or_default()
}

fn wait(what: &str, limit: Duration, mut f: impl FnMut() -> bool) -> anyhow::Result<Duration> {
    let start = Instant::now();
    while start.elapsed() < limit {
        if f() {
            return Ok(start.elapsed());
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    bail!("timed out after {limit:?} waiting for {what}")
}

pub fn run(args: &RealFailoverArgs) -> anyhow::Result<()> {
    let script = args
        .script
        .clone()
        .unwrap_or_else(|| root().join("../shared/tools/real-vllm.sh"));
    anyhow::ensure!(
        script.exists(),
        "{} is missing: this check needs the workplace's real-vllm.sh (set LMSTACK_REAL_VLLM)",
        script.display()
    );
    anyhow::ensure!(args.ports.len() == 2, "--ports takes two ports");
    anyhow::ensure!(
        (args.kill_after_events as u64) < args.max_tokens,
        "--kill-after-events must be below --max-tokens"
    );
    let mut build = crate::cargo();
    build.args(["build", "--release", "-p", "lmstack"]);
    run_cmd(&mut build)?;
    let bins = crate::target_dir().join("release");
    let engines = Engines { script };
    engines.start(&args.ports, 0)?;
    let urls: Vec<String> = args.ports.iter().map(|p| format!("http://127.0.0.1:{p}")).collect();
    let version: Value = serde_json::from_str(&text_of(&format!("{}/version", urls[0]))).unwrap_or(Value::Null);

    let mut rounds = Vec::new();
    for round in 0..args.rounds {
        let victim = round % 2;
        if round > 0 {
            // The previous victim, started again on its own core.
            engines.start(&args.ports[1 - victim..2 - victim], 1 - victim)?;
        }
        rounds.push(one_round(args, &engines, &bins, &urls, round, victim)?);
    }

    let summary = summarize(&rounds);
    let report = json!({
        "scenario": "real-failover",
        "vllm_version": version["version"],
        "settings": {
            "engines": urls,
            "model": MODEL,
            "engine_layout": "real-vllm.sh, SINGLE_PROCESS=1, one core per engine, --enforce-eager, float32",
            "requests_per_round": args.requests,
            "rounds": args.rounds,
            "max_tokens": args.max_tokens,
            "sampling": {"temperature": 0, "ignore_eos": true, "repetition_penalty": args.repetition_penalty},
            "kill_after_events": args.kill_after_events,
            "router_flags": router_flags(args),
            "cores": std::thread::available_parallelism().map_or(1, |n| n.get()),
            "commit": Command::new("git").args(["rev-parse", "--short", "HEAD"]).current_dir(root()).output()
                .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned()).unwrap_or_default(),
        },
        "summary": summary,
        "rounds": rounds,
    });
    print_summary(&report);
    let date = Command::new("date").arg("+%Y-%m-%d").output()?;
    let stem = format!(
        "{}-real-failover{}",
        String::from_utf8_lossy(&date.stdout).trim(),
        args.tag.as_deref().map(|t| format!("-{t}")).unwrap_or_default()
    );
    let path = root().join("perf/results").join(format!("{stem}.json"));
    std::fs::write(&path, serde_json::to_string_pretty(&report)?)?;
    let svg = path.with_extension("svg");
    let (title, columns, panels) = figure(&report);
    crate::perf::plot::figure(&svg, &title, columns, &panels)?;
    println!("wrote {} and {}", path.display(), svg.display());
    let broken = report["summary"]["broken_streams"].as_u64().unwrap_or(0);
    let miscounted = report["summary"]["usage_wrong"].as_u64().unwrap_or(0);
    let shown = report["summary"]["token_ids_shown"].as_u64().unwrap_or(0);
    let echoed = report["summary"]["prompt_echoed"].as_u64().unwrap_or(0);
    if broken + miscounted + shown + echoed > 0 {
        bail!(
            "{broken} streams neither whole nor ended with an error event, {miscounted} whole streams with wrong usage, {shown} with token ids the client did not ask for, {echoed} holding their prompt's text (see {})",
            path.display()
        );
    }
    Ok(())
}

fn router_flags(args: &RealFailoverArgs) -> Vec<String> {
    [
        "--routing-logic",
        "round_robin",
        "--explain-routing",
        "--health-check-interval-ms",
        HEALTH_INTERVAL_MS,
        "--stream-idle-timeout-ms",
        &args.stream_idle_timeout_ms.to_string(),
        "--stream-head-timeout-ms",
        "10000",
    ]
    .iter()
    .map(|s| (*s).to_owned())
    .collect()
}

fn one_round(
    args: &RealFailoverArgs,
    engines: &Engines,
    bins: &std::path::Path,
    urls: &[String],
    round: usize,
    victim: usize,
) -> anyhow::Result<Value> {
    let requests: Vec<(Api, Value)> = (0..args.requests).map(|i| request(round, i, args)).collect();
    let (victim_url, survivor_url) = (&urls[victim], &urls[1 - victim]);

    // 1. References, each engine answering one request at a time (the two in parallel).
    let started = Instant::now();
    let references: Vec<Vec<Answer>> = std::thread::scope(|s| {
        let handles: Vec<_> = urls
            .iter()
            .map(|u| {
                let requests = &requests;
                s.spawn(move || {
                    let http = agent();
                    requests
                        .iter()
                        .map(|(api, body)| whole_answer(&http, u, *api, body))
                        .collect::<anyhow::Result<Vec<_>>>()
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().map_err(|_| anyhow::anyhow!("a reference thread panicked"))?)
            .collect::<anyhow::Result<Vec<_>>>()
    })?;
    let mut disagreements = Vec::new();
    for (i, (a, b)) in references[0].iter().zip(&references[1]).enumerate() {
        if a.ids != b.ids || a.text != b.text {
            let at = a.ids.iter().zip(&b.ids).position(|(x, y)| x != y);
            disagreements.push(json!({"request": i, "api": requests[i].0.name(), "first_differing_token": at}));
        }
        anyhow::ensure!(
            a.completion_tokens == args.max_tokens && b.completion_tokens == args.max_tokens,
            "request {i}: the engines answered {} and {} tokens, not {}",
            a.completion_tokens,
            b.completion_tokens,
            args.max_tokens
        );
    }
    let distinct: Vec<f64> = references[0]
        .iter()
        .map(|a| a.ids.iter().collect::<BTreeSet<_>>().len() as f64 / a.ids.len().max(1) as f64)
        .collect();
    println!(
        "round {round}: references in {:?}; the engines agree on {}/{}",
        started.elapsed(),
        requests.len() - disagreements.len(),
        requests.len()
    );

    // 2. Every request streamed through lmstack at once; the victim killed mid-stream.
    let flags = router_flags(args);
    let flag_refs: Vec<&str> = flags.iter().map(String::as_str).collect();
    let router: Proc = start_router(bins, 0, urls, &flag_refs);
    let ru = router.url();
    wait("lmstack healthy", Duration::from_secs(60), || {
        agent()
            .get(format!("{ru}/health"))
            .call()
            .is_ok_and(|r| r.status() == 200)
    })?;
    let live: Vec<Live> = (0..requests.len()).map(|_| Live::default()).collect();
    let rid = |i: usize| format!("rf-{round}-{i}");
    let (collected, kill_ms) = std::thread::scope(|s| -> anyhow::Result<(Vec<Collected>, u64)> {
        let t0 = Instant::now();
        let handles: Vec<_> = requests
            .iter()
            .enumerate()
            .map(|(i, (api, body))| {
                let (live, addr, id) = (&live[i], router.addr, rid(i));
                s.spawn(move || stream(addr, *api, body, &id, live))
            })
            .collect();
        // Once every stream has its head and each on the victim has some events.
        let ready = wait("streams under way on the victim", Duration::from_secs(120), || {
            live.iter()
                .all(|l| l.endpoint.get().is_some() || l.done.load(Ordering::SeqCst))
                && live
                    .iter()
                    .filter(|l| l.endpoint.get() == Some(victim_url))
                    .all(|l| l.events.load(Ordering::SeqCst) > args.kill_after_events || l.done.load(Ordering::SeqCst))
        });
        let snapshot: Vec<(usize, bool)> = live
            .iter()
            .map(|l| (l.events.load(Ordering::SeqCst), l.done.load(Ordering::SeqCst)))
            .collect();
        let killed = engines.kill(args.ports[victim]);
        let kill_ms = t0.elapsed().as_millis() as u64;
        let mut out = Vec::new();
        for (h, at) in handles.into_iter().zip(snapshot) {
            let mut c = h.join().map_err(|_| anyhow::anyhow!("a client thread panicked"))?;
            c.at_kill = Some(at);
            out.push(c);
        }
        ready?;
        killed?;
        Ok((out, kill_ms))
    })?;

    // 3. What lmstack says happened, then each stream checked.
    let log_cuts = cuts(&router.log_text());
    let cut_streams = log_cuts.errors.len() as f64;
    let metrics = {
        let mut m = String::new();
        let _ = wait("the resume outcomes counted", Duration::from_secs(5), || {
            m = text_of(&format!("{ru}/metrics"));
            metric_sum(&m, "lmstack_stream_resumes_total", &[]) >= cut_streams
        });
        m
    };
    let mut outcomes = serde_json::Map::new();
    for line in metrics
        .lines()
        .filter(|l| l.starts_with("lmstack_stream_resumes_total{"))
    {
        if let (Some(at), Some(v)) = (line.find("outcome=\""), line.rsplit(' ').next()) {
            let outcome: String = line[at + 9..].chars().take_while(|c| *c != '"').collect();
            let n = v.parse::<f64>().unwrap_or(0.0) + outcomes.get(&outcome).and_then(Value::as_f64).unwrap_or(0.0);
            outcomes.insert(outcome, json!(n));
        }
    }
    drop(router);

    let http = agent();
    let mut streams = Vec::new();
    for (i, ((api, body), c)) in requests.iter().zip(&collected).enumerate() {
        let p = parse(&c.raw);
        let endpoint = live[i].endpoint.get().cloned().unwrap_or_default();
        let on_victim = endpoint == *victim_url;
        let reference = &references[if on_victim { victim } else { 1 - victim }][i];
        let id = rid(i);
        let cut_by = log_cuts.errors.get(&id).cloned().unwrap_or_default();
        let resumed_at = log_cuts.resumed_at.get(&id).cloned().unwrap_or_default();
        let affected = !cut_by.is_empty();
        let whole = c.status == 200
            && c.complete
            && c.read_error.is_none()
            && p.done == 1
            && p.after_done == 0
            && p.errors.is_empty()
            && p.malformed == 0
            && p.ids.len() == 1
            && (*api == Api::Completions || p.roles == 1);
        let error_ended =
            !whole && c.status == 200 && c.complete && !p.errors.is_empty() && p.done == 1 && p.after_done == 0;
        let usage = p.usage.clone().unwrap_or(Value::Null);
        let completion_tokens = usage["completion_tokens"].as_u64();
        let usage_ok = completion_tokens == Some(args.max_tokens)
            && usage["prompt_tokens"].as_u64() == Some(reference.prompt_tokens)
            && usage["total_tokens"].as_u64() == Some(reference.prompt_tokens + args.max_tokens);
        let exact = p.text == reference.text;
        let exact_either = references.iter().any(|r| r[i].text == p.text);
        let (events_at_kill, done_at_kill) = c.at_kill.unwrap_or((0, false));
        // The client's text holding the prompt: a continuation's engine echoing it.
        let prompt = match api {
            Api::Completions => body["prompt"].as_str(),
            Api::Chat => body["messages"][1]["content"].as_str(),
        };
        let prompt_echoed = prompt.is_some_and(|t| p.text.contains(t));
        // Token events just before the first cut whose text the engine had held back.
        let held_back = resumed_at.first().map_or(0, |&k| {
            let k = usize::try_from(k).unwrap_or(0).min(p.token_texts.len());
            p.token_texts[..k].iter().rev().take_while(|t| t.is_empty()).count()
        });
        // The largest silence the client saw: where the continuation took over.
        let gap_ms = c.arrivals_ms.windows(2).map(|w| w[1] - w[0]).max().unwrap_or(0);
        let mut s = json!({
            "index": i,
            "api": api.name(),
            "endpoint": endpoint,
            "on_victim": on_victim,
            "affected": affected,
            "events_at_kill": events_at_kill,
            "done_at_kill": done_at_kill,
            "whole": whole,
            "error_ended": error_ended,
            "usage_ok": usage_ok,
            "exact": exact,
            "exact_either_engine": exact_either,
            "token_ids_shown": p.ids_shown,
            "prompt_echoed": prompt_echoed,
            "held_back_at_cut": held_back,
            "largest_gap_ms": gap_ms,
        });
        if affected {
            s["cut_by"] = json!(cut_by);
            s["resumed_at_tokens"] = json!(resumed_at);
        }
        if !whole {
            s["framing"] = json!({
                "status": c.status, "complete": c.complete, "read_error": c.read_error,
                "done_events": p.done, "after_done": p.after_done, "malformed": p.malformed,
                "ids": p.ids.len(), "roles": p.roles, "error_events": p.errors,
            });
        }
        if !usage_ok {
            s["usage"] = usage;
        }
        if let Some((at, want, got)) = first_difference(&reference.text, &p.text) {
            let event = p.event_starts.iter().rposition(|&start| start <= at).unwrap_or(0);
            s["first_difference"] = json!({"char": at, "event": event, "reference": want, "stream": got});
        }
        if affected && whole && !exact && resumed_at.len() == 1 {
            s["replay"] = replay(
                &http,
                survivor_url,
                *api,
                body,
                &references[victim][i],
                resumed_at[0],
                &p.text,
                args,
            )
            .unwrap_or_else(|e| json!({"error": format!("{e:#}")}));
        }
        // The evidence: the whole body of a stream that went wrong, the events around the
        // cut of one that differs as vLLM's own continuation does.
        let explained = s["replay"]["stream_equals_replay"] == true;
        let bad = !(whole || error_ended)
            || (whole && !usage_ok)
            || p.ids_shown > 0
            || prompt_echoed
            || (affected && !exact && !explained);
        if bad {
            s["raw"] = json!(c.raw);
        } else if explained {
            let k = resumed_at.first().map_or(0, |&k| usize::try_from(k).unwrap_or(0));
            let events: Vec<&str> = c.raw.split("\n\n").filter(|e| !e.trim().is_empty()).collect();
            let around = &events[k.saturating_sub(1).min(events.len())..(k + 3).min(events.len())];
            s["raw_at_cut"] = json!(around);
        }
        streams.push(s);
    }
    Ok(json!({
        "round": round,
        "victim": victim_url,
        "survivor": survivor_url,
        "kill_at_ms": kill_ms,
        "references": {
            "requests": requests.len(),
            "engines_agree": requests.len() - disagreements.len(),
            "disagreements": disagreements,
        },
        "reference_distinct_token_share_min": distinct.iter().copied().fold(1.0, f64::min),
        "cut_streams_in_log": cut_streams,
        "resume_outcomes": outcomes,
        "streams": streams,
    }))
}

/// The continuation lmstack should have asked for after `k` tokens of the victim's answer,
/// sent to the survivor directly (alone): whether the stream equals the victim's first `k`
/// tokens followed by the survivor's own answer to it.
#[expect(clippy::too_many_arguments, reason = "one call site, each argument named there")]
fn replay(
    http: &ureq::Agent,
    survivor: &str,
    api: Api,
    body: &Value,
    first: &Answer,
    k: u64,
    stream_text: &str,
    args: &RealFailoverArgs,
) -> anyhow::Result<Value> {
    let k = usize::try_from(k)?.min(first.ids.len());
    let mut detok = http
        .post(format!("{survivor}/detokenize"))
        .send_json(json!({"model": MODEL, "tokens": first.ids[..k]}))?;
    let prefix: Value = serde_json::from_str(&detok.body_mut().read_to_string()?)?;
    let prefix = prefix["prompt"].as_str().unwrap_or_default().to_owned();
    let mut next = body.clone();
    next["max_tokens"] = json!(args.max_tokens - k as u64);
    match api {
        Api::Completions => {
            let prompt: Vec<u64> = first.prompt_ids.iter().chain(&first.ids[..k]).copied().collect();
            next["prompt"] = json!(prompt);
        }
        Api::Chat => {
            if let Some(m) = next["messages"].as_array_mut() {
                m.push(json!({"role": "assistant", "content": prefix}));
            }
            next["add_generation_prompt"] = json!(false);
            next["continue_final_message"] = json!(true);
        }
    }
    // Chat continues on the text: whether it tokenizes back to the tokens generated.
    let retokenized = if api == Api::Chat {
        let mut t = http.post(format!("{survivor}/tokenize")).send_json(json!({
            "model": MODEL, "messages": next["messages"],
            "add_generation_prompt": false, "continue_final_message": true,
        }))?;
        let t: Value = serde_json::from_str(&t.body_mut().read_to_string()?)?;
        let generated: Vec<u64> = first.prompt_ids.iter().chain(&first.ids[..k]).copied().collect();
        json!(ids(&t["tokens"]) == generated)
    } else {
        json!(true)
    };
    let rest = whole_answer(http, survivor, api, &next)?;
    let expected = format!("{prefix}{}", rest.text);
    let mut v = json!({
        "tokens_before_cut": k,
        "first_part_as_reference": stream_text.starts_with(&prefix),
        "stream_equals_replay": stream_text == expected,
        "continuation_equals_reference": first.ids[k..] == rest.ids[..],
        "prompt_tokenizes_as_generated": retokenized,
        "continuation_tokens": rest.completion_tokens,
    });
    if let Some((at, want, got)) = first_difference(&expected, stream_text) {
        v["first_difference_from_replay"] = json!({"char": at, "replay": want, "stream": got});
    }
    Ok(v)
}

/// Totals per API, affected and not, over every round.
fn summarize(rounds: &[Value]) -> Value {
    let streams: Vec<&Value> = rounds
        .iter()
        .flat_map(|r| r["streams"].as_array().into_iter().flatten())
        .collect();
    let group = |api: &str, affected: bool| {
        let g: Vec<&&Value> = streams
            .iter()
            .filter(|s| s["api"] == api && s["affected"] == affected)
            .collect();
        let count = |f: &dyn Fn(&Value) -> bool| g.iter().filter(|s| f(s)).count();
        json!({
            "streams": g.len(),
            "whole": count(&|s| s["whole"] == true),
            "whole_usage_ok": count(&|s| s["whole"] == true && s["usage_ok"] == true),
            "whole_exact": count(&|s| s["whole"] == true && s["usage_ok"] == true && s["exact"] == true),
            "exact_either_engine": count(&|s| s["whole"] == true && s["exact_either_engine"] == true),
            "equal_to_replay": count(&|s| s["replay"]["stream_equals_replay"] == true),
            "error_ended": count(&|s| s["error_ended"] == true),
            "prompt_echoed": count(&|s| s["prompt_echoed"] == true),
            "held_back_at_cut": count(&|s| s["held_back_at_cut"].as_u64().unwrap_or(0) > 0),
            "chat_retokenized_otherwise": count(&|s| s["replay"]["prompt_tokenizes_as_generated"] == false),
            "broken": count(&|s| s["whole"] != true && s["error_ended"] != true),
            "largest_gap_ms_max": g.iter().filter_map(|s| s["largest_gap_ms"].as_u64()).max(),
        })
    };
    let mut outcomes = serde_json::Map::new();
    for r in rounds {
        for (k, v) in r["resume_outcomes"].as_object().into_iter().flatten() {
            let n = v.as_f64().unwrap_or(0.0) + outcomes.get(k).and_then(Value::as_f64).unwrap_or(0.0);
            outcomes.insert(k.clone(), json!(n));
        }
    }
    let count = |f: &dyn Fn(&Value) -> bool| streams.iter().filter(|s| f(s)).count();
    let affected = count(&|s| s["affected"] == true);
    let affected_ok =
        count(&|s| s["affected"] == true && s["whole"] == true && s["usage_ok"] == true && s["exact"] == true);
    json!({
        "streams": streams.len(),
        "affected": affected,
        "affected_whole_usage_ok": count(&|s| s["affected"] == true && s["whole"] == true && s["usage_ok"] == true),
        "affected_differing_as_vllm_continues": count(&|s| s["affected"] == true && s["replay"]["stream_equals_replay"] == true),
        "affected_whole_exact_share": if affected > 0 { affected_ok as f64 / affected as f64 } else { 0.0 },
        "affected_rest_error_ended": count(&|s| s["affected"] == true && !(s["whole"] == true && s["usage_ok"] == true && s["exact"] == true) && s["error_ended"] == true),
        "on_victim_unfinished_at_kill": count(&|s| s["on_victim"] == true && s["done_at_kill"] == false),
        "broken_streams": count(&|s| s["whole"] != true && s["error_ended"] != true),
        "usage_wrong": count(&|s| s["whole"] == true && s["usage_ok"] != true),
        "token_ids_shown": count(&|s| s["token_ids_shown"].as_u64().unwrap_or(0) > 0),
        "prompt_echoed": count(&|s| s["prompt_echoed"] == true),
        "references_engines_agree": rounds.iter().filter_map(|r| r["references"]["engines_agree"].as_u64()).sum::<u64>(),
        "references": rounds.iter().filter_map(|r| r["references"]["requests"].as_u64()).sum::<u64>(),
        "resume_outcomes": outcomes,
        "completions": {"affected": group("completions", true), "unaffected": group("completions", false)},
        "chat": {"affected": group("chat", true), "unaffected": group("chat", false)},
    })
}

fn print_summary(report: &Value) {
    let s = &report["summary"];
    println!(
        "{} streams, {} affected (lmstack's resume outcomes {}); references: the engines agree on {}/{}",
        s["streams"], s["affected"], s["resume_outcomes"], s["references_engines_agree"], s["references"]
    );
    for api in ["completions", "chat"] {
        for group in ["affected", "unaffected"] {
            let g = &s[api][group];
            println!(
                "  {api:11} {group:10}: {} streams, {} whole, {} with exact usage, {} exact, {} as the engine's own continuation, {} error-ended, {} broken, {} echoing the prompt ({} cut after held-back text), largest gap {} ms",
                g["streams"],
                g["whole"],
                g["whole_usage_ok"],
                g["whole_exact"],
                g["equal_to_replay"],
                g["error_ended"],
                g["broken"],
                g["prompt_echoed"],
                g["held_back_at_cut"],
                g["largest_gap_ms_max"]
            );
        }
    }
}

/// The figure of a `real-failover` report: per API, affected and unaffected streams, the
/// share whole, exact and ended with an error event; and the streams counted.
pub fn figure(report: &Value) -> (String, usize, Vec<crate::perf::plot::Panel>) {
    use crate::perf::plot::{Panel, Series};
    let s = &report["summary"];
    let groups = [
        ("completions", "affected"),
        ("completions", "unaffected"),
        ("chat", "affected"),
        ("chat", "unaffected"),
    ];
    let categories: Vec<String> = groups.iter().map(|(a, g)| format!("{a}, {g}")).collect();
    let share = |key: &str| {
        groups
            .iter()
            .map(|(a, g)| {
                let n = s[a][g]["streams"].as_f64().unwrap_or(0.0);
                if n > 0.0 {
                    s[a][g][key].as_f64().unwrap_or(0.0) / n
                } else {
                    f64::NAN
                }
            })
            .collect()
    };
    let counts = |key: &str| {
        groups
            .iter()
            .map(|(a, g)| s[a][g][key].as_f64().unwrap_or(0.0))
            .collect()
    };
    let panels = vec![
        Panel::Bars {
            title: "share of streams".into(),
            y_label: "share".into(),
            categories: categories.clone(),
            series: vec![
                Series::new("whole", share("whole")),
                Series::new("exact (text, usage)", share("whole_exact")),
                Series::new("differs as vLLM continues it", share("equal_to_replay")),
                Series::new("error event", share("error_ended")),
            ],
        },
        Panel::Bars {
            title: "streams".into(),
            y_label: "streams".into(),
            categories,
            series: vec![
                Series::new("streams", counts("streams")),
                Series::new("broken", counts("broken")),
                Series::new("prompt echoed", counts("prompt_echoed")),
            ],
        },
    ];
    let title = format!(
        "an engine killed mid-stream (real vLLM {}): {} of {} streams affected, {:.0}% of them whole and exact",
        report["vllm_version"].as_str().unwrap_or("?"),
        s["affected"],
        s["streams"],
        s["affected_whole_exact_share"].as_f64().unwrap_or(0.0) * 100.0
    );
    (title, 2, panels)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_stitched_body_parses_into_one_text_with_its_framing() {
        let raw = concat!(
            "data: {\"id\":\"c1\",\"choices\":[{\"delta\":{\"role\":\"assistant\",\"content\":\"\"}}]}\n\n",
            "data: {\"id\":\"c1\",\"choices\":[{\"delta\":{\"content\":\"ab\"},\"token_ids\":null}]}\n\n",
            "data: {\"id\":\"c1\",\"choices\":[{\"delta\":{\"content\":\"\"}}]}\n\n",
            "data: {\"id\":\"c1\",\"choices\":[{\"delta\":{\"content\":\"cd\"},\"token_ids\":[7]}]}\n\n",
            "data: {\"id\":\"c1\",\"choices\":[],\"usage\":{\"completion_tokens\":3}}\n\n",
            "data: [DONE]\n\n",
        );
        let p = parse(raw);
        assert_eq!(p.text, "abcd");
        assert_eq!((p.roles, p.done, p.after_done, p.malformed), (1, 1, 0, 0));
        assert_eq!(p.token_texts, ["ab", "", "cd"]);
        assert_eq!(p.event_starts, [0, 2]);
        assert_eq!(p.ids_shown, 1);
        assert_eq!(p.usage.unwrap()["completion_tokens"], 3);
    }

    #[test]
    fn an_error_event_and_events_after_done_are_counted() {
        let p = parse("data: {\"error\":{\"message\":\"x\"}}\n\ndata: [DONE]\n\ndata: [DONE]\n\nnot sse\n\n");
        assert_eq!((p.errors.len(), p.done, p.after_done, p.malformed), (1, 2, 2, 1));
    }

    #[test]
    fn the_first_difference_is_found_in_chars() {
        assert_eq!(first_difference("same", "same"), None);
        let (at, want, got) = first_difference("héllo world", "héllo there").unwrap();
        assert_eq!((at, want.as_str(), got.as_str()), (6, "héllo world", "héllo there"));
        assert_eq!(first_difference("abc", "ab").unwrap().0, 2);
    }

    #[test]
    fn the_log_names_cut_streams_and_where_they_resumed() {
        let log = concat!(
            "2026-12-03T19:23:33Z  WARN lmstack::proxy: response cut: upstream_reset: closed request_id=\"rf-0-3\" endpoint=http://a\n",
            "2026-12-03T19:23:33Z  INFO lmstack::proxy: resuming the stream on another endpoint request_id=\"rf-0-3\" tokens=17\n",
            "2026-12-03T19:23:34Z  INFO lmstack::proxy: something else request_id=\"rf-0-4\"\n",
        );
        let c = cuts(log);
        assert_eq!(c.errors.len(), 1);
        assert!(c.errors["rf-0-3"][0].starts_with("upstream_reset"));
        assert_eq!(c.resumed_at["rf-0-3"], [17]);
    }

    #[test]
    fn the_figure_names_each_group() {
        let group = json!({"streams": 10, "whole": 10, "whole_exact": 9, "equal_to_replay": 1,
                           "error_ended": 0, "broken": 0, "prompt_echoed": 0});
        let report = json!({"vllm_version": "0.32.0", "summary": {
            "streams": 40, "affected": 20, "affected_whole_exact_share": 0.9,
            "completions": {"affected": group, "unaffected": group},
            "chat": {"affected": group, "unaffected": group}}});
        let (title, columns, panels) = figure(&report);
        let svg = std::env::temp_dir().join(format!("real-failover-{}.svg", std::process::id()));
        crate::perf::plot::figure(&svg, &title, columns, &panels).unwrap();
        let text = std::fs::read_to_string(&svg).unwrap();
        let _ = std::fs::remove_file(&svg);
        for label in [
            "completions, affected",
            "chat, unaffected",
            "prompt echoed",
            "90% of them whole and exact",
        ] {
            assert!(text.contains(label), "{label:?} missing");
        }
    }
}
