//! The store: the only module that touches sled.
//!
//! One OS thread (the *store thread*) owns every write. The hot path queues
//! usage records over a channel and returns at once; the store thread
//! collects what arrives for up to `flush_ms` (or [`MAX_BATCH_OPS`] ops),
//! aggregates it in memory and commits it with **one** atomic
//! `apply_batch` on one tree, then one `flush`. Admin writes go through the
//! same thread and are answered only once flushed. Reads are plain sled
//! reads from the caller's thread.//!
//! Files: [`records`] (the types kept), [`layout`] (the trees' key layout,
//! drawn as a table), [`thread`] (the store thread and its group commit),
//! `codec` (binary encodings), `events` (the outbox and audit log the
//! store thread writes with each change).

pub mod admin_tokens;
mod cluster;
mod codec;
mod compat;
mod layout;
mod log;
mod payments;
mod records;
mod subscriptions;
#[cfg(test)]
mod tests;
mod thread;
mod unsent;
mod unshipped;

use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};
use std::sync::mpsc::{self, Sender};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use sled::transaction::{ConflictableTransactionError, TransactionError};
use sled::{Db, Tree};
use tokio::sync::oneshot;

use crate::money::Pico;
use codec::*;
use layout::*;
pub use payments::{
    Applied, EpayOrder, IssuedKey, PaymentCredit, PaymentEntry, PaymentOp, PaymentOutcome,
    PaymentQuery, PaymentRecord, PaymentStatus, PaymentTarget,
};
pub use records::*;
pub use subscriptions::{AppliedMarker, STALE_SUBSCRIPTION};
pub use thread::MAX_BATCH_OPS;
pub use thread::outbox::{AlertLevels, AuditQuery, DeliveryWrite, EventQuery};
use thread::{AccountEdit, Op, StoreThread};
pub use unshipped::{LedgerCursor, LocalLedgerEntry, Unshipped};

/// The layout version written at creation and required at open.
/// 2: the usage log moved from sled's `book` to the redb log.
pub const SCHEMA_VERSION: u32 = 2;

/// Keys per chunk of [`Store::insert_keys_bulk`].
const BULK_CHUNK: usize = 8192;

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
    #[error("not enough funds")]
    Insufficient,
    #[error("the store thread has stopped")]
    Closed,
    #[error("io: {0}")]
    Io(#[from] std::io::Error),
    #[error("usage log: {0}")]
    Log(String),
    /// Cluster mode: the database a payment is applied in first did not
    /// answer; nothing was applied (the provider retries).
    #[error("the cluster's database: {0}")]
    Database(String),
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
    /// The usage-record log (redb): read by `usage` and `pruned_usage`.
    log: Arc<log::Log>,
    /// `None` only while dropping: closing it stops the store thread.
    tx: Option<Sender<Op>>,
    thread: Mutex<Option<JoinHandle<()>>>,
    /// Unparked by writes someone awaits (and on drop); records never wake
    /// the store thread mid-batch.
    waker: std::thread::Thread,
    counters: Arc<Counters>,
    /// `accepting` turns false once this many records wait for their commit.
    queue_capacity: u64,
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

/// Shared between the handle and the store thread; atomics only, so that
/// `accepting` and `record` never lock.
#[derive(Default)]
struct Counters {
    /// Ops queued and not yet done: a record counts until its batch is on
    /// disk (flushed), any other op until the store thread takes it.
    queue_depth: AtomicU64,
    /// Sequence number of the last record handed to `record`.
    last_seq: AtomicU64,
    /// Every record with a sequence number ≤ this is on disk.
    committed_seq: AtomicU64,
    /// The last commit (or flush) failed and none has succeeded since.
    failing: AtomicBool,
    /// Test switch: every commit and flush fails as on a full disk.
    fault: AtomicBool,
    /// Cluster mode: an account's funds are checked against its lease (the
    /// hold the admin API takes before a deduct or a negative adjust), not
    /// against this store's balance, which holds only this node's part of
    /// the account's money; and ledger entries are marked for shipping to
    /// the database ([`unshipped`]), which a single node never reads.
    clustered: AtomicBool,
    batches: AtomicU64,
    records_written: AtomicU64,
    last_batch_size: AtomicU64,
    flush_us_sum: AtomicU64,
    flush_count: AtomicU64,
    sled_writes: AtomicU64,
    thread_cpu_ns: AtomicU64,
    keys: AtomicI64,
    write_errors: AtomicU64,
    /// Notified after a flush that wrote events: the delivery task wakes.
    events_written: tokio::sync::Notify,
}

/// How the store runs: the `[storage]` settings it uses.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct StoreOptions {
    /// Commit window: records are durable at most this long after `record`.
    pub flush_ms: u64,
    /// Records waiting for their commit at which `accepting` turns false:
    /// bounds what a crash can lose and what the queue holds.
    pub queue_capacity: u64,
    /// MiB the store may keep in memory (sled's cache and the batch).
    pub cache_mb: u64,
    /// `[alerts]` thresholds the store thread checks records against.
    pub alerts: AlertLevels,
}

impl Default for StoreOptions {
    fn default() -> Self {
        StoreOptions {
            flush_ms: 50,
            queue_capacity: DEFAULT_QUEUE_CAPACITY,
            cache_mb: 64,
            alerts: AlertLevels::default(),
        }
    }
}

/// Default `storage.queue_capacity`: about a second of records at the
/// gateway's peak rate, a few tens of MB at worst.
pub const DEFAULT_QUEUE_CAPACITY: u64 = 65_536;

impl Store {
    /// Opens with the default options and this commit window.
    pub fn open(path: &Path, flush_ms: u64) -> Result<Store, StoreError> {
        Store::open_with(
            path,
            StoreOptions {
                flush_ms,
                ..StoreOptions::default()
            },
        )
    }

    /// Opens (or creates) the database under `path`, checks the schema
    /// version, spawns the store thread. Reads no keys: the key count is a
    /// stored counter.
    pub fn open_with(path: &Path, opts: StoreOptions) -> Result<Store, StoreError> {
        // Three quarters of the budget for sled (keys, accounts, ledger,
        // rollups: a key missing from its cache costs a read on the
        // request's path), a quarter for the log's page cache. The log is
        // written, seldom read, and redb drops its whole page cache each
        // time the file grows (`PagedCachedFile::resize`): a big log cache
        // showed as a saw-tooth of ~45 MB in resident memory under load
        // (issue 17's soak check), not as faster reads.
        let budget = opts.cache_mb.max(4) * 1024 * 1024;
        let db = open_db(path, budget / 4 * 3)?;
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
        let log = Arc::new(log::Log::open(
            path,
            (budget - budget / 4 * 3) as usize,
            next_bseq,
        )?);
        restore_tail(&db, &book, &log)?;
        let (tx, handle) = StoreThread::spawn(
            db.clone(),
            log.clone(),
            [keys.clone(), owners.clone(), book.clone()],
            counters.clone(),
            next_bseq,
            Duration::from_millis(opts.flush_ms),
            thread::outbox::Outbox::open(&book, opts.alerts)?,
        )?;
        let waker = handle.thread().clone();
        Ok(Store {
            inner: Arc::new(Inner {
                _db: db,
                keys,
                owners,
                book,
                log,
                tx: Some(tx),
                waker,
                thread: Mutex::new(Some(handle)),
                counters,
                queue_capacity: opts.queue_capacity,
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
        match self.inner.book.get(account_key(hash))? {
            Some(a) => Ok(Some((rec, decode_account(&a)?.0))),
            // The two trees are read one after the other: a delete that
            // committed in between removed both, so the key is gone — only
            // a key record still there without its account is corrupt.
            None if self.inner.keys.get(key_record_key(hash))?.is_none() => Ok(None),
            None => self.account(hash).map(|acct| Some((rec, acct))),
        }
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
        self.inner.log.usage(hash, offset, limit)
    }

    /// How many of a key's usage records retention has removed, so that
    /// `Account::requests` minus this is the number still stored, without
    /// counting them.
    pub fn pruned_usage(&self, hash: &KeyHash) -> Result<u64, StoreError> {
        self.inner.log.pruned(hash)
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
        let op = make(tx);
        // An admin request's write is audited under its actor.
        let op = match crate::events::current_actor() {
            Some(actor) => Op::Noted(Box::new(actor), Box::new(op)),
            None => op,
        };
        let op = match crate::cluster::sync::replicating() {
            true => Op::Replicated(Box::new(op)),
            false => op,
        };
        self.send(op)?;
        rx.await.map_err(|_| StoreError::Closed)?
    }

    fn send(&self, op: Op) -> Result<(), StoreError> {
        let tx = self.inner.tx.as_ref().ok_or(StoreError::Closed)?;
        let awaited = !matches!(op, Op::Record(..) | Op::BindDevice(..));
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

    // ---- user accounts ----

    /// A user account, as stored.
    pub fn user_account(&self, id: &str) -> Result<Option<AccountRecord>, StoreError> {
        match self.inner.book.get(user_account_key(id))? {
            Some(v) => Ok(Some(decode_user_account(&v)?)),
            None => Ok(None),
        }
    }

    /// A page of accounts in id order, optionally only those with `email`.
    pub fn user_accounts(
        &self,
        offset: usize,
        limit: usize,
        email: Option<&str>,
    ) -> Result<Vec<AccountRecord>, StoreError> {
        let mut out = Vec::new();
        let mut skip = offset;
        for item in self.inner.book.scan_prefix([b'A']) {
            if out.len() >= limit {
                break;
            }
            let (_, v) = item?;
            let a = decode_user_account(&v)?;
            if email.is_some_and(|e| a.email.as_deref() != Some(e)) {
                continue;
            }
            if skip > 0 {
                skip -= 1;
                continue;
            }
            out.push(a);
        }
        Ok(out)
    }

    /// The hashes of an owner's keys (disabled ones too), with whether each is disabled.
    pub fn owner_keys(&self, owner: &str) -> Result<Vec<(KeyHash, bool)>, StoreError> {
        let mut out = Vec::new();
        for item in self.inner.owners.scan_prefix(owner_prefix(owner)) {
            let (k, v) = item?;
            // The prefix is length-delimited: only this owner's entries match.
            out.push((owner_entry_hash(&k)?, v.first() == Some(&1)));
        }
        Ok(out)
    }

    /// An account's ledger, newest first.
    pub fn account_ledger(
        &self,
        id: &str,
        offset: usize,
        limit: usize,
    ) -> Result<Vec<AccountLedgerEntry>, StoreError> {
        let mut out = Vec::new();
        for item in self
            .inner
            .book
            .scan_prefix(account_ledger_prefix(id))
            .rev()
            .skip(offset)
            .take(limit)
        {
            let (_, v) = item?;
            out.push(decode_account_entry(&v)?);
        }
        Ok(out)
    }

    /// Creates an account. `Exists` if the id exists.
    pub async fn create_user_account(&self, a: AccountRecord) -> Result<(), StoreError> {
        self.call(|tx| Op::AccountCreate(Box::new(a), tx)).await
    }

    /// Applies `edit` to the stored account (money charged meanwhile is
    /// kept) and returns it. `NotFound` if absent.
    pub async fn update_user_account(
        &self,
        id: &str,
        edit: impl FnOnce(&mut AccountRecord) -> Result<(), StoreError> + Send + 'static,
    ) -> Result<AccountRecord, StoreError> {
        let edit: AccountEdit = Box::new(edit);
        self.call(|tx| Op::AccountUpdate(id.to_owned(), edit, tx))
            .await
    }

    /// Removes an account record (its ledger stays). `false` if absent.
    pub async fn delete_user_account(&self, id: &str) -> Result<bool, StoreError> {
        self.call(|tx| Op::AccountDelete(id.to_owned(), tx)).await
    }

    /// Applies an account credit with its ledger entry, atomically and
    /// once per idempotency key. `Insufficient` when a deduct does not fit.
    pub async fn credit_user_account(
        &self,
        id: &str,
        op: AccountCreditOp,
    ) -> Result<AccountCreditOutcome, StoreError> {
        if op.amount.0 == 0 || (op.amount.0 < 0 && op.kind != AccountCreditKind::Adjust) {
            return Err(StoreError::Invalid("credit amount must be > 0".into()));
        }
        self.call(|tx| Op::AccountCredit(id.to_owned(), op, tx))
            .await
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

    /// Whether the store takes new paid work: false while
    /// `storage.queue_capacity` records wait for their commit, or while
    /// commits fail (disk full) and none has succeeded since. The proxy
    /// refuses paid requests (503 `store_unavailable`) while false, which
    /// is what bounds the queue: `record` itself never refuses.
    pub fn accepting(&self) -> bool {
        let c = &self.inner.counters;
        !c.failing.load(Ordering::Relaxed)
            && c.queue_depth.load(Ordering::Relaxed) < self.inner.queue_capacity
    }

    /// Queues a usage record, committed with the next batch, and returns
    /// its sequence number (rising by one per call). Never blocks and never
    /// drops: a batch that fails to commit is kept and retried.
    pub fn record(&self, rec: UsageRecord) -> u64 {
        let seq = self.inner.counters.last_seq.fetch_add(1, Ordering::Relaxed) + 1;
        if self.send(Op::Record(Box::new(rec), seq)).is_err() {
            tracing::error!("usage record dropped: the store thread has stopped");
        }
        seq
    }

    /// Every record whose sequence number (from `record`) is ≤ this is on
    /// disk: its batch was written and flushed.
    pub fn committed_seq(&self) -> u64 {
        self.inner.counters.committed_seq.load(Ordering::Acquire)
    }

    /// Makes every commit and flush fail (as on a full disk) while `on`;
    /// for tests of the failure path, which no real disk can be made to
    /// take on demand without root.
    pub fn set_write_fault(&self, on: bool) {
        self.inner.counters.fault.store(on, Ordering::Relaxed);
        self.inner.waker.unpark();
    }

    /// Cluster mode (once, at start, before serving): account deducts and
    /// negative adjusts are not refused for this store's balance, and
    /// ledger entries are marked for shipping (see `Counters::clustered`).
    pub fn set_clustered(&self) {
        self.inner.counters.clustered.store(true, Ordering::Release);
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
            committed_seq: c.committed_seq.load(Ordering::Acquire),
            failing: c.failing.load(Ordering::Relaxed),
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
}

/// Writes the batches of sled's tail back into the log (a crash lost
/// those the log had not made durable), durably, then empties the tail.
/// Every tail batch was counted: it was written in the sled batch that
/// counted it.
fn restore_tail(db: &sled::Db, book: &sled::Tree, log: &log::Log) -> Result<(), StoreError> {
    let tail = read_tail(book)?;
    if tail.is_empty() {
        return Ok(());
    }
    let batches = tail
        .iter()
        .map(|(bseq, bytes)| codec::decode_tail(*bseq, bytes))
        .collect::<Result<Vec<_>, _>>()?;
    let views: Vec<log::LogBatch<'_>> = batches
        .iter()
        .map(|b| log::LogBatch {
            bseq: b.bseq,
            values: b.values.iter().map(|(h, v)| (h, v.as_slice())).collect(),
            index: &b.index,
        })
        .collect();
    log.restore(&views)?;
    let mut remove = sled::Batch::default();
    for item in book.scan_prefix([b'Z']) {
        remove.remove(item?.0);
    }
    book.apply_batch(remove)?;
    db.flush()?;
    tracing::info!(
        batches = batches.len(),
        "usage log batches restored from the tail"
    );
    Ok(())
}

/// Opens sled, waiting up to 2 s for its file lock: after a `Store` in
/// this process is dropped, sled's background threads may hold the lock a
/// moment longer.
fn open_db(path: &Path, cache_bytes: u64) -> Result<Db, StoreError> {
    let deadline = Instant::now() + Duration::from_secs(2);
    loop {
        let opened = sled::Config::new()
            .path(path)
            .cache_capacity(cache_bytes)
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

impl Store {
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
