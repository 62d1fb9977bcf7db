//! The brake on admin-token guessing (issue 9 item 16).
//!
//! Failures are counted per client network (an IPv4 address, an IPv6 /64:
//! one host owns a whole /64) in fixed one-minute windows. At
//! `limits.admin_failures_per_minute` failures the network is refused for
//! [`BLOCK_MS`], and the refusal comes *before* the token is compared: a
//! blocked guesser learns nothing, not even from the right token.
//!
//! Time is the gateway's [`Clock`], so tests move it instead of sleeping.

use std::net::IpAddr;

use dashmap::DashMap;

use crate::error::ApiError;

/// How long a network that failed too often is refused.
pub const BLOCK_MS: i64 = 15 * 60_000;
/// Length of one counting window.
const WINDOW_MS: i64 = 60_000;
/// Networks tracked before stale entries are pruned (memory stays bounded
/// when guesses come from many addresses).
const PRUNE_AT: usize = 10_000;

/// One network's failures.
#[derive(Clone, Copy, Debug, Default)]
struct Failures {
    /// Start of the current counting window (Unix ms).
    window_start_ms: i64,
    /// Failures in that window.
    count: u32,
    /// Refused until then (Unix ms); 0 = not blocked.
    blocked_until_ms: i64,
}

/// Admin-token failures per client network.
pub struct AdminGuard {
    /// Failures at which a network is blocked (at least 1).
    max_failures: u32,
    /// Networks with recent failures or an active block.
    by_net: DashMap<u128, Failures>,
}

/// The limiter's key: an IPv4 address, or the /64 of an IPv6 address
/// (IPv4-mapped IPv6 counts as its IPv4 address).
pub fn net_of(ip: IpAddr) -> u128 {
    match ip {
        IpAddr::V4(v4) => u128::from(u32::from(v4)),
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => u128::from(u32::from(v4)),
            // The /64 prefix, with bit 64 set to keep v6 networks apart
            // from v4 addresses (which fit in 32 bits).
            None => (u128::from(v6) >> 64) | (1u128 << 64),
        },
    }
}

impl AdminGuard {
    pub fn new(max_failures_per_minute: u32) -> AdminGuard {
        AdminGuard {
            max_failures: max_failures_per_minute.max(1),
            by_net: DashMap::new(),
        }
    }

    /// `Err(429)` while `ip`'s network is blocked. Called before the token
    /// is looked at.
    pub fn check(&self, ip: IpAddr, now_ms: i64) -> Result<(), ApiError> {
        let until = self
            .by_net
            .get(&net_of(ip))
            .map_or(0, |f| f.blocked_until_ms);
        if until > now_ms {
            let secs = (until - now_ms).div_euclid(1000) as u64;
            return Err(ApiError::rate_limited(
                "Too many failed admin authentications from this address; try again later.",
                secs,
            ));
        }
        Ok(())
    }

    /// Counts a failed attempt from `ip`; the one that reaches the limit
    /// starts the block.
    pub fn failed(&self, ip: IpAddr, now_ms: i64) {
        if self.by_net.len() >= PRUNE_AT {
            self.by_net.retain(|_, f| {
                f.blocked_until_ms > now_ms || now_ms - f.window_start_ms < WINDOW_MS
            });
        }
        let mut f = self.by_net.entry(net_of(ip)).or_default();
        if now_ms - f.window_start_ms >= WINDOW_MS || now_ms < f.window_start_ms {
            f.window_start_ms = now_ms;
            f.count = 0;
        }
        f.count = f.count.saturating_add(1);
        if f.count >= self.max_failures {
            f.blocked_until_ms = now_ms + BLOCK_MS;
            f.count = 0;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn blocks_after_n_failures_for_a_while() {
        let g = AdminGuard::new(3);
        let ip: IpAddr = "203.0.113.7".parse().unwrap();
        let other: IpAddr = "203.0.113.8".parse().unwrap();
        let t = 1_000_000;
        for i in 0..2 {
            g.check(ip, t + i).unwrap();
            g.failed(ip, t + i);
        }
        g.check(ip, t + 2).unwrap();
        g.failed(ip, t + 2);
        let e = g.check(ip, t + 3).unwrap_err();
        assert_eq!(e.status, 429);
        assert!(e.retry_after.unwrap() > 60);
        g.check(other, t + 3).unwrap();
        g.check(ip, t + 2 + BLOCK_MS - 1).unwrap_err();
        g.check(ip, t + 2 + BLOCK_MS).unwrap();
    }

    #[test]
    fn the_window_forgets_slow_failures() {
        let g = AdminGuard::new(3);
        let ip: IpAddr = "198.51.100.1".parse().unwrap();
        for minute in 0..10 {
            let t = minute * WINDOW_MS;
            g.failed(ip, t);
            g.failed(ip, t + 1);
            g.check(ip, t + 2).unwrap();
        }
    }

    #[test]
    fn ipv6_counts_per_64() {
        let a: IpAddr = "2001:db8:1:2::1".parse().unwrap();
        let b: IpAddr = "2001:db8:1:2:ffff::9".parse().unwrap();
        let c: IpAddr = "2001:db8:1:3::1".parse().unwrap();
        assert_eq!(net_of(a), net_of(b));
        assert_ne!(net_of(a), net_of(c));
        let mapped: IpAddr = "::ffff:192.0.2.1".parse().unwrap();
        let v4: IpAddr = "192.0.2.1".parse().unwrap();
        assert_eq!(net_of(mapped), net_of(v4));
        assert_ne!(
            net_of("::1".parse().unwrap()),
            net_of("0.0.0.1".parse().unwrap())
        );
        let g = AdminGuard::new(2);
        g.failed(a, 0);
        g.failed(b, 1);
        assert!(g.check(c, 2).is_ok());
        assert_eq!(g.check(a, 2).unwrap_err().status, 429);
    }
}
