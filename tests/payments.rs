//! Payments over loopback (issue 11): Stripe events signed here as Stripe
//! signs them, a local mock of Stripe's checkout endpoint, epay orders and
//! notifications, manual payments, reconcile, and a SIGKILL while a
//! notification is being applied.

mod common;

use std::convert::Infallible;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use common::*;
use hmac::{Hmac, Mac};
use http_body_util::{BodyExt, Full};
use serde_json::{Value, json};
use sha2::Sha256;
use tollgate::config::RuntimeMode;

const WHSEC: &str = "whsec_tollgate_test_secret_0123456789";
const SK: &str = "sk_test_tollgate";
const EPAY_KEY: &str = "KEY123";

both_modes!(
    topup_applies_once_and_is_listed,
    twenty_concurrent_deliveries_apply_once,
    refunds_take_back_what_is_newly_refunded,
    bad_deliveries_are_refused_and_change_nothing,
    wrong_currency_and_unknown_account_need_attention,
    a_key_without_account_is_topped_up,
    subscription_events_drive_the_subscription,
    checkout_calls_stripe_with_the_form,
    epay_order_is_applied_once_and_wrong_money_refused,
    epay_external_orders_credit_by_email_once,
    manual_payments_are_idempotent_on_reference,
    reconcile_finds_what_does_not_match,
);

/// The env vars the test config names, set once for the whole binary.
fn set_env() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        // SAFETY: set once, before any gateway reads them, always to the
        // same values; only Rust code reads the environment (std's lock).
        #[allow(unsafe_code)]
        unsafe {
            std::env::set_var("TOLLGATE_TEST_STRIPE_WHSEC", WHSEC);
            std::env::set_var("TOLLGATE_TEST_STRIPE_SK", SK);
            std::env::set_var("TOLLGATE_TEST_EPAY_KEY", EPAY_KEY);
        }
    });
}

fn payments_config(stripe_api: &str) -> String {
    format!(
        r#"
[plans.pro]
limit = "20"
stripe_price = "price_pro_monthly"
interval = "month"
grant = "20"
grace = "3d"
[payments.stripe]
secret_key_env = "TOLLGATE_TEST_STRIPE_SK"
webhook_secret_env = "TOLLGATE_TEST_STRIPE_WHSEC"
api_base = "{stripe_api}"
success_url = "https://shop.example/paid"
cancel_url = "https://shop.example/cancel"
[payments.epay]
pid = "1001"
key_env = "TOLLGATE_TEST_EPAY_KEY"
submit_url = "https://pay.example/submit.php"
notify_url = "https://gw.example/api/v1/payments/epay/notify"
return_url = "https://shop.example/back"
accept_external_orders = true
"#
    )
}

fn start(mode: RuntimeMode) -> TestGateway {
    set_env();
    TestGateway::start_mode(mode, &payments_config("http://127.0.0.1:1"), |_| {})
}

fn admin() -> String {
    format!("Bearer {ADMIN}")
}

async fn create_account(gw: &TestGateway, id: &str, email: &str) {
    let (s, _, v) = send(
        "POST",
        &gw.url("/api/v1/accounts"),
        &[("authorization", &admin())],
        Some(json!({"id": id, "email": email})),
    )
    .await;
    assert_eq!(s, 201, "{v}");
}

async fn balance(gw: &TestGateway, id: &str) -> String {
    let v = gw.admin_get(&format!("/api/v1/accounts/{id}")).await;
    v["data"]["balance"].to_string()
}

async fn payments_of(gw: &TestGateway, query: &str) -> Vec<Value> {
    let v = gw.admin_get(&format!("/api/v1/payments?{query}")).await;
    v["data"].as_array().expect("a list").clone()
}

fn signature(body: &[u8], t: i64) -> String {
    let mut mac = Hmac::<Sha256>::new_from_slice(WHSEC.as_bytes()).unwrap();
    mac.update(format!("{t}.").as_bytes());
    mac.update(body);
    hex::encode(mac.finalize().into_bytes())
}

/// Delivers `body` to the webhook as Stripe would, signed at `t`.
async fn deliver_at(gw: &TestGateway, body: &[u8], t: i64) -> (u16, Value) {
    let sig = format!("t={t},v1={}", signature(body, t));
    deliver_raw(gw, Bytes::copy_from_slice(body), Some(&sig)).await
}

async fn deliver(gw: &TestGateway, body: &[u8]) -> (u16, Value) {
    deliver_at(gw, body, gw.clock.now_secs()).await
}

async fn deliver_raw(gw: &TestGateway, body: Bytes, sig: Option<&str>) -> (u16, Value) {
    let mut headers = vec![];
    if let Some(s) = sig {
        headers.push(("stripe-signature", s));
    }
    let (s, _, b) = send_raw(raw_request(
        "POST",
        &gw.url("/api/v1/payments/stripe/webhook"),
        &headers,
        body,
    ))
    .await;
    (s, serde_json::from_slice(&b).unwrap_or(Value::Null))
}

fn event(id: &str, kind: &str, object: Value) -> Vec<u8> {
    serde_json::to_vec(&json!({
        "id": id, "object": "event", "type": kind, "created": 1_700_000_000,
        "data": {"object": object}
    }))
    .unwrap()
}

fn topup_event(id: &str, account: &str, cents: i64, currency: &str) -> Vec<u8> {
    event(
        id,
        "checkout.session.completed",
        json!({"id": format!("cs_{id}"), "object": "checkout.session", "mode": "payment",
               "payment_status": "paid", "status": "complete", "amount_total": cents,
               "currency": currency, "client_reference_id": account,
               "payment_intent": format!("pi_{id}"),
               "metadata": {"account": account, "kind": "topup"}}),
    )
}

fn refund_event(id: &str, pi: &str, amount: i64, refunded: i64) -> Vec<u8> {
    event(
        id,
        "charge.refunded",
        json!({"id": format!("ch_{pi}"), "object": "charge", "amount": amount,
               "amount_refunded": refunded, "currency": "usd", "payment_intent": pi,
               "refunded": refunded == amount}),
    )
}

async fn topup_applies_once_and_is_listed(mode: RuntimeMode) {
    let gw = start(mode);
    create_account(&gw, "acct-1", "one@example.com").await;
    let body = topup_event("evt_t1", "acct-1", 1000, "usd");
    let (s, v) = deliver(&gw, &body).await;
    assert_eq!(s, 200, "{v}");
    assert_eq!(v["status"], "succeeded", "{v}");
    assert_eq!(v["replayed"], false);
    assert_eq!(balance(&gw, "acct-1").await, "10");
    // Stripe retries: the same event again changes nothing.
    let (s, v) = deliver(&gw, &body).await;
    assert_eq!(s, 200);
    assert_eq!(v["replayed"], true, "{v}");
    assert_eq!(balance(&gw, "acct-1").await, "10");
    let list = payments_of(&gw, "account=acct-1").await;
    assert_eq!(list.len(), 1, "{list:?}");
    let p = &list[0];
    assert_eq!(p["provider"], "stripe");
    assert_eq!(p["provider_id"], "cs_evt_t1");
    assert_eq!(p["amount"].to_string(), "10");
    assert_eq!(p["currency"], "usd");
    assert_eq!(p["kind"], "topup");
    assert_eq!(p["ledger"].as_array().unwrap().len(), 1);
    let one = gw
        .admin_get(&format!("/api/v1/payments/{}", p["id"].as_str().unwrap()))
        .await;
    assert_eq!(one["data"]["id"], p["id"]);
    let ledger = gw.admin_get("/api/v1/accounts/acct-1/ledger").await;
    let entries = ledger["data"].as_array().unwrap();
    assert_eq!(entries.len(), 1, "one ledger entry: {ledger}");
    assert_eq!(entries[0]["kind"], "topup");
    assert_eq!(entries[0]["amount"].to_string(), "10");
    // The same session under another event id (async_payment_succeeded) is
    // the same payment: applied once.
    let mut again: Value = serde_json::from_slice(&body).unwrap();
    again["id"] = json!("evt_t1_async");
    again["type"] = json!("checkout.session.async_payment_succeeded");
    let (s, v) = deliver(&gw, &serde_json::to_vec(&again).unwrap()).await;
    assert_eq!((s, &v["replayed"]), (200, &json!(true)), "{v}");
    assert_eq!(balance(&gw, "acct-1").await, "10");
    // An unknown type is answered 200 and ignored.
    let (s, v) = deliver(
        &gw,
        &event("evt_other", "customer.created", json!({"id": "cus_1"})),
    )
    .await;
    assert_eq!((s, &v["ignored"]), (200, &json!(true)), "{v}");
    assert_eq!(payments_of(&gw, "").await.len(), 1);
}

async fn twenty_concurrent_deliveries_apply_once(mode: RuntimeMode) {
    let gw = Arc::new(start(mode));
    create_account(&gw, "acct-c", "c@example.com").await;
    let body = Arc::new(topup_event("evt_c1", "acct-c", 1234, "usd"));
    let mut tasks = Vec::new();
    for _ in 0..20 {
        let (gw, body) = (gw.clone(), body.clone());
        tasks.push(tokio::spawn(async move { deliver(&gw, &body).await }));
    }
    let mut fresh = 0;
    for t in tasks {
        let (s, v) = t.await.unwrap();
        assert_eq!(s, 200, "{v}");
        if v["replayed"] == false {
            fresh += 1;
        }
    }
    assert_eq!(fresh, 1, "exactly one delivery applied it");
    assert_eq!(balance(&gw, "acct-c").await, "12.34");
    assert_eq!(payments_of(&gw, "account=acct-c").await.len(), 1);
    let ledger = gw.admin_get("/api/v1/accounts/acct-c/ledger").await;
    assert_eq!(ledger["data"].as_array().unwrap().len(), 1);
}

async fn refunds_take_back_what_is_newly_refunded(mode: RuntimeMode) {
    let gw = start(mode);
    create_account(&gw, "acct-r", "r@example.com").await;
    let (s, _) = deliver(&gw, &topup_event("evt_r1", "acct-r", 1000, "usd")).await;
    assert_eq!(s, 200);
    // The account spends 8 of it.
    let (s, _, v) = send(
        "POST",
        &gw.url("/api/v1/accounts/acct-r/credits"),
        &[("authorization", &admin())],
        Some(json!({"amount": "8", "kind": "deduct", "reason": "used"})),
    )
    .await;
    assert_eq!(s, 200, "{v}");
    assert_eq!(balance(&gw, "acct-r").await, "2");
    // A partial refund of 3: into overdraft, recorded.
    let (s, v) = deliver(&gw, &refund_event("evt_r2", "pi_evt_r1", 1000, 300)).await;
    assert_eq!(s, 200, "{v}");
    assert_eq!(v["status"], "partially_refunded", "{v}");
    assert_eq!(balance(&gw, "acct-r").await, "-1");
    // Replayed: nothing more.
    let (s, v) = deliver(&gw, &refund_event("evt_r2", "pi_evt_r1", 1000, 300)).await;
    assert_eq!((s, &v["replayed"]), (200, &json!(true)));
    assert_eq!(balance(&gw, "acct-r").await, "-1");
    // Then the whole of it: only the 7 newly refunded come off.
    let (s, v) = deliver(&gw, &refund_event("evt_r3", "pi_evt_r1", 1000, 1000)).await;
    assert_eq!(s, 200, "{v}");
    assert_eq!(v["status"], "refunded", "{v}");
    assert_eq!(balance(&gw, "acct-r").await, "-8");
    // A stale event repeating an older total takes nothing.
    let (s, _) = deliver(&gw, &refund_event("evt_r4", "pi_evt_r1", 1000, 300)).await;
    assert_eq!(s, 200);
    assert_eq!(balance(&gw, "acct-r").await, "-8");
    let p = &payments_of(&gw, "account=acct-r").await[0];
    assert_eq!(p["refunded"].to_string(), "10", "{p}");
    assert_eq!(p["status"], "refunded");
    let kinds: Vec<&str> = p["ledger"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["kind"].as_str().unwrap())
        .collect();
    assert_eq!(kinds, ["topup", "reversal", "reversal"], "{p}");
    let ledger = gw.admin_get("/api/v1/accounts/acct-r/ledger").await;
    assert_eq!(ledger["data"][0]["kind"], "reversal");
    assert_eq!(ledger["data"][0]["balance_after"].to_string(), "-8");
    // The live wallet agrees with the store after a reload.
    gw.app().gate.wallets().reset("acct-r");
    assert_eq!(balance(&gw, "acct-r").await, "-8");
    // A refund of a payment Tollgate never saw is recorded for attention.
    let (s, v) = deliver(&gw, &refund_event("evt_r5", "pi_unknown", 500, 500)).await;
    assert_eq!((s, &v["status"]), (200, &json!("needs_attention")), "{v}");
}

async fn bad_deliveries_are_refused_and_change_nothing(mode: RuntimeMode) {
    let gw = start(mode);
    create_account(&gw, "acct-b", "b@example.com").await;
    let now = gw.clock.now_secs();
    let good = topup_event("evt_b1", "acct-b", 1000, "usd");
    // Tampered: signed one amount, sent another.
    let tampered = topup_event("evt_b1", "acct-b", 1_000_000, "usd");
    let sig = format!("t={now},v1={}", signature(&good, now));
    let (s, v) = deliver_raw(&gw, Bytes::from(tampered), Some(&sig)).await;
    assert_error(s, &v, 400, "invalid_signature");
    // Stale and future timestamps, by more than 300 s (by 320: the clock
    // moves on while the test runs, and on a loaded machine a second or
    // two pass between `now` and the delivery; `now + 301` was then within
    // 300 s of the gateway's clock and taken).
    for t in [now - 320, now + 320] {
        let (s, v) = deliver_at(&gw, &good, t).await;
        assert_error(s, &v, 400, "invalid_signature");
    }
    // Within 300 s either way it is taken; moving our clock makes it stale.
    let (s, v) = deliver_at(&gw, &topup_event("evt_b2", "acct-b", 100, "usd"), now + 200).await;
    assert_eq!(s, 200, "{v}");
    gw.clock.advance(Duration::from_secs(600));
    let (s, v) = deliver_at(&gw, &topup_event("evt_b3", "acct-b", 100, "usd"), now).await;
    assert_error(s, &v, 400, "invalid_signature");
    // No signature, a malformed one, a wrong secret.
    let (s, v) = deliver_raw(&gw, Bytes::from(good.clone()), None).await;
    assert_error(s, &v, 400, "invalid_signature");
    let (s, v) = deliver_raw(&gw, Bytes::from(good.clone()), Some("t=abc,v1=zz")).await;
    assert_error(s, &v, 400, "invalid_signature");
    // Garbage JSON, correctly signed.
    let (s, v) = deliver(&gw, b"{not json").await;
    assert_error(s, &v, 400, "invalid_event");
    // A 10 MiB body is refused before anything is read into a payment.
    // (The server may answer 413 and close while the client still sends:
    // then the client sees the connection end instead of the answer.)
    let big = Bytes::from(vec![b' '; 10 * 1024 * 1024]);
    let req = raw_request(
        "POST",
        &gw.url("/api/v1/payments/stripe/webhook"),
        &[("stripe-signature", &sig)],
        big,
    );
    match client().request(req).await {
        Ok(res) => assert_eq!(res.status(), 413),
        Err(e) => assert!(!e.is_connect(), "{e}"),
    }
    assert_eq!(balance(&gw, "acct-b").await, "1", "only evt_b2 applied");
    assert_eq!(payments_of(&gw, "").await.len(), 1);
    // Other methods.
    let (s, _, _) = send("GET", &gw.url("/api/v1/payments/stripe/webhook"), &[], None).await;
    assert_eq!(s, 405);
}

async fn wrong_currency_and_unknown_account_need_attention(mode: RuntimeMode) {
    let gw = start(mode);
    create_account(&gw, "acct-w", "w@example.com").await;
    let (s, v) = deliver(&gw, &topup_event("evt_w1", "acct-w", 1000, "eur")).await;
    assert_eq!((s, &v["status"]), (200, &json!("needs_attention")), "{v}");
    let (s, v) = deliver(&gw, &topup_event("evt_w2", "nobody", 1000, "usd")).await;
    assert_eq!((s, &v["status"]), (200, &json!("needs_attention")), "{v}");
    assert_eq!(balance(&gw, "acct-w").await, "0");
    let list = payments_of(&gw, "status=needs_attention").await;
    assert_eq!(list.len(), 2, "{list:?}");
    assert!(
        list.iter()
            .all(|p| p["ledger"].as_array().unwrap().is_empty())
    );
    assert!(
        list.iter()
            .any(|p| p["reason"].as_str().unwrap().contains("currency"))
    );
    assert!(
        list.iter()
            .any(|p| p["reason"].as_str().unwrap().contains("unknown account"))
    );
    assert_eq!(payments_of(&gw, "status=succeeded").await.len(), 0);
    // Not lost: redelivery is still one record each.
    let (s, v) = deliver(&gw, &topup_event("evt_w2", "nobody", 1000, "usd")).await;
    assert_eq!((s, &v["replayed"]), (200, &json!(true)));
    assert_eq!(payments_of(&gw, "").await.len(), 2);
    let (s, _, v) = send(
        "GET",
        &gw.url("/api/v1/payments?status=bogus"),
        &[("authorization", &admin())],
        None,
    )
    .await;
    assert_error(s, &v, 400, "invalid_query");
}

async fn a_key_without_account_is_topped_up(mode: RuntimeMode) {
    let gw = start(mode);
    let (_, hash) = gw.create_key(json!({"name": "solo", "limit": "1"})).await;
    let body = event(
        "evt_k1",
        "checkout.session.completed",
        json!({"id": "cs_k1", "mode": "payment", "payment_status": "paid", "amount_total": 250,
               "currency": "usd", "payment_intent": "pi_k1",
               "metadata": {"key": hash, "kind": "topup"}}),
    );
    let (s, v) = deliver(&gw, &body).await;
    assert_eq!((s, &v["status"]), (200, &json!("succeeded")), "{v}");
    let k = gw.admin_get(&format!("/api/v1/keys/{hash}")).await;
    assert_eq!(k["data"]["limit"].to_string(), "3.5", "{k}");
    let (s, _) = deliver(&gw, &body).await;
    assert_eq!(s, 200);
    let k = gw.admin_get(&format!("/api/v1/keys/{hash}")).await;
    assert_eq!(k["data"]["limit"].to_string(), "3.5", "applied once");
    // Refunded: taken back as spending, past the limit if need be.
    let (s, v) = deliver(&gw, &refund_event("evt_k2", "pi_k1", 250, 250)).await;
    assert_eq!((s, &v["status"]), (200, &json!("refunded")), "{v}");
    let ledger = gw.admin_get(&format!("/api/v1/keys/{hash}/ledger")).await;
    assert_eq!(ledger["data"][0]["kind"], "deduct", "{ledger}");
    assert_eq!(ledger["data"][0]["amount"].to_string(), "2.5");
    let k = gw.admin_get(&format!("/api/v1/keys/{hash}")).await;
    assert_eq!(k["data"]["usage"].to_string(), "2.5", "{k}");
}

/// Stripe's subscription events start, renew, mark past due, change and
/// cancel the account's subscription, each once per event id; an event
/// for a subscription Tollgate does not know is kept for attention.
async fn subscription_events_drive_the_subscription(mode: RuntimeMode) {
    let gw = start(mode);
    create_account(&gw, "acct-s", "s@example.com").await;
    let steps: [(&[u8], &str, &str); 5] = [
        (
            &event(
                "evt_s1",
                "checkout.session.completed",
                json!({"id": "cs_s1", "mode": "subscription", "payment_status": "paid",
                       "amount_total": 2000, "currency": "usd", "subscription": "sub_1",
                       "client_reference_id": "acct-s", "metadata": {"account": "acct-s", "plan": "pro"}}),
            ),
            "succeeded",
            "active",
        ),
        (
            &event(
                "evt_s2",
                "invoice.paid",
                json!({"id": "in_1", "subscription": "sub_1", "amount_paid": 2000, "currency": "usd"}),
            ),
            "succeeded",
            "active",
        ),
        (
            &event(
                "evt_s3",
                "invoice.payment_failed",
                json!({"id": "in_2", "parent": {"subscription_details": {"subscription": "sub_1"}},
                       "amount_due": 2000, "currency": "usd"}),
            ),
            "failed",
            "past_due",
        ),
        (
            &event(
                "evt_s4",
                "customer.subscription.updated",
                json!({"id": "sub_1", "status": "active", "cancel_at_period_end": true,
                       "items": {"data": [{"price": {"id": "price_pro_monthly"}}]}}),
            ),
            "succeeded",
            "past_due",
        ),
        (
            &event(
                "evt_s5",
                "customer.subscription.deleted",
                json!({"id": "sub_1", "status": "canceled"}),
            ),
            "succeeded",
            "canceled",
        ),
    ];
    for (i, (e, payment_status, sub_status)) in steps.iter().enumerate() {
        let (s, v) = deliver(&gw, e).await;
        assert_eq!(
            (s, &v["status"]),
            (200, &json!(payment_status)),
            "step {i}: {v}"
        );
        let (s, v) = deliver(&gw, e).await;
        assert_eq!((s, &v["replayed"]), (200, &json!(true)), "step {i}: {v}");
        let now = gw.admin_get("/api/v1/accounts/acct-s/subscriptions").await["data"][0].clone();
        assert_eq!(now["status"], *sub_status, "step {i}: {now}");
        assert_eq!(now["external_id"], "sub_1", "{now}");
        assert_eq!(now["plan"], "pro", "{now}");
        if i == 3 {
            assert_eq!(now["cancel_at_period_end"], true, "{now}");
        }
    }
    // One subscription for all of it, and its grants: the start's and the
    // renewal's (each once, though every event came twice).
    let list = gw.admin_get("/api/v1/accounts/acct-s/subscriptions").await;
    assert_eq!(list["data"].as_array().map(Vec::len), Some(1), "{list}");
    let ledger = gw.admin_get("/api/v1/accounts/acct-s/ledger").await;
    let grants = ledger["data"]
        .as_array()
        .map(|l| l.iter().filter(|e| e["kind"] == "grant").count())
        .unwrap_or(0);
    assert!((1..=2).contains(&grants), "{ledger}");
    // A renewal for a subscription nobody started: kept, not applied.
    let e = event(
        "evt_s6",
        "invoice.paid",
        json!({"id": "in_9", "subscription": "sub_unknown", "amount_paid": 2000, "currency": "usd"}),
    );
    let (s, v) = deliver(&gw, &e).await;
    assert_eq!((s, &v["status"]), (200, &json!("needs_attention")), "{v}");
    assert_eq!(payments_of(&gw, "provider=stripe").await.len(), 6);
    assert_eq!(balance(&gw, "acct-s").await, "0");
}

/// A stand-in for Stripe's `POST /v1/checkout/sessions`: records what it
/// got (headers and form) and answers a session.
struct MockStripe {
    url: String,
    got: Arc<Mutex<Vec<(http::HeaderMap, String)>>>,
}

async fn mock_stripe() -> MockStripe {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let got: Arc<Mutex<Vec<(http::HeaderMap, String)>>> = Arc::default();
    let seen = got.clone();
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                return;
            };
            let seen = seen.clone();
            tokio::spawn(async move {
                let svc =
                    hyper::service::service_fn(move |req: http::Request<hyper::body::Incoming>| {
                        let seen = seen.clone();
                        async move {
                            let (parts, body) = req.into_parts();
                            let form = body.collect().await.unwrap().to_bytes();
                            let n = {
                                let mut g = seen.lock().unwrap();
                                g.push((
                                    parts.headers.clone(),
                                    String::from_utf8(form.to_vec()).unwrap(),
                                ));
                                g.len()
                            };
                            let ok = parts.uri.path() == "/v1/checkout/sessions"
                                && parts.method == "POST";
                            let body = if ok {
                                json!({"id": format!("cs_test_{n}"), "object": "checkout.session",
                                   "url": format!("https://checkout.stripe.test/c/cs_test_{n}")})
                            } else {
                                json!({"error": {"message": "no such route"}})
                            };
                            let mut res =
                                http::Response::new(Full::new(Bytes::from(body.to_string())));
                            *res.status_mut() = if ok {
                                http::StatusCode::OK
                            } else {
                                http::StatusCode::NOT_FOUND
                            };
                            Ok::<_, Infallible>(res)
                        }
                    });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(hyper_util::rt::TokioIo::new(stream), svc)
                    .await;
            });
        }
    });
    MockStripe { url, got }
}

fn form_value(form: &str, name: &str) -> Option<String> {
    tollgate::payments::epay::parse_params(form)
        .expect("a form")
        .into_iter()
        .find(|(k, _)| k == name)
        .map(|(_, v)| v)
}

async fn checkout_calls_stripe_with_the_form(mode: RuntimeMode) {
    set_env();
    let stripe = mock_stripe().await;
    let gw = TestGateway::start_mode(mode, &payments_config(&stripe.url), |_| {});
    create_account(&gw, "acct-k", "k@example.com").await;
    let (s, _, v) = send(
        "POST",
        &gw.url("/api/v1/accounts/acct-k/checkout"),
        &[("authorization", &admin())],
        Some(json!({"kind": "topup", "amount": "12.34", "idempotency_key": "order-77"})),
    )
    .await;
    assert_eq!(s, 201, "{v}");
    assert_eq!(v["data"]["id"], "cs_test_1");
    assert_eq!(v["data"]["url"], "https://checkout.stripe.test/c/cs_test_1");
    {
        let got = stripe.got.lock().unwrap();
        let (h, form) = &got[0];
        assert_eq!(h["authorization"], format!("Bearer {SK}"));
        assert_eq!(h["idempotency-key"], "order-77");
        assert_eq!(h["content-type"], "application/x-www-form-urlencoded");
        assert_eq!(form_value(form, "mode").as_deref(), Some("payment"));
        assert_eq!(
            form_value(form, "line_items[0][price_data][unit_amount]").as_deref(),
            Some("1234")
        );
        assert_eq!(
            form_value(form, "line_items[0][price_data][currency]").as_deref(),
            Some("usd")
        );
        assert_eq!(
            form_value(form, "metadata[account]").as_deref(),
            Some("acct-k")
        );
        assert_eq!(form_value(form, "metadata[kind]").as_deref(), Some("topup"));
        assert_eq!(
            form_value(form, "client_reference_id").as_deref(),
            Some("acct-k")
        );
        assert_eq!(
            form_value(form, "success_url").as_deref(),
            Some("https://shop.example/paid")
        );
    }
    // A subscription to a plan with a Stripe price.
    let (s, _, v) = send(
        "POST",
        &gw.url("/api/v1/accounts/acct-k/checkout"),
        &[("authorization", &admin())],
        Some(json!({"kind": "subscription", "plan": "pro"})),
    )
    .await;
    assert_eq!(s, 201, "{v}");
    {
        let got = stripe.got.lock().unwrap();
        let (h, form) = &got[1];
        assert!(
            h["idempotency-key"]
                .to_str()
                .unwrap()
                .starts_with("tollgate-")
        );
        assert_eq!(form_value(form, "mode").as_deref(), Some("subscription"));
        assert_eq!(
            form_value(form, "line_items[0][price]").as_deref(),
            Some("price_pro_monthly")
        );
        assert_eq!(form_value(form, "metadata[plan]").as_deref(), Some("pro"));
    }
    // Refusals: sub-cent amounts, plans without a price, unknown accounts, no admin.
    for (path, body, status) in [
        (
            "/api/v1/accounts/acct-k/checkout",
            json!({"kind": "topup", "amount": "0.001"}),
            400,
        ),
        (
            "/api/v1/accounts/acct-k/checkout",
            json!({"kind": "subscription", "plan": "trial"}),
            400,
        ),
        (
            "/api/v1/accounts/nobody/checkout",
            json!({"kind": "topup", "amount": "1"}),
            404,
        ),
    ] {
        let (s, _, v) = send(
            "POST",
            &gw.url(path),
            &[("authorization", &admin())],
            Some(body),
        )
        .await;
        assert_eq!(s, status, "{v}");
    }
    let (s, _, _) = send(
        "POST",
        &gw.url("/api/v1/accounts/acct-k/checkout"),
        &[],
        Some(json!({"kind": "topup", "amount": "1"})),
    )
    .await;
    assert_eq!(s, 401);
    // The key's own checkout: its account when it has one, else the key.
    let (key, _) = gw.create_key(json!({"name": "k", "owner": "acct-k"})).await;
    let (solo, solo_hash) = gw.create_key(json!({"name": "solo", "limit": "1"})).await;
    for (k, field, want) in [
        (&key, "metadata[account]", "acct-k".to_owned()),
        (&solo, "metadata[key]", solo_hash.clone()),
    ] {
        let (s, _, v) = send(
            "POST",
            &gw.url("/api/v1/key/checkout"),
            &[("authorization", &bearer(k))],
            Some(json!({"amount": "5"})),
        )
        .await;
        assert_eq!(s, 201, "{v}");
        let got = stripe.got.lock().unwrap();
        let (_, form) = got.last().unwrap();
        assert_eq!(form_value(form, field), Some(want));
        assert_eq!(
            form_value(form, "line_items[0][price_data][unit_amount]").as_deref(),
            Some("500")
        );
    }
    let (s, _, _) = send(
        "POST",
        &gw.url("/api/v1/key/checkout"),
        &[("authorization", "Bearer sk-not-a-key")],
        Some(json!({"amount": "5"})),
    )
    .await;
    assert_eq!(s, 401);
    assert_eq!(
        stripe.got.lock().unwrap().len(),
        4,
        "refusals never reached Stripe"
    );
}

/// Sends an epay notification with `params` (signed unless `sign` is given).
async fn notify(gw: &TestGateway, params: &[(&str, &str)], post: bool) -> (u16, String) {
    let owned: Vec<(String, String)> = params
        .iter()
        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
        .collect();
    let mut all = owned.clone();
    if !params.iter().any(|(k, _)| *k == "sign") {
        all.push((
            "sign".into(),
            tollgate::payments::epay::sign(&owned, EPAY_KEY),
        ));
        all.push(("sign_type".into(), "MD5".into()));
    }
    let text = tollgate::payments::stripe::form(&all);
    let req = if post {
        let mut r = raw_request(
            "POST",
            &gw.url("/api/v1/payments/epay/notify"),
            &[],
            Bytes::from(text),
        );
        r.headers_mut().insert(
            "content-type",
            http::HeaderValue::from_static("application/x-www-form-urlencoded"),
        );
        r
    } else {
        raw_request(
            "GET",
            &gw.url(&format!("/api/v1/payments/epay/notify?{text}")),
            &[],
            Bytes::new(),
        )
    };
    let (s, _, b) = send_raw(req).await;
    (s, String::from_utf8(b.to_vec()).unwrap())
}

async fn epay_order(gw: &TestGateway, account: &str, amount: &str) -> String {
    let (s, _, v) = send(
        "POST",
        &gw.url(&format!("/api/v1/accounts/{account}/checkout")),
        &[("authorization", &admin())],
        Some(json!({"provider": "epay", "kind": "topup", "amount": amount, "type": "alipay"})),
    )
    .await;
    assert_eq!(s, 201, "{v}");
    let url = v["data"]["url"].as_str().unwrap();
    let query = url
        .strip_prefix("https://pay.example/submit.php?")
        .expect(url);
    let params = tollgate::payments::epay::parse_params(query).unwrap();
    assert!(
        tollgate::payments::epay::verify(&params, EPAY_KEY),
        "the URL is signed"
    );
    let get = |n: &str| params.iter().find(|(k, _)| k == n).map(|(_, v)| v.clone());
    assert_eq!(get("pid").as_deref(), Some("1001"));
    assert_eq!(
        get("notify_url").as_deref(),
        Some("https://gw.example/api/v1/payments/epay/notify")
    );
    assert_eq!(
        get("return_url").as_deref(),
        Some("https://shop.example/back")
    );
    assert_eq!(get("type").as_deref(), Some("alipay"));
    let out = get("out_trade_no").unwrap();
    assert_eq!(v["data"]["out_trade_no"], out.as_str());
    out
}

async fn epay_order_is_applied_once_and_wrong_money_refused(mode: RuntimeMode) {
    let gw = start(mode);
    create_account(&gw, "acct-e", "e@example.com").await;
    let order = epay_order(&gw, "acct-e", "10").await;
    let paid = |money: &'static str, trade: &'static str| {
        vec![
            ("pid", "1001"),
            ("trade_no", trade),
            ("money", money),
            ("name", "Tollgate credit"),
            ("trade_status", "TRADE_SUCCESS"),
            ("type", "alipay"),
        ]
    };
    // Wrong money is refused and changes nothing.
    let mut p = paid("9.99", "T1");
    p.push(("out_trade_no", &order));
    assert_eq!(notify(&gw, &p, false).await, (400, "fail".into()));
    assert_eq!(balance(&gw, "acct-e").await, "0");
    // A bad signature, another merchant, an unpaid trade.
    let mut p = paid("10.00", "T1");
    p.push(("out_trade_no", &order));
    let mut forged = p.clone();
    forged.push(("sign", "0123456789abcdef0123456789abcdef"));
    assert_eq!(notify(&gw, &forged, false).await.1, "fail");
    let mut other = p.clone();
    other[0] = ("pid", "2002");
    assert_eq!(notify(&gw, &other, false).await.1, "fail");
    let mut unpaid = p.clone();
    unpaid[4] = ("trade_status", "WAIT_BUYER_PAY");
    assert_eq!(notify(&gw, &unpaid, false).await.1, "fail");
    assert_eq!(balance(&gw, "acct-e").await, "0");
    // Paid: applied once, however often it is notified (GET and POST).
    assert_eq!(notify(&gw, &p, false).await, (200, "success".into()));
    assert_eq!(notify(&gw, &p, true).await, (200, "success".into()));
    assert_eq!(notify(&gw, &p, false).await, (200, "success".into()));
    assert_eq!(balance(&gw, "acct-e").await, "10");
    let list = payments_of(&gw, "provider=epay").await;
    assert_eq!(list.len(), 1, "{list:?}");
    assert_eq!(list[0]["provider_id"], "T1");
    assert_eq!(list[0]["amount"].to_string(), "10");
    // An order nobody made.
    let mut unknown = paid("10.00", "T2");
    unknown.push(("out_trade_no", "NOPE"));
    assert_eq!(notify(&gw, &unknown, false).await.1, "fail");
    assert_eq!(balance(&gw, "acct-e").await, "10");
}

async fn epay_external_orders_credit_by_email_once(mode: RuntimeMode) {
    let gw = start(mode);
    create_account(&gw, "acct-x", "x@example.com").await;
    let ext = |trade: &'static str, kind: &str, credits: &str, email: &str| {
        let param =
            json!({"email": email, "type": kind, "credits": credits, "original_amount": "10.00"})
                .to_string();
        (trade, param)
    };
    let send_ext = |(trade, param): (&'static str, String)| {
        let gw = &gw;
        async move {
            let p = vec![
                ("pid", "1001"),
                ("trade_no", trade),
                ("out_trade_no", "SHOP-ORDER-1"),
                ("money", "10.00"),
                ("trade_status", "TRADE_SUCCESS"),
                ("type", "wxpay"),
                ("param", param.as_str()),
            ];
            notify(gw, &p, true).await
        }
    };
    assert_eq!(
        send_ext(ext("X1", "activation", "5", "x@example.com")).await,
        (200, "success".into())
    );
    assert_eq!(balance(&gw, "acct-x").await, "5");
    let keys = gw.admin_get("/api/v1/keys?owner=acct-x").await;
    assert_eq!(
        keys["data"].as_array().unwrap().len(),
        1,
        "activation issued a key: {keys}"
    );
    let p = &payments_of(&gw, "account=acct-x").await[0];
    assert_eq!(p["kind"], "activation");
    assert_eq!(p["issued_key"]["hash"], keys["data"][0]["hash"]);
    assert!(
        p["issued_key"].get("key").is_none(),
        "a list never shows the key: {p}"
    );
    // The first read of the record shows the key, once.
    let path = format!("/api/v1/payments/{}", p["id"].as_str().unwrap());
    let first = gw.admin_get(&path).await;
    let issued = first["data"]["issued_key"]["key"]
        .as_str()
        .expect("the first read shows the issued key")
        .to_owned();
    let issued = issued.as_str();
    let again = gw.admin_get(&path).await;
    assert_eq!(again["data"]["issued_key"]["hash"], keys["data"][0]["hash"]);
    assert!(
        again["data"]["issued_key"].get("key").is_none(),
        "a second read shows no key: {again}"
    );
    // The issued key works against its account.
    let (s, _, v) = send(
        "GET",
        &gw.url("/api/v1/key"),
        &[("authorization", &bearer(issued))],
        None,
    )
    .await;
    assert_eq!(s, 200, "{v}");
    assert_eq!(v["data"]["account"], "acct-x");
    // The same trade again: nothing more, no second key.
    assert_eq!(
        send_ext(ext("X1", "activation", "5", "x@example.com")).await,
        (200, "success".into())
    );
    assert_eq!(balance(&gw, "acct-x").await, "5");
    // A recharge under another trade number adds; an activation of an
    // account that has a key issues none.
    assert_eq!(
        send_ext(ext("X2", "recharge", "3", "x@example.com"))
            .await
            .1,
        "success"
    );
    assert_eq!(
        send_ext(ext("X3", "activation", "1", "x@example.com"))
            .await
            .1,
        "success"
    );
    assert_eq!(balance(&gw, "acct-x").await, "9");
    let keys = gw.admin_get("/api/v1/keys?owner=acct-x").await;
    assert_eq!(keys["data"].as_array().unwrap().len(), 1);
    // An email no account has: recorded for attention, acknowledged.
    assert_eq!(
        send_ext(ext("X4", "recharge", "3", "who@example.com"))
            .await
            .1,
        "success"
    );
    assert_eq!(payments_of(&gw, "status=needs_attention").await.len(), 1);
}

async fn manual_payments_are_idempotent_on_reference(mode: RuntimeMode) {
    let gw = start(mode);
    create_account(&gw, "acct-m", "m@example.com").await;
    let post = |body: Value| {
        let gw = &gw;
        async move {
            send(
                "POST",
                &gw.url("/api/v1/payments"),
                &[("authorization", &admin())],
                Some(body),
            )
            .await
        }
    };
    let body = json!({"account": "acct-m", "amount": "250.5", "reference": "BANK-2026-001", "kind": "topup"});
    let (s, _, v) = post(body.clone()).await;
    assert_eq!(s, 201, "{v}");
    assert_eq!(v["data"]["provider"], "manual");
    assert_eq!(v["data"]["replayed"], false);
    let (s, _, v) = post(body.clone()).await;
    assert_eq!(s, 200, "{v}");
    assert_eq!(v["data"]["replayed"], true);
    assert_eq!(balance(&gw, "acct-m").await, "250.5");
    let (s, _, v) = post(
        json!({"account": "acct-m", "amount": "1", "reference": "BANK-2026-001", "kind": "topup"}),
    )
    .await;
    assert_error(s, &v, 409, "reference_reused");
    for bad in [
        json!({"account": "acct-m", "amount": "0", "reference": "r", "kind": "topup"}),
        json!({"account": "acct-m", "amount": "1", "reference": "", "kind": "topup"}),
        json!({"account": "acct-m", "amount": "1", "reference": "r", "kind": "refund"}),
        json!({"account": "acct-m", "amount": "1", "kind": "topup"}),
    ] {
        let (s, _, v) = post(bad).await;
        assert_eq!(s, 400, "{v}");
    }
    let (s, _, _) =
        post(json!({"account": "nobody", "amount": "1", "reference": "r", "kind": "topup"})).await;
    assert_eq!(s, 404);
    let (s, _, _) = send("POST", &gw.url("/api/v1/payments"), &[], Some(body)).await;
    assert_eq!(s, 401, "manual payments are the admin's");
    assert_eq!(balance(&gw, "acct-m").await, "250.5");

    // The list pages with offset and limit, newest first, as keys do.
    for r in ["BANK-2", "BANK-3"] {
        // Ids order by creation time: one per ms apart.
        gw.clock.advance(std::time::Duration::from_millis(5));
        let (s, _, v) =
            post(json!({"account": "acct-m", "amount": "1", "reference": r, "kind": "topup"}))
                .await;
        assert_eq!(s, 201, "{v}");
    }
    let refs = |ps: Vec<Value>| -> Vec<String> {
        ps.iter()
            .map(|p| p["provider_id"].as_str().unwrap().to_owned())
            .collect()
    };
    assert_eq!(
        refs(payments_of(&gw, "account=acct-m&limit=2").await),
        ["BANK-3", "BANK-2"]
    );
    assert_eq!(
        refs(payments_of(&gw, "account=acct-m&limit=2&offset=2").await),
        ["BANK-2026-001"]
    );
    assert!(payments_of(&gw, "account=acct-m&offset=3").await.is_empty());
    let (s, _, v) = send(
        "GET",
        &gw.url("/api/v1/payments?limit=0"),
        &[("authorization", &admin())],
        None,
    )
    .await;
    assert_error(s, &v, 400, "invalid_query");
}

async fn reconcile_finds_what_does_not_match(mode: RuntimeMode) {
    let gw = start(mode);
    create_account(&gw, "acct-q", "q@example.com").await;
    let (s, _) = deliver(&gw, &topup_event("evt_q1", "acct-q", 500, "usd")).await;
    assert_eq!(s, 200);
    let (s, _) = deliver(&gw, &topup_event("evt_q2", "ghost", 700, "usd")).await;
    assert_eq!(s, 200);
    let (s, _, _) = send(
        "POST",
        &gw.url("/api/v1/payments"),
        &[("authorization", &admin())],
        Some(json!({"account": "acct-q", "amount": "2", "reference": "wire-1", "kind": "topup"})),
    )
    .await;
    assert_eq!(s, 201);
    // A top-up made by hand, with no payment behind it.
    let (s, _, _) = send(
        "POST",
        &gw.url("/api/v1/accounts/acct-q/credits"),
        &[("authorization", &admin())],
        Some(json!({"amount": "1", "kind": "topup", "reason": "goodwill"})),
    )
    .await;
    assert_eq!(s, 200);
    let now = gw.clock.now_secs();
    let r = gw
        .admin_get(&format!(
            "/api/v1/payments/reconcile?start={}&end={}",
            now - 3600,
            now + 3600
        ))
        .await;
    let d = &r["data"];
    let unapplied = d["payments_without_ledger"].as_array().unwrap();
    assert_eq!(unapplied.len(), 1, "{r}");
    assert_eq!(unapplied[0]["account"], "ghost");
    let orphans = d["topups_without_payment"].as_array().unwrap();
    assert_eq!(orphans.len(), 1, "{r}");
    assert_eq!(orphans[0]["reason"], "goodwill");
    assert_eq!(d["totals"]["stripe"]["payments"], 2, "{r}");
    assert_eq!(d["totals"]["stripe"]["amount"].to_string(), "5");
    assert_eq!(d["totals"]["stripe"]["needs_attention"], 1);
    assert_eq!(d["totals"]["manual"]["amount"].to_string(), "2");
}

/// SIGKILL while a notification is being applied: whatever the store had
/// made durable stays, and Stripe's retry applies the event exactly once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_while_applying_then_the_retry_applies_once() {
    use std::io::BufRead;
    use std::process::{Command, Stdio};
    let data = temp_dir("paykill");
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
[payments.stripe]
secret_key_env = "PAYKILL_SK"
webhook_secret_env = "PAYKILL_WHSEC"
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
            .env("PAYKILL_SK", SK)
            .env("PAYKILL_WHSEC", WHSEC)
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
    let admin = admin();
    let deliver_to = |addr: String, body: Vec<u8>| async move {
        let t = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs() as i64;
        let sig = format!("t={t},v1={}", signature(&body, t));
        let req = raw_request(
            "POST",
            &format!("http://{addr}/api/v1/payments/stripe/webhook"),
            &[("stripe-signature", &sig)],
            Bytes::from(body),
        );
        client().request(req).await.map(|r| r.status().as_u16())
    };
    let (mut child, mut addr) = start();
    let (s, _, v) = send(
        "POST",
        &format!("http://{addr}/api/v1/accounts"),
        &[("authorization", &admin)],
        Some(json!({"id": "acct-k9", "email": "k9@example.com"})),
    )
    .await;
    assert_eq!(s, 201, "{v}");
    // Kill at several points after the delivery was sent: before the
    // server read it, while the store thread applies it, after it answered.
    let mut cents_total = 0;
    for (round, delay_us) in [0u64, 300, 1_000, 3_000, 20_000].into_iter().enumerate() {
        let body = topup_event(
            &format!("evt_k9_{round}"),
            "acct-k9",
            100 + round as i64,
            "usd",
        );
        cents_total += 100 + round as i64;
        let pending = tokio::spawn(deliver_to(addr.clone(), body.clone()));
        tokio::time::sleep(Duration::from_micros(delay_us)).await;
        child.kill().unwrap(); // SIGKILL
        child.wait().unwrap();
        let _ = pending.await;
        let (c, a) = start();
        child = c;
        // Stripe retries until it gets a 200.
        assert_eq!(deliver_to(a.clone(), body.clone()).await.unwrap(), 200);
        assert_eq!(deliver_to(a.clone(), body).await.unwrap(), 200);
        let (s, _, v) = send(
            "GET",
            &format!("http://{a}/api/v1/accounts/acct-k9"),
            &[("authorization", &admin)],
            None,
        )
        .await;
        assert_eq!(s, 200, "{v}");
        let want = format!("{}.{:02}", cents_total / 100, cents_total % 100);
        assert_eq!(
            v["data"]["balance"].to_string(),
            want.trim_end_matches('0').trim_end_matches('.'),
            "round {round}: every event applied exactly once"
        );
        let (s, _, v) = send(
            "GET",
            &format!("http://{a}/api/v1/payments?account=acct-k9"),
            &[("authorization", &admin)],
            None,
        )
        .await;
        assert_eq!(s, 200);
        assert_eq!(v["data"].as_array().unwrap().len(), round + 1, "{v}");
        let (s, _, v) = send(
            "GET",
            &format!("http://{a}/api/v1/accounts/acct-k9/ledger"),
            &[("authorization", &admin)],
            None,
        )
        .await;
        assert_eq!(s, 200);
        assert_eq!(v["data"].as_array().unwrap().len(), round + 1, "{v}");
        // The next round delivers to the restarted server.
        addr = a;
    }
    child.kill().unwrap();
    child.wait().unwrap();
    let _ = std::fs::remove_dir_all(&data);
}
