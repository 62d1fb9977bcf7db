//! epay (易支付): the md5 signature, the notification's parameters, and
//! the signed payment URL of an order.
//!
//! The signature: drop `sign`, `sign_type` and empty values, sort by key,
//! join as `k=v&…` without URL encoding, append the merchant key, md5,
//! lowercase hex.

use md5::{Digest, Md5};
use serde::Deserialize;
use subtle::ConstantTimeEq;

use crate::money::Pico;

/// Most parameters one notification may carry.
const MAX_PARAMS: usize = 64;

/// The string the md5 is taken over, without the key.
fn sign_base(params: &[(String, String)]) -> String {
    let mut kept: Vec<&(String, String)> = params
        .iter()
        .filter(|(k, v)| k != "sign" && k != "sign_type" && !v.is_empty())
        .collect();
    kept.sort_by(|a, b| a.0.cmp(&b.0));
    let mut out = String::new();
    for (i, (k, v)) in kept.into_iter().enumerate() {
        if i > 0 {
            out.push('&');
        }
        out.push_str(k);
        out.push('=');
        out.push_str(v);
    }
    out
}

/// The signature of `params` under the merchant `key`.
pub fn sign(params: &[(String, String)], key: &str) -> String {
    let mut h = Md5::new();
    h.update(sign_base(params).as_bytes());
    h.update(key.as_bytes());
    hex::encode(h.finalize())
}

/// Whether `params` carry a `sign` that matches, compared in constant time.
pub fn verify(params: &[(String, String)], key: &str) -> bool {
    let Some((_, given)) = params.iter().find(|(k, _)| k == "sign") else {
        return false;
    };
    let expected = sign(params, key);
    let given = given.to_ascii_lowercase();
    given.len() == expected.len() && bool::from(given.as_bytes().ct_eq(expected.as_bytes()))
}

/// `k=v&…` (a query string or a form body) as decoded pairs. Refuses
/// undecodable text, too many parameters and a repeated name (which
/// value was signed would be ambiguous).
pub fn parse_params(text: &str) -> Result<Vec<(String, String)>, String> {
    let mut out: Vec<(String, String)> = Vec::new();
    for pair in text.split('&').filter(|p| !p.is_empty()) {
        if out.len() >= MAX_PARAMS {
            return Err(format!("more than {MAX_PARAMS} parameters"));
        }
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        let k = crate::api::percent_decode(k).ok_or("a parameter name is malformed")?;
        let v = crate::api::percent_decode(v).ok_or_else(|| format!("`{k}` is malformed"))?;
        if out.iter().any(|(seen, _)| *seen == k) {
            return Err(format!("`{k}` appears twice"));
        }
        out.push((k, v));
    }
    Ok(out)
}

/// A payment notification, its fields read (the signature is checked
/// separately, over all parameters).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Notification {
    /// The merchant: must be ours.
    pub pid: String,
    /// The provider's trade number: external orders apply once per it.
    pub trade_no: String,
    /// Our order number (or the operator's shop's).
    pub out_trade_no: String,
    /// `money` exactly, as USD.
    pub money: Pico,
    /// `TRADE_SUCCESS` when paid.
    pub trade_status: String,
    /// `alipay`, `wxpay`, …
    pub pay_type: String,
    /// The shop's own JSON, if any (seed 002's external orders).
    pub param: Option<String>,
}

impl Notification {
    pub fn from_params(params: &[(String, String)]) -> Result<Notification, String> {
        let get = |name: &str| {
            params
                .iter()
                .find(|(k, _)| k == name)
                .map(|(_, v)| v.as_str())
        };
        let need = |name: &str| {
            get(name)
                .filter(|v| !v.is_empty())
                .map(str::to_owned)
                .ok_or_else(|| format!("`{name}` is missing"))
        };
        let money_text = need("money")?;
        let money = Pico::parse_usd_non_negative(&money_text)
            .map_err(|_| format!("`money` {money_text:?} is not an amount"))?;
        Ok(Notification {
            pid: need("pid")?,
            trade_no: need("trade_no")?,
            out_trade_no: need("out_trade_no")?,
            money,
            trade_status: need("trade_status")?,
            pay_type: get("type").unwrap_or("").to_owned(),
            param: get("param").filter(|p| !p.is_empty()).map(str::to_owned),
        })
    }
}

/// What kind of external order a `param` is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ExternalKind {
    /// The first payment: also issues the account's first key.
    Activation,
    /// More credit.
    Recharge,
}

/// Seed 002's `param`: `{email, type, credits, original_amount}`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ExternalOrder {
    /// Finds the account to credit.
    pub email: String,
    /// Activation or recharge.
    pub kind: ExternalKind,
    /// USD to credit.
    pub credits: Pico,
}

#[derive(Deserialize)]
struct RawExternal<'a> {
    email: String,
    #[serde(rename = "type")]
    kind: ExternalKind,
    #[serde(borrow)]
    credits: &'a serde_json::value::RawValue,
}

/// Reads a `param`; `credits` may be a JSON number or a decimal string,
/// read exactly.
pub fn parse_external(param: &str) -> Result<ExternalOrder, String> {
    let raw: RawExternal<'_> =
        serde_json::from_str(param).map_err(|e| format!("`param` is not an order: {e}"))?;
    let text = raw.credits.get().trim();
    let text = text
        .strip_prefix('"')
        .and_then(|t| t.strip_suffix('"'))
        .unwrap_or(text);
    let credits = Pico::parse_usd_non_negative(text)
        .ok()
        .filter(|c| c.0 > 0)
        .ok_or_else(|| format!("`credits` {text:?} is not a positive amount"))?;
    if raw.email.is_empty() || raw.email.len() > 256 {
        return Err("`email` must be 1 to 256 characters".into());
    }
    Ok(ExternalOrder {
        email: raw.email,
        kind: raw.kind,
        credits,
    })
}

/// `money` as epay writes it: two decimals.
pub fn money_text(amount: Pico) -> Option<String> {
    let cents = super::stripe::pico_to_cents(amount)?;
    Some(format!("{}.{:02}", cents / 100, cents % 100))
}

/// The signed URL that sends the payer to pay an order.
pub fn payment_url(submit_url: &str, params: &[(String, String)], key: &str) -> String {
    let mut all = params.to_vec();
    all.push(("sign".into(), sign(params, key)));
    all.push(("sign_type".into(), "MD5".into()));
    let sep = if submit_url.contains('?') { '&' } else { '?' };
    format!("{submit_url}{sep}{}", super::stripe::form(&all))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vector() -> Vec<(String, String)> {
        parse_params(
            "money=10.00&name=TUC10&out_trade_no=USR1NOabc1700000000&pid=1001\
             &trade_no=2024010112345&trade_status=TRADE_SUCCESS&type=alipay",
        )
        .unwrap()
    }

    #[test]
    fn the_issue_test_vector_signs() {
        assert_eq!(
            sign(&vector(), "KEY123"),
            "36f114263fc2e0e782c3d139443d84ce"
        );
        // Order, sign, sign_type and empty values do not change it.
        let mut p = vector();
        p.reverse();
        p.push(("sign_type".into(), "MD5".into()));
        p.push(("param".into(), String::new()));
        p.push(("sign".into(), "36F114263FC2E0E782C3D139443D84CE".into()));
        assert_eq!(sign(&p, "KEY123"), "36f114263fc2e0e782c3d139443d84ce");
        assert!(verify(&p, "KEY123"));
        assert!(!verify(&p, "KEY124"));
        p[0].1.push('0');
        assert!(!verify(&p, "KEY123"), "a changed value");
    }

    #[test]
    fn params_decode_and_refuse_repeats() {
        let p = parse_params("a=1%202&b=x+y&c=").unwrap();
        assert_eq!(p[0], ("a".into(), "1 2".into()));
        assert_eq!(p[1].1, "x y");
        assert_eq!(p[2].1, "");
        assert!(parse_params("a=1&a=2").is_err());
        assert!(parse_params("a=%zz").is_err());
    }

    #[test]
    fn notifications_and_external_orders_parse() {
        let n = Notification::from_params(&vector()).unwrap();
        assert_eq!(n.money, Pico::usd(10));
        assert_eq!(n.trade_status, "TRADE_SUCCESS");
        let e = parse_external(
            r#"{"email":"a@b.c","type":"activation","credits":"12.5","original_amount":"10"}"#,
        )
        .unwrap();
        assert_eq!(e.kind, ExternalKind::Activation);
        assert_eq!(e.credits, Pico::parse_usd("12.5").unwrap());
        let e = parse_external(r#"{"email":"a@b.c","type":"recharge","credits":3}"#).unwrap();
        assert_eq!(e.credits, Pico::usd(3));
        assert!(parse_external(r#"{"email":"a@b.c","type":"other","credits":3}"#).is_err());
        assert!(parse_external(r#"{"email":"a@b.c","type":"recharge","credits":-3}"#).is_err());
        assert_eq!(money_text(Pico::usd(10)).as_deref(), Some("10.00"));
        assert_eq!(money_text(Pico(1)), None);
    }
}
