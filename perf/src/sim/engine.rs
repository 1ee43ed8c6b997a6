//! The simulated engine's scheduler and cost model.
//!
//! - Admission: requests wait in FIFO order until a running slot (`max_num_seqs`) and KV
//!   blocks for their prompt and output are free (cached blocks nobody holds are evicted).
//! - Prefill: one prefill lane per engine (`prefill_lanes` to model several engines merged
//!   into one), first come first served on the lane that frees first; a prompt takes
//!   `prefill_base + prefill_per_token x uncached prompt tokens`, so time to first token
//!   grows with the uncached prompt and with the prefills queued before it.
//! - Decode: every output token takes `decode_base + decode_per_seq x (other running
//!   sequences)`.
//! - KV events (when a publisher is attached): each admission is one engine step, published
//!   as one batch at once (vLLM publishes a step's batch when its forward pass ends, about
//!   when the prefill completes), its events in the order vLLM's scheduler makes them: the
//!   cache hit announced from the root (`BlockStored`, only for requests in vLLM's `full`
//!   report mode), the blocks evicted to make room (`BlockRemoved`, one per block), then the
//!   prompt's full blocks past the hit (`BlockStored`, chained to the last hit block). A cache
//!   reset is a batch of its own.
//!
//! It is a model of vLLM's behaviour under load, not of its kernels: no preemption, no
//! chunked-prefill interleaving, and output tokens never fill cacheable blocks.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::oneshot;
use tokio::time::Instant;

use lmstack_kv::event::Event;

use super::kv::{Allocation, BlockPool, block_hashes};
use super::kv_events::{self, EventSink, RequestKv};
use super::metrics::SimMetrics;

#[derive(Clone, Debug)]
pub struct EngineConfig {
    pub block_size: usize,
    pub num_blocks: usize,
    pub max_num_seqs: usize,
    pub max_model_len: usize,
    /// Prefills that run at once.
    pub prefill_lanes: usize,
    pub prefill_base: Duration,
    pub prefill_per_token: Duration,
    pub decode_base: Duration,
    pub decode_per_seq: Duration,
    /// Hit token deadlines to within tens of microseconds (tokio's timer alone is up to a
    /// millisecond late): the last stretch of each wait is a thread sleep.
    pub precise_timers: bool,
}

/// What admission decided for one request.
#[derive(Clone, Copy, Debug)]
pub struct Admitted {
    pub prompt_tokens: usize,
    pub cached_tokens: usize,
    pub queued: Duration,
    /// When the first output token is ready (end of prefill).
    pub first_token_at: Instant,
}

/// Why `schedule` runs: a request arrived, or one finished and made room.
#[derive(Clone, Copy)]
enum Admission {
    OnArrival,
    OnRelease,
}

struct Pending {
    hashes: Vec<u64>,
    /// The prompt's tokens and what its events carry, when events are published.
    events: Option<(Vec<u32>, RequestKv)>,
    usable_hits: usize,
    anonymous: usize,
    prompt_len: usize,
    arrived: Instant,
    tx: oneshot::Sender<Admitted>,
}

struct State {
    pool: BlockPool,
    waiting: VecDeque<Pending>,
    running: usize,
    /// When each prefill lane is free again.
    prefill_free_at: Vec<Instant>,
}

pub struct Engine {
    pub config: EngineConfig,
    state: Mutex<State>,
    running: AtomicUsize,
    pub metrics: SimMetrics,
    events: Option<EventSink>,
}

/// A running request's hold on its slot and blocks; dropping it finishes the request.
pub struct Lease {
    engine: Arc<Engine>,
    hashes: Vec<u64>,
    anonymous: usize,
}

impl Drop for Lease {
    fn drop(&mut self) {
        self.engine.release(&self.hashes, self.anonymous);
    }
}

#[derive(Debug, thiserror::Error)]
pub enum AdmitError {
    #[error(
        "This model's maximum context length is {max} tokens. However, you requested {total} tokens ({prompt} in the messages, {output} in the completion). Please reduce the length of the messages or completion."
    )]
    TooLong {
        max: usize,
        total: usize,
        prompt: usize,
        output: usize,
    },
    #[error("the request needs {needed} KV blocks, more than the {capacity} this engine has")]
    TooBig { needed: usize, capacity: usize },
    #[error("the engine is shutting down")]
    Gone,
}

impl Engine {
    pub fn new(config: EngineConfig, metrics: SimMetrics, events: Option<EventSink>) -> Arc<Self> {
        let pool = BlockPool::new(config.num_blocks);
        Arc::new(Self {
            state: Mutex::new(State {
                pool,
                waiting: VecDeque::new(),
                running: 0,
                prefill_free_at: vec![Instant::now(); config.prefill_lanes.max(1)],
            }),
            running: AtomicUsize::new(0),
            metrics,
            events,
            config,
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Admits a request that arrived at `arrived` (waiting for room if needed) and schedules its
    /// prefill: from its arrival when admitted at once, else from when room was made. `kv` is
    /// what its blocks are hashed with (and what their events carry).
    pub async fn admit(
        self: &Arc<Self>,
        tokens: &[u32],
        max_tokens: usize,
        arrived: Instant,
        kv: &RequestKv,
    ) -> Result<(Lease, Admitted), AdmitError> {
        let c = &self.config;
        let total = tokens.len() + max_tokens;
        if total > c.max_model_len {
            return Err(AdmitError::TooLong {
                max: c.max_model_len,
                total,
                prompt: tokens.len(),
                output: max_tokens,
            });
        }
        let hashes = block_hashes(tokens, c.block_size, &kv.extras);
        let anonymous = total.div_ceil(c.block_size) - hashes.len();
        if hashes.len() + anonymous > c.num_blocks {
            return Err(AdmitError::TooBig {
                needed: hashes.len() + anonymous,
                capacity: c.num_blocks,
            });
        }
        // Like vLLM, the last prompt token is always computed: a fully cached prompt still
        // recomputes its last block.
        let usable_hits = (tokens.len().saturating_sub(1)) / c.block_size;
        let (tx, rx) = oneshot::channel();
        {
            let mut state = self.lock();
            state.waiting.push_back(Pending {
                hashes: hashes.clone(),
                events: self.events.is_some().then(|| (tokens.to_vec(), kv.clone())),
                usable_hits,
                anonymous,
                prompt_len: tokens.len(),
                arrived,
                tx,
            });
            self.schedule(&mut state, Admission::OnArrival);
        }
        let admitted = rx.await.map_err(|_| AdmitError::Gone)?;
        Ok((
            Lease {
                engine: self.clone(),
                hashes,
                anonymous,
            },
            admitted,
        ))
    }

    /// Admits waiting requests in order while they fit.
    fn schedule(&self, state: &mut State, admission: Admission) {
        let c = &self.config;
        while let Some(front) = state.waiting.front() {
            if state.running >= c.max_num_seqs || !state.pool.fits(&front.hashes, front.usable_hits, front.anonymous) {
                break;
            }
            let Some(p) = state.waiting.pop_front() else {
                break;
            };
            let alloc = state.pool.allocate(&p.hashes, p.usable_hits, p.anonymous);
            if let (Some(sink), Some((tokens, kv))) = (&self.events, &p.events) {
                sink.publish(step_events(&p.hashes, tokens, c.block_size, kv, &alloc));
            }
            let cached = alloc.hit_blocks * c.block_size;
            let now = Instant::now();
            // On arrival only the request just queued can be admitted (the ones before it are
            // still blocked): it has had room since it arrived.
            let ready = match admission {
                Admission::OnArrival => p.arrived.min(now),
                Admission::OnRelease => now,
            };
            let lane = (0..state.prefill_free_at.len())
                .min_by_key(|&l| state.prefill_free_at[l])
                .unwrap_or(0);
            let start = ready.max(state.prefill_free_at[lane]);
            let prefill = c.prefill_base + c.prefill_per_token * (p.prompt_len - cached) as u32;
            state.prefill_free_at[lane] = start + prefill;
            state.running += 1;
            self.metrics.prompt(p.prompt_len, cached);
            let admitted = Admitted {
                prompt_tokens: p.prompt_len,
                cached_tokens: cached,
                queued: now.duration_since(p.arrived),
                first_token_at: start + prefill,
            };
            if p.tx.send(admitted).is_err() {
                // The request went away while waiting.
                state.pool.release(&p.hashes, p.anonymous);
                state.running -= 1;
            }
        }
        self.running.store(state.running, Ordering::Relaxed);
        self.metrics.state(
            state.running,
            state.waiting.len(),
            state.pool.in_use(),
            state.pool.capacity(),
        );
    }

    /// vLLM's `reset_prefix_cache`: drops every cached block, only while no request holds any
    /// (false otherwise, and nothing changes). Announced by `AllBlocksCleared`.
    pub fn reset_prefix_cache(&self) -> bool {
        let mut state = self.lock();
        let reset = state.pool.reset();
        if reset && let Some(sink) = &self.events {
            sink.publish(vec![Event::Cleared]);
        }
        reset
    }

    fn release(&self, hashes: &[u64], anonymous: usize) {
        let mut state = self.lock();
        state.pool.release(hashes, anonymous);
        state.running -= 1;
        self.schedule(&mut state, Admission::OnRelease);
    }

    pub fn precise_timers(&self) -> bool {
        self.config.precise_timers
    }

    /// Time for the next output token, given how many sequences run now.
    pub fn decode_delay(&self) -> Duration {
        let others = self.running.load(Ordering::Relaxed).saturating_sub(1);
        self.config.decode_base + self.config.decode_per_seq * others as u32
    }
}

/// One admission's events, in the order vLLM's scheduler makes them in a step.
fn step_events(hashes: &[u64], tokens: &[u32], block_size: usize, kv: &RequestKv, alloc: &Allocation) -> Vec<Event> {
    let hits = alloc.hit_blocks;
    let mut events = Vec::with_capacity(alloc.evicted.len() + 2);
    if kv.report_cached && hits > 0 {
        events.push(kv_events::stored(
            &hashes[..hits],
            None,
            &tokens[..hits * block_size],
            0,
            block_size,
            kv,
        ));
    }
    events.extend(alloc.evicted.iter().map(|&h| kv_events::removed(h)));
    if hits < hashes.len() {
        let parent = hits.checked_sub(1).map(|i| hashes[i]);
        let blocks = &tokens[hits * block_size..hashes.len() * block_size];
        events.push(kv_events::stored(&hashes[hits..], parent, blocks, hits, block_size, kv));
    }
    events
}

#[cfg(test)]
mod tests {
    use super::*;

    fn engine(num_blocks: usize, max_num_seqs: usize) -> Arc<Engine> {
        engine_with_lanes(num_blocks, max_num_seqs, 1)
    }

    fn engine_with_lanes(num_blocks: usize, max_num_seqs: usize, lanes: usize) -> Arc<Engine> {
        Engine::new(
            EngineConfig {
                block_size: 4,
                num_blocks,
                max_num_seqs,
                max_model_len: 1000,
                prefill_lanes: lanes,
                prefill_base: Duration::from_millis(1),
                prefill_per_token: Duration::from_micros(100),
                decode_base: Duration::from_millis(1),
                decode_per_seq: Duration::from_micros(500),
                precise_timers: false,
            },
            SimMetrics::new("m", 4, num_blocks),
            None,
        )
    }

    #[tokio::test(start_paused = true)]
    async fn a_repeated_prompt_prefills_faster() {
        let e = engine(100, 4);
        let tokens: Vec<u32> = (0..40).collect();
        let t0 = Instant::now();
        let (lease, first) = e
            .admit(&tokens, 4, Instant::now(), &RequestKv::default())
            .await
            .unwrap();
        assert_eq!(first.cached_tokens, 0);
        assert_eq!(first.first_token_at - t0, Duration::from_millis(5));
        tokio::time::sleep_until(first.first_token_at).await;
        drop(lease);
        let t1 = Instant::now();
        let (_lease, second) = e
            .admit(&tokens, 4, Instant::now(), &RequestKv::default())
            .await
            .unwrap();
        assert_eq!(second.cached_tokens, 36);
        assert_eq!(second.first_token_at - t1, Duration::from_micros(1400));
    }

    #[tokio::test(start_paused = true)]
    async fn requests_wait_for_a_running_slot() {
        let e = engine(100, 1);
        let (lease, _) = e
            .admit(&[1, 2, 3, 4, 5], 2, Instant::now(), &RequestKv::default())
            .await
            .unwrap();
        let e2 = e.clone();
        let waiter = tokio::spawn(async move {
            e2.admit(&[9, 9, 9, 9, 9], 2, Instant::now(), &RequestKv::default())
                .await
                .map(|(_, a)| a.queued)
        });
        tokio::time::sleep(Duration::from_millis(10)).await;
        assert_eq!(e.lock().waiting.len(), 1);
        drop(lease);
        let queued = waiter.await.unwrap().unwrap();
        assert_eq!(queued, Duration::from_millis(10));
        assert_eq!(e.lock().running, 0, "the waiter's lease was dropped with its task");
    }

    #[tokio::test(start_paused = true)]
    async fn prefills_queue_behind_each_other() {
        let e = engine(100, 4);
        let a: Vec<u32> = (0..40).collect();
        let b: Vec<u32> = (100..140).collect();
        let t0 = Instant::now();
        let (_la, first) = e.admit(&a, 1, Instant::now(), &RequestKv::default()).await.unwrap();
        let (_lb, second) = e.admit(&b, 1, Instant::now(), &RequestKv::default()).await.unwrap();
        assert_eq!(first.first_token_at - t0, Duration::from_millis(5));
        assert_eq!(second.first_token_at - t0, Duration::from_millis(10));
    }

    #[tokio::test(start_paused = true)]
    async fn lanes_prefill_side_by_side() {
        let e = engine_with_lanes(100, 4, 2);
        let t0 = Instant::now();
        let prompts: Vec<Vec<u32>> = (0..3).map(|k| (k * 100..k * 100 + 40).collect()).collect();
        let mut ready = Vec::new();
        let mut leases = Vec::new();
        for p in &prompts {
            let (lease, a) = e.admit(p, 1, Instant::now(), &RequestKv::default()).await.unwrap();
            ready.push(a.first_token_at - t0);
            leases.push(lease);
        }
        // Two lanes: the first two prefill at once, the third waits for a lane.
        assert_eq!(ready, [5, 5, 10].map(Duration::from_millis));
    }

    #[tokio::test]
    async fn oversized_requests_are_refused() {
        let e = engine(3, 4);
        assert!(matches!(
            e.admit(&[0; 40], 1, Instant::now(), &RequestKv::default()).await,
            Err(AdmitError::TooBig { .. })
        ));
        assert!(matches!(
            e.admit(&[0; 990], 20, Instant::now(), &RequestKv::default()).await,
            Err(AdmitError::TooLong { .. })
        ));
    }
}

#[cfg(test)]
mod event_tests {
    use lmstack_kv::event::{Batch, Stored};
    use tokio::sync::mpsc::UnboundedReceiver;

    use super::*;
    use crate::sim::kv::BlockExtras;
    use crate::sim::kv_events::{Command, test_sink};

    fn engine(num_blocks: usize) -> (Arc<Engine>, UnboundedReceiver<Command>) {
        let (sink, rx) = test_sink();
        let config = EngineConfig {
            block_size: 4,
            num_blocks,
            max_num_seqs: 8,
            max_model_len: 1000,
            prefill_lanes: 1,
            prefill_base: Duration::ZERO,
            prefill_per_token: Duration::ZERO,
            decode_base: Duration::ZERO,
            decode_per_seq: Duration::ZERO,
            precise_timers: false,
        };
        (Engine::new(config, SimMetrics::new("m", 4, num_blocks), Some(sink)), rx)
    }

    fn next(rx: &mut UnboundedReceiver<Command>) -> Batch {
        match rx.try_recv() {
            Ok(Command::Batch(b)) => b,
            other => panic!("no batch: {other:?}"),
        }
    }

    fn stored(e: &Event) -> &Stored {
        match e {
            Event::Stored(s) => s,
            other => panic!("not a BlockStored: {other:?}"),
        }
    }

    #[tokio::test]
    async fn an_admission_announces_the_blocks_past_its_hit() {
        let (e, mut rx) = engine(100);
        let tokens: Vec<u32> = (0..42).collect();
        let kv = RequestKv::default();
        drop(e.admit(&tokens, 1, Instant::now(), &kv).await.unwrap());
        let first = next(&mut rx);
        assert_eq!((first.dp_rank, first.events.len()), (Some(0), 1));
        let s = stored(&first.events[0]);
        assert_eq!(
            (s.hashes.len(), s.parent, s.token_ids.as_slice()),
            (10, None, &tokens[..40])
        );
        assert_eq!(s.extra_keys, Some(vec![None; 10]));
        // A longer prompt with the same head: only its new blocks, chained to the last hit.
        let longer: Vec<u32> = (0..52).collect();
        drop(e.admit(&longer, 1, Instant::now(), &kv).await.unwrap());
        let second = next(&mut rx);
        let t = stored(&second.events[0]);
        assert_eq!(
            (t.hashes.len(), t.parent, t.token_ids.as_slice()),
            (3, Some(s.hashes[9]), &longer[40..52])
        );
        // In `full` report mode the hit is announced too, from the root.
        let full = RequestKv {
            report_cached: true,
            ..Default::default()
        };
        drop(e.admit(&longer, 1, Instant::now(), &full).await.unwrap());
        let third = next(&mut rx);
        let hit = stored(&third.events[0]);
        assert_eq!((hit.hashes.len(), hit.parent), (12, None));
        assert_eq!(hit.hashes[..10], s.hashes[..]);
        // The last block is recomputed (vLLM always computes the last prompt token): stored again.
        assert_eq!(stored(&third.events[1]).hashes, [t.hashes[2]]);
        assert!(rx.try_recv().is_err());
    }

    #[tokio::test]
    async fn evictions_and_resets_are_announced() {
        let (e, mut rx) = engine(6);
        let kv = RequestKv::default();
        let a: Vec<u32> = (0..16).collect();
        drop(e.admit(&a, 1, Instant::now(), &kv).await.unwrap());
        let a_hashes = stored(&next(&mut rx).events[0]).hashes.clone();
        let b: Vec<u32> = (100..116).collect();
        let lease = e.admit(&b, 1, Instant::now(), &kv).await.unwrap();
        let batch = next(&mut rx);
        // Four new blocks and a decode block need five: three of a's go, tail first.
        let removed: Vec<u64> = batch.events[..3]
            .iter()
            .map(|ev| match ev {
                Event::Removed(r) => r.hashes[0],
                other => panic!("not a BlockRemoved: {other:?}"),
            })
            .collect();
        assert_eq!(removed, [a_hashes[3], a_hashes[2], a_hashes[1]]);
        assert_eq!(stored(&batch.events[3]).hashes.len(), 4);
        assert!(!e.reset_prefix_cache(), "b still holds its blocks");
        assert!(rx.try_recv().is_err());
        drop(lease);
        assert!(e.reset_prefix_cache());
        assert_eq!(next(&mut rx).events, [Event::Cleared]);
    }

    #[tokio::test]
    async fn a_salt_gives_other_hashes_and_its_extra_key() {
        let (e, mut rx) = engine(100);
        let tokens: Vec<u32> = (0..8).collect();
        drop(
            e.admit(&tokens, 1, Instant::now(), &RequestKv::default())
                .await
                .unwrap(),
        );
        let plain = stored(&next(&mut rx).events[0]).clone();
        let salted = RequestKv {
            extras: BlockExtras {
                cache_salt: Some("s".into()),
                ..Default::default()
            },
            ..Default::default()
        };
        let (_, admitted) = e.admit(&tokens, 1, Instant::now(), &salted).await.unwrap();
        assert_eq!(admitted.cached_tokens, 0);
        let s = stored(&next(&mut rx).events[0]).clone();
        assert!(s.hashes.iter().zip(&plain.hashes).all(|(a, b)| a != b));
        let salt = lmstack_kv::event::Extra::Text("s".into());
        assert_eq!(s.extra_keys, Some(vec![Some(vec![salt]), None]));
    }
}
