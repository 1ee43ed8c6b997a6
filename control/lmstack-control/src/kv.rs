//! Exact KV routing for every router replica: control follows each engine's KV events once
//! (`lmstack-kv`'s intake: registration, ZeroMQ per rank, replays, the block index) and
//! relays what each index gains and loses as compact deltas (block keys, 8 bytes each) on
//! every snapshot stream. A stream that connects, or falls behind, gets every engine's full
//! set first (`reset`, then the keys in messages of at most [`DUMP_KEYS`]).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use lmstack_kv::index::{ClearReason, EngineIndex, Held};
use lmstack_kv::intake::{self, Counts, IntakeConfig, Observer, SourceState};
use lmstack_snapshot::KvDelta;
use tokio::sync::broadcast;

use crate::hub::Hub;
use crate::metrics;

/// Keys per message of a full copy.
pub const DUMP_KEYS: usize = 16_384;

#[derive(Debug, Default)]
struct Engine {
    held: Arc<Held>,
    publishes: bool,
    live: bool,
    /// Completeness as last relayed.
    complete: bool,
}

/// The engines followed and the deltas' channel.
pub struct KvRelay {
    tx: broadcast::Sender<Arc<KvDelta>>,
    engines: Mutex<HashMap<String, Engine>>,
}

impl KvRelay {
    pub fn new() -> Self {
        Self {
            tx: broadcast::Sender::new(4096),
            engines: Mutex::new(HashMap::new()),
        }
    }

    pub fn subscribe(&self) -> broadcast::Receiver<Arc<KvDelta>> {
        self.tx.subscribe()
    }

    fn engines(&self) -> std::sync::MutexGuard<'_, HashMap<String, Engine>> {
        self.engines.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Every engine's whole set, for a stream that connects or fell behind.
    pub fn dump(&self) -> Vec<KvDelta> {
        let engines = self.engines();
        let mut out = Vec::new();
        for (url, e) in engines.iter() {
            let keys = e.held.keys();
            let head = self.state(url, e);
            let mut chunks = keys.chunks(DUMP_KEYS);
            out.push(KvDelta {
                reset: true,
                added: chunks.next().map(<[u64]>::to_vec).unwrap_or_default(),
                ..head.clone()
            });
            out.extend(chunks.map(|c| KvDelta {
                added: c.to_vec(),
                ..head.clone()
            }));
        }
        out
    }

    fn state(&self, url: &str, e: &Engine) -> KvDelta {
        KvDelta {
            endpoint: url.to_owned(),
            live: e.live && e.held.is_fresh(),
            publishes: e.publishes,
            complete: e.held.is_complete(),
            block_size: e.held.block_size().unwrap_or(0),
            ..KvDelta::default()
        }
    }

    fn send(&self, delta: KvDelta) {
        ::metrics::counter!(metrics::KV_DELTA_KEYS_TOTAL).increment((delta.added.len() + delta.removed.len()) as u64);
        let _ = self.tx.send(Arc::new(delta));
    }
}

struct Relayed {
    relay: Arc<KvRelay>,
}

impl Observer for Relayed {
    fn check(&self, url: &str, check: &'static str, problem: bool) {
        ::metrics::gauge!(metrics::KV_COMPAT_PROBLEM, "endpoint" => url.to_owned(), "check" => check).set(if problem {
            1.0
        } else {
            0.0
        });
    }

    fn source(&self, url: &str, state: SourceState) {
        let delta = {
            let mut engines = self.relay.engines();
            let Some(e) = engines.get_mut(url) else { return };
            e.publishes = state != SourceState::None;
            e.live = state == SourceState::Live;
            self.relay.state(url, e)
        };
        self.relay.send(delta);
    }

    fn received(&self, url: &str) {
        ::metrics::counter!(metrics::KV_BATCHES_TOTAL, "endpoint" => url.to_owned()).increment(1);
    }

    fn counted(&self, url: &str, c: &Counts) {
        for (reason, n) in &c.clears {
            ::metrics::counter!(metrics::KV_RESYNCS_TOTAL, "endpoint" => url.to_owned(), "reason" => reason.as_str())
                .increment(*n);
        }
    }

    fn applied(&self, url: &str, index: &mut EngineIndex) {
        index.record_changes();
        let changes = index.take_changes();
        ::metrics::gauge!(metrics::KV_INDEX_BLOCKS, "endpoint" => url.to_owned()).set(index.held().blocks() as f64);
        let delta = {
            let mut engines = self.relay.engines();
            let Some(e) = engines.get_mut(url) else { return };
            let complete = e.held.is_complete();
            if changes.is_empty() && complete == e.complete {
                return;
            }
            e.complete = complete;
            KvDelta {
                added: changes.added,
                removed: changes.removed,
                ..self.relay.state(url, e)
            }
        };
        self.relay.send(delta);
    }

    fn dropped(&self, url: &str, reason: ClearReason) {
        ::metrics::counter!(metrics::KV_RESYNCS_TOTAL, "endpoint" => url.to_owned(), "reason" => reason.as_str())
            .increment(1);
        let delta = {
            let mut engines = self.relay.engines();
            let Some(e) = engines.get_mut(url) else { return };
            e.live = false;
            KvDelta {
                reset: true,
                ..self.relay.state(url, e)
            }
        };
        self.relay.send(delta);
    }
}

/// Follows the engines of the latest snapshot: new ones registered and subscribed, gone ones
/// dropped (a `reset` delta with `publishes: false` tells the replicas).
pub async fn run(relay: Arc<KvRelay>, hub: Arc<Hub>, config: Arc<IntakeConfig>) {
    let observer: Arc<dyn Observer> = Arc::new(Relayed { relay: relay.clone() });
    let mut tasks: HashMap<String, tokio::task::JoinHandle<()>> = HashMap::new();
    loop {
        let current = hub.current();
        let urls: Vec<&str> = current.snapshot.endpoints.iter().map(|e| e.url.as_str()).collect();
        tasks.retain(|url, task| {
            let keep = urls.contains(&url.as_str());
            if !keep {
                task.abort();
                relay.engines().remove(url);
                relay.send(KvDelta {
                    endpoint: url.clone(),
                    reset: true,
                    ..KvDelta::default()
                });
            }
            keep
        });
        for url in urls {
            if tasks.contains_key(url) {
                continue;
            }
            let held = Arc::new(Held::default());
            relay.engines().insert(
                url.to_owned(),
                Engine {
                    held: held.clone(),
                    ..Engine::default()
                },
            );
            let task = tokio::spawn(intake::follow(config.clone(), url.into(), held, observer.clone()));
            tasks.insert(url.to_owned(), task);
        }
        tokio::time::sleep(config.retry.max(Duration::from_millis(100))).await;
    }
}
