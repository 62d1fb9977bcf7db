//! Money: `Pico`, an integer number of picoUSD (1e-12 USD), and its exact
//! decimal text form.
//!
//! No `f64` touches money anywhere in Tollgate. Decimal text (from
//! `config.toml` strings, JSON strings or JSON numbers) is parsed digit by
//! digit; a value with more precision than one picoUSD, or outside `i64`, is
//! an error, never rounded or wrapped.

use std::fmt;
use std::str::FromStr;

use serde::de::{self, Deserializer, Visitor};
use serde::{Deserialize, Serialize, Serializer};

/// picoUSD in one USD.
pub const PICO_PER_USD: i64 = 1_000_000_000_000;

/// Decimal places of one picoUSD in USD.
const SCALE: i32 = 12;

/// An amount of money in picoUSD. Signed so that deltas and refunds are
/// plain values; balances and prices are validated non-negative where they
/// are read.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Pico(pub i64);

/// Why a decimal amount was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MoneyError {
    #[error("amount is empty")]
    Empty,
    #[error("amount {0:?} is not a decimal number")]
    Invalid(String),
    #[error("amount {0:?} has more precision than 1 picoUSD (12 decimal places)")]
    TooPrecise(String),
    #[error("amount {0:?} is out of range (at most about 9.2 million USD)")]
    Overflow(String),
    #[error("amount {0:?} must not be negative")]
    Negative(String),
}

impl Pico {
    pub const ZERO: Pico = Pico(0);
    pub const MAX: Pico = Pico(i64::MAX);

    /// Whole USD, for tests and defaults.
    pub const fn usd(whole: i64) -> Pico {
        Pico(whole * PICO_PER_USD)
    }

    /// Parses a USD amount written as decimal text: `12`, `-0.5`, `0.0001`,
    /// `1.5e-3`. Exact: fails rather than rounds.
    pub fn parse_usd(text: &str) -> Result<Pico, MoneyError> {
        parse_decimal(text, SCALE).map(Pico)
    }

    /// Like [`Pico::parse_usd`] but refuses negative amounts.
    pub fn parse_usd_non_negative(text: &str) -> Result<Pico, MoneyError> {
        let p = Self::parse_usd(text)?;
        if p.0 < 0 {
            return Err(MoneyError::Negative(text.to_owned()));
        }
        Ok(p)
    }

    pub fn checked_add(self, other: Pico) -> Option<Pico> {
        self.0.checked_add(other.0).map(Pico)
    }

    pub fn checked_sub(self, other: Pico) -> Option<Pico> {
        self.0.checked_sub(other.0).map(Pico)
    }

    pub fn saturating_add(self, other: Pico) -> Pico {
        Pico(self.0.saturating_add(other.0))
    }

    pub fn saturating_sub(self, other: Pico) -> Pico {
        Pico(self.0.saturating_sub(other.0))
    }

    /// The cost of `units` at `per_million` per 1,000,000 units, rounded up
    /// to the next picoUSD so that a request that used tokens of a priced
    /// model never costs 0. Saturates at `Pico::MAX` instead of wrapping.
    pub fn per_million(per_million: Pico, units: u64) -> Pico {
        if units == 0 || per_million.0 <= 0 {
            return Pico::ZERO;
        }
        let product = per_million.0 as i128 * units as i128;
        let cost = (product + 999_999) / 1_000_000;
        Pico(i64::try_from(cost).unwrap_or(i64::MAX))
    }

    /// How many whole units `budget` pays for at `per_million` per 1,000,000
    /// units (the inverse of [`Pico::per_million`], rounded down).
    pub fn units_affordable(per_million: Pico, budget: Pico) -> u64 {
        if budget.0 <= 0 {
            return 0;
        }
        if per_million.0 <= 0 {
            return u64::MAX;
        }
        let units = budget.0 as i128 * 1_000_000 / per_million.0 as i128;
        u64::try_from(units).unwrap_or(u64::MAX)
    }

    /// Exact decimal USD text, without trailing zeros: `0.0001`, `12`, `-3.5`.
    pub fn to_usd_string(self) -> String {
        self.to_string()
    }
}

impl fmt::Display for Pico {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let neg = self.0 < 0;
        let abs = self.0.unsigned_abs();
        let whole = abs / PICO_PER_USD as u64;
        let frac = abs % PICO_PER_USD as u64;
        if neg {
            f.write_str("-")?;
        }
        write!(f, "{whole}")?;
        if frac != 0 {
            let digits = format!("{frac:012}");
            write!(f, ".{}", digits.trim_end_matches('0'))?;
        }
        Ok(())
    }
}

impl FromStr for Pico {
    type Err = MoneyError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Pico::parse_usd(s)
    }
}

/// Parses decimal text (optional `-`, digits with an optional `.`, optional
/// exponent) into an integer scaled by `10^scale`, exactly.
fn parse_decimal(text: &str, scale: i32) -> Result<i64, MoneyError> {
    let invalid = || MoneyError::Invalid(text.to_owned());
    if text.is_empty() {
        return Err(MoneyError::Empty);
    }
    let bytes = text.as_bytes();
    let (negative, rest) = match bytes[0] {
        b'-' => (true, &bytes[1..]),
        b'+' => (false, &bytes[1..]),
        _ => (false, bytes),
    };
    let (mantissa, exponent) = match rest.iter().position(|b| *b == b'e' || *b == b'E') {
        Some(i) => (&rest[..i], Some(&rest[i + 1..])),
        None => (rest, None),
    };
    let exp: i32 = match exponent {
        None => 0,
        Some(e) => {
            let (eneg, edigits) = match e.first() {
                Some(b'-') => (true, &e[1..]),
                Some(b'+') => (false, &e[1..]),
                _ => (false, e),
            };
            if edigits.is_empty() || edigits.len() > 4 || !edigits.iter().all(u8::is_ascii_digit) {
                return Err(invalid());
            }
            let v: i32 = std::str::from_utf8(edigits)
                .map_err(|_| invalid())?
                .parse()
                .map_err(|_| invalid())?;
            if eneg { -v } else { v }
        }
    };
    let (int_part, frac_part) = match mantissa.iter().position(|b| *b == b'.') {
        Some(i) => (&mantissa[..i], &mantissa[i + 1..]),
        None => (mantissa, &mantissa[..0]),
    };
    if int_part.is_empty() && frac_part.is_empty() {
        return Err(invalid());
    }
    if !int_part.iter().all(u8::is_ascii_digit) || !frac_part.iter().all(u8::is_ascii_digit) {
        return Err(invalid());
    }
    // value = digits × 10^(-frac_scale)
    let mut digits: Vec<u8> = int_part.iter().chain(frac_part).copied().collect();
    let mut frac_scale = frac_part.len() as i32 - exp;
    while digits.last() == Some(&b'0') && digits.len() > 1 {
        digits.pop();
        frac_scale -= 1;
    }
    let first_nonzero = digits.iter().position(|d| *d != b'0');
    let Some(start) = first_nonzero else {
        return Ok(0);
    };
    let digits = &digits[start..];
    if frac_scale > scale {
        return Err(MoneyError::TooPrecise(text.to_owned()));
    }
    // Every digit is significant now; more than 20 cannot fit an i64 once
    // scaled up (scale - frac_scale ≥ 0).
    if digits.len() > 20 {
        return Err(MoneyError::Overflow(text.to_owned()));
    }
    let mut value: i128 = 0;
    for d in digits {
        value = value * 10 + (d - b'0') as i128;
    }
    let shift = (scale - frac_scale) as u32;
    let factor = 10i128
        .checked_pow(shift)
        .ok_or_else(|| MoneyError::Overflow(text.to_owned()))?;
    let value = value
        .checked_mul(factor)
        .ok_or_else(|| MoneyError::Overflow(text.to_owned()))?;
    let value = if negative { -value } else { value };
    i64::try_from(value).map_err(|_| MoneyError::Overflow(text.to_owned()))
}

/// In JSON, an amount is written as a number with its exact decimal text
/// (`0.0001`, never `1.0000000000000000e-4`).
impl Serialize for Pico {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let raw = serde_json::value::RawValue::from_string(self.to_string())
            .map_err(serde::ser::Error::custom)?;
        raw.serialize(s)
    }
}

/// From `config.toml` (strings or integers) or any self-describing format.
/// JSON request bodies go through [`JsonUsd`] so that JSON numbers are read
/// from their text, not through `f64`.
impl<'de> Deserialize<'de> for Pico {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl Visitor<'_> for V {
            type Value = Pico;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a USD amount as a decimal string, e.g. \"0.15\"")
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Pico, E> {
                Pico::parse_usd(v).map_err(E::custom)
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<Pico, E> {
                v.checked_mul(PICO_PER_USD)
                    .map(Pico)
                    .ok_or_else(|| E::custom(MoneyError::Overflow(v.to_string())))
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<Pico, E> {
                i64::try_from(v)
                    .ok()
                    .and_then(|v| v.checked_mul(PICO_PER_USD))
                    .map(Pico)
                    .ok_or_else(|| E::custom(MoneyError::Overflow(v.to_string())))
            }
            fn visit_f64<E: de::Error>(self, v: f64) -> Result<Pico, E> {
                Err(E::custom(format!(
                    "amount {v} must be written as a decimal string (e.g. \"{v}\") so it is read exactly"
                )))
            }
        }
        d.deserialize_any(V)
    }
}

/// A USD amount in a JSON request body: a JSON number or a string, both read
/// exactly from their text.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct JsonUsd(pub Pico);

impl<'de> Deserialize<'de> for JsonUsd {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let raw = <Box<serde_json::value::RawValue>>::deserialize(d)?;
        let text = raw.get().trim();
        let number = if text.starts_with('"') {
            serde_json::from_str::<String>(text).map_err(de::Error::custom)?
        } else if text.starts_with(|c: char| c == '-' || c.is_ascii_digit()) {
            text.to_owned()
        } else {
            return Err(de::Error::custom(format!(
                "expected a USD amount (number or decimal string), found {text}"
            )));
        };
        Pico::parse_usd(&number)
            .map(JsonUsd)
            .map_err(de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_exact_decimals() {
        assert_eq!(Pico::parse_usd("0.0001"), Ok(Pico(100_000_000)));
        assert_eq!(Pico::parse_usd("1"), Ok(Pico(PICO_PER_USD)));
        assert_eq!(Pico::parse_usd("0.000000000001"), Ok(Pico(1)));
        assert_eq!(Pico::parse_usd("-2.5"), Ok(Pico(-2_500_000_000_000)));
        assert_eq!(Pico::parse_usd("1.5e-3"), Ok(Pico(1_500_000_000)));
        assert_eq!(Pico::parse_usd("15E-2"), Ok(Pico(150_000_000_000)));
        assert_eq!(Pico::parse_usd(".5"), Ok(Pico(500_000_000_000)));
        assert_eq!(Pico::parse_usd("5."), Ok(Pico(5 * PICO_PER_USD)));
        assert_eq!(
            Pico::parse_usd("0.1000000000000000000"),
            Ok(Pico(100_000_000_000))
        );
        assert_eq!(Pico::parse_usd("000"), Ok(Pico(0)));
        // 0.1 + 0.2 is exactly 0.3 here, unlike in f64.
        let sum = Pico::parse_usd("0.1")
            .unwrap()
            .checked_add(Pico::parse_usd("0.2").unwrap());
        assert_eq!(sum, Some(Pico::parse_usd("0.3").unwrap()));
    }

    #[test]
    fn refuses_what_it_cannot_represent() {
        assert!(matches!(
            Pico::parse_usd("0.0000000000001"),
            Err(MoneyError::TooPrecise(_))
        ));
        assert!(matches!(
            Pico::parse_usd("1e-13"),
            Err(MoneyError::TooPrecise(_))
        ));
        assert!(matches!(
            Pico::parse_usd("9300000"),
            Err(MoneyError::Overflow(_))
        ));
        assert!(matches!(
            Pico::parse_usd("1e30"),
            Err(MoneyError::Overflow(_))
        ));
        assert!(matches!(
            Pico::parse_usd("1e9999"),
            Err(MoneyError::Overflow(_))
        ));
        assert!(matches!(
            Pico::parse_usd("99999999999999999999999999"),
            Err(MoneyError::Overflow(_))
        ));
        for bad in [
            "", "-", ".", "1.2.3", "1e", "e5", "0x10", " 1", "1 ", "NaN", "inf", "1,5", "--1",
        ] {
            assert!(Pico::parse_usd(bad).is_err(), "{bad:?} must be refused");
        }
        assert!(matches!(
            Pico::parse_usd_non_negative("-1"),
            Err(MoneyError::Negative(_))
        ));
    }

    #[test]
    fn the_edges_of_i64() {
        assert_eq!(Pico::parse_usd("9223372.036854775807"), Ok(Pico(i64::MAX)));
        assert!(Pico::parse_usd("9223372.036854775808").is_err());
        assert_eq!(Pico::parse_usd("-9223372.036854775808"), Ok(Pico(i64::MIN)));
        assert_eq!(Pico(i64::MIN).to_string(), "-9223372.036854775808");
    }

    #[test]
    fn formats_exactly_and_round_trips() {
        for (p, s) in [
            (Pico(0), "0"),
            (Pico(1), "0.000000000001"),
            (Pico(100_000_000), "0.0001"),
            (Pico(PICO_PER_USD), "1"),
            (Pico(-1_500_000_000_000), "-1.5"),
            (Pico(i64::MAX), "9223372.036854775807"),
        ] {
            assert_eq!(p.to_string(), s);
            assert_eq!(Pico::parse_usd(s), Ok(p));
        }
    }

    #[test]
    fn per_million_rounds_up_and_never_free() {
        let price = Pico::parse_usd("0.15").unwrap(); // per 1M tokens
        assert_eq!(Pico::per_million(price, 1), Pico(150_000));
        assert_eq!(Pico::per_million(price, 1_000_000), price);
        let tiny = Pico(1); // 1 pico per 1M tokens
        assert_eq!(Pico::per_million(tiny, 1), Pico(1));
        assert_eq!(Pico::per_million(Pico::ZERO, 10), Pico::ZERO);
        assert_eq!(Pico::per_million(Pico::MAX, u64::MAX), Pico::MAX);
        assert_eq!(Pico::units_affordable(price, Pico(300_000)), 2);
        assert_eq!(Pico::units_affordable(price, Pico(299_999)), 1);
    }

    #[test]
    fn json_amounts_are_read_from_their_text() {
        #[derive(Deserialize)]
        struct B {
            a: JsonUsd,
        }
        let b: B = serde_json::from_str(r#"{"a": 0.1}"#).unwrap();
        assert_eq!(b.a.0, Pico(100_000_000_000));
        let b: B = serde_json::from_str(r#"{"a": "0.000000000003"}"#).unwrap();
        assert_eq!(b.a.0, Pico(3));
        let b: B = serde_json::from_str(r#"{"a": 1e-12}"#).unwrap();
        assert_eq!(b.a.0, Pico(1));
        assert!(serde_json::from_str::<B>(r#"{"a": 1e-13}"#).is_err());
        assert!(serde_json::from_str::<B>(r#"{"a": true}"#).is_err());
        assert!(serde_json::from_str::<B>(r#"{"a": null}"#).is_err());
        assert_eq!(serde_json::to_string(&Pico(100_000_000)).unwrap(), "0.0001");
    }
}
