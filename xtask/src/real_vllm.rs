//! `cargo xtask real-vllm`: lmstack in front of real vLLM engines (CPU build, a tiny local
//! model), checked with the same kinds of requests as the simulator tests. Opt-in: it needs
//! the workplace's `real-vllm.sh` (vLLM on CPU, ~3 GB installed once) and minutes to start.
//!
//! It checks that lmstack discovers the models, proxies completions and chat (streaming or
//! not) byte-compatibly, serves Anthropic's Messages API to the official `anthropic` SDK
//! (and converts a Claude-Code-shaped request to the chat request vLLM renders: the same
//! token count), keeps sessions on one engine, and that what it measures agrees with the
//! engines' own `/metrics`. With `--tracing`, the engines run vLLM's own OpenTelemetry
//! tracing and an OTLP receiver here checks that vLLM's span continues lmstack's trace.

use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use anyhow::bail;
use clap::Args;
use lmstack_e2e::{agent, metric, metric_sum};
use serde_json::{Value, json};

use crate::{build_bins, root, run_cmd, start_router};

#[derive(Args)]
pub struct RealVllmArgs {
    /// The script that runs real vLLM engines (default: ../shared/tools/real-vllm.sh).
    #[arg(long, env = "LMSTACK_REAL_VLLM")]
    script: Option<PathBuf>,
    /// Engine ports.
    #[arg(long, value_delimiter = ',', default_value = "8101,8102")]
    ports: Vec<u16>,
    /// Leave the engines running afterwards.
    #[arg(long)]
    keep: bool,
    /// Also check tracing: lmstack and the engines (`--otlp-traces-endpoint`; vLLM's venv
    /// needs opentelemetry-sdk, -api and -exporter-otlp) export to a receiver here, and
    /// vLLM's span of a request must continue lmstack's trace under the attempt's span.
    #[arg(long)]
    tracing: bool,
}

struct Engines {
    script: PathBuf,
    keep: bool,
}

impl Drop for Engines {
    fn drop(&mut self) {
        if !self.keep {
            let _ = Command::new(&self.script).arg("stop").status();
        }
    }
}

pub fn run(args: &RealVllmArgs) -> anyhow::Result<()> {
    let script = args
        .script
        .clone()
        .unwrap_or_else(|| root().join("../shared/tools/real-vllm.sh"));
    if !script.exists() {
        bail!(
            "{} is missing: this check needs the workplace's real-vllm.sh (set LMSTACK_REAL_VLLM)",
            script.display()
        );
    }
    let bins = build_bins(false)?;
    let ports: Vec<String> = args.ports.iter().map(u16::to_string).collect();
    let receiver = args.tracing.then(lmstack_e2e::otlp::Receiver::start);
    let mut start = Command::new(&script);
    start.arg("start").args(&ports).env("BLOCK_SIZE", "32");
    if let Some(r) = &receiver {
        start
            .env("EXTRA_ARGS", format!("--otlp-traces-endpoint {}/v1/traces", r.url()))
            .env("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL", "http/protobuf")
            .env("OTEL_SERVICE_NAME", "vllm")
            // Spans leave vLLM every 200 ms rather than every 5 s.
            .env("OTEL_BSP_SCHEDULE_DELAY", "200");
    }
    run_cmd(&mut start)?;
    let _engines = Engines {
        script: script.clone(),
        keep: args.keep,
    };
    let urls: Vec<String> = ports.iter().map(|p| format!("http://127.0.0.1:{p}")).collect();
    let mut flags = vec!["--routing-logic", "session", "--health-check-interval-ms", "1000"];
    let otlp = receiver.as_ref().map(lmstack_e2e::otlp::Receiver::url);
    if let Some(url) = &otlp {
        flags.extend(["--otlp-traces-endpoint", url]);
    }
    let router = start_router(&bins, 0, &urls, &flags);
    let url = router.url();
    let http = agent();
    let ready = std::time::Instant::now();
    loop {
        let ok = http
            .get(format!("{url}/health"))
            .call()
            .is_ok_and(|r| r.status() == 200);
        if ok {
            break;
        }
        anyhow::ensure!(
            ready.elapsed() < Duration::from_secs(120),
            "lmstack never saw a healthy engine"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    let mut report = Vec::new();
    let mut check = |name: &str, ok: bool, detail: String| {
        println!("{} {name}: {detail}", if ok { "ok  " } else { "FAIL" });
        report.push((name.to_owned(), ok));
    };

    // Models come from the engines' /v1/models.
    let models: Value = http.get(format!("{url}/v1/models")).call()?.body_mut().read_json()?;
    let model = models["data"][0]["id"].as_str().unwrap_or("").to_owned();
    check("models discovered", !model.is_empty(), format!("{}", models["data"]));

    // Non-streaming completion, compared with a direct request.
    let body = json!({"model": model, "prompt": "Hello, my name is", "max_tokens": 8, "ignore_eos": true});
    let direct: Value = http
        .post(format!("{}/v1/completions", urls[0]))
        .send_json(&body)?
        .body_mut()
        .read_json()?;
    let mut r = http.post(format!("{url}/v1/completions")).send_json(&body)?;
    let proxied: Value = r.body_mut().read_json()?;
    let keys = |v: &Value| {
        v.as_object()
            .map(|o| o.keys().cloned().collect::<Vec<_>>())
            .unwrap_or_default()
    };
    check(
        "completion",
        proxied["usage"]["completion_tokens"] == 8 && keys(&proxied) == keys(&direct),
        format!("{}", proxied["usage"]),
    );

    // Streaming chat: every token arrives as its own event, [DONE] last.
    let body = json!({"model": model, "messages": [{"role": "user", "content": "Count to five."}],
                      "max_tokens": 12, "ignore_eos": true, "stream": true,
                      "stream_options": {"include_usage": true}});
    let text = http
        .post(format!("{url}/v1/chat/completions"))
        .send_json(&body)?
        .body_mut()
        .read_to_string()?;
    let events = text.matches("data: ").count();
    check(
        "streaming chat",
        text.trim_end().ends_with("data: [DONE]") && events >= 13,
        format!("{events} events"),
    );

    // The OpenAI SDK, unchanged.
    let python = root().join("target/e2e-venv/bin/python");
    // Requests sent through lmstack so far, and by the SDK if it runs (two).
    let mut sent = 2.0;
    if python.exists() {
        sent += 2.0;
        let script = format!(
            "from openai import OpenAI\nc=OpenAI(base_url='{url}/v1',api_key='x')\n\
             r=c.chat.completions.create(model='{model}',messages=[{{'role':'user','content':'hi'}}],max_tokens=5,extra_body={{'ignore_eos':True}})\n\
             assert r.usage.completion_tokens==5\n\
             n=sum(1 for ch in c.completions.create(model='{model}',prompt='a',max_tokens=5,stream=True,extra_body={{'ignore_eos':True}}))\n\
             assert n>=5, n\nprint('OK')"
        );
        let out = Command::new(&python).arg("-c").arg(script).output()?;
        check(
            "openai SDK",
            String::from_utf8_lossy(&out.stdout).contains("OK"),
            String::from_utf8_lossy(&out.stderr)
                .lines()
                .last()
                .unwrap_or("")
                .to_owned(),
        );
    } else {
        println!("skip openai SDK: run `cargo xtask test` once to create target/e2e-venv");
    }

    // The anthropic SDK, unchanged: a message, a stream, a token count (vLLM reads no
    // `ignore_eos` here: a random model may end early).
    let has_anthropic = python.exists()
        && Command::new(&python)
            .args(["-c", "import anthropic"])
            .output()
            .is_ok_and(|o| o.status.success());
    if has_anthropic {
        // A message, a token count, a stream.
        sent += 3.0;
        let script = format!(
            "from anthropic import Anthropic\nc=Anthropic(base_url='{url}',api_key='x',max_retries=0)\n\
             msgs=[{{'role':'user','content':'Say hi.'}}]\n\
             m=c.messages.create(model='{model}',max_tokens=5,system='Be brief.',messages=msgs)\n\
             assert m.type=='message' and m.content[0].type=='text' and 1<=m.usage.output_tokens<=5, m\n\
             assert m.stop_reason in ('max_tokens','end_turn'), m\n\
             n=c.messages.count_tokens(model='{model}',system='Be brief.',messages=msgs)\n\
             assert n.input_tokens==m.usage.input_tokens, (n, m.usage)\n\
             with c.messages.stream(model='{model}',max_tokens=6,messages=msgs) as s:\n\
             \x20pieces=list(s.text_stream)\n\x20f=s.get_final_message()\n\
             assert f.content[0].text==''.join(pieces) and 1<=f.usage.output_tokens<=6, f\n\
             print('OK', m.usage.input_tokens, f.usage.output_tokens)"
        );
        let out = Command::new(&python).arg("-c").arg(script).output()?;
        let stdout = String::from_utf8_lossy(&out.stdout);
        check(
            "anthropic SDK",
            stdout.contains("OK"),
            format!(
                "{} {}",
                stdout.trim(),
                String::from_utf8_lossy(&out.stderr).lines().last().unwrap_or("")
            ),
        );
    } else {
        println!("skip anthropic SDK: run the e2e test `anthropic` once to install it in target/e2e-venv");
    }

    // A Claude-Code-shaped Messages request renders as lmstack converts it: vLLM counts as
    // many tokens for it as for the chat request lmstack makes of it (what exact KV routing
    // tokenizes). (`tool_choice` none: vLLM refuses `auto`, the default with tools, unless
    // started with `--enable-auto-tool-choice`.)
    let messages = json!({"model": model, "tool_choice": {"type": "none"},
        "system": [{"type": "text", "text": "x-anthropic-billing-header: cc_version=2.0; cch=1;"},
                   {"type": "text", "text": "You are a coding agent.", "cache_control": {"type": "ephemeral"}}],
        "tools": [{"name": "read_file", "description": "Reads a file",
                   "input_schema": {"properties": {"path": {"type": "string"}}, "required": ["path"]}}],
        "messages": [
            {"role": "user", "content": "Fix the bug."},
            {"role": "assistant", "content": [
                {"type": "thinking", "thinking": "Read it first.", "signature": "abc"},
                {"type": "text", "text": "Reading."},
                {"type": "tool_use", "id": "toolu_1", "name": "read_file", "input": {"path": "src/lib.rs"}}]},
            {"role": "user", "content": [
                {"type": "tool_result", "tool_use_id": "toolu_1", "content": [{"type": "text", "text": "fn main() {}"}]},
                {"type": "text", "text": "Go on.", "cache_control": {"type": "ephemeral"}}]}]});
    let counted: Value = http
        .post(format!("{url}/v1/messages/count_tokens"))
        .send_json(&messages)?
        .body_mut()
        .read_json()?;
    sent += 1.0;
    let chat = lmstack_http::anthropic::to_chat(messages.to_string().as_bytes())
        .map_err(|e| anyhow::anyhow!("converting the Messages request: {e}"))?;
    let chat: Value = serde_json::from_slice(&chat)?;
    let tokenized: Value = http
        .post(format!("{}/tokenize", urls[0]))
        .send_json(&chat)?
        .body_mut()
        .read_json()?;
    check(
        "messages converted as vLLM converts them",
        counted["input_tokens"].is_u64() && counted["input_tokens"] == tokenized["count"],
        format!(
            "vLLM counts {} tokens for the message, {} for lmstack's chat request{}",
            counted["input_tokens"],
            tokenized["count"],
            counted.get("error").map_or(String::new(), |e| format!(" ({e})"))
        ),
    );

    // Sessions stay on one engine: the engines' own request counters say where they went.
    let served = |u: &str| -> anyhow::Result<f64> {
        let text = http.get(format!("{u}/metrics")).call()?.body_mut().read_to_string()?;
        Ok(metric_sum(&text, "vllm:request_success_total", &[]))
    };
    let before: Vec<f64> = urls.iter().map(|u| served(u)).collect::<anyhow::Result<_>>()?;
    let prompt = "You are a helpful assistant. ".repeat(40);
    for _ in 0..6 {
        http.post(format!("{url}/v1/completions"))
            .header("x-user-id", "alice")
            .send_json(json!({"model": model, "prompt": prompt, "max_tokens": 2, "ignore_eos": true}))?
            .body_mut()
            .read_to_string()?;
        sent += 1.0;
    }
    let after: Vec<f64> = urls.iter().map(|u| served(u)).collect::<anyhow::Result<_>>()?;
    let moved: Vec<f64> = after.iter().zip(&before).map(|(a, b)| a - b).collect();
    check(
        "session affinity",
        moved.iter().filter(|&&d| d > 0.0).count() == 1,
        format!("{moved:?}"),
    );

    // The repeated prompt hit the engine's prefix cache.
    let hits: f64 = urls
        .iter()
        .map(|u| -> anyhow::Result<f64> {
            let text = http.get(format!("{u}/metrics")).call()?.body_mut().read_to_string()?;
            Ok(metric(&text, "vllm:prefix_cache_hits_total", &[]).unwrap_or(0.0))
        })
        .sum::<anyhow::Result<f64>>()?;
    check("prefix cache hits", hits > 0.0, format!("{hits} cached tokens"));

    // lmstack's own counts match (workers flush their figures every 100 ms).
    std::thread::sleep(Duration::from_millis(250));
    let m = http.get(format!("{url}/metrics")).call()?.body_mut().read_to_string()?;
    let ok = metric_sum(&m, "lmstack_requests_total", &[("status", "200")]);
    check(
        "lmstack counted the requests",
        ok >= sent,
        format!("{ok} requests with status 200 of {sent} sent"),
    );
    let ttft = metric_sum(&m, "lmstack_stream_ttft_seconds_count", &[]);
    check(
        "lmstack timed the streams",
        ttft >= 1.0,
        format!("{ttft} streams timed"),
    );

    // Tracing: vLLM's span of the request is a child of lmstack's attempt span.
    if let Some(receiver) = &receiver {
        let trace = "4bf92f3577b34da6a3ce929d0e0e4736";
        http.post(format!("{url}/v1/completions"))
            .header("traceparent", format!("00-{trace}-00f067aa0ba902b7-01"))
            .send_json(json!({"model": model, "prompt": "Trace me", "max_tokens": 4, "ignore_eos": true}))?
            .body_mut()
            .read_to_string()?;
        let ours = receiver.trace(trace);
        let attempt = ours
            .iter()
            .find(|s| s.kind == lmstack_e2e::otlp::SpanKind::Client as i32)
            .map(|s| s.span_id.clone())
            .unwrap_or_default();
        let hex = lmstack_e2e::otlp::hex;
        let mut detail = String::from("no span from vLLM in lmstack's trace");
        let mut continued = false;
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        while !continued && std::time::Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(200));
            for (service, s) in receiver.spans() {
                if service != "lmstack" && hex(&s.trace_id) == trace {
                    continued = s.parent_span_id == attempt;
                    detail = format!(
                        "{service} span {:?} {} under {} (lmstack's attempt: {})",
                        s.name,
                        hex(&s.span_id),
                        hex(&s.parent_span_id),
                        hex(&attempt)
                    );
                }
            }
        }
        check("vLLM continues lmstack's trace", continued, detail);
    }

    let failed: Vec<&String> = report.iter().filter(|(_, ok)| !ok).map(|(n, _)| n).collect();
    if !failed.is_empty() {
        bail!("real vLLM compatibility failed: {failed:?}");
    }
    println!("\nlmstack works in front of real vLLM ({} checks)", report.len());
    Ok(())
}
