//! OpenRouter's provisioning API, as seed 000's `OpenRouterService` calls
//! it: `POST /api/v1/keys` `{name, label, limit}` (read back as `key` and
//! `data.hash`), `GET /api/v1/auth/key` (`data.usage`, `data.limit`,
//! `data.limit_remaining`), `PATCH /api/v1/keys/{hash}` `{disabled}` and
//! `DELETE /api/v1/keys/{hash}`. Those routes are `keys` and `status`;
//! this module holds what they need to speak OpenRouter: its extra create
//! fields and the key's computed `status`.

use serde_json::value::RawValue;

use super::super::{Fields, Patch, invalid};
use crate::error::ApiError;
use crate::money::Pico;
use crate::store::KeyRecord;

/// OpenRouter's create fields that Tollgate has no setting for, with what
/// each must be. They are kept in the key's `metadata` (under their own
/// names, unless the metadata sent already has them), so nothing a
/// provisioning client sent is lost.
const EXTRA_FIELDS: &[(&str, &str)] = &[
    ("label", "a string"),
    ("include_byok_in_limit", "true or false"),
    ("creator_user_id", "a string"),
    ("workspace_id", "a string"),
];

/// Longest text of an extra field.
const MAX_EXTRA_CHARS: usize = 256;

/// `metadata` with OpenRouter's extra create fields merged in.
pub(in crate::api) fn with_extra_fields(
    f: &Fields,
    metadata: Patch<String>,
) -> Result<Patch<String>, ApiError> {
    let mut extra = serde_json::Map::new();
    for &(name, what) in EXTRA_FIELDS {
        let Some(raw) = f.raw(name) else { continue };
        let v: serde_json::Value = serde_json::from_str(raw.get())
            .map_err(|_| invalid(name, "invalid_type", format!("`{name}` must be {what}.")))?;
        let ok = match (&v, what) {
            (serde_json::Value::Null, _) => continue,
            (serde_json::Value::Bool(_), "true or false") => true,
            (serde_json::Value::String(s), "a string") => {
                s.chars().count() <= MAX_EXTRA_CHARS && !s.chars().any(char::is_control)
            }
            _ => false,
        };
        if !ok {
            return Err(invalid(
                name,
                "invalid_type",
                format!("`{name}` must be {what} (at most {MAX_EXTRA_CHARS} characters)."),
            ));
        }
        extra.insert(name.to_owned(), v);
    }
    if extra.is_empty() {
        return Ok(metadata);
    }
    let mut merged: serde_json::Map<String, serde_json::Value> = match &metadata {
        // `metadata` was checked to be an object.
        Patch::Set(text) => serde_json::from_str(text).map_err(|_| {
            invalid(
                "metadata",
                "invalid_type",
                "`metadata` must be a JSON object or null.",
            )
        })?,
        Patch::Absent | Patch::Null => serde_json::Map::new(),
    };
    for (k, v) in extra {
        merged.entry(k).or_insert(v);
    }
    let text =
        serde_json::to_string(&merged).map_err(|e| ApiError::internal(format!("metadata: {e}")))?;
    // Still a JSON object: what `metadata_json` shows back.
    debug_assert!(RawValue::from_string(text.clone()).is_ok());
    Ok(Patch::Set(text))
}

/// A key's status as a provisioning client's sweeper wants it, computed
/// from the record and the live numbers (so it is right whether or not a
/// sweeper has run): `disabled`, else `expired` (past `expires_at`), else
/// `exhausted` (no credit left, or every allowed request used), else
/// `active`.
pub(in crate::api) fn key_status(
    rec: &KeyRecord,
    remaining: Option<Pico>,
    requests: u64,
    now_ms: i64,
) -> &'static str {
    if rec.disabled {
        "disabled"
    } else if rec.expires_at.is_some_and(|at| now_ms >= at) {
        "expired"
    } else if remaining.is_some_and(|r| r.0 <= 0)
        || rec.max_requests.is_some_and(|max| requests >= max)
    {
        "exhausted"
    } else {
        "active"
    }
}
