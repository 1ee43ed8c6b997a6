//! Fuzz target: SSE event counting (`lmstack_http::SseCounter`), which the relay runs over
//! every streamed response to count tokens and see `data: [DONE]`.
//!
//! Input: `[n] [cuts..] stream` (see `lmstack_fuzz::cuts`). Properties:
//! - fed in pieces, the counter finds what it finds fed whole;
//! - both agree with a plain reading of the stream as the counter's doc defines it: CR bytes
//!   are dropped, lines end at LF, a blank line ends an event, an event with a `data:` line
//!   counts once, and it is the `[DONE]` sentinel when its last data value is exactly
//!   `[DONE]` (after one optional space).
//!
//! Not covered here: splitting events for the stream stitching (the `stream` target).

#![no_main]

use libfuzzer_sys::fuzz_target;
use lmstack_http::{SseCounter, SseEvents};

fn count_in_pieces(pieces: &[&[u8]]) -> SseEvents {
    let mut counter = SseCounter::new();
    let mut total = SseEvents::default();
    for piece in pieces {
        let found = counter.feed(piece);
        total.data += found.data;
        total.done |= found.done;
    }
    total
}

/// The plain reading: whole lines only (the bytes after the last LF are an unfinished line).
fn reference(stream: &[u8]) -> SseEvents {
    let text: Vec<u8> = stream.iter().copied().filter(|&b| b != b'\r').collect();
    let mut found = SseEvents::default();
    let (mut has_data, mut is_done) = (false, false);
    let mut lines: Vec<&[u8]> = text.split(|&b| b == b'\n').collect();
    lines.pop();
    for line in lines {
        if line.is_empty() {
            if has_data {
                if is_done {
                    found.done = true;
                } else {
                    found.data += 1;
                }
            }
            (has_data, is_done) = (false, false);
        } else if let Some(value) = line.strip_prefix(b"data:") {
            has_data = true;
            is_done = value.strip_prefix(b" ").unwrap_or(value) == b"[DONE]";
        }
    }
    found
}

fuzz_target!(|data: &[u8]| {
    let Some((at, stream)) = lmstack_fuzz::cuts(data) else {
        return;
    };
    let whole = count_in_pieces(&[stream]);
    assert_eq!(whole, reference(stream), "the counter disagrees with the plain reading");
    let split = count_in_pieces(&lmstack_fuzz::pieces(stream, &at));
    assert_eq!(whole, split, "the same stream in pieces {at:?} counts differently");
});
