//! Metering: what a request asks for ([`inspect`]), the few rewrites the
//! gateway makes to a request body ([`rewrite`]), the usage an upstream
//! reports while its answer passes ([`Meter`]), and what that usage costs
//! ([`Price`]).
//!
//! The meter reads bytes and never changes them, with one documented
//! exception: when the gateway itself injected `stream_options.include_usage`
//! into a streamed request, the usage-only event that the client did not ask
//! for is withheld from it (every other byte is identical).

// `ApiError` is the crate's one error type and is answered as is; these
// functions run once per request, not per frame, so its size costs nothing.
#![allow(clippy::result_large_err)]

use std::sync::LazyLock;

use bytes::{Bytes, BytesMut};
use memchr::memmem::{Finder, FinderRev};
use serde::Deserialize;
use serde::de::{self, DeserializeSeed, Deserializer, IgnoredAny, MapAccess, SeqAccess, Visitor};
use serde_json::value::RawValue;

use crate::error::ApiError;
use crate::money::Pico;

// ---------------------------------------------------------------- routes ----

/// Which OpenAI API a path speaks.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Route {
    Chat,
    Completions,
    Embeddings,
    Responses,
    /// `GET /v1/models`: answered by the gateway itself.
    Models,
    Other,
}

impl Route {
    /// The API of a request path (`/v1/chat/completions` → `Chat`). A query
    /// string and one trailing `/` are ignored.
    pub fn from_path(path: &str) -> Route {
        let path = path.split_once('?').map_or(path, |(p, _)| p);
        let path = path.strip_suffix('/').unwrap_or(path);
        match path {
            "/v1/chat/completions" => Route::Chat,
            "/v1/completions" => Route::Completions,
            "/v1/embeddings" => Route::Embeddings,
            "/v1/responses" => Route::Responses,
            "/v1/models" => Route::Models,
            _ => Route::Other,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Route::Chat => "chat",
            Route::Completions => "completions",
            Route::Embeddings => "embeddings",
            Route::Responses => "responses",
            Route::Models => "models",
            Route::Other => "other",
        }
    }

    /// Whether a streamed answer reports usage only when asked with
    /// `stream_options.include_usage`.
    pub fn usage_on_request(self) -> bool {
        matches!(self, Route::Chat | Route::Completions)
    }

    /// Known APIs priced by their model's price (a model is required).
    pub fn priced_by_model(self) -> bool {
        matches!(
            self,
            Route::Chat | Route::Completions | Route::Responses | Route::Embeddings
        )
    }

    /// APIs that generate completion tokens (a `max_tokens` bound applies).
    pub fn produces_tokens(self) -> bool {
        matches!(self, Route::Chat | Route::Completions | Route::Responses)
    }
}

// ------------------------------------------------------------- requests ----

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
    /// `n` / `best_of`: answers per request.
    N,
    BestOf,
    /// A reference to context the upstream stores (responses'
    /// `previous_response_id`, `conversation`): a prompt the body does not
    /// contain, so it cannot be bounded.
    StoredContext(&'static str),
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
            TopKey::N => "n",
            TopKey::BestOf => "best_of",
            TopKey::StoredContext(name) => name,
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
                    "n" => TopKey::N,
                    "best_of" => TopKey::BestOf,
                    "previous_response_id" => TopKey::StoredContext("previous_response_id"),
                    "conversation" => TopKey::StoredContext("conversation"),
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
                    | "background"
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
struct Fields<'a> {
    /// Keys in the object (to splice a new member with or without a comma).
    keys: usize,
    model: Option<&'a RawValue>,
    stream: Option<&'a RawValue>,
    stream_options: Option<&'a RawValue>,
    max_tokens: Option<&'a RawValue>,
    max_completion_tokens: Option<&'a RawValue>,
    max_output_tokens: Option<&'a RawValue>,
    messages: Option<&'a RawValue>,
    prompt: Option<&'a RawValue>,
    suffix: Option<&'a RawValue>,
    input: Option<&'a RawValue>,
    instructions: Option<&'a RawValue>,
    n: Option<&'a RawValue>,
    best_of: Option<&'a RawValue>,
    /// The first stored-context reference met, if any (see `TopKey`).
    stored_context: Option<(&'static str, &'a RawValue)>,
    /// Raw JSON bytes (with their keys) of fields that may reach the prompt
    /// but are not text: tools, functions, response_format…
    other_bytes: u64,
    /// How many such fields: each is a part of the template.
    other_fields: u32,
}

impl<'de> Deserialize<'de> for Fields<'de> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Fields<'de>;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a JSON object")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Fields<'de>, A::Error> {
                let mut f = Fields::default();
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
                        TopKey::N => &mut f.n,
                        TopKey::BestOf => &mut f.best_of,
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
struct StreamOptionsRaw<'a> {
    keys: usize,
    include_usage: Option<&'a RawValue>,
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
}

impl Measure {
    fn add(&mut self, other: Measure) {
        self.bytes = self.bytes.saturating_add(other.bytes);
        self.parts = self.parts.saturating_add(other.parts);
        self.images = self.images.saturating_add(other.images);
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
        while let Some(key) = map.next_key::<PartKey>()? {
            match key {
                PartKey::Text => map.next_value_seed(Measuring {
                    acc: &mut inner,
                    top: false,
                })?,
                PartKey::Type => {
                    let raw: &RawValue = map.next_value()?;
                    image = matches!(
                        raw.get(),
                        r#""image_url""# | r#""input_image""# | r#""image""#
                    );
                }
                PartKey::Role => {
                    map.next_value::<IgnoredAny>()?;
                }
                PartKey::Other(key_len) => {
                    let raw: &RawValue = map.next_value()?;
                    inner.bytes = inner
                        .bytes
                        .saturating_add((key_len + raw.get().len()) as u64);
                }
            }
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

fn is_null(raw: &RawValue) -> bool {
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
        .map_err(|_| invalid_type(param, expected))
}

/// Parses the top level of a request body.
fn fields(route: Route, body: &[u8]) -> Result<Fields<'_>, ApiError> {
    serde_json::from_slice::<Fields>(body).map_err(|e| {
        let message = if e.is_data() && serde_json::from_slice::<IgnoredAny>(body).is_ok() {
            "The request body must be a JSON object.".to_owned()
        } else {
            format!(
                "The request body is not valid JSON ({}). Route: {}.",
                crate::error::truncate(&e.to_string(), 200),
                route.as_str()
            )
        };
        ApiError::invalid_json(message)
    })
}

/// Parses the JSON body of a request to `route`.
///
/// Errors are 400s in OpenAI's shape: `invalid_json` (malformed, not an
/// object, or a field the gateway reads given twice),
/// `missing_required_parameter` (`model`), `invalid_type` (with `param`).
/// `Route::Other` is best effort: `model` if it is a string, `stream` if it
/// is a bool; an empty body is `Ok(default)`; a non-empty body must be JSON.
///
/// Builds no `serde_json::Value`: fields are borrowed raw, then typed or
/// measured one by one.
pub fn inspect(route: Route, body: &[u8]) -> Result<RequestInfo, ApiError> {
    analyze(route, body).map(|(info, _)| info)
}

fn analyze(route: Route, body: &[u8]) -> Result<(RequestInfo, Fields<'_>), ApiError> {
    if route == Route::Other {
        return inspect_other(body).map(|info| (info, Fields::default()));
    }
    let f = fields(route, body)?;
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
    if info.model.is_none() {
        return Err(ApiError::bad_request(
            "missing_required_parameter",
            "You must provide a model parameter.",
        )
        .with_param("model"));
    }
    info.stream = typed::<bool>(f.stream, "stream", "a boolean")?.unwrap_or(false);

    let uint = "a non-negative integer";
    info.max_tokens = match route {
        Route::Chat => {
            let a = typed::<u64>(f.max_tokens, "max_tokens", uint)?;
            let b = typed::<u64>(f.max_completion_tokens, "max_completion_tokens", uint)?;
            a.max(b)
        }
        Route::Completions => typed::<u64>(f.max_tokens, "max_tokens", uint)?,
        Route::Responses => typed::<u64>(f.max_output_tokens, "max_output_tokens", uint)?,
        Route::Embeddings | Route::Models | Route::Other => None,
    };
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
    if route == Route::Responses {
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

    if route.usage_on_request() {
        if let Some(raw) = f.stream_options.filter(|r| !is_null(r)) {
            let options = stream_options(raw)?;
            info.include_usage = typed::<bool>(
                options.include_usage,
                "stream_options",
                "a boolean include_usage",
            )?
            .unwrap_or(false);
        }
    } else if route == Route::Responses {
        info.include_usage = true;
    }

    let mut m = Measure::default();
    let text_or_list = "a string or an array";
    match route {
        Route::Chat => {
            measure(f.messages, "messages", b"[", "an array", &mut m)?;
        }
        Route::Completions => {
            measure(f.prompt, "prompt", b"\"[", text_or_list, &mut m)?;
            measure(f.suffix, "suffix", b"\"", "a string", &mut m)?;
        }
        Route::Embeddings => {
            measure(f.input, "input", b"\"[", text_or_list, &mut m)?;
        }
        Route::Responses => {
            measure(f.input, "input", b"\"[", text_or_list, &mut m)?;
            measure(f.instructions, "instructions", b"\"", "a string", &mut m)?;
        }
        Route::Models | Route::Other => {}
    }
    // Fields of other routes are not this route's prompt, but an upstream
    // may still render them: count them raw (a safe overcount).
    let unused: &[Option<&RawValue>] = match route {
        Route::Chat => &[f.prompt, f.suffix, f.input, f.instructions],
        Route::Completions => &[f.messages, f.input, f.instructions],
        Route::Embeddings => &[f.messages, f.prompt, f.suffix, f.instructions],
        Route::Responses => &[f.messages, f.prompt, f.suffix],
        Route::Models | Route::Other => &[],
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

fn stream_options(raw: &RawValue) -> Result<StreamOptionsRaw<'_>, ApiError> {
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

// -------------------------------------------------------------- rewrite ----

/// Rewrites the gateway may make to a body (DESIGN: "body unchanged except
/// the few documented rewrites").
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Rewrite {
    /// Set `stream_options.include_usage = true` (chat and completions only:
    /// other routes report usage unasked or do not stream).
    pub include_usage: bool,
    /// Set the route's max-tokens field to this value (chat, completions,
    /// responses; embeddings and other routes have none).
    pub max_tokens: Option<u64>,
}

/// One change to the body: replace `start..end` with `text`.
struct Edit {
    start: usize,
    end: usize,
    text: String,
}

/// Where a borrowed raw value sits in `body`.
fn span(body: &[u8], raw: &RawValue) -> Result<(usize, usize), ApiError> {
    let base = body.as_ptr() as usize;
    let at = raw.get().as_ptr() as usize;
    let start = at
        .checked_sub(base)
        .filter(|s| s + raw.get().len() <= body.len())
        .ok_or_else(|| ApiError::internal("rewrite: a field is not inside the body"))?;
    Ok((start, start + raw.get().len()))
}

/// The position just after the `{` that opens the object at `body[from..]`.
fn after_brace(body: &[u8], from: usize) -> Result<usize, ApiError> {
    let skip = body[from..]
        .iter()
        .position(|b| !b.is_ascii_whitespace())
        .unwrap_or(body.len() - from);
    if body.get(from + skip) != Some(&b'{') {
        return Err(ApiError::internal("rewrite: the body is not an object"));
    }
    Ok(from + skip + 1)
}

/// Returns the body with the rewrites of `rw` applied, or the same `Bytes`
/// when nothing changes.
///
/// Only what must change is touched: an absent field is spliced in right
/// after the opening `{`, a present value is replaced in place (its exact
/// byte span, from the borrowed parse). This keeps every other byte, where a
/// round trip through `serde_json::Value` would reorder keys and round
/// numbers beyond `f64`/`u64`. A chat body without a max-tokens field gets
/// `max_completion_tokens` (OpenAI's current name; reasoning models refuse
/// `max_tokens`); one with both gets both set.
pub fn rewrite(route: Route, body: &Bytes, rw: &Rewrite) -> Result<Bytes, ApiError> {
    let want_usage = rw.include_usage && route.usage_on_request();
    let want_max = rw
        .max_tokens
        .filter(|_| matches!(route, Route::Chat | Route::Completions | Route::Responses));
    if !want_usage && want_max.is_none() {
        return Ok(body.clone());
    }
    let (_, f) = analyze(route, body)?;
    let mut edits: Vec<Edit> = Vec::new();
    let mut members: Vec<String> = Vec::new();
    let usage_object = r#"{"include_usage":true}"#;

    if want_usage {
        match f.stream_options {
            None => members.push(format!(r#""stream_options":{usage_object}"#)),
            Some(raw) if is_null(raw) => {
                let (start, end) = span(body, raw)?;
                edits.push(Edit {
                    start,
                    end,
                    text: usage_object.to_owned(),
                });
            }
            Some(raw) => {
                let options = stream_options(raw)?;
                match options.include_usage {
                    Some(v) if v.get() == "true" => {}
                    Some(v) => {
                        let (start, end) = span(body, v)?;
                        edits.push(Edit {
                            start,
                            end,
                            text: "true".to_owned(),
                        });
                    }
                    None if options.keys == 0 => {
                        let (start, end) = span(body, raw)?;
                        edits.push(Edit {
                            start,
                            end,
                            text: usage_object.to_owned(),
                        });
                    }
                    None => {
                        let (start, _) = span(body, raw)?;
                        let at = after_brace(body, start)?;
                        edits.push(Edit {
                            start: at,
                            end: at,
                            text: r#""include_usage":true,"#.to_owned(),
                        });
                    }
                }
            }
        }
    }

    if let Some(max) = want_max {
        let value = max.to_string();
        let (present, absent_name): (Vec<&RawValue>, &str) = match route {
            Route::Chat => (
                [f.max_completion_tokens, f.max_tokens]
                    .into_iter()
                    .flatten()
                    .collect(),
                "max_completion_tokens",
            ),
            Route::Completions => (f.max_tokens.into_iter().collect(), "max_tokens"),
            _ => (
                f.max_output_tokens.into_iter().collect(),
                "max_output_tokens",
            ),
        };
        if present.is_empty() {
            members.push(format!(r#""{absent_name}":{value}"#));
        }
        for raw in present {
            if raw.get() != value {
                let (start, end) = span(body, raw)?;
                edits.push(Edit {
                    start,
                    end,
                    text: value.clone(),
                });
            }
        }
    }

    if !members.is_empty() {
        let at = after_brace(body, 0)?;
        let mut text = members.join(",");
        if f.keys > 0 {
            text.push(',');
        }
        edits.push(Edit {
            start: at,
            end: at,
            text,
        });
    }
    if edits.is_empty() {
        return Ok(body.clone());
    }
    edits.sort_by_key(|e| (e.start, e.end));
    let extra: usize = edits.iter().map(|e| e.text.len()).sum();
    let mut out = Vec::with_capacity(body.len() + extra);
    let mut at = 0;
    for e in &edits {
        if e.start < at {
            return Err(ApiError::internal("rewrite: overlapping edits"));
        }
        out.extend_from_slice(&body[at..e.start]);
        out.extend_from_slice(e.text.as_bytes());
        at = e.end;
    }
    out.extend_from_slice(&body[at..]);
    Ok(Bytes::from(out))
}

// ---------------------------------------------------------------- usage ----

/// Token usage reported by an upstream. `cached ⊆ prompt` and
/// `reasoning ⊆ completion`, as OpenAI reports them (clamped so).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Usage {
    pub prompt_tokens: u64,
    pub cached_tokens: u64,
    pub completion_tokens: u64,
    pub reasoning_tokens: u64,
}

/// A token count as upstreams write it: an integer, sometimes a float or a
/// numeric string; negative is 0.
#[derive(Clone, Copy, Debug, Default)]
struct Count(u64);

impl<'de> Deserialize<'de> for Count {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl Visitor<'_> for V {
            type Value = Count;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a token count")
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<Count, E> {
                Ok(Count(v))
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<Count, E> {
                Ok(Count(u64::try_from(v).unwrap_or(0)))
            }
            fn visit_f64<E: de::Error>(self, v: f64) -> Result<Count, E> {
                // `as` saturates (NaN is 0); rounded up, never down.
                Ok(Count(v.ceil() as u64))
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Count, E> {
                v.trim()
                    .parse()
                    .map(Count)
                    .map_err(|_| E::custom("not a token count"))
            }
        }
        d.deserialize_any(V)
    }
}

#[derive(Deserialize, Default)]
#[serde(default)]
struct RawDetails {
    cached_tokens: Option<Count>,
    reasoning_tokens: Option<Count>,
}

/// The usage object in both of OpenAI's spellings.
#[derive(Deserialize, Default)]
#[serde(default)]
struct RawUsage {
    prompt_tokens: Option<Count>,
    completion_tokens: Option<Count>,
    input_tokens: Option<Count>,
    output_tokens: Option<Count>,
    prompt_tokens_details: Option<RawDetails>,
    completion_tokens_details: Option<RawDetails>,
    input_tokens_details: Option<RawDetails>,
    output_tokens_details: Option<RawDetails>,
}

impl RawUsage {
    fn into_usage(self) -> Option<Usage> {
        let prompt = self.prompt_tokens.or(self.input_tokens);
        let completion = self.completion_tokens.or(self.output_tokens);
        if prompt.is_none() && completion.is_none() {
            return None;
        }
        let prompt = prompt.unwrap_or_default().0;
        let completion = completion.unwrap_or_default().0;
        let detail =
            |a: Option<RawDetails>, b: Option<RawDetails>, f: fn(&RawDetails) -> Option<Count>| {
                a.as_ref()
                    .and_then(f)
                    .or_else(|| b.as_ref().and_then(f))
                    .unwrap_or_default()
                    .0
            };
        let cached = detail(self.prompt_tokens_details, self.input_tokens_details, |d| {
            d.cached_tokens
        });
        let reasoning = detail(
            self.completion_tokens_details,
            self.output_tokens_details,
            |d| d.reasoning_tokens,
        );
        Some(Usage {
            prompt_tokens: prompt,
            cached_tokens: cached.min(prompt),
            completion_tokens: completion,
            reasoning_tokens: reasoning.min(completion),
        })
    }
}

/// The length of a JSON array, or `None` for anything else.
struct ArrayLen(Option<usize>);

impl<'de> Deserialize<'de> for ArrayLen {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = ArrayLen;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("anything")
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<ArrayLen, A::Error> {
                let mut n = 0;
                while seq.next_element::<IgnoredAny>()?.is_some() {
                    n += 1;
                }
                Ok(ArrayLen(Some(n)))
            }
            fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<ArrayLen, A::Error> {
                IgnoredAny.visit_map(map).map(|_| ArrayLen(None))
            }
            fn visit_str<E: de::Error>(self, _: &str) -> Result<ArrayLen, E> {
                Ok(ArrayLen(None))
            }
            fn visit_u64<E: de::Error>(self, _: u64) -> Result<ArrayLen, E> {
                Ok(ArrayLen(None))
            }
            fn visit_i64<E: de::Error>(self, _: i64) -> Result<ArrayLen, E> {
                Ok(ArrayLen(None))
            }
            fn visit_f64<E: de::Error>(self, _: f64) -> Result<ArrayLen, E> {
                Ok(ArrayLen(None))
            }
            fn visit_bool<E: de::Error>(self, _: bool) -> Result<ArrayLen, E> {
                Ok(ArrayLen(None))
            }
            fn visit_unit<E: de::Error>(self) -> Result<ArrayLen, E> {
                Ok(ArrayLen(None))
            }
        }
        d.deserialize_any(V)
    }
}

#[derive(Deserialize, Default)]
#[serde(default)]
struct ResponseObject {
    usage: Option<RawUsage>,
}

/// The parts of a data event (or JSON body) that carry usage.
#[derive(Deserialize, Default)]
#[serde(default)]
struct UsageEvent {
    usage: Option<RawUsage>,
    choices: Option<ArrayLen>,
    /// Responses API events: `response.completed` and friends.
    response: Option<ResponseObject>,
}

/// Usage in one `data:` payload, and whether the event is a usage-only
/// chunk (`"choices":[]` with a usage).
fn parse_event(route: Route, payload: &[u8]) -> Option<(Usage, bool)> {
    let ev: UsageEvent = serde_json::from_slice(payload).ok()?;
    let top = ev.usage.and_then(RawUsage::into_usage);
    let nested = ev
        .response
        .and_then(|r| r.usage)
        .and_then(RawUsage::into_usage);
    let usage = if route == Route::Responses {
        nested.or(top)
    } else {
        top.or(nested)
    }?;
    let usage_only = top.is_some() && matches!(ev.choices, Some(ArrayLen(Some(0))));
    Some((usage, usage_only))
}

// ------------------------------------------------------------- scanning ----

/// Which framing an upstream answer uses.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Framing {
    Sse,
    Json,
}

impl Framing {
    /// `text/event-stream` (any case, any parameters) is SSE; anything else,
    /// or no content type, is read as JSON.
    pub fn from_content_type(ct: Option<&str>) -> Framing {
        let essence = ct.and_then(|c| c.split(';').next()).unwrap_or("").trim();
        if essence.eq_ignore_ascii_case("text/event-stream") {
            Framing::Sse
        } else {
            Framing::Json
        }
    }
}

/// A partial SSE line is carried over between frames up to this length; a
/// longer line still flows to the client but is metered only through
/// [`UsageTail`] (a `response.completed` event repeats the whole answer, so
/// it can be long).
const LINE_CAP: usize = 256 * 1024;

/// An event longer than this is never withheld: the usage-only chunk is a
/// few hundred bytes, and holding more would delay the client.
const HOLD_CAP: usize = 64 * 1024;

/// Bytes kept after the last `"usage"` key. What follows the real usage
/// object in OpenAI's shapes (its own few fields, `user`, `metadata`) is
/// small; a capture that outgrows this was not the last one.
const TAIL_CAP: usize = 64 * 1024;

const USAGE_KEY: &[u8] = b"\"usage\"";

static USAGE_FIND: LazyLock<Finder<'static>> = LazyLock::new(|| Finder::new(USAGE_KEY));
static USAGE_RFIND: LazyLock<FinderRev<'static>> = LazyLock::new(|| FinderRev::new(USAGE_KEY));

/// Keys whose non-empty string value is delivered completion text.
static CHAT_CONTENT: LazyLock<[Finder<'static>; 4]> = LazyLock::new(|| {
    [
        Finder::new(b"\"content\""),
        Finder::new(b"\"arguments\""),
        Finder::new(b"\"reasoning_content\""),
        Finder::new(b"\"refusal\""),
    ]
});
static COMPLETION_CONTENT: LazyLock<[Finder<'static>; 1]> =
    LazyLock::new(|| [Finder::new(b"\"text\"")]);
static RESPONSES_CONTENT: LazyLock<[Finder<'static>; 1]> =
    LazyLock::new(|| [Finder::new(b"\"delta\"")]);

fn skip_ws(b: &[u8]) -> &[u8] {
    let n = b.iter().take_while(|c| c.is_ascii_whitespace()).count();
    &b[n..]
}

/// Whether `hay` has the key `finder` looks for, followed by `:` and a value
/// that `value` accepts.
fn key_followed_by(hay: &[u8], finder: &Finder<'_>, value: fn(&[u8]) -> bool) -> bool {
    let len = finder.needle().len();
    finder.find_iter(hay).any(|i| {
        skip_ws(&hay[i + len..])
            .strip_prefix(b":")
            .is_some_and(|rest| value(skip_ws(rest)))
    })
}

/// An event that may carry usage: a `"usage"` key whose value is an object
/// (`"usage":null` on every other chunk is skipped without a parse).
fn may_carry_usage(payload: &[u8]) -> bool {
    key_followed_by(payload, &USAGE_FIND, |v| v.first() == Some(&b'{'))
}

fn carries_content(route: Route, payload: &[u8]) -> bool {
    let finders: &[Finder<'static>] = match route {
        Route::Chat => &*CHAT_CONTENT,
        Route::Completions => &*COMPLETION_CONTENT,
        Route::Responses => &*RESPONSES_CONTENT,
        Route::Embeddings | Route::Models | Route::Other => return false,
    };
    let non_empty = |v: &[u8]| v.len() >= 2 && v[0] == b'"' && v[1] != b'"';
    finders
        .iter()
        .any(|f| key_followed_by(payload, f, non_empty))
}

/// Finds the usage object without keeping the whole body: keeps the bytes
/// from the last `"usage"` key seen on (bounded by [`TAIL_CAP`]), and reads
/// the value that follows it at the end. Correct when the real usage is the
/// last `"usage"` key of the body, as in every OpenAI-shaped answer (text a
/// model writes sits inside JSON strings, where a quote is always escaped,
/// so it cannot form that key). Independent of how the bytes are split.
#[derive(Default)]
struct UsageTail {
    /// The bytes from the last `"usage"` key on, while `capturing`.
    buf: Vec<u8>,
    capturing: bool,
    /// The last bytes fed, to find a key split between two feeds.
    recent: [u8; 6],
    recent_len: usize,
}

impl UsageTail {
    fn feed(&mut self, data: &[u8]) {
        if data.is_empty() {
            return;
        }
        if let Some(p) = USAGE_RFIND.rfind(data) {
            self.buf.clear();
            self.buf.extend_from_slice(&data[p..]);
            self.capturing = true;
        } else if let Some(s) = self.straddle(data) {
            self.buf.clear();
            self.buf.extend_from_slice(&self.recent[s..self.recent_len]);
            self.buf.extend_from_slice(data);
            self.capturing = true;
        } else if self.capturing {
            self.buf.extend_from_slice(data);
        }
        if self.buf.len() > TAIL_CAP {
            self.buf.clear();
            self.capturing = false;
        }
        self.remember(data);
    }

    /// Where in `recent` a key starts that ends in `data`.
    fn straddle(&self, data: &[u8]) -> Option<usize> {
        let mut window = [0u8; 12];
        let head = data.len().min(USAGE_KEY.len() - 1);
        window[..self.recent_len].copy_from_slice(&self.recent[..self.recent_len]);
        window[self.recent_len..self.recent_len + head].copy_from_slice(&data[..head]);
        let window = &window[..self.recent_len + head];
        USAGE_FIND
            .find_iter(window)
            .filter(|&s| s < self.recent_len)
            .last()
    }

    fn remember(&mut self, data: &[u8]) {
        let keep = self.recent.len();
        if data.len() >= keep {
            self.recent.copy_from_slice(&data[data.len() - keep..]);
            self.recent_len = keep;
        } else {
            let mut joined = [0u8; 12];
            let n = self.recent_len + data.len();
            joined[..self.recent_len].copy_from_slice(&self.recent[..self.recent_len]);
            joined[self.recent_len..n].copy_from_slice(data);
            let from = n.saturating_sub(keep);
            self.recent_len = n - from;
            self.recent[..self.recent_len].copy_from_slice(&joined[from..n]);
        }
    }

    fn usage(&self) -> Option<Usage> {
        if !self.capturing {
            return None;
        }
        let rest = self.buf.strip_prefix(USAGE_KEY)?;
        let rest = skip_ws(skip_ws(rest).strip_prefix(b":")?);
        let mut de = serde_json::Deserializer::from_slice(rest);
        // The usage object is followed by more of the body: no `end()`.
        let raw = Option::<RawUsage>::deserialize(&mut de).ok()??;
        raw.into_usage()
    }

    fn reset(&mut self) {
        *self = UsageTail {
            buf: std::mem::take(&mut self.buf),
            ..UsageTail::default()
        };
        self.buf.clear();
    }
}

/// What one SSE line was.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Line {
    /// Empty: ends an event.
    Blank,
    /// The `data:` line of a usage-only chunk.
    UsageOnly,
    Other,
}

/// Reads the usage out of an upstream answer as it passes, frame by frame.
///
/// SSE is scanned line by line with `memchr`, check-then-parse: a line is
/// JSON-parsed only when it has a `"usage"` key with an object value. A
/// partial line is carried to the next frame (bounded by [`LINE_CAP`]); the
/// carry buffer is reused, so a frame that ends on a line boundary and has
/// no usage allocates nothing. `data: [DONE]` ends the metering. Lines end
/// with `\n` or `\r\n` (a lone `\r` is not a line end here). The result does
/// not depend on where frames split.
///
/// JSON bodies go through [`UsageTail`]: nothing but the bytes after the
/// last `"usage"` key is kept, so a 60 MB embeddings answer costs 64 KiB.
pub struct Meter {
    /// Which usage shape and which content keys to look for.
    route: Route,
    /// SSE events or one JSON body.
    framing: Framing,
    /// Remove the usage-only chunk from what the client receives.
    withhold: bool,
    /// Every byte the upstream sent, for records and metrics.
    bytes_seen: u64,
    /// The last usage seen (cumulative reports: the last one wins).
    usage: Option<Usage>,
    /// `data: [DONE]` was seen: nothing after it is metered.
    done: bool,
    /// The start of a line whose end has not arrived yet.
    line: Vec<u8>,
    /// The current line outgrew `LINE_CAP`; `Some(is a data line)`.
    overlong: Option<bool>,
    /// JSON bodies and overlong lines: the bytes after the last usage key.
    tail: UsageTail,
    /// Delivered data events that carried completion text.
    content_events: u64,
    /// Withholding: the bytes of the current event not yet given out.
    held: Vec<u8>,
    /// Withholding: bytes of the current event in earlier frames.
    event_len: usize,
    /// Withholding: the current event outgrew `HOLD_CAP` and flows as it comes.
    releasing: bool,
    /// The current event holds a usage-only chunk.
    event_usage_only: bool,
    /// Withholding: (end offset in the frame, usage-only) of the events that
    /// ended in the current frame. Reused between frames.
    ends: Vec<(usize, bool)>,
    /// `finish` ran.
    finished: bool,
}

impl Meter {
    /// A meter for an answer to `route` framed as `framing`.
    /// `withhold_usage_event`: the gateway injected include_usage into a
    /// streamed chat/completions request, so the usage-only chunk (a `data:`
    /// event whose JSON has `"choices":[]` and a usage) is removed from what
    /// the client receives; every other byte is identical.
    pub fn new(route: Route, framing: Framing, withhold_usage_event: bool) -> Meter {
        Meter {
            route,
            framing,
            withhold: withhold_usage_event && framing == Framing::Sse,
            bytes_seen: 0,
            usage: None,
            done: false,
            line: Vec::new(),
            overlong: None,
            tail: UsageTail::default(),
            content_events: 0,
            held: Vec::new(),
            event_len: 0,
            releasing: false,
            event_usage_only: false,
            ends: Vec::new(),
            finished: false,
        }
    }

    /// What the client must receive for this frame. Without withholding it
    /// is the same `Bytes` (a reference-count clone). With withholding, the
    /// bytes of an incomplete event are held until its blank line arrives,
    /// and the usage-only event is dropped; the result may be empty.
    pub fn on_frame(&mut self, frame: Bytes) -> Bytes {
        self.bytes_seen = self.bytes_seen.saturating_add(frame.len() as u64);
        match self.framing {
            Framing::Json => {
                self.tail.feed(&frame);
                frame
            }
            Framing::Sse if !self.withhold => {
                self.scan(&frame);
                frame
            }
            Framing::Sse => self.withhold_frame(frame),
        }
    }

    /// End of the answer: returns what was still held back, and meters a
    /// last line that had no line end.
    pub fn finish(&mut self) -> Bytes {
        if std::mem::replace(&mut self.finished, true) || self.framing == Framing::Json {
            return Bytes::new();
        }
        if let Some(is_data) = self.overlong.take() {
            self.end_overlong(is_data);
        } else if !self.line.is_empty() {
            let line = std::mem::take(&mut self.line);
            if self.on_line(&line) == Line::UsageOnly {
                self.event_usage_only = true;
            }
        }
        if !self.withhold {
            return Bytes::new();
        }
        let held = std::mem::take(&mut self.held);
        if self.event_usage_only && !self.releasing && self.event_len <= HOLD_CAP {
            return Bytes::new();
        }
        Bytes::from(held)
    }

    /// The usage the upstream reported, if it did.
    pub fn usage(&self) -> Option<Usage> {
        match self.framing {
            Framing::Sse => self.usage,
            Framing::Json => self.tail.usage(),
        }
    }

    /// When usage never arrives: an estimate of the completion tokens
    /// delivered so far, cheap to keep.
    ///
    /// SSE: one token per delivered data event whose text field (`content`,
    /// `arguments`, `reasoning_content`, `refusal` for chat; `text` for
    /// completions; `delta` for responses) is a non-empty string, found with
    /// `memmem`, without a JSON parse. OpenAI streams one token per chunk;
    /// an upstream that packs several is underestimated, which errs toward
    /// not billing what did not happen. JSON: a body is all or nothing, so
    /// `bytes_seen / 4` (text is about 4 bytes a token; the JSON around it
    /// makes this high) for chat, completions and responses, 0 otherwise.
    /// The caller clamps it to the reserved bound.
    pub fn delivered_completion_estimate(&self) -> u64 {
        match (self.framing, self.route) {
            (Framing::Sse, _) => self.content_events,
            (Framing::Json, Route::Chat | Route::Completions | Route::Responses) => {
                self.bytes_seen / 4
            }
            (Framing::Json, _) => 0,
        }
    }

    /// Bytes the upstream sent so far.
    pub fn bytes_seen(&self) -> u64 {
        self.bytes_seen
    }

    /// Meters the lines of `frame`; in withhold mode, records in `ends`
    /// where events end.
    fn scan(&mut self, frame: &[u8]) {
        let mut pos = 0;
        while pos < frame.len() {
            let Some(i) = memchr::memchr(b'\n', &frame[pos..]) else {
                self.carry(&frame[pos..]);
                return;
            };
            let end = pos + i;
            let piece = &frame[pos..end];
            let kind = if let Some(is_data) = self.overlong.take() {
                self.tail.feed(piece);
                self.end_overlong(is_data);
                Line::Other
            } else if self.line.is_empty() {
                if piece.len() > LINE_CAP {
                    self.start_overlong(&[], piece);
                    let is_data = self.overlong.take().unwrap_or(false);
                    self.end_overlong(is_data);
                    Line::Other
                } else {
                    self.on_line(piece)
                }
            } else if self.line.len() + piece.len() > LINE_CAP {
                let line = std::mem::take(&mut self.line);
                self.start_overlong(&line, piece);
                self.line = line;
                self.line.clear();
                let is_data = self.overlong.take().unwrap_or(false);
                self.end_overlong(is_data);
                Line::Other
            } else {
                let mut line = std::mem::take(&mut self.line);
                line.extend_from_slice(piece);
                let kind = self.on_line(&line);
                line.clear();
                self.line = line;
                kind
            };
            match kind {
                Line::Blank => {
                    if self.withhold {
                        self.ends.push((end + 1, self.event_usage_only));
                    }
                    self.event_usage_only = false;
                }
                Line::UsageOnly => self.event_usage_only = true,
                Line::Other => {}
            }
            pos = end + 1;
        }
    }

    /// Keeps the start of a line whose end is in a later frame.
    fn carry(&mut self, rest: &[u8]) {
        if self.overlong.is_some() {
            self.tail.feed(rest);
        } else if self.line.len() + rest.len() > LINE_CAP {
            let line = std::mem::take(&mut self.line);
            self.start_overlong(&line, rest);
            self.line = line;
            self.line.clear();
        } else {
            self.line.extend_from_slice(rest);
        }
    }

    /// A line longer than `LINE_CAP` begins with `head` + `rest`: from now on
    /// its bytes go to the tail scanner only.
    fn start_overlong(&mut self, head: &[u8], rest: &[u8]) {
        let mut prefix = [0u8; 5];
        let n = head.len().min(5);
        prefix[..n].copy_from_slice(&head[..n]);
        let m = rest.len().min(5 - n);
        prefix[n..n + m].copy_from_slice(&rest[..m]);
        self.overlong = Some(&prefix[..n + m] == b"data:");
        self.tail.reset();
        self.tail.feed(head);
        self.tail.feed(rest);
    }

    fn end_overlong(&mut self, is_data: bool) {
        if is_data && !self.done {
            if let Some(u) = self.tail.usage() {
                self.usage = Some(u);
            }
            self.content_events += 1;
        }
        self.tail.reset();
    }

    /// Meters one complete line (without its `\n`).
    fn on_line(&mut self, line: &[u8]) -> Line {
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        if line.is_empty() {
            return Line::Blank;
        }
        if self.done {
            return Line::Other;
        }
        let Some(payload) = line.strip_prefix(b"data:") else {
            return Line::Other;
        };
        let payload = payload.strip_prefix(b" ").unwrap_or(payload);
        if payload == b"[DONE]" {
            self.done = true;
            return Line::Other;
        }
        if carries_content(self.route, payload) {
            self.content_events += 1;
        }
        if may_carry_usage(payload) {
            if let Some((usage, usage_only)) = parse_event(self.route, payload) {
                self.usage = Some(usage);
                if usage_only {
                    return Line::UsageOnly;
                }
            }
        }
        Line::Other
    }

    /// Withholding: gives out every complete event of `frame` but the
    /// usage-only one, holds the incomplete rest.
    fn withhold_frame(&mut self, frame: Bytes) -> Bytes {
        let mut ends = std::mem::take(&mut self.ends);
        ends.clear();
        self.ends = ends;
        self.scan(&frame);

        let mut out = BytesMut::new();
        // The run of `frame` given out since the last dropped event.
        let mut run_start = 0;
        // Where the current event starts in `frame`.
        let mut cursor = 0;
        for i in 0..self.ends.len() {
            let (end, usage_only) = self.ends[i];
            let len = self.event_len + (end - cursor);
            if usage_only && !self.releasing && len <= HOLD_CAP {
                out.extend_from_slice(&frame[run_start..cursor]);
                run_start = end;
            } else if !self.held.is_empty() {
                // Only the first event of a frame can have held bytes, so
                // nothing is in `out` yet and the run starts at 0.
                out.extend_from_slice(&self.held);
            }
            self.held.clear();
            self.event_len = 0;
            self.releasing = false;
            cursor = end;
        }
        let rest = &frame[cursor..];
        let emit_end = if self.releasing || self.event_len + rest.len() > HOLD_CAP {
            if !self.releasing {
                out.extend_from_slice(&frame[run_start..cursor]);
                out.extend_from_slice(&self.held);
                self.held.clear();
                run_start = cursor;
                self.releasing = true;
            }
            frame.len()
        } else {
            self.held.extend_from_slice(rest);
            cursor
        };
        self.event_len += rest.len();
        if out.is_empty() {
            frame.slice(run_start..emit_end)
        } else {
            out.extend_from_slice(&frame[run_start..emit_end]);
            out.freeze()
        }
    }
}

// -------------------------------------------------------------- pricing ----

/// A model's price: USD per 1M tokens as `Pico` (input, cached input,
/// output) and per request.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Price {
    pub input: Pico,
    pub cached_input: Option<Pico>,
    pub output: Pico,
    pub request: Pico,
}

impl Price {
    /// Exact cost of `u`: each part rounded up to the next picoUSD (input on
    /// uncached prompt tokens, cached input on cached ones, output on
    /// completion tokens, reasoning included), plus the request price.
    /// Saturating.
    pub fn cost(&self, u: &Usage) -> Pico {
        let cached = u.cached_tokens.min(u.prompt_tokens);
        let uncached = u.prompt_tokens - cached;
        Pico::per_million(self.input, uncached)
            .saturating_add(Pico::per_million(
                self.cached_input.unwrap_or(self.input),
                cached,
            ))
            .saturating_add(Pico::per_million(self.output, u.completion_tokens))
            .saturating_add(self.request.max(Pico::ZERO))
    }

    /// The most a request can cost with at most `prompt_tokens` and
    /// `completion_tokens`: `cost(u) ≤ upper_bound(p, c)` for every `u` with
    /// `prompt ≤ p` and `completion ≤ c`.
    ///
    /// The prompt is priced at the larger of input and cached input (no
    /// discount assumed), plus 1 picoUSD: splitting the prompt into cached
    /// and uncached parts rounds up twice, and `⌈a⌉ + ⌈b⌉ ≤ ⌈a + b⌉ + 1`.
    pub fn upper_bound(&self, prompt_tokens: u64, completion_tokens: u64) -> Pico {
        let prompt_price = self.input.max(self.cached_input.unwrap_or(self.input));
        let split_rounding = if prompt_tokens >= 2 && prompt_price > Pico::ZERO {
            Pico(1)
        } else {
            Pico::ZERO
        };
        Pico::per_million(prompt_price, prompt_tokens)
            .saturating_add(split_rounding)
            .saturating_add(Pico::per_million(self.output, completion_tokens))
            .saturating_add(self.request.max(Pico::ZERO))
    }

    /// The largest completion token count `c` with
    /// `upper_bound(prompt_tokens, c) ≤ budget` (0 if even `c = 0` does not
    /// fit; `u64::MAX` if output is free).
    pub fn affordable_completion(&self, budget: Pico, prompt_tokens: u64) -> u64 {
        let fixed = self.upper_bound(prompt_tokens, 0);
        if fixed > budget {
            return 0;
        }
        // A saturated bound equals Pico::MAX, which only MAX covers.
        if budget == Pico::MAX || self.output <= Pico::ZERO {
            return u64::MAX;
        }
        // ⌈out·c/1e6⌉ ≤ r ⟺ out·c/1e6 ≤ r ⟺ c ≤ ⌊r·1e6/out⌋ (r an integer),
        // and fixed + r ≤ budget < MAX, so no saturation changes the sum.
        Pico::units_affordable(self.output, budget.saturating_sub(fixed))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chunk(content: &str) -> String {
        format!(
            r#"data: {{"id":"chatcmpl-1","object":"chat.completion.chunk","created":1,"model":"gpt-4o-mini","choices":[{{"index":0,"delta":{{"content":{}}},"finish_reason":null}}],"usage":null}}"#,
            serde_json::to_string(content).unwrap()
        ) + "\n\n"
    }

    const USAGE_CHUNK: &str = "data: {\"id\":\"chatcmpl-1\",\"object\":\"chat.completion.chunk\",\"created\":1,\"model\":\"gpt-4o-mini\",\"choices\":[],\"usage\":{\"prompt_tokens\":19,\"completion_tokens\":10,\"total_tokens\":29,\"prompt_tokens_details\":{\"cached_tokens\":3},\"completion_tokens_details\":{\"reasoning_tokens\":2}}}\n\n";

    fn chat_stream() -> (String, String) {
        let mut head = chunk("");
        for t in ["Hello", "!", " How", " can", " I", " help", "?"] {
            head += &chunk(t);
        }
        head += "data: {\"id\":\"chatcmpl-1\",\"choices\":[{\"index\":0,\"delta\":{},\"finish_reason\":\"stop\"}],\"usage\":null}\n\n";
        let full = format!("{head}{USAGE_CHUNK}data: [DONE]\n\n");
        let withheld = format!("{head}data: [DONE]\n\n");
        (full, withheld)
    }

    const CHAT_USAGE: Usage = Usage {
        prompt_tokens: 19,
        cached_tokens: 3,
        completion_tokens: 10,
        reasoning_tokens: 2,
    };

    /// Runs a whole stream through a meter in the given frames.
    fn run(route: Route, framing: Framing, withhold: bool, frames: &[&[u8]]) -> (Vec<u8>, Meter) {
        let mut m = Meter::new(route, framing, withhold);
        let mut out = Vec::new();
        for f in frames {
            out.extend_from_slice(&m.on_frame(Bytes::copy_from_slice(f)));
        }
        out.extend_from_slice(&m.finish());
        (out, m)
    }

    /// Every split of `stream` into two and three frames gives `want`.
    fn every_split(
        route: Route,
        framing: Framing,
        withhold: bool,
        stream: &[u8],
        want: &[u8],
        usage: Option<Usage>,
    ) {
        let (out, m) = run(route, framing, withhold, &[stream]);
        assert_eq!(String::from_utf8_lossy(&out), String::from_utf8_lossy(want));
        assert_eq!(m.usage(), usage);
        let estimate = m.delivered_completion_estimate();
        for i in 0..=stream.len() {
            let (out, m) = run(route, framing, withhold, &[&stream[..i], &stream[i..]]);
            assert_eq!(out, want, "split at {i}");
            assert_eq!(m.usage(), usage, "split at {i}");
            assert_eq!(m.delivered_completion_estimate(), estimate, "split at {i}");
        }
        for i in (0..stream.len()).step_by(13) {
            for j in (i..stream.len()).step_by(11) {
                let (out, m) = run(
                    route,
                    framing,
                    withhold,
                    &[&stream[..i], &stream[i..j], &stream[j..]],
                );
                assert_eq!(out, want, "split at {i}, {j}");
                assert_eq!(m.usage(), usage, "split at {i}, {j}");
            }
        }
    }

    #[test]
    fn routes() {
        assert_eq!(Route::from_path("/v1/chat/completions"), Route::Chat);
        assert_eq!(Route::from_path("/v1/chat/completions?x=1"), Route::Chat);
        assert_eq!(Route::from_path("/v1/completions/"), Route::Completions);
        assert_eq!(Route::from_path("/v1/embeddings"), Route::Embeddings);
        assert_eq!(Route::from_path("/v1/responses"), Route::Responses);
        assert_eq!(Route::from_path("/v1/responses/resp_1"), Route::Other);
        assert_eq!(Route::from_path("/v1/models"), Route::Models);
        assert_eq!(Route::Chat.as_str(), "chat");
        assert_eq!(Route::Other.as_str(), "other");
        assert_eq!(
            Framing::from_content_type(Some("text/event-stream; charset=utf-8")),
            Framing::Sse
        );
        assert_eq!(
            Framing::from_content_type(Some("Text/Event-Stream")),
            Framing::Sse
        );
        assert_eq!(
            Framing::from_content_type(Some("application/json")),
            Framing::Json
        );
        assert_eq!(Framing::from_content_type(None), Framing::Json);
    }

    #[test]
    fn chat_stream_usage_at_every_split() {
        let (full, withheld) = chat_stream();
        every_split(
            Route::Chat,
            Framing::Sse,
            false,
            full.as_bytes(),
            full.as_bytes(),
            Some(CHAT_USAGE),
        );
        every_split(
            Route::Chat,
            Framing::Sse,
            true,
            full.as_bytes(),
            withheld.as_bytes(),
            Some(CHAT_USAGE),
        );
        let (_, m) = run(Route::Chat, Framing::Sse, false, &[full.as_bytes()]);
        // Seven chunks carry text; the role chunk's "" does not.
        assert_eq!(m.delivered_completion_estimate(), 7);
        assert_eq!(m.bytes_seen(), full.len() as u64);
    }

    #[test]
    fn crlf_stream() {
        let (full, withheld) = chat_stream();
        let full = full.replace('\n', "\r\n");
        let withheld = withheld.replace('\n', "\r\n");
        every_split(
            Route::Chat,
            Framing::Sse,
            false,
            full.as_bytes(),
            full.as_bytes(),
            Some(CHAT_USAGE),
        );
        every_split(
            Route::Chat,
            Framing::Sse,
            true,
            full.as_bytes(),
            withheld.as_bytes(),
            Some(CHAT_USAGE),
        );
    }

    #[test]
    fn pass_through_returns_the_same_bytes() {
        let (full, _) = chat_stream();
        let frame = Bytes::from(full);
        let mut m = Meter::new(Route::Chat, Framing::Sse, false);
        let out = m.on_frame(frame.clone());
        assert_eq!(out.as_ptr(), frame.as_ptr());
        assert_eq!(out.len(), frame.len());
        // Withholding a frame of whole events without usage: a slice, no copy.
        let mut m = Meter::new(Route::Chat, Framing::Sse, true);
        let frame = Bytes::from(chunk("hi") + &chunk("there"));
        let out = m.on_frame(frame.clone());
        assert_eq!(out.as_ptr(), frame.as_ptr());
        assert_eq!(out.len(), frame.len());
    }

    #[test]
    fn withholding_drops_only_the_usage_only_event() {
        // Usage on a chunk that also has choices is metered, not dropped.
        let with_choices = "data: {\"choices\":[{\"index\":0,\"delta\":{\"content\":\"x\"}}],\"usage\":{\"prompt_tokens\":1,\"completion_tokens\":1}}\n\n";
        every_split(
            Route::Chat,
            Framing::Sse,
            true,
            with_choices.as_bytes(),
            with_choices.as_bytes(),
            Some(Usage {
                prompt_tokens: 1,
                completion_tokens: 1,
                ..Usage::default()
            }),
        );
        // A comment and an event: line in the usage event go with it.
        let stream = format!(
            ": keep-alive\n\n{}event: chunk\n{USAGE_CHUNK}data: [DONE]\n\n",
            chunk("a")
        );
        let want = format!(": keep-alive\n\n{}data: [DONE]\n\n", chunk("a"));
        every_split(
            Route::Chat,
            Framing::Sse,
            true,
            stream.as_bytes(),
            want.as_bytes(),
            Some(CHAT_USAGE),
        );
        // The stream ends right after the usage line, without its blank line.
        let cut = format!("{}{}", chunk("a"), USAGE_CHUNK.trim_end());
        every_split(
            Route::Chat,
            Framing::Sse,
            true,
            cut.as_bytes(),
            chunk("a").as_bytes(),
            Some(CHAT_USAGE),
        );
    }

    #[test]
    fn completions_stream() {
        let stream = "data: {\"id\":\"cmpl-1\",\"object\":\"text_completion\",\"choices\":[{\"text\":\" test\",\"index\":0,\"finish_reason\":null}],\"model\":\"gpt-3.5-turbo-instruct\"}\n\n\
                      data: {\"id\":\"cmpl-1\",\"object\":\"text_completion\",\"choices\":[],\"model\":\"gpt-3.5-turbo-instruct\",\"usage\":{\"prompt_tokens\":5,\"completion_tokens\":1,\"total_tokens\":6}}\n\n\
                      data: [DONE]\n\n";
        let usage = Some(Usage {
            prompt_tokens: 5,
            completion_tokens: 1,
            ..Usage::default()
        });
        every_split(
            Route::Completions,
            Framing::Sse,
            false,
            stream.as_bytes(),
            stream.as_bytes(),
            usage,
        );
        let (_, m) = run(
            Route::Completions,
            Framing::Sse,
            false,
            &[stream.as_bytes()],
        );
        assert_eq!(m.delivered_completion_estimate(), 1);
    }

    const RESPONSES_STREAM: &str = "event: response.created\n\
data: {\"type\":\"response.created\",\"sequence_number\":0,\"response\":{\"id\":\"resp_1\",\"object\":\"response\",\"status\":\"in_progress\",\"output\":[],\"usage\":null}}\n\n\
event: response.output_text.delta\n\
data: {\"type\":\"response.output_text.delta\",\"sequence_number\":1,\"item_id\":\"msg_1\",\"output_index\":0,\"content_index\":0,\"delta\":\"Hi\"}\n\n\
event: response.output_text.delta\n\
data: {\"type\":\"response.output_text.delta\",\"sequence_number\":2,\"item_id\":\"msg_1\",\"output_index\":0,\"content_index\":0,\"delta\":\" there\"}\n\n\
event: response.completed\n\
data: {\"type\":\"response.completed\",\"sequence_number\":3,\"response\":{\"id\":\"resp_1\",\"object\":\"response\",\"status\":\"completed\",\"output\":[{\"type\":\"message\",\"content\":[{\"type\":\"output_text\",\"text\":\"Hi there\"}]}],\"usage\":{\"input_tokens\":37,\"input_tokens_details\":{\"cached_tokens\":40},\"output_tokens\":11,\"output_tokens_details\":{\"reasoning_tokens\":4},\"total_tokens\":48},\"user\":null,\"metadata\":{}}}\n\n";

    #[test]
    fn responses_stream() {
        // cached is clamped to the prompt.
        let usage = Some(Usage {
            prompt_tokens: 37,
            cached_tokens: 37,
            completion_tokens: 11,
            reasoning_tokens: 4,
        });
        every_split(
            Route::Responses,
            Framing::Sse,
            false,
            RESPONSES_STREAM.as_bytes(),
            RESPONSES_STREAM.as_bytes(),
            usage,
        );
        // No choices: never withheld, even if asked.
        every_split(
            Route::Responses,
            Framing::Sse,
            true,
            RESPONSES_STREAM.as_bytes(),
            RESPONSES_STREAM.as_bytes(),
            usage,
        );
        let (_, m) = run(
            Route::Responses,
            Framing::Sse,
            false,
            &[RESPONSES_STREAM.as_bytes()],
        );
        assert_eq!(m.delivered_completion_estimate(), 2);
    }

    #[test]
    fn json_bodies() {
        let chat = r#"{
  "id": "chatcmpl-123", "object": "chat.completion", "model": "gpt-4o-mini",
  "choices": [{"index": 0, "message": {"role": "assistant", "content": "The word \"usage\": {\"prompt_tokens\": 1} is quoted"}, "finish_reason": "stop"}],
  "usage": {"prompt_tokens": 9, "completion_tokens": 12, "total_tokens": 21,
    "prompt_tokens_details": {"cached_tokens": 2, "audio_tokens": 0},
    "completion_tokens_details": {"reasoning_tokens": 3}},
  "service_tier": "default", "system_fingerprint": "fp_1"
}"#;
        let usage = Some(Usage {
            prompt_tokens: 9,
            cached_tokens: 2,
            completion_tokens: 12,
            reasoning_tokens: 3,
        });
        every_split(
            Route::Chat,
            Framing::Json,
            false,
            chat.as_bytes(),
            chat.as_bytes(),
            usage,
        );
        let embeddings = r#"{"object":"list","data":[{"object":"embedding","index":0,"embedding":[0.0023064255,-0.009327292]}],"model":"text-embedding-3-small","usage":{"prompt_tokens":8,"total_tokens":8}}"#;
        let usage = Some(Usage {
            prompt_tokens: 8,
            ..Usage::default()
        });
        every_split(
            Route::Embeddings,
            Framing::Json,
            true,
            embeddings.as_bytes(),
            embeddings.as_bytes(),
            usage,
        );
        let responses = r#"{"id":"resp_1","object":"response","output":[],"usage":{"input_tokens":5,"output_tokens":7,"output_tokens_details":{"reasoning_tokens":9}},"user":null}"#;
        let usage = Some(Usage {
            prompt_tokens: 5,
            completion_tokens: 7,
            reasoning_tokens: 7,
            ..Usage::default()
        });
        every_split(
            Route::Responses,
            Framing::Json,
            false,
            responses.as_bytes(),
            responses.as_bytes(),
            usage,
        );
        let error =
            r#"{"error":{"message":"Rate limit","type":"requests","code":"rate_limit_exceeded"}}"#;
        every_split(
            Route::Chat,
            Framing::Json,
            false,
            error.as_bytes(),
            error.as_bytes(),
            None,
        );
        let (_, m) = run(Route::Embeddings, Framing::Json, false, &[error.as_bytes()]);
        assert_eq!(m.delivered_completion_estimate(), 0);
    }

    #[test]
    fn a_huge_json_body_keeps_only_its_tail() {
        let mut body = String::from(r#"{"object":"list","data":["#);
        for i in 0..200_000 {
            body += &format!("{{\"index\":{i},\"embedding\":[0.1,0.2]}},");
        }
        body += r#"{}],"usage":{"prompt_tokens":123456,"total_tokens":123456}}"#;
        let mut m = Meter::new(Route::Embeddings, Framing::Json, false);
        for piece in body.as_bytes().chunks(16 * 1024) {
            m.on_frame(Bytes::copy_from_slice(piece));
        }
        m.finish();
        assert!(m.tail.buf.capacity() <= 2 * TAIL_CAP);
        assert_eq!(m.usage().map(|u| u.prompt_tokens), Some(123_456));
    }

    #[test]
    fn garbage_and_edge_cases() {
        for (stream, usage) in [
            (&b"\xff\xfe\x00data: {\"usage\":{\"prompt_tokens\":\n\n"[..], None),
            (b"data: {\"choices\":[],\"usage\":{}}\n\n", None),
            (b"data: {\"choices\":[],\"usage\":{\"prompt_tokens\":-3,\"completion_tokens\":2.5}}\n\n",
                Some(Usage { prompt_tokens: 0, completion_tokens: 3, ..Usage::default() })),
            // Nothing after [DONE] is metered.
            (b"data: [DONE]\n\ndata: {\"choices\":[],\"usage\":{\"prompt_tokens\":1}}\n\n", None),
            // No space after the colon, last line without a line end.
            (b"data:{\"choices\":[],\"usage\":{\"prompt_tokens\":4,\"completion_tokens\":\"5\"}}",
                Some(Usage { prompt_tokens: 4, completion_tokens: 5, ..Usage::default() })),
            // A later usage replaces an earlier one (cumulative reports).
            (b"data: {\"usage\": {\"prompt_tokens\":1}}\n\ndata: {\"usage\" : {\"prompt_tokens\":2}}\n\n",
                Some(Usage { prompt_tokens: 2, ..Usage::default() })),
            (b"", None),
            (b"\n\n\n\r\n", None),
        ] {
            every_split(Route::Chat, Framing::Sse, false, stream, stream, usage);
            let (once, _) = run(Route::Chat, Framing::Sse, true, &[stream]);
            for i in 0..=stream.len() {
                let (out, _) = run(Route::Chat, Framing::Sse, true, &[&stream[..i], &stream[i..]]);
                assert_eq!(out, once);
            }
        }
        // finish twice returns nothing more.
        let mut m = Meter::new(Route::Chat, Framing::Sse, true);
        assert!(
            m.on_frame(Bytes::from_static(b"data: {\"x\":1}"))
                .is_empty()
        );
        assert_eq!(&m.finish()[..], b"data: {\"x\":1}");
        assert!(m.finish().is_empty());
    }

    #[test]
    fn a_huge_line_still_flows_and_is_metered_from_its_tail() {
        let text = "x".repeat(LINE_CAP + 10);
        let huge = format!(
            "data: {{\"type\":\"response.completed\",\"response\":{{\"output\":[{{\"text\":\"{text}\"}}],\"usage\":{{\"input_tokens\":3,\"output_tokens\":70000}}}}}}\n\n"
        );
        let stream = format!(
            "{}{huge}data: [DONE]\n\n",
            RESPONSES_STREAM
                .split("event: response.completed")
                .next()
                .unwrap_or("")
        );
        let usage = Some(Usage {
            prompt_tokens: 3,
            completion_tokens: 70_000,
            ..Usage::default()
        });
        for withhold in [false, true] {
            for step in [1000, 4096, LINE_CAP, stream.len()] {
                let frames: Vec<&[u8]> = stream.as_bytes().chunks(step).collect();
                let (out, m) = run(Route::Responses, Framing::Sse, withhold, &frames);
                assert_eq!(out, stream.as_bytes());
                assert_eq!(m.usage(), usage, "step {step}");
                assert!(m.line.capacity() <= 2 * LINE_CAP);
            }
        }
        // A huge event is never held back whole: it flows as it comes.
        let mut m = Meter::new(Route::Chat, Framing::Sse, true);
        let big = Bytes::from(format!(
            "data: {{\"choices\":[],\"x\":\"{}",
            "y".repeat(HOLD_CAP)
        ));
        assert_eq!(m.on_frame(big.clone()), big);
    }

    // ---- requests ----

    fn info(route: Route, body: &str) -> RequestInfo {
        inspect(route, body.as_bytes()).unwrap_or_else(|e| panic!("{e}: {body}"))
    }

    fn err(route: Route, body: &str) -> (&'static str, Option<String>) {
        let e = inspect(route, body.as_bytes()).expect_err(body);
        assert_eq!(e.status, 400);
        (e.code, e.param.map(|p| p.into_owned()))
    }

    #[test]
    fn inspects_chat() {
        let i = info(
            Route::Chat,
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
            Route::Chat,
            r#"{"model":"o3","messages":[],"max_tokens":5,"max_completion_tokens":50,"stream":null}"#,
        );
        assert_eq!(i.max_tokens, Some(50));
        assert!(!i.stream && !i.include_usage);
        // Tools count raw; settings do not count.
        let tools = r#"[{"type":"function","function":{"name":"f"}}]"#;
        let i = info(
            Route::Chat,
            &format!(r#"{{"model":"m","messages":[],"temperature":0.2,"tools":{tools}}}"#),
        );
        assert_eq!(i.prompt_bytes, (tools.len() + "tools".len() + 3) as u64);
        assert_eq!(i.prompt_parts, 1);
    }

    #[test]
    fn inspects_other_routes() {
        let i = info(
            Route::Completions,
            r#"{"model":"m","prompt":[[1,2,3],"ab"],"suffix":"z","max_tokens":7}"#,
        );
        assert_eq!(
            (i.prompt_bytes, i.prompt_parts, i.max_tokens),
            (3 + 2 + 1, 3, Some(7))
        );
        let i = info(
            Route::Embeddings,
            r#"{"model":"e","input":["a","bcd"],"max_tokens":3}"#,
        );
        assert_eq!((i.prompt_bytes, i.prompt_parts, i.max_tokens), (4, 2, None));
        let i = info(
            Route::Responses,
            r#"{"model":"r","instructions":"hi","input":"abc","max_output_tokens":9,"stream":true}"#,
        );
        assert_eq!(
            (i.prompt_bytes, i.prompt_parts, i.max_tokens),
            (5, 2, Some(9))
        );
        assert!(i.include_usage);
        let i = info(
            Route::Responses,
            r#"{"model":"r","input":[{"role":"user","content":[{"type":"input_text","text":"x"},{"type":"input_image","image_url":"https://e/i.png"}]}]}"#,
        );
        assert_eq!((i.prompt_bytes, i.images), (1, 1));
        assert_eq!(info(Route::Other, ""), RequestInfo::default());
        assert_eq!(info(Route::Other, "[1]"), RequestInfo::default());
        let i = info(
            Route::Other,
            r#"{"model":"tts-1","stream":"yes","input":"x"}"#,
        );
        assert_eq!((i.model.as_deref(), i.stream), (Some("tts-1"), false));
        assert_eq!(info(Route::Other, r#"{"model":7}"#).model, None);
        assert_eq!(err(Route::Other, "{").0, "invalid_json");
    }

    #[test]
    fn inspect_errors() {
        let bad = [
            (Route::Chat, "", "invalid_json", None),
            (Route::Chat, "{\"model\":\"m\",", "invalid_json", None),
            (Route::Chat, "[]", "invalid_json", None),
            (
                Route::Chat,
                r#"{"model":"a","model":"b"}"#,
                "invalid_json",
                None,
            ),
            (
                Route::Chat,
                r#"{"messages":[]}"#,
                "missing_required_parameter",
                Some("model"),
            ),
            (
                Route::Embeddings,
                r#"{"model":null,"input":"x"}"#,
                "missing_required_parameter",
                Some("model"),
            ),
            (Route::Chat, r#"{"model":1}"#, "invalid_type", Some("model")),
            (
                Route::Chat,
                r#"{"model":"m","stream":"true"}"#,
                "invalid_type",
                Some("stream"),
            ),
            (
                Route::Chat,
                r#"{"model":"m","max_tokens":-1}"#,
                "invalid_type",
                Some("max_tokens"),
            ),
            (
                Route::Chat,
                r#"{"model":"m","max_tokens":1.5}"#,
                "invalid_type",
                Some("max_tokens"),
            ),
            (
                Route::Chat,
                r#"{"model":"m","max_completion_tokens":"9"}"#,
                "invalid_type",
                Some("max_completion_tokens"),
            ),
            (
                Route::Responses,
                r#"{"model":"m","max_output_tokens":[]}"#,
                "invalid_type",
                Some("max_output_tokens"),
            ),
            (
                Route::Chat,
                r#"{"model":"m","messages":{}}"#,
                "invalid_type",
                Some("messages"),
            ),
            (
                Route::Chat,
                r#"{"model":"m","stream_options":true}"#,
                "invalid_type",
                Some("stream_options"),
            ),
            (
                Route::Chat,
                r#"{"model":"m","stream_options":[true]}"#,
                "invalid_type",
                Some("stream_options"),
            ),
            (
                Route::Chat,
                r#"{"model":"m","stream_options":{"include_usage":1}}"#,
                "invalid_type",
                Some("stream_options"),
            ),
            (
                Route::Completions,
                r#"{"model":"m","prompt":5}"#,
                "invalid_type",
                Some("prompt"),
            ),
            (
                Route::Embeddings,
                r#"{"model":"m","input":{}}"#,
                "invalid_type",
                Some("input"),
            ),
            (
                Route::Responses,
                r#"{"model":"m","instructions":[]}"#,
                "invalid_type",
                Some("instructions"),
            ),
        ];
        for (route, body, code, param) in bad {
            assert_eq!(err(route, body), (code, param.map(str::to_owned)), "{body}");
        }
    }

    // ---- rewrites ----

    fn rewritten(route: Route, body: &str, rw: Rewrite) -> String {
        let out = rewrite(route, &Bytes::copy_from_slice(body.as_bytes()), &rw).unwrap();
        let back = inspect(route, &out).unwrap();
        if rw.include_usage {
            assert!(back.include_usage);
        }
        if let Some(m) = rw.max_tokens {
            assert_eq!(back.max_tokens, Some(m));
        }
        String::from_utf8(out.to_vec()).unwrap()
    }

    #[test]
    fn rewrite_splices_and_replaces() {
        let both = Rewrite {
            include_usage: true,
            max_tokens: Some(64),
        };
        let body =
            r#"{"model":"m","messages":[],"temperature":0.1000000000000000055511151231257827}"#;
        assert_eq!(
            rewritten(Route::Chat, body, both),
            r#"{"stream_options":{"include_usage":true},"max_completion_tokens":64,"model":"m","messages":[],"temperature":0.1000000000000000055511151231257827}"#
        );
        assert_eq!(
            rewritten(
                Route::Chat,
                r#" { "model" : "m", "max_tokens" : 4096, "stream_options" : { "x" : 1 } } "#,
                both
            ),
            r#" { "model" : "m", "max_tokens" : 64, "stream_options" : {"include_usage":true, "x" : 1 } } "#
        );
        assert_eq!(
            rewritten(
                Route::Chat,
                r#"{"model":"m","stream_options":{"include_usage":false},"max_tokens":9,"max_completion_tokens":9}"#,
                both
            ),
            r#"{"model":"m","stream_options":{"include_usage":true},"max_tokens":64,"max_completion_tokens":64}"#
        );
        assert_eq!(
            rewritten(
                Route::Chat,
                r#"{"model":"m","stream_options":null,"max_tokens":null}"#,
                both
            ),
            r#"{"model":"m","stream_options":{"include_usage":true},"max_tokens":64}"#
        );
        assert_eq!(
            rewritten(Route::Chat, r#"{"model":"m","stream_options": { }}"#, both),
            r#"{"max_completion_tokens":64,"model":"m","stream_options": {"include_usage":true}}"#
        );
        assert_eq!(
            rewritten(Route::Completions, r#"{"model":"m"}"#, both),
            r#"{"stream_options":{"include_usage":true},"max_tokens":64,"model":"m"}"#
        );
        // Responses: only the max field (usage arrives unasked).
        assert_eq!(
            rewritten(
                Route::Responses,
                r#"{"model":"m","max_output_tokens":1000}"#,
                both
            ),
            r#"{"model":"m","max_output_tokens":64}"#
        );
        // Nothing to change: the same buffer.
        let body = Bytes::from_static(
            br#"{"model":"m","stream_options":{"include_usage":true},"max_tokens":64}"#,
        );
        for route in [
            Route::Chat,
            Route::Completions,
            Route::Embeddings,
            Route::Other,
        ] {
            let out = rewrite(route, &body, &both).unwrap();
            assert_eq!(out.as_ptr(), body.as_ptr());
        }
        let out = rewrite(Route::Chat, &body, &Rewrite::default()).unwrap();
        assert_eq!(out.as_ptr(), body.as_ptr());
        // A body inspect refuses is refused.
        assert!(rewrite(Route::Chat, &Bytes::from_static(b"{\"model\":1}"), &both).is_err());
    }

    // ---- pricing ----

    fn price(input: &str, cached: Option<&str>, output: &str, request: &str) -> Price {
        let p = |s: &str| Pico::parse_usd(s).unwrap();
        Price {
            input: p(input),
            cached_input: cached.map(p),
            output: p(output),
            request: p(request),
        }
    }

    #[test]
    fn cost_rounds_each_part_up() {
        let pr = price("0.15", Some("0.075"), "0.60", "0");
        let u = Usage {
            prompt_tokens: 1000,
            cached_tokens: 200,
            completion_tokens: 500,
            reasoning_tokens: 100,
        };
        // 800 × 0.15 + 200 × 0.075 + 500 × 0.60 per 1M tokens.
        assert_eq!(pr.cost(&u), Pico(120_000_000 + 15_000_000 + 300_000_000));
        // One token of a cheap model is not free.
        let one = Usage {
            completion_tokens: 1,
            ..Usage::default()
        };
        assert_eq!(price("0", None, "0.000001", "0").cost(&one), Pico(1));
        assert_eq!(price("0", None, "0", "0").cost(&one), Pico::ZERO);
        // Cached without a cached price is input.
        let pr = price("1", None, "0", "0.01");
        let u = Usage {
            prompt_tokens: 10,
            cached_tokens: 99,
            ..Usage::default()
        };
        assert_eq!(pr.cost(&u), Pico(10_000_000 + 10_000_000_000));
        // Saturates.
        let u = Usage {
            prompt_tokens: u64::MAX,
            completion_tokens: u64::MAX,
            ..Usage::default()
        };
        assert_eq!(price("9000000", None, "9000000", "1").cost(&u), Pico::MAX);
    }

    #[test]
    fn upper_bound_covers_every_cost() {
        for pr in [
            price("0.000003", Some("0.000001"), "0.000007", "0"),
            price("0.000001", Some("0.000005"), "0.000002", "0.000000000003"),
            price("2.5", Some("1.25"), "10", "0"),
            price("0", None, "0", "0"),
        ] {
            for p in 0..12u64 {
                for c in 0..4u64 {
                    let bound = pr.upper_bound(p, c);
                    for prompt in 0..=p {
                        for cached in 0..=prompt {
                            let u = Usage {
                                prompt_tokens: prompt,
                                cached_tokens: cached,
                                completion_tokens: c,
                                reasoning_tokens: 0,
                            };
                            assert!(pr.cost(&u) <= bound, "{pr:?} {u:?}");
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn affordable_completion_is_exact_at_the_boundary() {
        for pr in [
            price("0.15", Some("0.075"), "0.60", "0"),
            price("3", None, "15", "0.001"),
            price("0.000001", None, "0.000003", "0"),
            price("1", None, "0", "0"),
        ] {
            for prompt in [0u64, 1, 7, 1000] {
                for budget in [
                    0i64,
                    1,
                    999,
                    1_000_000,
                    123_456_789_012,
                    i64::MAX - 1,
                    i64::MAX,
                ] {
                    let budget = Pico(budget);
                    let c = pr.affordable_completion(budget, prompt);
                    if pr.upper_bound(prompt, 0) > budget {
                        assert_eq!(c, 0);
                        continue;
                    }
                    assert!(pr.upper_bound(prompt, c) <= budget, "{pr:?} {budget:?} {c}");
                    if c < u64::MAX {
                        assert!(
                            pr.upper_bound(prompt, c + 1) > budget,
                            "{pr:?} {budget:?} {c}"
                        );
                    }
                }
            }
        }
        // $1 left, 0.60 per 1M output, 1000 prompt tokens at 0.15: exactly.
        let pr = price("0.15", None, "0.60", "0");
        let c = pr.affordable_completion(Pico::usd(1), 1000);
        assert_eq!(
            c,
            (1_000_000_000_000 - 150_000_000) * 1_000_000 / 600_000_000_000
        );
    }
}
