//! The portal and the admin console in a real browser: headless Chromium
//! driven over WebDriver (chromedriver), against a real gateway and the
//! mock upstream. The WebDriver client is the few W3C endpoints these tests
//! use, over the hyper client the tests already have: no new dependency.
//!
//! Skips (loudly) only when chromium/chromedriver are missing and
//! `TOLLGATE_REQUIRE_BROWSER` is unset; CI sets it.

mod common;

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::*;
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
    let gw = TestGateway::start();
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
    browser.screenshot("portal").await;

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

    // The admin console: sign in, create a key whose name is markup.
    browser.goto(&gw.url("/admin")).await;
    browser
        .wait("document.querySelector('#token-input[type=password]')")
        .await;
    browser.type_into("#token-input", ADMIN).await;
    browser.click("#sign-in-form button[type=submit]").await;
    browser.wait("document.getElementById('keys-table')").await;
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
    browser.quit().await;
}
