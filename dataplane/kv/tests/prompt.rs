//! Agreement with vLLM itself: every request of `fixtures/tiny-llama-tokens.jsonl` was sent to a
//! real vLLM 0.32 engine (see `gen_prompt_fixture.py`), which answered with its prompt token ids
//! or an error; `PromptTokenizer` must give the same ids, or an error where vLLM gave one.
//!
//! Besides the model's own template, the engine ran with real templates of popular families
//! (Llama 4, a Qwen3-style one, Mistral's) and a probe that prints what vLLM hands a template:
//! lines `{"template": name, "source": ...}` carry them, and request lines name theirs.

use std::path::{Path, PathBuf};
use std::time::Instant;

use lmstack_kv::prompt::{PromptError, PromptTokenizer};
use serde_json::Value;

fn model_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../perf/fixtures/tiny-llama")
}

fn fixture() -> Vec<Value> {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/tiny-llama-tokens.jsonl");
    std::fs::read_to_string(&path)
        .unwrap_or_else(|err| panic!("{}: {err}", path.display()))
        .lines()
        .map(|line| serde_json::from_str(line).expect("a JSON line"))
        .collect()
}

/// The tiny model with another chat template: a model directory of its own, as vLLM would
/// load it (`chat_template.jinja` next to the tokenizer files).
fn with_template(name: &str, source: &str) -> PromptTokenizer {
    let dir = std::env::temp_dir().join(format!("lmstack-kv-prompt-{}-{name}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("a temporary directory");
    for file in ["tokenizer.json", "tokenizer_config.json"] {
        std::fs::copy(model_dir().join(file), dir.join(file)).expect("copy a model file");
    }
    std::fs::write(dir.join("chat_template.jinja"), source).expect("write the template");
    let tokenizer = PromptTokenizer::from_dir(&dir).expect("the model loads");
    std::fs::remove_dir_all(&dir).ok();
    tokenizer
}

struct Outcome {
    agree: usize,
    total: usize,
    mismatches: Vec<String>,
}

fn check(tokenizers: &[(String, PromptTokenizer)], lines: &[Value]) -> Outcome {
    let mut outcome = Outcome {
        agree: 0,
        total: 0,
        mismatches: Vec::new(),
    };
    for line in lines.iter().filter(|l| l.get("body").is_some()) {
        let template = line["template"].as_str().unwrap_or("tiny-llama");
        let tokenizer = &tokenizers
            .iter()
            .find(|(name, _)| name == template)
            .unwrap_or_else(|| panic!("template {template} is not in the fixture"))
            .1;
        let body = line["body"].as_str().expect("a body").as_bytes();
        let ours: Result<Vec<Vec<u32>>, PromptError> = match line["endpoint"].as_str() {
            Some("completions") => tokenizer.completion_batch(body),
            Some("chat") => tokenizer.chat(body).map(|ids| vec![ids]),
            other => panic!("unknown endpoint {other:?}"),
        };
        outcome.total += 1;
        let agrees = match (&ours, line.get("tokens")) {
            (Ok(ours), Some(theirs)) => serde_json::to_value(ours).expect("ids serialize") == *theirs,
            (Err(_), None) => true,
            _ => false,
        };
        if agrees {
            outcome.agree += 1;
        } else {
            let theirs = line
                .get("tokens")
                .map_or_else(|| format!("error {}", line["error"]), |t| t.to_string());
            let ours = match &ours {
                Ok(ids) => format!("{ids:?}"),
                Err(err) => format!("error {err}: {:?}", std::error::Error::source(err)),
            };
            outcome.mismatches.push(format!(
                "[{template}] {}\n  vLLM: {theirs:.300}\n  ours: {ours:.300}",
                &line["body"]
                    .as_str()
                    .unwrap_or_default()
                    .chars()
                    .take(300)
                    .collect::<String>()
            ));
        }
    }
    outcome
}

fn tokenizers(lines: &[Value]) -> Vec<(String, PromptTokenizer)> {
    let mut tokenizers = vec![(
        "tiny-llama".to_string(),
        PromptTokenizer::from_dir(model_dir()).expect("tiny-llama loads"),
    )];
    for line in lines {
        if let (Some(name), Some(source)) = (line["template"].as_str(), line["source"].as_str()) {
            tokenizers.push((name.to_string(), with_template(name, source)));
        }
    }
    tokenizers
}

#[test]
fn token_ids_agree_with_vllm_on_every_fixture_request() {
    let lines = fixture();
    let outcome = check(&tokenizers(&lines), &lines);
    println!("agreement with vLLM: {}/{} requests", outcome.agree, outcome.total);
    assert!(outcome.total >= 300, "only {} requests", outcome.total);
    assert!(
        outcome.mismatches.is_empty(),
        "{} of {} requests differ from vLLM:\n{}",
        outcome.mismatches.len(),
        outcome.total,
        outcome.mismatches.join("\n")
    );
}

/// vLLM hands Llama 4's template message content as a list of parts (the template loops over
/// content), and with tools the template `trim`s the first user message: Jinja2 prints the
/// list as Python does. vLLM 0.32 rendered exactly this.
#[test]
fn llama4_with_tools_prints_the_first_user_message_as_python_repr() {
    let lines = fixture();
    let source = lines
        .iter()
        .find(|l| l["template"] == "llama4" && l.get("source").is_some())
        .and_then(|l| l["source"].as_str())
        .expect("the Llama 4 template is in the fixture");
    let tokenizer = with_template("llama4-repr", source);
    let body = r#"{"messages": [{"role": "user", "content": "naïve café\n👨‍👩‍👧 it's"}],
        "tools": [{"type": "function", "function": {"name": "ping"}}]}"#;
    let text = tokenizer.render_chat(body.as_bytes()).expect("renders");
    assert!(
        text.ends_with(
            "\n\n[{'type': 'text', 'text': \"naïve café\\n👨\\u200d👩\\u200d👧 it's\"}]<|eot|>\
             <|header_start|>assistant<|header_end|>\n\n"
        ),
        "{text}"
    );
    assert!(
        text.contains("\"description\": null,\n        \"parameters\": null"),
        "{text}"
    );
}

#[test]
fn a_batch_of_several_prompts_is_no_single_prompt() {
    let tokenizer = PromptTokenizer::from_dir(model_dir()).expect("tiny-llama loads");
    let body = br#"{"model": "m", "prompt": ["one", "two"]}"#;
    assert!(matches!(tokenizer.completion(body), Err(PromptError::Batch(2))));
    assert_eq!(tokenizer.completion_batch(body).expect("a batch").len(), 2);
    assert_eq!(
        tokenizer.completion(br#"{"prompt": [[5, 6, 7]]}"#).expect("one prompt"),
        vec![5, 6, 7]
    );
}

#[test]
fn what_cannot_be_reproduced_is_an_error() {
    let tokenizer = PromptTokenizer::from_dir(model_dir()).expect("tiny-llama loads");
    let unsupported = [
        r#"{"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "http://x/y.png"}}]}]}"#,
        r#"{"messages": [{"role": "user", "content": "hi"}], "chat_template": "{{ messages }}"}"#,
        r#"{"messages": [{"role": "user", "content": "hi"}], "truncate_prompt_tokens": 5}"#,
        r#"{"messages": [{"role": "user", "content": "hi"}], "add_generation_prompt": 1}"#,
        r#"{"messages": [{"role": "user", "content": "hi"}], "chat_template_kwargs": {"tokenize": true}}"#,
    ];
    for body in unsupported {
        assert!(
            matches!(tokenizer.chat(body.as_bytes()), Err(PromptError::Unsupported(_))),
            "{body}"
        );
    }
    for body in [
        r#"{"prompt": "x", "suffix": "y"}"#,
        r#"{"prompt": "x", "truncate_prompt_tokens": 3}"#,
    ] {
        assert!(
            matches!(tokenizer.completion(body.as_bytes()), Err(PromptError::Unsupported(_))),
            "{body}"
        );
    }
}

#[test]
fn one_tokenizer_serves_every_worker() {
    fn shared<T: Send + Sync>() {}
    shared::<PromptTokenizer>();
}

#[test]
fn prefill_token_ids_from_kv_transfer_params_are_reused() {
    let tokenizer = PromptTokenizer::from_dir(model_dir()).expect("tiny-llama loads");
    let body =
        br#"{"messages": [{"role": "user", "content": "hi"}], "kv_transfer_params": {"prompt_token_ids": [1, 2, 3]}}"#;
    assert_eq!(tokenizer.chat(body).expect("ids"), vec![1, 2, 3]);
}

/// A rough cost of `completion()` and `chat()` on ~1000-token prompts:
/// `cargo test --release -p lmstack-kv --test prompt -- --ignored --nocapture`.
#[test]
#[ignore = "a timing printout, not a check"]
fn time_completion_and_chat_on_a_thousand_tokens() {
    let tokenizer = PromptTokenizer::from_dir(model_dir()).expect("tiny-llama loads");
    let mut text = String::new();
    let mut i = 0;
    while tokenizer.encode(&text, true).expect("ids").len() < 1000 {
        text.push_str(&format!(
            "def handler_{i}(request, engine):\n    return engine.cache[request.prefix] # café 😀\n"
        ));
        i += 1;
    }
    let completion = serde_json::json!({"model": "m", "prompt": text}).to_string();
    let half = text.len() / 2;
    let split = (half..text.len()).find(|&i| text.is_char_boundary(i)).unwrap_or(0);
    let chat = serde_json::json!({"model": "m", "messages": [
        {"role": "system", "content": "You are a helpful assistant."},
        {"role": "user", "content": &text[..split]},
        {"role": "assistant", "content": "ok"},
        {"role": "user", "content": &text[split..]},
    ]})
    .to_string();
    let n = tokenizer.completion(completion.as_bytes()).expect("ids").len();
    let m = tokenizer.chat(chat.as_bytes()).expect("ids").len();
    for (name, run) in [
        (
            format!("completion ({n} tokens)"),
            Box::new(|| tokenizer.completion(completion.as_bytes()).map(|_| ()))
                as Box<dyn Fn() -> Result<(), PromptError>>,
        ),
        (
            format!("chat ({m} tokens)"),
            Box::new(|| tokenizer.chat(chat.as_bytes()).map(|_| ())),
        ),
        (
            "chat, template only".to_string(),
            Box::new(|| tokenizer.render_chat(chat.as_bytes()).map(|_| ())),
        ),
        (
            "encode only".to_string(),
            Box::new(|| tokenizer.encode(&text, true).map(|_| ())),
        ),
    ] {
        let rounds = 200;
        let start = Instant::now();
        for _ in 0..rounds {
            run().expect("ids");
        }
        println!("{name}: {:?} per call", start.elapsed() / rounds);
    }
}
