//! OpenAI's Responses API: the answer object and its streamed event sequence.

use std::collections::VecDeque;

use bytes::Bytes;
use serde_json::{Map, Value, json};

use crate::answer::{OPENAI_STREAM_ERROR, Reply};
use crate::body::Script;
use crate::error::ApiError;
use crate::fields::{flag, max_tokens, model_name};
use crate::knobs::Knobs;
use crate::openai::Answered;
use crate::plan::{
    MESSAGE_OVERHEAD, Plan, answer_text, content_bytes, text_tokens, unix_now, word,
};
use crate::server::State;

/// `POST /v1/responses`. Stored (OpenAI's default, `store: true`) answers
/// can be fetched again from `/v1/responses/{id}`; `background: true`
/// answers a queued stub with no usage at once, and the finished response,
/// with its usage, is what a later fetch returns, as OpenAI does.
pub(crate) fn create(
    state: &State,
    seq: u64,
    request: &Map<String, Value>,
    knobs: &Knobs,
) -> Answered {
    let model = model_name(request)?;
    let mut prompt = match request.get("input") {
        None | Some(Value::Null) => return Err(ApiError::missing("input")),
        Some(Value::String(text)) => text_tokens(text.len()) + MESSAGE_OVERHEAD,
        Some(Value::Array(items)) => items
            .iter()
            .map(|item| {
                let bytes = match item.get("content") {
                    Some(content) => content_bytes(Some(content)),
                    // function_call_output and similar items carry `output`.
                    None => content_bytes(item.get("output")),
                };
                text_tokens(bytes) + MESSAGE_OVERHEAD
            })
            .sum(),
        Some(_) => return Err(ApiError::wrong_type("input", "a string or an array")),
    };
    let instructions = match request.get("instructions") {
        Some(Value::String(text)) => {
            prompt += text_tokens(text.len()) + MESSAGE_OVERHEAD;
            Value::String(text.clone())
        }
        _ => Value::Null,
    };
    let stream = flag(request, "stream")?;
    let background = flag(request, "background")?;
    let store = match request.get("store") {
        None | Some(Value::Null) => true,
        Some(Value::Bool(store)) => *store,
        Some(_) => return Err(ApiError::wrong_type("store", "a boolean")),
    };
    if background && !store {
        return Err(ApiError::invalid(
            "Background responses must be stored: 'background' needs 'store' to be true.".into(),
            Some("background"),
        ));
    }
    let max = max_tokens(request, &["max_output_tokens"])?;
    let plan = Plan::new(prompt, max, knobs, knobs.reasoning, knobs.cached);
    let nonce = state.nonce;
    let shape = ResponseShape {
        id: format!("resp_{nonce:08x}{seq:016x}"),
        message_id: format!("msg_{nonce:08x}{seq:016x}"),
        reasoning_id: format!("rs_{nonce:08x}{seq:016x}"),
        created: unix_now(),
        model,
        instructions,
        max_output_tokens: max,
        store,
        background,
    };
    let text = answer_text(plan.visible);
    let done = shape.object(&plan, Some(&text));
    if store {
        state.objects.keep_response(&shape.id, done.clone());
    }
    if background {
        let mut queued = shape.object(&plan, None);
        queued["status"] = json!("queued");
        return Ok(Reply::json_work(&queued, plan.work(model)));
    }
    if !stream {
        return Ok(Reply::json_work(&done, plan.work(model)));
    }
    Ok(Reply::stream(
        Script::Events(shape.events(&plan, &text)),
        OPENAI_STREAM_ERROR,
        plan.work_before_stream(model),
    ))
}

/// What the objects of one Responses API answer share.
struct ResponseShape<'a> {
    /// `resp_…`, unique per server and across servers.
    id: String,
    /// The output message's id.
    message_id: String,
    /// The reasoning item's id.
    reasoning_id: String,
    /// Unix seconds.
    created: u64,
    /// As requested.
    model: &'a str,
    /// As requested, or null.
    instructions: Value,
    /// As requested, or null.
    max_output_tokens: Option<u64>,
    /// Whether the response is kept for `/v1/responses/{id}`.
    store: bool,
    /// Whether it was asked to run in the background.
    background: bool,
}

impl ResponseShape<'_> {
    /// The `response` object: in progress (no `text`) or finished.
    fn object(&self, plan: &Plan, text: Option<&str>) -> Value {
        let (status, output, usage, incomplete) = match text {
            None => ("in_progress", Vec::new(), Value::Null, Value::Null),
            Some(text) => {
                let mut output = Vec::new();
                if plan.reasoning > 0 {
                    output.push(self.reasoning_item());
                }
                output.push(self.message_item(plan, text));
                let incomplete = if plan.truncated {
                    json!({"reason": "max_output_tokens"})
                } else {
                    Value::Null
                };
                (
                    self.final_status(plan),
                    output,
                    plan.responses_usage(),
                    incomplete,
                )
            }
        };
        json!({
            "id": self.id,
            "object": "response",
            "created_at": self.created,
            "status": status,
            "error": null,
            "incomplete_details": incomplete,
            "instructions": self.instructions,
            "max_output_tokens": self.max_output_tokens,
            "model": self.model,
            "output": output,
            "parallel_tool_calls": true,
            "previous_response_id": null,
            "reasoning": {"effort": null, "summary": null},
            "store": self.store,
            "background": self.background,
            "temperature": 1.0,
            "text": {"format": {"type": "text"}},
            "tool_choice": "auto",
            "tools": [],
            "top_p": 1.0,
            "truncation": "disabled",
            "usage": usage,
            "user": null,
            "metadata": {},
        })
    }

    fn final_status(&self, plan: &Plan) -> &'static str {
        if plan.truncated {
            "incomplete"
        } else {
            "completed"
        }
    }

    fn reasoning_item(&self) -> Value {
        json!({"id": self.reasoning_id, "type": "reasoning", "summary": []})
    }

    fn text_part(text: &str) -> Value {
        json!({"type": "output_text", "annotations": [], "logprobs": [], "text": text})
    }

    fn message_item(&self, plan: &Plan, text: &str) -> Value {
        json!({
            "id": self.message_id,
            "type": "message",
            "status": self.final_status(plan),
            "content": [Self::text_part(text)],
            "role": "assistant",
        })
    }

    /// The whole event sequence of a streamed answer, as OpenAI sends it:
    /// created, in_progress, output items with one text delta per token, and
    /// `response.completed` (or `response.incomplete` when `max_output_tokens`
    /// cut the answer) carrying the usage.
    /// Each event with the output tokens it carries (one per text delta).
    fn events(&self, plan: &Plan, text: &str) -> VecDeque<(Bytes, u64)> {
        let mut events = VecDeque::with_capacity(plan.visible + 12);
        let mut sequence = 0u64;
        let mut push = |events: &mut VecDeque<(Bytes, u64)>, name: &str, payload: Value| {
            events.push_back((sse_event(name, sequence, &payload), 0));
            sequence += 1;
        };
        let started = self.object(plan, None);
        push(
            &mut events,
            "response.created",
            json!({"response": started}),
        );
        push(
            &mut events,
            "response.in_progress",
            json!({"response": started}),
        );
        let mut output_index = 0;
        if plan.reasoning > 0 {
            let item = self.reasoning_item();
            push(
                &mut events,
                "response.output_item.added",
                json!({"output_index": 0, "item": item}),
            );
            push(
                &mut events,
                "response.output_item.done",
                json!({"output_index": 0, "item": item}),
            );
            output_index = 1;
        }
        push(
            &mut events,
            "response.output_item.added",
            json!({"output_index": output_index, "item": {
                "id": self.message_id,
                "type": "message",
                "status": "in_progress",
                "content": [],
                "role": "assistant",
            }}),
        );
        push(
            &mut events,
            "response.content_part.added",
            json!({
                "item_id": self.message_id,
                "output_index": output_index,
                "content_index": 0,
                "part": Self::text_part(""),
            }),
        );
        for index in 0..plan.visible {
            let (separator, word) = word(index);
            events.push_back((Bytes::from(format!(
                "event: response.output_text.delta\ndata: {{\"type\":\"response.output_text.delta\",\"sequence_number\":{sequence},\"item_id\":\"{}\",\"output_index\":{output_index},\"content_index\":0,\"delta\":\"{separator}{word}\",\"logprobs\":[]}}\n\n",
                self.message_id
            )), 1));
            sequence += 1;
        }
        let mut push = |events: &mut VecDeque<(Bytes, u64)>, name: &str, payload: Value| {
            events.push_back((sse_event(name, sequence, &payload), 0));
            sequence += 1;
        };
        push(
            &mut events,
            "response.output_text.done",
            json!({
                "item_id": self.message_id,
                "output_index": output_index,
                "content_index": 0,
                "text": text,
                "logprobs": [],
            }),
        );
        push(
            &mut events,
            "response.content_part.done",
            json!({
                "item_id": self.message_id,
                "output_index": output_index,
                "content_index": 0,
                "part": Self::text_part(text),
            }),
        );
        push(
            &mut events,
            "response.output_item.done",
            json!({"output_index": output_index, "item": self.message_item(plan, text)}),
        );
        let last = if plan.truncated {
            "response.incomplete"
        } else {
            "response.completed"
        };
        push(
            &mut events,
            last,
            json!({"response": self.object(plan, Some(text))}),
        );
        events
    }
}

/// `event: NAME\ndata: {"type":NAME,"sequence_number":N,…payload}\n\n`, with
/// `type` first as OpenAI writes it.
pub(crate) fn sse_event(name: &str, sequence: u64, payload: &Value) -> Bytes {
    let payload = serde_json::to_string(payload).expect("a serde_json::Value always serializes");
    let rest = payload.strip_prefix('{').unwrap_or(&payload);
    let separator = if rest == "}" { "" } else { "," };
    Bytes::from(format!(
        "event: {name}\ndata: {{\"type\":\"{name}\",\"sequence_number\":{sequence}{separator}{rest}\n\n"
    ))
}
