//! Who may call which admin route (issue 12): the scopes, the one table
//! that maps every admin route to the scope it needs, and the in-memory
//! set of scoped admin tokens the guard checks against.
//!
//! The environment's admin token is `root` and holds every scope. Scoped
//! tokens are made through `POST /api/v1/admin/tokens`, stored hashed in
//! the store (`W` rows) and kept here in memory: authenticating an admin
//! call reads no sled.

use std::sync::Arc;

use arc_swap::ArcSwap;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use crate::error::ApiError;
use crate::store::admin_tokens::AdminTokenRecord;

/// One power an admin token may hold.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Scope {
    KeysRead,
    KeysWrite,
    CreditsWrite,
    AccountsRead,
    AccountsWrite,
    PaymentsRead,
    PaymentsWrite,
    UsageRead,
    AuditRead,
    /// Admin tokens and reload.
    Admin,
}

impl Scope {
    /// Every scope, in the order the API lists them.
    pub const ALL: [Scope; 10] = [
        Scope::KeysRead,
        Scope::KeysWrite,
        Scope::CreditsWrite,
        Scope::AccountsRead,
        Scope::AccountsWrite,
        Scope::PaymentsRead,
        Scope::PaymentsWrite,
        Scope::UsageRead,
        Scope::AuditRead,
        Scope::Admin,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Scope::KeysRead => "keys:read",
            Scope::KeysWrite => "keys:write",
            Scope::CreditsWrite => "credits:write",
            Scope::AccountsRead => "accounts:read",
            Scope::AccountsWrite => "accounts:write",
            Scope::PaymentsRead => "payments:read",
            Scope::PaymentsWrite => "payments:write",
            Scope::UsageRead => "usage:read",
            Scope::AuditRead => "audit:read",
            Scope::Admin => "admin",
        }
    }

    pub fn parse(name: &str) -> Option<Scope> {
        Scope::ALL.into_iter().find(|s| s.as_str() == name)
    }

    fn bit(self) -> u16 {
        1 << (self as u16)
    }
}

/// A set of scopes.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Scopes(u16);

impl Scopes {
    /// What the root token holds.
    pub const ROOT: Scopes = Scopes((1 << Scope::ALL.len()) - 1);

    pub fn has(self, s: Scope) -> bool {
        self.0 & s.bit() != 0
    }

    pub fn with(self, s: Scope) -> Scopes {
        Scopes(self.0 | s.bit())
    }

    /// The scopes in the set, in [`Scope::ALL`] order.
    pub fn iter(self) -> impl Iterator<Item = Scope> {
        Scope::ALL.into_iter().filter(move |s| self.has(*s))
    }

    pub fn names(self) -> Vec<&'static str> {
        self.iter().map(Scope::as_str).collect()
    }

    /// Parses scope names; the first unknown one is the error.
    pub fn parse<'a>(names: impl IntoIterator<Item = &'a str>) -> Result<Scopes, &'a str> {
        let mut set = Scopes::default();
        for n in names {
            set = set.with(Scope::parse(n).ok_or(n)?);
        }
        Ok(set)
    }
}

/// What a route needs: one scope for reads (GET, HEAD), one for the rest.
struct Rule {
    /// Path segments after `/api/v1/`, `*` matching any one segment; the
    /// rule covers every path that starts with them.
    prefix: &'static [&'static str],
    /// Needed by GET and HEAD: looking changes nothing.
    read: Scope,
    /// Needed by every other method.
    write: Scope,
}

/// THE table: every admin route and the scope it needs, most specific
/// first (the first rule whose prefix matches wins). Routes whose
/// handlers other modules add (accounts' subscriptions, payments, events,
/// webhooks, audit) are already here, so a new handler is guarded the
/// moment it is routed. A path no rule covers needs `admin`.
const TABLE: &[Rule] = &[
    rule(&["keys", "*", "usage"], Scope::UsageRead, Scope::UsageRead),
    rule(
        &["keys", "*", "credits"],
        Scope::KeysRead,
        Scope::CreditsWrite,
    ),
    rule(
        &["keys", "*", "ledger"],
        Scope::KeysRead,
        Scope::CreditsWrite,
    ),
    rule(&["keys"], Scope::KeysRead, Scope::KeysWrite),
    rule(
        &["owners", "*", "usage"],
        Scope::UsageRead,
        Scope::UsageRead,
    ),
    rule(&["usage"], Scope::UsageRead, Scope::UsageRead),
    rule(
        &["accounts", "*", "credits"],
        Scope::AccountsRead,
        Scope::CreditsWrite,
    ),
    rule(
        &["accounts", "*", "ledger"],
        Scope::AccountsRead,
        Scope::CreditsWrite,
    ),
    rule(&["accounts"], Scope::AccountsRead, Scope::AccountsWrite),
    rule(
        &["subscriptions"],
        Scope::AccountsRead,
        Scope::AccountsWrite,
    ),
    rule(&["payments"], Scope::PaymentsRead, Scope::PaymentsWrite),
    rule(&["events"], Scope::AuditRead, Scope::Admin),
    rule(&["webhooks"], Scope::AuditRead, Scope::Admin),
    rule(&["audit"], Scope::AuditRead, Scope::Admin),
    rule(&["admin"], Scope::Admin, Scope::Admin),
];

const fn rule(prefix: &'static [&'static str], read: Scope, write: Scope) -> Rule {
    Rule {
        prefix,
        read,
        write,
    }
}

/// The scope a call to `path` (raw, under `/api/v1/`) with `method` needs.
pub fn required(method: &http::Method, path: &str) -> Scope {
    let rest = path.strip_prefix("/api/v1/").unwrap_or(path);
    let read = method == http::Method::GET || method == http::Method::HEAD;
    let mut segs = rest.split('/');
    let segs: [Option<&str>; 3] = [segs.next(), segs.next(), segs.next()];
    TABLE
        .iter()
        .find(|r| {
            r.prefix
                .iter()
                .zip(&segs)
                .all(|(want, got)| got.is_some_and(|g| *want == "*" || *want == g))
        })
        .map_or(Scope::Admin, |r| if read { r.read } else { r.write })
}

/// The refusal of a call outside the token's scopes: 403 naming the scope.
pub fn insufficient(scope: Scope) -> ApiError {
    ApiError::permission(
        "insufficient_scope",
        format!(
            "This admin token lacks the scope `{}` this call needs.",
            scope.as_str()
        ),
    )
    .with_param("scope")
    .with_metadata(serde_json::json!({ "required_scope": scope.as_str() }))
}

/// Who made an admin call: what the scope check and the audit log use.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AdminCaller {
    /// The token's name (`root` for the environment's token): the actor
    /// the audit log records.
    pub actor: String,
    /// The token's id; `None` for root.
    pub token_id: Option<String>,
    /// What the token may do.
    pub scopes: Scopes,
}

impl AdminCaller {
    pub fn root() -> AdminCaller {
        AdminCaller {
            actor: "root".to_owned(),
            token_id: None,
            scopes: Scopes::ROOT,
        }
    }

    /// `Err(403 insufficient_scope)` unless the caller holds `scope`.
    pub fn require(&self, scope: Scope) -> Result<(), ApiError> {
        if self.scopes.has(scope) {
            Ok(())
        } else {
            Err(insufficient(scope))
        }
    }
}

/// A scoped token as kept in memory.
#[derive(Clone, Debug)]
pub struct TokenEntry {
    /// The stored record (its `scopes` already validated into `scopes`).
    pub record: AdminTokenRecord,
    /// SHA-256 of the token: compared in constant time.
    digest: [u8; 32],
    /// Parsed once so the guard does no string work per call.
    scopes: Scopes,
}

impl TokenEntry {
    /// `None` when the stored record does not parse (a hand-edited or
    /// future row): it authenticates nothing, and is logged.
    pub fn of(record: AdminTokenRecord) -> Option<TokenEntry> {
        let mut digest = [0u8; 32];
        hex::decode_to_slice(&record.hash, &mut digest).ok()?;
        let scopes = Scopes::parse(record.scopes.iter().map(String::as_str)).ok()?;
        Some(TokenEntry {
            record,
            digest,
            scopes,
        })
    }

    pub fn scopes(&self) -> Scopes {
        self.scopes
    }
}

/// SHA-256 of a token as presented.
pub fn digest(token: &[u8]) -> [u8; 32] {
    Sha256::digest(token).into()
}

/// The scoped tokens in memory. Reads are lock-free (`ArcSwap`); writes
/// (create, delete) replace the whole list, under the admin write lock.
#[derive(Default)]
pub struct AdminTokens {
    /// Every scoped token, oldest first.
    list: ArcSwap<Vec<TokenEntry>>,
}

impl AdminTokens {
    /// The tokens read from the store at start-up.
    pub fn from_records(records: Vec<AdminTokenRecord>) -> AdminTokens {
        let list = records
            .into_iter()
            .filter_map(|r| {
                let id = r.id.clone();
                let e = TokenEntry::of(r);
                if e.is_none() {
                    tracing::warn!(id = %id, "a stored admin token does not parse; it authenticates nothing");
                }
                e
            })
            .collect();
        AdminTokens {
            list: ArcSwap::from_pointee(list),
        }
    }

    /// The scoped token whose digest is `d`. Every entry is compared, in
    /// constant time, whatever matches: the time depends on the number of
    /// tokens only.
    pub fn find(&self, d: &[u8; 32]) -> Option<AdminCaller> {
        let list = self.list.load();
        let mut found = None;
        for e in list.iter() {
            let same: bool = e.digest.ct_eq(d).into();
            if same {
                found = Some(e);
            }
        }
        found.map(|e| AdminCaller {
            actor: e.record.name.clone(),
            token_id: Some(e.record.id.clone()),
            scopes: e.scopes,
        })
    }

    pub fn snapshot(&self) -> Arc<Vec<TokenEntry>> {
        self.list.load_full()
    }

    /// Adds a stored token.
    pub fn insert(&self, e: TokenEntry) {
        self.list.rcu(|l| {
            let mut l = Vec::clone(l);
            l.push(e.clone());
            l
        });
    }

    /// Adds or replaces the token `record` names (another node's change,
    /// in cluster mode); `false` when the record does not parse.
    pub fn put_record(&self, record: AdminTokenRecord) -> bool {
        let Some(e) = TokenEntry::of(record) else {
            return false;
        };
        self.list.rcu(|l| {
            let mut l: Vec<TokenEntry> = l
                .iter()
                .filter(|x| x.record.id != e.record.id)
                .cloned()
                .collect();
            l.push(e.clone());
            l
        });
        true
    }

    /// Forgets a token; its next call is refused.
    pub fn remove(&self, id: &str) {
        self.list.rcu(|l| {
            l.iter()
                .filter(|e| e.record.id != id)
                .cloned()
                .collect::<Vec<_>>()
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::Method;

    #[test]
    fn scope_names_round_trip_and_unknown_is_named() {
        for s in Scope::ALL {
            assert_eq!(Scope::parse(s.as_str()), Some(s));
        }
        assert_eq!(Scopes::ROOT.names().len(), 10);
        assert_eq!(Scopes::parse(["keys:read", "keys:nope"]), Err("keys:nope"));
        let s = Scopes::parse(["usage:read", "admin"]).unwrap();
        assert_eq!(s.names(), vec!["usage:read", "admin"]);
    }

    #[test]
    fn the_table_covers_routes_that_land_later() {
        let g = Method::GET;
        let p = Method::POST;
        let cases = [
            (&g, "/api/v1/keys", Scope::KeysRead),
            (&p, "/api/v1/keys", Scope::KeysWrite),
            (&p, "/api/v1/keys/import", Scope::KeysWrite),
            (&Method::DELETE, "/api/v1/keys/ab", Scope::KeysWrite),
            (&p, "/api/v1/keys/ab/credits", Scope::CreditsWrite),
            (&g, "/api/v1/keys/ab/ledger", Scope::KeysRead),
            (&g, "/api/v1/keys/ab/usage/chart", Scope::UsageRead),
            (&g, "/api/v1/owners/o/usage", Scope::UsageRead),
            (&g, "/api/v1/usage", Scope::UsageRead),
            (&p, "/api/v1/accounts/a/credits", Scope::CreditsWrite),
            (&Method::PATCH, "/api/v1/accounts/a", Scope::AccountsWrite),
            (&g, "/api/v1/subscriptions/s", Scope::AccountsRead),
            (&p, "/api/v1/subscriptions", Scope::AccountsWrite),
            (&g, "/api/v1/payments", Scope::PaymentsRead),
            (&p, "/api/v1/payments/p/refund", Scope::PaymentsWrite),
            (&g, "/api/v1/events", Scope::AuditRead),
            (&p, "/api/v1/events/e/redeliver", Scope::Admin),
            (&g, "/api/v1/webhooks/deliveries", Scope::AuditRead),
            (&g, "/api/v1/audit", Scope::AuditRead),
            (&g, "/api/v1/admin/tokens", Scope::Admin),
            (&p, "/api/v1/admin/reload", Scope::Admin),
            (&g, "/api/v1/something-new", Scope::Admin),
            // A prefix matches whole segments only.
            (&g, "/api/v1/keysx", Scope::Admin),
        ];
        for (m, path, want) in cases {
            assert_eq!(required(m, path), want, "{m} {path}");
        }
    }

    #[test]
    fn tokens_are_found_by_digest_only() {
        let rec = |id: &str, token: &str| AdminTokenRecord {
            id: id.into(),
            name: format!("n-{id}"),
            scopes: vec!["keys:read".into()],
            hash: hex::encode(digest(token.as_bytes())),
            created_at: 0,
        };
        let t = AdminTokens::from_records(vec![rec("a", "secret-a"), rec("b", "secret-b")]);
        assert_eq!(t.find(&digest(b"secret-b")).unwrap().actor, "n-b");
        assert!(t.find(&digest(b"secret-c")).is_none());
        t.remove("b");
        assert!(t.find(&digest(b"secret-b")).is_none());
        assert!(t.find(&digest(b"secret-a")).is_some());
    }
}
