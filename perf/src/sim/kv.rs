//! The simulated KV block pool with prefix caching, after vLLM's: full prompt blocks are
//! identified by chained hashes (a block's hash covers every token before it, and the
//! request's extra keys), blocks that no running request holds stay cached until evicted in
//! LRU order, and a request's blocks are freed tail first so that the shared head of a
//! prompt outlives its private tail. The hashes are the simulator's own (xxh3): equal only
//! within one simulator, as vLLM's are within one engine.

use std::collections::{BTreeMap, HashMap};

use xxhash_rust::xxh3::Xxh3;

/// What makes a request's blocks differ beyond their tokens, as vLLM hashes them: the LoRA
/// adapter (every block) and the cache salt (the first block only).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct BlockExtras {
    pub lora_name: Option<String>,
    pub cache_salt: Option<String>,
}

impl BlockExtras {
    /// Block `i`'s extra keys, in the order vLLM publishes them: the LoRA name, then the salt
    /// (an empty salt is no salt, as in vLLM).
    pub fn keys(&self, i: usize) -> Vec<&str> {
        let salt = self.cache_salt.as_deref().filter(|s| i == 0 && !s.is_empty());
        self.lora_name.as_deref().into_iter().chain(salt).collect()
    }
}

/// Chained hashes of the full blocks of `tokens`, each over its parent's hash, its extra
/// keys and its tokens.
pub fn block_hashes(tokens: &[u32], block_size: usize, extras: &BlockExtras) -> Vec<u64> {
    let mut parent = 0u64;
    tokens
        .chunks_exact(block_size)
        .enumerate()
        .map(|(i, block)| {
            let mut h = Xxh3::new();
            h.update(&parent.to_le_bytes());
            for key in extras.keys(i) {
                h.update(&(key.len() as u64).to_le_bytes());
                h.update(key.as_bytes());
            }
            for t in block {
                h.update(&t.to_le_bytes());
            }
            parent = h.digest();
            parent
        })
        .collect()
}

#[derive(Debug)]
struct Block {
    refs: u32,
    /// LRU position while `refs == 0`.
    tick: u64,
}

/// What admitting a request did to the pool.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Allocation {
    /// Leading prompt blocks found in the cache.
    pub hit_blocks: usize,
    /// The cached blocks evicted to make room, in eviction order.
    pub evicted: Vec<u64>,
}

#[derive(Debug)]
pub struct BlockPool {
    capacity: usize,
    blocks: HashMap<u64, Block>,
    /// Cached blocks no request holds, oldest first.
    lru: BTreeMap<u64, u64>,
    /// Blocks held for decoding (not cacheable).
    anonymous: usize,
    tick: u64,
}

impl BlockPool {
    pub fn new(capacity: usize) -> Self {
        Self {
            capacity,
            blocks: HashMap::new(),
            lru: BTreeMap::new(),
            anonymous: 0,
            tick: 0,
        }
    }

    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// Blocks held by running requests (what vLLM reports as KV usage).
    pub fn in_use(&self) -> usize {
        self.blocks.len() - self.lru.len() + self.anonymous
    }

    /// Cached blocks nobody holds (reclaimable).
    pub fn cached_free(&self) -> usize {
        self.lru.len()
    }

    /// Leading blocks of `hashes` present in the cache.
    pub fn cached_prefix(&self, hashes: &[u64]) -> usize {
        hashes.iter().take_while(|h| self.blocks.contains_key(h)).count()
    }

    /// Whether `hashes` (at most `usable` of them counted as hits) plus `anonymous` decode
    /// blocks fit now, evicting unheld cached blocks if needed.
    pub fn fits(&self, hashes: &[u64], usable_hits: usize, anonymous: usize) -> bool {
        let hits = self.cached_prefix(hashes).min(usable_hits);
        let new = hashes.len() - hits + anonymous;
        // Hit blocks that sit in the LRU are about to be held, so they cannot be evicted.
        let pinned_hits = hashes[..hits]
            .iter()
            .filter(|h| self.blocks.get(*h).is_some_and(|b| b.refs == 0))
            .count();
        self.in_use() + pinned_hits + new <= self.capacity
    }

    /// Holds the blocks of a request: its cached prefix (up to `usable_hits` blocks), new
    /// blocks for the rest of its prompt, and `anonymous` decode blocks. The caller checked
    /// [`fits`](Self::fits).
    pub fn allocate(&mut self, hashes: &[u64], usable_hits: usize, anonymous: usize) -> Allocation {
        let hits = self.cached_prefix(hashes).min(usable_hits);
        for h in &hashes[..hits] {
            self.hold(*h);
        }
        let mut evicted = Vec::new();
        let needed = hashes.len() - hits + anonymous;
        while self.blocks.len() + self.anonymous + needed > self.capacity {
            let Some((_, victim)) = self.lru.pop_first() else {
                break;
            };
            self.blocks.remove(&victim);
            evicted.push(victim);
        }
        for h in &hashes[hits..] {
            // A block may already exist past a missing one (a hash chain shares no middle),
            // or appear twice in one prompt's chain only with equal parents; hold it anyway.
            if self.blocks.contains_key(h) {
                self.hold(*h);
            } else {
                self.blocks.insert(*h, Block { refs: 1, tick: 0 });
            }
        }
        self.anonymous += anonymous;
        Allocation {
            hit_blocks: hits,
            evicted,
        }
    }

    fn hold(&mut self, h: u64) {
        if let Some(b) = self.blocks.get_mut(&h) {
            if b.refs == 0 {
                self.lru.remove(&b.tick);
            }
            b.refs += 1;
        }
    }

    /// Releases a request's blocks: tail first, so the head of the prompt is evicted last.
    pub fn release(&mut self, hashes: &[u64], anonymous: usize) {
        for h in hashes.iter().rev() {
            if let Some(b) = self.blocks.get_mut(h) {
                b.refs = b.refs.saturating_sub(1);
                if b.refs == 0 {
                    self.tick += 1;
                    b.tick = self.tick;
                    self.lru.insert(self.tick, *h);
                }
            }
        }
        self.anonymous = self.anonymous.saturating_sub(anonymous);
    }

    /// Drops every cached block, as vLLM's `reset_prefix_cache`: only when no request holds
    /// any block (false, and nothing changed, otherwise).
    pub fn reset(&mut self) -> bool {
        if self.in_use() > 0 {
            return false;
        }
        self.blocks.clear();
        self.lru.clear();
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn tokens(range: std::ops::Range<u32>) -> Vec<u32> {
        range.collect()
    }

    fn block_hashes(tokens: &[u32], block_size: usize) -> Vec<u64> {
        super::block_hashes(tokens, block_size, &BlockExtras::default())
    }

    #[test]
    fn hashes_chain_over_the_prefix() {
        let a = block_hashes(&tokens(0..64), 16);
        let b = block_hashes(&[tokens(0..32), tokens(100..132)].concat(), 16);
        assert_eq!(a.len(), 4);
        assert_eq!(a[..2], b[..2]);
        assert_ne!(a[2], b[2]);
        // A partial tail block is not hashed.
        assert_eq!(block_hashes(&tokens(0..70), 16).len(), 4);
    }

    #[test]
    fn a_released_prompt_is_a_hit_next_time() {
        let mut pool = BlockPool::new(100);
        let h = block_hashes(&tokens(0..160), 16);
        assert!(pool.fits(&h, usize::MAX, 2));
        assert_eq!(pool.allocate(&h, usize::MAX, 2).hit_blocks, 0);
        assert_eq!(pool.in_use(), 12);
        pool.release(&h, 2);
        assert_eq!(pool.in_use(), 0);
        assert_eq!(pool.cached_free(), 10);
        assert_eq!(pool.allocate(&h, 9, 0).hit_blocks, 9);
    }

    #[test]
    fn eviction_takes_the_least_recent_tail_first() {
        let mut pool = BlockPool::new(4);
        let a = block_hashes(&tokens(0..64), 16);
        pool.allocate(&a, usize::MAX, 0);
        pool.release(&a, 0);
        let b = block_hashes(&tokens(1000..1032), 16);
        let alloc = pool.allocate(&b, usize::MAX, 0);
        assert_eq!(alloc.evicted, [a[3], a[2]]);
        // The head of `a` survived, its tail went.
        assert_eq!(pool.cached_prefix(&a), 2);
    }

    #[test]
    fn a_salt_changes_the_first_block_and_so_every_block() {
        let t = tokens(0..48);
        let plain = block_hashes(&t, 16);
        let salted = |salt: &str| {
            let extras = BlockExtras {
                cache_salt: Some(salt.to_owned()),
                ..Default::default()
            };
            super::block_hashes(&t, 16, &extras)
        };
        let (a, b) = (salted("a"), salted("b"));
        assert!(plain.iter().zip(&a).all(|(p, s)| p != s));
        assert!(a.iter().zip(&b).all(|(x, y)| x != y));
        assert_eq!(salted(""), plain, "an empty salt is no salt");
        let lora = BlockExtras {
            lora_name: Some("sql".into()),
            cache_salt: Some("a".into()),
        };
        assert_eq!(lora.keys(0), ["sql", "a"]);
        assert_eq!(lora.keys(1), ["sql"]);
    }

    #[test]
    fn a_reset_drops_the_cache_only_when_nothing_is_held() {
        let mut pool = BlockPool::new(10);
        let a = block_hashes(&tokens(0..32), 16);
        pool.allocate(&a, usize::MAX, 1);
        assert!(!pool.reset());
        assert_eq!(pool.cached_prefix(&a), 2);
        pool.release(&a, 1);
        assert!(pool.reset());
        assert_eq!(pool.cached_prefix(&a), 0);
        assert_eq!((pool.in_use(), pool.cached_free()), (0, 0));
    }

    #[test]
    fn held_blocks_are_never_evicted() {
        let mut pool = BlockPool::new(4);
        let a = block_hashes(&tokens(0..64), 16);
        pool.allocate(&a, usize::MAX, 0);
        let b = block_hashes(&tokens(1000..1016), 16);
        assert!(!pool.fits(&b, usize::MAX, 0));
    }

    proptest! {
        /// Whatever requests come and go, the pool never holds more than its capacity and
        /// ends empty of held blocks.
        #[test]
        fn capacity_holds(reqs in prop::collection::vec((0u32..6, 1usize..6, 0usize..3), 1..60)) {
            let mut pool = BlockPool::new(24);
            let mut live: Vec<(Vec<u64>, usize)> = Vec::new();
            for (i, (prefix, blocks, anon)) in reqs.into_iter().enumerate() {
                let t: Vec<u32> = (0..blocks as u32 * 16).map(|k| if k < 32 { prefix * 1000 + k } else { i as u32 * 100_000 + k }).collect();
                let h = block_hashes(&t, 16);
                if pool.fits(&h, usize::MAX, anon) {
                    pool.allocate(&h, usize::MAX, anon);
                    live.push((h, anon));
                } else if let Some((h, a)) = live.pop() {
                    pool.release(&h, a);
                }
                prop_assert!(pool.blocks.len() + pool.anonymous <= pool.capacity());
            }
            for (h, a) in live.drain(..) {
                pool.release(&h, a);
            }
            prop_assert_eq!(pool.in_use(), 0);
        }
    }
}
