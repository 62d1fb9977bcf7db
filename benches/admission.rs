//! The admission path on one thread, with 1,000,000 keys in the store and
//! 100,000 of them hot in the cache: `authenticate` (headers → SHA-256 →
//! cache) + `admit` + `limit` (rpm, tpm, concurrency permit) + `reserve`,
//! then settle and drop, as the proxy does around a request. Reported in
//! time per request. A second case measures a cache miss (a cold key read
//! from sled, then dropped from memory again so that the next round misses
//! too).
//!
//! cargo bench --bench admission

use std::net::{IpAddr, Ipv4Addr};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use http::{HeaderMap, HeaderValue};
use tollgate::clock::Clock;
use tollgate::gate::{Ask, Bound, Gate, Pricing, hash_key, label_of};
use tollgate::meter::Price;
use tollgate::money::Pico;
use tollgate::store::{Account, KeyHash, KeyRecord, Store};

/// The allocator the binary ships with (`src/main.rs`): measured with
/// glibc's, the 1 M-key fixture spent 94 % of its time in `_int_malloc`.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Keys in the store.
const KEYS: u32 = 1_000_000;
/// Keys kept in the cache and used round-robin.
const HOT: u32 = 100_000;

/// A well-formed key for number `n` (`sk-tg-` + 48 characters).
fn key_text(n: u32) -> String {
    format!("sk-tg-{n:048}")
}

/// A key as the API would create it, with every limit the admission path
/// checks set (none of them binding in the bench).
fn record(n: u32, hash: KeyHash, now: i64) -> (KeyRecord, Account) {
    let rec = KeyRecord {
        hash,
        name: format!("bench {n}"),
        label: label_of(&key_text(n)),
        owner: None,
        plan: None,
        disabled: false,
        created_at: now,
        updated_at: now,
        expires_at: Some(now + 365 * 86_400_000),
        limit_reset: None,
        max_requests: Some(u64::MAX / 2),
        rpm: Some(1_000_000),
        tpm: Some(u64::MAX / 2),
        concurrency: Some(8),
        models: vec!["gpt-*".into(), "o*".into()],
        allowed_ips: vec![],
        max_devices: None,
        devices: vec![],
        daily_fee: None,
        metadata: None,
        imported: false,
        low_balance_alert: None,
    };
    let acct = Account {
        limit: Some(Pico::usd(1_000)),
        spent: Pico::ZERO,
        period: 0,
        period_spent: Pico::ZERO,
        requests: 0,
        fee_day: -1,
        ledger_seq: 0,
    };
    (rec, acct)
}

struct Fixture {
    dir: PathBuf,
    gate: Gate,
    /// Prebuilt request headers of the hot keys.
    hot: Vec<HeaderMap>,
    /// Prebuilt request headers of keys never loaded.
    cold: Vec<(HeaderMap, KeyHash)>,
}

fn fixture() -> Fixture {
    let dir = std::env::temp_dir().join(format!("tollgate-bench-admission-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let store = Store::open(&dir, 50).expect("store opens");
    let clock = Clock::system();
    let now = clock.now_ms();
    let started = Instant::now();
    store
        .insert_keys_bulk((0..KEYS).map(|n| record(n, hash_key(&key_text(n)), now)))
        .expect("bulk insert");
    eprintln!(
        "inserted {KEYS} keys in {:.1} s",
        started.elapsed().as_secs_f64()
    );
    // Start-up on a million keys: opening the store reads no key.
    drop(store);
    let started = Instant::now();
    let store = Store::open(&dir, 50).expect("store reopens");
    eprintln!(
        "reopened the store of {} keys in {:.1} ms",
        store.stats().keys,
        started.elapsed().as_secs_f64() * 1000.0
    );
    let started = Instant::now();
    let gate = Gate::new(store, clock, 60);
    while !gate.filter_ready() {
        std::thread::sleep(Duration::from_millis(5));
    }
    eprintln!(
        "built the filter of known keys in {:.1} ms (in the background at start-up)",
        started.elapsed().as_secs_f64() * 1000.0
    );
    let headers = |n: u32| {
        let mut h = HeaderMap::new();
        h.insert(
            http::header::AUTHORIZATION,
            HeaderValue::from_str(&format!("Bearer {}", key_text(n))).expect("header"),
        );
        h.insert(
            http::header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        );
        h
    };
    let started = Instant::now();
    for n in 0..HOT {
        gate.lookup(&hash_key(&key_text(n)), now)
            .expect("store read")
            .expect("key exists");
    }
    eprintln!(
        "warmed {HOT} keys in {:.1} s",
        started.elapsed().as_secs_f64()
    );
    assert_eq!(gate.cached(), HOT as usize);
    Fixture {
        dir,
        hot: (0..HOT).map(headers).collect(),
        cold: (HOT..KEYS)
            .map(|n| (headers(n), hash_key(&key_text(n))))
            .collect(),
        gate,
    }
}

/// A small chat request at gpt-4o-mini's price.
fn bound() -> Bound {
    Bound {
        pricing: Pricing::Tokens(Price {
            input: Pico::parse_usd("0.15").expect("price"),
            cached_input: None,
            cache_write: None,
            cache_write_1h: None,
            output: Pico::parse_usd("0.6").expect("price"),
            request: Pico::ZERO,
        }),
        prompt_tokens: 20,
        completion_tokens: 256,
        choices: 1,
        cap: true,
    }
}

/// One request through steps 1–4 and its settlement.
#[inline]
fn admit_one(gate: &Gate, headers: &HeaderMap, ip: IpAddr) {
    let key = gate.authenticate(headers, ip).expect("known key");
    let policy = gate
        .admit(
            &key,
            &Ask {
                now_ms: gate.clock().now_ms(),
                model: Some("gpt-4o-mini"),
                client_ip: ip,
                device: None,
            },
        )
        .expect("admitted");
    let permit = gate
        .limit(&key, &policy, gate.clock().now_ms())
        .expect("within limits");
    let reserved = gate.reserve(&key, &policy, &bound()).expect("reserved");
    let charged = reserved.reservation.settle(Pico(1_000_000), 120);
    drop(permit);
    std::hint::black_box(charged);
}

fn admission(c: &mut Criterion) {
    let f = fixture();
    let ip = IpAddr::V4(Ipv4Addr::new(203, 0, 113, 7));
    let mut group = c.benchmark_group("admission");
    group.throughput(Throughput::Elements(1));
    group.measurement_time(Duration::from_secs(10));

    let mut i = 0usize;
    group.bench_function("hot_1M_store_100k_cached", |b| {
        b.iter(|| {
            admit_one(&f.gate, &f.hot[i], ip);
            i += 1;
            if i == f.hot.len() {
                i = 0;
            }
        })
    });

    // Step 4 and settlement alone, on one hot key: the money path (CAS on
    // the key's committed credit, then the swap for the actual cost).
    let key = f.gate.authenticate(&f.hot[0], ip).expect("known key");
    let policy = key.policy();
    group.bench_function("reserve_settle", |b| {
        b.iter(|| {
            let reserved = f.gate.reserve(&key, &policy, &bound()).expect("reserved");
            std::hint::black_box(reserved.reservation.settle(Pico(1_000_000), 120));
        })
    });

    // A miss: the key is read from sled and put in the cache; it is then
    // dropped again (`evict`, included in the time) so every round misses.
    let mut j = 0usize;
    group.bench_function("miss_cold_key_from_sled", |b| {
        b.iter(|| {
            let (h, hash) = &f.cold[j];
            admit_one(&f.gate, h, ip);
            f.gate.evict(hash);
            j += 1;
            if j == f.cold.len() {
                j = 0;
            }
        })
    });
    group.finish();
    let dir = f.dir.clone();
    drop(f);
    let _ = std::fs::remove_dir_all(dir);
}

criterion_group!(benches, admission);
criterion_main!(benches);
