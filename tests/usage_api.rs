//! The consumption API (`/api/usage/…`, the key itself), the admin usage
//! reports and `/metrics`, over loopback with the mock upstream: every
//! report agrees with every other, with the usage records and with the
//! ledger, to the picoUSD.
//!
//! Amounts are read from the answers' JSON text with `JsonUsd` (exactly),
//! never through `f64`.

mod common;

use std::collections::BTreeMap;
use std::time::Duration;

use common::*;
use serde::Deserialize;
use serde::de::DeserializeOwned;
use serde_json::{Value, json};
use tollgate::money::{JsonUsd, Pico};
use tollgate::store::{KeyHash, LedgerKind, UsageRecord};

const HOUR: u64 = 3600;
const DAY: u64 = 86_400;

// ---- the answers, typed (amounts exact) ----

#[derive(Debug, Deserialize)]
struct Envelope<T> {
    code: bool,
    message: String,
    data: T,
}

#[derive(Debug, Deserialize)]
struct AdminData<T> {
    data: T,
}

#[derive(Debug, Deserialize)]
struct TokenUsage {
    object: String,
    name: String,
    total_granted: JsonUsd,
    total_used: JsonUsd,
    total_available: JsonUsd,
    unlimited_quota: bool,
    model_limits: BTreeMap<String, bool>,
    model_limits_enabled: bool,
    expires_at: i64,
}

#[derive(Debug, Deserialize)]
struct Summary {
    total_cost: JsonUsd,
    total_requests: u64,
    total_tokens: u64,
    prompt_tokens: u64,
    cached_tokens: u64,
    completion_tokens: u64,
    avg_latency_ms: u64,
}

#[derive(Debug, Deserialize)]
struct ModelRow {
    model: String,
    cost: JsonUsd,
    requests: u64,
    tokens: u64,
    percentage: f64,
}

#[derive(Debug, Deserialize)]
struct DayRow {
    date: String,
    cost: JsonUsd,
    requests: u64,
    tokens: u64,
}

#[derive(Debug, Deserialize)]
struct Log {
    request_id: String,
    created_at: i64,
    model: String,
    route: String,
    stream: bool,
    cost: JsonUsd,
    prompt_tokens: u64,
    cached_tokens: u64,
    completion_tokens: u64,
    total_tokens: u64,
    client_ip: Option<String>,
}

#[derive(Debug, Deserialize)]
struct Detail {
    object: String,
    start: i64,
    end: i64,
    summary: Summary,
    by_model: Vec<ModelRow>,
    by_day: Vec<DayRow>,
    recent_logs: Option<Vec<Log>>,
}

#[derive(Debug, Deserialize)]
struct Point {
    time: i64,
    cost: JsonUsd,
    requests: u64,
    tokens: u64,
}

#[derive(Debug, Deserialize)]
struct Chart {
    granularity: String,
    start: i64,
    end: i64,
    data: Vec<Point>,
}

#[derive(Debug, Deserialize)]
struct Logs {
    items: Vec<Log>,
    page: usize,
    page_size: usize,
    total: u64,
}

#[derive(Debug, Deserialize)]
struct KeyRow {
    hash: String,
    cost: JsonUsd,
    requests: u64,
}

#[derive(Debug, Deserialize)]
struct Rest {
    cost: JsonUsd,
    requests: u64,
}

#[derive(Debug, Deserialize)]
struct GatewayReport {
    object: String,
    summary: Summary,
    by_model: Vec<ModelRow>,
    by_day: Vec<DayRow>,
    by_key: Vec<KeyRow>,
    other_keys: Rest,
    keys_with_usage: usize,
}

#[derive(Debug, Deserialize)]
struct OwnerDetail {
    owner: String,
    keys: usize,
    summary: Summary,
    by_model: Vec<ModelRow>,
    recent_logs: Vec<Log>,
}

// ---- helpers ----

fn hash_bytes(hex_hash: &str) -> KeyHash {
    hex::decode(hex_hash).unwrap().try_into().unwrap()
}

fn records(gw: &TestGateway, hash: &str) -> Vec<UsageRecord> {
    gw.app().store.usage(&hash_bytes(hash), 0, 100_000).unwrap()
}

/// Σ of the ledger's effect on `spent`.
fn ledger_spent(gw: &TestGateway, hash: &str) -> i64 {
    gw.app()
        .store
        .ledger(&hash_bytes(hash), 0, 100_000)
        .unwrap()
        .iter()
        .map(|e| match e.kind {
            LedgerKind::Deduct | LedgerKind::DailyFee => e.amount.0,
            LedgerKind::Refund => -e.amount.0,
            LedgerKind::Topup => 0,
        })
        .sum()
}

/// GET with these headers; the status, headers and the body parsed as `T`
/// (exact amounts), or a panic showing the body.
async fn get_as<T: DeserializeOwned>(
    gw: &TestGateway,
    path: &str,
    auth: &str,
) -> (u16, http::HeaderMap, T) {
    let (s, h, body) = send_raw(raw_request(
        "GET",
        &gw.url(path),
        &[("authorization", auth)],
        bytes::Bytes::new(),
    ))
    .await;
    let v = serde_json::from_slice(&body)
        .unwrap_or_else(|e| panic!("GET {path} → {s}: {e}: {}", String::from_utf8_lossy(&body)));
    (s, h, v)
}

/// A consumption API answer's `data`.
async fn own<T: DeserializeOwned>(gw: &TestGateway, key: &str, path: &str) -> T {
    let (s, _, env): (u16, _, Envelope<T>) = get_as(gw, path, &bearer(key)).await;
    assert_eq!(s, 200, "{path}");
    assert!(env.code);
    assert_eq!(env.message, "ok");
    env.data
}

/// An admin report's `data`.
async fn admin<T: DeserializeOwned>(gw: &TestGateway, path: &str) -> T {
    let (s, _, d): (u16, _, AdminData<T>) =
        get_as(gw, path, &format!("Bearer {}", gw.admin_token)).await;
    assert_eq!(s, 200, "{path}");
    d.data
}

async fn get_json(gw: &TestGateway, path: &str, headers: &[(&str, &str)]) -> (u16, Value) {
    let (s, _, v) = send("GET", &gw.url(path), headers, None).await;
    (s, v)
}

fn assert_bad(status: u16, v: &Value, code: &str, param: &str) {
    assert_error(status, v, 400, code);
    assert_eq!(v["error"]["param"], param, "{v}");
}

async fn chat_req(gw: &TestGateway, key: &str, stream: bool, cached: Option<&str>) {
    let auth = bearer(key);
    let mut h = vec![("authorization", auth.as_str())];
    if let Some(c) = cached {
        h.push(("x-mock-cached-tokens", c));
    }
    let (s, _, body) = send_raw(request(
        "POST",
        &gw.url("/v1/chat/completions"),
        &h,
        Some(chat("demo-chat", stream)),
    ))
    .await;
    assert_eq!(s, 200, "{}", String::from_utf8_lossy(&body));
}

async fn embed_req(gw: &TestGateway, key: &str) {
    let (s, _, v) = send(
        "POST",
        &gw.url("/v1/embeddings"),
        &[("authorization", &bearer(key))],
        Some(json!({"model": "demo-embed", "input": ["usage", "reports"]})),
    )
    .await;
    assert_eq!(s, 200, "{v}");
}

async fn credit(gw: &TestGateway, hash: &str, kind: &str, amount: &str) {
    let (s, _, v) = send(
        "POST",
        &gw.url(&format!("/api/v1/keys/{hash}/credits")),
        &[("authorization", &format!("Bearer {}", gw.admin_token))],
        Some(json!({"kind": kind, "amount": amount, "reason": "usage test"})),
    )
    .await;
    assert_eq!(s, 200, "{v}");
}

/// Waits until nothing is in flight, then until the store has everything.
async fn settle(gw: &TestGateway) {
    let app = gw.app().clone();
    assert!(eventually(Duration::from_secs(5), || { app.metrics.in_flight() == 0 }).await);
    gw.flush().await;
}

fn sum_cost<'a>(it: impl IntoIterator<Item = &'a JsonUsd>) -> i64 {
    it.into_iter().map(|c| c.0.0).sum()
}

// ---- tests ----

/// Traffic on three days and several hours, stream and not, chat and
/// embeddings, cached tokens, and credits: the detail, the charts, the logs
/// pages, the admin per-key, owner and gateway reports, the records and the
/// ledger all agree to the picoUSD.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reports_agree_with_records_and_ledger() {
    let gw = TestGateway::start();
    let (key_a, hash_a) = gw
        .create_key(
            json!({"name": "ann-main", "owner": "ann", "limit": "10", "models": ["demo-*"]}),
        )
        .await;
    let (key_b, hash_b) = gw
        .create_key(json!({"name": "ann-side", "owner": "ann"}))
        .await;
    let (key_c, hash_c) = gw.create_key(json!({"name": "bob", "owner": "bob"})).await;
    let t0 = gw.clock.now_secs();

    // Day 0.
    chat_req(&gw, &key_a, false, None).await;
    chat_req(&gw, &key_a, false, Some("3")).await;
    chat_req(&gw, &key_a, true, None).await;
    embed_req(&gw, &key_a).await;
    chat_req(&gw, &key_b, true, Some("2")).await;
    credit(&gw, &hash_a, "deduct", "0.001").await;
    credit(&gw, &hash_a, "refund", "0.0002").await;
    credit(&gw, &hash_a, "topup", "1").await;
    settle(&gw).await;
    // Day 1, three hours later in the day.
    gw.clock.advance(Duration::from_secs(DAY + 3 * HOUR));
    chat_req(&gw, &key_a, true, Some("4")).await;
    chat_req(&gw, &key_a, false, None).await;
    embed_req(&gw, &key_c).await;
    chat_req(&gw, &key_c, false, None).await;
    settle(&gw).await;
    // Two hours later.
    gw.clock.advance(Duration::from_secs(2 * HOUR));
    chat_req(&gw, &key_a, false, Some("1")).await;
    settle(&gw).await;

    let recs_a = records(&gw, &hash_a);
    let recs_b = records(&gw, &hash_b);
    let recs_c = records(&gw, &hash_c);
    assert_eq!((recs_a.len(), recs_b.len(), recs_c.len()), (7, 1, 2));
    let cost = |rs: &[UsageRecord]| rs.iter().map(|r| r.cost.0).sum::<i64>();
    let (cost_a, cost_b, cost_c) = (cost(&recs_a), cost(&recs_b), cost(&recs_c));
    assert!(cost_a > 0 && cost_b > 0 && cost_c > 0);
    assert!(recs_a.iter().any(|r| r.cached_tokens == 4));

    // The key's lifetime usage = Σ records + ledger effects.
    #[derive(Deserialize)]
    struct KeyUsage {
        usage: JsonUsd,
    }
    let key_view: KeyUsage = admin(&gw, &format!("/api/v1/keys/{hash_a}")).await;
    let spent = key_view.usage.0;
    let ledger = ledger_spent(&gw, &hash_a);
    assert_eq!(ledger, Pico::parse_usd("0.0008").unwrap().0);
    assert_eq!(spent.0 - ledger, cost_a, "usage − ledger = Σ records");

    // /api/usage/token/
    let tu: TokenUsage = own(&gw, &key_a, "/api/usage/token/").await;
    assert_eq!(tu.object, "token_usage");
    assert_eq!(tu.name, "ann-main");
    assert!(!tu.unlimited_quota);
    assert_eq!(tu.total_granted.0, Pico::parse_usd("11").unwrap());
    assert_eq!(tu.total_used.0, spent);
    assert_eq!(tu.total_available.0.0, tu.total_granted.0.0 - spent.0);
    assert!(tu.model_limits_enabled);
    assert_eq!(tu.model_limits.get("demo-*"), Some(&true));
    assert_eq!(tu.expires_at, 0);
    let tu_b: TokenUsage = own(&gw, &key_b, "/api/usage/token").await;
    assert!(tu_b.unlimited_quota);
    assert_eq!(tu_b.total_used.0.0, cost_b);
    assert!(!tu_b.model_limits_enabled);

    // Detail (default range: the last 30 days).
    let d: Detail = own(&gw, &key_a, "/api/usage/token/detail").await;
    assert_eq!(d.object, "usage_detail");
    assert_eq!(d.summary.total_cost.0.0, cost_a, "summary = Σ records");
    assert_eq!(d.summary.total_requests, 7);
    let prompt: u64 = recs_a.iter().map(|r| r.prompt_tokens).sum();
    let completion: u64 = recs_a.iter().map(|r| r.completion_tokens).sum();
    let cached: u64 = recs_a.iter().map(|r| r.cached_tokens).sum();
    let latency: u64 = recs_a.iter().map(|r| u64::from(r.latency_ms)).sum();
    assert_eq!(d.summary.prompt_tokens, prompt);
    assert_eq!(d.summary.completion_tokens, completion);
    assert_eq!(d.summary.cached_tokens, cached);
    assert_eq!(d.summary.total_tokens, prompt + completion);
    assert_eq!(d.summary.avg_latency_ms, latency / 7);
    assert_eq!(sum_cost(d.by_model.iter().map(|m| &m.cost)), cost_a);
    assert_eq!(d.by_model.iter().map(|m| m.requests).sum::<u64>(), 7);
    assert_eq!(
        d.by_model.iter().map(|m| m.tokens).sum::<u64>(),
        d.summary.total_tokens
    );
    let chat_cost: i64 = recs_a
        .iter()
        .filter(|r| r.model == "demo-chat")
        .map(|r| r.cost.0)
        .sum();
    let chat_row = d.by_model.iter().find(|m| m.model == "demo-chat").unwrap();
    assert_eq!(chat_row.cost.0.0, chat_cost);
    assert_eq!(chat_row.requests, 6);
    let pct: f64 = d.by_model.iter().map(|m| m.percentage).sum();
    assert!((pct - 100.0).abs() <= 0.011, "{pct}");
    assert_eq!(d.by_model[0].model, "demo-chat", "most expensive first");
    // by_day: dense UTC days over the range, summing to the total; usage on
    // exactly the two days the traffic fell on.
    let first_day = d.start.div_euclid(DAY as i64);
    let last_day = (d.end - 1).div_euclid(DAY as i64);
    assert_eq!(d.by_day.len() as i64, last_day - first_day + 1);
    assert_eq!(sum_cost(d.by_day.iter().map(|x| &x.cost)), cost_a);
    assert_eq!(d.by_day.iter().map(|x| x.requests).sum::<u64>(), 7);
    assert_eq!(
        d.by_day.iter().map(|x| x.tokens).sum::<u64>(),
        prompt + completion
    );
    let used_days: Vec<&DayRow> = d.by_day.iter().filter(|x| x.requests > 0).collect();
    let day_of = |secs: i64| {
        let (y, m, dd) = tollgate::clock::civil_from_days(secs.div_euclid(DAY as i64));
        format!("{y:04}-{m:02}-{dd:02}")
    };
    let mut expected_days: Vec<String> = recs_a.iter().map(|r| day_of(r.at_ms / 1000)).collect();
    expected_days.dedup();
    expected_days.sort();
    expected_days.dedup();
    assert_eq!(
        used_days.iter().map(|x| x.date.clone()).collect::<Vec<_>>(),
        expected_days
    );
    let mut dates: Vec<&str> = d.by_day.iter().map(|x| x.date.as_str()).collect();
    dates.dedup();
    assert_eq!(dates.len(), d.by_day.len(), "no day twice");
    // recent_logs: the newest records, in order, the same as the store's.
    let recent = d.recent_logs.as_ref().unwrap();
    assert_eq!(
        recent.iter().map(|l| &l.request_id).collect::<Vec<_>>(),
        recs_a.iter().map(|r| &r.request_id).collect::<Vec<_>>()
    );
    assert!(
        recent.iter().all(|l| l.client_ip.is_none()),
        "no IPs to the key"
    );
    assert!(
        recent
            .windows(2)
            .all(|w| w[0].created_at >= w[1].created_at)
    );
    let first = &recent[0];
    let newest = &recs_a[0];
    assert_eq!(first.model, newest.model);
    assert_eq!(first.route, "chat");
    assert_eq!(first.stream, newest.stream);
    assert_eq!(first.cached_tokens, 1);
    assert_eq!(first.prompt_tokens, newest.prompt_tokens);
    assert_eq!(first.completion_tokens, newest.completion_tokens);
    assert_eq!(
        first.total_tokens,
        newest.prompt_tokens + newest.completion_tokens
    );
    assert_eq!(first.cost.0, newest.cost);
    assert_eq!(first.created_at, newest.at_ms / 1000);

    // An explicit range around day 1 only: just its three records.
    let day1 = t0 + (DAY + 3 * HOUR) as i64;
    let d1: Detail = own(
        &gw,
        &key_a,
        &format!(
            "/api/usage/token/detail?start={}&end={}",
            day1 - 60,
            day1 + (3 * HOUR) as i64
        ),
    )
    .await;
    let in_day1: Vec<&UsageRecord> = recs_a
        .iter()
        .filter(|r| r.at_ms / 1000 >= t0 + DAY as i64)
        .collect();
    assert_eq!(in_day1.len(), 3);
    assert_eq!(d1.summary.total_requests, 3);
    assert_eq!(
        d1.summary.total_cost.0.0,
        in_day1.iter().map(|r| r.cost.0).sum::<i64>()
    );
    assert_eq!(d1.start % 3600, 0, "widened to whole hours");
    assert_eq!(d1.end % 3600, 0);

    // Charts: daily and hourly, dense, each summing to the detail.
    let range = format!("start={}&end={}", t0 - 3600, gw.clock.now_secs() + 60);
    for g in ["day", "hour"] {
        let c: Chart = own(
            &gw,
            &key_a,
            &format!("/api/usage/token/chart?{range}&granularity={g}"),
        )
        .await;
        assert_eq!(c.granularity, g);
        let step = if g == "day" { DAY } else { HOUR } as i64;
        assert!(
            c.data.windows(2).all(|w| w[1].time - w[0].time == step),
            "no gaps"
        );
        assert!(c.data[0].time <= c.start && c.data.last().unwrap().time < c.end);
        assert!(c.data.last().unwrap().time + step >= c.end);
        assert_eq!(sum_cost(c.data.iter().map(|p| &p.cost)), cost_a);
        assert_eq!(c.data.iter().map(|p| p.requests).sum::<u64>(), 7);
        assert_eq!(
            c.data.iter().map(|p| p.tokens).sum::<u64>(),
            prompt + completion
        );
        if g == "hour" {
            // Traffic in three distinct hours (day 0, day 1 +3h, +2h).
            let busy = c.data.iter().filter(|p| p.requests > 0).count();
            assert!((3..=4).contains(&busy), "{busy}");
            assert!(c.data.iter().any(|p| p.requests == 0), "zero buckets kept");
        }
    }

    // Logs: pages of 3, newest first, = the records; total from the account.
    let mut all = Vec::new();
    for page in 1..=3 {
        let l: Logs = own(
            &gw,
            &key_a,
            &format!("/api/usage/token/logs?page={page}&page_size=3"),
        )
        .await;
        assert_eq!((l.page, l.page_size, l.total), (page, 3, 7));
        all.extend(l.items);
    }
    assert_eq!(
        all.iter().map(|l| &l.request_id).collect::<Vec<_>>(),
        recs_a.iter().map(|r| &r.request_id).collect::<Vec<_>>()
    );
    assert_eq!(sum_cost(all.iter().map(|l| &l.cost)), cost_a);
    let past: Logs = own(&gw, &key_a, "/api/usage/token/logs?page=99&page_size=100").await;
    assert!(past.items.is_empty());
    assert_eq!(past.total, 7);
    let dflt: Logs = own(&gw, &key_a, "/api/usage/token/logs").await;
    assert_eq!((dflt.page, dflt.page_size, dflt.items.len()), (1, 20, 7));

    // The admin sees the same numbers for the key (plus client IPs).
    let ad: Detail = admin(&gw, &format!("/api/v1/keys/{hash_a}/usage")).await;
    assert_eq!(ad.summary.total_cost.0.0, cost_a);
    assert_eq!(ad.summary.total_requests, 7);
    assert!(
        ad.recent_logs
            .unwrap()
            .iter()
            .all(|l| l.client_ip.as_deref() == Some("127.0.0.1"))
    );
    let ac: Chart = admin(
        &gw,
        &format!("/api/v1/keys/{hash_a}/usage/chart?{range}&granularity=hour"),
    )
    .await;
    assert_eq!(sum_cost(ac.data.iter().map(|p| &p.cost)), cost_a);
    let al: Logs = admin(
        &gw,
        &format!("/api/v1/keys/{hash_a}/usage/logs?page=2&page_size=5"),
    )
    .await;
    assert_eq!(al.total, 7);
    assert_eq!(
        al.items.iter().map(|l| &l.request_id).collect::<Vec<_>>(),
        recs_a[5..]
            .iter()
            .map(|r| &r.request_id)
            .collect::<Vec<_>>()
    );

    // Owner: ann's two keys merged.
    let od: OwnerDetail = admin(&gw, "/api/v1/owners/ann/usage").await;
    assert_eq!(od.owner, "ann");
    assert_eq!(od.keys, 2);
    assert_eq!(od.summary.total_cost.0.0, cost_a + cost_b);
    assert_eq!(od.summary.total_requests, 8);
    assert_eq!(
        sum_cost(od.by_model.iter().map(|m| &m.cost)),
        cost_a + cost_b
    );
    assert_eq!(od.recent_logs.len(), 8);
    assert!(
        od.recent_logs
            .windows(2)
            .all(|w| w[0].created_at >= w[1].created_at)
    );
    let oc: Chart = admin(&gw, &format!("/api/v1/owners/ann/usage/chart?{range}")).await;
    assert_eq!(sum_cost(oc.data.iter().map(|p| &p.cost)), cost_a + cost_b);

    // Gateway: totals from the gateway rollups = Σ of every key's records;
    // by key, most expensive first; Σ shown + other = total.
    let total = cost_a + cost_b + cost_c;
    let g: GatewayReport = admin(&gw, &format!("/api/v1/usage?{range}&top=10")).await;
    assert_eq!(g.object, "gateway_usage");
    assert_eq!(g.summary.total_cost.0.0, total);
    assert_eq!(g.summary.total_requests, 10);
    assert_eq!(sum_cost(g.by_model.iter().map(|m| &m.cost)), total);
    assert_eq!(sum_cost(g.by_day.iter().map(|x| &x.cost)), total);
    assert_eq!(g.keys_with_usage, 3);
    assert_eq!(g.by_key.len(), 3);
    let by: BTreeMap<&str, i64> = g
        .by_key
        .iter()
        .map(|k| (k.hash.as_str(), k.cost.0.0))
        .collect();
    assert_eq!(by[hash_a.as_str()], cost_a);
    assert_eq!(by[hash_b.as_str()], cost_b);
    assert_eq!(by[hash_c.as_str()], cost_c);
    assert!(g.by_key.windows(2).all(|w| w[0].cost.0 >= w[1].cost.0));
    assert_eq!(
        (g.other_keys.cost.0, g.other_keys.requests),
        (Pico::ZERO, 0)
    );
    let top1: GatewayReport = admin(&gw, &format!("/api/v1/usage?{range}&top=1")).await;
    assert_eq!(top1.by_key.len(), 1);
    assert_eq!(top1.by_key[0].hash, g.by_key[0].hash);
    assert_eq!(
        top1.by_key[0].cost.0.0 + top1.other_keys.cost.0.0,
        total,
        "Σ shown + other = total"
    );
    assert_eq!(top1.by_key[0].requests + top1.other_keys.requests, 10);

    // Each key sees only itself.
    let db: Detail = own(&gw, &key_b, "/api/usage/token/detail").await;
    assert_eq!(db.summary.total_cost.0.0, cost_b);
    assert_eq!(db.summary.total_requests, 1);
    let lb: Logs = own(&gw, &key_b, "/api/usage/token/logs").await;
    assert_eq!(lb.total, 1);
    assert_eq!(lb.items[0].request_id, recs_b[0].request_id);
}

/// Every bad input is a precise 4xx in OpenAI's shape; nothing about
/// another key is reachable.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_and_isolation() {
    let gw = TestGateway::start();
    let (key, hash) = gw.create_key(json!({"name": "mine"})).await;
    let (other_key, other_hash) = gw.create_key(json!({"name": "theirs"})).await;
    chat_req(&gw, &other_key, false, None).await;
    settle(&gw).await;
    let auth = bearer(&key);
    let h = [("authorization", auth.as_str())];
    let now = gw.clock.now_secs();

    for (query, code, param) in [
        ("start=abc", "invalid_query", "start"),
        ("end=1.5e9", "invalid_query", "end"),
        ("start=-5", "invalid_query", "start"),
        ("start=", "invalid_query", "start"),
        ("start=99999999999999999999999", "invalid_query", "start"),
        ("start=0", "invalid_range", "start"),
        ("start=1000&end=2000", "invalid_range", "start"),
        ("end=1500000000", "invalid_range", "end"),
        // 18 digits: seconds × 1000 does not fit in i64 (item 13).
        ("start=999999999999999999", "invalid_range", "start"),
        ("end=999999999999999999", "invalid_range", "end"),
    ] {
        let (s, v) = get_json(&gw, &format!("/api/usage/token/detail?{query}"), &h).await;
        assert_bad(s, &v, code, param);
    }
    let cases = [
        // Inverted.
        (
            format!("start={now}&end={}", now - 3600),
            "invalid_range",
            "start",
        ),
        // Empty.
        (format!("start={now}&end={now}"), "invalid_range", "start"),
        // Over 400 days.
        (
            format!("start={}&end={now}", now - 401 * DAY as i64),
            "invalid_range",
            "end",
        ),
        // Milliseconds sent as seconds: far in the future.
        (format!("end={}", now * 1000), "invalid_range", "end"),
        (
            format!("end={}", now + 2 * DAY as i64),
            "invalid_range",
            "end",
        ),
    ];
    for (query, code, param) in cases {
        let (s, v) = get_json(&gw, &format!("/api/usage/token/detail?{query}"), &h).await;
        assert_bad(s, &v, code, param);
        // The admin's reports read the range the same way.
        let (s, v) = get_json(
            &gw,
            &format!("/api/v1/usage?{query}"),
            &[("authorization", &format!("Bearer {}", gw.admin_token))],
        )
        .await;
        assert_bad(s, &v, code, param);
    }
    // 400 days exactly is fine.
    let (s, v) = get_json(
        &gw,
        &format!(
            "/api/usage/token/detail?start={}&end={now}",
            now - 400 * DAY as i64
        ),
        &h,
    )
    .await;
    assert_eq!(s, 200, "{v}");

    for (query, code, param) in [
        ("granularity=week", "invalid_granularity", "granularity"),
        ("granularity=", "invalid_granularity", "granularity"),
        (
            "granularity=hour&start=1700000000&end=1705000000",
            "invalid_granularity",
            "granularity",
        ),
    ] {
        let (s, v) = get_json(&gw, &format!("/api/usage/token/chart?{query}"), &h).await;
        assert_bad(s, &v, code, param);
    }
    for (query, param) in [
        ("page_size=101", "page_size"),
        ("page_size=1000000", "page_size"),
        ("page_size=0", "page_size"),
        ("page=0", "page"),
        ("page=-1", "page"),
        ("page=x", "page"),
    ] {
        let (s, v) = get_json(&gw, &format!("/api/usage/token/logs?{query}"), &h).await;
        assert_bad(s, &v, "invalid_query", param);
    }
    // Another key's hash: not a parameter, not a path.
    for path in [
        format!("/api/usage/token/detail?hash={other_hash}"),
        format!("/api/usage/token/logs?key={other_hash}"),
        format!("/api/usage/token/?token_id={other_hash}"),
        "/api/usage/token/detail?start=1700000000&start=1700000001".to_owned(),
        "/api/usage/token/chart?color=red".to_owned(),
    ] {
        let (s, v) = get_json(&gw, &path, &h).await;
        assert_eq!(s, 400, "{path}: {v}");
        let text = v.to_string();
        assert!(!text.contains("theirs"), "{text}");
    }
    for path in [
        format!("/api/usage/token/{other_hash}"),
        format!("/api/usage/token/detail/{other_hash}"),
        format!("/api/usage/{other_hash}"),
    ] {
        let (s, v) = get_json(&gw, &path, &h).await;
        assert_error(s, &v, 404, "not_found");
    }
    // The key's own logs are its own: the other key's request is not there.
    let (_, _, l): (u16, _, Envelope<Logs>) = get_as(&gw, "/api/usage/token/logs", &auth).await;
    assert_eq!(l.data.total, 0);
    assert!(l.data.items.is_empty());
    let (_, _, d): (u16, _, Envelope<Detail>) = get_as(&gw, "/api/usage/token/detail", &auth).await;
    assert_eq!(d.data.summary.total_requests, 0);
    assert_eq!(d.data.summary.total_cost.0, Pico::ZERO);

    // Authentication: none, unknown, the admin token are not keys.
    for headers in [
        vec![],
        vec![("authorization", "Bearer sk-tg-not-a-real-key")],
        vec![(
            "authorization",
            "Bearer test-admin-token-0123456789abcdefghij",
        )],
    ] {
        let (s, v) = get_json(&gw, "/api/usage/token/detail", &headers).await;
        assert_error(s, &v, 401, "invalid_api_key");
    }
    // Writes are not allowed.
    let (s, _, v) = send("POST", &gw.url("/api/usage/token/detail"), &h, None).await;
    assert_error(s, &v, 405, "method_not_allowed");

    // Admin reports need the admin token; a key is not one.
    for path in [
        format!("/api/v1/keys/{other_hash}/usage"),
        format!("/api/v1/keys/{other_hash}/usage/chart"),
        format!("/api/v1/keys/{other_hash}/usage/logs"),
        "/api/v1/owners/someone/usage".to_owned(),
        "/api/v1/usage".to_owned(),
    ] {
        let (s, v) = get_json(&gw, &path, &h).await;
        assert_error(s, &v, 401, "invalid_api_key");
        assert!(!v.to_string().contains("theirs"));
    }
    let ah = format!("Bearer {}", gw.admin_token);
    let a = [("authorization", ah.as_str())];
    let (s, v) = get_json(&gw, "/api/v1/keys/ABC/usage", &a).await;
    assert_bad(s, &v, "invalid_hash", "hash");
    let (s, v) = get_json(&gw, &format!("/api/v1/keys/{}/usage", "0".repeat(64)), &a).await;
    assert_error(s, &v, 404, "not_found");
    let (s, v) = get_json(
        &gw,
        &format!("/api/v1/keys/{hash}/usage/logs?page_size=101"),
        &a,
    )
    .await;
    assert_bad(s, &v, "invalid_query", "page_size");
    let (s, v) = get_json(&gw, "/api/v1/usage?top=100000", &a).await;
    assert_bad(s, &v, "invalid_query", "top");
    let (s, v) = get_json(&gw, "/api/v1/owners/ann/usage/logs", &a).await;
    assert_error(s, &v, 404, "not_found");
    let (s, v) = get_json(&gw, "/api/v1/owners/%ff/usage", &a).await;
    assert_eq!(s, 400, "{v}");
}

/// CORS on `/api/usage/*`: allowed origins echoed (with `vary: origin`),
/// preflight answered, errors readable; nothing for other origins.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cors_for_allowed_origins_only() {
    let gw = TestGateway::start_with("[cors]\nallowed_origins = [\"https://portal.example\"]\n");
    let key = gw.open_key().await;
    let auth = bearer(&key);
    let allowed = "https://portal.example";

    let (s, h, _) = send_raw(raw_request(
        "OPTIONS",
        &gw.url("/api/usage/token/detail"),
        &[
            ("origin", allowed),
            ("access-control-request-method", "GET"),
            ("access-control-request-headers", "authorization"),
        ],
        bytes::Bytes::new(),
    ))
    .await;
    assert_eq!(s, 204);
    assert_eq!(h["access-control-allow-origin"], allowed);
    assert_eq!(h["access-control-allow-methods"], "GET, POST, OPTIONS");
    let allow_headers = h["access-control-allow-headers"].to_str().unwrap();
    assert!(allow_headers.contains("authorization") && allow_headers.contains("content-type"));
    assert_eq!(h["vary"], "origin");

    for path in [
        "/api/usage/token/",
        "/api/usage/token/detail",
        "/api/usage/token/chart",
        "/api/usage/token/logs",
    ] {
        let (s, h, _) = send_raw(raw_request(
            "GET",
            &gw.url(path),
            &[("authorization", &auth), ("origin", allowed)],
            bytes::Bytes::new(),
        ))
        .await;
        assert_eq!(s, 200, "{path}");
        assert_eq!(h["access-control-allow-origin"], allowed, "{path}");
        assert_eq!(h["vary"], "origin");
    }
    // An error is readable by the portal too.
    let (s, h, _) = send_raw(raw_request(
        "GET",
        &gw.url("/api/usage/token/detail?start=x"),
        &[("authorization", &auth), ("origin", allowed)],
        bytes::Bytes::new(),
    ))
    .await;
    assert_eq!(s, 400);
    assert_eq!(h["access-control-allow-origin"], allowed);

    // Another origin: no CORS headers at all, preflight or not.
    for method in ["OPTIONS", "GET"] {
        let (_, h, _) = send_raw(raw_request(
            method,
            &gw.url("/api/usage/token/detail"),
            &[
                ("authorization", &auth),
                ("origin", "https://evil.example"),
                ("access-control-request-method", "GET"),
            ],
            bytes::Bytes::new(),
        ))
        .await;
        assert!(
            h.keys().all(|k| !k.as_str().starts_with("access-control-")),
            "{method}: {h:?}"
        );
    }

    // `*` allows any origin, echoed.
    let any = TestGateway::start_with("[cors]\nallowed_origins = [\"*\"]\n");
    let key = any.open_key().await;
    let (s, h, _) = send_raw(raw_request(
        "GET",
        &any.url("/api/usage/token/"),
        &[
            ("authorization", &bearer(&key)),
            ("origin", "https://a.example"),
        ],
        bytes::Bytes::new(),
    ))
    .await;
    assert_eq!(s, 200);
    assert_eq!(h["access-control-allow-origin"], "https://a.example");
}

/// `storage.usage_retention_days`: the sweeper removes old records, keeps
/// the rollups (reports still count them) and the logs total follows.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retention_prunes_records_and_keeps_rollups() {
    let gw = TestGateway::start_mode(tollgate::config::RuntimeMode::PerCore, "", |c| {
        c.storage.usage_retention_days = 1;
        c.limits.sweep_interval = tollgate::config::Dur(Duration::from_millis(50));
    });
    let (key, hash) = gw.create_key(json!({"name": "old"})).await;
    chat_req(&gw, &key, false, None).await;
    chat_req(&gw, &key, true, Some("2")).await;
    settle(&gw).await;
    let old = records(&gw, &hash);
    assert_eq!(old.len(), 2);
    let t0 = gw.clock.now_secs();

    gw.clock.advance(Duration::from_secs(2 * DAY));
    chat_req(&gw, &key, false, None).await;
    settle(&gw).await;
    assert!(
        eventually(Duration::from_secs(5), || records(&gw, &hash).len() == 1).await,
        "the sweeper prunes records older than a day"
    );
    let left = records(&gw, &hash);
    assert!(old.iter().all(|o| o.request_id != left[0].request_id));
    assert_eq!(gw.app().store.pruned_usage(&hash_bytes(&hash)).unwrap(), 2);

    // Reports still count everything: they read the rollups.
    let all_cost: i64 = old.iter().chain(&left).map(|r| r.cost.0).sum();
    let d: Detail = own(
        &gw,
        &key,
        &format!("/api/usage/token/detail?start={}", t0 - 3600),
    )
    .await;
    assert_eq!(d.summary.total_requests, 3);
    assert_eq!(d.summary.total_cost.0.0, all_cost);
    let (_, acct) = gw.app().store.key(&hash_bytes(&hash)).unwrap().unwrap();
    assert_eq!(acct.requests, 3);
    assert_eq!(acct.spent.0, all_cost);
    // Logs: what is still stored.
    let l: Logs = own(&gw, &key, "/api/usage/token/logs").await;
    assert_eq!(l.total, 1);
    assert_eq!(l.items.len(), 1);
    assert_eq!(l.items[0].request_id, left[0].request_id);
    assert_eq!(d.recent_logs.unwrap().len(), 1);
}

/// `/metrics` after traffic: every family the issue lists, the cost counter
/// exact and equal to the records, families grouped, no key or hash.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_after_traffic() {
    let gw = TestGateway::start();
    let (key, hash) = gw.create_key(json!({"name": "metered"})).await;
    chat_req(&gw, &key, false, Some("2")).await;
    chat_req(&gw, &key, true, None).await;
    embed_req(&gw, &key).await;
    let (s, _, _) = send(
        "POST",
        &gw.url("/v1/chat/completions"),
        &[("authorization", "Bearer sk-tg-wrong")],
        Some(chat("demo-chat", false)),
    )
    .await;
    assert_eq!(s, 401);
    settle(&gw).await;
    let recs = records(&gw, &hash);
    assert_eq!(recs.len(), 3);

    let (s, h, body) = send_raw(raw_request(
        "GET",
        &gw.url("/metrics"),
        &[],
        bytes::Bytes::new(),
    ))
    .await;
    assert_eq!(s, 200);
    assert!(
        h["content-type"]
            .to_str()
            .unwrap()
            .starts_with("text/plain")
    );
    let text = String::from_utf8(body.to_vec()).unwrap();
    let value = |line_start: &str| -> String {
        text.lines()
            .find(|l| l.starts_with(line_start) && l[line_start.len()..].starts_with(' '))
            .unwrap_or_else(|| panic!("no `{line_start}` in\n{text}"))
            .rsplit(' ')
            .next()
            .unwrap()
            .to_owned()
    };
    let num = |line_start: &str| -> f64 { value(line_start).parse().unwrap() };
    assert_eq!(
        num("tollgate_requests_total{route=\"chat\",status=\"2xx\"}"),
        2.0
    );
    assert_eq!(
        num("tollgate_requests_total{route=\"embeddings\",status=\"2xx\"}"),
        1.0
    );
    assert_eq!(
        num("tollgate_requests_total{route=\"chat\",status=\"4xx\"}"),
        1.0
    );
    assert_eq!(num("tollgate_request_duration_seconds_count"), 4.0);
    assert_eq!(
        num("tollgate_request_duration_seconds_bucket{le=\"+Inf\"}"),
        4.0
    );
    assert_eq!(num("tollgate_time_to_first_byte_seconds_count"), 3.0);
    assert_eq!(num("tollgate_in_flight_requests"), 0.0);
    // Refusals are counted by code and origin, never by message text.
    assert_eq!(
        num("tollgate_rejections_total{code=\"invalid_api_key\",origin=\"client\"}"),
        1.0
    );
    assert!(
        text.lines()
            .filter(|l| l.starts_with("tollgate_rejections_total{"))
            .all(|l| l.contains("code=\"") && l.contains("origin=\"")),
        "{text}"
    );
    assert_eq!(
        num("tollgate_metered_requests_total{model=\"demo-chat\"}"),
        2.0
    );
    assert_eq!(
        num("tollgate_upstream_requests_total{upstream=\"mock\"}"),
        3.0
    );
    assert_eq!(
        num("tollgate_upstream_failures_total{upstream=\"mock\"}"),
        0.0
    );
    assert_eq!(
        num("tollgate_upstream_failovers_total{upstream=\"mock\"}"),
        0.0
    );
    for model in ["demo-chat", "demo-embed"] {
        let of = |f: &dyn Fn(&UsageRecord) -> u64| -> u64 {
            recs.iter().filter(|r| r.model == model).map(f).sum()
        };
        let prompt = of(&|r| r.prompt_tokens);
        assert_eq!(
            num(&format!(
                "tollgate_tokens_total{{model=\"{model}\",kind=\"prompt\"}}"
            )),
            prompt as f64
        );
        assert_eq!(
            num(&format!(
                "tollgate_tokens_total{{model=\"{model}\",kind=\"completion\"}}"
            )),
            of(&|r| r.completion_tokens) as f64
        );
        assert_eq!(
            num(&format!(
                "tollgate_tokens_total{{model=\"{model}\",kind=\"cached\"}}"
            )),
            of(&|r| r.cached_tokens) as f64
        );
        // The cost counter is the exact decimal of Σ records.
        let cost: i64 = recs
            .iter()
            .filter(|r| r.model == model)
            .map(|r| r.cost.0)
            .sum();
        assert_eq!(
            Pico::parse_usd(&value(&format!(
                "tollgate_cost_usd_total{{model=\"{model}\"}}"
            )))
            .unwrap(),
            Pico(cost)
        );
    }
    num("tollgate_store_queue_depth");
    assert!(num("tollgate_store_batches_total") >= 1.0);
    assert!(num("tollgate_store_records_total") >= 3.0);
    num("tollgate_store_last_batch_size");
    assert!(num("tollgate_store_flush_seconds_count") >= 1.0);
    num("tollgate_store_flush_seconds_sum");
    assert!(num("tollgate_keys_cached") >= 1.0);
    assert_eq!(num("tollgate_keys_stored"), 1.0);

    // Never a key or its hash (nor a part of either).
    assert!(!text.contains(&hash) && !text.contains(&hash[..16]));
    assert!(!text.contains(&key) && !text.contains("sk-tg-"));
    // Each family's samples form one group, after its TYPE line.
    let mut seen: Vec<String> = Vec::new();
    for line in text.lines().filter(|l| !l.starts_with('#')) {
        let name = line.split(['{', ' ']).next().unwrap();
        let family = name
            .strip_suffix("_bucket")
            .or_else(|| name.strip_suffix("_sum"))
            .or_else(|| name.strip_suffix("_count"))
            .unwrap_or(name)
            .to_owned();
        if seen.last() != Some(&family) {
            assert!(!seen.contains(&family), "`{family}` split in two groups");
            seen.push(family);
        }
    }
}
