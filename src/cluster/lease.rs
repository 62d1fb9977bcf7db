//! How big a slice of an account's credit a node takes, and the
//! statements that take, settle, renew, return and reclaim it.
//!
//! Σ leases ≤ what remains holds because the only statement that raises
//! `leased` checks `allowance + balance + overdraft − leased ≥ grant` on
//! the row it locks; settling moves a charge out of `allowance` (first,
//! as on one node) and `balance`, and the lease, together.

use deadpool_postgres::GenericClient;

use super::config::{ClusterConfig, LeaseSize};
use super::schema::db;
use super::trips::{Kind, count};

/// The slice to ask for: `lease` of what remains (`free`), between the
/// floor and the ceiling, and at least `need` (what the waiting request
/// lacks). When less than twice the floor remains, just `need`: near the
/// end every request takes exactly its own bound, so the last cent goes
/// to whichever request fits it, at the price of a round trip each.
pub fn slice(cfg: &ClusterConfig, free: i64, need: i64) -> i64 {
    let need = need.max(1);
    if free < cfg.lease_floor.0.saturating_mul(2) {
        return need;
    }
    let target = match cfg.lease {
        LeaseSize::Share(ppm) => ((free as i128 * ppm as i128) / 1_000_000) as i64,
        LeaseSize::Amount(a) => a.0,
    };
    target
        .clamp(cfg.lease_floor.0, cfg.lease_ceiling.0)
        .max(need)
}

/// What a lease is taken from: an account's credit, or the limit of a key
/// that no account pays for.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum Subject {
    Account(std::sync::Arc<str>),
    Key(crate::store::KeyHash),
    /// A key's concurrency slots (counted in slots, not picoUSD).
    Slots(crate::store::KeyHash),
}

impl Subject {
    /// The table holding the subject's money, its key column, and what is
    /// free of it (not spent, not leased).
    fn money(&self) -> (&'static str, &'static str, &'static str) {
        match self {
            // The allowance is spendable like the balance (and spent
            // first); one below zero (a grant given back) counts as none.
            Subject::Account(_) => (
                "tollgate_accounts",
                "id",
                "GREATEST(allowance, 0) + balance + overdraft - leased",
            ),
            Subject::Key(_) => ("tollgate_keys", "hash", "key_limit - usage - leased"),
            // A key's own `concurrency`, else the cap the taking node
            // passes (a subscription plan's template: every node derives
            // the same from the same plan; see [`free_of`]).
            Subject::Slots(_) => ("tollgate_keys", "hash", "concurrency - slots_leased"),
        }
    }

    /// The column that sums its leases.
    fn leased(&self) -> &'static str {
        match self {
            Subject::Slots(_) => "slots_leased",
            _ => "leased",
        }
    }

    /// The table of its leases and their subject column.
    fn leases(&self) -> (&'static str, &'static str) {
        match self {
            Subject::Account(_) => ("tollgate_leases", "account_id"),
            Subject::Key(_) => ("tollgate_key_leases", "hash"),
            Subject::Slots(_) => ("tollgate_slot_leases", "hash"),
        }
    }
}

/// What is free of `subject`, as SQL: [`Subject::money`]'s expression,
/// except that a key's slots are counted against `cap` (statement
/// parameter `param`) when the key has no `concurrency` of its own, and a
/// key's limit that starts again each period (`period`) against what it
/// spent in the period ([`super::period::FREE`]).
fn free_of(
    subject: &Subject,
    free: &'static str,
    param: usize,
    cap: Option<i64>,
    period: Option<super::period::At>,
) -> String {
    match (subject, cap, period) {
        (Subject::Slots(_), Some(_), _) => {
            format!("COALESCE(concurrency, ${param}::int8) - slots_leased")
        }
        (Subject::Key(_), _, Some(_)) => super::period::FREE.to_owned(),
        _ => free.to_owned(),
    }
}

/// A subject's id as a statement parameter.
enum Id {
    Text(String),
    Bytes(Vec<u8>),
}

/// A key's hash (the only subject a period applies to).
fn id_bytes(id: &Id) -> &[u8] {
    match id {
        Id::Bytes(b) => b,
        Id::Text(t) => t.as_bytes(),
    }
}

impl Id {
    fn of(s: &Subject) -> Id {
        match s {
            Subject::Account(a) => Id::Text(a.to_string()),
            Subject::Key(k) | Subject::Slots(k) => Id::Bytes(k.to_vec()),
        }
    }

    fn sql(&self) -> &(dyn tokio_postgres::types::ToSql + Sync) {
        match self {
            Id::Text(t) => t,
            Id::Bytes(b) => b,
        }
    }
}

/// What a successful take gave this node.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Grant {
    /// picoUSD added to this node's lease.
    pub amount: i64,
    /// What remains free on the subject after it.
    pub free_after: i64,
}

/// Takes a slice of `subject`'s free credit for this node: at least `min`,
/// up to the sized slice. `None` when not even `min` is free (or the
/// subject is unknown to the database, or has no limit).
///
/// `cap`: for [`Subject::Slots`], the concurrency that applies when the key
/// has none of its own (its plan's template); `None` otherwise.
/// `period`: for a [`Subject::Key`] whose limit starts again each period,
/// the id of the period at this node's clock (the row is rolled to it
/// first, [`super::period::roll`]); `None` otherwise.
pub async fn take(
    c: &mut deadpool_postgres::Client,
    cfg: &ClusterConfig,
    subject: &Subject,
    need: i64,
    min: i64,
    cap: Option<i64>,
    period: Option<super::period::At>,
) -> Result<Option<Grant>, String> {
    let (table, col, free) = subject.money();
    let cap = cap.filter(|_| matches!(subject, Subject::Slots(_)));
    let (leases, lcol) = subject.leases();
    let leased = subject.leased();
    let id = Id::of(subject);
    let tx = c
        .transaction()
        .await
        .map_err(db)
        .map(count(Kind::Lease, 1))?;
    let period = period.filter(|_| matches!(subject, Subject::Key(_)));
    if let Some(p) = period {
        super::period::roll(&tx, id_bytes(&id), p).await?;
    }
    let free_sql = free_of(subject, free, 2, cap, period);
    let select = format!(
        "SELECT {free_sql} FROM {table} WHERE {col} = $1 AND NOT deleted AND {free_sql} IS NOT NULL FOR UPDATE"
    );
    let select_params: Vec<&(dyn tokio_postgres::types::ToSql + Sync)> = match &cap {
        Some(cap) => vec![id.sql(), cap],
        None => vec![id.sql()],
    };
    let Some(row) = tx
        .query_opt(&select, &select_params)
        .await
        .map_err(db)
        .map(count(Kind::Lease, 2))?
    else {
        return Ok(None);
    };
    let free_now: i64 = row.get(0);
    let amount = match subject {
        // Slots are taken as needed, one request's at a time.
        Subject::Slots(_) => need.max(1),
        _ => slice(cfg, free_now, need),
    }
    .min(free_now);
    if amount < min.max(1) {
        return Ok(None);
    }
    // The one statement that raises `leased`, guarded on the locked row.
    let free_sql = free_of(subject, free, 3, cap, period);
    let update = format!(
        "UPDATE {table} SET {leased} = {leased} + $2 WHERE {col} = $1 AND {free_sql} >= $2 RETURNING {free_sql}"
    );
    let update_params: Vec<&(dyn tokio_postgres::types::ToSql + Sync)> = match &cap {
        Some(cap) => vec![id.sql(), &amount, cap],
        None => vec![id.sql(), &amount],
    };
    let updated = tx
        .query_opt(&update, &update_params)
        .await
        .map_err(db)
        .map(count(Kind::Lease, 2))?;
    let Some(updated) = updated else {
        return Ok(None);
    };
    let ttl_ms = cfg.lease_ttl.as_millis() as f64;
    tx.execute(
        &format!(
            "INSERT INTO {leases} ({lcol}, node_id, amount, expires_at) \
             VALUES ($1, $2, $3, now() + $4::float8 * interval '1 millisecond') \
             ON CONFLICT ({lcol}, node_id) DO UPDATE \
             SET amount = {leases}.amount + excluded.amount, expires_at = excluded.expires_at"
        ),
        &[id.sql(), &cfg.node_id, &amount, &ttl_ms],
    )
    .await
    .map_err(db)
    .map(count(Kind::Lease, 2))?;
    tx.commit().await.map_err(db).map(count(Kind::Lease, 1))?;
    Ok(Some(Grant {
        amount,
        free_after: updated.get(0),
    }))
}

/// Gives `amount` of this node's lease on `subject` back; returns what was
/// given back (less when the lease was reclaimed meanwhile).
pub async fn give_back(
    c: &mut deadpool_postgres::Client,
    node: &str,
    subject: &Subject,
    amount: i64,
) -> Result<i64, String> {
    let (table, col, _) = subject.money();
    let (leases, lcol) = subject.leases();
    let leased = subject.leased();
    let id = Id::of(subject);
    let tx = c
        .transaction()
        .await
        .map_err(db)
        .map(count(Kind::Lease, 1))?;
    let back = lease_down(&tx, node, subject, amount).await?;
    tx.execute(
        &format!("UPDATE {table} SET {leased} = {leased} - $2 WHERE {col} = $1"),
        &[id.sql(), &back],
    )
    .await
    .map_err(db)
    .map(count(Kind::Lease, 2))?;
    tx.execute(
        &format!("DELETE FROM {leases} WHERE {lcol} = $1 AND node_id = $2 AND amount <= 0"),
        &[id.sql(), &node],
    )
    .await
    .map_err(db)
    .map(count(Kind::Lease, 2))?;
    tx.commit().await.map_err(db).map(count(Kind::Lease, 1))?;
    Ok(back)
}

/// Lowers this node's lease row by up to `amount` (not below 0), inside
/// the caller's transaction; returns by how much. The caller lowers the
/// subject's `leased` by the same.
pub async fn lease_down(
    tx: &impl GenericClient,
    node: &str,
    subject: &Subject,
    amount: i64,
) -> Result<i64, String> {
    let (table, col, _) = subject.money();
    let (leases, lcol) = subject.leases();
    let id = Id::of(subject);
    // One lock order for every writer: the subject's row, then its lease
    // (as `take` does), so two transactions never wait on each other.
    tx.execute(
        &format!("SELECT 1 FROM {table} WHERE {col} = $1 FOR UPDATE"),
        &[id.sql()],
    )
    .await
    .map_err(db)
    .map(count(Kind::Lease, 2))?;
    let row = tx
        .query_opt(
            &format!("SELECT amount FROM {leases} WHERE {lcol} = $1 AND node_id = $2 FOR UPDATE"),
            &[id.sql(), &node],
        )
        .await
        .map_err(db)
        .map(count(Kind::Lease, 2))?;
    let held: i64 = row.map(|r| r.get(0)).unwrap_or(0);
    let down = amount.clamp(0, held.max(0));
    if down > 0 {
        tx.execute(
            &format!("UPDATE {leases} SET amount = amount - $3 WHERE {lcol} = $1 AND node_id = $2"),
            &[id.sql(), &node, &down],
        )
        .await
        .map_err(db)
        .map(count(Kind::Lease, 2))?;
    }
    Ok(down)
}

/// Extends every lease of `node`; returns the subjects whose lease still
/// exists (one reclaimed by another node after expiry is gone).
pub async fn renew(
    c: &deadpool_postgres::Client,
    node: &str,
    ttl_ms: i64,
) -> Result<Vec<Subject>, String> {
    let ttl = ttl_ms as f64;
    let accounts = c
        .query(
            "UPDATE tollgate_leases SET expires_at = now() + $2::float8 * interval '1 millisecond' \
             WHERE node_id = $1 RETURNING account_id",
            &[&node, &ttl],
        )
        .await
        .map_err(db)
        .map(count(Kind::Renew, 2))?;
    let keys = c
        .query(
            "UPDATE tollgate_key_leases SET expires_at = now() + $2::float8 * interval '1 millisecond' \
             WHERE node_id = $1 RETURNING hash",
            &[&node, &ttl],
        )
        .await
        .map_err(db).map(count(Kind::Renew, 2))?;
    let mut out: Vec<Subject> = accounts
        .iter()
        .map(|r| Subject::Account(std::sync::Arc::from(r.get::<_, String>(0))))
        .collect();
    for r in &keys {
        let h: Vec<u8> = r.get(0);
        if let Ok(h) = crate::store::KeyHash::try_from(h.as_slice()) {
            out.push(Subject::Key(h));
        }
    }
    let slots = c
        .query(
            "UPDATE tollgate_slot_leases SET expires_at = now() + $2::float8 * interval '1 millisecond' \
             WHERE node_id = $1 RETURNING hash",
            &[&node, &ttl],
        )
        .await
        .map_err(db).map(count(Kind::Renew, 2))?;
    for r in &slots {
        let h: Vec<u8> = r.get(0);
        if let Ok(h) = crate::store::KeyHash::try_from(h.as_slice()) {
            out.push(Subject::Slots(h));
        }
    }
    Ok(out)
}

/// The lease tables: (table, its subject column, the subject's table, that
/// table's id column, the column the leases are counted in).
const LEASE_TABLES: [(&str, &str, &str, &str, &str); 3] = [
    (
        "tollgate_leases",
        "account_id",
        "tollgate_accounts",
        "id",
        "leased",
    ),
    (
        "tollgate_key_leases",
        "hash",
        "tollgate_keys",
        "hash",
        "leased",
    ),
    (
        "tollgate_slot_leases",
        "hash",
        "tollgate_keys",
        "hash",
        "slots_leased",
    ),
];

/// Deletes the leases matching `which` (an SQL condition over the lease
/// table, with `params`) and gives their amounts back to their subjects;
/// returns how many subjects got some back.
async fn return_leases(
    c: &deadpool_postgres::Client,
    which: &str,
    params: &[&(dyn tokio_postgres::types::ToSql + Sync)],
) -> Result<u64, String> {
    let mut subjects = 0;
    for (lease, subject, table, id, column) in LEASE_TABLES {
        let sql = format!(
            "WITH gone AS (DELETE FROM {lease} WHERE {which} RETURNING {subject} AS subject, amount), \
             per AS (SELECT subject, SUM(amount)::bigint AS amount FROM gone GROUP BY subject) \
             UPDATE {table} t SET {column} = t.{column} - per.amount \
             FROM per WHERE t.{id} = per.subject"
        );
        subjects += c
            .execute(&sql, params)
            .await
            .map_err(db)
            .map(count(Kind::Reclaim, 2))?;
    }
    Ok(subjects)
}

/// Returns every lease `node` holds to its account or key: at start, the
/// leases of this node's previous run (killed before it could return them:
/// what it had not settled is lost, its leases need not wait for the ttl).
pub async fn reclaim_node(c: &deadpool_postgres::Client, node: &str) -> Result<u64, String> {
    return_leases(c, "node_id = $1", &[&node]).await
}

/// Returns every expired lease (of any node: one that was killed, or cut
/// off for longer than the ttl) to its account or key; returns how many
/// subjects got some back.
pub async fn reclaim(c: &deadpool_postgres::Client) -> Result<u64, String> {
    return_leases(c, "expires_at < now()", &[]).await
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::money::Pico;

    fn cfg(lease: &str) -> ClusterConfig {
        ClusterConfig {
            node_id: "n".into(),
            lease: LeaseSize::parse(lease).unwrap(),
            lease_floor: Pico::parse_usd("0.01").unwrap(),
            lease_ceiling: Pico::parse_usd("1").unwrap(),
            ..ClusterConfig::default()
        }
    }

    const USD: i64 = 1_000_000_000_000;

    #[test]
    fn a_share_between_floor_and_ceiling() {
        let c = cfg("5%");
        // 5% of 10 USD = 0.50.
        assert_eq!(slice(&c, 10 * USD, 1), USD / 2);
        // 5% of 1000 USD is capped at the ceiling.
        assert_eq!(slice(&c, 1000 * USD, 1), USD);
        // 5% of 0.10 USD = 0.005, raised to the floor.
        assert_eq!(slice(&c, USD / 10, 1), USD / 100);
        // A request bigger than the slice gets what it needs.
        assert_eq!(slice(&c, 10 * USD, 3 * USD), 3 * USD);
    }

    #[test]
    fn a_fixed_amount() {
        let c = cfg("0.25");
        assert_eq!(slice(&c, 10 * USD, 1), USD / 4);
        assert_eq!(slice(&c, 1000 * USD, 1), USD / 4);
    }

    #[test]
    fn little_left_means_one_request_at_a_time() {
        let c = cfg("5%");
        // Under twice the floor (0.02 USD): exactly what the request lacks.
        assert_eq!(slice(&c, USD / 100, 200_000_000), 200_000_000);
        assert_eq!(slice(&c, 4 * USD / 1000, 7), 7);
        // Never zero.
        assert_eq!(slice(&c, 0, 0), 1);
    }
}
