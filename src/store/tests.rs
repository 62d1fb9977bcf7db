use std::path::PathBuf;
use std::sync::atomic::AtomicUsize;
use std::time::{SystemTime, UNIX_EPOCH};

use super::*;

fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

use std::collections::HashMap;

use super::thread::charge;
use crate::clock::{DAY_MS, HOUR_MS, Period};

/// A fresh directory under the system temp dir, removed on drop.
struct TempDir(PathBuf);

impl TempDir {
    fn new(name: &str) -> TempDir {
        static N: AtomicUsize = AtomicUsize::new(0);
        let dir = std::env::temp_dir().join(format!(
            "tollgate-store-{name}-{}-{}-{}",
            std::process::id(),
            now_ms(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        TempDir(dir)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn hash(n: u32) -> KeyHash {
    let mut h = [0u8; 32];
    h[..4].copy_from_slice(&n.to_be_bytes());
    h[31] = 0xAB;
    h
}

fn key(n: u32, owner: Option<&str>, plan: Option<&str>) -> KeyRecord {
    KeyRecord {
        hash: hash(n),
        name: format!("key {n}"),
        label: "sk-tg-Ab3…x9Q".into(),
        owner: owner.map(str::to_owned),
        plan: plan.map(str::to_owned),
        disabled: false,
        created_at: 1_000 + i64::from(n),
        updated_at: 1_000 + i64::from(n),
        expires_at: None,
        limit_reset: None,
        max_requests: None,
        rpm: Some(60),
        tpm: None,
        concurrency: None,
        models: vec!["gpt-*".into()],
        allowed_ips: vec![],
        max_devices: None,
        devices: vec![],
        daily_fee: Some(Pico(5)),
        metadata: Some(r#"{"a":1}"#.into()),
        imported: false,
        low_balance_alert: None,
    }
}

fn account(limit: Option<i64>) -> Account {
    Account {
        limit: limit.map(Pico),
        fee_day: -1,
        ..Account::default()
    }
}

fn usage(k: u32, at_ms: i64, model: &str, cost: i64, i: u64) -> UsageRecord {
    UsageRecord {
        at_ms,
        key: hash(k),
        model: model.into(),
        upstream: "mock".into(),
        route: "chat".into(),
        stream: i % 2 == 0,
        status: if i % 7 == 0 { 502 } else { 200 },
        prompt_tokens: 10 + i,
        cached_tokens: i % 3,
        cache_write_tokens: i % 4,
        completion_tokens: 20,
        reasoning_tokens: 1,
        cost: Pico(cost),
        reserved: Pico(cost * 2),
        latency_ms: 100,
        ttfb_ms: 10,
        request_id: format!("req-{k}-{i}"),
        client_ip: "127.0.0.1".into(),
        estimated: i % 5 == 0,
        daily_fee: Pico::ZERO,
        account: None,
    }
}

fn credit(kind: LedgerKind, amount: i64, idem: Option<&str>, at_ms: i64) -> CreditOp {
    CreditOp {
        kind,
        amount: Pico(amount),
        reason: "test".into(),
        idempotency_key: idem.map(str::to_owned),
        at_ms,
    }
}

/// spent = Σ usage record costs + Σ deducts + Σ fees − Σ refunds, read back
/// from disk.
fn assert_books_balance(store: &Store, h: &KeyHash) {
    let (_, acct) = store.key(h).unwrap().expect("the key exists");
    let recs = store.usage(h, 0, usize::MAX).unwrap();
    let mut sum: i64 = recs.iter().map(|r| r.cost.0).sum();
    let ledger = store.ledger(h, 0, usize::MAX).unwrap();
    for e in &ledger {
        match e.kind {
            LedgerKind::Deduct | LedgerKind::DailyFee => sum += e.amount.0,
            LedgerKind::Refund => sum -= e.amount.0,
            LedgerKind::Topup => {}
        }
    }
    assert_eq!(acct.spent.0, sum, "spent vs records + ledger");
    assert_eq!(acct.requests, recs.len() as u64);
    assert_eq!(acct.ledger_seq, ledger.len() as u64);
}

#[tokio::test]
async fn create_read_update_delete_with_owners_index() {
    let dir = TempDir::new("crud");
    let store = Store::open(&dir.0, 5).unwrap();
    let a = key(1, Some("alice"), Some("trial"));
    store
        .create_key(a.clone(), account(Some(100)))
        .await
        .unwrap();
    assert!(matches!(
        store.create_key(a.clone(), account(None)).await,
        Err(StoreError::Exists)
    ));
    store
        .create_key(key(2, Some("alice"), Some("pro")), account(None))
        .await
        .unwrap();
    store
        .create_key(key(3, None, None), account(None))
        .await
        .unwrap();
    assert_eq!(store.stats().keys, 3);

    let (rec, acct) = store.key(&hash(1)).unwrap().unwrap();
    assert_eq!(rec, a);
    assert_eq!(acct, account(Some(100)));
    assert_eq!(
        store.active_key_of("alice", "trial").unwrap(),
        Some(hash(1))
    );
    assert_eq!(store.active_key_of("alice", "pro").unwrap(), Some(hash(2)));
    assert_eq!(store.active_key_of("bob", "trial").unwrap(), None);

    // Disabling takes it out of active_key_of; moving owner moves the entry.
    let mut a2 = a.clone();
    a2.disabled = true;
    store.update_key(a2.clone()).await.unwrap();
    assert_eq!(store.active_key_of("alice", "trial").unwrap(), None);
    let mut moved = key(2, Some("bob"), Some("pro"));
    moved.limit_reset = Some(Period::Daily);
    moved.updated_at = 5 * DAY_MS;
    store.update_key(moved.clone()).await.unwrap();
    assert_eq!(store.active_key_of("alice", "pro").unwrap(), None);
    assert_eq!(store.active_key_of("bob", "pro").unwrap(), Some(hash(2)));
    assert_eq!(store.key(&hash(2)).unwrap().unwrap().1.period, 5);
    assert!(matches!(
        store.update_key(key(9, None, None)).await,
        Err(StoreError::NotFound)
    ));

    // Listing: created_at order, disabled filter, owner filter, paging.
    let all = KeyQuery {
        offset: 0,
        limit: 10,
        owner: None,
        include_disabled: true,
    };
    let hashes: Vec<_> = store.keys(&all).unwrap().iter().map(|k| k.0.hash).collect();
    assert_eq!(hashes, vec![hash(1), hash(2), hash(3)]);
    let enabled = KeyQuery {
        include_disabled: false,
        ..all.clone()
    };
    let hashes: Vec<_> = store
        .keys(&enabled)
        .unwrap()
        .iter()
        .map(|k| k.0.hash)
        .collect();
    assert_eq!(hashes, vec![hash(2), hash(3)]);
    let page = KeyQuery {
        offset: 1,
        limit: 1,
        ..all.clone()
    };
    assert_eq!(store.keys(&page).unwrap()[0].0.hash, hash(2));
    let alice = KeyQuery {
        owner: Some("alice".into()),
        ..all.clone()
    };
    assert_eq!(store.keys(&alice).unwrap().len(), 1);

    store.bind_device(hash(3), "dev-1".into());
    store.bind_device(hash(3), "dev-1".into());
    store.bind_device(hash(3), "dev-2".into());
    store.flush().await.unwrap();
    assert_eq!(
        store.key(&hash(3)).unwrap().unwrap().0.devices,
        vec!["dev-1", "dev-2"]
    );

    assert!(store.delete_key(hash(2)).await.unwrap());
    assert!(!store.delete_key(hash(2)).await.unwrap());
    assert_eq!(store.key(&hash(2)).unwrap(), None);
    assert_eq!(store.active_key_of("bob", "pro").unwrap(), None);
    assert_eq!(store.stats().keys, 2);
    drop(store);

    let store = Store::open(&dir.0, 5).unwrap();
    assert_eq!(store.stats().keys, 2);
    assert_eq!(store.key(&hash(1)).unwrap().unwrap().0, a2);
}

#[tokio::test]
async fn credits_apply_once_per_idempotency_key() {
    let dir = TempDir::new("credit");
    let store = Store::open(&dir.0, 5).unwrap();
    store
        .create_key(key(1, None, None), account(Some(1_000)))
        .await
        .unwrap();
    let up = store
        .credit(hash(1), credit(LedgerKind::Topup, 500, Some("t1"), 10))
        .await
        .unwrap();
    assert!(!up.replayed);
    assert_eq!(up.account.limit, Some(Pico(1_500)));
    assert_eq!(up.entry.seq, 1);
    let again = store
        .credit(hash(1), credit(LedgerKind::Topup, 500, Some("t1"), 20))
        .await
        .unwrap();
    assert!(again.replayed);
    assert_eq!(again.entry, up.entry);
    assert_eq!(again.account.limit, Some(Pico(1_500)));

    store
        .credit(hash(1), credit(LedgerKind::Deduct, 300, None, 30))
        .await
        .unwrap();
    let fee = store
        .credit(
            hash(1),
            credit(LedgerKind::DailyFee, 5, Some("fee:3"), 3 * DAY_MS),
        )
        .await
        .unwrap();
    assert_eq!(fee.account.fee_day, 3);
    let refund = store
        .credit(hash(1), credit(LedgerKind::Refund, 100, Some("r"), 40))
        .await
        .unwrap();
    assert_eq!(refund.account.spent, Pico(205));
    assert_eq!(refund.account.period_spent, Pico(205));
    assert_eq!(refund.account.ledger_seq, 4);
    assert!(matches!(
        store
            .credit(hash(1), credit(LedgerKind::Topup, 0, None, 1))
            .await,
        Err(StoreError::Invalid(_))
    ));
    assert!(matches!(
        store
            .credit(hash(9), credit(LedgerKind::Topup, 1, None, 1))
            .await,
        Err(StoreError::NotFound)
    ));
    let acct = store.set_limit(hash(1), None).await.unwrap();
    assert_eq!(acct.limit, None);
    // A top-up leaves an unlimited key unlimited.
    let up = store
        .credit(hash(1), credit(LedgerKind::Topup, 7, None, 50))
        .await
        .unwrap();
    assert_eq!(up.account.limit, None);

    let ledger = store.ledger(&hash(1), 0, 10).unwrap();
    let seqs: Vec<_> = ledger.iter().map(|e| e.seq).collect();
    assert_eq!(seqs, vec![5, 4, 3, 2, 1]);
    assert_eq!(ledger[1].kind, LedgerKind::Refund);
    assert_eq!(store.ledger(&hash(1), 1, 2).unwrap()[0].seq, 4);
    assert_books_balance(&store, &hash(1));
}

#[tokio::test]
async fn records_agree_with_accounts_rollups_and_survive_reopen() {
    let dir = TempDir::new("records");
    let hour0 = 500_000 * HOUR_MS;
    let models = ["gpt-4o", "gpt-4o-mini", "o3"];
    let mut expected_key: HashMap<(u32, i64, String), Rollup> = HashMap::new();
    let mut expected_gw: HashMap<(i64, String), Rollup> = HashMap::new();
    {
        let store = Store::open(&dir.0, 2).unwrap();
        for k in 0..20u32 {
            let mut rec = key(k, None, None);
            if k % 2 == 0 {
                rec.limit_reset = Some(Period::Daily);
            }
            store.create_key(rec, account(None)).await.unwrap();
        }
        let mut i = 0u64;
        for round in 0..6 {
            for k in 0..20u32 {
                for _ in 0..(k + 1) {
                    let at = hour0 + i64::from(round) * 5 * HOUR_MS + (i as i64 % 1000);
                    let model = models[(i % 3) as usize];
                    let rec = usage(k, at, model, 1 + i as i64, i);
                    let hour = at / HOUR_MS;
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
                    add_rollup(
                        expected_key.entry((k, hour, model.into())).or_default(),
                        &delta,
                    );
                    add_rollup(expected_gw.entry((hour, model.into())).or_default(), &delta);
                    store.record(rec);
                    i += 1;
                }
            }
            if round == 3 {
                // Credits interleaved with queued records.
                store
                    .credit(hash(4), credit(LedgerKind::Deduct, 1_000, None, hour0))
                    .await
                    .unwrap();
                store
                    .credit(hash(5), credit(LedgerKind::Refund, 3, None, hour0))
                    .await
                    .unwrap();
            }
        }
        store.flush().await.unwrap();
        assert_eq!(store.stats().records_written, i);
        assert_eq!(store.stats().queue_depth, 0);
    }
    let store = Store::open(&dir.0, 2).unwrap();
    for k in 0..20u32 {
        assert_books_balance(&store, &hash(k));
        let (_, acct) = match store.key(&hash(k)) {
            Ok(Some(a)) => a,
            other => panic!("key {k}: {other:?}"),
        };
        assert_eq!(acct.requests, 6 * u64::from(k + 1));
        if k % 2 == 0 {
            // Daily: the last records are on day of hour0 + 25 h.
            let last_day = (hour0 + 25 * HOUR_MS).div_euclid(DAY_MS);
            assert_eq!(acct.period, last_day);
            assert!(acct.period_spent < acct.spent);
        } else {
            assert_eq!(acct.period_spent, acct.spent.max(Pico::ZERO));
        }
        // Newest first, and paging is a window of the full list.
        let all = store.usage(&hash(k), 0, usize::MAX).unwrap();
        let seq =
            |r: &UsageRecord| -> u64 { r.request_id.rsplit('-').next().unwrap().parse().unwrap() };
        assert!(all.windows(2).all(|w| seq(&w[0]) > seq(&w[1])));
        let ids: Vec<_> = all.iter().map(|r| r.request_id.clone()).collect();
        for (off, lim) in [(0, 1), (1, 3), (5, 100), (ids.len() - 1, 5), (ids.len(), 5)] {
            let page: Vec<_> = store
                .usage(&hash(k), off, lim)
                .unwrap()
                .into_iter()
                .map(|r| r.request_id)
                .collect();
            let end = (off + lim).min(ids.len());
            assert_eq!(
                page,
                ids[off.min(end)..end].to_vec(),
                "k={k} off={off} lim={lim}"
            );
        }
        let got = store
            .rollups(
                RollupScope::Key(hash(k)),
                hour0 / HOUR_MS,
                hour0 / HOUR_MS + 100,
            )
            .unwrap();
        let want = expected_key
            .iter()
            .filter(|((kk, _, _), _)| *kk == k)
            .count();
        assert_eq!(got.len(), want);
        for (hour, model, r) in got {
            assert_eq!(expected_key[&(k, hour, model)], r);
        }
    }
    let h0 = hour0 / HOUR_MS;
    let gw = store.rollups(RollupScope::Gateway, h0, h0 + 100).unwrap();
    assert_eq!(gw.len(), expected_gw.len());
    for (hour, model, r) in &gw {
        assert_eq!(&expected_gw[&(*hour, model.clone())], r);
    }
    assert!(gw.windows(2).all(|w| (w[0].0, &w[0].1) < (w[1].0, &w[1].1)));
    // The range is inclusive-exclusive.
    let first = store.rollups(RollupScope::Gateway, h0, h0 + 1).unwrap();
    assert!(!first.is_empty() && first.iter().all(|r| r.0 == h0));
    assert!(
        store
            .rollups(RollupScope::Gateway, h0 + 1, h0 + 5)
            .unwrap()
            .is_empty()
    );
}

#[tokio::test]
async fn a_batch_writes_per_key_not_per_record() {
    let dir = TempDir::new("cost");
    // A long window: everything below lands in one batch.
    let store = Store::open(&dir.0, 5_000).unwrap();
    for k in 0..3 {
        store
            .create_key(key(k, None, None), account(None))
            .await
            .unwrap();
    }
    let before = store.stats();
    let at = 400_000 * HOUR_MS;
    for i in 0..3_000u64 {
        let model = if i % 2 == 0 { "a" } else { "b" };
        store.record(usage((i % 3) as u32, at, model, 1, i));
    }
    store.flush().await.unwrap();
    let after = store.stats();
    assert_eq!(after.batches - before.batches, 1);
    assert_eq!(after.records_written - before.records_written, 3_000);
    // 3 accounts + 3×2 key rollups + 2 gateway rollups + 1 batch number
    // (the 3 usage values and the batch index go to the log), and, the
    // log's commit not being durable yet, the tail's chunks: the same
    // values, 16 KB a row.
    // (On a machine so slow that a second passed since the open, the
    // commit was durable and there is no tail.)
    let tail = read_tail(&store.inner.book).unwrap();
    assert!(tail.len() <= 1, "one batch at most in the tail");
    let chunks: u64 = tail
        .iter()
        .map(|(_, v)| v.len().div_ceil(TAIL_CHUNK) as u64)
        .sum();
    assert_eq!(after.sled_writes - before.sled_writes, 12 + chunks);
    for k in 0..3 {
        assert_eq!(store.key(&hash(k)).unwrap().unwrap().1.spent, Pico(1_000));
        assert_books_balance(&store, &hash(k));
    }
}

#[tokio::test]
async fn records_of_a_deleted_key_are_kept_without_an_account() {
    let dir = TempDir::new("deleted");
    let store = Store::open(&dir.0, 1_000).unwrap();
    store
        .create_key(key(1, None, None), account(None))
        .await
        .unwrap();
    store.record(usage(1, 10, "m", 5, 1));
    assert!(store.delete_key(hash(1)).await.unwrap());
    store.record(usage(1, 11, "m", 5, 2));
    store.flush().await.unwrap();
    assert_eq!(store.key(&hash(1)).unwrap(), None);
    assert_eq!(store.inner.book.get(account_key(&hash(1))).unwrap(), None);
    assert_eq!(store.usage(&hash(1), 0, 10).unwrap().len(), 2);
}

#[tokio::test]
async fn retention_removes_old_records_and_keeps_rollups() {
    let dir = TempDir::new("prune");
    let store = Store::open(&dir.0, 1).unwrap();
    store
        .create_key(key(1, None, None), account(None))
        .await
        .unwrap();
    let now = now_ms();
    for (i, at) in [now - 10 * DAY_MS, now - 9 * DAY_MS]
        .into_iter()
        .enumerate()
    {
        store.record(usage(1, at, "m", 1, i as u64));
        store.flush().await.unwrap();
    }
    // One batch straddling the cut.
    store.record(usage(1, now - 8 * DAY_MS, "m", 1, 10));
    store.record(usage(1, now - 2, "m", 1, 11));
    store.flush().await.unwrap();
    store.record(usage(1, now - 1, "m", 1, 2));
    store.flush().await.unwrap();
    let removed = store.prune_usage_before(now - 5 * DAY_MS).await.unwrap();
    assert_eq!(removed, 3);
    let left: Vec<_> = store
        .usage(&hash(1), 0, 10)
        .unwrap()
        .into_iter()
        .map(|r| r.request_id)
        .collect();
    assert_eq!(left, vec!["req-1-2", "req-1-11"]);
    let h = (now - 10 * DAY_MS) / HOUR_MS;
    assert_eq!(
        store
            .rollups(RollupScope::Key(hash(1)), h, h + 1)
            .unwrap()
            .len(),
        1
    );
    assert_eq!(store.key(&hash(1)).unwrap().unwrap().1.requests, 5);
    // New batches still sort newest first after a reopen.
    drop(store);
    let store = Store::open(&dir.0, 1).unwrap();
    store.record(usage(1, now, "m", 1, 12));
    store.flush().await.unwrap();
    assert_eq!(
        store.usage(&hash(1), 0, 1).unwrap()[0].request_id,
        "req-1-12"
    );
}

/// Issue 17: with retention on, the log's file stops growing once records
/// age out (redb reuses the pages they freed, and trims its end). Sixteen
/// days of 20,000 records a day, two days kept: the second week's file is
/// never bigger than the first week's largest (redb grows its file in
/// steps, so day-to-day sizes move; the trend must not).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retention_keeps_the_log_file_flat() {
    const PER_DAY: u64 = 20_000;
    let dir = TempDir::new("flat");
    let store = Store::open(&dir.0, 5).unwrap();
    for k in 1..=4 {
        store
            .create_key(key(k, None, None), account(None))
            .await
            .unwrap();
    }
    let base = now_ms() - 30 * DAY_MS;
    let file = dir.0.join(super::log::LOG_FILE);
    let mut sizes = Vec::new();
    let mut removed = 0;
    for day in 0..16u64 {
        let day_start = base + day as i64 * DAY_MS;
        for i in 0..PER_DAY {
            let n = day * PER_DAY + i;
            store.record(usage((n % 4) as u32 + 1, day_start + i as i64, "m", 1, n));
            if i % 5_000 == 4_999 {
                store.flush().await.unwrap();
            }
        }
        store.flush().await.unwrap();
        removed += store
            .prune_usage_before(day_start - 2 * DAY_MS)
            .await
            .unwrap();
        sizes.push(std::fs::metadata(&file).unwrap().len());
    }
    println!("usage.redb bytes per day: {sizes:?}");
    // After day 15, everything before day 13 has aged out.
    assert_eq!(removed, 13 * PER_DAY);
    let first_week = sizes[..8].iter().copied().max().unwrap_or(0);
    let second_week = sizes[8..].iter().copied().max().unwrap_or(0);
    assert!(
        second_week <= first_week,
        "the log grew with retention on: {sizes:?}"
    );
    let kept: u64 = (1..=4)
        .map(|k| store.usage(&hash(k), 0, 100_000).unwrap().len() as u64)
        .sum();
    assert_eq!(kept, 3 * PER_DAY);
}

#[test]
fn bulk_insert_and_open_without_reading_keys() {
    let dir = TempDir::new("bulk");
    let store = Store::open(&dir.0, 5).unwrap();
    let n = 20_000u32;
    store
        .insert_keys_bulk((0..n).map(|k| (key(k, Some("o"), Some("p")), account(None))))
        .unwrap();
    // Existing hashes are skipped, not counted twice.
    store
        .insert_keys_bulk((0..10).map(|k| (key(k, None, None), account(Some(1)))))
        .unwrap();
    assert_eq!(store.stats().keys, u64::from(n));
    assert_eq!(store.key(&hash(7)).unwrap().unwrap().1, account(None));
    drop(store);
    // The count comes from the stored counter, not a scan. (Open time is
    // not asserted: right after a drop it may wait for sled's file lock, and
    // recovery time depends on the log, not on the number of keys.)
    let store = Store::open(&dir.0, 5).unwrap();
    assert_eq!(store.stats().keys, u64::from(n));
    let page = store
        .keys(&KeyQuery {
            offset: 100,
            limit: 2,
            owner: None,
            include_disabled: false,
        })
        .unwrap();
    assert_eq!(page[0].0.hash, hash(100));
}

#[test]
fn refuses_another_schema_version() {
    let dir = TempDir::new("schema");
    drop(Store::open(&dir.0, 5).unwrap());
    {
        let db = open_db(&dir.0, 1 << 20).unwrap();
        db.open_tree("meta")
            .unwrap()
            .insert("schema", &99u32.to_le_bytes())
            .unwrap();
        db.flush().unwrap();
    }
    assert!(matches!(
        Store::open(&dir.0, 5),
        Err(StoreError::Schema { found: 99, .. })
    ));
}

#[test]
fn charge_rolls_periods() {
    let mut a = account(Some(100));
    let day = 20_000 * DAY_MS;
    charge(&mut a, Some(Period::Daily), day, Pico(10));
    assert_eq!(
        (a.period, a.period_spent, a.spent),
        (20_000, Pico(10), Pico(10))
    );
    charge(&mut a, Some(Period::Daily), day + DAY_MS, Pico(3));
    assert_eq!(
        (a.period, a.period_spent, a.spent),
        (20_001, Pico(3), Pico(13))
    );
    // A late record from the day before counts in the lifetime only.
    charge(&mut a, Some(Period::Daily), day, Pico(4));
    assert_eq!(
        (a.period, a.period_spent, a.spent),
        (20_001, Pico(3), Pico(17))
    );
    charge(&mut a, Some(Period::Daily), day + DAY_MS, Pico(-5));
    assert_eq!((a.period_spent, a.spent), (Pico(0), Pico(12)));
}

/// Env var naming the directory the crash child writes to.
const CRASH_DIR_ENV: &str = "TOLLGATE_STORE_CRASH_DIR";

/// Run only as the child of `survives_kill_9`: writes until killed.
#[tokio::test]
#[ignore = "the child half of survives_kill_9"]
async fn crash_child() {
    let Ok(dir) = std::env::var(CRASH_DIR_ENV) else {
        return;
    };
    let store = Store::open(Path::new(&dir), 2).unwrap();
    for k in 0..4 {
        let _ = store.create_key(key(k, None, None), account(None)).await;
    }
    let mut i = 0u64;
    loop {
        for _ in 0..200 {
            store.record(usage((i % 4) as u32, 1_000 + i as i64, "m", 3, i));
            i += 1;
        }
        let kind = if i % 3 == 0 {
            LedgerKind::Refund
        } else {
            LedgerKind::Deduct
        };
        store
            .credit(hash((i % 4) as u32), credit(kind, 2, None, 1_000))
            .await
            .unwrap();
        if i % 2_000 == 0 {
            println!("wrote {i}");
        }
    }
}

#[test]
fn survives_kill_9() {
    let dir = TempDir::new("crash");
    let Ok(exe) = std::env::current_exe() else {
        return;
    };
    for round in 0..3 {
        let mut child = std::process::Command::new(&exe)
            .args([
                "--exact",
                "store::tests::crash_child",
                "--ignored",
                "--nocapture",
            ])
            .env(CRASH_DIR_ENV, &dir.0)
            .stdout(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        // Kill it mid-write, some time after its first writes landed (not
        // a fixed time from start: opening may be slow on a loaded box).
        if let Some(out) = child.stdout.take() {
            use std::io::BufRead;
            let mut lines = std::io::BufReader::new(out).lines();
            let _ = lines.find(|l| l.as_ref().is_ok_and(|l| l.starts_with("wrote")));
            std::thread::spawn(move || lines.for_each(drop));
        }
        std::thread::sleep(Duration::from_millis(200 + round * 150));
        child.kill().unwrap(); // SIGKILL
        child.wait().unwrap();
        let store = Store::open(&dir.0, 2).unwrap();
        let mut total = 0;
        for k in 0..4 {
            if store.key(&hash(k)).unwrap().is_some() {
                assert_books_balance(&store, &hash(k));
                total += store.key(&hash(k)).unwrap().unwrap().1.requests;
            }
        }
        assert!(total > 0, "the child wrote nothing in round {round}");
    }
}

/// Waits (polling the store's own counters, not a timer) until `done`.
async fn until(store: &Store, done: impl Fn(&StoreStats) -> bool) {
    for _ in 0..2_000 {
        if done(&store.stats()) {
            return;
        }
        tokio::time::sleep(std::time::Duration::from_millis(5)).await;
    }
    panic!("store never reached the state: {:?}", store.stats());
}

#[tokio::test]
async fn a_failed_commit_keeps_the_batch_refuses_work_and_recovers() {
    let dir = TempDir::new("fault");
    let path = dir.0.clone();
    let opts = StoreOptions {
        flush_ms: 2,
        queue_capacity: 1_000,
        cache_mb: 64,
        ..StoreOptions::default()
    };
    {
        let store = Store::open_with(&path, opts).unwrap();
        store
            .create_key(key(1, None, None), account(None))
            .await
            .unwrap();
        assert!(store.accepting());
        let first = store.record(usage(1, 1_000, "m", 7, 0));
        store.flush().await.unwrap();
        assert_eq!(store.committed_seq(), first);

        // Disk full: records keep being taken, none is committed, paid work
        // is refused and admin writes get an error, not a hang.
        store.set_write_fault(true);
        let mut last = first;
        for i in 1..=200u64 {
            last = store.record(usage(1, 1_000 + i as i64, "m", 3, i));
            assert_eq!(last, first + i, "sequence numbers rise by one");
        }
        until(&store, |s| s.failing && s.write_errors > 0).await;
        assert!(!store.accepting());
        assert!(store.flush().await.is_err());
        assert!(
            store
                .credit(hash(1), credit(LedgerKind::Deduct, 11, None, 2_000))
                .await
                .is_err()
        );
        assert_eq!(store.committed_seq(), first);
        assert_eq!(store.stats().queue_depth, 200);
        assert_eq!(store.stats().records_written, 1);

        // Room again: the kept batch is written by the retry, unasked.
        store.set_write_fault(false);
        until(&store, |s| !s.failing && s.committed_seq == last).await;
        assert!(store.accepting());
        assert_eq!(store.stats().queue_depth, 0);
        assert_eq!(store.stats().records_written, 201);
        store
            .credit(hash(1), credit(LedgerKind::Deduct, 11, None, 2_000))
            .await
            .unwrap();
        assert_books_balance(&store, &hash(1));
    }
    // And it is on disk: nothing lost.
    let store = Store::open(&path, 2).unwrap();
    let (_, acct) = store.key(&hash(1)).unwrap().unwrap();
    assert_eq!(acct.spent, Pico(7 + 200 * 3 + 11));
    assert_eq!(acct.requests, 201);
    assert_books_balance(&store, &hash(1));
}

#[tokio::test]
async fn accepting_turns_false_at_the_queue_capacity() {
    let dir = TempDir::new("capacity");
    // A long window: the records stay queued while we look.
    let opts = StoreOptions {
        flush_ms: 10_000,
        queue_capacity: 10,
        cache_mb: 64,
        ..StoreOptions::default()
    };
    let store = Store::open_with(&dir.0, opts).unwrap();
    store
        .create_key(key(1, None, None), account(None))
        .await
        .unwrap();
    for i in 0..9 {
        store.record(usage(1, 1_000, "m", 1, i));
        assert!(store.accepting());
    }
    let last = store.record(usage(1, 1_000, "m", 1, 9));
    assert!(!store.accepting(), "10 records wait: at capacity");
    assert!(store.committed_seq() < last);
    store.flush().await.unwrap();
    assert!(store.accepting());
    assert_eq!(store.committed_seq(), last);
}

#[tokio::test]
async fn a_daily_fee_with_a_record_is_written_once_per_day_with_it() {
    let dir = TempDir::new("fee");
    let day = 20_000 * DAY_MS;
    {
        let store = Store::open(&dir.0, 2).unwrap();
        store
            .create_key(key(1, None, None), account(None))
            .await
            .unwrap();
        let with_fee = |at: i64, i: u64| UsageRecord {
            daily_fee: Pico(500),
            ..usage(1, at, "m", 10, i)
        };
        store.record(with_fee(day + 1, 0));
        // A second fee the same day (a race the gate lost) is not charged again.
        store.record(with_fee(day + 2, 1));
        store.flush().await.unwrap();
        store.record(with_fee(day + 3, 2));
        store.record(usage(1, day + 4, "m", 10, 3));
        store.record(with_fee(day + DAY_MS, 4));
        store.flush().await.unwrap();
    }
    let store = Store::open(&dir.0, 2).unwrap();
    let (_, acct) = store.key(&hash(1)).unwrap().unwrap();
    assert_eq!(acct.spent, Pico(5 * 10 + 2 * 500));
    assert_eq!(acct.fee_day, day / DAY_MS + 1);
    let ledger = store.ledger(&hash(1), 0, 10).unwrap();
    assert_eq!(ledger.len(), 2);
    assert!(ledger.iter().all(|e| e.kind == LedgerKind::DailyFee));
    assert_eq!(ledger[0].at_ms, day + DAY_MS);
    assert_books_balance(&store, &hash(1));
}

fn vm_rss_kb() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|n| n.parse().ok())
        })
        .unwrap_or(0)
}

/// Issue 17's reproduction against sled alone: batches shaped like
/// `commit_pending`'s (one account overwrite, one rollup overwrite, one
/// batch-index entry and one new usage value of `RECS` records per batch),
/// each flushed, with a 32 MB `cache_capacity`. Prints resident memory as
/// the log grows; `LOG=0` writes the same batches without the usage value.
///   SOAK_RECORDS=5000000 cargo test --lib sled_alone -- --ignored --nocapture
#[test]
#[ignore = "a measurement, minutes long"]
fn sled_alone_memory_under_a_growing_log() {
    const RECS: usize = 500;
    let total: usize = std::env::var("SOAK_RECORDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(2_000_000);
    let with_log = std::env::var("LOG").map(|v| v != "0").unwrap_or(true);
    let dir = TempDir::new("sled-alone");
    let db = sled::Config::new()
        .path(&dir.0)
        .cache_capacity(32 << 20)
        .flush_every_ms(None)
        .open()
        .unwrap();
    let book = db.open_tree("book").unwrap();
    let h = hash(1);
    let mut buf = Vec::new();
    for i in 0..RECS as u64 {
        put_usage(&mut buf, &usage(1, 1_000 + i as i64, "demo-chat", 5, i));
    }
    let value = finish_usage_batch(RECS as u64, &buf);
    println!("usage value {} bytes for {RECS} records", value.len());
    let start = vm_rss_kb();
    for b in 0..(total / RECS) as u64 {
        let mut batch = sled::Batch::default();
        batch.insert(account_key(&h), encode_account(&account(None), None));
        if with_log {
            let mut k = prefixed(b'u', &h);
            k.extend_from_slice(&(!b).to_be_bytes());
            batch.insert(k, value.as_slice());
        }
        let mut bk = vec![b'b'];
        bk.extend_from_slice(&b.to_be_bytes());
        batch.insert(bk, &b.to_be_bytes());
        batch.insert(b"Rrollup".as_slice(), &b.to_le_bytes());
        book.apply_batch(batch).unwrap();
        db.flush().unwrap();
        if b % 1000 == 0 {
            println!(
                "records {:>9}  rss {:>7} kB (+{:>7})  disk {:>6} MB",
                b as usize * RECS,
                vm_rss_kb(),
                vm_rss_kb().saturating_sub(start),
                db.size_on_disk().unwrap_or(0) >> 20
            );
        }
    }
}

const BOUNDED_DIR_ENV: &str = "TOLLGATE_STORE_BOUNDED_DIR";

/// Run only as the child of `a_million_records_leave_memory_bounded`, in a
/// process of its own so that other tests' memory does not count: writes a
/// million records and prints its resident memory after warm-up and at the end.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "the child half of a_million_records_leave_memory_bounded"]
async fn bounded_child() {
    const TOTAL: u64 = 1_000_000;
    const CHUNK: u64 = 20_000;
    let Ok(dir) = std::env::var(BOUNDED_DIR_ENV) else {
        return;
    };
    let opts = StoreOptions {
        flush_ms: 20,
        queue_capacity: 1 << 20,
        cache_mb: 16,
        ..StoreOptions::default()
    };
    let store = Store::open_with(Path::new(&dir), opts).unwrap();
    for k in 1..=4 {
        store
            .create_key(key(k, None, None), account(None))
            .await
            .unwrap();
    }
    let mut warm = 0;
    let mut i = 0u64;
    while i < TOTAL {
        for _ in 0..CHUNK {
            store.record(usage((i % 4) as u32 + 1, 1_000 + i as i64, "m", 3, i));
            i += 1;
        }
        store.flush().await.unwrap();
        if i == 200_000 {
            warm = vm_rss_kb();
        }
    }
    let end = vm_rss_kb();
    let mut requests = 0;
    for k in 1..=4 {
        let (_, acct) = store.key(&hash(k)).unwrap().unwrap();
        requests += acct.requests;
        assert_eq!(acct.spent, Pico(3 * acct.requests as i64));
    }
    assert_eq!(requests, TOTAL);
    assert_eq!(store.usage(&hash(1), 0, 10).unwrap().len(), 10);
    println!("rss {warm} {end}");
}

/// Issue 17: a million records written through the store leave resident
/// memory flat after warm-up (the records live in the redb log, whose
/// cache is bounded; sled kept every inserted value). Not timing-based:
/// measured between 200k and 1M records, in a child process.
#[test]
fn a_million_records_leave_memory_bounded() {
    let dir = TempDir::new("bounded");
    let Ok(exe) = std::env::current_exe() else {
        return;
    };
    let out = std::process::Command::new(&exe)
        .args([
            "--exact",
            "store::tests::bounded_child",
            "--ignored",
            "--nocapture",
        ])
        .env(BOUNDED_DIR_ENV, &dir.0)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "child failed: {stdout}");
    let line = stdout
        .lines()
        .find_map(|l| l.strip_prefix("rss "))
        .expect("the child reports its memory");
    let kb: Vec<u64> = line.split(' ').filter_map(|n| n.parse().ok()).collect();
    assert_eq!(kb.len(), 2);
    assert!(kb[0] > 0, "VmRSS readable");
    let grown_mb = kb[1].saturating_sub(kb[0]) / 1024;
    println!(
        "rss after 200k records {} kB, after 1M {} kB (+{grown_mb} MB)",
        kb[0], kb[1]
    );
    assert!(
        grown_mb < 64,
        "resident memory grew {grown_mb} MB over 800k records"
    );
}

/// A log batch written but never counted by sled (a crash between the two
/// writes) is removed at the next open: the books still balance.
#[tokio::test]
async fn uncounted_log_batch_is_removed_at_open() {
    let dir = TempDir::new("uncounted");
    {
        let store = Store::open(&dir.0, 2).unwrap();
        store
            .create_key(key(1, None, None), account(None))
            .await
            .unwrap();
        store.record(usage(1, 1_000, "m", 10, 0));
        store.flush().await.unwrap();
    }
    let next = {
        let db = open_db(&dir.0, 1 << 20).unwrap();
        next_batch_seq(&db.open_tree("book").unwrap()).unwrap()
    };
    {
        // What the store thread writes first, as if killed before sled.
        let log = log::Log::open(&dir.0, 1 << 20, u64::MAX).unwrap();
        let mut buf = Vec::new();
        put_usage(&mut buf, &usage(1, 2_000, "m", 10, 1));
        let value = finish_usage_batch(1, &buf);
        let h = hash(1);
        let index = encode_batch_index(&BatchIndex {
            min_at: 2_000,
            max_at: 2_000,
            keys: vec![(h, 1)],
        });
        log.write(
            &log::LogBatch {
                bseq: next,
                values: vec![(&h, value.as_slice())],
                index: &index,
            },
            true,
        )
        .unwrap();
        assert_eq!(log.usage(&h, 0, 10).unwrap().len(), 2);
    }
    let store = Store::open(&dir.0, 2).unwrap();
    assert_eq!(store.usage(&hash(1), 0, 10).unwrap().len(), 1);
    assert_books_balance(&store, &hash(1));
    store.record(usage(1, 3_000, "m", 10, 2));
    store.flush().await.unwrap();
    assert_eq!(store.usage(&hash(1), 0, 10).unwrap().len(), 2);
    assert_books_balance(&store, &hash(1));
}

/// A batch the log lost in a crash (committed without durability) is
/// written back from sled's tail at the next open: the books balance, the
/// record reads, and the tail is gone.
#[tokio::test]
async fn a_batch_the_log_lost_is_restored_from_the_tail() {
    let dir = TempDir::new("tail");
    {
        let store = Store::open(&dir.0, 2).unwrap();
        store
            .create_key(key(1, None, None), account(None))
            .await
            .unwrap();
        for i in 0..3 {
            store.record(usage(1, 1_000 + i, "m", 10, i as u64));
            store.flush().await.unwrap();
        }
        assert_eq!(store.usage(&hash(1), 0, 10).unwrap().len(), 3);
    }
    {
        // As if killed: the last batch is in sled's tail, not in the log.
        let db = open_db(&dir.0, 1 << 20).unwrap();
        let book = db.open_tree("book").unwrap();
        let last = next_batch_seq(&book).unwrap() - 1;
        assert!(
            read_tail(&book).unwrap().is_empty(),
            "a clean close empties the tail"
        );
        let log = log::Log::open(&dir.0, 1 << 20, last + 1).unwrap();
        let (bseq, idx) = log.batches(last, 1).unwrap().pop().unwrap();
        assert_eq!(bseq, last);
        let h = hash(1);
        let value = log.value(&h, bseq).unwrap().unwrap();
        let index = encode_batch_index(&idx);
        let enc = encode_tail([(&h, value.as_slice())].into_iter(), &index);
        // Cut in two chunks, to read them joined.
        let (a, b) = enc.split_at(enc.len() / 2);
        book.insert(tail_key(bseq, 0), a).unwrap();
        book.insert(tail_key(bseq, 1), b).unwrap();
        db.flush().unwrap();
        log.prune(
            &[log::PruneEdit::Drop {
                bseq,
                keys: vec![h],
            }],
            &[],
        )
        .unwrap();
        assert_eq!(log.usage(&h, 0, 10).unwrap().len(), 2, "the batch is lost");
    }
    let store = Store::open(&dir.0, 2).unwrap();
    assert_eq!(store.usage(&hash(1), 0, 10).unwrap().len(), 3);
    assert_books_balance(&store, &hash(1));
    assert!(read_tail(&store.inner.book).unwrap().is_empty());
}

#[test]
fn tail_batches_round_trip_and_refuse_garbage() {
    let (h1, h2) = (hash(1), hash(2));
    let enc = encode_tail(
        [(&h1, b"one".as_slice()), (&h2, b"".as_slice())].into_iter(),
        b"idx",
    );
    let t = decode_tail(7, &enc).unwrap();
    assert_eq!(t.bseq, 7);
    assert_eq!(t.values, vec![(h1, b"one".to_vec()), (h2, Vec::new())]);
    assert_eq!(t.index, b"idx");
    for cut in 0..enc.len() {
        assert!(decode_tail(7, &enc[..cut]).is_err(), "cut at {cut}");
    }
    let mut longer = enc.clone();
    longer.push(0);
    assert!(decode_tail(7, &longer).is_err());
}

#[tokio::test]
async fn ledger_entries_are_marked_until_shipped() {
    let dir = TempDir::new("unshipped");
    {
        let store = Store::open(&dir.0, 1).unwrap();
        store
            .create_key(key(1, None, None), account(Some(1_000)))
            .await
            .unwrap();
        store
            .create_user_account(AccountRecord {
                id: "acct:1".into(),
                ..AccountRecord::default()
            })
            .await
            .unwrap();
        // A single node marks nothing.
        store
            .credit(hash(1), credit(LedgerKind::Topup, 1, None, 5))
            .await
            .unwrap();
        assert!(store.unshipped_ledger(100).unwrap().is_empty());
        store.set_clustered();
        store
            .credit(hash(1), credit(LedgerKind::Topup, 500, None, 10))
            .await
            .unwrap();
        store
            .credit_user_account(
                "acct:1",
                AccountCreditOp {
                    kind: AccountCreditKind::Topup,
                    amount: Pico(700),
                    reason: "test".into(),
                    idempotency_key: None,
                    at_ms: 20,
                },
            )
            .await
            .unwrap();
        // A replay writes nothing, so marks nothing.
        store
            .credit(hash(1), credit(LedgerKind::Deduct, 5, Some("d"), 30))
            .await
            .unwrap();
        store
            .credit(hash(1), credit(LedgerKind::Deduct, 5, Some("d"), 31))
            .await
            .unwrap();
        let marked = store.unshipped_ledger(100).unwrap();
        let mut seen: Vec<(bool, u64, i64)> = marked
            .iter()
            .map(|u| match &u.entry {
                LocalLedgerEntry::Key(h, e) => {
                    assert_eq!(h, &hash(1));
                    (true, e.seq, e.at_ms)
                }
                LocalLedgerEntry::Account(id, e) => {
                    assert_eq!(id, "acct:1");
                    (false, e.seq, e.at_ms)
                }
            })
            .collect();
        seen.sort();
        assert_eq!(seen, vec![(false, 1, 20), (true, 2, 10), (true, 3, 30)]);
        // A page of one, then the rest.
        assert_eq!(store.unshipped_ledger(1).unwrap().len(), 1);
        store.ledger_shipped(&marked[..2]).unwrap();
        let left = store.unshipped_ledger(100).unwrap();
        assert_eq!(left.len(), 1);
        assert_eq!(left[0].entry, marked[2].entry);
        // The full scan (the one-time backfill) still sees every entry.
        let (all, more) = store.ledger_page(&LedgerCursor::default(), 100).unwrap();
        assert_eq!(all.len(), 4);
        assert!(more.is_none());
        let (first, more) = store.ledger_page(&LedgerCursor::default(), 1).unwrap();
        let (rest, end) = store.ledger_page(&more.unwrap(), 100).unwrap();
        assert_eq!(first.len() + rest.len(), 4);
        assert!(end.is_none());
        assert!(!store.ledger_backfilled().unwrap());
        store.set_ledger_backfilled().unwrap();
        store.flush().await.unwrap();
    }
    // After a restart only what was not shipped is marked.
    let store = Store::open(&dir.0, 1).unwrap();
    let left = store.unshipped_ledger(100).unwrap();
    assert_eq!(left.len(), 1);
    assert!(store.ledger_backfilled().unwrap());
}
