//! Money over loopback: reservation never overspends, every request is
//! charged exactly once and exactly (or by a stated estimate), and what is
//! spent always equals the usage records plus the ledger — also after a
//! SIGKILL.

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::*;
use http_body_util::BodyExt;
use serde_json::{Value, json};
use tollgate::config::RuntimeMode;
use tollgate::meter::{Price, Usage};
use tollgate::money::Pico;
use tollgate::store::{KeyHash, LedgerKind, UsageRecord};

both_modes!(
    concurrent_streams_never_overspend,
    streamed_usage_is_metered_exactly_and_withheld,
    non_streamed_usage_with_cached_and_reasoning_tokens,
    cut_streams_are_charged_an_estimate,
    client_disconnect_cancel_and_drain,
    cap_lowers_max_tokens_and_reject_refuses,
    upstream_errors_cost_nothing,
    daily_fee_once_per_day,
    limit_reset_starts_a_new_period,
    topup_unblocks_a_key,
);

/// demo-chat's price in tests/common BASE.
fn chat_price() -> Price {
    Price {
        input: Pico::parse_usd("0.15").unwrap(),
        cached_input: None,
        cache_write: None,
        cache_write_1h: None,
        output: Pico::parse_usd("0.60").unwrap(),
        request: Pico::ZERO,
    }
}

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

/// After everything settled and flushed: the live key, the stored account,
/// and Σ records + ledger all agree, to the picoUSD.
async fn assert_books_balance(gw: &TestGateway, hash: &str) -> (Pico, Vec<UsageRecord>) {
    let h = hash_bytes(hash);
    let live = gw
        .app()
        .gate
        .lookup(&h, gw.clock.now_ms())
        .unwrap()
        .unwrap();
    assert!(
        eventually(Duration::from_secs(5), || live.in_flight() == 0).await,
        "requests still in flight"
    );
    let n = live.numbers();
    assert_eq!(n.reserved, Pico::ZERO, "every reservation must be settled");
    gw.flush().await;
    let recs = records(gw, hash);
    let from_records: i64 = recs.iter().map(|r| r.cost.0).sum();
    let total = from_records + ledger_spent(gw, hash);
    let (_, account) = gw.app().store.key(&h).unwrap().unwrap();
    assert_eq!(account.spent.0, total, "stored spent = Σ records + ledger");
    assert_eq!(n.spent.0, total, "live spent = Σ records + ledger");
    assert_eq!(account.requests, recs.len() as u64);
    (n.spent, recs)
}

async fn concurrent_streams_never_overspend(mode: RuntimeMode) {
    let gw = Arc::new(TestGateway::start_mode(mode, "", |_| {}));
    // One answer: ≈11 prompt tokens + 16 completion tokens ≈ 11.25 µUSD;
    // the limit pays for about 10 of them.
    let limit = Pico::parse_usd("0.0001125").unwrap();
    let (key, hash) = gw
        .create_key(json!({"name": "budget", "limit": "0.0001125"}))
        .await;
    let mut tasks = Vec::new();
    for i in 0..200 {
        let gw = gw.clone();
        let key = key.clone();
        tasks.push(tokio::spawn(async move {
            let mut body = chat("demo-chat", true);
            body["max_tokens"] = json!(16);
            let res = client()
                .request(request(
                    "POST",
                    &gw.url("/v1/chat/completions"),
                    &[
                        ("authorization", &bearer(&key)),
                        ("x-mock-chunk-delay-ms", if i % 2 == 0 { "5" } else { "0" }),
                    ],
                    Some(body),
                ))
                .await
                .unwrap();
            let status = res.status().as_u16();
            let _ = res.into_body().collect().await;
            status
        }));
    }
    // Sample the books while the requests run: never above the limit.
    let h = hash_bytes(&hash);
    let live = gw
        .app()
        .gate
        .lookup(&h, gw.clock.now_ms())
        .unwrap()
        .unwrap();
    let mut statuses = Vec::new();
    let sampler = {
        let live = live.clone();
        tokio::spawn(async move {
            for _ in 0..200 {
                let n = live.numbers();
                assert!(
                    n.period_spent <= limit,
                    "spent {} > limit {}",
                    n.period_spent,
                    limit
                );
                assert!(
                    n.period_spent.0 + n.reserved.0 <= limit.0,
                    "committed above the limit"
                );
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
        })
    };
    for t in tasks {
        statuses.push(t.await.unwrap());
    }
    sampler.await.unwrap();
    let ok = statuses.iter().filter(|s| **s == 200).count();
    let refused = statuses.iter().filter(|s| **s == 402).count();
    assert_eq!(ok + refused, 200, "only 200 or 402: {statuses:?}");
    let (spent, recs) = assert_books_balance(&gw, &hash).await;
    assert!(spent <= limit, "spent {spent} > limit {limit}");
    assert_eq!(recs.len(), ok, "one record per admitted request");
    // However the 200 interleave (all at once on a loaded machine, or one
    // after another), at least what fits in the limit at once is admitted,
    // and never more than the limit pays at the cheapest answer.
    let widest = recs.iter().map(|r| r.reserved.0).max().unwrap_or(1);
    let cheapest = recs.iter().map(|r| r.cost.0).min().unwrap_or(1).max(1);
    assert!(
        ok as i64 >= (limit.0 / widest).max(1) && ok as i64 <= limit.0 / cheapest,
        "{ok} admitted; reservations up to {widest}, answers from {cheapest}"
    );
    assert!(
        recs.iter().all(|r| r.cost <= r.reserved),
        "never charged past the reservation"
    );
    // The key itself says it has (almost) nothing left, never negative.
    let (s, _, v) = send(
        "GET",
        &gw.url("/api/v1/key"),
        &[("authorization", &bearer(&key))],
        None,
    )
    .await;
    assert_eq!(s, 200);
    assert!(
        !v["data"]["limit_remaining"].to_string().starts_with('-'),
        "{v}"
    );
}

async fn streamed_usage_is_metered_exactly_and_withheld(mode: RuntimeMode) {
    let gw = TestGateway::start_mode(mode, "", |_| {});
    let (key, hash) = gw.create_key(json!({"name": "meter"})).await;
    let mut body = chat("demo-chat", true);
    body["max_tokens"] = json!(50);
    let (s, _, got) = send_raw(request(
        "POST",
        &gw.url("/v1/chat/completions"),
        &[("authorization", &bearer(&key))],
        Some(body.clone()),
    ))
    .await;
    assert_eq!(s, 200);
    let text = String::from_utf8(got.to_vec()).unwrap();
    assert!(
        !text.contains("\"usage\":{"),
        "the injected usage event must be withheld: {text}"
    );
    assert!(text.ends_with("data: [DONE]\n\n"));
    // Upstream was asked for usage.
    let sent: Value = serde_json::from_slice(&gw.mock.requests().last().unwrap().body).unwrap();
    assert_eq!(sent["stream_options"]["include_usage"], true);
    // The same request non-streamed tells the true usage.
    body["stream"] = json!(false);
    let (_, _, v) = send(
        "POST",
        &gw.url("/v1/chat/completions"),
        &[("authorization", &bearer(&key))],
        Some(body),
    )
    .await;
    let truth = Usage {
        prompt_tokens: v["usage"]["prompt_tokens"].as_u64().unwrap(),
        completion_tokens: v["usage"]["completion_tokens"].as_u64().unwrap(),
        ..Usage::default()
    };
    let (spent, recs) = assert_books_balance(&gw, &hash).await;
    assert_eq!(recs.len(), 2);
    for r in &recs {
        assert!(!r.estimated, "usage was reported: {r:?}");
        assert_eq!(
            (r.prompt_tokens, r.completion_tokens),
            (truth.prompt_tokens, truth.completion_tokens)
        );
        assert_eq!(r.cost, chat_price().cost(&truth));
        assert_eq!(r.status, 200);
        assert_eq!(r.model, "demo-chat");
        assert_eq!(r.upstream, "mock");
    }
    assert!(recs.iter().any(|r| r.stream) && recs.iter().any(|r| !r.stream));
    assert_eq!(spent.0, 2 * chat_price().cost(&truth).0);
}

async fn non_streamed_usage_with_cached_and_reasoning_tokens(mode: RuntimeMode) {
    let gw = TestGateway::start_mode(mode, "", |c| {
        c.models.get_mut("demo-chat").unwrap().cached_input =
            Some(Pico::parse_usd("0.075").unwrap());
    });
    let (key, hash) = gw.create_key(json!({"name": "cache"})).await;
    let (s, _, v) = send(
        "POST",
        &gw.url("/v1/chat/completions"),
        &[
            ("authorization", &bearer(&key)),
            ("x-mock-cached-tokens", "4"),
            ("x-mock-reasoning-tokens", "3"),
        ],
        Some(chat("demo-chat", false)),
    )
    .await;
    assert_eq!(s, 200, "{v}");
    let (_, recs) = assert_books_balance(&gw, &hash).await;
    let r = &recs[0];
    assert_eq!((r.cached_tokens, r.reasoning_tokens), (4, 3));
    let price = Price {
        cached_input: Some(Pico::parse_usd("0.075").unwrap()),
        ..chat_price()
    };
    let u = Usage {
        prompt_tokens: r.prompt_tokens,
        cached_tokens: 4,
        cache_write_tokens: 0,
        cache_write_1h_tokens: 0,
        completion_tokens: r.completion_tokens,
        reasoning_tokens: 3,
    };
    assert_eq!(r.cost, price.cost(&u));
    assert!(r.cost < chat_price().cost(&u), "cached tokens are cheaper");
}

async fn cut_streams_are_charged_an_estimate(mode: RuntimeMode) {
    let gw = TestGateway::start_mode(mode, "", |_| {});
    let (key, hash) = gw.create_key(json!({"name": "cut"})).await;
    let res = client()
        .request(request(
            "POST",
            &gw.url("/v1/chat/completions"),
            &[
                ("authorization", &bearer(&key)),
                ("x-mock-fault", "reset-after:3"),
            ],
            Some(chat("demo-chat", true)),
        ))
        .await
        .unwrap();
    assert!(res.into_body().collect().await.is_err());
    let (spent, recs) = assert_books_balance(&gw, &hash).await;
    let r = &recs[0];
    assert!(
        r.estimated,
        "no usage arrived: the record must say estimated"
    );
    assert!(r.cost > Pico::ZERO, "never free when the upstream did work");
    assert!(r.cost <= r.reserved, "never more than the bound");
    assert!(
        (1..=4).contains(&r.completion_tokens),
        "estimated from what was delivered: {r:?}"
    );
    assert_eq!(spent, r.cost);
}

async fn client_disconnect_cancel_and_drain(mode: RuntimeMode) {
    for drain in [false, true] {
        let gw = TestGateway::start_mode(mode, "", |c| {
            if drain {
                c.billing.on_client_disconnect = tollgate::config::OnClientDisconnect::Drain;
            }
        });
        let (key, hash) = gw.create_key(json!({"name": "gone"})).await;
        let mut body = chat("demo-chat", true);
        body["max_tokens"] = json!(20);
        let res = client()
            .request(request(
                "POST",
                &gw.url("/v1/chat/completions"),
                &[
                    ("authorization", &bearer(&key)),
                    ("x-mock-chunks", "20"),
                    ("x-mock-chunk-delay-ms", "10"),
                ],
                Some(body),
            ))
            .await
            .unwrap();
        let mut b = res.into_body();
        b.frame().await.unwrap().unwrap();
        drop(b);
        if drain {
            assert!(
                eventually(Duration::from_secs(5), || gw.mock.streams_completed() == 1).await,
                "drain reads to the end"
            );
        } else {
            assert!(
                eventually(Duration::from_secs(5), || gw.mock.streams_cancelled() == 1).await,
                "cancel drops the upstream"
            );
        }
        let (_, recs) = assert_books_balance(&gw, &hash).await;
        let r = &recs[0];
        if drain {
            assert!(!r.estimated, "drain gets the upstream's exact usage: {r:?}");
            assert_eq!(r.completion_tokens, 20);
        } else {
            assert!(r.estimated);
            assert!(
                r.completion_tokens < 20,
                "charged for what was delivered: {r:?}"
            );
        }
    }
}

async fn cap_lowers_max_tokens_and_reject_refuses(mode: RuntimeMode) {
    for reject in [false, true] {
        let gw = TestGateway::start_mode(mode, "", |c| {
            if reject {
                c.billing.on_insufficient = tollgate::config::OnInsufficient::Reject;
            }
        });
        // Room for the prompt bound (97 tokens × 0.15 µUSD) and about 25
        // completion tokens (× 0.60 µUSD) only.
        let (key, hash) = gw
            .create_key(json!({"name": "small", "limit": "0.00003"}))
            .await;
        let mut body = chat("demo-chat", false);
        body["max_tokens"] = json!(200);
        let (s, _, v) = send(
            "POST",
            &gw.url("/v1/chat/completions"),
            &[("authorization", &bearer(&key))],
            Some(body),
        )
        .await;
        if reject {
            assert_error(s, &v, 402, "insufficient_quota");
            assert_eq!(v["error"]["metadata"]["limit_source"], "key");
            let (spent, recs) = assert_books_balance(&gw, &hash).await;
            assert_eq!(
                (spent, recs.len()),
                (Pico::ZERO, 0),
                "a refusal changes nothing"
            );
        } else {
            assert_eq!(s, 200, "{v}");
            let sent: Value =
                serde_json::from_slice(&gw.mock.requests().last().unwrap().body).unwrap();
            let capped = sent["max_tokens"].as_u64().unwrap();
            assert!(
                (1..200).contains(&capped),
                "max_tokens lowered to what the key can pay: {sent}"
            );
            let (spent, _) = assert_books_balance(&gw, &hash).await;
            assert!(spent <= Pico::parse_usd("0.00003").unwrap());
        }
    }
}

async fn upstream_errors_cost_nothing(mode: RuntimeMode) {
    let gw = TestGateway::start_mode(mode, "", |_| {});
    let (key, hash) = gw.create_key(json!({"name": "err"})).await;
    let (s, _, _) = send(
        "POST",
        &gw.url("/v1/chat/completions"),
        &[
            ("authorization", &bearer(&key)),
            ("x-mock-fault", "status:400"),
        ],
        Some(chat("demo-chat", false)),
    )
    .await;
    assert_eq!(s, 400);
    let (spent, recs) = assert_books_balance(&gw, &hash).await;
    assert_eq!(spent, Pico::ZERO);
    assert_eq!(recs[0].status, 400);
}

async fn daily_fee_once_per_day(mode: RuntimeMode) {
    let gw = TestGateway::start_mode(
        mode,
        "[plans.daily]\nlimit = \"1\"\ndaily_fee = \"0.33\"\n",
        |_| {},
    );
    let (key, hash) = gw
        .create_key(json!({"name": "licence", "plan": "daily"}))
        .await;
    for _ in 0..3 {
        let (s, _, _) = send(
            "POST",
            &gw.url("/v1/chat/completions"),
            &[("authorization", &bearer(&key))],
            Some(chat("demo-chat", false)),
        )
        .await;
        assert_eq!(s, 200);
    }
    let fees = |gw: &TestGateway| {
        gw.app()
            .store
            .ledger(&hash_bytes(&hash), 0, 100)
            .unwrap()
            .iter()
            .filter(|e| e.kind == LedgerKind::DailyFee)
            .count()
    };
    assert!(
        eventually(Duration::from_secs(5), || fees(&gw) == 1).await,
        "one fee on the day's first request"
    );
    gw.clock.advance(Duration::from_secs(86_400));
    let (s, _, _) = send(
        "POST",
        &gw.url("/v1/chat/completions"),
        &[("authorization", &bearer(&key))],
        Some(chat("demo-chat", false)),
    )
    .await;
    assert_eq!(s, 200);
    assert!(
        eventually(Duration::from_secs(5), || fees(&gw) == 2).await,
        "a new fee the next day"
    );
    let (spent, recs) = assert_books_balance(&gw, &hash).await;
    let usage: i64 = recs.iter().map(|r| r.cost.0).sum();
    assert_eq!(spent.0, usage + 2 * Pico::parse_usd("0.33").unwrap().0);
    // A fee the key cannot pay refuses the request with its own source.
    let (k2, _) = gw
        .create_key(json!({"name": "poor", "plan": "daily", "limit": "0.1"}))
        .await;
    let (s, _, v) = send(
        "POST",
        &gw.url("/v1/chat/completions"),
        &[("authorization", &bearer(&k2))],
        Some(chat("demo-chat", false)),
    )
    .await;
    assert_error(s, &v, 402, "insufficient_quota");
    assert_eq!(v["error"]["metadata"]["limit_source"], "daily_fee");
}

async fn limit_reset_starts_a_new_period(mode: RuntimeMode) {
    let gw = TestGateway::start_mode(mode, "", |c| {
        c.billing.on_insufficient = tollgate::config::OnInsufficient::Reject
    });
    let (key, hash) = gw
        .create_key(json!({"name": "daily", "limit": "0.00004", "limit_reset": "daily"}))
        .await;
    // Each request reserves ≈24 µUSD (prompt bound + 16 tokens) and costs
    // ≈11 µUSD: two fit in the day's 40 µUSD.
    let mut small = chat("demo-chat", false);
    small["max_tokens"] = json!(16);
    let mut ok = 0;
    for _ in 0..10 {
        let (s, _, _) = send(
            "POST",
            &gw.url("/v1/chat/completions"),
            &[("authorization", &bearer(&key))],
            Some(small.clone()),
        )
        .await;
        if s == 200 {
            ok += 1;
        } else {
            assert_eq!(s, 402);
        }
    }
    assert_eq!(ok, 2, "the limit bites within the day");
    gw.clock.advance(Duration::from_secs(86_400));
    let (s, _, v) = send(
        "POST",
        &gw.url("/v1/chat/completions"),
        &[("authorization", &bearer(&key))],
        Some(small),
    )
    .await;
    assert_eq!(s, 200, "a new day, a new allowance: {v}");
    let (spent, recs) = assert_books_balance(&gw, &hash).await;
    assert_eq!(recs.len(), ok + 1);
    let per_request = recs[0].cost;
    assert_eq!(
        spent.0,
        3 * per_request.0,
        "lifetime usage keeps counting across periods"
    );
    let (_, _, v) = send(
        "GET",
        &gw.url("/api/v1/key"),
        &[("authorization", &bearer(&key))],
        None,
    )
    .await;
    assert_eq!(
        v["data"]["usage_daily"].to_string(),
        per_request.to_string(),
        "only today's usage counts: {v}"
    );
}

async fn topup_unblocks_a_key(mode: RuntimeMode) {
    let gw = TestGateway::start_mode(mode, "", |c| {
        c.billing.on_insufficient = tollgate::config::OnInsufficient::Reject
    });
    let (key, hash) = gw.create_key(json!({"name": "zero", "limit": "0"})).await;
    let (s, _, v) = send(
        "POST",
        &gw.url("/v1/chat/completions"),
        &[("authorization", &bearer(&key))],
        Some(chat("demo-chat", false)),
    )
    .await;
    assert_error(s, &v, 402, "insufficient_quota");
    let (s, _, v) = send(
        "POST",
        &gw.url(&format!("/api/v1/keys/{hash}/credits")),
        &[("authorization", &format!("Bearer {ADMIN}"))],
        Some(json!({"amount": 0.5, "kind": "topup", "reason": "payment", "idempotency_key": "pay-1"})),
    )
    .await;
    assert_eq!(s, 200, "{v}");
    let (s, _, _) = send(
        "POST",
        &gw.url("/v1/chat/completions"),
        &[("authorization", &bearer(&key))],
        Some(chat("demo-chat", false)),
    )
    .await;
    assert_eq!(s, 200, "the top-up is visible to the next request");
    assert_books_balance(&gw, &hash).await;
}

/// A crash loses at most `flush_ms` of usage, and never leaves `spent` and
/// the records disagreeing; keys, limits and credits written through the
/// admin API before the crash are all there.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_under_load_keeps_the_books_consistent() {
    use std::io::BufRead;
    use std::process::{Command, Stdio};
    let data = temp_dir("kill");
    let config = data.join("config.toml");
    std::fs::write(
        &config,
        format!(
            r#"[server]
listen = "127.0.0.1:0"
[storage]
path = "{}"
flush_ms = 20
[[upstreams]]
name = "mock"
mock = true
models = ["demo-*"]
[models."demo-chat"]
input = "0.15"
output = "0.60"
"#,
            data.join("db").display()
        ),
    )
    .unwrap();
    let start = || {
        let mut child = Command::new(env!("CARGO_BIN_EXE_tollgate"))
            .args(["serve", "--config", config.to_str().unwrap()])
            .env("TOLLGATE_ADMIN_TOKEN", ADMIN)
            .env("TOLLGATE_LOG", "warn")
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        let mut line = String::new();
        std::io::BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        let addr = line.trim().rsplit("http://").next().unwrap().to_owned();
        (child, addr)
    };
    let (mut child, addr) = start();
    let url = |p: &str| format!("http://{addr}{p}");
    let admin = [("authorization", format!("Bearer {ADMIN}"))];
    let admin: Vec<(&str, &str)> = admin.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let mut keys = Vec::new();
    for i in 0..4 {
        let (s, _, v) = send(
            "POST",
            &url("/api/v1/keys"),
            &admin,
            Some(json!({"name": format!("k{i}"), "limit": "1"})),
        )
        .await;
        assert_eq!(s, 201, "{v}");
        let hash = v["data"]["hash"].as_str().unwrap().to_owned();
        let (s, _, _) = send(
            "POST",
            &url(&format!("/api/v1/keys/{hash}/credits")),
            &admin,
            Some(json!({"amount": "2.5", "kind": "topup", "reason": "paid", "idempotency_key": format!("t{i}")})),
        )
        .await;
        assert_eq!(s, 200);
        let (s, _, _) = send(
            "POST",
            &url(&format!("/api/v1/keys/{hash}/credits")),
            &admin,
            Some(json!({"amount": "0.25", "kind": "deduct", "reason": "fee", "idempotency_key": format!("d{i}")})),
        )
        .await;
        assert_eq!(s, 200);
        keys.push((v["key"].as_str().unwrap().to_owned(), hash));
    }
    // Load on every key, then SIGKILL in the middle of it.
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut load = Vec::new();
    for (key, _) in &keys {
        for _ in 0..4 {
            let (key, u, stop) = (key.clone(), url("/v1/chat/completions"), stop.clone());
            load.push(tokio::spawn(async move {
                let c = client();
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    let r = c
                        .request(request(
                            "POST",
                            &u,
                            &[("authorization", &bearer(&key))],
                            Some(chat("demo-chat", true)),
                        ))
                        .await;
                    match r {
                        Ok(res) => {
                            let _ = res.into_body().collect().await;
                        }
                        Err(_) => return,
                    }
                }
            }));
        }
    }
    tokio::time::sleep(Duration::from_millis(700)).await;
    child.kill().unwrap(); // SIGKILL
    child.wait().unwrap();
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    for l in load {
        let _ = l.await;
    }
    // Restart on the same data and check every key's books.
    let (mut child, addr) = start();
    let url = |p: &str| format!("http://{addr}{p}");
    for (key, hash) in &keys {
        let (s, _, v) = send("GET", &url(&format!("/api/v1/keys/{hash}")), &admin, None).await;
        assert_eq!(s, 200, "the key survived: {v}");
        assert_eq!(
            v["data"]["limit"].to_string(),
            "3.5",
            "limit 1 + top-up 2.5: {v}"
        );
        let (s, _, v) = send(
            "GET",
            &url(&format!("/api/v1/keys/{hash}/ledger")),
            &admin,
            None,
        )
        .await;
        assert_eq!(s, 200);
        assert_eq!(
            v["data"].as_array().unwrap().len(),
            2,
            "both credits survived: {v}"
        );
        let (s, _, _) = send(
            "POST",
            &url("/v1/chat/completions"),
            &[("authorization", &bearer(key))],
            Some(chat("demo-chat", false)),
        )
        .await;
        assert_eq!(s, 200, "the key still works");
    }
    // Stop cleanly, then read the books straight from the store.
    Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    child.wait().unwrap();
    let store = tollgate::store::Store::open(&data.join("db"), 5).unwrap();
    let mut total_records = 0;
    for (_, hash) in &keys {
        let h = hash_bytes(hash);
        let (_, account) = store.key(&h).unwrap().unwrap();
        let recs = store.usage(&h, 0, 1_000_000).unwrap();
        total_records += recs.len();
        let ledger: i64 = store
            .ledger(&h, 0, 1000)
            .unwrap()
            .iter()
            .map(|e| match e.kind {
                LedgerKind::Deduct | LedgerKind::DailyFee => e.amount.0,
                LedgerKind::Refund => -e.amount.0,
                LedgerKind::Topup => 0,
            })
            .sum();
        let sum: i64 = recs.iter().map(|r| r.cost.0).sum::<i64>() + ledger;
        assert_eq!(
            account.spent.0, sum,
            "spent = Σ records + ledger after SIGKILL"
        );
        assert_eq!(account.requests, recs.len() as u64);
        assert_eq!(account.limit, Some(Pico::parse_usd("3.5").unwrap()));
    }
    assert!(
        total_records > 4,
        "the load ran: {total_records} records survived"
    );
    drop(store);
    let _ = std::fs::remove_dir_all(&data);
}

// ---- PATCH limit_reset: one rule in memory and in the store ----

async fn key_view(gw: &TestGateway, hash: &str) -> Value {
    gw.admin_get(&format!("/api/v1/keys/{hash}")).await["data"].clone()
}

async fn admin_json(gw: &TestGateway, method: &str, path: &str, body: Value) -> Value {
    let (s, _, v) = send(
        method,
        &gw.url(path),
        &[("authorization", &bearer(&gw.admin_token))],
        Some(body),
    )
    .await;
    assert_eq!(s, 200, "{method} {path}: {v}");
    v
}

/// The same store, opened by a new gateway whose clock shows the old one's time.
fn restart(gw: &mut TestGateway) -> TestGateway {
    // Shutting down blocks (it drains the runtime): off the test's runtime.
    std::thread::scope(|s| {
        s.spawn(|| gw.stop());
    });
    let data = gw.data.clone();
    let mut again =
        TestGateway::start_mode(RuntimeMode::PerCore, "", |c| c.storage.path = data.clone());
    let _ = std::fs::remove_dir_all(&again.data);
    again.data = data;
    let offset = gw.clock.now_ms() - again.clock.now_ms();
    again
        .clock
        .advance(Duration::from_millis(offset.max(0) as u64));
    again
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn patch_limit_reset_agrees_in_memory_and_store() {
    let mut gw = TestGateway::start();
    let (_, hash) = gw.create_key(json!({"name": "reset", "limit": "1"})).await;
    let credits = format!("/api/v1/keys/{hash}/credits");
    let path = format!("/api/v1/keys/{hash}");
    admin_json(
        &gw,
        "POST",
        &credits,
        json!({"amount": "0.25", "kind": "deduct", "reason": "a"}),
    )
    .await;
    // none → monthly: what was spent keeps counting, no fresh limit.
    admin_json(&gw, "PATCH", &path, json!({"limit_reset": "monthly"})).await;
    let v = key_view(&gw, &hash).await;
    assert_eq!(v["limit_remaining"], json!(0.75), "{v}");
    gw.flush().await;
    let mut again = restart(&mut gw);
    let v = key_view(&again, &hash).await;
    assert_eq!(v["limit_remaining"], json!(0.75), "the store agrees: {v}");
    // A month later the period starts again; spend in it.
    // (The admin view shows the live numbers as last rolled: the deduct
    // rolls the period, as a request would.)
    again.clock.advance(Duration::from_secs(32 * 86_400));
    admin_json(
        &again,
        "POST",
        &credits,
        json!({"amount": "0.5", "kind": "deduct", "reason": "b"}),
    )
    .await;
    let v = key_view(&again, &hash).await;
    assert_eq!(v["limit_remaining"], json!(0.5), "a new month: {v}");
    // monthly → none: the limit caps lifetime spend, 0.75 of it.
    admin_json(&again, "PATCH", &path, json!({"limit_reset": null})).await;
    let v = key_view(&again, &hash).await;
    assert_eq!(v["limit_remaining"], json!(0.25), "{v}");
    assert_eq!(v["usage"], json!(0.75), "{v}");
    again.flush().await;
    let third = restart(&mut again);
    let v = key_view(&third, &hash).await;
    assert_eq!(v["limit_remaining"], json!(0.25), "the store agrees: {v}");
    std::thread::scope(|s| {
        s.spawn(move || drop(third));
    });
    drop(again);
}
