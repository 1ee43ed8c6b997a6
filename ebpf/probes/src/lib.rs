//! Empty: the programs are in the `lmstack-ebpf-probes` binary (src/main.rs), built for the
//! bpfel-unknown-none target by lmstack-agent's build script. This library target only lets
//! the agent name the crate as a build dependency, so that cargo rebuilds it when it changes.
#![no_std]
