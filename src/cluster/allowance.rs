//! How a batch of settled charges splits between an account's allowance
//! and its balance in the database (schema version 10), by the local rule
//! ([`crate::store::allowance_part`]: allowance first, then balance).
//!
//! One thing a single node does not need: a node settles its charges in
//! batches, so a charge made before a lapse (a request served in the
//! period that ended, or before a cancel) may reach the database after
//! it. On one node such a charge was committed before the lapse, from the
//! old allowance. Here the lapse keeps what it took (`allowance_lapsed`,
//! at `allowance_lapsed_at_ms`) and a charge made before that instant is
//! taken from it first: the old period's allowance pays for the old
//! period's usage, and the new period's (or, the subscription ended, the
//! balance) is not charged for it.

/// Whether a settled charge on an account is taken from its allowance
/// first (then its balance), as the local store charges it: usage and
/// deducts are spending; a negative adjust is not (balance only, as
/// `AccountCreditKind::Adjust`), nor is a refund (negative).
pub fn draws_on_allowance(kind: &str, amount: i64) -> bool {
    amount > 0 && kind != "adjust"
}

/// One settlement batch's charges on one account.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct AccountCharges {
    /// Those spent like usage, (at_ms, amount): allowance first.
    pub draws: Vec<(i64, i64)>,
    /// Σ the others (balance only).
    pub other: i64,
    /// Σ what they add to `spent`.
    pub spent: i64,
}

/// An account's allowance columns, as locked for a settlement.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Allowance {
    /// What remains of the current period's grants.
    pub allowance: i64,
    /// What the last lapse took, less the late charges taken from it since.
    pub lapsed: i64,
    /// When the last lapse was applied (Unix ms; 0: none).
    pub lapsed_at_ms: i64,
}

/// Where a batch's charges that draw on the allowance come from.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Split {
    /// Out of what the last lapse took (charges made before it).
    pub from_lapsed: i64,
    /// Out of the current allowance.
    pub from_allowance: i64,
    /// Out of the balance: the rest.
    pub from_balance: i64,
}

/// Splits `charges` ((at_ms, amount), each positive and drawing on the
/// allowance) as if each had been committed at its instant, one by one: a
/// charge made before the last lapse from what it took, else from the
/// allowance; what neither covers from the balance. Their order does not
/// matter: of positive charges a pool covers min(Σ, pool) in any order.
pub fn split(a: Allowance, charges: &[(i64, i64)]) -> Split {
    let (mut allowance, mut lapsed) = (a.allowance, a.lapsed);
    let mut s = Split::default();
    for &(at_ms, amount) in charges {
        let pool = if at_ms < a.lapsed_at_ms {
            &mut lapsed
        } else {
            &mut allowance
        };
        let part = crate::store::allowance_part(*pool, amount);
        *pool -= part;
        if at_ms < a.lapsed_at_ms {
            s.from_lapsed += part;
        } else {
            s.from_allowance += part;
        }
        s.from_balance += amount - part;
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spending_draws_on_the_allowance_first() {
        assert!(draws_on_allowance("usage", 5));
        assert!(draws_on_allowance("deduct", 5));
        // A negative adjust moves the balance only, as on one node.
        assert!(!draws_on_allowance("adjust", 5));
        assert!(!draws_on_allowance("usage", 0));
        assert!(!draws_on_allowance("usage", -5));
    }

    #[test]
    fn the_allowance_first_then_the_balance() {
        let a = Allowance {
            allowance: 5,
            ..Allowance::default()
        };
        // 3 + 2 from the allowance, then 4 − 0 … the rest from the balance.
        let s = split(a, &[(1, 3), (2, 4), (3, 2)]);
        assert_eq!(
            s,
            Split {
                from_lapsed: 0,
                from_allowance: 5,
                from_balance: 4
            }
        );
        // In another order, the same split.
        assert_eq!(split(a, &[(3, 2), (1, 3), (2, 4)]), s);
        // Nothing left of it: all from the balance.
        let s = split(Allowance::default(), &[(1, 3)]);
        assert_eq!((s.from_allowance, s.from_balance), (0, 3));
        // An allowance below zero covers nothing.
        let s = split(
            Allowance {
                allowance: -2,
                ..Allowance::default()
            },
            &[(1, 3)],
        );
        assert_eq!((s.from_allowance, s.from_balance), (0, 3));
    }

    #[test]
    fn a_charge_made_before_a_lapse_is_paid_by_what_lapsed() {
        // Period 0 left 3 when it lapsed at t=100; period 1 granted 4.
        let a = Allowance {
            allowance: 4,
            lapsed: 3,
            lapsed_at_ms: 100,
        };
        // Made at 90 and 95 (settled late): 2 + 1 from what lapsed, 1 from
        // the balance (period 0 had no more); made at 120: period 1's.
        let s = split(a, &[(90, 2), (95, 2), (120, 3)]);
        assert_eq!(
            s,
            Split {
                from_lapsed: 3,
                from_allowance: 3,
                from_balance: 1
            }
        );
        // A subscription that ended (no new grant): the balance is not
        // charged for what the ended period's allowance covered.
        let ended = Allowance {
            allowance: 0,
            lapsed: 3,
            lapsed_at_ms: 100,
        };
        assert_eq!(split(ended, &[(90, 2)]).from_balance, 0);
        assert_eq!(split(ended, &[(110, 2)]).from_balance, 2);
    }
}
