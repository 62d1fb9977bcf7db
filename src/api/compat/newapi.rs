//! new-api, as seed 001 uses it: the Supabase trigger's
//! `POST /api/token/import` `{key, external_user_id, name, unlimited_quota}`
//! (admin bearer; `key` is the 48 characters without the `sk-` the user's
//! client presents; the trigger reads `data.token_id` and wants 200), and
//! the portal's consumption API (`/api/usage/token/detail`, `/chart`,
//! `/logs`, served by `usage` from `reports`) with new-api's integer
//! `quota` next to each exact USD `cost`.

use http::{Response, StatusCode};
use serde::Serialize;

use super::super::reports::{
    Chart, DayRow, Detail, LogItem, LogsPage, ModelRow, Point, Report, Summary,
};
use super::super::{Ctx, Fields, Patch, invalid, json, keys, store_error};
use super::units_of;
use crate::error::ApiError;
use crate::money::Pico;

/// `POST /api/token/import`. A new key and the same key again for the same
/// user both answer 200 with the same `token_id` (the trigger treats
/// anything else as a failed sync); another user's key is 409; a key that
/// is not 48 letters or digits is 400.
pub(super) async fn import(ctx: &Ctx<'_>, f: &Fields) -> Result<Response<crate::Body>, ApiError> {
    f.only(&["key", "external_user_id", "name", "unlimited_quota"])?;
    let key: String = f.required("key", "a string")?;
    let len = ctx.config.keys.import_length;
    if key.len() != len || !key.bytes().all(|b| b.is_ascii_alphanumeric()) {
        return Err(invalid(
            "key",
            "invalid_key_format",
            format!(
                "`key` must be exactly {len} letters or digits, without the {:?} the client presents.",
                ctx.config.keys.import_prefix
            ),
        ));
    }
    let owner: String = f.required("external_user_id", "a string")?;
    // The trigger sends the row's name, which may be null.
    let name = match f.patch::<String>("name", "a string or null")? {
        Patch::Set(n) => Some(n),
        Patch::Absent | Patch::Null => None,
    };
    let unlimited: bool = f.opt("unlimited_quota", "true or false")?.unwrap_or(false);
    // What the client presents (and the gateway hashes) is the prefix and
    // the 48: new-api strips `sk-` before its lookup, Tollgate hashes the
    // whole key, and both find this one.
    let presented = format!("{}{key}", ctx.config.keys.import_prefix);
    let (rec, _, created) = keys::import_key(ctx, &presented, owner, name, None, unlimited).await?;
    let token_id = ctx.store.key_id(&rec.hash).map_err(store_error)?;
    #[derive(Serialize)]
    struct Imported<'a> {
        token_id: u64,
        key_hash: String,
        name: &'a str,
        external_user_id: Option<&'a str>,
        unlimited_quota: bool,
        /// False when this key was imported for this user before.
        created: bool,
    }
    #[derive(Serialize)]
    struct Answer<'a> {
        success: bool,
        message: &'static str,
        data: Imported<'a>,
    }
    json(
        StatusCode::OK,
        &Answer {
            success: true,
            message: if created {
                "imported"
            } else {
                "already imported"
            },
            data: Imported {
                token_id,
                key_hash: hex::encode(rec.hash),
                name: &rec.name,
                external_user_id: rec.owner.as_deref(),
                unlimited_quota: unlimited_of(ctx, &rec.hash)?,
                created,
            },
        },
    )
}

/// Whether the key has no limit of its own.
fn unlimited_of(ctx: &Ctx<'_>, hash: &crate::store::KeyHash) -> Result<bool, ApiError> {
    let now = ctx.clock.now_ms();
    Ok(ctx
        .gate
        .lookup(hash, now)?
        .is_some_and(|k| k.numbers().limit.is_none()))
}

// ---- the consumption API's quota fields ----

#[derive(Serialize)]
struct QSummary<'a> {
    #[serde(flatten)]
    s: &'a Summary,
    total_quota: i64,
}

#[derive(Serialize)]
struct QModel<'a> {
    #[serde(flatten)]
    m: &'a ModelRow,
    model_name: &'a str,
    quota: i64,
}

#[derive(Serialize)]
struct QDay<'a> {
    #[serde(flatten)]
    d: &'a DayRow,
    quota: i64,
}

#[derive(Serialize)]
struct QLog<'a> {
    #[serde(flatten)]
    l: &'a LogItem,
    model_name: &'a str,
    quota: i64,
}

#[derive(Serialize)]
struct QPoint<'a> {
    #[serde(flatten)]
    p: &'a Point,
    quota: i64,
    /// `2026-11-23 13:00` on an hourly chart (new-api's `hour`).
    #[serde(skip_serializing_if = "Option::is_none")]
    hour: Option<String>,
}

#[derive(Serialize)]
pub(in crate::api) struct QDetail<'a> {
    object: &'static str,
    start: i64,
    end: i64,
    token_id: u64,
    quota_per_usd: u64,
    summary: QSummary<'a>,
    by_model: Vec<QModel<'a>>,
    by_day: Vec<QDay<'a>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    recent_logs: Option<Vec<QLog<'a>>>,
}

#[derive(Serialize)]
pub(in crate::api) struct QChart<'a> {
    object: &'static str,
    start: i64,
    end: i64,
    token_id: u64,
    quota_per_usd: u64,
    granularity: &'static str,
    data: Vec<QPoint<'a>>,
}

#[derive(Serialize)]
pub(in crate::api) struct QLogs<'a> {
    token_id: u64,
    quota_per_usd: u64,
    items: Vec<QLog<'a>>,
    page: usize,
    page_size: usize,
    total: u64,
}

/// A consumption report with new-api's names and quota added.
#[derive(Serialize)]
#[serde(untagged)]
pub(in crate::api) enum QuotaReport<'a> {
    Detail(QDetail<'a>),
    Chart(QChart<'a>),
    Logs(QLogs<'a>),
}

/// The quota view of one key's report.
pub(in crate::api) fn quota_report<'a>(
    ctx: &Ctx<'_>,
    report: &'a Report,
    token_id: u64,
) -> QuotaReport<'a> {
    let per = ctx.config.compat.newapi.quota_per_usd;
    let q = |c: Pico| units_of(c, per);
    let log = |l: &'a LogItem| QLog {
        l,
        model_name: &l.model,
        quota: q(l.cost),
    };
    match report {
        Report::Detail(d) => QuotaReport::Detail(detail(d, token_id, per, &q, &log)),
        Report::Chart(c) => QuotaReport::Chart(chart(c, token_id, per, &q)),
        Report::Logs(p) => QuotaReport::Logs(logs(p, token_id, per, &log)),
    }
}

fn detail<'a>(
    d: &'a Detail,
    token_id: u64,
    per: u64,
    q: &dyn Fn(Pico) -> i64,
    log: &dyn Fn(&'a LogItem) -> QLog<'a>,
) -> QDetail<'a> {
    QDetail {
        object: d.object,
        start: d.start,
        end: d.end,
        token_id,
        quota_per_usd: per,
        summary: QSummary {
            s: &d.summary,
            total_quota: q(d.summary.total_cost),
        },
        by_model: d
            .by_model
            .iter()
            .map(|m| QModel {
                m,
                model_name: &m.model,
                quota: q(m.cost),
            })
            .collect(),
        by_day: d
            .by_day
            .iter()
            .map(|x| QDay {
                d: x,
                quota: q(x.cost),
            })
            .collect(),
        recent_logs: d.recent_logs.as_ref().map(|l| l.iter().map(log).collect()),
    }
}

fn chart<'a>(c: &'a Chart, token_id: u64, per: u64, q: &dyn Fn(Pico) -> i64) -> QChart<'a> {
    let hourly = c.granularity == "hour";
    QChart {
        object: c.object,
        start: c.start,
        end: c.end,
        token_id,
        quota_per_usd: per,
        granularity: c.granularity,
        data: c
            .data
            .iter()
            .map(|p| QPoint {
                p,
                quota: q(p.cost),
                hour: hourly.then(|| {
                    let t = crate::clock::rfc3339(p.time * 1000);
                    let part = |r: std::ops::Range<usize>| t.get(r).unwrap_or("");
                    format!("{} {}", part(0..10), part(11..16))
                }),
            })
            .collect(),
    }
}

fn logs<'a>(
    p: &'a LogsPage,
    token_id: u64,
    per: u64,
    log: &dyn Fn(&'a LogItem) -> QLog<'a>,
) -> QLogs<'a> {
    QLogs {
        token_id,
        quota_per_usd: per,
        items: p.items.iter().map(log).collect(),
        page: p.page,
        page_size: p.page_size,
        total: p.total,
    }
}
