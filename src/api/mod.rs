//! The gateway's own HTTP API, everything under `/api/`:
//!
//! - [`keys`]: provisioning (`/api/v1/keys…`, OpenRouter's names), behind
//!   the admin token;
//! - [`credits`]: top-ups, deducts, refunds and the ledger of a key, behind
//!   the admin token;
//! - [`status`]: `/api/v1/key` (alias `/api/v1/auth/key`), a key's own
//!   status, authenticated by the key itself;
//! - [`usage`]: the consumption API under `/api/usage/`, authenticated by
//!   the key itself, with CORS;
//! - [`reports`]: usage reports from the hourly rollups, for a key, an
//!   owner or the gateway (`/api/v1/keys/{hash}/usage…`,
//!   `/api/v1/owners/{owner}/usage…`, `/api/v1/usage`), behind the admin
//!   token;
//! - [`pages`]: the web portal (`/portal`) and admin console (`/admin`)
//!   served from the binary, built on the endpoints above.
//!
//! Every answer is JSON; every error is an [`ApiError`] in OpenAI's shape.
//! Request bodies are read with a hard cap and parsed field by field (see
//! [`Fields`]) so that a refusal names the field at fault (`param`) and
//! amounts are read exactly from their JSON text.

mod accounts;
mod admin_guard;
mod admin_tokens;
mod cluster;
mod compat;
mod cors;
mod credits;
mod events;
mod keys;
pub mod pages;
mod payments;
mod reports;
pub mod scopes;
mod status;
mod subscriptions;
mod usage;

use std::net::IpAddr;
use std::sync::{Arc, OnceLock};

use bytes::Bytes;
use http::header::{CONTENT_TYPE, HeaderValue};
use http::{Method, Request, Response, StatusCode};
use serde::de::{DeserializeOwned, MapAccess, Visitor};
use serde::{Deserialize, Deserializer, Serialize};
use serde_json::value::RawValue;
use subtle::ConstantTimeEq;

use crate::app::App;
use crate::clock::Clock;
use crate::config::Config;
use crate::error::ApiError;
use crate::gate::Gate;
use crate::store::{KeyHash, Store, StoreError};
use crate::{Body, BoxError};
use reports::{Subject, View};

pub use admin_guard::AdminGuard;
pub use scopes::{AdminCaller, AdminTokens, Scope, Scopes};

/// Largest admin request body: key specs and credits are small; anything
/// bigger is a mistake or an attack.
pub const ADMIN_BODY_MAX: usize = 64 * 1024;

/// Largest page of keys or ledger entries one request may ask for.
const PAGE_MAX: usize = 1000;
/// Page size when the request names none.
const PAGE_DEFAULT: usize = 100;

/// What the handlers use from [`App`], borrowed, so that tests can build it
/// from parts without the proxy's routing.
#[derive(Clone, Copy)]
pub(crate) struct Ctx<'a> {
    /// The reloadable configuration as of this request's start (a snapshot
    /// of [`App::live`]): plans, key import rules, CORS.
    pub config: &'a Config,
    pub gate: &'a Gate,
    pub store: &'a Store,
    pub clock: &'a Clock,
    pub admin_token: &'a str,
    pub admin_guard: &'a AdminGuard,
    /// The delivery task's handle, for redeliveries (`None` in unit tests
    /// that build a context without a running gateway).
    pub events: Option<&'a crate::events::Events>,
    /// The scoped admin tokens (in memory).
    pub admin_tokens: &'a AdminTokens,
    /// Who made this admin call, once authenticated: the scope check and
    /// the audit log's actor (`caller.actor`). `None` before, and on the
    /// calls a key makes about itself.
    pub caller: Option<&'a AdminCaller>,
    /// The whole gateway, for calls that act on it (reload); `None` when a
    /// test builds the context from parts.
    pub app: Option<&'a App>,
}

impl<'a> Ctx<'a> {
    /// The handlers' view of the running gateway, on the `live` snapshot.
    pub fn of(app: &'a App, live: &'a crate::reload::Live) -> Ctx<'a> {
        Ctx {
            config: &live.config,
            gate: &app.gate,
            store: &app.store,
            clock: &app.clock,
            admin_token: &app.admin_token,
            admin_guard: &app.admin_guard,
            events: Some(&app.events),
            admin_tokens: &app.admin_tokens,
            caller: None,
            app: Some(app),
        }
    }

    /// The authenticated admin caller (root when none was recorded, which
    /// only happens in tests that call handlers directly).
    pub fn actor(&self) -> &str {
        self.caller.map_or("root", |c| c.actor.as_str())
    }
}

/// Answers one request under `/api/`.
pub async fn handle(
    app: &Arc<App>,
    req: Request<hyper::body::Incoming>,
    client_ip: IpAddr,
) -> Response<Body> {
    let live = app.live();
    serve(&Ctx::of(app, &live), req, client_ip).await
}

/// [`handle`] over any body type (tests send `Full` bodies).
pub(crate) async fn serve<B>(ctx: &Ctx<'_>, req: Request<B>, client_ip: IpAddr) -> Response<Body>
where
    B: http_body::Body<Data = Bytes>,
    B::Error: Into<BoxError>,
{
    match dispatch(ctx, req, client_ip).await {
        Ok(res) => res,
        Err(e) => e.into_response(),
    }
}

/// The calls under `/api/v1/`, by path shape.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum AdminCall<'a> {
    /// `/api/v1/keys`
    Keys,
    /// `/api/v1/keys/import`
    Import,
    /// `/api/v1/keys/{hash}`
    Key(&'a str),
    /// `/api/v1/keys/{hash}/credits`
    Credits(&'a str),
    /// `/api/v1/keys/{hash}/ledger`
    Ledger(&'a str),
    /// `/api/v1/key`, `/api/v1/auth/key`
    OwnKey,
    /// `/api/v1/keys/{hash}/usage…`, `/api/v1/owners/{owner}/usage…`,
    /// `/api/v1/usage`
    Usage(reports::Subject<'a>, reports::View),
    /// `/api/v1/accounts`
    Accounts,
    /// `/api/v1/accounts/{id}`
    Account(&'a str),
    /// `/api/v1/accounts/{id}/credits`
    AccountCredits(&'a str),
    /// `/api/v1/accounts/{id}/ledger`
    AccountLedger(&'a str),
    /// `/api/v1/payments`
    Payments,
    /// `/api/v1/payments/reconcile`
    PaymentsReconcile,
    /// `/api/v1/payments/{id}`
    Payment(&'a str),
    /// `/api/v1/payments/stripe/webhook` (signed by Stripe, no admin token)
    StripeWebhook,
    /// `/api/v1/payments/epay/notify` (signed by the provider, no admin token)
    EpayNotify,
    /// `/api/v1/accounts/{id}/checkout`
    AccountCheckout(&'a str),
    /// `/api/v1/key/checkout` (authenticated by the key)
    KeyCheckout,
    /// `/api/v1/accounts/{id}/subscriptions`
    AccountSubscriptions(&'a str),
    /// `/api/v1/subscriptions/{sid}`
    Subscription(&'a str),
    /// `/api/v1/subscriptions/{sid}/renew`
    SubscriptionRenew(&'a str),
    /// `/api/v1/subscriptions/{sid}/cancel`
    SubscriptionCancel(&'a str),
    /// `/api/v1/events`
    Events,
    /// `/api/v1/events/{id}/redeliver`
    Redeliver(&'a str),
    /// `/api/v1/webhooks/deliveries`
    Deliveries,
    /// `/api/v1/audit`
    Audit,
    /// `/api/v1/admin/tokens`
    AdminTokens,
    /// `/api/v1/admin/tokens/{id}`
    AdminToken(&'a str),
    /// `/api/v1/admin/reload`
    Reload,
}

/// The call of a raw (still percent-encoded) path; `None` → 404. The hash
/// segment is returned as sent and validated by [`parse_hash`], so that
/// `..%2F`, wrong lengths and uppercase are a precise 400, not a 404.
fn call_of(path: &str) -> Option<AdminCall<'_>> {
    let rest = path.strip_prefix("/api/v1/")?;
    let segs: Vec<&str> = rest.split('/').collect();
    match segs.as_slice() {
        ["keys"] => Some(AdminCall::Keys),
        ["keys", "import"] => Some(AdminCall::Import),
        ["keys", h] => Some(AdminCall::Key(h)),
        ["keys", h, "credits"] => Some(AdminCall::Credits(h)),
        ["keys", h, "ledger"] => Some(AdminCall::Ledger(h)),
        ["key"] | ["auth", "key"] => Some(AdminCall::OwnKey),
        ["keys", h, "usage", rest @ ..] => {
            usage_view(rest).map(|v| AdminCall::Usage(Subject::Key(h), v))
        }
        // An owner's records are spread over their keys: no merged pages.
        ["owners", o, "usage", rest @ ..] => usage_view(rest)
            .filter(|v| *v != View::Logs)
            .map(|v| AdminCall::Usage(Subject::Owner(o), v)),
        ["usage"] => Some(AdminCall::Usage(Subject::Gateway, View::Detail)),
        ["accounts"] => Some(AdminCall::Accounts),
        ["accounts", id] => Some(AdminCall::Account(id)),
        ["accounts", id, "credits"] => Some(AdminCall::AccountCredits(id)),
        ["accounts", id, "ledger"] => Some(AdminCall::AccountLedger(id)),
        ["payments"] => Some(AdminCall::Payments),
        ["payments", "reconcile"] => Some(AdminCall::PaymentsReconcile),
        ["payments", "stripe", "webhook"] => Some(AdminCall::StripeWebhook),
        ["payments", "epay", "notify"] => Some(AdminCall::EpayNotify),
        ["payments", id] => Some(AdminCall::Payment(id)),
        ["accounts", id, "checkout"] => Some(AdminCall::AccountCheckout(id)),
        ["key", "checkout"] => Some(AdminCall::KeyCheckout),
        ["accounts", id, "subscriptions"] => Some(AdminCall::AccountSubscriptions(id)),
        ["subscriptions", sid] => Some(AdminCall::Subscription(sid)),
        ["subscriptions", sid, "renew"] => Some(AdminCall::SubscriptionRenew(sid)),
        ["subscriptions", sid, "cancel"] => Some(AdminCall::SubscriptionCancel(sid)),
        ["events"] => Some(AdminCall::Events),
        ["events", id, "redeliver"] => Some(AdminCall::Redeliver(id)),
        ["webhooks", "deliveries"] => Some(AdminCall::Deliveries),
        ["audit"] => Some(AdminCall::Audit),
        ["admin", "tokens"] => Some(AdminCall::AdminTokens),
        ["admin", "tokens", id] => Some(AdminCall::AdminToken(id)),
        ["admin", "reload"] => Some(AdminCall::Reload),
        _ => None,
    }
}

/// The report after `…/usage`: none (detail), `chart` or `logs`.
fn usage_view(rest: &[&str]) -> Option<View> {
    match rest {
        [] => Some(View::Detail),
        ["chart"] => Some(View::Chart),
        ["logs"] => Some(View::Logs),
        _ => None,
    }
}

async fn dispatch<B>(
    ctx: &Ctx<'_>,
    req: Request<B>,
    client_ip: IpAddr,
) -> Result<Response<Body>, ApiError>
where
    B: http_body::Body<Data = Bytes>,
    B::Error: Into<BoxError>,
{
    let (parts, body) = req.into_parts();
    if parts.uri.path().starts_with("/api/usage/") {
        return Ok(usage::handle(
            ctx,
            &parts.method,
            parts.uri.path(),
            parts.uri.query(),
            &parts.headers,
            client_ip,
        )
        .await);
    }
    if let Some(call) = compat::call_of(parts.uri.path()) {
        return compat::handle(ctx, call, &parts, body, client_ip).await;
    }
    let Some(call) = call_of(parts.uri.path()) else {
        return Err(ApiError::not_found(format!(
            "Unknown API path `{}`.",
            crate::error::truncate(parts.uri.path(), 128)
        )));
    };
    let query = parts.uri.query();
    if call == AdminCall::OwnKey {
        return status::own_key(ctx, &parts.method, &parts.headers, client_ip);
    }
    // Payment providers and keys authenticate themselves (a signature, the key).
    match call {
        AdminCall::StripeWebhook => {
            return payments::stripe_webhook(ctx, &parts.method, &parts.headers, body).await;
        }
        AdminCall::EpayNotify => {
            return payments::epay_notify(ctx, &parts.method, query, &parts.headers, body).await;
        }
        AdminCall::KeyCheckout => {
            return payments::key_checkout(ctx, &parts.method, &parts.headers, body, client_ip)
                .await;
        }
        _ => {}
    }
    // Everything else is the admin's: authenticate and check the scope
    // (scopes::TABLE) before looking at the hash or the body.
    let caller = admin_auth(ctx, &parts.headers, client_ip)?;
    caller.require(scopes::required(&parts.method, parts.uri.path()))?;
    // Every store write the handler makes is audited under this actor.
    let actor = crate::events::Actor {
        name: caller.actor.clone(),
        ip: Some(client_ip),
        at_ms: ctx.clock.now_ms(),
    };
    let ctx = &Ctx {
        caller: Some(&caller),
        ..*ctx
    };
    crate::events::acting_as(actor, admin_call(ctx, call, &parts, body, query)).await
}

/// One authenticated admin call.
async fn admin_call<B>(
    ctx: &Ctx<'_>,
    call: AdminCall<'_>,
    parts: &http::request::Parts,
    body: B,
    query: Option<&str>,
) -> Result<Response<Body>, ApiError>
where
    B: http_body::Body<Data = Bytes>,
    B::Error: Into<BoxError>,
{
    let m = &parts.method;
    match call {
        AdminCall::Keys if m == Method::GET => keys::list(ctx, query).await,
        AdminCall::Keys if m == Method::POST => {
            keys::create(ctx, &read_fields(&parts.headers, body).await?).await
        }
        AdminCall::Import if m == Method::POST => {
            keys::import(ctx, &read_fields(&parts.headers, body).await?).await
        }
        AdminCall::Key(h) if m == Method::GET => {
            let hash = parse_hash(h)?;
            keys::get_settled(ctx, &hash, cluster::key_usage(ctx, &hash).await?)
        }
        AdminCall::Key(h) if m == Method::PATCH => {
            let hash = parse_hash(h)?;
            keys::patch(ctx, hash, &read_fields(&parts.headers, body).await?).await
        }
        AdminCall::Key(h) if m == Method::DELETE => keys::delete(ctx, parse_hash(h)?).await,
        AdminCall::Credits(h) if m == Method::POST => {
            let hash = parse_hash(h)?;
            credits::credit(ctx, hash, &read_fields(&parts.headers, body).await?).await
        }
        AdminCall::Ledger(h) if m == Method::GET => {
            credits::ledger(ctx, &parse_hash(h)?, query).await
        }
        AdminCall::Usage(subject, view) if m == Method::GET => {
            reports::admin(ctx, subject, view, query).await
        }
        AdminCall::Accounts if m == Method::GET => accounts::list(ctx, query).await,
        AdminCall::Accounts if m == Method::POST => {
            accounts::create(ctx, &read_fields(&parts.headers, body).await?).await
        }
        AdminCall::Account(id) if m == Method::GET => {
            accounts::get_settled(ctx, id, cluster::account_money(ctx, id).await?)
        }
        AdminCall::Account(id) if m == Method::PATCH => {
            accounts::patch(ctx, id, &read_fields(&parts.headers, body).await?).await
        }
        AdminCall::Account(id) if m == Method::DELETE => accounts::delete(ctx, id, query).await,
        AdminCall::AccountCredits(id) if m == Method::POST => {
            accounts::credit(ctx, id, &read_fields(&parts.headers, body).await?).await
        }
        AdminCall::AccountLedger(id) if m == Method::GET => accounts::ledger(ctx, id, query).await,
        AdminCall::Payments if m == Method::GET => payments::list(ctx, query).await,
        AdminCall::Payments if m == Method::POST => {
            payments::manual(ctx, &read_fields(&parts.headers, body).await?).await
        }
        AdminCall::PaymentsReconcile if m == Method::GET => payments::reconcile(ctx, query).await,
        AdminCall::Payment(id) if m == Method::GET => payments::get(ctx, id).await,
        AdminCall::AccountCheckout(id) if m == Method::POST => {
            payments::account_checkout(ctx, id, &read_fields(&parts.headers, body).await?).await
        }
        AdminCall::AccountSubscriptions(id) if m == Method::GET => subscriptions::list(ctx, id),
        AdminCall::AccountSubscriptions(id) if m == Method::POST => {
            subscriptions::create(ctx, id, &read_fields(&parts.headers, body).await?).await
        }
        AdminCall::Subscription(sid) if m == Method::GET => subscriptions::get(ctx, sid),
        AdminCall::Subscription(sid) if m == Method::PATCH => {
            subscriptions::patch(ctx, sid, &read_fields(&parts.headers, body).await?).await
        }
        AdminCall::SubscriptionRenew(sid) if m == Method::POST => {
            subscriptions::renew(ctx, sid, &read_fields(&parts.headers, body).await?).await
        }
        AdminCall::SubscriptionCancel(sid) if m == Method::POST => {
            subscriptions::cancel(ctx, sid, &read_fields(&parts.headers, body).await?).await
        }
        AdminCall::Events if m == Method::GET => events::list(ctx, query).await,
        AdminCall::Redeliver(id) if m == Method::POST => events::redeliver(ctx, id).await,
        AdminCall::Deliveries if m == Method::GET => events::deliveries(ctx, query).await,
        AdminCall::Audit if m == Method::GET => events::audit(ctx, query).await,
        AdminCall::AdminTokens if m == Method::GET => admin_tokens::list(ctx),
        AdminCall::AdminTokens if m == Method::POST => {
            admin_tokens::create(ctx, &read_fields(&parts.headers, body).await?).await
        }
        AdminCall::AdminToken(id) if m == Method::DELETE => admin_tokens::delete(ctx, id).await,
        AdminCall::Reload if m == Method::POST => admin_tokens::reload(ctx).await,
        _ => Err(ApiError::method_not_allowed()),
    }
}

// ---- admin authentication ----

/// Checks the admin token, from `Authorization: Bearer <token>` or (seed
/// 002's clients) `X-Admin-Token: <token>`: the environment's token is
/// `root`, any other must be a scoped token. A network that failed too
/// often is refused (429) before the token is even compared, so that
/// guessing stops paying off; every failure counts against it.
fn admin_auth(
    ctx: &Ctx<'_>,
    headers: &http::HeaderMap,
    ip: IpAddr,
) -> Result<AdminCaller, ApiError> {
    let now = ctx.clock.now_ms();
    ctx.admin_guard.check(ip, now)?;
    let given = headers
        .get(http::header::AUTHORIZATION)
        .map(|v| v.as_bytes())
        .and_then(|v| {
            v.strip_prefix(b"Bearer ")
                .or_else(|| v.strip_prefix(b"bearer "))
        })
        .or_else(|| headers.get("x-admin-token").map(|v| v.as_bytes()));
    if let Some(token) = given.map(<[u8]>::trim_ascii) {
        // Both comparisons always run: which one matched takes no longer.
        let root = token_matches(ctx.admin_token.as_bytes(), token);
        let scoped = ctx.admin_tokens.find(&scopes::digest(token));
        if root {
            return Ok(AdminCaller::root());
        }
        if let Some(caller) = scoped {
            return Ok(caller);
        }
    }
    ctx.admin_guard.failed(ip, now);
    let message = if given.is_none() {
        "This endpoint needs the admin token: `Authorization: Bearer ADMIN_TOKEN`."
    } else {
        "Incorrect admin token."
    };
    Err(ApiError::invalid_api_key(message))
}

/// Compares a presented token with the expected one in time that depends
/// on neither's content nor length: both are hashed to 32 bytes first and
/// the digests compared with `subtle`. An empty expected token matches
/// nothing.
pub fn token_matches(expected: &[u8], given: &[u8]) -> bool {
    use sha2::{Digest, Sha256};
    let a = Sha256::digest(expected);
    let b = Sha256::digest(given);
    let same: bool = a.as_slice().ct_eq(b.as_slice()).into();
    same & !expected.is_empty()
}

// ---- paths and queries ----

/// A `{hash}` path segment: exactly 64 lowercase hex characters.
fn parse_hash(seg: &str) -> Result<KeyHash, ApiError> {
    let invalid = || {
        ApiError::bad_request(
            "invalid_hash",
            "A key hash is exactly 64 lowercase hexadecimal characters.",
        )
        .with_param("hash")
    };
    if seg.len() != 64 || !seg.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')) {
        return Err(invalid());
    }
    let mut out = [0u8; 32];
    hex::decode_to_slice(seg, &mut out).map_err(|_| invalid())?;
    Ok(out)
}

/// `name=value` pairs of a query string, percent-decoded (`+` is a space).
/// A pair that does not decode to UTF-8 is an error naming it.
fn query_pairs(query: Option<&str>) -> Result<Vec<(String, String)>, ApiError> {
    let mut out = Vec::new();
    for pair in query.unwrap_or("").split('&').filter(|p| !p.is_empty()) {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        let key = percent_decode(k).ok_or_else(|| {
            ApiError::bad_request("invalid_query", "The query string is malformed.")
        })?;
        let value = percent_decode(v).ok_or_else(|| {
            ApiError::bad_request(
                "invalid_query",
                format!(
                    "The query parameter `{}` is malformed.",
                    crate::error::truncate(&key, 64)
                ),
            )
            .with_param(key.clone())
        })?;
        out.push((key, value));
    }
    Ok(out)
}

pub(crate) fn percent_decode(s: &str) -> Option<String> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'+' => out.push(b' '),
            b'%' => {
                let hi = (*b.get(i + 1)? as char).to_digit(16)?;
                let lo = (*b.get(i + 2)? as char).to_digit(16)?;
                out.push((hi * 16 + lo) as u8);
                i += 2;
            }
            c => out.push(c),
        }
        i += 1;
    }
    String::from_utf8(out).ok()
}

/// `offset` and `limit` of a page (`limit` 1–1000, default 100).
fn offset_limit(pairs: &[(String, String)]) -> Result<(usize, usize), ApiError> {
    let mut offset = 0;
    let mut limit = PAGE_DEFAULT;
    for (k, v) in pairs {
        match k.as_str() {
            "offset" => {
                offset = v.parse::<usize>().map_err(|_| {
                    ApiError::bad_request(
                        "invalid_query",
                        "`offset` must be a non-negative integer.",
                    )
                    .with_param("offset")
                })?;
            }
            "limit" => {
                limit = v
                    .parse::<usize>()
                    .ok()
                    .filter(|n| (1..=PAGE_MAX).contains(n))
                    .ok_or_else(|| {
                        ApiError::bad_request(
                            "invalid_query",
                            format!("`limit` must be an integer from 1 to {PAGE_MAX}."),
                        )
                        .with_param("limit")
                    })?;
            }
            _ => {}
        }
    }
    Ok((offset, limit))
}

// ---- bodies ----

async fn read_fields<B>(headers: &http::HeaderMap, body: B) -> Result<Fields, ApiError>
where
    B: http_body::Body<Data = Bytes>,
    B::Error: Into<BoxError>,
{
    let bytes = crate::server::read_body(headers, body, ADMIN_BODY_MAX).await?;
    Fields::parse(&bytes)
}

/// A JSON object body, its fields kept as raw JSON text so each can be read
/// with the right type (amounts exactly, from their text) and a refusal can
/// name the field.
#[derive(Debug)]
pub(crate) struct Fields(Vec<(String, Box<RawValue>)>);

impl<'de> Deserialize<'de> for Fields {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Fields;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a JSON object")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Fields, A::Error> {
                let mut items = Vec::new();
                while let Some((k, v)) = map.next_entry::<String, Box<RawValue>>()? {
                    items.push((k, v));
                }
                Ok(Fields(items))
            }
        }
        d.deserialize_map(V)
    }
}

/// A field of a body that may be absent (leave as is), `null` (clear) or
/// set.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum Patch<T> {
    Absent,
    Null,
    Set(T),
}

impl<T> Patch<T> {
    /// The value once the patch is applied to `current`.
    pub fn apply(self, current: Option<T>) -> Option<T> {
        match self {
            Patch::Absent => current,
            Patch::Null => None,
            Patch::Set(v) => Some(v),
        }
    }

    /// `Set` → `f(value)`, which may refuse it.
    pub fn try_map<U>(
        self,
        f: impl FnOnce(T) -> Result<U, ApiError>,
    ) -> Result<Patch<U>, ApiError> {
        Ok(match self {
            Patch::Absent => Patch::Absent,
            Patch::Null => Patch::Null,
            Patch::Set(v) => Patch::Set(f(v)?),
        })
    }
}

impl Fields {
    pub fn parse(bytes: &[u8]) -> Result<Fields, ApiError> {
        let fields: Fields = serde_json::from_slice(bytes).map_err(|e| {
            ApiError::invalid_json(format!("The request body must be a JSON object: {e}."))
        })?;
        for (i, (k, _)) in fields.0.iter().enumerate() {
            if fields.0[..i].iter().any(|(prev, _)| prev == k) {
                return Err(ApiError::bad_request(
                    "duplicate_field",
                    format!(
                        "The field `{}` appears twice.",
                        crate::error::truncate(k, 64)
                    ),
                )
                .with_param(k.clone()));
            }
        }
        Ok(fields)
    }

    /// Refuses any field not in `known`.
    pub fn only(&self, known: &[&str]) -> Result<(), ApiError> {
        if let Some((k, _)) = self.0.iter().find(|(k, _)| !known.contains(&k.as_str())) {
            return Err(ApiError::bad_request(
                "unknown_field",
                format!(
                    "Unknown field `{}`. Known fields: {}.",
                    crate::error::truncate(k, 64),
                    known.join(", ")
                ),
            )
            .with_param(k.clone()));
        }
        Ok(())
    }

    pub fn raw(&self, name: &str) -> Option<&RawValue> {
        self.0.iter().find(|(k, _)| k == name).map(|(_, v)| &**v)
    }

    /// A field that may be absent or `null` (both → `Absent`/`Null`).
    pub fn patch<T: DeserializeOwned>(
        &self,
        name: &'static str,
        what: &str,
    ) -> Result<Patch<T>, ApiError> {
        match self.raw(name) {
            None => Ok(Patch::Absent),
            Some(raw) if raw.get().trim() == "null" => Ok(Patch::Null),
            Some(raw) => serde_json::from_str(raw.get())
                .map(Patch::Set)
                .map_err(|_| wrong_type(name, what)),
        }
    }

    /// A field that may be absent but not `null`.
    pub fn opt<T: DeserializeOwned>(
        &self,
        name: &'static str,
        what: &str,
    ) -> Result<Option<T>, ApiError> {
        match self.patch(name, what)? {
            Patch::Absent => Ok(None),
            Patch::Null => Err(wrong_type(name, what)),
            Patch::Set(v) => Ok(Some(v)),
        }
    }

    /// A field that must be present.
    pub fn required<T: DeserializeOwned>(
        &self,
        name: &'static str,
        what: &str,
    ) -> Result<T, ApiError> {
        self.opt(name, what)?.ok_or_else(|| {
            ApiError::bad_request("missing_field", format!("The field `{name}` is required."))
                .with_param(name)
        })
    }
}

fn wrong_type(name: &'static str, what: &str) -> ApiError {
    ApiError::bad_request("invalid_type", format!("`{name}` must be {what}.")).with_param(name)
}

/// A refused value of a well-typed field.
fn invalid(name: &'static str, code: &'static str, message: impl Into<String>) -> ApiError {
    ApiError::bad_request(code, message.into()).with_param(name)
}

// ---- answers ----

/// A JSON answer. Amounts inside serialize as exact decimal numbers
/// (`Pico`'s `Serialize`), which only holds when serializing straight to
/// text: never build these through `serde_json::Value`.
fn json<T: Serialize>(status: StatusCode, value: &T) -> Result<Response<Body>, ApiError> {
    let bytes = serde_json::to_vec(value)
        .map_err(|e| ApiError::internal(format!("could not serialize the answer: {e}")))?;
    let mut res = Response::new(crate::full_body(bytes));
    *res.status_mut() = status;
    res.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    Ok(res)
}

/// `{"data": value}`
#[derive(Serialize)]
struct Data<T> {
    data: T,
}

/// The store's refusals as API errors; its failures are logged and answered
/// 500 without their details.
fn store_error(e: StoreError) -> ApiError {
    match e {
        StoreError::NotFound => key_not_found(),
        StoreError::Exists => ApiError::conflict("key_exists", "This key already exists."),
        StoreError::Invalid(m) => ApiError::bad_request("invalid_request", m),
        // The cause is logged with the request id, never sent (it may name
        // files and sled's internals).
        other => {
            let mut e = ApiError::internal(other);
            e.message = "The key store failed; nothing may have changed. Retry later.".into();
            e
        }
    }
}

fn key_not_found() -> ApiError {
    ApiError::not_found("No key with this hash.").with_param("hash")
}

/// Admin writes (create, patch, delete, credits) run one at a time: they
/// are rare, and this makes check-then-write sequences (one key per owner,
/// a deduct's hold and its ledger entry) atomic with respect to each other.
async fn admin_write_lock() -> tokio::sync::MutexGuard<'static, ()> {
    static LOCK: OnceLock<tokio::sync::Mutex<()>> = OnceLock::new();
    LOCK.get_or_init(|| tokio::sync::Mutex::new(()))
        .lock()
        .await
}

#[cfg(test)]
mod tests;

/// Fuzzing entry: every admin body and path parser on arbitrary bytes.
/// Byte 0 picks the parser. Panics only when a property breaks: whatever a
/// parser accepts is within the bounds the API promises.
#[doc(hidden)]
pub fn fuzz_admin(data: &[u8]) {
    let [which, rest @ ..] = data else { return };
    match which % 5 {
        0 | 1 => {
            if let Ok(f) = Fields::parse(rest)
                && let Ok(spec) = keys::parse_spec(&f, which % 5 == 0)
            {
                for amount in [&spec.limit, &spec.daily_fee] {
                    if let Patch::Set(p) = amount {
                        assert!(
                            p.0 >= 0 && *p <= keys::MAX_AMOUNT,
                            "accepted amount out of range: {p}"
                        );
                    }
                }
                for n in [&spec.rpm, &spec.concurrency, &spec.max_devices] {
                    if let Patch::Set(v) = n {
                        assert!(*v >= 1, "a zero limit was accepted");
                    }
                }
                if let Some(name) = &spec.name {
                    assert!(name.chars().count() <= 256);
                }
            }
        }
        2 => {
            if let Ok(f) = Fields::parse(rest)
                && let Ok(c) = credits::parse_credit(&f)
            {
                assert!(c.amount.0 > 0, "a non-positive credit was accepted");
            }
        }
        3 => {
            if let Ok(text) = std::str::from_utf8(rest)
                && keys::check_import_key(text, "sk-", 48).is_ok()
            {
                assert_eq!(text.len(), 51);
                assert!(text[3..].bytes().all(|b| b.is_ascii_alphanumeric()));
            }
        }
        _ => {
            if let Ok(text) = std::str::from_utf8(rest)
                && let Ok(hash) = parse_hash(text)
            {
                assert_eq!(
                    hex::encode(hash),
                    text,
                    "only the canonical hex form is a hash"
                );
            }
        }
    }
}
