//! The simulator's tokenizers. By default its own, deterministic and cheap, not a real
//! vocabulary: text is cut into pieces of `chars_per_token` bytes, each hashed to an id, so
//! equal text prefixes give equal token prefixes (which is all prefix caching needs). With
//! `--tokenizer`, a model's real tokenizer and chat template, applied as vLLM applies them
//! (`lmstack_kv::prompt`), for token-exact KV blocks and events.

use std::path::Path;

use lmstack_kv::prompt::{PromptError, PromptTokenizer};
use serde_json::{Value, json};

/// How requests become prompt token ids.
pub enum Tokenizer {
    /// The simulator's hash tokenizer and chat rendering.
    Hash { chars_per_token: usize },
    /// A model's tokenizer and chat template, as vLLM applies them.
    Model(Box<PromptTokenizer>),
}

impl Tokenizer {
    /// Loads a model directory's tokenizer and chat template.
    pub fn model(dir: &Path) -> Result<Self, PromptError> {
        Ok(Self::Model(Box::new(PromptTokenizer::from_dir(dir)?)))
    }

    /// The prompt of a `/v1/completions` request (`body` raw, `req` the same parsed).
    pub fn completion(&self, body: &[u8], req: &Value) -> Result<Vec<u32>, String> {
        match self {
            Tokenizer::Hash { chars_per_token } => match req.get("prompt") {
                Some(prompt) => prompt_tokens(prompt, *chars_per_token),
                None => Err("`prompt` is required".into()),
            },
            Tokenizer::Model(t) => t.completion(body).map_err(|e| e.to_string()),
        }
    }

    /// The prompt of a `/v1/chat/completions` request: its messages rendered by the chat
    /// template, tokenized (`body` raw, whose key order a template may see; `req` parsed).
    pub fn chat(&self, body: &[u8], req: &Value) -> Result<Vec<u32>, String> {
        match self {
            Tokenizer::Hash { chars_per_token } => match req.get("messages") {
                Some(messages) => render_chat(messages).map(|text| tokenize(&text, *chars_per_token)),
                None => Err("`messages` is required".into()),
            },
            Tokenizer::Model(t) => t.chat(body).map_err(|e| e.to_string()),
        }
    }

    /// The prompt of a `/v1/responses` request: its `input` (a string, or messages) as a chat.
    pub fn responses(&self, req: &Value) -> Result<Vec<u32>, String> {
        let messages = match req.get("input") {
            Some(Value::String(s)) => json!([{"role": "user", "content": s}]),
            Some(list @ Value::Array(_)) => list.clone(),
            _ => return Err("`input` must be a string or a list of messages".into()),
        };
        let chat = json!({"messages": messages});
        self.chat(chat.to_string().as_bytes(), &chat)
    }

    /// A text to embed, rank or score, with special tokens as vLLM adds them.
    pub fn text(&self, text: &str) -> Result<Vec<u32>, String> {
        match self {
            Tokenizer::Hash { chars_per_token } => Ok(tokenize(text, *chars_per_token)),
            Tokenizer::Model(t) => t.encode(text, true).map_err(|e| e.to_string()),
        }
    }
}

pub const VOCAB: u32 = 50_000;

pub fn tokenize(text: &str, chars_per_token: usize) -> Vec<u32> {
    text.as_bytes()
        .chunks(chars_per_token.max(1))
        .map(|piece| (xxhash_rust::xxh3::xxh3_64(piece) % u64::from(VOCAB)) as u32)
        .collect()
}

/// Renders chat messages the way a chat template would: role markers and contents in
/// order, then the assistant marker.
pub fn render_chat(messages: &Value) -> Result<String, String> {
    let list = messages.as_array().ok_or("`messages` must be a list")?;
    if list.is_empty() {
        return Err("`messages` must not be empty".into());
    }
    let mut out = String::new();
    for m in list {
        let role = m
            .get("role")
            .and_then(Value::as_str)
            .ok_or("every message needs a `role`")?;
        out.push_str("<|");
        out.push_str(role);
        out.push_str("|>\n");
        match m.get("content") {
            Some(Value::String(s)) => out.push_str(s),
            Some(Value::Array(parts)) => {
                for p in parts {
                    if let Some(t) = p.get("text").and_then(Value::as_str) {
                        out.push_str(t);
                    }
                }
            }
            Some(Value::Null) | None => {}
            Some(_) => return Err("message `content` must be a string or a list of parts".into()),
        }
        out.push_str("<|end|>\n");
    }
    out.push_str("<|assistant|>\n");
    Ok(out)
}

/// The token ids of a completions `prompt`: a string, a one-string list, or token ids.
pub fn prompt_tokens(prompt: &Value, chars_per_token: usize) -> Result<Vec<u32>, String> {
    match prompt {
        Value::String(s) => Ok(tokenize(s, chars_per_token)),
        Value::Array(items) => match items.as_slice() {
            [Value::String(s)] => Ok(tokenize(s, chars_per_token)),
            [Value::Array(ids)] => token_ids(ids),
            ids if ids.iter().all(Value::is_u64) => token_ids(ids),
            _ => Err("the simulator takes one prompt per request".into()),
        },
        _ => Err("`prompt` must be a string, a list with one string, or token ids".into()),
    }
}

fn token_ids(ids: &[Value]) -> Result<Vec<u32>, String> {
    ids.iter()
        .map(|v| {
            v.as_u64()
                .map(|n| n as u32)
                .ok_or_else(|| "token ids must be integers".to_owned())
        })
        .collect()
}

/// The text the simulator "generates" as output token `i` of request `seed`.
pub fn output_piece(seed: u64, i: usize) -> String {
    let h = xxhash_rust::xxh3::xxh3_64_with_seed(&(i as u64).to_le_bytes(), seed);
    format!(" w{}", h % 1000)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn equal_prefixes_give_equal_tokens() {
        let a = tokenize("system prompt, then user A", 4);
        let b = tokenize("system prompt, then user B", 4);
        assert_eq!(a[..6], b[..6]);
        assert_eq!(a.len(), 7);
    }

    #[test]
    fn chat_rendering_keeps_order() {
        let text = render_chat(&json!([
            {"role": "system", "content": "be brief"},
            {"role": "user", "content": [{"type": "text", "text": "hi"}]}
        ]))
        .unwrap();
        assert_eq!(
            text,
            "<|system|>\nbe brief<|end|>\n<|user|>\nhi<|end|>\n<|assistant|>\n"
        );
        assert!(render_chat(&json!([])).is_err());
        assert!(render_chat(&json!([{"content": "x"}])).is_err());
    }

    #[test]
    fn prompt_shapes() {
        assert_eq!(prompt_tokens(&json!("abcdefgh"), 4).unwrap().len(), 2);
        assert_eq!(prompt_tokens(&json!(["abcd"]), 4).unwrap().len(), 1);
        assert_eq!(prompt_tokens(&json!([1, 2, 3]), 4).unwrap(), vec![1, 2, 3]);
        assert_eq!(prompt_tokens(&json!([[1, 2]]), 4).unwrap(), vec![1, 2]);
        assert!(prompt_tokens(&json!(["a", "b"]), 4).is_err());
    }
}
