//! Payments over HTTP (issue 11):
//!
//! - `POST /api/v1/payments/stripe/webhook` (signed by Stripe) and
//!   `GET|POST /api/v1/payments/epay/notify` (signed by the epay provider):
//!   no admin token, the signature is the authentication;
//! - `POST /api/v1/payments` (a manual payment), `GET /api/v1/payments`,
//!   `GET /api/v1/payments/{id}`, `GET /api/v1/payments/reconcile`,
//!   `POST /api/v1/accounts/{id}/checkout`: the admin's;
//! - `POST /api/v1/key/checkout`: a key asks for its own top-up page.
//!
//! The provider is answered 200 only once the payment is durable; a store
//! failure answers 5xx so that the provider retries, and the retry applies
//! once (`store::payments`).

use std::collections::{BTreeMap, HashSet};
use std::net::IpAddr;

use bytes::Bytes;
use http::{HeaderMap, Method, Response, StatusCode};
use serde::Serialize;

use super::keys::{MAX_AMOUNT, parse_usd};
use super::{Ctx, Data, Fields, admin_write_lock, invalid, json, store_error};
use crate::clock::rfc3339;
use crate::config::{EpayConfig, StripeConfig};
use crate::error::ApiError;
use crate::money::Pico;
use crate::payments::{PaymentCtx, checkout, epay, new_record, stripe};
use crate::store::{
    Account, IssuedKey, PaymentCredit, PaymentOp, PaymentOutcome, PaymentQuery, PaymentRecord,
    PaymentStatus, PaymentTarget,
};
use crate::{Body, BoxError};

type Answer = Result<Response<Body>, ApiError>;

/// Largest notification body read: Stripe events are a few KB, epay
/// notifications less; a bigger body is refused (413) before any parsing.
pub const NOTIFY_BODY_MAX: usize = 1024 * 1024;

const MAX_REFERENCE_CHARS: usize = 256;

fn payments_ctx<'a>(ctx: &'a Ctx<'_>) -> PaymentCtx<'a> {
    PaymentCtx {
        store: ctx.store,
        gate: ctx.gate,
        now_ms: ctx.clock.now_ms(),
        subscriptions: Some(crate::billing::subscriptions::Billing {
            config: ctx.config,
            gate: ctx.gate,
            store: ctx.store,
            clock: ctx.clock,
            cluster: super::cluster::of(ctx),
        }),
        cluster: super::cluster::of(ctx),
    }
}

fn not_configured(what: &str) -> ApiError {
    ApiError::not_found(format!("Payments through {what} are not configured."))
}

/// A secret read from the env var the config names.
fn secret(var: &str, setting: &str) -> Result<String, ApiError> {
    match std::env::var(var) {
        Ok(v) if !v.is_empty() => Ok(v),
        _ => Err(ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "server_error",
            "payments_not_configured",
            format!("The env var {var} named by {setting} is not set."),
        )),
    }
}

/// Store failures while applying a notification: 503, so the provider
/// retries; nothing was applied (the batch is all or nothing).
fn apply_error(e: crate::store::StoreError) -> ApiError {
    if let crate::store::StoreError::Database(why) = &e {
        return crate::cluster::payments::unavailable(why);
    }
    tracing::error!(error = %e, "payment not recorded; the provider will retry");
    store_error(e)
}

// ---- Stripe webhook ----

/// `POST /api/v1/payments/stripe/webhook`.
pub(super) async fn stripe_webhook<B>(
    ctx: &Ctx<'_>,
    method: &Method,
    headers: &HeaderMap,
    body: B,
) -> Answer
where
    B: http_body::Body<Data = Bytes>,
    B::Error: Into<BoxError>,
{
    let cfg = ctx
        .config
        .payments
        .stripe
        .as_ref()
        .ok_or_else(|| not_configured("Stripe"))?;
    if method != Method::POST {
        return Err(ApiError::method_not_allowed());
    }
    let secret = secret(
        &cfg.webhook_secret_env,
        "payments.stripe.webhook_secret_env",
    )?;
    let body = crate::server::read_body(headers, body, NOTIFY_BODY_MAX).await?;
    let header = headers
        .get("stripe-signature")
        .and_then(|v| v.to_str().ok());
    stripe::verify(&secret, header, &body, ctx.clock.now_secs()).map_err(|e| {
        tracing::warn!(error = %e, "stripe webhook refused");
        ApiError::bad_request("invalid_signature", format!("Stripe-Signature: {e}."))
            .with_param("stripe-signature")
    })?;
    let event =
        stripe::parse_event(&body).map_err(|e| ApiError::bad_request("invalid_event", e))?;
    let out = crate::payments::stripe_event(&payments_ctx(ctx), cfg, &event)
        .await
        .map_err(apply_error)?;
    #[derive(Serialize)]
    struct Received<'a> {
        received: bool,
        event: &'a str,
        /// Not a type (or state) Tollgate acts on.
        ignored: bool,
        payment: Option<&'a str>,
        status: Option<&'static str>,
        replayed: bool,
    }
    let payment = out.as_ref().and_then(|o| o.payment.as_ref());
    json(
        StatusCode::OK,
        &Received {
            received: true,
            event: &event.id,
            ignored: out.is_none(),
            payment: payment.map(|p| p.id.as_str()),
            status: payment.map(|p| p.status.as_str()),
            replayed: out.as_ref().is_some_and(|o| o.replayed),
        },
    )
}

// ---- epay notify ----

fn plain(status: StatusCode, text: &'static str) -> Response<Body> {
    let mut res = Response::new(crate::full_body(text));
    *res.status_mut() = status;
    res.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    res
}

/// `GET|POST /api/v1/payments/epay/notify`: `success` once applied (or
/// already applied), `fail` otherwise.
pub(super) async fn epay_notify<B>(
    ctx: &Ctx<'_>,
    method: &Method,
    query: Option<&str>,
    headers: &HeaderMap,
    body: B,
) -> Answer
where
    B: http_body::Body<Data = Bytes>,
    B::Error: Into<BoxError>,
{
    let cfg = ctx
        .config
        .payments
        .epay
        .as_ref()
        .ok_or_else(|| not_configured("epay"))?;
    let text = match *method {
        Method::GET => query.unwrap_or("").to_owned(),
        Method::POST => {
            let body = crate::server::read_body(headers, body, NOTIFY_BODY_MAX).await?;
            match std::str::from_utf8(&body) {
                Ok(t) if !t.trim().is_empty() => t.trim().to_owned(),
                Ok(_) => query.unwrap_or("").to_owned(),
                Err(_) => return Ok(plain(StatusCode::BAD_REQUEST, "fail")),
            }
        }
        _ => return Err(ApiError::method_not_allowed()),
    };
    let key = secret(&cfg.key_env, "payments.epay.key_env")?;
    match epay_apply(ctx, cfg, &key, &text).await {
        Ok(()) => Ok(plain(StatusCode::OK, "success")),
        Err(Refusal::Bad(why)) => {
            tracing::warn!(reason = %why, "epay notification refused");
            Ok(plain(StatusCode::BAD_REQUEST, "fail"))
        }
        Err(Refusal::Retry(e)) => {
            tracing::error!(error = %e.message, "epay notification not recorded; the provider will retry");
            Ok(plain(StatusCode::SERVICE_UNAVAILABLE, "fail"))
        }
    }
}

enum Refusal {
    /// Refused for good: bad signature, wrong money, unknown order.
    Bad(String),
    /// Not recorded (store failure): the provider should retry.
    Retry(ApiError),
}

async fn epay_apply(ctx: &Ctx<'_>, cfg: &EpayConfig, key: &str, text: &str) -> Result<(), Refusal> {
    let params = epay::parse_params(text).map_err(Refusal::Bad)?;
    if !epay::verify(&params, key) {
        return Err(Refusal::Bad("bad or missing sign".into()));
    }
    let n = epay::Notification::from_params(&params).map_err(Refusal::Bad)?;
    if n.pid != cfg.pid {
        return Err(Refusal::Bad(format!("pid {:?} is not ours", n.pid)));
    }
    if n.trade_status != "TRADE_SUCCESS" {
        return Err(Refusal::Bad(format!("trade_status {:?}", n.trade_status)));
    }
    let pctx = payments_ctx(ctx);
    let retry = |e| Refusal::Retry(apply_error(e));
    let order = match super::cluster::of(ctx) {
        // An order made through any node.
        Some(c) => c
            .epay_order(&n.out_trade_no)
            .await
            .map_err(Refusal::Retry)?,
        None => ctx.store.epay_order(&n.out_trade_no).map_err(retry)?,
    };
    if let Some(order) = order {
        if n.money != order.amount {
            return Err(Refusal::Bad(format!(
                "money {} for order {} of {}",
                n.money, n.out_trade_no, order.amount
            )));
        }
        let mut p = new_record("epay", &n.trade_no, "topup", pctx.now_ms);
        p.account = Some(order.account.clone());
        p.amount = order.amount;
        p.currency = "cny".into();
        p.events.push(n.out_trade_no.clone());
        pctx.apply(PaymentOp::Record {
            refs: vec![format!("order:{}", n.out_trade_no)],
            payment: Box::new(p),
            credit: Some(PaymentCredit::Account(order.account)),
        })
        .await
        .map_err(retry)?;
        return Ok(());
    }
    let (true, Some(param)) = (cfg.accept_external_orders, n.param.as_deref()) else {
        return Err(Refusal::Bad(format!("unknown order {:?}", n.out_trade_no)));
    };
    let ext = epay::parse_external(param).map_err(Refusal::Bad)?;
    let kind = match ext.kind {
        epay::ExternalKind::Activation => "activation",
        epay::ExternalKind::Recharge => "recharge",
    };
    let mut p = new_record("epay", &n.trade_no, kind, pctx.now_ms);
    p.amount = ext.credits;
    p.currency = "cny".into();
    p.events.push(n.out_trade_no.clone());
    let account = ctx
        .store
        .user_accounts(0, 1, Some(&ext.email))
        .map_err(retry)?
        .into_iter()
        .next();
    let credit = match &account {
        Some(a) => {
            p.account = Some(a.id.clone());
            Some(PaymentCredit::Account(a.id.clone()))
        }
        None => {
            p.status = PaymentStatus::NeedsAttention;
            p.reason = Some(format!(
                "no account with email {:?}; nothing applied",
                ext.email
            ));
            None
        }
    };
    let out = pctx
        .apply(PaymentOp::Record {
            refs: vec![format!("trade:{}", n.trade_no)],
            payment: Box::new(p),
            credit,
        })
        .await
        .map_err(retry)?;
    if ext.kind == epay::ExternalKind::Activation
        && let Some(p) = out.payment
        && p.status == PaymentStatus::Succeeded
        && let Some(account) = p.account.as_deref()
        && may_issue(ctx, &p.id, account)
            .await
            .map_err(Refusal::Retry)?
    {
        // Also on a replay: a crash after the payment and before the key
        // is healed by the provider's retry.
        issue_first_key(ctx, &p.id, account)
            .await
            .map_err(Refusal::Retry)?;
    }
    Ok(())
}

/// Whether this node issues the activation key of payment `id`. In
/// cluster mode one node does, cluster-wide: the one that claims
/// `issue:{id}` (again after a crash of its own, to heal it); another
/// node's store may not have the key it made yet, so its own check of
/// "no key yet" would make a second one.
async fn may_issue(ctx: &Ctx<'_>, id: &str, account: &str) -> Result<bool, ApiError> {
    let Some(c) = super::cluster::of(ctx) else {
        return Ok(true);
    };
    let claim = format!("issue:{id}");
    let (held, _) = c
        .claim_once(
            account,
            vec![crate::cluster::subscriptions::OnceClaim::marker(
                claim.clone(),
                "issue",
            )],
            ctx.clock.now_ms(),
        )
        .await
        .map_err(|e| crate::cluster::payments::unavailable(&e))?;
    Ok(held.contains(&claim))
}

/// Seed 002's activation: the account's first key, when it has none.
async fn issue_first_key(ctx: &Ctx<'_>, payment: &str, account: &str) -> Result<(), ApiError> {
    let _write = admin_write_lock().await;
    if !ctx
        .store
        .owner_keys(account)
        .map_err(store_error)?
        .is_empty()
    {
        return Ok(());
    }
    let now = ctx.clock.now_ms();
    let spec_json = serde_json::json!({"name": "activation", "owner": account});
    let f = Fields::parse(spec_json.to_string().as_bytes())?;
    let spec = super::keys::parse_spec(&f, true)?;
    let key = crate::gate::generate_key();
    let hash = crate::gate::hash_key(&key);
    let (record, limit) =
        super::keys::new_record(spec, None, hash, crate::gate::label_of(&key), now)?;
    let acct = Account {
        limit,
        fee_day: -1,
        ..Account::default()
    };
    ctx.store
        .create_key(record, acct)
        .await
        .map_err(store_error)?;
    ctx.gate.created(&hash);
    super::cluster::key_changed(ctx, hash).await;
    let issued = IssuedKey {
        hash: hex::encode(hash),
        key: Some(key),
    };
    match super::cluster::of(ctx) {
        // The secret waits in the database's record (never in this
        // node's store) until the first read on any node takes it.
        Some(c) => {
            if !c
                .set_issued_key(payment, issued)
                .await
                .map_err(|e| crate::cluster::payments::unavailable(&e))?
            {
                return Err(ApiError::internal("the payment of an issued key is gone"));
            }
        }
        None => {
            ctx.store
                .payment_op(PaymentOp::IssuedKey(payment.to_owned(), issued))
                .await
                .map_err(store_error)?;
        }
    }
    tracing::info!(account, payment, hash = %hex::encode(hash), "first key issued on activation");
    Ok(())
}

// ---- views ----

#[derive(Serialize)]
struct EntryView<'a> {
    /// `account` or `key`.
    target: &'static str,
    id: &'a str,
    seq: u64,
    kind: &'a str,
    amount: Pico,
}

/// An issued key as answered: its secret only in the one answer that took
/// it from the store (`get`); lists never show it.
#[derive(Serialize)]
struct IssuedKeyView<'a> {
    hash: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    key: Option<&'a str>,
}

#[derive(Serialize)]
struct PaymentView<'a> {
    id: &'a str,
    provider: &'a str,
    provider_id: &'a str,
    account: Option<&'a str>,
    key: Option<&'a str>,
    amount: Pico,
    currency: &'a str,
    kind: &'a str,
    status: &'static str,
    refunded: Pico,
    reason: Option<&'a str>,
    ledger: Vec<EntryView<'a>>,
    events: &'a [String],
    issued_key: Option<IssuedKeyView<'a>>,
    created_at: String,
    updated_at: String,
}

impl<'a> PaymentView<'a> {
    /// Without an issued key's secret.
    fn new(p: &'a PaymentRecord) -> PaymentView<'a> {
        PaymentView::showing(p, false)
    }

    fn showing(p: &'a PaymentRecord, secret: bool) -> PaymentView<'a> {
        PaymentView {
            id: &p.id,
            provider: &p.provider,
            provider_id: &p.provider_id,
            account: p.account.as_deref(),
            key: p.key.as_deref(),
            amount: p.amount,
            currency: &p.currency,
            kind: &p.kind,
            status: p.status.as_str(),
            refunded: p.refunded,
            reason: p.reason.as_deref(),
            ledger: p
                .entries
                .iter()
                .map(|e| {
                    let (target, id) = match &e.target {
                        PaymentTarget::Account(id) => ("account", id.as_str()),
                        PaymentTarget::Key(h) => ("key", h.as_str()),
                    };
                    EntryView {
                        target,
                        id,
                        seq: e.seq,
                        kind: &e.kind,
                        amount: e.amount,
                    }
                })
                .collect(),
            events: &p.events,
            issued_key: p.issued_key.as_ref().map(|k| IssuedKeyView {
                hash: &k.hash,
                key: k.key.as_deref().filter(|_| secret),
            }),
            created_at: rfc3339(p.created_at),
            updated_at: rfc3339(p.updated_at),
        }
    }
}

// ---- admin: manual payments, listing, reconcile ----

/// `POST /api/v1/payments` `{account, amount, reference, kind: "topup"}`:
/// 201 the first time, 200 with `replayed` for the same reference again.
pub(super) async fn manual(ctx: &Ctx<'_>, f: &Fields) -> Answer {
    f.only(&["account", "amount", "reference", "kind"])?;
    let account: String = f.required("account", "a string")?;
    super::accounts::valid_id(&account).map_err(|e| e.with_param("account"))?;
    let kind: String = f.required("kind", "\"topup\"")?;
    if kind != "topup" {
        return Err(invalid(
            "kind",
            "invalid_value",
            "`kind` must be \"topup\".",
        ));
    }
    let amount = positive_amount(f)?;
    let reference: String = f.required("reference", "a string")?;
    if reference.is_empty()
        || reference.chars().count() > MAX_REFERENCE_CHARS
        || reference.chars().any(char::is_control)
    {
        return Err(invalid(
            "reference",
            "invalid_value",
            format!(
                "`reference` must be 1 to {MAX_REFERENCE_CHARS} characters, no control characters."
            ),
        ));
    }
    if ctx
        .store
        .user_account(&account)
        .map_err(store_error)?
        .is_none()
    {
        return Err(ApiError::not_found("No account with this id.").with_param("account"));
    }
    let pctx = payments_ctx(ctx);
    let mut p = new_record("manual", &reference, "topup", pctx.now_ms);
    p.account = Some(account.clone());
    p.amount = amount;
    p.currency = "usd".into();
    let out = pctx
        .apply(PaymentOp::Record {
            refs: vec![format!("ref:{reference}")],
            payment: Box::new(p),
            credit: Some(PaymentCredit::Account(account.clone())),
        })
        .await
        .map_err(store_error)?;
    let p = out
        .payment
        .as_ref()
        .ok_or_else(|| ApiError::internal("a payment op answered no payment"))?;
    if out.replayed && (p.account.as_deref() != Some(&account) || p.amount != amount) {
        return Err(ApiError::conflict(
            "reference_reused",
            format!(
                "The reference was used for a payment of {} USD to another account or amount; nothing was changed.",
                p.amount
            ),
        )
        .with_param("reference"));
    }
    payment_answer(
        &out,
        if out.replayed {
            StatusCode::OK
        } else {
            StatusCode::CREATED
        },
    )
}

fn payment_answer(out: &PaymentOutcome, status: StatusCode) -> Answer {
    #[derive(Serialize)]
    struct View<'a> {
        #[serde(flatten)]
        payment: PaymentView<'a>,
        replayed: bool,
    }
    let p = out
        .payment
        .as_ref()
        .ok_or_else(|| ApiError::internal("a payment op answered no payment"))?;
    json(
        status,
        &Data {
            data: View {
                payment: PaymentView::new(p),
                replayed: out.replayed,
            },
        },
    )
}

fn positive_amount(f: &Fields) -> Result<Pico, ApiError> {
    let Some(raw) = f.raw("amount") else {
        return Err(invalid(
            "amount",
            "missing_field",
            "The field `amount` is required.",
        ));
    };
    let amount = parse_usd(raw, "amount")?;
    if amount.0 <= 0 || amount > MAX_AMOUNT {
        return Err(invalid(
            "amount",
            "invalid_amount",
            format!("`amount` must be greater than 0 and at most {MAX_AMOUNT} USD."),
        ));
    }
    Ok(amount)
}

fn status_of(text: &str) -> Option<PaymentStatus> {
    [
        PaymentStatus::Succeeded,
        PaymentStatus::Refunded,
        PaymentStatus::PartiallyRefunded,
        PaymentStatus::NeedsAttention,
        PaymentStatus::Failed,
    ]
    .into_iter()
    .find(|s| s.as_str() == text)
}

/// `GET /api/v1/payments?account=&status=&provider=&offset=&limit=`, newest
/// first; in cluster mode every node's, from the database.
pub(super) async fn list(ctx: &Ctx<'_>, query: Option<&str>) -> Answer {
    let pairs = super::query_pairs(query)?;
    let (offset, limit) = super::offset_limit(&pairs)?;
    let get = |name: &str| {
        pairs
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.clone())
    };
    let status = match get("status") {
        None => None,
        Some(s) => Some(status_of(&s).ok_or_else(|| {
            ApiError::bad_request(
                "invalid_query",
                "`status` must be succeeded, refunded, partially_refunded, needs_attention or failed.",
            )
            .with_param("status")
        })?),
    };
    let q = PaymentQuery {
        account: get("account"),
        status,
        provider: get("provider"),
        offset,
        limit,
    };
    let all = match super::cluster::of(ctx) {
        Some(c) => c.payments(&q).await?,
        None => ctx.store.payments(&q).map_err(store_error)?,
    };
    let views: Vec<PaymentView<'_>> = all.iter().map(PaymentView::new).collect();
    json(StatusCode::OK, &Data { data: views })
}

/// `GET /api/v1/payments/{id}`. The first read of a payment that issued a
/// key answers the key's secret and removes it from the store in the same
/// step: the key is shown once, then only its hash remains.
pub(super) async fn get(ctx: &Ctx<'_>, id: &str) -> Answer {
    let not_found = || ApiError::not_found("No payment with this id.").with_param("id");
    if let Some(c) = super::cluster::of(ctx) {
        // The database's row lock makes the secret shown once cluster-wide.
        let p = c.take_payment(id).await?.ok_or_else(not_found)?;
        return json(
            StatusCode::OK,
            &Data {
                data: PaymentView::showing(&p, true),
            },
        );
    }
    let mut p = ctx
        .store
        .payment(id)
        .map_err(store_error)?
        .ok_or_else(not_found)?;
    if p.issued_key.as_ref().is_some_and(|k| k.key.is_some()) {
        // The store thread takes it: of two reads at once, one gets it.
        p = ctx
            .store
            .payment_op(PaymentOp::TakeIssuedKey(id.to_owned()))
            .await
            .map_err(store_error)?
            .payment
            .ok_or_else(not_found)?;
    }
    json(
        StatusCode::OK,
        &Data {
            data: PaymentView::showing(&p, true),
        },
    )
}

/// `GET /api/v1/payments/reconcile?start=&end=` (Unix seconds; default
/// the last 30 days): payments that made no ledger entry, ledger top-ups
/// that no payment made, and totals per provider. In cluster mode the
/// payments are every node's (the database's); the ledger top-ups are
/// this node's own store's.
pub(super) async fn reconcile(ctx: &Ctx<'_>, query: Option<&str>) -> Answer {
    let pairs = super::query_pairs(query)?;
    let range = super::reports::range_of(&pairs, ctx.clock.now_ms())?;
    let within = |at: i64| at >= range.start_ms && at < range.end_ms;
    let mut ids = HashSet::new();
    let mut unapplied = Vec::new();
    #[derive(Serialize, Default)]
    struct Total {
        payments: u64,
        amount: Pico,
        refunded: Pico,
        needs_attention: u64,
    }
    let mut totals: BTreeMap<String, Total> = BTreeMap::new();
    let payments: Vec<PaymentRecord> = match super::cluster::of(ctx) {
        Some(c) => c.all_payments().await?,
        None => ctx
            .store
            .all_payments()
            .collect::<Result<_, _>>()
            .map_err(store_error)?,
    };
    for p in payments {
        ids.insert(p.id.clone());
        if !within(p.created_at) {
            continue;
        }
        let t = totals.entry(p.provider.clone()).or_default();
        t.payments += 1;
        if p.status == PaymentStatus::NeedsAttention {
            t.needs_attention += 1;
        }
        if !p.entries.is_empty() {
            t.amount = t.amount.saturating_add(p.amount);
            t.refunded = t.refunded.saturating_add(p.refunded);
        } else {
            unapplied.push(p);
        }
    }
    #[derive(Serialize)]
    struct Orphan {
        /// `account` or `key`.
        target: &'static str,
        id: String,
        seq: u64,
        at: String,
        amount: Pico,
        reason: String,
        idempotency_key: Option<String>,
    }
    let made_by_payment = |idem: Option<&str>| {
        idem.and_then(|k| k.strip_prefix("payment:"))
            .is_some_and(|id| ids.contains(id))
    };
    let mut orphans = Vec::new();
    for e in ctx.store.all_account_entries() {
        let (id, e) = e.map_err(store_error)?;
        if e.kind == crate::store::AccountCreditKind::Topup
            && within(e.at_ms)
            && !made_by_payment(e.idempotency_key.as_deref())
        {
            orphans.push(Orphan {
                target: "account",
                id,
                seq: e.seq,
                at: rfc3339(e.at_ms),
                amount: e.amount,
                reason: e.reason,
                idempotency_key: e.idempotency_key,
            });
        }
    }
    for e in ctx.store.all_key_entries() {
        let (hash, e) = e.map_err(store_error)?;
        if e.kind == crate::store::LedgerKind::Topup
            && within(e.at_ms)
            && !made_by_payment(e.idempotency_key.as_deref())
        {
            orphans.push(Orphan {
                target: "key",
                id: hex::encode(hash),
                seq: e.seq,
                at: rfc3339(e.at_ms),
                amount: e.amount,
                reason: e.reason,
                idempotency_key: e.idempotency_key,
            });
        }
    }
    #[derive(Serialize)]
    struct Report<'a> {
        start: String,
        end: String,
        payments_without_ledger: Vec<PaymentView<'a>>,
        topups_without_payment: Vec<Orphan>,
        totals: BTreeMap<String, Total>,
    }
    json(
        StatusCode::OK,
        &Data {
            data: Report {
                start: rfc3339(range.start_ms),
                end: rfc3339(range.end_ms),
                payments_without_ledger: unapplied.iter().map(PaymentView::new).collect(),
                topups_without_payment: orphans,
                totals,
            },
        },
    )
}

// ---- checkouts ----

/// What a checkout is for, and who is credited when it is paid.
enum Buyer<'a> {
    Account(&'a str),
    Key(String),
}

/// A random `Idempotency-Key` unless the caller gave one.
fn idempotency_key(f: &Fields) -> Result<String, ApiError> {
    match f.opt::<String>("idempotency_key", "a string")? {
        Some(k) if !k.is_empty() && k.len() <= 255 => Ok(k),
        Some(_) => Err(invalid(
            "idempotency_key",
            "invalid_value",
            "`idempotency_key` must be 1 to 255 characters.",
        )),
        None => {
            let mut r = [0u8; 16];
            getrandom::fill(&mut r).map_err(|e| ApiError::internal(e.to_string()))?;
            Ok(format!("tollgate-{}", hex::encode(r)))
        }
    }
}

fn urls(cfg: &StripeConfig) -> Result<(&str, &str), ApiError> {
    match (cfg.success_url.as_deref(), cfg.cancel_url.as_deref()) {
        (Some(s), Some(c)) => Ok((s, c)),
        _ => Err(ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "server_error",
            "payments_not_configured",
            "payments.stripe.success_url and cancel_url must be set for checkouts.",
        )),
    }
}

fn pair(k: &str, v: &str) -> (String, String) {
    (k.to_owned(), v.to_owned())
}

/// A Stripe top-up checkout for `amount`.
async fn stripe_topup(cfg: &StripeConfig, buyer: &Buyer<'_>, amount: Pico, idem: &str) -> Answer {
    let cents = stripe::pico_to_cents(amount).ok_or_else(|| {
        invalid(
            "amount",
            "invalid_amount",
            "`amount` must be a whole number of cents.",
        )
    })?;
    let (success, cancel) = urls(cfg)?;
    let mut form = vec![
        pair("mode", "payment"),
        pair("success_url", success),
        pair("cancel_url", cancel),
        pair("line_items[0][quantity]", "1"),
        pair("line_items[0][price_data][currency]", &cfg.currency),
        pair("line_items[0][price_data][unit_amount]", &cents.to_string()),
        pair(
            "line_items[0][price_data][product_data][name]",
            "Tollgate credit",
        ),
        pair("metadata[kind]", "topup"),
        pair("payment_intent_data[metadata][kind]", "topup"),
    ];
    match buyer {
        Buyer::Account(id) => {
            form.push(pair("client_reference_id", id));
            form.push(pair("metadata[account]", id));
            form.push(pair("payment_intent_data[metadata][account]", id));
        }
        Buyer::Key(hash) => {
            form.push(pair("metadata[key]", hash));
            form.push(pair("payment_intent_data[metadata][key]", hash));
        }
    }
    session_answer(cfg, &form, idem).await
}

async fn session_answer(cfg: &StripeConfig, form: &[(String, String)], idem: &str) -> Answer {
    let key = secret(&cfg.secret_key_env, "payments.stripe.secret_key_env")?;
    let s = checkout::create_session(&cfg.api_base, &key, form, idem).await?;
    json(StatusCode::CREATED, &Data { data: s })
}

/// `POST /api/v1/accounts/{id}/checkout`: `{kind: "topup", amount}` or
/// `{kind: "subscription", plan}` through Stripe (the default), or
/// `{provider: "epay", kind: "topup", amount, type}`.
pub(super) async fn account_checkout(ctx: &Ctx<'_>, id: &str, f: &Fields) -> Answer {
    super::accounts::valid_id(id)?;
    f.only(&[
        "provider",
        "kind",
        "amount",
        "plan",
        "type",
        "idempotency_key",
    ])?;
    let provider: String = f
        .opt("provider", "\"stripe\" or \"epay\"")?
        .unwrap_or_else(|| "stripe".into());
    let kind: String = f.required("kind", "\"topup\" or \"subscription\"")?;
    if ctx.store.user_account(id).map_err(store_error)?.is_none() {
        return Err(ApiError::not_found("No account with this id.").with_param("id"));
    }
    match (provider.as_str(), kind.as_str()) {
        ("stripe", "topup") => {
            let cfg = ctx
                .config
                .payments
                .stripe
                .as_ref()
                .ok_or_else(|| not_configured("Stripe"))?;
            let amount = positive_amount(f)?;
            stripe_topup(cfg, &Buyer::Account(id), amount, &idempotency_key(f)?).await
        }
        ("stripe", "subscription") => {
            let cfg = ctx
                .config
                .payments
                .stripe
                .as_ref()
                .ok_or_else(|| not_configured("Stripe"))?;
            let plan: String = f.required("plan", "a plan name")?;
            let price = ctx
                .config
                .plans
                .get(&plan)
                .ok_or_else(|| invalid("plan", "unknown_plan", "No plan with this name."))?
                .stripe_price
                .clone()
                .ok_or_else(|| {
                    invalid(
                        "plan",
                        "plan_not_sold",
                        "This plan has no `stripe_price` in the config.",
                    )
                })?;
            let (success, cancel) = urls(cfg)?;
            let form = vec![
                pair("mode", "subscription"),
                pair("success_url", success),
                pair("cancel_url", cancel),
                pair("client_reference_id", id),
                pair("line_items[0][price]", &price),
                pair("line_items[0][quantity]", "1"),
                pair("metadata[account]", id),
                pair("metadata[plan]", &plan),
                pair("metadata[kind]", "subscription"),
                pair("subscription_data[metadata][account]", id),
                pair("subscription_data[metadata][plan]", &plan),
            ];
            session_answer(cfg, &form, &idempotency_key(f)?).await
        }
        ("epay", "topup") => epay_checkout(ctx, id, f).await,
        ("stripe" | "epay", _) => Err(invalid(
            "kind",
            "invalid_value",
            "`kind` must be \"topup\" or \"subscription\" (epay: \"topup\").",
        )),
        _ => Err(invalid(
            "provider",
            "invalid_value",
            "`provider` must be \"stripe\" or \"epay\".",
        )),
    }
}

/// An epay order: stored, then answered with the signed URL to pay it.
async fn epay_checkout(ctx: &Ctx<'_>, id: &str, f: &Fields) -> Answer {
    let cfg = ctx
        .config
        .payments
        .epay
        .as_ref()
        .ok_or_else(|| not_configured("epay"))?;
    let amount = positive_amount(f)?;
    let money = epay::money_text(amount).ok_or_else(|| {
        invalid(
            "amount",
            "invalid_amount",
            "`amount` must be a whole number of cents.",
        )
    })?;
    let pay_type: String = f.required("type", "\"alipay\" or \"wxpay\"")?;
    if pay_type.is_empty()
        || pay_type.len() > 32
        || !pay_type.bytes().all(|b| b.is_ascii_alphanumeric())
    {
        return Err(invalid(
            "type",
            "invalid_value",
            "`type` must be a payment type such as \"alipay\" or \"wxpay\".",
        ));
    }
    let key = secret(&cfg.key_env, "payments.epay.key_env")?;
    let now = ctx.clock.now_ms();
    let mut r = [0u8; 4];
    getrandom::fill(&mut r).map_err(|e| ApiError::internal(e.to_string()))?;
    let out_trade_no = format!("TG{now}{}", hex::encode(r));
    let order = crate::store::EpayOrder {
        out_trade_no: out_trade_no.clone(),
        account: id.to_owned(),
        amount,
        pay_type: pay_type.clone(),
        created_at: now,
    };
    match super::cluster::of(ctx) {
        // Its notification may reach any node.
        Some(c) => {
            if !c.put_epay_order(&order).await? {
                return Err(ApiError::conflict(
                    "key_exists",
                    "This order number is taken; retry.",
                ));
            }
        }
        None => {
            ctx.store
                .payment_op(PaymentOp::Order(order))
                .await
                .map_err(store_error)?;
        }
    }
    let mut params = vec![
        pair("pid", &cfg.pid),
        pair("type", &pay_type),
        pair("out_trade_no", &out_trade_no),
        pair("notify_url", &cfg.notify_url),
        pair("name", "Tollgate credit"),
        pair("money", &money),
    ];
    if let Some(r) = &cfg.return_url {
        params.push(pair("return_url", r));
    }
    let url = epay::payment_url(&cfg.submit_url, &params, &key);
    #[derive(Serialize)]
    struct Order<'a> {
        id: &'a str,
        out_trade_no: &'a str,
        url: &'a str,
        amount: Pico,
    }
    json(
        StatusCode::CREATED,
        &Data {
            data: Order {
                id: &out_trade_no,
                out_trade_no: &out_trade_no,
                url: &url,
                amount,
            },
        },
    )
}

/// `POST /api/v1/key/checkout` `{amount}`, authenticated by the key: a
/// Stripe top-up of its account (or, without one, of the key itself).
pub(super) async fn key_checkout<B>(
    ctx: &Ctx<'_>,
    method: &Method,
    headers: &HeaderMap,
    body: B,
    client_ip: IpAddr,
) -> Answer
where
    B: http_body::Body<Data = Bytes>,
    B::Error: Into<BoxError>,
{
    // A portal in a browser calls it: the origins in `[cors]` may.
    let cors = super::cors::Cors::of(ctx, headers);
    if method == Method::OPTIONS {
        return Ok(cors.preflight());
    }
    let result = if method == Method::POST {
        own_checkout(ctx, headers, body, client_ip).await
    } else {
        Err(ApiError::method_not_allowed())
    };
    Ok(cors.apply(result.unwrap_or_else(ApiError::into_response)))
}

async fn own_checkout<B>(ctx: &Ctx<'_>, headers: &HeaderMap, body: B, client_ip: IpAddr) -> Answer
where
    B: http_body::Body<Data = Bytes>,
    B::Error: Into<BoxError>,
{
    let live = ctx.gate.authenticate(headers, client_ip)?;
    let cfg = ctx
        .config
        .payments
        .stripe
        .as_ref()
        .ok_or_else(|| not_configured("Stripe"))?;
    let bytes = crate::server::read_body(headers, body, super::ADMIN_BODY_MAX).await?;
    let f = Fields::parse(&bytes)?;
    f.only(&["amount", "idempotency_key"])?;
    let amount = positive_amount(&f)?;
    let policy = live.policy();
    let rec = &policy.record;
    let account = match rec.owner.as_deref() {
        Some(owner) => ctx
            .store
            .user_account(owner)
            .map_err(store_error)?
            .map(|a| a.id),
        None => None,
    };
    let buyer = match &account {
        Some(id) => Buyer::Account(id),
        None => Buyer::Key(hex::encode(rec.hash)),
    };
    stripe_topup(cfg, &buyer, amount, &idempotency_key(&f)?).await
}
