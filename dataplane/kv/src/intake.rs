//! Following engines' KV events (feature `intake`): registration, ZeroMQ subscriptions per
//! data-parallel rank, replays, and the [`EngineIndex`] they feed. Used by the router (which
//! subscribes itself when it discovers engines on its own) and by lmstack-control (which
//! subscribes once and relays the index's changes to every router replica).
//!
//! [`follow`] runs for one engine until its task is dropped:
//! 1. **Registration**: the engine's `/metrics` and `/kv_event_sources` are read once, and
//!    what routing relies on is checked (vLLM's load metric names, prefix caching on, the
//!    block size); each check's result goes to the [`Observer`], problems are logged.
//! 2. **Subscription**: one ZeroMQ SUB per rank; batches are applied in order to the engine's
//!    index. A gap is replayed from the rank's replay socket when it has one (else the index
//!    drops the rank's blocks), and so is everything before the first batch seen when the
//!    publisher had already sent some (so that a late subscriber knows the chains later blocks
//!    hang from); a lost connection (a restart) drops the whole index, and the engine
//!    registers again after `retry`.
//!
//! An engine that publishes nothing is looked at again every 30 `retry`s; one that does not
//! answer (down, restarting) every `retry`.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use lmstack_probe::BackendUrl;
use zeromq::{Socket, SocketEvent, SocketRecv, SocketSend};

use crate::event::{self, Batch};
use crate::index::{ClearReason, Dropped, EngineIndex, Held, IndexLimits, IndexStats, SeqCheck};

/// Where publishers are when engines do not say, and the intake's limits.
#[derive(Clone, Debug)]
pub struct IntakeConfig {
    /// Per backend URL, its publisher (`tcp://host:port`).
    pub endpoints: BTreeMap<String, String>,
    /// The publisher of other engines without `/kv_event_sources` (`{host}`: the engine's
    /// host); empty: none.
    pub endpoint_template: String,
    /// The ZeroMQ topic subscribed to (empty: all).
    pub topic: String,
    /// Blocks indexed per engine at most.
    pub max_blocks: usize,
    /// Time to connect to a publisher, and to read the engine's registration pages.
    pub connect_timeout: Duration,
    /// Time for a replay of missed batches.
    pub replay_timeout: Duration,
    /// Time before registering again after a lost subscription.
    pub retry: Duration,
}

/// Whether an engine's events are followed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SourceState {
    /// It publishes none (no `/kv_event_sources`, no configured publisher).
    None,
    /// It should, but the subscription is not up.
    Down,
    /// Its batches are being applied.
    Live,
}

/// Counts since the observer last heard, for its metrics.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Counts {
    pub applied: u64,
    pub dropped: Vec<(Dropped, u64)>,
    pub clears: Vec<(ClearReason, u64)>,
    pub replayed: u64,
    pub malformed_frames: u64,
}

impl Counts {
    /// What changed in `stats` since `published`, which becomes `stats`.
    pub fn since(stats: &IndexStats, published: &mut IndexStats) -> Counts {
        let delta = |now: Option<&u64>, then: Option<&u64>| now.copied().unwrap_or(0) - then.copied().unwrap_or(0);
        let counts = Counts {
            applied: stats.events_applied - published.events_applied,
            dropped: Dropped::ALL
                .iter()
                .map(|w| (*w, delta(stats.events_dropped.get(w), published.events_dropped.get(w))))
                .filter(|(_, n)| *n > 0)
                .collect(),
            clears: ClearReason::ALL
                .iter()
                .map(|r| (*r, delta(stats.clears.get(r), published.clears.get(r))))
                .filter(|(_, n)| *n > 0)
                .collect(),
            ..Counts::default()
        };
        *published = stats.clone();
        counts
    }
}

/// What the follower reports; the router turns it into metrics and routing modes, control
/// into deltas for its streams.
pub trait Observer: Send + Sync + 'static {
    /// A registration check's result (`check` as in `lmstack_kv_compat_problem`).
    fn check(&self, url: &str, check: &'static str, problem: bool);
    /// The engine's events are followed, or not.
    fn source(&self, url: &str, state: SourceState);
    /// A batch arrived.
    fn received(&self, url: &str);
    /// Events applied, dropped, index drops and replays since the last call.
    fn counted(&self, url: &str, counts: &Counts);
    /// After each applied batch, with the index (to take its changes).
    fn applied(&self, _url: &str, _index: &mut EngineIndex) {}
    /// The whole index was dropped (`held` is empty and not fresh now).
    fn dropped(&self, url: &str, reason: ClearReason);
}

#[derive(Debug, thiserror::Error)]
pub enum IntakeError {
    #[error("connecting to {endpoint}: {error}")]
    Connect { endpoint: String, error: String },
    #[error("rank {0}'s publisher disconnected")]
    Lost(u32),
    #[error("replay: {0}")]
    Replay(String),
}

/// Registers the engine at `url` and follows its events into `held`, for as long as the
/// task runs.
pub async fn follow(config: Arc<IntakeConfig>, url: Arc<str>, held: Arc<Held>, observer: Arc<dyn Observer>) {
    loop {
        let (sources, compat) = register(&config, &url, &held, &*observer).await;
        if sources.is_empty() {
            // Publishing nothing, or not answering at all (unknown yet).
            let state = if compat.scraped {
                SourceState::None
            } else {
                SourceState::Down
            };
            observer.source(&url, state);
            // An engine that answered publishes nothing: it may gain a publisher on restart,
            // look again now and then. One that did not answer (down, restarting) is looked
            // at again soon.
            let pause = if compat.scraped {
                config.retry * 30
            } else {
                config.retry
            };
            tokio::time::sleep(pause).await;
            continue;
        }
        observer.source(&url, SourceState::Down);
        if let Err(e) = subscribe(&config, &url, &held, &*observer, &sources, &compat).await {
            tracing::warn!(endpoint = %url, error = %e, "KV events subscription failed; routing this engine approximately until it is back");
            if matches!(e, IntakeError::Connect { .. }) {
                observer.check(&url, "kv_events_unreachable", true);
            }
        }
        observer.source(&url, SourceState::Down);
        // Counted only when there was an index to drop (not on every failed attempt).
        if held.blocks() > 0 || held.is_fresh() {
            tracing::info!(endpoint = %url, "KV index dropped: the subscription was lost");
            held.set_fresh(false);
            held.reset();
            observer.dropped(&url, ClearReason::Identity);
        }
        tokio::time::sleep(config.retry).await;
    }
}

/// Where an engine publishes, per data-parallel rank.
#[derive(Clone, Debug, PartialEq)]
pub struct Source {
    rank: u32,
    endpoint: String,
    replay: Option<String>,
}

/// Reads what routing relies on from the engine, reports what does not match, and returns
/// its publishers.
async fn register(config: &IntakeConfig, url: &str, held: &Held, observer: &dyn Observer) -> (Vec<Source>, Compat) {
    let Ok(base) = BackendUrl::parse(url) else {
        return (Vec::new(), Compat::default());
    };
    let timeout = config.connect_timeout;
    let fetch = |path: &'static str| {
        let base = base.clone();
        async move {
            tokio::task::spawn_blocking(move || {
                let addr = base.resolve().ok()?;
                let r = lmstack_probe::client::get(addr, &base.authority(), path, timeout, 4 << 20).ok()?;
                (r.status == 200).then_some(r.body)
            })
            .await
            .ok()
            .flatten()
        }
    };
    let (metrics_text, sources_body) = (fetch("/metrics").await, fetch("/kv_event_sources").await);
    let report = Compat::read(metrics_text.as_deref());
    for (check, problem) in report.problems() {
        if let Some(p) = &problem {
            tracing::warn!(endpoint = url, check, "{p}");
        }
        observer.check(url, check, problem.is_some());
    }
    if let Some(bs) = report.block_size {
        held.set_block_size(bs);
    }
    let host = base.host.clone();
    let sources = if let Some(e) = config.endpoints.get(url) {
        vec![Source {
            rank: 0,
            endpoint: e.clone(),
            replay: None,
        }]
    } else if let Some(s) = sources_body
        .as_deref()
        .map(|b| parse_sources(b, &host))
        .filter(|s| !s.is_empty())
    {
        s
    } else if !config.endpoint_template.is_empty() {
        vec![Source {
            rank: 0,
            endpoint: config.endpoint_template.replace("{host}", &host),
            replay: None,
        }]
    } else {
        Vec::new()
    };
    if sources.is_empty() {
        tracing::info!(
            endpoint = url,
            "the engine publishes no KV events (no /kv_event_sources, no kv_events.endpoints entry): routed approximately"
        );
    } else {
        tracing::info!(endpoint = url, sources = ?sources, hash_algo = report.hash_algo.as_deref().unwrap_or("?"), "subscribing to KV events");
    }
    (sources, report)
}

/// `/kv_event_sources`: `{rank: {endpoint, replay_endpoint, topic, publisher, ...}}`, the
/// endpoints as the engine bound them (`*` or an IPv6 wildcard stand for its host).
pub fn parse_sources(body: &[u8], host: &str) -> Vec<Source> {
    let Ok(serde_json::Value::Object(ranks)) = serde_json::from_slice(body) else {
        return Vec::new();
    };
    let mut out: Vec<Source> = ranks
        .iter()
        .filter_map(|(rank, c)| {
            if c.get("publisher").and_then(|p| p.as_str()).is_some_and(|p| p != "zmq") {
                return None;
            }
            let endpoint = connectable(c.get("endpoint")?.as_str()?, host)?;
            let replay = c
                .get("replay_endpoint")
                .and_then(|r| r.as_str())
                .and_then(|r| connectable(r, host));
            Some(Source {
                rank: rank.parse().ok()?,
                endpoint,
                replay,
            })
        })
        .collect();
    out.sort_by_key(|s| s.rank);
    out
}

/// A bound endpoint as a subscriber connects to it: `tcp://*:5557`, `tcp://[::]:5557` and
/// `tcp://[::ffff:127.0.0.1]:5557` become `tcp://HOST:5557`.
pub fn connectable(endpoint: &str, host: &str) -> Option<String> {
    if endpoint.starts_with("ipc://") {
        return Some(endpoint.to_owned());
    }
    let rest = endpoint.strip_prefix("tcp://")?;
    let (h, port) = rest.rsplit_once(':')?;
    port.parse::<u16>().ok()?;
    let h = h.trim_start_matches('[').trim_end_matches(']');
    let h = match h {
        "*" | "::" | "0.0.0.0" => host,
        h => h.strip_prefix("::ffff:").unwrap_or(h),
    };
    Some(if h.contains(':') {
        format!("tcp://[{h}]:{port}")
    } else {
        format!("tcp://{h}:{port}")
    })
}

/// What registration found in the engine's `/metrics`.
#[derive(Debug, Default)]
pub struct Compat {
    scraped: bool,
    names: Vec<&'static str>,
    prefix_caching: Option<bool>,
    block_size: Option<u32>,
    num_gpu_blocks: Option<u64>,
    hash_algo: Option<String>,
    /// `vllm:prefix_cache_queries_total`: 0 when the engine has served no request.
    queries: Option<f64>,
}

impl Compat {
    /// The metric names routing reads (any one of each group).
    const NEEDED: [(&'static str, &'static [&'static str]); 4] = [
        ("metric_running", &["vllm:num_requests_running"]),
        ("metric_waiting", &["vllm:num_requests_waiting"]),
        (
            "metric_kv_usage",
            &["vllm:kv_cache_usage_perc", "vllm:gpu_cache_usage_perc"],
        ),
        (
            "metric_prefix_hits",
            &["vllm:prefix_cache_hits_total", "vllm:gpu_prefix_cache_hits_total"],
        ),
    ];

    pub fn read(text: Option<&[u8]>) -> Compat {
        let Some(text) = text.and_then(|t| std::str::from_utf8(t).ok()) else {
            return Compat::default();
        };
        let mut c = Compat {
            scraped: true,
            ..Compat::default()
        };
        for line in text.lines().filter(|l| !l.starts_with('#')) {
            let name = line.split(['{', ' ']).next().unwrap_or("");
            if matches!(
                name,
                "vllm:prefix_cache_queries_total" | "vllm:gpu_prefix_cache_queries_total"
            ) {
                let v: f64 = line.rsplit(' ').next().and_then(|v| v.parse().ok()).unwrap_or(f64::NAN);
                c.queries = Some(c.queries.unwrap_or(0.0) + v);
            }
            for (check, names) in Self::NEEDED {
                if names.contains(&name) && !c.names.contains(&check) {
                    c.names.push(check);
                }
            }
            if name == "vllm:cache_config_info" {
                let label = |key: &str| {
                    let at = line.find(&format!("{key}=\""))? + key.len() + 2;
                    let end = line[at..].find('"')?;
                    Some(line[at..at + end].to_owned())
                };
                c.prefix_caching = label("enable_prefix_caching").map(|v| v == "True");
                c.block_size = label("block_size").and_then(|v| v.parse().ok());
                c.num_gpu_blocks = label("num_gpu_blocks").and_then(|v| v.parse().ok());
                c.hash_algo = label("prefix_caching_hash_algo");
            }
        }
        c
    }

    /// Each check with its problem, if any.
    pub fn problems(&self) -> Vec<(&'static str, Option<String>)> {
        let mut out = vec![(
            "metrics",
            (!self.scraped)
                .then(|| "its /metrics cannot be read: load figures and cache checks are missing".to_owned()),
        )];
        if !self.scraped {
            return out;
        }
        for (check, names) in Self::NEEDED {
            out.push((
                check,
                (!self.names.contains(&check))
                    .then(|| format!("its /metrics has none of {names:?}: routing cannot see that figure")),
            ));
        }
        out.push((
            "prefix_caching",
            (self.prefix_caching == Some(false))
                .then(|| "prefix caching is off (--enable-prefix-caching): nothing to route on".to_owned()),
        ));
        out.push((
            "block_size",
            self.block_size
                .is_none()
                .then(|| "vllm:cache_config_info gives no block_size: known once events arrive".to_owned()),
        ));
        out
    }
}

/// Subscribes to every rank and applies their batches until a connection is lost.
async fn subscribe(
    config: &IntakeConfig,
    url: &str,
    held: &Arc<Held>,
    observer: &dyn Observer,
    sources: &[Source],
    compat: &Compat,
) -> Result<(), IntakeError> {
    let timeout = config.connect_timeout;
    let (tx, mut rx) = tokio::sync::mpsc::channel::<Input>(1024);
    let mut readers = Vec::new();
    for source in sources {
        let mut socket = zeromq::SubSocket::new();
        let monitor = socket.monitor();
        let connect = |e: String| IntakeError::Connect {
            endpoint: source.endpoint.clone(),
            error: e,
        };
        tokio::time::timeout(timeout, socket.connect(&source.endpoint))
            .await
            .map_err(|_| connect("timed out".into()))?
            .map_err(|e| connect(e.to_string()))?;
        socket
            .subscribe(&config.topic)
            .await
            .map_err(|e| connect(e.to_string()))?;
        readers.push(tokio::spawn(read(socket, monitor, source.rank, tx.clone())));
    }
    drop(tx);
    observer.check(url, "kv_events_unreachable", false);
    let mut index = EngineIndex::new(
        held.clone(),
        IndexLimits {
            max_blocks: config.max_blocks,
        },
    );
    if let Some(blocks) = compat.num_gpu_blocks {
        index.set_capacity(blocks);
    }
    if compat.queries == Some(0.0) {
        // It has served nothing: it holds nothing, and the index starts complete.
        index.started_empty();
    }
    held.set_fresh(true);
    observer.source(url, SourceState::Live);
    observer.applied(url, &mut index);
    tracing::info!(endpoint = url, "KV events subscribed: routing this engine exactly");
    let mut published = IndexStats::default();
    let result = loop {
        let Some(input) = rx.recv().await else {
            break Ok(());
        };
        match input {
            Input::Lost(rank) => break Err(IntakeError::Lost(rank)),
            Input::Bad(e) => {
                observer.counted(
                    url,
                    &Counts {
                        malformed_frames: 1,
                        ..Counts::default()
                    },
                );
                tracing::debug!(endpoint = url, error = %e, "undecodable KV event frame");
            }
            Input::Batch(rank, seq, batch) => {
                observer.received(url);
                // A gap, or joining a publisher that already sent batches: what was missed is
                // asked of the replay socket (from its start, when joining), when there is one.
                let missed = match index.check_seq(rank, seq) {
                    SeqCheck::Gap { from, to } => Some((from, to)),
                    SeqCheck::InOrder if !index.seen(rank) && seq > 0 => Some((0, seq)),
                    _ => None,
                };
                if let Some((from, to)) = missed
                    && let Some(replay) = sources
                        .iter()
                        .find(|s| s.rank == rank)
                        .and_then(|s| s.replay.as_deref())
                {
                    match fetch_replay(replay, from, to, config.replay_timeout).await {
                        Ok(batches) => {
                            for (s, b) in &batches {
                                index.apply(*s, b, now_ms());
                            }
                            index.replayed(rank, to);
                            observer.counted(
                                url,
                                &Counts {
                                    replayed: batches.len() as u64,
                                    ..Counts::default()
                                },
                            );
                        }
                        Err(e) => {
                            tracing::warn!(endpoint = url, error = %e, from, to, "KV events replay failed; dropping the index")
                        }
                    }
                }
                let check = index.apply(seq, &batch, now_ms());
                if matches!(check, SeqCheck::Gap { .. } | SeqCheck::Backwards) {
                    tracing::info!(endpoint = url, rank, seq, verdict = ?check, "KV event sequence broke: index dropped, refilling from events");
                }
                observer.counted(url, &Counts::since(index.stats(), &mut published));
                observer.applied(url, &mut index);
            }
        }
    };
    for r in readers {
        r.abort();
    }
    result
}

enum Input {
    Batch(u32, i64, Batch),
    Bad(String),
    Lost(u32),
}

async fn read(
    mut socket: zeromq::SubSocket,
    mut monitor: impl futures_util::Stream<Item = SocketEvent> + Unpin,
    rank: u32,
    tx: tokio::sync::mpsc::Sender<Input>,
) {
    use futures_util::StreamExt as _;
    loop {
        let input = tokio::select! {
            msg = socket.recv() => match msg {
                Ok(m) => decode(&m, rank),
                Err(_) => Input::Lost(rank),
            },
            ev = monitor.next() => match ev {
                Some(SocketEvent::Disconnected(_)) | None => Input::Lost(rank),
                Some(_) => continue,
            },
        };
        let lost = matches!(input, Input::Lost(_));
        if tx.send(input).await.is_err() || lost {
            return;
        }
    }
}

/// `[topic, seq, payload]` (a publisher without a topic may send `[seq, payload]`).
fn decode(m: &zeromq::ZmqMessage, rank: u32) -> Input {
    let frames: Vec<&[u8]> = m.iter().map(|b| b.as_ref()).collect();
    let (seq, payload) = match frames.as_slice() {
        [_, seq, payload] | [seq, payload] => (seq, payload),
        _ => return Input::Bad(format!("{} frames", frames.len())),
    };
    match (event::decode_seq(seq), event::decode_batch(payload)) {
        (Ok(seq), Ok(mut batch)) => {
            // The subscription's rank wins over what the batch says (older releases omit it).
            batch.dp_rank = Some(batch.dp_rank.unwrap_or(rank));
            Input::Batch(rank, seq, batch)
        }
        (Err(e), _) | (_, Err(e)) => Input::Bad(e.to_string()),
    }
}

/// Asks the engine's replay socket for batches `from..to`.
async fn fetch_replay(endpoint: &str, from: i64, to: i64, timeout: Duration) -> Result<Vec<(i64, Batch)>, IntakeError> {
    let replay = |e: String| IntakeError::Replay(e);
    tokio::time::timeout(timeout, async {
        let mut socket = zeromq::DealerSocket::new();
        socket.connect(endpoint).await.map_err(|e| replay(e.to_string()))?;
        let mut request = zeromq::ZmqMessage::from(bytes::Bytes::new());
        request.push_back(bytes::Bytes::copy_from_slice(&event::encode_seq(from)));
        socket.send(request).await.map_err(|e| replay(e.to_string()))?;
        let mut out = Vec::new();
        loop {
            let m = socket.recv().await.map_err(|e| replay(e.to_string()))?;
            let frames: Vec<&[u8]> = m.iter().map(|b| b.as_ref()).collect();
            // [empty, topic, seq, payload]; the end is seq -1.
            let [_, _, seq, payload] = frames.as_slice() else {
                return Err(replay(format!("a replay message of {} frames", frames.len())));
            };
            let seq = event::decode_seq(seq).map_err(|e| replay(e.to_string()))?;
            if seq == event::END_SEQ {
                break;
            }
            if seq < to {
                out.push((seq, event::decode_batch(payload).map_err(|e| replay(e.to_string()))?));
            }
        }
        let covered = out.first().is_some_and(|(s, _)| *s == from) && out.len() as i64 == to - from;
        if !covered {
            return Err(replay(format!("the replay buffer no longer holds {from}..{to}")));
        }
        Ok(out)
    })
    .await
    .map_err(|_| replay("timed out".into()))?
}

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bound_endpoints_become_connectable() {
        assert_eq!(
            connectable("tcp://*:5557", "10.0.0.5").as_deref(),
            Some("tcp://10.0.0.5:5557")
        );
        assert_eq!(
            connectable("tcp://[::ffff:127.0.0.1]:5557", "h").as_deref(),
            Some("tcp://127.0.0.1:5557")
        );
        assert_eq!(connectable("tcp://[::]:6000", "h").as_deref(), Some("tcp://h:6000"));
        assert_eq!(
            connectable("tcp://[fd00::1]:6000", "h").as_deref(),
            Some("tcp://[fd00::1]:6000")
        );
        assert_eq!(
            connectable("ipc:///tmp/kv.ipc", "h").as_deref(),
            Some("ipc:///tmp/kv.ipc")
        );
        assert_eq!(connectable("tcp://nohost", "h"), None);
    }

    #[test]
    fn sources_come_per_rank() {
        let body = br#"{"1": {"publisher": "zmq", "endpoint": "tcp://*:5558", "replay_endpoint": null},
                        "0": {"publisher": "zmq", "endpoint": "tcp://*:5557", "replay_endpoint": "tcp://*:5600"}}"#;
        let s = parse_sources(body, "e1");
        assert_eq!(s.len(), 2);
        assert_eq!(s[0].endpoint, "tcp://e1:5557");
        assert_eq!(s[0].replay.as_deref(), Some("tcp://e1:5600"));
        assert_eq!(s[1].rank, 1);
        assert!(parse_sources(b"{}", "h").is_empty());
        assert!(parse_sources(br#"{"0": {"publisher": "null", "endpoint": "tcp://*:1"}}"#, "h").is_empty());
    }

    #[test]
    fn registration_reads_the_real_engine_metrics() {
        let text = include_bytes!("../../../control/snapshot/tests/fixtures/vllm-0.32-cpu-metrics.txt");
        let c = Compat::read(Some(text));
        assert_eq!(c.block_size, Some(32));
        assert_eq!(c.prefix_caching, Some(true));
        assert_eq!(c.hash_algo.as_deref(), Some("sha256"));
        assert!(c.problems().iter().all(|(_, p)| p.is_none()), "{:?}", c.problems());
        let bare = Compat::read(Some(b"vllm:num_requests_running 1\n"));
        let problems: Vec<_> = bare
            .problems()
            .into_iter()
            .filter(|(_, p)| p.is_some())
            .map(|(c, _)| c)
            .collect();
        assert_eq!(
            problems,
            ["metric_waiting", "metric_kv_usage", "metric_prefix_hits", "block_size"]
        );
    }
}
