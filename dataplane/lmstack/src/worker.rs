//! Worker threads: one monoio runtime per thread (io_uring, or epoll where io_uring is
//! missing), each with its own SO_REUSEPORT listener, accept loop, connection pool and
//! metric handles. A connection lives and dies on the worker that accepted it (its TLS
//! handshake included, when `listen.tls` is on).
//!
//! Not here: the worker's context (ctx.rs), what happens to a request (proxy.rs) or how
//! routing state is built (state.rs).

use std::rc::Rc;
use std::sync::Arc;
use std::time::Duration;

use monoio::net::TcpListener;
use monoio::{FusionDriver, FusionRuntime, RuntimeBuilder};

use crate::ctx::{Shared, WorkerCtx};
use crate::downstream::{Downstream, NoRequest};
use crate::metrics;
use crate::proxy::{self, After};
use crate::tls;

/// Runs worker `id` on the current thread until the process exits; `tls`: its client
/// connections speak TLS.
pub fn run(
    id: usize,
    workers: usize,
    listener: std::net::TcpListener,
    shared: Arc<Shared>,
    tls: Option<Arc<tls::Acceptor>>,
) -> std::io::Result<()> {
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
        accept_loop(listener, &ctx, tls).await;
        // Draining: the listener is closed; the worker ends when its last connection does
        // (idle ones close at once, the others after their response).
        while ctx.connections.get() > 0 {
            crate::time::sleep(Duration::from_millis(10)).await;
        }
        ctx.metrics.flush();
        Ok(())
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

/// A worker's hold on the TLS acceptor (cloned per connection without touching a shared
/// reference count), and its handshake failure counter.
struct Tls {
    acceptor: Arc<tls::Acceptor>,
    failures: ::metrics::Counter,
}

/// Accepts connections until the router drains: the main thread then shuts the listening
/// socket down, which ends the pending accept (and frees the port at once).
async fn accept_loop(listener: TcpListener, ctx: &Rc<WorkerCtx>, tls: Option<Arc<tls::Acceptor>>) {
    let accepted = ::metrics::counter!(metrics::HTTP_CONNECTIONS_TOTAL);
    let open = ::metrics::gauge!(metrics::HTTP_CONNECTIONS);
    let tls = tls.map(|acceptor| {
        Rc::new(Tls {
            acceptor,
            failures: ::metrics::counter!(metrics::TLS_HANDSHAKE_FAILURES_TOTAL),
        })
    });
    loop {
        if ctx.draining() {
            return;
        }
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
                let tls = tls.clone();
                monoio::spawn(async move {
                    let _ = stream.set_nodelay(true);
                    match tls.as_deref() {
                        None => serve_connection(Downstream::new(stream, peer), &ctx).await,
                        Some(tls) => match tls.acceptor.accept(stream).await {
                            Ok(halves) => serve_connection(Downstream::tls(halves, peer), &ctx).await,
                            Err(tls::Refused::Silent) => {}
                            Err(tls::Refused::Failed(e)) => {
                                tls.failures.increment(1);
                                tracing::debug!(worker = ctx.id, %peer, "TLS handshake failed: {e}");
                            }
                        },
                    }
                    ctx.connections.set(ctx.connections.get() - 1);
                    open.decrement(1.0);
                });
            }
            Err(_) if ctx.draining() => return,
            Err(e) => {
                // Out of file descriptors and the like: back off instead of spinning.
                tracing::warn!(worker = ctx.id, "accept failed: {e}");
                crate::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}

/// Serves requests on one client connection, in order, until it closes.
async fn serve_connection(mut down: Downstream, ctx: &WorkerCtx) {
    let lim = &ctx.limits;
    loop {
        let after = match down
            .reader
            .read_head(
                &lim.head,
                (lim.keepalive, lim.header_timeout, lim.drain_idle),
                &ctx.drain,
            )
            .await
        {
            Ok(head) => proxy::handle(ctx, &mut down, head).await,
            Err(NoRequest::Closed) => break,
            // Answered like any other error: one place turns errors into responses.
            Err(NoRequest::Bad(e)) => proxy::fail(ctx, &mut down, None, &e, None).await,
        };
        match after {
            After::KeepAlive => {}
            After::Close => break,
            After::CloseAfterError => {
                linger_close(&mut down).await;
                return;
            }
        }
    }
    down.wr.close(CLOSE_NOTIFY_TIMEOUT).await;
}

/// How long a TLS connection's close_notify may take to leave (a client that stopped
/// reading): the connection closes after it anyway.
const CLOSE_NOTIFY_TIMEOUT: Duration = Duration::from_secs(1);

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

/// Periodic per-worker chores: hand metrics to the exporter; fire the drain signal once the
/// router drains; about once a second, close expired idle engine connections.
async fn housekeeping(ctx: Rc<WorkerCtx>) {
    let mut ticks = 0u32;
    loop {
        crate::time::sleep(metrics::FLUSH_INTERVAL).await;
        ctx.metrics.flush();
        ctx.flush_assignments();
        if ctx.draining() {
            ctx.drain.fire();
        }
        ticks = ticks.wrapping_add(1);
        if ticks.is_multiple_of(10) {
            let state = ctx.routing_state();
            ctx.pool.sweep(|addr| state.endpoints.iter().any(|e| e.addr == *addr));
        }
    }
}
