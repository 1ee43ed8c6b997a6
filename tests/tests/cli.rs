//! The command line: production-stack's flags, `--check`, and configuration errors.

#![allow(clippy::unwrap_used, reason = "tests assert by unwrapping")]

use std::process::Command;

use lmstack_e2e::*;

fn lmstack(args: &[&str]) -> std::process::Output {
    Command::new(bin("lmstack")).args(args).output().unwrap()
}

#[test]
fn check_prints_the_whole_configuration_and_exits() {
    let out = lmstack(&[
        "--check",
        "--service-discovery",
        "static",
        "--static-backends",
        "http://10.0.0.1:8000,http://10.0.0.2:8000",
        "--static-models",
        "m1,m2",
        "--routing-logic",
        "session",
        "--session-key",
        "x-user-id",
    ]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("valid"));
    assert!(text.contains("policy: session"));
    assert!(text.contains("- x-user-id"));
    assert!(
        text.contains("max_body_bytes: 67108864"),
        "defaults are printed too:\n{text}"
    );
    assert!(
        text.contains("tracing:\n  otlp_endpoint: ''\n  sample_ratio: 1.0\n"),
        "tracing is off by default:\n{text}"
    );
}

#[test]
fn invalid_configuration_fails_at_start_with_a_clear_message() {
    let cases: [(&[&str], &str); 7] = [
        (&["--check"], "no backends"),
        (&["--check", "--static-backends", "https://a:1"], "only http://"),
        (
            &[
                "--check",
                "--static-backends",
                "http://a:1",
                "--routing-logic",
                "kvaware",
            ],
            "unknown routing policy",
        ),
        (
            &[
                "--check",
                "--static-backends",
                "http://a:1,http://b:1",
                "--static-models",
                "m",
            ],
            "one per backend",
        ),
        (
            &[
                "--check",
                "--static-backends",
                "http://a:1",
                "--connect-timeout-ms",
                "0",
            ],
            "connect_timeout_ms",
        ),
        (
            &[
                "--check",
                "--static-backends",
                "http://a:1",
                "--otlp-traces-endpoint",
                "https://collector:4318",
            ],
            "tracing.otlp_endpoint",
        ),
        (
            &[
                "--check",
                "--static-backends",
                "http://a:1",
                "--otlp-traces-endpoint",
                "http://collector:4318",
                "--otlp-sample-ratio",
                "1.5",
            ],
            "tracing.sample_ratio",
        ),
    ];
    for (args, message) in cases {
        let out = lmstack(args);
        assert_eq!(out.status.code(), Some(2), "{args:?}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains(message), "{args:?}: {err}");
    }
    let out = lmstack(&["--no-such-flag"]);
    assert!(!out.status.success());
}

#[test]
fn a_config_file_with_unknown_keys_is_refused() {
    let dir = std::env::temp_dir().join(format!("lmstack-cli-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("c.yaml");
    std::fs::write(
        &path,
        "discovery:\n  backends: [{url: 'http://a:1'}]\nupstream:\n  conect_timeout_ms: 5\n",
    )
    .unwrap();
    let out = lmstack(&["--check", "--config", path.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("unknown field `conect_timeout_ms`"));
    std::fs::write(
        &path,
        "discovery:\n  backends: [{url: 'http://a:1', models: [m]}]\nrouting:\n  models:\n    m: {policy: session}\n",
    )
    .unwrap();
    let out = lmstack(&["--check", "--config", path.to_str().unwrap()]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn a_port_in_use_is_refused_not_shared() {
    let first = router(&args(&["--static-backends", "http://127.0.0.1:9"]));
    let port = first.addr.port().to_string();
    let out = std::process::Command::new(bin("lmstack"))
        .args([
            "--host",
            "127.0.0.1",
            "--port",
            &port,
            "--static-backends",
            "http://127.0.0.1:9",
        ])
        .output()
        .unwrap();
    assert!(!out.status.success(), "a second lmstack bound the same port");
    assert!(String::from_utf8_lossy(&out.stderr).contains("already in use"));
}
