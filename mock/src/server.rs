//! A mock server's life: bind, serve connections (plain or TLS, HTTP/1.1
//! and h2), stop; the state its connections share; what a test reads back.

use std::fmt;
use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use http::HeaderMap;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::oneshot;
use tokio::task::JoinSet;
use tokio_rustls::TlsAcceptor;

use crate::MockOptions;
use crate::fault::{Fault, pack_fault};
use crate::objects::Objects;
use crate::routes::handle;
use crate::served::{Served, Tally};

/// A copy of a request as the mock received it.
#[derive(Clone, Debug)]
pub struct SeenRequest {
    /// `GET`, `POST`, …
    pub method: String,
    /// The path as sent, without the query string.
    pub path: String,
    /// The path the mock routed on ([`crate::normalise_path`]).
    pub route: String,
    /// Every header received (`authorization`, `x-api-key`,
    /// `anthropic-version`, `anthropic-beta`, `openai-organization`, …).
    pub headers: HeaderMap,
    /// The body as received.
    pub body: Bytes,
}

/// The state every connection of one server shares.
pub(crate) struct State {
    /// How this server behaves by default.
    pub(crate) opts: MockOptions,
    /// The server-wide fault, packed by [`pack_fault`] so the hot path reads it
    /// with one atomic load instead of a lock.
    pub(crate) fault: AtomicU64,
    /// Every request received, whatever became of it.
    pub(crate) requests: AtomicU64,
    /// Requests kept when `opts.record_requests`.
    pub(crate) seen: Mutex<Vec<SeenRequest>>,
    /// Streamed bodies created and not yet finished or dropped.
    pub(crate) open_streams: AtomicU64,
    /// Streamed bodies whose last byte was handed to the connection.
    pub(crate) streams_completed: AtomicU64,
    /// Streamed bodies dropped before their end: the peer went away.
    pub(crate) streams_cancelled: AtomicU64,
    /// The work done, for [`MockUpstream::served`].
    pub(crate) served: Tally,
    /// Files, batches and stored responses, shared by every caller.
    pub(crate) objects: Objects,
    /// Part of every object id, so two servers in one test never hand out
    /// the same id.
    pub(crate) nonce: u32,
}

/// Differs between servers started in one process (a counter) and between
/// processes (the clock).
fn server_nonce() -> u32 {
    static STARTED: AtomicU64 = AtomicU64::new(0);
    let nth = STARTED.fetch_add(1, Ordering::Relaxed);
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |elapsed| elapsed.subsec_nanos());
    // Keep the low 32 bits: only their spread matters.
    (u64::from(nanos) ^ nth.wrapping_mul(0x9e37_79b9)) as u32
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
            served: Tally::default(),
            objects: Objects::default(),
            nonce: server_nonce(),
        }
    }
}

/// A running mock server on its own OS thread and tokio runtime. Dropping it
/// stops the server and closes every connection (open streams count as
/// cancelled).
pub struct MockUpstream {
    pub(crate) addr: SocketAddr,
    /// `http` or `https`, for [`MockUpstream::base_url`].
    pub(crate) scheme: &'static str,
    pub(crate) state: Arc<State>,
    /// Resolves the server's shutdown future; taken on drop.
    pub(crate) stop: Option<oneshot::Sender<()>>,
    /// Joined on drop so the port and the connections are gone when drop returns.
    pub(crate) thread: Option<std::thread::JoinHandle<()>>,
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

    /// Where it listens.
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
    /// ended by `Fault::ResetAfterChunks` or `Fault::ErrorAfterChunks` counts
    /// as neither completed nor cancelled.
    pub fn streams_cancelled(&self) -> u64 {
        self.state.streams_cancelled.load(Ordering::Relaxed)
    }

    /// The work done so far: requests by normalised path, tokens by model.
    /// A stream's output tokens are in once it has ended (`open_streams() == 0`).
    pub fn served(&self) -> Served {
        self.state.served.snapshot()
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

pub(crate) async fn serve(
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

pub(crate) async fn connection(
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
