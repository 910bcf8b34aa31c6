//! Drain pacing: the goaways go out on the drain period's schedule only while the fleet takes
//! the members they send away. A draining edge reads the other edges' load reports (the ones
//! dispatch routes by) each second and holds its goaways not sent yet while
//!
//! - no other edge takes members (every one draining, overloaded, full or silent), or the
//!   reports cannot be read (nor can dispatch, which routes by them): a member sent away then
//!   only meets dispatch's 503s, between sockets and without its gifts, while here it is
//!   still served; or
//! - the members on their way would take the room the other edges have left (a trial's drain
//!   sent 72 of 200 members into two edges with room for 11 more, and they waited 40 s for a
//!   route, where here they were served); or
//! - more members are on their way than the bound: sent away (gone from here within the last
//!   [`MOVE_FORGOTTEN_AFTER`]) and not yet counted on another edge. At 10^6 on this box the
//!   fleet took ~1,000 moves a second and a 900 s period sent 1,111 a second: members queued
//!   between sockets for minutes (bench-results/2026-12-01-restart-storm-README.md). The bound
//!   is `drain.max_moving` when set; by default it is what the other edges took in the last
//!   [`MOVE_FORGOTTEN_AFTER`], and at least what the schedule sends in 5 s (1,000 or more).
//!   By Little's law, members on their way are the uptake times a move's time, so that bound
//!   holds once moves take longer than [`MOVE_FORGOTTEN_AFTER`] (or once the uptake stops),
//!   whatever a move takes when the fleet is healthy. A fixed bound of 5 s of the schedule
//!   throttled a 10^6 drain here to ~270-620 moves a second: each move took ~20 s in the
//!   saturated load generator, and 5,554 on their way let through 5,554 / 20 s.
//!
//! A hold shifts the rest of the schedule by its length (the spread is kept, no burst at its
//! end) and never past the drain's deadline: holds take at most the slack between
//! `drain.period_ms` and `drain.deadline_ms` (less a second), after which the schedule runs
//! to its end whatever the fleet does. With no other edge at all in Redis there is nothing to
//! pace against (a fleet of one): the schedule runs as set.

use std::collections::HashMap;
use std::time::Duration;

use crate::dispatch::EdgeLoad;

/// Members on their way when `drain.max_moving` is 0: what the schedule sends in this long
/// (a healthy move shows as on its way for up to ~2.5 s: reports a second old, a goaway's
/// delay of up to a second, the handshake) ...
const AUTO_MOVING_FOR: Duration = Duration::from_secs(5);
/// ... and at least this many.
const AUTO_MOVING_MIN: u64 = 1000;
/// A member that left this long ago and arrived at no other edge is no longer counted as on its
/// way: it gave up, or closed its app on the goaway. Without this, such members counted
/// forever and held the drain until its slack ran out: a 10^6 rolling restart here had 8,754
/// members give up their moves while the kernel's TCP memory was exhausted, and the goaways
/// then waited 20 minutes for members that would never arrive
/// (bench-results/2026-12-01-restart-storm-README.md, the paced run).
pub const MOVE_FORGOTTEN_AFTER: Duration = Duration::from_secs(30);

/// Decides, from the fleet's load reports, whether a drain's goaways wait.
#[derive(Debug)]
pub struct Pacer {
    /// This edge's id in the reports.
    me: String,
    /// Connections here when the drain began.
    before: u64,
    /// The other edges' connections in the first reports read (an edge first seen later
    /// started at 0).
    start: Option<HashMap<String, u64>>,
    /// Most members on their way before the goaways wait (the least, with `adaptive`).
    max_moving: u64,
    /// `drain.max_moving` was 0: the bound is also the fleet's uptake of the last
    /// [`MOVE_FORGOTTEN_AFTER`].
    adaptive: bool,
    /// Held now.
    held: bool,
    /// The other edges seen since the drain began, by their last report.
    seen: std::collections::BTreeMap<String, EdgeLoad>,
    /// (ms, members gone from here by then, members the other edges took by then) at each
    /// judgement of the last [`MOVE_FORGOTTEN_AFTER`], and the last one before that: members
    /// on their way are at most those that left within it, and the uptake is what was taken
    /// within it.
    left: std::collections::VecDeque<(u64, u64, u64)>,
}

impl Pacer {
    /// A drain of `before` connections over `period`; `max_moving` 0 bounds the members on
    /// their way by the fleet's uptake of the last [`MOVE_FORGOTTEN_AFTER`], and at least by
    /// what the period sends in 5 s (at least 1,000).
    pub fn new(me: String, before: u64, period: Duration, max_moving: u64) -> Self {
        let adaptive = max_moving == 0;
        let max_moving = if max_moving > 0 {
            max_moving
        } else {
            let per_s = before as f64 / period.as_secs_f64().max(0.001);
            ((per_s * AUTO_MOVING_FOR.as_secs_f64()) as u64).max(AUTO_MOVING_MIN)
        };
        Self {
            me,
            before,
            start: None,
            max_moving,
            adaptive,
            held: false,
            seen: std::collections::BTreeMap::new(),
            left: std::collections::VecDeque::new(),
        }
    }

    /// The bound on members on their way (its floor when it follows the fleet's uptake).
    pub fn max_moving(&self) -> u64 {
        self.max_moving
    }

    /// Judges the fleet from `reports` (live, as dispatch reads them) with `open` connections
    /// left here at `now_ms`: `Some(why)` holds the goaways, `None` lets them go. A hold for
    /// members on their way ends once they are down to the uptake bound, or to half the fixed
    /// one (no flapping at it).
    pub fn judge(&mut self, open: u64, reports: &[EdgeLoad], now_ms: u64, max_age_ms: u64) -> Option<String> {
        // Every other edge seen since the drain began, by its last report: one whose report
        // expired (silent: stopped, killed, cut off from Redis) is judged on that old report,
        // as not taking members, rather than dropping out of the fleet.
        for e in reports.iter().filter(|e| e.id != self.me) {
            self.seen.insert(e.id.clone(), e.clone());
        }
        let others: Vec<EdgeLoad> = self.seen.values().cloned().collect();
        let start = self.start.get_or_insert_with(|| others.iter().map(|e| (e.id.clone(), e.connections)).collect());
        let verdict = if others.is_empty() {
            None
        } else if !others.iter().any(|e| e.eligible(now_ms, max_age_ms)) {
            let why: Vec<String> = others
                .iter()
                .map(|e| format!("{}: {}", e.id, e.why_not(now_ms, max_age_ms).unwrap_or_default()))
                .collect();
            Some(format!("no other edge takes members ({})", why.join("; ")))
        } else {
            let moved = self.before.saturating_sub(open);
            let taken: u64 =
                others.iter().map(|e| e.connections.saturating_sub(start.get(&e.id).copied().unwrap_or(0))).sum();
            let (left_lately, taken_lately) = self.lately(now_ms, moved, taken);
            let moving = moved.saturating_sub(taken).min(left_lately);
            // Held, the fixed part of the bound halves (no flapping at it); the uptake does
            // not: it already falls as members stop arriving.
            let fixed = if self.held { self.max_moving / 2 } else { self.max_moving };
            let uptake = if self.adaptive { taken_lately } else { 0 };
            let bound = fixed.max(uptake);
            // Room the eligible edges have left, once the members on their way are in.
            let room: u64 = others
                .iter()
                .filter(|e| e.eligible(now_ms, max_age_ms))
                .map(|e| e.capacity.saturating_sub(e.connections))
                .sum();
            if moving > bound {
                Some(if self.adaptive {
                    format!(
                        "{moving} members sent away are not on another edge yet (the bound is the {taken_lately} \
                         the other edges took in the last {} s, at least {})",
                        MOVE_FORGOTTEN_AFTER.as_secs(),
                        self.max_moving
                    )
                } else {
                    format!("{moving} members sent away are not on another edge yet (the bound is {})", self.max_moving)
                })
            } else if moving >= room {
                Some(format!("the other edges have room for {room} members and {moving} are on their way there"))
            } else {
                None
            }
        };
        self.held = verdict.is_some();
        verdict
    }

    /// Members that left here, and that the other edges took, within [`MOVE_FORGOTTEN_AFTER`]
    /// of `now_ms`, `moved` having left and `taken` been taken in all: what changed since the
    /// last judgement made that long ago or more (since the start when there is none).
    fn lately(&mut self, now_ms: u64, moved: u64, taken: u64) -> (u64, u64) {
        let window = MOVE_FORGOTTEN_AFTER.as_millis() as u64;
        self.left.push_back((now_ms, moved, taken));
        // Keep one judgement at or before the window's start: the baseline.
        while self.left.len() > 1 && self.left[1].0.saturating_add(window) <= now_ms {
            self.left.pop_front();
        }
        let (m0, t0) = self
            .left
            .front()
            .filter(|(at, ..)| at.saturating_add(window) <= now_ms)
            .map_or((0, 0), |&(_, m, t)| (m, t));
        (moved.saturating_sub(m0), taken.saturating_sub(t0))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dispatch::EdgeHealth;

    fn edge(id: &str, connections: u64, capacity: u64) -> EdgeLoad {
        EdgeLoad {
            id: id.into(),
            ws_url: format!("ws://{id}/ws"),
            connections,
            capacity,
            frames_per_s: 0.0,
            bytes_per_s: 0.0,
            frames_capacity_per_s: 0.0,
            egress_capacity_bytes_per_s: 0.0,
            health: EdgeHealth::Ok,
            draining: false,
            at_ms: 1_000,
        }
    }

    /// Goaways wait while no other edge takes members, and while more members are on their way
    /// than the bound (down to half of it); a fleet of one is not paced.
    #[test]
    fn goaways_wait_for_the_fleet_to_take_members() {
        let me = || edge("me", 5_000, 10_000);
        let p = Pacer::new("me".into(), 5_000, Duration::from_secs(10), 0);
        assert_eq!(p.max_moving(), 2_500, "what 5 s of a 10 s schedule sends");
        let mut p = Pacer::new("me".into(), 5_000, Duration::from_secs(100), 0);
        assert_eq!(p.max_moving(), 1_000, "at least 1,000");
        assert_eq!(p.judge(5_000, &[me()], 1_000, 3_000), None, "alone: nothing to pace against");

        let mut p = Pacer::new("me".into(), 5_000, Duration::from_secs(100), 1_000);
        let full = edge("b", 100, 100);
        let why = p.judge(5_000, &[me(), full.clone()], 1_000, 3_000).expect("held");
        assert!(why.contains("b: full (100 of 100 connections)"), "{why}");
        let mut draining = edge("b", 0, 100);
        draining.draining = true;
        assert!(p.judge(5_000, &[me(), draining], 1_000, 3_000).is_some());
        let silent = edge("b", 0, 100);
        assert!(p.judge(5_000, &[me(), silent], 10_000, 3_000).is_some(), "a report too old");

        // Edge c appears with room: members go, and what c holds counts as taken.
        let c = |n: u64| edge("c", n, 10_000);
        assert_eq!(p.judge(4_000, &[me(), full.clone(), c(500)], 1_000, 3_000), None, "500 on their way");
        let why = p.judge(3_000, &[me(), full.clone(), c(900)], 1_000, 3_000).expect("1,100 on their way");
        assert!(why.contains("1100 members"), "{why}");
        assert!(p.judge(3_000, &[me(), full.clone(), c(1_400)], 1_000, 3_000).is_some(), "600: above half");
        assert_eq!(p.judge(3_000, &[me(), full, c(1_600)], 1_000, 3_000), None, "400: below half");
        // b had 100 at the start: its own clients leaving is not members taken elsewhere.
        assert!(p.judge(2_000, &[me(), edge("b", 0, 100), c(1_600)], 1_000, 3_000).is_some());

        // Room for fewer than are on their way: held before the others are full.
        let mut p = Pacer::new("me".into(), 200, Duration::from_secs(10), 0);
        let small = |n: u64| edge("s", n, 64);
        assert_eq!(p.judge(200, &[me(), small(0)], 1_000, 3_000), None);
        assert_eq!(p.judge(180, &[me(), small(10)], 1_000, 3_000), None, "10 on their way, room for 54");
        let why = p.judge(130, &[me(), small(20)], 1_000, 3_000).expect("50 on their way, room for 44");
        assert!(why.contains("room for 44 members and 50 are on their way"), "{why}");
    }

    /// An edge that goes silent (stopped, killed, cut off) has its report expire in Redis and
    /// drops out of the live reports: it is still an edge of the fleet that does not take
    /// members, not a fleet of one. A trial froze B mid-drain and A, seeing no other report,
    /// sent 2,000 members into dispatch's 503s without a hold.
    #[test]
    fn an_edge_whose_report_expired_still_counts_as_not_taking_members() {
        let me = edge("me", 3_000, 10_000);
        let mut p = Pacer::new("me".into(), 3_000, Duration::from_secs(30), 0);
        assert_eq!(p.judge(3_000, &[me.clone(), edge("b", 0, 10_000)], 1_000, 3_000), None);
        let why = p.judge(2_900, std::slice::from_ref(&me), 5_000, 3_000).expect("held: b said nothing for 4 s");
        assert!(why.contains("b: "), "{why}");
        // b reports again: the goaways go on.
        let b = EdgeLoad { at_ms: 6_000, ..edge("b", 100, 10_000) };
        assert_eq!(p.judge(2_900, &[me.clone(), b], 6_000, 3_000), None);
        // A pacer that never saw another edge is a fleet of one.
        let mut alone = Pacer::new("me".into(), 3_000, Duration::from_secs(30), 0);
        assert_eq!(alone.judge(3_000, &[me], 5_000, 3_000), None);
    }

    /// Members that left and arrived nowhere stop counting as on their way after
    /// MOVE_FORGOTTEN_AFTER: they gave up (or closed the app), and the goaways go on.
    #[test]
    fn members_that_never_arrive_stop_holding_the_drain() {
        let me = |n: u64| edge("me", n, 100_000);
        let b = |n: u64, at_ms: u64| EdgeLoad { at_ms, ..edge("b", n, 100_000) };
        let mut p = Pacer::new("me".into(), 10_000, Duration::from_secs(10), 1_000);
        let s = 1_000;
        assert_eq!(p.judge(10_000, &[me(10_000), b(0, s)], s, 3_000), None);
        // 1,500 leave; 300 arrive at b; 1,200 on their way: held.
        assert!(p.judge(8_500, &[me(8_500), b(300, s + 1_000)], s + 1_000, 3_000).is_some());
        // Held, nothing more leaves or arrives: still held within the window ...
        let w = MOVE_FORGOTTEN_AFTER.as_millis() as u64;
        for t in (2_000..w).step_by(1_000) {
            assert!(p.judge(8_500, &[me(8_500), b(300, s + t)], s + t, 3_000).is_some(), "at {t} ms");
        }
        // ... and once the departures are older than it, the 1,200 are no longer waited for.
        let t = s + 1_000 + w;
        assert_eq!(p.judge(8_500, &[me(8_500), b(300, t)], t, 3_000), None);
        // New departures count again: 1,100 leave within the window and none arrive.
        let t = t + 1_000;
        let why = p.judge(7_400, &[me(7_400), b(300, t)], t, 3_000).expect("1,100 on their way");
        assert!(why.contains("1100 members"), "{why}");
    }

    /// A drain of 10^6 over 900 s whose moves take 20 s each (as in the saturated load
    /// generator here) runs `seconds` of judgements, once a second, with the other edge taking
    /// what left 20 s before (nothing after `stall_at` s): how many left in all, and in the
    /// last 60 s.
    fn slow_moves(max_moving: u64, seconds: u64, stall_at: u64) -> (u64, u64) {
        const MOVE_S: usize = 20;
        let mut p = Pacer::new("me".into(), 1_000_000, Duration::from_secs(900), max_moving);
        let mut sent: Vec<u64> = Vec::new();
        for t in 0..seconds {
            let arrived: u64 = sent.iter().take((t.min(stall_at) as usize).saturating_sub(MOVE_S)).sum();
            let moved: u64 = sent.iter().sum();
            let now = 1_000 + t * 1_000;
            let reports =
                [edge("me", 1_000_000 - moved, 2_000_000), EdgeLoad { at_ms: now, ..edge("b", arrived, 2_000_000) }];
            let reports = reports.map(|e| EdgeLoad { at_ms: now, ..e });
            sent.push(if p.judge(1_000_000 - moved, &reports, now, 3_000).is_some() { 0 } else { 1_111 });
        }
        (sent.iter().sum(), sent.iter().rev().take(60).sum())
    }

    /// By default the bound on members on their way follows the fleet's uptake: moves that take
    /// 20 s but arrive do not throttle the drain (a fixed 5 s of schedule let 5,555 / 20 s = 278
    /// a second through: the paced 10^6 run here), and a fleet that stops taking members still
    /// holds it.
    #[test]
    fn slow_moves_that_arrive_do_not_throttle_the_drain() {
        let scheduled = 300 * 1_111;
        let (adaptive, _) = slow_moves(0, 300, u64::MAX);
        let (fixed, _) = slow_moves(5_555, 300, u64::MAX);
        assert!(adaptive > scheduled * 3 / 4, "{adaptive} of {scheduled} sent");
        assert!(fixed < scheduled / 3, "the fixed bound throttles: {fixed} of {scheduled}");
        // The other edge stops taking members at 120 s: past the 30 s window the goaways stop,
        // bar the floor's worth (and the second that crosses it) each time the departures on
        // their way are forgotten, once every 30 s: 13,332 of the 66,660 the schedule sends.
        let (_, last_minute) = slow_moves(0, 300, 120);
        assert!(last_minute <= 2 * (5_555 + 1_111), "{last_minute} sent in the last minute of a stalled fleet");
    }
}
