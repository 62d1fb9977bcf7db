//! The store: the only module that touches sled.
//!
//! One OS thread (the *store thread*) owns every write. The hot path queues
//! usage records over a channel and returns at once; the store thread
//! collects what arrives for up to `flush_ms` (or [`MAX_BATCH_OPS`] ops),
//! aggregates it in memory and commits it with **one** atomic
//! `apply_batch` on one tree, then one `flush`. Admin writes go through the
//! same thread and are answered only once flushed. Reads are plain sled
//! reads from the caller's thread.
//!
//! # Layout
//!
//! | tree | key | value |
//! |---|---|---|
//! | `meta` | `schema` | u32 LE schema version, checked at open |
//! | `keys` | `k` hash | key record (JSON) |
//! | `keys` | `c` ord(created_at) hash | empty: the listing order |
//! | `keys` | `n` | u64 LE number of keys (open must not count them) |
//! | `owners` | u16 len, owner, u16 len, plan, hash | `[disabled]` |
//! | `book` | `a` hash | account + the key's `limit_reset` (binary) |
//! | `book` | `u` hash !batch_seq | that key's usage records of one batch (binary) |
//! | `book` | `l` hash seq | ledger entry (JSON) |
//! | `book` | `i` hash idempotency-key | ledger seq (u64 BE) |
//! | `book` | `R` hash ord(hour) model | per-key hourly rollup (binary) |
//! | `book` | `G` ord(hour) model | gateway hourly rollup (binary) |
//! | `book` | `b` batch_seq | batch index: keys written, their record counts, time span (retention) |
//! | `book` | `m` `next_bseq` | batch sequence floor, written by retention |
//! | `book` | `p` hash | u64 LE: the key's usage records removed by retention |
//!
//! Everything that must agree with everything else about money (accounts,
//! usage records, rollups, ledger, idempotency) lives in `book`, so every
//! commit of it is a single atomic `apply_batch`: after a crash, `spent` is
//! always Σ records + Σ ledger. Admin writes that also touch `keys` and
//! `owners` (create, update, delete) use one sled transaction over the
//! three trees. The account carries the key's `limit_reset` so the store
//! thread rolls periods with the one read it does per key per batch,
//! without decoding the key record.
//!
//! # Cost per batch
//!
//! For each key touched: one account write and one usage value; one rollup
//! write per (key, hour, model) and per (hour, model) for the gateway; one
//! batch-index write. Nothing is written per record.

mod codec;
#[cfg(test)]
mod tests;

use std::collections::HashMap;
use std::collections::hash_map::Entry;
use std::path::Path;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::mpsc::{self, Receiver, Sender};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use sled::transaction::{ConflictableTransactionError, TransactionError};
use sled::{Batch, Db, IVec, Transactional, Tree};
use tokio::sync::oneshot;

use crate::clock::Period;
use crate::money::Pico;
use codec::*;

/// The layout version written at creation and required at open.
pub const SCHEMA_VERSION: u32 = 1;

/// Most ops the store thread takes into one batch before committing. Under
/// load the per-key writes (account, usage value, rollups) are shared by
/// more records the larger this is: with 1,000 busy keys, 4,096 gave 0.75
/// sled writes per record, 16,384 about a quarter of that.
pub const MAX_BATCH_OPS: usize = 16_384;

/// Keys per chunk of [`Store::insert_keys_bulk`].
const BULK_CHUNK: usize = 8192;

/// Retention stops at the first batch whose oldest record is this much
/// newer than its cut-off: batches are written in settle-time order, give
/// or take a flush window, and no request lives an hour.
const PRUNE_SLACK_MS: i64 = 3_600_000;

const HOUR_MS: i64 = 3_600_000;

pub type KeyHash = [u8; 32]; // SHA-256 of the whole API key

/// A key's identity and policy. Changes only through the admin API (or a device binding).
#[derive(Clone, Debug, PartialEq, Eq)]
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
    pub fn change_reset(&mut self, from: Option<Period>, to: Option<Period>, at_ms: i64) {
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
    /// Ops queued and not yet taken by the store thread.
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
    /// Writes that failed (logged; their records are lost).
    pub write_errors: u64,
}

/// Why a store operation failed.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("the key already exists")]
    Exists,
    #[error("no such key")]
    NotFound,
    #[error("invalid store request: {0}")]
    Invalid(String),
    #[error("corrupt store data: {0}")]
    Corrupt(String),
    #[error("store schema version {found}, this binary needs {expected}")]
    Schema { found: u32, expected: u32 },
    #[error("sled: {0}")]
    Sled(#[from] sled::Error),
    #[error("flush failed: {0}")]
    Flush(String),
    #[error("the store thread has stopped")]
    Closed,
    #[error("io: {0}")]
    Io(#[from] std::io::Error),
}

impl From<TransactionError<StoreError>> for StoreError {
    fn from(e: TransactionError<StoreError>) -> StoreError {
        match e {
            TransactionError::Abort(e) => e,
            TransactionError::Storage(e) => StoreError::Sled(e),
        }
    }
}

/// Aborts a sled transaction with a store error.
fn abort<T>(e: StoreError) -> Result<T, ConflictableTransactionError<StoreError>> {
    Err(ConflictableTransactionError::Abort(e))
}

/// The handle to the store: cheap to clone, shared by every thread.
#[derive(Clone)]
pub struct Store {
    inner: Arc<Inner>,
}

struct Inner {
    /// Kept so reads of all trees see one open database.
    _db: Db,
    keys: Tree,
    owners: Tree,
    book: Tree,
    /// `None` only while dropping: closing it stops the store thread.
    tx: Option<Sender<Op>>,
    thread: Mutex<Option<JoinHandle<()>>>,
    /// Unparked by writes someone awaits (and on drop); records never wake
    /// the store thread mid-batch.
    waker: std::thread::Thread,
    counters: Arc<Counters>,
}

impl Drop for Inner {
    fn drop(&mut self) {
        // Closing the channel makes the store thread commit and flush what is
        // queued, then exit; joining releases sled's lock before a reopen.
        drop(self.tx.take());
        self.waker.unpark();
        let handle = match self.thread.get_mut() {
            Ok(h) => h.take(),
            Err(poisoned) => poisoned.into_inner().take(),
        };
        if let Some(h) = handle {
            let _ = h.join();
        }
    }
}

#[derive(Default)]
struct Counters {
    queue_depth: AtomicU64,
    batches: AtomicU64,
    records_written: AtomicU64,
    last_batch_size: AtomicU64,
    flush_us_sum: AtomicU64,
    flush_count: AtomicU64,
    sled_writes: AtomicU64,
    thread_cpu_ns: AtomicU64,
    keys: AtomicI64,
    write_errors: AtomicU64,
}

/// A reply sent once the batch it belongs to is flushed (or failed to).
type Reply = Box<dyn FnOnce(Result<(), String>) + Send>;

enum Op {
    Record(Box<UsageRecord>),
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
    Prune(i64, oneshot::Sender<Result<u64, StoreError>>),
    Bulk(
        Vec<(KeyRecord, Account)>,
        mpsc::SyncSender<Result<(), StoreError>>,
    ),
}

impl Store {
    /// Opens (or creates) the database under `path`, checks the schema
    /// version, spawns the store thread. Reads no keys: the key count is a
    /// stored counter.
    pub fn open(path: &Path, flush_ms: u64) -> Result<Store, StoreError> {
        let db = open_db(path)?;
        let meta = db.open_tree("meta")?;
        let keys = db.open_tree("keys")?;
        let owners = db.open_tree("owners")?;
        let book = db.open_tree("book")?;
        match meta.get("schema")? {
            Some(v) => {
                let found = <[u8; 4]>::try_from(v.as_ref())
                    .map(u32::from_le_bytes)
                    .map_err(|_| StoreError::Corrupt("schema version".into()))?;
                if found != SCHEMA_VERSION {
                    return Err(StoreError::Schema {
                        found,
                        expected: SCHEMA_VERSION,
                    });
                }
            }
            None => {
                if !keys.is_empty() || !book.is_empty() {
                    return Err(StoreError::Corrupt(
                        "data present but no schema version".into(),
                    ));
                }
                meta.insert("schema", &SCHEMA_VERSION.to_le_bytes())?;
                db.flush()?;
            }
        }
        let counters = Arc::new(Counters::default());
        counters.keys.store(
            read_key_count(&keys.get([b'n'])?)? as i64,
            Ordering::Relaxed,
        );
        let next_bseq = next_batch_seq(&book)?;
        let (tx, rx) = mpsc::channel();
        let thread = StoreThread {
            db: db.clone(),
            keys: keys.clone(),
            owners: owners.clone(),
            book: book.clone(),
            counters: counters.clone(),
            next_bseq,
            pending: Pending::default(),
            replies: Vec::new(),
            scratch: Vec::new(),
        };
        let window = Duration::from_millis(flush_ms);
        let handle = std::thread::Builder::new()
            .name("tollgate-store".into())
            .spawn(move || thread.run(rx, window))?;
        let waker = handle.thread().clone();
        Ok(Store {
            inner: Arc::new(Inner {
                _db: db,
                keys,
                owners,
                book,
                tx: Some(tx),
                waker,
                thread: Mutex::new(Some(handle)),
                counters,
            }),
        })
    }

    // ---- reads ----

    /// A key's record and account.
    pub fn key(&self, hash: &KeyHash) -> Result<Option<(KeyRecord, Account)>, StoreError> {
        let Some(v) = self.inner.keys.get(key_record_key(hash))? else {
            return Ok(None);
        };
        let rec = decode_key(hash, &v)?;
        let acct = self.account(hash)?;
        Ok(Some((rec, acct)))
    }

    fn account(&self, hash: &KeyHash) -> Result<Account, StoreError> {
        match self.inner.book.get(account_key(hash))? {
            Some(v) => Ok(decode_account(&v)?.0),
            None => Err(StoreError::Corrupt(format!(
                "key {} has no account",
                hex::encode(hash)
            ))),
        }
    }

    /// A page of keys ordered by `created_at` then hash.
    pub fn keys(&self, q: &KeyQuery) -> Result<Vec<(KeyRecord, Account)>, StoreError> {
        let wanted = |rec: &KeyRecord| q.include_disabled || !rec.disabled;
        if let Some(owner) = &q.owner {
            // An owner's keys are few: gather, sort, page.
            let mut all = Vec::new();
            for item in self.inner.owners.scan_prefix(owner_prefix(owner)) {
                let (k, _) = item?;
                let hash = owner_entry_hash(&k)?;
                if let Some((rec, acct)) = self.key(&hash)?
                    && wanted(&rec)
                {
                    all.push((rec, acct));
                }
            }
            all.sort_by_key(|(rec, _)| (rec.created_at, rec.hash));
            return Ok(all.into_iter().skip(q.offset).take(q.limit).collect());
        }
        let mut out = Vec::new();
        let mut skip = q.offset;
        for item in self.inner.keys.scan_prefix([b'c']) {
            if out.len() >= q.limit {
                break;
            }
            let (k, _) = item?;
            let hash: KeyHash = k
                .get(9..41)
                .and_then(|h| h.try_into().ok())
                .ok_or_else(|| StoreError::Corrupt("created index key".into()))?;
            let Some((rec, acct)) = self.key(&hash)? else {
                continue;
            };
            if !wanted(&rec) {
                continue;
            }
            if skip > 0 {
                skip -= 1;
                continue;
            }
            out.push((rec, acct));
        }
        Ok(out)
    }

    /// An owner's not-disabled key of that plan (for `one_per_owner`).
    pub fn active_key_of(&self, owner: &str, plan: &str) -> Result<Option<KeyHash>, StoreError> {
        let mut prefix = owner_prefix(owner);
        push_len_str(&mut prefix, plan);
        for item in self.inner.owners.scan_prefix(prefix) {
            let (k, v) = item?;
            if v.first() == Some(&0) {
                return Ok(Some(owner_entry_hash(&k)?));
            }
        }
        Ok(None)
    }

    /// A key's ledger, newest first.
    pub fn ledger(
        &self,
        hash: &KeyHash,
        offset: usize,
        limit: usize,
    ) -> Result<Vec<LedgerEntry>, StoreError> {
        let mut out = Vec::new();
        for item in self
            .inner
            .book
            .scan_prefix(prefixed(b'l', hash))
            .rev()
            .skip(offset)
            .take(limit)
        {
            let (_, v) = item?;
            out.push(decode_ledger(&v)?);
        }
        Ok(out)
    }

    /// A key's usage records, newest first. Whole batches before `offset`
    /// are skipped by their stored count, without decoding.
    pub fn usage(
        &self,
        hash: &KeyHash,
        offset: usize,
        limit: usize,
    ) -> Result<Vec<UsageRecord>, StoreError> {
        let mut out = Vec::new();
        let mut skip = offset as u64;
        for item in self.inner.book.scan_prefix(prefixed(b'u', hash)) {
            if out.len() >= limit {
                break;
            }
            let (_, v) = item?;
            let count = usage_batch_count(&v)?;
            if skip >= count {
                skip -= count;
                continue;
            }
            let recs = decode_usage_batch(&v, hash)?;
            let room = limit - out.len();
            out.extend(recs.into_iter().rev().skip(skip as usize).take(room));
            skip = 0;
        }
        Ok(out)
    }

    /// How many of a key's usage records retention has removed, so that
    /// `Account::requests` minus this is the number still stored, without
    /// counting them.
    pub fn pruned_usage(&self, hash: &KeyHash) -> Result<u64, StoreError> {
        read_u64_le(&self.inner.book.get(prefixed(b'p', hash))?, "pruned count")
    }

    /// Hourly rollups in `[from_hour, to_hour)` (hour = at_ms / 3,600,000),
    /// by hour then model.
    pub fn rollups(
        &self,
        scope: RollupScope,
        from_hour: i64,
        to_hour: i64,
    ) -> Result<Vec<(i64, String, Rollup)>, StoreError> {
        let base = match &scope {
            RollupScope::Key(h) => prefixed(b'R', h),
            RollupScope::Gateway => vec![b'G'],
        };
        let mut start = base.clone();
        start.extend_from_slice(&ord_i64(from_hour));
        let mut end = base.clone();
        end.extend_from_slice(&ord_i64(to_hour));
        let mut out = Vec::new();
        if from_hour >= to_hour {
            return Ok(out);
        }
        for item in self.inner.book.range(start..end) {
            let (k, v) = item?;
            let rest = k
                .get(base.len()..)
                .ok_or_else(|| StoreError::Corrupt("rollup key".into()))?;
            let hour =
                from_ord_i64(rest).ok_or_else(|| StoreError::Corrupt("rollup key".into()))?;
            let model = String::from_utf8(rest[8..].to_vec())
                .map_err(|_| StoreError::Corrupt("rollup model".into()))?;
            out.push((hour, model, decode_rollup(&v)?));
        }
        Ok(out)
    }

    // ---- admin writes: through the store thread, flushed before they return ----

    async fn call<T>(
        &self,
        make: impl FnOnce(oneshot::Sender<Result<T, StoreError>>) -> Op,
    ) -> Result<T, StoreError> {
        let (tx, rx) = oneshot::channel();
        self.send(make(tx))?;
        rx.await.map_err(|_| StoreError::Closed)?
    }

    fn send(&self, op: Op) -> Result<(), StoreError> {
        let tx = self.inner.tx.as_ref().ok_or(StoreError::Closed)?;
        let awaited = !matches!(op, Op::Record(_) | Op::BindDevice(..));
        self.inner
            .counters
            .queue_depth
            .fetch_add(1, Ordering::Relaxed);
        tx.send(op).map_err(|_| {
            self.inner
                .counters
                .queue_depth
                .fetch_sub(1, Ordering::Relaxed);
            StoreError::Closed
        })?;
        if awaited {
            self.inner.waker.unpark();
        }
        Ok(())
    }

    /// Creates a key and its account. `Exists` if the hash exists.
    pub async fn create_key(&self, rec: KeyRecord, acct: Account) -> Result<(), StoreError> {
        self.call(|tx| Op::Create(Box::new(rec), acct, tx)).await
    }

    /// Replaces a key's record. `NotFound` if absent. Keeps the owners index
    /// and the account's copy of `limit_reset` right.
    pub async fn update_key(&self, rec: KeyRecord) -> Result<(), StoreError> {
        self.call(|tx| Op::Update(Box::new(rec), tx)).await
    }

    /// Removes a key's record, account and index entries; its usage, ledger
    /// and rollups stay for reports. `false` if it did not exist.
    pub async fn delete_key(&self, hash: KeyHash) -> Result<bool, StoreError> {
        self.call(|tx| Op::Delete(hash, tx)).await
    }

    /// Sets a key's limit (None = unlimited).
    pub async fn set_limit(
        &self,
        hash: KeyHash,
        limit: Option<Pico>,
    ) -> Result<Account, StoreError> {
        self.call(|tx| Op::SetLimit(hash, limit, tx)).await
    }

    /// Applies a credit and writes its ledger entry, atomically with the
    /// account. The same idempotency key (per key) applies once.
    pub async fn credit(&self, hash: KeyHash, op: CreditOp) -> Result<CreditOutcome, StoreError> {
        if op.amount.0 <= 0 {
            return Err(StoreError::Invalid("credit amount must be > 0".into()));
        }
        self.call(|tx| Op::Credit(hash, op, tx)).await
    }

    /// Everything queued before this call is durable when it returns.
    pub async fn flush(&self) -> Result<(), StoreError> {
        self.call(Op::Flush).await
    }

    /// Retention: removes usage records with `at_ms < before_ms`, keeps
    /// rollups and accounts. Runs on the store thread (records queue
    /// meanwhile); returns how many records were removed.
    pub async fn prune_usage_before(&self, before_ms: i64) -> Result<u64, StoreError> {
        self.call(|tx| Op::Prune(before_ms, tx)).await
    }

    // ---- hot path: never blocks, never touches sled ----

    /// Queues a usage record; committed with the next batch. Never blocks
    /// (the queue is unbounded; `stats().queue_depth` shows it).
    // interface stub: the store branch provides the real one (returns the record's sequence)
    pub fn record(&self, rec: UsageRecord) -> u64 {
        if self.send(Op::Record(Box::new(rec))).is_err() {
            tracing::error!("usage record dropped: the store thread has stopped");
        }
        0
    }

    /// Queues a device binding: appends to `KeyRecord::devices` if absent.
    pub fn bind_device(&self, hash: KeyHash, device: String) {
        if self.send(Op::BindDevice(hash, device)).is_err() {
            tracing::error!("device binding dropped: the store thread has stopped");
        }
    }

    pub fn stats(&self) -> StoreStats {
        let c = &self.inner.counters;
        let r = |a: &AtomicU64| a.load(Ordering::Relaxed);
        StoreStats {
            queue_depth: r(&c.queue_depth),
            batches: r(&c.batches),
            records_written: r(&c.records_written),
            last_batch_size: r(&c.last_batch_size),
            flush_us_sum: r(&c.flush_us_sum),
            flush_count: r(&c.flush_count),
            sled_writes: r(&c.sled_writes),
            thread_cpu_ns: r(&c.thread_cpu_ns),
            keys: c.keys.load(Ordering::Relaxed).max(0) as u64,
            write_errors: r(&c.write_errors),
        }
    }

    /// For benches and bulk imports: inserts many keys in large batches,
    /// blocking the calling thread until each chunk is flushed. Keys whose
    /// hash exists are left as they are. Not for async contexts' hot paths.
    pub fn insert_keys_bulk(
        &self,
        items: impl IntoIterator<Item = (KeyRecord, Account)>,
    ) -> Result<(), StoreError> {
        let mut items = items.into_iter().peekable();
        while items.peek().is_some() {
            let chunk: Vec<_> = items.by_ref().take(BULK_CHUNK).collect();
            let (tx, rx) = mpsc::sync_channel(1);
            self.send(Op::Bulk(chunk, tx))?;
            rx.recv().map_err(|_| StoreError::Closed)??;
        }
        Ok(())
    }

    // interface stub: the store branch provides the real one
    /// Sequence of the last usage record that is durable.
    pub fn committed_seq(&self) -> u64 {
        u64::MAX
    }

    /// The hash of every key in the store, in hash order (for the gate's
    /// filter of known keys). Reads the key records' keys, one scan.
    pub fn key_hashes(&self) -> impl Iterator<Item = Result<KeyHash, StoreError>> + '_ {
        self.inner.keys.scan_prefix([b'k']).map(|item| {
            let (k, _) = item?;
            k.get(1..33)
                .and_then(|h| KeyHash::try_from(h).ok())
                .ok_or_else(|| StoreError::Corrupt("key record key".into()))
        })
    }
}

// ---- keys of the trees ----

fn prefixed(tag: u8, hash: &KeyHash) -> Vec<u8> {
    let mut k = Vec::with_capacity(1 + 32 + 16);
    k.push(tag);
    k.extend_from_slice(hash);
    k
}

fn key_record_key(hash: &KeyHash) -> Vec<u8> {
    prefixed(b'k', hash)
}

fn created_key(created_at: i64, hash: &KeyHash) -> Vec<u8> {
    let mut k = Vec::with_capacity(41);
    k.push(b'c');
    k.extend_from_slice(&ord_i64(created_at));
    k.extend_from_slice(hash);
    k
}

fn account_key(hash: &KeyHash) -> Vec<u8> {
    prefixed(b'a', hash)
}

/// Newest batch first: the batch sequence, inverted.
fn usage_key(hash: &KeyHash, bseq: u64) -> Vec<u8> {
    let mut k = prefixed(b'u', hash);
    k.extend_from_slice(&(!bseq).to_be_bytes());
    k
}

fn ledger_key(hash: &KeyHash, seq: u64) -> Vec<u8> {
    let mut k = prefixed(b'l', hash);
    k.extend_from_slice(&seq.to_be_bytes());
    k
}

fn idempotency_key(hash: &KeyHash, idem: &str) -> Vec<u8> {
    let mut k = prefixed(b'i', hash);
    k.extend_from_slice(idem.as_bytes());
    k
}

fn batch_index_key(bseq: u64) -> [u8; 9] {
    let mut k = [b'b'; 9];
    k[1..].copy_from_slice(&bseq.to_be_bytes());
    k
}

const NEXT_BSEQ_KEY: &[u8] = b"mnext_bseq";

fn push_len_str(buf: &mut Vec<u8>, s: &str) {
    // Owner and plan names are short; longer ones are cut in the index only.
    let bytes = &s.as_bytes()[..s.len().min(u16::MAX as usize)];
    buf.extend_from_slice(&(bytes.len() as u16).to_be_bytes());
    buf.extend_from_slice(bytes);
}

fn owner_prefix(owner: &str) -> Vec<u8> {
    let mut k = Vec::with_capacity(owner.len() + 40);
    push_len_str(&mut k, owner);
    k
}

/// The owners-index entry of a record, if it has an owner.
fn owner_entry(rec: &KeyRecord) -> Option<Vec<u8>> {
    let owner = rec.owner.as_deref()?;
    let mut k = owner_prefix(owner);
    push_len_str(&mut k, rec.plan.as_deref().unwrap_or(""));
    k.extend_from_slice(&rec.hash);
    Some(k)
}

fn owner_entry_hash(k: &[u8]) -> Result<KeyHash, StoreError> {
    k.len()
        .checked_sub(32)
        .and_then(|at| k[at..].try_into().ok())
        .ok_or_else(|| StoreError::Corrupt("owners index key".into()))
}

fn read_key_count(v: &Option<IVec>) -> Result<u64, StoreError> {
    match v {
        None => Ok(0),
        Some(v) => <[u8; 8]>::try_from(v.as_ref())
            .map(u64::from_le_bytes)
            .map_err(|_| StoreError::Corrupt("key count".into())),
    }
}

fn read_u64_le(v: &Option<IVec>, what: &str) -> Result<u64, StoreError> {
    match v {
        None => Ok(0),
        Some(v) => <[u8; 8]>::try_from(v.as_ref())
            .map(u64::from_le_bytes)
            .map_err(|_| StoreError::Corrupt(what.into())),
    }
}

/// The next usage batch number: past the newest batch index entry and past
/// the floor retention leaves when it removes every entry.
fn next_batch_seq(book: &Tree) -> Result<u64, StoreError> {
    let mut next = match book.get(NEXT_BSEQ_KEY)? {
        Some(v) => <[u8; 8]>::try_from(v.as_ref())
            .map(u64::from_be_bytes)
            .map_err(|_| StoreError::Corrupt("batch sequence floor".into()))?,
        None => 0,
    };
    if let Some(item) = book.scan_prefix([b'b']).next_back() {
        let (k, _) = item?;
        let last = k
            .get(1..9)
            .and_then(|b| <[u8; 8]>::try_from(b).ok())
            .map(u64::from_be_bytes)
            .ok_or_else(|| StoreError::Corrupt("batch index key".into()))?;
        next = next.max(last + 1);
    }
    Ok(next)
}

/// Opens sled, waiting up to 2 s for its file lock: after a `Store` in
/// this process is dropped, sled's background threads may hold the lock a
/// moment longer.
fn open_db(path: &Path) -> Result<Db, StoreError> {
    let deadline = Instant::now() + Duration::from_secs(2);
    loop {
        let opened = sled::Config::new()
            .path(path)
            // The store thread flushes every batch itself.
            .flush_every_ms(None)
            .open();
        match opened {
            Err(sled::Error::Io(e))
                if e.to_string().contains("could not acquire lock")
                    && Instant::now() < deadline =>
            {
                std::thread::sleep(Duration::from_millis(20));
            }
            other => return Ok(other?),
        }
    }
}

/// Adds a signed amount to an account at `at_ms`, rolling its limit period
/// first. A charge dated in an earlier period than the account's (a late
/// record) counts in the lifetime `spent` only. `period_spent` never goes
/// below 0; `spent` is not clamped so that it stays Σ records + ledger.
fn charge(acct: &mut Account, reset: Option<Period>, at_ms: i64, amount: Pico) {
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

// ---- the store thread ----

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
struct Pending {
    keys: HashMap<KeyHash, KeyBatch>,
    /// Rollup deltas by their `book` key (`R…` and `G…`).
    rollups: HashMap<Vec<u8>, Rollup>,
    records: u64,
    min_at: i64,
    max_at: i64,
}

struct StoreThread {
    db: Db,
    keys: Tree,
    owners: Tree,
    book: Tree,
    counters: Arc<Counters>,
    next_bseq: u64,
    pending: Pending,
    /// Answers owed once this batch is flushed.
    replies: Vec<Reply>,
    /// Reused to build rollup keys without allocating per record.
    scratch: Vec<u8>,
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
    fn run(mut self, rx: Receiver<Op>, window: Duration) {
        while let Ok(first) = rx.recv() {
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
        // Every sender is gone and everything received is flushed.
    }

    /// Takes one op into the batch; `true` if someone awaits its flush.
    fn handle(&mut self, op: Op) -> bool {
        self.counters.queue_depth.fetch_sub(1, Ordering::Relaxed);
        match op {
            Op::Record(rec) => {
                self.add_record(&rec);
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
        }
    }

    fn write_count(&self, n: usize) {
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
        if let Some((acct, reset)) = &mut kb.acct {
            charge(acct, *reset, rec.at_ms, rec.cost);
            acct.requests = acct.requests.saturating_add(1);
        }
        put_usage(&mut kb.records, rec);
        kb.count += 1;

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
    }

    /// Writes the collected records as one atomic batch (not flushed).
    fn commit_pending(&mut self) -> Result<(), StoreError> {
        if self.pending.records == 0 {
            return Ok(());
        }
        let p = std::mem::take(&mut self.pending);
        let bseq = self.next_bseq;
        let mut batch = Batch::default();
        let mut writes = 0usize;
        let mut index = BatchIndex {
            min_at: p.min_at,
            max_at: p.max_at,
            keys: Vec::with_capacity(p.keys.len()),
        };
        for (hash, kb) in p.keys {
            if let Some((acct, reset)) = kb.acct {
                batch.insert(account_key(&hash), encode_account(&acct, reset));
                writes += 1;
            }
            batch.insert(
                usage_key(&hash, bseq),
                finish_usage_batch(kb.count, &kb.records),
            );
            writes += 1;
            index.keys.push((hash, kb.count));
        }
        for (key, delta) in p.rollups {
            let mut sum = match self.book.get(&key)? {
                Some(v) => decode_rollup(&v)?,
                None => Rollup::default(),
            };
            add_rollup(&mut sum, &delta);
            batch.insert(key, encode_rollup(&sum));
            writes += 1;
        }
        batch.insert(&batch_index_key(bseq), encode_batch_index(&index));
        writes += 1;
        self.next_bseq += 1;
        let result = self.book.apply_batch(batch);
        self.write_count(writes);
        match result {
            Ok(()) => {
                self.counters
                    .records_written
                    .fetch_add(p.records, Ordering::Relaxed);
                Ok(())
            }
            Err(e) => {
                self.counters.write_errors.fetch_add(1, Ordering::Relaxed);
                tracing::error!(error = %e, records = p.records, "usage batch lost");
                Err(e.into())
            }
        }
    }

    fn finish_batch(&mut self, ops: usize) {
        if let Err(e) = self.commit_pending() {
            tracing::error!(error = %e, "usage batch commit failed");
        }
        let started = Instant::now();
        let flushed = self.db.flush().map(|_| ()).map_err(|e| e.to_string());
        let c = &self.counters;
        c.flush_us_sum
            .fetch_add(started.elapsed().as_micros() as u64, Ordering::Relaxed);
        c.flush_count.fetch_add(1, Ordering::Relaxed);
        c.batches.fetch_add(1, Ordering::Relaxed);
        c.last_batch_size.store(ops as u64, Ordering::Relaxed);
        if let Some(ns) = thread_cpu_ns() {
            c.thread_cpu_ns.store(ns, Ordering::Relaxed);
        }
        if let Err(e) = &flushed {
            tracing::error!(error = %e, "store flush failed");
            c.write_errors.fetch_add(1, Ordering::Relaxed);
        }
        for reply in self.replies.drain(..) {
            reply(flushed.clone());
        }
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
        (&self.keys, &self.owners, &self.book).transaction(|(keys, owners, book)| {
            if keys.get(key_record_key(&hash))?.is_some() {
                return abort(StoreError::Exists);
            }
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
        self.counters.keys.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }

    fn update(&mut self, rec: &KeyRecord) -> Result<(), StoreError> {
        let hash = rec.hash;
        let record = encode_key(rec);
        let new_owner = owner_entry(rec);
        (&self.keys, &self.owners, &self.book).transaction(|(keys, owners, book)| {
            let Some(old) = keys.get(key_record_key(&hash))? else {
                return abort(StoreError::NotFound);
            };
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
        Ok(())
    }

    fn delete(&mut self, hash: &KeyHash) -> Result<bool, StoreError> {
        let existed =
            (&self.keys, &self.owners, &self.book).transaction(|(keys, owners, book)| {
                let Some(old) = keys.remove(key_record_key(hash))? else {
                    return Ok(false);
                };
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
            self.counters.keys.fetch_sub(1, Ordering::Relaxed);
        }
        Ok(existed)
    }

    fn read_account(&self, hash: &KeyHash) -> Result<(Account, Option<Period>), StoreError> {
        match self.book.get(account_key(hash))? {
            Some(v) => decode_account(&v),
            None => Err(StoreError::NotFound),
        }
    }

    fn set_limit(&mut self, hash: &KeyHash, limit: Option<Pico>) -> Result<Account, StoreError> {
        let (mut acct, reset) = self.read_account(hash)?;
        acct.limit = limit;
        self.book
            .insert(account_key(hash), encode_account(&acct, reset))?;
        self.write_count(1);
        Ok(acct)
    }

    /// The account, the ledger entry and the idempotency entry go in one
    /// atomic batch of `book`.
    fn credit(&mut self, hash: &KeyHash, op: &CreditOp) -> Result<CreditOutcome, StoreError> {
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
            return Ok(CreditOutcome {
                entry: decode_ledger(&entry)?,
                account: acct,
                replayed: true,
            });
        }
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
                acct.fee_day = acct.fee_day.max(op.at_ms.div_euclid(crate::clock::DAY_MS));
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
        let mut batch = Batch::default();
        batch.insert(account_key(hash), encode_account(&acct, reset));
        batch.insert(ledger_key(hash, entry.seq), encode_ledger(&entry));
        let mut writes = 2;
        if let Some(idem) = &op.idempotency_key {
            batch.insert(idempotency_key(hash, idem), &entry.seq.to_be_bytes());
            writes += 1;
        }
        self.book.apply_batch(batch)?;
        self.write_count(writes);
        Ok(CreditOutcome {
            entry,
            account: acct,
            replayed: false,
        })
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
        for (rec, acct) in &items {
            if !seen.insert(rec.hash) || self.keys.contains_key(key_record_key(&rec.hash))? {
                continue;
            }
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
        self.book.apply_batch(book)?;
        self.owners.apply_batch(owners)?;
        self.keys.apply_batch(keys)?;
        self.write_count(writes + 1);
        self.counters
            .keys
            .fetch_add(added as i64, Ordering::Relaxed);
        Ok(())
    }

    /// Removes usage older than `before_ms`, batch by batch through the
    /// batch index, committing in chunks.
    fn prune(&mut self, before_ms: i64) -> Result<u64, StoreError> {
        let stop_after = before_ms.saturating_add(PRUNE_SLACK_MS);
        let mut removed = 0u64;
        let mut batch = Batch::default();
        // The floor keeps batch numbers rising even if every index entry goes.
        batch.insert(NEXT_BSEQ_KEY, &self.next_bseq.to_be_bytes());
        let mut ops = 1usize;
        // Records removed per key in the current chunk; their counts are
        // raised in the same atomic batch as the removal.
        let mut pruned: HashMap<KeyHash, u64> = HashMap::new();
        for item in self.book.scan_prefix([b'b']) {
            let (k, v) = item?;
            let idx = decode_batch_index(&v)?;
            // Batches come in time order, give or take a flush window and
            // a request's length: past the slack nothing older is left.
            if idx.min_at >= stop_after {
                break;
            }
            if idx.min_at >= before_ms {
                continue;
            }
            let bseq = k
                .get(1..9)
                .and_then(|b| <[u8; 8]>::try_from(b).ok())
                .map(u64::from_be_bytes)
                .ok_or_else(|| StoreError::Corrupt("batch index key".into()))?;
            if idx.max_at < before_ms {
                for (hash, n) in &idx.keys {
                    batch.remove(usage_key(hash, bseq));
                    removed += n;
                    *pruned.entry(*hash).or_default() += n;
                }
                batch.remove(k);
                ops += idx.keys.len() + 1;
            } else {
                // A batch straddling the cut: keep its newer records.
                let mut kept_keys = Vec::new();
                let mut min_at = i64::MAX;
                for (hash, _) in &idx.keys {
                    let uk = usage_key(hash, bseq);
                    let Some(val) = self.book.get(&uk)? else {
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
                        batch.remove(uk);
                    } else {
                        batch.insert(uk, finish_usage_batch(kept, &buf));
                        kept_keys.push((*hash, kept));
                    }
                    ops += 1;
                }
                if kept_keys.is_empty() {
                    batch.remove(k);
                } else {
                    let idx = BatchIndex {
                        min_at,
                        keys: kept_keys,
                        ..idx
                    };
                    batch.insert(k, encode_batch_index(&idx));
                }
                ops += 1;
            }
            if ops >= MAX_BATCH_OPS {
                ops += self.add_pruned_counts(&mut batch, &mut pruned)?;
                self.book.apply_batch(std::mem::take(&mut batch))?;
                self.write_count(ops);
                ops = 0;
            }
        }
        ops += self.add_pruned_counts(&mut batch, &mut pruned)?;
        self.book.apply_batch(batch)?;
        self.write_count(ops);
        Ok(removed)
    }

    /// Adds a chunk's per-key removal counts to the stored ones, in `batch`.
    fn add_pruned_counts(
        &self,
        batch: &mut Batch,
        pruned: &mut HashMap<KeyHash, u64>,
    ) -> Result<usize, StoreError> {
        let n = pruned.len();
        for (hash, removed) in pruned.drain() {
            let k = prefixed(b'p', &hash);
            let before = read_u64_le(&self.book.get(&k)?, "pruned count")?;
            batch.insert(k, &before.saturating_add(removed).to_le_bytes());
        }
        Ok(n)
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
fn thread_cpu_ns() -> Option<u64> {
    let s = std::fs::read_to_string("/proc/thread-self/schedstat").ok()?;
    s.split_whitespace().next()?.parse().ok()
}
