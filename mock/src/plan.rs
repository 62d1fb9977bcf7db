//! Token budgets and the words of an answer: deterministic, so a test knows
//! an answer's length and cost without a model.

use std::time::{SystemTime, UNIX_EPOCH};

use serde_json::{Value, json};

use crate::knobs::Knobs;
use crate::served::{Tokens, Work};

/// Answer words, cycled; short ASCII so a token is one word and needs no
/// JSON escaping.
pub(crate) const WORDS: [&str; 16] = [
    "Tollgate", "meters", "every", "token", "that", "flows", "through", "the", "gate", "and",
    "settles", "each", "request", "exactly", "once", "today",
];

/// Tokens for a text of this many UTF-8 bytes: never more than the bytes,
/// which is what the gateway's reservation bound relies on.
pub(crate) fn text_tokens(bytes: usize) -> u64 {
    u64::try_from(bytes.div_ceil(4)).unwrap_or(u64::MAX)
}

/// Per-message overhead, as in OpenAI's chat format.
pub(crate) const MESSAGE_OVERHEAD: u64 = 4;

/// UTF-8 bytes of a message's text: a string, or the `text` of each part.
pub(crate) fn content_bytes(content: Option<&Value>) -> usize {
    match content {
        Some(Value::String(text)) => text.len(),
        Some(Value::Array(parts)) => parts
            .iter()
            .filter_map(|part| part.get("text").and_then(Value::as_str))
            .map(str::len)
            .sum(),
        _ => 0,
    }
}

/// The token budget of one answer.
pub(crate) struct Plan {
    /// Prompt tokens.
    pub(crate) prompt: u64,
    /// Of the prompt, those read from OpenAI's cache.
    pub(crate) cached: u64,
    /// Answer words (visible tokens).
    pub(crate) visible: usize,
    /// Reasoning tokens spent before the visible ones.
    pub(crate) reasoning: u64,
    /// The output bound cut the answer short.
    pub(crate) truncated: bool,
    /// Usage is reported at all (not `Fault::NoUsage`).
    pub(crate) usage: bool,
}

impl Plan {
    /// Reasoning is spent first, then visible tokens, both within `max`.
    pub(crate) fn new(
        prompt: u64,
        max: Option<u64>,
        knobs: &Knobs,
        reasoning: u64,
        cached: u64,
    ) -> Plan {
        let wanted = u64::try_from(knobs.chunks).unwrap_or(u64::MAX);
        let (reasoning_used, visible, truncated) = match max {
            None => (reasoning, wanted, false),
            Some(max) => {
                let reasoning_used = reasoning.min(max);
                let visible = wanted.min(max - reasoning_used);
                (
                    reasoning_used,
                    visible,
                    reasoning.saturating_add(wanted) > max,
                )
            }
        };
        Plan {
            prompt,
            cached: cached.min(prompt),
            visible: usize::try_from(visible).unwrap_or(usize::MAX),
            reasoning: reasoning_used,
            truncated,
            usage: !knobs.no_usage(),
        }
    }

    pub(crate) fn completion(&self) -> u64 {
        u64::try_from(self.visible)
            .unwrap_or(u64::MAX)
            .saturating_add(self.reasoning)
    }

    /// The whole answer's work, in OpenAI's units.
    pub(crate) fn work(&self, model: &str) -> Work {
        Work {
            model: model.to_owned(),
            tokens: Tokens {
                input: self.prompt,
                cached: self.cached,
                output: self.completion(),
                reasoning: self.reasoning,
                ..Tokens::default()
            },
        }
    }

    /// A stream's work before its first frame: the prompt and the hidden
    /// reasoning; each content frame adds its token as it is produced.
    pub(crate) fn work_before_stream(&self, model: &str) -> Work {
        Work {
            model: model.to_owned(),
            tokens: Tokens {
                input: self.prompt,
                cached: self.cached,
                output: self.reasoning,
                reasoning: self.reasoning,
                ..Tokens::default()
            },
        }
    }

    pub(crate) fn total(&self) -> u64 {
        self.prompt.saturating_add(self.completion())
    }

    pub(crate) fn finish_reason(&self) -> &'static str {
        if self.truncated { "length" } else { "stop" }
    }

    pub(crate) fn chat_usage(&self) -> Value {
        json!({
            "prompt_tokens": self.prompt,
            "completion_tokens": self.completion(),
            "total_tokens": self.total(),
            "prompt_tokens_details": {"cached_tokens": self.cached, "audio_tokens": 0},
            "completion_tokens_details": {
                "reasoning_tokens": self.reasoning,
                "audio_tokens": 0,
                "accepted_prediction_tokens": 0,
                "rejected_prediction_tokens": 0,
            },
        })
    }

    pub(crate) fn legacy_usage(&self) -> Value {
        json!({
            "prompt_tokens": self.prompt,
            "completion_tokens": self.completion(),
            "total_tokens": self.total(),
        })
    }

    pub(crate) fn responses_usage(&self) -> Value {
        if !self.usage {
            return Value::Null;
        }
        json!({
            "input_tokens": self.prompt,
            "input_tokens_details": {"cached_tokens": self.cached},
            "output_tokens": self.completion(),
            "output_tokens_details": {"reasoning_tokens": self.reasoning},
            "total_tokens": self.total(),
        })
    }
}

/// The `index`-th answer token as it appears in the text: words joined by
/// single spaces.
pub(crate) fn word(index: usize) -> (&'static str, &'static str) {
    let separator = if index == 0 { "" } else { " " };
    (separator, WORDS[index % WORDS.len()])
}

pub(crate) fn answer_text(visible: usize) -> String {
    let mut text = String::with_capacity(visible * 8);
    for index in 0..visible {
        let (separator, word) = word(index);
        text.push_str(separator);
        text.push_str(word);
    }
    text
}

pub(crate) fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |elapsed| elapsed.as_secs())
}

pub(crate) fn json_string(text: &str) -> String {
    serde_json::to_string(text).expect("a str always serializes")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prompt_tokens_stay_under_the_gateway_bound() {
        for text in [
            "",
            "a",
            "abcd",
            "abcde",
            "héllo wörld",
            "日本語のテキスト",
            "🦀🦀🦀",
        ] {
            let bytes = text.len() as u64;
            let tokens = text_tokens(text.len()) + MESSAGE_OVERHEAD;
            assert!(tokens <= bytes + 8, "{text:?}");
        }
    }
}
