//! `cargo xtask test`: formatting, lints, every test of the workspace, and a brief run of every
//! fuzz target (a few seconds each, `xtask fuzz`): what CI runs.
//! The end-to-end tests start their own engines and install the OpenAI SDK into a venv
//! under target/; this makes sure the machine can make venvs, and installs the chart and
//! dashboard checkers under target/tools (helm-python-sdk, kubernetes-validate, typescript,
//! @grafana/schema, @kubernetes-models) and, as root, Prometheus and Chromium from apt.

use std::process::{Command, Stdio};

use clap::Args;

use crate::{cargo, run_cmd};

#[derive(Args)]
pub struct TestArgs {
    /// Skip `cargo fmt --check` and `cargo clippy`.
    #[arg(long)]
    no_lint: bool,
    /// Skip the brief fuzz run (nightly and cargo-fuzz are installed for it when missing).
    #[arg(long)]
    no_fuzz: bool,
    /// Passed to `cargo test` after `--` (e.g. a test name filter).
    #[arg(last = true)]
    rest: Vec<String>,
}

pub fn run(args: &TestArgs) -> anyhow::Result<()> {
    ensure_python_venv()?;
    ensure_chart_tools()?;
    // The eBPF tests need root and the BPF tool chain; without root they skip (and say so).
    if crate::ebpf::is_root() {
        crate::ebpf::ensure_toolchain()?;
        ensure_apt(&["prometheus", "chromium", "fonts-dejavu-core"])?;
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
    if !args.no_fuzz {
        crate::fuzz::smoke()?;
    }
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

/// Debian packages the tests run: Prometheus (the eBPF and dashboard tests start their own;
/// the package's service is not used) and Chromium (pictures of panel queries).
fn ensure_apt(packages: &[&str]) -> anyhow::Result<()> {
    let installed = |p: &str| {
        Command::new("dpkg-query")
            .args(["-W", "-f=${Status}", p])
            .output()
            .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).contains("install ok installed"))
    };
    let missing: Vec<&str> = packages.iter().copied().filter(|p| !installed(p)).collect();
    if missing.is_empty() {
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
            ])
            .args(&missing)
            .env("DEBIAN_FRONTEND", "noninteractive"),
    )
}

/// Pinned versions of the chart and dashboard checkers (tests/tests/chart.rs, dashboards.rs).
const PIP_TOOLS: &[&str] = &["helm-python-sdk==0.2.2", "kubernetes-validate==1.37.0", "pyyaml==6.0.3"];
const NPM_TOOLS: &[&str] = &[
    "typescript@5",
    "@grafana/schema@13.2.3",
    "@kubernetes-models/prometheus-operator@6.0.0",
    "@kubernetes-models/keda@0.4.2",
];

/// Installs the checkers under target/tools (a venv and an npm folder) when missing.
fn ensure_chart_tools() -> anyhow::Result<()> {
    let tools = crate::root().join("target/tools");
    let venv = tools.join("venv");
    if !venv.join("bin/kubernetes-validate").exists() {
        run_cmd(Command::new("python3").args(["-m", "venv"]).arg(&venv))?;
        run_cmd(
            Command::new(venv.join("bin/pip"))
                .args(["install", "-q"])
                .args(PIP_TOOLS),
        )?;
    }
    let node = tools.join("node");
    if !node.join("node_modules/@kubernetes-models/keda").exists() {
        std::fs::create_dir_all(&node)?;
        if !node.join("package.json").exists() {
            std::fs::write(
                node.join("package.json"),
                "{\"name\": \"lmstack-checks\", \"private\": true}\n",
            )?;
        }
        run_cmd(
            Command::new("npm")
                .args(["install", "--no-audit", "--no-fund", "--silent"])
                .args(NPM_TOOLS)
                .current_dir(&node),
        )?;
    }
    Ok(())
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
