//! The store's record types: what it keeps about keys, money and usage.

use crate::money::Pico;

/// SHA-256 of the whole API key.
pub type KeyHash = [u8; 32];

/// A key's identity and policy. Changes only through the admin API (or a device binding).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct KeyRecord {
    /// SHA-256 of the whole key: the key itself is never stored.
    pub hash: KeyHash,
    /// Human name given at creation.
    pub name: String,
    /// First and last characters of the key, to recognise it.
    pub label: String,
    /// Who the key belongs to, for listing and `one_per_owner` plans.
    pub owner: Option<String>,
    /// Plan the key was made from.
    pub plan: Option<String>,
    /// A disabled key is refused but kept.
    pub disabled: bool,
    /// Unix ms.
    pub created_at: i64,
    /// Unix ms.
    pub updated_at: i64,
    /// Unix ms after which the key is refused.
    pub expires_at: Option<i64>,
    /// How often `Account::period_spent` starts again from zero.
    pub limit_reset: Option<crate::clock::Period>,
    /// Cap on `Account::requests`.
    pub max_requests: Option<u64>,
    /// Requests per minute.
    pub rpm: Option<u32>,
    /// Tokens per minute.
    pub tpm: Option<u64>,
    /// Requests in flight at once.
    pub concurrency: Option<u32>,
    /// Glob allowlist of models; empty = all.
    pub models: Vec<String>,
    /// CIDR allowlist; empty = all.
    pub allowed_ips: Vec<String>,
    /// Cap on `devices`.
    pub max_devices: Option<u32>,
    /// Devices bound so far.
    pub devices: Vec<String>,
    /// Charged once per UTC day the key is used.
    pub daily_fee: Option<crate::money::Pico>,
    /// Caller's JSON text, kept verbatim.
    pub metadata: Option<String>,
    /// Came from an external key pool rather than generated here.
    pub imported: bool,
    /// `key.low_balance` fires when what remains of `limit` falls below
    /// this (else `alerts.low_balance`).
    pub low_balance_alert: Option<crate::money::Pico>,
}

/// A key's money and counters: what must agree with its usage records and ledger.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Account {
    /// None = unlimited; raised by top-ups.
    pub limit: Option<Pico>,
    /// Lifetime: Σ usage record costs + Σ deducts + Σ daily fees − Σ refunds.
    pub spent: Pico,
    /// Id (`Period::id`) of the limit period `period_spent` belongs to (0 when limit_reset is None).
    pub period: i64,
    /// What counts against `limit` in that period (= spent when limit_reset is None).
    pub period_spent: Pico,
    /// Usage records written for the key.
    pub requests: u64,
    /// Last UTC day number a daily fee was charged (−1 never).
    pub fee_day: i64,
    /// Entries in the key's ledger.
    pub ledger_seq: u64,
}

impl Account {
    /// Applies a change of the key's `limit_reset` made at `at_ms`: the
    /// rule of [`crate::clock::ResetChange`], which the gate applies to the
    /// live key too.
    pub fn change_reset(
        &mut self,
        from: Option<crate::clock::Period>,
        to: Option<crate::clock::Period>,
        at_ms: i64,
    ) {
        use crate::clock::ResetChange;
        match ResetChange::of(from, to, at_ms) {
            ResetChange::Unchanged => {}
            ResetChange::CountAll => {
                self.period = 0;
                self.period_spent = self.spent.max(Pico::ZERO);
            }
            ResetChange::Enter(id) => self.period = id,
        }
    }
}

/// One settled request, as the meter saw it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct UsageRecord {
    /// Unix ms the request was settled at; decides its hour and period.
    pub at_ms: i64,
    /// The key charged.
    pub key: KeyHash,
    pub model: String,
    /// Upstream that answered.
    pub upstream: String,
    /// API path family (`chat`, `responses`, …).
    pub route: String,
    pub stream: bool,
    /// HTTP status answered to the client.
    pub status: u16,
    pub prompt_tokens: u64,
    pub cached_tokens: u64,
    pub completion_tokens: u64,
    pub reasoning_tokens: u64,
    /// What was charged.
    pub cost: Pico,
    /// What had been reserved at admission.
    pub reserved: Pico,
    pub latency_ms: u32,
    /// Time to first byte.
    pub ttfb_ms: u32,
    pub request_id: String,
    pub client_ip: String,
    /// Usage was estimated (stream cut, client gone) rather than reported.
    pub estimated: bool,
    /// The daily fee the gate charged together with this request's
    /// reservation (usually 0). The store thread adds it to `spent` and
    /// writes a `DailyFee` ledger entry in the same batch (once per key and
    /// UTC day), so memory and store agree; it is not kept in the record.
    pub daily_fee: Pico,
    /// The account (`owner`) whose wallet paid for the request, if any:
    /// the store thread charges it in the same batch. Not kept in the
    /// stored record (the key's owner says it).
    pub account: Option<std::sync::Arc<str>>,
    /// Prompt tokens written to the upstream's prompt cache (Anthropic's
    /// `cache_creation_input_tokens`), priced apart; part of
    /// `prompt_tokens`, like the cache reads in `cached_tokens`.
    pub cache_write_tokens: u64,
}

/// What a ledger entry did to the account.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LedgerKind {
    /// limit += amount.
    Topup,
    /// spent += amount.
    Deduct,
    /// spent −= amount.
    Refund,
    /// spent += amount, once per UTC day.
    DailyFee,
}

impl LedgerKind {
    /// The kind's name, as stored and as the API shows it.
    pub fn as_str(self) -> &'static str {
        match self {
            LedgerKind::Topup => "topup",
            LedgerKind::Deduct => "deduct",
            LedgerKind::Refund => "refund",
            LedgerKind::DailyFee => "daily_fee",
        }
    }

    /// The kind named `s` ([`LedgerKind::as_str`]).
    pub fn parse(s: &str) -> Option<LedgerKind> {
        Some(match s {
            "topup" => LedgerKind::Topup,
            "deduct" => LedgerKind::Deduct,
            "refund" => LedgerKind::Refund,
            "daily_fee" => LedgerKind::DailyFee,
            _ => return None,
        })
    }
}

/// One credit operation, as applied.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LedgerEntry {
    /// 1 for a key's first entry.
    pub seq: u64,
    pub at_ms: i64,
    pub kind: LedgerKind,
    /// Positive.
    pub amount: Pico,
    pub reason: String,
    /// Applied once per key; a repeat replays this entry.
    pub idempotency_key: Option<String>,
    /// The account's limit after the entry.
    pub limit_after: Option<Pico>,
    /// The account's lifetime spent after the entry.
    pub spent_after: Pico,
}

/// Sums over a bucket (an hour, for one key or the whole gateway, for one model).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Rollup {
    pub requests: u64,
    pub prompt_tokens: u64,
    pub cached_tokens: u64,
    pub completion_tokens: u64,
    pub reasoning_tokens: u64,
    pub cost: Pico,
    pub latency_ms_sum: u64,
    /// Records with status ≥ 400.
    pub errors: u64,
    /// Records whose usage was estimated.
    pub estimated: u64,
    /// Prompt tokens written to a prompt cache (part of `prompt_tokens`).
    pub cache_write_tokens: u64,
}

/// A page of keys.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct KeyQuery {
    pub offset: usize,
    pub limit: usize,
    /// Only this owner's keys.
    pub owner: Option<String>,
    pub include_disabled: bool,
}

/// Whose rollups.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RollupScope {
    Key(KeyHash),
    Gateway,
}

/// A credit to apply to a key's account.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CreditOp {
    pub kind: LedgerKind,
    /// Must be > 0.
    pub amount: Pico,
    pub reason: String,
    /// Applied once per key.
    pub idempotency_key: Option<String>,
    /// Decides the period a deduct, refund or fee counts in.
    pub at_ms: i64,
}

/// What a credit did.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CreditOutcome {
    /// The entry written (or, replayed, the one written first).
    pub entry: LedgerEntry,
    /// The account now.
    pub account: Account,
    /// The idempotency key had been used: nothing changed.
    pub replayed: bool,
}

/// A snapshot of the store's counters.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct StoreStats {
    /// Ops queued and not yet done (a record: until its batch is flushed).
    pub queue_depth: u64,
    /// Batches committed (each: at most one flush).
    pub batches: u64,
    /// Usage records committed.
    pub records_written: u64,
    /// Ops in the last batch.
    pub last_batch_size: u64,
    /// Σ µs spent in `flush` (fsync), and how many flushes.
    pub flush_us_sum: u64,
    pub flush_count: u64,
    /// sled inserts and removes issued by the store thread (the cost model).
    pub sled_writes: u64,
    /// CPU time of the store thread in ns (from `/proc/thread-self/schedstat`; 0 if unavailable).
    pub thread_cpu_ns: u64,
    /// Number of keys.
    pub keys: u64,
    /// Commits and flushes that failed (logged; the batch is kept and retried).
    pub write_errors: u64,
    /// Every record with a sequence number ≤ this is on disk.
    pub committed_seq: u64,
    /// The last commit failed and none has succeeded since.
    pub failing: bool,
}

/// Whether an account's keys may spend.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AccountStatus {
    #[default]
    Active,
    Suspended,
    Closed,
}

/// A user's account: the wallet every key whose `owner` is `id` spends
/// from. Profile and money in one record (`book` `A` id), so the store
/// thread charges it in the same atomic batch as the keys' usage records.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct AccountRecord {
    /// The account id: the `owner` of its keys.
    pub id: String,
    /// Contact address, for listing by email.
    pub email: Option<String>,
    /// Display name.
    pub name: Option<String>,
    /// How far below zero the balance may go.
    #[serde(with = "pico_int")]
    pub overdraft: Pico,
    /// Never refused for money, still metered.
    pub unlimited: bool,
    /// Balance under which the operator wants to hear about it.
    #[serde(with = "pico_opt_int")]
    pub low_balance_alert: Option<Pico>,
    /// Caller's JSON text, kept verbatim.
    pub metadata: Option<String>,
    /// Active, suspended or closed.
    pub status: AccountStatus,
    /// Unix ms.
    pub created_at: i64,
    /// Unix ms.
    pub updated_at: i64,
    /// Prepaid money; never expires; may go down to −overdraft.
    #[serde(with = "pico_int")]
    pub balance: Pico,
    /// What remains of the current period's plan grant (spent first).
    #[serde(with = "pico_int")]
    pub allowance: Pico,
    /// Lifetime: Σ its keys' usage record costs + Σ deducts − Σ refunds.
    #[serde(with = "pico_int")]
    pub spent: Pico,
    /// `Period::Monthly` id that `period_spent` belongs to.
    pub period: i64,
    /// Spent in that period.
    #[serde(with = "pico_int")]
    pub period_spent: Pico,
    /// Entries in the account's ledger.
    pub ledger_seq: u64,
    /// The account's latest subscription (live or ended), so the gate
    /// learns its status and plan from the one account read it does.
    #[serde(default)]
    pub subscription: Option<SubscriptionLink>,
}

/// How much of a charge of `charge` picoUSD comes out of an allowance of
/// `allowance`: all of it that the allowance covers (none of a negative
/// one, a refund, which goes to the balance); the rest comes out of the
/// balance. The one rule of "allowance first, then balance": the store,
/// the live wallet and the cluster's settlement all split by it.
pub fn allowance_part(allowance: i64, charge: i64) -> i64 {
    if charge > 0 {
        charge.min(allowance.max(0))
    } else {
        0
    }
}

impl AccountRecord {
    /// Charges `amount` (may be negative, a refund) at `at_ms`: allowance
    /// first, then balance; `spent` and the month's spent follow.
    pub fn charge(&mut self, at_ms: i64, amount: Pico) {
        let from_allowance = allowance_part(self.allowance.0, amount.0);
        self.allowance = Pico(self.allowance.0 - from_allowance);
        self.balance = Pico(self.balance.0.saturating_sub(amount.0 - from_allowance));
        self.spent = self.spent.saturating_add(amount);
        let month = crate::clock::Period::Monthly.id(at_ms);
        if month > self.period {
            self.period = month;
            self.period_spent = Pico::ZERO;
        }
        if month == self.period {
            self.period_spent = self.period_spent.saturating_add(amount).max(Pico::ZERO);
        }
    }

    /// What the account may still commit: allowance + balance + overdraft.
    pub fn funds(&self) -> Pico {
        Pico(
            self.allowance
                .0
                .saturating_add(self.balance.0)
                .saturating_add(self.overdraft.0),
        )
    }
}

/// What an account credit does.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AccountCreditKind {
    /// balance += amount.
    Topup,
    /// Charged like usage (allowance first); must fit in the funds.
    Deduct,
    /// balance += amount, spent −= amount.
    Refund,
    /// balance += amount (signed); not spending. A negative one must fit.
    Adjust,
    /// balance −= amount, even below −overdraft: money a payment provider
    /// gave back (a refund or chargeback) after it was credited; not spending.
    Reversal,
    /// allowance += amount: a subscription period's plan grant (not spending).
    Grant,
    /// allowance −= amount: the unused allowance at a period's end (not spending).
    Lapse,
}

impl AccountCreditKind {
    /// Every kind, in declaration order.
    pub const ALL: [AccountCreditKind; 7] = [
        AccountCreditKind::Topup,
        AccountCreditKind::Deduct,
        AccountCreditKind::Refund,
        AccountCreditKind::Adjust,
        AccountCreditKind::Reversal,
        AccountCreditKind::Grant,
        AccountCreditKind::Lapse,
    ];

    /// Its name, as the API shows it (its serde name).
    pub fn as_str(self) -> &'static str {
        match self {
            AccountCreditKind::Topup => "topup",
            AccountCreditKind::Deduct => "deduct",
            AccountCreditKind::Refund => "refund",
            AccountCreditKind::Adjust => "adjust",
            AccountCreditKind::Reversal => "reversal",
            AccountCreditKind::Grant => "grant",
            AccountCreditKind::Lapse => "lapse",
        }
    }

    pub fn parse(s: &str) -> Option<AccountCreditKind> {
        AccountCreditKind::ALL.into_iter().find(|k| k.as_str() == s)
    }
}

/// One entry of an account's ledger.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct AccountLedgerEntry {
    /// 1 for the account's first entry.
    pub seq: u64,
    pub at_ms: i64,
    pub kind: AccountCreditKind,
    /// Positive, except a negative `adjust`.
    #[serde(with = "pico_int")]
    pub amount: Pico,
    pub reason: String,
    /// Applied once per account; a repeat replays this entry.
    pub idempotency_key: Option<String>,
    /// Balance after the entry.
    #[serde(with = "pico_int")]
    pub balance_after: Pico,
    /// Lifetime spent after the entry.
    #[serde(with = "pico_int")]
    pub spent_after: Pico,
    /// Allowance after the entry (grants and lapses move it; usage too).
    #[serde(default, with = "pico_int")]
    pub allowance_after: Pico,
}

/// A credit to apply to an account.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AccountCreditOp {
    pub kind: AccountCreditKind,
    /// > 0, except for `adjust` (≠ 0).
    pub amount: Pico,
    pub reason: String,
    /// Applied once per account.
    pub idempotency_key: Option<String>,
    pub at_ms: i64,
}

/// What an account credit did.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AccountCreditOutcome {
    /// The entry written (or, replayed, the first one).
    pub entry: AccountLedgerEntry,
    /// The account now.
    pub account: AccountRecord,
    /// The idempotency key had been used: nothing changed.
    pub replayed: bool,
}

/// Stored amounts are integer picoUSD, exact (the API's decimal numbers
/// are for people).
pub(super) mod pico_int {
    use crate::money::Pico;
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(p: &Pico, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_i64(p.0)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Pico, D::Error> {
        i64::deserialize(d).map(Pico)
    }
}

pub(super) mod pico_opt_int {
    use crate::money::Pico;
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(p: &Option<Pico>, s: S) -> Result<S::Ok, S::Error> {
        match p {
            Some(p) => s.serialize_some(&p.0),
            None => s.serialize_none(),
        }
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Pico>, D::Error> {
        Option::<i64>::deserialize(d).map(|o| o.map(Pico))
    }
}

/// Where a subscription is in its life. `trialing`, `active` and
/// `past_due` are live (the keys work); `canceled` and `expired` are ended.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SubscriptionStatus {
    #[default]
    Trialing,
    Active,
    PastDue,
    Canceled,
    Expired,
}

impl SubscriptionStatus {
    /// The account's keys may spend (an account has at most one live subscription).
    pub fn is_live(self) -> bool {
        matches!(
            self,
            SubscriptionStatus::Trialing | SubscriptionStatus::Active | SubscriptionStatus::PastDue
        )
    }

    pub fn as_str(self) -> &'static str {
        match self {
            SubscriptionStatus::Trialing => "trialing",
            SubscriptionStatus::Active => "active",
            SubscriptionStatus::PastDue => "past_due",
            SubscriptionStatus::Canceled => "canceled",
            SubscriptionStatus::Expired => "expired",
        }
    }
}

/// The account's pointer to its latest subscription, written in the same
/// batch as the subscription.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct SubscriptionLink {
    /// The subscription id (`book` `S` id).
    pub id: String,
    /// Its plan now: the key template the account's keys get while live.
    pub plan: String,
    /// Its status now: ended ones make the keys answer 402.
    pub status: SubscriptionStatus,
}

/// A subscription of an account to a plan (`book` `S` id, JSON).
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct SubscriptionRecord {
    /// `sub_` + 24 hex characters.
    pub id: String,
    /// The account it belongs to (and grants to).
    pub account: String,
    /// The plan in force this period.
    pub plan: String,
    /// A downgrade waiting for the next period start.
    pub next_plan: Option<String>,
    pub status: SubscriptionStatus,
    /// Number of the current period, 0 for the first: the grant marker's key.
    pub period: u64,
    /// Periods up to this number are paid for (or free, a trial's period 0):
    /// the next period starts only if `paid_through > period`.
    pub paid_through: u64,
    /// Unix ms.
    pub current_period_start: i64,
    /// Unix ms.
    pub current_period_end: i64,
    /// Where periods are counted from (`Interval::nth`), so months do not drift.
    pub anchor: i64,
    /// Ends cleanly (`canceled`) at the current period's end.
    pub cancel_at_period_end: bool,
    /// End of the trial, when it started with one.
    pub trial_end: Option<i64>,
    /// Since when it is past due: it expires `grace` later.
    pub past_due_since: Option<i64>,
    /// The payment provider's id (a Stripe subscription), for lookups.
    pub external_id: Option<String>,
    /// When it was canceled or expired.
    pub ended_at: Option<i64>,
    /// Unix ms.
    pub created_at: i64,
    /// Unix ms.
    pub updated_at: i64,
    /// Bumped by every write: a write computed from an older read is refused.
    pub version: u64,
}

/// Money a subscription change moves on its account, applied by the store
/// thread in the batch of the change.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SubscriptionMoney {
    /// allowance += amount, once per marker (`book` `T`).
    Grant {
        amount: Pico,
        marker: SubscriptionMarker,
        reason: String,
    },
    /// The whole unused allowance lapses (amount decided by the store
    /// thread, from the account as committed).
    LapseAll {
        reason: String,
        /// The subscription's period when it lapses (the one that ended,
        /// or the one it ended in): in cluster mode it names the lapse
        /// once cluster-wide (`cluster::subscriptions::lapse_entry_id`).
        period: u64,
    },
}

/// What a `T` marker stands for: one grant of one kind in one period.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SubscriptionMarker {
    /// `g` the period's grant, `u` an upgrade's pro-rata grant.
    pub tag: u8,
    pub period: u64,
    /// The upgrade's plan (empty for `g`).
    pub extra: String,
}

/// One atomic write of a subscription: the new record, the money it moves,
/// and the renewal idempotency key it consumes.
#[derive(Clone, Debug)]
pub struct SubscriptionWrite {
    pub sub: SubscriptionRecord,
    /// `None`: create (refused if the account has a live subscription);
    /// `Some(v)`: the version read, refused if the stored one differs.
    pub expect_version: Option<u64>,
    pub money: Vec<SubscriptionMoney>,
    /// A renewal's idempotency key: applied once per subscription.
    pub renewal_key: Option<String>,
    pub at_ms: i64,
    /// Cluster mode: another node's write, pulled from the database. The
    /// record is stored as it is (its version kept, nothing checked) and
    /// moves no money: the node that made the write applied it.
    pub replica: bool,
}

/// What a subscription write did.
#[derive(Clone, Debug)]
pub struct SubscriptionOutcome {
    /// The subscription now.
    pub sub: SubscriptionRecord,
    /// The account now.
    pub account: AccountRecord,
    /// Ledger entries written (grants and lapses actually applied).
    pub entries: Vec<AccountLedgerEntry>,
    /// The renewal key had been used: nothing changed.
    pub replayed: bool,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_charge_takes_the_allowance_first_then_the_balance() {
        assert_eq!(allowance_part(10, 3), 3);
        assert_eq!(allowance_part(2, 3), 2, "the rest from the balance");
        assert_eq!(allowance_part(0, 3), 0);
        assert_eq!(
            allowance_part(-4, 3),
            0,
            "an allowance below zero covers nothing"
        );
        assert_eq!(allowance_part(10, -3), 0, "a refund goes to the balance");
        let mut a = AccountRecord {
            allowance: Pico(2),
            balance: Pico(10),
            ..AccountRecord::default()
        };
        a.charge(0, Pico(3));
        assert_eq!(
            (a.allowance, a.balance, a.spent),
            (Pico(0), Pico(9), Pico(3))
        );
    }
}
