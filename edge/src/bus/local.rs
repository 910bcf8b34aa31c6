//! The in-process bus: one thread that owns every room's publish state.
//!
//! Per room it keeps the next seq, the last seq flushed to members, which shards want which
//! encoding (a bit per shard), the messages waiting for the current merge window, the bounded
//! history for `since` recovery, and the token buckets of the upstream limits. A flush
//! serializes the batch once per encoding that some shard wants, wraps it into one frame and
//! sends one `Arc<Delivery>` to each interested shard: no per-member work happens here.
//!
//! Policy, in the order a publish meets it:
//! 1. the kind must be configured (else 400);
//! 2. must-deliver kinds: the room's must-deliver bucket, which *rejects* (429) when empty: the
//!    publisher retries, nothing is silently lost;
//! 3. droppable kinds: the room bucket and the user bucket drop (429, counted), and when the
//!    room's window is at its widest and shards are still behind, sampling keeps at most
//!    `visible_rate` per second (the rest answered `sampled`, counted);
//! 4. a seq and a timestamp; history; the pending batch.
//!
//! Adaptive merging: shards report their send backlog every tick. While the largest backlog is
//! above the high-water mark, the window of hot rooms (at least one message per base window)
//! doubles, up to `adaptive.max_window_ms`; below the low-water mark it halves back.

use std::cmp::Reverse;
use std::collections::{BTreeMap, BinaryHeap, HashMap};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use crossbeam_channel::{Receiver, RecvTimeoutError};
use roomcast_proto::Subprotocol;
use roomcast_proto::envelope::{self, PushMessage, ServerMsg};

use super::policy::{Bucket, History, HistoryLimits};
use super::redis::{Bridge, BridgeCmd};
use super::{
    Ack, BusCmd, Delivery, Mailbox, MustDeliver, NewMessage, PendingJoin, PublishError, Reply, RoomName, RoomStats,
    ShardCmd, frame, now_us,
};
use crate::config::{AdaptiveConfig, LimitsConfig};
use crate::metrics::BusStats;

/// Rooms idle this long with no member anywhere (and nothing left in history) are forgotten.
const ROOM_IDLE_TTL: Duration = Duration::from_secs(600);
/// Upper bound on rooms, so publishers cannot grow memory without limit.
pub const MAX_ROOMS: usize = 1_000_000;
/// Upper bound on tracked users (rate limits); idle users are forgotten first.
const MAX_USERS: usize = 1_000_000;
/// Commands handled before flushing due rooms, so a flood cannot starve the timers.
const MAX_CMDS_PER_TURN: usize = 4096;
/// The adaptive level moves at most this often.
const ADAPT_EVERY: Duration = Duration::from_millis(250);
/// Smallest window adaptive merging widens from when the configured window is 0.
const MIN_ADAPTIVE_BASE: Duration = Duration::from_millis(10);
/// A room publishing at least this many messages per second counts as hot.
const HOT_ROOM_RATE: f64 = 5.0;

/// Droppable messages per second a sampled room of `members` shows: the configured visible
/// rate, lowered so the room stays within its delivery budget, never below the minimum.
fn visible_rate(a: &AdaptiveConfig, members: u64) -> f64 {
    let floor = a.min_visible_rate.min(a.visible_rate);
    (a.room_deliveries_per_s / members.max(1) as f64).max(floor).min(a.visible_rate)
}

#[derive(Debug, Clone)]
pub struct BusConfig {
    pub window: Duration,
    pub max_batch_messages: usize,
    pub max_batch_bytes: usize,
    /// kind -> must deliver.
    pub kinds: HashMap<String, bool>,
    pub limits: LimitsConfig,
    pub history: HistoryLimits,
    pub join_last: usize,
    pub adaptive: AdaptiveConfig,
}

impl BusConfig {
    pub fn from_config(cfg: &crate::config::Config) -> Self {
        Self {
            window: cfg.merge_window(),
            max_batch_messages: cfg.fanout.max_batch_messages,
            max_batch_bytes: cfg.fanout.max_batch_bytes,
            kinds: cfg.kinds.iter().map(|(k, v)| (k.clone(), v.must_deliver)).collect(),
            limits: cfg.limits.clone(),
            history: HistoryLimits {
                must_deliver: cfg.history.must_deliver,
                droppable: cfg.history.droppable,
                max_age: Duration::from_millis(cfg.history.max_age_ms),
            },
            join_last: cfg.history.join_last,
            adaptive: cfg.adaptive.clone(),
        }
    }
}

struct Pending {
    msg: PushMessage,
    must_deliver: bool,
}

struct Room {
    name: RoomName,
    /// Last seq assigned.
    seq: u64,
    /// Last seq handed to shards (members that join now see seqs above it).
    flushed_seq: u64,
    /// Bit `s` of `interest[p]`: shard `s` has members (or joins in flight) wanting encoding `p`.
    interest: [u64; 2],
    pending: Vec<Pending>,
    pending_bytes: usize,
    deadline: Option<Instant>,
    last_active: Instant,
    history: History,
    droppable_bucket: Bucket,
    must_bucket: Bucket,
    visible_bucket: Bucket,
    /// Redis mode: the visible rate on this edge's fan-out (apart from `visible_bucket`, which
    /// the publishing edge spends at admission).
    fanout_bucket: Bucket,
    /// Publish rate, messages per second (EWMA over ~1 s).
    rate: f64,
    rate_at: Instant,
    /// Redis mode: the room's seq is known (subscribed and read). Always true in local mode.
    synced: bool,
    /// Redis mode: seq at which this edge started following the room; local history covers
    /// only what came after it.
    base_seq: u64,
    /// Redis mode: joins waiting for the room to sync.
    waiting: Vec<(PendingJoin, Option<u64>)>,
    /// Redis mode: messages that arrived ahead of a gap, by seq.
    ahead: BTreeMap<u64, (PushMessage, bool)>,
    /// Redis mode: a fill is in flight.
    filling: bool,
    /// Redis mode: joins whose `since` is ahead of what this edge has received (the client saw
    /// it on another edge), waiting until it has, so the seam has no duplicate.
    parked: Vec<(PendingJoin, u64, Instant)>,
    /// Members on every shard (joined or joining).
    members: u64,
    /// Sampled because offered rate x members is over `adaptive.room_deliveries_per_s`.
    demand_sampling: bool,
}

impl Room {
    /// Whether droppable content of this room is sampled now: the shards are behind
    /// (`backlog_sampling`), or the room's demand (offered messages/s x members) is over
    /// `adaptive.room_deliveries_per_s` (on above it, off below half of it); hot rooms only.
    fn sampling_now(&mut self, a: &AdaptiveConfig, backlog_sampling: bool, now: Instant) -> bool {
        let rate = self.current_rate(now);
        if a.enabled {
            let demand = rate * self.members as f64;
            if demand > a.room_deliveries_per_s {
                self.demand_sampling = true;
            } else if demand < a.room_deliveries_per_s / 2.0 {
                self.demand_sampling = false;
            }
        }
        (backlog_sampling || self.demand_sampling) && rate >= HOT_ROOM_RATE
    }

    fn new(name: RoomName, now: Instant, cfg: &BusConfig) -> Self {
        Self {
            name,
            seq: 0,
            flushed_seq: 0,
            interest: [0; 2],
            pending: Vec::new(),
            pending_bytes: 0,
            deadline: None,
            last_active: now,
            history: History::default(),
            droppable_bucket: Bucket::full(cfg.limits.room_burst, now),
            must_bucket: Bucket::full(cfg.limits.must_deliver_room_burst, now),
            visible_bucket: Bucket::full(cfg.adaptive.visible_rate, now),
            fanout_bucket: Bucket::full(cfg.adaptive.visible_rate, now),
            rate: 0.0,
            rate_at: now,
            synced: true,
            base_seq: 0,
            waiting: Vec::new(),
            ahead: BTreeMap::new(),
            filling: false,
            parked: Vec::new(),
            members: 0,
            demand_sampling: false,
        }
    }

    fn interested(&self) -> bool {
        self.interest[0] | self.interest[1] != 0
    }

    fn bump_rate(&mut self, now: Instant) {
        let dt = now.saturating_duration_since(self.rate_at).as_secs_f64();
        self.rate_at = now;
        // Exponential decay with a 1 s time constant, plus this event.
        self.rate = self.rate * (-dt).exp() + 1.0;
    }

    fn current_rate(&self, now: Instant) -> f64 {
        let dt = now.saturating_duration_since(self.rate_at).as_secs_f64();
        self.rate * (-dt).exp()
    }
}

pub struct LocalBus {
    rx: Receiver<BusCmd>,
    shards: Vec<Mailbox>,
    cfg: BusConfig,
    stats: BusStats,
    rooms: HashMap<RoomName, Room>,
    users: HashMap<String, Bucket>,
    timers: BinaryHeap<Reverse<(Instant, RoomName)>>,
    immediate: Vec<RoomName>,
    last_sweep: Instant,
    /// Latest send backlog per shard.
    shard_backlog: Vec<usize>,
    /// Adaptive level: hot rooms use `base << level`.
    level: u32,
    max_level: u32,
    last_adapt: Instant,
    /// Level at max and still behind: sample droppable messages.
    sampling: bool,
    /// Redis mode: the bridge to Redis, and whether Redis is reachable.
    remote: Option<Bridge>,
    remote_up: bool,
    /// Rooms with parked joins.
    parked_rooms: Vec<RoomName>,
}

impl LocalBus {
    pub fn new(rx: Receiver<BusCmd>, shards: Vec<Mailbox>, cfg: BusConfig, stats: BusStats) -> Self {
        let base = cfg.window.max(MIN_ADAPTIVE_BASE);
        let max = Duration::from_millis(cfg.adaptive.max_window_ms).max(base);
        let mut max_level = 0;
        while base * (1 << (max_level + 1)) <= max && max_level < 16 {
            max_level += 1;
        }
        let n = shards.len();
        Self {
            rx,
            shards,
            cfg,
            stats,
            rooms: HashMap::new(),
            users: HashMap::new(),
            timers: BinaryHeap::new(),
            immediate: Vec::new(),
            last_sweep: Instant::now(),
            shard_backlog: vec![0; n],
            level: 0,
            max_level,
            last_adapt: Instant::now(),
            sampling: false,
            remote: None,
            remote_up: false,
            parked_rooms: Vec::new(),
        }
    }

    /// Redis mode: seqs come from Redis through `bridge`.
    pub fn with_remote(mut self, bridge: Bridge) -> Self {
        self.remote = Some(bridge);
        self
    }

    /// Runs until `BusCmd::Shutdown` or every sender is gone.
    pub fn run(mut self) {
        loop {
            let now = Instant::now();
            let first = match self.timers.peek() {
                Some(Reverse((deadline, _))) => self.rx.recv_timeout(deadline.saturating_duration_since(now)),
                None => self.rx.recv_timeout(Duration::from_secs(1)),
            };
            match first {
                Ok(BusCmd::Shutdown) | Err(RecvTimeoutError::Disconnected) => break,
                Ok(cmd) => {
                    self.handle(cmd);
                    for _ in 0..MAX_CMDS_PER_TURN {
                        match self.rx.try_recv() {
                            Ok(BusCmd::Shutdown) => {
                                self.flush_all();
                                return;
                            }
                            Ok(cmd) => self.handle(cmd),
                            Err(_) => break,
                        }
                    }
                }
                Err(RecvTimeoutError::Timeout) => {}
            }
            self.flush_immediate();
            self.flush_due(Instant::now());
            self.expire_parked(Instant::now());
            self.sweep();
        }
        self.flush_all();
    }

    fn handle(&mut self, cmd: BusCmd) {
        match cmd {
            BusCmd::Publish { room, msg, reply } => match &self.remote {
                None => {
                    let result = self.publish(room, msg);
                    self.answer(reply, result);
                }
                Some(bridge) => {
                    let bridge = bridge.clone();
                    match self.admit(&room, &msg) {
                        Err(e) => self.answer(reply, Err(e)),
                        Ok(_) if !self.remote_up => self.answer(reply, Err(PublishError::BusUnavailable)),
                        Ok(must_deliver) => bridge.send(BridgeCmd::Publish { room, msg, must_deliver, reply }),
                    }
                }
            },
            BusCmd::Join { room, shard, slot, generation, proto, since } => {
                self.join(room, PendingJoin { shard, slot, generation, proto }, since);
            }
            BusCmd::Left { room } => {
                if let Some(r) = self.rooms.get_mut(&room) {
                    r.members = r.members.saturating_sub(1);
                }
            }
            BusCmd::NoInterest { room, shard, proto } => {
                if let Some(r) = self.rooms.get_mut(&room) {
                    r.interest[proto.index()] &= !(1u64 << shard);
                    r.last_active = Instant::now();
                    if !r.interested() {
                        // Nobody to send the waiting batch to: history keeps it, and everything
                        // up to the room's seq counts as handed out. Left pending, it would go
                        // out after a later join had already been given it from history.
                        r.pending.clear();
                        r.pending_bytes = 0;
                        r.deadline = None;
                        r.flushed_seq = r.seq;
                    }
                    if !r.interested()
                        && let Some(bridge) = &self.remote
                    {
                        // No member left here: stop receiving the room. Local history would
                        // have a hole from now on, so it is dropped with the subscription.
                        bridge.send(BridgeCmd::Unsubscribe(room.clone()));
                        r.synced = false;
                        r.history = History::default();
                        r.ahead.clear();
                        r.pending.clear();
                        r.pending_bytes = 0;
                    }
                }
            }
            BusCmd::Remote { room, msg, must_deliver } => self.remote_msg(&room, msg, must_deliver),
            BusCmd::Synced { room, seq } => self.synced(&room, seq),
            BusCmd::Filled { room, from, to, messages, ok } => self.filled(&room, from, to, messages, ok),
            BusCmd::Recovered { room, since, upto, join, messages, evicted_upto, ok } => {
                self.recovered(&room, since, upto, join, messages, evicted_upto, ok);
            }
            BusCmd::PublishDone { reply, result } => self.answer(reply, result),
            BusCmd::Redis { up } => {
                if up != self.remote_up {
                    tracing::info!(up, "redis bus state");
                }
                self.remote_up = up;
            }
            BusCmd::Load { shard, queued_bytes } => {
                if let Some(b) = self.shard_backlog.get_mut(usize::from(shard)) {
                    *b = queued_bytes;
                }
                self.adapt(Instant::now());
            }
            BusCmd::RoomStats { room, reply } => {
                let _ = reply.send(self.room_stats(&room));
            }
            BusCmd::Shutdown => {}
        }
    }

    fn join(&mut self, room: RoomName, join: PendingJoin, since: Option<u64>) {
        let now = Instant::now();
        if !self.rooms.contains_key(&room) {
            let mut r = Room::new(room.clone(), now, &self.cfg);
            r.synced = self.remote.is_none();
            self.rooms.insert(room.clone(), r);
            self.stats.rooms.set(self.rooms.len() as i64);
        }
        let remote = self.remote.clone();
        let r = self.rooms.get_mut(&room).expect("inserted above");
        let was_interested = r.interested();
        r.members += 1;
        r.interest[join.proto.index()] |= 1u64 << join.shard;
        r.last_active = now;
        if let Some(bridge) = &remote {
            if !was_interested {
                bridge.send(BridgeCmd::Subscribe(r.name.clone()));
            }
            if !r.synced {
                r.waiting.push((join, since));
                return;
            }
        }
        self.answer_join(&room, join, since);
    }

    /// Acknowledges a join on a synced room: from local history, or through a remote recovery
    /// when `since` is older than what this edge has followed.
    fn answer_join(&mut self, room: &RoomName, join: PendingJoin, since: Option<u64>) {
        let now = Instant::now();
        let Some(r) = self.rooms.get_mut(room) else { return };
        r.history.trim(now, &self.cfg.history);
        if let Some(since) = since
            && since > r.flushed_seq
        {
            // The client has seen more than this edge has handed out (it comes from another
            // edge, whose window closed earlier). Flush what we have; if even that is not far
            // enough, wait for the rest to arrive from the bus.
            if since <= r.seq {
                self.flush(room);
            } else if self.remote.is_some() {
                r.parked.push((join, since, now + Duration::from_secs(2)));
                if !self.parked_rooms.contains(room) {
                    self.parked_rooms.push(room.clone());
                }
                return;
            }
        }
        let Some(r) = self.rooms.get_mut(room) else { return };
        if let (Some(bridge), Some(since)) = (&self.remote, since)
            && (since < r.base_seq || since < r.history.must_evicted_upto)
            && since < r.flushed_seq
        {
            bridge.send(BridgeCmd::Recover { room: r.name.clone(), since, upto: r.flushed_seq, join });
            return;
        }
        let seq = r.flushed_seq;
        let mut replay = Vec::new();
        match since {
            Some(since) => {
                let rec = r.history.recover(since, seq);
                if let Some((from, to)) = rec.gap {
                    push_frame(&mut replay, join.proto, &ServerMsg::Gap { room: r.name.to_string(), from, to });
                }
                if !rec.messages.is_empty() {
                    push_frame(
                        &mut replay,
                        join.proto,
                        &ServerMsg::Batch { room: r.name.to_string(), messages: rec.messages },
                    );
                }
            }
            None => {
                let last = r.history.last(self.cfg.join_last, seq);
                if !last.is_empty() {
                    push_frame(&mut replay, join.proto, &ServerMsg::Batch { room: r.name.to_string(), messages: last });
                }
            }
        }
        let name = r.name.clone();
        self.ack_join(name, join, seq, replay);
    }

    fn ack_join(&self, room: RoomName, join: PendingJoin, seq: u64, replay: Vec<Bytes>) {
        if let Some(mb) = self.shards.get(usize::from(join.shard)) {
            mb.send(ShardCmd::JoinAck { slot: join.slot, generation: join.generation, room, seq, replay });
        }
    }

    /// Redis answered a recovery: Redis's must-deliver messages in `(since, upto]`, then this
    /// edge's own for what was flushed meanwhile, so the join's seam is exact.
    #[allow(clippy::too_many_arguments)]
    fn recovered(
        &mut self,
        room: &RoomName,
        since: u64,
        upto: u64,
        join: PendingJoin,
        messages: Vec<PushMessage>,
        evicted_upto: u64,
        ok: bool,
    ) {
        let Some(r) = self.rooms.get(room) else { return };
        let seq = r.flushed_seq;
        let mut replay = Vec::new();
        let gap = if ok {
            (since < evicted_upto).then(|| (since + 1, evicted_upto.min(upto)))
        } else {
            Some((since + 1, upto))
        };
        if let Some((from, to)) = gap.filter(|(a, b)| a <= b) {
            push_frame(&mut replay, join.proto, &ServerMsg::Gap { room: r.name.to_string(), from, to });
        }
        let mut all: Vec<PushMessage> = messages.into_iter().filter(|m| m.seq > since && m.seq <= upto).collect();
        all.extend(r.history.recover(upto, seq).messages);
        if !all.is_empty() {
            push_frame(&mut replay, join.proto, &ServerMsg::Batch { room: r.name.to_string(), messages: all });
        }
        self.ack_join(r.name.clone(), join, seq, replay);
    }

    /// Answers parked joins whose `since` has been reached (or, with `expire`, whose wait is
    /// over: they are answered with what this edge has).
    fn unpark(&mut self, room: &RoomName, now: Instant, expire: bool) {
        let Some(r) = self.rooms.get_mut(room) else { return };
        let seq = r.seq;
        let (ready, keep): (Vec<_>, Vec<_>) = std::mem::take(&mut r.parked)
            .into_iter()
            .partition(|&(_, since, at)| since <= seq || (expire && now >= at));
        r.parked = keep;
        for (join, since, _) in ready {
            if since > seq {
                tracing::warn!(room = %room, since, seq, "since is ahead of the bus; answering with what is here");
                if let Some(r) = self.rooms.get_mut(room) {
                    let flushed = r.flushed_seq;
                    let name = r.name.clone();
                    self.flush(room);
                    self.ack_join(name, join, flushed.max(seq), Vec::new());
                }
                continue;
            }
            self.answer_join(room, join, Some(since));
        }
    }

    fn expire_parked(&mut self, now: Instant) {
        if self.parked_rooms.is_empty() {
            return;
        }
        for room in std::mem::take(&mut self.parked_rooms) {
            self.unpark(&room, now, true);
            if self.rooms.get(&room).is_some_and(|r| !r.parked.is_empty()) {
                self.parked_rooms.push(room);
            }
        }
    }

    /// Redis mode: the room's seq in Redis, right after (re)subscribing.
    fn synced(&mut self, room: &RoomName, seq: u64) {
        let Some(r) = self.rooms.get_mut(room) else { return };
        if !r.interested() {
            return;
        }
        if !r.synced {
            r.synced = true;
            r.seq = seq;
            r.flushed_seq = seq;
            r.base_seq = seq;
            r.ahead.retain(|&s, _| s > seq);
            let waiting = std::mem::take(&mut r.waiting);
            for (join, since) in waiting {
                self.answer_join(room, join, since);
            }
            self.drain_ahead(room);
        } else if seq > r.seq {
            // Reconnected after missing messages: fetch them.
            let from = r.seq + 1;
            self.request_fill(room, from, seq);
        } else if seq < r.seq {
            // Redis came back without the room's state (no persistence): its numbering restarts.
            // Follow it, and say so: clients see seqs go back and must treat it as a new epoch.
            tracing::error!(room = %room, ours = r.seq, redis = seq, "redis lost this room's seq (run redis with appendonly)");
            r.seq = seq;
            r.flushed_seq = seq;
            r.base_seq = seq;
            r.history = History::default();
            r.ahead.clear();
        }
    }

    fn request_fill(&mut self, room: &RoomName, from: u64, to: u64) {
        let Some(r) = self.rooms.get_mut(room) else { return };
        if r.filling || from > to {
            return;
        }
        r.filling = true;
        if let Some(bridge) = &self.remote {
            bridge.send(BridgeCmd::Fill { room: room.clone(), from, to });
        }
    }

    /// Redis mode: a message numbered by Redis. Accepted in seq order; ahead of a gap it waits
    /// while the gap is filled.
    fn remote_msg(&mut self, room: &RoomName, msg: PushMessage, must_deliver: bool) {
        let Some(r) = self.rooms.get_mut(room) else { return };
        if !r.interested() {
            return;
        }
        if !r.synced {
            r.ahead.insert(msg.seq, (msg, must_deliver));
            return;
        }
        if msg.seq <= r.seq {
            return; // duplicate (already filled)
        }
        if msg.seq == r.seq + 1 && r.ahead.is_empty() {
            self.accept(room, msg, must_deliver);
            return;
        }
        let from = r.seq + 1;
        let to = msg.seq - 1;
        r.ahead.insert(msg.seq, (msg, must_deliver));
        self.drain_ahead(room);
        if let Some(r) = self.rooms.get(room)
            && !r.ahead.is_empty()
        {
            self.request_fill(room, from, to);
        }
    }

    /// Accepts every message that is next in line.
    fn drain_ahead(&mut self, room: &RoomName) {
        loop {
            let Some(r) = self.rooms.get_mut(room) else { return };
            let next = r.seq + 1;
            let Some((msg, md)) = r.ahead.remove(&next) else { return };
            self.accept(room, msg, md);
        }
    }

    /// Redis mode: the fill of `from..=to` came back. What it lacks is announced as a gap.
    fn filled(&mut self, room: &RoomName, from: u64, to: u64, messages: Vec<(PushMessage, bool)>, ok: bool) {
        let Some(r) = self.rooms.get_mut(room) else { return };
        r.filling = false;
        if !ok {
            tracing::warn!(room = %room, from, to, "gap could not be filled from redis");
        }
        for (m, md) in messages {
            if m.seq > r.seq {
                r.ahead.insert(m.seq, (m, md));
            }
        }
        let _ = from;
        loop {
            self.drain_ahead(room);
            let Some(r) = self.rooms.get_mut(room) else { return };
            // Whatever is still missing up to `to` (or up to the next message we hold) is lost.
            let next_held = r.ahead.keys().next().copied();
            let missing_to = match next_held {
                Some(h) => h - 1,
                None if to > r.seq => to,
                None => break,
            };
            if missing_to <= r.seq {
                break;
            }
            let gap_from = r.seq + 1;
            r.seq = missing_to;
            self.flush(room);
            let r = self.rooms.get_mut(room).expect("present");
            r.flushed_seq = missing_to;
            let notice = ServerMsg::Gap { room: r.name.to_string(), from: gap_from, to: missing_to };
            self.notify(room, &notice);
            if next_held.is_none() {
                break;
            }
        }
    }

    /// Sends a notice (not a message: no seq of its own) to every member of a room.
    fn notify(&mut self, room: &RoomName, msg: &ServerMsg) {
        let Some(r) = self.rooms.get(room) else { return };
        let frames = encode_frames(&r.name, r.interest, msg);
        let delivery = Arc::new(Delivery {
            room: r.name.clone(),
            frames,
            messages: 0,
            last_seq: r.flushed_seq,
            must_deliver: MustDeliver::All,
        });
        self.send_to_shards(r.interest[0] | r.interest[1], &delivery);
    }

    fn send_to_shards(&self, mut shards: u64, delivery: &Arc<Delivery>) {
        while shards != 0 {
            let s = shards.trailing_zeros() as usize;
            shards &= shards - 1;
            if let Some(mb) = self.shards.get(s) {
                mb.send(ShardCmd::Deliver(delivery.clone()));
            }
        }
    }

    fn answer(&self, reply: Reply, result: Result<(RoomName, Ack), PublishError>) {
        match reply {
            Reply::Http(tx) => {
                let _ = tx.send(result.map(|(_, ack)| ack));
            }
            Reply::Conn { shard, slot, generation } => {
                let Some(mb) = self.shards.get(usize::from(shard)) else { return };
                let (room, result) = match result {
                    Ok((room, ack)) => (room, Ok(ack)),
                    Err(e) => (RoomName::from(""), Err(e)),
                };
                mb.send(ShardCmd::Published { slot, generation, room, result });
            }
            Reply::None => {}
        }
    }

    fn drop_counted(&self, kind: &str, reason: &str) {
        self.stats.messages_dropped.with_label_values(&[kind, reason]).inc();
    }

    /// Checks kind, limits and sampling; creates the room. Returns whether the kind must be
    /// delivered.
    fn admit(&mut self, room: &RoomName, msg: &NewMessage) -> Result<bool, PublishError> {
        let now = Instant::now();
        let Some(&must_deliver) = self.cfg.kinds.get(&msg.kind) else {
            self.stats.publish_rejected.with_label_values(&["unknown_kind"]).inc();
            return Err(PublishError::UnknownKind(msg.kind.clone()));
        };
        if !self.rooms.contains_key(room) {
            if self.rooms.len() >= MAX_ROOMS {
                self.stats.publish_rejected.with_label_values(&["too_many_rooms"]).inc();
                return Err(PublishError::TooManyRooms(MAX_ROOMS));
            }
            let mut r = Room::new(room.clone(), now, &self.cfg);
            r.synced = self.remote.is_none();
            self.rooms.insert(room.clone(), r);
            self.stats.rooms.set(self.rooms.len() as i64);
        }
        let lim = &self.cfg.limits;
        let r = self.rooms.get_mut(room).expect("inserted above");
        let ms = |d: Duration| d.as_millis().max(1) as u64;
        if must_deliver {
            if let Err(wait) = r.must_bucket.take(lim.must_deliver_room_rate, lim.must_deliver_room_burst, now) {
                self.stats.publish_rejected.with_label_values(&["must_deliver_rate"]).inc();
                return Err(PublishError::RateLimited { scope: "room", retry_after_ms: ms(wait), must_deliver: true });
            }
            return Ok(true);
        }
        if let Err(wait) = r.droppable_bucket.take(lim.room_rate, lim.room_burst, now) {
            self.drop_counted(&msg.kind, "room_rate");
            return Err(PublishError::RateLimited { scope: "room", retry_after_ms: ms(wait), must_deliver: false });
        }
        if !msg.user.is_empty() {
            if self.users.len() >= MAX_USERS && !self.users.contains_key(&msg.user) {
                let (rate, burst) = (lim.user_rate, lim.user_burst);
                self.users.retain(|_, b| !b.is_full(rate, burst, now));
            }
            let b = self.users.entry(msg.user.clone()).or_insert_with(|| Bucket::full(lim.user_burst, now));
            if let Err(wait) = b.take(lim.user_rate, lim.user_burst, now) {
                self.drop_counted(&msg.kind, "user_rate");
                return Err(PublishError::RateLimited { scope: "user", retry_after_ms: ms(wait), must_deliver: false });
            }
        }
        let r = self.rooms.get_mut(room).expect("inserted above");
        r.bump_rate(now);
        let a = &self.cfg.adaptive;
        let visible = visible_rate(a, r.members);
        if r.sampling_now(a, self.sampling, now) && r.visible_bucket.take(visible, visible, now).is_err() {
            self.drop_counted(&msg.kind, "sampled");
            return Err(PublishError::Sampled);
        }
        Ok(false)
    }

    /// Local mode: admit, number, accept.
    fn publish(&mut self, room: RoomName, msg: NewMessage) -> Result<(RoomName, Ack), PublishError> {
        let must_deliver = self.admit(&room, &msg)?;
        let r = self.rooms.get_mut(&room).expect("admit creates the room");
        if must_deliver {
            r.bump_rate(Instant::now());
        }
        let ack = Ack { seq: r.seq + 1, ts_us: now_us() };
        let name = r.name.clone();
        let pm = PushMessage { seq: ack.seq, ts_us: ack.ts_us, kind: msg.kind, user: msg.user, body: msg.body };
        self.accept(&name, pm, must_deliver);
        Ok((name, ack))
    }

    /// A numbered message becomes the room's latest: history, then the pending batch.
    fn accept(&mut self, room: &RoomName, pm: PushMessage, must_deliver: bool) {
        let now = Instant::now();
        let Some(r) = self.rooms.get_mut(room) else { return };
        r.seq = pm.seq;
        r.last_active = now;
        if self.remote.is_some() {
            r.bump_rate(now);
        }
        if r.parked.iter().any(|&(_, since, _)| since <= r.seq) {
            self.unpark(room, now, false);
        }
        let Some(r) = self.rooms.get_mut(room) else { return };
        self.stats.messages_in.with_label_values(&[pm.kind.as_str()]).inc();
        r.history.push(pm.clone(), must_deliver, now, &self.cfg.history);
        if !r.interested() {
            // No member on any shard: nothing to deliver now; history keeps it for `since`.
            r.flushed_seq = r.seq;
            return;
        }
        let a = &self.cfg.adaptive;
        let visible = visible_rate(a, r.members);
        if !must_deliver
            && self.remote.is_some()
            && r.sampling_now(a, self.sampling, now)
            && r.fanout_bucket.take(visible, visible, now).is_err()
        {
            // Redis mode: the publishing edge sampled by its own members; this edge's members
            // may be many more. Droppable content beyond this edge's visible rate is not fanned
            // out (it stays in history; seqs of droppable messages may be skipped, as documented).
            if r.pending.is_empty() {
                r.flushed_seq = r.seq;
            }
            self.drop_counted(&pm.kind, "sampled_fanout");
            return;
        }
        r.pending_bytes += pm.body.len() + pm.kind.len() + pm.user.len() + 32;
        r.pending.push(Pending { msg: pm, must_deliver });
        let full = r.pending.len() >= self.cfg.max_batch_messages || r.pending_bytes >= self.cfg.max_batch_bytes;
        if full {
            self.flush(room);
        } else if r.deadline.is_none() {
            let window = room_window(&self.cfg, self.level, r.current_rate(now), r.members);
            if window.is_zero() {
                r.deadline = Some(now);
                self.immediate.push(room.clone());
            } else {
                let d = now + window;
                r.deadline = Some(d);
                self.timers.push(Reverse((d, room.clone())));
            }
        }
    }

    /// The window a room publishing at `rate` messages/s uses now.
    fn window_for(&self, rate: f64) -> Duration {
        window_at(&self.cfg, self.level, rate)
    }

    fn adapt(&mut self, now: Instant) {
        if !self.cfg.adaptive.enabled || now.duration_since(self.last_adapt) < ADAPT_EVERY {
            return;
        }
        self.last_adapt = now;
        let backlog = self.shard_backlog.iter().copied().max().unwrap_or(0);
        let before = (self.level, self.sampling);
        if backlog > self.cfg.adaptive.high_water_bytes {
            if self.level < self.max_level {
                self.level += 1;
            } else {
                self.sampling = true;
            }
        } else if backlog < self.cfg.adaptive.low_water_bytes {
            if self.sampling {
                self.sampling = false;
            } else if self.level > 0 {
                self.level -= 1;
            }
        }
        if before != (self.level, self.sampling) {
            let w = self.window_for(HOT_ROOM_RATE);
            tracing::info!(
                backlog,
                level = self.level,
                window_ms = w.as_millis() as u64,
                sampling = self.sampling,
                "adaptive merge window"
            );
            self.stats.hot_window_ms.set(w.as_millis() as i64);
            self.stats.sampling.set(i64::from(self.sampling));
        }
    }

    fn room_stats(&self, room: &str) -> Option<RoomStats> {
        let r = self.rooms.get(room)?;
        let now = Instant::now();
        let (md, dr) = r.history.len();
        let rate = r.current_rate(now);
        Some(RoomStats {
            room: r.name.to_string(),
            seq: r.seq,
            flushed_seq: r.flushed_seq,
            shards_json: r.interest[0].count_ones(),
            shards_rkyv: r.interest[1].count_ones(),
            window_ms: room_window(&self.cfg, self.level, rate, r.members).as_millis() as u64,
            sampling_visible_rate: ((self.sampling || r.demand_sampling) && rate >= HOT_ROOM_RATE)
                .then(|| visible_rate(&self.cfg.adaptive, r.members)),
            members: r.members,
            history_must_deliver: md,
            history_droppable: dr,
            history_evicted_upto: r.history.must_evicted_upto,
            publish_rate: rate,
        })
    }

    fn flush_immediate(&mut self) {
        let rooms = std::mem::take(&mut self.immediate);
        for room in &rooms {
            self.flush(room);
        }
        self.immediate = rooms;
        self.immediate.clear();
    }

    fn flush_due(&mut self, now: Instant) {
        while let Some(Reverse((deadline, _))) = self.timers.peek() {
            if *deadline > now {
                break;
            }
            let Reverse((deadline, room)) = self.timers.pop().expect("peeked");
            // A room flushed early (full batch) leaves a stale timer: skip it.
            if self.rooms.get(&room).and_then(|r| r.deadline) == Some(deadline) {
                self.flush(&room);
            }
        }
    }

    fn flush_all(&mut self) {
        let names: Vec<RoomName> = self.rooms.keys().cloned().collect();
        for n in names {
            self.flush(&n);
        }
    }

    /// Serializes the room's pending messages once per encoding in use and hands the frames to
    /// every interested shard.
    fn flush(&mut self, room: &RoomName) {
        let Some(r) = self.rooms.get_mut(room) else { return };
        r.deadline = None;
        if r.pending.is_empty() {
            return;
        }
        let pending = std::mem::take(&mut r.pending);
        r.pending_bytes = 0;
        let last_seq = pending.last().map_or(r.flushed_seq, |p| p.msg.seq);
        r.flushed_seq = r.flushed_seq.max(last_seq);
        if !r.interested() {
            return;
        }
        let count = pending.len() as u32;
        let must = pending.iter().filter(|p| p.must_deliver).count() as u32;
        let must_msgs: Vec<PushMessage> = if must > 0 && must < count {
            pending.iter().filter(|p| p.must_deliver).map(|p| p.msg.clone()).collect()
        } else {
            Vec::new()
        };
        let all = ServerMsg::Batch { room: r.name.to_string(), messages: pending.into_iter().map(|p| p.msg).collect() };
        let frames = encode_frames(&r.name, r.interest, &all);
        let must_deliver = if must == count {
            MustDeliver::All
        } else if must == 0 {
            MustDeliver::None
        } else {
            let only = ServerMsg::Batch { room: r.name.to_string(), messages: must_msgs };
            MustDeliver::Some { frames: encode_frames(&r.name, r.interest, &only), messages: must }
        };
        let delivery = Arc::new(Delivery { room: r.name.clone(), frames, messages: count, last_seq, must_deliver });
        let interest = r.interest[0] | r.interest[1];
        self.send_to_shards(interest, &delivery);
        self.stats.batches.inc();
        self.stats.batch_messages.inc_by(u64::from(count));
    }

    fn sweep(&mut self) {
        let now = Instant::now();
        if now.duration_since(self.last_sweep) < Duration::from_secs(10) {
            return;
        }
        self.last_sweep = now;
        let lim = self.cfg.history;
        self.rooms.retain(|_, r| {
            r.history.trim(now, &lim);
            r.interested()
                || !r.pending.is_empty()
                || r.history.len() != (0, 0)
                || now.duration_since(r.last_active) < ROOM_IDLE_TTL
        });
        let (rate, burst) = (self.cfg.limits.user_rate, self.cfg.limits.user_burst);
        self.users.retain(|_, b| !b.is_full(rate, burst, now));
        self.stats.rooms.set(self.rooms.len() as i64);
    }
}

/// The window of a room publishing at `rate` messages/s, at adaptive `level`.
/// A hot room's window is also at least long enough that its members receive no more than
/// `adaptive.room_frames_per_s` frames a second in all: writes, not bytes, are what a shard
/// pays for (bench-results/2026-11-24-fanout), so a room of 10^5 must merge more than one of 10^3.
fn room_window(cfg: &BusConfig, level: u32, rate: f64, members: u64) -> Duration {
    let w = window_at(cfg, level, rate);
    if !cfg.adaptive.enabled || rate < HOT_ROOM_RATE {
        return w;
    }
    let demand = Duration::from_secs_f64(members as f64 / cfg.adaptive.room_frames_per_s);
    w.max(demand.min(Duration::from_millis(cfg.adaptive.max_window_ms)))
}

fn window_at(cfg: &BusConfig, level: u32, rate: f64) -> Duration {
    if level == 0 || rate < HOT_ROOM_RATE {
        return cfg.window;
    }
    let base = cfg.window.max(MIN_ADAPTIVE_BASE);
    (base * (1 << level)).min(Duration::from_millis(cfg.adaptive.max_window_ms))
}

/// Encodes `msg` in `proto` and appends its frame.
fn push_frame(out: &mut Vec<Bytes>, proto: Subprotocol, msg: &ServerMsg) {
    match envelope::encode(proto, msg) {
        Ok(payload) => out.push(frame(proto, &payload)),
        Err(e) => tracing::error!(error = %e, "cannot encode message"),
    }
}

/// One frame per encoding some shard wants.
fn encode_frames(room: &str, interest: [u64; 2], msg: &ServerMsg) -> [Option<Bytes>; 2] {
    let mut frames: [Option<Bytes>; 2] = [None, None];
    for proto in Subprotocol::ALL {
        if interest[proto.index()] == 0 {
            continue;
        }
        match envelope::encode(proto, msg) {
            Ok(payload) => frames[proto.index()] = Some(frame(proto, &payload)),
            Err(e) => tracing::error!(room, error = %e, "cannot encode batch"),
        }
    }
    frames
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;
    use crate::metrics::Metrics;
    use std::sync::atomic::AtomicBool;

    fn setup_with(cfg: Config) -> (LocalBus, crossbeam_channel::Receiver<ShardCmd>) {
        let (_btx, brx) = crossbeam_channel::unbounded();
        let (stx, srx) = crossbeam_channel::unbounded();
        let fd = Arc::new(crate::sys::eventfd().unwrap());
        let mb = Mailbox::new(stx, fd, Arc::new(AtomicBool::new(false)));
        let mut bc = BusConfig::from_config(&cfg);
        bc.max_batch_messages = 3;
        (LocalBus::new(brx, vec![mb], bc, Metrics::new().bus.clone()), srx)
    }

    fn setup(window_ms: u64) -> (LocalBus, crossbeam_channel::Receiver<ShardCmd>) {
        let mut cfg = Config::default();
        cfg.fanout.merge_window_ms = window_ms;
        setup_with(cfg)
    }

    fn msg(kind: &str, n: u32) -> NewMessage {
        NewMessage { kind: kind.into(), user: String::new(), body: format!("{{\"n\":{n}}}") }
    }

    fn join(bus: &mut LocalBus, room: &RoomName, proto: Subprotocol, since: Option<u64>) {
        bus.handle(BusCmd::Join { room: room.clone(), shard: 0, slot: 5, generation: 1, proto, since });
    }

    fn decode(f: &Bytes) -> ServerMsg {
        // 2-byte header for payloads under 126 bytes, else 4.
        let off = if f[1] & 0x7f == 126 { 4 } else { 2 };
        envelope::decode_json(&f[off..]).unwrap()
    }

    fn seqs(msg: &ServerMsg) -> Vec<u64> {
        match msg {
            ServerMsg::Batch { messages, .. } => messages.iter().map(|m| m.seq).collect(),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn join_ack_then_batches_in_seq_order_and_merged() {
        let (mut bus, srx) = setup(50);
        let room: RoomName = "r".into();
        // Published before anyone joined: numbered, kept in history, not delivered.
        assert_eq!(bus.publish(room.clone(), msg("chat", 0)).unwrap().1.seq, 1);
        join(&mut bus, &room, Subprotocol::Json, None);
        match srx.try_recv().unwrap() {
            ShardCmd::JoinAck { slot, seq, replay, .. } => {
                assert_eq!((slot, seq), (5, 1));
                assert!(replay.is_empty(), "join_last defaults to 0");
            }
            _ => panic!("expected JoinAck"),
        }
        for n in 1..=2 {
            bus.publish(room.clone(), msg("gift", n)).unwrap();
        }
        // Still inside the window: nothing sent yet.
        assert!(srx.try_recv().is_err());
        bus.flush_due(Instant::now() + Duration::from_millis(60));
        match srx.try_recv().unwrap() {
            ShardCmd::Deliver(d) => {
                assert_eq!(d.messages, 2);
                assert_eq!(seqs(&decode(d.frames[0].as_ref().unwrap())), vec![2, 3]);
                assert!(d.frames[1].is_none(), "no rkyv member: rkyv not serialized");
                assert_eq!(d.must_deliver, MustDeliver::All);
            }
            _ => panic!("expected Deliver"),
        }
    }

    #[test]
    fn full_batch_flushes_early_and_window_zero_flushes_per_turn() {
        let (mut bus, srx) = setup(1000);
        let room: RoomName = "r".into();
        join(&mut bus, &room, Subprotocol::Rkyv, None);
        let _ack = srx.try_recv().unwrap();
        for n in 0..3 {
            bus.publish(room.clone(), msg("chat", n)).unwrap();
        }
        let ShardCmd::Deliver(d) = srx.try_recv().unwrap() else { panic!("expected Deliver") };
        assert_eq!(d.messages, 3);
        assert!(d.frames[0].is_none() && d.frames[1].is_some());
        assert_eq!(d.must_deliver, MustDeliver::None);

        let (mut bus, srx) = setup(0);
        join(&mut bus, &room, Subprotocol::Json, None);
        let _ack = srx.try_recv().unwrap();
        bus.publish(room.clone(), msg("chat", 0)).unwrap();
        bus.flush_immediate();
        bus.publish(room.clone(), msg("chat", 1)).unwrap();
        bus.flush_immediate();
        let got: Vec<Vec<u64>> = srx
            .try_iter()
            .map(|c| match c {
                ShardCmd::Deliver(d) => seqs(&decode(d.frames[0].as_ref().unwrap())),
                _ => panic!("expected Deliver"),
            })
            .collect();
        assert_eq!(got, vec![vec![1], vec![2]]);
    }

    /// The member leaves while a batch waits for its window, the room goes on without members,
    /// then a client joins with `since`: history gives it everything once; the old batch must
    /// not follow (it did: a duplicate at the seam, found by the integration test under load).
    #[test]
    fn a_batch_waiting_when_the_last_member_leaves_is_not_sent_after_a_later_join() {
        let (mut bus, srx) = setup(50);
        let room: RoomName = "seam".into();
        join(&mut bus, &room, Subprotocol::Json, None);
        let _ack = srx.try_recv().unwrap();
        bus.publish(room.clone(), msg("gift", 1)).unwrap(); // pending, window open
        bus.handle(BusCmd::Left { room: room.clone() });
        bus.handle(BusCmd::NoInterest { room: room.clone(), shard: 0, proto: Subprotocol::Json });
        bus.publish(room.clone(), msg("gift", 2)).unwrap(); // nobody interested
        join(&mut bus, &room, Subprotocol::Json, Some(0));
        std::thread::sleep(Duration::from_millis(80));
        bus.flush_due(Instant::now());
        bus.flush_immediate();
        let mut seen = Vec::new();
        for cmd in srx.try_iter() {
            match cmd {
                ShardCmd::Deliver(d) => seen.extend(seqs(&decode(d.frames[0].as_ref().unwrap()))),
                ShardCmd::JoinAck { replay, .. } => {
                    for f in replay.iter() {
                        if let ServerMsg::Batch { messages, .. } = decode(f) {
                            seen.extend(messages.iter().map(|m| m.seq));
                        }
                    }
                }
                _ => {}
            }
        }
        assert_eq!(seen, vec![1, 2], "each gift once, in order");
    }

    #[test]
    fn mixed_batch_carries_a_must_deliver_only_variant() {
        let (mut bus, srx) = setup(1000);
        let room: RoomName = "r".into();
        join(&mut bus, &room, Subprotocol::Json, None);
        let _ack = srx.try_recv().unwrap();
        bus.publish(room.clone(), msg("chat", 0)).unwrap();
        bus.publish(room.clone(), msg("gift", 1)).unwrap();
        bus.publish(room.clone(), msg("chat", 2)).unwrap();
        let ShardCmd::Deliver(d) = srx.try_recv().unwrap() else { panic!("expected Deliver") };
        let MustDeliver::Some { frames, messages } = &d.must_deliver else { panic!("{:?}", d.must_deliver) };
        assert_eq!(*messages, 1);
        assert_eq!(seqs(&decode(frames[0].as_ref().unwrap())), vec![2]);
    }

    #[test]
    fn no_interest_stops_deliveries() {
        let (mut bus, srx) = setup(0);
        let room: RoomName = "r".into();
        join(&mut bus, &room, Subprotocol::Json, None);
        let _ack = srx.try_recv().unwrap();
        bus.handle(BusCmd::NoInterest { room: room.clone(), shard: 0, proto: Subprotocol::Json });
        bus.publish(room.clone(), msg("chat", 0)).unwrap();
        bus.flush_immediate();
        assert!(srx.try_recv().is_err());
    }

    #[test]
    fn since_recovers_gifts_and_reports_gaps() {
        let mut cfg = Config::default();
        cfg.history.must_deliver = 3;
        let (mut bus, srx) = setup_with(cfg);
        let room: RoomName = "r".into();
        for n in 0..6 {
            bus.publish(room.clone(), msg(if n % 2 == 0 { "gift" } else { "chat" }, n)).unwrap();
        }
        // Gifts are seqs 1, 3, 5; all kept (limit 3). Since 1: gifts 3 and 5, no gap.
        join(&mut bus, &room, Subprotocol::Json, Some(1));
        let ShardCmd::JoinAck { seq, replay, .. } = srx.try_recv().unwrap() else { panic!() };
        assert_eq!(seq, 6);
        assert_eq!(replay.len(), 1);
        assert_eq!(seqs(&decode(&replay[0])), vec![3, 5]);
        // Two more gifts evict gifts 1 and 3: since 0 now has a gap up to 3.
        bus.publish(room.clone(), msg("gift", 7)).unwrap();
        bus.publish(room.clone(), msg("gift", 8)).unwrap();
        bus.flush_all();
        let _ = srx.try_iter().count();
        join(&mut bus, &room, Subprotocol::Json, Some(0));
        let ShardCmd::JoinAck { replay, .. } = srx.try_recv().unwrap() else { panic!() };
        assert_eq!(decode(&replay[0]), ServerMsg::Gap { room: "r".into(), from: 1, to: 3 });
        assert_eq!(seqs(&decode(&replay[1])), vec![5, 7, 8]);
    }

    #[test]
    fn limits_drop_chat_but_reject_gifts() {
        let mut cfg = Config::default();
        cfg.limits.room_rate = 1.0;
        cfg.limits.room_burst = 2.0;
        cfg.limits.must_deliver_room_rate = 1.0;
        cfg.limits.must_deliver_room_burst = 3.0;
        let (mut bus, _srx) = setup_with(cfg);
        let room: RoomName = "r".into();
        assert!(bus.publish(room.clone(), msg("chat", 0)).is_ok());
        assert!(bus.publish(room.clone(), msg("chat", 1)).is_ok());
        match bus.publish(room.clone(), msg("chat", 2)) {
            Err(PublishError::RateLimited { must_deliver: false, .. }) => {}
            other => panic!("{other:?}"),
        }
        // Gifts have their own bucket: the chat flood does not touch it.
        for n in 0..3 {
            assert!(bus.publish(room.clone(), msg("gift", n)).is_ok());
        }
        match bus.publish(room.clone(), msg("gift", 9)) {
            Err(PublishError::RateLimited { must_deliver: true, retry_after_ms, .. }) => assert!(retry_after_ms > 0),
            other => panic!("{other:?}"),
        }
        // Rejected messages take no seq: seqs stay dense.
        assert_eq!(bus.rooms[&room].seq, 5);
        assert!(matches!(bus.publish(room.clone(), msg("nope", 0)), Err(PublishError::UnknownKind(_))));
    }

    #[test]
    fn per_user_limit() {
        let mut cfg = Config::default();
        cfg.limits.user_rate = 1.0;
        cfg.limits.user_burst = 1.0;
        let (mut bus, _srx) = setup_with(cfg);
        let m = |u: &str| NewMessage { kind: "chat".into(), user: u.into(), body: "1".into() };
        assert!(bus.publish("a".into(), m("u1")).is_ok());
        assert!(matches!(bus.publish("b".into(), m("u1")), Err(PublishError::RateLimited { scope: "user", .. })));
        assert!(bus.publish("b".into(), m("u2")).is_ok());
    }

    #[test]
    fn a_room_whose_demand_is_over_budget_is_sampled_without_backlog() {
        let mut cfg = Config::default();
        cfg.adaptive.visible_rate = 5.0;
        cfg.adaptive.room_deliveries_per_s = 1000.0;
        let (mut bus, _srx) = setup_with(cfg);
        let room: RoomName = "big".into();
        let sampled = |bus: &mut LocalBus, n: u32| {
            (0..n).filter(|&i| matches!(bus.publish(room.clone(), msg("chat", i)), Err(PublishError::Sampled))).count()
        };
        // 10 members: 200 chat at once is a high rate, but 10 x rate stays under the budget
        // for a while; with 200 members the same flood is over it at once.
        for _ in 0..10 {
            join(&mut bus, &room, Subprotocol::Json, None);
        }
        assert_eq!(bus.rooms[&room].members, 10);
        let few = sampled(&mut bus, 20);
        assert_eq!(few, 0, "10 members x a modest rate: under budget");
        for _ in 0..190 {
            join(&mut bus, &room, Subprotocol::Json, None);
        }
        let many = sampled(&mut bus, 200);
        assert!(many >= 150, "200 members x the flood is over budget: sampled to the visible rate ({many})");
        assert!(!bus.sampling, "no backlog was reported: this is the demand rule");
        assert_eq!(visible_rate(&bus.cfg.adaptive, 200), 5.0, "budget / members, within the configured range");
        let mut a = bus.cfg.adaptive.clone();
        a.visible_rate = 50.0;
        a.min_visible_rate = 2.0;
        assert_eq!(visible_rate(&a, 10), 50.0, "a small room shows the configured rate");
        assert_eq!(visible_rate(&a, 100), 10.0, "budget 1000 / 100 members");
        assert_eq!(visible_rate(&a, 100_000), 2.0, "never below the minimum");
        // The window follows the members too: 200 members at 1,000 frames/s -> 200 ms.
        let mut bc = bus.cfg.clone();
        bc.adaptive.room_frames_per_s = 1000.0;
        assert_eq!(room_window(&bc, 0, 100.0, 200), Duration::from_millis(200));
        assert_eq!(room_window(&bc, 0, 100.0, 10), bc.window, "small rooms keep the base window");
        assert_eq!(room_window(&bc, 0, 1.0, 200), bc.window, "quiet rooms too");
        assert_eq!(room_window(&bc, 0, 100.0, 1_000_000), Duration::from_millis(bc.adaptive.max_window_ms));
        assert!(bus.room_stats("big").unwrap().sampling_visible_rate.is_some());
        // Gifts are never sampled.
        for n in 0..50 {
            bus.publish(room.clone(), msg("gift", n)).unwrap();
        }
        // Members leave: demand falls under half the budget and sampling stops.
        for _ in 0..199 {
            bus.handle(BusCmd::Left { room: room.clone() });
        }
        assert_eq!(bus.rooms[&room].members, 1);
        assert!(bus.publish(room.clone(), msg("chat", 0)).is_ok());
        assert!(!bus.rooms[&room].demand_sampling);
    }

    #[test]
    fn redis_mode_fan_out_samples_by_this_edges_members() {
        let mut cfg = Config::default();
        cfg.fanout.merge_window_ms = 0;
        cfg.adaptive.visible_rate = 5.0;
        cfg.adaptive.room_deliveries_per_s = 1000.0;
        let (bus, srx) = setup_with(cfg);
        let (tx, _bridge_rx) = tokio::sync::mpsc::unbounded_channel();
        let mut bus = bus.with_remote(super::super::redis::Bridge::to_channel(tx));
        let room: RoomName = "wide".into();
        for _ in 0..200 {
            join(&mut bus, &room, Subprotocol::Json, None);
        }
        bus.handle(BusCmd::Synced { room: room.clone(), seq: 0 });
        let acks = srx.try_iter().count();
        assert_eq!(acks, 200, "joins answered once the room is synced");
        // Messages numbered elsewhere arrive through Redis: 300 chat, then 20 gifts.
        let remote = |seq: u64, kind: &str| BusCmd::Remote {
            room: room.clone(),
            msg: PushMessage { seq, ts_us: 1, kind: kind.into(), user: String::new(), body: format!("{seq}") },
            must_deliver: kind == "gift",
        };
        for seq in 1..=300 {
            bus.handle(remote(seq, "chat"));
            bus.flush_immediate();
        }
        for seq in 301..=320 {
            bus.handle(remote(seq, "gift"));
            bus.flush_immediate();
        }
        // A hot room of 200 gets a window of members / room_frames_per_s: let it close.
        std::thread::sleep(Duration::from_millis(20));
        bus.flush_due(Instant::now());
        let delivered: Vec<u64> = srx
            .try_iter()
            .flat_map(|c| match c {
                ShardCmd::Deliver(d) => seqs(&decode(d.frames[0].as_ref().unwrap())),
                _ => vec![],
            })
            .collect();
        let chat = delivered.iter().filter(|&&s| s <= 300).count();
        let gifts: Vec<u64> = delivered.iter().copied().filter(|&s| s > 300).collect();
        assert!(chat < 100, "200 members x the flood is over budget: chat held back on fan-out ({chat})");
        assert!(chat >= 5, "the visible rate still shows ({chat})");
        assert_eq!(gifts, (301..=320).collect::<Vec<_>>(), "gifts are never held back");
        let r = &bus.rooms[&room];
        assert_eq!(r.seq, 320, "seqs advance past what was held back");
        assert_eq!(r.flushed_seq, 320);
    }

    #[test]
    fn backlog_widens_hot_windows_then_samples_then_recovers() {
        let mut cfg = Config::default();
        cfg.fanout.merge_window_ms = 100;
        cfg.adaptive.max_window_ms = 400;
        cfg.adaptive.visible_rate = 2.0;
        let (mut bus, _srx) = setup_with(cfg);
        let room: RoomName = "hot".into();
        for n in 0..20 {
            bus.publish(room.clone(), msg("gift", n)).unwrap();
        }
        let t0 = Instant::now();
        let mut t = t0;
        let high = bus.cfg.adaptive.high_water_bytes + 1;
        let mut step = |bus: &mut LocalBus, backlog: usize| {
            t += ADAPT_EVERY;
            bus.shard_backlog[0] = backlog;
            bus.adapt(t);
        };
        assert_eq!(bus.window_for(100.0), Duration::from_millis(100));
        step(&mut bus, high);
        assert_eq!(bus.window_for(100.0), Duration::from_millis(200));
        assert_eq!(bus.window_for(0.1), Duration::from_millis(100), "cold rooms keep the base window");
        step(&mut bus, high);
        assert_eq!(bus.window_for(100.0), Duration::from_millis(400));
        assert!(!bus.sampling);
        step(&mut bus, high);
        assert!(bus.sampling, "at the widest window and still behind: sample");
        // Sampling drops chat beyond the visible rate, never gifts.
        let mut sampled = 0;
        for n in 0..20 {
            if matches!(bus.publish(room.clone(), msg("chat", n)), Err(PublishError::Sampled)) {
                sampled += 1;
            }
        }
        assert!(sampled >= 15, "{sampled}");
        for n in 0..20 {
            bus.publish(room.clone(), msg("gift", n)).unwrap();
        }
        step(&mut bus, 0);
        assert!(!bus.sampling);
        step(&mut bus, 0);
        step(&mut bus, 0);
        assert_eq!(bus.window_for(100.0), Duration::from_millis(100));
    }
}
