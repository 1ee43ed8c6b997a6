//! A small blocking HTTP/1.1 client for talking to engines and to lmstack-control off the
//! request path: `GET` with one deadline for the whole exchange and a cap on the body size,
//! and long-lived responses read piece by piece (a snapshot stream). Not a general client:
//! plain HTTP, one request per connection.

use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use bytes::BytesMut;
use lmstack_http::head::{HeadLimits, HeadScanner, parse_response};
use lmstack_http::{ChunkedDecoder, Framing};

pub struct ProbeResponse {
    pub status: u16,
    pub body: Vec<u8>,
}

const LIMITS: HeadLimits = HeadLimits {
    max_bytes: 64 * 1024,
    max_headers: 128,
};

fn timed_out() -> io::Error {
    io::Error::new(io::ErrorKind::TimedOut, "timed out")
}

fn invalid(msg: impl Into<String>) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, msg.into())
}

/// `GET path` on `addr`, all within `timeout`.
pub fn get(
    addr: SocketAddr,
    authority: &str,
    path: &str,
    timeout: Duration,
    max_body: usize,
) -> io::Result<ProbeResponse> {
    let deadline = Instant::now() + timeout;
    let mut response = Response::open(addr, authority, "GET", path, &[], timeout)?;
    let mut body = Vec::new();
    loop {
        let left = deadline
            .checked_duration_since(Instant::now())
            .filter(|d| !d.is_zero())
            .ok_or_else(timed_out)?;
        if !response.read_body(&mut body, left)? {
            break;
        }
        if body.len() > max_body {
            return Err(invalid("response body too large"));
        }
    }
    Ok(ProbeResponse {
        status: response.status,
        body,
    })
}

/// A response being read: the head is in, the body comes as it arrives.
pub struct Response {
    pub status: u16,
    stream: TcpStream,
    buf: BytesMut,
    scratch: Vec<u8>,
    framing: Framing,
    decoder: ChunkedDecoder,
    /// Bytes of a `Content-Length` body still to come.
    left: u64,
    done: bool,
}

impl Response {
    /// Sends `method path` with `body` (JSON when not empty) and reads the response head,
    /// all within `timeout`.
    pub fn open(
        addr: SocketAddr,
        authority: &str,
        method: &str,
        path: &str,
        body: &[u8],
        timeout: Duration,
    ) -> io::Result<Response> {
        let deadline = Instant::now() + timeout;
        let left = || deadline.checked_duration_since(Instant::now()).filter(|d| !d.is_zero());
        let mut stream = TcpStream::connect_timeout(&addr, timeout)?;
        stream.set_nodelay(true)?;
        stream.set_write_timeout(Some(left().ok_or_else(timed_out)?))?;
        let mut request = format!(
            "{method} {path} HTTP/1.1\r\nhost: {authority}\r\nuser-agent: lmstack-probe\r\naccept: application/json\r\nconnection: close\r\n"
        );
        if !body.is_empty() || method != "GET" {
            request.push_str(&format!(
                "content-type: application/json\r\ncontent-length: {}\r\n",
                body.len()
            ));
        }
        request.push_str("\r\n");
        let mut out = request.into_bytes();
        out.extend_from_slice(body);
        stream.write_all(&out)?;

        let mut response = Response {
            status: 0,
            stream,
            buf: BytesMut::with_capacity(8192),
            scratch: vec![0u8; 16 * 1024],
            framing: Framing::Empty,
            decoder: ChunkedDecoder::new(),
            left: 0,
            done: false,
        };
        let mut scanner = HeadScanner::default();
        let head = loop {
            if let Some(head) = parse_response(&mut response.buf, &mut scanner, &LIMITS, method == "HEAD")
                .map_err(|e| invalid(e.to_string()))?
            {
                if !head.is_interim() {
                    break head;
                }
                continue;
            }
            if response.fill(left().ok_or_else(timed_out)?)? == 0 {
                return Err(invalid("connection closed before the response head"));
            }
        };
        response.status = head.status;
        response.framing = head.framing;
        match head.framing {
            Framing::Empty => response.done = true,
            Framing::Length(n) => response.left = n,
            Framing::Chunked | Framing::UntilClose => {}
        }
        Ok(response)
    }

    fn fill(&mut self, timeout: Duration) -> io::Result<usize> {
        self.stream.set_read_timeout(Some(timeout))?;
        let n = self.stream.read(&mut self.scratch)?;
        self.buf.extend_from_slice(&self.scratch[..n]);
        Ok(n)
    }

    /// Appends the body bytes that are buffered, or else the next ones that arrive within
    /// `timeout` (an error if none do), to `out`. False once the body has ended.
    pub fn read_body(&mut self, out: &mut Vec<u8>, timeout: Duration) -> io::Result<bool> {
        if self.done {
            return Ok(false);
        }
        loop {
            let before = out.len();
            match self.framing {
                Framing::Empty => self.done = true,
                Framing::Length(_) => {
                    let take = self.buf.len().min(self.left as usize);
                    out.extend_from_slice(&self.buf.split_to(take));
                    self.left -= take as u64;
                    self.done = self.left == 0;
                }
                Framing::Chunked => {
                    let decoded = self
                        .decoder
                        .decode(&self.buf, |p| out.extend_from_slice(p))
                        .map_err(|e| invalid(e.to_string()))?;
                    let _ = self.buf.split_to(decoded.consumed);
                    self.done = decoded.done;
                }
                Framing::UntilClose => out.extend_from_slice(&self.buf.split()),
            }
            if self.done || out.len() > before {
                return Ok(true);
            }
            if self.fill(timeout)? == 0 {
                return match self.framing {
                    Framing::UntilClose => {
                        self.done = true;
                        Ok(false)
                    }
                    _ => Err(invalid("connection closed mid-body")),
                };
            }
        }
    }
}
