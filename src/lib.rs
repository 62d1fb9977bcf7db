//! Tollgate: an edge gateway that sells and meters access to OpenAI-compatible
//! LLM APIs. One binary, all state embedded.
//!
//! A request's path (see `DESIGN.md`): `server` accepts it, the router sends
//! `/v1/*` to `proxy`, which asks `gate` to authenticate, admit, limit and
//! reserve, forwards to an upstream, and streams the answer back through a
//! `meter`; when the answer ends (or the client goes) the request is settled
//! exactly once and its usage record is queued to `store`.
//!
//! Modules, each owning one thing:
//! - [`money`]: `Pico` (i64 picoUSD) and exact decimal parsing/formatting.
//! - [`error`]: the one error type, mapped to status and OpenAI error JSON.
//! - [`clock`]: Unix time with a test offset.
//! - [`config`]: `config.toml` schema, defaults, validation.
#![forbid(unsafe_code)]

pub mod clock;
pub mod config;
pub mod error;
pub mod money;

use bytes::Bytes;
use http_body_util::BodyExt;

/// Errors a response body may fail with.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// Every response body the gateway sends: a full buffer, or a stream passed
/// through from an upstream (metered on the way).
pub type Body = http_body_util::combinators::UnsyncBoxBody<Bytes, BoxError>;

/// A body made of one buffer.
pub fn full_body(bytes: impl Into<Bytes>) -> Body {
    http_body_util::Full::new(bytes.into())
        .map_err(|never| match never {})
        .boxed_unsync()
}
