//! What a resumable stream costs per event on the relay path: a vLLM chat chunk (as vLLM
//! 0.32 writes it) cut out of the body by the splitter and read by the ledger, with the
//! token ids the router asked for (nulled in place for a client that did not ask), with ids
//! the client asked for (forwarded as is), and a completions chunk. The figure to hold
//! against a token's time on an engine (milliseconds).

use std::hint::black_box;

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use lmstack_http::stream::{Api, EventSplitter, Ledger};

const CHAT: &str = r#"data: {"id":"chatcmpl-b2f1c7e0a9d44c3e","object":"chat.completion.chunk","created":1796325569,"model":"meta-llama/Llama-3.1-8B-Instruct","choices":[{"index":0,"delta":{"content":" the"},"logprobs":null,"finish_reason":null,"token_ids":[279]}]}

"#;
const COMPLETION: &str = r#"data: {"id":"cmpl-b2f1c7e0a9d44c3e","object":"text_completion","created":1796325569,"model":"meta-llama/Llama-3.1-8B-Instruct","choices":[{"index":0,"text":" the","logprobs":null,"finish_reason":null,"stop_reason":null,"prompt_token_ids":null,"token_ids":[279]}]}

"#;

fn relay(c: &mut Criterion, name: &str, api: Api, keep_ids: bool, event: &str) {
    let mut g = c.benchmark_group("stream_event");
    g.throughput(Throughput::Elements(1));
    g.bench_function(name, |b| {
        // A long stream: the ledger keeps growing, as it does for a real one.
        let mut ledger = Ledger::new(api, keep_ids, usize::MAX);
        let mut splitter = EventSplitter::new(1 << 20);
        b.iter(|| {
            splitter.push(black_box(event.as_bytes())).expect("within the bound");
            let e = splitter.next_event().expect("a whole event");
            black_box(ledger.observe(&e));
        });
    });
    g.finish();
}

fn benches(c: &mut Criterion) {
    relay(c, "chat_ids_nulled", Api::Chat, false, CHAT);
    relay(c, "chat_ids_kept", Api::Chat, true, CHAT);
    relay(c, "completion_ids_nulled", Api::Completions, false, COMPLETION);
}

criterion_group!(stream, benches);
criterion_main!(stream);
