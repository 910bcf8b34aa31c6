//! What the fuzz targets share: the WebSocket decoder driven to owned events (ours, and
//! tungstenite's as the reference), and the seed inputs (`examples/seeds.rs` writes them into
//! `corpus/`).
#![forbid(unsafe_code)]

pub mod seeds;

use std::io::{self, Read, Write};

use roomcast_proto::ws::{CloseReason, Decoder, Event, Limits};

/// Limits small enough that a fuzzer's inputs (4 KiB by default) reach every size check: a
/// message of several frames can pass `max_frame` and then `max_message`. `max_frame` is above
/// 125 so that the control-frame bound, not this one, is what a control frame meets (as with
/// the edge's real limits).
pub const SMALL: Limits = Limits { max_frame: 200, max_message: 600 };

/// One decoder event, owned.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Ev {
    Text(Vec<u8>),
    Binary(Vec<u8>),
    Ping(Vec<u8>),
    Pong(Vec<u8>),
    Close(Option<u16>, Vec<u8>),
}

impl Ev {
    pub fn of(e: Event<'_>) -> Self {
        match e {
            Event::Text(p) => Ev::Text(p.to_vec()),
            Event::Binary(p) => Ev::Binary(p.to_vec()),
            Event::Ping(p) => Ev::Ping(p.to_vec()),
            Event::Pong(p) => Ev::Pong(p.to_vec()),
            Event::Close { code, reason } => Ev::Close(code, reason.to_vec()),
        }
    }
}

/// What our decoder made of a byte stream: its events, and the first protocol error, if any
/// (the edge stops reading there).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Decoded {
    pub events: Vec<Ev>,
    pub result: Result<(), CloseReason>,
}

/// Feeds `chunks` in order to one decoder, as reads arrive on a connection; stops at the first
/// error. Returns what was decoded and the decoder (to look at what it holds).
pub fn decode_chunks<'a>(limits: Limits, chunks: impl IntoIterator<Item = &'a [u8]>) -> (Decoded, Decoder) {
    let mut d = Decoder::new(limits);
    let mut events = Vec::new();
    let mut result = Ok(());
    for chunk in chunks {
        let mut buf = chunk.to_vec();
        result = d.feed(&mut buf, &mut |e| events.push(Ev::of(e)));
        if result.is_err() {
            break;
        }
    }
    (Decoded { events, result }, d)
}

/// What tungstenite (server role) made of a byte stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reference {
    /// Every frame read; the input ended, possibly inside a frame (a reader would wait).
    Open(Vec<Ev>),
    /// A close frame was read (the last event); tungstenite reads nothing after it.
    Closed(Vec<Ev>),
    /// A protocol error after these events: the close code tungstenite's error maps to
    /// (1002 protocol, 1007 not UTF-8, 1009 too big).
    Failed(Vec<Ev>, u16, String),
}

/// A stream that reads the input once, then end of file; writes (pongs, the close reply) go
/// nowhere.
struct Replay<'a> {
    input: &'a [u8],
}

impl Read for Replay<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.input.read(buf)
    }
}

impl Write for Replay<'_> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        Ok(buf.len())
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// Reads `input` with tungstenite's server-side `WebSocket` (its frame parser and message
/// assembly) over an in-memory stream, with the same size limits as ours.
pub fn reference(limits: Limits, input: &[u8]) -> Reference {
    use tungstenite::error::{CapacityError, Error, ProtocolError};
    use tungstenite::protocol::{Message, Role, WebSocket, WebSocketConfig};

    let config = WebSocketConfig::default()
        .max_frame_size(Some(limits.max_frame))
        .max_message_size(Some(limits.max_message))
        .read_buffer_size(4096);
    let mut ws = WebSocket::from_raw_socket(Replay { input }, Role::Server, Some(config));
    let mut events = Vec::new();
    loop {
        match ws.read() {
            Ok(Message::Text(t)) => events.push(Ev::Text(t.as_bytes().to_vec())),
            Ok(Message::Binary(b)) => events.push(Ev::Binary(b.to_vec())),
            Ok(Message::Ping(p)) => events.push(Ev::Ping(p.to_vec())),
            Ok(Message::Pong(p)) => events.push(Ev::Pong(p.to_vec())),
            Ok(Message::Close(c)) => {
                events.push(match c {
                    None => Ev::Close(None, Vec::new()),
                    Some(f) => Ev::Close(Some(u16::from(f.code)), f.reason.as_bytes().to_vec()),
                });
                return Reference::Closed(events);
            }
            Ok(Message::Frame(_)) => unreachable!("tungstenite returns raw frames only when writing"),
            // The input ended (in a frame or between frames): no verdict yet.
            Err(Error::Protocol(ProtocolError::ResetWithoutClosingHandshake)) => return Reference::Open(events),
            Err(e) => {
                let code = match &e {
                    Error::Utf8(_) => 1007,
                    Error::Capacity(CapacityError::MessageTooLong { .. }) => 1009,
                    _ => 1002,
                };
                return Reference::Failed(events, code, e.to_string());
            }
        }
    }
}
