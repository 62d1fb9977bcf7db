//! Payments in the store (issue 11): the payment records (`P`), the
//! provider references that make a notification apply once (`Q`), and
//! epay orders (`O`), all in `book`.
//!
//! A payment, the ledger entry it makes and the balance (or limit) it
//! moves are written in **one** `apply_batch` by the store thread, after
//! it checked that none of the payment's references is taken: so a
//! provider's event applies once however often, and however concurrently,
//! it is delivered, and a crash leaves either all of it or none.

use serde::{Deserialize, Serialize};
use sled::Batch;

use super::layout::push_len_str;
use super::records::pico_int;
use super::thread::StoreThread;
use super::{
    AccountCreditKind, AccountCreditOp, AccountLedgerEntry, CreditOp, KeyHash, LedgerEntry,
    LedgerKind, Op, Store, StoreError,
};
use crate::money::Pico;

/// Where a payment stands.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PaymentStatus {
    /// Paid and credited.
    Succeeded,
    /// Given back whole by the provider; the credit was reversed.
    Refunded,
    /// Given back in part; that part was reversed.
    PartiallyRefunded,
    /// Recorded but nothing applied: an operator must look (see `reason`).
    NeedsAttention,
    /// The provider reported it failed; nothing applied.
    Failed,
}

impl PaymentStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            PaymentStatus::Succeeded => "succeeded",
            PaymentStatus::Refunded => "refunded",
            PaymentStatus::PartiallyRefunded => "partially_refunded",
            PaymentStatus::NeedsAttention => "needs_attention",
            PaymentStatus::Failed => "failed",
        }
    }
}

/// Whose money a payment moved.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PaymentTarget {
    /// An account (`book` `A`), by id.
    Account(String),
    /// A key without account, by hash (hex).
    Key(String),
}

/// A ledger entry a payment made.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PaymentEntry {
    /// The ledger it is in.
    pub target: PaymentTarget,
    /// Its sequence number in that ledger.
    pub seq: u64,
    /// `topup`, `reversal` (account) or `deduct` (key).
    pub kind: String,
    /// Positive.
    #[serde(with = "pico_int")]
    pub amount: Pico,
}

/// One payment (`book` `P` id), JSON.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PaymentRecord {
    /// `pay_` + 12 hex digits of the creation ms + random: listing order.
    pub id: String,
    /// `stripe`, `epay` or `manual`.
    pub provider: String,
    /// The provider's name for it (checkout session, trade number, the
    /// manual reference), for the operator to find it there.
    pub provider_id: String,
    /// The account credited (or named by the notification).
    pub account: Option<String>,
    /// The key credited, for keys without account (hash, hex).
    pub key: Option<String>,
    /// What was paid, as USD.
    #[serde(with = "pico_int")]
    pub amount: Pico,
    /// The provider's currency code, as sent.
    pub currency: String,
    /// `topup`, `subscription`, `renewal`, … (what the payment was for).
    pub kind: String,
    pub status: PaymentStatus,
    /// Refunded so far by the provider.
    #[serde(with = "pico_int")]
    pub refunded: Pico,
    /// Why it needs attention (or failed).
    pub reason: Option<String>,
    /// The ledger entries it made, in order.
    pub entries: Vec<PaymentEntry>,
    /// Provider event ids applied to it, in order.
    pub events: Vec<String>,
    /// A key issued with it (epay activation): its hash, and its secret
    /// until the operator's first read of this record takes it.
    pub issued_key: Option<IssuedKey>,
    /// Unix ms.
    pub created_at: i64,
    /// Unix ms.
    pub updated_at: i64,
}

/// A key issued because of a payment.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct IssuedKey {
    /// Hex hash.
    pub hash: String,
    /// The secret, kept only until the first `GET /api/v1/payments/{id}`
    /// answers it: that read removes it ([`PaymentOp::TakeIssuedKey`]), so
    /// the key is shown once and afterwards only its hash is stored.
    /// Records of earlier versions kept it for good; their next read takes
    /// it the same way. In cluster mode the secret is never in a node's
    /// store: it waits in the database's record, and the first read on
    /// any node takes it under the row's lock (`cluster::payments`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key: Option<String>,
}

/// An epay order Tollgate made (`book` `O` out_trade_no), JSON.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct EpayOrder {
    /// Our order number, sent to the provider and back.
    pub out_trade_no: String,
    /// The account to credit.
    pub account: String,
    /// The amount, as USD credit and as the `money` the notify must carry.
    #[serde(with = "pico_int")]
    pub amount: Pico,
    /// `alipay`, `wxpay`, …
    pub pay_type: String,
    /// Unix ms.
    pub created_at: i64,
}

/// Money a new payment credits (its `amount`, as a top-up).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PaymentCredit {
    Account(String),
    Key(KeyHash),
}

/// A write of the payments module, applied by the store thread.
#[derive(Debug)]
pub enum PaymentOp {
    /// A new payment, credited by `credit` unless its target is unknown
    /// (then recorded `needs_attention`). Applies once over `refs` (the
    /// provider's ids for it: its event, its session, its trade): if any
    /// is taken, the payment holding it is returned, nothing written.
    Record {
        refs: Vec<String>,
        payment: Box<PaymentRecord>,
        credit: Option<PaymentCredit>,
    },
    /// The provider now reports `refunded_total` refunded of the payment
    /// holding ref `of`: what is newly refunded is reversed, once per
    /// `event`. An unknown `of` records `unknown` instead.
    Refund {
        event: String,
        of: String,
        refunded_total: Pico,
        at_ms: i64,
        unknown: Box<PaymentRecord>,
    },
    /// Stores an order for a later notification. `Exists` if its number is taken.
    Order(EpayOrder),
    /// Records the key issued with a payment (after it was created).
    IssuedKey(String, IssuedKey),
    /// Removes the issued key's secret from the payment: answered with the
    /// record as it was (secret included) once, then never again.
    TakeIssuedKey(String),
}

/// What the in-memory state must follow after a payment applied.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Applied {
    Nothing,
    /// The account's balance moved by this (picoUSD, signed).
    Account {
        id: String,
        balance_delta: i64,
    },
    /// The key's limit is now `limit`; its spent grew by `spent_delta`.
    Key {
        hash: KeyHash,
        limit: Option<Pico>,
        spent_delta: i64,
    },
}

/// What a payment op did.
#[derive(Clone, Debug)]
pub struct PaymentOutcome {
    /// The payment now (replayed: as it was).
    pub payment: Option<PaymentRecord>,
    /// One of the refs was taken: nothing was written.
    pub replayed: bool,
    /// What memory must follow (nothing when replayed).
    pub applied: Applied,
}

/// A page of payments.
#[derive(Clone, Debug, Default)]
pub struct PaymentQuery {
    /// Only this account's payments.
    pub account: Option<String>,
    /// Only payments in this status.
    pub status: Option<PaymentStatus>,
    /// Only this provider's (`stripe`, `epay`, `manual`).
    pub provider: Option<String>,
    /// Matching payments skipped, newest first.
    pub offset: usize,
    /// Most payments answered.
    pub limit: usize,
}

fn payment_key(id: &str) -> Vec<u8> {
    let mut k = Vec::with_capacity(1 + id.len());
    k.push(b'P');
    k.extend_from_slice(id.as_bytes());
    k
}

fn ref_key(provider: &str, reference: &str) -> Vec<u8> {
    let mut k = vec![b'Q'];
    push_len_str(&mut k, provider);
    k.extend_from_slice(reference.as_bytes());
    k
}

fn order_key(out_trade_no: &str) -> Vec<u8> {
    let mut k = vec![b'O'];
    k.extend_from_slice(out_trade_no.as_bytes());
    k
}

fn decode_payment(v: &[u8]) -> Result<PaymentRecord, StoreError> {
    serde_json::from_slice(v).map_err(|e| StoreError::Corrupt(format!("payment: {e}")))
}

fn encode<T: Serialize>(v: &T) -> Vec<u8> {
    serde_json::to_vec(v).expect("payment records serialize")
}

/// A payment as events and the audit log show it: never an issued key.
fn payment_summary(p: &PaymentRecord) -> serde_json::Value {
    serde_json::json!({
        "id": p.id,
        "provider": p.provider,
        "provider_id": p.provider_id,
        "account": p.account,
        "key": p.key,
        "amount": p.amount.to_string(),
        "refunded": p.refunded.to_string(),
        "currency": p.currency,
        "kind": p.kind,
        "status": p.status.as_str(),
    })
}

impl StoreThread {
    /// An outbox event about a payment: its summary, never an issued key.
    fn payment_event(&mut self, kind: &str, p: &PaymentRecord) {
        self.emit(kind, payment_summary(p));
    }

    /// The audit entry of a payment an operator recorded (a manual one):
    /// kept only when an admin request made the op.
    fn payment_audit(&mut self, p: &PaymentRecord) {
        self.audit("payment.record", &p.id, None, Some(payment_summary(p)));
    }

    pub(super) fn payment(&mut self, op: PaymentOp) -> Result<PaymentOutcome, StoreError> {
        match op {
            PaymentOp::Record {
                refs,
                payment,
                credit,
            } => self.payment_record(&refs, *payment, credit),
            PaymentOp::Refund {
                event,
                of,
                refunded_total,
                at_ms,
                unknown,
            } => self.payment_refund(&event, &of, refunded_total, at_ms, *unknown),
            PaymentOp::Order(o) => {
                let k = order_key(&o.out_trade_no);
                if self.book.contains_key(&k)? {
                    return Err(StoreError::Exists);
                }
                self.book.insert(k, encode(&o))?;
                self.write_count(1);
                Ok(PaymentOutcome {
                    payment: None,
                    replayed: false,
                    applied: Applied::Nothing,
                })
            }
            PaymentOp::IssuedKey(id, issued) => {
                let mut p = self.read_payment(&id)?.ok_or(StoreError::NotFound)?;
                p.issued_key = Some(issued);
                self.book.insert(payment_key(&id), encode(&p))?;
                self.write_count(1);
                Ok(PaymentOutcome {
                    payment: Some(p),
                    replayed: false,
                    applied: Applied::Nothing,
                })
            }
            PaymentOp::TakeIssuedKey(id) => {
                let shown = self.read_payment(&id)?.ok_or(StoreError::NotFound)?;
                if shown.issued_key.as_ref().is_some_and(|k| k.key.is_some()) {
                    let mut kept = shown.clone();
                    if let Some(k) = kept.issued_key.as_mut() {
                        k.key = None;
                    }
                    self.book.insert(payment_key(&id), encode(&kept))?;
                    self.write_count(1);
                }
                Ok(PaymentOutcome {
                    payment: Some(shown),
                    replayed: false,
                    applied: Applied::Nothing,
                })
            }
        }
    }

    fn read_payment(&self, id: &str) -> Result<Option<PaymentRecord>, StoreError> {
        match self.book.get(payment_key(id))? {
            Some(v) => Ok(Some(decode_payment(&v)?)),
            None => Ok(None),
        }
    }

    fn payment_of_ref(
        &self,
        provider: &str,
        reference: &str,
    ) -> Result<Option<PaymentRecord>, StoreError> {
        let Some(id) = self.book.get(ref_key(provider, reference))? else {
            return Ok(None);
        };
        let id = std::str::from_utf8(&id)
            .map_err(|_| StoreError::Corrupt("payment reference".into()))?;
        match self.read_payment(id)? {
            Some(p) => Ok(Some(p)),
            None => Err(StoreError::Corrupt(format!(
                "payment reference without payment {id}"
            ))),
        }
    }

    fn replay(p: PaymentRecord) -> PaymentOutcome {
        PaymentOutcome {
            payment: Some(p),
            replayed: true,
            applied: Applied::Nothing,
        }
    }

    fn payment_record(
        &mut self,
        refs: &[String],
        mut p: PaymentRecord,
        credit: Option<PaymentCredit>,
    ) -> Result<PaymentOutcome, StoreError> {
        for r in refs {
            if let Some(existing) = self.payment_of_ref(&p.provider, r)? {
                return Ok(Self::replay(existing));
            }
        }
        // Ids carry random bits; a clash must never overwrite a payment.
        if self.book.contains_key(payment_key(&p.id))? {
            return Err(StoreError::Exists);
        }
        let mut batch = Batch::default();
        let mut writes = 0;
        let mut applied = Applied::Nothing;
        let reason = format!("{} payment {}", p.provider, p.id);
        let idem = format!("payment:{}", p.id);
        let credit = match credit {
            Some(_) if p.amount.0 <= 0 => {
                p.status = PaymentStatus::NeedsAttention;
                p.reason.get_or_insert_with(|| "nothing to credit".into());
                None
            }
            c => c,
        };
        match credit {
            Some(PaymentCredit::Account(id)) => match self.read_user_account(&id) {
                Err(StoreError::NotFound) => {
                    p.status = PaymentStatus::NeedsAttention;
                    p.reason = Some(format!("unknown account {id:?}; nothing applied"));
                }
                Err(e) => return Err(e),
                Ok(_) => {
                    let op = AccountCreditOp {
                        kind: AccountCreditKind::Topup,
                        amount: p.amount,
                        reason,
                        idempotency_key: Some(idem),
                        at_ms: p.created_at,
                    };
                    let (out, w) = self.account_credit_into(&id, &op, &mut batch)?;
                    writes += w;
                    if !out.replayed {
                        p.entries.push(account_entry(&id, &out.entry));
                        applied = Applied::Account {
                            id,
                            balance_delta: p.amount.0,
                        };
                    }
                }
            },
            Some(PaymentCredit::Key(hash)) => match self.read_account(&hash) {
                Err(StoreError::NotFound) => {
                    p.status = PaymentStatus::NeedsAttention;
                    p.reason = Some("unknown key; nothing applied".into());
                }
                Err(e) => return Err(e),
                Ok(_) => {
                    let op = CreditOp {
                        kind: LedgerKind::Topup,
                        amount: p.amount,
                        reason,
                        idempotency_key: Some(idem),
                        at_ms: p.created_at,
                    };
                    let (out, w) = self.credit_into(&hash, &op, &mut batch)?;
                    writes += w;
                    if !out.replayed {
                        p.entries.push(key_entry(&hash, &out.entry));
                        applied = Applied::Key {
                            hash,
                            limit: out.account.limit,
                            spent_delta: 0,
                        };
                    }
                }
            },
            None => {}
        }
        batch.insert(payment_key(&p.id), encode(&p));
        for r in refs {
            batch.insert(ref_key(&p.provider, r), p.id.as_bytes());
        }
        self.payment_audit(&p);
        match p.status {
            PaymentStatus::Succeeded => self.payment_event("payment.succeeded", &p),
            PaymentStatus::Failed => self.payment_event("payment.failed", &p),
            _ => {}
        }
        let staged = self.stage_outbox();
        staged.add_to(&mut batch);
        self.book.apply_batch(batch)?;
        self.write_count(writes + 1 + refs.len());
        self.outbox_written(staged);
        Ok(PaymentOutcome {
            payment: Some(p),
            replayed: false,
            applied,
        })
    }

    fn payment_refund(
        &mut self,
        event: &str,
        of: &str,
        refunded_total: Pico,
        at_ms: i64,
        unknown: PaymentRecord,
    ) -> Result<PaymentOutcome, StoreError> {
        let provider = unknown.provider.clone();
        if let Some(existing) = self.payment_of_ref(&provider, event)? {
            return Ok(Self::replay(existing));
        }
        let Some(mut p) = self.payment_of_ref(&provider, of)? else {
            return self.payment_record(&[event.to_owned()], unknown, None);
        };
        // Never reverse more than was paid, whatever the provider claims.
        let newly = Pico(refunded_total.0.min(p.amount.0) - p.refunded.0);
        let mut batch = Batch::default();
        let mut writes = 0;
        let mut applied = Applied::Nothing;
        if newly.0 > 0 {
            let reason = format!("{provider} refund of payment {}", p.id);
            let idem = format!("payment:{}:refund:{event}", p.id);
            match p.entries.first().map(|e| e.target.clone()) {
                Some(PaymentTarget::Account(id)) => {
                    let op = AccountCreditOp {
                        kind: AccountCreditKind::Reversal,
                        amount: newly,
                        reason,
                        idempotency_key: Some(idem),
                        at_ms,
                    };
                    let (out, w) = self.account_credit_into(&id, &op, &mut batch)?;
                    writes += w;
                    if !out.replayed {
                        p.entries.push(account_entry(&id, &out.entry));
                        applied = Applied::Account {
                            id,
                            balance_delta: -newly.0,
                        };
                    }
                }
                Some(PaymentTarget::Key(hex_hash)) => {
                    let mut hash = [0u8; 32];
                    hex::decode_to_slice(&hex_hash, &mut hash)
                        .map_err(|_| StoreError::Corrupt("payment key hash".into()))?;
                    // A key's credit is taken back as spending: the store
                    // applies a deduct without the live limit check.
                    let op = CreditOp {
                        kind: LedgerKind::Deduct,
                        amount: newly,
                        reason,
                        idempotency_key: Some(idem),
                        at_ms,
                    };
                    let (out, w) = self.credit_into(&hash, &op, &mut batch)?;
                    writes += w;
                    if !out.replayed {
                        p.entries.push(key_entry(&hash, &out.entry));
                        applied = Applied::Key {
                            hash,
                            limit: out.account.limit,
                            spent_delta: newly.0,
                        };
                    }
                }
                // Nothing had been credited: nothing to take back.
                None => {}
            }
            p.refunded = Pico(p.refunded.0 + newly.0);
            if p.status != PaymentStatus::NeedsAttention {
                p.status = if p.refunded >= p.amount {
                    PaymentStatus::Refunded
                } else {
                    PaymentStatus::PartiallyRefunded
                };
            }
        }
        p.events.push(event.to_owned());
        p.updated_at = at_ms;
        batch.insert(payment_key(&p.id), encode(&p));
        batch.insert(ref_key(&provider, event), p.id.as_bytes());
        if newly.0 > 0 {
            self.payment_event("payment.refunded", &p);
        }
        let staged = self.stage_outbox();
        staged.add_to(&mut batch);
        self.book.apply_batch(batch)?;
        self.write_count(writes + 2);
        self.outbox_written(staged);
        Ok(PaymentOutcome {
            payment: Some(p),
            replayed: false,
            applied,
        })
    }
}

fn account_entry(id: &str, e: &AccountLedgerEntry) -> PaymentEntry {
    PaymentEntry {
        target: PaymentTarget::Account(id.to_owned()),
        seq: e.seq,
        kind: match e.kind {
            AccountCreditKind::Reversal => "reversal",
            _ => "topup",
        }
        .to_owned(),
        amount: e.amount,
    }
}

fn key_entry(hash: &KeyHash, e: &LedgerEntry) -> PaymentEntry {
    PaymentEntry {
        target: PaymentTarget::Key(hex::encode(hash)),
        seq: e.seq,
        kind: match e.kind {
            LedgerKind::Deduct => "deduct",
            _ => "topup",
        }
        .to_owned(),
        amount: e.amount,
    }
}

impl Store {
    /// Applies a payment op once; answered after it is durable.
    pub async fn payment_op(&self, op: PaymentOp) -> Result<PaymentOutcome, StoreError> {
        self.call(|tx| Op::Payment(Box::new(op), tx)).await
    }

    /// A payment by id.
    pub fn payment(&self, id: &str) -> Result<Option<PaymentRecord>, StoreError> {
        match self.inner.book.get(payment_key(id))? {
            Some(v) => Ok(Some(decode_payment(&v)?)),
            None => Ok(None),
        }
    }

    /// The payment holding a provider reference, if any.
    pub fn payment_by_ref(
        &self,
        provider: &str,
        reference: &str,
    ) -> Result<Option<PaymentRecord>, StoreError> {
        match self.inner.book.get(ref_key(provider, reference))? {
            Some(id) => {
                let id = std::str::from_utf8(&id)
                    .map_err(|_| StoreError::Corrupt("payment reference".into()))?;
                self.payment(id)
            }
            None => Ok(None),
        }
    }

    /// Every provider reference claimed in this store, as (provider,
    /// reference, payment id): what `tollgate cluster import` claims in
    /// the database, so that a provider's retry stays a replay.
    pub fn payment_refs(&self) -> Result<Vec<(String, String, String)>, StoreError> {
        let bad = || StoreError::Corrupt("payment reference".into());
        let mut out = Vec::new();
        for item in self.inner.book.scan_prefix([b'Q']) {
            let (k, v) = item?;
            let len = k
                .get(1..3)
                .map(|b| usize::from(u16::from_be_bytes([b[0], b[1]])))
                .ok_or_else(bad)?;
            let provider = k
                .get(3..3 + len)
                .and_then(|b| std::str::from_utf8(b).ok())
                .ok_or_else(bad)?;
            let reference = k
                .get(3 + len..)
                .and_then(|b| std::str::from_utf8(b).ok())
                .ok_or_else(bad)?;
            let id = std::str::from_utf8(&v).map_err(|_| bad())?;
            out.push((provider.to_owned(), reference.to_owned(), id.to_owned()));
        }
        Ok(out)
    }

    /// Every payment, oldest first.
    pub fn all_payments(&self) -> impl Iterator<Item = Result<PaymentRecord, StoreError>> + '_ {
        self.inner.book.scan_prefix([b'P']).map(|item| {
            let (_, v) = item?;
            decode_payment(&v)
        })
    }

    /// A page of payments, newest first, filtered.
    pub fn payments(&self, q: &PaymentQuery) -> Result<Vec<PaymentRecord>, StoreError> {
        let mut out = Vec::new();
        let mut skip = q.offset;
        for item in self.inner.book.scan_prefix([b'P']).rev() {
            if out.len() >= q.limit {
                break;
            }
            let (_, v) = item?;
            let p = decode_payment(&v)?;
            if q.account
                .as_ref()
                .is_some_and(|a| p.account.as_ref() != Some(a))
                || q.status.is_some_and(|s| p.status != s)
                || q.provider.as_ref().is_some_and(|pr| &p.provider != pr)
            {
                continue;
            }
            if skip > 0 {
                skip -= 1;
                continue;
            }
            out.push(p);
        }
        Ok(out)
    }

    /// An epay order by our order number.
    pub fn epay_order(&self, out_trade_no: &str) -> Result<Option<EpayOrder>, StoreError> {
        match self.inner.book.get(order_key(out_trade_no))? {
            Some(v) => serde_json::from_slice(&v)
                .map(Some)
                .map_err(|e| StoreError::Corrupt(format!("epay order: {e}"))),
            None => Ok(None),
        }
    }

    /// Every account ledger entry (with its account id), for reconciling.
    pub fn all_account_entries(
        &self,
    ) -> impl Iterator<Item = Result<(String, AccountLedgerEntry), StoreError>> + '_ {
        self.inner.book.scan_prefix([b'L']).map(|item| {
            let (k, v) = item?;
            let len = k
                .get(1..3)
                .map(|b| usize::from(u16::from_be_bytes([b[0], b[1]])))
                .ok_or_else(|| StoreError::Corrupt("account ledger key".into()))?;
            let id = k
                .get(3..3 + len)
                .and_then(|b| std::str::from_utf8(b).ok())
                .ok_or_else(|| StoreError::Corrupt("account ledger key".into()))?;
            Ok((id.to_owned(), super::codec::decode_account_entry(&v)?))
        })
    }

    /// Every key ledger entry (with its key), for reconciling.
    pub fn all_key_entries(
        &self,
    ) -> impl Iterator<Item = Result<(KeyHash, LedgerEntry), StoreError>> + '_ {
        self.inner.book.scan_prefix([b'l']).map(|item| {
            let (k, v) = item?;
            let hash: KeyHash = k
                .get(1..33)
                .and_then(|h| h.try_into().ok())
                .ok_or_else(|| StoreError::Corrupt("ledger key".into()))?;
            Ok((hash, super::codec::decode_ledger(&v)?))
        })
    }
}
