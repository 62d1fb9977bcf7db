//! Accepting connections: TCP (and TLS), hyper's `auto` HTTP/1.1 + h2
//! connections, timeouts, the connection cap, graceful drain, and the
//! router that sends each request to its handler.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use futures_util::FutureExt;
use http::header::{self, HeaderValue};
use http::{Method, Request, Response, StatusCode};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use tokio::net::TcpListener;
use tokio::sync::watch;

use crate::app::App;
use crate::error::ApiError;
use crate::proxy::{self, Pool, X_REQUEST_ID};
use crate::{Body, full_body};

/// What one accept loop needs.
pub struct Listener {
    pub listener: TcpListener,
    pub tls: Option<tokio_rustls::TlsAcceptor>,
    /// Open connections across all workers (the `max_connections` cap).
    pub connections: Arc<AtomicUsize>,
}

/// Serves connections until `shutdown` turns true, then drains in-flight
/// requests for up to `server.shutdown_grace`.
pub async fn run(app: Arc<App>, pool: Arc<Pool>, l: Listener, mut shutdown: watch::Receiver<bool>) {
    let cfg = &app.config.server;
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(cfg.header_read_timeout.0)
        .keep_alive(true)
        .max_buf_size(cfg.max_header_bytes.max(8192));
    builder
        .http2()
        .timer(TokioTimer::new())
        .max_header_list_size(cfg.max_header_bytes as u32)
        .keep_alive_interval(Some(cfg.idle_timeout.0 / 2))
        .keep_alive_timeout(Duration::from_secs(20));
    let builder = Arc::new(builder);
    let graceful = GracefulShutdown::new();
    let first_request_timeout = cfg.header_read_timeout.0;
    let max_conns = cfg.max_connections;
    loop {
        let accepted = tokio::select! {
            a = l.listener.accept() => a,
            _ = shutdown.changed() => break,
        };
        let (stream, peer) = match accepted {
            Ok(a) => a,
            Err(e) => {
                // Out of file descriptors and the like: back off a little.
                tracing::warn!(error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(10)).await;
                continue;
            }
        };
        if l.connections.fetch_add(1, Ordering::AcqRel) >= max_conns {
            l.connections.fetch_sub(1, Ordering::AcqRel);
            drop(stream);
            continue;
        }
        let _ = stream.set_nodelay(true);
        let conn_guard = ConnGuard(l.connections.clone());
        let app = app.clone();
        let pool = pool.clone();
        let builder = builder.clone();
        let watcher = graceful.watcher();
        let tls = l.tls.clone();
        tokio::spawn(async move {
            let _guard = conn_guard;
            let ip = peer.ip();
            // hyper's header_read_timeout starts only once `auto` has chosen
            // HTTP/1: a connection that sends nothing, or part of the h2
            // preface, would be held (with its max_connections slot) forever.
            // So a connection must start its first request within
            // header_read_timeout of being accepted (TLS handshake included).
            let started = Arc::new(AtomicBool::new(false));
            let first = started.clone();
            let svc = service_fn(move |req| {
                first.store(true, Ordering::Relaxed);
                let app = app.clone();
                let pool = pool.clone();
                async move { Ok::<_, std::convert::Infallible>(route(&app, &pool, req, ip).await) }
            });
            let serve = async move {
                match tls {
                    None => {
                        let conn = builder
                            .serve_connection(TokioIo::new(stream), svc)
                            .into_owned();
                        let _ = watcher.watch(conn).await;
                    }
                    Some(acceptor) => {
                        let Ok(tls_stream) = acceptor.accept(stream).await else {
                            return;
                        };
                        let conn = builder
                            .serve_connection(TokioIo::new(tls_stream), svc)
                            .into_owned();
                        let _ = watcher.watch(conn).await;
                    }
                }
            };
            let mut serve = std::pin::pin!(serve);
            tokio::select! {
                () = &mut serve => {}
                () = tokio::time::sleep(first_request_timeout) => {
                    if started.load(Ordering::Relaxed) {
                        serve.await;
                    }
                    // Otherwise dropping `serve` closes the connection.
                }
            }
        });
    }
    drop(l.listener);
    let grace = app.config.server.shutdown_grace.0;
    if tokio::time::timeout(grace, graceful.shutdown())
        .await
        .is_err()
    {
        tracing::warn!("shutdown grace period over; closing the remaining connections");
    }
}

/// Gives back a connection slot when the connection ends.
struct ConnGuard(Arc<AtomicUsize>);

impl Drop for ConnGuard {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

/// Sends a request to its handler. A panic in a handler becomes a 500 for
/// this request only; the guards it held (permit, reservation) are released
/// while unwinding.
async fn route(app: &Arc<App>, pool: &Pool, req: Request<Incoming>, ip: IpAddr) -> Response<Body> {
    let request_id = proxy::request_id(req.headers());
    let fut = async {
        let path = req.uri().path();
        if path == "/v1" || path.starts_with("/v1/") {
            proxy::handle(app, pool, req, ip, &request_id).await
        } else if path.starts_with("/api/") {
            crate::api::handle(app, req, ip).await
        } else if crate::api::pages::owns(path) {
            crate::api::pages::serve(req.method(), path, req.headers())
        } else {
            ops(app, &req)
        }
    };
    let mut res = match std::panic::AssertUnwindSafe(fut).catch_unwind().await {
        Ok(res) => res,
        Err(_) => {
            tracing::error!(request_id = ?request_id, "a request handler panicked");
            ApiError::internal("The gateway failed while handling this request.").into_response()
        }
    };
    res.headers_mut().entry(&X_REQUEST_ID).or_insert(request_id);
    res
}

/// `/healthz`, `/readyz`, `/metrics`; 404 elsewhere.
fn ops(app: &App, req: &Request<Incoming>) -> Response<Body> {
    let path = req.uri().path();
    let known = matches!(path, "/healthz" | "/readyz" | "/metrics");
    if known && req.method() != Method::GET && req.method() != Method::HEAD {
        return ApiError::method_not_allowed().into_response();
    }
    match path {
        "/healthz" => text(StatusCode::OK, "application/json", "{\"status\":\"ok\"}"),
        "/readyz" => {
            if app.ready.load(Ordering::Acquire) {
                text(StatusCode::OK, "application/json", "{\"status\":\"ready\"}")
            } else {
                text(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "application/json",
                    "{\"status\":\"not ready\"}",
                )
            }
        }
        "/metrics" => text(
            StatusCode::OK,
            "text/plain; version=0.0.4",
            app.metrics.render(app),
        ),
        _ => ApiError::not_found(format!(
            "Unknown path {}.",
            crate::error::truncate(path, 256)
        ))
        .into_response(),
    }
}

fn text(
    status: StatusCode,
    content_type: &'static str,
    body: impl Into<bytes::Bytes>,
) -> Response<Body> {
    let mut res = Response::new(full_body(body));
    *res.status_mut() = status;
    res.headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    res
}

/// Loads the TLS certificate chain and key (PEM) for the listener, with
/// ALPN for h2 and http/1.1.
pub fn tls_acceptor(
    cert: &std::path::Path,
    key: &std::path::Path,
) -> Result<tokio_rustls::TlsAcceptor, String> {
    use rustls_pki_types::pem::PemObject;
    use rustls_pki_types::{CertificateDer, PrivateKeyDer};
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(cert)
        .map_err(|e| format!("server.tls.cert {}: {e}", cert.display()))?
        .collect::<Result<_, _>>()
        .map_err(|e| format!("server.tls.cert {}: {e}", cert.display()))?;
    if certs.is_empty() {
        return Err(format!(
            "server.tls.cert {}: no certificate found",
            cert.display()
        ));
    }
    let key = PrivateKeyDer::from_pem_file(key)
        .map_err(|e| format!("server.tls.key {}: {e}", key.display()))?;
    let mut config = rustls::ServerConfig::builder()
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .map_err(|e| format!("server.tls: {e}"))?;
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(tokio_rustls::TlsAcceptor::from(Arc::new(config)))
}

/// Binds the listening socket (with `SO_REUSEPORT` so that per-core workers
/// can each have their own on the same port).
pub fn bind(addr: SocketAddr, reuse_port: bool) -> std::io::Result<std::net::TcpListener> {
    use socket2::{Domain, Protocol, Socket, Type};
    let sock = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    sock.set_reuse_address(true)?;
    if reuse_port {
        sock.set_reuse_port(true)?;
    }
    sock.set_nodelay(true)?;
    sock.set_nonblocking(true)?;
    sock.bind(&addr.into())?;
    sock.listen(4096)?;
    Ok(sock.into())
}
