//! Usage records in the database: written with their charges (one row of
//! `tollgate_entries` per record, inserted once per id, and added to the
//! hourly rollups in the same transaction: `super::rollups`), and read back
//! by the usage and report APIs in cluster mode, so that every node answers
//! the same whichever node served the requests: the sums from the rollups,
//! the listings and counts from the records.
//!
//! The reads return what the local store returns (hourly sums by model,
//! records newest first), so the reports fold them exactly as they fold
//! the store's rollups: the same JSON shapes on one node or many.

use super::schema::{db, pool as pool_error};
use super::trips::{Kind, count};
use super::{Charge, Cluster, database_unavailable};
use crate::error::ApiError;
use crate::money::Pico;
use crate::store::{KeyHash, Rollup, UsageRecord};

/// The record fields of a batch of charges, one array per column (NULL
/// for charges without a record: ledger entries).
pub(super) struct RecordColumns<'a> {
    pub model: Vec<Option<&'a str>>,
    pub upstream: Vec<Option<&'a str>>,
    pub route: Vec<Option<&'a str>>,
    pub stream: Vec<Option<bool>>,
    pub status: Vec<Option<i32>>,
    pub prompt: Vec<Option<i64>>,
    pub cached: Vec<Option<i64>>,
    pub cache_write: Vec<Option<i64>>,
    pub completion: Vec<Option<i64>>,
    pub reasoning: Vec<Option<i64>>,
    pub cost: Vec<Option<i64>>,
    pub reserved: Vec<Option<i64>>,
    pub latency: Vec<Option<i64>>,
    pub ttfb: Vec<Option<i64>>,
    pub request_id: Vec<Option<&'a str>>,
    pub client_ip: Vec<Option<&'a str>>,
    pub estimated: Vec<Option<bool>>,
}

/// A token count as a column (counts past i64 do not occur; saturated).
fn column(n: u64) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}

impl<'a> RecordColumns<'a> {
    pub(super) fn of(batch: &'a [Charge]) -> RecordColumns<'a> {
        let recs: Vec<Option<&UsageRecord>> = batch.iter().map(|c| c.record.as_deref()).collect();
        let col = |f: &dyn Fn(&'a UsageRecord) -> i64| -> Vec<Option<i64>> {
            recs.iter().map(|r| r.map(f)).collect()
        };
        RecordColumns {
            model: recs.iter().map(|r| r.map(|r| r.model.as_str())).collect(),
            upstream: recs
                .iter()
                .map(|r| r.map(|r| r.upstream.as_str()))
                .collect(),
            route: recs.iter().map(|r| r.map(|r| r.route.as_str())).collect(),
            stream: recs.iter().map(|r| r.map(|r| r.stream)).collect(),
            status: recs
                .iter()
                .map(|r| r.map(|r| i32::from(r.status)))
                .collect(),
            prompt: col(&|r| column(r.prompt_tokens)),
            cached: col(&|r| column(r.cached_tokens)),
            cache_write: col(&|r| column(r.cache_write_tokens)),
            completion: col(&|r| column(r.completion_tokens)),
            reasoning: col(&|r| column(r.reasoning_tokens)),
            cost: col(&|r| r.cost.0),
            reserved: col(&|r| r.reserved.0),
            latency: col(&|r| i64::from(r.latency_ms)),
            ttfb: col(&|r| i64::from(r.ttfb_ms)),
            request_id: recs
                .iter()
                .map(|r| r.map(|r| r.request_id.as_str()))
                .collect(),
            client_ip: recs
                .iter()
                .map(|r| r.map(|r| r.client_ip.as_str()))
                .collect(),
            estimated: recs.iter().map(|r| r.map(|r| r.estimated)).collect(),
        }
    }
}

/// The sums of a rollup over usage records (`super::rollups` adds them
/// to the rollups table in this order).
pub(super) const SUMS: &str = "COUNT(*)::int8, COALESCE(SUM(prompt_tokens), 0)::int8, \
     COALESCE(SUM(cached_tokens), 0)::int8, COALESCE(SUM(completion_tokens), 0)::int8, \
     COALESCE(SUM(reasoning_tokens), 0)::int8, COALESCE(SUM(cost), 0)::int8, \
     COALESCE(SUM(latency_ms), 0)::int8, COUNT(*) FILTER (WHERE status >= 400)::int8, \
     COUNT(*) FILTER (WHERE estimated)::int8, COALESCE(SUM(cache_write_tokens), 0)::int8";

/// The same sums over rows of `tollgate_usage_rollups`.
const ROLLED: &str = "SUM(requests)::int8, SUM(prompt_tokens)::int8, SUM(cached_tokens)::int8, \
     SUM(completion_tokens)::int8, SUM(reasoning_tokens)::int8, SUM(cost)::int8, \
     SUM(latency_ms)::int8, SUM(errors)::int8, SUM(estimated)::int8, SUM(cache_write_tokens)::int8";

/// A rollup from the sums starting at column `at`.
fn rollup(r: &tokio_postgres::Row, at: usize) -> Rollup {
    let n = |i: usize| r.get::<_, i64>(at + i).max(0) as u64;
    Rollup {
        requests: n(0),
        prompt_tokens: n(1),
        cached_tokens: n(2),
        completion_tokens: n(3),
        reasoning_tokens: n(4),
        cost: Pico(r.get(at + 5)),
        latency_ms_sum: n(6),
        errors: n(7),
        estimated: n(8),
        cache_write_tokens: n(9),
    }
}

fn record(r: &tokio_postgres::Row) -> Option<UsageRecord> {
    let key: Vec<u8> = r.get(0);
    let n = |i: usize| r.get::<_, Option<i64>>(i).unwrap_or(0);
    Some(UsageRecord {
        key: KeyHash::try_from(key.as_slice()).ok()?,
        at_ms: r.get(1),
        model: r.get::<_, Option<String>>(2).unwrap_or_default(),
        upstream: r.get::<_, Option<String>>(3).unwrap_or_default(),
        route: r.get::<_, Option<String>>(4).unwrap_or_default(),
        stream: r.get::<_, Option<bool>>(5).unwrap_or(false),
        status: u16::try_from(r.get::<_, Option<i32>>(6).unwrap_or(0)).unwrap_or(0),
        prompt_tokens: n(7).max(0) as u64,
        cached_tokens: n(8).max(0) as u64,
        cache_write_tokens: n(9).max(0) as u64,
        completion_tokens: n(10).max(0) as u64,
        reasoning_tokens: n(11).max(0) as u64,
        cost: Pico(n(12)),
        reserved: Pico(n(13)),
        latency_ms: u32::try_from(n(14)).unwrap_or(u32::MAX),
        ttfb_ms: u32::try_from(n(15)).unwrap_or(u32::MAX),
        request_id: r.get::<_, Option<String>>(16).unwrap_or_default(),
        client_ip: r.get::<_, Option<String>>(17).unwrap_or_default(),
        estimated: r.get::<_, Option<bool>>(18).unwrap_or(false),
        daily_fee: Pico::ZERO,
        account: None,
    })
}

impl Cluster {
    /// Hourly sums by model of the usage records of `keys` (`None`: of
    /// every key, deleted ones too) in hours `[first_hour, end_hour)`: what
    /// the store's rollups hold on a single node, read from the database's
    /// rollups (which keep the sums of records retention pruned).
    pub async fn usage_rollups(
        &self,
        keys: Option<&[KeyHash]>,
        first_hour: i64,
        end_hour: i64,
    ) -> Result<Vec<(i64, String, Rollup)>, ApiError> {
        let keys: Option<Vec<Vec<u8>>> = keys.map(|k| k.iter().map(|h| h.to_vec()).collect());
        let pool = self.pool.clone();
        self.read(async move {
            let c = pool.get().await.map_err(pool_error)?;
            let rows = c
                .query(
                    &format!(
                        "SELECT hour, model, {ROLLED} FROM tollgate_usage_rollups \
                         WHERE hour >= $2 AND hour < $3 \
                         AND ($1::bytea[] IS NULL OR key_hash = ANY($1)) GROUP BY 1, 2"
                    ),
                    &[&keys, &first_hour, &end_hour],
                )
                .await
                .map_err(db)
                .map(count(Kind::Read, 2))?;
            Ok(rows
                .iter()
                .map(|r| (r.get(0), r.get(1), rollup(r, 2)))
                .collect())
        })
        .await
    }

    /// Each key's sums over hours `[first_hour, end_hour)` (keys with
    /// records in the range only), from the rollups.
    pub async fn usage_by_key(
        &self,
        first_hour: i64,
        end_hour: i64,
    ) -> Result<Vec<(KeyHash, Rollup)>, ApiError> {
        let pool = self.pool.clone();
        self.read(async move {
            let c = pool.get().await.map_err(pool_error)?;
            let rows = c
                .query(
                    &format!(
                        "SELECT key_hash, {ROLLED} FROM tollgate_usage_rollups \
                         WHERE hour >= $1 AND hour < $2 GROUP BY 1"
                    ),
                    &[&first_hour, &end_hour],
                )
                .await
                .map_err(db)
                .map(count(Kind::Read, 2))?;
            Ok(rows
                .iter()
                .filter_map(|r| {
                    let h: Vec<u8> = r.get(0);
                    Some((KeyHash::try_from(h.as_slice()).ok()?, rollup(r, 1)))
                })
                .collect())
        })
        .await
    }

    /// The usage records of `keys`, newest first, from `offset`.
    pub async fn usage_records(
        &self,
        keys: &[KeyHash],
        offset: usize,
        limit: usize,
    ) -> Result<Vec<UsageRecord>, ApiError> {
        let keys: Vec<Vec<u8>> = keys.iter().map(|h| h.to_vec()).collect();
        let (offset, limit) = (offset as i64, limit as i64);
        let pool = self.pool.clone();
        self.read(async move {
            let c = pool.get().await.map_err(pool_error)?;
            let rows = c
                .query(
                    "SELECT key_hash, at_ms, model, upstream, route, stream, status, prompt_tokens, \
                     cached_tokens, cache_write_tokens, completion_tokens, reasoning_tokens, cost, \
                     reserved, latency_ms, ttfb_ms, request_id, client_ip, estimated \
                     FROM tollgate_entries WHERE model IS NOT NULL AND key_hash = ANY($1) \
                     ORDER BY at_ms DESC, id DESC OFFSET $2 LIMIT $3",
                    &[&keys, &offset, &limit],
                )
                .await
                .map_err(db).map(count(Kind::Read, 2))?;
            Ok(rows.iter().filter_map(record).collect())
        })
        .await
    }

    /// How many usage records the key has.
    pub async fn usage_count(&self, key: &KeyHash) -> Result<u64, ApiError> {
        let key = key.to_vec();
        let pool = self.pool.clone();
        self.read(async move {
            let c = pool.get().await.map_err(pool_error)?;
            let n: i64 = c
                .query_one(
                    "SELECT COUNT(*) FROM tollgate_entries WHERE model IS NOT NULL AND key_hash = $1",
                    &[&key],
                )
                .await
                .map_err(db).map(count(Kind::Read, 2))?
                .get(0);
            Ok(n.max(0) as u64)
        })
        .await
    }

    /// A read for the API on the cluster's runtime: the database
    /// unreachable is 503, as for a request that needs it.
    pub(super) async fn read<T: Send + 'static>(
        &self,
        fut: impl std::future::Future<Output = Result<T, String>> + Send + 'static,
    ) -> Result<T, ApiError> {
        match self.run(fut).await {
            Ok(v) => {
                self.note_up();
                Ok(v)
            }
            Err(e) => {
                self.note_down(&e);
                Err(database_unavailable())
            }
        }
    }
}
