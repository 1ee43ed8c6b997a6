//! `cargo xtask ebpf`: installs what building lmstack's eBPF probes needs (Debian's LLVM 22,
//! rust-src for `-Z build-std=core`, bpf-linker 0.13 built against LLVM 22; see
//! ../shared/TOOLCHAIN.md's recipe, ~5 min the first time) and builds lmstack-agent with them.
//! `cargo xtask test` runs the install step first when it runs as root, so that the eBPF
//! tests run rather than skip.

use std::path::PathBuf;
use std::process::{Command, Stdio};

use clap::Args;

use crate::{cargo, run_cmd};

const BPF_LINKER_VERSION: &str = "0.13.0";
const LLVM: &str = "/usr/lib/llvm-22";

#[derive(Args)]
pub struct EbpfArgs {
    /// Build in release mode.
    #[arg(long)]
    release: bool,
}

pub fn run(args: &EbpfArgs) -> anyhow::Result<()> {
    ensure_toolchain()?;
    let mut cmd = cargo();
    cmd.args(["build", "-p", "lmstack-agent"]);
    if args.release {
        cmd.arg("--release");
    }
    run_cmd(cmd.env("PATH", path_with_cargo_bin()))?;
    println!(
        "lmstack-agent built with its probes: try `sudo target/{}/lmstack-agent --help`",
        if args.release { "release" } else { "debug" }
    );
    Ok(())
}

/// Where `cargo install` puts binaries.
fn cargo_bin() -> PathBuf {
    std::env::var_os("CARGO_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cargo")))
        .unwrap_or_else(|| PathBuf::from("/root/.cargo"))
        .join("bin")
}

/// PATH with cargo's bin directory in it (where bpf-linker is installed).
pub fn path_with_cargo_bin() -> std::ffi::OsString {
    let mut dirs = vec![cargo_bin()];
    if let Some(p) = std::env::var_os("PATH") {
        dirs.extend(std::env::split_paths(&p));
    }
    std::env::join_paths(dirs).unwrap_or_default()
}

fn have_bpf_linker() -> bool {
    std::env::split_paths(&path_with_cargo_bin()).any(|d| d.join("bpf-linker").is_file())
}

/// Installs LLVM 22 (apt), rust-src and bpf-linker where missing.
pub fn ensure_toolchain() -> anyhow::Result<()> {
    if have_bpf_linker() && rust_src_installed() {
        return Ok(());
    }
    eprintln!("installing the eBPF tool chain (LLVM 22, rust-src, bpf-linker {BPF_LINKER_VERSION})");
    if !std::path::Path::new(LLVM).join("bin/llvm-config").exists() {
        run_cmd(Command::new("apt-get").args(["update", "-q"]))?;
        run_cmd(
            Command::new("apt-get")
                .args(["-o", "DPkg::Lock::Timeout=600", "install", "-y", "-q"])
                .args([
                    "llvm-22-dev",
                    "libpolly-22-dev",
                    "libzstd-dev",
                    "zlib1g-dev",
                    "libelf-dev",
                    "iproute2",
                ])
                .env("DEBIAN_FRONTEND", "noninteractive")
                .env("TMPDIR", "/var/tmp"),
        )?;
    }
    if !rust_src_installed() {
        run_cmd(Command::new("rustup").args(["component", "add", "rust-src"]))?;
    }
    if !have_bpf_linker() {
        let path = format!("{LLVM}/bin:{}", path_with_cargo_bin().to_string_lossy());
        run_cmd(
            Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
                .args(["install", "--locked", "bpf-linker", "--version", BPF_LINKER_VERSION])
                .args(["--no-default-features", "--features", "llvm-22"])
                .env("LLVM_SYS_221_PREFIX", LLVM)
                .env("PATH", path),
        )?;
    }
    Ok(())
}

fn rust_src_installed() -> bool {
    Command::new("rustc")
        .args(["--print", "sysroot"])
        .stderr(Stdio::null())
        .output()
        .ok()
        .map(|o| PathBuf::from(String::from_utf8_lossy(&o.stdout).trim()))
        .is_some_and(|sysroot| sysroot.join("lib/rustlib/src/rust/library/core").exists())
}

/// Whether this process runs as root (the eBPF tests need it).
pub fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
}
