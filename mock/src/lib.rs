//! A mock LLM upstream that answers from a script instead of a model, in
//! OpenAI's and Anthropic's wire formats: for trying Tollgate with no network
//! (`mock = true` upstreams, `tollgate mock-upstream`), for integration tests
//! and for benches. It imports nothing from the gateway.
//!
//! The bytes follow the providers' wire shapes (chunk objects, `"usage":null`
//! on every chunk when usage was asked for, the usage-only chunk with
//! `"choices":[]`, `data: [DONE]`, the Responses API event sequence,
//! Anthropic's `event:`-named Messages stream), so the gateway's meter is
//! exercised on the shapes it meets in production.
//!
//! Like ASGI or Go servers, the mock routes on the normalised path
//! ([`normalise_path`]: percent-escapes decoded, `//` collapsed, `.` and `..`
//! resolved, a trailing `/` dropped), so a gateway that classifies the raw
//! path is caught serving work it did not price. It counts the work it did
//! ([`MockUpstream::served`]), so a test can assert "the upstream did
//! nothing" or "the upstream served exactly what was charged".
//!
//! Behaviour is set per server by [`MockOptions`] (and [`MockUpstream::set_fault`])
//! and per request by `x-mock-*` headers, which the gateway forwards like any
//! client header, so a test can drive a fault through the whole proxy:
//!
//! | header | value | effect |
//! |---|---|---|
//! | `x-mock-chunks` | `N` | content tokens in the answer (before `max_tokens`) |
//! | `x-mock-chunk-delay-ms` | `N` | delay between streamed chunks |
//! | `x-mock-fault` | [`Fault`] as text, or `none` | see [`Fault`] |
//! | `x-mock-cached-tokens` | `N` | OpenAI `cached_tokens` in usage (at most the prompt) |
//! | `x-mock-reasoning-tokens` | `N` | reasoning (Anthropic: thinking) tokens, part of the output |
//! | `x-mock-cache-read-tokens` | `N` | Anthropic `cache_read_input_tokens` (taken from the prompt) |
//! | `x-mock-cache-write-tokens` | `N` | Anthropic `cache_creation_input_tokens` (taken from the rest of the prompt) |
//! | `x-mock-cache-write-1h-tokens` | `N` | of the cache writes, those with the 1-hour TTL |
//!
//! Token counts are deterministic: a prompt counts `ceil(utf8_bytes / 4) + 4`
//! per message (always below the gateway's bound of bytes + 8 per message),
//! the answer is one word per token from a fixed list, and a reasoning budget
//! is spent before visible tokens, as OpenAI's reasoning models do.
//!
//! Routes (under `/v1`): `chat/completions`, `completions`, `embeddings`,
//! `responses` (and `responses/{id}`, `background: true`), `models`,
//! `audio/transcriptions`, `files` (and `files/{id}`, `files/{id}/content`),
//! `batches` (and `batches/{id}`), `messages`, `messages/count_tokens`.
//! Stored objects (files, batches, responses) are shared by every caller, as
//! they are in one upstream account: lists return everything created.
//!
//! Every answer carries the provider's account headers ([`ACCOUNT_HEADERS`]),
//! which a gateway must not pass on to its own clients.
//!
//! The server runs on one thread; the locks it takes per request (the work
//! tally, and the request log with `record_requests`) are never contended
//! except by a test reading them.
//!
//! Files: `server` (start, stop, connections), `routes` (one request from
//! head to answer), `path`, `knobs` (per-request headers), `fault`, `served`
//! (the work tally), `answer` and `body` (what goes on the wire), `error`,
//! `plan` (token budgets and answer words), `openai`, `responses`, `objects`
//! (files, batches, stored responses, transcriptions), `anthropic`.

#![forbid(unsafe_code)]

mod answer;
mod anthropic;
mod body;
mod error;
mod fault;
mod fields;
mod knobs;
mod objects;
mod openai;
mod path;
mod plan;
mod responses;
mod routes;
mod served;
mod server;
#[cfg(test)]
mod tests;

use std::time::Duration;

pub use answer::ACCOUNT_HEADERS;
pub use fault::Fault;
pub use path::normalise_path;
pub use served::{Served, Tokens};
pub use server::{MockUpstream, SeenRequest, run};

/// Content tokens per answer when neither the request nor a header bounds it.
pub const HEADER_CHUNKS: &str = "x-mock-chunks";
/// Milliseconds between streamed chunks.
pub const HEADER_CHUNK_DELAY_MS: &str = "x-mock-chunk-delay-ms";
/// A [`Fault`] in its text form, or `none` to lift the server's fault.
pub const HEADER_FAULT: &str = "x-mock-fault";
/// `prompt_tokens_details.cached_tokens` (`input_tokens_details` for Responses).
pub const HEADER_CACHED_TOKENS: &str = "x-mock-cached-tokens";
/// `completion_tokens_details.reasoning_tokens` (`output_tokens_details` for
/// Responses; a thinking block on `/v1/messages` when thinking is enabled).
pub const HEADER_REASONING_TOKENS: &str = "x-mock-reasoning-tokens";
/// Anthropic `cache_read_input_tokens`, taken out of the prompt's tokens.
pub const HEADER_CACHE_READ_TOKENS: &str = "x-mock-cache-read-tokens";
/// Anthropic `cache_creation_input_tokens`, taken out of what the cache read left.
pub const HEADER_CACHE_WRITE_TOKENS: &str = "x-mock-cache-write-tokens";
/// How many of the cache writes have the 1-hour TTL (`cache_creation.ephemeral_1h_input_tokens`).
pub const HEADER_CACHE_WRITE_1H_TOKENS: &str = "x-mock-cache-write-1h-tokens";

/// How a mock server behaves when a request does not say otherwise.
#[derive(Clone, Debug)]
pub struct MockOptions {
    /// Content tokens per answer when the request does not bound it lower, so
    /// a test controls the answer's length (and cost) without a model.
    pub chunks: usize,
    /// Pause between streamed chunks, to make a stream last long enough to be
    /// cancelled or timed out in a test.
    pub chunk_delay: Duration,
    /// Applied to every request: a permanently failing upstream for failover
    /// tests. Changed at run time with [`MockUpstream::set_fault`].
    pub fault: Option<Fault>,
    /// Keep a copy of every request so tests can check what the gateway
    /// forwarded (headers rewritten, body unchanged). Off: no lock for it.
    pub record_requests: bool,
    /// Ids listed by `GET /v1/models`.
    pub models: Vec<String>,
    /// When set, OpenAI routes accept only `Authorization: Bearer <key>` and
    /// Anthropic routes only `x-api-key: <key>`, so tests can prove the
    /// gateway swaps the client's key for the upstream's, in the provider's way.
    pub require_key: Option<String>,
}

impl Default for MockOptions {
    fn default() -> Self {
        MockOptions {
            chunks: 16,
            chunk_delay: Duration::ZERO,
            fault: None,
            record_requests: false,
            models: [
                "demo-chat",
                "demo-chat-mini",
                "demo-embed",
                "claude-sonnet-4-5",
                "claude-haiku-4-5",
            ]
            .into_iter()
            .map(String::from)
            .collect(),
            require_key: None,
        }
    }
}
