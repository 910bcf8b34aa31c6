//! Entry dispatch: which edge a new client should connect to.
//!
//! Edges publish an [`EdgeLoad`] report with a TTL; dispatch reads the live reports (at most
//! once per [`registry::CACHE_MS`]) and answers with the least-loaded healthy edge. The selection
//! logic is pure (callers pass `now` and the random numbers); the reports' keys, reads and cache
//! are in [`registry`], over `bus::redis`'s connection.
//!
//! Simultaneous arrivals must not all land on the one least-loaded edge (the report is up to a
//! period old, so they would all see the same "least loaded" edge and stampede it). Two guards:
//! - *power of two choices*: pick two eligible candidates uniformly at random and keep the lower
//!   [`EdgeLoad::score`]: provably near-balanced without global coordination;
//! - *local accounting*: each answer adds one expected connection to the chosen edge's figures
//!   until the edge's next report replaces them.

use std::collections::HashMap;

use serde::{Deserialize, Serialize};

/// Health as the edge judges it (from the kernel probes when present). Ordered from best to
/// worst (the derived order follows the declaration), so the worse of two is their `max`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
#[repr(u8)]
pub enum EdgeHealth {
    /// Serving normally.
    Ok,
    /// Serving, with a kernel figure past its `degraded` threshold: dispatch prefers others.
    Degraded,
    /// Past an `overloaded` threshold: handshakes may be refused, dispatch skips the edge.
    Overloaded,
}

impl EdgeHealth {
    /// The state as one byte (its place in the order), for an `AtomicU8` shared with shards.
    pub const fn level(self) -> u8 {
        self as u8
    }

    /// The state a [`level`](Self::level) byte stands for (anything past the last: the worst).
    pub const fn from_level(level: u8) -> Self {
        match level {
            0 => Self::Ok,
            1 => Self::Degraded,
            _ => Self::Overloaded,
        }
    }
}

/// One edge's load report.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EdgeLoad {
    /// The edge's id, unique in the cluster (its registry key is `rc:edge:{id}`).
    pub id: String,
    /// Where clients connect (`ws://host:port/ws`).
    pub ws_url: String,
    /// WebSocket connections it holds now.
    pub connections: u64,
    /// Most connections this edge should hold (shards x table size, or configured).
    pub capacity: u64,
    /// WebSocket frames it wrote per second since its previous report.
    pub frames_per_s: f64,
    /// Bytes it wrote per second since its previous report.
    pub bytes_per_s: f64,
    /// Frames a second its shards could write with all the CPU they can get, as they measure
    /// it (0: not measured yet, or an edge from before this field).
    #[serde(default)]
    pub frames_capacity_per_s: f64,
    /// Bytes a second its link carries (`dispatch.egress_bytes_per_s`; 0: not configured).
    #[serde(default)]
    pub egress_capacity_bytes_per_s: f64,
    /// Its health policy's verdict: an overloaded edge gets no new clients.
    pub health: EdgeHealth,
    /// Shutting down: dispatch sends it no new clients.
    pub draining: bool,
    /// When the report was made, ms since the epoch.
    pub at_ms: u64,
}

impl EdgeLoad {
    /// Load in [0, inf): the fullest of its resources, plus a health penalty (0.5 degraded, 10
    /// overloaded; an overloaded edge is not [`eligible`](Self::eligible) anyway). Resources:
    /// connections (against its descriptor tables), packets (frames written a second against
    /// what its shards measured they can write: an edge holding one hot room is busy with few
    /// connections) and bandwidth (bytes a second against its link, when configured). The
    /// fullest one decides, as it is the one a new client would run out of.
    pub fn score(&self) -> f64 {
        let ratio = |used: f64, cap: f64| if cap > 0.0 { used / cap } else { 0.0 };
        let fill = (self.connections as f64 / self.capacity.max(1) as f64)
            .max(ratio(self.frames_per_s, self.frames_capacity_per_s))
            .max(ratio(self.bytes_per_s, self.egress_capacity_bytes_per_s));
        let health = match self.health {
            EdgeHealth::Ok => 0.0,
            EdgeHealth::Degraded => 0.5,
            EdgeHealth::Overloaded => 10.0,
        };
        fill + health
    }

    /// Whether dispatch may send new clients here.
    pub fn eligible(&self, now_ms: u64, max_age_ms: u64) -> bool {
        self.why_not(now_ms, max_age_ms).is_none()
    }

    /// Why dispatch may not send new clients here (None: it may), for a refusal's reason.
    pub fn why_not(&self, now_ms: u64, max_age_ms: u64) -> Option<String> {
        let age = now_ms.saturating_sub(self.at_ms);
        if self.draining {
            Some("draining".into())
        } else if self.health == EdgeHealth::Overloaded {
            Some("overloaded".into())
        } else if age > max_age_ms {
            Some(format!("report {age} ms old (the limit is {max_age_ms})"))
        } else if self.connections >= self.capacity {
            Some(format!("full ({} of {} connections)", self.connections, self.capacity))
        } else {
            None
        }
    }
}

/// Chooses edges for arriving clients.
#[derive(Debug, Default)]
pub struct Dispatcher {
    /// Clients sent to each edge lately: (the second, clients sent in it, in the one before).
    /// An answered client connects up to a second or two later (a goaway's delay, its
    /// handshake), so a report made meanwhile does not count it yet: resetting the count at
    /// each report let a trial's dispatch send 339 moving members to edges it had just
    /// filled, which the kernel refused (`table_full`) instead of dispatch saying `full`.
    assigned: HashMap<String, (u64, u64, u64)>,
}

impl Dispatcher {
    /// Clients sent to `id` in this second and the one before.
    fn recent(&self, id: &str, now_ms: u64) -> u64 {
        let now_s = now_ms / 1000;
        match self.assigned.get(id) {
            Some(&(s, cur, prev)) if s == now_s => cur + prev,
            Some(&(s, cur, _)) if s + 1 == now_s => cur,
            _ => 0,
        }
    }

    /// Why no client may be sent to `e` now (None: it may): [`EdgeLoad::why_not`], or full
    /// with the clients sent to it lately that its report may not count yet.
    pub fn why_not(&self, e: &EdgeLoad, now_ms: u64, max_age_ms: u64) -> Option<String> {
        e.why_not(now_ms, max_age_ms).or_else(|| {
            let recent = self.recent(&e.id, now_ms);
            (e.connections + recent >= e.capacity).then(|| {
                format!(
                    "full ({} of {} connections, and {recent} clients sent there in the last seconds)",
                    e.connections, e.capacity
                )
            })
        })
    }

    /// Picks an edge for one client. `r1`, `r2` are uniform random numbers in [0, 1).
    pub fn pick<'a>(
        &mut self,
        edges: &'a [EdgeLoad],
        now_ms: u64,
        max_age_ms: u64,
        r1: f64,
        r2: f64,
    ) -> Option<&'a EdgeLoad> {
        let live: Vec<&EdgeLoad> = edges.iter().filter(|e| self.why_not(e, now_ms, max_age_ms).is_none()).collect();
        if live.is_empty() {
            return None;
        }
        let score = |e: &EdgeLoad| {
            let mut e2 = e.clone();
            e2.connections += self.recent(&e.id, now_ms);
            e2.score()
        };
        let a = live[((r1 * live.len() as f64) as usize).min(live.len() - 1)];
        let b = live[((r2 * live.len() as f64) as usize).min(live.len() - 1)];
        let best = if score(a) <= score(b) { a } else { b };
        let now_s = now_ms / 1000;
        let entry = self.assigned.entry(best.id.clone()).or_insert((now_s, 0, 0));
        match entry.0 {
            s if s == now_s => {}
            s if s + 1 == now_s => *entry = (now_s, 0, entry.1),
            _ => *entry = (now_s, 0, 0),
        }
        entry.1 += 1;
        Some(best)
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A healthy report from `id` with `connections` of 1000, made at 1000 ms.
    pub(crate) fn edge(id: &str, connections: u64) -> EdgeLoad {
        EdgeLoad {
            id: id.into(),
            ws_url: format!("ws://{id}/ws"),
            connections,
            capacity: 1000,
            frames_per_s: 0.0,
            bytes_per_s: 0.0,
            frames_capacity_per_s: 0.0,
            egress_capacity_bytes_per_s: 0.0,
            health: EdgeHealth::Ok,
            draining: false,
            at_ms: 1000,
        }
    }

    #[test]
    fn never_draining_expired_full_or_overloaded() {
        let mut d = Dispatcher::default();
        let mut draining = edge("a", 0);
        draining.draining = true;
        let mut old = edge("b", 0);
        old.at_ms = 0;
        let mut hot = edge("c", 0);
        hot.health = EdgeHealth::Overloaded;
        let full = edge("d", 1000);
        let edges = vec![draining, old, hot, full, edge("e", 900)];
        for i in 0..100 {
            let r = f64::from(i) / 100.0;
            assert_eq!(d.pick(&edges, 1500, 600, r, 1.0 - r).unwrap().id, "e");
        }
        assert!(d.pick(&edges[..4], 1500, 600, 0.1, 0.2).is_none());
    }

    #[test]
    fn a_burst_spreads_instead_of_stampeding_the_lightest() {
        let mut d = Dispatcher::default();
        let edges = vec![edge("a", 100), edge("b", 110), edge("c", 120)];
        let mut counts: HashMap<String, u32> = HashMap::new();
        let mut rng = fastrand::Rng::with_seed(12345);
        let mut rnd = || rng.f64();
        for _ in 0..300 {
            let e = d.pick(&edges, 1000, 600, rnd(), rnd()).unwrap();
            *counts.entry(e.id.clone()).or_default() += 1;
        }
        // With local accounting the three converge on equal totals (100+a, 110+b, 120+c).
        let total = |id: &str, base: u32| base + counts.get(id).copied().unwrap_or(0);
        let (a, b, c) = (total("a", 100), total("b", 110), total("c", 120));
        assert!(a.abs_diff(b) < 40 && b.abs_diff(c) < 40 && a.abs_diff(c) < 40, "{a} {b} {c}");
        assert!(counts.len() == 3, "{counts:?}");
    }

    /// Clients sent to an edge count against its room until two seconds have passed, whatever
    /// reports come meanwhile (they connect a second or two after their answer, so a report
    /// made in between does not hold them): an edge filled by recent answers is `full` for
    /// dispatch, not for the kernel. A trial's dispatch, which forgot them at each report, sent
    /// 339 moving members to edges with no slot left.
    #[test]
    fn clients_sent_lately_count_against_an_edges_room_across_reports() {
        let mut d = Dispatcher::default();
        let mut a = edge("a", 990);
        for _ in 0..10 {
            assert_eq!(d.pick(std::slice::from_ref(&a), 1500, 600, 0.0, 0.0).unwrap().id, "a");
        }
        // A new report that does not count them yet.
        a.at_ms = 2000;
        assert!(d.pick(std::slice::from_ref(&a), 2100, 600, 0.0, 0.0).is_none(), "the ten sent count");
        let why = d.why_not(&a, 2100, 600).unwrap();
        assert!(why.contains("full (990 of 1000 connections, and 10 clients sent there"), "{why}");
        // Two seconds on, the reports hold whoever came.
        a.at_ms = 3000;
        assert_eq!(d.why_not(&a, 3100, 600), None);
        assert!(d.pick(std::slice::from_ref(&a), 3100, 600, 0.0, 0.0).is_some());
    }

    /// An edge with few connections but busy writing (a hot room) or near its link's limit
    /// is fuller than one with more connections and idle shards; capacities not known (0)
    /// are not weighed.
    #[test]
    fn packets_and_bandwidth_count_as_well_as_connections() {
        let many = edge("many", 500);
        let mut busy = edge("busy", 100);
        busy.frames_per_s = 180_000.0;
        busy.frames_capacity_per_s = 200_000.0;
        assert!(busy.score() > many.score(), "{} vs {}", busy.score(), many.score());
        let mut link = edge("link", 100);
        link.bytes_per_s = 1.0e9;
        link.egress_capacity_bytes_per_s = 1.25e9;
        assert!(link.score() > many.score());
        let mut unknown = edge("unknown", 100);
        unknown.frames_per_s = 180_000.0;
        unknown.bytes_per_s = 1.0e9;
        assert!(unknown.score() < many.score(), "unmeasured capacities are not weighed");
        let mut d = Dispatcher::default();
        let edges = vec![many, busy, link];
        // Whichever it is drawn against, "many" wins.
        for r in [0.1, 0.5, 0.9] {
            assert_eq!(d.pick(&edges, 1500, 600, r, 0.0).unwrap().id, "many", "r = {r}");
        }
        // A report from an edge without the new fields still reads (rolling upgrades).
        let old = r#"{"id":"o","ws_url":"ws://o/ws","connections":1,"capacity":10,"frames_per_s":5.0,"bytes_per_s":9.0,"health":"ok","draining":false,"at_ms":1}"#;
        let e: EdgeLoad = serde_json::from_str(old).unwrap();
        assert_eq!((e.frames_capacity_per_s, e.egress_capacity_bytes_per_s), (0.0, 0.0));
    }

    #[test]
    fn degraded_edges_are_used_only_when_much_lighter() {
        let mut healthy = edge("h", 500);
        healthy.capacity = 1000;
        let mut degraded = edge("d", 10);
        degraded.health = EdgeHealth::Degraded;
        assert!(healthy.score() < degraded.score() + 0.5);
        assert!(degraded.score() > 0.5);
    }
}

/// Load reports in Redis: `rc:edge:{id}` holds the JSON report with a TTL, and the sorted set
/// `rc:edges` scores each id by its last report time, so dispatch reads live edges with one
/// range query and one MGET, without SCAN.
pub mod registry {
    use std::sync::Arc;

    use redis::AsyncCommands;

    use super::EdgeLoad;
    use crate::bus::redis::Conn;
    use crate::bus::slots::{SLOTS, slot_of};

    /// The sorted set of edge ids, scored by their last report time (ms).
    pub const EDGES: &str = "rc:edges";

    /// How long an edge stays in the index after its last successful index write. Liveness is
    /// judged by the report itself (its key's TTL and its `at_ms`), not by the index score: the
    /// index is one key, so on a Redis whose primary for it refuses writes for a while
    /// (`min-replicas-to-write` with its replica gone: a trial found dispatch answering 503 on
    /// every edge for every room then) reports written elsewhere still route clients.
    pub const INDEX_KEEP_MS: u64 = 10 * 60 * 1000;

    /// The key of the edge's JSON load report.
    pub fn key(id: &str) -> String {
        format!("rc:edge:{id}")
    }

    /// On a cluster, the second key the edge's report is written to: hash-tagged to the slot
    /// half the slot space away from [`key`]'s. A primary with `min-replicas-to-write` and its
    /// replica gone refuses writes, and an edge whose one report key lived there could not be
    /// routed to at all (CI found `/v1/route` answering "no edge has reported" when both test
    /// edges' keys hashed to that primary). Slots half the space apart are on different
    /// primaries whenever each primary holds one contiguous range smaller than half the slots,
    /// which is how `redis-cli --cluster create` lays out two or more primaries. Dispatch reads
    /// both keys and keeps the fresher report.
    pub fn alt_key(id: &str) -> String {
        let slot = usize::from(slot_of(key(id).as_bytes()));
        let tag = tag_for_slot((slot + SLOTS / 2) % SLOTS);
        // The tag first: Redis hashes a key's first `{...}`, and an `edge_id` may hold braces.
        format!("rc:edge:{{{tag}}}:{id}")
    }

    /// A hash tag (a decimal number) whose slot is `slot`: the smallest such number, from a
    /// table built once (about 170,000 hashes, a few milliseconds).
    fn tag_for_slot(slot: usize) -> u32 {
        static TAGS: std::sync::OnceLock<Vec<u32>> = std::sync::OnceLock::new();
        let tags = TAGS.get_or_init(|| {
            let mut tags = vec![u32::MAX; SLOTS];
            let mut left = SLOTS;
            let mut n = 0u32;
            while left > 0 {
                let s = usize::from(slot_of(format!("{{{n}}}").as_bytes()));
                if tags[s] == u32::MAX {
                    tags[s] = n;
                    left -= 1;
                }
                n += 1;
            }
            tags
        });
        tags[slot % SLOTS]
    }

    /// Publishes one report, valid for `ttl_ms`. On one Redis in one transaction; on a cluster
    /// the report and the index live in different slots, so the report is written first (an
    /// index entry without its report is skipped by `live`, a report without one is not found).
    pub async fn report(cm: &mut Conn, load: &EdgeLoad, ttl_ms: u64) -> redis::RedisResult<()> {
        let json = serde_json::to_string(load).unwrap_or_default();
        let mut set = redis::cmd("SET");
        set.arg(key(&load.id)).arg(&json).arg("PX").arg(ttl_ms);
        if cm.is_cluster() {
            // Both keys, in different slots: the report is published if either is written.
            let mut alt = redis::cmd("SET");
            alt.arg(alt_key(&load.id)).arg(&json).arg("PX").arg(ttl_ms);
            let first: redis::RedisResult<()> = set.query_async(cm).await;
            let second: redis::RedisResult<()> = alt.query_async(cm).await;
            first.or(second)?;
            let _: i64 = cm.zadd(EDGES, &load.id, load.at_ms).await?;
            let _: i64 = cm.zrembyscore(EDGES, 0, load.at_ms.saturating_sub(INDEX_KEEP_MS.max(ttl_ms))).await?;
            return Ok(());
        }
        redis::pipe()
            .atomic()
            .add_command(set)
            .ignore()
            .zadd(EDGES, &load.id, load.at_ms)
            .ignore()
            .zrembyscore(EDGES, 0, load.at_ms.saturating_sub(INDEX_KEEP_MS.max(ttl_ms)))
            .ignore()
            .query_async(cm)
            .await
    }

    /// How long one read of the reports answers `/v1/route` (ms). Reports change once a second,
    /// so reading them for every request (a range query and an MGET: two round trips to Redis
    /// and a JSON parse of every report) bought nothing but Redis traffic and latency growing
    /// with the arrival rate, and a storm of 10^6 reconnecting clients is exactly when dispatch
    /// is asked most. A draining edge waits this long after its `draining` report is written
    /// (`AppState::leave_dispatch`), so no dispatch answers it from a read made before.
    pub const CACHE_MS: u64 = 200;

    /// The live reports as last read, shared by every request of one dispatch endpoint: read at
    /// most once per [`CACHE_MS`] whatever the request rate, by one request while the others
    /// wait for its outcome (no stampede on Redis when the cache expires under load).
    #[derive(Default)]
    pub struct Cache {
        /// The last read: when it started and ended, and what it found or why it failed.
        last: std::sync::Mutex<Option<Read>>,
        /// Held by the one request reading Redis.
        reading: tokio::sync::Mutex<()>,
    }

    /// The live edges' reports, shared by the answers made from one read.
    pub type Reports = Arc<[EdgeLoad]>;

    /// One read of the reports.
    struct Read {
        started: std::time::Instant,
        ended: std::time::Instant,
        outcome: Result<Reports, Arc<str>>,
    }

    impl Cache {
        /// The live reports (as [`live`]): from a read started less than [`CACHE_MS`] before
        /// this request asked (or after), or read now; a read that failed after this request
        /// asked fails it too. The age is measured from the read's start to the request's
        /// arrival, so a request that arrives more than `CACHE_MS` after a report was written
        /// is answered from a read that started after the write.
        pub async fn live(&self, cm: &Conn, max_age_ms: u64) -> Result<Reports, Arc<str>> {
            self.read_with(|| async move {
                live(&mut cm.clone(), crate::bus::now_us() / 1000, max_age_ms).await.map_err(|e| e.to_string())
            })
            .await
        }

        /// [`Cache::live`] with the read given (tests read without Redis).
        async fn read_with<F, Fut>(&self, read: F) -> Result<Reports, Arc<str>>
        where
            F: FnOnce() -> Fut,
            Fut: std::future::Future<Output = Result<Vec<EdgeLoad>, String>>,
        {
            let asked = std::time::Instant::now();
            if let Some(e) = self.fresh(asked) {
                return Ok(e);
            }
            let _one = self.reading.lock().await;
            // The requests queued behind a read share its outcome: a failure (Redis timing out
            // on a saturated box) is not tried again by each of them in turn, which would make
            // the last wait for as many timeouts as there were requests before it. So does a
            // success that took longer than CACHE_MS: judged by its age now rather than at
            // their arrival, each waiter read again in turn, one slow read after another.
            if let Some(e) = self.fresh(asked) {
                return Ok(e);
            }
            if let Some(Read { ended, outcome: Err(e), .. }) =
                &*self.last.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
                && *ended >= asked
            {
                return Err(e.clone());
            }
            let started = std::time::Instant::now();
            let outcome = read().await.map(Reports::from).map_err(Arc::from);
            let ended = std::time::Instant::now();
            *self.last.lock().unwrap_or_else(std::sync::PoisonError::into_inner) =
                Some(Read { started, ended, outcome: outcome.clone() });
            outcome
        }

        /// The last read's reports, if it succeeded and started less than [`CACHE_MS`] before
        /// `asked` (or after it).
        fn fresh(&self, asked: std::time::Instant) -> Option<Reports> {
            match &*self.last.lock().unwrap_or_else(std::sync::PoisonError::into_inner) {
                Some(Read { started, outcome: Ok(e), .. })
                    if asked.saturating_duration_since(*started) < std::time::Duration::from_millis(CACHE_MS) =>
                {
                    Some(e.clone())
                }
                _ => None,
            }
        }
    }

    /// Reports younger than `max_age_ms` (on a cluster the MGET is split by slot by redis-rs):
    /// every edge indexed within `INDEX_KEEP_MS` whose report is still there and recent.
    pub async fn live(cm: &mut Conn, now_ms: u64, max_age_ms: u64) -> redis::RedisResult<Vec<EdgeLoad>> {
        let since = now_ms.saturating_sub(INDEX_KEEP_MS.max(max_age_ms));
        let ids: Vec<String> = cm.zrangebyscore(EDGES, since, "+inf").await?;
        if ids.is_empty() {
            return Ok(Vec::new());
        }
        let cluster = cm.is_cluster();
        let keys: Vec<String> = if cluster {
            ids.iter().flat_map(|i| [key(i), alt_key(i)]).collect()
        } else {
            ids.iter().map(|i| key(i)).collect()
        };
        let vals: Vec<Option<String>> = redis::cmd("MGET").arg(&keys).query_async(cm).await?;
        Ok(freshest(vals.chunks(if cluster { 2 } else { 1 }), now_ms, max_age_ms))
    }

    /// One report per edge from its keys' values (`copies`: the values of one edge's keys):
    /// the one written last, if it is younger than `max_age_ms`.
    fn freshest<'a>(copies: impl Iterator<Item = &'a [Option<String>]>, now_ms: u64, max_age_ms: u64) -> Vec<EdgeLoad> {
        copies
            .filter_map(|c| {
                c.iter().flatten().filter_map(|v| serde_json::from_str::<EdgeLoad>(v).ok()).max_by_key(|e| e.at_ms)
            })
            .filter(|e| e.at_ms.saturating_add(max_age_ms) >= now_ms)
            .collect()
    }

    #[cfg(test)]
    mod tests {
        use std::sync::atomic::{AtomicU32, Ordering};
        use std::time::Duration;

        use super::*;

        /// The second report key is on the slot half the slot space away, so on any even,
        /// contiguous layout of two to sixteen primaries the two copies are on different ones.
        #[test]
        fn the_two_report_keys_are_on_different_primaries() {
            for id in ["a", "edge-1", "7f3c9e0b2a41d6e8", "", "{tagged}", "ws://h:1/ws"] {
                let (one, two) =
                    (usize::from(slot_of(key(id).as_bytes())), usize::from(slot_of(alt_key(id).as_bytes())));
                assert_eq!((one + SLOTS / 2) % SLOTS, two, "{id}");
            }
            for primaries in 2..=16 {
                let owner = |slot: usize| slot * primaries / SLOTS;
                for slot in 0..SLOTS {
                    assert_ne!(owner(slot), owner((slot + SLOTS / 2) % SLOTS), "{primaries} primaries, slot {slot}");
                }
            }
        }

        /// Dispatch keeps the copy written last, and only if it is recent.
        #[test]
        fn the_fresher_copy_of_a_report_counts() {
            let at = |id: &str, at_ms: u64, connections: u64| {
                let mut e = crate::dispatch::tests::edge(id, connections);
                e.at_ms = at_ms;
                Some(serde_json::to_string(&e).unwrap())
            };
            let vals = [
                at("a", 9_000, 1),
                at("a", 10_000, 2), // both written, the second later
                None,
                at("b", 9_500, 3), // the first key refused writes
                at("c", 5_000, 4),
                None, // too old
                Some("{".into()),
                at("d", 9_800, 5), // a copy that is not a report
            ];
            let live = freshest(vals.chunks(2), 10_000, 3_000);
            let seen: Vec<(&str, u64)> = live.iter().map(|e| (e.id.as_str(), e.connections)).collect();
            assert_eq!(seen, [("a", 2), ("b", 3), ("d", 5)]);
        }

        /// 20 requests at once on `cache`, each read taking `takes` and finding `found()`: their
        /// outcomes, and how many reads were made.
        async fn twenty_at_once(
            cache: &Arc<Cache>,
            takes: Duration,
            found: fn() -> Result<Vec<EdgeLoad>, String>,
        ) -> (Vec<Result<Reports, Arc<str>>>, u32) {
            let reads = Arc::new(AtomicU32::new(0));
            let asks: Vec<_> = (0..20)
                .map(|_| {
                    let (cache, reads) = (cache.clone(), reads.clone());
                    tokio::spawn(async move {
                        cache
                            .read_with(|| async {
                                reads.fetch_add(1, Ordering::Relaxed);
                                tokio::time::sleep(takes).await;
                                found()
                            })
                            .await
                    })
                })
                .collect();
            let mut outcomes = Vec::new();
            for a in asks {
                outcomes.push(a.await.unwrap());
            }
            (outcomes, reads.load(Ordering::Relaxed))
        }

        /// 20 requests at once while Redis times out: one read fails and all 20 are told, instead
        /// of each trying again in turn behind the lock (the 20th waiting 20 timeouts).
        #[tokio::test]
        async fn requests_waiting_behind_a_failed_read_share_its_failure() {
            let cache = Arc::new(Cache::default());
            let (outcomes, reads) =
                twenty_at_once(&cache, Duration::from_millis(50), || Err("timed out".to_owned())).await;
            for o in outcomes {
                assert_eq!(o.unwrap_err().as_ref(), "timed out");
            }
            assert_eq!(reads, 1, "every request waiting read again");
            // A request after the failed read reads again (a failure is not cached).
            let again = cache.read_with(|| async { Ok(Vec::new()) }).await;
            assert_eq!(again.unwrap().len(), 0);
        }

        /// 20 requests at once while a read takes longer than CACHE_MS (Redis slow on a
        /// saturated box): the one read answers them all. Judged by the read's age when each
        /// got the lock, every waiter found it stale and read again in turn: 20 slow reads,
        /// the last request answered after all of them.
        #[tokio::test]
        async fn requests_waiting_behind_a_slow_read_share_its_answer() {
            let cache = Arc::new(Cache::default());
            let (outcomes, reads) =
                twenty_at_once(&cache, Duration::from_millis(CACHE_MS + 100), || Ok(Vec::new())).await;
            for o in outcomes {
                o.unwrap();
            }
            assert_eq!(reads, 1, "requests waiting behind a slow read read again");
        }

        /// A request arriving more than CACHE_MS after a read started is not answered from it,
        /// even while it is still under way (the drain's promise: an edge waits CACHE_MS after
        /// its `draining` report, and a read started before the report must not answer later
        /// requests).
        #[tokio::test]
        async fn a_request_arriving_past_a_reads_period_reads_again() {
            let cache = Arc::new(Cache::default());
            let reads = Arc::new(AtomicU32::new(0));
            let slow = {
                let (cache, reads) = (cache.clone(), reads.clone());
                tokio::spawn(async move {
                    cache
                        .read_with(|| async {
                            reads.fetch_add(1, Ordering::Relaxed);
                            tokio::time::sleep(Duration::from_millis(CACHE_MS + 200)).await;
                            Ok(Vec::new())
                        })
                        .await
                })
            };
            tokio::time::sleep(Duration::from_millis(CACHE_MS + 50)).await;
            cache
                .read_with(|| async {
                    reads.fetch_add(1, Ordering::Relaxed);
                    Ok(Vec::new())
                })
                .await
                .unwrap();
            slow.await.unwrap().unwrap();
            assert_eq!(reads.load(Ordering::Relaxed), 2, "a late request was answered from a read started too early");
        }

        /// Successful reads answer for CACHE_MS, then the next request reads again.
        #[tokio::test]
        async fn a_read_answers_for_its_period_then_is_read_again() {
            let cache = Cache::default();
            let reads = AtomicU32::new(0);
            let read = || async {
                reads.fetch_add(1, Ordering::Relaxed);
                Ok(Vec::new())
            };
            for _ in 0..10 {
                cache.read_with(read).await.unwrap();
            }
            assert_eq!(reads.load(Ordering::Relaxed), 1);
            std::thread::sleep(Duration::from_millis(CACHE_MS + 10));
            cache.read_with(read).await.unwrap();
            assert_eq!(reads.load(Ordering::Relaxed), 2);
        }
    }
}
