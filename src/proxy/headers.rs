//! Which headers cross the gateway. Requests: an allowlist, so a client
//! cannot choose what the operator's upstream account bills
//! (`OpenAI-Organization`, `OpenAI-Project`) or smuggle hop-by-hop
//! headers; the client's key never goes. Answers: hop-by-hop headers and
//! the upstream account's own headers (organisation, project, its rate
//! limits, cookies) are dropped; ours replace them.

use http::HeaderMap;
use http::header::{self, HeaderName, HeaderValue};

/// Request headers an upstream may see, besides the ones the gateway sets
/// (authorization, host, content-length, x-request-id).
const FORWARDED: [HeaderName; 8] = [
    header::CONTENT_TYPE,
    header::ACCEPT,
    header::USER_AGENT,
    header::ACCEPT_LANGUAGE,
    HeaderName::from_static("openai-beta"),
    HeaderName::from_static("anthropic-version"),
    HeaderName::from_static("anthropic-beta"),
    HeaderName::from_static("idempotency-key"),
];

/// Request header prefixes an upstream may see: the OpenAI/Anthropic SDKs'
/// own telemetry (`x-stainless-*`) and the built-in mock's controls
/// (`x-mock-*`, ignored by real upstreams).
const FORWARDED_PREFIXES: [&str; 2] = ["x-stainless-", "x-mock-"];

pub static X_REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");

/// Headers that describe one hop, never passed on.
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

/// Answer headers that belong to the operator's upstream account.
const UPSTREAM_ACCOUNT: [HeaderName; 4] = [
    HeaderName::from_static("openai-organization"),
    HeaderName::from_static("openai-project"),
    HeaderName::from_static("anthropic-organization-id"),
    header::SET_COOKIE,
];

/// The headers sent upstream: the allowlisted ones of the client's, then
/// the request id and the upstream's own key (added per attempt).
pub fn upstream_request(client: &HeaderMap, request_id: &HeaderValue) -> HeaderMap {
    let mut out = HeaderMap::with_capacity(8);
    for (name, value) in client {
        if forwarded(name) {
            out.append(name.clone(), value.clone());
        }
    }
    out.insert(X_REQUEST_ID.clone(), request_id.clone());
    out
}

/// True for a client header an upstream may see.
pub fn forwarded(name: &HeaderName) -> bool {
    FORWARDED.contains(name)
        || FORWARDED_PREFIXES
            .iter()
            .any(|p| name.as_str().starts_with(p))
}

/// The `anthropic-version` Anthropic requires, when the client sent none.
pub const DEFAULT_ANTHROPIC_VERSION: &str = "2023-06-01";

/// Adds `anthropic-version: 2023-06-01` unless the client chose one.
pub fn default_anthropic_version(h: &mut HeaderMap) {
    h.entry(HeaderName::from_static("anthropic-version"))
        .or_insert(HeaderValue::from_static(DEFAULT_ANTHROPIC_VERSION));
}

/// Cleans an upstream's answer head before it goes to the client: one pass
/// over the names finds what must go (usually nothing), so a clean head
/// costs no hash lookups.
pub fn clean_answer(h: &mut HeaderMap) {
    let mut drop: Vec<HeaderName> = Vec::new();
    for name in h.keys() {
        if name == header::CONNECTION {
            if let Some(conn) = h.get(header::CONNECTION).and_then(|v| v.to_str().ok()) {
                drop.extend(
                    conn.split(',')
                        .filter_map(|n| HeaderName::from_bytes(n.trim().as_bytes()).ok()),
                );
            }
            drop.push(name.clone());
        } else if HOP_BY_HOP.contains(name)
            || UPSTREAM_ACCOUNT.contains(name)
            // The upstream account's rate limits: the key's own replace them.
            || name.as_str().starts_with("x-ratelimit-")
            || name.as_str().starts_with("anthropic-ratelimit-")
        {
            drop.push(name.clone());
        }
    }
    for n in drop {
        h.remove(n);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_allowlisted_headers_go_upstream() {
        let mut h = HeaderMap::new();
        h.insert("authorization", HeaderValue::from_static("Bearer sk-tg-x"));
        h.insert("x-api-key", HeaderValue::from_static("sk-tg-x"));
        h.insert("openai-organization", HeaderValue::from_static("org-x"));
        h.insert("openai-project", HeaderValue::from_static("proj-x"));
        h.insert("content-type", HeaderValue::from_static("application/json"));
        h.insert("x-stainless-lang", HeaderValue::from_static("python"));
        h.insert("x-mock-chunks", HeaderValue::from_static("3"));
        h.insert("cookie", HeaderValue::from_static("a=b"));
        let out = upstream_request(&h, &HeaderValue::from_static("req_1"));
        let names: Vec<&str> = out.keys().map(|n| n.as_str()).collect();
        assert_eq!(
            names,
            [
                "content-type",
                "x-stainless-lang",
                "x-mock-chunks",
                "x-request-id"
            ]
        );
    }

    #[test]
    fn the_anthropic_version_defaults_and_is_kept() {
        let mut h = HeaderMap::new();
        default_anthropic_version(&mut h);
        assert_eq!(h["anthropic-version"], DEFAULT_ANTHROPIC_VERSION);
        h.insert("anthropic-version", HeaderValue::from_static("2023-01-01"));
        default_anthropic_version(&mut h);
        assert_eq!(h["anthropic-version"], "2023-01-01");
    }

    #[test]
    fn upstream_account_headers_are_dropped() {
        let mut h = HeaderMap::new();
        h.insert("openai-organization", HeaderValue::from_static("org-x"));
        h.insert(
            "x-ratelimit-remaining-requests",
            HeaderValue::from_static("9"),
        );
        h.insert(
            "anthropic-ratelimit-tokens-remaining",
            HeaderValue::from_static("9"),
        );
        h.insert(
            "anthropic-organization-id",
            HeaderValue::from_static("org-x"),
        );
        h.insert("connection", HeaderValue::from_static("x-secret"));
        h.insert("x-secret", HeaderValue::from_static("1"));
        h.insert(
            "content-type",
            HeaderValue::from_static("text/event-stream"),
        );
        clean_answer(&mut h);
        let names: Vec<&str> = h.keys().map(|n| n.as_str()).collect();
        assert_eq!(names, ["content-type"]);
    }
}
