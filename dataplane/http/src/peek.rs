//! A peek into an OpenAI request body: the few fields a router needs, without building the
//! request. The body is validated as JSON in one pass (serde_json), the routing fields are
//! borrowed from it, and the prompt stays raw: nothing here copies or decodes it.
//!
//! It is not a request model: fields it does not route on are skipped unread.

use std::borrow::Cow;
use std::fmt;

use serde::de::{self, DeserializeSeed, Deserializer, IgnoredAny, MapAccess, Visitor};
use serde_json::value::RawValue;

/// What the router learns from a request body.
#[derive(Debug, Default)]
pub struct Peek<'a> {
    pub model: Option<Cow<'a, str>>,
    pub stream: bool,
    /// The value of the configured session field (e.g. OpenAI's `user`), when it is a string
    /// or a number.
    pub session: Option<Cow<'a, str>>,
    /// Completions: `prompt` (string, array of strings, or token arrays), raw.
    pub prompt: Option<&'a RawValue>,
    /// Chat: `messages`, raw.
    pub messages: Option<&'a RawValue>,
    /// vLLM's `return_token_ids`, when the client set it to a boolean.
    pub return_token_ids: Option<bool>,
    /// The most output tokens asked for: `max_tokens`, `max_completion_tokens` or
    /// `max_output_tokens` (Responses), when an integer.
    pub max_tokens: Option<u64>,
    /// `stream_options`, raw.
    pub stream_options: Option<&'a RawValue>,
    /// vLLM's `cache_salt` is present.
    pub cache_salt: bool,
    /// Responses: `previous_response_id`, the stored response a request follows up.
    pub previous_response_id: Option<Cow<'a, str>>,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum PeekError {
    #[error("request body is not valid JSON: {0}")]
    InvalidJson(String),
    #[error("request body must be a JSON object")]
    NotAnObject,
    #[error("`{field}` must be {expected}")]
    InvalidField {
        field: &'static str,
        expected: &'static str,
    },
    #[error("`{0}` appears more than once")]
    Duplicate(&'static str),
    #[error("request body is not a valid multipart form: {0}")]
    InvalidForm(String),
}

impl PeekError {
    /// The request field at fault, for the OpenAI error's `param`.
    pub fn param(&self) -> Option<&'static str> {
        match self {
            PeekError::InvalidField { field, .. } | PeekError::Duplicate(field) => Some(field),
            _ => None,
        }
    }
}

/// Peeks at `body`. `session_field` names the body field that carries a session key, if any.
pub fn peek<'a>(body: &'a [u8], session_field: Option<&str>) -> Result<Peek<'a>, PeekError> {
    let mut de = serde_json::Deserializer::from_slice(body);
    let seed = PeekSeed { session_field };
    let result = seed.deserialize(&mut de).and_then(|p| de.end().map(|()| p));
    match result {
        Ok(Ok(p)) => Ok(p),
        Ok(Err(e)) => Err(e),
        Err(e) => Err(PeekError::InvalidJson(e.to_string())),
    }
}

struct PeekSeed<'s> {
    session_field: Option<&'s str>,
}

impl<'de> DeserializeSeed<'de> for PeekSeed<'_> {
    /// The inner result carries field-level errors, so that they are told apart from syntax.
    type Value = Result<Peek<'de>, PeekError>;

    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
        d.deserialize_any(PeekVisitor {
            session_field: self.session_field,
        })
    }
}

struct PeekVisitor<'s> {
    session_field: Option<&'s str>,
}

macro_rules! not_an_object {
    ($($name:ident: $t:ty),*) => {
        $(fn $name<E: de::Error>(self, _: $t) -> Result<Self::Value, E> {
            Ok(Err(PeekError::NotAnObject))
        })*
    };
}

impl<'de> Visitor<'de> for PeekVisitor<'_> {
    type Value = Result<Peek<'de>, PeekError>;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a JSON object")
    }

    not_an_object!(visit_bool: bool, visit_i64: i64, visit_u64: u64, visit_f64: f64, visit_str: &str);

    fn visit_unit<E: de::Error>(self) -> Result<Self::Value, E> {
        Ok(Err(PeekError::NotAnObject))
    }

    fn visit_seq<A: de::SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
        while seq.next_element::<IgnoredAny>()?.is_some() {}
        Ok(Err(PeekError::NotAnObject))
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
        let mut peek = Peek::default();
        let mut error = None;
        let mut seen_stream = false;
        while let Some(Text(key)) = map.next_key::<Text<'de>>()? {
            let field_error = match key.as_ref() {
                "model" => {
                    let v = map.next_value::<Scalar<'de>>()?;
                    match (v, &peek.model) {
                        (_, Some(_)) => Some(PeekError::Duplicate("model")),
                        (Scalar::Text(t), None) => {
                            peek.model = Some(t);
                            None
                        }
                        _ => Some(PeekError::InvalidField {
                            field: "model",
                            expected: "a string",
                        }),
                    }
                }
                "stream" => {
                    let v = map.next_value::<Scalar<'de>>()?;
                    let dup = seen_stream;
                    seen_stream = true;
                    match v {
                        _ if dup => Some(PeekError::Duplicate("stream")),
                        Scalar::Bool(b) => {
                            peek.stream = b;
                            None
                        }
                        Scalar::Null => None,
                        _ => Some(PeekError::InvalidField {
                            field: "stream",
                            expected: "a boolean",
                        }),
                    }
                }
                "prompt" => {
                    peek.prompt = Some(map.next_value::<&'de RawValue>()?);
                    None
                }
                "messages" => {
                    peek.messages = Some(map.next_value::<&'de RawValue>()?);
                    None
                }
                "max_tokens" | "max_completion_tokens" | "max_output_tokens" => {
                    if let Scalar::Integer(n) = map.next_value::<Scalar<'de>>()? {
                        peek.max_tokens = n.parse().ok().max(peek.max_tokens);
                    }
                    None
                }
                "stream_options" => {
                    peek.stream_options = Some(map.next_value::<&'de RawValue>()?);
                    None
                }
                "cache_salt" => {
                    map.next_value::<IgnoredAny>()?;
                    peek.cache_salt = true;
                    None
                }
                "previous_response_id" => {
                    if let Scalar::Text(t) = map.next_value::<Scalar<'de>>()? {
                        peek.previous_response_id = Some(t);
                    }
                    None
                }
                "return_token_ids" => {
                    if let Scalar::Bool(b) = map.next_value::<Scalar<'de>>()? {
                        peek.return_token_ids = Some(b);
                    }
                    None
                }
                k if Some(k) == self.session_field => {
                    match map.next_value::<Scalar<'de>>()? {
                        Scalar::Text(t) => peek.session = Some(t),
                        Scalar::Integer(n) => peek.session = Some(Cow::Owned(n)),
                        _ => {}
                    }
                    None
                }
                _ => {
                    map.next_value::<IgnoredAny>()?;
                    None
                }
            };
            if error.is_none() {
                error = field_error;
            }
        }
        Ok(match error {
            Some(e) => Err(e),
            None => Ok(peek),
        })
    }
}

/// A string, borrowed from the input where it has no escapes.
struct Text<'a>(Cow<'a, str>);

impl<'de> de::Deserialize<'de> for Text<'de> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Text<'de>;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a string")
            }
            fn visit_borrowed_str<E: de::Error>(self, v: &'de str) -> Result<Self::Value, E> {
                Ok(Text(Cow::Borrowed(v)))
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Self::Value, E> {
                Ok(Text(Cow::Owned(v.to_owned())))
            }
        }
        d.deserialize_str(V)
    }
}

/// A field value the router cares about the type of; anything else is skipped unread.
enum Scalar<'a> {
    Text(Cow<'a, str>),
    /// An integer, as decimal text.
    Integer(String),
    Bool(bool),
    Null,
    Other,
}

impl<'de> de::Deserialize<'de> for Scalar<'de> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Scalar<'de>;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("any JSON value")
            }
            fn visit_borrowed_str<E: de::Error>(self, v: &'de str) -> Result<Self::Value, E> {
                Ok(Scalar::Text(Cow::Borrowed(v)))
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Self::Value, E> {
                Ok(Scalar::Text(Cow::Owned(v.to_owned())))
            }
            fn visit_bool<E: de::Error>(self, v: bool) -> Result<Self::Value, E> {
                Ok(Scalar::Bool(v))
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<Self::Value, E> {
                Ok(Scalar::Integer(v.to_string()))
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<Self::Value, E> {
                Ok(Scalar::Integer(v.to_string()))
            }
            fn visit_f64<E: de::Error>(self, _: f64) -> Result<Self::Value, E> {
                Ok(Scalar::Other)
            }
            fn visit_unit<E: de::Error>(self) -> Result<Self::Value, E> {
                Ok(Scalar::Null)
            }
            fn visit_seq<A: de::SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
                while seq.next_element::<IgnoredAny>()?.is_some() {}
                Ok(Scalar::Other)
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
                while map.next_entry::<IgnoredAny, IgnoredAny>()?.is_some() {}
                Ok(Scalar::Other)
            }
        }
        d.deserialize_any(V)
    }
}

/// Separates messages (and prompt list items) in the normalised prompt.
pub(crate) const RECORD: u8 = 0x1E;
/// Separates a message's role from its content.
pub(crate) const UNIT: u8 = 0x1F;

/// Feeds the request's prompt to `feed`, normalised so that equal conversation prefixes give
/// equal byte prefixes: completions give their `prompt` (a string's contents as sent, list
/// items one after another), chat gives each message's role and content in order. Text is
/// taken raw from the JSON (escapes as sent): one client resending its history sends the
/// same bytes. Returns false when the request has no prompt (or it is malformed).
pub fn prompt_pieces(peek: &Peek<'_>, mut feed: impl FnMut(&[u8])) -> bool {
    if let Some(messages) = peek.messages {
        let mut de = serde_json::Deserializer::from_str(messages.get());
        return MessagesSeed { feed: &mut feed }.deserialize(&mut de).is_ok();
    }
    if let Some(prompt) = peek.prompt {
        let raw = prompt.get().as_bytes();
        match raw.first() {
            Some(b'"') => feed(&raw[1..raw.len() - 1]),
            Some(b'[') => {
                let mut de = serde_json::Deserializer::from_str(prompt.get());
                return ItemsSeed { feed: &mut feed }.deserialize(&mut de).is_ok();
            }
            _ => return false,
        }
        return true;
    }
    false
}

/// A JSON string's contents as sent (without the quotes), or any other value's raw text.
fn raw_text(v: &RawValue) -> &[u8] {
    let raw = v.get().as_bytes();
    if raw.len() >= 2 && raw[0] == b'"' {
        &raw[1..raw.len() - 1]
    } else {
        raw
    }
}

struct ItemsSeed<'f, F> {
    feed: &'f mut F,
}

impl<'de, F: FnMut(&[u8])> DeserializeSeed<'de> for ItemsSeed<'_, F> {
    type Value = ();

    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
        d.deserialize_seq(self)
    }
}

impl<'de, F: FnMut(&[u8])> Visitor<'de> for ItemsSeed<'_, F> {
    type Value = ();

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a list")
    }

    fn visit_seq<A: de::SeqAccess<'de>>(self, mut seq: A) -> Result<(), A::Error> {
        while let Some(item) = seq.next_element::<&'de RawValue>()? {
            (self.feed)(raw_text(item));
            (self.feed)(&[RECORD]);
        }
        Ok(())
    }
}

struct MessagesSeed<'f, F> {
    feed: &'f mut F,
}

impl<'de, F: FnMut(&[u8])> DeserializeSeed<'de> for MessagesSeed<'_, F> {
    type Value = ();

    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
        d.deserialize_seq(self)
    }
}

impl<'de, F: FnMut(&[u8])> Visitor<'de> for MessagesSeed<'_, F> {
    type Value = ();

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a list of messages")
    }

    fn visit_seq<A: de::SeqAccess<'de>>(self, mut seq: A) -> Result<(), A::Error> {
        while let Some(Message { role, content }) = seq.next_element::<Message<'de>>()? {
            if let Some(r) = role {
                (self.feed)(raw_text(r));
            }
            (self.feed)(&[UNIT]);
            if let Some(c) = content {
                (self.feed)(raw_text(c));
            }
            (self.feed)(&[RECORD]);
        }
        Ok(())
    }
}

/// A chat message's role and content, raw; other fields are skipped.
struct Message<'a> {
    role: Option<&'a RawValue>,
    content: Option<&'a RawValue>,
}

impl<'de> de::Deserialize<'de> for Message<'de> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Message<'de>;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a message object")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
                let mut m = Message {
                    role: None,
                    content: None,
                };
                while let Some(Text(key)) = map.next_key::<Text<'de>>()? {
                    match key.as_ref() {
                        "role" => m.role = Some(map.next_value()?),
                        "content" => m.content = Some(map.next_value()?),
                        _ => {
                            map.next_value::<IgnoredAny>()?;
                        }
                    }
                }
                Ok(m)
            }
        }
        d.deserialize_map(V)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn what_budgets_read_is_peeked() {
        let body =
            br#"{"model":"m","max_completion_tokens":12,"stream_options":{"include_usage":false},"cache_salt":"x"}"#;
        let p = peek(body, None).unwrap();
        assert_eq!(p.max_tokens, Some(12));
        assert_eq!(p.stream_options.map(|o| o.get()), Some(r#"{"include_usage":false}"#));
        assert!(p.cache_salt);
        let p = peek(br#"{"model":"m","max_tokens":null}"#, None).unwrap();
        assert_eq!((p.max_tokens, p.cache_salt), (None, false));
        let p = peek(
            br#"{"model":"m","input":"hi","previous_response_id":"resp_1\u0032"}"#,
            None,
        )
        .unwrap();
        assert_eq!(p.previous_response_id.as_deref(), Some("resp_12"));
        let p = peek(br#"{"model":"m","previous_response_id":null}"#, None).unwrap();
        assert_eq!(p.previous_response_id, None);
    }

    #[test]
    fn finds_routing_fields_and_keeps_the_prompt_raw() {
        let body =
            br#"{"model":"llama","prompt":["a\n", "b"],"max_tokens":5,"stream":true,"user":"u1","x":{"y":[1,2]}}"#;
        let p = peek(body, Some("user")).unwrap();
        assert_eq!(p.model.as_deref(), Some("llama"));
        assert!(p.stream);
        assert_eq!(p.session.as_deref(), Some("u1"));
        assert_eq!(p.prompt.unwrap().get(), r#"["a\n", "b"]"#);
        assert!(matches!(p.model, Some(Cow::Borrowed(_))));
    }

    #[test]
    fn chat_messages_stay_raw() {
        let body = br#"{"messages":[{"role":"user","content":"hi"}],"model":"m"}"#;
        let p = peek(body, None).unwrap();
        assert_eq!(p.messages.unwrap().get(), r#"[{"role":"user","content":"hi"}]"#);
        assert!(!p.stream);
    }

    #[test]
    fn escaped_model_names_are_decoded() {
        let p = peek(br#"{"model":"a\/b\u0041"}"#, None).unwrap();
        assert_eq!(p.model.as_deref(), Some("a/bA"));
    }

    #[test]
    fn numeric_session_keys_count() {
        let p = peek(br#"{"model":"m","user":42}"#, Some("user")).unwrap();
        assert_eq!(p.session.as_deref(), Some("42"));
        let p = peek(br#"{"model":"m","user":{"id":1}}"#, Some("user")).unwrap();
        assert_eq!(p.session, None);
    }

    #[test]
    fn missing_model_is_not_an_error_here() {
        assert_eq!(peek(b"{}", None).unwrap().model, None);
    }

    #[test]
    fn rejects_what_is_not_a_request_object() {
        assert!(matches!(peek(b"{\"model\":", None), Err(PeekError::InvalidJson(_))));
        assert!(matches!(peek(b"", None), Err(PeekError::InvalidJson(_))));
        assert!(matches!(peek(b"{} x", None), Err(PeekError::InvalidJson(_))));
        assert!(matches!(peek(b"{\"a\":tru}", None), Err(PeekError::InvalidJson(_))));
        assert_eq!(peek(b"[1,2]", None).unwrap_err(), PeekError::NotAnObject);
        assert_eq!(peek(b"\"s\"", None).unwrap_err(), PeekError::NotAnObject);
        assert_eq!(
            peek(br#"{"model":5}"#, None).unwrap_err(),
            PeekError::InvalidField {
                field: "model",
                expected: "a string"
            }
        );
        assert_eq!(
            peek(br#"{"model":"a","stream":"yes"}"#, None).unwrap_err(),
            PeekError::InvalidField {
                field: "stream",
                expected: "a boolean"
            }
        );
        assert_eq!(
            peek(br#"{"model":"a","model":"b"}"#, None).unwrap_err(),
            PeekError::Duplicate("model")
        );
    }

    #[test]
    fn syntax_errors_after_a_field_error_are_still_syntax_errors() {
        assert!(matches!(peek(br#"{"model":5,"#, None), Err(PeekError::InvalidJson(_))));
    }

    fn normalised(body: &[u8]) -> Option<Vec<u8>> {
        let p = peek(body, None).unwrap();
        let mut out = Vec::new();
        prompt_pieces(&p, |b| out.extend_from_slice(b)).then_some(out)
    }

    #[test]
    fn chat_prompts_normalise_to_roles_and_contents_in_order() {
        let one = normalised(br#"{"model":"m","messages":[{"role":"system","content":"Be brief."},{"content":"hi \"you\"","role":"user","name":"x"}]}"#).unwrap();
        assert_eq!(one, b"system\x1fBe brief.\x1euser\x1fhi \\\"you\\\"\x1e".to_vec());
        // A longer conversation starts with the same bytes.
        let two = normalised(br#"{"messages":[{"role":"system","content":"Be brief."},{"role":"user","content":"hi \"you\""},{"role":"assistant","content":"hello"}],"model":"m"}"#).unwrap();
        assert!(two.starts_with(&one));
        // Content parts are taken raw.
        let parts = normalised(br#"{"model":"m","messages":[{"role":"user","content":[{"type":"text","text":"a"}]}]}"#)
            .unwrap();
        assert_eq!(parts, b"user\x1f[{\"type\":\"text\",\"text\":\"a\"}]\x1e".to_vec());
    }

    #[test]
    fn completion_prompts_normalise_to_their_text() {
        assert_eq!(
            normalised(br#"{"model":"m","prompt":"The capital"}"#).unwrap(),
            b"The capital"
        );
        assert_eq!(
            normalised(br#"{"model":"m","prompt":["a","b"]}"#).unwrap(),
            b"a\x1eb\x1e"
        );
        assert_eq!(
            normalised(br#"{"model":"m","prompt":[1,2,3]}"#).unwrap(),
            b"1\x1e2\x1e3\x1e"
        );
        assert_eq!(normalised(br#"{"model":"m","input":"x"}"#), None);
        assert_eq!(normalised(br#"{"model":"m","prompt":7}"#), None);
        assert_eq!(normalised(br#"{"model":"m","messages":"nope"}"#), None);
    }

    proptest! {
        /// Any JSON object with a string model is peeked to that model.
        #[test]
        fn any_object_with_a_model(model in "\\PC{0,20}", extra in prop::collection::btree_map("x_[a-z]{1,6}", any::<i32>(), 0..6)) {
            let mut obj = serde_json::Map::new();
            for (k, v) in extra {
                obj.insert(k, serde_json::json!(v));
            }
            obj.insert("model".into(), serde_json::json!(model.clone()));
            let body = serde_json::to_vec(&obj).unwrap();
            let p = peek(&body, None).unwrap();
            prop_assert_eq!(p.model.as_deref(), Some(model.as_str()));
        }

        #[test]
        fn arbitrary_bytes_never_panic(body in prop::collection::vec(any::<u8>(), 0..200)) {
            let _ = peek(&body, Some("user"));
        }
    }
}
