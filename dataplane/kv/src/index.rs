//! Per engine, the blocks it holds, as its KV events say, kept from going stale.
//!
//! Two halves, one per side:
//! - [`Held`], shared with the router's workers (lock-free reads): the set of block keys the
//!   engine holds, its block size, and whether routing may trust it now (`fresh`).
//! - [`EngineIndex`], owned by whoever consumes the engine's events: vLLM's block hashes
//!   mapped to lmstack's keys, per data-parallel rank (each rank publishes its own sequence),
//!   and the rules that keep the set true:
//!   - a sequence gap means lost events, removals among them: that rank's blocks are dropped
//!     (unless the caller replays the gap first) and counted as a resync;
//!   - a sequence that goes backwards is a new publisher, a restarted engine: dropped alike;
//!   - `AllBlocksCleared` (a cache reset) drops them too;
//!   - a stored block whose parent is unknown cannot be keyed (its chain is unknown) and is
//!     skipped.
//!
//!   So the set never holds more than the engine does. It may hold less: what the engine
//!   stored before the index saw it (a subscription to a running engine, a dropped rank;
//!   vLLM re-announces a reused prefix only for requests asking `kv_cache_report_mode:
//!   full`). The index says whether it is **complete** ([`Held::is_complete`]): it is when
//!   it has seen every batch since the engine's cache was last empty (a first sequence
//!   number of 0, `AllBlocksCleared`, an engine known to have served nothing). Otherwise it
//!   counts the blocks it may be missing, at most the engine's capacity, down by every
//!   eviction of a block it never saw: at 0 every such block is gone, and it is complete
//!   again. A caller treats an incomplete set as a lower bound.
//!
//!   A hard bound on blocks per engine holds memory: blocks past it are not indexed (and
//!   counted), which can only under-report what an engine holds.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicUsize, Ordering};

use crate::event::{Batch, BlockHash, Event, Removed, Stored};
use crate::key::{self, BlockKey};

/// What the router's workers read: one engine's blocks.
#[derive(Debug, Default)]
pub struct Held {
    set: papaya::HashSet<BlockKey>,
    blocks: AtomicUsize,
    block_size: AtomicU32,
    fresh: AtomicBool,
    complete: AtomicBool,
    clears: AtomicU64,
    last_event_ms: AtomicU64,
}

impl Held {
    /// How many of `keys` (a prompt's block keys, in order) the engine holds, counting from
    /// the first: what a request there would find cached.
    pub fn matched(&self, keys: &[BlockKey]) -> usize {
        let set = self.set.pin();
        keys.iter().take_while(|&k| set.contains(k)).count()
    }

    /// Blocks held now.
    pub fn blocks(&self) -> usize {
        self.blocks.load(Ordering::Relaxed)
    }

    /// The engine's block size in tokens, once known (from its events or its metrics).
    pub fn block_size(&self) -> Option<u32> {
        Some(self.block_size.load(Ordering::Relaxed)).filter(|&b| b > 0)
    }

    /// Whether routing may use this index now: its events are being received and it has
    /// not been found stale since.
    pub fn is_fresh(&self) -> bool {
        self.fresh.load(Ordering::Acquire)
    }

    /// Whether the set is all the engine holds (see the module's doc), not a lower bound.
    pub fn is_complete(&self) -> bool {
        self.complete.load(Ordering::Acquire)
    }

    /// How many times the index was dropped (gaps, restarts, resets).
    pub fn clears(&self) -> u64 {
        self.clears.load(Ordering::Relaxed)
    }

    /// When the last event batch was applied (milliseconds since the Unix epoch; 0: never).
    pub fn last_event_ms(&self) -> u64 {
        self.last_event_ms.load(Ordering::Relaxed)
    }

    /// Marks the index usable or not (the subscription is up, or lost).
    pub fn set_fresh(&self, fresh: bool) {
        self.fresh.store(fresh, Ordering::Release);
    }

    /// Forgets every block (the engine restarted, left, or its subscription was lost); the
    /// [`EngineIndex`] that fed it must be dropped with it.
    pub fn reset(&self) {
        self.set.pin().clear();
        self.blocks.store(0, Ordering::Relaxed);
        self.clears.fetch_add(1, Ordering::Relaxed);
    }

    /// Every key held now (a relay's full copy for a newly connected router).
    pub fn keys(&self) -> Vec<BlockKey> {
        self.set.pin().iter().copied().collect()
    }

    /// Applies changes relayed from another process's index (lmstack-control's): `added`
    /// and `removed` keys, and whether that index is complete.
    pub fn apply_relayed(&self, added: &[BlockKey], removed: &[BlockKey], complete: bool) {
        let set = self.set.pin();
        for k in added {
            set.insert(*k);
        }
        for k in removed {
            set.remove(k);
        }
        self.blocks.store(set.len(), Ordering::Relaxed);
        self.complete.store(complete, Ordering::Release);
    }

    /// Sets the block size learnt elsewhere (the engine's `cache_config_info`) until events
    /// say.
    pub fn set_block_size(&self, block_size: u32) {
        self.block_size.store(block_size, Ordering::Relaxed);
    }
}

/// The bound on one engine's index.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct IndexLimits {
    /// Blocks indexed per engine (all ranks); past it, stored blocks are not indexed.
    pub max_blocks: usize,
}

impl Default for IndexLimits {
    fn default() -> Self {
        Self { max_blocks: 262_144 }
    }
}

/// Why an engine's index (or one rank's part of it) was dropped.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ClearReason {
    /// A sequence gap: events were lost.
    Gap,
    /// The sequence went backwards: a new publisher (the engine restarted).
    Restart,
    /// `AllBlocksCleared`: the engine reset its cache.
    Reset,
    /// The engine's identity changed (its start time), or it left discovery, or its
    /// subscription was lost.
    Identity,
    /// Events came with a different block size.
    BlockSize,
}

impl ClearReason {
    pub const ALL: [ClearReason; 5] = [
        ClearReason::Gap,
        ClearReason::Restart,
        ClearReason::Reset,
        ClearReason::Identity,
        ClearReason::BlockSize,
    ];

    /// The metric label.
    pub fn as_str(self) -> &'static str {
        match self {
            ClearReason::Gap => "gap",
            ClearReason::Restart => "restart",
            ClearReason::Reset => "reset",
            ClearReason::Identity => "identity",
            ClearReason::BlockSize => "block_size",
        }
    }
}

/// Why an event (or part of one) was not applied.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Dropped {
    /// The index is at its bound.
    Bound,
    /// The stored block's parent is not indexed, so its key cannot be computed.
    Unchained,
    /// Another medium (a CPU or storage tier) or a cache group other than full attention.
    OtherTier,
    /// Token ids that do not fill the blocks announced.
    Malformed,
    /// An event type this release does not know.
    Unknown,
}

impl Dropped {
    pub const ALL: [Dropped; 5] = [
        Dropped::Bound,
        Dropped::Unchained,
        Dropped::OtherTier,
        Dropped::Malformed,
        Dropped::Unknown,
    ];

    /// The metric label.
    pub fn as_str(self) -> &'static str {
        match self {
            Dropped::Bound => "bound",
            Dropped::Unchained => "unchained",
            Dropped::OtherTier => "other_tier",
            Dropped::Malformed => "malformed",
            Dropped::Unknown => "unknown",
        }
    }
}

/// Where a batch's sequence number falls for its rank.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SeqCheck {
    /// The next one expected (or the first seen).
    InOrder,
    /// Batches `from..to` were lost.
    Gap { from: i64, to: i64 },
    /// Already applied: a replayed batch seen again live.
    Duplicate,
    /// Lower than expected and not a duplicate: a new publisher.
    Backwards,
}

/// Counts of what happened to the events, since the index was made.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct IndexStats {
    pub batches: u64,
    pub events_applied: u64,
    pub events_dropped: HashMap<Dropped, u64>,
    pub clears: HashMap<ClearReason, u64>,
    pub duplicates: u64,
}

#[derive(Debug, Default)]
struct Rank {
    /// (cache group, vLLM's hash) -> lmstack's key.
    by_hash: HashMap<(u32, BlockHash), BlockKey>,
    next_seq: Option<i64>,
    /// Sequence numbers below this were applied by a replay: seen live again, they are
    /// duplicates, not a restart.
    replayed_below: Option<i64>,
    /// Blocks the engine may hold that the index never saw (`None`: none, complete).
    unknown: Option<u64>,
    /// Blocks the engine stored that could not be keyed (their parent was unseen): held
    /// there, missing here, until evicted. Their children cannot be keyed either.
    unchained: HashSet<(u32, BlockHash)>,
}

/// Keys a set gained and lost, in order.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Changes {
    pub added: Vec<BlockKey>,
    pub removed: Vec<BlockKey>,
}

impl Changes {
    pub fn is_empty(&self) -> bool {
        self.added.is_empty() && self.removed.is_empty()
    }
}

/// One engine's index, fed with its event batches in the order they arrive.
#[derive(Debug)]
pub struct EngineIndex {
    held: Arc<Held>,
    limits: IndexLimits,
    ranks: HashMap<u32, Rank>,
    /// How many ranks hold each key (a key is in `held` while any does).
    refs: HashMap<BlockKey, u32>,
    stats: IndexStats,
    /// Blocks one rank's cache holds at most (what it may hold unseen).
    capacity: u64,
    /// Keys added to and removed from the set since [`EngineIndex::take_changes`], when
    /// recorded (a relay's deltas).
    changes: Option<Changes>,
    /// The engine was known to hold nothing when the index started.
    started_empty: bool,
}

impl EngineIndex {
    /// An index that publishes into `held` (made by the router, shared with its workers).
    pub fn new(held: Arc<Held>, limits: IndexLimits) -> Self {
        Self {
            held,
            limits,
            ranks: HashMap::new(),
            refs: HashMap::new(),
            stats: IndexStats::default(),
            capacity: limits.max_blocks as u64,
            started_empty: false,
            changes: None,
        }
    }

    /// Records the keys the set gains and loses from now on, for [`Self::take_changes`].
    pub fn record_changes(&mut self) {
        self.changes.get_or_insert_with(Changes::default);
    }

    /// The keys gained and lost since the last call (in order: a key may be in both).
    pub fn take_changes(&mut self) -> Changes {
        self.changes.as_mut().map(std::mem::take).unwrap_or_default()
    }

    /// Sets what one rank's cache holds at most, in blocks (vLLM's `num_gpu_blocks`), the
    /// most an incomplete index may be missing; the default is the index's bound.
    pub fn set_capacity(&mut self, blocks: u64) {
        self.capacity = blocks.max(1);
        for r in self.ranks.values_mut() {
            if let Some(n) = &mut r.unknown {
                *n = (*n).min(self.capacity);
            }
        }
    }

    /// Says the engine held nothing when the index started (it had served no request), so
    /// the index is complete until a batch shows events were missed.
    pub fn started_empty(&mut self) {
        self.started_empty = true;
        self.update_complete();
    }

    fn update_complete(&self) {
        let complete = if self.ranks.is_empty() {
            self.started_empty
        } else {
            self.ranks
                .values()
                .all(|r| r.unknown.is_none() && r.unchained.is_empty())
        };
        self.held.complete.store(complete, Ordering::Release);
    }

    pub fn held(&self) -> &Arc<Held> {
        &self.held
    }

    pub fn stats(&self) -> &IndexStats {
        &self.stats
    }

    /// Where `seq` falls for `rank`, before applying it (a caller with a replay socket asks
    /// for the gap first).
    pub fn check_seq(&self, rank: u32, seq: i64) -> SeqCheck {
        let Some(r) = self.ranks.get(&rank) else {
            return SeqCheck::InOrder;
        };
        match r.next_seq {
            None => SeqCheck::InOrder,
            Some(next) if seq == next => SeqCheck::InOrder,
            Some(next) if seq > next => SeqCheck::Gap { from: next, to: seq },
            Some(_) if r.replayed_below.is_some_and(|b| seq < b) => SeqCheck::Duplicate,
            Some(_) => SeqCheck::Backwards,
        }
    }

    /// Whether a batch of `rank` was applied since the index started (or the rank was
    /// dropped).
    pub fn seen(&self, rank: u32) -> bool {
        self.ranks.get(&rank).is_some_and(|r| r.next_seq.is_some())
    }

    /// Records that batches below `to` were applied by a replay (see [`SeqCheck::Duplicate`]).
    pub fn replayed(&mut self, rank: u32, to: i64) {
        self.ranks.entry(rank).or_default().replayed_below = Some(to);
    }

    /// Applies one batch with its sequence number. A gap or a backwards sequence drops the
    /// rank's blocks first; a duplicate is skipped. Returns the check's verdict.
    pub fn apply(&mut self, seq: i64, batch: &Batch, now_ms: u64) -> SeqCheck {
        let rank = batch.dp_rank.unwrap_or(0);
        let check = self.check_seq(rank, seq);
        match check {
            SeqCheck::Duplicate => {
                self.stats.duplicates += 1;
                return check;
            }
            SeqCheck::Gap { .. } => self.clear_rank(rank, ClearReason::Gap),
            SeqCheck::Backwards => self.clear_rank(rank, ClearReason::Restart),
            SeqCheck::InOrder => {}
        }
        self.stats.batches += 1;
        let capacity = self.capacity;
        let r = self.ranks.entry(rank).or_default();
        if r.next_seq.is_none() {
            // A publisher's first batch is 0: it has seen everything. Joined later, what the
            // batches before stored is unseen.
            r.unknown = (seq != 0).then_some(capacity);
        }
        r.next_seq = Some(seq.saturating_add(1));
        for event in &batch.events {
            match event {
                Event::Stored(s) => self.stored(rank, s),
                Event::Removed(r) => self.removed(rank, r),
                Event::Cleared => {
                    self.clear_rank(rank, ClearReason::Reset);
                    self.stats.events_applied += 1;
                }
                Event::Unknown(_) => self.drop_event(Dropped::Unknown),
            }
        }
        self.held.last_event_ms.store(now_ms, Ordering::Relaxed);
        self.update_complete();
        check
    }

    /// Drops every rank's blocks (the engine restarted, left discovery, or its subscription
    /// was lost) and forgets the sequences.
    pub fn clear(&mut self, reason: ClearReason) {
        *self.stats.clears.entry(reason).or_default() += 1;
        self.held.clears.fetch_add(1, Ordering::Relaxed);
        let ranks: Vec<u32> = self.ranks.keys().copied().collect();
        for rank in ranks {
            self.drop_rank(rank, reason);
        }
        self.ranks.clear();
        self.started_empty = false;
        self.update_complete();
    }

    fn clear_rank(&mut self, rank: u32, reason: ClearReason) {
        *self.stats.clears.entry(reason).or_default() += 1;
        self.held.clears.fetch_add(1, Ordering::Relaxed);
        self.drop_rank(rank, reason);
    }

    fn drop_rank(&mut self, rank: u32, reason: ClearReason) {
        let Some(r) = self.ranks.get_mut(&rank) else {
            return;
        };
        let guard = self.held.set.guard();
        for (_, key) in r.by_hash.drain() {
            unref(&mut self.refs, &self.held.set, &guard, key, &mut self.changes);
        }
        r.replayed_below = None;
        r.unchained.clear();
        if reason == ClearReason::Reset {
            // The engine holds nothing now; the publisher (and its sequence) goes on.
            r.unknown = None;
        } else {
            // The others start over, and what the engine holds is unseen.
            r.next_seq = None;
            r.unknown = Some(self.capacity);
        }
        self.held.blocks.store(self.refs.len(), Ordering::Relaxed);
    }

    fn drop_event(&mut self, why: Dropped) {
        *self.stats.events_dropped.entry(why).or_default() += 1;
    }

    fn stored(&mut self, rank: u32, s: &Stored) {
        let other_medium = s.medium.as_deref().is_some_and(|m| !m.eq_ignore_ascii_case("GPU"));
        let other_group = s.spec_kind.as_deref().is_some_and(|k| k != "full_attention");
        if other_medium || other_group {
            return self.drop_event(Dropped::OtherTier);
        }
        let bs = s.block_size as usize;
        let n = s.hashes.len();
        if bs == 0 || n == 0 || s.token_ids.len() > n * bs || s.token_ids.len() <= (n - 1) * bs {
            return self.drop_event(Dropped::Malformed);
        }
        if self.held.block_size().is_some_and(|b| b != s.block_size) && !self.refs.is_empty() {
            self.clear(ClearReason::BlockSize);
        }
        self.held.block_size.store(s.block_size, Ordering::Relaxed);
        let group = s.group.unwrap_or(0);
        let r = self.ranks.entry(rank).or_default();
        let mut parent = match s.parent {
            None => key::ROOT,
            Some(p) => match r.by_hash.get(&(group, p)) {
                Some(&k) => k,
                None => {
                    // Held there, not keyable here: the index misses them until they go.
                    let room = self.limits.max_blocks.saturating_sub(r.unchained.len());
                    r.unchained.extend(s.hashes.iter().take(room).map(|&h| (group, h)));
                    *self.stats.events_dropped.entry(Dropped::Unchained).or_default() += 1;
                    return;
                }
            },
        };
        let set = self.held.set.pin();
        let mut bounded = false;
        for (i, (&hash, tokens)) in s.hashes.iter().zip(s.token_ids.chunks(bs)).enumerate() {
            let extras = s.extra_keys.as_ref().and_then(|e| e.get(i)).and_then(|e| e.as_deref());
            let key = key::chain(parent, tokens, key::extras_digest(extras));
            parent = key;
            if r.by_hash.contains_key(&(group, hash)) {
                continue; // announced again (a reused prefix)
            }
            if self.refs.len() >= self.limits.max_blocks && !self.refs.contains_key(&key) {
                bounded = true;
                break;
            }
            r.by_hash.insert((group, hash), key);
            let refs = self.refs.entry(key).or_default();
            *refs += 1;
            if *refs == 1 {
                set.insert(key);
                if let Some(c) = &mut self.changes {
                    c.added.push(key);
                }
            }
        }
        drop(set);
        self.held.blocks.store(self.refs.len(), Ordering::Relaxed);
        if bounded {
            self.drop_event(Dropped::Bound);
        } else {
            self.stats.events_applied += 1;
        }
    }

    fn removed(&mut self, rank: u32, rm: &Removed) {
        if rm.medium.as_deref().is_some_and(|m| !m.eq_ignore_ascii_case("GPU")) {
            return self.drop_event(Dropped::OtherTier);
        }
        let group = rm.group.unwrap_or(0);
        let Some(r) = self.ranks.get_mut(&rank) else {
            return self.stats.events_applied += 1;
        };
        let guard = self.held.set.guard();
        for hash in &rm.hashes {
            match r.by_hash.remove(&(group, *hash)) {
                Some(key) => unref(&mut self.refs, &self.held.set, &guard, key, &mut self.changes),
                // One it could not key left.
                None if r.unchained.remove(&(group, *hash)) => {}
                // A block the index never saw left: one fewer that may be missing.
                None => {
                    r.unknown = r.unknown.and_then(|n| n.checked_sub(1)).filter(|&n| n > 0);
                }
            }
        }
        drop(guard);
        self.held.blocks.store(self.refs.len(), Ordering::Relaxed);
        self.stats.events_applied += 1;
    }
}

fn unref(
    refs: &mut HashMap<BlockKey, u32>,
    set: &papaya::HashSet<BlockKey>,
    guard: &impl papaya::Guard,
    key: BlockKey,
    changes: &mut Option<Changes>,
) {
    if let Some(n) = refs.get_mut(&key) {
        *n -= 1;
        if *n == 0 {
            refs.remove(&key);
            set.remove(&key, guard);
            if let Some(c) = changes {
                c.removed.push(key);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::key::{RequestExtras, prompt_keys};

    const BS: u32 = 4;

    fn stored(hashes: &[u64], parent: Option<u64>, tokens: &[u32]) -> Event {
        Event::Stored(Stored {
            hashes: hashes.to_vec(),
            parent,
            token_ids: tokens.to_vec(),
            block_size: BS,
            lora_name: None,
            lora_id: None,
            medium: Some("GPU".into()),
            extra_keys: None,
            group: Some(0),
            spec_kind: Some("full_attention".into()),
        })
    }

    fn removed(hashes: &[u64]) -> Event {
        Event::Removed(Removed {
            hashes: hashes.to_vec(),
            medium: Some("GPU".into()),
            group: Some(0),
        })
    }

    fn batch(events: Vec<Event>) -> Batch {
        Batch {
            ts: 0.0,
            events,
            dp_rank: Some(0),
        }
    }

    fn keys(tokens: &[u32]) -> Vec<BlockKey> {
        let mut k = Vec::new();
        prompt_keys(tokens, BS as usize, RequestExtras::default(), &mut k);
        k
    }

    fn index(max_blocks: usize) -> EngineIndex {
        EngineIndex::new(Arc::new(Held::default()), IndexLimits { max_blocks })
    }

    const PROMPT: [u32; 12] = [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12];

    #[test]
    fn stored_blocks_match_the_prompts_keys() {
        let mut ix = index(100);
        ix.apply(0, &batch(vec![stored(&[10, 11], None, &PROMPT[..8])]), 1);
        ix.apply(1, &batch(vec![stored(&[12], Some(11), &PROMPT[8..])]), 2);
        assert_eq!(ix.held().matched(&keys(&PROMPT)), 3);
        assert_eq!(ix.held().blocks(), 3);
        assert_eq!(ix.held().block_size(), Some(BS));
        // Evicting the middle block: only the first still matches from the start.
        ix.apply(2, &batch(vec![removed(&[11])]), 3);
        assert_eq!(ix.held().matched(&keys(&PROMPT)), 1);
        assert_eq!(ix.held().last_event_ms(), 3);
    }

    #[test]
    fn a_gap_drops_the_index_and_it_fills_again() {
        let mut ix = index(100);
        ix.apply(0, &batch(vec![stored(&[10, 11], None, &PROMPT[..8])]), 1);
        assert_eq!(ix.check_seq(0, 3), SeqCheck::Gap { from: 1, to: 3 });
        let v = ix.apply(3, &batch(vec![stored(&[12], Some(11), &PROMPT[8..])]), 2);
        assert_eq!(v, SeqCheck::Gap { from: 1, to: 3 });
        // The parent was dropped with the index: the new block cannot be keyed.
        assert_eq!(ix.held().blocks(), 0);
        assert_eq!(ix.stats().events_dropped[&Dropped::Unchained], 1);
        assert_eq!(ix.stats().clears[&ClearReason::Gap], 1);
        assert!(!ix.held().is_complete());
        // A request reusing the prefix (with `kv_cache_report_mode: full`) announces it
        // again from the root.
        ix.apply(4, &batch(vec![stored(&[10, 11, 12], None, &PROMPT)]), 3);
        assert_eq!(ix.held().matched(&keys(&PROMPT)), 3);
    }

    #[test]
    fn an_incomplete_index_is_complete_again_once_every_unseen_block_is_evicted() {
        let mut ix = index(100);
        ix.set_capacity(3);
        // Joined late: up to 3 blocks may be held unseen.
        ix.apply(7, &batch(vec![stored(&[10], None, &PROMPT[..4])]), 1);
        assert!(!ix.held().is_complete());
        // A known block's eviction says nothing about the unseen ones.
        ix.apply(8, &batch(vec![removed(&[10])]), 2);
        assert!(!ix.held().is_complete());
        ix.apply(9, &batch(vec![removed(&[90, 91])]), 3);
        assert!(!ix.held().is_complete());
        ix.apply(10, &batch(vec![removed(&[92])]), 4);
        assert!(ix.held().is_complete());
        // A reset empties the engine: complete at once.
        ix.apply(20, &batch(vec![]), 5);
        assert!(!ix.held().is_complete());
        ix.apply(21, &batch(vec![Event::Cleared]), 6);
        assert!(ix.held().is_complete());
    }

    #[test]
    fn blocks_that_cannot_be_keyed_keep_it_incomplete_until_they_are_evicted() {
        let mut ix = index(100);
        ix.set_capacity(1);
        // Joined late: block 10 (and what the engine held before) unseen.
        ix.apply(5, &batch(vec![stored(&[11], Some(10), &PROMPT[4..8])]), 1);
        assert_eq!(ix.stats().events_dropped[&Dropped::Unchained], 1);
        // The one block from before is evicted: the pre-join count is done, but 11 is still
        // held there and missing here.
        ix.apply(6, &batch(vec![removed(&[10])]), 2);
        assert!(!ix.held().is_complete());
        // Its child cannot be keyed either.
        ix.apply(7, &batch(vec![stored(&[12], Some(11), &PROMPT[8..])]), 3);
        assert!(!ix.held().is_complete());
        ix.apply(8, &batch(vec![removed(&[12, 11])]), 4);
        assert!(ix.held().is_complete());
    }

    #[test]
    fn a_publishers_first_batch_or_an_idle_engine_makes_it_complete() {
        let mut ix = index(100);
        assert!(!ix.held().is_complete(), "nothing known of a running engine");
        ix.started_empty();
        assert!(ix.held().is_complete(), "an engine that served nothing holds nothing");
        let mut ix = index(100);
        ix.apply(0, &batch(vec![]), 1);
        assert!(ix.held().is_complete());
        // A restart: the new publisher's first batch is 0 again.
        ix.apply(5, &batch(vec![]), 2);
        assert!(!ix.held().is_complete(), "a gap");
        ix.apply(0, &batch(vec![]), 3);
        assert!(ix.held().is_complete());
    }

    #[test]
    fn a_backwards_sequence_is_a_restart() {
        let mut ix = index(100);
        ix.apply(5, &batch(vec![stored(&[10], None, &PROMPT[..4])]), 1);
        assert_eq!(ix.apply(0, &batch(vec![]), 2), SeqCheck::Backwards);
        assert_eq!(ix.held().blocks(), 0);
        assert_eq!(ix.stats().clears[&ClearReason::Restart], 1);
        assert_eq!(ix.check_seq(0, 1), SeqCheck::InOrder);
    }

    #[test]
    fn a_reset_clears_but_keeps_the_sequence() {
        let mut ix = index(100);
        ix.apply(0, &batch(vec![stored(&[10], None, &PROMPT[..4])]), 1);
        ix.apply(1, &batch(vec![Event::Cleared]), 2);
        assert_eq!(ix.held().blocks(), 0);
        assert_eq!(ix.check_seq(0, 2), SeqCheck::InOrder);
        assert_eq!(ix.stats().clears[&ClearReason::Reset], 1);
    }

    #[test]
    fn replayed_batches_seen_live_are_duplicates() {
        let mut ix = index(100);
        ix.apply(0, &batch(vec![]), 1);
        // 1..3 lost; the caller replays them, then the live copies arrive.
        ix.apply(1, &batch(vec![stored(&[10], None, &PROMPT[..4])]), 2);
        ix.apply(2, &batch(vec![]), 2);
        ix.replayed(0, 3);
        assert_eq!(ix.check_seq(0, 2), SeqCheck::Duplicate);
        assert_eq!(ix.apply(3, &batch(vec![]), 3), SeqCheck::InOrder);
        assert_eq!(ix.held().blocks(), 1);
    }

    #[test]
    fn ranks_are_separate_sequences_over_one_set() {
        let mut ix = index(100);
        ix.apply(0, &batch(vec![stored(&[10], None, &PROMPT[..4])]), 1);
        let mut b = batch(vec![stored(&[20], None, &PROMPT[..4])]);
        b.dp_rank = Some(1);
        ix.apply(0, &b, 1);
        assert_eq!(ix.held().blocks(), 1);
        // Rank 0 restarts: rank 1 still holds the block.
        ix.apply(0, &batch(vec![]), 2);
        assert_eq!(ix.held().matched(&keys(&PROMPT)), 1);
        let mut r = batch(vec![removed(&[20])]);
        r.dp_rank = Some(1);
        ix.apply(1, &r, 3);
        assert_eq!(ix.held().blocks(), 0);
    }

    #[test]
    fn the_bound_holds_and_other_tiers_are_skipped() {
        let mut ix = index(2);
        let tokens: Vec<u32> = (0..40).collect();
        let hashes: Vec<u64> = (100..110).collect();
        ix.apply(0, &batch(vec![stored(&hashes, None, &tokens)]), 1);
        assert_eq!(ix.held().blocks(), 2);
        assert_eq!(ix.stats().events_dropped[&Dropped::Bound], 1);
        let mut cpu = stored(&[1], None, &PROMPT[..4]);
        if let Event::Stored(s) = &mut cpu {
            s.medium = Some("CPU".into());
        }
        ix.apply(1, &batch(vec![cpu]), 2);
        assert_eq!(ix.stats().events_dropped[&Dropped::OtherTier], 1);
    }

    #[test]
    fn recorded_changes_rebuild_the_set_elsewhere() {
        let mut ix = index(100);
        ix.record_changes();
        let copy = Held::default();
        ix.apply(0, &batch(vec![stored(&[10, 11, 12], None, &PROMPT)]), 1);
        ix.apply(1, &batch(vec![removed(&[12])]), 2);
        let c = ix.take_changes();
        assert_eq!((c.added.len(), c.removed.len()), (3, 1));
        copy.apply_relayed(&c.added, &c.removed, true);
        assert_eq!(copy.matched(&keys(&PROMPT)), 2);
        assert_eq!(copy.blocks(), 2);
        assert!(copy.is_complete());
        assert!(ix.take_changes().is_empty());
        let mut all = copy.keys();
        all.sort_unstable();
        let mut mine = ix.held().keys();
        mine.sort_unstable();
        assert_eq!(all, mine);
    }

    #[test]
    fn malformed_token_counts_are_dropped() {
        let mut ix = index(100);
        ix.apply(0, &batch(vec![stored(&[10, 11], None, &PROMPT[..3])]), 1);
        assert_eq!(ix.stats().events_dropped[&Dropped::Malformed], 1);
        assert_eq!(ix.held().blocks(), 0);
    }
}
