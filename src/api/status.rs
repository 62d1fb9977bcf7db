//! `GET /api/v1/key` (alias `/api/v1/auth/key`): the calling key's own
//! status, authenticated by the key itself (OpenRouter's shape, plus
//! Tollgate's counters). Browsers of the origins in `[cors]` may call it.

use std::net::IpAddr;

use http::{HeaderMap, Method, Response, StatusCode};
use serde::Serialize;

use super::cors::Cors;
use super::keys::{Numbers, windows_of};
use super::{Ctx, Data, json};
use crate::clock::{Period, rfc3339};
use crate::error::ApiError;
use crate::money::Pico;

#[derive(Serialize)]
struct RateLimit {
    requests: u32,
    interval: &'static str,
}

/// A subscription as its key holder sees it.
#[derive(Serialize)]
struct SubscriptionView {
    plan: String,
    status: crate::store::SubscriptionStatus,
}

#[derive(Serialize)]
struct KeyStatus<'a> {
    label: &'a str,
    /// `active`, `disabled`, `expired` or `exhausted`, computed now.
    status: &'static str,
    limit: Option<Pico>,
    limit_remaining: Option<Pico>,
    /// The account the key spends from, if its owner has one.
    account: Option<&'a str>,
    /// What that account has left (None: no account, or unlimited).
    account_remaining: Option<Pico>,
    /// The account's latest subscription (plan and status), for the
    /// portal; `None` without an account or a subscription.
    subscription: Option<SubscriptionView>,
    limit_reset: Option<&'static str>,
    usage: Pico,
    usage_daily: Pico,
    usage_weekly: Pico,
    usage_monthly: Pico,
    is_free_tier: bool,
    disabled: bool,
    expires_at: Option<String>,
    rate_limit: Option<RateLimit>,
    requests: u64,
    max_requests: Option<u64>,
    concurrency: Option<u32>,
    in_flight: u32,
    models: &'a [String],
}

/// The key status endpoint: `GET`, plus CORS preflight for allowed origins.
pub(super) fn own_key(
    ctx: &Ctx<'_>,
    method: &Method,
    headers: &HeaderMap,
    client_ip: IpAddr,
) -> Result<Response<crate::Body>, ApiError> {
    let cors = Cors::of(ctx, headers);
    if method == Method::OPTIONS {
        return Ok(cors.preflight());
    }
    let result = if method == Method::GET {
        status(ctx, headers, client_ip)
    } else {
        Err(ApiError::method_not_allowed())
    };
    Ok(cors.apply(result.unwrap_or_else(ApiError::into_response)))
}

fn status(
    ctx: &Ctx<'_>,
    headers: &HeaderMap,
    client_ip: IpAddr,
) -> Result<Response<crate::Body>, ApiError> {
    let live = ctx.gate.authenticate(headers, client_ip)?;
    let now = ctx.clock.now_ms();
    let policy = live.policy();
    let rec = &policy.record;
    let n = Numbers::live(&live);
    let w = windows_of(ctx, rec, &n, now)?;
    // A key of an account can spend no more than the account has left.
    let wallet = match rec.owner.as_deref() {
        Some(owner) => ctx.gate.wallets().of(owner, now)?.map(|a| a.numbers()),
        None => None,
    };
    let limit_remaining = match (n.remaining, wallet.and_then(|w| w.available)) {
        (Some(k), Some(a)) => Some(k.min(a)),
        (k, a) => k.or(a),
    };
    // Read once per status call (not the proxy path): the plan's name.
    let subscription = match (rec.owner.as_deref(), wallet) {
        (Some(owner), Some(_)) => ctx
            .store
            .user_account(owner)
            .ok()
            .flatten()
            .and_then(|a| a.subscription)
            .map(|l| SubscriptionView {
                plan: l.plan,
                status: l.status,
            }),
        _ => None,
    };
    let view = KeyStatus {
        label: &rec.label,
        status: super::compat::openrouter::key_status(rec, limit_remaining, n.requests, now),
        limit: n.limit,
        limit_remaining,
        account: rec.owner.as_deref().filter(|_| wallet.is_some()),
        account_remaining: wallet.and_then(|w| w.available),
        subscription,
        limit_reset: rec.limit_reset.map(Period::as_str),
        usage: n.spent,
        usage_daily: w.daily,
        usage_weekly: w.weekly,
        usage_monthly: w.monthly,
        is_free_tier: is_free_tier(ctx, rec.plan.as_deref()),
        disabled: rec.disabled,
        expires_at: rec.expires_at.map(rfc3339),
        rate_limit: rec.rpm.map(|requests| RateLimit {
            requests,
            interval: "1m",
        }),
        requests: n.requests,
        max_requests: rec.max_requests,
        concurrency: rec.concurrency,
        in_flight: n.in_flight,
        models: &rec.models,
    };
    json(StatusCode::OK, &Data { data: view })
}

/// A key is on the free tier when it was made from a `one_per_owner` plan
/// (the config's way of writing "a trial, one per person") or from a plan
/// named `trial` or `free`. Keys without a plan are paid keys.
fn is_free_tier(ctx: &Ctx<'_>, plan: Option<&str>) -> bool {
    let Some(name) = plan else { return false };
    name == "trial" || name == "free" || ctx.config.plans.get(name).is_some_and(|p| p.one_per_owner)
}
