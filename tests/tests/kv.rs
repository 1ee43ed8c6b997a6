//! Exact KV routing end to end: simulated engines publishing real-format KV events over
//! ZeroMQ (lmstack-sim with the tiny model's real tokenizer), the router subscribed to them.
//! Every assertion reads the router's own view: its `x-lmstack-route` explanation and its
//! `/metrics`.

#![allow(clippy::unwrap_used, reason = "tests assert by unwrapping")]

use lmstack_e2e::*;
use lmstack_kv::key::{RequestExtras, prompt_keys};
use lmstack_kv::prompt::PromptTokenizer;

const MODEL: &str = TINY_MODEL;
const BLOCK: usize = 16;

/// A simulated engine's flags: the tiny model's tokenizer, KV events published on `kv_port`.
fn engine(name: &str, kv_port: u16, extra: &[&str]) -> Proc {
    tiny_kv_sim(name, kv_port, extra)
}

fn router_over(engines: &[&Proc], extra: &[&str]) -> Proc {
    let dir = format!("{MODEL}={}", tiny_tokenizer_dir());
    let mut a = backends(engines);
    a.extend(args(&[
        "--routing-logic",
        "prefix",
        "--explain-routing",
        "--health-check-interval-ms",
        "200",
        "--tokenizer",
        &dir,
    ]));
    a.extend(args(extra));
    let r = router(&a);
    wait_until("all engines healthy", || {
        healthy_endpoints(&r, MODEL) == engines.len() as u64
    });
    r
}

fn wait_mode(router: &Proc, engine: &Proc, m: &str) {
    wait_until(&format!("{} routed {m}", engine.url()), || {
        routing_mode_is(router, engine, m)
    });
}

/// A long document only `seed` has: many full blocks.
fn document(seed: usize) -> String {
    (0..40)
        .map(|i| {
            format!(
                "Section {i} of report {seed}: the figures for quarter {} were revised. ",
                i * seed % 7
            )
        })
        .collect()
}

fn completion(prompt: &str) -> Value {
    json!({"model": MODEL, "prompt": prompt, "max_tokens": 2})
}

/// The prompt's full blocks, as vLLM (and the simulator) cut them.
fn full_blocks(prompt: &str) -> usize {
    let t = PromptTokenizer::from_dir(std::path::Path::new(&tiny_tokenizer_dir())).unwrap();
    let tokens = t.completion(completion(prompt).to_string().as_bytes()).unwrap();
    let mut keys = Vec::new();
    prompt_keys(&tokens, BLOCK, RequestExtras::default(), &mut keys);
    keys.len()
}

#[test]
fn routing_follows_what_engines_report_holding() {
    let (a, b) = (engine("a", free_port(), &[]), engine("b", free_port(), &[]));
    let r = router_over(&[&a, &b], &[]);
    wait_mode(&r, &a, "exact");
    wait_mode(&r, &b, "exact");

    // A prompt sent to engine b directly, behind the router's back: only b's events tell.
    let doc = document(1);
    assert_eq!(post(&b, "/v1/completions", &completion(&doc), &[]).status, 200);
    let blocks = full_blocks(&doc);
    assert!(blocks >= 10, "{blocks}");
    wait_until("b's blocks indexed", || kv_index_blocks(&r, &b) >= blocks as f64);
    let reply = post(
        &r,
        "/v1/completions",
        &completion(&format!("{doc} And one more question?")),
        &[],
    );
    assert_eq!(reply.status, 200, "{}", reply.body);
    assert_eq!(
        reply.header("x-sim-engine"),
        Some("b"),
        "{:?}",
        reply.header("x-lmstack-route")
    );
    assert_eq!(reply.explained("kv"), "exact");
    assert_eq!(
        reply.explained("kv_blocks").split('/').next(),
        Some(&*blocks.to_string())
    );
    assert_eq!(reply.explained("reason"), "prefix_match");

    // A chat conversation: its second round goes where the first one's blocks are.
    let mut messages = vec![json!({"role": "user", "content": document(2)})];
    let first = post(
        &r,
        "/v1/chat/completions",
        &json!({"model": MODEL, "messages": messages, "max_tokens": 2}),
        &[],
    );
    assert_eq!(first.status, 200, "{}", first.body);
    let home = first.header("x-sim-engine").unwrap().to_owned();
    let home_engine = if home == "a" { &a } else { &b };
    let before = kv_index_blocks(&r, home_engine);
    wait_until("the first round's blocks indexed", || {
        kv_index_blocks(&r, home_engine) > before
    });
    messages.push(json!({"role": "assistant", "content": "Noted."}));
    messages.push(json!({"role": "user", "content": "Summarise section 3."}));
    let second = post(
        &r,
        "/v1/chat/completions",
        &json!({"model": MODEL, "messages": messages, "max_tokens": 2}),
        &[],
    );
    assert_eq!(second.header("x-sim-engine"), Some(&*home));
    assert_eq!(second.explained("kv"), "exact");
    let held: usize = second
        .explained("kv_blocks")
        .split('/')
        .next()
        .unwrap()
        .parse()
        .unwrap();
    assert!(held >= 10, "{:?}", second.header("x-lmstack-route"));

    // A cache reset (AllBlocksCleared) empties b's index: nothing stale is matched there.
    assert_eq!(post(&b, "/reset_prefix_cache", &json!({}), &[]).status, 200);
    wait_until("b's index cleared", || kv_index_blocks(&r, &b) == 0.0);
    let text = metrics_text(&r);
    assert!(
        metric(
            &text,
            "lmstack_kv_index_resyncs_total",
            &[("endpoint", &b.url()), ("reason", "reset")]
        )
        .unwrap()
            >= 1.0
    );
    let reply = post(&r, "/v1/completions", &completion(&format!("{doc} Another one?")), &[]);
    if reply.header("x-sim-engine") == Some("b") {
        assert_eq!(reply.explained("kv_blocks").split('/').next(), Some("0"));
    }
}

#[test]
fn a_gap_in_the_events_drops_the_index_and_a_replay_avoids_it() {
    let (kv_a, kv_b, replay_b) = (free_port(), free_port(), free_port());
    let a = engine("a", kv_a, &[]);
    let replay = replay_b.to_string();
    let b = engine("b", kv_b, &["--kv-events-replay-port", &replay]);
    let r = router_over(&[&a, &b], &[]);
    wait_mode(&r, &a, "exact");
    wait_mode(&r, &b, "exact");
    for (e, doc) in [(&a, 3), (&b, 4)] {
        assert_eq!(post(e, "/v1/completions", &completion(&document(doc)), &[]).status, 200);
        wait_until("indexed", || kv_index_blocks(&r, e) > 0.0);
    }
    // Three batches lost on the wire at each engine, then one more arrives (each request
    // stores new blocks: one batch each).
    for (e, doc) in [(&a, 20), (&b, 30)] {
        assert_eq!(post(e, "/sim/kv_events", &json!({"skip": 3}), &[]).status, 200);
        for i in 0..4 {
            post(e, "/v1/completions", &completion(&document(doc + i)), &[]);
        }
    }
    // a has no replay socket: its index was dropped, and is a lower bound now (blocks a
    // stored during the gap are unseen): routed `degraded` until they are evicted.
    let text = metrics_when(&r, "a's gap counted", |t| {
        metric(
            t,
            "lmstack_kv_index_resyncs_total",
            &[("endpoint", &a.url()), ("reason", "gap")],
        )
        .is_some_and(|v| v >= 1.0)
    });
    wait_mode(&r, &a, "degraded");
    // b replayed the missing batches and kept its index.
    wait_until("b's replay", || {
        metric(
            &metrics_text(&r),
            "lmstack_kv_event_batches_replayed_total",
            &[("endpoint", &b.url())],
        )
        .is_some_and(|v| v >= 3.0)
    });
    assert_eq!(
        metric(
            &text,
            "lmstack_kv_index_resyncs_total",
            &[("endpoint", &b.url()), ("reason", "gap")]
        ),
        None,
        "b replayed, it should not have dropped its index"
    );
    // b still holds the first document's blocks in the router's view.
    let reply = post(
        &r,
        "/v1/completions",
        &completion(&format!("{} more", document(4))),
        &[],
    );
    assert_eq!(reply.header("x-sim-engine"), Some("b"));
    assert_eq!(reply.explained("kv"), "exact");
}

#[test]
fn a_restarted_engine_is_detected_and_routed_exactly_again() {
    let kv_port = free_port();
    let a = engine("a", free_port(), &[]);
    let b = engine("b", kv_port, &[]);
    let r = router_over(&[&a, &b], &[]);
    wait_mode(&r, &b, "exact");
    let doc = document(7);
    assert_eq!(post(&b, "/v1/completions", &completion(&doc), &[]).status, 200);
    wait_until("indexed", || kv_index_blocks(&r, &b) > 0.0);

    // b restarts on the same ports with an empty cache.
    let port = b.addr.port().to_string();
    b.terminate();
    let mut flags = args(&["--host", "127.0.0.1", "--port", &port, "--name", "b2"]);
    flags.extend(tiny_kv_flags(kv_port));
    let b = Proc::start(&bin("lmstack-sim"), &flags, &[]);
    // The router noticed: the index was dropped, and b is exact again once resubscribed.
    wait_until("b's index dropped", || kv_index_blocks(&r, &b) == 0.0);
    wait_mode(&r, &b, "exact");
    let text = metrics_text(&r);
    assert!(metric_sum(&text, "lmstack_kv_index_resyncs_total", &[("endpoint", &b.url())]) >= 1.0);
    // Nothing stale: the restarted b is not credited with the document.
    let reply = post(&r, "/v1/completions", &completion(&format!("{doc} again")), &[]);
    assert_eq!(reply.status, 200);
    if reply.header("x-sim-engine") == Some("b2") {
        assert_eq!(reply.explained("kv_blocks").split('/').next(), Some("0"));
    }
}

#[test]
fn the_index_is_bounded_and_engines_without_events_are_approximate() {
    let a = engine("a", free_port(), &[]);
    let plain = sim("plain", &["--model", MODEL]);
    let config = workspace_root().join("target/e2e-logs/kv-bound.yaml");
    std::fs::create_dir_all(config.parent().unwrap()).unwrap();
    std::fs::write(&config, "kv_events:\n  max_blocks_per_engine: 8\n").unwrap();
    let r = router_over(&[&a, &plain], &["--config", config.to_str().unwrap()]);
    wait_mode(&r, &a, "exact");
    wait_mode(&r, &plain, "approximate");
    for i in 0..3 {
        post(&a, "/v1/completions", &completion(&document(10 + i)), &[]);
    }
    let text = metrics_when(&r, "blocks dropped at the bound", |t| {
        metric(
            t,
            "lmstack_kv_events_dropped_total",
            &[("endpoint", &a.url()), ("reason", "bound")],
        )
        .is_some_and(|v| v >= 1.0)
    });
    assert!(metric(&text, "lmstack_kv_index_blocks", &[("endpoint", &a.url())]).unwrap() <= 8.0);
    // Registration checks passed for the simulator (it exports what vLLM does).
    for check in [
        "metric_running",
        "metric_waiting",
        "metric_kv_usage",
        "prefix_caching",
        "block_size",
    ] {
        assert_eq!(
            metric(
                &text,
                "lmstack_kv_compat_problem",
                &[("endpoint", &a.url()), ("check", check)]
            ),
            Some(0.0),
            "{check}"
        );
    }
}

#[test]
fn control_follows_the_engines_once_and_every_replica_routes_exactly() {
    let (a, b) = (engine("a", free_port(), &[]), engine("b", free_port(), &[]));
    let c = static_control(&[a.url(), b.url()], &[]);
    let dir = format!("{MODEL}={}", tiny_tokenizer_dir());
    let replica = |_: usize| {
        let r = router_following(
            &c,
            &["--routing-logic", "prefix", "--explain-routing", "--tokenizer", &dir],
        );
        wait_until("the replica routes", || healthy_endpoints(&r, MODEL) == 2);
        r
    };
    let (r1, r2) = (replica(1), replica(2));
    for r in [&r1, &r2] {
        wait_mode(r, &a, "exact");
        wait_mode(r, &b, "exact");
    }
    // Blocks stored on b behind every router's back reach both replicas through control.
    let doc = document(40);
    assert_eq!(post(&b, "/v1/completions", &completion(&doc), &[]).status, 200);
    let blocks = full_blocks(&doc) as f64;
    for r in [&r1, &r2] {
        wait_until("b's blocks relayed", || kv_index_blocks(r, &b) >= blocks);
        let reply = post(r, "/v1/completions", &completion(&format!("{doc} And then?")), &[]);
        assert_eq!(
            reply.header("x-sim-engine"),
            Some("b"),
            "{:?}",
            reply.header("x-lmstack-route")
        );
        assert_eq!(reply.explained("kv"), "exact");
    }
    // The replicas never subscribed themselves: control did, once per engine.
    for r in [&r1, &r2] {
        assert_eq!(metric_sum(&metrics_text(r), "lmstack_kv_event_batches_total", &[]), 0.0);
    }
    assert!(metric_sum(&metrics_text(&c), "lmstack_control_kv_event_batches_total", &[]) >= 1.0);
    // A replica that connects later gets the whole index at once.
    let r3 = replica(3);
    wait_until("the late replica has b's blocks", || kv_index_blocks(&r3, &b) >= blocks);
    // A reset on b reaches every replica.
    assert_eq!(post(&b, "/reset_prefix_cache", &json!({}), &[]).status, 200);
    for r in [&r1, &r2, &r3] {
        wait_until("b's reset relayed", || kv_index_blocks(r, &b) == 0.0);
    }
}

#[test]
fn a_lora_adapters_blocks_are_its_own() {
    let a = engine("a", free_port(), &["--lora", "sql"]);
    let b = engine("b", free_port(), &["--lora", "sql"]);
    let r = router_over(&[&a, &b], &[]);
    wait_mode(&r, &b, "exact");
    wait_until("the adapter is served", || {
        metric(
            &metrics_text(&r),
            "lmstack_routing_mode",
            &[("model", "sql"), ("endpoint", &b.url()), ("mode", "exact")],
        ) == Some(1.0)
    });
    // The adapter's prompt cached on b: the adapter's requests find it there (keyed with
    // the adapter's name, as vLLM hashes it), the base model's do not.
    let doc = document(50);
    let lora = |prompt: &str| json!({"model": "sql", "prompt": prompt, "max_tokens": 2});
    assert_eq!(post(&b, "/v1/completions", &lora(&doc), &[]).status, 200);
    wait_until("indexed", || kv_index_blocks(&r, &b) > 0.0);
    let reply = post(&r, "/v1/completions", &lora(&format!("{doc} More?")), &[]);
    assert_eq!(reply.status, 200, "{}", reply.body);
    assert_eq!(
        reply.header("x-sim-engine"),
        Some("b"),
        "{:?}",
        reply.header("x-lmstack-route")
    );
    let held: usize = reply.explained("kv_blocks").split('/').next().unwrap().parse().unwrap();
    assert!(held >= 10, "{:?}", reply.header("x-lmstack-route"));
    let base = post(&r, "/v1/completions", &completion(&format!("{doc} More?")), &[]);
    assert_eq!(base.explained("kv_held"), "0,0", "{:?}", base.header("x-lmstack-route"));
}

#[test]
fn a_router_joining_late_replays_what_it_missed_or_says_it_is_incomplete() {
    let replay = free_port().to_string();
    let a = engine("a", free_port(), &["--kv-events-replay-port", &replay]);
    let b = engine("b", free_port(), &[]);
    // Traffic before any router subscribed: the shared prefix every later block hangs from.
    let doc = document(60);
    for e in [&a, &b] {
        assert_eq!(post(e, "/v1/completions", &completion(&doc), &[]).status, 200);
    }
    let r = router_over(&[&a, &b], &[]);
    // Subscribed, with nothing seen yet of engines that served traffic: lower bounds.
    wait_mode(&r, &a, "degraded");
    wait_mode(&r, &b, "degraded");
    // The next batch shows what was missed. a's replay socket still has it: the index is
    // complete. b has none: its index stays a lower bound, and says so.
    for e in [&a, &b] {
        let more = format!("{doc} {}", document(61));
        assert_eq!(post(e, "/v1/completions", &completion(&more), &[]).status, 200);
    }
    wait_until("a replayed", || kv_index_blocks(&r, &a) >= full_blocks(&doc) as f64);
    wait_mode(&r, &a, "exact");
    wait_mode(&r, &b, "degraded");
    let text = metrics_text(&r);
    assert!(
        metric(
            &text,
            "lmstack_kv_event_batches_replayed_total",
            &[("endpoint", &a.url())]
        )
        .unwrap()
            >= 1.0
    );
    assert!(
        metric(
            &text,
            "lmstack_kv_events_dropped_total",
            &[("endpoint", &b.url()), ("reason", "unchained")]
        )
        .unwrap()
            >= 1.0
    );
}
