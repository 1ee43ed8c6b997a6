//! The programs (see main.rs). Every loop is bounded by a constant; every map has a fixed size.

use aya_ebpf::EbpfContext;
use aya_ebpf::bindings::{__sk_buff, BPF_RB_AVAIL_DATA, BPF_RB_FORCE_WAKEUP, BPF_RB_NO_WAKEUP};
use aya_ebpf::helpers::generated::{
    bpf_get_socket_cookie, bpf_ktime_get_ns, bpf_loop, bpf_skb_cgroup_id, bpf_skb_load_bytes,
};
use aya_ebpf::macros::{btf_tracepoint, cgroup_skb, map};
use aya_ebpf::maps::{LruHashMap, PerCpuArray, PerCpuHashMap, RingBuf};
use aya_ebpf::programs::{BtfTracePointContext, SkBuffContext};
use aya_log_ebpf::{debug, warn};
use lmstack_ebpf_common::{
    Conn, EVENTS_BYTES, Endpoint, Event, EventKind, FLAG_DONE, FLAG_FIRST, MAX_CGROUPS, MAX_CONNS, SCAN_BYTES,
    SSE_DONE, SSE_EVENT, SSE_STATE, SseCounter, Traffic, WAKEUP_BYTES, sse_next, stat,
};

#[map(name = "EVENTS")]
static EVENTS: RingBuf = RingBuf::with_byte_size(EVENTS_BYTES, 0);

#[map(name = "CONNS")]
static CONNS: LruHashMap<u64, Conn> = LruHashMap::with_max_entries(MAX_CONNS, 0);

#[map(name = "TRAFFIC")]
static TRAFFIC: PerCpuHashMap<u64, Traffic> = PerCpuHashMap::with_max_entries(MAX_CGROUPS, 0);

#[map(name = "STATS")]
static STATS: PerCpuArray<u64> = PerCpuArray::with_max_entries(stat::COUNT, 0);

/// Per-CPU scratch space for a segment's payload (too big for the 512-byte stack).
#[map(name = "SCRATCH")]
static SCRATCH: PerCpuArray<[u8; SCAN_BYTES]> = PerCpuArray::with_max_entries(1, 0);

const ALLOW: i32 = 1;
const IPPROTO_TCP: u8 = 6;
const TCP_CLOSE: i32 = 7;
/// `POST /v1/` and the longest endpoint name we look for (`chat/completions`).
const REQUEST_PREFIX: &[u8; 9] = b"POST /v1/";
const REQUEST_PEEK: usize = 9 + 16;

fn bump(index: u32) {
    if let Some(v) = STATS.get_ptr_mut(index) {
        // SAFETY: a per-CPU slot, only this CPU touches it while the program runs.
        unsafe { *v += 1 };
    }
}

/// Writes an event, waking the agent only when enough has piled up (see WAKEUP_BYTES).
fn emit(event: &Event) {
    let wakeup = if EVENTS.query(BPF_RB_AVAIL_DATA as u64) >= WAKEUP_BYTES {
        BPF_RB_FORCE_WAKEUP
    } else {
        BPF_RB_NO_WAKEUP
    };
    if EVENTS.output::<Event>(event, wakeup as u64).is_ok() {
        bump(stat::EVENTS);
    } else {
        bump(stat::DROPPED);
    }
}

/// Where a TCP segment's payload starts in the skb (which begins at the IP header for
/// cgroup_skb programs), or None for anything but TCP over IPv4/IPv6 (no extension headers).
fn payload_offset(ctx: &SkBuffContext) -> Option<usize> {
    let first: u8 = ctx.load(0).ok()?;
    let (ip_len, proto) = match first >> 4 {
        4 => (((first & 0x0f) as usize) * 4, ctx.load::<u8>(9).ok()?),
        6 => (40, ctx.load::<u8>(6).ok()?),
        _ => return None,
    };
    if proto != IPPROTO_TCP || ip_len < 20 {
        return None;
    }
    let data_offset: u8 = ctx.load(ip_len + 12).ok()?;
    Some(ip_len + ((data_offset >> 4) as usize) * 4)
}

fn count_traffic(cgroup_id: u64, rx: u64, tx: u64) {
    match TRAFFIC.get_ptr_mut(cgroup_id) {
        // SAFETY: a per-CPU value, only this CPU touches it while the program runs.
        Some(t) => unsafe {
            (*t).rx_bytes += rx;
            (*t).tx_bytes += tx;
        },
        None => {
            let _ = TRAFFIC.insert(
                cgroup_id,
                Traffic {
                    rx_bytes: rx,
                    tx_bytes: tx,
                },
                0,
            );
        }
    }
}

struct Segment {
    cookie: u64,
    cgroup_id: u64,
    offset: usize,
    len: usize,
}

fn segment(ctx: &SkBuffContext) -> Option<Segment> {
    let offset = payload_offset(ctx)?;
    let len = (ctx.len() as usize).checked_sub(offset)?;
    let skb = ctx.as_ptr() as *mut __sk_buff;
    // SAFETY: helpers allowed for cgroup_skb programs, called with the program's own skb.
    let (cookie, cgroup_id) = unsafe { (bpf_get_socket_cookie(skb.cast()), bpf_skb_cgroup_id(skb)) };
    Some(Segment {
        cookie,
        cgroup_id,
        offset,
        len,
    })
}

#[cgroup_skb(ingress)]
pub fn lmstack_ingress(ctx: SkBuffContext) -> i32 {
    if let Some(seg) = segment(&ctx) {
        count_traffic(seg.cgroup_id, seg.len as u64, 0);
        if seg.len >= REQUEST_PREFIX.len() {
            on_request(&ctx, &seg);
        }
    }
    ALLOW
}

/// A segment that starts with a generation request starts that request on its connection.
fn on_request(ctx: &SkBuffContext, seg: &Segment) {
    // A fixed-size read: every request line to these endpoints is longer than this.
    let Ok(head) = ctx.load::<[u8; REQUEST_PEEK]>(seg.offset) else {
        return;
    };
    if head[..REQUEST_PREFIX.len()] != REQUEST_PREFIX[..] {
        return;
    }
    let Some(endpoint) = Endpoint::from_path(&head[REQUEST_PREFIX.len()..]) else {
        return;
    };
    // SAFETY: a helper without arguments.
    let now = unsafe { bpf_ktime_get_ns() };
    let conn = Conn {
        request_ns: now,
        events: 0,
        sse_state: SseCounter::START,
    };
    let _ = CONNS.insert(seg.cookie, conn, 0);
    emit(&Event {
        ts_ns: now,
        cookie: seg.cookie,
        cgroup_id: seg.cgroup_id,
        kind: EventKind::Request as u32,
        value: endpoint as u32,
        flags: seg.len as u32,
        _pad: 0,
    });
}

#[cgroup_skb(egress)]
pub fn lmstack_egress(ctx: SkBuffContext) -> i32 {
    if let Some(seg) = segment(&ctx) {
        count_traffic(seg.cgroup_id, 0, seg.len as u64);
        if seg.len > 0 {
            on_response(&ctx, &seg);
        }
    }
    ALLOW
}

/// Counts the SSE events in a response segment of a tracked connection.
fn on_response(ctx: &SkBuffContext, seg: &Segment) {
    let Some(conn) = CONNS.get_ptr_mut(seg.cookie) else {
        return;
    };
    let Some(buf) = SCRATCH.get_ptr_mut(0) else {
        return;
    };
    // SAFETY: the per-CPU scratch slot is this CPU's alone while the program runs.
    let buf = unsafe { &mut *buf };
    // Read [1, SCAN_BYTES] bytes: the verifier rejects a length that may be zero.
    let n = if seg.len > SCAN_BYTES { SCAN_BYTES } else { seg.len };
    if n == 0 {
        return;
    }
    // SAFETY: `buf` holds SCAN_BYTES >= n bytes; the helper takes the program's own skb.
    let ret = unsafe { bpf_skb_load_bytes(ctx.as_ptr(), seg.offset as u32, buf.as_mut_ptr().cast(), n as u32) };
    if ret != 0 {
        bump(stat::UNREADABLE);
        return;
    }
    if seg.len > SCAN_BYTES {
        bump(stat::TRUNCATED);
        warn!(ctx, "segment of {} bytes scanned to {}", seg.len, SCAN_BYTES);
    }
    // SAFETY: the map value stays valid while the program runs (LRU eviction waits for RCU).
    let conn = unsafe { &mut *conn };
    let mut scan = Scan {
        len: n as u64,
        state: conn.sse_state,
        events: 0,
        done: 0,
        _pad: 0,
    };
    // One verified callback per CHUNK bytes: a plain loop over 4 KiB is more than the
    // verifier follows.
    let chunks = n.div_ceil(CHUNK) as u32;
    // SAFETY: bpf_loop calls scan_chunk with a pointer to `scan`, which outlives the call.
    unsafe {
        bpf_loop(
            chunks,
            scan_chunk as *mut core::ffi::c_void,
            (&mut scan as *mut Scan).cast(),
            0,
        )
    };
    let (events, done) = (scan.events, scan.done != 0);
    conn.sse_state = scan.state;
    if events == 0 && !done {
        return;
    }
    let mut flags = if done { FLAG_DONE } else { 0 };
    if conn.events == 0 && events > 0 {
        flags |= FLAG_FIRST;
    }
    conn.events += events;
    emit(&Event {
        // SAFETY: a helper without arguments.
        ts_ns: unsafe { bpf_ktime_get_ns() },
        cookie: seg.cookie,
        cgroup_id: seg.cgroup_id,
        kind: EventKind::Tokens as u32,
        value: events,
        flags,
        _pad: 0,
    });
}

/// Bytes scanned per bpf_loop iteration (SCAN_BYTES / CHUNK must be a power of two).
const CHUNK: usize = 64;
const _: () = assert!((SCAN_BYTES / CHUNK).is_power_of_two() && SCAN_BYTES % CHUNK == 0);

/// The SSE scan's state, shared with `scan_chunk` through bpf_loop's context pointer.
#[repr(C)]
struct Scan {
    len: u64,
    state: u32,
    events: u32,
    done: u32,
    _pad: u32,
}

/// Scans bytes `[index * CHUNK, (index + 1) * CHUNK)` of the scratch buffer.
extern "C" fn scan_chunk(index: u64, ctx: *mut core::ffi::c_void) -> i64 {
    // SAFETY: bpf_loop passes back the pointer to the caller's `Scan`.
    let scan = unsafe { &mut *ctx.cast::<Scan>() };
    let Some(buf) = SCRATCH.get_ptr(0) else {
        return 1;
    };
    // SAFETY: the per-CPU scratch slot is this CPU's alone while the program runs.
    let buf = unsafe { &*buf };
    // Masked so that the verifier sees the offset bounded (index < SCAN_BYTES / CHUNK anyway).
    let start = (index as usize & (SCAN_BYTES / CHUNK - 1)) * CHUNK;
    let len = scan.len as usize;
    let (mut state, mut events, mut done) = (scan.state, 0u32, 0u32);
    for j in 0..CHUNK {
        let i = start + j;
        if i >= len {
            break;
        }
        // No branch on the state or the byte: the verifier follows one path per byte.
        let b = buf[i & (SCAN_BYTES - 1)];
        let v = sse_next(state, b);
        state = u32::from(v & SSE_STATE);
        events += u32::from((v & SSE_EVENT) >> 4);
        done |= u32::from((v & SSE_DONE) >> 5);
    }
    scan.events += events;
    scan.done |= done;
    scan.state = state;
    0
}

#[btf_tracepoint(function = "inet_sock_set_state")]
pub fn lmstack_sock_state(ctx: BtfTracePointContext) -> i32 {
    // inet_sock_set_state(const struct sock *sk, const int oldstate, const int newstate)
    let new_state: i32 = ctx.arg(2);
    if new_state != TCP_CLOSE {
        return 0;
    }
    let sk: *mut core::ffi::c_void = ctx.arg(0);
    // SAFETY: bpf_get_socket_cookie takes the tracepoint's socket pointer (BTF-typed).
    let cookie = unsafe { bpf_get_socket_cookie(sk) };
    // SAFETY: only the value's presence is read.
    if unsafe { CONNS.get(cookie) }.is_none() {
        return 0;
    }
    let _ = CONNS.remove(cookie);
    debug!(&ctx, "connection {} closed", cookie);
    emit(&Event {
        // SAFETY: a helper without arguments.
        ts_ns: unsafe { bpf_ktime_get_ns() },
        cookie,
        cgroup_id: 0,
        kind: EventKind::Close as u32,
        value: 0,
        flags: 0,
        _pad: 0,
    });
    0
}

#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    // SAFETY: never reached: the verifier rejects programs that could panic.
    unsafe { core::hint::unreachable_unchecked() }
}
