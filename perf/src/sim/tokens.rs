//! The simulator's tokenizers. By default its own, deterministic and cheap, not a real
//! vocabulary: text is cut into pieces of `chars_per_token` bytes, each hashed to an id, so
//! equal text prefixes give equal token prefixes (which is all prefix caching needs); the
//! simulator's own output pieces (`greedy`) in a text are read back as their output ids, so a
//! prompt that quotes an answer continues it as the ids would. Chats are rendered by a fixed
//! template (`render_chat`), with vLLM's `add_generation_prompt` and `continue_final_message`.
//! With `--tokenizer`, a model's real tokenizer and chat template, applied as vLLM applies them
//! (`lmstack_kv::prompt`), for token-exact KV blocks and events; output pieces are then plain
//! text to it.

use std::path::Path;

use lmstack_kv::prompt::{PromptError, PromptTokenizer};
use serde_json::{Value, json};

use super::greedy::{self, PIECE_LEN};

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
        let ending = chat_ending(req)?;
        match self {
            Tokenizer::Hash { chars_per_token } => match req.get("messages") {
                Some(messages) => render_chat(messages, ending).map(|text| tokenize(&text, *chars_per_token)),
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

/// The hash tokenizer: output pieces (`greedy`) become their ids, the text between them is cut
/// into `chars_per_token` bytes, each hashed to an id under `VOCAB`.
pub fn tokenize(text: &str, chars_per_token: usize) -> Vec<u32> {
    let bytes = text.as_bytes();
    let cpt = chars_per_token.max(1);
    let mut ids = Vec::with_capacity(bytes.len() / cpt + 1);
    let hash_plain = |plain: &[u8], ids: &mut Vec<u32>| {
        ids.extend(
            plain
                .chunks(cpt)
                .map(|piece| (xxhash_rust::xxh3::xxh3_64(piece) % u64::from(VOCAB)) as u32),
        );
    };
    // `plain`: where the text not yet tokenized starts; `at`: where to look for a piece.
    let (mut plain, mut at) = (0, 0);
    while let Some(space) = bytes[at..].iter().position(|&b| b == b' ') {
        let i = at + space;
        match greedy::parse_piece(&bytes[i..]) {
            Some(id) => {
                hash_plain(&bytes[plain..i], &mut ids);
                ids.push(id);
                plain = i + PIECE_LEN;
                at = plain;
            }
            None => at = i + 1,
        }
    }
    hash_plain(&bytes[plain..], &mut ids);
    ids
}

/// How a rendered chat ends, as vLLM's `add_generation_prompt` and `continue_final_message`
/// ask.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ChatEnding {
    /// The assistant marker, for a new answer (`add_generation_prompt`, the default).
    GenerationPrompt,
    /// The final message left open, to be continued (`continue_final_message`).
    ContinueFinal,
    /// Every message closed, nothing after.
    Closed,
}

/// The ending a chat request asks for, refused as vLLM refuses it (all 400s): both flags set
/// (its request check, or transformers' when `add_generation_prompt` is left at its default),
/// or a final message to continue that is not the assistant's (vLLM's check for Mistral
/// tokenizers; kept here for every template, so that a continuation is always an answer's).
pub fn chat_ending(req: &Value) -> Result<ChatEnding, String> {
    let flag = |k: &str| req.get(k).and_then(Value::as_bool);
    let add_generation_prompt = flag("add_generation_prompt");
    if flag("continue_final_message") != Some(true) {
        return Ok(match add_generation_prompt {
            Some(false) => ChatEnding::Closed,
            _ => ChatEnding::GenerationPrompt,
        });
    }
    match add_generation_prompt {
        Some(true) => {
            return Err("Cannot set both `continue_final_message` and `add_generation_prompt` to True.".into());
        }
        None => {
            return Err(
                "continue_final_message and add_generation_prompt are not compatible. Use \
                        continue_final_message when you want the model to continue the final message, and \
                        add_generation_prompt when you want to add a header that will prompt it to start a new \
                        assistant message instead."
                    .into(),
            );
        }
        Some(false) => {}
    }
    let last_role = req
        .get("messages")
        .and_then(Value::as_array)
        .and_then(|m| m.last())
        .and_then(|m| m.get("role"))
        .and_then(Value::as_str);
    if last_role != Some("assistant") {
        return Err(
            "Cannot set `continue_final_message` to True when the last message is not from the assistant.".into(),
        );
    }
    Ok(ChatEnding::ContinueFinal)
}

/// The role of the answer, as vLLM names it: the assistant's, or with no generation prompt,
/// the final message's.
pub fn answer_role(req: &Value) -> &str {
    if req.get("add_generation_prompt").and_then(Value::as_bool) == Some(false) {
        let last = req.get("messages").and_then(Value::as_array).and_then(|m| m.last());
        if let Some(role) = last.and_then(|m| m.get("role")).and_then(Value::as_str) {
            return role;
        }
    }
    "assistant"
}

/// Renders chat messages the way a chat template would: role markers and contents in order,
/// each message closed by `<|end|>`, then the assistant marker (`GenerationPrompt`). To
/// continue the final message (`ContinueFinal`), it is left open; an assistant message's
/// opening is the generation prompt, so that rendering starts with the one of the messages
/// before it with a generation prompt.
pub fn render_chat(messages: &Value, ending: ChatEnding) -> Result<String, String> {
    let list = messages.as_array().ok_or("`messages` must be a list")?;
    if list.is_empty() {
        return Err("`messages` must not be empty".into());
    }
    let mut out = String::new();
    for (i, m) in list.iter().enumerate() {
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
        if !(ending == ChatEnding::ContinueFinal && i + 1 == list.len()) {
            out.push_str("<|end|>\n");
        }
    }
    if ending == ChatEnding::GenerationPrompt {
        out.push_str("<|assistant|>\n");
    }
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
                .and_then(|n| u32::try_from(n).ok())
                .ok_or_else(|| "token ids must be integers under 2^32".to_owned())
        })
        .collect()
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
    fn output_pieces_read_back_as_their_ids() {
        let answer = greedy::expected_ids(&[1, 2, 3], 3);
        let text = format!("quoted:{} and more", greedy::text(&answer));
        let ids = tokenize(&text, 4);
        assert_eq!(ids[..2], tokenize("quoted:", 4)[..], "the text before is cut as alone");
        assert_eq!(ids[2..5], answer[..]);
        assert_eq!(ids[5..], tokenize(" and more", 4)[..]);
        // Not a piece: too short, or not lowercase hex.
        assert!(tokenize("a w1234 wxyzab w0000G", 4).iter().all(|&id| id < VOCAB));
    }

    #[test]
    fn chat_rendering_keeps_order() {
        let messages = json!([
            {"role": "system", "content": "be brief"},
            {"role": "user", "content": [{"type": "text", "text": "hi"}]}
        ]);
        let text = render_chat(&messages, ChatEnding::GenerationPrompt).unwrap();
        assert_eq!(
            text,
            "<|system|>\nbe brief<|end|>\n<|user|>\nhi<|end|>\n<|assistant|>\n"
        );
        let closed = render_chat(&messages, ChatEnding::Closed).unwrap();
        assert_eq!(closed, text.strip_suffix("<|assistant|>\n").unwrap());
        assert!(render_chat(&json!([]), ChatEnding::GenerationPrompt).is_err());
        assert!(render_chat(&json!([{"content": "x"}]), ChatEnding::GenerationPrompt).is_err());
    }

    #[test]
    fn a_continued_final_message_extends_the_generation_prompt() {
        let before = json!([{"role": "user", "content": "hi"}]);
        let with_answer =
            json!([{"role": "user", "content": "hi"}, {"role": "assistant", "content": " w00001 w00002"}]);
        let prompt = render_chat(&before, ChatEnding::GenerationPrompt).unwrap();
        let continued = render_chat(&with_answer, ChatEnding::ContinueFinal).unwrap();
        assert_eq!(continued, format!("{prompt} w00001 w00002"));
        assert_eq!(
            tokenize(&continued, 4),
            [
                tokenize(&prompt, 4),
                vec![greedy::OUTPUT_BASE + 1, greedy::OUTPUT_BASE + 2]
            ]
            .concat()
        );
    }

    #[test]
    fn chat_endings_are_checked_as_vllm_checks_them() {
        let chat = |extra: Value| {
            let mut req =
                json!({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "a"}]});
            for (k, v) in extra.as_object().unwrap() {
                req[k] = v.clone();
            }
            chat_ending(&req)
        };
        assert_eq!(chat(json!({})), Ok(ChatEnding::GenerationPrompt));
        assert_eq!(chat(json!({"add_generation_prompt": false})), Ok(ChatEnding::Closed));
        assert_eq!(
            chat(json!({"add_generation_prompt": false, "continue_final_message": true})),
            Ok(ChatEnding::ContinueFinal)
        );
        let both = chat(json!({"add_generation_prompt": true, "continue_final_message": true}));
        assert!(both.unwrap_err().starts_with("Cannot set both"));
        let default = chat(json!({"continue_final_message": true}));
        assert!(default.unwrap_err().contains("are not compatible"));
        let user_last = json!({"messages": [{"role": "user", "content": "hi"}],
                               "add_generation_prompt": false, "continue_final_message": true});
        assert!(chat_ending(&user_last).unwrap_err().contains("not from the assistant"));
        assert_eq!(answer_role(&user_last), "user");
        assert_eq!(answer_role(&json!({"messages": []})), "assistant");
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
