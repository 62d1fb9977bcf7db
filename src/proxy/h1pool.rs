//! A worker's own HTTP/1 client for plain-HTTP upstreams (a model server on
//! the same host or network: vLLM, Ollama, a sidecar, the mock).
//!
//! hyper's client runs each connection as a task of its own: the request
//! goes to it through a channel, the answer head comes back through
//! another, and every body chunk through a third, each hop a wake-up;
//! measured with callgrind, that task and its channels were a fifth of a
//! worker's instructions per request (issue 16). Here, as pingora does,
//! the request's own task writes the request and reads the answer head,
//! and the answer body reads the connection itself when the client side
//! polls it: no task, no channel. A worker keeps its idle connections in a
//! small vector (newest first out, one uncontended lock, no hashing); a
//! connection goes back only once its answer was read to the end, with
//! nothing left over and keep-alive on both sides. Dropping a body before
//! its end closes the connection, so the upstream sees the cancel at once.
//!
//! TLS upstreams (the public APIs, where a network round trip dwarfs this)
//! keep hyper-util's client with HTTP/2 by ALPN; both answer through
//! [`UpstreamBody`].

use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, Waker, ready};
use std::time::{Duration, Instant};

use bytes::{Buf, Bytes, BytesMut};
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Method, Response, StatusCode, Version};
use http_body::{Body as HttpBody, Frame, SizeHint};
use hyper::body::Incoming;
use tokio::io::{AsyncWriteExt, Interest};
use tokio::net::TcpStream;

use crate::BoxError;

/// An answer head larger than this is refused.
const MAX_HEAD: usize = 64 * 1024;
/// Header lines an answer head may have.
const MAX_HEADERS: usize = 128;
/// A chunk-size or trailer line longer than this is refused.
const MAX_LINE: usize = 4096;
/// What one read asks the kernel for, at least.
const READ_SIZE: usize = 16 * 1024;
/// A request body up to this size is written in the head's buffer (one
/// write); a larger one follows in a write of its own.
const INLINE_BODY: usize = 64 * 1024;

/// Why a request got no answer head.
#[derive(Debug)]
pub enum SendError {
    /// No connection could be made: the request never left, so another
    /// upstream may be tried.
    Connect(std::io::Error),
    /// The connection failed after the request may have been sent.
    Io(std::io::Error),
    /// The upstream answered with something that is not HTTP/1.
    Protocol(&'static str),
    /// hyper-util's pooled (TLS) client failed after connecting.
    Pooled(hyper_util::client::legacy::Error),
}

impl std::fmt::Display for SendError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            SendError::Connect(e) => write!(f, "connect: {e}"),
            SendError::Io(e) => write!(f, "{e}"),
            SendError::Protocol(what) => write!(f, "{what}"),
            SendError::Pooled(e) => write!(f, "{e}"),
        }
    }
}

/// An upstream's answer body, from either client.
pub enum UpstreamBody {
    /// Read from the connection by whoever polls it.
    Own(H1Body),
    /// Delivered by hyper's connection task.
    Hyper(Incoming),
}

impl UpstreamBody {
    /// True when the body is handed over by another task, which may have
    /// read more than it has delivered yet (see `MeteredBody::poll_frame`).
    pub fn delivered_by_a_task(&self) -> bool {
        matches!(self, UpstreamBody::Hyper(_))
    }
}

impl HttpBody for UpstreamBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        match self.get_mut() {
            UpstreamBody::Own(b) => Pin::new(b).poll_frame(cx),
            UpstreamBody::Hyper(b) => Pin::new(b)
                .poll_frame(cx)
                .map(|f| f.map(|r| r.map_err(BoxError::from))),
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            UpstreamBody::Own(b) => b.is_end_stream(),
            UpstreamBody::Hyper(b) => b.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            UpstreamBody::Own(b) => b.size_hint(),
            UpstreamBody::Hyper(b) => b.size_hint(),
        }
    }
}

/// One open connection and what was read from it but not yet consumed.
struct Conn {
    io: TcpStream,
    buf: BytesMut,
}

impl Conn {
    /// Reads what the kernel has into `buf`; `Ok(0)` at the end.
    fn poll_fill(&mut self, cx: &mut Context<'_>) -> Poll<std::io::Result<usize>> {
        loop {
            ready!(self.io.poll_read_ready(cx))?;
            if self.buf.capacity() - self.buf.len() < READ_SIZE / 4 {
                self.buf.reserve(READ_SIZE);
            }
            let Conn { io, buf } = self;
            let room = buf.capacity() - buf.len();
            let mut got = None;
            // A read shorter than the room left drained the socket: with
            // edge-triggered readiness (epoll, kqueue) no more can come
            // without a new event, so readiness is cleared here, as
            // tokio's own `poll_read` does. Without it, `still_open`
            // would find the socket "readable" at the next checkout and
            // probe it with a system call that can only say would-block.
            let r = io.try_io(Interest::READABLE, || {
                let n = io.try_read_buf(buf)?;
                got = Some(n);
                if n > 0 && n < room {
                    Err(std::io::ErrorKind::WouldBlock.into())
                } else {
                    Ok(n)
                }
            });
            match (r, got) {
                (Ok(n), _) | (Err(_), Some(n)) => return Poll::Ready(Ok(n)),
                // Readiness is cleared by the would-block: poll again.
                (Err(e), None) if e.kind() == std::io::ErrorKind::WouldBlock => continue,
                (Err(e), None) => return Poll::Ready(Err(e)),
            }
        }
    }

    async fn fill(&mut self) -> std::io::Result<usize> {
        std::future::poll_fn(|cx| self.poll_fill(cx)).await
    }

    /// False when the upstream closed this idle connection (or sent
    /// something unasked). Costs a system call only when the socket has
    /// signalled something since it was last read dry.
    fn still_open(&mut self) -> bool {
        let mut cx = Context::from_waker(Waker::noop());
        match self.io.poll_read_ready(&mut cx) {
            Poll::Pending => true,
            Poll::Ready(Err(_)) => false,
            Poll::Ready(Ok(())) => {
                let mut probe = [0u8; 1];
                matches!(self.io.try_read(&mut probe),
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock)
            }
        }
    }

    async fn write_request(&mut self, head: &[u8], body: &[u8]) -> std::io::Result<()> {
        self.io.write_all(head).await?;
        if !body.is_empty() {
            self.io.write_all(body).await?;
        }
        Ok(())
    }
}

/// One idle connection and when it was last used.
struct Idle {
    conn: Conn,
    used: Instant,
}

struct Shared {
    /// `host:port` to connect to.
    addr: String,
    connect_timeout: Duration,
    /// A connection unused this long is closed rather than reused (the
    /// upstream may have dropped it).
    idle_timeout: Duration,
    /// At most this many connections are kept.
    max_idle: usize,
    /// Idle connections, oldest first.
    idle: Mutex<Vec<Idle>>,
}

impl Shared {
    /// The newest idle connection still open; stale ones are closed.
    fn checkout(&self) -> Option<Conn> {
        let mut idle = self.idle.lock().unwrap_or_else(|p| p.into_inner());
        let now = Instant::now();
        while let Some(mut c) = idle.pop() {
            if now.duration_since(c.used) <= self.idle_timeout && c.conn.still_open() {
                return Some(c.conn);
            }
        }
        None
    }

    /// Keeps a connection whose answer was read to its end.
    fn put_back(&self, conn: Conn) {
        let mut idle = self.idle.lock().unwrap_or_else(|p| p.into_inner());
        if idle.len() < self.max_idle {
            idle.push(Idle {
                conn,
                used: Instant::now(),
            });
        }
    }

    async fn connect(&self) -> Result<Conn, SendError> {
        let io = tokio::time::timeout(self.connect_timeout, TcpStream::connect(&self.addr))
            .await
            .map_err(|_| {
                SendError::Connect(std::io::Error::new(
                    std::io::ErrorKind::TimedOut,
                    "connect timed out",
                ))
            })?
            .map_err(SendError::Connect)?;
        let _ = io.set_nodelay(true);
        Ok(Conn {
            io,
            buf: BytesMut::new(),
        })
    }
}

/// Connections of one worker to one `http://host:port` upstream.
pub struct H1Pool {
    shared: Arc<Shared>,
}

/// What an upstream request is: the parts [`H1Pool::send`] writes.
pub struct Outgoing<'a> {
    pub method: &'a Method,
    /// Origin form: path and query.
    pub target: &'a str,
    pub host: &'a HeaderValue,
    /// The upstream's own key.
    pub auth: Option<&'a (HeaderName, HeaderValue)>,
    /// The client's headers: the allowlisted ones go (`headers::forwarded`).
    pub client: &'a HeaderMap,
    pub request_id: &'a HeaderValue,
    /// `anthropic-version` to send when the client sent none.
    pub anthropic_version: Option<&'static str>,
    pub body: &'a Bytes,
}

impl H1Pool {
    pub fn new(addr: String, connect_timeout: Duration, idle_timeout: Duration) -> H1Pool {
        H1Pool {
            shared: Arc::new(Shared {
                addr,
                connect_timeout,
                idle_timeout,
                max_idle: 1024,
                idle: Mutex::new(Vec::new()),
            }),
        }
    }

    /// Sends the request on an idle connection, or on a new one, and reads
    /// the answer head. A reused connection whose write fails (the
    /// upstream closed it meanwhile: the request cannot have arrived
    /// whole) is replaced by a new one, once. Once the request is written,
    /// nothing is sent again.
    pub async fn send(&self, out: Outgoing<'_>) -> Result<Response<UpstreamBody>, SendError> {
        let head = encode_head(&out);
        // A small body is in `head` already.
        let body: &[u8] = if out.body.len() <= INLINE_BODY {
            &[]
        } else {
            out.body
        };
        let head: &[u8] = &head;
        let reused = match self.shared.checkout() {
            Some(mut conn) => conn.write_request(head, body).await.is_ok().then_some(conn),
            None => None,
        };
        let mut conn = match reused {
            Some(conn) => conn,
            None => {
                let mut conn = self.shared.connect().await?;
                conn.write_request(head, body)
                    .await
                    .map_err(SendError::Io)?;
                conn
            }
        };
        let (parts, framing, keep_alive) = read_head(&mut conn, out.method).await?;
        let body = H1Body {
            conn: Some(conn),
            state: framing,
            keep_alive,
            pool: Arc::clone(&self.shared),
        };
        Ok(Response::from_parts(parts, UpstreamBody::Own(body)))
    }
}

/// The request line, the headers, the upstream's key, `Host` and
/// `Content-Length`; a small body is appended so that one write sends all.
fn encode_head(out: &Outgoing<'_>) -> Vec<u8> {
    let inline = out.body.len() <= INLINE_BODY;
    let mut buf = Vec::with_capacity(256 + if inline { out.body.len() } else { 0 });
    buf.extend_from_slice(out.method.as_str().as_bytes());
    buf.push(b' ');
    buf.extend_from_slice(out.target.as_bytes());
    buf.extend_from_slice(b" HTTP/1.1\r\nhost: ");
    buf.extend_from_slice(out.host.as_bytes());
    buf.extend_from_slice(b"\r\n");
    let mut line = |name: &HeaderName, value: &HeaderValue| {
        buf.extend_from_slice(name.as_str().as_bytes());
        buf.extend_from_slice(b": ");
        buf.extend_from_slice(value.as_bytes());
        buf.extend_from_slice(b"\r\n");
    };
    // The allowlisted client headers, written as they are: no header map
    // is built for the upstream.
    let mut has_version = false;
    for (name, value) in out.client {
        if super::headers::forwarded(name) && out.auth.is_none_or(|(n, _)| n != name) {
            has_version |= name.as_str() == "anthropic-version";
            line(name, value);
        }
    }
    if let (Some(version), false) = (out.anthropic_version, has_version) {
        line(
            &HeaderName::from_static("anthropic-version"),
            &HeaderValue::from_static(version),
        );
    }
    line(&super::headers::X_REQUEST_ID, out.request_id);
    if let Some((name, value)) = out.auth {
        line(name, value);
    }
    if !out.body.is_empty() || !matches!(*out.method, Method::GET | Method::HEAD) {
        buf.extend_from_slice(b"content-length: ");
        let mut digits = [0u8; 20];
        let n = super::write_u64(&mut digits, out.body.len() as u64);
        buf.extend_from_slice(&digits[..n]);
        buf.extend_from_slice(b"\r\n");
    }
    buf.extend_from_slice(b"\r\n");
    if inline {
        buf.extend_from_slice(out.body);
    }
    buf
}

/// How the answer's body is delimited, and where its reading stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// `Content-Length`: this many bytes to go.
    Length(u64),
    /// Chunked: a chunk-size line next.
    ChunkSize,
    /// Chunked: this many bytes of the current chunk to go.
    ChunkData(u64),
    /// Chunked: the CRLF after a chunk's data.
    ChunkEnd,
    /// Chunked: trailer lines until an empty one.
    Trailers,
    /// No length: the body ends when the upstream closes.
    UntilClose,
    /// Read to its end.
    Done,
}

/// Reads the answer head (skipping `1xx` interim answers): its parts, how
/// its body is delimited, and whether the connection may be reused after.
async fn read_head(
    conn: &mut Conn,
    method: &Method,
) -> Result<(http::response::Parts, State, bool), SendError> {
    loop {
        if !conn.buf.is_empty() {
            match parse_head(&mut conn.buf, method)? {
                Some(Parsed::Interim) => continue,
                Some(Parsed::Head(parts, state, keep_alive)) => {
                    return Ok((parts, state, keep_alive));
                }
                None if conn.buf.len() > MAX_HEAD => {
                    return Err(SendError::Protocol(
                        "the upstream's answer head is too large",
                    ));
                }
                None => {}
            }
        }
        match conn.fill().await {
            Ok(0) => {
                return Err(SendError::Io(std::io::Error::new(
                    std::io::ErrorKind::UnexpectedEof,
                    "the upstream closed the connection before answering",
                )));
            }
            Ok(_) => {}
            Err(e) => return Err(SendError::Io(e)),
        }
    }
}

enum Parsed {
    /// A `1xx` answer, consumed.
    Interim,
    Head(http::response::Parts, State, bool),
}

/// Parses the head at the start of `buf` (and takes it off); `None` if
/// incomplete.
fn parse_head(buf: &mut BytesMut, method: &Method) -> Result<Option<Parsed>, SendError> {
    // Most heads have a handful of lines: a small table first (clearing
    // and scanning the large one cost more than parsing the head), the
    // large one only when the small one overflows.
    match parse_head_in::<FEW_HEADERS>(buf, method) {
        Err(SendError::Protocol(TOO_MANY_HEADERS)) => parse_head_in::<MAX_HEADERS>(buf, method),
        r => r,
    }
}

/// Header lines a head is first parsed for.
const FEW_HEADERS: usize = 24;
const TOO_MANY_HEADERS: &str = "the upstream's answer has too many headers";

fn parse_head_in<const N: usize>(
    buf: &mut BytesMut,
    method: &Method,
) -> Result<Option<Parsed>, SendError> {
    let mut slots = [httparse::EMPTY_HEADER; N];
    let mut res = httparse::Response::new(&mut slots);
    let len = match res.parse(buf) {
        Ok(httparse::Status::Complete(len)) => len,
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(httparse::Error::TooManyHeaders) => return Err(SendError::Protocol(TOO_MANY_HEADERS)),
        Err(_) => {
            return Err(SendError::Protocol(
                "the upstream's answer head is malformed",
            ));
        }
    };
    let code = res.code.unwrap_or(0);
    let status = StatusCode::from_u16(code)
        .map_err(|_| SendError::Protocol("the upstream's answer status is invalid"))?;
    if status == StatusCode::SWITCHING_PROTOCOLS {
        return Err(SendError::Protocol("the upstream switched protocols"));
    }
    if status.is_informational() {
        buf.advance(len);
        return Ok(Some(Parsed::Interim));
    }
    let version = if res.version == Some(0) {
        Version::HTTP_10
    } else {
        Version::HTTP_11
    };
    // Where each name and value lies in the head, so that values can share
    // its bytes instead of being copied.
    let base = buf.as_ptr() as usize;
    let mut spans = [(0usize, 0usize, 0usize, 0usize); N];
    let count = res.headers.len();
    for (span, h) in spans.iter_mut().zip(res.headers.iter()) {
        let n = h.name.as_ptr() as usize - base;
        let v = h.value.as_ptr() as usize - base;
        *span = (n, n + h.name.len(), v, v + h.value.len());
    }
    let head = buf.split_to(len).freeze();
    let mut headers = HeaderMap::with_capacity(count);
    for &(n0, n1, v0, v1) in &spans[..count] {
        let name = HeaderName::from_bytes(&head[n0..n1])
            .map_err(|_| SendError::Protocol("the upstream sent an invalid header name"))?;
        let value = HeaderValue::from_maybe_shared(head.slice(v0..v1))
            .map_err(|_| SendError::Protocol("the upstream sent an invalid header value"))?;
        headers.append(name, value);
    }
    let (state, delimited) = framing(&headers, status, method)?;
    let keep_alive = delimited
        && version == Version::HTTP_11
        && !has_token(&headers, header::CONNECTION, "close");
    let mut parts = Response::new(()).into_parts().0;
    parts.status = status;
    parts.version = version;
    parts.headers = headers;
    Ok(Some(Parsed::Head(parts, state, keep_alive)))
}

/// How the body is delimited (RFC 9112 §6.3), and whether its end is known
/// without the connection closing.
fn framing(
    headers: &HeaderMap,
    status: StatusCode,
    method: &Method,
) -> Result<(State, bool), SendError> {
    if *method == Method::HEAD
        || status == StatusCode::NO_CONTENT
        || status == StatusCode::NOT_MODIFIED
    {
        return Ok((State::Done, true));
    }
    if headers.contains_key(header::TRANSFER_ENCODING) {
        // Chunked only as the last coding; with a length beside it, the
        // connection is not reused (a smuggling sign).
        let chunked = headers
            .get_all(header::TRANSFER_ENCODING)
            .iter()
            .next_back()
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.rsplit(',').next())
            .is_some_and(|last| last.trim().eq_ignore_ascii_case("chunked"));
        let clean = !headers.contains_key(header::CONTENT_LENGTH);
        return Ok(if chunked {
            (State::ChunkSize, clean)
        } else {
            (State::UntilClose, false)
        });
    }
    let mut length = None;
    for v in headers.get_all(header::CONTENT_LENGTH) {
        for part in v.as_bytes().split(|&b| b == b',') {
            let n = parse_decimal(trim(part)).ok_or(SendError::Protocol(
                "the upstream sent an invalid content-length",
            ))?;
            if length.is_some_and(|l| l != n) {
                return Err(SendError::Protocol("the upstream sent two content-lengths"));
            }
            length = Some(n);
        }
    }
    Ok(match length {
        Some(n) => (State::Length(n), true),
        None => (State::UntilClose, false),
    })
}

fn trim(b: &[u8]) -> &[u8] {
    let start = b
        .iter()
        .position(|c| !c.is_ascii_whitespace())
        .unwrap_or(b.len());
    let end = b
        .iter()
        .rposition(|c| !c.is_ascii_whitespace())
        .map_or(start, |e| e + 1);
    &b[start..end]
}

fn parse_decimal(b: &[u8]) -> Option<u64> {
    if b.is_empty() || b.len() > 19 {
        return None;
    }
    b.iter().try_fold(0u64, |acc, &c| {
        c.is_ascii_digit().then(|| acc * 10 + u64::from(c - b'0'))
    })
}

/// The size of a chunk-size line (`1a;ext=x`), extensions ignored.
fn parse_chunk_size(line: &[u8]) -> Option<u64> {
    let size = line.split(|&b| b == b';').next().map(trim)?;
    if size.is_empty() || size.len() > 15 {
        return None;
    }
    size.iter().try_fold(0u64, |acc, &c| {
        let d = (c as char).to_digit(16)?;
        Some(acc * 16 + u64::from(d))
    })
}

fn has_token(headers: &HeaderMap, name: HeaderName, token: &str) -> bool {
    headers.get_all(name).iter().any(|v| {
        v.to_str()
            .is_ok_and(|v| v.split(',').any(|t| t.trim().eq_ignore_ascii_case(token)))
    })
}

/// Where the first CRLF starts. `memchr` for the LF, then a look back:
/// `memmem::find` builds a searcher on every call, once per chunk here.
fn crlf(buf: &[u8]) -> Option<usize> {
    memchr::memchr_iter(b'\n', buf).find_map(|i| (i > 0 && buf[i - 1] == b'\r').then(|| i - 1))
}

/// One step of reading a body out of `buf`.
#[derive(Debug, PartialEq, Eq)]
enum Decoded {
    /// The next bytes of the body.
    Data(Bytes),
    /// The body ended (the state is `Done`).
    End,
    /// More bytes must be read first.
    More,
    /// The framing is broken.
    Invalid(&'static str),
}

/// Takes what it can of the body out of `buf`: a chunk's data, the body's
/// end, or nothing until more is read. Pure, so that the fuzz target and
/// the tests drive it with any split of the bytes.
fn decode(state: &mut State, buf: &mut BytesMut) -> Decoded {
    loop {
        match *state {
            State::Done | State::Length(0) => {
                *state = State::Done;
                return Decoded::End;
            }
            State::Length(left) if !buf.is_empty() => {
                let n = buf.len().min(usize::try_from(left).unwrap_or(usize::MAX));
                *state = State::Length(left - n as u64);
                return Decoded::Data(buf.split_to(n).freeze());
            }
            State::ChunkData(left) if !buf.is_empty() => {
                let n = buf.len().min(usize::try_from(left).unwrap_or(usize::MAX));
                let left = left - n as u64;
                *state = if left == 0 {
                    State::ChunkEnd
                } else {
                    State::ChunkData(left)
                };
                return Decoded::Data(buf.split_to(n).freeze());
            }
            State::UntilClose if !buf.is_empty() => {
                let n = buf.len();
                return Decoded::Data(buf.split_to(n).freeze());
            }
            State::ChunkSize => match crlf(buf) {
                Some(at) if at > MAX_LINE => {
                    return Decoded::Invalid("the upstream sent an invalid chunk size");
                }
                Some(at) => {
                    let Some(size) = parse_chunk_size(&buf[..at]) else {
                        return Decoded::Invalid("the upstream sent an invalid chunk size");
                    };
                    buf.advance(at + 2);
                    *state = if size == 0 {
                        State::Trailers
                    } else {
                        State::ChunkData(size)
                    };
                }
                None if buf.len() > MAX_LINE => {
                    return Decoded::Invalid("the upstream sent an invalid chunk size");
                }
                None => return Decoded::More,
            },
            State::ChunkEnd if buf.len() >= 2 => {
                if &buf[..2] != b"\r\n" {
                    return Decoded::Invalid("the upstream's chunk did not end with CRLF");
                }
                buf.advance(2);
                *state = State::ChunkSize;
            }
            // Trailers are read and dropped: no upstream we proxy sends
            // them, and they would be hop-by-hop here.
            State::Trailers => match crlf(buf) {
                Some(at) if at > MAX_LINE => {
                    return Decoded::Invalid("the upstream sent an invalid trailer");
                }
                Some(at) => {
                    buf.advance(at + 2);
                    if at == 0 {
                        *state = State::Done;
                        return Decoded::End;
                    }
                }
                None if buf.len() > MAX_LINE => {
                    return Decoded::Invalid("the upstream sent an invalid trailer");
                }
                None => return Decoded::More,
            },
            State::Length(_) | State::ChunkData(_) | State::ChunkEnd | State::UntilClose => {
                return Decoded::More;
            }
        }
    }
}

/// The fuzz property of the answer reader (`fuzz/fuzz_targets/h1_answer.rs`):
/// byte 0 picks how the rest arrives (in pieces of 1 to 16 bytes) and the
/// method; the rest is what an upstream sent. Reading it never panics, and
/// whatever the pieces, the head, the body's bytes and how it ended are
/// the same as when it all arrives at once.
pub(crate) fn answer_property(data: &[u8]) {
    let [ctl, rest @ ..] = data else {
        return;
    };
    let step = usize::from(ctl & 0x0f) + 1;
    let method = if ctl & 0x10 == 0 {
        Method::POST
    } else {
        Method::HEAD
    };
    assert_eq!(
        read_all(rest, rest.len().max(1), &method),
        read_all(rest, step, &method)
    );
}

/// What [`answer_property`] compares: the head (status, keep-alive), the
/// body's bytes, and how reading stopped.
type ReadOutcome = (Option<(u16, bool)>, Vec<u8>, &'static str);

fn read_all(bytes: &[u8], step: usize, method: &Method) -> ReadOutcome {
    let mut buf = BytesMut::new();
    let mut fed = 0;
    let mut feed = |buf: &mut BytesMut| {
        let to = (fed + step).min(bytes.len());
        buf.extend_from_slice(&bytes[fed..to]);
        let more = to > fed;
        fed = to;
        more
    };
    let (head, mut state) = loop {
        match parse_head(&mut buf, method) {
            Ok(Some(Parsed::Interim)) => {}
            Ok(Some(Parsed::Head(parts, state, keep_alive))) => {
                break ((parts.status.as_u16(), keep_alive), state);
            }
            Ok(None) => {
                if !feed(&mut buf) {
                    return (None, Vec::new(), "head incomplete");
                }
            }
            Err(_) => return (None, Vec::new(), "head invalid"),
        }
    };
    let mut body = Vec::new();
    loop {
        match decode(&mut state, &mut buf) {
            Decoded::Data(d) => {
                assert!(!d.is_empty(), "no empty frames");
                body.extend_from_slice(&d);
            }
            Decoded::End => return (Some(head), body, "end"),
            Decoded::Invalid(why) => return (Some(head), body, why),
            Decoded::More => {
                if !feed(&mut buf) {
                    return (Some(head), body, "body incomplete");
                }
            }
        }
    }
}

/// An answer body read straight from its connection.
pub struct H1Body {
    /// `None` once the body ended (the connection went back or was closed).
    conn: Option<Conn>,
    state: State,
    keep_alive: bool,
    pool: Arc<Shared>,
}

impl H1Body {
    /// The end: the connection goes back to the pool if it can be reused.
    fn end(&mut self) {
        self.state = State::Done;
        if let Some(conn) = self.conn.take()
            && self.keep_alive
            && conn.buf.is_empty()
        {
            self.pool.put_back(conn);
        }
    }

    /// The end without reuse: the connection is closed.
    fn close(&mut self) {
        self.state = State::Done;
        self.conn = None;
    }

    fn fail(&mut self, why: &'static str) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        self.close();
        Poll::Ready(Some(Err(why.into())))
    }
}

impl Drop for H1Body {
    /// A body dropped before its end (the client went away, the gateway
    /// cut a stalled stream): the connection is reset rather than closed,
    /// so that the upstream stops at once, even one that waits on its own
    /// stream and would not notice a polite close.
    fn drop(&mut self) {
        if let Some(conn) = self.conn.take() {
            let _ = socket2::SockRef::from(&conn.io).set_linger(Some(Duration::ZERO));
        }
    }
}

impl HttpBody for H1Body {
    type Data = Bytes;
    type Error = BoxError;

    /// A frame per chunk (or per read, for a length-delimited body), as
    /// soon as it is in: a chunk already read is handed on without a
    /// system call.
    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = &mut *self;
        loop {
            let Some(conn) = this.conn.as_mut() else {
                return Poll::Ready(None);
            };
            match decode(&mut this.state, &mut conn.buf) {
                Decoded::Data(data) => return Poll::Ready(Some(Ok(Frame::data(data)))),
                Decoded::End => {
                    this.end();
                    return Poll::Ready(None);
                }
                Decoded::Invalid(why) => return this.fail(why),
                Decoded::More => {}
            }
            match ready!(conn.poll_fill(cx)) {
                Ok(0) if this.state == State::UntilClose => {
                    this.close();
                    return Poll::Ready(None);
                }
                Ok(0) => {
                    return this.fail("the upstream closed the connection before the body ended");
                }
                Ok(_) => {}
                Err(e) => {
                    this.close();
                    return Poll::Ready(Some(Err(e.into())));
                }
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.state == State::Done || self.state == State::Length(0)
    }

    fn size_hint(&self) -> SizeHint {
        match self.state {
            State::Length(n) => SizeHint::with_exact(n),
            State::Done => SizeHint::with_exact(0),
            _ => SizeHint::default(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn crlf_finds_the_first_pair_only() {
        assert_eq!(crlf(b"1a\r\nxyz\r\n"), Some(2));
        assert_eq!(crlf(b"\n\r\n"), Some(1));
        assert_eq!(crlf(b"a\nb\rc\r\n"), Some(5));
        assert_eq!(crlf(b"\r"), None);
        assert_eq!(crlf(b"\n"), None);
        assert_eq!(crlf(b""), None);
    }

    #[test]
    fn chunk_sizes_parse_with_extensions_and_refuse_garbage() {
        assert_eq!(parse_chunk_size(b"1a"), Some(26));
        assert_eq!(parse_chunk_size(b"1A;name=value"), Some(26));
        assert_eq!(parse_chunk_size(b" 0 "), Some(0));
        assert_eq!(parse_chunk_size(b""), None);
        assert_eq!(parse_chunk_size(b"x1"), None);
        assert_eq!(parse_chunk_size(b"-1"), None);
        assert_eq!(parse_chunk_size(b"ffffffffffffffff"), None);
    }

    #[test]
    fn lengths_parse_strictly() {
        assert_eq!(parse_decimal(b"0"), Some(0));
        assert_eq!(parse_decimal(b"123"), Some(123));
        assert_eq!(parse_decimal(b"+1"), None);
        assert_eq!(parse_decimal(b"1 2"), None);
        assert_eq!(parse_decimal(b""), None);
        assert_eq!(parse_decimal(b"99999999999999999999"), None);
    }

    fn head(
        lines: &[(&str, &str)],
        status: u16,
        method: &Method,
    ) -> Result<(State, bool), SendError> {
        let mut h = HeaderMap::new();
        for (n, v) in lines {
            h.append(
                HeaderName::from_bytes(n.as_bytes()).unwrap(),
                HeaderValue::from_str(v).unwrap(),
            );
        }
        framing(&h, StatusCode::from_u16(status).unwrap(), method)
    }

    #[test]
    fn framing_follows_rfc_9112() {
        let post = Method::POST;
        assert_eq!(
            head(&[("content-length", "5")], 200, &post).unwrap(),
            (State::Length(5), true)
        );
        assert_eq!(
            head(&[("content-length", "5, 5")], 200, &post).unwrap(),
            (State::Length(5), true)
        );
        assert!(
            head(
                &[("content-length", "5"), ("content-length", "6")],
                200,
                &post
            )
            .is_err()
        );
        assert!(head(&[("content-length", "-5")], 200, &post).is_err());
        assert_eq!(
            head(&[("transfer-encoding", "chunked")], 200, &post).unwrap(),
            (State::ChunkSize, true)
        );
        assert_eq!(
            head(
                &[("transfer-encoding", "chunked"), ("content-length", "5")],
                200,
                &post
            )
            .unwrap(),
            (State::ChunkSize, false)
        );
        assert_eq!(
            head(&[("transfer-encoding", "gzip")], 200, &post).unwrap(),
            (State::UntilClose, false)
        );
        assert_eq!(head(&[], 200, &post).unwrap(), (State::UntilClose, false));
        assert_eq!(
            head(&[("content-length", "5")], 204, &post).unwrap(),
            (State::Done, true)
        );
        assert_eq!(
            head(&[("content-length", "5")], 200, &Method::HEAD).unwrap(),
            (State::Done, true)
        );
    }

    #[test]
    fn the_head_carries_host_key_and_length_once() {
        let mut h = HeaderMap::new();
        h.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        );
        h.insert(header::CONTENT_LENGTH, HeaderValue::from_static("999"));
        h.insert(
            header::AUTHORIZATION,
            HeaderValue::from_static("Bearer client"),
        );
        h.insert(header::HOST, HeaderValue::from_static("gateway"));
        h.insert("x-api-key", HeaderValue::from_static("client"));
        h.insert("openai-organization", HeaderValue::from_static("org-x"));
        h.insert("x-stainless-lang", HeaderValue::from_static("python"));
        let auth = (
            header::AUTHORIZATION,
            HeaderValue::from_static("Bearer upstream"),
        );
        let body = Bytes::from_static(b"{}");
        let out = Outgoing {
            method: &Method::POST,
            target: "/v1/chat/completions?x=1",
            host: &HeaderValue::from_static("127.0.0.1:9"),
            auth: Some(&auth),
            client: &h,
            request_id: &HeaderValue::from_static("req_1"),
            anthropic_version: Some("2023-06-01"),
            body: &body,
        };
        let text = String::from_utf8(encode_head(&out)).unwrap();
        // Only allowlisted client headers, the request id, the upstream's
        // key, the gateway's own framing.
        assert_eq!(
            text,
            "POST /v1/chat/completions?x=1 HTTP/1.1\r\nhost: 127.0.0.1:9\r\n\
             content-type: application/json\r\nx-stainless-lang: python\r\n\
             anthropic-version: 2023-06-01\r\nx-request-id: req_1\r\n\
             authorization: Bearer upstream\r\ncontent-length: 2\r\n\r\n{}"
        );
    }

    use http_body_util::BodyExt;
    use tokio::io::AsyncReadExt;
    use tokio::net::TcpListener;

    /// A raw upstream: for each connection it reads one request at a time
    /// (head and `content-length` body), records its exact bytes, and
    /// writes the next scripted answer as it is.
    async fn raw_upstream(
        answers: Vec<&'static [u8]>,
    ) -> (
        String,
        tokio::sync::mpsc::UnboundedReceiver<(usize, Vec<u8>)>,
    ) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        tokio::spawn(async move {
            let mut answers = answers.into_iter();
            let mut conn_no = 0;
            while let Ok((mut s, _)) = listener.accept().await {
                conn_no += 1;
                let mut buf = Vec::new();
                loop {
                    // One request: the head, then its body.
                    let end = loop {
                        if let Some(at) = memchr::memmem::find(&buf, b"\r\n\r\n") {
                            break at + 4;
                        }
                        let mut chunk = [0u8; 4096];
                        match s.read(&mut chunk).await {
                            Ok(0) | Err(_) => break 0,
                            Ok(n) => buf.extend_from_slice(&chunk[..n]),
                        }
                    };
                    if end == 0 {
                        break;
                    }
                    let head = String::from_utf8_lossy(&buf[..end]).to_lowercase();
                    let len: usize = head
                        .lines()
                        .find_map(|l| l.strip_prefix("content-length: "))
                        .map_or(0, |v| v.trim().parse().unwrap());
                    while buf.len() < end + len {
                        let mut chunk = [0u8; 4096];
                        let n = s.read(&mut chunk).await.unwrap();
                        buf.extend_from_slice(&chunk[..n]);
                    }
                    let request: Vec<u8> = buf.drain(..end + len).collect();
                    let _ = tx.send((conn_no, request));
                    let Some(answer) = answers.next() else { return };
                    s.write_all(answer).await.unwrap();
                    if memchr::memmem::find(answer, b"connection: close").is_some() {
                        break;
                    }
                }
            }
        });
        (addr, rx)
    }

    fn pool(addr: String) -> H1Pool {
        H1Pool::new(addr, Duration::from_secs(2), Duration::from_secs(30))
    }

    async fn call(
        pool: &H1Pool,
        body: &'static [u8],
    ) -> Result<(u16, HeaderMap, Vec<Bytes>), SendError> {
        let headers = HeaderMap::new();
        let body = Bytes::from_static(body);
        let res = pool
            .send(Outgoing {
                method: &Method::POST,
                target: "/v1/x",
                host: &HeaderValue::from_static("up"),
                auth: None,
                client: &headers,
                request_id: &HeaderValue::from_static("req_1"),
                anthropic_version: None,
                body: &body,
            })
            .await?;
        let status = res.status().as_u16();
        let (parts, mut body) = res.into_parts();
        let mut frames = Vec::new();
        while let Some(f) = body.frame().await {
            frames.push(
                f.map_err(|_| SendError::Protocol("body failed"))?
                    .into_data()
                    .unwrap(),
            );
        }
        Ok((status, parts.headers, frames))
    }

    #[tokio::test]
    async fn answers_of_every_framing_come_through_exactly_and_the_connection_is_reused() {
        let (addr, mut seen) = raw_upstream(vec![
            b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\ncontent-length: 5\r\nx-a: 1\r\n\r\nhello",
            b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n3;ext=1\r\nab\n\r\n2\r\nc\r\r\n0\r\nx-trailer: t\r\n\r\n",
            b"HTTP/1.1 204 No Content\r\n\r\n",
            b"HTTP/1.1 200 OK\r\nconnection: close\r\n\r\nuntil the end",
        ])
        .await;
        let pool = pool(addr);
        let (s, h, frames) = call(&pool, b"{\"a\":1}").await.unwrap();
        assert_eq!(
            (s, &h["x-a"], frames.concat()),
            (200, &HeaderValue::from_static("1"), b"hello".to_vec())
        );
        let (s, _, frames) = call(&pool, b"{}").await.unwrap();
        assert_eq!(s, 200);
        // One frame per chunk, the bytes as sent (CR and LF inside data kept).
        assert_eq!(
            frames,
            [Bytes::from_static(b"ab\n"), Bytes::from_static(b"c\r")]
        );
        let (s, _, frames) = call(&pool, b"").await.unwrap();
        assert_eq!((s, frames.len()), (204, 0));
        let (s, _, frames) = call(&pool, b"x").await.unwrap();
        assert_eq!((s, frames.concat()), (200, b"until the end".to_vec()));
        // Every request went exactly once, on one connection (the pool
        // reused it), with the body once and its length.
        let mut requests = Vec::new();
        while let Ok(r) = seen.try_recv() {
            requests.push(r);
        }
        assert_eq!(requests.len(), 4);
        assert!(requests.iter().all(|(conn, _)| *conn == 1), "{requests:?}");
        assert_eq!(
            String::from_utf8(requests[0].1.clone()).unwrap(),
            "POST /v1/x HTTP/1.1\r\nhost: up\r\nx-request-id: req_1\r\ncontent-length: 7\r\n\r\n{\"a\":1}"
        );
        assert!(String::from_utf8_lossy(&requests[2].1).ends_with("content-length: 0\r\n\r\n"));
    }

    #[tokio::test]
    async fn broken_answers_are_errors_and_the_connection_is_not_reused() {
        for (answer, head_fails) in [
            (&b"garbage\r\n\r\n"[..], true),
            (
                b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\ncontent-length: 6\r\n\r\nhello",
                true,
            ),
            (b"HTTP/1.1 200 OK\r\ncontent-length: x\r\n\r\n", true),
            (b"HTTP/1.1 101 Switching Protocols\r\n\r\n", true),
            (
                b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\nzz\r\n",
                false,
            ),
            (
                b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n2\r\nabc\r\n0\r\n\r\n",
                false,
            ),
        ] {
            let (addr, _seen) = raw_upstream(vec![answer]).await;
            let pool = pool(addr);
            let r = call(&pool, b"{}").await;
            if head_fails {
                assert!(matches!(r, Err(SendError::Protocol(_))), "{answer:?}");
            } else {
                assert!(r.is_err(), "{answer:?}");
            }
            assert!(pool.shared.idle.lock().unwrap().is_empty());
        }
    }

    #[tokio::test]
    async fn a_closed_idle_connection_is_not_used_and_nothing_is_sent_twice() {
        // The upstream answers once and closes: the next request must go on
        // a new connection, once.
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        let requests = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let counted = Arc::clone(&requests);
        tokio::spawn(async move {
            while let Ok((mut s, _)) = listener.accept().await {
                let counted = Arc::clone(&counted);
                tokio::spawn(async move {
                    let mut buf = [0u8; 4096];
                    if s.read(&mut buf).await.unwrap_or(0) > 0 {
                        counted.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                        let _ = s
                            .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")
                            .await;
                    }
                    // Closes without saying so.
                });
            }
        });
        let pool = pool(addr);
        assert_eq!(call(&pool, b"{}").await.unwrap().0, 200);
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert_eq!(call(&pool, b"{}").await.unwrap().0, 200);
        assert_eq!(requests.load(std::sync::atomic::Ordering::SeqCst), 2);
    }

    #[test]
    fn reading_in_pieces_equals_reading_at_once_on_mutated_answers() {
        let seeds: [&[u8]; 4] = [
            b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\nhello",
            b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n3;x=1\r\nab\n\r\n0\r\nt: 1\r\n\r\n",
            b"HTTP/1.0 200 OK\r\n\r\nuntil close",
            b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n1\r\na\r\n2\r\nbc\r\n0\r\n\r\n",
        ];
        let mut x = 0x2545_F491_4F6C_DD1Du64;
        let mut rnd = |n: usize| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x % n as u64) as usize
        };
        for i in 0..4000 {
            let mut data = vec![rnd(256) as u8];
            data.extend_from_slice(seeds[i % seeds.len()]);
            for _ in 0..rnd(4) {
                if data.len() < 2 {
                    break;
                }
                let at = 1 + rnd(data.len() - 1);
                match rnd(4) {
                    0 => data[at] = rnd(256) as u8,
                    1 => data.truncate(at),
                    2 => data.splice(at..at, *b"\r\n").for_each(drop),
                    _ => data[at] = b"0123456789abcdef;\r\n"[rnd(19)],
                }
            }
            answer_property(&data);
        }
    }
}
