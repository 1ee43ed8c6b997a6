//! `lmstack-sim`: a vLLM-compatible engine simulator. See `lmstack_perf::sim`.

fn main() -> anyhow::Result<()> {
    lmstack_perf::sim::main()
}
