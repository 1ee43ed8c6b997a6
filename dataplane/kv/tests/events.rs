//! vLLM's KV events as a real engine sent them: every frame of the fixtures (captured from
//! vLLM 0.32 on CPU) decodes to what vLLM's own Python (msgspec) decoded, and encodes back to
//! the same bytes; both encodings round-trip whatever a batch holds; garbage is an error,
//! never a panic.
//!
//! Fixture lines: `{"kind", "frames": {"topic_hex", "seq_u64_be_hex", "payload_msgpack_hex"},
//! "decoded": [ts, [events...], dp_rank]}`; `decoded` is `msgspec.msgpack.decode(payload)` as
//! JSON, a bytes value written as `{"bytes_hex": "..."}`.

#![allow(clippy::unwrap_used, reason = "tests assert by unwrapping")]

use std::path::Path;

use lmstack_kv::event::{
    Batch, BlockHash, DecodeError, Encoding, Event, Extra, Removed, Stored, decode_batch, decode_seq, encode_batch,
};
use proptest::prelude::*;
use serde_json::Value as Json;

const FIXTURES: [&str; 2] = ["vllm-0.32-cpu-kv-events.jsonl", "vllm-0.32-cpu-kv-events-more.jsonl"];

/// Every field vLLM 0.32 declares; a fixture with another is a release this test has not met.
const STORED_KEYS: [&str; 15] = [
    "type",
    "block_hashes",
    "parent_block_hash",
    "token_ids",
    "block_size",
    "lora_id",
    "medium",
    "lora_name",
    "extra_keys",
    "group_idx",
    "kv_cache_spec_kind",
    "kv_cache_spec_sliding_window",
    "locality",
    "ownership",
    "session_id",
];
const REMOVED_KEYS: [&str; 6] = ["type", "block_hashes", "medium", "group_idx", "locality", "ownership"];
/// Declared, not kept by [`Stored`] / [`Removed`]: must be absent in what we compare.
const NOT_KEPT: [&str; 4] = ["kv_cache_spec_sliding_window", "locality", "ownership", "session_id"];

fn unhex(hex: &str) -> Vec<u8> {
    (0..hex.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&hex[i..i + 2], 16).unwrap())
        .collect()
}

struct Frame {
    kind: String,
    seq: Vec<u8>,
    payload: Vec<u8>,
    decoded: Json,
}

fn frames(fixture: &str) -> Vec<Frame> {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(fixture);
    let text = std::fs::read_to_string(&path).unwrap();
    text.lines()
        .map(|line| {
            let line: Json = serde_json::from_str(line).unwrap();
            let hex = |key: &str| unhex(line["frames"][key].as_str().unwrap());
            Frame {
                kind: line["kind"].as_str().unwrap().to_owned(),
                seq: hex("seq_u64_be_hex"),
                payload: hex("payload_msgpack_hex"),
                decoded: line["decoded"].clone(),
            }
        })
        .collect()
}

fn all_frames() -> Vec<Frame> {
    FIXTURES.iter().flat_map(|f| frames(f)).collect()
}

fn hash_of(json: &Json) -> BlockHash {
    match json {
        Json::Number(n) => n.as_u64().unwrap(),
        Json::Object(o) => xxhash_rust::xxh3::xxh3_64(&unhex(o["bytes_hex"].as_str().unwrap())),
        other => panic!("a hash: {other}"),
    }
}

fn opt_str(json: &Json) -> Option<String> {
    json.as_str().map(str::to_owned)
}

fn opt_u32(json: &Json) -> Option<u32> {
    json.as_u64().map(|n| u32::try_from(n).unwrap())
}

fn field<'a>(event: &'a Json, key: &str) -> &'a Json {
    event.get(key).unwrap_or(&Json::Null)
}

/// What vLLM's Python decoded, in this crate's types.
fn expected_event(event: &Json) -> Event {
    let object = event.as_object().unwrap();
    let tag = object["type"].as_str().unwrap();
    let known: &[&str] = match tag {
        "BlockStored" => &STORED_KEYS,
        "BlockRemoved" => &REMOVED_KEYS,
        _ => &["type"],
    };
    for key in object.keys() {
        assert!(known.contains(&key.as_str()), "{tag} has a new field {key}");
    }
    for key in NOT_KEPT {
        assert!(field(event, key).is_null(), "{tag}.{key} is set: {event}");
    }
    let hashes = |json: &Json| json.as_array().unwrap().iter().map(hash_of).collect();
    match tag {
        "BlockStored" => Event::Stored(Stored {
            hashes: hashes(&event["block_hashes"]),
            parent: Some(field(event, "parent_block_hash"))
                .filter(|p| !p.is_null())
                .map(hash_of),
            token_ids: event["token_ids"]
                .as_array()
                .unwrap()
                .iter()
                .map(|t| opt_u32(t).unwrap())
                .collect(),
            block_size: opt_u32(&event["block_size"]).unwrap(),
            lora_name: opt_str(field(event, "lora_name")),
            lora_id: field(event, "lora_id").as_i64(),
            medium: opt_str(field(event, "medium")),
            extra_keys: field(event, "extra_keys").as_array().map(|blocks| {
                blocks
                    .iter()
                    .map(|keys| {
                        keys.as_array().map(|keys| {
                            keys.iter()
                                .map(|k| Extra::Text(opt_str(k).expect("only strings met so far")))
                                .collect()
                        })
                    })
                    .collect()
            }),
            group: opt_u32(field(event, "group_idx")),
            spec_kind: opt_str(field(event, "kv_cache_spec_kind")),
        }),
        "BlockRemoved" => Event::Removed(Removed {
            hashes: hashes(&event["block_hashes"]),
            medium: opt_str(field(event, "medium")),
            group: opt_u32(field(event, "group_idx")),
        }),
        "AllBlocksCleared" => Event::Cleared,
        other => Event::Unknown(other.to_owned()),
    }
}

fn has_bytes_hashes(batch: &Json) -> bool {
    batch.to_string().contains("bytes_hex")
}

#[test]
fn every_captured_frame_decodes_to_what_vllm_decoded() {
    let mut seen = std::collections::BTreeSet::new();
    for fixture in FIXTURES {
        let frames = frames(fixture);
        assert!(!frames.is_empty(), "{fixture} is empty");
        for Frame {
            kind,
            seq,
            payload,
            decoded,
        } in frames
        {
            let what = format!("{fixture}, {kind}");
            let seq = decode_seq(&seq).unwrap();
            assert!(seq >= 0, "{what}: seq {seq}");
            let batch = decode_batch(&payload).unwrap_or_else(|e| panic!("{what}: {e}"));
            let decoded = decoded.as_array().unwrap();
            let ts = decoded[0].as_f64().unwrap();
            assert!((batch.ts - ts).abs() <= ts.abs() * 1e-15, "{what}: ts");
            let events: Vec<Event> = decoded[1].as_array().unwrap().iter().map(expected_event).collect();
            assert_eq!(batch.events, events, "{what}");
            assert_eq!(batch.dp_rank, decoded.get(2).and_then(opt_u32), "{what}");
            for event in &batch.events {
                seen.insert(match event {
                    Event::Stored(s) if s.parent.is_some() => "stored with a parent",
                    Event::Stored(_) => "stored, a first block",
                    Event::Removed(_) => "removed",
                    Event::Cleared => "cleared",
                    Event::Unknown(_) => "unknown",
                });
            }
        }
    }
    let expected = ["cleared", "removed", "stored with a parent", "stored, a first block"];
    assert_eq!(seen.into_iter().collect::<Vec<_>>(), expected);
}

#[test]
fn tagged_encoding_is_byte_for_byte_what_vllm_sent() {
    let mut identical = 0;
    for Frame {
        kind, payload, decoded, ..
    } in all_frames()
    {
        let batch = decode_batch(&payload).unwrap();
        let encoded = encode_batch(&batch, Encoding::Tagged);
        assert_eq!(decode_batch(&encoded).unwrap(), batch, "{kind}");
        // A digest of a bytes hash cannot be written back as those bytes.
        if !has_bytes_hashes(&decoded) {
            assert_eq!(encoded, payload, "{kind}");
            identical += 1;
        }
    }
    assert!(identical >= 40, "only {identical} frames with integer hashes");
}

#[test]
fn captured_batches_round_trip_through_the_positional_encoding() {
    for Frame { kind, payload, .. } in all_frames() {
        let batch = decode_batch(&payload).unwrap();
        let encoded = encode_batch(&batch, Encoding::Positional);
        assert_eq!(decode_batch(&encoded).unwrap(), batch, "{kind}");
    }
}

#[test]
fn truncated_captured_payloads_are_errors() {
    for Frame { kind, payload, .. } in all_frames() {
        for cut in [0, 1, payload.len() / 2, payload.len() - 1] {
            assert!(
                matches!(decode_batch(&payload[..cut]), Err(DecodeError::Msgpack(_))),
                "{kind}, cut at {cut}"
            );
        }
    }
}

fn hash() -> impl Strategy<Value = BlockHash> {
    prop_oneof![any::<u64>(), 0..300u64]
}

fn text() -> impl Strategy<Value = String> {
    prop_oneof![Just("GPU".to_owned()), ".{0,12}"]
}

/// A msgpack value that is not a string, as its bytes: what [`Extra::Raw`] holds.
fn raw_extra() -> impl Strategy<Value = Extra> {
    let value = prop_oneof![
        any::<i64>().prop_map(rmpv::Value::from),
        any::<u64>().prop_map(rmpv::Value::from),
        prop::collection::vec(any::<u8>(), 0..40).prop_map(rmpv::Value::Binary),
        ("[a-z]{0,8}", any::<u32>())
            .prop_map(|(id, offset)| rmpv::Value::Array(vec![rmpv::Value::from(id), rmpv::Value::from(offset)])),
        Just(rmpv::Value::Nil),
        any::<bool>().prop_map(rmpv::Value::Boolean),
    ];
    value.prop_map(|value| {
        let mut bytes = Vec::new();
        rmpv::encode::write_value(&mut bytes, &value).unwrap();
        Extra::Raw(bytes)
    })
}

fn extra_keys() -> impl Strategy<Value = Option<Vec<Option<Vec<Extra>>>>> {
    let extra = prop_oneof![text().prop_map(Extra::Text), raw_extra()];
    let block = prop::option::of(prop::collection::vec(extra, 0..3));
    prop::option::of(prop::collection::vec(block, 0..4))
}

fn stored() -> impl Strategy<Value = Stored> {
    (
        (
            prop::collection::vec(hash(), 0..5),
            prop::option::of(hash()),
            prop::collection::vec(any::<u32>(), 0..70),
            any::<u32>(),
        ),
        (
            prop::option::of(text()),
            prop::option::of(any::<i64>()),
            prop::option::of(text()),
            extra_keys(),
            prop::option::of(any::<u32>()),
            prop::option::of(text()),
        ),
    )
        .prop_map(
            |((hashes, parent, token_ids, block_size), (lora_name, lora_id, medium, extra_keys, group, spec_kind))| {
                Stored {
                    hashes,
                    parent,
                    token_ids,
                    block_size,
                    lora_name,
                    lora_id,
                    medium,
                    extra_keys,
                    group,
                    spec_kind,
                }
            },
        )
}

fn event() -> impl Strategy<Value = Event> {
    let removed = (
        prop::collection::vec(hash(), 0..5),
        prop::option::of(text()),
        prop::option::of(any::<u32>()),
    )
        .prop_map(|(hashes, medium, group)| Removed { hashes, medium, group });
    let unknown = "[A-Za-z]{1,16}"
        .prop_filter("a known tag", |t| {
            !["BlockStored", "BlockRemoved", "AllBlocksCleared"].contains(&t.as_str())
        })
        .prop_map(Event::Unknown);
    prop_oneof![
        stored().prop_map(Event::Stored),
        removed.prop_map(Event::Removed),
        Just(Event::Cleared),
        unknown,
    ]
}

fn batch() -> impl Strategy<Value = Batch> {
    (
        any::<f64>().prop_filter("NaN is not equal to itself", |t| !t.is_nan()),
        prop::collection::vec(event(), 0..5),
        prop::option::of(any::<u32>()),
    )
        .prop_map(|(ts, events, dp_rank)| Batch { ts, events, dp_rank })
}

/// Any msgpack value, nested a little: for shapes the decoder must reject, not panic on.
fn any_value() -> impl Strategy<Value = rmpv::Value> {
    let leaf = prop_oneof![
        Just(rmpv::Value::Nil),
        any::<bool>().prop_map(rmpv::Value::Boolean),
        any::<i64>().prop_map(rmpv::Value::from),
        any::<u64>().prop_map(rmpv::Value::from),
        any::<f64>().prop_map(rmpv::Value::F64),
        prop_oneof![
            Just("BlockStored"),
            Just("BlockRemoved"),
            Just("AllBlocksCleared"),
            Just("type"),
            Just("block_hashes"),
            Just("token_ids"),
            Just("extra_keys"),
        ]
        .prop_map(rmpv::Value::from),
        prop::collection::vec(any::<u8>(), 0..8).prop_map(rmpv::Value::Binary),
    ];
    leaf.prop_recursive(4, 64, 6, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..6).prop_map(rmpv::Value::Array),
            prop::collection::vec((inner.clone(), inner), 0..6).prop_map(rmpv::Value::Map),
        ]
    })
}

proptest! {
    #[test]
    fn tagged_encoding_round_trips(batch in batch()) {
        let bytes = encode_batch(&batch, Encoding::Tagged);
        prop_assert_eq!(decode_batch(&bytes).unwrap(), batch);
    }

    #[test]
    fn positional_encoding_round_trips(batch in batch()) {
        let bytes = encode_batch(&batch, Encoding::Positional);
        prop_assert_eq!(decode_batch(&bytes).unwrap(), batch);
    }

    #[test]
    fn arbitrary_bytes_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..256)) {
        let _ = decode_batch(&bytes);
        let _ = decode_seq(&bytes);
    }

    #[test]
    fn damaged_captured_payloads_never_panic(
        which in any::<prop::sample::Index>(),
        damage in prop::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..8),
    ) {
        let frames = all_frames();
        let mut payload = frames[which.index(frames.len())].payload.clone();
        for (at, byte) in damage {
            let at = at.index(payload.len());
            payload[at] = byte;
        }
        let _ = decode_batch(&payload);
    }

    #[test]
    fn arbitrary_events_are_decoded_or_rejected_never_panic(
        events in prop::collection::vec(any_value(), 0..4),
        rank in any_value(),
    ) {
        // Tagged maps and positional arrays of known tags with fields of any type.
        let events = events
            .into_iter()
            .enumerate()
            .map(|(i, value)| match (i % 3, value) {
                (0, rmpv::Value::Map(mut entries)) => {
                    entries.insert(0, (rmpv::Value::from("type"), rmpv::Value::from("BlockStored")));
                    rmpv::Value::Map(entries)
                }
                (1, rmpv::Value::Array(mut items)) => {
                    items.insert(0, rmpv::Value::from("BlockRemoved"));
                    rmpv::Value::Array(items)
                }
                (_, value) => value,
            })
            .collect();
        let batch = rmpv::Value::Array(vec![rmpv::Value::F64(1.0), rmpv::Value::Array(events), rank]);
        let mut bytes = Vec::new();
        rmpv::encode::write_value(&mut bytes, &batch).unwrap();
        let _ = decode_batch(&bytes);
    }
}

#[test]
fn deep_nesting_is_an_error_not_a_stack_overflow() {
    let mut bytes = vec![0x92, 0x01];
    bytes.extend(std::iter::repeat_n(0x91, 100_000));
    bytes.push(0xc0);
    assert!(matches!(decode_batch(&bytes), Err(DecodeError::Msgpack(_))));
}
