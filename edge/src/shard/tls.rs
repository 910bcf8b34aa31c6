//! A `wss` connection's TLS, driven by the ring like everything else: the bytes a receive
//! completes with are fed to the connection's rustls `ServerConnection` (the handshake runs on
//! them: nothing blocks the shard), the plaintext goes on to the usual upgrade / frame / SSE
//! path, and whatever rustls wants to say (handshake flights, tickets, alerts) is sent like a
//! frame.
//!
//! Sending: the queue (`Conn::out`) holds plaintext frames, shared by every member as on a
//! plain connection, so queue bounds, shedding and delivery accounting are the same. When a
//! send is issued, the frames it covers are encrypted with this session's keys into `wire`,
//! which the kernel is handed; they count as written once the whole of `wire` is. The frames
//! stay in the queue (pinned, `in_flight`) meanwhile, as on a plain connection.

use std::io::{Read, Write};

use bytes::Bytes;
use roomcast_proto::Subprotocol;
use rustls::ServerConnection;

use super::conn::{Closing, OutFrame, Phase};
use super::{Retry, Shard};
use crate::metrics::CloseWhy;
use crate::uring::{OpKind, Sq, Token};

/// `wire` keeps at most this much capacity between sends (a large batch's ciphertext is not
/// held for the life of an idle connection: 10^5 members pay for every byte kept).
const WIRE_KEEP: usize = 4 * 1024;

/// One connection's TLS session and its outgoing ciphertext.
pub struct TlsConn {
    pub session: ServerConnection,
    /// Ciphertext of the send in flight; `wire_off` bytes of it are written.
    pub wire: Vec<u8>,
    pub wire_off: usize,
    /// Plaintext bytes of the frames `wire` carries (what they count as once it is written),
    /// and how many frames at the front of the queue those are (pinned until then).
    pub plain: usize,
    pub frames: u16,
    /// Nothing decrypted yet: bad input now is likely not TLS at all (a plain `ws://` client).
    pub fresh: bool,
}

impl TlsConn {
    pub fn new(config: &std::sync::Arc<rustls::ServerConfig>) -> Result<Box<Self>, rustls::Error> {
        let mut session = ServerConnection::new(config.clone())?;
        // The queue in front of it is bounded (`send.max_queue_bytes`); rustls's own bound would
        // only refuse part of a frame.
        session.set_buffer_limit(None);
        Ok(Box::new(Self { session, wire: Vec::new(), wire_off: 0, plain: 0, frames: 0, fresh: true }))
    }

    /// Feeds received bytes; decrypted application data is appended to `plain`. Returns
    /// whether the peer sent close_notify.
    pub(super) fn feed(&mut self, mut data: &[u8], plain: &mut Vec<u8>) -> Result<bool, rustls::Error> {
        while !data.is_empty() {
            match self.session.read_tls(&mut data) {
                Ok(0) => break,
                Ok(_) => {}
                Err(e) => return Err(rustls::Error::General(format!("cannot buffer TLS input: {e}"))),
            }
            let st = self.session.process_new_packets()?;
            self.fresh = false;
            let n = st.plaintext_bytes_to_read();
            if n > 0 {
                let at = plain.len();
                plain.resize(at + n, 0);
                self.session
                    .reader()
                    .read_exact(&mut plain[at..])
                    .map_err(|e| rustls::Error::General(format!("reading decrypted data: {e}")))?;
            }
            if st.peer_has_closed() {
                return Ok(true);
            }
        }
        Ok(false)
    }

    /// Moves everything rustls has to send into `wire`.
    fn drain_into_wire(&mut self) {
        while self.session.wants_write() {
            if self.session.write_tls(&mut self.wire).is_err() {
                break; // writing into a Vec does not fail
            }
        }
    }
}

/// Whether bytes that are not TLS look like an HTTP request (a `ws://` client on the `wss` port).
pub(super) fn looks_like_http(data: &[u8]) -> bool {
    [&b"GET "[..], b"POST ", b"HEAD ", b"OPTIONS ", b"PUT "].iter().any(|m| data.starts_with(m))
}

impl Shard {
    /// A receive on a TLS connection was fed to its session (`fed`: whether the peer sent
    /// close_notify, or the error and whether the input looked like plain HTTP): answer the
    /// handshake, hand the plaintext (in `tls_plain`) on, or close on bad input.
    pub(super) fn tls_recv(&mut self, slot: u32, fed: Result<bool, (rustls::Error, bool)>) {
        let mut plain = std::mem::take(&mut self.tls_plain);
        let Some(Some(c)) = self.conns.get_mut(slot as usize) else { return };
        let Some(t) = c.tls.as_mut() else { return };
        let fresh = t.fresh;
        let wants_write = t.session.wants_write();
        match fed {
            Err((e, http)) => {
                self.stats.protocol_errors.inc();
                self.closing_for(slot, CloseWhy::TlsError);
                let plain_http = fresh && http;
                if self.log_refusal() {
                    let peer = self.conns[slot as usize].as_ref().and_then(|c| c.peer);
                    let peer = peer.map_or_else(|| "unknown".to_owned(), |p| p.to_string());
                    if plain_http {
                        tracing::info!(shard = self.id, slot, peer = %peer, "plain HTTP on the TLS port (a ws:// client?): answered 400 and closed");
                    } else {
                        tracing::info!(shard = self.id, slot, peer = %peer, error = %e, "bad TLS input: closed");
                    }
                }
                if plain_http {
                    // Say it in the client's own language: the session is dropped and the answer
                    // goes out in clear, as nginx's "plain HTTP request sent to HTTPS port".
                    if let Some(Some(c)) = self.conns.get_mut(slot as usize) {
                        c.tls = None;
                    }
                    let e = roomcast_proto::handshake::HandshakeError {
                        status: 400,
                        reason: "this port speaks TLS: use wss:// (or https:// for the event stream)".into(),
                    };
                    self.finish_with(slot, Some(Bytes::from(roomcast_proto::handshake::error_response(&e))));
                } else {
                    // rustls queued an alert saying why: an empty frame carries it out.
                    self.finish_with(slot, wants_write.then(Bytes::new));
                }
            }
            Ok(peer_closed) => {
                if wants_write {
                    self.tls_flush_marker(slot);
                }
                if !plain.is_empty() {
                    self.tls_deliver(slot, &mut plain);
                }
                if peer_closed && self.live_slot(slot) {
                    self.closing_for(slot, CloseWhy::PeerClosed);
                    self.finish_with(slot, None);
                }
            }
        }
        self.tls_plain = plain;
    }

    fn live_slot(&self, slot: u32) -> bool {
        matches!(self.conns.get(slot as usize), Some(Some(c)) if c.closing == Closing::No)
    }

    /// rustls has records of its own to send: queue an empty frame, so the next send (which
    /// encrypts the queue and drains rustls) goes out even with nothing else queued.
    fn tls_flush_marker(&mut self, slot: u32) {
        let Some(Some(c)) = self.conns.get_mut(slot as usize) else { return };
        if c.closing == Closing::Abort {
            return;
        }
        if c.out.len() <= usize::from(c.in_flight) {
            c.push(OutFrame::control(Bytes::new()));
        }
        self.mark_dirty(slot);
    }

    /// Decrypted bytes: the same path as a plain connection's receive buffer.
    fn tls_deliver(&mut self, slot: u32, data: &mut [u8]) {
        let Some(Some(c)) = self.conns.get_mut(slot as usize) else { return };
        if c.closing != Closing::No {
            return;
        }
        match c.phase {
            Phase::Handshake => {
                c.hs.extend_from_slice(data);
                self.on_handshake_bytes(slot);
            }
            Phase::Open if c.proto == Subprotocol::Sse => self.sse_input(slot, data.len()),
            Phase::Open => {
                let mut actions = std::mem::take(&mut self.actions);
                let r = c.decode(data, &mut actions);
                self.handle_actions(slot, &mut actions, r);
                self.actions = actions;
            }
        }
    }

    /// `issue_send` for a TLS connection: encrypts up to `max_iov` queued frames into `wire`
    /// and sends it. Frames written into rustls before its handshake ends (a refusal at accept)
    /// stay in rustls: they count as written at once.
    pub(super) fn tls_issue_send(&mut self, slot: u32) {
        let max_iov = self.cfg.send.max_iov;
        loop {
            let Some(Some(c)) = self.conns.get_mut(slot as usize) else { return };
            let Some(t) = c.tls.as_mut() else { return };
            if t.wire_off < t.wire.len() {
                // A `wire` the SQ refused, whole or the rest of it: its frames go in flight again.
                c.in_flight = t.frames;
                return self.tls_send_wire(slot);
            }
            t.wire.clear();
            t.wire_off = 0;
            t.plain = 0;
            let n = c.out.len().min(max_iov);
            for f in c.out.iter().take(n) {
                // head_off is always 0 here: a TLS connection's frames count whole.
                if t.session.writer().write_all(&f.bytes).is_err() {
                    break; // unbounded buffer: does not fail
                }
                t.plain += f.bytes.len();
            }
            // The last frame of a closing connection: close_notify goes right after it.
            if matches!(c.closing, Closing::AfterFlush { .. }) && n == c.out.len() && !t.session.is_handshaking() {
                t.session.send_close_notify();
            }
            t.drain_into_wire();
            t.frames = n as u16;
            c.in_flight = n as u16;
            if !t.wire.is_empty() {
                return self.tls_send_wire(slot);
            }
            // Nothing to put on the wire (the handshake is not done): the frames are rustls's now.
            let plain = t.plain;
            c.in_flight = 0;
            c.consume(plain, n as u16, |_| {});
            if c.out.is_empty() {
                if c.closing != Closing::No {
                    self.maybe_release(slot);
                }
                return;
            }
        }
    }

    fn tls_send_wire(&mut self, slot: u32) {
        let Some(Some(c)) = self.conns.get_mut(slot as usize) else { return };
        let Some(t) = c.tls.as_mut() else { return };
        let tok = Token::new(OpKind::Send, c.generation, slot);
        let rest = &t.wire[t.wire_off..];
        // SAFETY: `wire` is owned by the connection's boxed TLS state and is neither touched nor
        // dropped while the send is in flight (`in_flight > 0`) until `on_send` reaps this token
        // (a connection is only released once nothing is in flight).
        let r = unsafe { Sq::new(&mut self.ring).send(slot, rest.as_ptr(), rest.len() as u32, tok) };
        match r {
            Ok(()) => self.sends_this_turn += 1,
            Err(_) => {
                // The SQ is full: `wire` is kept (its frames stay pinned: `Conn::pinned`) and
                // sent next turn.
                c.in_flight = 0;
                self.retry.push((Retry::Send, slot));
            }
        }
    }

    /// A send on a TLS connection completed with `res` > 0 ciphertext bytes. Returns the
    /// plaintext bytes now written (to account the frames), or None while `wire` is not all
    /// written (the rest was sent again; the frames stay in flight).
    pub(super) fn tls_sent(&mut self, slot: u32, in_flight: u16, res: usize) -> Option<usize> {
        let Some(Some(c)) = self.conns.get_mut(slot as usize) else { return None };
        let t = c.tls.as_mut()?;
        t.wire_off += res;
        if t.wire_off < t.wire.len() {
            c.in_flight = in_flight;
            if c.closing == Closing::Abort {
                // Nothing more is sent: account nothing, let the release proceed.
                c.in_flight = 0;
                t.wire.clear();
                t.wire_off = 0;
                t.frames = 0;
                return Some(0);
            }
            self.tls_send_wire(slot);
            return None;
        }
        t.wire.clear();
        t.wire_off = 0;
        t.frames = 0;
        if t.wire.capacity() > WIRE_KEEP {
            t.wire = Vec::new();
        }
        let plain = t.plain;
        t.plain = 0;
        // Records rustls made meanwhile (a ticket, a key update) with no frame to carry them.
        if t.session.wants_write() && c.out.len() <= usize::from(in_flight) && c.closing == Closing::No {
            c.push(OutFrame::control(Bytes::new()));
        }
        Some(plain)
    }
}
