//! The routing snapshot: a versioned view of the engine endpoints that serve each model,
//! with their health and, when known, their engine-side load.
//!
//! This is the contract between whatever discovers engines (the data plane's own static or
//! file discovery, or lmstack-control) and the data plane that routes on it: snapshots, the
//! deltas between them and the messages of control's stream. Data and validation only: no
//! IO, no routing decisions.

use std::collections::HashSet;
use std::net::SocketAddr;

use serde::{Deserialize, Serialize};

pub mod vllm;

/// One complete routing view.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Snapshot {
    /// Increases with every change; a receiver ignores a snapshot older than the one it has.
    pub version: u64,
    pub endpoints: Vec<Endpoint>,
    pub models: Vec<Model>,
}

/// One engine replica (a vLLM server).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Endpoint {
    /// Identity and metric label: the base URL, `http://host:port`.
    pub url: String,
    /// Where to connect, resolved by whoever built the snapshot.
    pub addr: SocketAddr,
    /// Routable now.
    pub healthy: bool,
    /// Engine-side load and cache figures, when scraped.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub engine: Option<EngineStats>,
}

/// Figures scraped from an engine's `/metrics`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EngineStats {
    /// `vllm:num_requests_running`.
    pub running: f64,
    /// `vllm:num_requests_waiting`.
    pub waiting: f64,
    /// `vllm:kv_cache_usage_perc`, 0 to 1.
    pub kv_cache_usage: f64,
    /// `vllm:prefix_cache_queries_total` (tokens).
    pub prefix_cache_queries: f64,
    /// `vllm:prefix_cache_hits_total` (tokens).
    pub prefix_cache_hits: f64,
}

/// A model name and the endpoints that serve it (its pool).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Model {
    pub name: String,
    /// Indices into [`Snapshot::endpoints`].
    pub endpoints: Vec<u32>,
    /// The model card one engine's `/v1/models` gave for it, served again by the router's
    /// merged `/v1/models`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub card: Option<serde_json::Value>,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SnapshotError {
    #[error("endpoint {0} appears twice")]
    DuplicateEndpoint(String),
    #[error("model {0} appears twice")]
    DuplicateModel(String),
    #[error("model {model} refers to endpoint #{index}, but there are only {count}")]
    BadEndpointIndex { model: String, index: u32, count: usize },
    #[error("model {0} lists the same endpoint twice")]
    RepeatedEndpoint(String),
    #[error("a model has an empty name")]
    EmptyModelName,
    #[error("endpoint {0}: kv_cache_usage must be within 0..=1")]
    BadEngineStats(String),
    #[error("a delta from version {base} cannot apply to version {have}")]
    DeltaBase { base: u64, have: u64 },
    #[error("a delta to version {0} does not move forward")]
    DeltaVersion(u64),
}

/// What changed from one snapshot to the next. Endpoints are named by URL: applying removes
/// the `remove`d ones (the others keep their order), replaces the `upsert`ed ones that exist
/// and appends the rest; `models`, when present, replaces the model list (its indices refer
/// to the endpoint list after the change).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SnapshotDelta {
    /// The version this applies to.
    pub base: u64,
    /// The version it makes.
    pub version: u64,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub upsert: Vec<Endpoint>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub remove: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub models: Option<Vec<Model>>,
}

/// One line of lmstack-control's snapshot stream (`GET /v1/snapshots/watch`, newline-delimited
/// JSON): a full snapshot first, then deltas, with heartbeats while nothing changes.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case", deny_unknown_fields)]
pub enum StreamMessage {
    Full {
        snapshot: Snapshot,
    },
    Delta {
        delta: SnapshotDelta,
    },
    Heartbeat {
        version: u64,
    },
    /// Prefix assignments another replica made, for every replica's affinity table.
    Affinity {
        batch: AffinityBatch,
    },
    /// What an engine's KV block index gained and lost (exact KV routing, control
    /// following the engines' KV events for every replica).
    Kv {
        delta: KvDelta,
    },
}

/// Changes to one engine's KV block index, as lmstack-control keeps it from the engine's
/// KV events: block keys (lmstack's chained hashes of token ids, see `lmstack-kv`), so a
/// router applies them without knowing vLLM's hashes. A router joining gets every key of
/// every engine (`reset`, then the keys, in messages of bounded size), then the changes.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KvDelta {
    /// The endpoint's URL, as in snapshots.
    pub endpoint: String,
    /// Empty the copy first (a full copy follows, or the index was dropped).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub reset: bool,
    /// Whether the engine's events are being followed now (else route it approximately).
    pub live: bool,
    /// Whether the engine publishes events at all.
    pub publishes: bool,
    /// Whether the index is all the engine holds (else a lower bound).
    pub complete: bool,
    /// The engine's block size in tokens (0: not known yet).
    pub block_size: u32,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub added: Vec<u64>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub removed: Vec<u64>,
}

/// Prefix assignments one data plane replica made: which endpoint got which prompt blocks
/// (chained block hashes, in prompt order). Replicas report them to control
/// (`POST /v1/affinity`), control relays them on every stream.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AffinityBatch {
    /// The reporting replica, so that it can skip its own.
    pub replica: String,
    pub entries: Vec<AffinityEntry>,
    /// What the replica's requests spent of tenants' budgets since its last report, for
    /// every other replica to charge too (relayed live, never kept for later streams).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub budgets: Vec<BudgetSpend>,
}

/// A tenant's (or one of its keys') spending on one replica since its last report.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BudgetSpend {
    pub tenant: String,
    /// The key, by a short id of its hash (none: the tenant's own budgets).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key: Option<String>,
    #[serde(default)]
    pub requests: u64,
    /// Tokens charged (reserved, then settled: may be negative when refunds outweigh).
    #[serde(default)]
    pub tokens: i64,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AffinityEntry {
    /// The endpoint's URL, as in snapshots.
    pub endpoint: String,
    pub blocks: Vec<u64>,
    /// Requests the replica sent there with this entry (0 for an entry that only records
    /// blocks), so that every replica's recent-load counts include the others' requests.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub requests: u32,
    /// Prompt blocks those requests had to prefill there.
    #[serde(default, skip_serializing_if = "is_zero_u64")]
    pub uncached_blocks: u64,
    /// Conversations placed there with this entry (new, or moved off their home).
    #[serde(default, skip_serializing_if = "is_zero")]
    pub placed: u32,
    /// Stored Responses the endpoint holds (hashes of their ids), for every replica's map
    /// of response ids (`previous_response_id`, `GET /v1/responses/{id}`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub responses: Vec<u64>,
}

fn is_zero(n: &u32) -> bool {
    *n == 0
}

fn is_zero_u64(n: &u64) -> bool {
    *n == 0
}

impl AffinityBatch {
    /// Blocks in the batch (response ids counting as blocks), an entry without either
    /// counting as one (for bounds).
    pub fn blocks(&self) -> usize {
        self.entries
            .iter()
            .map(|e| (e.blocks.len() + e.responses.len()).max(1))
            .sum()
    }
}

impl Snapshot {
    /// Checks the invariants a receiver relies on; a snapshot that fails is rejected whole.
    pub fn validate(&self) -> Result<(), SnapshotError> {
        let mut urls = HashSet::new();
        for e in &self.endpoints {
            if !urls.insert(e.url.as_str()) {
                return Err(SnapshotError::DuplicateEndpoint(e.url.clone()));
            }
            if let Some(s) = &e.engine
                && !(0.0..=1.0).contains(&s.kv_cache_usage)
            {
                return Err(SnapshotError::BadEngineStats(e.url.clone()));
            }
        }
        let mut names = HashSet::new();
        for m in &self.models {
            if m.name.is_empty() {
                return Err(SnapshotError::EmptyModelName);
            }
            if !names.insert(m.name.as_str()) {
                return Err(SnapshotError::DuplicateModel(m.name.clone()));
            }
            let mut seen = HashSet::new();
            for &index in &m.endpoints {
                if index as usize >= self.endpoints.len() {
                    return Err(SnapshotError::BadEndpointIndex {
                        model: m.name.clone(),
                        index,
                        count: self.endpoints.len(),
                    });
                }
                if !seen.insert(index) {
                    return Err(SnapshotError::RepeatedEndpoint(m.name.clone()));
                }
            }
        }
        Ok(())
    }

    /// The delta that turns `self` into `next`, or `None` when only a full snapshot can
    /// (the endpoints were reordered).
    pub fn diff(&self, next: &Snapshot) -> Option<SnapshotDelta> {
        let remove: Vec<String> = self
            .endpoints
            .iter()
            .filter(|e| !next.endpoints.iter().any(|n| n.url == e.url))
            .map(|e| e.url.clone())
            .collect();
        let upsert: Vec<Endpoint> = next
            .endpoints
            .iter()
            .filter(|n| !self.endpoints.iter().any(|e| e == *n))
            .cloned()
            .collect();
        let delta = SnapshotDelta {
            base: self.version,
            version: next.version,
            upsert,
            remove,
            models: (self.models != next.models).then(|| next.models.clone()),
        };
        (self.apply(&delta).as_ref() == Ok(next)).then_some(delta)
    }

    /// `self` changed by `delta`, validated.
    pub fn apply(&self, delta: &SnapshotDelta) -> Result<Snapshot, SnapshotError> {
        if delta.base != self.version {
            return Err(SnapshotError::DeltaBase {
                base: delta.base,
                have: self.version,
            });
        }
        if delta.version <= self.version {
            return Err(SnapshotError::DeltaVersion(delta.version));
        }
        let mut endpoints: Vec<Endpoint> = self
            .endpoints
            .iter()
            .filter(|e| !delta.remove.contains(&e.url))
            .cloned()
            .collect();
        for e in &delta.upsert {
            match endpoints.iter_mut().find(|x| x.url == e.url) {
                Some(x) => *x = e.clone(),
                None => endpoints.push(e.clone()),
            }
        }
        let next = Snapshot {
            version: delta.version,
            endpoints,
            models: delta.models.clone().unwrap_or_else(|| self.models.clone()),
        };
        next.validate()?;
        Ok(next)
    }

    pub fn model(&self, name: &str) -> Option<&Model> {
        self.models.iter().find(|m| m.name == name)
    }

    /// Models with at least one healthy endpoint.
    pub fn routable_models(&self) -> impl Iterator<Item = &Model> {
        self.models
            .iter()
            .filter(|m| m.endpoints.iter().any(|&i| self.endpoints[i as usize].healthy))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn endpoint(url: &str, port: u16) -> Endpoint {
        Endpoint {
            url: url.into(),
            addr: SocketAddr::from(([127, 0, 0, 1], port)),
            healthy: true,
            engine: None,
        }
    }

    fn snapshot() -> Snapshot {
        Snapshot {
            version: 1,
            endpoints: vec![endpoint("http://a:1", 1), endpoint("http://b:2", 2)],
            models: vec![Model {
                name: "m".into(),
                endpoints: vec![0, 1],
                card: None,
            }],
        }
    }

    #[test]
    fn a_consistent_snapshot_validates() {
        snapshot().validate().unwrap();
    }

    #[test]
    fn rejects_broken_references_and_duplicates() {
        let mut s = snapshot();
        s.models[0].endpoints.push(2);
        assert!(matches!(
            s.validate(),
            Err(SnapshotError::BadEndpointIndex { index: 2, .. })
        ));
        let mut s = snapshot();
        s.models[0].endpoints.push(0);
        assert_eq!(s.validate(), Err(SnapshotError::RepeatedEndpoint("m".into())));
        let mut s = snapshot();
        s.endpoints[1].url = "http://a:1".into();
        assert!(matches!(s.validate(), Err(SnapshotError::DuplicateEndpoint(_))));
        let mut s = snapshot();
        s.models.push(s.models[0].clone());
        assert!(matches!(s.validate(), Err(SnapshotError::DuplicateModel(_))));
        let mut s = snapshot();
        s.endpoints[0].engine = Some(EngineStats {
            kv_cache_usage: 1.5,
            ..Default::default()
        });
        assert!(matches!(s.validate(), Err(SnapshotError::BadEngineStats(_))));
    }

    #[test]
    fn round_trips_through_json_and_rejects_unknown_fields() {
        let s = snapshot();
        let text = serde_json::to_string(&s).unwrap();
        assert_eq!(serde_json::from_str::<Snapshot>(&text).unwrap(), s);
        assert!(serde_json::from_str::<Snapshot>(r#"{"version":1,"endpoints":[],"models":[],"x":1}"#).is_err());
    }

    #[test]
    fn deltas_carry_only_what_changed_and_rebuild_the_next_snapshot() {
        let a = snapshot();
        let mut b = a.clone();
        b.version = 2;
        b.endpoints[1].engine = Some(EngineStats {
            running: 3.0,
            ..Default::default()
        });
        let d = a.diff(&b).unwrap();
        assert_eq!(d.upsert.len(), 1);
        assert!(d.remove.is_empty() && d.models.is_none());
        assert_eq!(a.apply(&d).unwrap(), b);

        // Removing the first endpoint shifts the indices: the models come along.
        let mut c = b.clone();
        c.version = 3;
        c.endpoints.remove(0);
        c.endpoints.push(endpoint("http://c:3", 3));
        c.models[0].endpoints = vec![0, 1];
        let d = b.diff(&c).unwrap();
        assert_eq!(d.remove, vec!["http://a:1".to_owned()]);
        assert_eq!(b.apply(&d).unwrap(), c);

        // A reorder cannot be a delta.
        let mut r = a.clone();
        r.version = 2;
        r.endpoints.swap(0, 1);
        assert!(a.diff(&r).is_none());
    }

    #[test]
    fn deltas_apply_only_to_their_base_and_only_forward() {
        let a = snapshot();
        let mut b = a.clone();
        b.version = 5;
        b.endpoints[0].healthy = false;
        let d = a.diff(&b).unwrap();
        assert!(matches!(
            b.apply(&d),
            Err(SnapshotError::DeltaBase { base: 1, have: 5 })
        ));
        let backwards = SnapshotDelta {
            base: 1,
            version: 1,
            ..Default::default()
        };
        assert!(matches!(a.apply(&backwards), Err(SnapshotError::DeltaVersion(1))));
        let broken = SnapshotDelta {
            base: 1,
            version: 2,
            remove: vec!["http://b:2".into()],
            ..Default::default()
        };
        assert!(matches!(a.apply(&broken), Err(SnapshotError::BadEndpointIndex { .. })));
    }

    #[test]
    fn stream_messages_are_tagged_lines() {
        let m = StreamMessage::Heartbeat { version: 7 };
        let line = serde_json::to_string(&m).unwrap();
        assert_eq!(line, r#"{"type":"heartbeat","version":7}"#);
        assert_eq!(serde_json::from_str::<StreamMessage>(&line).unwrap(), m);
        assert!(serde_json::from_str::<StreamMessage>(r#"{"type":"nope"}"#).is_err());
    }

    #[test]
    fn routable_models_need_a_healthy_endpoint() {
        let mut s = snapshot();
        assert_eq!(s.routable_models().count(), 1);
        s.endpoints.iter_mut().for_each(|e| e.healthy = false);
        assert_eq!(s.routable_models().count(), 0);
    }
}
