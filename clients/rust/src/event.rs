//! What the client tells the application.

use std::time::Duration;

/// A message's kind. The edge's configuration names the kinds; these are the defaults, the rest
/// arrive as [`Kind::Custom`].
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Kind {
    /// `gift`: must-deliver (never sampled or dropped; recovered after a reconnect).
    Gift,
    /// `system`: must-deliver.
    System,
    /// `chat`: droppable (may be sampled in hot rooms; not recovered).
    Chat,
    /// `like`: droppable.
    Like,
    /// `deleted`: a moderator's tombstone (must-deliver). Its body is `{"seq":N}`: remove
    /// message N of the room if it is shown ([`Message::deletes`]); never show the tombstone
    /// itself. A replay carries one in place of a deleted message (then N is its own seq).
    Deleted,
    /// Any other kind the edge is configured with.
    Custom(String),
}

impl Kind {
    /// Reads a kind name.
    pub fn parse(kind: &str) -> Self {
        match kind {
            "gift" => Self::Gift,
            "system" => Self::System,
            "chat" => Self::Chat,
            "like" => Self::Like,
            roomcast_proto::envelope::DELETED_KIND => Self::Deleted,
            other => Self::Custom(other.to_owned()),
        }
    }

    /// The kind's name on the wire.
    pub fn as_str(&self) -> &str {
        match self {
            Self::Gift => "gift",
            Self::System => "system",
            Self::Chat => "chat",
            Self::Like => "like",
            Self::Deleted => roomcast_proto::envelope::DELETED_KIND,
            Self::Custom(s) => s,
        }
    }
}

/// One room message, delivered to the application at most once.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Message {
    /// The room it was published to.
    pub room: String,
    /// The room's sequence number (within the room's current epoch).
    pub seq: u64,
    /// Server time at publish, microseconds since the Unix epoch.
    pub ts_us: u64,
    /// Its kind.
    pub kind: Kind,
    /// The publishing user (server-made identity, or the business back end's word).
    pub user: String,
    /// The body: JSON text, exactly as published.
    pub body: String,
    /// The edge replayed it from the room's history (a `since` resume after a reconnect, or
    /// the edge's `history.join_last`) rather than pushing it live.
    pub recovered: bool,
}

impl Message {
    /// For a tombstone ([`Kind::Deleted`]): the seq of the message a moderator deleted, which
    /// the application removes from what it shows (its own seq for a tombstone standing in a
    /// replay in place of the deleted message: nothing to remove). None for other kinds.
    pub fn deletes(&self) -> Option<u64> {
        if self.kind != Kind::Deleted {
            return None;
        }
        #[derive(serde::Deserialize)]
        struct Body {
            seq: u64,
        }
        serde_json::from_str::<Body>(&self.body).ok().map(|b| b.seq)
    }

    /// Parses the body into a type of the application's.
    pub fn body_as<T: serde::de::DeserializeOwned>(&self) -> Result<T, serde_json::Error> {
        serde_json::from_str(&self.body)
    }
}

/// Where a room's numbering stands for this client: the last seq it saw and the epoch it counts
/// in. Pass it to [`Client::join_at`](crate::Client::join_at) to resume after a restart of the
/// application itself.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Position {
    /// Last seq seen (or the seq the client joined at).
    pub seq: u64,
    /// The epoch `seq` counts in (from `joined` or `reset`); `None` if unknown.
    pub epoch: Option<String>,
}

/// The connection's state.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ConnectionState {
    /// Asking dispatch and opening a connection; `attempt` counts failures since the last
    /// stable connection.
    Connecting {
        /// Failures since the last stable connection.
        attempt: u32,
    },
    /// The WebSocket is open.
    Connected {
        /// The WebSocket URL (without the token).
        url: String,
        /// The edge id dispatch named, if dispatch was asked.
        edge: Option<String>,
    },
    /// The connection was lost (or refused); the next attempt starts after `retry_in`.
    Disconnected {
        /// When the next attempt starts.
        retry_in: Duration,
    },
    /// [`Client::close`](crate::Client::close) was called, or the application dropped the event
    /// stream; no more events follow.
    Closed,
}

/// Why something went wrong, with the code the protocol gives it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ErrorEvent {
    /// An `error` message from the edge (the connection stays open): `code` is the protocol's
    /// (`bad_room`, `room_forbidden`, `join_refused`, `rate_limited`, `refresh_refused`,
    /// `token_expired`, ...).
    #[error("edge error {code}: {message}")]
    Server {
        /// The protocol's error code.
        code: String,
        /// What went wrong, in words.
        message: String,
    },
    /// The edge closed the connection with this WebSocket close code (4000 slow consumer,
    /// 4001 token expired, 4002 disconnected by a moderator: the client stops, 1013 try later,
    /// 1001 going away, 1002/1007/1008/1009 protocol errors).
    #[error("closed by the edge: {code} {reason}")]
    Closed {
        /// The WebSocket close code.
        code: u16,
        /// The close reason.
        reason: String,
    },
    /// The edge refused the upgrade with this HTTP status (401 token, 403 room or origin, 429
    /// too many, 503 overloaded, 400-class malformed).
    #[error("upgrade refused: {status} {body}")]
    Refused {
        /// The HTTP status.
        status: u16,
        /// The answer body.
        body: String,
    },
    /// The dispatch endpoint did not give an edge (`status` 0: no answer).
    #[error("dispatch failed: {status} {message}")]
    Dispatch {
        /// The HTTP status (0: no answer).
        status: u16,
        /// What went wrong.
        message: String,
    },
    /// The token callback failed.
    #[error("token callback failed: {0}")]
    Token(String),
    /// The connection failed or died (I/O, timeout, liveness bound passed).
    #[error("connection lost: {0}")]
    Transport(String),
    /// A frame from the edge could not be decoded (the connection is dropped and resumed).
    #[error("undecodable frame: {0}")]
    Decode(String),
    /// A request of the application's could not be carried out (not connected, not in a room).
    #[error("request refused: {0}")]
    Request(String),
}

impl ErrorEvent {
    /// A short code: the server's error code, `close:CODE`, `http:STATUS`, or the variant name.
    pub fn code(&self) -> String {
        match self {
            Self::Server { code, .. } => code.clone(),
            Self::Closed { code, .. } => format!("close:{code}"),
            Self::Refused { status, .. } => format!("http:{status}"),
            Self::Dispatch { status, .. } => format!("dispatch:{status}"),
            Self::Token(_) => "token".into(),
            Self::Transport(_) => "transport".into(),
            Self::Decode(_) => "decode".into(),
            Self::Request(_) => "request".into(),
        }
    }
}

/// Everything the client reports, in the order it happened.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// The connection's state changed.
    State(ConnectionState),
    /// The client is a member of `room`. `seq` is where the live stream starts; `resumed` is
    /// true when the client asked for what it missed (`since`): recovered messages follow.
    Joined {
        /// The room.
        room: String,
        /// The room's numbering (opaque).
        epoch: String,
        /// Where the live stream starts.
        seq: u64,
        /// The client asked for what it missed (`since`).
        resumed: bool,
    },
    /// The client left `room` (on request, or before joining another).
    Left {
        /// The room left.
        room: String,
    },
    /// A room message. Never a duplicate; in seq order within a room's epoch.
    Message(Message),
    /// The room's members across every edge (sent by the edge when it changes).
    Online {
        /// The room.
        room: String,
        /// The room's members across every edge.
        count: u64,
    },
    /// Messages `from..=to` of `room` cannot be recovered: said by the edge, never guessed.
    Gap {
        /// The room.
        room: String,
        /// The first seq missing.
        from: u64,
        /// The last seq missing.
        to: u64,
    },
    /// The room's numbering restarted (its `epoch` changed: edge restarted without its store,
    /// room forgotten, Redis lost): what was missed of the old numbering is gone. From now on
    /// the position is `seq` in `epoch`; messages of the new numbering follow.
    Reset {
        /// The room.
        room: String,
        /// The new numbering.
        epoch: String,
        /// The position in it.
        seq: u64,
        /// Why, in words.
        reason: String,
    },
    /// The edge is draining; the client reconnects through `url` after `reconnect_after`.
    Goaway {
        /// Where to reconnect (the dispatch endpoint).
        url: String,
        /// Why, in words.
        reason: String,
        /// Wait this long (drawn at random by the edge) first.
        reconnect_after: Duration,
    },
    /// A [`Client::publish`](crate::Client::publish) was accepted and numbered.
    Published {
        /// The room published to.
        room: String,
        /// The seq the message got.
        seq: u64,
        /// Server timestamp of the publish, µs since the Unix epoch.
        ts_us: u64,
    },
    /// A token refresh was accepted: the connection's token now expires at `exp` (Unix s).
    Refreshed {
        /// Expiry, seconds since the Unix epoch.
        exp: u64,
    },
    /// Something failed; the client carries on (reconnecting if the connection is gone).
    Error(ErrorEvent),
}
