//! An incremental decoder for `Transfer-Encoding: chunked` (RFC 9112 7.1).
//!
//! It reports payload slices and where the message ends, and never buffers: the caller keeps
//! the bytes, so a proxy can pass chunked bytes through untouched while still knowing where a
//! response ends. It is strict about CRLF (no bare LF) to leave no room for framing ambiguity.
//! Trailer fields are skipped, not interpreted.

/// Longest chunk-size line (size plus extensions) accepted, in bytes.
pub const MAX_SIZE_LINE: usize = 4096;
/// Most trailer bytes accepted after the last chunk.
pub const MAX_TRAILER_BYTES: usize = 16 * 1024;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ChunkedError {
    #[error("invalid chunk size")]
    InvalidSize,
    #[error("chunk size too large")]
    SizeOverflow,
    #[error("chunk size line too long")]
    LineTooLong,
    #[error("missing CRLF after chunk")]
    MissingCrlf,
    #[error("trailer section too large")]
    TrailerTooLarge,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum State {
    /// Reading hex digits of a chunk size (`digits` so far).
    Size,
    /// Inside chunk extensions, until CR.
    Extension,
    /// Expecting LF after the size line.
    SizeLf,
    /// Inside chunk data, `remaining` bytes left.
    Data,
    DataCr,
    DataLf,
    /// At the start of a trailer line (or the final CRLF).
    TrailerStart,
    TrailerLine,
    TrailerLf,
    EndLf,
    Done,
}

/// Progress of one [`ChunkedDecoder::decode`] call.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Decoded {
    /// Input bytes that belong to this message (all of them unless it ended inside `input`).
    pub consumed: usize,
    /// The terminating chunk and trailer section have been read.
    pub done: bool,
}

#[derive(Clone, Debug)]
pub struct ChunkedDecoder {
    state: State,
    size: u64,
    digits: u32,
    line_len: usize,
    remaining: u64,
    trailer_bytes: usize,
}

impl Default for ChunkedDecoder {
    fn default() -> Self {
        Self::new()
    }
}

impl ChunkedDecoder {
    pub fn new() -> Self {
        Self {
            state: State::Size,
            size: 0,
            digits: 0,
            line_len: 0,
            remaining: 0,
            trailer_bytes: 0,
        }
    }

    pub fn is_done(&self) -> bool {
        self.state == State::Done
    }

    /// Feeds `input`; calls `on_data` with every payload slice found in it, in order.
    pub fn decode(&mut self, input: &[u8], mut on_data: impl FnMut(&[u8])) -> Result<Decoded, ChunkedError> {
        let mut i = 0;
        while i < input.len() {
            let b = input[i];
            match self.state {
                State::Size => {
                    self.line_len += 1;
                    if let Some(d) = hex_value(b) {
                        if self.digits == 16 {
                            return Err(ChunkedError::SizeOverflow);
                        }
                        self.size = (self.size << 4) | u64::from(d);
                        self.digits += 1;
                    } else if self.digits == 0 {
                        return Err(ChunkedError::InvalidSize);
                    } else if b == b'\r' {
                        self.state = State::SizeLf;
                    } else if b == b';' || b == b' ' || b == b'\t' {
                        self.state = State::Extension;
                    } else {
                        return Err(ChunkedError::InvalidSize);
                    }
                    i += 1;
                }
                State::Extension => {
                    // Skip to CR quickly.
                    let rest = &input[i..];
                    let n = memchr::memchr2(b'\r', b'\n', rest).unwrap_or(rest.len());
                    self.line_len += n;
                    if self.line_len > MAX_SIZE_LINE {
                        return Err(ChunkedError::LineTooLong);
                    }
                    i += n;
                    if i < input.len() {
                        if input[i] == b'\n' {
                            return Err(ChunkedError::MissingCrlf);
                        }
                        self.state = State::SizeLf;
                        i += 1;
                    }
                }
                State::SizeLf => {
                    if b != b'\n' {
                        return Err(ChunkedError::MissingCrlf);
                    }
                    i += 1;
                    self.line_len = 0;
                    self.digits = 0;
                    if self.size == 0 {
                        self.state = State::TrailerStart;
                    } else {
                        self.remaining = self.size;
                        self.size = 0;
                        self.state = State::Data;
                    }
                }
                State::Data => {
                    let available = (input.len() - i) as u64;
                    let take = available.min(self.remaining) as usize;
                    on_data(&input[i..i + take]);
                    i += take;
                    self.remaining -= take as u64;
                    if self.remaining == 0 {
                        self.state = State::DataCr;
                    }
                }
                State::DataCr => {
                    if b != b'\r' {
                        return Err(ChunkedError::MissingCrlf);
                    }
                    self.state = State::DataLf;
                    i += 1;
                }
                State::DataLf => {
                    if b != b'\n' {
                        return Err(ChunkedError::MissingCrlf);
                    }
                    self.state = State::Size;
                    i += 1;
                }
                State::TrailerStart => {
                    self.state = if b == b'\r' { State::EndLf } else { State::TrailerLine };
                    self.trailer_bytes += 1;
                    i += 1;
                }
                State::TrailerLine => {
                    let rest = &input[i..];
                    let n = memchr::memchr(b'\r', rest).unwrap_or(rest.len());
                    self.trailer_bytes += n;
                    i += n;
                    if i < input.len() {
                        self.state = State::TrailerLf;
                        i += 1;
                    }
                }
                State::TrailerLf => {
                    if b != b'\n' {
                        return Err(ChunkedError::MissingCrlf);
                    }
                    self.state = State::TrailerStart;
                    i += 1;
                }
                State::EndLf => {
                    if b != b'\n' {
                        return Err(ChunkedError::MissingCrlf);
                    }
                    self.state = State::Done;
                    i += 1;
                }
                State::Done => break,
            }
            if self.trailer_bytes > MAX_TRAILER_BYTES {
                return Err(ChunkedError::TrailerTooLarge);
            }
            if self.line_len > MAX_SIZE_LINE {
                return Err(ChunkedError::LineTooLong);
            }
            if self.state == State::Done {
                break;
            }
        }
        Ok(Decoded {
            consumed: i,
            done: self.state == State::Done,
        })
    }
}

fn hex_value(b: u8) -> Option<u8> {
    match b {
        b'0'..=b'9' => Some(b - b'0'),
        b'a'..=b'f' => Some(b - b'a' + 10),
        b'A'..=b'F' => Some(b - b'A' + 10),
        _ => None,
    }
}

/// Writes `payload` as one chunk (size line, data, CRLF) into `out`.
pub fn encode_chunk(payload: &[u8], out: &mut Vec<u8>) {
    if payload.is_empty() {
        return;
    }
    out.extend_from_slice(format!("{:x}\r\n", payload.len()).as_bytes());
    out.extend_from_slice(payload);
    out.extend_from_slice(b"\r\n");
}

/// The last chunk with an empty trailer section.
pub const LAST_CHUNK: &[u8] = b"0\r\n\r\n";

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn decode_all(input: &[u8]) -> Result<(Vec<u8>, Decoded), ChunkedError> {
        let mut d = ChunkedDecoder::new();
        let mut out = Vec::new();
        let r = d.decode(input, |p| out.extend_from_slice(p))?;
        Ok((out, r))
    }

    #[test]
    fn decodes_a_simple_body() {
        let (out, r) = decode_all(b"5\r\nhello\r\n6;ext=1\r\n world\r\n0\r\n\r\nNEXT").unwrap();
        assert_eq!(out, b"hello world");
        assert_eq!(
            r,
            Decoded {
                consumed: 32,
                done: true
            }
        );
    }

    #[test]
    fn skips_trailers() {
        let (out, r) = decode_all(b"3\r\nabc\r\n0\r\nX-Trailer: 1\r\nY: 2\r\n\r\n").unwrap();
        assert_eq!(out, b"abc");
        assert!(r.done);
    }

    #[test]
    fn upper_case_hex_and_leading_zeros() {
        let (out, _) = decode_all(b"000A\r\n0123456789\r\n0\r\n\r\n").unwrap();
        assert_eq!(out, b"0123456789");
    }

    #[test]
    fn rejects_bad_framing() {
        assert_eq!(decode_all(b"x\r\n").unwrap_err(), ChunkedError::InvalidSize);
        assert_eq!(decode_all(b"\r\n").unwrap_err(), ChunkedError::InvalidSize);
        assert_eq!(decode_all(b"3\nabc").unwrap_err(), ChunkedError::InvalidSize);
        assert_eq!(decode_all(b"3\r\nabcX").unwrap_err(), ChunkedError::MissingCrlf);
        assert_eq!(
            decode_all(b"11111111111111111\r\n").unwrap_err(),
            ChunkedError::SizeOverflow
        );
        let mut long = b"1;".to_vec();
        long.extend(std::iter::repeat_n(b'a', MAX_SIZE_LINE + 10));
        assert_eq!(decode_all(&long).unwrap_err(), ChunkedError::LineTooLong);
        let mut trailer = b"0\r\nX: ".to_vec();
        trailer.extend(std::iter::repeat_n(b'a', MAX_TRAILER_BYTES + 10));
        assert_eq!(decode_all(&trailer).unwrap_err(), ChunkedError::TrailerTooLarge);
    }

    #[test]
    fn not_done_until_the_final_crlf() {
        let (_, r) = decode_all(b"0\r\n").unwrap();
        assert!(!r.done);
        let (_, r) = decode_all(b"0\r\n\r").unwrap();
        assert!(!r.done);
    }

    fn encode(chunks: &[Vec<u8>]) -> Vec<u8> {
        let mut out = Vec::new();
        for c in chunks {
            encode_chunk(c, &mut out);
        }
        out.extend_from_slice(LAST_CHUNK);
        out
    }

    proptest! {
        /// However the encoded body is cut into reads, the payload and the end come out the same.
        #[test]
        fn any_split_decodes_the_same(
            chunks in prop::collection::vec(prop::collection::vec(any::<u8>(), 1..300), 0..8),
            cuts in prop::collection::vec(1usize..64, 1..40),
        ) {
            let wire = encode(&chunks);
            let expected: Vec<u8> = chunks.concat();
            let mut d = ChunkedDecoder::new();
            let mut out = Vec::new();
            let mut pos = 0;
            let mut cut = cuts.iter().cycle();
            let mut done = false;
            while pos < wire.len() {
                let end = (pos + cut.next().copied().unwrap_or(1)).min(wire.len());
                let r = d.decode(&wire[pos..end], |p| out.extend_from_slice(p)).unwrap();
                pos += r.consumed;
                if r.done { done = true; break; }
                prop_assert_eq!(r.consumed, end - (pos - r.consumed));
            }
            prop_assert!(done);
            prop_assert_eq!(pos, wire.len());
            prop_assert_eq!(out, expected);
        }

        /// Arbitrary bytes never panic and never report more payload than input.
        #[test]
        fn arbitrary_input_is_safe(input in prop::collection::vec(any::<u8>(), 0..512)) {
            let mut d = ChunkedDecoder::new();
            let mut n = 0usize;
            if let Ok(r) = d.decode(&input, |p| n += p.len()) {
                prop_assert!(r.consumed <= input.len());
                prop_assert!(n <= r.consumed);
            }
        }
    }
}
