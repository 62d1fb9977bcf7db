//! Accounts: `POST/GET /api/v1/accounts`, `GET/PATCH/DELETE
//! /api/v1/accounts/{id}`, `POST /api/v1/accounts/{id}/credits`,
//! `GET /api/v1/accounts/{id}/ledger`.
//!
//! An account is the wallet of every key whose `owner` is its id (see
//! `crate::billing`). Writes go to the store first; the live wallet
//! follows only when the store applied something new.

use http::StatusCode;
use serde::Serialize;

use super::keys::{MAX_AMOUNT, amount, metadata, parse_usd};
use super::{Ctx, Data, Fields, Patch, admin_write_lock, invalid, json, store_error};
use crate::clock::rfc3339;
use crate::error::ApiError;
use crate::money::Pico;
use crate::store::{
    AccountCreditKind, AccountCreditOp, AccountLedgerEntry, AccountRecord, AccountStatus,
    StoreError,
};

type Answer = Result<http::Response<crate::Body>, ApiError>;

const CREATE_FIELDS: &[&str] = &[
    "id",
    "email",
    "name",
    "overdraft",
    "unlimited",
    "low_balance_alert",
    "metadata",
];
const PATCH_FIELDS: &[&str] = &[
    "email",
    "name",
    "overdraft",
    "unlimited",
    "low_balance_alert",
    "metadata",
    "status",
];
const MAX_ID_CHARS: usize = 128;
const MAX_TEXT_CHARS: usize = 256;

fn not_found() -> ApiError {
    ApiError::not_found("No account with this id.").with_param("id")
}

fn account_error(e: StoreError) -> ApiError {
    match e {
        StoreError::NotFound => not_found(),
        StoreError::Exists => ApiError::conflict("account_exists", "This account already exists."),
        StoreError::Insufficient => ApiError::insufficient_quota(
            "insufficient_quota",
            "The account has not enough funds; nothing was deducted.",
            "account",
        ),
        other => store_error(other),
    }
}

/// An account id from a path segment or a body: 1 to 128 visible ASCII
/// characters other than `/`.
pub(super) fn valid_id(id: &str) -> Result<(), ApiError> {
    if id.is_empty()
        || id.len() > MAX_ID_CHARS
        || !id.bytes().all(|b| b.is_ascii_graphic() && b != b'/')
    {
        return Err(invalid(
            "id",
            "invalid_value",
            format!("`id` must be 1 to {MAX_ID_CHARS} visible ASCII characters, without `/`."),
        ));
    }
    Ok(())
}

fn text(f: &Fields, name: &'static str) -> Result<Patch<String>, ApiError> {
    let p: Patch<String> = f.patch(name, "a string")?;
    if let Patch::Set(s) = &p
        && (s.chars().count() > MAX_TEXT_CHARS || s.chars().any(char::is_control))
    {
        return Err(invalid(
            name,
            "invalid_value",
            format!("`{name}` must be at most {MAX_TEXT_CHARS} characters, no control characters."),
        ));
    }
    Ok(p)
}

#[derive(Serialize)]
struct Spent {
    period: Pico,
    total: Pico,
}

/// An account as answered.
#[derive(Serialize)]
struct AccountView<'a> {
    id: &'a str,
    email: Option<&'a str>,
    name: Option<&'a str>,
    status: AccountStatus,
    balance: Pico,
    allowance: Pico,
    reserved: Pico,
    overdraft: Pico,
    unlimited: bool,
    low_balance_alert: Option<Pico>,
    spent: Spent,
    keys: usize,
    subscription: Option<super::subscriptions::SubscriptionSummary>,
    metadata: Option<Box<serde_json::value::RawValue>>,
    created_at: String,
    updated_at: String,
}

fn view<'a>(ctx: &Ctx<'_>, a: &'a AccountRecord) -> Result<AccountView<'a>, ApiError> {
    let keys = ctx.store.owner_keys(&a.id).map_err(store_error)?.len();
    view_with(ctx, a, keys)
}

/// [`view`] with the number of keys known.
fn view_with<'a>(
    ctx: &Ctx<'_>,
    a: &'a AccountRecord,
    keys: usize,
) -> Result<AccountView<'a>, ApiError> {
    // The live wallet has what the store has not yet committed.
    let (balance, allowance, reserved, spent, period) = match ctx.gate.wallets().peek(&a.id) {
        Some(live) => {
            let n = live.numbers();
            (n.balance, n.allowance, n.reserved, n.spent, n.period_spent)
        }
        None => (a.balance, a.allowance, Pico::ZERO, a.spent, a.period_spent),
    };
    Ok(AccountView {
        id: &a.id,
        email: a.email.as_deref(),
        name: a.name.as_deref(),
        status: a.status,
        balance,
        allowance,
        reserved,
        overdraft: a.overdraft,
        unlimited: a.unlimited,
        low_balance_alert: a.low_balance_alert,
        spent: Spent {
            period,
            total: spent,
        },
        keys,
        subscription: match &a.subscription {
            Some(l) => super::subscriptions::summary(ctx, &l.id)?,
            None => None,
        },
        metadata: a
            .metadata
            .as_deref()
            .and_then(|m| serde_json::value::RawValue::from_string(m.to_owned()).ok()),
        created_at: rfc3339(a.created_at),
        updated_at: rfc3339(a.updated_at),
    })
}

fn answer(ctx: &Ctx<'_>, status: StatusCode, a: &AccountRecord) -> Answer {
    json(
        status,
        &Data {
            data: view(ctx, a)?,
        },
    )
}

/// `POST /api/v1/accounts` → 201.
pub(super) async fn create(ctx: &Ctx<'_>, f: &Fields) -> Answer {
    f.only(CREATE_FIELDS)?;
    let id: String = f.required("id", "a string")?;
    valid_id(&id)?;
    let now = ctx.clock.now_ms();
    let a = AccountRecord {
        id,
        email: text(f, "email")?.apply(None),
        name: text(f, "name")?.apply(None),
        overdraft: amount(f, "overdraft")?.apply(None).unwrap_or(Pico::ZERO),
        unlimited: f.opt("unlimited", "a boolean")?.unwrap_or(false),
        low_balance_alert: amount(f, "low_balance_alert")?.apply(None),
        metadata: metadata(f)?.apply(None),
        status: AccountStatus::Active,
        created_at: now,
        updated_at: now,
        period: crate::clock::Period::Monthly.id(now),
        ..AccountRecord::default()
    };
    let _guard = admin_write_lock().await;
    ctx.store
        .create_user_account(a.clone())
        .await
        .map_err(account_error)?;
    // Keys of this owner that cached "no account" attach now.
    ctx.gate.wallets().reset(&a.id);
    super::cluster::account_changed(ctx, &a.id).await;
    answer(ctx, StatusCode::CREATED, &a)
}

/// A key may be attached to an account (its `owner`) unless the account is closed.
pub(super) fn owner_may_hold_keys(ctx: &Ctx<'_>, owner: &str) -> Result<(), ApiError> {
    match ctx.store.user_account(owner).map_err(store_error)? {
        Some(a) if a.status == AccountStatus::Closed => Err(invalid(
            "owner",
            "account_closed",
            "The account named by `owner` is closed; no key can be attached to it.",
        )),
        _ => Ok(()),
    }
}

fn get_record(ctx: &Ctx<'_>, id: &str) -> Result<AccountRecord, ApiError> {
    valid_id(id)?;
    ctx.store
        .user_account(id)
        .map_err(store_error)?
        .ok_or_else(not_found)
}

/// `GET /api/v1/accounts/{id}`, with, in cluster mode, the balance,
/// allowance and spent as settled in the database (the same on every node).
pub(super) fn get_settled(
    ctx: &Ctx<'_>,
    id: &str,
    settled: Option<crate::cluster::SettledAccount>,
) -> Answer {
    let a = get_record(ctx, id)?;
    let mut v = view(ctx, &a)?;
    if let Some(s) = settled {
        v.settle(s);
    }
    json(StatusCode::OK, &Data { data: v })
}

impl AccountView<'_> {
    /// The money as settled in the database (cluster mode).
    fn settle(&mut self, s: crate::cluster::SettledAccount) {
        self.balance = s.balance;
        self.allowance = s.allowance;
        self.spent.total = s.spent;
        self.reserved = s.leased;
    }
}

/// `GET /api/v1/accounts?offset=&limit=&email=`, in id order; in cluster
/// mode from the database (every node lists the same accounts, with the
/// database's money and key counts).
pub(super) async fn list(ctx: &Ctx<'_>, query: Option<&str>) -> Answer {
    let pairs = super::query_pairs(query)?;
    let (offset, limit) = super::offset_limit(&pairs)?;
    let email = pairs
        .iter()
        .find(|(k, _)| k == "email")
        .map(|(_, v)| v.as_str());
    if let Some(listed) = super::cluster::listed_accounts(ctx, offset, limit, email).await? {
        return list_settled(ctx, listed);
    }
    let all = ctx
        .store
        .user_accounts(offset, limit, email)
        .map_err(store_error)?;
    let views = all
        .iter()
        .map(|a| view(ctx, a))
        .collect::<Result<Vec<_>, _>>()?;
    json(StatusCode::OK, &Data { data: views })
}

/// The cluster's account list: each profile from the database, over this
/// node's record when it has one (its period's spend and subscription,
/// as [`get_settled`] shows them), with the database's money.
fn list_settled(ctx: &Ctx<'_>, listed: Vec<crate::cluster::lists::ListedAccount>) -> Answer {
    let mut records = Vec::with_capacity(listed.len());
    for l in listed {
        let record = match ctx.store.user_account(&l.record.id).map_err(store_error)? {
            Some(mut local) => {
                crate::cluster::sync::take_profile(&mut local, l.record);
                local
            }
            None => l.record,
        };
        records.push((record, l.settled, l.keys));
    }
    let views = records
        .iter()
        .map(|(a, settled, keys)| {
            let mut v = view_with(ctx, a, *keys)?;
            v.settle(*settled);
            Ok(v)
        })
        .collect::<Result<Vec<_>, ApiError>>()?;
    json(StatusCode::OK, &Data { data: views })
}

/// `PATCH /api/v1/accounts/{id}`: profile fields and `status`.
pub(super) async fn patch(ctx: &Ctx<'_>, id: &str, f: &Fields) -> Answer {
    valid_id(id)?;
    f.only(PATCH_FIELDS)?;
    let email = text(f, "email")?;
    let name = text(f, "name")?;
    let overdraft = amount(f, "overdraft")?;
    let unlimited: Option<bool> = f.opt("unlimited", "a boolean")?;
    let alert = amount(f, "low_balance_alert")?;
    let meta = metadata(f)?;
    let status: Option<AccountStatus> =
        f.opt("status", "\"active\", \"suspended\" or \"closed\"")?;
    let now = ctx.clock.now_ms();
    let _guard = admin_write_lock().await;
    let a = ctx
        .store
        .update_user_account(id, move |a| {
            a.email = email.apply(a.email.take());
            a.name = name.apply(a.name.take());
            a.overdraft = overdraft.apply(Some(a.overdraft)).unwrap_or(Pico::ZERO);
            a.unlimited = unlimited.unwrap_or(a.unlimited);
            a.low_balance_alert = alert.apply(a.low_balance_alert);
            a.metadata = meta.apply(a.metadata.take());
            a.status = status.unwrap_or(a.status);
            a.updated_at = now;
            Ok(())
        })
        .await
        .map_err(account_error)?;
    ctx.gate.wallets().changed(id, |live| live.profile(&a));
    super::cluster::account_changed(ctx, id).await;
    answer(ctx, StatusCode::OK, &a)
}

/// `DELETE /api/v1/accounts/{id}[?force=true]`: refused (409) while the
/// account has keys; `force` disables them first. The ledger stays.
pub(super) async fn delete(ctx: &Ctx<'_>, id: &str, query: Option<&str>) -> Answer {
    valid_id(id)?;
    let pairs = super::query_pairs(query)?;
    let force = pairs.iter().any(|(k, v)| k == "force" && v == "true");
    let _guard = admin_write_lock().await;
    let Some(acct) = ctx.store.user_account(id).map_err(store_error)? else {
        return Err(not_found());
    };
    let live_sub = acct
        .subscription
        .as_ref()
        .filter(|l| l.status.is_live())
        .map(|l| l.id.clone());
    if live_sub.is_some() && !force {
        return Err(ApiError::conflict(
            "account_has_subscription",
            "The account has a live subscription; cancel it, or pass ?force=true.",
        ));
    }
    let keys = ctx.store.owner_keys(id).map_err(store_error)?;
    let live_keys = keys.iter().filter(|(_, disabled)| !disabled).count();
    if live_keys > 0 && !force {
        return Err(ApiError::conflict(
            "account_has_keys",
            format!(
                "The account has {live_keys} enabled keys; delete or disable them, or pass ?force=true."
            ),
        ));
    }
    let now = ctx.clock.now_ms();
    for (hash, disabled) in keys {
        if disabled {
            continue;
        }
        if let Some((mut rec, _)) = ctx.store.key(&hash).map_err(store_error)? {
            rec.disabled = true;
            rec.updated_at = now;
            ctx.store
                .update_key(rec.clone())
                .await
                .map_err(store_error)?;
            ctx.gate.updated(rec);
            super::cluster::key_changed(ctx, hash).await;
        }
    }
    if let Some(sid) = live_sub {
        super::subscriptions::billing(ctx)
            .cancel(&sid, false)
            .await?;
    }
    ctx.store
        .delete_user_account(id)
        .await
        .map_err(store_error)?;
    ctx.gate.wallets().reset(id);
    super::cluster::account_changed(ctx, id).await;
    json(
        StatusCode::OK,
        &Data {
            data: serde_json::json!({"id": id, "deleted": true}),
        },
    )
}

#[derive(Serialize)]
struct EntryView<'a> {
    seq: u64,
    at: String,
    kind: AccountCreditKind,
    amount: Pico,
    reason: &'a str,
    idempotency_key: Option<&'a str>,
    balance_after: Pico,
    spent_after: Pico,
    allowance_after: Pico,
    /// Cluster mode: the node that applied the entry (`seq` is its).
    #[serde(skip_serializing_if = "Option::is_none")]
    node: Option<&'a str>,
}

impl<'a> EntryView<'a> {
    fn new(e: &'a AccountLedgerEntry) -> EntryView<'a> {
        EntryView {
            node: None,
            seq: e.seq,
            at: rfc3339(e.at_ms),
            kind: e.kind,
            amount: e.amount,
            reason: &e.reason,
            idempotency_key: e.idempotency_key.as_deref(),
            balance_after: e.balance_after,
            spent_after: e.spent_after,
            allowance_after: e.allowance_after,
        }
    }
}

/// `POST /api/v1/accounts/{id}/credits` `{amount, kind, reason, idempotency_key}`.
pub(super) async fn credit(ctx: &Ctx<'_>, id: &str, f: &Fields) -> Answer {
    valid_id(id)?;
    f.only(&["amount", "kind", "reason", "idempotency_key"])?;
    let kind_text: String =
        f.required("kind", "\"topup\", \"deduct\", \"refund\" or \"adjust\"")?;
    let kind = match kind_text.as_str() {
        "topup" => AccountCreditKind::Topup,
        "deduct" => AccountCreditKind::Deduct,
        "refund" => AccountCreditKind::Refund,
        "adjust" => AccountCreditKind::Adjust,
        _ => {
            return Err(invalid(
                "kind",
                "invalid_value",
                "`kind` must be \"topup\", \"deduct\", \"refund\" or \"adjust\".",
            ));
        }
    };
    let Some(raw) = f.raw("amount") else {
        return Err(invalid(
            "amount",
            "missing_field",
            "The field `amount` is required.",
        ));
    };
    let amount = parse_usd(raw, "amount")?;
    let negative_ok = kind == AccountCreditKind::Adjust;
    if amount.0 == 0 || (amount.0 < 0 && !negative_ok) || Pico(amount.0.abs()) > MAX_AMOUNT {
        return Err(invalid(
            "amount",
            "invalid_amount",
            format!(
                "`amount` must be greater than 0 and at most {MAX_AMOUNT} USD (an adjust may be negative)."
            ),
        ));
    }
    let reason: String = f.required("reason", "a string")?;
    if reason.chars().count() > 1024 {
        return Err(invalid(
            "reason",
            "invalid_value",
            "`reason` must be at most 1024 characters.",
        ));
    }
    let idempotency_key: Option<String> = f.opt("idempotency_key", "a string")?;
    if let Some(k) = &idempotency_key
        && (k.is_empty() || k.chars().count() > 256)
    {
        return Err(invalid(
            "idempotency_key",
            "invalid_value",
            "`idempotency_key` must be 1 to 256 characters.",
        ));
    }
    let now = ctx.clock.now_ms();
    let _guard = admin_write_lock().await;
    // Money taken out is held on the live wallet first, so that requests
    // in flight and the deduct never overspend together.
    let taking = match kind {
        AccountCreditKind::Deduct => amount.0,
        AccountCreditKind::Adjust if amount.0 < 0 => -amount.0,
        _ => 0,
    };
    let mut hold = None;
    if taking > 0 {
        super::cluster::lease_for_deduct(ctx, id, taking).await?;
        let live = ctx.gate.wallets().of(id, now)?.ok_or_else(not_found)?;
        if live.try_reserve(taking).is_err() {
            // A replay of one that succeeded answers as the first time.
            if let Some(idem) = &idempotency_key
                && let Some(e) = find_idem(ctx, id, idem)?
            {
                let a = get_record(ctx, id)?;
                return credit_answer(ctx, &a, &e, true);
            }
            return Err(account_error(StoreError::Insufficient));
        }
        hold = Some(crate::billing::AccountHold {
            account: live,
            amount: taking,
            at_ms: now,
        });
    }
    let op = AccountCreditOp {
        kind,
        amount,
        reason,
        idempotency_key,
        at_ms: now,
    };
    let out = ctx
        .store
        .credit_user_account(id, op)
        .await
        .map_err(account_error)?;
    if out.replayed {
        drop(hold);
        if out.entry.kind != kind || out.entry.amount != amount {
            return Err(ApiError::conflict(
                "idempotency_key_reused",
                "This idempotency key was used for another credit; nothing was changed.",
            )
            .with_param("idempotency_key"));
        }
    } else {
        match (kind, hold) {
            (AccountCreditKind::Deduct, Some(h)) => h.settle(amount.0),
            (AccountCreditKind::Adjust, Some(mut h)) => {
                // The hold becomes the lower balance itself.
                h.amount = 0;
                ctx.gate
                    .wallets()
                    .changed(id, |live| live.credited(amount.0, 0, now));
                live_fix_headroom(&h, amount.0);
            }
            (AccountCreditKind::Refund, _) => ctx
                .gate
                .wallets()
                .changed(id, |live| live.credited(amount.0, -amount.0, now)),
            _ => ctx
                .gate
                .wallets()
                .changed(id, |live| live.credited(amount.0, 0, now)),
        }
    }
    if !out.replayed {
        super::cluster::account_credited(ctx, id, &out.entry).await;
    }
    credit_answer(ctx, &out.account, &out.entry, out.replayed)
}

/// A negative adjust was held (headroom − x) and then applied as a
/// balance change (headroom − x again): give the hold back once.
fn live_fix_headroom(h: &crate::billing::AccountHold, amount: i64) {
    // A lease (cluster mode) is not moved by the balance change: the hold
    // stays taken from it, and the cluster settles it as a charge.
    if !h.account.is_leased() {
        h.account.release(-amount);
    }
}

fn find_idem(ctx: &Ctx<'_>, id: &str, idem: &str) -> Result<Option<AccountLedgerEntry>, ApiError> {
    let mut offset = 0;
    loop {
        let page = ctx
            .store
            .account_ledger(id, offset, 500)
            .map_err(store_error)?;
        if page.is_empty() {
            return Ok(None);
        }
        offset += page.len();
        if let Some(e) = page
            .into_iter()
            .find(|e| e.idempotency_key.as_deref() == Some(idem))
        {
            return Ok(Some(e));
        }
    }
}

#[derive(Serialize)]
struct CreditView<'a> {
    entry: EntryView<'a>,
    account: AccountView<'a>,
    replayed: bool,
}

fn credit_answer(
    ctx: &Ctx<'_>,
    a: &AccountRecord,
    e: &AccountLedgerEntry,
    replayed: bool,
) -> Answer {
    json(
        StatusCode::OK,
        &Data {
            data: CreditView {
                entry: EntryView::new(e),
                account: view(ctx, a)?,
                replayed,
            },
        },
    )
}

/// `GET /api/v1/accounts/{id}/ledger?offset=&limit=`, newest first. In
/// cluster mode: every node's entries, from the database.
pub(super) async fn ledger(ctx: &Ctx<'_>, id: &str, query: Option<&str>) -> Answer {
    valid_id(id)?;
    let pairs = super::query_pairs(query)?;
    let (offset, limit) = super::offset_limit(&pairs)?;
    if let Some(c) = super::cluster::of(ctx) {
        let entries = c.account_ledger(id, offset, limit).await?;
        if entries.is_empty()
            && ctx.store.user_account(id).map_err(store_error)?.is_none()
            && !c.account_known(id).await?
        {
            return Err(not_found());
        }
        let views: Vec<EntryView<'_>> = entries
            .iter()
            .map(|(node, e)| EntryView {
                node: Some(node),
                ..EntryView::new(e)
            })
            .collect();
        return json(StatusCode::OK, &Data { data: views });
    }
    let entries = ctx
        .store
        .account_ledger(id, offset, limit)
        .map_err(store_error)?;
    if entries.is_empty() && ctx.store.user_account(id).map_err(store_error)?.is_none() {
        return Err(not_found());
    }
    let views: Vec<EntryView<'_>> = entries.iter().map(EntryView::new).collect();
    json(StatusCode::OK, &Data { data: views })
}
