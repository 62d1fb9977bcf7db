//! Plain-text mail of chosen events to the account's address, over SMTP
//! (`lettre`, rustls). The address: the event's own `email` (account
//! events, account credits), else the account named by its `owner` or
//! `account` field. An event with no address is skipped, not retried.

use lettre::message::Mailbox;
use lettre::message::header::ContentType;
use lettre::{AsyncSmtpTransport, AsyncTransport, Message, Tokio1Executor};
use serde_json::Value;

use super::Event;
use super::config::EmailConfig;
use crate::store::Store;

/// The SMTP transport and the sender, built once at start-up.
pub struct Mailer {
    /// Pooled SMTP connections to the configured server.
    transport: AsyncSmtpTransport<Tokio1Executor>,
    /// `From:` of every mail.
    from: Mailbox,
}

impl Mailer {
    /// Reads the SMTP URL from `smtp_url_env`; a missing or bad one is an
    /// error naming the variable (never its content: it holds a password).
    pub fn new(cfg: &EmailConfig) -> Result<Mailer, String> {
        let url = std::env::var(&cfg.smtp_url_env).map_err(|_| {
            format!(
                "email: the environment variable {} (smtp_url_env) is not set",
                cfg.smtp_url_env
            )
        })?;
        let transport = AsyncSmtpTransport::<Tokio1Executor>::from_url(&url)
            .map_err(|e| {
                format!(
                    "email: the SMTP URL in {} is not usable: {e}",
                    cfg.smtp_url_env
                )
            })?
            .build();
        let from = cfg
            .from
            .parse()
            .map_err(|_| format!("email.from {:?} is not an email address", cfg.from))?;
        Ok(Mailer { transport, from })
    }

    /// Sends `ev` to its account's address: `Ok(false)` when it has none.
    pub async fn send(&self, store: &Store, ev: &Event) -> Result<bool, String> {
        let Some(to) = recipient(store, &ev.data) else {
            return Ok(false);
        };
        let Ok(to) = to.parse::<Mailbox>() else {
            return Ok(false);
        };
        let msg = Message::builder()
            .from(self.from.clone())
            .to(to)
            .subject(subject(ev))
            .header(ContentType::TEXT_PLAIN)
            .body(text(ev))
            .map_err(|e| format!("building the mail: {e}"))?;
        self.transport
            .send(msg)
            .await
            .map(|_| true)
            .map_err(|e| format!("SMTP: {e}"))
    }
}

fn recipient(store: &Store, data: &Value) -> Option<String> {
    if let Some(e) = data.get("email").and_then(Value::as_str) {
        return Some(e.to_owned());
    }
    let id = data
        .get("owner")
        .or_else(|| data.get("account"))
        .and_then(Value::as_str)?;
    store.user_account(id).ok()??.email
}

fn subject(ev: &Event) -> String {
    let what = match ev.kind.as_str() {
        "payment.succeeded" => "Payment received",
        "payment.refunded" => "Payment refunded",
        "payment.failed" => "Payment failed",
        "credit.applied" => "Credit applied",
        "key.low_balance" => "API key balance is low",
        "account.low_balance" => "Account balance is low",
        "key.expired" => "API key expired",
        "key.exhausted" => "API key used up",
        "account.suspended" => "Account suspended",
        other => other,
    };
    format!("[Tollgate] {what}")
}

/// The mail body: what happened and the object's fields, one per line.
fn text(ev: &Event) -> String {
    let mut out = format!("{} at {}\n\n", ev.kind, ev.timestamp);
    if let Value::Object(map) = &ev.data {
        for (k, v) in map {
            let v = match v {
                Value::Null => continue,
                Value::String(s) => s.clone(),
                other => other.to_string(),
            };
            out.push_str(&format!("{k}: {v}\n"));
        }
    }
    out.push_str(&format!("\nEvent id: {}\n", ev.id));
    out
}
