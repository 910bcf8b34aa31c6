//! The push envelope and the signalling messages.
//!
//! Two encodings of the same types, chosen per connection by WebSocket subprotocol:
//!
//! - `roomcast.json.v1` (text frames): serde JSON, internally tagged by `"type"` (server to client)
//!   and `"op"` (client to server). A message body is arbitrary JSON and travels as raw JSON.
//! - `roomcast.rkyv.v2` (binary frames): rkyv 0.8 archives, little-endian, *unaligned* primitives
//!   and 32-bit relative pointers, so a client can validate and read an archive in place, straight
//!   out of a frame payload at any offset, without copying. A body is the JSON text, as a string.
//!
//! The edge serializes one [`ServerMsg::Batch`] per room flush and per encoding in use; the bytes
//! are then wrapped once into a WebSocket frame and shared by every member socket.

use serde_json::value::RawValue;

/// What a connection receives: the WebSocket subprotocol it negotiated, or the Server-Sent
/// Events transport. It picks the envelope encoding and its framing, and indexes the edge's
/// per-encoding arrays (a room's frames are built once per value some member uses).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Subprotocol {
    /// `roomcast.json.v1`: JSON in text frames. The default, for browsers.
    Json,
    /// `roomcast.rkyv.v2`: rkyv archives in binary frames, for native clients.
    Rkyv,
    /// Not a WebSocket subprotocol: the `/sse` transport (`text/event-stream`), the same JSON
    /// as [`Subprotocol::Json`] in event-stream events ([`crate::sse`]). Never negotiated by
    /// [`Subprotocol::from_token`].
    Sse,
}

impl Subprotocol {
    /// Token of the JSON subprotocol in `Sec-WebSocket-Protocol`.
    pub const JSON_TOKEN: &'static str = "roomcast.json.v1";
    /// Token of the rkyv subprotocol in `Sec-WebSocket-Protocol`.
    pub const RKYV_TOKEN: &'static str = "roomcast.rkyv.v2";
    /// Every encoding, in a fixed order (index = [`Subprotocol::index`]).
    pub const ALL: [Subprotocol; 3] = [Subprotocol::Json, Subprotocol::Rkyv, Subprotocol::Sse];
    /// How many there are: the length of per-encoding arrays.
    pub const COUNT: usize = Self::ALL.len();

    /// Parses one token (exact, case-sensitive, as RFC 6455 asks).
    pub fn from_token(token: &str) -> Option<Self> {
        match token {
            Self::JSON_TOKEN => Some(Self::Json),
            Self::RKYV_TOKEN => Some(Self::Rkyv),
            _ => None,
        }
    }

    /// The token to echo in the handshake response (for [`Subprotocol::Sse`], which has no
    /// handshake token, its media type).
    pub fn token(self) -> &'static str {
        match self {
            Self::Json => Self::JSON_TOKEN,
            Self::Rkyv => Self::RKYV_TOKEN,
            Self::Sse => crate::sse::CONTENT_TYPE,
        }
    }

    /// Dense index, for per-encoding arrays.
    pub fn index(self) -> usize {
        match self {
            Self::Json => 0,
            Self::Rkyv => 1,
            Self::Sse => 2,
        }
    }

    /// Whether frames of this encoding are binary (else text).
    pub fn is_binary(self) -> bool {
        matches!(self, Self::Rkyv)
    }
}

/// One published message, as every member receives it.
#[derive(
    Debug, Clone, PartialEq, Eq, rkyv::Archive, rkyv::Serialize, rkyv::Deserialize, serde::Serialize, serde::Deserialize,
)]
#[rkyv(derive(Debug))]
pub struct PushMessage {
    /// Per-room sequence number, assigned by the edge (or the bus) at publish; starts at 1,
    /// increases by one per accepted message of the room, whatever its kind.
    pub seq: u64,
    /// Server timestamp at publish, microseconds since the Unix epoch.
    pub ts_us: u64,
    /// Message kind (`gift`, `chat`, `system`, or an operator-defined kind).
    pub kind: String,
    /// Publishing user, as given by the publisher (may be empty).
    pub user: String,
    /// The body: JSON text. Raw JSON in the JSON encoding, a string in the rkyv encoding.
    #[serde(with = "raw_json")]
    pub body: String,
}

/// Everything the edge sends to a client.
///
/// `Deserialize` is written by hand (module `wire`) so that message bodies come back as the exact
/// JSON text that was sent.
#[derive(Debug, Clone, PartialEq, Eq, rkyv::Archive, rkyv::Serialize, rkyv::Deserialize, serde::Serialize)]
#[rkyv(derive(Debug))]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ServerMsg {
    /// The messages of one room merged within one window, in seq order. `online`: the room's
    /// members across every edge, when it changed (at most every `presence.interval_ms`); a
    /// batch may carry only that (`messages` empty).
    Batch {
        /// The room.
        room: String,
        /// The messages, in seq order (may be empty when only `online` changed).
        messages: Vec<PushMessage>,
        /// The room's members over every edge, when it changed.
        #[serde(skip_serializing_if = "Option::is_none")]
        online: Option<u64>,
    },
    /// The connection is now a member of `room`. `seq` is the last seq the room had assigned
    /// when the join took effect: live batches carry seqs above it. `epoch` names the room's
    /// numbering (opaque): pass it back with `since` so the edge can tell a seq of this
    /// numbering from one of an earlier one.
    /// `online`: the room's members over every edge when the edge shows counts
    /// (`presence.interval_ms` above 0); later changes come in batches.
    Joined {
        /// The room joined.
        room: String,
        /// The room's last seq when the join took effect.
        seq: u64,
        /// The room's numbering (opaque).
        epoch: String,
        /// The room's members over every edge, when the edge shows counts.
        #[serde(skip_serializing_if = "Option::is_none")]
        online: Option<u64>,
    },
    /// The connection left `room` (on request, or before joining another).
    Left {
        /// The room left.
        room: String,
    },
    /// Answer to a publish sent over the socket.
    Published {
        /// The room published to.
        room: String,
        /// The seq the message got.
        seq: u64,
        /// Server timestamp of the publish, µs since the Unix epoch.
        ts_us: u64,
    },
    /// A signalling message was refused; the connection stays open.
    Error {
        /// The protocol code (`bad_room`, `rate_limited`, ...).
        code: String,
        /// What went wrong, in words.
        message: String,
    },
    /// The edge is draining: reconnect through `url` (the dispatch endpoint) after
    /// `reconnect_after_ms`, with `since` set to the last seq seen.
    Goaway {
        /// Where to reconnect (the dispatch endpoint).
        url: String,
        /// Why, in words.
        reason: String,
        /// Wait this long (ms, drawn at random by the edge) first.
        reconnect_after_ms: u32,
    },
    /// Messages with seq in `from..=to` of `room` cannot be recovered (older than history, or
    /// lost by the bus). Said explicitly, never silently.
    Gap {
        /// The room.
        room: String,
        /// The first seq missing.
        from: u64,
        /// The last seq missing.
        to: u64,
    },
    /// A `refresh` was accepted: the connection's token now expires at `exp` (seconds since the
    /// Unix epoch).
    Refreshed {
        /// Expiry, seconds since the Unix epoch.
        exp: u64,
    },
    /// The answer to a client's `ping`.
    Pong,
    /// The client's position in `room` is void: the room's numbering restarted (the `epoch`
    /// the client sent is not the room's), or its `since` is ahead of the room. What it missed
    /// of the old numbering cannot be recovered. From now on its position is `seq` in `epoch`:
    /// what follows (replay, then live batches) carries seqs above it. Sent before anything
    /// else of the room: on a join, before `joined`.
    Reset {
        /// The room.
        room: String,
        /// The numbering the client is now in.
        epoch: String,
        /// Its position in that numbering.
        seq: u64,
        /// Why, in words.
        reason: String,
    },
}

/// Everything a client may send (text JSON in both subprotocols; binary rkyv in `rkyv.v1`).
///
/// `Deserialize` is written by hand (module `wire`) so that a published body is the exact JSON
/// text the client sent: `op` may be `join` or its alias `switch`, `leave`, `publish`; `since`
/// may be absent or null, `user` absent (empty); fields that do not belong to the op are
/// ignored, as are unknown fields.
#[derive(Debug, Clone, PartialEq, Eq, rkyv::Archive, rkyv::Serialize, rkyv::Deserialize, serde::Serialize)]
#[rkyv(derive(Debug))]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum ClientMsg {
    /// Join `room`, leaving the current room first (so this is also "switch").
    /// `since`: deliver what is still in history after this seq first.
    Join {
        /// The room to join.
        room: String,
        /// Deliver what history still holds after this seq first.
        #[serde(skip_serializing_if = "Option::is_none")]
        since: Option<u64>,
        /// The room's `epoch` from the `joined` that `since` counts in (optional; with it, a
        /// restarted numbering is told apart from the one the client saw).
        #[serde(skip_serializing_if = "Option::is_none")]
        epoch: Option<String>,
    },
    /// Leave the current room; the connection stays open.
    Leave,
    /// Publish to the current room over the long connection.
    Publish {
        /// The message kind (`chat`, or another kind the token allows).
        kind: String,
        /// The user as the client names it (ignored: the edge uses the token's identity).
        user: String,
        /// The body: JSON text, exactly as the client sent it (validated, not re-encoded).
        #[serde(serialize_with = "raw_json::serialize")]
        body: String,
    },
    /// A new token for the same user, before the current one expires.
    Refresh {
        /// The new token (JWT).
        token: String,
    },
    /// Liveness probe for clients that cannot send WebSocket pings (browsers): answered with
    /// `pong`. Counts against the signalling rate like any message.
    Ping,
}

/// Why an envelope could not be read.
#[derive(Debug, thiserror::Error)]
pub enum EnvelopeError {
    /// Not a JSON envelope.
    #[error("invalid JSON envelope: {0}")]
    Json(#[from] serde_json::Error),
    /// Not a valid rkyv archive of an envelope.
    #[error("invalid rkyv envelope: {0}")]
    Rkyv(String),
}

/// Serializes a server message as JSON (`roomcast.json.v1`).
///
/// # Panics
/// Never for messages built by the edge: bodies are validated JSON at publish.
pub fn encode_json(msg: &ServerMsg, out: &mut Vec<u8>) -> Result<(), EnvelopeError> {
    serde_json::to_writer(out, msg)?;
    Ok(())
}

/// Serializes a server message as an rkyv archive (`roomcast.rkyv.v2`).
pub fn encode_rkyv(msg: &ServerMsg) -> Result<Vec<u8>, EnvelopeError> {
    rkyv::to_bytes::<rkyv::rancor::Error>(msg)
        .map(rkyv::util::AlignedVec::into_vec)
        .map_err(|e| EnvelopeError::Rkyv(e.to_string()))
}

/// Serializes a message in the given encoding.
pub fn encode(proto: Subprotocol, msg: &ServerMsg) -> Result<Vec<u8>, EnvelopeError> {
    match proto {
        Subprotocol::Json | Subprotocol::Sse => {
            let mut v = Vec::with_capacity(128);
            encode_json(msg, &mut v)?;
            Ok(v)
        }
        Subprotocol::Rkyv => encode_rkyv(msg),
    }
}

/// Parses a JSON server message.
pub fn decode_json(bytes: &[u8]) -> Result<ServerMsg, EnvelopeError> {
    Ok(serde_json::from_slice(bytes)?)
}

/// Validates an rkyv server message in place (any alignment) and returns a view of it.
pub fn access_rkyv(bytes: &[u8]) -> Result<&ArchivedServerMsg, EnvelopeError> {
    rkyv::access::<ArchivedServerMsg, rkyv::rancor::Error>(bytes).map_err(|e| EnvelopeError::Rkyv(e.to_string()))
}

/// Validates and deserializes an rkyv server message.
pub fn decode_rkyv(bytes: &[u8]) -> Result<ServerMsg, EnvelopeError> {
    let archived = access_rkyv(bytes)?;
    rkyv::deserialize::<ServerMsg, rkyv::rancor::Error>(archived).map_err(|e| EnvelopeError::Rkyv(e.to_string()))
}

/// Decodes a server message in the given encoding.
pub fn decode(proto: Subprotocol, bytes: &[u8]) -> Result<ServerMsg, EnvelopeError> {
    match proto {
        Subprotocol::Json | Subprotocol::Sse => decode_json(bytes),
        Subprotocol::Rkyv => decode_rkyv(bytes),
    }
}

/// Parses a client message from a text frame (JSON, both subprotocols). A publish body is the
/// exact JSON text of the `body` field as sent, numbers and escapes untouched.
pub fn decode_client_json(bytes: &[u8]) -> Result<ClientMsg, EnvelopeError> {
    Ok(serde_json::from_slice(bytes)?)
}

/// Parses a client message from a binary frame (rkyv, `roomcast.rkyv.v2` only). A publish body
/// must be JSON text; it is validated and kept as sent, never rewritten.
pub fn decode_client_rkyv(bytes: &[u8]) -> Result<ClientMsg, EnvelopeError> {
    let archived = rkyv::access::<ArchivedClientMsg, rkyv::rancor::Error>(bytes)
        .map_err(|e| EnvelopeError::Rkyv(e.to_string()))?;
    let mut msg = rkyv::deserialize::<ClientMsg, rkyv::rancor::Error>(archived)
        .map_err(|e| EnvelopeError::Rkyv(e.to_string()))?;
    if let ClientMsg::Publish { body, .. } = &mut msg {
        // The JSON encoding checks bodies while parsing; do the same for rkyv. The body is the
        // value's text, as the JSON encoding takes it: without the whitespace around it (the
        // JSON envelope drops that on the way out; the rkyv one, the store and Redis would
        // have kept it, so members would have seen different bodies by encoding).
        let value = serde_json::from_str::<&RawValue>(body)?.get();
        if value.len() != body.len() {
            *body = value.to_owned();
        }
    }
    Ok(msg)
}

/// Serializes a client message as JSON (for clients and tests).
pub fn encode_client_json(msg: &ClientMsg) -> Vec<u8> {
    serde_json::to_vec(msg).unwrap_or_default()
}

/// Serializes a client message as rkyv (for clients and tests).
pub fn encode_client_rkyv(msg: &ClientMsg) -> Result<Vec<u8>, EnvelopeError> {
    rkyv::to_bytes::<rkyv::rancor::Error>(msg)
        .map(rkyv::util::AlignedVec::into_vec)
        .map_err(|e| EnvelopeError::Rkyv(e.to_string()))
}

/// The kind of a tombstone: a message deleted by moderation (docs/PROTOCOL.md, "Moderation").
/// Reserved: no configured kind may take the name, so nothing but the edge publishes it.
///
/// A tombstone is an ordinary [`PushMessage`] (both encodings, no schema change) whose body is
/// `{"seq":N}`, N being the deleted message's seq. It comes two ways:
/// - **live**, numbered like any message (its own seq, above N), must-deliver (recovered with
///   `since`): members remove message N from what they show;
/// - **in place** of message N in the room's history: a replay (`since`, `join_last`) carries
///   at seq N a tombstone whose body names N itself, so seqs stay as dense as they were and no
///   gap is reported. Its `ts_us` is the deleted message's, its `user` empty.
///
/// Clients handle both the same way: never show a tombstone; drop message `body.seq` if shown.
pub const DELETED_KIND: &str = "deleted";

/// The body of a tombstone for message `seq`.
pub fn tombstone_body(seq: u64) -> String {
    format!("{{\"seq\":{seq}}}")
}

/// The tombstone that stands in the history in place of `deleted` (same seq and timestamp).
pub fn tombstone_in_place(deleted: &PushMessage) -> PushMessage {
    PushMessage {
        seq: deleted.seq,
        ts_us: deleted.ts_us,
        kind: DELETED_KIND.to_owned(),
        user: String::new(),
        body: tombstone_body(deleted.seq),
    }
}

/// If `msg` is a tombstone, the seq of the message it deletes (its own seq for a tombstone in
/// place of a deleted message).
pub fn deleted_seq(msg: &PushMessage) -> Option<u64> {
    if msg.kind != DELETED_KIND {
        return None;
    }
    #[derive(serde::Deserialize)]
    struct Body {
        seq: u64,
    }
    serde_json::from_str::<Body>(&msg.body).ok().map(|b| b.seq)
}

/// Length of an epoch as the edge writes it: 16 hex digits (a `u64`).
pub const EPOCH_TEXT_LEN: usize = 16;

/// Checks an epoch a client sends back (`?epoch=`, a `join`'s `epoch`, the `EPOCH` of a
/// `Last-Event-ID`): exactly the text the edge sent, 16 lowercase hex digits. Anything else is
/// malformed and refused; read as some other epoch it would earn the client a `reset` it did not
/// cause.
pub fn validate_epoch(epoch: &str) -> Result<(), &'static str> {
    if epoch.len() == EPOCH_TEXT_LEN && epoch.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b)) {
        Ok(())
    } else {
        Err("an epoch is 16 lowercase hex digits, sent back exactly as the edge sent it")
    }
}

/// Reads a seq a client sends in text (`?since=`, a `Last-Event-ID`): decimal digits only, so
/// `+5`, ` 5` or `5.0`, which `u64::from_str` or a lenient reader might take, are refused.
pub fn parse_seq(text: &str) -> Option<u64> {
    if text.is_empty() || !text.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    text.parse().ok()
}

/// Longest room name accepted.
pub const MAX_ROOM_LEN: usize = 64;

/// Checks a room name: 1 to 64 bytes of `[A-Za-z0-9_.:-]`.
pub fn validate_room(room: &str) -> Result<(), &'static str> {
    if room.is_empty() {
        return Err("room name is empty");
    }
    if room.len() > MAX_ROOM_LEN {
        return Err("room name is longer than 64 bytes");
    }
    if !room.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b':' | b'-')) {
        return Err("room name may only hold A-Z a-z 0-9 _ . : -");
    }
    Ok(())
}

/// Longest kind name accepted.
pub const MAX_KIND_LEN: usize = 32;

/// Checks a message kind: 1 to 32 bytes of `[a-z0-9_]`.
pub fn validate_kind(kind: &str) -> Result<(), &'static str> {
    if kind.is_empty() || kind.len() > MAX_KIND_LEN {
        return Err("kind must be 1 to 32 bytes");
    }
    if !kind.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_') {
        return Err("kind may only hold a-z 0-9 _");
    }
    Ok(())
}

/// Deepest nesting of arrays and objects a published body may have. Every member's client
/// parses the batch a body travels in: a body nested thousands deep breaks common parsers
/// (Python's recursion limit, serde_json's 128, Go's 10,000) and with them the gifts batched
/// beside it. 32 levels is far more than any payload needs.
pub const MAX_BODY_DEPTH: usize = 32;

/// Checks what a published body (valid JSON text) may not hold although JSON's grammar allows
/// it, because common parsers refuse it, and with it the whole batch the body travels in:
/// - nesting deeper than [`MAX_BODY_DEPTH`];
/// - anything serde_json refuses when it reads the body as a value: a number beyond the range
///   of a double (`1e400`; Go's `encoding/json` refuses it too; RFC 8259 §6 names binary64 as
///   the range that interoperates) and an unpaired surrogate escape (`"\ud800"`; RFC 8259 §8.2:
///   "unpredictable" behaviour). Integers beyond 64 bits within a double's range
///   (`12345678901234567890123`) are fine, and kept exactly as sent.
///
/// The body is read as a reader building values would read it (every string decoded, every
/// number converted), keeping nothing.
pub fn check_body(body: &str) -> Result<(), &'static str> {
    let deep = std::cell::Cell::new(false);
    match serde::de::DeserializeSeed::deserialize(
        Walk { depth: 0, deep: &deep },
        &mut serde_json::Deserializer::from_str(body),
    ) {
        Ok(()) => Ok(()),
        Err(_) if deep.get() => Err("body nested deeper than 32 levels"),
        Err(_) => Err(
            "body holds what JSON readers refuse: a number beyond a double's range (about 1.8e308) or an unpaired surrogate escape",
        ),
    }
}

/// [`check_body`]'s walk over a value: `depth` arrays and objects are open around it.
#[derive(Clone, Copy)]
struct Walk<'a> {
    depth: usize,
    deep: &'a std::cell::Cell<bool>,
}

impl Walk<'_> {
    fn inner<E: serde::de::Error>(self) -> Result<Self, E> {
        if self.depth == MAX_BODY_DEPTH {
            self.deep.set(true);
            return Err(E::custom("nested too deep"));
        }
        Ok(Self { depth: self.depth + 1, ..self })
    }
}

impl<'de> serde::de::DeserializeSeed<'de> for Walk<'_> {
    type Value = ();
    fn deserialize<D: serde::Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
        d.deserialize_any(self)
    }
}

impl<'de> serde::de::Visitor<'de> for Walk<'_> {
    type Value = ();
    fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("a JSON value")
    }
    fn visit_bool<E>(self, _: bool) -> Result<(), E> {
        Ok(())
    }
    fn visit_i64<E>(self, _: i64) -> Result<(), E> {
        Ok(())
    }
    fn visit_u64<E>(self, _: u64) -> Result<(), E> {
        Ok(())
    }
    fn visit_f64<E>(self, _: f64) -> Result<(), E> {
        Ok(())
    }
    fn visit_str<E>(self, _: &str) -> Result<(), E> {
        Ok(())
    }
    fn visit_unit<E>(self) -> Result<(), E> {
        Ok(())
    }
    fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut a: A) -> Result<(), A::Error> {
        let inner = self.inner()?;
        while a.next_element_seed(inner)?.is_some() {}
        Ok(())
    }
    fn visit_map<A: serde::de::MapAccess<'de>>(self, mut a: A) -> Result<(), A::Error> {
        let inner = self.inner()?;
        while a.next_key_seed(inner)?.is_some() {
            a.next_value_seed(inner)?;
        }
        Ok(())
    }
}

/// Serde adapter: a `String` holding JSON text travels as raw JSON.
mod raw_json {
    use super::RawValue;
    use serde::ser::Error as _;
    use serde::{Deserialize, Deserializer, Serialize, Serializer};

    pub fn serialize<S: Serializer>(body: &str, s: S) -> Result<S::Ok, S::Error> {
        let raw: &RawValue = serde_json::from_str(body).map_err(S::Error::custom)?;
        raw.serialize(s)
    }

    /// The JSON text of the value as it stands in the input. Needs the JSON parser itself: inside
    /// an internally tagged enum or a flattened struct serde buffers values first (numbers become
    /// `f64`, escapes are decoded) and this fails rather than hand back re-encoded text; that is
    /// why [`ServerMsg`](super::ServerMsg) and [`ClientMsg`](super::ClientMsg) read through
    /// [`wire`](super::wire).
    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<String, D::Error> {
        let raw = Box::<RawValue>::deserialize(d)?;
        Ok(String::from(Box::<str>::from(raw)))
    }
}

/// Hand-written `Deserialize` for the two tagged enums.
///
/// serde's derived deserializer for an internally tagged enum (`"type"`, `"op"`) buffers every
/// field into its generic `Content` before it knows the variant. Bodies did not survive that:
/// numbers became `f64` and escapes were decoded, so `12345678901234567890123` came back as
/// `1.2345678901234568e+22`, `1e2` as `100.0`. Here each enum is read as one flat struct of all
/// its variants' fields, straight from the parser, so a body is a `RawValue`: the bytes sent.
/// Then the tag picks the variant and its fields. One pass, no buffering. Fields of other
/// variants and unknown fields are ignored as before; a field of another variant must still
/// have that variant's type.
mod wire {
    use super::{ClientMsg, PushMessage, ServerMsg};
    use serde::de::Error;
    use serde::{Deserialize, Deserializer};

    fn need<T, E: Error>(v: Option<T>, field: &'static str) -> Result<T, E> {
        v.ok_or_else(|| E::missing_field(field))
    }

    /// A present `body` is always `Some`, also when it is `null` (a valid body).
    fn raw<'de, D: Deserializer<'de>>(d: D) -> Result<Option<String>, D::Error> {
        super::raw_json::deserialize(d).map(Some)
    }

    #[derive(Deserialize)]
    #[serde(rename_all = "snake_case")]
    enum Op {
        #[serde(alias = "switch")]
        Join,
        Leave,
        Publish,
        Refresh,
        Ping,
    }

    #[derive(Deserialize)]
    struct Client {
        op: Op,
        room: Option<String>,
        since: Option<u64>,
        epoch: Option<String>,
        kind: Option<String>,
        user: Option<String>,
        #[serde(default, deserialize_with = "raw")]
        body: Option<String>,
        token: Option<String>,
    }

    impl<'de> Deserialize<'de> for ClientMsg {
        fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
            let w = Client::deserialize(d)?;
            Ok(match w.op {
                Op::Join => ClientMsg::Join { room: need(w.room, "room")?, since: w.since, epoch: w.epoch },
                Op::Leave => ClientMsg::Leave,
                Op::Publish => ClientMsg::Publish {
                    kind: need(w.kind, "kind")?,
                    user: w.user.unwrap_or_default(),
                    body: need(w.body, "body")?,
                },
                Op::Refresh => ClientMsg::Refresh { token: need(w.token, "token")? },
                Op::Ping => ClientMsg::Ping,
            })
        }
    }

    #[derive(Deserialize)]
    #[serde(rename_all = "snake_case")]
    enum Type {
        Batch,
        Joined,
        Left,
        Published,
        Error,
        Goaway,
        Gap,
        Refreshed,
        Reset,
        Pong,
    }

    #[derive(Deserialize)]
    struct Server {
        #[serde(rename = "type")]
        ty: Type,
        room: Option<String>,
        messages: Option<Vec<PushMessage>>,
        seq: Option<u64>,
        ts_us: Option<u64>,
        code: Option<String>,
        message: Option<String>,
        url: Option<String>,
        reason: Option<String>,
        reconnect_after_ms: Option<u32>,
        from: Option<u64>,
        to: Option<u64>,
        exp: Option<u64>,
        epoch: Option<String>,
        online: Option<u64>,
    }

    impl<'de> Deserialize<'de> for ServerMsg {
        fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
            let w = Server::deserialize(d)?;
            Ok(match w.ty {
                Type::Batch => ServerMsg::Batch {
                    room: need(w.room, "room")?,
                    messages: need(w.messages, "messages")?,
                    online: w.online,
                },
                Type::Joined => ServerMsg::Joined {
                    room: need(w.room, "room")?,
                    seq: need(w.seq, "seq")?,
                    epoch: need(w.epoch, "epoch")?,
                    online: w.online,
                },
                Type::Left => ServerMsg::Left { room: need(w.room, "room")? },
                Type::Published => ServerMsg::Published {
                    room: need(w.room, "room")?,
                    seq: need(w.seq, "seq")?,
                    ts_us: need(w.ts_us, "ts_us")?,
                },
                Type::Error => ServerMsg::Error { code: need(w.code, "code")?, message: need(w.message, "message")? },
                Type::Goaway => ServerMsg::Goaway {
                    url: need(w.url, "url")?,
                    reason: need(w.reason, "reason")?,
                    reconnect_after_ms: need(w.reconnect_after_ms, "reconnect_after_ms")?,
                },
                Type::Gap => {
                    ServerMsg::Gap { room: need(w.room, "room")?, from: need(w.from, "from")?, to: need(w.to, "to")? }
                }
                Type::Refreshed => ServerMsg::Refreshed { exp: need(w.exp, "exp")? },
                Type::Pong => ServerMsg::Pong,
                Type::Reset => ServerMsg::Reset {
                    room: need(w.room, "room")?,
                    epoch: need(w.epoch, "epoch")?,
                    seq: need(w.seq, "seq")?,
                    reason: need(w.reason, "reason")?,
                },
            })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn batch() -> ServerMsg {
        ServerMsg::Batch {
            room: "r1".into(),
            messages: vec![
                PushMessage {
                    seq: 7,
                    ts_us: 1_700_000_000_000_001,
                    kind: "gift".into(),
                    user: "alice".into(),
                    body: r#"{"rose":3}"#.into(),
                },
                PushMessage {
                    seq: 8,
                    ts_us: 1_700_000_000_000_002,
                    kind: "chat".into(),
                    user: "bob".into(),
                    body: r#""hi""#.into(),
                },
            ],
            online: Some(100_000),
        }
    }

    #[test]
    fn json_batch_has_raw_bodies_and_round_trips() {
        let mut out = Vec::new();
        encode_json(&batch(), &mut out).unwrap();
        let text = std::str::from_utf8(&out).unwrap();
        assert!(text.starts_with(r#"{"type":"batch","room":"r1","messages":[{"seq":7"#), "{text}");
        assert!(text.contains(r#""body":{"rose":3}"#), "{text}");
        assert_eq!(decode_json(&out).unwrap(), batch());
    }

    #[test]
    fn rkyv_round_trips_at_any_offset() {
        let bytes = encode_rkyv(&batch()).unwrap();
        for pad in 0..8 {
            // A payload sits after a 2, 4 or 10 byte frame header: unaligned access must work.
            let mut buf = vec![0u8; pad];
            buf.extend_from_slice(&bytes);
            let view = access_rkyv(&buf[pad..]).unwrap();
            match view {
                ArchivedServerMsg::Batch { room, messages, .. } => {
                    assert_eq!(room.as_str(), "r1");
                    assert_eq!(messages.len(), 2);
                    assert_eq!(messages[1].seq.to_native(), 8);
                }
                other => panic!("unexpected {other:?}"),
            }
            assert_eq!(decode_rkyv(&buf[pad..]).unwrap(), batch());
        }
    }

    #[test]
    fn rkyv_rejects_garbage() {
        assert!(decode_rkyv(&[0xff; 3]).is_err());
        assert!(decode_rkyv(&[0x01, 0x02, 0x03, 0x04, 0x05, 0x06, 0x07, 0x08]).is_err());
    }

    #[test]
    fn body_depth_is_bounded_outside_strings_only() {
        let deep = |n: usize| "[".repeat(n) + &"]".repeat(n);
        assert!(check_body(&deep(32)).is_ok());
        assert!(check_body(&deep(33)).is_err());
        assert!(check_body(&format!("{{\"a\":{}}}", deep(31))).is_ok());
        assert!(check_body(&format!("{{\"a\":{}}}", deep(32))).is_err());
        // Brackets inside strings (escaped quotes included) do not count.
        let s = format!("\"{}\\\"{}\"", "[".repeat(100), "{".repeat(100));
        assert!(check_body(&s).is_ok(), "{s}");
        assert!(check_body("12345").is_ok());
    }

    /// Found by the fuzz target `publish_body`: `1e400` is JSON, and the edge took it, but
    /// serde_json (and Go) refuse to read it as a number, so a client reading the batch it
    /// travelled in as values lost the batch. Every way of writing a number is checked.
    #[test]
    fn body_numbers_stay_within_a_double() {
        for ok in ["0", "-0", "1.5e308", "-1.7976931348623157e308", "12345678901234567890123", "1e-400", "[1,2.5E+3]"] {
            assert_eq!(check_body(ok), Ok(()), "{ok}");
        }
        let huge = format!("1{}", "0".repeat(400));
        for bad in ["1e400", "-1E+309", "[0,{\"a\":2e308}]", huge.as_str(), "1.8e308"] {
            assert!(check_body(bad).is_err(), "{bad}");
            assert!(serde_json::from_str::<serde_json::Value>(bad).is_err(), "serde_json reads {bad}");
        }
        // Inside strings nothing is a number.
        assert_eq!(check_body("\"1e400\""), Ok(()));
        assert_eq!(check_body("{\"1e999\":\"-9e999\"}"), Ok(()));
    }

    /// Found by the fuzz target `publish_body`, the same kind as `1e400`: an unpaired
    /// surrogate escape is in JSON's grammar, but serde_json refuses the string, in a value or
    /// a key; a pair, or escapes of other characters, are fine.
    #[test]
    fn body_strings_hold_no_unpaired_surrogates() {
        for ok in [r#""\ud83d\ude00""#, r#"{"\u00e9":"\u2028\uffff"}"#, r#"["a\"\\ud800"]"#] {
            assert_eq!(check_body(ok), Ok(()), "{ok}");
        }
        for bad in [r#""\ud800""#, r#"["x\udc00y"]"#, r#"{"\ud800":1}"#, r#""\ud800\u0041""#] {
            assert!(check_body(bad).is_err(), "{bad}");
            assert!(serde_json::from_str::<serde_json::Value>(bad).is_err(), "serde_json reads {bad}");
        }
    }

    #[test]
    fn client_messages() {
        let j = decode_client_json(br#"{"op":"join","room":"a"}"#).unwrap();
        assert_eq!(j, ClientMsg::Join { room: "a".into(), since: None, epoch: None });
        let s = decode_client_json(br#"{"op":"switch","room":"b","since":5}"#).unwrap();
        assert_eq!(s, ClientMsg::Join { room: "b".into(), since: Some(5), epoch: None });
        let e = decode_client_json(br#"{"op":"join","room":"b","since":5,"epoch":"00ab"}"#).unwrap();
        assert_eq!(e, ClientMsg::Join { room: "b".into(), since: Some(5), epoch: Some("00ab".into()) });
        assert_eq!(decode_client_json(br#"{"op":"leave"}"#).unwrap(), ClientMsg::Leave);
        assert_eq!(decode_client_json(br#"{"op":"ping"}"#).unwrap(), ClientMsg::Ping);
        let p = decode_client_json(br#"{"op":"publish","kind":"chat","body":{"t":1}}"#).unwrap();
        assert_eq!(p, ClientMsg::Publish { kind: "chat".into(), user: String::new(), body: r#"{"t":1}"#.into() });
        assert!(decode_client_json(br#"{"op":"dance"}"#).is_err());
        assert!(decode_client_json(b"not json").is_err());
        // Found by the fuzz target `signalling`: a body with whitespace around it, sent in
        // rkyv, is the value alone, as in JSON (and so the same in both encodings).
        let spaced = ClientMsg::Publish { kind: "chat".into(), user: String::new(), body: " \t{\"t\":1}\r\n ".into() };
        let got = decode_client_rkyv(&encode_client_rkyv(&spaced).unwrap()).unwrap();
        assert_eq!(got, ClientMsg::Publish { kind: "chat".into(), user: String::new(), body: r#"{"t":1}"#.into() });
        assert_eq!(decode_client_json(&encode_client_json(&got)).unwrap(), got);
        let bin = encode_client_rkyv(&p).unwrap();
        assert_eq!(decode_client_rkyv(&bin).unwrap(), p);
        let bad_body = ClientMsg::Publish { kind: "chat".into(), user: String::new(), body: "{".into() };
        assert!(decode_client_rkyv(&encode_client_rkyv(&bad_body).unwrap()).is_err());
    }

    /// Failed before the fix: the body went through `serde_json::Value`, so the first came back
    /// as `1.2345678901234568e+22`, the second as `100.0`, and the escapes decoded.
    #[test]
    fn socket_publish_bodies_are_kept_byte_for_byte() {
        for body in [
            "12345678901234567890123",
            "1e2",
            r#"{"gift": {"id": 18446744073709551616123, "price": 1.50, "tiny": -0.0, "sci": 6.02E+23},
                "text": "caf\u00e9 \ud83c\udf39 \"q\" \/ \n", "list": [ 1 , 2.0e-7 , [] , {} ], "z": null}"#,
            "null",
            r#""\u00e9""#,
        ] {
            for (user, gap) in [("", ""), (r#","user":"u""#, " ")] {
                let text = format!(r#"{{"op":"publish","kind":"chat","body":{gap}{body}{gap}{user}}}"#);
                match decode_client_json(text.as_bytes()) {
                    Ok(ClientMsg::Publish { kind, body: got, .. }) => {
                        assert_eq!(kind, "chat");
                        assert_eq!(got, body, "{text}");
                    }
                    other => panic!("{text}: {other:?}"),
                }
            }
        }
        // Wherever the tag stands.
        let p = decode_client_json(br#"{"body":1e2,"kind":"chat","op":"publish"}"#).unwrap();
        assert_eq!(p, ClientMsg::Publish { kind: "chat".into(), user: String::new(), body: "1e2".into() });
    }

    /// Failed before the fix: a client decoding a batch got re-encoded bodies (same cause).
    #[test]
    fn batch_bodies_decode_byte_for_byte() {
        let body = r#"{"n":12345678901234567890123,"e":1e2,"s":"\u00e9"}"#;
        let msg = ServerMsg::Batch {
            room: "r".into(),
            messages: vec![PushMessage {
                seq: 1,
                ts_us: 2,
                kind: "chat".into(),
                user: String::new(),
                body: body.into(),
            }],
            online: None,
        };
        let mut out = Vec::new();
        encode_json(&msg, &mut out).unwrap();
        assert_eq!(decode_json(&out).unwrap(), msg);
        let text = format!(
            r#"{{"room":"r","messages":[{{"seq":1,"ts_us":2,"kind":"chat","user":"","body":{body}}}],"type":"batch"}}"#
        );
        assert_eq!(decode_json(text.as_bytes()).unwrap(), msg);
    }

    /// Passed before the fix (a check of the rkyv path): the body is validated, kept as sent.
    #[test]
    fn rkyv_publish_bodies_are_validated_not_rewritten() {
        for body in ["12345678901234567890123", "1e2", r#"{ "a" : [1.0, "\u00e9"] }"#] {
            let p = ClientMsg::Publish { kind: "chat".into(), user: String::new(), body: body.into() };
            assert_eq!(decode_client_rkyv(&encode_client_rkyv(&p).unwrap()).unwrap(), p);
        }
        // Whitespace around the value is not part of it (JSON cannot carry it: its encoding
        // drops it), so it is not kept in rkyv either; inside the value nothing changes.
        let spaced = ClientMsg::Publish { kind: "chat".into(), user: String::new(), body: r#" { "a" : 1 } "#.into() };
        let ClientMsg::Publish { body, .. } = decode_client_rkyv(&encode_client_rkyv(&spaced).unwrap()).unwrap() else {
            panic!("not a publish")
        };
        assert_eq!(body, r#"{ "a" : 1 }"#);
    }

    fn every_server_msg() -> Vec<ServerMsg> {
        let all = vec![
            batch(),
            ServerMsg::Joined { room: "r".into(), seq: 9, epoch: "1f2e3d4c5b6a7980".into(), online: Some(3) },
            ServerMsg::Reset {
                room: "r".into(),
                epoch: "1f2e3d4c5b6a7981".into(),
                seq: 0,
                reason: "epoch changed".into(),
            },
            ServerMsg::Left { room: "r".into() },
            ServerMsg::Published { room: "r".into(), seq: 3, ts_us: 4 },
            ServerMsg::Error { code: "bad".into(), message: "m".into() },
            ServerMsg::Goaway { url: "http://d/v1/route".into(), reason: "drain".into(), reconnect_after_ms: 5 },
            ServerMsg::Gap { room: "r".into(), from: 1, to: 2 },
            ServerMsg::Refreshed { exp: 1_900_000_000 },
            ServerMsg::Pong,
        ];
        for m in &all {
            // No wildcard: a new variant must be added here, and to `wire`.
            match m {
                ServerMsg::Batch { .. }
                | ServerMsg::Joined { .. }
                | ServerMsg::Left { .. }
                | ServerMsg::Published { .. }
                | ServerMsg::Error { .. }
                | ServerMsg::Goaway { .. }
                | ServerMsg::Gap { .. }
                | ServerMsg::Refreshed { .. }
                | ServerMsg::Pong
                | ServerMsg::Reset { .. } => {}
            }
        }
        all
    }

    /// A guard for the hand-written deserializers (passed before, with the derived ones).
    #[test]
    fn every_message_round_trips_and_bad_ones_are_refused() {
        for m in every_server_msg() {
            let mut out = Vec::new();
            encode_json(&m, &mut out).unwrap();
            assert_eq!(decode_json(&out).unwrap(), m, "{}", String::from_utf8_lossy(&out));
        }
        for m in [
            ClientMsg::Join { room: "a".into(), since: Some(u64::MAX), epoch: Some("00ff".into()) },
            ClientMsg::Join { room: "a".into(), since: None, epoch: None },
            ClientMsg::Leave,
            ClientMsg::Publish { kind: "k".into(), user: "u".into(), body: "[1,2]".into() },
            ClientMsg::Refresh { token: "a.b.c".into() },
        ] {
            assert_eq!(decode_client_json(&encode_client_json(&m)).unwrap(), m);
        }
        let j = decode_client_json(br#"{"op":"join","room":"a","since":null,"body":[1],"x":{}}"#).unwrap();
        assert_eq!(j, ClientMsg::Join { room: "a".into(), since: None, epoch: None });
        for bad in [
            &br#"{"op":"join"}"#[..],
            br#"{"room":"a"}"#,
            br#"{"op":"join","room":"a","room":"b"}"#,
            br#"{"op":"publish","kind":"chat"}"#,
            br#"{"op":"publish","body":1}"#,
            br#"{"op":"refresh"}"#,
            br#"{"op":"publish","kind":"chat","body":}"#,
            br#"{"op":"publish","kind":"chat","body":1"#,
        ] {
            assert!(decode_client_json(bad).is_err(), "{}", String::from_utf8_lossy(bad));
        }
        assert!(decode_json(br#"{"type":"joined","room":"r"}"#).is_err());
        assert!(decode_json(br#"{"type":"nope"}"#).is_err());
    }

    /// A tombstone is a plain message in both encodings: it round-trips, and names its target.
    #[test]
    fn tombstones_are_plain_messages_naming_their_target() {
        let gift = PushMessage { seq: 7, ts_us: 70, kind: "gift".into(), user: "a".into(), body: "{}".into() };
        let in_place = tombstone_in_place(&gift);
        assert_eq!((in_place.seq, in_place.ts_us, in_place.user.as_str()), (7, 70, ""));
        assert_eq!(deleted_seq(&in_place), Some(7));
        let live =
            PushMessage { seq: 9, ts_us: 90, kind: DELETED_KIND.into(), user: String::new(), body: tombstone_body(7) };
        assert_eq!(deleted_seq(&live), Some(7));
        assert_eq!(deleted_seq(&gift), None);
        assert!(validate_kind(DELETED_KIND).is_ok(), "a valid kind name, reserved by configuration");
        let b = ServerMsg::Batch { room: "r".into(), messages: vec![in_place, live], online: None };
        let mut json = Vec::new();
        encode_json(&b, &mut json).unwrap();
        assert!(
            String::from_utf8_lossy(&json)
                .contains(r#"{"seq":9,"ts_us":90,"kind":"deleted","user":"","body":{"seq":7}}"#)
        );
        assert_eq!(decode_json(&json).unwrap(), b);
        assert_eq!(decode_rkyv(&encode_rkyv(&b).unwrap()).unwrap(), b);
    }

    #[test]
    fn room_and_kind_names() {
        assert!(validate_room("room-1.a:b_c").is_ok());
        assert!(validate_room("").is_err());
        assert!(validate_room("a b").is_err());
        assert!(validate_room(&"x".repeat(65)).is_err());
        assert!(validate_kind("gift").is_ok());
        assert!(validate_kind("Gift").is_err());
    }

    #[test]
    fn epochs_and_seqs_are_read_strictly() {
        assert!(validate_epoch("00000000000000ab").is_ok());
        assert!(validate_epoch("0123456789abcdef").is_ok());
        for bad in
            ["", "ab", "00ab", "00000000000000AB", "000000000000000g", "00000000000000ab0", " 0000000000000ab", "x"]
        {
            assert!(validate_epoch(bad).is_err(), "{bad:?}");
        }
        assert_eq!(parse_seq("0"), Some(0));
        assert_eq!(parse_seq("18446744073709551615"), Some(u64::MAX));
        for bad in ["", "+5", "-1", " 5", "5 ", "5.0", "1e3", "0x5", "18446744073709551616"] {
            assert_eq!(parse_seq(bad), None, "{bad:?}");
        }
    }
}
