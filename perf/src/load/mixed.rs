//! `lmstack-load mixed`: checked traffic of several kinds at once, for soaks, many open
//! streams and upgrades: non-streaming completions, streaming completions, streaming chat,
//! and clients that leave mid-stream (they close the connection after a few events).
//!
//! Every response is checked, and whatever is not a clean success is an error, counted by
//! kind (a refused connect, a request that failed before any response byte on a reused or a
//! fresh connection, a status other than 2xx, a body cut short, a stream without `[DONE]` or
//! with an error event, a timeout). Deliberate leaves are counted apart. Like any careful
//! client it reconnects after a response that says `connection: close`, and when a kept-alive
//! connection turns out closed before a request is written to it (nothing was sent, so that
//! is no failure: it is counted as a stale connection); a request written to a reused
//! connection that fails before any response byte is an error, not retried.
//!
//! Not a benchmark of the router's speed (that is `bench`): requests can be paced
//! (`--rate`), and the summary keeps a per-second timeline for the figures of
//! `cargo xtask perf`.

use std::collections::BTreeMap;
use std::str::FromStr;
use std::sync::Arc;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use clap::Args;
use hdrhistogram::Histogram;
use http_body_util::{BodyExt, Full};
use hyper::Request;
use hyper::client::conn::http1;
use hyper_util::rt::TokioIo;
use serde::Serialize;
use tokio::net::TcpStream;

use super::Percentiles;

/// One kind of request.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Kind {
    /// Non-streaming `/v1/completions`.
    Completions,
    /// Streaming `/v1/completions`.
    Stream,
    /// Streaming `/v1/chat/completions`.
    Chat,
    /// A streaming `/v1/completions` whose client closes the connection after
    /// `--leave-after-events` events.
    Leave,
}

impl Kind {
    const ALL: [Kind; 4] = [Kind::Completions, Kind::Stream, Kind::Chat, Kind::Leave];

    fn name(self) -> &'static str {
        match self {
            Kind::Completions => "completions",
            Kind::Stream => "stream",
            Kind::Chat => "chat",
            Kind::Leave => "leave",
        }
    }
}

/// Weights of the kinds: `completions=4,stream=3,chat=2,leave=1`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Mix(Vec<(Kind, u32)>);

impl FromStr for Mix {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let mut mix = Vec::new();
        for part in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            let (name, weight) = part
                .split_once('=')
                .ok_or_else(|| format!("{part:?}: expected KIND=WEIGHT"))?;
            let kind = Kind::ALL
                .into_iter()
                .find(|k| k.name() == name.trim())
                .ok_or_else(|| format!("{name:?}: kinds are completions, stream, chat, leave"))?;
            let weight: u32 = weight
                .trim()
                .parse()
                .map_err(|e| format!("{part:?}: the weight is a whole number: {e}"))?;
            if mix.iter().any(|(k, _)| *k == kind) {
                return Err(format!("{name:?} given twice"));
            }
            if weight > 0 {
                mix.push((kind, weight));
            }
        }
        if mix.is_empty() {
            return Err("the mix has no kind with a weight above 0".into());
        }
        Ok(Mix(mix))
    }
}

impl Mix {
    /// The kind of the request numbered `ticket`: every run of `sum of weights` tickets
    /// holds each kind as often as its weight, spread over the run.
    fn kind(&self, ticket: u64) -> Kind {
        let total: u64 = self.0.iter().map(|(_, w)| u64::from(*w)).sum();
        // A stride coprime with any small total visits the run's slots in a mixed order.
        let slot = ticket.wrapping_mul(7919) % total;
        let mut acc = 0;
        for (kind, w) in &self.0 {
            acc += u64::from(*w);
            if slot < acc {
                return *kind;
            }
        }
        self.0[0].0
    }
}

#[derive(Clone, Debug, Args)]
pub struct MixedArgs {
    /// Base URL: http://host:port
    #[arg(long)]
    pub url: String,
    /// Model of every request.
    #[arg(long, default_value = "sim-model")]
    pub model: String,
    /// Shares of each kind, `KIND=WEIGHT` comma-separated. Kinds: completions (non-streaming
    /// /v1/completions), stream (streaming /v1/completions), chat (streaming
    /// /v1/chat/completions), leave (a streaming completion whose client closes the
    /// connection after --leave-after-events events).
    #[arg(long, default_value = "completions=4,stream=3,chat=2,leave=1")]
    pub mix: Mix,
    /// Connections, each with one request in flight.
    #[arg(long, default_value_t = 32)]
    pub concurrency: usize,
    /// Requests to send in all (0: no limit, stop after --duration-s).
    #[arg(long, default_value_t = 0)]
    pub requests: u64,
    /// Stop starting requests after this many seconds (0: no limit, stop after --requests).
    #[arg(long, default_value_t = 0.0)]
    pub duration_s: f64,
    /// Requests started per second, all connections together (0: as fast as they go).
    #[arg(long, default_value_t = 0.0)]
    pub rate: f64,
    /// Spread the connections' first requests over this many seconds.
    #[arg(long, default_value_t = 0.0)]
    pub ramp_s: f64,
    /// `max_tokens` of completions, streams and chats.
    #[arg(long, default_value_t = 8)]
    pub max_tokens: usize,
    /// `max_tokens` of the streams whose clients leave (more than --leave-after-events, so
    /// that they leave mid-stream).
    #[arg(long, default_value_t = 32)]
    pub leave_max_tokens: usize,
    /// Data events a leaving client reads before it closes the connection.
    #[arg(long, default_value_t = 2)]
    pub leave_after_events: usize,
    /// A request not finished after this long is an error (and its connection closed).
    #[arg(long, default_value_t = 300.0)]
    pub request_timeout_s: f64,
    /// Prompt of every request.
    #[arg(long, default_value = "Say hello to the load generator.")]
    pub prompt: String,
    /// Print a line of progress to stderr this often, seconds (0: never).
    #[arg(long, default_value_t = 0.0)]
    pub progress_s: f64,
    /// Runtime threads.
    #[arg(long, default_value_t = 1)]
    pub threads: usize,
    /// A name for this run in the output.
    #[arg(long, default_value = "mixed")]
    pub label: String,
    /// Extra request header, `name: value` (repeatable), e.g. an API key.
    #[arg(long = "header")]
    pub headers: Vec<String>,
    /// Print the summary as JSON.
    #[arg(long)]
    pub json: bool,
}

/// Requests of one kind.
#[derive(Clone, Debug, Default, Serialize)]
pub struct KindCounts {
    pub sent: u64,
    pub ok: u64,
    pub left: u64,
    pub errors: u64,
}

/// What happened to the connections.
#[derive(Clone, Debug, Default, Serialize)]
pub struct Connections {
    /// TCP connections opened.
    pub opened: u64,
    /// Responses that said `connection: close` (the connection was then replaced).
    pub closed_by_response: u64,
    /// Kept-alive connections found closed before a request was written to them.
    pub stale: u64,
}

/// One second of the run: requests that finished in it.
#[derive(Clone, Copy, Debug, Default, Serialize)]
pub struct Second {
    pub ok: u64,
    pub errors: u64,
    pub left: u64,
}

#[derive(Clone, Debug, Serialize)]
pub struct MixedSummary {
    pub label: String,
    /// When the first request could start, Unix milliseconds (to line the timeline up with
    /// events outside the load).
    pub started_unix_ms: u64,
    pub seconds: f64,
    pub concurrency: usize,
    pub rate: f64,
    /// Requests finished: ok, left and errors.
    pub requests: u64,
    pub ok: u64,
    pub left: u64,
    pub errors: u64,
    pub kinds: BTreeMap<Kind, KindCounts>,
    pub error_kinds: BTreeMap<String, u64>,
    pub connections: Connections,
    /// Data events read from streams (`[DONE]` not counted).
    pub stream_events: u64,
    /// Streams open at once, at most.
    pub max_open_streams: i64,
    pub latency_ms: Percentiles,
    /// Streams: time to the first data event.
    pub ttft_ms: Percentiles,
    /// Index i: requests that finished in second i of the run.
    pub timeline: Vec<Second>,
}

/// How one request ended.
enum Outcome {
    Ok { ttft: Option<Duration> },
    Left,
    Failed(String),
}

/// Counters every connection adds to (read by the progress line and the summary).
#[derive(Default)]
struct Shared {
    next_ticket: AtomicU64,
    ok: AtomicU64,
    left: AtomicU64,
    errors: AtomicU64,
    open_streams: AtomicI64,
    max_open_streams: AtomicI64,
}

/// What one connection saw; merged into the summary at the end.
struct Recorder {
    latency: Histogram<u64>,
    ttft: Histogram<u64>,
    kinds: BTreeMap<Kind, KindCounts>,
    error_kinds: BTreeMap<String, u64>,
    connections: Connections,
    stream_events: u64,
    timeline: Vec<Second>,
}

impl Recorder {
    fn new() -> anyhow::Result<Self> {
        let h = || Histogram::<u64>::new_with_bounds(1, 3_600_000_000, 3);
        Ok(Self {
            latency: h()?,
            ttft: h()?,
            kinds: BTreeMap::new(),
            error_kinds: BTreeMap::new(),
            connections: Connections::default(),
            stream_events: 0,
            timeline: Vec::new(),
        })
    }

    fn second(&mut self, at: Duration) -> &mut Second {
        let i = at.as_secs() as usize;
        if self.timeline.len() <= i {
            self.timeline.resize(i + 1, Second::default());
        }
        &mut self.timeline[i]
    }

    fn merge(&mut self, o: Recorder) -> anyhow::Result<()> {
        self.latency.add(&o.latency)?;
        self.ttft.add(&o.ttft)?;
        for (k, c) in o.kinds {
            let m = self.kinds.entry(k).or_default();
            m.sent += c.sent;
            m.ok += c.ok;
            m.left += c.left;
            m.errors += c.errors;
        }
        for (k, n) in o.error_kinds {
            *self.error_kinds.entry(k).or_default() += n;
        }
        self.connections.opened += o.connections.opened;
        self.connections.closed_by_response += o.connections.closed_by_response;
        self.connections.stale += o.connections.stale;
        self.stream_events += o.stream_events;
        if self.timeline.len() < o.timeline.len() {
            self.timeline.resize(o.timeline.len(), Second::default());
        }
        for (m, s) in self.timeline.iter_mut().zip(o.timeline) {
            m.ok += s.ok;
            m.errors += s.errors;
            m.left += s.left;
        }
        Ok(())
    }
}

/// The requests, built once.
struct Plan {
    host_port: String,
    /// Extra request headers.
    headers: Vec<(String, String)>,
    bodies: BTreeMap<Kind, Bytes>,
    mix: Mix,
    leave_after_events: usize,
    requests: u64,
    /// When no request may start any more.
    end_at: Option<Instant>,
    /// Time between two starts on one connection (`None`: no pacing).
    interval: Option<Duration>,
    request_timeout: Duration,
    start: Instant,
}

impl Plan {
    fn body(&self, kind: Kind) -> Bytes {
        self.bodies.get(&kind).cloned().unwrap_or_default()
    }
}

/// Runs the load described by `args` on its own runtime.
pub fn run_blocking(args: &MixedArgs) -> anyhow::Result<MixedSummary> {
    anyhow::ensure!(
        args.requests > 0 || args.duration_s > 0.0,
        "give --requests, --duration-s or both"
    );
    anyhow::ensure!(args.concurrency > 0, "--concurrency must be at least 1");
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(args.threads.max(1))
        .enable_all()
        .build()?;
    runtime.block_on(run(args.clone()))
}

async fn run(args: MixedArgs) -> anyhow::Result<MixedSummary> {
    let host_port = args
        .url
        .strip_prefix("http://")
        .ok_or_else(|| anyhow::anyhow!("--url must start with http://"))?
        .trim_end_matches('/')
        .to_owned();
    let completion = |stream: bool, max_tokens: usize| {
        Bytes::from(
            serde_json::json!({
                "model": args.model, "prompt": args.prompt, "max_tokens": max_tokens, "stream": stream,
            })
            .to_string(),
        )
    };
    let chat = serde_json::json!({
        "model": args.model, "messages": [{"role": "user", "content": args.prompt}],
        "max_tokens": args.max_tokens, "stream": true,
    });
    let bodies = BTreeMap::from([
        (Kind::Completions, completion(false, args.max_tokens)),
        (Kind::Stream, completion(true, args.max_tokens)),
        (Kind::Chat, Bytes::from(chat.to_string())),
        (Kind::Leave, completion(true, args.leave_max_tokens)),
    ]);
    let start = Instant::now();
    let started_unix_ms = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64);
    let plan = Arc::new(Plan {
        host_port,
        headers: args
            .headers
            .iter()
            .map(|h| {
                let (n, v) = h.split_once(':').unwrap_or((h, ""));
                (n.trim().to_owned(), v.trim().to_owned())
            })
            .collect(),
        bodies,
        mix: args.mix.clone(),
        leave_after_events: args.leave_after_events,
        requests: args.requests,
        end_at: (args.duration_s > 0.0).then(|| start + Duration::from_secs_f64(args.duration_s)),
        interval: (args.rate > 0.0).then(|| Duration::from_secs_f64(args.concurrency as f64 / args.rate)),
        request_timeout: Duration::from_secs_f64(args.request_timeout_s),
        start,
    });
    let shared = Arc::new(Shared::default());
    let progress = (args.progress_s > 0.0).then(|| {
        let shared = shared.clone();
        let every = Duration::from_secs_f64(args.progress_s);
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(every).await;
                eprintln!(
                    "[lmstack-load] {:.0} s: {} ok, {} left, {} errors, {} streams open",
                    start.elapsed().as_secs_f64(),
                    shared.ok.load(Ordering::Relaxed),
                    shared.left.load(Ordering::Relaxed),
                    shared.errors.load(Ordering::Relaxed),
                    shared.open_streams.load(Ordering::Relaxed),
                );
            }
        })
    });
    // Connection i starts a fraction of the ramp (or of one pacing interval) after the first.
    let spread = Duration::from_secs_f64(args.ramp_s).max(plan.interval.unwrap_or_default());
    let mut tasks = Vec::with_capacity(args.concurrency);
    for i in 0..args.concurrency {
        let first = start + spread.mul_f64(i as f64 / args.concurrency as f64);
        tasks.push(tokio::spawn(connection_loop(plan.clone(), shared.clone(), first)));
    }
    let mut total = Recorder::new()?;
    for t in tasks {
        total.merge(t.await??)?;
    }
    if let Some(p) = progress {
        p.abort();
    }
    let seconds = start.elapsed().as_secs_f64();
    let (ok, left, errors) = (
        shared.ok.load(Ordering::Relaxed),
        shared.left.load(Ordering::Relaxed),
        shared.errors.load(Ordering::Relaxed),
    );
    Ok(MixedSummary {
        label: args.label.clone(),
        started_unix_ms,
        seconds,
        concurrency: args.concurrency,
        rate: args.rate,
        requests: ok + left + errors,
        ok,
        left,
        errors,
        kinds: total.kinds,
        error_kinds: total.error_kinds,
        connections: total.connections,
        stream_events: total.stream_events,
        max_open_streams: shared.max_open_streams.load(Ordering::Relaxed),
        latency_ms: Percentiles::of(&total.latency),
        ttft_ms: Percentiles::of(&total.ttft),
        timeline: total.timeline,
    })
}

/// A client connection; dropping it closes the socket at once.
struct Conn {
    sender: http1::SendRequest<Full<Bytes>>,
    task: tokio::task::JoinHandle<()>,
    /// It has carried a request already.
    reused: bool,
}

impl Drop for Conn {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn connect(host_port: &str) -> anyhow::Result<Conn> {
    let stream = tokio::time::timeout(Duration::from_secs(10), TcpStream::connect(host_port)).await??;
    stream.set_nodelay(true)?;
    let (sender, conn) = http1::handshake(TokioIo::new(stream)).await?;
    let task = tokio::spawn(async move {
        let _ = conn.await;
    });
    Ok(Conn {
        sender,
        task,
        reused: false,
    })
}

async fn connection_loop(plan: Arc<Plan>, shared: Arc<Shared>, first: Instant) -> anyhow::Result<Recorder> {
    let mut rec = Recorder::new()?;
    let mut conn: Option<Conn> = None;
    let mut next = first;
    loop {
        // Pacing: start at `next`; a connection that fell far behind does not burst.
        let now = Instant::now();
        if next > now {
            tokio::time::sleep_until(next.into()).await;
        } else if plan.interval.is_some() && now - next > Duration::from_secs(1) {
            next = now;
        }
        if plan.end_at.is_some_and(|end| Instant::now() >= end) {
            break;
        }
        let ticket = shared.next_ticket.fetch_add(1, Ordering::Relaxed);
        if plan.requests > 0 && ticket >= plan.requests {
            break;
        }
        if let Some(interval) = plan.interval {
            next += interval;
        }
        let kind = plan.mix.kind(ticket);
        rec.kinds.entry(kind).or_default().sent += 1;
        let t0 = Instant::now();
        let (outcome, keep) = one_request(&plan, &shared, &mut rec, &mut conn, kind, t0).await;
        if !keep {
            conn = None;
        }
        let done = Instant::now();
        let counts = rec.kinds.entry(kind).or_default();
        match outcome {
            Outcome::Ok { ttft } => {
                counts.ok += 1;
                shared.ok.fetch_add(1, Ordering::Relaxed);
                rec.second(done - plan.start).ok += 1;
                rec.latency.record(micros(done - t0))?;
                if let Some(t) = ttft {
                    rec.ttft.record(micros(t))?;
                }
            }
            Outcome::Left => {
                counts.left += 1;
                shared.left.fetch_add(1, Ordering::Relaxed);
                rec.second(done - plan.start).left += 1;
            }
            Outcome::Failed(why) => {
                counts.errors += 1;
                shared.errors.fetch_add(1, Ordering::Relaxed);
                rec.second(done - plan.start).errors += 1;
                *rec.error_kinds.entry(why).or_default() += 1;
            }
        }
    }
    Ok(rec)
}

fn micros(d: Duration) -> u64 {
    (d.as_micros() as u64).max(1)
}

/// Sends one request of `kind` on `conn` (opening one when there is none, or when the one
/// kept alive has closed) and checks its response; returns how it ended and whether the
/// connection may carry another.
async fn one_request(
    plan: &Plan,
    shared: &Shared,
    rec: &mut Recorder,
    conn: &mut Option<Conn>,
    kind: Kind,
    t0: Instant,
) -> (Outcome, bool) {
    // A kept-alive connection the server closed while it was idle: nothing was sent on it,
    // so a new one is what any client does.
    if let Some(c) = conn.as_mut()
        && (c.sender.is_closed() || c.sender.ready().await.is_err())
    {
        rec.connections.stale += 1;
        *conn = None;
    }
    let c = match conn {
        Some(c) => c,
        None => match connect(&plan.host_port).await {
            Ok(c) => {
                rec.connections.opened += 1;
                conn.insert(c)
            }
            Err(_) => {
                // Do not spin while nothing listens.
                tokio::time::sleep(Duration::from_millis(10)).await;
                return (Outcome::Failed("connect".into()), false);
            }
        },
    };
    let path = if kind == Kind::Chat {
        "/v1/chat/completions"
    } else {
        "/v1/completions"
    };
    let mut req = Request::post(path)
        .header("host", plan.host_port.as_str())
        .header("content-type", "application/json");
    for (name, value) in &plan.headers {
        req = req.header(name.as_str(), value.as_str());
    }
    let req = req.body(Full::new(plan.body(kind)));
    let Ok(req) = req else {
        return (Outcome::Failed("request".into()), false);
    };
    let leave_after = (kind == Kind::Leave).then_some(plan.leave_after_events);
    match tokio::time::timeout(plan.request_timeout, exchange(c, req, kind, leave_after, t0, shared)).await {
        Ok(Exchange { outcome, close, events }) => {
            rec.stream_events += events;
            if close {
                rec.connections.closed_by_response += 1;
            }
            // An error status read whole leaves the connection as good as a success does.
            let keep = !close
                && match &outcome {
                    Outcome::Ok { .. } => true,
                    Outcome::Failed(why) => why.starts_with("status_"),
                    Outcome::Left => false,
                };
            (outcome, keep)
        }
        Err(_) => (Outcome::Failed("timeout".into()), false),
    }
}

/// What one exchange on a connection gave.
struct Exchange {
    outcome: Outcome,
    /// The response said `connection: close`.
    close: bool,
    events: u64,
}

impl Exchange {
    fn failed(why: impl Into<String>, close: bool, events: u64) -> Exchange {
        Exchange {
            outcome: Outcome::Failed(why.into()),
            close,
            events,
        }
    }
}

/// Counts a stream as open while it lives.
struct OpenStream<'a>(&'a Shared);

impl<'a> OpenStream<'a> {
    fn new(shared: &'a Shared) -> Self {
        let n = shared.open_streams.fetch_add(1, Ordering::Relaxed) + 1;
        shared.max_open_streams.fetch_max(n, Ordering::Relaxed);
        OpenStream(shared)
    }
}

impl Drop for OpenStream<'_> {
    fn drop(&mut self) {
        self.0.open_streams.fetch_sub(1, Ordering::Relaxed);
    }
}

async fn exchange(
    conn: &mut Conn,
    req: Request<Full<Bytes>>,
    kind: Kind,
    leave_after: Option<usize>,
    t0: Instant,
    shared: &Shared,
) -> Exchange {
    let reused = conn.reused;
    conn.reused = true;
    let resp = match conn.sender.send_request(req).await {
        Ok(r) => r,
        Err(_) if reused => return Exchange::failed("reused_connection_before_response", false, 0),
        Err(_) => return Exchange::failed("new_connection_before_response", false, 0),
    };
    let close = resp
        .headers()
        .get_all(hyper::header::CONNECTION)
        .iter()
        .any(|v| v.to_str().is_ok_and(|v| v.to_ascii_lowercase().contains("close")))
        || resp.version() == hyper::Version::HTTP_10;
    let status = resp.status();
    let mut body = resp.into_body();
    if !status.is_success() {
        return match body.collect().await {
            Ok(_) => Exchange::failed(format!("status_{}", status.as_u16()), close, 0),
            Err(_) => Exchange::failed("body_cut", close, 0),
        };
    }
    if kind == Kind::Completions {
        return match body.collect().await.map(|b| b.to_bytes()) {
            Ok(b) if contains(&b, b"\"choices\"") => Exchange {
                outcome: Outcome::Ok { ttft: None },
                close,
                events: 0,
            },
            Ok(_) => Exchange::failed("body_without_choices", close, 0),
            Err(_) => Exchange::failed("body_cut", close, 0),
        };
    }
    let _open = OpenStream::new(shared);
    let mut sse = Sse::default();
    let mut ttft = None;
    while let Some(frame) = body.frame().await {
        let Ok(frame) = frame else {
            return Exchange::failed("body_cut", close, sse.events);
        };
        let Some(data) = frame.data_ref() else { continue };
        sse.feed(data);
        if ttft.is_none() && sse.events > 0 {
            ttft = Some(t0.elapsed());
        }
        if sse.error {
            break;
        }
        if let Some(n) = leave_after
            && sse.events as usize >= n
            && !sse.done
        {
            // The caller drops the connection: the client is gone.
            return Exchange {
                outcome: Outcome::Left,
                close,
                events: sse.events,
            };
        }
    }
    let outcome = if sse.error {
        Outcome::Failed("error_event".into())
    } else if !sse.done {
        Outcome::Failed("stream_without_done".into())
    } else if sse.after_done {
        Outcome::Failed("data_after_done".into())
    } else if leave_after.is_some() {
        // It ended before the client meant to leave: a short stream, finished cleanly.
        Outcome::Left
    } else {
        Outcome::Ok { ttft }
    };
    Exchange {
        outcome,
        close,
        events: sse.events,
    }
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

/// Server-sent events read as they come: data events counted, `[DONE]` and error events
/// (`data: {"error": ...}`) noted. Events end with a blank line, cut anywhere by reads.
#[derive(Default)]
struct Sse {
    pending: Vec<u8>,
    events: u64,
    done: bool,
    error: bool,
    /// Data came after `[DONE]`.
    after_done: bool,
}

impl Sse {
    fn feed(&mut self, bytes: &[u8]) {
        self.pending.extend_from_slice(bytes);
        let mut start = 0;
        while let Some(end) = find_blank_line(&self.pending[start..]) {
            let (event, gap) = end;
            let event = self.pending[start..start + event].to_vec();
            self.event(&event);
            start += event.len() + gap;
        }
        self.pending.drain(..start);
    }

    fn event(&mut self, event: &[u8]) {
        for line in event.split(|&b| b == b'\n') {
            let line = line.strip_suffix(b"\r").unwrap_or(line);
            let Some(data) = line.strip_prefix(b"data:") else {
                continue;
            };
            let data = data.trim_ascii();
            if self.done {
                self.after_done = true;
            }
            if data == b"[DONE]" {
                self.done = true;
            } else {
                self.events += 1;
                if data
                    .strip_prefix(b"{")
                    .is_some_and(|d| d.trim_ascii_start().starts_with(b"\"error\""))
                {
                    self.error = true;
                }
            }
        }
    }
}

/// Where the first event in `buf` ends: (its length, the length of the blank line after it).
fn find_blank_line(buf: &[u8]) -> Option<(usize, usize)> {
    let lf = buf.windows(2).position(|w| w == b"\n\n").map(|i| (i, 2));
    let crlf = buf.windows(4).position(|w| w == b"\r\n\r\n").map(|i| (i, 4));
    match (lf, crlf) {
        (Some(a), Some(b)) => Some(if a.0 <= b.0 { a } else { b }),
        (a, b) => a.or(b),
    }
}

/// Prints a summary for people.
pub fn print(s: &MixedSummary) {
    println!(
        "{}: {} requests in {:.1} s ({:.0}/s): {} ok, {} left, {} errors; {} connections opened, \
         {} closed by `connection: close`, {} found stale; at most {} streams open",
        s.label,
        s.requests,
        s.seconds,
        s.requests as f64 / s.seconds.max(1e-9),
        s.ok,
        s.left,
        s.errors,
        s.connections.opened,
        s.connections.closed_by_response,
        s.connections.stale,
        s.max_open_streams,
    );
    for (kind, c) in &s.kinds {
        println!(
            "  {:<12} sent {:>9}  ok {:>9}  left {:>9}  errors {:>6}",
            kind.name(),
            c.sent,
            c.ok,
            c.left,
            c.errors
        );
    }
    for (why, n) in &s.error_kinds {
        println!("  error {why}: {n}");
    }
    println!(
        "  latency p50 {:.2} ms p99 {:.2} ms max {:.2} ms; stream TTFT p50 {:.2} ms p99 {:.2} ms",
        s.latency_ms.p50, s.latency_ms.p99, s.latency_ms.max, s.ttft_ms.p50, s.ttft_ms.p99
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_mix_gives_each_kind_its_share_in_every_run_of_tickets() {
        let mix: Mix = "completions=4,stream=3,chat=2,leave=1".parse().unwrap();
        let mut counts = BTreeMap::new();
        for t in 0..10 {
            *counts.entry(mix.kind(t)).or_insert(0) += 1;
        }
        assert_eq!(counts[&Kind::Completions], 4);
        assert_eq!(counts[&Kind::Stream], 3);
        assert_eq!(counts[&Kind::Chat], 2);
        assert_eq!(counts[&Kind::Leave], 1);
        assert!("stream=0".parse::<Mix>().is_err());
        assert!("bogus=1".parse::<Mix>().is_err());
        assert!("stream=1,stream=2".parse::<Mix>().is_err());
        assert_eq!("stream=1".parse::<Mix>().unwrap().kind(12345), Kind::Stream);
    }

    #[test]
    fn events_cut_anywhere_are_counted_once_with_done_and_errors_noted() {
        let text = b"data: {\"id\":1}\n\ndata: {\"id\":2}\r\n\r\ndata: [DONE]\n\n";
        for cut in 0..text.len() {
            let mut sse = Sse::default();
            sse.feed(&text[..cut]);
            sse.feed(&text[cut..]);
            assert_eq!(sse.events, 2, "cut at {cut}");
            assert!(sse.done && !sse.error && !sse.after_done);
        }
        let mut sse = Sse::default();
        sse.feed(b"data: {\"id\":1}\n\ndata: {\"error\":{\"message\":\"cut\"}}\n\ndata: [DONE]\n\n");
        assert!(sse.error && sse.done);
        let mut sse = Sse::default();
        sse.feed(b"data: [DONE]\n\ndata: {\"id\":3}\n\n");
        assert!(sse.after_done);
        let mut sse = Sse::default();
        sse.feed(b"data: {\"id\":1}\n\ndata: [DO");
        assert!(!sse.done && sse.events == 1);
    }
}
