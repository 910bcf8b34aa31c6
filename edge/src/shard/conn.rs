//! One connection's state inside its shard.

use std::collections::VecDeque;
use std::rc::Rc;

use bytes::Bytes;
use roomcast_proto::Subprotocol;
use roomcast_proto::ws::{Decoder, OpCode};

use crate::bus::{KindTimes, RoomName};

/// A frame queued for a connection. Deliveries share one per shard (an `Rc`, so queueing it on
/// 10^4 members costs no atomic operation); control frames are the connection's own.
pub struct OutFrame {
    pub bytes: Bytes,
    /// Published messages inside (0 for control frames), for delivery counters.
    pub messages: u32,
    /// What a slow consumer keeps of this frame.
    pub must: Keep,
    /// When the shard queued it (ms since the shard started): how far behind a reader is.
    pub queued_ms: u64,
    /// When the oldest message it carries (of its class) reached its room's batch (deliveries
    /// only): the start of its delivery latency (`Delivery::since`).
    pub since: Option<std::time::Instant>,
    /// The kinds of its batch and when each arrived (deliveries only), for the per-kind latency:
    /// the batch's one list, shared by its frames on every shard.
    pub kinds: Option<KindTimes>,
    /// It is the must-deliver part of its batch (`Keep::Instead`): only the kinds' must-deliver
    /// messages are in it.
    pub must_part: bool,
}

/// What of a queued frame survives when its connection falls behind.
pub enum Keep {
    /// All of it: control frames, and batches of must-deliver messages only.
    Whole,
    /// Nothing: a batch of droppable messages only.
    Nothing,
    /// This smaller frame, with only the must-deliver messages.
    Instead(Rc<OutFrame>),
}

impl OutFrame {
    pub fn control(bytes: Bytes) -> Rc<Self> {
        Rc::new(Self {
            bytes,
            messages: 0,
            must: Keep::Whole,
            queued_ms: 0,
            since: None,
            kinds: None,
            must_part: false,
        })
    }

    /// Each kind it carries (its index in `Config::latency_kinds`), with when that kind's
    /// oldest message in it reached its room's batch.
    pub fn kind_times(&self) -> impl Iterator<Item = (u16, std::time::Instant)> + '_ {
        self.kinds
            .iter()
            .flat_map(|k| k.iter())
            .filter_map(|k| if self.must_part { k.must_since.map(|t| (k.kind, t)) } else { Some((k.kind, k.since)) })
    }

    /// Whether it carries must-deliver messages (the latency class it counts in).
    pub fn carries_must_deliver(&self) -> bool {
        !matches!(self.must, Keep::Nothing)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    /// Waiting for the HTTP upgrade request (or the event-stream request).
    Handshake,
    /// WebSocket frames flow (or SSE events: `proto` is `Sse`).
    Open,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Closing {
    No,
    /// Write what is queued (ending with a close frame or an HTTP error), then linger (if
    /// `linger`) or close. Cut (`Abort`) if the flush is not done by `deadline_ms`.
    AfterFlush {
        deadline_ms: u64,
        linger: bool,
    },
    /// Everything is written and the write side shut (FIN after it): what the peer still sends
    /// is read and discarded, so that closing finds nothing unread (which would make it a
    /// reset), until the peer's FIN, `deadline_ms`, or `left` more bytes (lifecycle.rs).
    Lingering {
        deadline_ms: u64,
        left: u32,
    },
    /// Close without writing anything more.
    Abort,
}

/// What the decoder asked the shard to do (owned: the receive buffer goes back to the kernel
/// before the shard acts).
pub enum Action {
    Message(OpCode, Vec<u8>),
    Ping(Vec<u8>),
    Close(Option<u16>, Vec<u8>),
}

pub struct Conn {
    pub generation: u32,
    pub phase: Phase,
    pub closing: Closing,
    pub proto: Subprotocol,
    /// permessage-deflate: the window (9 to 15 bits) this connection's frames are compressed
    /// with; 0 when it was not negotiated.
    pub deflate_bits: u8,
    /// The upgrade request as it arrives (freed once parsed).
    pub hs: Vec<u8>,
    pub decoder: Option<Box<Decoder>>,
    pub room: Option<RoomName>,
    pub room_idx: u32,
    /// A join sent to the room's engine and not yet acknowledged.
    pub joining: Option<RoomName>,
    pub out: VecDeque<Rc<OutFrame>>,
    pub out_bytes: usize,
    /// Bytes of `out[0]` already written.
    pub head_off: usize,
    /// Frames at the front of `out` that an in-flight send points into (0: none in flight).
    pub in_flight: u16,
    pub iov: Vec<libc::iovec>,
    pub recv_armed: bool,
    /// In the shard's delivery line (`SendLines::deliveries`: room deliveries, first come first
    /// served).
    pub dirty: bool,
    /// In the shard's answer line (`SendLines::answers`): an answer of the connection's own is
    /// queued (101, joined and its replay, pong, error, goaway), which goes ahead of the room
    /// deliveries.
    pub urgent: bool,
    /// The 101 answer is queued and not yet written (`roomcast_handshake_seconds` times it).
    pub upgrade_unsent: bool,
    pub cancel_issued: bool,
    pub close_issued: bool,
    /// The lingering close's SHUT_WR is in flight. io_uring runs a shutdown on a worker
    /// thread, which looks the direct descriptor up only when it runs: were the slot closed
    /// first and taken by a new connection, the shutdown would end that one (seen: clients
    /// whose upgrade got EOF). The slot is closed only after its completion.
    pub shutdown_issued: bool,
    pub opened_ms: u64,
    pub last_rx_ms: u64,
    /// When a write to the peer was last issued or last made progress: a peer still taking
    /// the bytes queued to it (our ping among them) is not idle, however long since it last
    /// spoke; one that has not taken a write issued `idle_timeout` ago is stalled.
    pub last_tx_ms: u64,
    /// When the peer last took a whole message frame: a peer taking the room's messages needs
    /// no ping and is not idle (`lifecycle::is_idle`; TCP_USER_TIMEOUT has the kernel fail one
    /// whose bytes go unacknowledged).
    pub last_data_ms: Option<u64>,
    /// When it was last pinged (0: never).
    pub last_ping_ms: u64,
    /// Draining: when this connection gets its `goaway`.
    pub goaway_at_ms: Option<u64>,
    /// Signalling token bucket (`ws.signal_rate`): tokens, and when they were last counted.
    pub signal_tokens: f64,
    pub signal_at_ms: u64,
    /// Signalling messages refused in a row (reset by one that is taken).
    pub signals_refused: u32,
    /// Who this connection is, from its token (set at the upgrade). None: anonymous (no key
    /// configured), known by `anon_id` alone: boxed, and nothing at all for anonymous members,
    /// because a room of 10^5 pays for every byte here 10^5 times.
    pub identity: Option<Box<crate::auth::Identity>>,
    /// A server-made id for an anonymous connection (its user is `anon-` + this, in hex).
    pub anon_id: u64,
    /// The client's address (for the logs), and whether the per-address guard counts this
    /// connection (then it is released on close).
    pub peer: Option<std::net::IpAddr>,
    pub peer_counted: bool,
    /// Bytes of a `since` replay not yet written: allowed on top of the queue bound.
    pub replay_credit: usize,
    /// SSE: bytes the client sent after its request (ignored, bounded).
    pub ignored: usize,
    /// Why it is closing (the first cause wins), for `connections_closed_total{reason}`.
    pub why: Option<crate::metrics::CloseWhy>,
    /// A `wss` connection's TLS session (None: plain). Boxed: plain members pay one pointer.
    pub tls: Option<Box<super::tls::TlsConn>>,
}

impl Conn {
    pub fn new(generation: u32, now_ms: u64) -> Self {
        Self {
            generation,
            phase: Phase::Handshake,
            closing: Closing::No,
            why: None,
            proto: Subprotocol::Json,
            deflate_bits: 0,
            hs: Vec::new(),
            decoder: None,
            room: None,
            room_idx: 0,
            joining: None,
            out: VecDeque::new(),
            out_bytes: 0,
            head_off: 0,
            in_flight: 0,
            iov: Vec::new(),
            recv_armed: false,
            dirty: false,
            urgent: false,
            upgrade_unsent: false,
            cancel_issued: false,
            close_issued: false,
            shutdown_issued: false,
            opened_ms: now_ms,
            last_rx_ms: now_ms,
            last_tx_ms: now_ms,
            last_data_ms: None,
            last_ping_ms: 0,
            goaway_at_ms: None,
            signal_tokens: f64::INFINITY,
            signal_at_ms: now_ms,
            signals_refused: 0,
            identity: None,
            anon_id: 0,
            peer: None,
            peer_counted: false,
            replay_credit: 0,
            ignored: 0,
            tls: None,
        }
    }

    /// The user this connection is: its token's `sub`, or its anonymous id.
    pub fn user(&self) -> std::borrow::Cow<'_, str> {
        match &self.identity {
            Some(id) => std::borrow::Cow::Borrowed(&id.user),
            None => std::borrow::Cow::Owned(crate::auth::Identity::anonymous(self.anon_id).user.to_string()),
        }
    }

    /// Whether this connection is `user` (without building an anonymous id's text).
    pub fn is_user(&self, user: &str) -> bool {
        match &self.identity {
            Some(id) => &*id.user == user,
            None => user
                .strip_prefix("anon-")
                .filter(|hex| hex.len() == 16)
                .and_then(|hex| u64::from_str_radix(hex, 16).ok())
                .is_some_and(|id| id == self.anon_id),
        }
    }

    /// Takes a signalling token (`rate` per second, at most `burst` saved up).
    pub fn take_signal(&mut self, rate: f64, burst: f64, now_ms: u64) -> bool {
        let dt = now_ms.saturating_sub(self.signal_at_ms) as f64 / 1000.0;
        self.signal_at_ms = now_ms;
        self.signal_tokens = (self.signal_tokens + dt * rate).min(burst);
        if self.signal_tokens >= 1.0 {
            self.signal_tokens -= 1.0;
            self.signals_refused = 0;
            true
        } else {
            self.signals_refused = self.signals_refused.saturating_add(1);
            false
        }
    }

    pub fn push(&mut self, f: Rc<OutFrame>) {
        self.out_bytes += f.bytes.len();
        self.out.push_back(f);
    }

    /// The unsent part of the front frame.
    pub fn head_slice(&self) -> (*const u8, usize) {
        let f = &self.out[0].bytes;
        (f[self.head_off..].as_ptr(), f.len() - self.head_off)
    }

    /// Points `iov` at the unsent parts of the first `n` frames.
    pub fn fill_iov(&mut self, n: usize) {
        self.iov.clear();
        for (i, f) in self.out.iter().take(n).enumerate() {
            let off = if i == 0 { self.head_off } else { 0 };
            let rest = &f.bytes[off..];
            self.iov.push(libc::iovec { iov_base: rest.as_ptr() as *mut libc::c_void, iov_len: rest.len() });
        }
    }

    /// Accounts `written` bytes of the `in_flight` frames at the front; `done` sees each frame
    /// fully written. Returns (frames, messages) fully written.
    pub fn consume(&mut self, mut written: usize, in_flight: u16, mut done: impl FnMut(&OutFrame)) -> (u64, u64) {
        let (mut frames, mut messages) = (0u64, 0u64);
        for _ in 0..in_flight {
            let Some(front) = self.out.front() else { break };
            let left = front.bytes.len() - self.head_off;
            if written >= left {
                written -= left;
                self.out_bytes -= front.bytes.len();
                frames += 1;
                messages += u64::from(front.messages);
                done(front);
                self.out.pop_front();
                self.head_off = 0;
            } else {
                self.head_off += written;
                break;
            }
        }
        (frames, messages)
    }

    /// Frames at the front that must stay as they are: those an in-flight send points into, and
    /// a frame partly written already (`head_off` counts into it; replacing or dropping it would
    /// splice half a frame into the stream).
    pub fn pinned(&self) -> usize {
        // A TLS connection's frames encrypted into a `wire` not yet all written are pinned too.
        let encrypted = self.tls.as_ref().filter(|t| t.wire_off < t.wire.len()).map_or(0, |t| t.frames);
        usize::from(self.in_flight).max(usize::from(self.head_off > 0)).max(usize::from(encrypted))
    }

    /// When the oldest frame not yet handed to the kernel was queued.
    pub fn oldest_unsent_ms(&self) -> Option<u64> {
        self.out.get(self.pinned()).map(|f| f.queued_ms)
    }

    /// The connection is behind: every queued frame not yet handed to the kernel is replaced by
    /// its must-deliver part (or dropped if it has none). Returns the bytes shed.
    pub fn shed(&mut self) -> usize {
        let keep = self.pinned().min(self.out.len());
        let before = self.out_bytes;
        let tail: Vec<Rc<OutFrame>> = self.out.drain(keep..).collect();
        for f in tail {
            self.out_bytes -= f.bytes.len();
            match &f.must {
                Keep::Whole => self.push(f),
                Keep::Nothing => {}
                Keep::Instead(g) => self.push(g.clone()),
            }
        }
        before - self.out_bytes
    }

    /// Drops queued frames beyond the first `keep` (and beyond the pinned ones).
    pub fn drop_unsent(&mut self, keep: usize) {
        while self.out.len() > keep.max(self.pinned()) {
            if let Some(f) = self.out.pop_back() {
                self.out_bytes -= f.bytes.len();
            }
        }
        if self.out.is_empty() {
            self.head_off = 0;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(n: usize) -> Rc<OutFrame> {
        Rc::new(OutFrame {
            bytes: Bytes::from(vec![7u8; n]),
            messages: 2,
            must: Keep::Nothing,
            queued_ms: 0,
            since: None,
            kinds: None,
            must_part: false,
        })
    }

    #[test]
    fn shedding_keeps_in_flight_and_must_deliver_parts() {
        let mut c = Conn::new(1, 0);
        c.push(frame(100)); // in flight
        c.push(frame(100)); // droppable: goes
        let gift = Rc::new(OutFrame {
            bytes: Bytes::from(vec![1u8; 10]),
            messages: 1,
            must: Keep::Whole,
            queued_ms: 0,
            since: None,
            kinds: None,
            must_part: false,
        });
        c.push(Rc::new(OutFrame {
            bytes: Bytes::from(vec![2u8; 100]),
            messages: 3,
            must: Keep::Instead(gift),
            queued_ms: 0,
            since: None,
            kinds: None,
            must_part: false,
        }));
        c.push(OutFrame::control(Bytes::from_static(b"ctl")));
        c.in_flight = 1;
        assert_eq!(c.shed(), 190);
        let sizes: Vec<usize> = c.out.iter().map(|f| f.bytes.len()).collect();
        assert_eq!(sizes, vec![100, 10, 3]);
        assert_eq!(c.out_bytes, 113);
    }

    #[test]
    fn partial_writes_resume_where_they_stopped() {
        let mut c = Conn::new(1, 0);
        c.push(frame(10));
        c.push(frame(5));
        c.push(frame(3));
        c.fill_iov(3);
        assert_eq!(c.iov.len(), 3);
        // 12 bytes: the first frame and 2 bytes of the second.
        assert_eq!(c.consume(12, 3, |_| {}), (1, 2));
        assert_eq!((c.out.len(), c.head_off, c.out_bytes), (2, 2, 8));
        let (_, len) = c.head_slice();
        assert_eq!(len, 3);
        c.fill_iov(2);
        assert_eq!(c.iov[0].iov_len, 3);
        assert_eq!(c.consume(6, 2, |_| {}), (2, 4));
        assert!(c.out.is_empty());
        assert_eq!(c.out_bytes, 0);
    }

    #[test]
    fn a_partly_written_frame_is_never_replaced_or_dropped() {
        let mut c = Conn::new(1, 0);
        c.push(frame(100));
        c.push(frame(100));
        c.fill_iov(2);
        // 30 bytes of the first frame went out; nothing is in flight now.
        assert_eq!(c.consume(30, 2, |_| {}), (0, 0));
        c.in_flight = 0;
        assert_eq!(c.head_off, 30);
        c.shed();
        assert_eq!(c.out.len(), 1, "the droppable second frame goes, the partial first stays");
        assert_eq!((c.out[0].bytes.len(), c.head_off, c.out_bytes), (100, 30, 100));
        c.drop_unsent(0);
        assert_eq!(c.out.len(), 1);
        let (_, len) = c.head_slice();
        assert_eq!(len, 70);
    }

    #[test]
    fn users_are_told_apart_by_identity_or_anonymous_id() {
        let mut c = Conn::new(1, 0);
        c.anon_id = 0xab;
        assert_eq!(c.user(), "anon-00000000000000ab");
        assert!(c.is_user("anon-00000000000000ab"));
        assert!(!c.is_user("anon-ab") && !c.is_user("anon-00000000000000ac") && !c.is_user("alice"));
        let mut id = crate::auth::Identity::anonymous(0);
        id.user = "alice".into();
        id.anonymous = false;
        c.identity = Some(Box::new(id));
        assert!(c.is_user("alice") && !c.is_user("anon-00000000000000ab"));
        assert_eq!(c.user(), "alice");
    }

    /// A batch's frame times every kind it carries; its must-deliver part (what a slow
    /// consumer keeps) only the must-deliver messages, from the oldest of those.
    #[test]
    fn the_must_deliver_part_times_only_must_deliver_messages() {
        use crate::bus::KindSince;
        use std::time::{Duration, Instant};
        let t0 = Instant::now();
        let at = |ms| t0 + Duration::from_millis(ms);
        let kinds: crate::bus::KindTimes = vec![
            KindSince { kind: 1, since: at(0), must_since: None },
            KindSince { kind: 0, since: at(30), must_since: Some(at(30)) },
            // `deleted`: a droppable message's tombstone in place at 10, a live tombstone at 50.
            KindSince { kind: 4, since: at(10), must_since: Some(at(50)) },
        ]
        .into();
        let frame = |must_part| OutFrame {
            bytes: Bytes::from_static(b"x"),
            messages: 4,
            must: Keep::Whole,
            queued_ms: 0,
            since: Some(t0),
            kinds: Some(kinds.clone()),
            must_part,
        };
        let times =
            |f: &OutFrame| f.kind_times().map(|(k, t)| (k, t.duration_since(t0).as_millis())).collect::<Vec<_>>();
        assert_eq!(times(&frame(false)), vec![(1, 0), (0, 30), (4, 10)]);
        assert_eq!(times(&frame(true)), vec![(0, 30), (4, 50)]);
        assert_eq!(OutFrame::control(Bytes::from_static(b"c")).kind_times().count(), 0);
    }

    #[test]
    fn drop_unsent_keeps_in_flight_frames() {
        let mut c = Conn::new(1, 0);
        for n in [4, 4, 4] {
            c.push(frame(n));
        }
        c.in_flight = 1;
        c.drop_unsent(0);
        assert_eq!((c.out.len(), c.out_bytes), (1, 4));
    }
}
