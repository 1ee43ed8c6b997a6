//! Fuzz target: lmstack-control's snapshot stream as a router reads it (newline-delimited
//! `lmstack_snapshot::StreamMessage`s), with the contract's validation, deltas and diffs.
//!
//! Input: the stream's bytes. Each line is handled as dataplane/lmstack/src/control.rs does:
//! a message that does not parse, a full snapshot that does not validate or a delta that does
//! not apply ends the connection (the next one starts from a full snapshot). Properties:
//! - every message that parses is written back to JSON and parses to the same message (floats
//!   within one unit in the last place: serde_json's default float parsing is not exact);
//! - a snapshot in use (a valid full one, or one a delta made) validates, and its model
//!   lists and `routable_models` stay within its endpoints;
//! - a delta that applies moves the version forward, removes, replaces and appends as its
//!   doc says, keeping the order of the endpoints it does not touch;
//! - between two valid full snapshots, `diff` gives a delta exactly when the endpoints were
//!   not reordered (kept ones in their old order, new ones after them) and the version moves
//!   forward, and that delta, sent over the wire, rebuilds the second snapshot.
//!
//! Not covered here: the router's routing state built from a snapshot (dataplane/lmstack).

#![no_main]

use libfuzzer_sys::fuzz_target;
use lmstack_snapshot::{Snapshot, SnapshotDelta, StreamMessage};
use serde_json::Value;

/// Whether two JSON values are equal, numbers within one unit in the last place.
fn close(a: &Value, b: &Value) -> bool {
    match (a, b) {
        (Value::Number(x), Value::Number(y)) if x.is_f64() || y.is_f64() => match (x.as_f64(), y.as_f64()) {
            (Some(x), Some(y)) => x == y || x.to_bits().abs_diff(y.to_bits()) <= 1,
            _ => false,
        },
        (Value::Array(x), Value::Array(y)) => x.len() == y.len() && x.iter().zip(y).all(|(x, y)| close(x, y)),
        (Value::Object(x), Value::Object(y)) => {
            x.len() == y.len() && x.iter().all(|(k, v)| y.get(k).is_some_and(|w| close(v, w)))
        }
        _ => a == b,
    }
}

fn assert_close<T: serde::Serialize + std::fmt::Debug>(a: &T, b: &T) {
    let (x, y) = (serde_json::to_value(a).unwrap(), serde_json::to_value(b).unwrap());
    assert!(close(&x, &y), "{a:?}\n  !=\n{b:?}");
}

/// Writes `message` to JSON and reads it back.
fn over_the_wire(message: &StreamMessage) -> StreamMessage {
    let line = serde_json::to_string(message).expect("a message writes as JSON");
    assert!(!line.contains('\n'), "a message is one line");
    let back = serde_json::from_str(&line).unwrap_or_else(|e| panic!("{line} does not read back: {e}"));
    assert_close(message, &back);
    back
}

/// What a router relies on in a snapshot it uses.
fn check_in_use(s: &Snapshot) {
    s.validate().expect("a snapshot in use validates");
    for m in &s.models {
        assert!(m.endpoints.iter().all(|&i| (i as usize) < s.endpoints.len()));
    }
    assert!(s.routable_models().count() <= s.models.len());
}

/// `diff` can say `b` as a delta from `a` when `a`'s endpoints that `b` keeps come first in
/// `b`, in `a`'s order, and the version moves forward.
fn expressible(a: &Snapshot, b: &Snapshot) -> bool {
    let kept = |url: &str| a.endpoints.iter().position(|e| e.url == url);
    let positions: Vec<Option<usize>> = b.endpoints.iter().map(|e| kept(&e.url)).collect();
    let first_new = positions.iter().position(Option::is_none).unwrap_or(positions.len());
    let old: Vec<usize> = positions[..first_new].iter().flatten().copied().collect();
    b.version > a.version && positions[first_new..].iter().all(Option::is_none) && old.windows(2).all(|w| w[0] < w[1])
}

fn check_applied(a: &Snapshot, delta: &SnapshotDelta, next: &Snapshot) {
    assert_eq!(next.version, delta.version);
    assert!(next.version > a.version);
    let upserted = |url: &str| delta.upsert.iter().rev().find(|e| e.url == url);
    let untouched: Vec<_> = a
        .endpoints
        .iter()
        .filter(|e| !delta.remove.contains(&e.url) && upserted(&e.url).is_none())
        .collect();
    let kept_in_next: Vec<_> = next
        .endpoints
        .iter()
        .filter(|e| untouched.iter().any(|u| u.url == e.url))
        .collect();
    assert_eq!(
        untouched, kept_in_next,
        "endpoints a delta does not touch keep their order"
    );
    for e in &next.endpoints {
        match upserted(&e.url) {
            Some(u) => assert_eq!(u, e),
            None => assert!(untouched.iter().any(|u| *u == e), "{} came from nowhere", e.url),
        }
    }
    for url in &delta.remove {
        assert!(upserted(url).is_some() || next.endpoints.iter().all(|e| &e.url != url));
    }
    assert_eq!(&next.models, delta.models.as_ref().unwrap_or(&a.models));
}

fn check_diff(a: &Snapshot, b: &Snapshot) {
    let delta = a.diff(b);
    assert_eq!(delta.is_some(), expressible(a, b), "diff from {a:?} to {b:?}");
    let Some(delta) = delta else {
        return;
    };
    let StreamMessage::Delta { delta } = over_the_wire(&StreamMessage::Delta { delta }) else {
        unreachable!("a delta reads back as a delta");
    };
    let rebuilt = a
        .apply(&delta)
        .unwrap_or_else(|e| panic!("a diff sent over the wire does not apply: {e}"));
    assert_close(&rebuilt, b);
}

fuzz_target!(|data: &[u8]| {
    // The snapshot the stream's deltas apply to; none until a full one, and none again
    // after a message that ends the connection.
    let mut base: Option<Snapshot> = None;
    for line in data.split(|&b| b == b'\n') {
        if line.iter().all(u8::is_ascii_whitespace) {
            continue;
        }
        let Ok(message) = serde_json::from_slice::<StreamMessage>(line) else {
            base = None;
            continue;
        };
        over_the_wire(&message);
        match message {
            StreamMessage::Heartbeat { .. } | StreamMessage::Kv { .. } => {}
            StreamMessage::Affinity { batch } => assert!(batch.blocks() >= batch.entries.len()),
            StreamMessage::Full { snapshot } => {
                if snapshot.validate().is_err() {
                    base = None;
                    continue;
                }
                check_in_use(&snapshot);
                if let Some(a) = &base {
                    check_diff(a, &snapshot);
                }
                base = Some(snapshot);
            }
            StreamMessage::Delta { delta } => {
                let Some(a) = base.take() else {
                    continue;
                };
                if let Ok(next) = a.apply(&delta) {
                    check_applied(&a, &delta, &next);
                    check_in_use(&next);
                    base = Some(next);
                }
            }
        }
    }
});
