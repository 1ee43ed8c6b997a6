//! Relaying a response body from an engine to the client as it arrives.
//!
//! Two ways. A body that is not an event stream ([`relay`]) is written out as it was read
//! (chunked framing untouched), while the framing is tracked to know where the response ends
//! (so the engine connection can be reused); an HTTP/1.0 client cannot take chunked
//! encoding, so for it the payload is de-chunked and the connection closed at the end. An
//! SSE stream ([`relay_events`]) is relayed whole event by event in the router's own
//! chunked framing, so that however the engine fails, the client's stream can go on (a
//! continuation from another engine) or end cleanly with an error event; its data events
//! are counted and timed, and an OpenAI stream's ledger sees (and may rewrite) each one.
//! Not here: the response head, retries and resumption, metrics names.

use std::cell::Cell;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use lmstack_http::anthropic::StreamUsage;
use lmstack_http::stream::{BodyTail, EventSplitter, Ledger, Verdict, event_data};
use lmstack_http::{ChunkedDecoder, Framing, SseCounter};

use crate::downstream::WriteHalf;
use crate::error::{ErrorKind, ProxyError};
use crate::metrics::PairMetrics;
use crate::state::EndpointLoad;
use crate::upstream::UpstreamConn;

/// How the body goes out to the client.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OutFraming {
    /// As the engine framed it.
    PassThrough,
    /// Chunked from the engine, raw payload to the client (HTTP/1.0), closed at the end.
    Dechunk,
}

/// Times SSE data events as they arrive and records them: the first (time to first
/// token) and the gaps between reads that carry events (time between tokens).
pub struct StreamClock<'a> {
    start: Instant,
    last: Option<Instant>,
    /// This clock's first event (a continuation's included), for the request's trace.
    first: Option<Instant>,
    metrics: &'a PairMetrics,
    first_byte: &'a FirstByte<'a>,
}

impl<'a> StreamClock<'a> {
    pub fn new(start: Instant, metrics: &'a PairMetrics, first_byte: &'a FirstByte<'a>) -> Self {
        Self {
            start,
            last: None,
            first: None,
            metrics,
            first_byte,
        }
    }

    /// The clock of a stream's continuation: its first event is timed as a gap from the
    /// client's last event (`last`), not as a first token.
    pub fn resumed(last: Instant, metrics: &'a PairMetrics, first_byte: &'a FirstByte<'a>) -> Self {
        Self {
            start: last,
            last: Some(last),
            first: None,
            metrics,
            first_byte,
        }
    }

    /// When the client got its last event.
    pub fn last_event(&self) -> Option<Instant> {
        self.last
    }

    /// When this clock saw its first event.
    pub fn first_event(&self) -> Option<Instant> {
        self.first
    }

    fn on_events(&mut self, n: u32, now: Instant) {
        if n == 0 {
            return;
        }
        self.metrics.events(u64::from(n));
        self.first_byte.mark();
        self.first.get_or_insert(now);
        match self.last {
            None => self.metrics.ttft(now.duration_since(self.start).as_secs_f64()),
            Some(last) => self.metrics.tbt(now.duration_since(last).as_secs_f64()),
        }
        self.last = Some(now);
    }
}

/// Counts a request in the "awaiting first byte" gauge until its first byte (streaming:
/// first token) arrives or it ends.
pub struct FirstByte<'a> {
    metrics: &'a PairMetrics,
    load: &'a EndpointLoad,
    /// Prompt blocks the engine still has to prefill for this request.
    prefill_blocks: u64,
    pending: Cell<bool>,
}

impl<'a> FirstByte<'a> {
    /// Counts the request as awaiting its first byte, and its uncached blocks as prefill
    /// work queued at the endpoint, until [`mark`](Self::mark) (or drop).
    pub fn start(metrics: &'a PairMetrics, load: &'a EndpointLoad, prefill_blocks: u64) -> Self {
        metrics.awaiting_first_byte(1);
        load.pending.fetch_add(1, Ordering::Relaxed);
        if prefill_blocks > 0 {
            load.prefill_blocks.fetch_add(prefill_blocks, Ordering::Relaxed);
        }
        Self {
            metrics,
            load,
            prefill_blocks,
            pending: Cell::new(true),
        }
    }

    pub fn mark(&self) {
        if self.pending.replace(false) {
            self.metrics.awaiting_first_byte(-1);
            self.load.pending.fetch_sub(1, Ordering::Relaxed);
            if self.prefill_blocks > 0 {
                self.load
                    .prefill_blocks
                    .fetch_sub(self.prefill_blocks, Ordering::Relaxed);
            }
        }
    }
}

impl Drop for FirstByte<'_> {
    fn drop(&mut self) {
        self.mark();
    }
}

/// How a relay ended.
#[derive(Debug)]
pub enum RelayError {
    /// The engine failed mid-body (reset, timeout, bad framing).
    Upstream(ProxyError),
    /// Writing to the client failed: it went away.
    Downstream,
}

/// What the relay learned about the exchange.
#[derive(Debug, Clone, Copy)]
pub struct Relayed {
    /// The engine connection ended cleanly at the end of the response and can be reused.
    pub reusable: bool,
}

/// Bytes of body copied behind the response head so both leave in one write.
const COALESCE_BYTES: usize = 32 * 1024;

/// Relays a response: `head` (the response head for the client), then the body with
/// `framing` from `up` to `wr`. The head leaves at once when no body bytes are waiting (a
/// stream's first token may be far off), or in the same write as those that are.
#[allow(clippy::too_many_arguments)]
pub async fn relay(
    up: &mut UpstreamConn,
    wr: &mut WriteHalf,
    head: Vec<u8>,
    framing: Framing,
    out: OutFraming,
    mut clock: Option<&mut StreamClock<'_>>,
    mut tail: Option<&mut BodyTail>,
    idle_timeout: Duration,
    write_timeout: Duration,
) -> Result<Relayed, RelayError> {
    let mut chunked = ChunkedDecoder::new();
    let mut sse = SseCounter::new();
    let mut remaining = match framing {
        Framing::Length(n) => n,
        _ => 0,
    };
    let mut head = Some(head);
    if framing == Framing::Empty || up.buf.is_empty() {
        if let Some(h) = head.take() {
            write(wr, Bytes::from(h), write_timeout).await?;
        }
        if framing == Framing::Empty {
            return Ok(Relayed {
                reusable: up.buf.is_empty(),
            });
        }
    }
    loop {
        if !up.buf.is_empty() {
            let data = up.buf.split().freeze();
            // Arrival time, for streams only (a clock read is not free).
            let now = clock.is_some().then(Instant::now);
            let mut events = 0;
            let (consumed, done, pieces) = match framing {
                Framing::Length(_) => {
                    let take = (data.len() as u64).min(remaining) as usize;
                    remaining -= take as u64;
                    if clock.is_some() {
                        events += sse.feed(&data[..take]).data;
                    }
                    if let Some(t) = tail.as_deref_mut() {
                        t.push(&data[..take]);
                    }
                    (take, remaining == 0, None)
                }
                Framing::UntilClose => {
                    if clock.is_some() {
                        events += sse.feed(&data).data;
                    }
                    if let Some(t) = tail.as_deref_mut() {
                        t.push(&data);
                    }
                    (data.len(), false, None)
                }
                Framing::Chunked => {
                    let mut pieces = (out == OutFraming::Dechunk).then(Vec::new);
                    let counting = clock.is_some();
                    let decoded = chunked
                        .decode(&data, |payload| {
                            if counting {
                                events += sse.feed(payload).data;
                            }
                            if let Some(t) = tail.as_deref_mut() {
                                t.push(payload);
                            }
                            if let Some(p) = pieces.as_mut() {
                                p.push(data.slice_ref(payload));
                            }
                        })
                        .map_err(|e| {
                            RelayError::Upstream(ProxyError::new(
                                ErrorKind::UpstreamProtocol,
                                format!("the engine sent a malformed chunked body: {e}"),
                            ))
                        })?;
                    (decoded.consumed, decoded.done, pieces)
                }
                Framing::Empty => (0, true, None),
            };
            if let (Some(c), Some(now)) = (clock.as_deref_mut(), now) {
                c.on_events(events, now);
            }
            match (head.take(), pieces) {
                (Some(mut h), None) if consumed <= COALESCE_BYTES => {
                    h.extend_from_slice(&data[..consumed]);
                    write(wr, Bytes::from(h), write_timeout).await?;
                }
                (h, pieces) => {
                    if let Some(h) = h {
                        write(wr, Bytes::from(h), write_timeout).await?;
                    }
                    match pieces {
                        Some(pieces) => {
                            for p in pieces {
                                write(wr, p, write_timeout).await?;
                            }
                        }
                        None if consumed > 0 => write(wr, data.slice(..consumed), write_timeout).await?,
                        None => {}
                    }
                }
            }
            if done {
                // Bytes past the end of the response mean the engine broke framing.
                return Ok(Relayed {
                    reusable: consumed == data.len(),
                });
            }
        }
        if !read_more(up, idle_timeout, framing).await? {
            return Ok(Relayed { reusable: false });
        }
    }
}

/// Reads more of a response body within `wait`. False: the engine closed a body that ends
/// with the connection (its end); a close before the end, silence or a read error is the
/// engine failing.
async fn read_more(up: &mut UpstreamConn, wait: Duration, framing: Framing) -> Result<bool, RelayError> {
    match crate::time::timeout(wait, up.fill()).await {
        Err(_) => Err(RelayError::Upstream(ProxyError::new(
            ErrorKind::UpstreamTimeout,
            format!("the engine sent nothing for {} ms", wait.as_millis()),
        ))),
        Ok(Ok(0)) if framing == Framing::UntilClose => Ok(false),
        Ok(Ok(0)) => Err(RelayError::Upstream(ProxyError::new(
            ErrorKind::UpstreamReset,
            "the engine closed the connection before the end of the response",
        ))),
        Ok(Err(e)) => Err(RelayError::Upstream(
            ProxyError::new(ErrorKind::UpstreamReset, format!("reading from the engine failed: {e}")).with_source(e),
        )),
        Ok(Ok(_)) => Ok(true),
    }
}

/// Writes to the client with a deadline; any failure means the client is gone.
pub async fn write(wr: &mut WriteHalf, bytes: Bytes, timeout: Duration) -> Result<(), RelayError> {
    match crate::time::timeout(timeout, wr.write_all(bytes)).await {
        Ok((Ok(_), _)) => Ok(()),
        _ => Err(RelayError::Downstream),
    }
}

/// How the client's side of an event stream is framed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EventFraming {
    /// Chunked (HTTP/1.1): each write is one chunk; the stream ends with [`end_events`].
    Chunked,
    /// Raw (HTTP/1.0): the stream ends when the connection closes.
    Raw,
}

/// Writes `events` (whole SSE events) to the client, framed, after `head` if it is still to
/// be sent (it is taken).
pub async fn write_events(
    wr: &mut WriteHalf,
    head: &mut Option<Vec<u8>>,
    events: &[u8],
    framing: EventFraming,
    timeout: Duration,
) -> Result<(), RelayError> {
    let mut out = head.take().unwrap_or_default();
    if !events.is_empty() {
        match framing {
            EventFraming::Chunked => {
                out.extend_from_slice(format!("{:x}\r\n", events.len()).as_bytes());
                out.extend_from_slice(events);
                out.extend_from_slice(b"\r\n");
            }
            EventFraming::Raw => out.extend_from_slice(events),
        }
    }
    if out.is_empty() {
        return Ok(());
    }
    write(wr, Bytes::from(out), timeout).await
}

/// Ends an event stream's body (the last chunk; nothing for a raw body).
pub async fn end_events(wr: &mut WriteHalf, framing: EventFraming, timeout: Duration) -> Result<(), RelayError> {
    match framing {
        EventFraming::Chunked => write(wr, Bytes::from_static(b"0\r\n\r\n"), timeout).await,
        EventFraming::Raw => Ok(()),
    }
}

/// What an event stream relay needs besides the connections.
pub struct EventRelay<'l, 'c> {
    /// The response head, until it is written (at once when no event is waiting, else
    /// with the first events).
    pub head: Option<Vec<u8>>,
    pub framing: EventFraming,
    /// The OpenAI stream's ledger, when the stream may be resumed.
    pub ledger: Option<&'l mut Ledger>,
    /// Told the id a Responses stream's `response.created` event names (once).
    pub on_response_id: Option<&'l dyn Fn(&str)>,
    /// A metered Anthropic Messages stream's usage, read from its events.
    pub usage: Option<&'l mut StreamUsage>,
    pub clock: &'l mut StreamClock<'c>,
    /// Silence allowed before the first data event (the engine may queue and prefill).
    pub first_event_timeout: Duration,
    /// Silence allowed between events after it.
    pub idle_timeout: Duration,
    pub write_timeout: Duration,
    pub max_event_bytes: usize,
}

/// Relays an SSE body (`framing` as the engine sent it) whole event by event, until the
/// engine ends it. The client's stream is not ended here: a continuation may follow, or
/// an error event ([`end_events`] ends it).
pub async fn relay_events(
    up: &mut UpstreamConn,
    wr: &mut WriteHalf,
    framing: Framing,
    r: &mut EventRelay<'_, '_>,
) -> Result<Relayed, RelayError> {
    let mut chunked = ChunkedDecoder::new();
    let mut splitter = EventSplitter::new(r.max_event_bytes);
    let mut remaining = match framing {
        Framing::Length(n) => n,
        _ => 0,
    };
    if up.buf.is_empty() || framing == Framing::Empty {
        write_events(wr, &mut r.head, &[], r.framing, r.write_timeout).await?;
    }
    let mut out = BytesMut::new();
    let mut seen_event = false;
    let too_large = |e: lmstack_http::stream::EventTooLarge| {
        RelayError::Upstream(ProxyError::new(
            ErrorKind::UpstreamProtocol,
            format!("the engine sent {e} in its event stream"),
        ))
    };
    loop {
        let mut done = framing == Framing::Empty;
        let mut clean = true;
        if !up.buf.is_empty() {
            let data = up.buf.split().freeze();
            match framing {
                Framing::Length(_) => {
                    let take = (data.len() as u64).min(remaining) as usize;
                    remaining -= take as u64;
                    splitter.push(&data[..take]).map_err(too_large)?;
                    done = remaining == 0;
                    clean = take == data.len();
                }
                Framing::UntilClose => splitter.push(&data).map_err(too_large)?,
                Framing::Chunked => {
                    let mut pushed = Ok(());
                    let decoded = chunked
                        .decode(&data, |payload| {
                            if pushed.is_ok() {
                                pushed = splitter.push(payload);
                            }
                        })
                        .map_err(|e| {
                            RelayError::Upstream(ProxyError::new(
                                ErrorKind::UpstreamProtocol,
                                format!("the engine sent a malformed chunked body: {e}"),
                            ))
                        })?;
                    pushed.map_err(too_large)?;
                    done = decoded.done;
                    clean = decoded.consumed == data.len();
                }
                Framing::Empty => {}
            }
            let now = Instant::now();
            let mut events = 0;
            while let Some(event) = splitter.next_event() {
                if event_data(&event).is_some_and(|d| d.as_ref() != b"[DONE]") {
                    events += 1;
                }
                if let Some(learn) = r.on_response_id
                    && let Some(id) = lmstack_http::stored::event_response_id(&event)
                {
                    learn(&id);
                    r.on_response_id = None;
                }
                if let Some(u) = r.usage.as_deref_mut() {
                    u.observe(&event);
                }
                match r.ledger.as_deref_mut().map(|l| l.observe(&event)) {
                    None | Some(Verdict::Forward) => out.extend_from_slice(&event),
                    Some(Verdict::Rewrite(e)) => out.extend_from_slice(&e),
                    Some(Verdict::Drop) => {}
                }
            }
            r.clock.on_events(events, now);
            seen_event |= events > 0;
            if done && splitter.pending() > 0 {
                // The body ended inside an event: pass on what there is, as it came.
                let rest = splitter.next_rest();
                out.extend_from_slice(&rest);
            }
            if !out.is_empty() || r.head.is_some() {
                let batch = out.split();
                write_events(wr, &mut r.head, &batch, r.framing, r.write_timeout).await?;
            }
        }
        if done {
            return Ok(Relayed { reusable: clean });
        }
        let wait = if seen_event {
            r.idle_timeout
        } else {
            r.first_event_timeout
        };
        if !read_more(up, wait, framing).await? {
            let rest = splitter.next_rest();
            write_events(wr, &mut r.head, &rest, r.framing, r.write_timeout).await?;
            return Ok(Relayed { reusable: false });
        }
    }
}
