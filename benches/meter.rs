//! Throughput of the stream meter over a realistic chat answer.
//!
//! `cargo bench --bench meter`

use bytes::Bytes;
use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use tollgate::meter::{Endpoint, Framing, Meter};

/// The allocator the binary ships with (`src/main.rs`): measured with
/// glibc's, the 1 M-key fixture spent 94 % of its time in `_int_malloc`.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// A ~1,000-chunk chat stream as OpenAI sends it with include_usage, cut
/// into frames the way a TCP reader delivers them: mostly a few events each,
/// sometimes mid-event.
fn chat_frames() -> (Vec<Bytes>, usize) {
    let words = [
        "The", " quick", " brown", " fox", " jumps", " over", " the", " lazy", " dog", ".",
    ];
    let head = r#"{"id":"chatcmpl-B9MHDbslfkBeAs8l4bebGdFOJ6PeG","object":"chat.completion.chunk","created":1741570283,"model":"gpt-4o-2024-08-06","system_fingerprint":"fp_4d82c5ac1e","#;
    let mut stream = String::new();
    for i in 0..1000 {
        let content = serde_json::to_string(words[i % words.len()]).expect("a string");
        stream += &format!(
            "data: {head}\"choices\":[{{\"index\":0,\"delta\":{{\"content\":{content}}},\"logprobs\":null,\"finish_reason\":null}}],\"usage\":null}}\n\n"
        );
    }
    stream += &format!(
        "data: {head}\"choices\":[],\"usage\":{{\"prompt_tokens\":19,\"completion_tokens\":1000,\"total_tokens\":1019,\"prompt_tokens_details\":{{\"cached_tokens\":0}},\"completion_tokens_details\":{{\"reasoning_tokens\":0}}}}}}\n\ndata: [DONE]\n\n"
    );
    let bytes = Bytes::from(stream);
    let mut frames = Vec::new();
    let (mut at, mut n) = (0, 0usize);
    while at < bytes.len() {
        // 1 to 4 events' worth of bytes, not aligned to events.
        let len = 180 + (n * 7919) % 600;
        let end = (at + len).min(bytes.len());
        frames.push(bytes.slice(at..end));
        at = end;
        n += 1;
    }
    (frames, bytes.len())
}

fn json_body() -> Bytes {
    let content = "Lorem ipsum dolor sit amet, consectetur adipiscing elit. ".repeat(60);
    Bytes::from(format!(
        r#"{{"id":"chatcmpl-123","object":"chat.completion","created":1677652288,"model":"gpt-4o-mini","choices":[{{"index":0,"message":{{"role":"assistant","content":"{content}"}},"logprobs":null,"finish_reason":"stop"}}],"usage":{{"prompt_tokens":9,"completion_tokens":700,"total_tokens":709,"prompt_tokens_details":{{"cached_tokens":0}},"completion_tokens_details":{{"reasoning_tokens":0}}}},"service_tier":"default"}}"#
    ))
}

fn meter(c: &mut Criterion) {
    let (frames, total) = chat_frames();
    let mut group = c.benchmark_group("meter");
    group.throughput(Throughput::Bytes(total as u64));
    for (name, withhold) in [
        ("chat_sse_pass_through", false),
        ("chat_sse_withhold", true),
    ] {
        group.bench_function(name, |b| {
            b.iter(|| {
                let mut m = Meter::new(Endpoint::Chat, Framing::Sse, withhold);
                let mut out = 0;
                for f in &frames {
                    out += m.on_frame(f.clone()).len();
                }
                out += m.finish().len();
                assert!(m.usage().is_some());
                out
            })
        });
    }
    let body = json_body();
    let frames: Vec<Bytes> = (0..body.len())
        .step_by(1024)
        .map(|at| body.slice(at..(at + 1024).min(body.len())))
        .collect();
    group.throughput(Throughput::Bytes(body.len() as u64));
    group.bench_function("chat_json_body", |b| {
        b.iter(|| {
            let mut m = Meter::new(Endpoint::Chat, Framing::Json, false);
            for f in &frames {
                m.on_frame(f.clone());
            }
            m.finish();
            assert!(m.usage().is_some());
        })
    });
    group.finish();
}

criterion_group!(benches, meter);
criterion_main!(benches);
