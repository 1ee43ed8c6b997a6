//! lmstack's performance kit: the engine simulator (`lmstack-sim`) and the load generator
//! (`lmstack-load`) that the tests, the demo and `cargo xtask perf` drive.

#![cfg_attr(not(test), deny(clippy::unwrap_used))]

pub mod load;
pub mod multiround;
pub mod sim;
