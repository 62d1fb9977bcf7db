//! Ledger entries on their way to the cluster's database (`[cluster]`
//! mode ships each node's key and account ledgers to `tollgate_ledger`).
//!
//! Every ledger entry is written with a `J` mark (the `J` byte, then the
//! entry's own `l` or `L` key) in the same batch, so after a crash an entry
//! and its mark are both on disk or neither. The marks are the shipping
//! cursor: the cluster reads them ([`Store::unshipped_ledger`]), writes the
//! entries to the database (idempotent per entry id), then removes them
//! ([`Store::ledger_shipped`]). A restart ships only what is still marked,
//! and a store made again from nothing starts with nothing marked. Marks
//! are written in cluster mode only ([`Store::set_clustered`]): a single
//! node's store is as it was.
//!
//! Entries written without marks (by a build without them) are shipped
//! once by a full scan ([`Store::ledger_page`]), after which
//! [`Store::set_ledger_backfilled`] records that it need not run again.

use std::ops::Bound;

use sled::IVec;

use super::codec::{decode_account_entry, decode_ledger};
use super::records::{AccountLedgerEntry, KeyHash, LedgerEntry};
use super::{Store, StoreError};

/// `book` row saying every entry older than the `J` marks was shipped.
const BACKFILLED_KEY: &[u8] = b"mledger_backfilled";

/// One entry of a local ledger, with what it belongs to.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum LocalLedgerEntry {
    /// An entry of a key's ledger.
    Key(KeyHash, LedgerEntry),
    /// An entry of an account's ledger.
    Account(String, AccountLedgerEntry),
}

impl LocalLedgerEntry {
    /// Its seq in its key's or account's ledger on this node.
    pub fn seq(&self) -> u64 {
        match self {
            LocalLedgerEntry::Key(_, e) => e.seq,
            LocalLedgerEntry::Account(_, e) => e.seq,
        }
    }

    /// When it was applied (Unix ms).
    pub fn at_ms(&self) -> i64 {
        match self {
            LocalLedgerEntry::Key(_, e) => e.at_ms,
            LocalLedgerEntry::Account(_, e) => e.at_ms,
        }
    }
}

/// An entry not yet shipped, and its mark (to remove once it is).
#[derive(Clone, Debug)]
pub struct Unshipped {
    /// The `J` row.
    mark: IVec,
    /// Its value when read: the mark is removed only if it still holds it.
    stamp: IVec,
    /// The entry to ship.
    pub entry: LocalLedgerEntry,
}

/// Where [`Store::ledger_page`] goes on from (the start by default).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct LedgerCursor(Option<Vec<u8>>);

/// The entry stored at `key` (an `l` or `L` row), `None` for any other row.
fn decode_entry(key: &[u8], value: &[u8]) -> Result<Option<LocalLedgerEntry>, StoreError> {
    let corrupt = || StoreError::Corrupt("ledger key".into());
    match key.first() {
        Some(b'l') => {
            let hash: KeyHash = key
                .get(1..33)
                .ok_or_else(corrupt)?
                .try_into()
                .map_err(|_| corrupt())?;
            Ok(Some(LocalLedgerEntry::Key(hash, decode_ledger(value)?)))
        }
        Some(b'L') => {
            let len = u16::from_be_bytes(
                key.get(1..3)
                    .ok_or_else(corrupt)?
                    .try_into()
                    .map_err(|_| corrupt())?,
            ) as usize;
            let id = key.get(3..3 + len).ok_or_else(corrupt)?;
            let id = std::str::from_utf8(id).map_err(|_| corrupt())?.to_owned();
            Ok(Some(LocalLedgerEntry::Account(
                id,
                decode_account_entry(value)?,
            )))
        }
        _ => Ok(None),
    }
}

impl Store {
    /// Up to `limit` entries not yet shipped, in key order. A mark whose
    /// entry is gone has nothing to ship and is removed here.
    pub fn unshipped_ledger(&self, limit: usize) -> Result<Vec<Unshipped>, StoreError> {
        let book = &self.inner.book;
        let mut out = Vec::new();
        for item in book.scan_prefix([b'J']) {
            if out.len() >= limit {
                break;
            }
            let (mark, stamp) = item?;
            let entry = match book.get(&mark[1..])? {
                Some(v) => decode_entry(&mark[1..], &v)?,
                None => None,
            };
            match entry {
                Some(entry) => out.push(Unshipped { mark, stamp, entry }),
                // The entry is gone (or the mark is not one): nothing to ship.
                None => {
                    let _ = book.compare_and_swap(&mark, Some(&stamp), None::<&[u8]>)?;
                }
            }
        }
        Ok(out)
    }

    /// Removes the marks of `shipped` (they are in the database). A mark
    /// rewritten since it was read (a newer entry at the same key) stays.
    pub fn ledger_shipped(&self, shipped: &[Unshipped]) -> Result<(), StoreError> {
        for u in shipped {
            // Err(CompareAndSwapError): rewritten meanwhile, shipped next time.
            let _ = self
                .inner
                .book
                .compare_and_swap(&u.mark, Some(&u.stamp), None::<&[u8]>)?;
        }
        Ok(())
    }

    /// Up to `limit` entries of every key's and account's ledger from
    /// `from`, in key order, and where to go on (`None`: that was all).
    pub fn ledger_page(
        &self,
        from: &LedgerCursor,
        limit: usize,
    ) -> Result<(Vec<LocalLedgerEntry>, Option<LedgerCursor>), StoreError> {
        let book = &self.inner.book;
        let mut out = Vec::new();
        // Account entries (`L`) come before key entries (`l`); the rows
        // between the two tags are skipped with one jump.
        let mut start = match &from.0 {
            Some(k) => Bound::Excluded(k.clone()),
            None => Bound::Included(vec![b'L']),
        };
        loop {
            let mut jump = None;
            for item in book.range((start.clone(), Bound::Unbounded)) {
                let (k, v) = item?;
                match k.first().copied() {
                    Some(b'L') | Some(b'l') => {
                        if let Some(e) = decode_entry(&k, &v)? {
                            out.push(e);
                        }
                        if out.len() >= limit {
                            return Ok((out, Some(LedgerCursor(Some(k.to_vec())))));
                        }
                    }
                    Some(t) if t < b'l' => {
                        jump = Some(vec![b'l']);
                        break;
                    }
                    _ => break,
                }
            }
            match jump {
                Some(k) => start = Bound::Included(k),
                None => return Ok((out, None)),
            }
        }
    }

    /// Whether the entries from before the `J` marks have been shipped.
    pub fn ledger_backfilled(&self) -> Result<bool, StoreError> {
        Ok(self.inner.book.get(BACKFILLED_KEY)?.is_some())
    }

    /// Records that they have.
    pub fn set_ledger_backfilled(&self) -> Result<(), StoreError> {
        self.inner.book.insert(BACKFILLED_KEY, &[1u8][..])?;
        Ok(())
    }
}
