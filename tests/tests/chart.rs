//! The Helm chart (helm/lmstack): strict lint, renders for every values file in
//! helm/lmstack/ci/, strict validation of each object against Kubernetes 1.33's schemas and of
//! the custom resources against their CRDs', the values schema, and assertions on RBAC,
//! privileges, selectors, ports, probes and scrapes (tests/chart/check_chart.py).
//!
//! Needs the tools `cargo xtask test` installs under target/tools; skips without them, fails
//! under CI.

#![allow(clippy::unwrap_used, reason = "tests assert by unwrapping")]

use std::process::Command;

use lmstack_e2e::bed::{node_tools, skip, tools_python};
use lmstack_e2e::workspace_root;

#[test]
fn chart_lints_renders_and_validates_for_every_values_file() {
    let (Some(python), Some(node)) = (tools_python(), node_tools()) else {
        skip("helm-python-sdk, kubernetes-validate or @kubernetes-models missing (cargo xtask test installs them)");
        return;
    };
    let root = workspace_root();
    let out = root.join("target/chart-render");
    let _ = std::fs::remove_dir_all(&out);
    let run = Command::new(python)
        .arg(root.join("tests/chart/check_chart.py"))
        .arg(root.join("helm/lmstack"))
        .arg(&out)
        .arg(node)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&run.stdout);
    eprintln!("{stdout}");
    assert!(
        run.status.success(),
        "chart checks failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&run.stderr)
    );
    // Every values file rendered and was validated.
    let cases = std::fs::read_dir(root.join("helm/lmstack/ci")).unwrap().count();
    assert!(cases >= 4);
    assert_eq!(stdout.matches("validated against Kubernetes 1.33.0").count(), cases);
    assert!(stdout.contains("chart OK"));
}
