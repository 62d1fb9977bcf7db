//! Error answers in the provider's shape: OpenAI's
//! `{"error":{"message","type","param","code"}}`, Anthropic's
//! `{"type":"error","error":{"type","message"},"request_id"}`.

use http::header::{HeaderValue, RETRY_AFTER};
use http::{Method, Response, StatusCode};
use serde_json::json;

use crate::answer::{Api, JSON_CONTENT_TYPE, json_bytes, respond};
use crate::body::MockBody;

/// An error answer; its shape follows the route's provider.
#[derive(Debug)]
pub(crate) struct ApiError {
    /// The answer's status; Anthropic's error `type` follows from it.
    pub(crate) status: StatusCode,
    /// Said to the client.
    pub(crate) message: String,
    /// OpenAI's error `type`.
    pub(crate) kind: &'static str,
    /// OpenAI's `param`: the request field at fault.
    pub(crate) param: Option<&'static str>,
    /// OpenAI's `code`.
    pub(crate) code: Option<&'static str>,
}

impl ApiError {
    pub(crate) fn invalid(message: String, param: Option<&'static str>) -> ApiError {
        ApiError {
            status: StatusCode::BAD_REQUEST,
            message,
            kind: "invalid_request_error",
            param,
            code: None,
        }
    }

    pub(crate) fn missing(param: &'static str) -> ApiError {
        ApiError {
            code: Some("missing_required_parameter"),
            ..ApiError::invalid(
                format!("Missing required parameter: '{param}'."),
                Some(param),
            )
        }
    }

    pub(crate) fn wrong_type(param: &'static str, expected: &str) -> ApiError {
        ApiError {
            code: Some("invalid_type"),
            ..ApiError::invalid(
                format!("Invalid type for '{param}': expected {expected}."),
                Some(param),
            )
        }
    }

    pub(crate) fn not_found(method: &Method, path: &str) -> ApiError {
        ApiError {
            status: StatusCode::NOT_FOUND,
            ..ApiError::invalid(format!("Invalid URL ({method} {path})"), None)
        }
    }

    /// A 401 in the provider's words.
    pub(crate) fn unauthorized(message: String, code: Option<&'static str>) -> ApiError {
        ApiError {
            status: StatusCode::UNAUTHORIZED,
            code,
            ..ApiError::invalid(message, None)
        }
    }

    pub(crate) fn response(self, api: Api, seq: u64) -> Response<MockBody> {
        let body = match api {
            Api::OpenAi => json!({"error": {
                "message": self.message,
                "type": self.kind,
                "param": self.param,
                "code": self.code,
            }}),
            Api::Anthropic => json!({
                "type": "error",
                "error": {"type": anthropic_type(self.status), "message": self.message},
                "request_id": format!("req_mock{seq:016x}"),
            }),
        };
        let mut response = respond(
            self.status,
            JSON_CONTENT_TYPE,
            MockBody::buffered(json_bytes(&body), None),
        );
        if self.status == StatusCode::TOO_MANY_REQUESTS {
            response
                .headers_mut()
                .insert(RETRY_AFTER, HeaderValue::from_static("1"));
        }
        response
    }
}

pub(crate) fn status_fault(status: u16) -> ApiError {
    let status = StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    let (message, kind, code) = match status.as_u16() {
        400 => ("Bad request (mock fault).", "invalid_request_error", None),
        401 => (
            "Incorrect API key provided.",
            "invalid_request_error",
            Some("invalid_api_key"),
        ),
        403 => (
            "You are not allowed to sample from this model.",
            "permission_error",
            None,
        ),
        404 => (
            "The model does not exist or you do not have access to it.",
            "invalid_request_error",
            Some("model_not_found"),
        ),
        429 => (
            "Rate limit reached for requests (mock fault).",
            "requests",
            Some("rate_limit_exceeded"),
        ),
        500 => (
            "The server had an error while processing your request.",
            "server_error",
            None,
        ),
        503 => (
            "The server is overloaded or not ready yet.",
            "server_error",
            None,
        ),
        529 => ("Overloaded", "server_error", None),
        _ => ("Mock upstream fault.", "server_error", None),
    };
    ApiError {
        status,
        message: message.into(),
        kind,
        param: None,
        code,
    }
}

/// Anthropic's error `type` for a status.
fn anthropic_type(status: StatusCode) -> &'static str {
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
        _ => "api_error",
    }
}
