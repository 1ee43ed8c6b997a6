//! The data plane's one error type, and the one place where errors become responses.
//!
//! An error carries a kind from a closed set; the kind decides the HTTP status, the OpenAI
//! error `type` and `code`, the `error_kind` metric label, which side failed, and whether
//! the client connection must close. Not here: logging and metrics (the caller records).

use std::borrow::Cow;
use std::fmt;

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
}

impl ErrorKind {
    pub fn status(self) -> u16 {
        match self {
            ErrorKind::MalformedRequest | ErrorKind::InvalidJson | ErrorKind::InvalidRequest => 400,
            ErrorKind::NotFound | ErrorKind::UnknownModel => 404,
            ErrorKind::MethodNotAllowed => 405,
            ErrorKind::RequestTimeout => 408,
            ErrorKind::BodyTooLarge => 413,
            ErrorKind::ExpectationFailed => 417,
            ErrorKind::HeaderTooLarge => 431,
            ErrorKind::UnsupportedTransferEncoding => 501,
            ErrorKind::UpstreamConnect | ErrorKind::UpstreamReset | ErrorKind::UpstreamProtocol => 502,
            ErrorKind::NoHealthyEndpoint | ErrorKind::Overloaded => 503,
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
            ErrorKind::NoHealthyEndpoint => "no_healthy_endpoint",
            ErrorKind::Overloaded => "overloaded",
            ErrorKind::UpstreamConnect => "upstream_connect",
            ErrorKind::UpstreamConnectTimeout => "upstream_connect_timeout",
            ErrorKind::UpstreamReset => "upstream_reset",
            ErrorKind::UpstreamProtocol => "upstream_protocol",
            ErrorKind::UpstreamTimeout => "upstream_timeout",
        }
    }

    pub fn side(self) -> Side {
        match self {
            ErrorKind::UpstreamConnect
            | ErrorKind::UpstreamConnectTimeout
            | ErrorKind::UpstreamReset
            | ErrorKind::UpstreamProtocol
            | ErrorKind::UpstreamTimeout => Side::Upstream,
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

    fn openai_type(self) -> &'static str {
        match self.status() {
            404 => "not_found_error",
            400..=499 => "invalid_request_error",
            _ => "server_error",
        }
    }
}

#[derive(Clone, Debug)]
pub struct ProxyError {
    pub kind: ErrorKind,
    pub message: Cow<'static, str>,
    /// The request parameter at fault, if one is.
    pub param: Option<&'static str>,
    /// Nothing reached the engine's application (or it cannot have acted): another attempt
    /// is safe.
    pub retryable: bool,
}

impl ProxyError {
    pub fn new(kind: ErrorKind, message: impl Into<Cow<'static, str>>) -> Self {
        Self {
            kind,
            message: message.into(),
            param: None,
            retryable: false,
        }
    }

    pub fn with_param(mut self, param: &'static str) -> Self {
        self.param = Some(param);
        self
    }

    pub fn retryable(mut self) -> Self {
        self.retryable = true;
        self
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
    fn statuses() {
        assert_eq!(ErrorKind::UnknownModel.status(), 404);
        assert_eq!(ErrorKind::BodyTooLarge.status(), 413);
        assert_eq!(ErrorKind::NoHealthyEndpoint.status(), 503);
        assert_eq!(ErrorKind::UpstreamConnect.status(), 502);
        assert_eq!(ErrorKind::UpstreamTimeout.status(), 504);
        assert!(ErrorKind::MalformedRequest.closes_connection());
        assert!(!ErrorKind::UnknownModel.closes_connection());
    }
}
