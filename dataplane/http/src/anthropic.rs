//! Anthropic Messages requests (`/v1/messages`, `/v1/messages/count_tokens`) as vLLM renders
//! them, and the usage of their event streams.
//!
//! vLLM serves the Messages API by converting each request into a chat-completions request
//! (`entrypoints/anthropic/serving.py`, `to_chat_completion_request`) and rendering that with
//! the model's chat template. [`to_chat`] makes the same conversion, so that the router's
//! token-exact prompt (a chat request through the chat template) is the engine's; and
//! [`prompt_pieces`] feeds the converted conversation (system, tools, then the messages with
//! their thinking, tool calls and tool results, in order) to the prefix hasher, so that an
//! agent's next request shares its leading blocks with the previous one. Fields that vary
//! from turn to turn without changing the prompt (`cache_control`, thinking signatures,
//! Claude Code's per-request billing header in the system prompt) are left out, as vLLM
//! leaves them out.
//!
//! Not a request model: only what the prompt is made of is read; the body is forwarded to
//! the engine as the client sent it. Not reproduced exactly (so [`to_chat`] refuses them, and
//! the router matches such a request approximately): `tool_addition`/`tool_removal` blocks,
//! a `tool_result` inside an assistant message whose content is a list (vLLM prints Python's
//! `repr`), and templates that need inline system messages merged into the first (vLLM
//! probes the template for that; this module never merges).

use std::borrow::Cow;
use std::collections::BTreeMap;

use serde::Deserialize;
use serde::de::IgnoredAny;
use serde_json::value::RawValue;

use crate::peek::{RECORD, UNIT};
use crate::stream::{Usage, append_member, event_data};

/// The Messages routes.
pub const MESSAGES: &str = "/v1/messages";
pub const COUNT_TOKENS: &str = "/v1/messages/count_tokens";

/// Whether `path` is one of the Messages routes (whose errors are Anthropic's shape).
pub fn is_messages_route(path: &str) -> bool {
    path == MESSAGES || path == COUNT_TOKENS
}

/// Why a request cannot be converted (exactly).
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ConvertError {
    #[error("not a Messages request: {0}")]
    Invalid(String),
    #[error("not reproduced exactly: {0}")]
    Inexact(&'static str),
}

#[derive(Deserialize)]
struct Request<'a> {
    #[serde(borrow, default)]
    model: Option<&'a RawValue>,
    #[serde(borrow, default)]
    system: Option<&'a RawValue>,
    #[serde(borrow)]
    messages: Vec<Message<'a>>,
    #[serde(borrow, default)]
    tools: Option<Vec<Tool<'a>>>,
    #[serde(borrow, default)]
    tool_choice: Option<ToolChoice<'a>>,
    #[serde(borrow, default)]
    thinking: Option<Typed<'a>>,
    #[serde(borrow, default)]
    output_config: Option<OutputConfig<'a>>,
    #[serde(borrow, default)]
    chat_template_kwargs: Option<&'a RawValue>,
    #[serde(borrow, default)]
    cache_salt: Option<&'a RawValue>,
}

#[derive(Deserialize)]
struct Message<'a> {
    #[serde(borrow)]
    role: Cow<'a, str>,
    #[serde(borrow)]
    content: &'a RawValue,
}

#[derive(Deserialize)]
struct Block<'a> {
    #[serde(borrow, rename = "type")]
    kind: Cow<'a, str>,
    #[serde(borrow, default)]
    text: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    thinking: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    id: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    tool_use_id: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    name: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    input: Option<&'a RawValue>,
    #[serde(borrow, default)]
    content: Option<&'a RawValue>,
    #[serde(borrow, default)]
    source: Option<&'a RawValue>,
}

/// An item of a `tool_result`'s content list.
#[derive(Deserialize)]
struct ResultItem<'a> {
    #[serde(borrow, rename = "type", default)]
    kind: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    text: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    source: Option<&'a RawValue>,
    #[serde(borrow, default)]
    tool_name: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    name: Option<Cow<'a, str>>,
}

#[derive(Deserialize)]
struct Tool<'a> {
    #[serde(borrow)]
    name: Cow<'a, str>,
    #[serde(borrow, default)]
    description: Option<Cow<'a, str>>,
    #[serde(borrow)]
    input_schema: &'a RawValue,
    #[serde(default)]
    strict: Option<bool>,
    #[serde(default)]
    defer_loading: Option<bool>,
}

#[derive(Deserialize)]
struct ToolChoice<'a> {
    #[serde(borrow, rename = "type")]
    kind: Cow<'a, str>,
    #[serde(borrow, default)]
    name: Option<Cow<'a, str>>,
}

#[derive(Deserialize)]
struct Typed<'a> {
    #[serde(borrow, rename = "type")]
    kind: Cow<'a, str>,
}

#[derive(Deserialize)]
struct OutputConfig<'a> {
    #[serde(borrow, default)]
    effort: Option<Cow<'a, str>>,
}

#[derive(Deserialize)]
struct ImageSource<'a> {
    #[serde(borrow, rename = "type", default)]
    kind: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    url: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    media_type: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    data: Option<Cow<'a, str>>,
}

/// A chat message as vLLM's converter builds it.
#[derive(Debug, Default)]
struct ChatMessage<'a> {
    role: &'static str,
    content: Option<ChatContent<'a>>,
    reasoning: Option<String>,
    tool_calls: Vec<ToolCall<'a>>,
    tool_call_id: Option<Cow<'a, str>>,
}

#[derive(Debug)]
enum ChatContent<'a> {
    Text(Cow<'a, str>),
    Parts(Vec<Part<'a>>),
}

#[derive(Debug)]
enum Part<'a> {
    Text(Cow<'a, str>),
    ImageUrl(String),
    ToolReference(Cow<'a, str>),
}

#[derive(Debug)]
struct ToolCall<'a> {
    id: Cow<'a, str>,
    name: Cow<'a, str>,
    /// The tool input's JSON text (vLLM's is `json.dumps` of it: the same object).
    arguments: Cow<'a, str>,
}

/// The chat request vLLM makes of a Messages request: what its prompt is made of.
struct Chat<'a> {
    model: Option<&'a RawValue>,
    messages: Vec<ChatMessage<'a>>,
    tools: Vec<ChatTool<'a>>,
    tool_choice: Option<String>,
    reasoning_effort: Option<Cow<'a, str>>,
    chat_template_kwargs: Option<&'a RawValue>,
    cache_salt: Option<&'a RawValue>,
    /// Something was converted only approximately (see the module's doc).
    inexact: Option<&'static str>,
}

struct ChatTool<'a> {
    name: Cow<'a, str>,
    description: Option<Cow<'a, str>>,
    /// JSON text: the input schema, with `"type": "object"` added when it has no type.
    parameters: Cow<'a, str>,
    strict: Option<bool>,
    defer_loading: Option<bool>,
}

/// Claude Code's attribution header, a per-request hash vLLM drops from system prompts.
const BILLING_HEADER: &str = "x-anthropic-billing-header";

fn invalid(e: impl std::fmt::Display) -> ConvertError {
    ConvertError::Invalid(e.to_string())
}

/// A content that is a string or a list of blocks.
enum Content<'a> {
    Text(Cow<'a, str>),
    Blocks(Vec<Block<'a>>),
}

fn content(raw: &RawValue) -> Result<Content<'_>, ConvertError> {
    match raw.get().as_bytes().first() {
        Some(b'"') => Ok(Content::Text(serde_json::from_str(raw.get()).map_err(invalid)?)),
        Some(b'[') => Ok(Content::Blocks(serde_json::from_str(raw.get()).map_err(invalid)?)),
        _ => Err(ConvertError::Invalid(
            "content is neither text nor a list of blocks".into(),
        )),
    }
}

/// `_convert_image_source_to_url`.
fn image_url(raw: &RawValue) -> Result<String, ConvertError> {
    let s: ImageSource<'_> = serde_json::from_str(raw.get()).map_err(invalid)?;
    if s.kind.as_deref() == Some("url") {
        return Ok(s.url.map(Cow::into_owned).unwrap_or_default());
    }
    Ok(format!(
        "data:{};base64,{}",
        s.media_type.as_deref().unwrap_or("image/jpeg"),
        s.data.as_deref().unwrap_or("")
    ))
}

/// `_extract_system_text`: a system message's text, without the billing header.
fn system_text<'a>(c: Content<'a>) -> Option<Cow<'a, str>> {
    match c {
        Content::Text(t) if t.starts_with(BILLING_HEADER) => None,
        Content::Text(t) => Some(t).filter(|t| !t.is_empty()),
        Content::Blocks(blocks) => {
            let parts: Vec<Cow<'a, str>> = blocks
                .into_iter()
                .filter(|b| b.kind == "text")
                .filter_map(|b| b.text)
                .filter(|t| !t.is_empty() && !t.starts_with(BILLING_HEADER))
                .collect();
            (!parts.is_empty()).then(|| Cow::Owned(parts.concat()))
        }
    }
}

fn convert(body: &[u8]) -> Result<Chat<'_>, ConvertError> {
    let req: Request<'_> = serde_json::from_slice(body).map_err(invalid)?;
    let mut inexact = None;
    let mut messages: Vec<ChatMessage<'_>> = Vec::new();
    // `_convert_system_message`: the top-level system prompt (a string as it is; text blocks
    // joined, the billing header left out), as the first message when not empty.
    if let Some(system) = req.system.filter(|s| s.get() != "null") {
        let text = match content(system)? {
            Content::Text(t) => Some(t).filter(|t| !t.is_empty()),
            blocks => system_text(blocks),
        };
        if let Some(text) = text {
            messages.push(ChatMessage {
                role: "system",
                content: Some(ChatContent::Text(text)),
                ..ChatMessage::default()
            });
        }
    }
    // `_convert_messages`.
    for msg in req.messages {
        let role: &'static str = match msg.role.as_ref() {
            "user" => "user",
            "assistant" => "assistant",
            "system" => {
                if let Some(text) = system_text(content(msg.content)?) {
                    messages.push(ChatMessage {
                        role: "system",
                        content: Some(ChatContent::Text(text)),
                        ..ChatMessage::default()
                    });
                }
                continue;
            }
            other => return Err(ConvertError::Invalid(format!("a message with role `{other}`"))),
        };
        let mut out = ChatMessage {
            role,
            ..ChatMessage::default()
        };
        match content(msg.content)? {
            Content::Text(t) => out.content = Some(ChatContent::Text(t)),
            Content::Blocks(blocks) => {
                let mut parts: Vec<Part<'_>> = Vec::new();
                let mut reasoning: Vec<Cow<'_, str>> = Vec::new();
                for block in blocks {
                    match block.kind.as_ref() {
                        "text" => {
                            if let Some(t) = block.text.filter(|t| !t.is_empty()) {
                                parts.push(Part::Text(t));
                            }
                        }
                        "image" => {
                            if let Some(source) = block.source.filter(|s| s.get() != "null") {
                                parts.push(Part::ImageUrl(image_url(source)?));
                            }
                        }
                        "thinking" => {
                            if let Some(t) = block.thinking {
                                reasoning.push(t);
                            }
                        }
                        "tool_use" => {
                            let arguments = match block.input.map(RawValue::get) {
                                Some(raw) if raw != "null" && !is_empty_object(raw) => Cow::Borrowed(raw),
                                _ => Cow::Borrowed("{}"),
                            };
                            out.tool_calls.push(ToolCall {
                                // (vLLM makes one from the clock when the client sent none.)
                                id: block.id.unwrap_or(Cow::Borrowed("call_0")),
                                name: block.name.unwrap_or_default(),
                                arguments,
                            });
                        }
                        "tool_result" if role == "user" => tool_result(&block, &mut messages)?,
                        "tool_result" => {
                            // `"Tool result: " + str(content)`: a list prints as Python's repr.
                            let text = match block.content.map(content).transpose()? {
                                None => Cow::Borrowed(""),
                                Some(Content::Text(t)) => t,
                                Some(Content::Blocks(_)) => {
                                    inexact.get_or_insert("a tool_result list in an assistant message");
                                    Cow::Borrowed(block.content.map_or("", RawValue::get))
                                }
                            };
                            parts.push(Part::Text(Cow::Owned(format!("Tool result: {text}"))));
                        }
                        "tool_addition" | "tool_removal" => {
                            inexact.get_or_insert("tool_addition and tool_removal blocks");
                        }
                        // redacted_thinking (opaque), tool_reference: nothing in the prompt.
                        _ => {}
                    }
                }
                if !reasoning.is_empty() {
                    out.reasoning = Some(reasoning.concat());
                }
                match parts.len() {
                    0 => {}
                    1 if matches!(parts[0], Part::Text(_)) => {
                        if let Some(Part::Text(t)) = parts.pop() {
                            out.content = Some(ChatContent::Text(t));
                        }
                    }
                    _ => out.content = Some(ChatContent::Parts(parts)),
                }
            }
        }
        // A user message left without content (only tool results) is not sent.
        if !(role == "user" && out.content.is_none()) {
            messages.push(out);
        }
    }
    let mut tools = Vec::new();
    for tool in req.tools.unwrap_or_default() {
        tools.push(ChatTool {
            name: tool.name,
            description: tool.description,
            parameters: schema_with_type(tool.input_schema)?,
            strict: tool.strict,
            defer_loading: tool.defer_loading,
        });
    }
    let tool_choice = match &req.tool_choice {
        None if tools.is_empty() => None,
        None => Some("\"auto\"".to_owned()),
        Some(c) => Some(match c.kind.as_ref() {
            "auto" => "\"auto\"".to_owned(),
            "any" => "\"required\"".to_owned(),
            "none" => "\"none\"".to_owned(),
            "tool" => {
                let name = serde_json::to_string(c.name.as_deref().unwrap_or("")).map_err(invalid)?;
                format!(r#"{{"type":"function","function":{{"name":{name}}}}}"#)
            }
            other => return Err(ConvertError::Invalid(format!("tool_choice `{other}`"))),
        }),
    };
    // `_handle_output_config`, then `_handle_thinking` (disabled thinking: `none`, which
    // vLLM replaces by `low` for templates that ignore `none`).
    let mut reasoning_effort = req.output_config.and_then(|o| o.effort);
    if req.thinking.as_ref().is_some_and(|t| t.kind == "disabled") {
        reasoning_effort = Some(Cow::Borrowed("none"));
    }
    Ok(Chat {
        model: req.model,
        messages,
        tools,
        tool_choice,
        reasoning_effort,
        chat_template_kwargs: req.chat_template_kwargs.filter(|k| k.get() != "null"),
        cache_salt: req.cache_salt.filter(|s| s.get() != "null"),
        inexact,
    })
}

fn is_empty_object(raw: &str) -> bool {
    raw.strip_prefix('{')
        .and_then(|r| r.strip_suffix('}'))
        .is_some_and(|inner| inner.trim().is_empty())
}

/// `AnthropicTool.validate_input_schema`: a schema without `type` gets `"type": "object"`
/// (last, as Python's dict adds it).
fn schema_with_type(schema: &RawValue) -> Result<Cow<'_, str>, ConvertError> {
    let keys: BTreeMap<Cow<'_, str>, IgnoredAny> = serde_json::from_str(schema.get()).map_err(invalid)?;
    if keys.contains_key("type") {
        return Ok(Cow::Borrowed(schema.get()));
    }
    let with = append_member(schema.get().as_bytes(), "type", b"\"object\"")
        .ok_or_else(|| ConvertError::Invalid("input_schema is not an object".into()))?;
    String::from_utf8(with).map(Cow::Owned).map_err(invalid)
}

/// `_convert_user_tool_result`: a tool message (text items joined by newlines), then a user
/// message with its images, then a tool message with its tool references.
fn tool_result<'a>(block: &Block<'a>, messages: &mut Vec<ChatMessage<'a>>) -> Result<(), ConvertError> {
    let id = block.tool_use_id.clone().unwrap_or_default();
    let mut text = Cow::Borrowed("");
    let mut images = Vec::new();
    let mut references = Vec::new();
    match block.content.filter(|c| c.get() != "null") {
        None => {}
        Some(raw) if raw.get().starts_with('"') => {
            text = serde_json::from_str(raw.get()).map_err(invalid)?;
        }
        Some(raw) => {
            let items: Vec<&RawValue> = serde_json::from_str(raw.get()).map_err(invalid)?;
            let mut texts: Vec<Cow<'a, str>> = Vec::new();
            for item in items {
                if !item.get().starts_with('{') {
                    continue;
                }
                let item: ResultItem<'a> = serde_json::from_str(item.get()).map_err(invalid)?;
                match item.kind.as_deref() {
                    Some("text") => texts.push(item.text.unwrap_or_default()),
                    Some("image") => {
                        let url = match item.source {
                            Some(s) if s.get() != "null" => image_url(s)?,
                            _ => "data:image/jpeg;base64,".to_owned(),
                        };
                        if !url.is_empty() {
                            images.push(Part::ImageUrl(url));
                        }
                    }
                    Some("tool_reference") => {
                        if let Some(name) = item.tool_name.or(item.name).filter(|n| !n.is_empty()) {
                            references.push(Part::ToolReference(name));
                        }
                    }
                    _ => {}
                }
            }
            text = Cow::Owned(texts.join("\n"));
        }
    }
    messages.push(ChatMessage {
        role: "tool",
        content: Some(ChatContent::Text(text)),
        tool_call_id: Some(id.clone()),
        ..ChatMessage::default()
    });
    if !images.is_empty() {
        messages.push(ChatMessage {
            role: "user",
            content: Some(ChatContent::Parts(images)),
            ..ChatMessage::default()
        });
    }
    if !references.is_empty() {
        messages.push(ChatMessage {
            role: "tool",
            content: Some(ChatContent::Parts(references)),
            tool_call_id: Some(id),
            ..ChatMessage::default()
        });
    }
    Ok(())
}

/// The `/v1/chat/completions` request body vLLM's converter makes of a Messages request
/// `body`, as far as the prompt is concerned: `model`, `messages`, `tools`, `tool_choice`,
/// `reasoning_effort`, `chat_template_kwargs` and `cache_salt` (sampling fields are left
/// out). Raw JSON the client sent (tool inputs and schemas, template kwargs) keeps its key
/// order. An error when the body is not a Messages request or is one this module does not
/// reproduce exactly.
pub fn to_chat(body: &[u8]) -> Result<Vec<u8>, ConvertError> {
    let chat = convert(body)?;
    if let Some(what) = chat.inexact {
        return Err(ConvertError::Inexact(what));
    }
    Ok(write_chat(&chat, body.len()))
}

/// [`to_chat`], with what is not reproduced exactly converted as near as it can be (for an
/// engine simulator, which needs a prompt rather than vLLM's exact one).
pub fn to_chat_approx(body: &[u8]) -> Result<Vec<u8>, ConvertError> {
    Ok(write_chat(&convert(body)?, body.len()))
}

fn write_chat(chat: &Chat<'_>, size: usize) -> Vec<u8> {
    let mut out = Vec::with_capacity(size + 64);
    out.push(b'{');
    if let Some(model) = chat.model {
        out.extend_from_slice(b"\"model\":");
        out.extend_from_slice(model.get().as_bytes());
        out.push(b',');
    }
    out.extend_from_slice(b"\"messages\":[");
    for (i, m) in chat.messages.iter().enumerate() {
        if i > 0 {
            out.push(b',');
        }
        write_message(&mut out, m);
    }
    out.push(b']');
    if !chat.tools.is_empty() {
        out.extend_from_slice(b",\"tools\":[");
        for (i, t) in chat.tools.iter().enumerate() {
            if i > 0 {
                out.push(b',');
            }
            out.extend_from_slice(br#"{"type":"function","function":{"name":"#);
            string(&mut out, &t.name);
            out.extend_from_slice(b",\"description\":");
            match &t.description {
                Some(d) => string(&mut out, d),
                None => out.extend_from_slice(b"null"),
            }
            out.extend_from_slice(b",\"parameters\":");
            out.extend_from_slice(t.parameters.as_bytes());
            if let Some(s) = t.strict {
                out.extend_from_slice(format!(",\"strict\":{s}").as_bytes());
            }
            if let Some(d) = t.defer_loading {
                out.extend_from_slice(format!(",\"defer_loading\":{d}").as_bytes());
            }
            out.extend_from_slice(b"}}");
        }
        out.push(b']');
    }
    if let Some(choice) = &chat.tool_choice {
        out.extend_from_slice(b",\"tool_choice\":");
        out.extend_from_slice(choice.as_bytes());
    }
    if let Some(effort) = &chat.reasoning_effort {
        out.extend_from_slice(b",\"reasoning_effort\":");
        string(&mut out, effort);
    }
    if let Some(kwargs) = chat.chat_template_kwargs {
        out.extend_from_slice(b",\"chat_template_kwargs\":");
        out.extend_from_slice(kwargs.get().as_bytes());
    }
    if let Some(salt) = chat.cache_salt {
        out.extend_from_slice(b",\"cache_salt\":");
        out.extend_from_slice(salt.get().as_bytes());
    }
    out.push(b'}');
    out
}

fn string(out: &mut Vec<u8>, s: &str) {
    // Writing a string into a Vec cannot fail.
    let _ = serde_json::to_writer(&mut *out, s);
}

fn write_message(out: &mut Vec<u8>, m: &ChatMessage<'_>) {
    out.extend_from_slice(b"{\"role\":");
    string(out, m.role);
    if let Some(c) = &m.content {
        out.extend_from_slice(b",\"content\":");
        match c {
            ChatContent::Text(t) => string(out, t),
            ChatContent::Parts(parts) => {
                out.push(b'[');
                for (i, p) in parts.iter().enumerate() {
                    if i > 0 {
                        out.push(b',');
                    }
                    match p {
                        Part::Text(t) => {
                            out.extend_from_slice(br#"{"type":"text","text":"#);
                            string(out, t);
                        }
                        Part::ImageUrl(u) => {
                            out.extend_from_slice(br#"{"type":"image_url","image_url":{"url":"#);
                            string(out, u);
                            out.push(b'}');
                        }
                        Part::ToolReference(n) => {
                            out.extend_from_slice(br#"{"type":"tool_reference","name":"#);
                            string(out, n);
                        }
                    }
                    out.push(b'}');
                }
                out.push(b']');
            }
        }
    }
    if let Some(r) = &m.reasoning {
        out.extend_from_slice(b",\"reasoning\":");
        string(out, r);
    }
    if !m.tool_calls.is_empty() {
        out.extend_from_slice(b",\"tool_calls\":[");
        for (i, c) in m.tool_calls.iter().enumerate() {
            if i > 0 {
                out.push(b',');
            }
            out.extend_from_slice(b"{\"id\":");
            string(out, &c.id);
            out.extend_from_slice(br#","type":"function","function":{"name":"#);
            string(out, &c.name);
            out.extend_from_slice(b",\"arguments\":");
            string(out, &c.arguments);
            out.extend_from_slice(b"}}");
        }
        out.push(b']');
    }
    if let Some(id) = &m.tool_call_id {
        out.extend_from_slice(b",\"tool_call_id\":");
        string(out, id);
    }
    out.push(b'}');
}

/// Feeds a Messages request's prompt to `feed` for prefix hashing, normalised so that equal
/// conversation prefixes give equal byte prefixes: the system prompt, the tools, then every
/// message of the converted conversation (role; text, images, thinking, tool calls, tool
/// results) in order. False when the body is not a Messages request.
pub fn prompt_pieces(body: &[u8], mut feed: impl FnMut(&[u8])) -> bool {
    let Ok(chat) = convert(body) else {
        return false;
    };
    let leading = chat.messages.iter().take_while(|m| m.role == "system").count();
    let (system, rest) = chat.messages.split_at(leading);
    for m in system {
        feed_message(m, &mut feed);
    }
    for t in &chat.tools {
        feed(b"tool");
        feed(&[UNIT]);
        feed(t.name.as_bytes());
        feed(&[UNIT]);
        feed(t.description.as_deref().unwrap_or("").as_bytes());
        feed(&[UNIT]);
        feed(t.parameters.as_bytes());
        feed(&[RECORD]);
    }
    for m in rest {
        feed_message(m, &mut feed);
    }
    true
}

fn feed_message(m: &ChatMessage<'_>, feed: &mut impl FnMut(&[u8])) {
    feed(m.role.as_bytes());
    feed(&[UNIT]);
    if let Some(r) = &m.reasoning {
        feed(r.as_bytes());
        feed(&[UNIT]);
    }
    match &m.content {
        Some(ChatContent::Text(t)) => feed(t.as_bytes()),
        Some(ChatContent::Parts(parts)) => {
            for p in parts {
                match p {
                    Part::Text(t) | Part::ToolReference(t) => feed(t.as_bytes()),
                    Part::ImageUrl(u) => feed(u.as_bytes()),
                }
                feed(&[UNIT]);
            }
        }
        None => {}
    }
    for c in &m.tool_calls {
        feed(&[UNIT]);
        feed(c.id.as_bytes());
        feed(&[UNIT]);
        feed(c.name.as_bytes());
        feed(&[UNIT]);
        feed(c.arguments.as_bytes());
    }
    if let Some(id) = &m.tool_call_id {
        feed(&[UNIT]);
        feed(id.as_bytes());
    }
    feed(&[RECORD]);
}

/// The usage of a Messages event stream, as its events go by: `message_start` carries the
/// input tokens, `message_delta` the final usage (vLLM's has both).
#[derive(Debug, Default)]
pub struct StreamUsage {
    input: Option<u64>,
    last: Option<Usage>,
}

#[derive(Deserialize)]
struct Event {
    #[serde(rename = "type", default)]
    kind: String,
    #[serde(default)]
    message: Option<StartMessage>,
    #[serde(default)]
    usage: Option<Usage>,
}

#[derive(Deserialize)]
struct StartMessage {
    #[serde(default)]
    usage: Option<Usage>,
}

impl StreamUsage {
    /// Reads one whole SSE event (only `message_start` and `message_delta` are parsed).
    pub fn observe(&mut self, event: &[u8]) {
        let named = |name: &[u8]| memchr::memmem::find(event, name).is_some();
        if !named(b"message_start") && !named(b"message_delta") {
            return;
        }
        let Some(data) = event_data(event) else {
            return;
        };
        let Ok(e) = serde_json::from_slice::<Event>(&data) else {
            return;
        };
        match e.kind.as_str() {
            "message_start" => self.input = e.message.and_then(|m| m.usage).map(|u| u.prompt_tokens),
            "message_delta" => {
                if let Some(u) = e.usage {
                    // A delta without input tokens keeps those of the start.
                    let prompt_tokens = match u.prompt_tokens {
                        0 => self.input.unwrap_or(0),
                        n => n,
                    };
                    self.last = Some(Usage {
                        prompt_tokens,
                        completion_tokens: u.completion_tokens,
                    });
                }
            }
            _ => {}
        }
    }

    /// The stream's usage, once its final `message_delta` came.
    pub fn usage(&self) -> Option<Usage> {
        self.last
    }
}

/// An Anthropic error event (`event: error`), as vLLM ends a failed Messages stream; `body`
/// is the error's JSON.
pub fn error_event(body: &[u8]) -> Vec<u8> {
    let mut out = b"event: error\n".to_vec();
    out.extend_from_slice(&crate::stream::data_event(body));
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// vLLM 0.32's converter on this request (`to_chat_completion_request(...).model_dump(
    /// exclude_none=True)`), run with the real vLLM.
    const CLAUDE_LIKE: &str = r#"{"model":"m","max_tokens":5,"system":[{"type":"text","text":"x-anthropic-billing-header: abc"},{"type":"text","text":"You are helpful.","cache_control":{"type":"ephemeral"}}],"tools":[{"name":"get","description":"d","input_schema":{"properties":{"b":{"type":"string"},"a":{"type":"integer"}}}}],"messages":[{"role":"user","content":"hi"},{"role":"assistant","content":[{"type":"thinking","thinking":"hmm","signature":"s"},{"type":"text","text":"call"},{"type":"tool_use","id":"t1","name":"get","input":{"z":1,"a":"é"}}]},{"role":"user","content":[{"type":"tool_result","tool_use_id":"t1","content":[{"type":"text","text":"r1"},{"type":"text","text":"r2"}]},{"type":"text","text":"go on","cache_control":{"type":"ephemeral"}}]}]}"#;
    const VLLM_SAYS: &str = r#"{"messages": [{"content": "You are helpful.", "role": "system"}, {"content": "hi", "role": "user"}, {"role": "assistant", "content": "call", "tool_calls": [{"id": "t1", "function": {"arguments": "{\"z\": 1, \"a\": \"\\u00e9\"}", "name": "get"}, "type": "function"}], "reasoning": "hmm"}, {"content": "r1\nr2", "role": "tool", "tool_call_id": "t1"}, {"content": "go on", "role": "user"}], "tools": [{"type": "function", "function": {"name": "get", "description": "d", "parameters": {"properties": {"b": {"type": "string"}, "a": {"type": "integer"}}, "type": "object"}}}], "tool_choice": "auto"}"#;

    fn value(text: &[u8]) -> serde_json::Value {
        serde_json::from_slice(text).unwrap()
    }

    #[test]
    fn converts_as_vllm_converts() {
        let got = to_chat(CLAUDE_LIKE.as_bytes()).unwrap();
        let mut got = value(&got);
        let want = value(VLLM_SAYS.as_bytes());
        // Tool arguments are the same object (vLLM's text is `json.dumps` of it).
        let args = got["messages"][2]["tool_calls"][0]["function"]["arguments"].take();
        let want_args = &want["messages"][2]["tool_calls"][0]["function"]["arguments"];
        assert_eq!(
            value(args.as_str().unwrap().as_bytes()),
            value(want_args.as_str().unwrap().as_bytes())
        );
        let mut want = want;
        want["messages"][2]["tool_calls"][0]["function"]["arguments"].take();
        got.as_object_mut().unwrap().remove("model");
        assert_eq!(got, want);
        // The schema's own key order is kept, `type` added last.
        let text = String::from_utf8(to_chat(CLAUDE_LIKE.as_bytes()).unwrap()).unwrap();
        assert!(
            text.contains(
                r#""parameters":{"properties":{"b":{"type":"string"},"a":{"type":"integer"}},"type":"object"}"#
            ),
            "{text}"
        );
    }

    #[test]
    fn user_messages_with_only_tool_results_become_tool_messages() {
        let body = br#"{"model":"m","messages":[{"role":"user","content":[{"type":"tool_result","tool_use_id":"t","content":"ok"}]},{"role":"system","content":"x-anthropic-billing-header: 1"},{"role":"system","content":[{"type":"text","text":"be brief"}]}],"thinking":{"type":"disabled"}}"#;
        let got = value(&to_chat(body).unwrap());
        assert_eq!(
            got,
            serde_json::json!({"model":"m","messages":[
                {"role":"tool","content":"ok","tool_call_id":"t"},
                {"role":"system","content":"be brief"}],
                "reasoning_effort":"none"})
        );
        let inexact = br#"{"model":"m","messages":[{"role":"assistant","content":[{"type":"tool_result","content":[{"type":"text","text":"a"}]}]}]}"#;
        assert!(matches!(to_chat(inexact), Err(ConvertError::Inexact(_))));
        let approx = value(&to_chat_approx(inexact).unwrap());
        assert_eq!(
            approx["messages"][0]["content"],
            r#"Tool result: [{"type":"text","text":"a"}]"#
        );
        assert!(matches!(to_chat(br#"{"model":"m"}"#), Err(ConvertError::Invalid(_))));
    }

    fn pieces(body: &str) -> Vec<u8> {
        let mut out = Vec::new();
        assert!(prompt_pieces(body.as_bytes(), |p| out.extend_from_slice(p)));
        out
    }

    #[test]
    fn a_conversation_s_next_turn_extends_its_pieces() {
        // Claude Code moves `cache_control` to the newest block and sends a new billing
        // header each time: neither changes the pieces.
        let turn1 = r#"{"model":"m","system":[{"type":"text","text":"x-anthropic-billing-header: cch=1;"},{"type":"text","text":"sys"}],"tools":[{"name":"t","input_schema":{}}],"messages":[{"role":"user","content":[{"type":"text","text":"do it","cache_control":{"type":"ephemeral"}}]}]}"#;
        let turn2 = r#"{"model":"m","system":[{"type":"text","text":"x-anthropic-billing-header: cch=2;"},{"type":"text","text":"sys"}],"tools":[{"name":"t","input_schema":{}}],"messages":[{"role":"user","content":[{"type":"text","text":"do it"}]},{"role":"assistant","content":[{"type":"thinking","thinking":"plan","signature":"abc"},{"type":"tool_use","id":"u1","name":"t","input":{"p":1}}]},{"role":"user","content":[{"type":"tool_result","tool_use_id":"u1","content":"done","cache_control":{"type":"ephemeral"}}]}]}"#;
        let (one, two) = (pieces(turn1), pieces(turn2));
        assert!(two.starts_with(&one), "{one:?}\n{two:?}");
        assert!(two.len() > one.len());
        // System, then the tools, then the messages.
        let sys = one.windows(3).position(|w| w == b"sys").unwrap();
        let tool = one.windows(4).position(|w| w == b"tool").unwrap();
        let user = one.windows(5).position(|w| w == b"do it").unwrap();
        assert!(sys < tool && tool < user);
        assert!(!prompt_pieces(b"{}", |_| {}));
    }

    proptest::proptest! {
        /// Whatever a client sends, converting never panics, and what converts is JSON.
        #[test]
        fn any_body_converts_to_json_or_an_error(body in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..300)) {
            if let Ok(chat) = to_chat_approx(&body) {
                proptest::prop_assert!(serde_json::from_slice::<serde_json::Value>(&chat).is_ok());
            }
            let _ = prompt_pieces(&body, |_| {});
            StreamUsage::default().observe(&body);
        }

        /// Messages of any text convert to a chat request that says the same text.
        #[test]
        fn any_text_survives_conversion(texts in proptest::collection::vec("\\PC{0,12}", 1..5)) {
            let messages: Vec<serde_json::Value> = texts
                .iter()
                .enumerate()
                .map(|(i, t)| {
                    let role = if i % 2 == 0 { "user" } else { "assistant" };
                    serde_json::json!({"role": role, "content": [{"type": "text", "text": format!("<{t}>")}]})
                })
                .collect();
            let body = serde_json::json!({"model": "m", "system": "s", "messages": messages}).to_string();
            let chat = value(&to_chat(body.as_bytes()).unwrap());
            for (i, t) in texts.iter().enumerate() {
                let want = format!("<{t}>");
                proptest::prop_assert_eq!(chat["messages"][i + 1]["content"].as_str(), Some(want.as_str()));
            }
        }
    }

    #[test]
    fn stream_usage_comes_from_start_and_delta() {
        let mut u = StreamUsage::default();
        u.observe(b"event: message_start\ndata: {\"type\":\"message_start\",\"message\":{\"id\":\"m\",\"usage\":{\"input_tokens\":7,\"output_tokens\":0}}}\n\n");
        assert_eq!(u.usage(), None);
        u.observe(b"event: content_block_delta\ndata: {\"type\":\"content_block_delta\",\"index\":0,\"delta\":{\"type\":\"text_delta\",\"text\":\"usage\"}}\n\n");
        u.observe(b"event: message_delta\ndata: {\"type\":\"message_delta\",\"delta\":{\"stop_reason\":\"max_tokens\"},\"usage\":{\"output_tokens\":5}}\n\n");
        assert_eq!(
            u.usage(),
            Some(Usage {
                prompt_tokens: 7,
                completion_tokens: 5
            })
        );
        u.observe(b"event: message_delta\ndata: {\"type\":\"message_delta\",\"usage\":{\"input_tokens\":3,\"cache_read_input_tokens\":4,\"output_tokens\":6}}\n\n");
        assert_eq!(
            u.usage(),
            Some(Usage {
                prompt_tokens: 7,
                completion_tokens: 6
            })
        );
    }
}
