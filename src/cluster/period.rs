//! A key's own `limit` that starts again each UTC period (`limit_reset`),
//! leased across the nodes like a lifetime limit.
//!
//! The database holds the key's spend in its current period
//! (`tollgate_keys.period`, `period_usage`), and a node's slice is taken
//! from `key_limit − period_usage − leased`. Whichever statement first sees
//! a later period (a node's take, at its clock; a settlement, at the
//! charge's `at_ms`) rolls the row under its lock, in the same statement
//! that uses it (`WHERE period < $p`), so a period rolls once and exactly.
//!
//! Slices are not per period: what a node holds unused at the roll stays
//! its own and counts against the new period (it is still in `leased`,
//! which the new period's free credit subtracts). So in every period
//! `period_usage + leased ≤ key_limit` holds, as `usage + leased ≤
//! key_limit` does for a lifetime limit: a take checks it, a settlement
//! moves a charge from `leased` to `period_usage`, and a roll only lowers
//! `period_usage`. Each charge counts into the period of its `at_ms`, as
//! the single node's store counts it; one of a period already over counts
//! only in the lifetime `usage` (an earlier period is never reopened).

use std::collections::BTreeMap;

use deadpool_postgres::GenericClient;

use super::schema::db;
use super::trips::{Kind, count};

/// What `period_usage` becomes when a statement rolls the row to a later
/// period: zero, except on a row that never had one (period 0, a key that
/// got its `limit_reset` after it was used): then what it spent so far
/// keeps counting in this period, as the store's `ResetChange::Enter` does.
const ROLLED: &str = "CASE WHEN period = 0 THEN usage ELSE 0 END";

/// Rolls `hash`'s row to `period` when it is in an earlier one, inside the
/// caller's transaction (it takes the row's lock, the subject-first lock
/// order of `lease`).
pub async fn roll(tx: &impl GenericClient, hash: &[u8], period: i64) -> Result<(), String> {
    tx.execute(
        &format!(
            "UPDATE tollgate_keys SET period_usage = {ROLLED}, period = $2 \
             WHERE hash = $1 AND period < $2"
        ),
        &[&hash, &period],
    )
    .await
    .map_err(db)
    .map(count(Kind::Lease, 2))?;
    Ok(())
}

/// The free credit of a key leased per period, as SQL over its row.
pub const FREE: &str = "key_limit - period_usage - leased";

/// Counts settled charges into their keys' periods, inside the settlement's
/// transaction, before it adds them to `usage` (a roll from period 0 takes
/// the usage before this batch): `charges` is (key, period id, amount).
/// Periods in order, one statement per period, so a batch that spans a
/// boundary rolls each key once, forward.
pub async fn settle(
    tx: &impl GenericClient,
    charges: &[(Vec<u8>, i64, i64)],
) -> Result<(), String> {
    let mut per: BTreeMap<i64, BTreeMap<&[u8], i64>> = BTreeMap::new();
    for (hash, period, amount) in charges {
        *per.entry(*period)
            .or_default()
            .entry(hash.as_slice())
            .or_default() += amount;
    }
    for (period, keys) in per {
        let (hs, cs): (Vec<&[u8]>, Vec<i64>) = keys.into_iter().unzip();
        // A refund (negative) gives back, not below zero, as on one node.
        tx.execute(
            &format!(
                "UPDATE tollgate_keys k SET \
                 period_usage = GREATEST(CASE WHEN $2::int8 > k.period THEN {ROLLED} + d.c \
                     WHEN $2::int8 = k.period THEN k.period_usage + d.c \
                     ELSE k.period_usage END, 0), \
                 period = GREATEST(k.period, $2::int8) \
                 FROM UNNEST($1::bytea[], $3::int8[]) AS d(h, c) WHERE k.hash = d.h"
            ),
            &[&hs, &period, &cs],
        )
        .await
        .map_err(db)
        .map(count(Kind::Settle, 2))?;
    }
    Ok(())
}

/// What counts against a `limit_reset` key's limit in the period `now_id`,
/// from its row (`period`, `period_usage`, `usage`): a row not rolled yet
/// to `now_id` has spent nothing in it (or, never rolled, its usage).
pub fn spent_in(now_id: i64, period: i64, period_usage: i64, usage: i64) -> i64 {
    if period >= now_id {
        period_usage
    } else if period == 0 {
        usage
    } else {
        0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_period_not_rolled_yet_has_spent_nothing() {
        assert_eq!(spent_in(100, 100, 7, 50), 7);
        assert_eq!(spent_in(101, 100, 7, 50), 0);
        // This node's clock behind the database's: the newer period counts.
        assert_eq!(spent_in(99, 100, 7, 50), 7);
        // Never rolled (the reset came after the key was used).
        assert_eq!(spent_in(100, 0, 0, 50), 50);
    }
}
