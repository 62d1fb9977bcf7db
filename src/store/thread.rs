//! The store thread: the one writer. It collects queued ops for up to
//! `flush_ms`, commits them as one atomic batch, flushes, then answers the
//! writes that await the flush (group commit).

use std::collections::hash_map::Entry;
use std::collections::{BTreeSet, HashMap};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::sync::mpsc::{self, Receiver, Sender};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use sled::{Batch, Db, Transactional, Tree};
use tokio::sync::oneshot;

use super::codec::*;
use super::layout::*;
use super::log::{Log, LogBatch, PruneEdit};
use super::records::*;
use super::{Counters, StoreError, abort};
use crate::clock::{DAY_MS, HOUR_MS, Period};
use crate::money::Pico;
use outbox::Outbox;

/// The outbox and audit log (events, `E`/`U`/`D` rows): `store/events.rs`.
#[path = "events.rs"]
pub(super) mod outbox;

/// Another node's change applied here (cluster mode): `store/replica.rs`.
#[path = "replica.rs"]
mod replica;

/// Most ops the store thread takes into one batch before committing. Under
/// load the per-key writes (account, usage value, rollups) are shared by
/// more records the larger this is: with 1,000 busy keys, 4,096 gave 0.75
/// sled writes per record, 16,384 about a quarter of that.
pub const MAX_BATCH_OPS: usize = 16_384;

/// Retention stops at the first batch whose oldest record is this much
/// newer than its cut-off: batches are written in settle-time order, give
/// or take a flush window, and no request lives an hour.
const PRUNE_SLACK_MS: i64 = 3_600_000;

/// Log batches retention reads and edits per log transaction.
const PRUNE_CHUNK: usize = 1024;

/// How often the usage log gets a durable commit; the batches between
/// are committed without durability and kept in sled's tail meanwhile
/// (see [`super::log`]).
const LOG_DURABLE_EVERY: Duration = Duration::from_secs(1);

/// A durable log commit comes sooner when the tail holds this much.
const TAIL_MAX_BYTES: usize = 8 << 20;

/// A reply sent once the batch it belongs to is flushed (or failed to).
pub(super) type Reply = Box<dyn FnOnce(Result<(), String>) + Send>;

pub(super) enum Op {
    /// A record and its sequence number.
    Record(Box<UsageRecord>, u64),
    BindDevice(KeyHash, String),
    Create(
        Box<KeyRecord>,
        Account,
        oneshot::Sender<Result<(), StoreError>>,
    ),
    Update(Box<KeyRecord>, oneshot::Sender<Result<(), StoreError>>),
    Delete(KeyHash, oneshot::Sender<Result<bool, StoreError>>),
    SetLimit(
        KeyHash,
        Option<Pico>,
        oneshot::Sender<Result<Account, StoreError>>,
    ),
    Credit(
        KeyHash,
        CreditOp,
        oneshot::Sender<Result<CreditOutcome, StoreError>>,
    ),
    Flush(oneshot::Sender<Result<(), StoreError>>),
    AccountCreate(Box<AccountRecord>, oneshot::Sender<Result<(), StoreError>>),
    AccountUpdate(
        String,
        AccountEdit,
        oneshot::Sender<Result<AccountRecord, StoreError>>,
    ),
    AccountDelete(String, oneshot::Sender<Result<bool, StoreError>>),
    AccountCredit(
        String,
        AccountCreditOp,
        oneshot::Sender<Result<AccountCreditOutcome, StoreError>>,
    ),
    Prune(i64, oneshot::Sender<Result<u64, StoreError>>),
    Bulk(
        Vec<(KeyRecord, Account)>,
        mpsc::SyncSender<Result<(), StoreError>>,
    ),
    /// A payment notification or order, applied once (`store::payments`).
    Payment(
        Box<super::payments::PaymentOp>,
        oneshot::Sender<Result<super::payments::PaymentOutcome, StoreError>>,
    ),
    /// A subscription change and the money it moves (`super::subscriptions`).
    SubscriptionWrite(
        Box<SubscriptionWrite>,
        oneshot::Sender<Result<SubscriptionOutcome, StoreError>>,
    ),
    /// An admin request's write: the inner op is audited under the actor.
    Noted(Box<crate::events::Actor>, Box<Op>),
    /// Events and an audit note with no change of their own.
    Emit(
        Vec<crate::events::EventDraft>,
        Option<outbox::AuditNote>,
        oneshot::Sender<Result<(), StoreError>>,
    ),
    /// The gate saw this key expired at this time.
    KeyExpired(KeyHash, i64),
    /// Webhook and email delivery state.
    Deliveries(
        outbox::DeliveryWrite,
        oneshot::Sender<Result<(), StoreError>>,
    ),
    /// Outbox retention: events before this time whose deliveries finished.
    PruneEvents(i64, oneshot::Sender<Result<u64, StoreError>>),
    /// A scoped admin token written or removed (`super::admin_tokens`).
    AdminToken(
        super::admin_tokens::AdminTokenOp,
        oneshot::Sender<Result<bool, StoreError>>,
    ),
    /// Another node's change applied here (cluster mode): its events were
    /// emitted where it was made (`super::cluster`).
    Replicated(Box<Op>),
    /// An admin change kept until the cluster's database has it
    /// (`super::unsent`); the answer is its seq.
    KeepUnsent(Vec<u8>, oneshot::Sender<Result<u64, StoreError>>),
}

/// Adds a signed amount to an account at `at_ms`, rolling its limit period
/// first. A charge dated in an earlier period than the account's (a late
/// record) counts in the lifetime `spent` only. `period_spent` never goes
/// below 0; `spent` is not clamped so that it stays Σ records + ledger.
pub(super) fn charge(acct: &mut Account, reset: Option<Period>, at_ms: i64, amount: Pico) {
    acct.spent = acct.spent.saturating_add(amount);
    let counts = match reset {
        None => {
            acct.period = 0;
            true
        }
        Some(p) => {
            if let Some(id) = crate::clock::period_roll(reset, acct.period, at_ms) {
                acct.period = id;
                acct.period_spent = Pico::ZERO;
            }
            p.id(at_ms) == acct.period
        }
    };
    if counts {
        acct.period_spent = acct.period_spent.saturating_add(amount).max(Pico::ZERO);
    }
}

/// A change to an account's profile, applied by the store thread to the
/// account as stored (so money charged meanwhile is kept).
pub(super) type AccountEdit = Box<dyn FnOnce(&mut AccountRecord) -> Result<(), StoreError> + Send>;

/// A key's part of the batch being collected.
struct KeyBatch {
    /// The account as read at the key's first record in the batch, with the
    /// batch's records applied; `None` when the key was deleted (records are
    /// still written, for reports, but no account is recreated).
    acct: Option<(Account, Option<Period>)>,
    /// Encoded records, oldest first.
    records: Vec<u8>,
    count: u64,
}

/// Records collected since the last commit.
#[derive(Default)]
pub(super) struct Pending {
    keys: HashMap<KeyHash, KeyBatch>,
    /// Rollup deltas by their `book` key (`R…` and `G…`).
    rollups: HashMap<Vec<u8>, Rollup>,
    records: u64,
    min_at: i64,
    max_at: i64,
    /// Sequence numbers of the records, to mark committed after the flush.
    seqs: Vec<u64>,
    /// Daily-fee ledger entries that came with records, written with them.
    fees: Vec<(KeyHash, LedgerEntry)>,
    /// User accounts charged by the batch's records, read once per batch;
    /// `None` when the account is gone (the record is still written).
    accounts: HashMap<std::sync::Arc<str>, Option<AccountRecord>>,
    /// Events the records raised (`key.exhausted`…), with their time:
    /// written by the batch that counts the records.
    events: Vec<(crate::events::EventDraft, i64)>,
}

/// The sequence number up to which every record is on disk. Records reach
/// the store thread nearly in order (two callers can swap between taking a
/// number and sending); the few that arrive early wait in `ahead`.
#[derive(Default)]
struct Watermark {
    upto: u64,
    ahead: BTreeSet<u64>,
}

impl Watermark {
    fn done(&mut self, seq: u64) {
        if seq != self.upto + 1 {
            self.ahead.insert(seq);
            return;
        }
        self.upto = seq;
        while self.ahead.remove(&(self.upto + 1)) {
            self.upto += 1;
        }
    }
}

/// First and longest wait before retrying a failed commit.
const RETRY_MIN: Duration = Duration::from_millis(20);
const RETRY_MAX: Duration = Duration::from_secs(2);

pub(super) struct StoreThread {
    db: Db,
    keys: Tree,
    owners: Tree,
    pub(super) book: Tree,
    /// Where the batches' usage records go, before sled counts them.
    log: Arc<Log>,
    counters: Arc<Counters>,
    next_bseq: u64,
    pending: Pending,
    /// Answers owed once this batch is flushed.
    replies: Vec<Reply>,
    /// Reused to build rollup keys without allocating per record.
    scratch: Vec<u8>,
    /// Sequence numbers of records written but not yet flushed.
    unflushed: Vec<u64>,
    /// What `committed_seq` is built from.
    mark: Watermark,
    /// Wait before the next retry after a failed commit or flush.
    backoff: Duration,
    /// Events and audit entries being written with the ops.
    outbox: Outbox,
    /// The seq of the next admin change kept for the cluster's database
    /// (`super::unsent`): rises with each, never reused in a run.
    pub(super) next_unsent: u64,
    /// Batches in sled's tail (`Z` rows), not yet durable in the log:
    /// their numbers and chunk counts.
    tail: Vec<(u64, u32)>,
    tail_bytes: usize,
    /// When the log last had a durable commit.
    log_durable_at: Instant,
}

/// Queues `result` to be answered after the flush, or the flush's error.
fn reply_after_flush<T: Send + 'static>(
    tx: oneshot::Sender<Result<T, StoreError>>,
    result: Result<T, StoreError>,
) -> Reply {
    Box::new(move |flushed| {
        let answer = result.and_then(|v| flushed.map(|()| v).map_err(StoreError::Flush));
        let _ = tx.send(answer);
    })
}

impl StoreThread {
    /// Starts the store thread over `[keys, owners, book]`; it runs until
    /// every sender of the returned channel is gone.
    pub(super) fn spawn(
        db: Db,
        log: Arc<Log>,
        [keys, owners, book]: [Tree; 3],
        counters: Arc<Counters>,
        next_bseq: u64,
        window: Duration,
        outbox: Outbox,
    ) -> std::io::Result<(Sender<Op>, JoinHandle<()>)> {
        let (tx, rx) = mpsc::channel();
        let next_unsent = super::unsent::next_unsent_seq(&book).map_err(std::io::Error::other)?;
        let thread = StoreThread {
            db,
            keys,
            owners,
            book,
            log,
            counters,
            next_bseq,
            pending: Pending::default(),
            replies: Vec::new(),
            scratch: Vec::new(),
            unflushed: Vec::new(),
            mark: Watermark::default(),
            backoff: RETRY_MIN,
            next_unsent,
            outbox,
            tail: Vec::new(),
            tail_bytes: 0,
            log_durable_at: Instant::now(),
        };
        let handle = std::thread::Builder::new()
            .name("tollgate-store".into())
            .spawn(move || thread.run(rx, window))?;
        Ok((tx, handle))
    }

    fn run(mut self, rx: Receiver<Op>, window: Duration) {
        loop {
            // After a failure, retry on a backoff even if nothing arrives:
            // the gateway refuses paid work until a commit succeeds.
            let first = if self.owes_commit() {
                match rx.recv_timeout(self.backoff) {
                    Ok(op) => Some(op),
                    Err(mpsc::RecvTimeoutError::Timeout) => None,
                    Err(mpsc::RecvTimeoutError::Disconnected) => {
                        self.finish_batch(0);
                        if self.owes_commit() {
                            tracing::error!(
                                records = self.pending.records,
                                "store closed with records not on disk"
                            );
                        }
                        break;
                    }
                }
            } else {
                match rx.recv() {
                    Ok(op) => Some(op),
                    Err(_) => break,
                }
            };
            let Some(first) = first else {
                self.finish_batch(0);
                continue;
            };
            let deadline = Instant::now() + window;
            let mut ops = 1usize;
            let mut urgent = self.handle(first);
            while ops < MAX_BATCH_OPS {
                match rx.try_recv() {
                    Ok(op) => {
                        ops += 1;
                        urgent |= self.handle(op);
                    }
                    Err(mpsc::TryRecvError::Empty) => {
                        // An admin write is waiting: commit what is already
                        // queued, so admin latency is one flush.
                        if urgent {
                            break;
                        }
                        let left = deadline.saturating_duration_since(Instant::now());
                        if left.is_zero() {
                            break;
                        }
                        // Sleep out the window instead of waiting on the
                        // channel: a wake-up per record (futex + context
                        // switch) cost the store thread more than the record
                        // itself. Awaited writes unpark the thread.
                        std::thread::park_timeout(left);
                    }
                    Err(mpsc::TryRecvError::Disconnected) => break,
                }
            }
            self.finish_batch(ops);
        }
        // Every sender is gone and everything received is flushed; make
        // the log durable so that the next open has no tail to restore.
        if let Err(e) = self.settle_tail() {
            tracing::warn!(error = %e, "usage log tail kept for the next open");
        }
    }

    /// Makes the log durable and empties sled's tail.
    fn settle_tail(&mut self) -> Result<(), StoreError> {
        if self.tail.is_empty() {
            return Ok(());
        }
        self.log.make_durable()?;
        let mut batch = Batch::default();
        for (bseq, chunks) in &self.tail {
            for c in 0..*chunks {
                batch.remove(tail_key(*bseq, c).as_slice());
            }
        }
        self.book.apply_batch(batch)?;
        self.db.flush()?;
        self.tail.clear();
        self.tail_bytes = 0;
        self.log_durable_at = Instant::now();
        Ok(())
    }

    /// Takes one op into the batch; `true` if someone awaits its flush.
    fn handle(&mut self, op: Op) -> bool {
        let op = match op {
            Op::Replicated(inner) => return self.handle_replicated(*inner),
            op => op,
        };
        if let Op::Noted(actor, inner) = op {
            self.outbox.actor = Some(*actor);
            let urgent = self.handle(*inner);
            self.outbox.actor = None;
            return urgent;
        }
        let urgent = self.handle_op(op);
        // What a refused or failed op queued for the outbox goes with it.
        self.outbox.discard_unstaged();
        urgent
    }

    fn handle_op(&mut self, op: Op) -> bool {
        if !matches!(op, Op::Record(..)) {
            // A record leaves the queue depth only once it is on disk.
            self.counters.queue_depth.fetch_sub(1, Ordering::Relaxed);
        }
        match op {
            Op::Record(rec, seq) => {
                self.add_record(&rec);
                self.pending.seqs.push(seq);
                false
            }
            Op::BindDevice(hash, device) => {
                if let Err(e) = self.bind_device(&hash, device) {
                    tracing::error!(error = %e, "device binding failed");
                    self.counters.write_errors.fetch_add(1, Ordering::Relaxed);
                }
                false
            }
            // Every admin write first commits the records collected so far:
            // they hold copies of accounts the admin write may change.
            Op::Create(rec, acct, tx) => {
                let r = self
                    .commit_pending()
                    .and_then(|()| self.create(&rec, &acct));
                self.replies.push(reply_after_flush(tx, r));
                true
            }
            Op::Update(rec, tx) => {
                let r = self.commit_pending().and_then(|()| self.update(&rec));
                self.replies.push(reply_after_flush(tx, r));
                true
            }
            Op::Delete(hash, tx) => {
                let r = self.commit_pending().and_then(|()| self.delete(&hash));
                self.replies.push(reply_after_flush(tx, r));
                true
            }
            Op::SetLimit(hash, limit, tx) => {
                let r = self
                    .commit_pending()
                    .and_then(|()| self.set_limit(&hash, limit));
                self.replies.push(reply_after_flush(tx, r));
                true
            }
            Op::Credit(hash, op, tx) => {
                let r = self.commit_pending().and_then(|()| self.credit(&hash, &op));
                self.replies.push(reply_after_flush(tx, r));
                true
            }
            Op::Flush(tx) => {
                self.replies.push(reply_after_flush(tx, Ok(())));
                true
            }
            Op::AccountCreate(a, tx) => {
                let r = self.commit_pending().and_then(|()| self.account_create(&a));
                self.replies.push(reply_after_flush(tx, r));
                true
            }
            Op::AccountUpdate(id, edit, tx) => {
                let r = self
                    .commit_pending()
                    .and_then(|()| self.account_update(&id, edit));
                self.replies.push(reply_after_flush(tx, r));
                true
            }
            Op::AccountDelete(id, tx) => {
                let r = self
                    .commit_pending()
                    .and_then(|()| self.account_delete(&id));
                self.replies.push(reply_after_flush(tx, r));
                true
            }
            Op::AccountCredit(id, op, tx) => {
                let r = self
                    .commit_pending()
                    .and_then(|()| self.account_credit(&id, &op));
                self.replies.push(reply_after_flush(tx, r));
                true
            }
            Op::Prune(before, tx) => {
                let r = self.commit_pending().and_then(|()| self.prune(before));
                self.replies.push(reply_after_flush(tx, r));
                true
            }
            Op::Bulk(items, tx) => {
                let r = self.commit_pending().and_then(|()| self.bulk(items));
                self.replies.push(Box::new(move |flushed| {
                    let _ = tx.send(r.and_then(|()| flushed.map_err(StoreError::Flush)));
                }));
                true
            }
            Op::Payment(op, tx) => {
                let r = self.commit_pending().and_then(|()| self.payment(*op));
                self.replies.push(reply_after_flush(tx, r));
                true
            }
            Op::SubscriptionWrite(w, tx) => {
                let r = self
                    .commit_pending()
                    .and_then(|()| self.subscription_write(&w));
                self.replies.push(reply_after_flush(tx, r));
                true
            }
            Op::Noted(_, inner) => self.handle(*inner),
            Op::Replicated(inner) => self.handle_replicated(*inner),
            op @ (Op::Emit(..) | Op::KeyExpired(..) | Op::Deliveries(..) | Op::PruneEvents(..)) => {
                self.handle_outbox_op(op)
            }
            Op::AdminToken(op, tx) => {
                let r = self.commit_pending().and_then(|()| self.admin_token(op));
                self.replies.push(reply_after_flush(tx, r));
                true
            }
            Op::KeepUnsent(change, tx) => {
                let r = self
                    .commit_pending()
                    .and_then(|()| self.keep_unsent(&change));
                self.replies.push(reply_after_flush(tx, r));
                true
            }
        }
    }

    /// In cluster mode, marks the ledger entry stored at `key` for shipping
    /// ([`super::unshipped`]), in the entry's own batch. Returns the writes.
    pub(super) fn mark_unshipped(&self, batch: &mut Batch, key: &[u8], at_ms: i64) -> usize {
        if !self.counters.clustered.load(Ordering::Acquire) {
            return 0;
        }
        batch.insert(unshipped_mark(key), &at_ms.to_be_bytes());
        1
    }

    pub(super) fn write_count(&self, n: usize) {
        self.counters
            .sled_writes
            .fetch_add(n as u64, Ordering::Relaxed);
    }

    /// Folds one record into the batch: account deltas, the key's record
    /// buffer, and the rollup deltas. Reads the account once per key per
    /// batch; writes nothing.
    fn add_record(&mut self, rec: &UsageRecord) {
        let p = &mut self.pending;
        if p.records == 0 {
            p.min_at = rec.at_ms;
            p.max_at = rec.at_ms;
        } else {
            p.min_at = p.min_at.min(rec.at_ms);
            p.max_at = p.max_at.max(rec.at_ms);
        }
        p.records += 1;
        let kb = match p.keys.entry(rec.key) {
            Entry::Occupied(e) => e.into_mut(),
            Entry::Vacant(e) => {
                let acct = match self.book.get(account_key(&rec.key)) {
                    Ok(Some(v)) => match decode_account(&v) {
                        Ok(a) => Some(a),
                        Err(err) => {
                            // Leave the damaged account alone; the record is kept.
                            tracing::error!(error = %err, key = %hex::encode(rec.key), "unreadable account");
                            None
                        }
                    },
                    Ok(None) => None,
                    Err(err) => {
                        tracing::error!(error = %err, "account read failed");
                        None
                    }
                };
                e.insert(KeyBatch {
                    acct,
                    records: Vec::with_capacity(128),
                    count: 0,
                })
            }
        };
        let wallet = match &rec.account {
            Some(id) => match p.accounts.entry(id.clone()) {
                Entry::Occupied(e) => e.into_mut().as_mut(),
                Entry::Vacant(e) => {
                    let read = match self.book.get(user_account_key(id)) {
                        Ok(Some(v)) => decode_user_account(&v)
                            .map_err(|err| tracing::error!(error = %err, account = %id, "unreadable account"))
                            .ok(),
                        Ok(None) => None,
                        Err(err) => {
                            tracing::error!(error = %err, "account read failed");
                            None
                        }
                    };
                    e.insert(read).as_mut()
                }
            },
            None => None,
        };
        let funds = |w: &AccountRecord| Pico(w.balance.0.saturating_add(w.allowance.0));
        let wallet_before = wallet.as_ref().map(|w| funds(w));
        if let Some(w) = wallet {
            w.charge(rec.at_ms, rec.cost);
        }
        let key_before = kb.acct.as_ref().map(|(a, _)| *a);
        if let Some((acct, reset)) = &mut kb.acct {
            charge(acct, *reset, rec.at_ms, rec.cost);
            acct.requests = acct.requests.saturating_add(1);
            // The fee the gate charged with this request, once per UTC day:
            // `fee_day` in the same atomic batch makes it idempotent.
            let day = rec.at_ms.div_euclid(DAY_MS);
            if rec.daily_fee.0 > 0 && acct.fee_day < day {
                charge(acct, *reset, rec.at_ms, rec.daily_fee);
                if let Some(id) = &rec.account
                    && let Some(Some(w)) = p.accounts.get_mut(id)
                {
                    w.charge(rec.at_ms, rec.daily_fee);
                }
                acct.fee_day = day;
                acct.ledger_seq += 1;
                p.fees.push((
                    rec.key,
                    LedgerEntry {
                        seq: acct.ledger_seq,
                        at_ms: rec.at_ms,
                        kind: LedgerKind::DailyFee,
                        amount: rec.daily_fee,
                        reason: "daily fee".into(),
                        idempotency_key: None,
                        limit_after: acct.limit,
                        spent_after: acct.spent,
                    },
                ));
            }
        }
        put_usage(&mut kb.records, rec);
        kb.count += 1;
        let key_change = key_before.zip(kb.acct.as_ref().map(|(a, _)| *a));
        let wallet_after = match &rec.account {
            Some(id) => p.accounts.get(id).and_then(|a| a.as_ref()).map(funds),
            None => None,
        };
        let wallet_change = wallet_before.zip(wallet_after);

        let hour = rec.at_ms.div_euclid(HOUR_MS);
        let delta = Rollup {
            requests: 1,
            prompt_tokens: rec.prompt_tokens,
            cached_tokens: rec.cached_tokens,
            completion_tokens: rec.completion_tokens,
            reasoning_tokens: rec.reasoning_tokens,
            cost: rec.cost,
            latency_ms_sum: u64::from(rec.latency_ms),
            errors: u64::from(rec.status >= 400),
            estimated: u64::from(rec.estimated),
            cache_write_tokens: rec.cache_write_tokens,
        };
        let k = &mut self.scratch;
        k.clear();
        k.push(b'R');
        k.extend_from_slice(&rec.key);
        k.extend_from_slice(&ord_i64(hour));
        k.extend_from_slice(rec.model.as_bytes());
        add_pending_rollup(&mut p.rollups, k, &delta);
        k.clear();
        k.push(b'G');
        k.extend_from_slice(&ord_i64(hour));
        k.extend_from_slice(rec.model.as_bytes());
        add_pending_rollup(&mut p.rollups, k, &delta);
        self.watch_record(rec, key_change, wallet_change);
    }

    /// Fails while the test fault switch is on, as a full disk would.
    fn writable(&self) -> Result<(), StoreError> {
        if self.counters.fault.load(Ordering::Relaxed) {
            return Err(StoreError::Io(std::io::Error::other(
                "injected write fault",
            )));
        }
        Ok(())
    }

    /// Writes the collected records as one atomic batch (not flushed). On
    /// failure nothing is written and the batch stays pending, to be
    /// retried whole: the accounts it holds are still right.
    fn commit_pending(&mut self) -> Result<(), StoreError> {
        self.writable()?;
        if self.pending.records == 0 {
            return Ok(());
        }
        let result = self.write_pending();
        match result {
            Ok(()) => {
                let p = std::mem::take(&mut self.pending);
                self.next_bseq += 1;
                self.counters
                    .records_written
                    .fetch_add(p.records, Ordering::Relaxed);
                self.unflushed.extend(p.seqs);
                Ok(())
            }
            Err(e) => {
                self.counters.write_errors.fetch_add(1, Ordering::Relaxed);
                tracing::error!(error = %e, records = self.pending.records, "usage batch not written; kept for retry");
                Err(e)
            }
        }
    }

    /// Writes the batch's records to the log (durable), then builds and
    /// applies the sled batch that counts them, leaving `pending` as it is.
    /// A crash between the two leaves a log batch at `next_bseq`, which
    /// the next open removes.
    fn write_pending(&mut self) -> Result<(), StoreError> {
        let p = &self.pending;
        let bseq = self.next_bseq;
        let mut index = BatchIndex {
            min_at: p.min_at,
            max_at: p.max_at,
            keys: Vec::with_capacity(p.keys.len()),
        };
        let values: Vec<(KeyHash, Vec<u8>)> = p
            .keys
            .iter()
            .map(|(hash, kb)| {
                index.keys.push((*hash, kb.count));
                (*hash, finish_usage_batch(kb.count, &kb.records))
            })
            .collect();
        let index = encode_batch_index(&index);
        let durable =
            self.log_durable_at.elapsed() >= LOG_DURABLE_EVERY || self.tail_bytes >= TAIL_MAX_BYTES;
        self.log.write(
            &LogBatch {
                bseq,
                values: values.iter().map(|(h, v)| (h, v.as_slice())).collect(),
                index: &index,
            },
            durable,
        )?;
        let mut batch = Batch::default();
        let mut writes = 0usize;
        // Durable: every earlier batch is durable in the log now, and the
        // tail goes. Not: this batch joins the tail, counted and kept in
        // one sled batch.
        let mut tail_add = None;
        if durable {
            for (b, chunks) in &self.tail {
                for c in 0..*chunks {
                    batch.remove(tail_key(*b, c).as_slice());
                }
            }
        } else {
            let enc = encode_tail(values.iter().map(|(h, v)| (h, v.as_slice())), &index);
            let mut chunks = 0u32;
            for (c, chunk) in enc.chunks(TAIL_CHUNK).enumerate() {
                batch.insert(tail_key(bseq, c as u32).as_slice(), chunk);
                chunks += 1;
            }
            writes += chunks as usize;
            tail_add = Some((bseq, chunks, enc.len()));
        }
        drop(values);
        for (hash, kb) in &p.keys {
            if let Some((acct, reset)) = &kb.acct {
                batch.insert(account_key(hash), encode_account(acct, *reset));
                writes += 1;
            }
        }
        for (id, acct) in &p.accounts {
            if let Some(a) = acct {
                batch.insert(user_account_key(id), encode_user_account(a));
                writes += 1;
            }
        }
        for (hash, entry) in &p.fees {
            let key = ledger_key(hash, entry.seq);
            writes += self.mark_unshipped(&mut batch, &key, entry.at_ms);
            batch.insert(key, encode_ledger(entry));
            writes += 1;
        }
        for (key, delta) in &p.rollups {
            let mut sum = match self.book.get(key)? {
                Some(v) => decode_rollup(&v)?,
                None => Rollup::default(),
            };
            add_rollup(&mut sum, delta);
            batch.insert(key.as_slice(), encode_rollup(&sum));
            writes += 1;
        }
        batch.insert(NEXT_BSEQ_KEY, &(bseq + 1).to_be_bytes());
        writes += 1;
        let staged = self.stage_pending_events();
        staged.add_to(&mut batch);
        let result = self.book.apply_batch(batch);
        self.write_count(writes);
        result?;
        match tail_add {
            Some((b, chunks, bytes)) => {
                self.tail.push((b, chunks));
                self.tail_bytes += bytes;
            }
            None => {
                self.tail.clear();
                self.tail_bytes = 0;
                self.log_durable_at = Instant::now();
            }
        }
        self.outbox_written(staged);
        Ok(())
    }

    /// Commits, flushes, then answers the writes that awaited the flush.
    /// Records become committed (`committed_seq`, `queue_depth`) only here,
    /// after a flush that followed their write.
    fn finish_batch(&mut self, ops: usize) {
        let committed = self.commit_pending();
        let started = Instant::now();
        let flushed = self
            .writable()
            .and_then(|()| self.db.flush().map(|_| ()).map_err(StoreError::from))
            .map_err(|e| e.to_string());
        let c = &self.counters;
        c.flush_us_sum
            .fetch_add(started.elapsed().as_micros() as u64, Ordering::Relaxed);
        c.flush_count.fetch_add(1, Ordering::Relaxed);
        c.batches.fetch_add(1, Ordering::Relaxed);
        c.last_batch_size.store(ops as u64, Ordering::Relaxed);
        if let Some(ns) = thread_cpu_ns() {
            c.thread_cpu_ns.store(ns, Ordering::Relaxed);
        }
        match &flushed {
            Ok(()) => {
                let durable = self.unflushed.len() as u64;
                for seq in self.unflushed.drain(..) {
                    self.mark.done(seq);
                }
                c.queue_depth.fetch_sub(durable, Ordering::Relaxed);
                c.committed_seq.store(self.mark.upto, Ordering::Release);
                if self.outbox.take_unannounced() {
                    c.events_written.notify_one();
                }
            }
            Err(e) => {
                tracing::error!(error = %e, "store flush failed; retrying");
                c.write_errors.fetch_add(1, Ordering::Relaxed);
            }
        }
        let ok = committed.is_ok() && flushed.is_ok();
        c.failing.store(!ok, Ordering::Relaxed);
        self.backoff = if ok {
            RETRY_MIN
        } else {
            (self.backoff * 2).min(RETRY_MAX)
        };
        for reply in self.replies.drain(..) {
            reply(flushed.clone());
        }
    }

    /// Something written is not yet on disk, or the last attempt failed.
    fn owes_commit(&self) -> bool {
        self.pending.records > 0
            || !self.unflushed.is_empty()
            || self.counters.failing.load(Ordering::Relaxed)
    }

    fn bind_device(&mut self, hash: &KeyHash, device: String) -> Result<(), StoreError> {
        let k = key_record_key(hash);
        let Some(v) = self.keys.get(&k)? else {
            return Ok(());
        };
        let mut rec = decode_key(hash, &v)?;
        if rec.devices.contains(&device) {
            return Ok(());
        }
        rec.devices.push(device);
        self.keys.insert(k, encode_key(&rec))?;
        self.write_count(1);
        Ok(())
    }

    fn create(&mut self, rec: &KeyRecord, acct: &Account) -> Result<(), StoreError> {
        let hash = rec.hash;
        let record = encode_key(rec);
        let account = encode_account(acct, rec.limit_reset);
        let owner = owner_entry(rec);
        self.note_key_created(rec, acct);
        let staged = self.stage_outbox();
        (&self.keys, &self.owners, &self.book).transaction(|(keys, owners, book)| {
            if keys.get(key_record_key(&hash))?.is_some() {
                return abort(StoreError::Exists);
            }
            staged.add_to_tx(book)?;
            let count = match read_key_count(&keys.get([b'n'])?) {
                Ok(n) => n,
                Err(e) => return abort(e),
            };
            keys.insert(key_record_key(&hash), record.as_slice())?;
            keys.insert(created_key(rec.created_at, &hash), &[][..])?;
            keys.insert(&[b'n'][..], &(count + 1).to_le_bytes()[..])?;
            if let Some(o) = &owner {
                owners.insert(o.as_slice(), &[u8::from(rec.disabled)][..])?;
            }
            book.insert(account_key(&hash), account.as_slice())?;
            Ok(())
        })?;
        self.write_count(4 + usize::from(owner.is_some()));
        self.outbox_written(staged);
        self.counters.keys.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }

    fn update(&mut self, rec: &KeyRecord) -> Result<(), StoreError> {
        let hash = rec.hash;
        let record = encode_key(rec);
        let new_owner = owner_entry(rec);
        let staged = self.note_key_updated(rec);
        (&self.keys, &self.owners, &self.book).transaction(|(keys, owners, book)| {
            let Some(old) = keys.get(key_record_key(&hash))? else {
                return abort(StoreError::NotFound);
            };
            staged.add_to_tx(book)?;
            let old = match decode_key(&hash, &old) {
                Ok(o) => o,
                Err(e) => return abort(e),
            };
            keys.insert(key_record_key(&hash), record.as_slice())?;
            if old.created_at != rec.created_at {
                keys.remove(created_key(old.created_at, &hash))?;
                keys.insert(created_key(rec.created_at, &hash), &[][..])?;
            }
            if let Some(o) = owner_entry(&old) {
                owners.remove(o)?;
            }
            if let Some(o) = &new_owner {
                owners.insert(o.as_slice(), &[u8::from(rec.disabled)][..])?;
            }
            if old.limit_reset != rec.limit_reset {
                let Some(v) = book.get(account_key(&hash))? else {
                    return abort(StoreError::Corrupt("key without account".into()));
                };
                let (mut acct, _) = match decode_account(&v) {
                    Ok(a) => a,
                    Err(e) => return abort(e),
                };
                // The same rule as the gate's live key (`ResetChange`).
                acct.change_reset(old.limit_reset, rec.limit_reset, rec.updated_at);
                book.insert(account_key(&hash), encode_account(&acct, rec.limit_reset))?;
            }
            Ok(())
        })?;
        self.write_count(4);
        self.outbox_written(staged);
        Ok(())
    }

    fn delete(&mut self, hash: &KeyHash) -> Result<bool, StoreError> {
        let staged = self.note_key_deleted(hash);
        let existed =
            (&self.keys, &self.owners, &self.book).transaction(|(keys, owners, book)| {
                let Some(old) = keys.remove(key_record_key(hash))? else {
                    return Ok(false);
                };
                staged.add_to_tx(book)?;
                let old = match decode_key(hash, &old) {
                    Ok(o) => o,
                    Err(e) => return abort(e),
                };
                let count = match read_key_count(&keys.get([b'n'])?) {
                    Ok(n) => n,
                    Err(e) => return abort(e),
                };
                keys.remove(created_key(old.created_at, hash))?;
                keys.insert(&[b'n'][..], &count.saturating_sub(1).to_le_bytes()[..])?;
                if let Some(o) = owner_entry(&old) {
                    owners.remove(o)?;
                }
                book.remove(account_key(hash))?;
                Ok(true)
            })?;
        if existed {
            self.write_count(5);
            self.outbox_written(staged);
            self.counters.keys.fetch_sub(1, Ordering::Relaxed);
        }
        Ok(existed)
    }

    pub(super) fn read_account(
        &self,
        hash: &KeyHash,
    ) -> Result<(Account, Option<Period>), StoreError> {
        match self.book.get(account_key(hash))? {
            Some(v) => decode_account(&v),
            None => Err(StoreError::NotFound),
        }
    }

    fn set_limit(&mut self, hash: &KeyHash, limit: Option<Pico>) -> Result<Account, StoreError> {
        let (mut acct, reset) = self.read_account(hash)?;
        let before = acct;
        acct.limit = limit;
        self.note_limit(hash, &before, &acct);
        let staged = self.stage_outbox();
        let mut batch = Batch::default();
        batch.insert(account_key(hash), encode_account(&acct, reset));
        staged.add_to(&mut batch);
        self.book.apply_batch(batch)?;
        self.write_count(1);
        self.outbox_written(staged);
        Ok(acct)
    }

    /// The account, the ledger entry and the idempotency entry go in one
    /// atomic batch of `book`.
    fn credit(&mut self, hash: &KeyHash, op: &CreditOp) -> Result<CreditOutcome, StoreError> {
        let mut batch = Batch::default();
        let (out, writes) = self.credit_into(hash, op, &mut batch)?;
        if writes > 0 {
            let staged = self.stage_outbox();
            staged.add_to(&mut batch);
            self.book.apply_batch(batch)?;
            self.write_count(writes);
            self.outbox_written(staged);
        }
        Ok(out)
    }

    /// [`Self::credit`]'s writes added to `batch` (none when replayed), and
    /// how many: a payment commits them with its own record.
    pub(super) fn credit_into(
        &mut self,
        hash: &KeyHash,
        op: &CreditOp,
        batch: &mut Batch,
    ) -> Result<(CreditOutcome, usize), StoreError> {
        let (mut acct, reset) = self.read_account(hash)?;
        if let Some(idem) = &op.idempotency_key
            && let Some(seq) = self.book.get(idempotency_key(hash, idem))?
        {
            let seq = <[u8; 8]>::try_from(seq.as_ref())
                .map(u64::from_be_bytes)
                .map_err(|_| StoreError::Corrupt("idempotency entry".into()))?;
            let entry = self
                .book
                .get(ledger_key(hash, seq))?
                .ok_or_else(|| StoreError::Corrupt("idempotency entry without ledger".into()))?;
            return Ok((
                CreditOutcome {
                    entry: decode_ledger(&entry)?,
                    account: acct,
                    replayed: true,
                },
                0,
            ));
        }
        let before = acct;
        match op.kind {
            LedgerKind::Topup => {
                if let Some(l) = acct.limit {
                    acct.limit = Some(l.checked_add(op.amount).ok_or_else(|| {
                        StoreError::Invalid("limit would exceed the largest amount".into())
                    })?);
                }
            }
            LedgerKind::Deduct => charge(&mut acct, reset, op.at_ms, op.amount),
            LedgerKind::DailyFee => {
                charge(&mut acct, reset, op.at_ms, op.amount);
                acct.fee_day = acct.fee_day.max(op.at_ms.div_euclid(DAY_MS));
            }
            LedgerKind::Refund => charge(&mut acct, reset, op.at_ms, Pico(-op.amount.0)),
        }
        acct.ledger_seq += 1;
        let entry = LedgerEntry {
            seq: acct.ledger_seq,
            at_ms: op.at_ms,
            kind: op.kind,
            amount: op.amount,
            reason: op.reason.clone(),
            idempotency_key: op.idempotency_key.clone(),
            limit_after: acct.limit,
            spent_after: acct.spent,
        };
        self.note_key_credit(hash, &before, &acct, &entry);
        batch.insert(account_key(hash), encode_account(&acct, reset));
        let key = ledger_key(hash, entry.seq);
        let mut writes = 2 + self.mark_unshipped(batch, &key, entry.at_ms);
        batch.insert(key, encode_ledger(&entry));
        if let Some(idem) = &op.idempotency_key {
            batch.insert(idempotency_key(hash, idem), &entry.seq.to_be_bytes());
            writes += 1;
        }
        Ok((
            CreditOutcome {
                entry,
                account: acct,
                replayed: false,
            },
            writes,
        ))
    }

    pub(super) fn read_user_account(&self, id: &str) -> Result<AccountRecord, StoreError> {
        match self.book.get(user_account_key(id))? {
            Some(v) => decode_user_account(&v),
            None => Err(StoreError::NotFound),
        }
    }

    fn account_create(&mut self, a: &AccountRecord) -> Result<(), StoreError> {
        let k = user_account_key(&a.id);
        if self.book.contains_key(&k)? {
            return Err(StoreError::Exists);
        }
        self.note_account_write("account.create", &a.id, None, Some(a));
        let staged = self.stage_outbox();
        let mut batch = Batch::default();
        batch.insert(k, encode_user_account(a));
        staged.add_to(&mut batch);
        self.book.apply_batch(batch)?;
        self.write_count(1);
        self.outbox_written(staged);
        Ok(())
    }

    fn account_update(&mut self, id: &str, edit: AccountEdit) -> Result<AccountRecord, StoreError> {
        let mut a = self.read_user_account(id)?;
        let before = a.clone();
        edit(&mut a)?;
        self.note_account_write("account.update", id, Some(&before), Some(&a));
        let staged = self.stage_outbox();
        let mut batch = Batch::default();
        batch.insert(user_account_key(id), encode_user_account(&a));
        staged.add_to(&mut batch);
        self.book.apply_batch(batch)?;
        self.write_count(1);
        self.outbox_written(staged);
        Ok(a)
    }

    /// Removes the account record; its ledger stays for reports.
    fn account_delete(&mut self, id: &str) -> Result<bool, StoreError> {
        let before = match self.read_user_account(id) {
            Ok(a) => a,
            Err(StoreError::NotFound) => return Ok(false),
            Err(e) => return Err(e),
        };
        self.note_account_write("account.delete", id, Some(&before), None);
        let staged = self.stage_outbox();
        let mut batch = Batch::default();
        batch.remove(user_account_key(id));
        staged.add_to(&mut batch);
        self.book.apply_batch(batch)?;
        self.write_count(1);
        self.outbox_written(staged);
        Ok(true)
    }

    /// The account, its ledger entry and the idempotency entry in one
    /// atomic batch of `book`. A deduct (or negative adjust) that does not
    /// fit in allowance + balance + overdraft changes nothing.
    fn account_credit(
        &mut self,
        id: &str,
        op: &AccountCreditOp,
    ) -> Result<AccountCreditOutcome, StoreError> {
        let mut batch = Batch::default();
        let (out, writes) = self.account_credit_into(id, op, &mut batch)?;
        if writes > 0 {
            let staged = self.stage_outbox();
            staged.add_to(&mut batch);
            self.book.apply_batch(batch)?;
            self.write_count(writes);
            self.outbox_written(staged);
        }
        Ok(out)
    }

    /// [`Self::account_credit`]'s writes added to `batch` (none when
    /// replayed), and how many: a payment commits them with its own record.
    pub(super) fn account_credit_into(
        &mut self,
        id: &str,
        op: &AccountCreditOp,
        batch: &mut Batch,
    ) -> Result<(AccountCreditOutcome, usize), StoreError> {
        let mut a = self.read_user_account(id)?;
        if let Some(idem) = &op.idempotency_key
            && let Some(seq) = self.book.get(account_idempotency_key(id, idem))?
        {
            let seq = <[u8; 8]>::try_from(seq.as_ref())
                .map(u64::from_be_bytes)
                .map_err(|_| StoreError::Corrupt("idempotency entry".into()))?;
            let entry = self
                .book
                .get(account_ledger_key(id, seq))?
                .ok_or_else(|| StoreError::Corrupt("idempotency entry without ledger".into()))?;
            return Ok((
                AccountCreditOutcome {
                    entry: decode_account_entry(&entry)?,
                    account: a,
                    replayed: true,
                },
                0,
            ));
        }
        let before = a.clone();
        let too_big = || StoreError::Invalid("amount out of range".into());
        // In cluster mode the lease held for it is the check (this store's
        // balance is only this node's part of the money).
        let checked = !a.unlimited && !self.counters.clustered.load(Ordering::Acquire);
        match op.kind {
            AccountCreditKind::Topup => {
                a.balance = a.balance.checked_add(op.amount).ok_or_else(too_big)?;
            }
            AccountCreditKind::Adjust => {
                if op.amount.0 < 0 && checked && a.funds().0 < -op.amount.0 {
                    return Err(StoreError::Insufficient);
                }
                a.balance = a.balance.checked_add(op.amount).ok_or_else(too_big)?;
            }
            AccountCreditKind::Deduct => {
                if checked && a.funds() < op.amount {
                    return Err(StoreError::Insufficient);
                }
                a.charge(op.at_ms, op.amount);
            }
            AccountCreditKind::Refund => {
                a.balance = a.balance.checked_add(op.amount).ok_or_else(too_big)?;
                a.spent = Pico(a.spent.0 - op.amount.0);
                a.period_spent = Pico((a.period_spent.0 - op.amount.0).max(0));
            }
            AccountCreditKind::Reversal => {
                a.balance = a.balance.checked_sub(op.amount).ok_or_else(too_big)?;
            }
            AccountCreditKind::Grant | AccountCreditKind::Lapse => {
                return Err(StoreError::Invalid(
                    "grants and lapses come from subscriptions only".into(),
                ));
            }
        }
        a.ledger_seq += 1;
        let entry = AccountLedgerEntry {
            seq: a.ledger_seq,
            at_ms: op.at_ms,
            kind: op.kind,
            amount: op.amount,
            reason: op.reason.clone(),
            idempotency_key: op.idempotency_key.clone(),
            balance_after: a.balance,
            spent_after: a.spent,
            allowance_after: a.allowance,
        };
        self.note_account_credit(&before, &a, &entry);
        batch.insert(user_account_key(id), encode_user_account(&a));
        let key = account_ledger_key(id, entry.seq);
        let mut writes = 2 + self.mark_unshipped(batch, &key, entry.at_ms);
        batch.insert(key, encode_account_entry(&entry));
        if let Some(idem) = &op.idempotency_key {
            batch.insert(account_idempotency_key(id, idem), &entry.seq.to_be_bytes());
            writes += 1;
        }
        Ok((
            AccountCreditOutcome {
                entry,
                account: a,
                replayed: false,
            },
            writes,
        ))
    }

    /// Inserts keys that do not exist yet. Accounts and index entries are
    /// written before the records, so a crash midway leaves at worst
    /// invisible orphans that a re-import overwrites.
    fn bulk(&mut self, items: Vec<(KeyRecord, Account)>) -> Result<(), StoreError> {
        let mut keys = Batch::default();
        let mut owners = Batch::default();
        let mut book = Batch::default();
        let mut added = 0u64;
        let mut writes = 0usize;
        let mut seen = std::collections::HashSet::new();
        let mut created = Vec::new();
        for (rec, acct) in &items {
            if !seen.insert(rec.hash) || self.keys.contains_key(key_record_key(&rec.hash))? {
                continue;
            }
            created.push((rec.clone(), *acct));
            book.insert(
                account_key(&rec.hash),
                encode_account(acct, rec.limit_reset),
            );
            if let Some(o) = owner_entry(rec) {
                owners.insert(o, &[u8::from(rec.disabled)]);
                writes += 1;
            }
            keys.insert(key_record_key(&rec.hash), encode_key(rec));
            keys.insert(created_key(rec.created_at, &rec.hash), &[]);
            writes += 3;
            added += 1;
        }
        if added == 0 {
            return Ok(());
        }
        let count = read_key_count(&self.keys.get([b'n'])?)?;
        keys.insert(b"n", &(count + added).to_le_bytes());
        self.note_import(&created);
        let staged = self.stage_outbox();
        staged.add_to(&mut book);
        self.book.apply_batch(book)?;
        self.outbox_written(staged);
        self.owners.apply_batch(owners)?;
        self.keys.apply_batch(keys)?;
        self.write_count(writes + 1);
        self.counters
            .keys
            .fetch_add(added as i64, Ordering::Relaxed);
        Ok(())
    }

    /// Removes usage older than `before_ms`, batch by batch through the
    /// log's batch index, in chunks; each chunk removes its records and
    /// raises the keys' pruned counts in one log transaction.
    fn prune(&mut self, before_ms: i64) -> Result<u64, StoreError> {
        // What is pruned must already be counted on disk: a batch sled
        // lost in a crash is removed from the log at open, and its records
        // must not have raised a pruned count. And no tail may be left to
        // restore over what retention removes.
        self.settle_tail()?;
        self.db.flush()?;
        let stop_after = before_ms.saturating_add(PRUNE_SLACK_MS);
        let mut removed = 0u64;
        let mut from = 0u64;
        loop {
            let chunk = self.log.batches(from, PRUNE_CHUNK)?;
            let Some(&(last, _)) = chunk.last() else {
                break;
            };
            let full = chunk.len() == PRUNE_CHUNK;
            from = last.saturating_add(1);
            let mut edits = Vec::new();
            let mut pruned: HashMap<KeyHash, u64> = HashMap::new();
            let mut done = false;
            for (bseq, idx) in chunk {
                // Batches come in time order, give or take a flush window
                // and a request's length: past the slack nothing older is left.
                if idx.min_at >= stop_after {
                    done = true;
                    break;
                }
                if idx.min_at >= before_ms {
                    continue;
                }
                if idx.max_at < before_ms {
                    for (hash, n) in &idx.keys {
                        removed += n;
                        *pruned.entry(*hash).or_default() += n;
                    }
                    edits.push(PruneEdit::Drop {
                        bseq,
                        keys: idx.keys.iter().map(|(h, _)| *h).collect(),
                    });
                    continue;
                }
                // A batch straddling the cut: keep its newer records.
                let mut kept_keys = Vec::new();
                let mut replace = Vec::new();
                let mut remove = Vec::new();
                let mut min_at = i64::MAX;
                for (hash, _) in &idx.keys {
                    let Some(val) = self.log.value(hash, bseq)? else {
                        continue;
                    };
                    let recs = decode_usage_batch(&val, hash)?;
                    let total = recs.len() as u64;
                    let mut buf = Vec::new();
                    let mut kept = 0u64;
                    for r in recs.iter().filter(|r| r.at_ms >= before_ms) {
                        put_usage(&mut buf, r);
                        kept += 1;
                        min_at = min_at.min(r.at_ms);
                    }
                    removed += total - kept;
                    if total > kept {
                        *pruned.entry(*hash).or_default() += total - kept;
                    }
                    if kept == 0 {
                        remove.push(*hash);
                    } else if kept < total {
                        replace.push((*hash, finish_usage_batch(kept, &buf)));
                        kept_keys.push((*hash, kept));
                    } else {
                        kept_keys.push((*hash, kept));
                    }
                }
                let index = (!kept_keys.is_empty()).then(|| {
                    encode_batch_index(&BatchIndex {
                        min_at,
                        keys: kept_keys,
                        ..idx
                    })
                });
                edits.push(PruneEdit::Rewrite {
                    bseq,
                    replace,
                    remove,
                    index,
                });
            }
            if !edits.is_empty() {
                let counts: Vec<(KeyHash, u64)> = pruned.into_iter().collect();
                self.log.prune(&edits, &counts)?;
                self.write_count(edits.len() + counts.len());
            }
            if done || !full {
                break;
            }
        }
        Ok(removed)
    }
}

fn add_pending_rollup(map: &mut HashMap<Vec<u8>, Rollup>, key: &[u8], delta: &Rollup) {
    match map.get_mut(key) {
        Some(r) => add_rollup(r, delta),
        None => {
            map.insert(key.to_vec(), *delta);
        }
    }
}

/// CPU time of the calling thread in ns: the first field of
/// `/proc/thread-self/schedstat` (Linux). One small read per batch.
pub(super) fn thread_cpu_ns() -> Option<u64> {
    let s = std::fs::read_to_string("/proc/thread-self/schedstat").ok()?;
    s.split_whitespace().next()?.parse().ok()
}
