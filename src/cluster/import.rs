//! `tollgate cluster import`: a stopped single node's store copied into
//! the cluster's database, so that an operator who outgrows one node
//! starts the cluster with what that node had.
//!
//! What is copied, each by its own id (the ids the nodes use, so a copied
//! thing is the thing a node would have written):
//!
//! | from the store | to | notes |
//! |---|---|---|
//! | accounts | `tollgate_accounts` | profile, `balance`, `spent`, `allowance`, `overdraft` |
//! | keys | `tollgate_keys` | policy, `key_limit`, `usage`, `concurrency` |
//! | scoped admin tokens | `tollgate_admin_tokens` | name, scopes, SHA-256 (never a token) |
//! | subscriptions | `tollgate_subscriptions` | and each applied grant and renewal key as its claim in `tollgate_entries`, so no node grants a period again |
//! | payments | `tollgate_payments`, `tollgate_payment_refs` | every provider reference, so a provider's retry is a replay; the money entry (`pay:<ref>`) as claimed |
//! | key and account ledgers | `tollgate_ledger` | as the node named `cluster.node_id` (the ids its ledger backfill would write); a credit's idempotency key as its claim (`credit:<account>:<key>`) |
//! | usage records | `tollgate_entries` | one row each with its fields (moving no money: `usage` and `spent` are copied as they are) |
//!
//! Not copied: events and webhook deliveries, the audit log, epay orders
//! not yet paid, the hourly rollups (the cluster sums the records).
//!
//! All of it is written in one transaction, under the change lock, with
//! `ON CONFLICT DO NOTHING`: a crash midway leaves nothing, and a row
//! already there is compared with the store's (a difference refuses the
//! import). The transaction also records the SHA-256 of everything it
//! copied in `tollgate_imports`, so running it again on the same store
//! changes nothing, even after the cluster moved the money on.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;

use deadpool_postgres::Transaction;
use sha2::{Digest, Sha256};

use super::ClusterConfig;
use super::ledger::insert_entries;
use super::schema::{self, CHANGE_LOCK, CHANNEL, db, pool as pool_error};
use super::subscriptions::{grant_entry_id, renewal_entry_id};
use crate::store::admin_tokens::AdminTokenRecord;
use crate::store::{
    AccountRecord, AppliedMarker, KeyQuery, KeyRecord, LedgerCursor, LocalLedgerEntry,
    PaymentRecord, Store, SubscriptionRecord, UsageRecord,
};

/// How many of each were copied (or found already there).
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Imported {
    /// The store had been imported already: nothing was written.
    pub already: bool,
    pub accounts: usize,
    pub keys: usize,
    pub admin_tokens: usize,
    pub subscriptions: usize,
    pub payments: usize,
    pub ledger_entries: usize,
    pub usage_records: usize,
}

impl std::fmt::Display for Imported {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} accounts, {} keys, {} admin tokens, {} subscriptions, {} payments, \
             {} ledger entries, {} usage records",
            self.accounts,
            self.keys,
            self.admin_tokens,
            self.subscriptions,
            self.payments,
            self.ledger_entries,
            self.usage_records
        )
    }
}

/// What the store holds, read once before anything is written.
struct Snapshot {
    accounts: Vec<AccountRecord>,
    keys: Vec<(KeyRecord, crate::store::Account)>,
    tokens: Vec<AdminTokenRecord>,
    subscriptions: Vec<SubscriptionRecord>,
    markers: Vec<(String, AppliedMarker)>,
    payments: Vec<PaymentRecord>,
    /// Provider references by payment id: (provider, reference).
    refs: BTreeMap<String, Vec<(String, String)>>,
    ledger: Vec<LocalLedgerEntry>,
    /// (row id, record), oldest first per key.
    records: Vec<(String, UsageRecord)>,
}

const PAGE: usize = 1000;

fn read(store: &Store) -> Result<Snapshot, String> {
    let e = |e: crate::store::StoreError| format!("reading the store: {e}");
    let mut accounts = Vec::new();
    loop {
        let page = store.user_accounts(accounts.len(), PAGE, None).map_err(e)?;
        let n = page.len();
        accounts.extend(page);
        if n < PAGE {
            break;
        }
    }
    let mut keys = Vec::new();
    loop {
        let page = store
            .keys(&KeyQuery {
                offset: keys.len(),
                limit: PAGE,
                owner: None,
                include_disabled: true,
            })
            .map_err(e)?;
        let n = page.len();
        keys.extend(page);
        if n < PAGE {
            break;
        }
    }
    let mut records = Vec::new();
    for (rec, _) in &keys {
        let mut all = store.usage(&rec.hash, 0, usize::MAX).map_err(e)?;
        all.reverse();
        let mut seen: HashMap<String, usize> = HashMap::new();
        for r in all {
            let base = format!(
                "u:import:{}:{}:{}",
                hex::encode(rec.hash),
                r.at_ms,
                r.request_id
            );
            let n = seen.entry(base.clone()).or_default();
            let id = if *n == 0 {
                base.clone()
            } else {
                format!("{base}:{n}")
            };
            *n += 1;
            records.push((id, r));
        }
    }
    let mut ledger = Vec::new();
    let mut cursor = LedgerCursor::default();
    loop {
        let (page, next) = store.ledger_page(&cursor, PAGE).map_err(e)?;
        ledger.extend(page);
        match next {
            Some(n) => cursor = n,
            None => break,
        }
    }
    let mut refs: BTreeMap<String, Vec<(String, String)>> = BTreeMap::new();
    for (provider, reference, id) in store.payment_refs().map_err(e)? {
        refs.entry(id).or_default().push((provider, reference));
    }
    Ok(Snapshot {
        accounts,
        keys,
        tokens: store.admin_tokens().map_err(e)?,
        subscriptions: store.subscriptions_where(|_| true).map_err(e)?,
        markers: store.subscription_markers().map_err(e)?,
        payments: store.all_payments().collect::<Result<_, _>>().map_err(e)?,
        refs,
        ledger,
        records,
    })
}

/// The SHA-256 of what the import writes: the same store gives the same.
fn fingerprint(s: &Snapshot) -> String {
    let mut h = Sha256::new();
    let mut part = |tag: &[u8], bytes: &[u8]| {
        h.update(tag);
        h.update((bytes.len() as u64).to_be_bytes());
        h.update(bytes);
    };
    for a in &s.accounts {
        part(b"a", &crate::store::Store::encode_account_record(a));
        part(
            b"a$",
            format!("{} {} {}", a.balance.0, a.spent.0, a.allowance.0).as_bytes(),
        );
    }
    for (k, acct) in &s.keys {
        part(b"k", &Store::encode_key_record(k));
        part(
            b"k$",
            format!("{:?} {}", acct.limit, acct.spent.0).as_bytes(),
        );
    }
    for t in &s.tokens {
        part(b"w", &serde_json::to_vec(t).unwrap_or_default());
    }
    for sub in &s.subscriptions {
        part(b"s", &serde_json::to_vec(sub).unwrap_or_default());
    }
    for (sid, m) in &s.markers {
        part(b"t", format!("{sid} {m:?}").as_bytes());
    }
    for p in &s.payments {
        part(b"p", &serde_json::to_vec(p).unwrap_or_default());
    }
    for (id, refs) in &s.refs {
        part(b"q", format!("{id} {refs:?}").as_bytes());
    }
    for e in &s.ledger {
        part(b"l", format!("{e:?}").as_bytes());
    }
    for (id, r) in &s.records {
        part(b"u", format!("{id} {r:?}").as_bytes());
    }
    hex::encode(h.finalize())
}

/// Copies the store under `store_path` (its node stopped) into the
/// database `cfg` names. Errors are for the operator: what is wrong and
/// what to do.
pub fn import(cfg: &ClusterConfig, store_path: &Path) -> Result<Imported, String> {
    let has_data = std::fs::read_dir(store_path)
        .map(|mut d| d.next().is_some())
        .unwrap_or(false);
    if !has_data {
        return Err(format!(
            "no store at {} (storage.path): nothing to import",
            store_path.display()
        ));
    }
    let store = Store::open(store_path, 10).map_err(|e| {
        format!(
            "the store at {} cannot be opened ({e}); if a node is running on it, stop it first",
            store_path.display()
        )
    })?;
    let snapshot = read(&store)?;
    drop(store);
    let fp = fingerprint(&snapshot);
    let pg = super::pg_config(cfg)?;
    let tls = super::tls_for(cfg, &pg)?;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| format!("a runtime: {e}"))?;
    let node = cfg.node_id.clone();
    rt.block_on(async move {
        let pool = super::pool_for(&pg, &tls, 2)?;
        schema::migrate(&pool).await?;
        let mut c = pool.get().await.map_err(pool_error)?;
        let tx = c.transaction().await.map_err(db)?;
        tx.execute("SELECT pg_advisory_xact_lock($1)", &[&CHANGE_LOCK])
            .await
            .map_err(db)?;
        let done = tx
            .query_opt(
                "SELECT 1 FROM tollgate_imports WHERE fingerprint = $1",
                &[&fp],
            )
            .await
            .map_err(db)?
            .is_some();
        if done {
            return Ok(Imported {
                already: true,
                ..counts(&snapshot)
            });
        }
        let seq = write(&tx, &node, &snapshot).await?;
        let imported = counts(&snapshot);
        tx.execute(
            "INSERT INTO tollgate_imports (fingerprint, node_id, at_ms, summary) VALUES ($1, $2, $3, $4)",
            &[&fp, &node, &crate::clock::Clock::system().now_ms(), &imported.to_string()],
        )
        .await
        .map_err(db)?;
        tx.execute("SELECT pg_notify($1, $2)", &[&CHANNEL, &seq.to_string()])
            .await
            .map_err(db)?;
        tx.commit().await.map_err(db)?;
        Ok(imported)
    })
}

fn counts(s: &Snapshot) -> Imported {
    Imported {
        already: false,
        accounts: s.accounts.len(),
        keys: s.keys.len(),
        admin_tokens: s.tokens.len(),
        subscriptions: s.subscriptions.len(),
        payments: s.payments.len(),
        ledger_entries: s.ledger.len(),
        usage_records: s.records.len(),
    }
}

async fn next_seq(tx: &Transaction<'_>) -> Result<i64, String> {
    Ok(tx
        .query_one("SELECT nextval('tollgate_change_seq')", &[])
        .await
        .map_err(db)?
        .get(0))
}

/// A row already in the database that differs from the store's.
fn differs(what: &str, id: &str) -> String {
    format!(
        "the database already holds a different {what} {id:?}: not importing (it holds another \
         cluster's or an earlier copy's data; import into an empty database)"
    )
}

/// Inserts `sql` (`ON CONFLICT DO NOTHING`); when the row was there,
/// `check` (a `SELECT … WHERE <id> = $1 AND <same>` over the same
/// parameters) must find it equal.
async fn put(
    tx: &Transaction<'_>,
    sql: &str,
    check: &str,
    params: &[&(dyn tokio_postgres::types::ToSql + Sync)],
    what: &str,
    id: &str,
) -> Result<(), String> {
    if tx.execute(sql, params).await.map_err(db)? == 1 {
        return Ok(());
    }
    match tx.query_opt(check, params).await.map_err(db)? {
        Some(_) => Ok(()),
        None => Err(differs(what, id)),
    }
}

/// Writes the snapshot; returns the last change number taken.
async fn write(tx: &Transaction<'_>, node: &str, s: &Snapshot) -> Result<i64, String> {
    let mut seq = 0;
    for a in &s.accounts {
        seq = next_seq(tx).await?;
        let record = Store::encode_account_record(&super::sync::profile_only(a));
        put(
            tx,
            "INSERT INTO tollgate_accounts (id, record, deleted, balance, overdraft, unlimited, spent, \
             allowance, seq, origin) VALUES ($1, $2, false, $3, $4, $5, $6, $7, $8, $9) \
             ON CONFLICT (id) DO NOTHING",
            "SELECT 1 FROM tollgate_accounts WHERE id = $1 AND record = $2 AND NOT deleted \
             AND balance = $3 AND overdraft = $4 AND unlimited = $5 AND spent = $6 \
             AND allowance = $7 AND $8::int8 IS NOT NULL AND $9::text IS NOT NULL",
            &[
                &a.id,
                &record,
                &a.balance.0,
                &a.overdraft.0,
                &a.unlimited,
                &a.spent.0,
                &a.allowance.0,
                &seq,
                &node,
            ],
            "account",
            &a.id,
        )
        .await?;
        // The fields the account list filters and orders by.
        tx.execute(
            "UPDATE tollgate_accounts SET email = $2, created_ms = $3 \
             WHERE id = $1 AND created_ms IS NULL",
            &[&a.id, &a.email, &a.created_at],
        )
        .await
        .map_err(db)?;
    }
    for (rec, acct) in &s.keys {
        seq = next_seq(tx).await?;
        let record = Store::encode_key_record(rec);
        let limit = acct.limit.map(|l| l.0);
        let concurrency = rec.concurrency.map(i64::from);
        put(
            tx,
            "INSERT INTO tollgate_keys (hash, record, deleted, key_limit, usage, concurrency, seq, origin) \
             VALUES ($1, $2, false, $3, $4, $5, $6, $7) ON CONFLICT (hash) DO NOTHING",
            "SELECT 1 FROM tollgate_keys WHERE hash = $1 AND record = $2 AND NOT deleted \
             AND key_limit IS NOT DISTINCT FROM $3 AND usage = $4 \
             AND concurrency IS NOT DISTINCT FROM $5 AND $6::int8 IS NOT NULL AND $7::text IS NOT NULL",
            &[
                &rec.hash.to_vec(),
                &record,
                &limit,
                &acct.spent.0,
                &concurrency,
                &seq,
                &node,
            ],
            "key",
            &hex::encode(rec.hash),
        )
        .await?;
        // The fields the key list filters and orders by.
        let l = super::lists::KeyColumns::of(rec);
        tx.execute(
            "UPDATE tollgate_keys SET owner = $2, disabled = $3, created_ms = $4 \
             WHERE hash = $1 AND created_ms IS NULL",
            &[&rec.hash.to_vec(), &l.owner, &l.disabled, &l.created_ms],
        )
        .await
        .map_err(db)?;
    }
    for t in &s.tokens {
        seq = next_seq(tx).await?;
        let record = serde_json::to_vec(t).map_err(|e| e.to_string())?;
        put(
            tx,
            "INSERT INTO tollgate_admin_tokens (id, record, deleted, seq, origin) \
             VALUES ($1, $2, false, $3, $4) ON CONFLICT (id) DO NOTHING",
            "SELECT 1 FROM tollgate_admin_tokens WHERE id = $1 AND record = $2 AND NOT deleted \
             AND $3::int8 IS NOT NULL AND $4::text IS NOT NULL",
            &[&t.id, &record, &seq, &node],
            "admin token",
            &t.id,
        )
        .await?;
    }
    for sub in &s.subscriptions {
        seq = next_seq(tx).await?;
        let record = serde_json::to_string(sub).map_err(|e| e.to_string())?;
        put(
            tx,
            "INSERT INTO tollgate_subscriptions (id, account_id, status, record, seq, origin) \
             VALUES ($1, $2, $3, $4, $5, $6) ON CONFLICT (id) DO NOTHING",
            "SELECT 1 FROM tollgate_subscriptions WHERE id = $1 AND account_id = $2 AND status = $3 \
             AND record = $4 AND $5::int8 IS NOT NULL AND $6::text IS NOT NULL",
            &[&sub.id, &sub.account, &sub.status.as_str(), &record, &seq, &node],
            "subscription",
            &sub.id,
        )
        .await?;
    }
    let account_of: HashMap<&str, &str> = s
        .subscriptions
        .iter()
        .map(|sub| (sub.id.as_str(), sub.account.as_str()))
        .collect();
    let now = crate::clock::Clock::system().now_ms();
    for (sid, m) in &s.markers {
        let (id, kind) = match m {
            AppliedMarker::Grant(g) => (grant_entry_id(sid, g), "grant"),
            AppliedMarker::Renewal(idem) => (renewal_entry_id(sid, idem), "renewal"),
        };
        // The grant's money is in the copied allowance: the claim moves none.
        tx.execute(
            "INSERT INTO tollgate_entries (id, kind, key_hash, account_id, amount, spent, node_id, at_ms) \
             VALUES ($1, $2, NULL, $3, 0, 0, $4, $5) ON CONFLICT (id) DO NOTHING",
            &[&id, &kind, &account_of.get(sid.as_str()).copied(), &node, &now],
        )
        .await
        .map_err(db)?;
    }
    for p in &s.payments {
        let refs = s.refs.get(&p.id).cloned().unwrap_or_default();
        let references: Vec<String> = refs.iter().map(|(_, r)| r.clone()).collect();
        // The entry that moved its money, by the id a node would use
        // (`payments::money_reference`): claimed, with the balance copied.
        let money_entry = match &p.account {
            Some(account) if !p.entries.is_empty() => {
                let entry = references
                    .iter()
                    .find(|r| !r.starts_with("evt:"))
                    .or_else(|| references.first())
                    .map(|r| format!("pay:{r}"))
                    .unwrap_or_else(|| format!("pay:{}", p.id));
                tx.execute(
                    "INSERT INTO tollgate_entries (id, kind, key_hash, account_id, amount, spent, node_id, at_ms) \
                     VALUES ($1, 'payment', NULL, $2, $3, 0, $4, $5) ON CONFLICT (id) DO NOTHING",
                    &[&entry, account, &p.amount.0, &node, &p.created_at],
                )
                .await
                .map_err(db)?;
                Some(entry)
            }
            _ => None,
        };
        let record = serde_json::to_string(p).map_err(|e| e.to_string())?;
        put(
            tx,
            "INSERT INTO tollgate_payments (id, provider, provider_id, account_id, key_hash, amount, \
             status, money_entry, record, node_id, created_ms, updated_ms) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12) ON CONFLICT (id) DO NOTHING",
            "SELECT 1 FROM tollgate_payments WHERE id = $1 AND provider = $2 AND provider_id = $3 \
             AND account_id IS NOT DISTINCT FROM $4 AND key_hash IS NOT DISTINCT FROM $5 \
             AND amount = $6 AND status = $7 AND money_entry IS NOT DISTINCT FROM $8 AND record = $9 \
             AND $10::text IS NOT NULL AND $11::int8 IS NOT NULL AND $12::int8 IS NOT NULL",
            &[
                &p.id,
                &p.provider,
                &p.provider_id,
                &p.account,
                &p.key,
                &p.amount.0,
                &p.status.as_str(),
                &money_entry,
                &record,
                &node,
                &p.created_at,
                &p.updated_at,
            ],
            "payment",
            &p.id,
        )
        .await?;
        for (provider, reference) in &refs {
            put(
                tx,
                "INSERT INTO tollgate_payment_refs (provider, reference, payment_id) \
                 VALUES ($1, $2, $3) ON CONFLICT DO NOTHING",
                "SELECT 1 FROM tollgate_payment_refs WHERE provider = $1 AND reference = $2 \
                 AND payment_id = $3",
                &[provider, reference, &p.id],
                "payment reference",
                &format!("{provider}:{reference}"),
            )
            .await?;
        }
    }
    // A credit with an idempotency key claims `credit:<account>:<key>`
    // (`api::cluster`): its retry through any node moves no money again.
    for e in &s.ledger {
        if let LocalLedgerEntry::Account(account, e) = e
            && let Some(k) = &e.idempotency_key
        {
            tx.execute(
                "INSERT INTO tollgate_entries (id, kind, key_hash, account_id, amount, spent, node_id, at_ms) \
                 VALUES ($1, $2, NULL, $3, $4, 0, $5, $6) ON CONFLICT (id) DO NOTHING",
                &[&format!("credit:{account}:{k}"), &e.kind.as_str(), account, &e.amount.0, &node, &e.at_ms],
            )
            .await
            .map_err(db)?;
        }
    }
    for chunk in s.ledger.chunks(PAGE) {
        insert_entries(tx, node, chunk).await?;
    }
    for chunk in s.records.chunks(PAGE) {
        insert_records(tx, node, chunk).await?;
    }
    Ok(seq)
}

/// Usage records as rows of `tollgate_entries` (as settlement writes
/// them, without moving money: the copied `usage`/`spent` include them).
async fn insert_records(
    tx: &Transaction<'_>,
    node: &str,
    rows: &[(String, UsageRecord)],
) -> Result<u64, String> {
    let charges: Vec<super::Charge> = rows
        .iter()
        .map(|(id, r)| {
            let amount = r.cost.0.saturating_add(r.daily_fee.0);
            super::Charge {
                id: id.clone(),
                kind: "usage",
                key: Some(r.key),
                account: r.account.clone(),
                amount,
                spent: amount,
                at_ms: r.at_ms,
                record: Some(Box::new(r.clone())),
            }
        })
        .collect();
    super::rollups::insert_entries(tx, node, &charges)
        .await
        .map(|rows| rows.len() as u64)
}

/// `tollgate cluster import --config FILE`: the store of `storage.path`
/// into the database of `[cluster]`. Exit codes: 0 copied (or copied
/// before), 1 refused or failed (the reason is printed), 2 a config error.
pub fn run(config: &Path) -> std::process::ExitCode {
    use std::process::ExitCode;
    let cfg = match crate::config::Config::load(config) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::from(2);
        }
    };
    let Some(cluster) = &cfg.cluster else {
        eprintln!(
            "error: {}: no [cluster] section: add the cluster's (postgres_url_env, node_id) to import into its database",
            config.display()
        );
        return ExitCode::from(2);
    };
    match import(cluster, &cfg.storage.path) {
        Ok(i) if i.already => {
            println!("already imported ({i}): nothing changed");
            ExitCode::SUCCESS
        }
        Ok(i) => {
            println!("imported {i}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::from(1)
        }
    }
}
