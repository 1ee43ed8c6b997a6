//! `cargo xtask test`: formatting, lints, and every test of the workspace: what CI runs.
//! The end-to-end tests start their own engines and install the OpenAI SDK into a venv
//! under target/; this only makes sure the machine can make venvs.

use std::process::{Command, Stdio};

use clap::Args;

use crate::{cargo, run_cmd};

#[derive(Args)]
pub struct TestArgs {
    /// Skip `cargo fmt --check` and `cargo clippy`.
    #[arg(long)]
    no_lint: bool,
    /// Passed to `cargo test` after `--` (e.g. a test name filter).
    #[arg(last = true)]
    rest: Vec<String>,
}

pub fn run(args: &TestArgs) -> anyhow::Result<()> {
    ensure_python_venv()?;
    // The eBPF tests need root and the BPF tool chain; without root they skip (and say so).
    if crate::ebpf::is_root() {
        crate::ebpf::ensure_toolchain()?;
        ensure_prometheus()?;
    } else {
        eprintln!("not root: the eBPF tests will skip, and lmstack-agent builds without its probes");
    }
    if !args.no_lint {
        ensure_components()?;
        run_cmd(cargo().args(["fmt", "--all", "--", "--check"]))?;
        run_cmd(
            cargo()
                .args(["clippy", "--workspace", "--all-targets", "--", "-D", "warnings"])
                .env("PATH", crate::ebpf::path_with_cargo_bin()),
        )?;
    }
    run_cmd(
        cargo()
            .args(["test", "--workspace", "--all-targets", "--"])
            .args(&args.rest)
            .env("PATH", crate::ebpf::path_with_cargo_bin()),
    )?;
    Ok(())
}

/// rustfmt and clippy come with rustup's default profile; add them where a minimal one is.
fn ensure_components() -> anyhow::Result<()> {
    let have = |tool: &str| {
        cargo()
            .args([tool, "--version"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    };
    if !have("fmt") || !have("clippy") {
        run_cmd(Command::new("rustup").args(["component", "add", "rustfmt", "clippy"]))?;
    }
    Ok(())
}

/// The eBPF test checks the agent's histograms through a real Prometheus (Debian's package,
/// run by the test itself; the package's own service is not used).
fn ensure_prometheus() -> anyhow::Result<()> {
    if std::path::Path::new("/usr/bin/prometheus").exists() {
        return Ok(());
    }
    run_cmd(Command::new("apt-get").args(["update", "-q"]))?;
    run_cmd(
        Command::new("apt-get")
            .args([
                "-o",
                "DPkg::Lock::Timeout=600",
                "install",
                "-y",
                "-q",
                "--no-install-recommends",
                "prometheus",
            ])
            .env("DEBIAN_FRONTEND", "noninteractive"),
    )
}

/// The OpenAI SDK test needs `python3 -m venv`; Debian splits it into python3-venv.
fn ensure_python_venv() -> anyhow::Result<()> {
    let works = || {
        Command::new("python3")
            .args(["-c", "import venv, ensurepip"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    };
    if works() {
        return Ok(());
    }
    eprintln!("python3 cannot make venvs here: installing python3-venv");
    run_cmd(Command::new("apt-get").args(["update", "-q"]))?;
    run_cmd(
        Command::new("apt-get")
            .args(["install", "-y", "-q", "python3", "python3-venv", "python3-pip"])
            .env("DEBIAN_FRONTEND", "noninteractive"),
    )?;
    anyhow::ensure!(works(), "python3 still cannot make venvs");
    Ok(())
}
