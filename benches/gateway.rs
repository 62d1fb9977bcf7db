//! The latency the gateway adds: the same chat request sent straight to the
//! in-process mock upstream and through a gateway in front of it (per-core,
//! one worker, keys, metering and usage records on), over one keep-alive
//! HTTP/1.1 connection each, one request at a time.
//!
//! cargo bench --bench gateway
//!
//! After criterion's own report, the mean added latency per case is
//! printed (gateway − direct, over every iteration criterion ran).
//! `gateway_account` is the same request on a key whose owner is a funded
//! account: admission reserves on the key and on the account's wallet
//! together (issue 10 asks for it within 10% of `gateway`).

mod common;
use common::HttpClient;

use std::collections::BTreeMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use bytes::Bytes;
use criterion::{Criterion, criterion_group, criterion_main};
use http::Request;
use http_body_util::{BodyExt, Full};

/// The allocator the binary ships with (`src/main.rs`): measured with
/// glibc's, the 1 M-key fixture spent 94 % of its time in `_int_malloc`.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

const CHAT: &str =
    r#"{"model":"demo-chat","messages":[{"role":"user","content":"Say hello to the gateway."}]}"#;
const CHAT_STREAM: &str = r#"{"model":"demo-chat","stream":true,"messages":[{"role":"user","content":"Say hello to the gateway."}]}"#;

fn post(url: &str, key: &str, body: &'static str) -> Request<Full<Bytes>> {
    Request::post(url)
        .header("authorization", format!("Bearer {key}"))
        .header("content-type", "application/json")
        .header("x-mock-chunks", "16")
        .body(Full::new(Bytes::from_static(body.as_bytes())))
        .expect("request builds")
}

/// Sends one request and reads the whole answer.
async fn round_trip(client: &HttpClient, req: Request<Full<Bytes>>) -> usize {
    let res = client.request(req).await.expect("response");
    assert_eq!(res.status(), 200);
    res.into_body()
        .collect()
        .await
        .expect("body")
        .to_bytes()
        .len()
}

/// Total time and iterations per case, to print the added latency after
/// criterion's report.
static TOTALS: Mutex<BTreeMap<String, (Duration, u64)>> = Mutex::new(BTreeMap::new());

/// An admin POST of a JSON body; asserts its status.
async fn admin_post(
    client: &HttpClient,
    url: String,
    body: String,
    want: u16,
) -> serde_json::Value {
    let req = Request::post(url)
        .header("authorization", format!("Bearer {}", common::ADMIN))
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(body)))
        .expect("request builds");
    let res = client.request(req).await.expect("admin answer");
    assert_eq!(res.status().as_u16(), want);
    let body = res.into_body().collect().await.expect("body").to_bytes();
    serde_json::from_slice(&body).expect("json")
}

/// A key whose owner is an account funded far beyond the bench's spend.
fn account_key(bench: &common::BenchGateway) -> String {
    let base = format!("http://{}/api/v1", bench.gw.addr());
    bench.rt.block_on(async {
        let c = &bench.client;
        admin_post(
            c,
            format!("{base}/accounts"),
            r#"{"id":"bench-acct"}"#.into(),
            201,
        )
        .await;
        admin_post(
            c,
            format!("{base}/accounts/bench-acct/credits"),
            r#"{"amount":"1000000","kind":"topup","reason":"bench","idempotency_key":"b1"}"#.into(),
            200,
        )
        .await;
        let v = admin_post(
            c,
            format!("{base}/keys"),
            r#"{"name":"bench-acct-key","owner":"bench-acct"}"#.into(),
            201,
        )
        .await;
        v["key"].as_str().expect("key").to_owned()
    })
}

fn gateway(c: &mut Criterion) {
    let bench = common::BenchGateway::start("gw");
    let (key, _) = bench.create_key();
    let acct_key = account_key(&bench);
    let (mock, gw, rt, client) = (&bench.mock, &bench.gw, &bench.rt, &bench.client);

    let direct = format!("{}/chat/completions", mock.base_url());
    let through = format!("http://{}/v1/chat/completions", gw.addr());

    let mut group = c.benchmark_group("gateway");
    group.measurement_time(Duration::from_secs(8));
    for (case, body) in [("chat", CHAT), ("chat_stream16", CHAT_STREAM)] {
        for (target, url, key) in [
            ("direct", &direct, &key),
            ("gateway", &through, &key),
            ("gateway_account", &through, &acct_key),
        ] {
            let name = format!("{case}/{target}");
            // Warm the connection (and, for the gateway, the key cache).
            rt.block_on(round_trip(client, post(url, key, body)));
            group.bench_function(&name, |b| {
                b.iter_custom(|iters| {
                    let elapsed = rt.block_on(async {
                        let start = Instant::now();
                        for _ in 0..iters {
                            round_trip(client, post(url, key, body)).await;
                        }
                        start.elapsed()
                    });
                    let mut totals = TOTALS.lock().expect("not poisoned");
                    let entry = totals.entry(name.clone()).or_default();
                    entry.0 += elapsed;
                    entry.1 += iters;
                    elapsed
                })
            });
        }
    }
    group.finish();

    let totals = TOTALS.lock().expect("not poisoned");
    let mean_us = |name: &str| {
        totals
            .get(name)
            .map(|(t, n)| t.as_secs_f64() * 1e6 / (*n).max(1) as f64)
            .unwrap_or(f64::NAN)
    };
    eprintln!(
        "\nadded latency (mean over every iteration, one connection, one request at a time):"
    );
    for case in ["chat", "chat_stream16"] {
        let (d, g) = (
            mean_us(&format!("{case}/direct")),
            mean_us(&format!("{case}/gateway")),
        );
        eprintln!(
            "  {case:<14} direct {d:>8.1} µs   gateway {g:>8.1} µs   added {:>7.1} µs",
            g - d
        );
        let a = mean_us(&format!("{case}/gateway_account"));
        eprintln!(
            "  {case:<14} with an account {a:>8.1} µs   added {:>7.1} µs ({:+.1}% vs without)",
            a - d,
            (a - g) / g * 100.0
        );
    }
    bench.finish();
}

criterion_group!(benches, gateway);
criterion_main!(benches);
