//! Fuzz target: Anthropic Messages requests converted to the chat request vLLM renders
//! (`lmstack_http::anthropic::{to_chat, to_chat_approx, prompt_pieces}`) and a Messages
//! stream's usage (`StreamUsage`).
//!
//! Input: the body, as is (and, read as an SSE event, the stream's). Properties:
//! - a body that converts is one serde_json reads as an object with a `messages` list, and
//!   the conversion is a JSON object with a `messages` list (of objects with a role) and, for
//!   a body with `tools`, as many tools (but for the contents of strings and numbers in
//!   fields it skips or keeps raw, which only their syntax is checked in, as the peek's);
//! - the exact conversion, where it succeeds, is the approximate one;
//! - `prompt_pieces` succeeds exactly where the approximate conversion does;
//! - the stream's usage never panics on any event.
//!
//! Not covered here: whether the conversion is vLLM's (a unit test against vLLM's own
//! converter, and `cargo xtask real-vllm`, check that).

#![no_main]

use libfuzzer_sys::fuzz_target;
use lmstack_http::anthropic::{StreamUsage, prompt_pieces, to_chat, to_chat_approx};
use serde_json::Value;

/// serde_json's errors for what a skipped (or raw) field may hold unchecked.
const SKIPPED_UNCHECKED: [&str; 4] = [
    "invalid unicode code point",
    "lone leading surrogate in hex escape",
    "unexpected end of hex escape",
    "number out of range",
];

fuzz_target!(|data: &[u8]| {
    let approx = to_chat_approx(data);
    if let Ok(chat) = to_chat(data) {
        assert_eq!(Ok(&chat), approx.as_ref(), "the exact conversion differs");
    }
    assert_eq!(prompt_pieces(data, |_| {}), approx.is_ok());
    if let Ok(chat) = &approx {
        // Fields the conversion skips or keeps raw are checked for syntax only (as the peek
        // skips them): the engine rejects what serde_json's `Value` would.
        let unchecked = |e: serde_json::Error| {
            let e = e.to_string();
            assert!(SKIPPED_UNCHECKED.iter().any(|m| e.starts_with(m)), "{e}");
        };
        let input: Value = match serde_json::from_slice(data) {
            Ok(v) => v,
            Err(e) => return unchecked(e),
        };
        assert!(input["messages"].is_array(), "converted without messages: {input}");
        let chat: Value = match serde_json::from_slice(chat) {
            Ok(v) => v,
            Err(e) => return unchecked(e),
        };
        let messages = chat["messages"].as_array().expect("the conversion has messages");
        assert!(messages.iter().all(|m| m["role"].is_string()), "{chat}");
        if let Some(tools) = input["tools"].as_array() {
            assert_eq!(chat["tools"].as_array().map_or(0, Vec::len), tools.len(), "{chat}");
        }
    }
    let mut usage = StreamUsage::default();
    usage.observe(data);
    usage.observe(data);
});
