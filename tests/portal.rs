//! The portal and the admin console in a real browser: headless Chromium
//! driven over WebDriver (chromedriver), against a real gateway and the
//! mock upstream. The WebDriver client is the few W3C endpoints these tests
//! use, over the hyper client the tests already have: no new dependency.
//!
//! Skips (loudly) only when chromium/chromedriver are missing and
//! `TOLLGATE_REQUIRE_BROWSER` is unset; CI sets it.

mod common;

use std::convert::Infallible;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use common::*;
use http_body_util::{BodyExt, Full};
use serde_json::{Value, json, value::RawValue};

const CHROMIUM: &str = "/usr/bin/chromium";
const CHROMEDRIVER: &str = "/usr/bin/chromedriver";

/// chromedriver and one browser session; both end on drop.
struct Browser {
    /// The chromedriver process, killed on drop.
    driver: Child,
    /// `http://127.0.0.1:PORT/session/ID`.
    base: String,
    /// The browser's profile, removed on drop.
    profile: std::path::PathBuf,
}

impl Browser {
    async fn start() -> Option<Browser> {
        if !std::path::Path::new(CHROMIUM).exists() || !std::path::Path::new(CHROMEDRIVER).exists()
        {
            assert!(
                std::env::var_os("TOLLGATE_REQUIRE_BROWSER").is_none(),
                "TOLLGATE_REQUIRE_BROWSER is set but {CHROMIUM} or {CHROMEDRIVER} is missing \
                 (apt-get install -y chromium chromium-driver)"
            );
            eprintln!(
                "\n*** SKIPPING the browser tests: {CHROMIUM} or {CHROMEDRIVER} is missing. \
                 Install them with `apt-get install -y chromium chromium-driver`. ***\n"
            );
            return None;
        }
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("a free port")
            .port();
        let driver = Command::new(CHROMEDRIVER)
            .arg(format!("--port={port}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("chromedriver starts");
        let root = format!("http://127.0.0.1:{port}");
        let up = Instant::now();
        let status_url = format!("{root}/status");
        while client()
            .request(request("GET", &status_url, &[], None))
            .await
            .map_or(true, |r| r.status() != 200)
        {
            assert!(
                up.elapsed() < Duration::from_secs(20),
                "chromedriver did not start"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let profile = temp_dir("chrome");
        let args = [
            "--headless=new".to_owned(),
            "--no-sandbox".into(),
            "--disable-gpu".into(),
            "--disable-quic".into(),
            "--no-first-run".into(),
            "--disable-background-networking".into(),
            "--disable-component-update".into(),
            "--disable-sync".into(),
            "--disable-dev-shm-usage".into(),
            "--window-size=1200,1600".into(),
            format!("--user-data-dir={}", profile.display()),
        ];
        let caps = json!({"capabilities": {"alwaysMatch": {
            "browserName": "chrome",
            "goog:chromeOptions": {"binary": CHROMIUM, "args": args}
        }}});
        let (status, _, v) = send("POST", &format!("{root}/session"), &[], Some(caps)).await;
        assert_eq!(status, 200, "new session: {v}");
        let id = v["value"]["sessionId"].as_str().expect("session id");
        Some(Browser {
            base: format!("{root}/session/{id}"),
            driver,
            profile,
        })
    }

    async fn cmd(&self, method: &str, path: &str, body: Option<Value>) -> Value {
        let body = body.or_else(|| (method == "POST").then(|| json!({})));
        let (status, _, v) = send(method, &format!("{}{path}", self.base), &[], body).await;
        assert_eq!(status, 200, "{method} {path}: {v}");
        v["value"].clone()
    }

    async fn goto(&self, url: &str) {
        self.cmd("POST", "/url", Some(json!({"url": url}))).await;
    }

    /// Runs `body` (a function body; `arguments` are `args`) in the page.
    async fn js(&self, body: &str, args: Value) -> Value {
        self.cmd(
            "POST",
            "/execute/sync",
            Some(json!({"script": body, "args": args})),
        )
        .await
    }

    /// Polls `expr` (a JS expression) until it is truthy; returns its value.
    async fn wait(&self, expr: &str) -> Value {
        let start = Instant::now();
        loop {
            let v = self
                .js(&format!("return ({expr}) || null;"), json!([]))
                .await;
            if !v.is_null() && v != json!(false) {
                return v;
            }
            assert!(
                start.elapsed() < Duration::from_secs(15),
                "timed out waiting for {expr}; page says: {}",
                self.text("body").await
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    async fn text(&self, selector: &str) -> String {
        let v = self
            .js(
                "const n = document.querySelector(arguments[0]); return n ? n.textContent : null;",
                json!([selector]),
            )
            .await;
        v.as_str().unwrap_or("").to_owned()
    }

    /// Types into an input as a user would (WebDriver key events).
    async fn type_into(&self, selector: &str, text: &str) {
        let el = self
            .cmd(
                "POST",
                "/element",
                Some(json!({"using": "css selector", "value": selector})),
            )
            .await;
        let id = el
            .as_object()
            .and_then(|o| o.values().next())
            .and_then(Value::as_str)
            .expect("element id")
            .to_owned();
        self.cmd("POST", &format!("/element/{id}/clear"), None)
            .await;
        self.cmd(
            "POST",
            &format!("/element/{id}/value"),
            Some(json!({"text": text})),
        )
        .await;
    }

    async fn click(&self, selector: &str) {
        let el = self
            .cmd(
                "POST",
                "/element",
                Some(json!({"using": "css selector", "value": selector})),
            )
            .await;
        let id = el
            .as_object()
            .and_then(|o| o.values().next())
            .and_then(Value::as_str)
            .expect("element id")
            .to_owned();
        self.cmd("POST", &format!("/element/{id}/click"), None)
            .await;
    }

    /// Writes a PNG of the viewport to `target/<name>.png` (and to
    /// `docs/<name>.png` when `TOLLGATE_UPDATE_SCREENSHOTS` is set).
    async fn screenshot(&self, name: &str) {
        let b64 = self.cmd("GET", "/screenshot", None).await;
        let png = base64_decode(b64.as_str().expect("base64 screenshot"));
        assert!(png.starts_with(b"\x89PNG"), "not a PNG");
        let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
        let out = root.join("target").join(format!("{name}.png"));
        std::fs::write(&out, &png).expect("write screenshot");
        eprintln!("screenshot: {}", out.display());
        if std::env::var_os("TOLLGATE_UPDATE_SCREENSHOTS").is_some() {
            std::fs::create_dir_all(root.join("docs")).expect("docs dir");
            std::fs::write(root.join("docs").join(format!("{name}.png")), &png)
                .expect("write docs");
        }
    }

    async fn quit(mut self) {
        let _ = send("DELETE", &self.base, &[], None).await;
        let _ = self.driver.kill();
        let _ = self.driver.wait();
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        let _ = self.driver.kill();
        let _ = self.driver.wait();
        let _ = std::fs::remove_dir_all(&self.profile);
    }
}

/// `a + b` of two non-negative decimals, exactly (as picoUSD integers).
fn exact_add(a: &str, b: &str) -> String {
    let pico = |s: &str| -> u128 {
        let (int, frac) = s.split_once('.').unwrap_or((s, ""));
        let frac = format!("{frac:0<12}");
        int.parse::<u128>().expect("integer part") * 1_000_000_000_000
            + frac[..12].parse::<u128>().expect("fraction")
    };
    let sum = pico(a) + pico(b);
    let (int, frac) = (sum / 1_000_000_000_000, sum % 1_000_000_000_000);
    let frac = format!("{frac:012}");
    let frac = frac.trim_end_matches('0');
    if frac.is_empty() {
        int.to_string()
    } else {
        format!("{int}.{frac}")
    }
}

fn base64_decode(s: &str) -> Vec<u8> {
    let val = |c: u8| match c {
        b'A'..=b'Z' => c - b'A',
        b'a'..=b'z' => c - b'a' + 26,
        b'0'..=b'9' => c - b'0' + 52,
        b'+' => 62,
        b'/' => 63,
        _ => panic!("not base64: {c}"),
    };
    let bytes: Vec<u8> = s
        .bytes()
        .filter(|c| *c != b'=' && !c.is_ascii_whitespace())
        .collect();
    let mut out = Vec::with_capacity(bytes.len() * 3 / 4);
    for chunk in bytes.chunks(4) {
        let mut n = 0u32;
        for (i, c) in chunk.iter().enumerate() {
            n |= (val(*c) as u32) << (18 - 6 * i);
        }
        out.push((n >> 16) as u8);
        if chunk.len() > 2 {
            out.push((n >> 8) as u8);
        }
        if chunk.len() > 3 {
            out.push(n as u8);
        }
    }
    out
}

/// A JSON answer's fields as their exact text (amounts are decimals that
/// `Value` would turn into floats).
async fn raw_get(url: &str, auth: &str) -> serde_json::Map<String, Value> {
    let (status, _, body) = send_raw(request("GET", url, &[("authorization", auth)], None)).await;
    assert_eq!(status, 200, "GET {url}");
    let text = std::str::from_utf8(&body).expect("utf-8");
    #[derive(serde::Deserialize)]
    struct Outer<'a> {
        #[serde(borrow)]
        data: &'a RawValue,
    }
    let outer: Outer = serde_json::from_str(text).expect("json with data");
    let fields: std::collections::BTreeMap<String, &RawValue> =
        serde_json::from_str(outer.data.get()).expect("object");
    fields
        .into_iter()
        .map(|(k, v)| (k, Value::String(v.get().trim_matches('"').to_owned())))
        .collect()
}

/// A stand-in for Stripe: `POST /v1/checkout/sessions` records the form and
/// answers a session whose `url` is its own `/paid/cs_N`, a page the
/// browser can land on; the tests see where the portal sent the payer.
struct MockStripe {
    /// `http://127.0.0.1:PORT`.
    url: String,
    /// The forms of the checkouts asked for.
    forms: Arc<Mutex<Vec<String>>>,
}

async fn mock_stripe() -> MockStripe {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let url = format!("http://{}", listener.local_addr().expect("addr"));
    let forms: Arc<Mutex<Vec<String>>> = Arc::default();
    let (seen, base) = (forms.clone(), url.clone());
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let (seen, base) = (seen.clone(), base.clone());
            let svc = hyper::service::service_fn(
                move |req: http::Request<hyper::body::Incoming>| {
                    let (seen, base) = (seen.clone(), base.clone());
                    async move {
                        let (parts, body) = req.into_parts();
                        let form = body
                            .collect()
                            .await
                            .map(|c| c.to_bytes())
                            .unwrap_or_default();
                        let (status, ctype, text) = if parts.method == "POST"
                            && parts.uri.path() == "/v1/checkout/sessions"
                        {
                            let n = {
                                let mut g = seen.lock().expect("lock");
                                g.push(String::from_utf8_lossy(&form).into_owned());
                                g.len()
                            };
                            let v = json!({"id": format!("cs_test_{n}"), "object": "checkout.session",
                                       "url": format!("{base}/paid/cs_test_{n}")});
                            (200, "application/json", v.to_string())
                        } else {
                            (
                                200,
                                "text/html",
                                "<!doctype html><title>paid</title>paid".to_owned(),
                            )
                        };
                        let mut res = http::Response::new(Full::new(Bytes::from(text)));
                        *res.status_mut() = http::StatusCode::from_u16(status).expect("status");
                        res.headers_mut()
                            .insert("content-type", http::HeaderValue::from_static(ctype));
                        Ok::<_, Infallible>(res)
                    }
                },
            );
            tokio::spawn(
                hyper::server::conn::http1::Builder::new()
                    .serve_connection(hyper_util::rt::TokioIo::new(stream), svc),
            );
        }
    });
    MockStripe { url, forms }
}

async fn proxy_chat(gw: &TestGateway, key: &str) -> u16 {
    send(
        "POST",
        &gw.url("/v1/chat/completions"),
        &[("authorization", &bearer(key))],
        Some(chat("demo-chat", false)),
    )
    .await
    .0
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn portal_and_admin_in_a_browser() {
    // SAFETY: set before the gateway reads them, always to the same values;
    // no other test in this binary reads the environment concurrently.
    #[allow(unsafe_code)]
    unsafe {
        std::env::set_var("TOLLGATE_PORTAL_TEST_STRIPE_SK", "sk_test_portal");
        std::env::set_var(
            "TOLLGATE_PORTAL_TEST_STRIPE_WHSEC",
            "whsec_portal_test_0123456789",
        );
    }
    let stripe = mock_stripe().await;
    let gw = TestGateway::start_with(&format!(
        r#"
[payments.stripe]
secret_key_env = "TOLLGATE_PORTAL_TEST_STRIPE_SK"
webhook_secret_env = "TOLLGATE_PORTAL_TEST_STRIPE_WHSEC"
api_base = "{}"
success_url = "https://shop.example/paid"
cancel_url = "https://shop.example/cancel"
[plans.pro]
interval = "month"
price = "30"
grant = "4"
"#,
        stripe.url
    ));
    // Plain HTTP first: the headers hold with or without a browser.
    let (status, headers, _) = send_raw(request("GET", &gw.url("/portal"), &[], None)).await;
    assert_eq!(status, 200);
    let csp = headers["content-security-policy"].to_str().unwrap_or("");
    assert!(
        csp.contains("script-src 'self'") && csp.contains("frame-ancestors 'none'"),
        "{csp}"
    );
    assert!(!csp.contains("unsafe"), "{csp}");
    assert_eq!(headers["x-content-type-options"], "nosniff");
    let etag = headers["etag"].to_str().expect("etag").to_owned();
    let (status, _, body) = send_raw(request(
        "GET",
        &gw.url("/portal"),
        &[("if-none-match", &etag)],
        None,
    ))
    .await;
    assert_eq!((status, body.len()), (304, 0));
    let (_, headers, _) = send_raw(request("GET", &gw.url("/assets/portal.js"), &[], None)).await;
    assert_eq!(headers["content-type"], "text/javascript; charset=utf-8");

    let Some(browser) = Browser::start().await else {
        return;
    };

    // A key with some usage: 23 requests, so the log has three pages of 10.
    let (key, hash) = gw
        .create_key(json!({"name": "portal-test", "limit": "1", "max_requests": 1000, "rpm": 600}))
        .await;
    for _ in 0..23 {
        assert_eq!(proxy_chat(&gw, &key).await, 200);
    }
    gw.flush().await;
    let auth = bearer(&key);
    let status = raw_get(&gw.url("/api/v1/key"), &auth).await;
    assert_eq!(status["requests"], "23");

    // Sign in with the form.
    browser.goto(&gw.url("/portal")).await;
    browser
        .wait("!document.getElementById('sign-in').hidden")
        .await;
    browser.type_into("#key-input", &key).await;
    browser.click("#sign-in-form button[type=submit]").await;
    browser
        .wait("!document.getElementById('view').hidden")
        .await;
    assert_eq!(
        browser.text("#label").await,
        status["label"].as_str().unwrap_or("")
    );
    // The page shows the API's exact decimals, not a float's rendering.
    assert_eq!(
        browser.text("#usage").await,
        format!("{} USD", status["usage"].as_str().unwrap_or(""))
    );
    assert_eq!(
        browser.text("#limit").await,
        format!("{} USD", status["limit"].as_str().unwrap_or(""))
    );
    assert_eq!(
        browser.text("#remaining").await,
        format!("{} USD", status["limit_remaining"].as_str().unwrap_or(""))
    );
    assert_eq!(
        browser.text("#requests").await,
        format!("23 of {}", status["max_requests"].as_str().unwrap_or(""))
    );
    assert_eq!(browser.text("#rate").await, "600 requests / 1m");
    assert_eq!(browser.text("#status").await, "active");
    let stored = browser
        .js(
            "return [sessionStorage.getItem('tollgate.key'), localStorage.length];",
            json!([]),
        )
        .await;
    assert_eq!(stored, json!([key, 0]), "the key is in sessionStorage only");
    assert!(browser.text("#snippet").await.contains(&gw.url("/v1")));

    // Paging: each page of the log is the API's page.
    assert_eq!(
        browser.text("#page-info").await,
        "page 1 of 3 (23 requests)"
    );
    for page in 1..=3u32 {
        let (_, _, api_page) = send(
            "GET",
            &gw.url(&format!("/api/usage/token/logs?page={page}&page_size=10")),
            &[("authorization", &auth)],
            None,
        )
        .await;
        let want: Vec<Value> = api_page["data"]["items"]
            .as_array()
            .expect("items")
            .iter()
            .map(|r| r["request_id"].clone())
            .collect();
        let expr = format!(
            "document.getElementById('page-info').textContent.startsWith('page {page} ') && \
             JSON.stringify(Array.from(document.querySelectorAll('#logs-table tbody tr'), r => r.dataset.requestId))"
        );
        let shown: Vec<Value> =
            serde_json::from_str(browser.wait(&expr).await.as_str().unwrap_or("[]")).expect("ids");
        assert_eq!(shown, want, "page {page}");
        if page < 3 {
            browser.click("#next").await;
        }
    }
    assert_eq!(
        browser
            .js(
                "return document.getElementById('next').disabled;",
                json!([])
            )
            .await,
        json!(true)
    );

    // The deep link: the key from the fragment, then the fragment is gone.
    browser.js("sessionStorage.clear();", json!([])).await;
    browser.goto(&gw.url(&format!("/portal#key={key}"))).await;
    browser
        .wait("!document.getElementById('view').hidden")
        .await;
    assert_eq!(
        browser.text("#label").await,
        status["label"].as_str().unwrap_or("")
    );
    assert_eq!(
        browser.js("return location.hash;", json!([])).await,
        json!("")
    );
    // A wrong key returns to sign-in with the API's message.
    browser.js("sessionStorage.clear();", json!([])).await;
    browser.goto(&gw.url("/portal#key=sk-tg-wrong")).await;
    browser.wait("!document.getElementById('sign-in').hidden && document.getElementById('notice').textContent").await;

    // A key of an account: the portal shows the account and what it has
    // left, the API's exact decimals; "Top up" sends the payer to Stripe.
    let admin = bearer(ADMIN);
    let (s, _, v) = send(
        "POST",
        &gw.url("/api/v1/accounts"),
        &[("authorization", &admin)],
        Some(json!({"id": "acct-portal", "email": "p@example.com"})),
    )
    .await;
    assert_eq!(s, 201, "{v}");
    let (s, _, v) = send(
        "POST",
        &gw.url("/api/v1/accounts/acct-portal/credits"),
        &[("authorization", &admin)],
        Some(json!({"amount": "7.000000000001", "kind": "topup", "reason": "test", "idempotency_key": "portal-1"})),
    )
    .await;
    assert_eq!(s, 200, "{v}");
    let (owned, _) = gw
        .create_key(json!({"name": "owned", "owner": "acct-portal"}))
        .await;
    assert_eq!(proxy_chat(&gw, &owned).await, 200);
    gw.flush().await;
    let own = raw_get(&gw.url("/api/v1/key"), &bearer(&owned)).await;
    assert_eq!(own["account"], "acct-portal");
    browser.js("sessionStorage.clear();", json!([])).await;
    browser.goto(&gw.url(&format!("/portal#key={owned}"))).await;
    browser
        .wait("!document.getElementById('view').hidden && !document.getElementById('topup').hidden")
        .await;
    assert_eq!(browser.text("#account").await, "acct-portal");
    let left = own["account_remaining"].as_str().unwrap_or("").to_owned();
    // 7.000000000001 less the request's cost: twelve decimals a float
    // would not print back as they are.
    assert!(left.starts_with("6.99") && left.len() == 14, "{left}");
    assert_eq!(
        browser.text("#account-remaining").await,
        format!("{left} USD")
    );
    browser.js("window.scrollTo(0, 0);", json!([])).await;
    browser.screenshot("portal").await;
    browser.type_into("#topup-amount", "5").await;
    browser.click("#topup-button").await;
    let landed = browser
        .wait(&format!(
            "location.href.startsWith('{}/paid/') && location.href",
            stripe.url
        ))
        .await;
    assert_eq!(landed, json!(format!("{}/paid/cs_test_1", stripe.url)));
    let form = stripe.forms.lock().expect("lock")[0].clone();
    assert!(
        form.contains("unit_amount%5D=500") || form.contains("unit_amount]=500"),
        "{form}"
    );
    assert!(form.contains("acct-portal"), "{form}");

    // A manual payment, for the console's payments and reconciliation.
    let (s, _, v) = send(
        "POST",
        &gw.url("/api/v1/payments"),
        &[("authorization", &admin)],
        Some(json!({"account": "acct-portal", "amount": "250.5", "reference": "BANK-PORTAL-1", "kind": "topup"})),
    )
    .await;
    assert_eq!(s, 201, "{v}");
    let payment_id = v["data"]["id"].as_str().expect("payment id").to_owned();

    // The admin console: sign in, create a key whose name is markup.
    browser.goto(&gw.url("/admin")).await;
    browser
        .wait("document.querySelector('#token-input[type=password]')")
        .await;
    // A wrong token stays at sign-in with the API's message.
    browser.type_into("#token-input", "tg-tok-wrong").await;
    browser.click("#sign-in-form button[type=submit]").await;
    browser
        .wait("document.getElementById('view').hidden && !document.getElementById('sign-in').hidden && document.getElementById('notice').textContent")
        .await;
    browser.type_into("#token-input", ADMIN).await;
    browser.click("#sign-in-form button[type=submit]").await;
    browser.wait("document.getElementById('keys-table')").await;

    // Accounts, payments, audit: each shows the API's exact text.
    let account = raw_get(&gw.url("/api/v1/accounts/acct-portal"), &admin).await;
    let row = "tr[data-account='acct-portal']";
    browser
        .wait(&format!("document.querySelector(\"{row}\")"))
        .await;
    assert_eq!(
        browser.text(&format!("{row} td:nth-child(4)")).await,
        account["balance"].as_str().unwrap_or("")
    );
    assert_eq!(browser.text(&format!("{row} td:nth-child(9)")).await, "1");
    let payment = raw_get(&gw.url(&format!("/api/v1/payments/{payment_id}")), &admin).await;
    let prow = format!("tr[data-payment='{payment_id}']");
    browser
        .wait(&format!("document.querySelector(\"{prow}\")"))
        .await;
    assert_eq!(
        browser.text(&format!("{prow} td:nth-child(6)")).await,
        payment["amount"].as_str().unwrap_or("")
    );
    assert_eq!(
        browser.text(&format!("{prow} td:nth-child(9)")).await,
        payment["status"].as_str().unwrap_or("")
    );
    let audit = gw.admin_get("/api/v1/audit?target=acct-portal").await;
    let created = audit["data"]
        .as_array()
        .expect("audit entries")
        .iter()
        .find(|a| a["action"] == "account.create")
        .expect("an account.create entry");
    let arow = format!("#audit-table tr[data-seq='{}']", created["seq"]);
    browser
        .wait(&format!("document.querySelector(\"{arow}\")"))
        .await;
    assert_eq!(
        browser
            .js(
                "return Array.from(document.querySelectorAll(arguments[0] + ' td'), t => t.textContent).slice(2, 5);",
                json!([arow]),
            )
            .await,
        json!(["root", "account.create", "acct-portal"])
    );
    // Reconciliation totals per provider are the API's.
    browser.click("#reconcile-button").await;
    browser
        .wait("document.getElementById('reconcile-totals')")
        .await;
    let recon = gw.admin_get("/api/v1/payments/reconcile").await;
    let providers: Vec<String> = recon["data"]["totals"]
        .as_object()
        .expect("totals")
        .keys()
        .cloned()
        .collect();
    let shown = browser
        .js(
            "return Array.from(document.querySelectorAll('#reconcile-totals tbody tr'), r => r.cells[0].textContent);",
            json!([]),
        )
        .await;
    assert_eq!(shown, json!(providers));
    // Top the account up from the console: applied once, exactly.
    browser.click(&format!("{row} .act-account-topup")).await;
    browser.type_into("#account-topup-amount", "1.25").await;
    browser
        .click("#account-topup-form button[type=submit]")
        .await;
    browser
        .wait("document.getElementById('notice').textContent.startsWith('Topped up account')")
        .await;
    let after = raw_get(&gw.url("/api/v1/accounts/acct-portal"), &admin).await;
    let want = exact_add(account["balance"].as_str().unwrap_or(""), "1.25");
    assert_eq!(after["balance"], want.as_str());
    browser
        .wait(&format!(
            "document.querySelector(\"{row} td:nth-child(4)\")?.textContent === '{want}'"
        ))
        .await;

    // Subscriptions of the account: subscribe, renew, cancel from the
    // console; the API agrees at each step.
    browser.click(&format!("{row} .act-account-subs")).await;
    browser
        .wait("document.getElementById('subscribe-plan')")
        .await;
    browser.type_into("#subscribe-plan", "pro").await;
    browser.type_into("#subscribe-trial", "0").await;
    browser.click("#subscribe-form button[type=submit]").await;
    let sid = browser
        .wait("document.querySelector('#subscriptions-table tbody tr')?.dataset.subscription")
        .await;
    let sid = sid.as_str().expect("subscription id").to_owned();
    let srow = format!("tr[data-subscription='{sid}']");
    let sub = raw_get(&gw.url(&format!("/api/v1/subscriptions/{sid}")), &admin).await;
    assert_eq!(sub["plan"], "pro");
    assert_eq!(
        browser.text(&format!("{srow} td:nth-child(3)")).await,
        sub["status"].as_str().unwrap_or("")
    );
    assert_eq!(
        browser.text(&format!("{srow} td:nth-child(7)")).await,
        sub["grant"].as_str().unwrap_or("")
    );
    browser.click(&format!("{srow} .act-renew")).await;
    browser
        .wait(&format!(
            "document.getElementById('notice').textContent === 'Subscription {sid} renewed.'"
        ))
        .await;
    let renewed = raw_get(&gw.url(&format!("/api/v1/subscriptions/{sid}")), &admin).await;
    assert_eq!(
        renewed["paid_through"]
            .as_str()
            .and_then(|p| p.parse::<u64>().ok()),
        sub["paid_through"]
            .as_str()
            .and_then(|p| p.parse::<u64>().ok())
            .map(|p| p + 1),
        "one renewal"
    );
    browser.click(&format!("{srow} .act-cancel")).await;
    browser
        .wait(&format!(
            "document.querySelector(\"{srow} td:nth-child(3)\")?.textContent === 'canceled'"
        ))
        .await;
    let canceled = raw_get(&gw.url(&format!("/api/v1/subscriptions/{sid}")), &admin).await;
    assert_eq!(canceled["status"], "canceled");

    // Events: the account's credit is in the outbox; redelivering answers.
    browser.click("#events .toolbar button").await;
    browser
        .wait("Array.from(document.querySelectorAll('#events-table tbody tr')).some(r => r.cells[2].textContent === 'credit.applied')")
        .await;
    browser.click("#events-table tbody tr .act-redeliver").await;
    browser
        .wait("/^Event evt_\\d+ queued again/.test(document.getElementById('notice').textContent)")
        .await;
    browser
        .js(
            "document.getElementById('accounts').scrollIntoView();",
            json!([]),
        )
        .await;
    browser.screenshot("admin-accounts").await;
    browser.js("window.scrollTo(0, 0);", json!([])).await;

    let evil = "<img src=x onerror=alert(1)>";
    browser.click("details.create summary").await;
    browser.type_into("#create-name", evil).await;
    browser.type_into("#create-limit", "0.5").await;
    browser.click("#create-form button[type=submit]").await;
    let new_key = browser
        .wait("document.getElementById('created-key')?.textContent")
        .await;
    let new_key = new_key.as_str().expect("the created key").to_owned();
    assert!(new_key.starts_with("sk-"), "{new_key}");
    // The key works through the proxy.
    assert_eq!(proxy_chat(&gw, &new_key).await, 200);
    // The name is shown as text; no element was made from it.
    let cells = browser
        .js(
            "return [Array.from(document.querySelectorAll('#keys-table td')).some(td => td.textContent === arguments[0]), document.querySelectorAll('img').length];",
            json!([evil]),
        )
        .await;
    assert_eq!(cells, json!([true, 0]));

    // Disable the new key from the console: the proxy refuses it.
    let new_hash = browser
        .wait("Array.from(document.querySelectorAll('#keys-table tbody tr')).find(r => r.cells[0].textContent.startsWith('<img'))?.dataset.hash")
        .await;
    let new_hash = new_hash.as_str().expect("hash").to_owned();
    browser
        .click(&format!("tr[data-hash='{new_hash}'] .act-disable"))
        .await;
    browser
        .wait(&format!(
            "document.querySelector(\"tr[data-hash='{new_hash}'] .act-enable\")"
        ))
        .await;
    assert_ne!(proxy_chat(&gw, &new_key).await, 200);
    browser
        .click(&format!("tr[data-hash='{new_hash}'] .act-enable"))
        .await;
    browser
        .wait(&format!(
            "document.querySelector(\"tr[data-hash='{new_hash}'] .act-disable\")"
        ))
        .await;
    assert_eq!(proxy_chat(&gw, &new_key).await, 200);

    // Top up the first key by 2 USD with an idempotency key.
    browser
        .click(&format!("tr[data-hash='{hash}'] .act-topup"))
        .await;
    browser.type_into("#topup-amount", "2").await;
    browser.click("#topup-form button[type=submit]").await;
    browser
        .wait("document.getElementById('notice').textContent.startsWith('Topped up')")
        .await;
    let after = raw_get(&gw.url(&format!("/api/v1/keys/{hash}")), &bearer(ADMIN)).await;
    assert_eq!(after["limit"], "3");

    // Search narrows the list; the usage section shows the API's total.
    browser.type_into("#key-search", "portal-test").await;
    browser
        .wait("document.querySelectorAll('#keys-table tbody tr').length === 1")
        .await;
    gw.flush().await;
    browser.click("#usage-refresh").await;
    let gateway = gw.admin_get("/api/v1/usage?top=10").await;
    let requests = gateway["data"]["summary"]["total_requests"].to_string();
    browser
        .wait(&format!(
            "document.getElementById('usage-total-requests')?.textContent === '{requests}'"
        ))
        .await;
    browser.screenshot("admin").await;

    // Delete, after the confirmation.
    browser
        .js("const s = document.getElementById('key-search'); s.value = ''; s.dispatchEvent(new Event('input'));", json!([]))
        .await;
    browser
        .click(&format!("tr[data-hash='{new_hash}'] .act-delete"))
        .await;
    browser.click("#confirm-delete").await;
    browser
        .wait(&format!(
            "!document.querySelector(\"tr[data-hash='{new_hash}']\")"
        ))
        .await;
    assert_ne!(proxy_chat(&gw, &new_key).await, 200);
    // The markup name, now in the events' data too, is still only text.
    browser.click("#events .toolbar button").await;
    browser
        .wait("Array.from(document.querySelectorAll('#events-table td')).some(td => td.textContent.includes('name=<img src=x onerror=alert(1)>'))")
        .await;
    assert_eq!(
        browser
            .js("return document.querySelectorAll('img').length;", json!([]))
            .await,
        json!(0)
    );

    // A scoped token without `keys:read` signs in; the sections its scopes
    // cover work, the others show the API's refusal.
    let (st, _, v) = send(
        "POST",
        &gw.url("/api/v1/admin/tokens"),
        &[("authorization", &admin)],
        Some(json!({"name": "billing-viewer", "scopes": ["accounts:read"]})),
    )
    .await;
    assert_eq!(st, 201, "{v}");
    let scoped = v["token"].as_str().expect("token").to_owned();
    browser.click("#sign-out").await;
    browser.type_into("#token-input", &scoped).await;
    browser.click("#sign-in-form button[type=submit]").await;
    browser
        .wait("document.querySelector(\"#accounts-table tr[data-account='acct-portal']\")")
        .await;
    browser
        .wait("document.getElementById('notice').textContent.includes('scope')")
        .await;
    assert!(!browser.text("#keys").await.contains("portal-test"));
    browser.quit().await;
}
