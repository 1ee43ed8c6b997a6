//! lmstack-control: finds engine endpoints (Kubernetes pods, or a static list), probes them
//! (health, models, load), and streams versioned routing snapshots to every data plane
//! replica. Start-up and wiring only; each part lives in its own module.

mod config;
mod engines;
mod hub;
mod kube_source;
mod kv;
mod metrics;
mod server;

use std::sync::Arc;

use anyhow::Context;
use clap::Parser;

use crate::config::{Cli, Source};

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    cli.validate().context("invalid configuration")?;
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_new(&cli.log_level).context("--log-level")?)
        .with_writer(std::io::stderr)
        .init();
    if cli.check {
        println!("{cli:#?}");
        return Ok(());
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("starting the runtime")?;
    runtime.block_on(run(cli))
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    let prometheus = metrics::install().context("installing the metrics recorder")?;
    let hub = Arc::new(hub::Hub::new(cli.affinity_keep_blocks));
    let targets = engines::spawn(&cli, hub.clone()).context("starting the prober")?;
    match cli.source {
        Source::Static => targets.set(cli.static_targets().context("--static-backends")?),
        Source::Kube => {
            let client = kube::Client::try_default()
                .await
                .context("connecting to the Kubernetes API (in cluster, or KUBECONFIG)")?;
            tokio::spawn(kube_source::run(client, cli.pods.clone(), targets));
        }
    }
    let listener = tokio::net::TcpListener::bind(&cli.listen)
        .await
        .with_context(|| format!("binding {}", cli.listen))?;
    let bound = listener.local_addr()?;
    // Tests and scripts read this line for the bound address.
    println!("lmstack-control listening on http://{bound}");
    tracing::info!(%bound, "listening");
    let relay = Arc::new(kv::KvRelay::new());
    if !cli.no_kv_events {
        tokio::spawn(kv::run(relay.clone(), hub.clone(), Arc::new(cli.intake())));
    }
    let serve = server::serve(listener, hub, relay, prometheus, cli.heartbeat());
    tokio::select! {
        r = serve => r,
        _ = shutdown() => {
            tracing::info!("shutting down");
            Ok(())
        }
    }
}

async fn shutdown() {
    use tokio::signal::unix::{SignalKind, signal};
    let (Ok(mut term), Ok(mut int)) = (signal(SignalKind::terminate()), signal(SignalKind::interrupt())) else {
        return std::future::pending().await;
    };
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
}
