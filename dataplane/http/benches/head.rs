//! The request head parser on what the proxy reads before every request: a typical OpenAI
//! client's head (an SDK's dozen headers), and a large one (100 headers, ~12 KiB: tracing
//! and cookies from a gateway in front). Parsing includes the split off the read buffer and
//! the framing checks, as `downstream.rs` calls it; not the socket read.

use std::hint::black_box;

use bytes::BytesMut;
use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use lmstack_http::head::parse_request;
use lmstack_http::{Framing, HeadLimits, HeadScanner};

/// The server's defaults (`server.max_header_bytes`, `server.max_headers`).
const LIMITS: HeadLimits = HeadLimits {
    max_bytes: 64 * 1024,
    max_headers: 128,
};

/// What the official Python SDK sends for a chat completion.
fn typical() -> Vec<u8> {
    b"POST /v1/chat/completions HTTP/1.1\r\n\
      Host: lmstack.inference.svc.cluster.local:8000\r\n\
      Accept-Encoding: gzip, deflate\r\n\
      Connection: keep-alive\r\n\
      Accept: application/json\r\n\
      Content-Type: application/json\r\n\
      User-Agent: OpenAI/Python 1.82.0\r\n\
      X-Stainless-Lang: python\r\n\
      X-Stainless-Package-Version: 1.82.0\r\n\
      X-Stainless-OS: Linux\r\n\
      X-Stainless-Arch: x64\r\n\
      X-Stainless-Runtime: CPython\r\n\
      X-Stainless-Runtime-Version: 3.12.3\r\n\
      Authorization: Bearer sk-lmstack-0123456789abcdef0123456789abcdef\r\n\
      X-Stainless-Async: false\r\n\
      X-Stainless-Retry-Count: 0\r\n\
      X-Stainless-Read-Timeout: 600\r\n\
      Content-Length: 16731\r\n\
      \r\n"
        .to_vec()
}

/// 100 header lines of ~120 bytes each.
fn large() -> Vec<u8> {
    let mut head = b"POST /v1/chat/completions HTTP/1.1\r\nHost: lmstack:8000\r\n\
                     Content-Type: application/json\r\nContent-Length: 16731\r\n"
        .to_vec();
    for i in 0..97 {
        head.extend_from_slice(format!("X-Gateway-Trace-{i:02}: {}\r\n", "0123456789abcdef".repeat(6)).as_bytes());
    }
    head.extend_from_slice(b"\r\n");
    head
}

fn bench(c: &mut Criterion) {
    let mut g = c.benchmark_group("parse_request_head");
    for (name, head) in [("typical_openai_sdk", typical()), ("large_100_headers", large())] {
        let mut buf = BytesMut::from(&head[..]);
        let parsed = parse_request(&mut buf, &mut HeadScanner::default(), &LIMITS)
            .expect("the bench head must parse")
            .expect("the bench head must be whole");
        assert_eq!(parsed.path(), "/v1/chat/completions");
        assert_eq!(parsed.framing, Framing::Length(16731));
        g.throughput(Throughput::Bytes(head.len() as u64));
        g.bench_function(name, |b| {
            b.iter_batched_ref(
                || BytesMut::from(&head[..]),
                |buf| parse_request(black_box(buf), &mut HeadScanner::default(), &LIMITS),
                criterion::BatchSize::SmallInput,
            );
        });
    }
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
