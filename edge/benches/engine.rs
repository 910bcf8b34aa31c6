//! The room engine alone: how many room flushes one engine turns out per second, and how the
//! cost of a flush grows with the number of shards it is handed to.
//!
//! No sockets, no threads, no sleeping: one `Engine` driven by a synthetic clock (an `Instant`
//! this file advances by `STEP` per iteration), through its public API only. Every room has a
//! JSON member on every shard (one `EngineCmd::Join` per room per shard, acks discarded), the
//! merge window is 0, adaptive merging is off and the limits are far above what is offered, so
//! each iteration is: one must-deliver publish (`gift`, `Reply::None`) per room through
//! `Engine::handle`, then one `Engine::poll`, which flushes every room: serialize once (JSON),
//! wrap once into a frame, push one `ShardCmd::Deliver(Arc<Delivery>)` per shard.
//!
//! Timed: `handle` for every publish + `poll`. Not timed: building the commands (in the edge
//! they arrive built, from ingest or a shard), and emptying `out.shard` afterwards, which drops
//! the `Arc<Delivery>` clones (in the edge the receiving shards do that). `out.shard` vectors
//! are cleared, keeping their capacity (the edge's shard loop `mem::take`s them instead, so it
//! also pays for growing fresh vectors). Every iteration is checked: exactly `rooms` deliveries
//! on every shard, nothing else.
//!
//! Turns are timed in this thread's CPU time by default, not wall time (see [`Clock`]): the box
//! these run on is shared, and descheduled time would otherwise count.
//!
//! Throughput is `Elements(rooms)`: criterion's elements/s are flushes/s. Deliveries handed to
//! shards per second = flushes/s x shards.
//!
//! Run: `cargo bench -p edge --bench engine`. Results: bench-results/*-engine/. The conditions
//! (config, clock step, frame size, machine) are printed to stderr before the figures.

use std::hint::black_box;
use std::sync::Arc;
use std::time::{Duration, Instant};

use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use edge::bus::{EngineCmd, NewMessage, Reply, RoomName, ShardCmd};
use edge::config::Config;
use edge::engine::{Engine, EngineConfig, LoadBoard, Out};
use edge::metrics::Metrics;
use roomcast_proto::Subprotocol;

const ROOMS: [usize; 3] = [10, 1_000, 10_000];
const SHARDS: [usize; 4] = [1, 2, 8, 64];
/// Synthetic time between two iterations (every room publishes once per step: 1,000 msg/s).
const STEP: Duration = Duration::from_millis(1);
/// A gift as a publisher would send it (validated JSON text).
const BODY: &str = r#"{"gift":"rose","count":1,"from":"user-4711","combo":3}"#;
/// Must-deliver messages kept per room. The default (10,000) times 10,000 rooms would hold
/// ~10^8 messages; every publish evicts one at steady state either way.
const HISTORY: usize = 64;
const WALL_US: u64 = 1_764_460_800_000_000; // 2025-11-30T00:00:00Z, only for message timestamps

fn config() -> Config {
    let mut cfg = Config::default();
    cfg.fanout.merge_window_ms = 0;
    cfg.adaptive.enabled = false;
    cfg.limits.room_rate = 1e12;
    cfg.limits.room_burst = 1e12;
    cfg.limits.must_deliver_room_rate = 1e12;
    cfg.limits.must_deliver_room_burst = 1e12;
    cfg.history.must_deliver = HISTORY;
    cfg
}

/// One engine with `rooms` rooms, each with a JSON member on each of `shards` shards.
struct Setup {
    engine: Engine,
    out: Out,
    now: Instant,
    rooms: Vec<RoomName>,
    shards: usize,
    /// The next turn's publishes, built before the clock starts (reused: a fresh 1 MB vector
    /// per turn at 10^4 rooms made glibc consolidate its heap every turn).
    cmds: Vec<EngineCmd>,
}

impl Setup {
    fn new(cfg: &Config, rooms: usize, shards: usize) -> Self {
        let ec = EngineConfig::from_config(cfg);
        assert_eq!(ec.kinds.get("gift"), Some(&true), "gift must be a must-deliver kind");
        let stats = Metrics::new().bus.clone();
        let load = Arc::new(LoadBoard::new(shards));
        let now = Instant::now();
        let mut engine = Engine::new(0, 1, shards, ec, stats, load, now, WALL_US);
        let mut out = Out::new(shards);
        let names: Vec<RoomName> = (0..rooms).map(|i| RoomName::from(format!("room-{i:05}"))).collect();
        for (i, room) in names.iter().enumerate() {
            for s in 0..shards {
                let join = EngineCmd::Join {
                    room: room.clone(),
                    shard: s as u16,
                    slot: i as u32,
                    generation: 1,
                    proto: Subprotocol::Json,
                    since: None,
                };
                engine.handle(join, now, &mut out);
            }
        }
        for (s, v) in out.shard.iter_mut().enumerate() {
            assert_eq!(v.len(), rooms, "one JoinAck per room on shard {s}");
            assert!(v.iter().all(|c| matches!(c, ShardCmd::JoinAck(_))), "only JoinAcks after setup");
            v.clear();
        }
        Self { engine, out, now, rooms: names, shards, cmds: Vec::with_capacity(rooms) }
    }

    fn publishes(&mut self) {
        self.cmds.clear();
        self.cmds.extend(self.rooms.iter().map(|room| EngineCmd::Publish {
            room: room.clone(),
            msg: Box::new(NewMessage { kind: "gift".into(), user: String::new(), body: BODY.into(), idem: None }),
            reply: Reply::None,
        }));
    }

    /// One iteration: a publish per room, one poll. Returns the time `handle` + `poll` took on
    /// `clock`, and their wall time.
    fn turn(&mut self, clock: Clock) -> (Duration, Duration) {
        self.now += STEP;
        self.publishes();
        let now = self.now;
        let (w0, c0) = (Instant::now(), clock.read());
        for cmd in self.cmds.drain(..) {
            self.engine.handle(cmd, now, &mut self.out);
        }
        self.engine.poll(now, &mut self.out);
        let (took, wall) = (clock.read().saturating_sub(c0), w0.elapsed());
        self.drain_checked();
        (took, wall)
    }

    /// Counts and empties what the engine handed to each shard: exactly one `Deliver` per room.
    fn drain_checked(&mut self) -> u64 {
        let mut delivered = 0u64;
        for (s, v) in self.out.shard.iter_mut().enumerate() {
            assert_eq!(v.len(), self.rooms.len(), "shard {s}: one delivery per room per turn");
            for cmd in v.iter() {
                match cmd {
                    ShardCmd::Deliver(d) => {
                        assert_eq!(d.messages, 1);
                        black_box(d);
                    }
                    _ => panic!("shard {s}: only deliveries expected"),
                }
            }
            delivered += v.len() as u64;
            v.clear();
        }
        delivered
    }

    /// The frame one flush produced (for the record), after a turn outside any measurement.
    fn sample_frame_len(&mut self) -> usize {
        self.now += STEP;
        let now = self.now;
        self.publishes();
        for cmd in self.cmds.drain(..) {
            self.engine.handle(cmd, now, &mut self.out);
        }
        self.engine.poll(now, &mut self.out);
        let len = match self.out.shard[0].first() {
            Some(ShardCmd::Deliver(d)) => d.frames[Subprotocol::Json.index()].as_ref().map_or(0, bytes::Bytes::len),
            _ => 0,
        };
        let delivered = self.drain_checked();
        assert_eq!(delivered, (self.rooms.len() * self.shards) as u64);
        len
    }
}

/// What the figures are measured in. The box these run on is shared with other builds, so by
/// default a turn is timed in CPU time of this thread (`CLOCK_THREAD_CPUTIME_ID`): time the
/// thread spent descheduled is not counted (cache and memory-bandwidth interference from
/// co-runners still is). `ENGINE_BENCH_CLOCK=wall` times in wall-clock time instead.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Clock {
    ThreadCpu,
    Wall,
}

impl Clock {
    fn from_env() -> Self {
        match std::env::var("ENGINE_BENCH_CLOCK").as_deref() {
            Ok("wall") => Self::Wall,
            _ => Self::ThreadCpu,
        }
    }

    /// Time since an arbitrary origin fixed for the process.
    fn read(self) -> Duration {
        match self {
            Self::Wall => {
                static ORIGIN: std::sync::OnceLock<Instant> = std::sync::OnceLock::new();
                ORIGIN.get_or_init(Instant::now).elapsed()
            }
            Self::ThreadCpu => {
                let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
                // SAFETY: `ts` is a valid, writable timespec; the call only writes to it.
                let r = unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &raw mut ts) };
                assert_eq!(r, 0, "clock_gettime(CLOCK_THREAD_CPUTIME_ID)");
                Duration::new(ts.tv_sec as u64, ts.tv_nsec as u32)
            }
        }
    }

    /// What reading the clock twice costs (the floor under every timed turn): the median of
    /// many empty pairs, in the clock's own units.
    fn overhead(self) -> Duration {
        let mut v: Vec<Duration> = (0..10_001)
            .map(|_| {
                let a = self.read();
                black_box(self.read()).saturating_sub(a)
            })
            .collect();
        v.sort();
        v[v.len() / 2]
    }
}

fn conditions(cfg: &Config, clock: Clock) {
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("model name").map(|v| v.trim_start_matches([' ', '\t', ':']).to_owned()))
        .unwrap_or_default();
    let ncpu = std::thread::available_parallelism().map_or(0, std::num::NonZero::get);
    let load = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    eprintln!("engine bench conditions:");
    eprintln!("  machine: {ncpu} cpus ({cpu}), linux {}, loadavg at start {}", kernel.trim(), load.trim());
    eprintln!(
        "  profile: {}",
        if cfg!(debug_assertions) { "debug assertions ON (not a release-like build)" } else { "bench (optimized)" }
    );
    eprintln!(
        "  config: fanout.merge_window_ms={} adaptive.enabled={} max_batch_messages={} \
         limits.must_deliver_room_rate/burst={:e}/{:e} room_rate/burst={:e}/{:e} \
         history.must_deliver={} history.max_age_ms={}",
        cfg.fanout.merge_window_ms,
        cfg.adaptive.enabled,
        cfg.fanout.max_batch_messages,
        cfg.limits.must_deliver_room_rate,
        cfg.limits.must_deliver_room_burst,
        cfg.limits.room_rate,
        cfg.limits.room_burst,
        cfg.history.must_deliver,
        cfg.history.max_age_ms,
    );
    eprintln!(
        "  workload: 1 engine; per iteration every room gets 1 publish (kind=gift, must-deliver, \
         {}-byte body, Reply::None) then 1 poll; clock +{:?} per iteration (synthetic); \
         members: 1 JSON join per room per shard",
        BODY.len(),
        STEP
    );
    eprintln!("  timed: Engine::handle x rooms + Engine::poll; untimed: building commands, emptying out.shard");
    eprintln!(
        "  clock: {clock:?} (ENGINE_BENCH_CLOCK=wall for wall time); an empty read pair costs {:?}, \
         included in every turn",
        clock.overhead()
    );
    eprintln!(
        "  sizes: ShardCmd {} bytes, EngineCmd {} bytes, Delivery {} bytes",
        std::mem::size_of::<ShardCmd>(),
        std::mem::size_of::<EngineCmd>(),
        std::mem::size_of::<edge::bus::Delivery>()
    );
}

fn engine(c: &mut Criterion) {
    let cfg = config();
    let clock = Clock::from_env();
    conditions(&cfg, clock);
    let mut g = c.benchmark_group("engine_flush");
    g.sample_size(20).warm_up_time(Duration::from_secs(1)).measurement_time(Duration::from_secs(3));
    for rooms in ROOMS {
        for shards in SHARDS {
            let mut st = Setup::new(&cfg, rooms, shards);
            let frame = st.sample_frame_len();
            eprintln!("  rooms={rooms} shards={shards}: JSON frame {frame} bytes per flush (one message)");
            let (mut turns, mut timed, mut wall) = (0u64, Duration::ZERO, Duration::ZERO);
            g.throughput(Throughput::Elements(rooms as u64));
            g.bench_function(BenchmarkId::new(format!("rooms_{rooms}"), format!("shards_{shards}")), |b| {
                b.iter_custom(|iters| {
                    let mut total = Duration::ZERO;
                    for _ in 0..iters {
                        let (t, w) = st.turn(clock);
                        total += t;
                        wall += w;
                        turns += 1;
                    }
                    timed += total;
                    total
                });
            });
            eprintln!(
                "  rooms={rooms} shards={shards}: checked {turns} turns, {} flushes, {} deliveries; \
                 timed {:.3} s on {clock:?} over {:.3} s wall ({:.0}% on CPU)",
                turns * rooms as u64,
                turns * (rooms * shards) as u64,
                timed.as_secs_f64(),
                wall.as_secs_f64(),
                100.0 * timed.as_secs_f64() / wall.as_secs_f64().max(1e-9),
            );
        }
    }
    g.finish();
}

criterion_group!(benches, engine);
criterion_main!(benches);
