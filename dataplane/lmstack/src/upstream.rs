//! Connections to engines: a per-worker keep-alive pool, connecting with a deadline, sending
//! a request and reading the response head.
//!
//! Not here: choosing the endpoint (policies), relaying the body (relay.rs), retries (the
//! pipeline decides, from the `Retry` set here).

use std::cell::RefCell;
use std::collections::HashMap;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use lmstack_http::head::{HeadLimits, HeadScanner, ResponseHead, parse_response};
use monoio::io::AsyncWriteRentExt;
use monoio::net::TcpStream;

use crate::error::{ErrorKind, ProxyError};

/// Bodies up to this size are copied behind the head and sent in one write.
const COALESCE_BODY_BYTES: usize = 16 * 1024;
/// Bytes requested per read.
pub const READ_CHUNK: usize = 16 * 1024;

/// An open connection to an endpoint, with bytes read from it but not yet consumed.
pub struct UpstreamConn {
    pub stream: TcpStream,
    pub buf: BytesMut,
    /// Taken from the pool (it may have been closed by the engine meanwhile).
    pub reused: bool,
    scanner: HeadScanner,
}

impl UpstreamConn {
    fn new(stream: TcpStream) -> Self {
        Self {
            stream,
            buf: BytesMut::with_capacity(READ_CHUNK),
            reused: false,
            scanner: HeadScanner::default(),
        }
    }

    /// Reads more bytes into `buf`; 0 means the engine closed the connection.
    pub async fn fill(&mut self) -> std::io::Result<usize> {
        crate::bufio::read_into(&mut self.stream, &mut self.buf, READ_CHUNK).await
    }
}

struct Idle {
    conn: UpstreamConn,
    since: Instant,
}

/// A worker's idle upstream connections, per endpoint address, newest last.
pub struct Pool {
    idle: RefCell<HashMap<SocketAddr, Vec<Idle>>>,
    max_idle: usize,
    idle_timeout: Duration,
}

impl Pool {
    pub fn new(max_idle: usize, idle_timeout: Duration) -> Self {
        Self {
            idle: RefCell::new(HashMap::new()),
            max_idle,
            idle_timeout,
        }
    }

    /// The most recently used idle connection to `addr` that is not too old.
    pub fn take(&self, addr: SocketAddr) -> Option<UpstreamConn> {
        let mut idle = self.idle.borrow_mut();
        let list = idle.get_mut(&addr)?;
        let entry = list.pop()?;
        if entry.since.elapsed() >= self.idle_timeout {
            // The newest is expired, so are all older ones.
            list.clear();
            return None;
        }
        let mut conn = entry.conn;
        conn.reused = true;
        Some(conn)
    }

    pub fn put(&self, addr: SocketAddr, mut conn: UpstreamConn) {
        if !conn.buf.is_empty() {
            return; // unread bytes: not in a clean state
        }
        conn.scanner.reset();
        let mut idle = self.idle.borrow_mut();
        let list = idle.entry(addr).or_default();
        if list.len() >= self.max_idle {
            list.remove(0);
        }
        list.push(Idle {
            conn,
            since: Instant::now(),
        });
    }

    /// Closes expired connections and those to endpoints for which `live` is false.
    pub fn sweep(&self, live: impl Fn(&SocketAddr) -> bool) {
        let mut idle = self.idle.borrow_mut();
        idle.retain(|addr, list| {
            list.retain(|e| e.since.elapsed() < self.idle_timeout);
            !list.is_empty() && live(addr)
        });
    }
}

pub async fn connect(addr: SocketAddr, timeout: Duration) -> Result<UpstreamConn, ProxyError> {
    match crate::time::timeout(timeout, TcpStream::connect_addr(addr)).await {
        Err(_) => Err(ProxyError::new(
            ErrorKind::UpstreamConnectTimeout,
            format!(
                "connecting to the engine at {addr} took longer than {} ms",
                timeout.as_millis()
            ),
        )
        .retry_elsewhere()),
        Ok(Err(e)) => Err(ProxyError::new(
            ErrorKind::UpstreamConnect,
            format!("cannot connect to the engine at {addr}: {e}"),
        )
        .retry_elsewhere()
        .with_source(e)),
        Ok(Ok(stream)) => {
            // Latency matters more than segment count for small requests and SSE chunks.
            let _ = stream.set_nodelay(true);
            Ok(UpstreamConn::new(stream))
        }
    }
}

/// Sends a request head and body. A failure here means the engine cannot have answered.
pub async fn send(conn: &mut UpstreamConn, mut head: Vec<u8>, body: &Bytes) -> Result<(), ProxyError> {
    let result = if body.len() <= COALESCE_BODY_BYTES {
        head.extend_from_slice(body);
        conn.stream.write_all(head).await.0
    } else {
        match conn.stream.write_all(head).await.0 {
            Ok(_) => conn.stream.write_all(body.clone()).await.0,
            Err(e) => Err(e),
        }
    };
    result.map(|_| ()).map_err(|e| {
        ProxyError::new(
            ErrorKind::UpstreamReset,
            format!("the engine closed the connection: {e}"),
        )
        .retry_elsewhere()
        .with_source(e)
    })
}

/// Reads the final response head (interim 1xx responses are skipped).
pub async fn read_head(
    conn: &mut UpstreamConn,
    limits: &HeadLimits,
    head_request: bool,
) -> Result<ResponseHead, ProxyError> {
    let mut received = false;
    loop {
        match parse_response(&mut conn.buf, &mut conn.scanner, limits, head_request) {
            Ok(Some(head)) if head.is_interim() => continue,
            Ok(Some(head)) => return Ok(head),
            Ok(None) => {}
            // A broken engine: nothing reached the client, another endpoint may take it.
            Err(e) => {
                return Err(ProxyError::new(
                    ErrorKind::UpstreamProtocol,
                    format!("the engine sent an invalid response: {e}"),
                )
                .retry_elsewhere());
            }
        }
        match conn.fill().await {
            Ok(0) if !received => {
                // Nothing came back: the engine (or a stale keep-alive connection) went away
                // before answering; trying again is safe.
                return Err(ProxyError::new(
                    ErrorKind::UpstreamReset,
                    "the engine closed the connection before responding",
                )
                .retry_elsewhere());
            }
            Err(e) if !received => {
                return Err(ProxyError::new(
                    ErrorKind::UpstreamReset,
                    "the engine closed the connection before responding",
                )
                .retry_elsewhere()
                .with_source(e));
            }
            Ok(0) => {
                return Err(ProxyError::new(
                    ErrorKind::UpstreamReset,
                    "the engine closed the connection in the middle of the response head",
                ));
            }
            Err(e) => {
                return Err(
                    ProxyError::new(ErrorKind::UpstreamReset, format!("reading from the engine failed: {e}"))
                        .with_source(e),
                );
            }
            Ok(_) => received = true,
        }
    }
}
