//! The web pages served from the binary: `/portal` (a key holder's view of
//! their key) and `/admin` (the operator's console), plus their assets under
//! `/assets/`. Plain HTML, CSS and JavaScript modules, embedded with
//! `include_str!`; no build step, no CDN. The pages only call the public
//! API (`/api/…`) with the credential the user typed, so they can do
//! nothing a `curl` with the same credential could not.
//!
//! Every answer carries a strict Content-Security-Policy (scripts and
//! styles from this origin only, no inline script, no eval, fetches to this
//! origin only, no framing), `nosniff`, and an ETag; a matching
//! `If-None-Match` is answered 304. `Cache-Control: no-cache` lets the
//! browser keep a copy but revalidate it, so an upgraded binary is seen at
//! once (asset names carry no content hash to cache them forever by).

use std::sync::OnceLock;

use http::header::{
    CACHE_CONTROL, CONTENT_TYPE, ETAG, HeaderMap, HeaderName, HeaderValue, IF_NONE_MATCH,
};
use http::{Method, Response, StatusCode};

use crate::Body;
use crate::error::ApiError;

/// The policy of every page and asset. `default-src 'none'` refuses what
/// the pages do not use (fonts, frames, media, workers).
pub const CSP: &str = "default-src 'none'; script-src 'self'; style-src 'self'; \
connect-src 'self'; img-src 'self' data:; base-uri 'none'; form-action 'self'; \
frame-ancestors 'none'";

/// One embedded file and where it is served.
struct Asset {
    /// The request path it answers.
    path: &'static str,
    /// Its `Content-Type`.
    content_type: &'static str,
    /// The file itself.
    body: &'static str,
}

macro_rules! asset {
    ($path:literal, $file:literal, $type:expr) => {
        Asset {
            path: $path,
            content_type: $type,
            body: include_str!(concat!("pages/", $file)),
        }
    };
}

const HTML: &str = "text/html; charset=utf-8";
const JS: &str = "text/javascript; charset=utf-8";
const CSS: &str = "text/css; charset=utf-8";

static ASSETS: &[Asset] = &[
    asset!("/portal", "portal.html", HTML),
    asset!("/admin", "admin.html", HTML),
    asset!("/assets/style.css", "style.css", CSS),
    asset!("/assets/exact.js", "exact.js", JS),
    asset!("/assets/ui.js", "ui.js", JS),
    asset!("/assets/chart.js", "chart.js", JS),
    asset!("/assets/portal.js", "portal.js", JS),
    asset!("/assets/admin.js", "admin.js", JS),
    asset!("/assets/admin/keys.js", "admin/keys.js", JS),
    asset!("/assets/admin/usage.js", "admin/usage.js", JS),
    asset!("/assets/admin/accounts.js", "admin/accounts.js", JS),
    asset!("/assets/admin/payments.js", "admin/payments.js", JS),
    asset!("/assets/admin/events.js", "admin/events.js", JS),
    asset!("/assets/admin/audit.js", "admin/audit.js", JS),
    asset!("/assets/icon.svg", "icon.svg", "image/svg+xml"),
];

/// Whether `path` is one of the pages' (so the router sends it here).
pub fn owns(path: &str) -> bool {
    path.starts_with("/assets/") || canonical(path).is_some()
}

/// `/portal/` and `/admin/` are the pages too.
fn canonical(path: &str) -> Option<&'static str> {
    match path {
        "/portal" | "/portal/" => Some("/portal"),
        "/admin" | "/admin/" => Some("/admin"),
        _ => None,
    }
}

/// Answers a request for a page or an asset (`GET`/`HEAD`; 405 otherwise,
/// 404 for an unknown asset).
pub fn serve(method: &Method, path: &str, headers: &HeaderMap) -> Response<Body> {
    if method != Method::GET && method != Method::HEAD {
        return with_policy(ApiError::method_not_allowed().into_response());
    }
    let want = canonical(path).unwrap_or(path);
    let Some((i, asset)) = ASSETS.iter().enumerate().find(|(_, a)| a.path == want) else {
        return with_policy(
            ApiError::not_found(format!(
                "Unknown asset {}.",
                crate::error::truncate(path, 128)
            ))
            .into_response(),
        );
    };
    let etag = &etags()[i];
    let fresh = headers
        .get_all(IF_NONE_MATCH)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|t| {
            let t = t.trim();
            t == "*" || t.trim_start_matches("W/") == etag.to_str().unwrap_or("")
        });
    let mut res = if fresh {
        let mut r = Response::new(crate::full_body(bytes::Bytes::new()));
        *r.status_mut() = StatusCode::NOT_MODIFIED;
        r
    } else if method == Method::HEAD {
        Response::new(crate::full_body(bytes::Bytes::new()))
    } else {
        Response::new(crate::full_body(bytes::Bytes::from_static(
            asset.body.as_bytes(),
        )))
    };
    let h = res.headers_mut();
    if !fresh {
        h.insert(CONTENT_TYPE, HeaderValue::from_static(asset.content_type));
    }
    h.insert(ETAG, etag.clone());
    h.insert(CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    with_policy(res)
}

/// The security headers every answer here carries, errors included.
fn with_policy(mut res: Response<Body>) -> Response<Body> {
    let h = res.headers_mut();
    h.insert(
        http::header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(CSP),
    );
    h.insert(
        http::header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    h.insert(
        http::header::REFERRER_POLICY,
        HeaderValue::from_static("no-referrer"),
    );
    h.insert(
        HeaderName::from_static("cross-origin-opener-policy"),
        HeaderValue::from_static("same-origin"),
    );
    res
}

/// A strong ETag per asset, from its content (computed once).
fn etags() -> &'static [HeaderValue] {
    static TAGS: OnceLock<Vec<HeaderValue>> = OnceLock::new();
    TAGS.get_or_init(|| {
        use sha2::{Digest, Sha256};
        ASSETS
            .iter()
            .map(|a| {
                let d = Sha256::digest(a.body.as_bytes());
                HeaderValue::from_str(&format!("\"{}\"", hex::encode(&d[..12])))
                    .expect("hex in quotes is a valid header value")
            })
            .collect()
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::BodyExt;

    async fn body(res: Response<Body>) -> Vec<u8> {
        res.into_body()
            .collect()
            .await
            .map(|c| c.to_bytes().to_vec())
            .unwrap_or_default()
    }

    #[tokio::test]
    async fn pages_and_assets_have_types_policy_and_etag() {
        for a in ASSETS {
            let res = serve(&Method::GET, a.path, &HeaderMap::new());
            assert_eq!(res.status(), StatusCode::OK, "{}", a.path);
            let h = res.headers();
            assert_eq!(h[CONTENT_TYPE], a.content_type);
            assert_eq!(h[http::header::CONTENT_SECURITY_POLICY], CSP);
            assert_eq!(h[http::header::X_CONTENT_TYPE_OPTIONS], "nosniff");
            assert!(h[ETAG].to_str().unwrap_or("").starts_with('"'));
            assert_eq!(body(res).await, a.body.as_bytes());
        }
    }

    #[tokio::test]
    async fn matching_etag_is_304_and_other_is_200() {
        let first = serve(&Method::GET, "/portal/", &HeaderMap::new());
        let tag = first.headers()[ETAG].clone();
        let mut h = HeaderMap::new();
        h.insert(IF_NONE_MATCH, tag.clone());
        let again = serve(&Method::GET, "/portal", &h);
        assert_eq!(again.status(), StatusCode::NOT_MODIFIED);
        assert_eq!(again.headers()[ETAG], tag);
        assert!(body(again).await.is_empty());
        h.insert(IF_NONE_MATCH, HeaderValue::from_static("\"other\""));
        assert_eq!(serve(&Method::GET, "/portal", &h).status(), StatusCode::OK);
    }

    #[tokio::test]
    async fn unknown_asset_and_wrong_method() {
        let res = serve(&Method::GET, "/assets/nope.js", &HeaderMap::new());
        assert_eq!(res.status(), StatusCode::NOT_FOUND);
        assert_eq!(res.headers()[http::header::CONTENT_SECURITY_POLICY], CSP);
        let res = serve(&Method::POST, "/portal", &HeaderMap::new());
        assert_eq!(res.status(), StatusCode::METHOD_NOT_ALLOWED);
        let head = serve(&Method::HEAD, "/admin", &HeaderMap::new());
        assert_eq!(head.status(), StatusCode::OK);
        assert!(body(head).await.is_empty());
    }

    /// No page may carry inline script or handlers: the CSP would block
    /// them, and the page would silently not work.
    #[test]
    fn no_inline_script_or_handlers() {
        for a in ASSETS.iter().filter(|a| a.content_type == HTML) {
            let lower = a.body.to_ascii_lowercase();
            for (i, _) in lower.match_indices("<script") {
                let tag = &lower[i..i + lower[i..].find('>').unwrap_or(0)];
                assert!(tag.contains("src="), "inline script in {}", a.path);
            }
            assert!(!lower.contains(" onclick="), "{}", a.path);
            assert!(!lower.contains(" style="), "{}", a.path);
        }
        for a in ASSETS.iter().filter(|a| a.content_type == JS) {
            assert!(!a.body.contains("innerHTML"), "{}", a.path);
            assert!(!a.body.contains("eval("), "{}", a.path);
        }
    }
}
