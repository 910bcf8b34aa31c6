//! The Server-Sent Events transport on the shard: `GET /sse?room=R` becomes a member of the
//! room like a WebSocket connection, on the same ring, rooms, engine links and send queue. What
//! differs is only at the edges of the connection: the answer (`200 text/event-stream` instead
//! of `101`), the framing of what it is sent (events, built once per batch by the engine), and
//! that the client never speaks again: there is no signalling, no ping to answer, and so no idle
//! timeout (a dead peer shows as a failed write); a heartbeat comment goes out at
//! `ws.ping_interval_ms`.

use bytes::Bytes;
use roomcast_proto::Subprotocol;
use roomcast_proto::handshake::{EventStream, HandshakeError, MAX_REQUEST};
use roomcast_proto::sse;

use super::Shard;
use super::conn::{OutFrame, Phase};
use super::session::Admitted;
use crate::bus::{Since, parse_epoch};

/// The `retry:` a stream starts with: browsers reconnect this long after a cut (plus up to
/// [`RETRY_JITTER_MS`], chosen per connection, so that an edge's streams cut at once do not all
/// come back in the same millisecond).
const RETRY_MS: u32 = 1000;
const RETRY_JITTER_MS: u32 = 1000;

/// Bytes a stream's client may send after its request before it is closed: an `EventSource`
/// sends none; a client that pipelines one more request fits, one that streams data does not.
const MAX_IGNORED: usize = MAX_REQUEST;

impl Shard {
    /// `GET /sse?...`: checked as an upgrade is (health, origin, token, room, since), then
    /// answered 200 and joined to its room. `rest`: bytes that came after the request.
    pub(super) fn on_event_stream(&mut self, slot: u32, es: &EventStream, rest: usize) {
        let cors = match self.check_gate(es.origin.as_deref()) {
            Ok(c) => c,
            Err(e) => return self.refuse_sse(slot, &e),
        };
        let Admitted { identity, anon_id, room, since } = match self.admit(&es.query, es.bearer.as_deref()) {
            Ok(a) => a,
            Err(e) => return self.refuse_sse(slot, &e),
        };
        let Some(room) = room else {
            let e = HandshakeError {
                status: 400,
                reason: "missing room: an event stream follows one room, GET /sse?room=ROOM".into(),
            };
            return self.refuse_sse(slot, &e);
        };
        // An explicit `since` wins; else the browser's `Last-Event-ID` (what it last got from
        // us, `EPOCH:SEQ`), or a bare seq.
        let since = match (since, es.last_event_id.as_deref().map(sse::parse_last_event_id)) {
            (Some(s), _) => Some(s),
            (None, None | Some(Ok(None))) => None,
            // The parser checked the epoch's form; refused here too should the two rules part.
            (None, Some(Ok(Some(p)))) => match p.epoch.map(parse_epoch).transpose() {
                Ok(epoch) => Some(Since { seq: p.seq, epoch }),
                Err(why) => {
                    let e = HandshakeError { status: 400, reason: format!("bad Last-Event-ID: {why}") };
                    return self.refuse_sse(slot, &e);
                }
            },
            (None, Some(Err(why))) => {
                return self.refuse_sse(slot, &HandshakeError { status: 400, reason: why.into() });
            }
        };
        let retry = RETRY_MS + self.rng.u32(..RETRY_JITTER_MS);
        let mut head = sse::response_200(cors.as_deref());
        head.extend_from_slice(&sse::retry(retry));
        {
            let Some(Some(c)) = self.conns.get_mut(slot as usize) else { return };
            c.phase = Phase::Open;
            c.proto = Subprotocol::Sse;
            c.decoder = None;
            c.identity = identity;
            c.anon_id = anon_id;
            c.push(OutFrame::control(Bytes::from(head)));
        }
        self.stats.sse_connections.inc();
        self.mark_urgent(slot);
        self.join(slot, room, since);
        if rest > 0 {
            self.sse_input(slot, rest);
        }
    }

    /// `OPTIONS /sse`: a browser asking whether it may send `Last-Event-ID` from its origin.
    pub(super) fn on_preflight(&mut self, slot: u32, origin: Option<&str>) {
        match self.check_gate(origin) {
            Ok(Some(allow)) => {
                self.closing_for(slot, crate::metrics::CloseWhy::Answered);
                self.finish_with(slot, Some(Bytes::from(sse::preflight_204(&allow))));
            }
            Ok(None) => {
                let e = HandshakeError { status: 400, reason: "a CORS preflight needs an Origin".into() };
                self.refuse_sse(slot, &e);
            }
            Err(e) => self.refuse_sse(slot, &e),
        }
    }

    fn refuse_sse(&mut self, slot: u32, e: &HandshakeError) {
        self.stats.sse_refused.inc();
        self.refuse(slot, e);
    }

    /// Bytes a stream's client sent after its request: nothing is read from them; past
    /// [`MAX_IGNORED`] in all, the stream is closed (the browser reconnects if it was one).
    pub(super) fn sse_input(&mut self, slot: u32, n: usize) {
        let Some(Some(c)) = self.conns.get_mut(slot as usize) else { return };
        c.ignored = c.ignored.saturating_add(n);
        if c.ignored <= MAX_IGNORED {
            return;
        }
        self.stats.protocol_errors.inc();
        if self.log_refusal() {
            tracing::info!(shard = self.id, slot, bytes = n, "closing an event stream whose client keeps sending");
        }
        self.closing_for(slot, crate::metrics::CloseWhy::ProtocolError);
        self.finish_with(slot, None);
    }
}
