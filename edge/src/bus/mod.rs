//! The bus: where a room's messages get their sequence numbers, are merged within the window,
//! serialized once per encoding in use, wrapped once into a WebSocket frame, and handed to every
//! shard that has members of the room.
//!
//! The embedded default is [`local::LocalBus`]: one thread owns every room's publish state, so
//! ordering is trivial (the order it assigns seqs is the order it delivers them) and the HTTP
//! answer carries the exact seq. Shards and the publish API talk to it over a channel.

pub mod local;

use std::os::fd::{AsRawFd, OwnedFd};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use bytes::Bytes;
use crossbeam_channel::Sender;
use roomcast_proto::Subprotocol;

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

/// One room flush, shared by every shard with members of the room.
#[derive(Debug)]
pub struct Delivery {
    pub room: RoomName,
    /// Complete WebSocket frames, one per encoding in use (index: `Subprotocol::index`).
    pub frames: [Option<Bytes>; 2],
    /// Messages in the batch (for delivery counters).
    pub messages: u32,
    pub last_seq: u64,
}

/// What a shard's mailbox carries.
pub enum ShardCmd {
    Deliver(Arc<Delivery>),
    /// The join of connection `slot` took effect after `seq`.
    JoinAck { slot: u32, generation: u32, room: RoomName, seq: u64 },
    /// The answer to a publish over a socket.
    Published { slot: u32, generation: u32, room: RoomName, result: Result<Ack, PublishError> },
    /// Close every connection with 1001 and stop.
    Shutdown,
}

/// What the bus thread's channel carries.
pub enum BusCmd {
    Publish { room: RoomName, msg: NewMessage, reply: Reply },
    /// A connection asks to join; the bus answers `JoinAck` on the shard's mailbox, in order
    /// with the room's deliveries, and counts the shard as interested in `proto` frames.
    Join { room: RoomName, shard: u16, slot: u32, generation: u32, proto: Subprotocol },
    /// The shard has no more members (joined or joining) of `room` in `proto`.
    NoInterest { room: RoomName, shard: u16, proto: Subprotocol },
    Shutdown,
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
    let opcode = if proto.is_binary() {
        roomcast_proto::ws::OpCode::Binary
    } else {
        roomcast_proto::ws::OpCode::Text
    };
    let mut hdr = [0u8; 10];
    let n = roomcast_proto::ws::encode_header(true, opcode, payload.len(), &mut hdr);
    let mut v = Vec::with_capacity(n + payload.len());
    v.extend_from_slice(&hdr[..n]);
    v.extend_from_slice(payload);
    Bytes::from(v)
}

/// Microseconds since the Unix epoch.
pub fn now_us() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_micros() as u64)
}
