//! Keys' and accounts' ledgers cluster-wide: each node ships the entries
//! its own store wrote (top-ups, deducts, refunds, adjusts, reversals,
//! payments, grants and lapses, daily fees: whatever the local ledgers
//! hold) to `tollgate_ledger` on the settle tick, once per entry; in
//! cluster mode `GET /api/v1/keys/{hash}/ledger` and
//! `GET /api/v1/accounts/{id}/ledger` read that table, so every node lists
//! every node's entries, newest first, in one order.
//!
//! An entry's id in the database is [`entry_id`]: the node, the scope, the
//! entry's seq in its ledger on that node, its time, and the key or
//! account. It is stable across restarts and distinct for a node whose
//! store was wiped (its seqs start again, at a later time). Only the node
//! that applied a credit has it in its ledger (other nodes get the money
//! through the database, not an entry), so no entry is shipped by two
//! nodes; except a credit with an idempotency key retried through another
//! node, which applies its money once cluster-wide and is listed once: its
//! id is the key or account and the idempotency key, without the node.
//!
//! The cursor is in the local store: every entry is written with a mark
//! in its own batch, and a mark is removed once its entry is in the
//! database ([`crate::store::Unshipped`]). A restart ships only what is
//! still marked; entries of a store older than the marks are shipped once
//! by a full scan (recorded in the store, so it never runs again).

use std::sync::atomic::Ordering;

use super::Cluster;
use super::schema::{db, pool as pool_error};
use super::trips::{Kind, count};
use crate::error::ApiError;
use crate::money::Pico;
use crate::store::{
    AccountCreditKind, AccountLedgerEntry, KeyHash, LedgerCursor, LedgerEntry, LedgerKind,
    LocalLedgerEntry,
};

/// Entries shipped per statement.
const SHIP_BATCH: usize = 500;

/// An entry's id in `tollgate_ledger`: `node:scope:seq:at:subject` (the
/// key's hash in hex, or the account id, last: node ids have no `:`). An
/// entry with an idempotency key applied once cluster-wide whichever node
/// it reached (the money's entry id says so too): `idem:scope:subject:key`,
/// the account id length-prefixed (ids and idempotency keys may hold `:`).
pub fn entry_id(node: &str, entry: &LocalLedgerEntry) -> String {
    match entry {
        LocalLedgerEntry::Key(hash, e) => match &e.idempotency_key {
            Some(k) => format!("idem:key:{}:{k}", hex::encode(hash)),
            None => format!("{node}:key:{}:{}:{}", e.seq, e.at_ms, hex::encode(hash)),
        },
        LocalLedgerEntry::Account(id, e) => match &e.idempotency_key {
            Some(k) => format!("idem:account:{}:{id}:{k}", id.len()),
            None => format!("{node}:account:{}:{}:{id}", e.seq, e.at_ms),
        },
    }
}

/// A batch of entries, one array per column of `tollgate_ledger` (the
/// fields of the other scope NULL: a key's entry has no balance, an
/// account's no limit).
#[derive(Default)]
struct Columns {
    ids: Vec<String>,
    scopes: Vec<&'static str>,
    keys: Vec<Option<Vec<u8>>>,
    accounts: Vec<Option<String>>,
    seqs: Vec<i64>,
    ats: Vec<i64>,
    kinds: Vec<String>,
    amounts: Vec<i64>,
    reasons: Vec<String>,
    idems: Vec<Option<String>>,
    limits: Vec<Option<i64>>,
    spents: Vec<i64>,
    balances: Vec<Option<i64>>,
    allowances: Vec<Option<i64>>,
}

impl Columns {
    fn of<'a>(node: &str, entries: impl Iterator<Item = &'a LocalLedgerEntry>) -> Columns {
        let mut c = Columns::default();
        for entry in entries {
            c.ids.push(entry_id(node, entry));
            // Seqs past i64 do not occur (one per entry); saturated.
            c.seqs.push(i64::try_from(entry.seq()).unwrap_or(i64::MAX));
            c.ats.push(entry.at_ms());
            match entry {
                LocalLedgerEntry::Key(hash, e) => {
                    c.scopes.push("key");
                    c.keys.push(Some(hash.to_vec()));
                    c.accounts.push(None);
                    c.kinds.push(e.kind.as_str().to_owned());
                    c.amounts.push(e.amount.0);
                    c.reasons.push(e.reason.clone());
                    c.idems.push(e.idempotency_key.clone());
                    c.limits.push(e.limit_after.map(|p| p.0));
                    c.spents.push(e.spent_after.0);
                    c.balances.push(None);
                    c.allowances.push(None);
                }
                LocalLedgerEntry::Account(id, e) => {
                    c.scopes.push("account");
                    c.keys.push(None);
                    c.accounts.push(Some(id.clone()));
                    c.kinds.push(e.kind.as_str().to_owned());
                    c.amounts.push(e.amount.0);
                    c.reasons.push(e.reason.clone());
                    c.idems.push(e.idempotency_key.clone());
                    c.limits.push(None);
                    c.spents.push(e.spent_after.0);
                    c.balances.push(Some(e.balance_after.0));
                    c.allowances.push(Some(e.allowance_after.0));
                }
            }
        }
        c
    }
}

/// The columns both reads select, in this order.
const SELECTED: &str = "node_id, local_seq, at_ms, kind, amount, reason, idempotency_key, \
     limit_after, spent_after, balance_after, allowance_after";

/// Newest first; one order on every node (ties by node, then seq there).
const NEWEST_FIRST: &str = "ORDER BY at_ms DESC, node_id DESC, local_seq DESC, id DESC";

/// One row as read: the node that made it, and the entry's fields (as
/// in [`LedgerEntry`] and [`AccountLedgerEntry`]).
struct Row {
    /// The node that applied the entry (`seq` is its).
    node: String,
    seq: u64,
    at_ms: i64,
    kind: String,
    amount: i64,
    reason: String,
    idempotency_key: Option<String>,
    limit_after: Option<i64>,
    spent_after: i64,
    balance_after: Option<i64>,
    allowance_after: Option<i64>,
}

fn row(r: &tokio_postgres::Row) -> Row {
    Row {
        node: r.get(0),
        seq: r.get::<_, i64>(1).max(0) as u64,
        at_ms: r.get(2),
        kind: r.get(3),
        amount: r.get(4),
        reason: r.get(5),
        idempotency_key: r.get(6),
        limit_after: r.get(7),
        spent_after: r.get(8),
        balance_after: r.get(9),
        allowance_after: r.get(10),
    }
}

/// `entries` made by `node`, each inserted once per id (in `c`'s
/// transaction when it is one): `tollgate cluster import` writes a
/// store's ledgers with it.
pub(super) async fn insert_entries(
    c: &impl deadpool_postgres::GenericClient,
    node: &str,
    entries: &[LocalLedgerEntry],
) -> Result<u64, String> {
    insert_columns(c, node, &Columns::of(node, entries.iter())).await
}

async fn insert_columns(
    conn: &impl deadpool_postgres::GenericClient,
    node: &str,
    c: &Columns,
) -> Result<u64, String> {
    conn.execute(
        "INSERT INTO tollgate_ledger (id, scope, key_hash, account_id, node_id, local_seq, \
         at_ms, kind, amount, reason, idempotency_key, limit_after, spent_after, \
         balance_after, allowance_after) \
         SELECT i, sc, h, a, $5, s, t, k, m, r, ik, la, sa, ba, aa FROM UNNEST($1::text[], \
         $2::text[], $3::bytea[], $4::text[], $6::int8[], $7::int8[], $8::text[], \
         $9::int8[], $10::text[], $11::text[], $12::int8[], $13::int8[], $14::int8[], \
         $15::int8[]) AS u(i, sc, h, a, s, t, k, m, r, ik, la, sa, ba, aa) \
         ORDER BY i ON CONFLICT (id) DO NOTHING",
        &[
            &c.ids,
            &c.scopes,
            &c.keys,
            &c.accounts,
            &node,
            &c.seqs,
            &c.ats,
            &c.kinds,
            &c.amounts,
            &c.reasons,
            &c.idems,
            &c.limits,
            &c.spents,
            &c.balances,
            &c.allowances,
        ],
    )
    .await
    .map_err(db)
    .map(count(Kind::Settle, 2))
}

impl Cluster {
    /// Writes this node's ledger entries not yet in the database (the
    /// settle tick, shutdown, and each ledger read). One shipper at a time.
    pub(super) async fn ship_ledger(&self) {
        let Some(app) = self.app() else {
            return;
        };
        let _turn = self.ledger_turn.lock().await;
        if !self.ledger_backfilled.load(Ordering::Acquire) {
            match app.store.ledger_backfilled() {
                Ok(true) => self.ledger_backfilled.store(true, Ordering::Release),
                Ok(false) => {
                    if !self.backfill_ledger(&app).await {
                        return;
                    }
                }
                Err(e) => {
                    tracing::warn!(error = %e, "cluster: ledger shipping state not read");
                    return;
                }
            }
        }
        loop {
            let batch = match app.store.unshipped_ledger(SHIP_BATCH) {
                Ok(b) => b,
                Err(e) => {
                    tracing::warn!(error = %e, "cluster: ledger entries not read");
                    return;
                }
            };
            if batch.is_empty() {
                return;
            }
            let full = batch.len() == SHIP_BATCH;
            let cols = Columns::of(&self.cfg.node_id, batch.iter().map(|u| &u.entry));
            if let Err(e) = self.insert_ledger(cols).await {
                self.note_down(&e);
                return;
            }
            if let Err(e) = app.store.ledger_shipped(&batch) {
                // Shipped again next time: a no-op in the database.
                tracing::warn!(error = %e, "cluster: shipped ledger entries not unmarked");
                return;
            }
            if !full {
                return;
            }
        }
    }

    /// Ships every entry of the local ledgers once (a store written before
    /// entries were marked); `false` if it must be tried again.
    async fn backfill_ledger(&self, app: &crate::app::App) -> bool {
        let mut cursor = LedgerCursor::default();
        let mut shipped = 0usize;
        loop {
            let (page, next) = match app.store.ledger_page(&cursor, SHIP_BATCH) {
                Ok(p) => p,
                Err(e) => {
                    tracing::warn!(error = %e, "cluster: ledger entries not read");
                    return false;
                }
            };
            if !page.is_empty() {
                shipped += page.len();
                let cols = Columns::of(&self.cfg.node_id, page.iter());
                if let Err(e) = self.insert_ledger(cols).await {
                    self.note_down(&e);
                    return false;
                }
            }
            match next {
                Some(n) => cursor = n,
                None => break,
            }
        }
        if let Err(e) = app.store.set_ledger_backfilled() {
            tracing::warn!(error = %e, "cluster: ledger backfill not recorded");
            return false;
        }
        self.ledger_backfilled.store(true, Ordering::Release);
        if shipped > 0 {
            tracing::info!(
                entries = shipped,
                "cluster: this node's earlier ledger entries shipped"
            );
        }
        true
    }

    /// One statement: the entries, each inserted once per id.
    async fn insert_ledger(&self, c: Columns) -> Result<u64, String> {
        let pool = self.pool.clone();
        let node = self.cfg.node_id.clone();
        self.run(async move {
            let conn = pool.get().await.map_err(pool_error)?;
            insert_columns(&conn, &node, &c).await
        })
        .await
    }

    /// A page of rows of `tollgate_ledger` matching `filter` (`$1`).
    async fn ledger_rows<P>(
        &self,
        filter: &'static str,
        subject: P,
        offset: usize,
        limit: usize,
    ) -> Result<Vec<Row>, ApiError>
    where
        P: tokio_postgres::types::ToSql + Sync + Send + 'static,
    {
        self.ship_ledger().await;
        let offset = i64::try_from(offset).unwrap_or(i64::MAX);
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        let pool = self.pool.clone();
        self.read(async move {
            let c = pool.get().await.map_err(pool_error)?;
            let rows = c
                .query(
                    &format!(
                        "SELECT {SELECTED} FROM tollgate_ledger WHERE {filter} {NEWEST_FIRST} \
                         OFFSET $2 LIMIT $3"
                    ),
                    &[&subject, &offset, &limit],
                )
                .await
                .map_err(db)
                .map(count(Kind::Read, 2))?;
            Ok(rows.iter().map(row).collect())
        })
        .await
    }

    /// `GET /api/v1/keys/{hash}/ledger` in cluster mode: every node's
    /// entries of the key, newest first, each with the node that made it
    /// (its `seq` is that node's). This node's new entries are shipped
    /// first, so a credit it just applied is listed.
    pub async fn key_ledger(
        &self,
        hash: &KeyHash,
        offset: usize,
        limit: usize,
    ) -> Result<Vec<(String, LedgerEntry)>, ApiError> {
        let rows = self
            .ledger_rows("key_hash = $1", hash.to_vec(), offset, limit)
            .await?;
        let mut out = Vec::with_capacity(rows.len());
        for r in rows {
            let Some(kind) = LedgerKind::parse(&r.kind) else {
                tracing::warn!(kind = %r.kind, "cluster: a key ledger row of an unknown kind");
                continue;
            };
            out.push((
                r.node,
                LedgerEntry {
                    seq: r.seq,
                    at_ms: r.at_ms,
                    kind,
                    amount: Pico(r.amount),
                    reason: r.reason,
                    idempotency_key: r.idempotency_key,
                    limit_after: r.limit_after.map(Pico),
                    spent_after: Pico(r.spent_after),
                },
            ));
        }
        Ok(out)
    }

    /// `GET /api/v1/accounts/{id}/ledger` in cluster mode, as
    /// [`Cluster::key_ledger`].
    pub async fn account_ledger(
        &self,
        id: &str,
        offset: usize,
        limit: usize,
    ) -> Result<Vec<(String, AccountLedgerEntry)>, ApiError> {
        let rows = self
            .ledger_rows("account_id = $1", id.to_owned(), offset, limit)
            .await?;
        let mut out = Vec::with_capacity(rows.len());
        for r in rows {
            let Some(kind) = AccountCreditKind::parse(&r.kind) else {
                tracing::warn!(kind = %r.kind, "cluster: an account ledger row of an unknown kind");
                continue;
            };
            out.push((
                r.node,
                AccountLedgerEntry {
                    seq: r.seq,
                    at_ms: r.at_ms,
                    kind,
                    amount: Pico(r.amount),
                    reason: r.reason,
                    idempotency_key: r.idempotency_key,
                    balance_after: Pico(r.balance_after.unwrap_or(0)),
                    spent_after: Pico(r.spent_after),
                    allowance_after: Pico(r.allowance_after.unwrap_or(0)),
                },
            ));
        }
        Ok(out)
    }

    /// Whether the database has the key (not deleted): one made on another
    /// node is known before this node has pulled it.
    pub async fn key_known(&self, hash: &KeyHash) -> Result<bool, ApiError> {
        self.known(
            "SELECT EXISTS (SELECT 1 FROM tollgate_keys WHERE hash = $1 AND NOT deleted)",
            hash.to_vec(),
        )
        .await
    }

    /// Whether the database has the account (not deleted).
    pub async fn account_known(&self, id: &str) -> Result<bool, ApiError> {
        self.known(
            "SELECT EXISTS (SELECT 1 FROM tollgate_accounts WHERE id = $1 AND NOT deleted)",
            id.to_owned(),
        )
        .await
    }

    async fn known<P>(&self, statement: &'static str, subject: P) -> Result<bool, ApiError>
    where
        P: tokio_postgres::types::ToSql + Sync + Send + 'static,
    {
        let pool = self.pool.clone();
        self.read(async move {
            let c = pool.get().await.map_err(pool_error)?;
            Ok(c.query_one(statement, &[&subject])
                .await
                .map_err(db)
                .map(count(Kind::Read, 2))?
                .get::<_, bool>(0))
        })
        .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key_entry(seq: u64, at_ms: i64) -> LocalLedgerEntry {
        LocalLedgerEntry::Key(
            [0xab; 32],
            LedgerEntry {
                seq,
                at_ms,
                kind: LedgerKind::Topup,
                amount: Pico(5),
                reason: String::new(),
                idempotency_key: None,
                limit_after: None,
                spent_after: Pico::ZERO,
            },
        )
    }

    fn idempotent(mut e: LocalLedgerEntry, k: &str) -> LocalLedgerEntry {
        match &mut e {
            LocalLedgerEntry::Key(_, e) => e.idempotency_key = Some(k.to_owned()),
            LocalLedgerEntry::Account(_, e) => e.idempotency_key = Some(k.to_owned()),
        }
        e
    }

    fn account_entry(id: &str, seq: u64, at_ms: i64) -> LocalLedgerEntry {
        LocalLedgerEntry::Account(
            id.to_owned(),
            AccountLedgerEntry {
                seq,
                at_ms,
                kind: AccountCreditKind::Topup,
                amount: Pico(5),
                reason: String::new(),
                idempotency_key: None,
                balance_after: Pico(5),
                spent_after: Pico::ZERO,
                allowance_after: Pico::ZERO,
            },
        )
    }

    #[test]
    fn an_entry_id_names_node_scope_seq_time_and_subject() {
        assert_eq!(
            entry_id("n-1", &key_entry(3, 1_700)),
            format!("n-1:key:3:1700:{}", "ab".repeat(32))
        );
        assert_eq!(
            entry_id("n-1", &account_entry("acct:x", 3, 1_700)),
            "n-1:account:3:1700:acct:x"
        );
        // The same entry has the same id whenever it is shipped.
        assert_eq!(
            entry_id("n-1", &account_entry("a", 1, 10)),
            entry_id("n-1", &account_entry("a", 1, 10))
        );
    }

    #[test]
    fn entry_ids_differ_by_each_part() {
        let ids = [
            entry_id("n-1", &account_entry("a", 1, 10)),
            entry_id("n-2", &account_entry("a", 1, 10)),
            entry_id("n-1", &account_entry("b", 1, 10)),
            entry_id("n-1", &account_entry("a", 2, 10)),
            // A wiped store starts its seqs again, later.
            entry_id("n-1", &account_entry("a", 1, 11)),
            entry_id("n-1", &key_entry(1, 10)),
            // An account id that looks like the rest of an id.
            entry_id("n-1", &account_entry("1:10:a", 1, 10)),
            entry_id("n-1", &idempotent(account_entry("a:b", 1, 10), "c")),
            entry_id("n-1", &idempotent(account_entry("a", 1, 10), "b:c")),
            entry_id("n-1", &idempotent(key_entry(1, 10), "b:c")),
        ];
        let distinct: std::collections::HashSet<&String> = ids.iter().collect();
        assert_eq!(distinct.len(), ids.len(), "{ids:?}");
    }

    #[test]
    fn an_idempotent_credit_has_one_id_on_every_node() {
        let a = idempotent(account_entry("acct", 1, 10), "pay-1");
        let b = idempotent(account_entry("acct", 4, 99), "pay-1");
        assert_eq!(entry_id("n-1", &a), "idem:account:4:acct:pay-1");
        assert_eq!(entry_id("n-1", &a), entry_id("n-2", &b));
        let k = idempotent(key_entry(2, 10), "t1");
        assert_eq!(entry_id("n-1", &k), entry_id("n-3", &k));
        assert_ne!(
            entry_id("n-1", &k),
            entry_id("n-1", &idempotent(key_entry(2, 10), "t2"))
        );
    }

    #[test]
    fn account_kinds_round_trip_by_their_api_names() {
        for k in AccountCreditKind::ALL {
            assert_eq!(AccountCreditKind::parse(k.as_str()), Some(k));
            // The name is the one the API shows (serde's).
            assert_eq!(
                serde_json::to_value(k).expect("serializes"),
                serde_json::Value::String(k.as_str().to_owned())
            );
        }
        assert_eq!(AccountCreditKind::parse("nope"), None);
        for k in [
            LedgerKind::Topup,
            LedgerKind::Deduct,
            LedgerKind::Refund,
            LedgerKind::DailyFee,
        ] {
            assert_eq!(LedgerKind::parse(k.as_str()), Some(k));
        }
    }
}
