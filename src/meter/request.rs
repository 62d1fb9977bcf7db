//! What a request asks for: model, stream, completion bound and a bound of
//! its prompt, read from the body without building a `serde_json::Value`.

use std::borrow::Cow;

use serde::Deserialize;
use serde::de::{self, DeserializeSeed, Deserializer, IgnoredAny, MapAccess, SeqAccess, Visitor};
use serde_json::value::RawValue;

use super::Endpoint;
use crate::error::ApiError;

/// Tokens one image can cost at most. OpenAI's most expensive per-image
/// accounting is gpt-4o-mini at high detail: 2,833 base + 5,667 per 512 px
/// tile, and an image is scaled to at most 2048×768 px, so 8 tiles: 48,169.
/// Rounded up; a model that counts more must be priced per request instead.
pub const IMAGE_TOKEN_BOUND: u64 = 50_000;

/// Chat-template tokens one message (or input) can add around its text:
/// OpenAI counts 3 per message and 1 per name; Llama 3 and Qwen templates add
/// about 5. Rounded up.
pub const PART_OVERHEAD_TOKENS: u64 = 8;

/// Template tokens a request can add regardless of its parts: reply priming
/// (3 for OpenAI) and the default system prompts some templates inject when
/// the client sent none (Llama 3.1's date header, Qwen's identity line:
/// about 30).
pub const REQUEST_OVERHEAD_TOKENS: u64 = 64;

/// Tokens [`RequestInfo::prompt_estimate`] counts per image: a 1024×1024
/// image at high detail on gpt-4o (85 base + 4 tiles × 170).
pub const ESTIMATE_IMAGE_TOKENS: u64 = 765;

/// Template tokens [`RequestInfo::prompt_estimate`] counts per part
/// (OpenAI: 3 per message, 1 per name).
pub const ESTIMATE_PART_TOKENS: u64 = 4;

/// Template tokens [`RequestInfo::prompt_estimate`] counts once (OpenAI's
/// reply priming).
pub const ESTIMATE_REQUEST_TOKENS: u64 = 3;

/// What admission needs to know about a request body.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RequestInfo {
    /// The model asked for: routing, allowlists and price.
    pub model: Option<String>,
    /// Whether the answer is an SSE stream.
    pub stream: bool,
    /// The completion bound the client set: `max_tokens` or
    /// `max_completion_tokens` (chat, completions; the larger when both are
    /// sent, since either may be the one the upstream honours),
    /// `max_output_tokens` (responses).
    pub max_tokens: Option<u64>,
    /// Whether a stream will report its usage without an injection:
    /// `stream_options.include_usage == true` on chat and completions;
    /// always true on responses, whose `response.completed` carries it.
    pub include_usage: bool,
    /// UTF-8 bytes of all prompt text, an upper bound of its tokens.
    pub prompt_bytes: u64,
    /// Messages or inputs (plus tool-like extra fields): each may add
    /// template tokens around its text.
    pub prompt_parts: u32,
    /// Image parts, counted as [`IMAGE_TOKEN_BOUND`] each instead of their
    /// (base64) bytes.
    pub images: u32,
    /// Answers generated per request (`n`, `best_of`: the larger): the
    /// completion bound is per answer, so the reservation multiplies by it.
    /// 0 in `Default` means 1.
    pub choices: u32,
    /// Every model the request may be served by, the primary (`model`)
    /// first, then an OpenRouter-style `models` fallback list in its order
    /// (duplicates dropped): each must pass the allowlist, and the
    /// reservation prices the most expensive. Empty when `model` is absent.
    pub models: Vec<String>,
    /// Anthropic's `thinking.budget_tokens` when thinking is enabled: it
    /// counts within `max_tokens`, so the reservation bound stays
    /// `max_tokens`, but a `max_tokens` lowered (by `cap` or the model's
    /// bound) to the budget or below would be refused by the upstream.
    pub thinking_budget: Option<u64>,
}

impl RequestInfo {
    /// An upper bound of the prompt tokens the upstream can count.
    ///
    /// Byte-level BPE tokenizers (tiktoken's cl100k/o200k, Llama 3, Qwen,
    /// Mistral's tekken) never produce more tokens than the UTF-8 bytes they
    /// encode: each token stands for at least one byte, and bytes that no
    /// merge covers become one token each. Text is counted decoded (a JSON
    /// `\u4e2d` escape is 3 bytes, not 6); fields that are not plain text
    /// (tool definitions, tool calls, files) are counted as their raw JSON
    /// length, which is at least their decoded length. To the bytes we add
    /// [`PART_OVERHEAD_TOKENS`] per part, [`REQUEST_OVERHEAD_TOKENS`] once
    /// and [`IMAGE_TOKEN_BOUND`] per image. Saturating.
    ///
    /// Not bounded from the body: context the upstream adds by itself
    /// (responses' `previous_response_id`, `conversation`, stored `prompt`
    /// templates), and audio, whose tokens follow its duration.
    pub fn prompt_token_bound(&self) -> u64 {
        self.prompt_bytes
            .saturating_add(u64::from(self.prompt_parts).saturating_mul(PART_OVERHEAD_TOKENS))
            .saturating_add(REQUEST_OVERHEAD_TOKENS)
            .saturating_add(u64::from(self.images).saturating_mul(IMAGE_TOKEN_BOUND))
    }

    /// A realistic count of the prompt's tokens, for charging a request
    /// whose answer never reported usage (a stream cut before its usage
    /// event): what the measured prompt most likely cost, where
    /// [`prompt_token_bound`](Self::prompt_token_bound) is what it can cost
    /// at most and is what is reserved.
    ///
    /// `⌈prompt_bytes / 4⌉ + 4 × prompt_parts + 3 + 765 × images`, never
    /// above the bound: English text averages about 4 bytes a token in
    /// cl100k/o200k (fewer for other scripts, so this errs low, toward not
    /// charging what may not have happened); OpenAI counts 3 template
    /// tokens per message plus 3 to prime the reply; 765 is a 1024×1024
    /// image at high detail on gpt-4o (85 + 4 tiles × 170). Saturating.
    pub fn prompt_estimate(&self) -> u64 {
        self.prompt_bytes
            .div_ceil(4)
            .saturating_add(u64::from(self.prompt_parts).saturating_mul(ESTIMATE_PART_TOKENS))
            .saturating_add(ESTIMATE_REQUEST_TOKENS)
            .saturating_add(u64::from(self.images).saturating_mul(ESTIMATE_IMAGE_TOKENS))
            .min(self.prompt_token_bound())
    }
}

/// A top-level key of a request body, decoded (a `"mod\u0065l"` key is
/// `model`, as the upstream's parser will read it).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum TopKey {
    Model,
    Stream,
    StreamOptions,
    MaxTokens,
    MaxCompletionTokens,
    MaxOutputTokens,
    Messages,
    Prompt,
    Suffix,
    Input,
    Instructions,
    /// Anthropic's `system`: text or text blocks.
    System,
    /// Anthropic's extended thinking (`budget_tokens`).
    Thinking,
    /// `n` / `best_of`: answers per request.
    N,
    BestOf,
    /// A reference to context the upstream stores (responses'
    /// `previous_response_id`, `conversation`): a prompt the body does not
    /// contain, so it cannot be bounded.
    StoredContext(&'static str),
    /// OpenRouter's fallback list.
    Models,
    /// `tools`: counted raw like `Other`, and read for hosted tools.
    Tools,
    /// `background` (responses): a queued answer with no usage.
    Background,
    /// A parameter that adds upstream work the body cannot bound
    /// (`web_search_options`): refused.
    Unbounded(&'static str),
    /// A sampling or bookkeeping parameter that never reaches the prompt.
    Setting,
    /// Anything else (tools, functions, response_format…): may reach the
    /// prompt, counted as its key and raw JSON length.
    Other(usize),
}

impl TopKey {
    fn name(self) -> &'static str {
        match self {
            TopKey::Model => "model",
            TopKey::Stream => "stream",
            TopKey::StreamOptions => "stream_options",
            TopKey::MaxTokens => "max_tokens",
            TopKey::MaxCompletionTokens => "max_completion_tokens",
            TopKey::MaxOutputTokens => "max_output_tokens",
            TopKey::Messages => "messages",
            TopKey::Prompt => "prompt",
            TopKey::Suffix => "suffix",
            TopKey::Input => "input",
            TopKey::Instructions => "instructions",
            TopKey::System => "system",
            TopKey::Thinking => "thinking",
            TopKey::N => "n",
            TopKey::BestOf => "best_of",
            TopKey::StoredContext(name) | TopKey::Unbounded(name) => name,
            TopKey::Models => "models",
            TopKey::Tools => "tools",
            TopKey::Background => "background",
            TopKey::Setting | TopKey::Other(_) => "",
        }
    }
}

impl<'de> Deserialize<'de> for TopKey {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl Visitor<'_> for V {
            type Value = TopKey;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a key")
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<TopKey, E> {
                Ok(match v {
                    "model" => TopKey::Model,
                    "stream" => TopKey::Stream,
                    "stream_options" => TopKey::StreamOptions,
                    "max_tokens" => TopKey::MaxTokens,
                    "max_completion_tokens" => TopKey::MaxCompletionTokens,
                    "max_output_tokens" => TopKey::MaxOutputTokens,
                    "messages" => TopKey::Messages,
                    "prompt" => TopKey::Prompt,
                    "suffix" => TopKey::Suffix,
                    "input" => TopKey::Input,
                    "instructions" => TopKey::Instructions,
                    "system" => TopKey::System,
                    "mcp_servers" => TopKey::Unbounded("mcp_servers"),
                    "container" => TopKey::Unbounded("container"),
                    // Anthropic's extended thinking: its budget counts
                    // within `max_tokens`, so it adds nothing to the bound.
                    "thinking" => TopKey::Thinking,
                    "n" => TopKey::N,
                    "best_of" => TopKey::BestOf,
                    "previous_response_id" => TopKey::StoredContext("previous_response_id"),
                    "conversation" => TopKey::StoredContext("conversation"),
                    "models" => TopKey::Models,
                    "tools" => TopKey::Tools,
                    "background" => TopKey::Background,
                    "web_search_options" => TopKey::Unbounded("web_search_options"),
                    // `route: "fallback"` only says how `models` is used.
                    "route" => TopKey::Setting,
                    "temperature"
                    | "top_p"
                    | "top_k"
                    | "min_p"
                    | "presence_penalty"
                    | "frequency_penalty"
                    | "repetition_penalty"
                    | "seed"
                    | "user"
                    | "logprobs"
                    | "top_logprobs"
                    | "echo"
                    | "store"
                    | "service_tier"
                    | "parallel_tool_calls"
                    | "encoding_format"
                    | "dimensions"
                    | "logit_bias"
                    | "reasoning_effort"
                    | "stop"
                    | "modalities"
                    | "verbosity"
                    | "safety_identifier"
                    | "prompt_cache_key"
                    | "truncation"
                    | "include"
                    | "metadata"
                    | "tool_choice" => TopKey::Setting,
                    other => TopKey::Other(other.len() + 3),
                })
            }
        }
        d.deserialize_str(V)
    }
}

/// The top-level fields of a request body, borrowed raw: each is typed and
/// measured on its own afterwards, so that a type error names its field, and
/// so that `rewrite` knows where each value sits in the body.
#[derive(Default)]
pub(super) struct RequestFields<'a> {
    /// Keys in the object (to splice a new member with or without a comma).
    pub(super) keys: usize,
    model: Option<&'a RawValue>,
    stream: Option<&'a RawValue>,
    pub(super) stream_options: Option<&'a RawValue>,
    pub(super) max_tokens: Option<&'a RawValue>,
    pub(super) max_completion_tokens: Option<&'a RawValue>,
    pub(super) max_output_tokens: Option<&'a RawValue>,
    messages: Option<&'a RawValue>,
    prompt: Option<&'a RawValue>,
    suffix: Option<&'a RawValue>,
    input: Option<&'a RawValue>,
    instructions: Option<&'a RawValue>,
    system: Option<&'a RawValue>,
    /// Anthropic's `thinking` object.
    thinking: Option<&'a RawValue>,
    n: Option<&'a RawValue>,
    best_of: Option<&'a RawValue>,
    /// The first stored-context reference met, if any (see `TopKey`).
    stored_context: Option<(&'static str, &'a RawValue)>,
    /// OpenRouter's `models` fallback list.
    models: Option<&'a RawValue>,
    /// Tool definitions: read for hosted tools (also counted in
    /// `other_bytes`).
    tools: Option<&'a RawValue>,
    /// Responses' `background` flag.
    background: Option<&'a RawValue>,
    /// The first parameter met that adds unbounded upstream work.
    unbounded: Option<&'static str>,
    /// Raw JSON bytes (with their keys) of fields that may reach the prompt
    /// but are not text: tools, functions, response_format…
    other_bytes: u64,
    /// How many such fields: each is a part of the template.
    other_fields: u32,
}

impl<'de> Deserialize<'de> for RequestFields<'de> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = RequestFields<'de>;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a JSON object")
            }
            fn visit_map<A: MapAccess<'de>>(
                self,
                mut map: A,
            ) -> Result<RequestFields<'de>, A::Error> {
                let mut f = RequestFields::default();
                while let Some(key) = map.next_key::<TopKey>()? {
                    f.keys += 1;
                    let slot = match key {
                        TopKey::Model => &mut f.model,
                        TopKey::Stream => &mut f.stream,
                        TopKey::StreamOptions => &mut f.stream_options,
                        TopKey::MaxTokens => &mut f.max_tokens,
                        TopKey::MaxCompletionTokens => &mut f.max_completion_tokens,
                        TopKey::MaxOutputTokens => &mut f.max_output_tokens,
                        TopKey::Messages => &mut f.messages,
                        TopKey::Prompt => &mut f.prompt,
                        TopKey::Suffix => &mut f.suffix,
                        TopKey::Input => &mut f.input,
                        TopKey::Instructions => &mut f.instructions,
                        TopKey::System => &mut f.system,
                        TopKey::Thinking => &mut f.thinking,
                        TopKey::N => &mut f.n,
                        TopKey::BestOf => &mut f.best_of,
                        TopKey::Models => &mut f.models,
                        TopKey::Background => &mut f.background,
                        TopKey::Tools => {
                            let raw: &RawValue = map.next_value()?;
                            if f.tools.is_some() {
                                return Err(de::Error::custom("duplicate field `tools`"));
                            }
                            f.tools = Some(raw);
                            f.other_bytes = f
                                .other_bytes
                                .saturating_add(("tools".len() + 3 + raw.get().len()) as u64);
                            f.other_fields = f.other_fields.saturating_add(1);
                            continue;
                        }
                        TopKey::Unbounded(name) => {
                            let raw: &RawValue = map.next_value()?;
                            if f.unbounded.is_none() && !is_null(raw) {
                                f.unbounded = Some(name);
                            }
                            continue;
                        }
                        TopKey::StoredContext(name) => {
                            let raw: &RawValue = map.next_value()?;
                            if f.stored_context.is_none() {
                                f.stored_context = Some((name, raw));
                            }
                            continue;
                        }
                        TopKey::Setting => {
                            map.next_value::<IgnoredAny>()?;
                            continue;
                        }
                        TopKey::Other(key_len) => {
                            let raw: &RawValue = map.next_value()?;
                            f.other_bytes = f
                                .other_bytes
                                .saturating_add((key_len + raw.get().len()) as u64);
                            f.other_fields = f.other_fields.saturating_add(1);
                            continue;
                        }
                    };
                    // The gateway and the upstream must read the same value:
                    // with a duplicate, one parser takes the first and another
                    // the last, so it is refused.
                    if slot.is_some() {
                        return Err(de::Error::custom(format_args!(
                            "duplicate field `{}`",
                            key.name()
                        )));
                    }
                    *slot = Some(map.next_value()?);
                }
                Ok(f)
            }
        }
        d.deserialize_map(V)
    }
}

/// `stream_options`, borrowed raw (for `rewrite`).
#[derive(Default)]
pub(super) struct StreamOptionsRaw<'a> {
    pub(super) keys: usize,
    pub(super) include_usage: Option<&'a RawValue>,
}

impl<'de> Deserialize<'de> for StreamOptionsRaw<'de> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = StreamOptionsRaw<'de>;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("an object")
            }
            fn visit_map<A: MapAccess<'de>>(
                self,
                mut map: A,
            ) -> Result<StreamOptionsRaw<'de>, A::Error> {
                let mut s = StreamOptionsRaw::default();
                while let Some(key) = map.next_key::<TopKey>()? {
                    s.keys += 1;
                    // TopKey sees `include_usage` as Other(len + 3).
                    if key == TopKey::Other("include_usage".len() + 3) {
                        let raw: &RawValue = map.next_value()?;
                        if s.include_usage.is_some() {
                            return Err(de::Error::custom("duplicate field `include_usage`"));
                        }
                        s.include_usage = Some(raw);
                    } else {
                        map.next_value::<IgnoredAny>()?;
                    }
                }
                Ok(s)
            }
        }
        d.deserialize_map(V)
    }
}

/// Counted prompt text.
#[derive(Clone, Copy, Debug, Default)]
struct Measure {
    bytes: u64,
    parts: u32,
    images: u32,
    /// A part the body cannot bound (a file reference): what it is.
    unbounded: Option<&'static str>,
}

impl Measure {
    fn add(&mut self, other: Measure) {
        self.bytes = self.bytes.saturating_add(other.bytes);
        self.parts = self.parts.saturating_add(other.parts);
        self.images = self.images.saturating_add(other.images);
        self.unbounded = self.unbounded.or(other.unbounded);
    }
}

/// A key inside a message or content part.
enum PartKey {
    /// `content` or `text`: text, counted decoded.
    Text,
    /// `type`: an image part is counted as an image, not as bytes.
    Type,
    /// `role`: only template tokens, in the part overhead.
    Role,
    /// `file_id`, `file_url`: a file the upstream fetches, unbounded.
    FileRef(&'static str),
    /// Anthropic's `source` of an image or document: data, or a reference
    /// (`url`, `file`) the upstream fetches.
    Source,
    /// Anything else: key and raw JSON length.
    Other(usize),
}

impl<'de> Deserialize<'de> for PartKey {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl Visitor<'_> for V {
            type Value = PartKey;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a key")
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<PartKey, E> {
                Ok(match v {
                    "content" | "text" => PartKey::Text,
                    "type" => PartKey::Type,
                    "role" => PartKey::Role,
                    "file_id" => PartKey::FileRef("file_id"),
                    "file_url" => PartKey::FileRef("file_url"),
                    "source" => PartKey::Source,
                    other => PartKey::Other(other.len() + 3),
                })
            }
        }
        d.deserialize_str(V)
    }
}

/// Measures prompt text in any shape OpenAI accepts: a string, an array of
/// strings, of token ids or of arrays of token ids (completions,
/// embeddings), an array of messages whose content is a string or an array of
/// parts (chat), an array of input items (responses).
struct Measuring<'m> {
    acc: &'m mut Measure,
    /// The field's own value: its elements are the parts.
    top: bool,
}

impl<'de> DeserializeSeed<'de> for Measuring<'_> {
    type Value = ();
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
        d.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for Measuring<'_> {
    type Value = ();
    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("prompt text")
    }
    fn visit_str<E: de::Error>(self, v: &str) -> Result<(), E> {
        self.acc.bytes = self.acc.bytes.saturating_add(v.len() as u64);
        if self.top {
            self.acc.parts = self.acc.parts.saturating_add(1);
        }
        Ok(())
    }
    // A token id is one token.
    fn visit_u64<E: de::Error>(self, _: u64) -> Result<(), E> {
        self.acc.bytes = self.acc.bytes.saturating_add(1);
        Ok(())
    }
    fn visit_i64<E: de::Error>(self, _: i64) -> Result<(), E> {
        self.acc.bytes = self.acc.bytes.saturating_add(1);
        Ok(())
    }
    // Not expected in prompt text; at most the length of its text form.
    fn visit_f64<E: de::Error>(self, _: f64) -> Result<(), E> {
        self.acc.bytes = self.acc.bytes.saturating_add(32);
        Ok(())
    }
    fn visit_bool<E: de::Error>(self, _: bool) -> Result<(), E> {
        self.acc.bytes = self.acc.bytes.saturating_add(5);
        Ok(())
    }
    fn visit_unit<E: de::Error>(self) -> Result<(), E> {
        Ok(())
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<(), A::Error> {
        while seq
            .next_element_seed(Measuring {
                acc: &mut *self.acc,
                top: false,
            })?
            .is_some()
        {
            if self.top {
                self.acc.parts = self.acc.parts.saturating_add(1);
            }
        }
        Ok(())
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<(), A::Error> {
        let mut inner = Measure::default();
        let mut image = false;
        let mut by_reference = false;
        while let Some(key) = map.next_key::<PartKey>()? {
            match key {
                PartKey::Text => {
                    let text = map.next_value_seed(Measuring {
                        acc: &mut inner,
                        top: false,
                    });
                    if let Err(e) = text {
                        // A file reference inside: say so, not "invalid type".
                        self.acc.unbounded = self.acc.unbounded.or(inner.unbounded);
                        return Err(e);
                    }
                }
                PartKey::Type => {
                    let raw: &RawValue = map.next_value()?;
                    let kind = decoded(raw);
                    match kind.as_deref() {
                        Some("image_url" | "input_image" | "image") => image = true,
                        Some("file" | "input_file") => {
                            self.acc.unbounded = Some("a file content part");
                            return Err(de::Error::custom("unbounded input"));
                        }
                        _ => {}
                    }
                }
                PartKey::FileRef(name) => {
                    map.next_value::<IgnoredAny>()?;
                    self.acc.unbounded = Some(name);
                    return Err(de::Error::custom("unbounded input"));
                }
                PartKey::Role => {
                    map.next_value::<IgnoredAny>()?;
                }
                PartKey::Source => {
                    let raw: &RawValue = map.next_value()?;
                    inner.bytes = inner
                        .bytes
                        .saturating_add(("source".len() + 3 + raw.get().len()) as u64);
                    #[derive(Deserialize)]
                    struct Source<'a> {
                        #[serde(borrow, rename = "type")]
                        kind: Option<&'a RawValue>,
                    }
                    let kind = serde_json::from_str::<Source>(raw.get())
                        .ok()
                        .and_then(|s| s.kind)
                        .and_then(decoded);
                    by_reference = matches!(kind.as_deref(), Some("url" | "file"));
                }
                PartKey::Other(key_len) => {
                    let raw: &RawValue = map.next_value()?;
                    inner.bytes = inner
                        .bytes
                        .saturating_add((key_len + raw.get().len()) as u64);
                }
            }
        }
        if by_reference && !image {
            // A document the upstream fetches: its size is unknown. (An
            // image by URL is bounded per image.)
            self.acc.unbounded = Some("a document by URL or file id");
            return Err(de::Error::custom("unbounded input"));
        }
        if image {
            // Its bytes are an image's URL or base64 data, not text.
            self.acc.images = self.acc.images.saturating_add(1);
        } else {
            self.acc.add(inner);
        }
        if self.top {
            self.acc.parts = self.acc.parts.saturating_add(1);
        }
        Ok(())
    }
}

/// A JSON string's value with its escapes decoded (`"image\u005furl"` is
/// `image_url`, as the upstream reads it): borrowed unless it has an
/// escape. `None` for anything but a string.
pub(super) fn decoded(raw: &RawValue) -> Option<Cow<'_, str>> {
    let text = raw.get();
    if !text.starts_with('"') {
        return None;
    }
    if text.contains('\\') {
        serde_json::from_str::<String>(text).ok().map(Cow::Owned)
    } else {
        text.get(1..text.len() - 1).map(Cow::Borrowed)
    }
}

fn unbounded_input(param: &'static str, what: &str) -> ApiError {
    ApiError::bad_request(
        "unbounded_input",
        format!(
            "`{param}` contains {what}: a file the upstream reads by reference has a size this gateway \
             cannot bound before admitting the request. Send its content inline (as text or an image) instead."
        ),
    )
    .with_param(param)
}

fn invalid_type(param: &'static str, expected: &str) -> ApiError {
    ApiError::bad_request(
        "invalid_type",
        format!("Invalid type for '{param}': expected {expected}."),
    )
    .with_param(param)
}

/// The first byte of a raw value (never whitespace: `RawValue` starts at the
/// value).
fn first_byte(raw: &RawValue) -> u8 {
    raw.get().as_bytes().first().copied().unwrap_or(b' ')
}

pub(super) fn is_null(raw: &RawValue) -> bool {
    raw.get() == "null"
}

/// A typed optional field: absent and `null` are `None`.
fn typed<'a, T: Deserialize<'a>>(
    raw: Option<&'a RawValue>,
    param: &'static str,
    expected: &str,
) -> Result<Option<T>, ApiError> {
    match raw {
        None => Ok(None),
        Some(raw) => {
            serde_json::from_str::<Option<T>>(raw.get()).map_err(|_| invalid_type(param, expected))
        }
    }
}

/// Measures a prompt-bearing field that must be one of `shapes` (first
/// bytes of the allowed JSON kinds).
fn measure(
    raw: Option<&RawValue>,
    param: &'static str,
    shapes: &[u8],
    expected: &str,
    acc: &mut Measure,
) -> Result<(), ApiError> {
    let Some(raw) = raw else { return Ok(()) };
    if is_null(raw) {
        return Ok(());
    }
    if !shapes.contains(&first_byte(raw)) {
        return Err(invalid_type(param, expected));
    }
    let mut de = serde_json::Deserializer::from_str(raw.get());
    Measuring { acc, top: true }
        .deserialize(&mut de)
        .map_err(|_| match acc.unbounded {
            Some(what) => unbounded_input(param, what),
            None => invalid_type(param, expected),
        })
}

/// Parses the top level of a request body.
fn fields(endpoint: Endpoint, body: &[u8]) -> Result<RequestFields<'_>, ApiError> {
    serde_json::from_slice::<RequestFields>(body).map_err(|e| {
        let message = if e.is_data() && serde_json::from_slice::<IgnoredAny>(body).is_ok() {
            "The request body must be a JSON object.".to_owned()
        } else {
            format!(
                "The request body is not valid JSON ({}). Route: {}.",
                crate::error::truncate(&e.to_string(), 200),
                endpoint.as_str()
            )
        };
        ApiError::invalid_json(message)
    })
}

/// Parses the JSON body of a request to `endpoint`.
///
/// Errors are 400s in OpenAI's shape: `invalid_json` (malformed, not an
/// object, or a field the gateway reads given twice),
/// `missing_required_parameter` (`model`), `invalid_type` (with `param`).
/// `Messages` (Anthropic) requires `max_tokens` (`missing_max_tokens`).
/// `Other`, `Models` and `CountTokens` are best effort: `model` if it is a string, `stream` if it
/// is a bool; an empty body is `Ok(default)`; a non-empty body must be JSON.
///
/// Builds no `serde_json::Value`: fields are borrowed raw, then typed or
/// measured one by one.
pub fn inspect(endpoint: Endpoint, body: &[u8]) -> Result<RequestInfo, ApiError> {
    analyze(endpoint, body).map(|(info, _)| info)
}

pub(super) fn analyze(
    endpoint: Endpoint,
    body: &[u8],
) -> Result<(RequestInfo, RequestFields<'_>), ApiError> {
    if matches!(
        endpoint,
        Endpoint::Other | Endpoint::Models | Endpoint::CountTokens
    ) {
        return inspect_other(body).map(|info| (info, RequestFields::default()));
    }
    let f = fields(endpoint, body)?;
    let mut info = RequestInfo::default();

    match f.model {
        None => {}
        Some(raw) if is_null(raw) => {}
        Some(raw) => {
            let model = serde_json::from_str::<String>(raw.get())
                .map_err(|_| invalid_type("model", "a string"))?;
            info.model = Some(model);
        }
    }
    info.models = fallback_models(info.model.as_deref(), f.models)?;
    if info.model.is_none() {
        info.model = info.models.first().cloned();
    }
    if info.model.is_none() {
        return Err(ApiError::bad_request(
            "missing_required_parameter",
            "You must provide a model parameter.",
        )
        .with_param("model"));
    }
    info.stream = typed::<bool>(f.stream, "stream", "a boolean")?.unwrap_or(false);

    let uint = "a non-negative integer";
    info.max_tokens = match endpoint {
        Endpoint::Chat => {
            let a = typed::<u64>(f.max_tokens, "max_tokens", uint)?;
            let b = typed::<u64>(f.max_completion_tokens, "max_completion_tokens", uint)?;
            a.max(b)
        }
        Endpoint::Completions => typed::<u64>(f.max_tokens, "max_tokens", uint)?,
        Endpoint::Responses => typed::<u64>(f.max_output_tokens, "max_output_tokens", uint)?,
        Endpoint::Messages => match typed::<u64>(f.max_tokens, "max_tokens", uint)? {
            Some(max) => Some(max),
            None => {
                return Err(ApiError::bad_request(
                    "missing_max_tokens",
                    "max_tokens: Field required. The Messages API needs `max_tokens`.",
                )
                .with_param("max_tokens"));
            }
        },
        _ => None,
    };
    if endpoint == Endpoint::Messages {
        info.thinking_budget = thinking_budget(f.thinking)?;
    }
    let n = typed::<u64>(f.n, "n", uint)?.unwrap_or(1);
    let best_of = typed::<u64>(f.best_of, "best_of", uint)?.unwrap_or(1);
    for (name, v) in [("n", n), ("best_of", best_of)] {
        if !(1..=128).contains(&v) {
            return Err(ApiError::bad_request(
                "invalid_value",
                format!("`{name}` must be between 1 and 128."),
            )
            .with_param(name));
        }
    }
    info.choices = n.max(best_of) as u32;
    if let Some(name) = f.unbounded {
        return Err(unsupported_tool(name, "it runs searches"));
    }
    hosted_tools(f.tools)?;
    if endpoint == Endpoint::Responses
        && typed::<bool>(f.background, "background", "a boolean")? == Some(true)
    {
        return Err(ApiError::bad_request(
            "unsupported_parameter",
            "`background: true` is not supported here: a background response is answered with a queued \
             stub that carries no usage, so it cannot be metered. Send the request without `background` \
             (stream it if it is long).",
        )
        .with_param("background"));
    }
    if endpoint == Endpoint::Responses {
        let stored_prompt = f.prompt.filter(|r| !is_null(r)).map(|r| ("prompt", r));
        if let Some((name, _)) = f
            .stored_context
            .filter(|(_, r)| !is_null(r))
            .or(stored_prompt)
        {
            return Err(ApiError::bad_request(
                "unsupported_parameter",
                format!(
                    "`{name}` refers to context stored upstream, whose size this gateway cannot bound before \
                     admitting the request; send the conversation in `input` instead."
                ),
            )
            .with_param(name));
        }
    }

    if endpoint.usage_on_request() {
        if let Some(raw) = f.stream_options.filter(|r| !is_null(r)) {
            let options = stream_options(raw)?;
            info.include_usage = typed::<bool>(
                options.include_usage,
                "stream_options",
                "a boolean include_usage",
            )?
            .unwrap_or(false);
        }
    } else if matches!(endpoint, Endpoint::Responses | Endpoint::Messages) {
        info.include_usage = true;
    }

    let mut m = Measure::default();
    let text_or_list = "a string or an array";
    match endpoint {
        Endpoint::Chat => {
            measure(f.messages, "messages", b"[", "an array", &mut m)?;
        }
        Endpoint::Completions => {
            measure(f.prompt, "prompt", b"\"[", text_or_list, &mut m)?;
            measure(f.suffix, "suffix", b"\"", "a string", &mut m)?;
        }
        Endpoint::Embeddings => {
            measure(f.input, "input", b"\"[", text_or_list, &mut m)?;
        }
        Endpoint::Responses => {
            measure(f.input, "input", b"\"[", text_or_list, &mut m)?;
            measure(f.instructions, "instructions", b"\"", "a string", &mut m)?;
        }
        Endpoint::Messages => {
            measure(f.system, "system", b"\"[", text_or_list, &mut m)?;
            measure(f.messages, "messages", b"[", "an array", &mut m)?;
        }
        _ => {}
    }
    // RequestFields of other routes are not this endpoint's prompt, but an upstream
    // may still render them: count them raw (a safe overcount).
    let unused: &[Option<&RawValue>] = match endpoint {
        Endpoint::Chat => &[f.prompt, f.suffix, f.input, f.instructions, f.system],
        Endpoint::Completions => &[f.messages, f.input, f.instructions, f.system],
        Endpoint::Embeddings => &[f.messages, f.prompt, f.suffix, f.instructions, f.system],
        Endpoint::Responses => &[f.messages, f.prompt, f.suffix, f.system],
        Endpoint::Messages => &[f.prompt, f.suffix, f.input, f.instructions],
        _ => &[],
    };
    for raw in unused.iter().flatten() {
        m.bytes = m.bytes.saturating_add(raw.get().len() as u64);
        m.parts = m.parts.saturating_add(1);
    }
    info.prompt_bytes = m.bytes.saturating_add(f.other_bytes);
    info.prompt_parts = m.parts.saturating_add(f.other_fields);
    info.images = m.images;
    Ok((info, f))
}

/// `thinking: {"type":"enabled","budget_tokens":N}`: the budget, when
/// thinking is enabled (`disabled` or absent is `None`).
fn thinking_budget(raw: Option<&RawValue>) -> Result<Option<u64>, ApiError> {
    let Some(raw) = raw.filter(|r| !is_null(r)) else {
        return Ok(None);
    };
    #[derive(Deserialize)]
    struct Thinking<'a> {
        #[serde(borrow, rename = "type")]
        kind: Option<&'a RawValue>,
        budget_tokens: Option<u64>,
    }
    let expected = "an object with `type` and an integer `budget_tokens`";
    if first_byte(raw) != b'{' {
        return Err(invalid_type("thinking", expected));
    }
    let t: Thinking =
        serde_json::from_str(raw.get()).map_err(|_| invalid_type("thinking", expected))?;
    match t.kind.and_then(decoded).as_deref() {
        Some("enabled") => Ok(Some(t.budget_tokens.unwrap_or(0))),
        _ => Ok(None),
    }
}

/// The primary model then the `models` fallback list, without duplicates.
fn fallback_models(
    primary: Option<&str>,
    list: Option<&RawValue>,
) -> Result<Vec<String>, ApiError> {
    let mut models: Vec<String> = primary.map(str::to_owned).into_iter().collect();
    if let Some(list) = typed::<Vec<String>>(list, "models", "an array of strings")? {
        for m in list {
            if !models.contains(&m) {
                models.push(m);
            }
        }
    }
    Ok(models)
}

fn unsupported_tool(name: &str, why: &str) -> ApiError {
    ApiError::bad_request(
        "unsupported_tool",
        format!(
            "The hosted tool `{name}` is not supported here: {why} that the upstream bills on top of the \
             tokens, which this gateway cannot bound before admitting the request. Use function tools and \
             run the tool yourself."
        ),
    )
    .with_param("tools")
}

/// Refuses tools the upstream runs itself at a cost the body cannot bound:
/// web search, file search, code interpreter, computer use, image
/// generation, remote MCP servers. Function (and custom) tools are the
/// client's own and only cost their definition's tokens.
fn hosted_tools(tools: Option<&RawValue>) -> Result<(), ApiError> {
    let Some(tools) = tools.filter(|r| !is_null(r)) else {
        return Ok(());
    };
    #[derive(Deserialize)]
    struct Tool<'a> {
        #[serde(borrow, rename = "type")]
        kind: Option<&'a RawValue>,
    }
    let list: Vec<Tool> = serde_json::from_str(tools.get())
        .map_err(|_| invalid_type("tools", "an array of objects"))?;
    for tool in list {
        let Some(kind) = tool.kind.and_then(decoded) else {
            continue;
        };
        let why = match &*kind {
            k if k.starts_with("web_search") => "it runs web searches",
            "file_search" => "it searches stored files",
            "code_interpreter" => "it runs a container",
            k if k.starts_with("computer_use") => "it drives a computer",
            "image_generation" => "it generates images",
            "mcp" => "it calls a remote MCP server",
            k if k.starts_with("web_fetch") => "it fetches web pages",
            k if k.starts_with("code_execution") => "it runs a container",
            _ => continue,
        };
        return Err(unsupported_tool(&kind, why));
    }
    Ok(())
}

pub(super) fn stream_options(raw: &RawValue) -> Result<StreamOptionsRaw<'_>, ApiError> {
    if first_byte(raw) != b'{' {
        return Err(invalid_type("stream_options", "an object"));
    }
    serde_json::from_str::<StreamOptionsRaw>(raw.get())
        .map_err(|_| invalid_type("stream_options", "an object"))
}

fn inspect_other(body: &[u8]) -> Result<RequestInfo, ApiError> {
    if body.iter().all(u8::is_ascii_whitespace) {
        return Ok(RequestInfo::default());
    }
    #[derive(Deserialize)]
    struct Loose<'a> {
        #[serde(borrow)]
        model: Option<&'a RawValue>,
        #[serde(borrow)]
        stream: Option<&'a RawValue>,
    }
    let mut info = RequestInfo::default();
    match serde_json::from_slice::<Loose>(body) {
        Ok(l) => {
            info.model = l.model.and_then(|r| serde_json::from_str(r.get()).ok());
            info.stream = l
                .stream
                .and_then(|r| serde_json::from_str(r.get()).ok())
                .unwrap_or(false);
        }
        // Valid JSON that is not an object: nothing to read.
        Err(_) if serde_json::from_slice::<IgnoredAny>(body).is_ok() => {}
        Err(e) => {
            return Err(ApiError::invalid_json(format!(
                "The request body is not valid JSON ({}).",
                crate::error::truncate(&e.to_string(), 200)
            )));
        }
    }
    Ok(info)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn info(endpoint: Endpoint, body: &str) -> RequestInfo {
        inspect(endpoint, body.as_bytes()).unwrap_or_else(|e| panic!("{e}: {body}"))
    }

    fn err(endpoint: Endpoint, body: &str) -> (&'static str, Option<String>) {
        let e = inspect(endpoint, body.as_bytes()).expect_err(body);
        assert_eq!(e.status, 400);
        (e.code, e.param.map(|p| p.into_owned()))
    }

    #[test]
    fn inspects_chat() {
        let i = info(
            Endpoint::Chat,
            r#"{"model":"gpt-4o","stream":true,"stream_options":{"include_usage":true},"max_tokens":100,
            "messages":[{"role":"system","content":"Be brief."},
                        {"role":"user","content":[{"type":"text","text":"caf\u00e9 \n"},{"type":"image_url","image_url":{"url":"data:image/png;base64,AAAA"}}]}]}"#,
        );
        assert_eq!(i.model.as_deref(), Some("gpt-4o"));
        assert!(i.stream && i.include_usage);
        assert_eq!(i.max_tokens, Some(100));
        // "Be brief." (9) + "text" part: key "text" 4+3, "café \n" 7 bytes decoded.
        assert_eq!(i.prompt_bytes, 9 + 7);
        assert_eq!(i.prompt_parts, 2);
        assert_eq!(i.images, 1);
        assert_eq!(
            i.prompt_token_bound(),
            16 + 2 * PART_OVERHEAD_TOKENS + REQUEST_OVERHEAD_TOKENS + IMAGE_TOKEN_BOUND
        );
        // Both max fields: the larger.
        let i = info(
            Endpoint::Chat,
            r#"{"model":"o3","messages":[],"max_tokens":5,"max_completion_tokens":50,"stream":null}"#,
        );
        assert_eq!(i.max_tokens, Some(50));
        assert!(!i.stream && !i.include_usage);
        // Tools count raw; settings do not count.
        let tools = r#"[{"type":"function","function":{"name":"f"}}]"#;
        let i = info(
            Endpoint::Chat,
            &format!(r#"{{"model":"m","messages":[],"temperature":0.2,"tools":{tools}}}"#),
        );
        assert_eq!(i.prompt_bytes, (tools.len() + "tools".len() + 3) as u64);
        assert_eq!(i.prompt_parts, 1);
    }

    #[test]
    fn inspects_other_routes() {
        let i = info(
            Endpoint::Completions,
            r#"{"model":"m","prompt":[[1,2,3],"ab"],"suffix":"z","max_tokens":7}"#,
        );
        assert_eq!(
            (i.prompt_bytes, i.prompt_parts, i.max_tokens),
            (3 + 2 + 1, 3, Some(7))
        );
        let i = info(
            Endpoint::Embeddings,
            r#"{"model":"e","input":["a","bcd"],"max_tokens":3}"#,
        );
        assert_eq!((i.prompt_bytes, i.prompt_parts, i.max_tokens), (4, 2, None));
        let i = info(
            Endpoint::Responses,
            r#"{"model":"r","instructions":"hi","input":"abc","max_output_tokens":9,"stream":true}"#,
        );
        assert_eq!(
            (i.prompt_bytes, i.prompt_parts, i.max_tokens),
            (5, 2, Some(9))
        );
        assert!(i.include_usage);
        let i = info(
            Endpoint::Responses,
            r#"{"model":"r","input":[{"role":"user","content":[{"type":"input_text","text":"x"},{"type":"input_image","image_url":"https://e/i.png"}]}]}"#,
        );
        assert_eq!((i.prompt_bytes, i.images), (1, 1));
        assert_eq!(info(Endpoint::Other, ""), RequestInfo::default());
        assert_eq!(info(Endpoint::Other, "[1]"), RequestInfo::default());
        let i = info(
            Endpoint::Other,
            r#"{"model":"tts-1","stream":"yes","input":"x"}"#,
        );
        assert_eq!((i.model.as_deref(), i.stream), (Some("tts-1"), false));
        assert_eq!(info(Endpoint::Other, r#"{"model":7}"#).model, None);
        assert_eq!(err(Endpoint::Other, "{").0, "invalid_json");
    }

    #[test]
    fn inspect_errors() {
        let bad = [
            (Endpoint::Chat, "", "invalid_json", None),
            (Endpoint::Chat, "{\"model\":\"m\",", "invalid_json", None),
            (Endpoint::Chat, "[]", "invalid_json", None),
            (
                Endpoint::Chat,
                r#"{"model":"a","model":"b"}"#,
                "invalid_json",
                None,
            ),
            (
                Endpoint::Chat,
                r#"{"messages":[]}"#,
                "missing_required_parameter",
                Some("model"),
            ),
            (
                Endpoint::Embeddings,
                r#"{"model":null,"input":"x"}"#,
                "missing_required_parameter",
                Some("model"),
            ),
            (
                Endpoint::Chat,
                r#"{"model":1}"#,
                "invalid_type",
                Some("model"),
            ),
            (
                Endpoint::Chat,
                r#"{"model":"m","stream":"true"}"#,
                "invalid_type",
                Some("stream"),
            ),
            (
                Endpoint::Chat,
                r#"{"model":"m","max_tokens":-1}"#,
                "invalid_type",
                Some("max_tokens"),
            ),
            (
                Endpoint::Chat,
                r#"{"model":"m","max_tokens":1.5}"#,
                "invalid_type",
                Some("max_tokens"),
            ),
            (
                Endpoint::Chat,
                r#"{"model":"m","max_completion_tokens":"9"}"#,
                "invalid_type",
                Some("max_completion_tokens"),
            ),
            (
                Endpoint::Responses,
                r#"{"model":"m","max_output_tokens":[]}"#,
                "invalid_type",
                Some("max_output_tokens"),
            ),
            (
                Endpoint::Chat,
                r#"{"model":"m","messages":{}}"#,
                "invalid_type",
                Some("messages"),
            ),
            (
                Endpoint::Chat,
                r#"{"model":"m","stream_options":true}"#,
                "invalid_type",
                Some("stream_options"),
            ),
            (
                Endpoint::Chat,
                r#"{"model":"m","stream_options":[true]}"#,
                "invalid_type",
                Some("stream_options"),
            ),
            (
                Endpoint::Chat,
                r#"{"model":"m","stream_options":{"include_usage":1}}"#,
                "invalid_type",
                Some("stream_options"),
            ),
            (
                Endpoint::Completions,
                r#"{"model":"m","prompt":5}"#,
                "invalid_type",
                Some("prompt"),
            ),
            (
                Endpoint::Embeddings,
                r#"{"model":"m","input":{}}"#,
                "invalid_type",
                Some("input"),
            ),
            (
                Endpoint::Responses,
                r#"{"model":"m","instructions":[]}"#,
                "invalid_type",
                Some("instructions"),
            ),
        ];
        for (endpoint, body, code, param) in bad {
            assert_eq!(
                err(endpoint, body),
                (code, param.map(str::to_owned)),
                "{body}"
            );
        }
    }

    #[test]
    fn values_are_compared_decoded() {
        let i = info(
            Endpoint::Chat,
            r#"{"model":"m","messages":[{"role":"user","content":[{"type":"image\u005furl","image_url":{"url":"https://e/i.png"}}]}]}"#,
        );
        assert_eq!((i.images, i.prompt_bytes), (1, 0));
        let i = info(
            Endpoint::Responses,
            r#"{"model":"m","input":[{"role":"user","content":[{"type":"\u0069nput_image","image_url":"https://e/i.png"}]}]}"#,
        );
        assert_eq!(i.images, 1);
    }

    #[test]
    fn file_references_are_refused() {
        for (endpoint, body, param) in [
            (
                Endpoint::Chat,
                r#"{"model":"m","messages":[{"role":"user","content":[{"type":"file","file":{"file_id":"file-1"}}]}]}"#,
                "messages",
            ),
            (
                Endpoint::Chat,
                r#"{"model":"m","messages":[{"role":"user","content":[{"type":"fil\u0065","file":{}}]}]}"#,
                "messages",
            ),
            (
                Endpoint::Responses,
                r#"{"model":"m","input":[{"role":"user","content":[{"type":"input_file","file_url":"https://e/a.pdf"}]}]}"#,
                "input",
            ),
            (
                Endpoint::Responses,
                r#"{"model":"m","input":[{"role":"user","content":[{"type":"input_image","file_id":"file-1"}]}]}"#,
                "input",
            ),
            (
                Endpoint::Responses,
                r#"{"model":"m","input":[{"role":"user","content":[{"type":"input_text","text":"a"},{"file_id":"f"}]}]}"#,
                "input",
            ),
        ] {
            let e = inspect(endpoint, body.as_bytes()).expect_err(body);
            assert_eq!(e.code, "unbounded_input", "{body}");
            assert_eq!(e.param.as_deref(), Some(param));
            assert!(e.message.contains("cannot bound"), "{}", e.message);
        }
    }

    #[test]
    fn fallback_models_are_all_exposed() {
        let i = info(
            Endpoint::Chat,
            r#"{"model":"a","models":["b","a","c"],"route":"fallback","messages":[]}"#,
        );
        assert_eq!(i.model.as_deref(), Some("a"));
        assert_eq!(i.models, ["a", "b", "c"]);
        // The list's bytes are not prompt.
        assert_eq!((i.prompt_bytes, i.prompt_parts), (0, 0));
        let i = info(Endpoint::Chat, r#"{"models":["x","y"],"messages":[]}"#);
        assert_eq!((i.model.as_deref(), i.models.len()), (Some("x"), 2));
        assert_eq!(info(Endpoint::Chat, r#"{"model":"m"}"#).models, ["m"]);
        assert_eq!(
            err(Endpoint::Chat, r#"{"model":"m","models":"n"}"#),
            ("invalid_type", Some("models".to_owned()))
        );
        assert_eq!(
            err(Endpoint::Chat, r#"{"models":[],"messages":[]}"#).0,
            "missing_required_parameter"
        );
    }

    #[test]
    fn hosted_tools_are_refused() {
        for (endpoint, body) in [
            (
                Endpoint::Responses,
                r#"{"model":"m","tools":[{"type":"web_search_preview"}]}"#,
            ),
            (
                Endpoint::Responses,
                r#"{"model":"m","tools":[{"type":"function","name":"f"},{"type":"file_search","vector_store_ids":["vs"]}]}"#,
            ),
            (
                Endpoint::Responses,
                r#"{"model":"m","tools":[{"type":"code_interpreter","container":{"type":"auto"}}]}"#,
            ),
            (
                Endpoint::Responses,
                r#"{"model":"m","tools":[{"type":"computer_use_preview"}]}"#,
            ),
            (
                Endpoint::Responses,
                r#"{"model":"m","tools":[{"type":"image_generation"}]}"#,
            ),
            (
                Endpoint::Responses,
                r#"{"model":"m","tools":[{"type":"mcp","server_url":"https://e"}]}"#,
            ),
            (
                Endpoint::Responses,
                r#"{"model":"m","tools":[{"type":"web\u005fsearch"}]}"#,
            ),
            (
                Endpoint::Chat,
                r#"{"model":"m","messages":[],"web_search_options":{}}"#,
            ),
        ] {
            assert_eq!(err(endpoint, body).0, "unsupported_tool", "{body}");
        }
        let i = info(
            Endpoint::Responses,
            r#"{"model":"m","tools":[{"type":"function","name":"f"}],"web_search_options":null}"#,
        );
        assert_eq!(i.prompt_parts, 1);
    }

    #[test]
    fn background_responses_are_refused() {
        assert_eq!(
            err(
                Endpoint::Responses,
                r#"{"model":"m","input":"x","background":true}"#
            ),
            ("unsupported_parameter", Some("background".to_owned()))
        );
        info(
            Endpoint::Responses,
            r#"{"model":"m","input":"x","background":false}"#,
        );
        assert_eq!(
            err(Endpoint::Responses, r#"{"model":"m","background":"yes"}"#).0,
            "invalid_type"
        );
    }

    #[test]
    fn prompt_estimate_is_realistic_and_below_the_bound() {
        let i = info(
            Endpoint::Chat,
            r#"{"model":"m","messages":[{"role":"user","content":"Hello there, how are you?"},
            {"role":"user","content":[{"type":"image_url","image_url":{"url":"https://e/i.png"}}]}]}"#,
        );
        // 25 bytes → 7 tokens, 2 messages, one image.
        assert_eq!(i.prompt_estimate(), 7 + 2 * 4 + 3 + 765);
        assert!(i.prompt_estimate() < i.prompt_token_bound());
        assert_eq!(RequestInfo::default().prompt_estimate(), 3);
        let huge = RequestInfo {
            prompt_bytes: u64::MAX,
            images: u32::MAX,
            prompt_parts: u32::MAX,
            ..RequestInfo::default()
        };
        assert!(huge.prompt_estimate() <= huge.prompt_token_bound());
    }

    #[test]
    fn inspects_anthropic_messages() {
        let i = info(
            Endpoint::Messages,
            r#"{"model":"claude-sonnet-4-5","max_tokens":1024,"stream":true,
            "system":[{"type":"text","text":"Be brief.","cache_control":{"type":"ephemeral"}}],
            "thinking":{"type":"enabled","budget_tokens":512},
            "messages":[{"role":"user","content":[
                {"type":"text","text":"hi"},
                {"type":"image","source":{"type":"base64","media_type":"image/png","data":"AAAA"}},
                {"type":"image","source":{"type":"url","url":"https://e/i.png"}}]},
              {"role":"assistant","content":[{"type":"tool_use","id":"t1","name":"f","input":{}}]},
              {"role":"user","content":[{"type":"tool_result","tool_use_id":"t1","content":"ok"}]}],
            "tools":[{"name":"f","input_schema":{"type":"object"}}]}"#,
        );
        assert_eq!(i.model.as_deref(), Some("claude-sonnet-4-5"));
        assert!(i.stream && i.include_usage);
        assert_eq!(i.max_tokens, Some(1024));
        assert_eq!(i.thinking_budget, Some(512));
        assert_eq!(i.images, 2);
        // Text: "Be brief." 9, "hi" 2, "ok" 2, plus the raw extras.
        assert!(i.prompt_bytes > 13, "{}", i.prompt_bytes);
        // system: 1 block; messages: 3; tools: 1.
        assert_eq!(i.prompt_parts, 5);
        let i = info(
            Endpoint::Messages,
            r#"{"model":"c","max_tokens":5,"system":"abc","messages":[{"role":"user","content":"d"}]}"#,
        );
        assert_eq!((i.prompt_bytes, i.prompt_parts, i.choices), (4, 2, 1));
        let e = inspect(
            Endpoint::Messages,
            br#"{"model":"c","messages":[{"role":"user","content":"d"}]}"#,
        )
        .expect_err("max_tokens is required");
        assert_eq!((e.status.as_u16(), e.code), (400, "missing_max_tokens"));
        assert_eq!(e.param.as_deref(), Some("max_tokens"));
        for (body, code) in [
            (
                r#"{"model":"c","max_tokens":5,"messages":{}}"#,
                "invalid_type",
            ),
            (
                r#"{"max_tokens":5,"messages":[]}"#,
                "missing_required_parameter",
            ),
            (
                r#"{"model":"c","max_tokens":-5,"messages":[]}"#,
                "invalid_type",
            ),
            (
                r#"{"model":"c","max_tokens":5,"messages":[],"thinking":{"type":"enabled","budget_tokens":"9"}}"#,
                "invalid_type",
            ),
            (
                r#"{"model":"c","max_tokens":5,"messages":[],"thinking":true}"#,
                "invalid_type",
            ),
            (
                r#"{"model":"c","max_tokens":5,"messages":[{"role":"user","content":[{"type":"document","source":{"type":"url","url":"https://e/a.pdf"}}]}]}"#,
                "unbounded_input",
            ),
            (
                r#"{"model":"c","max_tokens":5,"messages":[{"role":"user","content":[{"type":"document","source":{"type":"file","file_id":"f"}}]}]}"#,
                "unbounded_input",
            ),
            (
                r#"{"model":"c","max_tokens":5,"messages":[],"tools":[{"type":"web_search_20250305","name":"web_search"}]}"#,
                "unsupported_tool",
            ),
            (
                r#"{"model":"c","max_tokens":5,"messages":[],"mcp_servers":[{"url":"https://e"}]}"#,
                "unsupported_tool",
            ),
        ] {
            assert_eq!(err(Endpoint::Messages, body).0, code, "{body}");
        }
        // A base64 document is bounded by its bytes.
        let i = info(
            Endpoint::Messages,
            r#"{"model":"c","max_tokens":5,"messages":[{"role":"user","content":[{"type":"document","source":{"type":"base64","media_type":"application/pdf","data":"JVBERi0="}}]}]}"#,
        );
        assert!(i.prompt_bytes >= 8 && i.images == 0);
    }
}
