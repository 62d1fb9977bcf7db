//! The admin billing endpoints of seed 004, from the gateway's hourly
//! rollups (in cluster mode the database's usage records, summed the same
//! way) and the resolved config:
//!
//! - `GET /api/v1/admin/health`: the gateway, its billing mode and whether
//!   the store takes paid requests;
//! - `GET /api/v1/admin/billing/status`: the mode, and totals today and
//!   all time;
//! - `GET /api/v1/admin/billing/stats?start&end`: per model over the range
//!   (rollups are kept per hour and model), with each `[routes]` rule's
//!   prices beside them;
//! - `GET /api/v1/admin/config`: the configuration as resolved (defaults
//!   filled in), with anything secret masked.

use std::collections::BTreeMap;

use http::{Response, StatusCode};
use serde::Serialize;
use serde_json::value::RawValue;

use super::super::reports::{params, range_of, rollups};
use super::super::{Ctx, Fields, json};
use crate::Body;
use crate::clock::{DAY_MS, HOUR_MS};
use crate::error::ApiError;
use crate::money::Pico;

#[derive(Clone, Copy, Default, Serialize)]
struct Totals {
    cost: Pico,
    requests: u64,
    prompt_tokens: u64,
    completion_tokens: u64,
}

impl Totals {
    fn add(&mut self, r: &crate::store::Rollup) {
        self.cost = self.cost.saturating_add(r.cost);
        self.requests += r.requests;
        self.prompt_tokens += r.prompt_tokens;
        self.completion_tokens += r.completion_tokens;
    }
}

/// `GET /api/v1/admin/health`
pub(super) fn health(ctx: &Ctx<'_>) -> Result<Response<Body>, ApiError> {
    #[derive(Serialize)]
    struct Health {
        success: bool,
        status: &'static str,
        mode: &'static str,
        /// False while the usage queue is full: paid requests get 503.
        store_accepting: bool,
        keys_cached: usize,
    }
    let accepting = ctx.store.accepting();
    json(
        StatusCode::OK,
        &Health {
            success: true,
            status: if accepting { "ok" } else { "degraded" },
            mode: ctx.gate.billing_mode().as_str(),
            store_accepting: accepting,
            keys_cached: ctx.gate.cached(),
        },
    )
}

/// `GET /api/v1/admin/billing/status`
pub(super) async fn status(ctx: &Ctx<'_>) -> Result<Response<Body>, ApiError> {
    let now = ctx.clock.now_ms();
    let end_hour = now.div_euclid(HOUR_MS) + 1;
    let today_hour = now.div_euclid(DAY_MS) * 24;
    let mut today = Totals::default();
    let mut all_time = Totals::default();
    for (hour, _, r) in rollups(ctx, None, i64::MIN / 2, end_hour).await? {
        all_time.add(&r);
        if hour >= today_hour {
            today.add(&r);
        }
    }
    #[derive(Serialize)]
    struct Status {
        success: bool,
        /// `enforce`, `observe` or `off` (what admission does now).
        mode: &'static str,
        /// Money is refused when a key or account cannot pay.
        enforcing: bool,
        /// Requests are metered and recorded.
        metering: bool,
        on_insufficient: crate::config::OnInsufficient,
        today: Totals,
        all_time: Totals,
    }
    let mode = ctx.gate.billing_mode();
    json(
        StatusCode::OK,
        &Status {
            success: true,
            mode: mode.as_str(),
            enforcing: mode == crate::config::BillingMode::Enforce,
            metering: mode != crate::config::BillingMode::Off,
            on_insufficient: ctx.config.billing.on_insufficient,
            today,
            all_time,
        },
    )
}

/// `GET /api/v1/admin/billing/stats?start&end` (Unix seconds, default the
/// last 30 days).
pub(super) async fn stats(ctx: &Ctx<'_>, query: Option<&str>) -> Result<Response<Body>, ApiError> {
    let pairs = params(query, &["start", "end"])?;
    let range = range_of(&pairs, ctx.clock.now_ms())?;
    let mut total = Totals::default();
    let mut by_model: BTreeMap<String, Totals> = BTreeMap::new();
    for (_, model, r) in
        rollups(ctx, None, range.start_ms / HOUR_MS, range.end_ms / HOUR_MS).await?
    {
        total.add(&r);
        by_model.entry(model).or_default().add(&r);
    }
    #[derive(Serialize)]
    struct ModelStats {
        model: String,
        #[serde(flatten)]
        totals: Totals,
    }
    #[derive(Serialize)]
    struct RoutePrice<'a> {
        route: &'a str,
        /// USD per 1M prompt tokens, for every model on the route.
        input: Option<Pico>,
        /// USD per 1M completion tokens, for every model on the route.
        output: Option<Pico>,
        /// USD per request.
        request: Pico,
        free: bool,
    }
    #[derive(Serialize)]
    struct Stats<'a> {
        success: bool,
        mode: &'static str,
        start: i64,
        end: i64,
        total: Totals,
        by_model: Vec<ModelStats>,
        routes: Vec<RoutePrice<'a>>,
    }
    let mut by_model: Vec<ModelStats> = by_model
        .into_iter()
        .map(|(model, totals)| ModelStats { model, totals })
        .collect();
    by_model.sort_by(|a, b| {
        b.totals
            .cost
            .cmp(&a.totals.cost)
            .then(a.model.cmp(&b.model))
    });
    json(
        StatusCode::OK,
        &Stats {
            success: true,
            mode: ctx.gate.billing_mode().as_str(),
            start: range.start_ms / 1000,
            end: range.end_ms / 1000,
            total,
            by_model,
            routes: ctx
                .config
                .routes
                .iter()
                .map(|(p, r)| RoutePrice {
                    route: p.as_str(),
                    input: r.input,
                    output: r.output,
                    request: r.request,
                    free: r.free,
                })
                .collect(),
        },
    )
}

/// `GET /api/v1/admin/config`
pub(super) fn config(ctx: &Ctx<'_>) -> Result<Response<Body>, ApiError> {
    let text = serde_json::to_string(ctx.config)
        .map_err(|e| ApiError::internal(format!("config: {e}")))?;
    let masked = mask(&text, false)?;
    let data =
        RawValue::from_string(masked).map_err(|e| ApiError::internal(format!("config: {e}")))?;
    #[derive(Serialize)]
    struct Answer {
        success: bool,
        data: Box<RawValue>,
    }
    json(
        StatusCode::OK,
        &Answer {
            success: true,
            data,
        },
    )
}

/// Whether a config field holds a secret (its value is masked). Fields
/// that name where a secret lives (`*_env`, `*_file`) are shown: they are
/// how an operator checks the setup.
fn is_secret(name: &str) -> bool {
    let n = name.to_ascii_lowercase();
    if n.ends_with("_env") || n.ends_with("_file") || n.ends_with("_path") {
        return false;
    }
    ["secret", "password", "token", "api_key", "private"]
        .iter()
        .any(|s| n.contains(s))
}

/// The JSON text with the string values of secret fields replaced by
/// `"***"`, every other value kept as its exact text (amounts included).
fn mask(text: &str, secret: bool) -> Result<String, ApiError> {
    let t = text.trim();
    let bad = |e: serde_json::Error| ApiError::internal(format!("config: {e}"));
    if t.starts_with('{') {
        let fields = Fields::parse(t.as_bytes())?;
        let mut out = String::from("{");
        for (i, (k, v)) in fields.0.iter().enumerate() {
            if i > 0 {
                out.push(',');
            }
            out.push_str(&serde_json::to_string(k).map_err(bad)?);
            out.push(':');
            out.push_str(&mask(v.get(), is_secret(k))?);
        }
        out.push('}');
        Ok(out)
    } else if t.starts_with('[') {
        let items: Vec<Box<RawValue>> = serde_json::from_str(t).map_err(bad)?;
        let parts: Result<Vec<String>, ApiError> =
            items.iter().map(|v| mask(v.get(), secret)).collect();
        Ok(format!("[{}]", parts?.join(",")))
    } else if secret && t.starts_with('"') {
        Ok("\"***\"".to_owned())
    } else {
        Ok(t.to_owned())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn masks_secrets_keeps_amounts_exact() {
        let text = r#"{"a":{"webhook_secret":"whsec_1","token_env":"T","price":0.000015},"list":[{"password":"p"}],"n":null}"#;
        let out = mask(text, false).expect("masks");
        assert_eq!(
            out,
            r#"{"a":{"webhook_secret":"***","token_env":"T","price":0.000015},"list":[{"password":"***"}],"n":null}"#
        );
    }
}
