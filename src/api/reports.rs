//! Usage reports, read from the hourly rollups (in cluster mode from the
//! database's usage records, summed the same way, so every node answers
//! the same): the detail (summary, by
//! model, by day, recent records), the chart (a gap-free series) and pages
//! of records, for one key, an owner's keys, or the whole gateway.
//!
//! The cost of a report depends on the range (hours × models), never on how
//! many records a key has: only `recent_logs` and the logs pages read
//! records, and only the page asked for. Served to the key itself by
//! [`super::usage`] and to the admin (`/api/v1/keys/{hash}/usage…`,
//! `/api/v1/owners/{owner}/usage…`, `/api/v1/usage`) by [`admin`].

use std::collections::BTreeMap;

use http::{Response, StatusCode};
use serde::Serialize;

use super::{Ctx, Data, json, key_not_found, percent_decode, query_pairs, store_error};
use crate::clock::{DAY_MS, HOUR_MS, civil_from_days, rfc3339};
use crate::error::ApiError;
use crate::money::Pico;
use crate::store::{KeyHash, KeyQuery, Rollup, RollupScope, UsageRecord};

/// Range when the request names none.
const DEFAULT_RANGE_MS: i64 = 30 * DAY_MS;
/// Longest range one report may cover: a year and then some, so that "last
/// 365 days" fits, and a report stays a few thousand rollups per model.
pub(super) const MAX_RANGE_DAYS: i64 = 400;
/// Longest range of an hourly chart (744 points).
const MAX_HOURLY_DAYS: i64 = 31;
/// Nothing was metered before this (2020-01-01T00:00:00Z, Unix s): an
/// earlier `start` is a mistake (milliseconds read as seconds the other way
/// round, a zero), not a question.
const EPOCH_FLOOR_S: i64 = 1_577_836_800;
/// How far past now `end` may reach (a portal asking "until the end of
/// today").
const FUTURE_SLACK_MS: i64 = DAY_MS;
/// Records in a detail's `recent_logs`.
const RECENT_LOGS: usize = 20;
/// Largest logs page.
pub(super) const LOGS_PAGE_MAX: usize = 100;
const LOGS_PAGE_DEFAULT: usize = 20;
/// Keys an owner report merges at most.
const OWNER_KEYS_MAX: usize = 1000;
/// Keys the gateway report attributes usage to at most; the usage of keys
/// beyond (and of deleted keys) is reported as `other_keys`.
const GATEWAY_KEYS_MAX: usize = 10_000;
const TOP_DEFAULT: usize = 10;
const TOP_MAX: usize = 1000;

// ---- query parameters ----

/// The query's parameters, each known to the endpoint and present once.
/// A key or hash parameter is refused with its own message: every report
/// a key can reach is its own.
pub(super) fn params(
    query: Option<&str>,
    known: &[&'static str],
) -> Result<Vec<(String, String)>, ApiError> {
    let pairs = query_pairs(query)?;
    for (i, (k, _)) in pairs.iter().enumerate() {
        if !known.contains(&k.as_str()) {
            let message = if matches!(
                k.as_str(),
                "hash" | "key" | "key_hash" | "token" | "token_id" | "token_key"
            ) {
                format!(
                    "`{k}` is not a parameter here: usage is reported for the key that \
                     authenticates the request (or, for the admin, the key in the path)."
                )
            } else {
                format!(
                    "Unknown query parameter `{}`. Known parameters: {}.",
                    crate::error::truncate(k, 64),
                    if known.is_empty() {
                        "none".to_owned()
                    } else {
                        known.join(", ")
                    }
                )
            };
            return Err(ApiError::bad_request("unknown_parameter", message).with_param(k.clone()));
        }
        if pairs[..i].iter().any(|(prev, _)| prev == k) {
            return Err(ApiError::bad_request(
                "duplicate_parameter",
                format!("The query parameter `{k}` appears twice."),
            )
            .with_param(k.clone()));
        }
    }
    Ok(pairs)
}

fn param<'a>(pairs: &'a [(String, String)], name: &str) -> Option<&'a str> {
    pairs
        .iter()
        .find(|(k, _)| k == name)
        .map(|(_, v)| v.as_str())
}

/// A non-negative integer parameter (ASCII digits only: no sign, no
/// fraction, no exponent).
fn integer(pairs: &[(String, String)], name: &'static str) -> Result<Option<u64>, ApiError> {
    let Some(v) = param(pairs, name) else {
        return Ok(None);
    };
    let ok = !v.is_empty() && v.len() <= 18 && v.bytes().all(|b| b.is_ascii_digit());
    match v.parse::<u64>() {
        Ok(n) if ok => Ok(Some(n)),
        _ => Err(ApiError::bad_request(
            "invalid_query",
            format!("`{name}` must be a non-negative integer."),
        )
        .with_param(name)),
    }
}

/// A report's time range: `[start_ms, end_ms)`, widened to whole hours
/// (rollups are hourly).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) struct Range {
    pub start_ms: i64,
    pub end_ms: i64,
}

impl Range {
    fn first_hour(self) -> i64 {
        self.start_ms / HOUR_MS
    }

    fn end_hour(self) -> i64 {
        self.end_ms / HOUR_MS
    }
}

/// `start` and `end` (Unix seconds; default: the 30 days up to now).
pub(super) fn range_of(pairs: &[(String, String)], now_ms: i64) -> Result<Range, ApiError> {
    let bad = |name: &'static str, msg: String| {
        ApiError::bad_request("invalid_range", msg).with_param(name)
    };
    // Checked all the way: 18 digits of seconds do not fit in i64 ms.
    let out_of_range = |name: &'static str| {
        bad(
            name,
            format!("`{name}` is out of range (Unix seconds, not milliseconds)."),
        )
    };
    let secs = |name: &'static str| -> Result<Option<i64>, ApiError> {
        match integer(pairs, name)? {
            None => Ok(None),
            Some(s) => i64::try_from(s)
                .ok()
                .and_then(|s| s.checked_mul(1000))
                .map(Some)
                .ok_or_else(|| out_of_range(name)),
        }
    };
    let (start, end) = (secs("start")?, secs("end")?);
    let end_ms = match end {
        Some(e) => e,
        None => match start {
            Some(s) => s
                .checked_add(DEFAULT_RANGE_MS)
                .ok_or_else(|| out_of_range("start"))?
                .min(now_ms),
            None => now_ms,
        },
    };
    let start_ms = match start {
        Some(s) => s,
        None => end_ms.saturating_sub(DEFAULT_RANGE_MS),
    };
    let (start, end) = (start.map(|s| s / 1000), end.map(|e| e / 1000));
    if start.is_some_and(|s| s < EPOCH_FLOOR_S) {
        return Err(bad(
            "start",
            format!(
                "`start` is Unix seconds and must be at or after {EPOCH_FLOOR_S} (2020-01-01)."
            ),
        ));
    }
    if end.is_some_and(|e| e < EPOCH_FLOOR_S) {
        return Err(bad(
            "end",
            format!("`end` is Unix seconds and must be at or after {EPOCH_FLOOR_S} (2020-01-01)."),
        ));
    }
    if end_ms > now_ms + FUTURE_SLACK_MS {
        return Err(bad(
            "end",
            "`end` is more than a day in the future (Unix seconds, not milliseconds).".into(),
        ));
    }
    if start_ms >= end_ms {
        return Err(bad("start", "`start` must be before `end`.".into()));
    }
    if end_ms.saturating_sub(start_ms) > MAX_RANGE_DAYS * DAY_MS {
        return Err(bad(
            "end",
            format!("A range covers at most {MAX_RANGE_DAYS} days."),
        ));
    }
    Ok(Range {
        start_ms: start_ms.div_euclid(HOUR_MS) * HOUR_MS,
        end_ms: end_ms
            .div_euclid(HOUR_MS)
            .saturating_add(i64::from(end_ms.rem_euclid(HOUR_MS) != 0))
            .saturating_mul(HOUR_MS),
    })
}

/// Bucket width of a chart.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Granularity {
    Hour,
    Day,
}

impl Granularity {
    fn hours(self) -> i64 {
        match self {
            Granularity::Hour => 1,
            Granularity::Day => 24,
        }
    }

    fn as_str(self) -> &'static str {
        match self {
            Granularity::Hour => "hour",
            Granularity::Day => "day",
        }
    }
}

/// `granularity` (`hour` or `day`, default `day`), checked against the range.
pub(super) fn granularity_of(
    pairs: &[(String, String)],
    range: Range,
) -> Result<Granularity, ApiError> {
    let g = match param(pairs, "granularity") {
        None | Some("day") => Granularity::Day,
        Some("hour") => Granularity::Hour,
        Some(other) => {
            return Err(ApiError::bad_request(
                "invalid_granularity",
                format!(
                    "Unknown granularity `{}`: use `hour` or `day`.",
                    crate::error::truncate(other, 32)
                ),
            )
            .with_param("granularity"));
        }
    };
    if g == Granularity::Hour && range.end_ms - range.start_ms > MAX_HOURLY_DAYS * DAY_MS {
        return Err(ApiError::bad_request(
            "invalid_granularity",
            format!("An hourly chart covers at most {MAX_HOURLY_DAYS} days; use `day`."),
        )
        .with_param("granularity"));
    }
    Ok(g)
}

/// `page` (from 1) and `page_size` (1–100, default 20).
pub(super) fn page_and_size(pairs: &[(String, String)]) -> Result<(usize, usize), ApiError> {
    let page = match integer(pairs, "page")? {
        None => 1,
        Some(p) if p >= 1 => p as usize,
        Some(_) => {
            return Err(
                ApiError::bad_request("invalid_query", "`page` starts at 1.").with_param("page"),
            );
        }
    };
    let size = match integer(pairs, "page_size")? {
        None => LOGS_PAGE_DEFAULT,
        Some(s) if (1..=LOGS_PAGE_MAX as u64).contains(&s) => s as usize,
        Some(_) => {
            return Err(ApiError::bad_request(
                "invalid_query",
                format!("`page_size` must be from 1 to {LOGS_PAGE_MAX}."),
            )
            .with_param("page_size"));
        }
    };
    Ok((page, size))
}

// ---- folding rollups ----

/// Sums of rollups.
#[derive(Clone, Copy, Debug, Default)]
struct Sums {
    requests: u64,
    prompt: u64,
    cached: u64,
    completion: u64,
    reasoning: u64,
    cost: i64,
    latency_ms: u64,
    errors: u64,
    estimated: u64,
    cache_write: u64,
}

impl Sums {
    fn add(&mut self, r: &Rollup) {
        self.requests += r.requests;
        self.prompt += r.prompt_tokens;
        self.cached += r.cached_tokens;
        self.completion += r.completion_tokens;
        self.reasoning += r.reasoning_tokens;
        self.cost = self.cost.saturating_add(r.cost.0);
        self.latency_ms += r.latency_ms_sum;
        self.errors += r.errors;
        self.estimated += r.estimated;
        self.cache_write += r.cache_write_tokens;
    }

    fn merge(&mut self, o: &Sums) {
        self.requests += o.requests;
        self.prompt += o.prompt;
        self.cached += o.cached;
        self.completion += o.completion;
        self.reasoning += o.reasoning;
        self.cost = self.cost.saturating_add(o.cost);
        self.latency_ms += o.latency_ms;
        self.errors += o.errors;
        self.estimated += o.estimated;
        self.cache_write += o.cache_write;
    }

    fn tokens(&self) -> u64 {
        self.prompt + self.completion
    }
}

/// Rollups folded into a total, per-model sums and a dense bucket series.
struct Fold {
    range: Range,
    granularity: Granularity,
    /// Hour number of the first bucket's start.
    first_hour: i64,
    total: Sums,
    by_model: BTreeMap<String, Sums>,
    buckets: Vec<Sums>,
}

impl Fold {
    fn new(range: Range, granularity: Granularity) -> Fold {
        let width = granularity.hours();
        let first_hour = range.first_hour().div_euclid(width) * width;
        let last_hour = (range.end_hour() - 1).div_euclid(width) * width;
        let n = ((last_hour - first_hour) / width + 1).max(0) as usize;
        Fold {
            range,
            granularity,
            first_hour,
            total: Sums::default(),
            by_model: BTreeMap::new(),
            buckets: vec![Sums::default(); n],
        }
    }

    fn add(&mut self, hour: i64, model: String, r: &Rollup) {
        self.total.add(r);
        self.by_model.entry(model).or_default().add(r);
        let i = ((hour - self.first_hour) / self.granularity.hours()) as usize;
        if let Some(b) = self.buckets.get_mut(i) {
            b.add(r);
        }
    }

    fn scope(&mut self, ctx: &Ctx<'_>, scope: RollupScope) -> Result<(), ApiError> {
        let rows = ctx
            .store
            .rollups(scope, self.range.first_hour(), self.range.end_hour())
            .map_err(store_error)?;
        for (hour, model, r) in rows {
            self.add(hour, model, &r);
        }
        Ok(())
    }

    /// Folds the usage of `keys` (`None`: the whole gateway's), as
    /// [`rollups`] reads it.
    async fn usage(&mut self, ctx: &Ctx<'_>, keys: Option<&[KeyHash]>) -> Result<(), ApiError> {
        if super::cluster::of(ctx).is_none() {
            // One key's rollups at a time, straight from the store.
            match keys {
                None => return self.scope(ctx, RollupScope::Gateway),
                Some(keys) => {
                    for hash in keys {
                        self.scope(ctx, RollupScope::Key(*hash))?;
                    }
                    return Ok(());
                }
            }
        }
        let rows = rollups(ctx, keys, self.range.first_hour(), self.range.end_hour()).await?;
        for (hour, model, r) in rows {
            self.add(hour, model, &r);
        }
        Ok(())
    }
}

/// Hourly sums by model of the usage of `keys` (`None`: the whole
/// gateway's, deleted keys included) in hours `[first_hour, end_hour)`:
/// from the database's usage records in cluster mode (every node answers
/// the same), else the store's rollups.
pub(super) async fn rollups(
    ctx: &Ctx<'_>,
    keys: Option<&[KeyHash]>,
    first_hour: i64,
    end_hour: i64,
) -> Result<Vec<(i64, String, Rollup)>, ApiError> {
    if let Some(c) = super::cluster::of(ctx) {
        return c.usage_rollups(keys, first_hour, end_hour).await;
    }
    let scopes: Vec<RollupScope> = match keys {
        None => vec![RollupScope::Gateway],
        Some(keys) => keys.iter().map(|h| RollupScope::Key(*h)).collect(),
    };
    let mut out = Vec::new();
    for scope in scopes {
        out.extend(
            ctx.store
                .rollups(scope, first_hour, end_hour)
                .map_err(store_error)?,
        );
    }
    Ok(out)
}

/// The newest records of `keys` from `offset`: from the database in
/// cluster mode, else from the store (one key's at a time).
async fn records(
    ctx: &Ctx<'_>,
    keys: &[KeyHash],
    offset: usize,
    limit: usize,
) -> Result<Vec<UsageRecord>, ApiError> {
    if let Some(c) = super::cluster::of(ctx) {
        return c.usage_records(keys, offset, limit).await;
    }
    let mut out = Vec::new();
    for hash in keys {
        out.extend(ctx.store.usage(hash, offset, limit).map_err(store_error)?);
    }
    Ok(out)
}

// ---- answers ----

#[derive(Serialize)]
pub(super) struct Summary {
    pub(super) total_cost: Pico,
    total_requests: u64,
    total_tokens: u64,
    prompt_tokens: u64,
    cached_tokens: u64,
    completion_tokens: u64,
    reasoning_tokens: u64,
    avg_latency_ms: u64,
    /// Requests answered with a status ≥ 400.
    errors: u64,
    /// Requests charged from an estimate (stream cut, client gone).
    estimated: u64,
    /// Prompt tokens written to a prompt cache (Anthropic's cache
    /// creation), part of `prompt_tokens`; `cached_tokens` are the reads.
    cache_write_tokens: u64,
}

impl From<&Sums> for Summary {
    fn from(s: &Sums) -> Summary {
        Summary {
            total_cost: Pico(s.cost),
            total_requests: s.requests,
            total_tokens: s.tokens(),
            prompt_tokens: s.prompt,
            cached_tokens: s.cached,
            completion_tokens: s.completion,
            reasoning_tokens: s.reasoning,
            avg_latency_ms: s.latency_ms.checked_div(s.requests).unwrap_or(0),
            errors: s.errors,
            estimated: s.estimated,
            cache_write_tokens: s.cache_write,
        }
    }
}

#[derive(Serialize)]
pub(super) struct ModelRow {
    pub(super) model: String,
    pub(super) cost: Pico,
    requests: u64,
    tokens: u64,
    prompt_tokens: u64,
    completion_tokens: u64,
    /// Share of the range's cost in percent, two decimals (of requests when
    /// nothing cost anything).
    percentage: f64,
}

#[derive(Serialize)]
pub(super) struct DayRow {
    date: String,
    pub(super) cost: Pico,
    requests: u64,
    tokens: u64,
}

#[derive(Serialize)]
pub(super) struct Point {
    /// Bucket start, Unix seconds.
    pub(super) time: i64,
    /// `2026-11-23` (day) or `2026-11-23T13:00:00Z` (hour).
    date: String,
    pub(super) cost: Pico,
    pub(super) requests: u64,
    tokens: u64,
    prompt_tokens: u64,
    completion_tokens: u64,
}

/// One usage record as shown.
#[derive(Serialize)]
pub(super) struct LogItem {
    request_id: String,
    /// Unix seconds.
    created_at: i64,
    time: String,
    pub(super) model: String,
    upstream: String,
    route: String,
    stream: bool,
    status: u16,
    prompt_tokens: u64,
    cached_tokens: u64,
    completion_tokens: u64,
    reasoning_tokens: u64,
    total_tokens: u64,
    pub(super) cost: Pico,
    latency_ms: u32,
    ttfb_ms: u32,
    estimated: bool,
    /// Prompt tokens written to a prompt cache, part of `prompt_tokens`
    /// (`cached_tokens` are the cache reads).
    cache_write_tokens: u64,
    /// Admin reports only.
    #[serde(skip_serializing_if = "Option::is_none")]
    client_ip: Option<String>,
}

/// Who reads the records: the admin sees client IPs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Viewer {
    Key,
    Admin,
}

fn log_item(r: UsageRecord, viewer: Viewer) -> LogItem {
    LogItem {
        created_at: r.at_ms.div_euclid(1000),
        time: rfc3339(r.at_ms),
        total_tokens: r.prompt_tokens + r.completion_tokens,
        request_id: r.request_id,
        model: r.model,
        upstream: r.upstream,
        route: r.route,
        stream: r.stream,
        status: r.status,
        prompt_tokens: r.prompt_tokens,
        cached_tokens: r.cached_tokens,
        cache_write_tokens: r.cache_write_tokens,
        completion_tokens: r.completion_tokens,
        reasoning_tokens: r.reasoning_tokens,
        cost: r.cost,
        latency_ms: r.latency_ms,
        ttfb_ms: r.ttfb_ms,
        estimated: r.estimated,
        client_ip: (viewer == Viewer::Admin).then_some(r.client_ip),
    }
}

#[derive(Serialize)]
pub(super) struct Detail {
    pub(super) object: &'static str,
    /// The range answered, widened to whole hours (Unix seconds).
    pub(super) start: i64,
    pub(super) end: i64,
    pub(super) summary: Summary,
    pub(super) by_model: Vec<ModelRow>,
    pub(super) by_day: Vec<DayRow>,
    /// The newest records (whatever the range).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(super) recent_logs: Option<Vec<LogItem>>,
}

#[derive(Serialize)]
pub(super) struct Chart {
    pub(super) object: &'static str,
    pub(super) start: i64,
    pub(super) end: i64,
    pub(super) granularity: &'static str,
    pub(super) data: Vec<Point>,
}

#[derive(Serialize)]
pub(super) struct LogsPage {
    pub(super) items: Vec<LogItem>,
    pub(super) page: usize,
    pub(super) page_size: usize,
    /// The key's records still stored (retention removes old ones).
    pub(super) total: u64,
}

fn date_of_day(day: i64) -> String {
    let (y, m, d) = civil_from_days(day);
    format!("{y:04}-{m:02}-{d:02}")
}

fn model_rows(by_model: &BTreeMap<String, Sums>, total: &Sums) -> Vec<ModelRow> {
    let share = |s: &Sums| -> f64 {
        let (part, whole) = if total.cost > 0 {
            (s.cost as i128, total.cost as i128)
        } else {
            (s.requests as i128, total.requests as i128)
        };
        if whole == 0 {
            return 0.0;
        }
        // Basis points, rounded half up, from integers: no float drift.
        let bp = (part * 20_000 / whole + 1) / 2;
        bp as f64 / 100.0
    };
    let mut rows: Vec<ModelRow> = by_model
        .iter()
        .map(|(model, s)| ModelRow {
            model: model.clone(),
            cost: Pico(s.cost),
            requests: s.requests,
            tokens: s.tokens(),
            prompt_tokens: s.prompt,
            completion_tokens: s.completion,
            percentage: share(s),
        })
        .collect();
    rows.sort_by(|a, b| b.cost.0.cmp(&a.cost.0).then(a.model.cmp(&b.model)));
    rows
}

impl Fold {
    fn detail(&self, recent: Option<Vec<LogItem>>) -> Detail {
        debug_assert_eq!(self.granularity, Granularity::Day);
        let first_day = self.first_hour / 24;
        Detail {
            object: "usage_detail",
            start: self.range.start_ms / 1000,
            end: self.range.end_ms / 1000,
            summary: Summary::from(&self.total),
            by_model: model_rows(&self.by_model, &self.total),
            by_day: self
                .buckets
                .iter()
                .enumerate()
                .map(|(i, s)| DayRow {
                    date: date_of_day(first_day + i as i64),
                    cost: Pico(s.cost),
                    requests: s.requests,
                    tokens: s.tokens(),
                })
                .collect(),
            recent_logs: recent,
        }
    }

    fn chart(&self) -> Chart {
        let width = self.granularity.hours();
        Chart {
            object: "usage_chart",
            start: self.range.start_ms / 1000,
            end: self.range.end_ms / 1000,
            granularity: self.granularity.as_str(),
            data: self
                .buckets
                .iter()
                .enumerate()
                .map(|(i, s)| {
                    let hour = self.first_hour + i as i64 * width;
                    Point {
                        time: hour * 3600,
                        date: match self.granularity {
                            Granularity::Day => date_of_day(hour / 24),
                            Granularity::Hour => rfc3339(hour * HOUR_MS),
                        },
                        cost: Pico(s.cost),
                        requests: s.requests,
                        tokens: s.tokens(),
                        prompt_tokens: s.prompt,
                        completion_tokens: s.completion,
                    }
                })
                .collect(),
        }
    }
}

// ---- the reports ----

/// A detail over the given keys' rollups, with their newest records merged.
pub(super) async fn detail(
    ctx: &Ctx<'_>,
    keys: &[KeyHash],
    range: Range,
    viewer: Viewer,
) -> Result<Detail, ApiError> {
    let mut fold = Fold::new(range, Granularity::Day);
    fold.usage(ctx, Some(keys)).await?;
    let mut recent = records(ctx, keys, 0, RECENT_LOGS).await?;
    // Each key's list is newest first; merged, the newest RECENT_LOGS win.
    if keys.len() > 1 {
        recent.sort_by_key(|r| std::cmp::Reverse(r.at_ms));
        recent.truncate(RECENT_LOGS);
    }
    let items = recent.into_iter().map(|r| log_item(r, viewer)).collect();
    Ok(fold.detail(Some(items)))
}

pub(super) async fn chart(
    ctx: &Ctx<'_>,
    keys: &[KeyHash],
    range: Range,
    granularity: Granularity,
) -> Result<Chart, ApiError> {
    let mut fold = Fold::new(range, granularity);
    fold.usage(ctx, Some(keys)).await?;
    Ok(fold.chart())
}

/// A page of one key's records, newest first. The total is the key's
/// record count minus what retention removed: nothing is counted, and a
/// page past the end reads nothing. In cluster mode the total is the
/// database's count of the key's records.
pub(super) async fn logs(
    ctx: &Ctx<'_>,
    hash: &KeyHash,
    page: usize,
    page_size: usize,
    viewer: Viewer,
) -> Result<LogsPage, ApiError> {
    let (_, account) = ctx
        .store
        .key(hash)
        .map_err(store_error)?
        .ok_or_else(key_not_found)?;
    let total = match super::cluster::of(ctx) {
        Some(c) => c.usage_count(hash).await?,
        None => {
            let pruned = ctx.store.pruned_usage(hash).map_err(store_error)?;
            account.requests.saturating_sub(pruned)
        }
    };
    let offset = (page - 1).saturating_mul(page_size);
    let items = if (offset as u64) < total {
        records(ctx, &[*hash], offset, page_size)
            .await?
            .into_iter()
            .map(|r| log_item(r, viewer))
            .collect()
    } else {
        Vec::new()
    };
    Ok(LogsPage {
        items,
        page,
        page_size,
        total,
    })
}

// ---- admin endpoints ----

/// What a report route shows.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum View {
    Detail,
    Chart,
    Logs,
}

/// Whose usage an admin report shows.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Subject<'a> {
    /// `/api/v1/keys/{hash}/usage…`
    Key(&'a str),
    /// `/api/v1/owners/{owner}/usage…` (owner percent-encoded)
    Owner(&'a str),
    /// `/api/v1/usage`
    Gateway,
}

/// An admin report; the admin token has been checked.
pub(super) async fn admin(
    ctx: &Ctx<'_>,
    subject: Subject<'_>,
    view: View,
    query: Option<&str>,
) -> Result<Response<crate::Body>, ApiError> {
    let now = ctx.clock.now_ms();
    match subject {
        Subject::Key(seg) => {
            let hash = super::parse_hash(seg)?;
            if ctx.store.key(&hash).map_err(store_error)?.is_none() {
                return Err(key_not_found());
            }
            let report = key_report(ctx, &hash, view, query, now, Viewer::Admin).await?;
            json(StatusCode::OK, &Data { data: report })
        }
        Subject::Owner(seg) => {
            let owner = percent_decode(seg)
                .filter(|o| !o.is_empty())
                .ok_or_else(|| {
                    ApiError::bad_request("invalid_owner", "The owner in the path is malformed.")
                        .with_param("owner")
                })?;
            let mut keys = ctx
                .store
                .keys(&KeyQuery {
                    offset: 0,
                    limit: OWNER_KEYS_MAX + 1,
                    owner: Some(owner.clone()),
                    include_disabled: true,
                })
                .map_err(store_error)?;
            let truncated = keys.len() > OWNER_KEYS_MAX;
            keys.truncate(OWNER_KEYS_MAX);
            let hashes: Vec<KeyHash> = keys.iter().map(|(r, _)| r.hash).collect();
            let report = match view {
                View::Detail => {
                    let pairs = params(query, &["start", "end"])?;
                    let range = range_of(&pairs, now)?;
                    Report::Detail(detail(ctx, &hashes, range, Viewer::Admin).await?)
                }
                View::Chart => {
                    let pairs = params(query, &["start", "end", "granularity"])?;
                    let range = range_of(&pairs, now)?;
                    let g = granularity_of(&pairs, range)?;
                    Report::Chart(chart(ctx, &hashes, range, g).await?)
                }
                View::Logs => {
                    return Err(ApiError::not_found(
                        "An owner's usage has no logs; read each key's.",
                    ));
                }
            };
            #[derive(Serialize)]
            struct OwnerReport<T> {
                owner: String,
                keys: usize,
                /// More than 1,000 keys: the first 1,000 by creation.
                keys_truncated: bool,
                #[serde(flatten)]
                report: T,
            }
            let data = OwnerReport {
                owner,
                keys: hashes.len(),
                keys_truncated: truncated,
                report,
            };
            json(StatusCode::OK, &Data { data })
        }
        Subject::Gateway => gateway(ctx, query, now).await,
    }
}

/// A detail, chart or logs page.
#[derive(Serialize)]
#[serde(untagged)]
pub(super) enum Report {
    Detail(Detail),
    Chart(Chart),
    Logs(LogsPage),
}

/// One key's report, parameters read from the query.
pub(super) async fn key_report(
    ctx: &Ctx<'_>,
    hash: &KeyHash,
    view: View,
    query: Option<&str>,
    now: i64,
    viewer: Viewer,
) -> Result<Report, ApiError> {
    Ok(match view {
        View::Detail => {
            let pairs = params(query, &["start", "end"])?;
            Report::Detail(detail(ctx, &[*hash], range_of(&pairs, now)?, viewer).await?)
        }
        View::Chart => {
            let pairs = params(query, &["start", "end", "granularity"])?;
            let range = range_of(&pairs, now)?;
            let g = granularity_of(&pairs, range)?;
            Report::Chart(chart(ctx, &[*hash], range, g).await?)
        }
        View::Logs => {
            let pairs = params(query, &["page", "page_size"])?;
            let (page, size) = page_and_size(&pairs)?;
            Report::Logs(logs(ctx, hash, page, size, viewer).await?)
        }
    })
}

#[derive(Serialize)]
struct KeyRow {
    hash: String,
    name: String,
    label: String,
    owner: Option<String>,
    cost: Pico,
    requests: u64,
    tokens: u64,
}

#[derive(Serialize)]
struct Rest {
    cost: Pico,
    requests: u64,
    tokens: u64,
}

#[derive(Serialize)]
struct GatewayReport {
    object: &'static str,
    start: i64,
    end: i64,
    summary: Summary,
    by_model: Vec<ModelRow>,
    by_day: Vec<DayRow>,
    /// The `top` keys by cost in the range, most expensive first.
    by_key: Vec<KeyRow>,
    /// Everything else: keys below the top, deleted keys, keys past the
    /// bound. `Σ by_key + other_keys = summary`, exactly.
    other_keys: Rest,
    /// Keys with usage in the range, among those looked at.
    keys_with_usage: usize,
    /// Keys looked at (at most 10,000, oldest first).
    keys_scanned: usize,
    keys_truncated: bool,
}

/// `/api/v1/usage?start&end&top`: the gateway-wide rollups for the totals,
/// and each listed key's rollups for the split by key.
async fn gateway(
    ctx: &Ctx<'_>,
    query: Option<&str>,
    now: i64,
) -> Result<Response<crate::Body>, ApiError> {
    let pairs = params(query, &["start", "end", "top"])?;
    let range = range_of(&pairs, now)?;
    let top = match integer(&pairs, "top")? {
        None => TOP_DEFAULT,
        Some(n) if n as usize <= TOP_MAX => n as usize,
        Some(_) => {
            return Err(ApiError::bad_request(
                "invalid_query",
                format!("`top` must be from 0 to {TOP_MAX}."),
            )
            .with_param("top"));
        }
    };
    let mut fold = Fold::new(range, Granularity::Day);
    fold.usage(ctx, None).await?;
    // Cluster mode: every key's sums in one read of the database.
    let by_key: Option<std::collections::HashMap<KeyHash, Rollup>> = match super::cluster::of(ctx) {
        Some(c) => Some(
            c.usage_by_key(range.first_hour(), range.end_hour())
                .await?
                .into_iter()
                .collect(),
        ),
        None => None,
    };

    let mut rows: Vec<(KeyRow, Sums)> = Vec::new();
    let mut scanned = 0usize;
    let mut truncated = false;
    const PAGE: usize = 1000;
    loop {
        let page = ctx
            .store
            .keys(&KeyQuery {
                offset: scanned,
                limit: PAGE,
                owner: None,
                include_disabled: true,
            })
            .map_err(store_error)?;
        let n = page.len();
        for (rec, _) in page {
            let mut s = Sums::default();
            match &by_key {
                Some(m) => {
                    if let Some(r) = m.get(&rec.hash) {
                        s.add(r);
                    }
                }
                None => {
                    for (_, _, r) in ctx
                        .store
                        .rollups(
                            RollupScope::Key(rec.hash),
                            range.first_hour(),
                            range.end_hour(),
                        )
                        .map_err(store_error)?
                    {
                        s.add(&r);
                    }
                }
            }
            if s.requests > 0 || s.cost != 0 {
                rows.push((
                    KeyRow {
                        hash: hex::encode(rec.hash),
                        name: rec.name,
                        label: rec.label,
                        owner: rec.owner,
                        cost: Pico(s.cost),
                        requests: s.requests,
                        tokens: s.tokens(),
                    },
                    s,
                ));
            }
        }
        scanned += n;
        if n < PAGE {
            break;
        }
        if scanned >= GATEWAY_KEYS_MAX {
            truncated = true;
            break;
        }
    }
    let keys_with_usage = rows.len();
    rows.sort_by(|a, b| {
        b.1.cost
            .cmp(&a.1.cost)
            .then(b.1.requests.cmp(&a.1.requests))
            .then(a.0.hash.cmp(&b.0.hash))
    });
    rows.truncate(top);
    let mut shown = Sums::default();
    for (_, s) in &rows {
        shown.merge(s);
    }
    let total = fold.total;
    let detail = fold.detail(None);
    let report = GatewayReport {
        object: "gateway_usage",
        start: detail.start,
        end: detail.end,
        summary: detail.summary,
        by_model: detail.by_model,
        by_day: detail.by_day,
        by_key: rows.into_iter().map(|(k, _)| k).collect(),
        other_keys: Rest {
            cost: Pico(total.cost.saturating_sub(shown.cost)),
            requests: total.requests.saturating_sub(shown.requests),
            tokens: total.tokens().saturating_sub(shown.tokens()),
        },
        keys_with_usage,
        keys_scanned: scanned,
        keys_truncated: truncated,
    };
    json(StatusCode::OK, &Data { data: report })
}
