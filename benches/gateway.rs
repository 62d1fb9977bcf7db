//! The latency the gateway adds: the same chat request sent straight to the
//! in-process mock upstream and through a gateway in front of it (per-core,
//! one worker, keys, metering and usage records on), over one keep-alive
//! HTTP/1.1 connection each, one request at a time.
//!
//! cargo bench --bench gateway
//!
//! After criterion's own report, the mean added latency per case is
//! printed (gateway − direct, over every iteration criterion ran).

use std::collections::BTreeMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use bytes::Bytes;
use criterion::{Criterion, criterion_group, criterion_main};
use http::Request;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use tollgate::config::Config;
use tollgate::mock::{MockOptions, MockUpstream};
use tollgate::runtime::{Gateway, StartOptions};

const ADMIN: &str = "bench-admin-token-0123456789";
const UPSTREAM_KEY_ENV: &str = "TOLLGATE_BENCH_UPSTREAM_KEY";

const CONFIG: &str = r#"
[server]
listen = "127.0.0.1:0"
[runtime]
mode = "per-core"
workers = 1
[storage]
path = "{DATA}"
flush_ms = 50
[[upstreams]]
name = "mock"
base_url = "{MOCK}"
api_key_env = "TOLLGATE_BENCH_UPSTREAM_KEY"
models = ["demo-*"]
[models."demo-chat"]
input = "0.15"
output = "0.60"
max_output_tokens = 256
"#;

const CHAT: &str =
    r#"{"model":"demo-chat","messages":[{"role":"user","content":"Say hello to the gateway."}]}"#;
const CHAT_STREAM: &str = r#"{"model":"demo-chat","stream":true,"messages":[{"role":"user","content":"Say hello to the gateway."}]}"#;

type HttpClient = Client<HttpConnector, Full<Bytes>>;

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

fn gateway(c: &mut Criterion) {
    // SAFETY: set once, before the gateway (the only reader) starts and
    // before any other thread of this process exists.
    unsafe { std::env::set_var(UPSTREAM_KEY_ENV, "sk-bench-upstream") };
    let mock = MockUpstream::start(MockOptions::default()).expect("mock starts");
    let data = std::env::temp_dir().join(format!("tollgate-bench-gw-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&data);
    let text = CONFIG
        .replace("{DATA}", &data.display().to_string())
        .replace("{MOCK}", &mock.base_url());
    let config = Config::parse(&text, "bench.toml").expect("bench config parses");
    let gw = Gateway::start(
        config,
        StartOptions {
            admin_token: Some(ADMIN.to_owned()),
            ..StartOptions::default()
        },
    )
    .expect("gateway starts");
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("a current_thread runtime builds");
    let client: HttpClient = Client::builder(TokioExecutor::new()).build_http();
    // An unlimited key, made through the admin API as a user would.
    let key = rt.block_on(async {
        let req = Request::post(format!("http://{}/api/v1/keys", gw.addr()))
            .header("authorization", format!("Bearer {ADMIN}"))
            .header("content-type", "application/json")
            .body(Full::new(Bytes::from_static(b"{\"name\":\"bench\"}")))
            .expect("request builds");
        let res = client.request(req).await.expect("create key");
        assert_eq!(res.status(), 201);
        let body = res.into_body().collect().await.expect("body").to_bytes();
        let v: serde_json::Value = serde_json::from_slice(&body).expect("json");
        v["key"].as_str().expect("key").to_owned()
    });
    let direct = format!("{}/chat/completions", mock.base_url());
    let through = format!("http://{}/v1/chat/completions", gw.addr());

    let mut group = c.benchmark_group("gateway");
    group.measurement_time(Duration::from_secs(8));
    for (case, body) in [("chat", CHAT), ("chat_stream16", CHAT_STREAM)] {
        for (target, url) in [("direct", &direct), ("gateway", &through)] {
            let name = format!("{case}/{target}");
            // Warm the connection (and, for the gateway, the key cache).
            rt.block_on(round_trip(&client, post(url, &key, body)));
            group.bench_function(&name, |b| {
                b.iter_custom(|iters| {
                    let elapsed = rt.block_on(async {
                        let start = Instant::now();
                        for _ in 0..iters {
                            round_trip(&client, post(url, &key, body)).await;
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
    }
    drop(client);
    gw.shutdown();
    drop(mock);
    let _ = std::fs::remove_dir_all(&data);
}

criterion_group!(benches, gateway);
criterion_main!(benches);
