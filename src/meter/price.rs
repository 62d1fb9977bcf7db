//! What usage costs, exactly, in picoUSD.

use super::Usage;
use crate::money::Pico;

/// A model's price: USD per 1M tokens as `Pico` (input, cached input,
/// output) and per request.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Price {
    /// USD per 1M uncached prompt tokens.
    pub input: Pico,
    /// USD per 1M prompt tokens read from the cache; `None` is `input`.
    pub cached_input: Option<Pico>,
    /// USD per 1M prompt tokens written to the cache (Anthropic's
    /// `cache_creation_input_tokens`); `None` is `input`.
    pub cache_write: Option<Pico>,
    /// USD per 1M prompt tokens written to the cache with Anthropic's
    /// 1-hour TTL (`cache_creation.ephemeral_1h_input_tokens`); `None` is
    /// `cache_write`.
    pub cache_write_1h: Option<Pico>,
    /// USD per 1M completion tokens, reasoning included.
    pub output: Pico,
    /// USD per request, whatever its tokens.
    pub request: Pico,
}

impl Price {
    /// Exact cost of `u`: each part rounded up to the next picoUSD (input on
    /// uncached prompt tokens, cached input on cached ones, cache write on
    /// 5-minute cache writes, cache write 1h on 1-hour ones, output on
    /// completion tokens, reasoning included), plus the request price.
    /// Without a `cache_write` price, 5-minute writes are input tokens;
    /// without a `cache_write_1h` price, 1-hour writes are priced as
    /// 5-minute ones. Saturating.
    pub fn cost(&self, u: &Usage) -> Pico {
        let cached = u.cached_tokens.min(u.prompt_tokens);
        let written = u.cache_write_tokens.min(u.prompt_tokens - cached);
        let written_1h = u.cache_write_1h_tokens.min(written);
        let price_1h = self.cache_write_1h.or(self.cache_write);
        // A part without its own price stays in the input part, so that
        // its rounding is the input's.
        let priced_5m = match self.cache_write {
            Some(_) => written - written_1h,
            None => 0,
        };
        let priced_1h = match price_1h {
            Some(_) => written_1h,
            None => 0,
        };
        let uncached = u.prompt_tokens - cached - priced_5m - priced_1h;
        Pico::per_million(self.input, uncached)
            .saturating_add(Pico::per_million(
                self.cache_write.unwrap_or(self.input),
                priced_5m,
            ))
            .saturating_add(Pico::per_million(price_1h.unwrap_or(self.input), priced_1h))
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
    /// The prompt is priced at the largest of input, cached input and the
    /// cache writes (no discount assumed), plus 1 picoUSD per extra part the
    /// prompt is split into: each part rounds up, and
    /// `⌈a⌉ + ⌈b⌉ ≤ ⌈a + b⌉ + 1`. Two parts (uncached, cached), one more for
    /// each cache-write price, and never more parts than tokens.
    pub fn upper_bound(&self, prompt_tokens: u64, completion_tokens: u64) -> Pico {
        let prompt_price = self
            .input
            .max(self.cached_input.unwrap_or(self.input))
            .max(self.cache_write.unwrap_or(self.input))
            .max(self.cache_write_1h.unwrap_or(self.input));
        let parts: u64 =
            2 + u64::from(self.cache_write.is_some()) + u64::from(self.cache_write_1h.is_some());
        let split_rounding = if prompt_price > Pico::ZERO {
            Pico(parts.min(prompt_tokens).saturating_sub(1) as i64)
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

    fn price(input: &str, cached: Option<&str>, output: &str, request: &str) -> Price {
        let p = |s: &str| Pico::parse_usd(s).unwrap();
        Price {
            input: p(input),
            cached_input: cached.map(p),
            cache_write: None,
            cache_write_1h: None,
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
            cache_write_tokens: 0,
            cache_write_1h_tokens: 0,
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
            cache_write_tokens: 0,
            cache_write_1h_tokens: 0,
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
                                cache_write_tokens: 0,
                                cache_write_1h_tokens: 0,
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

    #[test]
    fn cache_writes_have_their_own_price() {
        let mut pr = price("3", Some("0.30"), "15", "0");
        let u = Usage {
            prompt_tokens: 25 + 100 + 2000,
            cached_tokens: 2000,
            cache_write_tokens: 100,
            cache_write_1h_tokens: 0,
            completion_tokens: 15,
            reasoning_tokens: 0,
        };
        // Without a cache-write price, written tokens are input.
        assert_eq!(
            pr.cost(&u),
            Pico(125 * 3_000_000 + 2000 * 300_000 + 15 * 15_000_000)
        );
        pr.cache_write = Some(Pico::parse_usd("3.75").unwrap());
        assert_eq!(
            pr.cost(&u),
            Pico(25 * 3_000_000 + 100 * 3_750_000 + 2000 * 300_000 + 15 * 15_000_000)
        );
        // The bound covers every split of the prompt into three parts.
        for pr in [
            price("0.000003", Some("0.000001"), "0.000007", "0"),
            price("0.000001", Some("0.000005"), "0", "0"),
        ] {
            let pr = Price {
                cache_write: Some(Pico::parse_usd("0.0000037").unwrap()),
                ..pr
            };
            for p in 0..10u64 {
                let bound = pr.upper_bound(p, 0);
                for cached in 0..=p {
                    for written in 0..=p - cached {
                        let u = Usage {
                            prompt_tokens: p,
                            cached_tokens: cached,
                            cache_write_tokens: written,
                            cache_write_1h_tokens: 0,
                            ..Usage::default()
                        };
                        assert!(pr.cost(&u) <= bound, "{pr:?} {u:?}");
                    }
                }
            }
        }
    }

    #[test]
    fn one_hour_cache_writes_have_their_own_price() {
        let p = |s: &str| Pico::parse_usd(s).unwrap();
        let pr = Price {
            input: p("3"),
            cached_input: Some(p("0.30")),
            cache_write: Some(p("3.75")),
            cache_write_1h: Some(p("6")),
            output: p("15"),
            request: Pico::ZERO,
        };
        let u = Usage {
            prompt_tokens: 20 + 100 + 1000,
            cached_tokens: 1000,
            cache_write_tokens: 100,
            cache_write_1h_tokens: 40,
            completion_tokens: 8,
            reasoning_tokens: 0,
        };
        assert_eq!(
            pr.cost(&u),
            Pico(
                20 * 3_000_000 + 60 * 3_750_000 + 40 * 6_000_000 + 1000 * 300_000 + 8 * 15_000_000
            )
        );
        // Without a 1-hour price, 1-hour writes are 5-minute writes.
        let five = Price {
            cache_write_1h: None,
            ..pr
        };
        assert_eq!(
            five.cost(&u),
            Pico(20 * 3_000_000 + 100 * 3_750_000 + 1000 * 300_000 + 8 * 15_000_000)
        );
        // The bound covers every split into four parts.
        let tiny = Price {
            input: p("0.000003"),
            cached_input: Some(p("0.000001")),
            cache_write: Some(p("0.0000037")),
            cache_write_1h: Some(p("0.0000061")),
            output: Pico::ZERO,
            request: Pico::ZERO,
        };
        for n in 0..9u64 {
            let bound = tiny.upper_bound(n, 0);
            for cached in 0..=n {
                for written in 0..=n - cached {
                    for w1h in 0..=written {
                        let u = Usage {
                            prompt_tokens: n,
                            cached_tokens: cached,
                            cache_write_tokens: written,
                            cache_write_1h_tokens: w1h,
                            ..Usage::default()
                        };
                        assert!(tiny.cost(&u) <= bound, "{u:?}");
                    }
                }
            }
        }
    }
}
