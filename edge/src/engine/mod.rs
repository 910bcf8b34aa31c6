//! The room engine: where a room's messages get their sequence numbers, pass the upstream
//! limits, are merged within the window, serialized once per encoding in use, wrapped once into
//! a WebSocket frame, and handed to every shard that has members of the room.
//!
//! Rooms are partitioned over engines by a stable hash of their name
//! ([`crate::bus::engine_of`]); each engine runs on a shard thread (pinned to its core) and owns
//! its rooms' seq, window, history, buckets and serialization outright. No thread sits between
//! all publishers and all members.
//!
//! The engine is a deterministic state machine in the style of quinn-proto: the host passes
//! `now` to [`Engine::handle`] and [`Engine::poll`], asks [`Engine::poll_timeout`] when to come
//! back, and ships what the engine wrote into [`Out`] (one vector of commands per shard). It
//! never reads the clock, never blocks and never touches a socket, so its tests drive time.
//!
//! Files, in the order a message meets them: [`room`] (a room's state), `admission` (kind,
//! limits, sampling, numbering), `joins` (join acknowledgements and `since` recovery), `batch`
//! (the pending batch, windows, flush, serialize-once), [`adaptive`] (windows and sampling from
//! demand and backlog), `remote` (Redis mode: order, fills, gaps).

pub mod adaptive;
mod admission;
mod batch;
pub mod host;
pub mod idem;
mod joins;
mod latest;
mod moderation;
mod presence;
#[cfg(test)]
mod proptests;
mod remote;
pub mod room;
#[cfg(test)]
mod tests;

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap, VecDeque};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use crate::bus::policy::{Bucket, HistoryLimits};
use crate::bus::redis::{Bridge, BridgeCmd};
use crate::bus::{Ack, EngineCmd, PendingJoin, Reply, RoomName, RoomStats, ShardCmd};
use crate::config::{AdaptiveConfig, LimitsConfig};
use crate::metrics::BusStats;
use crate::store::{Record, RoomMeta, StoreHandle};

use room::Room;

/// Upper bound on tracked users (rate limits) per edge; idle users are forgotten first.
const MAX_USERS: usize = 1_000_000;
/// Commands queued for one shard beyond which the engine refuses publishes (503, Retry-After):
/// that shard's mailbox is full and its output waits here, so more input would only grow it.
pub const OUT_BOUND: usize = 65_536;
/// The same bound for must-deliver kinds (gifts). A backlog past `OUT_BOUND` is mostly other
/// work (join answers during a storm of moves, droppable batches); gifts are few (admission
/// caps their rate per room) and are what the edge promises, so they are refused only past
/// this larger bound, which still keeps the output finite.
pub const MUST_OUT_BOUND: usize = 4 * OUT_BOUND;
/// After a publish is refused because too many wait for Redis, the room's publishes are all
/// refused for this long (the Retry-After they are given): a batch's messages to the room that
/// follow the refused one are refused too, so a publisher retrying in order keeps its order (a
/// trial saw 359 chat messages accepted after an earlier one of the same batch was refused).
const REDIS_BUSY_FOR: Duration = Duration::from_millis(100);
/// How often idle rooms and users are swept.
const SWEEP_EVERY: Duration = Duration::from_secs(10);

/// The engine's share of the configuration.
#[derive(Debug, Clone)]
pub struct EngineConfig {
    /// How long a room collects messages before it sends them as one frame (`fanout.merge_window_ms`).
    pub window: Duration,
    /// Most messages in one merged frame (`fanout.max_batch_messages`).
    pub max_batch_messages: usize,
    /// Most bytes in one merged frame (`fanout.max_batch_bytes`).
    pub max_batch_bytes: usize,
    /// kind -> must deliver.
    pub kinds: HashMap<String, bool>,
    /// kind -> its index in `Config::latency_kinds` (the per-kind delivery latency's series).
    pub kind_ids: HashMap<String, u16>,
    /// Conflated (latest-state) kinds -> the body field telling entries apart (None: one per
    /// room).
    pub conflate: HashMap<String, Option<String>>,
    /// Per-room and per-user publish limits.
    pub limits: LimitsConfig,
    /// What each room keeps for `since` recovery.
    pub history: HistoryLimits,
    /// Messages replayed to a join without `since` (`history.join_last`).
    pub join_last: usize,
    /// The adaptive merging and sampling settings.
    pub adaptive: AdaptiveConfig,
    /// Rooms idle this long with no member anywhere (and nothing left in history) leave memory.
    pub room_idle: Duration,
    /// Droppable history the edge keeps, all rooms (split evenly over the engines).
    pub max_droppable_bytes: usize,
    /// The store forgets rooms untouched this long (`store.room_ttl_s`).
    pub room_ttl_s: u64,
    /// Online count pushes at most this often (zero: never pushed); in Redis mode also how
    /// often this edge's count is reported per room (one second when pushes are off).
    pub presence_interval: Duration,
    /// A batch carrying only a room's count costs one write per member: at most this many
    /// such writes a second per room (`presence.max_writes_per_s`).
    pub presence_writes_per_s: f64,
    /// Idempotency keys each room remembers: for how long, and how many at most.
    pub idem_ttl: Duration,
    /// How many idempotency keys each room remembers at most.
    pub idem_keys: usize,
}

impl EngineConfig {
    /// Takes the engine's settings out of the validated configuration.
    pub fn from_config(cfg: &crate::config::Config) -> Self {
        Self {
            window: cfg.merge_window(),
            max_batch_messages: cfg.fanout.max_batch_messages,
            max_batch_bytes: cfg.fanout.max_batch_bytes,
            kinds: cfg.kinds.iter().map(|(k, v)| (k.clone(), v.must_deliver)).collect(),
            kind_ids: cfg.latency_kinds().into_iter().zip(0..=u16::MAX).collect(),
            conflate: cfg
                .kinds
                .iter()
                .filter(|(_, v)| v.conflate)
                .map(|(k, v)| (k.clone(), v.conflate_key.clone()))
                .collect(),
            limits: cfg.limits.clone(),
            history: HistoryLimits {
                must_deliver: cfg.history.must_deliver,
                // Droppable history serves only the replay of the last join_last on join.
                droppable: cfg.history.droppable.min(cfg.history.join_last),
                max_age: Duration::from_millis(cfg.history.max_age_ms),
                must_deliver_bytes: cfg.history.must_deliver_bytes,
                droppable_bytes: cfg.history.droppable_bytes,
            },
            max_droppable_bytes: cfg.history.max_droppable_bytes,
            room_ttl_s: cfg.store.room_ttl_s,
            join_last: cfg.history.join_last,
            room_idle: Duration::from_millis(cfg.history.room_idle_ms),
            adaptive: cfg.adaptive.clone(),
            presence_interval: Duration::from_millis(cfg.presence.interval_ms),
            presence_writes_per_s: cfg.presence.max_writes_per_s,
            idem_ttl: Duration::from_secs(cfg.ingest.idempotency_ttl_s),
            idem_keys: cfg.ingest.idempotency_keys,
        }
    }
}

/// What an engine has for each shard: appended during a turn, shipped by the host (one mail
/// per shard per turn). A shard whose mailbox is full keeps its vector here until it has room.
pub struct Out {
    /// Commands for each shard, indexed by shard id.
    pub shard: Vec<Vec<ShardCmd>>,
}

impl Out {
    /// Empty vectors for `shards` shards.
    pub fn new(shards: usize) -> Self {
        Self { shard: (0..shards).map(|_| Vec::new()).collect() }
    }

    fn push(&mut self, shard: u16, cmd: ShardCmd) {
        if let Some(v) = self.shard.get_mut(usize::from(shard)) {
            v.push(cmd);
        }
    }

    /// The longest queue waiting for one shard.
    pub fn backlog(&self) -> usize {
        self.shard.iter().map(Vec::len).max().unwrap_or(0)
    }
}

/// What every engine and shard shares: each shard's send backlog in bytes (written by the
/// shards each tick, read by every engine's adaptive merging: shared atomics rather than S x S
/// messages), and the edge's room count, so `limits.max_rooms` holds for the edge as a whole
/// however the rooms hash over engines (one atomic per room created or forgotten).
pub struct LoadBoard {
    backlog: Box<[AtomicUsize]>,
    rooms: AtomicUsize,
    /// Per shard: measured capacity (frames per CPU-second, f64 bits; 0 until measured) and the
    /// p99 of its must-deliver delivery latency over the last second (µs; 0: no sample).
    capacity: Box<[AtomicU64]>,
    /// Per shard: the share of the CPU it gets when it wants it (f64 bits).
    share: Box<[AtomicU64]>,
    busy: Box<[AtomicU64]>,
    gift_p99_us: Box<[AtomicU64]>,
    /// Per engine: members of its hot rooms (the latency controller splits the frame budget
    /// over every hot member of the edge).
    hot_members: Box<[AtomicU64]>,
    /// CPUs the shards may run on: with more shards than CPUs (10^5 connections need several
    /// rings: each ring's descriptor table is bounded by RLIMIT_NOFILE), they share them, and
    /// per-shard figures alone would say "a sixth busy" of a machine that is full.
    cpus: usize,
}

impl LoadBoard {
    /// A board for `shards` shards, all backlogs at zero.
    pub fn new(shards: usize) -> Self {
        let zeros = || (0..shards).map(|_| AtomicU64::new(0)).collect();
        Self {
            backlog: (0..shards).map(|_| AtomicUsize::new(0)).collect(),
            rooms: AtomicUsize::new(0),
            capacity: zeros(),
            share: zeros(),
            busy: zeros(),
            gift_p99_us: zeros(),
            hot_members: zeros(),
            cpus: shards.max(1),
        }
    }

    /// The CPUs the shards share (the process's allowed CPUs, `available_parallelism`).
    pub fn with_cpus(mut self, cpus: usize) -> Self {
        self.cpus = cpus.max(1);
        self
    }

    /// CPUs the shards can use at once.
    fn usable_cpus(&self) -> f64 {
        (self.capacity.len().min(self.cpus)).max(1) as f64
    }

    /// A shard's measured capacity (frames per CPU-second), the share of the CPU it gets when it
    /// wants it, its demand (busy share) and last-second gift p99.
    pub fn set_delivery(&self, shard: u16, frames_per_cpu_s: f64, share: f64, busy: f64, gift_p99: Option<Duration>) {
        let i = usize::from(shard);
        if let Some(a) = self.capacity.get(i) {
            a.store(frames_per_cpu_s.to_bits(), Ordering::Relaxed);
        }
        if let Some(a) = self.share.get(i) {
            a.store(share.clamp(0.0, 1.0).to_bits(), Ordering::Relaxed);
        }
        if let Some(a) = self.busy.get(i) {
            a.store(busy.to_bits(), Ordering::Relaxed);
        }
        if let Some(a) = self.gift_p99_us.get(i) {
            a.store(gift_p99.map_or(0, |d| d.as_micros() as u64), Ordering::Relaxed);
        }
    }

    /// Frames per second the edge's shards can write if they spent on it all the CPU they can
    /// get (0 until any shard has measured): each shard's rate per CPU-second times the share of
    /// the CPU it gets when it wants it (other processes, and sibling shards on the same CPU,
    /// take the rest), summed; never more than the CPUs the shards can use at once allow.
    pub fn capacity(&self) -> f64 {
        let load = |a: &AtomicU64| f64::from_bits(a.load(Ordering::Relaxed));
        let (mut sum, mut raw, mut measured) = (0.0, 0.0, 0usize);
        for (c, s) in self.capacity.iter().zip(self.share.iter()) {
            let fps = load(c);
            if fps > 0.0 {
                let share = if load(s) > 0.0 { load(s) } else { 1.0 };
                sum += fps * share;
                raw += fps;
                measured += 1;
            }
        }
        if measured == 0 {
            return 0.0;
        }
        sum.min(raw / measured as f64 * self.usable_cpus())
    }

    /// How busy the edge is: the busiest shard's share of its CPU, or, when shards share CPUs,
    /// their total over the CPUs if that is more.
    pub fn busy(&self) -> f64 {
        let each = self.busy.iter().map(|a| f64::from_bits(a.load(Ordering::Relaxed)));
        let (max, sum) = each.fold((0.0f64, 0.0f64), |(m, s), b| (m.max(b), s + b));
        max.max((sum / self.usable_cpus()).min(1.0))
    }

    /// The worst shard's gift p99 over the last second (None: no gift was delivered).
    pub fn gift_p99(&self) -> Option<Duration> {
        let us = self.gift_p99_us.iter().map(|a| a.load(Ordering::Relaxed)).max().unwrap_or(0);
        (us > 0).then(|| Duration::from_micros(us))
    }

    fn set_hot_members(&self, engine: u16, n: u64) {
        if let Some(a) = self.hot_members.get(usize::from(engine)) {
            a.store(n, Ordering::Relaxed);
        }
    }

    fn hot_members(&self) -> u64 {
        self.hot_members.iter().map(|a| a.load(Ordering::Relaxed)).sum()
    }

    /// Records shard `shard`'s send backlog, in bytes, as of its last tick.
    pub fn set(&self, shard: u16, bytes: usize) {
        if let Some(a) = self.backlog.get(usize::from(shard)) {
            a.store(bytes, Ordering::Relaxed);
        }
    }

    /// The largest send backlog of any shard, in bytes.
    pub fn max(&self) -> usize {
        self.backlog.iter().map(|a| a.load(Ordering::Relaxed)).max().unwrap_or(0)
    }

    /// Takes a room slot if the edge holds fewer than `max` rooms.
    fn try_add_room(&self, max: usize) -> bool {
        self.rooms.fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| (n < max).then_some(n + 1)).is_ok()
    }

    fn remove_rooms(&self, n: usize) {
        self.rooms.fetch_sub(n, Ordering::AcqRel);
    }
}

/// One engine: the rooms that hash to it.
pub struct Engine {
    id: u16,
    /// Engines on this edge (bounds on rooms and users are split evenly among them).
    engines: usize,
    shards: usize,
    cfg: EngineConfig,
    stats: BusStats,
    rooms: HashMap<RoomName, Room>,
    users: HashMap<String, Bucket>,
    timers: BinaryHeap<Reverse<(Instant, RoomName)>>,
    /// Presence steps due (online count pushes and reports), by time.
    presence_timers: BinaryHeap<Reverse<(Instant, RoomName)>>,
    immediate: Vec<RoomName>,
    last_sweep: Instant,
    load: Arc<LoadBoard>,
    /// Adaptive level: hot rooms use `base << level`.
    level: u32,
    max_level: u32,
    last_adapt: Instant,
    /// Level at max and still behind: sample droppable messages.
    sampling: bool,
    /// The latency controller (adaptive.rs): the share of measured capacity hot rooms' frames
    /// may use, the factor on the chat deliveries budget, the frame budget they give (frames/s
    /// for the whole edge; None until the shards have measured), and when it last moved.
    rho: f64,
    chat_factor: f64,
    budget: Option<f64>,
    /// Whether the budget may narrow a hot room's window below the configured rule: only while
    /// gifts are being measured and the shards are not saturated (adaptive.rs).
    narrow: bool,
    last_control: Instant,
    /// The configured room_deliveries_per_s (the controller scales the one in `cfg`).
    deliveries_base: f64,
    /// Redis mode: the bridge to Redis, and whether Redis is reachable.
    remote: Option<Bridge>,
    remote_up: bool,
    /// Rooms with parked joins.
    parked_rooms: Vec<RoomName>,
    /// Rooms with joins waiting for their sync (some may have been answered since).
    syncing_rooms: Vec<RoomName>,
    /// Joins sent back for want of their room's sync, for the rate-limited log line.
    sent_back: joins::SentBackLog,
    /// Wall clock at `epoch` (µs since the Unix epoch): message timestamps are
    /// `wall_at_epoch + (now - epoch)`, so the engine never reads a clock itself.
    epoch: Instant,
    wall_at_epoch: u64,
    /// Epochs made so far (an input of the next).
    epochs_made: u64,
    /// The host's `now` at the latest `handle`/`poll` (flushes stamp their deliveries with it).
    now: Instant,
    /// Bytes of droppable history held by this engine's rooms (exact after each sweep, an
    /// overestimate between: trims by age are counted at the next sweep).
    droppable_held: usize,
    /// The durable store (single-node mode, `store.enabled`): this turn's records, the token
    /// of the last batch sent to it and of the last it made durable, the must-deliver
    /// acknowledgements waiting for their batch, and the rooms whose flush or joins wait.
    store: Option<StoreHandle>,
    store_out: Vec<Record>,
    store_sent: u64,
    store_durable: u64,
    held: VecDeque<(u64, Reply, RoomName, Ack)>,
    /// Moderators' deletes waiting for their tombstone to be durable.
    held_deletes: VecDeque<(u64, crate::bus::DeleteReply, crate::bus::Deleted)>,
    /// Rooms a publish was refused for a full Redis queue, until when their publishes are all
    /// refused (see [`REDIS_BUSY_FOR`]).
    redis_busy: HashMap<RoomName, Instant>,
    store_blocked: Vec<RoomName>,
}

impl Engine {
    /// Engine `id` of `engines`, for an edge of `shards` shards. `now` and `wall_us` read the
    /// two clocks once, at the same moment: message timestamps derive from them.
    #[expect(clippy::too_many_arguments, reason = "each is a separate input the host owns; none has a default")]
    pub fn new(
        id: u16,
        engines: usize,
        shards: usize,
        cfg: EngineConfig,
        stats: BusStats,
        load: Arc<LoadBoard>,
        now: Instant,
        wall_us: u64,
    ) -> Self {
        let max_level = adaptive::max_level(&cfg);
        Self {
            id,
            engines: engines.max(1),
            shards,
            stats,
            rooms: HashMap::new(),
            users: HashMap::new(),
            timers: BinaryHeap::new(),
            presence_timers: BinaryHeap::new(),
            immediate: Vec::new(),
            last_sweep: now,
            load,
            level: 0,
            max_level,
            last_adapt: now,
            rho: adaptive::RHO_START,
            chat_factor: 1.0,
            budget: None,
            narrow: false,
            last_control: now,
            deliveries_base: cfg.adaptive.room_deliveries_per_s,
            sampling: false,
            remote: None,
            remote_up: false,
            parked_rooms: Vec::new(),
            syncing_rooms: Vec::new(),
            sent_back: joins::SentBackLog::default(),
            epoch: now,
            wall_at_epoch: wall_us,
            epochs_made: 0,
            now,
            droppable_held: 0,
            store: None,
            store_out: Vec::new(),
            store_sent: 0,
            store_durable: 0,
            held: VecDeque::new(),
            held_deletes: VecDeque::new(),
            redis_busy: HashMap::new(),
            store_blocked: Vec::new(),
            cfg,
        }
    }

    /// Single-node mode with a store: rooms' numbering and must-deliver history are kept there.
    pub fn with_store(mut self, store: StoreHandle) -> Self {
        self.store = Some(store);
        self
    }

    /// Redis mode: seqs come from Redis through `bridge`.
    pub fn with_remote(mut self, bridge: Bridge) -> Self {
        self.remote = Some(bridge);
        self
    }

    fn refuse_redis_busy(&mut self, out: &mut Out, reply: crate::bus::Reply, room: &RoomName) {
        self.stats.publish_rejected.with_label_values(&["engine_busy"]).inc();
        self.stats.engine_busy.with_label_values(&["redis_queue"]).inc();
        let busy = crate::bus::PublishError::Busy { retry_after_ms: REDIS_BUSY_FOR.as_millis() as u64 };
        self.answer(out, reply, room, Err(busy));
    }

    /// This engine's id: the rooms that hash to it are its own.
    pub fn id(&self) -> u16 {
        self.id
    }

    /// A fresh epoch: unique across rooms, engines and restarts (the wall clock, the engine and
    /// a counter, mixed), never 0.
    fn new_epoch(&mut self, now: Instant) -> crate::bus::Epoch {
        self.epochs_made += 1;
        let mut x =
            self.wall_us(now) ^ (u64::from(self.id) << 52) ^ self.epochs_made.wrapping_mul(0x9e37_79b9_7f4a_7c15);
        // splitmix64's finalizer: neighbouring inputs give unrelated epochs.
        x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        (x ^ (x >> 31)).max(1)
    }

    fn wall_us(&self, now: Instant) -> u64 {
        self.wall_at_epoch + now.saturating_duration_since(self.epoch).as_micros() as u64
    }

    /// Handles one command. Whatever it produces for shards is appended to `out`.
    pub fn handle(&mut self, cmd: EngineCmd, now: Instant, out: &mut Out) {
        self.now = now;
        match cmd {
            EngineCmd::Publish { room, msg, reply } => {
                let must = self.cfg.kinds.get(&msg.kind).copied().unwrap_or(false);
                if out.backlog() > if must { MUST_OUT_BOUND } else { OUT_BOUND } {
                    self.stats.publish_rejected.with_label_values(&["engine_busy"]).inc();
                    self.stats.engine_busy.with_label_values(&["output_backlog"]).inc();
                    self.answer(out, reply, &room, Err(crate::bus::PublishError::Busy { retry_after_ms: 100 }));
                    return;
                }
                match self.remote.clone() {
                    None => {
                        let Some(reply) = self.replay(&room, &msg, reply, now, out) else { return };
                        let refusal = self.store.as_ref().filter(|_| must).and_then(StoreHandle::refusal);
                        if let Some(e) = refusal {
                            let reason = if matches!(e, crate::bus::PublishError::StoreFull) {
                                "store_full"
                            } else {
                                "store_unavailable"
                            };
                            self.stats.publish_rejected.with_label_values(&[reason]).inc();
                            self.answer(out, reply, &room, Err(e));
                            return;
                        }
                        match self.publish(&room, *msg, now, out) {
                            // Acknowledged once stored, as the fsync policy says.
                            Ok(ack) if must && self.store.is_some() => {
                                self.held.push_back((self.store_sent + 1, reply, room, ack));
                            }
                            result => self.answer(out, reply, &room, result),
                        }
                    }
                    Some(bridge) => match self.admit(&room, &msg, now) {
                        Err(e) => self.answer(out, reply, &room, Err(e)),
                        Ok(_) if !self.remote_up => {
                            self.stats.publish_rejected.with_label_values(&["bus_unavailable"]).inc();
                            self.answer(out, reply, &room, Err(crate::bus::PublishError::BusUnavailable));
                        }
                        Ok(_) if self.redis_busy.get(&room).is_some_and(|&until| now < until) => {
                            self.refuse_redis_busy(out, reply, &room);
                        }
                        Ok(must_deliver) => {
                            let conflate = self
                                .cfg
                                .conflate
                                .get(&msg.kind)
                                .map(|field| latest::entry_key(field.as_deref(), &msg.body));
                            let cmd =
                                BridgeCmd::Publish { room, msg: *msg, must_deliver, conflate, reply, permit: None };
                            if let Err(BridgeCmd::Publish { room, reply, .. }) = bridge.send(cmd) {
                                // Too many publishes waiting for Redis already: this one and
                                // the room's next for the Retry-After it is given, so a
                                // batch's later message does not overtake it.
                                self.redis_busy.retain(|_, until| now < *until);
                                self.redis_busy.insert(room.clone(), now + REDIS_BUSY_FOR);
                                self.refuse_redis_busy(out, reply, &room);
                            }
                        }
                    },
                }
            }
            EngineCmd::Join { room, shard, slot, generation, proto, since } => {
                self.join(room, PendingJoin { shard, slot, generation, proto, reset: None }, since, now, out);
            }
            EngineCmd::Left { room } => {
                if let Some(r) = self.rooms.get_mut(&room) {
                    r.members = r.members.saturating_sub(1);
                    self.presence_changed(&room, now);
                }
            }
            EngineCmd::Online { room, total } => {
                if let Some(r) = self.rooms.get_mut(&room)
                    && r.cluster_online != Some(total)
                {
                    r.cluster_online = Some(total);
                    self.presence_changed(&room, now);
                }
            }
            EngineCmd::NoInterest { room, shard, proto } => self.no_interest(&room, shard, proto, now),
            EngineCmd::Remote { room, msg, must_deliver, epoch } => {
                self.remote_msg(&room, *msg, must_deliver, epoch, now, out);
            }
            EngineCmd::Synced { room, seq, epoch, latest } => self.synced(&room, seq, epoch, latest, now, out),
            EngineCmd::Filled { room, from, to, messages, ok } => self.filled(&room, from, to, messages, ok, now, out),
            EngineCmd::Recovered { room, since, upto, messages, evicted_upto, ok } => {
                self.recovered(&room, since, upto, messages, evicted_upto, ok, now, out);
            }
            EngineCmd::PublishDone { room, reply, result } => {
                match result {
                    Err(crate::bus::PublishError::BusUnavailable) => {
                        self.stats.publish_rejected.with_label_values(&["bus_unavailable"]).inc();
                    }
                    Err(crate::bus::PublishError::NotReplicated { .. }) => {
                        self.stats.publish_rejected.with_label_values(&["not_replicated"]).inc();
                    }
                    _ => {}
                }
                self.answer(out, reply, &room, result);
            }
            EngineCmd::Redis { up } => {
                if up != self.remote_up && self.id == 0 {
                    tracing::info!(up, "redis bus state");
                }
                self.remote_up = up;
            }
            EngineCmd::Durable { token } => self.durable(token, now, out),
            EngineCmd::StoreFailed { token } => self.store_failed(token, now, out),
            EngineCmd::RoomStats { room, reply } => {
                let _ = reply.send(self.room_stats(&room, now));
            }
            EngineCmd::TopRooms { n, reply } => {
                let _ = reply.send(self.top_rooms(n, now));
            }
            EngineCmd::Delete { room, seq, reply } => self.delete_message(room, seq, reply, now, out),
        }
    }

    /// Runs what is due at `now`: batches whose window closed, parked joins and joins waiting
    /// for a sync whose wait is over, the adaptive step and the idle sweep.
    pub fn poll(&mut self, now: Instant, out: &mut Out) {
        self.now = now;
        self.flush_immediate(out);
        self.flush_due(now, out);
        self.presence_due(now, out);
        self.expire_parked(now, out);
        self.expire_waiting(now, out);
        self.adapt(now);
        self.control(now);
        self.sweep(now);
        self.send_store();
    }

    /// Hands this turn's records to the store (one batch per turn, whatever it holds).
    fn send_store(&mut self) {
        if self.store_out.is_empty() {
            return;
        }
        if let Some(store) = &self.store {
            self.store_sent += 1;
            store.send(self.store_sent, std::mem::take(&mut self.store_out));
        }
    }

    /// The store made batches up to `token` durable: acknowledge what waited for them, deliver
    /// the batches and answer the joins that did.
    fn durable(&mut self, token: u64, now: Instant, out: &mut Out) {
        self.store_durable = self.store_durable.max(token);
        while self.held.front().is_some_and(|(t, ..)| *t <= self.store_durable) {
            let (_, reply, room, ack) = self.held.pop_front().expect("peeked");
            self.answer(out, reply, &room, Ok(ack));
        }
        while self.held_deletes.front().is_some_and(|(t, ..)| *t <= self.store_durable) {
            let (_, reply, done) = self.held_deletes.pop_front().expect("peeked");
            let _ = reply.send(Ok(done));
        }
        let durable = self.store_durable;
        let (ready, wait): (Vec<RoomName>, Vec<RoomName>) = std::mem::take(&mut self.store_blocked)
            .into_iter()
            .partition(|room| self.rooms.get(room).is_none_or(|r| r.wait_token <= durable));
        self.store_blocked = wait;
        for room in ready {
            let Some(r) = self.rooms.get_mut(&room) else { continue };
            let flush = std::mem::take(&mut r.flush_after_store);
            let joins = std::mem::take(&mut r.joins_after_store);
            if flush {
                self.flush(&room, out);
            }
            for (join, since) in joins {
                self.answer_join(&room, join, since, now, out);
            }
        }
    }

    /// The store could not write this engine's batches up to `token` (a full disk): nothing
    /// waits for them any more. Publishes held for them are refused (503) and their messages
    /// taken back (the store turns them into deletions); what rooms numbered past their
    /// durable reservation is shed (a crash could number it again), counted; the rest of their
    /// batches goes out and their joins are answered. Held until the disk has room, a gift's
    /// publisher would get no answer and its room would deliver nothing, for hours maybe.
    fn store_failed(&mut self, token: u64, now: Instant, out: &mut Out) {
        let durable = self.store_durable;
        while self.held.front().is_some_and(|(t, ..)| *t <= token) {
            let (_, reply, room, ack) = self.held.pop_front().expect("peeked");
            self.stats.publish_rejected.with_label_values(&["store_unavailable"]).inc();
            if !ack.replayed
                && let Some(r) = self.rooms.get_mut(&room)
            {
                r.take_back(|seq| seq == ack.seq);
            }
            self.answer(out, reply, &room, Err(crate::bus::PublishError::StoreUnavailable));
        }
        let stats = &self.stats;
        for r in self.rooms.values_mut() {
            if r.wait_token <= durable || r.wait_token > token {
                continue;
            }
            let hi = r.durable_hi(durable);
            for kind in r.take_back(|seq| seq > hi) {
                stats.messages_dropped.with_label_values(&[kind.as_str(), "store_unavailable"]).inc();
            }
            r.wait_token = durable;
            if r.pending.is_empty() {
                r.flushed_seq = r.seq;
            }
        }
        self.durable(durable, now, out);
    }

    /// Whether `room` has records the store has not made durable yet (its deliveries and joins
    /// wait). Registers the room to be resumed when they are.
    fn waits_for_store(&mut self, room: &RoomName) -> bool {
        let durable = self.store_durable;
        let Some(r) = self.rooms.get(room) else { return false };
        if self.store.is_none() || r.wait_token <= durable {
            return false;
        }
        if !r.flush_after_store && r.joins_after_store.is_empty() {
            self.store_blocked.push(room.clone());
        }
        true
    }

    /// What the store keeps of a room's numbering now.
    fn meta_of(&self, r: &Room, now: Instant) -> RoomMeta {
        RoomMeta {
            epoch: r.epoch,
            seq_hi: r.seq_hi,
            evicted_upto: r.history.must_evicted_upto,
            touched_s: self.wall_us(now) / 1_000_000,
        }
    }

    /// When [`Engine::poll`] has something to do next (None: only new commands matter). The
    /// adaptive step and the sweep ride on the host's own tick (at least every 100 ms).
    pub fn poll_timeout(&self) -> Option<Instant> {
        let mut t = self.timers.peek().map(|Reverse((d, _))| *d);
        if let Some(Reverse((p, _))) = self.presence_timers.peek() {
            t = Some(t.map_or(*p, |t| t.min(*p)));
        }
        if !self.immediate.is_empty() {
            t = Some(self.epoch);
        }
        for room in &self.parked_rooms {
            if let Some(p) = self.rooms.get(room).and_then(|r| r.parked.iter().map(|&(_, _, at)| at).min()) {
                t = Some(t.map_or(p, |t| t.min(p)));
            }
        }
        for room in &self.syncing_rooms {
            if let Some(&(_, _, p)) = self.rooms.get(room).and_then(|r| r.waiting.first()) {
                t = Some(t.map_or(p, |t| t.min(p)));
            }
        }
        t
    }

    /// Hands every waiting batch out (the edge is stopping). With a store, each room's exact
    /// seq is written first (so a clean restart numbers on without skipping) and the engine
    /// waits (bounded) until the store has it all, then acknowledges what was held.
    pub fn shutdown(&mut self, now: Instant, out: &mut Out) {
        self.now = now;
        if let Some(store) = self.store.clone() {
            let names: Vec<RoomName> = self.rooms.keys().cloned().collect();
            for n in &names {
                let Some(r) = self.rooms.get_mut(n) else { continue };
                r.seq_hi = r.seq;
                let meta = self.meta_of(&self.rooms[n], now);
                self.store_out.push(Record::Meta(n.clone(), meta));
            }
            self.send_store();
            let durable = store.wait_durable(self.store_sent, std::time::Duration::from_secs(5));
            if durable < self.store_sent {
                tracing::error!(engine = self.id, "the store did not confirm the last records in time");
            }
            self.durable(durable, now, out);
        }
        let names: Vec<RoomName> = self.rooms.keys().cloned().collect();
        for n in names {
            self.flush(&n, out);
        }
    }

    /// The last member on shard `shard` wanting `proto` frames of `room` is gone.
    fn no_interest(&mut self, room: &RoomName, shard: u16, proto: roomcast_proto::Subprotocol, now: Instant) {
        let Some(r) = self.rooms.get_mut(room) else { return };
        r.interest[proto.index()].remove(shard);
        r.last_active = now;
        if r.interested() {
            return;
        }
        // Nobody to send the waiting batch to: history keeps it, and everything up to the
        // room's seq counts as handed out. Left pending, it would go out after a later join had
        // already been given it from history.
        r.pending.clear();
        r.pending_bytes = 0;
        r.deadline = None;
        r.flushed_seq = r.seq;
        // No member here any more: out of the room's online total now (not at the next
        // presence step: the room may leave memory first), and no announcement reaches this
        // edge once it unsubscribes.
        r.cluster_online = None;
        r.online_shown = None;
        if r.reported > 0
            && let Some(bridge) = &self.remote
        {
            r.reported = 0;
            r.reported_at = Some(now);
            let _ = bridge.send(BridgeCmd::Occupancy { room: room.clone(), count: 0 });
        }
        // A room that never had a message (joins only) is forgotten at once: clients cannot
        // keep rooms alive, nor fill `limits.max_rooms`, by joining and leaving.
        let unused = r.seq == 0
            && r.history.len() == (0, 0)
            && r.waiting.is_empty()
            && r.parked.is_empty()
            && r.recovery.is_idle()
            && r.joins_after_store.is_empty()
            && r.wait_token <= self.store_durable;
        if unused {
            if let Some(bridge) = &self.remote {
                let _ = bridge.send(BridgeCmd::Unsubscribe(room.clone()));
            }
            self.rooms.remove(room);
            self.load.remove_rooms(1);
            self.stats.rooms.dec();
            return;
        }
        if let Some(bridge) = &self.remote {
            // No member left here: stop receiving the room. Local history would have a hole
            // from now on, so it is dropped with the subscription.
            let _ = bridge.send(BridgeCmd::Unsubscribe(room.clone()));
            r.synced = false;
            r.history = crate::bus::policy::History::default();
            r.ahead.clear();
        }
    }

    /// Creates the room if there is room for it.
    /// Creates the room if there is room for it: up to `limits.max_rooms`, or up to
    /// `limits.max_rooms_by_joins` when a client's join would create it.
    fn ensure_room(&mut self, room: &RoomName, now: Instant, by_join: bool) -> Result<(), crate::bus::PublishError> {
        if self.rooms.contains_key(room) {
            return Ok(());
        }
        let max = if by_join { self.cfg.limits.rooms_by_joins() } else { self.cfg.limits.max_rooms };
        if !self.load.try_add_room(max) {
            return Err(crate::bus::PublishError::TooManyRooms(max));
        }
        let mut r = Room::new(room.clone(), self.shards, now, &self.cfg);
        r.synced = self.remote.is_none();
        if self.remote.is_none() {
            let loaded = match &self.store {
                Some(store) => match store.load(room) {
                    Ok(l) => l,
                    Err(e) => {
                        // Its numbering is unknown: making it anew could reuse seqs.
                        self.load.remove_rooms(1);
                        tracing::error!(room = %room, error = %e, "cannot read the room from the store");
                        return Err(crate::bus::PublishError::StoreUnavailable);
                    }
                },
                None => None,
            };
            let renumber = self.store.as_ref().and_then(StoreHandle::renumber_before);
            match loaded {
                // Written before an unclean stop and a reboot, under a lossy policy: what it
                // holds may lack acknowledged gifts. A new epoch (clients are reset, never told
                // a silent story), numbering above every seq handed out, no history.
                Some(l) if renumber.is_some_and(|t| l.meta.touched_s < t) => {
                    r.epoch = self.new_epoch(now);
                    r.seq = l.meta.seq_hi;
                    r.flushed_seq = l.meta.seq_hi;
                    r.seq_hi = l.meta.seq_hi;
                    r.history.must_evicted_upto = l.meta.seq_hi;
                    r.stored_evicted = l.meta.seq_hi;
                    let meta = self.meta_of(&r, now);
                    self.store_out.push(Record::Meta(room.clone(), meta));
                }
                Some(l) => {
                    // The numbering continues after whatever may have been handed out.
                    r.epoch = l.meta.epoch;
                    r.seq = l.meta.seq_hi;
                    r.flushed_seq = l.meta.seq_hi;
                    r.seq_hi = l.meta.seq_hi;
                    r.stored_evicted = l.meta.evicted_upto;
                    r.meta_s = l.meta.touched_s;
                    let wall = self.wall_us(now);
                    // The keys of publishes still within the idempotency window, as if made
                    // at their time.
                    let ttl = self.cfg.idem_ttl;
                    for (seq, key) in l.keys {
                        let Ok(i) = l.messages.binary_search_by_key(&seq, |m| m.seq) else { continue };
                        let m = &l.messages[i];
                        let age = Duration::from_micros(wall.saturating_sub(m.ts_us));
                        if age < ttl {
                            let ack = crate::bus::Ack { seq, ts_us: m.ts_us, replayed: false };
                            let at = now.checked_sub(age).unwrap_or(now);
                            r.idem.insert(key, ack, at, self.cfg.idem_keys);
                        }
                    }
                    r.history.restore(l.messages, l.meta.evicted_upto, now, wall, &self.cfg.history);
                    self.stats.rooms_restored.inc();
                }
                // Written to the store with its first message (a room nobody publishes to
                // costs the disk nothing: joins alone cannot grow it).
                None => r.epoch = self.new_epoch(now),
            }
        }
        self.rooms.insert(room.clone(), r);
        self.stats.rooms.inc();
        Ok(())
    }

    /// This engine's `n` largest rooms by members (a partial selection: no full sort of many
    /// rooms once a second).
    fn top_rooms(&self, n: usize, now: Instant) -> Vec<crate::bus::RoomBrief> {
        let mut rooms: Vec<&Room> = self.rooms.values().collect();
        if n == 0 {
            return Vec::new();
        }
        if rooms.len() > n {
            rooms.select_nth_unstable_by(n - 1, |a, b| b.members.cmp(&a.members));
            rooms.truncate(n);
        }
        rooms
            .into_iter()
            .map(|r| {
                let rate = r.current_rate(now);
                crate::bus::RoomBrief {
                    room: r.name.to_string(),
                    members: r.members,
                    publish_rate: rate,
                    window_ms: self.window_of(rate, r.members).as_millis() as u64,
                    sampling_visible_rate: self.sampling_of(r, rate),
                    seq: r.seq,
                }
            })
            .collect()
    }

    /// The droppable messages a second the room shows while it is sampled (None: not sampled).
    fn sampling_of(&self, r: &room::Room, rate: f64) -> Option<f64> {
        ((self.sampling || r.demand_sampling) && rate >= room::HOT_ROOM_RATE)
            .then(|| adaptive::visible_rate(&self.cfg.adaptive, r.members))
    }

    fn room_stats(&self, room: &str, now: Instant) -> Option<RoomStats> {
        let r = self.rooms.get(room)?;
        let (md, dr) = r.history.len();
        let rate = r.current_rate(now);
        Some(RoomStats {
            room: r.name.to_string(),
            epoch: crate::bus::epoch_text(r.epoch),
            seq: r.seq,
            flushed_seq: r.flushed_seq,
            shards_json: r.interest[0].len(),
            shards_rkyv: r.interest[1].len(),
            shards_sse: r.interest[2].len(),
            window_ms: self.window_of(rate, r.members).as_millis() as u64,
            sampling_visible_rate: self.sampling_of(r, rate),
            members: r.members,
            online: r.online(),
            history_must_deliver: md,
            history_droppable: dr,
            history_evicted_upto: r.history.must_evicted_upto,
            publish_rate: rate,
        })
    }

    fn sweep(&mut self, now: Instant) {
        if now.saturating_duration_since(self.last_sweep) < SWEEP_EVERY.min(self.cfg.room_idle) {
            return;
        }
        self.last_sweep = now;
        let lim = self.cfg.history;
        let before = self.rooms.len();
        let durable = self.store_durable;
        let mut droppable_held = 0;
        let stored = self.store.is_some();
        let touched_s = self.wall_us(now) / 1_000_000;
        let idle = self.cfg.room_idle;
        let refresh_s = self.cfg.room_ttl_s / 4;
        let idem_ttl = self.cfg.idem_ttl;
        let store_out = &mut self.store_out;
        self.rooms.retain(|name, r| {
            r.history.trim(now, &lim);
            // A numbered room in memory is alive, however quiet: its record is touched well
            // before the store's room_ttl_s would forget it under a live room.
            let stale = r.seq > 0 && touched_s.saturating_sub(r.meta_s) > refresh_s;
            if stored && (r.history.must_evicted_upto > r.stored_evicted || stale) {
                r.meta_s = touched_s;
                // The store drops what history no longer holds.
                r.stored_evicted = r.history.must_evicted_upto;
                let meta = RoomMeta { epoch: r.epoch, seq_hi: r.seq_hi, evicted_upto: r.stored_evicted, touched_s };
                store_out.push(Record::Meta(name.clone(), meta));
            }
            // A room leaves memory only once the store has all of it; its exact seq is written
            // as it goes, so its numbering continues without a skip when it comes back.
            droppable_held += r.history.droppable_bytes;
            let keep = r.interested()
                || !r.pending.is_empty()
                || r.history.len() != (0, 0)
                || r.wait_token > durable
                || now.saturating_duration_since(r.last_active) < idle
                || r.idem.live(now, idem_ttl);
            if !keep && stored && r.seq_hi > r.seq {
                let meta = RoomMeta { epoch: r.epoch, seq_hi: r.seq, evicted_upto: r.stored_evicted, touched_s };
                store_out.push(Record::Meta(name.clone(), meta));
            }
            keep
        });
        self.droppable_held = droppable_held;
        let (rate, burst) = (self.cfg.limits.user_rate, self.cfg.limits.user_burst);
        self.users.retain(|_, b| !b.is_full(rate, burst, now));
        let forgotten = before - self.rooms.len();
        self.load.remove_rooms(forgotten);
        self.stats.rooms.sub(forgotten as i64);
    }
}
