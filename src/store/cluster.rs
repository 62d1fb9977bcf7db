//! What `crate::cluster` needs from the store: records as the bytes that
//! travel through PostgreSQL (the store's own encodings, so one format
//! describes a key wherever it is kept).

use super::codec::{decode_key, decode_user_account, encode_key, encode_user_account};
use super::{AccountRecord, KeyHash, KeyRecord, Store, StoreError};

impl Store {
    /// A key's record as it travels to other nodes.
    pub fn encode_key_record(rec: &KeyRecord) -> Vec<u8> {
        encode_key(rec)
    }

    /// A key's record from another node.
    pub fn decode_key_record(hash: &KeyHash, bytes: &[u8]) -> Result<KeyRecord, StoreError> {
        decode_key(hash, bytes)
    }

    /// An account's record as it travels to other nodes.
    pub fn encode_account_record(a: &AccountRecord) -> Vec<u8> {
        encode_user_account(a)
    }

    /// An account's record from another node.
    pub fn decode_account_record(bytes: &[u8]) -> Result<AccountRecord, StoreError> {
        decode_user_account(bytes)
    }
}
