//! Exact KV-aware routing: what each vLLM engine holds, from its own KV events.
//!
//! vLLM publishes every block it stores in or evicts from its prefix cache (ZeroMQ PUB,
//! `[topic, seq, msgpack batch]`). This crate has no IO; it
//! - decodes those batches, in both of vLLM's encodings ([`event`]);
//! - keys blocks by their tokens, chained with lmstack's own hash ([`key`]), so that the router
//!   needs neither vLLM's hash algorithm nor its seed: `BlockStored` carries each block's
//!   token ids, and vLLM's hashes are only mapped to these keys for `BlockRemoved`;
//! - keeps, per engine, the set of blocks it holds, with a memory bound and the rules that
//!   keep it from going stale: sequence gaps, restarts and clears ([`index`]);
//! - turns a request into the token ids vLLM will see: the model's own tokenizer and chat
//!   template ([`prompt`]).
//!
//! With `intake`, it also follows engines' events over ZeroMQ into their indexes
//! ([`intake`]: tokio, for the router's KV thread and for lmstack-control).

pub mod event;
pub mod index;
#[cfg(feature = "intake")]
pub mod intake;
pub mod key;
pub mod prompt;
