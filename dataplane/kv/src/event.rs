//! vLLM's KV events: ZeroMQ frames `[topic, seq, payload]`, the payload a msgpack
//! `EventBatch [ts, events, data_parallel_rank]`. Decoding and encoding of the bytes only:
//! no sockets, no sequence bookkeeping (the caller's), no meaning given to the hashes.
//!
//! Events come as maps tagged by `"type"` (vLLM 0.9 and later) or as positional arrays whose
//! first element is the tag (older releases); both decode to the same [`Event`]. Block hashes
//! come as integers (the low 64 bits, vLLM's default) or as bytes (the full digest, with
//! `VLLM_KV_EVENTS_USE_INT_BLOCK_HASHES=0`); both become a [`BlockHash`].
//!
//! The reference is vLLM's `vllm/distributed/kv_events.py` (msgspec structs, `tag=True`,
//! `omit_defaults=True`; the batch `array_like=True`): fields without a default are always
//! written, `None` included; fields with a default (`None`) are left out while they hold it
//! (in a positional array only at the end). What vLLM publishes and [`Stored`] does not keep
//! (`kv_cache_spec_sliding_window`, `locality`, `ownership`, `session_id`) is type-checked
//! and dropped, like any key this version does not know.

use rmpv::Value;

/// vLLM's hash of a block, as published: the integer's 64 bits, or a 64-bit digest of the
/// bytes form. Only compared for equality (to map a `BlockRemoved` to what was stored).
pub type BlockHash = u64;

/// The replay socket's end marker: sequence number -1.
pub const END_SEQ: i64 = -1;

/// One decoded batch: the events one engine step produced.
#[derive(Clone, Debug, PartialEq)]
pub struct Batch {
    /// When the engine published it (seconds since the epoch, the engine's clock).
    pub ts: f64,
    /// The events, in the order the engine produced them.
    pub events: Vec<Event>,
    /// The data-parallel rank that produced it, when the engine says.
    pub dp_rank: Option<u32>,
}

/// One KV cache event.
#[derive(Clone, Debug, PartialEq)]
pub enum Event {
    /// `BlockStored`: blocks entered the cache.
    Stored(Stored),
    /// `BlockRemoved`: blocks left the cache.
    Removed(Removed),
    /// The engine dropped its whole prefix cache (`/reset_prefix_cache`, a sleep).
    Cleared,
    /// An event type this version does not know: counted and skipped.
    Unknown(String),
}

/// `BlockStored`: consecutive full blocks, each chained to the one before, the first to
/// `parent` (or to nothing).
#[derive(Clone, Debug, PartialEq)]
pub struct Stored {
    /// The blocks' hashes, in chain order.
    pub hashes: Vec<BlockHash>,
    /// The hash of the block the first one is chained to; `None` for a prompt's first block.
    pub parent: Option<BlockHash>,
    /// The tokens of all the blocks, `block_size` per block.
    pub token_ids: Vec<u32>,
    /// Tokens per block.
    pub block_size: u32,
    /// The LoRA adapter's name (newer releases), else its numeric id (older ones).
    pub lora_name: Option<String>,
    /// The LoRA adapter's numeric id (deprecated by vLLM, still published).
    pub lora_id: Option<i64>,
    /// `GPU` (the engine's own cache), `CPU` or `STORAGE` (offload tiers); `None` from
    /// releases that do not say.
    pub medium: Option<String>,
    /// Per block, the extra keys vLLM hashed with it (LoRA name, multimodal pairs, the
    /// cache salt on the first block), untagged as published. `None`: no block has any.
    pub extra_keys: Option<Vec<Option<Vec<Extra>>>>,
    /// The KV cache group (hybrid models have several); `None` from releases that do not say.
    pub group: Option<u32>,
    /// The group's kind, e.g. `full_attention`, `sliding_window`.
    pub spec_kind: Option<String>,
}

/// `BlockRemoved`: blocks evicted from `medium`.
#[derive(Clone, Debug, PartialEq)]
pub struct Removed {
    /// The evicted blocks' hashes.
    pub hashes: Vec<BlockHash>,
    /// Where they were evicted from (see [`Stored::medium`]).
    pub medium: Option<String>,
    /// The KV cache group (see [`Stored::group`]).
    pub group: Option<u32>,
}

/// One extra key of a block, as published.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum Extra {
    /// A string: a LoRA name or a cache salt.
    Text(String),
    /// Anything else (a multimodal `(identifier, offset)` pair, a digest), as its msgpack
    /// bytes (re-encoded, so the shortest form): compared, never interpreted.
    Raw(Vec<u8>),
}

/// Why a frame or a payload is not what vLLM publishes.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum DecodeError {
    /// The sequence frame must be 8 bytes.
    #[error("the sequence frame is {0} bytes, not 8")]
    SeqLength(usize),
    /// The payload is not one msgpack value.
    #[error("the payload is not msgpack: {0}")]
    Msgpack(String),
    /// The payload is msgpack, but not an event batch (the message names the field).
    #[error("the payload is not an event batch: {0}")]
    Shape(String),
}

/// How [`encode_batch`] writes events.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Encoding {
    /// Maps with a `"type"` key, fields equal to their default left out: what vLLM 0.9 and
    /// later publish (msgspec `tag=True, omit_defaults=True`).
    Tagged,
    /// Arrays, the tag first, then every field of vLLM 0.32's classes in declaration order,
    /// nil included (msgspec `array_like=True`, as older releases published with fewer
    /// fields).
    Positional,
}

/// Decodes the sequence frame: 8 bytes, big-endian, signed ([`END_SEQ`] ends a replay).
pub fn decode_seq(frame: &[u8]) -> Result<i64, DecodeError> {
    let bytes: [u8; 8] = frame.try_into().map_err(|_| DecodeError::SeqLength(frame.len()))?;
    Ok(i64::from_be_bytes(bytes))
}

/// Encodes a sequence number as vLLM sends it.
pub fn encode_seq(seq: i64) -> [u8; 8] {
    seq.to_be_bytes()
}

/// Decodes a payload frame: `[ts, events]` or `[ts, events, data_parallel_rank]`, each event
/// tagged or positional. Unknown event types become [`Event::Unknown`]; unknown keys are
/// ignored; a known field of the wrong type is an error naming it.
pub fn decode_batch(payload: &[u8]) -> Result<Batch, DecodeError> {
    let mut rd = payload;
    let value = read_value(&mut rd).map_err(|e| DecodeError::Msgpack(e.to_string()))?;
    if !rd.is_empty() {
        return Err(DecodeError::Msgpack(format!("{} bytes after the batch", rd.len())));
    }
    let Value::Array(items) = value else {
        return Err(shape("the batch is not an array"));
    };
    let (ts, events, dp_rank) = match items.as_slice() {
        [ts, events] => (ts, events, &Value::Nil),
        [ts, events, dp_rank] => (ts, events, dp_rank),
        _ => {
            return Err(shape(format!("the batch has {} elements, not 2 or 3", items.len())));
        }
    };
    // An integer timestamp (past 2^53 seconds) may lose precision: fine.
    let ts = ts
        .as_f64()
        .ok_or_else(|| shape(format!("ts is {}, not a number", describe(ts))))?;
    let Value::Array(events) = events else {
        return Err(shape(format!("events is {}, not an array", describe(events))));
    };
    let events = events
        .iter()
        .enumerate()
        .map(|(i, event)| decode_event(event).map_err(|m| shape(format!("event {i}: {m}"))))
        .collect::<Result<_, _>>()?;
    let dp_rank = optional(
        Some(dp_rank),
        "data_parallel_rank",
        as_u32,
        "an unsigned 32-bit integer",
    )
    .map_err(shape)?;
    Ok(Batch { ts, events, dp_rank })
}

/// Encodes a batch as vLLM's publisher does (msgspec): the batch an array, `[ts, events]`
/// plus the rank when there is one; the events as `encoding` says.
///
/// The tagged form of what vLLM publishes is byte for byte vLLM's own (the fixtures check
/// it), with two limits: hashes are written as integers (a digest of the bytes form cannot
/// be turned back into bytes), and [`Event::Unknown`] is written as its tag alone. An
/// [`Extra::Raw`] that is not one msgpack value (never the case for a decoded one) is
/// written as msgpack bytes (`bin`).
pub fn encode_batch(batch: &Batch, encoding: Encoding) -> Vec<u8> {
    let events = batch.events.iter().map(|event| encode_event(event, encoding)).collect();
    let mut items = vec![Value::F64(batch.ts), Value::Array(events)];
    if let Some(rank) = batch.dp_rank {
        items.push(Value::from(rank));
    }
    to_msgpack(&Value::Array(items))
}

/// The tags vLLM gives its event classes.
const STORED: &str = "BlockStored";
const REMOVED: &str = "BlockRemoved";
const CLEARED: &str = "AllBlocksCleared";

/// `BlockStored`'s fields in declaration order: the positions in the positional form.
const STORED_FIELDS: &[&str] = &[
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

/// The first of `BlockStored`'s fields with a default (nil): from `extra_keys` on.
const STORED_FIRST_DEFAULT: usize = 7;

/// `BlockRemoved`'s fields in declaration order.
const REMOVED_FIELDS: &[&str] = &["block_hashes", "medium", "group_idx", "locality", "ownership"];

/// The first of `BlockRemoved`'s fields with a default: from `group_idx` on.
const REMOVED_FIRST_DEFAULT: usize = 2;

/// An event's fields, by name, in either form.
enum Fields<'a> {
    Map(&'a [(Value, Value)]),
    /// The values after the tag, and the names of their positions.
    Array(&'a [Value], &'static [&'static str]),
}

impl<'a> Fields<'a> {
    /// The field's value; `None` when it is left out (a default, or a release before it).
    fn get(&self, name: &str) -> Option<&'a Value> {
        match self {
            // The last of duplicate keys wins, as in msgspec.
            Fields::Map(entries) => entries
                .iter()
                .rev()
                .find(|(key, _)| key.as_str() == Some(name))
                .map(|(_, value)| value),
            Fields::Array(values, names) => {
                let at = names.iter().position(|n| *n == name)?;
                values.get(at)
            }
        }
    }
}

fn decode_event(event: &Value) -> Result<Event, String> {
    let (tag, fields) = match event {
        Value::Map(entries) => {
            let fields = Fields::Map(entries);
            let tag = fields.get("type").ok_or("a map without a \"type\" key")?;
            (tag, fields)
        }
        Value::Array(items) => {
            let (tag, values) = items.split_first().ok_or("an empty array")?;
            let names = match tag.as_str() {
                Some(STORED) => STORED_FIELDS,
                Some(REMOVED) => REMOVED_FIELDS,
                _ => &[],
            };
            (tag, Fields::Array(values, names))
        }
        other => return Err(format!("{}, not a map or an array", describe(other))),
    };
    let tag = tag
        .as_str()
        .ok_or_else(|| format!("the tag is {}, not a string", describe(tag)))?;
    let event = match tag {
        STORED => Event::Stored(decode_stored(&fields).map_err(|m| format!("{STORED}: {m}"))?),
        REMOVED => Event::Removed(decode_removed(&fields).map_err(|m| format!("{REMOVED}: {m}"))?),
        CLEARED => Event::Cleared,
        other => Event::Unknown(other.to_owned()),
    };
    Ok(event)
}

fn decode_stored(f: &Fields<'_>) -> Result<Stored, String> {
    // Known and type-checked, not kept (see the module doc).
    optional(
        f.get("kv_cache_spec_sliding_window"),
        "kv_cache_spec_sliding_window",
        as_i64,
        "an integer",
    )?;
    for name in ["locality", "ownership", "session_id"] {
        optional(f.get(name), name, as_string, "a string")?;
    }
    Ok(Stored {
        hashes: required(f.get("block_hashes"), "block_hashes", as_hashes, HASHES)?,
        parent: optional(f.get("parent_block_hash"), "parent_block_hash", as_hash, HASH)?,
        token_ids: required(
            f.get("token_ids"),
            "token_ids",
            as_tokens,
            "a list of unsigned 32-bit integers",
        )?,
        block_size: required(f.get("block_size"), "block_size", as_u32, "an unsigned 32-bit integer")?,
        lora_id: optional(f.get("lora_id"), "lora_id", as_i64, "an integer")?,
        medium: optional(f.get("medium"), "medium", as_string, "a string")?,
        lora_name: optional(f.get("lora_name"), "lora_name", as_string, "a string")?,
        extra_keys: optional(
            f.get("extra_keys"),
            "extra_keys",
            as_extra_keys,
            "a list of lists or nils",
        )?,
        group: optional(f.get("group_idx"), "group_idx", as_u32, "an unsigned 32-bit integer")?,
        spec_kind: optional(f.get("kv_cache_spec_kind"), "kv_cache_spec_kind", as_string, "a string")?,
    })
}

fn decode_removed(f: &Fields<'_>) -> Result<Removed, String> {
    for name in ["locality", "ownership"] {
        optional(f.get(name), name, as_string, "a string")?;
    }
    Ok(Removed {
        hashes: required(f.get("block_hashes"), "block_hashes", as_hashes, HASHES)?,
        medium: optional(f.get("medium"), "medium", as_string, "a string")?,
        group: optional(f.get("group_idx"), "group_idx", as_u32, "an unsigned 32-bit integer")?,
    })
}

const HASH: &str = "a block hash (an integer or bytes)";
const HASHES: &str = "a list of block hashes (integers or bytes)";

/// A field that must be there and not nil.
fn required<T>(
    value: Option<&Value>,
    name: &str,
    convert: fn(&Value) -> Option<T>,
    expected: &str,
) -> Result<T, String> {
    match value {
        None => Err(format!("`{name}` is missing")),
        Some(value) => convert(value).ok_or_else(|| format!("`{name}` is {}, not {expected}", describe(value))),
    }
}

/// A field that may be left out or nil (both `None`).
fn optional<T>(
    value: Option<&Value>,
    name: &str,
    convert: fn(&Value) -> Option<T>,
    expected: &str,
) -> Result<Option<T>, String> {
    match value {
        None | Some(Value::Nil) => Ok(None),
        Some(value) => required(Some(value), name, convert, expected).map(Some),
    }
}

fn as_u32(value: &Value) -> Option<u32> {
    value.as_u64().and_then(|n| u32::try_from(n).ok())
}

fn as_i64(value: &Value) -> Option<i64> {
    value.as_i64()
}

fn as_string(value: &Value) -> Option<String> {
    value.as_str().map(str::to_owned)
}

/// An integer hash is its 64 bits (a negative one, from a signed encoder, reinterpreted);
/// a bytes hash is digested to 64 bits.
fn as_hash(value: &Value) -> Option<BlockHash> {
    match value {
        Value::Integer(n) => n.as_u64().or_else(|| n.as_i64().map(i64::cast_unsigned)),
        Value::Binary(bytes) => Some(xxhash_rust::xxh3::xxh3_64(bytes)),
        _ => None,
    }
}

fn as_hashes(value: &Value) -> Option<Vec<BlockHash>> {
    value.as_array()?.iter().map(as_hash).collect()
}

fn as_tokens(value: &Value) -> Option<Vec<u32>> {
    value.as_array()?.iter().map(as_u32).collect()
}

fn as_extra_keys(value: &Value) -> Option<Vec<Option<Vec<Extra>>>> {
    value
        .as_array()?
        .iter()
        .map(|block| match block {
            Value::Nil => Some(None),
            Value::Array(keys) => Some(Some(keys.iter().map(as_extra).collect())),
            _ => None,
        })
        .collect()
}

fn as_extra(value: &Value) -> Extra {
    match value.as_str() {
        Some(text) => Extra::Text(text.to_owned()),
        None => Extra::Raw(to_msgpack(value)),
    }
}

fn encode_event(event: &Event, encoding: Encoding) -> Value {
    // The values of the fields [`Stored`] and [`Removed`] keep, in declaration order; the
    // rest of the declared fields are nil.
    let (tag, names, mut values) = match event {
        Event::Stored(s) => (
            STORED,
            STORED_FIELDS,
            vec![
                hashes_value(&s.hashes),
                opt_value(s.parent),
                Value::Array(s.token_ids.iter().map(|&t| Value::from(t)).collect()),
                Value::from(s.block_size),
                opt_value(s.lora_id),
                opt_value(s.medium.as_deref()),
                opt_value(s.lora_name.as_deref()),
                s.extra_keys.as_deref().map_or(Value::Nil, extra_keys_value),
                opt_value(s.group),
                opt_value(s.spec_kind.as_deref()),
            ],
        ),
        Event::Removed(r) => (
            REMOVED,
            REMOVED_FIELDS,
            vec![
                hashes_value(&r.hashes),
                opt_value(r.medium.as_deref()),
                opt_value(r.group),
            ],
        ),
        Event::Cleared => (CLEARED, &[][..], Vec::new()),
        Event::Unknown(tag) => (tag.as_str(), &[][..], Vec::new()),
    };
    values.resize(names.len(), Value::Nil);
    match encoding {
        Encoding::Tagged => {
            // omit_defaults: a field with a default (all of them nil) is left out while it
            // holds it; the others are written, nil or not.
            let first_default = match tag {
                STORED => STORED_FIRST_DEFAULT,
                REMOVED => REMOVED_FIRST_DEFAULT,
                _ => 0,
            };
            let fields = names.iter().zip(values).enumerate();
            let written = fields
                .filter(|(i, (_, value))| *i < first_default || !value.is_nil())
                .map(|(_, (name, value))| (Value::from(*name), value));
            let mut entries = vec![(Value::from("type"), Value::from(tag))];
            entries.extend(written);
            Value::Map(entries)
        }
        // msgspec writes every field of an array-like struct, defaults included.
        Encoding::Positional => {
            let mut items = vec![Value::from(tag)];
            items.extend(values);
            Value::Array(items)
        }
    }
}

fn hashes_value(hashes: &[BlockHash]) -> Value {
    Value::Array(hashes.iter().map(|&h| Value::from(h)).collect())
}

fn opt_value<T: Into<Value>>(value: Option<T>) -> Value {
    value.map_or(Value::Nil, Into::into)
}

fn extra_keys_value(keys: &[Option<Vec<Extra>>]) -> Value {
    let block = |keys: &Option<Vec<Extra>>| match keys {
        None => Value::Nil,
        Some(keys) => Value::Array(keys.iter().map(extra_value).collect()),
    };
    Value::Array(keys.iter().map(block).collect())
}

fn extra_value(extra: &Extra) -> Value {
    match extra {
        Extra::Text(text) => Value::from(text.as_str()),
        Extra::Raw(bytes) => {
            let mut rd = bytes.as_slice();
            match read_value(&mut rd) {
                Ok(value) if rd.is_empty() => value,
                _ => Value::Binary(bytes.clone()),
            }
        }
    }
}

/// How deep a payload may nest, in rmpv's units (two per level of arrays or maps). vLLM's
/// deepest is 7 levels (batch, events, event, extra_keys, block, key, a multimodal pair);
/// rmpv's own limit (1024) overflows a 2 MiB thread stack in a debug build.
const MAX_DEPTH: usize = 64;

fn read_value(rd: &mut &[u8]) -> Result<Value, rmpv::decode::Error> {
    rmpv::decode::read_value_with_max_depth(rd, MAX_DEPTH)
}

fn to_msgpack(value: &Value) -> Vec<u8> {
    let mut out = Vec::new();
    // Writing into a Vec cannot fail.
    let _ = rmpv::encode::write_value(&mut out, value);
    out
}

fn shape(message: impl Into<String>) -> DecodeError {
    DecodeError::Shape(message.into())
}

/// A short description of a value for an error message (never the whole of a long list).
fn describe(value: &Value) -> String {
    match value {
        Value::Nil => "nil".to_owned(),
        Value::Boolean(b) => format!("the boolean {b}"),
        Value::Integer(n) => format!("the integer {n}"),
        Value::F32(x) => format!("the float {x}"),
        Value::F64(x) => format!("the float {x}"),
        Value::String(s) => match s.as_str() {
            Some(s) if s.len() <= 40 => format!("the string {s:?}"),
            Some(s) => format!("a string of {} bytes", s.len()),
            None => "a string that is not UTF-8".to_owned(),
        },
        Value::Binary(b) => format!("{} bytes", b.len()),
        Value::Array(items) => format!("a list of {}", items.len()),
        Value::Map(entries) => format!("a map of {}", entries.len()),
        Value::Ext(kind, _) => format!("an extension value of type {kind}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    // The hex test vectors were written by msgspec 0.23: vLLM 0.32's classes, and older
    // releases' classes rebuilt with `array_like=True`.

    fn unhex(hex: &str) -> Vec<u8> {
        (0..hex.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&hex[i..i + 2], 16).unwrap())
            .collect()
    }

    fn stored(hashes: Vec<u64>, parent: Option<u64>, token_ids: Vec<u32>) -> Stored {
        Stored {
            hashes,
            parent,
            token_ids,
            block_size: 2,
            lora_name: None,
            lora_id: None,
            medium: Some("GPU".to_owned()),
            extra_keys: None,
            group: Some(0),
            spec_kind: Some("full_attention".to_owned()),
        }
    }

    /// vLLM 0.32's classes with `array_like=True`: every field written, nil included.
    const POSITIONAL_NOW: &str = "93cb3ff8000000000000939fab426c6f636b53746f72656492010207940102\
        030402c0a3475055c0c000ae66756c6c5f617474656e74696f6ec0c0c0c096ac426c6f636b52656d6f7665649102\
        a347505500c0c091b0416c6c426c6f636b73436c656172656400";

    #[test]
    fn sequence_numbers_are_big_endian_and_signed() {
        assert_eq!(decode_seq(&[0, 0, 0, 0, 0, 0, 0, 6]), Ok(6));
        assert_eq!(decode_seq(&[0xff; 8]), Ok(END_SEQ));
        assert_eq!(decode_seq(&[0; 7]), Err(DecodeError::SeqLength(7)));
        assert_eq!(decode_seq(&encode_seq(0x0102_0304_0506)), Ok(0x0102_0304_0506));
        assert_eq!(encode_seq(END_SEQ), [0xff; 8]);
    }

    #[test]
    fn positional_events_decode_and_encode_as_msgspec_writes_them() {
        let bytes = unhex(POSITIONAL_NOW);
        let batch = decode_batch(&bytes).unwrap();
        let expected = Batch {
            ts: 1.5,
            events: vec![
                Event::Stored(stored(vec![1, 2], Some(7), vec![1, 2, 3, 4])),
                Event::Removed(Removed {
                    hashes: vec![2],
                    medium: Some("GPU".to_owned()),
                    group: Some(0),
                }),
                Event::Cleared,
            ],
            dp_rank: Some(0),
        };
        assert_eq!(batch, expected);
        assert_eq!(encode_batch(&batch, Encoding::Positional), bytes);
    }

    #[test]
    fn a_nil_between_fields_of_a_positional_event_is_none() {
        // extra_keys nil and group_idx nil between medium and kv_cache_spec_kind; no rank.
        let bytes = unhex(
            "93cb3ff8000000000000919fab426c6f636b53746f7265649101c092050602c0a3475055c0c0c0ae66756c6c\
             5f617474656e74696f6ec0c0c0c0c0",
        );
        let batch = decode_batch(&bytes).unwrap();
        let mut expected = stored(vec![1], None, vec![5, 6]);
        expected.group = None;
        assert_eq!(batch.events, vec![Event::Stored(expected)]);
        assert_eq!(batch.dp_rank, None);
    }

    #[test]
    fn old_releases_positional_arrays_stop_after_lora_id_or_medium() {
        // vLLM 0.8/0.9: `[ts, events]`, BlockStored up to lora_id, BlockRemoved with medium.
        let up_to_lora_id = unhex(
            "92cb40000000000000009296ab426c6f636b53746f72656491cfffffffffffffffffc092010202039\
             3ac426c6f636b52656d6f76656491cfffffffffffffffffc0",
        );
        let batch = decode_batch(&up_to_lora_id).unwrap();
        assert_eq!(batch.ts, 2.0);
        assert_eq!(batch.dp_rank, None);
        let Event::Stored(s) = &batch.events[0] else {
            panic!("{:?}", batch.events[0]);
        };
        assert_eq!(s.hashes, vec![u64::MAX]);
        assert_eq!((s.parent, s.block_size, s.lora_id), (None, 2, Some(3)));
        assert_eq!((&s.medium, s.group, &s.spec_kind), (&None, None, &None));
        assert_eq!(
            batch.events[1],
            Event::Removed(Removed {
                hashes: vec![u64::MAX],
                medium: None,
                group: None
            })
        );

        let up_to_medium = unhex("92cb40000000000000009197ab426c6f636b53746f72656491050492010202c0a3435055");
        let batch = decode_batch(&up_to_medium).unwrap();
        let Event::Stored(s) = &batch.events[0] else {
            panic!("{:?}", batch.events[0]);
        };
        assert_eq!((s.hashes.as_slice(), s.parent), (&[5][..], Some(4)));
        assert_eq!(s.medium.as_deref(), Some("CPU"));
        assert_eq!((s.lora_id, s.group), (None, None));
    }

    #[test]
    fn bytes_hashes_are_digested_and_extra_keys_kept_untagged() {
        // Every field of vLLM 0.32, bytes hashes (VLLM_KV_EVENTS_USE_INT_BLOCK_HASHES=0), a
        // LoRA name and a salt on block 0, an ("mm", 3) pair and bytes on block 1.
        let bytes = unhex(
            "93cb4008000000000000918fa474797065ab426c6f636b53746f726564ac626c6f636b5f68617368657392\
             c4020102c40103b1706172656e745f626c6f636b5f68617368c40100a9746f6b656e5f696473940909090\
             9aa626c6f636b5f73697a6502a76c6f72615f6964c0a66d656469756da3475055a96c6f72615f6e616d65\
             a26164aa65787472615f6b6579739292a26164a473616c749292a26d6d03c401ffa967726f75705f696478\
             00b26b765f63616368655f737065635f6b696e64ae66756c6c5f617474656e74696f6ebc6b765f636163\
             68655f737065635f736c6964696e675f77696e646f7710a86c6f63616c697479a54c4f43414ca96f776e\
             657273686970a27431aa73657373696f6e5f6964a17301",
        );
        let batch = decode_batch(&bytes).unwrap();
        assert_eq!(batch.dp_rank, Some(1));
        let Event::Stored(s) = &batch.events[0] else {
            panic!("{:?}", batch.events[0]);
        };
        let digest = xxhash_rust::xxh3::xxh3_64;
        assert_eq!(s.hashes, vec![digest(&[1, 2]), digest(&[3])]);
        assert_eq!(s.parent, Some(digest(&[0])));
        assert_eq!(s.lora_name.as_deref(), Some("ad"));
        let text = |t: &str| Extra::Text(t.to_owned());
        assert_eq!(
            s.extra_keys,
            Some(vec![
                Some(vec![text("ad"), text("salt")]),
                Some(vec![
                    // ["mm", 3] and b"\xff", re-encoded.
                    Extra::Raw(unhex("92a26d6d03")),
                    Extra::Raw(unhex("c401ff")),
                ]),
            ])
        );
    }

    #[test]
    fn negative_integer_hashes_keep_their_bits() {
        // From a signed encoder: [7, [["BlockRemoved", [-1, -2], "GPU"]]].
        let batch = decode_batch(&unhex("92079193ac426c6f636b52656d6f76656492fffea3475055")).unwrap();
        assert_eq!(batch.ts, 7.0);
        let Event::Removed(r) = &batch.events[0] else {
            panic!("{:?}", batch.events[0]);
        };
        assert_eq!(r.hashes, vec![u64::MAX, u64::MAX - 1]);
    }

    /// A batch of one event, given as a msgpack value.
    fn batch_of(event: Value) -> Vec<u8> {
        to_msgpack(&Value::Array(vec![Value::F64(1.0), Value::Array(vec![event])]))
    }

    fn tagged(tag: &str, fields: Vec<(&str, Value)>) -> Value {
        let mut entries = vec![(Value::from("type"), Value::from(tag))];
        entries.extend(fields.into_iter().map(|(k, v)| (Value::from(k), v)));
        Value::Map(entries)
    }

    fn ints(values: &[i64]) -> Value {
        Value::Array(values.iter().map(|&v| Value::from(v)).collect())
    }

    #[test]
    fn unknown_keys_and_event_types_are_skipped_not_errors() {
        let event = tagged(
            "BlockRemoved",
            vec![
                ("block_hashes", ints(&[1])),
                ("medium", Value::Nil),
                ("from_the_future", Value::Map(Vec::new())),
            ],
        );
        let batch = decode_batch(&batch_of(event)).unwrap();
        assert_eq!(
            batch.events,
            vec![Event::Removed(Removed {
                hashes: vec![1],
                medium: None,
                group: None
            })]
        );
        let batch = decode_batch(&batch_of(tagged("BlockMoved", Vec::new()))).unwrap();
        assert_eq!(batch.events, vec![Event::Unknown("BlockMoved".to_owned())]);
        let positional = Value::Array(vec![Value::from("BlockMoved"), Value::from(1)]);
        let batch = decode_batch(&batch_of(positional)).unwrap();
        assert_eq!(batch.events, vec![Event::Unknown("BlockMoved".to_owned())]);
    }

    #[test]
    fn wrong_types_are_errors_that_name_the_field() {
        let base = || {
            vec![
                ("block_hashes", ints(&[1])),
                ("parent_block_hash", Value::Nil),
                ("token_ids", ints(&[1, 2])),
                ("block_size", Value::from(2)),
            ]
        };
        let with = |name: &str, value: Value| {
            let mut fields = base();
            fields.retain(|(n, _)| *n != name);
            fields.push((name, value));
            decode_batch(&batch_of(tagged("BlockStored", fields)))
        };
        assert!(with("block_size", Value::from(2)).is_ok());
        let cases = [
            ("token_ids", ints(&[1, -1]), "`token_ids`"),
            ("token_ids", ints(&[1, 1 << 32]), "`token_ids`"),
            ("block_hashes", Value::from("abc"), "`block_hashes`"),
            ("block_hashes", Value::Array(vec![Value::from("h")]), "`block_hashes`"),
            ("block_size", Value::from(-2), "`block_size` is the integer -2"),
            ("block_size", Value::Nil, "`block_size` is nil"),
            ("medium", Value::from(1), "`medium` is the integer 1"),
            ("group_idx", Value::from(true), "`group_idx`"),
            ("extra_keys", ints(&[1]), "`extra_keys`"),
            ("locality", Value::from(3), "`locality`"),
        ];
        for (name, value, message) in cases {
            match with(name, value) {
                Err(DecodeError::Shape(m)) => {
                    assert!(m.contains(message), "{m:?} should name {message}");
                    assert!(m.starts_with("event 0: BlockStored: "), "{m:?}");
                }
                other => panic!("{name}: {other:?}"),
            }
        }
        let mut missing = base();
        missing.retain(|(n, _)| *n != "token_ids");
        let err = decode_batch(&batch_of(tagged("BlockStored", missing))).unwrap_err();
        assert_eq!(
            err,
            DecodeError::Shape("event 0: BlockStored: `token_ids` is missing".to_owned())
        );
    }

    #[test]
    fn what_is_not_a_batch_is_an_error() {
        let shape = |value: Value| decode_batch(&to_msgpack(&value));
        assert!(matches!(shape(Value::from(1)), Err(DecodeError::Shape(_))));
        assert!(matches!(shape(ints(&[1])), Err(DecodeError::Shape(_))));
        assert!(matches!(
            shape(Value::Array(vec![Value::from("x"), ints(&[])])),
            Err(DecodeError::Shape(_))
        ));
        let rank = Value::Array(vec![Value::F64(1.0), ints(&[]), Value::from(-1)]);
        assert!(matches!(shape(rank), Err(DecodeError::Shape(m)) if m.contains("data_parallel_rank")));
        let event = Value::Array(vec![Value::F64(1.0), ints(&[5])]);
        assert!(matches!(shape(event), Err(DecodeError::Shape(m)) if m.starts_with("event 0:")));
        assert!(matches!(decode_batch(&[]), Err(DecodeError::Msgpack(_))));
        assert!(matches!(decode_batch(&[0x92, 0x01]), Err(DecodeError::Msgpack(_))));
        let mut trailing = to_msgpack(&Value::Array(vec![Value::F64(1.0), ints(&[])]));
        assert!(decode_batch(&trailing).is_ok());
        trailing.push(0);
        assert!(matches!(decode_batch(&trailing), Err(DecodeError::Msgpack(_))));
    }

    #[test]
    fn tagged_encoding_leaves_out_defaults_only() {
        let mut event = stored(vec![1], None, vec![1, 2]);
        event.group = None;
        event.spec_kind = None;
        event.medium = None;
        let batch = Batch {
            ts: 1.0,
            events: vec![Event::Stored(event), Event::Cleared],
            dp_rank: None,
        };
        let bytes = encode_batch(&batch, Encoding::Tagged);
        let mut rd = bytes.as_slice();
        let value = rmpv::decode::read_value(&mut rd).unwrap();
        let events = value.as_array().unwrap()[1].as_array().unwrap();
        assert_eq!(value.as_array().unwrap().len(), 2, "no rank, no third element");
        let keys: Vec<_> = events[0]
            .as_map()
            .unwrap()
            .iter()
            .map(|(k, _)| k.as_str().unwrap())
            .collect();
        let always = ["type", "block_hashes", "parent_block_hash", "token_ids", "block_size"];
        let nil_but_written = ["lora_id", "medium", "lora_name"];
        assert_eq!(keys, [&always[..], &nil_but_written[..]].concat());
        assert_eq!(events[1], tagged("AllBlocksCleared", Vec::new()));
        assert_eq!(decode_batch(&bytes).unwrap(), batch);
    }
}
