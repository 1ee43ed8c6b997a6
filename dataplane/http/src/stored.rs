//! Stored Responses (`/v1/responses`): where a response names its id, and which routes
//! name one in their path. vLLM keeps each response in the engine that made it, so a router
//! learns the id from the answer: a JSON body's leading `id` member, or a stream's
//! `response.created` event (`response.id`). Pure byte reading, no IO; not the map from ids
//! to engines (the proxy keeps that).

use serde::Deserialize;

use crate::stream::event_data;

/// The longest response id taken from a client's path or an engine's answer.
pub const MAX_ID_BYTES: usize = 256;

/// A route that names a stored response in its path.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StoredRoute<'a> {
    /// `GET /v1/responses/{id}`
    Retrieve(&'a str),
    /// `POST /v1/responses/{id}/cancel`
    Cancel(&'a str),
}

impl<'a> StoredRoute<'a> {
    pub fn id(self) -> &'a str {
        match self {
            StoredRoute::Retrieve(id) | StoredRoute::Cancel(id) => id,
        }
    }
}

/// The stored-response route `path` (without its query) names, with the method it takes:
/// `Some((route, method_ok))`. `None` when `path` is not one.
pub fn stored_route<'a>(method: &str, path: &'a str) -> Option<(StoredRoute<'a>, bool)> {
    let rest = path.strip_prefix("/v1/responses/")?;
    let (route, method_ok) = match rest.strip_suffix("/cancel") {
        Some(id) => (StoredRoute::Cancel(id), method == "POST"),
        None => (StoredRoute::Retrieve(rest), method == "GET"),
    };
    let id = route.id();
    let plain = |b: u8| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'.' | b'~' | b':');
    (!id.is_empty() && id.len() <= MAX_ID_BYTES && id.bytes().all(plain)).then_some((route, method_ok))
}

/// The `id` of a Responses JSON body whose first bytes are `head`: its first member, as vLLM
/// writes it (`{"id":"resp_...",...`). `None` when the body does not start so.
pub fn body_response_id(head: &[u8]) -> Option<String> {
    let rest = skip_ws(head.strip_prefix(b"{").or_else(|| skip_ws(head).strip_prefix(b"{"))?);
    let rest = skip_ws(rest.strip_prefix(b"\"id\"")?);
    let rest = skip_ws(rest.strip_prefix(b":")?);
    let mut values = serde_json::Deserializer::from_slice(rest).into_iter::<String>();
    values
        .next()?
        .ok()
        .filter(|id| !id.is_empty() && id.len() <= MAX_ID_BYTES)
}

fn skip_ws(b: &[u8]) -> &[u8] {
    let n = b.iter().take_while(|c| c.is_ascii_whitespace()).count();
    &b[n..]
}

#[derive(Deserialize)]
struct Created {
    #[serde(rename = "type")]
    kind: String,
    response: Option<Named>,
}

#[derive(Deserialize)]
struct Named {
    id: String,
}

/// The response id a stream's `response.created` event (one SSE event, with its lines)
/// announces; `None` for any other event.
pub fn event_response_id(event: &[u8]) -> Option<String> {
    let data = event_data(event)?;
    // Cheap test first: most events of a stream are deltas.
    memchr::memmem::find(&data, b"response.created")?;
    let created: Created = serde_json::from_slice(&data).ok()?;
    (created.kind == "response.created")
        .then_some(created.response?.id)
        .filter(|id| !id.is_empty() && id.len() <= MAX_ID_BYTES)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn routes_name_their_response() {
        assert_eq!(
            stored_route("GET", "/v1/responses/resp_1"),
            Some((StoredRoute::Retrieve("resp_1"), true))
        );
        assert_eq!(
            stored_route("POST", "/v1/responses/resp_1/cancel"),
            Some((StoredRoute::Cancel("resp_1"), true))
        );
        assert_eq!(
            stored_route("POST", "/v1/responses/resp_1"),
            Some((StoredRoute::Retrieve("resp_1"), false))
        );
        assert_eq!(stored_route("GET", "/v1/responses"), None);
        assert_eq!(stored_route("GET", "/v1/responses/"), None);
        assert_eq!(stored_route("GET", "/v1/responses/a/b"), None);
        assert_eq!(stored_route("GET", "/v1/responses/a%2Fb"), None);
        assert_eq!(stored_route("GET", &format!("/v1/responses/{}", "x".repeat(300))), None);
    }

    #[test]
    fn a_body_names_its_id_first() {
        let body = br#"{"id":"resp_abc","created_at":1,"output":[{"id":"msg_1"}]}"#;
        for cut in 12..body.len() {
            let got = body_response_id(&body[..cut]);
            // Known as soon as the id's string is whole.
            assert_eq!(got.as_deref(), (cut >= 16).then_some("resp_abc"), "cut at {cut}");
        }
        assert_eq!(body_response_id(b" {\n \"id\" : \"r\\u0031\"}").as_deref(), Some("r1"));
        // Another member first: not taken (it could be a nested id).
        assert_eq!(body_response_id(br#"{"object":"response","id":"resp_abc"}"#), None);
        assert_eq!(body_response_id(br#"{"id":3}"#), None);
        assert_eq!(body_response_id(br#"{"error":{"message":"x"}}"#), None);
    }

    #[test]
    fn a_tail_keeping_its_head_reads_the_id_however_the_body_arrives() {
        let body = format!(
            r#"{{"id":"resp_x1","output":"{}","usage":{{"prompt_tokens":1,"completion_tokens":2}}}}"#,
            "y".repeat(5000)
        );
        for piece in [1, 5, 100, 6000] {
            let mut tail = crate::stream::BodyTail::keeping_head();
            for part in body.as_bytes().chunks(piece) {
                tail.push(part);
            }
            assert_eq!(tail.head().len(), 512, "pieces of {piece}");
            assert_eq!(
                body_response_id(tail.head()).as_deref(),
                Some("resp_x1"),
                "pieces of {piece}"
            );
            assert!(tail.usage().is_some(), "pieces of {piece}");
        }
        assert!(crate::stream::BodyTail::default().head().is_empty());
    }

    #[test]
    fn a_stream_names_its_id_in_response_created() {
        let created = b"event: response.created\ndata: {\"response\":{\"id\":\"resp_9\",\"status\":\"in_progress\"},\"sequence_number\":0,\"type\":\"response.created\"}\n\n";
        assert_eq!(event_response_id(created).as_deref(), Some("resp_9"));
        let progress = b"event: response.in_progress\ndata: {\"response\":{\"id\":\"resp_9\"},\"type\":\"response.in_progress\"}\n\n";
        assert_eq!(event_response_id(progress), None);
        let delta = b"event: response.output_text.delta\ndata: {\"delta\":\"response.created\",\"type\":\"response.output_text.delta\"}\n\n";
        assert_eq!(event_response_id(delta), None);
        assert_eq!(event_response_id(b"data: [DONE]\n\n"), None);
    }
}
