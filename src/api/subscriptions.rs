//! Subscriptions: `POST|GET /api/v1/accounts/{id}/subscriptions`,
//! `GET|PATCH /api/v1/subscriptions/{sid}`,
//! `POST /api/v1/subscriptions/{sid}/renew`, `POST /api/v1/subscriptions/{sid}/cancel`.
//!
//! The handlers parse and answer; every rule lives in
//! [`crate::billing::subscriptions::Billing`], which payments call too.

use http::StatusCode;
use serde::Serialize;

use super::accounts::valid_id;
use super::{Ctx, Data, Fields, invalid, json};
use crate::billing::subscriptions::Billing;
use crate::clock::rfc3339;
use crate::error::ApiError;
use crate::money::Pico;
use crate::store::{SubscriptionRecord, SubscriptionStatus};

type Answer = Result<http::Response<crate::Body>, ApiError>;

/// The billing rules over the handler's context.
pub(super) fn billing<'a>(ctx: &'a Ctx<'_>) -> Billing<'a> {
    Billing {
        config: ctx.config,
        gate: ctx.gate,
        store: ctx.store,
        clock: ctx.clock,
        cluster: super::cluster::of(ctx),
    }
}

/// A subscription as answered.
#[derive(Serialize)]
pub(super) struct SubscriptionView<'a> {
    id: &'a str,
    account: &'a str,
    plan: &'a str,
    /// A downgrade waiting for the next period.
    next_plan: Option<&'a str>,
    status: SubscriptionStatus,
    current_period_start: String,
    current_period_end: String,
    cancel_at_period_end: bool,
    trial_end: Option<String>,
    past_due_since: Option<String>,
    ended_at: Option<String>,
    external_id: Option<&'a str>,
    /// Number of the current period (0 first).
    period: u64,
    /// Periods up to this one are paid for.
    paid_through: u64,
    price: Option<Pico>,
    interval: Option<&'static str>,
    grant: Option<Pico>,
    created_at: String,
    updated_at: String,
}

pub(super) fn view<'a>(ctx: &Ctx<'_>, s: &'a SubscriptionRecord) -> SubscriptionView<'a> {
    let plan = ctx.config.plans.get(&s.plan);
    SubscriptionView {
        id: &s.id,
        account: &s.account,
        plan: &s.plan,
        next_plan: s.next_plan.as_deref(),
        status: s.status,
        current_period_start: rfc3339(s.current_period_start),
        current_period_end: rfc3339(s.current_period_end),
        cancel_at_period_end: s.cancel_at_period_end,
        trial_end: s.trial_end.map(rfc3339),
        past_due_since: s.past_due_since.map(rfc3339),
        ended_at: s.ended_at.map(rfc3339),
        external_id: s.external_id.as_deref(),
        period: s.period,
        paid_through: s.paid_through,
        price: plan.and_then(|p| p.price),
        interval: plan.and_then(|p| p.interval).map(|i| i.as_str()),
        grant: plan.and_then(|p| p.grant),
        created_at: rfc3339(s.created_at),
        updated_at: rfc3339(s.updated_at),
    }
}

fn answer(ctx: &Ctx<'_>, status: StatusCode, s: &SubscriptionRecord) -> Answer {
    json(status, &Data { data: view(ctx, s) })
}

/// `POST /api/v1/accounts/{id}/subscriptions` `{plan, trial_days?, external_id?}` → 201.
pub(super) async fn create(ctx: &Ctx<'_>, account: &str, f: &Fields) -> Answer {
    valid_id(account)?;
    f.only(&["plan", "trial_days", "external_id"])?;
    let plan: String = f.required("plan", "a string")?;
    let trial_days: Option<u32> = f.opt("trial_days", "an integer from 0 to 366")?;
    let external_id: Option<String> = f.opt("external_id", "a string")?;
    let s = billing(ctx)
        .subscribe(account, &plan, trial_days, external_id)
        .await?;
    answer(ctx, StatusCode::CREATED, &s)
}

/// `GET /api/v1/accounts/{id}/subscriptions`, newest first.
pub(super) fn list(ctx: &Ctx<'_>, account: &str) -> Answer {
    valid_id(account)?;
    let all = billing(ctx).of_account(account)?;
    let views: Vec<SubscriptionView<'_>> = all.iter().map(|s| view(ctx, s)).collect();
    json(StatusCode::OK, &Data { data: views })
}

/// `GET /api/v1/subscriptions/{sid}`.
pub(super) fn get(ctx: &Ctx<'_>, sid: &str) -> Answer {
    valid_id(sid)?;
    let s = billing(ctx).get(sid)?;
    answer(ctx, StatusCode::OK, &s)
}

/// `PATCH /api/v1/subscriptions/{sid}` `{plan?, cancel_at_period_end?}`:
/// the plan first (upgrade now, downgrade at the next period), then the flag.
pub(super) async fn patch(ctx: &Ctx<'_>, sid: &str, f: &Fields) -> Answer {
    valid_id(sid)?;
    f.only(&["plan", "cancel_at_period_end"])?;
    let plan: Option<String> = f.opt("plan", "a string")?;
    let cancel: Option<bool> = f.opt("cancel_at_period_end", "a boolean")?;
    if plan.is_none() && cancel.is_none() {
        return Err(invalid(
            "plan",
            "missing_field",
            "Give `plan`, `cancel_at_period_end` or both.",
        ));
    }
    let b = billing(ctx);
    let mut s = b.get(sid)?;
    if let Some(p) = &plan {
        s = b.change_plan(sid, p).await?;
    }
    if let Some(on) = cancel {
        s = b.set_cancel_at_period_end(sid, on).await?;
    }
    answer(ctx, StatusCode::OK, &s)
}

#[derive(Serialize)]
struct RenewAnswer<'a> {
    data: SubscriptionView<'a>,
    /// The idempotency key had been used: nothing changed.
    replayed: bool,
}

/// `POST /api/v1/subscriptions/{sid}/renew` `{idempotency_key}`.
pub(super) async fn renew(ctx: &Ctx<'_>, sid: &str, f: &Fields) -> Answer {
    valid_id(sid)?;
    f.only(&["idempotency_key"])?;
    let idem: String = f.required("idempotency_key", "a string")?;
    let (s, replayed) = billing(ctx).renew(sid, &idem).await?;
    json(
        StatusCode::OK,
        &RenewAnswer {
            data: view(ctx, &s),
            replayed,
        },
    )
}

/// `POST /api/v1/subscriptions/{sid}/cancel` `{at_period_end}` (default false: now).
pub(super) async fn cancel(ctx: &Ctx<'_>, sid: &str, f: &Fields) -> Answer {
    valid_id(sid)?;
    f.only(&["at_period_end"])?;
    let at_end: bool = f.opt("at_period_end", "a boolean")?.unwrap_or(false);
    let s = billing(ctx).cancel(sid, at_end).await?;
    answer(ctx, StatusCode::OK, &s)
}

/// The `subscription` of an account's answer: its latest one, or `None`.
#[derive(Serialize)]
pub(super) struct SubscriptionSummary {
    id: String,
    plan: String,
    status: SubscriptionStatus,
    current_period_end: String,
    cancel_at_period_end: bool,
}

pub(super) fn summary(ctx: &Ctx<'_>, sid: &str) -> Result<Option<SubscriptionSummary>, ApiError> {
    let s = ctx.store.subscription(sid).map_err(super::store_error)?;
    Ok(s.map(|s| SubscriptionSummary {
        current_period_end: rfc3339(s.current_period_end),
        cancel_at_period_end: s.cancel_at_period_end,
        status: s.status,
        plan: s.plan,
        id: s.id,
    }))
}
