//! The `data` of events and the summaries of audit entries: the objects'
//! API shapes built from what the store holds. Never a key, never a secret
//! (a key is stored only as its hash; accounts hold none).

use serde::Serialize;
use serde_json::Value;

use crate::clock::{Period, rfc3339};
use crate::money::Pico;
use crate::store::{
    Account, AccountLedgerEntry, AccountRecord, AccountStatus, KeyRecord, LedgerEntry, LedgerKind,
};

/// The `Key` object of `/api/v1/keys` as far as the store knows it (the
/// windowed `usage_daily…` need the rollups and are left out).
#[derive(Serialize)]
struct KeyData<'a> {
    hash: String,
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
    max_requests: Option<u64>,
    requests: u64,
    rpm: Option<u32>,
    tpm: Option<u64>,
    concurrency: Option<u32>,
    models: &'a [String],
    daily_fee: Option<Pico>,
    metadata: Option<Box<serde_json::value::RawValue>>,
    low_balance_alert: Option<Pico>,
}

/// A key's API shape (`data` of `key.*` events).
pub fn key(rec: &KeyRecord, acct: &Account) -> Value {
    let remaining = acct
        .limit
        .map(|l| Pico(l.0.saturating_sub(acct.period_spent.0).max(0)));
    to_value(&KeyData {
        hash: hex::encode(rec.hash),
        name: &rec.name,
        label: &rec.label,
        owner: rec.owner.as_deref(),
        plan: rec.plan.as_deref(),
        disabled: rec.disabled,
        imported: rec.imported,
        created_at: rfc3339(rec.created_at),
        updated_at: rfc3339(rec.updated_at),
        expires_at: rec.expires_at.map(rfc3339),
        limit: acct.limit,
        limit_reset: rec.limit_reset.map(Period::as_str),
        limit_remaining: remaining,
        usage: acct.spent,
        max_requests: rec.max_requests,
        requests: acct.requests,
        rpm: rec.rpm,
        tpm: rec.tpm,
        concurrency: rec.concurrency,
        models: &rec.models,
        daily_fee: rec.daily_fee,
        metadata: rec
            .metadata
            .as_deref()
            .and_then(|m| serde_json::value::RawValue::from_string(m.to_owned()).ok()),
        low_balance_alert: rec.low_balance_alert,
    })
}

#[derive(Serialize)]
struct AccountData<'a> {
    id: &'a str,
    email: Option<&'a str>,
    name: Option<&'a str>,
    status: AccountStatus,
    balance: Pico,
    allowance: Pico,
    overdraft: Pico,
    unlimited: bool,
    low_balance_alert: Option<Pico>,
    spent: Pico,
    created_at: String,
    updated_at: String,
    metadata: Option<Box<serde_json::value::RawValue>>,
}

/// An account's API shape (`data` of `account.*` events).
pub fn account(a: &AccountRecord) -> Value {
    to_value(&AccountData {
        id: &a.id,
        email: a.email.as_deref(),
        name: a.name.as_deref(),
        status: a.status,
        balance: a.balance,
        allowance: a.allowance,
        overdraft: a.overdraft,
        unlimited: a.unlimited,
        low_balance_alert: a.low_balance_alert,
        spent: a.spent,
        created_at: rfc3339(a.created_at),
        updated_at: rfc3339(a.updated_at),
        metadata: a
            .metadata
            .as_deref()
            .and_then(|m| serde_json::value::RawValue::from_string(m.to_owned()).ok()),
    })
}

fn kind_name(k: LedgerKind) -> &'static str {
    match k {
        LedgerKind::Topup => "topup",
        LedgerKind::Deduct => "deduct",
        LedgerKind::Refund => "refund",
        LedgerKind::DailyFee => "daily_fee",
    }
}

/// `credit.applied` for a key's ledger entry.
pub fn key_credit(rec: Option<&KeyRecord>, acct: &Account, e: &LedgerEntry, hash: &str) -> Value {
    serde_json::json!({
        "key": hash,
        "owner": rec.and_then(|r| r.owner.as_deref()),
        "seq": e.seq,
        "kind": kind_name(e.kind),
        "amount": e.amount,
        "reason": e.reason,
        "created_at": rfc3339(e.at_ms),
        "limit": acct.limit,
        "usage": acct.spent,
    })
}

/// `credit.applied` for an account's ledger entry.
pub fn account_credit(a: &AccountRecord, e: &AccountLedgerEntry) -> Value {
    serde_json::json!({
        "account": a.id,
        "email": a.email,
        "seq": e.seq,
        "kind": e.kind,
        "amount": e.amount,
        "reason": e.reason,
        "created_at": rfc3339(e.at_ms),
        "balance": a.balance,
        "allowance": a.allowance,
    })
}

fn to_value<T: Serialize>(v: &T) -> Value {
    // Serializing these plain structs cannot fail (no maps with non-string
    // keys, no custom errors); Null would only hide a bug, never a secret.
    serde_json::to_value(v).unwrap_or(Value::Null)
}
