//! Fuzz target: the JSON peek at a request body (`lmstack_http::peek`) and the prompt's
//! normalisation for prefix routing (`peek::prompt_pieces`), against serde_json's own reading
//! of the same bytes as a `Value`.
//!
//! Input: the body, as is. Properties:
//! - a body serde_json reads as an object is never an invalid-JSON error for the peek (field
//!   errors, such as a numeric `model` or a repeated `stream`, are the peek's own rules);
//! - a body serde_json reads as another JSON value is "not an object";
//! - a body the peek accepts is one serde_json accepts as an object (but for the contents of
//!   strings and numbers in fields it skips: see `SKIPPED_UNCHECKED`), and the peek's `model`,
//!   `stream`, session (`user`), `return_token_ids`, `prompt` and `messages` are what the
//!   `Value` holds (the last of repeated keys, as serde_json keeps);
//! - `prompt_pieces` succeeds exactly for a list of message objects, or a string or list
//!   prompt, and writes one record separator per message or list item (and one unit
//!   separator per message): JSON text cannot hold those control bytes unescaped.
//!
//! Not covered here: what the router does with the fields (block hashing is lmstack-route's).

#![no_main]

use libfuzzer_sys::fuzz_target;
use lmstack_http::peek::{self, PeekError};
use serde_json::{Map, Value};

/// Separators `prompt_pieces` writes (peek.rs: RECORD, UNIT).
const RECORD: u8 = 0x1E;
const UNIT: u8 = 0x1F;

/// serde_json's errors for what a skipped field may hold unchecked.
const SKIPPED_UNCHECKED: [&str; 4] = [
    "invalid unicode code point",
    "lone leading surrogate in hex escape",
    "unexpected end of hex escape",
    "number out of range",
];

/// Records and units `prompt_pieces` should write, or `None` where it should fail.
fn expected_pieces(obj: &Map<String, Value>) -> Option<(usize, usize)> {
    if let Some(messages) = obj.get("messages") {
        return match messages {
            Value::Array(items) if items.iter().all(Value::is_object) => Some((items.len(), items.len())),
            _ => None,
        };
    }
    match obj.get("prompt") {
        Some(Value::String(_)) => Some((0, 0)),
        Some(Value::Array(items)) => Some((items.len(), 0)),
        _ => None,
    }
}

fn raw_equals(raw: Option<&serde_json::value::RawValue>, value: Option<&Value>) {
    let raw = raw.map(|r| serde_json::from_str::<Value>(r.get()).expect("a raw field is JSON"));
    assert_eq!(raw.as_ref(), value);
}

fuzz_target!(|data: &[u8]| {
    let value = serde_json::from_slice::<Value>(data);
    let peeked = peek::peek(data, Some("user"));
    match (&value, &peeked) {
        (Ok(Value::Object(_)), Err(PeekError::InvalidJson(e))) => {
            panic!("serde_json reads an object, the peek says invalid JSON: {e}")
        }
        (Ok(Value::Object(_)), _) | (Err(_), _) => {}
        (Ok(_), Err(PeekError::NotAnObject)) => {}
        (Ok(v), other) => panic!("{v:?} is not an object, the peek says {other:?}"),
    }
    let Ok(p) = peeked else {
        return;
    };
    let obj = match &value {
        Ok(Value::Object(obj)) => obj,
        Err(e) => {
            // The peek skips the fields it does not route on with serde_json's `IgnoredAny`,
            // which checks their syntax but neither decodes strings (UTF-8, surrogate escapes)
            // nor numbers (range): the engine rejects those itself. Nothing else may differ.
            let e = e.to_string();
            assert!(
                SKIPPED_UNCHECKED.iter().any(|m| e.starts_with(m)),
                "the peek accepts {e}"
            );
            return;
        }
        Ok(other) => unreachable!("{other:?} was matched above"),
    };
    let model = obj
        .get("model")
        .map(|m| m.as_str().expect("an accepted model is a string"));
    assert_eq!(p.model.as_deref(), model);
    let stream = obj.get("stream").and_then(Value::as_bool).unwrap_or(false);
    assert_eq!(p.stream, stream);
    match obj.get("user") {
        Some(Value::String(s)) => assert_eq!(p.session.as_deref(), Some(s.as_str())),
        Some(Value::Number(n)) if !n.is_f64() => assert_eq!(p.session.as_deref(), Some(n.to_string().as_str())),
        // The peek keeps an earlier usable value where a later repeat is not one.
        _ => {}
    }
    if let Some(Value::Bool(b)) = obj.get("return_token_ids") {
        assert_eq!(p.return_token_ids, Some(*b));
    }
    raw_equals(p.prompt, obj.get("prompt"));
    raw_equals(p.messages, obj.get("messages"));

    let mut normalised = Vec::new();
    let ok = peek::prompt_pieces(&p, |b| normalised.extend_from_slice(b));
    let count = |sep: u8| normalised.iter().filter(|&&b| b == sep).count();
    let got = ok.then(|| (count(RECORD), count(UNIT)));
    assert_eq!(got, expected_pieces(obj), "normalised: {normalised:?}");
});
