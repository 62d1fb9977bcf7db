//! A built-in OpenAI-compatible upstream that answers from a script instead
//! of a model: for trying Tollgate with no network (`mock = true` upstreams,
//! `tollgate mock-upstream`), for integration tests and for benches.
//!
//! The bytes follow OpenAI's wire shapes (chunk objects, `"usage":null` on
//! every chunk when usage was asked for, the usage-only chunk with
//! `"choices":[]`, `data: [DONE]`, the Responses API event sequence), so the
//! gateway's meter is exercised on the shapes it meets in production.
//!
//! Behaviour is set per server by [`MockOptions`] (and [`MockUpstream::set_fault`])
//! and per request by `x-mock-*` headers, which the gateway forwards like any
//! client header, so a test can drive a fault through the whole proxy:
//!
//! | header | value | effect |
//! |---|---|---|
//! | `x-mock-chunks` | `N` | content tokens in the answer (before `max_tokens`) |
//! | `x-mock-chunk-delay-ms` | `N` | delay between streamed chunks |
//! | `x-mock-fault` | [`Fault`] as text, or `none` | see [`Fault`] |
//! | `x-mock-cached-tokens` | `N` | `cached_tokens` in usage (at most the prompt) |
//! | `x-mock-reasoning-tokens` | `N` | reasoning tokens, part of the completion |
//!
//! Token counts are deterministic: a prompt counts `ceil(utf8_bytes / 4) + 4`
//! per message (always below the gateway's bound of bytes + 8 per message),
//! the answer is one word per token from a fixed list, and a reasoning budget
//! is spent before visible tokens, as OpenAI's reasoning models do.
//!
//! The hot path takes no lock (the fault is one packed atomic) and logs
//! nothing; only `record_requests` adds a mutex.

use std::collections::VecDeque;
use std::convert::Infallible;
use std::fmt;
use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::str::FromStr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll, ready};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use http::header::{AUTHORIZATION, CONTENT_TYPE, HeaderValue, RETRY_AFTER};
use http::{HeaderMap, Method, Request, Response, StatusCode};
use http_body::{Frame, SizeHint};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use serde_json::{Map, Value, json};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::oneshot;
use tokio::task::JoinSet;
use tokio::time::Sleep;
use tokio_rustls::TlsAcceptor;

/// Content tokens per answer when neither the request nor a header bounds it.
pub const HEADER_CHUNKS: &str = "x-mock-chunks";
/// Milliseconds between streamed chunks.
pub const HEADER_CHUNK_DELAY_MS: &str = "x-mock-chunk-delay-ms";
/// A [`Fault`] in its text form, or `none` to lift the server's fault.
pub const HEADER_FAULT: &str = "x-mock-fault";
/// `prompt_tokens_details.cached_tokens` (`input_tokens_details` for Responses).
pub const HEADER_CACHED_TOKENS: &str = "x-mock-cached-tokens";
/// `completion_tokens_details.reasoning_tokens` (`output_tokens_details` for Responses).
pub const HEADER_REASONING_TOKENS: &str = "x-mock-reasoning-tokens";

/// Largest `x-mock-chunks` accepted: answers are built in memory, and a
/// typo should not take the test machine down.
const MAX_HEADER_CHUNKS: usize = 1_000_000;

/// Answer words, cycled; short ASCII so a token is one word and needs no
/// JSON escaping.
const WORDS: [&str; 16] = [
    "Tollgate", "meters", "every", "token", "that", "flows", "through", "the", "gate", "and",
    "settles", "each", "request", "exactly", "once", "today",
];

const FINGERPRINT: &str = "fp_tollgate_mock";
const SSE_CONTENT_TYPE: &str = "text/event-stream; charset=utf-8";
const JSON_CONTENT_TYPE: &str = "application/json";

/// How a mock server behaves when a request does not say otherwise.
#[derive(Clone, Debug)]
pub struct MockOptions {
    /// Content tokens per answer when the request does not bound it lower, so
    /// a test controls the answer's length (and cost) without a model.
    pub chunks: usize,
    /// Pause between streamed chunks, to make a stream last long enough to be
    /// cancelled or timed out in a test.
    pub chunk_delay: Duration,
    /// Applied to every request: a permanently failing upstream for failover
    /// tests. Changed at run time with [`MockUpstream::set_fault`].
    pub fault: Option<Fault>,
    /// Keep a copy of every request so tests can check what the gateway
    /// forwarded (headers rewritten, body unchanged). Off: no lock per request.
    pub record_requests: bool,
    /// Ids listed by `GET /v1/models`.
    pub models: Vec<String>,
    /// When set, only `Authorization: Bearer <key>` is accepted, so tests can
    /// prove the gateway swaps the client's key for the upstream's.
    pub require_key: Option<String>,
}

impl Default for MockOptions {
    fn default() -> Self {
        MockOptions {
            chunks: 16,
            chunk_delay: Duration::ZERO,
            fault: None,
            record_requests: false,
            models: ["demo-chat", "demo-chat-mini", "demo-embed"]
                .into_iter()
                .map(String::from)
                .collect(),
            require_key: None,
        }
    }
}

/// A way for the upstream to misbehave. The text form (the `x-mock-fault`
/// header value) is `status:503`, `reset-after:3`, `stall`, `stall-after:2`,
/// `slow-first-byte:500` (milliseconds), `garbage` or `no-usage`.
///
/// "Chunks" are SSE events for a streamed answer. A non-streamed answer is
/// sent as two halves of its JSON, so `reset-after:1` / `stall-after:1` cut it
/// in the middle and `…:0` before its first byte. A cut past the end of the
/// answer never happens: the answer completes normally.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Fault {
    /// Answer this status with an OpenAI error body (`retry-after: 1` on 429).
    Status(u16),
    /// Send the headers and N chunks, then abort (an incomplete chunked body
    /// under HTTP/1.1, `RST_STREAM` under h2): never a clean end.
    ResetAfterChunks(usize),
    /// Accept the request and never send response headers.
    Stall,
    /// Send the headers and N chunks, then hang forever.
    StallAfterChunks(usize),
    /// Wait this long before the response headers, then answer normally.
    SlowFirstByte(Duration),
    /// 200 with the expected content type and a body that is neither JSON nor SSE.
    Garbage,
    /// Never report usage, even when asked: the gateway must estimate.
    NoUsage,
}

impl fmt::Display for Fault {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Fault::Status(status) => write!(f, "status:{status}"),
            Fault::ResetAfterChunks(n) => write!(f, "reset-after:{n}"),
            Fault::Stall => f.write_str("stall"),
            Fault::StallAfterChunks(n) => write!(f, "stall-after:{n}"),
            Fault::SlowFirstByte(wait) => write!(f, "slow-first-byte:{}", wait.as_millis()),
            Fault::Garbage => f.write_str("garbage"),
            Fault::NoUsage => f.write_str("no-usage"),
        }
    }
}

impl FromStr for Fault {
    type Err = String;

    fn from_str(text: &str) -> Result<Fault, String> {
        let text = text.trim();
        let (name, arg) = match text.split_once(':') {
            Some((name, arg)) => (name, Some(arg.trim())),
            None => (text, None),
        };
        let bad = || {
            format!(
                "invalid fault {text:?}: expected status:N, reset-after:N, stall, stall-after:N, slow-first-byte:MS, garbage or no-usage"
            )
        };
        let number = |arg: Option<&str>| -> Result<u64, String> {
            arg.and_then(|a| a.parse::<u64>().ok()).ok_or_else(bad)
        };
        let count = |arg| number(arg).and_then(|n| usize::try_from(n).map_err(|_| bad()));
        match (name, arg) {
            ("status", arg) => match u16::try_from(number(arg)?) {
                Ok(status @ 100..=999) => Ok(Fault::Status(status)),
                _ => Err(bad()),
            },
            ("reset-after", arg) => Ok(Fault::ResetAfterChunks(count(arg)?)),
            ("stall", None) => Ok(Fault::Stall),
            ("stall-after", arg) => Ok(Fault::StallAfterChunks(count(arg)?)),
            ("slow-first-byte", arg) => {
                Ok(Fault::SlowFirstByte(Duration::from_millis(number(arg)?)))
            }
            ("garbage", None) => Ok(Fault::Garbage),
            ("no-usage", None) => Ok(Fault::NoUsage),
            _ => Err(bad()),
        }
    }
}

/// A copy of a request as the mock received it.
#[derive(Clone, Debug)]
pub struct SeenRequest {
    pub method: String,
    /// The path without the query string.
    pub path: String,
    pub headers: HeaderMap,
    pub body: Bytes,
}

/// The state every connection of one server shares.
struct State {
    opts: MockOptions,
    /// The server-wide fault, packed by [`pack_fault`] so the hot path reads it
    /// with one atomic load instead of a lock.
    fault: AtomicU64,
    /// Every request received, whatever became of it.
    requests: AtomicU64,
    /// Requests kept when `opts.record_requests`.
    seen: Mutex<Vec<SeenRequest>>,
    /// Streamed bodies created and not yet finished or dropped.
    open_streams: AtomicU64,
    /// Streamed bodies whose last byte was handed to the connection.
    streams_completed: AtomicU64,
    /// Streamed bodies dropped before their end: the peer went away.
    streams_cancelled: AtomicU64,
}

impl State {
    fn new(opts: MockOptions) -> State {
        State {
            fault: AtomicU64::new(pack_fault(opts.fault.as_ref())),
            opts,
            requests: AtomicU64::new(0),
            seen: Mutex::new(Vec::new()),
            open_streams: AtomicU64::new(0),
            streams_completed: AtomicU64::new(0),
            streams_cancelled: AtomicU64::new(0),
        }
    }
}

/// Fault kind in the top 8 bits, its argument (status, chunks or nanoseconds,
/// saturated) in the low 56; 0 is no fault.
const FAULT_ARG_BITS: u32 = 56;
const FAULT_ARG_MASK: u64 = (1 << FAULT_ARG_BITS) - 1;

fn pack_fault(fault: Option<&Fault>) -> u64 {
    let wide = |n: usize| u64::try_from(n).unwrap_or(u64::MAX);
    let (kind, arg) = match fault {
        None => (0, 0),
        Some(Fault::Status(status)) => (1, u64::from(*status)),
        Some(Fault::ResetAfterChunks(n)) => (2, wide(*n)),
        Some(Fault::Stall) => (3, 0),
        Some(Fault::StallAfterChunks(n)) => (4, wide(*n)),
        Some(Fault::SlowFirstByte(wait)) => (5, u64::try_from(wait.as_nanos()).unwrap_or(u64::MAX)),
        Some(Fault::Garbage) => (6, 0),
        Some(Fault::NoUsage) => (7, 0),
    };
    (kind << FAULT_ARG_BITS) | arg.min(FAULT_ARG_MASK)
}

fn unpack_fault(packed: u64) -> Option<Fault> {
    let arg = packed & FAULT_ARG_MASK;
    let count = usize::try_from(arg).unwrap_or(usize::MAX);
    match packed >> FAULT_ARG_BITS {
        1 => Some(Fault::Status(u16::try_from(arg).unwrap_or(500))),
        2 => Some(Fault::ResetAfterChunks(count)),
        3 => Some(Fault::Stall),
        4 => Some(Fault::StallAfterChunks(count)),
        5 => Some(Fault::SlowFirstByte(Duration::from_nanos(arg))),
        6 => Some(Fault::Garbage),
        7 => Some(Fault::NoUsage),
        _ => None,
    }
}

/// A running mock server on its own OS thread and tokio runtime. Dropping it
/// stops the server and closes every connection (open streams count as
/// cancelled).
pub struct MockUpstream {
    addr: SocketAddr,
    /// `http` or `https`, for [`MockUpstream::base_url`].
    scheme: &'static str,
    state: Arc<State>,
    /// Resolves the server's shutdown future; taken on drop.
    stop: Option<oneshot::Sender<()>>,
    /// Joined on drop so the port and the connections are gone when drop returns.
    thread: Option<std::thread::JoinHandle<()>>,
}

impl fmt::Debug for MockUpstream {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MockUpstream")
            .field("addr", &self.addr)
            .field("scheme", &self.scheme)
            .finish_non_exhaustive()
    }
}

impl MockUpstream {
    /// Binds 127.0.0.1:0 and serves plain HTTP (HTTP/1.1 and h2 prior
    /// knowledge) on a dedicated thread with its own runtime, so it works from
    /// sync code and from any runtime. Returns once listening.
    pub fn start(opts: MockOptions) -> io::Result<MockUpstream> {
        MockUpstream::start_on(SocketAddr::from(([127, 0, 0, 1], 0)), opts)
    }

    /// [`MockUpstream::start`] on a given address.
    pub fn start_on(addr: SocketAddr, opts: MockOptions) -> io::Result<MockUpstream> {
        MockUpstream::spawn(addr, opts, None)
    }

    /// [`MockUpstream::start`] behind TLS. ALPN offers h2 and http/1.1 when
    /// the given config sets no ALPN protocols of its own.
    pub fn start_tls(
        opts: MockOptions,
        tls: Arc<rustls::ServerConfig>,
    ) -> io::Result<MockUpstream> {
        let tls = if tls.alpn_protocols.is_empty() {
            let mut config = (*tls).clone();
            config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
            Arc::new(config)
        } else {
            tls
        };
        MockUpstream::spawn(
            SocketAddr::from(([127, 0, 0, 1], 0)),
            opts,
            Some(TlsAcceptor::from(tls)),
        )
    }

    fn spawn(
        addr: SocketAddr,
        opts: MockOptions,
        tls: Option<TlsAcceptor>,
    ) -> io::Result<MockUpstream> {
        let scheme = if tls.is_some() { "https" } else { "http" };
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        // Bind here, not on the thread, so the caller gets bind errors and the
        // socket is listening (connections queue in the backlog) on return.
        let std_listener = std::net::TcpListener::bind(addr)?;
        std_listener.set_nonblocking(true)?;
        let listener = {
            let _entered = runtime.enter();
            TcpListener::from_std(std_listener)?
        };
        let addr = listener.local_addr()?;
        let state = Arc::new(State::new(opts));
        let (stop, stopped) = oneshot::channel::<()>();
        let served = Arc::clone(&state);
        let thread = std::thread::Builder::new()
            .name(format!("mock-upstream-{}", addr.port()))
            .spawn(move || {
                let shutdown = async move {
                    // A dropped sender means the handle is gone: stop as well.
                    let _ = stopped.await;
                };
                // Accept errors are retried inside; nothing else fails.
                let _ = runtime.block_on(serve(listener, served, tls, shutdown));
                // Dropping the runtime here drops every connection task.
            })?;
        Ok(MockUpstream {
            addr,
            scheme,
            state,
            stop: Some(stop),
            thread: Some(thread),
        })
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `http://127.0.0.1:PORT/v1` (`https://` under TLS).
    pub fn base_url(&self) -> String {
        format!("{}://{}/v1", self.scheme, self.addr)
    }

    /// Copies of the requests received so far (empty unless `record_requests`).
    pub fn requests(&self) -> Vec<SeenRequest> {
        self.state
            .seen
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// Every request received, recorded or not.
    pub fn request_count(&self) -> u64 {
        self.state.requests.load(Ordering::Relaxed)
    }

    /// Replaces the server-wide fault; requests already past their start keep
    /// the fault they read.
    pub fn set_fault(&self, fault: Option<Fault>) {
        self.state
            .fault
            .store(pack_fault(fault.as_ref()), Ordering::Relaxed);
    }

    /// Streamed bodies the peer read to the end.
    pub fn streams_completed(&self) -> u64 {
        self.state.streams_completed.load(Ordering::Relaxed)
    }

    /// Streamed bodies dropped before their end (the peer went away). A body
    /// ended by `Fault::ResetAfterChunks` counts as neither completed nor
    /// cancelled.
    pub fn streams_cancelled(&self) -> u64 {
        self.state.streams_cancelled.load(Ordering::Relaxed)
    }

    /// Streamed bodies in progress now.
    pub fn open_streams(&self) -> u64 {
        self.state.open_streams.load(Ordering::Relaxed)
    }
}

impl Drop for MockUpstream {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// Serves until `shutdown` resolves, on the current runtime (the CLI's
/// `tollgate mock-upstream --listen`). Connections still open then are closed.
pub async fn run(
    listener: TcpListener,
    opts: MockOptions,
    shutdown: impl Future<Output = ()>,
) -> io::Result<()> {
    serve(listener, Arc::new(State::new(opts)), None, shutdown).await
}

async fn serve(
    listener: TcpListener,
    state: Arc<State>,
    tls: Option<TlsAcceptor>,
    shutdown: impl Future<Output = ()>,
) -> io::Result<()> {
    let mut builder = auto::Builder::new(TokioExecutor::new());
    // Without a timer hyper's header and keep-alive timeouts do nothing.
    builder.http1().timer(TokioTimer::new());
    builder.http2().timer(TokioTimer::new());
    let builder = Arc::new(builder);
    let mut connections = JoinSet::new();
    let mut shutdown = std::pin::pin!(shutdown);
    loop {
        tokio::select! {
            () = &mut shutdown => break,
            Some(_) = connections.join_next(), if !connections.is_empty() => {}
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => {
                    connections.spawn(connection(
                        stream,
                        Arc::clone(&state),
                        Arc::clone(&builder),
                        tls.clone(),
                    ));
                }
                // Out of descriptors and the like: back off instead of spinning.
                Err(_) => tokio::time::sleep(Duration::from_millis(5)).await,
            },
        }
    }
    connections.shutdown().await;
    Ok(())
}

async fn connection(
    stream: TcpStream,
    state: Arc<State>,
    builder: Arc<auto::Builder<TokioExecutor>>,
    tls: Option<TlsAcceptor>,
) {
    // Best effort: a socket that refuses it still serves, only slower.
    let _ = stream.set_nodelay(true);
    let service = service_fn(move |req| handle(Arc::clone(&state), req));
    // Connection errors (peer gone, bad TLS, aborted bodies) are the point of
    // many tests; the mock has nobody to report them to.
    match tls {
        None => {
            let _ = builder
                .serve_connection(TokioIo::new(stream), service)
                .await;
        }
        Some(acceptor) => {
            if let Ok(stream) = acceptor.accept(stream).await {
                let _ = builder
                    .serve_connection(TokioIo::new(stream), service)
                    .await;
            }
        }
    }
}

/// What a request asked for through `x-mock-*` headers, over the server's
/// options.
struct Knobs {
    chunks: usize,
    delay: Duration,
    fault: Option<Fault>,
    cached: u64,
    reasoning: u64,
}

impl Knobs {
    fn read(headers: &HeaderMap, state: &State) -> Result<Knobs, ApiError> {
        let mut knobs = Knobs {
            chunks: state.opts.chunks,
            delay: state.opts.chunk_delay,
            fault: unpack_fault(state.fault.load(Ordering::Relaxed)),
            cached: 0,
            reasoning: 0,
        };
        // Most requests carry no knob: skip the lookups.
        if !headers
            .keys()
            .any(|name| name.as_str().starts_with("x-mock-"))
        {
            return Ok(knobs);
        }
        if let Some(n) = header_number(headers, HEADER_CHUNKS)? {
            knobs.chunks = usize::try_from(n)
                .ok()
                .filter(|n| *n <= MAX_HEADER_CHUNKS)
                .ok_or_else(|| {
                    ApiError::invalid(
                        format!("{HEADER_CHUNKS} must be at most {MAX_HEADER_CHUNKS}"),
                        None,
                    )
                })?;
        }
        if let Some(ms) = header_number(headers, HEADER_CHUNK_DELAY_MS)? {
            knobs.delay = Duration::from_millis(ms);
        }
        if let Some(n) = header_number(headers, HEADER_CACHED_TOKENS)? {
            knobs.cached = n;
        }
        if let Some(n) = header_number(headers, HEADER_REASONING_TOKENS)? {
            knobs.reasoning = n;
        }
        if let Some(value) = headers.get(HEADER_FAULT) {
            let text = value.to_str().unwrap_or("");
            knobs.fault = if text.trim() == "none" {
                None
            } else {
                Some(
                    text.parse()
                        .map_err(|message: String| ApiError::invalid(message, None))?,
                )
            };
        }
        Ok(knobs)
    }

    /// Where the body is cut, if the fault cuts it.
    fn cut(&self) -> Option<Cut> {
        match self.fault {
            Some(Fault::ResetAfterChunks(after)) => Some(Cut { after, reset: true }),
            Some(Fault::StallAfterChunks(after)) => Some(Cut {
                after,
                reset: false,
            }),
            _ => None,
        }
    }

    fn no_usage(&self) -> bool {
        self.fault == Some(Fault::NoUsage)
    }
}

fn header_number(headers: &HeaderMap, name: &str) -> Result<Option<u64>, ApiError> {
    match headers.get(name) {
        None => Ok(None),
        Some(value) => value
            .to_str()
            .ok()
            .and_then(|text| text.trim().parse::<u64>().ok())
            .map(Some)
            .ok_or_else(|| {
                ApiError::invalid(format!("{name} must be a non-negative integer"), None)
            }),
    }
}

async fn handle(
    state: Arc<State>,
    req: Request<Incoming>,
) -> Result<Response<MockBody>, Infallible> {
    let seq = state.requests.fetch_add(1, Ordering::Relaxed);
    let (parts, body) = req.into_parts();
    let body = match body.collect().await {
        Ok(collected) => collected.to_bytes(),
        Err(_) => {
            return Ok(
                ApiError::invalid("could not read the request body".into(), None).response(seq),
            );
        }
    };
    if state.opts.record_requests {
        state
            .seen
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .push(SeenRequest {
                method: parts.method.to_string(),
                path: parts.uri.path().to_owned(),
                headers: parts.headers.clone(),
                body: body.clone(),
            });
    }
    if let Some(key) = &state.opts.require_key {
        if let Err(error) = check_key(&parts.headers, key) {
            return Ok(error.response(seq));
        }
    }
    let knobs = match Knobs::read(&parts.headers, &state) {
        Ok(knobs) => knobs,
        Err(error) => return Ok(error.response(seq)),
    };
    match knobs.fault {
        Some(Fault::Stall) => std::future::pending::<()>().await,
        Some(Fault::SlowFirstByte(wait)) => tokio::time::sleep(wait).await,
        Some(Fault::Status(status)) => return Ok(status_fault(status).response(seq)),
        Some(Fault::Garbage) => return Ok(garbage(&body, seq)),
        _ => {}
    }
    let answer = route(&state, seq, &parts.method, parts.uri.path(), &body, &knobs);
    Ok(answer.unwrap_or_else(|error| error.response(seq)))
}

fn check_key(headers: &HeaderMap, key: &str) -> Result<(), ApiError> {
    let Some(given) = headers.get(AUTHORIZATION) else {
        return Err(ApiError {
            status: StatusCode::UNAUTHORIZED,
            message: "You didn't provide an API key. You need to provide your API key in an Authorization header using Bearer auth (i.e. Authorization: Bearer YOUR_KEY).".into(),
            kind: "invalid_request_error",
            param: None,
            code: None,
        });
    };
    let given = given.to_str().unwrap_or("");
    if given.strip_prefix("Bearer ") == Some(key) {
        return Ok(());
    }
    Err(ApiError {
        status: StatusCode::UNAUTHORIZED,
        message: "Incorrect API key provided.".into(),
        kind: "invalid_request_error",
        param: None,
        code: Some("invalid_api_key"),
    })
}

fn route(
    state: &Arc<State>,
    seq: u64,
    method: &Method,
    path: &str,
    body: &Bytes,
    knobs: &Knobs,
) -> Result<Response<MockBody>, ApiError> {
    let endpoint = match path {
        "/v1/chat/completions" => Endpoint::Chat,
        "/v1/completions" => Endpoint::Completions,
        "/v1/embeddings" => Endpoint::Embeddings,
        "/v1/responses" => Endpoint::Responses,
        "/v1/models" if method == Method::GET => return Ok(models(state, seq)),
        _ => {
            if method == Method::GET {
                if let Some(id) = path.strip_prefix("/v1/models/") {
                    return model(state, seq, id);
                }
            }
            return Err(ApiError::not_found(method, path));
        }
    };
    if method != Method::POST {
        return Err(ApiError {
            status: StatusCode::METHOD_NOT_ALLOWED,
            message: format!("Invalid method for URL ({method} {path})"),
            kind: "invalid_request_error",
            param: None,
            code: None,
        });
    }
    let request = parse_object(body)?;
    match endpoint {
        Endpoint::Chat => chat(seq, &request, knobs),
        Endpoint::Completions => completions(seq, &request, knobs),
        Endpoint::Embeddings => embeddings(&request),
        Endpoint::Responses => responses(seq, &request, knobs),
    }
    .map(|(answer, content_type)| {
        let body = match answer {
            Answer::Json(json) => MockBody::buffered(json, knobs.cut()),
            Answer::Stream(script) => MockBody::stream(script, knobs, state),
        };
        respond(StatusCode::OK, content_type, seq, body)
    })
}

enum Endpoint {
    Chat,
    Completions,
    Embeddings,
    Responses,
}

/// A successful answer before it becomes a body.
enum Answer {
    Json(Bytes),
    Stream(Script),
}

fn respond(
    status: StatusCode,
    content_type: &'static str,
    seq: u64,
    body: MockBody,
) -> Response<MockBody> {
    let mut response = Response::new(body);
    *response.status_mut() = status;
    let headers = response.headers_mut();
    headers.insert(CONTENT_TYPE, HeaderValue::from_static(content_type));
    if let Ok(id) = HeaderValue::try_from(format!("req_mock{seq:016x}")) {
        headers.insert("x-request-id", id);
    }
    response
}

fn json_bytes(value: &Value) -> Bytes {
    Bytes::from(serde_json::to_vec(value).expect("a serde_json::Value always serializes"))
}

/// An OpenAI error answer.
struct ApiError {
    status: StatusCode,
    message: String,
    kind: &'static str,
    param: Option<&'static str>,
    code: Option<&'static str>,
}

impl ApiError {
    fn invalid(message: String, param: Option<&'static str>) -> ApiError {
        ApiError {
            status: StatusCode::BAD_REQUEST,
            message,
            kind: "invalid_request_error",
            param,
            code: None,
        }
    }

    fn missing(param: &'static str) -> ApiError {
        ApiError {
            code: Some("missing_required_parameter"),
            ..ApiError::invalid(
                format!("Missing required parameter: '{param}'."),
                Some(param),
            )
        }
    }

    fn wrong_type(param: &'static str, expected: &str) -> ApiError {
        ApiError {
            code: Some("invalid_type"),
            ..ApiError::invalid(
                format!("Invalid type for '{param}': expected {expected}."),
                Some(param),
            )
        }
    }

    fn not_found(method: &Method, path: &str) -> ApiError {
        ApiError {
            status: StatusCode::NOT_FOUND,
            ..ApiError::invalid(format!("Invalid URL ({method} {path})"), None)
        }
    }

    fn response(self, seq: u64) -> Response<MockBody> {
        let body = json!({"error": {
            "message": self.message,
            "type": self.kind,
            "param": self.param,
            "code": self.code,
        }});
        let mut response = respond(
            self.status,
            JSON_CONTENT_TYPE,
            seq,
            MockBody::buffered(json_bytes(&body), None),
        );
        if self.status == StatusCode::TOO_MANY_REQUESTS {
            response
                .headers_mut()
                .insert(RETRY_AFTER, HeaderValue::from_static("1"));
        }
        response
    }
}

fn status_fault(status: u16) -> ApiError {
    let status = StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    let (message, kind, code) = match status.as_u16() {
        400 => ("Bad request (mock fault).", "invalid_request_error", None),
        401 => (
            "Incorrect API key provided.",
            "invalid_request_error",
            Some("invalid_api_key"),
        ),
        403 => (
            "You are not allowed to sample from this model.",
            "permission_error",
            None,
        ),
        404 => (
            "The model does not exist or you do not have access to it.",
            "invalid_request_error",
            Some("model_not_found"),
        ),
        429 => (
            "Rate limit reached for requests (mock fault).",
            "requests",
            Some("rate_limit_exceeded"),
        ),
        500 => (
            "The server had an error while processing your request.",
            "server_error",
            None,
        ),
        503 => (
            "The server is overloaded or not ready yet.",
            "server_error",
            None,
        ),
        _ => ("Mock upstream fault.", "server_error", None),
    };
    ApiError {
        status,
        message: message.into(),
        kind,
        param: None,
        code,
    }
}

fn garbage(body: &Bytes, seq: u64) -> Response<MockBody> {
    let streamed = serde_json::from_slice::<Value>(body)
        .ok()
        .and_then(|request| request.get("stream").and_then(Value::as_bool))
        .unwrap_or(false);
    let content_type = if streamed {
        SSE_CONTENT_TYPE
    } else {
        JSON_CONTENT_TYPE
    };
    let junk = Bytes::from_static(
        b"<html><body>502 upstream hiccup</body></html>\r\n\x00\xff{\"id\":\"chatcmpl-\x7f,,usage:{{\ndata: {not json\n\n",
    );
    respond(
        StatusCode::OK,
        content_type,
        seq,
        MockBody::buffered(junk, None),
    )
}

fn parse_object(body: &Bytes) -> Result<Map<String, Value>, ApiError> {
    match serde_json::from_slice::<Value>(body) {
        Ok(Value::Object(map)) => Ok(map),
        Ok(_) => Err(ApiError::invalid(
            "The request body must be a JSON object.".into(),
            None,
        )),
        Err(error) => Err(ApiError {
            code: Some("invalid_json"),
            ..ApiError::invalid(
                format!("We could not parse the JSON body of your request. ({error})"),
                None,
            )
        }),
    }
}

fn models(state: &State, seq: u64) -> Response<MockBody> {
    let data: Vec<Value> = state
        .opts
        .models
        .iter()
        .map(|id| model_object(id))
        .collect();
    let body = json!({"object": "list", "data": data});
    respond(
        StatusCode::OK,
        JSON_CONTENT_TYPE,
        seq,
        MockBody::buffered(json_bytes(&body), None),
    )
}

fn model(state: &State, seq: u64, id: &str) -> Result<Response<MockBody>, ApiError> {
    if !state.opts.models.iter().any(|known| known == id) {
        return Err(ApiError {
            status: StatusCode::NOT_FOUND,
            code: Some("model_not_found"),
            ..ApiError::invalid(format!("The model '{id}' does not exist"), Some("model"))
        });
    }
    Ok(respond(
        StatusCode::OK,
        JSON_CONTENT_TYPE,
        seq,
        MockBody::buffered(json_bytes(&model_object(id)), None),
    ))
}

fn model_object(id: &str) -> Value {
    json!({"id": id, "object": "model", "created": 1_700_000_000, "owned_by": "tollgate-mock"})
}

// ---- request fields ----

fn model_name(request: &Map<String, Value>) -> Result<&str, ApiError> {
    match request.get("model") {
        Some(Value::String(model)) if !model.is_empty() => Ok(model),
        None | Some(Value::Null) => Err(ApiError::invalid(
            "you must provide a model parameter".into(),
            Some("model"),
        )),
        Some(_) => Err(ApiError::wrong_type("model", "a non-empty string")),
    }
}

fn flag(request: &Map<String, Value>, name: &'static str) -> Result<bool, ApiError> {
    match request.get(name) {
        None | Some(Value::Null) => Ok(false),
        Some(Value::Bool(value)) => Ok(*value),
        Some(_) => Err(ApiError::wrong_type(name, "a boolean")),
    }
}

/// `stream_options.include_usage`; like OpenAI, `stream_options` without
/// `stream` is an error (a gateway that injects it must check `stream`).
fn include_usage(request: &Map<String, Value>, stream: bool) -> Result<bool, ApiError> {
    match request.get("stream_options") {
        None | Some(Value::Null) => Ok(false),
        Some(_) if !stream => Err(ApiError::invalid(
            "The 'stream_options' parameter is only allowed when 'stream' is enabled.".into(),
            Some("stream_options"),
        )),
        Some(Value::Object(options)) => flag(options, "include_usage"),
        Some(_) => Err(ApiError::wrong_type("stream_options", "an object")),
    }
}

/// The lowest of the given output bounds that are present.
fn max_tokens(
    request: &Map<String, Value>,
    names: &[&'static str],
) -> Result<Option<u64>, ApiError> {
    let mut bound: Option<u64> = None;
    for &name in names {
        match request.get(name) {
            None | Some(Value::Null) => {}
            Some(value) => match (value.as_u64(), value.as_i64()) {
                (Some(n), _) if n >= 1 => bound = Some(bound.map_or(n, |b| b.min(n))),
                // 0 or negative
                (_, Some(_)) => {
                    return Err(ApiError {
                        code: Some("integer_below_min_value"),
                        ..ApiError::invalid(
                            format!(
                                "Invalid '{name}': integer below minimum value. Expected a value >= 1, but got {value} instead."
                            ),
                            Some(name),
                        )
                    });
                }
                _ => return Err(ApiError::wrong_type(name, "an integer")),
            },
        }
    }
    Ok(bound)
}

/// Tokens for a text of this many UTF-8 bytes: never more than the bytes,
/// which is what the gateway's reservation bound relies on.
fn text_tokens(bytes: usize) -> u64 {
    u64::try_from(bytes.div_ceil(4)).unwrap_or(u64::MAX)
}

/// Per-message overhead, as in OpenAI's chat format.
const MESSAGE_OVERHEAD: u64 = 4;

/// UTF-8 bytes of a message's text: a string, or the `text` of each part.
fn content_bytes(content: Option<&Value>) -> usize {
    match content {
        Some(Value::String(text)) => text.len(),
        Some(Value::Array(parts)) => parts
            .iter()
            .filter_map(|part| part.get("text").and_then(Value::as_str))
            .map(str::len)
            .sum(),
        _ => 0,
    }
}

/// The token budget of one answer.
struct Plan {
    prompt: u64,
    cached: u64,
    /// Answer words (visible tokens).
    visible: usize,
    reasoning: u64,
    /// The output bound cut the answer short.
    truncated: bool,
    /// Usage is reported at all (not `Fault::NoUsage`).
    usage: bool,
}

impl Plan {
    /// Reasoning is spent first, then visible tokens, both within `max`.
    fn new(prompt: u64, max: Option<u64>, knobs: &Knobs, reasoning: u64, cached: u64) -> Plan {
        let wanted = u64::try_from(knobs.chunks).unwrap_or(u64::MAX);
        let (reasoning_used, visible, truncated) = match max {
            None => (reasoning, wanted, false),
            Some(max) => {
                let reasoning_used = reasoning.min(max);
                let visible = wanted.min(max - reasoning_used);
                (
                    reasoning_used,
                    visible,
                    reasoning.saturating_add(wanted) > max,
                )
            }
        };
        Plan {
            prompt,
            cached: cached.min(prompt),
            visible: usize::try_from(visible).unwrap_or(usize::MAX),
            reasoning: reasoning_used,
            truncated,
            usage: !knobs.no_usage(),
        }
    }

    fn completion(&self) -> u64 {
        u64::try_from(self.visible)
            .unwrap_or(u64::MAX)
            .saturating_add(self.reasoning)
    }

    fn total(&self) -> u64 {
        self.prompt.saturating_add(self.completion())
    }

    fn finish_reason(&self) -> &'static str {
        if self.truncated { "length" } else { "stop" }
    }

    fn chat_usage(&self) -> Value {
        json!({
            "prompt_tokens": self.prompt,
            "completion_tokens": self.completion(),
            "total_tokens": self.total(),
            "prompt_tokens_details": {"cached_tokens": self.cached, "audio_tokens": 0},
            "completion_tokens_details": {
                "reasoning_tokens": self.reasoning,
                "audio_tokens": 0,
                "accepted_prediction_tokens": 0,
                "rejected_prediction_tokens": 0,
            },
        })
    }

    fn legacy_usage(&self) -> Value {
        json!({
            "prompt_tokens": self.prompt,
            "completion_tokens": self.completion(),
            "total_tokens": self.total(),
        })
    }

    fn responses_usage(&self) -> Value {
        if !self.usage {
            return Value::Null;
        }
        json!({
            "input_tokens": self.prompt,
            "input_tokens_details": {"cached_tokens": self.cached},
            "output_tokens": self.completion(),
            "output_tokens_details": {"reasoning_tokens": self.reasoning},
            "total_tokens": self.total(),
        })
    }
}

/// The `index`-th answer token as it appears in the text: words joined by
/// single spaces.
fn word(index: usize) -> (&'static str, &'static str) {
    let separator = if index == 0 { "" } else { " " };
    (separator, WORDS[index % WORDS.len()])
}

fn answer_text(visible: usize) -> String {
    let mut text = String::with_capacity(visible * 8);
    for index in 0..visible {
        let (separator, word) = word(index);
        text.push_str(separator);
        text.push_str(word);
    }
    text
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |elapsed| elapsed.as_secs())
}

fn json_string(text: &str) -> String {
    serde_json::to_string(text).expect("a str always serializes")
}

// ---- endpoints ----

type Answered = Result<(Answer, &'static str), ApiError>;

fn chat(seq: u64, request: &Map<String, Value>, knobs: &Knobs) -> Answered {
    let model = model_name(request)?;
    let messages = match request.get("messages") {
        Some(Value::Array(messages)) if !messages.is_empty() => messages,
        None | Some(Value::Null) => return Err(ApiError::missing("messages")),
        Some(_) => return Err(ApiError::wrong_type("messages", "a non-empty array")),
    };
    let prompt = messages
        .iter()
        .map(|message| text_tokens(content_bytes(message.get("content"))) + MESSAGE_OVERHEAD)
        .sum();
    let stream = flag(request, "stream")?;
    let include_usage = include_usage(request, stream)?;
    let max = max_tokens(request, &["max_completion_tokens", "max_tokens"])?;
    let plan = Plan::new(prompt, max, knobs, knobs.reasoning, knobs.cached);
    let id = format!("chatcmpl-mock{seq:016x}");
    let created = unix_now();
    if stream {
        let script = ChunkScript::new(ChunkShape::Chat, &id, created, model, &plan, include_usage);
        return Ok((Answer::Stream(Script::Chunks(script)), SSE_CONTENT_TYPE));
    }
    let mut body = json!({
        "id": id,
        "object": "chat.completion",
        "created": created,
        "model": model,
        "choices": [{
            "index": 0,
            "message": {
                "role": "assistant",
                "content": answer_text(plan.visible),
                "refusal": null,
                "annotations": [],
            },
            "logprobs": null,
            "finish_reason": plan.finish_reason(),
        }],
        "service_tier": "default",
        "system_fingerprint": FINGERPRINT,
    });
    if plan.usage {
        body["usage"] = plan.chat_usage();
    }
    Ok((Answer::Json(json_bytes(&body)), JSON_CONTENT_TYPE))
}

fn completions(seq: u64, request: &Map<String, Value>, knobs: &Knobs) -> Answered {
    let model = model_name(request)?;
    let prompt = match request.get("prompt") {
        None | Some(Value::Null) => 0,
        Some(Value::String(text)) => text_tokens(text.len()),
        Some(Value::Array(prompts)) => prompts
            .iter()
            .map(|prompt| match prompt {
                Value::String(text) => text_tokens(text.len()),
                Value::Array(token_ids) => u64::try_from(token_ids.len()).unwrap_or(u64::MAX),
                _ => 1, // one token id
            })
            .sum(),
        Some(_) => return Err(ApiError::wrong_type("prompt", "a string or an array")),
    };
    let stream = flag(request, "stream")?;
    let include_usage = include_usage(request, stream)?;
    let max = max_tokens(request, &["max_tokens"])?;
    // The legacy endpoint reports neither cached nor reasoning tokens.
    let plan = Plan::new(prompt, max, knobs, 0, 0);
    let id = format!("cmpl-mock{seq:016x}");
    let created = unix_now();
    if stream {
        let script = ChunkScript::new(ChunkShape::Text, &id, created, model, &plan, include_usage);
        return Ok((Answer::Stream(Script::Chunks(script)), SSE_CONTENT_TYPE));
    }
    let mut body = json!({
        "id": id,
        "object": "text_completion",
        "created": created,
        "model": model,
        "choices": [{
            "text": answer_text(plan.visible),
            "index": 0,
            "logprobs": null,
            "finish_reason": plan.finish_reason(),
        }],
        "system_fingerprint": null,
    });
    if plan.usage {
        body["usage"] = plan.legacy_usage();
    }
    Ok((Answer::Json(json_bytes(&body)), JSON_CONTENT_TYPE))
}

fn embeddings(request: &Map<String, Value>) -> Answered {
    let model = model_name(request)?;
    let inputs: Vec<&Value> = match request.get("input") {
        None | Some(Value::Null) => return Err(ApiError::missing("input")),
        Some(text @ Value::String(_)) => vec![text],
        // An array of token ids is one input.
        Some(array @ Value::Array(items)) if items.iter().all(Value::is_number) => {
            if items.is_empty() {
                return Err(ApiError::invalid(
                    "'input' must not be empty.".into(),
                    Some("input"),
                ));
            }
            vec![array]
        }
        Some(Value::Array(items)) if !items.is_empty() => items.iter().collect(),
        Some(_) => {
            return Err(ApiError::wrong_type(
                "input",
                "a string or a non-empty array",
            ));
        }
    };
    let dimensions = match request.get("dimensions") {
        None | Some(Value::Null) => 8,
        Some(value) => value
            .as_u64()
            .filter(|d| (1..=4096).contains(d))
            .and_then(|d| usize::try_from(d).ok())
            .ok_or_else(|| ApiError::wrong_type("dimensions", "an integer from 1 to 4096"))?,
    };
    let mut prompt = 0u64;
    let mut data = Vec::with_capacity(inputs.len());
    for (index, input) in inputs.iter().enumerate() {
        prompt += match input {
            Value::String(text) => text_tokens(text.len()),
            Value::Array(token_ids) => u64::try_from(token_ids.len()).unwrap_or(u64::MAX),
            _ => {
                return Err(ApiError::wrong_type(
                    "input",
                    "strings or arrays of token ids",
                ));
            }
        };
        data.push(json!({
            "object": "embedding",
            "index": index,
            "embedding": embedding(input, dimensions),
        }));
    }
    Ok((
        Answer::Json(json_bytes(&json!({
            "object": "list",
            "data": data,
            "model": model,
            "usage": {"prompt_tokens": prompt, "total_tokens": prompt},
        }))),
        JSON_CONTENT_TYPE,
    ))
}

/// A unit vector derived from the input, so equal inputs embed equally.
fn embedding(input: &Value, dimensions: usize) -> Vec<f32> {
    // FNV-1a over the input's JSON text, then xorshift for each component.
    let mut state = input
        .to_string()
        .bytes()
        .fold(0xcbf2_9ce4_8422_2325_u64, |hash, byte| {
            (hash ^ u64::from(byte)).wrapping_mul(0x0000_0100_0000_01b3)
        })
        | 1;
    let mut vector: Vec<f32> = (0..dimensions)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            // 24 random bits into [-1, 1).
            ((state >> 40) as f32 / (1u32 << 23) as f32) - 1.0
        })
        .collect();
    let norm = vector.iter().map(|x| x * x).sum::<f32>().sqrt();
    if norm > 0.0 {
        for x in &mut vector {
            *x /= norm;
        }
    }
    vector
}

fn responses(seq: u64, request: &Map<String, Value>, knobs: &Knobs) -> Answered {
    let model = model_name(request)?;
    let mut prompt = match request.get("input") {
        None | Some(Value::Null) => return Err(ApiError::missing("input")),
        Some(Value::String(text)) => text_tokens(text.len()) + MESSAGE_OVERHEAD,
        Some(Value::Array(items)) => items
            .iter()
            .map(|item| {
                let bytes = match item.get("content") {
                    Some(content) => content_bytes(Some(content)),
                    // function_call_output and similar items carry `output`.
                    None => content_bytes(item.get("output")),
                };
                text_tokens(bytes) + MESSAGE_OVERHEAD
            })
            .sum(),
        Some(_) => return Err(ApiError::wrong_type("input", "a string or an array")),
    };
    let instructions = match request.get("instructions") {
        Some(Value::String(text)) => {
            prompt += text_tokens(text.len()) + MESSAGE_OVERHEAD;
            Value::String(text.clone())
        }
        _ => Value::Null,
    };
    let stream = flag(request, "stream")?;
    let max = max_tokens(request, &["max_output_tokens"])?;
    let plan = Plan::new(prompt, max, knobs, knobs.reasoning, knobs.cached);
    let shape = ResponseShape {
        id: format!("resp_mock{seq:016x}"),
        message_id: format!("msg_mock{seq:016x}"),
        reasoning_id: format!("rs_mock{seq:016x}"),
        created: unix_now(),
        model,
        instructions,
        max_output_tokens: max,
    };
    let text = answer_text(plan.visible);
    if !stream {
        let done = shape.object(&plan, Some(&text));
        return Ok((Answer::Json(json_bytes(&done)), JSON_CONTENT_TYPE));
    }
    Ok((
        Answer::Stream(Script::Frames(shape.events(&plan, &text))),
        SSE_CONTENT_TYPE,
    ))
}

/// What the objects of one Responses API answer share.
struct ResponseShape<'a> {
    id: String,
    message_id: String,
    reasoning_id: String,
    created: u64,
    model: &'a str,
    instructions: Value,
    max_output_tokens: Option<u64>,
}

impl ResponseShape<'_> {
    /// The `response` object: in progress (no `text`) or finished.
    fn object(&self, plan: &Plan, text: Option<&str>) -> Value {
        let (status, output, usage, incomplete) = match text {
            None => ("in_progress", Vec::new(), Value::Null, Value::Null),
            Some(text) => {
                let mut output = Vec::new();
                if plan.reasoning > 0 {
                    output.push(self.reasoning_item());
                }
                output.push(self.message_item(plan, text));
                let incomplete = if plan.truncated {
                    json!({"reason": "max_output_tokens"})
                } else {
                    Value::Null
                };
                (
                    self.final_status(plan),
                    output,
                    plan.responses_usage(),
                    incomplete,
                )
            }
        };
        json!({
            "id": self.id,
            "object": "response",
            "created_at": self.created,
            "status": status,
            "error": null,
            "incomplete_details": incomplete,
            "instructions": self.instructions,
            "max_output_tokens": self.max_output_tokens,
            "model": self.model,
            "output": output,
            "parallel_tool_calls": true,
            "previous_response_id": null,
            "reasoning": {"effort": null, "summary": null},
            "store": false,
            "temperature": 1.0,
            "text": {"format": {"type": "text"}},
            "tool_choice": "auto",
            "tools": [],
            "top_p": 1.0,
            "truncation": "disabled",
            "usage": usage,
            "user": null,
            "metadata": {},
        })
    }

    fn final_status(&self, plan: &Plan) -> &'static str {
        if plan.truncated {
            "incomplete"
        } else {
            "completed"
        }
    }

    fn reasoning_item(&self) -> Value {
        json!({"id": self.reasoning_id, "type": "reasoning", "summary": []})
    }

    fn text_part(text: &str) -> Value {
        json!({"type": "output_text", "annotations": [], "logprobs": [], "text": text})
    }

    fn message_item(&self, plan: &Plan, text: &str) -> Value {
        json!({
            "id": self.message_id,
            "type": "message",
            "status": self.final_status(plan),
            "content": [Self::text_part(text)],
            "role": "assistant",
        })
    }

    /// The whole event sequence of a streamed answer, as OpenAI sends it:
    /// created, in_progress, output items with one text delta per token, and
    /// `response.completed` (or `response.incomplete` when `max_output_tokens`
    /// cut the answer) carrying the usage.
    fn events(&self, plan: &Plan, text: &str) -> VecDeque<Bytes> {
        let mut events = VecDeque::with_capacity(plan.visible + 12);
        let mut sequence = 0u64;
        let mut push = |events: &mut VecDeque<Bytes>, name: &str, payload: Value| {
            events.push_back(sse_event(name, sequence, &payload));
            sequence += 1;
        };
        let started = self.object(plan, None);
        push(
            &mut events,
            "response.created",
            json!({"response": started}),
        );
        push(
            &mut events,
            "response.in_progress",
            json!({"response": started}),
        );
        let mut output_index = 0;
        if plan.reasoning > 0 {
            let item = self.reasoning_item();
            push(
                &mut events,
                "response.output_item.added",
                json!({"output_index": 0, "item": item}),
            );
            push(
                &mut events,
                "response.output_item.done",
                json!({"output_index": 0, "item": item}),
            );
            output_index = 1;
        }
        push(
            &mut events,
            "response.output_item.added",
            json!({"output_index": output_index, "item": {
                "id": self.message_id,
                "type": "message",
                "status": "in_progress",
                "content": [],
                "role": "assistant",
            }}),
        );
        push(
            &mut events,
            "response.content_part.added",
            json!({
                "item_id": self.message_id,
                "output_index": output_index,
                "content_index": 0,
                "part": Self::text_part(""),
            }),
        );
        for index in 0..plan.visible {
            let (separator, word) = word(index);
            events.push_back(Bytes::from(format!(
                "event: response.output_text.delta\ndata: {{\"type\":\"response.output_text.delta\",\"sequence_number\":{sequence},\"item_id\":\"{}\",\"output_index\":{output_index},\"content_index\":0,\"delta\":\"{separator}{word}\",\"logprobs\":[]}}\n\n",
                self.message_id
            )));
            sequence += 1;
        }
        let mut push = |events: &mut VecDeque<Bytes>, name: &str, payload: Value| {
            events.push_back(sse_event(name, sequence, &payload));
            sequence += 1;
        };
        push(
            &mut events,
            "response.output_text.done",
            json!({
                "item_id": self.message_id,
                "output_index": output_index,
                "content_index": 0,
                "text": text,
                "logprobs": [],
            }),
        );
        push(
            &mut events,
            "response.content_part.done",
            json!({
                "item_id": self.message_id,
                "output_index": output_index,
                "content_index": 0,
                "part": Self::text_part(text),
            }),
        );
        push(
            &mut events,
            "response.output_item.done",
            json!({"output_index": output_index, "item": self.message_item(plan, text)}),
        );
        let last = if plan.truncated {
            "response.incomplete"
        } else {
            "response.completed"
        };
        push(
            &mut events,
            last,
            json!({"response": self.object(plan, Some(text))}),
        );
        events
    }
}

/// `event: NAME\ndata: {"type":NAME,"sequence_number":N,…payload}\n\n`, with
/// `type` first as OpenAI writes it.
fn sse_event(name: &str, sequence: u64, payload: &Value) -> Bytes {
    let payload = serde_json::to_string(payload).expect("a serde_json::Value always serializes");
    let rest = payload.strip_prefix('{').unwrap_or(&payload);
    let separator = if rest == "}" { "" } else { "," };
    Bytes::from(format!(
        "event: {name}\ndata: {{\"type\":\"{name}\",\"sequence_number\":{sequence}{separator}{rest}\n\n"
    ))
}

// ---- streamed chat and legacy completions ----

#[derive(Clone, Copy, PartialEq, Eq)]
enum ChunkShape {
    /// `chat.completion.chunk` with `delta`s; opens with a role-only chunk.
    Chat,
    /// Legacy `text_completion` chunks with `text`.
    Text,
}

/// Builds each SSE event of a chat or legacy completions stream when it is
/// sent, so a long answer costs no memory up front.
struct ChunkScript {
    shape: ChunkShape,
    /// `data: {"id":…,"object":…,"created":…,"model":…,…,"choices":[`
    head: String,
    /// `,"usage":null` when usage was asked for (OpenAI puts it on every chunk).
    usage_null: &'static str,
    visible: usize,
    finish_reason: &'static str,
    /// The usage-only chunk's `usage` value, when it is sent.
    usage: Option<String>,
}

impl ChunkScript {
    fn new(
        shape: ChunkShape,
        id: &str,
        created: u64,
        model: &str,
        plan: &Plan,
        include_usage: bool,
    ) -> ChunkScript {
        let (object, fingerprint) = match shape {
            ChunkShape::Chat => ("chat.completion.chunk", json_string(FINGERPRINT)),
            ChunkShape::Text => ("text_completion", "null".to_owned()),
        };
        let head = format!(
            "data: {{\"id\":\"{id}\",\"object\":\"{object}\",\"created\":{created},\"model\":{},\"system_fingerprint\":{fingerprint},\"choices\":[",
            json_string(model)
        );
        let usage = (include_usage && plan.usage).then(|| {
            let usage = match shape {
                ChunkShape::Chat => plan.chat_usage(),
                ChunkShape::Text => plan.legacy_usage(),
            };
            serde_json::to_string(&usage).expect("a serde_json::Value always serializes")
        });
        ChunkScript {
            shape,
            head,
            usage_null: if include_usage { ",\"usage\":null" } else { "" },
            visible: plan.visible,
            finish_reason: plan.finish_reason(),
            usage,
        }
    }

    /// Events before the first content chunk.
    fn lead(&self) -> usize {
        match self.shape {
            ChunkShape::Chat => 1,
            ChunkShape::Text => 0,
        }
    }

    fn len(&self) -> usize {
        // lead, content, finish chunk, usage chunk, [DONE]
        self.lead() + self.visible + 1 + usize::from(self.usage.is_some()) + 1
    }

    fn frame(&self, index: usize) -> Bytes {
        let lead = self.lead();
        let finish = lead + self.visible;
        if index == self.len() - 1 {
            return Bytes::from_static(b"data: [DONE]\n\n");
        }
        let choice = match (self.shape, index) {
            (ChunkShape::Chat, 0) => {
                "{\"index\":0,\"delta\":{\"role\":\"assistant\",\"content\":\"\",\"refusal\":null},\"logprobs\":null,\"finish_reason\":null}".to_owned()
            }
            (shape, index) if index < finish => {
                let (separator, word) = word(index - lead);
                match shape {
                    ChunkShape::Chat => format!(
                        "{{\"index\":0,\"delta\":{{\"content\":\"{separator}{word}\"}},\"logprobs\":null,\"finish_reason\":null}}"
                    ),
                    ChunkShape::Text => format!(
                        "{{\"text\":\"{separator}{word}\",\"index\":0,\"logprobs\":null,\"finish_reason\":null}}"
                    ),
                }
            }
            (shape, index) if index == finish => match shape {
                ChunkShape::Chat => format!(
                    "{{\"index\":0,\"delta\":{{}},\"logprobs\":null,\"finish_reason\":\"{}\"}}",
                    self.finish_reason
                ),
                ChunkShape::Text => format!(
                    "{{\"text\":\"\",\"index\":0,\"logprobs\":null,\"finish_reason\":\"{}\"}}",
                    self.finish_reason
                ),
            },
            _ => {
                // The usage-only chunk.
                let usage = self.usage.as_deref().unwrap_or("null");
                return Bytes::from(format!("{}],\"usage\":{usage}}}\n\n", self.head));
            }
        };
        Bytes::from(format!("{}{choice}]{}}}\n\n", self.head, self.usage_null))
    }
}

// ---- response bodies ----

/// The frames of one body, produced in order.
enum Script {
    Frames(VecDeque<Bytes>),
    Chunks(ChunkScript),
}

impl Script {
    fn len(&self, sent: usize) -> usize {
        match self {
            Script::Frames(frames) => sent + frames.len(),
            Script::Chunks(chunks) => chunks.len(),
        }
    }

    fn frame(&mut self, index: usize) -> Bytes {
        match self {
            Script::Frames(frames) => frames.pop_front().unwrap_or_default(),
            Script::Chunks(chunks) => chunks.frame(index),
        }
    }
}

/// How long a reset waits for the chunks before it to reach the socket.
const RESET_GRACE: Duration = Duration::from_millis(10);

/// Where a fault cuts a body: after `after` frames, fail (`reset`) or hang.
#[derive(Clone, Copy)]
struct Cut {
    after: usize,
    reset: bool,
}

/// Every body the mock sends. A streamed body counts itself in the server's
/// stream counters: open while alive, completed when its last frame is handed
/// over, cancelled when dropped before that.
struct MockBody {
    script: Script,
    /// Frames handed over so far.
    sent: usize,
    cut: Option<Cut>,
    delay: Duration,
    /// The pause before the next frame, allocated once per body.
    sleep: Option<Pin<Box<Sleep>>>,
    /// The pause for the next frame has been started.
    armed: bool,
    /// The server's counters, until this streamed body has been counted as
    /// finished; `None` for buffered bodies.
    tally: Option<Arc<State>>,
    /// A whole JSON answer: announce its length (`content-length`), as
    /// OpenAI does; streams go chunked.
    exact_size: bool,
    ended: bool,
}

impl MockBody {
    /// A JSON answer. A cut splits it in two halves so it can break mid-way.
    fn buffered(bytes: Bytes, cut: Option<Cut>) -> MockBody {
        let frames = match cut {
            Some(_) => {
                let middle = bytes.len() / 2;
                VecDeque::from([bytes.slice(..middle), bytes.slice(middle..)])
            }
            None => VecDeque::from([bytes]),
        };
        MockBody {
            script: Script::Frames(frames),
            sent: 0,
            cut,
            delay: Duration::ZERO,
            sleep: None,
            armed: false,
            tally: None,
            exact_size: cut.is_none(),
            ended: false,
        }
    }

    /// A streamed (SSE) answer, counted in the server's stream counters.
    fn stream(script: Script, knobs: &Knobs, state: &Arc<State>) -> MockBody {
        state.open_streams.fetch_add(1, Ordering::Relaxed);
        MockBody {
            script,
            sent: 0,
            cut: knobs.cut(),
            delay: knobs.delay,
            sleep: None,
            armed: false,
            tally: Some(Arc::clone(state)),
            exact_size: false,
            ended: false,
        }
    }

    /// Ready once `wait` has passed since the first poll of this pause.
    fn pause(&mut self, cx: &mut Context<'_>, wait: Duration) -> Poll<()> {
        let sleep = self
            .sleep
            .get_or_insert_with(|| Box::pin(tokio::time::sleep(wait)));
        if !self.armed {
            sleep.as_mut().reset(tokio::time::Instant::now() + wait);
            self.armed = true;
        }
        ready!(sleep.as_mut().poll(cx));
        self.armed = false;
        Poll::Ready(())
    }

    /// Leaves the open streams, counted as completed or (reset) as neither.
    fn finish(&mut self, completed: bool) {
        self.ended = true;
        if let Some(state) = self.tally.take() {
            state.open_streams.fetch_sub(1, Ordering::Relaxed);
            if completed {
                state.streams_completed.fetch_add(1, Ordering::Relaxed);
            }
        }
    }
}

impl Drop for MockBody {
    fn drop(&mut self) {
        if let Some(state) = self.tally.take() {
            state.open_streams.fetch_sub(1, Ordering::Relaxed);
            state.streams_cancelled.fetch_add(1, Ordering::Relaxed);
        }
    }
}

impl http_body::Body for MockBody {
    type Data = Bytes;
    type Error = io::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, io::Error>>> {
        let this = self.get_mut();
        if this.ended {
            return Poll::Ready(None);
        }
        let total = this.script.len(this.sent);
        let cut = this
            .cut
            .filter(|cut| cut.after == this.sent && cut.after < total);
        if let Some(cut) = cut {
            if !cut.reset {
                // Hang: never woken, until the peer goes and drops us.
                return Poll::Pending;
            }
            // Let the connection write the chunks already handed over first,
            // as a real upstream that dies mid-stream has sent them (h2 drops
            // DATA still queued when the stream is reset).
            ready!(this.pause(cx, this.delay.max(RESET_GRACE)));
            this.finish(false);
            return Poll::Ready(Some(Err(io::Error::new(
                io::ErrorKind::ConnectionReset,
                format!("mock fault: reset after {} chunks", cut.after),
            ))));
        }
        if this.sent >= total {
            this.finish(true);
            return Poll::Ready(None);
        }
        if this.sent > 0 && !this.delay.is_zero() {
            ready!(this.pause(cx, this.delay));
        }
        let frame = this.script.frame(this.sent);
        this.sent += 1;
        if this.sent == total {
            // Counted here: hyper may not poll again once `is_end_stream` says so.
            this.finish(true);
        }
        Poll::Ready(Some(Ok(Frame::data(frame))))
    }

    fn is_end_stream(&self) -> bool {
        self.ended
    }

    fn size_hint(&self) -> SizeHint {
        match &self.script {
            Script::Frames(frames) if self.exact_size => {
                let remaining: usize = frames.iter().map(Bytes::len).sum();
                SizeHint::with_exact(u64::try_from(remaining).unwrap_or(u64::MAX))
            }
            _ => SizeHint::default(),
        }
    }
}

#[cfg(test)]
mod tests {
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

    #[test]
    fn prompt_tokens_stay_under_the_gateway_bound() {
        for text in [
            "",
            "a",
            "abcd",
            "abcde",
            "héllo wörld",
            "日本語のテキスト",
            "🦀🦀🦀",
        ] {
            let bytes = text.len() as u64;
            let tokens = text_tokens(text.len()) + MESSAGE_OVERHEAD;
            assert!(tokens <= bytes + 8, "{text:?}");
        }
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
        assert_eq!(ids, ["demo-chat", "demo-chat-mini", "demo-embed"]);
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

    #[test]
    fn faults_round_trip_through_text_and_the_atomic() {
        let faults = [
            Fault::Status(503),
            Fault::ResetAfterChunks(3),
            Fault::Stall,
            Fault::StallAfterChunks(2),
            Fault::SlowFirstByte(Duration::from_millis(500)),
            Fault::Garbage,
            Fault::NoUsage,
        ];
        for fault in faults {
            assert_eq!(fault.to_string().parse::<Fault>(), Ok(fault.clone()));
            assert_eq!(unpack_fault(pack_fault(Some(&fault))), Some(fault));
        }
        assert_eq!(unpack_fault(pack_fault(None)), None);
        for bad in [
            "",
            "status",
            "status:x",
            "status:70000",
            "stall:3",
            "reset-after:-1",
            "nope",
        ] {
            assert!(bad.parse::<Fault>().is_err(), "{bad:?}");
        }
    }
}
