//! Fuzz target: OpenAI streams event by event (`lmstack_http::stream`), which the relay runs
//! over every streamed completions or chat response: the splitter that cuts the engine's
//! body into whole events, and the ledger that reads (and may rewrite) each one and builds
//! the continuation of a cut stream.
//!
//! Input: `[n] [cuts..] stream` (see `lmstack_fuzz::cuts`). Properties:
//! - fed in pieces, the splitter gives the events it gives fed whole, and the events and the
//!   unfinished rest are the input, in order, byte for byte (nothing lost, nothing made up);
//!   every event but the rest ends with a blank line;
//! - the ledger, of either API, asked for ids or not, in the first part and in a
//!   continuation, never panics; a rewritten event is one `data:` event whose payload is a
//!   JSON object when the engine's was;
//! - a continuation request, when there is one, is a JSON object asking for token ids with
//!   `max_tokens` between 1 and the client's (tokens whose text was held back are made again);
//!   the closing events end with `[DONE]`.

#![no_main]

use libfuzzer_sys::fuzz_target;
use lmstack_http::stream::{Api, EventSplitter, Ledger, Verdict, event_data};
use serde_json::Value;

fn split(pieces: &[&[u8]]) -> (Vec<Vec<u8>>, Vec<u8>) {
    let mut s = EventSplitter::new(usize::MAX);
    let mut events = Vec::new();
    for piece in pieces {
        s.push(piece).expect("no bound");
        while let Some(e) = s.next_event() {
            events.push(e.to_vec());
        }
    }
    (events, s.next_rest().to_vec())
}

fn is_object(payload: &[u8]) -> bool {
    matches!(serde_json::from_slice::<Value>(payload), Ok(Value::Object(_)))
}

const COMPLETION: &[u8] = br#"{"model":"m","prompt":"hi","max_tokens":50,"stream":true,"seed":1}"#;
const CHAT: &[u8] = br#"{"model":"m","messages":[{"role":"user","content":"hi"}],"max_tokens":50,"stream":true}"#;

fuzz_target!(|data: &[u8]| {
    let Some((at, stream)) = lmstack_fuzz::cuts(data) else {
        return;
    };
    let (whole, rest) = split(&[stream]);
    let (pieces, rest_pieces) = split(&lmstack_fuzz::pieces(stream, &at));
    assert_eq!(
        (&whole, &rest),
        (&pieces, &rest_pieces),
        "cut at {at:?}, the events differ"
    );
    let joined: Vec<u8> = whole.iter().flatten().chain(rest.iter()).copied().collect();
    assert_eq!(joined, stream, "the events are not the input");
    for e in &whole {
        assert!(
            e.ends_with(b"\n\n") || e.ends_with(b"\n\r\n") || e == b"\n" || e == b"\r\n",
            "{e:?}"
        );
    }
    for (api, body) in [(Api::Completions, COMPLETION), (Api::Chat, CHAT)] {
        for keep_ids in [false, true] {
            let mut ledger = Ledger::new(api, keep_ids, 1 << 16);
            for part in 0..2 {
                if part == 1 {
                    ledger.start_part();
                }
                for e in &whole {
                    if let Verdict::Rewrite(out) = ledger.observe(e) {
                        let payload = event_data(&out).expect("a data event");
                        let before = event_data(e).expect("a data event was read");
                        if is_object(&before) {
                            assert!(is_object(&payload), "{out:?} from {e:?}");
                        }
                        assert!(out.ends_with(b"\n\n"));
                    }
                }
                if let Ok(next) = ledger.continuation(body) {
                    let v: Value = serde_json::from_slice(&next).expect("JSON");
                    assert_eq!(v["return_token_ids"], true);
                    assert!(v["max_tokens"].as_u64().is_some_and(|m| (1..=50).contains(&m)), "{v}");
                }
                assert!(ledger.closing_events(true).ends_with(b"data: [DONE]\n\n") || ledger.done());
            }
        }
    }
});
