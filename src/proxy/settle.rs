//! `Settlement`: everything an admitted request holds until it ends, and
//! the one place that charges it, records it and counts it in the metrics
//! — on success, on every error, and when the client goes away.

use std::net::IpAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use http::HeaderValue;

use super::routing::Pricing;
use crate::app::App;
use crate::gate::{Permit, Reservation};
use crate::meter::{Endpoint, Usage};
use crate::money::Pico;
use crate::store::UsageRecord;

/// How far a request got towards the upstream: what it may be charged for
/// when no usage was reported.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Reach {
    /// No upstream took it (not sent yet, or every attempt failed to
    /// connect): never charged.
    NotSent,
    /// The body went to an upstream, which has not answered (yet): the
    /// upstream may be doing the work, so an abandoned or timed-out request
    /// is charged the estimate of its measured prompt.
    Sent,
    /// An upstream answered with this status.
    Answered(u16),
}

/// Settling runs exactly once: `finish` sets `done`, and `Drop` settles
/// whatever has not been (client gone, panic, an error path that returned
/// early).
pub struct Settlement {
    pub(super) app: Arc<App>,
    /// The configuration the request started on: upstream names and demo
    /// flags for the record, billing rules for a client that leaves.
    pub(super) live: Arc<crate::reload::Live>,
    /// Concurrency slot and request count, released when this is dropped.
    permit: Permit,
    reservation: Option<Reservation>,
    pricing: Pricing,
    /// Measured prompt tokens (not the reservation bound): what an estimate
    /// charges for the prompt.
    prompt_estimate: u64,
    /// Completion tokens reserved: an estimate never charges more.
    completion_bound: u64,
    route: Endpoint,
    model: String,
    /// The upstream that took the request, once one has.
    pub(super) upstream: Option<usize>,
    stream: bool,
    pub(super) reach: Reach,
    /// The status the client got when it was not the upstream's (502/504).
    pub(super) failed_status: Option<u16>,
    pub(super) started: Instant,
    pub(super) ttfb: Option<Duration>,
    request_id: HeaderValue,
    client_ip: IpAddr,
    done: bool,
}

/// What a settlement is made from.
pub struct Admitted {
    pub permit: Permit,
    pub reservation: Reservation,
    pub pricing: Pricing,
    pub prompt_estimate: u64,
    pub completion_bound: u64,
    pub route: Endpoint,
    pub model: String,
    pub stream: bool,
}

impl Settlement {
    pub fn new(
        app: &Arc<App>,
        live: &Arc<crate::reload::Live>,
        admitted: Admitted,
        started: Instant,
        request_id: &HeaderValue,
        client_ip: IpAddr,
    ) -> Settlement {
        let Admitted {
            mut permit,
            reservation,
            pricing,
            prompt_estimate,
            completion_bound,
            route,
            model,
            stream,
        } = admitted;
        // From here the request is recorded whatever happens: its count stays.
        permit.keep_count();
        app.metrics.admitted();
        Settlement {
            app: app.clone(),
            live: live.clone(),
            permit,
            reservation: Some(reservation),
            pricing,
            prompt_estimate,
            completion_bound,
            route,
            model,
            upstream: None,
            stream,
            reach: Reach::NotSent,
            failed_status: None,
            started,
            ttfb: None,
            request_id: request_id.clone(),
            client_ip,
            done: false,
        }
    }

    pub fn permit(&self) -> &Permit {
        &self.permit
    }

    /// Charges the actual cost (or a stated estimate) and records the
    /// request. `usage` is what the upstream reported; `delivered` the
    /// completion tokens estimated from what reached the client.
    pub fn finish(&mut self, usage: Option<Usage>, delivered: u64) {
        self.settle(usage.map(|u| (u, false)), delivered);
    }

    /// Charges a stream that ended before its final usage (an Anthropic
    /// stream cut, or ended by an `error` event, after `message_start`):
    /// the reported prompt, cache-write and cache-read tokens, and the
    /// larger of the reported and the delivered output (the delivered
    /// estimate within the reservation), marked estimated.
    pub fn finish_incomplete(&mut self, reported: Usage, delivered: u64) {
        let completion = reported
            .completion_tokens
            .max(delivered.min(self.completion_bound));
        let usage = Usage {
            completion_tokens: completion,
            ..reported
        };
        self.settle(Some((usage, true)), delivered);
    }

    /// `usage`: what to charge and whether it is an estimate.
    fn settle(&mut self, usage: Option<(Usage, bool)>, delivered: u64) {
        if self.done {
            return;
        }
        self.done = true;
        let status = match (self.reach, self.failed_status) {
            (Reach::Answered(s), _) => s,
            (_, Some(s)) => s,
            // Abandoned before any answer: what nginx logs for it.
            (Reach::Sent, None) => 499,
            (Reach::NotSent, None) => 502,
        };
        let ok = (200..300).contains(&status);
        let (usage, estimated) = match (usage, self.reach) {
            (Some(reported), _) => reported,
            // Never free when the upstream did work, never billed for what
            // did not happen: the measured prompt plus what was delivered.
            (None, Reach::Answered(_)) if ok => (
                Usage {
                    prompt_tokens: self.prompt_estimate,
                    completion_tokens: delivered.min(self.completion_bound),
                    ..Usage::default()
                },
                true,
            ),
            // The upstream took the body and never answered (client gone,
            // timed out): it may have done the work; the prompt was read.
            (None, Reach::Sent) => (
                Usage {
                    prompt_tokens: self.prompt_estimate,
                    ..Usage::default()
                },
                true,
            ),
            (None, _) => (Usage::default(), false),
        };
        let upstream = self.upstream.map(|i| &self.live.routing.upstreams[i]);
        let billable = match self.reach {
            Reach::NotSent => false,
            Reach::Sent => true,
            Reach::Answered(_) => ok || usage != Usage::default(),
        };
        let cost = match self.pricing {
            // Mock answers standing in for a missing upstream key are never
            // charged (demo mode).
            _ if upstream.is_some_and(|u| u.demo) => Pico::ZERO,
            _ if !billable => Pico::ZERO,
            Pricing::Tokens(p) => p.cost(&usage),
            Pricing::Flat(f) => f,
        };
        let reserved = self
            .reservation
            .as_ref()
            .map(|r| r.amount)
            .unwrap_or(Pico::ZERO);
        let key = self.permit.key().clone();
        let tokens = usage.prompt_tokens + usage.completion_tokens;
        let (charged, daily_fee, account) = match self.reservation.take() {
            Some(r) => {
                let fee = r.daily_fee.unwrap_or(Pico::ZERO);
                let account = r.account_id();
                (r.settle(cost, tokens), fee, account)
            }
            None => (Pico::ZERO, Pico::ZERO, None),
        };
        if charged > reserved {
            // The bound did not hold: charged in full, recorded (cost >
            // reserved in the record), counted and logged, never dropped.
            self.app.metrics.overrun(Pico(charged.0 - reserved.0));
            tracing::warn!(
                request_id = ?self.request_id,
                model = %self.model,
                reserved = %reserved,
                charged = %charged,
                "cost above the reservation: charged in full"
            );
        }
        // Every admitted request counts (against `max_requests` too) and is
        // recorded, also when no upstream answered (status 502/504, cost 0):
        // the live count and the store's count of records stay equal.
        let latency = self.started.elapsed();
        self.app.metrics.settled(
            self.route,
            status,
            latency,
            self.ttfb,
            &self.model,
            self.upstream,
            &usage,
            charged,
            estimated,
        );
        let upstream_name = match upstream {
            Some(u) if u.demo => format!("{} (demo mock, not charged)", u.name),
            Some(u) => u.name.clone(),
            None => String::new(),
        };
        let record = UsageRecord {
            at_ms: self.app.clock.now_ms(),
            key: key.hash,
            model: std::mem::take(&mut self.model),
            upstream: upstream_name,
            route: self.route.as_str().to_owned(),
            stream: self.stream,
            status,
            prompt_tokens: usage.prompt_tokens,
            cached_tokens: usage.cached_tokens,
            cache_write_tokens: usage.cache_write_tokens,
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
            client_ip: ip_text(self.client_ip),
            estimated,
            daily_fee,
            account,
        };
        if let Some(cluster) = self.app.cluster.get() {
            cluster.charged(&record, charged.saturating_add(daily_fee));
        }
        let seq = self.app.store.record(record);
        key.recorded(seq);
    }
}

/// The address as text; IPv4 (nearly every request) without the
/// formatting machinery, which cost more than the rest of the record.
fn ip_text(ip: IpAddr) -> String {
    let IpAddr::V4(v4) = ip else {
        return ip.to_string();
    };
    let mut out = String::with_capacity(15);
    for (i, octet) in v4.octets().into_iter().enumerate() {
        if i > 0 {
            out.push('.');
        }
        if octet >= 100 {
            out.push(char::from(b'0' + octet / 100));
        }
        if octet >= 10 {
            out.push(char::from(b'0' + octet / 10 % 10));
        }
        out.push(char::from(b'0' + octet % 10));
    }
    out
}

impl Drop for Settlement {
    fn drop(&mut self) {
        self.finish(None, 0);
    }
}

#[cfg(test)]
mod tests {
    use super::ip_text;
    use std::net::IpAddr;

    #[test]
    fn ip_text_is_what_display_writes() {
        for ip in [
            "0.0.0.0",
            "127.0.0.1",
            "10.20.100.255",
            "1.99.100.9",
            "::1",
            "2001:db8::7",
        ] {
            let ip: IpAddr = ip.parse().unwrap();
            assert_eq!(ip_text(ip), ip.to_string());
        }
        for n in (0..=u32::MAX).step_by(7_919_021) {
            let ip = IpAddr::from(n.to_be_bytes());
            assert_eq!(ip_text(ip), ip.to_string());
        }
    }
}
