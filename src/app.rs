//! `App`: the state every request handler shares (one per gateway, behind
//! an `Arc`), built once at start-up from the validated config.

use std::sync::Arc;
use std::sync::atomic::AtomicBool;

use arc_swap::ArcSwap;

use crate::clock::Clock;
use crate::config::Config;
use crate::gate::Gate;
use crate::reload::{Live, Reloader};
use crate::store::Store;

pub struct App {
    /// The configuration the gateway started with. Restart-only settings
    /// (server, runtime, storage, admin, metrics, limits) are read here;
    /// everything a reload swaps (prices, plans, routes, upstreams,
    /// billing, webhooks…) is read from [`App::live`] instead.
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
    /// The reloadable configuration and the routing built from it: each
    /// request loads one snapshot and finishes on it (see [`crate::reload`]).
    pub live: ArcSwap<Live>,
    /// Re-reads the config file on SIGHUP or `POST /api/v1/admin/reload`.
    pub reloader: Reloader,
    /// The scoped admin tokens, in memory: the admin guard reads no sled.
    pub admin_tokens: crate::api::AdminTokens,
    /// `[cluster]` mode: this node's link to the others (set once at start,
    /// before serving); empty when the node runs alone.
    pub cluster: std::sync::OnceLock<Arc<crate::cluster::Cluster>>,
}

impl App {
    /// The current reloadable configuration: load once per request and read
    /// everything from that one snapshot.
    pub fn live(&self) -> Arc<Live> {
        self.live.load_full()
    }
}
