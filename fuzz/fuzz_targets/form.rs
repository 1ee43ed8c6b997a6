//! Fuzz target: the form peek of the audio routes (`lmstack_http::form::peek_form`).
//!
//! Input: the body, as is, under a fixed boundary. Properties:
//! - it never panics, and it never reads past the body (multer is given it whole);
//! - a `model` it finds is a field the body spells out: its bytes appear in the body;
//! - the same body under a content type without a boundary is always an error.
//!
//! Not covered here: the file parts (skipped unread) and what the router does with `model`.

#![no_main]

use bytes::Bytes;
use libfuzzer_sys::fuzz_target;
use lmstack_http::form;

const CONTENT_TYPE: &str = "multipart/form-data; boundary=fuzzBoundary";

fuzz_target!(|data: &[u8]| {
    let body = Bytes::copy_from_slice(data);
    if let Ok(peek) = form::peek_form(&body, CONTENT_TYPE)
        && let Some(model) = peek.model.as_deref()
    {
        assert!(
            data.windows(model.len().max(1)).any(|w| model.is_empty() || w == model.as_bytes()),
            "{model:?} is not in the body"
        );
    }
    assert!(form::peek_form(&body, "multipart/form-data").is_err());
});
