//! The data plane's one error type, and the one place where errors become responses.
//!
//! An error carries a kind from a closed set; the kind decides the HTTP status, the OpenAI
//! error `type` and `code`, the `error_kind` metric label, which side failed, and whether
//! the client connection must close. It also carries whether another attempt is safe
//! ([`Retry`]) and the IO error behind it, if any ([`std::error::Error::source`]). The
//! conversions from the codec's errors live here too. Not here: logging, metrics and the
//! response itself (`proxy::fail` answers and records, through `response::error`).

use std::borrow::Cow;
use std::fmt;

use lmstack_http::PeekError;
use lmstack_http::head::HeadError;

/// Which side of the proxy failed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Side {
    Downstream,
    Upstream,
    Internal,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ErrorKind {
    /// The request could not be parsed as HTTP/1.1.
    MalformedRequest,
    /// The request head was larger than allowed.
    HeaderTooLarge,
    /// The head or body did not arrive in time.
    RequestTimeout,
    /// The body was larger than allowed.
    BodyTooLarge,
    /// A transfer coding other than chunked.
    UnsupportedTransferEncoding,
    /// An `Expect` other than 100-continue.
    ExpectationFailed,
    /// The body is not valid JSON (or not an object).
    InvalidJson,
    /// A required field is missing or has the wrong type.
    InvalidRequest,
    /// No route for this path.
    NotFound,
    /// The path exists, the method does not.
    MethodNotAllowed,
    /// The model is not served here.
    UnknownModel,
    /// No endpoint holds the stored response a request names.
    UnknownResponse,
    /// API keys are required and none, or an unknown one, came.
    Unauthorized,
    /// The request's API key may not use its model.
    ModelNotAllowed,
    /// The key's or its tenant's budget is spent for now (or the request is larger than it).
    RateLimited,
    /// The model is served, but none of its endpoints is healthy.
    NoHealthyEndpoint,
    /// Every eligible endpoint is at its limit and the router's queue is full or timed out.
    Overloaded,
    /// The engine refused the connection or could not be reached.
    UpstreamConnect,
    /// Connecting to the engine took longer than allowed.
    UpstreamConnectTimeout,
    /// The engine closed or reset the connection before a complete response.
    UpstreamReset,
    /// The engine sent something that is not a valid HTTP/1.1 response.
    UpstreamProtocol,
    /// The engine did not answer, or went silent mid-stream, for longer than allowed.
    UpstreamTimeout,
    /// The engine answered that it cannot take the request now (502, 503, 504), and no
    /// other endpoint could either; or the continuation of a stream was refused.
    UpstreamUnavailable,
}

impl ErrorKind {
    pub fn status(self) -> u16 {
        match self {
            ErrorKind::MalformedRequest | ErrorKind::InvalidJson | ErrorKind::InvalidRequest => 400,
            ErrorKind::Unauthorized => 401,
            ErrorKind::ModelNotAllowed => 403,
            ErrorKind::NotFound | ErrorKind::UnknownModel | ErrorKind::UnknownResponse => 404,
            ErrorKind::MethodNotAllowed => 405,
            ErrorKind::RequestTimeout => 408,
            ErrorKind::BodyTooLarge => 413,
            ErrorKind::ExpectationFailed => 417,
            ErrorKind::RateLimited => 429,
            ErrorKind::HeaderTooLarge => 431,
            ErrorKind::UnsupportedTransferEncoding => 501,
            ErrorKind::UpstreamConnect | ErrorKind::UpstreamReset | ErrorKind::UpstreamProtocol => 502,
            ErrorKind::NoHealthyEndpoint | ErrorKind::Overloaded | ErrorKind::UpstreamUnavailable => 503,
            ErrorKind::UpstreamTimeout | ErrorKind::UpstreamConnectTimeout => 504,
        }
    }

    /// The `error_kind` metric label and the OpenAI error `code`.
    pub fn label(self) -> &'static str {
        match self {
            ErrorKind::MalformedRequest => "malformed_request",
            ErrorKind::HeaderTooLarge => "header_too_large",
            ErrorKind::RequestTimeout => "request_timeout",
            ErrorKind::BodyTooLarge => "body_too_large",
            ErrorKind::UnsupportedTransferEncoding => "unsupported_transfer_encoding",
            ErrorKind::ExpectationFailed => "expectation_failed",
            ErrorKind::InvalidJson => "invalid_json",
            ErrorKind::InvalidRequest => "invalid_request",
            ErrorKind::NotFound => "not_found",
            ErrorKind::MethodNotAllowed => "method_not_allowed",
            ErrorKind::UnknownModel => "model_not_found",
            ErrorKind::UnknownResponse => "response_not_found",
            ErrorKind::Unauthorized => "invalid_api_key",
            ErrorKind::ModelNotAllowed => "model_not_allowed",
            ErrorKind::RateLimited => "rate_limit_exceeded",
            ErrorKind::NoHealthyEndpoint => "no_healthy_endpoint",
            ErrorKind::Overloaded => "overloaded",
            ErrorKind::UpstreamConnect => "upstream_connect",
            ErrorKind::UpstreamConnectTimeout => "upstream_connect_timeout",
            ErrorKind::UpstreamReset => "upstream_reset",
            ErrorKind::UpstreamProtocol => "upstream_protocol",
            ErrorKind::UpstreamTimeout => "upstream_timeout",
            ErrorKind::UpstreamUnavailable => "upstream_unavailable",
        }
    }

    pub fn side(self) -> Side {
        match self {
            ErrorKind::UpstreamConnect
            | ErrorKind::UpstreamConnectTimeout
            | ErrorKind::UpstreamReset
            | ErrorKind::UpstreamProtocol
            | ErrorKind::UpstreamTimeout
            | ErrorKind::UpstreamUnavailable => Side::Upstream,
            ErrorKind::NoHealthyEndpoint | ErrorKind::Overloaded => Side::Internal,
            _ => Side::Downstream,
        }
    }

    /// After this error the client connection cannot be trusted to be in sync (the body may
    /// be unread, or the head was garbage): answer and close.
    pub fn closes_connection(self) -> bool {
        matches!(
            self,
            ErrorKind::MalformedRequest
                | ErrorKind::HeaderTooLarge
                | ErrorKind::RequestTimeout
                | ErrorKind::BodyTooLarge
                | ErrorKind::UnsupportedTransferEncoding
                | ErrorKind::ExpectationFailed
        )
    }

    /// Anthropic's error `type` (the Messages routes' errors).
    fn anthropic_type(self) -> &'static str {
        match self {
            ErrorKind::NoHealthyEndpoint | ErrorKind::Overloaded => "overloaded_error",
            _ => match self.status() {
                401 => "authentication_error",
                403 => "permission_error",
                404 => "not_found_error",
                413 => "request_too_large",
                429 => "rate_limit_error",
                504 => "timeout_error",
                400..=499 => "invalid_request_error",
                _ => "api_error",
            },
        }
    }

    fn openai_type(self) -> &'static str {
        match self.status() {
            401 => "authentication_error",
            403 => "permission_error",
            404 => "not_found_error",
            429 => "rate_limit_error",
            400..=499 => "invalid_request_error",
            _ => "server_error",
        }
    }
}

/// Which API's error shape a request gets: OpenAI's, or Anthropic's on the Messages routes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Dialect {
    OpenAi,
    Anthropic,
}

impl Dialect {
    pub fn of_path(path: &str) -> Self {
        if lmstack_http::anthropic::is_messages_route(path) {
            Dialect::Anthropic
        } else {
            Dialect::OpenAi
        }
    }
}

/// Whether a failed attempt may be made again (the idea of pingora's `RetryType`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Retry {
    /// The engine may have acted on the request, or the request itself is at fault.
    Never,
    /// Nothing reached the engine's application: another attempt is safe, and this endpoint
    /// is suspect, so the next one goes elsewhere.
    Elsewhere,
    /// Safe only because it failed on a reused pooled connection before any answer (the
    /// engine closed it while idle): the endpoint is not suspect; try again, on a fresh
    /// connection.
    ReusedOnly,
}

#[derive(Debug)]
pub struct ProxyError {
    pub kind: ErrorKind,
    pub message: Cow<'static, str>,
    /// The request parameter at fault, if one is.
    pub param: Option<&'static str>,
    pub retry: Retry,
    /// The IO error behind this one, if any.
    source: Option<std::io::Error>,
    /// Header lines (`name: value\r\n`) the error response carries (`Retry-After`, ...).
    pub headers: Option<String>,
}

impl ProxyError {
    pub fn new(kind: ErrorKind, message: impl Into<Cow<'static, str>>) -> Self {
        Self {
            kind,
            message: message.into(),
            param: None,
            retry: Retry::Never,
            source: None,
            headers: None,
        }
    }

    pub fn with_param(mut self, param: &'static str) -> Self {
        self.param = Some(param);
        self
    }

    /// Nothing reached the engine's application: another endpoint may take the request.
    pub fn retry_elsewhere(mut self) -> Self {
        self.retry = Retry::Elsewhere;
        self
    }

    /// The attempt ran on a reused pooled connection: a failure that was safe to retry
    /// says nothing against the endpoint ([`Retry::ReusedOnly`]).
    pub fn on_reused_connection(mut self) -> Self {
        if self.retry == Retry::Elsewhere {
            self.retry = Retry::ReusedOnly;
        }
        self
    }

    /// Header lines (`name: value\r\n` each) for the error response.
    pub fn with_headers(mut self, lines: String) -> Self {
        self.headers = Some(lines);
        self
    }

    pub fn with_source(mut self, source: std::io::Error) -> Self {
        self.source = Some(source);
        self
    }

    /// The JSON body in `dialect`'s shape: OpenAI's (`body`), or Anthropic's
    /// `{"type":"error","error":{"type","message"}}`.
    pub fn body_in(&self, dialect: Dialect) -> Vec<u8> {
        match dialect {
            Dialect::OpenAi => self.body(),
            Dialect::Anthropic => {
                let body = serde_json::json!({
                    "type": "error",
                    "error": {"type": self.kind.anthropic_type(), "message": self.message},
                });
                serde_json::to_vec(&body).unwrap_or_default()
            }
        }
    }

    /// The JSON body: `{"error":{"message","type","param","code"}}`.
    pub fn body(&self) -> Vec<u8> {
        let body = serde_json::json!({
            "error": {
                "message": self.message,
                "type": self.kind.openai_type(),
                "param": self.param,
                "code": self.kind.label(),
            }
        });
        serde_json::to_vec(&body).unwrap_or_default()
    }
}

impl fmt::Display for ProxyError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.kind.label(), self.message)
    }
}

impl std::error::Error for ProxyError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        self.source.as_ref().map(|e| e as _)
    }
}

/// A request head that could not be accepted.
impl From<HeadError> for ProxyError {
    fn from(e: HeadError) -> Self {
        let kind = match e {
            HeadError::TooLarge(_) | HeadError::TooManyHeaders(_) => ErrorKind::HeaderTooLarge,
            HeadError::Malformed(_) => ErrorKind::MalformedRequest,
            HeadError::UnsupportedTransferEncoding => ErrorKind::UnsupportedTransferEncoding,
            HeadError::UnsupportedExpectation => ErrorKind::ExpectationFailed,
        };
        ProxyError::new(kind, e.to_string())
    }
}

/// A request body the JSON peek refused.
impl From<PeekError> for ProxyError {
    fn from(e: PeekError) -> Self {
        let kind = match e {
            PeekError::InvalidJson(_) | PeekError::NotAnObject => ErrorKind::InvalidJson,
            _ => ErrorKind::InvalidRequest,
        };
        let mut error = ProxyError::new(kind, e.to_string());
        error.param = e.param();
        error
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bodies_have_the_openai_shape() {
        let e = ProxyError::new(ErrorKind::InvalidRequest, "`model` is required").with_param("model");
        let v: serde_json::Value = serde_json::from_slice(&e.body()).unwrap();
        assert_eq!(v["error"]["message"], "`model` is required");
        assert_eq!(v["error"]["type"], "invalid_request_error");
        assert_eq!(v["error"]["param"], "model");
        assert_eq!(v["error"]["code"], "invalid_request");
        let v: serde_json::Value =
            serde_json::from_slice(&ProxyError::new(ErrorKind::UpstreamTimeout, "slow").body()).unwrap();
        assert_eq!(v["error"]["type"], "server_error");
        assert!(v["error"]["param"].is_null());
    }

    #[test]
    fn messages_routes_get_anthropic_bodies() {
        assert_eq!(Dialect::of_path("/v1/messages"), Dialect::Anthropic);
        assert_eq!(Dialect::of_path("/v1/messages/count_tokens"), Dialect::Anthropic);
        assert_eq!(Dialect::of_path("/v1/chat/completions"), Dialect::OpenAi);
        let body = |kind| {
            let e = ProxyError::new(kind, "why");
            serde_json::from_slice::<serde_json::Value>(&e.body_in(Dialect::Anthropic)).unwrap()
        };
        assert_eq!(
            body(ErrorKind::UnknownModel),
            serde_json::json!({"type": "error", "error": {"type": "not_found_error", "message": "why"}})
        );
        assert_eq!(body(ErrorKind::InvalidJson)["error"]["type"], "invalid_request_error");
        assert_eq!(body(ErrorKind::Unauthorized)["error"]["type"], "authentication_error");
        assert_eq!(body(ErrorKind::RateLimited)["error"]["type"], "rate_limit_error");
        assert_eq!(body(ErrorKind::Overloaded)["error"]["type"], "overloaded_error");
        assert_eq!(body(ErrorKind::UpstreamReset)["error"]["type"], "api_error");
    }

    #[test]
    fn codec_errors_convert_to_their_kinds() {
        let e = ProxyError::from(HeadError::TooLarge(8192));
        assert_eq!(e.kind, ErrorKind::HeaderTooLarge);
        assert_eq!(e.retry, Retry::Never);
        let e = ProxyError::from(PeekError::NotAnObject);
        assert_eq!(e.kind, ErrorKind::InvalidJson);
        let e = ProxyError::from(PeekError::InvalidField {
            field: "stream",
            expected: "a boolean",
        });
        assert_eq!(e.kind, ErrorKind::InvalidRequest);
        assert_eq!(e.param, Some("stream"));
    }

    #[test]
    fn a_reused_connection_turns_elsewhere_into_reused_only() {
        let e = ProxyError::new(ErrorKind::UpstreamReset, "closed").retry_elsewhere();
        assert_eq!(e.on_reused_connection().retry, Retry::ReusedOnly);
        let e = ProxyError::new(ErrorKind::UpstreamProtocol, "garbage");
        assert_eq!(e.on_reused_connection().retry, Retry::Never);
    }

    #[test]
    fn the_io_cause_is_the_source() {
        use std::error::Error;
        let io = std::io::Error::new(std::io::ErrorKind::ConnectionReset, "reset by peer");
        let e = ProxyError::new(ErrorKind::UpstreamReset, "the engine closed the connection").with_source(io);
        assert_eq!(e.source().map(ToString::to_string).as_deref(), Some("reset by peer"));
        assert!(ProxyError::new(ErrorKind::NotFound, "nope").source().is_none());
    }

    #[test]
    fn statuses() {
        assert_eq!(ErrorKind::UnknownModel.status(), 404);
        assert_eq!(ErrorKind::UnknownResponse.status(), 404);
        assert_eq!(ErrorKind::BodyTooLarge.status(), 413);
        assert_eq!(ErrorKind::NoHealthyEndpoint.status(), 503);
        assert_eq!(ErrorKind::UpstreamConnect.status(), 502);
        assert_eq!(ErrorKind::UpstreamTimeout.status(), 504);
        assert!(ErrorKind::MalformedRequest.closes_connection());
        assert!(!ErrorKind::UnknownModel.closes_connection());
    }
}
