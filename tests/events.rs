//! Events, webhooks, email and the audit log over loopback: the gateway
//! and a webhook receiver (and an SMTP sink) on 127.0.0.1, time moved by
//! the test clock; the crash test runs the real binary and kills it.

mod common;

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use common::hook::*;
use common::*;
use http_body_util::{BodyExt, Full};
use serde_json::{Value, json};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};

fn set_env() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        // SAFETY: as in common's `set_upstream_key_env`: only Rust code
        // reads the environment (std's env functions share one lock), and
        // these are written once, always to the same values.
        #[allow(unsafe_code)]
        unsafe {
            std::env::set_var("TOLLGATE_TEST_HOOK_SECRET", HOOK_SECRET);
        }
    });
}

#[test]
fn the_receivers_algorithm_matches_the_vector() {
    // The vector's own secret, id, timestamp and body: the check the
    // tests below apply to every delivery is the published one.
    assert_eq!(
        expected_signature(
            "msg_p5jXN8AQM9LWM0D4loKWxJek",
            "1614265330",
            br#"{"test": 2432232314}"#
        ),
        "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE="
    );
}

fn webhook(url: &str, events: &str, retry: &str) -> String {
    format!(
        "[[webhooks]]\nurl = \"{url}\"\nsecret_env = \"TOLLGATE_TEST_HOOK_SECRET\"\nevents = {events}\nretry = {retry}\n"
    )
}

fn auth() -> String {
    format!("Bearer {ADMIN}")
}

async fn admin(gw: &TestGateway, method: &str, path: &str, body: Option<Value>) -> (u16, Value) {
    let (s, _, v) = send(method, &gw.url(path), &[("authorization", &auth())], body).await;
    (s, v)
}

/// The types of the outbox's events, in order.
async fn event_types(gw: &TestGateway) -> Vec<String> {
    gw.flush().await;
    let v = gw.admin_get("/api/v1/events?limit=1000").await;
    v["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["type"].as_str().unwrap().to_owned())
        .collect()
}

async fn wait_for(what: &str, mut f: impl FnMut() -> bool) {
    assert!(
        eventually(Duration::from_secs(10), &mut f).await,
        "timed out waiting for {what}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn key_events_once_each_and_none_for_refused_changes() {
    set_env();
    let hook = Hook::start(Arc::new(|_, _| 200)).await;
    let gw = TestGateway::start_with(&webhook(&hook.url(), "[\"key.*\"]", "[\"1s\"]"));
    let (key, hash) = gw.create_key(json!({"name": "a", "limit": "1"})).await;
    let (s, _) = admin(
        &gw,
        "PATCH",
        &format!("/api/v1/keys/{hash}"),
        Some(json!({"name": "b"})),
    )
    .await;
    assert_eq!(s, 200);
    let (s, _) = admin(
        &gw,
        "PATCH",
        &format!("/api/v1/keys/{hash}"),
        Some(json!({"disabled": true})),
    )
    .await;
    assert_eq!(s, 200);
    // Refused: a bad field, an unknown key. No event for either.
    let (s, _) = admin(
        &gw,
        "PATCH",
        &format!("/api/v1/keys/{hash}"),
        Some(json!({"rpm": "many"})),
    )
    .await;
    assert_eq!(s, 400);
    let missing = "0".repeat(64);
    let (s, _) = admin(&gw, "DELETE", &format!("/api/v1/keys/{missing}"), None).await;
    assert_eq!(s, 404);
    let (s, _) = admin(
        &gw,
        "POST",
        "/api/v1/keys",
        Some(json!({"name": "x", "limit": "-1"})),
    )
    .await;
    assert_eq!(s, 400);
    let (s, _) = admin(&gw, "DELETE", &format!("/api/v1/keys/{hash}"), None).await;
    assert_eq!(s, 200);
    assert_eq!(
        event_types(&gw).await,
        ["key.created", "key.updated", "key.disabled", "key.deleted"]
    );
    // The payload: id, type, timestamp, the key's API shape, no key.
    let v = gw.admin_get("/api/v1/events?type=key.created").await;
    let ev = &v["data"][0];
    assert!(ev["id"].as_str().unwrap().starts_with("evt_"));
    assert!(ev["timestamp"].is_string());
    assert_eq!(ev["data"]["hash"], hash.as_str());
    assert_eq!(ev["data"]["name"], "a");
    assert!(!ev.to_string().contains(&key), "never the key: {ev}");
    assert!(
        !ev.to_string().contains(&key[key.len() - 12..]),
        "not even its secret part: {ev}"
    );
    // Each delivered once, signed.
    wait_for("four deliveries", || hook.got().len() >= 4).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let got = hook.got();
    assert_eq!(got.len(), 4, "each event once: {got:?}");
    for g in &got {
        assert_eq!(
            g.sig,
            expected_signature(&g.id, &g.ts, &g.body),
            "signature of {}",
            g.id
        );
        assert_eq!(
            g.event()["id"],
            g.id.as_str(),
            "webhook-id is the event's id"
        );
    }
    // `after` pages from an id.
    let first = got[0].id.clone();
    let v = gw.admin_get(&format!("/api/v1/events?after={first}")).await;
    assert_eq!(v["data"].as_array().unwrap().len(), 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn request_cap_emits_key_exhausted_once() {
    set_env();
    let hook = Hook::start(Arc::new(|_, _| 200)).await;
    let gw = TestGateway::start_with(&webhook(&hook.url(), "[\"key.exhausted\"]", "[\"1s\"]"));
    let (key, hash) = gw
        .create_key(json!({"name": "cap", "limit": "1", "max_requests": 2}))
        .await;
    let c = client();
    let mut codes = Vec::new();
    for _ in 0..3 {
        let res = c
            .request(request(
                "POST",
                &gw.url("/v1/chat/completions"),
                &[("authorization", &bearer(&key))],
                Some(chat("demo-chat", false)),
            ))
            .await
            .unwrap();
        codes.push(res.status().as_u16());
        let _ = res.into_body().collect().await;
    }
    assert_eq!(codes, [200, 200, 402], "the third is over the cap");
    let types = event_types(&gw).await;
    assert_eq!(
        types.iter().filter(|t| *t == "key.exhausted").count(),
        1,
        "{types:?}"
    );
    wait_for("the key.exhausted delivery", || {
        !hook.of("key.exhausted").is_empty()
    })
    .await;
    let g = &hook.of("key.exhausted")[0];
    assert_eq!(g.event()["data"]["hash"], hash.as_str());
    assert_eq!(g.event()["data"]["reason"], "max_requests");
    assert_eq!(g.sig, expected_signature(&g.id, &g.ts, &g.body));
    assert_eq!(hook.got().len(), 1, "only the subscribed type is sent");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn money_events_cross_thresholds_once() {
    set_env();
    let gw = TestGateway::start_with("[alerts]\nlow_balance = \"0.6\"\n");
    // A key: credits and its low-balance crossing.
    let (_, hash) = gw.create_key(json!({"name": "m", "limit": "1"})).await;
    let credit =
        |amount: &str, kind: &str| json!({"amount": amount, "kind": kind, "reason": "test"});
    let path = format!("/api/v1/keys/{hash}/credits");
    let (s, v) = admin(&gw, "POST", &path, Some(credit("0.5", "deduct"))).await;
    assert_eq!(s, 200, "{v}");
    let (s, _) = admin(&gw, "POST", &path, Some(credit("0.1", "deduct"))).await;
    assert_eq!(s, 200);
    // Refused (bad kind): no credit.applied.
    let (s, _) = admin(&gw, "POST", &path, Some(credit("0.1", "steal"))).await;
    assert_eq!(s, 400);
    // An account with its own threshold.
    let (s, v) = admin(
        &gw,
        "POST",
        "/api/v1/accounts",
        Some(json!({"id": "acme", "email": "ops@acme.test", "low_balance_alert": "5"})),
    )
    .await;
    assert_eq!(s, 201, "{v}");
    let apath = "/api/v1/accounts/acme/credits";
    assert_eq!(
        admin(&gw, "POST", apath, Some(credit("10", "topup")))
            .await
            .0,
        200
    );
    assert_eq!(
        admin(&gw, "POST", apath, Some(credit("6", "deduct")))
            .await
            .0,
        200
    );
    assert_eq!(
        admin(&gw, "POST", apath, Some(credit("1", "deduct")))
            .await
            .0,
        200
    );
    // Too much: refused, nothing emitted.
    assert_eq!(
        admin(&gw, "POST", apath, Some(credit("100", "deduct")))
            .await
            .0,
        402
    );
    let (s, v) = admin(
        &gw,
        "PATCH",
        "/api/v1/accounts/acme",
        Some(json!({"status": "suspended"})),
    )
    .await;
    assert_eq!(s, 200, "{v}");
    // Suspending again changes nothing: no second event.
    assert_eq!(
        admin(
            &gw,
            "PATCH",
            "/api/v1/accounts/acme",
            Some(json!({"status": "suspended"}))
        )
        .await
        .0,
        200
    );
    assert_eq!(
        event_types(&gw).await,
        [
            "key.created",
            "credit.applied",
            "key.low_balance",
            "credit.applied",
            "credit.applied",
            "credit.applied",
            "account.low_balance",
            "credit.applied",
            "account.suspended",
        ]
    );
    let v = gw.admin_get("/api/v1/events?type=account.*").await;
    assert_eq!(v["data"][0]["data"]["id"], "acme");
    assert_eq!(v["data"][0]["data"]["balance"].to_string(), "4");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expiry_and_anomaly_events() {
    set_env();
    let gw = TestGateway::start_with("[alerts]\nanomaly_factor = 3\n");
    let expires = tollgate::clock::rfc3339(gw.clock.now_ms() + 3_600_000);
    let (key, _) = gw
        .create_key(json!({"name": "e", "expires_at": expires}))
        .await;
    let (busy, _) = gw.create_key(json!({"name": "busy"})).await;
    let c = client();
    let call = |key: String| {
        let c = c.clone();
        let url = gw.url("/v1/chat/completions");
        async move {
            let res = c
                .request(request(
                    "POST",
                    &url,
                    &[("authorization", &bearer(&key))],
                    Some(chat("demo-chat", false)),
                ))
                .await
                .unwrap();
            let s = res.status().as_u16();
            let _ = res.into_body().collect().await;
            s
        }
    };
    // One request: the busy key's baseline hour.
    assert_eq!(call(busy.clone()).await, 200);
    gw.flush().await;
    gw.clock.advance(Duration::from_secs(2 * 3600));
    assert_eq!(call(key.clone()).await, 403, "expired");
    assert_eq!(call(key.clone()).await, 403);
    // A later hour with more than 3 × the hourly average (1/24 of one request).
    assert_eq!(call(busy.clone()).await, 200);
    assert_eq!(call(busy.clone()).await, 200);
    let types = event_types(&gw).await;
    assert_eq!(
        types.iter().filter(|t| *t == "key.expired").count(),
        1,
        "{types:?}"
    );
    assert_eq!(
        types.iter().filter(|t| *t == "usage.anomaly").count(),
        1,
        "{types:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retries_keep_one_webhook_id_and_410_disables() {
    set_env();
    // Fails twice, then takes it.
    let flaky = Hook::start(Arc::new(|_, n| if n <= 2 { 500 } else { 204 })).await;
    // Gone.
    let gone = Hook::start(Arc::new(|_, _| 410)).await;
    let gw = TestGateway::start_with(&format!(
        "{}{}",
        webhook(&flaky.url(), "[\"key.*\"]", "[\"10m\", \"1h\", \"1h\"]"),
        webhook(&gone.url(), "[\"*\"]", "[\"1s\"]")
    ));
    gw.create_key(json!({"name": "r"})).await;
    wait_for("the first try", || flaky.got().len() == 1).await;
    // Not before the schedule says.
    tokio::time::sleep(Duration::from_millis(600)).await;
    assert_eq!(flaky.got().len(), 1, "no retry before 10m");
    gw.clock.advance(Duration::from_secs(600));
    wait_for("the second try", || flaky.got().len() == 2).await;
    // Let the worker note the answer (and date the next try) first.
    tokio::time::sleep(Duration::from_millis(300)).await;
    gw.clock.advance(Duration::from_secs(1800));
    tokio::time::sleep(Duration::from_millis(600)).await;
    assert_eq!(flaky.got().len(), 2, "the second wait is 1h");
    gw.clock.advance(Duration::from_secs(1800));
    wait_for("the third try", || flaky.got().len() == 3).await;
    let got = flaky.got();
    assert!(
        got.iter().all(|g| g.id == got[0].id),
        "one webhook-id: {got:?}"
    );
    assert_eq!(
        got.iter().map(|g| g.code).collect::<Vec<_>>(),
        [500, 500, 204]
    );
    for g in &got {
        assert_eq!(g.sig, expected_signature(&g.id, &g.ts, &g.body));
    }
    // The 410 endpoint got the first event once and nothing after.
    wait_for("the 410", || gone.got().len() == 1).await;
    gw.create_key(json!({"name": "r2"})).await;
    wait_for("the second event's first try", || flaky.got().len() == 4).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    gw.clock.advance(Duration::from_secs(600));
    wait_for("its second try", || flaky.got().len() == 5).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    gw.clock.advance(Duration::from_secs(3600));
    wait_for("its third try", || flaky.got().len() == 6).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(gone.got().len(), 1, "a disabled endpoint gets nothing more");
    let v = gw
        .admin_get("/api/v1/webhooks/deliveries?status=delivered")
        .await;
    assert_eq!(v["data"].as_array().unwrap().len(), 2, "{v}");
    let v = gw
        .admin_get("/api/v1/webhooks/deliveries?status=pending")
        .await;
    let pending = v["data"].as_array().unwrap();
    assert!(
        pending.iter().all(|d| d["target"]
            .as_str()
            .unwrap()
            .contains(&gone.addr.to_string())),
        "{v}"
    );
    // Redelivery: the flaky endpoint gets the first event again, same id.
    let id = got[0].id.clone();
    let (s, v) = admin(&gw, "POST", &format!("/api/v1/events/{id}/redeliver"), None).await;
    assert_eq!(s, 202, "{v}");
    wait_for("the redelivery", || {
        flaky.got().iter().filter(|g| g.id == id).count() == 4
    })
    .await;
}

/// The SMTP sink: accepts every message and keeps its DATA text.
async fn smtp_sink() -> (SocketAddr, Arc<Mutex<Vec<String>>>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let mails: Arc<Mutex<Vec<String>>> = Arc::default();
    let m = mails.clone();
    tokio::spawn(async move {
        loop {
            let Ok((s, _)) = listener.accept().await else {
                return;
            };
            let m = m.clone();
            tokio::spawn(async move {
                let (r, mut w) = s.into_split();
                let mut lines = BufReader::new(r).lines();
                let _ = w.write_all(b"220 sink ESMTP\r\n").await;
                while let Ok(Some(line)) = lines.next_line().await {
                    let verb = line.get(..4).unwrap_or("").to_ascii_uppercase();
                    let reply: &[u8] = match verb.as_str() {
                        "EHLO" | "HELO" => b"250 sink\r\n",
                        "DATA" => {
                            let _ = w.write_all(b"354 go on\r\n").await;
                            let mut text = String::new();
                            while let Ok(Some(l)) = lines.next_line().await {
                                if l == "." {
                                    break;
                                }
                                text.push_str(&l);
                                text.push('\n');
                            }
                            m.lock().unwrap().push(text);
                            b"250 queued\r\n"
                        }
                        "QUIT" => {
                            let _ = w.write_all(b"221 bye\r\n").await;
                            return;
                        }
                        _ => b"250 ok\r\n",
                    };
                    if w.write_all(reply).await.is_err() {
                        return;
                    }
                }
            });
        }
    });
    (addr, mails)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn email_goes_to_the_accounts_address() {
    set_env();
    let (addr, mails) = smtp_sink().await;
    static SMTP_ONCE: std::sync::Once = std::sync::Once::new();
    let url = format!("smtp://{addr}");
    SMTP_ONCE.call_once(|| {
        // SAFETY: see `set_env`; written once, before this test's gateway
        // reads it, by the only test that uses this variable.
        #[allow(unsafe_code)]
        unsafe {
            std::env::set_var("TOLLGATE_TEST_SMTP_URL", &url);
        }
    });
    let gw = TestGateway::start_with(
        "[email]\nsmtp_url_env = \"TOLLGATE_TEST_SMTP_URL\"\nfrom = \"Tollgate <billing@gate.test>\"\nevents = [\"credit.applied\"]\nretry = [\"1s\"]\n",
    );
    let (s, v) = admin(
        &gw,
        "POST",
        "/api/v1/accounts",
        Some(json!({"id": "bob", "email": "bob@example.test"})),
    )
    .await;
    assert_eq!(s, 201, "{v}");
    let (s, _) = admin(
        &gw,
        "POST",
        "/api/v1/accounts/bob/credits",
        Some(json!({"amount": "12.5", "kind": "topup", "reason": "invoice 7"})),
    )
    .await;
    assert_eq!(s, 200);
    wait_for("the mail", || !mails.lock().unwrap().is_empty()).await;
    let mail = mails.lock().unwrap()[0].clone();
    assert!(mail.contains("To: bob@example.test"), "{mail}");
    assert!(mail.contains("billing@gate.test"), "{mail}");
    assert!(mail.contains("credit.applied"), "{mail}");
    assert!(mail.contains("balance: 12.5"), "{mail}");
    gw.flush().await;
    let v = gw
        .admin_get("/api/v1/webhooks/deliveries?status=delivered")
        .await;
    assert_eq!(v["data"][0]["target"], "email", "{v}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn audit_log_records_every_admin_write() {
    set_env();
    let gw = TestGateway::start();
    let (key, hash) = gw.create_key(json!({"name": "au", "limit": "2"})).await;
    admin(
        &gw,
        "PATCH",
        &format!("/api/v1/keys/{hash}"),
        Some(json!({"name": "au2", "limit": "3"})),
    )
    .await;
    admin(
        &gw,
        "POST",
        &format!("/api/v1/keys/{hash}/credits"),
        Some(json!({"amount": "1", "kind": "topup", "reason": "r"})),
    )
    .await;
    admin(&gw, "POST", "/api/v1/accounts", Some(json!({"id": "zed"}))).await;
    admin(
        &gw,
        "PATCH",
        "/api/v1/accounts/zed",
        Some(json!({"name": "Zed"})),
    )
    .await;
    admin(
        &gw,
        "POST",
        "/api/v1/accounts/zed/credits",
        Some(json!({"amount": "1", "kind": "topup", "reason": "r"})),
    )
    .await;
    // Refused writes leave no entry.
    let (s, _) = admin(
        &gw,
        "PATCH",
        "/api/v1/accounts/nobody",
        Some(json!({"name": "x"})),
    )
    .await;
    assert_eq!(s, 404);
    admin(&gw, "DELETE", "/api/v1/accounts/zed", None).await;
    admin(&gw, "DELETE", &format!("/api/v1/keys/{hash}"), None).await;
    let v = gw.admin_get("/api/v1/audit").await;
    let entries = v["data"].as_array().unwrap();
    let actions: Vec<&str> = entries
        .iter()
        .map(|e| e["action"].as_str().unwrap())
        .collect();
    assert_eq!(
        actions,
        [
            "key.create",
            "key.update",
            "key.set_limit",
            "key.credit",
            "account.create",
            "account.update",
            "account.credit",
            "account.delete",
            "key.delete"
        ]
    );
    for e in entries {
        assert_eq!(e["actor"], "root");
        assert_eq!(e["ip"], "127.0.0.1");
        assert!(e["at"].is_string());
    }
    assert_eq!(entries[1]["before"]["name"], "au");
    assert_eq!(entries[1]["after"]["name"], "au2");
    assert!(!v.to_string().contains(&key), "never the key");
    assert!(!v.to_string().contains(ADMIN), "never the admin token");
    let v = gw.admin_get("/api/v1/audit?target=zed").await;
    assert_eq!(v["data"].as_array().unwrap().len(), 4);
    let v = gw.admin_get("/api/v1/audit?actor=someone").await;
    assert!(v["data"].as_array().unwrap().is_empty());
    let v = gw.admin_get("/api/v1/audit?after=8").await;
    assert_eq!(v["data"].as_array().unwrap().len(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_webhook_config_is_refused_with_a_reason() {
    set_env();
    let base = |hook: &str| {
        format!(
            "[server]\nlisten = \"127.0.0.1:0\"\n[[upstreams]]\nname = \"m\"\nmock = true\nmodels = [\"*\"]\n{hook}"
        )
    };
    let err = tollgate::config::Config::parse(
        &base(&webhook("ftp://x/hook", "[\"*\"]", "[\"1s\"]")),
        "t.toml",
    )
    .unwrap_err()
    .to_string();
    assert!(err.contains("http:// or https://"), "{err}");
    let err = tollgate::config::Config::parse(
        &base(&webhook("http://x/hook", "[\"*\"]", "[\"soon\"]")),
        "t.toml",
    )
    .unwrap_err()
    .to_string();
    assert!(err.contains("duration"), "{err}");
    let hook =
        "[[webhooks]]\nurl = \"http://x/h\"\nsecret_env = \"TOLLGATE_TEST_NO_SUCH_SECRET\"\n";
    let c = tollgate::config::Config::parse(&base(hook), "t.toml").unwrap();
    let err = tollgate::events::deliver::check(&c).unwrap_err();
    assert!(
        err.contains("TOLLGATE_TEST_NO_SUCH_SECRET") && err.contains("not set"),
        "{err}"
    );
}

/// An event not delivered when the gateway is killed with SIGKILL is
/// delivered after the restart, with the same webhook-id.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pending_delivery_survives_sigkill() {
    use std::io::BufRead;
    use std::process::{Command, Stdio};
    set_env();
    // The receiver answers 503 until told otherwise.
    let up = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let u = up.clone();
    let hook = Hook::start(Arc::new(move |_, _| {
        if u.load(std::sync::atomic::Ordering::Relaxed) {
            200
        } else {
            503
        }
    }))
    .await;
    let data = temp_dir("events-kill");
    let config = data.join("config.toml");
    std::fs::write(
        &config,
        format!(
            "[server]\nlisten = \"127.0.0.1:0\"\n[storage]\npath = \"{}\"\nflush_ms = 10\n[[upstreams]]\nname = \"mock\"\nmock = true\nmodels = [\"demo-*\"]\n[models.\"demo-chat\"]\ninput = \"0.15\"\noutput = \"0.60\"\n{}",
            data.join("db").display(),
            webhook(&hook.url(), "[\"key.*\"]", "[\"1s\", \"1s\", \"1s\", \"1s\", \"1s\", \"1s\"]")
        ),
    )
    .unwrap();
    let start = || {
        let mut child = Command::new(env!("CARGO_BIN_EXE_tollgate"))
            .args(["serve", "--config", config.to_str().unwrap()])
            .env("TOLLGATE_ADMIN_TOKEN", ADMIN)
            .env("TOLLGATE_TEST_HOOK_SECRET", HOOK_SECRET)
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
    let (s, _, v) = send(
        "POST",
        &format!("http://{addr}/api/v1/keys"),
        &[("authorization", &auth())],
        Some(json!({"name": "crash"})),
    )
    .await;
    assert_eq!(s, 201, "{v}");
    let hash = v["data"]["hash"].as_str().unwrap().to_owned();
    wait_for("a failed try", || !hook.got().is_empty()).await;
    child.kill().unwrap(); // SIGKILL
    child.wait().unwrap();
    let first = hook.got()[0].clone();
    assert_eq!(first.code, 503);
    up.store(true, std::sync::atomic::Ordering::Relaxed);
    let (mut child, _) = start();
    wait_for("the delivery after the restart", || {
        hook.got().iter().any(|g| g.code == 200)
    })
    .await;
    let _ = child.kill();
    let _ = child.wait();
    let ok: Vec<Got> = hook.got().into_iter().filter(|g| g.code == 200).collect();
    assert_eq!(ok.len(), 1, "delivered once: {ok:?}");
    assert_eq!(ok[0].id, first.id, "the same webhook-id after the restart");
    assert_eq!(ok[0].event()["data"]["hash"], hash.as_str());
    assert_eq!(
        ok[0].sig,
        expected_signature(&ok[0].id, &ok[0].ts, &ok[0].body)
    );
    let _ = std::fs::remove_dir_all(&data);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_keys_own_threshold_fires_once_per_crossing() {
    set_env();
    let gw = TestGateway::start();
    let (_, hash) = gw
        .create_key(json!({"name": "t", "limit": "1", "low_balance_alert": "0.9"}))
        .await;
    let v = gw.admin_get(&format!("/api/v1/keys/{hash}")).await;
    assert_eq!(v["data"]["low_balance_alert"].to_string(), "0.9");
    let path = format!("/api/v1/keys/{hash}/credits");
    for (amount, kind) in [
        ("0.05", "deduct"), // 0.95 left: above
        ("0.1", "deduct"),  // 0.85: crosses
        ("0.1", "deduct"),  // 0.75: still below, no second event
        ("1", "topup"),     // 1.75: above again
        ("1", "deduct"),    // 0.75: crosses again
    ] {
        let (s, v) = admin(
            &gw,
            "POST",
            &path,
            Some(json!({"amount": amount, "kind": kind, "reason": "t"})),
        )
        .await;
        assert_eq!(s, 200, "{v}");
    }
    let types = event_types(&gw).await;
    assert_eq!(
        types.iter().filter(|t| *t == "key.low_balance").count(),
        2,
        "{types:?}"
    );
    // A patch moves the threshold; clearing it falls back to [alerts] (none here).
    let (s, v) = admin(
        &gw,
        "PATCH",
        &format!("/api/v1/keys/{hash}"),
        Some(json!({"low_balance_alert": null})),
    )
    .await;
    assert_eq!(s, 200, "{v}");
    assert!(v["data"]["low_balance_alert"].is_null(), "{v}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hanging_huge_or_redirecting_endpoint_delays_nobody() {
    set_env();
    // Accepts and never answers.
    let hang = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let hang_addr = hang.local_addr().unwrap();
    let held = Arc::new(Mutex::new(Vec::new()));
    let h = held.clone();
    tokio::spawn(async move {
        while let Ok((s, _)) = hang.accept().await {
            h.lock().unwrap().push(s);
        }
    });
    // Answers 200 with 10 MiB.
    let huge_listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let huge_addr = huge_listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((s, _)) = huge_listener.accept().await {
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(|_req| async {
                    Ok::<_, std::convert::Infallible>(http::Response::new(Full::new(Bytes::from(
                        vec![b'x'; 10 * 1024 * 1024],
                    ))))
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(hyper_util::rt::TokioIo::new(s), svc)
                    .await;
            });
        }
    });
    let redirect = Hook::start(Arc::new(|_, _| 302)).await;
    let fast = Hook::start(Arc::new(|_, _| 200)).await;
    let gw = TestGateway::start_with(&format!(
        "{}timeout = \"30s\"\n{}{}{}",
        webhook(&format!("http://{hang_addr}/h"), "[\"*\"]", "[\"1h\"]"),
        webhook(&format!("http://{huge_addr}/h"), "[\"*\"]", "[\"1h\"]"),
        webhook(&redirect.url(), "[\"*\"]", "[\"1h\"]"),
        webhook(&fast.url(), "[\"*\"]", "[\"1h\"]"),
    ));
    let started = std::time::Instant::now();
    let (key, _) = gw.create_key(json!({"name": "one"})).await;
    gw.create_key(json!({"name": "two"})).await;
    wait_for("both events at the fast endpoint", || fast.got().len() == 2).await;
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "not held up by the hanging one"
    );
    // The request path does not wait either.
    let res = client()
        .request(request(
            "POST",
            &gw.url("/v1/chat/completions"),
            &[("authorization", &bearer(&key))],
            Some(chat("demo-chat", false)),
        ))
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
    assert!(started.elapsed() < Duration::from_secs(5));
    // The huge answer counts as delivered (read no further than a few KB);
    // the redirect is a failure to retry, not followed.
    let huge = huge_addr.to_string();
    let store = gw.app().store.clone();
    wait_for("the huge endpoint's deliveries", || {
        store
            .deliveries()
            .unwrap()
            .iter()
            .filter(|(_, t, s)| {
                t.contains(&huge)
                    && s.status == tollgate::events::deliver::DeliveryStatus::Delivered
            })
            .count()
            == 2
    })
    .await;
    gw.flush().await;
    let v = gw
        .admin_get("/api/v1/webhooks/deliveries?status=pending")
        .await;
    let redirected: Vec<&Value> = v["data"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|d| {
            d["target"]
                .as_str()
                .unwrap()
                .contains(&redirect.addr.to_string())
        })
        .collect();
    assert_eq!(redirected.len(), 2, "{v}");
    assert!(
        redirected
            .iter()
            .all(|d| d["last_status"] == 302 && d["attempts"] == 1),
        "{v}"
    );
    assert_eq!(
        redirect.got().len(),
        2,
        "tried once each, the Location not followed"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_write_the_disk_refused_emits_nothing() {
    set_env();
    let gw = TestGateway::start();
    gw.create_key(json!({"name": "before"})).await;
    gw.app().store.set_write_fault(true);
    let (s, _) = admin(&gw, "POST", "/api/v1/keys", Some(json!({"name": "during"}))).await;
    assert!(s >= 500, "the store refused the write: {s}");
    gw.app().store.set_write_fault(false);
    gw.create_key(json!({"name": "after"})).await;
    gw.flush().await;
    let v = gw.admin_get("/api/v1/events").await;
    let names: Vec<&str> = v["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["data"]["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["before", "after"], "no event for the refused write");
    let v = gw.admin_get("/api/v1/audit").await;
    assert_eq!(
        v["data"].as_array().unwrap().len(),
        2,
        "nor an audit entry: {v}"
    );
}

/// Retention: an old event whose deliveries finished goes, with its
/// delivery rows; one still pending stays, however old.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retention_prunes_finished_events_and_keeps_pending_ones() {
    set_env();
    let ok = Hook::start(Arc::new(|_, _| 204)).await;
    let down = Hook::start(Arc::new(|_, _| 500)).await;
    let gw = TestGateway::start_with(&format!(
        "{}{}",
        webhook(&ok.url(), "[\"key.created\"]", "[\"1s\"]"),
        webhook(&down.url(), "[\"key.deleted\"]", "[\"90d\"]")
    ));
    let (_, hash) = gw.create_key(json!({"name": "old"})).await;
    let (s, v) = admin(&gw, "DELETE", &format!("/api/v1/keys/{hash}"), None).await;
    assert_eq!(s, 200, "{v}");
    wait_for("both first tries", || {
        ok.got().len() == 1 && down.got().len() == 1
    })
    .await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let delivered = gw
        .admin_get("/api/v1/webhooks/deliveries?status=delivered")
        .await;
    assert_eq!(
        delivered["data"].as_array().unwrap().len(),
        1,
        "{delivered}"
    );

    // Nothing is old enough yet.
    let day = 86_400_000;
    let store = &gw.app().store;
    let cut = gw.clock.now_ms() - 30 * day;
    assert_eq!(store.prune_events_before(cut).await.unwrap(), 0);

    gw.clock.advance(Duration::from_secs(31 * 86_400));
    let cut = gw.clock.now_ms() - 30 * day;
    assert_eq!(store.prune_events_before(cut).await.unwrap(), 1);
    assert_eq!(
        event_types(&gw).await,
        ["key.deleted"],
        "the pending one stays"
    );
    let all = gw.admin_get("/api/v1/webhooks/deliveries").await;
    let rows = all["data"].as_array().unwrap();
    assert_eq!(rows.len(), 1, "{all}");
    assert_eq!(rows[0]["status"], "pending");
    // Again: nothing more goes.
    assert_eq!(store.prune_events_before(cut).await.unwrap(), 0);
    // A new event is listed as before.
    gw.create_key(json!({"name": "new"})).await;
    assert_eq!(event_types(&gw).await, ["key.deleted", "key.created"]);
}
