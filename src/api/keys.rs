//! Provisioning: create, list, read, update, delete and import keys.
//!
//! Bodies are validated completely before anything is written, so a refused
//! request changes nothing. Plans from `config.toml` fill the fields a
//! create request leaves out.

use http::StatusCode;
use serde::Serialize;
use serde_json::value::RawValue;

use super::{
    Ctx, Data, Fields, Patch, admin_write_lock, invalid, json, key_not_found, store_error,
};
use crate::clock::{HOUR_MS, Period, rfc3339};
use crate::config::PlanConfig;
use crate::error::ApiError;
use crate::gate::{LiveKey, generate_key, hash_key, label_of, parse_net};
use crate::money::{JsonUsd, Pico};
use crate::store::{Account, KeyHash, KeyQuery, KeyRecord, LedgerKind, RollupScope};

/// Largest limit or fee an admin can set: a typo guard far above any real
/// key's budget and far below `Pico`'s range.
pub(crate) const MAX_AMOUNT: Pico = Pico::usd(1_000_000);
/// Longest `name` and `owner`, in characters.
const MAX_NAME_CHARS: usize = 256;
/// Largest `metadata`, as sent (JSON text).
const MAX_METADATA_BYTES: usize = 16 * 1024;
/// Most entries in `models` or `allowed_ips`, and the longest entry.
const MAX_LIST_ITEMS: usize = 256;
const MAX_ITEM_CHARS: usize = 256;

/// Fields a PATCH may change (and a create may set).
const PATCH_FIELDS: &[&str] = &[
    "name",
    "disabled",
    "limit",
    "limit_reset",
    "expires_at",
    "max_requests",
    "rpm",
    "tpm",
    "concurrency",
    "models",
    "allowed_ips",
    "max_devices",
    "daily_fee",
    "metadata",
    "low_balance_alert",
];

/// Fields of a create body.
const CREATE_FIELDS: &[&str] = &[
    "name",
    "disabled",
    "limit",
    "limit_reset",
    "expires_at",
    "max_requests",
    "rpm",
    "tpm",
    "concurrency",
    "models",
    "allowed_ips",
    "max_devices",
    "daily_fee",
    "metadata",
    "plan",
    "owner",
    // OpenRouter's provisioning fields with no Tollgate meaning of their
    // own: accepted (so its clients work unchanged) and kept in `metadata`.
    "label",
    "include_byok_in_limit",
    "creator_user_id",
    "workspace_id",
    "low_balance_alert",
];

/// Fields of an import body.
const IMPORT_FIELDS: &[&str] = &["key", "owner", "name", "plan", "unlimited"];

/// What a create or patch body asks for, validated.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct KeySpec {
    pub name: Option<String>,
    pub disabled: Option<bool>,
    pub limit: Patch<Pico>,
    pub limit_reset: Patch<Period>,
    pub expires_at: Patch<i64>,
    pub max_requests: Patch<u64>,
    pub rpm: Patch<u32>,
    pub tpm: Patch<u64>,
    pub concurrency: Patch<u32>,
    pub models: Patch<Vec<String>>,
    pub allowed_ips: Patch<Vec<String>>,
    pub max_devices: Patch<u32>,
    pub daily_fee: Patch<Pico>,
    /// JSON text of an object, as sent.
    pub metadata: Patch<String>,
    /// Create only.
    pub plan: Option<String>,
    /// Create only.
    pub owner: Option<String>,
    /// Threshold of `key.low_balance`.
    pub low_balance_alert: Patch<Pico>,
}

/// Parses and validates a create (`create = true`) or patch body.
pub(crate) fn parse_spec(f: &Fields, create: bool) -> Result<KeySpec, ApiError> {
    f.only(if create { CREATE_FIELDS } else { PATCH_FIELDS })?;
    let name = if create {
        Some(f.required::<String>("name", "a string")?)
    } else {
        f.opt::<String>("name", "a string")?
    };
    if let Some(n) = &name {
        check_text("name", n)?;
    }
    let owner = if create {
        f.opt::<String>("owner", "a string")?
    } else {
        None
    };
    if let Some(o) = &owner {
        check_text("owner", o)?;
    }
    let plan = if create {
        f.opt::<String>("plan", "a string")?
    } else {
        None
    };
    Ok(KeySpec {
        name,
        disabled: f.opt("disabled", "true or false")?,
        limit: amount(f, "limit")?,
        limit_reset: f.patch(
            "limit_reset",
            "\"daily\", \"weekly\", \"monthly\" or null",
        )?,
        expires_at: f
            .patch::<String>("expires_at", "an RFC 3339 date-time string or null")?
            .try_map(|s| {
                crate::clock::parse_rfc3339(&s).ok_or_else(|| {
                    invalid(
                        "expires_at",
                        "invalid_date",
                        "`expires_at` must be an RFC 3339 date-time such as \"2026-12-31T23:59:59Z\".",
                    )
                })
            })?,
        max_requests: f.patch("max_requests", "a non-negative integer or null")?,
        rpm: at_least_one(f.patch("rpm", "a positive integer or null")?, "rpm")?,
        tpm: at_least_one(f.patch("tpm", "a positive integer or null")?, "tpm")?,
        concurrency: at_least_one(
            f.patch("concurrency", "a positive integer or null")?,
            "concurrency",
        )?,
        models: f
            .patch::<Vec<String>>("models", "an array of model name patterns or null")?
            .try_map(check_models)?,
        allowed_ips: f
            .patch::<Vec<String>>("allowed_ips", "an array of IP addresses or CIDR ranges or null")?
            .try_map(check_ips)?,
        max_devices: at_least_one(
            f.patch("max_devices", "a positive integer or null")?,
            "max_devices",
        )?,
        daily_fee: amount(f, "daily_fee")?,
        metadata: if create {
            super::compat::openrouter::with_extra_fields(f, metadata(f)?)?
        } else {
            metadata(f)?
        },
        plan,
        owner,
        low_balance_alert: amount(f, "low_balance_alert")?,
    })
}

/// Non-empty text of at most `MAX_NAME_CHARS` characters, without control
/// characters.
fn check_text(name: &'static str, v: &str) -> Result<(), ApiError> {
    if v.trim().is_empty() {
        return Err(invalid(
            name,
            "invalid_value",
            format!("`{name}` must not be empty."),
        ));
    }
    if v.chars().count() > MAX_NAME_CHARS {
        return Err(invalid(
            name,
            "invalid_value",
            format!("`{name}` must be at most {MAX_NAME_CHARS} characters."),
        ));
    }
    if v.chars().any(char::is_control) {
        return Err(invalid(
            name,
            "invalid_value",
            format!("`{name}` must not contain control characters."),
        ));
    }
    Ok(())
}

/// A USD amount (number or string, exact) from 0 to `MAX_AMOUNT`, or null.
pub(super) fn amount(f: &Fields, name: &'static str) -> Result<Patch<Pico>, ApiError> {
    let Some(raw) = f.raw(name) else {
        return Ok(Patch::Absent);
    };
    if raw.get().trim() == "null" {
        return Ok(Patch::Null);
    }
    let v = parse_usd(raw, name)?;
    if v.0 < 0 {
        return Err(invalid(
            name,
            "invalid_amount",
            format!("`{name}` must not be negative."),
        ));
    }
    if v > MAX_AMOUNT {
        return Err(invalid(
            name,
            "invalid_amount",
            format!("`{name}` must be at most {MAX_AMOUNT} USD."),
        ));
    }
    Ok(Patch::Set(v))
}

/// A USD amount read exactly from its JSON text.
pub(crate) fn parse_usd(raw: &RawValue, name: &'static str) -> Result<Pico, ApiError> {
    serde_json::from_str::<JsonUsd>(raw.get())
        .map(|j| j.0)
        .map_err(|e| {
            // serde_json appends " at line 1 column N"; the money error
            // before it is the useful part.
            let msg = e.to_string();
            let msg = msg.split(" at line ").next().unwrap_or("").to_owned();
            invalid(
                name,
                "invalid_amount",
                format!("`{name}` must be a USD amount (a number or a decimal string): {msg}."),
            )
        })
}

fn at_least_one<T: PartialEq + From<u8>>(
    p: Patch<T>,
    name: &'static str,
) -> Result<Patch<T>, ApiError> {
    if p == Patch::Set(T::from(0u8)) {
        return Err(invalid(
            name,
            "invalid_value",
            format!("`{name}` must be at least 1 (or null for no limit)."),
        ));
    }
    Ok(p)
}

fn check_list(name: &'static str, items: &[String]) -> Result<(), ApiError> {
    if items.len() > MAX_LIST_ITEMS {
        return Err(invalid(
            name,
            "invalid_value",
            format!("`{name}` may have at most {MAX_LIST_ITEMS} entries."),
        ));
    }
    if items
        .iter()
        .any(|s| s.is_empty() || s.chars().count() > MAX_ITEM_CHARS)
    {
        return Err(invalid(
            name,
            "invalid_value",
            format!("Each entry of `{name}` must be 1 to {MAX_ITEM_CHARS} characters."),
        ));
    }
    Ok(())
}

fn check_models(models: Vec<String>) -> Result<Vec<String>, ApiError> {
    check_list("models", &models)?;
    for m in &models {
        globset::Glob::new(m).map_err(|e| {
            invalid(
                "models",
                "invalid_pattern",
                format!(
                    "`models`: {:?} is not a valid glob pattern: {}.",
                    crate::error::truncate(m, 64),
                    e.kind()
                ),
            )
        })?;
    }
    Ok(models)
}

/// CIDR ranges or bare addresses, stored in canonical form (`10.0.0.0/8`,
/// `192.0.2.7/32`).
fn check_ips(ips: Vec<String>) -> Result<Vec<String>, ApiError> {
    check_list("allowed_ips", &ips)?;
    ips.iter()
        .map(|s| {
            parse_net(s.trim())
                .map(|n| n.trunc().to_string())
                .ok_or_else(|| {
                    invalid(
                        "allowed_ips",
                        "invalid_cidr",
                        format!(
                            "`allowed_ips`: {:?} is not an IP address or CIDR range.",
                            crate::error::truncate(s, 64)
                        ),
                    )
                })
        })
        .collect()
}

/// A JSON object of at most `MAX_METADATA_BYTES`, kept as sent, or null.
pub(super) fn metadata(f: &Fields) -> Result<Patch<String>, ApiError> {
    let Some(raw) = f.raw("metadata") else {
        return Ok(Patch::Absent);
    };
    let text = raw.get().trim();
    if text == "null" {
        return Ok(Patch::Null);
    }
    if !text.starts_with('{') {
        return Err(invalid(
            "metadata",
            "invalid_type",
            "`metadata` must be a JSON object or null.",
        ));
    }
    if text.len() > MAX_METADATA_BYTES {
        return Err(invalid(
            "metadata",
            "invalid_value",
            format!("`metadata` must be at most {MAX_METADATA_BYTES} bytes of JSON."),
        ));
    }
    Ok(Patch::Set(text.to_owned()))
}

/// A plan named in a body, or 400.
fn plan_of<'c>(ctx: &'c Ctx<'_>, plan: Option<&str>) -> Result<Option<&'c PlanConfig>, ApiError> {
    let Some(name) = plan else { return Ok(None) };
    ctx.config.plans.get(name).map(Some).ok_or_else(|| {
        invalid(
            "plan",
            "unknown_plan",
            format!(
                "There is no plan named {:?}.",
                crate::error::truncate(name, 64)
            ),
        )
    })
}

/// Absent → the plan's value; `Null`/`Set` as asked.
fn or_plan<T>(p: Patch<T>, plan: Option<T>) -> Option<T> {
    match p {
        Patch::Absent => plan,
        Patch::Null => None,
        Patch::Set(v) => Some(v),
    }
}

/// The record and limit of a new key from a validated spec, with the plan's
/// values for what the spec left out.
pub(crate) fn new_record(
    spec: KeySpec,
    plan: Option<&PlanConfig>,
    hash: KeyHash,
    label: String,
    now_ms: i64,
) -> Result<(KeyRecord, Option<Pico>), ApiError> {
    let p = plan.cloned().unwrap_or_default();
    let plan_expiry = p
        .expires_in
        .map(|d| now_ms.saturating_add(d.as_millis() as i64));
    let expires_at = or_plan(spec.expires_at, plan_expiry);
    if let Some(at) = expires_at
        && at <= now_ms
    {
        return Err(invalid(
            "expires_at",
            "invalid_date",
            "`expires_at` must be in the future.",
        ));
    }
    let vec_or_plan = |v: Patch<Vec<String>>, plan: Vec<String>| match v {
        Patch::Absent => plan,
        Patch::Null => Vec::new(),
        Patch::Set(v) => v,
    };
    let record = KeyRecord {
        hash,
        name: spec.name.unwrap_or_default(),
        label,
        owner: spec.owner,
        plan: spec.plan,
        disabled: spec.disabled.unwrap_or(false),
        created_at: now_ms,
        updated_at: now_ms,
        expires_at,
        limit_reset: or_plan(spec.limit_reset, p.limit_reset),
        max_requests: or_plan(spec.max_requests, p.max_requests),
        rpm: or_plan(spec.rpm, p.rpm),
        tpm: or_plan(spec.tpm, p.tpm),
        concurrency: or_plan(spec.concurrency, p.concurrency),
        models: vec_or_plan(spec.models, p.models),
        allowed_ips: vec_or_plan(
            spec.allowed_ips,
            p.allowed_ips
                .iter()
                .map(|n| n.trunc().to_string())
                .collect(),
        ),
        max_devices: or_plan(spec.max_devices, p.max_devices),
        devices: Vec::new(),
        daily_fee: or_plan(spec.daily_fee, p.daily_fee),
        metadata: spec.metadata.apply(None),
        imported: false,
        low_balance_alert: spec.low_balance_alert.apply(None),
    };
    Ok((record, or_plan(spec.limit, p.limit)))
}

/// Applies a validated patch to a record; returns the new limit when the
/// patch changes it.
pub(crate) fn apply_patch(spec: KeySpec, rec: &mut KeyRecord, now_ms: i64) -> Patch<Pico> {
    if let Some(n) = spec.name {
        rec.name = n;
    }
    if let Some(d) = spec.disabled {
        rec.disabled = d;
    }
    rec.limit_reset = spec.limit_reset.apply(rec.limit_reset);
    rec.expires_at = spec.expires_at.apply(rec.expires_at);
    rec.max_requests = spec.max_requests.apply(rec.max_requests);
    rec.rpm = spec.rpm.apply(rec.rpm);
    rec.tpm = spec.tpm.apply(rec.tpm);
    rec.concurrency = spec.concurrency.apply(rec.concurrency);
    rec.models = spec
        .models
        .apply(Some(std::mem::take(&mut rec.models)))
        .unwrap_or_default();
    rec.allowed_ips = spec
        .allowed_ips
        .apply(Some(std::mem::take(&mut rec.allowed_ips)))
        .unwrap_or_default();
    rec.max_devices = spec.max_devices.apply(rec.max_devices);
    rec.daily_fee = spec.daily_fee.apply(rec.daily_fee);
    rec.metadata = spec.metadata.apply(rec.metadata.take());
    rec.low_balance_alert = spec.low_balance_alert.apply(rec.low_balance_alert);
    rec.updated_at = now_ms;
    spec.limit
}

/// An owner's existing key of a `one_per_owner` plan → 409 naming it.
fn one_per_owner(ctx: &Ctx<'_>, owner: Option<&str>, plan_name: &str) -> Result<(), ApiError> {
    let Some(owner) = owner else {
        return Err(invalid(
            "owner",
            "owner_required",
            format!(
                "The plan {:?} allows one key per owner: `owner` is required.",
                crate::error::truncate(plan_name, 64)
            ),
        ));
    };
    if let Some(existing) = ctx
        .store
        .active_key_of(owner, plan_name)
        .map_err(store_error)?
    {
        return Err(ApiError::conflict(
            "key_exists",
            "This owner already has an active key of this plan.",
        )
        .with_metadata(serde_json::json!({ "hash": hex::encode(existing) })));
    }
    Ok(())
}

fn new_account(limit: Option<Pico>, rec: &KeyRecord, now_ms: i64) -> Account {
    Account {
        limit,
        spent: Pico::ZERO,
        period: rec.limit_reset.map(|p| p.id(now_ms)).unwrap_or(0),
        period_spent: Pico::ZERO,
        requests: 0,
        fee_day: -1,
        ledger_seq: 0,
    }
}

// ---- endpoints ----

/// `POST /api/v1/keys`
pub(super) async fn create(
    ctx: &Ctx<'_>,
    f: &Fields,
) -> Result<http::Response<crate::Body>, ApiError> {
    let spec = parse_spec(f, true)?;
    let now = ctx.clock.now_ms();
    let (record, account, key) = create_key(ctx, spec).await?;
    #[derive(Serialize)]
    struct Created<'a> {
        data: KeyView<'a>,
        /// The key itself: shown this once, never stored.
        key: &'a str,
    }
    let view = KeyView::new(ctx, &record, &Numbers::stored(&record, &account, now), now)?;
    super::json(
        StatusCode::CREATED,
        &Created {
            data: view,
            key: &key,
        },
    )
}

/// Creates a key from a validated spec: its record, account and the key
/// itself (to be shown once).
pub(super) async fn create_key(
    ctx: &Ctx<'_>,
    spec: KeySpec,
) -> Result<(KeyRecord, Account, String), ApiError> {
    let plan = plan_of(ctx, spec.plan.as_deref())?;
    let key = generate_key();
    let hash = hash_key(&key);
    let _write = admin_write_lock().await;
    let now = ctx.clock.now_ms();
    if let (Some(p), Some(name)) = (plan, spec.plan.as_deref())
        && p.one_per_owner
    {
        one_per_owner(ctx, spec.owner.as_deref(), name)?;
    }
    if let Some(owner) = spec.owner.as_deref() {
        super::accounts::owner_may_hold_keys(ctx, owner)?;
    }
    let (record, limit) = new_record(spec, plan, hash, label_of(&key), now)?;
    let account = new_account(limit, &record, now);
    ctx.store
        .create_key(record.clone(), account)
        .await
        .map_err(store_error)?;
    ctx.gate.created(&hash);
    super::cluster::key_changed(ctx, hash).await;
    tracing::info!(hash = %hex::encode(hash), plan = ?record.plan, "key created");
    Ok((record, account, key))
}

/// `GET /api/v1/keys?offset=&limit=&owner=&include_disabled=`, oldest
/// first; in cluster mode from the database (every node lists the same
/// keys, with the database's `usage`).
pub(super) async fn list(
    ctx: &Ctx<'_>,
    query: Option<&str>,
) -> Result<http::Response<crate::Body>, ApiError> {
    let pairs = super::query_pairs(query)?;
    let (offset, limit) = super::offset_limit(&pairs)?;
    let mut q = KeyQuery {
        offset,
        limit,
        owner: None,
        include_disabled: false,
    };
    for (k, v) in &pairs {
        match k.as_str() {
            "owner" => q.owner = Some(v.clone()),
            "include_disabled" => {
                q.include_disabled = match v.as_str() {
                    "true" | "1" => true,
                    "false" | "0" => false,
                    _ => {
                        return Err(invalid(
                            "include_disabled",
                            "invalid_query",
                            "`include_disabled` must be true or false.",
                        ));
                    }
                }
            }
            _ => {}
        }
    }
    let now = ctx.clock.now_ms();
    if let Some(listed) = super::cluster::listed_keys(ctx, &q).await? {
        return list_settled(ctx, &listed, now);
    }
    let rows = ctx.store.keys(&q).map_err(store_error)?;
    // Listing must not pull every key into the gate's memory: rows use the
    // stored account (at most `storage.flush_ms` behind the live numbers).
    let numbers: Vec<Numbers> = rows
        .iter()
        .map(|(rec, acct)| Numbers::stored(rec, acct, now))
        .collect();
    let views = rows
        .iter()
        .zip(&numbers)
        .map(|((rec, _), n)| KeyView::new(ctx, rec, n, now))
        .collect::<Result<Vec<_>, _>>()?;
    json(StatusCode::OK, &Data { data: views })
}

/// The cluster's key list: each key's record and settled numbers from the
/// database, its period's numbers from this node's store (as
/// [`get_settled`] has them from the gate; a key this node has not pulled
/// yet counts nothing in its period).
fn list_settled(
    ctx: &Ctx<'_>,
    listed: &[crate::cluster::lists::ListedKey],
    now: i64,
) -> Result<http::Response<crate::Body>, ApiError> {
    let numbers = listed
        .iter()
        .map(|k| {
            let acct = match ctx.store.key(&k.record.hash).map_err(store_error)? {
                Some((_, acct)) => acct,
                None => new_account(k.settled.limit, &k.record, now),
            };
            Ok(Numbers::stored(&k.record, &acct, now).settled(&k.record, &k.settled, now))
        })
        .collect::<Result<Vec<_>, ApiError>>()?;
    let views = listed
        .iter()
        .zip(&numbers)
        .map(|(k, n)| KeyView::new(ctx, &k.record, n, now))
        .collect::<Result<Vec<_>, _>>()?;
    json(StatusCode::OK, &Data { data: views })
}

/// `GET /api/v1/keys/{hash}`, with, in cluster mode, the key's `usage` as
/// settled in the database (the same on every node).
pub(super) fn get_settled(
    ctx: &Ctx<'_>,
    hash: &KeyHash,
    settled: Option<crate::cluster::SettledKey>,
) -> Result<http::Response<crate::Body>, ApiError> {
    let now = ctx.clock.now_ms();
    let live = ctx.gate.lookup(hash, now)?.ok_or_else(key_not_found)?;
    let policy = live.policy();
    let mut numbers = Numbers::live(&live);
    if let Some(s) = settled {
        numbers = numbers.settled(policy.own_record(), &s, now);
    }
    let view = KeyView::new(ctx, policy.own_record(), &numbers, now)?;
    json(StatusCode::OK, &Data { data: view })
}

/// `PATCH /api/v1/keys/{hash}`
pub(super) async fn patch(
    ctx: &Ctx<'_>,
    hash: KeyHash,
    f: &Fields,
) -> Result<http::Response<crate::Body>, ApiError> {
    let spec = parse_spec(f, false)?;
    let _write = admin_write_lock().await;
    let now = ctx.clock.now_ms();
    let live = ctx.gate.lookup(&hash, now)?.ok_or_else(key_not_found)?;
    // The live record is the freshest (it has device bindings the store
    // thread may not have applied yet).
    let mut record = live.policy().own_record().clone();
    let limit = apply_patch(spec, &mut record, now);
    ctx.store
        .update_key(record.clone())
        .await
        .map_err(store_error)?;
    ctx.gate.updated(record.clone());
    if let Patch::Set(_) | Patch::Null = limit {
        let new = limit.apply(None);
        if new != live.limit() {
            ctx.store.set_limit(hash, new).await.map_err(store_error)?;
            super::cluster::set_live_limit(ctx, &hash, new);
        }
    }
    super::cluster::key_changed(ctx, hash).await;
    tracing::info!(hash = %hex::encode(hash), "key updated");
    let view = KeyView::new(ctx, &record, &Numbers::live(&live), now)?;
    json(StatusCode::OK, &Data { data: view })
}

/// `DELETE /api/v1/keys/{hash}`
pub(super) async fn delete(
    ctx: &Ctx<'_>,
    hash: KeyHash,
) -> Result<http::Response<crate::Body>, ApiError> {
    let _write = admin_write_lock().await;
    let existed = ctx.store.delete_key(hash).await.map_err(store_error)?;
    ctx.gate.forget(&hash);
    if !existed {
        return Err(key_not_found());
    }
    super::cluster::key_changed(ctx, hash).await;
    tracing::info!(hash = %hex::encode(hash), "key deleted");
    #[derive(Serialize)]
    struct Deleted {
        deleted: bool,
    }
    json(StatusCode::OK, &Deleted { deleted: true })
}

/// An imported key: `import_prefix` followed by exactly `import_length`
/// characters of `[0-9A-Za-z]`.
pub(crate) fn check_import_key(key: &str, prefix: &str, length: usize) -> Result<(), ApiError> {
    let ok = key.strip_prefix(prefix).is_some_and(|rest| {
        rest.len() == length && rest.bytes().all(|b| b.is_ascii_alphanumeric())
    });
    if ok {
        return Ok(());
    }
    Err(invalid(
        "key",
        "invalid_key_format",
        format!("`key` must be {prefix:?} followed by exactly {length} letters or digits."),
    ))
}

/// `POST /api/v1/keys/import` `{key, owner, name?, plan?, unlimited?}`.
/// The same key for the same owner again is a no-op (200, same record);
/// for another owner, 409. Without a plan and without `unlimited`, the key
/// starts with a limit of 0: an imported key never gets unlimited credit by
/// omission.
pub(super) async fn import(
    ctx: &Ctx<'_>,
    f: &Fields,
) -> Result<http::Response<crate::Body>, ApiError> {
    f.only(IMPORT_FIELDS)?;
    let key: String = f.required("key", "a string")?;
    check_import_key(
        &key,
        &ctx.config.keys.import_prefix,
        ctx.config.keys.import_length,
    )?;
    let owner: String = f.required("owner", "a string")?;
    let name: Option<String> = f.opt("name", "a string")?;
    let plan_name: Option<String> = f.opt("plan", "a string")?;
    let unlimited: bool = f.opt("unlimited", "true or false")?.unwrap_or(false);
    let (rec, numbers, created) = import_key(ctx, &key, owner, name, plan_name, unlimited).await?;
    let now = ctx.clock.now_ms();
    let view = KeyView::new(ctx, &rec, &numbers, now)?;
    let status = if created {
        StatusCode::CREATED
    } else {
        StatusCode::OK
    };
    json(status, &Data { data: view })
}

/// Imports `key` (already checked against the import format) for `owner`:
/// the record, its numbers, and whether it was created now (`false`: the
/// same key was imported for the same owner before, nothing changed).
pub(super) async fn import_key(
    ctx: &Ctx<'_>,
    key: &str,
    owner: String,
    name: Option<String>,
    plan_name: Option<String>,
    unlimited: bool,
) -> Result<(KeyRecord, Numbers, bool), ApiError> {
    check_text("owner", &owner)?;
    if let Some(n) = &name {
        check_text("name", n)?;
    }
    let plan = plan_of(ctx, plan_name.as_deref())?;
    let hash = hash_key(key);
    let _write = admin_write_lock().await;
    let now = ctx.clock.now_ms();
    if let Some((rec, acct)) = ctx.store.key(&hash).map_err(store_error)? {
        if rec.owner.as_deref() != Some(owner.as_str()) {
            return Err(ApiError::conflict(
                "key_exists",
                "This key was already imported for another owner.",
            ));
        }
        let numbers = match ctx.gate.lookup(&hash, now)? {
            Some(live) => Numbers::live(&live),
            None => Numbers::stored(&rec, &acct, now),
        };
        return Ok((rec, numbers, false));
    }
    if let (Some(p), Some(pn)) = (plan, plan_name.as_deref())
        && p.one_per_owner
    {
        one_per_owner(ctx, Some(&owner), pn)?;
    }
    let spec = KeySpec {
        name: Some(name.unwrap_or_else(|| "imported".to_owned())),
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
        max_devices: Patch::Absent,
        daily_fee: Patch::Absent,
        metadata: Patch::Absent,
        plan: plan_name,
        owner: Some(owner),
        low_balance_alert: Patch::Absent,
    };
    let (mut record, plan_limit) = new_record(spec, plan, hash, label_of(key), now)?;
    record.imported = true;
    let limit = if unlimited {
        None
    } else if plan.is_some() {
        plan_limit
    } else {
        Some(Pico::ZERO)
    };
    let account = new_account(limit, &record, now);
    ctx.store
        .create_key(record.clone(), account)
        .await
        .map_err(store_error)?;
    ctx.gate.created(&hash);
    super::cluster::key_changed(ctx, hash).await;
    tracing::info!(hash = %hex::encode(hash), plan = ?record.plan, "key imported");
    let numbers = Numbers::stored(&record, &account, now);
    Ok((record, numbers, true))
}

// ---- the Key object ----

/// A key's money and counters as shown: live when the key is in memory,
/// else from the stored account.
#[derive(Clone, Debug)]
pub(crate) struct Numbers {
    pub limit: Option<Pico>,
    /// What counts against the limit in the current period.
    pub period_spent: Pico,
    /// Lifetime.
    pub spent: Pico,
    pub requests: u64,
    pub in_flight: u32,
    /// `limit − period_spent − reserved`, not below 0; None = unlimited.
    pub remaining: Option<Pico>,
}

impl Numbers {
    pub fn live(key: &LiveKey) -> Numbers {
        let n = key.numbers();
        Numbers {
            limit: n.limit,
            period_spent: n.period_spent,
            spent: n.spent,
            requests: n.requests,
            in_flight: n.in_flight,
            remaining: n.remaining,
        }
    }

    /// With the database's settled numbers (cluster mode): its lifetime
    /// `usage`, the database's limit (a node's live limit may be a lease
    /// counter) and what counts against it at `now_ms` (lifetime, or in
    /// the period of its `limit_reset`), and what remains of it.
    pub fn settled(
        mut self,
        rec: &KeyRecord,
        s: &crate::cluster::SettledKey,
        now_ms: i64,
    ) -> Numbers {
        self.spent = s.usage;
        let counted = s.counted(rec.limit_reset, now_ms);
        self.limit = s.limit;
        self.period_spent = counted;
        self.remaining = s.limit.map(|l| Pico(l.0.saturating_sub(counted.0).max(0)));
        self
    }

    /// From the stored account; a period that has ended counts as 0, as the
    /// gate would count it on the key's next request.
    pub fn stored(rec: &KeyRecord, acct: &Account, now_ms: i64) -> Numbers {
        let period_spent = match rec.limit_reset {
            Some(p) if p.id(now_ms) != acct.period => Pico::ZERO,
            _ => acct.period_spent,
        };
        Numbers {
            limit: acct.limit,
            period_spent,
            spent: acct.spent,
            requests: acct.requests,
            in_flight: 0,
            remaining: acct
                .limit
                .map(|l| Pico(l.0.saturating_sub(period_spent.0).max(0))),
        }
    }
}

/// The `Key` object of the provisioning API: OpenRouter's names plus
/// Tollgate's.
#[derive(Serialize)]
pub(crate) struct KeyView<'a> {
    hash: String,
    /// `active`, `disabled`, `expired` or `exhausted`, computed now (a
    /// provisioning client's sweeper reads it).
    status: &'static str,
    name: &'a str,
    label: &'a str,
    owner: Option<&'a str>,
    plan: Option<&'a str>,
    disabled: bool,
    imported: bool,
    created_at: String,
    updated_at: String,
    expires_at: Option<String>,
    limit: Option<Pico>,
    limit_reset: Option<&'static str>,
    limit_remaining: Option<Pico>,
    usage: Pico,
    usage_daily: Pico,
    usage_weekly: Pico,
    usage_monthly: Pico,
    max_requests: Option<u64>,
    requests: u64,
    rpm: Option<u32>,
    tpm: Option<u64>,
    concurrency: Option<u32>,
    in_flight: u32,
    models: &'a [String],
    allowed_ips: &'a [String],
    max_devices: Option<u32>,
    devices: &'a [String],
    daily_fee: Option<Pico>,
    metadata: Option<Box<RawValue>>,
    low_balance_alert: Option<Pico>,
}

impl<'a> KeyView<'a> {
    pub fn new(
        ctx: &Ctx<'_>,
        rec: &'a KeyRecord,
        n: &Numbers,
        now_ms: i64,
    ) -> Result<KeyView<'a>, ApiError> {
        let w = windows_of(ctx, rec, n, now_ms)?;
        Ok(KeyView {
            hash: hex::encode(rec.hash),
            status: super::compat::openrouter::key_status(rec, n.remaining, n.requests, now_ms),
            name: &rec.name,
            label: &rec.label,
            owner: rec.owner.as_deref(),
            plan: rec.plan.as_deref(),
            disabled: rec.disabled,
            imported: rec.imported,
            created_at: rfc3339(rec.created_at),
            updated_at: rfc3339(rec.updated_at),
            expires_at: rec.expires_at.map(rfc3339),
            limit: n.limit,
            limit_reset: rec.limit_reset.map(Period::as_str),
            limit_remaining: n.remaining,
            usage: n.spent,
            usage_daily: w.daily,
            usage_weekly: w.weekly,
            usage_monthly: w.monthly,
            max_requests: rec.max_requests,
            requests: n.requests,
            rpm: rec.rpm,
            tpm: rec.tpm,
            concurrency: rec.concurrency,
            in_flight: n.in_flight,
            models: &rec.models,
            allowed_ips: &rec.allowed_ips,
            max_devices: rec.max_devices,
            devices: &rec.devices,
            daily_fee: rec.daily_fee,
            metadata: metadata_json(rec.metadata.as_deref()),
            low_balance_alert: rec.low_balance_alert,
        })
    }
}

/// Stored metadata text as raw JSON (kept as the caller sent it).
pub(crate) fn metadata_json(text: Option<&str>) -> Option<Box<RawValue>> {
    RawValue::from_string(text?.to_owned()).ok()
}

// ---- usage windows ----

/// What a key spent in the current UTC day, ISO week and month.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) struct UsageWindows {
    pub daily: Pico,
    pub weekly: Pico,
    pub monthly: Pico,
}

/// The `usage_daily`, `usage_weekly` and `usage_monthly` of a key.
///
/// For the period that is the key's own `limit_reset`, the gate's live
/// `period_spent` (exact, includes everything charged). For the others:
/// the key's hourly rollups since the period started (usage records, at
/// most `storage.flush_ms` behind) plus its ledger's deducts and daily fees
/// minus refunds in that time.
pub(crate) fn windows_of(
    ctx: &Ctx<'_>,
    rec: &KeyRecord,
    n: &Numbers,
    now_ms: i64,
) -> Result<UsageWindows, ApiError> {
    let periods = [Period::Daily, Period::Weekly, Period::Monthly];
    let starts = periods.map(|p| p.start_ms(now_ms));
    let mut sums = [0i64; 3];
    let from = starts.iter().copied().min().unwrap_or(now_ms);
    let to_hour = now_ms.div_euclid(HOUR_MS) + 1;
    let rollups = ctx
        .store
        .rollups(
            RollupScope::Key(rec.hash),
            from.div_euclid(HOUR_MS),
            to_hour,
        )
        .map_err(super::store_error)?;
    for (hour, _model, r) in rollups {
        for (sum, start) in sums.iter_mut().zip(starts) {
            if hour * HOUR_MS >= start {
                *sum = sum.saturating_add(r.cost.0);
            }
        }
    }
    // Ledger entries newest first, until before the earliest window.
    let mut offset = 0;
    'pages: loop {
        let page = ctx
            .store
            .ledger(&rec.hash, offset, 200)
            .map_err(super::store_error)?;
        if page.is_empty() {
            break;
        }
        offset += page.len();
        for e in page {
            if e.at_ms < from {
                break 'pages;
            }
            let signed = match e.kind {
                LedgerKind::Deduct | LedgerKind::DailyFee => e.amount.0,
                LedgerKind::Refund => -e.amount.0,
                LedgerKind::Topup => 0,
            };
            for (sum, start) in sums.iter_mut().zip(starts) {
                if e.at_ms >= start {
                    *sum = sum.saturating_add(signed);
                }
            }
        }
    }
    let mut out = sums.map(|s| Pico(s.max(0)));
    if let Some(reset) = rec.limit_reset
        && let Some(i) = periods.iter().position(|p| *p == reset)
    {
        out[i] = n.period_spent;
    }
    Ok(UsageWindows {
        daily: out[0],
        weekly: out[1],
        monthly: out[2],
    })
}
