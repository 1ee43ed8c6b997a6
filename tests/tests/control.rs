//! lmstack-control and the routers that follow it: engines found (a static list, or pods
//! from a fake Kubernetes API over real HTTP), probed, and streamed to every router; what
//! happens when engines die, pods go while the watch is down, models scale, control goes
//! away, or sends garbage. Bounds are measured and printed (`--nocapture`), not asserted.

#![allow(clippy::unwrap_used, reason = "tests assert by unwrapping")]

use std::collections::HashSet;
use std::io::{Read, Write};
use std::net::TcpListener;
use std::thread;
use std::time::{Duration, Instant};

use lmstack_e2e::kube::{FakeApi, engine_pod};
use lmstack_e2e::*;

fn sims(n: usize) -> Vec<Proc> {
    (0..n).map(|i| sim(&format!("e{i}"), &[])).collect()
}

fn complete(r: &Proc) -> Reply {
    post(
        r,
        "/v1/completions",
        &json!({"model": "sim-model", "prompt": "hi", "max_tokens": 2}),
        &[],
    )
}

/// Engines that answered `n` requests through `r`; every request must succeed.
fn engines_used(r: &Proc, n: usize) -> HashSet<String> {
    (0..n)
        .map(|_| {
            let reply = complete(r);
            assert_eq!(reply.status, 200, "{}", reply.body);
            reply.header("x-sim-engine").unwrap().to_owned()
        })
        .collect()
}

/// Control over `engines`, which marks an engine unhealthy after one failed probe.
fn control_over(engines: &[Proc]) -> Proc {
    let urls: Vec<String> = engines.iter().map(Proc::url).collect();
    static_control(&urls, &["--unhealthy-after", "1"])
}

fn kube_control(api: &FakeApi, extra: &[&str]) -> Proc {
    let kubeconfig = api.kubeconfig();
    let mut a = args(&[
        "--source",
        "kube",
        "--namespace",
        "default",
        "--probe-interval-ms",
        "200",
    ]);
    a.extend(args(extra));
    control(&a, &[("KUBECONFIG", kubeconfig.to_str().unwrap())])
}

#[test]
fn routers_follow_control_and_drop_a_killed_engine() {
    let mut e = sims(2);
    let c = control_over(&e);
    let routers = [router_following(&c, &[]), router_following(&c, &[])];
    for r in &routers {
        wait_until("routers see both engines", || healthy_endpoints(r, "sim-model") == 2);
        assert_eq!(engines_used(r, 4).len(), 2);
        assert_eq!(get(r, "/health").json()["control"]["connected"], true);
    }
    let killed = e.pop().unwrap();
    drop(killed);
    let start = Instant::now();
    for r in &routers {
        wait_until("routers drop the killed engine", || {
            healthy_endpoints(r, "sim-model") == 1
        });
    }
    println!("killed engine out of every router after {:?}", start.elapsed());
    for r in &routers {
        assert_eq!(engines_used(r, 10), HashSet::from(["e0".to_owned()]));
    }
}

#[test]
fn routers_keep_serving_the_last_snapshot_while_control_is_gone() {
    let e = sims(2);
    let c = control_over(&e);
    let r = router_following(&c, &[]);
    wait_until("the router sees both engines", || {
        healthy_endpoints(&r, "sim-model") == 2
    });
    let control_addr = c.addr;
    let version = get(&r, "/health").json()["snapshot_version"].as_u64().unwrap();
    c.terminate();
    wait_until("the router notices control is gone", || {
        get(&r, "/health").json()["control"]["connected"] == false
    });
    // Routing goes on, on the last snapshot, for as long as the test cares to look.
    let until = Instant::now() + Duration::from_secs(3);
    let mut served = 0;
    while Instant::now() < until {
        assert_eq!(engines_used(&r, 2).len(), 2);
        served += 2;
    }
    let health = get(&r, "/health").json();
    assert_eq!(health["status"], "ok");
    assert_eq!(health["snapshot_version"].as_u64(), Some(version));
    let text = metrics_text(&r);
    assert_eq!(metric(&text, "lmstack_control_connected", &[]), Some(0.0));
    assert!(metric(&text, "lmstack_control_disconnects_total", &[]).unwrap() >= 1.0);
    println!("{served} requests served with control down");

    // Control comes back (a new process, on the same address): the router follows it again.
    let urls = e.iter().map(Proc::url).collect::<Vec<_>>().join(",");
    let _c2 = Proc::start(
        &bin("lmstack-control"),
        &args(&[
            "--listen",
            &control_addr.to_string(),
            "--source",
            "static",
            "--static-backends",
            &urls,
        ]),
        &[],
    );
    wait_until("the router reconnects", || {
        get(&r, "/health").json()["control"]["connected"] == true
    });
    wait_until("the new control's snapshot is in use", || {
        get(&r, "/health").json()["snapshot_version"].as_u64() > Some(version)
    });
}

/// A control that sends one good snapshot, then `then` on the same stream; every later
/// connection gets `later` and is held open.
fn fake_control(first: String, then: &'static str, later: String) -> std::net::SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    thread::spawn(move || {
        for (i, conn) in listener.incoming().map_while(Result::ok).enumerate() {
            let body = if i == 0 {
                format!("{first}\n{then}\n")
            } else {
                format!("{later}\n")
            };
            thread::spawn(move || {
                let mut conn = conn;
                let mut buf = [0u8; 4096];
                let _ = conn.read(&mut buf);
                let _ = write!(
                    conn,
                    "HTTP/1.1 200 OK\r\ncontent-type: application/x-ndjson\r\ntransfer-encoding: chunked\r\n\r\n{:x}\r\n{body}\r\n",
                    body.len()
                );
                thread::sleep(Duration::from_secs(60));
            });
        }
    });
    addr
}

fn full_snapshot(version: u64, engine: &Proc, model_endpoint: u32) -> String {
    json!({"type": "full", "snapshot": {
        "version": version,
        "endpoints": [{"url": engine.url(), "addr": engine.addr.to_string(), "healthy": true}],
        "models": [{"name": "sim-model", "endpoints": [model_endpoint]}],
    }})
    .to_string()
}

#[test]
fn a_bad_snapshot_is_rejected_counted_and_the_last_good_one_kept() {
    let e = sims(1);
    // The first stream breaks mid-way with garbage; the next ones bring a snapshot whose
    // model points at an endpoint that does not exist.
    let addr = fake_control(
        full_snapshot(10, &e[0], 0),
        "{\"type\":\"full\",",
        full_snapshot(11, &e[0], 7),
    );
    let r = router(&args(&[
        "--service-discovery",
        "control",
        "--control-url",
        &format!("http://{addr}"),
    ]));
    wait_until("the good snapshot is in use", || {
        healthy_endpoints(&r, "sim-model") == 1
    });
    let text = metrics_when(&r, "both rejections counted", |t| {
        metric(t, "lmstack_snapshot_rejected_total", &[("error_kind", "malformed")]).is_some()
            && metric(t, "lmstack_snapshot_rejected_total", &[("error_kind", "invalid")]).is_some()
    });
    assert!(metric(&text, "lmstack_snapshot_rejected_total", &[("error_kind", "malformed")]).unwrap() >= 1.0);
    assert_eq!(get(&r, "/health").json()["snapshot_version"], 10);
    assert_eq!(engines_used(&r, 3), HashSet::from(["e0".to_owned()]));
}

#[test]
fn file_discovery_follows_the_file() {
    let e = sims(2);
    let path = workspace_root().join(format!("target/e2e-logs/backends-{}.yaml", std::process::id()));
    std::fs::write(&path, format!("backends:\n  - url: {}\n", e[0].url())).unwrap();
    let r = router(&args(&[
        "--service-discovery",
        "file",
        "--discovery-file",
        path.to_str().unwrap(),
        "--health-check-interval-ms",
        "100",
    ]));
    wait_until("the first engine is in use", || healthy_endpoints(&r, "sim-model") == 1);
    assert_eq!(engines_used(&r, 3), HashSet::from(["e0".to_owned()]));
    // A broken file keeps the last backends.
    std::fs::write(&path, "backends: [{url: ftp://nope}]\n").unwrap();
    metrics_when(&r, "the broken file counted", |t| {
        metric(t, "lmstack_discovery_file_reads_total", &[("status", "fail")]).is_some()
    });
    assert_eq!(engines_used(&r, 3), HashSet::from(["e0".to_owned()]));
    std::fs::write(
        &path,
        format!("backends:\n  - url: {}\n  - url: {}\n", e[0].url(), e[1].url()),
    )
    .unwrap();
    wait_until("both engines are in use", || healthy_endpoints(&r, "sim-model") == 2);
    assert_eq!(engines_used(&r, 4).len(), 2);
    let _ = std::fs::remove_file(&path);
}

#[test]
fn no_ghost_endpoint_survives_a_pod_deleted_while_the_watch_was_down() {
    let e = sims(2);
    let api = FakeApi::start();
    api.add(engine_pod("engine-a", e[0].addr.port(), "sim-model"));
    api.add(engine_pod("engine-b", e[1].addr.port(), "sim-model"));
    let c = kube_control(&api, &[]);
    let r = router_following(&c, &[]);
    wait_until("the router sees both pods", || healthy_endpoints(&r, "sim-model") == 2);

    // The watch drops; while it is down, pod b is deleted and the history compacted, so no
    // watch can replay the delete. Engine b still answers: only a relist can remove it.
    api.down();
    api.delete("engine-b");
    api.compact();
    let (lists_before, _) = api.requests();
    thread::sleep(Duration::from_millis(300));
    assert_eq!(
        listed_endpoints(&r, "sim-model"),
        2,
        "nothing can be known while the API is down"
    );
    api.up();
    let start = Instant::now();
    wait_until("the deleted pod leaves the router", || {
        listed_endpoints(&r, "sim-model") == 1
    });
    println!(
        "deleted pod out of the router {:?} after the API came back",
        start.elapsed()
    );
    assert!(api.requests().0 > lists_before, "a relist after 410 Gone");
    assert_eq!(engines_used(&r, 10), HashSet::from(["e0".to_owned()]));
    let text = metrics_text(&c);
    assert!(metric(&text, "lmstack_control_watch_errors_total", &[]).unwrap() >= 1.0);
}

#[test]
fn pods_scaling_from_two_to_four_reach_every_router_and_unready_pods_are_drained() {
    let e = sims(4);
    let api = FakeApi::start();
    for (i, engine) in e.iter().take(2).enumerate() {
        api.add(engine_pod(&format!("engine-{i}"), engine.addr.port(), "sim-model"));
    }
    let c = kube_control(&api, &["--model-label", "model"]);
    let routers = [router_following(&c, &[]), router_following(&c, &[])];
    for r in &routers {
        wait_until("routers see two pods", || healthy_endpoints(r, "sim-model") == 2);
    }
    let start = Instant::now();
    for (i, engine) in e.iter().enumerate().skip(2) {
        api.add(engine_pod(&format!("engine-{i}"), engine.addr.port(), "sim-model"));
    }
    for r in &routers {
        wait_until("routers see four pods", || healthy_endpoints(r, "sim-model") == 4);
    }
    println!("scale-out to 4 pods in every router after {:?}", start.elapsed());
    for r in &routers {
        assert_eq!(engines_used(r, 8).len(), 4);
    }
    // A pod that stops being ready is drained: listed, not routed to.
    let mut unready = engine_pod("engine-3", e[3].addr.port(), "sim-model");
    unready["status"]["conditions"][0]["status"] = json!("False");
    api.modify(unready);
    for r in &routers {
        wait_until("routers drain the unready pod", || {
            healthy_endpoints(r, "sim-model") == 3
        });
        assert_eq!(listed_endpoints(r, "sim-model"), 4);
        assert!(!engines_used(r, 9).contains("e3"));
    }
}

#[test]
fn a_prefix_routed_by_one_replica_is_routed_the_same_way_by_the_other() {
    let e = sims(4);
    let c = control_over(&e);
    let routers = [
        router_following(&c, &["--routing-logic", "prefix"]),
        router_following(&c, &["--routing-logic", "prefix"]),
    ];
    for r in &routers {
        wait_until("routers see all engines", || healthy_endpoints(r, "sim-model") == 4);
    }
    let prompt = |u: usize, round: usize| {
        let mut p = format!("User {u} shares a long document. ");
        p.push_str(&"Paragraph of the document, with details that matter. ".repeat(30 + u));
        for k in 0..round {
            p.push_str(&format!(" Question {k} and its answer."));
        }
        p
    };
    let engine = |r: &Proc, u: usize, round: usize| {
        let reply = post(
            r,
            "/v1/completions",
            &json!({"model": "sim-model", "prompt": prompt(u, round), "max_tokens": 2}),
            &[],
        );
        assert_eq!(reply.status, 200, "{}", reply.body);
        reply.header("x-sim-engine").unwrap().to_owned()
    };
    let applied = |r: &Proc| {
        metric_sum(
            &metrics_text(r),
            "lmstack_affinity_shared_blocks_total",
            &[("status", "applied")],
        )
    };
    let users = 8;
    let first: Vec<String> = (0..users).map(|u| engine(&routers[0], u, 0)).collect();
    assert!(
        first.iter().collect::<HashSet<_>>().len() > 1,
        "users spread over engines: {first:?}"
    );
    let start = Instant::now();
    // Every block the first replica recorded (its table's entries) has been reported.
    let sent = metrics_when(&routers[0], "assignments reported", |t| {
        let entries = metric(t, "lmstack_affinity_entries", &[]).unwrap_or(0.0);
        entries > 0.0 && metric_sum(t, "lmstack_affinity_shared_blocks_total", &[("status", "sent")]) >= entries
    });
    let sent = metric_sum(&sent, "lmstack_affinity_shared_blocks_total", &[("status", "sent")]);
    wait_until("the other replica learns them", || applied(&routers[1]) >= sent);
    println!(
        "{sent} blocks from one replica applied by the other after {:?}",
        start.elapsed()
    );
    // The next round of every conversation goes through the other replica: same engines.
    let second: Vec<String> = (0..users).map(|u| engine(&routers[1], u, 1)).collect();
    assert_eq!(first, second);
    // A replica that connects later learns the recent assignments too.
    let late = router_following(&c, &["--routing-logic", "prefix"]);
    wait_until("the late replica sees all engines", || {
        healthy_endpoints(&late, "sim-model") == 4
    });
    wait_until("the late replica learns the recent assignments", || {
        applied(&late) >= sent
    });
    let third: Vec<String> = (0..users).map(|u| engine(&late, u, 2)).collect();
    assert_eq!(first, third);
}
