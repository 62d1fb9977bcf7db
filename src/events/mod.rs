//! Events, webhooks, email and the audit log (issue 12).
//!
//! - The **outbox**: every change an operator's app cares about becomes an
//!   [`Event`] row (`book` `E` seq), written by the store thread in the
//!   same sled batch as the change (see `store/events.rs`), so a crash
//!   never loses one and never leaves one for a change that did not happen.
//! - [`deliver`]: the task that fans the outbox out to `[[webhooks]]` and
//!   `[email]`, with Standard Webhooks signatures ([`signature`]), retries
//!   on the configured schedule and delivery state in `book` `D`.
//! - [`email`]: plain-text mail over SMTP (`lettre`).
//! - The **audit log**: who (the admin token's name) changed what, from
//!   which address, before/after, written in the same batch as the change
//!   (`book` `U` seq). [`acting_as`] scopes an admin request; the store
//!   thread's `audit` records it.
//! - [`payload`]: the objects' API shapes events and audit entries carry.
//! - [`config`]: `[[webhooks]]`, `[email]`, `[alerts]`.

pub mod config;
pub mod deliver;
pub mod email;
pub mod payload;
pub mod signature;

use std::future::Future;
use std::net::IpAddr;

use serde::{Deserialize, Serialize};
use serde_json::Value;

pub use deliver::Events;

/// An event a store op is about to write: its type (`key.created`…) and
/// its `data` (the object's API shape).
#[derive(Clone, Debug, PartialEq)]
pub struct EventDraft {
    /// `key.created`, `payment.succeeded`, …: what subscribers match.
    pub kind: String,
    /// The object's API shape; never a key or a secret.
    pub data: Value,
}

impl EventDraft {
    pub fn new(kind: &str, data: Value) -> EventDraft {
        EventDraft {
            kind: kind.to_owned(),
            data,
        }
    }
}

/// An event as stored in the outbox and sent: the webhook body is exactly
/// this JSON, so every retry signs the same bytes.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct Event {
    /// `evt_<seq>`: the `webhook-id` of every delivery of it.
    pub id: String,
    /// `key.created`, …
    #[serde(rename = "type")]
    pub kind: String,
    /// RFC 3339, UTC, of the change.
    pub timestamp: String,
    /// The object's API shape.
    pub data: Value,
}

/// The id of the event at outbox sequence `seq`.
pub fn event_id(seq: u64) -> String {
    format!("evt_{seq}")
}

/// The outbox sequence of `evt_<seq>` (or a bare number).
pub fn event_seq(id: &str) -> Option<u64> {
    id.strip_prefix("evt_").unwrap_or(id).parse().ok()
}

/// One audit log entry (`book` `U` seq).
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct AuditEntry {
    /// Position in the log; `after=` pages by it.
    pub seq: u64,
    /// RFC 3339, UTC.
    pub at: String,
    /// The admin token's name (`root` for the environment's token).
    pub actor: String,
    /// What was done: `key.create`, `account.credit`, `reload`, …
    pub action: String,
    /// What it was done to: a key hash, an account id, a token id.
    pub target: String,
    /// Summary before the change (`null` for a creation).
    pub before: Option<Value>,
    /// Summary after (`null` for a deletion).
    pub after: Option<Value>,
    /// The client address the request came from.
    pub ip: Option<String>,
}

/// Who is making the admin request being served: set by the admin API
/// around the handler ([`acting_as`]) and read by `Store` when it queues a
/// write, so the store thread can audit it in the write's own batch.
#[derive(Clone, Debug, PartialEq)]
pub struct Actor {
    /// The admin token's name (`root` for the environment's token).
    pub name: String,
    /// The client's address.
    pub ip: Option<IpAddr>,
    /// When the request arrived (the gateway's clock, so tests can move it).
    pub at_ms: i64,
}

tokio::task_local! {
    static ACTOR: Actor;
}

/// Runs `f` (an admin request's handling) as `actor`: every store write it
/// makes is audited under that name.
pub async fn acting_as<F: Future>(actor: Actor, f: F) -> F::Output {
    ACTOR.scope(actor, f).await
}

/// The actor of the admin request this task serves, if any.
pub fn current_actor() -> Option<Actor> {
    ACTOR.try_with(Actor::clone).ok()
}

/// Does `kind` match any of `patterns` (globs such as `key.*`)?
pub fn wanted(patterns: &[crate::config::Pattern], kind: &str) -> bool {
    patterns.iter().any(|p| p.is_match(kind))
}
