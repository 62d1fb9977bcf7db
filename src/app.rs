//! `App`: the state every request handler shares (one per gateway, behind
//! an `Arc`), built once at start-up from the validated config.

use std::sync::atomic::AtomicBool;

use crate::clock::Clock;
use crate::config::Config;
use crate::gate::Gate;
use crate::store::Store;

pub struct App {
    /// The validated configuration; never re-read.
    pub config: Config,
    /// Keys in memory and admission.
    pub gate: Gate,
    /// The embedded database (also reachable as `gate.store()`).
    pub store: Store,
    /// Wall clock (advanced by tests).
    pub clock: Clock,
    /// The admin token (from the env var, or generated on first start).
    pub admin_token: String,
    /// Refuses a network that guessed the admin token too often, before
    /// comparing (lives here because it must outlast each request).
    pub admin_guard: crate::api::AdminGuard,
    /// Bearer token `/metrics` requires (`metrics.token_env`); `None` =
    /// open, for a scrape over a private network.
    pub metrics_token: Option<String>,
    /// Counters for `/metrics`.
    pub metrics: crate::metrics::Metrics,
    /// False while starting and once draining: `/readyz` answers 503.
    pub ready: AtomicBool,
    /// The event delivery task's handle (redeliveries wake it).
    pub events: crate::events::Events,
}
