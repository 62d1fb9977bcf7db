//! Counters for `/metrics` (Prometheus text format).
//!
//! Off the hot path: recording is a few relaxed atomic adds (plus one
//! DashMap lookup by model name); the text is rendered only when scraped.
//! No label ever carries a key or its hash.

use std::fmt::Write as _;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering::Relaxed};
use std::time::Duration;

use dashmap::DashMap;

use crate::error::{ApiError, Origin};
use crate::meter::{Endpoint, Usage};
use crate::money::Pico;
use crate::store::StoreStats;

const ROUTES: [Endpoint; 8] = [
    Endpoint::Chat,
    Endpoint::Completions,
    Endpoint::Embeddings,
    Endpoint::Responses,
    Endpoint::Messages,
    Endpoint::CountTokens,
    Endpoint::Models,
    Endpoint::Other,
];
/// Latency buckets, seconds.
const BUCKETS: [f64; 14] = [
    0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
];

/// Buckets of the gateway's own time per request (`server-timing`),
/// seconds: it is tens of microseconds, not milliseconds.
const OVERHEAD_BUCKETS: [f64; 12] = [
    0.000025, 0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.1, 1.0,
];

/// A histogram over `N` bucket bounds (`bounds`, seconds): cumulative on
/// render, per-bucket when recorded. `B` is `N + 1` (the `+Inf` bucket).
struct Histogram<const N: usize, const B: usize> {
    bounds: &'static [f64; N],
    buckets: [AtomicU64; B],
    /// Σ observed durations, nanoseconds (microseconds would lose the
    /// overhead histogram's sub-microsecond parts).
    sum_ns: AtomicU64,
}

/// Request latency and time to first byte.
type Latency = Histogram<14, 15>;
/// The gateway's own time.
type Overhead = Histogram<12, 13>;

impl Default for Latency {
    fn default() -> Self {
        Histogram::new(&BUCKETS)
    }
}

impl Default for Overhead {
    fn default() -> Self {
        Histogram::new(&OVERHEAD_BUCKETS)
    }
}

impl<const N: usize, const B: usize> Histogram<N, B> {
    fn new(bounds: &'static [f64; N]) -> Self {
        Histogram {
            bounds,
            buckets: std::array::from_fn(|_| AtomicU64::new(0)),
            sum_ns: AtomicU64::new(0),
        }
    }

    fn observe(&self, d: Duration) {
        let s = d.as_secs_f64();
        let i = self.bounds.iter().position(|b| s <= *b).unwrap_or(N);
        self.buckets[i].fetch_add(1, Relaxed);
        self.sum_ns.fetch_add(d.as_nanos() as u64, Relaxed);
    }

    fn render(&self, out: &mut String, name: &str) {
        let mut cum = 0;
        for (i, b) in self.bounds.iter().enumerate() {
            cum += self.buckets[i].load(Relaxed);
            let _ = writeln!(out, "{name}_bucket{{le=\"{b}\"}} {cum}");
        }
        cum += self.buckets[N].load(Relaxed);
        let _ = writeln!(out, "{name}_bucket{{le=\"+Inf\"}} {cum}");
        let _ = writeln!(out, "{name}_sum {}", self.sum_ns.load(Relaxed) as f64 / 1e9);
        let _ = writeln!(out, "{name}_count {cum}");
    }
}

/// Per-model token and cost counters.
#[derive(Default)]
struct ModelCounters {
    requests: AtomicU64,
    prompt: AtomicU64,
    cached: AtomicU64,
    completion: AtomicU64,
    reasoning: AtomicU64,
    cost_pico: AtomicI64,
    estimated: AtomicU64,
}

#[derive(Default)]
struct UpstreamCounters {
    requests: AtomicU64,
    failures: AtomicU64,
    failovers: AtomicU64,
}

/// An upstream metric family: name, help, and its counter.
type UpstreamFamily = (&'static str, &'static str, fn(&UpstreamCounters) -> u64);

/// Distinct model names counted apart; later ones are counted as
/// [`OTHER_MODELS`].
const MODEL_SERIES: usize = 256;
/// The series of the models past [`MODEL_SERIES`].
const OTHER_MODELS: &str = "(other)";

/// Every counter the gateway exposes.
#[derive(Default)]
pub struct Metrics {
    /// [route][status class 1xx..5xx]
    requests: [[AtomicU64; 5]; ROUTES.len()],
    latency: Latency,
    ttfb: Latency,
    /// The gateway's own time per proxied request, upstream excluded (what
    /// `server-timing: tollgate;dur=` tells the client).
    overhead: Overhead,
    /// Per-model counters: at most `MODEL_SERIES` + 1 entries.
    models: DashMap<String, ModelCounters>,
    upstreams: Vec<UpstreamCounters>,
    /// Upstream names, the `upstream` label, in index order.
    upstream_names: Vec<String>,
    /// Refusals by the error's `code` and [`Origin`]: both are fixed
    /// strings of the code, so the map is as small as the set of codes, and
    /// no label carries client text.
    rejections: DashMap<(&'static str, Origin), AtomicU64>,
    /// Admitted requests not yet settled: raised by [`Metrics::admitted`],
    /// lowered by [`Metrics::settled`], nowhere else.
    in_flight: AtomicI64,
    /// Requests charged above their reservation, and by how much in all.
    overruns: AtomicU64,
    overrun_pico: AtomicI64,
}

impl Metrics {
    pub fn new(upstream_names: Vec<String>) -> Metrics {
        Metrics {
            upstreams: upstream_names
                .iter()
                .map(|_| UpstreamCounters::default())
                .collect(),
            upstream_names,
            ..Metrics::default()
        }
    }

    /// A settled request cost more than its reservation (charged in full).
    pub fn overrun(&self, by: Pico) {
        self.overruns.fetch_add(1, Relaxed);
        self.overrun_pico.fetch_add(by.0, Relaxed);
    }

    /// A request was admitted: it is in flight until settled.
    pub fn admitted(&self) {
        self.in_flight.fetch_add(1, Relaxed);
    }

    /// Admitted requests not yet settled.
    pub fn in_flight(&self) -> i64 {
        self.in_flight.load(Relaxed)
    }

    /// An admitted request settled: answered, metered, no longer in flight.
    #[allow(clippy::too_many_arguments)]
    pub fn settled(
        &self,
        route: Endpoint,
        status: u16,
        latency: Duration,
        ttfb: Option<Duration>,
        model: &str,
        upstream: Option<usize>,
        usage: &Usage,
        cost: Pico,
        estimated: bool,
    ) {
        self.in_flight.fetch_sub(1, Relaxed);
        self.answered(route, status, latency, ttfb);
        self.metered(model, upstream, usage, cost, estimated);
    }

    /// A request answered (by the upstream or by the gateway).
    pub fn answered(
        &self,
        route: Endpoint,
        status: u16,
        latency: Duration,
        ttfb: Option<Duration>,
    ) {
        let r = ROUTES.iter().position(|x| *x == route).unwrap_or(4);
        let class = ((status / 100).clamp(1, 5) - 1) as usize;
        self.requests[r][class].fetch_add(1, Relaxed);
        self.latency.observe(latency);
        if let Some(t) = ttfb {
            self.ttfb.observe(t);
        }
    }

    /// The gateway's own time on one proxied request (upstream excluded).
    pub fn overhead(&self, d: Duration) {
        self.overhead.observe(d);
    }

    /// A request refused by the gateway, by code and origin.
    pub fn rejected(&self, e: &ApiError) {
        let key = (e.code, e.origin);
        if let Some(n) = self.rejections.get(&key) {
            n.fetch_add(1, Relaxed);
            return;
        }
        self.rejections
            .entry(key)
            .or_default()
            .fetch_add(1, Relaxed);
    }

    /// Tokens and cost of a settled request.
    fn metered(
        &self,
        model: &str,
        upstream: Option<usize>,
        usage: &Usage,
        cost: Pico,
        estimated: bool,
    ) {
        if let Some(u) = upstream.and_then(|i| self.upstreams.get(i)) {
            u.requests.fetch_add(1, Relaxed);
        }
        if model.is_empty() {
            return;
        }
        let record = |m: &ModelCounters| {
            m.requests.fetch_add(1, Relaxed);
            m.prompt.fetch_add(usage.prompt_tokens, Relaxed);
            m.cached.fetch_add(usage.cached_tokens, Relaxed);
            m.completion.fetch_add(usage.completion_tokens, Relaxed);
            m.reasoning.fetch_add(usage.reasoning_tokens, Relaxed);
            m.cost_pico.fetch_add(cost.0, Relaxed);
            if estimated {
                m.estimated.fetch_add(1, Relaxed);
            }
        };
        // Models are the configured ones or, under `default_price_models`
        // globs, names a client chose: past `MODEL_SERIES` of them the rest
        // share one series, so neither memory nor the scrape grows with them.
        if let Some(m) = self.models.get(model) {
            record(&m);
            return;
        }
        let name = if self.models.len() < MODEL_SERIES {
            model
        } else {
            OTHER_MODELS
        };
        record(&self.models.entry(name.to_owned()).or_default());
    }

    /// An upstream failed; `failover` when another one is tried next.
    pub fn upstream_failed(&self, upstream: usize, failover: bool) {
        if let Some(u) = self.upstreams.get(upstream) {
            u.failures.fetch_add(1, Relaxed);
            if failover {
                u.failovers.fetch_add(1, Relaxed);
            }
        }
    }

    /// The Prometheus text exposition.
    pub fn render(&self, keys_cached: usize, s: &StoreStats) -> String {
        let mut out = String::with_capacity(8192);
        out.push_str("# HELP tollgate_requests_total Requests answered, by route and status class.\n# TYPE tollgate_requests_total counter\n");
        for (r, route) in ROUTES.iter().enumerate() {
            for c in 0..5 {
                let n = self.requests[r][c].load(Relaxed);
                let _ = writeln!(
                    out,
                    "tollgate_requests_total{{route=\"{}\",status=\"{}xx\"}} {n}",
                    route.as_str(),
                    c + 1
                );
            }
        }
        out.push_str("# HELP tollgate_request_duration_seconds Time from request to the end of the answer.\n# TYPE tollgate_request_duration_seconds histogram\n");
        self.latency
            .render(&mut out, "tollgate_request_duration_seconds");
        out.push_str("# HELP tollgate_time_to_first_byte_seconds Time from request to the first byte of the upstream's body.\n# TYPE tollgate_time_to_first_byte_seconds histogram\n");
        self.ttfb
            .render(&mut out, "tollgate_time_to_first_byte_seconds");
        out.push_str("# HELP tollgate_overhead_seconds The gateway's own time per proxied request, upstream excluded (the server-timing header).\n# TYPE tollgate_overhead_seconds histogram\n");
        self.overhead.render(&mut out, "tollgate_overhead_seconds");
        out.push_str("# HELP tollgate_overruns_total Requests whose actual cost exceeded their reservation (charged in full).\n# TYPE tollgate_overruns_total counter\n");
        let _ = writeln!(
            out,
            "tollgate_overruns_total {}",
            self.overruns.load(Relaxed)
        );
        out.push_str("# HELP tollgate_overrun_usd_total What those requests cost above their reservations.\n# TYPE tollgate_overrun_usd_total counter\n");
        let _ = writeln!(
            out,
            "tollgate_overrun_usd_total {}",
            Pico(self.overrun_pico.load(Relaxed))
        );
        out.push_str("# HELP tollgate_in_flight_requests Admitted requests not yet settled.\n# TYPE tollgate_in_flight_requests gauge\n");
        let _ = writeln!(
            out,
            "tollgate_in_flight_requests {}",
            self.in_flight.load(Relaxed).max(0)
        );
        out.push_str("# HELP tollgate_rejections_total Requests refused by the gateway, by error code and origin (client, upstream, internal).\n# TYPE tollgate_rejections_total counter\n");
        let mut rejections: Vec<(&str, &str, u64)> = self
            .rejections
            .iter()
            .map(|e| (e.key().0, e.key().1.as_str(), e.value().load(Relaxed)))
            .collect();
        rejections.sort_unstable();
        for (code, origin, n) in rejections {
            let _ = writeln!(
                out,
                "tollgate_rejections_total{{code=\"{code}\",origin=\"{origin}\"}} {n}"
            );
        }
        let mut models: Vec<(String, [u64; 6], i64)> = self
            .models
            .iter()
            .map(|e| {
                let m = e.value();
                (
                    e.key().clone(),
                    [
                        m.requests.load(Relaxed),
                        m.prompt.load(Relaxed),
                        m.cached.load(Relaxed),
                        m.completion.load(Relaxed),
                        m.reasoning.load(Relaxed),
                        m.estimated.load(Relaxed),
                    ],
                    m.cost_pico.load(Relaxed),
                )
            })
            .collect();
        models.sort_by(|a, b| a.0.cmp(&b.0));
        out.push_str("# HELP tollgate_tokens_total Tokens metered, by model and kind.\n# TYPE tollgate_tokens_total counter\n");
        for (model, n, _) in &models {
            let model = escape(model);
            for (kind, v) in [
                ("prompt", n[1]),
                ("cached", n[2]),
                ("completion", n[3]),
                ("reasoning", n[4]),
            ] {
                let _ = writeln!(
                    out,
                    "tollgate_tokens_total{{model=\"{model}\",kind=\"{kind}\"}} {v}"
                );
            }
        }
        out.push_str("# HELP tollgate_cost_usd_total Money charged, by model (exact decimal).\n# TYPE tollgate_cost_usd_total counter\n");
        for (model, _, cost) in &models {
            let _ = writeln!(
                out,
                "tollgate_cost_usd_total{{model=\"{}\"}} {}",
                escape(model),
                Pico(*cost)
            );
        }
        out.push_str("# HELP tollgate_metered_requests_total Settled requests, by model.\n# TYPE tollgate_metered_requests_total counter\n");
        for (model, n, _) in &models {
            let _ = writeln!(
                out,
                "tollgate_metered_requests_total{{model=\"{}\"}} {}",
                escape(model),
                n[0]
            );
        }
        out.push_str("# HELP tollgate_estimated_requests_total Requests charged from an estimate (no usage reported), by model.\n# TYPE tollgate_estimated_requests_total counter\n");
        for (model, n, _) in &models {
            let _ = writeln!(
                out,
                "tollgate_estimated_requests_total{{model=\"{}\"}} {}",
                escape(model),
                n[5]
            );
        }
        // One group per metric family, as the text format requires.
        let families: [UpstreamFamily; 3] = [
            (
                "tollgate_upstream_requests_total",
                "Requests answered by each upstream.",
                |c| c.requests.load(Relaxed),
            ),
            (
                "tollgate_upstream_failures_total",
                "Upstream attempts that failed (connection error, timeout, 5xx; 429 when failing over).",
                |c| c.failures.load(Relaxed),
            ),
            (
                "tollgate_upstream_failovers_total",
                "Failed upstream attempts followed by another upstream.",
                |c| c.failovers.load(Relaxed),
            ),
        ];
        for (family, help, value) in families {
            let _ = writeln!(out, "# HELP {family} {help}\n# TYPE {family} counter");
            for (name, c) in self.upstream_names.iter().zip(&self.upstreams) {
                let _ = writeln!(
                    out,
                    "{family}{{upstream=\"{}\"}} {}",
                    escape(name),
                    value(c)
                );
            }
        }
        out.push_str("# HELP tollgate_store_queue_depth Writes queued and not yet done (a record: until its batch is on disk).\n# TYPE tollgate_store_queue_depth gauge\n");
        let _ = writeln!(out, "tollgate_store_queue_depth {}", s.queue_depth);
        out.push_str("# HELP tollgate_store_batches_total Batches committed by the store thread.\n# TYPE tollgate_store_batches_total counter\n");
        let _ = writeln!(out, "tollgate_store_batches_total {}", s.batches);
        out.push_str("# HELP tollgate_store_records_total Usage records committed.\n# TYPE tollgate_store_records_total counter\n");
        let _ = writeln!(out, "tollgate_store_records_total {}", s.records_written);
        out.push_str("# HELP tollgate_store_last_batch_size Ops in the last committed batch.\n# TYPE tollgate_store_last_batch_size gauge\n");
        let _ = writeln!(out, "tollgate_store_last_batch_size {}", s.last_batch_size);
        out.push_str("# HELP tollgate_store_write_errors_total Store commits and flushes that failed (the batch is kept and retried).\n# TYPE tollgate_store_write_errors_total counter\n");
        let _ = writeln!(out, "tollgate_store_write_errors_total {}", s.write_errors);
        out.push_str("# HELP tollgate_store_flush_seconds Time spent applying and flushing batches.\n# TYPE tollgate_store_flush_seconds summary\n");
        let _ = writeln!(
            out,
            "tollgate_store_flush_seconds_sum {}",
            s.flush_us_sum as f64 / 1e6
        );
        let _ = writeln!(out, "tollgate_store_flush_seconds_count {}", s.flush_count);
        out.push_str(
            "# HELP tollgate_keys_cached Keys held in memory.\n# TYPE tollgate_keys_cached gauge\n",
        );
        let _ = writeln!(out, "tollgate_keys_cached {}", keys_cached);
        out.push_str(
            "# HELP tollgate_keys_stored Keys in the store.\n# TYPE tollgate_keys_stored gauge\n",
        );
        let _ = writeln!(out, "tollgate_keys_stored {}", s.keys);
        out
    }
}

/// Escapes a label value (`\`, `"`, newline).
fn escape(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Client-chosen model names (allowed by a `default_price_models` glob)
    /// cannot grow the per-model map without bound.
    #[test]
    fn model_series_are_capped() {
        let m = Metrics::new(vec!["up".to_owned()]);
        let usage = Usage::default();
        for i in 0..MODEL_SERIES + 50 {
            m.metered(&format!("gpt-{i}"), None, &usage, Pico(1), false);
        }
        assert_eq!(m.models.len(), MODEL_SERIES + 1);
        let other = m.models.get(OTHER_MODELS).expect("the shared series");
        assert_eq!(other.requests.load(Relaxed), 50);
        drop(other);
        m.metered("gpt-0", None, &usage, Pico(1), false);
        assert_eq!(
            m.models.get("gpt-0").expect("kept").requests.load(Relaxed),
            2
        );
    }
}
