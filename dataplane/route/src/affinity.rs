//! The prefix affinity table: which endpoints recently served which prompt blocks.
//!
//! A block is identified by its chained hash (it covers every byte of the prompt before it,
//! see `blocks.rs`), so "endpoint E served block B" means E has seen the whole prompt prefix
//! up to B and likely still holds its KV cache.
//!
//! The table is shared by every worker thread and lock-free: a fixed array of atomics,
//! allocated once, set-associative (a block's hash picks a bucket of [`WAYS`] slots; keys of
//! a bucket share one cache line, each slot's owners another). Memory is bounded by
//! construction: nothing grows and nothing is freed, so no reclamation scheme is needed. A
//! full bucket evicts its least recently used slot, deeper blocks first on ties, which keeps
//! hot prefixes (a system prompt is touched by every request) and drops cold tails.
//!
//! Each block also counts its continuations: how many distinct next blocks were recorded after
//! it. A block with two or more is a branch point, so it and every block before it in the
//! chain are a prefix several prompts share (a system prompt, a popular document); a lookup
//! reports how far that shared prefix reaches (`Matches::shared`), which lets a policy tell a
//! conversation's own history from what everyone holds, from the table alone.
//!
//! Endpoints are known by a small id and a generation; removing an endpoint bumps its
//! generation, which makes its entries invisible at once ([`AffinityTable::purge`] then
//! reclaims their slots). Timestamps are passed in (`now`, in milliseconds), never read here.
//! Not here: deciding anything (policies do), or hashing prompts (`blocks.rs`).

use std::collections::HashMap;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU16, AtomicU32, AtomicU64, Ordering};

/// Slots per bucket.
pub const WAYS: usize = 8;
/// Endpoints remembered per block.
pub const OWNERS: usize = 7;
/// Bytes the table spends per slot (its key and its owner line).
pub const SLOT_BYTES: usize = 8 + 64;
/// Candidates a lookup can follow at once.
pub const MAX_CANDIDATES: usize = 256;

const EMPTY: u64 = 0;
const BUSY: u64 = 1;

/// How big the table may be; the smaller bound wins.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AffinityLimits {
    pub max_entries: usize,
    pub max_bytes: usize,
    /// Endpoint ids available (at most 65535).
    pub max_endpoints: usize,
}

/// An endpoint as the table knows it. Tags of removed endpoints never match again.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct EndpointTag {
    id: u16,
    generation: u16,
}

impl EndpointTag {
    fn owner(self, now: u32) -> u64 {
        (u64::from(self.id) << 48) | (u64::from(self.generation) << 32) | u64::from(now)
    }

    fn is_owner(self, owner: u64) -> bool {
        owner >> 32 == (u64::from(self.id) << 16 | u64::from(self.generation))
    }
}

fn owner_time(owner: u64) -> u32 {
    owner as u32
}

fn owner_tag(owner: u64) -> EndpointTag {
    EndpointTag {
        id: (owner >> 48) as u16,
        generation: (owner >> 32) as u16,
    }
}

#[repr(C, align(64))]
struct Keys([AtomicU64; WAYS]);

#[repr(C, align(64))]
struct Owners {
    /// Last use (the caller's milliseconds).
    last_use: AtomicU32,
    /// Block index in its prompt (saturating).
    depth: AtomicU16,
    /// Distinct next blocks recorded after this one (saturating).
    children: AtomicU16,
    owners: [AtomicU64; OWNERS],
}

/// What a lookup found besides the per-endpoint matches.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Matches {
    /// Leading blocks of the prompt that several prompts share: up to and including the
    /// deepest matched block with two or more continuations (0: none known).
    pub shared: u32,
}

/// Counts for metrics.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct AffinityStats {
    /// Slots holding a block.
    pub entries: u64,
    /// Slots available.
    pub capacity: u64,
    /// Memory the table holds, in bytes.
    pub bytes: u64,
    /// Blocks pushed out to make room, since start.
    pub evictions: u64,
}

struct Registry {
    ids: HashMap<String, EndpointTag>,
    free: Vec<u16>,
    next: u16,
}

pub struct AffinityTable {
    keys: Box<[Keys]>,
    slots: Box<[Owners]>,
    buckets: usize,
    generations: Box<[AtomicU16]>,
    registry: Mutex<Registry>,
    entries: AtomicU64,
    evictions: AtomicU64,
}

fn mix_key(hash: u64) -> u64 {
    if hash <= BUSY {
        hash ^ 0x9e37_79b9_7f4a_7c15
    } else {
        hash
    }
}

/// Ages compare across the 32-bit clock's wrap (about 49 days of milliseconds).
fn age(now: u32, then: u32) -> u32 {
    now.wrapping_sub(then)
}

impl AffinityTable {
    pub fn new(limits: AffinityLimits) -> Self {
        let slots = limits.max_entries.min(limits.max_bytes / SLOT_BYTES).max(WAYS);
        let buckets = (slots / WAYS).max(1);
        let max_endpoints = limits.max_endpoints.clamp(1, u16::MAX as usize);
        Self {
            keys: (0..buckets)
                .map(|_| Keys(std::array::from_fn(|_| AtomicU64::new(EMPTY))))
                .collect(),
            slots: (0..buckets * WAYS)
                .map(|_| Owners {
                    last_use: AtomicU32::new(0),
                    depth: AtomicU16::new(0),
                    children: AtomicU16::new(0),
                    owners: std::array::from_fn(|_| AtomicU64::new(0)),
                })
                .collect(),
            buckets,
            generations: (0..=max_endpoints).map(|_| AtomicU16::new(0)).collect(),
            registry: Mutex::new(Registry {
                ids: HashMap::new(),
                free: Vec::new(),
                next: 1,
            }),
            entries: AtomicU64::new(0),
            evictions: AtomicU64::new(0),
        }
    }

    pub fn capacity(&self) -> usize {
        self.slots.len()
    }

    /// Memory held: keys and owner lines.
    pub fn bytes(&self) -> usize {
        std::mem::size_of_val(&*self.keys) + std::mem::size_of_val(&*self.slots)
    }

    pub fn stats(&self) -> AffinityStats {
        AffinityStats {
            entries: self.entries.load(Ordering::Relaxed),
            capacity: self.capacity() as u64,
            bytes: self.bytes() as u64,
            evictions: self.evictions.load(Ordering::Relaxed),
        }
    }

    fn registry(&self) -> std::sync::MutexGuard<'_, Registry> {
        self.registry.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The tag of the endpoint `name` (its URL), registering it if new. `None` when every
    /// id is taken: that endpoint is then routed without affinity.
    pub fn register(&self, name: &str) -> Option<EndpointTag> {
        let mut r = self.registry();
        if let Some(t) = r.ids.get(name) {
            return Some(*t);
        }
        let id = match r.free.pop() {
            Some(id) => id,
            None if (r.next as usize) < self.generations.len() => {
                r.next += 1;
                r.next - 1
            }
            None => return None,
        };
        let tag = EndpointTag {
            id,
            generation: self.generations[id as usize].load(Ordering::Acquire),
        };
        r.ids.insert(name.to_owned(), tag);
        Some(tag)
    }

    /// Forgets every endpoint not in `live`: their entries stop matching at once. Returns
    /// how many were retired (their slots are reclaimed by [`purge`](Self::purge)).
    pub fn retain_endpoints(&self, live: impl Fn(&str) -> bool) -> usize {
        let mut r = self.registry();
        let gone: Vec<String> = r.ids.keys().filter(|n| !live(n)).cloned().collect();
        for name in &gone {
            if let Some(tag) = r.ids.remove(name) {
                self.generations[tag.id as usize].fetch_add(1, Ordering::AcqRel);
                r.free.push(tag.id);
            }
        }
        gone.len()
    }

    fn live(&self, owner: u64) -> bool {
        let tag = owner_tag(owner);
        owner != 0
            && self
                .generations
                .get(tag.id as usize)
                .is_some_and(|g| g.load(Ordering::Relaxed) == tag.generation)
    }

    /// Maps a (well mixed) hash onto `0..buckets` without a division: the high half of
    /// the 128-bit product.
    fn bucket(&self, key: u64) -> usize {
        ((u128::from(key) * self.buckets as u128) >> 64) as usize
    }

    /// The slot holding `key`, if any. Waits out a slot being filled in (a few stores).
    fn find(&self, key: u64) -> Option<usize> {
        let b = self.bucket(key);
        let ways = &self.keys[b].0;
        for _ in 0..64 {
            let mut busy = false;
            for (w, k) in ways.iter().enumerate() {
                match k.load(Ordering::Acquire) {
                    found if found == key => return Some(b * WAYS + w),
                    BUSY => busy = true,
                    _ => {}
                }
            }
            if !busy {
                return None;
            }
            std::hint::spin_loop();
        }
        None
    }

    /// Records that `who` served the prompt whose blocks are `blocks` (in order), at `now`.
    /// A block seen for the first time counts as a new continuation of the block before it.
    pub fn record(&self, blocks: &[u64], who: EndpointTag, now: u32) {
        let mut parent: Option<usize> = None;
        for (depth, &hash) in blocks.iter().enumerate() {
            let key = mix_key(hash);
            let slot = match self.find(key) {
                Some(s) => s,
                None => match self.claim(key, depth, now) {
                    Some(s) => {
                        if let Some(p) = parent {
                            let children = &self.slots[p].children;
                            let _ = children.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |c| c.checked_add(1));
                        }
                        s
                    }
                    None => {
                        parent = None;
                        continue;
                    }
                },
            };
            self.add_owner(slot, who, now);
            parent = Some(slot);
        }
    }

    /// Of `candidates`, the one that served the block `hash` most recently (by `now`'s
    /// clock), if any did: where a session's last request went, when `hash` names the
    /// session.
    pub fn latest(&self, hash: u64, candidates: &[Option<EndpointTag>], now: u32) -> Option<usize> {
        let key = mix_key(hash);
        let slot = self.find(key)?;
        let s = &self.slots[slot];
        let owners: [u64; OWNERS] = std::array::from_fn(|k| s.owners[k].load(Ordering::Relaxed));
        if self.keys[slot / WAYS].0[slot % WAYS].load(Ordering::Acquire) != key {
            return None;
        }
        let mut best: Option<(u32, usize)> = None;
        for (i, c) in candidates.iter().enumerate() {
            let Some(tag) = c else { continue };
            if !self.live(tag.owner(0)) {
                continue;
            }
            for &o in &owners {
                if o != 0 && tag.is_owner(o) {
                    let a = age(now, owner_time(o));
                    if best.is_none_or(|(ba, _)| a < ba) {
                        best = Some((a, i));
                    }
                }
            }
        }
        best.map(|(_, i)| i)
    }

    /// Takes a slot for `key`: an empty one, else the bucket's least recently used.
    fn claim(&self, key: u64, depth: usize, now: u32) -> Option<usize> {
        let b = self.bucket(key);
        let ways = &self.keys[b].0;
        for _ in 0..8 {
            // Another thread may have claimed the same key meanwhile.
            if let Some(s) = self.find(key) {
                return Some(s);
            }
            let mut victim: Option<(usize, u64, (u32, usize))> = None;
            for (w, k) in ways.iter().enumerate() {
                let current = k.load(Ordering::Acquire);
                if current == EMPTY {
                    victim = Some((w, EMPTY, (u32::MAX, usize::MAX)));
                    break;
                }
                if current == BUSY {
                    continue;
                }
                let slot = &self.slots[b * WAYS + w];
                let rank = (
                    age(now, slot.last_use.load(Ordering::Relaxed)),
                    usize::from(slot.depth.load(Ordering::Relaxed)),
                );
                if victim.is_none_or(|(_, _, r)| rank > r) {
                    victim = Some((w, current, rank));
                }
            }
            let (w, expected, _) = victim?;
            if ways[w]
                .compare_exchange(expected, BUSY, Ordering::AcqRel, Ordering::Relaxed)
                .is_err()
            {
                continue;
            }
            let slot = &self.slots[b * WAYS + w];
            for o in &slot.owners {
                o.store(0, Ordering::Relaxed);
            }
            slot.last_use.store(now, Ordering::Relaxed);
            slot.depth.store(depth.min(u16::MAX as usize) as u16, Ordering::Relaxed);
            slot.children.store(0, Ordering::Relaxed);
            ways[w].store(key, Ordering::Release);
            if expected == EMPTY {
                self.entries.fetch_add(1, Ordering::Relaxed);
            } else {
                self.evictions.fetch_add(1, Ordering::Relaxed);
            }
            return Some(b * WAYS + w);
        }
        None
    }

    fn add_owner(&self, slot: usize, who: EndpointTag, now: u32) {
        let s = &self.slots[slot];
        s.last_use.store(now, Ordering::Relaxed);
        let fresh = who.owner(now);
        for _ in 0..4 {
            let mut oldest: Option<(usize, u64, u32)> = None;
            for (i, o) in s.owners.iter().enumerate() {
                let current = o.load(Ordering::Relaxed);
                if current != 0 && who.is_owner(current) {
                    if current != fresh {
                        o.store(fresh, Ordering::Relaxed);
                    }
                    return;
                }
                // Empty or dead owners go first, then the least recently used.
                let a = if current == 0 || !self.live(current) {
                    u32::MAX
                } else {
                    age(now, owner_time(current))
                };
                if oldest.is_none_or(|(_, _, oa)| a > oa) {
                    oldest = Some((i, current, a));
                }
            }
            let Some((i, current, _)) = oldest else { return };
            if s.owners[i]
                .compare_exchange(current, fresh, Ordering::AcqRel, Ordering::Relaxed)
                .is_ok()
            {
                return;
            }
        }
    }

    /// For each candidate, how many leading `blocks` it served (its longest cached prefix),
    /// written to `out[i]`, and how far the prefix shared by several prompts reaches. Stops as
    /// soon as no candidate still matches; allocates nothing. Candidates beyond
    /// [`MAX_CANDIDATES`] get 0.
    pub fn matched(&self, blocks: &[u64], candidates: &[Option<EndpointTag>], out: &mut [u32]) -> Matches {
        let mut found = Matches::default();
        let n = candidates.len().min(out.len()).min(MAX_CANDIDATES);
        out.iter_mut().for_each(|o| *o = 0);
        let mut still = [0u64; MAX_CANDIDATES / 64];
        let mut any = false;
        for (i, c) in candidates.iter().take(n).enumerate() {
            // A tag of a removed endpoint matches nothing, whatever the slots still say.
            if c.is_some_and(|tag| self.live(tag.owner(0))) {
                still[i / 64] |= 1 << (i % 64);
                any = true;
            }
        }
        for (depth, &hash) in blocks.iter().enumerate() {
            if !any {
                break;
            }
            let key = mix_key(hash);
            let mut present = [0u64; MAX_CANDIDATES / 64];
            if let Some(slot) = self.find(key) {
                let s = &self.slots[slot];
                let owners: [u64; OWNERS] = std::array::from_fn(|k| s.owners[k].load(Ordering::Relaxed));
                // The slot may have been given to another block while we read it.
                let children = s.children.load(Ordering::Relaxed);
                if self.keys[slot / WAYS].0[slot % WAYS].load(Ordering::Acquire) == key {
                    if children >= 2 {
                        found.shared = depth as u32 + 1;
                    }
                    // Only candidates still matching are looked at: usually one or two.
                    for (word, bits) in still.iter().enumerate() {
                        let mut bits = *bits;
                        while bits != 0 {
                            let i = word * 64 + bits.trailing_zeros() as usize;
                            bits &= bits - 1;
                            if let Some(tag) = candidates[i]
                                && owners.iter().any(|&o| o != 0 && tag.is_owner(o))
                            {
                                present[word] |= 1 << (i % 64);
                            }
                        }
                    }
                }
            }
            any = false;
            for (word, (s, p)) in still.iter_mut().zip(present).enumerate() {
                let ended = *s & !p;
                let mut bits = ended;
                while bits != 0 {
                    let i = word * 64 + bits.trailing_zeros() as usize;
                    out[i] = depth as u32;
                    bits &= bits - 1;
                }
                *s &= p;
                any |= *s != 0;
            }
        }
        for (word, s) in still.iter().enumerate() {
            let mut bits = *s;
            while bits != 0 {
                let i = word * 64 + bits.trailing_zeros() as usize;
                out[i] = blocks.len() as u32;
                bits &= bits - 1;
            }
        }
        found
    }

    /// Clears owners that are no longer live and frees slots left without one. Linear in the
    /// table's size; run it off the request path after endpoints are removed.
    pub fn purge(&self) -> usize {
        let mut freed = 0;
        for (b, keys) in self.keys.iter().enumerate() {
            for (w, k) in keys.0.iter().enumerate() {
                let key = k.load(Ordering::Acquire);
                if key == EMPTY || key == BUSY {
                    continue;
                }
                let s = &self.slots[b * WAYS + w];
                let mut alive = false;
                for o in &s.owners {
                    let current = o.load(Ordering::Relaxed);
                    if current == 0 {
                        continue;
                    }
                    if self.live(current) {
                        alive = true;
                    } else {
                        let _ = o.compare_exchange(current, 0, Ordering::AcqRel, Ordering::Relaxed);
                    }
                }
                if !alive
                    && k.compare_exchange(key, EMPTY, Ordering::AcqRel, Ordering::Relaxed)
                        .is_ok()
                {
                    self.entries.fetch_sub(1, Ordering::Relaxed);
                    freed += 1;
                }
            }
        }
        freed
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn table(max_entries: usize) -> AffinityTable {
        AffinityTable::new(AffinityLimits {
            max_entries,
            max_bytes: usize::MAX,
            max_endpoints: 64,
        })
    }

    fn chain(seed: u64, n: usize) -> Vec<u64> {
        let mut parent = seed;
        (0..n)
            .map(|i| {
                parent = xxhash_rust::xxh3::xxh3_64_with_seed(&(i as u64).to_le_bytes(), parent);
                parent
            })
            .collect()
    }

    #[test]
    fn finds_the_longest_prefix_each_endpoint_served() {
        let t = table(4096);
        let a = t.register("http://a:1");
        let b = t.register("http://b:1");
        let c = t.register("http://c:1");
        let prompt = chain(1, 10);
        t.record(&prompt[..6], a.unwrap(), 10);
        t.record(&prompt[..3], b.unwrap(), 10);
        let mut out = [0u32; 3];
        t.matched(&prompt, &[a, b, c], &mut out);
        assert_eq!(out, [6, 3, 0]);
        // A prompt that diverges after 2 blocks shares only those.
        let mut other = prompt[..2].to_vec();
        other.extend(chain(99, 5));
        t.matched(&other, &[a, b, c], &mut out);
        assert_eq!(out, [2, 2, 0]);
    }

    #[test]
    fn a_prefix_several_prompts_continue_is_shared() {
        let t = table(4096);
        let a = t.register("a");
        let system = chain(3, 4);
        let with = |user: u64, len: usize| {
            let mut p = system.clone();
            p.extend(chain(100 + user, len));
            p
        };
        let mut out = [0u32; 1];
        // One conversation: nothing is shared yet, its later rounds extend it.
        t.record(&with(1, 2), a.unwrap(), 1);
        t.record(&with(1, 5), a.unwrap(), 2);
        assert_eq!(t.matched(&with(1, 6), &[a], &mut out).shared, 0);
        assert_eq!(out, [9]);
        // A second conversation after the same system prompt: the system prompt is shared.
        t.record(&with(2, 3), a.unwrap(), 3);
        assert_eq!(t.matched(&with(1, 6), &[a], &mut out).shared, 4);
        assert_eq!(t.matched(&with(3, 6), &[a], &mut out).shared, 4);
        assert_eq!(out, [4]);
        // Repeating a prompt adds no continuation.
        t.record(&with(2, 3), a.unwrap(), 4);
        assert_eq!(t.matched(&with(2, 3), &[a], &mut out).shared, 4);
    }

    #[test]
    fn the_latest_owner_of_a_block_is_known() {
        let t = table(4096);
        let tags: Vec<Option<EndpointTag>> = (0..3).map(|i| t.register(&format!("e{i}"))).collect();
        let session = 0xfeed_u64;
        assert_eq!(t.latest(session, &tags, 5), None);
        t.record(&[session], tags[1].unwrap(), 10);
        t.record(&[session], tags[2].unwrap(), 20);
        assert_eq!(t.latest(session, &tags, 30), Some(2));
        t.record(&[session], tags[1].unwrap(), 40);
        assert_eq!(t.latest(session, &tags, 50), Some(1));
        // Only candidates count.
        assert_eq!(t.latest(session, &tags[..1], 50), None);
    }

    #[test]
    fn removed_endpoints_never_match_and_their_slots_come_back() {
        let t = table(4096);
        let a = t.register("http://a:1").unwrap();
        let prompt = chain(7, 20);
        t.record(&prompt, a, 1);
        assert_eq!(t.stats().entries, 20);
        assert_eq!(t.retain_endpoints(|n| n != "http://a:1"), 1);
        let mut out = [0u32; 1];
        t.matched(&prompt, &[Some(a)], &mut out);
        assert_eq!(out, [0]);
        assert_eq!(t.purge(), 20);
        assert_eq!(t.stats().entries, 0);
        // Its id is reused with a new generation: the old tag still does not match.
        let a2 = t.register("http://a2:1").unwrap();
        assert_ne!(a, a2);
        t.record(&prompt, a2, 2);
        t.matched(&prompt, &[Some(a)], &mut out);
        assert_eq!(out, [0]);
    }

    #[test]
    fn hot_prefixes_survive_pressure() {
        // 2 buckets of 8 slots: 16 slots in all.
        let t = table(16);
        let a = t.register("a").unwrap();
        let shared = chain(5, 2);
        for round in 0..200u32 {
            let mut prompt = shared.clone();
            prompt.extend(chain(1000 + u64::from(round), 3));
            t.record(&prompt, a, round);
        }
        let mut out = [0u32; 1];
        t.matched(&shared, &[Some(a)], &mut out);
        assert_eq!(out, [2], "the shared prefix was evicted");
        assert!(t.stats().evictions > 0);
        assert!(t.stats().entries <= 16);
    }

    #[test]
    fn size_follows_the_limits() {
        let t = AffinityTable::new(AffinityLimits {
            max_entries: 1 << 20,
            max_bytes: 8 << 20,
            max_endpoints: 16,
        });
        assert!(t.bytes() <= 8 << 20, "{}", t.bytes());
        assert!(t.capacity() * SLOT_BYTES <= 8 << 20);
        assert!(t.capacity() + WAYS > (8 << 20) / SLOT_BYTES, "{}", t.capacity());
    }

    #[test]
    fn concurrent_inserts_lose_nothing_that_fits() {
        let t = std::sync::Arc::new(table(1 << 16));
        let tags: Vec<EndpointTag> = (0..8).map(|i| t.register(&format!("e{i}")).unwrap()).collect();
        let prompts: Vec<Vec<u64>> = (0..8).map(|i| chain(i, 200)).collect();
        std::thread::scope(|s| {
            for (i, tag) in tags.iter().enumerate() {
                let t = &t;
                let prompts = &prompts;
                s.spawn(move || {
                    // Each thread records its own prompt, and the first seven (as many as
                    // a block remembers) the shared one too.
                    for round in 0..20 {
                        t.record(&prompts[i], *tag, round);
                        if i < OWNERS {
                            t.record(&prompts[0][..50], *tag, round);
                        }
                    }
                });
            }
        });
        let candidates: Vec<Option<EndpointTag>> = tags.iter().copied().map(Some).collect();
        let mut out = vec![0u32; 8];
        for (i, p) in prompts.iter().enumerate().skip(1) {
            t.matched(p, &candidates, &mut out);
            assert_eq!(out[i], 200, "endpoint {i} lost blocks of its prompt");
        }
        t.matched(&prompts[0][..50], &candidates, &mut out);
        assert!(
            out[..OWNERS].iter().all(|&m| m == 50),
            "{out:?}: the shared prefix lost owners"
        );
    }

    proptest! {
        /// Whatever is inserted, the table holds no more entries than its capacity, and a
        /// lookup reports only live endpoints.
        #[test]
        fn bounded_and_live_only(
            ops in prop::collection::vec((0u64..50, 1usize..40, 0usize..6, any::<bool>()), 1..120),
        ) {
            let t = table(64);
            let tags: Vec<EndpointTag> = (0..6).map(|i| t.register(&format!("e{i}")).unwrap()).collect();
            let mut removed = [false; 6];
            for (step, (seed, len, who, remove)) in ops.into_iter().enumerate() {
                if remove && who > 0 {
                    t.retain_endpoints(|n| n != format!("e{who}"));
                    removed[who] = true;
                } else if !removed[who] {
                    t.record(&chain(seed, len), tags[who], step as u32);
                }
                let s = t.stats();
                prop_assert!(s.entries <= s.capacity, "{s:?}");
                prop_assert_eq!(s.bytes as usize, t.bytes());
                let candidates: Vec<Option<EndpointTag>> = tags.iter().copied().map(Some).collect();
                let mut out = [0u32; 6];
                t.matched(&chain(seed, len), &candidates, &mut out);
                for (i, m) in out.iter().enumerate() {
                    prop_assert!(!removed[i] || *m == 0, "removed endpoint {} matched {} blocks", i, m);
                }
            }
        }
    }
}
