//! Where snapshots are published and data plane streams pick them up: the latest snapshot
//! with the delta from the one before it. A stream that saw that one gets the delta; a new
//! or lagging stream gets the full snapshot.

use std::sync::Arc;

use lmstack_snapshot::{Snapshot, SnapshotDelta, StreamMessage};
use tokio::sync::watch;

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
}

impl Hub {
    pub fn new() -> Self {
        Self {
            tx: watch::Sender::new(Arc::new(Published::default())),
        }
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
    fn streams_that_saw_the_last_version_get_a_delta_others_a_full_snapshot() {
        let hub = Hub::new();
        hub.publish(snapshot(10, true));
        assert!(matches!(hub.current().message_for(0), StreamMessage::Full { .. }));
        hub.publish(snapshot(11, false));
        let p = hub.current();
        assert!(matches!(p.message_for(10), StreamMessage::Delta { ref delta } if delta.version == 11));
        assert!(matches!(p.message_for(9), StreamMessage::Full { .. }));
        assert!(matches!(p.message_for(0), StreamMessage::Full { .. }));
    }
}
