//! `lmstack-load`: the load generator. See `lmstack_perf::load`.

fn main() -> anyhow::Result<()> {
    lmstack_perf::load::main()
}
