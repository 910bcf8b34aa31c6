//! Idempotent publishes: a publisher that did not hear the answer (a timeout, a reset, an edge
//! that restarted) sends the same request again with the same `Idempotency-Key`, and gets the
//! first answer back instead of a second gift.
//!
//! Single node: each room remembers the keys of its recent publishes (the newest
//! `ingest.idempotency_keys`, none older than `ingest.idempotency_ttl_s`) with their seq and
//! timestamp. A must-deliver message's key is written to the store with the message, so a room
//! read back after a restart (or after it left memory) knows them again. Redis mode: the key is
//! checked and set inside the publish script (`rc:{room}:idem:KEY`, expiring after the TTL), so
//! a retry that reaches another edge is answered the same way.

use std::collections::{HashMap, VecDeque};
use std::time::{Duration, Instant};

use crate::bus::Ack;

/// Longest key (bytes); keys are visible ASCII (`!` to `~`).
pub const MAX_KEY_LEN: usize = 64;

/// Checks an `Idempotency-Key` value.
pub fn check_key(key: &str) -> Result<(), &'static str> {
    if key.is_empty() || key.len() > MAX_KEY_LEN {
        return Err("must be 1 to 64 characters");
    }
    if !key.bytes().all(|b| (0x21..=0x7e).contains(&b)) {
        return Err("must be visible ASCII characters (no spaces)");
    }
    Ok(())
}

/// A room's recent keys, oldest first.
#[derive(Default)]
pub struct Keys {
    map: HashMap<Box<str>, Ack>,
    order: VecDeque<(Instant, Box<str>)>,
}

impl Keys {
    /// The answer given to the first publish with `key`, if it is still remembered.
    pub fn get(&mut self, key: &str, now: Instant, ttl: Duration) -> Option<Ack> {
        self.expire(now, ttl);
        self.map.get(key).copied()
    }

    /// Remembers `key` (published at `at`), keeping at most `max` keys.
    pub fn insert(&mut self, key: Box<str>, ack: Ack, at: Instant, max: usize) {
        if max == 0 || self.map.contains_key(&key) {
            return;
        }
        while self.order.len() >= max {
            let Some((_, old)) = self.order.pop_front() else { break };
            self.map.remove(&old);
        }
        self.map.insert(key.clone(), ack);
        self.order.push_back((at, key));
    }

    /// The key a publish numbered `seq` carried, if it is remembered (a linear walk: for
    /// moderation's deletes, which keep it with the tombstone in the store).
    pub fn key_of(&self, seq: u64) -> Option<Box<str>> {
        self.map.iter().find(|(_, a)| a.seq == seq).map(|(k, _)| k.clone())
    }

    /// Forgets the keys of publishes whose seq `gone` picks (they were refused after all: a
    /// retry with the key is a new publish).
    pub fn forget(&mut self, gone: impl Fn(u64) -> bool) {
        self.map.retain(|_, ack| !gone(ack.seq));
        let map = &self.map;
        self.order.retain(|(_, k)| map.contains_key(k));
    }

    fn expire(&mut self, now: Instant, ttl: Duration) {
        while let Some((at, _)) = self.order.front() {
            if now.saturating_duration_since(*at) < ttl {
                break;
            }
            let Some((_, old)) = self.order.pop_front() else { break };
            self.map.remove(&old);
        }
    }

    /// Keys remembered now (expired ones are dropped on the next `get`).
    pub fn len(&self) -> usize {
        self.map.len()
    }

    /// Whether no key is held.
    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }

    /// Whether a key is still within its window at `now` (the expired ones are let go). A room
    /// holding one stays in memory: leaving it would forget the key, and a retry would publish
    /// a second time.
    pub fn live(&mut self, now: Instant, ttl: Duration) -> bool {
        self.expire(now, ttl);
        !self.map.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_are_checked() {
        assert!(check_key("order-42:gift").is_ok());
        assert!(check_key("").is_err());
        assert!(check_key(&"k".repeat(65)).is_err());
        assert!(check_key("has space").is_err());
        assert!(check_key("caf\u{e9}").is_err());
    }

    #[test]
    fn keys_expire_and_are_bounded() {
        let t0 = Instant::now();
        let ttl = Duration::from_secs(10);
        let mut k = Keys::default();
        let ack = |seq| Ack { seq, ts_us: seq * 10, replayed: false };
        k.insert("a".into(), ack(1), t0, 2);
        k.insert("b".into(), ack(2), t0 + Duration::from_secs(5), 2);
        k.insert("a".into(), ack(9), t0 + Duration::from_secs(5), 2);
        assert_eq!(k.get("a", t0 + Duration::from_secs(6), ttl), Some(ack(1)), "the first answer stays");
        assert_eq!(k.get("a", t0 + Duration::from_secs(10), ttl), None, "expired");
        assert_eq!(k.get("b", t0 + Duration::from_secs(10), ttl), Some(ack(2)));
        k.insert("c".into(), ack(3), t0 + Duration::from_secs(11), 2);
        k.insert("d".into(), ack(4), t0 + Duration::from_secs(11), 2);
        assert_eq!(k.get("b", t0 + Duration::from_secs(11), ttl), None, "the oldest goes past the bound");
        assert_eq!(k.len(), 2);
    }
}
