//! Subscriptions cluster-wide (schema version 8, `tollgate_subscriptions`).
//!
//! - **Records**: each subscription write a node makes (the local store's
//!   atomic write, as on one node) is published as a change
//!   ([`super::sync::Change::Subscription`]): the database holds the
//!   record, and every other node pulls it into its store (a replica write:
//!   the record as it is, no money). So a subscription made through node 1
//!   is listed by every node, and renewed by another while node 1 is down.
//! - **One sweeper**: the lifecycle pass (period rolls, grants, expiry)
//!   runs on the one node that holds [`SWEEP_LOCK`] for the pass
//!   (`pg_try_advisory_xact_lock` in a transaction kept open for it); the
//!   others skip it. The holder pulls the latest changes first.
//! - **Once per period**: before a node's store applies a grant it claims
//!   the grant's id ([`grant_entry_id`]: subscription, period, kind) as a
//!   `tollgate_entries` row (unique per id), and a renewal's idempotency
//!   key likewise ([`renewal_entry_id`], a replay unless claimed now);
//!   what another node claimed is not applied here (and a start for a provider's subscription id, so one
//!   checkout event reaching two nodes starts one subscription). So two nodes rolling the same period (the lock moved
//!   between passes before the first node's write was pulled) grant once.
//! - **The allowance** (schema version 10, `tollgate_accounts.allowance`):
//!   the claim's transaction also moves the account's allowance in the
//!   database, in the order of the write's money (a period's lapse before
//!   the next period's grant): a grant claimed now raises it, a lapse
//!   claimed now ([`lapse_entry_id`]: subscription, period) zeroes it, as
//!   the local store does. So a grant is spendable on every node (the
//!   leases take `allowance + balance + overdraft − leased`, settlement
//!   takes from the allowance first) and a lapse applies once, even when
//!   two nodes roll the same period. A claim's row keeps what it moved on
//!   the allowance (`amount`), so that [`Cluster::unclaim`] can undo it.

use tokio::sync::oneshot;

use super::Cluster;
use super::schema::{SWEEP_LOCK, db, pool as pool_error};
use super::trips::{Kind, count};
use crate::store::SubscriptionMarker;

/// The `tollgate_entries` id of a subscription's grant: one per
/// subscription, period and kind (`g` the period's, `u` an upgrade's pro
/// rata, per plan), whichever node applies it.
pub fn grant_entry_id(sid: &str, m: &SubscriptionMarker) -> String {
    format!("grant:{sid}:{}:{}:{}", char::from(m.tag), m.period, m.extra)
}

/// The `tollgate_entries` id of a lapse: a subscription's allowance lapses
/// at most once per period (at its end, or when the subscription ends in
/// it), whichever node applies it.
pub fn lapse_entry_id(sid: &str, period: u64) -> String {
    format!("lapse:{sid}:{period}")
}

/// What a claim does to the account's allowance in the database when it
/// is claimed now.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AllowanceMove {
    /// Nothing (a renewal key, a provider subscription's start).
    Keep,
    /// A grant: allowance += picoUSD.
    Raise(i64),
    /// A lapse: the allowance goes to zero.
    Lapse,
}

/// One id to claim once cluster-wide, with what it moves.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct OnceClaim {
    pub id: String,
    /// The row's `kind`: `grant`, `lapse`, `renewal`, `subscribe`, `issue`.
    pub kind: &'static str,
    pub allowance: AllowanceMove,
}

impl OnceClaim {
    /// A claim that moves no money (a renewal key, an activation key).
    pub fn marker(id: String, kind: &'static str) -> OnceClaim {
        OnceClaim {
            id,
            kind,
            allowance: AllowanceMove::Keep,
        }
    }
}

/// What the moves of the claims made now do to an allowance.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Moved {
    /// The allowance after them.
    pub allowance: i64,
    /// What each moved (new − old: the claim row's `amount`).
    pub each: Vec<i64>,
    /// What the last lapse among them took (`allowance_lapsed`), if any.
    pub lapsed: Option<i64>,
}

/// The moves of the claims made now, in order, on `allowance` (as the
/// store applies them). `None` when a grant would take it out of range.
pub fn apply_moves(mut allowance: i64, moves: &[AllowanceMove]) -> Option<Moved> {
    let mut each = Vec::with_capacity(moves.len());
    let mut lapsed = None;
    for m in moves {
        let after = match m {
            AllowanceMove::Keep => allowance,
            AllowanceMove::Raise(a) => allowance.checked_add(*a)?,
            AllowanceMove::Lapse => {
                lapsed = Some(allowance.max(0));
                0
            }
        };
        each.push(after.checked_sub(allowance)?);
        allowance = after;
    }
    Some(Moved {
        allowance,
        each,
        lapsed,
    })
}

/// The `tollgate_entries` id of a renewal's idempotency key.
pub fn renewal_entry_id(sid: &str, key: &str) -> String {
    format!("renewal:{sid}:{key}")
}

/// The `tollgate_entries` id of a subscription started for a payment
/// provider's subscription (`external_id`): one start cluster-wide.
pub fn external_entry_id(external_id: &str) -> String {
    format!("subscribe:{external_id}")
}

/// Held while this node runs the subscription lifecycle pass: dropping it
/// ends the transaction that holds the advisory lock.
pub struct SweepLock {
    _done: oneshot::Sender<()>,
}

impl Cluster {
    /// The lifecycle lock for one pass, if no other node holds it; the
    /// changes made elsewhere are pulled first, so the pass sees them.
    pub async fn sweep_lock(&self) -> Option<SweepLock> {
        let (got_tx, got_rx) = oneshot::channel::<bool>();
        let (done_tx, done_rx) = oneshot::channel::<()>();
        let pool = self.pool.clone();
        self.rt.spawn(async move {
            let held = async move {
                let mut c = pool.get().await.map_err(pool_error)?;
                let tx = c
                    .transaction()
                    .await
                    .map_err(db)
                    .map(count(Kind::Change, 1))?;
                let got: bool = tx
                    .query_one("SELECT pg_try_advisory_xact_lock($1)", &[&SWEEP_LOCK])
                    .await
                    .map_err(db)
                    .map(count(Kind::Change, 2))?
                    .get(0);
                let _ = got_tx.send(got);
                if got {
                    // Until the pass ends (or its task is gone).
                    let _ = done_rx.await;
                }
                tx.rollback().await.map_err(db).map(count(Kind::Change, 1))
            }
            .await;
            if let Err(e) = held {
                tracing::debug!(error = %e, "cluster: the subscription lock was not taken");
            }
        });
        if !got_rx.await.unwrap_or(false) {
            return None;
        }
        if let Err(e) = self.pull().await {
            self.note_down(&e);
            return None;
        }
        Some(SweepLock { _done: done_tx })
    }

    /// Claims each id (a grant's, a lapse's, a renewal's) for this node,
    /// once cluster-wide, and moves the account's allowance by the claims
    /// made now, in one transaction: returns the ids this node holds
    /// (claimed now, or before by this node: a write of its own that did
    /// not finish) and, of those, the ones claimed now (to give back if
    /// the write fails).
    pub async fn claim_once(
        &self,
        account: &str,
        claims: Vec<OnceClaim>,
        at_ms: i64,
    ) -> Result<(Vec<String>, Vec<String>), String> {
        if claims.is_empty() {
            return Ok((Vec::new(), Vec::new()));
        }
        let ids: Vec<String> = claims.iter().map(|c| c.id.clone()).collect();
        let kinds: Vec<String> = claims.iter().map(|c| c.kind.to_owned()).collect();
        let account = account.to_owned();
        let node = self.cfg.node_id.clone();
        let pool = self.pool.clone();
        let out = self
            .run(async move {
                let mut c = pool.get().await.map_err(pool_error)?;
                let tx = c.transaction().await.map_err(db).map(count(Kind::Change, 1))?;
                let new: Vec<String> = tx
                    .query(
                        "INSERT INTO tollgate_entries (id, kind, key_hash, account_id, amount, spent, node_id, at_ms) \
                         SELECT i, k, NULL, $3, 0, 0, $4, $5 FROM unnest($1::text[], $2::text[]) AS u(i, k) \
                         ORDER BY 1 ON CONFLICT (id) DO NOTHING RETURNING id",
                        &[&ids, &kinds, &account, &node, &at_ms],
                    )
                    .await
                    .map_err(db)
                    .map(count(Kind::Change, 2))?
                    .iter()
                    .map(|r| r.get(0))
                    .collect();
                let held = tx
                    .query(
                        "SELECT id FROM tollgate_entries WHERE id = ANY($1) AND node_id = $2",
                        &[&ids, &node],
                    )
                    .await
                    .map_err(db)
                    .map(count(Kind::Change, 2))?;
                // The moves of the claims made now, in the write's order.
                let (now_ids, moves): (Vec<String>, Vec<AllowanceMove>) = claims
                    .iter()
                    .filter(|c| c.allowance != AllowanceMove::Keep && new.contains(&c.id))
                    .map(|c| (c.id.clone(), c.allowance))
                    .unzip();
                if !moves.is_empty() {
                    let row = tx
                        .query_opt(
                            "SELECT allowance FROM tollgate_accounts WHERE id = $1 AND NOT deleted FOR UPDATE",
                            &[&account],
                        )
                        .await
                        .map_err(db)
                        .map(count(Kind::Change, 2))?;
                    // An account the database does not know has no money there.
                    if let Some(row) = row {
                        let moved = apply_moves(row.get(0), &moves)
                            .ok_or_else(|| "the allowance would be out of range".to_owned())?;
                        // A lapse keeps what it took, for the charges made
                        // before it that are settled after (`cluster::allowance`).
                        tx.execute(
                            "UPDATE tollgate_accounts SET allowance = $2, \
                             allowance_lapsed = COALESCE($3, allowance_lapsed), \
                             allowance_lapsed_at_ms = CASE WHEN $3::int8 IS NULL \
                                 THEN allowance_lapsed_at_ms ELSE $4 END \
                             WHERE id = $1",
                            &[&account, &moved.allowance, &moved.lapsed, &at_ms],
                        )
                        .await
                        .map_err(db)
                        .map(count(Kind::Change, 2))?;
                        tx.execute(
                            "UPDATE tollgate_entries e SET amount = d.a \
                             FROM unnest($1::text[], $2::int8[]) AS d(i, a) WHERE e.id = d.i",
                            &[&now_ids, &moved.each],
                        )
                        .await
                        .map_err(db)
                        .map(count(Kind::Change, 2))?;
                    }
                }
                tx.commit().await.map_err(db).map(count(Kind::Change, 1))?;
                Ok((held.iter().map(|r| r.get(0)).collect(), new))
            })
            .await;
        self.noted(out)
    }

    /// Gives back claims this node made for a write that did not happen,
    /// and undoes what they moved on the allowance (one statement; a lapse
    /// undone keeps nothing for late charges: its allowance is back).
    pub async fn unclaim(&self, ids: Vec<String>) {
        if ids.is_empty() {
            return;
        }
        let node = self.cfg.node_id.clone();
        let pool = self.pool.clone();
        let out = self
            .run(async move {
                let c = pool.get().await.map_err(pool_error)?;
                c.execute(
                    "WITH gone AS (DELETE FROM tollgate_entries WHERE id = ANY($1) AND node_id = $2 \
                     AND kind IN ('grant', 'lapse', 'renewal', 'subscribe') RETURNING account_id, amount, kind), \
                     per AS (SELECT account_id, SUM(amount)::bigint AS amount, \
                     bool_or(kind = 'lapse') AS lapse FROM gone GROUP BY account_id) \
                     UPDATE tollgate_accounts a SET allowance = a.allowance - per.amount, \
                     allowance_lapsed = CASE WHEN per.lapse THEN 0 ELSE a.allowance_lapsed END \
                     FROM per WHERE a.id = per.account_id AND (per.amount <> 0 OR per.lapse)",
                    &[&ids, &node],
                )
                .await
                .map_err(db)
                .map(count(Kind::Change, 2))
            })
            .await;
        if let Err(e) = self.noted(out) {
            tracing::warn!(error = %e, "cluster: claims of a subscription write not given back");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_grant_is_named_by_its_subscription_period_and_kind() {
        let m = |tag: u8, period: u64, extra: &str| SubscriptionMarker {
            tag,
            period,
            extra: extra.to_owned(),
        };
        assert_eq!(grant_entry_id("sub_1", &m(b'g', 3, "")), "grant:sub_1:g:3:");
        assert_eq!(
            grant_entry_id("sub_1", &m(b'u', 3, "pro")),
            "grant:sub_1:u:3:pro"
        );
        // The same period on any node is one id; another period another.
        assert_eq!(
            grant_entry_id("sub_1", &m(b'g', 3, "")),
            grant_entry_id("sub_1", &m(b'g', 3, ""))
        );
        assert_ne!(
            grant_entry_id("sub_1", &m(b'g', 3, "")),
            grant_entry_id("sub_1", &m(b'g', 4, ""))
        );
        assert_ne!(
            grant_entry_id("sub_1", &m(b'g', 3, "")),
            grant_entry_id("sub_2", &m(b'g', 3, ""))
        );
        assert_eq!(lapse_entry_id("sub_1", 3), "lapse:sub_1:3");
        assert_ne!(lapse_entry_id("sub_1", 3), lapse_entry_id("sub_1", 4));
        assert_eq!(renewal_entry_id("sub_1", "inv_9"), "renewal:sub_1:inv_9");
        assert_eq!(external_entry_id("sub_Stripe1"), "subscribe:sub_Stripe1");
    }

    #[test]
    fn a_period_roll_lapses_then_grants() {
        use AllowanceMove::*;
        let moved =
            |a, m: &[AllowanceMove]| apply_moves(a, m).map(|m| (m.allowance, m.each, m.lapsed));
        // 3 left of the period's grant of 4: the lapse takes 3, the next
        // period's grant gives 4 (not 7: nothing carries over).
        assert_eq!(
            moved(3, &[Lapse, Raise(4)]),
            Some((4, vec![-3, 4], Some(3)))
        );
        // Rollover (no lapse): the grant adds.
        assert_eq!(moved(3, &[Raise(4)]), Some((7, vec![4], None)));
        // Several periods at once (the last lapse is kept); a lapse of an
        // allowance below zero (a grant given back after it was spent)
        // brings it to zero and took nothing.
        assert_eq!(
            moved(-1, &[Lapse, Raise(2), Lapse, Raise(2)]),
            Some((2, vec![1, 2, -2, 2], Some(2)))
        );
        assert_eq!(moved(-1, &[Lapse]), Some((0, vec![1], Some(0))));
        // Claims that move nothing move nothing.
        assert_eq!(moved(5, &[Keep]), Some((5, vec![0], None)));
        // Undoing: allowance − Σ moved is where it started.
        let m = apply_moves(3, &[Lapse, Raise(4)]).unwrap();
        assert_eq!(m.allowance - m.each.iter().sum::<i64>(), 3);
        assert_eq!(apply_moves(i64::MAX, &[Raise(1)]), None);
    }
}
