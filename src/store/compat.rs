//! Stable integer ids of keys, for the surfaces of systems that number
//! their keys (new-api's `token_id`).
//!
//! | tree | key | value |
//! |---|---|---|
//! | `book` | `N` id (u64 BE) | key hash |
//! | `book` | `X` hash | id (u64 BE) |
//!
//! An id is given on first need (an import, a consumption-API read) and
//! never changes or is reused: the next id is one past the largest `N`
//! entry, and both rows are written in one sled transaction, so two
//! callers racing for one key agree on its id.

use sled::transaction::{ConflictableTransactionError, TransactionError};

use super::{KeyHash, Store, StoreError};

fn id_key(id: u64) -> [u8; 9] {
    let mut k = [0u8; 9];
    k[0] = b'N';
    k[1..].copy_from_slice(&id.to_be_bytes());
    k
}

fn hash_key(hash: &KeyHash) -> [u8; 33] {
    let mut k = [0u8; 33];
    k[0] = b'X';
    k[1..].copy_from_slice(hash);
    k
}

fn decode_id(v: &[u8]) -> Result<u64, StoreError> {
    <[u8; 8]>::try_from(v)
        .map(u64::from_be_bytes)
        .map_err(|_| StoreError::Corrupt("key id".into()))
}

impl Store {
    /// The key's integer id, given now (from 1) if it has none yet.
    pub fn key_id(&self, hash: &KeyHash) -> Result<u64, StoreError> {
        if let Some(v) = self.inner.book.get(hash_key(hash))? {
            return decode_id(&v);
        }
        let book = &self.inner.book;
        loop {
            let next = match book.scan_prefix([b'N']).next_back() {
                Some(item) => {
                    let (k, _) = item?;
                    decode_id(&k[1..])? + 1
                }
                None => 1,
            };
            let out: Result<Option<u64>, TransactionError<StoreError>> = book.transaction(|tx| {
                if let Some(v) = tx.get(hash_key(hash))? {
                    return decode_id(&v)
                        .map(Some)
                        .map_err(ConflictableTransactionError::Abort);
                }
                if tx.get(id_key(next))?.is_some() {
                    // Another key took `next` since the scan: scan again.
                    return Ok(None);
                }
                tx.insert(&id_key(next)[..], &hash[..])?;
                tx.insert(&hash_key(hash)[..], &next.to_be_bytes()[..])?;
                Ok(Some(next))
            });
            if let Some(id) = out? {
                return Ok(id);
            }
        }
    }

    /// The hash of the key with this id, if one was given it.
    pub fn key_of_id(&self, id: u64) -> Result<Option<KeyHash>, StoreError> {
        match self.inner.book.get(id_key(id))? {
            Some(v) => KeyHash::try_from(v.as_ref())
                .map(Some)
                .map_err(|_| StoreError::Corrupt("key id row".into())),
            None => Ok(None),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_are_stable_and_distinct() {
        let dir = std::env::temp_dir().join(format!("tollgate-keyid-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let store = Store::open(&dir, 5).expect("store opens");
        let (a, b) = ([1u8; 32], [2u8; 32]);
        let ia = store.key_id(&a).expect("id");
        let ib = store.key_id(&b).expect("id");
        assert_eq!((ia, ib), (1, 2));
        assert_eq!(store.key_id(&a).expect("id"), 1, "asked again, same id");
        assert_eq!(store.key_of_id(2).expect("read"), Some(b));
        assert_eq!(store.key_of_id(3).expect("read"), None);
        drop(store);
        let _ = std::fs::remove_dir_all(&dir);
    }
}
