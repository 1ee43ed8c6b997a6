//! An OTLP/HTTP traces receiver for tests and `cargo xtask real-vllm`: a small HTTP/1.1
//! server that decodes `ExportTraceServiceRequest` bodies with OpenTelemetry's own protobuf
//! definitions (opentelemetry-proto) and keeps every span. Not a collector: no gRPC, no JSON.

use std::io::Write;
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::{Arc, Mutex};
use std::thread;

use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
use opentelemetry_proto::tonic::common::v1::{KeyValue, any_value};
pub use opentelemetry_proto::tonic::trace::v1::Span;
pub use opentelemetry_proto::tonic::trace::v1::span::SpanKind;

use crate::{read_request, wait_until};

/// A tiny HTTP/1.1 server: every request (head text, body) goes to `answer`, which says
/// what to write back; connections are kept alive.
pub fn serve(answer: impl Fn(&str, &[u8]) -> Vec<u8> + Send + Sync + 'static) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let answer = Arc::new(answer);
    thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(stream) = stream else { continue };
            let answer = answer.clone();
            thread::spawn(move || connection(stream, &*answer));
        }
    });
    addr
}

fn connection(mut s: TcpStream, answer: &dyn Fn(&str, &[u8]) -> Vec<u8>) {
    let mut buf = Vec::new();
    loop {
        let Some((head_len, body_len)) = read_request(&mut s, &mut buf) else {
            return;
        };
        let head = String::from_utf8_lossy(&buf[..head_len]).into_owned();
        let out = answer(&head, &buf[head_len..head_len + body_len]);
        buf.drain(..head_len + body_len);
        if s.write_all(&out).is_err() {
            return;
        }
    }
}

/// An OTLP/HTTP receiver: every span exported to it, with its resource's `service.name`.
pub struct Receiver {
    pub addr: SocketAddr,
    spans: Arc<Mutex<Vec<(String, Span)>>>,
}

impl Receiver {
    pub fn start() -> Receiver {
        let spans = Arc::new(Mutex::new(Vec::new()));
        let kept = spans.clone();
        let addr = serve(move |head, body| {
            assert!(head.starts_with("POST /v1/traces "), "{head}");
            assert!(
                head.to_ascii_lowercase()
                    .contains("content-type: application/x-protobuf"),
                "{head}"
            );
            let request: ExportTraceServiceRequest = prost::Message::decode(body).unwrap();
            for rs in request.resource_spans {
                let service = rs
                    .resource
                    .and_then(|r| string_attr(&r.attributes, "service.name"))
                    .unwrap_or_default();
                for ss in rs.scope_spans {
                    kept.lock()
                        .unwrap()
                        .extend(ss.spans.into_iter().map(|s| (service.clone(), s)));
                }
            }
            b"HTTP/1.1 200 OK\r\ncontent-type: application/x-protobuf\r\ncontent-length: 0\r\n\r\n".to_vec()
        });
        Receiver { addr, spans }
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// lmstack's spans of `trace` (hex), once its server span came.
    pub fn trace(&self, trace: &str) -> Vec<Span> {
        let spans = self.wait_for("lmstack's spans of the request to be exported", |all| {
            all.iter()
                .any(|(svc, s)| svc == "lmstack" && hex(&s.trace_id) == trace && s.kind == SpanKind::Server as i32)
        });
        spans
            .into_iter()
            .filter(|(svc, s)| svc == "lmstack" && hex(&s.trace_id) == trace)
            .map(|(_, s)| s)
            .collect()
    }

    /// Every span so far, once `ready` holds of them (within the tests' deadline).
    pub fn wait_for(&self, what: &str, ready: impl Fn(&[(String, Span)]) -> bool) -> Vec<(String, Span)> {
        wait_until(what, || ready(&self.spans.lock().unwrap()));
        self.spans.lock().unwrap().clone()
    }

    /// Every span so far, with its service's name.
    pub fn spans(&self) -> Vec<(String, Span)> {
        self.spans.lock().unwrap().clone()
    }

    pub fn all(&self) -> Vec<Span> {
        self.spans.lock().unwrap().iter().map(|(_, s)| s.clone()).collect()
    }
}

pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

pub fn string_attr(attrs: &[KeyValue], key: &str) -> Option<String> {
    attrs
        .iter()
        .find(|kv| kv.key == key)
        .and_then(|kv| match &kv.value.as_ref()?.value {
            Some(any_value::Value::StringValue(s)) => Some(s.clone()),
            Some(any_value::Value::IntValue(n)) => Some(n.to_string()),
            Some(any_value::Value::BoolValue(b)) => Some(b.to_string()),
            _ => None,
        })
}
