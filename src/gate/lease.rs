//! A key's `limit` as a lease counter, for `crate::cluster` (cluster mode
//! only; a single node never calls these).
//!
//! In cluster mode a key with its own limit (and no account paying for it)
//! must not spend its whole limit on every node. So `limit` stops being the
//! key's limit on this node and becomes `committed` plus what this node
//! holds of it: admission (`try_commit`, unchanged, no new cost) then admits
//! against the lease exactly as it admits against a limit. The real limit
//! lives in the database, which hands out the slices.

use std::sync::atomic::Ordering;

use super::{LiveKey, UNLIMITED};

impl LiveKey {
    /// Turns `limit` into a lease counter with nothing leased yet (what is
    /// left to admit becomes 0). `false` for a key without a limit, which
    /// needs no lease. Call before any request of the key reserves in
    /// cluster mode (its first `ensure`), when nothing is reserved.
    pub fn lease_start(&self) -> bool {
        let mut cur = self.limit.load(Ordering::Acquire);
        loop {
            if cur == UNLIMITED {
                return false;
            }
            let committed = self.committed.load(Ordering::Acquire);
            match self
                .limit
                .compare_exchange(cur, committed, Ordering::AcqRel, Ordering::Acquire)
            {
                Ok(_) => {
                    self.leased.store(true, Ordering::Release);
                    return true;
                }
                Err(actual) => cur = actual,
            }
        }
    }

    /// What admission may still take: the lease's unused part.
    pub fn lease_headroom(&self) -> i64 {
        let limit = self.limit.load(Ordering::Acquire);
        if limit == UNLIMITED {
            return i64::MAX;
        }
        limit - self.committed.load(Ordering::Acquire)
    }

    /// A slice taken from the database: admission may take it.
    pub fn lease_add(&self, amount: i64) {
        self.limit.fetch_add(amount, Ordering::AcqRel);
    }

    /// Takes `amount` of the unused lease back out of admission's reach
    /// (to return it, or because it is no longer this node's). Reserved
    /// like a request first, so no concurrent admission can take it too.
    pub fn lease_take_back(&self, amount: i64) -> bool {
        if amount <= 0 {
            return true;
        }
        if self.try_commit(amount).is_err() {
            return false;
        }
        // limit first: in between, less is admissible, never more.
        self.limit.fetch_sub(amount, Ordering::AcqRel);
        self.committed.fetch_sub(amount, Ordering::AcqRel);
        true
    }

    /// A refund gave `amount` back to what the key may spend here
    /// (`Gate::refund` lowered `committed`): in cluster mode that credit is
    /// the database's to hand out, so the lease counter comes down with it.
    pub fn lease_refunded(&self, amount: i64) {
        self.limit.fetch_sub(amount, Ordering::AcqRel);
    }
}

/// The concurrency slots of a key, leased the same way: `slots` caps the
/// requests in flight on this node, and grows only by slots taken from the
/// database (where Σ slots ≤ the key's `concurrency`).
impl LiveKey {
    /// Starts counting slots with none held (what is in flight counts as
    /// held: nothing is, on a key's first use in cluster mode).
    pub fn slots_start(&self) {
        let _ = self.slots.compare_exchange(
            u32::MAX,
            self.in_flight.load(Ordering::Acquire),
            Ordering::AcqRel,
            Ordering::Acquire,
        );
    }

    /// Slots held and not in use.
    pub fn slots_free(&self) -> i64 {
        i64::from(self.slots.load(Ordering::Acquire)) - i64::from(self.in_flight())
    }

    /// Slots taken from the database.
    pub fn slots_add(&self, n: i64) {
        let n = u32::try_from(n.max(0)).unwrap_or(u32::MAX);
        let _ = self
            .slots
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |s| {
                Some(s.saturating_add(n).min(u32::MAX - 1))
            });
    }

    /// Takes `n` unused slots out of reach (to return them): each is taken
    /// like a request's (the same compare-and-swap admission uses), so no
    /// request is admitted into a slot being returned.
    pub fn slots_take_back(&self, n: i64) -> bool {
        let Ok(n) = u32::try_from(n) else {
            return false;
        };
        if n == 0 {
            return true;
        }
        let cap = self.slots.load(Ordering::Acquire);
        let taken = self
            .in_flight
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |f| {
                (f.saturating_add(n) <= cap).then_some(f + n)
            });
        if taken.is_err() {
            return false;
        }
        // slots first: in between, fewer may be admitted, never more.
        self.slots.fetch_sub(n, Ordering::AcqRel);
        self.in_flight.fetch_sub(n, Ordering::AcqRel);
        true
    }
}
