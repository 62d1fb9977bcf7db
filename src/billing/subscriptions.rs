//! Subscriptions: an account subscribed to a plan, period after period.
//!
//! ```text
//! trialing ──renew──▶ (trial end) active ──period end, renewed──▶ active (next period)
//!     │                                 └─period end, not renewed──▶ past_due ──renew──▶ active
//!     └─trial end, not renewed──▶ expired         past_due + grace ──▶ expired
//! cancel (now) or cancel_at_period_end (at the end) ──▶ canceled
//! ```
//!
//! Money: each period start grants the plan's `grant` to the account's
//! allowance once (ledger `grant`, `T` marker per subscription + period);
//! at a period's end the unused allowance lapses (ledger `lapse`) unless
//! the plan has `rollover`; an ended subscription lapses it whatever the
//! plan. An upgrade applies at once and grants the difference of the two
//! plans' grants pro rata by the time left in the period (rounded down to
//! the picoUSD, once per period and plan); a downgrade applies at the next
//! period start. An account's keys get 402 `subscription_inactive` once
//! its latest subscription ended, and the live plan's key template while
//! it is live (`template_over`).
//!
//! Every change is computed here from the stored subscription, then
//! applied by the store thread in one atomic batch that refuses it if the
//! subscription changed meanwhile ([`crate::store::SubscriptionWrite`]);
//! the live wallet follows what the store applied. The lifecycle runs on
//! `app.clock` from the sweeper ([`Billing::process_due`]).

use std::sync::OnceLock;

use crate::app::App;
use crate::clock::{Clock, DAY_MS};
use crate::config::{Config, Interval, PlanConfig};
use crate::error::ApiError;
use crate::gate::Gate;
use crate::money::Pico;
use crate::store::{
    AccountCreditKind, AccountStatus, KeyRecord, STALE_SUBSCRIPTION, Store, StoreError,
    SubscriptionMarker, SubscriptionMoney, SubscriptionOutcome, SubscriptionRecord,
    SubscriptionStatus, SubscriptionWrite,
};

/// Longest trial a request may ask for.
pub const MAX_TRIAL_DAYS: u32 = 366;

/// Longest `external_id`.
const MAX_EXTERNAL_ID: usize = 256;

/// What subscription changes use of the running gateway, borrowed (the
/// admin API builds it from its handler context, payments from the `App`).
#[derive(Clone, Copy)]
pub struct Billing<'a> {
    pub config: &'a Config,
    pub gate: &'a Gate,
    pub store: &'a Store,
    pub clock: &'a Clock,
    /// `[cluster]` mode: each write is published to the other nodes, and
    /// its grants and renewal key are claimed once cluster-wide first
    /// (`cluster::subscriptions`).
    pub cluster: Option<&'a std::sync::Arc<crate::cluster::Cluster>>,
}

/// A plan that can be subscribed to: its period length and money terms.
struct Terms<'c> {
    plan: &'c PlanConfig,
    interval: Interval,
}

impl Terms<'_> {
    fn grant(&self) -> Pico {
        self.plan.grant.unwrap_or(Pico::ZERO)
    }

    fn grace_ms(&self) -> i64 {
        self.plan.grace.map(|g| g.as_millis() as i64).unwrap_or(0)
    }

    /// Upgrades compare grants first, then prices.
    fn rank(&self) -> (Pico, Pico) {
        (self.grant(), self.plan.price.unwrap_or(Pico::ZERO))
    }
}

/// Applies a plan's key template over a key's own record: each template
/// field the plan sets replaces the key's; money and expiry (`limit`,
/// `limit_reset`, `daily_fee`, `expires_in`) stay the key's own, since a
/// subscribed key spends the account's allowance. The one place a
/// subscription's plan shapes its keys (`Gate::admit` calls it).
pub fn template_over(record: &mut KeyRecord, plan_name: &str, plan: &PlanConfig) {
    record.plan = Some(plan_name.to_owned());
    if plan.max_requests.is_some() {
        record.max_requests = plan.max_requests;
    }
    if plan.rpm.is_some() {
        record.rpm = plan.rpm;
    }
    if plan.tpm.is_some() {
        record.tpm = plan.tpm;
    }
    if plan.concurrency.is_some() {
        record.concurrency = plan.concurrency;
    }
    if !plan.models.is_empty() {
        record.models = plan.models.clone();
    }
    if !plan.allowed_ips.is_empty() {
        record.allowed_ips = plan.allowed_ips.iter().map(|n| n.to_string()).collect();
    }
    if plan.max_devices.is_some() {
        record.max_devices = plan.max_devices;
    }
}

fn sub_not_found() -> ApiError {
    ApiError::not_found("No subscription with this id.").with_param("id")
}

fn account_not_found() -> ApiError {
    ApiError::not_found("No account with this id.").with_param("id")
}

fn ended(s: &SubscriptionRecord) -> ApiError {
    ApiError::conflict(
        "subscription_ended",
        format!(
            "The subscription is {}; create a new one instead.",
            s.status.as_str()
        ),
    )
}

fn store_failed(e: StoreError) -> ApiError {
    match e {
        StoreError::NotFound => account_not_found(),
        StoreError::Database(why) => {
            tracing::warn!(error = %why, "subscription not written: the database is unreachable");
            crate::cluster::database_unavailable()
        }
        StoreError::Invalid(m) => ApiError::bad_request("invalid_request", m),
        other => {
            let mut e = ApiError::internal(other);
            e.message = "The store failed; nothing may have changed. Retry later.".into();
            e
        }
    }
}

/// Subscription writes run one at a time in the process: each computes
/// from the stored subscription, and the store's version check would
/// otherwise refuse the loser of a race.
async fn write_lock() -> tokio::sync::MutexGuard<'static, ()> {
    static LOCK: OnceLock<tokio::sync::Mutex<()>> = OnceLock::new();
    LOCK.get_or_init(|| tokio::sync::Mutex::new(()))
        .lock()
        .await
}

/// `sub_` + 24 random hex characters.
fn new_id() -> Result<String, ApiError> {
    let mut b = [0u8; 12];
    getrandom::fill(&mut b).map_err(|e| ApiError::internal(format!("random id: {e}")))?;
    Ok(format!("sub_{}", hex::encode(b)))
}

fn grant_money(sub: &SubscriptionRecord, amount: Pico, reason: String) -> SubscriptionMoney {
    SubscriptionMoney::Grant {
        amount,
        marker: SubscriptionMarker {
            tag: b'g',
            period: sub.period,
            extra: String::new(),
        },
        reason,
    }
}

/// The end of the period after `sub`'s current one (periods are counted
/// from `anchor`; a trial is period 0 before it).
fn next_end(sub: &SubscriptionRecord, interval: Interval) -> i64 {
    let k = (sub.period + 1).saturating_sub(u64::from(sub.trial_end.is_some())) as i64;
    interval.nth(sub.anchor, k + 1)
}

impl<'a> Billing<'a> {
    /// The billing view of the running gateway.
    pub fn of(app: &'a App) -> Billing<'a> {
        Billing {
            config: &app.config,
            gate: &app.gate,
            store: &app.store,
            clock: &app.clock,
            cluster: app.cluster.get(),
        }
    }

    /// A plan that can be subscribed to, or 400 naming `param`.
    fn terms(&self, name: &str, param: &'static str) -> Result<Terms<'a>, ApiError> {
        let plan = self.config.plans.get(name).ok_or_else(|| {
            ApiError::bad_request(
                "unknown_plan",
                format!(
                    "There is no plan named {:?}.",
                    crate::error::truncate(name, 64)
                ),
            )
            .with_param(param)
        })?;
        let interval = plan.interval.ok_or_else(|| {
            ApiError::bad_request(
                "plan_not_subscribable",
                format!(
                    "The plan {:?} has no `interval`: it is a key template only.",
                    crate::error::truncate(name, 64)
                ),
            )
            .with_param(param)
        })?;
        Ok(Terms { plan, interval })
    }

    /// A subscription as stored, or 404.
    pub fn get(&self, sid: &str) -> Result<SubscriptionRecord, ApiError> {
        self.store
            .subscription(sid)
            .map_err(store_failed)?
            .ok_or_else(sub_not_found)
    }

    /// An account's subscriptions, newest first. 404 if the account does not exist.
    pub fn of_account(&self, account: &str) -> Result<Vec<SubscriptionRecord>, ApiError> {
        if self
            .store
            .user_account(account)
            .map_err(store_failed)?
            .is_none()
        {
            return Err(account_not_found());
        }
        let mut all = self
            .store
            .subscriptions_where(|s| s.account == account)
            .map_err(store_failed)?;
        all.sort_by(|a, b| (b.created_at, &b.id).cmp(&(a.created_at, &a.id)));
        Ok(all)
    }

    /// The newest subscription with this payment-provider id.
    pub fn by_external_id(
        &self,
        external_id: &str,
    ) -> Result<Option<SubscriptionRecord>, ApiError> {
        let all = self
            .store
            .subscriptions_where(|s| s.external_id.as_deref() == Some(external_id))
            .map_err(store_failed)?;
        Ok(all.into_iter().max_by_key(|s| (s.created_at, s.version)))
    }

    /// Subscribes `account` to `plan` from now: period 0 is a trial of
    /// `trial_days` (else the plan's `trial_days`; 0: none) or a paid
    /// first period, and its grant is applied at once. 409
    /// `subscription_exists` if the account has a live subscription.
    pub async fn subscribe(
        &self,
        account: &str,
        plan: &str,
        trial_days: Option<u32>,
        external_id: Option<String>,
    ) -> Result<SubscriptionRecord, ApiError> {
        let terms = self.terms(plan, "plan")?;
        if let Some(d) = trial_days
            && d > MAX_TRIAL_DAYS
        {
            return Err(ApiError::bad_request(
                "invalid_value",
                format!("`trial_days` must be from 0 to {MAX_TRIAL_DAYS}."),
            )
            .with_param("trial_days"));
        }
        if let Some(e) = &external_id
            && (e.is_empty() || e.len() > MAX_EXTERNAL_ID || e.chars().any(char::is_control))
        {
            return Err(ApiError::bad_request(
                "invalid_value",
                format!(
                    "`external_id` must be 1 to {MAX_EXTERNAL_ID} bytes, no control characters."
                ),
            )
            .with_param("external_id"));
        }
        let _guard = write_lock().await;
        let a = self
            .store
            .user_account(account)
            .map_err(store_failed)?
            .ok_or_else(account_not_found)?;
        if a.status == AccountStatus::Closed {
            return Err(ApiError::conflict(
                "account_closed",
                "The account is closed; it cannot subscribe.",
            ));
        }
        let now = self.clock.now_ms();
        // A live one whose end the sweeper has not reached yet is moved on
        // first: if that ends it, the account may subscribe again now.
        if let Some(l) = a.subscription.as_ref().filter(|l| l.status.is_live()) {
            match self.live_settled(&l.id, now).await {
                Err(e) if e.code == "subscription_ended" => {}
                Err(e) => return Err(e),
                Ok(_) => {
                    return Err(ApiError::conflict(
                        "subscription_exists",
                        "The account already has a live subscription; change its plan instead.",
                    ));
                }
            }
        }
        let trial = trial_days.or(terms.plan.trial_days).unwrap_or(0);
        let mut sub = SubscriptionRecord {
            id: new_id()?,
            account: account.to_owned(),
            plan: plan.to_owned(),
            external_id,
            created_at: now,
            updated_at: now,
            current_period_start: now,
            ..SubscriptionRecord::default()
        };
        if trial > 0 {
            let end = now.saturating_add(i64::from(trial) * DAY_MS);
            sub.status = SubscriptionStatus::Trialing;
            sub.trial_end = Some(end);
            sub.current_period_end = end;
            sub.anchor = end;
        } else {
            sub.status = SubscriptionStatus::Active;
            sub.anchor = now;
            sub.current_period_end = terms.interval.nth(now, 1);
        }
        let money = vec![grant_money(
            &sub,
            terms.grant(),
            format!("{plan}: period 0 grant"),
        )];
        let out = self
            .store_write(SubscriptionWrite {
                sub,
                expect_version: None,
                money,
                renewal_key: None,
                at_ms: now,
                replica: false,
            })
            .await
            .map_err(|e| match e {
                StoreError::Exists => ApiError::conflict(
                    "subscription_exists",
                    "The account already has a live subscription; change its plan instead.",
                ),
                other => store_failed(other),
            })?;
        self.follow(&out);
        tracing::info!(sub = %out.sub.id, account, plan, "subscribed");
        Ok(out.sub)
    }

    /// The operator was paid for the next period. Applied once per
    /// `idempotency_key` (a repeat answers the subscription with `true`);
    /// a past-due subscription becomes active, and one whose period
    /// already ended rolls at once. 409 `subscription_ended` once canceled
    /// or expired.
    pub async fn renew(
        &self,
        sid: &str,
        idempotency_key: &str,
    ) -> Result<(SubscriptionRecord, bool), ApiError> {
        if idempotency_key.is_empty() || idempotency_key.chars().count() > 256 {
            return Err(ApiError::bad_request(
                "invalid_value",
                "`idempotency_key` must be 1 to 256 characters.",
            )
            .with_param("idempotency_key"));
        }
        let _guard = write_lock().await;
        if self
            .store
            .renewal_applied(sid, idempotency_key)
            .map_err(store_failed)?
            .is_some()
        {
            return Ok((self.get(sid)?, true));
        }
        let now = self.clock.now_ms();
        let (mut sub, expect, mut money) = self.live_settled(sid, now).await?;
        sub.paid_through = sub.paid_through.max(sub.period) + 1;
        sub.cancel_at_period_end = false;
        if sub.status == SubscriptionStatus::PastDue {
            sub.status = SubscriptionStatus::Active;
            sub.past_due_since = None;
        }
        self.settle_due(&mut sub, &mut money, now)?;
        sub.updated_at = now;
        let out = self
            .write(sub, expect, money, Some(idempotency_key.to_owned()), now)
            .await?;
        Ok((out.sub, out.replayed))
    }

    /// A payment failed: a live subscription becomes `past_due` now and
    /// expires `grace` later unless renewed. Already past due: unchanged.
    pub async fn mark_past_due(&self, sid: &str) -> Result<SubscriptionRecord, ApiError> {
        let _guard = write_lock().await;
        let now = self.clock.now_ms();
        let (mut sub, expect, mut money) = self.live_settled(sid, now).await?;
        if sub.status != SubscriptionStatus::PastDue {
            sub.status = SubscriptionStatus::PastDue;
            sub.past_due_since = Some(now);
            self.settle_due(&mut sub, &mut money, now)?;
        }
        sub.updated_at = now;
        Ok(self.write(sub, expect, money, None, now).await?.sub)
    }

    /// Cancels now (`canceled`, the allowance lapses) or at the period's
    /// end (`cancel_at_period_end`). 409 `subscription_ended` once ended.
    pub async fn cancel(
        &self,
        sid: &str,
        at_period_end: bool,
    ) -> Result<SubscriptionRecord, ApiError> {
        let _guard = write_lock().await;
        let now = self.clock.now_ms();
        let (mut sub, expect, mut money) = self.live_settled(sid, now).await?;
        if at_period_end {
            sub.cancel_at_period_end = true;
        } else {
            sub.status = SubscriptionStatus::Canceled;
            sub.ended_at = Some(now);
            money.push(SubscriptionMoney::LapseAll {
                reason: format!("{}: canceled", sub.plan),
                period: sub.period,
            });
        }
        sub.updated_at = now;
        Ok(self.write(sub, expect, money, None, now).await?.sub)
    }

    /// Sets or clears `cancel_at_period_end` (`PATCH`). 409 once ended.
    pub async fn set_cancel_at_period_end(
        &self,
        sid: &str,
        on: bool,
    ) -> Result<SubscriptionRecord, ApiError> {
        if on {
            return self.cancel(sid, true).await;
        }
        let _guard = write_lock().await;
        let now = self.clock.now_ms();
        let (mut sub, expect, money) = self.live_settled(sid, now).await?;
        sub.cancel_at_period_end = false;
        sub.updated_at = now;
        Ok(self.write(sub, expect, money, None, now).await?.sub)
    }

    /// Changes the plan. An upgrade (a larger grant, or the same grant at
    /// a higher price) applies now and grants
    /// `(new grant − old grant) × time left / period length`, rounded
    /// down, once per period and plan; a downgrade waits for the next
    /// period start (`next_plan`); the current plan cancels a pending
    /// downgrade. 409 once ended.
    pub async fn change_plan(&self, sid: &str, plan: &str) -> Result<SubscriptionRecord, ApiError> {
        let new = self.terms(plan, "plan")?;
        let _guard = write_lock().await;
        let now = self.clock.now_ms();
        let (mut sub, expect, mut money) = self.live_settled(sid, now).await?;
        if sub.plan == plan {
            sub.next_plan = None;
        } else {
            let old = self.terms(&sub.plan, "plan")?;
            if new.rank() > old.rank() {
                let diff = new.grant().0.saturating_sub(old.grant().0).max(0);
                let span = (sub.current_period_end - sub.current_period_start).max(1);
                let left = (sub.current_period_end - now).clamp(0, span);
                let pro_rata = (i128::from(diff) * i128::from(left) / i128::from(span)) as i64;
                money.push(SubscriptionMoney::Grant {
                    amount: Pico(pro_rata),
                    marker: SubscriptionMarker {
                        tag: b'u',
                        period: sub.period,
                        extra: plan.to_owned(),
                    },
                    reason: format!("upgrade {} → {plan}: pro rata grant", sub.plan),
                });
                sub.plan = plan.to_owned();
                sub.next_plan = None;
            } else {
                sub.next_plan = Some(plan.to_owned());
            }
        }
        sub.updated_at = now;
        Ok(self.write(sub, expect, money, None, now).await?.sub)
    }

    /// The stored subscription moved through every boundary `now` passed
    /// (not yet written), with the version read and the money the moves
    /// make. One that is, or just became, ended: the moves are written and
    /// the answer is 409 `subscription_ended`. Call under `write_lock`.
    async fn live_settled(
        &self,
        sid: &str,
        now: i64,
    ) -> Result<(SubscriptionRecord, u64, Vec<SubscriptionMoney>), ApiError> {
        let mut sub = self.get(sid)?;
        let expect = sub.version;
        if !sub.status.is_live() {
            return Err(ended(&sub));
        }
        let mut money = Vec::new();
        self.settle_due(&mut sub, &mut money, now)?;
        if !sub.status.is_live() {
            sub.updated_at = now;
            let out = self.write(sub, expect, money, None, now).await?;
            return Err(ended(&out.sub));
        }
        Ok((sub, expect, money))
    }

    /// The lifecycle on the clock: moves every live subscription whose
    /// period ended, or whose grace passed, to where `now` puts it.
    /// Returns how many changed. Run by the sweeper; idempotent.
    pub async fn process_due(&self) -> Result<usize, ApiError> {
        let now = self.clock.now_ms();
        let due = self
            .store
            .subscriptions_where(|s| {
                s.status.is_live()
                    && (now >= s.current_period_end
                        || (s.status == SubscriptionStatus::PastDue && s.past_due_since.is_some()))
            })
            .map_err(store_failed)?;
        let mut changed = 0;
        for s in due {
            let _guard = write_lock().await;
            // Read again under the lock: an admin change may have come first.
            let Some(mut sub) = self.store.subscription(&s.id).map_err(store_failed)? else {
                continue;
            };
            let before = sub.clone();
            let mut money = Vec::new();
            let now = self.clock.now_ms();
            self.settle_due(&mut sub, &mut money, now)?;
            if sub == before {
                continue;
            }
            sub.updated_at = now;
            let expect = before.version;
            match self.write(sub, expect, money, None, now).await {
                Ok(_) => changed += 1,
                Err(e) => {
                    tracing::warn!(sub = %s.id, error = %e.message, "subscription not advanced")
                }
            }
        }
        Ok(changed)
    }

    /// Advances `sub` through every boundary `now` has passed, collecting
    /// the money those moves make. Pure but for reading the plans.
    fn settle_due(
        &self,
        sub: &mut SubscriptionRecord,
        money: &mut Vec<SubscriptionMoney>,
        now: i64,
    ) -> Result<(), ApiError> {
        // Bounded: a gateway stopped for years rolls at most this many
        // prepaid periods in one go (each needs a renewal anyway).
        for _ in 0..1000 {
            if !sub.status.is_live() {
                return Ok(());
            }
            let terms = self.terms(&sub.plan, "plan")?;
            if sub.status == SubscriptionStatus::PastDue
                && let Some(since) = sub.past_due_since
            {
                let until = since.saturating_add(terms.grace_ms());
                if now >= until {
                    sub.status = SubscriptionStatus::Expired;
                    sub.ended_at = Some(until);
                    money.push(SubscriptionMoney::LapseAll {
                        reason: format!("{}: expired after grace", sub.plan),
                        period: sub.period,
                    });
                    return Ok(());
                }
            }
            if now < sub.current_period_end {
                return Ok(());
            }
            let end = sub.current_period_end;
            if sub.cancel_at_period_end {
                sub.status = SubscriptionStatus::Canceled;
                sub.ended_at = Some(end);
                money.push(SubscriptionMoney::LapseAll {
                    reason: format!("{}: canceled at period end", sub.plan),
                    period: sub.period,
                });
                return Ok(());
            }
            if sub.paid_through > sub.period {
                if !terms.plan.rollover {
                    money.push(SubscriptionMoney::LapseAll {
                        reason: format!("{}: period {} ended", sub.plan, sub.period),
                        period: sub.period,
                    });
                }
                let next = match sub.next_plan.take() {
                    Some(p) => self
                        .terms(&p, "plan")
                        .map(|_| p)
                        .unwrap_or_else(|_| sub.plan.clone()),
                    None => sub.plan.clone(),
                };
                let interval = self.terms(&next, "plan")?.interval;
                let new_end = next_end(sub, interval);
                sub.plan = next;
                sub.period += 1;
                sub.current_period_start = end;
                sub.current_period_end = new_end.max(end + 1);
                sub.status = SubscriptionStatus::Active;
                sub.past_due_since = None;
                let grant = self.terms(&sub.plan, "plan")?.grant();
                money.push(grant_money(
                    sub,
                    grant,
                    format!("{}: period {} grant", sub.plan, sub.period),
                ));
                continue;
            }
            match sub.status {
                SubscriptionStatus::Trialing => {
                    sub.status = SubscriptionStatus::Expired;
                    sub.ended_at = Some(end);
                    money.push(SubscriptionMoney::LapseAll {
                        reason: format!("{}: trial ended", sub.plan),
                        period: sub.period,
                    });
                    return Ok(());
                }
                SubscriptionStatus::Active => {
                    sub.status = SubscriptionStatus::PastDue;
                    sub.past_due_since = Some(end);
                }
                // Past due and waiting out its grace.
                _ => return Ok(()),
            }
        }
        Ok(())
    }

    /// One store write (the version read must still be current), then the
    /// live wallet follows what the store applied.
    async fn write(
        &self,
        sub: SubscriptionRecord,
        expect: u64,
        money: Vec<SubscriptionMoney>,
        renewal_key: Option<String>,
        now: i64,
    ) -> Result<SubscriptionOutcome, ApiError> {
        let out = self
            .store_write(SubscriptionWrite {
                sub,
                expect_version: Some(expect),
                money,
                renewal_key,
                at_ms: now,
                replica: false,
            })
            .await
            .map_err(|e| match e {
                StoreError::Invalid(m) if m == STALE_SUBSCRIPTION => ApiError::conflict(
                    "subscription_changed",
                    "The subscription changed meanwhile; nothing was done. Retry.",
                ),
                StoreError::NotFound => sub_not_found(),
                other => store_failed(other),
            })?;
        if !out.replayed {
            self.follow(&out);
        }
        Ok(out)
    }

    /// The store's write; in cluster mode its grants and renewal key are
    /// claimed in the database first (a grant another node claimed is not
    /// applied here; a renewal key another node claimed is a replay), and
    /// the write is published to the other nodes after.
    async fn store_write(
        &self,
        mut w: SubscriptionWrite,
    ) -> Result<SubscriptionOutcome, StoreError> {
        use crate::cluster::subscriptions::{
            AllowanceMove, OnceClaim, external_entry_id, grant_entry_id, lapse_entry_id,
            renewal_entry_id,
        };
        let Some(c) = self.cluster else {
            return self.store.write_subscription(w).await;
        };
        let sid = w.sub.id.clone();
        let claim = |id: String, kind: &'static str, allowance: AllowanceMove| OnceClaim {
            id,
            kind,
            allowance,
        };
        // In the money's order: the database's allowance moves as the
        // store's does (a period's lapse before the next period's grant).
        let mut ids: Vec<OnceClaim> = w
            .money
            .iter()
            .filter_map(|m| match m {
                SubscriptionMoney::Grant { marker, amount, .. } if amount.0 > 0 => Some(claim(
                    grant_entry_id(&sid, marker),
                    "grant",
                    AllowanceMove::Raise(amount.0),
                )),
                SubscriptionMoney::LapseAll { period, .. } => Some(claim(
                    lapse_entry_id(&sid, *period),
                    "lapse",
                    AllowanceMove::Lapse,
                )),
                _ => None,
            })
            .collect();
        let renewal = w.renewal_key.as_deref().map(|k| renewal_entry_id(&sid, k));
        if let Some(r) = &renewal {
            ids.push(OnceClaim::marker(r.clone(), "renewal"));
        }
        // One subscription per provider subscription: a checkout event
        // reaching two nodes starts it once.
        let external = match (&w.sub.external_id, w.expect_version) {
            (Some(e), None) => Some(external_entry_id(e)),
            _ => None,
        };
        if let Some(e) = &external {
            ids.push(OnceClaim::marker(e.clone(), "subscribe"));
        }
        let (held, new) = c
            .claim_once(&w.sub.account, ids, w.at_ms)
            .await
            .map_err(StoreError::Database)?;
        // A renewal key claimed before, even by this node, is a replay: a
        // node whose store was made anew (it pulls the record, not the
        // key) must not pay the period twice. (A node killed between the
        // claim and its store's write loses that renewal; the provider's
        // retry is answered as a replay.)
        if let Some(r) = &renewal
            && !new.contains(r)
        {
            // Applied already (here or on another node): as the store
            // answers a renewal key used before.
            c.unclaim(new).await;
            let sub = self.store.subscription(&sid)?.ok_or(StoreError::NotFound)?;
            let account = self
                .store
                .user_account(&sub.account)?
                .ok_or(StoreError::NotFound)?;
            return Ok(SubscriptionOutcome {
                sub,
                account,
                entries: Vec::new(),
                replayed: true,
            });
        }
        if let Some(e) = &external
            && !held.contains(e)
        {
            c.unclaim(new).await;
            return Err(StoreError::Exists);
        }
        w.money.retain(|m| match m {
            SubscriptionMoney::Grant { marker, .. } => held.contains(&grant_entry_id(&sid, marker)),
            SubscriptionMoney::LapseAll { .. } => true,
        });
        let lapses = w
            .money
            .iter()
            .any(|m| matches!(m, SubscriptionMoney::LapseAll { .. }));
        match self.store.write_subscription(w).await {
            Ok(out) if !out.replayed => {
                c.publish(crate::cluster::sync::Change::Subscription(
                    out.sub.id.clone(),
                ))
                .await;
                if lapses {
                    // This node's slice may come from the lapsed allowance.
                    c.return_account(&out.account.id).await;
                }
                Ok(out)
            }
            other => {
                c.unclaim(new).await;
                other
            }
        }
    }

    /// Applies to the live wallet what the store applied.
    fn follow(&self, out: &SubscriptionOutcome) {
        let wallets = self.gate.wallets();
        wallets.changed(&out.account.id, |live| {
            for e in &out.entries {
                match e.kind {
                    AccountCreditKind::Grant => live.granted(e.amount.0),
                    AccountCreditKind::Lapse => live.lapsed(e.amount.0),
                    _ => {}
                }
            }
            live.set_subscription(out.account.subscription.as_ref(), wallets.plans());
        });
    }
}

/// The sweeper's call: runs the lifecycle, logging failures. In cluster
/// mode only on the node holding the lifecycle lock for this pass.
pub async fn sweep(app: &App) {
    let _lock = match app.cluster.get() {
        Some(c) => match c.sweep_lock().await {
            Some(lock) => Some(lock),
            None => return,
        },
        None => None,
    };
    match Billing::of(app).process_due().await {
        Ok(0) => {}
        Ok(n) => tracing::debug!(n, "subscriptions advanced"),
        Err(e) => tracing::warn!(error = %e.message, "subscription lifecycle failed"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn months_are_counted_from_the_anchor() {
        // 2026-01-31T10:00Z
        let jan31 = crate::clock::days_from_civil(2026, 1, 31) * DAY_MS + 10 * 3_600_000;
        let feb = Interval::Month.nth(jan31, 1);
        let mar = Interval::Month.nth(jan31, 2);
        assert_eq!(
            feb,
            crate::clock::days_from_civil(2026, 2, 28) * DAY_MS + 10 * 3_600_000
        );
        assert_eq!(
            mar,
            crate::clock::days_from_civil(2026, 3, 31) * DAY_MS + 10 * 3_600_000
        );
        assert_eq!(Interval::Year.nth(jan31, 1) - jan31, 365 * DAY_MS);
        assert_eq!(Interval::Week.nth(jan31, 2) - jan31, 14 * DAY_MS);
    }

    #[test]
    fn plan_terms_are_checked_at_parse() {
        const MINIMAL: &str = "[[upstreams]]\nname = \"mock\"\nmock = true\n[models.\"m\"]\ninput = \"1\"\noutput = \"1\"\n";
        let parse = |plan: &str| Config::parse(&format!("{MINIMAL}[plans.p]\n{plan}\n"), "t.toml");
        let c = parse("interval = \"month\"\ngrant = \"0.000001\"\nprice = \"9.99\"\nrollover = true\ntrial_days = 7\ngrace = \"3d\"\nstripe_price = \"price_1\"").unwrap();
        let p = &c.plans["p"];
        assert_eq!(p.interval, Some(Interval::Month));
        assert_eq!(p.grant, Some(Pico(1_000_000)));
        assert_eq!(p.price, Some(Pico::parse_usd("9.99").unwrap()));
        assert!(p.rollover);
        for (bad, says) in [
            ("grant = \"1\"", "need interval"),
            (
                "interval = \"month\"\ngrant = \"-1\"",
                "grant must not be negative",
            ),
            ("interval = \"month\"\nprice = \"0.0000000000001\"", "price"),
            ("interval = \"fortnight\"", "interval"),
            ("interval = \"day\"\ntrial_days = 400", "trial_days"),
            ("interval = \"day\"\nstripe_price = \"\"", "stripe_price"),
        ] {
            let e = parse(bad).unwrap_err().to_string();
            assert!(e.contains(says), "{bad}: {e}");
        }
    }

    #[test]
    fn the_template_replaces_only_what_the_plan_sets() {
        let mut rec = KeyRecord {
            rpm: Some(5),
            tpm: Some(100),
            models: vec!["a".into()],
            ..KeyRecord::default()
        };
        let plan = PlanConfig {
            rpm: Some(60),
            concurrency: Some(2),
            ..PlanConfig::default()
        };
        template_over(&mut rec, "pro", &plan);
        assert_eq!(rec.plan.as_deref(), Some("pro"));
        assert_eq!(rec.rpm, Some(60));
        assert_eq!(rec.concurrency, Some(2));
        assert_eq!(rec.tpm, Some(100), "unset in the plan: the key's own");
        assert_eq!(rec.models, vec!["a".to_owned()]);
    }
}
