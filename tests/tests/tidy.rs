//! Tidy: the repository's own rules, checked by reading it (as rust-analyzer's tidy.rs does).
//!
//! - every Rust file opens with a `//!` line saying what it is;
//! - every metric a binary defines is described exactly once and shown somewhere (a dashboard
//!   panel or an alert), or allow-listed here with the reason; and the dashboards and alerts
//!   name no metric that does not exist;
//! - ARCHITECTURE.md's code map names only files and folders that exist;
//! - every flag of every binary (and subcommand) has help text in `--help`.
//!
//! Not here: formatting and lints (cargo fmt and clippy do them), whether the dashboards'
//! queries return data (tests/tests/dashboards.rs).

#![allow(clippy::unwrap_used, reason = "tests assert by unwrapping")]

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::Command;

use lmstack_e2e::{BINARY_PACKAGES, bin, workspace_root};

/// The folders whose Rust files tidy reads.
const SOURCE_DIRS: [&str; 6] = ["dataplane", "control", "ebpf", "perf", "tests", "xtask"];

/// Rust files that may open without a `//!` line, with the reason. None today.
const NO_MODULE_DOC: [(&str, &str); 0] = [];

/// The metric modules: one per binary, every exported name a const there.
const METRIC_MODULES: [(&str, &str); 3] = [
    ("lmstack", "dataplane/lmstack/src/metrics.rs"),
    ("lmstack-control", "control/lmstack-control/src/metrics.rs"),
    ("lmstack-agent", "ebpf/agent/src/metrics.rs"),
];

/// Where metrics are shown: the dashboards (every grafana/*.json) and these.
const ALERTS: &str = "helm/lmstack/files/alerts.yaml";

/// Metrics on no dashboard and in no alert, each with why.
const NOT_SHOWN: [(&str, &str); 19] = [
    (
        "lmstack_upstream_connects_total",
        "connection churn per endpoint: the keep-alive pool keeps it low; a debugging figure read on /metrics",
    ),
    (
        "lmstack_http_connections",
        "open client connections: a capacity-debugging figure; load shows in the request panels",
    ),
    (
        "lmstack_http_connections_total",
        "client connections accepted: as lmstack_http_connections",
    ),
    (
        "lmstack_affinity_bytes",
        "fixed at start (the table is allocated once); the Affinity table panel shows entries against capacity",
    ),
    (
        "lmstack_endpoint_prefill_blocks",
        "an input of the prefix policy; engine load shows in the engines' own queue panels and router in-flight",
    ),
    (
        "lmstack_snapshot_updates_total",
        "every update moves lmstack_snapshot_version, which the Snapshot version panel shows",
    ),
    (
        "lmstack_discovery_file_reads_total",
        "file discovery only (outside Kubernetes); a failed read keeps the last backends and is logged",
    ),
    (
        "lmstack_tls_handshake_failures_total",
        "TLS only; mostly clients' mistakes (plain HTTP on the TLS port, a certificate they do not trust) or scanners: a debugging figure read on /metrics",
    ),
    (
        "lmstack_workers",
        "constant per process (worker threads by IO driver): read on /metrics to check io_uring vs epoll",
    ),
    (
        "lmstack_control_snapshots_total",
        "every publication moves lmstack_control_snapshot_version, which the Snapshot version panel shows",
    ),
    (
        "lmstack_control_probe_round_seconds",
        "the prober's own cost; its outcome shows in the Engine health probes and endpoints panels",
    ),
    (
        "lmstack_control_stream_messages_total",
        "stream traffic by message type (full, delta, heartbeat): a debugging figure; streams show in Routers following control",
    ),
    (
        "lmstack_control_watch_events_total",
        "Kubernetes source only, which the dashboards test (static source) cannot exercise; endpoints show what the watch found",
    ),
    (
        "lmstack_control_watch_errors_total",
        "Kubernetes source only (as above); every error is retried and logged",
    ),
    (
        "lmstack_control_pods",
        "Kubernetes source only (as above); the Endpoints known to control panel shows the routable result",
    ),
    (
        "lmstack_control_affinity_batches_lagged_total",
        "only when a router's stream lags; the router then learns the blocks from its own traffic",
    ),
    (
        "lmstack_trace_spans_total",
        "tracing is opt-in (tracing.otlp_endpoint) and off in the dashboards test; read on /metrics when spans go missing (dropped: the exporter's queue was full; failed: the collector)",
    ),
    (
        "lmstack_trace_exports_total",
        "as lmstack_trace_spans_total; every failed export is also logged with its cause",
    ),
    (
        "lmstack_ebpf_segments_truncated_total",
        "a diagnostic of the probes (segments over the 4 KiB scratch copy), read on the agent's /metrics",
    ),
];

fn root() -> PathBuf {
    workspace_root().canonicalize().unwrap()
}

fn read(rel: &str) -> String {
    std::fs::read_to_string(root().join(rel)).unwrap_or_else(|e| panic!("reading {rel}: {e}"))
}

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        let name = path.file_name().unwrap().to_string_lossy();
        if path.is_dir() {
            if name != "target" && !name.starts_with('.') && name != "node_modules" {
                rust_files(&path, out);
            }
        } else if name.ends_with(".rs") {
            out.push(path);
        }
    }
}

#[test]
fn every_rust_file_opens_with_a_module_doc() {
    let root = root();
    let mut files = Vec::new();
    for dir in SOURCE_DIRS {
        rust_files(&root.join(dir), &mut files);
    }
    assert!(files.len() > 50, "found only {} Rust files", files.len());
    let mut missing = Vec::new();
    for f in &files {
        let rel = f.strip_prefix(&root).unwrap().to_string_lossy().into_owned();
        if NO_MODULE_DOC.iter().any(|(p, _)| *p == rel) {
            continue;
        }
        let text = std::fs::read_to_string(f).unwrap();
        if !text.starts_with("//!") {
            missing.push(rel);
        }
    }
    assert!(
        missing.is_empty(),
        "these files do not open with a `//!` line saying what they are (and are not):\n{}",
        missing.join("\n")
    );
}

/// A metric const: (binary, const name, metric name).
fn metric_consts() -> Vec<(&'static str, String, String)> {
    let mut out = Vec::new();
    for (binary, file) in METRIC_MODULES {
        for line in read(file).lines() {
            let line = line.trim_start();
            let Some(rest) = line.strip_prefix("pub const ").or_else(|| line.strip_prefix("const ")) else {
                continue;
            };
            let Some((ident, value)) = rest.split_once(": &str = \"") else {
                continue;
            };
            let name = value.trim_end_matches("\";");
            if name.starts_with("lmstack_") {
                out.push((binary, ident.to_owned(), name.to_owned()));
            }
        }
    }
    out
}

/// The first argument of every `describe_*!` call in `text`.
fn described(text: &str) -> Vec<String> {
    let mut out = Vec::new();
    for kind in ["describe_counter!(", "describe_gauge!(", "describe_histogram!("] {
        for (at, _) in text.match_indices(kind) {
            let arg: String = text[at + kind.len()..]
                .trim_start()
                .chars()
                .take_while(|c| *c != ',' && *c != ')')
                .collect();
            out.push(arg.trim().trim_start_matches("metrics::").to_owned());
        }
    }
    out
}

/// Where metric names can be shown: (file, text).
fn shown_in() -> Vec<(String, String)> {
    let mut out: Vec<(String, String)> = std::fs::read_dir(root().join("grafana"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "json"))
        .map(|p| {
            (
                p.file_name().unwrap().to_string_lossy().into_owned(),
                std::fs::read_to_string(&p).unwrap(),
            )
        })
        .collect();
    assert!(!out.is_empty(), "no dashboards in grafana/");
    out.push((ALERTS.to_owned(), read(ALERTS)));
    out
}

fn is_name_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || c == '_' || c == ':'
}

/// Every `lmstack_*` metric name in `text`, histogram series suffixes kept.
fn names_in(text: &str) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    for (at, _) in text.match_indices("lmstack_") {
        if text[..at].chars().next_back().is_some_and(is_name_char) {
            continue;
        }
        let name: String = text[at..].chars().take_while(|c| is_name_char(*c)).collect();
        out.insert(name);
    }
    out
}

#[test]
fn every_metric_is_described_once_and_shown_or_allow_listed() {
    let consts = metric_consts();
    assert!(consts.len() >= 50, "found only {} metric consts", consts.len());
    let mut problems = Vec::new();

    // Described exactly once, in its own module; nothing else described.
    for (binary, file) in METRIC_MODULES {
        let calls = described(&read(file));
        let mine: Vec<&(&str, String, String)> = consts.iter().filter(|(b, ..)| *b == binary).collect();
        for (_, ident, name) in &mine {
            let n = calls
                .iter()
                .filter(|c| *c == ident || c.trim_matches('"') == name)
                .count();
            if n != 1 {
                problems.push(format!("{file}: {name} ({ident}) is described {n} times, not once"));
            }
        }
        for c in &calls {
            if !mine
                .iter()
                .any(|(_, ident, name)| c == ident || c.trim_matches('"') == name)
            {
                problems.push(format!("{file}: describes {c}, which is no metric const there"));
            }
        }
    }

    // One name, one metric.
    let mut by_name: BTreeMap<&str, Vec<&str>> = BTreeMap::new();
    for (binary, _, name) in &consts {
        by_name.entry(name).or_default().push(binary);
    }
    for (name, binaries) in &by_name {
        if binaries.len() > 1 {
            problems.push(format!("{name} is defined {} times ({binaries:?})", binaries.len()));
        }
    }

    // Shown on a dashboard or in an alert, or allow-listed; never both.
    let places = shown_in();
    let mut shown: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for (file, text) in &places {
        for n in names_in(text) {
            shown.entry(n).or_default().push(file.clone());
        }
    }
    let series_of = |name: &str| -> Vec<String> {
        ["", "_bucket", "_sum", "_count"]
            .iter()
            .map(|s| format!("{name}{s}"))
            .collect()
    };
    for name in by_name.keys() {
        let is_shown = series_of(name).iter().any(|s| shown.contains_key(s));
        let allowed = NOT_SHOWN.iter().any(|(n, _)| n == name);
        if !is_shown && !allowed {
            problems.push(format!(
                "{name} is on no dashboard (grafana/*.json) and in no alert ({ALERTS}): add a panel, or add it to NOT_SHOWN in tests/tests/tidy.rs with the reason"
            ));
        }
        if is_shown && allowed {
            problems.push(format!("{name} is shown now: take it off NOT_SHOWN"));
        }
    }
    for (name, _) in NOT_SHOWN {
        if !by_name.contains_key(name) {
            problems.push(format!("NOT_SHOWN lists {name}, which no binary defines"));
        }
    }
    // And the other way: what the dashboards and alerts query exists.
    for (series, files) in &shown {
        let base = ["_bucket", "_sum", "_count"]
            .iter()
            .find_map(|s| series.strip_suffix(s).filter(|b| by_name.contains_key(b)))
            .unwrap_or(series);
        if !by_name.contains_key(base) {
            problems.push(format!("{files:?} query {series}, which no binary defines"));
        }
    }
    assert!(problems.is_empty(), "metrics:\n{}", problems.join("\n"));
}

/// The paths ARCHITECTURE.md's code map names: entries start at column 0 (a path from the
/// root; a folder becomes the header of the entries below it) or column 2 (a file in the
/// header's folder or its src/), and their first column ends at two spaces; "a, b" names two.
fn code_map() -> Vec<(usize, PathBuf)> {
    let text = read("ARCHITECTURE.md");
    let after = text
        .split_once("## Code map")
        .expect("ARCHITECTURE.md has a `## Code map`")
        .1;
    let block = after.split("```").nth(1).expect("the code map is a fenced block");
    let root = root();
    let mut header: Option<PathBuf> = None;
    let mut out = Vec::new();
    for (i, line) in block.lines().enumerate() {
        let indent = line.len() - line.trim_start().len();
        let first = line.trim_start().split("  ").next().unwrap_or("").trim();
        if first.is_empty() || indent > 2 {
            continue;
        }
        for name in first.split(", ") {
            assert!(
                name.chars().all(|c| c.is_ascii_alphanumeric() || "._-/".contains(c)),
                "ARCHITECTURE.md code map line {}: {name:?} is not a path",
                i + 1
            );
            if indent == 0 {
                let path = root.join(name.trim_end_matches('/'));
                if path.is_dir() {
                    header = Some(path.clone());
                }
                out.push((i + 1, path));
            } else {
                let dir = header
                    .clone()
                    .unwrap_or_else(|| panic!("code map line {}: {name} has no folder above it", i + 1));
                let in_src = dir.join("src").join(name);
                out.push((i + 1, if in_src.exists() { in_src } else { dir.join(name) }));
            }
        }
    }
    out
}

#[test]
fn the_code_map_names_only_files_that_exist() {
    let entries = code_map();
    assert!(entries.len() > 30, "the code map has only {} entries", entries.len());
    let root = root();
    let missing: Vec<String> = entries
        .iter()
        .filter(|(_, p)| !p.exists())
        .map(|(line, p)| {
            format!(
                "line {line} of the code map: {}",
                p.strip_prefix(&root).unwrap_or(p).display()
            )
        })
        .collect();
    assert!(
        missing.is_empty(),
        "ARCHITECTURE.md's code map names what does not exist:\n{}",
        missing.join("\n")
    );
}

/// The binaries of `BINARY_PACKAGES`, from their manifests: `[[bin]]` names, else the package.
fn binaries() -> Vec<String> {
    let root = root();
    let workspace = read("Cargo.toml");
    let members: Vec<String> = workspace
        .split_once("members = [")
        .unwrap()
        .1
        .split(']')
        .next()
        .unwrap()
        .split(',')
        .map(|m| m.trim().trim_matches('"').to_owned())
        .filter(|m| !m.is_empty())
        .collect();
    let mut out = Vec::new();
    for m in members {
        let manifest = std::fs::read_to_string(root.join(&m).join("Cargo.toml")).unwrap();
        let value = |line: &str| line.split_once('=').map(|(_, v)| v.trim().trim_matches('"').to_owned());
        let package = manifest
            .lines()
            .find(|l| l.starts_with("name"))
            .and_then(value)
            .unwrap();
        if !BINARY_PACKAGES.contains(&package.as_str()) {
            continue;
        }
        let mut bins = Vec::new();
        let mut in_bin = false;
        for line in manifest.lines() {
            if line.starts_with('[') {
                in_bin = line == "[[bin]]";
            } else if in_bin && line.starts_with("name") {
                bins.extend(value(line));
            }
        }
        if bins.is_empty() && root.join(&m).join("src/main.rs").exists() {
            bins.push(package);
        }
        out.extend(bins);
    }
    out
}

/// Options (and arguments) without a description in one `--help` text; and the subcommands.
fn undescribed(help: &str) -> (Vec<String>, Vec<String>) {
    const META: [&str; 5] = [
        "[default:",
        "[env:",
        "[possible values:",
        "[aliases:",
        "[short aliases:",
    ];
    let strip_meta = |mut s: String| {
        for m in META {
            while let Some(at) = s.find(m) {
                let end = s[at..].find(']').map_or(s.len(), |e| at + e + 1);
                s.replace_range(at..end, "");
            }
        }
        s
    };
    let mut missing = Vec::new();
    let mut commands = Vec::new();
    let mut section = "";
    // (the option, its description so far)
    let mut current: Option<(String, String)> = None;
    let mut in_possible_values = false;
    let finish = |current: &mut Option<(String, String)>, missing: &mut Vec<String>| {
        if let Some((opt, desc)) = current.take()
            && !strip_meta(desc).chars().any(char::is_alphabetic)
        {
            missing.push(opt);
        }
    };
    for line in help.lines() {
        let indent = line.len() - line.trim_start().len();
        let trimmed = line.trim();
        if indent == 0 && !trimmed.is_empty() {
            finish(&mut current, &mut missing);
            section = if trimmed.ends_with(':') { trimmed } else { "" };
            continue;
        }
        let entry = match section {
            "Options:" => indent < 10 && trimmed.starts_with('-'),
            "Arguments:" => indent < 10 && (trimmed.starts_with('<') || trimmed.starts_with('[')),
            "Commands:" => {
                if indent == 2 {
                    let (name, desc) = trimmed.split_once("  ").unwrap_or((trimmed, ""));
                    if desc.trim().is_empty() {
                        missing.push(format!("subcommand {name}"));
                    }
                    if name != "help" {
                        commands.push(name.to_owned());
                    }
                }
                continue;
            }
            _ => continue,
        };
        if entry {
            finish(&mut current, &mut missing);
            in_possible_values = false;
            let (spec, inline) = trimmed.split_once("  ").unwrap_or((trimmed, ""));
            current = Some((spec.to_owned(), inline.to_owned()));
        } else if let Some((_, desc)) = current.as_mut() {
            // Generated lists of values do not describe the option.
            if trimmed == "Possible values:" {
                in_possible_values = true;
            } else if in_possible_values && trimmed.starts_with("- ") {
            } else {
                in_possible_values = false;
                desc.push(' ');
                desc.push_str(trimmed);
            }
        }
    }
    finish(&mut current, &mut missing);
    (missing, commands)
}

#[test]
fn undescribed_finds_options_without_help() {
    let help = "Usage: x [OPTIONS]\n\nCommands:\n  run   Runs\n  help  Print help\n\nOptions:\n      --host <HOST>\n          \n      --port <PORT>\n          Port [default: 1]\n      --mode <MODE>\n          Possible values:\n          - a: A\n          \n          [default: a]\n\n  -q, --quiet  Say less\n      --log <LOG>  [env: LOG=]\n";
    let (missing, commands) = undescribed(help);
    assert_eq!(missing, ["--host <HOST>", "--mode <MODE>", "--log <LOG>"]);
    assert_eq!(commands, ["run"]);
}

#[test]
fn every_flag_of_every_binary_has_help() {
    let binaries = binaries();
    assert!(binaries.len() >= 5, "binaries: {binaries:?}");
    let mut problems = Vec::new();
    for name in &binaries {
        let exe = bin(name);
        let mut todo = vec![Vec::<String>::new()];
        while let Some(sub) = todo.pop() {
            let out = Command::new(&exe).args(&sub).arg("--help").output().unwrap();
            let help = String::from_utf8_lossy(&out.stdout);
            let what = [name.as_str()]
                .into_iter()
                .chain(sub.iter().map(String::as_str))
                .collect::<Vec<_>>()
                .join(" ");
            assert!(
                out.status.success() && help.contains("Options:"),
                "{what} --help: {help}"
            );
            let (missing, commands) = undescribed(&help);
            problems.extend(missing.into_iter().map(|m| format!("{what}: {m}")));
            for c in commands {
                let mut next = sub.clone();
                next.push(c);
                todo.push(next);
            }
        }
    }
    assert!(
        problems.is_empty(),
        "flags without help text in --help (a doc comment on the clap field):\n{}",
        problems.join("\n")
    );
}
