//! Key layout of the sled trees, and the builders of those keys.
//!
//! | tree | key | value |
//! |---|---|---|
//! | `meta` | `schema` | u32 LE schema version, checked at open |
//! | `keys` | `k` hash | key record (JSON) |
//! | `keys` | `c` ord(created_at) hash | empty: the listing order |
//! | `keys` | `n` | u64 LE number of keys (open must not count them) |
//! | `owners` | u16 len, owner, u16 len, plan, hash | `[disabled]` |
//! | `book` | `a` hash | account + the key's `limit_reset` (binary) |
//! | `book` | `l` hash seq | ledger entry (JSON) |
//! | `book` | `i` hash idempotency-key | ledger seq (u64 BE) |
//! | `book` | `R` hash ord(hour) model | per-key hourly rollup (binary) |
//! | `book` | `G` ord(hour) model | gateway hourly rollup (binary) |
//! | `book` | `m` `next_bseq` | u64 BE: one past the last usage batch counted, written with each batch |
//! | `book` | `A` id | user account: profile and wallet (JSON) |
//! | `book` | `L` u16 len, id, seq | account ledger entry (JSON) |
//! | `book` | `I` u16 len, id, idempotency-key | account ledger seq (u64 BE) |
//! | `book` | `P` payment id | payment record (JSON), see [`super::payments`] |
//! | `book` | `Q` u16 len, provider, provider ref | payment id: the ref applied once |
//! | `book` | `O` out_trade_no | epay order (JSON) |
//! | `book` | `N` id (u64 BE) | key hash: a key's stable integer id ([`super::compat`]) |
//! | `book` | `X` hash | that id (u64 BE) |
//! | `book` | `S` id | subscription (JSON) |
//! | `book` | `T` u16 len, sid, `g`/`u` period (u64 BE) [plan] | empty: that grant was applied |
//! | `book` | `T` u16 len, sid, `r` idempotency-key | u64 BE: the period the renewal paid |
//! | `book` | `E` seq / `U` seq / `D` … | outbox events, audit entries, delivery state (see `events.rs`) |
//! | `book` | `W` id | scoped admin token: name, scopes, SHA-256 (JSON; [`super::admin_tokens`]) |
//! | `book` | `J` + the `l` or `L` key of a ledger entry | its `at_ms` (i64 BE): not yet shipped to the cluster's database ([`super::unshipped`]) |
//! | `book` | `Y` seq (u64 BE) | an admin change not yet written to the cluster's database ([`super::unsent`]) |
//! | `book` | `Z` bseq (u64 BE) chunk (u32 BE) | the log's tail: a usage batch not yet durable in the log, in chunks of 16 KB ([`super::log`]) |
//!
//! The usage records themselves, the batch index and the retention counts
//! live in the redb log ([`super::log`]): sled held every inserted value
//! in memory (issue 17).
//!
//! Everything that must agree with everything else about money (accounts,
//! rollups, ledger, idempotency) lives in `book`, so every commit of it is
//! a single atomic `apply_batch`; the batch's usage records are made
//! durable in the log before it, and `next_bseq` in that same sled batch
//! says which log batches count: after a crash, `spent` is always
//! Σ records + Σ ledger. Admin writes that also touch `keys` and
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

use sled::{IVec, Tree};

use super::StoreError;
use super::codec::ord_i64;
use super::records::{KeyHash, KeyRecord};

pub(super) fn prefixed(tag: u8, hash: &KeyHash) -> Vec<u8> {
    let mut k = Vec::with_capacity(1 + 32 + 16);
    k.push(tag);
    k.extend_from_slice(hash);
    k
}

pub(super) fn key_record_key(hash: &KeyHash) -> Vec<u8> {
    prefixed(b'k', hash)
}

pub(super) fn created_key(created_at: i64, hash: &KeyHash) -> Vec<u8> {
    let mut k = Vec::with_capacity(41);
    k.push(b'c');
    k.extend_from_slice(&ord_i64(created_at));
    k.extend_from_slice(hash);
    k
}

pub(super) fn account_key(hash: &KeyHash) -> Vec<u8> {
    prefixed(b'a', hash)
}

pub(super) fn ledger_key(hash: &KeyHash, seq: u64) -> Vec<u8> {
    let mut k = prefixed(b'l', hash);
    k.extend_from_slice(&seq.to_be_bytes());
    k
}

pub(super) fn idempotency_key(hash: &KeyHash, idem: &str) -> Vec<u8> {
    let mut k = prefixed(b'i', hash);
    k.extend_from_slice(idem.as_bytes());
    k
}

pub(super) fn user_account_key(id: &str) -> Vec<u8> {
    let mut k = Vec::with_capacity(1 + id.len());
    k.push(b'A');
    k.extend_from_slice(id.as_bytes());
    k
}

pub(super) fn account_ledger_prefix(id: &str) -> Vec<u8> {
    let mut k = Vec::with_capacity(3 + id.len() + 8);
    k.push(b'L');
    push_len_str(&mut k, id);
    k
}

pub(super) fn account_ledger_key(id: &str, seq: u64) -> Vec<u8> {
    let mut k = account_ledger_prefix(id);
    k.extend_from_slice(&seq.to_be_bytes());
    k
}

pub(super) fn account_idempotency_key(id: &str, idem: &str) -> Vec<u8> {
    let mut k = vec![b'I'];
    push_len_str(&mut k, id);
    k.extend_from_slice(idem.as_bytes());
    k
}

pub(super) const NEXT_BSEQ_KEY: &[u8] = b"mnext_bseq";

/// Tail values are cut into chunks of this size: sled writes a value over
/// a quarter of its segment as a file of its own.
pub(super) const TAIL_CHUNK: usize = 16 * 1024;

/// The `Z` row of one chunk of a tail batch.
pub(super) fn tail_key(bseq: u64, chunk: u32) -> [u8; 13] {
    let mut k = [0u8; 13];
    k[0] = b'Z';
    k[1..9].copy_from_slice(&bseq.to_be_bytes());
    k[9..].copy_from_slice(&chunk.to_be_bytes());
    k
}

/// The tail's batches, each with its chunks joined, in batch order.
pub(super) fn read_tail(book: &Tree) -> Result<Vec<(u64, Vec<u8>)>, StoreError> {
    let mut out: Vec<(u64, Vec<u8>)> = Vec::new();
    for item in book.scan_prefix([b'Z']) {
        let (k, v) = item?;
        let bseq = k
            .get(1..9)
            .and_then(|b| <[u8; 8]>::try_from(b).ok())
            .map(u64::from_be_bytes)
            .filter(|_| k.len() == 13)
            .ok_or_else(|| StoreError::Corrupt("usage log tail key".into()))?;
        match out.last_mut() {
            Some((b, buf)) if *b == bseq => buf.extend_from_slice(&v),
            _ => out.push((bseq, v.to_vec())),
        }
    }
    Ok(out)
}

/// The `J` mark of the ledger entry stored at `ledger_key` (a key's `l`
/// row or an account's `L` row): written in the entry's batch, removed
/// once the entry is in the cluster's database. Its value is the entry's
/// `at_ms`, so that removing it cannot drop a newer entry written at the
/// same key (a deleted account made again starts its seq at 1).
pub(super) fn unshipped_mark(ledger_key: &[u8]) -> Vec<u8> {
    let mut k = Vec::with_capacity(1 + ledger_key.len());
    k.push(b'J');
    k.extend_from_slice(ledger_key);
    k
}

pub(super) fn push_len_str(buf: &mut Vec<u8>, s: &str) {
    // Owner and plan names are short; longer ones are cut in the index only.
    let bytes = &s.as_bytes()[..s.len().min(u16::MAX as usize)];
    buf.extend_from_slice(&(bytes.len() as u16).to_be_bytes());
    buf.extend_from_slice(bytes);
}

pub(super) fn owner_prefix(owner: &str) -> Vec<u8> {
    let mut k = Vec::with_capacity(owner.len() + 40);
    push_len_str(&mut k, owner);
    k
}

/// The owners-index entry of a record, if it has an owner.
pub(super) fn owner_entry(rec: &KeyRecord) -> Option<Vec<u8>> {
    let owner = rec.owner.as_deref()?;
    let mut k = owner_prefix(owner);
    push_len_str(&mut k, rec.plan.as_deref().unwrap_or(""));
    k.extend_from_slice(&rec.hash);
    Some(k)
}

pub(super) fn owner_entry_hash(k: &[u8]) -> Result<KeyHash, StoreError> {
    k.len()
        .checked_sub(32)
        .and_then(|at| k[at..].try_into().ok())
        .ok_or_else(|| StoreError::Corrupt("owners index key".into()))
}

pub(super) fn read_key_count(v: &Option<IVec>) -> Result<u64, StoreError> {
    match v {
        None => Ok(0),
        Some(v) => <[u8; 8]>::try_from(v.as_ref())
            .map(u64::from_le_bytes)
            .map_err(|_| StoreError::Corrupt("key count".into())),
    }
}

/// The next usage batch number: sled writes it with every batch it
/// counts, so log batches at or above it were never counted.
pub(super) fn next_batch_seq(book: &Tree) -> Result<u64, StoreError> {
    match book.get(NEXT_BSEQ_KEY)? {
        Some(v) => <[u8; 8]>::try_from(v.as_ref())
            .map(u64::from_be_bytes)
            .map_err(|_| StoreError::Corrupt("next batch sequence".into())),
        None => Ok(0),
    }
}

pub(super) fn subscription_key(id: &str) -> Vec<u8> {
    let mut k = Vec::with_capacity(1 + id.len());
    k.push(b'S');
    k.extend_from_slice(id.as_bytes());
    k
}

/// `T` marker of one grant: present once that grant was applied.
pub(super) fn grant_marker_key(sid: &str, m: &super::records::SubscriptionMarker) -> Vec<u8> {
    let mut k = vec![b'T'];
    push_len_str(&mut k, sid);
    k.push(m.tag);
    k.extend_from_slice(&m.period.to_be_bytes());
    k.extend_from_slice(m.extra.as_bytes());
    k
}

/// `T` marker of a renewal's idempotency key.
pub(super) fn renewal_marker_key(sid: &str, idem: &str) -> Vec<u8> {
    let mut k = vec![b'T'];
    push_len_str(&mut k, sid);
    k.push(b'r');
    k.extend_from_slice(idem.as_bytes());
    k
}
