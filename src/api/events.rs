//! The outbox, webhook deliveries and the audit log over the admin API:
//! `GET /api/v1/events?after&type&limit` (an app may poll instead of
//! taking webhooks), `GET /api/v1/webhooks/deliveries?status&limit`,
//! `POST /api/v1/events/{id}/redeliver`, `GET /api/v1/audit?after&actor&target&limit`.

use http::StatusCode;
use serde::Serialize;

use super::{Ctx, Data, json, offset_limit, query_pairs, store_error};
use crate::config::Pattern;
use crate::error::ApiError;
use crate::events::deliver::{DeliveryState, DeliveryStatus, targets_for};
use crate::events::{Event, event_id, event_seq};
use crate::store::{AuditQuery, DeliveryWrite, EventQuery};

fn bad(param: &'static str, message: &'static str) -> ApiError {
    ApiError::bad_request("invalid_query", message).with_param(param)
}

/// `after`: an event id (`evt_12`) or its sequence number.
fn after_of(v: &str) -> Result<u64, ApiError> {
    event_seq(v).ok_or_else(|| bad("after", "`after` must be an event id or a sequence number."))
}

/// `GET /api/v1/events` (in cluster mode every node's, from the database,
/// where `after` is an event id or the database's seq).
pub(super) async fn list(
    ctx: &Ctx<'_>,
    query: Option<&str>,
) -> Result<http::Response<crate::Body>, ApiError> {
    let pairs = query_pairs(query)?;
    let (_, limit) = offset_limit(&pairs)?;
    let mut q = EventQuery {
        limit,
        ..EventQuery::default()
    };
    let mut after = None;
    for (k, v) in &pairs {
        match k.as_str() {
            "after" => after = Some(v.as_str()),
            "type" => {
                q.kind = Some(Pattern::parse(v).map_err(|_| {
                    bad(
                        "type",
                        "`type` must be an event type or a glob such as `key.*`.",
                    )
                })?)
            }
            _ => {}
        }
    }
    if let Some(c) = super::cluster::of(ctx) {
        let events = c
            .events_list(after, q.kind, q.limit)
            .await?
            .ok_or_else(|| bad("after", "`after` must be an event id or a sequence number."))?;
        return json(StatusCode::OK, &Data { data: events });
    }
    if let Some(a) = after {
        q.after = after_of(a)?;
    }
    let rows = ctx.store.events(&q).map_err(store_error)?;
    let events: Vec<Event> = rows.into_iter().map(|(_, e)| e).collect();
    json(StatusCode::OK, &Data { data: events })
}

#[derive(Serialize)]
struct DeliveryView {
    event_id: String,
    target: String,
    status: DeliveryStatus,
    attempts: u32,
    next_attempt_at: Option<String>,
    last_status: Option<u16>,
    last_error: Option<String>,
    updated_at: String,
}

impl DeliveryView {
    fn of(event_id: String, target: String, s: DeliveryState) -> DeliveryView {
        DeliveryView {
            event_id,
            target,
            status: s.status,
            attempts: s.attempts,
            next_attempt_at: (s.status == DeliveryStatus::Pending)
                .then(|| crate::clock::rfc3339(s.next_at_ms)),
            last_status: s.last_status,
            last_error: s.last_error,
            updated_at: crate::clock::rfc3339(s.updated_at_ms),
        }
    }
}

/// `GET /api/v1/webhooks/deliveries` (in cluster mode every node's, from
/// the database).
pub(super) async fn deliveries(
    ctx: &Ctx<'_>,
    query: Option<&str>,
) -> Result<http::Response<crate::Body>, ApiError> {
    let pairs = query_pairs(query)?;
    let (offset, limit) = offset_limit(&pairs)?;
    let mut status = None;
    for (k, v) in &pairs {
        if k == "status" {
            status = Some(DeliveryStatus::parse(v).ok_or_else(|| {
                bad(
                    "status",
                    "`status` must be pending, delivered, failed or skipped.",
                )
            })?);
        }
    }
    if let Some(c) = super::cluster::of(ctx) {
        let rows = c.deliveries_list(status, offset, limit).await?;
        let views: Vec<DeliveryView> = rows
            .into_iter()
            .map(|(id, target, s)| DeliveryView::of(id, target, s))
            .collect();
        return json(StatusCode::OK, &Data { data: views });
    }
    let rows = ctx.store.deliveries().map_err(store_error)?;
    let views: Vec<DeliveryView> = rows
        .into_iter()
        .filter(|(_, _, s)| status.is_none_or(|want| s.status == want))
        .skip(offset)
        .take(limit)
        .map(|(seq, target, s)| DeliveryView::of(event_id(seq), target, s))
        .collect();
    json(StatusCode::OK, &Data { data: views })
}

/// `POST /api/v1/events/{id}/redeliver`: every endpoint the event goes to
/// gets it again, from the first try of its schedule.
pub(super) async fn redeliver(
    ctx: &Ctx<'_>,
    id: &str,
) -> Result<http::Response<crate::Body>, ApiError> {
    #[derive(Serialize)]
    struct Redelivered {
        id: String,
        targets: Vec<String>,
    }
    if let Some(c) = super::cluster::of(ctx) {
        let now = ctx.clock.now_ms();
        let (ev, targets) = c
            .redeliver(id, |kind| targets_for(ctx.config, kind), now)
            .await?
            .ok_or_else(|| ApiError::not_found("No such event."))?;
        let note = serde_json::json!({ "targets": targets });
        ctx.store
            .record_audit("event.redeliver", &ev.id, None, Some(note))
            .await
            .map_err(store_error)?;
        return json(StatusCode::ACCEPTED, &Redelivered { id: ev.id, targets });
    }
    let seq = event_seq(id).ok_or_else(|| ApiError::not_found("No such event."))?;
    let (ev, _) = ctx
        .store
        .event(seq)
        .map_err(store_error)?
        .ok_or_else(|| ApiError::not_found("No such event."))?;
    let now = ctx.clock.now_ms();
    let targets = targets_for(ctx.config, &ev.kind);
    let write = DeliveryWrite {
        cursor: None,
        deliveries: targets
            .iter()
            .map(|t| (seq, t.clone(), DeliveryState::pending(now)))
            .collect(),
        endpoints: Vec::new(),
    };
    // Audited with the write (an admin's delivery write is a redelivery).
    ctx.store
        .save_deliveries(write)
        .await
        .map_err(store_error)?;
    if let Some(events) = ctx.events {
        events.redeliver(seq);
    }
    json(StatusCode::ACCEPTED, &Redelivered { id: ev.id, targets })
}

/// `GET /api/v1/audit`
pub(super) async fn audit(
    ctx: &Ctx<'_>,
    query: Option<&str>,
) -> Result<http::Response<crate::Body>, ApiError> {
    let pairs = query_pairs(query)?;
    let (_, limit) = offset_limit(&pairs)?;
    let mut q = AuditQuery {
        limit,
        ..AuditQuery::default()
    };
    for (k, v) in &pairs {
        match k.as_str() {
            "after" => {
                q.after = v
                    .parse()
                    .map_err(|_| bad("after", "`after` must be an audit entry's seq."))?
            }
            "actor" => q.actor = Some(v.clone()),
            "target" => q.target = Some(v.clone()),
            _ => {}
        }
    }
    let rows = match super::cluster::of(ctx) {
        Some(c) => c.audit_log(&q).await?,
        None => ctx.store.audit_log(&q).map_err(store_error)?,
    };
    json(StatusCode::OK, &Data { data: rows })
}
