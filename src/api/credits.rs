//! Credits (top-up, deduct, refund) and the ledger of a key.
//!
//! The store applies a credit and writes its ledger entry atomically and
//! once per idempotency key; the gate's in-memory numbers follow only when
//! the store applied something new, so a replay never moves money twice.

use http::StatusCode;
use serde::Serialize;

use super::keys::{MAX_AMOUNT, Numbers, parse_usd};
use super::{Ctx, Data, Fields, admin_write_lock, invalid, json, key_not_found, store_error};
use crate::clock::rfc3339;
use crate::error::ApiError;
use crate::money::Pico;
use crate::store::{CreditOp, CreditOutcome, KeyHash, LedgerEntry, LedgerKind};

const CREDIT_FIELDS: &[&str] = &["amount", "kind", "reason", "idempotency_key"];
const MAX_REASON_CHARS: usize = 1024;
const MAX_IDEMPOTENCY_CHARS: usize = 256;

/// A validated credit request.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct CreditRequest {
    pub kind: LedgerKind,
    pub amount: Pico,
    pub reason: String,
    pub idempotency_key: Option<String>,
}

pub(crate) fn parse_credit(f: &Fields) -> Result<CreditRequest, ApiError> {
    f.only(CREDIT_FIELDS)?;
    let Some(raw) = f.raw("amount") else {
        return Err(invalid(
            "amount",
            "missing_field",
            "The field `amount` is required.",
        ));
    };
    let amount = parse_usd(raw, "amount")?;
    if amount.0 <= 0 {
        return Err(invalid(
            "amount",
            "invalid_amount",
            "`amount` must be greater than 0.",
        ));
    }
    if amount > MAX_AMOUNT {
        return Err(invalid(
            "amount",
            "invalid_amount",
            format!("`amount` must be at most {MAX_AMOUNT} USD."),
        ));
    }
    let kind_text: String = f.required("kind", "\"topup\", \"deduct\" or \"refund\"")?;
    let kind = match kind_text.as_str() {
        "topup" => LedgerKind::Topup,
        "deduct" => LedgerKind::Deduct,
        "refund" => LedgerKind::Refund,
        _ => {
            return Err(invalid(
                "kind",
                "invalid_value",
                "`kind` must be \"topup\", \"deduct\" or \"refund\".",
            ));
        }
    };
    let reason: String = f.required("reason", "a string")?;
    if reason.chars().count() > MAX_REASON_CHARS {
        return Err(invalid(
            "reason",
            "invalid_value",
            format!("`reason` must be at most {MAX_REASON_CHARS} characters."),
        ));
    }
    let idempotency_key: Option<String> = f.opt("idempotency_key", "a string")?;
    if let Some(k) = &idempotency_key
        && (k.is_empty() || k.chars().count() > MAX_IDEMPOTENCY_CHARS)
    {
        return Err(invalid(
            "idempotency_key",
            "invalid_value",
            format!("`idempotency_key` must be 1 to {MAX_IDEMPOTENCY_CHARS} characters."),
        ));
    }
    Ok(CreditRequest {
        kind,
        amount,
        reason,
        idempotency_key,
    })
}

fn kind_str(k: LedgerKind) -> &'static str {
    k.as_str()
}

/// A ledger entry as shown.
#[derive(Serialize)]
pub(crate) struct EntryView<'a> {
    seq: u64,
    at: String,
    kind: &'static str,
    amount: Pico,
    reason: &'a str,
    idempotency_key: Option<&'a str>,
    limit_after: Option<Pico>,
    usage_after: Pico,
    /// Cluster mode: the node that applied the entry (`seq` is its).
    #[serde(skip_serializing_if = "Option::is_none")]
    node: Option<&'a str>,
}

impl<'a> EntryView<'a> {
    fn new(e: &'a LedgerEntry) -> EntryView<'a> {
        EntryView {
            node: None,
            seq: e.seq,
            at: rfc3339(e.at_ms),
            kind: kind_str(e.kind),
            amount: e.amount,
            reason: &e.reason,
            idempotency_key: e.idempotency_key.as_deref(),
            limit_after: e.limit_after,
            usage_after: e.spent_after,
        }
    }
}

#[derive(Serialize)]
struct CreditView<'a> {
    entry: EntryView<'a>,
    limit: Option<Pico>,
    usage: Pico,
    limit_remaining: Option<Pico>,
    replayed: bool,
}

/// `POST /api/v1/keys/{hash}/credits`
pub(super) async fn credit(
    ctx: &Ctx<'_>,
    hash: KeyHash,
    f: &Fields,
) -> Result<http::Response<crate::Body>, ApiError> {
    let req = parse_credit(f)?;
    let _write = admin_write_lock().await;
    let now = ctx.clock.now_ms();
    let live = ctx.gate.lookup(&hash, now)?.ok_or_else(key_not_found)?;
    let op = CreditOp {
        kind: req.kind,
        amount: req.amount,
        reason: req.reason.clone(),
        idempotency_key: req.idempotency_key.clone(),
        at_ms: now,
    };
    let outcome = match req.kind {
        LedgerKind::Topup => {
            let out = ctx.store.credit(hash, op).await.map_err(store_error)?;
            if !out.replayed {
                super::cluster::set_live_limit(ctx, &hash, out.account.limit);
            }
            out
        }
        LedgerKind::Deduct => {
            // Taken from the live remaining first, so a deduct can never
            // push spend past the limit while requests are in flight.
            super::cluster::lease_for_key_deduct(ctx, &live, req.amount.0).await?;
            let hold = match ctx.gate.hold(&live, req.amount) {
                Ok(h) => h,
                Err(e) => return replay_or(ctx, &hash, &req, e),
            };
            let out = ctx.store.credit(hash, op).await.map_err(store_error)?;
            if out.replayed {
                drop(hold);
            } else {
                hold.settle(req.amount, 0);
            }
            out
        }
        LedgerKind::Refund => {
            let spent = live.numbers().spent;
            if req.amount > spent {
                let e = invalid(
                    "amount",
                    "refund_exceeds_usage",
                    format!("The key has used only {spent} USD; a refund cannot exceed it."),
                );
                return replay_or(ctx, &hash, &req, e);
            }
            let out = ctx.store.credit(hash, op).await.map_err(store_error)?;
            if !out.replayed {
                ctx.gate.refund(&live, req.amount);
            }
            out
        }
        LedgerKind::DailyFee => unreachable_kind()?,
    };
    check_same_request(&outcome, &req)?;
    if !outcome.replayed {
        super::cluster::key_credited(ctx, &live, &outcome.entry);
        super::cluster::key_changed(ctx, hash).await;
        tracing::info!(
            hash = %hex::encode(hash),
            kind = kind_str(req.kind),
            amount = %req.amount,
            "credit applied"
        );
    }
    answer(&outcome, &Numbers::live(&live))
}

/// Daily fees are charged by the gate, never through this endpoint.
fn unreachable_kind() -> Result<CreditOutcome, ApiError> {
    Err(invalid(
        "kind",
        "invalid_value",
        "`kind` must be \"topup\", \"deduct\" or \"refund\".",
    ))
}

/// A request refused by a pre-check (402 for a deduct that does not fit, a
/// refund above usage) may be the replay of one that succeeded earlier:
/// then it answers the first result, as the store would have.
fn replay_or(
    ctx: &Ctx<'_>,
    hash: &KeyHash,
    req: &CreditRequest,
    refusal: ApiError,
) -> Result<http::Response<crate::Body>, ApiError> {
    let Some(idem) = req.idempotency_key.as_deref() else {
        return Err(refusal);
    };
    let mut offset = 0;
    loop {
        let page = ctx.store.ledger(hash, offset, 500).map_err(store_error)?;
        if page.is_empty() {
            return Err(refusal);
        }
        offset += page.len();
        if let Some(entry) = page
            .into_iter()
            .find(|e| e.idempotency_key.as_deref() == Some(idem))
        {
            let now = ctx.clock.now_ms();
            let live = ctx.gate.lookup(hash, now)?.ok_or_else(key_not_found)?;
            let outcome = CreditOutcome {
                entry,
                account: Default::default(),
                replayed: true,
            };
            check_same_request(&outcome, req)?;
            return answer(&outcome, &Numbers::live(&live));
        }
    }
}

/// A reused idempotency key with a different kind or amount is a client
/// bug: refuse it rather than pretend the new request was applied.
fn check_same_request(outcome: &CreditOutcome, req: &CreditRequest) -> Result<(), ApiError> {
    if outcome.replayed && (outcome.entry.kind != req.kind || outcome.entry.amount != req.amount) {
        return Err(ApiError::conflict(
            "idempotency_key_reused",
            format!(
                "This idempotency key was used for a {} of {} USD; nothing was changed.",
                kind_str(outcome.entry.kind),
                outcome.entry.amount
            ),
        )
        .with_param("idempotency_key"));
    }
    Ok(())
}

fn answer(outcome: &CreditOutcome, n: &Numbers) -> Result<http::Response<crate::Body>, ApiError> {
    json(
        StatusCode::OK,
        &Data {
            data: CreditView {
                entry: EntryView::new(&outcome.entry),
                limit: n.limit,
                usage: n.spent,
                limit_remaining: n.remaining,
                replayed: outcome.replayed,
            },
        },
    )
}

/// `GET /api/v1/keys/{hash}/ledger?offset=&limit=`, newest first. A
/// deleted key's ledger stays readable while it has entries. In cluster
/// mode: every node's entries, from the database.
pub(super) async fn ledger(
    ctx: &Ctx<'_>,
    hash: &KeyHash,
    query: Option<&str>,
) -> Result<http::Response<crate::Body>, ApiError> {
    let pairs = super::query_pairs(query)?;
    let (offset, limit) = super::offset_limit(&pairs)?;
    if let Some(c) = super::cluster::of(ctx) {
        let entries = c.key_ledger(hash, offset, limit).await?;
        if entries.is_empty()
            && ctx.store.key(hash).map_err(store_error)?.is_none()
            && !c.key_known(hash).await?
        {
            return Err(key_not_found());
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
    let entries = ctx.store.ledger(hash, offset, limit).map_err(store_error)?;
    if entries.is_empty() && ctx.store.key(hash).map_err(store_error)?.is_none() {
        return Err(key_not_found());
    }
    let views: Vec<EntryView<'_>> = entries.iter().map(EntryView::new).collect();
    json(StatusCode::OK, &Data { data: views })
}
