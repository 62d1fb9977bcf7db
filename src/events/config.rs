//! `[[webhooks]]`, `[email]` and `[alerts]`: parsed once into typed values
//! (URLs, globs, durations, amounts); the secrets themselves come from the
//! environment at start-up ([`crate::events::Events::start`]).

use serde::{Deserialize, Deserializer, Serialize};

use crate::config::{Dur, Pattern};
use crate::money::Pico;

/// The Standard Webhooks retry schedule: the waits after each failed try.
pub const DEFAULT_RETRY: [u64; 9] = [
    5,
    5 * 60,
    30 * 60,
    2 * 3600,
    5 * 3600,
    10 * 3600,
    14 * 3600,
    20 * 3600,
    24 * 3600,
];

fn default_retry() -> Vec<Dur> {
    DEFAULT_RETRY.iter().map(|s| Dur::secs(*s)).collect()
}

fn default_timeout() -> Dur {
    Dur::secs(15)
}

fn all_events() -> Vec<Pattern> {
    vec![Pattern::parse("*").expect("`*` is a valid glob")]
}

/// One `[[webhooks]]` endpoint.
#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct WebhookConfig {
    /// Where events are POSTed: http:// or https:// only.
    pub url: HookUrl,
    /// Env var holding the `whsec_…` signing secret.
    pub secret_env: String,
    /// Globs of the event types sent (`["key.*", "payment.*"]`); all by default.
    #[serde(default = "all_events")]
    pub events: Vec<Pattern>,
    /// Waits after each failed try; past the last one the delivery fails.
    #[serde(default = "default_retry")]
    pub retry: Vec<Dur>,
    /// Longest a try may take, connecting included.
    #[serde(default = "default_timeout")]
    pub timeout: Dur,
}

/// `[email]`: plain-text mail to the account's address for chosen events.
#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct EmailConfig {
    /// Env var holding the SMTP URL (`smtp://user:pass@host:port`,
    /// `smtps://…`, or `smtp://host:port?tls=required`).
    pub smtp_url_env: String,
    /// The `From:` address.
    pub from: String,
    /// Globs of the event types mailed.
    #[serde(default = "email_events")]
    pub events: Vec<Pattern>,
    /// Waits after each failed send.
    #[serde(default = "default_retry")]
    pub retry: Vec<Dur>,
    /// Longest one send may take.
    #[serde(default = "default_timeout")]
    pub timeout: Dur,
}

fn email_events() -> Vec<Pattern> {
    [
        "payment.succeeded",
        "key.low_balance",
        "account.low_balance",
        "key.expired",
    ]
    .iter()
    .map(|p| Pattern::parse(p).expect("valid globs"))
    .collect()
}

/// `[alerts]`: thresholds of the alerting events.
#[derive(Clone, Debug, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct AlertsConfig {
    /// `key.low_balance` / `account.low_balance` fire when what remains
    /// falls below this (an account's own `low_balance_alert` wins).
    pub low_balance: Option<Pico>,
    /// `usage.anomaly` fires when a key's spend in the current hour is
    /// above this many times its hourly average over the day before.
    pub anomaly_factor: Option<f64>,
}

impl AlertsConfig {
    /// The store's options with these thresholds (the store thread checks
    /// usage records against them).
    pub fn store_options(
        &self,
        storage: &crate::config::StorageConfig,
    ) -> crate::store::StoreOptions {
        crate::store::StoreOptions {
            alerts: crate::store::AlertLevels {
                low_balance: self.low_balance,
                anomaly_permille: self.anomaly_factor.map(|f| (f * 1000.0).round() as u64),
            },
            ..storage.store_options()
        }
    }
}

/// A webhook URL: parsed at load, so a typo is a start-up error.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HookUrl {
    /// As written.
    pub text: String,
    /// Parsed once for every delivery.
    pub uri: http::Uri,
}

impl HookUrl {
    pub fn parse(text: &str) -> Result<HookUrl, String> {
        let uri: http::Uri = text
            .parse()
            .map_err(|_| format!("webhook url {text:?} is not a URL"))?;
        match (uri.scheme_str(), uri.authority()) {
            (Some("http" | "https"), Some(a)) if !a.host().is_empty() => Ok(HookUrl {
                text: text.to_owned(),
                uri,
            }),
            _ => Err(format!(
                "webhook url {text:?} must be an http:// or https:// URL"
            )),
        }
    }
}

impl<'de> Deserialize<'de> for HookUrl {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<HookUrl, D::Error> {
        let text = String::deserialize(d)?;
        HookUrl::parse(&text).map_err(serde::de::Error::custom)
    }
}

impl Serialize for HookUrl {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.text)
    }
}

/// Cross-field checks of the three sections, named like the file.
pub fn validate(
    webhooks: &[WebhookConfig],
    email: Option<&EmailConfig>,
    alerts: &AlertsConfig,
) -> Result<(), String> {
    let mut urls = std::collections::HashSet::new();
    for (i, w) in webhooks.iter().enumerate() {
        if w.secret_env.is_empty() {
            return Err(format!(
                "webhooks[{i}].secret_env must name an environment variable"
            ));
        }
        if w.retry.len() > 32 {
            return Err(format!("webhooks[{i}].retry has more than 32 entries"));
        }
        if w.timeout.0.is_zero() {
            return Err(format!("webhooks[{i}].timeout must be more than 0"));
        }
        if !urls.insert(w.url.text.as_str()) {
            return Err(format!(
                "webhooks[{i}].url {:?} is listed twice",
                w.url.text
            ));
        }
    }
    if let Some(e) = email {
        if e.smtp_url_env.is_empty() {
            return Err("email.smtp_url_env must name an environment variable".into());
        }
        if e.from.parse::<lettre::message::Mailbox>().is_err() {
            return Err(format!("email.from {:?} is not an email address", e.from));
        }
    }
    if let Some(f) = alerts.anomaly_factor
        && !(f.is_finite() && f > 1.0)
    {
        return Err("alerts.anomaly_factor must be a number above 1".into());
    }
    if let Some(p) = alerts.low_balance
        && p.0 < 0
    {
        return Err("alerts.low_balance must not be negative".into());
    }
    Ok(())
}
