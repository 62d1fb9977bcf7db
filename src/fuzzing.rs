//! Properties that must hold for any input, shared by the cargo-fuzz
//! targets in `fuzz/` and by `tests/fuzz_corpus.rs` (which replays the
//! committed corpus on every `cargo test`). Each function panics when its
//! property breaks.

use bytes::Bytes;

use crate::meter::{self, Endpoint, Framing, Meter, Rewrite};
use crate::money::Pico;

const ENDPOINTS: [Endpoint; 8] = [
    Endpoint::Chat,
    Endpoint::Completions,
    Endpoint::Embeddings,
    Endpoint::Responses,
    Endpoint::Other,
    Endpoint::Messages,
    Endpoint::Models,
    Endpoint::CountTokens,
];

/// Byte 0 picks the endpoint, byte 1 the rewrite, the rest is the body.
/// `inspect` never panics; after a rewrite, the body is valid JSON that
/// `inspect` reads back with the rewritten values and everything else equal.
pub fn inspect_request(data: &[u8]) {
    let [route_byte, rewrite_byte, body @ ..] = data else {
        return;
    };
    let endpoint = ENDPOINTS[usize::from(*route_byte) % ENDPOINTS.len()];
    let Ok(info) = meter::inspect(endpoint, body) else {
        return;
    };
    assert!(info.prompt_estimate() <= info.prompt_token_bound());
    let rw = Rewrite {
        include_usage: rewrite_byte & 1 == 1,
        max_tokens: match (rewrite_byte >> 1) & 3 {
            0 => None,
            1 => Some(0),
            2 => Some(u64::from(rewrite_byte >> 3)),
            _ => Some(u64::MAX - u64::from(rewrite_byte >> 3)),
        },
    };
    let body = Bytes::copy_from_slice(body);
    let out = meter::rewrite(endpoint, &body, &rw).expect("rewrite of an inspected body");
    if rw == Rewrite::default() {
        assert_eq!(out, body, "a no-op rewrite changed the body");
    }
    if matches!(
        endpoint,
        Endpoint::Other | Endpoint::Models | Endpoint::CountTokens
    ) {
        assert_eq!(out, body, "loosely read bodies are never rewritten");
        return;
    }
    serde_json::from_slice::<serde::de::IgnoredAny>(&out).expect("rewrite yields valid JSON");
    let back = meter::inspect(endpoint, &out).expect("inspect reads a rewritten body");
    let mut expected = info.clone();
    if rw.include_usage && matches!(endpoint, Endpoint::Chat | Endpoint::Completions) {
        expected.include_usage = true;
    }
    if let Some(m) = rw.max_tokens {
        if matches!(
            endpoint,
            Endpoint::Chat | Endpoint::Completions | Endpoint::Responses | Endpoint::Messages
        ) {
            expected.max_tokens = Some(m);
        }
    }
    assert_eq!(back, expected, "rewrite {rw:?} of {endpoint:?}");
}

/// Byte 0 picks the endpoint, byte 1 the frame sizes, the rest is an SSE
/// stream. Splitting into frames changes nothing: pass-through output is the
/// input, usage and estimates equal the single-frame ones, withheld output
/// equals the single-frame withheld output.
pub fn sse_meter(data: &[u8]) {
    let [route_byte, split_seed, stream @ ..] = data else {
        return;
    };
    let endpoint = ENDPOINTS[usize::from(*route_byte) % ENDPOINTS.len()];
    let whole = Bytes::copy_from_slice(stream);
    let frames = split(&whole, *split_seed);
    for framing in [Framing::Sse, Framing::Json] {
        for withhold in [false, true] {
            let mut one = Meter::new(endpoint, framing, withhold);
            let mut one_out = one.on_frame(whole.clone()).to_vec();
            one_out.extend_from_slice(&one.finish());

            let mut many = Meter::new(endpoint, framing, withhold);
            let mut many_out = Vec::with_capacity(stream.len());
            for f in &frames {
                let out = many.on_frame(f.clone());
                if !withhold || framing == Framing::Json {
                    assert_eq!(&out, f, "pass-through changed a frame");
                }
                many_out.extend_from_slice(&out);
            }
            many_out.extend_from_slice(&many.finish());

            if !withhold || framing == Framing::Json {
                assert_eq!(one_out, stream, "pass-through output differs from input");
            }
            assert_eq!(many_out, one_out, "output depends on frame splits");
            assert_eq!(many.usage(), one.usage(), "usage depends on frame splits");
            assert_eq!(
                many.delivered_completion_estimate(),
                one.delivered_completion_estimate()
            );
            assert_eq!(many.bytes_seen(), stream.len() as u64);
            assert_eq!(
                many.usage_incomplete(),
                one.usage_incomplete(),
                "completeness depends on frame splits"
            );
            if let Some(u) = one.usage() {
                assert!(u.cached_tokens <= u.prompt_tokens);
                assert!(u.cached_tokens + u.cache_write_tokens <= u.prompt_tokens);
                assert!(u.cache_write_1h_tokens <= u.cache_write_tokens);
                assert!(u.reasoning_tokens <= u.completion_tokens);
            }
        }
    }
}

/// Frames of lengths drawn from `seed` (1 to 64 bytes, some empty).
fn split(whole: &Bytes, seed: u8) -> Vec<Bytes> {
    let mut frames = Vec::new();
    let mut state = u32::from(seed).wrapping_mul(2_654_435_761).wrapping_add(1);
    let mut at = 0;
    while at < whole.len() {
        state ^= state << 13;
        state ^= state >> 17;
        state ^= state << 5;
        let len = match state % 8 {
            0 => 0,
            1 => 1,
            _ => (state >> 8) as usize % 64 + 1,
        };
        let end = (at + len).min(whole.len());
        frames.push(whole.slice(at..end));
        at = end;
    }
    frames
}

/// Decimal USD text round-trips exactly through `Pico`.
pub fn money_roundtrip(data: &[u8]) {
    if let Ok(text) = std::str::from_utf8(data) {
        if let Ok(p) = Pico::parse_usd(text) {
            let formatted = p.to_usd_string();
            assert_eq!(
                Pico::parse_usd(&formatted),
                Ok(p),
                "{text:?} → {formatted:?}"
            );
        }
    }
    let mut word = [0u8; 8];
    let n = data.len().min(8);
    word[..n].copy_from_slice(&data[..n]);
    for x in [i64::from_le_bytes(word), i64::from_be_bytes(word)] {
        let formatted = Pico(x).to_usd_string();
        assert_eq!(
            Pico::parse_usd(&formatted),
            Ok(Pico(x)),
            "{x} → {formatted:?}"
        );
    }
}

/// Admin request parsing (create/patch bodies, credits, imported keys,
/// `{hash}` path segments): never panics, and what is accepted is in range.
pub fn admin_request(data: &[u8]) {
    crate::api::fuzz_admin(data);
}

/// Key extraction from request headers. The bytes are read as header lines
/// (`name: value`); lines that are not valid headers are skipped, as hyper
/// would refuse them. A key found is non-empty, at most 256 bytes, trimmed,
/// and is the value (or the Bearer token) of one of the headers given.
pub fn key_headers(data: &[u8]) {
    let mut headers = http::HeaderMap::new();
    for line in data.split(|b| *b == b'\n') {
        let Some(colon) = line.iter().position(|b| *b == b':') else {
            continue;
        };
        let (name, value) = (&line[..colon], &line[colon + 1..]);
        let value = value.strip_prefix(b" ").unwrap_or(value);
        if let (Ok(n), Ok(v)) = (
            http::HeaderName::from_bytes(name),
            http::HeaderValue::from_bytes(value),
        ) {
            headers.append(n, v);
        }
    }
    if let Ok(Some(key)) = crate::gate::key_from_headers(&headers) {
        assert!(
            !key.is_empty() && key.len() <= 256,
            "key length {}",
            key.len()
        );
        assert_eq!(key, key.trim());
        assert!(
            headers
                .values()
                .any(|v| v.as_bytes().windows(key.len()).any(|w| w == key.as_bytes())),
            "the key must come from a header"
        );
        assert_eq!(crate::gate::hash_key(key), crate::gate::hash_key(key));
    }
}

/// The path an upstream that normalises like ASGI or Go servers routes on:
/// every escape decoded, then `//`, `.` and `..` resolved.
fn upstream_view(path: &str) -> Vec<u8> {
    let raw = path.as_bytes();
    let mut decoded = Vec::with_capacity(raw.len());
    let mut i = 0;
    while i < raw.len() {
        let byte = (raw[i] == b'%')
            .then(|| raw.get(i + 1..i + 3))
            .flatten()
            .and_then(|h| std::str::from_utf8(h).ok())
            .and_then(|h| u8::from_str_radix(h, 16).ok());
        match byte {
            Some(b) => {
                decoded.push(b);
                i += 3;
            }
            None => {
                decoded.push(raw[i]);
                i += 1;
            }
        }
    }
    let mut segments: Vec<&[u8]> = Vec::new();
    for seg in decoded.split(|b| *b == b'/') {
        match seg {
            b"" | b"." => {}
            b".." => {
                segments.pop();
            }
            s => segments.push(s),
        }
    }
    segments.join(&b'/')
}

/// `classify` never panics; a path it accepts is canonical (under `/v1/`, no
/// empty, `.` or `..` segment, no `;`, `\`, NUL or encoded `/`), classifying
/// it again gives the same answer, and an upstream that normalises paths
/// routes the raw path and the canonical path to the same place.
pub fn canonical_path(data: &[u8]) {
    let Ok(raw) = std::str::from_utf8(data) else {
        return;
    };
    let Ok((endpoint, canonical)) = meter::classify(raw) else {
        return;
    };
    let c = canonical.as_str();
    assert!(c.starts_with("/v1/"), "{c:?}");
    assert!(
        c[1..]
            .split('/')
            .all(|s| !s.is_empty() && s != "." && s != ".."),
        "{c:?}"
    );
    assert!(!c.contains([';', '\\', '\0']), "{c:?}");
    assert!(!c.to_ascii_lowercase().contains("%2f"), "{c:?}");
    let again = meter::classify(c).expect("a canonical path is accepted");
    assert_eq!(
        again,
        (endpoint, canonical.clone()),
        "classify is idempotent"
    );
    assert_eq!(
        upstream_view(raw),
        upstream_view(c),
        "{raw:?} and {c:?} reach different upstream routes"
    );
}

/// The `Stripe-Signature` parser and check (issue 11). The input is the
/// header up to the first newline, the rest is the body. Never panics; a
/// header that parses has a numeric `t` and 1 to 8 `v1`s; a header made
/// by signing the body verifies, and no other body does with it.
pub fn stripe_signature(data: &[u8]) {
    use crate::payments::stripe;
    let split = data.iter().position(|b| *b == b'\n').unwrap_or(data.len());
    let (header, body) = (&data[..split], data.get(split + 1..).unwrap_or(&[]));
    if let Ok(text) = std::str::from_utf8(header) {
        if let Ok(h) = stripe::parse_signature(text) {
            assert!(h.t >= 0);
            assert!(!h.v1.is_empty() && h.v1.len() <= 8);
            // Whatever it says, it is checked against our clock.
            let _ = stripe::verify("whsec_fuzz", Some(text), body, h.t);
        }
        let _ = stripe::verify("whsec_fuzz", Some(text), body, 1_700_000_000);
    }
    let t = 1_700_000_000;
    let good = format!(
        "t={t},v1={}",
        hex::encode(stripe::sign("whsec_fuzz", t, body))
    );
    assert_eq!(stripe::verify("whsec_fuzz", Some(&good), body, t), Ok(()));
    let mut other = body.to_vec();
    other.push(b'x');
    assert!(stripe::verify("whsec_fuzz", Some(&good), &other, t).is_err());
}

/// The Stripe event parser and the top-up rule (issue 11): never panics;
/// an event that parses has an id of 1 to 255 bytes; a checkout it turns
/// into a credit is paid, of a positive whole number of cents, in the
/// configured currency, with `metadata.kind = "topup"`.
pub fn stripe_event(data: &[u8]) {
    use crate::payments::stripe::{self, EventBody};
    let Ok(event) = stripe::parse_event(data) else {
        return;
    };
    assert!(!event.id.is_empty() && event.id.len() <= 255);
    let cfg = crate::config::StripeConfig {
        secret_key_env: String::new(),
        webhook_secret_env: String::new(),
        api_base: String::new(),
        success_url: None,
        cancel_url: None,
        currency: "usd".into(),
    };
    if let EventBody::Checkout(s) = &event.body
        && let Some(crate::store::PaymentOp::Record {
            refs,
            payment,
            credit,
        }) = crate::payments::checkout_payment(&cfg, &event.id, s, 0)
    {
        assert!(refs.iter().any(|r| *r == format!("evt:{}", event.id)));
        if credit.is_some() {
            assert_eq!(s.payment_status, "paid");
            assert!(payment.amount.0 > 0);
            assert_eq!(
                Some(payment.amount),
                s.amount_total.and_then(stripe::cents_to_pico)
            );
            assert!(payment.currency.eq_ignore_ascii_case("usd"));
            assert_eq!(s.metadata.get("kind").map(String::as_str), Some("topup"));
        }
    }
    if let EventBody::ChargeRefunded(c) = &event.body
        && let crate::store::PaymentOp::Refund { refunded_total, .. } =
            crate::payments::charge_refunded(&cfg, &event.id, c, 0)
    {
        assert!(refunded_total.0 >= 0);
    }
}

/// The epay parameter parser and signature (issue 11): never panics;
/// parsed parameters have distinct names; the signature does not depend
/// on their order; a notification read from them has `money` ≥ 0; an
/// external order's credits are positive.
pub fn epay_params(data: &[u8]) {
    use crate::payments::epay;
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let Ok(params) = epay::parse_params(text) else {
        return;
    };
    for (i, (k, _)) in params.iter().enumerate() {
        assert!(params[..i].iter().all(|(p, _)| p != k), "duplicate {k:?}");
    }
    let mut reversed = params.clone();
    reversed.reverse();
    assert_eq!(epay::sign(&params, "KEY"), epay::sign(&reversed, "KEY"));
    let mut signed = params.clone();
    signed.retain(|(k, _)| k != "sign");
    let sig = epay::sign(&signed, "KEY");
    signed.push(("sign".into(), sig));
    assert!(epay::verify(&signed, "KEY"));
    if let Ok(n) = epay::Notification::from_params(&params) {
        assert!(n.money.0 >= 0);
        if let Some(p) = &n.param
            && let Ok(ext) = epay::parse_external(p)
        {
            assert!(ext.credits.0 > 0);
        }
    }
}

/// A webhook secret from any text: parsing never panics, and a secret
/// that parses signs deterministically in the Standard Webhooks shape
/// (`v1,` + 44 base64 characters of a 32-byte HMAC).
pub fn webhook_secret(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let Ok(secret) = crate::events::signature::WebhookSecret::parse(text) else {
        return;
    };
    let a = secret.sign("msg_1", 1_614_265_330, data);
    assert_eq!(a, secret.sign("msg_1", 1_614_265_330, data));
    assert!(a.starts_with("v1,") && a.len() == 3 + 44, "{a}");
}

/// The plain-HTTP upstream client's answer reader: byte 0 picks how the
/// answer arrives (pieces of 1 to 16 bytes) and the method, the rest is
/// the answer. Never panics; the same head, body bytes and ending whatever
/// the pieces.
pub fn h1_answer(data: &[u8]) {
    crate::proxy::h1pool::answer_property(data);
}
