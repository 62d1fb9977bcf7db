//! `config.toml`: the schema, its defaults, and its validation.
//!
//! The file is parsed once into typed values; nothing reads raw config
//! later. Unknown keys and bad values are errors that name the key and the
//! line (toml's own errors carry the span; our cross-field checks find the
//! line of the table or key they are about).

use std::collections::BTreeMap;
use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use ipnet::IpNet;
use serde::{Deserialize, Deserializer, Serialize};

use crate::clock::Period;
use crate::money::Pico;

/// The whole configuration.
#[derive(Clone, Debug, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    #[serde(default)]
    pub server: ServerConfig,
    #[serde(default)]
    pub runtime: RuntimeConfig,
    #[serde(default)]
    pub storage: StorageConfig,
    #[serde(default)]
    pub admin: AdminConfig,
    #[serde(default)]
    pub proxy: ProxyConfig,
    #[serde(default)]
    pub billing: BillingConfig,
    #[serde(default)]
    pub limits: LimitsConfig,
    #[serde(default)]
    pub keys: KeysConfig,
    #[serde(default)]
    pub cors: CorsConfig,
    #[serde(default)]
    pub metrics: MetricsConfig,
    /// Where requests go; a request's model picks the group.
    #[serde(default)]
    pub upstreams: Vec<UpstreamConfig>,
    /// The models served and their prices (USD per 1M tokens).
    #[serde(default)]
    pub models: BTreeMap<String, ModelConfig>,
    /// Routes allowed besides the known ones, with their price: anything
    /// else under `/v1/` is refused (404 `route_not_allowed`).
    #[serde(default)]
    pub routes: BTreeMap<Pattern, RouteConfig>,
    /// Templates for new keys.
    #[serde(default)]
    pub plans: BTreeMap<String, PlanConfig>,
    /// Payment providers whose notifications credit accounts (issue 11).
    #[serde(default)]
    pub payments: PaymentsConfig,
    /// The compatible surfaces of the systems users come from (new-api's
    /// quota unit, the licence server's credit): `api::compat`.
    #[serde(default)]
    pub compat: CompatConfig,
    /// Endpoints the outbox's events are POSTed to (Standard Webhooks).
    #[serde(default)]
    pub webhooks: Vec<crate::events::config::WebhookConfig>,
    /// Plain-text mail of chosen events to the account's address.
    #[serde(default)]
    pub email: Option<crate::events::config::EmailConfig>,
    /// Low-balance and anomaly thresholds.
    #[serde(default)]
    pub alerts: crate::events::config::AlertsConfig,
    /// The file this config was loaded from (set by [`Config::load`]): what
    /// a reload re-reads. `None` for a config built from text or in code.
    #[serde(skip)]
    pub source: Option<PathBuf>,
    /// `[cluster]`: run as one of several nodes over PostgreSQL
    /// (`crate::cluster`); absent, the node runs alone on its sled store.
    #[serde(default)]
    pub cluster: Option<crate::cluster::ClusterConfig>,
}

#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct ServerConfig {
    /// Address the gateway listens on.
    pub listen: SocketAddr,
    /// PEM files to terminate TLS with; plain HTTP when absent.
    pub tls: Option<TlsConfig>,
    /// Larger request bodies are refused with 413.
    pub max_body_bytes: usize,
    /// Largest request head (request line and headers) accepted.
    pub max_header_bytes: usize,
    /// Connections beyond this are closed at accept.
    pub max_connections: usize,
    /// A client that has not sent its whole request head by then is cut off.
    /// hyper starts this timer whenever it waits for a request head, so it
    /// also closes an idle HTTP/1.1 keep-alive connection.
    pub header_read_timeout: Dur,
    /// HTTP/2: keep-alive pings every half of this; a peer that does not
    /// answer one is dropped.
    pub idle_timeout: Dur,
    /// On SIGINT/SIGTERM, in-flight requests get this long to finish.
    pub shutdown_grace: Dur,
    /// Proxies (CIDRs) whose `X-Forwarded-For` / `Forwarded` name the
    /// client; from any other peer those headers are ignored, so that a
    /// client cannot choose the address `allowed_ips` and the limiters see.
    pub trusted_proxies: Vec<ipnet::IpNet>,
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            listen: "127.0.0.1:8080".parse().expect("a valid address literal"),
            tls: None,
            max_body_bytes: 16 * 1024 * 1024,
            max_header_bytes: 64 * 1024,
            max_connections: 10_000,
            header_read_timeout: Dur::secs(10),
            idle_timeout: Dur::secs(120),
            shutdown_grace: Dur::secs(30),
            trusted_proxies: Vec::new(),
        }
    }
}

#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct TlsConfig {
    /// Certificate chain, PEM.
    pub cert: PathBuf,
    /// Private key, PEM (PKCS#8, PKCS#1 or SEC1).
    pub key: PathBuf,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum RuntimeMode {
    /// One thread per worker, each with its own `current_thread` runtime,
    /// `SO_REUSEPORT` listener and upstream pool.
    PerCore,
    /// One multi-thread runtime shared by all connections.
    Shared,
}

#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct RuntimeConfig {
    pub mode: RuntimeMode,
    /// Worker threads; 0 = one per core.
    pub workers: usize,
    /// Pin worker `i` to core `i` (per-core mode).
    pub pin_cores: bool,
    /// Per-core mode: a worker with at most one request in flight polls
    /// for this long after its last event before it sleeps (0 = never;
    /// see `proxy::spin`).
    pub spin_us: u64,
}

impl Default for RuntimeConfig {
    fn default() -> Self {
        RuntimeConfig {
            mode: RuntimeMode::PerCore,
            workers: 0,
            pin_cores: false,
            spin_us: 100,
        }
    }
}

impl RuntimeConfig {
    /// Workers actually started.
    pub fn worker_count(&self) -> usize {
        if self.workers == 0 {
            std::thread::available_parallelism()
                .map(|n| n.get())
                .unwrap_or(1)
        } else {
            self.workers
        }
    }
}

#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct StorageConfig {
    /// Directory of the embedded database (created if missing).
    pub path: PathBuf,
    /// Usage and counters are durable at most this many ms after a request
    /// ends: what a crash can lose.
    pub flush_ms: u64,
    /// Usage records older than this are pruned (rollups stay); 0 = keep.
    pub usage_retention_days: u32,
    /// Outbox events older than this whose deliveries all finished are
    /// pruned with their delivery rows (pending ones never); 0 = keep.
    pub event_retention_days: u32,
    /// Records waiting for their commit at which paid requests are refused
    /// (503 `store_unavailable`): bounds the queue and what a crash loses.
    pub queue_capacity: u64,
    /// MiB the store may keep in memory (its cache and the pending batch).
    pub cache_mb: u64,
}

impl StorageConfig {
    /// The settings the store itself runs with.
    pub fn store_options(&self) -> crate::store::StoreOptions {
        crate::store::StoreOptions {
            flush_ms: self.flush_ms,
            queue_capacity: self.queue_capacity,
            cache_mb: self.cache_mb,
            ..crate::store::StoreOptions::default()
        }
    }
}

impl Default for StorageConfig {
    fn default() -> Self {
        StorageConfig {
            path: PathBuf::from("./data"),
            flush_ms: 50,
            usage_retention_days: 0,
            event_retention_days: 30,
            queue_capacity: crate::store::DEFAULT_QUEUE_CAPACITY,
            cache_mb: 64,
        }
    }
}

#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct AdminConfig {
    /// Env var holding the admin token; when unset, a token is generated on
    /// first start and saved under `storage.path` (mode 0600).
    pub token_env: String,
}

impl Default for AdminConfig {
    fn default() -> Self {
        AdminConfig {
            token_env: "TOLLGATE_ADMIN_TOKEN".to_owned(),
        }
    }
}

#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct ProxyConfig {
    /// Upstreams tried for one request (first try included), only while no
    /// byte has reached the client.
    pub max_attempts: u32,
    /// Consecutive failures after which an upstream is skipped…
    pub failure_threshold: u32,
    /// …for this long.
    pub cooldown: Dur,
    /// Default TCP (+TLS) connect timeout per upstream.
    pub connect_timeout: Dur,
    /// Default time to wait for the upstream's response head.
    pub first_byte_timeout: Dur,
    /// Idle pooled upstream connections are closed after this.
    pub pool_idle_timeout: Dur,
    /// An upstream that sends nothing for this long while answering is cut
    /// (the request settles and frees its slot and reservation).
    pub stream_idle_timeout: Dur,
}

impl Default for ProxyConfig {
    fn default() -> Self {
        ProxyConfig {
            max_attempts: 3,
            failure_threshold: 3,
            cooldown: Dur::secs(30),
            connect_timeout: Dur::secs(5),
            first_byte_timeout: Dur::secs(120),
            pool_idle_timeout: Dur::secs(90),
            stream_idle_timeout: Dur::secs(60),
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum OnInsufficient {
    /// Lower `max_tokens` to what the key can still pay for (≥ 1 token).
    Cap,
    /// Refuse with 402.
    Reject,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum OnClientDisconnect {
    /// Drop the upstream request at once; charge what was delivered.
    Cancel,
    /// Keep reading the upstream (bounded by `drain_timeout`) for exact usage.
    Drain,
}

#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct BillingConfig {
    pub on_insufficient: OnInsufficient,
    pub on_client_disconnect: OnClientDisconnect,
    pub drain_timeout: Dur,
    /// A model served by an upstream but absent from `[models]` is refused
    /// (404) unless this names the `[models]` entry whose price applies.
    pub default_price: Option<String>,
    /// The models `default_price` may price (glob patterns): required with
    /// it, so a far dearer model an upstream also serves is not sold at a
    /// cheap default.
    pub default_price_models: Vec<Pattern>,
    /// `enforce` refuses what a key or account cannot pay; `observe`
    /// meters and records but never refuses for money (a transition);
    /// `off` meters nothing (keys and limits only).
    pub mode: BillingMode,
}

impl Default for BillingConfig {
    fn default() -> Self {
        BillingConfig {
            on_insufficient: OnInsufficient::Cap,
            on_client_disconnect: OnClientDisconnect::Cancel,
            drain_timeout: Dur::secs(30),
            default_price: None,
            default_price_models: Vec::new(),
            mode: BillingMode::Enforce,
        }
    }
}

#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct LimitsConfig {
    /// Unknown-key attempts per minute from one IP before 429 (brute force).
    pub unknown_key_per_minute: u32,
    /// Failed admin-token attempts per minute from one IP before 429.
    pub admin_failures_per_minute: u32,
    /// How often the sweeper marks expired keys and prunes limiter state.
    pub sweep_interval: Dur,
}

impl Default for LimitsConfig {
    fn default() -> Self {
        LimitsConfig {
            unknown_key_per_minute: 60,
            admin_failures_per_minute: 10,
            sweep_interval: Dur::secs(60),
        }
    }
}

#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct KeysConfig {
    /// Imported keys must start with this…
    pub import_prefix: String,
    /// …followed by exactly this many characters of `[0-9A-Za-z]`.
    pub import_length: usize,
}

impl Default for KeysConfig {
    fn default() -> Self {
        KeysConfig {
            import_prefix: "sk-".to_owned(),
            import_length: 48,
        }
    }
}

#[derive(Clone, Debug, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct MetricsConfig {
    /// Env var holding a bearer token that `/metrics` then requires
    /// (revenue by model is not for everyone); unset = open.
    pub token_env: Option<String>,
}

#[derive(Clone, Debug, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct CorsConfig {
    /// Origins allowed to call the consumption API from a browser; `*` = any.
    pub allowed_origins: Vec<String>,
}

#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct UpstreamConfig {
    /// Name shown in usage records and metrics.
    pub name: String,
    /// e.g. `https://api.openai.com/v1`; absent for `mock = true`.
    pub base_url: Option<BaseUrl>,
    /// Env var holding this upstream's API key (sent as `Authorization:
    /// Bearer`, or `x-api-key` for `kind = "anthropic"`).
    pub api_key_env: Option<String>,
    /// Glob patterns of the models this upstream serves.
    #[serde(default = "all_models")]
    pub models: Vec<Pattern>,
    /// Share of requests among healthy upstreams of the same group.
    #[serde(default = "one")]
    pub weight: u32,
    /// Serve this upstream with the built-in mock, started in-process.
    #[serde(default)]
    pub mock: bool,
    /// Serve this upstream with the built-in mock while its `api_key_env`
    /// is unset: the same config runs offline and, once the key is
    /// exported, against the real upstream.
    #[serde(default)]
    pub mock_without_key: bool,
    /// Extra root CA (PEM) trusted for this upstream, besides webpki roots.
    pub ca_file: Option<PathBuf>,
    pub connect_timeout: Option<Dur>,
    pub first_byte_timeout: Option<Dur>,
    /// Overrides `proxy.stream_idle_timeout` for this upstream.
    pub stream_idle_timeout: Option<Dur>,
    /// Message roles renamed for this upstream (`{ model = "assistant" }`:
    /// Gemini's `model` turns for an OpenAI-shaped Space).
    #[serde(default)]
    pub role_map: BTreeMap<String, String>,
    /// Which API the upstream speaks, so the gateway sends its key the way
    /// it takes it (`x-api-key` and `anthropic-version` for Anthropic).
    #[serde(default)]
    pub kind: UpstreamKind,
}

/// The API an upstream speaks.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum UpstreamKind {
    /// OpenAI-compatible: the key as `Authorization: Bearer`.
    #[default]
    Openai,
    /// Anthropic's API: the key as `x-api-key`, with `anthropic-version`.
    Anthropic,
}

fn all_models() -> Vec<Pattern> {
    vec![Pattern::parse("*").expect("`*` is a valid glob")]
}

fn one() -> u32 {
    1
}

#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ModelConfig {
    /// USD per 1M prompt tokens.
    pub input: Pico,
    /// USD per 1M cached prompt tokens (defaults to `input`). Also read as
    /// `cache_read`, Anthropic's name for them (`cache_read_input_tokens`).
    #[serde(alias = "cache_read")]
    pub cached_input: Option<Pico>,
    /// USD per 1M prompt tokens written to a prompt cache (Anthropic's
    /// `cache_creation_input_tokens`; defaults to `input`).
    pub cache_write: Option<Pico>,
    /// USD per 1M prompt tokens written to the cache with Anthropic's
    /// 1-hour TTL (`cache_creation.ephemeral_1h_input_tokens`; defaults to
    /// `cache_write`).
    pub cache_write_1h: Option<Pico>,
    /// USD per 1M completion tokens (reasoning included).
    pub output: Pico,
    /// USD per request, on top of tokens.
    #[serde(default)]
    pub request: Pico,
    /// Completion bound used for reservation (and injected as `max_tokens`
    /// when the client sends none).
    #[serde(default = "default_max_output")]
    pub max_output_tokens: u64,
}

fn default_max_output() -> u64 {
    4096
}

#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RouteConfig {
    /// Flat USD per request on this route.
    #[serde(default)]
    pub request: Pico,
    /// USD per 1M prompt tokens, for every model on this route (read from
    /// the answer's usage).
    pub input: Option<Pico>,
    /// USD per 1M completion tokens, for every model on this route.
    pub output: Option<Pico>,
    /// Charge nothing on this route.
    #[serde(default)]
    pub free: bool,
}

impl RouteConfig {
    /// Whether the rule names a price at all (a rule must be priced or free).
    pub fn priced(&self) -> bool {
        self.request.0 > 0 || self.input.is_some() || self.output.is_some()
    }
}

/// A glob pattern (`gpt-4o*`, `/v1/images/*`), compiled once when the
/// config is read; written back as its text.
#[derive(Clone, Debug)]
pub struct Pattern {
    /// What the operator wrote: shown, serialized, and the map order.
    text: String,
    /// Exact patterns skip the matcher.
    exact: bool,
    matcher: globset::GlobMatcher,
}

impl Pattern {
    pub fn parse(text: &str) -> Result<Pattern, String> {
        let glob = globset::GlobBuilder::new(text)
            .literal_separator(false)
            .build()
            .map_err(|e| format!("bad pattern {text:?}: {e}"))?;
        Ok(Pattern {
            text: text.to_owned(),
            exact: !text.contains(['*', '?', '[', '{']),
            matcher: glob.compile_matcher(),
        })
    }

    pub fn is_match(&self, name: &str) -> bool {
        if self.exact {
            self.text == name
        } else {
            self.matcher.is_match(name)
        }
    }

    pub fn as_str(&self) -> &str {
        &self.text
    }

    /// Matches one name only.
    pub fn is_exact(&self) -> bool {
        self.exact
    }
}

impl PartialEq for Pattern {
    fn eq(&self, other: &Pattern) -> bool {
        self.text == other.text
    }
}

impl Eq for Pattern {}

impl PartialOrd for Pattern {
    fn partial_cmp(&self, other: &Pattern) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for Pattern {
    fn cmp(&self, other: &Pattern) -> std::cmp::Ordering {
        self.text.cmp(&other.text)
    }
}

impl<'de> Deserialize<'de> for Pattern {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Pattern, D::Error> {
        let text = String::deserialize(d)?;
        Pattern::parse(&text).map_err(serde::de::Error::custom)
    }
}

impl Serialize for Pattern {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.text)
    }
}

/// An upstream's base URL, split once into the parts requests are built
/// from: `https://api.openai.com/v1` → origin `https://api.openai.com`,
/// path `/v1` (which replaces the client's `/v1`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BaseUrl {
    /// What the operator wrote.
    text: String,
    /// `scheme://authority`.
    pub origin: String,
    /// Path prefix without a trailing `/`.
    pub path: String,
}

impl BaseUrl {
    pub fn parse(text: &str) -> Result<BaseUrl, String> {
        let uri: http::Uri = text
            .parse()
            .map_err(|_| format!("base_url {text:?} is not a URL"))?;
        let (Some(scheme @ ("http" | "https")), Some(authority)) = (
            uri.scheme_str(),
            uri.authority().filter(|a| !a.host().is_empty()),
        ) else {
            return Err(format!(
                "base_url {text:?} must be an http:// or https:// URL"
            ));
        };
        Ok(BaseUrl {
            text: text.to_owned(),
            origin: format!("{scheme}://{authority}"),
            path: uri.path().trim_end_matches('/').to_owned(),
        })
    }

    pub fn as_str(&self) -> &str {
        &self.text
    }
}

impl<'de> Deserialize<'de> for BaseUrl {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<BaseUrl, D::Error> {
        let text = String::deserialize(d)?;
        BaseUrl::parse(&text).map_err(serde::de::Error::custom)
    }
}

impl Serialize for BaseUrl {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.text)
    }
}

#[derive(Clone, Debug, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct PlanConfig {
    pub limit: Option<Pico>,
    pub limit_reset: Option<Period>,
    pub expires_in: Option<Dur>,
    pub max_requests: Option<u64>,
    pub rpm: Option<u32>,
    pub tpm: Option<u64>,
    pub concurrency: Option<u32>,
    #[serde(default)]
    pub models: Vec<String>,
    #[serde(default)]
    pub allowed_ips: Vec<IpNet>,
    pub max_devices: Option<u32>,
    pub daily_fee: Option<Pico>,
    /// At most one active key of this plan per owner.
    #[serde(default)]
    pub one_per_owner: bool,
    /// USD per period the operator charges for a subscription (payments
    /// use it; the gateway itself never charges it).
    pub price: Option<Pico>,
    /// Length of a subscription period; a plan without one cannot be
    /// subscribed to (it stays a key template only).
    pub interval: Option<Interval>,
    /// Allowance granted to the account at each period start.
    pub grant: Option<Pico>,
    /// Unused allowance carries into the next period instead of lapsing.
    #[serde(default)]
    pub rollover: bool,
    /// Length of the trial period a new subscription starts with (0/none: no trial).
    pub trial_days: Option<u32>,
    /// How long a `past_due` subscription keeps its keys working before it expires.
    pub grace: Option<Dur>,
    /// The Stripe price id of this plan (payments map checkouts with it).
    pub stripe_price: Option<String>,
}

/// The length of a subscription period (calendar months and years: the
/// same day of the month, clamped to the month's last day).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Interval {
    Day,
    Week,
    Month,
    Year,
}

impl Interval {
    /// Unix ms `n` periods after `anchor_ms` (UTC). Periods are counted
    /// from one anchor so that month ends do not drift (Jan 31 → Feb 28 →
    /// Mar 31).
    pub fn nth(self, anchor_ms: i64, n: i64) -> i64 {
        use crate::clock::{DAY_MS, civil_from_days, days_from_civil};
        let months = match self {
            Interval::Day => return anchor_ms.saturating_add(n.saturating_mul(DAY_MS)),
            Interval::Week => return anchor_ms.saturating_add(n.saturating_mul(7 * DAY_MS)),
            Interval::Month => n,
            Interval::Year => n.saturating_mul(12),
        };
        let day = anchor_ms.div_euclid(DAY_MS);
        let in_day = anchor_ms.rem_euclid(DAY_MS);
        let (y, m, d) = civil_from_days(day);
        let total = y * 12 + (m as i64 - 1) + months;
        let (ny, nm) = (total.div_euclid(12), total.rem_euclid(12) as u32 + 1);
        let (fy, fm) = if nm == 12 { (ny + 1, 1) } else { (ny, nm + 1) };
        let last = (days_from_civil(fy, fm, 1) - days_from_civil(ny, nm, 1)) as u32;
        days_from_civil(ny, nm, d.min(last)) * DAY_MS + in_day
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Interval::Day => "day",
            Interval::Week => "week",
            Interval::Month => "month",
            Interval::Year => "year",
        }
    }
}

/// A duration written as text: `500ms`, `10s`, `5m`, `2h`, `7d`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct Dur(pub Duration);

impl Dur {
    pub const fn secs(s: u64) -> Dur {
        Dur(Duration::from_secs(s))
    }

    pub fn parse(text: &str) -> Result<Dur, String> {
        let split = text
            .find(|c: char| !c.is_ascii_digit())
            .unwrap_or(text.len());
        let (num, unit) = text.split_at(split);
        let n: u64 = num
            .parse()
            .map_err(|_| format!("invalid duration {text:?}: expected e.g. \"500ms\", \"10s\", \"5m\", \"2h\", \"7d\""))?;
        let ms = match unit {
            "ms" => Some(n),
            "s" => n.checked_mul(1_000),
            "m" => n.checked_mul(60_000),
            "h" => n.checked_mul(3_600_000),
            "d" => n.checked_mul(86_400_000),
            _ => {
                return Err(format!(
                    "invalid duration {text:?}: the unit must be one of ms, s, m, h, d"
                ));
            }
        };
        // Ten years is far beyond any sensible timeout or expiry.
        match ms {
            Some(ms) if ms <= 10 * 366 * 86_400_000 => Ok(Dur(Duration::from_millis(ms))),
            _ => Err(format!("duration {text:?} is too long (at most ten years)")),
        }
    }

    pub fn as_millis(self) -> u64 {
        self.0.as_millis() as u64
    }
}

impl fmt::Display for Dur {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let ms = self.as_millis();
        for (unit, size) in [
            ("d", 86_400_000),
            ("h", 3_600_000),
            ("m", 60_000),
            ("s", 1_000),
        ] {
            if ms != 0 && ms % size == 0 {
                return write!(f, "{}{unit}", ms / size);
            }
        }
        write!(f, "{ms}ms")
    }
}

impl<'de> Deserialize<'de> for Dur {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = String::deserialize(d)?;
        Dur::parse(&text).map_err(serde::de::Error::custom)
    }
}

impl Serialize for Dur {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

/// A configuration that could not be used, with where and why.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("{path}: {message}")]
    Invalid { path: String, message: String },
}

impl UpstreamConfig {
    /// Whether the built-in mock serves this upstream now.
    pub fn served_by_mock(&self) -> bool {
        self.mock
            || (self.mock_without_key
                && self
                    .api_key_env
                    .as_ref()
                    .is_none_or(|env| std::env::var(env).map(|v| v.is_empty()).unwrap_or(true)))
    }
}

impl Config {
    /// Reads, parses and validates a config file.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.display().to_string(),
            source,
        })?;
        let mut config = Config::parse(&text, &path.display().to_string())?;
        config.source = Some(path.to_owned());
        Ok(config)
    }

    /// Parses and validates config text; `origin` names the file in errors.
    pub fn parse(text: &str, origin: &str) -> Result<Config, ConfigError> {
        let invalid = |message: String| ConfigError::Invalid {
            path: origin.to_owned(),
            message,
        };
        let config: Config =
            toml::from_str(text).map_err(|e| invalid(e.to_string().trim_end().to_owned()))?;
        config.validate(text).map_err(invalid)?;
        Ok(config)
    }

    fn validate(&self, text: &str) -> Result<(), String> {
        if let Some(c) = &self.cluster {
            c.validate()?;
        }
        crate::events::config::validate(&self.webhooks, self.email.as_ref(), &self.alerts)?;
        let at = |needle: &str| match line_of(text, needle) {
            Some(line) => format!(" (line {line})"),
            None => String::new(),
        };
        if self.server.max_body_bytes == 0 {
            return Err(format!(
                "server.max_body_bytes must be at least 1{}",
                at("max_body_bytes")
            ));
        }
        if self.server.max_header_bytes < 1024 {
            return Err(format!(
                "server.max_header_bytes must be at least 1024{}",
                at("max_header_bytes")
            ));
        }
        if self.server.max_connections == 0 {
            return Err(format!(
                "server.max_connections must be at least 1{}",
                at("max_connections")
            ));
        }
        if self.runtime.workers > 1024 {
            return Err(format!(
                "runtime.workers must be at most 1024{}",
                at("workers")
            ));
        }
        if !(1..=10_000).contains(&self.storage.flush_ms) {
            return Err(format!(
                "storage.flush_ms must be between 1 and 10000{}",
                at("flush_ms")
            ));
        }
        if !(1..=100_000_000).contains(&self.storage.queue_capacity) {
            return Err(format!(
                "storage.queue_capacity must be between 1 and 100000000{}",
                at("queue_capacity")
            ));
        }
        if !(4..=65_536).contains(&self.storage.cache_mb) {
            return Err(format!(
                "storage.cache_mb must be between 4 and 65536{}",
                at("cache_mb")
            ));
        }
        if self.admin.token_env.is_empty() {
            return Err(format!(
                "admin.token_env must name an environment variable{}",
                at("token_env")
            ));
        }
        if self.proxy.max_attempts == 0 || self.proxy.max_attempts > 10 {
            return Err(format!(
                "proxy.max_attempts must be between 1 and 10{}",
                at("max_attempts")
            ));
        }
        if self.proxy.failure_threshold == 0 {
            return Err(format!(
                "proxy.failure_threshold must be at least 1{}",
                at("failure_threshold")
            ));
        }
        if self.keys.import_length == 0 || self.keys.import_length > 256 {
            return Err(format!(
                "keys.import_length must be between 1 and 256{}",
                at("import_length")
            ));
        }
        if self.upstreams.is_empty() {
            return Err("at least one [[upstreams]] entry is required".to_owned());
        }
        let mut names = std::collections::HashSet::new();
        for (i, up) in self.upstreams.iter().enumerate() {
            let here = at(&format!("\"{}\"", up.name));
            if up.name.is_empty() {
                return Err(format!("upstreams[{i}].name must not be empty"));
            }
            if !names.insert(up.name.as_str()) {
                return Err(format!(
                    "upstreams[{i}].name {:?} is used twice{here}",
                    up.name
                ));
            }
            if up.weight == 0 {
                return Err(format!("upstreams[{i}].weight must be at least 1{here}"));
            }
            match (&up.base_url, up.mock) {
                (Some(_), true) => {
                    return Err(format!(
                        "upstreams[{i}] ({}): give base_url or mock = true, not both{here}",
                        up.name
                    ));
                }
                (None, false) => {
                    return Err(format!(
                        "upstreams[{i}] ({}): base_url is required{here}",
                        up.name
                    ));
                }
                (Some(_), false) | (None, true) => {}
            }
            if let Some(env) = &up.api_key_env
                && env.is_empty()
            {
                return Err(format!(
                    "upstreams[{i}].api_key_env must not be empty{here}"
                ));
            }
        }
        for (name, model) in &self.models {
            let here =
                at(&format!("[models.\"{name}\"]")).to_string() + &at(&format!("[models.{name}]"));
            for (field, price) in [
                ("input", Some(model.input)),
                ("output", Some(model.output)),
                ("cached_input", model.cached_input),
                ("cache_write", model.cache_write),
                ("cache_write_1h", model.cache_write_1h),
                ("request", Some(model.request)),
            ] {
                if let Some(p) = price
                    && p.0 < 0
                {
                    return Err(format!(
                        "models.\"{name}\".{field} must not be negative{here}"
                    ));
                }
            }
            if model.max_output_tokens == 0 {
                return Err(format!(
                    "models.\"{name}\".max_output_tokens must be at least 1{here}"
                ));
            }
            if !self
                .upstreams
                .iter()
                .any(|u| u.models.iter().any(|p| p.is_match(name)))
            {
                return Err(format!(
                    "models.\"{name}\": no upstream serves this model (check the upstreams' `models` patterns){here}"
                ));
            }
        }
        if let Some(default) = &self.billing.default_price {
            if !self.models.contains_key(default) {
                return Err(format!(
                    "billing.default_price {default:?} is not a [models] entry{}",
                    at("default_price")
                ));
            }
            if self.billing.default_price_models.is_empty() {
                return Err(format!(
                    "billing.default_price needs billing.default_price_models: the patterns of the models it may price{}",
                    at("default_price")
                ));
            }
        }
        for (route, rule) in &self.routes {
            let route = route.as_str();
            if !route.starts_with("/v1/") {
                return Err(format!(
                    "routes.\"{route}\": a route must start with /v1/{}",
                    at(route)
                ));
            }
            for (field, price) in [
                ("request", Some(rule.request)),
                ("input", rule.input),
                ("output", rule.output),
            ] {
                if let Some(p) = price
                    && p.0 < 0
                {
                    return Err(format!(
                        "routes.\"{route}\".{field} must not be negative{}",
                        at(route)
                    ));
                }
            }
            match (rule.free, rule.priced()) {
                (true, true) => {
                    return Err(format!(
                        "routes.\"{route}\": free = true and a price contradict each other{}",
                        at(route)
                    ));
                }
                (false, false) => {
                    return Err(format!(
                        "routes.\"{route}\": give a price (request, input/output) or free = true{}",
                        at(route)
                    ));
                }
                _ => {}
            }
        }
        for (name, plan) in &self.plans {
            let here = at(&format!("[plans.{name}]"));
            for (field, amount) in [("limit", plan.limit), ("daily_fee", plan.daily_fee)] {
                if let Some(a) = amount
                    && a.0 < 0
                {
                    return Err(format!("plans.{name}.{field} must not be negative{here}"));
                }
            }
            for pattern in &plan.models {
                globset::Glob::new(pattern).map_err(|e| {
                    format!("plans.{name}.models: bad pattern {pattern:?}: {e}{here}")
                })?;
            }
            if plan.concurrency == Some(0) || plan.rpm == Some(0) || plan.tpm == Some(0) {
                return Err(format!(
                    "plans.{name}: rpm, tpm and concurrency must be at least 1 when set{here}"
                ));
            }
            for (field, amount) in [("price", plan.price), ("grant", plan.grant)] {
                if let Some(a) = amount
                    && a.0 < 0
                {
                    return Err(format!("plans.{name}.{field} must not be negative{here}"));
                }
            }
            let subscribable = plan.price.is_some()
                || plan.grant.is_some()
                || plan.rollover
                || plan.trial_days.is_some()
                || plan.grace.is_some()
                || plan.stripe_price.is_some();
            if subscribable && plan.interval.is_none() {
                return Err(format!(
                    "plans.{name}: price, grant, rollover, trial_days, grace and stripe_price need interval (day, week, month or year){here}"
                ));
            }
            if plan.trial_days.is_some_and(|d| d > 366) {
                return Err(format!("plans.{name}.trial_days must be at most 366{here}"));
            }
            if plan.stripe_price.as_deref().is_some_and(str::is_empty) {
                return Err(format!("plans.{name}.stripe_price must not be empty{here}"));
            }
        }
        if self.compat.newapi.quota_per_usd == 0 {
            return Err(format!(
                "compat.newapi.quota_per_usd must be at least 1{}",
                at("quota_per_usd")
            ));
        }
        if let Some(plan) = &self.compat.license.plan
            && !self.plans.contains_key(plan)
        {
            return Err(format!(
                "compat.license.plan names no [plans] entry: {plan:?}{}",
                at("[compat.license]")
            ));
        }
        if self.compat.license.credit_unit.0 <= 0 {
            return Err(format!(
                "compat.license.credit_unit must be more than 0 USD{}",
                at("credit_unit")
            ));
        }
        Ok(())
    }

    /// The resolved configuration as JSON, with every secret masked: what
    /// `tollgate check-config` prints.
    pub fn describe(&self) -> serde_json::Value {
        let mut v = serde_json::to_value(self).expect("config always serializes");
        if let Some(ups) = v["upstreams"].as_array_mut() {
            for (up, cfg) in ups.iter_mut().zip(&self.upstreams) {
                let state = match &cfg.api_key_env {
                    None => "none".to_owned(),
                    Some(env) => match std::env::var(env) {
                        Ok(k) if !k.is_empty() => format!("set ({})", mask(&k)),
                        _ => format!("{env} is not set"),
                    },
                };
                up["api_key"] = serde_json::Value::String(state);
            }
        }
        let admin = match std::env::var(&self.admin.token_env) {
            Ok(t) if !t.is_empty() => format!("from {} ({})", self.admin.token_env, mask(&t)),
            _ => format!(
                "{} is not set: generated on first start under storage.path",
                self.admin.token_env
            ),
        };
        v["admin"]["token"] = serde_json::Value::String(admin);
        v
    }
}

/// Shows a secret's first and last few characters only.
pub fn mask(secret: &str) -> String {
    let chars: Vec<char> = secret.chars().collect();
    if chars.len() <= 10 {
        return "…".to_owned();
    }
    let head: String = chars[..6].iter().collect();
    let tail: String = chars[chars.len() - 3..].iter().collect();
    format!("{head}…{tail}")
}

/// 1-based line of the first occurrence of `needle` in `text`.
fn line_of(text: &str, needle: &str) -> Option<usize> {
    let at = text.find(needle)?;
    Some(text[..at].matches('\n').count() + 1)
}

#[cfg(test)]
mod tests {
    use super::*;

    const MINIMAL: &str = r#"
[[upstreams]]
name = "mock"
mock = true

[models."demo-chat"]
input = "0.15"
output = "0.60"
"#;

    #[test]
    fn defaults_fill_what_is_missing() {
        let c = Config::parse(MINIMAL, "t.toml").unwrap();
        assert_eq!(c.server.max_body_bytes, 16 * 1024 * 1024);
        assert_eq!(c.runtime.mode, RuntimeMode::PerCore);
        assert_eq!(c.storage.flush_ms, 50);
        assert_eq!(c.models["demo-chat"].input, Pico(150_000_000_000));
        assert_eq!(c.upstreams[0].models[0].as_str(), "*");
        assert_eq!(c.billing.on_insufficient, OnInsufficient::Cap);
    }

    #[test]
    fn the_committed_config_is_valid() {
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/config.toml");
        let c = Config::load(Path::new(path)).unwrap();
        let trial = &c.plans["trial"];
        assert_eq!(trial.limit, Some(Pico::parse_usd("0.0001").unwrap()));
        assert_eq!(trial.max_requests, Some(50));
        assert_eq!(trial.expires_in, Some(Dur::secs(7 * 86_400)));
        assert!(trial.one_per_owner);
    }

    #[test]
    fn errors_name_the_key_and_line() {
        let e = Config::parse(
            &format!("{MINIMAL}\n[server]\nlisten = \"nowhere\"\n"),
            "t.toml",
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("listen") && e.contains("line 11"), "{e}");
        let e = Config::parse(
            &format!("{MINIMAL}\n[server]\nlisen = \"127.0.0.1:1\"\n"),
            "t.toml",
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("unknown field") && e.contains("lisen"), "{e}");
        let e = Config::parse(&MINIMAL.replace("\"0.15\"", "0.15"), "t.toml")
            .unwrap_err()
            .to_string();
        assert!(e.contains("decimal string") && e.contains("line 7"), "{e}");
        let e = Config::parse(
            &MINIMAL.replace("\"0.15\"", "\"0.0000000000001\""),
            "t.toml",
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("precision"), "{e}");
        let e = Config::parse(
            &format!("{MINIMAL}\n[proxy]\ncooldown = \"3 weeks\"\n"),
            "t.toml",
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("cooldown"), "{e}");
        let bad_model = MINIMAL.replace("mock = true", "mock = true\nmodels = [\"gpt-*\"]");
        let e = Config::parse(&bad_model, "t.toml").unwrap_err().to_string();
        assert!(
            e.contains("no upstream serves") && e.contains("line 7"),
            "{e}"
        );
        let e = Config::parse(&format!("{MINIMAL}\n[plans.x]\nlimit = \"-1\"\n"), "t.toml")
            .unwrap_err()
            .to_string();
        assert!(e.contains("plans.x.limit") && e.contains("negative"), "{e}");
        let e = Config::parse(
            &MINIMAL.replace("mock = true", "base_url = \"ftp://x\""),
            "t.toml",
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("http:// or https://"), "{e}");
    }

    #[test]
    fn durations() {
        assert_eq!(Dur::parse("500ms"), Ok(Dur(Duration::from_millis(500))));
        assert_eq!(Dur::parse("7d"), Ok(Dur::secs(7 * 86_400)));
        assert_eq!(Dur::secs(90).to_string(), "90s");
        assert_eq!(Dur::secs(7 * 86_400).to_string(), "7d");
        for bad in ["", "s", "10", "10y", "-1s", "1.5s", "99999999999d"] {
            assert!(Dur::parse(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn secrets_are_masked() {
        assert_eq!(mask("sk-abcdefghijklmnop"), "sk-abc…nop");
        assert_eq!(mask("short"), "…");
    }
}

/// `[payments]`: the providers Tollgate takes payment notifications from.
/// A provider without its table is off: its endpoints answer 404.
#[derive(Clone, Debug, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct PaymentsConfig {
    /// `[payments.stripe]`: card payments and subscriptions through Stripe.
    pub stripe: Option<StripeConfig>,
    /// `[payments.epay]`: the 易支付 protocol (Alipay, WeChat Pay resellers).
    pub epay: Option<EpayConfig>,
}

/// `[payments.stripe]`.
#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct StripeConfig {
    /// Env var holding the secret API key (`sk_…`), for creating checkouts.
    pub secret_key_env: String,
    /// Env var holding the webhook signing secret (`whsec_…`).
    pub webhook_secret_env: String,
    /// Stripe's API origin; tests point it at a local mock.
    #[serde(default = "default_stripe_api")]
    pub api_base: String,
    /// Where Stripe sends the payer after paying.
    #[serde(default)]
    pub success_url: Option<String>,
    /// Where Stripe sends the payer who gave up.
    #[serde(default)]
    pub cancel_url: Option<String>,
    /// The only currency accepted (lowercase ISO code, a two-decimal
    /// currency: amounts are read as cents and credited 1:1 as USD).
    #[serde(default = "default_currency")]
    pub currency: String,
}

fn default_stripe_api() -> String {
    "https://api.stripe.com".to_owned()
}

fn default_currency() -> String {
    "usd".to_owned()
}

/// `[payments.epay]`.
#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct EpayConfig {
    /// The merchant id the provider assigned; notifications must carry it.
    pub pid: String,
    /// Env var holding the merchant key (the md5 signing secret).
    pub key_env: String,
    /// The provider's `submit.php` URL the payer is sent to.
    pub submit_url: String,
    /// Our notify endpoint as the provider reaches it
    /// (`https://…/api/v1/payments/epay/notify`).
    pub notify_url: String,
    /// Where the payer lands after paying.
    #[serde(default)]
    pub return_url: Option<String>,
    /// Credit signed notifications of orders made by the operator's own
    /// shop (a JSON `param` naming the account's email), not by Tollgate.
    #[serde(default)]
    pub accept_external_orders: bool,
}

/// What money admission does (`billing.mode`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum BillingMode {
    /// Refuse what a key or account cannot pay (402).
    #[default]
    Enforce,
    /// Meter and record, never refuse for money.
    Observe,
    /// Meter nothing: keys and limits only.
    Off,
}

impl BillingMode {
    pub fn as_str(self) -> &'static str {
        match self {
            BillingMode::Enforce => "enforce",
            BillingMode::Observe => "observe",
            BillingMode::Off => "off",
        }
    }
}

/// `[compat]`: units of the compatible surfaces.
#[derive(Clone, Debug, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct CompatConfig {
    pub newapi: NewApiConfig,
    pub license: LicenseConfig,
}

/// `[compat.newapi]`
#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct NewApiConfig {
    /// new-api's quota units per USD (its `QuotaPerUnit`, 500,000), for the
    /// integer `quota` fields of the consumption API.
    pub quota_per_usd: u64,
}

impl Default for NewApiConfig {
    fn default() -> Self {
        NewApiConfig {
            quota_per_usd: 500_000,
        }
    }
}

/// `[compat.license]`
#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct LicenseConfig {
    /// USD one licence credit is worth (credits are the account's balance).
    pub credit_unit: Pico,
    /// Devices one licence key may be used from (`X-Device-Id`); 0 = any.
    pub max_devices: u32,
    /// Plan a generated licence key is made from (its `daily_fee`, say).
    pub plan: Option<String>,
}

impl Default for LicenseConfig {
    fn default() -> Self {
        LicenseConfig {
            credit_unit: Pico::usd(1),
            max_devices: 1,
            plan: None,
        }
    }
}
