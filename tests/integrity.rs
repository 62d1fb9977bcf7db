//! Billing integrity over loopback: nothing reaches an upstream with the
//! operator's key unless it is authenticated, admitted and priced; work an
//! upstream did is charged; a request is re-sent only when the upstream
//! provably did not take it; what crosses the gateway is allowlisted.

mod common;

use std::io::{Read, Write};
use std::time::{Duration, Instant};

use common::*;
use serde_json::{Value, json};
use tollgate::config::{BaseUrl, Config, RuntimeMode};
use tollgate_mock::{Fault, MockOptions, MockUpstream};

both_modes!(
    unpriced_routes_never_reach_the_upstream,
    priced_route_rules_allow_a_route,
    no_resend_once_the_upstream_took_the_body,
    abandoned_before_the_answer_is_charged_an_estimate,
    client_headers_are_allowlisted,
    stalled_upstream_is_cut,
    refused_before_the_body_is_read,
    demo_mock_answers_are_never_charged,
    disguised_paths_are_classified_and_forwarded_canonical,
    paid_requests_wait_for_a_failing_store,
);

fn hash_of(hex_hash: &str) -> tollgate::store::KeyHash {
    hex::decode(hex_hash).unwrap().try_into().unwrap()
}

fn records(gw: &TestGateway, hash: &str) -> Vec<tollgate::store::UsageRecord> {
    gw.app().store.usage(&hash_of(hash), 0, 100_000).unwrap()
}

async fn unpriced_routes_never_reach_the_upstream(mode: RuntimeMode) {
    let gw = TestGateway::start_mode(mode, "", |_| {});
    // A broke key and a key with credit: both are refused alike.
    let (broke, _) = gw.create_key(json!({"name": "broke", "limit": "0"})).await;
    let rich = gw.open_key().await;
    for key in [&broke, &rich] {
        let auth = bearer(key);
        for (method, path) in [
            ("GET", "/v1/files"),
            ("POST", "/v1/batches"),
            ("GET", "/v1/batches"),
            ("DELETE", "/v1/files/file-1"),
            ("GET", "/v1/responses/resp_1"),
            ("POST", "/v1/audio/transcriptions"),
            ("POST", "/v1/images/generations"),
        ] {
            let (s, _, v) = send(
                method,
                &gw.url(path),
                &[("authorization", &auth)],
                Some(json!({"model": "demo-chat"})),
            )
            .await;
            assert_error(s, &v, 404, "route_not_allowed");
        }
    }
    assert_eq!(gw.mock.request_count(), 0, "the upstream did nothing");
}

async fn priced_route_rules_allow_a_route(mode: RuntimeMode) {
    let gw = TestGateway::start_mode(
        mode,
        "[routes.\"/v1/moderations\"]\nrequest = \"0.001\"\n[routes.\"/v1/free/*\"]\nfree = true\n",
        |_| {},
    );
    let (key, hash) = gw.create_key(json!({"name": "r", "limit": "1"})).await;
    let auth = bearer(&key);
    // Allowed routes are forwarded (the mock itself answers 404 for them).
    for (method, path) in [("POST", "/v1/moderations"), ("GET", "/v1/free/any/thing")] {
        let (_, _, v) = send(
            method,
            &gw.url(path),
            &[("authorization", &auth)],
            Some(json!({"input": "hello"})),
        )
        .await;
        assert_ne!(v["error"]["code"], "route_not_allowed", "{path}");
    }
    assert_eq!(gw.mock.request_count(), 2, "both went upstream");
    gw.flush().await;
    let recs = records(&gw, &hash);
    assert_eq!(recs.len(), 2, "both requests recorded");
    // Flat prices are charged only on a 2xx answer; none is dearer than the rule.
    assert!(recs.iter().all(|r| r.cost.0 <= 1_000_000_000));
    // Config errors: a rule must be priced or free, not both, not neither.
    for bad in [
        "[routes.\"/v1/x\"]\n",
        "[routes.\"/v1/x\"]\nfree = true\nrequest = \"1\"\n",
    ] {
        let text = BASE
            .replace("{DATA}", "/tmp/none")
            .replace("{MOCK}", "http://127.0.0.1:1/v1")
            + bad;
        assert!(Config::parse(&text, "t.toml").is_err(), "{bad}");
    }
}

async fn no_resend_once_the_upstream_took_the_body(mode: RuntimeMode) {
    let second = MockUpstream::start(MockOptions::default()).expect("mock");
    let gw = TestGateway::start_on(
        mode,
        "",
        {
            let second_url = second.base_url();
            move |c| {
                c.proxy.first_byte_timeout = tollgate::config::Dur(Duration::from_millis(400));
                let mut other = c.upstreams[0].clone();
                other.name = "second".to_owned();
                other.base_url = Some(BaseUrl::parse(&second_url).unwrap());
                c.upstreams.push(other);
                // The first upstream is picked first.
                c.upstreams[0].weight = 1_000_000;
            }
        },
        MockUpstream::start(MockOptions {
            fault: Some(Fault::SlowFirstByte(Duration::from_secs(3))),
            ..MockOptions::default()
        })
        .expect("mock"),
    );
    let (key, hash) = gw.create_key(json!({"name": "t", "limit": "1"})).await;
    let (s, _, v) = send(
        "POST",
        &gw.url("/v1/chat/completions"),
        &[("authorization", &bearer(&key))],
        Some(chat("demo-chat", false)),
    )
    .await;
    assert_error(s, &v, 504, "upstream_error");
    assert_eq!(second.request_count(), 0, "not re-sent after a timeout");
    gw.flush().await;
    let recs = records(&gw, &hash);
    assert_eq!(recs.len(), 1);
    assert_eq!(recs[0].status, 504);
    assert!(recs[0].estimated, "the upstream took the body: an estimate");
    assert!(recs[0].cost.0 > 0, "charged the measured prompt");
    assert!(
        recs[0].prompt_tokens < 100,
        "the measured prompt, not a bound"
    );

    // A connect error is provably not taken: the next upstream serves it.
    drop(gw);
    let dead = MockUpstream::start(MockOptions::default()).expect("mock");
    let dead_url = dead.base_url();
    drop(dead);
    let gw = TestGateway::start_on(
        mode,
        "",
        move |c| {
            let mut other = c.upstreams[0].clone();
            other.name = "dead".to_owned();
            other.base_url = Some(BaseUrl::parse(&dead_url).unwrap());
            other.weight = 1_000_000;
            c.upstreams.insert(0, other);
        },
        MockUpstream::start(MockOptions::default()).expect("mock"),
    );
    let key = gw.open_key().await;
    let (s, _, _) = send(
        "POST",
        &gw.url("/v1/chat/completions"),
        &[("authorization", &bearer(&key))],
        Some(chat("demo-chat", false)),
    )
    .await;
    assert_eq!(s, 200, "failed over after a connect error");
}

async fn abandoned_before_the_answer_is_charged_an_estimate(mode: RuntimeMode) {
    let gw = TestGateway::start_mode(mode, "", |_| {});
    let (key, hash) = gw.create_key(json!({"name": "a", "limit": "1"})).await;
    let req = request(
        "POST",
        &gw.url("/v1/chat/completions"),
        &[
            ("authorization", &bearer(&key)),
            ("x-mock-fault", "slow-first-byte:1500"),
        ],
        Some(chat("demo-chat", false)),
    );
    // The client gives up before the answer's head.
    let _ = tokio::time::timeout(Duration::from_millis(300), send_raw(req)).await;
    assert!(
        eventually(Duration::from_secs(5), || gw.app().metrics.in_flight() == 0).await,
        "settled when the client left"
    );
    gw.flush().await;
    let recs = records(&gw, &hash);
    assert_eq!(recs.len(), 1);
    assert!(recs[0].estimated);
    assert!(recs[0].cost.0 > 0, "the upstream did the work: not free");
    assert_eq!(recs[0].status, 499);
}

async fn client_headers_are_allowlisted(mode: RuntimeMode) {
    let gw = TestGateway::start_mode(mode, "", |_| {});
    let key = gw.open_key().await;
    let (s, _, _) = send(
        "POST",
        &gw.url("/v1/chat/completions"),
        &[
            ("authorization", &bearer(&key)),
            ("openai-organization", "org-victim"),
            ("openai-project", "proj-victim"),
            ("cookie", "session=1"),
            ("x-forwarded-host", "evil"),
            ("x-stainless-lang", "python"),
        ],
        Some(chat("demo-chat", false)),
    )
    .await;
    assert_eq!(s, 200);
    let seen = gw.mock.requests();
    let h = &seen.last().expect("a request").headers;
    for gone in [
        "openai-organization",
        "openai-project",
        "cookie",
        "x-forwarded-host",
        "x-api-key",
    ] {
        assert!(h.get(gone).is_none(), "{gone} must not be forwarded");
    }
    assert_eq!(h["x-stainless-lang"], "python");
    assert_eq!(
        h["authorization"],
        format!("Bearer {UPSTREAM_KEY}").as_str(),
        "the upstream's own key, never the client's"
    );
}

async fn stalled_upstream_is_cut(mode: RuntimeMode) {
    let gw = TestGateway::start_mode(mode, "", |c| {
        c.proxy.stream_idle_timeout = tollgate::config::Dur(Duration::from_millis(300));
    });
    let (key, hash) = gw.create_key(json!({"name": "s", "limit": "1"})).await;
    let started = Instant::now();
    let req = request(
        "POST",
        &gw.url("/v1/chat/completions"),
        &[
            ("authorization", &bearer(&key)),
            ("x-mock-fault", "stall-after:2"),
        ],
        Some(chat("demo-chat", true)),
    );
    let answer = tokio::time::timeout(Duration::from_secs(10), async {
        let res = client().request(req).await.expect("answer head");
        assert_eq!(res.status(), 200);
        // The body breaks off once the upstream has been silent too long.
        http_body_util::BodyExt::collect(res.into_body())
            .await
            .is_err()
    })
    .await;
    assert_eq!(answer.ok(), Some(true), "the stalled stream was cut");
    assert!(started.elapsed() < Duration::from_secs(8));
    assert!(eventually(Duration::from_secs(5), || gw.app().metrics.in_flight() == 0).await);
    gw.flush().await;
    let recs = records(&gw, &hash);
    assert_eq!(recs.len(), 1);
    assert!(recs[0].estimated, "cut: charged an estimate");
    let v: Value = gw.admin_get(&format!("/api/v1/keys/{hash}")).await;
    assert_eq!(v["data"]["in_flight"], 0, "slot freed");
}

async fn refused_before_the_body_is_read(mode: RuntimeMode) {
    let gw = TestGateway::start_mode(mode, "", |_| {});
    let (key, hash) = gw.create_key(json!({"name": "d"})).await;
    let (s, _, _) = send(
        "PATCH",
        &gw.url(&format!("/api/v1/keys/{hash}")),
        &[("authorization", &format!("Bearer {ADMIN}"))],
        Some(json!({"disabled": true})),
    )
    .await;
    assert_eq!(s, 200);
    let addr = gw.addr;
    let key2 = key.clone();
    // A disabled key announces 16 MiB and sends a few bytes: the refusal
    // comes at once, without waiting for (or buffering) the body.
    let answer = tokio::task::spawn_blocking(move || {
        let mut s = std::net::TcpStream::connect(addr).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(3))).unwrap();
        write!(
            s,
            "POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\nauthorization: Bearer {key2}\r\ncontent-type: application/json\r\ncontent-length: 16000000\r\n\r\n{{\"model\":"
        )
        .unwrap();
        let mut buf = [0u8; 512];
        let n = s.read(&mut buf).unwrap_or(0);
        String::from_utf8_lossy(&buf[..n]).into_owned()
    })
    .await
    .unwrap();
    assert!(answer.starts_with("HTTP/1.1 403"), "{answer}");
}

async fn demo_mock_answers_are_never_charged(mode: RuntimeMode) {
    // The key variable is missing: the built-in mock stands in, and what it
    // answers is marked and free, so a production gateway that lost its
    // key cannot bill customers for mock answers.
    let gw = TestGateway::start_mode(mode, "", |c| {
        c.upstreams[0].mock_without_key = true;
        c.upstreams[0].api_key_env = Some("TOLLGATE_TEST_KEY_NEVER_SET".to_owned());
    });
    let (key, hash) = gw.create_key(json!({"name": "demo", "limit": "1"})).await;
    let (s, h, v) = send(
        "POST",
        &gw.url("/v1/chat/completions"),
        &[("authorization", &bearer(&key))],
        Some(chat("demo-chat", false)),
    )
    .await;
    assert_eq!(s, 200, "{v}");
    assert!(h.get("x-tollgate-demo").is_some(), "the answer says so");
    assert_eq!(gw.mock.request_count(), 0, "the in-process mock answered");
    gw.flush().await;
    let recs = records(&gw, &hash);
    assert_eq!(recs.len(), 1);
    assert_eq!(recs[0].cost.0, 0, "never charged");
    assert!(recs[0].upstream.contains("demo"), "{}", recs[0].upstream);
}

#[test]
fn default_price_is_narrowed_to_listed_models() {
    let base = BASE
        .replace("{DATA}", "/tmp/none")
        .replace("{MOCK}", "http://127.0.0.1:1/v1");
    let e = Config::parse(
        &format!("{base}\n[billing]\ndefault_price = \"demo-chat\"\n"),
        "t.toml",
    )
    .unwrap_err()
    .to_string();
    assert!(e.contains("default_price_models"), "{e}");
    let c = Config::parse(
        &format!(
            "{base}\n[billing]\ndefault_price = \"demo-chat\"\ndefault_price_models = [\"demo-chat-*\"]\n"
        ),
        "t.toml",
    )
    .unwrap();
    let routing = tollgate::proxy::Routing::build(&c, &Default::default()).unwrap();
    assert!(routing.model("demo-chat-mini").is_some(), "a listed model");
    assert!(
        routing.model("demo-huge").is_none(),
        "served upstream, not listed"
    );
}

async fn disguised_paths_are_classified_and_forwarded_canonical(mode: RuntimeMode) {
    let gw = TestGateway::start_mode(mode, "", |_| {});
    let (key, hash) = gw.create_key(json!({"name": "p", "limit": "1"})).await;
    let auth = bearer(&key);
    let body = json!({"model": "demo-chat", "messages": [{"role": "user", "content": "hi"}]});
    for path in [
        "/v1/chat/%63ompletions",
        "/v1//chat/completions",
        "/v1/x/../chat/completions",
        "/v1/chat/completions/",
    ] {
        let (s, _, v) = send(
            "POST",
            &gw.url(path),
            &[("authorization", &auth)],
            Some(body.clone()),
        )
        .await;
        assert_eq!(s, 200, "{path}: {v}");
        let seen = gw.mock.requests();
        let last = seen.last().expect("forwarded");
        assert_eq!(
            last.path, "/v1/chat/completions",
            "{path} forwarded canonical"
        );
        let sent: Value = serde_json::from_slice(&last.body).unwrap();
        assert_eq!(
            sent["max_completion_tokens"], 256,
            "{path}: priced and bounded as chat"
        );
    }
    let before = gw.mock.request_count();
    for path in [
        "/v1/chat%2Fcompletions",
        "/v1/chat/completions;x=1",
        "/v1/chat/%00",
    ] {
        let (s, _, v) = send(
            "POST",
            &gw.url(path),
            &[("authorization", &auth)],
            Some(body.clone()),
        )
        .await;
        assert_error(s, &v, 400, "invalid_path");
    }
    assert_eq!(
        gw.mock.request_count(),
        before,
        "refused paths never go upstream"
    );
    gw.flush().await;
    assert!(
        records(&gw, &hash)
            .iter()
            .all(|r| r.route == "chat" && r.cost.0 > 0)
    );
}

async fn paid_requests_wait_for_a_failing_store(mode: RuntimeMode) {
    let gw = TestGateway::start_mode(mode, "", |_| {});
    let (key, hash) = gw.create_key(json!({"name": "disk", "limit": "1"})).await;
    let auth = bearer(&key);
    let url = gw.url("/v1/chat/completions");
    let h = [("authorization", auth.as_str())];
    let chat_once = || send("POST", &url, &h, Some(chat("demo-chat", false)));
    let (s, _, _) = chat_once().await;
    assert_eq!(s, 200);
    gw.flush().await;
    // The disk fails: the next record's commit fails and is kept; from then
    // on paid requests are refused 503 and never reach the upstream.
    gw.app().store.set_write_fault(true);
    let (s, _, _) = chat_once().await;
    assert_eq!(s, 200, "admitted before the store knew");
    assert!(
        eventually(Duration::from_secs(5), || !gw.app().store.accepting()).await,
        "the failing commit is seen"
    );
    let upstream_before = gw.mock.request_count();
    let (s, h, v) = chat_once().await;
    assert_error(s, &v, 503, "store_unavailable");
    assert!(h.contains_key("retry-after"));
    assert_eq!(
        gw.mock.request_count(),
        upstream_before,
        "nothing went upstream"
    );
    // The disk has room again: the kept batch is written, serving resumes.
    gw.app().store.set_write_fault(false);
    assert!(eventually(Duration::from_secs(10), || gw.app().store.accepting()).await);
    let (s, _, _) = chat_once().await;
    assert_eq!(s, 200);
    gw.flush().await;
    let recs = records(&gw, &hash);
    assert_eq!(
        recs.len(),
        3,
        "the record written during the failure was kept"
    );
    let (_, acct) = gw.app().store.key(&hash_of(&hash)).unwrap().unwrap();
    let sum: i64 = recs.iter().map(|r| r.cost.0).sum();
    assert_eq!(acct.spent.0, sum, "spent = Σ records");
}

/// A seeded random mix of requests (streamed or not, upstream faults,
/// clients that leave early): for the key, what the upstream served costs no
/// more than what the key was charged, and spent = Σ records (no ledger).
/// `drain` mode: a client that leaves does not make the gateway stop reading
/// what the upstream still produces (with `cancel`, tokens in flight when
/// the connection drops are knowingly given up).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn random_mixes_never_serve_more_than_is_charged() {
    let gw = TestGateway::start_mode(RuntimeMode::PerCore, "", |c| {
        c.billing.on_client_disconnect = tollgate::config::OnClientDisconnect::Drain;
        c.proxy.stream_idle_timeout = tollgate::config::Dur(Duration::from_millis(500));
    });
    let (key, hash) = gw.create_key(json!({"name": "mix", "limit": "100"})).await;
    let auth = bearer(&key);
    let url = gw.url("/v1/chat/completions");
    let mut seed = 0x9E37_79B9_7F4A_7C15u64;
    let mut next = move |n: u64| {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed % n
    };
    let faults = [
        "none",
        "none",
        "status:500",
        "status:429",
        "reset-after:3",
        "no-usage",
        "stall-after:2",
        "slow-first-byte:30",
        "garbage",
    ];
    let mut tasks = Vec::new();
    for _ in 0..48 {
        let stream = next(2) == 0;
        let fault = faults[next(faults.len() as u64) as usize];
        let leave_early = next(4) == 0;
        let chunks = (2 + next(20)).to_string();
        let req = request(
            "POST",
            &url,
            &[
                ("authorization", auth.as_str()),
                ("x-mock-fault", fault),
                ("x-mock-chunks", chunks.as_str()),
            ],
            Some(chat("demo-chat", stream)),
        );
        tasks.push(tokio::spawn(async move {
            let Ok(res) = client().request(req).await else {
                return;
            };
            let mut body = res.into_body();
            if leave_early {
                let _ = http_body_util::BodyExt::frame(&mut body).await;
                return; // dropped: the client is gone
            }
            let _ = http_body_util::BodyExt::collect(body).await;
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    assert!(
        eventually(Duration::from_secs(15), || gw.app().metrics.in_flight()
            == 0
            && gw.mock.open_streams() == 0)
        .await,
        "everything settled"
    );
    gw.flush().await;
    let recs = records(&gw, &hash);
    assert_eq!(recs.len(), 48, "every admitted request recorded");
    let charged: i64 = recs.iter().map(|r| r.cost.0).sum();
    let (_, acct) = gw.app().store.key(&hash_of(&hash)).unwrap().unwrap();
    assert_eq!(acct.spent.0, charged, "spent = Σ records");
    let served = gw.mock.served().tokens_of("demo-chat");
    let price = tollgate::meter::Price {
        input: tollgate::money::Pico::parse_usd("0.15").unwrap(),
        cached_input: None,
        cache_write: None,
        cache_write_1h: None,
        output: tollgate::money::Pico::parse_usd("0.60").unwrap(),
        request: tollgate::money::Pico::ZERO,
    };
    let upstream_cost = price.cost(&tollgate::meter::Usage {
        prompt_tokens: served.input,
        cached_tokens: served.cached,
        completion_tokens: served.output,
        reasoning_tokens: served.reasoning,
        ..Default::default()
    });
    assert!(
        upstream_cost.0 <= charged,
        "the upstream served {upstream_cost} of work, the key was charged {}",
        tollgate::money::Pico(charged)
    );
}
