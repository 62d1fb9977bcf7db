//! The proxy path: one function per phase over one request context
//! ([`Call`]). Read top to bottom, [`Call::run`] is the whole story of a
//! request:
//!
//! ```text
//! authenticate → classify → admit → limit → inspect → reserve → forward → stream back → settle
//! ```
//!
//! Each phase returns early with an `ApiError`. Everything an admitted
//! request holds (concurrency permit, request count, reservation) lives in
//! a [`Settlement`](settle::Settlement) from the reserve phase on: it runs
//! exactly once — at the end of the stream, on an upstream error, or when
//! the response body is dropped because the client went away — and it is
//! the one place that charges, records and counts a request in the
//! metrics. A request refused before it is counted by [`Call::refused`].

mod anthropic;
mod body;
pub(crate) mod h1pool;
mod headers;
pub mod routing;
mod settle;
pub mod spin;
mod worker;

use std::net::IpAddr;
use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderValue};
use http::{Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;

use crate::Body;
use crate::app::App;
use crate::config::OnInsufficient;
use crate::error::{ApiError, Shape};
use crate::gate::{Ask, Bound, LiveKey, Permit, Policy};
use crate::meter::{Endpoint, Framing, Meter, RequestInfo, Rewrite};
use body::MeteredBody;
use h1pool::{SendError, UpstreamBody};
pub use headers::X_REQUEST_ID;
use routing::{Destination, Link, Pricing};
pub use routing::{Proxy, Routing, fast_random};
use settle::{Admitted, Reach, Settlement};
pub use worker::WorkerProxy;

/// Proxies one `/v1/*` request, on the configuration live when it starts.
pub async fn handle(
    app: &Arc<App>,
    worker: &WorkerProxy,
    req: Request<Incoming>,
    client_ip: IpAddr,
    request_id: &HeaderValue,
) -> Response<Body> {
    let live = app.live();
    let proxy = worker.for_live(&live);
    let mut call = Call {
        in_flight: worker.spin.as_ref().map(spin::Spin::enter),
        app,
        live: &live,
        proxy: &proxy,
        request_id,
        client_ip,
        started: Instant::now(),
        // The metrics label of a request refused before `classify`.
        route: Endpoint::from_path(req.uri().path()),
        settlement: None,
        upstream_wait: std::time::Duration::ZERO,
    };
    let mut res = match call.run(req).await {
        Ok(res) => res,
        Err(e) => call.refused(e),
    };
    // The gateway's own time up to the answer's head, the upstream's wait
    // excluded: what this request cost over calling the upstream directly.
    let own = call.started.elapsed().saturating_sub(call.upstream_wait);
    app.metrics.overhead(own);
    res.headers_mut()
        .append(SERVER_TIMING.clone(), server_timing(own));
    res
}

/// `server-timing`, the gateway's own time on every proxied answer.
pub static SERVER_TIMING: http::HeaderName = http::HeaderName::from_static("server-timing");

/// `tollgate;dur=<ms>` with microsecond precision.
fn server_timing(own: std::time::Duration) -> HeaderValue {
    let us = own.as_micros().min(u128::from(u64::MAX)) as u64;
    let mut buf = [0u8; 40];
    buf[..13].copy_from_slice(b"tollgate;dur=");
    let mut n = 13 + write_u64(&mut buf[13..], us / 1000);
    let frac = us % 1000;
    buf[n] = b'.';
    buf[n + 1] = b'0' + (frac / 100) as u8;
    buf[n + 2] = b'0' + (frac / 10 % 10) as u8;
    buf[n + 3] = b'0' + (frac % 10) as u8;
    n += 4;
    HeaderValue::from_bytes(&buf[..n]).expect("ASCII digits are a valid header value")
}

/// Writes `v` in decimal at the start of `out` (20 bytes are enough),
/// returning its length.
fn write_u64(out: &mut [u8], mut v: u64) -> usize {
    let mut tmp = [0u8; 20];
    let mut i = tmp.len();
    loop {
        i -= 1;
        tmp[i] = b'0' + (v % 10) as u8;
        v /= 10;
        if v == 0 {
            break;
        }
    }
    let len = tmp.len() - i;
    out[..len].copy_from_slice(&tmp[i..]);
    len
}

/// One request on its way through the phases.
struct Call<'a> {
    app: &'a Arc<App>,
    /// The configuration snapshot this request runs on, start to end (a
    /// reload meanwhile does not change its prices or routes).
    live: &'a Arc<crate::reload::Live>,
    /// This worker's routing and upstream clients.
    proxy: &'a Proxy,
    request_id: &'a HeaderValue,
    /// The client's address (after `trusted_proxies`).
    client_ip: IpAddr,
    started: Instant,
    /// The API the path speaks, once classified (metrics label).
    route: Endpoint,
    /// From the reserve phase on: the request's one exit.
    settlement: Option<Settlement>,
    /// Time spent waiting for the upstream's answer head (excluded from
    /// the gateway's own time in `server-timing`).
    upstream_wait: std::time::Duration,
    /// This request on its worker's spinner, until its answer ends.
    in_flight: Option<spin::InFlight>,
}

/// The inspected request: what reservation and forwarding need.
struct Inspected {
    info: RequestInfo,
    body: Bytes,
    dest: Destination,
}

impl Call<'_> {
    async fn run(&mut self, req: Request<Incoming>) -> Result<Response<Body>, ApiError> {
        let key = self.authenticate(req.headers())?;
        let path = self.classify(&req)?;
        let now_ms = self.app.clock.now_ms();
        let device = req
            .headers()
            .get("x-device-id")
            .and_then(|v| v.to_str().ok());
        let ask = Ask {
            now_ms,
            model: None,
            client_ip: self.client_ip,
            device,
        };
        let policy = self.admit(&key, &ask)?;
        if self.route == Endpoint::Models && req.method() == Method::GET {
            // The Anthropic SDK always sends `anthropic-version`: it gets
            // Anthropic's list shape.
            let anthropic = req.headers().contains_key("anthropic-version");
            return Ok(self.list_models(&policy, anthropic));
        }
        if let Some(cluster) = self.app.cluster.get() {
            // Cluster mode: this node must hold a slot of the key's
            // concurrency (a round trip only when it holds none free).
            cluster.ensure_slot(&key, &policy).await?;
            // …and a share of its rpm window (and, for its tpm, shares).
            cluster.ensure_rate(&key, &policy, now_ms).await?;
        }
        let permit = self.limit(&key, &policy, now_ms)?;
        if self.route == Endpoint::CountTokens {
            return self.count_tokens(permit, &policy, req, &path).await;
        }
        let (parts, body) = req.into_parts();
        let inspected = self.inspect(&parts.headers, body, &path, &policy).await?;
        if let Some(cluster) = self.app.cluster.get() {
            // Cluster mode: the account's lease must hold the bound before
            // the gate reserves it (a round trip only when it does not).
            let bound = self.bound(&inspected);
            cluster
                .ensure_tokens(
                    &key,
                    &policy,
                    bound.tokens(bound.completion_tokens),
                    // The clock the reservation reads: the same minute.
                    self.app.clock.now_ms(),
                )
                .await?;
            cluster
                .ensure_credit(
                    &key,
                    &policy,
                    bound.cost(bound.completion_tokens),
                    bound.cap,
                    now_ms,
                )
                .await?;
        }
        let upstream_body = self.reserve(permit, &policy, &inspected)?;
        let (upstream, answer) = self
            .forward(&parts, &path, upstream_body, &inspected)
            .await?;
        if self.route.speaks_anthropic() && !answer.status().is_success() {
            return Ok(self.anthropic_error_answer(upstream, answer).await);
        }
        Ok(self.stream_back(upstream, answer, &inspected))
    }

    /// Phase 1: the key (memory; sled only on a cache miss).
    fn authenticate(&self, headers: &HeaderMap) -> Result<Arc<LiveKey>, ApiError> {
        self.app.gate.authenticate(headers, self.client_ip)
    }

    /// Phase 2: which API the path speaks, on its canonical form — the one
    /// forwarded. Unknown routes are refused before anything goes upstream
    /// (by routing, in `inspect`, unless a `[routes]` rule allows them).
    fn classify(&mut self, req: &Request<Incoming>) -> Result<String, ApiError> {
        let (endpoint, canonical) = crate::meter::classify(req.uri().path())?;
        self.route = endpoint;
        let mut forwarded = canonical.as_str().to_owned();
        if let Some(q) = req.uri().query() {
            forwarded.push('?');
            forwarded.push_str(q);
        }
        Ok(forwarded)
    }

    /// Phase 3: status, expiry, request cap, IP and device rules (the model
    /// is checked once the body is read).
    fn admit(&self, key: &LiveKey, ask: &Ask<'_>) -> Result<Arc<Policy>, ApiError> {
        self.app.gate.admit(key, ask)
    }

    /// Phase 4: rpm, concurrency and the request count, before the body is
    /// read: a refused request costs no buffering.
    fn limit(&self, key: &Arc<LiveKey>, policy: &Policy, now_ms: i64) -> Result<Permit, ApiError> {
        self.app.gate.limit(key, policy, now_ms)
    }

    /// Phase 5: read the body (bounded), measure it, check its models
    /// against the key's allowlist, and decide where it goes and what it
    /// costs.
    async fn inspect(
        &self,
        headers: &HeaderMap,
        body: Incoming,
        path: &str,
        policy: &Policy,
    ) -> Result<Inspected, ApiError> {
        let body =
            crate::server::read_body(headers, body, self.app.config.server.max_body_bytes).await?;
        // Other routes may carry multipart (audio uploads): only JSON is read.
        let json_body = headers
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .is_none_or(|ct| {
                ct.trim_start()
                    .to_ascii_lowercase()
                    .starts_with("application/json")
            });
        let info = if self.route == Endpoint::Other && (body.is_empty() || !json_body) {
            RequestInfo::default()
        } else {
            crate::meter::inspect(self.route, &body)?
        };
        // The model and any fallbacks: each must be allowed, the dearest prices it.
        // The model and any fallbacks: each must be allowed, the dearest prices it.
        let models: Vec<&str> = if info.models.is_empty() {
            info.model.as_deref().into_iter().collect()
        } else {
            info.models.iter().map(String::as_str).collect()
        };
        for m in &models {
            policy.check_model(m)?;
        }
        let path_only = path.split_once('?').map_or(path, |(p, _)| p);
        let dest = self.proxy.routing.route(self.route, path_only, &models)?;
        Ok(Inspected { info, body, dest })
    }

    /// The request's upper bound of cost, as phase 6 reserves it.
    fn bound(&self, req: &Inspected) -> Bound {
        let info = &req.info;
        let produces_tokens = self.route.produces_tokens();
        let model_max = req.dest.max_output_tokens;
        let completion_bound = if produces_tokens {
            info.max_tokens.unwrap_or(model_max).min(model_max)
        } else {
            0
        };
        let cap =
            self.live.config.billing.on_insufficient == OnInsufficient::Cap && produces_tokens;
        Bound {
            pricing: req.dest.pricing,
            prompt_tokens: info.prompt_token_bound(),
            completion_tokens: completion_bound,
            choices: info.choices,
            cap,
        }
    }

    /// Phase 6: take an upper bound of the cost from the key's credit, then
    /// write the body that goes upstream (usage injected for streams,
    /// `max_tokens` set to what was reserved). From here the request has a
    /// settlement.
    fn reserve(
        &mut self,
        permit: Permit,
        policy: &Policy,
        req: &Inspected,
    ) -> Result<Bytes, ApiError> {
        let info = &req.info;
        let produces_tokens = self.route.produces_tokens();
        let bound = self.bound(req);
        let completion_bound = bound.completion_tokens;
        // `n` answers of up to `completion_bound` tokens each.
        let choices = u64::from(info.choices.max(1));
        let free = matches!(req.dest.pricing, Pricing::Flat(f) if f == crate::money::Pico::ZERO);
        if !free && !self.app.store.accepting() {
            // Refused before anything is reserved or sent: the queue stays
            // bounded and no charge lives only in memory.
            return Err(ApiError::store_unavailable());
        }
        let key = permit.key().clone();
        let reserved = self.app.gate.reserve(&key, policy, &bound)?;
        let model_bound = completion_bound;
        let completion_bound = reserved.capped_max_tokens.unwrap_or(completion_bound);
        if let Some(budget) = info.thinking_budget
            && completion_bound < info.max_tokens.unwrap_or(0)
            && budget >= completion_bound
        {
            // The gateway lowered max_tokens to the thinking budget or
            // below: the upstream would refuse the request. Refused here,
            // the reservation given back.
            return Err(if completion_bound < model_bound {
                ApiError::insufficient_quota(
                    "insufficient_quota",
                    format!(
                        "This key's credit covers at most {completion_bound} output tokens, not more than \
                         thinking.budget_tokens ({budget}); lower the thinking budget or add credit."
                    ),
                    "key",
                )
            } else {
                ApiError::bad_request(
                    "invalid_value",
                    format!(
                        "thinking.budget_tokens ({budget}) must be below max_tokens, which this gateway \
                         bounds to {completion_bound} for this model."
                    ),
                )
                .with_param("thinking")
            });
        }
        let inject_usage = info.stream && self.route.usage_on_request() && !info.include_usage;
        let rewrite = Rewrite {
            include_usage: inject_usage,
            max_tokens: (produces_tokens && info.max_tokens != Some(completion_bound))
                .then_some(completion_bound),
        };
        // A body that cannot be rewritten drops the reservation unsettled:
        // nothing is charged or counted.
        let upstream_body = crate::meter::rewrite(self.route, &req.body, &rewrite)?;
        self.settlement = Some(Settlement::new(
            self.app,
            self.live,
            Admitted {
                permit,
                reservation: reserved.reservation,
                pricing: req.dest.pricing,
                prompt_estimate: info.prompt_estimate(),
                completion_bound: completion_bound.saturating_mul(choices),
                route: self.route,
                model: info.model.clone().unwrap_or_default(),
                stream: info.stream,
            },
            self.started,
            self.request_id,
            self.client_ip,
        ));
        Ok(upstream_body)
    }

    /// Phase 7: send to the candidates in turn. Another upstream is tried
    /// only when this one provably did not take the request: it could not
    /// be reached, or it answered 429/5xx. Once the body may have gone (a
    /// reset after connecting, a first-byte timeout), trying again would
    /// make a second upstream do — and bill — the same work.
    async fn forward(
        &mut self,
        parts: &http::request::Parts,
        path: &str,
        body: Bytes,
        req: &Inspected,
    ) -> Result<(usize, Response<UpstreamBody>), ApiError> {
        let app = self.app;
        let routing = &self.proxy.routing;
        let order = routing.candidates(&req.dest.group, app.clock.now_ms());
        if order.is_empty() {
            return Err(ApiError::upstream(
                StatusCode::BAD_GATEWAY,
                "No upstream serves this request.",
            ));
        }
        let suffix = path.strip_prefix("/v1").unwrap_or(path);
        let anthropic_version = self
            .route
            .speaks_anthropic()
            .then_some(headers::DEFAULT_ANTHROPIC_VERSION);
        // Free requests (count_tokens) have no settlement: nothing to charge.
        let mut settlement = self.settlement.as_mut();
        let mut last_err = None;
        for (attempt, &i) in order.iter().enumerate() {
            let up = &routing.upstreams[i];
            let link = &self.proxy.clients[i];
            let body = crate::meter::rename_roles(&body, &up.role_map)?;
            let last = attempt + 1 == order.len();
            if let Some(s) = settlement.as_mut() {
                s.upstream = Some(i);
                s.reach = Reach::Sent;
            }
            let sent = Instant::now();
            if let Some(g) = &self.in_flight {
                // The answer is often a few tens of µs away.
                g.poke();
            }
            let outcome = match link {
                // Plain HTTP/1 takes the origin form and a Host header.
                Link::Plain { pool, host } => {
                    let mut target = String::with_capacity(up.base_path.len() + suffix.len());
                    target.push_str(&up.base_path);
                    target.push_str(suffix);
                    // Written into the request line as it is: no spaces, no
                    // control bytes (what `http::Uri` refuses too).
                    if !target.bytes().all(|b| b > b' ' && b != 0x7f) {
                        return Err(ApiError::bad_request(
                            "invalid_path",
                            "The request path cannot be forwarded.",
                        ));
                    }
                    let out = h1pool::Outgoing {
                        method: &parts.method,
                        target: &target,
                        host,
                        auth: up.auth.as_ref(),
                        client: &parts.headers,
                        request_id: self.request_id,
                        anthropic_version,
                        body: &body,
                    };
                    tokio::time::timeout(up.first_byte_timeout, pool.send(out)).await
                }
                // The pooled TLS client takes the absolute URI.
                Link::Tls(client) => {
                    let uri = format!("{}{}{}", up.origin, up.base_path, suffix);
                    let mut upstream_req = Request::new(Full::new(body));
                    *upstream_req.method_mut() = parts.method.clone();
                    *upstream_req.uri_mut() = http::Uri::try_from(uri).map_err(|_| {
                        ApiError::bad_request(
                            "invalid_path",
                            "The request path cannot be forwarded.",
                        )
                    })?;
                    let mut headers = headers::upstream_request(&parts.headers, self.request_id);
                    if anthropic_version.is_some() {
                        headers::default_anthropic_version(&mut headers);
                    }
                    *upstream_req.headers_mut() = headers;
                    if let Some((name, value)) = &up.auth {
                        upstream_req
                            .headers_mut()
                            .insert(name.clone(), value.clone());
                    }
                    tokio::time::timeout(up.first_byte_timeout, async {
                        client
                            .request(upstream_req)
                            .await
                            .map(|res| res.map(UpstreamBody::Hyper))
                            .map_err(|e| {
                                if e.is_connect() {
                                    SendError::Connect(std::io::Error::other(e.to_string()))
                                } else {
                                    SendError::Pooled(e)
                                }
                            })
                    })
                    .await
                }
            };
            self.upstream_wait += sent.elapsed();
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
                    if let Some(settlement) = settlement.as_mut() {
                        settlement.reach = Reach::Answered(s.as_u16());
                    }
                    return Ok((i, res));
                }
                Ok(Err(e @ SendError::Connect(_))) => {
                    // Never reached: nothing to charge, safe to try another.
                    if let Some(s) = settlement.as_mut() {
                        s.reach = Reach::NotSent;
                        s.upstream = None;
                    }
                    tracing::warn!(upstream = %up.name, error = %e, "upstream could not be reached");
                    routing.failed(i, app.clock.now_ms());
                    app.metrics.upstream_failed(i, !last);
                    last_err = Some(ApiError::upstream(
                        StatusCode::BAD_GATEWAY,
                        format!("Upstream {} could not be reached.", up.name),
                    ));
                    continue;
                }
                Ok(Err(e)) => {
                    tracing::warn!(upstream = %up.name, error = %e, "upstream request failed");
                    ApiError::upstream(
                        StatusCode::BAD_GATEWAY,
                        format!("Upstream {} failed before answering.", up.name),
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
            // The upstream may have taken the body: no other attempt.
            routing.failed(i, app.clock.now_ms());
            app.metrics.upstream_failed(i, false);
            return Err(err);
        }
        Err(last_err.unwrap_or_else(|| {
            ApiError::upstream(StatusCode::BAD_GATEWAY, "No upstream answered.")
        }))
    }

    /// Phase 8: the answer goes back through the meter, frame by frame; the
    /// settlement moves into the body, which settles when it ends.
    fn stream_back(
        &mut self,
        upstream: usize,
        answer: Response<UpstreamBody>,
        req: &Inspected,
    ) -> Response<Body> {
        let settlement = self.settlement.take().expect("reserve made it");
        let (mut head, incoming) = answer.into_parts();
        headers::clean_answer(&mut head.headers);
        let framing = Framing::from_content_type(
            head.headers
                .get(header::CONTENT_TYPE)
                .and_then(|v| v.to_str().ok()),
        );
        let info = &req.info;
        let inject_usage = info.stream && self.route.usage_on_request() && !info.include_usage;
        if inject_usage {
            // The withheld usage event changes the length.
            head.headers.remove(header::CONTENT_LENGTH);
        }
        head.headers
            .insert(X_REQUEST_ID.clone(), self.request_id.clone());
        let up = &self.proxy.routing.upstreams[upstream];
        if up.demo {
            head.headers.insert(
                "x-tollgate-demo",
                HeaderValue::from_static("mock upstream, not charged"),
            );
        }
        settlement.permit().rate.write_headers(&mut head.headers);
        let metered = MeteredBody::new(
            incoming,
            Meter::new(self.route, framing, inject_usage),
            inject_usage,
            settlement,
            up.stream_idle_timeout,
        )
        .spinning(self.in_flight.take());
        Response::from_parts(head, BodyExt::boxed_unsync(metered))
    }

    /// A refusal or failure: the settlement records it when the request was
    /// admitted (once), the metrics count it otherwise.
    fn refused(&mut self, e: ApiError) -> Response<Body> {
        let e = self.shaped(e);
        match self.settlement.take() {
            Some(mut s) => {
                s.failed_status = Some(e.status.as_u16());
                s.finish(None, 0);
            }
            None => {
                self.app.metrics.rejected(&e);
                self.app.metrics.answered(
                    self.route,
                    e.status.as_u16(),
                    self.started.elapsed(),
                    None,
                );
            }
        }
        e.into_response()
    }

    /// The error in the route's API shape: Anthropic's on its routes, so
    /// that every refusal there (key, credit, limits, body, upstream) reads
    /// as the Anthropic SDK expects.
    fn shaped(&self, e: ApiError) -> ApiError {
        if self.route.speaks_anthropic() {
            e.with_shape(Shape::Anthropic {
                request_id: self.request_id.to_str().unwrap_or("").to_owned(),
            })
        } else {
            e
        }
    }

    fn list_models(&self, policy: &Policy, anthropic: bool) -> Response<Body> {
        let names: Vec<&str> = self
            .proxy
            .routing
            .model_names()
            .into_iter()
            .filter(|m| policy.allows_model(m))
            .collect();
        let list = if anthropic {
            let data: Vec<serde_json::Value> = names
                .iter()
                .map(|m| serde_json::json!({"id": m, "type": "model", "display_name": m, "created_at": "1970-01-01T00:00:00Z"}))
                .collect();
            serde_json::json!({
                "data": data,
                "has_more": false,
                "first_id": names.first(),
                "last_id": names.last(),
            })
        } else {
            let data: Vec<serde_json::Value> = names
                .iter()
                .map(|m| serde_json::json!({"id": m, "object": "model", "created": 0, "owned_by": "tollgate"}))
                .collect();
            serde_json::json!({"object": "list", "data": data})
        };
        let res = json_response(StatusCode::OK, &list);
        self.app
            .metrics
            .answered(self.route, 200, self.started.elapsed(), None);
        res
    }
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

/// The client's `x-request-id` when it is sane, else a new one.
pub fn request_id(headers: &HeaderMap) -> HeaderValue {
    if let Some(v) = headers.get(&X_REQUEST_ID)
        && !v.is_empty()
        && v.len() <= 128
        && v.as_bytes().iter().all(|b| b.is_ascii_graphic())
    {
        return v.clone();
    }
    // `req_` and 24 hex digits, written in place (no formatting machinery).
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let mut id = [0u8; 28];
    id[..4].copy_from_slice(b"req_");
    let (a, b) = (fast_random(), fast_random() as u32);
    for i in 0..16 {
        id[4 + i] = HEX[((a >> (60 - 4 * i)) & 0xf) as usize];
    }
    for i in 0..8 {
        id[20 + i] = HEX[((b >> (28 - 4 * i)) & 0xf) as usize];
    }
    HeaderValue::from_bytes(&id).expect("hex is a valid header value")
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
        let fresh = request_id(&HeaderMap::new());
        let fresh = fresh.to_str().unwrap();
        assert_eq!(fresh.len(), 28);
        assert!(
            fresh[4..]
                .bytes()
                .all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase())
        );
    }

    #[test]
    fn server_timing_is_milliseconds_with_microseconds() {
        use std::time::Duration;
        assert_eq!(
            server_timing(Duration::from_micros(52)),
            "tollgate;dur=0.052"
        );
        assert_eq!(
            server_timing(Duration::from_micros(1_234_567)),
            "tollgate;dur=1234.567"
        );
        assert_eq!(server_timing(Duration::ZERO), "tollgate;dur=0.000");
        assert_eq!(
            server_timing(Duration::from_millis(10)),
            "tollgate;dur=10.000"
        );
    }

    #[test]
    fn origin_is_upstream_for_upstream_errors() {
        assert_eq!(
            ApiError::upstream(StatusCode::BAD_GATEWAY, "x").origin,
            Origin::Upstream
        );
    }
}
