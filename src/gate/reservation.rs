//! Step 4, reserving: what a request may cost and how many tokens it may
//! use, held against the key's limit and its tokens-per-minute window
//! until the request settles.

use std::sync::Arc;
use std::sync::atomic::Ordering;

use crate::meter::Price;
use crate::money::Pico;

use super::LiveKey;

/// How a request is priced.
#[derive(Clone, Copy, Debug)]
pub enum Pricing {
    /// By tokens (and per request) at the model's price.
    Tokens(Price),
    /// A flat amount per request (a `[routes]` rule; 0 = free).
    Flat(Pico),
}

/// What a request may use at most: the gate reserves its cost and tokens.
#[derive(Clone, Copy, Debug)]
pub struct Bound {
    /// How the request is priced.
    pub pricing: Pricing,
    /// Upper bound of the prompt's tokens (counted once for all choices).
    pub prompt_tokens: u64,
    /// Completion tokens each answer may produce (`max_tokens`).
    pub completion_tokens: u64,
    /// Answers asked for (`n`); 0 counts as 1.
    pub choices: u32,
    /// When the cost does not fit, lower `completion_tokens` to what the
    /// key can still pay for (`on_insufficient = "cap"`) instead of refusing.
    pub cap: bool,
}

impl Bound {
    fn choices(&self) -> u64 {
        u64::from(self.choices.max(1))
    }

    /// The most the request can cost with `completion` tokens per answer.
    pub fn cost(&self, completion: u64) -> Pico {
        match self.pricing {
            Pricing::Tokens(p) => p.upper_bound(
                self.prompt_tokens,
                completion.saturating_mul(self.choices()),
            ),
            Pricing::Flat(f) => f,
        }
    }

    /// The largest completion per answer whose bound fits in `budget`.
    pub(super) fn affordable(&self, budget: Pico) -> u64 {
        match self.pricing {
            Pricing::Tokens(p) => {
                p.affordable_completion(budget, self.prompt_tokens) / self.choices()
            }
            // A flat price does not shrink with fewer tokens.
            Pricing::Flat(_) => 0,
        }
    }

    /// The most tokens the request can use with `completion` tokens per
    /// answer: what it holds in the key's tokens-per-minute window.
    pub fn tokens(&self, completion: u64) -> u64 {
        self.prompt_tokens
            .saturating_add(completion.saturating_mul(self.choices()))
    }
}

/// What the reservation step decided.
pub struct Reserved {
    pub reservation: Reservation,
    /// Lowered `max_tokens` when the bound had to be capped to fit.
    pub capped_max_tokens: Option<u64>,
    /// Today's daily fee, held by this request's reservation (the one
    /// request of the day that pays it): charged when it settles, so it
    /// belongs in its usage record.
    pub daily_fee: Option<Pico>,
}

/// Credit (and tokens of the tpm window) taken from a key for one request,
/// until it is settled. Dropping it unsettled releases it in full: nothing
/// is charged, not even the daily fee, whose day is given back so that the
/// next request pays it.
pub struct Reservation {
    pub(super) key: Arc<LiveKey>,
    /// The amount held for the request itself.
    pub amount: Pico,
    /// The daily fee held with it; charged in full on settle.
    pub daily_fee: Option<Pico>,
    /// The fee day before this reservation won the day's fee: restored
    /// when the reservation is dropped unsettled.
    pub(super) fee_day_before: i64,
    /// Tokens held in the tpm window (0: none)…
    pub(super) tokens: u64,
    /// …and the minute of the window they are held in.
    pub(super) minute: u32,
    pub(super) settled: bool,
    /// What the key's account holds for the same request (accounts: see
    /// `crate::billing`); settled and released with the key's part.
    pub(super) account: Option<crate::billing::AccountHold>,
    /// `billing.mode = "off"`: settles nothing (the request is counted,
    /// never charged).
    pub(super) unmetered: bool,
}

impl Reservation {
    /// The account paying with the key, for the usage record.
    pub fn account_id(&self) -> Option<Arc<str>> {
        self.account.as_ref().map(|h| h.account.id.clone())
    }

    /// Replaces the reservation by the actual cost and tokens and returns
    /// what was charged for the request: the actual cost, in full. What the
    /// upstream really did is never dropped: a cost above the reservation
    /// (an overrun, which the bound makes rare) is charged too, and may take
    /// the key past its limit by that much — the caller records and alerts
    /// it. The daily fee held with it is charged too (not included in the
    /// returned amount). Takes `self`: it runs once.
    pub fn settle(mut self, cost: Pico, tokens: u64) -> Pico {
        self.settled = true;
        let charge = if self.unmetered {
            Pico::ZERO
        } else {
            Pico(cost.0.max(0))
        };
        let fee = self.daily_fee.map(|f| f.0).unwrap_or(0);
        let k = &self.key;
        // committed = period_spent + reserved: move `charge` and the fee
        // from reserved to period_spent and release the rest (an overrun
        // makes the difference negative: committed grows by it).
        k.period_spent.fetch_add(charge.0 + fee, Ordering::AcqRel);
        k.committed
            .fetch_sub(self.amount.0 - charge.0, Ordering::AcqRel);
        if self.tokens > 0 {
            k.tpm_settle(self.minute, self.tokens, tokens);
        }
        if let Some(hold) = self.account.take() {
            hold.settle(charge.0 + fee);
        }
        charge
    }
}

impl Drop for Reservation {
    fn drop(&mut self) {
        if self.settled {
            return;
        }
        let fee = self.daily_fee.map(|f| f.0).unwrap_or(0);
        self.key
            .committed
            .fetch_sub(self.amount.0 + fee, Ordering::AcqRel);
        if self.daily_fee.is_some() {
            let today = self.key.fee_day.load(Ordering::Acquire);
            let _ = self.key.fee_day.compare_exchange(
                today,
                self.fee_day_before,
                Ordering::AcqRel,
                Ordering::Acquire,
            );
        }
        if self.tokens > 0 {
            self.key.tpm_settle(self.minute, self.tokens, 0);
        }
    }
}

/// The tokens-per-minute window in one word, so that taking tokens from it
/// and moving it to a new minute are one compare-and-swap: the minute
/// (since the epoch; a `u32` lasts past the year 10,000) in the high half,
/// the tokens held or used in it in the low half.
pub(super) fn pack_window(minute: u32, tokens: u64) -> u64 {
    (u64::from(minute) << 32) | tokens.min(u64::from(u32::MAX))
}

/// The window's (minute, tokens).
pub(super) fn unpack_window(w: u64) -> (u32, u64) {
    ((w >> 32) as u32, w & u64::from(u32::MAX))
}

/// The minute of `now_ms`, as the window stores it.
pub fn minute_of(now_ms: i64) -> u32 {
    now_ms.div_euclid(60_000).clamp(0, i64::from(u32::MAX)) as u32
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bound_counts_choices_and_caps() {
        let price = Price {
            input: Pico::parse_usd("1").unwrap(),
            cached_input: None,
            cache_write: None,
            cache_write_1h: None,
            output: Pico::parse_usd("2").unwrap(),
            request: Pico::ZERO,
        };
        let b = Bound {
            pricing: Pricing::Tokens(price),
            prompt_tokens: 100,
            completion_tokens: 50,
            choices: 2,
            cap: true,
        };
        assert_eq!(b.tokens(50), 200);
        assert_eq!(b.cost(50), price.upper_bound(100, 100));
        // 100 prompt tokens + 2 × 10 completion tokens fit this budget exactly.
        let budget = price.upper_bound(100, 20);
        assert_eq!(b.affordable(budget), 10);
        let flat = Bound {
            pricing: Pricing::Flat(Pico(7)),
            choices: 0,
            ..b
        };
        assert_eq!(flat.cost(1_000), Pico(7));
        assert_eq!(flat.tokens(50), 150);
        assert_eq!(flat.affordable(Pico::MAX), 0);
    }

    #[test]
    fn window_packs() {
        let w = pack_window(29_500_000, 1234);
        assert_eq!(unpack_window(w), (29_500_000, 1234));
        assert_eq!(
            unpack_window(pack_window(1, u64::MAX)).1,
            u64::from(u32::MAX)
        );
        assert_eq!(minute_of(120_001), 2);
        assert_eq!(minute_of(-5), 0);
    }
}
