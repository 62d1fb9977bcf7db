//! The on-disk encoding of everything `store` writes, private to `store`.
//!
//! What is written per request (accounts, usage batches, rollups, the batch
//! index) is a compact hand-written binary form: a leading format byte, then
//! LEB128 varints (zigzag for signed values) and length-prefixed strings.
//! The rare admin-written values (key records, ledger entries) are JSON
//! through private mirror structs, so the public types carry no serde derive
//! and the API's JSON shape can change without touching the disk.

use serde::{Deserialize, Serialize};

use super::{
    Account, KeyHash, KeyRecord, LedgerEntry, LedgerKind, Rollup, StoreError, UsageRecord,
};
use crate::clock::Period;
use crate::money::Pico;

/// First byte of every binary value; bumped together with the schema
/// version when a layout changes.
const FORMAT: u8 = 1;

/// Format of usage batches and rollups that carry cache-write tokens (after
/// every field of format 1, so format-1 values still read, as 0 writes).
const FORMAT_CACHE_WRITES: u8 = 2;

/// Appends values to a buffer.
pub(super) struct Writer<'a>(pub(super) &'a mut Vec<u8>);

impl Writer<'_> {
    pub(super) fn u8(&mut self, v: u8) {
        self.0.push(v);
    }

    pub(super) fn u64(&mut self, mut v: u64) {
        while v >= 0x80 {
            self.0.push((v as u8) | 0x80);
            v >>= 7;
        }
        self.0.push(v as u8);
    }

    pub(super) fn i64(&mut self, v: i64) {
        self.u64(((v << 1) ^ (v >> 63)) as u64);
    }

    pub(super) fn str(&mut self, s: &str) {
        self.u64(s.len() as u64);
        self.0.extend_from_slice(s.as_bytes());
    }
}

/// Reads values back; every read is bounds-checked and fails as `Corrupt`.
pub(super) struct Reader<'a> {
    bytes: &'a [u8],
    what: &'static str,
}

impl<'a> Reader<'a> {
    pub(super) fn new(bytes: &'a [u8], what: &'static str) -> Reader<'a> {
        Reader { bytes, what }
    }

    fn corrupt(&self) -> StoreError {
        StoreError::Corrupt(format!("truncated or malformed {}", self.what))
    }

    pub(super) fn u8(&mut self) -> Result<u8, StoreError> {
        let (&b, rest) = self.bytes.split_first().ok_or_else(|| self.corrupt())?;
        self.bytes = rest;
        Ok(b)
    }

    pub(super) fn u64(&mut self) -> Result<u64, StoreError> {
        let mut v: u64 = 0;
        for shift in (0..64).step_by(7) {
            let b = self.u8()?;
            v |= u64::from(b & 0x7f) << shift;
            if b & 0x80 == 0 {
                return Ok(v);
            }
        }
        Err(self.corrupt())
    }

    pub(super) fn i64(&mut self) -> Result<i64, StoreError> {
        let v = self.u64()?;
        Ok(((v >> 1) as i64) ^ -((v & 1) as i64))
    }

    pub(super) fn u32(&mut self) -> Result<u32, StoreError> {
        u32::try_from(self.u64()?).map_err(|_| self.corrupt())
    }

    pub(super) fn str(&mut self) -> Result<String, StoreError> {
        let len = self.u64()?;
        let s = self.bytes(len)?;
        String::from_utf8(s.to_vec()).map_err(|_| self.corrupt())
    }

    /// The next `len` bytes.
    pub(super) fn bytes(&mut self, len: u64) -> Result<&'a [u8], StoreError> {
        let len = usize::try_from(len).map_err(|_| self.corrupt())?;
        if len > self.bytes.len() {
            return Err(self.corrupt());
        }
        let (s, rest) = self.bytes.split_at(len);
        self.bytes = rest;
        Ok(s)
    }

    pub(super) fn hash(&mut self) -> Result<KeyHash, StoreError> {
        if self.bytes.len() < 32 {
            return Err(self.corrupt());
        }
        let (h, rest) = self.bytes.split_at(32);
        self.bytes = rest;
        h.try_into().map_err(|_| self.corrupt())
    }

    pub(super) fn format(&mut self) -> Result<(), StoreError> {
        let f = self.u8()?;
        if f != FORMAT {
            return Err(StoreError::Corrupt(format!(
                "{} has format {f}, expected {FORMAT}",
                self.what
            )));
        }
        Ok(())
    }

    /// The format byte of a value that may be written in `FORMAT` or in
    /// the newer `FORMAT_CACHE_WRITES`.
    fn format_up_to_cache_writes(&mut self) -> Result<u8, StoreError> {
        let f = self.u8()?;
        if f != FORMAT && f != FORMAT_CACHE_WRITES {
            return Err(StoreError::Corrupt(format!(
                "{} has format {f}, expected {FORMAT} or {FORMAT_CACHE_WRITES}",
                self.what
            )));
        }
        Ok(f)
    }

    pub(super) fn is_empty(&self) -> bool {
        self.bytes.is_empty()
    }
}

// ---- i64 in keys: big-endian with the sign bit flipped sorts numerically ----

pub(super) fn ord_i64(v: i64) -> [u8; 8] {
    ((v as u64) ^ (1 << 63)).to_be_bytes()
}

pub(super) fn from_ord_i64(b: &[u8]) -> Option<i64> {
    let a: [u8; 8] = b.get(..8)?.try_into().ok()?;
    Some((u64::from_be_bytes(a) ^ (1 << 63)) as i64)
}

// ---- Account (+ the key's limit_reset, so one read serves the store thread) ----

pub(super) fn period_code(p: Option<Period>) -> u8 {
    match p {
        None => 0,
        Some(Period::Daily) => 1,
        Some(Period::Weekly) => 2,
        Some(Period::Monthly) => 3,
    }
}

fn period_from_code(c: u8) -> Result<Option<Period>, StoreError> {
    Ok(match c {
        0 => None,
        1 => Some(Period::Daily),
        2 => Some(Period::Weekly),
        3 => Some(Period::Monthly),
        _ => return Err(StoreError::Corrupt(format!("unknown limit_reset code {c}"))),
    })
}

pub(super) fn encode_account(a: &Account, reset: Option<Period>) -> Vec<u8> {
    let mut buf = Vec::with_capacity(40);
    let mut w = Writer(&mut buf);
    w.u8(FORMAT);
    w.u8(period_code(reset));
    match a.limit {
        None => w.u8(0),
        Some(l) => {
            w.u8(1);
            w.i64(l.0);
        }
    }
    w.i64(a.spent.0);
    w.i64(a.period);
    w.i64(a.period_spent.0);
    w.u64(a.requests);
    w.i64(a.fee_day);
    w.u64(a.ledger_seq);
    buf
}

pub(super) fn decode_account(bytes: &[u8]) -> Result<(Account, Option<Period>), StoreError> {
    let mut r = Reader::new(bytes, "account");
    r.format()?;
    let reset = period_from_code(r.u8()?)?;
    let limit = match r.u8()? {
        0 => None,
        _ => Some(Pico(r.i64()?)),
    };
    let a = Account {
        limit,
        spent: Pico(r.i64()?),
        period: r.i64()?,
        period_spent: Pico(r.i64()?),
        requests: r.u64()?,
        fee_day: r.i64()?,
        ledger_seq: r.u64()?,
    };
    Ok((a, reset))
}

// ---- usage batches: [format][count] then records, oldest first ----

/// Appends one record (its key is in the sled key, not repeated here).
pub(super) fn put_usage(buf: &mut Vec<u8>, rec: &UsageRecord) {
    let mut w = Writer(buf);
    w.i64(rec.at_ms);
    w.str(&rec.model);
    w.str(&rec.upstream);
    w.str(&rec.route);
    w.u8(u8::from(rec.stream) | (u8::from(rec.estimated) << 1));
    w.u64(u64::from(rec.status));
    w.u64(rec.prompt_tokens);
    w.u64(rec.cached_tokens);
    w.u64(rec.completion_tokens);
    w.u64(rec.reasoning_tokens);
    w.i64(rec.cost.0);
    w.i64(rec.reserved.0);
    w.u64(u64::from(rec.latency_ms));
    w.u64(u64::from(rec.ttfb_ms));
    w.str(&rec.request_id);
    w.str(&rec.client_ip);
    w.u64(rec.cache_write_tokens);
}

/// The count written in front of a batch's records; lets readers skip a
/// whole batch without decoding it.
pub(super) fn finish_usage_batch(count: u64, records: &[u8]) -> Vec<u8> {
    let mut buf = Vec::with_capacity(records.len() + 11);
    let mut w = Writer(&mut buf);
    w.u8(FORMAT_CACHE_WRITES);
    w.u64(count);
    buf.extend_from_slice(records);
    buf
}

pub(super) fn usage_batch_count(bytes: &[u8]) -> Result<u64, StoreError> {
    let mut r = Reader::new(bytes, "usage batch");
    r.format_up_to_cache_writes()?;
    r.u64()
}

pub(super) fn decode_usage_batch(
    bytes: &[u8],
    key: &KeyHash,
) -> Result<Vec<UsageRecord>, StoreError> {
    let mut r = Reader::new(bytes, "usage batch");
    let format = r.format_up_to_cache_writes()?;
    let count = r.u64()?;
    let mut out = Vec::with_capacity(count.min(4096) as usize);
    for _ in 0..count {
        let at_ms = r.i64()?;
        let model = r.str()?;
        let upstream = r.str()?;
        let route = r.str()?;
        let flags = r.u8()?;
        let status = u16::try_from(r.u64()?)
            .map_err(|_| StoreError::Corrupt("usage status out of range".into()))?;
        let mut rec = UsageRecord {
            at_ms,
            key: *key,
            model,
            upstream,
            route,
            stream: flags & 1 != 0,
            estimated: flags & 2 != 0,
            status,
            prompt_tokens: r.u64()?,
            cached_tokens: r.u64()?,
            completion_tokens: r.u64()?,
            reasoning_tokens: r.u64()?,
            cost: Pico(r.i64()?),
            reserved: Pico(r.i64()?),
            latency_ms: r.u32()?,
            ttfb_ms: r.u32()?,
            request_id: r.str()?,
            client_ip: r.str()?,
            // Written as a ledger entry, not in the record.
            daily_fee: Pico::ZERO,
            account: None,
            cache_write_tokens: 0,
        };
        if format >= FORMAT_CACHE_WRITES {
            rec.cache_write_tokens = r.u64()?;
        }
        out.push(rec);
    }
    Ok(out)
}

// ---- rollups ----

pub(super) fn encode_rollup(r: &Rollup) -> Vec<u8> {
    let mut buf = Vec::with_capacity(32);
    let mut w = Writer(&mut buf);
    w.u8(FORMAT_CACHE_WRITES);
    w.u64(r.requests);
    w.u64(r.prompt_tokens);
    w.u64(r.cached_tokens);
    w.u64(r.completion_tokens);
    w.u64(r.reasoning_tokens);
    w.i64(r.cost.0);
    w.u64(r.latency_ms_sum);
    w.u64(r.errors);
    w.u64(r.estimated);
    w.u64(r.cache_write_tokens);
    buf
}

pub(super) fn decode_rollup(bytes: &[u8]) -> Result<Rollup, StoreError> {
    let mut r = Reader::new(bytes, "rollup");
    let format = r.format_up_to_cache_writes()?;
    let mut rollup = Rollup {
        requests: r.u64()?,
        prompt_tokens: r.u64()?,
        cached_tokens: r.u64()?,
        completion_tokens: r.u64()?,
        reasoning_tokens: r.u64()?,
        cost: Pico(r.i64()?),
        latency_ms_sum: r.u64()?,
        errors: r.u64()?,
        estimated: r.u64()?,
        cache_write_tokens: 0,
    };
    if format >= FORMAT_CACHE_WRITES {
        rollup.cache_write_tokens = r.u64()?;
    }
    Ok(rollup)
}

pub(super) fn add_rollup(into: &mut Rollup, d: &Rollup) {
    into.requests = into.requests.saturating_add(d.requests);
    into.prompt_tokens = into.prompt_tokens.saturating_add(d.prompt_tokens);
    into.cached_tokens = into.cached_tokens.saturating_add(d.cached_tokens);
    into.completion_tokens = into.completion_tokens.saturating_add(d.completion_tokens);
    into.reasoning_tokens = into.reasoning_tokens.saturating_add(d.reasoning_tokens);
    into.cost = into.cost.saturating_add(d.cost);
    into.latency_ms_sum = into.latency_ms_sum.saturating_add(d.latency_ms_sum);
    into.errors = into.errors.saturating_add(d.errors);
    into.estimated = into.estimated.saturating_add(d.estimated);
    into.cache_write_tokens = into.cache_write_tokens.saturating_add(d.cache_write_tokens);
}

// ---- the batch index: which keys a usage batch wrote, for retention ----

/// One committed usage batch, found by retention without scanning records.
pub(super) struct BatchIndex {
    /// Oldest and newest `at_ms` still held by the batch.
    pub(super) min_at: i64,
    pub(super) max_at: i64,
    /// Keys the batch wrote a usage value for, with how many records each.
    pub(super) keys: Vec<(KeyHash, u64)>,
}

pub(super) fn encode_batch_index(b: &BatchIndex) -> Vec<u8> {
    let mut buf = Vec::with_capacity(32 + b.keys.len() * 34);
    let mut w = Writer(&mut buf);
    w.u8(FORMAT);
    w.i64(b.min_at);
    w.i64(b.max_at);
    w.u64(b.keys.len() as u64);
    for (hash, n) in &b.keys {
        w.0.extend_from_slice(hash);
        w.u64(*n);
    }
    buf
}

pub(super) fn decode_batch_index(bytes: &[u8]) -> Result<BatchIndex, StoreError> {
    let mut r = Reader::new(bytes, "batch index");
    r.format()?;
    let min_at = r.i64()?;
    let max_at = r.i64()?;
    let n = r.u64()?;
    let mut keys = Vec::with_capacity(n.min(65_536) as usize);
    for _ in 0..n {
        keys.push((r.hash()?, r.u64()?));
    }
    Ok(BatchIndex {
        min_at,
        max_at,
        keys,
    })
}

/// One usage batch as the tail keeps it in sled (see [`super::log`]):
/// its number, each key's encoded records, its encoded index.
pub(super) struct TailBatch {
    pub(super) bseq: u64,
    pub(super) values: Vec<(KeyHash, Vec<u8>)>,
    pub(super) index: Vec<u8>,
}

/// Encodes a batch for the tail: format byte, the number of values, each
/// value as hash + length + bytes, then the index as length + bytes.
pub(super) fn encode_tail<'a>(
    values: impl ExactSizeIterator<Item = (&'a KeyHash, &'a [u8])>,
    index: &[u8],
) -> Vec<u8> {
    let mut buf = Vec::new();
    let mut w = Writer(&mut buf);
    w.u8(FORMAT);
    w.u64(values.len() as u64);
    for (hash, v) in values {
        w.0.extend_from_slice(hash);
        w.u64(v.len() as u64);
        w.0.extend_from_slice(v);
    }
    w.u64(index.len() as u64);
    w.0.extend_from_slice(index);
    buf
}

pub(super) fn decode_tail(bseq: u64, bytes: &[u8]) -> Result<TailBatch, StoreError> {
    let mut r = Reader::new(bytes, "usage log tail");
    r.format()?;
    let n = r.u64()?;
    let mut values = Vec::with_capacity(n.min(65_536) as usize);
    for _ in 0..n {
        let hash = r.hash()?;
        let len = r.u64()?;
        values.push((hash, r.bytes(len)?.to_vec()));
    }
    let len = r.u64()?;
    let index = r.bytes(len)?.to_vec();
    if !r.is_empty() {
        return Err(StoreError::Corrupt("usage log tail: trailing bytes".into()));
    }
    Ok(TailBatch {
        bseq,
        values,
        index,
    })
}

// ---- key records and ledger entries: JSON through mirror structs ----

#[derive(Serialize, Deserialize)]
struct KeyRecordDisk {
    name: String,
    label: String,
    owner: Option<String>,
    plan: Option<String>,
    disabled: bool,
    created_at: i64,
    updated_at: i64,
    expires_at: Option<i64>,
    limit_reset: Option<Period>,
    max_requests: Option<u64>,
    rpm: Option<u32>,
    tpm: Option<u64>,
    concurrency: Option<u32>,
    #[serde(default)]
    models: Vec<String>,
    #[serde(default)]
    allowed_ips: Vec<String>,
    max_devices: Option<u32>,
    #[serde(default)]
    devices: Vec<String>,
    /// picoUSD as an integer: `Pico`'s own serde form is decimal text.
    daily_fee: Option<i64>,
    metadata: Option<String>,
    #[serde(default)]
    imported: bool,
    /// picoUSD; absent in records written before it existed.
    #[serde(default)]
    low_balance_alert: Option<i64>,
}

pub(super) fn encode_key(r: &KeyRecord) -> Vec<u8> {
    let d = KeyRecordDisk {
        name: r.name.clone(),
        label: r.label.clone(),
        owner: r.owner.clone(),
        plan: r.plan.clone(),
        disabled: r.disabled,
        created_at: r.created_at,
        updated_at: r.updated_at,
        expires_at: r.expires_at,
        limit_reset: r.limit_reset,
        max_requests: r.max_requests,
        rpm: r.rpm,
        tpm: r.tpm,
        concurrency: r.concurrency,
        models: r.models.clone(),
        allowed_ips: r.allowed_ips.clone(),
        max_devices: r.max_devices,
        devices: r.devices.clone(),
        daily_fee: r.daily_fee.map(|p| p.0),
        metadata: r.metadata.clone(),
        imported: r.imported,
        low_balance_alert: r.low_balance_alert.map(|p| p.0),
    };
    serde_json::to_vec(&d).expect("a struct of strings and integers always serializes")
}

pub(super) fn decode_key(hash: &KeyHash, bytes: &[u8]) -> Result<KeyRecord, StoreError> {
    let d: KeyRecordDisk = serde_json::from_slice(bytes)
        .map_err(|e| StoreError::Corrupt(format!("key record {}: {e}", hex::encode(hash))))?;
    Ok(KeyRecord {
        hash: *hash,
        name: d.name,
        label: d.label,
        owner: d.owner,
        plan: d.plan,
        disabled: d.disabled,
        created_at: d.created_at,
        updated_at: d.updated_at,
        expires_at: d.expires_at,
        limit_reset: d.limit_reset,
        max_requests: d.max_requests,
        rpm: d.rpm,
        tpm: d.tpm,
        concurrency: d.concurrency,
        models: d.models,
        allowed_ips: d.allowed_ips,
        max_devices: d.max_devices,
        devices: d.devices,
        daily_fee: d.daily_fee.map(Pico),
        metadata: d.metadata,
        imported: d.imported,
        low_balance_alert: d.low_balance_alert.map(Pico),
    })
}

#[derive(Serialize, Deserialize)]
struct LedgerEntryDisk {
    seq: u64,
    at_ms: i64,
    kind: String,
    amount: i64,
    reason: String,
    idempotency_key: Option<String>,
    limit_after: Option<i64>,
    spent_after: i64,
}

pub(super) fn encode_ledger(e: &LedgerEntry) -> Vec<u8> {
    let d = LedgerEntryDisk {
        seq: e.seq,
        at_ms: e.at_ms,
        kind: e.kind.as_str().to_owned(),
        amount: e.amount.0,
        reason: e.reason.clone(),
        idempotency_key: e.idempotency_key.clone(),
        limit_after: e.limit_after.map(|p| p.0),
        spent_after: e.spent_after.0,
    };
    serde_json::to_vec(&d).expect("a struct of strings and integers always serializes")
}

pub(super) fn decode_ledger(bytes: &[u8]) -> Result<LedgerEntry, StoreError> {
    let d: LedgerEntryDisk = serde_json::from_slice(bytes)
        .map_err(|e| StoreError::Corrupt(format!("ledger entry: {e}")))?;
    let kind = LedgerKind::parse(&d.kind)
        .ok_or_else(|| StoreError::Corrupt(format!("ledger kind {:?}", d.kind)))?;
    Ok(LedgerEntry {
        seq: d.seq,
        at_ms: d.at_ms,
        kind,
        amount: Pico(d.amount),
        reason: d.reason,
        idempotency_key: d.idempotency_key,
        limit_after: d.limit_after.map(Pico),
        spent_after: Pico(d.spent_after),
    })
}

// ---- user accounts and their ledger: JSON, read once per batch ----

pub(super) fn encode_user_account(a: &super::records::AccountRecord) -> Vec<u8> {
    serde_json::to_vec(a).unwrap_or_default()
}

pub(super) fn decode_user_account(
    bytes: &[u8],
) -> Result<super::records::AccountRecord, StoreError> {
    serde_json::from_slice(bytes).map_err(|e| StoreError::Corrupt(format!("account: {e}")))
}

pub(super) fn encode_account_entry(e: &super::records::AccountLedgerEntry) -> Vec<u8> {
    serde_json::to_vec(e).unwrap_or_default()
}

pub(super) fn decode_account_entry(
    bytes: &[u8],
) -> Result<super::records::AccountLedgerEntry, StoreError> {
    serde_json::from_slice(bytes).map_err(|e| StoreError::Corrupt(format!("account ledger: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn varints_round_trip() {
        let mut buf = Vec::new();
        let mut w = Writer(&mut buf);
        for v in [0i64, 1, -1, 63, -64, i64::MAX, i64::MIN, 1 << 40] {
            w.i64(v);
        }
        w.u64(u64::MAX);
        let mut r = Reader::new(&buf, "test");
        for v in [0i64, 1, -1, 63, -64, i64::MAX, i64::MIN, 1 << 40] {
            assert_eq!(r.i64().unwrap(), v);
        }
        assert_eq!(r.u64().unwrap(), u64::MAX);
        assert!(r.is_empty());
        assert!(r.u8().is_err());
    }

    #[test]
    fn format_one_usage_and_rollups_still_read() {
        let rec = UsageRecord {
            at_ms: 5,
            key: [7; 32],
            model: "claude-sonnet-4-5".into(),
            upstream: "claude".into(),
            route: "messages".into(),
            stream: true,
            status: 200,
            prompt_tokens: 1120,
            cached_tokens: 1000,
            completion_tokens: 8,
            reasoning_tokens: 0,
            cost: Pico(9),
            reserved: Pico(10),
            latency_ms: 3,
            ttfb_ms: 1,
            request_id: "req".into(),
            client_ip: "::1".into(),
            estimated: false,
            daily_fee: Pico::ZERO,
            account: None,
            cache_write_tokens: 100,
        };
        let mut buf = Vec::new();
        put_usage(&mut buf, &rec);
        let batch = finish_usage_batch(1, &buf);
        assert_eq!(
            decode_usage_batch(&batch, &[7; 32]).unwrap(),
            std::slice::from_ref(&rec)
        );
        // A format-1 batch: the same record without the trailing field.
        let mut old = batch.clone();
        old[0] = FORMAT;
        old.pop();
        let back = decode_usage_batch(&old, &[7; 32]).unwrap();
        assert_eq!(back[0].cache_write_tokens, 0);
        assert_eq!(back[0].cached_tokens, 1000);
        assert_eq!(usage_batch_count(&old).unwrap(), 1);
        let r = Rollup {
            requests: 2,
            prompt_tokens: 30,
            cache_write_tokens: 12,
            ..Rollup::default()
        };
        assert_eq!(decode_rollup(&encode_rollup(&r)).unwrap(), r);
        let mut old = encode_rollup(&r);
        old[0] = FORMAT;
        old.pop();
        let back = decode_rollup(&old).unwrap();
        assert_eq!((back.requests, back.cache_write_tokens), (2, 0));
        old[0] = 9;
        assert!(decode_rollup(&old).is_err());
    }

    #[test]
    fn ordered_i64_sorts_numerically() {
        let mut v = [-5i64, 3, i64::MIN, 0, -1, i64::MAX];
        let mut enc: Vec<_> = v.iter().map(|x| ord_i64(*x)).collect();
        enc.sort();
        v.sort();
        let back: Vec<_> = enc.iter().map(|b| from_ord_i64(b).unwrap()).collect();
        assert_eq!(back, v);
    }

    #[test]
    fn account_round_trip_and_truncation() {
        let a = Account {
            limit: Some(Pico(-3)),
            spent: Pico(123_456_789),
            period: 20_000,
            period_spent: Pico(7),
            requests: 99,
            fee_day: -1,
            ledger_seq: 4,
        };
        let bytes = encode_account(&a, Some(Period::Weekly));
        assert_eq!(decode_account(&bytes).unwrap(), (a, Some(Period::Weekly)));
        for cut in 0..bytes.len() {
            assert!(decode_account(&bytes[..cut]).is_err());
        }
    }
}
