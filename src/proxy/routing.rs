//! Where a request goes: the upstreams (each with its pooled client and
//! passive health), the models and what they cost, the `[routes]` rules,
//! and the weighted pick among healthy upstreams. Built once from the
//! config, whose globs, URLs and prices are already typed values.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicI64, AtomicU32, Ordering};
use std::time::Duration;

use bytes::Bytes;
use http::HeaderValue;
use http::header::{AUTHORIZATION, HeaderName};
use http_body_util::Full;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioTimer};

use crate::config::{Config, Pattern, UpstreamKind};
use crate::error::ApiError;
pub use crate::gate::Pricing;
use crate::meter::{Endpoint, Price};
use crate::money::Pico;

/// A model the gateway serves.
#[derive(Clone, Debug)]
pub struct ModelEntry {
    pub price: Price,
    /// Completion bound used for reservation.
    pub max_output_tokens: u64,
    /// Indexes into `Routing::upstreams` of the upstreams serving it.
    pub group: Arc<[usize]>,
}

/// Where one request goes and what it costs: decided in one place,
/// [`Routing::route`].
#[derive(Clone, Debug)]
pub struct Destination {
    /// The upstreams that may serve it (indexes into `Routing::upstreams`).
    pub group: Arc<[usize]>,
    pub pricing: Pricing,
    /// The model's completion bound (0 on routes that produce no tokens).
    pub max_output_tokens: u64,
}

/// One upstream and its passive health.
pub struct Upstream {
    pub name: String,
    /// `scheme://authority`, e.g. `https://api.openai.com`.
    pub origin: String,
    /// Path prefix replacing the client's `/v1`, e.g. `/v1` or `/api/v1`.
    pub base_path: String,
    /// This upstream's key as it takes it, from its env var:
    /// `Authorization: Bearer …`, or `x-api-key: …` for Anthropic.
    pub auth: Option<(HeaderName, HeaderValue)>,
    /// The API it speaks (how its key is sent, what its errors look like).
    pub kind: UpstreamKind,
    models: Vec<Pattern>,
    weight: u32,
    pub connect_timeout: Duration,
    pub first_byte_timeout: Duration,
    /// An upstream that sends nothing for this long is cut.
    pub stream_idle_timeout: Duration,
    /// Served by the built-in mock only because its key is missing
    /// (`mock_without_key`): its answers are never charged, so a missing
    /// key in production cannot bill customers for mock answers.
    pub demo: bool,
    /// Message roles renamed in bodies sent here (`role_map`).
    pub role_map: Vec<(String, String)>,
    /// TLS client settings (webpki roots plus the configured CA).
    tls: rustls::ClientConfig,
    /// Failures in a row.
    failures: AtomicU32,
    /// Skipped until this time (ms), after `failure_threshold` failures.
    down_until_ms: AtomicI64,
}

impl Upstream {
    fn serves(&self, model: &str) -> bool {
        self.models.iter().any(|p| p.is_match(model))
    }
}

/// Upstreams, models, prices and route rules, built once from the config.
pub struct Routing {
    pub upstreams: Vec<Upstream>,
    models: HashMap<String, ModelEntry>,
    /// Price applied to a model an upstream serves but `[models]` lacks,
    /// and the patterns of the models it may price.
    default_price: Option<(ModelEntry, Vec<Pattern>)>,
    /// `[routes]` rules: exact paths first, then patterns in order.
    routes: Vec<(Pattern, Pricing)>,
    /// Every upstream: the group of requests without a model.
    everyone: Arc<[usize]>,
    max_attempts: usize,
    failure_threshold: u32,
    cooldown_ms: i64,
    pool_idle: Duration,
}

impl Routing {
    /// `mock_urls` maps the name of each upstream served by the in-process
    /// mock to the base URL of the mock started for it.
    pub fn build(config: &Config, mock_urls: &HashMap<String, String>) -> Result<Routing, String> {
        let mut upstreams = Vec::new();
        for up in &config.upstreams {
            let mock = match mock_urls.get(&up.name) {
                Some(url) => Some(
                    crate::config::BaseUrl::parse(url)
                        .map_err(|e| format!("upstream {}: mock {e}", up.name))?,
                ),
                None => None,
            };
            let Some(base) = mock.as_ref().or(up.base_url.as_ref()) else {
                return Err(format!("upstream {}: no base URL", up.name));
            };
            let auth = match up.api_key_env.as_ref().filter(|_| mock.is_none()) {
                Some(env) => match std::env::var(env) {
                    Ok(k) if !k.is_empty() => {
                        let (name, value) = match up.kind {
                            UpstreamKind::Openai => (AUTHORIZATION, format!("Bearer {k}")),
                            UpstreamKind::Anthropic => (HeaderName::from_static("x-api-key"), k),
                        };
                        let mut value = HeaderValue::from_str(&value).map_err(|_| {
                            format!("upstream {}: {env} is not a valid header value", up.name)
                        })?;
                        value.set_sensitive(true);
                        Some((name, value))
                    }
                    _ => {
                        tracing::warn!(upstream = %up.name, env = %env, "upstream API key env var is not set; requests go without it");
                        None
                    }
                },
                None => None,
            };
            let mut roots = rustls::RootCertStore::empty();
            roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
            if let Some(ca) = &up.ca_file {
                use rustls_pki_types::pem::PemObject;
                let certs = rustls_pki_types::CertificateDer::pem_file_iter(ca)
                    .map_err(|e| format!("upstream {}: ca_file {}: {e}", up.name, ca.display()))?;
                for c in certs {
                    let c = c.map_err(|e| {
                        format!("upstream {}: ca_file {}: {e}", up.name, ca.display())
                    })?;
                    roots
                        .add(c)
                        .map_err(|e| format!("upstream {}: ca_file: {e}", up.name))?;
                }
            }
            let tls = rustls::ClientConfig::builder()
                .with_root_certificates(roots)
                .with_no_client_auth();
            upstreams.push(Upstream {
                name: up.name.clone(),
                origin: base.origin.clone(),
                base_path: base.path.clone(),
                auth,
                kind: up.kind,
                models: up.models.clone(),
                weight: up.weight,
                connect_timeout: up.connect_timeout.unwrap_or(config.proxy.connect_timeout).0,
                first_byte_timeout: up
                    .first_byte_timeout
                    .unwrap_or(config.proxy.first_byte_timeout)
                    .0,
                stream_idle_timeout: up
                    .stream_idle_timeout
                    .unwrap_or(config.proxy.stream_idle_timeout)
                    .0,
                demo: mock.is_some() && !up.mock,
                role_map: up.role_map.clone().into_iter().collect(),
                tls,
                failures: AtomicU32::new(0),
                down_until_ms: AtomicI64::new(0),
            });
        }
        let group_of = |model: &str| -> Arc<[usize]> {
            upstreams
                .iter()
                .enumerate()
                .filter(|(_, u)| u.serves(model))
                .map(|(i, _)| i)
                .collect()
        };
        let models: HashMap<String, ModelEntry> = config
            .models
            .iter()
            .map(|(name, m)| {
                let entry = ModelEntry {
                    price: Price {
                        input: m.input,
                        cached_input: m.cached_input,
                        cache_write: m.cache_write,
                        cache_write_1h: m.cache_write_1h,
                        output: m.output,
                        request: m.request,
                    },
                    max_output_tokens: m.max_output_tokens,
                    group: group_of(name),
                };
                (name.clone(), entry)
            })
            .collect();
        let default_price = config
            .billing
            .default_price
            .as_ref()
            .and_then(|d| models.get(d))
            .map(|entry| (entry.clone(), config.billing.default_price_models.clone()));
        let mut routes: Vec<(Pattern, Pricing)> = config
            .routes
            .iter()
            .map(|(pattern, rule)| {
                let pricing = if rule.free {
                    Pricing::Flat(Pico::ZERO)
                } else if rule.input.is_some() || rule.output.is_some() {
                    Pricing::Tokens(Price {
                        input: rule.input.unwrap_or(Pico::ZERO),
                        cached_input: None,
                        cache_write: None,
                        cache_write_1h: None,
                        output: rule.output.unwrap_or(Pico::ZERO),
                        request: rule.request,
                    })
                } else {
                    Pricing::Flat(rule.request)
                };
                (pattern.clone(), pricing)
            })
            .collect();
        // An exact rule wins over a pattern that also matches.
        routes.sort_by_key(|(p, _)| !p.is_exact());
        Ok(Routing {
            everyone: (0..upstreams.len()).collect(),
            upstreams,
            models,
            default_price,
            routes,
            max_attempts: config.proxy.max_attempts as usize,
            failure_threshold: config.proxy.failure_threshold,
            cooldown_ms: config.proxy.cooldown.as_millis() as i64,
            pool_idle: config.proxy.pool_idle_timeout.0,
        })
    }

    /// The model's entry, or the default price for a model an upstream
    /// serves and `default_price_models` names; `None` for an unknown model.
    pub fn model(&self, name: &str) -> Option<ModelEntry> {
        if let Some(m) = self.models.get(name) {
            return Some(m.clone());
        }
        let (d, allowed) = self.default_price.as_ref()?;
        if !allowed.iter().any(|p| p.is_match(name)) {
            return None;
        }
        let group: Arc<[usize]> = self
            .upstreams
            .iter()
            .enumerate()
            .filter(|(_, u)| u.serves(name))
            .map(|(i, _)| i)
            .collect();
        (!group.is_empty()).then(|| ModelEntry { group, ..d.clone() })
    }

    /// Where a request goes and how it is priced. Known routes are priced
    /// by their model (a model is required); any other route must be
    /// allowed by a `[routes]` rule, which gives its price. `models` holds
    /// the model asked for first, then any fallbacks: the request is priced
    /// at the dearest and may go to any upstream serving the first.
    pub fn route(
        &self,
        endpoint: Endpoint,
        path: &str,
        models: &[&str],
    ) -> Result<Destination, ApiError> {
        let rule = self
            .routes
            .iter()
            .find(|(p, _)| p.is_match(path))
            .map(|(_, pricing)| *pricing);
        let priced_by_model = endpoint.priced_by_model();
        let Some(&first) = models.first() else {
            if priced_by_model {
                return Err(
                    ApiError::bad_request("missing_model", "The request names no model.")
                        .with_param("model"),
                );
            }
            return match rule {
                Some(pricing) => Ok(Destination {
                    group: self.everyone.clone(),
                    pricing,
                    max_output_tokens: 0,
                }),
                None => Err(ApiError::route_not_allowed(path)),
            };
        };
        if !priced_by_model {
            // A model on a route without a known API (images, audio…): the
            // route's rule decides whether it is allowed and what it costs;
            // it goes to the upstreams serving that model.
            let Some(pricing) = rule else {
                return Err(ApiError::route_not_allowed(path));
            };
            let serving: Arc<[usize]> = self
                .upstreams
                .iter()
                .enumerate()
                .filter(|(_, u)| u.serves(first))
                .map(|(i, _)| i)
                .collect();
            if serving.is_empty() {
                return Err(ApiError::model_not_found(first));
            }
            return Ok(Destination {
                group: serving,
                pricing,
                max_output_tokens: 0,
            });
        }
        let mut dest: Option<Destination> = None;
        for m in models {
            let entry = self.model(m).ok_or_else(|| ApiError::model_not_found(m))?;
            if entry.group.is_empty() {
                return Err(ApiError::model_not_found(m));
            }
            dest = Some(match dest {
                None => Destination {
                    group: entry.group.clone(),
                    pricing: Pricing::Tokens(entry.price),
                    max_output_tokens: entry.max_output_tokens,
                },
                // Fallbacks: priced at the dearest, bounded by the longest.
                Some(d) => Destination {
                    group: d.group,
                    pricing: dearer(d.pricing, Pricing::Tokens(entry.price)),
                    max_output_tokens: d.max_output_tokens.max(entry.max_output_tokens),
                },
            });
        }
        let mut dest = dest.expect("models is not empty");
        // A `[routes]` rule on a known route prices every model on it, over
        // the model's own price (seed 004: 15 picoUSD a token on chat); the
        // model still picks the upstreams and bounds the completion.
        if let Some(pricing) = rule {
            dest.pricing = pricing;
        }
        Ok(dest)
    }

    /// Names of the configured models, sorted.
    pub fn model_names(&self) -> Vec<&str> {
        let mut v: Vec<&str> = self.models.keys().map(String::as_str).collect();
        v.sort_unstable();
        v
    }

    /// Upstreams to try, in order: a weighted random pick among the healthy
    /// ones first, then the others; unhealthy ones only when nothing else is
    /// left. At most `max_attempts`.
    pub fn candidates(&self, group: &[usize], now_ms: i64) -> Vec<usize> {
        let mut healthy: Vec<usize> = Vec::with_capacity(group.len());
        let mut down: Vec<usize> = Vec::new();
        for &i in group {
            if self.upstreams[i].down_until_ms.load(Ordering::Relaxed) > now_ms {
                down.push(i);
            } else {
                healthy.push(i);
            }
        }
        let mut order = Vec::with_capacity(group.len());
        while !healthy.is_empty() {
            let total: u64 = healthy
                .iter()
                .map(|&i| self.upstreams[i].weight as u64)
                .sum();
            let mut pick = fast_random() % total.max(1);
            let mut chosen = 0;
            for (pos, &i) in healthy.iter().enumerate() {
                let w = self.upstreams[i].weight as u64;
                if pick < w {
                    chosen = pos;
                    break;
                }
                pick -= w;
            }
            order.push(healthy.swap_remove(chosen));
        }
        order.extend(down);
        order.truncate(self.max_attempts);
        order
    }

    pub fn failed(&self, i: usize, now_ms: i64) {
        let u = &self.upstreams[i];
        let n = u.failures.fetch_add(1, Ordering::AcqRel) + 1;
        if n >= self.failure_threshold {
            u.down_until_ms
                .store(now_ms + self.cooldown_ms, Ordering::Release);
        }
    }

    pub fn succeeded(&self, i: usize) {
        let u = &self.upstreams[i];
        if u.failures.load(Ordering::Relaxed) != 0 {
            u.failures.store(0, Ordering::Release);
            u.down_until_ms.store(0, Ordering::Release);
        }
    }

    /// Upstream names, in index order (metrics labels).
    pub fn upstream_names(&self) -> Vec<String> {
        self.upstreams.iter().map(|u| u.name.clone()).collect()
    }

    /// Where a free request about `model` goes (Anthropic's count_tokens):
    /// the upstreams of a model the gateway serves, priced at nothing.
    pub fn free_for_model(&self, model: &str) -> Result<Destination, ApiError> {
        let entry = self
            .model(model)
            .filter(|e| !e.group.is_empty())
            .ok_or_else(|| ApiError::model_not_found(model))?;
        Ok(Destination {
            group: entry.group,
            pricing: Pricing::Flat(Pico::ZERO),
            max_output_tokens: 0,
        })
    }
}

/// The dearer of two prices: a fallback list is reserved and charged at
/// the most expensive model it may end up on.
fn dearer(a: Pricing, b: Pricing) -> Pricing {
    match (a, b) {
        (Pricing::Tokens(x), Pricing::Tokens(y)) => Pricing::Tokens(Price {
            input: x.input.max(y.input),
            cached_input: match (x.cached_input, y.cached_input) {
                (None, None) => None,
                (p, q) => Some(p.unwrap_or(x.input).max(q.unwrap_or(y.input))),
            },
            cache_write: match (x.cache_write, y.cache_write) {
                (None, None) => None,
                (p, q) => Some(p.unwrap_or(x.input).max(q.unwrap_or(y.input))),
            },
            cache_write_1h: match (x.cache_write_1h, y.cache_write_1h) {
                (None, None) => None,
                (p, q) => Some(
                    p.or(x.cache_write)
                        .unwrap_or(x.input)
                        .max(q.or(y.cache_write).unwrap_or(y.input)),
                ),
            },
            output: x.output.max(y.output),
            request: x.request.max(y.request),
        }),
        (a, _) => a,
    }
}

type UpstreamClient = Client<hyper_rustls::HttpsConnector<HttpConnector>, Full<Bytes>>;

/// One worker's view of the upstreams: the shared routing and its own
/// pooled clients (one per upstream: each has its own timeouts and trusted
/// roots). In per-core mode each worker thread owns one, so a request and
/// its upstream call stay on one thread.
pub struct Proxy {
    pub routing: Arc<Routing>,
    pub clients: Vec<Link>,
}

/// How a worker reaches one upstream.
pub enum Link {
    /// `http://`: the worker's own HTTP/1 connections.
    Plain {
        pool: super::h1pool::H1Pool,
        /// `Host` of every request.
        host: HeaderValue,
    },
    /// `https://`: hyper-util's pooled client (HTTP/2 by ALPN).
    Tls(Box<UpstreamClient>),
}

impl Proxy {
    pub fn new(routing: Arc<Routing>) -> Proxy {
        let clients = routing
            .upstreams
            .iter()
            .map(|u| {
                if let Some(authority) = u.origin.strip_prefix("http://")
                    && let Ok(host) = HeaderValue::from_str(authority)
                {
                    let addr = if authority.rsplit_once(':').is_some_and(|(_, p)| {
                        !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit())
                    }) {
                        authority.to_owned()
                    } else {
                        format!("{authority}:80")
                    };
                    return Link::Plain {
                        pool: super::h1pool::H1Pool::new(
                            addr,
                            u.connect_timeout,
                            routing.pool_idle,
                        ),
                        host,
                    };
                }
                let mut http = HttpConnector::new();
                http.enforce_http(false);
                http.set_nodelay(true);
                http.set_connect_timeout(Some(u.connect_timeout));
                let https = hyper_rustls::HttpsConnectorBuilder::new()
                    .with_tls_config(u.tls.clone())
                    .https_or_http()
                    .enable_http1()
                    .enable_http2()
                    .wrap_connector(http);
                Link::Tls(Box::new(
                    Client::builder(TokioExecutor::new())
                        .timer(TokioTimer::new())
                        .pool_timer(TokioTimer::new())
                        .pool_idle_timeout(routing.pool_idle)
                        .pool_max_idle_per_host(1024)
                        .build(https),
                ))
            })
            .collect();
        Proxy { routing, clients }
    }
}

/// A cheap per-thread xorshift for weighted picks and request ids (not for
/// secrets: keys come from the OS CSPRNG).
pub fn fast_random() -> u64 {
    use std::cell::Cell;
    thread_local! {
        static STATE: Cell<u64> = Cell::new({
            let mut seed = [0u8; 8];
            let _ = getrandom::fill(&mut seed);
            u64::from_le_bytes(seed) | 1
        });
    }
    STATE.with(|s| {
        let mut x = s.get();
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        s.set(x);
        x.wrapping_mul(0x2545_F491_4F6C_DD1D)
    })
}
