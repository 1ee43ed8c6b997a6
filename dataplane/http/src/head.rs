//! HTTP/1.1 message heads, parsed by httparse into one shared `Bytes` with spans into it.
//!
//! It is not a general HTTP library: it keeps exactly what a proxy needs (method, target,
//! status, headers, body framing, keep-alive, `Expect`) and rejects what would make framing
//! ambiguous (conflicting `Content-Length`, `Content-Length` with `Transfer-Encoding`).

use std::mem::MaybeUninit;
use std::ops::Range;

use bytes::{Bytes, BytesMut};

/// The most header lines a head may be configured to hold.
pub const MAX_HEADERS_CAP: usize = 256;

/// Limits applied while a head is read.
#[derive(Clone, Copy, Debug)]
pub struct HeadLimits {
    /// Largest head (request line or status line plus all header lines), in bytes.
    pub max_bytes: usize,
    /// Most header lines (at most [`MAX_HEADERS_CAP`]).
    pub max_headers: usize,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Version {
    Http10,
    Http11,
}

/// How the body of a message is delimited.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Framing {
    /// No body at all.
    Empty,
    /// `Content-Length: n`.
    Length(u64),
    /// `Transfer-Encoding: chunked`.
    Chunked,
    /// Responses only: the body runs until the connection closes.
    UntilClose,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum HeadError {
    #[error("request head larger than {0} bytes")]
    TooLarge(usize),
    #[error("more than {0} header lines")]
    TooManyHeaders(usize),
    #[error("malformed message head: {0}")]
    Malformed(&'static str),
    #[error("unsupported transfer-encoding (only chunked is supported)")]
    UnsupportedTransferEncoding,
    #[error("unsupported expectation (only 100-continue is supported)")]
    UnsupportedExpectation,
}

#[derive(Clone, Copy, Debug)]
struct Span {
    start: u32,
    end: u32,
}

impl Span {
    fn range(self) -> Range<usize> {
        self.start as usize..self.end as usize
    }
}

#[derive(Clone, Copy, Debug)]
struct HeaderSpan {
    name: Span,
    value: Span,
}

/// Header lines of a parsed head, borrowed from its raw bytes.
#[derive(Clone, Debug)]
pub struct Headers {
    raw: Bytes,
    spans: Vec<HeaderSpan>,
}

impl Headers {
    /// The header lines httparse found in `raw`, as spans into it.
    fn new(raw: &Bytes, parsed: &[httparse::Header<'_>]) -> Self {
        let spans = parsed
            .iter()
            .map(|h| HeaderSpan {
                name: span_of(raw, h.name.as_bytes()),
                value: span_of(raw, h.value),
            })
            .collect();
        Self {
            raw: raw.clone(),
            spans,
        }
    }

    /// All header lines in order, names as sent.
    pub fn iter(&self) -> impl Iterator<Item = (&[u8], &[u8])> + '_ {
        self.spans
            .iter()
            .map(|h| (&self.raw[h.name.range()], &self.raw[h.value.range()]))
    }

    /// The first value of `name` (ASCII case-insensitive).
    pub fn get(&self, name: &str) -> Option<&[u8]> {
        self.iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name.as_bytes()))
            .map(|(_, v)| v)
    }

    /// The first value of `name` as text, if it is valid UTF-8 and not empty.
    pub fn get_str(&self, name: &str) -> Option<&str> {
        self.get(name)
            .and_then(|v| std::str::from_utf8(v).ok())
            .map(str::trim)
            .filter(|v| !v.is_empty())
    }

    pub fn len(&self) -> usize {
        self.spans.len()
    }

    pub fn is_empty(&self) -> bool {
        self.spans.is_empty()
    }
}

/// A parsed request head.
#[derive(Clone, Debug)]
pub struct RequestHead {
    method: Span,
    target: Span,
    pub version: Version,
    pub headers: Headers,
    pub framing: Framing,
    /// The client wants the connection kept open after this exchange.
    pub keep_alive: bool,
    /// `Expect: 100-continue` was sent.
    pub expect_continue: bool,
}

impl RequestHead {
    pub fn method(&self) -> &str {
        // httparse guarantees the method is a token (ASCII).
        std::str::from_utf8(&self.headers.raw[self.method.range()]).unwrap_or("")
    }

    /// The request target as sent (origin form: path and query).
    pub fn target(&self) -> &str {
        std::str::from_utf8(&self.headers.raw[self.target.range()]).unwrap_or("")
    }

    /// The path without the query string.
    pub fn path(&self) -> &str {
        let target = self.target();
        target.split_once('?').map_or(target, |(p, _)| p)
    }

    /// Size of the raw head in bytes.
    pub fn raw_len(&self) -> usize {
        self.headers.raw.len()
    }
}

/// A parsed response head.
#[derive(Clone, Debug)]
pub struct ResponseHead {
    pub status: u16,
    reason: Span,
    pub version: Version,
    pub headers: Headers,
    /// Body framing, given the request method did not forbid a body.
    pub framing: Framing,
    /// The server keeps the connection open after this response.
    pub keep_alive: bool,
}

impl ResponseHead {
    pub fn reason(&self) -> &[u8] {
        &self.headers.raw[self.reason.range()]
    }

    /// 1xx responses are interim: a final response follows on the same connection.
    pub fn is_interim(&self) -> bool {
        (100..200).contains(&self.status)
    }
}

/// Finds where a head ends, remembering how far it has looked so that a head that arrives a
/// byte at a time is still scanned in linear time.
#[derive(Debug, Default)]
pub struct HeadScanner {
    scanned: usize,
}

impl HeadScanner {
    /// Returns the length of the head (including the blank line) if `buf` holds a whole one.
    pub fn find_end(&mut self, buf: &[u8]) -> Option<usize> {
        let from = self.scanned.saturating_sub(3);
        for lf in memchr::memchr_iter(b'\n', &buf[from..]) {
            let i = from + lf;
            // LF LF, or LF CR LF: the line before this LF was empty.
            let blank_line = (i >= 1 && buf[i - 1] == b'\n') || (i >= 2 && &buf[i - 2..i] == b"\n\r");
            if blank_line {
                self.scanned = 0;
                return Some(i + 1);
            }
        }
        self.scanned = buf.len();
        None
    }

    pub fn reset(&mut self) {
        self.scanned = 0;
    }
}

fn span_of(base: &[u8], part: &[u8]) -> Span {
    let start = part.as_ptr() as usize - base.as_ptr() as usize;
    Span {
        start: start as u32,
        end: (start + part.len()) as u32,
    }
}

fn version_of(v: Option<u8>) -> Version {
    match v {
        Some(0) => Version::Http10,
        _ => Version::Http11,
    }
}

/// Splits a comma-separated header value into trimmed, non-empty tokens.
pub fn tokens(value: &[u8]) -> impl Iterator<Item = &[u8]> {
    value
        .split(|&b| b == b',')
        .map(|t| t.trim_ascii())
        .filter(|t| !t.is_empty())
}

/// What the framing headers of a message say, checked for conflicts.
struct FramingHeaders {
    content_length: Option<u64>,
    chunked: bool,
    connection_close: bool,
    connection_keep_alive: bool,
}

fn framing_headers(headers: &[httparse::Header<'_>]) -> Result<FramingHeaders, HeadError> {
    let mut out = FramingHeaders {
        content_length: None,
        chunked: false,
        connection_close: false,
        connection_keep_alive: false,
    };
    let mut transfer_encoding = false;
    for h in headers {
        if h.name.eq_ignore_ascii_case("content-length") {
            // An empty value (or commas alone) is an invalid length, not an absent one
            // (RFC 9112 6.3): read as absent, it would let `Transfer-Encoding` through beside it.
            if tokens(h.value).next().is_none() {
                return Err(HeadError::Malformed("invalid content-length"));
            }
            for token in tokens(h.value) {
                let n = parse_decimal(token).ok_or(HeadError::Malformed("invalid content-length"))?;
                match out.content_length {
                    Some(prev) if prev != n => {
                        return Err(HeadError::Malformed("conflicting content-length values"));
                    }
                    _ => out.content_length = Some(n),
                }
            }
        } else if h.name.eq_ignore_ascii_case("transfer-encoding") {
            // Only `chunked` alone is supported; it must be the final (here: only) coding.
            for token in tokens(h.value) {
                if !token.eq_ignore_ascii_case(b"chunked") || out.chunked {
                    return Err(HeadError::UnsupportedTransferEncoding);
                }
                out.chunked = true;
            }
            transfer_encoding = true;
        } else if h.name.eq_ignore_ascii_case("connection") {
            for token in tokens(h.value) {
                if token.eq_ignore_ascii_case(b"close") {
                    out.connection_close = true;
                } else if token.eq_ignore_ascii_case(b"keep-alive") {
                    out.connection_keep_alive = true;
                }
            }
        }
    }
    if transfer_encoding && !out.chunked {
        return Err(HeadError::UnsupportedTransferEncoding);
    }
    if out.chunked && out.content_length.is_some() {
        return Err(HeadError::Malformed("both content-length and transfer-encoding"));
    }
    Ok(out)
}

fn parse_decimal(digits: &[u8]) -> Option<u64> {
    if digits.is_empty() || digits.len() > 19 || !digits.iter().all(u8::is_ascii_digit) {
        return None;
    }
    digits
        .iter()
        .try_fold(0u64, |acc, d| acc.checked_mul(10)?.checked_add(u64::from(d - b'0')))
}

fn keep_alive(version: Version, f: &FramingHeaders) -> bool {
    match version {
        Version::Http11 => !f.connection_close,
        Version::Http10 => f.connection_keep_alive && !f.connection_close,
    }
}

fn map_parse_error(e: httparse::Error, limits: &HeadLimits) -> HeadError {
    match e {
        httparse::Error::TooManyHeaders => HeadError::TooManyHeaders(limits.max_headers),
        httparse::Error::Version => HeadError::Malformed("unsupported HTTP version"),
        httparse::Error::Status => HeadError::Malformed("invalid status"),
        httparse::Error::Token => HeadError::Malformed("invalid token"),
        httparse::Error::HeaderName => HeadError::Malformed("invalid header name"),
        httparse::Error::HeaderValue => HeadError::Malformed("invalid header value"),
        httparse::Error::NewLine => HeadError::Malformed("invalid line ending"),
    }
}

/// Splits a whole head off the front of `buf`, if it holds one within the size limit.
fn split_head(buf: &mut BytesMut, scanner: &mut HeadScanner, limits: &HeadLimits) -> Result<Option<Bytes>, HeadError> {
    let Some(end) = scanner.find_end(buf) else {
        if buf.len() > limits.max_bytes {
            return Err(HeadError::TooLarge(limits.max_bytes));
        }
        return Ok(None);
    };
    if end > limits.max_bytes {
        return Err(HeadError::TooLarge(limits.max_bytes));
    }
    Ok(Some(buf.split_to(end).freeze()))
}

/// Parses a request head from the front of `buf`, splitting it off. `Ok(None)` means more
/// bytes are needed.
pub fn parse_request(
    buf: &mut BytesMut,
    scanner: &mut HeadScanner,
    limits: &HeadLimits,
) -> Result<Option<RequestHead>, HeadError> {
    let Some(raw) = split_head(buf, scanner, limits)? else {
        return Ok(None);
    };
    let mut headers = [const { MaybeUninit::<httparse::Header<'_>>::uninit() }; MAX_HEADERS_CAP];
    let mut req = httparse::Request::new(&mut []);
    let result = req.parse_with_uninit_headers(&raw, &mut headers[..limits.max_headers.min(MAX_HEADERS_CAP)]);
    let parsed = match result {
        Ok(httparse::Status::Complete(_)) => {
            let method = req.method.ok_or(HeadError::Malformed("missing method"))?;
            let target = req.path.ok_or(HeadError::Malformed("missing request target"))?;
            let version = version_of(req.version);
            let framing_h = framing_headers(req.headers)?;
            let mut expect_continue = false;
            for h in req.headers.iter() {
                if h.name.eq_ignore_ascii_case("expect") {
                    if h.value.trim_ascii().eq_ignore_ascii_case(b"100-continue") {
                        expect_continue = version == Version::Http11;
                    } else {
                        return Err(HeadError::UnsupportedExpectation);
                    }
                }
            }
            let framing = if framing_h.chunked {
                Framing::Chunked
            } else {
                match framing_h.content_length {
                    Some(0) | None => Framing::Empty,
                    Some(n) => Framing::Length(n),
                }
            };
            Ok(RequestHead {
                method: span_of(&raw, method.as_bytes()),
                target: span_of(&raw, target.as_bytes()),
                version,
                framing,
                keep_alive: keep_alive(version, &framing_h),
                expect_continue,
                headers: Headers::new(&raw, req.headers),
            })
        }
        Ok(httparse::Status::Partial) => Err(HeadError::Malformed("incomplete head")),
        Err(e) => Err(map_parse_error(e, limits)),
    };
    parsed.map(Some)
}

/// Parses a response head from the front of `buf`, splitting it off. `head_request` tells
/// whether the request was `HEAD` (its response never has a body).
pub fn parse_response(
    buf: &mut BytesMut,
    scanner: &mut HeadScanner,
    limits: &HeadLimits,
    head_request: bool,
) -> Result<Option<ResponseHead>, HeadError> {
    let Some(raw) = split_head(buf, scanner, limits)? else {
        return Ok(None);
    };
    let mut headers = [const { MaybeUninit::<httparse::Header<'_>>::uninit() }; MAX_HEADERS_CAP];
    let mut res = httparse::Response::new(&mut []);
    let parsed = httparse::ParserConfig::default().parse_response_with_uninit_headers(
        &mut res,
        &raw,
        &mut headers[..limits.max_headers.min(MAX_HEADERS_CAP)],
    );
    match parsed {
        Ok(httparse::Status::Complete(_)) => {
            let status = res.code.ok_or(HeadError::Malformed("missing status"))?;
            let version = version_of(res.version);
            let framing_h = framing_headers(res.headers)?;
            let no_body = head_request || (100..200).contains(&status) || status == 204 || status == 304;
            let framing = if no_body {
                Framing::Empty
            } else if framing_h.chunked {
                Framing::Chunked
            } else {
                match framing_h.content_length {
                    Some(0) => Framing::Empty,
                    Some(n) => Framing::Length(n),
                    None => Framing::UntilClose,
                }
            };
            let reason = res.reason.unwrap_or("");
            Ok(Some(ResponseHead {
                status,
                reason: if reason.is_empty() {
                    Span { start: 0, end: 0 }
                } else {
                    span_of(&raw, reason.as_bytes())
                },
                version,
                keep_alive: keep_alive(version, &framing_h) && framing != Framing::UntilClose,
                framing,
                headers: Headers::new(&raw, res.headers),
            }))
        }
        Ok(httparse::Status::Partial) => Err(HeadError::Malformed("incomplete head")),
        Err(e) => Err(map_parse_error(e, limits)),
    }
}

/// Hop-by-hop headers (RFC 9110 7.6.1) that a proxy must not forward, plus the framing
/// headers it always rewrites.
pub fn is_hop_by_hop(name: &[u8]) -> bool {
    const HOP: [&[u8]; 9] = [
        b"connection",
        b"keep-alive",
        b"proxy-connection",
        b"te",
        b"trailer",
        b"transfer-encoding",
        b"upgrade",
        b"expect",
        b"content-length",
    ];
    HOP.iter().any(|h| name.eq_ignore_ascii_case(h))
}

#[cfg(test)]
mod tests {
    use super::*;

    const LIMITS: HeadLimits = HeadLimits {
        max_bytes: 8192,
        max_headers: 32,
    };

    fn req(bytes: &[u8]) -> Result<Option<RequestHead>, HeadError> {
        let mut buf = BytesMut::from(bytes);
        parse_request(&mut buf, &mut HeadScanner::default(), &LIMITS)
    }

    #[test]
    fn parses_a_post_with_content_length() {
        let head = req(b"POST /v1/completions?x=1 HTTP/1.1\r\nHost: a\r\nContent-Length: 12\r\n\r\n")
            .unwrap()
            .unwrap();
        assert_eq!(head.method(), "POST");
        assert_eq!(head.path(), "/v1/completions");
        assert_eq!(head.target(), "/v1/completions?x=1");
        assert_eq!(head.framing, Framing::Length(12));
        assert!(head.keep_alive);
        assert_eq!(head.headers.get("HOST"), Some(&b"a"[..]));
    }

    #[test]
    fn waits_for_the_blank_line() {
        assert!(req(b"GET / HTTP/1.1\r\nHost: a\r\n").unwrap().is_none());
    }

    #[test]
    fn finds_the_end_across_many_small_reads() {
        let full = b"GET / HTTP/1.1\r\nHost: a\r\n\r\nNEXT";
        let mut scanner = HeadScanner::default();
        let mut found = None;
        for n in 1..=full.len() {
            if let Some(end) = scanner.find_end(&full[..n]) {
                found = Some(end);
                break;
            }
        }
        assert_eq!(found, Some(full.len() - 4));
    }

    #[test]
    fn accepts_bare_lf_heads() {
        let head = req(b"GET /health HTTP/1.1\nHost: a\n\n").unwrap().unwrap();
        assert_eq!(head.path(), "/health");
    }

    #[test]
    fn http10_closes_unless_asked() {
        assert!(!req(b"GET / HTTP/1.0\r\n\r\n").unwrap().unwrap().keep_alive);
        assert!(
            req(b"GET / HTTP/1.0\r\nConnection: keep-alive\r\n\r\n")
                .unwrap()
                .unwrap()
                .keep_alive
        );
        assert!(
            !req(b"GET / HTTP/1.1\r\nConnection: close\r\n\r\n")
                .unwrap()
                .unwrap()
                .keep_alive
        );
    }

    #[test]
    fn rejects_conflicting_lengths_and_smuggling_shapes() {
        assert!(matches!(
            req(b"POST / HTTP/1.1\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n"),
            Err(HeadError::Malformed(_))
        ));
        assert!(matches!(
            req(b"POST / HTTP/1.1\r\nContent-Length: 1\r\nTransfer-Encoding: chunked\r\n\r\n"),
            Err(HeadError::Malformed(_))
        ));
        assert_eq!(
            req(b"POST / HTTP/1.1\r\nTransfer-Encoding: gzip, chunked\r\n\r\n").unwrap_err(),
            HeadError::UnsupportedTransferEncoding
        );
        assert!(matches!(
            req(b"POST / HTTP/1.1\r\nContent-Length: -1\r\n\r\n"),
            Err(HeadError::Malformed(_))
        ));
        assert!(matches!(
            req(b"POST / HTTP/1.1\r\nContent-Length: 99999999999999999999\r\n\r\n"),
            Err(HeadError::Malformed(_))
        ));
    }

    #[test]
    fn an_empty_content_length_is_invalid_not_absent() {
        // Found by fuzzing (fuzz/fuzz_targets/request_head.rs): an empty value beside
        // `Transfer-Encoding: chunked` was read as no length, and the request as chunked.
        for value in ["", " ", ",", " , "] {
            let head = format!("POST / HTTP/1.1\r\nContent-Length:{value}\r\nTransfer-Encoding: chunked\r\n\r\n");
            assert_eq!(
                req(head.as_bytes()).unwrap_err(),
                HeadError::Malformed("invalid content-length"),
                "{value:?}"
            );
        }
        assert!(req(b"POST / HTTP/1.1\r\nContent-Length:\r\n\r\n").is_err());
        let mut buf = BytesMut::from(&b"HTTP/1.1 200 OK\r\ncontent-length: \r\n\r\n"[..]);
        assert!(parse_response(&mut buf, &mut HeadScanner::default(), &LIMITS, false).is_err());
    }

    #[test]
    fn same_content_length_twice_is_fine() {
        let head = req(b"POST / HTTP/1.1\r\nContent-Length: 5, 5\r\n\r\n")
            .unwrap()
            .unwrap();
        assert_eq!(head.framing, Framing::Length(5));
    }

    #[test]
    fn chunked_and_expect() {
        let head = req(b"POST / HTTP/1.1\r\nTransfer-Encoding: Chunked\r\nExpect: 100-continue\r\n\r\n")
            .unwrap()
            .unwrap();
        assert_eq!(head.framing, Framing::Chunked);
        assert!(head.expect_continue);
        assert_eq!(
            req(b"POST / HTTP/1.1\r\nExpect: something\r\n\r\n").unwrap_err(),
            HeadError::UnsupportedExpectation
        );
    }

    #[test]
    fn enforces_size_and_count_limits() {
        let mut big = b"GET / HTTP/1.1\r\nX: ".to_vec();
        big.extend(std::iter::repeat_n(b'a', 9000));
        assert_eq!(req(&big).unwrap_err(), HeadError::TooLarge(8192));
        let mut many = b"GET / HTTP/1.1\r\n".to_vec();
        for i in 0..40 {
            many.extend(format!("X-{i}: v\r\n").as_bytes());
        }
        many.extend(b"\r\n");
        assert_eq!(req(&many).unwrap_err(), HeadError::TooManyHeaders(32));
    }

    #[test]
    fn rejects_garbage() {
        assert!(req(b"\x16\x03\x01\x02\x00\x01\x00\r\n\r\n").is_err());
        assert!(req(b"GET / HTTP/2.0\r\n\r\n").is_err());
    }

    #[test]
    fn splits_off_exactly_the_head() {
        let mut buf = BytesMut::from(&b"POST / HTTP/1.1\r\nContent-Length: 3\r\n\r\nabcGET"[..]);
        let head = parse_request(&mut buf, &mut HeadScanner::default(), &LIMITS)
            .unwrap()
            .unwrap();
        assert_eq!(head.framing, Framing::Length(3));
        assert_eq!(&buf[..], b"abcGET");
    }

    fn res(bytes: &[u8], head_request: bool) -> ResponseHead {
        let mut buf = BytesMut::from(bytes);
        parse_response(&mut buf, &mut HeadScanner::default(), &LIMITS, head_request)
            .unwrap()
            .unwrap()
    }

    #[test]
    fn response_framing() {
        let r = res(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n", false);
        assert_eq!((r.status, r.framing, r.keep_alive), (200, Framing::Chunked, true));
        assert_eq!(r.reason(), b"OK");
        let r = res(b"HTTP/1.1 200 OK\r\n\r\n", false);
        assert_eq!((r.framing, r.keep_alive), (Framing::UntilClose, false));
        let r = res(b"HTTP/1.1 204 No Content\r\n\r\n", false);
        assert_eq!(r.framing, Framing::Empty);
        let r = res(b"HTTP/1.1 200 OK\r\ncontent-length: 10\r\n\r\n", true);
        assert_eq!(r.framing, Framing::Empty);
        let r = res(b"HTTP/1.1 100 Continue\r\n\r\n", false);
        assert!(r.is_interim());
        let r = res(
            b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\nconnection: close\r\n\r\n",
            false,
        );
        assert_eq!((r.framing, r.keep_alive), (Framing::Length(2), false));
    }

    #[test]
    fn hop_by_hop_names() {
        assert!(is_hop_by_hop(b"Connection"));
        assert!(is_hop_by_hop(b"TRANSFER-ENCODING"));
        assert!(!is_hop_by_hop(b"content-type"));
        assert!(!is_hop_by_hop(b"x-request-id"));
    }
}
