//! Fuzz target: request heads (`lmstack_http::head::parse_request` with its `HeadScanner`), as
//! the downstream side reads them from a client.
//!
//! Input: `[limits] [n] [cuts..] bytes` (see `lmstack_fuzz::cuts`); `limits` 0 is the
//! router's defaults, anything else small limits that the size and count checks meet.
//! Properties:
//! - the bytes fed in pieces (the scanner kept across reads) give what they give whole: the
//!   same head or the same error, and the same bytes left for the next request;
//! - a head is a prefix of the input ending in a blank line, within the limits;
//! - its framing, keep-alive and `Expect` agree with a plain reading of its header lines;
//! - written out again as a proxy would (CRLF, `name: value`), it parses to the same head.
//!
//! Not covered here: what the proxy does with the head (tests/ and dataplane/lmstack).

#![no_main]

use bytes::BytesMut;
use libfuzzer_sys::fuzz_target;
use lmstack_http::head::{self, Framing, HeadError, HeadLimits, HeadScanner, RequestHead, Version};

/// What a parsed head says, in a form that compares.
#[derive(Debug, PartialEq)]
struct Seen {
    method: String,
    target: String,
    version: Version,
    headers: Vec<(Vec<u8>, Vec<u8>)>,
    framing: Framing,
    keep_alive: bool,
    expect_continue: bool,
}

fn seen(h: &RequestHead) -> Seen {
    Seen {
        method: h.method().to_owned(),
        target: h.target().to_owned(),
        version: h.version,
        headers: h.headers.iter().map(|(n, v)| (n.to_vec(), v.to_vec())).collect(),
        framing: h.framing,
        keep_alive: h.keep_alive,
        expect_continue: h.expect_continue,
    }
}

type Outcome = (Result<Option<(Seen, usize)>, HeadError>, Vec<u8>);

/// Feeds `pieces` one read at a time until a head or an error; returns it and the buffer
/// left (with the pieces not yet read).
fn parse_in_pieces(pieces: &[&[u8]], limits: &HeadLimits) -> Outcome {
    let mut buf = BytesMut::new();
    let mut scanner = HeadScanner::default();
    let mut result = Ok(None);
    let mut read = 0;
    for piece in pieces {
        buf.extend_from_slice(piece);
        read += 1;
        result = head::parse_request(&mut buf, &mut scanner, limits).map(|h| h.map(|h| (seen(&h), h.raw_len())));
        if !matches!(result, Ok(None)) {
            break;
        }
    }
    for piece in &pieces[read..] {
        buf.extend_from_slice(piece);
    }
    (result, buf.to_vec())
}

fn limits_of(byte: u8) -> HeadLimits {
    match byte {
        // The router's defaults (server.max_header_bytes, server.max_headers).
        0 => HeadLimits {
            max_bytes: 64 * 1024,
            max_headers: 128,
        },
        n => HeadLimits {
            max_bytes: usize::from(n) * 16,
            max_headers: 1 + usize::from(n) % 32,
        },
    }
}

/// The values of the header lines called `name`.
fn values<'a>(headers: &'a [(Vec<u8>, Vec<u8>)], name: &'static str) -> impl Iterator<Item = &'a [u8]> {
    headers
        .iter()
        .filter(move |(n, _)| n.eq_ignore_ascii_case(name.as_bytes()))
        .map(|(_, v)| v.as_slice())
}

/// The framing, keep-alive and expectation a plain reading of the header lines gives.
fn expected(s: &Seen) -> (Framing, bool, bool) {
    let named = |name: &'static str| values(&s.headers, name);
    let lengths: Vec<u64> = named("content-length")
        .flat_map(head::tokens)
        .map(|t| std::str::from_utf8(t).unwrap().parse().unwrap())
        .collect();
    let framing = if named("transfer-encoding").next().is_some() {
        Framing::Chunked
    } else {
        match lengths.first() {
            None | Some(0) => Framing::Empty,
            Some(&n) => Framing::Length(n),
        }
    };
    assert!(lengths.windows(2).all(|w| w[0] == w[1]), "conflicting lengths accepted");
    let connection: Vec<Vec<u8>> = named("connection")
        .flat_map(head::tokens)
        .map(<[u8]>::to_ascii_lowercase)
        .collect();
    let close = connection.iter().any(|t| t == b"close");
    let keep_alive = match s.version {
        Version::Http11 => !close,
        Version::Http10 => !close && connection.iter().any(|t| t == b"keep-alive"),
    };
    let expect = s.version == Version::Http11 && named("expect").next().is_some();
    (framing, keep_alive, expect)
}

/// The head written out as the proxy writes heads: CRLF line ends, `name: value`.
fn written(s: &Seen) -> Vec<u8> {
    let version = match s.version {
        Version::Http10 => "HTTP/1.0",
        Version::Http11 => "HTTP/1.1",
    };
    let mut out = format!("{} {} {version}\r\n", s.method, s.target).into_bytes();
    for (name, value) in &s.headers {
        out.extend_from_slice(name);
        out.extend_from_slice(b": ");
        out.extend_from_slice(value);
        out.extend_from_slice(b"\r\n");
    }
    out.extend_from_slice(b"\r\n");
    out
}

fuzz_target!(|data: &[u8]| {
    let Some((&limits, data)) = data.split_first() else {
        return;
    };
    let Some((at, bytes)) = lmstack_fuzz::cuts(data) else {
        return;
    };
    let limits = limits_of(limits);
    let whole = parse_in_pieces(&[bytes], &limits);
    let split = parse_in_pieces(&lmstack_fuzz::pieces(bytes, &at), &limits);
    assert_eq!(whole, split, "the same bytes in pieces {at:?} parse differently");

    let (Ok(Some((head, raw_len))), rest) = whole else {
        return;
    };
    assert!(raw_len <= limits.max_bytes);
    assert!(head.headers.len() <= limits.max_headers);
    assert_eq!(&bytes[raw_len..], rest.as_slice(), "the bytes after the head are kept");
    let raw = &bytes[..raw_len];
    assert!(
        raw.ends_with(b"\n\n") || raw.ends_with(b"\n\r\n"),
        "a head ends in a blank line"
    );

    let (framing, keep_alive, expect) = expected(&head);
    assert_eq!(head.framing, framing);
    assert_eq!(head.keep_alive, keep_alive);
    assert_eq!(head.expect_continue, expect);
    if head.framing == Framing::Chunked {
        let lengths = head
            .headers
            .iter()
            .filter(|(n, _)| n.eq_ignore_ascii_case(b"content-length"));
        assert_eq!(lengths.count(), 0, "chunked with a content-length accepted");
    }

    let again = written(&head);
    let roomy = HeadLimits {
        max_bytes: again.len(),
        max_headers: limits.max_headers,
    };
    let (reparsed, rest) = parse_in_pieces(&[&again], &roomy);
    assert!(rest.is_empty());
    let (reparsed, _) = reparsed.expect("a head written out again parses").expect("whole");
    assert_eq!(
        reparsed,
        head,
        "written out again: {:?}",
        String::from_utf8_lossy(&again)
    );
});
