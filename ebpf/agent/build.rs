//! Builds the eBPF probes (ebpf/probes, for bpfel-unknown-none) into OUT_DIR with aya-build.
//! Where the BPF tool chain is missing (no bpf-linker on PATH) or `AYA_BUILD_SKIP=1`, it
//! writes an empty object instead, so that the rest of the workspace builds anywhere; that
//! agent says at start that it has no probes and how to build them (`cargo xtask ebpf`).

use std::path::PathBuf;

fn main() -> anyhow::Result<()> {
    println!("cargo:rerun-if-env-changed=AYA_BUILD_SKIP");
    println!("cargo:rerun-if-env-changed=PATH");
    let out = PathBuf::from(std::env::var("OUT_DIR")?).join("lmstack-ebpf-probes");
    let skip = std::env::var("AYA_BUILD_SKIP").is_ok_and(|v| v == "1" || v.eq_ignore_ascii_case("true"));
    let linker = std::env::var_os("PATH").and_then(|p| {
        std::env::split_paths(&p)
            .map(|d| d.join("bpf-linker"))
            .find(|l| l.is_file())
    });
    match &linker {
        // Rebuild the probes when bpf-linker changes.
        Some(l) => println!("cargo:rerun-if-changed={}", l.display()),
        // Look again on every build until it is installed (cargo reruns a build script whose
        // watched path does not exist).
        None => println!("cargo:rerun-if-changed=/nonexistent/bpf-linker"),
    }
    if skip || linker.is_none() {
        println!(
            "cargo:warning=lmstack-agent built without eBPF probes ({}); `cargo xtask ebpf` installs the tool chain and builds them",
            if skip {
                "AYA_BUILD_SKIP"
            } else {
                "no bpf-linker on PATH"
            }
        );
        std::fs::write(&out, b"")?;
        return Ok(());
    }
    // The BPF target has no prebuilt `core`: the probes are built with `-Z build-std=core`,
    // which stable rustc allows with RUSTC_BOOTSTRAP (aya-build passes it on to its cargo).
    if std::env::var_os("RUSTC_BOOTSTRAP").is_none() {
        // SAFETY: the build script is single-threaded here.
        unsafe { std::env::set_var("RUSTC_BOOTSTRAP", "1") };
    }
    let root = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR")?).join("../probes");
    let root = root
        .to_str()
        .ok_or_else(|| anyhow::anyhow!("non-UTF-8 path"))?
        .to_owned();
    aya_build::build_ebpf(
        [aya_build::Package {
            name: "lmstack-ebpf-probes",
            root_dir: &root,
            ..Default::default()
        }],
        aya_build::Toolchain::Custom("stable"),
    )
}
