//! Usage records through the store thread: records/s, and µs of store-thread
//! CPU per record (from `StoreStats::thread_cpu_ns`, printed after each
//! case).
//!
//! cargo bench --bench store

use std::time::{Duration, Instant};

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use tollgate::money::Pico;
use tollgate::store::{Account, KeyHash, KeyRecord, Store, UsageRecord};

/// The allocator the binary ships with (`src/main.rs`): measured with
/// glibc's, the 1 M-key fixture spent 94 % of its time in `_int_malloc`.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Records sent per measured iteration (then one `flush`).
const PER_ITER: u64 = 20_000;

fn hash(n: u32) -> KeyHash {
    let mut h = [0u8; 32];
    h[..4].copy_from_slice(&n.to_be_bytes());
    h
}

fn key(n: u32) -> KeyRecord {
    KeyRecord {
        hash: hash(n),
        name: format!("bench {n}"),
        label: "sk-tg-…".into(),
        owner: None,
        plan: None,
        disabled: false,
        created_at: i64::from(n),
        updated_at: i64::from(n),
        expires_at: None,
        limit_reset: Some(tollgate::clock::Period::Daily),
        max_requests: None,
        rpm: None,
        tpm: None,
        concurrency: None,
        models: vec![],
        allowed_ips: vec![],
        max_devices: None,
        devices: vec![],
        daily_fee: None,
        metadata: None,
        imported: false,
        low_balance_alert: None,
    }
}

fn record(k: u32, at_ms: i64, i: u64) -> UsageRecord {
    UsageRecord {
        at_ms,
        key: hash(k),
        model: if i % 4 == 0 { "gpt-4o" } else { "gpt-4o-mini" }.into(),
        upstream: "openai".into(),
        route: "chat".into(),
        stream: true,
        status: 200,
        prompt_tokens: 812,
        cached_tokens: 0,
        completion_tokens: 214,
        reasoning_tokens: 0,
        cost: Pico(250_000_000),
        reserved: Pico(900_000_000),
        latency_ms: 1_200,
        ttfb_ms: 180,
        request_id: format!("req-{i:016x}"),
        client_ip: "203.0.113.7".into(),
        estimated: false,
        daily_fee: Pico::ZERO,
        account: None,
        cache_write_tokens: 0,
    }
}

fn records(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .build()
        .expect("a current-thread runtime builds");
    let mut group = c.benchmark_group("store_records");
    group.throughput(Throughput::Elements(PER_ITER));
    group.sample_size(10);
    group.measurement_time(Duration::from_secs(10));
    for keys in [1u32, 1_000] {
        let dir = std::env::temp_dir().join(format!(
            "tollgate-bench-store-{keys}-{}",
            std::process::id()
        ));
        let _ = std::fs::remove_dir_all(&dir);
        let store = Store::open(&dir, 50).expect("open the bench store");
        store
            .insert_keys_bulk((0..keys).map(|k| {
                (
                    key(k),
                    Account {
                        fee_day: -1,
                        ..Account::default()
                    },
                )
            }))
            .expect("insert bench keys");
        let start = store.stats();
        let mut i = 0u64;
        let at0 = 1_795_000_000_000i64;
        group.bench_function(format!("{keys}_keys"), |b| {
            b.iter_custom(|iters| {
                let t = Instant::now();
                for _ in 0..iters {
                    for _ in 0..PER_ITER {
                        // 1 ms apart: a batch spans a few hours' buckets at most.
                        store.record(record((i % u64::from(keys)) as u32, at0 + i as i64, i));
                        i += 1;
                    }
                    rt.block_on(store.flush()).expect("flush");
                }
                t.elapsed()
            })
        });
        let end = store.stats();
        let recs = end.records_written - start.records_written;
        let batches = end.batches - start.batches;
        let cpu_ns = end.thread_cpu_ns.saturating_sub(start.thread_cpu_ns);
        let flush_us = end.flush_us_sum - start.flush_us_sum;
        let writes = end.sled_writes - start.sled_writes;
        eprintln!(
            "store {keys} keys: {recs} records in {batches} batches; store thread CPU {:.2} µs/record \
             (flush wall {:.2} µs/record); sled writes {:.3}/record",
            cpu_ns as f64 / 1_000.0 / recs.max(1) as f64,
            flush_us as f64 / recs.max(1) as f64,
            writes as f64 / recs.max(1) as f64,
        );
        drop(store);
        let _ = std::fs::remove_dir_all(&dir);
    }
    group.finish();
}

criterion_group!(benches, records);
criterion_main!(benches);
