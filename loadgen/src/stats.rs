//! Statistics that must be right: loss and duplicate detection per kind, histogram merging
//! across worker processes, and rate pacing. Pure, unit-tested.

use std::time::{Duration, Instant};

use base64::Engine as _;
use hdrhistogram::Histogram;
use hdrhistogram::serialization::{Deserializer, Serializer, V2Serializer};

/// Per connection and kind: the publisher numbers each kind's messages 0, 1, 2, ... per room
/// (`k` in the body), so a receiver detects loss and duplicates without knowing what else was
/// published.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct KindTrack {
    pub next: u64,
    pub received: u64,
    pub lost: u64,
    pub dup: u64,
    /// The member joined afresh (no `since`: its socket was lost before its first `joined`),
    /// so what was published before that join is not owed to it: the next message received
    /// sets where its numbering starts ([`Self::start_afresh`]).
    pub from_next: bool,
    /// Numbers skipped that way: published before the member's fresh join, never owed.
    pub not_owed: u64,
}

impl KindTrack {
    /// The member joins afresh: what was published before is not owed. Where its stream
    /// starts is the first message it receives from now (a member that receives nothing more
    /// is still owed everything at the end: nothing is forgiven without a message to show
    /// where the stream began).
    pub fn start_afresh(&mut self) {
        self.from_next = true;
    }

    pub fn on_message(&mut self, k: u64) {
        if std::mem::take(&mut self.from_next) && k > self.next {
            self.not_owed += k - self.next;
            self.next = k;
        }
        self.received += 1;
        match k.cmp(&self.next) {
            std::cmp::Ordering::Equal => self.next += 1,
            std::cmp::Ordering::Greater => {
                self.lost += k - self.next;
                self.next = k + 1;
            }
            std::cmp::Ordering::Less => {
                // Seen before (or out of order, which the edge must never do): a duplicate.
                self.dup += 1;
                self.received -= 1;
            }
        }
    }

    /// At the end: everything up to `published` that never arrived is lost.
    pub fn finish(&mut self, published: u64) {
        if published > self.next {
            self.lost += published - self.next;
            self.next = published;
        }
    }

    /// After [`finish`](Self::finish): `holes` numbers below `published` were never accepted
    /// by the server (a batch numbers its messages before the answer), so no member could get
    /// them; they were counted lost, and are not.
    /// A stream that started afresh past some numbers forgives none: where the holes were is
    /// not known, and one before its start would hide a loss after it (its loss may then
    /// count a hole, which shows; a hidden loss would not).
    pub fn forgive(&mut self, holes: u64) {
        if self.not_owed == 0 {
            self.lost = self.lost.saturating_sub(holes);
        }
    }
}

/// A latency histogram in microseconds, 1 µs to 10 min, 3 significant digits.
pub fn histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 600_000_000, 3).expect("valid bounds")
}

pub fn encode_hist(h: &Histogram<u64>) -> String {
    let mut buf = Vec::new();
    V2Serializer::new().serialize(h, &mut buf).expect("in-memory serialization");
    base64::engine::general_purpose::STANDARD.encode(buf)
}

pub fn decode_hist(s: &str) -> anyhow::Result<Histogram<u64>> {
    let raw = base64::engine::general_purpose::STANDARD.decode(s)?;
    let h: Histogram<u64> = Deserializer::new().deserialize(&mut raw.as_slice())?;
    Ok(h)
}

/// Merges `b` into `a`.
pub fn merge(a: &mut Histogram<u64>, b: &Histogram<u64>) {
    a.add(b).expect("same bounds");
}

/// Paces events at `rate` per second from `start`: how long to wait before event `n`.
pub struct Pacer {
    start: Instant,
    interval_ns: u64,
}

impl Pacer {
    pub fn new(start: Instant, rate: f64) -> Self {
        Self { start, interval_ns: if rate > 0.0 { (1e9 / rate) as u64 } else { u64::MAX } }
    }

    pub fn due(&self, n: u64) -> Instant {
        self.start + Duration::from_nanos(n.saturating_mul(self.interval_ns))
    }

    /// Events due by `now`.
    #[cfg(test)]
    pub fn due_count(&self, now: Instant) -> u64 {
        if self.interval_ns == u64::MAX {
            return 0;
        }
        (now.saturating_duration_since(self.start).as_nanos() as u64) / self.interval_ns + 1
    }
}

/// Reads `"t":N` and `"k":N` from a body the publisher wrote (`{"t":..,"k":..,"kind":".."}`).
pub fn body_fields(body: &[u8]) -> Option<(u64, u64)> {
    Some((body_num(body, b"\"t\":")?, body_num(body, b"\"k\":")?))
}

/// The number after `key` (`"name":`) in a body the publisher wrote, if there is one.
fn body_num(body: &[u8], key: &[u8]) -> Option<u64> {
    let i = body.windows(key.len()).position(|w| w == key)? + key.len();
    let digits = body[i..].iter().take_while(|b| b.is_ascii_digit()).count();
    std::str::from_utf8(&body[i..i + digits]).ok()?.parse().ok()
}

/// Reads the run id `"r":N` from a body ([`crate::publish::run_id`]; None when absent: a body
/// from another publisher, counted as the run's own).
pub fn body_run(body: &[u8]) -> Option<u64> {
    body_num(body, b"\"r\":")
}

/// Reads the publishing stream `"s":N` from a body (0 when absent: one stream).
pub fn body_stream(body: &[u8]) -> usize {
    body_num(body, b"\"s\":").map_or(0, |s| s as usize)
}

/// Reads `"kind":"..."` from a body (Nchan frames carry no envelope).
pub fn body_kind(body: &[u8]) -> Option<&str> {
    let key = b"\"kind\":\"";
    let i = body.windows(key.len()).position(|w| w == key)? + key.len();
    let n = body[i..].iter().position(|&b| b == b'"')?;
    std::str::from_utf8(&body[i..i + n]).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A batched stream numbered 0..6 and the server refused 1 and 5 (sampled): a member that
    /// got every accepted message lost nothing; one that also missed 3 lost one.
    #[test]
    fn holes_the_server_refused_are_not_lost() {
        let mut all = KindTrack::default();
        for k in [0, 2, 3, 4] {
            all.on_message(k);
        }
        all.finish(6);
        all.forgive(2);
        assert_eq!((all.received, all.lost), (4, 0));
        let mut missed = KindTrack::default();
        for k in [0, 2, 4] {
            missed.on_message(k);
        }
        missed.finish(6);
        missed.forgive(2);
        assert_eq!((missed.received, missed.lost), (3, 1));
    }

    /// A member that joined afresh (its first socket lost before its `joined`) is owed what was
    /// published from its first message on, not from 0; one that receives nothing more is
    /// still owed all; and a loss after the fresh start is not hidden by holes.
    #[test]
    fn a_fresh_start_owes_from_the_first_message_received() {
        let mut t = KindTrack::default();
        t.start_afresh();
        for k in [4, 5, 7] {
            t.on_message(k);
        }
        t.finish(9);
        assert_eq!((t.received, t.not_owed, t.lost), (3, 4, 2), "6 and 8 lost; 0..4 never owed");
        t.forgive(1);
        assert_eq!(t.lost, 2, "a hole may have been before the start: nothing forgiven");

        let mut silent = KindTrack::default();
        silent.start_afresh();
        silent.finish(9);
        assert_eq!((silent.not_owed, silent.lost), (0, 9), "nothing received: everything owed");

        let mut late = KindTrack::default();
        late.on_message(0);
        late.start_afresh();
        late.on_message(3);
        assert_eq!((late.not_owed, late.lost, late.next), (2, 0, 4));
    }

    #[test]
    fn gaps_duplicates_and_tail_loss() {
        let mut t = KindTrack::default();
        for k in [0, 1, 2, 5, 6, 6, 3, 7] {
            t.on_message(k);
        }
        assert_eq!((t.received, t.lost, t.dup, t.next), (6, 2, 2, 8));
        t.finish(10);
        assert_eq!(t.lost, 4);
        let mut clean = KindTrack::default();
        (0..100).for_each(|k| clean.on_message(k));
        clean.finish(100);
        assert_eq!((clean.received, clean.lost, clean.dup), (100, 0, 0));
    }

    #[test]
    fn histograms_merge_across_processes() {
        let mut a = histogram();
        let mut b = histogram();
        for v in 1..=1000 {
            a.record(v).unwrap();
            b.record(v * 1000).unwrap();
        }
        let b2 = decode_hist(&encode_hist(&b)).unwrap();
        assert_eq!(b2.len(), 1000);
        merge(&mut a, &b2);
        assert_eq!(a.len(), 2000);
        assert!(a.value_at_quantile(0.25) <= 510);
        assert!(a.value_at_quantile(0.99) >= 980_000);
        assert!(a.max() >= 999_000);
    }

    #[test]
    fn pacing() {
        let t0 = Instant::now();
        let p = Pacer::new(t0, 100.0);
        assert_eq!(p.due(0), t0);
        assert_eq!(p.due(100), t0 + Duration::from_secs(1));
        assert_eq!(p.due_count(t0 + Duration::from_millis(995)), 100);
        assert_eq!(Pacer::new(t0, 0.0).due_count(t0 + Duration::from_secs(5)), 0);
    }

    #[test]
    fn body_parsing() {
        assert_eq!(body_fields(br#"{"t":1764000000123456,"k":42,"kind":"gift"}"#), Some((1_764_000_000_123_456, 42)));
        assert_eq!(body_kind(br#"{"t":1,"k":2,"kind":"chat"}"#), Some("chat"));
        assert_eq!(
            body_run(br#"{"t":1,"k":2,"s":0,"r":1764000000123456,"kind":"chat","p":"xx"}"#),
            Some(1_764_000_000_123_456)
        );
        assert_eq!(body_run(br#"{"t":1,"k":2,"kind":"chat"}"#), None);
        assert_eq!(body_fields(b"{}"), None);
        assert_eq!(body_stream(br#"{"t":1,"k":2,"s":13,"kind":"gift","p":"xx"}"#), 13);
        assert_eq!(body_stream(br#"{"t":1,"k":2,"kind":"gift"}"#), 0);
    }
}
