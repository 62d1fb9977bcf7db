//! The usage reports for a key with 1,000,000 records over 90 days: the
//! detail (summary, by model, by day, the 20 newest records), the daily
//! chart and a logs page, each over one keep-alive HTTP/1.1 connection to a
//! real gateway, and the rollup read alone. Target: detail < 10 ms.
//!
//! cargo bench --bench usage
//!
//! The records go in through `Store::record` (the store thread's batching),
//! then one flush; the time that took is printed first.

mod common;
use common::HttpClient;

use std::time::{Duration, Instant};

use bytes::Bytes;
use criterion::{Criterion, criterion_group, criterion_main};
use http::Request;
use http_body_util::{BodyExt, Full};
use tollgate::money::Pico;
use tollgate::store::{KeyHash, RollupScope, UsageRecord};

/// The allocator the binary ships with (`src/main.rs`): measured with
/// glibc's, the 1 M-key fixture spent 94 % of its time in `_int_malloc`.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

const RECORDS: u64 = 1_000_000;
const DAYS: i64 = 90;
const DAY_MS: i64 = 86_400_000;
const MODELS: [&str; 3] = ["demo-chat", "demo-chat-large", "demo-embed"];

fn get(url: &str, auth: &str) -> Request<Full<Bytes>> {
    Request::get(url)
        .header("authorization", format!("Bearer {auth}"))
        .body(Full::new(Bytes::new()))
        .expect("request builds")
}

async fn fetch(client: &HttpClient, req: Request<Full<Bytes>>) -> Bytes {
    let res = client.request(req).await.expect("response");
    let status = res.status();
    let body = res.into_body().collect().await.expect("body").to_bytes();
    assert_eq!(status, 200, "{}", String::from_utf8_lossy(&body));
    body
}

fn record(hash: KeyHash, at_ms: i64, i: u64) -> UsageRecord {
    UsageRecord {
        at_ms,
        key: hash,
        model: MODELS[(i % 3) as usize].into(),
        upstream: "mock".into(),
        route: "chat".into(),
        stream: i % 2 == 0,
        status: if i % 97 == 0 { 500 } else { 200 },
        prompt_tokens: 800 + i % 50,
        cached_tokens: i % 7,
        completion_tokens: 200 + i % 30,
        reasoning_tokens: 0,
        cost: Pico(250_000_000 + (i % 1000) as i64),
        reserved: Pico(400_000_000),
        latency_ms: 300 + (i % 200) as u32,
        ttfb_ms: 80,
        request_id: format!("req-{i}"),
        client_ip: "127.0.0.1".into(),
        estimated: i % 501 == 0,
        daily_fee: Pico::ZERO,
        account: None,
        cache_write_tokens: 0,
    }
}

fn usage(c: &mut Criterion) {
    let bench = common::BenchGateway::start("usage");
    let (key, hash) = bench.create_key();
    let (gw, rt, client) = (&bench.gw, &bench.rt, &bench.client);
    let base = format!("http://{}", gw.addr());

    // 1,000,000 records evenly over the last 90 days.
    let store = gw.app().store.clone();
    let now = gw.app().clock.now_ms();
    let start = now - DAYS * DAY_MS;
    let step = (DAYS * DAY_MS) / RECORDS as i64;
    let filling = Instant::now();
    for i in 0..RECORDS {
        store.record(record(hash, start + i as i64 * step, i));
    }
    rt.block_on(store.flush()).expect("flush");
    let fill = filling.elapsed();
    let stats = store.stats();
    println!(
        "filled {RECORDS} records over {DAYS} days in {:.2} s ({:.0} records/s; {} batches, {} sled writes)",
        fill.as_secs_f64(),
        RECORDS as f64 / fill.as_secs_f64(),
        stats.batches,
        stats.sled_writes,
    );

    let range = format!("start={}&end={}", start / 1000, now / 1000 + 1);
    let detail = format!("{base}/api/usage/token/detail?{range}");
    let chart = format!("{base}/api/usage/token/chart?{range}&granularity=day");
    let logs = format!("{base}/api/usage/token/logs?page=1&page_size=100");
    // Check the answer once: every record is counted.
    let body = rt.block_on(fetch(client, get(&detail, &key)));
    let v: serde_json::Value = serde_json::from_slice(&body).expect("json");
    assert_eq!(v["data"]["summary"]["total_requests"], RECORDS);
    println!("detail answer: {} bytes", body.len());

    let mut group = c.benchmark_group("usage_1m_records_90d");
    group.measurement_time(Duration::from_secs(8));
    for (name, url) in [
        ("detail", &detail),
        ("chart_day", &chart),
        ("logs_page100", &logs),
    ] {
        group.bench_function(name, |b| {
            b.iter(|| rt.block_on(fetch(client, get(url, &key))));
        });
    }
    let (from_hour, to_hour) = (start / 3_600_000, now / 3_600_000 + 1);
    group.bench_function("rollups_read_only", |b| {
        b.iter(|| {
            store
                .rollups(RollupScope::Key(hash), from_hour, to_hour)
                .expect("rollups")
                .len()
        });
    });
    group.finish();
    bench.finish();
}

criterion_group!(benches, usage);
criterion_main!(benches);
