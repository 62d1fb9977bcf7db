//! Every body the mock sends: a JSON answer (whole, or in two halves when a
//! fault cuts it) or a stream of SSE events produced one per poll, paced,
//! cut by faults, and counted (streams open, completed, cancelled; output
//! tokens produced).

use std::collections::VecDeque;
use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::task::{Context, Poll, ready};
use std::time::Duration;

use bytes::Bytes;
use http_body::{Frame, SizeHint};
use tokio::time::Sleep;

use crate::knobs::{Cut, CutHow, Knobs};
use crate::openai::ChunkScript;
use crate::server::State;

/// How long a reset waits for the chunks before it to reach the socket.
const RESET_GRACE: Duration = Duration::from_millis(10);

/// The frames of one body, produced in order.
pub(crate) enum Script {
    /// Frames built up front, each with the output tokens it carries.
    Events(VecDeque<(Bytes, u64)>),
    /// Chat and legacy completions chunks, built when sent.
    Chunks(ChunkScript),
}

impl Script {
    fn len(&self, sent: usize) -> usize {
        match self {
            Script::Events(frames) => sent + frames.len(),
            Script::Chunks(chunks) => chunks.len(),
        }
    }

    /// The frame at `index` (the next one) and the output tokens it carries.
    fn frame(&mut self, index: usize) -> (Bytes, u64) {
        match self {
            Script::Events(frames) => frames.pop_front().unwrap_or_default(),
            Script::Chunks(chunks) => (chunks.frame(index), chunks.tokens(index)),
        }
    }
}

/// What a streamed body reports to its server when it ends.
struct StreamTally {
    /// The server's counters.
    state: Arc<State>,
    /// Whose tokens these are, for [`crate::Served::by_model`].
    model: String,
    /// Output tokens in the frames handed over so far: work done, whether or
    /// not the peer read them.
    produced: u64,
}

/// Every body the mock sends. A streamed body counts itself in the server's
/// stream counters: open while alive, completed when its last frame is handed
/// over, cancelled when dropped before that; its output tokens go to the work
/// tally when it ends either way.
pub(crate) struct MockBody {
    /// What is left to send.
    script: Script,
    /// Frames handed over so far.
    sent: usize,
    /// Where a fault cuts this body.
    cut: Option<Cut>,
    /// The provider's mid-stream error event, sent by `CutHow::Error`.
    error_event: &'static [u8],
    /// Pause between frames.
    delay: Duration,
    /// The pause before the next frame, allocated once per body.
    sleep: Option<Pin<Box<Sleep>>>,
    /// The pause for the next frame has been started.
    armed: bool,
    /// Until this streamed body has been counted as finished; `None` for
    /// buffered bodies, whose work is counted when they are built.
    tally: Option<StreamTally>,
    /// A whole JSON answer: announce its length (`content-length`), as
    /// OpenAI does; streams go chunked.
    exact_size: bool,
    /// Nothing more will be sent.
    ended: bool,
}

impl MockBody {
    /// A JSON answer. A reset or stall splits it in two halves so it can
    /// break mid-way; an error event does not apply to a JSON answer.
    pub(crate) fn buffered(bytes: Bytes, cut: Option<Cut>) -> MockBody {
        let cut = cut.filter(|cut| cut.how != CutHow::Error);
        let frames = match cut {
            Some(_) => {
                let middle = bytes.len() / 2;
                VecDeque::from([(bytes.slice(..middle), 0), (bytes.slice(middle..), 0)])
            }
            None => VecDeque::from([(bytes, 0)]),
        };
        MockBody {
            script: Script::Events(frames),
            sent: 0,
            cut,
            error_event: b"",
            delay: Duration::ZERO,
            sleep: None,
            armed: false,
            tally: None,
            exact_size: cut.is_none(),
            ended: false,
        }
    }

    /// A streamed (SSE) answer, counted in the server's stream counters and
    /// its output tokens in the work tally under `model`.
    pub(crate) fn stream(
        script: Script,
        error_event: &'static [u8],
        knobs: &Knobs,
        state: &Arc<State>,
        model: String,
    ) -> MockBody {
        state.open_streams.fetch_add(1, Ordering::Relaxed);
        MockBody {
            script,
            sent: 0,
            cut: knobs.cut(),
            error_event,
            delay: knobs.delay,
            sleep: None,
            armed: false,
            tally: Some(StreamTally {
                state: Arc::clone(state),
                model,
                produced: 0,
            }),
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

    /// Leaves the open streams: `Some(true)` completed, `Some(false)`
    /// cancelled, `None` neither (a fault ended it).
    fn finish(&mut self, outcome: Option<bool>) {
        self.ended = true;
        if let Some(tally) = self.tally.take() {
            let state = &tally.state;
            state.open_streams.fetch_sub(1, Ordering::Relaxed);
            match outcome {
                Some(true) => state.streams_completed.fetch_add(1, Ordering::Relaxed),
                Some(false) => state.streams_cancelled.fetch_add(1, Ordering::Relaxed),
                None => 0,
            };
            state.served.output(&tally.model, tally.produced);
        }
    }

    fn count(&mut self, tokens: u64) {
        if let Some(tally) = &mut self.tally {
            tally.produced = tally.produced.saturating_add(tokens);
        }
    }
}

impl Drop for MockBody {
    fn drop(&mut self) {
        self.finish(Some(false));
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
            match cut.how {
                // Hang: never woken, until the peer goes and drops us.
                CutHow::Stall => return Poll::Pending,
                CutHow::Error => {
                    if this.sent > 0 && !this.delay.is_zero() {
                        ready!(this.pause(cx, this.delay));
                    }
                    this.finish(None);
                    let event = Bytes::from_static(this.error_event);
                    return Poll::Ready(Some(Ok(Frame::data(event))));
                }
                CutHow::Reset => {
                    // Let the connection write the chunks already handed over
                    // first, as a real upstream that dies mid-stream has sent
                    // them (h2 drops DATA still queued when the stream is reset).
                    ready!(this.pause(cx, this.delay.max(RESET_GRACE)));
                    this.finish(None);
                    return Poll::Ready(Some(Err(io::Error::new(
                        io::ErrorKind::ConnectionReset,
                        format!("mock fault: reset after {} chunks", cut.after),
                    ))));
                }
            }
        }
        if this.sent >= total {
            this.finish(Some(true));
            return Poll::Ready(None);
        }
        if this.sent > 0 && !this.delay.is_zero() {
            ready!(this.pause(cx, this.delay));
        }
        let (frame, tokens) = this.script.frame(this.sent);
        this.sent += 1;
        this.count(tokens);
        if this.sent == total {
            // Counted here: hyper may not poll again once `is_end_stream` says so.
            this.finish(Some(true));
        }
        Poll::Ready(Some(Ok(Frame::data(frame))))
    }

    fn is_end_stream(&self) -> bool {
        self.ended
    }

    fn size_hint(&self) -> SizeHint {
        match &self.script {
            Script::Events(frames) if self.exact_size => {
                let remaining: usize = frames.iter().map(|(bytes, _)| bytes.len()).sum();
                SizeHint::with_exact(u64::try_from(remaining).unwrap_or(u64::MAX))
            }
            _ => SizeHint::default(),
        }
    }
}
