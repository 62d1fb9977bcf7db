//! Subscriptions in the store: their rows (`book` `S`), their grant and
//! renewal markers (`book` `T`), and the one write that changes them.
//!
//! A subscription write is applied by the store thread as one atomic
//! `apply_batch` of `book`, after the usage records queued before it are
//! committed: the subscription, its account (allowance, link, ledger
//! count), the account ledger entries of its grants and lapses, and the
//! markers. So after a crash either all of a renewal or period roll is on
//! disk or none of it, and a grant whose `T` marker exists is never
//! applied again, whatever replays it.

use sled::Batch;

use super::codec::{encode_account_entry, encode_user_account};
use super::layout::*;
use super::records::*;
use super::thread::{Op, StoreThread};
use super::{Store, StoreError};
use crate::money::Pico;

fn encode_sub(s: &SubscriptionRecord) -> Vec<u8> {
    serde_json::to_vec(s).unwrap_or_default()
}

fn decode_sub(bytes: &[u8]) -> Result<SubscriptionRecord, StoreError> {
    serde_json::from_slice(bytes).map_err(|e| StoreError::Corrupt(format!("subscription: {e}")))
}

impl Store {
    /// A subscription, as stored.
    pub fn subscription(&self, id: &str) -> Result<Option<SubscriptionRecord>, StoreError> {
        match self.inner.book.get(subscription_key(id))? {
            Some(v) => Ok(Some(decode_sub(&v)?)),
            None => Ok(None),
        }
    }

    /// Every subscription matching `keep`, in id order. A scan of the `S`
    /// rows: subscriptions are few next to keys and usage.
    pub fn subscriptions_where(
        &self,
        mut keep: impl FnMut(&SubscriptionRecord) -> bool,
    ) -> Result<Vec<SubscriptionRecord>, StoreError> {
        let mut out = Vec::new();
        for item in self.inner.book.scan_prefix([b'S']) {
            let (_, v) = item?;
            let s = decode_sub(&v)?;
            if keep(&s) {
                out.push(s);
            }
        }
        Ok(out)
    }

    /// The period a renewal with this idempotency key paid, if it was applied.
    pub fn renewal_applied(&self, sid: &str, idem: &str) -> Result<Option<u64>, StoreError> {
        match self.inner.book.get(renewal_marker_key(sid, idem))? {
            Some(v) => <[u8; 8]>::try_from(v.as_ref())
                .map(|b| Some(u64::from_be_bytes(b)))
                .map_err(|_| StoreError::Corrupt("renewal marker".into())),
            None => Ok(None),
        }
    }

    /// Whether a grant was applied (its `T` marker exists).
    pub fn grant_applied(&self, sid: &str, m: &SubscriptionMarker) -> Result<bool, StoreError> {
        Ok(self.inner.book.contains_key(grant_marker_key(sid, m))?)
    }

    /// Every `T` marker (applied grants and renewal keys), with its
    /// subscription: what `tollgate cluster import` claims in the
    /// database so that no node applies them again.
    pub fn subscription_markers(&self) -> Result<Vec<(String, AppliedMarker)>, StoreError> {
        let bad = || StoreError::Corrupt("subscription marker".into());
        let mut out = Vec::new();
        for item in self.inner.book.scan_prefix([b'T']) {
            let (k, _) = item?;
            let len = k
                .get(1..3)
                .map(|b| usize::from(u16::from_be_bytes([b[0], b[1]])))
                .ok_or_else(bad)?;
            let sid = k
                .get(3..3 + len)
                .and_then(|b| std::str::from_utf8(b).ok())
                .ok_or_else(bad)?
                .to_owned();
            let rest = k.get(3 + len..).ok_or_else(bad)?;
            let marker = match rest.split_first() {
                Some((b'r', idem)) => {
                    AppliedMarker::Renewal(std::str::from_utf8(idem).map_err(|_| bad())?.to_owned())
                }
                Some((&tag, tail)) if tail.len() >= 8 => AppliedMarker::Grant(SubscriptionMarker {
                    tag,
                    period: u64::from_be_bytes(tail[..8].try_into().map_err(|_| bad())?),
                    extra: std::str::from_utf8(&tail[8..])
                        .map_err(|_| bad())?
                        .to_owned(),
                }),
                _ => return Err(bad()),
            };
            out.push((sid, marker));
        }
        Ok(out)
    }

    /// Applies a subscription write atomically (see the module docs).
    /// `Exists`: a create for an account with a live subscription, or an
    /// id taken; `NotFound`: no such account or subscription; `Invalid`:
    /// the subscription changed since it was read.
    pub async fn write_subscription(
        &self,
        w: SubscriptionWrite,
    ) -> Result<SubscriptionOutcome, StoreError> {
        self.call(|tx| Op::SubscriptionWrite(Box::new(w), tx)).await
    }
}

/// The version check failed: the caller reads again and retries.
pub const STALE_SUBSCRIPTION: &str = "the subscription changed meanwhile";

impl StoreThread {
    /// The outbox events and the audit entry of a subscription change, in
    /// its own batch: created, renewed (a paid period), and each status it
    /// enters (past_due, canceled, expired).
    fn note_subscription(
        &mut self,
        before: Option<&SubscriptionRecord>,
        after: &SubscriptionRecord,
        renewed: bool,
    ) {
        let data = serde_json::to_value(after).unwrap_or_default();
        match before {
            None => self.emit("subscription.created", data.clone()),
            Some(b) if b.status != after.status => {
                let kind = match after.status {
                    SubscriptionStatus::PastDue => Some("subscription.past_due"),
                    SubscriptionStatus::Canceled => Some("subscription.canceled"),
                    SubscriptionStatus::Expired => Some("subscription.expired"),
                    _ => None,
                };
                if let Some(k) = kind {
                    self.emit(k, data.clone());
                }
            }
            Some(_) => {}
        }
        if renewed {
            self.emit("subscription.renewed", data.clone());
        }
        let before = before.and_then(|b| serde_json::to_value(b).ok());
        self.audit("subscription.write", &after.id, before, Some(data));
    }

    pub(super) fn subscription_write(
        &mut self,
        w: &SubscriptionWrite,
    ) -> Result<SubscriptionOutcome, StoreError> {
        let sid = w.sub.id.as_str();
        let skey = subscription_key(sid);
        let stored = match self.book.get(&skey)? {
            Some(v) => Some(decode_sub(&v)?),
            None => None,
        };
        let mut a = self.read_user_account(&w.sub.account)?;
        if let Some(idem) = &w.renewal_key
            && self.book.contains_key(renewal_marker_key(sid, idem))?
        {
            let sub = stored.ok_or(StoreError::NotFound)?;
            return Ok(SubscriptionOutcome {
                sub,
                account: a,
                entries: Vec::new(),
                replayed: true,
            });
        }
        match (w.expect_version, &stored) {
            _ if w.replica => {}
            (None, Some(_)) => return Err(StoreError::Exists),
            (None, None) => {
                if a.subscription.as_ref().is_some_and(|l| l.status.is_live()) {
                    return Err(StoreError::Exists);
                }
            }
            (Some(_), None) => return Err(StoreError::NotFound),
            (Some(v), Some(s)) => {
                if s.version != v || s.account != w.sub.account {
                    return Err(StoreError::Invalid(STALE_SUBSCRIPTION.into()));
                }
            }
        }
        let mut sub = w.sub.clone();
        if !w.replica {
            sub.version = stored.as_ref().map(|s| s.version + 1).unwrap_or(1);
        }
        let mut batch = Batch::default();
        let mut entries = Vec::new();
        let mut marks = 0;
        for m in &w.money {
            let (kind, amount, reason) = match m {
                SubscriptionMoney::Grant {
                    amount,
                    marker,
                    reason,
                } => {
                    let mk = grant_marker_key(sid, marker);
                    if amount.0 <= 0 || self.book.contains_key(&mk)? {
                        continue;
                    }
                    a.allowance = a
                        .allowance
                        .checked_add(*amount)
                        .ok_or_else(|| StoreError::Invalid("allowance out of range".into()))?;
                    batch.insert(mk, &[][..]);
                    (AccountCreditKind::Grant, *amount, reason)
                }
                SubscriptionMoney::LapseAll { reason, .. } => {
                    let amount = Pico(a.allowance.0.max(0));
                    if amount.0 == 0 {
                        continue;
                    }
                    a.allowance = Pico::ZERO;
                    (AccountCreditKind::Lapse, amount, reason)
                }
            };
            a.ledger_seq += 1;
            let entry = AccountLedgerEntry {
                seq: a.ledger_seq,
                at_ms: w.at_ms,
                kind,
                amount,
                reason: reason.clone(),
                idempotency_key: None,
                balance_after: a.balance,
                spent_after: a.spent,
                allowance_after: a.allowance,
            };
            let key = account_ledger_key(&a.id, entry.seq);
            marks += self.mark_unshipped(&mut batch, &key, entry.at_ms);
            batch.insert(key, encode_account_entry(&entry));
            entries.push(entry);
        }
        if let Some(idem) = &w.renewal_key {
            batch.insert(
                renewal_marker_key(sid, idem),
                &sub.paid_through.to_be_bytes(),
            );
        }
        // The account points at its latest subscription; an older one
        // changing (it cannot be live) leaves the pointer alone.
        if a.subscription.as_ref().is_none_or(|l| l.id == sub.id)
            || (w.expect_version.is_none() && !w.replica)
            || (w.replica && sub.status.is_live())
        {
            a.subscription = Some(SubscriptionLink {
                id: sub.id.clone(),
                plan: sub.plan.clone(),
                status: sub.status,
            });
        }
        a.updated_at = a.updated_at.max(w.at_ms);
        batch.insert(user_account_key(&a.id), encode_user_account(&a));
        batch.insert(skey, encode_sub(&sub));
        let writes = 2 + entries.len() + marks + usize::from(w.renewal_key.is_some());
        self.note_subscription(stored.as_ref(), &sub, w.renewal_key.is_some());
        let staged = self.stage_outbox();
        staged.add_to(&mut batch);
        self.book.apply_batch(batch)?;
        self.write_count(writes);
        self.outbox_written(staged);
        Ok(SubscriptionOutcome {
            sub,
            account: a,
            entries,
            replayed: false,
        })
    }
}

/// A `T` marker as read back ([`Store::subscription_markers`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum AppliedMarker {
    /// A grant that was applied.
    Grant(SubscriptionMarker),
    /// A renewal's idempotency key that was consumed.
    Renewal(String),
}
