//! Fuzz target: response heads (`lmstack_http::head::parse_response`), as the upstream side
//! reads them from an engine.
//!
//! Input: `[limits] [n] [cuts..] bytes`, as for `request_head`. Properties:
//! - the bytes fed in pieces give what they give whole (head or error, and the bytes left);
//! - the response to a `HEAD` request parses the same but never has a body;
//! - framing and keep-alive agree with a plain reading of the status and header lines
//!   (1xx, 204 and 304 have no body; no length means until close, which cannot keep alive);
//! - written out again (CRLF, `name: value`), the head parses to the same head.
//!
//! Not covered here: the relay of the body (see the `chunked` and `sse` targets).

#![no_main]

use bytes::BytesMut;
use libfuzzer_sys::fuzz_target;
use lmstack_http::head::{self, Framing, HeadError, HeadLimits, HeadScanner, ResponseHead, Version};

/// What a parsed head says, in a form that compares.
#[derive(Debug, PartialEq)]
struct Seen {
    status: u16,
    reason: Vec<u8>,
    version: Version,
    headers: Vec<(Vec<u8>, Vec<u8>)>,
    framing: Framing,
    keep_alive: bool,
}

fn seen(h: &ResponseHead) -> Seen {
    Seen {
        status: h.status,
        reason: h.reason().to_vec(),
        version: h.version,
        headers: h.headers.iter().map(|(n, v)| (n.to_vec(), v.to_vec())).collect(),
        framing: h.framing,
        keep_alive: h.keep_alive,
    }
}

type Outcome = (Result<Option<Seen>, HeadError>, Vec<u8>);

fn parse_in_pieces(pieces: &[&[u8]], limits: &HeadLimits, head_request: bool) -> Outcome {
    let mut buf = BytesMut::new();
    let mut scanner = HeadScanner::default();
    let mut result = Ok(None);
    let mut read = 0;
    for piece in pieces {
        buf.extend_from_slice(piece);
        read += 1;
        result = head::parse_response(&mut buf, &mut scanner, limits, head_request).map(|h| h.as_ref().map(seen));
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

/// The framing and keep-alive a plain reading of the head gives (not a `HEAD` request).
fn expected(s: &Seen) -> (Framing, bool) {
    let named = |name: &'static str| values(&s.headers, name);
    let length: Option<u64> = named("content-length")
        .flat_map(head::tokens)
        .map(|t| std::str::from_utf8(t).unwrap().parse().unwrap())
        .next();
    let framing = if (100..200).contains(&s.status) || s.status == 204 || s.status == 304 {
        Framing::Empty
    } else if named("transfer-encoding").next().is_some() {
        Framing::Chunked
    } else {
        match length {
            Some(0) => Framing::Empty,
            Some(n) => Framing::Length(n),
            None => Framing::UntilClose,
        }
    };
    let connection: Vec<Vec<u8>> = named("connection")
        .flat_map(head::tokens)
        .map(<[u8]>::to_ascii_lowercase)
        .collect();
    let close = connection.iter().any(|t| t == b"close");
    let keep_alive = match s.version {
        Version::Http11 => !close,
        Version::Http10 => !close && connection.iter().any(|t| t == b"keep-alive"),
    };
    (framing, keep_alive && framing != Framing::UntilClose)
}

fn written(s: &Seen) -> Vec<u8> {
    let version = match s.version {
        Version::Http10 => "HTTP/1.0",
        Version::Http11 => "HTTP/1.1",
    };
    let mut out = format!("{version} {:03} ", s.status).into_bytes();
    out.extend_from_slice(&s.reason);
    out.extend_from_slice(b"\r\n");
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
    let pieces = lmstack_fuzz::pieces(bytes, &at);
    let whole = parse_in_pieces(&[bytes], &limits, false);
    let split = parse_in_pieces(&pieces, &limits, false);
    assert_eq!(whole, split, "the same bytes in pieces {at:?} parse differently");

    let (to_head, _) = parse_in_pieces(&pieces, &limits, true);
    match (&whole.0, &to_head) {
        (Ok(Some(get)), Ok(Some(head))) => {
            assert_eq!(head.framing, Framing::Empty, "a response to HEAD has no body");
            assert_eq!(
                (get.status, &get.headers, &get.reason),
                (head.status, &head.headers, &head.reason)
            );
        }
        (get, head) => assert_eq!(get, head, "HEAD or not decides only the body"),
    }

    let (Ok(Some(head)), rest) = whole else {
        return;
    };
    let raw_len = bytes.len() - rest.len();
    assert!(raw_len <= limits.max_bytes);
    assert!(head.headers.len() <= limits.max_headers);
    assert_eq!(&bytes[raw_len..], rest.as_slice());
    assert!(bytes[..raw_len].ends_with(b"\n\n") || bytes[..raw_len].ends_with(b"\n\r\n"));
    assert_eq!((head.framing, head.keep_alive), expected(&head));

    let again = written(&head);
    let roomy = HeadLimits {
        max_bytes: again.len(),
        max_headers: limits.max_headers,
    };
    let (reparsed, rest) = parse_in_pieces(&[&again], &roomy, false);
    assert!(rest.is_empty());
    let reparsed = reparsed.expect("a head written out again parses").expect("whole");
    assert_eq!(
        reparsed,
        head,
        "written out again: {:?}",
        String::from_utf8_lossy(&again)
    );
});
