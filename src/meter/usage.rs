//! The usage an upstream reports, in every spelling it is written.

use serde::Deserialize;
use serde::de::{self, Deserializer, IgnoredAny, MapAccess, SeqAccess, Visitor};

use super::Endpoint;

/// Token usage reported by an upstream. `cached ⊆ prompt` and
/// `reasoning ⊆ completion`, as OpenAI reports them (clamped so).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Usage {
    /// Every prompt token, cached and cache-written ones included (for
    /// Anthropic: `input_tokens` + cache creation + cache reads).
    pub prompt_tokens: u64,
    /// Prompt tokens read from the upstream's prompt cache (OpenAI's
    /// `cached_tokens`, Anthropic's `cache_read_input_tokens`).
    pub cached_tokens: u64,
    /// Prompt tokens written to the prompt cache, priced apart (Anthropic's
    /// `cache_creation_input_tokens`). `cached + cache_write ≤ prompt`.
    pub cache_write_tokens: u64,
    /// Of the cache writes, those with Anthropic's 1-hour TTL
    /// (`cache_creation.ephemeral_1h_input_tokens`), priced apart from the
    /// 5-minute ones. `cache_write_1h ≤ cache_write`.
    pub cache_write_1h_tokens: u64,
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

/// Anthropic's `cache_creation`: the cache writes split by TTL.
#[derive(Deserialize, Default)]
#[serde(default)]
struct RawCacheCreation {
    ephemeral_5m_input_tokens: Option<Count>,
    ephemeral_1h_input_tokens: Option<Count>,
}

/// The usage object in both of OpenAI's spellings.
#[derive(Deserialize, Default)]
#[serde(default)]
pub(super) struct RawUsage {
    prompt_tokens: Option<Count>,
    completion_tokens: Option<Count>,
    input_tokens: Option<Count>,
    output_tokens: Option<Count>,
    prompt_tokens_details: Option<RawDetails>,
    completion_tokens_details: Option<RawDetails>,
    input_tokens_details: Option<RawDetails>,
    output_tokens_details: Option<RawDetails>,
    /// Anthropic: prompt tokens written to the cache (not in `input_tokens`).
    cache_creation_input_tokens: Option<Count>,
    /// Anthropic: prompt tokens read from the cache (not in `input_tokens`).
    cache_read_input_tokens: Option<Count>,
    /// Anthropic: the cache writes by TTL (5-minute and 1-hour).
    cache_creation: Option<RawCacheCreation>,
}

impl RawUsage {
    /// Anthropic's usage, over what earlier events reported: a field the
    /// event has replaces the earlier one (counts are cumulative), a field
    /// it lacks keeps it (`message_delta` often carries only
    /// `output_tokens`; `message_start` carries input and cache tokens).
    pub(super) fn merge_anthropic(self, prev: Option<Usage>) -> Option<Usage> {
        if prev.is_none()
            && self.input_tokens.is_none()
            && self.output_tokens.is_none()
            && self.cache_creation_input_tokens.is_none()
            && self.cache_read_input_tokens.is_none()
            && self.cache_creation.is_none()
        {
            return None;
        }
        let prev = prev.unwrap_or_default();
        let prev_input = prev.prompt_tokens - prev.cached_tokens - prev.cache_write_tokens;
        let input = self.input_tokens.map_or(prev_input, |c| c.0);
        // The TTL split, when given: its parts sum to the writes when the
        // total is absent.
        let (split_5m, split_1h) = match &self.cache_creation {
            Some(c) => (
                c.ephemeral_5m_input_tokens.map(|c| c.0),
                c.ephemeral_1h_input_tokens.map(|c| c.0),
            ),
            None => (None, None),
        };
        let write = self
            .cache_creation_input_tokens
            .map(|c| c.0)
            .or(match (split_5m, split_1h) {
                (None, None) => None,
                (a, b) => Some(a.unwrap_or(0).saturating_add(b.unwrap_or(0))),
            })
            .unwrap_or(prev.cache_write_tokens);
        let write_1h = split_1h.unwrap_or(prev.cache_write_1h_tokens);
        let read = self
            .cache_read_input_tokens
            .map_or(prev.cached_tokens, |c| c.0);
        let output = self.output_tokens.map_or(prev.completion_tokens, |c| c.0);
        // Saturating: the parts are clamped so that they still sum to at
        // most the prompt.
        let prompt = input.saturating_add(write).saturating_add(read);
        let read = read.min(prompt);
        let write = write.min(prompt - read);
        Some(Usage {
            prompt_tokens: prompt,
            cached_tokens: read,
            cache_write_tokens: write,
            cache_write_1h_tokens: write_1h.min(write),
            completion_tokens: output,
            reasoning_tokens: 0,
        })
    }

    pub(super) fn into_usage(self) -> Option<Usage> {
        if self.cache_creation_input_tokens.is_some()
            || self.cache_read_input_tokens.is_some()
            || self.cache_creation.is_some()
        {
            return self.merge_anthropic(None);
        }
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
            cache_write_tokens: 0,
            cache_write_1h_tokens: 0,
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
    /// Anthropic's `message_start`: `message.usage`.
    message: Option<ResponseObject>,
}

/// Usage in one `data:` payload (merged over `prev` for Anthropic's
/// events, which report it in parts), and whether the event is a usage-only
/// chunk (`"choices":[]` with a usage).
pub(super) fn parse_event(
    endpoint: Endpoint,
    prev: Option<Usage>,
    payload: &[u8],
) -> Option<(Usage, bool)> {
    if endpoint == Endpoint::Messages {
        return parse_anthropic_event(prev, payload).map(|(u, _)| (u, false));
    }
    let ev: UsageEvent = serde_json::from_slice(payload).ok()?;
    let top = ev.usage.and_then(RawUsage::into_usage);
    let nested = ev
        .response
        .and_then(|r| r.usage)
        .and_then(RawUsage::into_usage);
    let usage = if endpoint == Endpoint::Responses {
        nested.or(top)
    } else {
        top.or(nested)
    }?;
    let usage_only = top.is_some() && matches!(ev.choices, Some(ArrayLen(Some(0))));
    Some((usage, usage_only))
}

/// Usage in one Anthropic stream event, merged over `prev`, and whether it
/// is the final count: a top-level `usage` (`message_delta`) carries the
/// cumulative output, where `message_start`'s `message.usage` only opens it.
pub(super) fn parse_anthropic_event(prev: Option<Usage>, payload: &[u8]) -> Option<(Usage, bool)> {
    let ev: UsageEvent = serde_json::from_slice(payload).ok()?;
    let (raw, last) = match (ev.message.and_then(|m| m.usage), ev.usage) {
        (Some(start), _) => (start, false),
        (None, Some(delta)) => (delta, true),
        (None, None) => return None,
    };
    raw.merge_anthropic(prev).map(|u| (u, last))
}
