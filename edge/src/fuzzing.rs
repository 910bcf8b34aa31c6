//! Entry points for the fuzz targets (`fuzz/`, cargo-fuzz) into parsers that are private to
//! their modules: the decoding of what arrives from Redis, and the store's records. Each is a
//! thin call of the function the edge itself uses, so a target exercises the code that runs.
//! Not an API: hidden from the docs, and nothing in the edge calls it.
//!
//! The other parsers are public where they live: WebSocket frames, the upgrade, signalling and
//! envelopes in `roomcast_proto`, the publish API's body in [`crate::ingest::PublishRequest`],
//! `CLUSTER NODES` in [`crate::bus::slots::Topology::parse`], sock_diag in
//! `roomcast_ebpf::sock_diag`.

use roomcast_proto::envelope::PushMessage;

pub use crate::bus::redis::ModEvent;
pub use crate::store::RoomMeta;

/// A payload on a room's Redis channel, read as the bus bridges read it (`bus::redis` and
/// `bus::cluster`): a message as the publish script wrote it, else a presence announcement,
/// else unreadable (logged and skipped).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RoomPayload {
    /// The message, whether it must be delivered, its room's epoch.
    Message(PushMessage, bool, u64),
    /// The room's members over every edge.
    Online(u64),
    Unreadable,
}

/// Reads a payload of a room's channel (and of the room's streams: entries are the same JSON).
pub fn room_payload(payload: &[u8]) -> RoomPayload {
    match crate::bus::redis::parse(payload) {
        Some((msg, must_deliver, epoch)) => RoomPayload::Message(msg, must_deliver, epoch),
        None => match serde_json::from_slice::<crate::bus::redis::OnlineWire>(payload) {
            Ok(o) => RoomPayload::Online(o.online),
            Err(_) => RoomPayload::Unreadable,
        },
    }
}

/// The room a channel name belongs to (`rc:{ROOM}:ch`).
pub fn room_of_channel(channel: &str) -> Option<&str> {
    crate::bus::redis::room_of_channel(channel)
}

/// Reads a message of the moderation channel, as the bridge does.
pub fn moderation_event(payload: &[u8]) -> Option<ModEvent> {
    serde_json::from_slice(payload).ok()
}

/// The store's value of a message (`msgs` keyspace) and its idempotency key, if any.
pub fn store_encode_msg(m: &PushMessage, key: Option<&str>) -> Vec<u8> {
    crate::store::db::encode_msg(m, key)
}

/// Reads a `msgs` value back; `seq` comes from the key.
pub fn store_decode_msg(seq: u64, v: &[u8]) -> Option<(PushMessage, Option<Box<str>>)> {
    crate::store::db::decode_msg(seq, v)
}

/// The store's value of a room's numbering (`meta` keyspace).
pub fn store_encode_meta(m: &RoomMeta) -> Vec<u8> {
    crate::store::db::encode_meta(m)
}

/// Reads a `meta` value back.
pub fn store_decode_meta(v: &[u8]) -> Option<RoomMeta> {
    crate::store::db::decode_meta(v)
}

/// The `msgs` key of a room's message.
pub fn store_msg_key(room: &str, seq: u64) -> Vec<u8> {
    crate::store::db::msg_key(room, seq)
}

/// The seq of a `msgs` key.
pub fn store_seq_of(key: &[u8]) -> Option<u64> {
    crate::store::db::seq_of(key)
}
