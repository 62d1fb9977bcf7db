//! The mock over the wire: each route's shape, the knobs, the faults, TLS,
//! h2, the counters.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::header::{CONTENT_TYPE, HeaderValue, RETRY_AFTER};
use http::{HeaderMap, Request, StatusCode};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioTimer};
use serde_json::{Value, json};
use tokio::net::TcpListener;
use tokio::sync::oneshot;

use crate::answer::{JSON_CONTENT_TYPE, SSE_CONTENT_TYPE, json_bytes};
use crate::*;

mod wire {
    use super::*;
    use http_body_util::Full;
    use hyper_util::client::legacy::Client;
    use hyper_util::client::legacy::connect::{Connect, HttpConnector};
    use std::time::Instant;

    type Reply = (StatusCode, HeaderMap, Bytes);

    fn client() -> Client<HttpConnector, Full<Bytes>> {
        Client::builder(TokioExecutor::new())
            .pool_timer(TokioTimer::new())
            .build_http()
    }

    fn post(url: String, body: &Value, headers: &[(&str, &str)]) -> Request<Full<Bytes>> {
        let mut request = Request::post(url)
            .header(CONTENT_TYPE, "application/json")
            .body(Full::new(json_bytes(body)))
            .expect("valid request");
        for (name, value) in headers {
            request.headers_mut().insert(
                http::HeaderName::from_bytes(name.as_bytes()).expect("valid name"),
                HeaderValue::from_str(value).expect("valid value"),
            );
        }
        request
    }

    async fn send<C>(client: &Client<C, Full<Bytes>>, request: Request<Full<Bytes>>) -> Reply
    where
        C: Connect + Clone + Send + Sync + 'static,
    {
        let response = client.request(request).await.expect("response");
        let (parts, body) = response.into_parts();
        let body = body.collect().await.expect("whole body").to_bytes();
        (parts.status, parts.headers, body)
    }

    fn json(body: &Bytes) -> Value {
        serde_json::from_slice(body).expect("JSON body")
    }

    /// The `data:` payloads of an SSE body, checking every event's framing.
    fn sse_data(body: &Bytes) -> Vec<String> {
        let text = std::str::from_utf8(body).expect("UTF-8");
        assert!(text.ends_with("\n\n"), "events end with a blank line");
        text.split_terminator("\n\n")
            .map(|event| {
                let data = event
                    .lines()
                    .find_map(|line| line.strip_prefix("data: "))
                    .expect("every event has data");
                data.to_owned()
            })
            .collect()
    }

    /// `(event name, data)` of a Responses API stream.
    fn sse_events(body: &Bytes) -> Vec<(String, Value)> {
        let text = std::str::from_utf8(body).expect("UTF-8");
        text.split_terminator("\n\n")
            .map(|event| {
                let mut lines = event.lines();
                let name = lines
                    .next()
                    .and_then(|line| line.strip_prefix("event: "))
                    .expect("event line first");
                let data = lines
                    .next()
                    .and_then(|line| line.strip_prefix("data: "))
                    .expect("data line second");
                (
                    name.to_owned(),
                    serde_json::from_str(data).expect("JSON data"),
                )
            })
            .collect()
    }

    fn chat_request(stream: bool, include_usage: bool) -> Value {
        let mut request = json!({
            "model": "demo-chat",
            "messages": [
                {"role": "system", "content": "Be brief."},
                {"role": "user", "content": [
                    {"type": "text", "text": "Hello there, "},
                    {"type": "image_url", "image_url": {"url": "https://example.com/x.png"}},
                    {"type": "text", "text": "gate!"},
                ]},
            ],
            "stream": stream,
        });
        if include_usage {
            request["stream_options"] = json!({"include_usage": true});
        }
        request
    }

    /// (ceil(9 / 4) + 4) + (ceil(18 / 4) + 4) for `chat_request`.
    const CHAT_PROMPT_TOKENS: u64 = 16;

    fn mock(opts: MockOptions) -> MockUpstream {
        MockUpstream::start(opts).expect("mock starts")
    }

    fn url(mock: &MockUpstream, path: &str) -> String {
        format!("{}{path}", mock.base_url())
    }

    /// Waits for a counter the server thread updates after the client moved on.
    async fn eventually(what: &str, check: impl Fn() -> bool) {
        let deadline = Instant::now() + Duration::from_secs(5);
        while !check() {
            assert!(Instant::now() < deadline, "timed out waiting for {what}");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    #[tokio::test]
    async fn chat_stream_with_usage_has_openai_shape() {
        let mock = mock(MockOptions {
            chunks: 5,
            ..MockOptions::default()
        });
        let (status, headers, body) = send(
            &client(),
            post(
                url(&mock, "/chat/completions"),
                &chat_request(true, true),
                &[],
            ),
        )
        .await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(headers[CONTENT_TYPE], SSE_CONTENT_TYPE);
        let data = sse_data(&body);
        // role chunk, 5 words, finish chunk, usage chunk, [DONE]
        assert_eq!(data.len(), 9, "{data:#?}");
        assert_eq!(data[8], "[DONE]");
        let chunks: Vec<Value> = data[..8]
            .iter()
            .map(|d| serde_json::from_str(d).expect("JSON chunk"))
            .collect();
        for chunk in &chunks {
            assert_eq!(chunk["object"], "chat.completion.chunk");
            assert_eq!(chunk["model"], "demo-chat");
            assert_eq!(chunk["id"], chunks[0]["id"]);
        }
        for chunk in &chunks[..7] {
            assert_eq!(
                chunk.get("usage"),
                Some(&Value::Null),
                "usage:null on every chunk"
            );
            assert_eq!(chunk["choices"].as_array().map(Vec::len), Some(1));
        }
        assert_eq!(chunks[0]["choices"][0]["delta"]["role"], "assistant");
        let content: String = chunks[1..6]
            .iter()
            .map(|c| {
                c["choices"][0]["delta"]["content"]
                    .as_str()
                    .expect("content")
            })
            .collect();
        assert_eq!(content, "Tollgate meters every token that");
        assert_eq!(chunks[6]["choices"][0]["finish_reason"], "stop");
        assert_eq!(chunks[7]["choices"], json!([]));
        let usage = &chunks[7]["usage"];
        assert_eq!(usage["prompt_tokens"], CHAT_PROMPT_TOKENS);
        assert_eq!(
            usage["completion_tokens"],
            content.split_whitespace().count()
        );
        assert_eq!(usage["total_tokens"], CHAT_PROMPT_TOKENS + 5);
        assert_eq!(usage["prompt_tokens_details"]["cached_tokens"], 0);
        assert_eq!(usage["completion_tokens_details"]["reasoning_tokens"], 0);
        eventually("stream counted", || mock.streams_completed() == 1).await;
        assert_eq!(mock.open_streams(), 0);
        assert_eq!(mock.streams_cancelled(), 0);
    }

    #[tokio::test]
    async fn chat_stream_without_usage_never_mentions_usage() {
        let mock = mock(MockOptions::default());
        for request in [chat_request(true, false), {
            let mut r = chat_request(true, false);
            r["stream_options"] = json!({"include_usage": false});
            r
        }] {
            let (_, _, body) = send(
                &client(),
                post(url(&mock, "/chat/completions"), &request, &[]),
            )
            .await;
            let data = sse_data(&body);
            assert_eq!(data.len(), 1 + 16 + 1 + 1);
            assert_eq!(data.last().map(String::as_str), Some("[DONE]"));
            assert!(!data.iter().any(|d| d.contains("usage")), "{data:#?}");
        }
    }

    #[tokio::test]
    async fn each_streamed_chunk_is_its_own_frame() {
        let mock = mock(MockOptions::default());
        let request = post(
            url(&mock, "/chat/completions"),
            &chat_request(true, true),
            &[(HEADER_CHUNKS, "3"), (HEADER_CHUNK_DELAY_MS, "10")],
        );
        let started = Instant::now();
        let mut body = client()
            .request(request)
            .await
            .expect("response")
            .into_body();
        let mut frames = Vec::new();
        while let Some(frame) = body.frame().await {
            let data = frame.expect("frame").into_data().expect("data frame");
            frames.push(String::from_utf8(data.to_vec()).expect("UTF-8"));
        }
        assert_eq!(frames.len(), 1 + 3 + 1 + 1 + 1);
        for frame in &frames {
            assert!(
                frame.starts_with("data: ") && frame.ends_with("\n\n"),
                "{frame:?}"
            );
            assert_eq!(frame.matches("\n\n").count(), 1, "{frame:?}");
        }
        assert!(
            started.elapsed() >= Duration::from_millis(60),
            "delay between chunks"
        );
    }

    #[tokio::test]
    async fn non_stream_chat_honours_max_tokens() {
        let mock = mock(MockOptions::default());
        let cases = [
            (json!({"max_tokens": 3}), 3, "length"),
            (
                json!({"max_completion_tokens": 2, "max_tokens": 10}),
                2,
                "length",
            ),
            (json!({"max_tokens": 16}), 16, "stop"),
            (json!({}), 16, "stop"),
        ];
        for (bounds, words, finish) in cases {
            let mut request = chat_request(false, false);
            for (name, value) in bounds.as_object().expect("object") {
                request[name] = value.clone();
            }
            let (status, headers, body) = send(
                &client(),
                post(url(&mock, "/chat/completions"), &request, &[]),
            )
            .await;
            assert_eq!(status, StatusCode::OK);
            assert_eq!(headers[CONTENT_TYPE], JSON_CONTENT_TYPE);
            assert_eq!(
                headers[http::header::CONTENT_LENGTH],
                body.len().to_string().as_str()
            );
            let answer = json(&body);
            assert_eq!(answer["object"], "chat.completion");
            let content = answer["choices"][0]["message"]["content"]
                .as_str()
                .expect("content");
            assert_eq!(content.split_whitespace().count(), words, "{bounds}");
            assert_eq!(answer["choices"][0]["finish_reason"], finish);
            assert_eq!(answer["usage"]["completion_tokens"], words);
            assert_eq!(answer["usage"]["prompt_tokens"], CHAT_PROMPT_TOKENS);
            assert_eq!(
                answer["usage"]["total_tokens"],
                CHAT_PROMPT_TOKENS + words as u64
            );
        }
        let mut zero = chat_request(false, false);
        zero["max_tokens"] = json!(0);
        let (status, _, body) =
            send(&client(), post(url(&mock, "/chat/completions"), &zero, &[])).await;
        assert_eq!(status, StatusCode::BAD_REQUEST);
        assert_eq!(json(&body)["error"]["param"], "max_tokens");
    }

    #[tokio::test]
    async fn reasoning_is_spent_first_and_cached_is_capped_by_the_prompt() {
        let mock = mock(MockOptions::default());
        let mut request = chat_request(false, false);
        request["max_completion_tokens"] = json!(6);
        let headers = [
            (HEADER_CHUNKS, "5"),
            (HEADER_REASONING_TOKENS, "4"),
            (HEADER_CACHED_TOKENS, "1000"),
        ];
        let (_, _, body) = send(
            &client(),
            post(url(&mock, "/chat/completions"), &request, &headers),
        )
        .await;
        let answer = json(&body);
        let usage = &answer["usage"];
        assert_eq!(usage["completion_tokens"], 6);
        assert_eq!(usage["completion_tokens_details"]["reasoning_tokens"], 4);
        assert_eq!(
            usage["prompt_tokens_details"]["cached_tokens"],
            CHAT_PROMPT_TOKENS
        );
        assert_eq!(answer["choices"][0]["finish_reason"], "length");
        let content = answer["choices"][0]["message"]["content"]
            .as_str()
            .expect("content");
        assert_eq!(content.split_whitespace().count(), 2);
    }

    #[tokio::test]
    async fn legacy_completions_stream_and_json() {
        let mock = mock(MockOptions::default());
        let request = json!({
            "model": "demo-chat",
            "prompt": "Say hello",
            "max_tokens": 4,
            "stream": true,
            "stream_options": {"include_usage": true},
        });
        let (_, headers, body) =
            send(&client(), post(url(&mock, "/completions"), &request, &[])).await;
        assert_eq!(headers[CONTENT_TYPE], SSE_CONTENT_TYPE);
        let data = sse_data(&body);
        // 4 words, finish chunk, usage chunk, [DONE]
        assert_eq!(data.len(), 7, "{data:#?}");
        let chunks: Vec<Value> = data[..6]
            .iter()
            .map(|d| serde_json::from_str(d).expect("JSON"))
            .collect();
        let text: String = chunks[..4]
            .iter()
            .map(|c| {
                assert_eq!(c["object"], "text_completion");
                assert_eq!(c["usage"], Value::Null);
                c["choices"][0]["text"].as_str().expect("text")
            })
            .collect();
        assert_eq!(text.split_whitespace().count(), 4);
        assert_eq!(chunks[4]["choices"][0]["finish_reason"], "length");
        assert_eq!(chunks[5]["choices"], json!([]));
        assert_eq!(
            chunks[5]["usage"],
            json!({"prompt_tokens": 3, "completion_tokens": 4, "total_tokens": 7})
        );

        let request = json!({"model": "demo-chat", "prompt": ["Say", "hello"]});
        let (_, _, body) = send(&client(), post(url(&mock, "/completions"), &request, &[])).await;
        let answer = json(&body);
        assert_eq!(answer["object"], "text_completion");
        assert_eq!(
            answer["choices"][0]["text"]
                .as_str()
                .map(|t| t.split_whitespace().count()),
            Some(16)
        );
        assert_eq!(answer["usage"]["prompt_tokens"], 1 + 2);
    }

    #[tokio::test]
    async fn embeddings_are_unit_vectors_with_usage() {
        let mock = mock(MockOptions::default());
        let request =
            json!({"model": "demo-embed", "input": ["first text", "second", "first text"]});
        let (status, _, body) =
            send(&client(), post(url(&mock, "/embeddings"), &request, &[])).await;
        assert_eq!(status, StatusCode::OK);
        let answer = json(&body);
        assert_eq!(answer["object"], "list");
        let data = answer["data"].as_array().expect("data");
        assert_eq!(data.len(), 3);
        for (index, item) in data.iter().enumerate() {
            assert_eq!(item["object"], "embedding");
            assert_eq!(item["index"], index);
            let vector: Vec<f64> = item["embedding"]
                .as_array()
                .expect("vector")
                .iter()
                .map(|x| x.as_f64().expect("float"))
                .collect();
            assert_eq!(vector.len(), 8);
            let norm: f64 = vector.iter().map(|x| x * x).sum::<f64>().sqrt();
            assert!((norm - 1.0).abs() < 1e-3, "{norm}");
        }
        assert_eq!(data[0]["embedding"], data[2]["embedding"]);
        assert_ne!(data[0]["embedding"], data[1]["embedding"]);
        assert_eq!(
            answer["usage"],
            json!({"prompt_tokens": 3 + 2 + 3, "total_tokens": 8})
        );
    }

    #[tokio::test]
    async fn responses_json_and_event_stream() {
        let mock = mock(MockOptions {
            chunks: 4,
            ..MockOptions::default()
        });
        let request =
            json!({"model": "demo-chat", "input": "Hello there", "instructions": "Be kind."});
        let prompt = (3 + 4) + (2 + 4);
        let (_, _, body) = send(
            &client(),
            post(
                url(&mock, "/responses"),
                &request,
                &[(HEADER_REASONING_TOKENS, "2"), (HEADER_CACHED_TOKENS, "5")],
            ),
        )
        .await;
        let answer = json(&body);
        assert_eq!(answer["object"], "response");
        assert_eq!(answer["status"], "completed");
        assert_eq!(answer["output"][0]["type"], "reasoning");
        let text = answer["output"][1]["content"][0]["text"]
            .as_str()
            .expect("text");
        assert_eq!(text.split_whitespace().count(), 4);
        assert_eq!(
            answer["usage"],
            json!({
                "input_tokens": prompt,
                "input_tokens_details": {"cached_tokens": 5},
                "output_tokens": 6,
                "output_tokens_details": {"reasoning_tokens": 2},
                "total_tokens": prompt + 6,
            })
        );

        let mut streamed = request.clone();
        streamed["stream"] = json!(true);
        let (_, headers, body) =
            send(&client(), post(url(&mock, "/responses"), &streamed, &[])).await;
        assert_eq!(headers[CONTENT_TYPE], SSE_CONTENT_TYPE);
        let events = sse_events(&body);
        let names: Vec<&str> = events.iter().map(|(name, _)| name.as_str()).collect();
        assert_eq!(
            names,
            [
                "response.created",
                "response.in_progress",
                "response.output_item.added",
                "response.content_part.added",
                "response.output_text.delta",
                "response.output_text.delta",
                "response.output_text.delta",
                "response.output_text.delta",
                "response.output_text.done",
                "response.content_part.done",
                "response.output_item.done",
                "response.completed",
            ]
        );
        for (sequence, (name, data)) in events.iter().enumerate() {
            assert_eq!(data["type"], name.as_str());
            assert_eq!(data["sequence_number"], sequence);
        }
        let raw = std::str::from_utf8(&body).expect("UTF-8");
        assert!(
            raw.contains("data: {\"type\":\"response.output_text.delta\""),
            "type comes first"
        );
        let deltas: String = events
            .iter()
            .filter(|(name, _)| name == "response.output_text.delta")
            .map(|(_, data)| data["delta"].as_str().expect("delta"))
            .collect();
        assert_eq!(deltas.split_whitespace().count(), 4);
        let completed = &events.last().expect("events").1["response"];
        assert_eq!(completed["status"], "completed");
        assert_eq!(completed["usage"]["output_tokens"], 4);
        assert_eq!(completed["usage"]["input_tokens"], prompt);

        // max_output_tokens cuts the answer: OpenAI ends with response.incomplete.
        streamed["max_output_tokens"] = json!(2);
        let (_, _, body) = send(&client(), post(url(&mock, "/responses"), &streamed, &[])).await;
        let events = sse_events(&body);
        let (name, last) = events.last().expect("events");
        assert_eq!(name, "response.incomplete");
        assert_eq!(last["response"]["status"], "incomplete");
        assert_eq!(
            last["response"]["incomplete_details"]["reason"],
            "max_output_tokens"
        );
        assert_eq!(last["response"]["usage"]["output_tokens"], 2);
    }

    #[tokio::test]
    async fn models_and_openai_errors() {
        let mock = mock(MockOptions::default());
        let client = client();
        let get = |path: &str| {
            Request::get(url(&mock, path))
                .body(Full::default())
                .expect("request")
        };
        let (status, _, body) = send(&client, get("/models")).await;
        assert_eq!(status, StatusCode::OK);
        let list = json(&body);
        assert_eq!(list["object"], "list");
        let ids: Vec<&str> = list["data"]
            .as_array()
            .expect("data")
            .iter()
            .map(|m| m["id"].as_str().expect("id"))
            .collect();
        assert_eq!(
            ids,
            [
                "demo-chat",
                "demo-chat-mini",
                "demo-embed",
                "claude-sonnet-4-5",
                "claude-haiku-4-5"
            ]
        );
        assert_eq!(list["data"][0]["object"], "model");
        let (status, _, body) = send(&client, get("/models/demo-chat")).await;
        assert_eq!(
            (status, json(&body)["id"].clone()),
            (StatusCode::OK, json!("demo-chat"))
        );
        let (status, _, body) = send(&client, get("/models/nope")).await;
        assert_eq!(status, StatusCode::NOT_FOUND);
        assert_eq!(json(&body)["error"]["code"], "model_not_found");

        let (status, _, body) = send(&client, post(url(&mock, "/nope"), &json!({}), &[])).await;
        assert_eq!(status, StatusCode::NOT_FOUND);
        let error = &json(&body)["error"];
        assert_eq!(error["type"], "invalid_request_error");
        assert!(error.get("param").is_some() && error.get("code").is_some());

        let malformed = Request::post(url(&mock, "/chat/completions"))
            .body(Full::new(Bytes::from_static(b"{\"model\":")))
            .expect("request");
        let (status, headers, body) = send(&client, malformed).await;
        assert_eq!(status, StatusCode::BAD_REQUEST);
        assert_eq!(headers[CONTENT_TYPE], JSON_CONTENT_TYPE);
        assert_eq!(json(&body)["error"]["code"], "invalid_json");

        let (status, _, body) = send(
            &client,
            post(
                url(&mock, "/chat/completions"),
                &json!({"messages": []}),
                &[],
            ),
        )
        .await;
        assert_eq!(
            (status, json(&body)["error"]["param"].clone()),
            (StatusCode::BAD_REQUEST, json!("model"))
        );

        let mut unstreamed = chat_request(false, true);
        unstreamed["stream"] = json!(false);
        let (status, _, _) = send(
            &client,
            post(url(&mock, "/chat/completions"), &unstreamed, &[]),
        )
        .await;
        assert_eq!(
            status,
            StatusCode::BAD_REQUEST,
            "stream_options needs stream"
        );
        assert_eq!(mock.request_count(), 7);
    }

    #[tokio::test]
    async fn require_key_answers_401_without_the_right_bearer() {
        let mock = mock(MockOptions {
            require_key: Some("sk-upstream".into()),
            ..MockOptions::default()
        });
        let client = client();
        let request = chat_request(false, false);
        for (headers, expected) in [
            (vec![], StatusCode::UNAUTHORIZED),
            (
                vec![("authorization", "Bearer sk-client")],
                StatusCode::UNAUTHORIZED,
            ),
            (
                vec![("authorization", "Bearer sk-upstream")],
                StatusCode::OK,
            ),
        ] {
            let (status, _, body) = send(
                &client,
                post(url(&mock, "/chat/completions"), &request, &headers),
            )
            .await;
            assert_eq!(status, expected);
            if status == StatusCode::UNAUTHORIZED {
                assert_eq!(json(&body)["error"]["type"], "invalid_request_error");
            }
        }
    }

    #[tokio::test]
    async fn status_faults_from_options_set_fault_and_headers() {
        let mock = mock(MockOptions {
            fault: Some(Fault::Status(503)),
            ..MockOptions::default()
        });
        let client = client();
        let request = chat_request(false, false);
        let chat = || url(&mock, "/chat/completions");
        let (status, _, body) = send(&client, post(chat(), &request, &[])).await;
        assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(json(&body)["error"]["type"], "server_error");
        let (status, _, _) = send(&client, post(chat(), &request, &[(HEADER_FAULT, "none")])).await;
        assert_eq!(status, StatusCode::OK, "a header lifts the server's fault");

        mock.set_fault(Some(Fault::Status(429)));
        let (status, headers, body) = send(&client, post(chat(), &request, &[])).await;
        assert_eq!(status, StatusCode::TOO_MANY_REQUESTS);
        assert_eq!(headers[RETRY_AFTER], "1");
        assert_eq!(json(&body)["error"]["code"], "rate_limit_exceeded");

        mock.set_fault(None);
        let (status, _, _) = send(&client, post(chat(), &request, &[])).await;
        assert_eq!(status, StatusCode::OK);
        let (status, _, _) = send(
            &client,
            post(chat(), &request, &[(HEADER_FAULT, "status:500")]),
        )
        .await;
        assert_eq!(status, StatusCode::INTERNAL_SERVER_ERROR);
        let (status, _, body) =
            send(&client, post(chat(), &request, &[(HEADER_FAULT, "bogus")])).await;
        assert_eq!(status, StatusCode::BAD_REQUEST);
        assert!(
            json(&body)["error"]["message"]
                .as_str()
                .is_some_and(|m| m.contains("bogus"))
        );
        assert_eq!(mock.request_count(), 6);
    }

    /// Reads data frames until the body ends or fails; `Err` carries what came before.
    async fn read_frames(body: &mut Incoming) -> Result<Vec<Bytes>, Vec<Bytes>> {
        let mut frames = Vec::new();
        while let Some(frame) = body.frame().await {
            match frame {
                Ok(frame) => frames.extend(frame.into_data().ok()),
                Err(_) => return Err(frames),
            }
        }
        Ok(frames)
    }

    #[tokio::test]
    async fn reset_after_chunks_breaks_the_body_on_http1_and_h2() {
        let mock = mock(MockOptions::default());
        let h2: Client<HttpConnector, Full<Bytes>> = Client::builder(TokioExecutor::new())
            .http2_only(true)
            .build_http();
        for client in [client(), h2] {
            let request = post(
                url(&mock, "/chat/completions"),
                &chat_request(true, true),
                &[
                    (HEADER_FAULT, "reset-after:3"),
                    (HEADER_CHUNK_DELAY_MS, "1"),
                ],
            );
            let mut body = client
                .request(request)
                .await
                .expect("headers arrive")
                .into_body();
            let before = read_frames(&mut body)
                .await
                .expect_err("the body must fail, not end");
            let text: Vec<u8> = before.concat();
            assert_eq!(sse_data(&Bytes::from(text)).len(), 3);
        }
        // A non-streamed answer breaks in the middle of its JSON.
        let request = post(
            url(&mock, "/chat/completions"),
            &chat_request(false, false),
            &[(HEADER_FAULT, "reset-after:1")],
        );
        let mut body = client()
            .request(request)
            .await
            .expect("headers")
            .into_body();
        let before = read_frames(&mut body)
            .await
            .expect_err("the body must fail");
        assert!(serde_json::from_slice::<Value>(&before.concat()).is_err());
        eventually("streams closed", || mock.open_streams() == 0).await;
        assert_eq!((mock.streams_completed(), mock.streams_cancelled()), (0, 0));
    }

    #[tokio::test]
    async fn stall_never_answers_and_stall_after_hangs_mid_body() {
        let mock = mock(MockOptions::default());
        let stalled = post(
            url(&mock, "/chat/completions"),
            &chat_request(true, true),
            &[(HEADER_FAULT, "stall")],
        );
        let waited =
            tokio::time::timeout(Duration::from_millis(200), client().request(stalled)).await;
        assert!(waited.is_err(), "no headers may arrive");

        let request = post(
            url(&mock, "/chat/completions"),
            &chat_request(true, true),
            &[(HEADER_FAULT, "stall-after:2")],
        );
        let mut body = client()
            .request(request)
            .await
            .expect("headers arrive")
            .into_body();
        let mut got: Vec<u8> = Vec::new();
        while got.windows(2).filter(|w| w == b"\n\n").count() < 2 {
            let frame = body.frame().await.expect("a frame").expect("no error");
            got.extend_from_slice(&frame.into_data().unwrap_or_default());
        }
        assert_eq!(sse_data(&Bytes::from(got)).len(), 2);
        let next = tokio::time::timeout(Duration::from_millis(200), body.frame()).await;
        assert!(next.is_err(), "the body hangs after two chunks");
        assert_eq!(mock.open_streams(), 1);
        drop(body);
        eventually("hung stream cancelled", || mock.streams_cancelled() == 1).await;
        assert_eq!(mock.open_streams(), 0);
    }

    #[tokio::test]
    async fn slow_first_byte_delays_headers() {
        let mock = mock(MockOptions {
            fault: Some(Fault::SlowFirstByte(Duration::from_millis(150))),
            ..MockOptions::default()
        });
        let started = Instant::now();
        let (status, _, body) = send(
            &client(),
            post(
                url(&mock, "/chat/completions"),
                &chat_request(false, false),
                &[],
            ),
        )
        .await;
        assert!(started.elapsed() >= Duration::from_millis(150));
        assert_eq!(status, StatusCode::OK);
        assert_eq!(json(&body)["object"], "chat.completion");
    }

    #[tokio::test]
    async fn garbage_and_no_usage() {
        let mock = mock(MockOptions::default());
        let client = client();
        let garbage = [(HEADER_FAULT, "garbage")];
        let (status, headers, body) = send(
            &client,
            post(
                url(&mock, "/chat/completions"),
                &chat_request(true, true),
                &garbage,
            ),
        )
        .await;
        assert_eq!(
            (status, &headers[CONTENT_TYPE]),
            (StatusCode::OK, &HeaderValue::from_static(SSE_CONTENT_TYPE))
        );
        assert!(serde_json::from_slice::<Value>(&body).is_err());
        let (_, headers, body) = send(
            &client,
            post(
                url(&mock, "/chat/completions"),
                &chat_request(false, false),
                &garbage,
            ),
        )
        .await;
        assert_eq!(headers[CONTENT_TYPE], JSON_CONTENT_TYPE);
        assert!(serde_json::from_slice::<Value>(&body).is_err());

        let no_usage = [(HEADER_FAULT, "no-usage")];
        let (_, _, body) = send(
            &client,
            post(
                url(&mock, "/chat/completions"),
                &chat_request(true, true),
                &no_usage,
            ),
        )
        .await;
        let data = sse_data(&body);
        assert_eq!(data.len(), 1 + 16 + 1 + 1, "no usage chunk");
        assert!(!data.iter().any(|d| d.contains("\"usage\":{")));
        let (_, _, body) = send(
            &client,
            post(
                url(&mock, "/chat/completions"),
                &chat_request(false, false),
                &no_usage,
            ),
        )
        .await;
        assert!(json(&body).get("usage").is_none());
        let responses = json!({"model": "demo-chat", "input": "hi"});
        let (_, _, body) = send(
            &client,
            post(url(&mock, "/responses"), &responses, &no_usage),
        )
        .await;
        assert_eq!(json(&body)["usage"], Value::Null);
    }

    #[tokio::test]
    async fn dropping_the_body_mid_stream_counts_as_cancelled() {
        let mock = mock(MockOptions {
            chunks: 1000,
            chunk_delay: Duration::from_millis(5),
            ..MockOptions::default()
        });
        let request = post(
            url(&mock, "/chat/completions"),
            &chat_request(true, true),
            &[],
        );
        let mut body = client()
            .request(request)
            .await
            .expect("headers")
            .into_body();
        for _ in 0..3 {
            body.frame().await.expect("frame").expect("no error");
        }
        assert_eq!(mock.open_streams(), 1);
        drop(body);
        eventually("cancellation", || mock.streams_cancelled() == 1).await;
        assert_eq!((mock.open_streams(), mock.streams_completed()), (0, 0));
    }

    #[tokio::test]
    async fn h2_prior_knowledge_and_recorded_requests() {
        let mock = mock(MockOptions {
            record_requests: true,
            ..MockOptions::default()
        });
        let h2: Client<HttpConnector, Full<Bytes>> = Client::builder(TokioExecutor::new())
            .http2_only(true)
            .build_http();
        let request = post(
            url(&mock, "/chat/completions?x=1"),
            &chat_request(true, true),
            &[("x-trace", "abc")],
        );
        let response = h2.request(request).await.expect("response");
        assert_eq!(response.version(), http::Version::HTTP_2);
        let body = response
            .into_body()
            .collect()
            .await
            .expect("body")
            .to_bytes();
        assert_eq!(sse_data(&body).last().map(String::as_str), Some("[DONE]"));
        let seen = mock.requests();
        assert_eq!(seen.len(), 1);
        assert_eq!(
            (seen[0].method.as_str(), seen[0].path.as_str()),
            ("POST", "/v1/chat/completions")
        );
        assert_eq!(seen[0].headers["x-trace"], "abc");
        assert_eq!(json(&seen[0].body), chat_request(true, true));
    }

    #[tokio::test]
    async fn tls_with_a_test_ca_negotiates_h2_and_http1() {
        use rustls_pki_types::{PrivateKeyDer, PrivatePkcs8KeyDer};
        let ca_key = rcgen::KeyPair::generate().expect("key");
        let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).expect("params");
        ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        ca_params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "Tollgate test CA");
        let ca = ca_params.self_signed(&ca_key).expect("CA");
        let leaf_key = rcgen::KeyPair::generate().expect("key");
        let leaf =
            rcgen::CertificateParams::new(vec!["localhost".to_owned(), "127.0.0.1".to_owned()])
                .expect("params")
                .signed_by(&leaf_key, &ca, &ca_key)
                .expect("leaf");
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let server = rustls::ServerConfig::builder_with_provider(Arc::clone(&provider))
            .with_safe_default_protocol_versions()
            .expect("versions")
            .with_no_client_auth()
            .with_single_cert(
                vec![leaf.der().clone()],
                PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(leaf_key.serialize_der())),
            )
            .expect("server config");
        let mock = MockUpstream::start_tls(MockOptions::default(), Arc::new(server)).expect("mock");
        assert!(mock.base_url().starts_with("https://127.0.0.1:"));
        let mut roots = rustls::RootCertStore::empty();
        roots.add(ca.der().clone()).expect("root");
        let client_config = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .expect("versions")
            .with_root_certificates(roots)
            .with_no_client_auth();
        let both = hyper_rustls::HttpsConnectorBuilder::new()
            .with_tls_config(client_config.clone())
            .https_only()
            .enable_all_versions()
            .build();
        let http1 = hyper_rustls::HttpsConnectorBuilder::new()
            .with_tls_config(client_config)
            .https_only()
            .enable_http1()
            .build();
        for (connector, version) in [
            (both, http::Version::HTTP_2),
            (http1, http::Version::HTTP_11),
        ] {
            let client: Client<_, Full<Bytes>> =
                Client::builder(TokioExecutor::new()).build(connector);
            let request = post(
                url(&mock, "/chat/completions"),
                &chat_request(true, true),
                &[],
            );
            let response = client.request(request).await.expect("response over TLS");
            assert_eq!(response.version(), version);
            let body = response
                .into_body()
                .collect()
                .await
                .expect("body")
                .to_bytes();
            assert_eq!(sse_data(&body).len(), 1 + 16 + 1 + 1 + 1);
        }
        assert_eq!(mock.streams_completed(), 2);
    }

    #[tokio::test]
    async fn run_serves_until_shutdown() {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let (stop, stopped) = oneshot::channel::<()>();
        let server = tokio::spawn(run(listener, MockOptions::default(), async {
            let _ = stopped.await;
        }));
        let (status, _, _) = send(
            &client(),
            Request::get(format!("http://{addr}/v1/models"))
                .body(Full::default())
                .expect("request"),
        )
        .await;
        assert_eq!(status, StatusCode::OK);
        stop.send(()).expect("server alive");
        server.await.expect("task").expect("served");
        assert!(
            std::net::TcpStream::connect(addr).is_err(),
            "listener closed"
        );
    }

    #[test]
    fn mock_works_from_sync_code_and_stops_on_drop() {
        let mock = mock(MockOptions::default());
        let addr = mock.addr();
        std::net::TcpStream::connect(addr).expect("listening");
        drop(mock);
        assert!(
            std::net::TcpStream::connect(addr).is_err(),
            "closed on drop"
        );
    }

    fn get(url: String, headers: &[(&str, &str)]) -> Request<Full<Bytes>> {
        let mut request = Request::get(url).body(Full::default()).expect("request");
        for (name, value) in headers {
            request.headers_mut().insert(
                http::HeaderName::from_bytes(name.as_bytes()).expect("valid name"),
                HeaderValue::from_str(value).expect("valid value"),
            );
        }
        request
    }

    fn raw_url(mock: &MockUpstream, path: &str) -> String {
        format!("http://{}{path}", mock.addr())
    }

    #[tokio::test]
    async fn disguised_paths_reach_the_route_and_are_counted_there() {
        let mock = mock(MockOptions::default());
        let client = client();
        for path in [
            "/v1/chat/completions",
            "/v1/chat/%63ompletions",
            "/v1//chat/completions",
            "/v1/x/../chat/completions",
            "/v1/chat/completions/",
        ] {
            let (status, _, body) = send(
                &client,
                post(raw_url(&mock, path), &chat_request(false, false), &[]),
            )
            .await;
            assert_eq!(status, StatusCode::OK, "{path}");
            assert_eq!(json(&body)["object"], "chat.completion", "{path}");
        }
        let (status, _, _) = send(&client, post(url(&mock, "/nope"), &json!({}), &[])).await;
        assert_eq!(status, StatusCode::NOT_FOUND);
        let served = mock.served();
        assert_eq!(served.answered_on("/v1/chat/completions"), 5);
        assert_eq!(served.received_on("/v1/chat/completions"), 5);
        assert_eq!(
            (
                served.received_on("/v1/nope"),
                served.answered_on("/v1/nope")
            ),
            (1, 0)
        );
        assert_eq!(served.answered_total(), 5);
        let tokens = served.tokens_of("demo-chat");
        assert_eq!(tokens.input, 5 * CHAT_PROMPT_TOKENS);
        assert_eq!(tokens.output, 5 * 16);
        assert_eq!(served.tokens, tokens);
    }

    #[tokio::test]
    async fn a_stream_left_early_counts_the_tokens_it_produced() {
        let mock = mock(MockOptions {
            chunks: 1000,
            chunk_delay: Duration::from_millis(5),
            ..MockOptions::default()
        });
        let request = post(
            url(&mock, "/chat/completions"),
            &chat_request(true, true),
            &[(HEADER_REASONING_TOKENS, "7")],
        );
        let mut body = client()
            .request(request)
            .await
            .expect("headers")
            .into_body();
        for _ in 0..4 {
            body.frame().await.expect("frame").expect("no error");
        }
        drop(body);
        eventually("cancellation", || mock.streams_cancelled() == 1).await;
        let tokens = mock.served().tokens_of("demo-chat");
        assert_eq!(tokens.input, CHAT_PROMPT_TOKENS);
        assert_eq!(tokens.reasoning, 7);
        // The role chunk carries none; at least the three words read, and far
        // fewer than the thousand planned.
        let visible = tokens.output - 7;
        assert!((3..100).contains(&visible), "{tokens:?}");
        assert_eq!(mock.served().answered_on("/v1/chat/completions"), 1);
    }

    #[tokio::test]
    async fn every_answer_carries_the_providers_account_headers() {
        let mock = mock(MockOptions::default());
        let client = client();
        let (status, headers, _) = send(&client, get(url(&mock, "/models"), &[])).await;
        assert_eq!(status, StatusCode::OK);
        for name in &ACCOUNT_HEADERS[..10] {
            assert!(headers.contains_key(*name), "{name}");
        }
        assert_eq!(headers["openai-organization"], "org-tollgate-mock");
        let (status, headers, _) = send(&client, post(url(&mock, "/nope"), &json!({}), &[])).await;
        assert_eq!(status, StatusCode::NOT_FOUND);
        assert!(headers.contains_key("openai-project"), "errors too");
        let (_, headers, _) = send(
            &client,
            post(
                url(&mock, "/messages"),
                &messages_request(false),
                &[("anthropic-version", "2023-06-01")],
            ),
        )
        .await;
        for name in &ACCOUNT_HEADERS[10..] {
            assert!(headers.contains_key(*name), "{name}");
        }
        assert!(headers.contains_key("request-id"));
        assert!(!headers.contains_key("openai-organization"));
    }

    fn multipart_body(fields: &[(&str, Option<&str>, &[u8])]) -> Bytes {
        let mut body = Vec::new();
        for (name, filename, data) in fields {
            body.extend_from_slice(b"--BOUNDARY\r\n");
            match filename {
                Some(file) => body.extend_from_slice(
                    format!("Content-Disposition: form-data; name=\"{name}\"; filename=\"{file}\"\r\nContent-Type: application/octet-stream\r\n\r\n").as_bytes(),
                ),
                None => body.extend_from_slice(
                    format!("Content-Disposition: form-data; name=\"{name}\"\r\n\r\n").as_bytes(),
                ),
            }
            body.extend_from_slice(data);
            body.extend_from_slice(b"\r\n");
        }
        body.extend_from_slice(b"--BOUNDARY--\r\n");
        Bytes::from(body)
    }

    fn multipart_post(url: String, body: Bytes) -> Request<Full<Bytes>> {
        Request::post(url)
            .header(CONTENT_TYPE, "multipart/form-data; boundary=BOUNDARY")
            .body(Full::new(body))
            .expect("request")
    }

    #[tokio::test]
    async fn files_and_batches_are_shared_by_every_caller() {
        let mock = mock(MockOptions::default());
        let other = MockUpstream::start(MockOptions::default()).expect("mock");
        let client = client();
        let mut ids = Vec::new();
        for (n, upstream) in [&mock, &mock, &other].into_iter().enumerate() {
            let body = multipart_body(&[
                ("purpose", None, b"batch"),
                (
                    "file",
                    Some("in.jsonl"),
                    format!("{{\"n\":{n}}}").as_bytes(),
                ),
            ]);
            let (status, _, body) =
                send(&client, multipart_post(url(upstream, "/files"), body)).await;
            assert_eq!(status, StatusCode::OK);
            let file = json(&body);
            assert_eq!(
                (file["object"].clone(), file["purpose"].clone()),
                (json!("file"), json!("batch"))
            );
            assert_eq!(file["bytes"], 7);
            let id = file["id"].as_str().expect("id").to_owned();
            assert!(id.starts_with("file-"), "{id}");
            ids.push(id);
        }
        assert_ne!(ids[0], ids[1]);
        assert_ne!(ids[0], ids[2], "ids differ across servers");
        let (_, _, body) = send(&client, get(url(&mock, "/files"), &[])).await;
        let listed: Vec<Value> = json(&body)["data"].as_array().expect("data").clone();
        assert_eq!(listed.len(), 2, "every file created on this server");
        let (status, _, body) =
            send(&client, get(url(&mock, &format!("/files/{}", ids[1])), &[])).await;
        assert_eq!(
            (status, json(&body)["id"].clone()),
            (StatusCode::OK, json!(ids[1]))
        );
        let (_, headers, body) = send(
            &client,
            get(url(&mock, &format!("/files/{}/content", ids[0])), &[]),
        )
        .await;
        assert_eq!(headers[CONTENT_TYPE], "application/octet-stream");
        assert_eq!(&body[..], b"{\"n\":0}");

        let batch = json!({"input_file_id": ids[0], "endpoint": "/v1/chat/completions", "completion_window": "24h"});
        let (status, _, body) = send(&client, post(url(&mock, "/batches"), &batch, &[])).await;
        assert_eq!(status, StatusCode::OK);
        let batch_id = json(&body)["id"].as_str().expect("id").to_owned();
        assert!(batch_id.starts_with("batch_"));
        assert_eq!(json(&body)["status"], "validating");
        let (_, _, body) = send(&client, get(url(&mock, "/batches"), &[])).await;
        assert_eq!(json(&body)["data"][0]["id"], json!(batch_id));
        let (status, _, _) = send(
            &client,
            get(url(&mock, &format!("/batches/{batch_id}")), &[]),
        )
        .await;
        assert_eq!(status, StatusCode::OK);
        let missing = json!({"input_file_id": "file-nope", "endpoint": "/v1/chat/completions", "completion_window": "24h"});
        let (status, _, _) = send(&client, post(url(&mock, "/batches"), &missing, &[])).await;
        assert_eq!(status, StatusCode::NOT_FOUND);

        let delete = Request::delete(url(&mock, &format!("/files/{}", ids[0])))
            .body(Full::default())
            .expect("request");
        let (status, _, body) = send(&client, delete).await;
        assert_eq!(
            (status, json(&body)["deleted"].clone()),
            (StatusCode::OK, json!(true))
        );
        let (status, _, _) =
            send(&client, get(url(&mock, &format!("/files/{}", ids[0])), &[])).await;
        assert_eq!(status, StatusCode::NOT_FOUND);
        let served = mock.served();
        assert_eq!(served.answered_on("/v1/files"), 3);
        assert_eq!(served.answered_on("/v1/batches"), 2);
        assert_eq!(served.tokens, Tokens::default(), "no token work");
    }

    #[tokio::test]
    async fn stored_and_background_responses_are_fetched_with_their_usage() {
        let mock = mock(MockOptions {
            chunks: 4,
            ..MockOptions::default()
        });
        let client = client();
        let request = json!({"model": "demo-chat", "input": "Hello there", "background": true});
        let (status, _, body) = send(&client, post(url(&mock, "/responses"), &request, &[])).await;
        assert_eq!(status, StatusCode::OK);
        let queued = json(&body);
        assert_eq!(queued["status"], "queued");
        assert_eq!(queued["background"], true);
        assert_eq!(queued["usage"], Value::Null, "a queued stub has no usage");
        let id = queued["id"].as_str().expect("id").to_owned();
        assert!(id.starts_with("resp_"));
        let (status, _, body) =
            send(&client, get(url(&mock, &format!("/responses/{id}")), &[])).await;
        assert_eq!(status, StatusCode::OK);
        let fetched = json(&body);
        assert_eq!(fetched["status"], "completed");
        assert_eq!(fetched["usage"]["output_tokens"], 4);
        assert_eq!(fetched["usage"]["input_tokens"], 3 + 4);
        // The work was done once, when the background job ran.
        let tokens = mock.served().tokens_of("demo-chat");
        assert_eq!((tokens.input, tokens.output), (7, 4));

        let unstored = json!({"model": "demo-chat", "input": "Hi", "store": false});
        let (_, _, body) = send(&client, post(url(&mock, "/responses"), &unstored, &[])).await;
        let unstored_id = json(&body)["id"].as_str().expect("id").to_owned();
        let (status, _, _) = send(
            &client,
            get(url(&mock, &format!("/responses/{unstored_id}")), &[]),
        )
        .await;
        assert_eq!(status, StatusCode::NOT_FOUND);
        let bad = json!({"model": "demo-chat", "input": "Hi", "store": false, "background": true});
        let (status, _, _) = send(&client, post(url(&mock, "/responses"), &bad, &[])).await;
        assert_eq!(status, StatusCode::BAD_REQUEST);
    }

    #[tokio::test]
    async fn transcriptions_take_multipart_and_answer_text() {
        let mock = mock(MockOptions {
            chunks: 3,
            ..MockOptions::default()
        });
        let audio = [0u8; 400];
        let body = multipart_body(&[
            ("model", None, b"gpt-4o-transcribe"),
            ("file", Some("a.wav"), &audio),
        ]);
        let (status, _, body) = send(
            &client(),
            multipart_post(url(&mock, "/audio/transcriptions"), body),
        )
        .await;
        assert_eq!(status, StatusCode::OK);
        let answer = json(&body);
        assert_eq!(answer["text"], "Tollgate meters every");
        assert_eq!(answer["usage"]["input_tokens"], 100);
        assert_eq!(answer["usage"]["output_tokens"], 3);
        let tokens = mock.served().tokens_of("gpt-4o-transcribe");
        assert_eq!((tokens.input, tokens.output), (100, 3));
        let (status, _, _) = send(
            &client(),
            post(url(&mock, "/audio/transcriptions"), &json!({}), &[]),
        )
        .await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "JSON is not multipart");
    }

    fn messages_request(stream: bool) -> Value {
        json!({
            "model": "claude-sonnet-4-5",
            "max_tokens": 64,
            "system": "Be brief.",
            "messages": [
                {"role": "user", "content": "Hello there, gate!"},
                {"role": "assistant", "content": [{"type": "text", "text": "Hi."}]},
                {"role": "user", "content": [{"type": "text", "text": "More?"}]},
            ],
            "stream": stream,
        })
    }

    /// system (3 + 4) + messages (5 + 4) + (1 + 4) + (2 + 4).
    const MESSAGES_PROMPT_TOKENS: u64 = 27;

    const VERSION: (&str, &str) = ("anthropic-version", "2023-06-01");

    #[tokio::test]
    async fn messages_stream_has_anthropics_event_sequence_and_usage() {
        let mock = mock(MockOptions {
            chunks: 3,
            ..MockOptions::default()
        });
        let (status, headers, body) = send(
            &client(),
            post(
                url(&mock, "/messages"),
                &messages_request(true),
                &[
                    VERSION,
                    (HEADER_CACHE_READ_TOKENS, "10"),
                    (HEADER_CACHE_WRITE_TOKENS, "8"),
                    (HEADER_CACHE_WRITE_1H_TOKENS, "2"),
                ],
            ),
        )
        .await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(headers[CONTENT_TYPE], SSE_CONTENT_TYPE);
        let events = sse_events(&body);
        let names: Vec<&str> = events.iter().map(|(name, _)| name.as_str()).collect();
        assert_eq!(
            names,
            [
                "message_start",
                "content_block_start",
                "ping",
                "content_block_delta",
                "content_block_delta",
                "content_block_delta",
                "content_block_stop",
                "message_delta",
                "message_stop",
            ]
        );
        for (name, data) in &events {
            assert_eq!(data["type"], name.as_str());
        }
        let raw = std::str::from_utf8(&body).expect("UTF-8");
        assert!(raw.starts_with("event: message_start\ndata: {\"type\":\"message_start\""));
        let start = &events[0].1["message"];
        assert_eq!(start["role"], "assistant");
        assert_eq!(start["model"], "claude-sonnet-4-5");
        assert_eq!(start["content"], json!([]));
        let usage = &start["usage"];
        assert_eq!(usage["cache_read_input_tokens"], 10);
        assert_eq!(usage["cache_creation_input_tokens"], 8);
        assert_eq!(usage["input_tokens"], MESSAGES_PROMPT_TOKENS - 18);
        assert_eq!(usage["output_tokens"], 1);
        assert_eq!(
            events[1].1["content_block"],
            json!({"type": "text", "text": ""})
        );
        let text: String = events[3..6]
            .iter()
            .map(|(_, data)| {
                assert_eq!(data["delta"]["type"], "text_delta");
                assert_eq!(data["index"], 0);
                data["delta"]["text"].as_str().expect("text").to_owned()
            })
            .collect();
        assert_eq!(text, "Tollgate meters every");
        let delta = &events[7].1;
        assert_eq!(delta["delta"]["stop_reason"], "end_turn");
        assert_eq!(delta["usage"], json!({"output_tokens": 3}));
        eventually("stream counted", || mock.open_streams() == 0).await;
        let tokens = mock.served().tokens_of("claude-sonnet-4-5");
        assert_eq!(
            tokens,
            Tokens {
                input: MESSAGES_PROMPT_TOKENS - 18,
                cache_read: 10,
                cache_write: 8,
                cache_write_1h: 2,
                output: 3,
                ..Tokens::default()
            }
        );
    }

    #[tokio::test]
    async fn messages_json_honours_max_tokens_and_thinking() {
        let mock = mock(MockOptions::default());
        let mut request = messages_request(false);
        request["max_tokens"] = json!(5);
        request["thinking"] = json!({"type": "enabled", "budget_tokens": 1024});
        let (status, _, body) = send(
            &client(),
            post(
                url(&mock, "/messages"),
                &request,
                &[
                    VERSION,
                    (HEADER_REASONING_TOKENS, "2"),
                    (HEADER_CACHE_WRITE_TOKENS, "4"),
                    (HEADER_CACHE_WRITE_1H_TOKENS, "1"),
                ],
            ),
        )
        .await;
        assert_eq!(status, StatusCode::OK);
        let answer = json(&body);
        assert_eq!(answer["type"], "message");
        assert!(
            answer["id"]
                .as_str()
                .is_some_and(|id| id.starts_with("msg_"))
        );
        assert_eq!(answer["stop_reason"], "max_tokens");
        assert_eq!(answer["content"][0]["type"], "thinking");
        assert_eq!(answer["content"][1]["text"], "Tollgate meters every");
        assert_eq!(
            answer["usage"],
            json!({
                "input_tokens": MESSAGES_PROMPT_TOKENS - 4,
                "cache_creation_input_tokens": 4,
                "cache_read_input_tokens": 0,
                "cache_creation": {"ephemeral_5m_input_tokens": 3, "ephemeral_1h_input_tokens": 1},
                "output_tokens": 5,
                "service_tier": "standard",
            })
        );
        // Streamed, the thinking block comes first and counts within max_tokens.
        let mut streamed = request.clone();
        streamed["stream"] = json!(true);
        let (_, _, body) = send(
            &client(),
            post(
                url(&mock, "/messages"),
                &streamed,
                &[VERSION, (HEADER_REASONING_TOKENS, "2")],
            ),
        )
        .await;
        let events = sse_events(&body);
        assert_eq!(events[1].1["content_block"]["type"], "thinking");
        let kinds: Vec<&str> = events
            .iter()
            .filter(|(name, _)| name == "content_block_delta")
            .map(|(_, data)| data["delta"]["type"].as_str().expect("delta type"))
            .collect();
        assert_eq!(
            kinds,
            [
                "thinking_delta",
                "thinking_delta",
                "signature_delta",
                "text_delta",
                "text_delta",
                "text_delta"
            ]
        );
        let delta = events
            .iter()
            .find(|(name, _)| name == "message_delta")
            .expect("delta");
        assert_eq!(delta.1["usage"]["output_tokens"], 5);
        assert_eq!(delta.1["delta"]["stop_reason"], "max_tokens");
    }

    #[tokio::test]
    async fn messages_errors_keys_and_count_tokens_speak_anthropic() {
        let mock = mock(MockOptions {
            require_key: Some("sk-ant-upstream".into()),
            record_requests: true,
            ..MockOptions::default()
        });
        let client = client();
        let key = ("x-api-key", "sk-ant-upstream");
        let messages = || url(&mock, "/messages");
        let anthropic_error = |body: &Bytes, kind: &str| {
            let error = json(body);
            assert_eq!(error["type"], "error");
            assert_eq!(error["error"]["type"], kind);
            assert!(error["error"]["message"].is_string());
            assert!(error["request_id"].is_string());
        };
        for headers in [
            vec![VERSION],
            vec![VERSION, ("x-api-key", "sk-client")],
            vec![VERSION, ("authorization", "Bearer sk-ant-upstream")],
        ] {
            let (status, _, body) = send(
                &client,
                post(messages(), &messages_request(false), &headers),
            )
            .await;
            assert_eq!(status, StatusCode::UNAUTHORIZED);
            anthropic_error(&body, "authentication_error");
        }
        let (status, _, body) =
            send(&client, post(messages(), &messages_request(false), &[key])).await;
        assert_eq!(
            status,
            StatusCode::BAD_REQUEST,
            "anthropic-version is required"
        );
        anthropic_error(&body, "invalid_request_error");
        let mut no_max = messages_request(false);
        no_max.as_object_mut().expect("object").remove("max_tokens");
        let (status, _, body) = send(&client, post(messages(), &no_max, &[key, VERSION])).await;
        assert_eq!(status, StatusCode::BAD_REQUEST);
        anthropic_error(&body, "invalid_request_error");
        for (fault, status, kind) in [
            ("status:529", 529, "overloaded_error"),
            ("status:429", 429, "rate_limit_error"),
            ("status:500", 500, "api_error"),
        ] {
            let (got, headers, body) = send(
                &client,
                post(
                    messages(),
                    &messages_request(false),
                    &[key, VERSION, (HEADER_FAULT, fault)],
                ),
            )
            .await;
            assert_eq!(got.as_u16(), status);
            anthropic_error(&body, kind);
            if status == 429 {
                assert_eq!(headers[RETRY_AFTER], "1");
            }
        }
        let (status, _, body) = send(
            &client,
            post(
                url(&mock, "/messages/count_tokens"),
                &messages_request(false),
                &[
                    key,
                    VERSION,
                    ("anthropic-beta", "prompt-caching-2024-07-31"),
                ],
            ),
        )
        .await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(json(&body), json!({"input_tokens": MESSAGES_PROMPT_TOKENS}));
        let (status, _, _) = send(
            &client,
            post(messages(), &messages_request(false), &[key, VERSION]),
        )
        .await;
        assert_eq!(status, StatusCode::OK);
        let seen = mock.requests();
        let last = seen.last().expect("recorded");
        assert_eq!(last.route, "/v1/messages");
        assert_eq!(last.headers["anthropic-version"], "2023-06-01");
        let counted = &seen[seen.len() - 2];
        assert_eq!(
            counted.headers["anthropic-beta"],
            "prompt-caching-2024-07-31"
        );
        let served = mock.served();
        assert_eq!(served.answered_on("/v1/messages"), 1);
        assert_eq!(served.answered_on("/v1/messages/count_tokens"), 1);
        assert_eq!(
            served.tokens_of("claude-sonnet-4-5").input,
            MESSAGES_PROMPT_TOKENS
        );

        // Anthropic's model list, for the Anthropic SDK.
        let (_, _, body) = send(&client, get(url(&mock, "/models"), &[key, VERSION])).await;
        let list = json(&body);
        assert_eq!(list["has_more"], false);
        assert_eq!(
            list["data"][3],
            json!({"type": "model", "id": "claude-sonnet-4-5", "display_name": "claude-sonnet-4-5", "created_at": "2025-01-01T00:00:00Z"})
        );
    }

    #[tokio::test]
    async fn error_after_ends_a_stream_with_the_providers_error_event() {
        let mock = mock(MockOptions::default());
        let client = client();
        let (status, _, body) = send(
            &client,
            post(
                url(&mock, "/messages"),
                &messages_request(true),
                &[VERSION, (HEADER_FAULT, "error-after:4")],
            ),
        )
        .await;
        assert_eq!(status, StatusCode::OK);
        let events = sse_events(&body);
        assert_eq!(events.len(), 5);
        let (name, data) = &events[4];
        assert_eq!(name, "error");
        assert_eq!(
            data,
            &json!({"type": "error", "error": {"type": "overloaded_error", "message": "Overloaded"}})
        );
        let (_, _, body) = send(
            &client,
            post(
                url(&mock, "/chat/completions"),
                &chat_request(true, true),
                &[(HEADER_FAULT, "error-after:2")],
            ),
        )
        .await;
        let data = sse_data(&body);
        assert_eq!(data.len(), 3);
        assert_eq!(
            json(&Bytes::from(data[2].clone()))["error"]["type"],
            "server_error"
        );
        eventually("streams ended", || mock.open_streams() == 0).await;
        assert_eq!((mock.streams_completed(), mock.streams_cancelled()), (0, 0));
        // Two text deltas reached the wire before the error (start, block start, ping, delta).
        assert_eq!(mock.served().tokens_of("claude-sonnet-4-5").output, 1);
        assert_eq!(mock.served().tokens_of("demo-chat").output, 1);
    }
}
