//! Block keys: lmstack's own chained hash of a block's token ids.
//!
//! vLLM hashes a block with its parent's hash, its tokens and its extra keys, using an
//! algorithm and a seed the router would have to match (`--prefix-caching-hash-algo`,
//! `PYTHONHASHSEED`, the process's random `NONE_HASH` without it). The router keys blocks its
//! own way instead, from what `BlockStored` carries (the tokens, the extra keys, the parent),
//! so any engine configuration is exact: a key is `xxh3(parent key, extra keys, tokens)`,
//! the first block's parent being [`ROOT`]. A request's keys are computed the same way from
//! the token ids the engine will see ([`prompt_keys`]).

use xxhash_rust::xxh3::Xxh3;

use crate::event::Extra;

/// A block's key: its tokens, its extra keys and every block before it.
pub type BlockKey = u64;

/// The parent key of a sequence's first block.
pub const ROOT: BlockKey = 0x6c6d_7374_6163_6b00; // "lmstack\0"

/// A digest of one block's extra keys as vLLM publishes them (untagged, in order: LoRA name,
/// multimodal pairs, cache salt, prompt-embedding digests); 0 when it has none.
pub fn extras_digest(extras: Option<&[Extra]>) -> u64 {
    let Some(extras) = extras.filter(|e| !e.is_empty()) else {
        return 0;
    };
    let mut h = Xxh3::new();
    for e in extras {
        let (tag, bytes) = match e {
            Extra::Text(s) => (1u8, s.as_bytes()),
            Extra::Raw(b) => (2u8, b.as_slice()),
        };
        h.update(&[tag]);
        h.update(&(bytes.len() as u64).to_le_bytes());
        h.update(bytes);
    }
    h.digest().max(1)
}

/// The key of a block of `tokens` chained to `parent`, with `extras` (see [`extras_digest`]).
pub fn chain(parent: BlockKey, tokens: &[u32], extras: u64) -> BlockKey {
    let mut h = Xxh3::new();
    h.update(&parent.to_le_bytes());
    h.update(&extras.to_le_bytes());
    // Tokens as little-endian u32s, a chunk at a time (no allocation).
    let mut buf = [0u8; 256];
    for chunk in tokens.chunks(buf.len() / 4) {
        for (i, t) in chunk.iter().enumerate() {
            buf[i * 4..i * 4 + 4].copy_from_slice(&t.to_le_bytes());
        }
        h.update(&buf[..chunk.len() * 4]);
    }
    h.digest()
}

/// What makes a request's blocks differ beyond their tokens, as vLLM hashes it.
#[derive(Clone, Copy, Debug, Default)]
pub struct RequestExtras<'a> {
    /// The LoRA adapter the request names (vLLM adds it to every block).
    pub lora_name: Option<&'a str>,
    /// The request's `cache_salt` (vLLM adds it to the first block only).
    pub cache_salt: Option<&'a str>,
}

/// The keys of a prompt's full blocks of `block_size` tokens, written into `out` (cleared
/// first). A last partial block is not cached by vLLM and gets no key.
pub fn prompt_keys(tokens: &[u32], block_size: usize, extras: RequestExtras<'_>, out: &mut Vec<BlockKey>) {
    out.clear();
    if block_size == 0 {
        return;
    }
    let lora = extras.lora_name.map(|n| Extra::Text(n.to_owned()));
    let salt = extras
        .cache_salt
        .filter(|s| !s.is_empty())
        .map(|s| Extra::Text(s.to_owned()));
    let first: Vec<Extra> = lora.iter().chain(salt.iter()).cloned().collect();
    let rest: Vec<Extra> = lora.into_iter().collect();
    let (first, rest) = (extras_digest(Some(&first)), extras_digest(Some(&rest)));
    let mut parent = ROOT;
    for (i, block) in tokens.chunks_exact(block_size).enumerate() {
        parent = chain(parent, block, if i == 0 { first } else { rest });
        out.push(parent);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_chain_and_cover_full_blocks_only() {
        let tokens: Vec<u32> = (0..100).collect();
        let mut keys = Vec::new();
        prompt_keys(&tokens, 32, RequestExtras::default(), &mut keys);
        assert_eq!(keys.len(), 3);
        assert_eq!(keys[0], chain(ROOT, &tokens[..32], 0));
        assert_eq!(keys[2], chain(keys[1], &tokens[64..96], 0));
        // The same tokens after a different first block: a different key.
        let mut other = tokens.clone();
        other[0] = 7;
        let mut keys2 = Vec::new();
        prompt_keys(&other, 32, RequestExtras::default(), &mut keys2);
        assert!(keys.iter().zip(&keys2).all(|(a, b)| a != b));
    }

    #[test]
    fn salt_marks_the_first_block_and_lora_every_block() {
        let tokens: Vec<u32> = (0..64).collect();
        let (mut plain, mut salted, mut lora) = (Vec::new(), Vec::new(), Vec::new());
        prompt_keys(&tokens, 32, RequestExtras::default(), &mut plain);
        let salt = RequestExtras {
            cache_salt: Some("team-a"),
            ..Default::default()
        };
        prompt_keys(&tokens, 32, salt, &mut salted);
        assert_ne!(plain[0], salted[0]);
        assert_eq!(
            salted[0],
            chain(
                ROOT,
                &tokens[..32],
                extras_digest(Some(&[Extra::Text("team-a".into())]))
            )
        );
        assert_eq!(salted[1], chain(salted[0], &tokens[32..], 0));
        let with_lora = RequestExtras {
            lora_name: Some("sql"),
            ..Default::default()
        };
        prompt_keys(&tokens, 32, with_lora, &mut lora);
        let l = extras_digest(Some(&[Extra::Text("sql".into())]));
        assert_eq!(lora[1], chain(lora[0], &tokens[32..], l));
    }

    #[test]
    fn text_and_raw_extras_differ() {
        let t = extras_digest(Some(&[Extra::Text("a".into())]));
        let r = extras_digest(Some(&[Extra::Raw(b"a".to_vec())]));
        assert_ne!(t, r);
        assert_eq!(extras_digest(Some(&[])), 0);
        assert_eq!(extras_digest(None), 0);
    }
}
