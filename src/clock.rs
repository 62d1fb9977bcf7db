//! Wall-clock time as Unix milliseconds, with an offset that tests can
//! advance (expiry after 7 days, daily resets) without sleeping.
//!
//! Reading it is one atomic load plus `SystemTime::now()`; it is on the hot
//! path (expiry is checked inline on every request).

use std::sync::Arc;
use std::sync::atomic::{AtomicI64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// Milliseconds in one day.
pub const DAY_MS: i64 = 86_400_000;
pub const HOUR_MS: i64 = 3_600_000;

/// The gateway's clock. Clones share the offset.
#[derive(Clone, Debug, Default)]
pub struct Clock {
    /// Added to the system time; only ever non-zero in tests.
    offset_ms: Arc<AtomicI64>,
}

impl Clock {
    pub fn system() -> Clock {
        Clock::default()
    }

    /// Unix time in milliseconds.
    pub fn now_ms(&self) -> i64 {
        let sys = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_millis() as i64)
            .unwrap_or(0);
        sys + self.offset_ms.load(Ordering::Relaxed)
    }

    /// Unix time in seconds.
    pub fn now_secs(&self) -> i64 {
        self.now_ms().div_euclid(1000)
    }

    /// Moves this clock (and every clone) forward: for tests.
    pub fn advance(&self, by: Duration) {
        self.offset_ms
            .fetch_add(by.as_millis() as i64, Ordering::Relaxed);
    }

    /// Moves this clock (and every clone) back, as an NTP step can: for
    /// tests of what must only move forward.
    pub fn step_back(&self, by: Duration) {
        self.offset_ms
            .fetch_sub(by.as_millis() as i64, Ordering::Relaxed);
    }
}

/// RFC 3339 text (`2026-11-23T13:30:00Z`) for a Unix time in milliseconds.
pub fn rfc3339(ms: i64) -> String {
    let t = time::OffsetDateTime::from_unix_timestamp_nanos(ms as i128 * 1_000_000)
        .unwrap_or(time::OffsetDateTime::UNIX_EPOCH);
    t.format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_else(|_| "1970-01-01T00:00:00Z".to_owned())
}

/// Parses RFC 3339 text into Unix milliseconds.
pub fn parse_rfc3339(text: &str) -> Option<i64> {
    let t =
        time::OffsetDateTime::parse(text, &time::format_description::well_known::Rfc3339).ok()?;
    i64::try_from(t.unix_timestamp_nanos() / 1_000_000).ok()
}

/// How often what counts against a key's limit starts again from zero (UTC).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Period {
    Daily,
    Weekly,
    Monthly,
}

impl Period {
    /// The number of the period that contains `at_ms`: days since the epoch,
    /// ISO weeks (starting Monday) since the epoch, or `year * 12 + month0`.
    /// Two instants are in the same period exactly when their ids are equal.
    pub fn id(self, at_ms: i64) -> i64 {
        let day = at_ms.div_euclid(DAY_MS);
        match self {
            Period::Daily => day,
            // 1970-01-01 was a Thursday: shift so that weeks start on Monday.
            Period::Weekly => (day + 3).div_euclid(7),
            Period::Monthly => {
                let (y, m, _) = civil_from_days(day);
                y * 12 + (m as i64 - 1)
            }
        }
    }

    /// Unix ms at which the period containing `at_ms` started.
    pub fn start_ms(self, at_ms: i64) -> i64 {
        let day = at_ms.div_euclid(DAY_MS);
        match self {
            Period::Daily => day * DAY_MS,
            Period::Weekly => ((day + 3).div_euclid(7) * 7 - 3) * DAY_MS,
            Period::Monthly => {
                let (y, m, _) = civil_from_days(day);
                days_from_civil(y, m, 1) * DAY_MS
            }
        }
    }

    /// Unix ms at which the period after the one containing `at_ms` starts.
    pub fn next_start_ms(self, at_ms: i64) -> i64 {
        let day = at_ms.div_euclid(DAY_MS);
        match self {
            Period::Daily => (day + 1) * DAY_MS,
            Period::Weekly => ((day + 3).div_euclid(7) * 7 - 3 + 7) * DAY_MS,
            Period::Monthly => {
                let (y, m, _) = civil_from_days(day);
                let (ny, nm) = if m == 12 { (y + 1, 1) } else { (y, m + 1) };
                days_from_civil(ny, nm, 1) * DAY_MS
            }
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Period::Daily => "daily",
            Period::Weekly => "weekly",
            Period::Monthly => "monthly",
        }
    }
}

/// The limit period a key's spend moves to at `at_ms` from `current`:
/// `Some(id)` only when `at_ms` lies in a later period. Periods only move
/// forward: a clock stepped back across a boundary, or a record dated in an
/// earlier period, never reopens (and so never resets twice) a period. The
/// store thread (`charge`) and the gate's live key both roll with this.
pub fn period_roll(reset: Option<Period>, current: i64, at_ms: i64) -> Option<i64> {
    let id = reset?.id(at_ms);
    (id > current).then_some(id)
}

/// What changing a key's `limit_reset` does to what counts against its
/// limit: one rule, applied by the store to the account and by the gate to
/// the live key, so that memory and disk agree.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ResetChange {
    /// Same reset: nothing changes.
    Unchanged,
    /// To no reset: the limit caps lifetime spend, so everything spent
    /// counts (`period_spent = spent`, period 0). It may be over the limit
    /// at once; that is what the new setting says.
    CountAll,
    /// To a reset (from none or another one): what counts so far keeps
    /// counting, now in this period (no fresh limit at once); the next
    /// boundary starts from zero.
    Enter(i64),
}

impl ResetChange {
    /// The change from `from` to `to`, made at `at_ms` (the record's
    /// `updated_at`, so both sides compute the same period).
    pub fn of(from: Option<Period>, to: Option<Period>, at_ms: i64) -> ResetChange {
        match (from == to, to) {
            (true, _) => ResetChange::Unchanged,
            (false, None) => ResetChange::CountAll,
            (false, Some(p)) => ResetChange::Enter(p.id(at_ms)),
        }
    }
}

/// (year, month 1–12, day 1–31) of a day number since 1970-01-01
/// (Howard Hinnant's civil-from-days).
pub fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    (if m <= 2 { y + 1 } else { y }, m, d)
}

/// Day number since 1970-01-01 of a civil date.
pub fn days_from_civil(y: i64, m: u32, d: u32) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let m = m as i64;
    let doy = (153 * (if m > 2 { m - 3 } else { m + 9 }) + 2) / 5 + d as i64 - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn advance_moves_every_clone() {
        let a = Clock::system();
        let b = a.clone();
        let before = b.now_ms();
        a.advance(Duration::from_secs(7 * 86_400));
        assert!(b.now_ms() - before >= 7 * DAY_MS);
    }

    #[test]
    fn rfc3339_round_trip() {
        let ms = 1_795_000_000_123;
        assert_eq!(parse_rfc3339(&rfc3339(ms)), Some(ms));
        assert_eq!(
            parse_rfc3339("2026-11-23T00:00:00Z"),
            Some(1_795_392_000_000)
        );
        assert_eq!(parse_rfc3339("yesterday"), None);
    }

    #[test]
    fn periods_only_roll_forward() {
        let d = Some(Period::Daily);
        let now = parse_rfc3339("2026-11-23T00:00:01Z").unwrap();
        let today = Period::Daily.id(now);
        assert_eq!(period_roll(d, today - 1, now), Some(today));
        assert_eq!(period_roll(d, today, now), None);
        // The clock stepped back across midnight: yesterday is not reopened.
        assert_eq!(period_roll(d, today, now - 2000), None);
        assert_eq!(period_roll(None, 5, now), None);
        assert_eq!(ResetChange::of(d, d, now), ResetChange::Unchanged);
        assert_eq!(ResetChange::of(d, None, now), ResetChange::CountAll);
        assert_eq!(
            ResetChange::of(None, Some(Period::Monthly), now),
            ResetChange::Enter(Period::Monthly.id(now))
        );
    }

    #[test]
    fn periods() {
        // 2026-11-23 is a Monday.
        let monday = parse_rfc3339("2026-11-23T00:00:00Z").unwrap();
        let sunday_late = parse_rfc3339("2026-11-22T23:59:59Z").unwrap();
        assert_ne!(Period::Weekly.id(monday), Period::Weekly.id(sunday_late));
        assert_eq!(
            Period::Weekly.id(monday),
            Period::Weekly.id(monday + 6 * DAY_MS + 1)
        );
        assert_eq!(Period::Weekly.next_start_ms(sunday_late), monday);
        assert_eq!(Period::Weekly.next_start_ms(monday), monday + 7 * DAY_MS);
        assert_eq!(Period::Daily.next_start_ms(sunday_late), monday);
        let nov30 = parse_rfc3339("2026-11-30T12:00:00Z").unwrap();
        let dec1 = parse_rfc3339("2026-12-01T00:00:00Z").unwrap();
        assert_eq!(Period::Monthly.id(nov30) + 1, Period::Monthly.id(dec1));
        assert_eq!(Period::Monthly.next_start_ms(nov30), dec1);
        let dec31 = parse_rfc3339("2026-12-31T23:00:00Z").unwrap();
        assert_eq!(
            Period::Monthly.next_start_ms(dec31),
            parse_rfc3339("2027-01-01T00:00:00Z").unwrap()
        );
        let wednesday = parse_rfc3339("2026-11-25T15:30:00Z").unwrap();
        assert_eq!(
            Period::Daily.start_ms(wednesday),
            parse_rfc3339("2026-11-25T00:00:00Z").unwrap()
        );
        assert_eq!(Period::Weekly.start_ms(wednesday), monday);
        assert_eq!(Period::Weekly.start_ms(monday), monday);
        assert_eq!(Period::Weekly.start_ms(sunday_late), monday - 7 * DAY_MS);
        assert_eq!(
            Period::Monthly.start_ms(wednesday),
            parse_rfc3339("2026-11-01T00:00:00Z").unwrap()
        );
        for p in [Period::Daily, Period::Weekly, Period::Monthly] {
            let start = p.start_ms(nov30);
            assert_eq!(p.id(start), p.id(nov30));
            assert_ne!(p.id(start - 1), p.id(nov30));
        }
        for day in [-1000, 0, 59, 60, 20_000, 20_779] {
            let (y, m, d) = civil_from_days(day);
            assert_eq!(days_from_civil(y, m, d), day);
        }
    }
}
