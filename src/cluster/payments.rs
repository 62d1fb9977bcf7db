//! Payments cluster-wide (schema version 8): the database is the truth of
//! payment records, of the provider references that make a payment apply
//! once, and of epay orders.
//!
//! A payment is applied in **one** transaction: it claims every reference
//! of the payment (`INSERT … ON CONFLICT DO NOTHING` on the unique
//! `(provider, reference)` of `tollgate_payment_refs`, in one sorted
//! statement, so two transactions lock them in one order); if any was
//! claimed already it is a replay and the transaction is rolled back:
//! nothing is written, and the node answers with the payment holding that
//! reference. Otherwise the same transaction writes the record and moves
//! the money (the account's `tollgate_entries` row, once per id, and its
//! `balance`). So one Stripe event delivered to two nodes at once, or two
//! events of one checkout session reaching two nodes, credit once and make
//! one record, whatever the interleaving: the second insert of a reference
//! waits for the first transaction and then finds it taken.
//!
//! Only after the commit does the node apply the payment to its own store
//! (its ledger entry, the wallet it mirrors, the outbox events); the record
//! then gets the ledger entries that store made ([`with_local_entries`]).
//! A node killed between the two has moved the database's money and made
//! the record, but not its local mirror: the provider's retry is a replay.
//!
//! A key's limit (a payment to a key no account pays for) is moved by the
//! local store and published as a key change, as before; the database
//! holds the claim and the record.

use super::schema::{db, pool as pool_error};
use super::trips::{Kind, count};
use super::{Cluster, database_unavailable};
use crate::error::ApiError;
use crate::money::Pico;
use crate::store::{
    EpayOrder, IssuedKey, PaymentCredit, PaymentQuery, PaymentRecord, PaymentStatus, PaymentTarget,
};

/// What the database made of a payment op.
#[derive(Debug)]
pub enum Claim {
    /// One of its references was claimed before: the payment holding it,
    /// as the database has it; nothing was written.
    Replay(PaymentRecord),
    /// A new payment, written; `credit` is what the database credited
    /// (an unknown account or key, or nothing to credit: `None`), which the
    /// local store applies the same way.
    New {
        payment: PaymentRecord,
        credit: Option<PaymentCredit>,
    },
    /// A refund applied to a known payment: the record after it.
    Refunded(PaymentRecord),
}

fn decode(text: &str) -> Result<PaymentRecord, String> {
    serde_json::from_str(text).map_err(|e| format!("a payment row does not parse: {e}"))
}

fn encode(p: &PaymentRecord) -> String {
    serde_json::to_string(p).expect("payment records serialize")
}

/// The references of a payment, each once, in the order every transaction
/// claims them (sorted: two payments sharing two references cannot
/// deadlock).
fn claim_order(refs: &[String]) -> Vec<String> {
    let mut r = refs.to_vec();
    r.sort();
    r.dedup();
    r
}

/// The database's record with the ledger entries the local store made,
/// when the local store applied the same thing (same status, refunds and
/// events); `None` when they differ (the local store did not know the
/// account yet, or another node's change came first): the database's
/// record stands as it is.
pub fn with_local_entries(db: &PaymentRecord, local: &PaymentRecord) -> Option<PaymentRecord> {
    if db.id != local.id
        || db.status != local.status
        || db.refunded != local.refunded
        || db.events != local.events
        || db.entries == local.entries
    {
        return None;
    }
    Some(PaymentRecord {
        entries: local.entries.clone(),
        ..db.clone()
    })
}

type Tx<'a> = deadpool_postgres::Transaction<'a>;

/// The payment holding the first of `refs` that is claimed.
async fn holder(tx: &Tx<'_>, provider: &str, refs: &[String]) -> Result<PaymentRecord, String> {
    let row = tx
        .query_opt(
            "SELECT p.record FROM tollgate_payment_refs r JOIN tollgate_payments p ON p.id = r.payment_id \
             WHERE r.provider = $1 AND r.reference = ANY($2) \
             ORDER BY array_position($2, r.reference) LIMIT 1",
            &[&provider, &refs],
        )
        .await
        .map_err(db)
        .map(count(Kind::Change, 2))?;
    match row {
        Some(r) => decode(r.get(0)),
        None => Err("a payment reference is claimed by no payment".to_owned()),
    }
}

/// Money added to (or, negative, taken from) an account's balance once
/// per entry id. Returns whether it was new.
async fn move_money(
    tx: &Tx<'_>,
    node: &str,
    entry: &str,
    kind: &str,
    account: &str,
    amount: i64,
    at_ms: i64,
) -> Result<bool, String> {
    let inserted = tx
        .execute(
            "INSERT INTO tollgate_entries (id, kind, key_hash, account_id, amount, spent, node_id, at_ms) \
             VALUES ($1, $2, NULL, $3, $4, 0, $5, $6) ON CONFLICT (id) DO NOTHING",
            &[&entry, &kind, &account, &amount, &node, &at_ms],
        )
        .await
        .map_err(db)
        .map(count(Kind::Change, 2))?;
    if inserted == 1 {
        tx.execute(
            "UPDATE tollgate_accounts SET balance = balance + $2 WHERE id = $1",
            &[&account, &amount],
        )
        .await
        .map_err(db)
        .map(count(Kind::Change, 2))?;
    }
    Ok(inserted == 1)
}

/// A new payment in `tx` (see the module docs); the caller commits.
async fn record_in(
    tx: &Tx<'_>,
    node: &str,
    refs: &[String],
    mut p: PaymentRecord,
    credit: Option<PaymentCredit>,
    money: Option<String>,
) -> Result<Claim, String> {
    let refs = claim_order(refs);
    let claimed = tx
        .execute(
            "INSERT INTO tollgate_payment_refs (provider, reference, payment_id) \
             SELECT $1, r, $2 FROM unnest($3::text[]) AS u(r) ORDER BY r ON CONFLICT DO NOTHING",
            &[&p.provider, &p.id, &refs],
        )
        .await
        .map_err(db)
        .map(count(Kind::Change, 2))?;
    if (claimed as usize) < refs.len() {
        return holder(tx, &p.provider, &refs).await.map(Claim::Replay);
    }
    let mut money_entry = None;
    let credit = match credit {
        Some(_) if p.amount.0 <= 0 => {
            p.status = PaymentStatus::NeedsAttention;
            p.reason.get_or_insert_with(|| "nothing to credit".into());
            None
        }
        Some(PaymentCredit::Account(id)) => {
            let known = tx
                .query_opt(
                    "SELECT 1 FROM tollgate_accounts WHERE id = $1 AND NOT deleted",
                    &[&id],
                )
                .await
                .map_err(db)
                .map(count(Kind::Change, 2))?
                .is_some();
            if known {
                let entry = money.unwrap_or_else(|| format!("pay:{}", p.id));
                move_money(tx, node, &entry, "payment", &id, p.amount.0, p.created_at).await?;
                money_entry = Some(entry);
                Some(PaymentCredit::Account(id))
            } else {
                p.status = PaymentStatus::NeedsAttention;
                p.reason = Some(format!("unknown account {id:?}; nothing applied"));
                None
            }
        }
        Some(PaymentCredit::Key(hash)) => {
            let known = tx
                .query_opt(
                    "SELECT 1 FROM tollgate_keys WHERE hash = $1 AND NOT deleted",
                    &[&hash.to_vec()],
                )
                .await
                .map_err(db)
                .map(count(Kind::Change, 2))?
                .is_some();
            if known {
                Some(PaymentCredit::Key(hash))
            } else {
                p.status = PaymentStatus::NeedsAttention;
                p.reason = Some("unknown key; nothing applied".into());
                None
            }
        }
        None => None,
    };
    tx.execute(
        "INSERT INTO tollgate_payments (id, provider, provider_id, account_id, key_hash, amount, \
         status, money_entry, record, node_id, created_ms, updated_ms) \
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12)",
        &[
            &p.id,
            &p.provider,
            &p.provider_id,
            &p.account,
            &p.key,
            &p.amount.0,
            &p.status.as_str(),
            &money_entry,
            &encode(&p),
            &node,
            &p.created_at,
            &p.updated_at,
        ],
    )
    .await
    .map_err(db)
    .map(count(Kind::Change, 2))?;
    Ok(Claim::New { payment: p, credit })
}

impl Cluster {
    /// The node that wrote payment `id` to the database, if it is there.
    pub async fn payment_origin(&self, id: &str) -> Result<Option<String>, String> {
        let pool = self.pool.clone();
        let id = id.to_owned();
        self.run(async move {
            let c = pool.get().await.map_err(pool_error)?;
            c.query_opt(
                "SELECT node_id FROM tollgate_payments WHERE id = $1",
                &[&id],
            )
            .await
            .map_err(db)
            .map(count(Kind::Read, 2))
            .map(|r| r.map(|r| r.get(0)))
        })
        .await
    }

    /// A new payment over `refs`, applied once cluster-wide in one
    /// transaction (the module docs); `money` is the entry id its money
    /// moves under.
    pub async fn claim_payment(
        &self,
        refs: Vec<String>,
        payment: PaymentRecord,
        credit: Option<PaymentCredit>,
        money: Option<String>,
    ) -> Result<Claim, String> {
        let pool = self.pool.clone();
        let node = self.cfg.node_id.clone();
        let out = self
            .run(async move {
                let mut c = pool.get().await.map_err(pool_error)?;
                let tx = c
                    .transaction()
                    .await
                    .map_err(db)
                    .map(count(Kind::Change, 1))?;
                let claim = record_in(&tx, &node, &refs, payment, credit, money).await?;
                match claim {
                    // Nothing of it is kept: the references it did claim go too.
                    Claim::Replay(_) => tx.rollback().await.map_err(db)?,
                    _ => tx.commit().await.map_err(db)?,
                }
                count(Kind::Change, 1)(());
                Ok(claim)
            })
            .await;
        self.noted(out)
    }

    /// The provider now reports `refunded_total` refunded of the payment
    /// holding `of`: what is newly refunded is taken back from its account,
    /// once per `event`, in one transaction that locks the payment. An
    /// unknown `of` records `unknown` over `[event]` instead.
    pub async fn claim_refund(
        &self,
        event: String,
        of: String,
        refunded_total: Pico,
        at_ms: i64,
        unknown: PaymentRecord,
    ) -> Result<Claim, String> {
        let pool = self.pool.clone();
        let node = self.cfg.node_id.clone();
        let out = self
            .run(async move {
                let mut c = pool.get().await.map_err(pool_error)?;
                let tx = c
                    .transaction()
                    .await
                    .map_err(db)
                    .map(count(Kind::Change, 1))?;
                let provider = unknown.provider.clone();
                let row = tx
                    .query_opt(
                        "SELECT p.record, p.money_entry FROM tollgate_payment_refs r \
                         JOIN tollgate_payments p ON p.id = r.payment_id \
                         WHERE r.provider = $1 AND r.reference = $2 FOR UPDATE OF p",
                        &[&provider, &of],
                    )
                    .await
                    .map_err(db)
                    .map(count(Kind::Change, 2))?;
                let Some(row) = row else {
                    let claim = record_in(&tx, &node, &[event], unknown, None, None).await?;
                    match claim {
                        Claim::Replay(_) => tx.rollback().await.map_err(db)?,
                        _ => tx.commit().await.map_err(db)?,
                    }
                    return Ok(claim);
                };
                let mut p = decode(row.get(0))?;
                let credited: Option<String> = row.get(1);
                let claimed = tx
                    .execute(
                        "INSERT INTO tollgate_payment_refs (provider, reference, payment_id) \
                         VALUES ($1, $2, $3) ON CONFLICT DO NOTHING",
                        &[&provider, &event, &p.id],
                    )
                    .await
                    .map_err(db)
                    .map(count(Kind::Change, 2))?;
                if claimed == 0 {
                    let p = holder(&tx, &provider, std::slice::from_ref(&event)).await?;
                    tx.rollback().await.map_err(db)?;
                    return Ok(Claim::Replay(p));
                }
                // Never reverse more than was paid, whatever the provider claims.
                let newly = refunded_total.0.min(p.amount.0) - p.refunded.0;
                if newly > 0 {
                    if credited.is_some()
                        && let Some(PaymentTarget::Account(id)) = account_target(&p)
                    {
                        let entry = format!("payrefund:{event}");
                        move_money(&tx, &node, &entry, "reversal", &id, -newly, at_ms).await?;
                    }
                    p.refunded = Pico(p.refunded.0 + newly);
                    if p.status != PaymentStatus::NeedsAttention {
                        p.status = if p.refunded >= p.amount {
                            PaymentStatus::Refunded
                        } else {
                            PaymentStatus::PartiallyRefunded
                        };
                    }
                }
                p.events.push(event);
                p.updated_at = at_ms;
                tx.execute(
                    "UPDATE tollgate_payments SET record = $2, status = $3, updated_ms = $4 WHERE id = $1",
                    &[&p.id, &encode(&p), &p.status.as_str(), &p.updated_at],
                )
                .await
                .map_err(db)
                .map(count(Kind::Change, 2))?;
                tx.commit().await.map_err(db).map(count(Kind::Change, 1))?;
                Ok(Claim::Refunded(p))
            })
            .await;
        self.noted(out)
    }

    /// After the local store applied what the database did: the record
    /// gets the local ledger entries ([`with_local_entries`]), unless the
    /// row changed meanwhile. Best effort: the money and the claim are
    /// already in the database.
    pub async fn payment_kept(&self, db_record: &PaymentRecord, local: &PaymentRecord) {
        let Some(p) = with_local_entries(db_record, local) else {
            return;
        };
        let (id, was, now) = (p.id.clone(), encode(db_record), encode(&p));
        let pool = self.pool.clone();
        let out = self
            .run(async move {
                let c = pool.get().await.map_err(pool_error)?;
                c.execute(
                    "UPDATE tollgate_payments SET record = $3 WHERE id = $1 AND record = $2",
                    &[&id, &was, &now],
                )
                .await
                .map_err(db)
                .map(count(Kind::Change, 2))
            })
            .await;
        if let Err(e) = self.noted(out) {
            tracing::warn!(payment = %p.id, error = %e, "cluster: a payment's ledger entries not recorded");
        }
    }

    /// Records the key issued with a payment (its secret, until the first
    /// read of the payment takes it). `false`: no such payment.
    pub async fn set_issued_key(&self, id: &str, issued: IssuedKey) -> Result<bool, String> {
        let id = id.to_owned();
        let out = self
            .update_payment(id, move |p| {
                p.issued_key = Some(issued);
                true
            })
            .await;
        self.noted(out).map(|p| p.is_some())
    }

    /// `GET /api/v1/payments/{id}` in cluster mode: the payment, with an
    /// issued key's secret taken out of the database in the same
    /// transaction (the row is locked): of two reads on two nodes at once,
    /// one answers the secret, and never again.
    pub async fn take_payment(&self, id: &str) -> Result<Option<PaymentRecord>, ApiError> {
        let id = id.to_owned();
        let pool = self.pool.clone();
        self.read(async move {
            let c = pool.get().await.map_err(pool_error)?;
            let row = c
                .query_opt("SELECT record FROM tollgate_payments WHERE id = $1", &[&id])
                .await
                .map_err(db)
                .map(count(Kind::Read, 2))?;
            let Some(row) = row else {
                return Ok(None);
            };
            let p = decode(row.get(0))?;
            if p.issued_key.as_ref().is_none_or(|k| k.key.is_none()) {
                return Ok(Some(p));
            }
            drop(c);
            let mut shown = None;
            update_payment_in(&pool, id, |p| {
                shown = Some(p.clone());
                match p.issued_key.as_mut() {
                    Some(k) if k.key.is_some() => {
                        k.key = None;
                        true
                    }
                    _ => false,
                }
            })
            .await?;
            Ok(shown)
        })
        .await
    }

    /// A read-modify-write of one payment's record under its row lock;
    /// `change` says whether it changed anything. `None`: no such payment.
    async fn update_payment(
        &self,
        id: String,
        change: impl FnOnce(&mut PaymentRecord) -> bool + Send + 'static,
    ) -> Result<Option<PaymentRecord>, String> {
        let pool = self.pool.clone();
        self.run(async move { update_payment_in(&pool, id, change).await })
            .await
    }

    /// `GET /api/v1/payments` in cluster mode: every node's payments,
    /// newest first (by id, as the local store lists them), same filters.
    pub async fn payments(&self, q: &PaymentQuery) -> Result<Vec<PaymentRecord>, ApiError> {
        let account = q.account.clone();
        let status = q.status.map(|s| s.as_str().to_owned());
        let provider = q.provider.clone();
        let offset = i64::try_from(q.offset).unwrap_or(i64::MAX);
        let limit = i64::try_from(q.limit).unwrap_or(i64::MAX);
        let pool = self.pool.clone();
        self.read(async move {
            let c = pool.get().await.map_err(pool_error)?;
            let rows = c
                .query(
                    "SELECT record FROM tollgate_payments WHERE ($1::text IS NULL OR account_id = $1) \
                     AND ($2::text IS NULL OR status = $2) AND ($3::text IS NULL OR provider = $3) \
                     ORDER BY id DESC OFFSET $4 LIMIT $5",
                    &[&account, &status, &provider, &offset, &limit],
                )
                .await
                .map_err(db)
                .map(count(Kind::Read, 2))?;
            rows.iter().map(|r| decode(r.get(0))).collect()
        })
        .await
    }

    /// Every payment, oldest first (reconciliation in cluster mode).
    pub async fn all_payments(&self) -> Result<Vec<PaymentRecord>, ApiError> {
        let pool = self.pool.clone();
        self.read(async move {
            let c = pool.get().await.map_err(pool_error)?;
            let rows = c
                .query("SELECT record FROM tollgate_payments ORDER BY id", &[])
                .await
                .map_err(db)
                .map(count(Kind::Read, 2))?;
            rows.iter().map(|r| decode(r.get(0))).collect()
        })
        .await
    }

    /// Stores an epay order for its notification, which may reach any
    /// node. `false`: its number is taken.
    pub async fn put_epay_order(&self, o: &EpayOrder) -> Result<bool, ApiError> {
        let no = o.out_trade_no.clone();
        let record = serde_json::to_string(o).map_err(|e| ApiError::internal(e.to_string()))?;
        let node = self.cfg.node_id.clone();
        let pool = self.pool.clone();
        self.read(async move {
            let c = pool.get().await.map_err(pool_error)?;
            let n = c
                .execute(
                    "INSERT INTO tollgate_epay_orders (out_trade_no, record, node_id) VALUES ($1, $2, $3) \
                     ON CONFLICT DO NOTHING",
                    &[&no, &record, &node],
                )
                .await
                .map_err(db)
                .map(count(Kind::Change, 2))?;
            Ok(n == 1)
        })
        .await
    }

    /// An epay order made through any node.
    pub async fn epay_order(&self, out_trade_no: &str) -> Result<Option<EpayOrder>, ApiError> {
        let no = out_trade_no.to_owned();
        let pool = self.pool.clone();
        self.read(async move {
            let c = pool.get().await.map_err(pool_error)?;
            let row = c
                .query_opt(
                    "SELECT record FROM tollgate_epay_orders WHERE out_trade_no = $1",
                    &[&no],
                )
                .await
                .map_err(db)
                .map(count(Kind::Read, 2))?;
            match row {
                Some(r) => serde_json::from_str(r.get::<_, &str>(0))
                    .map(Some)
                    .map_err(|e| format!("an epay order row does not parse: {e}")),
                None => Ok(None),
            }
        })
        .await
    }

    /// Notes the database up or down from a write's result.
    pub(super) fn noted<T>(&self, out: Result<T, String>) -> Result<T, String> {
        match &out {
            Ok(_) => self.note_up(),
            Err(e) => self.note_down(e),
        }
        out
    }
}

/// Whose money a payment moved: its first ledger entry's target, else its
/// account (the database credits an account before the local store makes
/// the entry).
fn account_target(p: &PaymentRecord) -> Option<PaymentTarget> {
    match p.entries.first() {
        Some(e) => Some(e.target.clone()),
        None => p.account.clone().map(PaymentTarget::Account),
    }
}

async fn update_payment_in(
    pool: &deadpool_postgres::Pool,
    id: String,
    change: impl FnOnce(&mut PaymentRecord) -> bool,
) -> Result<Option<PaymentRecord>, String> {
    let mut c = pool.get().await.map_err(pool_error)?;
    let tx = c
        .transaction()
        .await
        .map_err(db)
        .map(count(Kind::Change, 1))?;
    let row = tx
        .query_opt(
            "SELECT record FROM tollgate_payments WHERE id = $1 FOR UPDATE",
            &[&id],
        )
        .await
        .map_err(db)
        .map(count(Kind::Change, 2))?;
    let Some(row) = row else {
        return Ok(None);
    };
    let mut p = decode(row.get(0))?;
    if change(&mut p) {
        tx.execute(
            "UPDATE tollgate_payments SET record = $2 WHERE id = $1",
            &[&id, &encode(&p)],
        )
        .await
        .map_err(db)
        .map(count(Kind::Change, 2))?;
    }
    tx.commit().await.map_err(db).map(count(Kind::Change, 1))?;
    Ok(Some(p))
}

/// The database unreachable while a payment is applied: 503, so that the
/// provider retries (nothing was applied).
pub fn unavailable(e: &str) -> ApiError {
    tracing::error!(error = %e, "payment not recorded in the database; the provider will retry");
    database_unavailable()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::PaymentEntry;

    fn record() -> PaymentRecord {
        crate::payments::new_record("stripe", "cs_1", "topup", 1_000)
    }

    #[test]
    fn references_are_claimed_once_each_in_one_order() {
        let refs = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        assert_eq!(
            claim_order(&refs(&["evt:evt_2", "cs:cs_9", "pi:pi_1", "cs:cs_9"])),
            refs(&["cs:cs_9", "evt:evt_2", "pi:pi_1"])
        );
        assert!(claim_order(&[]).is_empty());
    }

    #[test]
    fn local_entries_join_the_record_only_when_the_store_did_the_same() {
        let db = record();
        let mut local = db.clone();
        local.entries.push(PaymentEntry {
            target: PaymentTarget::Account("a".into()),
            seq: 3,
            kind: "topup".into(),
            amount: Pico(5),
        });
        let joined = with_local_entries(&db, &local).expect("same payment, same status");
        assert_eq!(joined.entries, local.entries);
        assert_eq!(joined.status, db.status);
        // Nothing to add: no write.
        assert!(with_local_entries(&db, &db).is_none());
        // The local store did not know the account: the database's stands.
        let mut other = local.clone();
        other.status = PaymentStatus::NeedsAttention;
        assert!(with_local_entries(&db, &other).is_none());
        let mut other = local.clone();
        other.id = "pay_other".into();
        assert!(with_local_entries(&db, &other).is_none());
        let mut other = local;
        other.events.push("evt_late".into());
        assert!(with_local_entries(&db, &other).is_none());
    }

    #[test]
    fn a_refund_goes_back_to_whom_the_payment_credited() {
        let mut p = record();
        assert_eq!(account_target(&p), None);
        p.account = Some("acct".into());
        assert_eq!(
            account_target(&p),
            Some(PaymentTarget::Account("acct".into()))
        );
        p.entries.push(PaymentEntry {
            target: PaymentTarget::Key("ab".into()),
            seq: 1,
            kind: "topup".into(),
            amount: Pico(1),
        });
        assert_eq!(account_target(&p), Some(PaymentTarget::Key("ab".into())));
    }
}
