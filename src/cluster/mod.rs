//! Many gateway nodes over one PostgreSQL: `[cluster]` in `config.toml`.
//!
//! PostgreSQL is the truth of keys and accounts (their records), of the
//! money (an account's `allowance`, `balance` and `spent`, a key's `usage`) and of the
//! usage records and ledger entries that moved it. Each node keeps its sled
//! store as its local copy and journal, and its hot path in memory as in
//! single-node mode: the gate and the wallets admit and reserve exactly as
//! they always did. What changes is where an account's wallet gets the
//! credit it admits against:
//!
//! - **Leases** ([`lease`]): in cluster mode a wallet's `headroom` starts at
//!   zero and grows only by slices this node took from the account's free
//!   credit in the database (`allowance + balance + overdraft − leased`), with one
//!   guarded statement. Σ leases never exceeds what remains, so no
//!   interleaving of nodes overspends. A request that finds too little in
//!   the lease waits for one round trip ([`Cluster::ensure_credit`]); near
//!   the end, slices shrink to the request, so the last cent is exact.
//! - **Periods** ([`period`]): a key's own limit that starts again each
//!   UTC period is leased the same way, of what the database counts the
//!   key spent in the current period; a period rolls once, under the row's
//!   lock, in the first statement that sees it.
//! - **Rate windows** ([`rate`]): a key's rpm and tpm count per UTC
//!   minute over all nodes; a node takes shares of the minute's window
//!   with one guarded statement and admits against them in memory.
//! - **Settlement**: every settled charge is queued here and written in
//!   batches (usage/ledger entries inserted once per id, a key's `usage`,
//!   the account's `allowance` first then `balance` ([`allowance`]), its
//!   `spent`, and the lease lowered by the same amount, in one
//!   transaction). A retry never counts twice.
//! - **Renewal and return**: each tick renews this node's leases, returns
//!   the unused part of idle ones, and reclaims anyone's expired leases:
//!   a node killed with SIGKILL gives its lease back after `lease_ttl`,
//!   losing only what it had not settled.
//! - **Sync** ([`sync`]): admin writes go to the local store first, then to
//!   the database with a change number (`seq`); every node pulls the
//!   changes after the last one it saw (on NOTIFY, and every
//!   `sync_interval`) and applies them to its store, the gate's cache
//!   (`Gate::updated`, `Gate::forget`) and the wallets.
//! - **Audit** ([`audit`]): each node's audit entries are shipped to the
//!   database once each; the audit API reads them back from there.
//! - **Payments** ([`payments`]): a payment claims its provider
//!   references, writes its record and moves its money in one database
//!   transaction, so it applies once cluster-wide; the payments API reads
//!   the records back from there.
//! - **Subscriptions** ([`subscriptions`]): records shared through the
//!   database like accounts; the lifecycle pass runs on one node at a
//!   time (an advisory lock); each grant and lapse is claimed once
//!   cluster-wide and moves the database's allowance in its claim's
//!   transaction.
//! - **Events** ([`outbox`]): each node's events are shipped to the
//!   database once each, with a delivery per endpoint; any node delivers
//!   any of them, one node at a time (a claim that expires); an endpoint
//!   that answers 410 to one node is disabled for all ([`endpoints`]).
//! - **Ledgers** ([`ledger`]): each node's key and account ledger entries
//!   are shipped to the database once each (the local store keeps the
//!   cursor); the ledger APIs read them back from there.
//! - **Lists** ([`lists`]): in cluster mode the key and account lists
//!   read the database, with its money.
//! - **Usage** ([`usage`]): each usage record is written with its charge;
//!   in cluster mode the usage and report APIs read them back from there,
//!   the sums from hourly rollups added in the same transaction
//!   ([`rollups`], which also prunes old records one node at a time).
//!   [`trips`] counts the round trips all of this costs, by kind.
//! - **Import** ([`import`]): `tollgate cluster import` copies a stopped
//!   single node's store into the database once, so a node can grow into
//!   a cluster.
//! - **Faults**: with the database unreachable, a node serves from its
//!   leases until they run out, then refuses paid requests with 503; queued
//!   charges and admin changes are written when it is back (the admin
//!   changes wait in the local store, `store::unsent`, so a node killed
//!   meanwhile writes them when it starts again). Leases not
//!   renewed for `lease_ttl` stop being spent locally.
//!
//! All database work runs on this module's own runtime (one thread), so
//! the per-core workers never own a database connection.

pub mod allowance;
pub mod audit;
pub mod config;
pub mod endpoints;
pub mod import;
pub mod lease;
pub mod ledger;
pub mod lists;
pub mod outbox;
pub mod payments;
pub mod period;
pub mod rate;
pub mod rollups;
pub mod schema;
pub mod subscriptions;
pub mod sync;
pub mod trips;
pub mod usage;

pub use config::{ClusterConfig, LeaseSize};
pub use lease::Subject;

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock, Weak};
use std::time::{Duration, Instant};

use dashmap::DashMap;
use deadpool_postgres::{Manager, ManagerConfig, Pool, RecyclingMethod};
use http::StatusCode;
use tokio::sync::Notify;
use tokio_postgres::NoTls;

use crate::app::App;
use crate::billing::LiveAccount;
use crate::error::ApiError;
use crate::gate::{LiveKey, Policy};
use crate::money::Pico;
use crate::store::KeyHash;
use schema::{db, pool as pool_error};
use trips::{Kind, count};

/// One node's part of the cluster.
pub struct Cluster {
    /// The settings, as parsed.
    cfg: ClusterConfig,
    /// Unique per process: record ids made by this run never collide with
    /// those of an earlier run of the same node.
    boot: String,
    /// The cluster's own runtime, where all database work runs.
    rt: tokio::runtime::Handle,
    /// Connections to PostgreSQL.
    pool: Pool,
    /// The connection settings, for the LISTEN connection.
    pg: tokio_postgres::Config,
    /// TLS to the database (`None`: `sslmode=disable`, plain TCP).
    tls: Option<tokio_postgres_rustls::MakeRustlsConnect>,
    /// The gateway this node serves (set once at start; weak: the app owns
    /// the cluster).
    app: OnceLock<Weak<App>>,
    /// Account (or key) → this node's lease on it.
    leases: DashMap<Subject, Arc<Held>>,
    /// Key → this node's takes of its rpm and tpm windows ([`rate`]).
    rates: DashMap<KeyHash, Arc<rate::RateHeld>>,
    /// Charges settled in memory, not yet in the database (oldest first).
    charges: Mutex<VecDeque<Charge>>,
    /// Admin changes not yet written to the database (it was unreachable),
    /// oldest first; each also kept in the local store (`store::unsent`).
    pending: Mutex<VecDeque<sync::Unsent>>,
    /// One writer of `pending` at a time (the ticks and `publish`): two
    /// would write one change twice and take the other's off the queue.
    pushing: tokio::sync::Mutex<()>,
    /// Source of this run's entry ids.
    next_id: AtomicU64,
    /// The last change number applied from the database.
    last_seq: AtomicI64,
    /// This node's audit entries up to this local seq are in the database.
    audit_shipped: AtomicU64,
    /// One pull at a time: the ticks and the subscription sweeper (which
    /// pulls before its pass) would otherwise apply one change twice.
    pulling: tokio::sync::Mutex<()>,
    /// One ledger shipper at a time (the tick and the ledger reads both
    /// ship): two would write the same entries, and backfill twice.
    ledger_turn: tokio::sync::Mutex<()>,
    /// The local store's entries from before the shipping marks are in
    /// the database (read from the store once, then kept here).
    ledger_backfilled: AtomicBool,
    /// Woken by NOTIFY (another node changed something) and by shutdown.
    wake: Notify,
    /// Woken when this node shipped events: its delivery workers look at
    /// once instead of at their next poll.
    outbox_shipped: Notify,
    /// Held while events are shipped: one shipment at a time.
    shipping: tokio::sync::Mutex<()>,
    /// Set by shutdown: the tasks end after returning the leases.
    stopping: AtomicBool,
    /// The last database call failed (for /readyz-like reporting and logs).
    db_down: AtomicBool,
    /// Ends the runtime's thread when the cluster is dropped.
    _stop: tokio::sync::oneshot::Sender<()>,
}

/// This node's lease on one account.
struct Held {
    /// What the lease feeds: an account's wallet or a key's limit.
    holder: Holder,
    /// What it is a lease of, in the database.
    subject: Subject,
    /// One take from the database at a time per account: requests that
    /// find the lease short wait for it and then look again.
    taking: tokio::sync::Mutex<()>,
    /// The numbers of the lease.
    state: Mutex<LeaseState>,
}

#[derive(Default)]
struct LeaseState {
    /// picoUSD the database holds for this node on the account (the lease
    /// row's `amount` as this node knows it).
    granted: i64,
    /// Taken out of the wallet because the lease was not renewed in time;
    /// given back if a later renewal finds the lease still there.
    revoked: i64,
    /// Instant (ms since the cluster started) after which the lease may
    /// have expired in the database: spend no more from it.
    deadline_ms: i64,
    /// Last time a request looked at the lease: idle leases are returned.
    last_used_ms: i64,
    /// The size of the last slice taken (the low-water mark is a quarter).
    last_grant: i64,
    /// Little is left in the database for the account: slices are one
    /// request's, and what is unused goes back at once, not when idle.
    scarce: bool,
    /// When the last slice was asked for: a renewal that started before it
    /// may not see its row yet, and must not take it for reclaimed.
    taken_ms: i64,
    /// The database had nothing free for the account until this instant:
    /// requests are refused without a round trip each (a short while).
    exhausted_until_ms: i64,
}

/// The live state a lease feeds.
enum Holder {
    /// An account's wallet: its `headroom` is the lease's unused part.
    Wallet(Arc<LiveAccount>),
    /// A key no account pays for: its `limit` counts the lease
    /// (`LiveKey::lease_start`).
    Key(Arc<LiveKey>),
    /// A key's concurrency: its `slots` count the slots held
    /// (`LiveKey::slots_start`).
    Slots(Arc<LiveKey>),
}

impl Holder {
    /// The lease's unused part.
    fn headroom(&self) -> i64 {
        match self {
            Holder::Wallet(w) => w.headroom(),
            Holder::Key(k) => k.lease_headroom(),
            Holder::Slots(k) => k.slots_free(),
        }
    }

    /// A slice taken: admission may spend it.
    fn release(&self, amount: i64) {
        match self {
            Holder::Wallet(w) => w.release(amount),
            Holder::Key(k) => k.lease_add(amount),
            Holder::Slots(k) => k.slots_add(amount),
        }
    }

    /// Takes `amount` of the unused part out of admission's reach.
    fn take_back(&self, amount: i64) -> bool {
        match self {
            Holder::Wallet(w) => w.try_reserve(amount).is_ok(),
            Holder::Key(k) => k.lease_take_back(amount),
            Holder::Slots(k) => k.slots_take_back(amount),
        }
    }

    fn same(&self, other: &Holder) -> bool {
        match (self, other) {
            (Holder::Wallet(a), Holder::Wallet(b)) => Arc::ptr_eq(a, b),
            (Holder::Key(a), Holder::Key(b)) | (Holder::Slots(a), Holder::Slots(b)) => {
                Arc::ptr_eq(a, b)
            }
            _ => false,
        }
    }
}

/// Which leases [`Cluster::return_idle`] gives back.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Return {
    /// Every one (shutdown).
    All,
    /// Those not used for two sync intervals.
    Idle,
    /// Those of accounts with little left, unused since the last tick.
    Scarce,
}

/// One charge to write to the database: a usage record's cost, or a
/// deduct made through the admin API.
#[derive(Clone, Debug)]
pub struct Charge {
    /// Unique id: inserting it twice is a no-op (so a retry never counts twice).
    pub id: String,
    /// `usage`, `deduct`, `adjust`, `fee`.
    pub kind: &'static str,
    /// The key charged (usage records), if any.
    pub key: Option<KeyHash>,
    /// The account whose lease paid, if any.
    pub account: Option<Arc<str>>,
    /// picoUSD taken from the account (allowance first for usage and
    /// deducts, then balance) and from the lease.
    pub amount: i64,
    /// picoUSD added to the account's lifetime spent.
    pub spent: i64,
    /// Unix ms.
    pub at_ms: i64,
    /// The usage record behind a `usage` charge (what the usage and report
    /// APIs show in cluster mode).
    pub record: Option<Box<crate::store::UsageRecord>>,
}

/// An account's settled money, as the database has it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SettledAccount {
    pub balance: Pico,
    /// What remains of the subscription period's grants (spent first).
    pub allowance: Pico,
    pub spent: Pico,
    /// Σ the leases nodes hold on it now.
    pub leased: Pico,
}

/// A key's settled numbers, as the database has them.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SettledKey {
    /// Σ its settled charges.
    pub usage: Pico,
    /// Its limit (the truth: a node's live limit may be a lease counter).
    pub limit: Option<Pico>,
    /// The id of the period `period_usage` counts (0: none yet).
    pub period: i64,
    /// What it spent in that period (a `limit_reset` key's).
    pub period_usage: Pico,
    /// The kind of that period (`None`: none yet).
    pub period_kind: Option<String>,
}

impl SettledKey {
    /// What counts against its limit at `now_ms` under `reset` (lifetime
    /// usage without one), as the gate counts it on one node.
    pub fn counted(&self, reset: Option<crate::clock::Period>, now_ms: i64) -> Pico {
        match reset {
            None => self.usage,
            Some(p) => Pico(period::spent_in(
                period::At::of(p, now_ms),
                self.period_kind.as_deref(),
                self.period,
                self.period_usage.0,
                self.usage.0,
            )),
        }
    }
}

/// Refusal when the database is needed and unreachable.
pub fn database_unavailable() -> ApiError {
    ApiError::new(
        StatusCode::SERVICE_UNAVAILABLE,
        "server_error",
        "database_unavailable",
        "The gateway cannot reach its database to take credit for this request; retry shortly.",
    )
    .with_retry_after(1)
}

/// The database's connection settings: `cfg`'s URL, a 3 s connect
/// timeout unless it names one, and the node as the application.
fn pg_config(cfg: &ClusterConfig) -> Result<tokio_postgres::Config, String> {
    let url = cfg.postgres_url()?;
    let mut pg: tokio_postgres::Config = url.parse().map_err(|e| {
        format!(
            "cluster: {}: not a valid PostgreSQL URL: {e}",
            cfg.postgres_url_env
        )
    })?;
    if pg.get_connect_timeout().is_none() {
        pg.connect_timeout(Duration::from_secs(3));
    }
    pg.application_name(format!("tollgate {}", cfg.node_id));
    Ok(pg)
}

/// The TLS connector `pg`'s `sslmode` asks for (`None`: plain TCP).
fn tls_for(
    cfg: &ClusterConfig,
    pg: &tokio_postgres::Config,
) -> Result<Option<tokio_postgres_rustls::MakeRustlsConnect>, String> {
    match pg.get_ssl_mode() {
        tokio_postgres::config::SslMode::Disable => Ok(None),
        _ => tls_connector(cfg).map(Some),
    }
}

/// A pool of up to `size` connections (built inside a Tokio runtime).
fn pool_for(
    pg: &tokio_postgres::Config,
    tls: &Option<tokio_postgres_rustls::MakeRustlsConnect>,
    size: usize,
) -> Result<Pool, String> {
    let manager_config = ManagerConfig {
        recycling_method: RecyclingMethod::Fast,
    };
    let mgr = match tls {
        Some(t) => Manager::from_config(pg.clone(), t.clone(), manager_config),
        None => Manager::from_config(pg.clone(), NoTls, manager_config),
    };
    Pool::builder(mgr)
        .max_size(size)
        .runtime(deadpool_postgres::Runtime::Tokio1)
        .wait_timeout(Some(Duration::from_secs(3)))
        .create_timeout(Some(Duration::from_secs(3)))
        .build()
        .map_err(|e| format!("cluster: the connection pool: {e}"))
}

fn tls_connector(cfg: &ClusterConfig) -> Result<tokio_postgres_rustls::MakeRustlsConnect, String> {
    let mut roots = rustls::RootCertStore::empty();
    roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
    if let Some(ca) = &cfg.ca_file {
        use rustls_pki_types::pem::PemObject;
        let certs = rustls_pki_types::CertificateDer::pem_file_iter(ca)
            .map_err(|e| format!("cluster.ca_file {}: {e}", ca.display()))?;
        for c in certs {
            let c = c.map_err(|e| format!("cluster.ca_file {}: {e}", ca.display()))?;
            roots
                .add(c)
                .map_err(|e| format!("cluster.ca_file {}: {e}", ca.display()))?;
        }
    }
    let config = rustls::ClientConfig::builder()
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(tokio_postgres_rustls::MakeRustlsConnect::new(config))
}

/// Milliseconds on a monotonic clock since the first call (lease deadlines
/// must not move with the wall clock or the test clock).
fn mono_ms() -> i64 {
    static START: OnceLock<Instant> = OnceLock::new();
    START.get_or_init(Instant::now).elapsed().as_millis() as i64
}

impl Cluster {
    /// Connects, migrates, and pulls every key and account into the local
    /// store before the node serves; then starts the background work.
    /// Blocks (called once at start, outside any runtime).
    pub fn start(cfg: &ClusterConfig, app: &Arc<App>) -> Result<Arc<Cluster>, String> {
        let pg = pg_config(cfg)?;
        let (handle_tx, handle_rx) = std::sync::mpsc::channel();
        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
        std::thread::Builder::new()
            .name("tollgate-cluster".to_owned())
            .spawn(move || {
                let rt = match tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                {
                    Ok(rt) => rt,
                    Err(e) => {
                        let _ = handle_tx.send(Err(e.to_string()));
                        return;
                    }
                };
                let _ = handle_tx.send(Ok(rt.handle().clone()));
                rt.block_on(async {
                    let _ = stop_rx.await;
                });
            })
            .map_err(|e| format!("cluster: starting its thread: {e}"))?;
        let rt = handle_rx
            .recv()
            .map_err(|e| e.to_string())?
            .map_err(|e| format!("cluster: its runtime: {e}"))?;
        let tls = tls_for(cfg, &pg)?;
        let pool = {
            let _enter = rt.enter();
            pool_for(&pg, &tls, cfg.pool_size)?
        };
        let mut boot = [0u8; 6];
        getrandom::fill(&mut boot).map_err(|e| format!("cluster: random source: {e}"))?;
        let cluster = Arc::new(Cluster {
            cfg: cfg.clone(),
            boot: hex::encode(boot),
            rt,
            pool,
            pg,
            tls,
            app: OnceLock::new(),
            leases: DashMap::new(),
            rates: DashMap::new(),
            charges: Mutex::new(VecDeque::new()),
            pending: Mutex::new(VecDeque::new()),
            pushing: tokio::sync::Mutex::new(()),
            next_id: AtomicU64::new(0),
            last_seq: AtomicI64::new(0),
            audit_shipped: AtomicU64::new(0),
            pulling: tokio::sync::Mutex::new(()),
            ledger_turn: tokio::sync::Mutex::new(()),
            ledger_backfilled: AtomicBool::new(false),
            wake: Notify::new(),
            outbox_shipped: Notify::new(),
            shipping: tokio::sync::Mutex::new(()),
            stopping: AtomicBool::new(false),
            db_down: AtomicBool::new(false),
            _stop: stop_tx,
        });
        let _ = cluster.app.set(Arc::downgrade(app));
        // Before any wallet is loaded: every wallet draws from leases (and
        // the store leaves the funds check of admin deducts to them, and
        // marks ledger entries for shipping).
        app.gate.wallets().set_leased();
        app.store.set_clustered();
        let c = cluster.clone();
        let started = cluster
            .block_on(async move {
                let version = schema::migrate(&c.pool).await?;
                let filled = c.fill_list_columns().await?;
                if filled > 0 {
                    tracing::info!(
                        rows = filled,
                        "cluster: list columns of earlier rows filled"
                    );
                }
                let conn = c.pool.get().await.map_err(pool_error)?;
                let old = lease::reclaim_node(&conn, &c.cfg.node_id).await?;
                if old > 0 {
                    tracing::warn!(
                        leases = old,
                        "cluster: leases of this node's previous run returned"
                    );
                }
                drop(conn);
                // Before the pull: a change this node made while the
                // database was down (then was killed or stopped) is
                // written first, so the pull does not undo it locally.
                let kept = c.load_unsent()?;
                if kept > 0 {
                    let all = c.push_pending().await;
                    tracing::info!(
                        changes = kept,
                        all,
                        "cluster: changes kept from the last run written to the database"
                    );
                }
                let n = c.pull().await?;
                Ok::<_, String>((version, n))
            })
            .map_err(|e| format!("cluster: {e}"))?;
        tracing::info!(
            node = %cfg.node_id,
            schema = started.0,
            changes = started.1,
            "cluster: joined; keys and accounts pulled from the database"
        );
        cluster.rt.spawn(cluster.clone().ticks());
        cluster.rt.spawn(cluster.clone().listen());
        Ok(cluster)
    }

    /// Runs `fut` on the cluster's runtime and waits for it (from outside
    /// any runtime: start and shutdown).
    fn block_on<T: Send + 'static>(
        &self,
        fut: impl std::future::Future<Output = Result<T, String>> + Send + 'static,
    ) -> Result<T, String> {
        let (tx, rx) = std::sync::mpsc::channel();
        self.rt.spawn(async move {
            let _ = tx.send(fut.await);
        });
        rx.recv()
            .map_err(|_| "cluster: its runtime stopped".to_owned())?
    }

    /// Runs `fut` on the cluster's runtime and awaits it from any runtime.
    async fn run<T: Send + 'static>(
        &self,
        fut: impl std::future::Future<Output = Result<T, String>> + Send + 'static,
    ) -> Result<T, String> {
        match self.rt.spawn(fut).await {
            Ok(r) => r,
            Err(e) => Err(format!("cluster task: {e}")),
        }
    }

    fn app(&self) -> Option<Arc<App>> {
        self.app.get().and_then(Weak::upgrade)
    }

    /// This node's name.
    pub fn node_id(&self) -> &str {
        &self.cfg.node_id
    }

    /// A new entry id, unique across nodes and runs.
    pub fn entry_id(&self, kind: &str) -> String {
        let n = self.next_id.fetch_add(1, Ordering::Relaxed);
        format!("{kind}:{}:{}:{n}", self.cfg.node_id, self.boot)
    }

    /// The lease state of `subject`, made on first use. `None` for a key
    /// without a limit (it needs no lease). A holder replaced (an account
    /// deleted and made again, a key evicted from memory and loaded again)
    /// gets a new state that carries the old one's numbers over.
    fn held(&self, subject: Subject, holder: Holder) -> Option<Arc<Held>> {
        use dashmap::mapref::entry::Entry;
        if let Some(h) = self.leases.get(&subject)
            && h.holder.same(&holder)
        {
            return Some(h.clone());
        }
        // Under the entry lock: no request of the key finds the state
        // before its limit became a lease counter.
        let start = |holder: &Holder| match holder {
            Holder::Wallet(_) => true,
            Holder::Key(k) => k.lease_start(),
            Holder::Slots(k) => {
                k.slots_start();
                true
            }
        };
        match self.leases.entry(subject.clone()) {
            Entry::Occupied(mut e) => {
                if e.get().holder.same(&holder) {
                    return Some(e.get().clone());
                }
                if !start(&holder) {
                    e.remove();
                    return None;
                }
                let old = e
                    .get()
                    .state
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .granted;
                let fresh = Arc::new(Held {
                    holder,
                    subject,
                    taking: tokio::sync::Mutex::new(()),
                    state: Mutex::new(LeaseState {
                        granted: old,
                        ..LeaseState::default()
                    }),
                });
                e.insert(fresh.clone());
                Some(fresh)
            }
            Entry::Vacant(v) => {
                if !start(&holder) {
                    return None;
                }
                let fresh = Arc::new(Held {
                    holder,
                    subject,
                    taking: tokio::sync::Mutex::new(()),
                    state: Mutex::new(LeaseState::default()),
                });
                v.insert(fresh.clone());
                Some(fresh)
            }
        }
    }

    // ---- the request path ----

    /// Before a request reserves: makes sure the lease of the key's account
    /// holds `want` (the request's bound), taking a slice from the database
    /// when it does not. A key without an account, or an unlimited account,
    /// costs one map read. Not enough free credit is not an error here: the
    /// gate then refuses (402) or lowers the request (`cap`) as it always
    /// does. The database unreachable while the lease is short: 503.
    pub async fn ensure_credit(
        &self,
        key: &Arc<LiveKey>,
        policy: &Policy,
        want: Pico,
        cap: bool,
        now_ms: i64,
    ) -> Result<(), ApiError> {
        let Some(app) = self.app() else {
            return Ok(());
        };
        if let Some(owner) = policy.record.owner.as_deref()
            && let Some(wallet) = app.gate.wallets().of(owner, now_ms)?
        {
            // The account pays; a key with its own limit also holds a
            // slice of that limit, so the limit holds across the nodes
            // too (settlement lowers both leases by the charge).
            self.ensure_wallet(&wallet, want.0, cap).await?;
            return self.ensure_key(key, want.0, cap).await;
        }
        // A limit that starts again each period is leased the same way,
        // of what the key spent in the period ([`period`]).
        self.ensure_key(key, want.0, cap).await
    }

    /// Whether this node holds a lease of `hash`'s own limit.
    fn holds_key_lease(&self, hash: &[u8]) -> bool {
        KeyHash::try_from(hash).is_ok_and(|h| self.leases.get(&Subject::Key(h)).is_some())
    }

    /// Before a request takes a concurrency slot: a key with a
    /// `concurrency` (its own, or its subscription plan's template) holds
    /// slots of it taken from the database, so that the requests in flight
    /// on all nodes together never exceed it. When none is free the gate
    /// refuses (429) as it always does.
    pub async fn ensure_slot(&self, key: &Arc<LiveKey>, policy: &Policy) -> Result<(), ApiError> {
        if policy.record.concurrency.is_none() {
            return Ok(());
        }
        let Some(held) = self.held(Subject::Slots(key.hash), Holder::Slots(key.clone())) else {
            return Ok(());
        };
        self.ensure_held(held, 1, false).await
    }

    /// [`Cluster::ensure_credit`] for a wallet (also the admin deduct).
    pub async fn ensure_wallet(
        &self,
        wallet: &Arc<LiveAccount>,
        want: i64,
        cap: bool,
    ) -> Result<(), ApiError> {
        if wallet.is_unlimited() || want <= 0 {
            return Ok(());
        }
        let Some(held) = self.held(
            Subject::Account(wallet.id.clone()),
            Holder::Wallet(wallet.clone()),
        ) else {
            return Ok(());
        };
        self.ensure_held(held, want, cap).await
    }

    /// [`Cluster::ensure_credit`] for a key with its own limit and no
    /// account (also its admin deduct). A key without a limit: nothing.
    pub async fn ensure_key(
        &self,
        key: &Arc<LiveKey>,
        want: i64,
        cap: bool,
    ) -> Result<(), ApiError> {
        // No limit (and not a lease counter): nothing to lease, no map write.
        if want <= 0 || key.limit().is_none() {
            return Ok(());
        }
        let Some(held) = self.held(Subject::Key(key.hash), Holder::Key(key.clone())) else {
            return Ok(());
        };
        self.ensure_held(held, want, cap).await
    }

    /// An admin deduct from a key's own credit: leased like a request of
    /// the key would be (nothing when an account pays for the key).
    pub async fn ensure_key_own(
        &self,
        gate: &crate::gate::Gate,
        key: &Arc<LiveKey>,
        amount: i64,
    ) -> Result<(), ApiError> {
        let policy = key.policy();
        if let Some(owner) = policy.record.owner.as_deref()
            && gate.wallets().of(owner, gate.clock().now_ms())?.is_some()
        {
            return Ok(());
        }
        self.ensure_key(key, amount, false).await
    }

    async fn ensure_held(&self, held: Arc<Held>, want: i64, cap: bool) -> Result<(), ApiError> {
        let (low_water, scarce) = {
            let mut s = held.state.lock().unwrap_or_else(|e| e.into_inner());
            s.last_used_ms = mono_ms();
            (s.last_grant / 4, s.scarce)
        };
        let have = held.holder.headroom();
        if have >= want {
            // Renew before the slice runs out: a request that leaves less
            // than a quarter of the last slice starts the next take in the
            // background, so the requests after it need not wait.
            if !scarce
                && have - want < low_water
                && let Some(me) = self.app().and_then(|a| a.cluster.get().cloned())
            {
                let held = held.clone();
                self.rt.spawn(async move {
                    if let Ok(_turn) = held.taking.try_lock() {
                        let _ = me.take_slice(&held, want, want).await;
                    }
                });
            }
            return Ok(());
        }
        let _turn = held.taking.lock().await;
        let have = held.holder.headroom();
        if have >= want {
            return Ok(());
        }
        let need = want - have.max(0);
        let min = if cap { 1 } else { need };
        match self.take_slice(&held, need, min).await {
            Err(e) => {
                self.note_down(&e);
                Err(database_unavailable())
            }
            Ok(_) => Ok(()),
        }
    }

    /// One take from the database into `held`'s wallet (the caller holds
    /// `held.taking`). `Ok(false)`: nothing free (or asked too recently).
    async fn take_slice(&self, held: &Arc<Held>, need: i64, min: i64) -> Result<bool, String> {
        {
            let s = held.state.lock().unwrap_or_else(|e| e.into_inner());
            if s.exhausted_until_ms > mono_ms() {
                return Ok(false);
            }
        }
        let cfg = self.cfg.clone();
        let pool = self.pool.clone();
        let subject = held.subject.clone();
        // Slots: the concurrency that applies (the key's own, else its
        // plan's template), for a key with none of its own in the database.
        let slot_cap = match &held.holder {
            Holder::Slots(k) => k.policy().record.concurrency.map(i64::from),
            _ => None,
        };
        // A key's limit that starts again each period: the period at this
        // node's clock, which the take rolls the database's row to.
        let period = match (&held.holder, self.app()) {
            (Holder::Key(k), Some(app)) => k
                .policy()
                .record
                .limit_reset
                .map(|p| period::At::of(p, app.clock.now_ms())),
            _ => None,
        };
        let asked = mono_ms();
        let grant = self
            .run(async move {
                let mut c = pool.get().await.map_err(pool_error)?;
                match lease::take(&mut c, &cfg, &subject, need, min, slot_cap, period).await {
                    // Once more on a failed statement (a lock timeout, a
                    // connection the server closed): an outage fails twice.
                    Err(_) => {
                        let mut c = pool.get().await.map_err(pool_error)?;
                        lease::take(&mut c, &cfg, &subject, need, min, slot_cap, period).await
                    }
                    ok => ok,
                }
            })
            .await?;
        self.note_up();
        let mut s = held.state.lock().unwrap_or_else(|e| e.into_inner());
        match grant {
            None => {
                s.exhausted_until_ms = mono_ms() + self.exhausted_pause_ms();
                s.scarce = true;
                Ok(false)
            }
            Some(g) => {
                s.granted += g.amount;
                s.last_grant = g.amount;
                s.scarce = g.free_after < self.cfg.lease_floor.0.saturating_mul(2);
                s.deadline_ms = asked + self.lease_spend_ms();
                s.taken_ms = mono_ms();
                drop(s);
                held.holder.release(g.amount);
                Ok(true)
            }
        }
    }

    /// A key's limit changed (an update, a top-up, another node's change).
    /// A key whose limit is a lease counter here keeps it: the database has
    /// the new limit and hands out slices of it. Otherwise the gate's limit
    /// is set as in single-node mode.
    pub fn key_limit_changed(&self, gate: &crate::gate::Gate, hash: &KeyHash, limit: Option<Pico>) {
        let subject = Subject::Key(*hash);
        let leased = self.leases.get(&subject).is_some_and(|h| {
            gate.peek(hash)
                .is_some_and(|k| h.holder.same(&Holder::Key(k)))
        });
        match (leased, limit) {
            (true, Some(_)) => {}
            (true, None) => {
                // No limit: no lease needed; what the database holds for
                // this node on it is returned when it expires.
                self.leases.remove(&subject);
                gate.set_limit(hash, None);
            }
            (false, _) => gate.set_limit(hash, limit),
        }
    }

    /// Whether `key`'s limit is leased here (it has a lease state for this
    /// very key in memory).
    fn key_leased(&self, key: &Arc<LiveKey>) -> bool {
        self.leases
            .get(&Subject::Key(key.hash))
            .is_some_and(|h| h.holder.same(&Holder::Key(key.clone())))
    }

    /// A key's own credit changed through the admin API (not a replay):
    /// a deduct came out of its lease (when it has one) and is settled as
    /// a charge; a refund gives usage back in the database, and the credit
    /// it gave back here is the database's to hand out again.
    pub fn key_credited(&self, key: &Arc<LiveKey>, entry: &crate::store::LedgerEntry) {
        let hash = key.hash;
        let id = match &entry.idempotency_key {
            Some(k) => format!("kcredit:{}:{k}", hex::encode(hash)),
            None => self.entry_id("kcredit"),
        };
        let amount = entry.amount.0;
        let (kind, lease_amount, spent) = match entry.kind {
            crate::store::LedgerKind::Deduct => ("deduct", amount, amount),
            crate::store::LedgerKind::Refund => {
                if self.key_leased(key) {
                    key.lease_refunded(amount);
                }
                ("refund", 0, -amount)
            }
            _ => return,
        };
        self.charge_account(Charge {
            id,
            kind,
            key: Some(hash),
            account: None,
            amount: lease_amount,
            spent,
            at_ms: entry.at_ms,
            record: None,
        });
    }

    /// How long a lease may be spent after the renewal that started at
    /// some instant: the ttl less one tick, so it stops before the
    /// database may give it to another node.
    fn lease_spend_ms(&self) -> i64 {
        self.cfg.lease_ttl.as_millis() as i64 - self.cfg.sync_interval.as_millis() as i64
    }

    /// After the database had nothing free: how long requests are refused
    /// without asking again (a fraction of the sync interval, so credit
    /// another node gives back is found soon).
    fn exhausted_pause_ms(&self) -> i64 {
        (self.cfg.sync_interval.as_millis() as i64 / 10).clamp(10, 200)
    }

    /// A settlement's charge (cost and daily fee) and its usage record, to
    /// write to the database (every record, also one that cost nothing: the
    /// usage API reads them there). Called once per settled request; never
    /// blocks.
    pub fn charged(&self, record: &crate::store::UsageRecord, amount: Pico) {
        let charge = Charge {
            id: self.entry_id("u"),
            kind: "usage",
            key: Some(record.key),
            account: record.account.clone(),
            amount: amount.0,
            spent: amount.0,
            at_ms: record.at_ms,
            record: Some(Box::new(record.clone())),
        };
        self.charges
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push_back(charge);
    }

    /// An admin charge on an account that came out of its lease (a deduct,
    /// or a negative adjust), to write to the database.
    pub fn charge_account(&self, charge: Charge) {
        self.charges
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push_back(charge);
    }

    fn note_down(&self, e: &str) {
        if !self.db_down.swap(true, Ordering::AcqRel) {
            tracing::warn!(error = %e, "cluster: the database is unreachable; serving from leases");
        }
    }

    fn note_up(&self) {
        if self.db_down.swap(false, Ordering::AcqRel) {
            tracing::info!("cluster: the database is reachable again");
        }
    }

    /// Whether the last database call failed.
    pub fn database_down(&self) -> bool {
        self.db_down.load(Ordering::Acquire)
    }

    // ---- what the admin API reads in cluster mode ----

    /// An account's settled money from the database (`None`: not there).
    pub async fn account_money(&self, id: &str) -> Result<Option<SettledAccount>, ApiError> {
        let pool = self.pool.clone();
        let id = id.to_owned();
        self.run(async move {
            let c = pool.get().await.map_err(pool_error)?;
            let row = c
                .query_opt(
                    "SELECT balance, spent, leased, allowance FROM tollgate_accounts \
                     WHERE id = $1 AND NOT deleted",
                    &[&id],
                )
                .await
                .map_err(db)
                .map(count(Kind::Read, 2))?;
            Ok(row.map(|r| SettledAccount {
                balance: Pico(r.get(0)),
                spent: Pico(r.get(1)),
                leased: Pico(r.get(2)),
                allowance: Pico(r.get(3)),
            }))
        })
        .await
        .map_err(|e| {
            self.note_down(&e);
            database_unavailable()
        })
    }

    /// A key's settled usage and its limit from the database (`None`: not there).
    pub async fn key_usage(&self, hash: &KeyHash) -> Result<Option<SettledKey>, ApiError> {
        let pool = self.pool.clone();
        let hash = hash.to_vec();
        self.run(async move {
            let c = pool.get().await.map_err(pool_error)?;
            let row = c
                .query_opt(
                    "SELECT usage, key_limit, period, period_usage, period_kind FROM tollgate_keys \
                     WHERE hash = $1 AND NOT deleted",
                    &[&hash],
                )
                .await
                .map_err(db)
                .map(count(Kind::Read, 2))?;
            Ok(row.map(|r| SettledKey {
                usage: Pico(r.get(0)),
                limit: r.get::<_, Option<i64>>(1).map(Pico),
                period: r.get(2),
                period_usage: Pico(r.get(3)),
                period_kind: r.get(4),
            }))
        })
        .await
        .map_err(|e| {
            self.note_down(&e);
            database_unavailable()
        })
    }

    // ---- background work ----

    /// Settles every `sync_interval / 4`; every `sync_interval` (or when
    /// NOTIFY says so) pulls changes, renews, returns idle leases and
    /// reclaims expired ones.
    async fn ticks(self: Arc<Self>) {
        let sync_every = self.cfg.sync_interval.0;
        let settle_every = (sync_every / 4).max(Duration::from_millis(20));
        let mut last_sync = Instant::now();
        let mut pruned_minute = 0;
        loop {
            let notified = tokio::select! {
                _ = tokio::time::sleep(settle_every) => false,
                _ = self.wake.notified() => true,
            };
            if self.stopping.load(Ordering::Acquire) {
                return;
            }
            self.settle().await;
            self.push_pending().await;
            self.ship_audit().await;
            self.ship_events().await;
            self.ship_ledger().await;
            self.return_idle(Return::Scarce).await;
            self.return_rates(false).await;
            if notified {
                if let Err(e) = self.pull().await {
                    self.note_down(&e);
                }
            }
            if last_sync.elapsed() >= sync_every {
                last_sync = Instant::now();
                if !notified && let Err(e) = self.pull().await {
                    self.note_down(&e);
                }
                self.renew().await;
                self.return_idle(Return::Idle).await;
                if let Some(app) = self.app() {
                    let minute = crate::gate::minute_of(app.clock.now_ms());
                    if minute != pruned_minute && !self.rates.is_empty() {
                        match self.prune_rates(minute).await {
                            Ok(()) => pruned_minute = minute,
                            Err(e) => self.note_down(&e),
                        }
                    }
                }
                let pool = self.pool.clone();
                let reclaimed = async move {
                    let c = pool.get().await.map_err(pool_error)?;
                    lease::reclaim(&c).await
                }
                .await;
                match reclaimed {
                    Ok(n) if n > 0 => {
                        tracing::info!(accounts = n, "cluster: expired leases reclaimed")
                    }
                    Ok(_) => {}
                    Err(e) => self.note_down(&e),
                }
            }
        }
    }

    /// Writes the queued charges in one transaction; on failure they stay
    /// queued (first) and are written on a later tick.
    async fn settle(&self) {
        let batch: Vec<Charge> = {
            let mut q = self.charges.lock().unwrap_or_else(|e| e.into_inner());
            let n = q.len().min(10_000);
            q.drain(..n).collect()
        };
        if batch.is_empty() {
            return;
        }
        match self.write_charges(&batch).await {
            Ok(taken) => {
                self.note_up();
                for (subject, down) in taken {
                    if let Some(h) = self.leases.get(&subject) {
                        let mut s = h.state.lock().unwrap_or_else(|e| e.into_inner());
                        s.granted -= down;
                    }
                }
            }
            Err(e) => {
                self.note_down(&e);
                let mut q = self.charges.lock().unwrap_or_else(|e| e.into_inner());
                for c in batch.into_iter().rev() {
                    q.push_front(c);
                }
            }
        }
    }

    /// One transaction: the entries (new ones only) and their records'
    /// rollups (`rollups::insert_entries`), the keys' usage, the
    /// accounts' balance and spent, and this node's leases lowered by what
    /// was charged. Returns by how much each account's lease went down.
    async fn write_charges(&self, batch: &[Charge]) -> Result<Vec<(Subject, i64)>, String> {
        let mut c = self.pool.get().await.map_err(pool_error)?;
        let tx = c
            .transaction()
            .await
            .map_err(db)
            .map(count(Kind::Settle, 1))?;
        let node = self.cfg.node_id.as_str();
        let rows = rollups::insert_entries(&tx, node, batch).await?;
        let mut per_key: HashMap<Vec<u8>, i64> = HashMap::new();
        // Per account: what is spent like usage ((at_ms, amount), drawn
        // from the allowance first), Σ the rest (balance only), Σ spent.
        let mut per_account: HashMap<String, allowance::AccountCharges> = HashMap::new();
        // Charges out of a key's own lease: those no account paid, and
        // those of a key with its own limit under an account.
        let mut per_key_lease: HashMap<Vec<u8>, i64> = HashMap::new();
        // (key, period of the charge, amount) of keys whose limit starts
        // again each period ([`period::settle`]).
        let mut per_period: Vec<(Vec<u8>, period::At, i64)> = Vec::new();
        let mut resets: HashMap<Vec<u8>, Option<crate::clock::Period>> = HashMap::new();
        for r in &rows {
            let key: Option<Vec<u8>> = r.get(0);
            let account: Option<String> = r.get(1);
            let amount: i64 = r.get(2);
            let spent: i64 = r.get(3);
            let kind: &str = r.get(4);
            let at_ms: i64 = r.get(5);
            // A record that cost nothing moves no money (no row to lock).
            if let Some(k) = &key
                && spent != 0
            {
                *per_key.entry(k.clone()).or_default() += spent;
                let reset = *resets
                    .entry(k.clone())
                    .or_insert_with(|| self.limit_reset_of(k));
                if let Some(p) = reset {
                    per_period.push((k.clone(), period::At::of(p, at_ms), spent));
                }
            }
            match (account, key) {
                (Some(a), k) if amount != 0 || spent != 0 => {
                    let e = per_account.entry(a).or_default();
                    if allowance::draws_on_allowance(kind, amount) {
                        e.draws.push((at_ms, amount));
                    } else {
                        e.other += amount;
                    }
                    e.spent += spent;
                    // A key with its own limit under an account: the
                    // charge comes out of the key's lease too, when this
                    // node holds one.
                    if let Some(k) = k
                        && amount > 0
                        && self.holds_key_lease(&k)
                    {
                        *per_key_lease.entry(k).or_default() += amount;
                    }
                }
                (None, Some(k)) if amount > 0 => {
                    *per_key_lease.entry(k).or_default() += amount;
                }
                _ => {}
            }
        }
        if !per_key.is_empty() {
            let mut per_key: Vec<(Vec<u8>, i64)> = per_key.into_iter().collect();
            per_key.sort();
            let (hs, cs): (Vec<Vec<u8>>, Vec<i64>) = per_key.into_iter().unzip();
            // Rows locked in one order (keys, then accounts, each sorted; a
            // subject before its lease) by every writer on every node.
            tx.execute(
                "SELECT 1 FROM (SELECT hash FROM tollgate_keys WHERE hash = ANY($1) \
                 ORDER BY hash FOR UPDATE) AS locked",
                &[&hs],
            )
            .await
            .map_err(db)
            .map(count(Kind::Settle, 2))?;
            // Before `usage` moves: a row rolled from no period takes the
            // usage before this batch.
            period::settle(&tx, &per_period).await?;
            tx.execute(
                "UPDATE tollgate_keys k SET usage = k.usage + d.c \
                 FROM UNNEST($1::bytea[], $2::int8[]) AS d(h, c) WHERE k.hash = d.h",
                &[&hs, &cs],
            )
            .await
            .map_err(db)
            .map(count(Kind::Settle, 2))?;
        }
        let mut taken = Vec::with_capacity(per_account.len() + per_key_lease.len());
        let mut accounts: Vec<_> = per_account.into_iter().collect();
        // One lock order for every writer: no deadlock between nodes.
        accounts.sort_by(|a, b| a.0.cmp(&b.0));
        for (account, charges) in accounts {
            let allowance::AccountCharges {
                draws,
                other,
                spent,
            } = charges;
            let subject = Subject::Account(Arc::from(account.as_str()));
            // The account's row first (the lock order of `lease_down`):
            // the split is made on the allowance as committed.
            let now = tx
                .query_opt(
                    "SELECT allowance, allowance_lapsed, allowance_lapsed_at_ms \
                     FROM tollgate_accounts WHERE id = $1 FOR UPDATE",
                    &[&account],
                )
                .await
                .map_err(db)
                .map(count(Kind::Settle, 2))?
                .map(|r| allowance::Allowance {
                    allowance: r.get(0),
                    lapsed: r.get(1),
                    lapsed_at_ms: r.get(2),
                })
                .unwrap_or_default();
            let split = allowance::split(now, &draws);
            let amount = draws.iter().map(|d| d.1).sum::<i64>() + other;
            let down = lease::lease_down(&tx, node, &subject, amount).await?;
            tx.execute(
                "UPDATE tollgate_accounts SET allowance = allowance - $5, \
                 allowance_lapsed = allowance_lapsed - $6, balance = balance - $2, \
                 spent = spent + $3, leased = leased - $4 WHERE id = $1",
                &[
                    &account,
                    &(amount - split.from_allowance - split.from_lapsed),
                    &spent,
                    &down,
                    &split.from_allowance,
                    &split.from_lapsed,
                ],
            )
            .await
            .map_err(db)
            .map(count(Kind::Settle, 2))?;
            taken.push((subject, down));
        }
        let mut keys: Vec<_> = per_key_lease.into_iter().collect();
        keys.sort();
        for (hash, amount) in keys {
            let Ok(h) = KeyHash::try_from(hash.as_slice()) else {
                continue;
            };
            let subject = Subject::Key(h);
            let down = lease::lease_down(&tx, node, &subject, amount).await?;
            if down > 0 {
                tx.execute(
                    "UPDATE tollgate_keys SET leased = leased - $2 WHERE hash = $1",
                    &[&hash, &down],
                )
                .await
                .map_err(db)
                .map(count(Kind::Settle, 2))?;
                taken.push((subject, down));
            }
        }
        tx.commit().await.map_err(db).map(count(Kind::Settle, 1))?;
        Ok(taken)
    }

    /// The `limit_reset` of a key, as the gate rolls it (its policy in
    /// memory, else its record in the store).
    fn limit_reset_of(&self, hash: &[u8]) -> Option<crate::clock::Period> {
        let hash = KeyHash::try_from(hash).ok()?;
        let app = self.app()?;
        if let Some(k) = app.gate.peek(&hash) {
            return k.policy().record.limit_reset;
        }
        app.store.key(&hash).ok().flatten()?.0.limit_reset
    }

    /// Renews this node's leases. One that no longer exists (reclaimed
    /// after the node could not renew in time) is dropped from the wallet;
    /// one past its local deadline stops being spent until renewed.
    async fn renew(&self) {
        if self.leases.is_empty() {
            return;
        }
        let started = mono_ms();
        let pool = self.pool.clone();
        let node = self.cfg.node_id.clone();
        let ttl = self.cfg.lease_ttl.as_millis() as i64;
        let renewed = async move {
            let c = pool.get().await.map_err(pool_error)?;
            lease::renew(&c, &node, ttl).await
        }
        .await;
        match renewed {
            Ok(rows) => {
                self.note_up();
                let live: std::collections::HashSet<Subject> = rows.into_iter().collect();
                for h in self.leases.iter() {
                    let mut s = h.state.lock().unwrap_or_else(|e| e.into_inner());
                    if live.contains(h.key()) {
                        s.deadline_ms = started + self.lease_spend_ms();
                        if s.revoked > 0 {
                            h.holder.release(s.revoked);
                            s.revoked = 0;
                        }
                    } else if (s.granted > 0 || s.revoked > 0) && s.taken_ms < started {
                        // Reclaimed: what is unspent of it is not ours.
                        let take = h.holder.headroom().clamp(0, s.granted);
                        if take > 0 && !h.holder.take_back(take) {
                            tracing::warn!(lease = ?h.key(), "cluster: a reclaimed lease was partly spent");
                        }
                        tracing::warn!(lease = ?h.key(), "cluster: this node's lease was reclaimed");
                        s.granted = 0;
                        s.revoked = 0;
                    }
                }
            }
            Err(e) => {
                self.note_down(&e);
                let now = mono_ms();
                for h in self.leases.iter() {
                    let mut s = h.state.lock().unwrap_or_else(|e| e.into_inner());
                    if s.granted > 0 && now > s.deadline_ms {
                        let take = h.holder.headroom().clamp(0, s.granted - s.revoked);
                        if take > 0 && h.holder.take_back(take) {
                            s.revoked += take;
                        }
                    }
                }
            }
        }
    }

    /// Gives back the unused part of leases, as `which` says.
    async fn return_idle(&self, which: Return) {
        let now = mono_ms();
        let idle_ms = match which {
            Return::All => -1,
            // Scarce: unused for a settle tick; others: two sync intervals.
            Return::Scarce => self.cfg.sync_interval.as_millis() as i64 / 4,
            Return::Idle => 2 * self.cfg.sync_interval.as_millis() as i64,
        };
        let idle: Vec<Arc<Held>> = self
            .leases
            .iter()
            .filter(|h| {
                let s = h.state.lock().unwrap_or_else(|e| e.into_inner());
                s.granted > 0
                    && (which != Return::Scarce || s.scarce)
                    && now - s.last_used_ms > idle_ms
            })
            .map(|h| h.value().clone())
            .collect();
        self.give_back_unused(idle).await;
    }

    /// A subscription change of `account` (this node's, or pulled) may
    /// have lapsed its allowance: this node's unused slice of it was taken
    /// from credit that may be gone, so it goes back now, and the next
    /// request takes a slice of what the account has after the change.
    pub async fn return_account(&self, account: &str) {
        let subject = Subject::Account(Arc::from(account));
        let held: Vec<Arc<Held>> = self
            .leases
            .get(&subject)
            .map(|h| h.value().clone())
            .into_iter()
            .collect();
        self.give_back_unused(held).await;
    }

    /// Gives the unused part of each lease back to the database.
    async fn give_back_unused(&self, held: Vec<Arc<Held>>) {
        for h in held {
            let back = {
                let s = h.state.lock().unwrap_or_else(|e| e.into_inner());
                h.holder.headroom().clamp(0, s.granted - s.revoked)
            };
            if back <= 0 || !h.holder.take_back(back) {
                continue;
            }
            let pool = self.pool.clone();
            let node = self.cfg.node_id.clone();
            let subject = h.subject.clone();
            // On the cluster's runtime (a pull may run on another).
            let given = self
                .run(async move {
                    let mut c = pool.get().await.map_err(pool_error)?;
                    lease::give_back(&mut c, &node, &subject, back).await
                })
                .await;
            match given {
                // Less given back than taken out (reclaimed meanwhile): the
                // rest was not this node's any more, and stays out.
                Ok(given) => {
                    let mut s = h.state.lock().unwrap_or_else(|e| e.into_inner());
                    s.granted -= given;
                }
                Err(e) => {
                    self.note_down(&e);
                    h.holder.release(back);
                }
            }
        }
    }

    /// Shutdown: writes what is queued and gives every lease back, so the
    /// other nodes need not wait for `lease_ttl`. Blocks, at most `wait`.
    pub fn shutdown(self: &Arc<Self>, wait: Duration) {
        let c = self.clone();
        let (tx, rx) = std::sync::mpsc::channel();
        self.rt.spawn(async move {
            c.settle().await;
            c.push_pending().await;
            c.settle().await;
            c.ship_events().await;
            c.ship_ledger().await;
            c.return_idle(Return::All).await;
            c.return_rates(true).await;
            c.stopping.store(true, Ordering::Release);
            c.wake.notify_waiters();
            let _ = tx.send(());
        });
        if rx.recv_timeout(wait).is_err() {
            tracing::warn!(
                "cluster: shutdown could not return every lease in time; they expire after lease_ttl"
            );
        }
    }
}
