//! The consumption API under `/api/usage/`, authenticated by the key
//! itself (new-api's shape: `{"code": true, "message": "ok", "data": …}`):
//!
//! - `GET /api/usage/token/` (also without the `/`): balance and policy;
//! - `GET /api/usage/token/detail?start&end`: summary, by model, by day,
//!   the 20 newest records;
//! - `GET /api/usage/token/chart?start&end&granularity=hour|day`;
//! - `GET /api/usage/token/logs?page&page_size`.
//!
//! No route takes a key or a hash: what a key can read is its own usage,
//! and nothing else is addressable. Browsers of the origins in
//! `[cors] allowed_origins` may call every route here (with preflight).

use std::collections::BTreeMap;
use std::net::IpAddr;

use http::{HeaderMap, Method, Response, StatusCode};
use serde::Serialize;

use super::cors::Cors;
use super::reports::{self, View, Viewer};
use super::{Ctx, json};
use crate::error::ApiError;
use crate::money::Pico;

/// new-api's envelope.
#[derive(Serialize)]
struct Envelope<T> {
    /// new-api's success flag (its portal reads `success`).
    success: bool,
    code: bool,
    message: &'static str,
    data: T,
}

/// `data` of `GET /api/usage/token/`.
#[derive(Serialize)]
struct TokenUsage<'a> {
    object: &'static str,
    /// The key's stable integer id (new-api's token id).
    token_id: u64,
    name: &'a str,
    /// The limit (0 when unlimited).
    total_granted: Pico,
    /// What counts against the limit in the current period (lifetime spend
    /// when unlimited).
    total_used: Pico,
    /// What can still be spent (limit − used − reserved; 0 when unlimited).
    total_available: Pico,
    unlimited_quota: bool,
    /// The key's model allowlist (globs) as new-api's `{model: true}`.
    model_limits: BTreeMap<&'a str, bool>,
    model_limits_enabled: bool,
    /// Unix seconds; 0 = never.
    expires_at: i64,
}

/// The calls under `/api/usage/`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum UsageCall {
    Token,
    Report(View),
}

fn call_of(path: &str) -> Option<UsageCall> {
    let rest = path.strip_prefix("/api/usage/token")?;
    let rest = rest.strip_suffix('/').unwrap_or(rest);
    match rest {
        "" => Some(UsageCall::Token),
        "/detail" => Some(UsageCall::Report(View::Detail)),
        "/chart" => Some(UsageCall::Report(View::Chart)),
        "/logs" => Some(UsageCall::Report(View::Logs)),
        _ => None,
    }
}

/// Answers a request under `/api/usage/`, CORS included (on errors too, so
/// that a portal can read them).
pub(super) async fn handle(
    ctx: &Ctx<'_>,
    method: &Method,
    path: &str,
    query: Option<&str>,
    headers: &HeaderMap,
    client_ip: IpAddr,
) -> Response<crate::Body> {
    let cors = Cors::of(ctx, headers);
    if method == Method::OPTIONS {
        return cors.preflight();
    }
    cors.apply(
        answer(ctx, method, path, query, headers, client_ip)
            .await
            .unwrap_or_else(ApiError::into_response),
    )
}

async fn answer(
    ctx: &Ctx<'_>,
    method: &Method,
    path: &str,
    query: Option<&str>,
    headers: &HeaderMap,
    client_ip: IpAddr,
) -> Result<Response<crate::Body>, ApiError> {
    let Some(call) = call_of(path) else {
        return Err(ApiError::not_found(format!(
            "Unknown API path `{}`.",
            crate::error::truncate(path, 128)
        )));
    };
    // Authenticate before looking at anything else the request says.
    let live = ctx.gate.authenticate(headers, client_ip)?;
    if method != Method::GET {
        return Err(ApiError::method_not_allowed());
    }
    let now = ctx.clock.now_ms();
    match call {
        UsageCall::Token => {
            reports::params(query, &[])?;
            let policy = live.policy();
            let rec = &policy.record;
            let mut n = live.numbers();
            // Cluster mode: the limit and what counts against it (lifetime,
            // or in the period) are the database's (here the live limit
            // may count a lease).
            if let Some(s) = super::cluster::key_usage(ctx, &live.hash).await? {
                let counted = s.counted(rec.limit_reset, now);
                n.spent = s.usage;
                n.limit = s.limit;
                n.period_spent = counted;
                n.remaining = s.limit.map(|l| Pico(l.0.saturating_sub(counted.0).max(0)));
            }
            let data = TokenUsage {
                object: "token_usage",
                token_id: ctx.store.key_id(&live.hash).map_err(super::store_error)?,
                name: &rec.name,
                total_granted: n.limit.unwrap_or(Pico::ZERO),
                total_used: if n.limit.is_some() {
                    n.period_spent
                } else {
                    n.spent
                },
                total_available: n.remaining.unwrap_or(Pico::ZERO),
                unlimited_quota: n.limit.is_none(),
                model_limits: rec.models.iter().map(|m| (m.as_str(), true)).collect(),
                model_limits_enabled: !rec.models.is_empty(),
                expires_at: rec.expires_at.map_or(0, |ms| ms.div_euclid(1000)),
            };
            ok(&data)
        }
        UsageCall::Report(view) => {
            let report =
                reports::key_report(ctx, &live.hash, view, query, now, Viewer::Key).await?;
            let token_id = ctx.store.key_id(&live.hash).map_err(super::store_error)?;
            ok(&super::compat::newapi::quota_report(ctx, &report, token_id))
        }
    }
}

fn ok<T: Serialize>(data: &T) -> Result<Response<crate::Body>, ApiError> {
    json(
        StatusCode::OK,
        &Envelope {
            success: true,
            code: true,
            message: "ok",
            data,
        },
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn routes() {
        assert_eq!(call_of("/api/usage/token"), Some(UsageCall::Token));
        assert_eq!(call_of("/api/usage/token/"), Some(UsageCall::Token));
        assert_eq!(
            call_of("/api/usage/token/detail"),
            Some(UsageCall::Report(View::Detail))
        );
        assert_eq!(
            call_of("/api/usage/token/logs/"),
            Some(UsageCall::Report(View::Logs))
        );
        assert_eq!(call_of("/api/usage/token/abc"), None);
        assert_eq!(call_of("/api/usage/tokens"), None);
        assert_eq!(call_of("/api/usage/token/detail/x"), None);
    }
}
