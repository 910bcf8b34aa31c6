//! Per-address connection bounds: how many connections one client address may hold open, and
//! how fast it may open new ones (a token bucket). Reconnect storms and a single abusive host
//! are bounded here, at accept, before the edge reads a byte.
//!
//! The table is shared by every shard (the kernel spreads one address's connections over all
//! of them) and striped by address, so shards rarely meet on a lock; it is touched once per
//! accept and once per close, never on the message path. IPv6 addresses count by their /64
//! (one host's usual allocation: keyed by the full address, one host could take 2^64 slots).
//! Exempt networks (by default loopback, where a local TLS terminator would make every client
//! look like one address) are not counted.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Mutex;
use std::time::Instant;

use ipnet::IpNet;

use crate::config::LimitsConfig;

const STRIPES: usize = 64;

/// An address as the table keys it: IPv4 as its IPv4-mapped IPv6 form, IPv6 cut to its /64.
pub type IpKey = u128;

/// What the guard says about a new connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Let it in; `counted`: the guard counts it (release it on close with its key).
    Admit {
        /// The guard counts it: release it on close with its key.
        counted: bool,
    },
    /// The address holds `limits.per_ip_connections` connections already.
    TooMany,
    /// The address opens connections faster than `limits.per_ip_connect_rate`.
    TooFast,
}

impl Verdict {
    /// The refusal's reason label in `roomcast_connections_refused_total`.
    pub fn reason(self) -> Option<&'static str> {
        match self {
            Self::Admit { .. } => None,
            Self::TooMany => Some("ip_connections"),
            Self::TooFast => Some("ip_connect_rate"),
        }
    }
}

struct Entry {
    open: u32,
    tokens: f64,
    at_ms: u64,
}

/// Per-address open-connection counts and connect-rate token buckets, shared by the shards and
/// striped across mutexes so that they rarely contend.
pub struct IpGuard {
    max_open: u32,
    rate: f64,
    burst: f64,
    exempt: Vec<IpNet>,
    stripes: Box<[Mutex<HashMap<IpKey, Entry>>]>,
    epoch: Instant,
}

impl IpGuard {
    /// The guard the limits describe, or None when both bounds are off.
    pub fn new(limits: &LimitsConfig) -> Option<Self> {
        if limits.per_ip_connections == 0 && limits.per_ip_connect_rate <= 0.0 {
            return None;
        }
        Some(Self {
            max_open: limits.per_ip_connections,
            rate: limits.per_ip_connect_rate,
            burst: limits.per_ip_connect_burst.max(1.0),
            exempt: limits.ip_exempt.clone(),
            stripes: (0..STRIPES).map(|_| Mutex::new(HashMap::new())).collect(),
            epoch: Instant::now(),
        })
    }

    /// The table key of `ip`.
    pub fn key(ip: IpAddr) -> IpKey {
        match ip {
            IpAddr::V4(v4) => u128::from(v4.to_ipv6_mapped()),
            IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
                Some(v4) => u128::from(v4.to_ipv6_mapped()),
                None => u128::from(v6) & !((1u128 << 64) - 1),
            },
        }
    }

    fn stripe(&self, key: IpKey) -> &Mutex<HashMap<IpKey, Entry>> {
        // The low bits of a /64 key are zero: mix the whole key.
        let h = (key as u64 ^ (key >> 64) as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15);
        &self.stripes[(h >> 58) as usize % STRIPES]
    }

    fn now_ms(&self) -> u64 {
        self.epoch.elapsed().as_millis() as u64
    }

    /// A new connection from `ip`: admitted (and counted) or refused, with why.
    pub fn admit(&self, ip: IpAddr) -> Verdict {
        let ip = match ip {
            IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(IpAddr::V6(v6), IpAddr::V4),
            v4 @ IpAddr::V4(_) => v4,
        };
        if self.exempt.iter().any(|n| n.contains(&ip)) {
            return Verdict::Admit { counted: false };
        }
        let key = Self::key(ip);
        let now = self.now_ms();
        let mut map = self.stripe(key).lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        let e = map.entry(key).or_insert(Entry { open: 0, tokens: self.burst, at_ms: now });
        if self.max_open > 0 && e.open >= self.max_open {
            return Verdict::TooMany;
        }
        if self.rate > 0.0 {
            e.tokens = (e.tokens + (now - e.at_ms) as f64 * self.rate / 1000.0).min(self.burst);
            e.at_ms = now;
            if e.tokens < 1.0 {
                return Verdict::TooFast;
            }
            e.tokens -= 1.0;
        }
        e.open += 1;
        Verdict::Admit { counted: true }
    }

    /// A counted connection from `ip` closed.
    pub fn release(&self, ip: IpAddr) {
        let key = Self::key(ip);
        let mut map = self.stripe(key).lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some(e) = map.get_mut(&key) {
            e.open = e.open.saturating_sub(1);
        }
    }

    /// Forgets the addresses of stripe `i` (mod the stripe count) that hold no connection and
    /// whose bucket has refilled: they are as good as new. Shards call it in turn from their
    /// timers, so the table holds only the recently active.
    pub fn sweep(&self, i: usize) {
        let now = self.now_ms();
        let (rate, burst) = (self.rate, self.burst);
        let mut map = self.stripes[i % STRIPES].lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        map.retain(|_, e| e.open > 0 || (rate > 0.0 && e.tokens + (now - e.at_ms) as f64 * rate / 1000.0 < burst));
    }

    /// How many stripes the table has: callers sweep `0..stripes()` one stripe at a time.
    pub fn stripes() -> usize {
        STRIPES
    }

    /// Addresses in the table (for tests and the sweep's accounting).
    pub fn tracked(&self) -> usize {
        self.stripes.iter().map(|s| s.lock().map_or(0, |m| m.len())).sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits(max: u32, rate: f64, burst: f64, exempt: &[&str]) -> LimitsConfig {
        LimitsConfig {
            per_ip_connections: max,
            per_ip_connect_rate: rate,
            per_ip_connect_burst: burst,
            ip_exempt: exempt.iter().map(|s| s.parse().unwrap()).collect(),
            ..LimitsConfig::default()
        }
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn caps_open_connections_per_address_and_frees_on_release() {
        let g = IpGuard::new(&limits(2, 0.0, 1.0, &[])).unwrap();
        assert_eq!(g.admit(ip("10.0.0.1")), Verdict::Admit { counted: true });
        assert_eq!(g.admit(ip("10.0.0.1")), Verdict::Admit { counted: true });
        assert_eq!(g.admit(ip("10.0.0.1")), Verdict::TooMany);
        // Another address has its own count.
        assert_eq!(g.admit(ip("10.0.0.2")), Verdict::Admit { counted: true });
        g.release(ip("10.0.0.1"));
        assert_eq!(g.admit(ip("10.0.0.1")), Verdict::Admit { counted: true });
    }

    #[test]
    fn connect_rate_is_a_bucket() {
        let g = IpGuard::new(&limits(0, 0.001, 3.0, &[])).unwrap();
        for _ in 0..3 {
            assert_eq!(g.admit(ip("10.0.0.1")), Verdict::Admit { counted: true });
        }
        assert_eq!(g.admit(ip("10.0.0.1")), Verdict::TooFast);
        assert_eq!(g.admit(ip("10.0.0.9")), Verdict::Admit { counted: true });
    }

    #[test]
    fn ipv6_counts_by_its_64_and_mapped_v4_as_v4() {
        let g = IpGuard::new(&limits(1, 0.0, 1.0, &[])).unwrap();
        assert_eq!(g.admit(ip("2001:db8:1:2::1")), Verdict::Admit { counted: true });
        assert_eq!(g.admit(ip("2001:db8:1:2:ffff::9")), Verdict::TooMany, "same /64");
        assert_eq!(g.admit(ip("2001:db8:1:3::1")), Verdict::Admit { counted: true });
        assert_eq!(g.admit(ip("192.0.2.7")), Verdict::Admit { counted: true });
        assert_eq!(g.admit(ip("::ffff:192.0.2.7")), Verdict::TooMany, "mapped v4 is the v4 address");
    }

    #[test]
    fn exempt_networks_are_not_counted() {
        let g = IpGuard::new(&limits(1, 0.0, 1.0, &["127.0.0.0/8", "::1/128"])).unwrap();
        for _ in 0..5 {
            assert_eq!(g.admit(ip("127.0.0.3")), Verdict::Admit { counted: false });
            assert_eq!(g.admit(ip("::ffff:127.0.0.3")), Verdict::Admit { counted: false });
            assert_eq!(g.admit(ip("::1")), Verdict::Admit { counted: false });
        }
        assert_eq!(g.tracked(), 0);
    }

    #[test]
    fn sweep_forgets_idle_refilled_addresses_only() {
        let g = IpGuard::new(&limits(10, 1e9, 5.0, &[])).unwrap();
        g.admit(ip("10.0.0.1"));
        g.admit(ip("10.0.0.2"));
        g.release(ip("10.0.0.2"));
        std::thread::sleep(std::time::Duration::from_millis(2));
        for i in 0..IpGuard::stripes() {
            g.sweep(i);
        }
        assert_eq!(g.tracked(), 1, "the address with an open connection stays");
    }

    #[test]
    fn both_bounds_off_means_no_guard() {
        assert!(IpGuard::new(&limits(0, 0.0, 1.0, &[])).is_none());
    }
}
