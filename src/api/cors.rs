//! CORS for the routes a browser (the portal) calls with a key:
//! `/api/usage/*`, `/api/v1/key` and `/api/v1/key/checkout`. One helper,
//! so all of them send the same headers.
//!
//! An allowed `Origin` is echoed (also under `*`: no credentials mode is
//! offered, so echoing and `*` allow the same, and echoing works if one is
//! ever added). `Vary: origin` is on every answer, allowed or not, because
//! the answer depends on `Origin` either way and caches must keep them
//! apart. Another origin gets no `access-control-*` header at all.

use http::header::{
    ACCESS_CONTROL_ALLOW_HEADERS, ACCESS_CONTROL_ALLOW_METHODS, ACCESS_CONTROL_ALLOW_ORIGIN,
    ACCESS_CONTROL_MAX_AGE, HeaderValue, ORIGIN, VARY,
};
use http::{HeaderMap, Response, StatusCode};

use super::Ctx;
use crate::Body;

/// Methods a browser may use on these routes (`POST`: the portal's
/// "Top up" calls `/api/v1/key/checkout`).
const METHODS: &str = "GET, POST, OPTIONS";
/// Request headers a browser may send: every way a key can be presented,
/// and `content-type`.
const HEADERS: &str = "authorization, content-type, x-api-key, api-key";

/// The CORS verdict on one request.
pub(super) struct Cors {
    /// The request's `Origin`, when `[cors] allowed_origins` allows it.
    origin: Option<HeaderValue>,
}

impl Cors {
    pub fn of(ctx: &Ctx<'_>, headers: &HeaderMap) -> Cors {
        let origin = headers.get(ORIGIN).and_then(|origin| {
            let text = origin.to_str().ok()?;
            ctx.config
                .cors
                .allowed_origins
                .iter()
                .any(|a| a == "*" || a == text)
                .then(|| origin.clone())
        });
        Cors { origin }
    }

    /// The answer to a preflight (`OPTIONS`): 204, with the allowances only
    /// for an allowed origin.
    pub fn preflight(&self) -> Response<Body> {
        let mut res = Response::new(crate::full_body(bytes::Bytes::new()));
        *res.status_mut() = StatusCode::NO_CONTENT;
        if self.origin.is_some() {
            let h = res.headers_mut();
            h.insert(
                ACCESS_CONTROL_ALLOW_METHODS,
                HeaderValue::from_static(METHODS),
            );
            h.insert(
                ACCESS_CONTROL_ALLOW_HEADERS,
                HeaderValue::from_static(HEADERS),
            );
            h.insert(ACCESS_CONTROL_MAX_AGE, HeaderValue::from_static("600"));
        }
        self.apply(res)
    }

    /// Adds `Vary` and, for an allowed origin, `Access-Control-Allow-Origin`
    /// to any answer (errors too, so that a portal can read them).
    pub fn apply(&self, mut res: Response<Body>) -> Response<Body> {
        let h = res.headers_mut();
        h.insert(VARY, HeaderValue::from_static("origin"));
        if let Some(o) = &self.origin {
            h.insert(ACCESS_CONTROL_ALLOW_ORIGIN, o.clone());
        }
        res
    }
}
