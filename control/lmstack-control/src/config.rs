//! Command-line configuration (every flag also reads an `LMSTACK_CONTROL_*` variable), with
//! the defaults in one place and validation before anything starts.

use std::time::Duration;

use clap::{Parser, ValueEnum};
use lmstack_probe::{HealthCheckConfig, HealthConfigError, StaticTargetsError, Target};

/// Flags that do not fit together, or cannot work.
#[derive(Debug, thiserror::Error)]
pub enum CliError {
    #[error(transparent)]
    Health(#[from] HealthConfigError),
    #[error(transparent)]
    StaticTargets(#[from] StaticTargetsError),
    #[error("--heartbeat-ms must be greater than 0")]
    NoHeartbeat,
    #[error("--source static needs --static-backends URL,URL")]
    NoStaticBackends,
    #[error("--static-backends needs --source static")]
    StaticBackendsWithKube,
    #[error("--label-selector must not be empty: it picks the engine pods")]
    EmptyLabelSelector,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Source {
    /// Engine pods found through the Kubernetes API.
    Kube,
    /// A fixed list of engines (`--static-backends`): outside Kubernetes, and in tests.
    Static,
}

/// How engine pods are found and turned into endpoints.
#[derive(Clone, Debug, clap::Args)]
pub struct PodConfig {
    /// Namespace to watch; empty: all namespaces (needs a ClusterRole).
    #[arg(long, env = "LMSTACK_CONTROL_NAMESPACE", default_value = "")]
    pub namespace: String,
    /// Label selector of engine pods.
    #[arg(
        long,
        env = "LMSTACK_CONTROL_LABEL_SELECTOR",
        default_value = "lmstack.io/role=engine"
    )]
    pub label_selector: String,
    /// The container port, by name, engines listen on (production-stack names it
    /// `container-port`); a pod without it uses `--engine-port`.
    #[arg(long, env = "LMSTACK_CONTROL_ENGINE_PORT_NAME", default_value = "container-port")]
    pub engine_port_name: String,
    /// The port of pods that have no container port named `--engine-port-name`.
    #[arg(long, env = "LMSTACK_CONTROL_ENGINE_PORT", default_value_t = 8000)]
    pub engine_port: u16,
    /// A pod label whose value is the served model name (production-stack's `model`); empty:
    /// ask each engine's `/v1/models` (model names with a `/` cannot be label values).
    #[arg(long, env = "LMSTACK_CONTROL_MODEL_LABEL", default_value = "")]
    pub model_label: String,
}

#[derive(Clone, Debug, Parser)]
#[command(
    name = "lmstack-control",
    version,
    about = "Discovers vLLM engines, probes them and streams routing snapshots to lmstack data planes"
)]
pub struct Cli {
    /// Address of the snapshot stream, /health and /metrics.
    #[arg(long, env = "LMSTACK_CONTROL_LISTEN", default_value = "0.0.0.0:8090")]
    pub listen: String,
    /// Where the engines come from.
    #[arg(long, value_enum, env = "LMSTACK_CONTROL_SOURCE", default_value = "kube")]
    pub source: Source,
    #[command(flatten)]
    pub pods: PodConfig,
    /// Comma-separated engine URLs for `--source static`.
    #[arg(long, value_delimiter = ',', env = "LMSTACK_CONTROL_STATIC_BACKENDS")]
    pub static_backends: Vec<String>,
    /// Comma-separated models, one per static backend; omitted: ask `/v1/models`.
    #[arg(long, value_delimiter = ',', env = "LMSTACK_CONTROL_STATIC_MODELS")]
    pub static_models: Vec<String>,
    /// Time between probes of each engine.
    #[arg(long, env = "LMSTACK_CONTROL_PROBE_INTERVAL_MS", default_value_t = HealthCheckConfig::default().interval_ms)]
    pub probe_interval_ms: u64,
    /// Time allowed for one probe.
    #[arg(long, env = "LMSTACK_CONTROL_PROBE_TIMEOUT_MS", default_value_t = HealthCheckConfig::default().timeout_ms)]
    pub probe_timeout_ms: u64,
    /// Consecutive failed probes that take an endpoint out of rotation.
    #[arg(long, default_value_t = HealthCheckConfig::default().unhealthy_after)]
    pub unhealthy_after: u32,
    /// Consecutive good probes that bring it back.
    #[arg(long, default_value_t = HealthCheckConfig::default().healthy_after)]
    pub healthy_after: u32,
    /// Path probed with GET; 2xx is healthy.
    #[arg(long, default_value_t = HealthCheckConfig::default().path)]
    pub health_path: String,
    /// Do not read engines' `/metrics` (load and cache figures).
    #[arg(long)]
    pub no_scrape_metrics: bool,
    /// A heartbeat on every snapshot stream this often, so that data planes notice a
    /// silent control.
    #[arg(long, env = "LMSTACK_CONTROL_HEARTBEAT_MS", default_value_t = 1_000)]
    pub heartbeat_ms: u64,
    /// Prompt blocks of the latest shared prefix assignments kept for replicas that connect
    /// later (about 8 bytes each in memory, more on the wire).
    #[arg(long, env = "LMSTACK_CONTROL_AFFINITY_KEEP_BLOCKS", default_value_t = 1 << 20)]
    pub affinity_keep_blocks: usize,
    /// Do not follow engines' KV events (exact KV routing then needs each router to
    /// subscribe itself, or stays approximate).
    #[arg(long, env = "LMSTACK_CONTROL_NO_KV_EVENTS")]
    pub no_kv_events: bool,
    /// The KV-event publisher of engines that do not serve `/kv_event_sources`, `{host}` for
    /// the engine's host, e.g. `tcp://{host}:5557`; empty: only engines that say.
    #[arg(long, env = "LMSTACK_CONTROL_KV_EVENTS_ENDPOINT", default_value = "")]
    pub kv_events_endpoint: String,
    /// The ZeroMQ topic of KV events (vLLM's `topic`; empty: all).
    #[arg(long, env = "LMSTACK_CONTROL_KV_EVENTS_TOPIC", default_value = "")]
    pub kv_events_topic: String,
    /// Blocks indexed per engine at most (about 80 bytes each).
    #[arg(long, env = "LMSTACK_CONTROL_KV_MAX_BLOCKS_PER_ENGINE", default_value_t = 262_144)]
    pub kv_max_blocks_per_engine: usize,
    /// Time to connect to a publisher (and to read an engine's registration pages), ms.
    #[arg(long, env = "LMSTACK_CONTROL_KV_CONNECT_TIMEOUT_MS", default_value_t = 2_000)]
    pub kv_connect_timeout_ms: u64,
    /// Time for a replay of missed KV events, ms (past it the engine's index is dropped).
    #[arg(long, env = "LMSTACK_CONTROL_KV_REPLAY_TIMEOUT_MS", default_value_t = 2_000)]
    pub kv_replay_timeout_ms: u64,
    /// How often engines are checked against the snapshot, and the wait before subscribing
    /// again after a failure, ms.
    #[arg(long, env = "LMSTACK_CONTROL_KV_CHECK_INTERVAL_MS", default_value_t = 1_000)]
    pub kv_check_interval_ms: u64,
    /// Log filter (`info`, `debug`, `lmstack_control=debug`, ...).
    #[arg(long, env = "LMSTACK_CONTROL_LOG_LEVEL", default_value = "info")]
    pub log_level: String,
    /// Validate the flags, print them and exit.
    #[arg(long)]
    pub check: bool,
}

impl Cli {
    /// The KV events intake's settings.
    pub fn intake(&self) -> lmstack_kv::intake::IntakeConfig {
        lmstack_kv::intake::IntakeConfig {
            endpoints: Default::default(),
            endpoint_template: self.kv_events_endpoint.clone(),
            topic: self.kv_events_topic.clone(),
            max_blocks: self.kv_max_blocks_per_engine,
            connect_timeout: Duration::from_millis(self.kv_connect_timeout_ms),
            replay_timeout: Duration::from_millis(self.kv_replay_timeout_ms),
            retry: Duration::from_millis(self.kv_check_interval_ms),
        }
    }

    pub fn health(&self) -> HealthCheckConfig {
        HealthCheckConfig {
            interval_ms: self.probe_interval_ms,
            timeout_ms: self.probe_timeout_ms,
            unhealthy_after: self.unhealthy_after,
            healthy_after: self.healthy_after,
            path: self.health_path.clone(),
        }
    }

    pub fn heartbeat(&self) -> Duration {
        Duration::from_millis(self.heartbeat_ms)
    }

    pub fn validate(&self) -> Result<(), CliError> {
        self.health().validate()?;
        if self.heartbeat_ms == 0 {
            return Err(CliError::NoHeartbeat);
        }
        match self.source {
            Source::Static => {
                self.static_targets()?;
            }
            Source::Kube => {
                if !self.static_backends.is_empty() {
                    return Err(CliError::StaticBackendsWithKube);
                }
                if self.pods.label_selector.trim().is_empty() {
                    return Err(CliError::EmptyLabelSelector);
                }
            }
        }
        Ok(())
    }

    /// The engines of `--source static` (the reading of the flags is lmstack-probe's, shared
    /// with the router).
    pub fn static_targets(&self) -> Result<Vec<Target>, CliError> {
        if self.static_backends.is_empty() {
            return Err(CliError::NoStaticBackends);
        }
        let models = (!self.static_models.is_empty()).then_some(&self.static_models[..]);
        Ok(lmstack_probe::static_targets(&self.static_backends, models)?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cli(args: &[&str]) -> Result<Cli, String> {
        let cli = Cli::try_parse_from(std::iter::once("lmstack-control").chain(args.iter().copied()))
            .map_err(|e| e.to_string())?;
        cli.validate().map_err(|e| e.to_string())?;
        Ok(cli)
    }

    #[test]
    fn static_backends_with_models_build_targets() {
        let c = cli(&[
            "--source",
            "static",
            "--static-backends",
            "http://a:1,http://b:2",
            "--static-models",
            "m,n",
        ])
        .unwrap();
        let t = c.static_targets().unwrap();
        assert_eq!(t[1].url.base, "http://b:2");
        assert_eq!(t[1].models, vec!["n".to_owned()]);
    }

    #[test]
    fn bad_flags_are_errors() {
        assert!(cli(&["--source", "static"]).unwrap_err().contains("--static-backends"));
        assert!(
            cli(&["--static-backends", "http://a:1"])
                .unwrap_err()
                .contains("--source static")
        );
        assert!(
            cli(&["--source", "static", "--static-backends", "http://a:1,http://a:1"])
                .unwrap_err()
                .contains("twice")
        );
        assert!(cli(&["--probe-interval-ms", "0"]).unwrap_err().contains("interval_ms"));
        assert!(cli(&["--label-selector", " "]).unwrap_err().contains("label-selector"));
    }
}
