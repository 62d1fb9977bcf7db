//! Anthropic's Messages API over loopback, with the mock (or a scripted
//! upstream) speaking it: bytes passed on exactly, cache writes and reads
//! priced to the picoUSD, cut and errored streams charged a stated
//! estimate, every refusal in Anthropic's error shape, the upstream's own
//! key sent as `x-api-key`, count_tokens free and uncounted, and no
//! overspend under concurrency.

mod common;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use common::*;
use http_body_util::BodyExt;
use serde_json::{Value, json};
use tollgate::config::{Config, RuntimeMode};
use tollgate::meter::{Price, Usage};
use tollgate::money::Pico;
use tollgate::store::{KeyHash, UsageRecord};
use tollgate_mock::{MockOptions, MockUpstream};

both_modes!(
    streams_and_json_are_priced_exactly_with_cache_tokens,
    stream_bytes_are_passed_on_exactly,
    cut_and_errored_streams_are_estimated,
    refusals_are_in_anthropics_shape,
    upstream_errors_reach_the_client_in_anthropics_shape,
    the_upstream_gets_its_own_key_and_the_version,
    count_tokens_is_free_and_not_counted,
    concurrent_messages_never_overspend,
    thinking_budget_counts_within_max_tokens,
);

const MODEL: &str = "claude-sonnet-4-5";

/// The Claude upstream, appended to tests/common BASE.
fn claude_upstream(base_url: &str) -> String {
    format!(
        r#"
[[upstreams]]
name = "claude"
kind = "anthropic"
base_url = "{base_url}"
api_key_env = "TOLLGATE_TEST_UPSTREAM_KEY"
models = ["claude-*"]
first_byte_timeout = "500ms"
[models."claude-sonnet-4-5"]
input = "3"
output = "15"
cache_write = "3.75"
cache_write_1h = "6"
cache_read = "0.30"
max_output_tokens = 1024
"#
    )
}

fn claude_price() -> Price {
    let p = |s: &str| Pico::parse_usd(s).unwrap();
    Price {
        input: p("3"),
        cached_input: Some(p("0.30")),
        cache_write: Some(p("3.75")),
        cache_write_1h: Some(p("6")),
        output: p("15"),
        request: Pico::ZERO,
    }
}

/// A gateway whose Claude upstream is a mock that takes only the upstream
/// key, as `x-api-key`.
fn start(mode: RuntimeMode, edit: impl FnOnce(&mut Config)) -> TestGateway {
    let mock = MockUpstream::start(MockOptions {
        record_requests: true,
        require_key: Some(UPSTREAM_KEY.to_owned()),
        ..MockOptions::default()
    })
    .expect("mock starts");
    let extra = claude_upstream(&mock.base_url());
    TestGateway::start_on(mode, &extra, edit, mock)
}

fn body(stream: bool, max_tokens: u64) -> Value {
    json!({
        "model": MODEL,
        "max_tokens": max_tokens,
        "stream": stream,
        "system": [{"type": "text", "text": "Be brief.", "cache_control": {"type": "ephemeral"}}],
        "messages": [{"role": "user", "content": "Say hello to the gateway."}],
    })
}

async fn messages(
    gw: &TestGateway,
    headers: &[(&str, &str)],
    b: Value,
) -> (u16, http::HeaderMap, Bytes) {
    send_raw(request("POST", &gw.url("/v1/messages"), headers, Some(b))).await
}

fn json_of(b: &Bytes) -> Value {
    serde_json::from_slice(b).unwrap_or(Value::Null)
}

/// `{"type":"error","error":{"type","message"},"request_id"}` with this
/// status and type, and nothing of OpenAI's shape.
fn assert_anthropic_error(status: u16, b: &Bytes, want_status: u16, want_type: &str) {
    let v = json_of(b);
    assert_eq!(status, want_status, "{v}");
    assert_eq!(v["type"], "error", "{v}");
    assert_eq!(v["error"]["type"], want_type, "{v}");
    assert!(
        v["error"]["message"]
            .as_str()
            .is_some_and(|m| !m.is_empty()),
        "{v}"
    );
    assert!(
        v["request_id"].as_str().is_some_and(|r| !r.is_empty()),
        "{v}"
    );
    assert!(v["error"].get("code").is_none(), "not OpenAI's shape: {v}");
}

fn hash_bytes(hex_hash: &str) -> KeyHash {
    hex::decode(hex_hash).unwrap().try_into().unwrap()
}

fn records(gw: &TestGateway, hash: &str) -> Vec<UsageRecord> {
    gw.app().store.usage(&hash_bytes(hash), 0, 100_000).unwrap()
}

/// Settled and flushed: live spent = stored spent = Σ records.
async fn settled(gw: &TestGateway, hash: &str) -> (Pico, Vec<UsageRecord>) {
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
    assert_eq!(n.reserved, Pico::ZERO, "every reservation settled");
    gw.flush().await;
    let recs = records(gw, hash);
    let sum: i64 = recs.iter().map(|r| r.cost.0).sum();
    let (_, account) = gw.app().store.key(&h).unwrap().unwrap();
    assert_eq!(account.spent.0, sum, "stored spent = Σ records");
    assert_eq!(n.spent.0, sum, "live spent = Σ records");
    assert_eq!(account.requests, recs.len() as u64);
    (n.spent, recs)
}

/// What the mock says it served for the model, as the usage it reported.
fn served_usage(gw: &TestGateway) -> Usage {
    let t = gw.mock.served().tokens_of(MODEL);
    Usage {
        prompt_tokens: t.input + t.cache_write + t.cache_read,
        cached_tokens: t.cache_read,
        cache_write_tokens: t.cache_write,
        cache_write_1h_tokens: t.cache_write_1h,
        completion_tokens: t.output,
        reasoning_tokens: 0,
    }
}

/// SSE events as (name, data).
fn events(b: &[u8]) -> Vec<(String, Value)> {
    let text = std::str::from_utf8(b).expect("UTF-8");
    text.split("\n\n")
        .filter(|e| !e.trim().is_empty())
        .map(|e| {
            let mut name = String::new();
            let mut data = Value::Null;
            for line in e.lines() {
                if let Some(n) = line.strip_prefix("event: ") {
                    name = n.to_owned();
                } else if let Some(d) = line.strip_prefix("data: ") {
                    data = serde_json::from_str(d).expect("event JSON");
                }
            }
            (name, data)
        })
        .collect()
}

async fn streams_and_json_are_priced_exactly_with_cache_tokens(mode: RuntimeMode) {
    let gw = start(mode, |_| {});
    let (key, hash) = gw.create_key(json!({"name": "claude"})).await;
    let cache = [
        ("x-api-key", key.as_str()),
        ("x-mock-cache-read-tokens", "6"),
        ("x-mock-cache-write-tokens", "5"),
        ("x-mock-cache-write-1h-tokens", "2"),
        ("x-mock-chunks", "12"),
    ];
    // Streamed: the real event sequence, pings included.
    let (s, h, got) = messages(&gw, &cache, body(true, 10)).await;
    assert_eq!(s, 200, "{}", String::from_utf8_lossy(&got));
    assert!(
        h["content-type"]
            .to_str()
            .unwrap()
            .starts_with("text/event-stream")
    );
    let evs = events(&got);
    let names: Vec<&str> = evs.iter().map(|(n, _)| n.as_str()).collect();
    assert_eq!(names.first(), Some(&"message_start"));
    assert!(names.contains(&"ping"), "{names:?}");
    assert_eq!(names.last(), Some(&"message_stop"));
    let text: String = evs
        .iter()
        .filter_map(|(_, d)| d["delta"]["text"].as_str())
        .collect();
    assert!(!text.is_empty());
    let stream_usage = served_usage(&gw);
    assert_eq!(
        stream_usage.completion_tokens, 10,
        "max_tokens bounds the answer"
    );
    assert_eq!(
        (
            stream_usage.cached_tokens,
            stream_usage.cache_write_tokens,
            stream_usage.cache_write_1h_tokens
        ),
        (6, 5, 2)
    );
    let (spent, recs) = settled(&gw, &hash).await;
    let price = claude_price();
    assert_eq!(spent, price.cost(&stream_usage), "stream priced exactly");
    let r = &recs[0];
    assert_eq!(
        (r.route.as_str(), r.stream, r.estimated, r.status),
        ("messages", true, false, 200)
    );
    assert_eq!(
        (
            r.prompt_tokens,
            r.cached_tokens,
            r.cache_write_tokens,
            r.completion_tokens
        ),
        (stream_usage.prompt_tokens, 6, 5, 10)
    );
    // The exact picoUSD, by hand: 1-hour writes at 6, 5-minute at 3.75,
    // reads at 0.30, the rest of the prompt at 3, output at 15.
    let input = stream_usage.prompt_tokens - 6 - 5;
    assert_eq!(
        spent.0,
        (input * 3_000_000 + 3 * 3_750_000 + 2 * 6_000_000 + 6 * 300_000 + 10 * 15_000_000) as i64
    );

    // Not streamed: the usage object.
    let (s, _, got) = messages(&gw, &cache, body(false, 7)).await;
    assert_eq!(s, 200);
    let v = json_of(&got);
    assert_eq!(v["type"], "message");
    assert_eq!(v["usage"]["cache_read_input_tokens"], 6);
    assert_eq!(v["usage"]["output_tokens"], 7);
    let both = served_usage(&gw);
    let json_usage = Usage {
        prompt_tokens: both.prompt_tokens - stream_usage.prompt_tokens,
        cached_tokens: both.cached_tokens - 6,
        cache_write_tokens: both.cache_write_tokens - 5,
        cache_write_1h_tokens: both.cache_write_1h_tokens - 2,
        completion_tokens: both.completion_tokens - 10,
        reasoning_tokens: 0,
    };
    let (spent2, recs) = settled(&gw, &hash).await;
    assert_eq!(spent2.0 - spent.0, price.cost(&json_usage).0);
    assert_eq!(recs.len(), 2);
    assert!(recs.iter().all(|r| !r.estimated && r.cost <= r.reserved));

    // The usage API carries the cache tokens.
    let (s, _, v) = send(
        "GET",
        &gw.url("/api/usage/token/detail"),
        &[("authorization", &bearer(&key))],
        None,
    )
    .await;
    assert_eq!(s, 200, "{v}");
    let text = v.to_string();
    assert!(text.contains("\"cache_write_tokens\":10"), "{text}");
}

/// A fixed Anthropic stream, frame by frame, through the gateway: the
/// client reads exactly those bytes (`event:` lines, pings, a comment
/// line), nothing injected; the usage is read from them.
async fn stream_bytes_are_passed_on_exactly(mode: RuntimeMode) {
    let frames: Vec<Bytes> = [
        "event: message_start\ndata: {\"type\":\"message_start\",\"message\":{\"id\":\"msg_1\",\"type\":\"message\",\"role\":\"assistant\",\"model\":\"claude-sonnet-4-5\",\"content\":[],\"stop_reason\":null,\"stop_sequence\":null,\"usage\":{\"input_tokens\":20,\"cache_creation_input_tokens\":100,\"cache_read_input_tokens\":1000,\"cache_creation\":{\"ephemeral_5m_input_tokens\":60,\"ephemeral_1h_input_tokens\":40},\"output_tokens\":1}}}\n\n",
        "event: content_block_start\ndata: {\"type\":\"content_block_start\",\"index\":0,\"content_block\":{\"type\":\"text\",\"text\":\"\"}}\n\n",
        "event: ping\ndata: {\"type\": \"ping\"}\n\n: a comment\n\n",
        "event: content_block_delta\ndata: {\"type\":\"content_block_delta\",\"index\":0,\"delta\":{\"type\":\"text_delta\",\"text\":\"Hel",
        "lo\"}}\n\nevent: content_block_delta\ndata: {\"type\":\"content_block_delta\",\"index\":0,\"delta\":{\"type\":\"text_delta\",\"text\":\" there\"}}\n\n",
        "event: content_block_stop\ndata: {\"type\":\"content_block_stop\",\"index\":0}\n\n",
        "event: message_delta\ndata: {\"type\":\"message_delta\",\"delta\":{\"stop_reason\":\"end_turn\",\"stop_sequence\":null},\"usage\":{\"output_tokens\":2}}\n\n",
        "event: message_delta\ndata: {\"type\":\"message_delta\",\"delta\":{\"stop_reason\":\"end_turn\",\"stop_sequence\":null},\"usage\":{\"output_tokens\":9}}\n\n",
        "event: message_stop\ndata: {\"type\":\"message_stop\"}\n\n",
    ]
    .into_iter()
    .map(|f: &'static str| Bytes::from_static(f.as_bytes()))
    .collect();
    let want: Vec<u8> = frames.iter().flat_map(|f| f.to_vec()).collect();
    let up = ScriptedUpstream::start("text/event-stream", frames, Duration::from_millis(2)).await;
    let extra = claude_upstream(&up.base_url());
    let gw = TestGateway::start_mode(mode, &extra, |_| {});
    let (key, hash) = gw.create_key(json!({"name": "bytes"})).await;
    let (s, h, got) = messages(&gw, &[("authorization", &bearer(&key))], body(true, 64)).await;
    assert_eq!(s, 200);
    assert_eq!(got.as_ref(), want.as_slice(), "byte-identical");
    assert_eq!(h["x-upstream-header"], "kept");
    let (spent, recs) = settled(&gw, &hash).await;
    // The last message_delta wins; the 1-hour writes have their price.
    let expected =
        20 * 3_000_000 + 60 * 3_750_000 + 40 * 6_000_000 + 1000 * 300_000 + 9 * 15_000_000;
    assert_eq!(spent.0, expected);
    assert_eq!(
        (
            recs[0].prompt_tokens,
            recs[0].cached_tokens,
            recs[0].cache_write_tokens,
            recs[0].completion_tokens
        ),
        (1120, 1000, 100, 9)
    );
    assert!(!recs[0].estimated);
}

async fn cut_and_errored_streams_are_estimated(mode: RuntimeMode) {
    let gw = start(mode, |_| {});
    let (key, hash) = gw.create_key(json!({"name": "cut"})).await;
    let price = claude_price();
    let mut seen: Vec<String> = Vec::new();
    for (i, fault) in ["reset-after:6", "error-after:6"].into_iter().enumerate() {
        let res = client()
            .request(request(
                "POST",
                &gw.url("/v1/messages"),
                &[
                    ("x-api-key", &key),
                    ("x-mock-fault", fault),
                    ("x-mock-cache-read-tokens", "4"),
                    ("x-mock-chunks", "30"),
                ],
                Some(body(true, 30)),
            ))
            .await
            .unwrap();
        assert_eq!(res.status(), 200);
        let got = res.into_body().collect().await.map(|c| c.to_bytes());
        if fault.starts_with("error") {
            let got = got.expect("an error event ends the body cleanly");
            let evs = events(&got);
            let (name, data) = evs.last().unwrap();
            assert_eq!(name, "error");
            assert_eq!(data["error"]["type"], "overloaded_error");
        }
        let (_, recs) = settled(&gw, &hash).await;
        assert_eq!(recs.len(), i + 1);
        let r = recs
            .iter()
            .find(|r| !seen.contains(&r.request_id))
            .expect("this request's record");
        seen.push(r.request_id.clone());
        assert!(r.estimated, "{fault}: marked estimated");
        // The prompt and cache reads are what message_start reported.
        let t = gw.mock.served().tokens_of(MODEL);
        assert_eq!(r.cached_tokens, 4, "{fault}");
        assert!(r.prompt_tokens >= 4 && r.prompt_tokens <= t.input + t.cache_read);
        // The output is what was delivered: a few deltas, far below 30.
        assert!(
            (1..30).contains(&r.completion_tokens),
            "{fault}: {} delivered",
            r.completion_tokens
        );
        let u = Usage {
            prompt_tokens: r.prompt_tokens,
            cached_tokens: r.cached_tokens,
            cache_write_tokens: r.cache_write_tokens,
            cache_write_1h_tokens: 0,
            completion_tokens: r.completion_tokens,
            reasoning_tokens: 0,
        };
        assert_eq!(
            r.cost,
            price.cost(&u),
            "{fault}: the estimate is priced exactly"
        );
        assert!(r.cost <= r.reserved);
    }
}

async fn refusals_are_in_anthropics_shape(mode: RuntimeMode) {
    let gw = start(mode, |c| c.server.max_body_bytes = 4096);
    let key = gw.open_key().await;
    let k = [("x-api-key", key.as_str())];
    // 401: an unknown key, by x-api-key or by Bearer; none at all.
    let bad = format!("sk-tg-{}", "0".repeat(48));
    let (s, _, b) = messages(&gw, &[("x-api-key", &bad)], body(false, 8)).await;
    assert_anthropic_error(s, &b, 401, "authentication_error");
    let (s, _, b) = messages(&gw, &[("authorization", &bearer(&bad))], body(false, 8)).await;
    assert_anthropic_error(s, &b, 401, "authentication_error");
    let (s, _, b) = messages(&gw, &[], body(false, 8)).await;
    assert_anthropic_error(s, &b, 401, "authentication_error");
    // 402: no credit.
    let (broke, _) = gw.create_key(json!({"name": "broke", "limit": "0"})).await;
    let (s, _, b) = messages(&gw, &[("x-api-key", &broke)], body(false, 8)).await;
    assert_anthropic_error(s, &b, 402, "billing_error");
    // 403: a model the key may not use.
    let (narrow, _) = gw
        .create_key(json!({"name": "n", "models": ["demo-*"]}))
        .await;
    let (s, _, b) = messages(&gw, &[("x-api-key", &narrow)], body(false, 8)).await;
    assert_anthropic_error(s, &b, 403, "permission_error");
    // 404: an unknown model.
    let mut unknown = body(false, 8);
    unknown["model"] = json!("claude-unknown-9");
    let (s, _, b) = messages(&gw, &k, unknown).await;
    assert_anthropic_error(s, &b, 404, "not_found_error");
    // 413: a body over the limit.
    let mut big = body(false, 8);
    big["messages"][0]["content"] = json!("x".repeat(8192));
    let (s, _, b) = messages(&gw, &k, big).await;
    assert_anthropic_error(s, &b, 413, "request_too_large");
    // 400: max_tokens missing, messages not an array, not JSON.
    let mut no_max = body(false, 8);
    no_max.as_object_mut().unwrap().remove("max_tokens");
    let (s, _, b) = messages(&gw, &k, no_max).await;
    assert_anthropic_error(s, &b, 400, "invalid_request_error");
    assert!(
        json_of(&b)["error"]["message"]
            .as_str()
            .unwrap()
            .contains("max_tokens")
    );
    let mut not_list = body(false, 8);
    not_list["messages"] = json!({"role": "user"});
    let (s, _, b) = messages(&gw, &k, not_list).await;
    assert_anthropic_error(s, &b, 400, "invalid_request_error");
    let (s, _, b) = send_raw(raw_request(
        "POST",
        &gw.url("/v1/messages"),
        &k,
        Bytes::from_static(b"{not json"),
    ))
    .await;
    assert_anthropic_error(s, &b, 400, "invalid_request_error");
    // 429 with retry-after: rpm 1.
    let (slow, _) = gw.create_key(json!({"name": "slow", "rpm": 1})).await;
    let (s, _, _) = messages(&gw, &[("x-api-key", &slow)], body(false, 8)).await;
    assert_eq!(s, 200);
    let (s, h, b) = messages(&gw, &[("x-api-key", &slow)], body(false, 8)).await;
    assert_anthropic_error(s, &b, 429, "rate_limit_error");
    assert!(h.contains_key("retry-after"));
    // 504: the upstream did not answer within first_byte_timeout.
    let (s, _, b) = messages(
        &gw,
        &[
            ("x-api-key", &key),
            ("x-mock-fault", "slow-first-byte:3000"),
        ],
        body(false, 8),
    )
    .await;
    assert_anthropic_error(s, &b, 504, "timeout_error");
    // 529 from the upstream is passed through as it came.
    let (s, _, b) = messages(
        &gw,
        &[("x-api-key", &key), ("x-mock-fault", "status:529")],
        body(false, 8),
    )
    .await;
    assert_anthropic_error_passed(s, &b, 529, "overloaded_error");
    // OpenAI routes keep OpenAI's shape.
    let (s, _, v) = send(
        "POST",
        &gw.url("/v1/chat/completions"),
        &[("authorization", &bearer(&bad))],
        Some(chat("demo-chat", false)),
    )
    .await;
    assert_error(s, &v, 401, "invalid_api_key");
    // 502: an upstream that cannot be reached.
    let closed = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap()
    };
    let extra = claude_upstream(&format!("http://{closed}/v1"));
    let down = TestGateway::start_mode(mode, &extra, |_| {});
    let key2 = down.open_key().await;
    let (s, _, b) = messages(&down, &[("x-api-key", &key2)], body(false, 8)).await;
    assert_anthropic_error(s, &b, 502, "api_error");
}

/// The upstream's own Anthropic error, unchanged (no gateway request id).
fn assert_anthropic_error_passed(status: u16, b: &Bytes, want_status: u16, want_type: &str) {
    let v = json_of(b);
    assert_eq!(status, want_status, "{v}");
    assert_eq!(v["type"], "error", "{v}");
    assert_eq!(v["error"]["type"], want_type, "{v}");
}

/// An upstream that answers every request with `status` and `body`.
async fn answering(
    status: u16,
    body: &'static str,
) -> (SocketAddr, tokio::sync::oneshot::Sender<()>) {
    use hyper::service::service_fn;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (tx, mut rx) = tokio::sync::oneshot::channel::<()>();
    tokio::spawn(async move {
        loop {
            let (stream, _) = tokio::select! {
                a = listener.accept() => match a { Ok(a) => a, Err(_) => return },
                _ = &mut rx => return,
            };
            tokio::spawn(async move {
                let svc = service_fn(
                    move |_req: http::Request<hyper::body::Incoming>| async move {
                        Ok::<_, std::convert::Infallible>(
                            hyper::Response::builder()
                                .status(status)
                                .header("content-type", "application/json")
                                .header("retry-after", "7")
                                .body(http_body_util::Full::new(Bytes::from_static(
                                    body.as_bytes(),
                                )))
                                .unwrap(),
                        )
                    },
                );
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(hyper_util::rt::TokioIo::new(stream), svc)
                    .await;
            });
        }
    });
    (addr, tx)
}

async fn upstream_errors_reach_the_client_in_anthropics_shape(mode: RuntimeMode) {
    // An OpenAI-shaped 429 to /v1/messages: rewritten, status and
    // retry-after kept, nothing charged, the slot freed.
    let (addr, _stop) = answering(
        429,
        r#"{"error":{"message":"Rate limit reached for requests","type":"requests","code":"rate_limit_exceeded"}}"#,
    )
    .await;
    let extra = claude_upstream(&format!("http://{addr}/v1"));
    let gw = TestGateway::start_mode(mode, &extra, |_| {});
    let (key, hash) = gw.create_key(json!({"name": "e", "concurrency": 1})).await;
    for _ in 0..2 {
        let (s, h, b) = messages(&gw, &[("x-api-key", &key)], body(true, 8)).await;
        assert_anthropic_error(s, &b, 429, "rate_limit_error");
        assert_eq!(
            json_of(&b)["error"]["message"],
            "Rate limit reached for requests"
        );
        assert_eq!(h["retry-after"], "7");
    }
    let (spent, recs) = settled(&gw, &hash).await;
    assert_eq!(spent, Pico::ZERO);
    assert_eq!(recs.len(), 2);
    assert!(recs.iter().all(|r| r.status == 429 && r.cost == Pico::ZERO));
    // A 401 about the gateway's own key: its text is not passed on.
    let (addr, _stop2) = answering(
        401,
        r#"{"error":{"message":"Incorrect API key provided: sk-upst*****tests"}}"#,
    )
    .await;
    let extra = claude_upstream(&format!("http://{addr}/v1"));
    let gw = TestGateway::start_mode(mode, &extra, |_| {});
    let key = gw.open_key().await;
    let (s, _, b) = messages(&gw, &[("x-api-key", &key)], body(false, 8)).await;
    assert_anthropic_error(s, &b, 401, "authentication_error");
    assert!(!String::from_utf8_lossy(&b).contains("sk-upst"));
    // Not JSON at all (a proxy's HTML page).
    let (addr, _stop3) = answering(502, "<html>Bad Gateway</html>").await;
    let extra = claude_upstream(&format!("http://{addr}/v1"));
    let gw = TestGateway::start_mode(mode, &extra, |c| c.proxy.max_attempts = 1);
    let key = gw.open_key().await;
    let (s, _, b) = messages(&gw, &[("x-api-key", &key)], body(false, 8)).await;
    assert_anthropic_error(s, &b, 502, "api_error");
}

async fn the_upstream_gets_its_own_key_and_the_version(mode: RuntimeMode) {
    let gw = start(mode, |_| {});
    let key = gw.open_key().await;
    // By x-api-key, no version: the default is sent.
    let (s, _, _) = messages(&gw, &[("x-api-key", &key)], body(false, 8)).await;
    assert_eq!(s, 200);
    // By Bearer, with the client's version and beta.
    let (s, _, _) = messages(
        &gw,
        &[
            ("authorization", &bearer(&key)),
            ("anthropic-version", "2023-01-01"),
            ("anthropic-beta", "prompt-caching-2024-07-31"),
        ],
        body(true, 8),
    )
    .await;
    assert_eq!(s, 200);
    let seen = gw.mock.requests();
    assert_eq!(seen.len(), 2);
    for r in &seen {
        assert_eq!(r.route, "/v1/messages");
        assert_eq!(r.headers["x-api-key"], UPSTREAM_KEY);
        assert!(
            r.headers.get("authorization").is_none(),
            "no Bearer to Anthropic"
        );
        for (_, v) in &r.headers {
            assert!(
                !v.to_str().unwrap_or("").contains(&key),
                "the client's key leaked"
            );
        }
    }
    assert_eq!(seen[0].headers["anthropic-version"], "2023-06-01");
    assert_eq!(seen[1].headers["anthropic-version"], "2023-01-01");
    assert_eq!(
        seen[1].headers["anthropic-beta"],
        "prompt-caching-2024-07-31"
    );
    // GET /v1/models lists the Claude model with the others.
    let (s, _, v) = send("GET", &gw.url("/v1/models"), &[("x-api-key", &key)], None).await;
    assert_eq!(s, 200);
    let ids: Vec<&str> = v["data"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|m| m["id"].as_str())
        .collect();
    assert!(
        ids.contains(&MODEL) && ids.contains(&"demo-chat"),
        "{ids:?}"
    );
    // The Anthropic SDK (it sends anthropic-version) gets Anthropic's shape.
    let (s, _, v) = send(
        "GET",
        &gw.url("/v1/models"),
        &[("x-api-key", &key), ("anthropic-version", "2023-06-01")],
        None,
    )
    .await;
    assert_eq!(s, 200);
    assert_eq!(v["has_more"], false, "{v}");
    assert!(
        v["data"]
            .as_array()
            .unwrap()
            .iter()
            .any(|m| m["id"] == MODEL && m["type"] == "model"),
        "{v}"
    );
}

async fn count_tokens_is_free_and_not_counted(mode: RuntimeMode) {
    let gw = start(mode, |_| {});
    let (key, hash) = gw
        .create_key(json!({"name": "count", "max_requests": 1}))
        .await;
    let count =
        json!({"model": MODEL, "messages": [{"role": "user", "content": "How many tokens?"}]});
    for _ in 0..3 {
        let (s, _, b) = send_raw(request(
            "POST",
            &gw.url("/v1/messages/count_tokens"),
            &[("x-api-key", &key)],
            Some(count.clone()),
        ))
        .await;
        assert_eq!(s, 200, "{}", String::from_utf8_lossy(&b));
        assert!(json_of(&b)["input_tokens"].as_u64().is_some_and(|n| n > 0));
    }
    let (spent, recs) = settled(&gw, &hash).await;
    assert_eq!((spent, recs.len()), (Pico::ZERO, 0), "free, not counted");
    // The key's one request is still there.
    let (s, _, _) = messages(&gw, &[("x-api-key", &key)], body(false, 8)).await;
    assert_eq!(s, 200);
    let (s, _, b) = messages(&gw, &[("x-api-key", &key)], body(false, 8)).await;
    assert_anthropic_error(s, &b, 402, "billing_error");
    // Authenticated, and in Anthropic's shape.
    let (s, _, b) = send_raw(request(
        "POST",
        &gw.url("/v1/messages/count_tokens"),
        &[("x-api-key", "sk-tg-nope")],
        Some(count.clone()),
    ))
    .await;
    assert_anthropic_error(s, &b, 401, "authentication_error");
    let mut unknown = count.clone();
    unknown["model"] = json!("claude-unknown-9");
    let open = gw.open_key().await;
    let (s, _, b) = send_raw(request(
        "POST",
        &gw.url("/v1/messages/count_tokens"),
        &[("x-api-key", &open)],
        Some(unknown),
    ))
    .await;
    assert_anthropic_error(s, &b, 404, "not_found_error");
    assert_eq!(gw.mock.served().received_on("/v1/messages/count_tokens"), 3);
}

async fn concurrent_messages_never_overspend(mode: RuntimeMode) {
    let gw = Arc::new(start(mode, |_| {}));
    // One answer: ≈ 20 prompt tokens at 3 + 16 output at 15 ≈ 300 µUSD
    // (reserved: the prompt bound and 16 tokens); the limit pays ≈ 10.
    let limit = Pico::parse_usd("0.003").unwrap();
    let (key, hash) = gw
        .create_key(json!({"name": "budget", "limit": "0.003"}))
        .await;
    let mut tasks = Vec::new();
    for i in 0..120 {
        let gw = gw.clone();
        let key = key.clone();
        tasks.push(tokio::spawn(async move {
            let res = client()
                .request(request(
                    "POST",
                    &gw.url("/v1/messages"),
                    &[
                        ("x-api-key", &key),
                        ("x-mock-chunk-delay-ms", if i % 2 == 0 { "3" } else { "0" }),
                        ("x-mock-cache-read-tokens", "3"),
                    ],
                    Some(body(i % 3 != 0, 16)),
                ))
                .await
                .unwrap();
            let status = res.status().as_u16();
            let bytes = res.into_body().collect().await.unwrap().to_bytes();
            (status, bytes)
        }));
    }
    let live = gw
        .app()
        .gate
        .lookup(&hash_bytes(&hash), gw.clock.now_ms())
        .unwrap()
        .unwrap();
    let sampler = {
        let live = live.clone();
        tokio::spawn(async move {
            for _ in 0..200 {
                let n = live.numbers();
                assert!(
                    n.period_spent.0 + n.reserved.0 <= limit.0,
                    "committed above the limit"
                );
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
        })
    };
    let mut ok = 0;
    for t in tasks {
        let (status, bytes) = t.await.unwrap();
        match status {
            200 => ok += 1,
            402 => assert_anthropic_error(402, &bytes, 402, "billing_error"),
            other => panic!(
                "only 200 or 402, got {other}: {}",
                String::from_utf8_lossy(&bytes)
            ),
        }
    }
    sampler.await.unwrap();
    let (spent, recs) = settled(&gw, &hash).await;
    assert!(spent <= limit, "spent {spent} > limit {limit}");
    assert_eq!(recs.len(), ok);
    // However the 120 interleave (all at once on a loaded machine, or one
    // after another), at least what fits in the limit at once is admitted,
    // and never more than the limit pays at the cheapest answer.
    let widest = recs.iter().map(|r| r.reserved.0).max().unwrap_or(1);
    let cheapest = recs.iter().map(|r| r.cost.0).min().unwrap_or(1).max(1);
    assert!(
        ok as i64 >= (limit.0 / widest).max(1) && ok as i64 <= limit.0 / cheapest,
        "{ok} admitted; reservations up to {widest}, answers from {cheapest}"
    );
    assert!(recs.iter().all(|r| r.cost <= r.reserved && !r.estimated));
}

async fn thinking_budget_counts_within_max_tokens(mode: RuntimeMode) {
    let gw = start(mode, |_| {});
    let (key, hash) = gw.create_key(json!({"name": "think"})).await;
    let thinking = |max: u64, budget: u64| {
        let mut b = body(false, max);
        b["thinking"] = json!({"type": "enabled", "budget_tokens": budget});
        b
    };
    // The model's bound (1024) lowers max_tokens below the budget: refused
    // before anything goes upstream.
    let (s, _, b) = messages(&gw, &[("x-api-key", &key)], thinking(2000, 1500)).await;
    assert_anthropic_error(s, &b, 400, "invalid_request_error");
    assert!(String::from_utf8_lossy(&b).contains("budget_tokens"));
    assert_eq!(gw.mock.served().received_on("/v1/messages"), 0);
    // A budget that still fits: max_tokens lowered to the bound, thinking
    // and text within it, charged exactly.
    let (s, _, b) = messages(
        &gw,
        &[("x-api-key", &key), ("x-mock-reasoning-tokens", "5")],
        thinking(2000, 1000),
    )
    .await;
    assert_eq!(s, 200, "{}", String::from_utf8_lossy(&b));
    let sent: Value = serde_json::from_slice(&gw.mock.requests()[0].body).unwrap();
    assert_eq!(sent["max_tokens"], 1024);
    assert_eq!(sent["thinking"]["budget_tokens"], 1000);
    let v = json_of(&b);
    assert_eq!(v["content"][0]["type"], "thinking");
    let (spent, recs) = settled(&gw, &hash).await;
    assert_eq!(recs.len(), 1, "the refusal left no record");
    assert_eq!(spent, claude_price().cost(&served_usage(&gw)));
}
