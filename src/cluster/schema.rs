//! The database's tables, as versioned migrations applied at start.
//!
//! Each migration runs once, in its own transaction, under an advisory
//! lock: nodes starting together take turns, and the second finds the
//! version already there. `tollgate_schema` holds the versions applied.
//!
//! | table | row | what it is the truth of |
//! |---|---|---|
//! | `tollgate_accounts` | account id | profile (`record`, the store's JSON), `balance`, `spent`, `overdraft`, `leased` = Σ its leases |
//! | `tollgate_keys` | key hash | policy (`record`), `key_limit`, `usage` = Σ its settled charges, `leased` |
//! | `tollgate_leases` | (account, node) | the slice a node holds, and until when |
//! | `tollgate_entries` | entry id | usage records and ledger entries, once each (idempotent per id); (version 5) a usage record's fields (`model` … `estimated`, NULL on ledger entries), which the usage and report APIs read in cluster mode |
//! | `tollgate_key_leases` | (key, node) | (version 2) slices of the limit of keys no account pays for; `tollgate_keys.leased` = Σ of them |
//! | `tollgate_slot_leases` | (key, node) | (version 3) slots of a key's `concurrency` a node holds; `tollgate_keys.slots_leased` = Σ of them |
//! | `tollgate_rate_windows` | (key, minute, unit) | (version 4) requests (`rpm`) or tokens (`tpm`) the nodes took of a key's window of one UTC minute: `taken` ≤ the limit; `last_grant` is what the last take gave (so the statement can return it) |
//! | `tollgate_audit` | entry id | (version 7) every node's audit entries, in `seq` order |
//! | `tollgate_payments` | payment id | (version 8) a payment: `provider`, `account_id` or `key_hash` (hex), `amount` (picoUSD), `status`, `money_entry` (the `tollgate_entries` id that moved its money, NULL if none), `record` (the JSON the payments API shows), `created_ms`/`updated_ms` |
//! | `tollgate_payment_refs` | (provider, reference) | (version 8) every provider reference a payment claimed (`evt:`, `cs:`, `pi:`, `order:`, `trade:`, `ref:`): unique, so a payment applies once cluster-wide |
//! | `tollgate_subscriptions` | subscription id | (version 8) the subscription's record (the store's JSON, with its `version`), `status`; `seq`/`origin` as accounts: every node pulls it into its store |
//! | `tollgate_epay_orders` | out_trade_no | (version 8) epay orders made through any node, so a notification reaching another node finds its order |
//! | `tollgate_events` | event id | (version 9) every node's events: type, the signed body, origin; `seq` is the listing order |
//! | `tollgate_deliveries` | (event, endpoint) | (version 9) where each delivery stands, and which node holds it (`claimed_by` until `claim_until_ms`, the database's clock) |
//! | `tollgate_ledger` | entry id | (version 10) keys' and accounts' ledger entries, each shipped once by the node that made it (`node_id`, its `local_seq`): the ledger APIs read them in cluster mode |
//! | `tollgate_accounts.allowance` | account id | (version 11) what remains of the subscription period's grants (picoUSD), spent before `balance`; free credit = `allowance + balance + overdraft − leased`; `allowance_lapsed`/`allowance_lapsed_at_ms`: what the last lapse took, and when (it pays for charges made before it, settled after) |
//! | `tollgate_usage_rollups` | (key, hour, model) | (version 12) Σ of the key's usage records of one UTC hour and model (the store's rollup fields), added in the transaction that inserts the records (new ones only): the reports read them, and they outlive the records retention prunes |
//! | `tollgate_usage_settled` | node id | (version 12) the oldest record time of the node's last settled batch: retention keeps those rows |
//! | `tollgate_keys.period` | key hash | (version 13) `period_kind`, `period`, `period_usage`: a `limit_reset` key's spend in the UTC period `period` of its kind (`cluster::period`); its free credit = `key_limit − period_usage − leased` |
//! | `tollgate_imports` | fingerprint | (version 14) each single-node store copied in by `tollgate cluster import`: the SHA-256 of what it copied, so running it again changes nothing |
//! | `tollgate_disabled_endpoints` | endpoint | (version 15) a webhook endpoint that answered 410 on some node: every node's deliverer skips it |
//! | `tollgate_keys.owner`, `.disabled`, `.created_ms`; `tollgate_accounts.email`, `.created_ms` | key hash, account id | (version 16) copies of the record's fields the key and account lists filter and order by (`super::lists`) |
//!
//! `seq` on accounts and keys comes from `tollgate_change_seq`, taken under
//! [`CHANGE_LOCK`] so that seq order is commit order: a node that has seen
//! seq N has seen every change before it.

use super::trips::{Kind, count};
use deadpool_postgres::Pool;

/// Advisory lock id held while migrating.
const MIGRATE_LOCK: i64 = 0x746f_6c6c_0001;
/// Advisory (transaction) lock id held by every record change, so that
/// changes commit in the order of their `seq`.
pub const CHANGE_LOCK: i64 = 0x746f_6c6c_0002;
/// Advisory (transaction) lock id held by the node running the
/// subscription lifecycle pass (`cluster::subscriptions`).
pub const SWEEP_LOCK: i64 = 0x746f_6c6c_0003;
/// The channel changes are announced on.
pub const CHANNEL: &str = "tollgate_changes";

/// The migrations, in order; version = index + 1. Never edit one that has
/// shipped: add the next.
const MIGRATIONS: &[&str] = &[
    r#"
CREATE SEQUENCE tollgate_change_seq;
CREATE TABLE tollgate_accounts (
    id text PRIMARY KEY,
    record bytea NOT NULL,
    deleted boolean NOT NULL DEFAULT false,
    balance bigint NOT NULL DEFAULT 0,
    overdraft bigint NOT NULL DEFAULT 0,
    unlimited boolean NOT NULL DEFAULT false,
    spent bigint NOT NULL DEFAULT 0,
    leased bigint NOT NULL DEFAULT 0,
    seq bigint NOT NULL,
    origin text NOT NULL
);
CREATE INDEX tollgate_accounts_seq ON tollgate_accounts (seq);
CREATE TABLE tollgate_keys (
    hash bytea PRIMARY KEY,
    record bytea NOT NULL,
    deleted boolean NOT NULL DEFAULT false,
    key_limit bigint,
    usage bigint NOT NULL DEFAULT 0,
    seq bigint NOT NULL,
    origin text NOT NULL
);
CREATE INDEX tollgate_keys_seq ON tollgate_keys (seq);
CREATE TABLE tollgate_leases (
    account_id text NOT NULL,
    node_id text NOT NULL,
    amount bigint NOT NULL,
    expires_at timestamptz NOT NULL,
    PRIMARY KEY (account_id, node_id)
);
CREATE INDEX tollgate_leases_expiry ON tollgate_leases (expires_at);
CREATE TABLE tollgate_entries (
    id text PRIMARY KEY,
    kind text NOT NULL,
    key_hash bytea,
    account_id text,
    amount bigint NOT NULL,
    spent bigint NOT NULL,
    node_id text NOT NULL,
    at_ms bigint NOT NULL
);
CREATE INDEX tollgate_entries_account ON tollgate_entries (account_id);
CREATE INDEX tollgate_entries_key ON tollgate_entries (key_hash);
"#,
    r#"
ALTER TABLE tollgate_keys ADD COLUMN leased bigint NOT NULL DEFAULT 0;
CREATE TABLE tollgate_key_leases (
    hash bytea NOT NULL,
    node_id text NOT NULL,
    amount bigint NOT NULL,
    expires_at timestamptz NOT NULL,
    PRIMARY KEY (hash, node_id)
);
CREATE INDEX tollgate_key_leases_expiry ON tollgate_key_leases (expires_at);
"#,
    r#"
ALTER TABLE tollgate_keys ADD COLUMN concurrency bigint;
ALTER TABLE tollgate_keys ADD COLUMN slots_leased bigint NOT NULL DEFAULT 0;
CREATE TABLE tollgate_slot_leases (
    hash bytea NOT NULL,
    node_id text NOT NULL,
    amount bigint NOT NULL,
    expires_at timestamptz NOT NULL,
    PRIMARY KEY (hash, node_id)
);
CREATE INDEX tollgate_slot_leases_expiry ON tollgate_slot_leases (expires_at);
"#,
    r#"
CREATE TABLE tollgate_rate_windows (
    hash bytea NOT NULL,
    minute bigint NOT NULL,
    unit text NOT NULL,
    taken bigint NOT NULL,
    last_grant bigint NOT NULL,
    PRIMARY KEY (hash, minute, unit)
);
"#,
    r#"
ALTER TABLE tollgate_entries
    ADD COLUMN model text, ADD COLUMN upstream text, ADD COLUMN route text,
    ADD COLUMN stream boolean, ADD COLUMN status integer,
    ADD COLUMN prompt_tokens bigint, ADD COLUMN cached_tokens bigint,
    ADD COLUMN cache_write_tokens bigint, ADD COLUMN completion_tokens bigint,
    ADD COLUMN reasoning_tokens bigint, ADD COLUMN cost bigint, ADD COLUMN reserved bigint,
    ADD COLUMN latency_ms bigint, ADD COLUMN ttfb_ms bigint,
    ADD COLUMN request_id text, ADD COLUMN client_ip text, ADD COLUMN estimated boolean;
CREATE INDEX tollgate_entries_records ON tollgate_entries (key_hash, at_ms) WHERE model IS NOT NULL;
"#,
    r#"
CREATE TABLE tollgate_admin_tokens (
    id text PRIMARY KEY,
    record bytea NOT NULL,
    deleted boolean NOT NULL DEFAULT false,
    seq bigint NOT NULL,
    origin text NOT NULL
);
CREATE INDEX tollgate_admin_tokens_seq ON tollgate_admin_tokens (seq);
"#,
    r#"
CREATE TABLE tollgate_audit (
    seq bigserial PRIMARY KEY,
    id text NOT NULL UNIQUE,
    entry text NOT NULL,
    actor text NOT NULL,
    target text NOT NULL
);
"#,
    r#"
CREATE TABLE tollgate_payments (
    id text PRIMARY KEY,
    provider text NOT NULL,
    provider_id text NOT NULL,
    account_id text,
    key_hash text,
    amount bigint NOT NULL,
    status text NOT NULL,
    money_entry text,
    record text NOT NULL,
    node_id text NOT NULL,
    created_ms bigint NOT NULL,
    updated_ms bigint NOT NULL
);
CREATE INDEX tollgate_payments_account ON tollgate_payments (account_id, id);
CREATE TABLE tollgate_payment_refs (
    provider text NOT NULL,
    reference text NOT NULL,
    payment_id text NOT NULL,
    PRIMARY KEY (provider, reference)
);
CREATE INDEX tollgate_payment_refs_payment ON tollgate_payment_refs (payment_id);
CREATE TABLE tollgate_epay_orders (
    out_trade_no text PRIMARY KEY,
    record text NOT NULL,
    node_id text NOT NULL
);
CREATE TABLE tollgate_subscriptions (
    id text PRIMARY KEY,
    account_id text NOT NULL,
    status text NOT NULL,
    record text NOT NULL,
    seq bigint NOT NULL,
    origin text NOT NULL
);
CREATE INDEX tollgate_subscriptions_seq ON tollgate_subscriptions (seq);
CREATE INDEX tollgate_subscriptions_account ON tollgate_subscriptions (account_id);
"#,
    // The event outbox (depends on no other migration, so it may follow
    // any version): `body` is the signed webhook body, the same bytes on
    // every try from every node; a delivery is one (event, endpoint).
    r#"
CREATE TABLE tollgate_events (
    seq bigserial PRIMARY KEY,
    id text NOT NULL UNIQUE,
    kind text NOT NULL,
    body bytea NOT NULL,
    created_ms bigint NOT NULL,
    origin text NOT NULL
);
CREATE INDEX tollgate_events_created ON tollgate_events (created_ms);
CREATE TABLE tollgate_deliveries (
    event_id text NOT NULL REFERENCES tollgate_events (id) ON DELETE CASCADE,
    endpoint text NOT NULL,
    status text NOT NULL DEFAULT 'pending',
    attempts integer NOT NULL DEFAULT 0,
    next_attempt_ms bigint NOT NULL,
    claimed_by text,
    claim_until_ms bigint,
    last_status integer,
    last_error text,
    updated_ms bigint NOT NULL,
    PRIMARY KEY (event_id, endpoint)
);
CREATE INDEX tollgate_deliveries_due ON tollgate_deliveries (endpoint, next_attempt_ms)
    WHERE status = 'pending';
"#,
    // Keys' and accounts' ledgers ([`super::ledger`]); written by this
    // feature only, so it applies after any other migration.
    r#"
CREATE TABLE tollgate_ledger (
    id text PRIMARY KEY,
    scope text NOT NULL CHECK (scope IN ('key', 'account')),
    key_hash bytea,
    account_id text,
    node_id text NOT NULL,
    local_seq bigint NOT NULL,
    at_ms bigint NOT NULL,
    kind text NOT NULL,
    amount bigint NOT NULL,
    reason text NOT NULL,
    idempotency_key text,
    limit_after bigint,
    spent_after bigint NOT NULL,
    balance_after bigint,
    allowance_after bigint,
    CHECK ((scope = 'key') = (key_hash IS NOT NULL AND account_id IS NULL)),
    CHECK ((scope = 'account') = (account_id IS NOT NULL AND key_hash IS NULL))
);
CREATE INDEX tollgate_ledger_key ON tollgate_ledger
    (key_hash, at_ms DESC, node_id DESC, local_seq DESC) WHERE key_hash IS NOT NULL;
CREATE INDEX tollgate_ledger_account ON tollgate_ledger
    (account_id, at_ms DESC, node_id DESC, local_seq DESC) WHERE account_id IS NOT NULL;
"#,
    // The allowance (depends on no other migration but the first, so it
    // may follow any version): what remains of the subscription period's
    // grants, spent before the balance. Grants raise it and lapses zero it
    // once per claim id (`cluster::subscriptions`); settlement takes a
    // charge from it first (`cluster::allowance`). `allowance_lapsed` is
    // what the last lapse took (at `allowance_lapsed_at_ms`), which pays
    // for charges made before it that are settled after it.
    r#"
ALTER TABLE tollgate_accounts
    ADD COLUMN allowance bigint NOT NULL DEFAULT 0,
    ADD COLUMN allowance_lapsed bigint NOT NULL DEFAULT 0,
    ADD COLUMN allowance_lapsed_at_ms bigint NOT NULL DEFAULT 0;
"#,
    // Usage rollups and retention ([`super::rollups`]; depends on
    // version 5's record columns only). The rollups are filled from the
    // records already there, once, here: the records a node of this build
    // settles from now on are added in the transaction that inserts them.
    // `tollgate_usage_settled` is each node's oldest record time in its
    // last settled batch: retention leaves those rows (a batch whose commit
    // the node did not see is written again, and must find its ids).
    r#"
CREATE TABLE tollgate_usage_rollups (
    key_hash bytea NOT NULL,
    hour bigint NOT NULL,
    model text NOT NULL,
    requests bigint NOT NULL,
    prompt_tokens bigint NOT NULL,
    cached_tokens bigint NOT NULL,
    completion_tokens bigint NOT NULL,
    reasoning_tokens bigint NOT NULL,
    cost bigint NOT NULL,
    latency_ms bigint NOT NULL,
    errors bigint NOT NULL,
    estimated bigint NOT NULL,
    cache_write_tokens bigint NOT NULL,
    PRIMARY KEY (key_hash, hour, model)
);
CREATE INDEX tollgate_usage_rollups_hour ON tollgate_usage_rollups (hour);
CREATE TABLE tollgate_usage_settled (
    node_id text PRIMARY KEY,
    oldest_ms bigint NOT NULL
);
CREATE INDEX tollgate_entries_records_at ON tollgate_entries (at_ms) WHERE model IS NOT NULL;
LOCK TABLE tollgate_entries IN SHARE MODE;
INSERT INTO tollgate_usage_rollups
SELECT key_hash, div(at_ms, 3600000)::int8, model, COUNT(*)::int8,
    COALESCE(SUM(prompt_tokens), 0)::int8, COALESCE(SUM(cached_tokens), 0)::int8,
    COALESCE(SUM(completion_tokens), 0)::int8, COALESCE(SUM(reasoning_tokens), 0)::int8,
    COALESCE(SUM(cost), 0)::int8, COALESCE(SUM(latency_ms), 0)::int8,
    COUNT(*) FILTER (WHERE status >= 400)::int8, COUNT(*) FILTER (WHERE estimated)::int8,
    COALESCE(SUM(cache_write_tokens), 0)::int8
FROM tollgate_entries WHERE model IS NOT NULL AND key_hash IS NOT NULL GROUP BY 1, 2, 3;
"#,
    // A key's own limit that starts again each UTC period (`limit_reset`):
    // `period` is the id of the period of kind `period_kind` that
    // `period_usage` counts (NULL: none seen yet); the first statement that sees a later period (a take, a
    // settlement) rolls it under the row's lock, once. Depends on the
    // first migration only.
    r#"
ALTER TABLE tollgate_keys
    ADD COLUMN period_kind text,
    ADD COLUMN period bigint NOT NULL DEFAULT 0,
    ADD COLUMN period_usage bigint NOT NULL DEFAULT 0;
"#,
    // Single-node stores copied in (`cluster::import`; depends on no other
    // migration but those it writes into, so it may follow any version):
    // one row per store imported, by the fingerprint of what was copied,
    // written in the import's own transaction.
    r#"
CREATE TABLE tollgate_imports (
    fingerprint text PRIMARY KEY,
    node_id text NOT NULL,
    at_ms bigint NOT NULL,
    summary text NOT NULL
);
"#,
    // Webhook endpoints disabled by a 410 (`cluster::endpoints`; depends
    // on no other migration): no node claims a delivery to one.
    r#"
CREATE TABLE tollgate_disabled_endpoints (
    endpoint text PRIMARY KEY,
    node_id text NOT NULL,
    at_ms bigint NOT NULL,
    reason text NOT NULL
);
"#,
    // What the key and account lists filter and order by
    // ([`super::lists`]), beside the records (which SQL cannot read):
    // written with every change; NULL `created_ms` is a row written by an
    // earlier build, which start-up fills in. Depends on the first
    // migration only.
    r#"
ALTER TABLE tollgate_keys
    ADD COLUMN owner text, ADD COLUMN disabled boolean, ADD COLUMN created_ms bigint;
CREATE INDEX tollgate_keys_listed ON tollgate_keys (created_ms, hash) WHERE NOT deleted;
CREATE INDEX tollgate_keys_owner ON tollgate_keys (owner, created_ms, hash) WHERE NOT deleted;
ALTER TABLE tollgate_accounts ADD COLUMN email text, ADD COLUMN created_ms bigint;
CREATE INDEX tollgate_accounts_listed ON tollgate_accounts ((id COLLATE "C")) WHERE NOT deleted;
CREATE INDEX tollgate_accounts_email ON tollgate_accounts (email) WHERE NOT deleted;
"#,
];

/// The schema version this build writes.
pub const VERSION: i32 = MIGRATIONS.len() as i32;

/// Applies the migrations not yet applied; returns the version now in force.
pub async fn migrate(pool: &Pool) -> Result<i32, String> {
    let mut client = pool.get().await.map_err(self::pool)?;
    loop {
        let tx = client
            .transaction()
            .await
            .map_err(db)
            .map(count(Kind::Migrate, 1))?;
        tx.execute("SELECT pg_advisory_xact_lock($1)", &[&MIGRATE_LOCK])
            .await
            .map_err(db)
            .map(count(Kind::Migrate, 2))?;
        tx.batch_execute("CREATE TABLE IF NOT EXISTS tollgate_schema (version integer NOT NULL)")
            .await
            .map_err(db)
            .map(count(Kind::Migrate, 1))?;
        let row = tx
            .query_one("SELECT COALESCE(MAX(version), 0) FROM tollgate_schema", &[])
            .await
            .map_err(db)
            .map(count(Kind::Migrate, 2))?;
        let have: i32 = row.get(0);
        if have > VERSION {
            return Err(format!(
                "the database's schema is version {have}, newer than this build's {VERSION}: upgrade this node"
            ));
        }
        if have == VERSION {
            tx.commit().await.map_err(db).map(count(Kind::Migrate, 1))?;
            return Ok(have);
        }
        tx.batch_execute(MIGRATIONS[have as usize])
            .await
            .map_err(|e| format!("migration {}: {e}", have + 1))?;
        tx.execute(
            "INSERT INTO tollgate_schema (version) VALUES ($1)",
            &[&(have + 1)],
        )
        .await
        .map_err(db)
        .map(count(Kind::Migrate, 2))?;
        tx.commit().await.map_err(db).map(count(Kind::Migrate, 1))?;
        tracing::info!(version = have + 1, "cluster: database migration applied");
    }
}

/// A database error as text, with PostgreSQL's own message when it has one.
pub fn db(e: tokio_postgres::Error) -> String {
    match e.as_db_error() {
        Some(d) => format!("{} ({})", d.message(), d.code().code()),
        None => e.to_string(),
    }
}

/// A pool error (no connection, timed out) as text.
pub fn pool(e: deadpool_postgres::PoolError) -> String {
    format!("database unreachable: {e}")
}

#[cfg(test)]
mod tests {
    use super::MIGRATIONS;

    /// Each migration is SQL only: a merge that loses a string's end glues
    /// the next migration's Rust comment and `r#"` into this one's text
    /// (it compiles, and fails only on a database).
    #[test]
    fn migrations_hold_sql_only() {
        for (i, m) in MIGRATIONS.iter().enumerate() {
            let version = i + 1;
            assert!(!m.contains("r#\""), "migration {version} holds Rust source");
            assert!(
                !m.lines().any(|l| l.trim_start().starts_with("//")),
                "migration {version} holds a Rust comment"
            );
        }
    }
}
