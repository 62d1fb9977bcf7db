//! The proxy path: authenticate, admit, limit, reserve, route, forward,
//! stream back through a meter, settle.
//!
//! Each phase is a plain step that returns early with an `ApiError`. Once a
//! request is admitted, everything it holds (concurrency permit, request
//! count, reservation) lives in a [`Settlement`], which runs exactly once:
//! at the end of the stream, on an upstream error, or when the response body
//! is dropped because the client went away. It is the single place that
//! runs on success and on every failure.

use std::collections::{HashMap, VecDeque};
use std::net::IpAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicI64, AtomicU32, Ordering};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use globset::{Glob, GlobSet, GlobSetBuilder};
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Method, Request, Response, StatusCode, Uri};
use http_body::{Body as HttpBody, Frame, SizeHint};
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioTimer};

use crate::app::App;
use crate::config::{Config, OnClientDisconnect, OnInsufficient};
use crate::error::ApiError;
use crate::gate::{Ask, Permit, Reservation};
use crate::meter::{Framing, Meter, Price, RequestInfo, Rewrite, Route, Usage};
use crate::money::Pico;
use crate::store::UsageRecord;
use crate::{Body, BoxError};

/// How a request is priced.
#[derive(Clone, Copy, Debug)]
pub enum Pricing {
    /// By tokens (and per request) at the model's price.
    Tokens(Price),
    /// A flat amount per request (a `[routes]` rule; 0 = free).
    Flat(Pico),
}

/// A model the gateway serves.
#[derive(Clone, Debug)]
pub struct ModelEntry {
    pub price: Price,
    /// Completion bound used for reservation.
    pub max_output_tokens: u64,
    /// Indexes into `Routing::upstreams` of the upstreams serving it.
    pub group: Arc<[usize]>,
}

/// One upstream and its passive health.
pub struct Upstream {
    pub name: String,
    /// `scheme://authority`, e.g. `https://api.openai.com`.
    origin: String,
    /// Path prefix replacing the client's `/v1`, e.g. `/v1` or `/api/v1`.
    base_path: String,
    /// `Bearer …` for this upstream, from its env var.
    auth: Option<HeaderValue>,
    models: GlobSet,
    weight: u32,
    connect_timeout: Duration,
    first_byte_timeout: Duration,
    /// TLS client settings (webpki roots plus the configured CA).
    tls: rustls::ClientConfig,
    /// Failures in a row.
    failures: AtomicU32,
    /// Skipped until this time (ms), after `failure_threshold` failures.
    down_until_ms: AtomicI64,
}

/// Upstreams, models, prices and route rules, built once from the config.
pub struct Routing {
    pub upstreams: Vec<Upstream>,
    models: HashMap<String, ModelEntry>,
    /// Price applied to a model an upstream serves but `[models]` lacks.
    default_price: Option<ModelEntry>,
    routes: HashMap<String, Pico>,
    max_attempts: usize,
    failure_threshold: u32,
    cooldown_ms: i64,
    pool_idle: Duration,
}

impl Routing {
    /// `mock_urls` maps the name of each `mock = true` upstream to the base
    /// URL of the mock started for it.
    pub fn build(config: &Config, mock_urls: &HashMap<String, String>) -> Result<Routing, String> {
        let mut upstreams = Vec::new();
        for up in &config.upstreams {
            let served_by_mock = mock_urls.get(&up.name);
            let base = match (served_by_mock, &up.base_url) {
                (Some(url), _) | (None, Some(url)) => url.clone(),
                (None, None) => return Err(format!("upstream {}: no base URL", up.name)),
            };
            let uri: Uri = base
                .parse()
                .map_err(|_| format!("upstream {}: bad base_url", up.name))?;
            let scheme = uri.scheme_str().unwrap_or("http");
            let authority = uri.authority().map(|a| a.as_str()).unwrap_or("");
            let auth = match up.api_key_env.as_ref().filter(|_| served_by_mock.is_none()) {
                Some(env) => match std::env::var(env) {
                    Ok(k) if !k.is_empty() => {
                        Some(HeaderValue::from_str(&format!("Bearer {k}")).map_err(|_| {
                            format!("upstream {}: {env} is not a valid header value", up.name)
                        })?)
                    }
                    _ => {
                        tracing::warn!(upstream = %up.name, env = %env, "upstream API key env var is not set; requests go without it");
                        None
                    }
                },
                None => None,
            };
            let mut set = GlobSetBuilder::new();
            for m in &up.models {
                set.add(Glob::new(m).map_err(|e| format!("upstream {}: {e}", up.name))?);
            }
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
                origin: format!("{scheme}://{authority}"),
                base_path: uri.path().trim_end_matches('/').to_owned(),
                auth,
                models: set
                    .build()
                    .map_err(|e| format!("upstream {}: {e}", up.name))?,
                weight: up.weight,
                connect_timeout: up.connect_timeout.unwrap_or(config.proxy.connect_timeout).0,
                first_byte_timeout: up
                    .first_byte_timeout
                    .unwrap_or(config.proxy.first_byte_timeout)
                    .0,
                tls,
                failures: AtomicU32::new(0),
                down_until_ms: AtomicI64::new(0),
            });
        }
        let group_of = |model: &str| -> Arc<[usize]> {
            upstreams
                .iter()
                .enumerate()
                .filter(|(_, u)| u.models.is_match(model))
                .map(|(i, _)| i)
                .collect()
        };
        let price_of = |m: &crate::config::ModelConfig| Price {
            input: m.input,
            cached_input: m.cached_input,
            output: m.output,
            request: m.request,
        };
        let models: HashMap<String, ModelEntry> = config
            .models
            .iter()
            .map(|(name, m)| {
                let entry = ModelEntry {
                    price: price_of(m),
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
            .cloned();
        Ok(Routing {
            upstreams,
            models,
            default_price,
            routes: config
                .routes
                .iter()
                .map(|(r, rule)| (r.clone(), if rule.free { Pico::ZERO } else { rule.request }))
                .collect(),
            max_attempts: config.proxy.max_attempts as usize,
            failure_threshold: config.proxy.failure_threshold,
            cooldown_ms: config.proxy.cooldown.as_millis() as i64,
            pool_idle: config.proxy.pool_idle_timeout.0,
        })
    }

    /// The model's entry, or the default price for a model an upstream
    /// serves; `None` for an unknown model.
    pub fn model(&self, name: &str) -> Option<ModelEntry> {
        if let Some(m) = self.models.get(name) {
            return Some(m.clone());
        }
        let d = self.default_price.as_ref()?;
        let group: Arc<[usize]> = self
            .upstreams
            .iter()
            .enumerate()
            .filter(|(_, u)| u.models.is_match(name))
            .map(|(i, _)| i)
            .collect();
        (!group.is_empty()).then(|| ModelEntry { group, ..d.clone() })
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
    fn candidates(&self, group: &[usize], now_ms: i64) -> Vec<usize> {
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

    fn failed(&self, i: usize, now_ms: i64) {
        let u = &self.upstreams[i];
        let n = u.failures.fetch_add(1, Ordering::AcqRel) + 1;
        if n >= self.failure_threshold {
            u.down_until_ms
                .store(now_ms + self.cooldown_ms, Ordering::Release);
        }
    }

    fn succeeded(&self, i: usize) {
        let u = &self.upstreams[i];
        if u.failures.load(Ordering::Relaxed) != 0 {
            u.failures.store(0, Ordering::Release);
            u.down_until_ms.store(0, Ordering::Release);
        }
    }
}

type UpstreamClient = Client<hyper_rustls::HttpsConnector<HttpConnector>, Full<Bytes>>;

/// One worker's pooled upstream clients (one per upstream: each has its own
/// timeouts and trusted roots). In per-core mode each worker thread owns
/// one, so a request and its upstream call stay on one thread.
pub struct Pool {
    clients: Vec<UpstreamClient>,
}

impl Pool {
    pub fn new(routing: &Routing) -> Pool {
        let clients = routing
            .upstreams
            .iter()
            .map(|u| {
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
                Client::builder(TokioExecutor::new())
                    .timer(TokioTimer::new())
                    .pool_timer(TokioTimer::new())
                    .pool_idle_timeout(routing.pool_idle)
                    .pool_max_idle_per_host(1024)
                    .build(https)
            })
            .collect();
        Pool { clients }
    }
}

/// Headers that describe one hop, never forwarded.
const HOP_BY_HOP: [HeaderName; 8] = [
    header::CONNECTION,
    HeaderName::from_static("keep-alive"),
    header::PROXY_AUTHENTICATE,
    header::PROXY_AUTHORIZATION,
    header::TE,
    header::TRAILER,
    header::TRANSFER_ENCODING,
    header::UPGRADE,
];

/// Client headers never sent upstream: the client's key in every form, and
/// what the gateway sets itself. `accept-encoding` goes too: the meter must
/// read the upstream's bytes uncompressed.
const CLIENT_ONLY: [HeaderName; 7] = [
    header::HOST,
    header::AUTHORIZATION,
    HeaderName::from_static("x-api-key"),
    HeaderName::from_static("api-key"),
    header::CONTENT_LENGTH,
    header::ACCEPT_ENCODING,
    HeaderName::from_static("x-request-id"),
];

pub static X_REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");

/// Proxies one `/v1/*` request.
pub async fn handle(
    app: &Arc<App>,
    pool: &Pool,
    req: Request<Incoming>,
    client_ip: IpAddr,
    request_id: &HeaderValue,
) -> Response<Body> {
    let started = Instant::now();
    let route = Route::from_path(req.uri().path());
    match proxy(app, pool, req, client_ip, request_id, route, started).await {
        Ok(res) => res,
        Err(e) => {
            app.metrics.rejected(&e);
            app.metrics
                .answered(route, e.status.as_u16(), started.elapsed(), None);
            e.into_response()
        }
    }
}

async fn proxy(
    app: &Arc<App>,
    pool: &Pool,
    req: Request<Incoming>,
    client_ip: IpAddr,
    request_id: &HeaderValue,
    route: Route,
    started: Instant,
) -> Result<Response<Body>, ApiError> {
    // 1 authenticate (memory; sled only on a cache miss)
    let key = app.gate.authenticate(req.headers(), client_ip)?;
    let now_ms = app.clock.now_ms();
    if req.uri().path() == "/v1/models" && req.method() == Method::GET {
        // A disabled or expired key may not list models either.
        let device = req
            .headers()
            .get("x-device-id")
            .and_then(|v| v.to_str().ok());
        let policy = app.gate.admit(
            &key,
            &Ask {
                now_ms,
                model: None,
                client_ip,
                device,
            },
        )?;
        return Ok(list_models(app, &policy));
    }
    let (parts, body) = req.into_parts();
    let body = read_body(body, &parts.headers, app.config.server.max_body_bytes).await?;
    // Other routes may carry multipart (audio uploads): only JSON is read.
    let json_body = parts
        .headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_none_or(|ct| {
            ct.trim_start()
                .to_ascii_lowercase()
                .starts_with("application/json")
        });
    let info = if route == Route::Other && (body.is_empty() || !json_body) {
        RequestInfo::default()
    } else {
        crate::meter::inspect(route, &body)?
    };
    // Which upstreams and which price.
    let route_price = app.routing.routes.get(parts.uri.path()).copied();
    let (entry, model) = match info.model.as_deref() {
        Some(m) => match app.routing.model(m) {
            Some(e) => (Some(e), Some(m)),
            None => return Err(ApiError::model_not_found(m)),
        },
        None => (None, None),
    };
    let group: Arc<[usize]> = match &entry {
        Some(e) => e.group.clone(),
        None => (0..app.routing.upstreams.len()).collect(),
    };
    // 2 admit
    let device = parts
        .headers
        .get("x-device-id")
        .and_then(|v| v.to_str().ok());
    let policy = app.gate.admit(
        &key,
        &Ask {
            now_ms,
            model,
            client_ip,
            device,
        },
    )?;
    // 3 limit
    let permit = app.gate.limit(&key, &policy, now_ms)?;
    // 4 reserve
    let pricing = match (route_price, &entry) {
        (Some(flat), _) => Pricing::Flat(flat),
        (None, Some(e)) => Pricing::Tokens(e.price),
        (None, None) => Pricing::Flat(Pico::ZERO),
    };
    let prompt_bound = info.prompt_token_bound();
    let produces_tokens = matches!(route, Route::Chat | Route::Completions | Route::Responses);
    let model_max = entry.as_ref().map(|e| e.max_output_tokens).unwrap_or(0);
    let completion_bound = if produces_tokens {
        info.max_tokens.unwrap_or(model_max).min(model_max)
    } else {
        0
    };
    let cap = app.config.billing.on_insufficient == OnInsufficient::Cap && produces_tokens;
    // `n` answers of up to `completion_bound` tokens each.
    let choices = u64::from(info.choices.max(1));
    let reserved = match pricing {
        Pricing::Tokens(price) => app.gate.reserve(
            &key,
            &policy,
            completion_bound,
            cap,
            |c| price.upper_bound(prompt_bound, c.saturating_mul(choices)),
            |budget| price.affordable_completion(budget, prompt_bound) / choices,
        )?,
        Pricing::Flat(flat) => app.gate.reserve(&key, &policy, 0, false, |_| flat, |_| 0)?,
    };
    if let Some(fee) = reserved.daily_fee {
        persist_daily_fee(app, key.hash, fee);
    }
    let completion_bound = reserved.capped_max_tokens.unwrap_or(completion_bound);
    // The body sent upstream: usage injected for streams, max_tokens set
    // when the client sent none, asked for more than the model's bound, or
    // more than the key can pay for.
    let inject_usage =
        info.stream && matches!(route, Route::Chat | Route::Completions) && !info.include_usage;
    let rewrite = Rewrite {
        include_usage: inject_usage,
        max_tokens: (produces_tokens && info.max_tokens != Some(completion_bound))
            .then_some(completion_bound),
    };
    let upstream_body = crate::meter::rewrite(route, &body, &rewrite)?;
    // From here the request is recorded whatever happens: its count stays.
    let mut permit = permit;
    permit.keep_count();
    app.metrics.in_flight.fetch_add(1, Ordering::Relaxed);
    let mut settlement = Settlement {
        app: app.clone(),
        permit,
        reservation: Some(reserved.reservation),
        pricing,
        prompt_bound,
        completion_bound: completion_bound.saturating_mul(choices),
        route,
        model: info.model.clone().unwrap_or_default(),
        upstream: usize::MAX,
        stream: info.stream,
        status: 0,
        started,
        ttfb: None,
        request_id: request_id.clone(),
        client_ip,
        answered: false,
        done: false,
    };
    // 5–6 route and forward, failing over while nothing reached the client.
    let (upstream, res) = match forward(app, pool, &parts, upstream_body, &group, request_id).await
    {
        Ok(answer) => answer,
        Err(e) => {
            // Recorded with the status the client gets (502 or 504).
            settlement.status = e.status.as_u16();
            return Err(e);
        }
    };
    settlement.upstream = upstream;
    settlement.status = res.status().as_u16();
    settlement.answered = true;
    // 7 stream back through the meter.
    let (mut head, incoming) = res.into_parts();
    strip_hop_by_hop(&mut head.headers);
    let framing = Framing::from_content_type(
        head.headers
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok()),
    );
    if inject_usage {
        // The withheld usage event changes the length.
        head.headers.remove(header::CONTENT_LENGTH);
    }
    head.headers
        .insert(X_REQUEST_ID.clone(), request_id.clone());
    settlement.permit.rate.write_headers(&mut head.headers);
    let metered = MeteredBody {
        inner: Some(incoming),
        meter: Meter::new(route, framing, inject_usage),
        withholds: inject_usage,
        settlement: Some(settlement),
        finished: false,
        ready: VecDeque::new(),
        yields: 0,
        draining: false,
        tail: None,
    };
    Ok(Response::from_parts(head, BodyExt::boxed_unsync(metered)))
}

fn list_models(app: &App, policy: &crate::gate::Policy) -> Response<Body> {
    let data: Vec<serde_json::Value> = app
        .routing
        .model_names()
        .into_iter()
        .filter(|m| policy.allows_model(m))
        .map(|m| serde_json::json!({"id": m, "object": "model", "created": 0, "owned_by": "tollgate"}))
        .collect();
    json_response(
        StatusCode::OK,
        &serde_json::json!({"object": "list", "data": data}),
    )
}

pub fn json_response(status: StatusCode, v: &serde_json::Value) -> Response<Body> {
    let mut res = Response::new(crate::full_body(
        serde_json::to_vec(v).expect("a Value always serializes"),
    ));
    *res.status_mut() = status;
    res.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    res
}

/// Reads a request body up to `max` bytes (413 past it, refused early when
/// `content-length` already says so).
pub async fn read_body(body: Incoming, headers: &HeaderMap, max: usize) -> Result<Bytes, ApiError> {
    if let Some(len) = headers.get(header::CONTENT_LENGTH) {
        let len: u64 = len
            .to_str()
            .ok()
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| {
                ApiError::bad_request("invalid_header", "Content-Length is not a number.")
            })?;
        if len > max as u64 {
            return Err(ApiError::body_too_large(max));
        }
    }
    match Limited::new(body, max).collect().await {
        Ok(c) => Ok(c.to_bytes()),
        Err(e) if e.is::<http_body_util::LengthLimitError>() => Err(ApiError::body_too_large(max)),
        Err(e) => Err(ApiError::bad_request(
            "body_read_failed",
            format!("Could not read the request body: {e}"),
        )),
    }
}

fn strip_hop_by_hop(h: &mut HeaderMap) {
    if let Some(conn) = h
        .get(header::CONNECTION)
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned)
    {
        for name in conn.split(',') {
            if let Ok(n) = HeaderName::from_bytes(name.trim().as_bytes()) {
                h.remove(n);
            }
        }
    }
    for n in &HOP_BY_HOP {
        h.remove(n);
    }
}

/// Sends the request to the candidates in turn. Fails over on connect
/// errors, timeouts, 5xx and 429 — only before anything reached the client,
/// which is always the case here: the response head is not sent yet.
async fn forward(
    app: &App,
    pool: &Pool,
    parts: &http::request::Parts,
    body: Bytes,
    group: &[usize],
    request_id: &HeaderValue,
) -> Result<(usize, Response<Incoming>), ApiError> {
    let routing = &app.routing;
    let now = app.clock.now_ms();
    let order = routing.candidates(group, now);
    if order.is_empty() {
        return Err(ApiError::upstream(
            StatusCode::BAD_GATEWAY,
            "No upstream serves this request.",
        ));
    }
    let suffix = parts
        .uri
        .path_and_query()
        .map(|pq| pq.as_str())
        .unwrap_or("/")
        .strip_prefix("/v1")
        .unwrap_or("");
    let mut headers = parts.headers.clone();
    strip_hop_by_hop(&mut headers);
    for n in &CLIENT_ONLY {
        headers.remove(n);
    }
    headers.insert(X_REQUEST_ID.clone(), request_id.clone());
    let mut last_err = None;
    for (attempt, &i) in order.iter().enumerate() {
        let up = &routing.upstreams[i];
        let uri = format!("{}{}{}", up.origin, up.base_path, suffix);
        let mut req = Request::new(Full::new(body.clone()));
        *req.method_mut() = parts.method.clone();
        *req.uri_mut() = uri.parse().map_err(|_| {
            ApiError::bad_request("invalid_path", "The request path cannot be forwarded.")
        })?;
        *req.headers_mut() = headers.clone();
        if let Some(auth) = &up.auth {
            req.headers_mut()
                .insert(header::AUTHORIZATION, auth.clone());
        }
        let last = attempt + 1 == order.len();
        let outcome =
            tokio::time::timeout(up.first_byte_timeout, pool.clients[i].request(req)).await;
        let err = match outcome {
            Ok(Ok(res)) => {
                let s = res.status();
                if (s.is_server_error() || s == StatusCode::TOO_MANY_REQUESTS) && !last {
                    routing.failed(i, app.clock.now_ms());
                    app.metrics.upstream_failed(i, true);
                    tracing::warn!(upstream = %up.name, status = s.as_u16(), "upstream failed; trying the next one");
                    continue;
                }
                if s.is_server_error() {
                    routing.failed(i, app.clock.now_ms());
                    app.metrics.upstream_failed(i, false);
                } else {
                    routing.succeeded(i);
                }
                return Ok((i, res));
            }
            Ok(Err(e)) => {
                let connect = e.is_connect();
                tracing::warn!(upstream = %up.name, error = %e, "upstream request failed");
                ApiError::upstream(
                    StatusCode::BAD_GATEWAY,
                    if connect {
                        format!("Upstream {} could not be reached.", up.name)
                    } else {
                        format!("Upstream {} failed before answering.", up.name)
                    },
                )
            }
            Err(_) => {
                tracing::warn!(upstream = %up.name, "upstream timed out before answering");
                ApiError::upstream(
                    StatusCode::GATEWAY_TIMEOUT,
                    format!("Upstream {} did not answer in time.", up.name),
                )
            }
        };
        routing.failed(i, app.clock.now_ms());
        app.metrics.upstream_failed(i, !last);
        last_err = Some(err);
    }
    Err(last_err
        .unwrap_or_else(|| ApiError::upstream(StatusCode::BAD_GATEWAY, "No upstream answered.")))
}

fn persist_daily_fee(app: &Arc<App>, hash: crate::store::KeyHash, fee: Pico) {
    let store = app.store.clone();
    let at_ms = app.clock.now_ms();
    tokio::spawn(async move {
        let op = crate::store::CreditOp {
            kind: crate::store::LedgerKind::DailyFee,
            amount: fee,
            reason: "daily fee".to_owned(),
            idempotency_key: Some(format!(
                "daily-fee-{}",
                at_ms.div_euclid(crate::clock::DAY_MS)
            )),
            at_ms,
        };
        if let Err(e) = store.credit(hash, op).await {
            tracing::error!(error = %e, "could not record a daily fee");
        }
    });
}

/// Everything an admitted request holds until it is settled. Settling runs
/// exactly once: `finish` sets `done`, and `Drop` settles whatever has not
/// been (client gone, panic, an error path that returned early).
struct Settlement {
    app: Arc<App>,
    /// Concurrency slot, released when the settlement is dropped.
    permit: Permit,
    reservation: Option<Reservation>,
    pricing: Pricing,
    prompt_bound: u64,
    completion_bound: u64,
    route: Route,
    model: String,
    /// Index of the upstream that answered (`usize::MAX`: none).
    upstream: usize,
    stream: bool,
    status: u16,
    started: Instant,
    ttfb: Option<Duration>,
    request_id: HeaderValue,
    client_ip: IpAddr,
    /// An upstream answered (headers received).
    answered: bool,
    done: bool,
}

impl Settlement {
    /// Charges the actual cost (or a stated estimate) and records the
    /// request. `usage` is what the upstream reported; `delivered` the
    /// completion tokens estimated from what reached the client.
    fn finish(&mut self, usage: Option<Usage>, delivered: u64) {
        if self.done {
            return;
        }
        self.done = true;
        let ok = (200..300).contains(&self.status);
        let (usage, estimated) = match usage {
            Some(u) => (u, false),
            // Never free when the upstream did work, never billed for what
            // did not happen: the prompt bound plus what was delivered.
            None if self.answered && ok => (
                Usage {
                    prompt_tokens: self.prompt_bound,
                    completion_tokens: delivered.min(self.completion_bound),
                    ..Usage::default()
                },
                true,
            ),
            None => (Usage::default(), false),
        };
        let cost = if !self.answered {
            Pico::ZERO
        } else {
            match self.pricing {
                Pricing::Tokens(p) if ok || usage != Usage::default() => p.cost(&usage),
                Pricing::Tokens(_) => Pico::ZERO,
                Pricing::Flat(f) if ok => f,
                Pricing::Flat(_) => Pico::ZERO,
            }
        };
        let reserved = self
            .reservation
            .as_ref()
            .map(|r| r.amount)
            .unwrap_or(Pico::ZERO);
        let charged = match self.reservation.take() {
            Some(r) => r.settle(cost),
            None => Pico::ZERO,
        };
        // Every admitted request counts (against `max_requests` too) and is
        // recorded, also when no upstream answered (status 502/504, cost 0):
        // the live count and the store's count of records stay equal.
        let key = self.permit.key().clone();
        let tokens = usage.prompt_tokens + usage.completion_tokens;
        self.app.gate.add_tokens(&key, tokens);
        let latency = self.started.elapsed();
        let upstream = self.app.routing.upstreams.get(self.upstream);
        let status = match (self.answered, self.status) {
            (true, s) => s,
            (false, 0) => 502,
            (false, s) => s,
        };
        self.app
            .metrics
            .answered(self.route, status, latency, self.ttfb);
        self.app.metrics.metered(
            &self.model,
            upstream.map(|_| self.upstream),
            &usage,
            charged,
            estimated,
        );
        self.app.store.record(UsageRecord {
            at_ms: self.app.clock.now_ms(),
            key: key.hash,
            model: std::mem::take(&mut self.model),
            upstream: upstream.map(|u| u.name.clone()).unwrap_or_default(),
            route: self.route.as_str().to_owned(),
            stream: self.stream,
            status,
            prompt_tokens: usage.prompt_tokens,
            cached_tokens: usage.cached_tokens,
            completion_tokens: usage.completion_tokens,
            reasoning_tokens: usage.reasoning_tokens,
            cost: charged,
            reserved,
            latency_ms: latency.as_millis().min(u32::MAX as u128) as u32,
            ttfb_ms: self
                .ttfb
                .map(|t| t.as_millis().min(u32::MAX as u128) as u32)
                .unwrap_or(0),
            request_id: self.request_id.to_str().unwrap_or("").to_owned(),
            client_ip: self.client_ip.to_string(),
            estimated,
            daily_fee: crate::money::Pico::ZERO,
        });
    }
}

impl Drop for Settlement {
    fn drop(&mut self) {
        self.finish(None, 0);
    }
}

/// The upstream's body on its way to the client: each frame is handed on
/// unchanged (the meter only reads it, except the withheld usage event of a
/// stream whose usage the gateway asked for), and the request is settled
/// when the body ends, fails, or is dropped.
/// Scheduler turns a response body yields, with frames in hand, before it
/// hands them on (see `MeteredBody::poll_frame`).
const YIELDS: u8 = 3;

/// Frames a response body holds at most before handing them on (hyper
/// writes up to 16 buffers per flush).
const MAX_HELD_FRAMES: usize = 16;

struct MeteredBody {
    inner: Option<Incoming>,
    meter: Meter,
    /// The meter may drop the injected usage event: the length changes.
    withholds: bool,
    settlement: Option<Settlement>,
    finished: bool,
    /// Frames already received from the upstream, not yet handed on.
    ready: VecDeque<Bytes>,
    /// Scheduler turns yielded in a row, waiting for the upstream
    /// connection to deliver what it has already read (see `poll_frame`).
    yields: u8,
    /// Handing `ready` on, back to back.
    draining: bool,
    /// What ends the stream (or trailers), met while frames were queued:
    /// handed on after them.
    tail: Option<Tail>,
}

enum Tail {
    End,
    Error(hyper::Error),
    Trailers(Frame<Bytes>),
}

impl MeteredBody {
    fn settle(&mut self) {
        if let Some(mut s) = self.settlement.take() {
            s.finish(
                self.meter.usage(),
                self.meter.delivered_completion_estimate(),
            );
        }
    }
}

impl HttpBody for MeteredBody {
    type Data = Bytes;
    type Error = BoxError;

    /// Frames go on as they arrive, never waiting for the upstream network.
    /// One refinement: hyper's client hands a response's chunks over one at
    /// a time, through its connection task, even when it read a whole burst
    /// of them in one `recv`; handed on one by one, each would cost its own
    /// write to the client (and on loopback, its own wake-up of the client):
    /// measured with strace, 21 writes per 16-token stream read in 1 recv.
    /// So when the upstream body has nothing new *ready* while we hold
    /// frames, we yield a few scheduler turns (`YIELDS`, no timer) to let
    /// the connection task deliver what it has already read, then hand
    /// everything on back to back (at most `MAX_HELD_FRAMES`), which hyper
    /// writes in one flush. The bytes are exactly the same; a real token
    /// stream, whose tokens arrive apart, goes on frame by frame.
    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = &mut *self;
        loop {
            if this.finished {
                return Poll::Ready(None);
            }
            if this.draining {
                if let Some(b) = this.ready.pop_front() {
                    return Poll::Ready(Some(Ok(Frame::data(b))));
                }
                this.draining = false;
            }
            let Some(inner) = this.inner.as_mut().filter(|_| this.tail.is_none()) else {
                // The upstream is done: queued frames first, then the end.
                if !this.ready.is_empty() {
                    this.draining = true;
                    continue;
                }
                return match this.tail.take() {
                    Some(Tail::Trailers(frame)) => Poll::Ready(Some(Ok(frame))),
                    Some(Tail::Error(e)) => {
                        this.finished = true;
                        Poll::Ready(Some(Err(Box::new(e))))
                    }
                    Some(Tail::End) | None => {
                        this.finished = true;
                        Poll::Ready(None)
                    }
                };
            };
            match Pin::new(inner).poll_frame(cx) {
                Poll::Ready(Some(Ok(frame))) => match frame.into_data() {
                    Ok(data) => {
                        if let Some(s) = this.settlement.as_mut()
                            && s.ttfb.is_none()
                        {
                            s.ttfb = Some(s.started.elapsed());
                        }
                        let out = this.meter.on_frame(data);
                        if !out.is_empty() {
                            this.ready.push_back(out);
                        }
                        this.yields = 0;
                        // Never hold more than one write's worth.
                        if this.ready.len() >= MAX_HELD_FRAMES {
                            this.draining = true;
                        }
                    }
                    Err(frame) => this.tail = Some(Tail::Trailers(frame)),
                },
                Poll::Ready(Some(Err(e))) => {
                    this.inner = None;
                    this.tail = Some(Tail::Error(e));
                    this.settle();
                }
                Poll::Ready(None) => {
                    this.inner = None;
                    let rest = this.meter.finish();
                    if !rest.is_empty() {
                        this.ready.push_back(rest);
                    }
                    this.tail = Some(Tail::End);
                    this.settle();
                }
                Poll::Pending => {
                    if this.ready.is_empty() {
                        return Poll::Pending;
                    }
                    if this.yields < YIELDS {
                        this.yields += 1;
                        cx.waker().wake_by_ref();
                        return Poll::Pending;
                    }
                    this.yields = 0;
                    this.draining = true;
                }
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.finished
    }

    fn size_hint(&self) -> SizeHint {
        match (&self.inner, self.withholds) {
            (Some(inner), false) => inner.size_hint(),
            _ => SizeHint::default(),
        }
    }
}

impl Drop for MeteredBody {
    fn drop(&mut self) {
        if self.settlement.is_none() {
            return;
        }
        // The client went away before the end.
        let drain = self
            .settlement
            .as_ref()
            .map(|s| s.app.config.billing.on_client_disconnect == OnClientDisconnect::Drain)
            .unwrap_or(false);
        if drain
            && let (Some(inner), Ok(rt)) =
                (self.inner.take(), tokio::runtime::Handle::try_current())
        {
            let settlement = self.settlement.take();
            let meter = std::mem::replace(
                &mut self.meter,
                Meter::new(Route::Other, Framing::Json, false),
            );
            let timeout = settlement
                .as_ref()
                .map(|s| s.app.config.billing.drain_timeout.0)
                .unwrap_or(Duration::from_secs(30));
            // Keep reading the upstream (bounded) to get its exact usage.
            rt.spawn(async move {
                let mut rest = MeteredBody {
                    inner: Some(inner),
                    meter,
                    withholds: false,
                    settlement,
                    finished: false,
                    ready: VecDeque::new(),
                    yields: 0,
                    draining: false,
                    tail: None,
                };
                let _ = tokio::time::timeout(timeout, async {
                    while let Some(frame) = rest.frame().await {
                        if frame.is_err() {
                            break;
                        }
                    }
                })
                .await;
                rest.settle();
            });
            return;
        }
        // Cancel: the upstream request is dropped with `inner`, at once.
        self.inner = None;
        self.settle();
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

/// The client's `x-request-id` when it is sane, else a new one.
pub fn request_id(headers: &HeaderMap) -> HeaderValue {
    if let Some(v) = headers.get(&X_REQUEST_ID)
        && !v.is_empty()
        && v.len() <= 128
        && v.as_bytes().iter().all(|b| b.is_ascii_graphic())
    {
        return v.clone();
    }
    let id = format!("req_{:016x}{:08x}", fast_random(), fast_random() as u32);
    HeaderValue::from_str(&id).expect("hex is a valid header value")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::Origin;

    #[test]
    fn request_ids() {
        let mut h = HeaderMap::new();
        let a = request_id(&h);
        assert!(a.to_str().unwrap().starts_with("req_"));
        assert_ne!(a, request_id(&h));
        h.insert("x-request-id", HeaderValue::from_static("abc-123"));
        assert_eq!(request_id(&h), "abc-123");
        h.insert("x-request-id", HeaderValue::from_static("has space"));
        assert_ne!(request_id(&h), "has space");
    }

    #[test]
    fn origin_is_upstream_for_upstream_errors() {
        assert_eq!(
            ApiError::upstream(StatusCode::BAD_GATEWAY, "x").origin,
            Origin::Upstream
        );
    }
}
