//! Turns the probes' events into timings per stream: time to first token (request segment
//! to the first response segment carrying an SSE event) and time between tokens (between
//! deliveries: response segments with events, where segments closer than the burst window
//! count as one delivery, e.g. vLLM's role chunk and first token). Tokens are SSE events with
//! data, less a chat stream's first (the role chunk). Pure: no IO, no clock
//! but the events' own kernel timestamps, no metrics.

use std::collections::HashMap;

use lmstack_ebpf_common::{Endpoint, Event, EventKind, FLAG_DONE};

/// What one event meant.
#[derive(Clone, Debug, PartialEq)]
pub enum Observation {
    /// A request started.
    Request { cgroup_id: u64, endpoint: Endpoint },
    /// The first token of a stream, `ttft_s` after its request.
    FirstToken {
        cgroup_id: u64,
        endpoint: Endpoint,
        ttft_s: f64,
    },
    /// A later delivery, `gap_s` after the previous one.
    Gap { cgroup_id: u64, gap_s: f64 },
    /// Tokens (SSE events) in a segment.
    Tokens { cgroup_id: u64, count: u32 },
    /// A stream ended with `[DONE]`.
    Done { cgroup_id: u64, endpoint: Endpoint },
}

#[derive(Clone, Debug)]
struct Stream {
    cgroup_id: u64,
    endpoint: Endpoint,
    request_ns: u64,
    /// The last delivery's first segment (gaps are measured between deliveries' starts).
    delivery_ns: Option<u64>,
    /// The last segment with events (to tell whether the next one is in the same burst).
    last_ns: u64,
}

pub struct Timings {
    streams: HashMap<u64, Stream>,
    burst_ns: u64,
    max_streams: usize,
}

impl Timings {
    pub fn new(burst_window_us: u64, max_streams: usize) -> Timings {
        Timings {
            streams: HashMap::new(),
            burst_ns: burst_window_us * 1000,
            max_streams: max_streams.max(1),
        }
    }

    /// Connections with a request seen and not yet closed.
    pub fn tracked(&self) -> usize {
        self.streams.len()
    }

    /// Applies one event; pushes what it meant to `out`.
    pub fn apply(&mut self, e: &Event, out: &mut Vec<Observation>) {
        match EventKind::from_u32(e.kind) {
            Some(EventKind::Request) => {
                let Some(endpoint) = Endpoint::from_u32(e.value) else {
                    return;
                };
                if self.streams.len() >= self.max_streams && !self.streams.contains_key(&e.cookie) {
                    // Bounded: forget the oldest half (connections whose close was missed).
                    let mut starts: Vec<u64> = self.streams.values().map(|s| s.request_ns).collect();
                    starts.sort_unstable();
                    let cut = starts[starts.len() / 2];
                    self.streams.retain(|_, s| s.request_ns > cut);
                }
                self.streams.insert(
                    e.cookie,
                    Stream {
                        cgroup_id: e.cgroup_id,
                        endpoint,
                        request_ns: e.ts_ns,
                        delivery_ns: None,
                        last_ns: 0,
                    },
                );
                out.push(Observation::Request {
                    cgroup_id: e.cgroup_id,
                    endpoint,
                });
            }
            Some(EventKind::Tokens) => {
                let Some(s) = self.streams.get_mut(&e.cookie) else {
                    return;
                };
                if e.value > 0 {
                    // vLLM opens a chat stream with a role chunk: an event, not a token.
                    let role_chunk = s.delivery_ns.is_none() && s.endpoint == Endpoint::ChatCompletions;
                    let tokens = e.value - u32::from(role_chunk);
                    match s.delivery_ns {
                        None => out.push(Observation::FirstToken {
                            cgroup_id: s.cgroup_id,
                            endpoint: s.endpoint,
                            ttft_s: secs(e.ts_ns.saturating_sub(s.request_ns)),
                        }),
                        Some(prev) if e.ts_ns.saturating_sub(s.last_ns) > self.burst_ns => {
                            out.push(Observation::Gap {
                                cgroup_id: s.cgroup_id,
                                gap_s: secs(e.ts_ns.saturating_sub(prev)),
                            });
                        }
                        Some(_) => {}
                    }
                    if s.delivery_ns.is_none() || e.ts_ns.saturating_sub(s.last_ns) > self.burst_ns {
                        s.delivery_ns = Some(e.ts_ns);
                    }
                    s.last_ns = e.ts_ns;
                    if tokens > 0 {
                        out.push(Observation::Tokens {
                            cgroup_id: s.cgroup_id,
                            count: tokens,
                        });
                    }
                }
                if e.flags & FLAG_DONE != 0 {
                    out.push(Observation::Done {
                        cgroup_id: s.cgroup_id,
                        endpoint: s.endpoint,
                    });
                }
            }
            Some(EventKind::Close) => {
                self.streams.remove(&e.cookie);
            }
            None => {}
        }
    }
}

fn secs(ns: u64) -> f64 {
    ns as f64 / 1e9
}

#[cfg(test)]
mod tests {
    use lmstack_ebpf_common::FLAG_FIRST;

    use super::*;

    const MS: u64 = 1_000_000;

    fn ev(kind: EventKind, cookie: u64, ts_ns: u64, value: u32, flags: u32) -> Event {
        Event {
            ts_ns,
            cookie,
            cgroup_id: 7,
            kind: kind as u32,
            value,
            flags,
            _pad: 0,
        }
    }

    fn run(t: &mut Timings, events: &[Event]) -> Vec<Observation> {
        let mut out = Vec::new();
        for e in events {
            t.apply(e, &mut out);
        }
        out
    }

    fn ttfts(out: &[Observation]) -> Vec<f64> {
        out.iter()
            .filter_map(|o| match o {
                Observation::FirstToken { ttft_s, .. } => Some(*ttft_s),
                _ => None,
            })
            .collect()
    }

    #[test]
    fn ttft_and_gaps_between_deliveries_with_the_role_chunk_merged() {
        let mut t = Timings::new(500, 100);
        let out = run(
            &mut t,
            &[
                ev(EventKind::Request, 1, 1000 * MS, Endpoint::ChatCompletions as u32, 0),
                // role chunk, then the first token 30 us later: one delivery
                ev(EventKind::Tokens, 1, 1100 * MS, 1, FLAG_FIRST),
                ev(EventKind::Tokens, 1, 1100 * MS + 30_000, 1, 0),
                ev(EventKind::Tokens, 1, 1120 * MS, 1, 0),
                ev(EventKind::Tokens, 1, 1140 * MS, 2, FLAG_DONE),
            ],
        );
        let ttft = ttfts(&out);
        let gaps: Vec<f64> = out
            .iter()
            .filter_map(|o| match o {
                Observation::Gap { gap_s, .. } => Some(*gap_s),
                _ => None,
            })
            .collect();
        let tokens: u32 = out
            .iter()
            .filter_map(|o| match o {
                Observation::Tokens { count, .. } => Some(*count),
                _ => None,
            })
            .sum();
        assert_eq!(ttft, vec![0.1]);
        assert_eq!(gaps.len(), 2);
        assert!(
            (gaps[0] - 0.020).abs() < 1e-9 && (gaps[1] - 0.020).abs() < 1e-9,
            "{gaps:?}"
        );
        // Five events, the first of them chat's role chunk.
        assert_eq!(tokens, 4);
        assert!(out.iter().any(|o| matches!(o, Observation::Done { .. })));
    }

    #[test]
    fn segments_of_unknown_connections_and_closed_ones_are_ignored() {
        let mut t = Timings::new(500, 100);
        assert!(run(&mut t, &[ev(EventKind::Tokens, 9, 5, 1, 0)]).is_empty());
        run(&mut t, &[ev(EventKind::Request, 9, 5, 1, 0)]);
        assert_eq!(t.tracked(), 1);
        run(&mut t, &[ev(EventKind::Close, 9, 6, 0, 0)]);
        assert_eq!(t.tracked(), 0);
        assert!(run(&mut t, &[ev(EventKind::Tokens, 9, 7, 1, 0)]).is_empty());
    }

    #[test]
    fn a_new_request_on_a_kept_alive_connection_restarts_the_clock() {
        let mut t = Timings::new(500, 100);
        let out = run(
            &mut t,
            &[
                ev(EventKind::Request, 1, 0, 2, 0),
                ev(EventKind::Tokens, 1, 50 * MS, 1, FLAG_DONE),
                ev(EventKind::Request, 1, 1000 * MS, 2, 0),
                ev(EventKind::Tokens, 1, 1070 * MS, 1, 0),
            ],
        );
        let ttft = ttfts(&out);
        assert_eq!(ttft, vec![0.05, 0.07]);
    }

    #[test]
    fn state_stays_bounded_when_closes_are_missed() {
        let mut t = Timings::new(500, 10);
        for c in 0..1000u64 {
            run(&mut t, &[ev(EventKind::Request, c, c, 1, 0)]);
            assert!(t.tracked() <= 10);
        }
    }
}
