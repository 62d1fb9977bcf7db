//! The work the mock did, so a test can assert "the upstream did nothing" or
//! "the upstream served exactly what was charged".
//!
//! Requests are counted by normalised path; tokens as the mock's own usage
//! objects report them, by model. A streamed answer's output tokens are
//! added when its body ends or is dropped, counting every token it produced
//! even if the peer never read it (the work was done): once
//! [`crate::MockUpstream::open_streams`] is 0, the tally is final.

use std::collections::BTreeMap;
use std::sync::{Mutex, PoisonError};

/// Tokens of work, in the units the provider's usage reports.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Tokens {
    /// Prompt tokens: OpenAI `prompt_tokens` / `input_tokens` (cached ones
    /// included, as OpenAI counts them), Anthropic `input_tokens` (cache
    /// reads and writes excluded, as Anthropic counts them).
    pub input: u64,
    /// OpenAI `cached_tokens`, a part of `input`.
    pub cached: u64,
    /// Anthropic `cache_creation_input_tokens`.
    pub cache_write: u64,
    /// The part of `cache_write` with the 1-hour TTL.
    pub cache_write_1h: u64,
    /// Anthropic `cache_read_input_tokens`.
    pub cache_read: u64,
    /// Output tokens produced, reasoning included.
    pub output: u64,
    /// The part of `output` spent on reasoning or thinking.
    pub reasoning: u64,
}

impl Tokens {
    fn add(&mut self, other: &Tokens) {
        self.input = self.input.saturating_add(other.input);
        self.cached = self.cached.saturating_add(other.cached);
        self.cache_write = self.cache_write.saturating_add(other.cache_write);
        self.cache_write_1h = self.cache_write_1h.saturating_add(other.cache_write_1h);
        self.cache_read = self.cache_read.saturating_add(other.cache_read);
        self.output = self.output.saturating_add(other.output);
        self.reasoning = self.reasoning.saturating_add(other.reasoning);
    }
}

/// A snapshot of the work a mock server did ([`crate::MockUpstream::served`]).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Served {
    /// Requests received, by normalised path, whatever became of them.
    pub received: BTreeMap<String, u64>,
    /// Requests answered with a 2xx status, by normalised path: the work
    /// the upstream account served (and its operator pays for).
    pub answered: BTreeMap<String, u64>,
    /// Tokens of every model together.
    pub tokens: Tokens,
    /// Tokens by the model named in the request.
    pub by_model: BTreeMap<String, Tokens>,
}

impl Served {
    /// Requests answered with a 2xx on this normalised path.
    pub fn answered_on(&self, path: &str) -> u64 {
        self.answered.get(path).copied().unwrap_or(0)
    }

    /// Requests received on this normalised path.
    pub fn received_on(&self, path: &str) -> u64 {
        self.received.get(path).copied().unwrap_or(0)
    }

    /// Requests answered with a 2xx on any path.
    pub fn answered_total(&self) -> u64 {
        self.answered.values().sum()
    }

    /// Tokens of one model (zero when it was never served).
    pub fn tokens_of(&self, model: &str) -> Tokens {
        self.by_model.get(model).copied().unwrap_or_default()
    }
}

/// The work one answer did when it was built: everything for a JSON answer;
/// the prompt (and hidden reasoning) for a stream, whose output the body adds.
pub(crate) struct Work {
    /// The model named in the request.
    pub(crate) model: String,
    /// Its tokens.
    pub(crate) tokens: Tokens,
}

/// The live tally behind [`Served`].
#[derive(Default)]
pub(crate) struct Tally {
    /// Taken once or twice per request, by the server's one thread.
    served: Mutex<Served>,
}

impl Tally {
    fn with<T>(&self, change: impl FnOnce(&mut Served) -> T) -> T {
        change(&mut self.served.lock().unwrap_or_else(PoisonError::into_inner))
    }

    pub(crate) fn snapshot(&self) -> Served {
        self.with(|served| served.clone())
    }

    pub(crate) fn received(&self, path: &str) {
        self.with(|served| bump(&mut served.received, path));
    }

    /// One answer with `success` status, and the work it did up front.
    pub(crate) fn answered(&self, path: &str, success: bool, work: Option<&Work>) {
        self.with(|served| {
            if success {
                bump(&mut served.answered, path);
            }
            if let Some(work) = work {
                add_tokens(served, &work.model, &work.tokens);
            }
        });
    }

    /// Output tokens a stream produced.
    pub(crate) fn output(&self, model: &str, tokens: u64) {
        if tokens == 0 {
            return;
        }
        let tokens = Tokens {
            output: tokens,
            ..Tokens::default()
        };
        self.with(|served| add_tokens(served, model, &tokens));
    }
}

fn bump(map: &mut BTreeMap<String, u64>, key: &str) {
    match map.get_mut(key) {
        Some(count) => *count += 1,
        None => {
            map.insert(key.to_owned(), 1);
        }
    }
}

fn add_tokens(served: &mut Served, model: &str, tokens: &Tokens) {
    served.tokens.add(tokens);
    match served.by_model.get_mut(model) {
        Some(total) => total.add(tokens),
        None => {
            served.by_model.insert(model.to_owned(), *tokens);
        }
    }
}
