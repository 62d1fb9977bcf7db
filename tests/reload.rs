//! Config reload (issue 12) over the wire: the API call and its answer, a
//! broken file kept out, restart-only settings reported, reload under load
//! (no request fails; requests that start after it pay the new price), and
//! a request in flight finishing on the price it started with.

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use common::*;
use http_body_util::BodyExt;
use serde_json::{Value, json};

use tollgate::config::RuntimeMode;
use tollgate::money::Pico;
use tollgate_mock::{MockOptions, MockUpstream};

/// A gateway whose config file is `reload.toml` in its storage dir.
fn gateway(mode: RuntimeMode, mock: MockUpstream) -> TestGateway {
    let gw = TestGateway::start_on(
        mode,
        "",
        |c| c.source = Some(c.storage.path.join("reload.toml")),
        mock,
    );
    write_config(&gw, "0.15", "0.60", "");
    gw
}

/// Writes the test config with these demo-chat prices and `extra` TOML.
fn write_config(gw: &TestGateway, input: &str, output: &str, extra: &str) {
    // The mode the harness set in code, written down so that it is no change.
    let mode = serde_json::to_value(gw.app().config.runtime.mode).unwrap();
    let text = BASE
        .replace("workers = 2", &format!("workers = 2\nmode = {mode}"))
        .replace("{DATA}", &gw.data.display().to_string())
        .replace("{MOCK}", &gw.mock.base_url())
        .replace("input = \"0.15\"", &format!("input = \"{input}\""))
        .replace("output = \"0.60\"", &format!("output = \"{output}\""))
        + extra;
    std::fs::write(gw.data.join("reload.toml"), text).expect("write config");
}

async fn reload(gw: &TestGateway) -> (u16, Value) {
    let (s, _, v) = send(
        "POST",
        &gw.url("/api/v1/admin/reload"),
        &[("authorization", &bearer(ADMIN))],
        None,
    )
    .await;
    (s, v)
}

fn usd(v: &Value) -> Pico {
    Pico::parse_usd(v.to_string().trim_matches('"')).unwrap_or_else(|_| panic!("usd {v}"))
}

async fn spent(gw: &TestGateway, hash: &str) -> Pico {
    usd(&gw.admin_get(&format!("/api/v1/keys/{hash}")).await["data"]["usage"])
}

/// The key's spend once it has moved past `before` (settling runs as the
/// answer ends, a moment after the client has read it).
async fn spent_after(gw: &TestGateway, hash: &str, before: Pico) -> Pico {
    for _ in 0..500 {
        let now = spent(gw, hash).await;
        if now != before {
            return now;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("the key's spend never moved from {before}");
}

async fn chat_ok(gw: &TestGateway, key: &str) -> u16 {
    let auth = bearer(key);
    let (s, _, _) = send(
        "POST",
        &gw.url("/v1/chat/completions"),
        &[("authorization", &auth)],
        Some(chat("demo-chat", false)),
    )
    .await;
    s
}

/// The cost of one request, measured on the key.
async fn one_request_cost(gw: &TestGateway, key: &str, hash: &str) -> Pico {
    let before = spent(gw, hash).await;
    assert_eq!(chat_ok(gw, key).await, 200);
    Pico(spent_after(gw, hash, before).await.0 - before.0)
}

async fn reload_swaps_prices_and_reports_restart_settings(mode: RuntimeMode) {
    let gw = gateway(mode, MockUpstream::start(MockOptions::default()).unwrap());
    let (key, hash) = gw.create_key(json!({"name": "r"})).await;
    let old = one_request_cost(&gw, &key, &hash).await;
    write_config(&gw, "150", "600", "");
    let (s, v) = reload(&gw).await;
    assert_eq!(s, 200, "{v}");
    assert_eq!(v, json!({"reloaded": true, "restart_required": []}));
    // Audited as an admin write: actor, address, what it answered.
    let audit = gw.admin_get("/api/v1/audit?target=config").await;
    assert_eq!(audit["data"][0]["action"], "config.reload", "{audit}");
    assert_eq!(audit["data"][0]["actor"], "root");
    assert_eq!(audit["data"][0]["ip"], "127.0.0.1");
    assert_eq!(audit["data"][0]["after"], v);
    let new = one_request_cost(&gw, &key, &hash).await;
    assert_eq!(new.0, old.0 * 1000, "old {old}, new {new}");

    // A plan added by a reload can be used at once (plans come from the
    // live config too).
    write_config(&gw, "150", "600", "[plans.gold]\nlimit = \"5\"\n");
    assert_eq!(reload(&gw).await.0, 200);
    let (s, _, v) = send(
        "POST",
        &gw.url("/api/v1/keys"),
        &[("authorization", &bearer(ADMIN))],
        Some(json!({"name": "g", "plan": "gold"})),
    )
    .await;
    assert_eq!(s, 201, "{v}");

    // Restart-only settings are named, the rest still applies.
    let text = std::fs::read_to_string(gw.data.join("reload.toml"))
        .unwrap()
        .replace("listen = \"127.0.0.1:0\"", "listen = \"127.0.0.1:1\"")
        .replace("workers = 2", "workers = 3")
        .replace("input = \"150\"", "input = \"0.15\"")
        .replace("output = \"600\"", "output = \"0.60\"");
    std::fs::write(gw.data.join("reload.toml"), text).unwrap();
    let (s, v) = reload(&gw).await;
    assert_eq!(s, 200, "{v}");
    assert_eq!(
        v["restart_required"],
        json!(["server.listen", "runtime.workers"])
    );
    assert_eq!(one_request_cost(&gw, &key, &hash).await, old);
    // Still listening where it was.
    assert_eq!(chat_ok(&gw, &key).await, 200);
}

async fn a_broken_file_keeps_the_running_config(mode: RuntimeMode) {
    let gw = gateway(mode, MockUpstream::start(MockOptions::default()).unwrap());
    let (key, hash) = gw.create_key(json!({"name": "r"})).await;
    let before = one_request_cost(&gw, &key, &hash).await;
    let path = gw.data.join("reload.toml");
    let broken = [
        ("not toml", "[server\nlisten = 1".to_owned()),
        (
            "a bad price",
            std::fs::read_to_string(&path)
                .unwrap()
                .replace("input = \"0.15\"", "input = \"cheap\""),
        ),
        (
            "an unknown setting",
            std::fs::read_to_string(&path).unwrap() + "[proxy2]\nx = 1\n",
        ),
    ];
    let good = std::fs::read_to_string(&path).unwrap();
    for (what, text) in broken {
        std::fs::write(&path, text).unwrap();
        let (s, v) = reload(&gw).await;
        assert_error(s, &v, 400, "invalid_config");
        assert_eq!(v["error"]["metadata"]["reloaded"], false, "{what}: {v}");
        assert!(
            v["error"]["message"]
                .as_str()
                .unwrap()
                .contains("reload.toml"),
            "{what}: the answer names the file: {v}"
        );
        assert_eq!(one_request_cost(&gw, &key, &hash).await, before, "{what}");
    }
    std::fs::remove_file(&path).unwrap();
    let (s, v) = reload(&gw).await;
    assert_error(s, &v, 400, "invalid_config");
    std::fs::write(&path, good).unwrap();
    assert_eq!(reload(&gw).await.0, 200);
}

/// Requests in a loop on several connections while the config is reloaded
/// back and forth: every one succeeds; once the last reload has answered,
/// requests pay its price.
async fn reload_under_load(mode: RuntimeMode) {
    let gw = Arc::new(gateway(
        mode,
        MockUpstream::start(MockOptions::default()).unwrap(),
    ));
    let (key, hash) = gw.create_key(json!({"name": "load"})).await;
    let base = one_request_cost(&gw, &key, &hash).await;
    let stop = Arc::new(AtomicBool::new(false));
    let done = Arc::new(AtomicU64::new(0));
    let mut workers = Vec::new();
    for _ in 0..4 {
        let (gw, key, stop, done) = (gw.clone(), key.clone(), stop.clone(), done.clone());
        workers.push(tokio::spawn(async move {
            let mut failures = Vec::new();
            while !stop.load(Ordering::Relaxed) {
                let s = chat_ok(&gw, &key).await;
                if s != 200 {
                    failures.push(s);
                }
                done.fetch_add(1, Ordering::Relaxed);
            }
            failures
        }));
    }
    for i in 0..12 {
        let (input, output) = if i % 2 == 0 {
            ("1.5", "6")
        } else {
            ("0.15", "0.60")
        };
        write_config(&gw, input, output, "");
        let (s, v) = reload(&gw).await;
        assert_eq!(s, 200, "{v}");
        tokio::time::sleep(Duration::from_millis(30)).await;
    }
    // Last reload: ×10 prices.
    write_config(&gw, "1.5", "6", "");
    assert_eq!(reload(&gw).await.0, 200);
    stop.store(true, Ordering::Relaxed);
    for w in workers {
        assert_eq!(w.await.unwrap(), Vec::<u16>::new(), "no request failed");
    }
    assert!(done.load(Ordering::Relaxed) >= 12, "the load ran");
    gw.flush().await;
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert_eq!(one_request_cost(&gw, &key, &hash).await.0, base.0 * 10);
}

/// A stream that starts before a reload is charged the price it started
/// with, though it ends after the swap.
async fn in_flight_requests_keep_their_config(mode: RuntimeMode) {
    let mock = MockUpstream::start(MockOptions {
        chunk_delay: Duration::from_millis(40),
        ..MockOptions::default()
    })
    .unwrap();
    let gw = gateway(mode, mock);
    let (key, hash) = gw.create_key(json!({"name": "s"})).await;
    let auth = bearer(&key);
    let stream_req = || {
        request(
            "POST",
            &gw.url("/v1/chat/completions"),
            &[("authorization", &auth)],
            Some(chat("demo-chat", true)),
        )
    };
    // One whole stream at the old price, for reference.
    let before = spent(&gw, &hash).await;
    let (s, _, _) = send_raw(stream_req()).await;
    assert_eq!(s, 200);
    let after_first = spent_after(&gw, &hash, before).await;
    let reference = after_first.0 - before.0;

    let res = client().request(stream_req()).await.unwrap();
    assert_eq!(res.status(), 200);
    let mut body = res.into_body();
    let first = body.frame().await.expect("a first frame").unwrap();
    assert!(first.is_data());
    write_config(&gw, "150", "600", "");
    assert_eq!(reload(&gw).await.0, 200);
    while let Some(f) = body.frame().await {
        f.unwrap();
    }
    let after_second = spent_after(&gw, &hash, after_first).await;
    assert_eq!(after_second.0 - after_first.0, reference, "old price kept");
    // The next one pays the new price.
    let (s, _, _) = send_raw(stream_req()).await;
    assert_eq!(s, 200);
    let after_third = spent_after(&gw, &hash, after_second).await;
    assert_eq!(after_third.0 - after_second.0, reference * 1000);
}

common::both_modes!(
    reload_swaps_prices_and_reports_restart_settings,
    a_broken_file_keeps_the_running_config,
    reload_under_load,
    in_flight_requests_keep_their_config,
);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gateway_without_a_file_says_so() {
    let gw = TestGateway::start();
    let (s, v) = reload(&gw).await;
    assert_error(s, &v, 400, "invalid_config");
    assert!(
        v["error"]["message"]
            .as_str()
            .unwrap()
            .contains("not started from a config file")
    );
}
