//! The simulator's KV event publisher, after vLLM's `ZmqEventPublisher`: a ZeroMQ PUB socket
//! sending `[topic, seq (8 bytes, big-endian), msgpack EventBatch]`, and an optional ROUTER
//! socket replaying the last `buffer_steps` batches on request. The events themselves are
//! made by the engine (`engine.rs`) from its pool operations; this module only numbers,
//! encodes, buffers and sends them, and injects the faults tests ask for (lost batches).
//!
//! It is not a libzmq: no high-water mark to configure (the crate's PUB queue drops for a slow
//! subscriber, as libzmq does past its mark), and the engine's queue to it is unbounded.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::time::{SystemTime, UNIX_EPOCH};

use anyhow::Context;
use bytes::Bytes;
use lmstack_kv::event::{
    Batch, END_SEQ, Encoding, Event, Extra, Removed, Stored, decode_seq, encode_batch, encode_seq,
};
use serde_json::{Value, json};
use tokio::sync::mpsc;
use zeromq::{PubSocket, RouterSocket, Socket, SocketRecv, SocketSend, ZmqMessage};

use super::kv::BlockExtras;

/// vLLM's defaults for what the simulator does not model (`KVEventsConfig`).
const HWM: usize = 100_000;
const MAX_QUEUE_SIZE: usize = 100_000;

/// Where and how to publish.
#[derive(Clone, Debug)]
pub struct KvEventsConfig {
    /// The address both sockets bind (the simulator's `--host`).
    pub host: String,
    /// The PUB socket's port.
    pub port: u16,
    /// The ROUTER (replay) socket's port; `None`: no replay.
    pub replay_port: Option<u16>,
    /// Batches kept for replay.
    pub buffer_steps: usize,
    /// The first frame of every message.
    pub topic: String,
    pub encoding: Encoding,
}

/// A fault to inject on the wire, from `POST /sim/kv_events`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields)]
pub struct Fault {
    /// The next `skip` batches are numbered and buffered for replay, but not sent: lost on the
    /// wire, as ZeroMQ drops them under load.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub skip: Option<u64>,
    /// While paused, batches are numbered and buffered for replay, but not sent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pause: Option<bool>,
}

#[derive(Debug)]
pub(crate) enum Command {
    Batch(Batch),
    Fault(Fault),
}

/// The engine's handle: queues batches in the order the pool produced them.
#[derive(Clone, Debug)]
pub struct EventSink {
    tx: mpsc::UnboundedSender<Command>,
}

impl EventSink {
    /// Publishes one engine step's events (nothing when there are none), stamped now, from
    /// data-parallel rank 0.
    pub fn publish(&self, events: Vec<Event>) {
        if events.is_empty() {
            return;
        }
        let ts = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0.0, |d| d.as_secs_f64());
        let batch = Batch {
            ts,
            events,
            dp_rank: Some(0),
        };
        // The publisher only stops with the runtime.
        let _ = self.tx.send(Command::Batch(batch));
    }
}

/// What one request's blocks carry into a `BlockStored`, beyond hashes and tokens.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RequestKv {
    pub extras: BlockExtras,
    /// The LoRA adapter's numeric id (vLLM still publishes it).
    pub lora_id: Option<i64>,
    /// Announce the blocks found in the cache too (vLLM's `kv_cache_report_mode` `full`).
    pub report_cached: bool,
}

/// `BlockStored` for the full blocks `first..first + hashes.len()` of a prompt: `tokens` are
/// those blocks' tokens, `parent` the hash of block `first - 1`. As vLLM 0.32 writes it:
/// one extra-keys entry per block (nil for a block without any), group 0, full attention.
pub fn stored(
    hashes: &[u64],
    parent: Option<u64>,
    tokens: &[u32],
    first: usize,
    block_size: usize,
    kv: &RequestKv,
) -> Event {
    let extra_keys = (first..first + hashes.len())
        .map(|i| {
            let keys = kv.extras.keys(i);
            (!keys.is_empty()).then(|| keys.into_iter().map(|k| Extra::Text(k.to_owned())).collect())
        })
        .collect();
    Event::Stored(Stored {
        hashes: hashes.to_vec(),
        parent,
        token_ids: tokens.to_vec(),
        block_size: block_size as u32,
        lora_name: kv.extras.lora_name.clone(),
        lora_id: kv.lora_id,
        medium: Some("GPU".to_owned()),
        extra_keys: Some(extra_keys),
        group: Some(0),
        spec_kind: Some("full_attention".to_owned()),
    })
}

/// `BlockRemoved` for one evicted block, as vLLM emits them (one event per block).
pub fn removed(hash: u64) -> Event {
    Event::Removed(Removed {
        hashes: vec![hash],
        medium: Some("GPU".to_owned()),
        group: Some(0),
    })
}

/// A sink whose batches land in the returned queue (for the engine's tests).
#[cfg(test)]
pub(crate) fn test_sink() -> (EventSink, mpsc::UnboundedReceiver<Command>) {
    let (tx, rx) = mpsc::unbounded_channel();
    (EventSink { tx }, rx)
}

/// The running publisher.
pub struct Publisher {
    sink: EventSink,
    sources: Value,
}

impl Publisher {
    /// Binds the sockets and starts publishing (and replaying) on the current runtime.
    pub async fn start(config: KvEventsConfig) -> anyhow::Result<Self> {
        // ZeroMQ writes an IPv6 address in brackets.
        let host = if config.host.contains(':') {
            format!("[{}]", config.host)
        } else {
            config.host.clone()
        };
        let mut publisher = PubSocket::new();
        let endpoint = format!("tcp://{host}:{}", config.port);
        publisher
            .bind(&endpoint)
            .await
            .with_context(|| format!("cannot bind the KV events socket on {endpoint}"))?;
        let buffer = Arc::new(Mutex::new(VecDeque::with_capacity(config.buffer_steps.min(1024))));
        let topic = Bytes::from(config.topic.clone().into_bytes());
        if let Some(port) = config.replay_port {
            let mut router = RouterSocket::new();
            let endpoint = format!("tcp://{host}:{port}");
            router
                .bind(&endpoint)
                .await
                .with_context(|| format!("cannot bind the KV events replay socket on {endpoint}"))?;
            tokio::spawn(replay(router, buffer.clone(), topic.clone()));
        }
        let (tx, rx) = mpsc::unbounded_channel();
        tokio::spawn(publish(rx, publisher, buffer, topic, config.clone()));
        let sources = json!({"0": {
            "enable_kv_cache_events": true,
            "publisher": "zmq",
            "endpoint": format!("tcp://*:{}", config.port),
            "replay_endpoint": config.replay_port.map(|p| format!("tcp://*:{p}")),
            "buffer_steps": config.buffer_steps,
            "hwm": HWM,
            "max_queue_size": MAX_QUEUE_SIZE,
            "topic": config.topic,
        }});
        Ok(Self {
            sink: EventSink { tx },
            sources,
        })
    }

    pub fn sink(&self) -> EventSink {
        self.sink.clone()
    }

    /// vLLM's `/kv_event_sources`: the publisher's configuration per data-parallel rank.
    pub fn sources(&self) -> &Value {
        &self.sources
    }

    /// Applies `fault` from the next batch queued after it.
    pub fn inject(&self, fault: Fault) {
        let _ = self.sink.tx.send(Command::Fault(fault));
    }
}

type ReplayBuffer = Arc<Mutex<VecDeque<(i64, Bytes)>>>;

fn lock(buffer: &ReplayBuffer) -> std::sync::MutexGuard<'_, VecDeque<(i64, Bytes)>> {
    buffer.lock().unwrap_or_else(|p| p.into_inner())
}

fn message(frames: Vec<Bytes>) -> Option<ZmqMessage> {
    ZmqMessage::try_from(frames).ok()
}

/// Numbers each batch (from 0), buffers it for replay, then sends it unless a fault says not.
async fn publish(
    mut rx: mpsc::UnboundedReceiver<Command>,
    mut socket: PubSocket,
    buffer: ReplayBuffer,
    topic: Bytes,
    config: KvEventsConfig,
) {
    let (mut seq, mut skip, mut paused) = (0i64, 0u64, false);
    while let Some(command) = rx.recv().await {
        let batch = match command {
            Command::Batch(batch) => batch,
            Command::Fault(fault) => {
                skip += fault.skip.unwrap_or(0);
                paused = fault.pause.unwrap_or(paused);
                continue;
            }
        };
        let payload = Bytes::from(encode_batch(&batch, config.encoding));
        // Buffered before it is sent: a subscriber that sees a gap can always replay up to the
        // batch that showed it.
        if config.buffer_steps > 0 {
            let mut b = lock(&buffer);
            if b.len() == config.buffer_steps {
                b.pop_front();
            }
            b.push_back((seq, payload.clone()));
        }
        let lost = if skip > 0 {
            skip -= 1;
            true
        } else {
            paused
        };
        if !lost {
            let frames = vec![topic.clone(), Bytes::copy_from_slice(&encode_seq(seq)), payload];
            if let Some(m) = message(frames)
                && let Err(e) = socket.send(m).await
            {
                tracing::warn!("KV events: cannot send batch {seq}: {e}");
            }
        }
        seq += 1;
    }
}

/// Serves replay requests as vLLM does: `[client, "", start seq]` is answered with
/// `[client, "", topic, seq, payload]` for every buffered batch from `start` on, then
/// `[client, "", "", -1, ""]`.
async fn replay(mut socket: RouterSocket, buffer: ReplayBuffer, topic: Bytes) {
    loop {
        let request = match socket.recv().await {
            Ok(m) => m.into_vec(),
            Err(e) => {
                tracing::warn!("KV events replay socket: {e}");
                return;
            }
        };
        let [client, _, start] = request.as_slice() else {
            tracing::warn!("KV events: a replay request of {} frames, not 3", request.len());
            continue;
        };
        let Ok(start) = decode_seq(start) else {
            tracing::warn!(
                "KV events: a replay request whose sequence is {} bytes, not 8",
                start.len()
            );
            continue;
        };
        let batches: Vec<(i64, Bytes)> = lock(&buffer).iter().filter(|(seq, _)| *seq >= start).cloned().collect();
        let empty = Bytes::new();
        let replies = batches
            .into_iter()
            .map(|(seq, payload)| {
                vec![
                    client.clone(),
                    empty.clone(),
                    topic.clone(),
                    Bytes::copy_from_slice(&encode_seq(seq)),
                    payload,
                ]
            })
            .chain([vec![
                client.clone(),
                empty.clone(),
                empty.clone(),
                Bytes::copy_from_slice(&encode_seq(END_SEQ)),
                empty.clone(),
            ]]);
        for frames in replies {
            let Some(m) = message(frames) else { continue };
            if let Err(e) = socket.send(m).await {
                tracing::debug!("KV events: replay to a client that left: {e}");
                break;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stored_carries_one_extra_keys_entry_per_block() {
        let kv = RequestKv {
            extras: BlockExtras {
                lora_name: None,
                cache_salt: Some("team".into()),
            },
            ..Default::default()
        };
        let Event::Stored(s) = stored(&[1, 2], None, &[0; 8], 0, 4, &kv) else {
            panic!("not a BlockStored");
        };
        assert_eq!(s.extra_keys, Some(vec![Some(vec![Extra::Text("team".into())]), None]));
        let Event::Stored(s) = stored(&[3], Some(2), &[0; 4], 2, 4, &RequestKv::default()) else {
            panic!("not a BlockStored");
        };
        assert_eq!((s.parent, s.extra_keys), (Some(2), Some(vec![None])));
        assert_eq!(
            (s.medium.as_deref(), s.group, s.spec_kind.as_deref()),
            (Some("GPU"), Some(0), Some("full_attention"))
        );
    }

    #[test]
    fn faults_parse_strictly() {
        let f: Fault = serde_json::from_str(r#"{"skip": 3}"#).unwrap();
        assert_eq!(
            f,
            Fault {
                skip: Some(3),
                pause: None
            }
        );
        assert!(serde_json::from_str::<Fault>(r#"{"drop": 3}"#).is_err());
    }
}
