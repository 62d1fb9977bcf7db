//! What Anthropic's routes add to the proxy path: the free
//! `/v1/messages/count_tokens`, and upstream errors answered in Anthropic's
//! shape (an upstream that answers an OpenAI-shaped or non-JSON error to
//! `/v1/messages` is rewritten, so the Anthropic SDK raises the right
//! exception instead of failing to parse it).

use std::time::Duration;

use bytes::Bytes;
use http::header::{self, HeaderValue};
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Limited};
use hyper::body::Incoming;
use serde_json::{Value, json};

use super::h1pool::UpstreamBody;
use super::headers::{self, X_REQUEST_ID};
use super::{Call, Inspected};
use crate::Body;
use crate::error::{ApiError, anthropic_type, truncate};
use crate::gate::{Permit, Policy};
use crate::meter::Endpoint;

/// An upstream error body is read up to this size to check its shape;
/// past it the answer is replaced by a generic one.
const ERROR_BODY_CAP: usize = 64 * 1024;

/// A count_tokens answer (`{"input_tokens":N}`) is read up to this size.
const COUNT_BODY_CAP: usize = 1024 * 1024;

impl Call<'_> {
    /// `POST /v1/messages/count_tokens`: authenticated, admitted and
    /// limited (rpm, concurrency) like any request, but free and never
    /// counted against `max_requests`: no reservation, no settlement, no
    /// usage record. The permit's count is given back when it drops here.
    pub(super) async fn count_tokens(
        &mut self,
        permit: Permit,
        policy: &Policy,
        req: Request<Incoming>,
        path: &str,
    ) -> Result<Response<Body>, ApiError> {
        let (parts, body) = req.into_parts();
        let body =
            crate::server::read_body(&parts.headers, body, self.app.config.server.max_body_bytes)
                .await?;
        let info = crate::meter::inspect(Endpoint::CountTokens, &body)?;
        let Some(model) = info.model.as_deref() else {
            return Err(ApiError::bad_request(
                "missing_required_parameter",
                "model: Field required.",
            )
            .with_param("model"));
        };
        policy.check_model(model)?;
        let dest = self.proxy.routing.free_for_model(model)?;
        let inspected = Inspected {
            info,
            body: body.clone(),
            dest,
        };
        let (upstream, answer) = self.forward(&parts, path, body, &inspected).await?;
        if !answer.status().is_success() {
            let res = self.anthropic_error_answer(upstream, answer).await;
            drop(permit);
            return Ok(res);
        }
        let up = &self.proxy.routing.upstreams[upstream];
        let (mut head, incoming) = answer.into_parts();
        let read = tokio::time::timeout(
            up.stream_idle_timeout,
            Limited::new(incoming, COUNT_BODY_CAP).collect(),
        )
        .await;
        drop(permit);
        let Ok(Ok(collected)) = read else {
            return Err(ApiError::upstream(
                StatusCode::BAD_GATEWAY,
                format!("Upstream {} did not finish its answer.", up.name),
            ));
        };
        headers::clean_answer(&mut head.headers);
        head.headers.remove(header::CONTENT_LENGTH);
        head.headers
            .insert(X_REQUEST_ID.clone(), self.request_id.clone());
        self.app.metrics.answered(
            self.route,
            head.status.as_u16(),
            self.started.elapsed(),
            None,
        );
        Ok(Response::from_parts(
            head,
            crate::full_body(collected.to_bytes()),
        ))
    }

    /// An upstream's error answer on an Anthropic route: passed on as it
    /// is when it is already in Anthropic's shape (a 529
    /// `overloaded_error`, a 400 `invalid_request_error`), otherwise
    /// rewritten into it with the same status. The request is settled
    /// here: an error answer carries no usage and costs nothing.
    pub(super) async fn anthropic_error_answer(
        &mut self,
        upstream: usize,
        answer: Response<UpstreamBody>,
    ) -> Response<Body> {
        let up = &self.proxy.routing.upstreams[upstream];
        let status = answer.status();
        let (mut head, incoming) = answer.into_parts();
        let raw = read_bounded(incoming, up.stream_idle_timeout).await;
        let body = match raw {
            Some(raw) if is_anthropic_error(&raw) => raw,
            raw => {
                tracing::warn!(upstream = %up.name, status = status.as_u16(), "upstream error not in Anthropic's shape; rewritten");
                anthropic_error_from(
                    status,
                    raw.as_deref(),
                    &up.name,
                    self.request_id.to_str().unwrap_or(""),
                )
            }
        };
        headers::clean_answer(&mut head.headers);
        head.headers.remove(header::CONTENT_LENGTH);
        head.headers.remove(header::CONTENT_ENCODING);
        head.headers.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        );
        head.headers
            .insert(X_REQUEST_ID.clone(), self.request_id.clone());
        match self.settlement.take() {
            Some(mut s) => {
                s.permit().rate.write_headers(&mut head.headers);
                s.finish(None, 0);
            }
            None => {
                self.app
                    .metrics
                    .answered(self.route, status.as_u16(), self.started.elapsed(), None)
            }
        }
        Response::from_parts(head, crate::full_body(body))
    }
}

/// The whole body if it arrives within `timeout` and `ERROR_BODY_CAP`.
async fn read_bounded(body: UpstreamBody, timeout: Duration) -> Option<Bytes> {
    match tokio::time::timeout(timeout, Limited::new(body, ERROR_BODY_CAP).collect()).await {
        Ok(Ok(collected)) => Some(collected.to_bytes()),
        _ => None,
    }
}

/// `{"type":"error","error":{"type":"…",…},…}`.
fn is_anthropic_error(body: &[u8]) -> bool {
    let Ok(v) = serde_json::from_slice::<Value>(body) else {
        return false;
    };
    v["type"] == "error" && v["error"]["type"].is_string()
}

/// Anthropic's error for an upstream answer that is not in its shape: the
/// status's type, and the upstream's own message when it has one
/// (OpenAI's `error.message`, or a top-level `message`), except on 401 and
/// 403, which concern the gateway's own upstream key: their text may quote
/// part of it.
fn anthropic_error_from(
    status: StatusCode,
    body: Option<&[u8]>,
    upstream: &str,
    request_id: &str,
) -> Bytes {
    let theirs = body
        .and_then(|b| serde_json::from_slice::<Value>(b).ok())
        .and_then(|v| {
            v["error"]["message"]
                .as_str()
                .or(v["message"].as_str())
                .or(v["error"].as_str())
                .map(|m| truncate(m, 1024).to_owned())
        });
    let message = match (status.as_u16(), theirs) {
        (401 | 403, _) => format!(
            "Upstream {upstream} refused the gateway's credentials (status {}).",
            status.as_u16()
        ),
        (_, Some(m)) if !m.is_empty() => m,
        _ => format!("Upstream {upstream} answered status {}.", status.as_u16()),
    };
    Bytes::from(
        serde_json::to_vec(&json!({
            "type": "error",
            "error": {"type": anthropic_type(status), "message": message},
            "request_id": request_id,
        }))
        .expect("a Value always serializes"),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(b: &Bytes) -> Value {
        serde_json::from_slice(b).unwrap()
    }

    #[test]
    fn anthropic_errors_are_recognised() {
        assert!(is_anthropic_error(
            br#"{"type":"error","error":{"type":"overloaded_error","message":"Overloaded"}}"#
        ));
        assert!(!is_anthropic_error(
            br#"{"error":{"message":"Rate limit","type":"requests","code":"rate_limit_exceeded"}}"#
        ));
        assert!(!is_anthropic_error(b"<html>502</html>"));
        assert!(!is_anthropic_error(br#"{"type":"error","error":"x"}"#));
    }

    #[test]
    fn other_errors_are_rewritten() {
        let openai =
            br#"{"error":{"message":"Rate limit reached","type":"requests","code":"rate_limit_exceeded"}}"#;
        let v = parse(&anthropic_error_from(
            StatusCode::TOO_MANY_REQUESTS,
            Some(openai),
            "up",
            "req_1",
        ));
        assert_eq!(v["type"], "error");
        assert_eq!(v["error"]["type"], "rate_limit_error");
        assert_eq!(v["error"]["message"], "Rate limit reached");
        assert_eq!(v["request_id"], "req_1");
        let v = parse(&anthropic_error_from(
            StatusCode::BAD_GATEWAY,
            Some(b"<html>bad gateway</html>"),
            "up",
            "r",
        ));
        assert_eq!(v["error"]["type"], "api_error");
        assert_eq!(v["error"]["message"], "Upstream up answered status 502.");
        let leaky = br#"{"error":{"message":"Incorrect API key provided: sk-up***xyz"}}"#;
        let v = parse(&anthropic_error_from(
            StatusCode::UNAUTHORIZED,
            Some(leaky),
            "up",
            "r",
        ));
        assert_eq!(v["error"]["type"], "authentication_error");
        assert!(!v.to_string().contains("sk-up"), "{v}");
        let v = parse(&anthropic_error_from(
            StatusCode::from_u16(529).unwrap(),
            None,
            "up",
            "r",
        ));
        assert_eq!(v["error"]["type"], "overloaded_error");
    }
}
