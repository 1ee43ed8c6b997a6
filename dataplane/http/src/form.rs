//! A peek into a `multipart/form-data` request body (vLLM's `/v1/audio/transcriptions` and
//! `/v1/audio/translations`): its `model` and `stream` fields, read with multer from the body
//! already in memory. Parts with a file name (the audio) are skipped unread.
//!
//! It is not a form model: other fields are passed over, and the body is forwarded as it came.

use std::borrow::Cow;

use bytes::Bytes;
use futures_util::FutureExt;

use crate::peek::{Peek, PeekError};

/// The largest text field read (`model`, `stream`); a larger one is an error.
const MAX_FIELD_BYTES: u64 = 4096;

/// Whether `content_type` is `multipart/form-data`.
pub fn is_form(content_type: &str) -> bool {
    content_type
        .split(';')
        .next()
        .is_some_and(|t| t.trim().eq_ignore_ascii_case("multipart/form-data"))
}

/// Peeks at a form body: `model` (a text field) and `stream` (`true` or `false`, as the
/// OpenAI SDK writes it). `content_type` must carry the boundary.
pub fn peek_form(body: &Bytes, content_type: &str) -> Result<Peek<'static>, PeekError> {
    let boundary = multer::parse_boundary(content_type).map_err(|e| PeekError::InvalidForm(e.to_string()))?;
    let one = futures_util::stream::once(std::future::ready(Ok::<_, std::convert::Infallible>(body.clone())));
    let mut form = multer::Multipart::new(one, boundary);
    let mut peek = Peek::default();
    // The body is one chunk in memory: every future here is ready at once.
    let now = |e: &str| PeekError::InvalidForm(format!("{e} (the body ended early)"));
    loop {
        let field = form
            .next_field()
            .now_or_never()
            .ok_or_else(|| now("a part"))?
            .map_err(|e| PeekError::InvalidForm(e.to_string()))?;
        let Some(field) = field else {
            break;
        };
        let name = match (field.name(), field.file_name()) {
            (Some("model"), None) => "model",
            (Some("stream"), None) => "stream",
            _ => continue,
        };
        let mut text = Vec::new();
        let mut field = field;
        while let Some(chunk) = field
            .chunk()
            .now_or_never()
            .ok_or_else(|| now("a field"))?
            .map_err(|e| PeekError::InvalidForm(e.to_string()))?
        {
            text.extend_from_slice(&chunk);
            if text.len() as u64 > MAX_FIELD_BYTES {
                return Err(PeekError::InvalidField {
                    field: name,
                    expected: "at most 4096 bytes",
                });
            }
        }
        let text = String::from_utf8(text).map_err(|_| PeekError::InvalidField {
            field: name,
            expected: "UTF-8 text",
        })?;
        match name {
            "model" if peek.model.is_some() => return Err(PeekError::Duplicate("model")),
            "model" => peek.model = Some(Cow::Owned(text)),
            _ => {
                peek.stream = match text.trim() {
                    "true" | "True" | "1" => true,
                    "false" | "False" | "0" | "" => false,
                    _ => {
                        return Err(PeekError::InvalidField {
                            field: "stream",
                            expected: "true or false",
                        });
                    }
                }
            }
        }
    }
    Ok(peek)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn form(parts: &[(&str, Option<&str>, &[u8])]) -> (Bytes, String) {
        let boundary = "----lmstack7MA4YWxkTrZu0gW";
        let mut body = Vec::new();
        for (name, file, value) in parts {
            body.extend_from_slice(format!("--{boundary}\r\n").as_bytes());
            match file {
                Some(f) => body.extend_from_slice(
                    format!("Content-Disposition: form-data; name=\"{name}\"; filename=\"{f}\"\r\nContent-Type: audio/wav\r\n\r\n")
                        .as_bytes(),
                ),
                None => body.extend_from_slice(format!("Content-Disposition: form-data; name=\"{name}\"\r\n\r\n").as_bytes()),
            }
            body.extend_from_slice(value);
            body.extend_from_slice(b"\r\n");
        }
        body.extend_from_slice(format!("--{boundary}--\r\n").as_bytes());
        (Bytes::from(body), format!("multipart/form-data; boundary={boundary}"))
    }

    #[test]
    fn finds_the_model_and_stream_past_the_file() {
        let audio: Vec<u8> = (0..50_000u32).map(|i| (i % 251) as u8).collect();
        let (body, ct) = form(&[
            ("file", Some("a.wav"), &audio),
            ("model", None, b"whisper-large"),
            ("stream", None, b"true"),
        ]);
        assert!(is_form(&ct));
        let p = peek_form(&body, &ct).unwrap();
        assert_eq!(p.model.as_deref(), Some("whisper-large"));
        assert!(p.stream);
    }

    #[test]
    fn a_file_named_model_is_not_the_model() {
        let (body, ct) = form(&[("model", Some("model.bin"), b"not a name"), ("language", None, b"en")]);
        let p = peek_form(&body, &ct).unwrap();
        assert_eq!(p.model, None);
        assert!(!p.stream);
    }

    #[test]
    fn bad_forms_are_errors() {
        let (body, ct) = form(&[("model", None, b"a"), ("model", None, b"b")]);
        assert_eq!(peek_form(&body, &ct).unwrap_err(), PeekError::Duplicate("model"));
        let (body, ct) = form(&[("stream", None, b"maybe")]);
        assert!(matches!(
            peek_form(&body, &ct),
            Err(PeekError::InvalidField { field: "stream", .. })
        ));
        let (body, _) = form(&[("model", None, b"a")]);
        assert!(matches!(
            peek_form(&body, "multipart/form-data"),
            Err(PeekError::InvalidForm(_))
        ));
        // Cut before its closing boundary.
        let (body, ct) = form(&[("model", None, b"a")]);
        assert!(matches!(
            peek_form(&body.slice(..body.len() - 10), &ct),
            Err(PeekError::InvalidForm(_))
        ));
        assert!(!is_form("application/json"));
        assert!(is_form("Multipart/Form-Data ; boundary=x"));
    }
}
