//! Loads the eBPF object built into this binary, attaches its programs (cgroup_skb ingress and
//! egress per target cgroup; the socket-state tracepoint once), detaches them when a target
//! goes, and reads the probes' maps (counters, traffic, connections, run-time stats). Not
//! here: what events mean (timing.rs), whose cgroups they are (cgroups.rs).

use std::collections::HashMap;
use std::fs::File;
use std::path::{Path, PathBuf};

use anyhow::Context;
use aya::maps::{HashMap as BpfHashMap, MapData, PerCpuArray, PerCpuHashMap, RingBuf};
use aya::programs::cgroup_skb::CgroupSkbLinkId;
use aya::programs::{BtfTracePoint, CgroupAttachMode, CgroupSkb, CgroupSkbAttachType};
use aya::{Btf, Ebpf, EbpfLoader};
use lmstack_ebpf_common::{CONNS_MAP, Conn, EVENTS_MAP, STATS_MAP, TRAFFIC_MAP, Traffic, stat};

/// The object aya-build made (empty when built without the BPF tool chain).
static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/lmstack-ebpf-probes"));

pub const INGRESS: &str = "lmstack_ingress";
pub const EGRESS: &str = "lmstack_egress";
pub const SOCK_STATE: &str = "lmstack_sock_state";

/// Whether this binary has its probes (`--check` says it).
pub fn describe() -> String {
    if OBJECT.is_empty() {
        "probes: missing (built without bpf-linker; `cargo xtask ebpf` builds them)".into()
    } else {
        format!("probes: built in ({} bytes)", OBJECT.len())
    }
}

pub struct Probes {
    ebpf: Ebpf,
    links: HashMap<PathBuf, (CgroupSkbLinkId, CgroupSkbLinkId)>,
    /// Whether connection closes are seen (the tracepoint attached).
    pub sees_closes: bool,
}

/// The probes' counters, summed over CPUs.
#[derive(Clone, Copy, Debug, Default)]
pub struct Stats {
    pub events: u64,
    pub dropped: u64,
    pub truncated: u64,
}

/// A program's kernel run-time statistics (non-zero while `kernel.bpf_stats_enabled` is on).
#[derive(Clone, Debug)]
pub struct RunStats {
    pub program: &'static str,
    pub runs: u64,
    pub run_ns: u64,
}

impl Probes {
    /// Loads the programs and attaches the tracepoint. `kernel_log_level` is aya-log's level
    /// number (1 error .. 5 trace) below which the probes do not even format messages.
    pub fn load(kernel_log_level: u8) -> anyhow::Result<Probes> {
        anyhow::ensure!(
            !OBJECT.is_empty(),
            "this lmstack-agent was built without its eBPF probes (no bpf-linker at build time); \
             build it with `cargo xtask ebpf`"
        );
        let mut ebpf = EbpfLoader::new()
            .override_global("AYA_LOG_LEVEL", &kernel_log_level, false)
            .load(OBJECT)
            .context("loading the eBPF object")?;
        if let Err(e) = aya_log::EbpfLogger::init(&mut ebpf).map(spawn_logger) {
            tracing::warn!("kernel-side logs unavailable: {e}");
        }
        for name in [INGRESS, EGRESS] {
            let p: &mut CgroupSkb = program(&mut ebpf, name)?;
            p.load()
                .with_context(|| format!("the kernel refused {name} (cgroup_skb)"))?;
        }
        let sees_closes = match attach_sock_state(&mut ebpf) {
            Ok(()) => true,
            Err(e) => {
                tracing::warn!(
                    "connection closes not seen ({e:#}); connection state is bounded by LRU eviction instead"
                );
                false
            }
        };
        Ok(Probes {
            ebpf,
            links: HashMap::new(),
            sees_closes,
        })
    }

    /// Takes the events ring buffer (once).
    pub fn take_events(&mut self) -> anyhow::Result<RingBuf<MapData>> {
        let map = self.ebpf.take_map(EVENTS_MAP).context("no EVENTS map")?;
        Ok(RingBuf::try_from(map)?)
    }

    /// Attaches both programs to the cgroup at `dir`.
    pub fn attach(&mut self, dir: &Path) -> anyhow::Result<()> {
        if self.links.contains_key(dir) {
            return Ok(());
        }
        let cgroup = File::open(dir).with_context(|| format!("opening cgroup {}", dir.display()))?;
        let ingress = program::<CgroupSkb>(&mut self.ebpf, INGRESS)?.attach(
            &cgroup,
            CgroupSkbAttachType::Ingress,
            CgroupAttachMode::Single,
        )?;
        let egress = match program::<CgroupSkb>(&mut self.ebpf, EGRESS)?.attach(
            &cgroup,
            CgroupSkbAttachType::Egress,
            CgroupAttachMode::Single,
        ) {
            Ok(l) => l,
            Err(e) => {
                let _ = program::<CgroupSkb>(&mut self.ebpf, INGRESS)?.detach(ingress);
                return Err(e.into());
            }
        };
        self.links.insert(dir.to_owned(), (ingress, egress));
        Ok(())
    }

    /// Detaches both programs from the cgroup at `dir` (a cgroup removed with its pod has
    /// dropped them already: errors are ignored).
    pub fn detach(&mut self, dir: &Path) {
        if let Some((ingress, egress)) = self.links.remove(dir) {
            if let Ok(p) = program::<CgroupSkb>(&mut self.ebpf, INGRESS) {
                let _ = p.detach(ingress);
            }
            if let Ok(p) = program::<CgroupSkb>(&mut self.ebpf, EGRESS) {
                let _ = p.detach(egress);
            }
        }
    }

    pub fn stats(&self) -> anyhow::Result<Stats> {
        let map: PerCpuArray<_, u64> = PerCpuArray::try_from(self.ebpf.map(STATS_MAP).context("no STATS map")?)?;
        let sum = |i: u32| map.get(&i, 0).map(|v| v.iter().sum::<u64>()).unwrap_or(0);
        Ok(Stats {
            events: sum(stat::EVENTS),
            dropped: sum(stat::DROPPED),
            truncated: sum(stat::TRUNCATED),
        })
    }

    /// Payload bytes per cgroup id, summed over CPUs.
    pub fn traffic(&self) -> anyhow::Result<HashMap<u64, Traffic>> {
        let map: PerCpuHashMap<_, u64, Traffic> =
            PerCpuHashMap::try_from(self.ebpf.map(TRAFFIC_MAP).context("no TRAFFIC map")?)?;
        let mut out = HashMap::new();
        for item in map.iter() {
            let (id, per_cpu) = item?;
            let mut t = Traffic::default();
            for v in per_cpu.iter() {
                t.rx_bytes += v.rx_bytes;
                t.tx_bytes += v.tx_bytes;
            }
            out.insert(id, t);
        }
        Ok(out)
    }

    /// Forgets the traffic counters of cgroups no longer watched (the map holds a bounded
    /// number).
    pub fn forget_traffic(&mut self, keep: &dyn Fn(u64) -> bool) -> anyhow::Result<()> {
        let mut map: PerCpuHashMap<_, u64, Traffic> =
            PerCpuHashMap::try_from(self.ebpf.map_mut(TRAFFIC_MAP).context("no TRAFFIC map")?)?;
        let gone: Vec<u64> = map.keys().filter_map(Result::ok).filter(|id| !keep(*id)).collect();
        for id in gone {
            let _ = map.remove(&id);
        }
        Ok(())
    }

    /// Connections the kernel side tracks now.
    pub fn kernel_connections(&self) -> anyhow::Result<usize> {
        let map: BpfHashMap<_, u64, Conn> = BpfHashMap::try_from(self.ebpf.map(CONNS_MAP).context("no CONNS map")?)?;
        Ok(map.keys().filter(Result::is_ok).count())
    }

    pub fn run_stats(&self) -> Vec<RunStats> {
        let mut out = Vec::new();
        for name in [INGRESS, EGRESS, SOCK_STATE] {
            if let Some(Ok(info)) = self.ebpf.program(name).map(aya::programs::Program::info) {
                out.push(RunStats {
                    program: name,
                    runs: info.run_count(),
                    run_ns: info.run_time().as_nanos() as u64,
                });
            }
        }
        out
    }
}

fn attach_sock_state(ebpf: &mut Ebpf) -> anyhow::Result<()> {
    let btf = Btf::from_sys_fs().context("reading kernel BTF")?;
    let p: &mut BtfTracePoint = program(ebpf, SOCK_STATE)?;
    p.load("inet_sock_set_state", &btf)
        .context("the kernel refused tp_btf/inet_sock_set_state")?;
    p.attach().context("attaching tp_btf/inet_sock_set_state")?;
    Ok(())
}

fn program<'a, T>(ebpf: &'a mut Ebpf, name: &str) -> anyhow::Result<&'a mut T>
where
    &'a mut T: TryFrom<&'a mut aya::programs::Program, Error = aya::programs::ProgramError>,
{
    let p = ebpf
        .program_mut(name)
        .with_context(|| format!("no program {name} in the object"))?;
    Ok(p.try_into()?)
}

/// Forwards the probes' aya-log records to this process' log (tracing, through `log`).
fn spawn_logger(logger: aya_log::EbpfLogger<&'static dyn log::Log>) {
    tokio::spawn(async move {
        // SAFETY: the logger owns its ring buffer's fd, which stays open and the same while it
        // lives.
        let registered =
            unsafe { tokio::io::unix::AsyncFd::register_with_interest(logger, tokio::io::Interest::READABLE) };
        let Ok(mut fd) = registered else {
            return;
        };
        loop {
            let Ok(mut guard) = fd.readable_mut().await else {
                return;
            };
            guard.get_inner_mut().flush();
            guard.clear_ready();
        }
    });
}
