//! The simulated model's output: greedy and deterministic, a function of the context alone, so
//! that a stream cut short can be continued on another engine and give exactly the rest. It is
//! not a language model: no stop tokens, and sampling parameters (temperature, seed, stop) are
//! ignored.
//!
//! - State: `h` folds the context's token ids one at a time, `h = xxh3_64(id, seed = h)` from
//!   a fixed start, so a prompt costs one small hash per token, once per request.
//! - Step: the next token is `OUTPUT_BASE + h mod OUTPUT_WORDS`, then it is folded in, as a
//!   greedy model appends what it picked to its context. Output ids lie in
//!   `[OUTPUT_BASE, OUTPUT_BASE + OUTPUT_WORDS)`, which no prompt tokenizer gives: the hash
//!   tokenizer's ids are under `tokens::VOCAB`, real vocabularies under 2^24.
//! - Text: each output token is a self-delimiting piece, a space, `w` and five lowercase hex
//!   digits (`" w03fa2"` is id `OUTPUT_BASE + 0x03fa2`). The hash tokenizer reads pieces back
//!   as their ids (`tokens::tokenize`), so text continues as ids do.
//!
//! The consequence the failover tests lean on: for a prompt `P` whose uninterrupted answer is
//! `O = expected_ids(P, M)`, the prompt `P + O[..k]` with `max_tokens = M - k` is answered with
//! `O[k..]`, on any simulator. `expected_ids` and `text` let a test compute `O` and its text
//! from the prompt's ids (which the simulator returns with `"return_token_ids": true`, or
//! `/tokenize`).

use xxhash_rust::xxh3::xxh3_64_with_seed;

/// The first output token id.
pub const OUTPUT_BASE: u32 = 1 << 24;
/// How many output token ids there are (five hex digits).
pub const OUTPUT_WORDS: u32 = 1 << 20;
/// Bytes of one piece: a space, `w`, five hex digits.
pub const PIECE_LEN: usize = 7;
/// The state of an empty context.
const START: u64 = 0x6c6d_7374_6163_6b21;

/// The decoder's state over a context; an endless iterator of the tokens it picks.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Greedy {
    h: u64,
}

impl Greedy {
    /// The state after `context` (prompt token ids, and any output already produced).
    pub fn after(context: &[u32]) -> Self {
        let mut g = Self { h: START };
        for &id in context {
            g.push(id);
        }
        g
    }

    /// Appends one token to the context.
    pub fn push(&mut self, id: u32) {
        self.h = xxh3_64_with_seed(&id.to_le_bytes(), self.h);
    }
}

impl Iterator for Greedy {
    type Item = u32;

    /// The token picked for the context so far, appended to it.
    fn next(&mut self) -> Option<u32> {
        let id = OUTPUT_BASE + (self.h % u64::from(OUTPUT_WORDS)) as u32;
        self.push(id);
        Some(id)
    }
}

/// The `max_tokens` output token ids the simulator answers a prompt with.
pub fn expected_ids(prompt: &[u32], max_tokens: usize) -> Vec<u32> {
    Greedy::after(prompt).take(max_tokens).collect()
}

/// Whether `id` is an output token id (one with a piece).
pub fn is_output(id: u32) -> bool {
    (OUTPUT_BASE..OUTPUT_BASE + OUTPUT_WORDS).contains(&id)
}

/// Appends output token `id`'s piece to `out`; an id that is not an output token (never
/// generated) is written as `<id>`, as `/detokenize` writes prompt ids.
pub fn push_piece(out: &mut String, id: u32) {
    use std::fmt::Write;
    let _ = if is_output(id) {
        write!(out, " w{:05x}", id - OUTPUT_BASE)
    } else {
        write!(out, "<{id}>")
    };
}

/// The text of output token ids: their pieces, concatenated.
pub fn text(ids: &[u32]) -> String {
    let mut out = String::with_capacity(ids.len() * PIECE_LEN);
    for &id in ids {
        push_piece(&mut out, id);
    }
    out
}

/// The output token id whose piece starts `bytes`, if one does.
pub fn parse_piece(bytes: &[u8]) -> Option<u32> {
    let [b' ', b'w', digits @ ..] = bytes.get(..PIECE_LEN)? else {
        return None;
    };
    let mut word = 0u32;
    for &d in digits {
        let v = match d {
            b'0'..=b'9' => d - b'0',
            b'a'..=b'f' => d - b'a' + 10,
            _ => return None,
        };
        word = word << 4 | u32::from(v);
    }
    Some(OUTPUT_BASE + word)
}

/// The output token ids of a text made only of pieces (`None` if anything else is in it).
pub fn parse_text(text: &str) -> Option<Vec<u32>> {
    let bytes = text.as_bytes();
    if !bytes.len().is_multiple_of(PIECE_LEN) {
        return None;
    }
    bytes.chunks_exact(PIECE_LEN).map(parse_piece).collect()
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    #[test]
    fn the_output_is_a_function_of_the_context() {
        let prompt: Vec<u32> = (0..40).collect();
        let out = expected_ids(&prompt, 12);
        assert_eq!(out, expected_ids(&prompt, 12));
        assert!(out.iter().all(|&id| is_output(id)));
        assert_ne!(out, expected_ids(&prompt[1..], 12), "another prompt, another answer");
        assert_ne!(out[0], out[1]);
    }

    #[test]
    fn pieces_read_back_as_their_ids() {
        let ids = [OUTPUT_BASE, OUTPUT_BASE + 0x3fa2, OUTPUT_BASE + OUTPUT_WORDS - 1];
        let t = text(&ids);
        assert_eq!(t, " w00000 w03fa2 wfffff");
        assert_eq!(parse_text(&t), Some(ids.to_vec()));
        assert_eq!(parse_text(""), Some(vec![]));
        for bad in [" w0000", " w0000g", "xw00000", " W00000", " w03FA2"] {
            assert_eq!(parse_text(bad), None, "{bad:?}");
        }
        let mut s = String::new();
        push_piece(&mut s, 7);
        assert_eq!(s, "<7>");
    }

    proptest! {
        /// A prompt extended by the first k tokens of its answer is answered with the rest.
        #[test]
        fn a_continued_context_gives_the_rest(prompt in prop::collection::vec(0u32..50_000, 0..64),
                                              m in 1usize..40, k in 0usize..40) {
            let k = k.min(m);
            let full = expected_ids(&prompt, m);
            let continued = [prompt.as_slice(), &full[..k]].concat();
            prop_assert_eq!(expected_ids(&continued, m - k), full[k..].to_vec());
        }
    }
}
