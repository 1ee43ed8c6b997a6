//! `cargo xtask demo`: lmstack in front of simulated engines, on the embedded defaults.
//! Starts the engines and the router, sends a little of every kind of traffic, shows what
//! came back and where it went, prints what to try, and keeps running until Ctrl-C (or
//! for `--duration-s`).

use std::io::{BufRead, BufReader};
use std::time::Duration;

use clap::Args;
use lmstack_e2e::{Proc, agent, metric};

use crate::{build_bins, start_router};

#[derive(Args)]
pub struct DemoArgs {
    /// Port of the router.
    #[arg(long, default_value_t = 8001)]
    port: u16,
    /// Simulated engines behind it.
    #[arg(long, default_value_t = 2)]
    engines: usize,
    /// Stop after this many seconds instead of waiting for Ctrl-C.
    #[arg(long)]
    duration_s: Option<f64>,
}

const MODEL: &str = "demo-model";

pub fn run(args: &DemoArgs) -> anyhow::Result<()> {
    anyhow::ensure!(args.engines > 0, "--engines must be at least 1");
    let bins = build_bins(false)?;
    let engines: Vec<Proc> = (0..args.engines)
        .map(|i| {
            let name = format!("engine-{i}");
            Proc::start(
                &bins.join("lmstack-sim"),
                &lmstack_e2e::args(&[
                    "--host",
                    "127.0.0.1",
                    "--port",
                    "0",
                    "--name",
                    &name,
                    "--model",
                    MODEL,
                    "--lora",
                    "demo-lora",
                ]),
                &[],
            )
        })
        .collect();
    let backends: Vec<String> = engines.iter().map(Proc::url).collect();
    let router = start_router(&bins, args.port, &backends, &["--routing-logic", "session"]);
    let url = router.url();
    let http = agent();
    let started = std::time::Instant::now();
    while http.get(format!("{url}/health")).call()?.status() != 200 {
        anyhow::ensure!(
            started.elapsed() < Duration::from_secs(30),
            "the router never became healthy"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    println!(
        "\nlmstack is routing {MODEL} over {} simulated engines at {url}\n",
        engines.len()
    );

    let models: serde_json::Value = http.get(format!("{url}/v1/models")).call()?.body_mut().read_json()?;
    let ids: Vec<&str> = models["data"]
        .as_array()
        .map(|d| d.iter().filter_map(|m| m["id"].as_str()).collect())
        .unwrap_or_default();
    println!("GET /v1/models -> {ids:?}");

    let mut r = http
        .post(format!("{url}/v1/completions"))
        .send_json(serde_json::json!({"model": MODEL, "prompt": "Once upon a time", "max_tokens": 8}))?;
    let engine = header(&r, "x-sim-engine");
    let body: serde_json::Value = r.body_mut().read_json()?;
    println!(
        "POST /v1/completions -> {:?} (served by {engine})",
        body["choices"][0]["text"]
    );

    print!("POST /v1/chat/completions, streamed ->");
    let mut r = http
        .post(format!("{url}/v1/chat/completions"))
        .send_json(serde_json::json!({
            "model": MODEL, "stream": true, "max_tokens": 10,
            "messages": [{"role": "user", "content": "Tell me about routers."}]
        }))?;
    for line in BufReader::new(r.body_mut().as_reader()).lines() {
        let line = line?;
        if let Some(data) = line.strip_prefix("data: ")
            && let Ok(v) = serde_json::from_str::<serde_json::Value>(data)
            && let Some(piece) = v["choices"][0]["delta"]["content"].as_str()
        {
            print!("{piece}");
            std::io::Write::flush(&mut std::io::stdout())?;
        }
    }
    println!();

    for user in ["alice", "bob", "carol", "alice", "bob", "carol"] {
        let mut r = http
            .post(format!("{url}/v1/completions"))
            .header("x-user-id", user)
            .send_json(serde_json::json!({"model": MODEL, "prompt": "Hi", "max_tokens": 1}))?;
        r.body_mut().read_to_string()?;
        println!(
            "x-user-id: {user:<5} -> {} (sessions stay on one engine)",
            header(&r, "x-sim-engine")
        );
    }

    let mut r = http
        .post(format!("{url}/v1/completions"))
        .send_json(serde_json::json!({"model": "gpt-9", "prompt": "Hi"}))?;
    println!(
        "unknown model -> {} {}",
        r.status().as_u16(),
        r.body_mut().read_to_string()?
    );

    // Workers hand their figures to the exporter every 100 ms.
    std::thread::sleep(Duration::from_millis(250));
    let metrics = http.get(format!("{url}/metrics")).call()?.body_mut().read_to_string()?;
    let requests: f64 = engines
        .iter()
        .filter_map(|e| {
            metric(
                &metrics,
                "lmstack_requests_total",
                &[("endpoint", &e.url()), ("status", "200")],
            )
        })
        .sum();
    println!("lmstack_requests_total{{status=\"200\"}} summed over endpoints: {requests}");

    println!("\nTry it:");
    println!("  curl {url}/v1/models");
    println!(
        "  curl {url}/v1/chat/completions -H 'content-type: application/json' \\\n    -d '{{\"model\":\"{MODEL}\",\"messages\":[{{\"role\":\"user\",\"content\":\"hi\"}}],\"stream\":true}}'"
    );
    println!("  curl {url}/health");
    println!("  curl {url}/metrics | grep ^lmstack_");
    for e in &engines {
        println!("  curl {}/metrics | grep ^vllm:   # an engine's own metrics", e.url());
    }
    match args.duration_s {
        Some(s) => {
            std::thread::sleep(Duration::from_secs_f64(s));
            println!("\ndemo done");
            Ok(())
        }
        None => {
            println!("\nRunning until Ctrl-C.");
            loop {
                std::thread::sleep(Duration::from_secs(3600));
            }
        }
    }
}

fn header(r: &ureq::http::Response<ureq::Body>, name: &str) -> String {
    r.headers()
        .get(name)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("?")
        .to_owned()
}
