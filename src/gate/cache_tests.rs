//! The gate against a real store: cache linearisability, clock steps,
//! the daily fee's one winner, rpm across recompiles.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use super::*;
use crate::clock::parse_rfc3339;

struct Fixture {
    gate: Gate,
    dir: std::path::PathBuf,
}

impl Drop for Fixture {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn fixture(tag: &str) -> Fixture {
    let dir = std::env::temp_dir().join(format!(
        "tollgate-gate-{}-{tag}-{}",
        std::process::id(),
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0)
    ));
    let store = Store::open(&dir, 1).expect("store opens");
    Fixture {
        gate: Gate::new(store, Clock::system(), 60),
        dir,
    }
}

impl Fixture {
    /// Bulk-inserts keys after the gate started, telling its filter (as
    /// the admin API does on create).
    fn insert(&self, items: impl IntoIterator<Item = (KeyRecord, Account)>) {
        let items: Vec<_> = items.into_iter().collect();
        let hashes: Vec<_> = items.iter().map(|(r, _)| r.hash).collect();
        self.gate
            .store()
            .insert_keys_bulk(items)
            .expect("keys inserted");
        for h in &hashes {
            self.gate.created(h);
        }
    }
}

fn hash_of(n: u32) -> KeyHash {
    hash_key(&format!("sk-tg-{n:048}"))
}

fn record(n: u32, now: i64) -> (KeyRecord, Account) {
    let rec = KeyRecord {
        hash: hash_of(n),
        name: format!("key {n}"),
        label: String::new(),
        owner: None,
        plan: None,
        disabled: false,
        created_at: now,
        updated_at: now,
        expires_at: None,
        limit_reset: None,
        max_requests: None,
        rpm: None,
        tpm: None,
        concurrency: None,
        models: vec![],
        allowed_ips: vec![],
        max_devices: None,
        devices: vec![],
        daily_fee: None,
        metadata: None,
        imported: false,
        low_balance_alert: None,
    };
    let acct = Account {
        limit: Some(Pico(1_000_000)),
        spent: Pico::ZERO,
        period: 0,
        period_spent: Pico::ZERO,
        requests: 0,
        fee_day: -1,
        ledger_seq: 0,
    };
    (rec, acct)
}

fn block_on<F: std::future::Future>(f: F) -> F::Output {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime")
        .block_on(f)
}

fn flat(amount: i64, tokens: u64) -> Bound {
    Bound {
        pricing: Pricing::Flat(Pico(amount)),
        prompt_tokens: tokens,
        completion_tokens: 0,
        choices: 1,
        cap: false,
    }
}

/// Many threads load, evict, update and delete the same keys: a deleted
/// key is never served afterwards, an updated one never with its old
/// record.
#[test]
fn load_delete_update_and_evict_are_linearisable() {
    const KEYS: u32 = 32;
    let f = fixture("linear");
    let now = f.gate.clock().now_ms();
    f.insert((0..KEYS).map(|n| record(n, now)));
    let gate = &f.gate;
    let stop = AtomicBool::new(false);
    std::thread::scope(|s| {
        for t in 0..4u32 {
            let stop = &stop;
            s.spawn(move || {
                let mut i = t;
                while !stop.load(Ordering::Relaxed) {
                    let hash = hash_of(i % KEYS);
                    let _ = gate.lookup(&hash, now).expect("store read");
                    if i % 7 == 0 {
                        gate.evict(&hash);
                    }
                    i = i.wrapping_mul(31).wrapping_add(17);
                }
            });
        }
        for n in 0..KEYS {
            let hash = hash_of(n);
            if n % 2 == 0 {
                let (mut rec, _) = record(n, now);
                rec.name = format!("renamed {n}");
                block_on(gate.store().update_key(rec.clone())).expect("updated");
                gate.updated(rec);
                for _ in 0..50 {
                    let k = gate.lookup(&hash, now).expect("read").expect("exists");
                    assert_eq!(k.policy().record.name, format!("renamed {n}"));
                }
            } else {
                assert!(block_on(gate.store().delete_key(hash)).expect("deleted"));
                gate.forget(&hash);
                for _ in 0..50 {
                    assert!(
                        gate.lookup(&hash, now).expect("read").is_none(),
                        "deleted key {n} served again"
                    );
                }
            }
        }
        stop.store(true, Ordering::Relaxed);
    });
    for n in 0..KEYS {
        let hash = hash_of(n);
        let found = gate.lookup(&hash, now).expect("read");
        assert_eq!(found.is_some(), n % 2 == 0, "key {n}");
        assert_eq!(gate.peek(&hash).is_some(), n % 2 == 0, "key {n}");
    }
}

/// Unknown keys cost no store read once the filter is built; keys created
/// later are found.
#[test]
fn filter_answers_unknown_keys_without_the_store() {
    let f = fixture("filter");
    let now = f.gate.clock().now_ms();
    f.gate
        .store()
        .insert_keys_bulk((0..10).map(|n| record(n, now)))
        .expect("keys inserted");
    // The filter was started before these keys existed: rebuild it as a
    // start-up on this store would.
    f.gate.filter.build(f.gate.store());
    assert!(f.gate.filter_ready());
    let reads = f.gate.store_reads();
    for n in 100..200 {
        assert!(f.gate.lookup(&hash_of(n), now).expect("read").is_none());
    }
    assert_eq!(f.gate.store_reads(), reads, "unknown keys read the store");
    assert!(f.gate.lookup(&hash_of(3), now).expect("read").is_some());
    let (rec, acct) = record(500, now);
    block_on(f.gate.store().create_key(rec, acct)).expect("created");
    f.gate.created(&hash_of(500));
    assert!(f.gate.lookup(&hash_of(500), now).expect("read").is_some());
    block_on(f.gate.store().delete_key(hash_of(3))).expect("deleted");
    f.gate.forget(&hash_of(3));
    let reads = f.gate.store_reads();
    assert!(f.gate.lookup(&hash_of(3), now).expect("read").is_none());
    assert_eq!(f.gate.store_reads(), reads);
}

/// A clock stepped back across a boundary resets neither the limit
/// period nor the tpm window a second time.
#[test]
fn periods_and_tpm_windows_only_move_forward() {
    let f = fixture("steps");
    let gate = &f.gate;
    let clock = gate.clock().clone();
    // 23:59:30 of some day, in test time.
    let target = parse_rfc3339("2026-11-23T23:59:30Z").expect("time");
    let now = clock.now_ms();
    if target > now {
        clock.advance(Duration::from_millis((target - now) as u64));
    } else {
        clock.step_back(Duration::from_millis((now - target) as u64));
    }
    let (mut rec, acct) = record(1, clock.now_ms());
    rec.limit_reset = Some(Period::Daily);
    rec.tpm = Some(1_000);
    f.insert([(rec, acct)]);
    let key = gate.lookup(&hash_of(1), clock.now_ms()).unwrap().unwrap();
    let spend = |amount: i64| {
        let policy = key.policy();
        let r = gate
            .reserve(&key, &policy, &flat(amount, 100))
            .expect("fits");
        r.reservation.settle(Pico(amount), 100);
    };
    spend(300);
    assert_eq!(gate.numbers_now(&key).period_spent, Pico(300));
    // Over midnight: a new day, a new minute.
    clock.advance(Duration::from_secs(60));
    assert_eq!(gate.numbers_now(&key).period_spent, Pico::ZERO);
    spend(200);
    assert_eq!(key.tpm_used(clock.now_ms()).0, 100);
    // NTP steps the clock back before midnight, then forward again.
    clock.step_back(Duration::from_secs(60));
    let n = gate.numbers_now(&key);
    assert_eq!(n.period_spent, Pico(200), "yesterday is not reopened");
    assert_eq!(n.spent, Pico(500));
    assert_eq!(
        key.tpm_used(clock.now_ms()).0,
        100,
        "the newer window stays"
    );
    spend(50);
    clock.advance(Duration::from_secs(60));
    let n = gate.numbers_now(&key);
    assert_eq!(
        n.period_spent,
        Pico(250),
        "today is not reset a second time"
    );
    assert_eq!(key.tpm_used(clock.now_ms()).0, 200);
    clock.advance(Duration::from_secs(60));
    assert_eq!(
        key.tpm_used(clock.now_ms()).0,
        0,
        "a later minute starts again"
    );
}

/// tpm is held at reserve: concurrent reservations never hold more than
/// the window; settling replaces the hold by the actual tokens.
#[test]
fn tpm_is_reserved_and_settled() {
    let f = fixture("tpm");
    let gate = &f.gate;
    let now = gate.clock().now_ms();
    let (mut rec, acct) = record(1, now);
    rec.tpm = Some(1_000);
    rec.limit_reset = None;
    f.insert([(rec, acct)]);
    let key = gate.lookup(&hash_of(1), now).unwrap().unwrap();
    let policy = key.policy();
    let held: Vec<Reservation> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..16)
            .map(|_| s.spawn(|| gate.reserve(&key, &policy, &flat(1, 300)).ok()))
            .collect();
        handles
            .into_iter()
            .filter_map(|h| h.join().expect("thread"))
            .map(|r| r.reservation)
            .collect()
    });
    assert_eq!(held.len(), 3, "3 × 300 tokens fit in 1000, a 4th does not");
    let err = gate
        .reserve(&key, &policy, &flat(1, 300))
        .err()
        .expect("full");
    assert_eq!(err.status, 429);
    let mut held = held.into_iter();
    held.next().expect("one").settle(Pico(1), 40);
    drop(held.next());
    // 40 used + 300 held: 660 left.
    assert_eq!(key.tpm_used(gate.clock().now_ms()).0, 340);
    let too_large = gate
        .reserve(&key, &policy, &flat(1, 1_001))
        .err()
        .expect("large");
    assert_eq!(too_large.status, 429);
}

/// The day's fee is held with one reservation only; a refused reservation
/// charges no fee; an unsettled one gives the day back.
#[test]
fn daily_fee_has_one_winner_and_goes_with_its_reservation() {
    let f = fixture("fee");
    let gate = &f.gate;
    let now = gate.clock().now_ms();
    let (mut rec, mut acct) = record(1, now);
    rec.daily_fee = Some(Pico(1_000));
    acct.limit = Some(Pico(1_500));
    f.insert([(rec, acct)]);
    let key = gate.lookup(&hash_of(1), now).unwrap().unwrap();
    let policy = key.policy();
    // Fee + request do not fit: nothing is charged, the day stays unpaid.
    assert!(gate.reserve(&key, &policy, &flat(600, 1)).is_err());
    let n = key.numbers();
    assert_eq!((n.period_spent, n.reserved), (Pico::ZERO, Pico::ZERO));
    // Dropped unsettled: fee and day given back.
    let r = gate.reserve(&key, &policy, &flat(100, 1)).expect("fits");
    assert_eq!(r.daily_fee, Some(Pico(1_000)));
    drop(r);
    assert_eq!(key.numbers().reserved, Pico::ZERO);
    // A race of eight: exactly one carries the fee.
    let won: Vec<Reserved> = std::thread::scope(|s| {
        let hs: Vec<_> = (0..8)
            .map(|_| s.spawn(|| gate.reserve(&key, &policy, &flat(10, 1))))
            .collect();
        hs.into_iter()
            .filter_map(|h| h.join().expect("thread").ok())
            .collect()
    });
    assert_eq!(
        won.iter().filter(|r| r.daily_fee.is_some()).count(),
        1,
        "one winner of the day's fee"
    );
    let fees = won.iter().filter_map(|r| r.daily_fee).count() as i64;
    let ok = won.len() as i64;
    for r in won {
        r.reservation.settle(Pico(10), 1);
    }
    let n = key.numbers();
    assert_eq!(n.period_spent, Pico(fees * 1_000 + ok * 10));
    assert_eq!(n.reserved, Pico::ZERO);
}

/// A recompiled policy with the same rpm keeps the limiter's state.
#[test]
fn rpm_survives_recompiles() {
    let (mut rec, _) = record(1, 0);
    rec.rpm = Some(2);
    let first = Policy::compile(rec.clone());
    let limiter = first.rpm.as_ref().expect("rpm");
    assert!(limiter.check().is_ok() && limiter.check().is_ok());
    rec.name = "renamed".into();
    let second = Policy::compile_after(rec.clone(), &first);
    assert!(
        second.rpm.as_ref().expect("rpm").check().is_err(),
        "still limited"
    );
    rec.rpm = Some(3);
    let third = Policy::compile_after(rec, &second);
    assert!(
        third.rpm.as_ref().expect("rpm").check().is_ok(),
        "a new rpm starts afresh"
    );
}

#[test]
fn limit_reset_change_follows_the_store_rule() {
    let f = fixture("reset");
    let gate = &f.gate;
    let now = gate.clock().now_ms();
    let (rec, acct) = record(1, now);
    f.insert([(rec.clone(), acct)]);
    let key: Arc<LiveKey> = gate.lookup(&hash_of(1), now).unwrap().unwrap();
    let policy = key.policy();
    gate.reserve(&key, &policy, &flat(400, 1))
        .expect("fits")
        .reservation
        .settle(Pico(400), 1);
    // none → monthly: what was spent keeps counting (no fresh limit).
    let mut monthly = rec.clone();
    monthly.limit_reset = Some(Period::Monthly);
    monthly.updated_at = now;
    gate.updated(monthly.clone());
    assert_eq!(gate.numbers_now(&key).period_spent, Pico(400));
    let mut acct_store = acct;
    acct_store.spent = Pico(400);
    acct_store.period_spent = Pico(400);
    acct_store.change_reset(None, Some(Period::Monthly), now);
    assert_eq!(acct_store.period, key.period.load(Ordering::Acquire));
    // A month later: a new period; back to none: all of it counts again.
    gate.clock().advance(Duration::from_secs(32 * 86_400));
    assert_eq!(gate.numbers_now(&key).period_spent, Pico::ZERO);
    let mut none = monthly;
    none.limit_reset = None;
    none.updated_at = gate.clock().now_ms();
    gate.updated(none);
    let n = gate.numbers_now(&key);
    assert_eq!((n.period_spent, n.spent), (Pico(400), Pico(400)));
}

/// Cluster mode: once a key has rate shares, its rpm and tpm admit against
/// what this node took of the minute's window (nothing taken: refused), a
/// settled request's unused tokens stay in the share, and a share taken
/// back is out of admission's reach.
#[test]
fn rate_shares_cap_rpm_and_tpm() {
    let f = fixture("shares");
    let gate = &f.gate;
    // One second into a minute (test time): the whole test is in it.
    let into = gate.clock().now_ms().rem_euclid(60_000);
    gate.clock()
        .advance(Duration::from_millis((60_000 - into + 1_000) as u64));
    let now = gate.clock().now_ms();
    let (mut rec, acct) = record(1, now);
    rec.rpm = Some(5);
    rec.tpm = Some(1_000);
    f.insert([(rec, acct)]);
    let key = gate.lookup(&hash_of(1), now).unwrap().unwrap();
    let policy = key.policy();
    let now = gate.clock().now_ms();
    let minute = minute_of(now);
    // A single node's rpm (GCRA) admits until the key has shares.
    drop(gate.limit(&key, &policy, now).expect("a single node's rpm"));
    key.rate_share();
    let e = gate.limit(&key, &policy, now).err().expect("no share yet");
    assert_eq!(e.status, http::StatusCode::TOO_MANY_REQUESTS);
    key.share_add(Unit::Requests, minute, 2, 4);
    let p = gate.limit(&key, &policy, now).expect("first of the share");
    // 5 − 4 taken by all + 1 unused here.
    assert_eq!(p.rate.rpm.map(|r| r.1), Some(2));
    drop(p);
    drop(gate.limit(&key, &policy, now).expect("second of the share"));
    assert!(gate.limit(&key, &policy, now).is_err(), "share used up");
    assert_eq!(key.share_free(Unit::Requests, now), 0);

    // Tokens: none taken, nothing reserved.
    assert!(gate.reserve(&key, &policy, &flat(10, 100)).is_err());
    key.share_add(Unit::Tokens, minute, 150, 150);
    let r = gate
        .reserve(&key, &policy, &flat(10, 100))
        .expect("fits the share");
    assert!(
        gate.reserve(&key, &policy, &flat(10, 100)).is_err(),
        "50 left"
    );
    assert_eq!(key.share_free(Unit::Tokens, now), 50);
    r.reservation.settle(Pico(10), 40);
    assert_eq!(key.share_free(Unit::Tokens, now), 110);
    let held = gate
        .reserve(&key, &policy, &flat(10, 100))
        .expect("fits again");
    assert!(
        !key.share_take_back(Unit::Tokens, minute, 20),
        "only 10 are free"
    );
    assert!(key.share_take_back(Unit::Tokens, minute, 10));
    assert_eq!(key.share_free(Unit::Tokens, now), 0);
    drop(held);
    assert_eq!(key.share_free(Unit::Tokens, now), 100);
}

/// Cluster mode: a key whose limit is a lease counter keeps only what is
/// unused of its lease over a period's end; what it spent in the old
/// period does not become new credit on this node (the database hands out
/// the new period's).
#[test]
fn a_leased_limit_does_not_grow_at_a_period_roll() {
    let f = fixture("leased-roll");
    let gate = &f.gate;
    let clock = gate.clock().clone();
    let target = parse_rfc3339("2026-11-23T23:59:30Z").expect("time");
    let now = clock.now_ms();
    if target > now {
        clock.advance(Duration::from_millis((target - now) as u64));
    } else {
        clock.step_back(Duration::from_millis((now - target) as u64));
    }
    let (mut rec, mut acct) = record(1, clock.now_ms());
    rec.limit_reset = Some(Period::Daily);
    acct.limit = Some(Pico(1_000));
    f.insert([(rec, acct)]);
    let key = gate.lookup(&hash_of(1), clock.now_ms()).unwrap().unwrap();
    assert!(key.lease_start());
    key.lease_add(500);
    let policy = key.policy();
    let r = gate.reserve(&key, &policy, &flat(300, 10)).expect("fits");
    r.reservation.settle(Pico(300), 10);
    assert_eq!(key.lease_headroom(), 200);
    clock.advance(Duration::from_secs(60));
    let n = gate.numbers_now(&key);
    assert_eq!(n.period_spent, Pico::ZERO, "a new day");
    assert_eq!(key.lease_headroom(), 200, "only the unused lease");
    assert!(gate.reserve(&key, &policy, &flat(300, 10)).is_err());
}
