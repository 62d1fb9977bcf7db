//! Subscriptions over loopback: a month of lifecycle on the test clock
//! (trial → active → renew → past_due → grace → expired; rollover on and
//! off; upgrade mid-period; cancel at period end) with the account ledger
//! checked entry by entry; the keys of an ended subscription get 402
//! `subscription_inactive`; the plan's key template applies to the
//! account's keys; bad input changes nothing; and a kill -9 of the real
//! binary during period rolls and renewals never grants twice.

mod common;

use std::time::Duration;

use common::*;
use serde_json::{Value, json};
use tollgate::billing::subscriptions::Billing;
use tollgate::clock::{DAY_MS, parse_rfc3339};
use tollgate::config::RuntimeMode;
use tollgate::money::Pico;
use tollgate::store::{AccountCreditKind, KeyHash};

both_modes!(a_month_of_lifecycle_trial_to_expiry);

const PLANS: &str = r#"
[limits]
sweep_interval = "20ms"
[plans.basic]
interval = "month"
price = "10"
grant = "1"
grace = "3d"
[plans.pro]
interval = "month"
price = "30"
grant = "4"
grace = "3d"
[plans.roll]
interval = "week"
grant = "0.5"
rollover = true
[plans.embed_only]
interval = "month"
grant = "1"
models = ["demo-embed"]
"#;

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

fn p(text: &str) -> Pico {
    Pico::parse_usd(text).unwrap()
}

fn ms(v: &Value) -> i64 {
    parse_rfc3339(v.as_str().unwrap_or_else(|| panic!("time {v}"))).unwrap()
}

async fn account(gw: &TestGateway, id: &str) -> Value {
    let (s, v) = admin(gw, "GET", &format!("/api/v1/accounts/{id}"), None).await;
    assert_eq!(s, 200, "{v}");
    v["data"].clone()
}

/// The account's ledger, oldest first, as (kind, amount).
async fn ledger(gw: &TestGateway, id: &str) -> Vec<(String, Pico)> {
    let (s, v) = admin(gw, "GET", &format!("/api/v1/accounts/{id}/ledger"), None).await;
    assert_eq!(s, 200, "{v}");
    let mut out: Vec<(String, Pico)> = v["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| (e["kind"].as_str().unwrap().to_owned(), usd(&e["amount"])))
        .collect();
    out.reverse();
    out
}

fn kinds(l: &[(String, Pico)]) -> Vec<&str> {
    l.iter().map(|(k, _)| k.as_str()).collect()
}

async fn new_account(gw: &TestGateway, id: &str) {
    let (s, v) = admin(gw, "POST", "/api/v1/accounts", Some(json!({"id": id}))).await;
    assert_eq!(s, 201, "{v}");
}

async fn subscribe(gw: &TestGateway, id: &str, body: Value) -> Value {
    let (s, v) = admin(
        gw,
        "POST",
        &format!("/api/v1/accounts/{id}/subscriptions"),
        Some(body),
    )
    .await;
    assert_eq!(s, 201, "{v}");
    v["data"].clone()
}

async fn renew(gw: &TestGateway, sid: &str, key: &str) -> (u16, Value) {
    admin(
        gw,
        "POST",
        &format!("/api/v1/subscriptions/{sid}/renew"),
        Some(json!({"idempotency_key": key})),
    )
    .await
}

async fn sub(gw: &TestGateway, sid: &str) -> Value {
    let (s, v) = admin(gw, "GET", &format!("/api/v1/subscriptions/{sid}"), None).await;
    assert_eq!(s, 200, "{v}");
    v["data"].clone()
}

/// Moves the test clock, then runs the lifecycle (the sweeper may run it
/// too: both are serialized and idempotent).
async fn advance(gw: &TestGateway, by_ms: i64) {
    gw.clock.advance(Duration::from_millis(by_ms as u64));
    Billing::of(gw.app())
        .process_due()
        .await
        .expect("lifecycle");
}

async fn chat_status(gw: &TestGateway, key: &str, model: &str) -> (u16, Value) {
    let mut body = chat(model, false);
    body["max_tokens"] = json!(16);
    if model == "demo-embed" {
        body = json!({"model": model, "input": "hello"});
    }
    let path = if model == "demo-embed" {
        "/v1/embeddings"
    } else {
        "/v1/chat/completions"
    };
    let (s, _, v) = send(
        "POST",
        &gw.url(path),
        &[("authorization", &bearer(key))],
        Some(body),
    )
    .await;
    (s, v)
}

async fn a_month_of_lifecycle_trial_to_expiry(mode: RuntimeMode) {
    let gw = TestGateway::start_mode(mode, PLANS, |_| {});
    new_account(&gw, "u1").await;
    let (key, _) = gw.create_key(json!({"name": "phone", "owner": "u1"})).await;
    let created = gw.clock.now_ms();
    let s = subscribe(
        &gw,
        "u1",
        json!({"plan": "basic", "trial_days": 7, "external_id": "stripe_sub_1"}),
    )
    .await;
    let sid = s["id"].as_str().unwrap().to_owned();
    assert_eq!(s["status"], "trialing");
    assert_eq!(s["plan"], "basic");
    assert_eq!(s["cancel_at_period_end"], false);
    assert_eq!(s["external_id"], "stripe_sub_1");
    let trial_end = ms(&s["trial_end"]);
    assert!((trial_end - created - 7 * DAY_MS).abs() < 5_000, "{s}");
    assert_eq!(ms(&s["current_period_end"]), trial_end);
    let a = account(&gw, "u1").await;
    assert_eq!(
        usd(&a["allowance"]),
        p("1"),
        "the trial grants the plan's grant: {a}"
    );
    assert_eq!(a["subscription"]["id"], sid.as_str());
    assert_eq!(a["subscription"]["status"], "trialing");
    assert_eq!(ledger(&gw, "u1").await, vec![("grant".into(), p("1"))]);
    let found = Billing::of(gw.app())
        .by_external_id("stripe_sub_1")
        .unwrap()
        .unwrap();
    assert_eq!(found.id, sid);

    // Usage is taken from the allowance first; the balance stays 0.
    let (st, v) = chat_status(&gw, &key, "demo-chat").await;
    assert_eq!(st, 200, "{v}");
    gw.flush().await;
    let a = account(&gw, "u1").await;
    let cost = usd(&a["spent"]["total"]);
    assert!(cost > Pico::ZERO);
    assert_eq!(usd(&a["balance"]), Pico::ZERO);
    assert_eq!(usd(&a["allowance"]), Pico(p("1").0 - cost.0));

    // Paid during the trial: converts at its end. A replay changes nothing.
    let (st, v) = renew(&gw, &sid, "pay-1").await;
    assert_eq!(st, 200, "{v}");
    assert_eq!(v["replayed"], false);
    assert_eq!(v["data"]["paid_through"], 1);
    let (st, v) = renew(&gw, &sid, "pay-1").await;
    assert_eq!(st, 200, "{v}");
    assert_eq!(v["replayed"], true);
    assert_eq!(v["data"]["paid_through"], 1);

    advance(&gw, trial_end - gw.clock.now_ms() + 1_000).await;
    let s = sub(&gw, &sid).await;
    assert_eq!(s["status"], "active", "{s}");
    assert_eq!(s["period"], 1);
    assert_eq!(ms(&s["current_period_start"]), trial_end);
    let period_end = ms(&s["current_period_end"]);
    assert!(period_end - trial_end >= 28 * DAY_MS && period_end - trial_end <= 31 * DAY_MS);
    let l = ledger(&gw, "u1").await;
    assert_eq!(
        l,
        vec![
            ("grant".into(), p("1")),
            ("lapse".into(), Pico(p("1").0 - cost.0)),
            ("grant".into(), p("1")),
        ],
        "the trial's unused allowance lapsed, period 1 granted once"
    );
    assert_eq!(usd(&account(&gw, "u1").await["allowance"]), p("1"));
    // Running the lifecycle again grants nothing more.
    advance(&gw, 1).await;
    assert_eq!(ledger(&gw, "u1").await.len(), 3);

    // The period ends unpaid: past due; the keys keep working for grace.
    advance(&gw, period_end - gw.clock.now_ms() + 1_000).await;
    let s = sub(&gw, &sid).await;
    assert_eq!(s["status"], "past_due", "{s}");
    assert_eq!(ms(&s["past_due_since"]), period_end);
    let (st, v) = chat_status(&gw, &key, "demo-chat").await;
    assert_eq!(st, 200, "past due, within grace: {v}");
    advance(&gw, 2 * DAY_MS).await;
    assert_eq!(sub(&gw, &sid).await["status"], "past_due");
    let (st, v) = chat_status(&gw, &key, "demo-chat").await;
    assert_eq!(st, 200, "still within grace: {v}");
    gw.flush().await;
    let spent_before = usd(&account(&gw, "u1").await["spent"]["total"]);
    let left = Pico(p("1").0 - (spent_before.0 - cost.0));

    // Past the grace: expired, by the background sweeper on its own.
    gw.clock
        .advance(Duration::from_millis(DAY_MS as u64 + 1_000));
    let app = gw.app().clone();
    let expired = eventually(Duration::from_secs(5), || {
        app.store
            .subscription(&sid)
            .unwrap()
            .is_some_and(|s| s.status == tollgate::store::SubscriptionStatus::Expired)
    })
    .await;
    assert!(expired, "the sweeper expired it: {}", sub(&gw, &sid).await);
    // The store commits first; the live wallet hears of it right after.
    let mut a = account(&gw, "u1").await;
    for _ in 0..100 {
        if a["subscription"]["status"] == "expired" && usd(&a["allowance"]) == Pico::ZERO {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
        a = account(&gw, "u1").await;
    }
    let l = ledger(&gw, "u1").await;
    assert_eq!(kinds(&l), vec!["grant", "lapse", "grant", "lapse"]);
    assert_eq!(l[3].1, left, "what was left of period 1 lapsed at expiry");
    assert_eq!(usd(&a["allowance"]), Pico::ZERO);
    assert_eq!(a["subscription"]["status"], "expired");
    let (st, v) = chat_status(&gw, &key, "demo-chat").await;
    assert_error(st, &v, 402, "subscription_inactive");

    // Ended: renewal refused, nothing changed; a new subscription may start.
    let (st, v) = renew(&gw, &sid, "pay-2").await;
    assert_error(st, &v, 409, "subscription_ended");
    assert_eq!(ledger(&gw, "u1").await.len(), 4);
    let s2 = subscribe(&gw, "u1", json!({"plan": "basic"})).await;
    assert_eq!(s2["status"], "active");
    let (st, v) = chat_status(&gw, &key, "demo-chat").await;
    assert_eq!(st, 200, "a new subscription revives the keys: {v}");
    let (s, v) = admin(&gw, "GET", "/api/v1/accounts/u1/subscriptions", None).await;
    assert_eq!(s, 200);
    let list = v["data"].as_array().unwrap();
    assert_eq!(list.len(), 2);
    assert_eq!(list[0]["id"], s2["id"], "newest first");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rollover_carries_unused_allowance_and_without_it_it_lapses() {
    let gw = TestGateway::start_with(PLANS);
    for (id, plan) in [("r-off", "basic"), ("r-on", "roll")] {
        new_account(&gw, id).await;
        let s = subscribe(&gw, id, json!({"plan": plan})).await;
        let sid = s["id"].as_str().unwrap().to_owned();
        let (st, v) = renew(&gw, &sid, "p1").await;
        assert_eq!(st, 200, "{v}");
        let end = ms(&s["current_period_end"]);
        let start = ms(&s["current_period_start"]);
        if plan == "roll" {
            assert_eq!(end - start, 7 * DAY_MS, "a week");
        } else {
            assert!(
                (28 * DAY_MS..=31 * DAY_MS).contains(&(end - start)),
                "a month"
            );
        }
        // Both roll once: advance each to just past its own end.
        let now = gw.clock.now_ms();
        if end > now {
            advance(&gw, end - now + 1_000).await;
        }
        let s = sub(&gw, &sid).await;
        assert_eq!(s["period"], 1, "{s}");
        assert_eq!(s["status"], "active");
    }
    let on = ledger(&gw, "r-on").await;
    assert_eq!(
        on,
        vec![("grant".into(), p("0.5")), ("grant".into(), p("0.5"))],
        "rollover: no lapse"
    );
    assert_eq!(usd(&account(&gw, "r-on").await["allowance"]), p("1"));
    let off = ledger(&gw, "r-off").await;
    assert_eq!(
        off,
        vec![
            ("grant".into(), p("1")),
            ("lapse".into(), p("1")),
            ("grant".into(), p("1")),
        ]
    );
    assert_eq!(usd(&account(&gw, "r-off").await["allowance"]), p("1"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upgrade_grants_pro_rata_now_and_downgrade_waits_for_the_period() {
    let gw = TestGateway::start_with(PLANS);
    new_account(&gw, "up").await;
    let s = subscribe(&gw, "up", json!({"plan": "basic"})).await;
    let sid = s["id"].as_str().unwrap().to_owned();
    let (start, end) = (ms(&s["current_period_start"]), ms(&s["current_period_end"]));
    gw.clock
        .advance(Duration::from_millis(((end - start) / 2) as u64));
    let (st, v) = admin(
        &gw,
        "PATCH",
        &format!("/api/v1/subscriptions/{sid}"),
        Some(json!({"plan": "pro"})),
    )
    .await;
    assert_eq!(st, 200, "{v}");
    assert_eq!(v["data"]["plan"], "pro", "an upgrade applies at once");
    let (_, lv) = admin(&gw, "GET", "/api/v1/accounts/up/ledger", None).await;
    let entry = &lv["data"][0];
    assert_eq!(entry["kind"], "grant");
    let at = ms(&entry["at"]);
    let want = (3 * 1_000_000_000_000i128 * i128::from(end - at) / i128::from(end - start)) as i64;
    assert_eq!(
        usd(&entry["amount"]),
        Pico(want),
        "(4 − 1) × time left / period"
    );
    assert!(
        want > p("1.49").0 && want < p("1.51").0,
        "about half of 3 USD: {want}"
    );
    // The same upgrade again grants nothing.
    let (st, _) = admin(
        &gw,
        "PATCH",
        &format!("/api/v1/subscriptions/{sid}"),
        Some(json!({"plan": "pro"})),
    )
    .await;
    assert_eq!(st, 200);
    assert_eq!(ledger(&gw, "up").await.len(), 2);
    // Downgrade: waits for the next period.
    let (st, v) = admin(
        &gw,
        "PATCH",
        &format!("/api/v1/subscriptions/{sid}"),
        Some(json!({"plan": "basic", "cancel_at_period_end": false})),
    )
    .await;
    assert_eq!(st, 200, "{v}");
    assert_eq!(v["data"]["plan"], "pro");
    assert_eq!(v["data"]["next_plan"], "basic");
    assert_eq!(
        ledger(&gw, "up").await.len(),
        2,
        "a downgrade moves no money now"
    );
    let (st, _) = renew(&gw, &sid, "p1").await;
    assert_eq!(st, 200);
    advance(&gw, end - gw.clock.now_ms() + 1_000).await;
    let s = sub(&gw, &sid).await;
    assert_eq!(s["plan"], "basic", "{s}");
    assert!(s["next_plan"].is_null());
    assert_eq!(s["period"], 1);
    let l = ledger(&gw, "up").await;
    assert_eq!(
        l,
        vec![
            ("grant".into(), p("1")),
            ("grant".into(), Pico(want)),
            ("lapse".into(), Pico(p("1").0 + want)),
            ("grant".into(), p("1")),
        ],
        "period 1 is granted at the downgraded plan"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancel_at_period_end_ends_cleanly_and_the_template_applies_meanwhile() {
    let gw = TestGateway::start_with(PLANS);
    new_account(&gw, "c1").await;
    let (key, hash) = gw.create_key(json!({"name": "k", "owner": "c1"})).await;
    let (st, v) = chat_status(&gw, &key, "demo-chat").await;
    assert_eq!(st, 402, "no money yet: {v}");
    let s = subscribe(&gw, "c1", json!({"plan": "embed_only"})).await;
    let sid = s["id"].as_str().unwrap().to_owned();
    // The plan's template (models = demo-embed) applies to the key.
    let (st, v) = chat_status(&gw, &key, "demo-chat").await;
    assert_error(st, &v, 403, "model_not_allowed");
    let (st, v) = chat_status(&gw, &key, "demo-embed").await;
    assert_eq!(st, 200, "{v}");
    // The key's own record is unchanged.
    let v = gw.admin_get(&format!("/api/v1/keys/{hash}")).await;
    assert!(v["data"]["plan"].is_null(), "{v}");
    assert_eq!(v["data"]["status"], "active");

    let (st, v) = admin(
        &gw,
        "POST",
        &format!("/api/v1/subscriptions/{sid}/cancel"),
        Some(json!({"at_period_end": true})),
    )
    .await;
    assert_eq!(st, 200, "{v}");
    assert_eq!(v["data"]["status"], "active");
    assert_eq!(v["data"]["cancel_at_period_end"], true);
    let (st, v) = chat_status(&gw, &key, "demo-embed").await;
    assert_eq!(st, 200, "still live until the end: {v}");
    gw.flush().await;
    let allowance = usd(&account(&gw, "c1").await["allowance"]);
    advance(
        &gw,
        ms(&s["current_period_end"]) - gw.clock.now_ms() + 1_000,
    )
    .await;
    let s = sub(&gw, &sid).await;
    assert_eq!(s["status"], "canceled", "{s}");
    assert!(s["ended_at"].is_string());
    assert_eq!(
        ledger(&gw, "c1").await,
        vec![("grant".into(), p("1")), ("lapse".into(), allowance)]
    );
    let (st, v) = chat_status(&gw, &key, "demo-embed").await;
    assert_error(st, &v, 402, "subscription_inactive");
    let (st, v) = admin(
        &gw,
        "POST",
        &format!("/api/v1/subscriptions/{sid}/cancel"),
        Some(json!({"at_period_end": false})),
    )
    .await;
    assert_error(st, &v, 409, "subscription_ended");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_is_a_clear_4xx_and_changes_nothing() {
    let gw = TestGateway::start_with(PLANS);
    new_account(&gw, "b1").await;
    let path = "/api/v1/accounts/b1/subscriptions";
    for (body, status, code) in [
        (json!({"plan": "nope"}), 400, "unknown_plan"),
        (json!({"plan": "trial"}), 400, "plan_not_subscribable"),
        (
            json!({"plan": "basic", "trial_days": -1}),
            400,
            "invalid_type",
        ),
        (
            json!({"plan": "basic", "trial_days": 400}),
            400,
            "invalid_value",
        ),
        (json!({"plan": "basic", "price": "1"}), 400, "unknown_field"),
        (json!({}), 400, "missing_field"),
    ] {
        let (s, v) = admin(&gw, "POST", path, Some(body.clone())).await;
        assert_error(s, &v, status, code);
    }
    let (s, v) = admin(
        &gw,
        "POST",
        "/api/v1/accounts/ghost/subscriptions",
        Some(json!({"plan": "basic"})),
    )
    .await;
    assert_error(s, &v, 404, "not_found");
    assert!(ledger(&gw, "b1").await.is_empty(), "nothing was granted");
    let first = subscribe(&gw, "b1", json!({"plan": "basic"})).await;
    let sid = first["id"].as_str().unwrap();
    let (s, v) = admin(&gw, "POST", path, Some(json!({"plan": "pro"}))).await;
    assert_error(s, &v, 409, "subscription_exists");
    for (p, body, status, code) in [
        ("/api/v1/subscriptions/sub_nope", None, 404, "not_found"),
        (
            "/api/v1/subscriptions/sub_nope/renew",
            Some(json!({"idempotency_key": "x"})),
            404,
            "not_found",
        ),
    ] {
        let method = if body.is_some() { "POST" } else { "GET" };
        let (s, v) = admin(&gw, method, p, body).await;
        assert_error(s, &v, status, code);
    }
    let renew_path = format!("/api/v1/subscriptions/{sid}/renew");
    let (s, v) = admin(&gw, "POST", &renew_path, Some(json!({}))).await;
    assert_error(s, &v, 400, "missing_field");
    let (s, v) = admin(
        &gw,
        "POST",
        &renew_path,
        Some(json!({"idempotency_key": ""})),
    )
    .await;
    assert_error(s, &v, 400, "invalid_value");
    let patch = format!("/api/v1/subscriptions/{sid}");
    let (s, v) = admin(&gw, "PATCH", &patch, Some(json!({"plan": "nope"}))).await;
    assert_error(s, &v, 400, "unknown_plan");
    let (s, v) = admin(&gw, "PATCH", &patch, Some(json!({}))).await;
    assert_error(s, &v, 400, "missing_field");
    // A live subscription holds the account: delete refused unless forced.
    let (s, v) = admin(&gw, "DELETE", "/api/v1/accounts/b1", None).await;
    assert_error(s, &v, 409, "account_has_subscription");
    let s = sub(&gw, sid).await;
    assert_eq!(s["plan"], "basic");
    assert_eq!(s["paid_through"], 0);
    assert_eq!(ledger(&gw, "b1").await, vec![("grant".into(), p("1"))]);
    let (st, v) = admin(&gw, "DELETE", "/api/v1/accounts/b1?force=true", None).await;
    assert_eq!(st, 200, "{v}");
    assert_eq!(sub(&gw, sid).await["status"], "canceled");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn trial_keys_answer_expired_once_past_their_expiry() {
    let gw = TestGateway::start_with(PLANS);
    let (key, hash) = gw
        .create_key(json!({"name": "t", "plan": "trial", "owner": "x1"}))
        .await;
    let v = gw.admin_get(&format!("/api/v1/keys/{hash}")).await;
    assert_eq!(v["data"]["status"], "active", "{v}");
    gw.clock.advance(Duration::from_millis(8 * DAY_MS as u64));
    let v = gw.admin_get(&format!("/api/v1/keys/{hash}")).await;
    assert_eq!(v["data"]["status"], "expired", "{v}");
    let v = gw.admin_get("/api/v1/keys").await;
    let listed = v["data"]
        .as_array()
        .unwrap()
        .iter()
        .find(|k| k["hash"] == hash.as_str())
        .cloned()
        .unwrap();
    assert_eq!(listed["status"], "expired");
    let (st, v) = chat_status(&gw, &key, "demo-chat").await;
    assert_error(st, &v, 403, "key_expired");
}

/// The Rust API payments call: a failed payment marks it past due, a
/// later payment revives it; unpaid, it expires `grace` after the failure.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn payments_api_past_due_then_paid_then_past_due_to_expiry() {
    use tollgate::store::SubscriptionStatus as St;
    let gw = TestGateway::start_with(PLANS);
    new_account(&gw, "pay").await;
    let b = Billing::of(gw.app());
    let s = b
        .subscribe("pay", "basic", None, Some("ext-9".into()))
        .await
        .unwrap();
    assert_eq!(s.status, St::Active);
    assert_eq!(b.by_external_id("ext-9").unwrap().unwrap().id, s.id);
    let s = b.mark_past_due(&s.id).await.unwrap();
    assert_eq!(s.status, St::PastDue);
    let (s, replayed) = b.renew(&s.id, "inv-1").await.unwrap();
    assert!(!replayed);
    assert_eq!(s.status, St::Active);
    assert!(s.past_due_since.is_none());
    let s = b.mark_past_due(&s.id).await.unwrap();
    advance(&gw, 3 * DAY_MS + 1_000).await;
    let s = b.get(&s.id).unwrap();
    assert_eq!(s.status, St::Expired, "grace counts from the failure");
    assert_eq!(s.period, 0, "it never reached its period end");
    let e = b.renew(&s.id, "inv-2").await.unwrap_err();
    assert_eq!(e.code, "subscription_ended");
    let (_, replayed) = b.renew(&s.id, "inv-1").await.unwrap();
    assert!(replayed, "an applied renewal replays even once ended");
    assert_eq!(
        kinds(&ledger(&gw, "pay").await),
        vec!["grant", "lapse"],
        "period 0 granted once, lapsed at expiry"
    );
}

fn hash_bytes(hex_hash: &str) -> KeyHash {
    hex::decode(hex_hash).unwrap().try_into().unwrap()
}

/// kill -9 of the real binary while the sweeper rolls many subscriptions
/// (each renewed, so each rolls with a lapse and a grant) and renewals and
/// upgrades race it under usage; after a restart: every (subscription,
/// period) was granted exactly once, each account's allowance is what its
/// ledger and usage say, and spent = Σ records + ledger.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_during_grants_and_renewals_never_grants_twice() {
    use std::io::BufRead;
    use std::process::{Child, Command, Stdio};
    let data = temp_dir("subkill");
    let config = data.join("config.toml");
    std::fs::write(
        &config,
        format!(
            r#"[server]
listen = "127.0.0.1:0"
[storage]
path = "{}"
flush_ms = 5
[limits]
sweep_interval = "10ms"
[[upstreams]]
name = "mock"
mock = true
models = ["demo-*"]
[models."demo-chat"]
input = "0.15"
output = "0.60"
[plans.basic]
interval = "day"
grant = "1"
grace = "1d"
[plans.pro]
interval = "day"
grant = "3"
"#,
            data.join("db").display()
        ),
    )
    .unwrap();
    let start = |offset_days: i64| -> (Child, String) {
        let mut child = Command::new(env!("CARGO_BIN_EXE_tollgate"))
            .args(["serve", "--config", config.to_str().unwrap()])
            .env("TOLLGATE_ADMIN_TOKEN", ADMIN)
            .env("TOLLGATE_LOG", "warn")
            .env(
                "TOLLGATE_CLOCK_OFFSET_MS",
                (offset_days * DAY_MS).to_string(),
            )
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        let mut out = std::io::BufReader::new(child.stdout.take().unwrap());
        let mut line = String::new();
        while !line.contains("listening on http://") {
            line.clear();
            assert!(
                out.read_line(&mut line).unwrap() > 0,
                "the gateway did not start"
            );
        }
        let addr = line.trim().rsplit("http://").next().unwrap().to_owned();
        (child, addr)
    };
    let admin_h = [("authorization", format!("Bearer {ADMIN}"))];
    let admin_h: Vec<(&str, &str)> = admin_h.iter().map(|(k, v)| (*k, v.as_str())).collect();
    const N: usize = 40;

    // Run 1 (day 0): accounts, keys, subscriptions, each renewed for day 1.
    let (mut child, addr) = start(0);
    let url = |a: &str, p: &str| format!("http://{a}{p}");
    let mut subs = Vec::new();
    let mut keys = Vec::new();
    for i in 0..N {
        let id = format!("k{i}");
        let (s, _, v) = send(
            "POST",
            &url(&addr, "/api/v1/accounts"),
            &admin_h,
            Some(json!({"id": id})),
        )
        .await;
        assert_eq!(s, 201, "{v}");
        let (s, _, v) = send(
            "POST",
            &url(&addr, "/api/v1/keys"),
            &admin_h,
            Some(json!({"name": "k", "owner": id})),
        )
        .await;
        assert_eq!(s, 201, "{v}");
        keys.push((
            v["key"].as_str().unwrap().to_owned(),
            v["data"]["hash"].as_str().unwrap().to_owned(),
        ));
        let (s, _, v) = send(
            "POST",
            &url(&addr, &format!("/api/v1/accounts/{id}/subscriptions")),
            &admin_h,
            Some(json!({"plan": "basic"})),
        )
        .await;
        assert_eq!(s, 201, "{v}");
        let sid = v["data"]["id"].as_str().unwrap().to_owned();
        let (s, _, v) = send(
            "POST",
            &url(&addr, &format!("/api/v1/subscriptions/{sid}/renew")),
            &admin_h,
            Some(json!({"idempotency_key": "day1"})),
        )
        .await;
        assert_eq!(s, 200, "{v}");
        subs.push((id, sid));
    }
    Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    child.wait().unwrap();

    // Run 2 (day 1, a little after): the sweeper rolls them all at start,
    // while renewals (new and replayed), upgrades and usage race it; kill -9.
    let (mut child, addr) = start(1);
    let mut tasks = Vec::new();
    for (i, (_, sid)) in subs.iter().enumerate() {
        let (u, sid) = (addr.clone(), sid.clone());
        let key = keys[i].0.clone();
        tasks.push(tokio::spawn(async move {
            let h = [("authorization", format!("Bearer {ADMIN}"))];
            let h: Vec<(&str, &str)> = h.iter().map(|(k, v)| (*k, v.as_str())).collect();
            for round in 0..3 {
                let _ = tokio::time::timeout(
                    Duration::from_secs(2),
                    send(
                        "POST",
                        &format!("http://{u}/api/v1/subscriptions/{sid}/renew"),
                        &h,
                        Some(json!({"idempotency_key": if round == 0 { "day1".to_owned() } else { format!("day{}", round + 1) }})),
                    ),
                )
                .await;
                if i % 4 == 0 {
                    let _ = tokio::time::timeout(
                        Duration::from_secs(2),
                        send(
                            "PATCH",
                            &format!("http://{u}/api/v1/subscriptions/{sid}"),
                            &h,
                            Some(json!({"plan": "pro"})),
                        ),
                    )
                    .await;
                }
                let _ = tokio::time::timeout(
                    Duration::from_secs(2),
                    send(
                        "POST",
                        &format!("http://{u}/v1/chat/completions"),
                        &[("authorization", &bearer(&key))],
                        Some(chat("demo-chat", false)),
                    ),
                )
                .await;
            }
        }));
    }
    tokio::time::sleep(Duration::from_millis(150)).await;
    child.kill().unwrap(); // SIGKILL
    child.wait().unwrap();
    for t in tasks {
        let _ = t.await;
    }

    // Run 3: same day; the sweeper finishes what run 2 did not. Replaying
    // every renewal key must change nothing.
    let (mut child, addr) = start(1);
    for (_, sid) in &subs {
        for k in ["day1", "day2", "day3"] {
            let (s, _, v) = send(
                "POST",
                &url(&addr, &format!("/api/v1/subscriptions/{sid}/renew")),
                &admin_h,
                Some(json!({"idempotency_key": k})),
            )
            .await;
            assert_eq!(s, 200, "{v}");
        }
    }
    let mut rolled = 0;
    for _ in 0..200 {
        rolled = 0;
        for (_, sid) in &subs {
            let (_, _, v) = send(
                "GET",
                &url(&addr, &format!("/api/v1/subscriptions/{sid}")),
                &admin_h,
                None,
            )
            .await;
            if v["data"]["period"].as_u64() >= Some(1) {
                rolled += 1;
            }
        }
        if rolled == N {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(rolled, N, "every subscription rolled into day 1");
    Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    child.wait().unwrap();

    // The books, straight from the store.
    let store = tollgate::store::Store::open(&data.join("db"), 5).unwrap();
    for (i, (id, sid)) in subs.iter().enumerate() {
        let a = store.user_account(id).unwrap().unwrap();
        let s = store.subscription(sid).unwrap().unwrap();
        let mut entries = store.account_ledger(id, 0, 10_000).unwrap();
        entries.reverse();
        // Period grants: exactly one per period reached, named by period.
        for period in 0..=s.period {
            let n = entries
                .iter()
                .filter(|e| {
                    e.kind == AccountCreditKind::Grant
                        && e.reason.ends_with(&format!("period {period} grant"))
                })
                .count();
            assert_eq!(n, 1, "{id}: period {period} granted {n} times: {entries:?}");
        }
        let upgrades = entries
            .iter()
            .filter(|e| e.kind == AccountCreditKind::Grant && e.reason.contains("upgrade"))
            .count();
        assert!(
            upgrades <= 2,
            "{id}: at most one upgrade grant per period: {entries:?}"
        );
        let seqs: Vec<u64> = entries.iter().map(|e| e.seq).collect();
        assert_eq!(
            seqs,
            (1..=entries.len() as u64).collect::<Vec<_>>(),
            "{id}: ledger gapless"
        );
        assert_eq!(a.ledger_seq, entries.len() as u64);
        // spent = Σ records + ledger (no deducts here); every charge came
        // out of allowance + balance, so they are what the grants and
        // lapses and the usage leave.
        let h = hash_bytes(&keys[i].1);
        let records: i64 = store
            .usage(&h, 0, 100_000)
            .unwrap()
            .iter()
            .map(|r| r.cost.0)
            .sum();
        assert_eq!(a.spent.0, records, "{id}: spent = Σ records + ledger");
        let moved: i64 = entries
            .iter()
            .map(|e| match e.kind {
                AccountCreditKind::Grant => e.amount.0,
                AccountCreditKind::Lapse => -e.amount.0,
                _ => 0,
            })
            .sum();
        assert_eq!(
            a.allowance.0 + a.balance.0,
            moved - records,
            "{id}: allowance + balance = grants − lapses − usage"
        );
        assert!(s.paid_through >= 1);
    }
    drop(store);
    let _ = std::fs::remove_dir_all(&data);
}

/// Each subscription change puts its event in the outbox and its audit
/// entry in the log, once: created, renewed, past_due, canceled; a replayed
/// renewal adds neither.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn subscription_changes_emit_events_and_audit_once() {
    let gw = TestGateway::start_with(PLANS);
    new_account(&gw, "ev1").await;
    let s = subscribe(&gw, "ev1", json!({"plan": "basic"})).await;
    let sid = s["id"].as_str().unwrap().to_owned();
    let (st, v) = renew(&gw, &sid, "pay-1").await;
    assert_eq!(st, 200, "{v}");
    let (st, v) = renew(&gw, &sid, "pay-1").await;
    assert_eq!(st, 200, "{v}");
    // Past the paid periods' end without a renewal: past_due.
    advance(&gw, 62 * 86_400_000).await;
    let (st, v) = admin(
        &gw,
        "POST",
        &format!("/api/v1/subscriptions/{sid}/cancel"),
        Some(json!({"at_period_end": false})),
    )
    .await;
    assert_eq!(st, 200, "{v}");
    let (st, events) = admin(&gw, "GET", "/api/v1/events?limit=100", None).await;
    assert_eq!(st, 200, "{events}");
    let kinds: Vec<&str> = events["data"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|e| e["type"].as_str())
        .filter(|t| t.starts_with("subscription."))
        .collect();
    for k in [
        "subscription.created",
        "subscription.renewed",
        "subscription.past_due",
        "subscription.canceled",
    ] {
        assert_eq!(
            kinds.iter().filter(|x| **x == k).count(),
            1,
            "{k} once: {kinds:?}"
        );
    }
    let (st, audit) = admin(&gw, "GET", &format!("/api/v1/audit?target={sid}"), None).await;
    assert_eq!(st, 200, "{audit}");
    let actions: Vec<&str> = audit["data"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|e| e["action"].as_str())
        .collect();
    // create, renew, cancel by the admin (the replay and the clock's
    // past_due are not admin writes).
    assert_eq!(actions.len(), 3, "{audit}");
    assert!(
        actions.iter().all(|a| *a == "subscription.write"),
        "{audit}"
    );
}
