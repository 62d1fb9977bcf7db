//! Scoped admin tokens in the `book` tree, under prefix `W` (issue 12):
//!
//! | tree | key | value |
//! |---|---|---|
//! | `book` | `W` id | [`AdminTokenRecord`] (JSON): name, scopes, SHA-256 of the token |
//!
//! The token itself is never stored: it is shown once when made. The API
//! keeps every record in memory (the admin path never reads sled per call),
//! so this module only writes them and reads them all at start-up.

use serde::{Deserialize, Serialize};
use sled::Batch;

use super::thread::StoreThread;
use super::{Op, Store, StoreError};

/// One scoped admin token as stored.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct AdminTokenRecord {
    /// Public handle (`tok_…`): what `DELETE /api/v1/admin/tokens/{id}` names.
    pub id: String,
    /// Who uses it: the actor the audit log records for its calls.
    pub name: String,
    /// Scope names (`keys:read`, …, `admin`), validated before storing.
    pub scopes: Vec<String>,
    /// SHA-256 of the token as presented, hex: compared, never shown.
    pub hash: String,
    /// Unix ms.
    pub created_at: i64,
}

/// A write to the admin tokens, applied by the store thread.
pub(super) enum AdminTokenOp {
    /// Insert (`Exists` when the id is taken).
    Put(Box<AdminTokenRecord>),
    /// Remove; the answer says whether it existed.
    Delete(String),
}

const PREFIX: u8 = b'W';

fn row_key(id: &str) -> Vec<u8> {
    let mut k = Vec::with_capacity(1 + id.len());
    k.push(PREFIX);
    k.extend_from_slice(id.as_bytes());
    k
}

impl StoreThread {
    /// Applies `op` with its audit entry (`admin_token.create` /
    /// `admin_token.delete`) in one batch of `book`. The summary is the
    /// record's id, name, scopes and hash: never the token.
    pub(super) fn admin_token(&mut self, op: AdminTokenOp) -> Result<bool, StoreError> {
        let mut batch = Batch::default();
        match op {
            AdminTokenOp::Put(rec) => {
                let k = row_key(&rec.id);
                if self.book.contains_key(&k)? {
                    return Err(StoreError::Exists);
                }
                let v = serde_json::to_vec(&*rec)
                    .map_err(|e| StoreError::Invalid(format!("admin token: {e}")))?;
                batch.insert(k, v);
                self.audit("admin_token.create", &rec.id, None, Some(summary(&rec)));
            }
            AdminTokenOp::Delete(id) => {
                let k = row_key(&id);
                let Some(old) = self.book.get(&k)? else {
                    return Ok(false);
                };
                let old: AdminTokenRecord = serde_json::from_slice(&old)
                    .map_err(|_| StoreError::Corrupt("admin token record".into()))?;
                batch.remove(k);
                self.audit("admin_token.delete", &id, Some(summary(&old)), None);
            }
        }
        let staged = self.stage_outbox();
        staged.add_to(&mut batch);
        self.book.apply_batch(batch)?;
        self.write_count(1);
        self.outbox_written(staged);
        Ok(true)
    }
}

/// A token as the audit log shows it.
fn summary(r: &AdminTokenRecord) -> serde_json::Value {
    serde_json::json!({
        "id": r.id,
        "name": r.name,
        "scopes": r.scopes,
        "hash": r.hash,
        "created_at": r.created_at,
    })
}

impl Store {
    /// Every stored admin token, oldest id first (start-up only).
    pub fn admin_tokens(&self) -> Result<Vec<AdminTokenRecord>, StoreError> {
        let mut out = Vec::new();
        for item in self.inner.book.scan_prefix([PREFIX]) {
            let (_, v) = item?;
            out.push(
                serde_json::from_slice(&v)
                    .map_err(|_| StoreError::Corrupt("admin token record".into()))?,
            );
        }
        Ok(out)
    }

    /// One stored admin token, by its id (one read of its row).
    pub fn admin_token(&self, id: &str) -> Result<Option<AdminTokenRecord>, StoreError> {
        self.inner
            .book
            .get(row_key(id))?
            .map(|v| {
                serde_json::from_slice(&v)
                    .map_err(|_| StoreError::Corrupt("admin token record".into()))
            })
            .transpose()
    }

    /// Stores a new admin token, durably before it returns.
    pub async fn put_admin_token(&self, rec: AdminTokenRecord) -> Result<(), StoreError> {
        self.call(|tx| Op::AdminToken(AdminTokenOp::Put(Box::new(rec)), tx))
            .await
            .map(|_| ())
    }

    /// Removes an admin token, durably; `false` if there was none.
    pub async fn delete_admin_token(&self, id: &str) -> Result<bool, StoreError> {
        self.call(|tx| Op::AdminToken(AdminTokenOp::Delete(id.to_owned()), tx))
            .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn tokens_survive_a_reopen_and_ids_are_unique() {
        let dir =
            std::env::temp_dir().join(format!("tollgate-admin-tokens-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let rec = AdminTokenRecord {
            id: "tok_1".into(),
            name: "ci".into(),
            scopes: vec!["keys:read".into()],
            hash: "00".repeat(32),
            created_at: 5,
        };
        {
            let store = Store::open(&dir, 1).unwrap();
            store.put_admin_token(rec.clone()).await.unwrap();
            assert!(matches!(
                store.put_admin_token(rec.clone()).await,
                Err(StoreError::Exists)
            ));
            let mut two = rec.clone();
            two.id = "tok_2".into();
            store.put_admin_token(two).await.unwrap();
            assert!(store.delete_admin_token("tok_2").await.unwrap());
            assert!(!store.delete_admin_token("tok_2").await.unwrap());
        }
        let store = Store::open(&dir, 1).unwrap();
        // By id, exactly: a deleted token and a prefix of an id are none.
        assert_eq!(store.admin_token("tok_1").unwrap(), Some(rec.clone()));
        assert_eq!(store.admin_token("tok_2").unwrap(), None);
        assert_eq!(store.admin_token("tok_").unwrap(), None);
        assert_eq!(store.admin_tokens().unwrap(), vec![rec]);
        drop(store);
        let _ = std::fs::remove_dir_all(&dir);
    }
}
