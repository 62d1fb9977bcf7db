//! The APIs of the systems Tollgate's users ran before (the seed
//! documents), served over the same keys, accounts and money, so that
//! their clients work with only the base URL changed. Each module is a
//! thin translation: no rule lives here that also lives elsewhere.
//!
//! - [`openrouter`]: OpenRouter's provisioning fields and key status (the
//!   routes themselves are `keys` and `status`);
//! - [`newapi`]: new-api's `POST /api/token/import` and the quota fields
//!   of the consumption API under `/api/usage/`;
//! - [`license`]: the licence / credit server under `/api/v1/license/`
//!   and `/api/v1/health`, over accounts (email) and keys (licence key);
//! - [`billing_admin`]: the admin's health, billing status and stats, and
//!   the resolved config (`/api/v1/admin/…`).

pub(super) mod billing_admin;
pub(super) mod license;
pub(super) mod newapi;
pub(super) mod openrouter;

use std::net::IpAddr;

use bytes::Bytes;
use http::{HeaderMap, Method, Response};

use super::{Ctx, read_fields, token_matches};
use crate::error::ApiError;
use crate::{Body, BoxError};

/// The compatible calls, by path.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum CompatCall<'a> {
    /// `POST /api/token/import` (new-api)
    TokenImport,
    /// `GET /api/v1/health`
    Health,
    /// `/api/v1/license/{verify,generate,recharge,deduct}`
    License(license::Call<'a>),
    /// `GET /api/v1/admin/health`
    AdminHealth,
    /// `GET /api/v1/admin/billing/status`
    BillingStatus,
    /// `GET /api/v1/admin/billing/stats`
    BillingStats,
    /// `GET /api/v1/admin/config`
    Config,
}

/// The compatible call of a raw path, if it is one.
pub(super) fn call_of(path: &str) -> Option<CompatCall<'_>> {
    match path {
        "/api/token/import" => return Some(CompatCall::TokenImport),
        "/api/v1/health" => return Some(CompatCall::Health),
        "/api/v1/admin/health" => return Some(CompatCall::AdminHealth),
        "/api/v1/admin/billing/status" => return Some(CompatCall::BillingStatus),
        "/api/v1/admin/billing/stats" => return Some(CompatCall::BillingStats),
        "/api/v1/admin/config" => return Some(CompatCall::Config),
        _ => {}
    }
    let rest = path.strip_prefix("/api/v1/license/")?;
    license::call_of(rest).map(CompatCall::License)
}

/// Answers a compatible call.
pub(super) async fn handle<B>(
    ctx: &Ctx<'_>,
    call: CompatCall<'_>,
    parts: &http::request::Parts,
    body: B,
    client_ip: IpAddr,
) -> Result<Response<Body>, ApiError>
where
    B: http_body::Body<Data = Bytes>,
    B::Error: Into<BoxError>,
{
    let m = &parts.method;
    let h = &parts.headers;
    match call {
        CompatCall::TokenImport => {
            super::admin_auth(ctx, h, client_ip)?;
            if m != Method::POST {
                return Err(ApiError::method_not_allowed());
            }
            newapi::import(ctx, &read_fields(h, body).await?).await
        }
        CompatCall::Health if m == Method::GET => license::health(ctx),
        CompatCall::Health => Err(ApiError::method_not_allowed()),
        CompatCall::License(c) => Ok(license::handle(ctx, c, parts, body, client_ip).await),
        CompatCall::AdminHealth
        | CompatCall::BillingStatus
        | CompatCall::BillingStats
        | CompatCall::Config => {
            admin_any(ctx, h, client_ip)?;
            if m != Method::GET {
                return Err(ApiError::method_not_allowed());
            }
            match call {
                CompatCall::BillingStatus => billing_admin::status(ctx).await,
                CompatCall::BillingStats => billing_admin::stats(ctx, parts.uri.query()).await,
                CompatCall::AdminHealth => billing_admin::health(ctx),
                _ => billing_admin::config(ctx),
            }
        }
    }
}

/// The admin token as `X-Admin-Token` (the licence server's header) or as
/// `Authorization: Bearer`. The admin guard sees both: a network that
/// guesses too often is refused before comparing, and every failure counts.
pub(super) fn admin_any(ctx: &Ctx<'_>, headers: &HeaderMap, ip: IpAddr) -> Result<(), ApiError> {
    // The compatible admin surfaces move money and keys outside the scope
    // table's paths: they take a token with the `admin` scope.
    super::admin_auth(ctx, headers, ip)?.require(super::scopes::Scope::Admin)
}

/// Whether the request carries a correct admin token (either header),
/// without refusing: a failed token still counts against the network.
pub(super) fn is_admin(ctx: &Ctx<'_>, headers: &HeaderMap, ip: IpAddr) -> Result<bool, ApiError> {
    if headers.get("x-admin-token").is_none() && !bearer_is_admin(ctx, headers) {
        return Ok(false);
    }
    admin_any(ctx, headers, ip).map(|()| true)
}

/// An `Authorization: Bearer` that is the admin token (compared in
/// constant time); a key there is not.
fn bearer_is_admin(ctx: &Ctx<'_>, headers: &HeaderMap) -> bool {
    headers
        .get(http::header::AUTHORIZATION)
        .map(|v| v.as_bytes())
        .and_then(|v| {
            v.strip_prefix(b"Bearer ")
                .or_else(|| v.strip_prefix(b"bearer "))
        })
        .is_some_and(|t| token_matches(ctx.admin_token.as_bytes(), t.trim_ascii()))
}

/// Integer units of `per_usd` per USD of `amount`, rounded half away from
/// zero, from integers only (new-api's quota, the licence's credits ×1).
pub(super) fn units_of(amount: crate::money::Pico, per_usd: u64) -> i64 {
    let num = i128::from(amount.0) * i128::from(per_usd);
    let den = i128::from(crate::money::Pico::usd(1).0);
    let q = (num.abs() + den / 2) / den;
    let q = if num < 0 { -q } else { q };
    i64::try_from(q).unwrap_or(if num < 0 { i64::MIN } else { i64::MAX })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::money::Pico;

    #[test]
    fn routes() {
        assert_eq!(call_of("/api/token/import"), Some(CompatCall::TokenImport));
        assert_eq!(call_of("/api/v1/health"), Some(CompatCall::Health));
        assert_eq!(call_of("/api/v1/keys"), None);
        assert_eq!(
            call_of("/api/v1/admin/billing/stats"),
            Some(CompatCall::BillingStats)
        );
        assert!(call_of("/api/v1/license/verify").is_some());
        assert!(call_of("/api/v1/license/nope").is_none());
    }

    #[test]
    fn quota_units() {
        // new-api: 500,000 quota per USD.
        assert_eq!(units_of(Pico::usd(1), 500_000), 500_000);
        assert_eq!(units_of(Pico(2_000_000), 500_000), 1); // 2 µUSD = 1 quota
        assert_eq!(units_of(Pico(999_999), 500_000), 0);
        assert_eq!(units_of(Pico(1_000_000), 500_000), 1); // half rounds up
        assert_eq!(units_of(Pico(-2_000_000), 500_000), -1);
    }
}
