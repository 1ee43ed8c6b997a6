//! The affinity table's resident memory under 10^6 prompts: runs the route crate's
//! `affinity_memory` example (which measures its own RSS) and checks the growth stays within
//! the configured bound. The figure: the bound, the table's size and the RSS growth.

use serde_json::Value;

use super::plot::{Panel, Series};
use super::progress::Progress;
use crate::{cargo, run_cmd};

/// The bound the example is run with, MiB.
const MAX_MIB: u64 = 64;

pub fn run() -> anyhow::Result<Value> {
    let progress = Progress::new("affinity-memory", 2);
    progress.step("building the affinity_memory example (release)");
    progress.suspend(|| {
        run_cmd(cargo().args([
            "build",
            "--quiet",
            "--release",
            "-p",
            "lmstack-route",
            "--example",
            "affinity_memory",
        ]))
    })?;
    progress.step("feeding the table 10^6 prompts of 32 blocks");
    let out = cargo()
        .args([
            "run",
            "--quiet",
            "--release",
            "-p",
            "lmstack-route",
            "--example",
            "affinity_memory",
            "--",
        ])
        .args([
            "--max-mib",
            &MAX_MIB.to_string(),
            "--prompts",
            "1000000",
            "--blocks",
            "32",
        ])
        .output()?;
    progress.finish();
    anyhow::ensure!(
        out.status.success(),
        "affinity_memory failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let report: Value = serde_json::from_slice(&out.stdout)?;
    let f = |k: &str| report[k].as_u64().unwrap_or(0);
    let growth_mib = f("growth") as f64 / (1u64 << 20) as f64;
    println!(
        "\naffinity table under {} prompts of {} blocks: configured {} MiB, table {:.1} MiB, RSS grew {:.1} MiB \
         ({} entries of {}, {} evictions, {:.1} s)",
        f("prompts"),
        f("blocks_per_prompt"),
        MAX_MIB,
        f("table_bytes") as f64 / (1u64 << 20) as f64,
        growth_mib,
        f("entries"),
        f("capacity"),
        f("evictions"),
        report["seconds"].as_f64().unwrap_or(0.0)
    );
    // A page of allocator bookkeeping aside, the table is all the growth.
    anyhow::ensure!(
        f("growth") <= (MAX_MIB << 20) + (1 << 20),
        "the table grew past its bound: {growth_mib:.1} MiB"
    );
    Ok(report)
}

/// The figure of a report: title, panels a row, panels.
pub fn figure(report: &Value) -> (String, usize, Vec<Panel>) {
    let mib = |k: &str| report[k].as_f64().unwrap_or(f64::NAN) / f64::from(1u32 << 20);
    let panel = Panel::Bars {
        title: format!(
            "{} prompts of {} blocks",
            report["prompts"], report["blocks_per_prompt"]
        ),
        y_label: "MiB".into(),
        categories: vec!["configured bound".into(), "table".into(), "RSS growth".into()],
        series: vec![Series::new(
            "MiB",
            vec![mib("max_bytes"), mib("table_bytes"), mib("growth")],
        )],
    };
    ("affinity table: resident memory".into(), 1, vec![panel])
}
