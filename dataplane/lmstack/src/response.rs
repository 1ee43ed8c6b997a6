//! Heads the proxy writes: requests to engines, responses to clients (relayed or local).
//!
//! Hop-by-hop headers are dropped both ways (RFC 9110 7.6.1), framing headers are written
//! from the framing actually used, and `x-request-id` is kept or added. Not here: bodies.

use std::net::IpAddr;

use lmstack_http::head::{Headers, RequestHead, ResponseHead, is_hop_by_hop, tokens};
use lmstack_http::{Framing, Version};

use crate::error::{Dialect, ProxyError};

pub const REQUEST_ID: &str = "x-request-id";
/// Why a request went where it went (`routing.explain_header`).
pub const ROUTE: &str = "x-lmstack-route";

/// Header names the sender listed in `Connection` (also hop-by-hop).
fn connection_listed(headers: &Headers) -> Vec<&[u8]> {
    headers
        .iter()
        .filter(|(n, _)| n.eq_ignore_ascii_case(b"connection"))
        .flat_map(|(_, v)| tokens(v))
        .collect()
}

fn forwardable<'a>(headers: &'a Headers) -> impl Iterator<Item = (&'a [u8], &'a [u8])> + 'a {
    let listed = connection_listed(headers);
    headers
        .iter()
        .filter(move |(n, _)| !is_hop_by_hop(n) && !listed.iter().any(|l| l.eq_ignore_ascii_case(n)))
}

fn header(out: &mut Vec<u8>, name: &[u8], value: &[u8]) {
    out.extend_from_slice(name);
    out.extend_from_slice(b": ");
    out.extend_from_slice(value);
    out.extend_from_slice(b"\r\n");
}

/// The request head sent to an engine. `trace`: the router's `traceparent` (tracing on),
/// which replaces the client's, and whether its trace is new (the client's `tracestate`,
/// of another trace or none, is then dropped, as W3C Trace Context says); `None` forwards
/// the client's untouched.
pub fn upstream_request(
    head: &RequestHead,
    authority: &str,
    body_len: usize,
    request_id: Option<&str>,
    client: IpAddr,
    drop_credentials: bool,
    trace: Option<(&str, bool)>,
) -> Vec<u8> {
    let mut out = Vec::with_capacity(head.raw_len() + 128);
    out.extend_from_slice(head.method().as_bytes());
    out.push(b' ');
    out.extend_from_slice(head.target().as_bytes());
    out.extend_from_slice(b" HTTP/1.1\r\n");
    header(&mut out, b"host", authority.as_bytes());
    let mut forwarded_for = None;
    for (name, value) in forwardable(&head.headers) {
        if name.eq_ignore_ascii_case(b"host") {
            continue;
        }
        // The router's own API keys stay with the router.
        if drop_credentials && (name.eq_ignore_ascii_case(b"authorization") || name.eq_ignore_ascii_case(b"x-api-key"))
        {
            continue;
        }
        if name.eq_ignore_ascii_case(b"x-forwarded-for") {
            forwarded_for = Some(value);
            continue;
        }
        if let Some((_, new)) = trace
            && (name.eq_ignore_ascii_case(b"traceparent") || (new && name.eq_ignore_ascii_case(b"tracestate")))
        {
            continue;
        }
        header(&mut out, name, value);
    }
    if let Some((tp, _)) = trace {
        header(&mut out, b"traceparent", tp.as_bytes());
    }
    let client = client.to_string();
    match forwarded_for {
        Some(prior) => header(
            &mut out,
            b"x-forwarded-for",
            &[prior, b", ", client.as_bytes()].concat(),
        ),
        None => header(&mut out, b"x-forwarded-for", client.as_bytes()),
    }
    if let Some(id) = request_id {
        header(&mut out, REQUEST_ID.as_bytes(), id.as_bytes());
    }
    if body_len > 0 || head.method() == "POST" {
        header(&mut out, b"content-length", body_len.to_string().as_bytes());
    }
    out.extend_from_slice(b"\r\n");
    out
}

/// How the relayed body goes to the client, for the head's framing headers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BodyOut {
    /// As the engine framed it.
    AsIs,
    /// Without framing, ended by closing the connection (HTTP/1.0 clients).
    Unframed,
    /// In the router's own chunks (event streams).
    Chunked,
}

/// The response head relayed to the client.
pub fn downstream_response(
    up: &ResponseHead,
    body: BodyOut,
    keep_alive: bool,
    client_version: Version,
    request_id: Option<&str>,
    route: Option<&str>,
    extra: &str,
) -> Vec<u8> {
    let mut out = Vec::with_capacity(up.headers.len() * 40 + 128);
    status_line(&mut out, up.status, up.reason());
    for (name, value) in forwardable(&up.headers) {
        header(&mut out, name, value);
    }
    match (body, up.framing) {
        (BodyOut::Unframed, _) => {}
        (BodyOut::Chunked, _) => header(&mut out, b"transfer-encoding", b"chunked"),
        (BodyOut::AsIs, Framing::Length(n)) => header(&mut out, b"content-length", n.to_string().as_bytes()),
        (BodyOut::AsIs, Framing::Chunked) => header(&mut out, b"transfer-encoding", b"chunked"),
        (BodyOut::AsIs, Framing::Empty) if up.status >= 200 && up.status != 204 && up.status != 304 => {
            header(&mut out, b"content-length", b"0");
        }
        _ => {}
    }
    if let Some(id) = request_id
        && up.headers.get(REQUEST_ID).is_none()
    {
        header(&mut out, REQUEST_ID.as_bytes(), id.as_bytes());
    }
    if let Some(route) = route {
        header(&mut out, ROUTE.as_bytes(), route.as_bytes());
    }
    out.extend_from_slice(extra.as_bytes());
    connection_header(&mut out, keep_alive, client_version);
    out.extend_from_slice(b"\r\n");
    out
}

fn connection_header(out: &mut Vec<u8>, keep_alive: bool, client_version: Version) {
    if !keep_alive {
        header(out, b"connection", b"close");
    } else if client_version == Version::Http10 {
        header(out, b"connection", b"keep-alive");
    }
}

fn status_line(out: &mut Vec<u8>, status: u16, reason: &[u8]) {
    out.extend_from_slice(b"HTTP/1.1 ");
    out.extend_from_slice(status.to_string().as_bytes());
    out.push(b' ');
    if reason.is_empty() {
        out.extend_from_slice(canonical_reason(status).as_bytes());
    } else {
        out.extend_from_slice(reason);
    }
    out.extend_from_slice(b"\r\n");
}

/// A complete response generated by the router itself.
pub fn local(
    status: u16,
    content_type: &str,
    body: &[u8],
    keep_alive: bool,
    client_version: Version,
    request_id: Option<&str>,
    extra: &str,
) -> Vec<u8> {
    let mut out = Vec::with_capacity(body.len() + extra.len() + 192);
    status_line(&mut out, status, b"");
    header(&mut out, b"content-type", content_type.as_bytes());
    header(&mut out, b"content-length", body.len().to_string().as_bytes());
    if let Some(id) = request_id {
        header(&mut out, REQUEST_ID.as_bytes(), id.as_bytes());
    }
    out.extend_from_slice(extra.as_bytes());
    connection_header(&mut out, keep_alive, client_version);
    out.extend_from_slice(b"\r\n");
    out.extend_from_slice(body);
    out
}

/// The error response for `error`, in `dialect`'s shape (the one place errors are turned
/// into responses).
pub fn error(
    error: &ProxyError,
    dialect: Dialect,
    keep_alive: bool,
    client_version: Version,
    request_id: Option<&str>,
) -> Vec<u8> {
    let keep_alive = keep_alive && !error.kind.closes_connection();
    local(
        error.kind.status(),
        "application/json",
        &error.body_in(dialect),
        keep_alive,
        client_version,
        request_id,
        error.headers.as_deref().unwrap_or(""),
    )
}

fn canonical_reason(status: u16) -> &'static str {
    match status {
        100 => "Continue",
        200 => "OK",
        201 => "Created",
        204 => "No Content",
        400 => "Bad Request",
        401 => "Unauthorized",
        403 => "Forbidden",
        404 => "Not Found",
        405 => "Method Not Allowed",
        408 => "Request Timeout",
        413 => "Content Too Large",
        417 => "Expectation Failed",
        422 => "Unprocessable Content",
        429 => "Too Many Requests",
        431 => "Request Header Fields Too Large",
        500 => "Internal Server Error",
        501 => "Not Implemented",
        502 => "Bad Gateway",
        503 => "Service Unavailable",
        504 => "Gateway Timeout",
        _ => "Unknown",
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::BytesMut;
    use lmstack_http::head::{HeadLimits, HeadScanner, parse_request, parse_response};

    const LIMITS: HeadLimits = HeadLimits {
        max_bytes: 8192,
        max_headers: 64,
    };

    fn request(raw: &[u8]) -> RequestHead {
        parse_request(&mut BytesMut::from(raw), &mut HeadScanner::default(), &LIMITS)
            .unwrap()
            .unwrap()
    }

    #[test]
    fn forwards_end_to_end_headers_only() {
        let head = request(
            b"POST /v1/completions HTTP/1.1\r\nHost: router\r\nConnection: keep-alive, X-Secret\r\n\
X-Secret: 1\r\nTransfer-Encoding: chunked\r\nAuthorization: Bearer k\r\nX-Forwarded-For: 1.2.3.4\r\n\
X-User-Id: u\r\n\r\n",
        );
        let out = upstream_request(
            &head,
            "engine:8000",
            5,
            Some("rid"),
            "10.0.0.9".parse().unwrap(),
            false,
            None,
        );
        let text = String::from_utf8(out).unwrap();
        assert!(text.starts_with("POST /v1/completions HTTP/1.1\r\nhost: engine:8000\r\n"));
        assert!(text.contains("Authorization: Bearer k\r\n"));
        assert!(text.contains("X-User-Id: u\r\n"));
        assert!(text.contains("x-forwarded-for: 1.2.3.4, 10.0.0.9\r\n"));
        assert!(text.contains("x-request-id: rid\r\n"));
        assert!(text.contains("content-length: 5\r\n"));
        assert!(!text.to_ascii_lowercase().contains("transfer-encoding"));
        assert!(!text.contains("X-Secret"));
        assert!(!text.contains("Connection"));
        assert!(text.ends_with("\r\n\r\n"));
        // With API keys on, the client's key stays with the router.
        let out = upstream_request(&head, "engine:8000", 5, None, "10.0.0.9".parse().unwrap(), true, None);
        let text = String::from_utf8(out).unwrap();
        assert!(!text.contains("Authorization"), "{text}");
        assert!(text.contains("X-User-Id: u\r\n"));
    }

    #[test]
    fn the_routers_traceparent_replaces_the_clients_and_tracestate_goes_on_in_the_same_trace() {
        let head = request(
            b"POST /v1/completions HTTP/1.1\r\nHost: router\r\n\
traceparent: 00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01\r\ntracestate: k=v\r\n\r\n",
        );
        let ip = "10.0.0.9".parse().unwrap();
        let text = String::from_utf8(upstream_request(&head, "e:1", 0, None, ip, false, None)).unwrap();
        assert!(text.contains("traceparent: 00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01\r\n"));
        let ours = "00-4bf92f3577b34da6a3ce929d0e0e4736-1111111111111111-01";
        let text = String::from_utf8(upstream_request(&head, "e:1", 0, None, ip, false, Some((ours, false)))).unwrap();
        assert_eq!(text.matches("traceparent").count(), 1, "{text}");
        assert!(text.contains(&format!("traceparent: {ours}\r\n")));
        assert!(text.contains("tracestate: k=v\r\n"));
        // A new trace (the client's context was malformed) leaves the client's state behind.
        let text = String::from_utf8(upstream_request(&head, "e:1", 0, None, ip, false, Some((ours, true)))).unwrap();
        assert!(text.contains(&format!("traceparent: {ours}\r\n")));
        assert!(!text.contains("tracestate"), "{text}");
    }

    #[test]
    fn relayed_heads_keep_framing_and_drop_hop_by_hop() {
        let mut buf = BytesMut::from(
            &b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\nconnection: keep-alive\r\nkeep-alive: timeout=5\r\n\r\n"[..],
        );
        let up = parse_response(&mut buf, &mut HeadScanner::default(), &LIMITS, false)
            .unwrap()
            .unwrap();
        let text = String::from_utf8(downstream_response(
            &up,
            BodyOut::AsIs,
            true,
            Version::Http11,
            Some("r"),
            None,
            "x-ratelimit-limit-requests: 2\r\n",
        ))
        .unwrap();
        assert_eq!(
            text,
            "HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\nx-request-id: r\r\nx-ratelimit-limit-requests: 2\r\n\r\n"
        );
        let text = String::from_utf8(downstream_response(
            &up,
            BodyOut::Unframed,
            false,
            Version::Http10,
            None,
            Some("policy=x"),
            "",
        ))
        .unwrap();
        assert_eq!(
            text,
            "HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\nx-lmstack-route: policy=x\r\nconnection: close\r\n\r\n"
        );
    }

    #[test]
    fn local_responses_are_complete() {
        let text = String::from_utf8(local(503, "application/json", b"{}", true, Version::Http10, None, "")).unwrap();
        assert_eq!(
            text,
            "HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\ncontent-length: 2\r\nconnection: keep-alive\r\n\r\n{}"
        );
    }
}
