//! Accounts over loopback: several keys spend from one account's wallet,
//! concurrent requests never overspend it, top-ups unblock it, deletion is
//! refused while keys exist, and balances survive a restart with
//! spent = Σ the keys' records + the account's ledger.

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::*;
use http_body_util::BodyExt;
use serde_json::{Value, json};
use tollgate::clock::Clock;
use tollgate::config::{Config, RuntimeMode};
use tollgate::money::Pico;
use tollgate::runtime::{Gateway, StartOptions};
use tollgate::store::{AccountCreditKind, KeyHash};
use tollgate_mock::{MockOptions, MockUpstream};

both_modes!(
    keys_share_one_wallet_and_never_overspend,
    topup_unblocks_and_key_limit_still_binds,
    delete_refused_while_keys_exist_unless_forced,
    account_credits_are_idempotent_and_deducts_must_fit,
);

async fn admin(gw: &TestGateway, method: &str, path: &str, body: Option<Value>) -> (u16, Value) {
    let (s, _, v) = send(
        method,
        &gw.url(path),
        &[("authorization", &format!("Bearer {ADMIN}"))],
        body,
    )
    .await;
    (s, v)
}

fn usd(v: &Value) -> Pico {
    Pico::parse_usd(v.to_string().trim_matches('"')).unwrap_or_else(|_| panic!("usd {v}"))
}

fn hash_bytes(hex_hash: &str) -> KeyHash {
    hex::decode(hex_hash).unwrap().try_into().unwrap()
}

async fn chat_once(gw: &TestGateway, key: &str, stream: bool) -> u16 {
    let mut body = chat("demo-chat", stream);
    body["max_tokens"] = json!(16);
    let res = client()
        .request(request(
            "POST",
            &gw.url("/v1/chat/completions"),
            &[
                ("authorization", &bearer(key)),
                ("x-mock-chunk-delay-ms", "2"),
            ],
            Some(body),
        ))
        .await
        .unwrap();
    let status = res.status().as_u16();
    let body = res.into_body().collect().await;
    if status >= 500 {
        eprintln!("{status}: {:?}", body.map(|b| b.to_bytes()));
    }
    status
}

/// Σ the keys' usage record costs + Σ the account ledger's effect on spent.
fn books(gw: &TestGateway, id: &str, hashes: &[String]) -> i64 {
    let store = &gw.app().store;
    let records: i64 = hashes
        .iter()
        .map(|h| {
            store
                .usage(&hash_bytes(h), 0, 100_000)
                .unwrap()
                .iter()
                .map(|r| r.cost.0)
                .sum::<i64>()
        })
        .sum();
    let ledger: i64 = store
        .account_ledger(id, 0, 100_000)
        .unwrap()
        .iter()
        .map(|e| match e.kind {
            AccountCreditKind::Deduct => e.amount.0,
            AccountCreditKind::Refund => -e.amount.0,
            _ => 0,
        })
        .sum();
    records + ledger
}

async fn keys_share_one_wallet_and_never_overspend(mode: RuntimeMode) {
    let gw = TestGateway::start_mode(mode, "", |_| {});
    let gw = Arc::new(gw);
    let (s, v) = admin(
        &gw,
        "POST",
        "/api/v1/accounts",
        Some(json!({"id": "acct-1", "email": "a@example.com"})),
    )
    .await;
    assert_eq!(s, 201, "{v}");
    assert_eq!(v["data"]["status"], "active");
    assert_eq!(v["data"]["keys"], 0);
    assert!(v["data"]["subscription"].is_null());
    // About ten answers' worth (≈11.25 µUSD each).
    let (s, v) = admin(
        &gw,
        "POST",
        "/api/v1/accounts/acct-1/credits",
        Some(
            json!({"amount": "0.0001125", "kind": "topup", "reason": "t", "idempotency_key": "t1"}),
        ),
    )
    .await;
    assert_eq!(s, 200, "{v}");
    let mut keys = Vec::new();
    for i in 0..3 {
        keys.push(
            gw.create_key(json!({"name": format!("dev{i}"), "owner": "acct-1"}))
                .await,
        );
    }
    let mut tasks = Vec::new();
    for i in 0..120 {
        let gw = gw.clone();
        let key = keys[i % 3].0.clone();
        tasks.push(tokio::spawn(
            async move { chat_once(&gw, &key, true).await },
        ));
    }
    let live = gw
        .app()
        .gate
        .wallets()
        .of("acct-1", gw.clock.now_ms())
        .unwrap()
        .expect("the account's wallet");
    let sampler = {
        let live = live.clone();
        tokio::spawn(async move {
            for _ in 0..100 {
                let n = live.numbers();
                assert!(n.balance.0 >= 0, "balance below zero: {:?}", n);
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
        })
    };
    let mut ok = 0;
    let mut refused = 0;
    for t in tasks {
        match t.await.unwrap() {
            200 => ok += 1,
            402 => refused += 1,
            other => panic!("status {other}"),
        }
    }
    sampler.await.unwrap();
    assert!(ok >= 1 && refused > 0, "{ok} admitted, {refused} refused");
    gw.flush().await;
    let (_, a) = admin(&gw, "GET", "/api/v1/accounts/acct-1", None).await;
    let a = &a["data"];
    let balance = usd(&a["balance"]);
    assert!(balance.0 >= 0, "{a}");
    assert_eq!(usd(&a["reserved"]), Pico::ZERO, "{a}");
    assert_eq!(a["keys"], 3);
    let mut usage = 0;
    for (_, h) in &keys {
        let k = gw.admin_get(&format!("/api/v1/keys/{h}")).await;
        usage += usd(&k["data"]["usage"]).0;
    }
    let topped = Pico::parse_usd("0.0001125").unwrap().0;
    assert_eq!(
        topped - balance.0,
        usage,
        "topped up − balance = Σ key usage"
    );
    assert_eq!(usd(&a["spent"]["total"]).0, usage);
    let hashes: Vec<String> = keys.iter().map(|(_, h)| h.clone()).collect();
    assert_eq!(
        books(&gw, "acct-1", &hashes),
        usage,
        "spent = Σ records + ledger"
    );
    // However the 120 interleave (all at once on a loaded machine, or one
    // after another), at least what fits in the balance at once is admitted.
    let recs: Vec<_> = hashes
        .iter()
        .flat_map(|h| gw.app().store.usage(&hash_bytes(h), 0, 100_000).unwrap())
        .collect();
    assert_eq!(recs.len(), ok, "one record per admitted request");
    let widest = recs.iter().map(|r| r.reserved.0).max().unwrap_or(1);
    assert!(
        ok as i64 >= (topped / widest).max(1),
        "{ok} admitted, reservations up to {widest}"
    );
    // The stored account agrees with memory.
    let stored = gw.app().store.user_account("acct-1").unwrap().unwrap();
    assert_eq!(stored.balance, balance);
    assert_eq!(stored.spent.0, usage);
    // A refusal names the account.
    let mut body = chat("demo-chat", false);
    body["max_tokens"] = json!(200);
    let (s, _, v) = send(
        "POST",
        &gw.url("/v1/chat/completions"),
        &[("authorization", &bearer(&keys[0].0))],
        Some(body),
    )
    .await;
    if s == 402 {
        assert_eq!(v["error"]["metadata"]["limit_source"], "account", "{v}");
    }
    // GET /api/v1/key: never more than the account has.
    let (_, _, k) = send(
        "GET",
        &gw.url("/api/v1/key"),
        &[("authorization", &bearer(&keys[0].0))],
        None,
    )
    .await;
    assert!(usd(&k["data"]["limit_remaining"]) <= balance, "{k}");
    assert_eq!(k["data"]["account"], "acct-1");
}

async fn topup_unblocks_and_key_limit_still_binds(mode: RuntimeMode) {
    let gw = TestGateway::start_mode(mode, "", |_| {});
    let (s, _) = admin(&gw, "POST", "/api/v1/accounts", Some(json!({"id": "u2"}))).await;
    assert_eq!(s, 201);
    let (key, _) = gw.create_key(json!({"name": "k", "owner": "u2"})).await;
    let (s, _, v) = send(
        "POST",
        &gw.url("/v1/chat/completions"),
        &[("authorization", &bearer(&key))],
        Some(chat("demo-chat", false)),
    )
    .await;
    assert_error(s, &v, 402, "insufficient_quota");
    assert_eq!(v["error"]["metadata"]["limit_source"], "account", "{v}");
    let (s, _) = admin(
        &gw,
        "POST",
        "/api/v1/accounts/u2/credits",
        Some(json!({"amount": "1", "kind": "topup", "reason": "t", "idempotency_key": "a"})),
    )
    .await;
    assert_eq!(s, 200);
    assert_eq!(chat_once(&gw, &key, false).await, 200);
    // A key's own limit binds inside a funded account.
    let (small, _) = gw
        .create_key(json!({"name": "capped", "owner": "u2", "limit": "0.00001"}))
        .await;
    let a = chat_once(&gw, &small, false).await;
    let b = chat_once(&gw, &small, false).await;
    assert!(a == 402 || b == 402, "{a} {b}");
    let (_, _, v) = send(
        "POST",
        &gw.url("/v1/chat/completions"),
        &[("authorization", &bearer(&small))],
        Some(chat("demo-chat", false)),
    )
    .await;
    assert_eq!(v["error"]["metadata"]["limit_source"], "key", "{v}");
    // Suspended: the keys get 403.
    let (s, _v) = admin(
        &gw,
        "PATCH",
        "/api/v1/accounts/u2",
        Some(json!({"status": "suspended"})),
    )
    .await;
    assert_eq!(s, 200, "{_v}");
    let (s, _, v) = send(
        "POST",
        &gw.url("/v1/chat/completions"),
        &[("authorization", &bearer(&key))],
        Some(chat("demo-chat", false)),
    )
    .await;
    assert_error(s, &v, 403, "account_suspended");
    let (_, v) = admin(
        &gw,
        "PATCH",
        "/api/v1/accounts/u2",
        Some(json!({"status": "active"})),
    )
    .await;
    assert_eq!(v["data"]["status"], "active");
    assert_eq!(chat_once(&gw, &key, false).await, 200);
    // Closed: the keys get 403 and no new key attaches.
    admin(
        &gw,
        "PATCH",
        "/api/v1/accounts/u2",
        Some(json!({"status": "closed"})),
    )
    .await;
    let (s, _, v) = send(
        "POST",
        &gw.url("/v1/chat/completions"),
        &[("authorization", &bearer(&key))],
        Some(chat("demo-chat", false)),
    )
    .await;
    assert_error(s, &v, 403, "account_closed");
    let (s, v) = admin(
        &gw,
        "POST",
        "/api/v1/keys",
        Some(json!({"name": "late", "owner": "u2"})),
    )
    .await;
    assert_error(s, &v, 400, "account_closed");
}

async fn delete_refused_while_keys_exist_unless_forced(mode: RuntimeMode) {
    let gw = TestGateway::start_mode(mode, "", |_| {});
    let (s, _) = admin(
        &gw,
        "POST",
        "/api/v1/accounts",
        Some(json!({"id": "d1", "email": "d@example.com"})),
    )
    .await;
    assert_eq!(s, 201);
    let (s, v) = admin(&gw, "POST", "/api/v1/accounts", Some(json!({"id": "d1"}))).await;
    assert_error(s, &v, 409, "account_exists");
    let (key, hash) = gw.create_key(json!({"name": "k", "owner": "d1"})).await;
    let (_, v) = admin(&gw, "GET", "/api/v1/accounts?email=d%40example.com", None).await;
    assert_eq!(v["data"].as_array().unwrap().len(), 1, "{v}");
    assert_eq!(v["data"][0]["id"], "d1");
    let (s, v) = admin(&gw, "DELETE", "/api/v1/accounts/d1", None).await;
    assert_error(s, &v, 409, "account_has_keys");
    assert_eq!(admin(&gw, "GET", "/api/v1/accounts/d1", None).await.0, 200);
    let (s, v) = admin(&gw, "DELETE", "/api/v1/accounts/d1?force=true", None).await;
    assert_eq!(s, 200, "{v}");
    let (s, v) = admin(&gw, "GET", "/api/v1/accounts/d1", None).await;
    assert_error(s, &v, 404, "not_found");
    let k = gw.admin_get(&format!("/api/v1/keys/{hash}")).await;
    assert_eq!(k["data"]["disabled"], true, "{k}");
    let (s, _, v) = send(
        "POST",
        &gw.url("/v1/chat/completions"),
        &[("authorization", &bearer(&key))],
        Some(chat("demo-chat", false)),
    )
    .await;
    assert_error(s, &v, 403, "key_disabled");
}

async fn account_credits_are_idempotent_and_deducts_must_fit(mode: RuntimeMode) {
    let gw = TestGateway::start_mode(mode, "", |_| {});
    admin(&gw, "POST", "/api/v1/accounts", Some(json!({"id": "c1"}))).await;
    let top = json!({"amount": "2", "kind": "topup", "reason": "r", "idempotency_key": "x"});
    let (_, a) = admin(
        &gw,
        "POST",
        "/api/v1/accounts/c1/credits",
        Some(top.clone()),
    )
    .await;
    let (_, b) = admin(&gw, "POST", "/api/v1/accounts/c1/credits", Some(top)).await;
    assert_eq!(b["data"]["replayed"], true);
    assert_eq!(a["data"]["entry"]["seq"], b["data"]["entry"]["seq"]);
    assert_eq!(usd(&b["data"]["account"]["balance"]), Pico::usd(2));
    let (s, v) = admin(
        &gw,
        "POST",
        "/api/v1/accounts/c1/credits",
        Some(json!({"amount": "3", "kind": "deduct", "reason": "r", "idempotency_key": "y"})),
    )
    .await;
    assert_error(s, &v, 402, "insufficient_quota");
    let (s, v) = admin(
        &gw,
        "POST",
        "/api/v1/accounts/c1/credits",
        Some(json!({"amount": "0.5", "kind": "deduct", "reason": "r", "idempotency_key": "z"})),
    )
    .await;
    assert_eq!(s, 200, "{v}");
    assert_eq!(
        usd(&v["data"]["account"]["balance"]),
        Pico::parse_usd("1.5").unwrap()
    );
    let (s, v) = admin(
        &gw,
        "POST",
        "/api/v1/accounts/c1/credits",
        Some(json!({"amount": "-1", "kind": "topup", "reason": "r"})),
    )
    .await;
    assert_error(s, &v, 400, "invalid_amount");
    let (s, v) = admin(
        &gw,
        "POST",
        "/api/v1/accounts/nobody/credits",
        Some(json!({"amount": "1", "kind": "topup", "reason": "r"})),
    )
    .await;
    assert_error(s, &v, 404, "not_found");
    let (_, l) = admin(&gw, "GET", "/api/v1/accounts/c1/ledger", None).await;
    let kinds: Vec<&str> = l["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["kind"].as_str().unwrap())
        .collect();
    assert_eq!(kinds, ["deduct", "topup"]);
}

/// A gateway over `data`, so a second one can reopen the first one's store.
fn gateway_on(data: std::path::PathBuf) -> TestGateway {
    let mock = MockUpstream::start(MockOptions::default()).expect("mock");
    let text = BASE
        .replace("{DATA}", &data.display().to_string())
        .replace("{MOCK}", &mock.base_url());
    let mut config = Config::parse(&text, "test.toml").unwrap();
    config.runtime.mode = RuntimeMode::PerCore;
    let clock = Clock::system();
    let gateway = Gateway::start(
        config,
        StartOptions {
            clock: clock.clone(),
            admin_token: Some(ADMIN.to_owned()),
        },
    )
    .expect("gateway starts");
    TestGateway {
        addr: gateway.addr(),
        gateway: Some(gateway),
        admin_token: ADMIN.to_owned(),
        clock,
        mock,
        data,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restart_keeps_balances_and_books() {
    let data = temp_dir("acct-restart");
    let mut gw = gateway_on(data.clone());
    admin(&gw, "POST", "/api/v1/accounts", Some(json!({"id": "r1"}))).await;
    admin(
        &gw,
        "POST",
        "/api/v1/accounts/r1/credits",
        Some(json!({"amount": "0.01", "kind": "topup", "reason": "r", "idempotency_key": "a"})),
    )
    .await;
    let (k1, h1) = gw.create_key(json!({"name": "a", "owner": "r1"})).await;
    let (k2, h2) = gw.create_key(json!({"name": "b", "owner": "r1"})).await;
    for i in 0..10 {
        assert_eq!(
            chat_once(&gw, if i % 2 == 0 { &k1 } else { &k2 }, i % 3 == 0).await,
            200
        );
    }
    admin(
        &gw,
        "POST",
        "/api/v1/accounts/r1/credits",
        Some(json!({"amount": "0.001", "kind": "deduct", "reason": "r", "idempotency_key": "b"})),
    )
    .await;
    gw.flush().await;
    let (_, before) = admin(&gw, "GET", "/api/v1/accounts/r1", None).await;
    // Keep the directory: the second gateway reopens it.
    let gateway = gw.gateway.take().expect("running");
    tokio::task::spawn_blocking(move || gateway.shutdown())
        .await
        .unwrap();
    let gw_data = std::mem::replace(&mut gw.data, temp_dir("acct-restart-scratch"));
    drop(gw);
    let gw = gateway_on(gw_data);
    let (_, after) = admin(&gw, "GET", "/api/v1/accounts/r1", None).await;
    assert_eq!(before["data"]["balance"], after["data"]["balance"]);
    assert_eq!(before["data"]["spent"], after["data"]["spent"]);
    let spent = usd(&after["data"]["spent"]["total"]).0;
    assert!(spent > 0);
    assert_eq!(
        books(&gw, "r1", &[h1, h2]),
        spent,
        "spent = Σ records + ledger"
    );
    assert_eq!(
        usd(&after["data"]["balance"]).0,
        Pico::parse_usd("0.01").unwrap().0 - spent
    );
    // And it still pays.
    assert_eq!(chat_once(&gw, &k1, false).await, 200);
}
