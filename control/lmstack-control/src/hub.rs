//! Where snapshots are published and data plane streams pick them up: the latest snapshot
//! with the delta from the one before it. A stream that saw that one gets the delta; a new
//! or lagging stream gets the full snapshot.
//!
//! Also the shared affinity: batches of prefix assignments reported by replicas are relayed
//! to every stream (a broadcast channel; a stream that lags loses batches, counted), and the
//! latest ones, up to a bound in blocks, are kept to bring a newly connected replica up to
//! date.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};

use lmstack_snapshot::{AffinityBatch, Snapshot, SnapshotDelta, StreamMessage};
use tokio::sync::{broadcast, watch};

#[derive(Debug, Default)]
pub struct Published {
    pub snapshot: Snapshot,
    /// From the previous snapshot, when one can express the change.
    pub delta: Option<SnapshotDelta>,
}

impl Published {
    /// The message that brings a stream that has version `seen` (0: nothing) up to date.
    pub fn message_for(&self, seen: u64) -> StreamMessage {
        match &self.delta {
            Some(d) if seen != 0 && d.base == seen => StreamMessage::Delta { delta: d.clone() },
            _ => StreamMessage::Full {
                snapshot: self.snapshot.clone(),
            },
        }
    }
}

pub struct Hub {
    tx: watch::Sender<Arc<Published>>,
    affinity: broadcast::Sender<Arc<AffinityBatch>>,
    /// The latest batches, for streams that connect later, and their block count.
    recent: Mutex<(VecDeque<Arc<AffinityBatch>>, usize)>,
    recent_max_blocks: usize,
}

impl Hub {
    pub fn new(recent_max_blocks: usize) -> Self {
        Self {
            tx: watch::Sender::new(Arc::new(Published::default())),
            affinity: broadcast::Sender::new(1024),
            recent: Mutex::new((VecDeque::new(), 0)),
            recent_max_blocks,
        }
    }

    /// Relays a replica's assignments to every stream and keeps them for later ones.
    pub fn share(&self, mut batch: AffinityBatch) {
        let blocks = batch.blocks();
        let has_entries = !batch.entries.is_empty();
        let _ = self.affinity.send(Arc::new(batch.clone()));
        // Kept for later streams: the entries only (spending is news only when it happens).
        if !has_entries {
            return;
        }
        batch.budgets.clear();
        let batch = Arc::new(batch);
        let mut recent = self.recent.lock().unwrap_or_else(|p| p.into_inner());
        recent.0.push_back(batch);
        recent.1 += blocks;
        while recent.1 > self.recent_max_blocks {
            let Some(old) = recent.0.pop_front() else { break };
            recent.1 -= old.blocks();
        }
    }

    /// The kept batches, without entries of endpoints the current snapshot no longer has.
    pub fn recent_affinity(&self) -> Vec<AffinityBatch> {
        let current = self.current();
        let live = |url: &str| current.snapshot.endpoints.iter().any(|e| e.url == url);
        let recent = self.recent.lock().unwrap_or_else(|p| p.into_inner());
        recent
            .0
            .iter()
            .map(|b| AffinityBatch {
                replica: b.replica.clone(),
                entries: b.entries.iter().filter(|e| live(&e.endpoint)).cloned().collect(),
                // Spending is news only when it happens: a later stream must not charge it.
                budgets: Vec::new(),
            })
            .filter(|b| !b.entries.is_empty())
            .collect()
    }

    pub fn subscribe_affinity(&self) -> broadcast::Receiver<Arc<AffinityBatch>> {
        self.affinity.subscribe()
    }

    /// Publishes `snapshot` (already validated, version past the current one).
    pub fn publish(&self, snapshot: Snapshot) {
        let current = self.tx.borrow().clone();
        let delta = (current.snapshot.version != 0)
            .then(|| current.snapshot.diff(&snapshot))
            .flatten();
        self.tx.send_replace(Arc::new(Published { snapshot, delta }));
    }

    pub fn subscribe(&self) -> watch::Receiver<Arc<Published>> {
        self.tx.subscribe()
    }

    pub fn current(&self) -> Arc<Published> {
        self.tx.borrow().clone()
    }

    pub fn subscribers(&self) -> usize {
        self.tx.receiver_count()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use lmstack_snapshot::{Endpoint, Model};

    fn snapshot(version: u64, healthy: bool) -> Snapshot {
        Snapshot {
            version,
            endpoints: vec![Endpoint {
                url: "http://a:1".into(),
                addr: "127.0.0.1:1".parse().unwrap(),
                healthy,
                engine: None,
            }],
            models: vec![Model {
                name: "m".into(),
                endpoints: vec![0],
                card: None,
            }],
        }
    }

    #[test]
    fn kept_affinity_is_bounded_and_forgets_removed_endpoints() {
        let hub = Hub::new(10);
        hub.publish(snapshot(1, true));
        let batch = |endpoint: &str, n: usize| AffinityBatch {
            replica: "r".into(),
            entries: vec![lmstack_snapshot::AffinityEntry {
                endpoint: endpoint.into(),
                blocks: (0..n as u64).collect(),
                ..Default::default()
            }],
            budgets: vec![lmstack_snapshot::BudgetSpend {
                tenant: "t".into(),
                requests: 1,
                ..Default::default()
            }],
        };
        hub.share(batch("http://a:1", 4));
        hub.share(batch("http://gone:2", 4));
        assert!(
            hub.recent_affinity().iter().all(|b| b.budgets.is_empty()),
            "spending is never replayed to a later stream"
        );
        assert_eq!(
            hub.recent_affinity().len(),
            1,
            "entries of unknown endpoints are left out"
        );
        hub.share(batch("http://a:1", 4));
        // 12 blocks > 10: the oldest batch went.
        let kept = hub.recent_affinity();
        assert_eq!(kept.len(), 1);
        assert_eq!(hub.recent.lock().unwrap().1, 8);
    }

    #[test]
    fn streams_that_saw_the_last_version_get_a_delta_others_a_full_snapshot() {
        let hub = Hub::new(1000);
        hub.publish(snapshot(10, true));
        assert!(matches!(hub.current().message_for(0), StreamMessage::Full { .. }));
        hub.publish(snapshot(11, false));
        let p = hub.current();
        assert!(matches!(p.message_for(10), StreamMessage::Delta { ref delta } if delta.version == 11));
        assert!(matches!(p.message_for(9), StreamMessage::Full { .. }));
        assert!(matches!(p.message_for(0), StreamMessage::Full { .. }));
    }
}
