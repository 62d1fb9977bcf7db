//! A key's rpm and tpm as shares of a cluster-wide window, for
//! `crate::cluster` (cluster mode only; a single node never makes one and
//! keeps its GCRA limiter and its own tpm window).
//!
//! In cluster mode a key's rpm and tpm count per UTC minute over all the
//! nodes: the database holds, per key and minute, how many requests and
//! tokens the nodes took of that minute's window, and never hands out more
//! than the limit. A node admits against what it took: requests against
//! its share of requests (counted in `admitted`), tokens against its share
//! of tokens (held and used in `LiveKey::tpm_window`, as on a single node).
//! Both checks are one compare-and-swap each, as on a single node; the
//! database is asked only when the share is out.
//!
//! Taking an unused share back (to return it) is reserved first like a
//! request's, then the share lowered, then the reservation dropped: in
//! between less is admissible, never more.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use super::LiveKey;
use super::reservation::{minute_of, pack_window, unpack_window};

/// What a share counts.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Unit {
    /// Requests of the key's `rpm`.
    Requests,
    /// Tokens of the key's `tpm`.
    Tokens,
}

impl Unit {
    /// Its name in the database.
    pub fn as_str(self) -> &'static str {
        match self {
            Unit::Requests => "requests",
            Unit::Tokens => "tokens",
        }
    }
}

/// This node's shares of one key's current rate windows. Each word is a
/// (minute, count) pair (`reservation::pack_window`): a count belongs to
/// its minute only, so a new minute starts every share at zero.
#[derive(Default)]
pub struct RateShare {
    /// Requests this node took of the minute's window.
    requests: AtomicU64,
    /// Requests admitted here in that minute (≤ `requests`).
    admitted: AtomicU64,
    /// Tokens this node took of the minute's window (what is held or used
    /// of them: `LiveKey::tpm_window`).
    tokens: AtomicU64,
    /// Requests the nodes together had taken of the window after this
    /// node's last take: what the `x-ratelimit-remaining-*` headers count.
    seen_requests: AtomicU64,
    /// The same for tokens.
    seen_tokens: AtomicU64,
}

/// The count of `word` in `minute` (0 for another minute's).
fn count_in(word: &AtomicU64, minute: u32) -> u64 {
    let (m, n) = unpack_window(word.load(Ordering::Acquire));
    if m == minute { n } else { 0 }
}

/// Adds `n` to the count of `minute`; a word of an earlier minute starts
/// again from `n`, one of a later minute (the grant came too late) is kept.
fn add_in(word: &AtomicU64, minute: u32, n: u64) {
    let _ = word.fetch_update(Ordering::AcqRel, Ordering::Acquire, |w| {
        let (m, c) = unpack_window(w);
        match m.cmp(&minute) {
            std::cmp::Ordering::Less => Some(pack_window(minute, n)),
            std::cmp::Ordering::Equal => Some(pack_window(m, c.saturating_add(n))),
            std::cmp::Ordering::Greater => None,
        }
    });
}

/// Lowers the count of `minute` by `n` (nothing for another minute's).
fn sub_in(word: &AtomicU64, minute: u32, n: u64) {
    let _ = word.fetch_update(Ordering::AcqRel, Ordering::Acquire, |w| {
        let (m, c) = unpack_window(w);
        (m == minute).then(|| pack_window(m, c.saturating_sub(n)))
    });
}

/// What the headers say remains of a window: the limit, less what all
/// nodes took as this node last saw it, plus this node's unused part.
fn remaining(limit: u64, seen: u64, unused: u64) -> u64 {
    limit.saturating_sub(seen).saturating_add(unused).min(limit)
}

/// Time until the end of `now_ms`'s minute (at least 1 ms).
pub(super) fn window_reset(now_ms: i64) -> Duration {
    let ends = (now_ms.div_euclid(60_000) + 1) * 60_000;
    Duration::from_millis((ends - now_ms).max(1) as u64)
}

impl RateShare {
    /// Admits one request against this node's share of the minute's
    /// requests: the remaining count for the headers, or why not.
    pub(super) fn admit(&self, rpm: u32, now_ms: i64) -> Result<u32, Duration> {
        let minute = minute_of(now_ms);
        let cap = count_in(&self.requests, minute).min(u64::from(rpm));
        let taken = self
            .admitted
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |w| {
                let (m, n) = unpack_window(w);
                let n = if m == minute { n } else { 0 };
                (n < cap).then(|| pack_window(minute, n + 1))
            });
        match taken {
            Ok(_) => Ok(self.requests_remaining(u64::from(rpm), minute) as u32),
            Err(_) => Err(window_reset(now_ms)),
        }
    }

    fn requests_remaining(&self, rpm: u64, minute: u32) -> u64 {
        let unused =
            count_in(&self.requests, minute).saturating_sub(count_in(&self.admitted, minute));
        remaining(rpm, count_in(&self.seen_requests, minute), unused)
    }

    /// What the headers say remains of the minute's tokens, with `used`
    /// of them held or used here.
    pub(super) fn tokens_remaining(&self, tpm: u64, used: u64, now_ms: i64) -> u64 {
        let minute = minute_of(now_ms);
        let unused = count_in(&self.tokens, minute).saturating_sub(used);
        remaining(tpm, count_in(&self.seen_tokens, minute), unused)
    }

    /// This node's share of tokens in `minute`.
    pub(super) fn tokens_in(&self, minute: u32) -> u64 {
        count_in(&self.tokens, minute)
    }
}

impl LiveKey {
    /// The key's rate shares, made (empty) on first use: from then on its
    /// rpm and tpm admit against them. Cluster mode only.
    pub fn rate_share(&self) -> &RateShare {
        self.rate_share.get_or_init(Box::default)
    }

    /// This node's unused share of `unit` in `now_ms`'s minute.
    pub fn share_free(&self, unit: Unit, now_ms: i64) -> u64 {
        let s = self.rate_share();
        let minute = minute_of(now_ms);
        match unit {
            Unit::Requests => {
                count_in(&s.requests, minute).saturating_sub(count_in(&s.admitted, minute))
            }
            Unit::Tokens => {
                let (m, used) = unpack_window(self.tpm_window.load(Ordering::Acquire));
                let used = if m == minute { used } else { 0 };
                count_in(&s.tokens, minute).saturating_sub(used)
            }
        }
    }

    /// A share taken from the database for `minute`, and what all nodes
    /// had taken of the window with it.
    pub fn share_add(&self, unit: Unit, minute: u32, granted: u64, taken_total: u64) {
        let s = self.rate_share();
        let (share, seen) = match unit {
            Unit::Requests => (&s.requests, &s.seen_requests),
            Unit::Tokens => (&s.tokens, &s.seen_tokens),
        };
        add_in(share, minute, granted);
        let _ = seen.fetch_update(Ordering::AcqRel, Ordering::Acquire, |w| {
            let (m, c) = unpack_window(w);
            (m < minute || (m == minute && c < taken_total))
                .then(|| pack_window(minute, taken_total))
        });
    }

    /// Takes `n` of the unused share of `unit` in `minute` out of
    /// admission's reach (to give it back to the database). Reserved like
    /// a request first (the same compare-and-swap admission uses), so no
    /// request is admitted into what is being returned.
    pub fn share_take_back(&self, unit: Unit, minute: u32, n: u64) -> bool {
        if n == 0 {
            return true;
        }
        let s = self.rate_share();
        let (share, used) = match unit {
            Unit::Requests => (&s.requests, &s.admitted),
            Unit::Tokens => (&s.tokens, &self.tpm_window),
        };
        let cap = count_in(share, minute);
        let reserved = used.fetch_update(Ordering::AcqRel, Ordering::Acquire, |w| {
            let (m, c) = unpack_window(w);
            let c = match m.cmp(&minute) {
                std::cmp::Ordering::Less => 0,
                std::cmp::Ordering::Equal => c,
                std::cmp::Ordering::Greater => return None,
            };
            (c.saturating_add(n) <= cap).then(|| pack_window(minute, c + n))
        });
        if reserved.is_err() {
            return false;
        }
        // The share first: in between, less is admissible, never more.
        sub_in(share, minute, n);
        sub_in(used, minute, n);
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_share_admits_its_requests_then_refuses() {
        let s = RateShare::default();
        let now = 90 * 60_000 + 1_000;
        let minute = minute_of(now);
        assert!(s.admit(30, now).is_err(), "nothing taken yet");
        add_in(&s.requests, minute, 2);
        s.seen_requests
            .store(pack_window(minute, 10), Ordering::Release);
        // 30 − 10 taken by all + 2 unused here.
        assert_eq!(s.admit(30, now), Ok(21));
        assert_eq!(s.admit(30, now), Ok(20));
        let reset = s.admit(30, now).unwrap_err();
        assert_eq!(reset, Duration::from_millis(59_000));
        // The next minute starts with no share.
        assert!(s.admit(30, now + 60_000).is_err());
        add_in(&s.requests, minute + 1, 1);
        assert!(s.admit(30, now + 60_000).is_ok());
        // A grant for a minute gone by does not count in the current one.
        add_in(&s.requests, minute, 5);
        assert!(s.admit(30, now + 60_000).is_err());
    }

    #[test]
    fn counts_belong_to_their_minute() {
        let w = AtomicU64::new(0);
        add_in(&w, 7, 3);
        add_in(&w, 7, 2);
        assert_eq!(count_in(&w, 7), 5);
        assert_eq!(count_in(&w, 8), 0);
        sub_in(&w, 7, 1);
        assert_eq!(count_in(&w, 7), 4);
        sub_in(&w, 6, 4);
        assert_eq!(count_in(&w, 7), 4, "another minute's change is ignored");
        add_in(&w, 9, 1);
        assert_eq!(count_in(&w, 9), 1);
        assert_eq!(remaining(30, 40, 0), 0);
        assert_eq!(remaining(30, 10, 5), 25);
    }
}
