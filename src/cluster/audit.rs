//! The audit log cluster-wide: each node ships the entries its own admin
//! writes made (they are written in the write's batch of the local store,
//! as in single-node mode) to `tollgate_audit` on the settle tick, once per
//! entry; in cluster mode `GET /api/v1/audit` reads that table, so every
//! node lists every node's admin writes in one order (the database's
//! `seq`, which `after=` pages by).
//!
//! An entry's id in the database is `node_id:local seq:at`: stable across
//! restarts (a node ships from its first entry again when it starts, and
//! what is there already is skipped), and distinct for a node whose store
//! was wiped (its seq starts again, at a later time). A change applied
//! from another node is not audited again (it runs without an actor).

use std::sync::atomic::Ordering;

use super::Cluster;
use super::schema::{db, pool as pool_error};
use super::trips::{Kind, count};
use crate::error::ApiError;
use crate::events::AuditEntry;
use crate::store::AuditQuery;

/// Entries shipped per statement.
const SHIP_BATCH: usize = 500;

impl Cluster {
    /// Writes this node's audit entries not yet in the database.
    pub(super) async fn ship_audit(&self) {
        let Some(app) = self.app() else {
            return;
        };
        loop {
            let after = self.audit_shipped.load(Ordering::Acquire);
            let q = AuditQuery {
                after,
                limit: SHIP_BATCH,
                ..AuditQuery::default()
            };
            let entries = match app.store.audit_log(&q) {
                Ok(e) => e,
                Err(e) => {
                    tracing::warn!(error = %e, "cluster: audit entries not read");
                    return;
                }
            };
            let Some(last) = entries.last().map(|e| e.seq) else {
                return;
            };
            let full = entries.len() == SHIP_BATCH;
            let node = self.cfg.node_id.clone();
            let mut ids = Vec::with_capacity(entries.len());
            let mut bodies = Vec::with_capacity(entries.len());
            let mut actors = Vec::with_capacity(entries.len());
            let mut targets = Vec::with_capacity(entries.len());
            for e in &entries {
                ids.push(format!("{node}:{}:{}", e.seq, e.at));
                bodies.push(serde_json::to_string(e).unwrap_or_default());
                actors.push(e.actor.clone());
                targets.push(e.target.clone());
            }
            let pool = self.pool.clone();
            let written = self
                .run(async move {
                    let c = pool.get().await.map_err(pool_error)?;
                    c.execute(
                        "INSERT INTO tollgate_audit (id, entry, actor, target) \
                         SELECT * FROM unnest($1::text[], $2::text[], $3::text[], $4::text[]) \
                         ORDER BY 1 ON CONFLICT (id) DO NOTHING",
                        &[&ids, &bodies, &actors, &targets],
                    )
                    .await
                    .map_err(db)
                    .map(count(Kind::Settle, 2))
                })
                .await;
            match written {
                Ok(_) => {
                    self.audit_shipped.fetch_max(last, Ordering::AcqRel);
                }
                Err(e) => {
                    self.note_down(&e);
                    return;
                }
            }
            if !full {
                return;
            }
        }
    }

    /// `GET /api/v1/audit` in cluster mode: every node's entries, in the
    /// database's order, with the same filters and shape as the store's
    /// log (`seq` is the database's). This node's own entries are shipped
    /// first, so a write it just made is listed.
    pub async fn audit_log(&self, q: &AuditQuery) -> Result<Vec<AuditEntry>, ApiError> {
        self.ship_audit().await;
        let after = i64::try_from(q.after).unwrap_or(i64::MAX);
        let limit = i64::try_from(q.limit).unwrap_or(i64::MAX);
        let (actor, target) = (q.actor.clone(), q.target.clone());
        let pool = self.pool.clone();
        let rows: Vec<(i64, String)> = self
            .read(async move {
                let c = pool.get().await.map_err(pool_error)?;
                let rows = c
                    .query(
                        "SELECT seq, entry FROM tollgate_audit WHERE seq > $1 \
                         AND ($2::text IS NULL OR actor = $2) AND ($3::text IS NULL OR target = $3) \
                         ORDER BY seq LIMIT $4",
                        &[&after, &actor, &target, &limit],
                    )
                    .await
                    .map_err(db)
                    .map(count(Kind::Read, 2))?;
                Ok(rows
                    .iter()
                    .map(|r| (r.get::<_, i64>(0), r.get::<_, String>(1)))
                    .collect::<Vec<_>>())
            })
            .await?;
        let mut out = Vec::with_capacity(rows.len());
        for (seq, body) in rows {
            match serde_json::from_str::<AuditEntry>(&body) {
                Ok(mut e) => {
                    e.seq = seq.max(0) as u64;
                    out.push(e);
                }
                Err(e) => tracing::warn!(seq, error = %e, "cluster: an audit row does not parse"),
            }
        }
        Ok(out)
    }
}
