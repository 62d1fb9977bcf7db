//! The licence / credit server of seed 002, over accounts and keys:
//!
//! | its word | Tollgate |
//! |---|---|
//! | email | an account, found by its `email` (created by `generate` with the email as id) |
//! | licence key | an API key whose `owner` is that account (shown once, by `generate`) |
//! | `license_key` in answers | the key's label (keys are stored hashed) |
//! | credits | the account's balance ÷ `[compat.license] credit_unit` USD |
//! | device binding | the key's `max_devices` (`[compat.license] max_devices`) |
//! | the daily 0.33 fee | the key's `daily_fee` (a plan's or the key's own) |
//! | the `943113638@qq.com` test email | an `unlimited` account: any number of licences, deducts change nothing |
//!
//! Routes: `GET /api/v1/health`; `POST /api/v1/license/verify`
//! `{license_key, device_id}`; `GET /api/v1/license/balance/{email}` (the
//! admin token, or that account's licence key: the document's public
//! balance would let anyone read anyone's); admin (`X-Admin-Token`):
//! `POST /api/v1/license/generate` `{email, credits?}`,
//! `POST /api/v1/license/revoke/{license_key}`,
//! `GET /api/v1/license/info/{license_key}`,
//! `POST /api/v1/license/recharge` `{email, amount}`,
//! `POST /api/v1/license/deduct` `{email, amount}`.
//!
//! Every answer carries `success`; errors keep the API's `error` object
//! beside it, so the document's `if (data.success)` reads them right.

use std::net::IpAddr;
use std::sync::OnceLock;

use bytes::Bytes;
use http::{Method, Response, StatusCode};
use serde::Serialize;

use super::super::keys::{self, KeySpec};
use super::super::{Ctx, Fields, Patch, invalid, json, percent_decode, read_fields, store_error};
use super::{admin_any, is_admin};
use crate::error::ApiError;
use crate::gate::{Ask, hash_key};
use crate::money::Pico;
use crate::store::{AccountRecord, KeyHash, KeyRecord};
use crate::{Body, BoxError};

/// The calls under `/api/v1/license/`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(in crate::api) enum Call<'a> {
    Verify,
    Balance(&'a str),
    Generate,
    Revoke(&'a str),
    Info(&'a str),
    Recharge,
    Deduct,
}

pub(super) fn call_of(rest: &str) -> Option<Call<'_>> {
    let segs: Vec<&str> = rest.split('/').collect();
    match segs.as_slice() {
        ["verify"] => Some(Call::Verify),
        ["balance", e] if !e.is_empty() => Some(Call::Balance(e)),
        ["generate"] => Some(Call::Generate),
        ["revoke", k] if !k.is_empty() => Some(Call::Revoke(k)),
        ["info", k] if !k.is_empty() => Some(Call::Info(k)),
        ["recharge"] => Some(Call::Recharge),
        ["deduct"] => Some(Call::Deduct),
        _ => None,
    }
}

/// `GET /api/v1/health`: the gateway answers (readiness is `/readyz`).
pub(super) fn health(ctx: &Ctx<'_>) -> Result<Response<Body>, ApiError> {
    #[derive(Serialize)]
    struct Health {
        success: bool,
        status: &'static str,
        time: String,
    }
    json(
        StatusCode::OK,
        &Health {
            success: true,
            status: "ok",
            time: crate::clock::rfc3339(ctx.clock.now_ms()),
        },
    )
}

/// Answers a licence call; an error is answered with `success: false`.
pub(super) async fn handle<B>(
    ctx: &Ctx<'_>,
    call: Call<'_>,
    parts: &http::request::Parts,
    body: B,
    ip: IpAddr,
) -> Response<Body>
where
    B: http_body::Body<Data = Bytes>,
    B::Error: Into<BoxError>,
{
    match answer(ctx, call, parts, body, ip).await {
        Ok(res) => res,
        Err(e) => failed(e),
    }
}

async fn answer<B>(
    ctx: &Ctx<'_>,
    call: Call<'_>,
    parts: &http::request::Parts,
    body: B,
    ip: IpAddr,
) -> Result<Response<Body>, ApiError>
where
    B: http_body::Body<Data = Bytes>,
    B::Error: Into<BoxError>,
{
    let h = &parts.headers;
    let m = &parts.method;
    let want = match call {
        Call::Balance(_) | Call::Info(_) => Method::GET,
        _ => Method::POST,
    };
    match call {
        Call::Verify => {
            if m != want {
                return Err(ApiError::method_not_allowed());
            }
            verify(ctx, &read_fields(h, body).await?, ip)
        }
        Call::Balance(email) => {
            if m != want {
                return Err(ApiError::method_not_allowed());
            }
            balance(ctx, email, h, ip)
        }
        _ => {
            // Admin: authenticate before looking at the method or the body.
            admin_any(ctx, h, ip)?;
            if m != want {
                return Err(ApiError::method_not_allowed());
            }
            match call {
                Call::Generate => generate(ctx, &read_fields(h, body).await?).await,
                Call::Revoke(k) => revoke(ctx, k).await,
                Call::Info(k) => info(ctx, k),
                Call::Recharge => credit(ctx, &read_fields(h, body).await?, false).await,
                _ => credit(ctx, &read_fields(h, body).await?, true).await,
            }
        }
    }
}

/// The API error with `success: false` beside its `error` object.
fn failed(e: ApiError) -> Response<Body> {
    let inner = e.to_json();
    let mut bytes = Vec::with_capacity(inner.len() + 20);
    bytes.extend_from_slice(b"{\"success\":false,");
    // `to_json` is always an object: `{"error":…}`.
    bytes.extend_from_slice(inner.get(1..).unwrap_or(b"}"));
    let (parts, _) = e.into_response().into_parts();
    Response::from_parts(parts, crate::full_body(bytes))
}

// ---- units ----

/// Credits of a USD amount, written like an amount (a decimal with up to
/// 12 places): `balance ÷ credit_unit`, rounded toward zero.
fn credits_of(ctx: &Ctx<'_>, usd: Pico) -> Pico {
    let unit = i128::from(ctx.config.compat.license.credit_unit.0.max(1));
    let c = i128::from(usd.0) * i128::from(Pico::usd(1).0) / unit;
    Pico(i64::try_from(c).unwrap_or(if c < 0 { i64::MIN } else { i64::MAX }))
}

/// USD of a credit count (read exactly), or 400 naming `field`.
fn usd_of(ctx: &Ctx<'_>, f: &Fields, field: &'static str) -> Result<Pico, ApiError> {
    let Some(raw) = f.raw(field) else {
        return Err(invalid(
            field,
            "missing_field",
            format!("The field `{field}` is required."),
        ));
    };
    let credits = keys::parse_usd(raw, field)?;
    let unit = i128::from(ctx.config.compat.license.credit_unit.0);
    let usd = i128::from(credits.0) * unit / i128::from(Pico::usd(1).0);
    match i64::try_from(usd) {
        Ok(v) if credits.0 > 0 && Pico(v) <= keys::MAX_AMOUNT && v > 0 => Ok(Pico(v)),
        _ => Err(invalid(
            field,
            "invalid_amount",
            format!(
                "`{field}` must be more than 0 credits and at most {} USD's worth.",
                keys::MAX_AMOUNT
            ),
        )),
    }
}

// ---- finding things ----

fn check_email(email: &str) -> Result<(), ApiError> {
    let ok = email.len() <= 254
        && email
            .split_once('@')
            .is_some_and(|(a, d)| !a.is_empty() && !d.is_empty())
        && email.bytes().all(|b| b.is_ascii_graphic() && b != b'/');
    if ok {
        return Ok(());
    }
    Err(invalid(
        "email",
        "invalid_email",
        "`email` must be an email address.",
    ))
}

fn account_by_email(ctx: &Ctx<'_>, email: &str) -> Result<Option<AccountRecord>, ApiError> {
    Ok(ctx
        .store
        .user_accounts(0, 1, Some(email))
        .map_err(store_error)?
        .into_iter()
        .next())
}

fn unknown_email() -> ApiError {
    ApiError::not_found("No licence for this email.").with_param("email")
}

/// The account's keys (its licences), oldest first.
fn licences(ctx: &Ctx<'_>, account: &str) -> Result<Vec<KeyRecord>, ApiError> {
    let mut out = Vec::new();
    for (hash, _) in ctx.store.owner_keys(account).map_err(store_error)? {
        if let Some((rec, _)) = ctx.store.key(&hash).map_err(store_error)? {
            out.push(rec);
        }
    }
    out.sort_by_key(|r| r.created_at);
    Ok(out)
}

/// The label of the account's first licence still in force.
fn licence_label(ctx: &Ctx<'_>, account: &str) -> Result<Option<String>, ApiError> {
    Ok(licences(ctx, account)?
        .into_iter()
        .find(|r| !r.disabled)
        .map(|r| r.label))
}

/// A licence key in a path: the key itself (percent-encoded), or its
/// 64-hex hash.
fn key_hash_of(seg: &str) -> Result<KeyHash, ApiError> {
    let text = percent_decode(seg).ok_or_else(|| {
        invalid(
            "license_key",
            "invalid_license_key",
            "The licence key in the path is malformed.",
        )
    })?;
    if text.len() == 64 && text.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')) {
        let mut out = [0u8; 32];
        if hex::decode_to_slice(&text, &mut out).is_ok() {
            return Ok(out);
        }
    }
    Ok(hash_key(&text))
}

fn no_licence() -> ApiError {
    ApiError::not_found("No such licence key.").with_param("license_key")
}

/// What the account can spend now: the live wallet's balance (usage
/// charged to the moment), else the stored one.
fn balance_of(ctx: &Ctx<'_>, a: &AccountRecord) -> Result<Pico, ApiError> {
    let now = ctx.clock.now_ms();
    Ok(match ctx.gate.wallets().of(&a.id, now)? {
        Some(live) => live.numbers().balance,
        None => a.balance,
    })
}

/// `2023-06-30 12:34:56` (UTC), the document's `last_updated_at`.
fn plain_time(ms: i64) -> String {
    let t = crate::clock::rfc3339(ms);
    let part = |r: std::ops::Range<usize>| t.get(r).unwrap_or("");
    format!("{} {}", part(0..10), part(11..19))
}

// ---- the calls ----

/// `POST /api/v1/license/verify` `{license_key, device_id}`: the key's own
/// admission (disabled, expired, device binding: a new device is bound
/// while the key has room for one).
fn verify(ctx: &Ctx<'_>, f: &Fields, ip: IpAddr) -> Result<Response<Body>, ApiError> {
    f.only(&["license_key", "device_id"])?;
    let key: String = f.required("license_key", "a string")?;
    let device: String = f.required("device_id", "a string")?;
    let now = ctx.clock.now_ms();
    let live = ctx
        .gate
        .lookup(&hash_key(&key), now)?
        .ok_or_else(|| ApiError::invalid_api_key("Invalid licence key."))?;
    let policy = ctx.gate.admit(
        &live,
        &Ask {
            now_ms: now,
            model: None,
            client_ip: ip,
            device: Some(&device),
        },
    )?;
    let rec = &policy.record;
    let account = match rec.owner.as_deref() {
        Some(o) => ctx.store.user_account(o).map_err(store_error)?,
        None => None,
    };
    let credits = match &account {
        Some(a) => Some(credits_of(ctx, balance_of(ctx, a)?)),
        None => None,
    };
    #[derive(Serialize)]
    struct Verified<'a> {
        success: bool,
        valid: bool,
        license_key: &'a str,
        email: Option<&'a str>,
        credits: Option<Pico>,
        device_id: &'a str,
        devices: &'a [String],
        max_devices: Option<u32>,
    }
    json(
        StatusCode::OK,
        &Verified {
            success: true,
            valid: true,
            license_key: &rec.label,
            email: account.as_ref().and_then(|a| a.email.as_deref()),
            credits,
            device_id: &device,
            devices: &rec.devices,
            max_devices: rec.max_devices,
        },
    )
}

/// `GET /api/v1/license/balance/{email}`: to the admin, or to a caller
/// presenting a licence key of that email's account; 401 otherwise (an
/// unknown email too, unless the admin asks).
fn balance(
    ctx: &Ctx<'_>,
    seg: &str,
    headers: &http::HeaderMap,
    ip: IpAddr,
) -> Result<Response<Body>, ApiError> {
    let email = percent_decode(seg).unwrap_or_default();
    let admin = is_admin(ctx, headers, ip)?;
    let account = if admin {
        check_email(&email)?;
        account_by_email(ctx, &email)?.ok_or_else(unknown_email)?
    } else {
        let refuse = || {
            ApiError::invalid_api_key(
                "A balance is shown to the admin token (X-Admin-Token) or to that account's licence key (X-License-Key).",
            )
        };
        let live = ctx.gate.authenticate(headers, ip).map_err(|_| refuse())?;
        let owner = live.policy().record.owner.clone().ok_or_else(refuse)?;
        let a = ctx
            .store
            .user_account(&owner)
            .map_err(store_error)?
            .ok_or_else(refuse)?;
        if a.email.as_deref() != Some(email.as_str()) {
            return Err(refuse());
        }
        a
    };
    #[derive(Serialize)]
    struct Balance<'a> {
        success: bool,
        email: &'a str,
        credits: Pico,
        license_key: Option<String>,
    }
    json(
        StatusCode::OK,
        &Balance {
            success: true,
            email: &email,
            credits: credits_of(ctx, balance_of(ctx, &account)?),
            license_key: licence_label(ctx, &account.id)?,
        },
    )
}

/// Generates run one at a time: "one licence per email" is a
/// check-then-create over an account and a key.
async fn generate_lock() -> tokio::sync::MutexGuard<'static, ()> {
    static LOCK: OnceLock<tokio::sync::Mutex<()>> = OnceLock::new();
    LOCK.get_or_init(|| tokio::sync::Mutex::new(()))
        .lock()
        .await
}

/// `POST /api/v1/license/generate` `{email, credits?}`: the email's
/// account (created with the email as its id when there is none), one
/// licence key for it (any number for an `unlimited` account), and the
/// credits topped up.
async fn generate(ctx: &Ctx<'_>, f: &Fields) -> Result<Response<Body>, ApiError> {
    f.only(&["email", "credits"])?;
    let email: String = f.required("email", "a string")?;
    check_email(&email)?;
    let topup = match f.raw("credits") {
        Some(raw) if raw.get().trim() != "null" => {
            let zero = keys::parse_usd(raw, "credits")?;
            if zero.0 == 0 {
                None
            } else {
                Some(usd_of(ctx, f, "credits")?)
            }
        }
        _ => None,
    };
    let _one = generate_lock().await;
    let account = match account_by_email(ctx, &email)? {
        Some(a) => a,
        None => {
            let body = serde_json::json!({ "id": email, "email": email });
            let fields = Fields::parse(body.to_string().as_bytes())?;
            super::super::accounts::create(ctx, &fields).await?;
            account_by_email(ctx, &email)?.ok_or_else(unknown_email)?
        }
    };
    if !account.unlimited && licences(ctx, &account.id)?.iter().any(|r| !r.disabled) {
        return Err(ApiError::conflict(
            "license_exists",
            "This email already has a licence (one per email).",
        )
        .with_param("email"));
    }
    let max_devices = ctx.config.compat.license.max_devices;
    let spec = KeySpec {
        name: Some(format!("licence {email}")),
        disabled: None,
        limit: Patch::Absent,
        limit_reset: Patch::Absent,
        expires_at: Patch::Absent,
        max_requests: Patch::Absent,
        rpm: Patch::Absent,
        tpm: Patch::Absent,
        concurrency: Patch::Absent,
        models: Patch::Absent,
        allowed_ips: Patch::Absent,
        max_devices: if max_devices > 0 {
            Patch::Set(max_devices)
        } else {
            Patch::Absent
        },
        daily_fee: Patch::Absent,
        low_balance_alert: Patch::Absent,
        metadata: Patch::Absent,
        plan: ctx.config.compat.license.plan.clone(),
        owner: Some(account.id.clone()),
    };
    let (rec, _, key) = keys::create_key(ctx, spec).await?;
    if let Some(usd) = topup {
        topup_account(ctx, &account.id, usd, "licence generated").await?;
    }
    let account = ctx
        .store
        .user_account(&account.id)
        .map_err(store_error)?
        .unwrap_or(account);
    #[derive(Serialize)]
    struct Generated<'a> {
        success: bool,
        /// The licence key itself: shown this once, never stored.
        license_key: &'a str,
        key_hash: String,
        email: &'a str,
        credits: Pico,
    }
    json(
        StatusCode::OK,
        &Generated {
            success: true,
            license_key: &key,
            key_hash: hex::encode(rec.hash),
            email: &email,
            credits: credits_of(ctx, balance_of(ctx, &account)?),
        },
    )
}

/// An account credit through the accounts API (one rule for money).
async fn account_credit(
    ctx: &Ctx<'_>,
    id: &str,
    kind: &str,
    usd: Pico,
    reason: &str,
) -> Result<(), ApiError> {
    let body = serde_json::json!({
        "amount": usd.to_string(),
        "kind": kind,
        "reason": reason,
    });
    let fields = Fields::parse(body.to_string().as_bytes())?;
    super::super::accounts::credit(ctx, id, &fields).await?;
    Ok(())
}

async fn topup_account(ctx: &Ctx<'_>, id: &str, usd: Pico, reason: &str) -> Result<(), ApiError> {
    account_credit(ctx, id, "topup", usd, reason).await
}

/// `POST /api/v1/license/revoke/{license_key}`: the key is disabled (kept,
/// with its usage).
async fn revoke(ctx: &Ctx<'_>, seg: &str) -> Result<Response<Body>, ApiError> {
    let hash = key_hash_of(seg)?;
    let (rec, _) = ctx
        .store
        .key(&hash)
        .map_err(store_error)?
        .ok_or_else(no_licence)?;
    let fields = Fields::parse(br#"{"disabled": true}"#)?;
    keys::patch(ctx, hash, &fields).await?;
    #[derive(Serialize)]
    struct Revoked<'a> {
        success: bool,
        message: &'static str,
        license_key: &'a str,
    }
    json(
        StatusCode::OK,
        &Revoked {
            success: true,
            message: "Licence revoked.",
            license_key: &rec.label,
        },
    )
}

#[derive(Serialize)]
struct LicenseInfo<'a> {
    license_key: &'a str,
    key_hash: String,
    email: Option<&'a str>,
    credits: Option<Pico>,
    status: &'static str,
    devices: &'a [String],
    max_devices: Option<u32>,
    issued_at: String,
    last_updated_at: String,
}

/// `GET /api/v1/license/info/{license_key}`
fn info(ctx: &Ctx<'_>, seg: &str) -> Result<Response<Body>, ApiError> {
    let hash = key_hash_of(seg)?;
    let now = ctx.clock.now_ms();
    let live = ctx.gate.lookup(&hash, now)?.ok_or_else(no_licence)?;
    let policy = live.policy();
    let rec = &policy.record;
    let n = live.numbers();
    let account = match rec.owner.as_deref() {
        Some(o) => ctx.store.user_account(o).map_err(store_error)?,
        None => None,
    };
    let credits = match &account {
        Some(a) => Some(credits_of(ctx, balance_of(ctx, a)?)),
        None => None,
    };
    #[derive(Serialize)]
    struct Info<'a> {
        success: bool,
        license_info: LicenseInfo<'a>,
    }
    json(
        StatusCode::OK,
        &Info {
            success: true,
            license_info: LicenseInfo {
                license_key: &rec.label,
                key_hash: hex::encode(rec.hash),
                email: account.as_ref().and_then(|a| a.email.as_deref()),
                credits,
                status: super::openrouter::key_status(rec, n.remaining, n.requests, now),
                devices: &rec.devices,
                max_devices: rec.max_devices,
                issued_at: plain_time(rec.created_at),
                last_updated_at: plain_time(
                    account
                        .as_ref()
                        .map_or(rec.updated_at, |a| a.updated_at.max(rec.updated_at)),
                ),
            },
        },
    )
}

/// `POST /api/v1/license/recharge` or `/deduct` `{email, amount}` (credits).
/// A deduct beyond the balance fails and changes nothing (the accounts
/// API's rule); an `unlimited` account's deduct changes nothing and
/// succeeds, as the document's test email's does.
async fn credit(ctx: &Ctx<'_>, f: &Fields, deduct: bool) -> Result<Response<Body>, ApiError> {
    f.only(&["email", "amount"])?;
    let email: String = f.required("email", "a string")?;
    check_email(&email)?;
    let usd = usd_of(ctx, f, "amount")?;
    let account = account_by_email(ctx, &email)?.ok_or_else(unknown_email)?;
    if deduct {
        if !account.unlimited {
            account_credit(ctx, &account.id, "deduct", usd, "licence deduct").await?;
        }
    } else {
        topup_account(ctx, &account.id, usd, "licence recharge").await?;
    }
    let account = ctx
        .store
        .user_account(&account.id)
        .map_err(store_error)?
        .ok_or_else(unknown_email)?;
    let credits = credits_of(ctx, balance_of(ctx, &account)?);
    if deduct {
        #[derive(Serialize)]
        struct Deducted {
            success: bool,
            message: String,
            remaining_credits: Pico,
        }
        return json(
            StatusCode::OK,
            &Deducted {
                success: true,
                message: format!("Deducted {} credits.", credits_of(ctx, usd)),
                remaining_credits: credits,
            },
        );
    }
    #[derive(Serialize)]
    struct Recharged<'a> {
        license_key: Option<String>,
        email: &'a str,
        credits: Pico,
        last_updated_at: String,
    }
    #[derive(Serialize)]
    struct Answer<'a> {
        success: bool,
        license_info: Recharged<'a>,
    }
    json(
        StatusCode::OK,
        &Answer {
            success: true,
            license_info: Recharged {
                license_key: licence_label(ctx, &account.id)?,
                email: &email,
                credits,
                last_updated_at: plain_time(account.updated_at),
            },
        },
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn routes() {
        assert_eq!(call_of("verify"), Some(Call::Verify));
        assert_eq!(call_of("balance/a@b.c"), Some(Call::Balance("a@b.c")));
        assert_eq!(call_of("balance/"), None);
        assert_eq!(call_of("revoke/k"), Some(Call::Revoke("k")));
        assert_eq!(call_of("deduct/x"), None);
    }
}
