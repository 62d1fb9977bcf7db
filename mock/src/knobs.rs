//! What a request asks of the mock through `x-mock-*` headers, over the
//! server's options, and where a fault cuts its body.

use std::sync::atomic::Ordering;
use std::time::Duration;

use http::HeaderMap;

use crate::error::ApiError;
use crate::fault::{Fault, unpack_fault};
use crate::server::State;
use crate::{
    HEADER_CACHE_READ_TOKENS, HEADER_CACHE_WRITE_1H_TOKENS, HEADER_CACHE_WRITE_TOKENS,
    HEADER_CACHED_TOKENS, HEADER_CHUNK_DELAY_MS, HEADER_CHUNKS, HEADER_FAULT,
    HEADER_REASONING_TOKENS,
};

/// Largest `x-mock-chunks` accepted: answers are built in memory, and a
/// typo should not take the test machine down.
pub(crate) const MAX_HEADER_CHUNKS: usize = 1_000_000;

/// What a request asked for through `x-mock-*` headers, over the server's
/// options.
pub(crate) struct Knobs {
    /// Answer tokens wanted before any output bound.
    pub(crate) chunks: usize,
    /// Pause between streamed frames.
    pub(crate) delay: Duration,
    /// This request's fault: the header's, else the server's.
    pub(crate) fault: Option<Fault>,
    /// OpenAI cached prompt tokens to report.
    pub(crate) cached: u64,
    /// Reasoning (thinking) tokens to spend before the visible answer.
    pub(crate) reasoning: u64,
    /// Anthropic cache reads to report, out of the prompt.
    pub(crate) cache_read: u64,
    /// Anthropic cache writes to report, out of what the reads left.
    pub(crate) cache_write: u64,
    /// Of the cache writes, those with the 1-hour TTL.
    pub(crate) cache_write_1h: u64,
}

impl Knobs {
    pub(crate) fn read(headers: &HeaderMap, state: &State) -> Result<Knobs, ApiError> {
        let mut knobs = Knobs {
            chunks: state.opts.chunks,
            delay: state.opts.chunk_delay,
            fault: unpack_fault(state.fault.load(Ordering::Relaxed)),
            cached: 0,
            reasoning: 0,
            cache_read: 0,
            cache_write: 0,
            cache_write_1h: 0,
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
        if let Some(n) = header_number(headers, HEADER_CACHE_READ_TOKENS)? {
            knobs.cache_read = n;
        }
        if let Some(n) = header_number(headers, HEADER_CACHE_WRITE_TOKENS)? {
            knobs.cache_write = n;
        }
        if let Some(n) = header_number(headers, HEADER_CACHE_WRITE_1H_TOKENS)? {
            knobs.cache_write_1h = n;
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
    pub(crate) fn cut(&self) -> Option<Cut> {
        match self.fault {
            Some(Fault::ResetAfterChunks(after)) => Some(Cut {
                after,
                how: CutHow::Reset,
            }),
            Some(Fault::StallAfterChunks(after)) => Some(Cut {
                after,
                how: CutHow::Stall,
            }),
            Some(Fault::ErrorAfterChunks(after)) => Some(Cut {
                after,
                how: CutHow::Error,
            }),
            _ => None,
        }
    }

    pub(crate) fn no_usage(&self) -> bool {
        self.fault == Some(Fault::NoUsage)
    }
}

pub(crate) fn header_number(headers: &HeaderMap, name: &str) -> Result<Option<u64>, ApiError> {
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

/// Where a fault cuts a body, and how.
#[derive(Clone, Copy)]
pub(crate) struct Cut {
    /// Frames sent before the cut.
    pub(crate) after: usize,
    /// What happens there.
    pub(crate) how: CutHow,
}

#[derive(Clone, Copy, PartialEq, Eq)]
pub(crate) enum CutHow {
    /// The body fails: an incomplete chunked body, or `RST_STREAM`.
    Reset,
    /// The body hangs until the peer goes.
    Stall,
    /// A stream sends its provider's error event and ends cleanly.
    Error,
}
