//! The key and account lists in cluster mode (`GET /api/v1/keys`,
//! `GET /api/v1/accounts`): read from the database, so every node lists
//! what any node made the moment it answered, with the database's money,
//! in the order and pages of one node's store.
//!
//! SQL cannot read a record (the store's encoding), so each change also
//! writes the fields the lists filter and order by beside it
//! ([`KeyColumns`], an account's `email` and `created_ms`; schema
//! version 12). Rows written by an earlier build have none: start-up fills
//! them in from their records ([`Cluster::fill_list_columns`]).

use super::schema::{db, pool as pool_error};
use super::trips::{Kind, count};
use super::{Cluster, SettledAccount, SettledKey};
use crate::error::ApiError;
use crate::money::Pico;
use crate::store::{AccountRecord, KeyHash, KeyQuery, KeyRecord, Store};

/// A key's fields the list filters (`owner`, `include_disabled`) and
/// orders by (`created_at`, then hash: the store's `c` index).
pub struct KeyColumns {
    pub owner: Option<String>,
    pub disabled: bool,
    pub created_ms: i64,
}

impl KeyColumns {
    pub fn of(rec: &KeyRecord) -> KeyColumns {
        KeyColumns {
            owner: rec.owner.clone(),
            disabled: rec.disabled,
            created_ms: rec.created_at,
        }
    }
}

/// A key as the database lists it: its record and settled numbers.
pub struct ListedKey {
    pub record: KeyRecord,
    pub settled: SettledKey,
}

/// An account as the database lists it: its profile (no money: that is
/// `settled`) and how many keys it holds.
pub struct ListedAccount {
    pub record: AccountRecord,
    pub settled: SettledAccount,
    pub keys: usize,
}

/// Rows filled per statement at start-up.
const FILL_BATCH: i64 = 500;

fn page(offset: usize, limit: usize) -> (i64, i64) {
    (
        i64::try_from(offset).unwrap_or(i64::MAX),
        i64::try_from(limit).unwrap_or(i64::MAX),
    )
}

impl Cluster {
    /// `GET /api/v1/keys` in cluster mode: the keys `q` asks for, oldest
    /// first (ties by hash), as one node's store pages them.
    pub async fn list_keys(&self, q: &KeyQuery) -> Result<Vec<ListedKey>, ApiError> {
        let pool = self.pool.clone();
        let owner = q.owner.clone();
        let include_disabled = q.include_disabled;
        let (offset, limit) = page(q.offset, q.limit);
        type Row = (Vec<u8>, Vec<u8>, SettledKey);
        let rows: Vec<Row> = self
            .read(async move {
                let c = pool.get().await.map_err(pool_error)?;
                let rows = c
                    .query(
                        "SELECT hash, record, usage, key_limit, period, period_usage, period_kind \
                         FROM tollgate_keys \
                         WHERE NOT deleted AND ($1::text IS NULL OR owner = $1) \
                         AND ($2 OR NOT disabled) \
                         ORDER BY created_ms, hash OFFSET $3 LIMIT $4",
                        &[&owner, &include_disabled, &offset, &limit],
                    )
                    .await
                    .map_err(db)
                    .map(count(Kind::Read, 2))?;
                Ok(rows
                    .iter()
                    .map(|r| {
                        let settled = SettledKey {
                            usage: Pico(r.get(2)),
                            limit: r.get::<_, Option<i64>>(3).map(Pico),
                            period: r.get(4),
                            period_usage: Pico(r.get(5)),
                            period_kind: r.get(6),
                        };
                        (r.get(0), r.get(1), settled)
                    })
                    .collect())
            })
            .await?;
        let mut out = Vec::with_capacity(rows.len());
        for (hash, record, settled) in rows {
            let Ok(hash) = KeyHash::try_from(hash.as_slice()) else {
                continue;
            };
            match Store::decode_key_record(&hash, &record) {
                Ok(record) => out.push(ListedKey { record, settled }),
                Err(e) => {
                    tracing::warn!(hash = %hex::encode(hash), error = %e, "cluster: a key row does not decode")
                }
            }
        }
        Ok(out)
    }

    /// `GET /api/v1/accounts` in cluster mode: in id order (bytes, as the
    /// store's `A` rows), optionally those with this `email`.
    pub async fn list_accounts(
        &self,
        offset: usize,
        limit: usize,
        email: Option<&str>,
    ) -> Result<Vec<ListedAccount>, ApiError> {
        let pool = self.pool.clone();
        let email = email.map(str::to_owned);
        let (offset, limit) = page(offset, limit);
        type Row = (Vec<u8>, i64, i64, i64, i64, i64);
        let rows: Vec<Row> = self
            .read(async move {
                let c = pool.get().await.map_err(pool_error)?;
                let rows = c
                    .query(
                        "SELECT a.record, a.balance, a.spent, a.leased, a.allowance, \
                         (SELECT count(*) FROM tollgate_keys k WHERE k.owner = a.id AND NOT k.deleted) \
                         FROM tollgate_accounts a \
                         WHERE NOT a.deleted AND ($1::text IS NULL OR a.email = $1) \
                         ORDER BY a.id COLLATE \"C\" OFFSET $2 LIMIT $3",
                        &[&email, &offset, &limit],
                    )
                    .await
                    .map_err(db)
                    .map(count(Kind::Read, 2))?;
                Ok(rows
                    .iter()
                    .map(|r| (r.get(0), r.get(1), r.get(2), r.get(3), r.get(4), r.get(5)))
                    .collect())
            })
            .await?;
        let mut out = Vec::with_capacity(rows.len());
        for (record, balance, spent, leased, allowance, keys) in rows {
            match Store::decode_account_record(&record) {
                Ok(record) => out.push(ListedAccount {
                    record,
                    settled: SettledAccount {
                        balance: Pico(balance),
                        allowance: Pico(allowance),
                        spent: Pico(spent),
                        leased: Pico(leased),
                    },
                    keys: usize::try_from(keys).unwrap_or(0),
                }),
                Err(e) => tracing::warn!(error = %e, "cluster: an account row does not decode"),
            }
        }
        Ok(out)
    }

    /// Fills the list columns of rows an earlier build wrote (start-up,
    /// after the migrations): idempotent, so nodes starting together may
    /// both do it. Returns how many rows.
    pub(super) async fn fill_list_columns(&self) -> Result<usize, String> {
        let pool = self.pool.clone();
        let mut filled = 0;
        let c = pool.get().await.map_err(pool_error)?;
        loop {
            let rows = c
                .query(
                    "SELECT hash, record FROM tollgate_keys \
                     WHERE created_ms IS NULL AND NOT deleted LIMIT $1",
                    &[&FILL_BATCH],
                )
                .await
                .map_err(db)
                .map(count(Kind::Migrate, 2))?;
            if rows.is_empty() {
                break;
            }
            for r in &rows {
                let raw: Vec<u8> = r.get(0);
                let record: Vec<u8> = r.get(1);
                let hash = KeyHash::try_from(raw.as_slice())
                    .map_err(|_| "a key row's hash is not 32 bytes".to_owned())?;
                let rec = Store::decode_key_record(&hash, &record)
                    .map_err(|e| format!("key {}: {e}", hex::encode(hash)))?;
                let l = KeyColumns::of(&rec);
                c.execute(
                    "UPDATE tollgate_keys SET owner = $2, disabled = $3, created_ms = $4 \
                     WHERE hash = $1 AND created_ms IS NULL",
                    &[&raw, &l.owner, &l.disabled, &l.created_ms],
                )
                .await
                .map_err(db)
                .map(count(Kind::Migrate, 2))?;
                filled += 1;
            }
        }
        loop {
            let rows = c
                .query(
                    "SELECT id, record FROM tollgate_accounts \
                     WHERE created_ms IS NULL AND NOT deleted LIMIT $1",
                    &[&FILL_BATCH],
                )
                .await
                .map_err(db)
                .map(count(Kind::Migrate, 2))?;
            if rows.is_empty() {
                break;
            }
            for r in &rows {
                let id: String = r.get(0);
                let record: Vec<u8> = r.get(1);
                let a = Store::decode_account_record(&record)
                    .map_err(|e| format!("account {id}: {e}"))?;
                c.execute(
                    "UPDATE tollgate_accounts SET email = $2, created_ms = $3 \
                     WHERE id = $1 AND created_ms IS NULL",
                    &[&id, &a.email, &a.created_at],
                )
                .await
                .map_err(db)
                .map(count(Kind::Migrate, 2))?;
                filled += 1;
            }
        }
        Ok(filled)
    }
}
