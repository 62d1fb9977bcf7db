//! Admin changes between nodes (keys, accounts, money outside the leases,
//! scoped admin tokens): written to the database after the local store has
//! them, pulled by every other node and applied to its store and caches.
//!
//! A change carries no state of its own: it names what changed, and the
//! record written is read from the local store when it is written, so a
//! change retried after an outage writes the latest state, not a stale one.
//!
//! Until the database has it, a change is kept in the local store too
//! ([`Change::encode`], `store::unsent`): a node killed or stopped during an
//! outage writes it when it starts again. Every write of a change is
//! idempotent (a credit is one entry id; the other kinds write the current
//! record), so one written twice after a crash changes nothing.

use std::sync::Arc;
use std::sync::atomic::Ordering;

use futures_util::StreamExt;
use serde::{Deserialize, Serialize};
use tokio_postgres::{AsyncMessage, NoTls};

use super::Cluster;
use super::schema::{CHANGE_LOCK, CHANNEL, db, pool as pool_error};
use super::trips::{Kind, count};
use crate::app::App;
use crate::money::Pico;
use crate::store::{Account, AccountRecord, KeyHash, Store};

tokio::task_local! {
    /// Set while this node applies changes pulled from the database.
    static REPLICATING: ();
}

/// Whether the running task applies another node's change (the store then
/// writes it without emitting events: they were emitted where it was made).
pub fn replicating() -> bool {
    REPLICATING.try_with(|_| ()).is_ok()
}

/// A key's row as pulled: hash, record, deleted, limit.
type KeyRow = (Vec<u8>, Vec<u8>, bool, Option<i64>);

/// What an admin write changed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Change {
    /// A key was created, updated or deleted (its limit too).
    Key(KeyHash),
    /// An account's profile was created, updated or deleted.
    Account(String),
    /// A scoped admin token was created or deleted (its id). The database
    /// gets its record (name, scopes, SHA-256 of the token), never the token.
    AdminToken(String),
    /// A subscription was written by this node (its id): the database gets
    /// its record, the other nodes pull it (`cluster::subscriptions`).
    Subscription(String),
    /// Money added to an account outside the leases (top-up, refund,
    /// positive adjust), once per `id`.
    Credit {
        /// Entry id: the same id never applies twice, on any node.
        id: String,
        account: String,
        kind: &'static str,
        /// picoUSD added to the balance.
        amount: i64,
        /// picoUSD added to `spent` (a refund: −amount).
        spent: i64,
        at_ms: i64,
    },
}

/// The credit kinds a [`Change::Credit`] carries (`api::cluster`): a kept
/// change names one of these, so decoding gives back the `&'static str`.
const CREDIT_KINDS: [&str; 4] = ["topup", "refund", "adjust", "reversal"];

/// A [`Change`] as the local store keeps it until the database has it
/// (JSON, short tags: a few dozen bytes).
#[derive(Serialize, Deserialize)]
#[serde(tag = "t")]
enum Kept {
    #[serde(rename = "k")]
    Key { h: String },
    #[serde(rename = "a")]
    Account { id: String },
    #[serde(rename = "w")]
    AdminToken { id: String },
    #[serde(rename = "s")]
    Subscription { id: String },
    #[serde(rename = "c")]
    Credit {
        id: String,
        account: String,
        kind: String,
        amount: i64,
        spent: i64,
        at_ms: i64,
    },
}

impl Change {
    /// The bytes the local store keeps ([`crate::store::Store::keep_unsent`]).
    pub fn encode(&self) -> Vec<u8> {
        let kept = match self {
            Change::Key(hash) => Kept::Key {
                h: hex::encode(hash),
            },
            Change::Account(id) => Kept::Account { id: id.clone() },
            Change::AdminToken(id) => Kept::AdminToken { id: id.clone() },
            Change::Subscription(id) => Kept::Subscription { id: id.clone() },
            Change::Credit {
                id,
                account,
                kind,
                amount,
                spent,
                at_ms,
            } => Kept::Credit {
                id: id.clone(),
                account: account.clone(),
                kind: (*kind).to_owned(),
                amount: *amount,
                spent: *spent,
                at_ms: *at_ms,
            },
        };
        serde_json::to_vec(&kept).expect("a change is plain strings and integers")
    }

    /// A change from the bytes [`Change::encode`] made.
    pub fn decode(bytes: &[u8]) -> Result<Change, String> {
        let kept: Kept =
            serde_json::from_slice(bytes).map_err(|e| format!("a kept change: {e}"))?;
        Ok(match kept {
            Kept::Key { h } => Change::Key(
                hex::decode(&h)
                    .ok()
                    .and_then(|b| KeyHash::try_from(b.as_slice()).ok())
                    .ok_or_else(|| format!("a kept change: key hash {h:?}"))?,
            ),
            Kept::Account { id } => Change::Account(id),
            Kept::AdminToken { id } => Change::AdminToken(id),
            Kept::Subscription { id } => Change::Subscription(id),
            Kept::Credit {
                id,
                account,
                kind,
                amount,
                spent,
                at_ms,
            } => Change::Credit {
                kind: CREDIT_KINDS
                    .into_iter()
                    .find(|k| *k == kind)
                    .ok_or_else(|| format!("a kept change: credit kind {kind:?}"))?,
                id,
                account,
                amount,
                spent,
                at_ms,
            },
        })
    }
}

/// A change not yet in the database, and where the local store keeps it.
#[derive(Debug)]
pub(super) struct Unsent {
    /// Its row in the local store (`None`: the store could not keep it;
    /// it is then in memory only, as before issue 18).
    seq: Option<u64>,
    change: Change,
}

impl Cluster {
    /// Writes an admin change to the database before the API answers,
    /// after the changes still waiting, in order. It is first kept in the
    /// local store (an awaited, flushed write right after the admin write
    /// it belongs to), so that if the database cannot take it now it is
    /// written on a later tick even after this node is killed or stopped
    /// (the answer stands: the local store has the change).
    pub async fn publish(&self, change: Change) {
        let seq = self.keep(&change).await;
        self.pending
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push_back(Unsent {
                seq,
                change: change.clone(),
            });
        if !self.push_pending().await {
            tracing::warn!(
                ?change,
                "cluster: change kept to write when the database is back"
            );
        }
    }

    /// Keeps `change` in the local store until the database has it.
    async fn keep(&self, change: &Change) -> Option<u64> {
        let app = self.app()?;
        match app.store.keep_unsent(change.encode()).await {
            Ok(seq) => Some(seq),
            Err(e) => {
                tracing::error!(error = %e, ?change, "cluster: the local store cannot keep a change for the database; it waits in memory only");
                None
            }
        }
    }

    /// Queues the changes the local store kept from an earlier run (the
    /// node was killed or stopped before the database had them), oldest
    /// first; start-up writes them before it pulls.
    pub(super) fn load_unsent(&self) -> Result<usize, String> {
        let Some(app) = self.app() else {
            return Ok(0);
        };
        let kept = app.store.unsent().map_err(|e| e.to_string())?;
        let mut q = self.pending.lock().unwrap_or_else(|e| e.into_inner());
        let n = kept.len();
        for (seq, bytes) in kept {
            match Change::decode(&bytes) {
                Ok(change) => q.push_back(Unsent {
                    seq: Some(seq),
                    change,
                }),
                // Left in the store, not dropped: a later build may read it.
                Err(e) => {
                    tracing::error!(seq, error = %e, "cluster: a kept change does not decode; skipped")
                }
            }
        }
        Ok(n)
    }

    /// Writes the changes kept while the database was unreachable, in
    /// order, one writer at a time; each leaves the local store once the
    /// database has it. Whether all were written.
    pub(super) async fn push_pending(&self) -> bool {
        let _one = self.pushing.lock().await;
        loop {
            let next = self
                .pending
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .front()
                .map(|u| (u.seq, u.change.clone()));
            let Some((seq, change)) = next else {
                return true;
            };
            if let Err(e) = self.write_change(&change).await {
                self.note_down(&e);
                return false;
            }
            self.note_up();
            if let (Some(seq), Some(app)) = (seq, self.app())
                && let Err(e) = app.store.sent(seq)
            {
                // Written again at the next start: harmless.
                tracing::warn!(seq, error = %e, "cluster: a change written stays kept");
            }
            self.pending
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .pop_front();
        }
    }

    async fn write_change(&self, change: &Change) -> Result<(), String> {
        let Some(app) = self.app() else {
            return Ok(());
        };
        let node = self.cfg.node_id.clone();
        let pool = self.pool.clone();
        match change {
            Change::Key(hash) => {
                let local = app.store.key(hash).map_err(|e| e.to_string())?;
                let hash = *hash;
                self.run(async move {
                    let mut c = pool.get().await.map_err(pool_error)?;
                    let tx = c.transaction().await.map_err(db).map(count(Kind::Change, 1))?;
                    let seq = next_seq(&tx).await?;
                    let (record, limit, deleted, concurrency) = match &local {
                        Some((rec, acct)) => (
                            Store::encode_key_record(rec),
                            acct.limit.map(|l| l.0),
                            false,
                            rec.concurrency.map(i64::from),
                        ),
                        None => (Vec::new(), None, true, None),
                    };
                    let listed = local.as_ref().map(|(rec, _)| super::lists::KeyColumns::of(rec));
                    let (owner, disabled, created_ms) = match &listed {
                        Some(l) => (l.owner.as_deref(), Some(l.disabled), Some(l.created_ms)),
                        None => (None, None, None),
                    };
                    tx.execute(
                        "INSERT INTO tollgate_keys (hash, record, deleted, key_limit, seq, origin, concurrency, \
                         owner, disabled, created_ms) \
                         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10) ON CONFLICT (hash) DO UPDATE SET \
                         concurrency = excluded.concurrency, \
                         owner = CASE WHEN excluded.deleted THEN tollgate_keys.owner ELSE excluded.owner END, \
                         disabled = CASE WHEN excluded.deleted THEN tollgate_keys.disabled ELSE excluded.disabled END, \
                         created_ms = CASE WHEN excluded.deleted THEN tollgate_keys.created_ms ELSE excluded.created_ms END, \
                         usage = CASE WHEN tollgate_keys.deleted AND NOT excluded.deleted THEN 0 \
                             ELSE tollgate_keys.usage END, \
                         period_usage = CASE WHEN tollgate_keys.deleted AND NOT excluded.deleted THEN 0 \
                             ELSE tollgate_keys.period_usage END, \
                         record = CASE WHEN excluded.deleted THEN tollgate_keys.record ELSE excluded.record END, \
                         deleted = excluded.deleted, key_limit = excluded.key_limit, \
                         seq = excluded.seq, origin = excluded.origin",
                        &[
                            &hash.to_vec(), &record, &deleted, &limit, &seq, &node, &concurrency,
                            &owner, &disabled, &created_ms,
                        ],
                    )
                    .await
                    .map_err(db).map(count(Kind::Change, 2))?;
                    notify(&tx, seq).await?;
                    tx.commit().await.map_err(db).map(count(Kind::Change, 1))
                })
                .await
            }
            Change::AdminToken(id) => {
                let local = app.store.admin_token(id).map_err(|e| e.to_string())?;
                let record = match &local {
                    Some(t) => serde_json::to_vec(t).map_err(|e| e.to_string())?,
                    None => Vec::new(),
                };
                let deleted = local.is_none();
                let id = id.clone();
                self.run(async move {
                    let mut c = pool.get().await.map_err(pool_error)?;
                    let tx = c.transaction().await.map_err(db).map(count(Kind::Change, 1))?;
                    let seq = next_seq(&tx).await?;
                    tx.execute(
                        "INSERT INTO tollgate_admin_tokens (id, record, deleted, seq, origin) \
                         VALUES ($1, $2, $3, $4, $5) ON CONFLICT (id) DO UPDATE SET \
                         record = CASE WHEN excluded.deleted THEN tollgate_admin_tokens.record ELSE excluded.record END, \
                         deleted = excluded.deleted, seq = excluded.seq, origin = excluded.origin",
                        &[&id, &record, &deleted, &seq, &node],
                    )
                    .await
                    .map_err(db).map(count(Kind::Change, 2))?;
                    notify(&tx, seq).await?;
                    tx.commit().await.map_err(db).map(count(Kind::Change, 1))
                })
                .await
            }
            Change::Subscription(id) => {
                let Some(sub) = app.store.subscription(id).map_err(|e| e.to_string())? else {
                    return Ok(());
                };
                let record = serde_json::to_string(&sub).map_err(|e| e.to_string())?;
                self.run(async move {
                    let mut c = pool.get().await.map_err(pool_error)?;
                    let tx = c.transaction().await.map_err(db).map(count(Kind::Change, 1))?;
                    let seq = next_seq(&tx).await?;
                    tx.execute(
                        "INSERT INTO tollgate_subscriptions (id, account_id, status, record, seq, origin) \
                         VALUES ($1, $2, $3, $4, $5, $6) ON CONFLICT (id) DO UPDATE SET \
                         status = excluded.status, record = excluded.record, seq = excluded.seq, \
                         origin = excluded.origin",
                        &[&sub.id, &sub.account, &sub.status.as_str(), &record, &seq, &node],
                    )
                    .await
                    .map_err(db).map(count(Kind::Change, 2))?;
                    notify(&tx, seq).await?;
                    tx.commit().await.map_err(db).map(count(Kind::Change, 1))
                })
                .await
            }
            Change::Account(id) => {
                let local = app.store.user_account(id).map_err(|e| e.to_string())?;
                let id = id.clone();
                self.run(async move {
                    let mut c = pool.get().await.map_err(pool_error)?;
                    let tx = c.transaction().await.map_err(db).map(count(Kind::Change, 1))?;
                    let seq = next_seq(&tx).await?;
                    match &local {
                        Some(a) => {
                            let record = Store::encode_account_record(&profile_only(a));
                            tx.execute(
                                "INSERT INTO tollgate_accounts (id, record, deleted, overdraft, unlimited, seq, origin, \
                                 email, created_ms) \
                                 VALUES ($1, $2, false, $3, $4, $5, $6, $7, $8) ON CONFLICT (id) DO UPDATE SET \
                                 email = excluded.email, created_ms = excluded.created_ms, \
                                 balance = CASE WHEN tollgate_accounts.deleted THEN 0 ELSE tollgate_accounts.balance END, \
                                 spent = CASE WHEN tollgate_accounts.deleted THEN 0 ELSE tollgate_accounts.spent END, \
                                 allowance = CASE WHEN tollgate_accounts.deleted THEN 0 ELSE tollgate_accounts.allowance END, \
                                 allowance_lapsed = CASE WHEN tollgate_accounts.deleted THEN 0 \
                                     ELSE tollgate_accounts.allowance_lapsed END, \
                                 record = excluded.record, deleted = false, overdraft = excluded.overdraft, \
                                 unlimited = excluded.unlimited, seq = excluded.seq, origin = excluded.origin",
                                &[
                                    &id, &record, &a.overdraft.0, &a.unlimited, &seq, &node,
                                    &a.email, &a.created_at,
                                ],
                            )
                            .await
                            .map_err(db).map(count(Kind::Change, 2))?;
                        }
                        None => {
                            tx.execute(
                                "UPDATE tollgate_accounts SET deleted = true, seq = $2, origin = $3 WHERE id = $1",
                                &[&id, &seq, &node],
                            )
                            .await
                            .map_err(db).map(count(Kind::Change, 2))?;
                        }
                    }
                    notify(&tx, seq).await?;
                    tx.commit().await.map_err(db).map(count(Kind::Change, 1))
                })
                .await
            }
            Change::Credit {
                id,
                account,
                kind,
                amount,
                spent,
                at_ms,
            } => {
                let (id, account, kind, amount, spent, at_ms) =
                    (id.clone(), account.clone(), *kind, *amount, *spent, *at_ms);
                self.run(async move {
                    let mut c = pool.get().await.map_err(pool_error)?;
                    let tx = c.transaction().await.map_err(db).map(count(Kind::Change, 1))?;
                    let inserted = tx
                        .execute(
                            "INSERT INTO tollgate_entries (id, kind, key_hash, account_id, amount, spent, node_id, at_ms) \
                             VALUES ($1, $2, NULL, $3, $4, $5, $6, $7) ON CONFLICT (id) DO NOTHING",
                            &[&id, &kind, &account, &amount, &spent, &node, &at_ms],
                        )
                        .await
                        .map_err(db).map(count(Kind::Change, 2))?;
                    if inserted == 1 {
                        tx.execute(
                            "UPDATE tollgate_accounts SET balance = balance + $2, spent = spent + $3 WHERE id = $1",
                            &[&account, &amount, &spent],
                        )
                        .await
                        .map_err(db).map(count(Kind::Change, 2))?;
                    }
                    tx.commit().await.map_err(db).map(count(Kind::Change, 1))
                })
                .await
            }
        }
    }

    /// Pulls the changes after the last one applied and applies them:
    /// accounts first (a key's owner must exist before the key is used),
    /// then keys. Returns how many.
    pub(super) async fn pull(&self) -> Result<usize, String> {
        let Some(app) = self.app() else {
            return Ok(0);
        };
        let _one = self.pulling.lock().await;
        let last = self.last_seq.load(Ordering::Acquire);
        // Own changes are in the local store already; at start (last = 0)
        // everything is pulled, in case the local store is new.
        let skip = if last == 0 {
            String::new()
        } else {
            self.cfg.node_id.clone()
        };
        let pool = self.pool.clone();
        let (accounts, keys) = self
            .run(async move {
                let mut c = pool.get().await.map_err(pool_error)?;
                let tx = c
                    .build_transaction()
                    .isolation_level(tokio_postgres::IsolationLevel::RepeatableRead)
                    .read_only(true)
                    .start()
                    .await
                    .map_err(db)
                    .map(count(Kind::Pull, 1))?;
                let accounts = tx
                    .query(
                        "SELECT id, record, deleted, seq FROM tollgate_accounts \
                         WHERE seq > $1 AND origin <> $2 ORDER BY seq",
                        &[&last, &skip],
                    )
                    .await
                    .map_err(db)
                    .map(count(Kind::Pull, 2))?;
                let keys = tx
                    .query(
                        "SELECT hash, record, deleted, key_limit, seq FROM tollgate_keys \
                         WHERE seq > $1 AND origin <> $2 ORDER BY seq",
                        &[&last, &skip],
                    )
                    .await
                    .map_err(db)
                    .map(count(Kind::Pull, 2))?;
                let tokens = tx
                    .query(
                        "SELECT id, record, deleted FROM tollgate_admin_tokens \
                         WHERE seq > $1 AND origin <> $2 ORDER BY seq",
                        &[&last, &skip],
                    )
                    .await
                    .map_err(db)
                    .map(count(Kind::Pull, 2))?;
                let subs = tx
                    .query(
                        "SELECT record FROM tollgate_subscriptions \
                         WHERE seq > $1 AND origin <> $2 ORDER BY seq",
                        &[&last, &skip],
                    )
                    .await
                    .map_err(db)
                    .map(count(Kind::Pull, 2))?;
                let max = tx
                    .query_one(
                        "SELECT GREATEST((SELECT COALESCE(MAX(seq), 0) FROM tollgate_accounts), \
                         (SELECT COALESCE(MAX(seq), 0) FROM tollgate_keys), \
                         (SELECT COALESCE(MAX(seq), 0) FROM tollgate_admin_tokens), \
                         (SELECT COALESCE(MAX(seq), 0) FROM tollgate_subscriptions))",
                        &[],
                    )
                    .await
                    .map_err(db)
                    .map(count(Kind::Pull, 2))?
                    .get::<_, i64>(0);
                tx.commit().await.map_err(db).map(count(Kind::Pull, 1))?;
                let accounts: Vec<(String, Vec<u8>, bool)> = accounts
                    .iter()
                    .map(|r| (r.get(0), r.get(1), r.get(2)))
                    .collect();
                let keys: Vec<KeyRow> = keys
                    .iter()
                    .map(|r| (r.get(0), r.get(1), r.get(2), r.get(3)))
                    .collect();
                let tokens: Vec<(String, Vec<u8>, bool)> = tokens
                    .iter()
                    .map(|r| (r.get(0), r.get(1), r.get(2)))
                    .collect();
                let subs: Vec<String> = subs.iter().map(|r| r.get(0)).collect();
                Ok(((accounts, max), (keys, tokens, subs)))
            })
            .await?;
        let (accounts, max) = accounts;
        let (keys, tokens, subs) = keys;
        let n = accounts.len() + keys.len() + tokens.len() + subs.len();
        REPLICATING
            .scope((), async {
                for (id, record, deleted) in accounts {
                    apply_account(&app, &id, &record, deleted).await?;
                }
                // After the accounts: a subscription's account is there.
                for record in subs {
                    if let Some(account) = apply_subscription(&app, &record).await? {
                        // It may have lapsed the allowance this node's
                        // slice came from.
                        self.return_account(&account).await;
                    }
                }
                for (hash, record, deleted, limit) in keys {
                    let Ok(hash) = <KeyHash>::try_from(hash.as_slice()) else {
                        continue;
                    };
                    apply_key(&app, hash, &record, deleted, limit.map(Pico)).await?;
                }
                for (id, record, deleted) in tokens {
                    apply_admin_token(&app, &id, &record, deleted).await?;
                }
                Ok::<_, String>(())
            })
            .await?;
        // The snapshot saw every change up to `max` (changes commit in seq
        // order), including this node's own, which need no applying.
        self.last_seq.fetch_max(max, Ordering::AcqRel);
        if n > 0 {
            tracing::debug!(changes = n, seq = max, "cluster: changes applied");
        }
        Ok(n)
    }

    /// Keeps a LISTEN connection open: each NOTIFY wakes the ticks to pull
    /// at once. Reconnects after a failure; the periodic pull covers gaps.
    pub(super) async fn listen(self: Arc<Self>) {
        loop {
            if self.stopping.load(Ordering::Acquire) {
                return;
            }
            let connected = match &self.tls {
                Some(t) => match self.pg.connect(t.clone()).await {
                    Ok((client, connection)) => {
                        self.listen_on(client, connection).await;
                        Ok(())
                    }
                    Err(e) => Err(e),
                },
                None => match self.pg.connect(NoTls).await {
                    Ok((client, connection)) => {
                        self.listen_on(client, connection).await;
                        Ok(())
                    }
                    Err(e) => Err(e),
                },
            };
            if let Err(e) = connected {
                self.note_down(&db(e));
            }
            tokio::time::sleep(self.cfg.sync_interval.0).await;
        }
    }
}

impl Cluster {
    /// LISTENs on one connection until it fails.
    async fn listen_on<S, T>(
        self: &Arc<Self>,
        client: tokio_postgres::Client,
        mut connection: tokio_postgres::Connection<S, T>,
    ) where
        S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
        T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
    {
        let me = self.clone();
        let mut messages = futures_util::stream::poll_fn(move |cx| connection.poll_message(cx));
        let driver = tokio::spawn(async move {
            while let Some(m) = messages.next().await {
                match m {
                    Ok(AsyncMessage::Notification(_)) => me.wake.notify_one(),
                    Ok(_) => {}
                    Err(_) => return,
                }
            }
        });
        if client
            .batch_execute(&format!("LISTEN {CHANNEL}"))
            .await
            .is_ok()
        {
            // A change made while not listening is found now.
            self.wake.notify_one();
            let _ = driver.await;
        } else {
            driver.abort();
        }
    }
}

/// The next change number, taken under the change lock so that changes
/// commit in seq order.
async fn next_seq(tx: &deadpool_postgres::Transaction<'_>) -> Result<i64, String> {
    tx.execute("SELECT pg_advisory_xact_lock($1)", &[&CHANGE_LOCK])
        .await
        .map_err(db)
        .map(count(Kind::Change, 2))?;
    Ok(tx
        .query_one("SELECT nextval('tollgate_change_seq')", &[])
        .await
        .map_err(db)
        .map(count(Kind::Change, 2))?
        .get(0))
}

async fn notify(tx: &deadpool_postgres::Transaction<'_>, seq: i64) -> Result<(), String> {
    tx.execute("SELECT pg_notify($1, $2)", &[&CHANNEL, &seq.to_string()])
        .await
        .map_err(db)
        .map(count(Kind::Change, 2))?;
    Ok(())
}

/// An account record without this node's money: the database keeps the
/// money in its own columns.
pub(super) fn profile_only(a: &AccountRecord) -> AccountRecord {
    AccountRecord {
        balance: Pico::ZERO,
        allowance: Pico::ZERO,
        spent: Pico::ZERO,
        period_spent: Pico::ZERO,
        ledger_seq: 0,
        subscription: None,
        ..a.clone()
    }
}

/// An account's profile from another node's record (`theirs`: what
/// [`profile_only`] left), over this node's record, which keeps its money
/// and subscription.
pub fn take_profile(a: &mut AccountRecord, theirs: AccountRecord) {
    a.email = theirs.email;
    a.name = theirs.name;
    a.overdraft = theirs.overdraft;
    a.unlimited = theirs.unlimited;
    a.low_balance_alert = theirs.low_balance_alert;
    a.metadata = theirs.metadata;
    a.status = theirs.status;
    a.updated_at = theirs.updated_at;
}

/// Applies another node's account change to the local store and wallets.
async fn apply_account(app: &App, id: &str, record: &[u8], deleted: bool) -> Result<(), String> {
    let local = app.store.user_account(id).map_err(|e| e.to_string())?;
    if deleted {
        if local.is_some() {
            app.store
                .delete_user_account(id)
                .await
                .map_err(|e| e.to_string())?;
        }
        app.gate.wallets().reset(id);
        return Ok(());
    }
    let theirs = Store::decode_account_record(record).map_err(|e| e.to_string())?;
    match local {
        None => {
            app.store
                .create_user_account(profile_only(&theirs))
                .await
                .map_err(|e| e.to_string())?;
            // A cached "no account" (or nothing) is replaced on next use.
            app.gate.wallets().reset(id);
        }
        Some(_) => {
            let t = theirs.clone();
            let a = app
                .store
                .update_user_account(id, move |a| {
                    take_profile(a, t);
                    Ok(())
                })
                .await
                .map_err(|e| e.to_string())?;
            app.gate.wallets().changed(id, |live| live.profile(&a));
        }
    }
    Ok(())
}

/// Applies another node's subscription write to the local store (as it
/// is, no money: that node applied it) and the account's live wallet (its
/// subscription state, the plan's key template); returns its account
/// (`None`: skipped).
async fn apply_subscription(app: &App, record: &str) -> Result<Option<String>, String> {
    let sub: crate::store::SubscriptionRecord =
        serde_json::from_str(record).map_err(|e| format!("a subscription row: {e}"))?;
    if app
        .store
        .user_account(&sub.account)
        .map_err(|e| e.to_string())?
        .is_none()
    {
        tracing::warn!(sub = %sub.id, account = %sub.account, "cluster: a subscription of an unknown account skipped");
        return Ok(None);
    }
    let at_ms = sub.updated_at;
    let out = app
        .store
        .write_subscription(crate::store::SubscriptionWrite {
            sub,
            expect_version: None,
            money: Vec::new(),
            renewal_key: None,
            at_ms,
            replica: true,
        })
        .await
        .map_err(|e| e.to_string())?;
    let wallets = app.gate.wallets();
    wallets.changed(&out.account.id, |live| {
        live.set_subscription(out.account.subscription.as_ref(), wallets.plans())
    });
    Ok(Some(out.account.id))
}

/// Applies another node's admin-token change to the local store and the
/// in-memory tokens: a token made on one node authenticates on every node,
/// a deleted one is refused everywhere.
async fn apply_admin_token(
    app: &App,
    id: &str,
    record: &[u8],
    deleted: bool,
) -> Result<(), String> {
    let known = app
        .store
        .admin_token(id)
        .map_err(|e| e.to_string())?
        .is_some();
    if deleted {
        if known {
            app.store
                .delete_admin_token(id)
                .await
                .map_err(|e| e.to_string())?;
        }
        app.admin_tokens.remove(id);
        return Ok(());
    }
    let rec: crate::store::admin_tokens::AdminTokenRecord =
        serde_json::from_slice(record).map_err(|e| format!("admin token {id}: {e}"))?;
    if !known {
        app.store
            .put_admin_token(rec.clone())
            .await
            .map_err(|e| e.to_string())?;
    }
    if !app.admin_tokens.put_record(rec) {
        tracing::warn!(
            id,
            "cluster: an admin token pulled does not parse; it authenticates nothing"
        );
    }
    Ok(())
}

/// Applies another node's key change to the local store and the gate.
async fn apply_key(
    app: &App,
    hash: KeyHash,
    record: &[u8],
    deleted: bool,
    limit: Option<Pico>,
) -> Result<(), String> {
    let local = app.store.key(&hash).map_err(|e| e.to_string())?;
    if deleted {
        if local.is_some() {
            app.store
                .delete_key(hash)
                .await
                .map_err(|e| e.to_string())?;
        }
        app.gate.forget(&hash);
        return Ok(());
    }
    let rec = Store::decode_key_record(&hash, record).map_err(|e| e.to_string())?;
    match local {
        None => {
            let acct = Account {
                limit,
                fee_day: -1,
                ..Account::default()
            };
            app.store
                .create_key(rec, acct)
                .await
                .map_err(|e| e.to_string())?;
            app.gate.created(&hash);
        }
        Some((_, acct)) => {
            app.store
                .update_key(rec.clone())
                .await
                .map_err(|e| e.to_string())?;
            app.gate.updated(rec);
            if acct.limit != limit {
                app.store
                    .set_limit(hash, limit)
                    .await
                    .map_err(|e| e.to_string())?;
                match app.cluster.get() {
                    Some(c) => c.key_limit_changed(&app.gate, &hash, limit),
                    None => app.gate.set_limit(&hash, limit),
                }
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_kept_change_decodes_to_itself() {
        let mut changes = vec![
            Change::Key([7u8; 32]),
            Change::Account("acct_1".into()),
            Change::AdminToken("tok_9".into()),
            Change::Subscription("sub_3".into()),
        ];
        for kind in CREDIT_KINDS {
            changes.push(Change::Credit {
                id: format!("credit:edge-1:0a0b:{kind}"),
                account: "acct_1".into(),
                kind,
                amount: 5_000_000_000_000,
                spent: -5_000_000_000_000,
                at_ms: 1_764_000_000_000,
            });
        }
        for change in changes {
            let bytes = change.encode();
            assert!(bytes.len() < 160, "{}", String::from_utf8_lossy(&bytes));
            assert_eq!(Change::decode(&bytes), Ok(change));
        }
    }

    #[test]
    fn what_is_not_a_kept_change_is_refused() {
        assert!(Change::decode(b"").is_err());
        assert!(Change::decode(br#"{"t":"k","h":"00"}"#).is_err());
        assert!(Change::decode(br#"{"t":"c","id":"x","account":"a","kind":"grant","amount":1,"spent":0,"at_ms":0}"#).is_err());
        assert!(Change::decode(br#"{"t":"z"}"#).is_err());
    }
}
