//! The ways the mock misbehaves, their text form (the `x-mock-fault` header)
//! and their packed form (one atomic, so the hot path reads the server-wide
//! fault without a lock).

use std::fmt;
use std::str::FromStr;
use std::time::Duration;

/// A way for the upstream to misbehave. The text form (the `x-mock-fault`
/// header value) is `status:503`, `reset-after:3`, `stall`, `stall-after:2`,
/// `slow-first-byte:500` (milliseconds), `garbage`, `no-usage` or
/// `error-after:4`.
///
/// "Chunks" are SSE events for a streamed answer. A non-streamed answer is
/// sent as two halves of its JSON, so `reset-after:1` / `stall-after:1` cut it
/// in the middle and `…:0` before its first byte. A cut past the end of the
/// answer never happens: the answer completes normally.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Fault {
    /// Answer this status with an error body in the route's provider shape
    /// (`retry-after: 1` on 429; 529 is Anthropic's `overloaded_error`).
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
    /// Send N chunks of a stream, then an error event (Anthropic's
    /// `event: error` with `overloaded_error`, OpenAI's `data: {"error":…}`)
    /// and end the body cleanly, as providers do when a model overloads
    /// mid-answer. Non-streamed answers complete normally.
    ErrorAfterChunks(usize),
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
            Fault::ErrorAfterChunks(n) => write!(f, "error-after:{n}"),
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
                "invalid fault {text:?}: expected status:N, reset-after:N, stall, stall-after:N, slow-first-byte:MS, garbage, no-usage or error-after:N"
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
            ("error-after", arg) => Ok(Fault::ErrorAfterChunks(count(arg)?)),
            _ => Err(bad()),
        }
    }
}
/// Fault kind in the top 8 bits, its argument (status, chunks or nanoseconds,
/// saturated) in the low 56; 0 is no fault.
const FAULT_ARG_BITS: u32 = 56;
const FAULT_ARG_MASK: u64 = (1 << FAULT_ARG_BITS) - 1;

pub(crate) fn pack_fault(fault: Option<&Fault>) -> u64 {
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
        Some(Fault::ErrorAfterChunks(n)) => (8, wide(*n)),
    };
    (kind << FAULT_ARG_BITS) | arg.min(FAULT_ARG_MASK)
}

pub(crate) fn unpack_fault(packed: u64) -> Option<Fault> {
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
        8 => Some(Fault::ErrorAfterChunks(count)),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn faults_round_trip_through_text_and_the_atomic() {
        let faults = [
            Fault::Status(503),
            Fault::Status(529),
            Fault::ResetAfterChunks(3),
            Fault::Stall,
            Fault::StallAfterChunks(2),
            Fault::SlowFirstByte(Duration::from_millis(500)),
            Fault::Garbage,
            Fault::NoUsage,
            Fault::ErrorAfterChunks(4),
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
            "error-after",
            "nope",
        ] {
            assert!(bad.parse::<Fault>().is_err(), "{bad:?}");
        }
    }
}
