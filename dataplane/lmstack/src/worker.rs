//! Worker threads: one monoio runtime per thread (io_uring, or epoll where io_uring is
//! missing), each with its own SO_REUSEPORT listener, accept loop, connection pool and
//! metric handles. A connection lives and dies on the worker that accepted it.
//!
//! Not here: what happens to a request (proxy.rs) or how routing state is built (state.rs).

use std::cell::Cell;
use std::net::SocketAddr;
use std::rc::Rc;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use lmstack_http::Version;
use lmstack_http::head::HeadLimits;
use lmstack_snapshot::AffinityEntry;
use metrics_exporter_prometheus::PrometheusHandle;
use monoio::io::AsyncWriteRent;
use monoio::net::{TcpListener, TcpStream};
use monoio::{FusionDriver, FusionRuntime, RuntimeBuilder};

use crate::config::{Config, ms};
use crate::downstream::{Downstream, NoRequest};
use crate::metrics::{self, LocalMetrics};
use crate::queue::WaitQueue;
use crate::state::{LocalRouting, SnapshotCell, StateRef};
use crate::upstream::Pool;
use crate::{proxy, response};

/// What all workers share: configuration (read-only), the snapshot cell, the metrics
/// exporter, and the draining flag set at shutdown.
pub struct Shared {
    pub config: Config,
    pub cell: Arc<SnapshotCell>,
    pub prometheus: PrometheusHandle,
    pub draining: AtomicBool,
    /// The link to lmstack-control (control mode only).
    pub control: crate::control::ControlLink,
    /// Where workers hand their prefix assignments for control (control mode with
    /// `share_affinity` only).
    pub affinity_out: Option<crossbeam_channel::Sender<Vec<AffinityEntry>>>,
    /// This process among the router's replicas.
    pub replica: String,
}

/// Limits and timeouts, converted once from the configuration.
pub struct Limits {
    pub head: HeadLimits,
    pub response_head: HeadLimits,
    pub max_body: usize,
    pub header_timeout: Duration,
    pub body_timeout: Duration,
    pub keepalive: Duration,
    pub write_timeout: Duration,
    pub client_watch_delay: Duration,
    pub max_connections: usize,
    pub connect_timeout: Duration,
    pub first_byte_timeout: Duration,
    pub idle_timeout: Duration,
    pub max_retries: u32,
    pub max_inflight: u32,
    pub queue_timeout: Duration,
    pub max_queued: usize,
}

impl Limits {
    fn new(c: &Config, workers: usize) -> Self {
        Self {
            head: HeadLimits {
                max_bytes: c.server.max_header_bytes,
                max_headers: c.server.max_headers,
            },
            response_head: HeadLimits {
                max_bytes: c.upstream.max_response_header_bytes,
                max_headers: lmstack_http::head::MAX_HEADERS_CAP,
            },
            max_body: c.server.max_body_bytes,
            header_timeout: ms(c.server.header_timeout_ms),
            body_timeout: ms(c.server.body_timeout_ms),
            keepalive: ms(c.server.keepalive_timeout_ms),
            write_timeout: ms(c.server.write_timeout_ms),
            client_watch_delay: ms(c.server.client_watch_delay_ms),
            max_connections: c.server.max_connections.div_ceil(workers).max(1),
            connect_timeout: ms(c.upstream.connect_timeout_ms),
            first_byte_timeout: ms(c.upstream.first_byte_timeout_ms),
            idle_timeout: ms(c.upstream.idle_timeout_ms),
            max_retries: c.upstream.max_retries,
            max_inflight: c.upstream.max_inflight_per_endpoint,
            queue_timeout: ms(c.upstream.queue_timeout_ms),
            max_queued: c.upstream.max_queued_per_worker,
        }
    }
}

/// Buffers for a request's prompt blocks and their matches, recycled per worker so that
/// prefix routing allocates nothing once warm.
#[derive(Default)]
pub struct PrefixBuffers {
    pub blocks: Vec<u64>,
    pub matched: Vec<u32>,
}

/// Free buffers kept per worker at most.
const MAX_FREE_BUFFERS: usize = 256;

/// A request's hold on one set of [`PrefixBuffers`]; dropping it returns them.
pub struct Scratch<'a> {
    ctx: &'a WorkerCtx,
    buffers: PrefixBuffers,
}

impl Scratch<'_> {
    pub fn get(&self) -> &PrefixBuffers {
        &self.buffers
    }

    pub fn get_mut(&mut self) -> &mut PrefixBuffers {
        &mut self.buffers
    }
}

impl Drop for Scratch<'_> {
    fn drop(&mut self) {
        let mut free = self.ctx.scratch_free.borrow_mut();
        if free.len() < MAX_FREE_BUFFERS {
            free.push(std::mem::take(&mut self.buffers));
        }
    }
}

/// One worker's state; `!Send`, shared by the worker's tasks through `Rc`.
pub struct WorkerCtx {
    pub id: usize,
    pub shared: Arc<Shared>,
    pub limits: Limits,
    pub routing: LocalRouting,
    pub pool: Pool,
    pub metrics: LocalMetrics,
    pub waiters: WaitQueue,
    ticket: Cell<u64>,
    request_prefix: String,
    request_seq: Cell<u64>,
    connections: Cell<usize>,
    scratch_free: std::cell::RefCell<Vec<PrefixBuffers>>,
    /// Prefix assignments made here since the last flush, for control (shared affinity).
    affinity_out: std::cell::RefCell<Vec<AffinityEntry>>,
}

impl WorkerCtx {
    fn new(id: usize, workers: usize, shared: Arc<Shared>) -> Self {
        let c = &shared.config;
        let seed = format!("{}-{}-{id}", std::process::id(), now_nanos());
        Self {
            id,
            limits: Limits::new(c, workers),
            routing: LocalRouting::new(&shared.cell),
            pool: Pool::new(
                c.upstream.pool_max_idle_per_endpoint,
                ms(c.upstream.pool_idle_timeout_ms),
            ),
            metrics: LocalMetrics::default(),
            waiters: WaitQueue::default(),
            ticket: Cell::new(id as u64),
            request_prefix: format!("{:012x}", xxhash_rust::xxh3::xxh3_64(seed.as_bytes()) >> 16),
            request_seq: Cell::new(0),
            connections: Cell::new(0),
            scratch_free: std::cell::RefCell::new(Vec::new()),
            affinity_out: std::cell::RefCell::new(Vec::new()),
            shared,
        }
    }

    /// The routing state to use for a request; on a new version, closes idle connections
    /// to endpoints that are gone.
    /// Notes that `endpoint` got the prompt `blocks`, for the other replicas (control mode
    /// with `share_affinity` only).
    pub fn share_assignment(&self, endpoint: &str, blocks: &[u64]) {
        if self.shared.affinity_out.is_some() {
            self.affinity_out.borrow_mut().push(AffinityEntry {
                endpoint: endpoint.to_owned(),
                blocks: blocks.to_vec(),
            });
        }
    }

    /// Hands this worker's assignments to the reporter thread (never blocks: when its
    /// queue is full they are dropped and counted).
    fn flush_assignments(&self) {
        let Some(tx) = &self.shared.affinity_out else { return };
        let entries = std::mem::take(&mut *self.affinity_out.borrow_mut());
        if entries.is_empty() {
            return;
        }
        if let Err(e) = tx.try_send(entries) {
            let blocks: usize = e.into_inner().iter().map(|e| e.blocks.len()).sum();
            ::metrics::counter!(metrics::AFFINITY_SHARED_BLOCKS_TOTAL, "status" => "dropped").increment(blocks as u64);
        }
    }

    pub fn routing_state(&self) -> StateRef {
        let (state, changed) = self.routing.current(&self.shared.cell);
        if changed {
            self.pool.sweep(|addr| state.endpoints.iter().any(|e| e.addr == *addr));
        }
        state
    }

    /// Prefix buffers for one request.
    pub fn scratch(&self) -> Scratch<'_> {
        let buffers = self.scratch_free.borrow_mut().pop().unwrap_or_default();
        Scratch { ctx: self, buffers }
    }

    pub fn next_ticket(&self) -> u64 {
        let t = self.ticket.get();
        self.ticket.set(t.wrapping_add(1));
        t
    }

    pub fn next_request_id(&self) -> String {
        let n = self.request_seq.get();
        self.request_seq.set(n + 1);
        format!("lms-{}-{:x}-{n:x}", self.request_prefix, self.id)
    }

    pub fn draining(&self) -> bool {
        self.shared.draining.load(Ordering::Relaxed)
    }
}

pub fn now_nanos() -> u128 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos())
}

/// Runs worker `id` on the current thread until the process exits.
pub fn run(id: usize, workers: usize, listener: std::net::TcpListener, shared: Arc<Shared>) -> std::io::Result<()> {
    if shared.config.pin_workers
        && let Err(e) = monoio::utils::bind_to_cpu_set([id % num_cpus()])
    {
        tracing::warn!(worker = id, "cannot pin worker to a core: {e}");
    }
    let (mut runtime, ring) = build_runtime(id)?;
    let driver = match &runtime {
        FusionRuntime::Uring(_) => "io_uring",
        FusionRuntime::Legacy(_) => "epoll",
    };
    tracing::info!(worker = id, driver, ring, "worker started");
    ::metrics::gauge!(metrics::WORKERS, "driver" => driver).increment(1.0);
    runtime.block_on(async move {
        let listener = TcpListener::from_std(listener)?;
        let ctx = Rc::new(WorkerCtx::new(id, workers, shared));
        monoio::spawn(housekeeping(ctx.clone()));
        accept_loop(listener, ctx).await
    })
}

/// The worker's runtime: io_uring where the kernel has it, else epoll. The ring is set up
/// for one thread that alone submits (`SINGLE_ISSUER`) and collects completions when it
/// waits (`DEFER_TASKRUN`, `COOP_TASKRUN`), instead of being interrupted for each; kernels
/// older than 6.1 refuse those flags and get a plain ring.
type Runtime =
    FusionRuntime<monoio::time::TimeDriver<monoio::IoUringDriver>, monoio::time::TimeDriver<monoio::LegacyDriver>>;

fn build_runtime(id: usize) -> std::io::Result<(Runtime, &'static str)> {
    if monoio::utils::detect_uring() {
        let mut ring = io_uring::IoUring::builder();
        ring.setup_coop_taskrun().setup_single_issuer().setup_defer_taskrun();
        match RuntimeBuilder::<FusionDriver>::new()
            .uring_builder(ring)
            .enable_timer()
            .build()
        {
            Ok(rt) => return Ok((rt, "single_issuer+defer_taskrun")),
            Err(e) => tracing::info!(
                worker = id,
                "io_uring refused the thread-per-core flags ({e}); using a plain ring"
            ),
        }
    }
    Ok((RuntimeBuilder::<FusionDriver>::new().enable_timer().build()?, "default"))
}

fn num_cpus() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

async fn accept_loop(listener: TcpListener, ctx: Rc<WorkerCtx>) -> std::io::Result<()> {
    let accepted = ::metrics::counter!(metrics::HTTP_CONNECTIONS_TOTAL);
    let open = ::metrics::gauge!(metrics::HTTP_CONNECTIONS);
    loop {
        if ctx.connections.get() >= ctx.limits.max_connections {
            // At the connection limit: leave new connections in the kernel's backlog.
            crate::time::sleep(Duration::from_millis(5)).await;
            continue;
        }
        match listener.accept().await {
            Ok((stream, peer)) => {
                accepted.increment(1);
                open.increment(1.0);
                ctx.connections.set(ctx.connections.get() + 1);
                let ctx = ctx.clone();
                let open = open.clone();
                monoio::spawn(async move {
                    serve_connection(stream, peer, &ctx).await;
                    ctx.connections.set(ctx.connections.get() - 1);
                    open.decrement(1.0);
                });
            }
            Err(e) => {
                // Out of file descriptors and the like: back off instead of spinning.
                tracing::warn!(worker = ctx.id, "accept failed: {e}");
                crate::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}

/// Serves requests on one client connection, in order, until it closes.
async fn serve_connection(stream: TcpStream, peer: SocketAddr, ctx: &WorkerCtx) {
    let _ = stream.set_nodelay(true);
    let mut down = Downstream::new(stream, peer);
    let lim = &ctx.limits;
    loop {
        let head = match down
            .reader
            .read_head(&lim.head, lim.keepalive, lim.header_timeout)
            .await
        {
            Ok(head) => head,
            Err(NoRequest::Closed) => break,
            Err(NoRequest::Bad(e)) => {
                ctx.metrics.http_error(e.kind);
                let bytes = response::error(&e, false, Version::Http11, None);
                if down.write(bytes, lim.write_timeout).await {
                    linger_close(&mut down).await;
                }
                return;
            }
        };
        match proxy::handle(ctx, &mut down, head).await {
            proxy::After::KeepAlive => {}
            proxy::After::Close => break,
            proxy::After::CloseAfterError => {
                linger_close(&mut down).await;
                return;
            }
        }
    }
}

/// Closes after an error response without resetting the connection under the client's
/// feet: half-close, then read and discard what it still sends for a moment, so that it
/// reads our response instead of a reset.
async fn linger_close(down: &mut Downstream) {
    let _ = down.wr.shutdown().await;
    let deadline = monoio::time::Instant::now() + Duration::from_millis(1000);
    let mut discarded = 0usize;
    while discarded < 4 * 1024 * 1024 {
        down.reader.buf.clear();
        match crate::time::timeout_at(deadline, down.reader.discard()).await {
            Ok(Ok(n)) if n > 0 => discarded += n,
            _ => return,
        }
    }
}

/// Periodic per-worker chores: hand metrics to the exporter; about once a second, close
/// expired idle engine connections.
async fn housekeeping(ctx: Rc<WorkerCtx>) {
    let mut ticks = 0u32;
    loop {
        crate::time::sleep(metrics::FLUSH_INTERVAL).await;
        ctx.metrics.flush();
        ctx.flush_assignments();
        ticks = ticks.wrapping_add(1);
        if ticks.is_multiple_of(10) {
            let state = ctx.routing_state();
            ctx.pool.sweep(|addr| state.endpoints.iter().any(|e| e.addr == *addr));
        }
    }
}
