//! The bus: where a room's messages get their sequence numbers, are merged within the window,
//! serialized once per encoding in use, wrapped once into a WebSocket frame, and handed to every
//! shard that has members of the room.
//!
//! The embedded default is [`local::LocalBus`]: one thread owns every room's publish state, so
//! ordering is trivial (the order it assigns seqs is the order it delivers them) and the HTTP
//! answer carries the exact seq. Shards and the publish API talk to it over a channel.

pub mod local;
pub mod policy;
pub mod redis;

use std::os::fd::{AsRawFd, OwnedFd};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use bytes::Bytes;
use crossbeam_channel::Sender;
use roomcast_proto::Subprotocol;
use roomcast_proto::envelope::PushMessage;

/// Room names are shared between the bus and every shard without copying.
pub type RoomName = Arc<str>;

/// A message as a publisher sent it, before the bus numbers it.
#[derive(Debug, Clone)]
pub struct NewMessage {
    pub kind: String,
    pub user: String,
    /// Validated JSON text.
    pub body: String,
}

/// What a publisher learns.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct Ack {
    pub seq: u64,
    pub ts_us: u64,
}

/// Why a publish was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PublishError {
    #[error("the edge is shutting down")]
    ShuttingDown,
    #[error("too many rooms ({0}); refusing to create another")]
    TooManyRooms(usize),
    #[error("unknown kind {0:?}: publish one of the configured kinds")]
    UnknownKind(String),
    /// Over a token bucket. Droppable kinds: the message is dropped (and counted). Must-deliver
    /// kinds: rejected, so the publisher retries; never silently dropped.
    #[error("rate limited ({scope}); retry after {retry_after_ms} ms")]
    RateLimited { scope: &'static str, retry_after_ms: u64, must_deliver: bool },
    /// The room is so hot that even the widest merge window is not enough: droppable messages
    /// are sampled down to the visible rate and this one was not kept.
    #[error("sampled out: the room shows at most its visible rate of droppable messages")]
    Sampled,
    /// Redis (the seq authority in cluster mode) is unreachable; retry.
    #[error("the message bus (redis) is unavailable; retry shortly")]
    BusUnavailable,
}

/// A join waiting for the bus (room sync or remote recovery) before it can be acknowledged.
#[derive(Debug, Clone, Copy)]
pub struct PendingJoin {
    pub shard: u16,
    pub slot: u32,
    pub generation: u32,
    pub proto: Subprotocol,
}

/// Where the answer to a publish goes.
pub enum Reply {
    /// The HTTP handler awaiting it.
    Http(tokio::sync::oneshot::Sender<Result<Ack, PublishError>>),
    /// A connection that published over its socket.
    Conn { shard: u16, slot: u32, generation: u32 },
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
    Some { frames: [Option<Bytes>; 2], messages: u32 },
}

/// One room flush, shared by every shard with members of the room.
#[derive(Debug)]
pub struct Delivery {
    pub room: RoomName,
    /// Complete WebSocket frames, one per encoding in use (index: `Subprotocol::index`).
    pub frames: [Option<Bytes>; 2],
    /// Messages in the batch (for delivery counters).
    pub messages: u32,
    pub last_seq: u64,
    pub must_deliver: MustDeliver,
}

/// What a shard's mailbox carries.
pub enum ShardCmd {
    Deliver(Arc<Delivery>),
    /// The join of connection `slot` took effect after `seq`; `replay` (frames in the
    /// connection's encoding: a gap notice and/or recovered messages) goes out right after
    /// `Joined` and before any live batch.
    JoinAck {
        slot: u32,
        generation: u32,
        room: RoomName,
        seq: u64,
        replay: Vec<Bytes>,
    },
    /// The answer to a publish over a socket.
    Published {
        slot: u32,
        generation: u32,
        room: RoomName,
        result: Result<Ack, PublishError>,
    },
    /// Drain: stop accepting, and send every connection a `goaway` to `url` at a random moment
    /// within `period_ms`, then close it (1001).
    Drain {
        url: Arc<str>,
        period_ms: u64,
    },
    /// Close every connection with 1001 and stop.
    Shutdown,
}

/// What the bus thread's channel carries.
pub enum BusCmd {
    Publish {
        room: RoomName,
        msg: NewMessage,
        reply: Reply,
    },
    /// A connection asks to join; the bus answers `JoinAck` on the shard's mailbox, in order
    /// with the room's deliveries, and counts the shard as interested in `proto` frames.
    Join {
        room: RoomName,
        shard: u16,
        slot: u32,
        generation: u32,
        proto: Subprotocol,
        since: Option<u64>,
    },
    /// One member (joined or joining) of `room` left a shard: the bus counts members per room
    /// (joins in, these out) to know a room's fan-out demand.
    Left {
        room: RoomName,
    },
    /// The shard has no more members (joined or joining) of `room` in `proto`.
    NoInterest {
        room: RoomName,
        shard: u16,
        proto: Subprotocol,
    },
    /// A shard's send backlog, reported every tick: drives adaptive merging.
    Load {
        shard: u16,
        queued_bytes: usize,
    },
    /// Redis mode: a message numbered by Redis, from the room's channel.
    Remote {
        room: RoomName,
        msg: PushMessage,
        must_deliver: bool,
    },
    /// Redis mode: the room's seq in Redis, read right after (re)subscribing.
    Synced {
        room: RoomName,
        seq: u64,
    },
    /// Redis mode: the answer to a fill of `from..=to` (`ok: false`: Redis could not answer).
    Filled {
        room: RoomName,
        from: u64,
        to: u64,
        messages: Vec<(PushMessage, bool)>,
        ok: bool,
    },
    /// Redis mode: must-deliver messages for a joining connection's `since`.
    Recovered {
        room: RoomName,
        since: u64,
        upto: u64,
        join: PendingJoin,
        messages: Vec<PushMessage>,
        evicted_upto: u64,
        ok: bool,
    },
    /// Redis mode: the outcome of a publish, to answer.
    PublishDone {
        reply: Reply,
        result: Result<(RoomName, Ack), PublishError>,
    },
    /// Redis mode: the connection to Redis went down or came back.
    Redis {
        up: bool,
    },
    /// Room figures for `GET /v1/rooms/{room}`.
    RoomStats {
        room: RoomName,
        reply: tokio::sync::oneshot::Sender<Option<RoomStats>>,
    },
    Shutdown,
}

/// What `GET /v1/rooms/{room}` shows.
#[derive(Debug, Clone, serde::Serialize)]
pub struct RoomStats {
    pub room: String,
    /// Last seq assigned.
    pub seq: u64,
    /// Last seq handed to shards.
    pub flushed_seq: u64,
    /// Shards with members, per encoding.
    pub shards_json: u32,
    pub shards_rkyv: u32,
    /// The merge window the room uses now (widened when shards fall behind).
    pub window_ms: u64,
    /// Droppable messages per second shown when sampling is on, else null.
    pub sampling_visible_rate: Option<f64>,
    /// Messages kept for recovery: must-deliver, droppable.
    pub history_must_deliver: usize,
    pub history_droppable: usize,
    /// Highest must-deliver seq evicted from history (a `since` below it gets a gap).
    pub history_evicted_upto: u64,
    /// Published messages per second (EWMA).
    pub publish_rate: f64,
    /// Members on this edge (joined or joining, every shard).
    pub members: u64,
}

/// A shard's mailbox: a channel plus an eventfd doorbell, rung only when the shard is parked
/// in the kernel (so a burst of deliveries costs one write, not one per message).
#[derive(Clone)]
pub struct Mailbox {
    tx: Sender<ShardCmd>,
    doorbell: Arc<OwnedFd>,
    parked: Arc<AtomicBool>,
}

impl Mailbox {
    pub fn new(tx: Sender<ShardCmd>, doorbell: Arc<OwnedFd>, parked: Arc<AtomicBool>) -> Self {
        Self { tx, doorbell, parked }
    }

    pub fn send(&self, cmd: ShardCmd) {
        if self.tx.send(cmd).is_ok() && self.parked.swap(false, Ordering::SeqCst) {
            crate::sys::eventfd_ring(self.doorbell.as_raw_fd());
        }
    }
}

/// The handle publishers and shards use to reach the bus.
#[derive(Clone)]
pub struct BusHandle {
    tx: Sender<BusCmd>,
}

impl BusHandle {
    pub fn new(tx: Sender<BusCmd>) -> Self {
        Self { tx }
    }

    pub fn send(&self, cmd: BusCmd) -> bool {
        self.tx.send(cmd).is_ok()
    }

    /// Room figures (from async code).
    pub async fn room_stats(&self, room: RoomName) -> Option<RoomStats> {
        let (tx, rx) = tokio::sync::oneshot::channel();
        if !self.send(BusCmd::RoomStats { room, reply: tx }) {
            return None;
        }
        rx.await.ok().flatten()
    }

    /// Publishes and waits for the seq (from async code).
    pub async fn publish(&self, room: RoomName, msg: NewMessage) -> Result<Ack, PublishError> {
        let (tx, rx) = tokio::sync::oneshot::channel();
        if !self.send(BusCmd::Publish { room, msg, reply: Reply::Http(tx) }) {
            return Err(PublishError::ShuttingDown);
        }
        rx.await.unwrap_or(Err(PublishError::ShuttingDown))
    }
}

/// Wraps a payload into one complete, unmasked server frame: the bytes every member gets.
pub fn frame(proto: Subprotocol, payload: &[u8]) -> Bytes {
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
