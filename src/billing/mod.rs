//! Accounts' wallets in memory: the money every key of an account draws
//! from, reserved lock-free on the hot path.
//!
//! One [`LiveAccount`] per account, loaded from the store on first use and
//! shared (by `Arc`) by all of the account's keys. Admission takes from
//! `headroom` (= allowance + balance + overdraft − reserved) with a
//! compare-and-swap that refuses to go below zero, the same rule as a
//! key's `committed`; so concurrent requests on several keys can never
//! overspend the account. Settlement moves the charge from reserved to
//! spent (allowance first, then balance); the store thread applies the
//! same charge to the stored account in the batch of the usage record.
//!
//! [`subscriptions`]: plans subscribed to by accounts, their periods,
//! grants and lapses, and the lifecycle the sweeper drives.

pub mod subscriptions;

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU8, AtomicU64, Ordering};
use std::sync::{Arc, OnceLock, RwLock};

use dashmap::DashMap;
use dashmap::mapref::entry::Entry;

use crate::config::PlanConfig;
use crate::error::ApiError;
use crate::money::Pico;
use crate::store::{AccountRecord, AccountStatus, Store};

/// One account's wallet while it is in memory.
pub struct LiveAccount {
    /// The account id (= its keys' `owner`), put in each usage record.
    pub id: Arc<str>,
    /// allowance + balance + overdraft − reserved: what admission takes from.
    headroom: AtomicI64,
    /// Mirrors the stored account, moved by settlements and credits.
    balance: AtomicI64,
    /// What remains of the period's grant; spent before the balance.
    allowance: AtomicI64,
    /// How far below zero the balance may go.
    overdraft: AtomicI64,
    /// Lifetime spent.
    spent: AtomicI64,
    /// Spent in the month `period`.
    period_spent: AtomicI64,
    /// `Period::Monthly` id of `period_spent`.
    period: AtomicI64,
    /// Never refused for money.
    unlimited: AtomicBool,
    /// `AccountStatus` as 0 active, 1 suspended, 2 closed.
    status: AtomicU8,
    /// `SUB_NONE` (prepaid only), `SUB_LIVE` or `SUB_ENDED` (keys get 402):
    /// one load per admission.
    sub_state: AtomicU8,
    /// Which plan template is in force (0: none); a key whose policy was
    /// compiled for another version recompiles it (`Gate::admit`).
    plan_version: AtomicU64,
    /// The live subscription's plan (name, template), read only when
    /// `plan_version` changed.
    plan: RwLock<Option<PlanTemplate>>,
    /// Cluster mode (`crate::cluster`): `headroom` is this node's lease of
    /// the account's credit, not the account's money, so credits and
    /// profile changes move only the mirrored numbers; leases move it.
    leased: AtomicBool,
}

/// A live subscription's plan: its name and its key template.
pub type PlanTemplate = (Arc<str>, Arc<PlanConfig>);

/// `LiveAccount::sub_state`: the account never had a subscription.
const SUB_NONE: u8 = 0;
/// Its latest subscription is live.
const SUB_LIVE: u8 = 1;
/// Its latest subscription ended: its keys are refused.
const SUB_ENDED: u8 = 2;

/// Source of `plan_version`s, unique across accounts.
static PLAN_VERSIONS: AtomicU64 = AtomicU64::new(1);

/// A snapshot of an account's money.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct WalletNumbers {
    pub balance: Pico,
    pub allowance: Pico,
    pub reserved: Pico,
    pub spent: Pico,
    pub period_spent: Pico,
    /// What the account's keys can still spend (None: unlimited).
    pub available: Option<Pico>,
}

fn status_code(s: AccountStatus) -> u8 {
    match s {
        AccountStatus::Active => 0,
        AccountStatus::Suspended => 1,
        AccountStatus::Closed => 2,
    }
}

impl LiveAccount {
    pub fn new(a: &AccountRecord, now_ms: i64) -> LiveAccount {
        let month = crate::clock::Period::Monthly.id(now_ms);
        let period_spent = if a.period == month {
            a.period_spent
        } else {
            Pico::ZERO
        };
        LiveAccount {
            id: Arc::from(a.id.as_str()),
            headroom: AtomicI64::new(a.funds().0),
            balance: AtomicI64::new(a.balance.0),
            allowance: AtomicI64::new(a.allowance.0),
            overdraft: AtomicI64::new(a.overdraft.0),
            spent: AtomicI64::new(a.spent.0),
            period_spent: AtomicI64::new(period_spent.0),
            period: AtomicI64::new(month.max(a.period)),
            unlimited: AtomicBool::new(a.unlimited),
            status: AtomicU8::new(status_code(a.status)),
            sub_state: AtomicU8::new(SUB_NONE),
            plan_version: AtomicU64::new(0),
            plan: RwLock::new(None),
            leased: AtomicBool::new(false),
        }
    }

    /// Cluster mode: admission draws from leases only; starts with none.
    pub fn set_leased(&self) {
        self.leased.store(true, Ordering::Release);
        self.headroom.store(0, Ordering::Release);
    }

    /// Whether `headroom` is a lease (cluster mode).
    pub fn is_leased(&self) -> bool {
        self.leased.load(Ordering::Acquire)
    }

    /// What admission may take now (a lease's unused part in cluster mode).
    pub fn headroom(&self) -> i64 {
        self.headroom.load(Ordering::Acquire)
    }

    /// Never refused for money.
    pub fn is_unlimited(&self) -> bool {
        self.unlimited.load(Ordering::Acquire)
    }

    /// Refuses the account's keys while it is not active.
    pub fn check_status(&self) -> Result<(), ApiError> {
        match self.status.load(Ordering::Acquire) {
            0 => Ok(()),
            1 => Err(ApiError::permission(
                "account_suspended",
                "The account of this key is suspended.",
            )),
            _ => Err(ApiError::permission(
                "account_closed",
                "The account of this key is closed.",
            )),
        }
    }

    /// Refuses the account's keys once its subscription ended (402).
    pub fn check_subscription(&self) -> Result<(), ApiError> {
        if self.sub_state.load(Ordering::Acquire) == SUB_ENDED {
            return Err(ApiError::insufficient_quota(
                "subscription_inactive",
                "The subscription of this key's account has ended; renew it to use this key.",
                "subscription",
            ));
        }
        Ok(())
    }

    /// The plan template in force and its version (0 and `None`: none).
    pub fn plan_version(&self) -> u64 {
        self.plan_version.load(Ordering::Acquire)
    }

    /// The plan template in force with its version, read together.
    pub fn plan(&self) -> (u64, Option<PlanTemplate>) {
        let slot = self.plan.read().unwrap_or_else(|e| e.into_inner());
        (self.plan_version.load(Ordering::Acquire), slot.clone())
    }

    /// Applies the account's subscription link: whether keys are refused,
    /// and which plan template they get.
    pub fn set_subscription(
        &self,
        link: Option<&crate::store::SubscriptionLink>,
        plans: &BTreeMap<String, Arc<PlanConfig>>,
    ) {
        let (state, plan) = match link {
            None => (SUB_NONE, None),
            Some(l) if l.status.is_live() => (
                SUB_LIVE,
                plans
                    .get(&l.plan)
                    .map(|p| (Arc::<str>::from(l.plan.as_str()), p.clone())),
            ),
            Some(_) => (SUB_ENDED, None),
        };
        let mut slot = self.plan.write().unwrap_or_else(|e| e.into_inner());
        let same = match (&*slot, &plan) {
            (None, None) => true,
            (Some((a, _)), Some((b, _))) => a == b,
            _ => false,
        };
        if !same {
            *slot = plan.clone();
            let v = if plan.is_some() {
                PLAN_VERSIONS.fetch_add(1, Ordering::AcqRel)
            } else {
                0
            };
            self.plan_version.store(v, Ordering::Release);
        }
        drop(slot);
        self.sub_state.store(state, Ordering::Release);
    }

    /// A grant the store applied: allowance and headroom go up.
    pub fn granted(&self, amount: i64) {
        self.allowance.fetch_add(amount, Ordering::AcqRel);
        if !self.is_leased() {
            self.headroom.fetch_add(amount, Ordering::AcqRel);
        }
    }

    /// A lapse the store applied (its amount from the committed account).
    /// Charges settled here but not yet committed there may leave the live
    /// allowance below zero: that part is moved to the balance, which is
    /// where the store charges those records when they arrive.
    pub fn lapsed(&self, amount: i64) {
        let before = self.allowance.fetch_sub(amount, Ordering::AcqRel);
        let after = before - amount;
        if after < 0 {
            self.allowance.fetch_add(-after, Ordering::AcqRel);
            self.balance.fetch_add(after, Ordering::AcqRel);
        }
        if !self.is_leased() {
            self.headroom.fetch_sub(amount, Ordering::AcqRel);
        }
    }

    /// Takes `amount` from the headroom if it fits (always, when
    /// unlimited); else what is available.
    pub fn try_reserve(&self, amount: i64) -> Result<(), i64> {
        if self.unlimited.load(Ordering::Acquire) {
            self.headroom.fetch_sub(amount, Ordering::AcqRel);
            return Ok(());
        }
        let mut cur = self.headroom.load(Ordering::Acquire);
        loop {
            if amount > cur {
                return Err(cur.max(0));
            }
            match self.headroom.compare_exchange_weak(
                cur,
                cur - amount,
                Ordering::AcqRel,
                Ordering::Acquire,
            ) {
                Ok(_) => return Ok(()),
                Err(actual) => cur = actual,
            }
        }
    }

    /// Gives back a reservation (or part of one) unspent.
    pub fn release(&self, amount: i64) {
        self.headroom.fetch_add(amount, Ordering::AcqRel);
    }

    /// Charges `charge` against a reservation of `held`: allowance first,
    /// then balance; the rest of the reservation goes back. The store
    /// thread applies the same rule ([`AccountRecord::charge`]).
    pub fn settle(&self, held: i64, charge: i64, now_ms: i64) {
        let from_allowance = if charge > 0 {
            match self
                .allowance
                .fetch_update(Ordering::AcqRel, Ordering::Acquire, |a| {
                    Some(a - crate::store::allowance_part(a, charge))
                }) {
                Ok(before) | Err(before) => crate::store::allowance_part(before, charge),
            }
        } else {
            0
        };
        self.balance
            .fetch_sub(charge - from_allowance, Ordering::AcqRel);
        self.spent.fetch_add(charge, Ordering::AcqRel);
        self.add_period(charge, now_ms);
        self.headroom.fetch_add(held - charge, Ordering::AcqRel);
    }

    fn add_period(&self, amount: i64, now_ms: i64) {
        let month = crate::clock::Period::Monthly.id(now_ms);
        let cur = self.period.load(Ordering::Acquire);
        if month > cur
            && self
                .period
                .compare_exchange(cur, month, Ordering::AcqRel, Ordering::Acquire)
                .is_ok()
        {
            self.period_spent.store(0, Ordering::Release);
        }
        if month == self.period.load(Ordering::Acquire) {
            let _ = self
                .period_spent
                .fetch_update(Ordering::AcqRel, Ordering::Acquire, |p| {
                    Some((p + amount).max(0))
                });
        }
    }

    /// Applies a credit the store has applied: the change of balance, of
    /// spent, and of the headroom. A deduct's amount was reserved first
    /// (`try_reserve`) and is settled with `settle` instead.
    pub fn credited(&self, balance_delta: i64, spent_delta: i64, now_ms: i64) {
        self.balance.fetch_add(balance_delta, Ordering::AcqRel);
        if !self.is_leased() {
            self.headroom.fetch_add(balance_delta, Ordering::AcqRel);
        }
        if spent_delta != 0 {
            self.spent.fetch_add(spent_delta, Ordering::AcqRel);
            self.add_period(spent_delta, now_ms);
        }
    }

    /// Applies a profile change: status, overdraft, unlimited.
    pub fn profile(&self, a: &AccountRecord) {
        self.status.store(status_code(a.status), Ordering::Release);
        self.unlimited.store(a.unlimited, Ordering::Release);
        let old = self.overdraft.swap(a.overdraft.0, Ordering::AcqRel);
        if !self.is_leased() {
            self.headroom
                .fetch_add(a.overdraft.0 - old, Ordering::AcqRel);
        }
    }

    pub fn numbers(&self) -> WalletNumbers {
        let balance = self.balance.load(Ordering::Acquire);
        let allowance = self.allowance.load(Ordering::Acquire);
        let overdraft = self.overdraft.load(Ordering::Acquire);
        let headroom = self.headroom.load(Ordering::Acquire);
        let funds = allowance.max(0) + balance + overdraft;
        WalletNumbers {
            balance: Pico(balance),
            allowance: Pico(allowance),
            reserved: Pico((funds - headroom).max(0)),
            spent: Pico(self.spent.load(Ordering::Acquire)),
            period_spent: Pico(self.period_spent.load(Ordering::Acquire)),
            available: (!self.unlimited.load(Ordering::Acquire)).then_some(Pico(headroom.max(0))),
        }
    }
}

/// Money held on an account for one request; released on drop unless settled.
pub struct AccountHold {
    pub account: Arc<LiveAccount>,
    /// picoUSD held.
    pub amount: i64,
    /// When it was taken: the month the charge counts in.
    pub at_ms: i64,
}

impl AccountHold {
    /// Keeps only `amount` of the hold, giving the rest back.
    pub fn shrink_to(&mut self, amount: i64) {
        if amount < self.amount {
            self.account.release(self.amount - amount);
            self.amount = amount;
        }
    }

    /// Charges `charge` and releases the rest.
    pub fn settle(mut self, charge: i64) {
        self.account.settle(self.amount, charge, self.at_ms);
        // Settled: nothing left for `drop` to give back.
        self.amount = 0;
    }
}

impl Drop for AccountHold {
    fn drop(&mut self) {
        self.account.release(self.amount);
    }
}

/// Account id → live wallet (or `None`: the owner has no account, so that
/// keys of such owners cost no store read per request).
pub struct Wallets {
    map: DashMap<Arc<str>, Option<Arc<LiveAccount>>>,
    store: Store,
    /// Bumped (under the entry lock) by every admin change of an account:
    /// a load that read the store before it retries.
    generation: AtomicU64,
    /// The configured plans, for the template of subscribed accounts' keys
    /// (set once at start; empty until then).
    plans: OnceLock<BTreeMap<String, Arc<PlanConfig>>>,
    /// Cluster mode: every wallet loaded draws from leases
    /// ([`LiveAccount::set_leased`]).
    leased: AtomicBool,
}

impl Wallets {
    pub fn new(store: Store) -> Wallets {
        Wallets {
            map: DashMap::new(),
            store,
            generation: AtomicU64::new(0),
            plans: OnceLock::new(),
            leased: AtomicBool::new(false),
        }
    }

    /// Cluster mode (once, at start, before any wallet is loaded).
    pub fn set_leased(&self) {
        self.leased.store(true, Ordering::Release);
    }

    /// The configured plans (once, at start).
    pub fn set_plans(&self, plans: &BTreeMap<String, PlanConfig>) {
        let _ = self.plans.set(
            plans
                .iter()
                .map(|(k, v)| (k.clone(), Arc::new(v.clone())))
                .collect(),
        );
    }

    /// The configured plans (empty before `set_plans`).
    pub fn plans(&self) -> &BTreeMap<String, Arc<PlanConfig>> {
        static NONE: BTreeMap<String, Arc<PlanConfig>> = BTreeMap::new();
        self.plans.get().unwrap_or(&NONE)
    }

    /// The wallet of `owner`'s account, loading it on first use.
    pub fn of(&self, owner: &str, now_ms: i64) -> Result<Option<Arc<LiveAccount>>, ApiError> {
        if let Some(e) = self.map.get(owner) {
            return Ok(e.value().clone());
        }
        loop {
            let generation = self.generation.load(Ordering::Acquire);
            let read = self
                .store
                .user_account(owner)
                .map_err(|e| ApiError::internal(format!("account store: {e}")))?;
            match self.map.entry(Arc::from(owner)) {
                Entry::Occupied(e) => return Ok(e.get().clone()),
                Entry::Vacant(v) => {
                    if self.generation.load(Ordering::Acquire) != generation {
                        continue;
                    }
                    let live = read.map(|a| {
                        let live = LiveAccount::new(&a, now_ms);
                        if self.leased.load(Ordering::Acquire) {
                            live.set_leased();
                        }
                        live.set_subscription(a.subscription.as_ref(), self.plans());
                        Arc::new(live)
                    });
                    v.insert(live.clone());
                    return Ok(live);
                }
            }
        }
    }

    /// The wallet if it is in memory.
    pub fn peek(&self, id: &str) -> Option<Arc<LiveAccount>> {
        self.map.get(id).and_then(|e| e.value().clone())
    }

    /// After the store created, or deleted, an account: the next use
    /// loads it again (a created account replaces a cached "none").
    pub fn reset(&self, id: &str) {
        match self.map.entry(Arc::from(id)) {
            Entry::Occupied(e) => {
                self.generation.fetch_add(1, Ordering::AcqRel);
                e.remove();
            }
            Entry::Vacant(_) => {
                self.generation.fetch_add(1, Ordering::AcqRel);
            }
        }
    }

    /// Runs `f` on the live wallet, if loaded, with loads held off, so an
    /// admin change applied to the store is never lost in memory.
    pub fn changed(&self, id: &str, f: impl FnOnce(&LiveAccount)) {
        match self.map.entry(Arc::from(id)) {
            Entry::Occupied(e) => {
                self.generation.fetch_add(1, Ordering::AcqRel);
                if let Some(a) = e.get() {
                    f(a);
                }
            }
            Entry::Vacant(_) => {
                self.generation.fetch_add(1, Ordering::AcqRel);
            }
        }
    }
}
