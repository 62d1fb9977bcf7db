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
use crate::clock::Period;

/// A period as the database counts it: its kind (`limit_reset`) and id.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct At {
    /// `daily`, `weekly`, `monthly`: ids of different kinds do not compare.
    pub kind: &'static str,
    /// [`Period::id`].
    pub id: i64,
}

impl At {
    /// The period of `reset` that contains `at_ms`.
    pub fn of(reset: Period, at_ms: i64) -> At {
        At {
            kind: reset.as_str(),
            id: reset.id(at_ms),
        }
    }
}

/// Whether a row (`period_kind`, `period`, with the statement's `$k`, `$p`
/// as the period seen) is to be rolled: a later period of its kind, or
/// another kind (its `limit_reset` changed).
const LATER: &str = "(period_kind IS DISTINCT FROM $k OR period < $p)";

/// What `period_usage` becomes when rolled: zero for a later period of the
/// same kind; on a change of kind what counts keeps counting, and on a row
/// that never had a period (a key that got its `limit_reset` after it was
/// used) what it spent so far, as the store's `ResetChange::Enter` does.
const ROLLED: &str = "CASE WHEN period_kind IS NULL THEN usage \
     WHEN period_kind <> $k THEN period_usage ELSE 0 END";

/// `sql` with the placeholders of [`LATER`] and [`ROLLED`] numbered.
fn numbered(sql: &str, k: usize, p: usize) -> String {
    sql.replace("$k", &format!("${k}::text"))
        .replace("$p", &format!("${p}::int8"))
}

/// Rolls `hash`'s row to `at` when it is not in it yet, inside the caller's
/// transaction (it takes the row's lock, the subject-first lock order of
/// `lease`). A node whose clock is behind the row's period rolls nothing.
pub async fn roll(tx: &impl GenericClient, hash: &[u8], at: At) -> Result<(), String> {
    let sql = numbered(
        &format!(
            "UPDATE tollgate_keys SET period_usage = {ROLLED}, period = $p, period_kind = $k \
             WHERE hash = $1 AND {LATER}"
        ),
        2,
        3,
    );
    tx.execute(&sql, &[&hash, &at.kind, &at.id])
        .await
        .map_err(db)
        .map(count(Kind::Lease, 2))?;
    Ok(())
}

/// The free credit of a key leased per period, as SQL over its row.
pub const FREE: &str = "key_limit - period_usage - leased";

/// Counts settled charges into their keys' periods, inside the settlement's
/// transaction, before it adds them to `usage` (a roll from no period takes
/// the usage before this batch): `charges` is (key, period, amount).
/// Periods in order, one statement per period, so a batch that spans a
/// boundary rolls each key once, forward.
pub async fn settle(tx: &impl GenericClient, charges: &[(Vec<u8>, At, i64)]) -> Result<(), String> {
    let mut per: BTreeMap<(&str, i64), BTreeMap<&[u8], i64>> = BTreeMap::new();
    for (hash, at, amount) in charges {
        *per.entry((at.kind, at.id))
            .or_default()
            .entry(hash.as_slice())
            .or_default() += amount;
    }
    for ((kind, id), keys) in per {
        let (hs, cs): (Vec<&[u8]>, Vec<i64>) = keys.into_iter().unzip();
        // A refund (negative) gives back, not below zero, as on one node;
        // a charge of an ended period counts in `usage` only.
        let sql = numbered(
            &format!(
                "UPDATE tollgate_keys k SET \
                 period_usage = GREATEST(CASE WHEN {LATER} THEN {ROLLED} + d.c \
                     WHEN period = $p THEN period_usage + d.c ELSE period_usage END, 0), \
                 period = CASE WHEN {LATER} THEN $p ELSE period END, period_kind = $k \
                 FROM UNNEST($1::bytea[], $2::int8[]) AS d(h, c) WHERE k.hash = d.h"
            ),
            3,
            4,
        );
        tx.execute(&sql, &[&hs, &cs, &kind, &id])
            .await
            .map_err(db)
            .map(count(Kind::Settle, 2))?;
    }
    Ok(())
}

/// What counts against a `limit_reset` key's limit in the period `now`,
/// from its row (`period_kind`, `period`, `period_usage`, `usage`), as the
/// next statement that sees `now` would leave it.
pub fn spent_in(now: At, kind: Option<&str>, period: i64, period_usage: i64, usage: i64) -> i64 {
    match kind {
        None => usage,
        Some(k) if k != now.kind => period_usage,
        Some(_) if period >= now.id => period_usage,
        Some(_) => 0,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_period_not_rolled_yet_has_spent_nothing() {
        let now = At {
            kind: "daily",
            id: 100,
        };
        let d = Some("daily");
        assert_eq!(spent_in(now, d, 100, 7, 50), 7);
        assert_eq!(spent_in(At { id: 101, ..now }, d, 100, 7, 50), 0);
        // This node's clock behind the database's: the newer period counts.
        assert_eq!(spent_in(At { id: 99, ..now }, d, 100, 7, 50), 7);
        // Never rolled (the reset came after the key was used).
        assert_eq!(spent_in(now, None, 0, 0, 50), 50);
        // Another kind (the reset changed): what counts keeps counting.
        assert_eq!(spent_in(now, Some("weekly"), 3000, 7, 50), 7);
    }

    #[test]
    fn placeholders_are_numbered() {
        assert_eq!(
            numbered(LATER, 2, 3),
            "(period_kind IS DISTINCT FROM $2::text OR period < $3::int8)"
        );
    }
}
