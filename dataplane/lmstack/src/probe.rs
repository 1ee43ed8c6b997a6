//! A small blocking HTTP/1.1 GET client for probing engines (`/health`, `/v1/models`) off
//! the request path, with one deadline for the whole exchange and a cap on the body size.

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
    io::Error::new(io::ErrorKind::TimedOut, "probe timed out")
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
    let mut stream = TcpStream::connect_timeout(&addr, timeout)?;
    let left = || deadline.checked_duration_since(Instant::now()).filter(|d| !d.is_zero());
    stream.set_write_timeout(Some(left().ok_or_else(timed_out)?))?;
    let request = format!(
        "GET {path} HTTP/1.1\r\nhost: {authority}\r\nuser-agent: lmstack-probe\r\naccept: application/json\r\nconnection: close\r\n\r\n"
    );
    stream.write_all(request.as_bytes())?;

    let mut buf = BytesMut::with_capacity(8192);
    let mut scratch = vec![0u8; 16 * 1024];
    let mut read_more = |stream: &mut TcpStream, buf: &mut BytesMut| -> io::Result<usize> {
        stream.set_read_timeout(Some(left().ok_or_else(timed_out)?))?;
        let n = stream.read(&mut scratch)?;
        buf.extend_from_slice(&scratch[..n]);
        Ok(n)
    };
    let mut scanner = HeadScanner::default();
    let head = loop {
        if let Some(head) =
            parse_response(&mut buf, &mut scanner, &LIMITS, false).map_err(|e| invalid(e.to_string()))?
        {
            if !head.is_interim() {
                break head;
            }
            continue;
        }
        if read_more(&mut stream, &mut buf)? == 0 {
            return Err(invalid("connection closed before the response head"));
        }
    };
    let mut body = Vec::new();
    match head.framing {
        Framing::Empty => {}
        Framing::Length(n) => {
            if n as usize > max_body {
                return Err(invalid("response body too large"));
            }
            while buf.len() < n as usize {
                if read_more(&mut stream, &mut buf)? == 0 {
                    return Err(invalid("connection closed mid-body"));
                }
            }
            body.extend_from_slice(&buf[..n as usize]);
        }
        Framing::Chunked => {
            let mut decoder = ChunkedDecoder::new();
            loop {
                let decoded = decoder
                    .decode(&buf, |p| body.extend_from_slice(p))
                    .map_err(|e| invalid(e.to_string()))?;
                let _ = buf.split_to(decoded.consumed);
                if body.len() > max_body {
                    return Err(invalid("response body too large"));
                }
                if decoded.done {
                    break;
                }
                if read_more(&mut stream, &mut buf)? == 0 {
                    return Err(invalid("connection closed mid-body"));
                }
            }
        }
        Framing::UntilClose => loop {
            body.extend_from_slice(&buf.split());
            if body.len() > max_body {
                return Err(invalid("response body too large"));
            }
            if read_more(&mut stream, &mut buf)? == 0 {
                break;
            }
        },
    }
    Ok(ProbeResponse {
        status: head.status,
        body,
    })
}
