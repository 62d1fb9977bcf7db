//! The gateway core over loopback: proxying, streaming, headers, failover,
//! timeouts, bad input. Every test runs in both runtime modes.

mod common;

use std::time::{Duration, Instant};

use bytes::Bytes;
use common::*;
use http_body_util::BodyExt;
use serde_json::json;
use tollgate::config::RuntimeMode;
use tollgate_mock::Fault;

both_modes!(
    chat_non_stream_and_headers,
    streamed_bytes_are_exactly_the_upstreams,
    first_chunk_arrives_before_the_upstream_finishes,
    json_bytes_are_exactly_the_upstreams,
    every_route_proxies,
    models_list_is_the_configured_union,
    bad_requests_get_openai_errors,
    failover_before_first_byte,
    passive_health_skips_a_failing_upstream,
    unreachable_and_hanging_upstreams,
    reset_mid_stream_reaches_the_client_as_an_error,
    client_disconnect_cancels_the_upstream,
    upstream_errors_pass_through,
    health_and_readiness,
);

async fn chat_non_stream_and_headers(mode: RuntimeMode) {
    let gw = TestGateway::start_mode(mode, "", |_| {});
    let key = gw.open_key().await;
    let (status, headers, v) = send(
        "POST",
        &gw.url("/v1/chat/completions"),
        &[
            ("authorization", &bearer(&key)),
            ("x-request-id", "my-req-42"),
            ("connection", "keep-alive, x-secret-hop"),
            ("x-secret-hop", "must-not-pass"),
            ("accept-encoding", "gzip"),
        ],
        Some(chat("demo-chat", false)),
    )
    .await;
    assert_eq!(status, 200, "{v}");
    assert_eq!(v["object"], "chat.completion");
    assert!(
        v["choices"][0]["message"]["content"]
            .as_str()
            .unwrap()
            .len()
            > 3
    );
    assert_eq!(headers["x-request-id"], "my-req-42");
    // The gateway's own time, the upstream's excluded, in milliseconds.
    let timing = headers["server-timing"].to_str().unwrap();
    let ms = timing
        .strip_prefix("tollgate;dur=")
        .unwrap_or_else(|| panic!("server-timing {timing}"));
    let (whole, frac) = ms.split_once('.').expect("a decimal");
    assert!(
        whole.bytes().all(|b| b.is_ascii_digit()) && frac.len() == 3,
        "{timing}"
    );
    let seen = gw.mock.requests();
    let last = seen.last().expect("the mock saw the request");
    // Plain-HTTP upstreams get the origin form and their own Host.
    let host = gw.mock.base_url();
    let host = host
        .strip_prefix("http://")
        .and_then(|h| h.split('/').next())
        .unwrap();
    assert_eq!(last.headers["host"], host);
    // The client's key never goes upstream; the upstream's own key does.
    assert_eq!(
        last.headers["authorization"],
        format!("Bearer {UPSTREAM_KEY}")
    );
    assert!(!format!("{:?}", last.headers).contains(&key));
    assert_eq!(last.headers["x-request-id"], "my-req-42");
    assert!(
        last.headers.get("x-secret-hop").is_none(),
        "hop-by-hop header named in Connection was forwarded"
    );
    assert!(last.headers.get("accept-encoding").is_none());
    // A generated request id when the client sends none.
    let (_, headers, _) = send(
        "POST",
        &gw.url("/v1/chat/completions"),
        &[("authorization", &bearer(&key))],
        Some(chat("demo-chat", false)),
    )
    .await;
    let id = headers["x-request-id"].to_str().unwrap().to_owned();
    assert!(id.starts_with("req_"));
    // Both answers are in the overhead histogram.
    let metrics = String::from_utf8(
        send_raw(request("GET", &gw.url("/metrics"), &[], None))
            .await
            .2
            .to_vec(),
    )
    .unwrap();
    let count = metrics
        .lines()
        .find_map(|l| l.strip_prefix("tollgate_overhead_seconds_count "))
        .expect("the overhead histogram");
    assert!(count.parse::<u64>().unwrap() >= 2, "{count}");
    assert_eq!(
        gw.mock.requests().last().unwrap().headers["x-request-id"],
        id.as_str()
    );
}

fn sse_frames() -> Vec<Bytes> {
    let mut frames = Vec::new();
    let head = r#"{"id":"chatcmpl-x","object":"chat.completion.chunk","created":1,"model":"demo-chat","choices":[{"index":0,"delta":{"content":"#;
    for (i, w) in ["Hello", " there", ",", " friend", "!"].iter().enumerate() {
        frames.push(Bytes::from(format!(
            "data: {head}\"{w}\"}},\"finish_reason\":null}}],\"usage\":null}}\n\n"
        )));
        if i == 2 {
            // A frame boundary inside an event, and a comment line.
            frames.push(Bytes::from_static(b": keep-alive\n\ndata: {\"id\":\"chatcmpl-x\",\"object\":\"chat.completion.chunk\",\"created\":1,"));
            frames.push(Bytes::from_static(b"\"model\":\"demo-chat\",\"choices\":[{\"index\":0,\"delta\":{},\"finish_reason\":null}],\"usage\":null}\n\n"));
        }
    }
    frames.push(Bytes::from_static(
        b"data: {\"id\":\"chatcmpl-x\",\"object\":\"chat.completion.chunk\",\"created\":1,\"model\":\"demo-chat\",\"choices\":[],\"usage\":{\"prompt_tokens\":9,\"completion_tokens\":5,\"total_tokens\":14}}\n\n",
    ));
    frames.push(Bytes::from_static(b"data: [DONE]\n\n"));
    frames
}

async fn streamed_bytes_are_exactly_the_upstreams(mode: RuntimeMode) {
    let frames = sse_frames();
    let up = ScriptedUpstream::start(
        "text/event-stream",
        frames.clone(),
        Duration::from_millis(1),
    )
    .await;
    let gw = TestGateway::start_mode(mode, "", |c| {
        c.upstreams[0].base_url = Some(tollgate::config::BaseUrl::parse(&up.base_url()).unwrap())
    });
    let key = gw.open_key().await;
    // The client asked for usage itself: it gets every byte unchanged.
    let mut body = chat("demo-chat", true);
    body["stream_options"] = json!({"include_usage": true});
    let (status, headers, got) = send_raw(request(
        "POST",
        &gw.url("/v1/chat/completions"),
        &[("authorization", &bearer(&key))],
        Some(body),
    ))
    .await;
    assert_eq!(status, 200);
    assert_eq!(headers["content-type"], "text/event-stream");
    assert_eq!(headers["x-upstream-header"], "kept");
    let sent: Vec<u8> = frames.iter().flat_map(|f| f.to_vec()).collect();
    assert_eq!(
        got,
        Bytes::from(sent.clone()),
        "the client must receive exactly the upstream's bytes"
    );
    // The client did not ask: usage is injected upstream and the usage-only
    // event is withheld; every other byte is identical.
    let (status, _, got) = send_raw(request(
        "POST",
        &gw.url("/v1/chat/completions"),
        &[("authorization", &bearer(&key))],
        Some(chat("demo-chat", true)),
    ))
    .await;
    assert_eq!(status, 200);
    let usage_event = frames[frames.len() - 2].to_vec();
    let expected: Vec<u8> = frames
        .iter()
        .filter(|f| f.to_vec() != usage_event)
        .flat_map(|f| f.to_vec())
        .collect();
    assert_eq!(got, Bytes::from(expected));
}

async fn first_chunk_arrives_before_the_upstream_finishes(mode: RuntimeMode) {
    let frames = sse_frames();
    let up = ScriptedUpstream::start("text/event-stream", frames, Duration::from_millis(150)).await;
    let gw = TestGateway::start_mode(mode, "", |c| {
        c.upstreams[0].base_url = Some(tollgate::config::BaseUrl::parse(&up.base_url()).unwrap())
    });
    let key = gw.open_key().await;
    let mut body = chat("demo-chat", true);
    body["stream_options"] = json!({"include_usage": true});
    let res = client()
        .request(request(
            "POST",
            &gw.url("/v1/chat/completions"),
            &[("authorization", &bearer(&key))],
            Some(body),
        ))
        .await
        .unwrap();
    let mut body = res.into_body();
    let first = body.frame().await.unwrap().unwrap().into_data().unwrap();
    assert!(first.starts_with(b"data: "));
    assert_eq!(
        up.finished.load(std::sync::atomic::Ordering::SeqCst),
        0,
        "the first chunk must not wait for the whole answer"
    );
    let mut frames_seen = 1;
    while let Some(f) = body.frame().await {
        f.unwrap();
        frames_seen += 1;
    }
    assert!(
        frames_seen >= 5,
        "frames are passed on one by one, got {frames_seen}"
    );
}

async fn json_bytes_are_exactly_the_upstreams(mode: RuntimeMode) {
    let answer = Bytes::from_static(
        b"{\"id\":\"chatcmpl-1\",\"object\":\"chat.completion\",\"created\":1,\"model\":\"demo-chat\",\n \"choices\":[{\"index\":0,\"message\":{\"role\":\"assistant\",\"content\":\"hi \\\"usage\\\"\"},\"finish_reason\":\"stop\"}],\n \"usage\":{\"prompt_tokens\":7,\"completion_tokens\":2,\"total_tokens\":9}}\n",
    );
    let frames = vec![
        answer.slice(..40),
        answer.slice(40..100),
        answer.slice(100..),
    ];
    let up = ScriptedUpstream::start("application/json", frames, Duration::from_millis(1)).await;
    let gw = TestGateway::start_mode(mode, "", |c| {
        c.upstreams[0].base_url = Some(tollgate::config::BaseUrl::parse(&up.base_url()).unwrap())
    });
    let key = gw.open_key().await;
    let (status, _, got) = send_raw(request(
        "POST",
        &gw.url("/v1/chat/completions"),
        &[("authorization", &bearer(&key))],
        Some(chat("demo-chat", false)),
    ))
    .await;
    assert_eq!(status, 200);
    assert_eq!(got, answer);
}

async fn every_route_proxies(mode: RuntimeMode) {
    let gw = TestGateway::start_mode(mode, "", |_| {});
    let key = gw.open_key().await;
    let auth = bearer(&key);
    let h = [("authorization", auth.as_str())];
    let (s, _, v) = send(
        "POST",
        &gw.url("/v1/completions"),
        &h,
        Some(json!({"model": "demo-chat", "prompt": "Once"})),
    )
    .await;
    assert_eq!(s, 200, "{v}");
    assert_eq!(v["object"], "text_completion");
    let (s, _, v) = send(
        "POST",
        &gw.url("/v1/embeddings"),
        &h,
        Some(json!({"model": "demo-embed", "input": ["a", "b"]})),
    )
    .await;
    assert_eq!(s, 200, "{v}");
    assert_eq!(v["data"].as_array().unwrap().len(), 2);
    let (s, _, v) = send(
        "POST",
        &gw.url("/v1/responses"),
        &h,
        Some(json!({"model": "demo-chat", "input": "Hi"})),
    )
    .await;
    assert_eq!(s, 200, "{v}");
    assert_eq!(v["object"], "response");
    let (s, _, body) = send_raw(request(
        "POST",
        &gw.url("/v1/responses"),
        &h,
        Some(json!({"model": "demo-chat", "input": "Hi", "stream": true})),
    ))
    .await;
    assert_eq!(s, 200);
    assert!(String::from_utf8_lossy(&body).contains("response.completed"));
    // Any other /v1 path is refused unless a [routes] rule allows it.
    let seen = gw.mock.request_count();
    let (s, _, v) = send("GET", &gw.url("/v1/files?purpose=x"), &h, None).await;
    assert_error(s, &v, 404, "route_not_allowed");
    assert_eq!(gw.mock.request_count(), seen, "nothing went upstream");
}

async fn models_list_is_the_configured_union(mode: RuntimeMode) {
    let gw = TestGateway::start_mode(mode, "", |_| {});
    let key = gw.open_key().await;
    let (s, _, v) = send(
        "GET",
        &gw.url("/v1/models"),
        &[("authorization", &bearer(&key))],
        None,
    )
    .await;
    assert_eq!(s, 200);
    assert_eq!(v["object"], "list");
    let ids: Vec<&str> = v["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, vec!["demo-chat", "demo-embed"]);
    // A key limited to some models sees only those.
    let (k2, _) = gw
        .create_key(json!({"name": "embed only", "models": ["demo-embed"]}))
        .await;
    let (_, _, v) = send(
        "GET",
        &gw.url("/v1/models"),
        &[("authorization", &bearer(&k2))],
        None,
    )
    .await;
    assert_eq!(v["data"].as_array().unwrap().len(), 1);
    assert_eq!(v["data"][0]["id"], "demo-embed");
}

async fn bad_requests_get_openai_errors(mode: RuntimeMode) {
    let gw = TestGateway::start_mode(mode, "", |c| c.server.max_body_bytes = 4096);
    let key = gw.open_key().await;
    let auth = bearer(&key);
    let h = [("authorization", auth.as_str())];
    let url = gw.url("/v1/chat/completions");
    let before = gw.mock.request_count();
    let (s, _, v) = send_raw(raw_request(
        "POST",
        &url,
        &h,
        Bytes::from_static(b"{not json"),
    ))
    .await;
    assert_error(s, &serde_json::from_slice(&v).unwrap(), 400, "invalid_json");
    let (s, _, v) = send("POST", &url, &h, Some(json!({"messages": []}))).await;
    assert_eq!(s, 400, "{v}");
    assert_eq!(v["error"]["param"], "model");
    let (s, _, v) = send("POST", &url, &h, Some(json!({"model": 42, "messages": []}))).await;
    assert_eq!(s, 400, "{v}");
    assert_eq!(v["error"]["param"], "model");
    let (s, _, v) = send(
        "POST",
        &url,
        &h,
        Some(json!({"model": "demo-chat", "stream": "yes", "messages": []})),
    )
    .await;
    assert_eq!(s, 400, "{v}");
    let (s, _, v) = send(
        "POST",
        &url,
        &h,
        Some(json!({"model": "gpt-unknown", "messages": []})),
    )
    .await;
    assert_error(s, &v, 404, "model_not_found");
    let big = json!({"model": "demo-chat", "messages": [{"role": "user", "content": "x".repeat(10_000)}]});
    let (s, _, v) = send("POST", &url, &h, Some(big)).await;
    assert_error(s, &v, 413, "body_too_large");
    let (s, _, v) = send("POST", &url, &[], Some(chat("demo-chat", false))).await;
    assert_error(s, &v, 401, "invalid_api_key");
    let (s, _, v) = send(
        "POST",
        &url,
        &[("authorization", "Bearer sk-tg-nope")],
        Some(chat("demo-chat", false)),
    )
    .await;
    assert_error(s, &v, 401, "invalid_api_key");
    let (s, _, v) = send("GET", &gw.url("/nowhere"), &[], None).await;
    assert_eq!(s, 404, "{v}");
    assert_eq!(gw.mock.request_count(), before, "nothing bad went upstream");
    // Still serving.
    let (s, _, _) = send("POST", &url, &h, Some(chat("demo-chat", false))).await;
    assert_eq!(s, 200);
}

async fn failover_before_first_byte(mode: RuntimeMode) {
    let bad = tollgate_mock::MockUpstream::start(tollgate_mock::MockOptions {
        fault: Some(Fault::Status(503)),
        ..Default::default()
    })
    .unwrap();
    let bad_url = bad.base_url();
    let gw = TestGateway::start_mode(mode, "", move |c| {
        let mut first = c.upstreams[0].clone();
        first.name = "bad".into();
        first.base_url = Some(tollgate::config::BaseUrl::parse(&bad_url).unwrap());
        first.weight = 1000;
        c.upstreams.insert(0, first);
        c.proxy.failure_threshold = 100;
    });
    let key = gw.open_key().await;
    for _ in 0..5 {
        let (s, _, v) = send(
            "POST",
            &gw.url("/v1/chat/completions"),
            &[("authorization", &bearer(&key))],
            Some(chat("demo-chat", false)),
        )
        .await;
        assert_eq!(s, 200, "failover must hide the failing upstream: {v}");
    }
    assert!(
        bad.request_count() >= 4,
        "the heavy upstream was tried first"
    );
    assert_eq!(gw.mock.request_count(), 5);
    let metrics = String::from_utf8(
        send_raw(request("GET", &gw.url("/metrics"), &[], None))
            .await
            .2
            .to_vec(),
    )
    .unwrap();
    assert!(
        metrics.contains("tollgate_upstream_failovers_total{upstream=\"bad\"}"),
        "{metrics}"
    );
}

async fn passive_health_skips_a_failing_upstream(mode: RuntimeMode) {
    let bad = tollgate_mock::MockUpstream::start(tollgate_mock::MockOptions {
        fault: Some(Fault::Status(500)),
        ..Default::default()
    })
    .unwrap();
    let bad_url = bad.base_url();
    let gw = TestGateway::start_mode(mode, "", move |c| {
        let mut first = c.upstreams[0].clone();
        first.name = "bad".into();
        first.base_url = Some(tollgate::config::BaseUrl::parse(&bad_url).unwrap());
        first.weight = 1000;
        c.upstreams.insert(0, first);
        c.proxy.failure_threshold = 2;
    });
    let key = gw.open_key().await;
    for _ in 0..10 {
        let (s, _, _) = send(
            "POST",
            &gw.url("/v1/chat/completions"),
            &[("authorization", &bearer(&key))],
            Some(chat("demo-chat", false)),
        )
        .await;
        assert_eq!(s, 200);
    }
    assert_eq!(
        bad.request_count(),
        2,
        "after 2 failures in a row the upstream is skipped for the cool-down"
    );
}

async fn unreachable_and_hanging_upstreams(mode: RuntimeMode) {
    // Nothing listens on this port.
    let dead = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let dead_url = format!("http://{}/v1", dead.local_addr().unwrap());
    drop(dead);
    let gw = TestGateway::start_mode(mode, "", move |c| {
        c.upstreams[0].base_url = Some(tollgate::config::BaseUrl::parse(&dead_url).unwrap())
    });
    let key = gw.open_key().await;
    let (s, _, v) = send(
        "POST",
        &gw.url("/v1/chat/completions"),
        &[("authorization", &bearer(&key))],
        Some(chat("demo-chat", false)),
    )
    .await;
    assert_error(s, &v, 502, "upstream_error");

    let gw = TestGateway::start_mode(mode, "", |c| {
        c.upstreams[0].first_byte_timeout = Some(tollgate::config::Dur(Duration::from_millis(300)))
    });
    let key = gw.open_key().await;
    let started = Instant::now();
    let (s, _, v) = send(
        "POST",
        &gw.url("/v1/chat/completions"),
        &[("authorization", &bearer(&key)), ("x-mock-fault", "stall")],
        Some(chat("demo-chat", false)),
    )
    .await;
    assert_error(s, &v, 504, "upstream_error");
    assert!(started.elapsed() < Duration::from_secs(3));
    let (s, _, v) = send(
        "POST",
        &gw.url("/v1/chat/completions"),
        &[
            ("authorization", &bearer(&key)),
            ("x-mock-fault", "garbage"),
        ],
        Some(chat("demo-chat", false)),
    )
    .await;
    // Garbage from the upstream is passed on as it came; the gateway stays up.
    assert_eq!(s, 200, "{v}");
    let (s, _, _) = send(
        "POST",
        &gw.url("/v1/chat/completions"),
        &[("authorization", &bearer(&key))],
        Some(chat("demo-chat", false)),
    )
    .await;
    assert_eq!(s, 200);
}

async fn reset_mid_stream_reaches_the_client_as_an_error(mode: RuntimeMode) {
    let gw = TestGateway::start_mode(mode, "", |_| {});
    let key = gw.open_key().await;
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
    assert_eq!(res.status(), 200);
    let got = res.into_body().collect().await;
    assert!(
        got.is_err(),
        "a cut upstream stream must not look complete to the client"
    );
}

async fn client_disconnect_cancels_the_upstream(mode: RuntimeMode) {
    let gw = TestGateway::start_mode(mode, "", |_| {});
    let key = gw.open_key().await;
    let res = client()
        .request(request(
            "POST",
            &gw.url("/v1/chat/completions"),
            &[
                ("authorization", &bearer(&key)),
                ("x-mock-chunks", "200"),
                ("x-mock-chunk-delay-ms", "20"),
            ],
            Some(chat("demo-chat", true)),
        ))
        .await
        .unwrap();
    let mut body = res.into_body();
    body.frame().await.unwrap().unwrap();
    assert_eq!(gw.mock.open_streams(), 1);
    drop(body);
    assert!(
        eventually(Duration::from_secs(2), || gw.mock.streams_cancelled() == 1
            && gw.mock.open_streams() == 0)
        .await,
        "the upstream stream must be dropped when the client goes away"
    );
}

async fn upstream_errors_pass_through(mode: RuntimeMode) {
    let gw = TestGateway::start_mode(mode, "", |_| {});
    let key = gw.open_key().await;
    let (s, _, v) = send(
        "POST",
        &gw.url("/v1/chat/completions"),
        &[
            ("authorization", &bearer(&key)),
            ("x-mock-fault", "status:400"),
        ],
        Some(chat("demo-chat", false)),
    )
    .await;
    assert_eq!(s, 400, "{v}");
    assert!(v["error"].is_object());
}

async fn health_and_readiness(mode: RuntimeMode) {
    let gw = TestGateway::start_mode(mode, "", |_| {});
    let (s, _, v) = send("GET", &gw.url("/healthz"), &[], None).await;
    assert_eq!((s, v["status"].as_str()), (200, Some("ok")));
    let (s, _, _) = send("GET", &gw.url("/readyz"), &[], None).await;
    assert_eq!(s, 200);
    let (s, _, _) = send("POST", &gw.url("/healthz"), &[], None).await;
    assert_eq!(s, 405);
}
