//! Reading the usage out of an answer as it passes: SSE line by line, JSON
//! by its tail.

use std::sync::LazyLock;

use bytes::{Bytes, BytesMut};
use memchr::memmem::{Finder, FinderRev};
use serde::Deserialize;

use super::Endpoint;
use super::usage::{RawUsage, Usage, parse_anthropic_event, parse_event};

/// Which framing an upstream answer uses.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Framing {
    Sse,
    Json,
}

impl Framing {
    /// `text/event-stream` (any case, any parameters) is SSE; anything else,
    /// or no content type, is read as JSON.
    pub fn from_content_type(ct: Option<&str>) -> Framing {
        let essence = ct.and_then(|c| c.split(';').next()).unwrap_or("").trim();
        if essence.eq_ignore_ascii_case("text/event-stream") {
            Framing::Sse
        } else {
            Framing::Json
        }
    }
}

/// A partial SSE line is carried over between frames up to this length; a
/// longer line still flows to the client but is metered only through
/// [`UsageTail`] (a `response.completed` event repeats the whole answer, so
/// it can be long).
const LINE_CAP: usize = 256 * 1024;

/// An event longer than this is never withheld: the usage-only chunk is a
/// few hundred bytes, and holding more would delay the client.
const HOLD_CAP: usize = 64 * 1024;

/// Bytes kept after the last `"usage"` key. What follows the real usage
/// object in OpenAI's shapes (its own few fields, `user`, `metadata`) is
/// small; a capture that outgrows this was not the last one.
const TAIL_CAP: usize = 64 * 1024;

const USAGE_KEY: &[u8] = b"\"usage\"";

static USAGE_FIND: LazyLock<Finder<'static>> = LazyLock::new(|| Finder::new(USAGE_KEY));
static USAGE_RFIND: LazyLock<FinderRev<'static>> = LazyLock::new(|| FinderRev::new(USAGE_KEY));

/// Keys whose non-empty string value is delivered completion text.
static CHAT_CONTENT: LazyLock<[Finder<'static>; 4]> = LazyLock::new(|| {
    [
        Finder::new(b"\"content\""),
        Finder::new(b"\"arguments\""),
        Finder::new(b"\"reasoning_content\""),
        Finder::new(b"\"refusal\""),
    ]
});
static COMPLETION_CONTENT: LazyLock<[Finder<'static>; 1]> =
    LazyLock::new(|| [Finder::new(b"\"text\"")]);
static MESSAGES_CONTENT: LazyLock<[Finder<'static>; 3]> = LazyLock::new(|| {
    [
        Finder::new(b"\"text\""),
        Finder::new(b"\"partial_json\""),
        Finder::new(b"\"thinking\""),
    ]
});
static RESPONSES_CONTENT: LazyLock<[Finder<'static>; 1]> =
    LazyLock::new(|| [Finder::new(b"\"delta\"")]);

fn skip_ws(b: &[u8]) -> &[u8] {
    let n = b.iter().take_while(|c| c.is_ascii_whitespace()).count();
    &b[n..]
}

/// Whether `hay` has the key `finder` looks for, followed by `:` and a value
/// that `value` accepts.
fn key_followed_by(hay: &[u8], finder: &Finder<'_>, value: fn(&[u8]) -> bool) -> bool {
    let len = finder.needle().len();
    finder.find_iter(hay).any(|i| {
        skip_ws(&hay[i + len..])
            .strip_prefix(b":")
            .is_some_and(|rest| value(skip_ws(rest)))
    })
}

/// An event that may carry usage: a `"usage"` key whose value is an object
/// (`"usage":null` on every other chunk is skipped without a parse).
fn may_carry_usage(payload: &[u8]) -> bool {
    key_followed_by(payload, &USAGE_FIND, |v| v.first() == Some(&b'{'))
}

fn carries_content(endpoint: Endpoint, payload: &[u8]) -> bool {
    let finders: &[Finder<'static>] = match endpoint {
        Endpoint::Chat => &*CHAT_CONTENT,
        Endpoint::Completions => &*COMPLETION_CONTENT,
        Endpoint::Responses => &*RESPONSES_CONTENT,
        Endpoint::Messages => &*MESSAGES_CONTENT,
        _ => return false,
    };
    let non_empty = |v: &[u8]| v.len() >= 2 && v[0] == b'"' && v[1] != b'"';
    finders
        .iter()
        .any(|f| key_followed_by(payload, f, non_empty))
}

/// Finds the usage object without keeping the whole body: keeps the bytes
/// from the last `"usage"` key seen on (bounded by [`TAIL_CAP`]), and reads
/// the value that follows it at the end. Correct when the real usage is the
/// last `"usage"` key of the body, as in every OpenAI-shaped answer (text a
/// model writes sits inside JSON strings, where a quote is always escaped,
/// so it cannot form that key). Independent of how the bytes are split.
#[derive(Default)]
struct UsageTail {
    /// The bytes from the last `"usage"` key on, while `capturing`.
    buf: Vec<u8>,
    capturing: bool,
    /// The last bytes fed, to find a key split between two feeds.
    recent: [u8; 6],
    recent_len: usize,
}

impl UsageTail {
    fn feed(&mut self, data: &[u8]) {
        if data.is_empty() {
            return;
        }
        if let Some(p) = USAGE_RFIND.rfind(data) {
            self.buf.clear();
            self.buf.extend_from_slice(&data[p..]);
            self.capturing = true;
        } else if let Some(s) = self.straddle(data) {
            self.buf.clear();
            self.buf.extend_from_slice(&self.recent[s..self.recent_len]);
            self.buf.extend_from_slice(data);
            self.capturing = true;
        } else if self.capturing {
            self.buf.extend_from_slice(data);
        }
        if self.buf.len() > TAIL_CAP {
            self.buf.clear();
            self.capturing = false;
        }
        self.remember(data);
    }

    /// Where in `recent` a key starts that ends in `data`.
    fn straddle(&self, data: &[u8]) -> Option<usize> {
        let mut window = [0u8; 12];
        let head = data.len().min(USAGE_KEY.len() - 1);
        window[..self.recent_len].copy_from_slice(&self.recent[..self.recent_len]);
        window[self.recent_len..self.recent_len + head].copy_from_slice(&data[..head]);
        let window = &window[..self.recent_len + head];
        USAGE_FIND
            .find_iter(window)
            .filter(|&s| s < self.recent_len)
            .last()
    }

    fn remember(&mut self, data: &[u8]) {
        let keep = self.recent.len();
        if data.len() >= keep {
            self.recent.copy_from_slice(&data[data.len() - keep..]);
            self.recent_len = keep;
        } else {
            let mut joined = [0u8; 12];
            let n = self.recent_len + data.len();
            joined[..self.recent_len].copy_from_slice(&self.recent[..self.recent_len]);
            joined[self.recent_len..n].copy_from_slice(data);
            let from = n.saturating_sub(keep);
            self.recent_len = n - from;
            self.recent[..self.recent_len].copy_from_slice(&joined[from..n]);
        }
    }

    fn usage(&self) -> Option<Usage> {
        self.raw()?.into_usage()
    }

    fn raw(&self) -> Option<RawUsage> {
        if !self.capturing {
            return None;
        }
        let rest = self.buf.strip_prefix(USAGE_KEY)?;
        let rest = skip_ws(skip_ws(rest).strip_prefix(b":")?);
        let mut de = serde_json::Deserializer::from_slice(rest);
        // The usage object is followed by more of the body: no `end()`.
        Option::<RawUsage>::deserialize(&mut de).ok()?
    }

    fn reset(&mut self) {
        *self = UsageTail {
            buf: std::mem::take(&mut self.buf),
            ..UsageTail::default()
        };
        self.buf.clear();
    }
}

/// What one SSE line was.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Line {
    /// Empty: ends an event.
    Blank,
    /// The `data:` line of a usage-only chunk.
    UsageOnly,
    Other,
}

/// Reads the usage out of an upstream answer as it passes, frame by frame.
///
/// SSE is scanned line by line with `memchr`, check-then-parse: a line is
/// JSON-parsed only when it has a `"usage"` key with an object value. A
/// partial line is carried to the next frame (bounded by [`LINE_CAP`]); the
/// carry buffer is reused, so a frame that ends on a line boundary and has
/// no usage allocates nothing. `data: [DONE]` ends the metering. Lines end
/// with `\n` or `\r\n` (a lone `\r` is not a line end here). The result does
/// not depend on where frames split.
///
/// JSON bodies go through [`UsageTail`]: nothing but the bytes after the
/// last `"usage"` key is kept, so a 60 MB embeddings answer costs 64 KiB.
pub struct Meter {
    /// Which usage shape and which content keys to look for.
    endpoint: Endpoint,
    /// SSE events or one JSON body.
    framing: Framing,
    /// Remove the usage-only chunk from what the client receives.
    withhold: bool,
    /// Every byte the upstream sent, for records and metrics.
    bytes_seen: u64,
    /// The last usage seen (cumulative reports: the last one wins).
    usage: Option<Usage>,
    /// `data: [DONE]` was seen: nothing after it is metered.
    done: bool,
    /// The start of a line whose end has not arrived yet.
    line: Vec<u8>,
    /// The current line outgrew `LINE_CAP`; `Some(is a data line)`.
    overlong: Option<bool>,
    /// JSON bodies and overlong lines: the bytes after the last usage key.
    tail: UsageTail,
    /// Delivered data events that carried completion text.
    content_events: u64,
    /// Withholding: the bytes of the current event not yet given out.
    held: Vec<u8>,
    /// Withholding: bytes of the current event in earlier frames.
    event_len: usize,
    /// Withholding: the current event outgrew `HOLD_CAP` and flows as it comes.
    releasing: bool,
    /// The current event holds a usage-only chunk.
    event_usage_only: bool,
    /// Withholding: (end offset in the frame, usage-only) of the events that
    /// ended in the current frame. Reused between frames.
    ends: Vec<(usize, bool)>,
    /// `finish` ran.
    finished: bool,
    /// Anthropic: a `message_delta` reported the final, cumulative usage
    /// (until then, `message_start`'s output count is only an opening one).
    final_usage: bool,
    /// Anthropic: an `error` event came mid-stream (`overloaded_error`):
    /// the answer stopped short of its final usage.
    errored: bool,
}

impl Meter {
    /// A meter for an answer to `endpoint` framed as `framing`.
    /// `withhold_usage_event`: the gateway injected include_usage into a
    /// streamed chat/completions request, so the usage-only chunk (a `data:`
    /// event whose JSON has `"choices":[]` and a usage) is removed from what
    /// the client receives; every other byte is identical.
    pub fn new(endpoint: Endpoint, framing: Framing, withhold_usage_event: bool) -> Meter {
        Meter {
            endpoint,
            framing,
            withhold: withhold_usage_event && framing == Framing::Sse,
            bytes_seen: 0,
            usage: None,
            done: false,
            line: Vec::new(),
            overlong: None,
            tail: UsageTail::default(),
            content_events: 0,
            held: Vec::new(),
            event_len: 0,
            releasing: false,
            event_usage_only: false,
            ends: Vec::new(),
            finished: false,
            final_usage: false,
            errored: false,
        }
    }

    /// What the client must receive for this frame. Without withholding it
    /// is the same `Bytes` (a reference-count clone). With withholding, the
    /// bytes of an incomplete event are held until its blank line arrives,
    /// and the usage-only event is dropped; the result may be empty.
    pub fn on_frame(&mut self, frame: Bytes) -> Bytes {
        self.bytes_seen = self.bytes_seen.saturating_add(frame.len() as u64);
        match self.framing {
            Framing::Json => {
                self.tail.feed(&frame);
                frame
            }
            Framing::Sse if !self.withhold => {
                self.scan(&frame);
                frame
            }
            Framing::Sse => self.withhold_frame(frame),
        }
    }

    /// End of the answer: returns what was still held back, and meters a
    /// last line that had no line end.
    pub fn finish(&mut self) -> Bytes {
        if std::mem::replace(&mut self.finished, true) || self.framing == Framing::Json {
            return Bytes::new();
        }
        if let Some(is_data) = self.overlong.take() {
            self.end_overlong(is_data);
        } else if !self.line.is_empty() {
            let line = std::mem::take(&mut self.line);
            if self.on_line(&line) == Line::UsageOnly {
                self.event_usage_only = true;
            }
        }
        if !self.withhold {
            return Bytes::new();
        }
        let held = std::mem::take(&mut self.held);
        if self.event_usage_only && !self.releasing && self.event_len <= HOLD_CAP {
            return Bytes::new();
        }
        Bytes::from(held)
    }

    /// The usage the upstream reported, if it did.
    pub fn usage(&self) -> Option<Usage> {
        match self.framing {
            Framing::Sse => self.usage,
            Framing::Json => self.tail.usage(),
        }
    }

    /// When usage never arrives: an estimate of the completion tokens
    /// delivered so far, cheap to keep.
    ///
    /// SSE: one token per delivered data event whose text field (`content`,
    /// `arguments`, `reasoning_content`, `refusal` for chat; `text` for
    /// completions; `delta` for responses) is a non-empty string, found with
    /// `memmem`, without a JSON parse. OpenAI streams one token per chunk;
    /// an upstream that packs several is underestimated, which errs toward
    /// not billing what did not happen. JSON: a body is all or nothing, so
    /// `bytes_seen / 4` (text is about 4 bytes a token; the JSON around it
    /// makes this high) for chat, completions and responses, 0 otherwise.
    /// The caller clamps it to the reserved bound.
    pub fn delivered_completion_estimate(&self) -> u64 {
        match (self.framing, self.endpoint) {
            (Framing::Sse, _) => self.content_events,
            (
                Framing::Json,
                Endpoint::Chat | Endpoint::Completions | Endpoint::Responses | Endpoint::Messages,
            ) => self.bytes_seen / 4,
            (Framing::Json, _) => 0,
        }
    }

    /// Whether the reported usage is not the answer's final count: an
    /// Anthropic stream that ended (cut, or with an `error` event) before
    /// its `message_delta` usage, or after an `error` event. Its input and
    /// cache tokens are known from `message_start`, its output only from
    /// what was delivered: the settlement charges that, marked estimated.
    pub fn usage_incomplete(&self) -> bool {
        self.endpoint == Endpoint::Messages
            && self.framing == Framing::Sse
            && self.usage.is_some()
            && (self.errored || !self.final_usage)
    }

    /// Bytes the upstream sent so far.
    pub fn bytes_seen(&self) -> u64 {
        self.bytes_seen
    }

    /// Meters the lines of `frame`; in withhold mode, records in `ends`
    /// where events end.
    fn scan(&mut self, frame: &[u8]) {
        let mut pos = 0;
        while pos < frame.len() {
            let Some(i) = memchr::memchr(b'\n', &frame[pos..]) else {
                self.carry(&frame[pos..]);
                return;
            };
            let end = pos + i;
            let piece = &frame[pos..end];
            let kind = if let Some(is_data) = self.overlong.take() {
                self.tail.feed(piece);
                self.end_overlong(is_data);
                Line::Other
            } else if self.line.is_empty() {
                if piece.len() > LINE_CAP {
                    self.start_overlong(&[], piece);
                    let is_data = self.overlong.take().unwrap_or(false);
                    self.end_overlong(is_data);
                    Line::Other
                } else {
                    self.on_line(piece)
                }
            } else if self.line.len() + piece.len() > LINE_CAP {
                let line = std::mem::take(&mut self.line);
                self.start_overlong(&line, piece);
                self.line = line;
                self.line.clear();
                let is_data = self.overlong.take().unwrap_or(false);
                self.end_overlong(is_data);
                Line::Other
            } else {
                let mut line = std::mem::take(&mut self.line);
                line.extend_from_slice(piece);
                let kind = self.on_line(&line);
                line.clear();
                self.line = line;
                kind
            };
            match kind {
                Line::Blank => {
                    if self.withhold {
                        self.ends.push((end + 1, self.event_usage_only));
                    }
                    self.event_usage_only = false;
                }
                Line::UsageOnly => self.event_usage_only = true,
                Line::Other => {}
            }
            pos = end + 1;
        }
    }

    /// Keeps the start of a line whose end is in a later frame.
    fn carry(&mut self, rest: &[u8]) {
        if self.overlong.is_some() {
            self.tail.feed(rest);
        } else if self.line.len() + rest.len() > LINE_CAP {
            let line = std::mem::take(&mut self.line);
            self.start_overlong(&line, rest);
            self.line = line;
            self.line.clear();
        } else {
            self.line.extend_from_slice(rest);
        }
    }

    /// A line longer than `LINE_CAP` begins with `head` + `rest`: from now on
    /// its bytes go to the tail scanner only.
    fn start_overlong(&mut self, head: &[u8], rest: &[u8]) {
        let mut prefix = [0u8; 5];
        let n = head.len().min(5);
        prefix[..n].copy_from_slice(&head[..n]);
        let m = rest.len().min(5 - n);
        prefix[n..n + m].copy_from_slice(&rest[..m]);
        self.overlong = Some(&prefix[..n + m] == b"data:");
        self.tail.reset();
        self.tail.feed(head);
        self.tail.feed(rest);
    }

    fn end_overlong(&mut self, is_data: bool) {
        if is_data && !self.done {
            let usage = if self.endpoint == Endpoint::Messages {
                self.tail.raw().and_then(|r| r.merge_anthropic(self.usage))
            } else {
                self.tail.usage()
            };
            if let Some(u) = usage {
                self.usage = Some(u);
            }
            self.content_events += 1;
        }
        self.tail.reset();
    }

    /// Meters one complete line (without its `\n`).
    fn on_line(&mut self, line: &[u8]) -> Line {
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        if line.is_empty() {
            return Line::Blank;
        }
        if self.done {
            return Line::Other;
        }
        let Some(payload) = line.strip_prefix(b"data:") else {
            if self.endpoint == Endpoint::Messages
                && line.strip_prefix(b"event:").map(skip_ws) == Some(b"error")
            {
                self.errored = true;
            }
            return Line::Other;
        };
        let payload = payload.strip_prefix(b" ").unwrap_or(payload);
        if payload == b"[DONE]" {
            self.done = true;
            return Line::Other;
        }
        if carries_content(self.endpoint, payload) {
            self.content_events += 1;
        }
        if self.endpoint == Endpoint::Messages {
            if payload.starts_with(br#"{"type":"error""#) {
                self.errored = true;
            }
            if may_carry_usage(payload)
                && let Some((usage, last)) = parse_anthropic_event(self.usage, payload)
            {
                self.usage = Some(usage);
                self.final_usage |= last;
            }
            return Line::Other;
        }
        if may_carry_usage(payload) {
            if let Some((usage, usage_only)) = parse_event(self.endpoint, self.usage, payload) {
                self.usage = Some(usage);
                if usage_only {
                    return Line::UsageOnly;
                }
            }
        }
        Line::Other
    }

    /// Withholding: gives out every complete event of `frame` but the
    /// usage-only one, holds the incomplete rest.
    fn withhold_frame(&mut self, frame: Bytes) -> Bytes {
        let mut ends = std::mem::take(&mut self.ends);
        ends.clear();
        self.ends = ends;
        self.scan(&frame);

        let mut out = BytesMut::new();
        // The run of `frame` given out since the last dropped event.
        let mut run_start = 0;
        // Where the current event starts in `frame`.
        let mut cursor = 0;
        for i in 0..self.ends.len() {
            let (end, usage_only) = self.ends[i];
            let len = self.event_len + (end - cursor);
            if usage_only && !self.releasing && len <= HOLD_CAP {
                out.extend_from_slice(&frame[run_start..cursor]);
                run_start = end;
            } else if !self.held.is_empty() {
                // Only the first event of a frame can have held bytes, so
                // nothing is in `out` yet and the run starts at 0.
                out.extend_from_slice(&self.held);
            }
            self.held.clear();
            self.event_len = 0;
            self.releasing = false;
            cursor = end;
        }
        let rest = &frame[cursor..];
        let emit_end = if self.releasing || self.event_len + rest.len() > HOLD_CAP {
            if !self.releasing {
                out.extend_from_slice(&frame[run_start..cursor]);
                out.extend_from_slice(&self.held);
                self.held.clear();
                run_start = cursor;
                self.releasing = true;
            }
            frame.len()
        } else {
            self.held.extend_from_slice(rest);
            cursor
        };
        self.event_len += rest.len();
        if out.is_empty() {
            frame.slice(run_start..emit_end)
        } else {
            out.extend_from_slice(&frame[run_start..emit_end]);
            out.freeze()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chunk(content: &str) -> String {
        format!(
            r#"data: {{"id":"chatcmpl-1","object":"chat.completion.chunk","created":1,"model":"gpt-4o-mini","choices":[{{"index":0,"delta":{{"content":{}}},"finish_reason":null}}],"usage":null}}"#,
            serde_json::to_string(content).unwrap()
        ) + "\n\n"
    }

    const USAGE_CHUNK: &str = "data: {\"id\":\"chatcmpl-1\",\"object\":\"chat.completion.chunk\",\"created\":1,\"model\":\"gpt-4o-mini\",\"choices\":[],\"usage\":{\"prompt_tokens\":19,\"completion_tokens\":10,\"total_tokens\":29,\"prompt_tokens_details\":{\"cached_tokens\":3},\"completion_tokens_details\":{\"reasoning_tokens\":2}}}\n\n";

    fn chat_stream() -> (String, String) {
        let mut head = chunk("");
        for t in ["Hello", "!", " How", " can", " I", " help", "?"] {
            head += &chunk(t);
        }
        head += "data: {\"id\":\"chatcmpl-1\",\"choices\":[{\"index\":0,\"delta\":{},\"finish_reason\":\"stop\"}],\"usage\":null}\n\n";
        let full = format!("{head}{USAGE_CHUNK}data: [DONE]\n\n");
        let withheld = format!("{head}data: [DONE]\n\n");
        (full, withheld)
    }

    const CHAT_USAGE: Usage = Usage {
        prompt_tokens: 19,
        cached_tokens: 3,
        cache_write_tokens: 0,
        cache_write_1h_tokens: 0,
        completion_tokens: 10,
        reasoning_tokens: 2,
    };

    /// Runs a whole stream through a meter in the given frames.
    fn run(
        endpoint: Endpoint,
        framing: Framing,
        withhold: bool,
        frames: &[&[u8]],
    ) -> (Vec<u8>, Meter) {
        let mut m = Meter::new(endpoint, framing, withhold);
        let mut out = Vec::new();
        for f in frames {
            out.extend_from_slice(&m.on_frame(Bytes::copy_from_slice(f)));
        }
        out.extend_from_slice(&m.finish());
        (out, m)
    }

    /// Every split of `stream` into two and three frames gives `want`.
    fn every_split(
        endpoint: Endpoint,
        framing: Framing,
        withhold: bool,
        stream: &[u8],
        want: &[u8],
        usage: Option<Usage>,
    ) {
        let (out, m) = run(endpoint, framing, withhold, &[stream]);
        assert_eq!(String::from_utf8_lossy(&out), String::from_utf8_lossy(want));
        assert_eq!(m.usage(), usage);
        let estimate = m.delivered_completion_estimate();
        for i in 0..=stream.len() {
            let (out, m) = run(endpoint, framing, withhold, &[&stream[..i], &stream[i..]]);
            assert_eq!(out, want, "split at {i}");
            assert_eq!(m.usage(), usage, "split at {i}");
            assert_eq!(m.delivered_completion_estimate(), estimate, "split at {i}");
        }
        for i in (0..stream.len()).step_by(13) {
            for j in (i..stream.len()).step_by(11) {
                let (out, m) = run(
                    endpoint,
                    framing,
                    withhold,
                    &[&stream[..i], &stream[i..j], &stream[j..]],
                );
                assert_eq!(out, want, "split at {i}, {j}");
                assert_eq!(m.usage(), usage, "split at {i}, {j}");
            }
        }
    }

    #[test]
    fn framing_from_content_type() {
        assert_eq!(
            Framing::from_content_type(Some("text/event-stream; charset=utf-8")),
            Framing::Sse
        );
        assert_eq!(
            Framing::from_content_type(Some("Text/Event-Stream")),
            Framing::Sse
        );
        assert_eq!(
            Framing::from_content_type(Some("application/json")),
            Framing::Json
        );
        assert_eq!(Framing::from_content_type(None), Framing::Json);
    }

    #[test]
    fn chat_stream_usage_at_every_split() {
        let (full, withheld) = chat_stream();
        every_split(
            Endpoint::Chat,
            Framing::Sse,
            false,
            full.as_bytes(),
            full.as_bytes(),
            Some(CHAT_USAGE),
        );
        every_split(
            Endpoint::Chat,
            Framing::Sse,
            true,
            full.as_bytes(),
            withheld.as_bytes(),
            Some(CHAT_USAGE),
        );
        let (_, m) = run(Endpoint::Chat, Framing::Sse, false, &[full.as_bytes()]);
        // Seven chunks carry text; the role chunk's "" does not.
        assert_eq!(m.delivered_completion_estimate(), 7);
        assert_eq!(m.bytes_seen(), full.len() as u64);
    }

    #[test]
    fn crlf_stream() {
        let (full, withheld) = chat_stream();
        let full = full.replace('\n', "\r\n");
        let withheld = withheld.replace('\n', "\r\n");
        every_split(
            Endpoint::Chat,
            Framing::Sse,
            false,
            full.as_bytes(),
            full.as_bytes(),
            Some(CHAT_USAGE),
        );
        every_split(
            Endpoint::Chat,
            Framing::Sse,
            true,
            full.as_bytes(),
            withheld.as_bytes(),
            Some(CHAT_USAGE),
        );
    }

    #[test]
    fn pass_through_returns_the_same_bytes() {
        let (full, _) = chat_stream();
        let frame = Bytes::from(full);
        let mut m = Meter::new(Endpoint::Chat, Framing::Sse, false);
        let out = m.on_frame(frame.clone());
        assert_eq!(out.as_ptr(), frame.as_ptr());
        assert_eq!(out.len(), frame.len());
        // Withholding a frame of whole events without usage: a slice, no copy.
        let mut m = Meter::new(Endpoint::Chat, Framing::Sse, true);
        let frame = Bytes::from(chunk("hi") + &chunk("there"));
        let out = m.on_frame(frame.clone());
        assert_eq!(out.as_ptr(), frame.as_ptr());
        assert_eq!(out.len(), frame.len());
    }

    #[test]
    fn withholding_drops_only_the_usage_only_event() {
        // Usage on a chunk that also has choices is metered, not dropped.
        let with_choices = "data: {\"choices\":[{\"index\":0,\"delta\":{\"content\":\"x\"}}],\"usage\":{\"prompt_tokens\":1,\"completion_tokens\":1}}\n\n";
        every_split(
            Endpoint::Chat,
            Framing::Sse,
            true,
            with_choices.as_bytes(),
            with_choices.as_bytes(),
            Some(Usage {
                prompt_tokens: 1,
                completion_tokens: 1,
                ..Usage::default()
            }),
        );
        // A comment and an event: line in the usage event go with it.
        let stream = format!(
            ": keep-alive\n\n{}event: chunk\n{USAGE_CHUNK}data: [DONE]\n\n",
            chunk("a")
        );
        let want = format!(": keep-alive\n\n{}data: [DONE]\n\n", chunk("a"));
        every_split(
            Endpoint::Chat,
            Framing::Sse,
            true,
            stream.as_bytes(),
            want.as_bytes(),
            Some(CHAT_USAGE),
        );
        // The stream ends right after the usage line, without its blank line.
        let cut = format!("{}{}", chunk("a"), USAGE_CHUNK.trim_end());
        every_split(
            Endpoint::Chat,
            Framing::Sse,
            true,
            cut.as_bytes(),
            chunk("a").as_bytes(),
            Some(CHAT_USAGE),
        );
    }

    #[test]
    fn completions_stream() {
        let stream = "data: {\"id\":\"cmpl-1\",\"object\":\"text_completion\",\"choices\":[{\"text\":\" test\",\"index\":0,\"finish_reason\":null}],\"model\":\"gpt-3.5-turbo-instruct\"}\n\n\
                      data: {\"id\":\"cmpl-1\",\"object\":\"text_completion\",\"choices\":[],\"model\":\"gpt-3.5-turbo-instruct\",\"usage\":{\"prompt_tokens\":5,\"completion_tokens\":1,\"total_tokens\":6}}\n\n\
                      data: [DONE]\n\n";
        let usage = Some(Usage {
            prompt_tokens: 5,
            completion_tokens: 1,
            ..Usage::default()
        });
        every_split(
            Endpoint::Completions,
            Framing::Sse,
            false,
            stream.as_bytes(),
            stream.as_bytes(),
            usage,
        );
        let (_, m) = run(
            Endpoint::Completions,
            Framing::Sse,
            false,
            &[stream.as_bytes()],
        );
        assert_eq!(m.delivered_completion_estimate(), 1);
    }

    const RESPONSES_STREAM: &str = "event: response.created\n\
data: {\"type\":\"response.created\",\"sequence_number\":0,\"response\":{\"id\":\"resp_1\",\"object\":\"response\",\"status\":\"in_progress\",\"output\":[],\"usage\":null}}\n\n\
event: response.output_text.delta\n\
data: {\"type\":\"response.output_text.delta\",\"sequence_number\":1,\"item_id\":\"msg_1\",\"output_index\":0,\"content_index\":0,\"delta\":\"Hi\"}\n\n\
event: response.output_text.delta\n\
data: {\"type\":\"response.output_text.delta\",\"sequence_number\":2,\"item_id\":\"msg_1\",\"output_index\":0,\"content_index\":0,\"delta\":\" there\"}\n\n\
event: response.completed\n\
data: {\"type\":\"response.completed\",\"sequence_number\":3,\"response\":{\"id\":\"resp_1\",\"object\":\"response\",\"status\":\"completed\",\"output\":[{\"type\":\"message\",\"content\":[{\"type\":\"output_text\",\"text\":\"Hi there\"}]}],\"usage\":{\"input_tokens\":37,\"input_tokens_details\":{\"cached_tokens\":40},\"output_tokens\":11,\"output_tokens_details\":{\"reasoning_tokens\":4},\"total_tokens\":48},\"user\":null,\"metadata\":{}}}\n\n";

    #[test]
    fn responses_stream() {
        // cached is clamped to the prompt.
        let usage = Some(Usage {
            prompt_tokens: 37,
            cached_tokens: 37,
            cache_write_tokens: 0,
            cache_write_1h_tokens: 0,
            completion_tokens: 11,
            reasoning_tokens: 4,
        });
        every_split(
            Endpoint::Responses,
            Framing::Sse,
            false,
            RESPONSES_STREAM.as_bytes(),
            RESPONSES_STREAM.as_bytes(),
            usage,
        );
        // No choices: never withheld, even if asked.
        every_split(
            Endpoint::Responses,
            Framing::Sse,
            true,
            RESPONSES_STREAM.as_bytes(),
            RESPONSES_STREAM.as_bytes(),
            usage,
        );
        let (_, m) = run(
            Endpoint::Responses,
            Framing::Sse,
            false,
            &[RESPONSES_STREAM.as_bytes()],
        );
        assert_eq!(m.delivered_completion_estimate(), 2);
    }

    #[test]
    fn json_bodies() {
        let chat = r#"{
  "id": "chatcmpl-123", "object": "chat.completion", "model": "gpt-4o-mini",
  "choices": [{"index": 0, "message": {"role": "assistant", "content": "The word \"usage\": {\"prompt_tokens\": 1} is quoted"}, "finish_reason": "stop"}],
  "usage": {"prompt_tokens": 9, "completion_tokens": 12, "total_tokens": 21,
    "prompt_tokens_details": {"cached_tokens": 2, "audio_tokens": 0},
    "completion_tokens_details": {"reasoning_tokens": 3}},
  "service_tier": "default", "system_fingerprint": "fp_1"
}"#;
        let usage = Some(Usage {
            prompt_tokens: 9,
            cached_tokens: 2,
            cache_write_tokens: 0,
            cache_write_1h_tokens: 0,
            completion_tokens: 12,
            reasoning_tokens: 3,
        });
        every_split(
            Endpoint::Chat,
            Framing::Json,
            false,
            chat.as_bytes(),
            chat.as_bytes(),
            usage,
        );
        let embeddings = r#"{"object":"list","data":[{"object":"embedding","index":0,"embedding":[0.0023064255,-0.009327292]}],"model":"text-embedding-3-small","usage":{"prompt_tokens":8,"total_tokens":8}}"#;
        let usage = Some(Usage {
            prompt_tokens: 8,
            ..Usage::default()
        });
        every_split(
            Endpoint::Embeddings,
            Framing::Json,
            true,
            embeddings.as_bytes(),
            embeddings.as_bytes(),
            usage,
        );
        let responses = r#"{"id":"resp_1","object":"response","output":[],"usage":{"input_tokens":5,"output_tokens":7,"output_tokens_details":{"reasoning_tokens":9}},"user":null}"#;
        let usage = Some(Usage {
            prompt_tokens: 5,
            completion_tokens: 7,
            reasoning_tokens: 7,
            ..Usage::default()
        });
        every_split(
            Endpoint::Responses,
            Framing::Json,
            false,
            responses.as_bytes(),
            responses.as_bytes(),
            usage,
        );
        let error =
            r#"{"error":{"message":"Rate limit","type":"requests","code":"rate_limit_exceeded"}}"#;
        every_split(
            Endpoint::Chat,
            Framing::Json,
            false,
            error.as_bytes(),
            error.as_bytes(),
            None,
        );
        let (_, m) = run(
            Endpoint::Embeddings,
            Framing::Json,
            false,
            &[error.as_bytes()],
        );
        assert_eq!(m.delivered_completion_estimate(), 0);
    }

    #[test]
    fn a_huge_json_body_keeps_only_its_tail() {
        let mut body = String::from(r#"{"object":"list","data":["#);
        for i in 0..200_000 {
            body += &format!("{{\"index\":{i},\"embedding\":[0.1,0.2]}},");
        }
        body += r#"{}],"usage":{"prompt_tokens":123456,"total_tokens":123456}}"#;
        let mut m = Meter::new(Endpoint::Embeddings, Framing::Json, false);
        for piece in body.as_bytes().chunks(16 * 1024) {
            m.on_frame(Bytes::copy_from_slice(piece));
        }
        m.finish();
        assert!(m.tail.buf.capacity() <= 2 * TAIL_CAP);
        assert_eq!(m.usage().map(|u| u.prompt_tokens), Some(123_456));
    }

    #[test]
    fn garbage_and_edge_cases() {
        for (stream, usage) in [
            (&b"\xff\xfe\x00data: {\"usage\":{\"prompt_tokens\":\n\n"[..], None),
            (b"data: {\"choices\":[],\"usage\":{}}\n\n", None),
            (b"data: {\"choices\":[],\"usage\":{\"prompt_tokens\":-3,\"completion_tokens\":2.5}}\n\n",
                Some(Usage { prompt_tokens: 0, completion_tokens: 3, ..Usage::default() })),
            // Nothing after [DONE] is metered.
            (b"data: [DONE]\n\ndata: {\"choices\":[],\"usage\":{\"prompt_tokens\":1}}\n\n", None),
            // No space after the colon, last line without a line end.
            (b"data:{\"choices\":[],\"usage\":{\"prompt_tokens\":4,\"completion_tokens\":\"5\"}}",
                Some(Usage { prompt_tokens: 4, completion_tokens: 5, ..Usage::default() })),
            // A later usage replaces an earlier one (cumulative reports).
            (b"data: {\"usage\": {\"prompt_tokens\":1}}\n\ndata: {\"usage\" : {\"prompt_tokens\":2}}\n\n",
                Some(Usage { prompt_tokens: 2, ..Usage::default() })),
            (b"", None),
            (b"\n\n\n\r\n", None),
        ] {
            every_split(Endpoint::Chat, Framing::Sse, false, stream, stream, usage);
            let (once, _) = run(Endpoint::Chat, Framing::Sse, true, &[stream]);
            for i in 0..=stream.len() {
                let (out, _) = run(Endpoint::Chat, Framing::Sse, true, &[&stream[..i], &stream[i..]]);
                assert_eq!(out, once);
            }
        }
        // finish twice returns nothing more.
        let mut m = Meter::new(Endpoint::Chat, Framing::Sse, true);
        assert!(
            m.on_frame(Bytes::from_static(b"data: {\"x\":1}"))
                .is_empty()
        );
        assert_eq!(&m.finish()[..], b"data: {\"x\":1}");
        assert!(m.finish().is_empty());
    }

    #[test]
    fn a_huge_line_still_flows_and_is_metered_from_its_tail() {
        let text = "x".repeat(LINE_CAP + 10);
        let huge = format!(
            "data: {{\"type\":\"response.completed\",\"response\":{{\"output\":[{{\"text\":\"{text}\"}}],\"usage\":{{\"input_tokens\":3,\"output_tokens\":70000}}}}}}\n\n"
        );
        let stream = format!(
            "{}{huge}data: [DONE]\n\n",
            RESPONSES_STREAM
                .split("event: response.completed")
                .next()
                .unwrap_or("")
        );
        let usage = Some(Usage {
            prompt_tokens: 3,
            completion_tokens: 70_000,
            ..Usage::default()
        });
        for withhold in [false, true] {
            for step in [1000, 4096, LINE_CAP, stream.len()] {
                let frames: Vec<&[u8]> = stream.as_bytes().chunks(step).collect();
                let (out, m) = run(Endpoint::Responses, Framing::Sse, withhold, &frames);
                assert_eq!(out, stream.as_bytes());
                assert_eq!(m.usage(), usage, "step {step}");
                assert!(m.line.capacity() <= 2 * LINE_CAP);
            }
        }
        // A huge event is never held back whole: it flows as it comes.
        let mut m = Meter::new(Endpoint::Chat, Framing::Sse, true);
        let big = Bytes::from(format!(
            "data: {{\"choices\":[],\"x\":\"{}",
            "y".repeat(HOLD_CAP)
        ));
        assert_eq!(m.on_frame(big.clone()), big);
    }

    const MESSAGES_STREAM: &str = "event: message_start\n\
data: {\"type\":\"message_start\",\"message\":{\"id\":\"msg_1\",\"type\":\"message\",\"role\":\"assistant\",\"content\":[],\"model\":\"claude-sonnet-4-5\",\"stop_reason\":null,\"stop_sequence\":null,\"usage\":{\"input_tokens\":25,\"cache_creation_input_tokens\":100,\"cache_read_input_tokens\":2000,\"cache_creation\":{\"ephemeral_5m_input_tokens\":100,\"ephemeral_1h_input_tokens\":0},\"output_tokens\":1}}}\n\n\
event: content_block_start\n\
data: {\"type\":\"content_block_start\",\"index\":0,\"content_block\":{\"type\":\"text\",\"text\":\"\"}}\n\n\
event: ping\n\
data: {\"type\": \"ping\"}\n\n\
event: content_block_delta\n\
data: {\"type\":\"content_block_delta\",\"index\":0,\"delta\":{\"type\":\"text_delta\",\"text\":\"Hello\"}}\n\n\
event: content_block_delta\n\
data: {\"type\":\"content_block_delta\",\"index\":0,\"delta\":{\"type\":\"text_delta\",\"text\":\"!\"}}\n\n\
event: content_block_stop\n\
data: {\"type\":\"content_block_stop\",\"index\":0}\n\n\
event: message_delta\n\
data: {\"type\":\"message_delta\",\"delta\":{\"stop_reason\":\"end_turn\",\"stop_sequence\":null},\"usage\":{\"output_tokens\":7}}\n\n\
event: message_delta\n\
data: {\"type\":\"message_delta\",\"delta\":{\"stop_reason\":\"end_turn\",\"stop_sequence\":null},\"usage\":{\"output_tokens\":15}}\n\n\
event: message_stop\n\
data: {\"type\":\"message_stop\"}\n\n";

    const MESSAGES_USAGE: Usage = Usage {
        prompt_tokens: 25 + 100 + 2000,
        cached_tokens: 2000,
        cache_write_tokens: 100,
        cache_write_1h_tokens: 0,
        completion_tokens: 15,
        reasoning_tokens: 0,
    };

    #[test]
    fn anthropic_stream() {
        for withhold in [false, true] {
            every_split(
                Endpoint::Messages,
                Framing::Sse,
                withhold,
                MESSAGES_STREAM.as_bytes(),
                MESSAGES_STREAM.as_bytes(),
                Some(MESSAGES_USAGE),
            );
        }
        let (_, m) = run(
            Endpoint::Messages,
            Framing::Sse,
            false,
            &[MESSAGES_STREAM.as_bytes()],
        );
        // Two text deltas; the empty block start does not count.
        assert_eq!(m.delivered_completion_estimate(), 2);
        // Cut after message_start: input and cache tokens are known, output
        // is message_start's.
        let cut = &MESSAGES_STREAM[..MESSAGES_STREAM
            .find("event: content_block_start")
            .unwrap_or(0)];
        let (_, m) = run(Endpoint::Messages, Framing::Sse, false, &[cut.as_bytes()]);
        assert_eq!(
            m.usage(),
            Some(Usage {
                completion_tokens: 1,
                ..MESSAGES_USAGE
            })
        );
        assert!(m.usage_incomplete(), "no message_delta yet: not final");
        let (_, m) = run(
            Endpoint::Messages,
            Framing::Sse,
            false,
            &[MESSAGES_STREAM.as_bytes()],
        );
        assert!(!m.usage_incomplete());
        // An error event mid-stream: input and cache tokens as reported,
        // the usage not final.
        let errored = format!(
            "{}event: error\ndata: {{\"type\":\"error\",\"error\":{{\"type\":\"overloaded_error\",\"message\":\"Overloaded\"}}}}\n\n",
            &MESSAGES_STREAM[..MESSAGES_STREAM
                .find("event: content_block_stop")
                .unwrap_or(0)]
        );
        let (out, m) = run(
            Endpoint::Messages,
            Framing::Sse,
            false,
            &[errored.as_bytes()],
        );
        assert_eq!(
            out,
            errored.as_bytes(),
            "the error event reaches the client"
        );
        assert!(m.usage_incomplete());
        assert_eq!(m.usage().map(|u| u.cached_tokens), Some(2000));
        assert_eq!(m.delivered_completion_estimate(), 2);
        // The TTL split of cache writes.
        let split = "data: {\"type\":\"message_start\",\"message\":{\"usage\":{\"input_tokens\":3,\"cache_creation_input_tokens\":10,\"cache_creation\":{\"ephemeral_5m_input_tokens\":4,\"ephemeral_1h_input_tokens\":6},\"output_tokens\":1}}}\n\n\
                     data: {\"type\":\"message_delta\",\"usage\":{\"output_tokens\":5}}\n\n";
        let (_, m) = run(Endpoint::Messages, Framing::Sse, false, &[split.as_bytes()]);
        assert_eq!(
            m.usage(),
            Some(Usage {
                prompt_tokens: 13,
                cached_tokens: 0,
                cache_write_tokens: 10,
                cache_write_1h_tokens: 6,
                completion_tokens: 5,
                reasoning_tokens: 0,
            })
        );
        assert!(!m.usage_incomplete());
        // A message_delta that repeats input counts replaces them.
        let stream = "data: {\"type\":\"message_start\",\"message\":{\"usage\":{\"input_tokens\":3,\"output_tokens\":1}}}\n\n\
                      data: {\"type\":\"message_delta\",\"usage\":{\"input_tokens\":4,\"cache_read_input_tokens\":6,\"output_tokens\":9}}\n\n";
        let (_, m) = run(
            Endpoint::Messages,
            Framing::Sse,
            false,
            &[stream.as_bytes()],
        );
        assert_eq!(
            m.usage(),
            Some(Usage {
                prompt_tokens: 10,
                cached_tokens: 6,
                cache_write_tokens: 0,
                cache_write_1h_tokens: 0,
                completion_tokens: 9,
                reasoning_tokens: 0,
            })
        );
    }

    #[test]
    fn anthropic_json_body() {
        let body = r#"{"id":"msg_1","type":"message","role":"assistant","model":"claude-sonnet-4-5","content":[{"type":"text","text":"The \"usage\": {\"input_tokens\": 1} is quoted"}],"stop_reason":"end_turn","stop_sequence":null,"usage":{"input_tokens":25,"cache_creation_input_tokens":100,"cache_read_input_tokens":2000,"output_tokens":15}}"#;
        every_split(
            Endpoint::Messages,
            Framing::Json,
            false,
            body.as_bytes(),
            body.as_bytes(),
            Some(MESSAGES_USAGE),
        );
        let plain = r#"{"type":"message","usage":{"input_tokens":12,"output_tokens":3}}"#;
        let (_, m) = run(
            Endpoint::Messages,
            Framing::Json,
            false,
            &[plain.as_bytes()],
        );
        assert_eq!(
            m.usage(),
            Some(Usage {
                prompt_tokens: 12,
                completion_tokens: 3,
                ..Usage::default()
            })
        );
    }
}
