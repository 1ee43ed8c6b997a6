//! HTTP/1.1 codec pieces for the lmstack data plane: message heads, chunked framing, the
//! OpenAI request peek (JSON, and the form of the audio routes), SSE event counting, OpenAI
//! streams event by event (for resuming a cut stream on another engine), the ids stored
//! Responses are named by, and Anthropic Messages requests as vLLM renders them.
//!
//! Everything here is synchronous and does no IO, so it can be unit-tested, fuzzed and
//! benchmarked without a runtime; the proxy binary drives it from its sockets.

#![cfg_attr(not(test), deny(clippy::unwrap_used))]

pub mod anthropic;
pub mod chunked;
pub mod form;
pub mod head;
pub mod peek;
pub mod sse;
pub mod stored;
pub mod stream;

pub use chunked::{ChunkedDecoder, ChunkedError, Decoded};
pub use head::{Framing, HeadError, HeadLimits, HeadScanner, Headers, RequestHead, ResponseHead, Version};
pub use peek::{Peek, PeekError, peek};
pub use sse::{SseCounter, SseEvents};
