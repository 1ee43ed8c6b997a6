//! Fuzz target: the chunked decoder (`lmstack_http::ChunkedDecoder`), which tells the relay
//! where a chunked body ends and de-chunks request bodies.
//!
//! Every input is used twice:
//! - as wire bytes, `[n] [cuts..] bytes` (see `lmstack_fuzz::cuts`): fed whole and fed in
//!   pieces, the decoder gives the same payload, the same end (or the same error), and
//!   consumes the same bytes; it never reports more payload than it consumed, takes every
//!   byte of a read unless the body ends in it, and takes nothing once done;
//! - through `arbitrary`, as a body to encode: payload pieces written as chunks (lower or
//!   upper case hex, leading zeros, extensions), trailer lines, and the next message's bytes
//!   after it. Decoded in arbitrary pieces, it gives the payload back, ends exactly where the
//!   body ends, and leaves the next message alone.
//!
//! Not covered here: the limits on body size (the proxy's).

#![no_main]

use arbitrary::{Arbitrary, Unstructured};
use libfuzzer_sys::fuzz_target;
use lmstack_http::chunked::{self, ChunkedDecoder, ChunkedError, MAX_SIZE_LINE};

#[derive(Debug, PartialEq)]
struct Outcome {
    result: Result<(), ChunkedError>,
    payload: Vec<u8>,
    consumed: usize,
    done: bool,
}

fn decode_in_pieces(pieces: &[&[u8]]) -> Outcome {
    let mut d = ChunkedDecoder::new();
    let mut out = Outcome {
        result: Ok(()),
        payload: Vec::new(),
        consumed: 0,
        done: false,
    };
    for piece in pieces {
        let before = out.payload.len();
        match d.decode(piece, |p| out.payload.extend_from_slice(p)) {
            Ok(r) => {
                assert!(r.consumed <= piece.len());
                assert!(out.payload.len() - before <= r.consumed, "more payload than input");
                assert_eq!(r.done, d.is_done());
                out.consumed += r.consumed;
                if r.done {
                    out.done = true;
                    let again = d.decode(&piece[r.consumed..], |_| panic!("payload after the end"));
                    assert_eq!(again.map(|r| (r.consumed, r.done)), Ok((0, true)));
                    break;
                }
                assert_eq!(r.consumed, piece.len(), "a read is taken whole until the end");
            }
            Err(e) => {
                // Where an error stops reading is not reported: only the payload before it.
                out.result = Err(e);
                out.consumed = 0;
                break;
            }
        }
    }
    out
}

/// One chunk as a client or engine might write it.
#[derive(Arbitrary, Debug)]
struct Chunk {
    data: Vec<u8>,
    upper: bool,
    zeros: u8,
    extension: Option<Vec<u8>>,
}

/// A chunked body and the bytes after it.
#[derive(Arbitrary, Debug)]
struct Body {
    chunks: Vec<Chunk>,
    last_zeros: u8,
    trailers: Vec<Vec<u8>>,
    after: Vec<u8>,
    cuts: Vec<u16>,
}

/// A size line: hex digits (at most 16 in all), an extension without line ends.
fn size_line(size: usize, upper: bool, zeros: u8, extension: Option<&[u8]>, out: &mut Vec<u8>) {
    let hex = if upper {
        format!("{size:X}")
    } else {
        format!("{size:x}")
    };
    let zeros = usize::from(zeros) % (17 - hex.len());
    out.extend(std::iter::repeat_n(b'0', zeros));
    out.extend_from_slice(hex.as_bytes());
    if let Some(ext) = extension {
        out.push(b';');
        let room = MAX_SIZE_LINE - 17;
        out.extend(ext.iter().filter(|&&b| b != b'\r' && b != b'\n').take(room));
    }
    out.extend_from_slice(b"\r\n");
}

fn round_trip(body: &Body) {
    let mut wire = Vec::new();
    let mut payload = Vec::new();
    for c in body.chunks.iter().filter(|c| !c.data.is_empty()) {
        if !c.upper && c.zeros == 0 && c.extension.is_none() {
            chunked::encode_chunk(&c.data, &mut wire);
        } else {
            size_line(c.data.len(), c.upper, c.zeros, c.extension.as_deref(), &mut wire);
            wire.extend_from_slice(&c.data);
            wire.extend_from_slice(b"\r\n");
        }
        payload.extend_from_slice(&c.data);
    }
    size_line(0, false, body.last_zeros, None, &mut wire);
    let mut trailer_bytes = 0;
    for line in &body.trailers {
        let line: Vec<u8> = line.iter().copied().filter(|&b| b != b'\r' && b != b'\n').collect();
        trailer_bytes += line.len() + 2;
        if line.is_empty() || trailer_bytes > 8 * 1024 {
            continue;
        }
        wire.extend_from_slice(&line);
        wire.extend_from_slice(b"\r\n");
    }
    wire.extend_from_slice(b"\r\n");
    let body_len = wire.len();
    wire.extend_from_slice(&body.after);

    let mut at: Vec<usize> = body.cuts.iter().map(|&c| usize::from(c) % (wire.len() + 1)).collect();
    at.sort_unstable();
    let got = decode_in_pieces(&lmstack_fuzz::pieces(&wire, &at));
    let expected = Outcome {
        result: Ok(()),
        payload,
        consumed: body_len,
        done: true,
    };
    assert_eq!(got, expected, "body {body:?} cut at {at:?}");
}

fuzz_target!(|data: &[u8]| {
    if let Some((at, bytes)) = lmstack_fuzz::cuts(data) {
        let whole = decode_in_pieces(&[bytes]);
        let split = decode_in_pieces(&lmstack_fuzz::pieces(bytes, &at));
        assert_eq!(whole, split, "the same bytes in pieces {at:?} decode differently");
    }
    if let Ok(body) = Body::arbitrary_take_rest(Unstructured::new(data)) {
        round_trip(&body);
    }
});
