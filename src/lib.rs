//! Tollgate: an edge gateway that sells and meters access to OpenAI-compatible
//! LLM APIs. One binary, all state embedded.
//!
//! A request's path (see `DESIGN.md`): `server` accepts it, the router sends
//! `/v1/*` to `proxy`, whose `mod.rs` runs the phases in order —
//! authenticate, classify, admit, limit, inspect, reserve, forward, stream
//! back — asking `gate` for the key's checks and money and `meter` for the
//! body's measure; when the answer ends (or the client goes) the request is
//! settled exactly once (`proxy::settle`) and its usage record is queued to
//! `store`.
//!
//! Modules, each owning one thing:
//! - [`money`]: `Pico` (i64 picoUSD) and exact decimal parsing/formatting.
//! - [`error`]: the one error type, mapped to status and OpenAI error JSON.
//! - [`clock`]: Unix time with a test offset.
//! - [`config`]: `config.toml` schema, defaults, validation.
//! - [`runtime`]: start/stop; per-core or shared runtimes, the sweeper.
//! - [`server`]: accept, TLS, hyper `auto` connections, router, drain.
//! - [`app`]: the state every handler shares.
//! - [`gate`]: keys in memory, admission, limits, reservations, permits.
//! - [`proxy`]: the phases; routing, upstream pools, failover, header
//!   allowlists, metered body, settlement.
//! - [`meter`]: canonical paths, request inspection and rewrite, SSE/JSON
//!   usage scanning, pricing.
//! - [`store`]: the only module that touches sled.
//! - [`api`]: provisioning, key status, credits, usage queries.
//! - [`billing`]: accounts' live wallets; plans subscribed to, their
//!   periods, grants, lapses and lifecycle (`billing::subscriptions`).
//! - [`metrics`]: counters and their Prometheus rendering.
//! - [`payments`]: Stripe and epay notifications and checkouts, turned
//!   into credit exactly once.
//! - [`events`]: the outbox's events, webhook and email delivery, the audit log.
//! - [`cli`]: the admin CLI (`tollgate keys …`), a client of the admin API.
//! - [`reload`]: SIGHUP / API config reload, the live snapshot requests read.
//! - [`cluster`]: `[cluster]` mode: many nodes over PostgreSQL, leased
//!   budgets and rate windows, settlement in batches, admin changes synced
//!   between nodes, the event outbox delivered by one node at a time.
//!
//! The mock upstream (`tollgate mock-upstream`, `mock = true` upstreams, the
//! tests and benches) is its own crate, `tollgate_mock`, in `mock/`.
//! The lint policy (clippy's included) is the workspace's `[workspace.lints]`
//! in Cargo.toml; the library's own code forbids `unsafe` outright.
#![forbid(unsafe_code)]

pub mod api;
pub mod app;
pub mod billing;
pub mod cli;
pub mod clock;
pub mod cluster;
pub mod config;
pub mod error;
pub mod events;
#[doc(hidden)]
pub mod fuzzing;
pub mod gate;
pub mod meter;
pub mod metrics;
pub mod money;
pub mod payments;
pub mod proxy;
pub mod reload;
pub mod runtime;
pub mod server;
pub mod store;

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
