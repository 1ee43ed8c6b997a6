//! Fault injection for failover tests: the simulator fails as a dying engine does, on the real
//! socket. Not the KV-event faults (`/sim/kv_events`, in `kv_events.rs`).
//!
//! One fault is armed per process (`POST /sim/fault`, or `--fault` at start), for the next
//! `count` requests it matches (every one, until cleared, when `count` is absent):
//!
//! | kind                | matches                         | what the peer sees                      |
//! |---------------------|---------------------------------|-----------------------------------------|
//! | `reset_before_head` | a POST to a model route, read   | RST, no response byte                   |
//! | `close_before_head` | same                            | FIN, no response byte                   |
//! | `hang_before_head`  | same                            | nothing, until it leaves                |
//! | `status`            | same                            | status `status`, vLLM's error body      |
//! | `garbage`           | same                            | bytes that are not HTTP, then FIN       |
//! | `reset_mid_stream`  | a streaming generation          | the head, `after_events` events, RST    |
//! | `cut_mid_stream`    | same                            | same, then FIN without the last chunk   |
//! | `stall_mid_stream`  | same                            | same, then nothing, until it leaves     |
//! | `exit_mid_stream`   | same                            | same, then the process exits (137)      |
//!
//! A matched request hands its connection a [`Fire`] through the connection's [`Tap`];
//! [`FaultyStream`], the accepted socket wrapped under hyper, carries it out on the bytes hyper
//! writes: before-head kinds on the first byte of the response, mid-stream kinds right after
//! the `after_events`-th SSE event (each event ends with a blank line, `\n\n`, which nothing
//! else in a response has; the chat role chunk counts; 0 is right after the head). A stream
//! that ends before that is left alone. Faults act on a response's own bytes: it assumes that
//! clients do not pipeline requests (the router does not).

use std::io;
use std::pin::Pin;
use std::str::FromStr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;

/// What fails. `none` clears the armed fault.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FaultKind {
    None,
    ResetBeforeHead,
    CloseBeforeHead,
    HangBeforeHead,
    Status,
    Garbage,
    ResetMidStream,
    CutMidStream,
    StallMidStream,
    ExitMidStream,
}

impl FaultKind {
    fn mid_stream(self) -> bool {
        matches!(
            self,
            Self::ResetMidStream | Self::CutMidStream | Self::StallMidStream | Self::ExitMidStream
        )
    }
}

/// A fault as `POST /sim/fault` takes it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FaultSpec {
    pub kind: FaultKind,
    /// Mid-stream kinds: SSE events sent before the fault.
    #[serde(default)]
    pub after_events: u64,
    /// Matching requests it applies to; absent: all, until cleared.
    #[serde(default)]
    pub count: Option<u64>,
    /// `status`: the status answered.
    #[serde(default = "default_status")]
    pub status: u16,
}

fn default_status() -> u16 {
    500
}

impl FaultSpec {
    pub fn new(kind: FaultKind) -> Self {
        Self {
            kind,
            after_events: 0,
            count: None,
            status: default_status(),
        }
    }

    pub fn validate(&self) -> Result<(), String> {
        if !(200..=599).contains(&self.status) {
            return Err(format!("`status` must be 200 to 599, not {}", self.status));
        }
        Ok(())
    }
}

/// `--fault KIND[:N]`: N is `after_events`, or for `status` the status; armed for every request.
impl FromStr for FaultSpec {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let (name, number) = match s.split_once(':') {
            Some((name, n)) => (name, Some(n.parse::<u64>().map_err(|e| format!("`{n}`: {e}"))?)),
            None => (s, None),
        };
        let kind: FaultKind = serde_json::from_value(Value::String(name.to_owned()))
            .map_err(|_| format!("unknown fault kind `{name}`"))?;
        let mut spec = Self::new(kind);
        match (kind, number) {
            (FaultKind::Status, Some(n)) => {
                spec.status = u16::try_from(n).map_err(|_| format!("status {n}"))?;
            }
            (_, Some(n)) => spec.after_events = n,
            (_, None) => {}
        }
        spec.validate()?;
        Ok(spec)
    }
}

/// Where a request stands when faults are matched against it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Stage {
    /// A POST to a model route, its body read.
    Request,
    /// A streaming generation about to answer.
    Stream,
}

/// The fault for one request: what to do, and the count of times it fired to add to.
#[derive(Clone, Debug)]
pub struct Fire {
    pub kind: FaultKind,
    pub after_events: u64,
    pub status: u16,
    fired: Arc<AtomicU64>,
}

impl Fire {
    /// Counts the fault as having happened.
    pub fn fired(&self) {
        self.fired.fetch_add(1, Ordering::Relaxed);
    }
}

struct Armed {
    spec: FaultSpec,
    remaining: Option<u64>,
    matched: u64,
    fired: Arc<AtomicU64>,
}

/// The process's armed fault.
#[derive(Default)]
pub struct Faults {
    armed: Mutex<Option<Armed>>,
}

impl Faults {
    fn lock(&self) -> std::sync::MutexGuard<'_, Option<Armed>> {
        self.armed.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Arms `spec` in place of the armed fault (`none`: clears it).
    pub fn arm(&self, spec: FaultSpec) {
        *self.lock() = (spec.kind != FaultKind::None).then(|| Armed {
            remaining: spec.count,
            spec,
            matched: 0,
            fired: Arc::default(),
        });
    }

    /// `GET /sim/fault`: the armed fault, how many requests it still applies to (`remaining`,
    /// null: all), how many it matched and how many times it fired.
    pub fn report(&self) -> Value {
        match &*self.lock() {
            None => json!({"kind": FaultKind::None}),
            Some(a) => json!({
                "kind": a.spec.kind, "after_events": a.spec.after_events, "count": a.spec.count,
                "status": a.spec.status, "remaining": a.remaining, "matched": a.matched,
                "fired": a.fired.load(Ordering::Relaxed),
            }),
        }
    }

    /// The fault for a request at `stage`, if the armed one matches it (which uses up one of
    /// its count).
    pub fn take(&self, stage: Stage) -> Option<Fire> {
        let mut guard = self.lock();
        let a = guard.as_mut()?;
        let at = if a.spec.kind.mid_stream() {
            Stage::Stream
        } else {
            Stage::Request
        };
        if at != stage || a.remaining == Some(0) {
            return None;
        }
        if let Some(r) = &mut a.remaining {
            *r -= 1;
        }
        a.matched += 1;
        Some(Fire {
            kind: a.spec.kind,
            after_events: a.spec.after_events,
            status: a.spec.status,
            fired: a.fired.clone(),
        })
    }
}

/// A connection's link from its requests to its socket: a request arms it with the fault for
/// its response, the socket picks it up when hyper writes that response.
#[derive(Default)]
pub struct Tap {
    next: Mutex<Option<Fire>>,
    armed: AtomicBool,
}

impl Tap {
    pub fn arm(&self, fire: Fire) {
        *self.next.lock().unwrap_or_else(|p| p.into_inner()) = Some(fire);
        self.armed.store(true, Ordering::Release);
    }

    fn take(&self) -> Option<Fire> {
        if !self.armed.swap(false, Ordering::Acquire) {
            return None;
        }
        self.next.lock().unwrap_or_else(|p| p.into_inner()).take()
    }
}

/// What the peer gets instead of a response from `garbage`.
const GARBAGE: &[u8] = b"@@@@ lmstack-sim: these bytes are not HTTP @@@@\x00\xff\r\n\r\n";

/// Where a response's bytes stand against its mid-stream fault.
#[derive(Clone, Copy, Debug)]
struct Scan {
    /// The last 8 bytes written.
    window: u64,
    head_done: bool,
    events: u64,
    after_events: u64,
}

#[derive(Debug, PartialEq, Eq)]
enum Step {
    More,
    /// The fault's moment: right after this byte.
    Fault,
    /// The response ended (its last chunk) without reaching it.
    End,
}

impl Scan {
    fn new(after_events: u64) -> Self {
        Self {
            window: 0,
            head_done: false,
            events: 0,
            after_events,
        }
    }

    fn feed(&mut self, b: u8) -> Step {
        const HEAD_END: u64 = u32::from_be_bytes(*b"\r\n\r\n") as u64;
        const EVENT_END: u64 = u16::from_be_bytes(*b"\n\n") as u64;
        // The last chunk: an empty one after the CRLF of the one before (or of the head).
        const LAST_CHUNK: u64 = u64::from_be_bytes(*b"\0\r\n0\r\n\r\n");
        self.window = self.window << 8 | u64::from(b);
        if !self.head_done {
            if self.window & 0xffff_ffff == HEAD_END {
                self.head_done = true;
                if self.after_events == 0 {
                    return Step::Fault;
                }
            }
            return Step::More;
        }
        if self.window & 0xffff == EVENT_END {
            self.events += 1;
            if self.events == self.after_events {
                return Step::Fault;
            }
        }
        if self.window & 0x00ff_ffff_ffff_ffff == LAST_CHUNK {
            return Step::End;
        }
        Step::More
    }
}

enum Mode {
    /// Bytes pass.
    Pass,
    /// A before-head fault, to carry out on the first byte of the response.
    BeforeHead(Fire),
    /// A mid-stream fault, counting the response's events.
    Counting(Fire, Scan),
    /// Sending garbage: bytes of it sent so far.
    Garbage(usize),
    /// Nothing more is written; waits for the peer to leave.
    Stalled,
    /// The connection is failed: every call errs, and dropping it closes the socket (reset
    /// when its linger was set to zero).
    Dead,
}

/// The accepted socket as hyper sees it, with the connection's faults carried out on it.
pub struct FaultyStream {
    io: TcpStream,
    tap: Arc<Tap>,
    mode: Mode,
}

fn failed() -> io::Error {
    io::Error::new(io::ErrorKind::ConnectionAborted, "a simulated fault")
}

impl FaultyStream {
    pub fn new(io: TcpStream, tap: Arc<Tap>) -> Self {
        Self {
            io,
            tap,
            mode: Mode::Pass,
        }
    }

    /// Picks up a fault a request armed.
    fn pick_up(&mut self) {
        if let Some(fire) = self.tap.take() {
            self.mode = if fire.kind.mid_stream() {
                let scan = Scan::new(fire.after_events);
                Mode::Counting(fire, scan)
            } else {
                Mode::BeforeHead(fire)
            };
        }
    }

    /// Carries out a fault at its moment: sets the mode the connection is left in (or exits).
    fn strike(&mut self, fire: &Fire, cx: &mut Context<'_>) -> io::Result<()> {
        fire.fired();
        match fire.kind {
            FaultKind::ResetBeforeHead | FaultKind::ResetMidStream => {
                self.mode = Mode::Dead;
                self.io.set_zero_linger()?;
            }
            FaultKind::CloseBeforeHead | FaultKind::CutMidStream => {
                self.mode = Mode::Dead;
                // A TCP shutdown is one system call, never pending.
                let _ = Pin::new(&mut self.io).poll_shutdown(cx);
            }
            FaultKind::HangBeforeHead | FaultKind::StallMidStream => self.mode = Mode::Stalled,
            FaultKind::Garbage => self.mode = Mode::Garbage(0),
            FaultKind::ExitMidStream => {
                tracing::warn!("exit_mid_stream: exiting as a killed engine would");
                std::process::exit(137);
            }
            FaultKind::None | FaultKind::Status => self.mode = Mode::Pass,
        }
        Ok(())
    }

    /// Before-head faults, and the modes that write nothing more: `Some` with what the caller
    /// returns, `None` when it writes as usual.
    fn intercept(&mut self, cx: &mut Context<'_>) -> Option<Poll<io::Result<()>>> {
        self.pick_up();
        loop {
            match &mut self.mode {
                Mode::Pass | Mode::Counting(..) => return None,
                Mode::BeforeHead(fire) => {
                    let fire = fire.clone();
                    if let Err(e) = self.strike(&fire, cx) {
                        return Some(Poll::Ready(Err(e)));
                    }
                }
                Mode::Garbage(sent) => {
                    while *sent < GARBAGE.len() {
                        match Pin::new(&mut self.io).poll_write(cx, &GARBAGE[*sent..]) {
                            Poll::Ready(Ok(n)) if n > 0 => *sent += n,
                            Poll::Ready(Ok(_)) => return Some(Poll::Ready(Err(failed()))),
                            Poll::Ready(Err(e)) => return Some(Poll::Ready(Err(e))),
                            Poll::Pending => return Some(Poll::Pending),
                        }
                    }
                    let _ = Pin::new(&mut self.io).poll_shutdown(cx);
                    self.mode = Mode::Dead;
                }
                Mode::Stalled => return Some(self.watch_peer(cx)),
                Mode::Dead => return Some(Poll::Ready(Err(failed()))),
            }
        }
    }

    /// Stalled: reads (and drops) what the peer sends until it leaves, then fails.
    fn watch_peer(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let mut scratch = [0u8; 1024];
        loop {
            let mut buf = ReadBuf::new(&mut scratch);
            match Pin::new(&mut self.io).poll_read(cx, &mut buf) {
                Poll::Ready(Ok(())) if buf.filled().is_empty() => return Poll::Ready(Err(failed())),
                Poll::Ready(Ok(())) => {}
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                Poll::Pending => return Poll::Pending,
            }
        }
    }
}

impl AsyncRead for FaultyStream {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        if matches!(self.mode, Mode::Dead) {
            return Poll::Ready(Err(failed()));
        }
        Pin::new(&mut self.io).poll_read(cx, buf)
    }
}

impl AsyncWrite for FaultyStream {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        let this = &mut *self;
        if let Some(p) = this.intercept(cx) {
            return p.map(|r| r.map(|()| 0));
        }
        let Mode::Counting(_, scan) = &this.mode else {
            return Pin::new(&mut this.io).poll_write(cx, buf);
        };
        // Write up to the fault's moment (or the end of the response), never past it.
        let mut probe = *scan;
        let limit = buf
            .iter()
            .position(|&b| probe.feed(b) != Step::More)
            .map_or(buf.len(), |i| i + 1);
        let n = match Pin::new(&mut this.io).poll_write(cx, &buf[..limit]) {
            Poll::Ready(Ok(n)) => n,
            other => return other,
        };
        let Mode::Counting(fire, scan) = &mut this.mode else {
            return Poll::Ready(Ok(n));
        };
        let mut last = Step::More;
        for &b in &buf[..n] {
            last = scan.feed(b);
        }
        match last {
            Step::More => {}
            Step::End => this.mode = Mode::Pass,
            Step::Fault => {
                let fire = fire.clone();
                this.strike(&fire, cx)?;
            }
        }
        Poll::Ready(Ok(n))
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = &mut *self;
        if let Some(p) = this.intercept(cx) {
            return p;
        }
        Pin::new(&mut this.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.mode {
            Mode::Dead => Poll::Ready(Ok(())),
            Mode::Stalled => self.watch_peer(cx),
            _ => Pin::new(&mut self.io).poll_shutdown(cx),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn steps(after_events: u64, bytes: &[u8]) -> Vec<(usize, Step)> {
        let mut scan = Scan::new(after_events);
        bytes
            .iter()
            .enumerate()
            .map(|(i, &b)| (i, scan.feed(b)))
            .filter(|(_, s)| *s != Step::More)
            .collect()
    }

    const RESPONSE: &[u8] =
        b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n9\r\ndata: a\n\n\r\n9\r\ndata: b\n\n\r\n0\r\n\r\n";

    #[test]
    fn the_fault_comes_right_after_its_event() {
        let head = RESPONSE.windows(4).position(|w| w == b"\r\n\r\n").unwrap() + 3;
        assert_eq!(steps(0, RESPONSE)[0], (head, Step::Fault));
        let first = RESPONSE.windows(2).position(|w| w == b"\n\n").unwrap() + 1;
        assert_eq!(steps(1, RESPONSE)[0], (first, Step::Fault));
        assert_eq!(&RESPONSE[..=first][first - 8..], b"data: a\n\n");
        // Past the last event: the response ends first.
        assert_eq!(steps(3, RESPONSE), [(RESPONSE.len() - 1, Step::End)]);
    }

    #[test]
    fn an_empty_body_ends_the_response() {
        let empty = b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n0\r\n\r\n";
        assert_eq!(steps(1, empty), [(empty.len() - 1, Step::End)]);
    }

    #[test]
    fn the_flag_gives_kind_and_number() {
        let reset: FaultSpec = "reset_mid_stream:3".parse().unwrap();
        assert_eq!(
            (reset.kind, reset.after_events, reset.count),
            (FaultKind::ResetMidStream, 3, None)
        );
        let status: FaultSpec = "status:503".parse().unwrap();
        assert_eq!((status.kind, status.status), (FaultKind::Status, 503));
        assert!("explode".parse::<FaultSpec>().is_err());
        assert!("status:42".parse::<FaultSpec>().is_err());
    }

    #[test]
    fn a_fault_matches_its_stage_count_times() {
        let faults = Faults::default();
        faults.arm(FaultSpec {
            count: Some(2),
            ..FaultSpec::new(FaultKind::CutMidStream)
        });
        assert!(faults.take(Stage::Request).is_none());
        assert!(faults.take(Stage::Stream).is_some());
        faults.take(Stage::Stream).unwrap().fired();
        assert!(faults.take(Stage::Stream).is_none());
        let report = faults.report();
        assert_eq!(
            (report["remaining"].as_u64(), report["matched"].as_u64()),
            (Some(0), Some(2))
        );
        assert_eq!(report["fired"], 1);
        faults.arm(FaultSpec::new(FaultKind::None));
        assert_eq!(faults.report(), json!({"kind": "none"}));
        assert!(faults.take(Stage::Stream).is_none());
    }
}
