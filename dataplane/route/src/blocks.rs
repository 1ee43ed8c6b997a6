//! Prompt blocks: a normalised prompt is cut into fixed-size byte blocks, and each block gets
//! a chained xxh3 hash (this block's bytes hashed with the previous block's hash as the seed,
//! hence it covers the whole prompt up to here). Equal prefixes give equal leading hashes; a partial last block
//! is not hashed.
//!
//! The prompt arrives in pieces (a chat's roles and contents, in order); blocks cut across
//! pieces; only a block cut across pieces is copied (into a buffer of one block).

use xxhash_rust::xxh3::xxh3_64_with_seed;

/// Block `k`'s hash is `xxh3_64_with_seed(block k's bytes, hash of block k - 1)`, the first
/// block's seed 0. A block that lies whole inside one piece is hashed in place (one-shot
/// xxh3 of 128 bytes costs ~10 ns, a streaming digest ten times that); only a block cut
/// across pieces is gathered first.
pub struct BlockHasher<'a> {
    block_bytes: usize,
    max_blocks: usize,
    /// The bytes of a block cut across pieces, until it is full.
    partial: Vec<u8>,
    seed: u64,
    out: &'a mut Vec<u64>,
}

impl<'a> BlockHasher<'a> {
    /// Hashes into `out` (cleared first), at most `max_blocks` blocks of `block_bytes`.
    pub fn new(block_bytes: usize, max_blocks: usize, out: &'a mut Vec<u64>) -> Self {
        out.clear();
        let block_bytes = block_bytes.max(1);
        Self {
            block_bytes,
            max_blocks,
            partial: Vec::new(),
            seed: 0,
            out,
        }
    }

    fn push(&mut self, block: &[u8]) {
        self.seed = xxh3_64_with_seed(block, self.seed);
        self.out.push(self.seed);
    }

    pub fn feed(&mut self, mut bytes: &[u8]) {
        if !self.partial.is_empty() {
            let take = (self.block_bytes - self.partial.len()).min(bytes.len());
            self.partial.extend_from_slice(&bytes[..take]);
            bytes = &bytes[take..];
            if self.partial.len() < self.block_bytes {
                return;
            }
            let block = std::mem::take(&mut self.partial);
            if self.out.len() < self.max_blocks {
                self.push(&block);
            }
            self.partial = block;
            self.partial.clear();
        }
        while bytes.len() >= self.block_bytes && self.out.len() < self.max_blocks {
            let (block, rest) = bytes.split_at(self.block_bytes);
            self.push(block);
            bytes = rest;
        }
        if self.out.len() < self.max_blocks {
            self.partial.extend_from_slice(bytes);
        }
    }

    /// Full blocks hashed so far.
    pub fn blocks(&self) -> usize {
        self.out.len()
    }
}

/// The table key of a session: where a request with session key `key` went is recorded under
/// it like a prompt block (seeded apart from prompt blocks, so it cannot collide with one).
pub fn session_block(key: &str) -> u64 {
    xxh3_64_with_seed(key.as_bytes(), 0x5e55_1011_a11c_e5ed)
}

/// The blocks of one contiguous prompt.
pub fn hash_blocks(prompt: &[u8], block_bytes: usize, max_blocks: usize, out: &mut Vec<u64>) {
    BlockHasher::new(block_bytes, max_blocks, out).feed(prompt);
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn equal_prefixes_share_leading_blocks() {
        let (mut a, mut b) = (Vec::new(), Vec::new());
        hash_blocks(b"system prompt; question one, long enough", 8, 100, &mut a);
        hash_blocks(b"system prompt; question two, long enough", 8, 100, &mut b);
        assert_eq!(a.len(), 5);
        // "system p" "rompt; q" "uestion " are shared; "one, lon" is not.
        assert_eq!(a[..3], b[..3]);
        assert_ne!(a[3], b[3]);
        // Chained: the same block bytes after a different prefix hash differently.
        let (mut c, mut d) = (Vec::new(), Vec::new());
        hash_blocks(b"AAAAAAAAxxxxxxxx", 8, 100, &mut c);
        hash_blocks(b"BBBBBBBBxxxxxxxx", 8, 100, &mut d);
        assert_ne!(c[1], d[1]);
    }

    #[test]
    fn the_block_limit_holds() {
        let mut out = Vec::new();
        hash_blocks(&[7u8; 1000], 10, 3, &mut out);
        assert_eq!(out.len(), 3);
    }

    proptest! {
        /// However the prompt is cut into pieces, the blocks are the same.
        #[test]
        fn pieces_do_not_matter(prompt in prop::collection::vec(any::<u8>(), 0..400), cuts in prop::collection::vec(1usize..30, 1..20)) {
            let mut whole = Vec::new();
            hash_blocks(&prompt, 16, 1000, &mut whole);
            let mut pieced = Vec::new();
            let mut h = BlockHasher::new(16, 1000, &mut pieced);
            let mut pos = 0;
            for c in cuts.iter().cycle() {
                if pos >= prompt.len() { break; }
                let end = (pos + c).min(prompt.len());
                h.feed(&prompt[pos..end]);
                pos = end;
            }
            prop_assert_eq!(whole, pieced);
        }
    }
}
