//! Payments (issue 11): money in from Stripe, epay and manual records,
//! applied exactly once.
//!
//! - [`stripe`]: the `Stripe-Signature` check, the events read, the
//!   checkout form; [`checkout`]: the call that creates a session.
//! - [`epay`]: the md5 signature, notifications, payment URLs.
//! - this file: turning a verified notification into a store
//!   [`PaymentOp`] (one function per Stripe event), and making the
//!   in-memory wallets follow once the store applied it.
//!
//! Exactly once holds because the store thread checks the payment's
//! provider references and writes the payment, its ledger entry and the
//! balance in one batch (`store::payments`); memory moves only when that
//! batch was new. In `[cluster]` mode the database applies it first, in
//! one transaction that claims the payment's references cluster-wide
//! (`cluster::payments`), and the store follows only what that applied.
//! The HTTP side is `api::payments`.

pub mod checkout;
pub mod epay;
pub mod stripe;

use crate::config::StripeConfig;
use crate::gate::Gate;
use crate::money::Pico;
use crate::store::{
    Applied, PaymentCredit, PaymentOp, PaymentOutcome, PaymentRecord, PaymentStatus, Store,
    StoreError,
};
use stripe::{Charge, CheckoutSession, Event, EventBody, Invoice, Subscription};

/// What applying a payment needs.
pub struct PaymentCtx<'a> {
    /// Where the payment is applied, once.
    pub store: &'a Store,
    /// The live wallets and keys that follow what the store applied.
    pub gate: &'a Gate,
    /// The time of the notification's receipt.
    pub now_ms: i64,
    /// The subscription rules the Stripe subscription events drive (`None`:
    /// those events are recorded as needing attention).
    pub subscriptions: Option<crate::billing::subscriptions::Billing<'a>>,
    /// `[cluster]` mode: the payment is applied in the database first,
    /// once cluster-wide (`cluster::payments`), then in the local store.
    pub cluster: Option<&'a std::sync::Arc<crate::cluster::Cluster>>,
}

/// A new payment id: `pay_` + 12 hex digits of the ms + 8 random hex
/// digits, so ids sort by creation.
pub fn new_payment_id(now_ms: i64) -> String {
    let mut r = [0u8; 4];
    let _ = getrandom::fill(&mut r);
    format!("pay_{:012x}{}", now_ms.max(0), hex::encode(r))
}

/// A payment record with nothing applied yet.
pub fn new_record(provider: &str, provider_id: &str, kind: &str, now_ms: i64) -> PaymentRecord {
    PaymentRecord {
        id: new_payment_id(now_ms),
        provider: provider.to_owned(),
        provider_id: provider_id.to_owned(),
        account: None,
        key: None,
        amount: Pico::ZERO,
        currency: String::new(),
        kind: kind.to_owned(),
        status: PaymentStatus::Succeeded,
        refunded: Pico::ZERO,
        reason: None,
        entries: Vec::new(),
        events: Vec::new(),
        issued_key: None,
        created_at: now_ms,
        updated_at: now_ms,
    }
}

fn attention(mut p: PaymentRecord, reason: impl Into<String>) -> PaymentRecord {
    p.status = PaymentStatus::NeedsAttention;
    p.reason = Some(reason.into());
    p
}

impl PaymentCtx<'_> {
    /// Applies `op` in the store (durable when this returns), then moves
    /// the in-memory wallet or key if the store applied something new.
    pub async fn apply(&self, op: PaymentOp) -> Result<PaymentOutcome, StoreError> {
        if let Some(c) = self.cluster {
            return self.apply_cluster(c, op).await;
        }
        let out = self.store.payment_op(op).await?;
        if !out.replayed {
            self.follow(&out.applied);
            log_recorded(&out);
        }
        Ok(out)
    }

    /// Cluster mode: the database applies the payment first, once
    /// cluster-wide (`cluster::payments`); then this node's store and
    /// memory follow what it applied. A replay there is a replay here,
    /// whichever node applied it.
    async fn apply_cluster(
        &self,
        c: &std::sync::Arc<crate::cluster::Cluster>,
        op: PaymentOp,
    ) -> Result<PaymentOutcome, StoreError> {
        use crate::cluster::payments::Claim;
        // A replay of a new payment: its references and credit, for the
        // store copy a node killed after the database's transaction lacks.
        let mut replay_copy = None;
        let (claim, local) = match op {
            PaymentOp::Record {
                refs,
                payment,
                credit,
            } => {
                // The provider's own ids name the money movement: the
                // same payment reaching two nodes moves it once.
                let money = money_reference(&refs);
                replay_copy = Some((refs.clone(), credit.clone()));
                let claim = c
                    .claim_payment(refs.clone(), *payment, credit, money)
                    .await
                    .map_err(StoreError::Database)?;
                let local = match &claim {
                    Claim::New { payment, credit } => Some(PaymentOp::Record {
                        refs,
                        payment: Box::new(payment.clone()),
                        credit: credit.clone(),
                    }),
                    _ => None,
                };
                (claim, local)
            }
            PaymentOp::Refund {
                event,
                of,
                refunded_total,
                at_ms,
                unknown,
            } => {
                let claim = c
                    .claim_refund(event.clone(), of.clone(), refunded_total, at_ms, *unknown)
                    .await
                    .map_err(StoreError::Database)?;
                let local = match &claim {
                    Claim::New { payment, .. } => Some(PaymentOp::Record {
                        refs: vec![event],
                        payment: Box::new(payment.clone()),
                        credit: None,
                    }),
                    // This node's store mirrors the reversal when it holds
                    // the payment (made here); else the database has it all.
                    Claim::Refunded(p) => {
                        self.store
                            .payment_by_ref(&p.provider, &of)?
                            .map(|_| PaymentOp::Refund {
                                event,
                                of,
                                refunded_total,
                                at_ms,
                                unknown: Box::new(p.clone()),
                            })
                    }
                    Claim::Replay(_) => None,
                };
                (claim, local)
            }
            other => return self.store.payment_op(other).await,
        };
        let db_record = match claim {
            Claim::Replay(p) => {
                if let Some((refs, credit)) = replay_copy {
                    self.catch_up(c, refs, credit, &p).await;
                }
                return Ok(PaymentOutcome {
                    payment: Some(p),
                    replayed: true,
                    applied: Applied::Nothing,
                });
            }
            Claim::New { payment, .. } | Claim::Refunded(payment) => payment,
        };
        let applied = match local {
            Some(op) => self.mirror(c, op, &db_record).await,
            None => Applied::Nothing,
        };
        let out = PaymentOutcome {
            payment: Some(db_record),
            replayed: false,
            applied,
        };
        log_recorded(&out);
        Ok(out)
    }

    /// This node's store (and memory, and the key's record in the
    /// database) follows what the database applied: `op` on the store.
    async fn mirror(
        &self,
        c: &crate::cluster::Cluster,
        op: PaymentOp,
        db_record: &PaymentRecord,
    ) -> Applied {
        match self.store.payment_op(op).await {
            Ok(out) if !out.replayed => {
                self.follow(&out.applied);
                if let Applied::Key { hash, .. } = &out.applied {
                    c.publish(crate::cluster::sync::Change::Key(*hash)).await;
                }
                if let Some(local) = &out.payment {
                    c.payment_kept(db_record, local).await;
                }
                out.applied
            }
            Ok(_) => Applied::Nothing,
            // The database has the payment and its money: the local
            // mirror missing it is logged, not answered as a failure
            // (a retry would be a replay).
            Err(e) => {
                tracing::warn!(
                    payment = %db_record.id, error = %e,
                    "cluster: a payment applied in the database was not mirrored in the local store"
                );
                Applied::Nothing
            }
        }
    }

    /// A replay of a payment this node applied in the database but whose
    /// store copy it lacks (it was killed between the two): the copy is
    /// taken now, so its store, ledger and outbox catch up. Once: the
    /// store's references make a second copy a replay there; and only by
    /// the node that made the payment (another never had the copy).
    async fn catch_up(
        &self,
        c: &crate::cluster::Cluster,
        refs: Vec<String>,
        credit: Option<PaymentCredit>,
        db_record: &PaymentRecord,
    ) {
        if !matches!(self.store.payment(&db_record.id), Ok(None)) {
            return;
        }
        match c.payment_origin(&db_record.id).await {
            Ok(Some(node)) if node == c.node_id() => {}
            _ => return,
        }
        // The credit the database applied (none when it needed attention).
        let credit = credit.filter(|_| db_record.status == PaymentStatus::Succeeded);
        tracing::warn!(
            payment = %db_record.id,
            "cluster: a payment this node applied in the database lacked its store copy; taken now"
        );
        let op = PaymentOp::Record {
            refs,
            payment: Box::new(db_record.clone()),
            credit,
        };
        self.mirror(c, op, db_record).await;
    }

    fn follow(&self, applied: &Applied) {
        let now = self.now_ms;
        match applied {
            Applied::Nothing => {}
            Applied::Account { id, balance_delta } => self
                .gate
                .wallets()
                .changed(id, |live| live.credited(*balance_delta, 0, now)),
            Applied::Key {
                hash,
                limit,
                spent_delta,
            } => {
                if *spent_delta > 0
                    && let Some(live) = self.gate.peek(hash)
                {
                    // The store took the credit back as spending, past the
                    // limit if need be; a negative refund is exactly that
                    // in memory (committed and the period's spent grow).
                    self.gate.refund(&live, Pico(-spent_delta));
                }
                match self.cluster {
                    Some(c) => c.key_limit_changed(self.gate, hash, *limit),
                    None => self.gate.set_limit(hash, *limit),
                }
            }
        }
    }
}

fn log_recorded(out: &PaymentOutcome) {
    if let Some(p) = &out.payment {
        tracing::info!(
            payment = %p.id, provider = %p.provider, status = p.status.as_str(),
            amount = %p.amount, "payment recorded"
        );
    }
}

// ---- Stripe: one function per event ----

/// Applies a verified Stripe event. `None`: a type (or state) Tollgate
/// does not act on, answered 200 and not recorded.
pub async fn stripe_event(
    ctx: &PaymentCtx<'_>,
    cfg: &StripeConfig,
    event: &Event,
) -> Result<Option<PaymentOutcome>, StoreError> {
    let op = match &event.body {
        EventBody::Checkout(s) if s.mode == "subscription" => {
            return checkout_subscription(ctx, cfg, &event.id, s)
                .await
                .map(Some);
        }
        EventBody::Checkout(s) => match checkout_payment(cfg, &event.id, s, ctx.now_ms) {
            Some(op) => op,
            None => return Ok(None),
        },
        EventBody::ChargeRefunded(c) => charge_refunded(cfg, &event.id, c, ctx.now_ms),
        EventBody::InvoicePaid(i) => return invoice_paid(ctx, &event.id, i).await.map(Some),
        EventBody::InvoiceFailed(i) => {
            return invoice_payment_failed(ctx, &event.id, i).await.map(Some);
        }
        EventBody::SubscriptionUpdated(s) => {
            return subscription_updated(ctx, &event.id, s).await.map(Some);
        }
        EventBody::SubscriptionDeleted(s) => {
            return subscription_deleted(ctx, &event.id, s).await.map(Some);
        }
        EventBody::Ignored => return Ok(None),
    };
    ctx.apply(op).await.map(Some)
}

/// The id a payment's money moves under in the database (cluster mode):
/// the payment's own reference (`cs:`, `order:`, `ref:` …) rather than the
/// event that told of it, so two different events of one checkout session
/// reaching two nodes credit it once; an event id only when it is all
/// there is.
fn money_reference(refs: &[String]) -> Option<String> {
    refs.iter()
        .find(|r| !r.starts_with("evt:"))
        .or_else(|| refs.first())
        .map(|r| format!("pay:{r}"))
}

fn evt_ref(event_id: &str) -> String {
    format!("evt:{event_id}")
}

/// The account a session or subscription names: `metadata.account`, else
/// `client_reference_id`.
fn account_of(
    metadata: &std::collections::BTreeMap<String, String>,
    fallback: Option<&str>,
) -> Option<String> {
    metadata
        .get("account")
        .map(String::as_str)
        .or(fallback)
        .filter(|a| !a.is_empty())
        .map(str::to_owned)
}

/// `checkout.session.completed` (or `async_payment_succeeded`), `mode =
/// payment`: a top-up of the account (or, with `metadata.key`, the key)
/// by `amount_total`. Not yet paid (`payment_status` ≠ `paid`): nothing,
/// Stripe sends `async_payment_succeeded` when it is.
pub fn checkout_payment(
    cfg: &StripeConfig,
    event_id: &str,
    s: &CheckoutSession,
    now_ms: i64,
) -> Option<PaymentOp> {
    if s.payment_status != "paid" {
        return None;
    }
    let mut p = new_record("stripe", &s.id, "topup", now_ms);
    p.events.push(event_id.to_owned());
    p.currency = s.currency.clone().unwrap_or_default();
    p.account = account_of(&s.metadata, s.client_reference_id.as_deref());
    p.key = s.metadata.get("key").cloned();
    let mut refs = vec![evt_ref(event_id), format!("cs:{}", s.id)];
    if let Some(pi) = &s.payment_intent {
        refs.push(format!("pi:{pi}"));
    }
    let amount = s.amount_total.and_then(stripe::cents_to_pico);
    let kind = s.metadata.get("kind").map(String::as_str);
    let mut credit = None;
    p = match amount {
        None => attention(p, "amount_total is missing or not a whole number of cents"),
        Some(a) => {
            p.amount = a;
            if !p.currency.eq_ignore_ascii_case(&cfg.currency) {
                let why = format!(
                    "currency {:?}, expected {:?}; nothing applied",
                    p.currency, cfg.currency
                );
                attention(p, why)
            } else if kind != Some("topup") {
                let why = format!("metadata.kind {kind:?} is not \"topup\"; nothing applied");
                attention(p, why)
            } else if let Some(key) = p.key.clone() {
                match parse_key_hash(&key) {
                    Some(hash) => {
                        credit = Some(PaymentCredit::Key(hash));
                        p
                    }
                    None => attention(p, "metadata.key is not a key hash; nothing applied"),
                }
            } else if let Some(account) = p.account.clone() {
                credit = Some(PaymentCredit::Account(account));
                p
            } else {
                attention(
                    p,
                    "no metadata.account, client_reference_id or metadata.key",
                )
            }
        }
    };
    Some(PaymentOp::Record {
        refs,
        payment: Box::new(p),
        credit,
    })
}

/// A key hash as 64 lowercase hex digits.
pub fn parse_key_hash(text: &str) -> Option<crate::store::KeyHash> {
    if text.len() != 64 || !text.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')) {
        return None;
    }
    let mut out = [0u8; 32];
    hex::decode_to_slice(text, &mut out).ok()?;
    Some(out)
}

/// `charge.refunded`: what is newly refunded (`amount_refunded` minus
/// what was refunded before) is taken back from the payment's account or
/// key, into overdraft if need be.
pub fn charge_refunded(cfg: &StripeConfig, event_id: &str, c: &Charge, now_ms: i64) -> PaymentOp {
    let mut unknown = new_record("stripe", &c.id, "refund", now_ms);
    unknown.events.push(event_id.to_owned());
    unknown.currency = c.currency.clone();
    unknown.amount = stripe::cents_to_pico(c.amount_refunded).unwrap_or(Pico::ZERO);
    let total = stripe::cents_to_pico(c.amount_refunded);
    let of = match &c.payment_intent {
        Some(pi) => format!("pi:{pi}"),
        None => format!("ch:{}", c.id),
    };
    match total {
        Some(total) if c.currency.eq_ignore_ascii_case(&cfg.currency) => PaymentOp::Refund {
            event: evt_ref(event_id),
            of,
            refunded_total: total,
            at_ms: now_ms,
            unknown: Box::new(attention(
                unknown,
                "refund of a payment Tollgate does not know; nothing applied",
            )),
        },
        _ => PaymentOp::Record {
            refs: vec![evt_ref(event_id)],
            payment: Box::new(attention(
                unknown,
                format!(
                    "refund in currency {:?} (expected {:?}) or of a bad amount; nothing applied",
                    c.currency, cfg.currency
                ),
            )),
            credit: None,
        },
    }
}

/// Subscription events are recorded, not applied, until the accounts
/// issue's subscriptions land.
const NO_SUBSCRIPTIONS: &str = "subscriptions not enabled";

/// What a subscription event did: the subscription's id, or why it could
/// not be applied.
type SubscriptionDone = Result<String, String>;

/// Records a subscription event's payment once per event id, after its
/// subscription change was made. The change comes first and is idempotent
/// on its own (a renewal on the event id, a start on the Stripe
/// subscription id, a status that is already so), so a crash between the
/// two, or a duplicate delivery, applies it once: the retry redoes a no-op
/// and then records.
async fn subscription_record(
    ctx: &PaymentCtx<'_>,
    event_id: &str,
    mut p: PaymentRecord,
    done: SubscriptionDone,
    applied_status: PaymentStatus,
) -> Result<PaymentOutcome, StoreError> {
    p.events.push(event_id.to_owned());
    let p = match done {
        Ok(sid) => {
            p.status = applied_status;
            p.reason = Some(format!("subscription {sid}"));
            p
        }
        Err(why) => attention(p, why),
    };
    ctx.apply(PaymentOp::Record {
        refs: vec![evt_ref(event_id)],
        payment: Box::new(p),
        credit: None,
    })
    .await
}

/// The Tollgate subscription whose `external_id` is Stripe's `sub_…`.
fn by_external(
    b: &crate::billing::subscriptions::Billing<'_>,
    external: Option<&str>,
) -> Result<crate::store::SubscriptionRecord, String> {
    let ext = external.ok_or("the event names no subscription")?;
    b.by_external_id(ext)
        .map_err(|e| e.message.to_string())?
        .ok_or_else(|| format!("no subscription with external_id {ext}"))
}

/// A subscription rule's answer as a [`SubscriptionDone`].
fn done(r: Result<crate::store::SubscriptionRecord, crate::error::ApiError>) -> SubscriptionDone {
    r.map(|s| s.id).map_err(|e| e.message.to_string())
}

/// The shape of every event about an existing subscription: find it by
/// `external` (Stripe's subscription id), name its account on the payment
/// record, then apply `act`, one of the subscription rules.
async fn with_subscription(
    ctx: &PaymentCtx<'_>,
    external: Option<&str>,
    account: &mut Option<String>,
    act: impl AsyncFnOnce(
        &crate::billing::subscriptions::Billing<'_>,
        crate::store::SubscriptionRecord,
    ) -> SubscriptionDone,
) -> SubscriptionDone {
    let Some(b) = &ctx.subscriptions else {
        return Err(NO_SUBSCRIPTIONS.to_owned());
    };
    let sub = by_external(b, external)?;
    *account = Some(sub.account.clone());
    act(b, sub).await
}

/// `checkout.session.completed`, `mode = subscription`, `metadata.plan`:
/// starts a subscription with `external_id` = `s.subscription`.
pub async fn checkout_subscription(
    ctx: &PaymentCtx<'_>,
    cfg: &StripeConfig,
    event_id: &str,
    s: &CheckoutSession,
) -> Result<PaymentOutcome, StoreError> {
    let mut p = new_record(
        "stripe",
        s.subscription.as_deref().unwrap_or(&s.id),
        "subscription",
        ctx.now_ms,
    );
    p.account = account_of(&s.metadata, s.client_reference_id.as_deref());
    p.currency = s.currency.clone().unwrap_or_else(|| cfg.currency.clone());
    p.amount = s
        .amount_total
        .and_then(stripe::cents_to_pico)
        .unwrap_or(Pico::ZERO);
    let done = match &ctx.subscriptions {
        None => Err(NO_SUBSCRIPTIONS.to_owned()),
        Some(b) => match (&p.account, s.metadata.get("plan"), s.subscription.as_deref()) {
            (Some(account), Some(plan), Some(ext)) => match b.by_external_id(ext) {
                Ok(Some(existing)) => Ok(existing.id),
                Ok(None) => done(b.subscribe(account, plan, None, Some(ext.to_owned())).await),
                Err(e) => Err(e.message.to_string()),
            },
            _ => Err("metadata.account (or client_reference_id), metadata.plan and the subscription id are needed".to_owned()),
        },
    };
    subscription_record(ctx, event_id, p, done, PaymentStatus::Succeeded).await
}

/// `invoice.paid`: renews the period of the subscription with
/// `external_id` = `i.subscription_id()` (its grant).
pub async fn invoice_paid(
    ctx: &PaymentCtx<'_>,
    event_id: &str,
    i: &Invoice,
) -> Result<PaymentOutcome, StoreError> {
    let mut p = new_record("stripe", &i.id, "renewal", ctx.now_ms);
    p.currency = i.currency.clone().unwrap_or_default();
    p.amount = i
        .amount_paid
        .and_then(stripe::cents_to_pico)
        .unwrap_or(Pico::ZERO);
    let done = with_subscription(ctx, i.subscription_id(), &mut p.account, async |b, sub| {
        done(
            b.renew(&sub.id, &format!("stripe:{event_id}"))
                .await
                .map(|(s, _)| s),
        )
    })
    .await;
    subscription_record(ctx, event_id, p, done, PaymentStatus::Succeeded).await
}

/// `invoice.payment_failed`: the subscription becomes `past_due`.
pub async fn invoice_payment_failed(
    ctx: &PaymentCtx<'_>,
    event_id: &str,
    i: &Invoice,
) -> Result<PaymentOutcome, StoreError> {
    let mut p = new_record("stripe", &i.id, "renewal", ctx.now_ms);
    p.currency = i.currency.clone().unwrap_or_default();
    p.amount = i
        .amount_due
        .and_then(stripe::cents_to_pico)
        .unwrap_or(Pico::ZERO);
    let done = with_subscription(ctx, i.subscription_id(), &mut p.account, async |b, sub| {
        done(b.mark_past_due(&sub.id).await)
    })
    .await;
    subscription_record(ctx, event_id, p, done, PaymentStatus::Failed).await
}

/// `customer.subscription.updated`: a plan change (`s.price_id()` → the
/// plan whose `stripe_price` it is) or cancel at period end.
pub async fn subscription_updated(
    ctx: &PaymentCtx<'_>,
    event_id: &str,
    s: &Subscription,
) -> Result<PaymentOutcome, StoreError> {
    let mut p = new_record("stripe", &s.id, "subscription_update", ctx.now_ms);
    p.account = account_of(&s.metadata, None);
    let done = with_subscription(ctx, Some(&s.id), &mut p.account, async |b, sub| {
        let plan = s.price_id().and_then(|price| {
            b.config
                .plans
                .iter()
                .find(|(_, pl)| pl.stripe_price.as_deref() == Some(price))
                .map(|(name, _)| name.clone())
        });
        if let Some(plan) = plan
            && plan != sub.plan
        {
            done(b.change_plan(&sub.id, &plan).await)?;
        }
        if s.cancel_at_period_end != sub.cancel_at_period_end {
            done(
                b.set_cancel_at_period_end(&sub.id, s.cancel_at_period_end)
                    .await,
            )?;
        }
        Ok(sub.id)
    })
    .await;
    subscription_record(ctx, event_id, p, done, PaymentStatus::Succeeded).await
}

/// `customer.subscription.deleted`: the subscription is canceled.
pub async fn subscription_deleted(
    ctx: &PaymentCtx<'_>,
    event_id: &str,
    s: &Subscription,
) -> Result<PaymentOutcome, StoreError> {
    let mut p = new_record("stripe", &s.id, "subscription_cancel", ctx.now_ms);
    p.account = account_of(&s.metadata, None);
    let done = with_subscription(ctx, Some(&s.id), &mut p.account, async |b, sub| {
        if sub.status.is_live() {
            done(b.cancel(&sub.id, false).await)
        } else {
            // Already ended: nothing left to cancel.
            Ok(sub.id)
        }
    })
    .await;
    subscription_record(ctx, event_id, p, done, PaymentStatus::Succeeded).await
}

#[cfg(test)]
mod tests {
    use super::money_reference;

    #[test]
    fn money_moves_under_the_payments_own_reference() {
        let refs = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        // Two different events of one checkout session name the same money.
        assert_eq!(
            money_reference(&refs(&["evt:evt_1", "cs:cs_9", "pi:pi_3"])),
            Some("pay:cs:cs_9".to_owned())
        );
        assert_eq!(
            money_reference(&refs(&["evt:evt_2", "cs:cs_9"])),
            Some("pay:cs:cs_9".to_owned())
        );
        assert_eq!(
            money_reference(&refs(&["order:A-1"])),
            Some("pay:order:A-1".to_owned())
        );
        // An event id only when nothing else names the payment.
        assert_eq!(
            money_reference(&refs(&["evt:evt_3"])),
            Some("pay:evt:evt_3".to_owned())
        );
        assert_eq!(money_reference(&[]), None);
    }
}
