//! Fuzz target: vLLM's KV-event batches (`lmstack_kv::event`), as the KV intake reads them
//! off an engine's ZeroMQ socket.
//!
//! Every input is used twice:
//! - as a payload frame for `decode_batch` (seeds: the frames a real vLLM 0.32 sent). Where
//!   it decodes, the batch encoded again (tagged and positional) decodes to the same batch,
//!   and the first 8 bytes, as a sequence frame, encode back to themselves;
//! - through `arbitrary`, as a batch to encode: tagged or positional, it decodes to itself.
//!   Extra keys are built from msgpack values (never a bare string, which reads back as
//!   text), and event tags other than vLLM's are unknown events.
//!
//! Not covered here: what the index does with events (dataplane/kv/src/index.rs has its own
//! property tests).

#![no_main]

use arbitrary::{Result, Unstructured};
use libfuzzer_sys::fuzz_target;
use lmstack_kv::event::{self, Batch, Encoding, Event, Extra, Removed, Stored};
use rmpv::Value;

/// Equal batches, the timestamp compared by its bits (a NaN is a NaN).
fn same(a: &Batch, b: &Batch) -> bool {
    a.ts.to_bits() == b.ts.to_bits() && a.events == b.events && a.dp_rank == b.dp_rank
}

fn encodes_back(batch: &Batch) {
    for encoding in [Encoding::Tagged, Encoding::Positional] {
        let bytes = event::encode_batch(batch, encoding);
        let back = event::decode_batch(&bytes).unwrap_or_else(|e| panic!("{encoding:?} of {batch:?}: {e}"));
        assert!(same(batch, &back), "{encoding:?}:\n{batch:?}\n  !=\n{back:?}");
    }
}

/// A msgpack value of bounded depth, for extra keys.
fn value(u: &mut Unstructured<'_>, depth: u32) -> Result<Value> {
    let kinds = if depth == 0 { 7 } else { 9 };
    Ok(match u.choose_index(kinds)? {
        0 => Value::Nil,
        1 => Value::Boolean(u.arbitrary()?),
        2 => Value::from(u.arbitrary::<i64>()?),
        3 => Value::from(u.arbitrary::<u64>()?),
        4 => Value::F64(u.arbitrary()?),
        5 => Value::Binary(u.arbitrary()?),
        6 => Value::String(u.arbitrary::<String>()?.into()),
        7 => Value::Array(
            (0..u.choose_index(4)?)
                .map(|_| value(u, depth - 1))
                .collect::<Result<_>>()?,
        ),
        _ => Value::Map(
            (0..u.choose_index(4)?)
                .map(|_| Ok((value(u, depth - 1)?, value(u, depth - 1)?)))
                .collect::<Result<_>>()?,
        ),
    })
}

fn extra(u: &mut Unstructured<'_>) -> Result<Extra> {
    if u.arbitrary()? {
        return Ok(Extra::Text(u.arbitrary()?));
    }
    let v = match value(u, 3)? {
        Value::String(_) => Value::Nil,
        v => v,
    };
    let mut bytes = Vec::new();
    rmpv::encode::write_value(&mut bytes, &v).expect("writing to a Vec");
    Ok(Extra::Raw(bytes))
}

fn stored(u: &mut Unstructured<'_>) -> Result<Stored> {
    let extra_keys = if u.arbitrary()? {
        let blocks = u.choose_index(4)?;
        Some(
            (0..blocks)
                .map(|_| {
                    if u.arbitrary()? {
                        Ok(Some((0..u.choose_index(4)?).map(|_| extra(u)).collect::<Result<_>>()?))
                    } else {
                        Ok(None)
                    }
                })
                .collect::<Result<_>>()?,
        )
    } else {
        None
    };
    Ok(Stored {
        hashes: u.arbitrary()?,
        parent: u.arbitrary()?,
        token_ids: u.arbitrary()?,
        block_size: u.arbitrary()?,
        lora_name: u.arbitrary()?,
        lora_id: u.arbitrary()?,
        medium: u.arbitrary()?,
        extra_keys,
        group: u.arbitrary()?,
        spec_kind: u.arbitrary()?,
    })
}

fn batch(u: &mut Unstructured<'_>) -> Result<Batch> {
    let mut events = Vec::new();
    for _ in 0..u.choose_index(6)? {
        events.push(match u.choose_index(4)? {
            0 => Event::Stored(stored(u)?),
            1 => Event::Removed(Removed {
                hashes: u.arbitrary()?,
                medium: u.arbitrary()?,
                group: u.arbitrary()?,
            }),
            2 => Event::Cleared,
            _ => {
                let tag: String = u.arbitrary()?;
                if ["BlockStored", "BlockRemoved", "AllBlocksCleared"].contains(&tag.as_str()) {
                    Event::Cleared
                } else {
                    Event::Unknown(tag)
                }
            }
        });
    }
    Ok(Batch {
        ts: u.arbitrary()?,
        events,
        dp_rank: u.arbitrary()?,
    })
}

fuzz_target!(|data: &[u8]| {
    if let Ok(decoded) = event::decode_batch(data) {
        encodes_back(&decoded);
    }
    if let Some(seq) = data.get(..8) {
        let n = event::decode_seq(seq).expect("8 bytes are a sequence frame");
        assert_eq!(&event::encode_seq(n)[..], seq);
    }
    if let Ok(generated) = batch(&mut Unstructured::new(data)) {
        encodes_back(&generated);
    }
});
