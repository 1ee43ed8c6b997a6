//! OpenAI streams event by event: an SSE body cut into whole events, and what a router needs
//! to resume a cut `/v1/completions` or `/v1/chat/completions` stream on another engine:
//! the ledger of what the client was sent, the continuation request, and the continuation's
//! events rewritten so the client sees one stream.
//!
//! No IO and no policy: the proxy decides when a stream is cut, where the continuation goes
//! and how many tries it gets. Not a request model either: bodies are handled as JSON values
//! only on the (rare) resume path; on the stream's normal path each event is read once with
//! borrowed fields, and rewritten (the ids nulled in place) only when the router itself asked
//! the engine for token ids.

use std::borrow::Cow;

use bytes::{Bytes, BytesMut};
use serde::Deserialize;
use serde::de::IgnoredAny;
use serde_json::value::RawValue;
use serde_json::{Map, Value};

/// Cuts an SSE body, fed as it arrives, into whole events (each with its blank line).
#[derive(Debug)]
pub struct EventSplitter {
    buf: BytesMut,
    /// Bytes of `buf` already searched for an event's end.
    scanned: usize,
    max_event_bytes: usize,
}

/// An event grew past the splitter's bound without ending.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("an event of more than {0} bytes")]
pub struct EventTooLarge(pub usize);

impl EventSplitter {
    pub fn new(max_event_bytes: usize) -> Self {
        Self {
            buf: BytesMut::new(),
            scanned: 0,
            max_event_bytes,
        }
    }

    /// Adds body bytes. Fails when the event in progress is longer than the bound.
    pub fn push(&mut self, data: &[u8]) -> Result<(), EventTooLarge> {
        self.buf.extend_from_slice(data);
        if self.buf.len() > self.max_event_bytes && self.find_end().is_none() {
            return Err(EventTooLarge(self.max_event_bytes));
        }
        Ok(())
    }

    /// The next whole event, ending with its blank line (`\n\n` or `\r\n\r\n`).
    pub fn next_event(&mut self) -> Option<Bytes> {
        let end = self.find_end()?;
        self.scanned = 0;
        Some(self.buf.split_to(end).freeze())
    }

    /// Bytes of an event not yet complete.
    pub fn pending(&self) -> usize {
        self.buf.len()
    }

    /// Takes the bytes of the event not yet complete (the body ended inside it).
    pub fn next_rest(&mut self) -> Bytes {
        self.scanned = 0;
        self.buf.split().freeze()
    }

    /// Where the first event ends: after a line end followed by an empty line.
    fn find_end(&mut self) -> Option<usize> {
        let b = &self.buf[..];
        // An empty line at the very start is an event of its own (nothing in it); a lone CR
        // may yet become one.
        if b.starts_with(b"\n") {
            return Some(1);
        }
        if b.starts_with(b"\r\n") {
            return Some(2);
        }
        if b == b"\r" {
            return None;
        }
        let mut from = self.scanned;
        while let Some(i) = memchr::memchr(b'\n', &b[from..]).map(|i| from + i) {
            match (b.get(i + 1), b.get(i + 2)) {
                (Some(b'\n'), _) => return Some(i + 2),
                (Some(b'\r'), Some(b'\n')) => return Some(i + 3),
                (None, _) | (Some(b'\r'), None) => {
                    self.scanned = i;
                    return None;
                }
                _ => from = i + 1,
            }
        }
        self.scanned = b.len();
        None
    }
}

/// The payload of an event's `data:` lines (joined by `\n`), or `None` when it has none.
pub fn event_data(event: &[u8]) -> Option<Cow<'_, [u8]>> {
    let mut out: Option<Cow<'_, [u8]>> = None;
    for line in event.split(|&b| b == b'\n') {
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        let Some(value) = line.strip_prefix(b"data:") else {
            continue;
        };
        let value = value.strip_prefix(b" ").unwrap_or(value);
        out = Some(match out {
            None => Cow::Borrowed(value),
            Some(prev) => {
                let mut joined = prev.into_owned();
                joined.push(b'\n');
                joined.extend_from_slice(value);
                Cow::Owned(joined)
            }
        });
    }
    out
}

/// An SSE event carrying `payload` as its data (one `data:` line per line of it).
pub fn data_event(payload: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(payload.len() + 8);
    for line in payload.split(|&b| b == b'\n') {
        out.extend_from_slice(b"data: ");
        out.extend_from_slice(line);
        out.push(b'\n');
    }
    out.push(b'\n');
    out
}

/// The stream's end marker.
pub const DONE_EVENT: &[u8] = b"data: [DONE]\n\n";

/// Which OpenAI stream this is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Api {
    Completions,
    Chat,
}

/// Why a cut stream cannot be resumed (also a metric label).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Unsafe {
    /// More than one choice (`n`, `best_of`, a batch of prompts).
    Choices,
    /// Log probabilities were asked for.
    Logprobs,
    /// The prompt is echoed, or has a suffix.
    Echo,
    /// Structured output (a grammar that would restart).
    Structured,
    /// The assistant began tool calls or reasoning, which cannot be continued as text.
    ToolsOrReasoning,
    /// An event the ledger could not read.
    Unreadable,
    /// The stream outgrew what the ledger keeps (`max_bytes`).
    TooLong,
    /// The request cannot be rebuilt (an unusual prompt or body).
    Request,
    /// The engine itself ended the stream with an error.
    EngineError,
}

impl Unsafe {
    pub fn as_str(self) -> &'static str {
        match self {
            Unsafe::Choices => "choices",
            Unsafe::Logprobs => "logprobs",
            Unsafe::Echo => "echo",
            Unsafe::Structured => "structured",
            Unsafe::ToolsOrReasoning => "tools_or_reasoning",
            Unsafe::Unreadable => "unreadable",
            Unsafe::TooLong => "too_long",
            Unsafe::Request => "request",
            Unsafe::EngineError => "engine_error",
        }
    }
}

/// What to do with an event from the engine.
#[derive(Debug, PartialEq, Eq)]
pub enum Verdict {
    /// Send it as it came.
    Forward,
    /// Send this event instead.
    Rewrite(Vec<u8>),
    /// Send nothing.
    Drop,
}

/// What the client has been sent of a completions or chat stream, and how to go on from it.
#[derive(Debug)]
pub struct Ledger {
    api: Api,
    /// The client asked for token ids itself: they stay in the events.
    keep_ids: bool,
    id: Option<String>,
    object: Option<String>,
    model: Option<String>,
    created: Option<u64>,
    prompt_ids: Option<Vec<u32>>,
    prompt_tokens: Option<u64>,
    output_ids: Vec<u32>,
    text: String,
    /// Completion tokens the client was sent.
    tokens: u64,
    /// Tokens sent before the current part began (what its usage leaves out).
    tokens_before_part: u64,
    /// The last output tokens whose text the client has not seen: events with their ids
    /// and no text (vLLM holds back a character not yet complete). A continuation leaves
    /// them out, and the next engine makes them again.
    held: u64,
    /// Every event with text carried its token ids.
    ids_complete: bool,
    finished: bool,
    done: bool,
    usage_seen: bool,
    /// A chat role went to the client (a continuation's is then not sent again).
    role_sent: bool,
    unsafe_: Option<Unsafe>,
    max_bytes: usize,
    /// 0: the first engine's; n: the n-th continuation.
    part: u32,
    /// The router asked for usage the client did not: the usage chunk is not sent.
    hide_usage: bool,
    /// The stream's usage as the client sees it (summed over continuations), once it came.
    usage: Option<Usage>,
}

/// Tokens a response's usage reports: OpenAI's `prompt_tokens` and `completion_tokens`, or
/// the `input_tokens` and `output_tokens` of Anthropic's Messages and OpenAI's Responses
/// (Anthropic's input counts the cache's tokens apart: they are added back).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(from = "UsageFields")]
pub struct Usage {
    pub prompt_tokens: u64,
    pub completion_tokens: u64,
}

#[derive(Deserialize)]
struct UsageFields {
    #[serde(default)]
    prompt_tokens: Option<u64>,
    #[serde(default)]
    completion_tokens: Option<u64>,
    #[serde(default)]
    input_tokens: Option<u64>,
    #[serde(default)]
    output_tokens: Option<u64>,
    #[serde(default)]
    cache_read_input_tokens: Option<u64>,
    #[serde(default)]
    cache_creation_input_tokens: Option<u64>,
}

impl From<UsageFields> for Usage {
    fn from(u: UsageFields) -> Self {
        let input = || {
            u.input_tokens.unwrap_or(0)
                + u.cache_read_input_tokens.unwrap_or(0)
                + u.cache_creation_input_tokens.unwrap_or(0)
        };
        Usage {
            prompt_tokens: u.prompt_tokens.unwrap_or_else(input),
            completion_tokens: u.completion_tokens.or(u.output_tokens).unwrap_or(0),
        }
    }
}

#[derive(Deserialize)]
struct Chunk<'a> {
    #[serde(borrow, default)]
    id: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    object: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    model: Option<Cow<'a, str>>,
    #[serde(default)]
    created: Option<u64>,
    #[serde(borrow, default)]
    choices: Vec<Choice<'a>>,
    #[serde(borrow, default)]
    prompt_token_ids: Option<&'a RawValue>,
    #[serde(borrow, default)]
    usage: Option<&'a RawValue>,
    #[serde(default)]
    error: Option<IgnoredAny>,
}

#[derive(Deserialize)]
struct Choice<'a> {
    #[serde(default)]
    index: u32,
    #[serde(borrow, default)]
    text: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    delta: Option<Delta<'a>>,
    #[serde(borrow, default)]
    token_ids: Option<&'a RawValue>,
    #[serde(borrow, default)]
    prompt_token_ids: Option<&'a RawValue>,
    #[serde(borrow, default)]
    logprobs: Option<&'a RawValue>,
    #[serde(borrow, default)]
    finish_reason: Option<Cow<'a, str>>,
}

#[derive(Deserialize, Default)]
struct Delta<'a> {
    #[serde(borrow, default)]
    role: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    content: Option<Cow<'a, str>>,
    #[serde(default)]
    tool_calls: Option<Vec<IgnoredAny>>,
    #[serde(borrow, default)]
    reasoning: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    reasoning_content: Option<Cow<'a, str>>,
}

impl Delta<'_> {
    fn is_empty(&self) -> bool {
        self.role.is_none()
            && self.content.as_deref().is_none_or(str::is_empty)
            && self.tool_calls.as_ref().is_none_or(Vec::is_empty)
            && self.reasoning.as_deref().is_none_or(str::is_empty)
            && self.reasoning_content.as_deref().is_none_or(str::is_empty)
    }
}

fn ids(raw: Option<&RawValue>) -> Option<Vec<u32>> {
    raw.and_then(|r| serde_json::from_str::<Option<Vec<u32>>>(r.get()).ok().flatten())
}

impl Ledger {
    /// A ledger for a stream of `api`; `keep_ids`: the client asked for token ids itself;
    /// `max_bytes` bounds what it keeps (text and token ids), past which the stream is not
    /// resumable.
    pub fn new(api: Api, keep_ids: bool, max_bytes: usize) -> Self {
        Self {
            api,
            keep_ids,
            id: None,
            object: None,
            model: None,
            created: None,
            prompt_ids: None,
            prompt_tokens: None,
            output_ids: Vec::new(),
            text: String::new(),
            tokens: 0,
            tokens_before_part: 0,
            held: 0,
            ids_complete: true,
            finished: false,
            done: false,
            usage_seen: false,
            role_sent: false,
            unsafe_: None,
            max_bytes,
            part: 0,
            hide_usage: false,
            usage: None,
        }
    }

    /// The router asked for the usage chunk, the client did not: it is read, not sent.
    pub fn hide_usage(&mut self) {
        self.hide_usage = true;
    }

    /// The stream's usage as the client would see it (over every part), when it came.
    pub fn usage(&self) -> Option<Usage> {
        self.usage
    }

    /// The prompt's tokens, when the engine told them (token ids asked for).
    pub fn prompt_tokens(&self) -> Option<u64> {
        self.prompt_tokens
    }

    /// A usage-only chunk the client did not ask for.
    fn hidden(&self, chunk: &Chunk<'_>) -> bool {
        self.hide_usage && chunk.choices.is_empty() && chunk.usage.is_some()
    }

    /// Completion tokens the client was sent.
    pub fn tokens(&self) -> u64 {
        self.tokens
    }

    /// The stream's end marker went out.
    pub fn done(&self) -> bool {
        self.done
    }

    /// A choice finished (the generation is over; only usage and the end marker may follow).
    pub fn finished(&self) -> bool {
        self.finished
    }

    /// Which part of the stream this is (0: the first engine's).
    pub fn part(&self) -> u32 {
        self.part
    }

    fn mark_unsafe(&mut self, why: Unsafe) {
        self.unsafe_.get_or_insert(why);
    }

    fn kept_bytes(&self) -> usize {
        self.text.len() + 4 * (self.output_ids.len() + self.prompt_ids.as_ref().map_or(0, Vec::len))
    }

    /// Reads one whole event (as [`EventSplitter`] gives it) and says what goes to the client.
    pub fn observe(&mut self, event: &[u8]) -> Verdict {
        let Some(data) = event_data(event) else {
            return Verdict::Forward;
        };
        if data.as_ref() == b"[DONE]" {
            self.done = true;
            return Verdict::Forward;
        }
        if self.part == 0 {
            self.observe_first(&data)
        } else {
            self.observe_continued(&data)
        }
    }

    /// An event of the first engine's: recorded, stripped of token ids the client did not
    /// ask for.
    fn observe_first(&mut self, data: &[u8]) -> Verdict {
        let Ok(text) = std::str::from_utf8(data) else {
            self.mark_unsafe(Unsafe::Unreadable);
            return Verdict::Forward;
        };
        let Ok(chunk) = serde_json::from_str::<Chunk<'_>>(text) else {
            self.mark_unsafe(Unsafe::Unreadable);
            return Verdict::Forward;
        };
        if chunk.error.is_some() {
            self.mark_unsafe(Unsafe::EngineError);
            return Verdict::Forward;
        }
        if self.id.is_none() {
            self.id = chunk.id.as_deref().map(str::to_owned);
            self.object = chunk.object.as_deref().map(str::to_owned);
            self.model = chunk.model.as_deref().map(str::to_owned);
            self.created = chunk.created;
        }
        self.usage_seen |= chunk.usage.is_some();
        if let Some(usage) = chunk.usage.and_then(|u| serde_json::from_str::<Usage>(u.get()).ok()) {
            self.usage = Some(usage);
        }
        if self.hidden(&chunk) {
            return Verdict::Drop;
        }
        // The ids the client did not ask for become `null`, as vLLM writes them unasked.
        let mut strip: Vec<&RawValue> = Vec::new();
        if let Some(p) = chunk.prompt_token_ids {
            self.record_prompt(p);
            strip.push(p);
        }
        let mut empty_delta = false;
        for choice in &chunk.choices {
            if choice.index != 0 {
                // Not followed (not resumable), but its ids are not the client's either.
                self.mark_unsafe(Unsafe::Choices);
                strip.extend(choice.prompt_token_ids.into_iter().chain(choice.token_ids));
                continue;
            }
            if let Some(p) = choice.prompt_token_ids {
                self.record_prompt(p);
                strip.push(p);
            }
            if let Some(t) = choice.token_ids {
                strip.push(t);
            }
            self.record_choice(choice);
            empty_delta = self.api == Api::Chat
                && choice.delta.as_ref().is_none_or(Delta::is_empty)
                && choice.finish_reason.is_none()
                && choice.logprobs.is_none_or(|l| l.get() == "null");
        }
        if self.keep_ids || strip.is_empty() {
            return Verdict::Forward;
        }
        // vLLM sends a chunk for every token when asked for ids, even one with nothing
        // else in it: without the ids, the client would see empty deltas it did not get before.
        if empty_delta && chunk.choices.len() == 1 && chunk.usage.is_none() {
            return Verdict::Drop;
        }
        match null_values(text, &strip) {
            Some(rewritten) => Verdict::Rewrite(data_event(rewritten.as_bytes())),
            // Not laid out as expected: rewrite through a value (rare).
            None => self.rewrite_value(text, true, false),
        }
    }

    fn record_prompt(&mut self, raw: &RawValue) {
        if let Some(p) = ids(Some(raw)) {
            self.prompt_tokens = Some(p.len() as u64);
            if self.api == Api::Completions {
                self.prompt_ids = Some(p);
            }
        }
    }

    fn record_choice(&mut self, choice: &Choice<'_>) {
        if choice.logprobs.is_some_and(|l| l.get() != "null") {
            self.mark_unsafe(Unsafe::Logprobs);
        }
        let piece = match (self.api, &choice.delta) {
            (Api::Completions, _) => choice.text.as_deref().unwrap_or(""),
            (Api::Chat, Some(delta)) => {
                self.role_sent |= delta.role.is_some();
                if delta.tool_calls.as_ref().is_some_and(|t| !t.is_empty())
                    || delta.reasoning.as_deref().is_some_and(|r| !r.is_empty())
                    || delta.reasoning_content.as_deref().is_some_and(|r| !r.is_empty())
                {
                    self.mark_unsafe(Unsafe::ToolsOrReasoning);
                }
                delta.content.as_deref().unwrap_or("")
            }
            (Api::Chat, None) => "",
        };
        self.text.push_str(piece);
        match ids(choice.token_ids) {
            Some(ids) => {
                self.tokens += ids.len() as u64;
                self.output_ids.extend_from_slice(&ids);
                if piece.is_empty() {
                    self.held += ids.len() as u64;
                } else {
                    self.held = 0;
                }
            }
            None if !piece.is_empty() => {
                // No ids: one token per event is the best guess (vLLM's default interval).
                self.tokens += 1;
                self.ids_complete = false;
            }
            None => {}
        }
        if choice.finish_reason.is_some() {
            self.finished = true;
        }
        if self.kept_bytes() > self.max_bytes {
            self.mark_unsafe(Unsafe::TooLong);
            self.text = String::new();
            self.output_ids = Vec::new();
            self.prompt_ids = None;
        }
    }

    /// An event of a continuation: same `id` and `created` as the first part, no second
    /// role, no prompt ids, usage counted over the whole stream.
    fn observe_continued(&mut self, data: &[u8]) -> Verdict {
        let Ok(text) = std::str::from_utf8(data) else {
            self.mark_unsafe(Unsafe::Unreadable);
            return Verdict::Forward;
        };
        // Record first (borrowed), then rewrite; a role goes out once.
        let role_sent = self.role_sent;
        match serde_json::from_str::<Chunk<'_>>(text) {
            Ok(chunk) => {
                if chunk.error.is_some() {
                    self.mark_unsafe(Unsafe::EngineError);
                    return Verdict::Forward;
                }
                self.usage_seen |= chunk.usage.is_some();
                if let Some(usage) = chunk.usage.and_then(|u| serde_json::from_str::<Usage>(u.get()).ok()) {
                    self.usage = Some(self.whole_usage(usage));
                }
                if self.hidden(&chunk) {
                    return Verdict::Drop;
                }
                for choice in &chunk.choices {
                    if choice.index != 0 {
                        self.mark_unsafe(Unsafe::Choices);
                    } else {
                        self.record_choice(choice);
                    }
                }
            }
            Err(_) => {
                self.mark_unsafe(Unsafe::Unreadable);
                return Verdict::Forward;
            }
        }
        self.rewrite_value(text, false, role_sent)
    }

    /// Rewrites a chunk through a JSON value: ids the client did not ask for removed; for a
    /// continuation also the first part's identity, no role, prompt ids removed, usage summed.
    fn rewrite_value(&self, text: &str, first: bool, drop_role: bool) -> Verdict {
        let Ok(Value::Object(mut chunk)) = serde_json::from_str::<Value>(text) else {
            return Verdict::Forward;
        };
        if !first {
            if let Some(id) = &self.id {
                chunk.insert("id".into(), Value::String(id.clone()));
            }
            if let Some(created) = self.created {
                chunk.insert("created".into(), created.into());
            }
        }
        let unask = |map: &mut Map<String, Value>, key: &str| {
            if let Some(v) = map.get_mut(key) {
                *v = Value::Null;
            }
        };
        if !self.keep_ids || !first {
            unask(&mut chunk, "prompt_token_ids");
        }
        let mut empty = false;
        if let Some(Value::Array(choices)) = chunk.get_mut("choices") {
            for choice in choices.iter_mut().filter_map(Value::as_object_mut) {
                if !self.keep_ids || !first {
                    unask(choice, "prompt_token_ids");
                }
                if !self.keep_ids {
                    unask(choice, "token_ids");
                }
                if drop_role && let Some(Value::Object(delta)) = choice.get_mut("delta") {
                    delta.remove("role");
                    if delta.get("content").is_some_and(|c| c.as_str() == Some("")) {
                        delta.remove("content");
                    }
                }
                empty = self.api == Api::Chat
                    && choice.get("delta").and_then(Value::as_object).is_none_or(Map::is_empty)
                    && choice.get("finish_reason").is_none_or(Value::is_null)
                    && choice.get("logprobs").is_none_or(Value::is_null)
                    && choice.get("token_ids").is_none_or(Value::is_null);
            }
            if empty && choices.len() == 1 && chunk.get("usage").is_none_or(Value::is_null) {
                return Verdict::Drop;
            }
        }
        if !first && let Some(Value::Object(usage)) = chunk.get_mut("usage") {
            self.sum_usage(usage);
        }
        match serde_json::to_vec(&Value::Object(chunk)) {
            Ok(v) => Verdict::Rewrite(data_event(&v)),
            Err(_) => Verdict::Forward,
        }
    }

    /// A continuation's usage over the whole stream: the original prompt, every token sent.
    fn whole_usage(&self, part: Usage) -> Usage {
        Usage {
            prompt_tokens: self
                .prompt_tokens
                .unwrap_or_else(|| part.prompt_tokens.saturating_sub(self.tokens_before_part)),
            completion_tokens: part.completion_tokens + self.tokens_before_part,
        }
    }

    /// A continuation's usage chunk rewritten over the whole stream.
    fn sum_usage(&self, usage: &mut Map<String, Value>) {
        let part = Usage {
            prompt_tokens: usage.get("prompt_tokens").and_then(Value::as_u64).unwrap_or(0),
            completion_tokens: usage.get("completion_tokens").and_then(Value::as_u64).unwrap_or(0),
        };
        let Usage {
            prompt_tokens: prompt,
            completion_tokens: completion,
        } = self.whole_usage(part);
        usage.insert("prompt_tokens".into(), prompt.into());
        usage.insert("completion_tokens".into(), completion.into());
        usage.insert("total_tokens".into(), (prompt + completion).into());
    }

    /// Whether the stream can go on elsewhere at all (the request is checked by
    /// [`continuation`](Self::continuation)).
    pub fn resumable(&self) -> Result<(), Unsafe> {
        match self.unsafe_ {
            Some(why) => Err(why),
            None => Ok(()),
        }
    }

    /// The request that continues this stream on another engine, built from the client's
    /// `body`: the prompt extended by what was sent (token ids where every event had them and
    /// no stop string could hold text back; otherwise the text, which for chat is the final
    /// assistant message continued), `max_tokens` less what was sent, everything else as the
    /// client asked (sampling parameters and seed included), and token ids asked for.
    pub fn continuation(&self, body: &[u8]) -> Result<Vec<u8>, Unsafe> {
        self.resumable()?;
        let Ok(Value::Object(mut req)) = serde_json::from_slice::<Value>(body) else {
            return Err(Unsafe::Request);
        };
        check_request(self.api, &req)?;
        // Tokens whose text the client has seen: the held ones are made again.
        let held = self.held.min(self.output_ids.len() as u64);
        let sent = self.tokens - held;
        let output = &self.output_ids[..self.output_ids.len() - held as usize];
        for key in ["max_tokens", "max_completion_tokens"] {
            if let Some(max) = req.get(key).and_then(Value::as_u64) {
                if max <= sent {
                    return Err(Unsafe::Request);
                }
                req.insert(key.into(), (max - sent).into());
            }
        }
        if let Some(min) = req.get("min_tokens").and_then(Value::as_u64) {
            req.insert("min_tokens".into(), min.saturating_sub(sent).into());
        }
        match self.api {
            Api::Completions => {
                let stops = req.get("stop").is_some_and(|s| {
                    !s.is_null() && s.as_str() != Some("") && s.as_array().is_none_or(|a| !a.is_empty())
                });
                match (&self.prompt_ids, req.get("prompt")) {
                    (Some(prompt), _) if self.ids_complete && !stops => {
                        let all: Vec<Value> = prompt.iter().chain(output).map(|&t| t.into()).collect();
                        req.insert("prompt".into(), Value::Array(all));
                    }
                    (_, Some(Value::String(p))) => {
                        let extended = format!("{p}{}", self.text);
                        req.insert("prompt".into(), Value::String(extended));
                    }
                    _ => return Err(Unsafe::Request),
                }
            }
            Api::Chat => {
                let continuing = req.get("continue_final_message").and_then(Value::as_bool) == Some(true);
                let Some(Value::Array(messages)) = req.get_mut("messages") else {
                    return Err(Unsafe::Request);
                };
                if continuing {
                    let last = messages.last_mut().and_then(Value::as_object_mut);
                    let Some(Value::String(content)) = last.and_then(|m| m.get_mut("content")) else {
                        return Err(Unsafe::Request);
                    };
                    content.push_str(&self.text);
                } else if !self.text.is_empty() {
                    let mut partial = Map::new();
                    partial.insert("role".into(), "assistant".into());
                    partial.insert("content".into(), Value::String(self.text.clone()));
                    messages.push(Value::Object(partial));
                    req.insert("add_generation_prompt".into(), false.into());
                    req.insert("continue_final_message".into(), true.into());
                }
            }
        }
        req.insert("return_token_ids".into(), true.into());
        serde_json::to_vec(&Value::Object(req)).map_err(|_| Unsafe::Request)
    }

    /// A continuation is under way: what follows is its stream.
    pub fn start_part(&mut self) {
        let held = self.held.min(self.output_ids.len() as u64);
        self.tokens -= held;
        self.output_ids.truncate(self.output_ids.len() - held as usize);
        self.held = 0;
        self.part += 1;
        self.tokens_before_part = self.tokens;
    }

    /// Events that end a stream whose generation had finished when the engine went: the
    /// usage (when the client asked for it and it had not come) and the end marker.
    pub fn closing_events(&self, include_usage: bool) -> Vec<u8> {
        let mut out = Vec::new();
        if include_usage
            && !self.usage_seen
            && let Some(prompt) = self.prompt_tokens
        {
            let chunk = serde_json::json!({
                "id": self.id, "object": self.object, "created": self.created, "model": self.model,
                "choices": [],
                "usage": {"prompt_tokens": prompt, "completion_tokens": self.tokens,
                          "total_tokens": prompt + self.tokens},
            });
            if let Ok(v) = serde_json::to_vec(&chunk) {
                out.extend_from_slice(&data_event(&v));
            }
        }
        if !self.done {
            out.extend_from_slice(DONE_EVENT);
        }
        out
    }
}

/// Requests whose stream cannot be continued by extending the prompt.
fn check_request(api: Api, req: &Map<String, Value>) -> Result<(), Unsafe> {
    let int = |k: &str| req.get(k).and_then(Value::as_u64);
    let truthy = |k: &str| req.get(k).is_some_and(|v| !v.is_null() && v != &Value::Bool(false));
    if int("n").is_some_and(|n| n > 1) || int("best_of").is_some_and(|n| n > 1) {
        return Err(Unsafe::Choices);
    }
    if truthy("echo") || truthy("suffix") {
        return Err(Unsafe::Echo);
    }
    let logprobs = match api {
        Api::Completions => truthy("logprobs"),
        Api::Chat => truthy("logprobs") || int("top_logprobs").is_some_and(|n| n > 0),
    };
    if logprobs || truthy("prompt_logprobs") {
        return Err(Unsafe::Logprobs);
    }
    let structured = req
        .get("response_format")
        .and_then(|f| f.get("type"))
        .and_then(Value::as_str)
        .is_some_and(|t| t != "text")
        || [
            "structured_outputs",
            "guided_json",
            "guided_regex",
            "guided_choice",
            "guided_grammar",
        ]
        .iter()
        .any(|k| truthy(k));
    if structured {
        return Err(Unsafe::Structured);
    }
    if api == Api::Completions
        && let Some(Value::Array(items)) = req.get("prompt")
        && items.first().is_some_and(|i| !i.is_number())
    {
        // A batch of prompts: one choice each.
        return Err(Unsafe::Choices);
    }
    Ok(())
}

/// `text` with each of `values` (slices of `text`) replaced by `null`: what vLLM sends in
/// those fields when the ids are not asked for. `None` when a value is not inside `text`.
fn null_values(text: &str, values: &[&RawValue]) -> Option<String> {
    let base = text.as_ptr() as usize;
    let mut spans: Vec<(usize, usize)> = Vec::with_capacity(values.len());
    for v in values {
        let start = (v.get().as_ptr() as usize).checked_sub(base)?;
        let end = start + v.get().len();
        if end > text.len() {
            return None;
        }
        spans.push((start, end));
    }
    spans.sort_unstable();
    let mut out = String::with_capacity(text.len());
    let mut at = 0;
    for (start, end) in spans {
        if start < at {
            return None;
        }
        out.push_str(&text[at..start]);
        out.push_str("null");
        at = end;
    }
    out.push_str(&text[at..]);
    Some(out)
}

/// The last bytes of a JSON response body, where OpenAI-style servers put `usage`: enough
/// to read it when the body ends, without keeping the body.
/// Its first bytes too when asked (`keeping_head`), where a Responses body names its `id`.
#[derive(Debug, Default)]
pub struct BodyTail {
    buf: Vec<u8>,
    head: Option<Vec<u8>>,
}

impl BodyTail {
    /// Bytes kept: vLLM's usage object and what follows it fit many times over.
    const KEEP: usize = 2048;
    /// Leading bytes kept by `keeping_head`: the `id` member vLLM writes first, whole.
    const HEAD: usize = 512;

    /// A tail that keeps the body's first bytes as well.
    pub fn keeping_head() -> Self {
        Self {
            buf: Vec::new(),
            head: Some(Vec::new()),
        }
    }

    /// The body's first bytes (empty unless `keeping_head`).
    pub fn head(&self) -> &[u8] {
        self.head.as_deref().unwrap_or_default()
    }

    pub fn push(&mut self, bytes: &[u8]) {
        if let Some(head) = self.head.as_mut()
            && head.len() < Self::HEAD
        {
            let take = bytes.len().min(Self::HEAD - head.len());
            head.extend_from_slice(&bytes[..take]);
        }
        if bytes.len() >= Self::KEEP {
            self.buf.clear();
            self.buf.extend_from_slice(&bytes[bytes.len() - Self::KEEP..]);
            return;
        }
        let over = (self.buf.len() + bytes.len()).saturating_sub(Self::KEEP);
        self.buf.drain(..over);
        self.buf.extend_from_slice(bytes);
    }

    /// The body's last `"usage": {...}` object, when one is there whole.
    pub fn usage(&self) -> Option<Usage> {
        let at = memchr::memmem::rfind(&self.buf, b"\"usage\"")?;
        let rest = &self.buf[at + 7..];
        let colon = rest.iter().position(|b| !b.is_ascii_whitespace())?;
        if rest[colon] != b':' {
            return None;
        }
        let mut values = serde_json::Deserializer::from_slice(&rest[colon + 1..]).into_iter::<Usage>();
        values.next()?.ok()
    }
}

/// `body` (a JSON object) with `"return_token_ids": true` as its last member, so it wins over
/// any the client sent (vLLM reads JSON objects last-wins). `None` when `body` does not end
/// with `}`.
pub fn ask_token_ids(body: &[u8]) -> Option<Vec<u8>> {
    append_member(body, "return_token_ids", b"true")
}

/// `body` (a JSON object) with `"name": value` (`value` is JSON) as its last member, so it
/// wins over any member of that name the client sent (vLLM reads JSON objects last-wins).
/// `None` when `body` does not end with `}`.
pub fn append_member(body: &[u8], name: &str, value: &[u8]) -> Option<Vec<u8>> {
    let end = body.iter().rposition(|b| !b.is_ascii_whitespace())?;
    if body[end] != b'}' {
        return None;
    }
    let before = body[..end].iter().rposition(|b| !b.is_ascii_whitespace())?;
    let mut out = Vec::with_capacity(body.len() + name.len() + value.len() + 4);
    out.extend_from_slice(&body[..end]);
    if body[before] != b'{' {
        out.push(b',');
    }
    out.push(b'"');
    out.extend_from_slice(name.as_bytes());
    out.extend_from_slice(b"\":");
    out.extend_from_slice(value);
    out.push(b'}');
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn events(splitter: &mut EventSplitter) -> Vec<Bytes> {
        std::iter::from_fn(|| splitter.next_event()).collect()
    }

    #[test]
    fn usage_is_read_from_the_end_of_a_body_however_it_came() {
        let body = format!(
            r#"{{"id":"cmpl-1","choices":[{{"text":"{}"}}],"usage":{{"prompt_tokens":12,"total_tokens":19,"completion_tokens":7,"prompt_tokens_details":null}},"kv_transfer_params":null}}"#,
            "x".repeat(5000)
        );
        for piece in [1, 7, 100, 3000, 10_000] {
            let mut tail = BodyTail::default();
            for part in body.as_bytes().chunks(piece) {
                tail.push(part);
            }
            assert_eq!(
                tail.usage(),
                Some(Usage {
                    prompt_tokens: 12,
                    completion_tokens: 7
                }),
                "pieces of {piece}"
            );
        }
        let mut tail = BodyTail::default();
        tail.push(br#"{"usage": null}"#);
        assert_eq!(tail.usage(), None);
    }

    #[test]
    fn anthropic_and_responses_usage_read_as_prompt_and_completion_tokens() {
        let cases = [
            // Messages: the cache's tokens are counted apart from `input_tokens`.
            (
                r#"{"type":"message","content":[{"type":"text","text":"usage"}],"stop_reason":"max_tokens","usage":{"input_tokens":3,"output_tokens":5,"cache_read_input_tokens":16}}"#,
                (19, 5),
            ),
            (
                r#"{"type":"message","usage":{"input_tokens":3,"output_tokens":5}}"#,
                (3, 5),
            ),
            // Responses: `input_tokens` includes the cached ones.
            (
                r#"{"object":"response","usage":{"input_tokens":9,"output_tokens":2,"total_tokens":11,"input_tokens_details":{"cached_tokens":8}}}"#,
                (9, 2),
            ),
        ];
        for (body, (prompt_tokens, completion_tokens)) in cases {
            let mut tail = BodyTail::default();
            tail.push(body.as_bytes());
            assert_eq!(
                tail.usage(),
                Some(Usage {
                    prompt_tokens,
                    completion_tokens
                }),
                "{body}"
            );
        }
    }

    #[test]
    fn splits_events_wherever_the_bytes_are_cut() {
        let body = b"data: {\"a\":1}\n\ndata: x\r\n\r\n: comment\n\ndata: [DONE]\n\n";
        for cut in 0..body.len() {
            let mut s = EventSplitter::new(1 << 20);
            s.push(&body[..cut]).unwrap();
            let mut got = events(&mut s);
            s.push(&body[cut..]).unwrap();
            got.extend(events(&mut s));
            let joined: Vec<u8> = got.iter().flat_map(|e| e.to_vec()).collect();
            assert_eq!(joined, body, "cut at {cut}");
            assert_eq!(got.len(), 4, "cut at {cut}");
            assert_eq!(s.pending(), 0);
        }
    }

    #[test]
    fn a_blank_line_between_events_is_one_event_however_it_arrives() {
        // Found by the stream fuzz target: a CR alone at the end of a read, then its LF.
        let body = b"data: a\r\n\r\n\r\ndata: b\r\n\r\n";
        for cut in 0..body.len() {
            let mut s = EventSplitter::new(1 << 20);
            s.push(&body[..cut]).unwrap();
            let mut got = events(&mut s);
            s.push(&body[cut..]).unwrap();
            got.extend(events(&mut s));
            let got: Vec<&[u8]> = got.iter().map(|e| &e[..]).collect();
            assert_eq!(
                got,
                [&b"data: a\r\n\r\n"[..], b"\r\n", b"data: b\r\n\r\n"],
                "cut at {cut}"
            );
        }
    }

    #[test]
    fn an_event_past_the_bound_is_an_error() {
        let mut s = EventSplitter::new(16);
        assert!(s.push(b"data: 0123456789").is_ok());
        assert_eq!(s.push(b"abcdef"), Err(EventTooLarge(16)));
        let mut s = EventSplitter::new(16);
        assert!(
            s.push(b"data: 0123456789abc\n\n").is_ok(),
            "a whole event may be larger"
        );
    }

    #[test]
    fn data_of_an_event() {
        // Found by the stream fuzz target: JSON over two data lines, written back as two.
        let payload = b"{\"a\":\n1}";
        assert_eq!(data_event(payload), b"data: {\"a\":\ndata: 1}\n\n");
        assert_eq!(event_data(&data_event(payload)).as_deref(), Some(&payload[..]));
        assert_eq!(event_data(b"data: x\n\n").as_deref(), Some(&b"x"[..]));
        assert_eq!(event_data(b"data:x\r\ndata: y\r\n\r\n").as_deref(), Some(&b"x\ny"[..]));
        assert_eq!(event_data(b": ping\n\n"), None);
    }

    const CHAT_ROLE: &str = r#"{"id":"chatcmpl-1","object":"chat.completion.chunk","created":7,"model":"m","choices":[{"index":0,"delta":{"role":"assistant","content":""},"logprobs":null,"finish_reason":null}],"prompt_token_ids":[1,2,3]}"#;

    fn chat_piece(text: &str, id: u32) -> String {
        format!(
            r#"{{"id":"chatcmpl-1","object":"chat.completion.chunk","created":7,"model":"m","choices":[{{"index":0,"delta":{{"content":"{text}"}},"logprobs":null,"finish_reason":null,"token_ids":[{id}]}}]}}"#
        )
    }

    fn ev(s: &str) -> Vec<u8> {
        data_event(s.as_bytes())
    }

    #[test]
    fn ids_the_client_did_not_ask_for_become_null() {
        let mut l = Ledger::new(Api::Chat, false, 1 << 20);
        let Verdict::Rewrite(role) = l.observe(&ev(CHAT_ROLE)) else {
            panic!("the role chunk loses its prompt ids")
        };
        assert_eq!(
            role,
            ev(
                r#"{"id":"chatcmpl-1","object":"chat.completion.chunk","created":7,"model":"m","choices":[{"index":0,"delta":{"role":"assistant","content":""},"logprobs":null,"finish_reason":null}],"prompt_token_ids":null}"#
            )
        );
        let Verdict::Rewrite(piece) = l.observe(&ev(&chat_piece(" hi", 9))) else {
            panic!()
        };
        assert_eq!(
            String::from_utf8(piece).unwrap(),
            String::from_utf8(ev(r#"{"id":"chatcmpl-1","object":"chat.completion.chunk","created":7,"model":"m","choices":[{"index":0,"delta":{"content":" hi"},"logprobs":null,"finish_reason":null,"token_ids":null}]}"#)).unwrap()
        );
        // An ids-only chunk (no text) is not shown at all.
        let empty = r#"{"id":"chatcmpl-1","object":"chat.completion.chunk","created":7,"model":"m","choices":[{"index":0,"delta":{},"logprobs":null,"finish_reason":null,"token_ids":[4]}]}"#;
        assert_eq!(l.observe(&ev(empty)), Verdict::Drop);
        assert_eq!(l.tokens(), 2);
        assert_eq!(l.prompt_tokens, Some(3));

        let mut keep = Ledger::new(Api::Chat, true, 1 << 20);
        assert_eq!(keep.observe(&ev(CHAT_ROLE)), Verdict::Forward);
    }

    #[test]
    fn completions_continue_on_token_ids() {
        let mut l = Ledger::new(Api::Completions, false, 1 << 20);
        let first = r#"{"id":"cmpl-1","object":"text_completion","created":5,"model":"m","choices":[{"index":0,"text":" a","logprobs":null,"finish_reason":null,"stop_reason":null,"prompt_token_ids":[10,11],"token_ids":[20]}]}"#;
        let Verdict::Rewrite(out) = l.observe(&ev(first)) else {
            panic!()
        };
        let out = String::from_utf8(out).unwrap();
        assert!(out.contains(r#""prompt_token_ids":null,"token_ids":null"#), "{out}");
        let second = r#"{"id":"cmpl-1","object":"text_completion","created":5,"model":"m","choices":[{"index":0,"text":" b","logprobs":null,"finish_reason":null,"stop_reason":null,"token_ids":[21]}]}"#;
        l.observe(&ev(second));
        let body = br#"{"model":"m","prompt":"hello","max_tokens":10,"seed":3,"stream":true,"temperature":0.5}"#;
        let next: Value = serde_json::from_slice(&l.continuation(body).unwrap()).unwrap();
        assert_eq!(next["prompt"], serde_json::json!([10, 11, 20, 21]));
        assert_eq!(next["max_tokens"], 8);
        assert_eq!(next["seed"], 3);
        assert_eq!(next["temperature"], 0.5);
        assert_eq!(next["return_token_ids"], true);

        // A stop string may hold text back: the text is continued instead.
        let body = br#"{"model":"m","prompt":"hello","max_tokens":10,"stop":["\n"],"stream":true}"#;
        let next: Value = serde_json::from_slice(&l.continuation(body).unwrap()).unwrap();
        assert_eq!(next["prompt"], "hello a b");

        // The continuation's events carry the first part's identity and summed usage.
        l.start_part();
        let cont = r#"{"id":"cmpl-2","object":"text_completion","created":9,"model":"m","choices":[{"index":0,"text":" c","logprobs":null,"finish_reason":"length","stop_reason":null,"prompt_token_ids":[10,11,20,21],"token_ids":[22]}]}"#;
        let Verdict::Rewrite(out) = l.observe(&ev(cont)) else {
            panic!()
        };
        let v: Value = serde_json::from_slice(event_data(&out).unwrap().as_ref()).unwrap();
        assert_eq!(v["id"], "cmpl-1");
        assert_eq!(v["created"], 5);
        assert!(v["choices"][0]["token_ids"].is_null());
        assert!(v["choices"][0]["prompt_token_ids"].is_null());
        let usage = r#"{"id":"cmpl-2","object":"text_completion","created":9,"model":"m","choices":[],"usage":{"prompt_tokens":4,"completion_tokens":1,"total_tokens":5}}"#;
        let Verdict::Rewrite(out) = l.observe(&ev(usage)) else {
            panic!()
        };
        let v: Value = serde_json::from_slice(event_data(&out).unwrap().as_ref()).unwrap();
        assert_eq!(
            v["usage"],
            serde_json::json!({"prompt_tokens": 2, "completion_tokens": 3, "total_tokens": 5})
        );
        assert_eq!(l.tokens(), 3);
        assert!(l.finished());
    }

    #[test]
    fn tokens_whose_text_was_held_back_are_made_again() {
        // Found against real vLLM: a cut right after a token whose text vLLM held back (a
        // character not yet complete); continued on its id, vLLM repeated prompt and text.
        let mut l = Ledger::new(Api::Completions, false, 1 << 20);
        let piece = |text: &str, id: u32, prompt: &str| {
            format!(
                r#"{{"id":"cmpl-1","choices":[{{"index":0,"text":"{text}","finish_reason":null,"prompt_token_ids":{prompt},"token_ids":[{id}]}}]}}"#
            )
        };
        l.observe(&ev(&piece(" a", 20, "[10,11]")));
        l.observe(&ev(&piece("", 21, "null")));
        let body = br#"{"model":"m","prompt":"hello","max_tokens":10,"stream":true}"#;
        let next: Value = serde_json::from_slice(&l.continuation(body).unwrap()).unwrap();
        assert_eq!(next["prompt"], serde_json::json!([10, 11, 20]));
        assert_eq!(next["max_tokens"], 9);
        l.start_part();
        assert_eq!(l.tokens(), 1);
        // Text that came after held tokens covers them.
        let mut l = Ledger::new(Api::Completions, false, 1 << 20);
        l.observe(&ev(&piece(" a", 20, "[10,11]")));
        l.observe(&ev(&piece("", 21, "null")));
        l.observe(&ev(&piece("é", 22, "null")));
        let next: Value = serde_json::from_slice(&l.continuation(body).unwrap()).unwrap();
        assert_eq!(next["prompt"], serde_json::json!([10, 11, 20, 21, 22]));
        assert_eq!(next["max_tokens"], 7);
    }

    #[test]
    fn chat_continues_the_assistant_message_without_a_second_role() {
        let mut l = Ledger::new(Api::Chat, false, 1 << 20);
        l.observe(&ev(CHAT_ROLE));
        l.observe(&ev(&chat_piece("Hel", 1)));
        l.observe(&ev(&chat_piece("lo", 2)));
        let body =
            br#"{"model":"m","messages":[{"role":"user","content":"hi"}],"max_completion_tokens":5,"stream":true}"#;
        let next: Value = serde_json::from_slice(&l.continuation(body).unwrap()).unwrap();
        assert_eq!(
            next["messages"],
            serde_json::json!([{"role":"user","content":"hi"},{"role":"assistant","content":"Hello"}])
        );
        assert_eq!(next["continue_final_message"], true);
        assert_eq!(next["add_generation_prompt"], false);
        assert_eq!(next["max_completion_tokens"], 3);
        l.start_part();
        let role2 = CHAT_ROLE.replace("chatcmpl-1", "chatcmpl-2");
        assert_eq!(l.observe(&ev(&role2)), Verdict::Drop, "no second role chunk");
        let Verdict::Rewrite(out) = l.observe(&ev(&chat_piece("!", 3).replace("chatcmpl-1", "chatcmpl-2"))) else {
            panic!()
        };
        let v: Value = serde_json::from_slice(event_data(&out).unwrap().as_ref()).unwrap();
        assert_eq!(v["id"], "chatcmpl-1");
        assert_eq!(v["choices"][0]["delta"], serde_json::json!({"content": "!"}));
    }

    #[test]
    fn a_role_the_client_never_got_comes_from_the_continuation() {
        // Found by the failover test: the engine died after the head, before its role chunk.
        let mut l = Ledger::new(Api::Chat, false, 1 << 20);
        l.start_part();
        let Verdict::Rewrite(out) = l.observe(&ev(CHAT_ROLE)) else {
            panic!("the role chunk is kept")
        };
        let v: Value = serde_json::from_slice(event_data(&out).unwrap().as_ref()).unwrap();
        assert_eq!(v["choices"][0]["delta"]["role"], "assistant");
        assert_eq!(l.observe(&ev(CHAT_ROLE)), Verdict::Drop, "but only once");
    }

    #[test]
    fn what_cannot_be_continued_says_why() {
        let mut l = Ledger::new(Api::Chat, false, 1 << 20);
        l.observe(&ev(CHAT_ROLE));
        let body = br#"{"model":"m","messages":[],"n":2}"#;
        assert_eq!(l.continuation(body), Err(Unsafe::Choices));
        let body = br#"{"model":"m","messages":[],"logprobs":true}"#;
        assert_eq!(l.continuation(body), Err(Unsafe::Logprobs));
        let body = br#"{"model":"m","messages":[],"response_format":{"type":"json_object"}}"#;
        assert_eq!(l.continuation(body), Err(Unsafe::Structured));
        let tool = r#"{"id":"c","choices":[{"index":0,"delta":{"tool_calls":[{"index":0}]},"finish_reason":null}]}"#;
        l.observe(&ev(tool));
        assert_eq!(l.resumable(), Err(Unsafe::ToolsOrReasoning));

        let mut l = Ledger::new(Api::Completions, false, 8);
        l.observe(&ev(
            r#"{"choices":[{"index":0,"text":"0123456789","finish_reason":null}]}"#,
        ));
        assert_eq!(l.resumable(), Err(Unsafe::TooLong));
    }

    #[test]
    fn values_become_null_in_place() {
        let text = r#"{"a":1,"token_ids":[1, 2],"b":{"token_ids":[3]}}"#;
        let v: Chunkish = serde_json::from_str(text).unwrap();
        let out = null_values(text, &[v.b.token_ids, v.token_ids]).unwrap();
        assert_eq!(out, r#"{"a":1,"token_ids":null,"b":{"token_ids":null}}"#);
    }

    #[derive(Deserialize)]
    struct Chunkish<'a> {
        #[serde(borrow)]
        token_ids: &'a RawValue,
        #[serde(borrow)]
        b: Inner<'a>,
    }

    #[derive(Deserialize)]
    struct Inner<'a> {
        #[serde(borrow)]
        token_ids: &'a RawValue,
    }

    #[test]
    fn token_ids_are_asked_for_last() {
        assert_eq!(
            ask_token_ids(br#"{"model":"m","return_token_ids":false} "#).unwrap(),
            br#"{"model":"m","return_token_ids":false,"return_token_ids":true}"#
        );
        assert_eq!(ask_token_ids(b"{ }").unwrap(), br#"{ "return_token_ids":true}"#);
        assert_eq!(ask_token_ids(b"[]"), None);
    }
}
