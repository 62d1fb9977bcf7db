//! Admin changes on their way to the cluster's database (`[cluster]`
//! mode), kept in `book` under prefix `Y` so that a node killed while the
//! database was unreachable still writes them once it is back (issue 18):
//!
//! | tree | key | value |
//! |---|---|---|
//! | `book` | `Y` seq (u64 BE) | one change, as `crate::cluster::sync` encodes it |
//!
//! The store does not read the value: the cluster encodes and decodes it.
//! A change is kept (written and flushed) after the admin write it belongs
//! to committed and before the API answers ([`Store::keep_unsent`]); it is
//! removed once the database has it ([`Store::sent`]). Writing one twice
//! is harmless (each is idempotent in the database), so the removal need
//! not be flushed. `seq` rises with every change kept, across restarts,
//! so [`Store::unsent`] gives them in the order they were made.

use sled::Tree;

use super::thread::StoreThread;
use super::{Op, Store, StoreError};

const PREFIX: u8 = b'Y';

fn row_key(seq: u64) -> [u8; 9] {
    let mut k = [PREFIX; 9];
    k[1..].copy_from_slice(&seq.to_be_bytes());
    k
}

/// The seq the next change kept gets: one past the last one in `book`.
pub(super) fn next_unsent_seq(book: &Tree) -> Result<u64, StoreError> {
    match book.scan_prefix([PREFIX]).next_back() {
        None => Ok(1),
        Some(item) => {
            let (k, _) = item?;
            let seq = <[u8; 8]>::try_from(&k[1..])
                .map(u64::from_be_bytes)
                .map_err(|_| StoreError::Corrupt("unsent change key".into()))?;
            Ok(seq + 1)
        }
    }
}

impl StoreThread {
    /// Writes one change under the next seq (flushed before the answer).
    pub(super) fn keep_unsent(&mut self, change: &[u8]) -> Result<u64, StoreError> {
        let seq = self.next_unsent;
        self.book.insert(row_key(seq), change)?;
        self.write_count(1);
        self.next_unsent = seq + 1;
        Ok(seq)
    }
}

impl Store {
    /// Keeps a change for the cluster's database, durably before it
    /// returns; its seq is what [`Store::sent`] takes.
    pub async fn keep_unsent(&self, change: Vec<u8>) -> Result<u64, StoreError> {
        let (tx, rx) = tokio::sync::oneshot::channel();
        // Sent as it is, not under the request's actor: nothing to audit.
        self.send(Op::KeepUnsent(change, tx))?;
        rx.await.map_err(|_| StoreError::Closed)?
    }

    /// Every change kept and not yet sent, oldest first (start-up).
    pub fn unsent(&self) -> Result<Vec<(u64, Vec<u8>)>, StoreError> {
        let mut out = Vec::new();
        for item in self.inner.book.scan_prefix([PREFIX]) {
            let (k, v) = item?;
            let seq = <[u8; 8]>::try_from(&k[1..])
                .map(u64::from_be_bytes)
                .map_err(|_| StoreError::Corrupt("unsent change key".into()))?;
            out.push((seq, v.to_vec()));
        }
        Ok(out)
    }

    /// The change kept under `seq` is in the database: removed (not
    /// flushed: after a crash it is written once more, which is harmless).
    pub fn sent(&self, seq: u64) -> Result<(), StoreError> {
        self.inner.book.remove(row_key(seq))?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn kept_changes_survive_a_reopen_in_order_and_go_once_sent() {
        let dir = std::env::temp_dir().join(format!("tollgate-unsent-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        {
            let store = Store::open(&dir, 1).unwrap();
            assert_eq!(store.keep_unsent(b"one".to_vec()).await.unwrap(), 1);
            assert_eq!(store.keep_unsent(b"two".to_vec()).await.unwrap(), 2);
            assert_eq!(store.keep_unsent(b"three".to_vec()).await.unwrap(), 3);
            store.sent(1).unwrap();
            store.flush().await.unwrap();
        }
        let store = Store::open(&dir, 1).unwrap();
        assert_eq!(
            store.unsent().unwrap(),
            vec![(2, b"two".to_vec()), (3, b"three".to_vec())]
        );
        // Seqs go on after the last one kept, never back.
        assert_eq!(store.keep_unsent(b"four".to_vec()).await.unwrap(), 4);
        store.sent(3).unwrap();
        store.sent(3).unwrap();
        assert_eq!(
            store.unsent().unwrap(),
            vec![(2, b"two".to_vec()), (4, b"four".to_vec())]
        );
        drop(store);
        let _ = std::fs::remove_dir_all(&dir);
    }
}
