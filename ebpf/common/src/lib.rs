//! What the kernel side (ebpf/probes) and the user side (lmstack-agent) of lmstack's eBPF
//! probes share: the events sent through the ring buffer, the per-connection state, the map
//! names and limits, and the SSE event counter both sides run. Plain `#[repr(C)]` data with
//! explicit padding; no logic beyond the counter, no allocation.
#![no_std]

/// Ring buffer of [`Event`]s, kernel to agent.
pub const EVENTS_MAP: &str = "EVENTS";
/// Per-connection [`Conn`] state, keyed by socket cookie (LRU).
pub const CONNS_MAP: &str = "CONNS";
/// Per-cgroup [`Traffic`] counters, keyed by cgroup id (per CPU).
pub const TRAFFIC_MAP: &str = "TRAFFIC";
/// The probes' own counters, indexed by [`stat`] (per CPU).
pub const STATS_MAP: &str = "STATS";

/// Connections tracked at once; the least recently used go first when more come.
pub const MAX_CONNS: u32 = 65_536;
/// Cgroups counted at once.
pub const MAX_CGROUPS: u32 = 4_096;
/// Ring buffer size (a power of two pages): ~5,400 events (48 bytes with the record header)
/// between two reads.
pub const EVENTS_BYTES: u32 = 256 * 1024;
/// The probes wake the agent only once this much is waiting in the ring buffer: a wake-up per
/// event costs ~10 us of the sending CPU's time (an irq_work interrupt), the rest of a probe
/// run ~1 us. Between wake-ups the agent drains the ring on a timer (`--drain-interval-ms`).
pub const WAKEUP_BYTES: u64 = EVENTS_BYTES as u64 / 8;
/// Bytes of one segment's payload scanned for SSE events; a longer segment is scanned up to
/// here and counted as truncated.
pub const SCAN_BYTES: usize = 4096;

/// Indexes of the probes' counters in [`STATS_MAP`].
pub mod stat {
    /// Events written to the ring buffer.
    pub const EVENTS: u32 = 0;
    /// Events lost because the ring buffer was full.
    pub const DROPPED: u32 = 1;
    /// Segments longer than [`crate::SCAN_BYTES`] (events past the window are not counted).
    pub const TRUNCATED: u32 = 2;
    /// Segments whose payload could not be read.
    pub const UNREADABLE: u32 = 3;
    pub const COUNT: u32 = 4;
}

/// What an [`Event`] reports.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EventKind {
    /// A request to a generation endpoint arrived (first segment of `POST /v1/...`).
    Request = 1,
    /// A response segment carried `count` SSE events (tokens), or the end of the stream.
    Tokens = 2,
    /// The connection closed (TCP_CLOSE).
    Close = 3,
}

impl EventKind {
    pub fn from_u32(v: u32) -> Option<EventKind> {
        match v {
            1 => Some(EventKind::Request),
            2 => Some(EventKind::Tokens),
            3 => Some(EventKind::Close),
            _ => None,
        }
    }
}

/// The generation endpoints recognised in a request line.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Endpoint {
    ChatCompletions = 1,
    Completions = 2,
    Responses = 3,
}

impl Endpoint {
    pub fn from_u32(v: u32) -> Option<Endpoint> {
        match v {
            1 => Some(Endpoint::ChatCompletions),
            2 => Some(Endpoint::Completions),
            3 => Some(Endpoint::Responses),
            _ => None,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Endpoint::ChatCompletions => "chat_completions",
            Endpoint::Completions => "completions",
            Endpoint::Responses => "responses",
        }
    }

    /// The endpoint a request line's path starts with (`path` is what follows `POST /v1/`).
    pub fn from_path(path: &[u8]) -> Option<Endpoint> {
        if path.starts_with(b"chat/completions") {
            Some(Endpoint::ChatCompletions)
        } else if path.starts_with(b"completions") {
            Some(Endpoint::Completions)
        } else if path.starts_with(b"responses") {
            Some(Endpoint::Responses)
        } else {
            None
        }
    }
}

/// [`Event::flags`]: the segment carried the stream's first event.
pub const FLAG_FIRST: u32 = 1;
/// [`Event::flags`]: the segment carried `data: [DONE]`.
pub const FLAG_DONE: u32 = 2;

/// One event, kernel to agent. 40 bytes, no implicit padding.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Event {
    /// `bpf_ktime_get_ns` (CLOCK_MONOTONIC) when the segment passed.
    pub ts_ns: u64,
    /// The socket cookie: one per connection, never reused while the system runs.
    pub cookie: u64,
    /// The cgroup the socket belongs to (`bpf_skb_cgroup_id`; 0 for `Close`).
    pub cgroup_id: u64,
    /// An [`EventKind`].
    pub kind: u32,
    /// `Request`: an [`Endpoint`]; `Tokens`: SSE events in the segment (not counting
    /// `[DONE]`).
    pub value: u32,
    /// `Tokens`: [`FLAG_FIRST`], [`FLAG_DONE`]. `Request`: the request's payload bytes in
    /// its first segment.
    pub flags: u32,
    pub _pad: u32,
}

/// A tracked connection: one request at a time (HTTP/1.1), its response's SSE parse state.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Conn {
    /// When the current request arrived (`bpf_ktime_get_ns`).
    pub request_ns: u64,
    /// SSE events seen in the current response.
    pub events: u32,
    /// The [`SseCounter`] state carried from the last response segment to the next.
    pub sse_state: u32,
}

/// Payload bytes of a cgroup's TCP traffic, as the cgroup sees it.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Traffic {
    pub rx_bytes: u64,
    pub tx_bytes: u64,
}

#[cfg(feature = "user")]
mod pod {
    // SAFETY: plain #[repr(C)] integers with no padding and no invalid bit patterns.
    unsafe impl aya::Pod for super::Event {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::Conn {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::Traffic {}
}

/// Counts SSE events (`data:` at the start of a line) in a byte stream cut into segments
/// anywhere, and recognises `data: [DONE]`. The state is one `u32`, kept in [`Conn`] between
/// segments.
///
/// Table-driven: [`SSE_TABLE`]`[state * 256 + byte]` holds the next state (low 3 bits) and
/// whether an event ([`SSE_EVENT`]) or `[DONE]` ([`SSE_DONE`]) was recognised. The kernel side
/// steps through the table without a branch on the state, which keeps the verifier's work
/// linear in the bytes scanned.
///
/// States: 0..=5: that many bytes of `"\ndata:"` matched; 6: matched, waiting for the first
/// byte after the optional spaces (`[` meaning `[DONE]`). A response starts in state 1 (as
/// if after a newline), for a body that starts its segment with `data:`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SseCounter {
    pub state: u32,
}

const PATTERN: &[u8; 6] = b"\ndata:";

/// [`SSE_TABLE`] entry bit: an event with data was recognised.
pub const SSE_EVENT: u8 = 0x10;
/// [`SSE_TABLE`] entry bit: `data: [DONE]` was recognised.
pub const SSE_DONE: u8 = 0x20;
/// [`SSE_TABLE`] entry bits: the next state.
pub const SSE_STATE: u8 = 0x07;
pub const SSE_TABLE_BYTES: usize = 8 * 256;

/// The SSE counter's transitions (see [`SseCounter`]).
pub static SSE_TABLE: [u8; SSE_TABLE_BYTES] = sse_table();

const fn sse_table() -> [u8; SSE_TABLE_BYTES] {
    let mut t = [0u8; SSE_TABLE_BYTES];
    let mut s = 0;
    while s < 8 {
        let mut b = 0;
        while b < 256 {
            let byte = b as u8;
            t[s * 256 + b] = if s < 6 {
                if byte == PATTERN[s] {
                    s as u8 + 1
                } else if byte == b'\n' {
                    1
                } else {
                    0
                }
            } else if s == 6 {
                match byte {
                    b' ' => 6,
                    b'[' => SSE_DONE,
                    b'\n' => SSE_EVENT | 1,
                    _ => SSE_EVENT,
                }
            } else {
                // State 7 is never entered; treat it as the start of a line.
                if byte == b'\n' { 1 } else { 0 }
            };
            b += 1;
        }
        s += 1;
    }
    t
}

/// The [`SSE_TABLE`] entry for `byte` in `state`: the next state and what was recognised.
/// Indexing only (the state is masked), so the kernel side can call it without branches.
#[inline(always)]
pub fn sse_next(state: u32, byte: u8) -> u8 {
    SSE_TABLE[(((state & 7) as usize) << 8) | byte as usize]
}

/// What one step of the counter saw.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Step {
    Nothing,
    /// An event with data.
    Event,
    /// `data: [DONE]`.
    Done,
}

impl SseCounter {
    /// The state at the start of a response.
    pub const START: u32 = 1;

    /// Feeds one byte.
    #[inline(always)]
    pub fn step(&mut self, b: u8) -> Step {
        let v = sse_next(self.state, b);
        self.state = u32::from(v & SSE_STATE);
        if v & SSE_EVENT != 0 {
            Step::Event
        } else if v & SSE_DONE != 0 {
            Step::Done
        } else {
            Step::Nothing
        }
    }
}

#[cfg(test)]
mod tests {
    extern crate std;
    use std::vec::Vec;

    use super::*;

    /// Counts events and [DONE]s in `segments` fed one after another.
    fn count(segments: &[&[u8]]) -> (u32, u32) {
        let mut c = SseCounter {
            state: SseCounter::START,
        };
        let (mut events, mut done) = (0, 0);
        for s in segments {
            for &b in *s {
                match c.step(b) {
                    Step::Event => events += 1,
                    Step::Done => done += 1,
                    Step::Nothing => {}
                }
            }
        }
        (events, done)
    }

    const CHUNKED: &[u8] = b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n\
        2a\r\ndata: {\"choices\":[{\"delta\":{\"role\":\"x\"}}]}\n\n\r\n\
        26\r\ndata: {\"choices\":[{\"text\":\"a b\"}]}\n\n\r\n\
        2c\r\ndata: {\"choices\":[{\"text\":\"data: x\"}]}\n\ndata: {\"x\":1}\n\n\r\n\
        e\r\ndata: [DONE]\n\n\r\n0\r\n\r\n";

    #[test]
    fn counts_events_and_done_in_a_chunked_stream() {
        assert_eq!(count(&[CHUNKED]), (4, 1));
    }

    #[test]
    fn counts_the_same_however_the_stream_is_cut() {
        for cut in 1..CHUNKED.len() {
            let (a, b) = CHUNKED.split_at(cut);
            assert_eq!(count(&[a, b]), (4, 1), "cut at {cut}");
        }
        let bytes: Vec<&[u8]> = CHUNKED.chunks(1).collect();
        assert_eq!(count(&bytes), (4, 1));
    }

    #[test]
    fn a_body_that_starts_the_segment_with_data_counts() {
        assert_eq!(count(&[b"data: {}\n\ndata: [DONE]\n\n"]), (1, 1));
        assert_eq!(count(&[b"data:{}\n\n"]), (1, 0));
    }

    #[test]
    fn data_inside_a_line_or_json_text_is_not_an_event() {
        assert_eq!(count(&[b"xdata: 1\n\"data:\" \\ndata: 2\n\n"]), (0, 0));
    }

    #[test]
    fn endpoints_from_request_paths() {
        assert_eq!(
            Endpoint::from_path(b"chat/completions HTTP/1.1"),
            Some(Endpoint::ChatCompletions)
        );
        assert_eq!(
            Endpoint::from_path(b"completions HTTP/1.1"),
            Some(Endpoint::Completions)
        );
        assert_eq!(Endpoint::from_path(b"responses"), Some(Endpoint::Responses));
        assert_eq!(Endpoint::from_path(b"embeddings"), None);
    }

    #[test]
    fn event_has_no_implicit_padding() {
        assert_eq!(core::mem::size_of::<Event>(), 40);
        assert_eq!(core::mem::size_of::<Conn>(), 16);
        assert_eq!(core::mem::size_of::<Traffic>(), 16);
    }
}
