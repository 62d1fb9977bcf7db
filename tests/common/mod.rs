//! Test harness: a real gateway on 127.0.0.1:0 with the mock upstream (or a
//! scripted one), and an HTTP client that talks to it over the wire.
#![allow(dead_code)]

pub mod hook;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, Request};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use serde_json::{Value, json};

use tollgate::clock::Clock;
use tollgate::config::{Config, RuntimeMode};
use tollgate::runtime::{Gateway, StartOptions};
use tollgate_mock::{MockOptions, MockUpstream};

pub const ADMIN: &str = "test-admin-token-0123456789abcdefghij";

/// The config every test starts from: two workers, the mock upstream at
/// `{MOCK}`, a temp storage dir at `{DATA}`.
pub const BASE: &str = r#"
[server]
listen = "127.0.0.1:0"
header_read_timeout = "2s"
shutdown_grace = "5s"
[runtime]
workers = 2
[storage]
path = "{DATA}"
flush_ms = 5
[proxy]
connect_timeout = "1s"
first_byte_timeout = "3s"
cooldown = "60s"
[[upstreams]]
name = "mock"
base_url = "{MOCK}"
api_key_env = "TOLLGATE_TEST_UPSTREAM_KEY"
models = ["demo-*"]
[models."demo-chat"]
input = "0.15"
output = "0.60"
max_output_tokens = 256
[models."demo-embed"]
input = "0.02"
output = "0"
[plans.trial]
limit = "0.0001"
expires_in = "7d"
max_requests = 50
one_per_owner = true
"#;

pub const UPSTREAM_KEY: &str = "sk-upstream-secret-for-tests";

pub struct TestGateway {
    pub gateway: Option<Gateway>,
    pub addr: SocketAddr,
    pub admin_token: String,
    pub clock: Clock,
    pub mock: MockUpstream,
    pub data: PathBuf,
}

static SEQ: AtomicU64 = AtomicU64::new(0);

/// A fresh, unique temp directory.
pub fn temp_dir(tag: &str) -> PathBuf {
    let n = SEQ.fetch_add(1, Ordering::Relaxed);
    let dir = std::env::temp_dir().join(format!("tollgate-test-{}-{tag}-{n}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("temp dir");
    dir
}

impl TestGateway {
    pub fn start() -> TestGateway {
        TestGateway::start_mode(RuntimeMode::PerCore, "", |_| {})
    }

    /// `extra` is TOML appended to [`BASE`] (new tables only); `edit` changes
    /// the parsed config.
    pub fn start_with(extra: &str) -> TestGateway {
        TestGateway::start_mode(RuntimeMode::PerCore, extra, |_| {})
    }

    pub fn start_mode(
        mode: RuntimeMode,
        extra: &str,
        edit: impl FnOnce(&mut Config),
    ) -> TestGateway {
        let mock = MockUpstream::start(MockOptions {
            record_requests: true,
            ..MockOptions::default()
        })
        .expect("mock upstream starts");
        TestGateway::start_on(mode, extra, edit, mock)
    }

    pub fn start_on(
        mode: RuntimeMode,
        extra: &str,
        edit: impl FnOnce(&mut Config),
        mock: MockUpstream,
    ) -> TestGateway {
        set_upstream_key_env();
        let data = temp_dir("gw");
        let text = BASE
            .replace("{DATA}", &data.display().to_string())
            .replace("{MOCK}", &mock.base_url())
            + extra;
        let mut config = Config::parse(&text, "test.toml").expect("test config parses");
        config.runtime.mode = mode;
        edit(&mut config);
        let clock = Clock::system();
        let gateway = Gateway::start(
            config,
            StartOptions {
                clock: clock.clone(),
                admin_token: Some(ADMIN.to_owned()),
            },
        )
        .expect("gateway starts");
        TestGateway {
            addr: gateway.addr(),
            gateway: Some(gateway),
            admin_token: ADMIN.to_owned(),
            clock,
            mock,
            data,
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{}", self.addr, path)
    }

    pub fn app(&self) -> &Arc<tollgate::app::App> {
        self.gateway.as_ref().expect("running").app()
    }

    /// Creates a key through the admin API; returns (key, hash).
    pub async fn create_key(&self, body: Value) -> (String, String) {
        let (status, _, v) = send(
            "POST",
            &self.url("/api/v1/keys"),
            &[("authorization", &format!("Bearer {ADMIN}"))],
            Some(body),
        )
        .await;
        assert_eq!(status, 201, "create key: {v}");
        (
            v["key"].as_str().expect("key").to_owned(),
            v["data"]["hash"].as_str().expect("hash").to_owned(),
        )
    }

    /// A key with no limits.
    pub async fn open_key(&self) -> String {
        self.create_key(json!({"name": "test"})).await.0
    }

    /// Admin GET, returning the JSON.
    pub async fn admin_get(&self, path: &str) -> Value {
        let (status, _, v) = send(
            "GET",
            &self.url(path),
            &[("authorization", &format!("Bearer {ADMIN}"))],
            None,
        )
        .await;
        assert_eq!(status, 200, "GET {path}: {v}");
        v
    }

    /// Waits until the store has applied everything queued.
    pub async fn flush(&self) {
        self.app().store.flush().await.expect("flush");
    }

    pub fn stop(&mut self) {
        if let Some(g) = self.gateway.take() {
            g.shutdown();
        }
    }
}

impl Drop for TestGateway {
    fn drop(&mut self) {
        if let Some(g) = self.gateway.take() {
            drop(g);
        }
        let _ = std::fs::remove_dir_all(&self.data);
    }
}

/// The upstream key every test gateway sends (read through `api_key_env`).
fn set_upstream_key_env() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        // SAFETY: `set_var` is unsafe because C code may read the environment
        // concurrently; here only Rust code reads it (std's env functions
        // share one lock), it is written once, always to the same value.
        #[allow(unsafe_code)]
        unsafe {
            std::env::set_var("TOLLGATE_TEST_UPSTREAM_KEY", UPSTREAM_KEY);
        }
    });
}

pub type TestClient = Client<HttpConnector, Full<Bytes>>;

pub fn client() -> TestClient {
    Client::builder(TokioExecutor::new()).build(HttpConnector::new())
}

pub fn request(
    method: &str,
    url: &str,
    headers: &[(&str, &str)],
    body: Option<Value>,
) -> Request<Full<Bytes>> {
    let bytes = body
        .map(|b| Bytes::from(serde_json::to_vec(&b).expect("json")))
        .unwrap_or_default();
    raw_request(method, url, headers, bytes)
}

pub fn raw_request(
    method: &str,
    url: &str,
    headers: &[(&str, &str)],
    body: Bytes,
) -> Request<Full<Bytes>> {
    let mut b = Request::builder().method(method).uri(url);
    if !body.is_empty() {
        b = b.header("content-type", "application/json");
    }
    for (k, v) in headers {
        b = b.header(*k, *v);
    }
    b.body(Full::new(body)).expect("request builds")
}

/// Sends a request and reads the whole answer as JSON (Null if not JSON).
pub async fn send(
    method: &str,
    url: &str,
    headers: &[(&str, &str)],
    body: Option<Value>,
) -> (u16, HeaderMap, Value) {
    let (s, h, b) = send_raw(request(method, url, headers, body)).await;
    (s, h, serde_json::from_slice(&b).unwrap_or(Value::Null))
}

pub async fn send_raw(req: Request<Full<Bytes>>) -> (u16, HeaderMap, Bytes) {
    let res = client().request(req).await.expect("request sent");
    let (parts, body) = res.into_parts();
    let bytes = body.collect().await.expect("body read").to_bytes();
    (parts.status.as_u16(), parts.headers, bytes)
}

/// A chat request body.
pub fn chat(model: &str, stream: bool) -> Value {
    json!({"model": model, "stream": stream, "messages": [{"role": "user", "content": "Say hello to the gateway."}]})
}

pub fn bearer(key: &str) -> String {
    format!("Bearer {key}")
}

/// Asserts an OpenAI-shaped error with this status and code.
pub fn assert_error(status: u16, v: &Value, want_status: u16, want_code: &str) {
    assert_eq!(status, want_status, "{v}");
    assert_eq!(v["error"]["code"], want_code, "{v}");
    assert!(
        v["error"]["message"]
            .as_str()
            .is_some_and(|m| !m.is_empty()),
        "{v}"
    );
    assert!(v["error"]["type"].is_string(), "{v}");
}

/// Polls `f` until it is true or `timeout` passes.
pub async fn eventually(timeout: Duration, mut f: impl FnMut() -> bool) -> bool {
    let start = std::time::Instant::now();
    while start.elapsed() < timeout {
        if f() {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    f()
}

/// An upstream that answers every request with exactly these frames (each
/// written separately, `gap` apart), for byte-for-byte tests.
pub struct ScriptedUpstream {
    pub addr: SocketAddr,
    /// Set when the last frame has been handed to the connection.
    pub finished: Arc<AtomicU64>,
    _shutdown: tokio::sync::oneshot::Sender<()>,
}

impl ScriptedUpstream {
    pub async fn start(
        content_type: &'static str,
        frames: Vec<Bytes>,
        gap: Duration,
    ) -> ScriptedUpstream {
        use hyper::service::service_fn;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        let finished = Arc::new(AtomicU64::new(0));
        let (tx, mut rx) = tokio::sync::oneshot::channel::<()>();
        let fin = finished.clone();
        tokio::spawn(async move {
            loop {
                let (stream, _) = tokio::select! {
                    a = listener.accept() => match a { Ok(a) => a, Err(_) => return },
                    _ = &mut rx => return,
                };
                let frames = frames.clone();
                let fin = fin.clone();
                tokio::spawn(async move {
                    let svc = service_fn(move |_req: Request<hyper::body::Incoming>| {
                        let frames = frames.clone();
                        let fin = fin.clone();
                        async move {
                            let (tx, rx) = tokio::sync::mpsc::channel::<
                                Result<http_body::Frame<Bytes>, std::convert::Infallible>,
                            >(1);
                            tokio::spawn(async move {
                                for f in frames {
                                    if tx.send(Ok(http_body::Frame::data(f))).await.is_err() {
                                        return;
                                    }
                                    tokio::time::sleep(gap).await;
                                }
                                fin.store(1, Ordering::SeqCst);
                            });
                            let body = http_body_util::StreamBody::new(tokio_stream_from(rx));
                            Ok::<_, std::convert::Infallible>(
                                hyper::Response::builder()
                                    .header("content-type", content_type)
                                    .header("connection", "keep-alive")
                                    .header("x-upstream-header", "kept")
                                    .body(body)
                                    .expect("response builds"),
                            )
                        }
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(hyper_util::rt::TokioIo::new(stream), svc)
                        .await;
                });
            }
        });
        ScriptedUpstream {
            addr,
            finished,
            _shutdown: tx,
        }
    }

    pub fn base_url(&self) -> String {
        format!("http://{}/v1", self.addr)
    }
}

/// A `Stream` over an mpsc receiver (no tokio-stream dependency).
fn tokio_stream_from<T>(
    mut rx: tokio::sync::mpsc::Receiver<T>,
) -> impl futures_util::Stream<Item = T> {
    futures_util::stream::poll_fn(move |cx| rx.poll_recv(cx))
}

/// Generates, for each named `async fn name(mode: RuntimeMode)`, a module
/// `name` with one test per runtime mode: every behaviour is checked with
/// per-core and shared runtimes alike. (Not every test file uses it.)
#[allow(unused_macros)]
macro_rules! both_modes {
    ($($name:ident),* $(,)?) => {$(
        mod $name {
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn per_core() {
                super::$name(tollgate::config::RuntimeMode::PerCore).await
            }
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn shared() {
                super::$name(tollgate::config::RuntimeMode::Shared).await
            }
        }
    )*};
}
#[allow(unused_imports)]
pub(crate) use both_modes;
