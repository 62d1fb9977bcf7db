//! The usage an upstream reports, in every spelling it is written.

use serde::Deserialize;
use serde::de::{self, Deserializer, IgnoredAny, MapAccess, SeqAccess, Visitor};

use super::Endpoint;

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
pub(super) struct RawUsage {
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
    pub(super) fn into_usage(self) -> Option<Usage> {
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
pub(super) fn parse_event(endpoint: Endpoint, payload: &[u8]) -> Option<(Usage, bool)> {
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
