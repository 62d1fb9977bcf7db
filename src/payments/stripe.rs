//! Stripe: the `Stripe-Signature` check, the events Tollgate reads, and
//! the form of a Checkout Session request.
//!
//! Only what is read is typed; every other field of an event is ignored,
//! so Stripe's API versions can add fields freely.

use std::collections::BTreeMap;

use hmac::{Hmac, Mac};
use serde::Deserialize;
use sha2::Sha256;

use crate::money::Pico;

/// How far `t` may be from our clock, either way (Stripe's default).
pub const TOLERANCE_S: i64 = 300;

/// Most `v1` signatures read from one header: a rotation has two.
const MAX_SIGNATURES: usize = 8;

/// picoUSD per cent.
const PICO_PER_CENT: i64 = crate::money::PICO_PER_USD / 100;

/// Why a signature was refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum SignatureError {
    #[error("no Stripe-Signature header")]
    Missing,
    #[error("the Stripe-Signature header is malformed")]
    Malformed,
    #[error("the signature's timestamp is more than 300 s from now")]
    Stale,
    #[error("no signature matches the body")]
    NoMatch,
}

/// A parsed `Stripe-Signature` header: `t=<unix>,v1=<hex>[,v1=…]`; other
/// schemes (`v0`) are skipped.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SignatureHeader {
    /// Unix seconds of the signing.
    pub t: i64,
    /// The candidate signatures (several during a secret rotation).
    pub v1: Vec<[u8; 32]>,
}

pub fn parse_signature(header: &str) -> Result<SignatureHeader, SignatureError> {
    let mut t = None;
    let mut v1 = Vec::new();
    for part in header.split(',') {
        let (k, v) = part
            .trim()
            .split_once('=')
            .ok_or(SignatureError::Malformed)?;
        match k {
            "t" => {
                if t.is_some() || v.is_empty() || !v.bytes().all(|b| b.is_ascii_digit()) {
                    return Err(SignatureError::Malformed);
                }
                t = Some(v.parse::<i64>().map_err(|_| SignatureError::Malformed)?);
            }
            "v1" => {
                let mut sig = [0u8; 32];
                // A v1 that is not 64 hex digits can match nothing.
                if hex::decode_to_slice(v, &mut sig).is_ok() && v1.len() < MAX_SIGNATURES {
                    v1.push(sig);
                }
            }
            _ => {}
        }
    }
    match t {
        Some(t) if !v1.is_empty() => Ok(SignatureHeader { t, v1 }),
        _ => Err(SignatureError::Malformed),
    }
}

/// The expected `v1`: HMAC-SHA256 keyed by the whole `whsec_…` secret
/// over `"{t}.{body}"`.
pub fn sign(secret: &str, t: i64, body: &[u8]) -> [u8; 32] {
    mac(secret, t, body).finalize().into_bytes().into()
}

fn mac(secret: &str, t: i64, body: &[u8]) -> Hmac<Sha256> {
    let mut mac =
        Hmac::<Sha256>::new_from_slice(secret.as_bytes()).expect("HMAC takes keys of any length");
    mac.update(t.to_string().as_bytes());
    mac.update(b".");
    mac.update(body);
    mac
}

/// Checks a delivery: the header parses, `t` is within [`TOLERANCE_S`] of
/// `now_s`, and some `v1` (compared in constant time) signs the body.
pub fn verify(
    secret: &str,
    header: Option<&str>,
    body: &[u8],
    now_s: i64,
) -> Result<(), SignatureError> {
    let h = parse_signature(header.ok_or(SignatureError::Missing)?)?;
    if (now_s - h.t).abs() > TOLERANCE_S {
        return Err(SignatureError::Stale);
    }
    let expected = mac(secret, h.t, body);
    let mut ok = false;
    for sig in &h.v1 {
        // `verify_slice` compares in constant time; every v1 is tried.
        ok |= expected.clone().verify_slice(sig).is_ok();
    }
    if ok {
        Ok(())
    } else {
        Err(SignatureError::NoMatch)
    }
}

/// An event, as far as Tollgate reads it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Event {
    /// `evt_…`: applied once.
    pub id: String,
    /// The event type, as sent.
    pub kind: String,
    /// Its object, for the types Tollgate acts on.
    pub body: EventBody,
}

/// The events Tollgate acts on, with their object.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum EventBody {
    /// `checkout.session.completed` / `checkout.session.async_payment_succeeded`.
    Checkout(CheckoutSession),
    /// `charge.refunded`.
    ChargeRefunded(Charge),
    /// `invoice.paid`.
    InvoicePaid(Invoice),
    /// `invoice.payment_failed`.
    InvoiceFailed(Invoice),
    /// `customer.subscription.updated`.
    SubscriptionUpdated(Subscription),
    /// `customer.subscription.deleted`.
    SubscriptionDeleted(Subscription),
    /// Any other type: answered 200, ignored.
    Ignored,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize)]
pub struct CheckoutSession {
    /// `cs_…`: the payment's provider id.
    pub id: String,
    /// `payment`, `subscription` or `setup`.
    #[serde(default)]
    pub mode: String,
    /// `paid`, `unpaid` or `no_payment_required`.
    #[serde(default)]
    pub payment_status: String,
    /// Smallest currency unit (cents).
    pub amount_total: Option<i64>,
    /// Lowercase ISO code; must be `payments.stripe.currency`.
    pub currency: Option<String>,
    /// The account, when `metadata.account` is absent.
    pub client_reference_id: Option<String>,
    /// `pi_…`: what a later `charge.refunded` names.
    pub payment_intent: Option<String>,
    /// `sub_…` of a subscription checkout: its `external_id`.
    pub subscription: Option<String>,
    /// `cus_…`.
    pub customer: Option<String>,
    /// `account`, `key`, `kind`, `plan`: set by our checkouts.
    #[serde(default)]
    pub metadata: BTreeMap<String, String>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize)]
pub struct Charge {
    /// `ch_…`.
    pub id: String,
    /// Cents.
    pub amount: i64,
    /// Cents refunded so far, in total.
    pub amount_refunded: i64,
    /// Lowercase ISO code.
    pub currency: String,
    /// `pi_…`: finds the payment it refunds.
    pub payment_intent: Option<String>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize)]
pub struct Invoice {
    /// `in_…`.
    pub id: String,
    /// The subscription (API versions before 2025-03 put it here).
    pub subscription: Option<String>,
    /// Newer API versions: `parent.subscription_details.subscription`.
    pub parent: Option<InvoiceParent>,
    /// Cents paid (`invoice.paid`).
    pub amount_paid: Option<i64>,
    /// Cents due (`invoice.payment_failed`).
    pub amount_due: Option<i64>,
    /// Lowercase ISO code.
    pub currency: Option<String>,
    /// `cus_…`.
    pub customer: Option<String>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize)]
pub struct InvoiceParent {
    /// Set when the invoice bills a subscription.
    pub subscription_details: Option<SubscriptionDetails>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize)]
pub struct SubscriptionDetails {
    /// `sub_…`.
    pub subscription: Option<String>,
}

impl Invoice {
    /// The subscription this invoice bills, in either API version's place.
    pub fn subscription_id(&self) -> Option<&str> {
        self.subscription.as_deref().or_else(|| {
            self.parent
                .as_ref()?
                .subscription_details
                .as_ref()?
                .subscription
                .as_deref()
        })
    }
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize)]
pub struct Subscription {
    /// `sub_…`: the subscription's `external_id`.
    pub id: String,
    /// `active`, `past_due`, `canceled`, …
    #[serde(default)]
    pub status: String,
    /// Cancels when the period ends.
    #[serde(default)]
    pub cancel_at_period_end: bool,
    /// `account`, `plan`: set by our checkouts.
    #[serde(default)]
    pub metadata: BTreeMap<String, String>,
    /// Its prices: the plan.
    pub items: Option<SubscriptionItems>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize)]
pub struct SubscriptionItems {
    /// The items, the first naming the plan's price.
    #[serde(default)]
    pub data: Vec<SubscriptionItem>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize)]
pub struct SubscriptionItem {
    /// What the item bills.
    pub price: Option<Price>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize)]
pub struct Price {
    /// `price_…`: a plan's `stripe_price`.
    pub id: String,
}

impl Subscription {
    /// The price of its first item: which plan it is on.
    pub fn price_id(&self) -> Option<&str> {
        let item = self.items.as_ref()?.data.first()?;
        Some(item.price.as_ref()?.id.as_str())
    }
}

#[derive(Deserialize)]
struct RawEvent {
    id: String,
    #[serde(rename = "type")]
    kind: String,
    data: RawData,
}

#[derive(Deserialize)]
struct RawData {
    object: Box<serde_json::value::RawValue>,
}

/// Parses an event body. Types Tollgate does not act on parse to
/// [`EventBody::Ignored`] without reading their object.
pub fn parse_event(body: &[u8]) -> Result<Event, String> {
    let raw: RawEvent =
        serde_json::from_slice(body).map_err(|e| format!("not a Stripe event: {e}"))?;
    if raw.id.is_empty() || raw.id.len() > 255 {
        return Err("the event id must be 1 to 255 characters".into());
    }
    let obj = raw.data.object.get();
    fn read<T: serde::de::DeserializeOwned>(kind: &str, obj: &str) -> Result<T, String> {
        serde_json::from_str(obj).map_err(|e| format!("{kind}: data.object: {e}"))
    }
    let body = match raw.kind.as_str() {
        "checkout.session.completed" | "checkout.session.async_payment_succeeded" => {
            EventBody::Checkout(read(&raw.kind, obj)?)
        }
        "charge.refunded" => EventBody::ChargeRefunded(read(&raw.kind, obj)?),
        "invoice.paid" => EventBody::InvoicePaid(read(&raw.kind, obj)?),
        "invoice.payment_failed" => EventBody::InvoiceFailed(read(&raw.kind, obj)?),
        "customer.subscription.updated" => EventBody::SubscriptionUpdated(read(&raw.kind, obj)?),
        "customer.subscription.deleted" => EventBody::SubscriptionDeleted(read(&raw.kind, obj)?),
        _ => EventBody::Ignored,
    };
    Ok(Event {
        id: raw.id,
        kind: raw.kind,
        body,
    })
}

/// Cents (a non-negative integer) as picoUSD, exactly.
pub fn cents_to_pico(cents: i64) -> Option<Pico> {
    if cents < 0 {
        return None;
    }
    cents.checked_mul(PICO_PER_CENT).map(Pico)
}

/// picoUSD as whole cents, if it is a whole number of cents.
pub fn pico_to_cents(p: Pico) -> Option<i64> {
    (p.0 > 0 && p.0 % PICO_PER_CENT == 0).then_some(p.0 / PICO_PER_CENT)
}

/// `application/x-www-form-urlencoded` of `pairs`, as Stripe reads it
/// (`metadata[account]=…`, brackets escaped).
pub fn form(pairs: &[(String, String)]) -> String {
    let mut out = String::new();
    for (i, (k, v)) in pairs.iter().enumerate() {
        if i > 0 {
            out.push('&');
        }
        form_escape(&mut out, k);
        out.push('=');
        form_escape(&mut out, v);
    }
    out
}

/// Percent-encodes all but the unreserved characters.
pub fn form_escape(out: &mut String, s: &str) {
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'~') {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SECRET: &str = "whsec_test_secret";
    const BODY: &[u8] = br#"{"id":"evt_1","type":"checkout.session.completed"}"#;
    const V1: &str = "a13d4b1f9003bc2fb6c06224e878b6056185eaa50d40e1e7dc05517f8af41d7b";

    #[test]
    fn the_issue_test_vector_signs_and_verifies() {
        assert_eq!(hex::encode(sign(SECRET, 1_700_000_000, BODY)), V1);
        let header = format!("t=1700000000,v1={V1}");
        assert_eq!(verify(SECRET, Some(&header), BODY, 1_700_000_000), Ok(()));
    }

    #[test]
    fn any_v1_may_match_and_other_schemes_are_skipped() {
        let bad = "0".repeat(64);
        let header = format!("t=1700000000, v0=zz, v1={bad},v1={V1}");
        assert_eq!(verify(SECRET, Some(&header), BODY, 1_700_000_000), Ok(()));
        let header = format!("t=1700000000,v1={bad}");
        assert_eq!(
            verify(SECRET, Some(&header), BODY, 1_700_000_000),
            Err(SignatureError::NoMatch)
        );
    }

    #[test]
    fn timestamps_more_than_300_s_away_either_way_are_refused() {
        let header = format!("t=1700000000,v1={V1}");
        for (now, ok) in [
            (1_700_000_300, true),
            (1_699_999_700, true),
            (1_700_000_301, false),
            (1_699_999_699, false),
        ] {
            let r = verify(SECRET, Some(&header), BODY, now);
            assert_eq!(r.is_ok(), ok, "now {now}: {r:?}");
            if !ok {
                assert_eq!(r, Err(SignatureError::Stale));
            }
        }
    }

    #[test]
    fn a_changed_body_or_secret_does_not_verify() {
        let header = format!("t=1700000000,v1={V1}");
        let tampered = br#"{"id":"evt_1","type":"checkout.session.complete"}"#;
        assert_eq!(
            verify(SECRET, Some(&header), tampered, 1_700_000_000),
            Err(SignatureError::NoMatch)
        );
        assert_eq!(
            verify("whsec_other", Some(&header), BODY, 1_700_000_000),
            Err(SignatureError::NoMatch)
        );
    }

    #[test]
    fn malformed_headers_are_refused() {
        for h in [
            "",
            "t=1700000000",
            &format!("v1={V1}"),
            &format!("t=abc,v1={V1}"),
            &format!("t=-5,v1={V1}"),
            &format!("t=1,t=2,v1={V1}"),
            "garbage",
        ] {
            assert_eq!(
                parse_signature(h).err(),
                Some(SignatureError::Malformed),
                "{h:?}"
            );
        }
        assert_eq!(verify(SECRET, None, BODY, 0), Err(SignatureError::Missing));
    }

    #[test]
    fn events_parse_to_what_tollgate_reads() {
        let e = parse_event(
            br#"{"id":"evt_2","type":"checkout.session.completed","data":{"object":{
            "id":"cs_1","mode":"payment","payment_status":"paid","amount_total":1000,
            "currency":"usd","client_reference_id":"a","payment_intent":"pi_1",
            "metadata":{"account":"a","kind":"topup"},"extra":[1,2]}}}"#,
        )
        .unwrap();
        let EventBody::Checkout(s) = e.body else {
            panic!("{e:?}")
        };
        assert_eq!(s.amount_total, Some(1000));
        assert_eq!(s.metadata["kind"], "topup");
        let e = parse_event(br#"{"id":"evt_3","type":"customer.created","data":{"object":{}}}"#)
            .unwrap();
        assert_eq!(e.body, EventBody::Ignored);
        assert!(parse_event(b"{garbage").is_err());
        assert!(
            parse_event(br#"{"id":"evt_4","type":"charge.refunded","data":{"object":{}}}"#)
                .is_err(),
            "a known type with a broken object is refused"
        );
    }

    #[test]
    fn cents_convert_exactly() {
        assert_eq!(cents_to_pico(1000), Some(Pico::usd(10)));
        assert_eq!(cents_to_pico(1), Some(Pico(10_000_000_000)));
        assert_eq!(cents_to_pico(-1), None);
        assert_eq!(cents_to_pico(i64::MAX), None);
        assert_eq!(pico_to_cents(Pico::usd(10)), Some(1000));
        assert_eq!(pico_to_cents(Pico(1)), None);
        let f = form(&[("metadata[account]".into(), "a b&c".into())]);
        assert_eq!(f, "metadata%5Baccount%5D=a%20b%26c");
    }
}
