//! The fabric between threads: what shards, room engines, the publish API and the Redis bridge
//! say to each other, and the bounded mailboxes that carry it.
//!
//! Rooms live on engines ([`crate::engine`]), one per shard thread, placed by a stable hash of
//! the room name ([`engine_of`]). Every command about a room goes to its engine through
//! [`BusHandle`] (publish API, Redis bridge) or through a shard's per-turn [`Mail::Turn`]
//! (connections' signalling), so one engine sees all of a room's events in one order. Every
//! mailbox is bounded; nothing on the data path blocks on a full one.

pub mod cluster;
pub mod policy;
pub mod redis;
pub mod sentinel;
pub mod slots;

use std::os::fd::{AsRawFd, OwnedFd};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use bytes::Bytes;
use crossbeam_channel::{Receiver, RecvTimeoutError, Sender, TrySendError};
use roomcast_proto::Subprotocol;
use roomcast_proto::envelope::PushMessage;

/// Room names are shared between the engines and every shard without copying.
pub type RoomName = Arc<str>;

/// A message as a publisher sent it, before its engine (or Redis) numbers it.
#[derive(Debug, Clone)]
pub struct NewMessage {
    /// The message's kind (a configured kind).
    pub kind: String,
    /// The user it is attributed to (may be empty).
    pub user: String,
    /// Validated JSON text.
    pub body: String,
    /// The publisher's `Idempotency-Key` (checked by `engine::idem::check_key`): a publish
    /// with a key seen recently in the room gets the first answer again, and publishes nothing.
    pub idem: Option<Box<str>>,
}

/// What a publisher learns.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct Ack {
    /// The seq the room gave the message.
    pub seq: u64,
    /// When it was numbered, microseconds since the Unix epoch.
    pub ts_us: u64,
    /// The answer to an earlier publish with the same idempotency key: nothing was published.
    pub replayed: bool,
}

/// Why a publish was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PublishError {
    /// The edge is stopping and takes no more publishes.
    #[error("the edge is shutting down")]
    ShuttingDown,
    /// Publishing would create a room past `limits.max_rooms` (the bound given).
    #[error("too many rooms ({0}); refusing to create another")]
    TooManyRooms(usize),
    /// The kind is not configured.
    #[error("unknown kind {0:?}: publish one of the configured kinds")]
    UnknownKind(String),
    /// Over a token bucket. Droppable kinds: the message is dropped (and counted). Must-deliver
    /// kinds: rejected, so the publisher retries; never silently dropped.
    #[error("rate limited ({scope}); retry after {retry_after_ms} ms")]
    RateLimited {
        /// Which limit: `room` or `user`.
        scope: &'static str,
        /// When the bucket holds a token again.
        retry_after_ms: u64,
        /// The message was must-deliver (rejected, not dropped).
        must_deliver: bool,
    },
    /// The room is so hot that even the widest merge window is not enough: droppable messages
    /// are sampled down to the visible rate and this one was not kept.
    #[error("sampled out: the room shows at most its visible rate of droppable messages")]
    Sampled,
    /// The room's engine is behind (its mailbox, or its output to some shard, is at its
    /// bound): nothing was numbered; retry after the given time.
    #[error("the room engine is busy; retry after {retry_after_ms} ms")]
    Busy {
        /// When to try again.
        retry_after_ms: u64,
    },
    /// Redis (the seq authority in cluster mode) is unreachable; retry.
    #[error("the message bus (redis) is unavailable; retry shortly")]
    BusUnavailable,
    /// `bus.min_replicas_acked`: Redis numbered the message, but fewer replicas than required
    /// confirmed it in time. Not acknowledged: retry with the same Idempotency-Key (the retry
    /// gets the same seq once replicas hold it).
    #[error(
        "the message is not yet held by enough redis replicas ({acked} of {wanted}); retry with the same Idempotency-Key"
    )]
    NotReplicated {
        /// Replicas that confirmed it in time.
        acked: u32,
        /// Replicas required (`bus.min_replicas_acked`).
        wanted: u32,
    },
    /// The store is at `store.max_bytes` (must-deliver kinds only: nothing was numbered).
    #[error(
        "the edge's store is full (store.max_bytes); must-deliver messages are refused until retention frees space"
    )]
    StoreFull,
    /// The store cannot write (disk error): must-deliver kinds are refused, nothing numbered.
    #[error("the edge's store cannot write; retry shortly")]
    StoreUnavailable,
}

/// A join waiting for its engine (room sync or remote recovery) before it can be acknowledged.
#[derive(Debug, Clone, Copy)]
pub struct PendingJoin {
    /// The joining connection's shard.
    pub shard: u16,
    /// Its slot on that shard.
    pub slot: u32,
    /// Its slot's generation, so a stale answer is dropped.
    pub generation: u32,
    /// The encoding it reads.
    pub proto: Subprotocol,
    /// The client's position was void (why): its answer starts with a `reset`.
    pub reset: Option<&'static str>,
}

/// A room's numbering: changes whenever the room's seq restarts (never 0).
pub type Epoch = u64;

/// An epoch as clients see it: 16 hex digits (a string, so JavaScript keeps every bit).
pub fn epoch_text(e: Epoch) -> String {
    ShowEpoch(e).to_string()
}

/// An epoch shown as clients see it ([`epoch_text`]), for log fields without an allocation
/// (`old_epoch = %ShowEpoch(e)`): an operator matches a log line with a client's report only if
/// both show the same text. An epoch logged as the bare `u64` shows in decimal.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ShowEpoch(pub Epoch);

impl std::fmt::Display for ShowEpoch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:016x}", self.0)
    }
}

/// A client's epoch text, back. Only the text the edge sends ([`epoch_text`]: 16 lowercase hex
/// digits) is an epoch; anything else is malformed, and the caller refuses it (400 at a
/// handshake, `error` `bad_message` for a `join`) with the reason given, rather than taking it
/// for another numbering and resetting the client.
pub fn parse_epoch(s: &str) -> Result<Epoch, &'static str> {
    roomcast_proto::envelope::validate_epoch(s)?;
    u64::from_str_radix(s, 16).map_err(|_| "an epoch is 16 lowercase hex digits")
}

/// Where a joining client says it was: the last seq it saw, and (optionally) in which
/// numbering.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Since {
    /// The last seq the client saw.
    pub seq: u64,
    /// The numbering that seq belongs to (None: the client did not say).
    pub epoch: Option<Epoch>,
}

/// Where the answer to a publish goes.
pub enum Reply {
    /// The HTTP handler awaiting it.
    Http(tokio::sync::oneshot::Sender<Result<Ack, PublishError>>),
    /// A connection that published over its socket.
    Conn {
        /// The connection's shard.
        shard: u16,
        /// Its slot on that shard.
        slot: u32,
        /// Its slot's generation, so an answer for a closed connection is dropped.
        generation: u32,
    },
    /// Nobody (tests, internal notices).
    None,
}

/// What a batch holds of must-deliver messages: decides what a slow consumer keeps.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MustDeliver {
    /// Every message in the batch is must-deliver: keep the frame whole.
    All,
    /// None is: a slow consumer may drop the frame.
    None,
    /// Some are: a slow consumer gets this frame instead (must-deliver messages only), one per
    /// encoding, with the count of messages it holds.
    Some {
        /// The must-deliver-only frame per encoding (index: `Subprotocol::index`).
        frames: [Option<Bytes>; Subprotocol::COUNT],
        /// Messages in those frames.
        messages: u32,
    },
}

/// One room flush, shared by every shard with members of the room.
#[derive(Debug)]
pub struct Delivery {
    /// The room flushed.
    pub room: RoomName,
    /// Complete frames (WebSocket frames; for SSE, events with the batch's `id`), one per
    /// encoding in use (index: `Subprotocol::index`).
    pub frames: [Option<Bytes>; Subprotocol::COUNT],
    /// Messages in the batch (for delivery counters).
    pub messages: u32,
    /// The highest seq in the batch.
    pub last_seq: u64,
    /// What the batch holds of must-deliver messages.
    pub must_deliver: MustDeliver,
    /// When the oldest message it carries reached its room's batch, and the oldest must-deliver
    /// one (`since` when it carries none): delivery latency, what a member waits for a message at
    /// this edge (the merge window, then the shard's queue and the socket), is measured from
    /// here to the completion of the write to each member.
    pub since: std::time::Instant,
    /// When the oldest must-deliver message it carries reached its room's batch (see `since`).
    pub must_since: std::time::Instant,
    /// Per kind it carries, when that kind's oldest message (and oldest must-deliver one)
    /// reached the batch: each kind's latency counts from its own messages, not the batch's
    /// oldest. Made once per batch (None: a notice, no messages).
    pub kinds: Option<KindTimes>,
    /// The frames compressed for permessage-deflate members, made by the first shard that
    /// needs each form and shared by the others.
    pub deflated: crate::deflate::Deflated,
}

/// When one kind's messages in a batch reached their room's batch (`Delivery::kinds`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KindSince {
    /// The kind's index in the edge's latency kinds (`Config::latency_kinds`).
    pub kind: u16,
    /// When its oldest message in the batch arrived.
    pub since: std::time::Instant,
    /// When its oldest must-deliver message in the batch arrived (None: none is). A kind is
    /// one class by configuration; only `deleted` mixes them: a tombstone is must-deliver, and
    /// a pending droppable message a tombstone takes the place of keeps its class.
    pub must_since: Option<std::time::Instant>,
}

/// The kinds of one batch, shared by every shard and by both variants of its frame.
pub type KindTimes = Arc<[KindSince]>;

/// The join of connection `slot` took effect after `seq`; `replay` (frames in the
/// connection's encoding: a gap notice and/or recovered messages) goes out right after
/// `Joined` and before any live batch.
#[derive(Debug)]
pub struct JoinAck {
    /// The joining connection's slot on the shard.
    pub slot: u32,
    /// Its slot's generation, so an answer for a closed connection is dropped.
    pub generation: u32,
    /// The room joined.
    pub room: RoomName,
    /// The member receives seqs above this one.
    pub seq: u64,
    /// The room's numbering, for `joined`.
    pub epoch: Epoch,
    /// The client's position was void: a `reset` (position 0 in `epoch`) goes before `joined`.
    pub reset: Option<&'static str>,
    /// Frames to send before any live batch: a gap notice and/or recovered messages.
    pub replay: Vec<Bytes>,
    /// The room's online count for `joined` (None: counts are not shown).
    pub online: Option<u64>,
    /// The join could not be answered now (Redis did not answer): the shard closes it with
    /// 1013, and the client comes back with the same `since`.
    pub retry: Option<JoinRetry>,
}

/// Why a join is sent back to come again (1013): nothing is lost, Redis did not answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum JoinRetry {
    /// The read of what it missed since its `since`.
    Recovery,
    /// The room's seq and epoch, which a join waits for on a room this edge does not follow
    /// yet (bounded: [`crate::engine`]'s `SYNC_WAIT_FOR`).
    Sync,
}

/// The answer to a publish over a socket.
#[derive(Debug)]
pub struct Published {
    /// The publishing connection's slot on the shard.
    pub slot: u32,
    /// Its slot's generation, so an answer for a closed connection is dropped.
    pub generation: u32,
    /// The room published to.
    pub room: RoomName,
    /// The seq given, or why the publish was refused.
    pub result: Result<Ack, PublishError>,
}

/// A join the engine refused.
#[derive(Debug)]
pub struct JoinRefused {
    /// The joining connection's slot on the shard.
    pub slot: u32,
    /// Its slot's generation, so an answer for a closed connection is dropped.
    pub generation: u32,
    /// The room it asked to join.
    pub room: RoomName,
    /// The refusal's reason, sent to the client in an `error`.
    pub reason: &'static str,
}

/// What a shard's mailbox carries.
pub enum ShardCmd {
    /// A room flush: write its frame to the room's members on this shard.
    Deliver(Arc<Delivery>),
    /// The join of connection `slot` took effect after `seq` (boxed, as the rarer variants
    /// are: a `ShardCmd` is pushed once per shard per room flush, and 32 bytes rather than 64
    /// is what the engine bench's largest case spent most of its time writing).
    JoinAck(Box<JoinAck>),
    /// The answer to a publish over a socket.
    Published(Box<Published>),
    /// The join of connection `slot` was refused (the edge is at its room bound).
    JoinRefused(Box<JoinRefused>),
    /// Drain: stop accepting, and send every connection a `goaway` to `url` at a random moment
    /// within `period_ms`, then close it (1001).
    Drain {
        /// Where the clients are sent (dispatch's route URL).
        url: Arc<str>,
        /// Over how long the goaways are spread.
        period_ms: u64,
    },
    /// Drain: hold the goaways not sent yet (`true`: the fleet is not taking members), or send
    /// them again (`false`), each as much later as the hold lasted, so the spread is kept.
    DrainHold(bool),
    /// Close every connection with 1001 and stop.
    Shutdown,
    /// Moderation: close a user's connections, or remove a banned user from a room.
    Moderate(Box<Moderate>),
}

/// A moderation action for a shard's connections, and where its count goes (the connections
/// it closed or removed from the room).
pub struct Moderate {
    /// What to do.
    pub action: ModAction,
    /// Where the shard sends the count of connections it closed or removed (None: nobody asks).
    pub reply: Option<tokio::sync::oneshot::Sender<u32>>,
}

/// A moderation action as shards carry it out.
#[derive(Debug, Clone)]
pub enum ModAction {
    /// Close every connection of `user`: an `error` `kicked`, then close 4002 (an SSE stream
    /// gets the event and ends).
    Kick {
        /// The user, as their token's `sub` names them.
        user: Arc<str>,
    },
    /// `user` is banned from `room` until `until_ms`: its connections there (members, or
    /// joining) leave it: an `error` `banned`, then `left` (an SSE stream ends).
    Ban {
        /// The room banned from.
        room: RoomName,
        /// The user, as their token's `sub` names them.
        user: Arc<str>,
        /// When the ban ends, ms since the Unix epoch.
        until_ms: u64,
    },
}

/// What a moderator's delete did: the tombstone published (None: the message was deleted
/// already, nothing was published again), and whether the message was still in the room's
/// history (else only members who saw it live have anything to remove).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Deleted {
    /// The tombstone published (None: the message was deleted already).
    pub tombstone: Option<Ack>,
    /// The message was still in the room's history.
    pub in_history: bool,
}

/// Why a message could not be deleted.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DeleteError {
    /// No message with this seq in the room's current numbering.
    #[error("no message with this seq in the room (its current numbering)")]
    NotFound,
    /// The seq is a tombstone itself.
    #[error("a tombstone cannot be deleted")]
    Tombstone,
    /// Publishing the tombstone failed.
    #[error(transparent)]
    Publish(PublishError),
}

/// Where the answer to a delete goes.
pub type DeleteReply = tokio::sync::oneshot::Sender<Result<Deleted, DeleteError>>;

/// What a room engine handles. Every command about a room goes to the engine that owns the room
/// (see [`engine_of`]), so one engine sees all of a room's events in one order.
pub enum EngineCmd {
    /// Publish a message (from the publish API or a connection) to the room.
    Publish {
        /// The room.
        room: RoomName,
        /// Boxed: commands stay small (the mailboxes hold them by value).
        msg: Box<NewMessage>,
        /// Where the answer goes.
        reply: Reply,
    },
    /// A connection asks to join; the engine answers `JoinAck` on the shard's link, in order
    /// with the room's deliveries, and counts the shard as interested in `proto` frames.
    Join {
        /// The room.
        room: RoomName,
        /// The joining connection's shard.
        shard: u16,
        /// Its slot on that shard.
        slot: u32,
        /// Its slot's generation, so a stale answer is dropped.
        generation: u32,
        /// The encoding it reads.
        proto: Subprotocol,
        /// Where the client says it was, for recovery (None: a fresh join).
        since: Option<Since>,
    },
    /// One member (joined or joining) of `room` left a shard: the engine counts members per
    /// room (joins in, these out) to know a room's fan-out demand.
    Left {
        /// The room.
        room: RoomName,
    },
    /// The shard has no more members (joined or joining) of `room` in `proto`.
    NoInterest {
        /// The room.
        room: RoomName,
        /// The shard.
        shard: u16,
        /// The encoding nobody there reads any more.
        proto: Subprotocol,
    },
    /// Redis mode: a message numbered by Redis, from the room's channel.
    Remote {
        /// The room.
        room: RoomName,
        /// Boxed: the one large variant would make every mail larger.
        msg: Box<PushMessage>,
        /// Its kind is must-deliver.
        must_deliver: bool,
        /// The numbering Redis gave it.
        epoch: Epoch,
    },
    /// Redis mode: the room's seq and epoch in Redis, read right after (re)subscribing.
    Synced {
        /// The room.
        room: RoomName,
        /// The room's seq in Redis.
        seq: u64,
        /// The room's epoch in Redis.
        epoch: Epoch,
        /// The room's latest-state messages (conflated kinds) in Redis, of this epoch.
        latest: Vec<PushMessage>,
    },
    /// Redis mode: the answer to a fill of `from..=to` (`ok: false`: Redis could not answer).
    Filled {
        /// The room.
        room: RoomName,
        /// First seq asked for.
        from: u64,
        /// Last seq asked for.
        to: u64,
        /// The messages found, each with whether it is must-deliver.
        messages: Vec<(PushMessage, bool)>,
        /// False when Redis could not answer.
        ok: bool,
    },
    /// Redis mode: must-deliver messages for the room's joins with an old `since` (one read
    /// serves every join waiting on the room).
    Recovered {
        /// The room.
        room: RoomName,
        /// The read's lowest `since`.
        since: u64,
        /// The last seq fetched.
        upto: u64,
        /// The must-deliver messages after `since`, in seq order.
        messages: Vec<PushMessage>,
        /// Redis's stream no longer holds seqs at or below this: the joiner gets a gap.
        evicted_upto: u64,
        /// False when Redis could not answer.
        ok: bool,
    },
    /// Redis mode: the outcome of a publish, to answer.
    PublishDone {
        /// The room.
        room: RoomName,
        /// Where the answer goes.
        reply: Reply,
        /// The seq Redis gave, or why the publish failed.
        result: Result<Ack, PublishError>,
    },
    /// Redis mode: the connection to Redis went down or came back (sent to every engine).
    Redis {
        /// True when the connection is back.
        up: bool,
    },
    /// The store made every record batch of this engine up to `token` durable (as the fsync
    /// policy says).
    Durable {
        /// The last record batch now durable.
        token: u64,
    },
    /// The store could not write this engine's record batches up to `token` (a full disk):
    /// their must-deliver messages are refused (what they numbered is written once it can be).
    StoreFailed {
        /// The last record batch that failed.
        token: u64,
    },
    /// Redis mode: the room's members over every edge changed (announced on its channel).
    Online {
        /// The room.
        room: RoomName,
        /// Its members over every edge.
        total: u64,
    },
    /// Room figures for `GET /v1/rooms/{room}`.
    RoomStats {
        /// The room.
        room: RoomName,
        /// Where the figures go (None: the engine does not know the room).
        reply: tokio::sync::oneshot::Sender<Option<RoomStats>>,
    },
    /// This engine's largest rooms by members (the dashboard's hottest rooms).
    TopRooms {
        /// How many rooms at most.
        n: usize,
        /// Where the list goes, largest first.
        reply: tokio::sync::oneshot::Sender<Vec<RoomBrief>>,
    },
    /// Moderation (single node): delete message `seq` of `room`: a tombstone takes its place in
    /// history and a numbered tombstone goes to members.
    Delete {
        /// The room.
        room: RoomName,
        /// The message to delete.
        seq: u64,
        /// Where the outcome goes.
        reply: DeleteReply,
    },
}

/// A room in the dashboard's list of hottest rooms.
#[derive(Debug, Clone, serde::Serialize)]
pub struct RoomBrief {
    /// The room's name.
    pub room: String,
    /// Members on this edge.
    pub members: u64,
    /// Messages published per second (EWMA).
    pub publish_rate: f64,
    /// The merge window the room uses now.
    pub window_ms: u64,
    /// Droppable messages a second the room shows while sampled (None: not sampled).
    pub sampling_visible_rate: Option<f64>,
    /// Last seq assigned.
    pub seq: u64,
}

impl EngineCmd {
    /// The room whose engine must handle this command (None: every engine).
    pub fn room(&self) -> Option<&RoomName> {
        match self {
            Self::Publish { room, .. }
            | Self::Join { room, .. }
            | Self::Left { room }
            | Self::NoInterest { room, .. }
            | Self::Remote { room, .. }
            | Self::Synced { room, .. }
            | Self::Filled { room, .. }
            | Self::Recovered { room, .. }
            | Self::RoomStats { room, .. }
            | Self::Online { room, .. }
            | Self::Delete { room, .. }
            | Self::PublishDone { room, .. } => Some(room),
            Self::Redis { .. } | Self::Durable { .. } | Self::StoreFailed { .. } | Self::TopRooms { .. } => None,
        }
    }
}

/// What `GET /v1/rooms/{room}` shows.
#[derive(Debug, Clone, serde::Serialize)]
pub struct RoomStats {
    /// The room's name.
    pub room: String,
    /// The room's numbering (as clients see it in `joined`).
    pub epoch: String,
    /// Last seq assigned.
    pub seq: u64,
    /// Last seq handed to shards.
    pub flushed_seq: u64,
    /// Shards with members, per encoding.
    pub shards_json: u32,
    /// Shards with rkyv members.
    pub shards_rkyv: u32,
    /// Shards with SSE members.
    pub shards_sse: u32,
    /// The merge window the room uses now (widened when shards fall behind).
    pub window_ms: u64,
    /// Droppable messages per second shown when sampling is on, else null.
    pub sampling_visible_rate: Option<f64>,
    /// Messages kept for recovery: must-deliver, droppable.
    pub history_must_deliver: usize,
    /// Droppable messages kept for join replays.
    pub history_droppable: usize,
    /// Highest must-deliver seq evicted from history (a `since` below it gets a gap).
    pub history_evicted_upto: u64,
    /// Published messages per second (EWMA).
    pub publish_rate: f64,
    /// Members on this edge (joined or joining, every shard).
    pub members: u64,
    /// Members on every edge: this edge's count alone, or with a shared bus the total the
    /// edges last announced (the HTTP answer replaces it with Redis's own figures).
    pub online: u64,
}

/// What travels between threads to a shard (which hosts a room engine too).
pub enum Mail {
    /// Everything one shard thread produced for this one during a turn: its connections'
    /// signalling for this shard's engine, and its engine's output for this shard's
    /// connections. One message (and at most one doorbell) per peer per turn.
    Turn {
        /// Commands for this shard's engine.
        engine: Vec<EngineCmd>,
        /// Commands for this shard's connections.
        shard: Vec<ShardCmd>,
    },
    /// From outside the shards (publish API, Redis bridge).
    Engine(EngineCmd),
    /// Control from the main thread (drain, shutdown).
    Shard(ShardCmd),
}

/// Why a mail was not taken.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MailError {
    /// The mailbox is at its bound: the receiver is behind. Retry later.
    Full,
    /// The receiver has stopped.
    Gone,
}

/// A shard's (or an engine's) mailbox: two bounded lanes plus an eventfd doorbell, rung only
/// when the receiver is parked in the kernel (so a burst of mail costs one write, not one per
/// message).
///
/// The upstream lane carries the publish API's commands (publishes, deletes); the other lane
/// everything else (peers' turns: joins, leaves, the engines' output; the Redis bridge's
/// answers; control). The receiver takes the upstream lane first, so a storm of joins (a
/// drained edge's members arriving) neither refuses a gift as busy nor queues it behind
/// thousands of turns: upstream and downstream are separate inside the edge as well as
/// outside it.
#[derive(Clone)]
pub struct Mailbox {
    tx: Sender<Mail>,
    upstream: Sender<Mail>,
    doorbell: Arc<OwnedFd>,
    parked: Arc<AtomicBool>,
}

/// The receiving end of a [`Mailbox`]: both lanes, the upstream one taken first.
pub struct Inbox {
    upstream: Receiver<Mail>,
    mail: Receiver<Mail>,
}

impl Inbox {
    /// Mail waiting in the upstream lane now (a receiver takes at most this many from it
    /// before turning to the other lane, so neither lane can starve the other).
    pub fn upstream_len(&self) -> usize {
        self.upstream.len()
    }

    /// The next upstream mail, if any.
    pub fn try_recv_upstream(&self) -> Option<Mail> {
        self.upstream.try_recv().ok()
    }

    /// The next mail of the other lane, if any.
    pub fn try_recv_mail(&self) -> Option<Mail> {
        self.mail.try_recv().ok()
    }

    /// The next mail, upstream first.
    pub fn try_recv(&self) -> Option<Mail> {
        self.try_recv_upstream().or_else(|| self.try_recv_mail())
    }

    /// Nothing waits in either lane.
    pub fn is_empty(&self) -> bool {
        self.upstream.is_empty() && self.mail.is_empty()
    }

    /// Waits up to `wait` for mail, upstream first. `Disconnected` once every sender is gone
    /// (the lanes' senders live in the same [`Mailbox`], so they go together).
    pub fn recv_timeout(&self, wait: std::time::Duration) -> Result<Mail, RecvTimeoutError> {
        if let Some(m) = self.try_recv() {
            return Ok(m);
        }
        crossbeam_channel::select_biased! {
            recv(self.upstream) -> m => m.map_err(|_| RecvTimeoutError::Disconnected),
            recv(self.mail) -> m => m.map_err(|_| RecvTimeoutError::Disconnected),
            default(wait) => Err(RecvTimeoutError::Timeout),
        }
    }
}

impl Mailbox {
    /// A mailbox whose lanes hold `capacity` mails (`upstream` for the publish API's lane) and
    /// its receiving end; `doorbell` and `parked` are the receiver's.
    pub fn pair(capacity: usize, upstream: usize, doorbell: Arc<OwnedFd>, parked: Arc<AtomicBool>) -> (Self, Inbox) {
        let (tx, mail) = crossbeam_channel::bounded(capacity);
        let (up_tx, up_rx) = crossbeam_channel::bounded(upstream);
        (Self { tx, upstream: up_tx, doorbell, parked }, Inbox { upstream: up_rx, mail })
    }

    fn ring(&self) {
        if self.parked.swap(false, Ordering::SeqCst) {
            crate::sys::eventfd_ring(self.doorbell.as_raw_fd());
        }
    }

    /// Never blocks: a full mailbox hands the mail back.
    pub fn try_send(&self, mail: Mail) -> Result<(), (MailError, Mail)> {
        self.send_on(&self.tx, mail)
    }

    /// Never blocks, upstream lane (the publish API's commands): a full lane hands the mail
    /// back.
    pub fn try_send_upstream(&self, mail: Mail) -> Result<(), (MailError, Mail)> {
        self.send_on(&self.upstream, mail)
    }

    fn send_on(&self, lane: &Sender<Mail>, mail: Mail) -> Result<(), (MailError, Mail)> {
        match lane.try_send(mail) {
            Ok(()) => {
                self.ring();
                Ok(())
            }
            Err(TrySendError::Full(m)) => {
                self.ring();
                Err((MailError::Full, m))
            }
            Err(TrySendError::Disconnected(m)) => Err((MailError::Gone, m)),
        }
    }

    /// Blocks while the mailbox is full (control from the main thread only, never a shard).
    pub fn send_blocking(&self, mail: Mail) -> bool {
        let ok = self.tx.send(mail).is_ok();
        self.ring();
        ok
    }
}

/// The stable hash that places a room on an engine: FNV-1a 64 of the name, then a 64-bit
/// finalizer (murmur3's fmix64: FNV alone leaves the high bits of similar names like `room-17`
/// and `room-18` correlated, and the reduction reads the high bits), reduced by multiply-shift.
/// Stable across processes and versions (not `DefaultHasher`).
pub fn engine_of(room: &str, engines: usize) -> usize {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in room.bytes() {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    h ^= h >> 33;
    h = h.wrapping_mul(0xff51_afd7_ed55_8ccd);
    h ^= h >> 33;
    h = h.wrapping_mul(0xc4ce_b9fe_1a85_ec53);
    h ^= h >> 33;
    ((u128::from(h) * engines as u128) >> 64) as usize
}

/// The handle publishers, the Redis bridge and the main thread use to reach the engines: each
/// command goes to the engine that owns its room, without blocking.
#[derive(Clone)]
pub struct BusHandle {
    engines: Arc<[Mailbox]>,
    rejected_busy: prometheus::IntCounter,
    lane_full: prometheus::IntCounter,
}

impl BusHandle {
    /// A handle over the engines' mailboxes, by engine id. A publish refused for a full
    /// upstream lane counts in `rejected_busy` (publish_rejected_total{reason="engine_busy"})
    /// and in `lane_full` (engine_busy_total{cause="upstream_full"}).
    pub fn new(
        engines: Vec<Mailbox>,
        rejected_busy: prometheus::IntCounter,
        lane_full: prometheus::IntCounter,
    ) -> Self {
        Self { engines: engines.into(), rejected_busy, lane_full }
    }

    fn refused_busy(&self) {
        self.rejected_busy.inc();
        self.lane_full.inc();
    }

    /// How many engines there are.
    pub fn engines(&self) -> usize {
        self.engines.len()
    }

    /// Engine `i`'s mailbox.
    pub fn mailbox(&self, i: usize) -> Option<&Mailbox> {
        self.engines.get(i)
    }

    /// Sends to the room's engine (or to every engine for room-less commands). `Err(Full)`:
    /// the engine is behind; the command is handed back.
    pub fn try_send(&self, cmd: EngineCmd) -> Result<(), (MailError, EngineCmd)> {
        let n = self.engines.len();
        if let Some(room) = cmd.room() {
            let e = engine_of(room, n);
            self.engines[e].try_send(Mail::Engine(cmd)).map_err(|(err, m)| match m {
                Mail::Engine(c) => (err, c),
                _ => unreachable!("handed back what was sent"),
            })
        } else {
            // Best effort here; the Redis bridge uses `send_async`, which waits for room.
            // Other room-less commands name their engine: they go to its mailbox directly.
            let EngineCmd::Redis { up } = cmd else { return Err((MailError::Gone, cmd)) };
            for mb in self.engines.iter() {
                let _ = mb.try_send(Mail::Engine(EngineCmd::Redis { up }));
            }
            Ok(())
        }
    }

    /// Sends a publish API command (publish, delete) to its room's engine by the upstream lane.
    fn try_send_upstream(&self, cmd: EngineCmd) -> Result<(), (MailError, EngineCmd)> {
        let Some(room) = cmd.room() else { return Err((MailError::Gone, cmd)) };
        let e = engine_of(room, self.engines.len());
        self.engines[e].try_send_upstream(Mail::Engine(cmd)).map_err(|(err, m)| match m {
            Mail::Engine(c) => (err, c),
            _ => unreachable!("handed back what was sent"),
        })
    }

    /// Sends, waiting (asynchronously) while the engine's mailbox is full: for the Redis
    /// bridge, whose answers must not be lost. Gives up only when the engine has stopped.
    pub async fn send_async(&self, mut cmd: EngineCmd) {
        let mut wait = std::time::Duration::from_micros(200);
        if let EngineCmd::Redis { up } = cmd {
            // Every engine must learn it: wait for room in each mailbox.
            for mb in self.engines.iter() {
                let mut mail = Mail::Engine(EngineCmd::Redis { up });
                while let Err((MailError::Full, m)) = mb.try_send(mail) {
                    mail = m;
                    tokio::time::sleep(wait).await;
                }
            }
            return;
        }
        loop {
            match self.try_send(cmd) {
                Ok(()) | Err((MailError::Gone, _)) => return,
                Err((MailError::Full, c)) => {
                    cmd = c;
                    tokio::time::sleep(wait).await;
                    wait = (wait * 2).min(std::time::Duration::from_millis(50));
                }
            }
        }
    }

    /// Room figures (from async code).
    /// The `n` largest rooms by members over every engine (those answering within 500 ms).
    pub async fn top_rooms(&self, n: usize) -> Vec<RoomBrief> {
        let mut waits = Vec::new();
        for mb in self.engines.iter() {
            let (tx, rx) = tokio::sync::oneshot::channel();
            if mb.try_send(Mail::Engine(EngineCmd::TopRooms { n, reply: tx })).is_ok() {
                waits.push(rx);
            }
        }
        // An engine that is behind does not hold the dashboard: it is left out this time.
        let mut all = Vec::new();
        let deadline = tokio::time::Instant::now() + std::time::Duration::from_millis(500);
        for rx in waits {
            if let Ok(Ok(rooms)) = tokio::time::timeout_at(deadline, rx).await {
                all.extend(rooms);
            }
        }
        all.sort_by(|a, b| b.members.cmp(&a.members).then(b.publish_rate.total_cmp(&a.publish_rate)));
        all.truncate(n);
        all
    }

    /// The room's figures from its engine (None: the engine is busy or gone).
    pub async fn room_stats(&self, room: RoomName) -> Option<RoomStats> {
        let (tx, rx) = tokio::sync::oneshot::channel();
        self.try_send(EngineCmd::RoomStats { room, reply: tx }).ok()?;
        rx.await.ok().flatten()
    }

    /// Deletes message `seq` of `room` (single node: the room's engine does it), answered once
    /// the tombstone is stored.
    pub async fn delete(&self, room: RoomName, seq: u64) -> Result<Deleted, DeleteError> {
        let (tx, rx) = tokio::sync::oneshot::channel();
        match self.try_send_upstream(EngineCmd::Delete { room, seq, reply: tx }) {
            Ok(()) => {}
            Err((MailError::Full, _)) => return Err(DeleteError::Publish(PublishError::Busy { retry_after_ms: 100 })),
            Err((MailError::Gone, _)) => return Err(DeleteError::Publish(PublishError::ShuttingDown)),
        }
        rx.await.unwrap_or(Err(DeleteError::Publish(PublishError::ShuttingDown)))
    }

    /// Publishes and waits for the seq (from async code), by the engine's upstream lane. A full
    /// lane is refused at once (503 with Retry-After): publishers back off, memory stays
    /// bounded. Joins and other signalling travel in the other lane and cannot fill this one.
    pub async fn publish(&self, room: RoomName, msg: NewMessage) -> Result<Ack, PublishError> {
        let (tx, rx) = tokio::sync::oneshot::channel();
        match self.try_send_upstream(EngineCmd::Publish { room, msg: Box::new(msg), reply: Reply::Http(tx) }) {
            Ok(()) => {}
            Err((MailError::Full, _)) => {
                self.refused_busy();
                return Err(PublishError::Busy { retry_after_ms: 100 });
            }
            Err((MailError::Gone, _)) => return Err(PublishError::ShuttingDown),
        }
        rx.await.unwrap_or(Err(PublishError::ShuttingDown))
    }
}

impl BusHandle {
    /// Publishes several messages and waits for every answer, in order (from async code).
    /// Every message is handed to its room's engine before its answer is awaited, so a batch
    /// costs about one wait, not one per message, and messages to one room keep the batch's
    /// order (an engine's upstream lane is a queue). A lane filled by the batch itself (more
    /// messages than it holds) is waited on: the batch's oldest message still unanswered is
    /// awaited, which frees its place, and the next is sent. A lane full while none of the
    /// batch is in flight is an engine behind: that message and every one after it are
    /// refused as busy without being sent (each counted), so that none sent after a refused
    /// one overtakes it when the publisher retries.
    pub async fn publish_many(
        &self,
        msgs: impl IntoIterator<Item = (RoomName, NewMessage)>,
    ) -> Vec<Result<Ack, PublishError>> {
        type Answer = tokio::sync::oneshot::Receiver<Result<Ack, PublishError>>;
        let mut answers: Vec<Option<Result<Ack, PublishError>>> = Vec::new();
        let mut in_flight: std::collections::VecDeque<(usize, Answer)> = std::collections::VecDeque::new();
        let mut refused: Option<PublishError> = None;
        for (room, msg) in msgs {
            let i = answers.len();
            answers.push(None);
            if let Some(e) = &refused {
                if matches!(e, PublishError::Busy { .. }) {
                    self.refused_busy();
                }
                answers[i] = Some(Err(e.clone()));
                continue;
            }
            let (tx, rx) = tokio::sync::oneshot::channel();
            let mut cmd = EngineCmd::Publish { room, msg: Box::new(msg), reply: Reply::Http(tx) };
            loop {
                match self.try_send_upstream(cmd) {
                    Ok(()) => {
                        in_flight.push_back((i, rx));
                        break;
                    }
                    Err((MailError::Full, back)) => {
                        if let Some((j, oldest)) = in_flight.pop_front() {
                            answers[j] = Some(oldest.await.unwrap_or(Err(PublishError::ShuttingDown)));
                            cmd = back;
                            continue;
                        }
                        self.refused_busy();
                        let e = PublishError::Busy { retry_after_ms: 100 };
                        answers[i] = Some(Err(e.clone()));
                        refused = Some(e);
                        break;
                    }
                    Err((MailError::Gone, _)) => {
                        answers[i] = Some(Err(PublishError::ShuttingDown));
                        refused = Some(PublishError::ShuttingDown);
                        break;
                    }
                }
            }
        }
        for (j, rx) in in_flight {
            answers[j] = Some(rx.await.unwrap_or(Err(PublishError::ShuttingDown)));
        }
        answers.into_iter().map(|a| a.unwrap_or(Err(PublishError::ShuttingDown))).collect()
    }
}

/// Wraps a payload into one complete, unmasked server frame: the bytes every member gets (for
/// SSE, an event without an `id`).
pub fn frame(proto: Subprotocol, payload: &[u8]) -> Bytes {
    frame_at(proto, payload, None)
}

/// Like [`frame`]; an SSE event also carries `id: EPOCH:SEQ` when `at` is given (the position
/// a client holds once it has this event), which WebSocket framing has no place for.
pub fn frame_at(proto: Subprotocol, payload: &[u8], at: Option<(Epoch, u64)>) -> Bytes {
    if proto == Subprotocol::Sse {
        let id = at.map(|(epoch, seq)| roomcast_proto::sse::event_id(&epoch_text(epoch), seq));
        return Bytes::from(roomcast_proto::sse::event(id.as_deref(), payload));
    }
    let opcode = if proto.is_binary() { roomcast_proto::ws::OpCode::Binary } else { roomcast_proto::ws::OpCode::Text };
    let mut hdr = [0u8; 10];
    let n = roomcast_proto::ws::encode_header(true, opcode, payload.len(), &mut hdr);
    let mut v = Vec::with_capacity(n + payload.len());
    v.extend_from_slice(&hdr[..n]);
    v.extend_from_slice(payload);
    Bytes::from(v)
}

/// Microseconds since the Unix epoch.
pub fn now_us() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_micros() as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Pushed once per shard per room flush: keep it small (the engine bench's largest case was
    /// dominated by writing 64-byte commands).
    #[test]
    fn shard_commands_stay_small() {
        assert!(std::mem::size_of::<ShardCmd>() <= 32, "{}", std::mem::size_of::<ShardCmd>());
    }

    /// Engine commands travel in every shard's signalling batch: the rare large ones are boxed,
    /// so a command is no larger than a publish (room, kind, user, body, reply).
    #[test]
    fn engine_commands_stay_small() {
        assert!(std::mem::size_of::<EngineCmd>() <= 112, "{}", std::mem::size_of::<EngineCmd>());
    }

    /// What the edge writes reads back as the same epoch; anything else is refused, never taken
    /// for some other numbering (it was read as 0, and the client got a `reset`).
    #[test]
    fn epochs_read_back_exactly_what_was_sent() {
        for e in [1, 0xab, 1_764_000_000_000_000, u64::MAX] {
            assert_eq!(parse_epoch(&epoch_text(e)), Ok(e));
        }
        assert_eq!(epoch_text(0xab), "00000000000000ab");
        assert_eq!(format!("{}", ShowEpoch(1_764_000_000_000_000)), "0006445941624000");
        for bad in ["", "1", "00ab", "00000000000000AB", "1764000000000000000", "000000000000000z", "-000000000000001"]
        {
            assert!(parse_epoch(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn rooms_spread_over_engines_and_stay_put() {
        let mut counts = [0usize; 8];
        for i in 0..8000 {
            counts[engine_of(&format!("room-{i}"), 8)] += 1;
        }
        // 1,000 expected each; similar names must not cluster (FNV-1a alone gave 600..1,700).
        assert!(counts.iter().all(|&c| (880..1120).contains(&c)), "{counts:?}");
        // Stable across processes and versions: a fixed function of the name.
        assert_eq!(engine_of("lobby", 1), 0);
        assert_eq!(engine_of("lobby", 80), engine_of("lobby", 80));
        assert!((0..1000).all(|n| engine_of(&n.to_string(), 80) < 80));
    }

    fn lanes(capacity: usize, upstream: usize) -> (Mailbox, Inbox) {
        Mailbox::pair(capacity, upstream, Arc::new(crate::sys::eventfd().unwrap()), Arc::new(AtomicBool::new(false)))
    }

    fn counters() -> (prometheus::IntCounter, prometheus::IntCounter) {
        (prometheus::IntCounter::new("busy", "busy").unwrap(), prometheus::IntCounter::new("full", "full").unwrap())
    }

    /// A batch larger than the engine's upstream lane waits for its own earlier messages to
    /// be answered instead of refusing the rest; a lane full of other publishers' work refuses
    /// the message and all after it, each counted.
    #[tokio::test]
    async fn a_batch_waits_on_itself_but_not_on_an_engine_behind() {
        let (mb, inbox) = lanes(4, 4);
        let (busy, full) = counters();
        let bus = BusHandle::new(vec![mb], busy.clone(), full.clone());
        let msg = |n: u64| NewMessage { kind: "gift".into(), user: String::new(), body: n.to_string(), idem: None };
        // An engine that numbers what it gets, until every sender is gone.
        let engine = std::thread::spawn(move || {
            let mut seq = 0;
            loop {
                match inbox.recv_timeout(std::time::Duration::from_secs(30)) {
                    Ok(Mail::Engine(EngineCmd::Publish { reply: Reply::Http(tx), .. })) => {
                        seq += 1;
                        let _ = tx.send(Ok(Ack { seq, ts_us: seq, replayed: false }));
                    }
                    Ok(_) => {}
                    Err(RecvTimeoutError::Disconnected) => break,
                    Err(RecvTimeoutError::Timeout) => panic!("no mail for 30 s"),
                }
            }
        });
        let answers = bus.publish_many((0..50).map(|n| (RoomName::from("r"), msg(n)))).await;
        let seqs: Vec<u64> = answers.iter().map(|a| a.as_ref().map(|ack| ack.seq).unwrap()).collect();
        assert_eq!(seqs, (1..=50).collect::<Vec<u64>>(), "all 50 through a lane of 4, in order");
        assert_eq!(busy.get(), 0);
        drop(bus);
        engine.join().unwrap();

        // A lane already full with another publisher's work: refused, every one counted.
        let (mb, _inbox) = lanes(4, 1);
        let bus = BusHandle::new(vec![mb], busy.clone(), full.clone());
        let (otx, _orx) = tokio::sync::oneshot::channel();
        assert!(bus.try_send_upstream(EngineCmd::Delete { room: "r".into(), seq: 1, reply: otx }).is_ok());
        let answers = bus.publish_many((0..3).map(|n| (RoomName::from("r"), msg(n)))).await;
        assert!(answers.iter().all(|a| matches!(a, Err(PublishError::Busy { .. }))), "{answers:?}");
        assert_eq!((busy.get(), full.get()), (3, 3));
    }

    /// The publish API's lane is its own: a mailbox full of signalling (a storm of joins) does
    /// not refuse a gift, and the engine takes the gift before the joins sent earlier. Only a
    /// full upstream lane refuses (503 + Retry-After), counted; nothing waits without bound.
    #[tokio::test]
    async fn joins_that_fill_the_mailbox_neither_refuse_nor_delay_a_publish() {
        let (mb, inbox) = lanes(1, 1);
        let (busy, full) = counters();
        let bus = BusHandle::new(vec![mb.clone()], busy.clone(), full.clone());
        let join = || EngineCmd::Join {
            room: "r".into(),
            shard: 0,
            slot: 1,
            generation: 1,
            proto: Subprotocol::Json,
            since: None,
        };
        assert!(mb.try_send(Mail::Engine(join())).is_ok());
        assert!(matches!(mb.try_send(Mail::Engine(join())), Err((MailError::Full, _))), "signalling lane full");
        let gift = |b: &str| NewMessage { kind: "gift".into(), user: String::new(), body: b.into(), idem: None };
        let pending = tokio::spawn({
            let bus = bus.clone();
            async move { bus.publish("r".into(), gift("1")).await }
        });
        // The gift is in its lane (not refused) and comes out first.
        let first = loop {
            if inbox.upstream_len() > 0 {
                break inbox.try_recv().unwrap();
            }
            tokio::task::yield_now().await;
        };
        let Mail::Engine(EngineCmd::Publish { reply: Reply::Http(tx), .. }) = first else {
            panic!("the join came first")
        };
        assert!(matches!(inbox.try_recv(), Some(Mail::Engine(EngineCmd::Join { .. }))));
        assert!(inbox.try_recv().is_none() && inbox.is_empty());
        tx.send(Ok(Ack { seq: 7, ts_us: 1, replayed: false })).unwrap();
        assert_eq!(pending.await.unwrap().map(|a| a.seq), Ok(7));
        assert_eq!((busy.get(), full.get()), (0, 0));

        // A full upstream lane refuses at once, counted in both counters.
        let (otx, _orx) = tokio::sync::oneshot::channel();
        assert!(bus.try_send_upstream(EngineCmd::Delete { room: "r".into(), seq: 1, reply: otx }).is_ok());
        match bus.publish("r".into(), gift("2")).await {
            Err(PublishError::Busy { retry_after_ms }) => assert!(retry_after_ms > 0),
            other => panic!("{other:?}"),
        }
        assert_eq!((busy.get(), full.get()), (1, 1));
        drop(inbox);
        assert_eq!(bus.publish("r".into(), gift("3")).await, Err(PublishError::ShuttingDown), "engine gone");
    }
}
