//! Delivery policy state kept per room by the bus: token buckets for upstream limits, and the
//! bounded history that `since` recovery reads. Pure data structures: callers pass `now`.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use roomcast_proto::envelope::PushMessage;

/// A token bucket: `rate` tokens per second, at most `burst` saved up.
#[derive(Debug, Clone)]
pub struct Bucket {
    tokens: f64,
    last: Instant,
}

impl Bucket {
    /// A bucket holding `burst` tokens as of `now`: the first burst passes at once.
    pub fn full(burst: f64, now: Instant) -> Self {
        Self { tokens: burst, last: now }
    }

    /// Takes one token, or says how long until one is available.
    pub fn take(&mut self, rate: f64, burst: f64, now: Instant) -> Result<(), Duration> {
        let dt = now.saturating_duration_since(self.last).as_secs_f64();
        self.last = now;
        self.tokens = (self.tokens + dt * rate).min(burst);
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            Ok(())
        } else if rate <= 0.0 {
            Err(Duration::from_secs(3600))
        } else {
            Err(Duration::from_secs_f64((1.0 - self.tokens) / rate))
        }
    }

    /// Whether the bucket would be full now (an idle user: safe to forget).
    pub fn is_full(&self, rate: f64, burst: f64, now: Instant) -> bool {
        self.tokens + now.saturating_duration_since(self.last).as_secs_f64() * rate >= burst
    }
}

/// Limits on a room's history.
#[derive(Debug, Clone, Copy)]
pub struct HistoryLimits {
    /// Must-deliver messages a room keeps, at most.
    pub must_deliver: usize,
    /// Droppable messages a room keeps, at most.
    pub droppable: usize,
    /// Age after which a message leaves history, whatever its kind.
    pub max_age: Duration,
    /// Bytes a room's must-deliver (droppable) history may hold; the oldest go first (an
    /// evicted must-deliver seq is reported as a gap to a `since` below it).
    pub must_deliver_bytes: usize,
    /// Bytes a room's droppable history may hold; the oldest go first.
    pub droppable_bytes: usize,
}

impl HistoryLimits {
    /// Counts only, no byte bounds (tests).
    pub fn counts(must_deliver: usize, droppable: usize, max_age: Duration) -> Self {
        Self { must_deliver, droppable, max_age, must_deliver_bytes: usize::MAX, droppable_bytes: usize::MAX }
    }
}

/// What a message costs in history, roughly: its text plus the queue entry.
fn cost(m: &PushMessage) -> usize {
    m.body.len() + m.kind.len() + m.user.len() + 64
}

/// A room's recent messages, must-deliver apart from droppable so that a chat flood never evicts
/// a gift a reconnecting client may still need.
#[derive(Debug, Default)]
pub struct History {
    must: VecDeque<(Instant, PushMessage)>,
    droppable: VecDeque<(Instant, PushMessage)>,
    /// Highest seq of a must-deliver message that was evicted (0: none).
    pub must_evicted_upto: u64,
    /// Bytes held (see `cost`).
    pub must_bytes: usize,
    /// Bytes the droppable history holds (see `cost`).
    pub droppable_bytes: usize,
}

/// What a `since` recovery yields.
#[derive(Debug, PartialEq, Eq)]
pub struct Recovery {
    /// Must-deliver messages with `since < seq <= upto`, in order.
    pub messages: Vec<PushMessage>,
    /// Seqs `from..=to` may have held must-deliver messages that are gone.
    pub gap: Option<(u64, u64)>,
}

impl History {
    /// Keeps `msg` (a droppable one only if `keep_droppable`: the engine's budget for droppable
    /// history may be spent), then applies the limits.
    pub fn push(
        &mut self,
        msg: PushMessage,
        must_deliver: bool,
        keep_droppable: bool,
        now: Instant,
        lim: &HistoryLimits,
    ) {
        if must_deliver {
            if lim.must_deliver == 0 {
                self.must_evicted_upto = msg.seq;
                return;
            }
            self.must_bytes += cost(&msg);
            self.must.push_back((now, msg));
        } else if lim.droppable > 0 && keep_droppable {
            self.droppable_bytes += cost(&msg);
            self.droppable.push_back((now, msg));
        }
        self.trim(now, lim);
    }

    /// Drops what is over the count or older than the age limit.
    pub fn trim(&mut self, now: Instant, lim: &HistoryLimits) {
        let old = |t: &Instant| now.saturating_duration_since(*t) > lim.max_age;
        while self.must.len() > lim.must_deliver
            || self.must_bytes > lim.must_deliver_bytes
            || self.must.front().is_some_and(|(t, _)| old(t))
        {
            let Some((_, m)) = self.must.pop_front() else { break };
            self.must_bytes -= cost(&m);
            self.must_evicted_upto = self.must_evicted_upto.max(m.seq);
        }
        while self.droppable.len() > lim.droppable
            || self.droppable_bytes > lim.droppable_bytes
            || self.droppable.front().is_some_and(|(t, _)| old(t))
        {
            let Some((_, m)) = self.droppable.pop_front() else { break };
            self.droppable_bytes -= cost(&m);
        }
    }

    /// Messages held: (must-deliver, droppable).
    pub fn len(&self) -> (usize, usize) {
        (self.must.len(), self.droppable.len())
    }

    /// Must-deliver messages read back from the store (seq order), each aged by its timestamp
    /// against `wall_us` (the wall clock at `now`); then the limits apply.
    pub fn restore(
        &mut self,
        msgs: Vec<PushMessage>,
        evicted_upto: u64,
        now: Instant,
        wall_us: u64,
        lim: &HistoryLimits,
    ) {
        self.must_evicted_upto = self.must_evicted_upto.max(evicted_upto);
        for m in msgs {
            let age = Duration::from_micros(wall_us.saturating_sub(m.ts_us));
            match now.checked_sub(age) {
                Some(at) if age <= lim.max_age => {
                    self.must_bytes += cost(&m);
                    self.must.push_back((at, m));
                }
                _ => self.must_evicted_upto = self.must_evicted_upto.max(m.seq),
            }
        }
        self.trim(now, lim);
    }

    /// The message with `seq`, if history holds it.
    pub fn get(&self, seq: u64) -> Option<&PushMessage> {
        for q in [&self.must, &self.droppable] {
            if let Ok(i) = q.binary_search_by_key(&seq, |(_, m)| m.seq) {
                return Some(&q[i].1);
            }
        }
        None
    }

    /// Replaces the message with `seq` by `with` (the same seq: a moderator's tombstone in its
    /// place). Returns whether it was a must-deliver one, None if history does not hold it.
    pub fn replace(&mut self, seq: u64, with: PushMessage) -> Option<bool> {
        for (must, q, bytes) in
            [(true, &mut self.must, &mut self.must_bytes), (false, &mut self.droppable, &mut self.droppable_bytes)]
        {
            if let Ok(i) = q.binary_search_by_key(&seq, |(_, m)| m.seq) {
                *bytes = *bytes - cost(&q[i].1) + cost(&with);
                q[i].1 = with;
                return Some(must);
            }
        }
        None
    }

    /// Takes out every message whose seq `gone` picks (messages that never reached a member:
    /// a refused publish's, or numbered past what the store could reserve); returns them.
    pub fn remove(&mut self, gone: impl Fn(u64) -> bool) -> Vec<PushMessage> {
        let mut out = Vec::new();
        for (q, bytes) in [(&mut self.must, &mut self.must_bytes), (&mut self.droppable, &mut self.droppable_bytes)] {
            q.retain(|(_, m)| {
                if gone(m.seq) {
                    *bytes -= cost(m);
                    out.push(m.clone());
                    return false;
                }
                true
            });
        }
        out
    }

    /// Every must-deliver message after `since` up to `upto`, and the gap if some are gone.
    pub fn recover(&self, since: u64, upto: u64) -> Recovery {
        let messages = self.must.iter().map(|(_, m)| m).filter(|m| m.seq > since && m.seq <= upto).cloned().collect();
        let gap = (since < self.must_evicted_upto).then(|| (since + 1, self.must_evicted_upto.min(upto)));
        Recovery { messages, gap: gap.filter(|(a, b)| a <= b) }
    }

    /// The last `k` messages of any kind up to `upto`, in order.
    pub fn last(&self, k: usize, upto: u64) -> Vec<PushMessage> {
        if k == 0 {
            return Vec::new();
        }
        let mut a = self.must.iter().rev().map(|(_, m)| m).filter(|m| m.seq <= upto).peekable();
        let mut b = self.droppable.iter().rev().map(|(_, m)| m).filter(|m| m.seq <= upto).peekable();
        let mut out = Vec::with_capacity(k);
        while out.len() < k {
            let next = match (a.peek(), b.peek()) {
                (Some(x), Some(y)) => {
                    if x.seq > y.seq {
                        a.next()
                    } else {
                        b.next()
                    }
                }
                (Some(_), None) => a.next(),
                (None, Some(_)) => b.next(),
                (None, None) => None,
            };
            match next {
                Some(m) => out.push(m.clone()),
                None => break,
            }
        }
        out.reverse();
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn m(seq: u64, kind: &str) -> PushMessage {
        PushMessage { seq, ts_us: seq, kind: kind.into(), user: String::new(), body: "1".into() }
    }

    #[test]
    fn bucket_refills_at_rate_and_caps_at_burst() {
        let t0 = Instant::now();
        let mut b = Bucket::full(2.0, t0);
        assert!(b.take(1.0, 2.0, t0).is_ok());
        assert!(b.take(1.0, 2.0, t0).is_ok());
        let wait = b.take(1.0, 2.0, t0).unwrap_err();
        assert!(wait > Duration::from_millis(900) && wait <= Duration::from_secs(1));
        assert!(b.take(1.0, 2.0, t0 + Duration::from_millis(1001)).is_ok());
        // Ten idle seconds still only save `burst` tokens.
        let t1 = t0 + Duration::from_secs(11);
        assert!(b.is_full(1.0, 2.0, t1));
        assert!(b.take(1.0, 2.0, t1).is_ok() && b.take(1.0, 2.0, t1).is_ok());
        assert!(b.take(1.0, 2.0, t1).is_err());
    }

    #[test]
    fn chat_flood_never_evicts_gifts() {
        let now = Instant::now();
        let lim = HistoryLimits::counts(100, 10, Duration::from_secs(60));
        let mut h = History::default();
        h.push(m(1, "gift"), true, true, now, &lim);
        for s in 2..10_000 {
            h.push(m(s, "chat"), false, true, now, &lim);
        }
        h.push(m(10_000, "gift"), true, true, now, &lim);
        assert_eq!(h.len(), (2, 10));
        let r = h.recover(0, 10_000);
        assert_eq!(r.messages.iter().map(|m| m.seq).collect::<Vec<_>>(), vec![1, 10_000]);
        assert_eq!(r.gap, None);
        // Recovery stops at `upto` (what the joiner will get live comes after it).
        assert_eq!(h.recover(0, 9_999).messages.len(), 1);
    }

    #[test]
    fn evicted_gifts_are_reported_as_a_gap() {
        let now = Instant::now();
        let lim = HistoryLimits::counts(2, 0, Duration::from_secs(60));
        let mut h = History::default();
        for s in 1..=5 {
            h.push(m(s, "gift"), true, true, now, &lim);
        }
        let r = h.recover(1, 5);
        assert_eq!(r.messages.iter().map(|m| m.seq).collect::<Vec<_>>(), vec![4, 5]);
        assert_eq!(r.gap, Some((2, 3)));
        // A client that saw everything up to 3 has no gap.
        assert_eq!(h.recover(3, 5).gap, None);
        // Age limit.
        h.trim(now + Duration::from_secs(61), &lim);
        assert_eq!(h.len(), (0, 0));
        assert_eq!(h.recover(3, 5).gap, Some((4, 5)));
    }

    /// A replaced message keeps its place: recovery returns the replacement at the same seq,
    /// with no gap, and the byte count follows.
    #[test]
    fn replaced_messages_keep_their_place() {
        let now = Instant::now();
        let lim = HistoryLimits::counts(10, 10, Duration::from_secs(60));
        let mut h = History::default();
        for s in 1..=4 {
            h.push(m(s, if s % 2 == 0 { "gift" } else { "chat" }), s % 2 == 0, true, now, &lim);
        }
        let with =
            |seq| PushMessage { seq, ts_us: seq, kind: "deleted".into(), user: String::new(), body: "{}".into() };
        assert_eq!(h.replace(2, with(2)), Some(true));
        assert_eq!(h.replace(3, with(3)), Some(false));
        assert_eq!(h.replace(9, with(9)), None);
        let r = h.recover(0, 4);
        assert_eq!(
            r.messages.iter().map(|m| (m.seq, m.kind.as_str())).collect::<Vec<_>>(),
            vec![(2, "deleted"), (4, "gift")]
        );
        assert_eq!(r.gap, None);
        assert_eq!(h.get(3).map(|m| m.kind.as_str()), Some("deleted"));
        assert_eq!(h.must_bytes, 2 * 64 + "deleted".len() + 2 + "gift".len() + 1);
    }

    #[test]
    fn last_k_merges_both_kinds_in_order() {
        let now = Instant::now();
        let lim = HistoryLimits::counts(10, 10, Duration::from_secs(60));
        let mut h = History::default();
        for s in 1..=6 {
            h.push(m(s, if s % 3 == 0 { "gift" } else { "chat" }), s % 3 == 0, true, now, &lim);
        }
        assert_eq!(h.last(4, 6).iter().map(|m| m.seq).collect::<Vec<_>>(), vec![3, 4, 5, 6]);
        assert_eq!(h.last(4, 4).iter().map(|m| m.seq).collect::<Vec<_>>(), vec![1, 2, 3, 4]);
        assert!(h.last(0, 6).is_empty());
    }

    /// A room's history is bounded in bytes too: a few huge messages cannot hold megabytes
    /// (a client could fill chat history with 64 KiB bodies, 200 deep, in every room it made).
    #[test]
    fn byte_bounds_evict_the_oldest_and_report_gaps() {
        let now = Instant::now();
        let lim = HistoryLimits {
            must_deliver_bytes: 3 * (1000 + 4 + 64),
            droppable_bytes: 2000,
            ..HistoryLimits::counts(100, 100, Duration::from_secs(60))
        };
        let mut h = History::default();
        let big = |s: u64, kind: &str| PushMessage { body: "x".repeat(1000), ..m(s, kind) };
        for s in 1..=10 {
            h.push(big(s, "chat"), false, true, now, &lim);
        }
        assert_eq!(h.len().1, 1, "2,000 bytes hold one 1 KB chat");
        assert!(h.droppable_bytes <= 2000);
        for s in 11..=15 {
            h.push(big(s, "gift"), true, true, now, &lim);
        }
        assert_eq!(h.len().0, 3);
        assert_eq!(h.recover(10, 15).gap, Some((11, 12)), "evicted gifts are a gap, never silent");
        // Not kept when the engine's budget is spent.
        h.push(big(16, "chat"), false, false, now, &lim);
        assert_eq!(h.last(1, 16)[0].seq, 15);
    }
}
