//! The admin API's seams to `crate::cluster` (cluster mode only): each
//! committed admin write is handed on to the database, and what the API
//! reports of money comes from there, so that every node says the same.
//! Without `[cluster]` each of these is one `OnceLock` read.

use std::sync::Arc;

use super::Ctx;
use crate::cluster::sync::Change;
use crate::cluster::{Charge, Cluster};
use crate::error::ApiError;
use crate::store::{AccountCreditKind, AccountLedgerEntry, KeyHash};

/// The node's cluster link, in cluster mode.
pub(super) fn of<'a>(ctx: &Ctx<'a>) -> Option<&'a Arc<Cluster>> {
    ctx.app.and_then(|a| a.cluster.get())
}

/// A key's record or limit changed (or it was deleted) in the local store.
pub(super) async fn key_changed(ctx: &Ctx<'_>, hash: KeyHash) {
    if let Some(c) = of(ctx) {
        c.publish(Change::Key(hash)).await;
    }
}

/// An admin token was made or deleted locally (only its hash and scopes
/// go to the database, never the token).
pub(super) async fn admin_token_changed(ctx: &Ctx<'_>, id: &str) {
    if let Some(c) = of(ctx) {
        c.publish(Change::AdminToken(id.to_owned())).await;
    }
}

/// An account's profile changed (or it was made or deleted) locally.
pub(super) async fn account_changed(ctx: &Ctx<'_>, id: &str) {
    if let Some(c) = of(ctx) {
        c.publish(Change::Account(id.to_owned())).await;
    }
}

/// Before an admin deduct takes `amount` from the account's live wallet:
/// in cluster mode that wallet is a lease, so the lease must hold it.
pub(super) async fn lease_for_deduct(ctx: &Ctx<'_>, id: &str, amount: i64) -> Result<(), ApiError> {
    let Some(c) = of(ctx) else {
        return Ok(());
    };
    let Some(live) = ctx.gate.wallets().of(id, ctx.clock.now_ms())? else {
        return Ok(());
    };
    c.ensure_wallet(&live, amount, false).await
}

/// An account credit the local store applied (not a replay): money added
/// goes to the database's balance once per entry; money taken came out of
/// this node's lease and is settled like a usage charge.
pub(super) async fn account_credited(ctx: &Ctx<'_>, id: &str, entry: &AccountLedgerEntry) {
    let Some(c) = of(ctx) else {
        return;
    };
    // The same idempotency key applies once cluster-wide, whichever node
    // it reaches.
    let entry_id = match &entry.idempotency_key {
        Some(k) => format!("credit:{id}:{k}"),
        None => c.entry_id("credit"),
    };
    let amount = entry.amount.0;
    let (add, spent) = match entry.kind {
        AccountCreditKind::Topup => (amount, 0),
        AccountCreditKind::Refund => (amount, -amount),
        AccountCreditKind::Adjust if amount > 0 => (amount, 0),
        AccountCreditKind::Reversal => (-amount, 0),
        AccountCreditKind::Adjust => {
            c.charge_account(Charge {
                id: entry_id,
                kind: "adjust",
                key: None,
                account: Some(Arc::from(id)),
                amount: -amount,
                spent: 0,
                at_ms: entry.at_ms,
                record: None,
            });
            return;
        }
        AccountCreditKind::Deduct => {
            c.charge_account(Charge {
                id: entry_id,
                kind: "deduct",
                key: None,
                account: Some(Arc::from(id)),
                amount,
                spent: amount,
                at_ms: entry.at_ms,
                record: None,
            });
            return;
        }
        // Grants and lapses come from subscriptions only: they move the
        // database's allowance in the transaction of their claim
        // (`cluster::subscriptions`).
        _ => return,
    };
    c.publish(Change::Credit {
        id: entry_id,
        account: id.to_owned(),
        kind: entry.kind.as_str(),
        amount: add,
        spent,
        at_ms: entry.at_ms,
    })
    .await;
}

/// A key's settled usage from the database, in cluster mode.
pub(super) async fn key_usage(
    ctx: &Ctx<'_>,
    hash: &KeyHash,
) -> Result<Option<crate::cluster::SettledKey>, ApiError> {
    match of(ctx) {
        Some(c) => c.key_usage(hash).await,
        None => Ok(None),
    }
}

/// An account's settled money from the database, in cluster mode.
pub(super) async fn account_money(
    ctx: &Ctx<'_>,
    id: &str,
) -> Result<Option<crate::cluster::SettledAccount>, ApiError> {
    match of(ctx) {
        Some(c) => c.account_money(id).await,
        None => Ok(None),
    }
}

/// Sets a key's live limit: through the cluster in cluster mode (a leased
/// key keeps its lease counter), else on the gate.
pub(super) fn set_live_limit(ctx: &Ctx<'_>, hash: &KeyHash, limit: Option<crate::money::Pico>) {
    match of(ctx) {
        Some(c) => c.key_limit_changed(ctx.gate, hash, limit),
        None => ctx.gate.set_limit(hash, limit),
    }
}

/// Before an admin deduct takes `amount` from a key's own credit: a key
/// whose limit is leased needs the lease to hold it.
pub(super) async fn lease_for_key_deduct(
    ctx: &Ctx<'_>,
    key: &Arc<crate::gate::LiveKey>,
    amount: i64,
) -> Result<(), ApiError> {
    let Some(c) = of(ctx) else {
        return Ok(());
    };
    c.ensure_key_own(ctx.gate, key, amount).await
}

/// A key credit the local store applied (not a replay).
pub(super) fn key_credited(
    ctx: &Ctx<'_>,
    key: &Arc<crate::gate::LiveKey>,
    entry: &crate::store::LedgerEntry,
) {
    if let Some(c) = of(ctx) {
        c.key_credited(key, entry);
    }
}

/// The keys `q` asks for from the database, in cluster mode.
pub(super) async fn listed_keys(
    ctx: &Ctx<'_>,
    q: &crate::store::KeyQuery,
) -> Result<Option<Vec<crate::cluster::lists::ListedKey>>, ApiError> {
    match of(ctx) {
        Some(c) => c.list_keys(q).await.map(Some),
        None => Ok(None),
    }
}

/// A page of accounts from the database, in cluster mode.
pub(super) async fn listed_accounts(
    ctx: &Ctx<'_>,
    offset: usize,
    limit: usize,
    email: Option<&str>,
) -> Result<Option<Vec<crate::cluster::lists::ListedAccount>>, ApiError> {
    match of(ctx) {
        Some(c) => c.list_accounts(offset, limit, email).await.map(Some),
        None => Ok(None),
    }
}
