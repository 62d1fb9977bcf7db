//! Usage rollups and retention in the database (schema version 12).
//!
//! - **Rollups**: `tollgate_usage_rollups` holds, per key, UTC hour and
//!   model, the sums a single node's store keeps as its hourly rollups
//!   (requests, tokens, cost, latency, errors, estimates). They are added
//!   in the transaction that inserts a settle batch's records, from the
//!   records that insert actually made (`ON CONFLICT DO NOTHING
//!   RETURNING`): a batch written again (its commit was not seen) or the
//!   same batch from two connections at once adds nothing the second
//!   time, so a rollup is always Σ of its records, once each. The reports
//!   (`super::usage`) read them instead of scanning the records.
//! - **Retention** (`storage.usage_retention_days`): one node at a time
//!   (a transaction advisory lock, [`PRUNE_LOCK`]) deletes the usage
//!   records older than the retention from `tollgate_entries`; the
//!   rollups keep their sums, so the reports over old hours answer the
//!   same. Only rows that are usage records (`kind = 'usage'` with the
//!   record's fields) go: ledger entries, payments' money and the claims
//!   of grants, lapses and renewals stay. A node's last settled batch is
//!   kept whatever its age (`tollgate_usage_settled`): its ids must still
//!   be there if the node writes it again, or it would be counted twice.

use deadpool_postgres::GenericClient;
use tokio_postgres::Row;

use super::schema::{db, pool as pool_error};
use super::trips::{Kind, count};
use super::{Charge, Cluster, usage};
use crate::clock::HOUR_MS;

/// Advisory (transaction) lock id held by the node pruning old records.
pub const PRUNE_LOCK: i64 = 0x746f_6c6c_0012;

/// Most records one retention pass deletes (the next pass goes on).
const PRUNE_MAX: i64 = 20_000;

/// Inserts a batch's entries (the new ids only) and adds the records among
/// them to the rollups, in the caller's transaction. Returns, per entry
/// inserted now: key hash, account id, amount, spent, kind, at_ms, id.
pub async fn insert_entries(
    tx: &impl GenericClient,
    node: &str,
    batch: &[Charge],
) -> Result<Vec<Row>, String> {
    let ids: Vec<&str> = batch.iter().map(|c| c.id.as_str()).collect();
    let kinds: Vec<&str> = batch.iter().map(|c| c.kind).collect();
    let keys: Vec<Option<Vec<u8>>> = batch.iter().map(|c| c.key.map(|k| k.to_vec())).collect();
    let accounts: Vec<Option<&str>> = batch.iter().map(|c| c.account.as_deref()).collect();
    let amounts: Vec<i64> = batch.iter().map(|c| c.amount).collect();
    let spents: Vec<i64> = batch.iter().map(|c| c.spent).collect();
    let ats: Vec<i64> = batch.iter().map(|c| c.at_ms).collect();
    let r = usage::RecordColumns::of(batch);
    let rows = tx
        .query(
            "INSERT INTO tollgate_entries (id, kind, key_hash, account_id, amount, spent, node_id, at_ms, \
             model, upstream, route, stream, status, prompt_tokens, cached_tokens, cache_write_tokens, \
             completion_tokens, reasoning_tokens, cost, reserved, latency_ms, ttfb_ms, request_id, \
             client_ip, estimated) \
             SELECT i, k, h, a, m, s, $8, t, r1, r2, r3, r4, r5, r6, r7, r8, r9, r10, r11, r12, r13, r14, \
             r15, r16, r17 FROM UNNEST($1::text[], $2::text[], $3::bytea[], $4::text[], \
             $5::int8[], $6::int8[], $7::int8[], $9::text[], $10::text[], $11::text[], $12::bool[], \
             $13::int4[], $14::int8[], $15::int8[], $16::int8[], $17::int8[], $18::int8[], $19::int8[], \
             $20::int8[], $21::int8[], $22::int8[], $23::text[], $24::text[], $25::bool[]) \
             AS u(i, k, h, a, m, s, t, r1, r2, r3, r4, r5, r6, r7, r8, r9, r10, r11, r12, r13, r14, r15, r16, r17) \
             ON CONFLICT (id) DO NOTHING RETURNING key_hash, account_id, amount, spent, kind, at_ms, id",
            &[
                &ids, &kinds, &keys, &accounts, &amounts, &spents, &ats, &node, &r.model,
                &r.upstream, &r.route, &r.stream, &r.status, &r.prompt, &r.cached,
                &r.cache_write, &r.completion, &r.reasoning, &r.cost, &r.reserved,
                &r.latency, &r.ttfb, &r.request_id, &r.client_ip, &r.estimated,
            ],
        )
        .await
        .map_err(db)
        .map(count(Kind::Settle, 2))?;
    // Only the records this insert made: a row that was there already is
    // in the rollups already.
    let new: Vec<&str> = rows
        .iter()
        .filter(|r| r.get::<_, &str>(4) == "usage")
        .map(|r| r.get::<_, &str>(6))
        .collect();
    if !new.is_empty() {
        // Rows locked in (key, hour, model) order by every writer: two
        // nodes adding to the same rollups never deadlock.
        tx.execute(
            &format!(
                "INSERT INTO tollgate_usage_rollups AS r (key_hash, hour, model, requests, \
                 prompt_tokens, cached_tokens, completion_tokens, reasoning_tokens, cost, \
                 latency_ms, errors, estimated, cache_write_tokens) \
                 SELECT key_hash, div(at_ms, {HOUR_MS})::int8, model, {} FROM tollgate_entries \
                 WHERE id = ANY($1) AND model IS NOT NULL AND key_hash IS NOT NULL \
                 GROUP BY 1, 2, 3 ORDER BY 1, 2, 3 \
                 ON CONFLICT (key_hash, hour, model) DO UPDATE SET \
                 requests = r.requests + EXCLUDED.requests, \
                 prompt_tokens = r.prompt_tokens + EXCLUDED.prompt_tokens, \
                 cached_tokens = r.cached_tokens + EXCLUDED.cached_tokens, \
                 completion_tokens = r.completion_tokens + EXCLUDED.completion_tokens, \
                 reasoning_tokens = r.reasoning_tokens + EXCLUDED.reasoning_tokens, \
                 cost = r.cost + EXCLUDED.cost, latency_ms = r.latency_ms + EXCLUDED.latency_ms, \
                 errors = r.errors + EXCLUDED.errors, estimated = r.estimated + EXCLUDED.estimated, \
                 cache_write_tokens = r.cache_write_tokens + EXCLUDED.cache_write_tokens",
                usage::SUMS
            ),
            &[&new],
        )
        .await
        .map_err(db)
        .map(count(Kind::Settle, 2))?;
    }
    // The batch's oldest record (new or not): retention keeps this node's
    // rows from it on until a later batch commits.
    if let Some(oldest) = batch
        .iter()
        .filter(|c| c.record.is_some())
        .map(|c| c.at_ms)
        .min()
    {
        tx.execute(
            "INSERT INTO tollgate_usage_settled (node_id, oldest_ms) VALUES ($1, $2) \
             ON CONFLICT (node_id) DO UPDATE SET oldest_ms = EXCLUDED.oldest_ms",
            &[&node, &oldest],
        )
        .await
        .map_err(db)
        .map(count(Kind::Settle, 2))?;
    }
    Ok(rows)
}

impl Cluster {
    /// Retention in the database: deletes up to [`PRUNE_MAX`] usage
    /// records made before `before_ms` (their rollups stay), on the one
    /// node that takes [`PRUNE_LOCK`]; the others skip the pass. Returns
    /// how many it deleted.
    pub async fn prune_usage_before(&self, before_ms: i64) -> u64 {
        let pool = self.pool.clone();
        let pruned = self
            .run(async move {
                let mut c = pool.get().await.map_err(pool_error)?;
                let tx = c
                    .transaction()
                    .await
                    .map_err(db)
                    .map(count(Kind::Change, 1))?;
                let got: bool = tx
                    .query_one("SELECT pg_try_advisory_xact_lock($1)", &[&PRUNE_LOCK])
                    .await
                    .map_err(db)
                    .map(count(Kind::Change, 2))?
                    .get(0);
                if !got {
                    return Ok(0);
                }
                let n = tx
                    .execute(
                        "DELETE FROM tollgate_entries WHERE id IN (SELECT e.id FROM tollgate_entries e \
                         LEFT JOIN tollgate_usage_settled s ON s.node_id = e.node_id \
                         WHERE e.model IS NOT NULL AND e.kind = 'usage' AND e.at_ms < $1 \
                         AND (s.oldest_ms IS NULL OR e.at_ms < s.oldest_ms) \
                         ORDER BY e.at_ms LIMIT $2)",
                        &[&before_ms, &PRUNE_MAX],
                    )
                    .await
                    .map_err(db)
                    .map(count(Kind::Change, 2))?;
                tx.commit().await.map_err(db).map(count(Kind::Change, 1))?;
                Ok(n)
            })
            .await;
        match pruned {
            Ok(n) => {
                if n > 0 {
                    tracing::debug!(records = n, "cluster: old usage records pruned");
                }
                n
            }
            Err(e) => {
                self.note_down(&e);
                0
            }
        }
    }
}
