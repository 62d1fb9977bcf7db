//! The hot path: keys in memory, admission, limits, reservations, permits.
//!
//! Every step here touches only memory: a `DashMap` from key hash to the
//! key's live state (atomics for what changes per request, the policy
//! replaced whole on update). sled is read only on a cache miss.
//!
//! The money invariant — `period_spent ≤ limit`, always — holds because the
//! only way to raise `committed` (= period_spent + reserved) is a
//! compare-and-swap that checks it against the limit, and settlement never
//! charges more than was reserved. The tokens-per-minute window is held the
//! same way: one compare-and-swap takes a request's token bound from it.
//!
//! The cache is linearisable with the admin side: a load from the store
//! inserts only if no delete, update or eviction of that key happened since
//! it read the store (a generation per shard of hashes, bumped under the
//! map's entry lock), so a deleted or stale key is never re-inserted.
//!
//! - [`reservation`]: bounds, reservations and their settlement.
//! - [`filter`]: which key hashes exist, so unknown keys cost no store read.

mod filter;
mod lease;
mod mode;
mod reservation;
mod share;

pub use filter::KeyFilter;
pub use reservation::minute_of;
pub use reservation::{Bound, Pricing, Reservation, Reserved};
use reservation::{pack_window, unpack_window};
pub use share::{RateShare, Unit};

use std::net::{IpAddr, Ipv6Addr};
use std::num::NonZeroU32;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock, RwLock};
use std::time::Duration;

use dashmap::DashMap;
use dashmap::mapref::entry::Entry;
use globset::{Glob, GlobSet, GlobSetBuilder};
use governor::middleware::{StateInformationMiddleware, StateSnapshot};
use governor::{Quota, RateLimiter};
use http::HeaderMap;
use http::header::HeaderName;
use ipnet::IpNet;
use sha2::{Digest, Sha256};

use crate::clock::{Clock, DAY_MS, Period, ResetChange, period_roll};
use crate::error::ApiError;
use crate::money::Pico;
use crate::store::{Account, KeyHash, KeyRecord, Store};

/// `LiveKey::limit` value of a key without a limit.
const UNLIMITED: i64 = -1;

/// A per-key requests-per-minute limiter (GCRA) that reports what is left.
type RpmLimiter = RateLimiter<
    governor::state::NotKeyed,
    governor::state::InMemoryState,
    governor::clock::DefaultClock,
    StateInformationMiddleware,
>;

/// A per-IP limiter against guessing (keys, admin token).
type IpLimiter = governor::DefaultKeyedRateLimiter<IpAddr>;

/// Idle keys are dropped from memory after this long with nothing in flight.
const IDLE_EVICT_MS: i64 = 10 * 60 * 1000;

/// Shards of key hashes that each carry a cache generation.
const GENERATIONS: usize = 64;

/// Hashes a `KeyHash` by taking its first eight bytes: it is already a
/// SHA-256, so SipHash over it again only costs time. Flooding is not a
/// risk: only keys that exist enter the map, and those were generated (or
/// imported) by the operator, not chosen by a client.
#[derive(Clone, Copy, Default)]
pub struct KeyHashHasher(u64);

impl std::hash::Hasher for KeyHashHasher {
    fn write(&mut self, bytes: &[u8]) {
        let mut word = [0u8; 8];
        let n = bytes.len().min(8);
        word[..n].copy_from_slice(&bytes[..n]);
        self.0 = self.0.rotate_left(17) ^ u64::from_le_bytes(word);
    }

    fn finish(&self) -> u64 {
        self.0
    }
}

type KeyMap = DashMap<KeyHash, Arc<LiveKey>, std::hash::BuildHasherDefault<KeyHashHasher>>;

/// Keys in memory, and the checks a request must pass.
pub struct Gate {
    /// Key hash → live state of the keys in use (not every key in the store).
    keys: KeyMap,
    store: Store,
    clock: Clock,
    /// Which keys exist: unknown keys are answered without the store.
    filter: Arc<KeyFilter>,
    /// Bumped (under the map's entry lock) by every delete, update and
    /// eviction of a key in the shard `hash[0] % GENERATIONS`: a load that
    /// read the store before a bump retries instead of inserting stale state.
    generations: [AtomicU64; GENERATIONS],
    /// Key reads from the store (cache misses the filter let through).
    store_reads: AtomicU64,
    /// Unknown keys per client IP (IPv6 per /64): past it they are answered
    /// 429 instead of 401. It never refuses a key that exists.
    unknown_keys: IpLimiter,
    /// Accounts' wallets, which keys with an account's `owner` spend from.
    wallets: crate::billing::Wallets,
    /// `billing.mode` (0 enforce, 1 observe, 2 off): read per request by
    /// [`Gate::reserve`], settable on a reload.
    billing_mode: std::sync::atomic::AtomicU8,
}

/// One key's state while it is in memory.
pub struct LiveKey {
    pub hash: KeyHash,
    /// Identity and policy; replaced whole when the key is updated.
    policy: RwLock<Arc<Policy>>,
    /// The limit in picoUSD, or `UNLIMITED`.
    limit: AtomicI64,
    /// `period_spent + reserved`: the one word admission compares with the
    /// limit, so that concurrent requests can never overspend.
    committed: AtomicI64,
    /// What counts against the limit in the current period.
    period_spent: AtomicI64,
    /// Lifetime spend that no longer counts against the limit (earlier
    /// periods): `spent = period_spent + outside_period`. Kept instead of
    /// `spent` so that a settlement touches one word and a change of
    /// `limit_reset` can move it into the period exactly, whatever settles
    /// meanwhile.
    outside_period: AtomicI64,
    /// Id of the limit period `period_spent` belongs to; only moves forward.
    period: AtomicI64,
    /// Requests admitted (the `max_requests` counter).
    requests: AtomicU64,
    /// Requests admitted and not yet settled.
    in_flight: AtomicU32,
    /// The tokens-per-minute window: its minute and the tokens held or used
    /// in it, in one word (see `reservation::pack_window`). Only moves
    /// forward.
    tpm_window: AtomicU64,
    /// Last UTC day a daily fee was charged.
    fee_day: AtomicI64,
    /// Last time a request used the key (for idle eviction); written under
    /// the map's read lock, so eviction sees every use.
    last_used_ms: AtomicI64,
    /// Sequence of the key's last usage record handed to the store: the
    /// key is evicted only once the store has committed it.
    last_record_seq: AtomicU64,
    /// Serializes device binding (rare: once per new device).
    device_lock: Mutex<()>,
    /// `key.expired` was handed to the store (which keeps it to once per
    /// expiry across restarts): later refusals do not queue it again.
    expiry_announced: AtomicBool,
    /// Cluster mode: the slots of the key's `concurrency` this node holds
    /// (`lease.rs`); `u32::MAX` (no cap of its own) on a single node.
    slots: AtomicU32,
    /// Cluster mode: `limit` is a lease counter (`lease.rs`), so a period
    /// roll lowers it with `committed` (the new period's credit is the
    /// database's to hand out, not what this node spent in the old one).
    leased: AtomicBool,
    /// Cluster mode: this node's shares of the key's rpm and tpm windows
    /// (`share.rs`), made on first use; never made on a single node, whose
    /// rpm and tpm stay its own.
    rate_share: OnceLock<Box<RateShare>>,
}

/// A key's policy, compiled for fast checks.
pub struct Policy {
    pub record: KeyRecord,
    /// Compiled `models` allowlist; `None` allows every model.
    models: Option<ModelAllowlist>,
    /// Parsed `allowed_ips`; empty allows every IP.
    ips: Vec<IpNet>,
    /// Requests-per-minute limiter, when the key has an rpm: shared with
    /// the policies compiled after this one with the same rpm, so that an
    /// update or a device binding does not give the key a fresh minute.
    rpm: Option<Arc<RpmLimiter>>,
    /// The key's own record when `record` has a subscription plan's
    /// template over it (`None`: `record` is the key's own).
    base: Option<Box<KeyRecord>>,
    /// `LiveAccount::plan_version` this policy was compiled for (0: none).
    plan_version: u64,
}

impl Policy {
    /// Compiles `record` to replace `previous`, keeping its rpm limiter's
    /// state when the rpm is the same.
    pub fn compile_after(record: KeyRecord, previous: &Policy) -> Policy {
        let keep = (record.rpm == previous.record.rpm)
            .then(|| previous.rpm.clone())
            .flatten();
        let mut p = Policy::compile_with(record, keep.is_none());
        if keep.is_some() {
            p.rpm = keep;
        }
        p
    }

    pub fn compile(record: KeyRecord) -> Policy {
        Policy::compile_with(record, true)
    }

    fn compile_with(record: KeyRecord, new_rpm: bool) -> Policy {
        let models = (!record.models.is_empty()).then(|| ModelAllowlist::compile(&record.models));
        let ips = record
            .allowed_ips
            .iter()
            .filter_map(|s| parse_net(s))
            .collect();
        let rpm = record
            .rpm
            .and_then(NonZeroU32::new)
            .filter(|_| new_rpm)
            .map(|n| {
                Arc::new(
                    RateLimiter::direct(Quota::per_minute(n))
                        .with_middleware::<StateInformationMiddleware>(),
                )
            });
        Policy {
            record,
            models,
            ips,
            rpm,
            base: None,
            plan_version: 0,
        }
    }

    /// The key's own record, without a subscription plan's template over
    /// it: what the admin API shows and edits.
    pub fn own_record(&self) -> &KeyRecord {
        self.base.as_deref().unwrap_or(&self.record)
    }

    pub fn allows_model(&self, model: &str) -> bool {
        self.models.as_ref().is_none_or(|m| m.matches(model))
    }

    /// `allows_model` as an admission step: the refusal a client gets.
    pub fn check_model(&self, model: &str) -> Result<(), ApiError> {
        if self.allows_model(model) {
            return Ok(());
        }
        Err(ApiError::permission(
            "model_not_allowed",
            format!(
                "This key may not use the model `{}`.",
                crate::error::truncate(model, 128)
            ),
        )
        .with_param("model"))
    }
}

/// A key's model allowlist. Most patterns are exact names or `prefix*`:
/// those are matched with plain string comparisons, and only the rest go
/// through a `GlobSet` (which costs far more per check).
pub struct ModelAllowlist {
    exact: Vec<String>,
    prefixes: Vec<String>,
    globs: Option<GlobSet>,
}

impl ModelAllowlist {
    pub fn compile(patterns: &[String]) -> ModelAllowlist {
        let is_meta = |c: char| matches!(c, '*' | '?' | '[' | ']' | '{' | '}' | '\\');
        let mut exact = Vec::new();
        let mut prefixes = Vec::new();
        let mut globs = GlobSetBuilder::new();
        let mut any_glob = false;
        for p in patterns {
            if !p.contains(is_meta) {
                exact.push(p.clone());
            } else if let Some(prefix) = p.strip_suffix('*')
                && !prefix.contains(is_meta)
            {
                // globset's `*` crosses `/` too: a plain prefix match.
                prefixes.push(prefix.to_owned());
            } else if let Ok(g) = Glob::new(p) {
                // Patterns are validated by the API before they are stored;
                // one that still fails to compile allows nothing.
                globs.add(g);
                any_glob = true;
            }
        }
        let globs = any_glob.then(|| globs.build().unwrap_or_else(|_| GlobSet::empty()));
        ModelAllowlist {
            exact,
            prefixes,
            globs,
        }
    }

    pub fn matches(&self, model: &str) -> bool {
        self.exact.iter().any(|e| e == model)
            || self.prefixes.iter().any(|p| model.starts_with(p.as_str()))
            || self.globs.as_ref().is_some_and(|g| g.is_match(model))
    }
}

/// Parses `10.0.0.0/8` or a bare address.
pub fn parse_net(s: &str) -> Option<IpNet> {
    s.parse::<IpNet>()
        .ok()
        .or_else(|| s.parse::<IpAddr>().ok().map(IpNet::from))
}

/// What the gateway tells a client about its rate limits, on every answer.
#[derive(Clone, Copy, Debug, Default)]
pub struct RateInfo {
    pub rpm: Option<(u32, u32, Duration)>,
    pub tpm: Option<(u64, u64, Duration)>,
}

impl RateInfo {
    /// Writes OpenAI's `x-ratelimit-*` headers.
    pub fn write_headers(&self, h: &mut HeaderMap) {
        // Names built once (a `&str` name is parsed and hashed per insert).
        static NAMES: [HeaderName; 6] = [
            HeaderName::from_static("x-ratelimit-limit-requests"),
            HeaderName::from_static("x-ratelimit-remaining-requests"),
            HeaderName::from_static("x-ratelimit-reset-requests"),
            HeaderName::from_static("x-ratelimit-limit-tokens"),
            HeaderName::from_static("x-ratelimit-remaining-tokens"),
            HeaderName::from_static("x-ratelimit-reset-tokens"),
        ];
        if let Some((limit, remaining, reset)) = self.rpm {
            h.insert(NAMES[0].clone(), limit.into());
            h.insert(NAMES[1].clone(), remaining.into());
            if let Ok(v) = format_reset(reset).parse() {
                h.insert(NAMES[2].clone(), v);
            }
        }
        if let Some((limit, remaining, reset)) = self.tpm {
            h.insert(NAMES[3].clone(), limit.into());
            h.insert(NAMES[4].clone(), remaining.into());
            if let Ok(v) = format_reset(reset).parse() {
                h.insert(NAMES[5].clone(), v);
            }
        }
    }
}

/// OpenAI writes resets as `1s`, `6m0s`, `20ms`.
fn format_reset(d: Duration) -> String {
    let ms = d.as_millis();
    if ms < 1000 {
        format!("{ms}ms")
    } else if ms < 60_000 {
        format!("{}s", ms.div_ceil(1000))
    } else {
        format!("{}m{}s", ms / 60_000, (ms % 60_000) / 1000)
    }
}

/// Holds one of the key's concurrency slots and its in-flight count, and
/// the request's count against `max_requests`. The slot is given back when
/// the permit is dropped, whatever happened to the request (success, error,
/// client gone, panic: `Drop` runs during unwinding). The count is given back
/// too, unless [`Permit::keep_count`] said the request will have a usage
/// record: so the live count always equals the records, and a request
/// refused after `limit` (no credit, a body that cannot be rewritten) never
/// uses one of the key's requests.
pub struct Permit {
    key: Arc<LiveKey>,
    pub rate: RateInfo,
    /// The request holds one unit of `requests` that is not yet kept.
    counted: bool,
}

impl Permit {
    pub fn key(&self) -> &Arc<LiveKey> {
        &self.key
    }

    /// The request goes on to an upstream and will be recorded: its count
    /// stays whatever happens next.
    pub fn keep_count(&mut self) {
        self.counted = false;
    }
}

impl Drop for Permit {
    fn drop(&mut self) {
        self.key.in_flight.fetch_sub(1, Ordering::AcqRel);
        if self.counted {
            let _ = self
                .key
                .requests
                .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| n.checked_sub(1));
        }
    }
}

/// A snapshot of a key's numbers, for status endpoints.
#[derive(Clone, Debug)]
pub struct KeyNumbers {
    pub limit: Option<Pico>,
    pub period_spent: Pico,
    pub reserved: Pico,
    pub spent: Pico,
    pub requests: u64,
    pub in_flight: u32,
    pub remaining: Option<Pico>,
}

impl LiveKey {
    fn new(record: KeyRecord, account: Account, now_ms: i64) -> LiveKey {
        // The store's rule: a later period starts from zero, an earlier
        // one (a clock stepped back) is never reopened.
        let (period, period_spent) = match period_roll(record.limit_reset, account.period, now_ms) {
            Some(id) => (id, Pico::ZERO),
            None => (account.period, account.period_spent),
        };
        LiveKey {
            hash: record.hash,
            limit: AtomicI64::new(account.limit.map(|l| l.0).unwrap_or(UNLIMITED)),
            committed: AtomicI64::new(period_spent.0),
            period_spent: AtomicI64::new(period_spent.0),
            outside_period: AtomicI64::new(account.spent.0 - period_spent.0),
            period: AtomicI64::new(period),
            requests: AtomicU64::new(account.requests),
            in_flight: AtomicU32::new(0),
            tpm_window: AtomicU64::new(0),
            fee_day: AtomicI64::new(account.fee_day),
            last_used_ms: AtomicI64::new(now_ms),
            last_record_seq: AtomicU64::new(0),
            device_lock: Mutex::new(()),
            expiry_announced: AtomicBool::new(false),
            slots: AtomicU32::new(u32::MAX),
            leased: AtomicBool::new(false),
            rate_share: OnceLock::new(),
            policy: RwLock::new(Arc::new(Policy::compile(record))),
        }
    }

    pub fn policy(&self) -> Arc<Policy> {
        self.policy
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    fn set_policy(&self, policy: Policy) {
        *self.policy.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(policy);
    }

    /// The settlement handed the key's usage record to the store as `seq`
    /// (`Store::record`'s answer): the key stays in memory until the store
    /// has committed it.
    pub fn recorded(&self, seq: u64) {
        self.last_record_seq.fetch_max(seq, Ordering::AcqRel);
    }

    pub fn limit(&self) -> Option<Pico> {
        match self.limit.load(Ordering::Acquire) {
            UNLIMITED => None,
            l => Some(Pico(l)),
        }
    }

    pub fn in_flight(&self) -> u32 {
        self.in_flight.load(Ordering::Acquire)
    }

    pub fn numbers(&self) -> KeyNumbers {
        let limit = self.limit();
        let committed = self.committed.load(Ordering::Acquire);
        let period_spent = self.period_spent.load(Ordering::Acquire);
        KeyNumbers {
            limit,
            period_spent: Pico(period_spent),
            reserved: Pico((committed - period_spent).max(0)),
            spent: Pico(period_spent + self.outside_period.load(Ordering::Acquire)),
            requests: self.requests.load(Ordering::Acquire),
            in_flight: self.in_flight(),
            remaining: limit.map(|l| Pico((l.0 - committed).max(0))),
        }
    }

    /// Starts a new limit period when `now` has left the current one: what
    /// counts against the limit goes back to zero. Reservations in flight
    /// stay in `committed` and settle into the new period.
    fn roll_period(&self, policy: &Policy, now_ms: i64) {
        let cur = self.period.load(Ordering::Acquire);
        let Some(id) = period_roll(policy.record.limit_reset, cur, now_ms) else {
            return;
        };
        // One winner per boundary; a clock stepped back finds `id ≤ cur`
        // and rolls nothing.
        if self
            .period
            .compare_exchange(cur, id, Ordering::AcqRel, Ordering::Acquire)
            .is_ok()
        {
            let old = self.period_spent.swap(0, Ordering::AcqRel);
            self.outside_period.fetch_add(old, Ordering::AcqRel);
            if self.leased.load(Ordering::Acquire) {
                // A lease counter keeps what is unused of the lease, no
                // more: limit first, so in between less is admissible.
                self.limit.fetch_sub(old, Ordering::AcqRel);
            }
            self.committed.fetch_sub(old, Ordering::AcqRel);
        }
    }

    /// Applies a change of `limit_reset` made at `at_ms` with the store's
    /// rule ([`ResetChange`]). Every step is a delta that commutes with
    /// settlements running meanwhile, so memory ends where the store does.
    fn change_reset(&self, from: Option<Period>, to: Option<Period>, at_ms: i64) {
        match ResetChange::of(from, to, at_ms) {
            ResetChange::Unchanged => {}
            ResetChange::Enter(id) => self.period.store(id, Ordering::Release),
            ResetChange::CountAll => {
                self.period.store(0, Ordering::Release);
                let gap = self.outside_period.swap(0, Ordering::AcqRel);
                // `period_spent = max(spent, 0)`: a negative lifetime (more
                // refunded than spent) stays outside.
                let add = gap.max(-self.period_spent.load(Ordering::Acquire));
                if add != gap {
                    self.outside_period.fetch_add(gap - add, Ordering::AcqRel);
                }
                self.period_spent.fetch_add(add, Ordering::AcqRel);
                self.committed.fetch_add(add, Ordering::AcqRel);
            }
        }
    }

    /// The tokens used or held in the key's current tpm window at `now`,
    /// and when the window ends. A window newer than `now` (the clock
    /// stepped back) stays the current one.
    fn tpm_used(&self, now_ms: i64) -> (u64, Duration) {
        let (m, used) = unpack_window(self.tpm_window.load(Ordering::Acquire));
        let minute = minute_of(now_ms);
        let (m, used) = if minute > m { (minute, 0) } else { (m, used) };
        let ends = (i64::from(m) + 1) * 60_000;
        (used, Duration::from_millis((ends - now_ms).max(1) as u64))
    }

    /// Takes `tokens` from the tpm window if they fit in `tpm`: the minute
    /// they are held in, or the tokens already used.
    fn tpm_reserve(&self, tpm: u64, tokens: u64, now_ms: i64) -> Result<u32, u64> {
        let minute = minute_of(now_ms);
        // Cluster mode: this node's share of the window (a single node has
        // none and the whole tpm).
        let share = self.rate_share.get();
        let mut cur = self.tpm_window.load(Ordering::Acquire);
        loop {
            let (m, used) = unpack_window(cur);
            // Windows only move forward (`>`, never `!=`).
            let (m, used) = if minute > m { (minute, 0) } else { (m, used) };
            let next = used.saturating_add(tokens);
            let cap = share.map_or(tpm, |s| tpm.min(s.tokens_in(m)));
            if next > cap {
                return Err(used);
            }
            match self.tpm_window.compare_exchange_weak(
                cur,
                pack_window(m, next),
                Ordering::AcqRel,
                Ordering::Acquire,
            ) {
                Ok(_) => return Ok(m),
                Err(actual) => cur = actual,
            }
        }
    }

    /// Replaces `held` tokens by the `actual` ones in the window of
    /// `minute`; nothing when that window has passed (they counted there).
    fn tpm_settle(&self, minute: u32, held: u64, actual: u64) {
        let _ = self
            .tpm_window
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |w| {
                let (m, used) = unpack_window(w);
                (m == minute)
                    .then(|| pack_window(m, used.saturating_sub(held).saturating_add(actual)))
            });
    }

    /// What the headers say remains of the tpm window, with `used` tokens
    /// of it held or used here (cluster mode: as this node knows it).
    fn tpm_remaining(&self, tpm: u64, used: u64, now_ms: i64) -> u64 {
        match self.rate_share.get() {
            Some(s) => s.tokens_remaining(tpm, used, now_ms),
            None => tpm.saturating_sub(used),
        }
    }

    /// Takes `amount` from what remains, if it fits.
    fn try_commit(&self, amount: i64) -> Result<(), i64> {
        let limit = self.limit.load(Ordering::Acquire);
        let mut cur = self.committed.load(Ordering::Acquire);
        loop {
            let next = cur.checked_add(amount).ok_or(0i64)?;
            if limit != UNLIMITED && next > limit {
                return Err((limit - cur).max(0));
            }
            match self.committed.compare_exchange_weak(
                cur,
                next,
                Ordering::AcqRel,
                Ordering::Acquire,
            ) {
                Ok(_) => return Ok(()),
                Err(actual) => cur = actual,
            }
        }
    }
}

/// The facts about a request that admission checks.
pub struct Ask<'a> {
    /// The request's time (read once per request).
    pub now_ms: i64,
    pub model: Option<&'a str>,
    pub client_ip: IpAddr,
    pub device: Option<&'a str>,
}

impl Gate {
    pub fn new(store: Store, clock: Clock, unknown_key_per_minute: u32) -> Gate {
        let per_min =
            |n: u32| Quota::per_minute(NonZeroU32::new(n.max(1)).expect("max(1) is non-zero"));
        let filter = Arc::new(KeyFilter::new());
        filter.spawn_build(store.clone());
        Gate {
            keys: KeyMap::default(),
            wallets: crate::billing::Wallets::new(store.clone()),
            store,
            clock,
            filter,
            generations: std::array::from_fn(|_| AtomicU64::new(0)),
            store_reads: AtomicU64::new(0),
            unknown_keys: RateLimiter::keyed(per_min(unknown_key_per_minute)),
            billing_mode: std::sync::atomic::AtomicU8::new(0),
        }
    }

    /// Stops the background work that holds a store handle (shutdown).
    pub fn stop(&self) {
        self.filter.stop();
    }

    /// The filter of known keys has finished its start-up scan.
    pub fn filter_ready(&self) -> bool {
        self.filter.is_ready()
    }

    /// Key reads from the store so far (cache misses the filter let through).
    pub fn store_reads(&self) -> u64 {
        self.store_reads.load(Ordering::Relaxed)
    }

    fn generation(&self, hash: &KeyHash) -> &AtomicU64 {
        &self.generations[hash[0] as usize % GENERATIONS]
    }

    /// The accounts' live wallets.
    pub fn wallets(&self) -> &crate::billing::Wallets {
        &self.wallets
    }

    pub fn clock(&self) -> &Clock {
        &self.clock
    }

    pub fn store(&self) -> &Store {
        &self.store
    }

    /// Keys currently in memory.
    pub fn cached(&self) -> usize {
        self.keys.len()
    }

    /// Step 1: the key presented with the request, found in memory, else
    /// in the store if the filter of known keys may hold it. Unknown keys
    /// never reach the store once the filter is built; past the per-IP
    /// budget they are answered 429, but a key that exists is always served.
    pub fn authenticate(&self, headers: &HeaderMap, ip: IpAddr) -> Result<Arc<LiveKey>, ApiError> {
        let now = self.clock.now_ms();
        let key = match key_from_headers(headers) {
            Ok(Some(k)) => k,
            Ok(None) => {
                return Err(ApiError::invalid_api_key(
                    "You didn't provide an API key. Provide it as `Authorization: Bearer YOUR_KEY`.",
                ));
            }
            Err(e) => return Err(e),
        };
        let hash = hash_key(key);
        match self.lookup(&hash, now)? {
            Some(k) => Ok(k),
            None => Err(self.unknown_key(ip)),
        }
    }

    /// The answer to an unknown key: 401, or 429 when this address (its
    /// /64 for IPv6) has sent too many.
    fn unknown_key(&self, ip: IpAddr) -> ApiError {
        match self.unknown_keys.check_key(&limiter_ip(ip)) {
            Ok(()) => ApiError::invalid_api_key("Incorrect API key provided."),
            Err(not_until) => {
                use governor::clock::Clock as _;
                let clock = governor::clock::DefaultClock::default();
                let wait = not_until.wait_time_from(clock.now());
                ApiError::rate_limited(
                    "Too many requests with invalid API keys from this address.",
                    wait.as_secs().max(1),
                )
            }
        }
    }

    /// The live state of a key, loading it from the store on a miss (unless
    /// the filter knows it does not exist). Marks the key used.
    pub fn lookup(&self, hash: &KeyHash, now_ms: i64) -> Result<Option<Arc<LiveKey>>, ApiError> {
        if let Some(k) = self.cached_key(hash, now_ms) {
            return Ok(Some(k));
        }
        if !self.filter.may_exist(hash) {
            return Ok(None);
        }
        self.load(hash, now_ms)
    }

    /// The key if it is in memory, marked used while the map's read lock
    /// is held: an eviction (under the write lock) either happened before,
    /// and this misses, or sees the fresh use and keeps the key.
    fn cached_key(&self, hash: &KeyHash, now_ms: i64) -> Option<Arc<LiveKey>> {
        self.keys.get(hash).map(|e| {
            e.value().last_used_ms.store(now_ms, Ordering::Relaxed);
            e.value().clone()
        })
    }

    /// A cache miss: reads the store, then inserts under the entry lock
    /// only if no delete, update or eviction of this shard of keys happened
    /// since the read (else reads again). Two loads of one key share the
    /// first insert, so counters are never split.
    fn load(&self, hash: &KeyHash, now_ms: i64) -> Result<Option<Arc<LiveKey>>, ApiError> {
        loop {
            let generation = self.generation(hash).load(Ordering::Acquire);
            self.store_reads.fetch_add(1, Ordering::Relaxed);
            let loaded = self
                .store
                .key(hash)
                .map_err(|e| ApiError::internal(format!("key store: {e}")))?;
            match self.keys.entry(*hash) {
                Entry::Occupied(e) => {
                    e.get().last_used_ms.store(now_ms, Ordering::Relaxed);
                    return Ok(Some(e.get().clone()));
                }
                Entry::Vacant(v) => {
                    if self.generation(hash).load(Ordering::Acquire) != generation {
                        continue;
                    }
                    let Some((record, account)) = loaded else {
                        return Ok(None);
                    };
                    let live = Arc::new(LiveKey::new(record, account, now_ms));
                    v.insert(live.clone());
                    return Ok(Some(live));
                }
            }
        }
    }

    /// Bumps the key's generation under its entry lock, so that a load
    /// that read the store before this change will not insert what it
    /// read, and returns the cached state (removed from memory if `remove`).
    fn invalidate(&self, hash: &KeyHash, remove: bool) -> Option<Arc<LiveKey>> {
        match self.keys.entry(*hash) {
            Entry::Occupied(e) => {
                self.generation(hash).fetch_add(1, Ordering::AcqRel);
                if remove {
                    Some(e.remove())
                } else {
                    Some(e.get().clone())
                }
            }
            Entry::Vacant(_v) => {
                self.generation(hash).fetch_add(1, Ordering::AcqRel);
                None
            }
        }
    }

    /// Step 2: the key's status and policy. Binds a new device when the key
    /// still has room for one.
    pub fn admit(&self, key: &LiveKey, ask: &Ask<'_>) -> Result<Arc<Policy>, ApiError> {
        let policy = self.with_plan(key, key.policy(), ask.now_ms)?;
        let rec = &policy.record;
        let now = ask.now_ms;
        if rec.disabled {
            return Err(ApiError::permission(
                "key_disabled",
                "This API key is disabled.",
            ));
        }
        if let Some(exp) = rec.expires_at
            && now >= exp
        {
            if !key.expiry_announced.swap(true, Ordering::Relaxed) {
                self.store.key_expired(key.hash, now);
            }
            return Err(ApiError::permission(
                "key_expired",
                "This API key has expired.",
            ));
        }
        if let Some(max) = rec.max_requests
            && key.requests.load(Ordering::Acquire) >= max
        {
            return Err(ApiError::insufficient_quota(
                "request_limit_reached",
                format!("This key has used all of its {max} requests."),
                "max_requests",
            ));
        }
        if let Some(model) = ask.model {
            policy.check_model(model)?;
        }
        if !policy.ips.is_empty() && !policy.ips.iter().any(|n| n.contains(&ask.client_ip)) {
            return Err(ApiError::permission(
                "ip_not_allowed",
                "This key may not be used from this address.",
            ));
        }
        if let Some(max) = rec.max_devices {
            let Some(device) = ask.device else {
                return Err(ApiError::permission(
                    "device_required",
                    "This key requires an X-Device-Id header.",
                ));
            };
            if !rec.devices.iter().any(|d| d == device) {
                return self.bind_device(key, device, max);
            }
        }
        Ok(policy)
    }

    /// For a key whose account has a subscription: refuses it once the
    /// subscription ended (402), and gives it the live plan's key template
    /// (`billing::subscriptions::template_over`), recompiled only when the
    /// account's plan version changed. Other keys: one map read.
    fn with_plan(
        &self,
        key: &LiveKey,
        policy: Arc<Policy>,
        now: i64,
    ) -> Result<Arc<Policy>, ApiError> {
        let Some(owner) = policy.record.owner.as_deref() else {
            return Ok(policy);
        };
        let Some(account) = self.wallets.of(owner, now)? else {
            return Ok(policy);
        };
        account.check_subscription()?;
        if account.plan_version() == policy.plan_version {
            return Ok(policy);
        }
        // Rare (once per key per plan change): under the device lock, so
        // a binding or an update does not race the recompile.
        let _guard = key.device_lock.lock().unwrap_or_else(|e| e.into_inner());
        let cur = key.policy();
        let (version, plan) = account.plan();
        if cur.plan_version == version {
            return Ok(cur);
        }
        let base = cur
            .base
            .as_deref()
            .cloned()
            .unwrap_or_else(|| cur.record.clone());
        let mut record = base.clone();
        if let Some((name, plan)) = &plan {
            crate::billing::subscriptions::template_over(&mut record, name, plan);
        }
        let mut next = Policy::compile_after(record, &cur);
        next.base = plan.is_some().then(|| Box::new(base));
        next.plan_version = version;
        key.set_policy(next);
        Ok(key.policy())
    }

    fn bind_device(&self, key: &LiveKey, device: &str, max: u32) -> Result<Arc<Policy>, ApiError> {
        if device.is_empty() || device.len() > 128 || !device.bytes().all(|b| b.is_ascii_graphic())
        {
            return Err(ApiError::bad_request(
                "invalid_device_id",
                "X-Device-Id must be 1 to 128 visible ASCII characters.",
            ));
        }
        let _guard = key.device_lock.lock().unwrap_or_else(|e| e.into_inner());
        let policy = key.policy();
        if policy.record.devices.iter().any(|d| d == device) {
            return Ok(policy);
        }
        if policy.record.devices.len() >= max as usize {
            return Err(ApiError::permission(
                "device_limit",
                format!("This key is already bound to its maximum of {max} devices."),
            ));
        }
        let mut record = policy.record.clone();
        record.devices.push(device.to_owned());
        self.store.bind_device(record.hash, device.to_owned());
        let mut next = Policy::compile_after(record, &policy);
        // A plan template over the key stays, with the device in its base.
        next.plan_version = policy.plan_version;
        next.base = policy.base.as_ref().map(|b| {
            let mut b = b.clone();
            b.devices.push(device.to_owned());
            b
        });
        key.set_policy(next);
        Ok(key.policy())
    }

    /// Step 3: rpm, tpm and concurrency. The returned permit holds the
    /// concurrency slot and the request counts from here on.
    pub fn limit(&self, key: &Arc<LiveKey>, policy: &Policy, now: i64) -> Result<Permit, ApiError> {
        let rec = &policy.record;
        let mut rate = RateInfo::default();
        if let Some(tpm) = rec.tpm {
            // A full window is refused here, before the rpm limiter counts
            // the request; the request's own tokens are taken at reserve.
            let (used, reset) = key.tpm_used(now);
            let remaining = key.tpm_remaining(tpm, used, now);
            if used >= tpm || remaining == 0 {
                return Err(ApiError::rate_limited(
                    format!("Rate limit reached: {tpm} tokens per minute."),
                    reset.as_secs().max(1),
                )
                .with_rate(&RateInfo {
                    rpm: None,
                    tpm: Some((tpm, 0, reset)),
                }));
            }
            rate.tpm = Some((tpm, remaining, reset));
        }
        if let Some(limiter) = &policy.rpm {
            let limit = rec.rpm.unwrap_or(0);
            // Cluster mode: the key's rpm counts per minute on all nodes,
            // admitted against this node's share of the window.
            if let Some(share) = key.rate_share.get() {
                match share.admit(limit, now) {
                    Ok(remaining) => {
                        rate.rpm = Some((limit, remaining, share::window_reset(now)));
                    }
                    Err(reset) => {
                        rate.rpm = Some((limit, 0, reset));
                        return Err(ApiError::rate_limited(
                            format!("Rate limit reached: {limit} requests per minute."),
                            reset.as_secs().max(1),
                        )
                        .with_rate(&rate));
                    }
                }
            } else {
                match limiter.check() {
                    Ok(snapshot) => {
                        let snapshot: StateSnapshot = snapshot;
                        let remaining = snapshot.remaining_burst_capacity();
                        let refill = Duration::from_millis(60_000 / limit.max(1) as u64);
                        rate.rpm = Some((limit, remaining, refill));
                    }
                    Err(not_until) => {
                        use governor::clock::Clock as _;
                        let wait = not_until.wait_time_from(limiter.clock().now());
                        rate.rpm = Some((limit, 0, wait));
                        return Err(ApiError::rate_limited(
                            format!("Rate limit reached: {limit} requests per minute."),
                            wait.as_secs().max(1),
                        )
                        .with_rate(&rate));
                    }
                }
            }
        }
        // Concurrency: the slot is taken with a CAS so it can never exceed
        // the limit; the permit gives it back on drop.
        // Only a key with a concurrency limit reads its slots (cluster mode:
        // this node's share of the limit; else `u32::MAX`).
        let max = match rec.concurrency {
            Some(c) => c.min(key.slots.load(Ordering::Acquire)),
            None => u32::MAX,
        };
        let taken = key
            .in_flight
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < max).then_some(n + 1)
            });
        if taken.is_err() {
            return Err(ApiError::rate_limited(
                format!("Too many concurrent requests for this key (at most {max})."),
                1,
            )
            .with_rate(&rate));
        }
        let mut permit = Permit {
            key: key.clone(),
            rate,
            counted: false,
        };
        let max_requests = rec.max_requests.unwrap_or(u64::MAX);
        let counted = key
            .requests
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < max_requests).then_some(n + 1)
            });
        if counted.is_err() {
            return Err(ApiError::insufficient_quota(
                "request_limit_reached",
                format!("This key has used all of its {max_requests} requests."),
                "max_requests",
            ));
        }
        permit.counted = true;
        Ok(permit)
    }

    /// Step 4: reserve the request's upper bound: its cost against the
    /// limit (with `bound.cap`, a cost that does not fit is lowered to the
    /// largest completion that does, at least 1 token), and its tokens
    /// against the tpm window. The key's first request of a UTC day holds
    /// the daily fee in the same commit: no reservation, no fee. A refusal
    /// drops nothing itself: the caller's `Permit` gives the count back.
    /// This is [`Gate::reserve`] under `billing.mode = "enforce"` (see
    /// `mode.rs` for the others).
    fn reserve_enforced(
        &self,
        key: &Arc<LiveKey>,
        policy: &Policy,
        bound: &Bound,
    ) -> Result<Reserved, ApiError> {
        let now = self.clock.now_ms();
        key.roll_period(policy, now);
        let today = now.div_euclid(DAY_MS);
        let fee = policy
            .record
            .daily_fee
            .filter(|f| f.0 > 0 && key.fee_day.load(Ordering::Acquire) < today)
            .unwrap_or(Pico::ZERO);
        let want = bound.cost(bound.completion_tokens);
        // The account first: it may lower the bound the key then reserves.
        let (mut hold, acct_capped, bound_acct) =
            self.reserve_account(policy, bound, want, fee, now)?;
        let bound = &bound_acct;
        let want = bound.cost(bound.completion_tokens);
        let (amount, capped) = match key.try_commit(want.0.saturating_add(fee.0)) {
            Ok(()) => (want, None),
            Err(available) => {
                // Retry with what is left; another request may take some
                // of it meanwhile, so the CAS still decides.
                let c = if bound.cap {
                    bound
                        .affordable(Pico(available - fee.0))
                        .min(bound.completion_tokens)
                } else {
                    0
                };
                let amount = bound.cost(c);
                if c == 0 || key.try_commit(amount.0.saturating_add(fee.0)).is_err() {
                    return Err(ApiError::insufficient_quota(
                        "insufficient_quota",
                        if fee > Pico::ZERO {
                            "This key has not enough credit left for this request and today's fee."
                        } else {
                            "This key has not enough credit left for this request."
                        },
                        // The fee alone does not fit: it is what refuses.
                        if fee > Pico::ZERO && available < fee.0 {
                            "daily_fee"
                        } else {
                            "key"
                        },
                    ));
                }
                (amount, Some(c))
            }
        };
        // Every request that saw the day unpaid holds the fee; exactly one
        // moves the fee day and keeps it, the others give theirs back. Any
        // request that finds the day paid proceeds after the winner's hold
        // succeeded, so no request of the day goes without a paid fee.
        let mut reservation = Reservation {
            key: key.clone(),
            amount,
            daily_fee: None,
            fee_day_before: 0,
            tokens: 0,
            minute: 0,
            settled: false,
            account: None,
            unmetered: false,
        };
        if fee > Pico::ZERO {
            match key
                .fee_day
                .fetch_update(Ordering::AcqRel, Ordering::Acquire, |d| {
                    (d < today).then_some(today)
                }) {
                Ok(before) => {
                    reservation.daily_fee = Some(fee);
                    reservation.fee_day_before = before;
                }
                Err(_) => {
                    key.committed.fetch_sub(fee.0, Ordering::AcqRel);
                }
            }
        }
        if let Some(mut h) = hold.take() {
            let fee_held = reservation.daily_fee.map(|f| f.0).unwrap_or(0);
            h.shrink_to(amount.0 + fee_held);
            reservation.account = Some(h);
        }
        let capped = capped.or(acct_capped);
        if let Some(tpm) = policy.record.tpm {
            let completion = capped.unwrap_or(bound.completion_tokens);
            let tokens = bound.tokens(completion);
            match key.tpm_reserve(tpm, tokens, now) {
                Ok(minute) => {
                    reservation.tokens = tokens;
                    reservation.minute = minute;
                }
                Err(used) => {
                    // Dropping `reservation` gives back the credit and fee.
                    let (_, reset) = key.tpm_used(now);
                    let remaining = key.tpm_remaining(tpm, used, now);
                    let used = tpm - remaining.min(tpm);
                    let rate = RateInfo {
                        rpm: None,
                        tpm: Some((tpm, remaining, reset)),
                    };
                    let message = if tokens > tpm {
                        format!(
                            "Request too large: it may use {tokens} tokens, more than this key's {tpm} tokens per minute. Lower max_tokens."
                        )
                    } else {
                        format!(
                            "Rate limit reached: {tpm} tokens per minute ({used} used, this request may use {tokens})."
                        )
                    };
                    return Err(
                        ApiError::rate_limited(message, reset.as_secs().max(1)).with_rate(&rate)
                    );
                }
            }
        }
        let daily_fee = reservation.daily_fee;
        Ok(Reserved {
            reservation,
            capped_max_tokens: capped,
            daily_fee,
        })
    }

    /// The account's part of step 4, for a key whose `owner` has an
    /// account: holds the request's bound (and fee) on the account's
    /// wallet, lowered to what it can pay with `bound.cap`. Returns the
    /// hold, the lowered completion, and the bound the key then reserves.
    /// Details in `crate::billing`.
    fn reserve_account(
        &self,
        policy: &Policy,
        bound: &Bound,
        want: Pico,
        fee: Pico,
        now: i64,
    ) -> Result<(Option<crate::billing::AccountHold>, Option<u64>, Bound), ApiError> {
        let Some(owner) = policy.record.owner.as_deref() else {
            return Ok((None, None, *bound));
        };
        let Some(account) = self.wallets.of(owner, now)? else {
            return Ok((None, None, *bound));
        };
        account.check_status()?;
        let refuse = || {
            ApiError::insufficient_quota(
                "insufficient_quota",
                "The account of this key has not enough credit left for this request.",
                "account",
            )
        };
        let total = want.0.saturating_add(fee.0);
        match account.try_reserve(total) {
            Ok(()) => Ok((
                Some(crate::billing::AccountHold {
                    account,
                    amount: total,
                    at_ms: now,
                }),
                None,
                *bound,
            )),
            Err(available) => {
                if !bound.cap {
                    return Err(refuse());
                }
                let c = bound
                    .affordable(Pico(available - fee.0))
                    .min(bound.completion_tokens);
                let amount = bound.cost(c).0.saturating_add(fee.0);
                if c == 0 || account.try_reserve(amount).is_err() {
                    return Err(refuse());
                }
                let lowered = Bound {
                    completion_tokens: c,
                    ..*bound
                };
                Ok((
                    Some(crate::billing::AccountHold {
                        account,
                        amount,
                        at_ms: now,
                    }),
                    Some(c),
                    lowered,
                ))
            }
        }
    }

    // ---- admin side: keeps memory in step with what the store applied ----

    /// Replaces the cached policy of a key after an update. Devices bound
    /// meanwhile by requests are kept (binding takes the same lock).
    /// A change of `limit_reset` is applied with the store's rule. Call it
    /// after the store has the new record.
    pub fn updated(&self, mut record: KeyRecord) {
        let Some(k) = self.invalidate(&record.hash, false) else {
            return;
        };
        let _guard = k.device_lock.lock().unwrap_or_else(|e| e.into_inner());
        let old = k.policy();
        for d in &old.record.devices {
            if !record.devices.contains(d) {
                record.devices.push(d.clone());
            }
        }
        let (from, to, at) = (
            old.record.limit_reset,
            record.limit_reset,
            record.updated_at,
        );
        let policy = Policy::compile_after(record, &old);
        // No period change is ever seen with the wrong policy: a new period
        // is entered before the policy that rolls it, and a policy without
        // periods is in place before the earlier ones are counted.
        if to.is_some() {
            k.change_reset(from, to, at);
            k.set_policy(policy);
        } else {
            k.set_policy(policy);
            k.change_reset(from, to, at);
        }
    }

    /// A key was created or imported: call after the store has it and
    /// before answering, so that its first request finds it.
    pub fn created(&self, hash: &KeyHash) {
        self.filter.insert(hash);
    }

    /// A key's live state if it is in memory; never touches the store.
    pub fn peek(&self, hash: &KeyHash) -> Option<Arc<LiveKey>> {
        self.keys.get(hash).map(|e| e.value().clone())
    }

    /// A key's numbers as of now: a limit period that has ended is closed
    /// first, as admission would.
    pub fn numbers_now(&self, key: &LiveKey) -> KeyNumbers {
        key.roll_period(&key.policy(), self.clock.now_ms());
        key.numbers()
    }

    /// Sets the cached limit after an update or a top-up.
    pub fn set_limit(&self, hash: &KeyHash, limit: Option<Pico>) {
        if let Some(k) = self.invalidate(hash, false) {
            k.limit
                .store(limit.map(|l| l.0).unwrap_or(UNLIMITED), Ordering::Release);
        }
    }

    /// Takes `amount` from a key's remaining credit (a deduct), or refuses
    /// with 402 when it does not fit. Returns a hold that must be confirmed
    /// once the ledger entry is durable.
    pub fn hold(&self, key: &Arc<LiveKey>, amount: Pico) -> Result<Reservation, ApiError> {
        key.roll_period(&key.policy(), self.clock.now_ms());
        key.try_commit(amount.0).map_err(|available| {
            ApiError::insufficient_quota(
                "insufficient_quota",
                format!(
                    "The key has only {} USD left; nothing was deducted.",
                    Pico(available)
                ),
                "key",
            )
        })?;
        Ok(Reservation {
            key: key.clone(),
            amount,
            daily_fee: None,
            fee_day_before: 0,
            tokens: 0,
            minute: 0,
            settled: false,
            account: None,
            unmetered: false,
        })
    }

    /// Gives back spent credit (a refund), not below zero.
    pub fn refund(&self, key: &LiveKey, amount: Pico) {
        let back = key
            .period_spent
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |s| {
                Some((s - amount.0).max(0))
            })
            .map(|prev| prev - (prev - amount.0).max(0))
            .unwrap_or(0);
        key.committed.fetch_sub(back, Ordering::AcqRel);
        // What the period could not give back comes off earlier periods.
        key.outside_period
            .fetch_sub(amount.0 - back, Ordering::AcqRel);
    }

    /// A key was deleted: drops it from memory and from the filter of known
    /// keys. Call after the store has deleted it: no load that read the
    /// store before the delete inserts the key again.
    pub fn forget(&self, hash: &KeyHash) {
        self.filter.remove(hash);
        self.invalidate(hash, true);
    }

    /// Drops a key from memory only (it stays in the store and the filter):
    /// what the sweeper does to an idle key, for benches and tests.
    pub fn evict(&self, hash: &KeyHash) {
        // Nothing cached, nothing changes: no bump (loads need not retry).
        if let Entry::Occupied(e) = self.keys.entry(*hash) {
            self.generation(hash).fetch_add(1, Ordering::AcqRel);
            e.remove();
        }
    }

    /// The sweeper's work: drop idle keys from memory and prune limiter
    /// state so memory stays bounded with many keys and many IPs.
    pub fn sweep(&self) -> usize {
        let now = self.clock.now_ms();
        let before = self.keys.len();
        // A key whose usage records are not all committed would reload
        // stale counters from sled: evict only what the store has on disk.
        // Per key, so that steady traffic on other keys does not stop it.
        let committed = self.store.committed_seq();
        self.keys.retain(|hash, k| {
            let idle = now - k.last_used_ms.load(Ordering::Relaxed) > IDLE_EVICT_MS;
            let busy = k.in_flight() > 0
                || k.committed.load(Ordering::Acquire) != k.period_spent.load(Ordering::Acquire)
                || k.last_record_seq.load(Ordering::Acquire) > committed;
            let keep = !idle || busy;
            if !keep {
                // Under the shard's write lock, like a load's insert.
                self.generations[hash[0] as usize % GENERATIONS].fetch_add(1, Ordering::AcqRel);
            }
            keep
        });
        self.unknown_keys.retain_recent();
        self.unknown_keys.shrink_to_fit();
        before - self.keys.len()
    }
}

impl ApiError {
    /// Adds the `x-ratelimit-*` headers to an error.
    pub fn with_rate(mut self, rate: &RateInfo) -> ApiError {
        let mut h = HeaderMap::new();
        rate.write_headers(&mut h);
        for (name, value) in h.iter() {
            self.headers.push((name.clone(), value.clone()));
        }
        self
    }
}

/// The address per-IP limiters count: IPv4 as it is, IPv6 by its /64 (one
/// subscriber's prefix, in which a client may pick any address; an
/// IPv4-mapped address counts as its IPv4).
pub fn limiter_ip(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V4(_) => ip,
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => IpAddr::V6(Ipv6Addr::from(u128::from(v6) & !u128::from(u64::MAX))),
        },
    }
}

/// The key a request presents: `Authorization: Bearer`, `x-api-key`,
/// `api-key` or `x-license-key` (a licence client's header, seed 002).
/// `Ok(None)` when there is none; an error for a malformed one.
pub fn key_from_headers(headers: &HeaderMap) -> Result<Option<&str>, ApiError> {
    if let Some(v) = headers.get(http::header::AUTHORIZATION) {
        let v = v.to_str().map_err(|_| {
            ApiError::invalid_api_key("The Authorization header is not valid text.")
        })?;
        let token = v
            .strip_prefix("Bearer ")
            .or_else(|| v.strip_prefix("bearer "))
            .ok_or_else(|| ApiError::invalid_api_key("Use `Authorization: Bearer YOUR_KEY`."))?
            .trim();
        return valid_key_text(token).map(Some);
    }
    for name in ["x-api-key", "api-key", "x-license-key"] {
        if let Some(v) = headers.get(name) {
            let v = v
                .to_str()
                .map_err(|_| ApiError::invalid_api_key("The API key header is not valid text."))?;
            return valid_key_text(v.trim()).map(Some);
        }
    }
    Ok(None)
}

fn valid_key_text(k: &str) -> Result<&str, ApiError> {
    if k.is_empty() || k.len() > 256 {
        return Err(ApiError::invalid_api_key("Incorrect API key provided."));
    }
    Ok(k)
}

/// SHA-256 of the whole key: how keys are stored and found.
pub fn hash_key(key: &str) -> KeyHash {
    Sha256::digest(key.as_bytes()).into()
}

/// A new key: `sk-tg-` and 48 characters of `[0-9A-Za-z]` from the OS
/// CSPRNG (rejection sampling, so every character is equally likely).
pub fn generate_key() -> String {
    const ALPHABET: &[u8] = b"0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz";
    let mut out = String::with_capacity(54);
    out.push_str("sk-tg-");
    let mut buf = [0u8; 64];
    while out.len() < 54 {
        getrandom::fill(&mut buf).expect("the OS random source is available");
        for b in buf {
            // 248 = 4 × 62: bytes at or above it would bias the draw.
            if b < 248 && out.len() < 54 {
                out.push(ALPHABET[(b % 62) as usize] as char);
            }
        }
    }
    out
}

/// `sk-tg-Ab3…x9Q`: enough to recognise a key, not to use it.
pub fn label_of(key: &str) -> String {
    let head: String = key.chars().take(9).collect();
    let tail: String = key
        .chars()
        .rev()
        .take(3)
        .collect::<Vec<_>>()
        .into_iter()
        .rev()
        .collect();
    format!("{head}…{tail}")
}

#[cfg(test)]
mod cache_tests;

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderValue;

    #[test]
    fn ipv6_limited_per_64() {
        let a: IpAddr = "2001:db8:1:2:aaaa::1".parse().unwrap();
        let b: IpAddr = "2001:db8:1:2:ffff:1:2:3".parse().unwrap();
        let c: IpAddr = "2001:db8:1:3::1".parse().unwrap();
        assert_eq!(limiter_ip(a), limiter_ip(b));
        assert_eq!(limiter_ip(a), "2001:db8:1:2::".parse::<IpAddr>().unwrap());
        assert_ne!(limiter_ip(a), limiter_ip(c));
        let v4: IpAddr = "203.0.113.7".parse().unwrap();
        assert_eq!(limiter_ip(v4), v4);
        let mapped: IpAddr = "::ffff:203.0.113.7".parse().unwrap();
        assert_eq!(limiter_ip(mapped), v4);
    }

    #[test]
    fn keys_look_right_and_differ() {
        let a = generate_key();
        let b = generate_key();
        assert_ne!(a, b);
        assert_eq!(a.len(), 54);
        assert!(a.starts_with("sk-tg-"));
        assert!(a[6..].bytes().all(|c| c.is_ascii_alphanumeric()));
        assert_eq!(label_of("sk-tg-Ab3defghijkx9Q"), "sk-tg-Ab3…x9Q");
        assert_eq!(
            hex::encode(hash_key("abc")),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
    }

    #[test]
    fn key_extraction() {
        let mut h = HeaderMap::new();
        assert_eq!(key_from_headers(&h).unwrap(), None);
        h.insert("x-api-key", HeaderValue::from_static("k2"));
        assert_eq!(key_from_headers(&h).unwrap(), Some("k2"));
        h.insert("authorization", HeaderValue::from_static("Bearer k1"));
        assert_eq!(key_from_headers(&h).unwrap(), Some("k1"));
        h.insert("authorization", HeaderValue::from_static("Basic abc"));
        assert_eq!(key_from_headers(&h).unwrap_err().status, 401);
        h.insert("authorization", HeaderValue::from_static("Bearer "));
        assert_eq!(key_from_headers(&h).unwrap_err().status, 401);
        h.insert(
            "authorization",
            HeaderValue::from_bytes(b"Bearer \xff").unwrap(),
        );
        assert_eq!(key_from_headers(&h).unwrap_err().status, 401);
    }

    #[test]
    fn resets_format_like_openai() {
        assert_eq!(format_reset(Duration::from_millis(20)), "20ms");
        assert_eq!(format_reset(Duration::from_millis(1500)), "2s");
        assert_eq!(format_reset(Duration::from_secs(360)), "6m0s");
    }
}
