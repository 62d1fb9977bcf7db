//! Accepting connections: TCP (and TLS), hyper's `auto` HTTP/1.1 + h2
//! connections, timeouts, the connection cap, graceful drain, and the
//! router that sends each request to its handler.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use bytes::Bytes;
use futures_util::FutureExt;
use http::HeaderMap;
use http::header::{self, HeaderValue};
use http::{Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, LengthLimitError, Limited};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use tokio::net::TcpListener;
use tokio::sync::watch;

use crate::app::App;
use crate::error::{ApiError, Fault};
use crate::proxy::{self, WorkerProxy, X_REQUEST_ID};
use crate::{Body, BoxError, full_body};

/// What one accept loop needs.
pub struct Listener {
    pub listener: TcpListener,
    pub tls: Option<tokio_rustls::TlsAcceptor>,
    /// Open connections across all workers (the `max_connections` cap).
    pub connections: Arc<AtomicUsize>,
}

/// Serves connections until `shutdown` turns true, then drains in-flight
/// requests for up to `server.shutdown_grace`.
pub async fn run(
    app: Arc<App>,
    proxy: Arc<WorkerProxy>,
    l: Listener,
    mut shutdown: watch::Receiver<bool>,
) {
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
        let spin_guard = proxy.spin.as_ref().map(crate::proxy::spin::Spin::connect);
        let app = app.clone();
        let proxy = proxy.clone();
        let builder = builder.clone();
        let watcher = graceful.watcher();
        let tls = l.tls.clone();
        tokio::spawn(async move {
            let _guard = conn_guard;
            let _spin_guard = spin_guard;
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
                let proxy = proxy.clone();
                async move { Ok::<_, std::convert::Infallible>(route(&app, &proxy, req, ip).await) }
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
async fn route(
    app: &Arc<App>,
    proxy: &WorkerProxy,
    req: Request<Incoming>,
    peer: IpAddr,
) -> Response<Body> {
    let request_id = proxy::request_id(req.headers());
    let ip = client_ip(peer, req.headers(), &app.config.server.trusted_proxies);
    // For the panic answer, whose shape follows the route (a prefix test:
    // no allocation per request for a path that is rarely needed).
    let anthropic_route = req.uri().path().starts_with("/v1/messages");
    let fut = async {
        let path = req.uri().path();
        // Each branch boxed: the admin API's state machine is many KB, and
        // hyper moves the service future into its connection on every
        // request; boxed, the move is a pointer.
        if path == "/v1" || path.starts_with("/v1/") {
            Box::pin(proxy::handle(app, proxy, req, ip, &request_id)).await
        } else if path.starts_with("/api/") {
            Box::pin(crate::api::handle(app, req, ip)).await
        } else if crate::api::pages::owns(path) {
            crate::api::pages::serve(req.method(), path, req.headers())
        } else {
            ops(app, &req)
        }
    };
    let mut res = match std::panic::AssertUnwindSafe(fut).catch_unwind().await {
        Ok(res) => res,
        Err(_) => {
            let e = ApiError::internal("a request handler panicked");
            if anthropic_route {
                e.with_shape(crate::error::Shape::Anthropic {
                    request_id: request_id.to_str().unwrap_or("").to_owned(),
                })
                .into_response()
            } else {
                e.into_response()
            }
        }
    };
    if let Some(Fault(e)) = res.extensions_mut().remove::<Fault>() {
        let id = request_id.to_str().unwrap_or("");
        let cause = e.source.as_deref().map(ToString::to_string);
        tracing::error!(request_id = id, code = e.code, cause = ?cause, "internal error");
        *res.body_mut() = full_body(e.to_json_for(id));
    }
    res.headers_mut().entry(&X_REQUEST_ID).or_insert(request_id);
    res
}

/// The client's address: the TCP peer, unless the peer is one of
/// `server.trusted_proxies`; then the right-most hop of `X-Forwarded-For`
/// (or, without it, of `Forwarded: for=`) that is not itself a trusted
/// proxy. Hops left of that one were written by the client and are never
/// believed. A hop that cannot be read (`unknown`, an obfuscated name)
/// stops the walk at the last trusted address. No allocation.
pub fn client_ip(peer: IpAddr, headers: &HeaderMap, trusted: &[ipnet::IpNet]) -> IpAddr {
    let is_trusted = |ip: IpAddr| trusted.iter().any(|n| n.contains(&ip));
    if trusted.is_empty() || !is_trusted(peer) {
        return peer;
    }
    let xff = headers.get_all("x-forwarded-for");
    let (values, forwarded) = if xff.iter().next().is_some() {
        (xff, false)
    } else {
        (headers.get_all(header::FORWARDED), true)
    };
    let mut client = peer;
    for value in values.iter().rev() {
        let Ok(text) = value.to_str() else {
            return client;
        };
        for hop in text.rsplit(',') {
            let addr = if forwarded {
                forwarded_for(hop)
            } else {
                parse_hop(hop)
            };
            let Some(addr) = addr else { return client };
            client = addr;
            if !is_trusted(addr) {
                return addr;
            }
        }
    }
    client
}

/// The `for=` of one `Forwarded` element (`for=192.0.2.1;proto=https`,
/// `for="[2001:db8::1]:4711"`).
fn forwarded_for(element: &str) -> Option<IpAddr> {
    element.split(';').find_map(|pair| {
        let (k, v) = pair.trim().split_once('=')?;
        k.trim()
            .eq_ignore_ascii_case("for")
            .then(|| parse_hop(v.trim().trim_matches('"')))
            .flatten()
    })
}

/// One hop: `192.0.2.1`, `192.0.2.1:80`, `2001:db8::1`, `[2001:db8::1]:80`.
fn parse_hop(hop: &str) -> Option<IpAddr> {
    let hop = hop.trim();
    if let Ok(ip) = hop.parse::<IpAddr>() {
        return Some(ip);
    }
    if let Ok(sa) = hop.parse::<SocketAddr>() {
        return Some(sa.ip());
    }
    hop.strip_prefix('[')?.strip_suffix(']')?.parse().ok()
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
        "/metrics" => {
            if let Some(expected) = &app.metrics_token
                && !bearer_is(req.headers(), expected)
            {
                return ApiError::invalid_api_key(
                    "/metrics needs `Authorization: Bearer <token>` (metrics.token_env).",
                )
                .with_header(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"))
                .into_response();
            }
            text(StatusCode::OK, "text/plain; version=0.0.4", {
                let mut out = app.metrics.render(app.gate.cached(), &app.store.stats());
                if app.cluster.get().is_some() {
                    crate::cluster::trips::render(&mut out);
                }
                out
            })
        }
        _ => ApiError::not_found(format!(
            "Unknown path {}.",
            crate::error::truncate(path, 256)
        ))
        .into_response(),
    }
}

/// Whether `Authorization: Bearer <expected>` was sent (compared in
/// constant time).
fn bearer_is(headers: &HeaderMap, expected: &str) -> bool {
    let given = headers
        .get(header::AUTHORIZATION)
        .map(|v| v.as_bytes())
        .and_then(|v| {
            v.strip_prefix(b"Bearer ")
                .or_else(|| v.strip_prefix(b"bearer "))
        });
    given.is_some_and(|t| crate::api::token_matches(expected.as_bytes(), t.trim_ascii()))
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

/// Reads a request body of at most `max` bytes, for every handler that
/// reads one (the proxy, the admin API). Past `max` is 413, refused from
/// `Content-Length` before anything is read when it already says so; a
/// `Content-Length` that is not a number is 400; a body that breaks off is
/// 400 without the transport's error text.
pub async fn read_body<B>(headers: &HeaderMap, body: B, max: usize) -> Result<Bytes, ApiError>
where
    B: http_body::Body<Data = Bytes>,
    B::Error: Into<BoxError>,
{
    if let Some(len) = headers.get(header::CONTENT_LENGTH) {
        let len: u64 = len
            .to_str()
            .ok()
            .and_then(|s| s.trim().parse().ok())
            .ok_or_else(|| {
                ApiError::bad_request("invalid_header", "Content-Length is not a number.")
                    .with_param("content-length")
            })?;
        if len > max as u64 {
            return Err(ApiError::body_too_large(max));
        }
    }
    match Limited::new(body, max).collect().await {
        Ok(collected) => Ok(collected.to_bytes()),
        Err(e) if e.is::<LengthLimitError>() => Err(ApiError::body_too_large(max)),
        Err(_) => Err(ApiError::bad_request(
            "invalid_body",
            "The request body could not be read.",
        )),
    }
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

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(pairs: &[(&'static str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.append(*k, v.parse().unwrap());
        }
        h
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn client_address_only_through_trusted_proxies() {
        let trusted: Vec<ipnet::IpNet> =
            vec!["10.0.0.0/8".parse().unwrap(), "fd00::/8".parse().unwrap()];
        let proxy = ip("10.0.0.2");
        let xff = |v: &str| headers(&[("x-forwarded-for", v)]);
        // Untrusted peer: its headers are ignored.
        assert_eq!(
            client_ip(ip("198.51.100.9"), &xff("203.0.113.5"), &trusted),
            ip("198.51.100.9")
        );
        // Nothing trusted: the peer, whatever is sent.
        assert_eq!(client_ip(proxy, &xff("203.0.113.5"), &[]), proxy);
        // The right-most untrusted hop; the client's own left-most claims are not believed.
        assert_eq!(
            client_ip(proxy, &xff("1.1.1.1, 203.0.113.5"), &trusted),
            ip("203.0.113.5")
        );
        assert_eq!(
            client_ip(proxy, &xff("1.1.1.1, 203.0.113.5, 10.0.0.7"), &trusted),
            ip("203.0.113.5")
        );
        // Several header lines are one list, in order.
        let two = headers(&[
            ("x-forwarded-for", "1.1.1.1"),
            ("x-forwarded-for", "203.0.113.5"),
        ]);
        assert_eq!(client_ip(proxy, &two, &trusted), ip("203.0.113.5"));
        // Ports and brackets.
        assert_eq!(
            client_ip(proxy, &xff("203.0.113.5:4711"), &trusted),
            ip("203.0.113.5")
        );
        assert_eq!(
            client_ip(proxy, &xff("[2001:db8::7]:80"), &trusted),
            ip("2001:db8::7")
        );
        // Only trusted hops: the left-most of them.
        assert_eq!(
            client_ip(proxy, &xff("10.1.1.1, 10.0.0.7"), &trusted),
            ip("10.1.1.1")
        );
        // Garbage stops at the last trusted address.
        assert_eq!(client_ip(proxy, &xff("203.0.113.5, junk"), &trusted), proxy);
        assert_eq!(
            client_ip(proxy, &xff("junk, 10.0.0.7"), &trusted),
            ip("10.0.0.7")
        );
        // No header: the peer.
        assert_eq!(client_ip(proxy, &HeaderMap::new(), &trusted), proxy);
    }

    #[test]
    fn forwarded_header() {
        let trusted: Vec<ipnet::IpNet> = vec!["10.0.0.0/8".parse().unwrap()];
        let proxy = ip("10.0.0.2");
        let fwd = |v: &str| headers(&[("forwarded", v)]);
        assert_eq!(
            client_ip(
                proxy,
                &fwd("for=192.0.2.60;proto=http;by=203.0.113.43"),
                &trusted
            ),
            ip("192.0.2.60")
        );
        assert_eq!(
            client_ip(
                proxy,
                &fwd("for=1.1.1.1, For=\"[2001:db8:cafe::17]:4711\""),
                &trusted
            ),
            ip("2001:db8:cafe::17")
        );
        assert_eq!(client_ip(proxy, &fwd("for=unknown"), &trusted), proxy);
        assert_eq!(client_ip(proxy, &fwd("proto=https"), &trusted), proxy);
        // X-Forwarded-For wins when both are present.
        let both = headers(&[
            ("forwarded", "for=1.1.1.1"),
            ("x-forwarded-for", "203.0.113.5"),
        ]);
        assert_eq!(client_ip(proxy, &both, &trusted), ip("203.0.113.5"));
    }
}
