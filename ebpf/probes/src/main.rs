//! lmstack's eBPF programs, built for bpfel-unknown-none and loaded by lmstack-agent:
//!
//! - `lmstack_ingress` (cgroup_skb/ingress on an engine's cgroup): a segment that starts with
//!   `POST /v1/<generation endpoint>` starts a request on its connection (socket cookie);
//! - `lmstack_egress` (cgroup_skb/egress): response segments of tracked connections are
//!   scanned for SSE events (`data:` lines, across segment cuts) and reported with their
//!   kernel timestamp;
//! - `lmstack_sock_state` (tp_btf/inet_sock_set_state): a tracked connection's close ends
//!   its state.
//!
//! They read UAPI contexts only (skb bytes, the tracepoint's arguments), never kernel struct
//! offsets; they never drop or change traffic. Timing policy (what counts as a token gap) is
//! the agent's, not theirs. On the host target this is an empty program, so the workspace
//! builds and lints without a BPF toolchain.
#![cfg_attr(target_arch = "bpf", no_std)]
#![cfg_attr(target_arch = "bpf", no_main)]

#[cfg(target_arch = "bpf")]
mod probes;

#[cfg(not(target_arch = "bpf"))]
fn main() {}
