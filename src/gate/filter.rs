//! Which keys exist, without the store: a request with a key that is not
//! in memory and not in this filter is answered "unknown" at the cost of a
//! binary search, so guessed keys never reach sled and never need a per-IP
//! block that would also refuse the right keys behind a shared address.
//!
//! The filter holds the first eight bytes of every key hash (a SHA-256, so
//! they are uniform): 8 MB for a million keys. It may answer "maybe" for a
//! key that does not exist (a prefix shared with another key, a deleted key
//! seen by the start-up scan after its deletion was applied): that costs a
//! store read and nothing else. It never answers "no" for a key that
//! exists: keys present at start are in the scan, later ones are added by
//! [`KeyFilter::insert`] before their creation is answered.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::thread::JoinHandle;

use crate::store::{KeyHash, Store};

/// Recent additions merged into the sorted list past this many.
const MERGE_AT: usize = 4096;

/// The key hashes the store holds, as 64-bit prefixes.
#[derive(Default)]
pub struct KeyFilter {
    /// Set once the start-up scan is published; until then every key is
    /// "maybe" (the store answers).
    ready: AtomicBool,
    state: RwLock<State>,
    /// Set by [`KeyFilter::stop`]: the scan gives up (it holds a store
    /// handle, which must be gone before the directory can be reopened).
    cancel: AtomicBool,
    /// The scan's thread, joined by [`KeyFilter::stop`].
    builder: Mutex<Option<JoinHandle<()>>>,
}

#[derive(Default)]
struct State {
    /// Sorted prefixes from the start-up scan and merged additions
    /// (duplicates kept, so a delete removes exactly one).
    sorted: Vec<u64>,
    /// Prefixes added since the last merge, with their counts: inserting
    /// into `sorted` one at a time would move megabytes per key created.
    recent: HashMap<u64, u32>,
    /// Deletions that arrived while the scan was running: applied to its
    /// result when it is published (it may or may not have seen them).
    deleted_during_scan: Vec<u64>,
}

fn prefix(hash: &KeyHash) -> u64 {
    let mut b = [0u8; 8];
    b.copy_from_slice(&hash[..8]);
    u64::from_be_bytes(b)
}

impl KeyFilter {
    /// A filter that answers "maybe" until [`KeyFilter::build`] has run.
    pub fn new() -> KeyFilter {
        KeyFilter::default()
    }

    /// Scans the store's key hashes on a thread of its own, then publishes
    /// the result: start-up does not wait for it (a million keys take
    /// about a second), requests fall back to the store meanwhile.
    pub fn spawn_build(self: &Arc<Self>, store: Store) {
        let filter = self.clone();
        let spawned = std::thread::Builder::new()
            .name("tollgate-key-filter".into())
            .spawn(move || filter.build(&store));
        match spawned {
            Ok(h) => *self.builder.lock().unwrap_or_else(|e| e.into_inner()) = Some(h),
            Err(e) => {
                tracing::warn!(error = %e, "key filter not built: every unknown key reads the store")
            }
        }
    }

    /// Stops a scan still running and waits for its thread (shutdown).
    pub fn stop(&self) {
        self.cancel.store(true, Ordering::Release);
        let handle = self
            .builder
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take();
        if let Some(h) = handle {
            let _ = h.join();
        }
    }

    /// The scan itself (on the calling thread).
    pub fn build(&self, store: &Store) {
        let mut sorted = Vec::with_capacity(store.stats().keys as usize);
        for (n, hash) in store.key_hashes().enumerate() {
            if n % 4096 == 0 && self.cancel.load(Ordering::Acquire) {
                return;
            }
            match hash {
                Ok(h) => sorted.push(prefix(&h)),
                Err(e) => {
                    tracing::warn!(error = %e, "key filter not built: every unknown key reads the store");
                    return;
                }
            }
        }
        self.publish(sorted);
    }

    /// Makes the scan's prefixes the filter's, with what changed meanwhile.
    fn publish(&self, mut sorted: Vec<u64>) {
        // The store yields them in hash order already: this is one pass.
        sorted.sort_unstable();
        let mut st = self.state.write().unwrap_or_else(|e| e.into_inner());
        for p in std::mem::take(&mut st.deleted_during_scan) {
            remove_one(&mut sorted, p);
        }
        let recent = std::mem::take(&mut st.recent);
        st.sorted = sorted;
        st.recent = recent;
        self.ready.store(true, Ordering::Release);
    }

    /// The scan is done: "no" answers are final.
    pub fn is_ready(&self) -> bool {
        self.ready.load(Ordering::Acquire)
    }

    /// `false` only when the key surely does not exist.
    pub fn may_exist(&self, hash: &KeyHash) -> bool {
        if !self.is_ready() {
            return true;
        }
        let p = prefix(hash);
        let st = self.state.read().unwrap_or_else(|e| e.into_inner());
        st.sorted.binary_search(&p).is_ok() || st.recent.contains_key(&p)
    }

    /// A key was created (or imported): call before answering the creation.
    pub fn insert(&self, hash: &KeyHash) {
        let mut st = self.state.write().unwrap_or_else(|e| e.into_inner());
        *st.recent.entry(prefix(hash)).or_insert(0) += 1;
        if self.is_ready() && st.recent.len() > MERGE_AT {
            let st = &mut *st;
            for (p, n) in st.recent.drain() {
                st.sorted.extend(std::iter::repeat_n(p, n as usize));
            }
            st.sorted.sort_unstable();
        }
    }

    /// A key was deleted from the store.
    pub fn remove(&self, hash: &KeyHash) {
        let p = prefix(hash);
        let mut st = self.state.write().unwrap_or_else(|e| e.into_inner());
        if let Some(n) = st.recent.get_mut(&p) {
            *n -= 1;
            if *n == 0 {
                st.recent.remove(&p);
            }
        } else if self.is_ready() {
            remove_one(&mut st.sorted, p);
        } else {
            st.deleted_during_scan.push(p);
        }
    }
}

fn remove_one(sorted: &mut Vec<u64>, p: u64) {
    if let Ok(i) = sorted.binary_search(&p) {
        sorted.remove(i);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn h(first: u8, last: u8) -> KeyHash {
        let mut h = [0u8; 32];
        h[0] = first;
        h[31] = last;
        h
    }

    #[test]
    fn answers_maybe_until_ready_then_exactly() {
        let f = KeyFilter::new();
        assert!(f.may_exist(&h(9, 0)), "not built yet: the store answers");
        // Created and deleted while the scan runs.
        f.insert(&h(5, 0));
        f.remove(&h(3, 0));
        f.publish(vec![prefix(&h(3, 0)), prefix(&h(1, 0))]);
        assert!(f.may_exist(&h(1, 0)));
        assert!(f.may_exist(&h(5, 0)));
        assert!(!f.may_exist(&h(3, 0)), "deleted during the scan");
        assert!(!f.may_exist(&h(9, 0)));
        // Two keys with the same prefix: deleting one keeps the other.
        f.insert(&h(7, 1));
        f.insert(&h(7, 2));
        f.remove(&h(7, 1));
        assert!(f.may_exist(&h(7, 2)));
        f.remove(&h(7, 2));
        assert!(!f.may_exist(&h(7, 2)));
        // Past MERGE_AT additions are merged into the sorted list.
        for i in 0..(MERGE_AT as u32 + 10) {
            let mut k = [0u8; 32];
            k[..4].copy_from_slice(&(i + 1_000_000).to_be_bytes());
            f.insert(&k);
        }
        assert!(f.state.read().unwrap().recent.len() < MERGE_AT);
        let mut k = [0u8; 32];
        k[..4].copy_from_slice(&1_000_005u32.to_be_bytes());
        assert!(f.may_exist(&k));
        f.remove(&k);
        assert!(!f.may_exist(&k));
        assert!(f.may_exist(&h(1, 0)));
    }
}
