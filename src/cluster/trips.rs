//! Database round trips, counted by the kind of statement they were for:
//! `tollgate_cluster_db_roundtrips_total{kind}` in `/metrics` (what
//! `bench/cluster.sh` divides by the requests served).
//!
//! One round trip is one exchange with the server that the node waits
//! for: a statement with parameters is two (tokio-postgres prepares the
//! text first: Parse/Describe, then Bind/Execute), `BEGIN`, `COMMIT` and a
//! simple query (`batch_execute`) one each. Counted when the statement
//! succeeded. The counters are the process's (one cluster per process).

use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};

/// What a statement was for (the metric's `kind` label).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    /// Taking, lowering or giving back a lease (credit, a key's limit, slots).
    Lease,
    /// Extending this node's leases.
    Renew,
    /// Returning expired leases (anyone's) or this node's previous run's.
    Reclaim,
    /// Writing settled charges and usage records.
    Settle,
    /// Writing an admin change.
    Change,
    /// Pulling other nodes' changes.
    Pull,
    /// Taking a share of a key's rpm or tpm window.
    Rate,
    /// Giving an unused rate share back, pruning old windows.
    RateReturn,
    /// The admin and usage APIs' reads.
    Read,
    /// Migrations at start.
    Migrate,
    /// Shipping events, claiming deliveries and writing their outcome.
    Outbox,
}

const KINDS: [(Kind, &str); 11] = [
    (Kind::Lease, "lease"),
    (Kind::Renew, "renew"),
    (Kind::Reclaim, "reclaim"),
    (Kind::Settle, "settle"),
    (Kind::Change, "change"),
    (Kind::Pull, "pull"),
    (Kind::Rate, "rate"),
    (Kind::RateReturn, "rate_return"),
    (Kind::Read, "read"),
    (Kind::Migrate, "migrate"),
    (Kind::Outbox, "outbox"),
];

static TRIPS: [AtomicU64; 11] = [const { AtomicU64::new(0) }; 11];

fn index(kind: Kind) -> usize {
    KINDS
        .iter()
        .position(|(k, _)| *k == kind)
        .expect("every kind is listed")
}

/// Counts `n` round trips of `kind` when the statement's result passes
/// through: `.map_err(db).map(count(Kind::Lease, 2))`.
pub fn count<T>(kind: Kind, n: u64) -> impl FnOnce(T) -> T {
    move |v| {
        TRIPS[index(kind)].fetch_add(n, Ordering::Relaxed);
        v
    }
}

/// Round trips of `kind` so far.
pub fn total(kind: Kind) -> u64 {
    TRIPS[index(kind)].load(Ordering::Relaxed)
}

/// The counters in Prometheus' text format.
pub fn render(out: &mut String) {
    out.push_str(
        "# HELP tollgate_cluster_db_roundtrips_total Round trips to the database, by the kind of statement.\n\
         # TYPE tollgate_cluster_db_roundtrips_total counter\n",
    );
    for (kind, name) in KINDS {
        let _ = writeln!(
            out,
            "tollgate_cluster_db_roundtrips_total{{kind=\"{name}\"}} {}",
            total(kind)
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counted_and_rendered() {
        let before = total(Kind::Migrate);
        let r: Result<u8, String> = Ok(7);
        assert_eq!(r.map(count(Kind::Migrate, 2)), Ok(7));
        let e: Result<u8, String> = Err("no".into());
        assert!(e.map(count(Kind::Migrate, 2)).is_err());
        assert_eq!(total(Kind::Migrate), before + 2);
        let mut out = String::new();
        render(&mut out);
        assert!(out.contains("tollgate_cluster_db_roundtrips_total{kind=\"settle\"} "));
        assert_eq!(out.lines().count(), 2 + KINDS.len());
    }
}
