//! The outbox and the audit log, as the store thread writes them.
//!
//! The mechanism: while the store thread handles one op, the op's code
//! queues what it wants to say with [`StoreThread::emit`] (an event) and
//! [`StoreThread::audit`] (an audit entry, kept only when the op came
//! from an admin request, see [`crate::events::acting_as`]). Right before
//! it applies its write, it calls [`StoreThread::stage_outbox`], puts the
//! returned rows into the same `Batch` (or transaction) as its change,
//! and after the write succeeded calls [`StoreThread::outbox_written`].
//! A write that fails or is refused never stages, and whatever it queued
//! is dropped when the op ends: no event without its change, no change
//! without its event. Usage records (which are batched across ops) queue
//! their events (`key.exhausted`, `*.low_balance`, `usage.anomaly`) in the
//! pending batch instead, written by the same `apply_batch` that counts
//! them.
//!
//! Other modules' store ops (subscriptions, payments) do the same:
//!
//! ```ignore
//! self.emit("payment.succeeded", payload);          // queued for this op
//! self.audit("payment.create", &id, None, Some(v));  // if an admin did it
//! let staged = self.stage_outbox();
//! let mut batch = sled::Batch::default();
//! /* … the op's own rows … */
//! staged.add_to(&mut batch);
//! self.book.apply_batch(batch)?;
//! self.outbox_written(staged);
//! ```
//!
//! Layout in `book` (one-byte prefixes `E`, `U`, `D`):
//!
//! | key | value |
//! |---|---|
//! | `E` seq (u64 BE) | event JSON `{"id","type","timestamp","data"}` |
//! | `U` seq (u64 BE) | audit entry JSON |
//! | `D` 0 `cursor` | u64 BE: outbox seqs below it have their deliveries planned |
//! | `D` 1 seq target | delivery state JSON (one per event × endpoint) |
//! | `D` 2 target | endpoint state JSON (disabled by a 410) |
//! | `D` 3 hash | empty: this key's expiry was announced |

use std::collections::HashMap;

use serde_json::Value;
use sled::Batch;

use super::super::{Store, StoreError};
use super::{Op, StoreThread, reply_after_flush};
use crate::clock::{HOUR_MS, rfc3339};
use crate::events::deliver::{DeliveryState, DeliveryStatus, EndpointState};
use crate::events::{Actor, AuditEntry, Event, EventDraft, event_id, payload};
use crate::money::Pico;
use crate::store::codec::{decode_account, decode_key, decode_rollup, ord_i64};
use crate::store::layout::{account_key, key_record_key};
use crate::store::records::{Account, KeyHash, KeyRecord, UsageRecord};

const EVENT: u8 = b'E';
const AUDIT: u8 = b'U';
const DELIVERY: u8 = b'D';
const D_CURSOR: &[u8] = b"D\x00cursor";
const D_DELIVERY: u8 = 1;
const D_ENDPOINT: u8 = 2;
const D_EXPIRED: u8 = 3;

/// Most events one retention pass removes: the store thread takes no other
/// op meanwhile; the next sweep goes on.
const PRUNE_EVENTS_MAX: u64 = 10_000;

/// Hours of spend the anomaly baseline averages.
const ANOMALY_BASELINE_HOURS: i64 = 24;

fn seq_key(tag: u8, seq: u64) -> [u8; 9] {
    let mut k = [0u8; 9];
    k[0] = tag;
    k[1..].copy_from_slice(&seq.to_be_bytes());
    k
}

fn delivery_key(seq: u64, target: &str) -> Vec<u8> {
    let mut k = Vec::with_capacity(10 + target.len());
    k.push(DELIVERY);
    k.push(D_DELIVERY);
    k.extend_from_slice(&seq.to_be_bytes());
    k.extend_from_slice(target.as_bytes());
    k
}

fn endpoint_key(target: &str) -> Vec<u8> {
    let mut k = vec![DELIVERY, D_ENDPOINT];
    k.extend_from_slice(target.as_bytes());
    k
}

fn expired_key(hash: &KeyHash) -> Vec<u8> {
    let mut k = vec![DELIVERY, D_EXPIRED];
    k.extend_from_slice(hash);
    k
}

/// The sequence after the last row under one-byte `tag`.
fn next_seq(book: &sled::Tree, tag: u8) -> Result<u64, StoreError> {
    match book.scan_prefix([tag]).next_back() {
        None => Ok(1),
        Some(row) => {
            let (k, _) = row?;
            <[u8; 8]>::try_from(&k[1..])
                .map(|b| u64::from_be_bytes(b) + 1)
                .map_err(|_| StoreError::Corrupt("outbox sequence".into()))
        }
    }
}

/// Thresholds the store thread checks records against (`[alerts]`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct AlertLevels {
    /// Default low-balance threshold of keys (their remaining limit) and
    /// accounts without their own `low_balance_alert`.
    pub low_balance: Option<Pico>,
    /// `alerts.anomaly_factor` in thousandths (integer compare, no float
    /// in the store thread).
    pub anomaly_permille: Option<u64>,
}

/// A key's settings the records are checked against.
#[derive(Clone, Copy, Default)]
struct KeyCaps {
    /// `max_requests`: reaching it is `key.exhausted`.
    max_requests: Option<u64>,
    /// The key's own `low_balance_alert`.
    low_balance: Option<Pico>,
}

/// A key's spend in the current hour against its baseline.
struct HourWatch {
    hour: i64,
    /// Spent in `hour` (stored rollups when first seen + records since).
    spent: i64,
    /// Average spend per hour over the day before `hour`.
    baseline: i64,
    /// `usage.anomaly` already said for this hour.
    told: bool,
}

/// The store thread's outbox state.
pub(in crate::store) struct Outbox {
    /// Sequence the next event gets.
    next_event: u64,
    /// Sequence the next audit entry gets.
    next_audit: u64,
    /// Events the op being handled queued.
    drafts: Vec<EventDraft>,
    /// Audit entries the op being handled queued: (action, target, before, after).
    audits: Vec<(String, String, Option<Value>, Option<Value>)>,
    /// The admin who made the op being handled; `None` = not an admin write.
    pub(in crate::store) actor: Option<Actor>,
    /// Events written since the last flush: the delivery task is told.
    unannounced: bool,
    /// `[alerts]` thresholds records are checked against.
    alerts: AlertLevels,
    /// What records are checked against, by key: read once per key (the
    /// records do not carry it) and forgotten by key writes.
    caps: HashMap<KeyHash, KeyCaps>,
    /// Per-key hourly spend, for `usage.anomaly`.
    hours: HashMap<KeyHash, HourWatch>,
    /// The op being handled applies another node's change (cluster mode):
    /// that node emitted its events, so this one emits none.
    pub(in crate::store) replica: bool,
}

impl Outbox {
    pub(in crate::store) fn open(
        book: &sled::Tree,
        alerts: AlertLevels,
    ) -> Result<Outbox, StoreError> {
        Ok(Outbox {
            next_event: next_seq(book, EVENT)?,
            next_audit: next_seq(book, AUDIT)?,
            drafts: Vec::new(),
            audits: Vec::new(),
            actor: None,
            unannounced: false,
            alerts,
            caps: HashMap::new(),
            hours: HashMap::new(),
            replica: false,
        })
    }

    /// The time of the op being handled: the admin request's, else now.
    fn now_ms(&self) -> i64 {
        match &self.actor {
            Some(a) => a.at_ms,
            None => std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_millis() as i64),
        }
    }

    /// Drops what an op queued but never staged (it failed or was refused).
    pub(in crate::store) fn discard_unstaged(&mut self) {
        self.drafts.clear();
        self.audits.clear();
    }

    /// Takes the flag "events were written since the last flush".
    pub(in crate::store) fn take_unannounced(&mut self) -> bool {
        std::mem::take(&mut self.unannounced)
    }

    fn event_row(seq: u64, d: &EventDraft, at_ms: i64) -> (Vec<u8>, Vec<u8>) {
        let ev = Event {
            id: event_id(seq),
            kind: d.kind.clone(),
            timestamp: rfc3339(at_ms),
            data: d.data.clone(),
        };
        (
            seq_key(EVENT, seq).to_vec(),
            serde_json::to_vec(&ev).unwrap_or_default(),
        )
    }
}

/// Outbox rows for one write, with the sequences they used: applied with
/// the write, then confirmed by [`StoreThread::outbox_written`].
#[must_use = "put the rows into the write's batch, then call outbox_written"]
pub(in crate::store) struct Staged {
    /// `E` and `U` rows (and any marker) to insert with the write.
    rows: Vec<(Vec<u8>, Vec<u8>)>,
    /// Rows the write also removes (a stale expiry marker).
    removes: Vec<Vec<u8>>,
    /// The event sequence after these rows: taken once the write succeeded.
    next_event: u64,
    /// The audit sequence after these rows.
    next_audit: u64,
    /// Whether any event is among the rows (the delivery task is told).
    events: bool,
}

impl Staged {
    /// Adds the rows to a `book` batch.
    pub(in crate::store) fn add_to(&self, batch: &mut Batch) {
        for (k, v) in &self.rows {
            batch.insert(k.as_slice(), v.as_slice());
        }
        for k in &self.removes {
            batch.remove(k.as_slice());
        }
    }

    /// Adds the rows inside a transaction over `book`.
    pub(in crate::store) fn add_to_tx(
        &self,
        book: &sled::transaction::TransactionalTree,
    ) -> Result<(), sled::transaction::UnabortableTransactionError> {
        for (k, v) in &self.rows {
            book.insert(k.as_slice(), v.as_slice())?;
        }
        for k in &self.removes {
            book.remove(k.as_slice())?;
        }
        Ok(())
    }

    /// Also removes `key` from `book` with the write.
    fn remove(&mut self, key: Vec<u8>) {
        self.removes.push(key);
    }

    fn len(&self) -> usize {
        self.rows.len() + self.removes.len()
    }
}

impl StoreThread {
    /// Queues an event of type `kind` for the write the current op makes.
    /// `data` is the object's API shape (see [`crate::events::payload`]);
    /// never put a key or a secret in it.
    pub(in crate::store) fn emit(&mut self, kind: &str, data: Value) {
        if self.outbox.replica {
            return;
        }
        self.outbox.drafts.push(EventDraft::new(kind, data));
    }

    /// Queues an audit entry for the current op: `action` (`key.create`,
    /// `payment.refund`…), `target` (a hash, an id), summaries before and
    /// after. Kept only when an admin request made the op.
    pub(in crate::store) fn audit(
        &mut self,
        action: &str,
        target: &str,
        before: Option<Value>,
        after: Option<Value>,
    ) {
        if self.outbox.actor.is_some() {
            self.outbox
                .audits
                .push((action.to_owned(), target.to_owned(), before, after));
        }
    }

    /// Turns what the current op queued into rows for its write.
    pub(in crate::store) fn stage_outbox(&mut self) -> Staged {
        let o = &mut self.outbox;
        let at = o.now_ms();
        let mut staged = Staged {
            rows: Vec::with_capacity(o.drafts.len() + o.audits.len()),
            removes: Vec::new(),
            next_event: o.next_event,
            next_audit: o.next_audit,
            events: !o.drafts.is_empty(),
        };
        for d in o.drafts.drain(..) {
            staged
                .rows
                .push(Outbox::event_row(staged.next_event, &d, at));
            staged.next_event += 1;
        }
        if let Some(actor) = &o.actor {
            for (action, target, before, after) in o.audits.drain(..) {
                let entry = AuditEntry {
                    seq: staged.next_audit,
                    at: rfc3339(at),
                    actor: actor.name.clone(),
                    action,
                    target,
                    before,
                    after,
                    ip: actor.ip.map(|ip| ip.to_string()),
                };
                staged.rows.push((
                    seq_key(AUDIT, staged.next_audit).to_vec(),
                    serde_json::to_vec(&entry).unwrap_or_default(),
                ));
                staged.next_audit += 1;
            }
        }
        o.audits.clear();
        staged
    }

    /// The write that carried `staged` succeeded: its sequences are used.
    pub(in crate::store) fn outbox_written(&mut self, staged: Staged) {
        self.write_count(staged.len());
        self.outbox.next_event = staged.next_event;
        self.outbox.next_audit = staged.next_audit;
        self.outbox.unannounced |= staged.events;
    }

    /// Rows for the events the pending usage batch queued.
    pub(in crate::store) fn stage_pending_events(&self) -> Staged {
        let mut staged = Staged {
            rows: Vec::new(),
            removes: Vec::new(),
            next_event: self.outbox.next_event,
            next_audit: self.outbox.next_audit,
            events: !self.pending.events.is_empty(),
        };
        for (d, at) in &self.pending.events {
            staged
                .rows
                .push(Outbox::event_row(staged.next_event, d, *at));
            staged.next_event += 1;
        }
        staged
    }

    fn key_record(&self, hash: &KeyHash) -> Option<KeyRecord> {
        let v = self.keys.get(key_record_key(hash)).ok()??;
        decode_key(hash, &v).ok()
    }

    fn stored_account(&self, hash: &KeyHash) -> Option<Account> {
        let v = self.book.get(account_key(hash)).ok()??;
        decode_account(&v).ok().map(|(a, _)| a)
    }

    /// The key's caps, read once and then kept until a key write.
    fn caps_of(&mut self, hash: &KeyHash) -> KeyCaps {
        if let Some(c) = self.outbox.caps.get(hash) {
            return *c;
        }
        let caps = self
            .key_record(hash)
            .map(|r| KeyCaps {
                max_requests: r.max_requests,
                low_balance: r.low_balance_alert,
            })
            .unwrap_or_default();
        self.outbox.caps.insert(*hash, caps);
        caps
    }

    /// A key write changed (or removed) the record: forget its cached cap.
    pub(in crate::store) fn forget_cap(&mut self, hash: &KeyHash) {
        self.outbox.caps.remove(hash);
    }

    /// Events of the money moved by one usage record: `before`/`after` are
    /// the key's account around it, `wallet` its account's funds around it.
    pub(in crate::store) fn watch_record(
        &mut self,
        rec: &UsageRecord,
        key: Option<(Account, Account)>,
        wallet: Option<(Pico, Pico)>,
    ) {
        let mut found: Vec<&'static str> = Vec::new();
        if let Some((before, after)) = key {
            let caps = self.caps_of(&rec.key);
            let capped = caps
                .max_requests
                .is_some_and(|m| before.requests < m && after.requests >= m);
            let spent_out = after
                .limit
                .is_some_and(|l| before.period_spent < l && after.period_spent >= l);
            if capped || spent_out {
                found.push("key.exhausted");
            }
            if let (Some(l), Some(t)) = (
                after.limit,
                caps.low_balance.or(self.outbox.alerts.low_balance),
            ) {
                let left = |a: &Account| l.0.saturating_sub(a.period_spent.0);
                if left(&before) >= t.0 && left(&after) < t.0 {
                    found.push("key.low_balance");
                }
            }
            if !found.is_empty()
                && let Some(r) = self.key_record(&rec.key)
            {
                for kind in found.drain(..) {
                    let mut data = payload::key(&r, &after);
                    if kind == "key.exhausted" {
                        data["reason"] = Value::from(if capped { "max_requests" } else { "limit" });
                    }
                    self.pending
                        .events
                        .push((EventDraft::new(kind, data), rec.at_ms));
                }
            }
        }
        if let (Some((before, after)), Some(id)) = (wallet, &rec.account)
            && let Some(Some(a)) = self.pending.accounts.get(id)
            && !a.unlimited
            && let Some(t) = a.low_balance_alert.or(self.outbox.alerts.low_balance)
            && before >= t
            && after < t
        {
            let data = payload::account(a);
            self.pending
                .events
                .push((EventDraft::new("account.low_balance", data), rec.at_ms));
        }
        if let Some(permille) = self.outbox.alerts.anomaly_permille {
            self.watch_hour(rec, permille);
        }
    }

    fn watch_hour(&mut self, rec: &UsageRecord, permille: u64) {
        let hour = rec.at_ms.div_euclid(HOUR_MS);
        let fresh = self
            .outbox
            .hours
            .get(&rec.key)
            .is_none_or(|w| w.hour != hour);
        if fresh {
            let (current, baseline) = self.hour_spend(&rec.key, hour);
            self.outbox.hours.insert(
                rec.key,
                HourWatch {
                    hour,
                    spent: current,
                    baseline,
                    told: false,
                },
            );
        }
        let Some(w) = self.outbox.hours.get_mut(&rec.key) else {
            return;
        };
        w.spent = w.spent.saturating_add(rec.cost.0);
        let above = w.baseline > 0
            && i128::from(w.spent) * 1000 > i128::from(w.baseline) * i128::from(permille);
        if above && !w.told {
            w.told = true;
            let data = serde_json::json!({
                "key": hex::encode(rec.key),
                "hour": rfc3339(hour * HOUR_MS),
                "spent_this_hour": Pico(w.spent),
                "hourly_average": Pico(w.baseline),
                "factor": permille as f64 / 1000.0,
            });
            self.pending
                .events
                .push((EventDraft::new("usage.anomaly", data), rec.at_ms));
        }
    }

    /// The key's stored spend in `hour` and its average per hour over the
    /// day before, from the `R` rollups (all models).
    fn hour_spend(&self, hash: &KeyHash, hour: i64) -> (i64, i64) {
        let mut from = vec![b'R'];
        from.extend_from_slice(hash);
        let mut to = from.clone();
        from.extend_from_slice(&ord_i64(hour - ANOMALY_BASELINE_HOURS));
        to.extend_from_slice(&ord_i64(hour + 1));
        let (mut current, mut before) = (0i64, 0i64);
        let at = 1 + 32;
        for row in self.book.range(from..to) {
            let Ok((k, v)) = row else { break };
            let Some(h) = k
                .get(at..at + 8)
                .and_then(crate::store::codec::from_ord_i64)
            else {
                continue;
            };
            let Ok(r) = decode_rollup(&v) else { continue };
            if h == hour {
                current = current.saturating_add(r.cost.0);
            } else {
                before = before.saturating_add(r.cost.0);
            }
        }
        (current, before / ANOMALY_BASELINE_HOURS)
    }

    /// Ops of the outbox itself.
    pub(in crate::store) fn handle_outbox_op(&mut self, op: Op) -> bool {
        match op {
            Op::Emit(drafts, note, tx) => {
                let r = self.commit_pending().and_then(|()| {
                    self.outbox.drafts.extend(drafts);
                    if let Some((action, target, before, after)) = note {
                        self.audit(&action, &target, before, after);
                    }
                    self.write_outbox_only()
                });
                self.replies.push(reply_after_flush(tx, r));
                true
            }
            Op::KeyExpired(hash, at_ms) => {
                if let Err(e) = self.key_expired(&hash, at_ms) {
                    tracing::error!(error = %e, "key.expired not written");
                }
                false
            }
            Op::Deliveries(write, tx) => {
                let r = self.deliveries(write);
                self.replies.push(reply_after_flush(tx, r));
                true
            }
            Op::PruneEvents(before, tx) => {
                let r = self
                    .commit_pending()
                    .and_then(|()| self.prune_events(before));
                self.replies.push(reply_after_flush(tx, r));
                true
            }
            _ => false,
        }
    }

    /// Retention: removes events older than `before_ms` whose deliveries
    /// have all finished (delivered, failed or skipped), with their
    /// delivery rows, in one batch. An event with a delivery still pending
    /// (or retrying), or not yet planned (at or past the delivery cursor),
    /// is kept whatever its age. Events are written in time order, so the
    /// scan stops at the first one that is new enough.
    fn prune_events(&mut self, before_ms: i64) -> Result<u64, StoreError> {
        let cursor = match self.book.get(D_CURSOR)? {
            None => 1,
            Some(v) => <[u8; 8]>::try_from(v.as_ref())
                .map(u64::from_be_bytes)
                .map_err(|_| StoreError::Corrupt("delivery cursor".into()))?,
        };
        let mut batch = Batch::default();
        let mut removed = 0u64;
        let mut writes = 0usize;
        let planned = seq_key(EVENT, 0).to_vec()..seq_key(EVENT, cursor).to_vec();
        'events: for row in self.book.range(planned) {
            if removed >= PRUNE_EVENTS_MAX {
                break;
            }
            let (k, v) = row?;
            let ev: Event = serde_json::from_slice(&v)
                .map_err(|e| StoreError::Corrupt(format!("outbox event: {e}")))?;
            let at = crate::clock::parse_rfc3339(&ev.timestamp)
                .ok_or_else(|| StoreError::Corrupt("outbox event timestamp".into()))?;
            if at >= before_ms {
                break;
            }
            let mut prefix = vec![DELIVERY, D_DELIVERY];
            prefix.extend_from_slice(&k[1..]);
            let mut rows = Vec::new();
            for d in self.book.scan_prefix(&prefix) {
                let (dk, dv) = d?;
                let state: DeliveryState = serde_json::from_slice(&dv)
                    .map_err(|e| StoreError::Corrupt(format!("delivery state: {e}")))?;
                if state.status == DeliveryStatus::Pending {
                    continue 'events;
                }
                rows.push(dk);
            }
            writes += 1 + rows.len();
            batch.remove(k);
            for r in rows {
                batch.remove(r);
            }
            removed += 1;
        }
        if removed > 0 {
            self.book.apply_batch(batch)?;
            self.write_count(writes);
        }
        Ok(removed)
    }

    fn write_outbox_only(&mut self) -> Result<(), StoreError> {
        let staged = self.stage_outbox();
        let mut batch = Batch::default();
        staged.add_to(&mut batch);
        self.book.apply_batch(batch)?;
        self.outbox_written(staged);
        Ok(())
    }

    fn key_expired(&mut self, hash: &KeyHash, at_ms: i64) -> Result<(), StoreError> {
        let marker = expired_key(hash);
        if self.book.contains_key(&marker)? {
            return Ok(());
        }
        let Some(rec) = self.key_record(hash) else {
            return Ok(());
        };
        if rec.expires_at.is_none_or(|e| e > at_ms) {
            return Ok(());
        }
        let acct = self.stored_account(hash).unwrap_or_default();
        self.emit("key.expired", payload::key(&rec, &acct));
        let staged = self.stage_outbox();
        let mut batch = Batch::default();
        staged.add_to(&mut batch);
        batch.insert(marker, &[]);
        self.book.apply_batch(batch)?;
        self.outbox_written(staged);
        Ok(())
    }

    fn deliveries(&mut self, w: DeliveryWrite) -> Result<(), StoreError> {
        let mut batch = Batch::default();
        let mut n = 0;
        if let Some(c) = w.cursor {
            batch.insert(D_CURSOR, &c.to_be_bytes());
            n += 1;
        }
        for (seq, target, state) in &w.deliveries {
            batch.insert(
                delivery_key(*seq, target),
                serde_json::to_vec(state).unwrap_or_default(),
            );
            n += 1;
        }
        for (target, state) in &w.endpoints {
            batch.insert(
                endpoint_key(target),
                serde_json::to_vec(state).unwrap_or_default(),
            );
            n += 1;
        }
        // A delivery write made by an admin is a redelivery: audited with it.
        if let Some((seq, _, _)) = w.deliveries.first() {
            let targets: Vec<&str> = w.deliveries.iter().map(|(_, t, _)| t.as_str()).collect();
            self.audit(
                "event.redeliver",
                &event_id(*seq),
                None,
                Some(serde_json::json!({ "targets": targets })),
            );
        }
        let staged = self.stage_outbox();
        staged.add_to(&mut batch);
        self.book.apply_batch(batch)?;
        self.outbox_written(staged);
        self.write_count(n);
        Ok(())
    }

    // ---- the events of the key and account writes (called by thread.rs) ----

    /// `key.created` and its audit entry.
    pub(in crate::store) fn note_key_created(&mut self, rec: &KeyRecord, acct: &Account) {
        let data = payload::key(rec, acct);
        self.audit(
            "key.create",
            &hex::encode(rec.hash),
            None,
            Some(data.clone()),
        );
        self.emit("key.created", data);
        self.forget_cap(&rec.hash);
    }

    /// `key.updated` (or `key.disabled` when that is what changed) and
    /// the audit entry; returns rows to stage (the expiry marker goes when
    /// the expiry moves).
    pub(in crate::store) fn note_key_updated(&mut self, rec: &KeyRecord) -> Staged {
        let old = self.key_record(&rec.hash);
        let acct = self.stored_account(&rec.hash).unwrap_or_default();
        let after = payload::key(rec, &acct);
        let before = old.as_ref().map(|o| payload::key(o, &acct));
        let disabled = old.as_ref().is_some_and(|o| !o.disabled) && rec.disabled;
        self.audit(
            "key.update",
            &hex::encode(rec.hash),
            before,
            Some(after.clone()),
        );
        self.emit(
            if disabled {
                "key.disabled"
            } else {
                "key.updated"
            },
            after,
        );
        self.forget_cap(&rec.hash);
        let mut staged = self.stage_outbox();
        if old.is_some_and(|o| o.expires_at != rec.expires_at) {
            staged.remove(expired_key(&rec.hash));
        }
        staged
    }

    /// `key.deleted` and its audit entry (nothing when the key is absent).
    pub(in crate::store) fn note_key_deleted(&mut self, hash: &KeyHash) -> Staged {
        if let Some(old) = self.key_record(hash) {
            let acct = self.stored_account(hash).unwrap_or_default();
            let data = payload::key(&old, &acct);
            self.audit("key.delete", &hex::encode(hash), Some(data.clone()), None);
            self.emit("key.deleted", data);
        }
        self.forget_cap(hash);
        let mut staged = self.stage_outbox();
        staged.remove(expired_key(hash));
        staged
    }

    /// A key's limit set by an admin: audited (the `key.updated` of the
    /// same request carries the record).
    pub(in crate::store) fn note_limit(
        &mut self,
        hash: &KeyHash,
        before: &Account,
        after: &Account,
    ) {
        self.audit(
            "key.set_limit",
            &hex::encode(hash),
            Some(serde_json::json!({ "limit": before.limit })),
            Some(serde_json::json!({ "limit": after.limit })),
        );
    }

    /// `credit.applied` (and `key.low_balance` / `key.exhausted` when the
    /// entry crossed them) for a key's ledger entry.
    pub(in crate::store) fn note_key_credit(
        &mut self,
        hash: &KeyHash,
        before: &Account,
        after: &Account,
        entry: &crate::store::records::LedgerEntry,
    ) {
        let rec = self.key_record(hash);
        let h = hex::encode(hash);
        let data = payload::key_credit(rec.as_ref(), after, entry, &h);
        self.audit(
            "key.credit",
            &h,
            Some(serde_json::json!({ "limit": before.limit, "usage": before.spent })),
            Some(data.clone()),
        );
        self.emit("credit.applied", data);
        let threshold = rec
            .as_ref()
            .and_then(|r| r.low_balance_alert)
            .or(self.outbox.alerts.low_balance);
        if let (Some(l), Some(t), Some(r)) = (after.limit, threshold, &rec) {
            let left = |a: &Account| a.limit.unwrap_or(l).0.saturating_sub(a.period_spent.0);
            if left(before) >= t.0 && left(after) < t.0 {
                self.emit("key.low_balance", payload::key(r, after));
            }
        }
    }

    /// Audit of an account write; `account.suspended` when that is what
    /// it did.
    pub(in crate::store) fn note_account_write(
        &mut self,
        action: &str,
        id: &str,
        before: Option<&crate::store::records::AccountRecord>,
        after: Option<&crate::store::records::AccountRecord>,
    ) {
        use crate::store::records::AccountStatus;
        let suspended = after.is_some_and(|a| a.status == AccountStatus::Suspended)
            && before.is_none_or(|b| b.status != AccountStatus::Suspended);
        let after_v = after.map(payload::account);
        self.audit(action, id, before.map(payload::account), after_v.clone());
        if suspended && let Some(v) = after_v {
            self.emit("account.suspended", v);
        }
    }

    /// `credit.applied` (and `account.low_balance` on a crossing) for an
    /// account's ledger entry.
    pub(in crate::store) fn note_account_credit(
        &mut self,
        before: &crate::store::records::AccountRecord,
        after: &crate::store::records::AccountRecord,
        entry: &crate::store::records::AccountLedgerEntry,
    ) {
        let data = payload::account_credit(after, entry);
        self.audit(
            "account.credit",
            &after.id,
            Some(payload::account(before)),
            Some(data.clone()),
        );
        self.emit("credit.applied", data);
        if !after.unlimited
            && let Some(t) = after.low_balance_alert.or(self.outbox.alerts.low_balance)
            && charge_free(before) >= t
            && charge_free(after) < t
        {
            self.emit("account.low_balance", payload::account(after));
        }
    }

    /// `key.created` for each imported key, and one audit entry.
    pub(in crate::store) fn note_import(&mut self, items: &[(KeyRecord, Account)]) {
        for (rec, acct) in items {
            self.emit("key.created", payload::key(rec, acct));
            self.forget_cap(&rec.hash);
        }
        self.audit(
            "key.import",
            "keys",
            None,
            Some(serde_json::json!({ "count": items.len() })),
        );
    }
}

/// Delivery state to write: the fan-out cursor, deliveries, endpoints.
#[derive(Debug, Default)]
pub struct DeliveryWrite {
    /// New fan-out cursor: events below it have their deliveries planned.
    pub cursor: Option<u64>,
    /// (event seq, target, state).
    pub deliveries: Vec<(u64, String, DeliveryState)>,
    /// (target, state).
    pub endpoints: Vec<(String, EndpointState)>,
}

/// Which events [`Store::events`] lists.
#[derive(Debug, Default, Clone)]
pub struct EventQuery {
    /// Only sequences above this.
    pub after: u64,
    /// Only this type (or glob).
    pub kind: Option<crate::config::Pattern>,
    /// Most events returned.
    pub limit: usize,
}

/// Which audit entries [`Store::audit_log`] lists.
#[derive(Debug, Default, Clone)]
pub struct AuditQuery {
    /// Only entries with a seq above this.
    pub after: u64,
    /// Only this actor's entries.
    pub actor: Option<String>,
    /// Only entries about this target.
    pub target: Option<String>,
    /// Most entries returned.
    pub limit: usize,
}

impl Store {
    /// Events after `q.after`, oldest first.
    pub fn events(&self, q: &EventQuery) -> Result<Vec<(u64, Event)>, StoreError> {
        let mut out = Vec::new();
        let from = seq_key(EVENT, q.after.saturating_add(1));
        for row in self.inner.book.range(from.to_vec()..[EVENT + 1].to_vec()) {
            let (k, v) = row?;
            let seq = <[u8; 8]>::try_from(&k[1..])
                .map(u64::from_be_bytes)
                .map_err(|_| StoreError::Corrupt("outbox key".into()))?;
            let ev: Event = serde_json::from_slice(&v)
                .map_err(|e| StoreError::Corrupt(format!("outbox event: {e}")))?;
            if q.kind.as_ref().is_none_or(|p| p.is_match(&ev.kind)) {
                out.push((seq, ev));
                if out.len() >= q.limit {
                    break;
                }
            }
        }
        Ok(out)
    }

    /// The event at `seq`, with its stored bytes (the webhook body).
    pub fn event(&self, seq: u64) -> Result<Option<(Event, Vec<u8>)>, StoreError> {
        match self.inner.book.get(seq_key(EVENT, seq))? {
            None => Ok(None),
            Some(v) => {
                let ev = serde_json::from_slice(&v)
                    .map_err(|e| StoreError::Corrupt(format!("outbox event: {e}")))?;
                Ok(Some((ev, v.to_vec())))
            }
        }
    }

    /// Audit entries after `q.after`, oldest first.
    pub fn audit_log(&self, q: &AuditQuery) -> Result<Vec<AuditEntry>, StoreError> {
        let mut out = Vec::new();
        let from = seq_key(AUDIT, q.after.saturating_add(1));
        for row in self.inner.book.range(from.to_vec()..[AUDIT + 1].to_vec()) {
            let (_, v) = row?;
            let e: AuditEntry = serde_json::from_slice(&v)
                .map_err(|e| StoreError::Corrupt(format!("audit entry: {e}")))?;
            if q.actor.as_ref().is_none_or(|a| *a == e.actor)
                && q.target.as_ref().is_none_or(|t| *t == e.target)
            {
                out.push(e);
                if out.len() >= q.limit {
                    break;
                }
            }
        }
        Ok(out)
    }

    /// Outbox sequences below this have their deliveries planned.
    pub fn delivery_cursor(&self) -> Result<u64, StoreError> {
        match self.inner.book.get(D_CURSOR)? {
            None => Ok(1),
            Some(v) => <[u8; 8]>::try_from(v.as_ref())
                .map(u64::from_be_bytes)
                .map_err(|_| StoreError::Corrupt("delivery cursor".into())),
        }
    }

    /// Every delivery's state: (event seq, target, state).
    pub fn deliveries(&self) -> Result<Vec<(u64, String, DeliveryState)>, StoreError> {
        let mut out = Vec::new();
        for row in self.inner.book.scan_prefix([DELIVERY, D_DELIVERY]) {
            let (k, v) = row?;
            let seq = k
                .get(2..10)
                .and_then(|b| <[u8; 8]>::try_from(b).ok())
                .map(u64::from_be_bytes)
                .ok_or_else(|| StoreError::Corrupt("delivery key".into()))?;
            let target = String::from_utf8_lossy(&k[10..]).into_owned();
            let state = serde_json::from_slice(&v)
                .map_err(|e| StoreError::Corrupt(format!("delivery state: {e}")))?;
            out.push((seq, target, state));
        }
        Ok(out)
    }

    /// The deliveries of one event: (target, state).
    pub fn deliveries_of(&self, seq: u64) -> Result<Vec<(String, DeliveryState)>, StoreError> {
        let mut prefix = vec![DELIVERY, D_DELIVERY];
        prefix.extend_from_slice(&seq.to_be_bytes());
        let mut out = Vec::new();
        for row in self.inner.book.scan_prefix(&prefix) {
            let (k, v) = row?;
            let target = String::from_utf8_lossy(&k[10..]).into_owned();
            let state = serde_json::from_slice(&v)
                .map_err(|e| StoreError::Corrupt(format!("delivery state: {e}")))?;
            out.push((target, state));
        }
        Ok(out)
    }

    /// The state of each endpoint that has one (disabled by a 410).
    pub fn endpoints(&self) -> Result<Vec<(String, EndpointState)>, StoreError> {
        let mut out = Vec::new();
        for row in self.inner.book.scan_prefix([DELIVERY, D_ENDPOINT]) {
            let (k, v) = row?;
            let target = String::from_utf8_lossy(&k[2..]).into_owned();
            let state = serde_json::from_slice(&v)
                .map_err(|e| StoreError::Corrupt(format!("endpoint state: {e}")))?;
            out.push((target, state));
        }
        Ok(out)
    }

    /// Retention of the outbox: removes events older than `before_ms`
    /// whose deliveries all finished, and their delivery rows; returns how
    /// many events went. One still pending (or retrying) stays.
    pub async fn prune_events_before(&self, before_ms: i64) -> Result<u64, StoreError> {
        self.call(|tx| Op::PruneEvents(before_ms, tx)).await
    }

    /// Writes delivery state (flushed before it returns).
    pub async fn save_deliveries(&self, w: DeliveryWrite) -> Result<(), StoreError> {
        self.call(|tx| Op::Deliveries(w, tx)).await
    }

    /// Writes events that belong to no store op of their own, with the
    /// audit entry of the admin request this task serves (if any). Prefer
    /// `emit` inside the op that makes the change: this one is for changes
    /// outside the store.
    pub async fn emit_events(&self, drafts: Vec<EventDraft>) -> Result<(), StoreError> {
        self.call(|tx| Op::Emit(drafts, None, tx)).await
    }

    /// Records an audit entry for a change outside the store (admin
    /// tokens, reload): the actor, address and time come from the admin
    /// request this task serves ([`crate::events::acting_as`]); without
    /// one nothing is written. Never pass a secret in `before`/`after`.
    pub async fn record_audit(
        &self,
        action: &str,
        target: &str,
        before: Option<Value>,
        after: Option<Value>,
    ) -> Result<(), StoreError> {
        let note = Some((action.to_owned(), target.to_owned(), before, after));
        self.call(|tx| Op::Emit(Vec::new(), note, tx)).await
    }

    /// The gate saw an expired key: `key.expired`, once per expiry.
    pub fn key_expired(&self, hash: KeyHash, at_ms: i64) {
        if self.send(Op::KeyExpired(hash, at_ms)).is_err() {
            tracing::error!("key.expired not queued: the store is closed");
        }
    }

    /// Wakes when events were flushed (the delivery task waits on it).
    pub fn events_written(&self) -> &tokio::sync::Notify {
        &self.inner.counters.events_written
    }
}

/// An audit note carried by [`Op::Emit`]: (action, target, before, after).
pub(in crate::store) type AuditNote = (String, String, Option<Value>, Option<Value>);

/// What an account can spend before its overdraft: the low-balance measure.
fn charge_free(a: &crate::store::records::AccountRecord) -> Pico {
    Pico(a.balance.0.saturating_add(a.allowance.0))
}
