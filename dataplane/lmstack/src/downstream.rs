//! The client side of a connection: reading request heads and bodies within their limits,
//! and watching for the client to leave while its request is in flight.
//!
//! Bodies are read into one buffer sized for them and handed on as `Bytes` without copying
//! (chunked bodies are de-chunked, which copies the payload once). Bytes the client sends
//! ahead (pipelined requests) stay buffered for the next head. The connection is plain TCP
//! or TLS over it (`listen.tls`): one branch per read or write, nothing else differs. Not
//! here: what a request means (the pipeline), response formats (response.rs), the TLS
//! handshake and records (tls.rs).

use std::future::Future;
use std::net::SocketAddr;
use std::pin::pin;
use std::time::Duration;

use bytes::{Buf, Bytes, BytesMut};
use futures_util::future::{Either, select};
use lmstack_http::head::{HeadLimits, HeadScanner, RequestHead, parse_request};
use lmstack_http::{ChunkedDecoder, Framing};
use monoio::BufResult;
use monoio::buf::IoBuf;
use monoio::io::{AsyncWriteRent, AsyncWriteRentExt, CancelHandle, Canceller};
use monoio::io::{OwnedReadHalf, OwnedWriteHalf};
use monoio::net::TcpStream;
use monoio::time::Instant;

use crate::bufio;
use crate::error::{ErrorKind, ProxyError};
use crate::queue::Drain;
use crate::tls;

const READ_CHUNK: usize = 16 * 1024;
const CONTINUE: &[u8] = b"HTTP/1.1 100 Continue\r\n\r\n";

pub struct Downstream {
    pub reader: Reader,
    pub wr: WriteHalf,
    pub peer: SocketAddr,
}

impl Downstream {
    /// A plain TCP connection.
    pub fn new(stream: TcpStream, peer: SocketAddr) -> Self {
        let (rd, wr) = monoio::io::Splitable::into_split(stream);
        Self::with(ReadHalf::Plain(rd), WriteHalf::Plain(wr), peer)
    }

    /// A TLS connection, its handshake done.
    pub fn tls((rd, wr): (tls::Reader, tls::Writer), peer: SocketAddr) -> Self {
        Self::with(ReadHalf::Tls(rd), WriteHalf::Tls(wr), peer)
    }

    fn with(rd: ReadHalf, wr: WriteHalf, peer: SocketAddr) -> Self {
        Self {
            reader: Reader {
                rd,
                buf: BytesMut::with_capacity(READ_CHUNK),
                scanner: HeadScanner::default(),
            },
            wr,
            peer,
        }
    }

    /// Writes all of `bytes` within `timeout`; false when the client is gone.
    pub async fn write(&mut self, bytes: Vec<u8>, timeout: Duration) -> bool {
        matches!(
            crate::time::timeout(timeout, self.wr.write_all(bytes)).await,
            Ok((Ok(_), _))
        )
    }
}

/// The client connection's read side.
enum ReadHalf {
    Plain(OwnedReadHalf<TcpStream>),
    Tls(tls::Reader),
}

/// The client connection's write side: what responses are written to.
pub enum WriteHalf {
    Plain(OwnedWriteHalf<TcpStream>),
    Tls(tls::Writer),
}

impl WriteHalf {
    /// Writes all of `buf` (encrypted, over TLS) and gives it back.
    pub async fn write_all<T: IoBuf + AsRef<[u8]>>(&mut self, buf: T) -> BufResult<usize, T> {
        match self {
            Self::Plain(wr) => wr.write_all(buf).await,
            Self::Tls(wr) => wr.write_all(buf).await,
        }
    }

    /// Half-closes the connection (after close_notify, over TLS).
    pub async fn shutdown(&mut self) -> std::io::Result<()> {
        match self {
            Self::Plain(wr) => wr.shutdown().await,
            Self::Tls(wr) => wr.shutdown().await,
        }
    }

    /// Before a connection that ends cleanly is dropped: over TLS, says so (close_notify,
    /// within `timeout`), so that the client can tell the end from a cut. Plain TCP needs
    /// nothing (dropping it sends the FIN).
    pub async fn close(&mut self, timeout: Duration) {
        if let Self::Tls(wr) = self {
            let _ = crate::time::timeout(timeout, wr.shutdown()).await;
        }
    }
}

pub struct Reader {
    rd: ReadHalf,
    /// Read but not yet consumed: the rest of a body, or pipelined requests.
    pub buf: BytesMut,
    scanner: HeadScanner,
}

/// How waiting for the next request ended without one.
pub enum NoRequest {
    /// The client closed the connection, or stayed idle past the keep-alive timeout.
    Closed,
    /// Something arrived that is not a valid request head.
    Bad(ProxyError),
}

impl Reader {
    async fn fill(&mut self, want: usize) -> std::io::Result<usize> {
        match &mut self.rd {
            ReadHalf::Plain(rd) => bufio::read_into(rd, &mut self.buf, want).await,
            ReadHalf::Tls(rd) => rd.read_into(&mut self.buf, want).await,
        }
    }

    async fn cancelable_fill(&mut self, handle: CancelHandle) -> std::io::Result<usize> {
        match &mut self.rd {
            ReadHalf::Plain(rd) => bufio::cancelable_read_into(rd, &mut self.buf, READ_CHUNK, handle).await,
            ReadHalf::Tls(rd) => rd.cancelable_read_into(&mut self.buf, READ_CHUNK, handle).await,
        }
    }

    /// Reads and returns the count of bytes the client sent; the caller discards them.
    pub async fn discard(&mut self) -> std::io::Result<usize> {
        self.fill(READ_CHUNK).await
    }

    /// Waits for the next request head: `keepalive` for its first byte, then `header_timeout`
    /// for the rest. While the connection is idle (no byte of a next request yet) and the
    /// router drains (`drain`), it waits `drain_idle` at most.
    pub async fn read_head(
        &mut self,
        limits: &HeadLimits,
        (keepalive, header_timeout, drain_idle): (Duration, Duration, Duration),
        drain: &Drain,
    ) -> Result<RequestHead, NoRequest> {
        let mut deadline = (!self.buf.is_empty()).then(|| Instant::now() + header_timeout);
        loop {
            match parse_request(&mut self.buf, &mut self.scanner, limits) {
                Ok(Some(head)) => return Ok(head),
                Ok(None) => {}
                Err(e) => return Err(NoRequest::Bad(e.into())),
            }
            let mut wait = match deadline {
                Some(d) => d.saturating_duration_since(Instant::now()),
                None => keepalive,
            };
            // Decided before reading: a read cut short by the timeout takes the buffer along.
            let idle = deadline.is_none() || self.buf.iter().all(u8::is_ascii_whitespace);
            if idle && drain.fired() {
                wait = wait.min(drain_idle);
            }
            let mut read = pin!(crate::time::timeout(wait, self.fill(READ_CHUNK)));
            let read = if idle && !drain.fired() {
                // The read goes on when the drain begins (a request may be on its way), for
                // `drain_idle` more at most.
                match select(read.as_mut(), pin!(drain.wait())).await {
                    Either::Left((read, _)) => read,
                    Either::Right(_) => match crate::time::timeout(drain_idle, read).await {
                        Ok(read) => read,
                        Err(_) => return Err(NoRequest::Closed),
                    },
                }
            } else {
                read.await
            };
            match read {
                Ok(Ok(0)) | Ok(Err(_)) => return Err(NoRequest::Closed),
                Ok(Ok(_)) => {
                    deadline.get_or_insert_with(|| Instant::now() + header_timeout);
                }
                Err(_) if idle => return Err(NoRequest::Closed),
                Err(_) => {
                    return Err(NoRequest::Bad(ProxyError::new(
                        ErrorKind::RequestTimeout,
                        format!(
                            "the request head did not arrive within {} ms",
                            header_timeout.as_millis()
                        ),
                    )));
                }
            }
        }
    }

    /// Reads the body of `head`, answering `Expect: 100-continue` when it is wanted.
    pub async fn read_body(
        &mut self,
        head: &RequestHead,
        wr: &mut WriteHalf,
        max_bytes: usize,
        timeout: Duration,
    ) -> Result<Bytes, ProxyError> {
        let too_large = || {
            ProxyError::new(
                ErrorKind::BodyTooLarge,
                format!("the request body is larger than the limit of {max_bytes} bytes"),
            )
        };
        let deadline = Instant::now() + timeout;
        let timed_out = || {
            ProxyError::new(
                ErrorKind::RequestTimeout,
                format!("the request body did not arrive within {} ms", timeout.as_millis()),
            )
        };
        let closed = || ProxyError::new(ErrorKind::MalformedRequest, "the client closed the connection mid-body");
        match head.framing {
            Framing::Empty | Framing::UntilClose => Ok(Bytes::new()),
            Framing::Length(n) => {
                if n > max_bytes as u64 {
                    return Err(too_large());
                }
                let n = n as usize;
                if head.expect_continue && self.buf.len() < n {
                    send_continue(wr).await?;
                }
                while self.buf.len() < n {
                    let want = n - self.buf.len();
                    match crate::time::timeout_at(deadline, self.fill(want.min(max_bytes))).await {
                        Err(_) => return Err(timed_out()),
                        Ok(Ok(0)) | Ok(Err(_)) => return Err(closed()),
                        Ok(Ok(_)) => {}
                    }
                }
                Ok(self.buf.split_to(n).freeze())
            }
            Framing::Chunked => {
                if head.expect_continue && self.buf.is_empty() {
                    send_continue(wr).await?;
                }
                let mut decoder = ChunkedDecoder::new();
                let mut body = BytesMut::new();
                loop {
                    if !self.buf.is_empty() {
                        let mut over = false;
                        let decoded = decoder
                            .decode(&self.buf, |p| {
                                if body.len() + p.len() > max_bytes {
                                    over = true;
                                } else {
                                    body.extend_from_slice(p);
                                }
                            })
                            .map_err(|e| {
                                ProxyError::new(ErrorKind::MalformedRequest, format!("invalid chunked body: {e}"))
                            })?;
                        if over {
                            return Err(too_large());
                        }
                        self.buf.advance(decoded.consumed);
                        if decoded.done {
                            return Ok(body.freeze());
                        }
                    }
                    match crate::time::timeout_at(deadline, self.fill(READ_CHUNK)).await {
                        Err(_) => return Err(timed_out()),
                        Ok(Ok(0)) | Ok(Err(_)) => return Err(closed()),
                        Ok(Ok(_)) => {}
                    }
                }
            }
        }
    }

    /// Runs `work` while watching the client connection. Returns `None` if the client closed
    /// (or reset) the connection first: `work` is then dropped, which abandons its engine
    /// connection and so cancels the request there. Bytes the client sends meanwhile are
    /// kept for its next request, up to `max_buffered`; beyond that the watch pauses.
    ///
    /// The watch (a read, and its cancellation when `work` ends first) starts only after
    /// `arm_after`: exchanges that finish sooner cost no extra IO.
    pub async fn unless_client_leaves<F: Future>(
        &mut self,
        max_buffered: usize,
        arm_after: Duration,
        work: F,
    ) -> Option<F::Output> {
        let mut work = pin!(work);
        if !arm_after.is_zero()
            && let Either::Left((output, _)) = select(work.as_mut(), crate::time::sleep(arm_after)).await
        {
            return Some(output);
        }
        loop {
            if self.buf.len() >= max_buffered {
                return Some(work.await);
            }
            let canceller = Canceller::new();
            let read = pin!(self.cancelable_fill(canceller.handle()));
            match select(work.as_mut(), read).await {
                Either::Left((output, read)) => {
                    // Stop the watch and collect what it read, if anything.
                    let _ = canceller.cancel();
                    let _ = read.await;
                    return Some(output);
                }
                Either::Right((Ok(0) | Err(_), _)) => return None,
                Either::Right((Ok(_), _)) => continue,
            }
        }
    }
}

async fn send_continue(wr: &mut WriteHalf) -> Result<(), ProxyError> {
    match wr.write_all(CONTINUE).await {
        (Ok(_), _) => Ok(()),
        (Err(e), _) => {
            Err(ProxyError::new(ErrorKind::MalformedRequest, format!("cannot write 100 Continue: {e}")).with_source(e))
        }
    }
}
