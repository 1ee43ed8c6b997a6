//! Anthropic's Messages API through the router: the official `anthropic` Python SDK,
//! unchanged, against simulated engines (messages, streams, token counts, errors, API keys
//! and the budgets they settle), Anthropic-shaped errors before and after a stream's head,
//! and a multi-turn agent conversation kept on one engine by the prefix policy alone, on the
//! table's blocks or, with the model's tokenizer and engines' KV events, on the engines' own.

#![allow(clippy::unwrap_used, reason = "tests assert by unwrapping")]

use std::collections::{HashMap, HashSet};
use std::process::Command;

use lmstack_e2e::*;

const MODEL: &str = "sim-model";

/// Runs `script` with `args`; asserts it printed `OK` and returns the line after it.
fn python_prints(python: &std::path::Path, script: &str, args: &[&str]) -> String {
    let out = Command::new(python).arg("-c").arg(script).args(args).output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success() && stdout.contains("OK"),
        "stdout:\n{stdout}\nstderr:\n{stderr}"
    );
    stdout.lines().last().unwrap_or("").to_owned()
}

const SDK_SCRIPT: &str = r#"
import sys
import anthropic
from anthropic import Anthropic

url, key = sys.argv[1], sys.argv[2]
client = Anthropic(base_url=url, api_key=key, max_retries=0)
prompt, completion = 0, 0

def prompt_of(usage):
    # Anthropic's input_tokens leave out the tokens read from the cache.
    return usage.input_tokens + (usage.cache_read_input_tokens or 0)

system = "You are a careful assistant. Answer briefly."
messages = [{"role": "user", "content": "Say this is a test"}]
m = client.messages.create(model="sim-model", max_tokens=5, system=system, messages=messages)
assert m.type == "message" and m.role == "assistant", m
assert m.stop_reason == "max_tokens", m
assert len(m.content) == 1 and m.content[0].type == "text", m
assert len(m.content[0].text.split()) == 5, m
assert m.usage.output_tokens == 5 and m.usage.input_tokens > 0, m.usage
prompt += prompt_of(m.usage)
completion += m.usage.output_tokens

counted = client.messages.count_tokens(model="sim-model", system=system, messages=messages)
assert counted.input_tokens == prompt_of(m.usage), (counted, m.usage)

with client.messages.stream(
    model="sim-model", max_tokens=6, system=system,
    messages=messages + [{"role": "assistant", "content": m.content[0].text},
                         {"role": "user", "content": "And once more, streaming."}],
) as stream:
    pieces = list(stream.text_stream)
    final = stream.get_final_message()
assert len(pieces) == 6, pieces
assert final.content[0].text == "".join(pieces), (final, pieces)
assert final.stop_reason == "max_tokens", final
assert final.usage.output_tokens == 6 and prompt_of(final.usage) > prompt_of(m.usage), final.usage
prompt += prompt_of(final.usage)
completion += final.usage.output_tokens

try:
    client.messages.create(model="no-such-model", max_tokens=1, messages=messages)
    raise SystemExit("expected a NotFoundError")
except anthropic.NotFoundError as e:
    assert e.status_code == 404 and "no-such-model" in str(e), e
    assert e.body["type"] == "error" and e.body["error"]["type"] == "not_found_error", e.body

if key != "unused":
    try:
        Anthropic(base_url=url, api_key="sk-wrong", max_retries=0).messages.create(
            model="sim-model", max_tokens=1, messages=messages)
        raise SystemExit("expected an AuthenticationError")
    except anthropic.AuthenticationError as e:
        assert e.status_code == 401 and e.body["error"]["type"] == "authentication_error", e.body

print("OK")
print(prompt, completion)
"#;

#[test]
fn the_anthropic_python_sdk_works_unchanged() {
    let python = python_with_anthropic();
    let e1 = sim("anthropic-e1", &[]);
    let e2 = sim("anthropic-e2", &[]);
    let r = router(&backends(&[&e1, &e2]));
    wait_healthy(&r);
    python_prints(&python, SDK_SCRIPT, &[&r.url(), "unused"]);

    // The router's own errors on these routes are Anthropic's shape too.
    let mut raw = Raw::connect(&r);
    let reply = raw
        .send(&raw_post("/v1/messages", r#"{"model":"#, ""))
        .read_response()
        .unwrap();
    assert_eq!(reply.status, 400, "{}", reply.text());
    let body = reply.json();
    assert_eq!(body["type"], "error", "{body}");
    assert_eq!(body["error"]["type"], "invalid_request_error", "{body}");
    let reply = get(&r, "/v1/messages");
    assert_eq!(reply.status, 405, "{}", reply.body);
    assert_eq!(reply.json()["error"]["type"], "invalid_request_error");
    // Elsewhere, OpenAI's.
    let reply = post(
        &r,
        "/v1/chat/completions",
        &json!({"model": "nope", "messages": []}),
        &[],
    );
    assert_eq!(reply.json()["error"]["code"], "model_not_found", "{}", reply.body);
}

#[test]
fn an_api_key_authenticates_the_sdk_and_its_messages_are_charged_their_usage() {
    let python = python_with_anthropic();
    let e = sim("anthropic-keys", &[]);
    let keys = keys_file(
        "anthropic-keys",
        "tenants:\n- name: claude\n  keys:\n  - sha256: {sha256:sk-claude}\n",
    );
    let r = router(&[backends(&[&e]), args(&["--api-keys", keys.to_str().unwrap()])].concat());
    wait_healthy(&r);
    let used = python_prints(&python, SDK_SCRIPT, &[&r.url(), "sk-claude"]);
    let (prompt, completion) = used.split_once(' ').unwrap();
    let (prompt, completion): (f64, f64) = (prompt.parse().unwrap(), completion.parse().unwrap());
    assert_eq!(completion, 11.0);
    // A message and a stream were charged what their usage said (count_tokens nothing), and
    // nothing stayed an estimate.
    let m = metrics_when(&r, "tokens charged", |m| {
        metric(
            m,
            "lmstack_tenant_tokens_total",
            &[("tenant", "claude"), ("kind", "completion")],
        ) == Some(completion)
    });
    let charged = |kind: &str| {
        metric(
            &m,
            "lmstack_tenant_tokens_total",
            &[("tenant", "claude"), ("kind", kind)],
        )
    };
    assert_eq!(charged("prompt"), Some(prompt), "{m}");
    assert_eq!(charged("estimated"), Some(0.0), "{m}");
}

/// A stream the engine cuts cannot be resumed here: it ends with Anthropic's error event,
/// which the SDK raises, rather than a cut connection or an OpenAI-shaped event it ignores.
#[test]
fn a_cut_messages_stream_ends_with_an_anthropic_error_event() {
    let e = sim("anthropic-cut", &["--decode-base-ms", "4"]);
    let r = router(&[backends(&[&e]), args(&["--stream-idle-timeout-ms", "800"])].concat());
    wait_healthy(&r);
    let fault = post(
        &e,
        "/sim/fault",
        &json!({"kind": "reset_mid_stream", "after_events": 4}),
        &[],
    );
    assert_eq!(fault.status, 200, "{}", fault.body);
    let body = json!({"model": MODEL, "max_tokens": 20, "stream": true,
                      "messages": [{"role": "user", "content": "a long answer please"}]});
    let reply = post(&r, "/v1/messages", &body, &[]);
    assert_eq!(reply.status, 200, "{}", reply.body);
    assert!(reply.body.starts_with("event: message_start\n"), "{}", reply.body);
    let events: Vec<&str> = reply.body.split_terminator("\n\n").collect();
    let last = events.last().unwrap();
    let data = last
        .strip_prefix("event: error\ndata: ")
        .unwrap_or_else(|| panic!("{}", reply.body));
    let error: Value = serde_json::from_str(data).unwrap();
    assert_eq!(error["type"], "error", "{error}");
    assert_eq!(error["error"]["type"], "api_error", "{error}");
    assert!(!reply.body.contains("[DONE]"), "{}", reply.body);
    assert!(!reply.body.contains("message_stop"), "{}", reply.body);
}

/// A coding agent's turn: Claude Code's shape (a billing header that changes every request,
/// `cache_control` on the newest block, thinking with signatures, tool calls and results).
fn agent_turn(model: &str, user: usize, turns: usize, request: usize) -> Value {
    let mut messages = vec![json!({"role": "user", "content": [{"type": "text",
        "text": format!("I am user {user}. {}", "Please refactor this module carefully. ".repeat(10 + user))}]})];
    for t in 0..turns {
        messages.push(json!({"role": "assistant", "content": [
            {"type": "thinking", "thinking": format!("Step {t}: read the file first."), "signature": format!("sig-{request}-{t}")},
            {"type": "text", "text": "Reading it."},
            {"type": "tool_use", "id": format!("toolu_{user}_{t}"), "name": "read_file", "input": {"path": format!("src/m{t}.rs")}}]}));
        messages.push(json!({"role": "user", "content": [
            {"type": "tool_result", "tool_use_id": format!("toolu_{user}_{t}"),
             "content": [{"type": "text", "text": format!("fn m{t}() {{ {} }}", "body(); ".repeat(30))}]}]}));
    }
    if let Some(last) = messages
        .last_mut()
        .and_then(|m| m["content"].as_array_mut())
        .and_then(|c| c.last_mut())
    {
        last["cache_control"] = json!({"type": "ephemeral"});
    }
    json!({
        "model": model, "max_tokens": 4,
        "system": [{"type": "text", "text": format!("x-anthropic-billing-header: cc_version=2.0; cch={request:05x};")},
                   {"type": "text", "text": "You are Claude Code. Use the tools to help the user with software tasks.",
                    "cache_control": {"type": "ephemeral"}}],
        "tools": [{"name": "read_file", "description": "Reads a file",
                   "input_schema": {"type": "object", "properties": {"path": {"type": "string"}}, "required": ["path"]}}],
        "messages": messages,
    })
}

#[test]
fn a_multi_turn_agent_conversation_stays_on_its_engine_under_prefix() {
    let engines: Vec<Proc> = (0..3).map(|i| sim(&format!("ae{i}"), &[])).collect();
    let refs: Vec<&Proc> = engines.iter().collect();
    let r = router(
        &[
            backends(&refs),
            args(&["--routing-logic", "prefix", "--explain-routing"]),
        ]
        .concat(),
    );
    wait_until("all engines healthy", || {
        get(&r, "/health").json()["models"][0]["healthy_endpoints"] == 3
    });
    let agent = agent();
    let mut homes: HashMap<usize, String> = HashMap::new();
    // Each conversation's prompt blocks at its previous turn.
    let mut blocks: HashMap<usize, u64> = HashMap::new();
    let mut request = 0;
    for turns in 0..4 {
        for user in 0..9 {
            request += 1;
            let reply = post_with(
                &agent,
                &r,
                "/v1/messages",
                &agent_turn(MODEL, user, turns, request),
                &[],
            );
            assert_eq!(reply.status, 200, "{}", reply.body);
            let engine = reply.header("x-sim-engine").unwrap().to_owned();
            let route = reply.header("x-lmstack-route").unwrap().to_owned();
            // `matched=M/N`: M of the prompt's N blocks found where it went.
            let (matched, total) = route
                .split("; ")
                .find_map(|kv| kv.strip_prefix("matched="))
                .and_then(|m| m.split_once('/'))
                .map(|(m, n)| (m.parse::<u64>().unwrap(), n.parse::<u64>().unwrap()))
                .unwrap();
            // The whole previous turn is this one's prefix (a new billing header, moved
            // `cache_control`s and signatures change nothing).
            if let Some(&before) = blocks.get(&user) {
                assert!(
                    matched >= before && total > before,
                    "user {user}, turn {turns}: {route}"
                );
            }
            blocks.insert(user, total);
            match homes.get(&user) {
                Some(home) => {
                    assert_eq!(home, &engine, "user {user} moved at turn {turns}: {route}");
                    assert!(route.contains("reason=prefix_match"), "{route}");
                }
                None => {
                    homes.insert(user, engine);
                }
            }
        }
    }
    let used: HashSet<&String> = homes.values().collect();
    assert!(used.len() >= 2, "conversations were not spread: {homes:?}");
    // The engines served later turns from their caches: the rendered conversation's prefix
    // is the same from turn to turn.
    let hits: f64 = engines
        .iter()
        .map(|x| metric(&metrics_text(x), "vllm:prefix_cache_hits_total", &[]).unwrap_or(0.0))
        .sum();
    let queries: f64 = engines
        .iter()
        .map(|x| metric(&metrics_text(x), "vllm:prefix_cache_queries_total", &[]).unwrap_or(0.0))
        .sum();
    assert!(hits > 0.5 * queries, "hits {hits} of {queries}");
}

#[test]
fn a_messages_conversation_is_routed_exactly_on_the_blocks_engines_report() {
    let engine = |name: &str| tiny_kv_sim(name, free_port(), &[]);
    let (a, b) = (engine("anthropic-kv-a"), engine("anthropic-kv-b"));
    let tokenizer = format!("{TINY_MODEL}={}", tiny_tokenizer_dir());
    let r = router(
        &[
            backends(&[&a, &b]),
            args(&[
                "--routing-logic",
                "prefix",
                "--explain-routing",
                "--tokenizer",
                &tokenizer,
            ]),
        ]
        .concat(),
    );
    for e in [&a, &b] {
        wait_until("exact routing", || routing_mode_is(&r, e, "exact"));
    }
    let mut home: Option<String> = None;
    let mut previous_tokens = 0u64;
    for turns in 0..3 {
        let body = agent_turn(TINY_MODEL, 0, turns, turns + 1);
        let reply = post(&r, "/v1/messages", &body, &[]);
        assert_eq!(reply.status, 200, "{}", reply.body);
        // The router tokenized the request as the engine did: the chat request vLLM
        // converts it to, through the model's chat template.
        assert_eq!(reply.explained("kv"), "exact");
        let tokens: u64 = reply.explained("kv_tokens").parse().unwrap();
        let mut count = body.clone();
        count.as_object_mut().unwrap().remove("max_tokens");
        let counted = post(&a, "/v1/messages/count_tokens", &count, &[]).json();
        assert_eq!(counted["input_tokens"], tokens, "{counted}");
        let engine = reply.header("x-sim-engine").unwrap().to_owned();
        // What the engine reports holding covers the previous turn's prompt (but a last
        // block whose tokens the next text may merge with).
        let (held, _) = reply.explained("kv_blocks").split_once('/').unwrap();
        let held: u64 = held.parse().unwrap();
        assert!(
            held + 1 >= previous_tokens / 16,
            "turn {turns}: held {held} of {previous_tokens} tokens"
        );
        if let Some(h) = &home {
            assert_eq!(h, &engine, "turn {turns} moved");
        }
        home = Some(engine);
        previous_tokens = tokens;
        // The engine's events about this turn reach the router before the next one.
        wait_until("this turn's blocks indexed", || {
            kv_index_blocks(&r, &a) + kv_index_blocks(&r, &b) >= (tokens / 16) as f64
        });
    }
    assert!(previous_tokens > 200, "{previous_tokens}");
}
