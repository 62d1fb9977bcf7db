//! A worker's own HTTP/1 connections to one plain-HTTP upstream (a model
//! server on the same host or network: vLLM, Ollama, a sidecar, the mock).
//!
//! hyper-util's pooled client costs several microseconds per request on
//! loopback (a `(scheme, authority)` SipHash map probed three times, a
//! boxed response future, a checkout future racing a connect future);
//! measured with callgrind, that was about a tenth of the gateway's own
//! instructions per request (issue 16). Here a worker keeps its ready
//! senders in a small vector and reuses the newest one that is ready: one
//! uncontended lock, no hashing, no extra futures. TLS upstreams (the
//! public APIs, where a network round trip dwarfs this) keep hyper-util's
//! client with HTTP/2 by ALPN.

use std::sync::Mutex;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::client::conn::http1;
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;

/// Why a request got no answer head.
#[derive(Debug)]
pub enum SendError {
    /// No connection could be made: the request never left, so another
    /// upstream may be tried.
    Connect(std::io::Error),
    /// The connection failed after the request may have been sent.
    Request(hyper::Error),
    /// hyper-util's pooled (TLS) client failed after connecting.
    Pooled(hyper_util::client::legacy::Error),
}

impl std::fmt::Display for SendError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            SendError::Connect(e) => write!(f, "connect: {e}"),
            SendError::Request(e) => write!(f, "{e}"),
            SendError::Pooled(e) => write!(f, "{e}"),
        }
    }
}

/// One pooled connection's sender and when it was last handed out.
struct Idle {
    sender: http1::SendRequest<Full<Bytes>>,
    used: Instant,
}

/// Connections of one worker to one `http://host:port` upstream.
pub struct H1Pool {
    /// `host:port` to connect to.
    addr: String,
    connect_timeout: Duration,
    /// A connection unused this long is closed rather than reused (the
    /// upstream may have dropped it).
    idle_timeout: Duration,
    /// At most this many connections are kept.
    max_idle: usize,
    /// Senders of open connections, oldest first. A sender whose answer is
    /// still streaming is not ready and is skipped until it is.
    idle: Mutex<Vec<Idle>>,
}

impl H1Pool {
    pub fn new(addr: String, connect_timeout: Duration, idle_timeout: Duration) -> H1Pool {
        H1Pool {
            addr,
            connect_timeout,
            idle_timeout,
            max_idle: 1024,
            idle: Mutex::new(Vec::new()),
        }
    }

    /// Sends `req` (origin-form URI, `Host` set) on a ready pooled
    /// connection, or on a new one. A pooled connection that turns out
    /// closed before the request left is replaced by a new one, once.
    pub async fn send(&self, req: Request<Full<Bytes>>) -> Result<Response<Incoming>, SendError> {
        let mut req = req;
        if let Some(mut sender) = self.checkout() {
            match sender.try_send_request(req).await {
                Ok(res) => {
                    self.put_back(sender);
                    return Ok(res);
                }
                Err(mut e) => match e.take_message() {
                    // Never sent (the upstream closed it meanwhile): a
                    // fresh connection may take it.
                    Some(r) => req = r,
                    None => return Err(SendError::Request(e.into_error())),
                },
            }
        }
        let mut sender = self.connect().await?;
        let res = sender.send_request(req).await.map_err(SendError::Request)?;
        self.put_back(sender);
        Ok(res)
    }

    /// The newest ready sender; closed or stale ones are dropped.
    fn checkout(&self) -> Option<http1::SendRequest<Full<Bytes>>> {
        let mut idle = self.idle.lock().unwrap_or_else(|p| p.into_inner());
        let now = Instant::now();
        let mut i = idle.len();
        while i > 0 {
            i -= 1;
            let c = &idle[i];
            if c.sender.is_closed() || now.duration_since(c.used) > self.idle_timeout {
                idle.swap_remove(i);
                continue;
            }
            if c.sender.is_ready() {
                return Some(idle.swap_remove(i).sender);
            }
        }
        None
    }

    /// Keeps `sender` for later requests; it becomes ready once this
    /// answer has been read to its end.
    fn put_back(&self, sender: http1::SendRequest<Full<Bytes>>) {
        let mut idle = self.idle.lock().unwrap_or_else(|p| p.into_inner());
        if idle.len() < self.max_idle {
            idle.push(Idle {
                sender,
                used: Instant::now(),
            });
        }
    }

    async fn connect(&self) -> Result<http1::SendRequest<Full<Bytes>>, SendError> {
        let stream = tokio::time::timeout(self.connect_timeout, TcpStream::connect(&self.addr))
            .await
            .map_err(|_| {
                SendError::Connect(std::io::Error::new(
                    std::io::ErrorKind::TimedOut,
                    "connect timed out",
                ))
            })?
            .map_err(SendError::Connect)?;
        let _ = stream.set_nodelay(true);
        let (sender, conn) = http1::Builder::new()
            .handshake(TokioIo::new(stream))
            .await
            .map_err(SendError::Request)?;
        tokio::spawn(async move {
            if let Err(e) = conn.await {
                tracing::debug!(error = %e, "upstream connection closed");
            }
        });
        Ok(sender)
    }
}
