//! `MeteredBody`: the upstream's body on its way to the client. Each frame
//! is handed on unchanged (the meter only reads it, except the withheld
//! usage event of a stream whose usage the gateway asked for), an upstream
//! silent for `stream_idle_timeout` is cut, and the request is settled
//! when the body ends, fails, is cut, or is dropped because the client
//! went away.

use std::collections::VecDeque;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body::{Body as HttpBody, Frame, SizeHint};
use http_body_util::BodyExt;
use tokio::time::Sleep;

use super::h1pool::UpstreamBody;
use super::settle::Settlement;
use super::spin::InFlight;
use crate::BoxError;
use crate::config::OnClientDisconnect;
use crate::meter::{Endpoint, Framing, Meter};

/// Scheduler turns a response body yields, with frames in hand, before it
/// hands them on (see `MeteredBody::poll_frame`).
const YIELDS: u8 = 3;

/// Frames a response body holds at most before handing them on (hyper
/// writes up to 16 buffers per flush).
const MAX_HELD_FRAMES: usize = 16;

pub struct MeteredBody {
    inner: Option<UpstreamBody>,
    meter: Meter,
    /// The meter may drop the injected usage event: the length changes.
    withholds: bool,
    settlement: Option<Settlement>,
    finished: bool,
    /// Frames already received from the upstream, not yet handed on.
    ready: VecDeque<Bytes>,
    /// Scheduler turns yielded in a row, waiting for the upstream
    /// connection to deliver what it has already read (see `poll_frame`).
    yields: u8,
    /// Handing `ready` on, back to back.
    draining: bool,
    /// The turn before an upstream error was given (see `poll_frame`).
    flushed: bool,
    /// What ends the stream (or trailers), met while frames were queued:
    /// handed on after them.
    tail: Option<Tail>,
    /// The upstream is cut after this long without a frame.
    idle_timeout: Duration,
    /// When the last frame arrived (or the body started).
    last_frame: Instant,
    /// Armed the first time the upstream makes us wait; re-armed from
    /// `last_frame` only when it fires, so frames cost no timer update.
    idle: Option<Pin<Box<Sleep>>>,
    /// The request on its worker's spinner (see [`super::spin`]): each
    /// frame is an event, the end releases it.
    in_flight: Option<InFlight>,
}

enum Tail {
    End,
    Error(BoxError),
    Trailers(Frame<Bytes>),
}

impl MeteredBody {
    pub fn new(
        inner: UpstreamBody,
        meter: Meter,
        withholds: bool,
        settlement: Settlement,
        idle_timeout: Duration,
    ) -> MeteredBody {
        MeteredBody {
            inner: Some(inner),
            meter,
            withholds,
            settlement: Some(settlement),
            finished: false,
            ready: VecDeque::new(),
            yields: 0,
            draining: false,
            flushed: false,
            tail: None,
            idle_timeout,
            last_frame: Instant::now(),
            idle: None,
            in_flight: None,
        }
    }

    /// Tells the worker's spinner about this body's frames and its end.
    pub fn spinning(mut self, in_flight: Option<InFlight>) -> MeteredBody {
        self.in_flight = in_flight;
        self
    }

    fn settle(&mut self) {
        if let Some(mut s) = self.settlement.take() {
            let delivered = self.meter.delivered_completion_estimate();
            match self.meter.usage() {
                // An Anthropic stream cut or errored before its final
                // usage: input and cache tokens as reported, output as
                // delivered, marked estimated.
                Some(u) if self.meter.usage_incomplete() => s.finish_incomplete(u, delivered),
                usage => s.finish(usage, delivered),
            }
        }
    }

    /// True when the upstream has been silent for `idle_timeout`; otherwise
    /// the timer is (re-)armed and will wake the task.
    fn idle_expired(&mut self, cx: &mut Context<'_>) -> bool {
        let deadline = tokio::time::Instant::from_std(self.last_frame + self.idle_timeout);
        let sleep = self
            .idle
            .get_or_insert_with(|| Box::pin(tokio::time::sleep_until(deadline)));
        if sleep.deadline() != deadline {
            sleep.as_mut().reset(deadline);
        }
        sleep.as_mut().poll(cx).is_ready()
    }
}

impl HttpBody for MeteredBody {
    type Data = Bytes;
    type Error = BoxError;

    /// Frames go on as they arrive, never waiting for the upstream network.
    /// One refinement: hyper's client hands a response's chunks over one at
    /// a time, through its connection task, even when it read a whole burst
    /// of them in one `recv`; handed on one by one, each would cost its own
    /// write to the client (and on loopback, its own wake-up of the client):
    /// measured with strace, 21 writes per 16-token stream read in 1 recv.
    /// So when the upstream body has nothing new *ready* while we hold
    /// frames, we yield a few scheduler turns (`YIELDS`, no timer) to let
    /// the connection task deliver what it has already read, then hand
    /// everything on back to back (at most `MAX_HELD_FRAMES`), which hyper
    /// writes in one flush. The bytes are exactly the same; a real token
    /// stream, whose tokens arrive apart, goes on frame by frame.
    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = &mut *self;
        loop {
            if this.finished {
                return Poll::Ready(None);
            }
            if this.draining {
                if let Some(b) = this.ready.pop_front() {
                    return Poll::Ready(Some(Ok(Frame::data(b))));
                }
                this.draining = false;
            }
            let Some(inner) = this.inner.as_mut().filter(|_| this.tail.is_none()) else {
                // The upstream is done: queued frames first, then the end.
                if !this.ready.is_empty() {
                    this.draining = true;
                    continue;
                }
                return match this.tail.take() {
                    Some(Tail::Trailers(frame)) => Poll::Ready(Some(Ok(frame))),
                    Some(Tail::Error(e)) if !this.flushed => {
                        // hyper drops what it has not flushed yet (the head
                        // and the frames just handed on) when a body fails:
                        // one turn first, so the client gets them.
                        this.flushed = true;
                        this.tail = Some(Tail::Error(e));
                        cx.waker().wake_by_ref();
                        Poll::Pending
                    }
                    Some(Tail::Error(e)) => {
                        this.finished = true;
                        Poll::Ready(Some(Err(e)))
                    }
                    Some(Tail::End) | None => {
                        this.finished = true;
                        Poll::Ready(None)
                    }
                };
            };
            match Pin::new(inner).poll_frame(cx) {
                Poll::Ready(Some(Ok(frame))) => match frame.into_data() {
                    Ok(data) => {
                        // One clock read per frame serves both.
                        let now = Instant::now();
                        this.last_frame = now;
                        if let Some(s) = this.settlement.as_mut()
                            && s.ttfb.is_none()
                        {
                            s.ttfb = Some(now.saturating_duration_since(s.started));
                        }
                        if let Some(g) = &this.in_flight {
                            g.poke();
                        }
                        let out = this.meter.on_frame(data);
                        if !out.is_empty() {
                            this.ready.push_back(out);
                        }
                        this.yields = 0;
                        // Never hold more than one write's worth.
                        if this.ready.len() >= MAX_HELD_FRAMES {
                            this.draining = true;
                        }
                    }
                    Err(frame) => this.tail = Some(Tail::Trailers(frame)),
                },
                Poll::Ready(Some(Err(e))) => {
                    this.inner = None;
                    this.tail = Some(Tail::Error(e));
                    this.settle();
                }
                Poll::Ready(None) => {
                    this.inner = None;
                    let rest = this.meter.finish();
                    if !rest.is_empty() {
                        this.ready.push_back(rest);
                    }
                    this.tail = Some(Tail::End);
                    this.settle();
                    this.in_flight = None;
                }
                Poll::Pending => {
                    if this.ready.is_empty() {
                        if this.idle_expired(cx) {
                            // A stalled upstream: cut it, settle what was
                            // delivered, free the slot.
                            tracing::warn!(
                                idle = ?this.idle_timeout,
                                "upstream sent nothing for stream_idle_timeout; cut"
                            );
                            this.inner = None;
                            this.tail = Some(Tail::Error(
                                "the upstream stopped sending (stream_idle_timeout)".into(),
                            ));
                            this.settle();
                            continue;
                        }
                        return Poll::Pending;
                    }
                    // Our own client's body has read all the kernel had:
                    // nothing more is on its way yet.
                    let direct = this
                        .inner
                        .as_ref()
                        .is_some_and(|b| !b.delivered_by_a_task());
                    if this.yields < YIELDS && !direct {
                        this.yields += 1;
                        cx.waker().wake_by_ref();
                        return Poll::Pending;
                    }
                    this.yields = 0;
                    this.draining = true;
                }
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.finished
    }

    fn size_hint(&self) -> SizeHint {
        match (&self.inner, self.withholds) {
            (Some(inner), false) => inner.size_hint(),
            _ => SizeHint::default(),
        }
    }
}

impl Drop for MeteredBody {
    fn drop(&mut self) {
        let Some(settlement) = self.settlement.as_ref() else {
            return;
        };
        // The client went away before the end.
        let billing = &settlement.live.config.billing;
        let drain = billing.on_client_disconnect == OnClientDisconnect::Drain;
        let timeout = billing.drain_timeout.0;
        if drain
            && let (Some(inner), Ok(rt)) =
                (self.inner.take(), tokio::runtime::Handle::try_current())
        {
            let settlement = self.settlement.take().expect("checked above");
            let meter = std::mem::replace(
                &mut self.meter,
                Meter::new(Endpoint::Other, Framing::Json, false),
            );
            let idle_timeout = self.idle_timeout;
            // Keep reading the upstream (bounded) to get its exact usage.
            rt.spawn(async move {
                let mut rest = MeteredBody::new(inner, meter, false, settlement, idle_timeout);
                let _ = tokio::time::timeout(timeout, async {
                    while let Some(frame) = rest.frame().await {
                        if frame.is_err() {
                            break;
                        }
                    }
                })
                .await;
                rest.settle();
            });
            return;
        }
        // Cancel: the upstream request is dropped with `inner`, at once.
        self.inner = None;
        self.settle();
    }
}
