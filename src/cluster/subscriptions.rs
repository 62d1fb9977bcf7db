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
//!   The rows are markers (amount 0): the allowance a grant gives is kept
//!   by the node that applied it, not in the database.

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

    /// Claims each id (a grant's, a renewal's) for this node, once
    /// cluster-wide: returns the ids this node holds (claimed now, or
    /// before by this node: a write of its own that did not finish) and,
    /// of those, the ones claimed now (to give back if the write fails).
    pub async fn claim_once(
        &self,
        account: &str,
        ids: Vec<(String, &'static str)>,
        at_ms: i64,
    ) -> Result<(Vec<String>, Vec<String>), String> {
        if ids.is_empty() {
            return Ok((Vec::new(), Vec::new()));
        }
        let (ids, kinds): (Vec<String>, Vec<&'static str>) = ids.into_iter().unzip();
        let kinds: Vec<String> = kinds.into_iter().map(str::to_owned).collect();
        let account = account.to_owned();
        let node = self.cfg.node_id.clone();
        let pool = self.pool.clone();
        let out = self
            .run(async move {
                let c = pool.get().await.map_err(pool_error)?;
                let new = c
                    .query(
                        "INSERT INTO tollgate_entries (id, kind, key_hash, account_id, amount, spent, node_id, at_ms) \
                         SELECT i, k, NULL, $3, 0, 0, $4, $5 FROM unnest($1::text[], $2::text[]) AS u(i, k) \
                         ORDER BY 1 ON CONFLICT (id) DO NOTHING RETURNING id",
                        &[&ids, &kinds, &account, &node, &at_ms],
                    )
                    .await
                    .map_err(db)
                    .map(count(Kind::Change, 2))?;
                let held = c
                    .query(
                        "SELECT id FROM tollgate_entries WHERE id = ANY($1) AND node_id = $2",
                        &[&ids, &node],
                    )
                    .await
                    .map_err(db)
                    .map(count(Kind::Change, 2))?;
                Ok((
                    held.iter().map(|r| r.get(0)).collect(),
                    new.iter().map(|r| r.get(0)).collect(),
                ))
            })
            .await;
        self.noted(out)
    }

    /// Gives back claims this node made for a write that did not happen.
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
                    "DELETE FROM tollgate_entries WHERE id = ANY($1) AND node_id = $2 \
                     AND kind IN ('grant', 'renewal', 'subscribe')",
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
        assert_eq!(renewal_entry_id("sub_1", "inv_9"), "renewal:sub_1:inv_9");
        assert_eq!(external_entry_id("sub_Stripe1"), "subscribe:sub_Stripe1");
    }
}
