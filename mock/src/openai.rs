//! OpenAI's chat completions, legacy completions, embeddings and models, with
//! the chunk script that streams chat and legacy completions.

use bytes::Bytes;
use http::{HeaderMap, StatusCode};
use serde_json::{Map, Value, json};

use crate::answer::{Api, OPENAI_STREAM_ERROR, Reply};
use crate::body::Script;
use crate::error::ApiError;
use crate::fields::{flag, include_usage, max_tokens, model_name};
use crate::knobs::Knobs;
use crate::plan::{
    MESSAGE_OVERHEAD, Plan, answer_text, content_bytes, json_string, text_tokens, unix_now, word,
};
use crate::served::{Tokens, Work};
use crate::server::State;

pub(crate) const FINGERPRINT: &str = "fp_tollgate_mock";

/// `GET /v1/models`: OpenAI's list, or Anthropic's when the request carries
/// `anthropic-version` (as the Anthropic SDK's `models.list` does).
pub(crate) fn models(state: &State, headers: &HeaderMap) -> Reply {
    let models = &state.opts.models;
    if Api::of("/v1/models", headers) == Api::Anthropic {
        let data: Vec<Value> = models
            .iter()
            .map(|id| {
                json!({
                    "type": "model",
                    "id": id,
                    "display_name": id,
                    "created_at": "2025-01-01T00:00:00Z",
                })
            })
            .collect();
        return Reply::json(&json!({
            "data": data,
            "has_more": false,
            "first_id": models.first(),
            "last_id": models.last(),
        }));
    }
    let data: Vec<Value> = models.iter().map(|id| model_object(id)).collect();
    Reply::json(&json!({"object": "list", "data": data}))
}

pub(crate) fn model(state: &State, id: &str) -> Result<Reply, ApiError> {
    if !state.opts.models.iter().any(|known| known == id) {
        return Err(ApiError {
            status: StatusCode::NOT_FOUND,
            code: Some("model_not_found"),
            ..ApiError::invalid(format!("The model '{id}' does not exist"), Some("model"))
        });
    }
    Ok(Reply::json(&model_object(id)))
}

pub(crate) fn model_object(id: &str) -> Value {
    json!({"id": id, "object": "model", "created": 1_700_000_000, "owned_by": "tollgate-mock"})
}

pub(crate) type Answered = Result<Reply, ApiError>;

pub(crate) fn chat(seq: u64, request: &Map<String, Value>, knobs: &Knobs) -> Answered {
    let model = model_name(request)?;
    let messages = match request.get("messages") {
        Some(Value::Array(messages)) if !messages.is_empty() => messages,
        None | Some(Value::Null) => return Err(ApiError::missing("messages")),
        Some(_) => return Err(ApiError::wrong_type("messages", "a non-empty array")),
    };
    let prompt = messages
        .iter()
        .map(|message| text_tokens(content_bytes(message.get("content"))) + MESSAGE_OVERHEAD)
        .sum();
    let stream = flag(request, "stream")?;
    let include_usage = include_usage(request, stream)?;
    let max = max_tokens(request, &["max_completion_tokens", "max_tokens"])?;
    let plan = Plan::new(prompt, max, knobs, knobs.reasoning, knobs.cached);
    let id = format!("chatcmpl-mock{seq:016x}");
    let created = unix_now();
    if stream {
        let script = ChunkScript::new(ChunkShape::Chat, &id, created, model, &plan, include_usage);
        return Ok(Reply::stream(
            Script::Chunks(script),
            OPENAI_STREAM_ERROR,
            plan.work_before_stream(model),
        ));
    }
    let mut body = json!({
        "id": id,
        "object": "chat.completion",
        "created": created,
        "model": model,
        "choices": [{
            "index": 0,
            "message": {
                "role": "assistant",
                "content": answer_text(plan.visible),
                "refusal": null,
                "annotations": [],
            },
            "logprobs": null,
            "finish_reason": plan.finish_reason(),
        }],
        "service_tier": "default",
        "system_fingerprint": FINGERPRINT,
    });
    if plan.usage {
        body["usage"] = plan.chat_usage();
    }
    Ok(Reply::json_work(&body, plan.work(model)))
}

pub(crate) fn completions(seq: u64, request: &Map<String, Value>, knobs: &Knobs) -> Answered {
    let model = model_name(request)?;
    let prompt = match request.get("prompt") {
        None | Some(Value::Null) => 0,
        Some(Value::String(text)) => text_tokens(text.len()),
        Some(Value::Array(prompts)) => prompts
            .iter()
            .map(|prompt| match prompt {
                Value::String(text) => text_tokens(text.len()),
                Value::Array(token_ids) => u64::try_from(token_ids.len()).unwrap_or(u64::MAX),
                _ => 1, // one token id
            })
            .sum(),
        Some(_) => return Err(ApiError::wrong_type("prompt", "a string or an array")),
    };
    let stream = flag(request, "stream")?;
    let include_usage = include_usage(request, stream)?;
    let max = max_tokens(request, &["max_tokens"])?;
    // The legacy endpoint reports neither cached nor reasoning tokens.
    let plan = Plan::new(prompt, max, knobs, 0, 0);
    let id = format!("cmpl-mock{seq:016x}");
    let created = unix_now();
    if stream {
        let script = ChunkScript::new(ChunkShape::Text, &id, created, model, &plan, include_usage);
        return Ok(Reply::stream(
            Script::Chunks(script),
            OPENAI_STREAM_ERROR,
            plan.work_before_stream(model),
        ));
    }
    let mut body = json!({
        "id": id,
        "object": "text_completion",
        "created": created,
        "model": model,
        "choices": [{
            "text": answer_text(plan.visible),
            "index": 0,
            "logprobs": null,
            "finish_reason": plan.finish_reason(),
        }],
        "system_fingerprint": null,
    });
    if plan.usage {
        body["usage"] = plan.legacy_usage();
    }
    Ok(Reply::json_work(&body, plan.work(model)))
}

pub(crate) fn embeddings(request: &Map<String, Value>) -> Answered {
    let model = model_name(request)?;
    let inputs: Vec<&Value> = match request.get("input") {
        None | Some(Value::Null) => return Err(ApiError::missing("input")),
        Some(text @ Value::String(_)) => vec![text],
        // An array of token ids is one input.
        Some(array @ Value::Array(items)) if items.iter().all(Value::is_number) => {
            if items.is_empty() {
                return Err(ApiError::invalid(
                    "'input' must not be empty.".into(),
                    Some("input"),
                ));
            }
            vec![array]
        }
        Some(Value::Array(items)) if !items.is_empty() => items.iter().collect(),
        Some(_) => {
            return Err(ApiError::wrong_type(
                "input",
                "a string or a non-empty array",
            ));
        }
    };
    let dimensions = match request.get("dimensions") {
        None | Some(Value::Null) => 8,
        Some(value) => value
            .as_u64()
            .filter(|d| (1..=4096).contains(d))
            .and_then(|d| usize::try_from(d).ok())
            .ok_or_else(|| ApiError::wrong_type("dimensions", "an integer from 1 to 4096"))?,
    };
    let mut prompt = 0u64;
    let mut data = Vec::with_capacity(inputs.len());
    for (index, input) in inputs.iter().enumerate() {
        prompt += match input {
            Value::String(text) => text_tokens(text.len()),
            Value::Array(token_ids) => u64::try_from(token_ids.len()).unwrap_or(u64::MAX),
            _ => {
                return Err(ApiError::wrong_type(
                    "input",
                    "strings or arrays of token ids",
                ));
            }
        };
        data.push(json!({
            "object": "embedding",
            "index": index,
            "embedding": embedding(input, dimensions),
        }));
    }
    Ok(Reply::json_work(
        &json!({
            "object": "list",
            "data": data,
            "model": model,
            "usage": {"prompt_tokens": prompt, "total_tokens": prompt},
        }),
        Work {
            model: model.to_owned(),
            tokens: Tokens {
                input: prompt,
                ..Tokens::default()
            },
        },
    ))
}

/// A unit vector derived from the input, so equal inputs embed equally.
pub(crate) fn embedding(input: &Value, dimensions: usize) -> Vec<f32> {
    // FNV-1a over the input's JSON text, then xorshift for each component.
    let mut state = input
        .to_string()
        .bytes()
        .fold(0xcbf2_9ce4_8422_2325_u64, |hash, byte| {
            (hash ^ u64::from(byte)).wrapping_mul(0x0000_0100_0000_01b3)
        })
        | 1;
    let mut vector: Vec<f32> = (0..dimensions)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            // 24 random bits into [-1, 1).
            ((state >> 40) as f32 / (1u32 << 23) as f32) - 1.0
        })
        .collect();
    let norm = vector.iter().map(|x| x * x).sum::<f32>().sqrt();
    if norm > 0.0 {
        for x in &mut vector {
            *x /= norm;
        }
    }
    vector
}

#[derive(Clone, Copy, PartialEq, Eq)]
pub(crate) enum ChunkShape {
    /// `chat.completion.chunk` with `delta`s; opens with a role-only chunk.
    Chat,
    /// Legacy `text_completion` chunks with `text`.
    Text,
}

/// Builds each SSE event of a chat or legacy completions stream when it is
/// sent, so a long answer costs no memory up front.
pub(crate) struct ChunkScript {
    pub(crate) shape: ChunkShape,
    /// `data: {"id":…,"object":…,"created":…,"model":…,…,"choices":[`
    pub(crate) head: String,
    /// `,"usage":null` when usage was asked for (OpenAI puts it on every chunk).
    pub(crate) usage_null: &'static str,
    pub(crate) visible: usize,
    pub(crate) finish_reason: &'static str,
    /// The usage-only chunk's `usage` value, when it is sent.
    pub(crate) usage: Option<String>,
}

impl ChunkScript {
    pub(crate) fn new(
        shape: ChunkShape,
        id: &str,
        created: u64,
        model: &str,
        plan: &Plan,
        include_usage: bool,
    ) -> ChunkScript {
        let (object, fingerprint) = match shape {
            ChunkShape::Chat => ("chat.completion.chunk", json_string(FINGERPRINT)),
            ChunkShape::Text => ("text_completion", "null".to_owned()),
        };
        let head = format!(
            "data: {{\"id\":\"{id}\",\"object\":\"{object}\",\"created\":{created},\"model\":{},\"system_fingerprint\":{fingerprint},\"choices\":[",
            json_string(model)
        );
        let usage = (include_usage && plan.usage).then(|| {
            let usage = match shape {
                ChunkShape::Chat => plan.chat_usage(),
                ChunkShape::Text => plan.legacy_usage(),
            };
            serde_json::to_string(&usage).expect("a serde_json::Value always serializes")
        });
        ChunkScript {
            shape,
            head,
            usage_null: if include_usage { ",\"usage\":null" } else { "" },
            visible: plan.visible,
            finish_reason: plan.finish_reason(),
            usage,
        }
    }

    /// Events before the first content chunk.
    fn lead(&self) -> usize {
        match self.shape {
            ChunkShape::Chat => 1,
            ChunkShape::Text => 0,
        }
    }

    pub(crate) fn len(&self) -> usize {
        // lead, content, finish chunk, usage chunk, [DONE]
        self.lead() + self.visible + 1 + usize::from(self.usage.is_some()) + 1
    }

    /// Output tokens in frame `index`: one per content chunk.
    pub(crate) fn tokens(&self, index: usize) -> u64 {
        let lead = self.lead();
        u64::from(index >= lead && index < lead + self.visible)
    }

    pub(crate) fn frame(&self, index: usize) -> Bytes {
        let lead = self.lead();
        let finish = lead + self.visible;
        if index == self.len() - 1 {
            return Bytes::from_static(b"data: [DONE]\n\n");
        }
        let choice = match (self.shape, index) {
            (ChunkShape::Chat, 0) => {
                "{\"index\":0,\"delta\":{\"role\":\"assistant\",\"content\":\"\",\"refusal\":null},\"logprobs\":null,\"finish_reason\":null}".to_owned()
            }
            (shape, index) if index < finish => {
                let (separator, word) = word(index - lead);
                match shape {
                    ChunkShape::Chat => format!(
                        "{{\"index\":0,\"delta\":{{\"content\":\"{separator}{word}\"}},\"logprobs\":null,\"finish_reason\":null}}"
                    ),
                    ChunkShape::Text => format!(
                        "{{\"text\":\"{separator}{word}\",\"index\":0,\"logprobs\":null,\"finish_reason\":null}}"
                    ),
                }
            }
            (shape, index) if index == finish => match shape {
                ChunkShape::Chat => format!(
                    "{{\"index\":0,\"delta\":{{}},\"logprobs\":null,\"finish_reason\":\"{}\"}}",
                    self.finish_reason
                ),
                ChunkShape::Text => format!(
                    "{{\"text\":\"\",\"index\":0,\"logprobs\":null,\"finish_reason\":\"{}\"}}",
                    self.finish_reason
                ),
            },
            _ => {
                // The usage-only chunk.
                let usage = self.usage.as_deref().unwrap_or("null");
                return Bytes::from(format!("{}],\"usage\":{usage}}}\n\n", self.head));
            }
        };
        Bytes::from(format!("{}{choice}]{}}}\n\n", self.head, self.usage_null))
    }
}
