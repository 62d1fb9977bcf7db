//! The usage-record log: the per-batch usage values and the batch index,
//! kept in redb rather than sled (issue 17: sled 0.34 keeps inserted values
//! in memory, so a growing log grew the process without bound; redb's page
//! cache is bounded by `set_cache_size`).
//!
//! | table | key | value |
//! |---|---|---|
//! | `usage` | hash !batch_seq (BE) | that key's usage records of one batch |
//! | `batches` | batch_seq | batch index: keys written, their counts, time span |
//! | `pruned` | hash | u64: the key's usage records removed by retention |
//!
//! # Crash rule
//!
//! A batch is written here first (one redb transaction), then the sled
//! batch that counts it, which also stores the next batch number. At open,
//! every log batch at or above sled's next batch number was never counted
//! and is removed. Retention removes records and raises `pruned` in one
//! transaction here, so removed + stored always equals what sled counted.
//!
//! # The tail
//!
//! A durable redb commit with quick repair costs ~2.5 ms of CPU whatever
//! its size: it saves the allocator state (~600 KB for a 4 GiB region).
//! At one commit per flush window (50 a second) that was a tenth of the
//! gateway's CPU under load. So most batches are committed here without
//! durability ([`Log::write`] with `durable = false`: written, seen by
//! readers, lost by a crash), and their records also go into the sled
//! batch that counts them, as the tail (`Z` rows, [`super::layout`]). About
//! once a second a durable commit makes every earlier batch durable here
//! and its sled batch removes the tail. At open, [`Log::restore`] writes
//! the tail's batches back before anything reads the log.

use std::path::Path;

use redb::{Database, Durability, ReadableTable, TableDefinition};

use super::StoreError;
use super::codec::{BatchIndex, decode_batch_index, decode_usage_batch, usage_batch_count};
use super::records::{KeyHash, UsageRecord};

const USAGE: TableDefinition<&[u8], &[u8]> = TableDefinition::new("usage");
const BATCHES: TableDefinition<u64, &[u8]> = TableDefinition::new("batches");
const PRUNED: TableDefinition<&[u8], u64> = TableDefinition::new("pruned");

/// File of the log inside the store directory.
pub(super) const LOG_FILE: &str = "usage.redb";

fn err(e: impl std::fmt::Display) -> StoreError {
    StoreError::Log(e.to_string())
}

/// Key of one key's records in one batch: newest batch first.
pub(super) fn log_key(hash: &KeyHash, bseq: u64) -> [u8; 40] {
    let mut k = [0u8; 40];
    k[..32].copy_from_slice(hash);
    k[32..].copy_from_slice(&(!bseq).to_be_bytes());
    k
}

fn key_range(hash: &KeyHash) -> ([u8; 40], [u8; 40]) {
    let mut lo = [0u8; 40];
    lo[..32].copy_from_slice(hash);
    let mut hi = [0xffu8; 40];
    hi[..32].copy_from_slice(hash);
    (lo, hi)
}

/// The redb usage log.
pub(super) struct Log {
    db: Database,
}

/// One batch as written: (key, encoded records) and its index entry.
pub(super) struct LogBatch<'a> {
    pub bseq: u64,
    pub values: Vec<(&'a KeyHash, &'a [u8])>,
    pub index: &'a [u8],
}

/// A change to one batch made by retention.
pub(super) enum PruneEdit {
    /// Remove the whole batch.
    Drop { bseq: u64, keys: Vec<KeyHash> },
    /// Replace some keys' values, remove others, rewrite the index (or
    /// remove it if `index` is `None`).
    Rewrite {
        bseq: u64,
        replace: Vec<(KeyHash, Vec<u8>)>,
        remove: Vec<KeyHash>,
        index: Option<Vec<u8>>,
    },
}

impl Log {
    /// Opens (or creates) the log under `dir`, with a page cache of
    /// `cache_bytes`, and removes every batch numbered `next_bseq` or
    /// above: sled never counted them.
    pub(super) fn open(dir: &Path, cache_bytes: usize, next_bseq: u64) -> Result<Log, StoreError> {
        let file = dir.join(LOG_FILE);
        if !file.exists() {
            // A file killed half-created would not open again: create it
            // under another name, then rename it into place.
            let tmp = dir.join(format!("{LOG_FILE}.new"));
            let _ = std::fs::remove_file(&tmp);
            drop(redb::Builder::new().create(&tmp).map_err(err)?);
            std::fs::File::open(&tmp)?.sync_all()?;
            std::fs::rename(&tmp, &file)?;
            std::fs::File::open(dir)?.sync_all()?;
        }
        let db = redb::Builder::new()
            .set_cache_size(cache_bytes)
            .create(&file)
            .map_err(err)?;
        let log = Log { db };
        log.drop_uncounted(next_bseq)?;
        Ok(log)
    }

    fn drop_uncounted(&self, next_bseq: u64) -> Result<(), StoreError> {
        let tx = self.begin(true)?;
        {
            let mut batches = tx.open_table(BATCHES).map_err(err)?;
            let _ = tx.open_table(PRUNED).map_err(err)?;
            let mut usage = tx.open_table(USAGE).map_err(err)?;
            let mut stale = Vec::new();
            for item in batches.range(next_bseq..).map_err(err)? {
                let (k, v) = item.map_err(err)?;
                stale.push((k.value(), decode_batch_index(v.value())?));
            }
            if !stale.is_empty() {
                // Expected after a crash: info, not a warning.
                tracing::info!(
                    batches = stale.len(),
                    "usage log batches written but never counted (crash); removed"
                );
            }
            for (bseq, idx) in stale {
                for (hash, _) in &idx.keys {
                    usage.remove(log_key(hash, bseq).as_slice()).map_err(err)?;
                }
                batches.remove(bseq).map_err(err)?;
            }
        }
        tx.commit().map_err(err)
    }

    /// Starts a write transaction: durable ones (fsync before commit
    /// returns) save the allocator state, so that opening after a crash
    /// does not walk the whole file (10.7 s on 4.2 M records without it;
    /// see README, issue 17); the others are seen by readers at once and
    /// become durable with the next durable commit.
    fn begin(&self, durable: bool) -> Result<redb::WriteTransaction, StoreError> {
        let mut tx = self.db.begin_write().map_err(err)?;
        if durable {
            tx.set_durability(Durability::Immediate);
            tx.set_quick_repair(true);
        } else {
            tx.set_durability(Durability::None);
        }
        Ok(tx)
    }

    /// Writes one batch, durably or not (see the tail, above). Rewriting a
    /// batch number replaces it, so a retried batch is written once.
    pub(super) fn write(&self, b: &LogBatch<'_>, durable: bool) -> Result<(), StoreError> {
        let tx = self.begin(durable)?;
        Self::put(&tx, b)?;
        tx.commit().map_err(err)
    }

    /// Writes the tail's batches back (they may or may not be here), in
    /// one durable commit, which also makes every earlier batch durable.
    pub(super) fn restore(&self, batches: &[LogBatch<'_>]) -> Result<(), StoreError> {
        let tx = self.begin(true)?;
        for b in batches {
            Self::put(&tx, b)?;
        }
        tx.commit().map_err(err)
    }

    /// Makes every batch written so far durable: an empty durable commit.
    pub(super) fn make_durable(&self) -> Result<(), StoreError> {
        self.begin(true)?.commit().map_err(err)
    }

    fn put(tx: &redb::WriteTransaction, b: &LogBatch<'_>) -> Result<(), StoreError> {
        {
            let mut usage = tx.open_table(USAGE).map_err(err)?;
            for (hash, v) in &b.values {
                usage
                    .insert(log_key(hash, b.bseq).as_slice(), *v)
                    .map_err(err)?;
            }
            let mut batches = tx.open_table(BATCHES).map_err(err)?;
            batches.insert(b.bseq, b.index).map_err(err)?;
        }
        Ok(())
    }

    /// A key's usage records, newest first, skipping `offset`.
    pub(super) fn usage(
        &self,
        hash: &KeyHash,
        offset: usize,
        limit: usize,
    ) -> Result<Vec<UsageRecord>, StoreError> {
        let mut out = Vec::new();
        let tx = self.db.begin_read().map_err(err)?;
        let t = match tx.open_table(USAGE) {
            Ok(t) => t,
            Err(redb::TableError::TableDoesNotExist(_)) => return Ok(out),
            Err(e) => return Err(err(e)),
        };
        let (lo, hi) = key_range(hash);
        let mut skip = offset as u64;
        for item in t.range(lo.as_slice()..=hi.as_slice()).map_err(err)? {
            if out.len() >= limit {
                break;
            }
            let (_, v) = item.map_err(err)?;
            let v = v.value();
            let count = usage_batch_count(v)?;
            if skip >= count {
                skip -= count;
                continue;
            }
            let recs = decode_usage_batch(v, hash)?;
            let room = limit - out.len();
            out.extend(recs.into_iter().rev().skip(skip as usize).take(room));
            skip = 0;
        }
        Ok(out)
    }

    /// How many of a key's records retention removed.
    pub(super) fn pruned(&self, hash: &KeyHash) -> Result<u64, StoreError> {
        let tx = self.db.begin_read().map_err(err)?;
        let t = match tx.open_table(PRUNED) {
            Ok(t) => t,
            Err(redb::TableError::TableDoesNotExist(_)) => return Ok(0),
            Err(e) => return Err(err(e)),
        };
        Ok(t.get(hash.as_slice())
            .map_err(err)?
            .map_or(0, |v| v.value()))
    }

    /// Batch indexes in batch order, from `from` on, at most `n`.
    pub(super) fn batches(
        &self,
        from: u64,
        n: usize,
    ) -> Result<Vec<(u64, BatchIndex)>, StoreError> {
        let tx = self.db.begin_read().map_err(err)?;
        let t = match tx.open_table(BATCHES) {
            Ok(t) => t,
            Err(redb::TableError::TableDoesNotExist(_)) => return Ok(Vec::new()),
            Err(e) => return Err(err(e)),
        };
        let mut out = Vec::new();
        for item in t.range(from..).map_err(err)?.take(n) {
            let (k, v) = item.map_err(err)?;
            out.push((k.value(), decode_batch_index(v.value())?));
        }
        Ok(out)
    }

    /// One key's encoded records of one batch.
    pub(super) fn value(&self, hash: &KeyHash, bseq: u64) -> Result<Option<Vec<u8>>, StoreError> {
        let tx = self.db.begin_read().map_err(err)?;
        let t = tx.open_table(USAGE).map_err(err)?;
        Ok(t.get(log_key(hash, bseq).as_slice())
            .map_err(err)?
            .map(|v| v.value().to_vec()))
    }

    /// Applies retention edits and raises the pruned counts, atomically
    /// and durably.
    pub(super) fn prune(
        &self,
        edits: &[PruneEdit],
        pruned: &[(KeyHash, u64)],
    ) -> Result<(), StoreError> {
        let tx = self.begin(true)?;
        {
            let mut usage = tx.open_table(USAGE).map_err(err)?;
            let mut batches = tx.open_table(BATCHES).map_err(err)?;
            let mut counts = tx.open_table(PRUNED).map_err(err)?;
            for e in edits {
                match e {
                    PruneEdit::Drop { bseq, keys } => {
                        for h in keys {
                            usage.remove(log_key(h, *bseq).as_slice()).map_err(err)?;
                        }
                        batches.remove(*bseq).map_err(err)?;
                    }
                    PruneEdit::Rewrite {
                        bseq,
                        replace,
                        remove,
                        index,
                    } => {
                        for (h, v) in replace {
                            usage
                                .insert(log_key(h, *bseq).as_slice(), v.as_slice())
                                .map_err(err)?;
                        }
                        for h in remove {
                            usage.remove(log_key(h, *bseq).as_slice()).map_err(err)?;
                        }
                        match index {
                            Some(i) => {
                                batches.insert(*bseq, i.as_slice()).map_err(err)?;
                            }
                            None => {
                                batches.remove(*bseq).map_err(err)?;
                            }
                        }
                    }
                }
            }
            for (h, n) in pruned {
                let before = counts
                    .get(h.as_slice())
                    .map_err(err)?
                    .map_or(0, |v| v.value());
                counts
                    .insert(h.as_slice(), before.saturating_add(*n))
                    .map_err(err)?;
            }
        }
        tx.commit().map_err(err)
    }
}
