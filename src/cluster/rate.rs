//! A key's rpm and tpm over all nodes: per UTC minute, the database holds
//! how many requests and tokens the nodes took of the key's window
//! (`tollgate_rate_windows`), and one guarded statement hands out shares
//! of it, never past the limit. Each node admits against its share in
//! memory (`gate::RateShare`), exactly as one node admits against its own
//! window, and goes to the database only when the share is out.
//!
//! - **Sizes**: the first take of a window is small (1/32 of the limit,
//!   at least one request or the request's tokens); each further take in
//!   the same window doubles the last, up to a quarter of the limit; a new
//!   window starts from half the last. When less than twice the wanted
//!   share is left, a node takes only what the waiting request needs: the
//!   last request (or token) of a window goes to whichever node asks for
//!   it, at the price of a round trip.
//! - **Return**: a share unused for a settle tick (`sync_interval / 4`)
//!   is given back to the window, so another node can use it.
//! - **Faults**: a killed node's share is lost until the minute ends (no
//!   lease row to reclaim: the window is the ttl). With the database
//!   unreachable and the share out, requests of the key get 503, like
//!   paid requests without a lease.

use std::sync::{Arc, Mutex};

use super::schema::{db, pool as pool_error};
use super::trips::{Kind, count};
use super::{Cluster, database_unavailable, mono_ms};
use crate::error::ApiError;
use crate::gate::{LiveKey, Policy, Unit, minute_of};

/// This node's takes of one key's rate windows.
pub(super) struct RateHeld {
    /// The live key whose shares they feed (a key loaded again gets a new
    /// `RateHeld`: its shares start empty).
    key: Arc<LiveKey>,
    /// One take from the database at a time per unit (requests, tokens):
    /// requests that find the share out wait for it and look again.
    taking: [tokio::sync::Mutex<()>; 2],
    /// Per unit, how the takes went.
    state: Mutex<[RateState; 2]>,
}

#[derive(Clone, Copy, Default)]
struct RateState {
    /// The minute of the last take.
    minute: u32,
    /// What the last take gave: the next in the same minute asks for
    /// twice as much, the first of a new minute for half.
    last_grant: u64,
    /// The window had nothing left (mono ms): requests are refused
    /// without a round trip each until then.
    full_until_ms: i64,
    /// Last time a request looked at the share (mono ms): an unused
    /// share is given back after a settle tick.
    last_used_ms: i64,
}

fn slot(unit: Unit) -> usize {
    match unit {
        Unit::Requests => 0,
        Unit::Tokens => 1,
    }
}

/// The share to ask for: see the module's comment.
pub fn share_size(limit: u64, need: u64, same_minute: bool, last_grant: u64) -> u64 {
    let base = (limit / 32).max(1);
    let grown = if same_minute {
        last_grant.saturating_mul(2)
    } else {
        last_grant / 2
    };
    grown.clamp(base, (limit / 4).max(base)).max(need)
}

impl Cluster {
    /// Before a request's rpm is checked: this node holds a share of the
    /// key's requests in the current minute (a round trip only when its
    /// share is out). Makes the key's shares, so its tpm counts over all
    /// nodes too. No share left anywhere is not an error here: the gate
    /// then refuses (429) as it always does.
    pub async fn ensure_rate(
        &self,
        key: &Arc<LiveKey>,
        policy: &Policy,
        now_ms: i64,
    ) -> Result<(), ApiError> {
        let rec = &policy.record;
        if rec.rpm.is_none() && rec.tpm.is_none() {
            return Ok(());
        }
        let held = self.rate_held(key);
        match rec.rpm.filter(|r| *r > 0) {
            Some(rpm) => {
                self.ensure_share(&held, Unit::Requests, u64::from(rpm), 1, now_ms)
                    .await
            }
            None => Ok(()),
        }
    }

    /// Before a request reserves its tokens: this node's share of the
    /// key's tpm window holds them (a round trip only when it does not).
    /// A request larger than the whole tpm is left to the gate to refuse.
    pub async fn ensure_tokens(
        &self,
        key: &Arc<LiveKey>,
        policy: &Policy,
        tokens: u64,
        now_ms: i64,
    ) -> Result<(), ApiError> {
        let Some(tpm) = policy.record.tpm else {
            return Ok(());
        };
        if tokens == 0 || tokens > tpm {
            return Ok(());
        }
        let held = self.rate_held(key);
        self.ensure_share(&held, Unit::Tokens, tpm, tokens, now_ms)
            .await
    }

    /// The take state of `key`'s rate windows, made on first use.
    fn rate_held(&self, key: &Arc<LiveKey>) -> Arc<RateHeld> {
        if let Some(h) = self.rates.get(&key.hash)
            && Arc::ptr_eq(&h.key, key)
        {
            return h.clone();
        }
        // The shares exist before any request of the key admits against
        // them (a single node's limiter is no longer consulted after).
        key.rate_share();
        let fresh = Arc::new(RateHeld {
            key: key.clone(),
            taking: [tokio::sync::Mutex::new(()), tokio::sync::Mutex::new(())],
            state: Mutex::new([RateState::default(); 2]),
        });
        let mut e = self.rates.entry(key.hash).or_insert_with(|| fresh.clone());
        if !Arc::ptr_eq(&e.key, key) {
            *e = fresh;
        }
        e.clone()
    }

    async fn ensure_share(
        &self,
        held: &Arc<RateHeld>,
        unit: Unit,
        limit: u64,
        need: u64,
        now_ms: i64,
    ) -> Result<(), ApiError> {
        let i = slot(unit);
        let last_grant = {
            let mut s = held.state.lock().unwrap_or_else(|e| e.into_inner());
            s[i].last_used_ms = mono_ms();
            s[i].last_grant
        };
        let free = held.key.share_free(unit, now_ms);
        if free >= need {
            // Take the next share before this one is out, so the requests
            // after it need not wait (not near a window's end: small
            // shares never prefetch).
            if free - need < last_grant / 4
                && let Some(me) = self.app().and_then(|a| a.cluster.get().cloned())
            {
                let held = held.clone();
                self.rt.spawn(async move {
                    if let Ok(_turn) = held.taking[i].try_lock() {
                        let _ = me.take_share(&held, unit, limit, need, now_ms).await;
                    }
                });
            }
            return Ok(());
        }
        let _turn = held.taking[i].lock().await;
        let free = held.key.share_free(unit, now_ms);
        if free >= need {
            return Ok(());
        }
        match self
            .take_share(held, unit, limit, need - free, now_ms)
            .await
        {
            Ok(_) => Ok(()),
            Err(e) => {
                self.note_down(&e);
                Err(database_unavailable())
            }
        }
    }

    /// One take of `unit` from the key's window of `now_ms`'s minute (the
    /// caller holds the unit's `taking`). `Ok(false)`: the window is full.
    async fn take_share(
        &self,
        held: &Arc<RateHeld>,
        unit: Unit,
        limit: u64,
        need: u64,
        now_ms: i64,
    ) -> Result<bool, String> {
        let i = slot(unit);
        let minute = minute_of(now_ms);
        let want = {
            let s = held.state.lock().unwrap_or_else(|e| e.into_inner())[i];
            if s.minute == minute && s.full_until_ms > mono_ms() {
                return Ok(false);
            }
            share_size(limit, need, s.minute == minute, s.last_grant)
        };
        let to_i64 = |n: u64| i64::try_from(n).unwrap_or(i64::MAX);
        let (limit_i, want_i, need_i) = (to_i64(limit), to_i64(want), to_i64(need));
        let pool = self.pool.clone();
        let hash = held.key.hash.to_vec();
        let row = self
            .run(async move {
                let c = pool.get().await.map_err(pool_error)?;
                // The one statement that raises `taken`, guarded on the row
                // it locks: never past the limit, whatever the interleaving.
                c.query_opt(
                    "INSERT INTO tollgate_rate_windows AS w (hash, minute, unit, taken, last_grant) \
                     SELECT $1, $2, $3, g, g FROM (SELECT CASE WHEN $4::int8 >= 2 * $5::int8 \
                     THEN $5::int8 ELSE $6::int8 END AS g) AS first \
                     ON CONFLICT (hash, minute, unit) DO UPDATE SET \
                     taken = w.taken + CASE WHEN $4::int8 - w.taken >= 2 * $5::int8 THEN $5::int8 ELSE $6::int8 END, \
                     last_grant = CASE WHEN $4::int8 - w.taken >= 2 * $5::int8 THEN $5::int8 ELSE $6::int8 END \
                     WHERE w.taken + $6::int8 <= $4::int8 \
                     RETURNING taken, last_grant",
                    &[&hash, &i64::from(minute), &unit.as_str(), &limit_i, &want_i, &need_i],
                )
                .await
                .map_err(db).map(count(Kind::Rate, 2))
            })
            .await?;
        self.note_up();
        let mut s = held.state.lock().unwrap_or_else(|e| e.into_inner());
        let st = &mut s[i];
        if st.minute != minute {
            *st = RateState {
                minute,
                last_used_ms: st.last_used_ms,
                last_grant: st.last_grant,
                ..RateState::default()
            };
        }
        match row {
            None => {
                st.full_until_ms = mono_ms() + self.exhausted_pause_ms();
                Ok(false)
            }
            Some(r) => {
                let taken: i64 = r.get(0);
                let granted: i64 = r.get(1);
                st.last_grant = granted.max(0) as u64;
                drop(s);
                held.key
                    .share_add(unit, minute, granted.max(0) as u64, taken.max(0) as u64);
                Ok(true)
            }
        }
    }

    /// Gives back the unused shares of the current minute that no request
    /// looked at for a settle tick (all of them with `all`: shutdown), and
    /// forgets keys whose shares are of a minute gone by.
    pub(super) async fn return_rates(&self, all: bool) {
        if self.rates.is_empty() {
            return;
        }
        let Some(app) = self.app() else {
            return;
        };
        let now_ms = app.clock.now_ms();
        let minute = minute_of(now_ms);
        let idle_ms = if all {
            -1
        } else {
            self.cfg.sync_interval.as_millis() as i64 / 4
        };
        let mono = mono_ms();
        // Keys with nothing this minute are dropped from the map (a later
        // request makes them again).
        self.rates.retain(|_, h| {
            let s = h.state.lock().unwrap_or_else(|e| e.into_inner());
            s.iter().any(|u| u.minute >= minute.saturating_sub(1))
        });
        let held: Vec<Arc<RateHeld>> = self.rates.iter().map(|h| h.value().clone()).collect();
        for h in held {
            for unit in [Unit::Requests, Unit::Tokens] {
                let i = slot(unit);
                let idle = {
                    let s = h.state.lock().unwrap_or_else(|e| e.into_inner());
                    s[i].minute == minute && mono - s[i].last_used_ms > idle_ms
                };
                if !idle {
                    continue;
                }
                let back = h.key.share_free(unit, now_ms);
                if back == 0 || !h.key.share_take_back(unit, minute, back) {
                    continue;
                }
                let pool = self.pool.clone();
                let hash = h.key.hash.to_vec();
                let n = i64::try_from(back).unwrap_or(i64::MAX);
                let given = self
                    .run(async move {
                        let c = pool.get().await.map_err(pool_error)?;
                        c.execute(
                            "UPDATE tollgate_rate_windows SET taken = taken - $4 \
                             WHERE hash = $1 AND minute = $2 AND unit = $3 AND taken >= $4",
                            &[&hash, &i64::from(minute), &unit.as_str(), &n],
                        )
                        .await
                        .map_err(db)
                        .map(count(Kind::RateReturn, 2))
                    })
                    .await;
                match given {
                    Ok(_) => {
                        let mut s = h.state.lock().unwrap_or_else(|e| e.into_inner());
                        // Given back because unused: the next take is small.
                        s[i].last_grant /= 2;
                    }
                    Err(e) => {
                        self.note_down(&e);
                        // Still this node's: admission may use it again.
                        h.key.share_add(unit, minute, back, 0);
                    }
                }
            }
        }
    }

    /// Deletes windows of minutes gone by (once a minute, by any node that
    /// uses them).
    pub(super) async fn prune_rates(&self, minute: u32) -> Result<(), String> {
        let pool = self.pool.clone();
        let before = i64::from(minute) - 2;
        self.run(async move {
            let c = pool.get().await.map_err(pool_error)?;
            c.execute(
                "DELETE FROM tollgate_rate_windows WHERE minute < $1",
                &[&before],
            )
            .await
            .map_err(db)
            .map(count(Kind::RateReturn, 2))
        })
        .await
        .map(|_| ())
    }
}

#[cfg(test)]
mod tests {
    use super::share_size;

    #[test]
    fn shares_grow_with_demand_and_stay_small_for_small_limits() {
        // rpm 30: one request at a time, never more than a quarter.
        assert_eq!(share_size(30, 1, false, 0), 1);
        assert_eq!(share_size(30, 1, true, 1), 2);
        assert_eq!(share_size(30, 1, true, 4), 7);
        assert_eq!(share_size(30, 1, true, 7), 7);
        // A new minute starts from half the last.
        assert_eq!(share_size(30, 1, false, 7), 3);
        // tpm 100 000: 1/32 first, doubling up to 25 000.
        assert_eq!(share_size(100_000, 50, false, 0), 3_125);
        assert_eq!(share_size(100_000, 50, true, 16_000), 25_000);
        // At least what the request needs.
        assert_eq!(share_size(100_000, 40_000, true, 1), 40_000);
    }
}
