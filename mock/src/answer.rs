//! What an answer is before it becomes a response, and what every response
//! carries: content type, request id, the provider's account headers.

use bytes::Bytes;
use http::header::{CONTENT_TYPE, HeaderValue};
use http::{HeaderMap, Response, StatusCode};
use serde_json::Value;

use crate::body::{MockBody, Script};
use crate::served::Work;

pub(crate) const SSE_CONTENT_TYPE: &str = "text/event-stream; charset=utf-8";
pub(crate) const JSON_CONTENT_TYPE: &str = "application/json";

/// Whose API a route belongs to: it decides the error shape and the account
/// headers of the answer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Api {
    OpenAi,
    Anthropic,
}

impl Api {
    /// Anthropic for `/v1/messages` and below, and for `/v1/models` asked
    /// with `anthropic-version` (the Anthropic SDK's `models.list`); OpenAI
    /// for the rest.
    pub(crate) fn of(path: &str, headers: &HeaderMap) -> Api {
        let under = |prefix: &str| {
            path.strip_prefix(prefix)
                .is_some_and(|rest| rest.is_empty() || rest.starts_with('/'))
        };
        if under("/v1/messages")
            || (under("/v1/models") && headers.contains_key("anthropic-version"))
        {
            Api::Anthropic
        } else {
            Api::OpenAi
        }
    }
}

/// The account headers OpenAI sends on every answer: which organisation and
/// project the key bills, and its rate limits.
const OPENAI_HEADERS: [(&str, &str); 10] = [
    ("openai-organization", "org-tollgate-mock"),
    ("openai-project", "proj_tollgatemock"),
    ("openai-version", "2020-10-01"),
    ("openai-processing-ms", "1"),
    ("x-ratelimit-limit-requests", "10000"),
    ("x-ratelimit-limit-tokens", "30000000"),
    ("x-ratelimit-remaining-requests", "9999"),
    ("x-ratelimit-remaining-tokens", "29999000"),
    ("x-ratelimit-reset-requests", "6ms"),
    ("x-ratelimit-reset-tokens", "2ms"),
];

/// The account headers Anthropic sends on every answer.
const ANTHROPIC_HEADERS: [(&str, &str); 9] = [
    (
        "anthropic-organization-id",
        "00000000-0000-4000-8000-00000000beef",
    ),
    ("anthropic-ratelimit-requests-limit", "4000"),
    ("anthropic-ratelimit-requests-remaining", "3999"),
    ("anthropic-ratelimit-requests-reset", "2026-01-01T00:00:01Z"),
    ("anthropic-ratelimit-tokens-limit", "2000000"),
    ("anthropic-ratelimit-tokens-remaining", "1999000"),
    ("anthropic-ratelimit-tokens-reset", "2026-01-01T00:00:01Z"),
    ("anthropic-ratelimit-input-tokens-limit", "2000000"),
    ("anthropic-ratelimit-output-tokens-limit", "400000"),
];

/// Names of the upstream-account headers the mock sends on every answer
/// (OpenAI's on OpenAI routes, Anthropic's on `/v1/messages`): a gateway
/// must not pass them on, since they describe the operator's account.
pub const ACCOUNT_HEADERS: [&str; 19] = [
    OPENAI_HEADERS[0].0,
    OPENAI_HEADERS[1].0,
    OPENAI_HEADERS[2].0,
    OPENAI_HEADERS[3].0,
    OPENAI_HEADERS[4].0,
    OPENAI_HEADERS[5].0,
    OPENAI_HEADERS[6].0,
    OPENAI_HEADERS[7].0,
    OPENAI_HEADERS[8].0,
    OPENAI_HEADERS[9].0,
    ANTHROPIC_HEADERS[0].0,
    ANTHROPIC_HEADERS[1].0,
    ANTHROPIC_HEADERS[2].0,
    ANTHROPIC_HEADERS[3].0,
    ANTHROPIC_HEADERS[4].0,
    ANTHROPIC_HEADERS[5].0,
    ANTHROPIC_HEADERS[6].0,
    ANTHROPIC_HEADERS[7].0,
    ANTHROPIC_HEADERS[8].0,
];

/// Adds the provider's account headers and request id.
pub(crate) fn account_headers(api: Api, seq: u64, headers: &mut HeaderMap) {
    let (list, id_header): (&[(&str, &str)], _) = match api {
        Api::OpenAi => (&OPENAI_HEADERS, "x-request-id"),
        Api::Anthropic => (&ANTHROPIC_HEADERS, "request-id"),
    };
    for (name, value) in list {
        headers.insert(*name, HeaderValue::from_static(value));
    }
    if let Ok(id) = HeaderValue::try_from(format!("req_mock{seq:016x}")) {
        headers.insert(id_header, id);
    }
}

/// OpenAI's mid-stream error, as its API sends one when a model fails
/// after the stream began.
pub(crate) const OPENAI_STREAM_ERROR: &[u8] = b"data: {\"error\":{\"message\":\"The server had an error while processing your request. Sorry about that!\",\"type\":\"server_error\",\"param\":null,\"code\":null}}\n\n";

/// Anthropic's mid-stream error event.
pub(crate) const ANTHROPIC_STREAM_ERROR: &[u8] = b"event: error\ndata: {\"type\":\"error\",\"error\":{\"type\":\"overloaded_error\",\"message\":\"Overloaded\"}}\n\n";

/// A successful answer before it becomes a body.
pub(crate) enum Answer {
    /// A whole JSON (or other) document.
    Json(Bytes),
    /// An SSE stream, and the error event a fault may end it with.
    Stream(Script, &'static [u8]),
}

/// What an endpoint answers.
pub(crate) struct Reply {
    /// 200 unless the endpoint says otherwise.
    pub(crate) status: StatusCode,
    /// The `content-type` header.
    pub(crate) content_type: &'static str,
    /// The body to send.
    pub(crate) answer: Answer,
    /// Tokens of work the answer did up front, for the tally.
    pub(crate) work: Option<Work>,
}

impl Reply {
    /// 200 with this JSON value, no token work.
    pub(crate) fn json(value: &Value) -> Reply {
        Reply {
            status: StatusCode::OK,
            content_type: JSON_CONTENT_TYPE,
            answer: Answer::Json(json_bytes(value)),
            work: None,
        }
    }

    /// 200 with this JSON value, which did this work.
    pub(crate) fn json_work(value: &Value, work: Work) -> Reply {
        Reply {
            work: Some(work),
            ..Reply::json(value)
        }
    }

    /// 200 with a stream; `work` is what was done before its first frame.
    pub(crate) fn stream(script: Script, error_event: &'static [u8], work: Work) -> Reply {
        Reply {
            status: StatusCode::OK,
            content_type: SSE_CONTENT_TYPE,
            answer: Answer::Stream(script, error_event),
            work: Some(work),
        }
    }
}

pub(crate) fn respond(
    status: StatusCode,
    content_type: &'static str,
    body: MockBody,
) -> Response<MockBody> {
    let mut response = Response::new(body);
    *response.status_mut() = status;
    response
        .headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static(content_type));
    response
}

pub(crate) fn json_bytes(value: &Value) -> Bytes {
    Bytes::from(serde_json::to_vec(value).expect("a serde_json::Value always serializes"))
}
