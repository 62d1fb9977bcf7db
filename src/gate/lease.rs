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
                Ok(_) => return true,
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
