//! Relaying a response body from an engine to the client as it arrives.
//!
//! Bytes are written out as they were read (chunked framing and SSE untouched), while the
//! framing is tracked to know where the response ends (so the engine connection can be
//! reused) and SSE data events are counted and timed. The one rewrite: an HTTP/1.0 client
//! cannot take chunked encoding, so for it the payload is de-chunked and the connection
//! closed at the end. Not here: the response head, retries, metrics names.

use std::cell::Cell;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use bytes::Bytes;
use lmstack_http::{ChunkedDecoder, Framing, SseCounter};
use monoio::io::AsyncWriteRentExt;
use monoio::io::OwnedWriteHalf;
use monoio::net::TcpStream;

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
    metrics: &'a PairMetrics,
    first_byte: &'a FirstByte<'a>,
}

impl<'a> StreamClock<'a> {
    pub fn new(start: Instant, metrics: &'a PairMetrics, first_byte: &'a FirstByte<'a>) -> Self {
        Self {
            start,
            last: None,
            metrics,
            first_byte,
        }
    }

    fn on_events(&mut self, n: u32, now: Instant) {
        if n == 0 {
            return;
        }
        self.metrics.events(u64::from(n));
        match self.last {
            None => {
                self.first_byte.mark();
                self.metrics.ttft(now.duration_since(self.start).as_secs_f64());
            }
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
    wr: &mut OwnedWriteHalf<TcpStream>,
    head: Vec<u8>,
    framing: Framing,
    out: OutFraming,
    mut clock: Option<&mut StreamClock<'_>>,
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
                    (take, remaining == 0, None)
                }
                Framing::UntilClose => {
                    if clock.is_some() {
                        events += sse.feed(&data).data;
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
        match crate::time::timeout(idle_timeout, up.fill()).await {
            Err(_) => {
                return Err(RelayError::Upstream(ProxyError::new(
                    ErrorKind::UpstreamTimeout,
                    format!("the engine sent nothing for {} ms", idle_timeout.as_millis()),
                )));
            }
            Ok(Ok(0)) if framing == Framing::UntilClose => return Ok(Relayed { reusable: false }),
            Ok(Ok(0)) => {
                return Err(RelayError::Upstream(ProxyError::new(
                    ErrorKind::UpstreamReset,
                    "the engine closed the connection before the end of the response",
                )));
            }
            Ok(Err(e)) => {
                return Err(RelayError::Upstream(
                    ProxyError::new(ErrorKind::UpstreamReset, format!("reading from the engine failed: {e}"))
                        .with_source(e),
                ));
            }
            Ok(Ok(_)) => {}
        }
    }
}

/// Writes to the client with a deadline; any failure means the client is gone.
pub async fn write(wr: &mut OwnedWriteHalf<TcpStream>, bytes: Bytes, timeout: Duration) -> Result<(), RelayError> {
    match crate::time::timeout(timeout, wr.write_all(bytes)).await {
        Ok((Ok(_), _)) => Ok(()),
        _ => Err(RelayError::Downstream),
    }
}
