//! A room's state inside its engine, and the set of shards interested in it.

use std::collections::BTreeMap;
use std::time::Instant;

use roomcast_proto::envelope::PushMessage;

use super::EngineConfig;
use crate::bus::policy::{Bucket, History};
use crate::bus::{Epoch, PendingJoin, RoomName, Since};
use crate::config::AdaptiveConfig;

/// A room publishing at least this many messages per second counts as hot.
pub const HOT_ROOM_RATE: f64 = 5.0;

/// A set of shard ids, sized to the edge's shard count (no cap at 64: a bitset of as many
/// words as the shards need).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ShardSet(Box<[u64]>);

/// The shard numbers of the set bits of word `i` of a set, in increasing order.
fn set_bits(i: usize, mut w: u64) -> impl Iterator<Item = u16> {
    std::iter::from_fn(move || {
        if w == 0 {
            return None;
        }
        let bit = w.trailing_zeros() as usize;
        w &= w - 1;
        Some((i * 64 + bit) as u16)
    })
}

impl ShardSet {
    /// An empty set sized for `shards` shards.
    pub fn new(shards: usize) -> Self {
        Self(vec![0; shards.div_ceil(64).max(1)].into_boxed_slice())
    }

    /// Adds shard `s` (ignored past the set's size).
    pub fn insert(&mut self, s: u16) {
        let s = usize::from(s);
        if let Some(w) = self.0.get_mut(s / 64) {
            *w |= 1 << (s % 64);
        }
    }

    /// Removes shard `s`.
    pub fn remove(&mut self, s: u16) {
        let s = usize::from(s);
        if let Some(w) = self.0.get_mut(s / 64) {
            *w &= !(1 << (s % 64));
        }
    }

    /// Whether shard `s` is in the set.
    pub fn contains(&self, s: u16) -> bool {
        let s = usize::from(s);
        self.0.get(s / 64).is_some_and(|w| w & (1 << (s % 64)) != 0)
    }

    /// True when no shard is in the set.
    pub fn is_empty(&self) -> bool {
        self.0.iter().all(|&w| w == 0)
    }

    /// How many shards are in the set.
    pub fn len(&self) -> u32 {
        self.0.iter().map(|w| w.count_ones()).sum()
    }

    /// The shards in any of `sets` (all sized alike), in increasing order.
    pub fn union_of(sets: &[ShardSet]) -> impl Iterator<Item = u16> + '_ {
        let words = sets.first().map_or(0, |s| s.0.len());
        (0..words)
            .flat_map(move |i| set_bits(i, sets.iter().fold(0u64, |acc, s| acc | s.0.get(i).copied().unwrap_or(0))))
    }

    /// The shards in `self` or `other`, in increasing order.
    pub fn union_iter<'a>(&'a self, other: &'a ShardSet) -> impl Iterator<Item = u16> + 'a {
        self.0.iter().zip(other.0.iter()).enumerate().flat_map(|(i, (&a, &b))| set_bits(i, a | b))
    }
}

/// A message waiting in the room's batch.
pub struct Pending {
    /// The numbered message.
    pub msg: PushMessage,
    /// Its kind is must-deliver: never sampled, never shed.
    pub must_deliver: bool,
    /// A conflated kind's entry key: a newer message with the same kind and key replaces it.
    pub conflate: Option<String>,
    /// When it reached the batch: the start of its kind's delivery latency (`Delivery::kinds`).
    pub at: Instant,
}

/// The newest message of a conflated kind (and key) in a room.
pub struct Latest {
    /// The conflated kind.
    pub kind: String,
    /// The entry key: the configured body field's value (empty for one entry per room).
    pub key: String,
    /// The newest message for that kind and key.
    pub msg: PushMessage,
}

/// Latest-state entries a room keeps (the oldest goes past it): bounds what a publisher
/// inventing keys can make every joiner receive.
pub const MAX_LATEST: usize = 64;

/// One room in its engine: numbering, the batch being merged, history, rate limits and presence.
pub struct Room {
    /// The room's name.
    pub name: RoomName,
    /// The room's numbering: a new one whenever its seq restarts (a room made anew in local
    /// mode; Redis's in Redis mode, 0 until synced).
    pub epoch: Epoch,
    /// Last seq assigned.
    pub seq: u64,
    /// Last seq handed to shards (members that join now see seqs above it).
    pub flushed_seq: u64,
    /// Per encoding (`Subprotocol::index`): shards with members (or joins in flight) wanting it.
    pub interest: [ShardSet; roomcast_proto::Subprotocol::COUNT],
    /// Messages merged into the next frame, in seq order.
    pub pending: Vec<Pending>,
    /// Bytes of `pending` (against `fanout.max_batch_bytes`).
    pub pending_bytes: usize,
    /// When the oldest pending message, and the oldest pending must-deliver one, arrived: the
    /// start of their delivery latency (`Delivery::since`).
    pub opened: Option<Instant>,
    /// When the oldest pending must-deliver message arrived.
    pub must_opened: Option<Instant>,
    /// Idempotency keys of recent publishes, with their answers.
    pub idem: super::idem::Keys,
    /// When the pending batch is due to be flushed (None: nothing pending).
    pub deadline: Option<Instant>,
    /// Last activity (publishes, joins): rooms idle past `room_idle` may be swept.
    pub last_active: Instant,
    /// Recent messages for `since` recovery and join replays.
    pub history: History,
    /// The room's droppable publish rate limit (`limits.room_rate`).
    pub droppable_bucket: Bucket,
    /// The room's must-deliver publish rate limit (`limits.must_deliver_room_rate`).
    pub must_bucket: Bucket,
    /// The visible rate droppable messages are sampled down to while the room is sampled.
    pub visible_bucket: Bucket,
    /// Redis mode: the visible rate on this edge's fan-out (apart from `visible_bucket`, which
    /// the publishing edge spends at admission).
    pub fanout_bucket: Bucket,
    /// Publish rate, messages per second (EWMA over ~1 s).
    rate: f64,
    rate_at: Instant,
    /// Redis mode: the room's seq is known (subscribed and read). Always true in local mode.
    pub synced: bool,
    /// Redis mode: seq at which this edge started following the room; local history covers
    /// only what came after it.
    pub base_seq: u64,
    /// Redis mode: joins waiting for the room to sync, each until its deadline (in order).
    pub waiting: Vec<(PendingJoin, Option<Since>, Instant)>,
    /// Redis mode: messages that arrived ahead of a gap, by seq.
    pub ahead: BTreeMap<u64, (PushMessage, bool)>,
    /// Redis mode: a fill is in flight.
    pub filling: bool,
    /// Redis mode: the highest seq a fill was asked for while another was in flight (fetched
    /// once that one is back).
    pub fill_want: u64,
    /// Redis mode: joins whose `since` is ahead of what this edge has received (the client saw
    /// it on another edge), waiting until it has, so the seam has no duplicate.
    pub parked: Vec<(PendingJoin, u64, Instant)>,
    /// Redis mode: joins whose `since` is older than this edge's history, answered from one
    /// read of Redis at a time.
    pub recovery: super::joins::Recovery,
    /// Members on every shard (joined or joining).
    pub members: u64,
    /// With a store: the highest seq reserved on disk (numbering past it needs a new
    /// reservation first), must-deliver seqs evicted as the store last heard, and the store
    /// batch this room's latest records went in: its batches are not delivered, nor its joins
    /// answered, before that batch is durable.
    pub seq_hi: u64,
    /// The store batch that carries the reservation `seq_hi`, and the reservation known
    /// durable before it (see `durable_hi`).
    pub reserve_token: u64,
    /// The reservation known durable before `reserve_token`'s batch.
    pub reserved_before: u64,
    /// Must-deliver seqs evicted, as the store last heard.
    pub stored_evicted: u64,
    /// When (Unix seconds) the room's record was last written.
    pub meta_s: u64,
    /// The store batch this room's latest records went in: nothing waits past it once it is durable.
    pub wait_token: u64,
    /// A flush or joins that wait for the store.
    pub flush_after_store: bool,
    /// Joins waiting until the room's latest store batch is durable.
    pub joins_after_store: Vec<(PendingJoin, Option<Since>)>,
    /// Sampled because offered rate x members is over `adaptive.room_deliveries_per_s`.
    pub demand_sampling: bool,
    /// Redis mode: the room's members over every edge, as last announced.
    pub cluster_online: Option<u64>,
    /// The count members were last shown, and when (presence).
    pub online_shown: Option<u64>,
    /// When the online count was last shown.
    pub online_at: Option<Instant>,
    /// Redis mode: this edge's count as last reported to Redis, and when.
    pub reported: u64,
    /// When this edge's count was last reported to Redis.
    pub reported_at: Option<Instant>,
    /// A presence step is scheduled for then.
    pub presence_due: Option<Instant>,
    /// Conflated kinds' newest messages, given to joiners before live messages.
    pub latest: Vec<Latest>,
}

impl Room {
    /// A fresh room (epoch 0, seq 0) with full rate buckets and no members.
    pub fn new(name: RoomName, shards: usize, now: Instant, cfg: &EngineConfig) -> Self {
        Self {
            name,
            epoch: 0,
            seq: 0,
            flushed_seq: 0,
            interest: std::array::from_fn(|_| ShardSet::new(shards)),
            pending: Vec::new(),
            pending_bytes: 0,
            opened: None,
            must_opened: None,
            idem: super::idem::Keys::default(),
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
            fill_want: 0,
            parked: Vec::new(),
            recovery: super::joins::Recovery::default(),
            members: 0,
            seq_hi: 0,
            reserve_token: 0,
            reserved_before: 0,
            stored_evicted: 0,
            meta_s: 0,
            wait_token: 0,
            flush_after_store: false,
            joins_after_store: Vec::new(),
            demand_sampling: false,
            cluster_online: None,
            online_shown: None,
            online_at: None,
            reported: 0,
            reported_at: None,
            presence_due: None,
            latest: Vec::new(),
        }
    }

    /// The highest seq a durable reservation covers, the store having made its batches up to
    /// `store_durable` durable: no seq above it may reach a member (a crash could number it
    /// again).
    pub fn durable_hi(&self, store_durable: u64) -> u64 {
        if self.reserve_token <= store_durable { self.seq_hi } else { self.reserved_before }
    }

    /// Takes back every message whose seq `gone` picks that has not reached a member: out of
    /// the pending batch, history, latest state and idempotency keys. Returns the kinds of
    /// those taken from the pending batch or history.
    pub fn take_back(&mut self, gone: impl Fn(u64) -> bool) -> Vec<String> {
        let mut taken = BTreeMap::new();
        self.pending.retain(|p| {
            if gone(p.msg.seq) {
                self.pending_bytes =
                    self.pending_bytes.saturating_sub(p.msg.body.len() + p.msg.kind.len() + p.msg.user.len() + 32);
                taken.insert(p.msg.seq, p.msg.kind.clone());
                return false;
            }
            true
        });
        if self.pending.is_empty() {
            self.opened = None;
        }
        if !self.pending.iter().any(|p| p.must_deliver) {
            self.must_opened = None;
        }
        for m in self.history.remove(&gone) {
            taken.entry(m.seq).or_insert(m.kind);
        }
        self.latest.retain(|l| !gone(l.msg.seq));
        self.idem.forget(&gone);
        taken.into_values().collect()
    }

    /// The online count members see: the total over every edge in Redis mode (once announced),
    /// else this edge's members.
    pub fn online(&self) -> u64 {
        self.cluster_online.unwrap_or(self.members)
    }

    /// Whether any shard has members (or joins in flight) wanting the room's frames.
    pub fn interested(&self) -> bool {
        self.interest.iter().any(|s| !s.is_empty())
    }

    /// Whether droppable content of this room is sampled now: the shards are behind
    /// (`backlog_sampling`), or the room's demand (offered messages/s x members) is over
    /// `threshold` deliveries/s (on above it, off below half of it); hot rooms only. The
    /// threshold is the lower of the configured `adaptive.room_deliveries_per_s` and the
    /// latency controller's current budget ([`super::adaptive::sampling_threshold`]).
    pub fn sampling_now(&mut self, a: &AdaptiveConfig, threshold: f64, backlog_sampling: bool, now: Instant) -> bool {
        let rate = self.current_rate(now);
        if a.enabled {
            let demand = rate * self.members as f64;
            if demand > threshold {
                self.demand_sampling = true;
            } else if demand < threshold / 2.0 {
                self.demand_sampling = false;
            }
        }
        (backlog_sampling || self.demand_sampling) && rate >= HOT_ROOM_RATE
    }

    /// Counts one publish in the room's rate (EWMA with a 1 s time constant).
    pub fn bump_rate(&mut self, now: Instant) {
        let dt = now.saturating_duration_since(self.rate_at).as_secs_f64();
        self.rate_at = now;
        // Exponential decay with a 1 s time constant, plus this event.
        self.rate = self.rate * (-dt).exp() + 1.0;
    }

    /// The room's publish rate now, messages per second, decayed since the last publish.
    pub fn current_rate(&self, now: Instant) -> f64 {
        let dt = now.saturating_duration_since(self.rate_at).as_secs_f64();
        self.rate * (-dt).exp()
    }
}

#[cfg(test)]
mod tests {
    use super::ShardSet;

    #[test]
    fn shard_sets_hold_any_shard_count() {
        let mut a = ShardSet::new(200);
        let mut b = ShardSet::new(200);
        for s in [0u16, 63, 64, 127, 199] {
            a.insert(s);
        }
        b.insert(5);
        b.insert(64);
        assert_eq!(a.len(), 5);
        assert!(a.contains(199) && !a.contains(198));
        assert_eq!(a.union_iter(&b).collect::<Vec<_>>(), vec![0, 5, 63, 64, 127, 199]);
        for s in [0u16, 63, 64, 127, 199] {
            a.remove(s);
        }
        assert!(a.is_empty() && !b.is_empty());
        // Out of range is ignored, never a panic.
        a.insert(500);
        assert!(a.is_empty());
    }
}
