//! Starting and stopping the gateway: the runtimes (per-core or shared),
//! the listeners, the in-process mock upstreams, the store, the sweeper.
//!
//! Per-core mode: one OS thread per worker, each running its own
//! `current_thread` tokio runtime with its own `SO_REUSEPORT` listener and
//! its own upstream pool, so a request and its upstream call are served on
//! one thread with no cross-thread wake-ups. Shared mode: one multi-thread
//! runtime, one listener, one pool.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::thread::JoinHandle;
use std::time::Duration;

use tokio::sync::watch;

use crate::app::App;
use crate::clock::Clock;
use crate::config::{Config, RuntimeMode};
use crate::gate::Gate;
use crate::metrics::Metrics;
use crate::proxy::spin::Spin;
use crate::proxy::{Routing, WorkerProxy};
use crate::server::{self, Listener};
use crate::store::Store;
use tollgate_mock::{MockOptions, MockUpstream};

/// Options that do not come from `config.toml`.
#[derive(Clone, Default)]
pub struct StartOptions {
    /// The clock to use (tests share one and advance it).
    pub clock: Clock,
    /// Use this admin token instead of the env var or the saved one.
    pub admin_token: Option<String>,
}

/// A running gateway.
pub struct Gateway {
    app: Arc<App>,
    addr: SocketAddr,
    shutdown: watch::Sender<bool>,
    threads: Vec<JoinHandle<()>>,
    /// Mock upstreams started for `mock = true` upstreams; they stop when
    /// the gateway is dropped.
    _mocks: Vec<MockUpstream>,
}

/// Installs ring as rustls's crypto provider (both ring and aws-lc-rs may be
/// compiled in, and then rustls cannot choose by itself).
pub fn install_crypto_provider() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}

impl Gateway {
    /// Starts everything and returns once the listeners are bound.
    pub fn start(config: Config, opts: StartOptions) -> Result<Gateway, String> {
        install_crypto_provider();
        let mut mocks = Vec::new();
        let mut mock_urls = HashMap::new();
        for up in config.upstreams.iter().filter(|u| u.served_by_mock()) {
            let options = MockOptions {
                models: config.models.keys().cloned().collect(),
                ..MockOptions::default()
            };
            let mock = MockUpstream::start(options)
                .map_err(|e| format!("starting the mock upstream {}: {e}", up.name))?;
            tracing::info!(upstream = %up.name, url = %mock.base_url(), "built-in mock upstream started");
            mock_urls.insert(up.name.clone(), mock.base_url());
            mocks.push(mock);
        }
        let routing = Arc::new(Routing::build(&config, &mock_urls)?);
        demo_banner(&routing);
        std::fs::create_dir_all(&config.storage.path)
            .map_err(|e| format!("storage.path {}: {e}", config.storage.path.display()))?;
        crate::events::deliver::check(&config)?;
        let store_options = config.alerts.store_options(&config.storage);
        let store = Store::open_with(&config.storage.path, store_options).map_err(|e| {
            format!(
                "opening the store at {}: {e}",
                config.storage.path.display()
            )
        })?;
        let admin_token = match opts.admin_token {
            Some(t) => t,
            None => admin_token(&config)?,
        };
        let metrics_token = metrics_token(&config)?;
        let admin_guard = crate::api::AdminGuard::new(config.limits.admin_failures_per_minute);
        let tls = match &config.server.tls {
            Some(t) => Some(server::tls_acceptor(&t.cert, &t.key)?),
            None => None,
        };
        let gate = Gate::new(
            store.clone(),
            opts.clock.clone(),
            config.limits.unknown_key_per_minute,
        );
        gate.set_billing_mode(config.billing.mode);
        gate.wallets().set_plans(&config.plans);
        let metrics = Metrics::new(routing.upstream_names());
        let workers = config.runtime.worker_count();
        let mode = config.runtime.mode;
        let pin = config.runtime.pin_cores;
        let spin_window = Duration::from_micros(config.runtime.spin_us);
        let listen = config.server.listen;
        let sweep_every = config.limits.sweep_interval.0;
        let retention_days = config.storage.usage_retention_days;
        let admin_tokens = crate::api::AdminTokens::from_records(
            store
                .admin_tokens()
                .map_err(|e| format!("reading the admin tokens: {e}"))?,
        );
        let live = arc_swap::ArcSwap::from_pointee(crate::reload::Live {
            config: config.clone(),
            routing,
        });
        let reloader = crate::reload::Reloader::new(config.source.clone(), mock_urls);
        let app = Arc::new(App {
            config,
            gate,
            store,
            clock: opts.clock,
            admin_token,
            admin_guard,
            metrics_token,
            metrics,
            ready: AtomicBool::new(false),
            events: crate::events::Events::default(),
            live,
            reloader,
            admin_tokens,
            cluster: std::sync::OnceLock::new(),
        });
        if let Some(cc) = &app.config.cluster {
            let cluster = crate::cluster::Cluster::start(cc, &app)?;
            let _ = app.cluster.set(cluster);
        }
        let (shutdown, rx) = watch::channel(false);
        let connections = Arc::new(AtomicUsize::new(0));
        let mut threads = Vec::new();
        let addr;
        match mode {
            RuntimeMode::PerCore => {
                // The first socket resolves port 0; the others join it.
                let first =
                    server::bind(listen, true).map_err(|e| format!("binding {listen}: {e}"))?;
                addr = first.local_addr().map_err(|e| e.to_string())?;
                let mut sockets = vec![first];
                for _ in 1..workers {
                    sockets.push(
                        server::bind(addr, true).map_err(|e| format!("binding {addr}: {e}"))?,
                    );
                }
                let cores = if pin {
                    core_affinity::get_core_ids().unwrap_or_default()
                } else {
                    Vec::new()
                };
                for (i, socket) in sockets.into_iter().enumerate() {
                    let app = app.clone();
                    let rx = rx.clone();
                    let tls = tls.clone();
                    let connections = connections.clone();
                    let core = cores.get(i % cores.len().max(1)).copied();
                    let t = std::thread::Builder::new()
                        .name(format!("tollgate-w{i}"))
                        .spawn(move || {
                            if let Some(core) = core {
                                core_affinity::set_for_current(core);
                            }
                            let rt = tokio::runtime::Builder::new_current_thread()
                                .enable_all()
                                .build()
                                .expect("a current_thread runtime builds");
                            rt.block_on(async move {
                                let listener = match tokio::net::TcpListener::from_std(socket) {
                                    Ok(l) => l,
                                    Err(e) => {
                                        tracing::error!(error = %e, "worker could not use its listener");
                                        return;
                                    }
                                };
                                if i == 0 {
                                    tokio::spawn(sweeper(app.clone(), rx.clone(), sweep_every, retention_days));
                                }
                                let spin = Spin::new(spin_window);
                                if let Some(spin) = &spin {
                                    tokio::spawn(spin.clone().run());
                                }
                                let proxy = Arc::new(WorkerProxy::new(&app.live(), spin));
                                server::run(app, proxy, Listener { listener, tls, connections }, rx).await;
                            });
                        })
                        .map_err(|e| format!("starting worker {i}: {e}"))?;
                    threads.push(t);
                }
            }
            RuntimeMode::Shared => {
                let socket =
                    server::bind(listen, false).map_err(|e| format!("binding {listen}: {e}"))?;
                addr = socket.local_addr().map_err(|e| e.to_string())?;
                let app = app.clone();
                let rx = rx.clone();
                let t = std::thread::Builder::new()
                    .name("tollgate-shared".to_owned())
                    .spawn(move || {
                        let rt = tokio::runtime::Builder::new_multi_thread()
                            .worker_threads(workers)
                            .thread_name("tollgate-w")
                            .enable_all()
                            .build()
                            .expect("a multi-thread runtime builds");
                        rt.block_on(async move {
                            let listener = match tokio::net::TcpListener::from_std(socket) {
                                Ok(l) => l,
                                Err(e) => {
                                    tracing::error!(error = %e, "could not use the listener");
                                    return;
                                }
                            };
                            tokio::spawn(sweeper(
                                app.clone(),
                                rx.clone(),
                                sweep_every,
                                retention_days,
                            ));
                            // A multi-thread runtime's idle workers steal
                            // instead: no spinner.
                            let proxy = Arc::new(WorkerProxy::new(&app.live(), None));
                            server::run(
                                app,
                                proxy,
                                Listener {
                                    listener,
                                    tls,
                                    connections,
                                },
                                rx,
                            )
                            .await;
                        });
                    })
                    .map_err(|e| format!("starting the runtime: {e}"))?;
                threads.push(t);
            }
        }
        app.ready.store(true, Ordering::Release);
        tracing::info!(%addr, ?mode, workers, "tollgate listening");
        Ok(Gateway {
            app,
            addr,
            shutdown,
            threads,
            _mocks: mocks,
        })
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    pub fn app(&self) -> &Arc<App> {
        &self.app
    }

    /// Re-reads the config file and swaps it in (SIGHUP does this), or
    /// keeps the running one and says why.
    pub fn reload(&self) -> Result<crate::reload::Reloaded, String> {
        crate::reload::reload(&self.app)
    }

    /// Stops accepting, drains in-flight requests (up to the grace period),
    /// and makes everything queued to the store durable.
    pub fn shutdown(mut self) {
        self.app.ready.store(false, Ordering::Release);
        let _ = self.shutdown.send(true);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
        if let Some(c) = self.app.cluster.get() {
            c.shutdown(Duration::from_secs(5));
        }
        let store = self.app.store.clone();
        self.app.gate.stop();
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build();
        if let Ok(rt) = rt
            && let Err(e) = rt.block_on(store.flush())
        {
            tracing::error!(error = %e, "final store flush failed");
        }
    }
}

impl Drop for Gateway {
    fn drop(&mut self) {
        let _ = self.shutdown.send(true);
    }
}

/// Drops idle keys from memory, prunes limiter state and old usage records.
async fn sweeper(
    app: Arc<App>,
    mut shutdown: watch::Receiver<bool>,
    every: Duration,
    retention_days: u32,
) {
    crate::events::deliver::spawn(app.clone());
    loop {
        tokio::select! {
            _ = tokio::time::sleep(every) => {}
            _ = shutdown.changed() => return,
        }
        crate::billing::subscriptions::sweep(&app).await;
        let evicted = app.gate.sweep();
        if evicted > 0 {
            tracing::debug!(evicted, "idle keys dropped from memory");
        }
        if retention_days > 0 {
            let before = app.clock.now_ms() - retention_days as i64 * crate::clock::DAY_MS;
            if let Err(e) = app.store.prune_usage_before(before).await {
                tracing::warn!(error = %e, "pruning old usage records failed");
            }
            // The database's records too (one node at a time; their
            // rollups stay).
            if let Some(c) = app.cluster.get() {
                c.prune_usage_before(before).await;
            }
        }
        let event_days = app.live().config.storage.event_retention_days;
        if event_days > 0 {
            let before = app.clock.now_ms() - i64::from(event_days) * crate::clock::DAY_MS;
            match app.store.prune_events_before(before).await {
                Ok(0) => {}
                Ok(n) => tracing::debug!(events = n, "old delivered events pruned"),
                Err(e) => tracing::warn!(error = %e, "pruning old events failed"),
            }
            if let Some(c) = app.cluster.get() {
                c.prune_events_before(before).await;
            }
        }
    }
}

/// The admin token: from the configured env var, else the one saved under
/// the storage path, else a new one, saved (mode 0600) and printed once.
/// Says loudly when an upstream is served by the built-in mock only because
/// its key is missing: the gateway is in demo mode and charges nothing for
/// those answers.
fn demo_banner(routing: &Routing) {
    for u in routing.upstreams.iter().filter(|u| u.demo) {
        tracing::warn!(
            upstream = %u.name,
            "DEMO MODE: upstream {} is served by the built-in mock because its API key is not set; its answers are marked and never charged",
            u.name
        );
    }
}

fn admin_token(config: &Config) -> Result<String, String> {
    if let Ok(t) = std::env::var(&config.admin.token_env)
        && !t.is_empty()
    {
        check_admin_token(&config.admin.token_env, &t)?;
        return Ok(t);
    }
    let path = config.storage.path.join("admin_token");
    if let Ok(t) = std::fs::read_to_string(&path) {
        let t = t.trim().to_owned();
        if !t.is_empty() {
            return Ok(t);
        }
    }
    let token = crate::gate::generate_key().replacen("sk-tg-", "tg-admin-", 1);
    write_secret(&path, &token)
        .map_err(|e| format!("saving the admin token to {}: {e}", path.display()))?;
    println!(
        "Generated an admin token (shown once; saved to {}):\n  {token}\nSet {} to use your own.",
        path.display(),
        config.admin.token_env
    );
    Ok(token)
}

/// Shortest admin token accepted from the environment: a short one can be
/// guessed (generated tokens have 48 random characters). Tokens shorter than
/// [`ADMIN_TOKEN_ADVISED_CHARS`] start with a warning: existing deployments
/// (and the outside checks' harness) use 26-character tokens, which the
/// per-IP guard makes unguessable in practice, so only really short ones are
/// refused.
pub const ADMIN_TOKEN_MIN_CHARS: usize = 20;

/// Length below which an admin token from the environment is warned about.
pub const ADMIN_TOKEN_ADVISED_CHARS: usize = 32;

/// Refuses an admin token from the environment that is too short to resist
/// guessing, and warns about one shorter than advised.
pub fn check_admin_token(var: &str, token: &str) -> Result<(), String> {
    let n = token.chars().count();
    if (ADMIN_TOKEN_MIN_CHARS..ADMIN_TOKEN_ADVISED_CHARS).contains(&n) {
        tracing::warn!(
            "{var} holds a {n}-character admin token; use at least {ADMIN_TOKEN_ADVISED_CHARS} (e.g. `openssl rand -hex 24`)"
        );
    }
    if n < ADMIN_TOKEN_MIN_CHARS {
        return Err(format!(
            "{var} holds a {n}-character admin token; it must be at least \
             {ADMIN_TOKEN_MIN_CHARS} characters (e.g. `openssl rand -hex 24`)"
        ));
    }
    Ok(())
}

/// The bearer token `/metrics` requires, from `metrics.token_env`. Named
/// but unset or empty is an error: an operator who asked for protection
/// must not get an open endpoint by a typo.
fn metrics_token(config: &Config) -> Result<Option<String>, String> {
    let Some(var) = &config.metrics.token_env else {
        return Ok(None);
    };
    match std::env::var(var) {
        Ok(t) if !t.trim().is_empty() => Ok(Some(t.trim().to_owned())),
        _ => Err(format!(
            "metrics.token_env names {var}, which is not set (or empty)"
        )),
    }
}

fn write_secret(path: &Path, secret: &str) -> std::io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)?;
    f.write_all(secret.as_bytes())?;
    f.write_all(b"\n")?;
    f.sync_all()
}

#[cfg(test)]
mod admin_token_tests {
    use super::*;

    #[test]
    fn short_admin_tokens_are_refused() {
        let e = check_admin_token("TOLLGATE_ADMIN_TOKEN", "hunter2").unwrap_err();
        assert!(
            e.contains("TOLLGATE_ADMIN_TOKEN") && e.contains("20"),
            "{e}"
        );
        assert!(check_admin_token("T", &"x".repeat(19)).is_err());
        // The outside checks' harness token: warned about, accepted.
        assert!(check_admin_token("T", "bar-admin-token-0123456789").is_ok());
        assert!(check_admin_token("T", &"x".repeat(32)).is_ok());
    }
}
