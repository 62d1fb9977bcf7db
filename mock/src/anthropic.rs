//! Anthropic's Messages API: `POST /v1/messages` (JSON and the named-event
//! stream: `message_start`, `content_block_start`, `ping`,
//! `content_block_delta`, `content_block_stop`, `message_delta`,
//! `message_stop`) and `POST /v1/messages/count_tokens`.
//!
//! Usage is consistent with what was sent: `input_tokens` +
//! `cache_creation_input_tokens` + `cache_read_input_tokens` is the prompt,
//! `output_tokens` (cumulative in `message_delta`) counts thinking and text
//! tokens. `max_tokens` is required and bounds thinking and text together.

use std::collections::VecDeque;

use bytes::Bytes;
use http::HeaderMap;
use serde_json::{Map, Value, json};

use crate::answer::{ANTHROPIC_STREAM_ERROR, Reply};
use crate::body::Script;
use crate::error::ApiError;
use crate::fields::{flag, model_name};
use crate::knobs::Knobs;
use crate::plan::{MESSAGE_OVERHEAD, Plan, answer_text, content_bytes, text_tokens, word};
use crate::served::{Tokens, Work};

/// `x-api-key`, the way Anthropic's API takes its key.
pub(crate) fn check_key(headers: &HeaderMap, key: &str) -> Result<(), ApiError> {
    match headers.get("x-api-key").map(|v| v.to_str().unwrap_or("")) {
        None => Err(ApiError::unauthorized(
            "x-api-key header is required".into(),
            None,
        )),
        Some(given) if given == key => Ok(()),
        Some(_) => Err(ApiError::unauthorized("invalid x-api-key".into(), None)),
    }
}

/// Anthropic refuses a request without `anthropic-version`.
pub(crate) fn check_version(headers: &HeaderMap) -> Result<(), ApiError> {
    match headers.get("anthropic-version") {
        Some(value) if !value.is_empty() => Ok(()),
        _ => Err(ApiError::invalid(
            "anthropic-version: header is required".into(),
            None,
        )),
    }
}

/// Prompt tokens: `system`, each message (text blocks, tool results) with
/// the per-message overhead, and the `tools` definitions.
fn prompt_tokens(request: &Map<String, Value>) -> Result<u64, ApiError> {
    let messages = match request.get("messages") {
        Some(Value::Array(messages)) if !messages.is_empty() => messages,
        None | Some(Value::Null) => {
            return Err(ApiError::invalid("messages: Field required".into(), None));
        }
        Some(_) => {
            return Err(ApiError::invalid(
                "messages: Input should be a non-empty list".into(),
                None,
            ));
        }
    };
    let mut prompt: u64 = messages
        .iter()
        .map(|message| text_tokens(block_bytes(message.get("content"))) + MESSAGE_OVERHEAD)
        .sum();
    match request.get("system") {
        None | Some(Value::Null) => {}
        Some(system) => prompt += text_tokens(block_bytes(Some(system))) + MESSAGE_OVERHEAD,
    }
    if let Some(tools) = request.get("tools").filter(|tools| !tools.is_null()) {
        prompt += text_tokens(tools.to_string().len());
    }
    Ok(prompt)
}

/// Text bytes of a string or of content blocks (`text`, and `tool_result`
/// blocks' own content).
fn block_bytes(content: Option<&Value>) -> usize {
    match content {
        Some(Value::Array(blocks)) => blocks
            .iter()
            .map(|block| match block.get("type").and_then(Value::as_str) {
                Some("tool_result") => content_bytes(block.get("content")),
                _ => block
                    .get("text")
                    .and_then(Value::as_str)
                    .map_or(0, str::len),
            })
            .sum(),
        other => content_bytes(other),
    }
}

/// `max_tokens`: required, an integer ≥ 1.
fn required_max_tokens(request: &Map<String, Value>) -> Result<u64, ApiError> {
    match request.get("max_tokens") {
        None | Some(Value::Null) => Err(ApiError::invalid(
            "max_tokens: Field required".into(),
            Some("max_tokens"),
        )),
        Some(value) => value.as_u64().filter(|n| *n >= 1).ok_or_else(|| {
            ApiError::invalid(
                "max_tokens: Input should be an integer greater than or equal to 1".into(),
                Some("max_tokens"),
            )
        }),
    }
}

/// Thinking is spent only when the request enables it.
fn thinking_enabled(request: &Map<String, Value>) -> bool {
    request
        .get("thinking")
        .and_then(|thinking| thinking.get("type"))
        .and_then(Value::as_str)
        == Some("enabled")
}

/// How the prompt splits into fresh input, cache writes and cache reads.
#[derive(Clone, Copy)]
struct Cache {
    input: u64,
    write: u64,
    write_1h: u64,
    read: u64,
}

impl Cache {
    /// Reads first, then writes, both out of the prompt, so the three parts
    /// always add up to it.
    fn split(prompt: u64, knobs: &Knobs) -> Cache {
        let read = knobs.cache_read.min(prompt);
        let write = knobs.cache_write.min(prompt - read);
        Cache {
            input: prompt - read - write,
            write,
            write_1h: knobs.cache_write_1h.min(write),
            read,
        }
    }

    fn usage(&self, output: u64) -> Value {
        json!({
            "input_tokens": self.input,
            "cache_creation_input_tokens": self.write,
            "cache_read_input_tokens": self.read,
            "cache_creation": {
                "ephemeral_5m_input_tokens": self.write - self.write_1h,
                "ephemeral_1h_input_tokens": self.write_1h,
            },
            "output_tokens": output,
            "service_tier": "standard",
        })
    }

    fn tokens(&self) -> Tokens {
        Tokens {
            input: self.input,
            cache_write: self.write,
            cache_write_1h: self.write_1h,
            cache_read: self.read,
            ..Tokens::default()
        }
    }
}

fn stop_reason(plan: &Plan) -> &'static str {
    if plan.truncated {
        "max_tokens"
    } else {
        "end_turn"
    }
}

/// `POST /v1/messages`.
pub(crate) fn messages(
    seq: u64,
    request: &Map<String, Value>,
    knobs: &Knobs,
) -> Result<Reply, ApiError> {
    let model = model_name(request)?;
    let max = required_max_tokens(request)?;
    let prompt = prompt_tokens(request)?;
    let stream = flag(request, "stream")?;
    let reasoning = if thinking_enabled(request) {
        knobs.reasoning
    } else {
        0
    };
    let plan = Plan::new(prompt, Some(max), knobs, reasoning, 0);
    let cache = Cache::split(prompt, knobs);
    let id = format!("msg_mock{seq:016x}");
    let mut tokens = cache.tokens();
    if !stream {
        let mut content = Vec::new();
        if plan.reasoning > 0 {
            content.push(json!({
                "type": "thinking",
                "thinking": answer_text(usize::try_from(plan.reasoning).unwrap_or(usize::MAX)),
                "signature": "mock-signature",
            }));
        }
        content.push(json!({"type": "text", "text": answer_text(plan.visible)}));
        let mut body = json!({
            "id": id,
            "type": "message",
            "role": "assistant",
            "model": model,
            "content": content,
            "stop_reason": stop_reason(&plan),
            "stop_sequence": null,
        });
        if plan.usage {
            body["usage"] = cache.usage(plan.completion());
        }
        tokens.output = plan.completion();
        tokens.reasoning = plan.reasoning;
        let work = Work {
            model: model.to_owned(),
            tokens,
        };
        return Ok(Reply::json_work(&body, work));
    }
    // Thinking tokens are streamed (one delta each) and counted as frames.
    tokens.reasoning = plan.reasoning;
    let work = Work {
        model: model.to_owned(),
        tokens,
    };
    Ok(Reply::stream(
        Script::Events(events(&id, model, &plan, &cache)),
        ANTHROPIC_STREAM_ERROR,
        work,
    ))
}

/// `event: NAME\ndata: {"type":NAME,…payload}\n\n`, with `type` first as
/// Anthropic writes it (the payload's own `type`, if any, is dropped).
fn event(name: &str, payload: &Value) -> Bytes {
    let mut payload = payload.clone();
    if let Some(fields) = payload.as_object_mut() {
        fields.remove("type");
    }
    let payload = payload.to_string();
    let rest = payload.strip_prefix('{').unwrap_or(&payload);
    let separator = if rest == "}" { "" } else { "," };
    Bytes::from(format!(
        "event: {name}\ndata: {{\"type\":\"{name}\"{separator}{rest}\n\n"
    ))
}

/// The whole event sequence of a streamed answer, each event with the output
/// tokens it carries.
fn events(id: &str, model: &str, plan: &Plan, cache: &Cache) -> VecDeque<(Bytes, u64)> {
    let reasoning = usize::try_from(plan.reasoning).unwrap_or(usize::MAX);
    let mut events = VecDeque::with_capacity(plan.visible + reasoning + 12);
    // Anthropic reports a small running output count at the start (with
    // the input, cache and TTL-split cache-write counts); the
    // `message_delta` carries the final, cumulative one.
    let mut start_usage = cache.usage(plan.completion().min(1));
    if let Some(usage) = start_usage.as_object_mut() {
        usage.remove("service_tier");
    }
    let usage = if plan.usage { start_usage } else { Value::Null };
    events.push_back((
        event(
            "message_start",
            &json!({"type": "message_start", "message": {
                "id": id,
                "type": "message",
                "role": "assistant",
                "model": model,
                "content": [],
                "stop_reason": null,
                "stop_sequence": null,
                "usage": usage,
            }}),
        ),
        0,
    ));
    let mut index = 0;
    if reasoning > 0 {
        events.push_back((
            event(
                "content_block_start",
                &json!({"type": "content_block_start", "index": index,
                    "content_block": {"type": "thinking", "thinking": "", "signature": ""}}),
            ),
            0,
        ));
        for token in 0..reasoning {
            let (separator, word) = word(token);
            events.push_back((
                Bytes::from(format!(
                    "event: content_block_delta\ndata: {{\"type\":\"content_block_delta\",\"index\":{index},\"delta\":{{\"type\":\"thinking_delta\",\"thinking\":\"{separator}{word}\"}}}}\n\n"
                )),
                1,
            ));
        }
        events.push_back((
            event(
                "content_block_delta",
                &json!({"type": "content_block_delta", "index": index,
                    "delta": {"type": "signature_delta", "signature": "mock-signature"}}),
            ),
            0,
        ));
        events.push_back((
            event(
                "content_block_stop",
                &json!({"type": "content_block_stop", "index": index}),
            ),
            0,
        ));
        index += 1;
    }
    events.push_back((
        event(
            "content_block_start",
            &json!({"type": "content_block_start", "index": index,
                "content_block": {"type": "text", "text": ""}}),
        ),
        0,
    ));
    events.push_back((event("ping", &json!({"type": "ping"})), 0));
    for token in 0..plan.visible {
        let (separator, word) = word(token);
        events.push_back((
            Bytes::from(format!(
                "event: content_block_delta\ndata: {{\"type\":\"content_block_delta\",\"index\":{index},\"delta\":{{\"type\":\"text_delta\",\"text\":\"{separator}{word}\"}}}}\n\n"
            )),
            1,
        ));
    }
    events.push_back((
        event(
            "content_block_stop",
            &json!({"type": "content_block_stop", "index": index}),
        ),
        0,
    ));
    let delta_usage = if plan.usage {
        json!({"output_tokens": plan.completion()})
    } else {
        Value::Null
    };
    events.push_back((
        event(
            "message_delta",
            &json!({"type": "message_delta",
                "delta": {"stop_reason": stop_reason(plan), "stop_sequence": null},
                "usage": delta_usage}),
        ),
        0,
    ));
    events.push_back((event("message_stop", &json!({"type": "message_stop"})), 0));
    events
}

/// `POST /v1/messages/count_tokens`: the prompt's tokens, no work done.
pub(crate) fn count_tokens(request: &Map<String, Value>) -> Result<Reply, ApiError> {
    model_name(request)?;
    Ok(Reply::json(
        &json!({"input_tokens": prompt_tokens(request)?}),
    ))
}
