//! One error type for everything the gateway itself answers, and its mapping
//! to a status and OpenAI's error JSON:
//! `{"error":{"message","type","param","code","metadata"?}}`, or, on
//! Anthropic's routes ([`Shape::Anthropic`]), Anthropic's:
//! `{"type":"error","error":{"type","message"},"request_id"}`.
//!
//! An error also says where the fault came from ([`Origin`]), which the
//! proxy uses to decide whether another upstream may be tried and the
//! metrics use (with the `code`) to count rejections.
//!
//! An internal fault carries its cause as a `source`: it is logged with the
//! request id (by the server, from the answer's [`Fault`] extension) and
//! never sent; the client reads a generic message and the request id.

use std::borrow::Cow;
use std::sync::Arc;

use bytes::Bytes;
use http::header::{CONTENT_TYPE, HeaderName, HeaderValue, RETRY_AFTER};
use http::{Response, StatusCode};
use serde_json::{Value, json};

use crate::{Body, BoxError};

/// Where a fault came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Origin {
    /// The client sent something we refuse (bad key, bad JSON, over a limit).
    Client,
    /// The upstream failed or could not be reached.
    Upstream,
    /// Tollgate itself failed (store error, a bug).
    Internal,
}

impl Origin {
    /// The metrics label.
    pub fn as_str(self) -> &'static str {
        match self {
            Origin::Client => "client",
            Origin::Upstream => "upstream",
            Origin::Internal => "internal",
        }
    }
}

/// The cause of an internal fault (a store error, a bug), kept for the log.
pub type Source = Arc<dyn std::error::Error + Send + Sync>;

/// Put on an answer made from an error with a [`Source`], so that the
/// server, which knows the request id, logs the cause with it and adds the
/// id to the message. Never serialized.
#[derive(Clone, Debug)]
pub struct Fault(pub ApiError);

/// Which API's error JSON an error is written in.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub enum Shape {
    /// `{"error":{"message","type","param","code"}}`: every route but
    /// Anthropic's.
    #[default]
    OpenAi,
    /// `{"type":"error","error":{"type","message"},"request_id"}` on
    /// `/v1/messages` and `/v1/messages/count_tokens`, with Anthropic's
    /// error types (read from the status), so the Anthropic SDK raises
    /// the right exception.
    Anthropic {
        /// The request's id, which Anthropic's shape carries in the body.
        request_id: String,
    },
}

/// An error answered to a client in OpenAI's shape (or Anthropic's).
#[derive(Clone, Debug)]
pub struct ApiError {
    /// HTTP status of the answer.
    pub status: StatusCode,
    /// OpenAI's `type` (`invalid_request_error`, `permission_error`, …).
    pub kind: &'static str,
    /// OpenAI's machine-readable `code` (`invalid_api_key`, …).
    pub code: &'static str,
    /// Human-readable explanation; never contains a key.
    pub message: Cow<'static, str>,
    /// The request field at fault, when there is one.
    pub param: Option<Cow<'static, str>>,
    /// Extra facts for the client (`limit_source`, an existing key's hash).
    pub metadata: Option<Value>,
    /// Seconds after which a retry may succeed (429, 503).
    pub retry_after: Option<u64>,
    /// Extra headers (rate-limit headers) to send with the error.
    pub headers: Vec<(HeaderName, HeaderValue)>,
    /// Who is at fault.
    pub origin: Origin,
    /// What really went wrong, for the operator's log: a sled error's text
    /// names files and internals a client has no business reading.
    pub source: Option<Source>,
    /// Which API's JSON the answer is written in.
    pub shape: Shape,
}

impl ApiError {
    pub fn new(
        status: StatusCode,
        kind: &'static str,
        code: &'static str,
        message: impl Into<Cow<'static, str>>,
    ) -> ApiError {
        let origin = if status.is_server_error() {
            Origin::Internal
        } else {
            Origin::Client
        };
        ApiError {
            status,
            kind,
            code,
            message: message.into(),
            param: None,
            metadata: None,
            retry_after: None,
            headers: Vec::new(),
            origin,
            source: None,
            shape: Shape::OpenAi,
        }
    }

    /// Written in `shape` (Anthropic's on Anthropic's routes).
    pub fn with_shape(mut self, shape: Shape) -> ApiError {
        self.shape = shape;
        self
    }

    /// Anthropic's error `type` for this error's status: what the
    /// Anthropic SDK maps to its exception classes.
    pub fn anthropic_type(&self) -> &'static str {
        anthropic_type(self.status)
    }

    pub fn with_param(mut self, param: impl Into<Cow<'static, str>>) -> ApiError {
        self.param = Some(param.into());
        self
    }

    pub fn with_metadata(mut self, metadata: Value) -> ApiError {
        self.metadata = Some(metadata);
        self
    }

    pub fn with_retry_after(mut self, seconds: u64) -> ApiError {
        self.retry_after = Some(seconds.max(1));
        self
    }

    pub fn with_header(mut self, name: HeaderName, value: HeaderValue) -> ApiError {
        self.headers.push((name, value));
        self
    }

    pub fn with_origin(mut self, origin: Origin) -> ApiError {
        self.origin = origin;
        self
    }

    /// Attaches the internal cause: logged with the request id, never sent.
    pub fn with_source(mut self, source: impl Into<BoxError>) -> ApiError {
        self.source = Some(Arc::from(source.into()));
        self
    }

    // ---- the errors of DESIGN.md's table ----

    pub fn invalid_api_key(message: impl Into<Cow<'static, str>>) -> ApiError {
        ApiError::new(
            StatusCode::UNAUTHORIZED,
            "invalid_request_error",
            "invalid_api_key",
            message,
        )
    }

    pub fn permission(code: &'static str, message: impl Into<Cow<'static, str>>) -> ApiError {
        ApiError::new(StatusCode::FORBIDDEN, "permission_error", code, message)
    }

    pub fn bad_request(code: &'static str, message: impl Into<Cow<'static, str>>) -> ApiError {
        ApiError::new(
            StatusCode::BAD_REQUEST,
            "invalid_request_error",
            code,
            message,
        )
    }

    pub fn invalid_json(message: impl Into<Cow<'static, str>>) -> ApiError {
        ApiError::bad_request("invalid_json", message)
    }

    /// A `/v1/*` route that is neither a known API nor allowed by a
    /// `[routes]` rule: nothing goes upstream.
    /// The store cannot take records (queue full, disk failing): a paid
    /// request is refused rather than served with its charge only in memory.
    pub fn store_unavailable() -> ApiError {
        ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "server_error",
            "store_unavailable",
            "The gateway cannot record usage right now; retry shortly.",
        )
        .with_retry_after(1)
    }

    pub fn route_not_allowed(path: &str) -> ApiError {
        ApiError::new(
            StatusCode::NOT_FOUND,
            "invalid_request_error",
            "route_not_allowed",
            format!(
                "The route {} is not served by this gateway.",
                truncate(path, 256)
            ),
        )
    }

    pub fn model_not_found(model: &str) -> ApiError {
        ApiError::new(
            StatusCode::NOT_FOUND,
            "invalid_request_error",
            "model_not_found",
            format!(
                "The model `{}` does not exist or you do not have access to it.",
                truncate(model, 128)
            ),
        )
        .with_param("model")
    }

    pub fn not_found(message: impl Into<Cow<'static, str>>) -> ApiError {
        ApiError::new(
            StatusCode::NOT_FOUND,
            "invalid_request_error",
            "not_found",
            message,
        )
    }

    pub fn method_not_allowed() -> ApiError {
        ApiError::new(
            StatusCode::METHOD_NOT_ALLOWED,
            "invalid_request_error",
            "method_not_allowed",
            "This method is not allowed on this path.",
        )
    }

    pub fn body_too_large(max: usize) -> ApiError {
        ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "invalid_request_error",
            "body_too_large",
            format!("The request body is larger than the maximum of {max} bytes."),
        )
    }

    pub fn insufficient_quota(
        code: &'static str,
        message: impl Into<Cow<'static, str>>,
        limit_source: &str,
    ) -> ApiError {
        ApiError::new(
            StatusCode::PAYMENT_REQUIRED,
            "insufficient_quota",
            code,
            message,
        )
        .with_metadata(json!({ "limit_source": limit_source }))
    }

    pub fn rate_limited(message: impl Into<Cow<'static, str>>, retry_after_secs: u64) -> ApiError {
        ApiError::new(
            StatusCode::TOO_MANY_REQUESTS,
            "rate_limit_exceeded",
            "rate_limit_exceeded",
            message,
        )
        .with_retry_after(retry_after_secs)
    }

    pub fn conflict(code: &'static str, message: impl Into<Cow<'static, str>>) -> ApiError {
        ApiError::new(StatusCode::CONFLICT, "invalid_request_error", code, message)
    }

    pub fn upstream(status: StatusCode, message: impl Into<Cow<'static, str>>) -> ApiError {
        ApiError::new(status, "upstream_error", "upstream_error", message)
            .with_origin(Origin::Upstream)
    }

    /// A fault of the gateway itself. `cause` is for the log only: the
    /// client reads "Internal error." and the request id.
    pub fn internal(cause: impl Into<BoxError>) -> ApiError {
        ApiError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "server_error",
            "internal_error",
            "Internal error.",
        )
        .with_origin(Origin::Internal)
        .with_source(cause)
    }

    pub fn unavailable(message: impl Into<Cow<'static, str>>) -> ApiError {
        ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "server_error",
            "unavailable",
            message,
        )
    }

    /// The JSON body, as bytes.
    pub fn to_json(&self) -> Bytes {
        self.json_with(None)
    }

    /// The JSON body of a [`Fault`]'s answer: the message names the request
    /// id, which is how the operator finds the cause in the log.
    pub fn to_json_for(&self, request_id: &str) -> Bytes {
        self.json_with(Some(request_id))
    }

    fn json_with(&self, request_id: Option<&str>) -> Bytes {
        let message = match request_id {
            Some(id) => Cow::Owned(format!(
                "{} Request id: {}.",
                self.message,
                truncate(id, 128)
            )),
            None => Cow::Borrowed(&*self.message),
        };
        if let Shape::Anthropic { request_id } = &self.shape {
            let v = json!({
                "type": "error",
                "error": {"type": self.anthropic_type(), "message": message},
                "request_id": request_id,
            });
            return Bytes::from(serde_json::to_vec(&v).expect("a Value always serializes"));
        }
        let mut error = json!({
            "message": message,
            "type": self.kind,
            "param": self.param,
            "code": self.code,
        });
        if let Some(m) = &self.metadata {
            error["metadata"] = m.clone();
        }
        Bytes::from(
            serde_json::to_vec(&json!({ "error": error })).expect("a Value always serializes"),
        )
    }

    pub fn into_response(mut self) -> Response<Body> {
        let body = self.to_json();
        let mut res = Response::new(crate::full_body(body));
        *res.status_mut() = self.status;
        let headers = std::mem::take(&mut self.headers);
        if self.source.is_some() {
            res.extensions_mut().insert(Fault(self.clone()));
        }
        let h = res.headers_mut();
        h.insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
        if let Some(secs) = self.retry_after {
            h.insert(RETRY_AFTER, HeaderValue::from(secs));
        }
        for (name, value) in headers {
            h.append(name, value);
        }
        res
    }
}

impl std::fmt::Display for ApiError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} {}: {}",
            self.status.as_u16(),
            self.code,
            self.message
        )
    }
}

impl std::error::Error for ApiError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        self.source
            .as_deref()
            .map(|e| e as &(dyn std::error::Error + 'static))
    }
}

/// Anthropic's error `type` for a status (its documented table; 529 is its
/// own "overloaded").
pub fn anthropic_type(status: StatusCode) -> &'static str {
    match status.as_u16() {
        400 => "invalid_request_error",
        401 => "authentication_error",
        402 => "billing_error",
        403 => "permission_error",
        404 => "not_found_error",
        413 => "request_too_large",
        429 => "rate_limit_error",
        504 => "timeout_error",
        529 => "overloaded_error",
        s if s >= 500 => "api_error",
        _ => "invalid_request_error",
    }
}

/// Cuts client-controlled text echoed in messages to a sane length, on a
/// character boundary.
pub fn truncate(s: &str, max: usize) -> &str {
    if s.len() <= max {
        return s;
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn openai_shape() {
        let e = ApiError::insufficient_quota("insufficient_quota", "no credit", "key");
        let v: Value = serde_json::from_slice(&e.to_json()).unwrap();
        assert_eq!(v["error"]["type"], "insufficient_quota");
        assert_eq!(v["error"]["code"], "insufficient_quota");
        assert_eq!(v["error"]["message"], "no credit");
        assert_eq!(v["error"]["param"], Value::Null);
        assert_eq!(v["error"]["metadata"]["limit_source"], "key");
        let r = ApiError::rate_limited("slow down", 0).into_response();
        assert_eq!(r.status(), 429);
        assert_eq!(r.headers()[RETRY_AFTER], "1");
    }

    #[test]
    fn internal_cause_is_kept_and_never_sent() {
        let sled_text = "sled: IO error: /var/lib/tollgate/db/blobs/17: No space left";
        let e = ApiError::internal(format!("key store: {sled_text}"));
        let text = String::from_utf8(e.to_json().to_vec()).unwrap();
        assert!(
            !text.contains("sled") && !text.contains("/var/lib"),
            "{text}"
        );
        assert!(text.contains("Internal error."), "{text}");
        let with_id = String::from_utf8(e.to_json_for("req-42").to_vec()).unwrap();
        assert!(with_id.contains("Request id: req-42."), "{with_id}");
        assert!(!with_id.contains("sled"), "{with_id}");
        let res = e.into_response();
        let fault = res
            .extensions()
            .get::<Fault>()
            .expect("a fault rides along");
        let cause = fault.0.source.as_ref().expect("the cause is kept");
        assert!(cause.to_string().contains(sled_text));
        // Client errors carry no fault.
        let res = ApiError::bad_request("x", "y").into_response();
        assert!(res.extensions().get::<Fault>().is_none());
    }

    #[test]
    fn anthropic_shape() {
        let shape = Shape::Anthropic {
            request_id: "req_7".into(),
        };
        for (e, want) in [
            (ApiError::invalid_api_key("bad key"), "authentication_error"),
            (
                ApiError::insufficient_quota("insufficient_quota", "no credit", "key"),
                "billing_error",
            ),
            (
                ApiError::permission("key_disabled", "off"),
                "permission_error",
            ),
            (ApiError::model_not_found("claude-x"), "not_found_error"),
            (ApiError::body_too_large(10), "request_too_large"),
            (ApiError::rate_limited("slow", 3), "rate_limit_error"),
            (
                ApiError::bad_request("missing_max_tokens", "x"),
                "invalid_request_error",
            ),
            (
                ApiError::upstream(StatusCode::BAD_GATEWAY, "x"),
                "api_error",
            ),
            (
                ApiError::upstream(StatusCode::GATEWAY_TIMEOUT, "x"),
                "timeout_error",
            ),
        ] {
            let message = e.message.clone();
            let e = e.with_shape(shape.clone());
            let v: Value = serde_json::from_slice(&e.to_json()).unwrap();
            assert_eq!(v["type"], "error");
            assert_eq!(v["error"]["type"], want, "{v}");
            assert_eq!(v["error"]["message"], *message);
            assert_eq!(v["request_id"], "req_7");
            assert!(v.get("code").is_none() && v["error"].get("code").is_none());
        }
        let r = ApiError::rate_limited("slow", 3)
            .with_shape(shape)
            .into_response();
        assert_eq!(r.headers()[RETRY_AFTER], "3");
        assert_eq!(
            anthropic_type(StatusCode::from_u16(529).unwrap()),
            "overloaded_error"
        );
    }

    #[test]
    fn truncates_on_char_boundary() {
        assert_eq!(truncate("héllo", 2), "h");
        assert_eq!(truncate("abc", 10), "abc");
    }
}
