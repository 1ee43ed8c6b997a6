//! Stored Responses: which endpoint holds which `/v1/responses` answer, so that a request
//! naming one (`previous_response_id`, `GET /v1/responses/{id}`, `POST .../cancel`) goes to
//! the only engine that can take it (vLLM keeps its stored responses in process).
//!
//! The map is an affinity table of its own (`SnapshotCell::responses`: lock-free, bounded,
//! shared by all workers; one single-block entry per id, keyed by a hash of the id), fed as
//! answers pass (`learn`) and by other replicas through control (`AffinityEntry::responses`).
//! An id it does not know (evicted, the router restarted, another replica's answer not
//! relayed yet) is asked about: `GET /v1/responses/{id}` on every candidate endpoint at
//! once, the first `200` wins (`locate`). Not here: reading ids from answers (lmstack-http's
//! `stored`), or forwarding (proxy.rs).

use bytes::Bytes;
use futures_util::StreamExt;
use futures_util::stream::FuturesUnordered;
use lmstack_snapshot::AffinityEntry;

use crate::ctx::WorkerCtx;
use crate::error::{ErrorKind, ProxyError};
use crate::metrics;
use crate::state::{EndpointState, RoutingState};
use crate::upstream;

/// The map's key for a response id (seeded apart from prompt blocks and sessions).
pub fn key(id: &str) -> u64 {
    xxhash_rust::xxh3::xxh3_64_with_seed(id.as_bytes(), 0x7265_7370_6f6e_7365)
}

/// Records that `endpoint` holds the response `id`, and tells the other replicas.
pub fn learn(ctx: &WorkerCtx, endpoint: &EndpointState, id: &str) {
    let Some(tag) = endpoint.response_tag else { return };
    let cell = &ctx.shared.cell;
    let k = key(id);
    cell.responses.record(&[k], tag, cell.now_ms());
    ::metrics::counter!(metrics::RESPONSES_LEARNED_TOTAL, "status" => "answer").increment(1);
    ctx.share_assignment(|| AffinityEntry {
        endpoint: endpoint.url.to_string(),
        responses: vec![k],
        ..AffinityEntry::default()
    });
}

/// What an endpoint said about an id.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Answer {
    Has,
    HasNot,
    /// No answer, or one that says nothing (5xx, a timeout).
    Failed,
}

/// What asking the candidates found.
enum Asked {
    Found(usize),
    /// Every candidate answered that it does not hold the id.
    Nowhere,
    /// None holds it among those that answered; some did not answer.
    Incomplete,
}

/// The endpoint (index into `state.endpoints`) holding the response `id`, among
/// `candidates` (healthy endpoints the request may use): from the map, else by asking
/// them. `authorization` is the client's header line, passed on to the engines when the
/// router does not keep keys itself.
pub async fn locate(
    ctx: &WorkerCtx,
    state: &RoutingState,
    id: &str,
    candidates: &[usize],
    authorization: Option<&str>,
) -> Result<usize, ProxyError> {
    let cell = &ctx.shared.cell;
    let (k, now) = (key(id), cell.now_ms());
    if let Some(i) = cell.responses.latest(k, &state.response_tags, now) {
        let endpoint = &state.endpoints[i];
        if candidates.contains(&i) {
            // Used again: the last to be evicted.
            if let Some(tag) = endpoint.response_tag {
                cell.responses.record(&[k], tag, now);
            }
            ::metrics::counter!(metrics::RESPONSES_LOOKUPS_TOTAL, "status" => "hit").increment(1);
            return Ok(i);
        }
        if !endpoint.healthy {
            ::metrics::counter!(metrics::RESPONSES_LOOKUPS_TOTAL, "status" => "unavailable").increment(1);
            return Err(ProxyError::new(
                ErrorKind::NoHealthyEndpoint,
                format!(
                    "the response '{id}' is stored on the engine at {}, which is not healthy right now",
                    endpoint.url
                ),
            )
            .with_headers("retry-after: 5\r\n".to_owned()));
        }
        // Held by an endpoint the request may not use (another model's): asked about below
        // like any other id, among those it may.
    }
    let timeout = crate::config::ms(ctx.shared.config.routing.responses.ask_timeout_ms);
    let asked = crate::time::timeout(timeout, async {
        let mut asks: FuturesUnordered<_> = candidates
            .iter()
            .map(|&i| async move { (i, ask(ctx, &state.endpoints[i], id, authorization).await) })
            .collect();
        let mut failed = false;
        while let Some((i, answer)) = asks.next().await {
            match answer {
                Answer::Has => return Asked::Found(i),
                Answer::HasNot => {}
                Answer::Failed => failed = true,
            }
        }
        if failed { Asked::Incomplete } else { Asked::Nowhere }
    })
    .await
    .unwrap_or(Asked::Incomplete);
    match asked {
        Asked::Found(i) => {
            ::metrics::counter!(metrics::RESPONSES_LOOKUPS_TOTAL, "status" => "asked").increment(1);
            learn(ctx, &state.endpoints[i], id);
            Ok(i)
        }
        Asked::Nowhere => {
            ::metrics::counter!(metrics::RESPONSES_LOOKUPS_TOTAL, "status" => "not_found").increment(1);
            Err(ProxyError::new(
                ErrorKind::UnknownResponse,
                format!("Response with id '{id}' not found."),
            )
            .with_param("response_id"))
        }
        Asked::Incomplete => {
            ::metrics::counter!(metrics::RESPONSES_LOOKUPS_TOTAL, "status" => "unreachable").increment(1);
            Err(ProxyError::new(
                ErrorKind::UpstreamUnavailable,
                format!(
                    "the response '{id}' was found on no engine, and not every engine answered within {} ms",
                    timeout.as_millis()
                ),
            )
            .with_headers("retry-after: 1\r\n".to_owned()))
        }
    }
}

/// `GET /v1/responses/{id}` on one endpoint, on a connection of its own (closed after).
async fn ask(ctx: &WorkerCtx, endpoint: &EndpointState, id: &str, authorization: Option<&str>) -> Answer {
    let lim = &ctx.limits;
    let Ok(mut conn) = upstream::connect(endpoint.addr, lim.connect_timeout).await else {
        return Answer::Failed;
    };
    let mut head = format!(
        "GET /v1/responses/{id} HTTP/1.1\r\nhost: {}\r\nconnection: close\r\n",
        endpoint.authority
    );
    if let Some(auth) = authorization {
        head.push_str("authorization: ");
        head.push_str(auth);
        head.push_str("\r\n");
    }
    head.push_str("\r\n");
    if upstream::send(&mut conn, head.into_bytes(), &Bytes::new())
        .await
        .is_err()
    {
        return Answer::Failed;
    }
    match upstream::read_head(&mut conn, &lim.response_head, false).await {
        Ok(up) if up.status == 200 => Answer::Has,
        Ok(up) if up.status == 404 => Answer::HasNot,
        _ => Answer::Failed,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_are_apart_from_session_blocks() {
        assert_ne!(key("s1"), lmstack_route::blocks::session_block("s1"));
        assert_eq!(key("resp_1"), key("resp_1"));
        assert_ne!(key("resp_1"), key("resp_2"));
    }
}
