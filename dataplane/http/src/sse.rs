//! Counts server-sent events in a byte stream that may split an event (or a line) anywhere.
//!
//! It only finds event boundaries and whether an event carried a `data:` field, and tells
//! the `data: [DONE]` sentinel apart; it does not keep or parse event contents. Lines end in
//! LF or CRLF (vLLM and every OpenAI-compatible server use those; a lone CR is not a line end
//! here).

const DATA: &[u8] = b"data:";
const DONE: &[u8] = b"[DONE]";

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Line {
    /// At the first byte of a line.
    Start,
    /// Matching `data:`; `n` bytes matched so far.
    Field(u8),
    /// After `data:`, at the optional single space.
    DataSpace,
    /// Matching `[DONE]` in the value; `n` bytes matched so far.
    Done(u8),
    /// Nothing more to learn from this line: skip to its end.
    Skip,
}

/// What one [`SseCounter::feed`] call found.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SseEvents {
    /// Completed events with a `data:` field other than `[DONE]`.
    pub data: u32,
    /// A `data: [DONE]` event completed.
    pub done: bool,
}

#[derive(Clone, Debug)]
pub struct SseCounter {
    line: Line,
    /// The current line is empty so far (a blank line ends an event).
    line_empty: bool,
    event_has_data: bool,
    event_is_done: bool,
    /// The current line is a `data:` line.
    line_is_data: bool,
    /// The value of the current data line so far is exactly `[DONE]`.
    value_is_done: bool,
}

impl Default for SseCounter {
    fn default() -> Self {
        Self::new()
    }
}

impl SseCounter {
    pub fn new() -> Self {
        Self {
            line: Line::Start,
            line_empty: true,
            event_has_data: false,
            event_is_done: false,
            line_is_data: false,
            value_is_done: false,
        }
    }

    pub fn feed(&mut self, bytes: &[u8]) -> SseEvents {
        let mut found = SseEvents::default();
        let mut i = 0;
        while i < bytes.len() {
            let b = bytes[i];
            if b == b'\n' {
                self.end_line(&mut found);
                i += 1;
                continue;
            }
            if b == b'\r' {
                // Part of a CRLF; the LF ends the line.
                i += 1;
                continue;
            }
            self.line_empty = false;
            match self.line {
                Line::Start | Line::Field(_) => {
                    let n = match self.line {
                        Line::Field(n) => n,
                        _ => 0,
                    };
                    if b == DATA[n as usize] {
                        self.line = if n as usize + 1 == DATA.len() {
                            self.event_has_data = true;
                            self.line_is_data = true;
                            self.value_is_done = false;
                            Line::DataSpace
                        } else {
                            Line::Field(n + 1)
                        };
                    } else {
                        self.line = Line::Skip;
                    }
                    i += 1;
                }
                Line::DataSpace => {
                    if b == b' ' {
                        self.line = Line::Done(0);
                        i += 1;
                    } else {
                        self.line = Line::Done(0);
                    }
                }
                Line::Done(n) => {
                    if (n as usize) < DONE.len() && b == DONE[n as usize] {
                        self.line = Line::Done(n + 1);
                        self.value_is_done = n as usize + 1 == DONE.len();
                    } else {
                        self.value_is_done = false;
                        self.line = Line::Skip;
                    }
                    i += 1;
                }
                Line::Skip => {
                    let rest = &bytes[i..];
                    i += memchr::memchr(b'\n', rest).unwrap_or(rest.len());
                    // A CR just before the LF was skipped with the rest of the line.
                }
            }
        }
        found
    }

    fn end_line(&mut self, found: &mut SseEvents) {
        if self.line_empty {
            if self.event_has_data {
                if self.event_is_done {
                    found.done = true;
                } else {
                    found.data += 1;
                }
            }
            self.event_has_data = false;
            self.event_is_done = false;
        } else if self.line_is_data {
            // The event is [DONE] only if its last data value is exactly that.
            self.event_is_done = self.value_is_done;
        }
        self.line = Line::Start;
        self.line_empty = true;
        self.line_is_data = false;
        self.value_is_done = false;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn count(stream: &[u8]) -> SseEvents {
        SseCounter::new().feed(stream)
    }

    const VLLM: &[u8] = b"data: {\"id\":\"cmpl-1\",\"choices\":[{\"text\":\"a\"}]}\n\n\
data: {\"id\":\"cmpl-1\",\"choices\":[{\"text\":\"b\"}]}\n\n\
data: [DONE]\n\n";

    #[test]
    fn counts_vllm_events() {
        assert_eq!(count(VLLM), SseEvents { data: 2, done: true });
    }

    #[test]
    fn crlf_and_comments_and_other_fields() {
        let s = b": keep-alive\r\n\r\nevent: x\r\ndata: 1\r\nid: 3\r\n\r\nretry: 10\r\n\r\n";
        assert_eq!(count(s), SseEvents { data: 1, done: false });
    }

    #[test]
    fn multi_line_data_is_one_event() {
        assert_eq!(count(b"data: a\ndata: b\n\n").data, 1);
    }

    #[test]
    fn done_must_be_the_whole_value() {
        assert_eq!(count(b"data: [DONE]x\n\n"), SseEvents { data: 1, done: false });
        assert_eq!(count(b"data:[DONE]\n\n"), SseEvents { data: 0, done: true });
        assert_eq!(count(b"data: [DON\n\n"), SseEvents { data: 1, done: false });
        assert_eq!(count(b"datax: 1\n\n"), SseEvents::default());
        assert_eq!(count(b"data: [DONE]\ndata: x\n\n"), SseEvents { data: 1, done: false });
    }

    #[test]
    fn an_unfinished_event_is_not_counted() {
        assert_eq!(count(b"data: {\"a\":1}\n").data, 0);
    }

    proptest! {
        /// Cutting the stream anywhere gives the same counts as feeding it whole.
        #[test]
        fn splits_do_not_change_counts(cuts in prop::collection::vec(1usize..20, 1..30)) {
            let mut c = SseCounter::new();
            let mut total = SseEvents::default();
            let mut pos = 0;
            let mut cut = cuts.iter().cycle();
            while pos < VLLM.len() {
                let end = (pos + cut.next().copied().unwrap_or(1)).min(VLLM.len());
                let e = c.feed(&VLLM[pos..end]);
                total.data += e.data;
                total.done |= e.done;
                pos = end;
            }
            prop_assert_eq!(total, SseEvents { data: 2, done: true });
        }
    }
}
