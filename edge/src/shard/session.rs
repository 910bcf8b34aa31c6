//! A connection's session: the HTTP upgrade, WebSocket frames, and client signalling.

use std::sync::atomic::Ordering;

use bytes::Bytes;
use roomcast_proto::envelope::{self, ClientMsg, ServerMsg};
use roomcast_proto::handshake::{self, HandshakeError, Request, Upgrade};
use roomcast_proto::ws::{self, CloseReason, Decoder, Event, OpCode};
use roomcast_proto::{Subprotocol, envelope::validate_room};

use super::Shard;
use super::conn::{Action, Closing, Conn, OutFrame, Phase};
use crate::bus::{EngineCmd, NewMessage, Reply, RoomName, Since, parse_epoch};
use crate::metrics::CloseWhy;

impl Shard {
    pub(super) fn on_handshake_bytes(&mut self, slot: u32) {
        let Some(Some(c)) = self.conns.get_mut(slot as usize) else { return };
        match handshake::parse(&c.hs) {
            Ok(None) => {}
            Ok(Some((Request::WebSocket(up), consumed))) => {
                let rest = c.hs.split_off(consumed);
                c.hs = Vec::new();
                self.on_upgrade(slot, up, rest);
            }
            Ok(Some((Request::EventStream(es), consumed))) => {
                let rest = c.hs.len() - consumed;
                c.hs = Vec::new();
                self.on_event_stream(slot, &es, rest);
            }
            Ok(Some((Request::Preflight { origin }, _))) => {
                c.hs = Vec::new();
                self.on_preflight(slot, origin.as_deref());
            }
            Err(e) => self.refuse(slot, &e),
        }
    }

    pub(super) fn refuse(&mut self, slot: u32, e: &HandshakeError) {
        self.refuse_as(slot, e, true);
    }

    /// `refuse`, lingering after the answer or not (`finish`).
    pub(super) fn refuse_as(&mut self, slot: u32, e: &HandshakeError, linger: bool) {
        self.stats.handshake_failures.inc();
        self.stats.handshake_refusals.inc(&e.status.to_string());
        if self.log_refusal() {
            let peer = self.conns.get(slot as usize).and_then(|c| c.as_ref()?.peer);
            let peer = peer.map_or_else(|| "unknown".to_owned(), |p| p.to_string());
            tracing::info!(shard = self.id, slot, peer = %peer, status = e.status, reason = %e.reason, "handshake refused");
        }
        let bytes = Bytes::from(handshake::error_response(e));
        let why = if e.status == 503 { CloseWhy::Overloaded } else { CloseWhy::HandshakeRefused };
        self.closing_for(slot, why);
        self.finish(slot, Some(bytes), linger);
    }

    /// What every transport checks before its own rules: the edge's health, then the `Origin`
    /// against `ws.allowed_origins`. Returns the CORS answer for the origin (None without one;
    /// `*` when every origin is allowed).
    pub(super) fn check_gate(&mut self, origin: Option<&str>) -> Result<Option<String>, HandshakeError> {
        if self.refuse_when_overloaded
            && self.health.load(Ordering::Relaxed) >= crate::dispatch::EdgeHealth::Overloaded.level()
        {
            return Err(HandshakeError {
                status: 503,
                reason: "edge overloaded: ask dispatch (GET /v1/route) for another edge".into(),
            });
        }
        let Some(origin) = origin else { return Ok(None) };
        if !crate::auth::origin_allowed(&self.cfg.ws.allowed_origins, origin) {
            self.stats.refused("origin");
            return Err(HandshakeError { status: 403, reason: format!("origin {origin} is not allowed") });
        }
        Ok(Some(if self.cfg.ws.allowed_origins.is_empty() { "*".to_owned() } else { origin.to_owned() }))
    }

    /// The identity (token), room and `since` of a connection's query, checked the same way for
    /// every transport.
    pub(super) fn admit(
        &mut self,
        query: &[(String, String)],
        bearer: Option<&str>,
    ) -> Result<Admitted, HandshakeError> {
        let bad = |reason: &str| HandshakeError { status: 400, reason: reason.to_owned() };
        let param = |name: &str| query.iter().find(|(k, _)| k == name).map(|(_, v)| v.as_str());
        // Identity is the server's: from a verified token, or a server-made anonymous id.
        let identity = match &self.auth {
            Some(v) => {
                let token = param("token").or(bearer);
                match token.map_or(Err(crate::auth::AuthError::Missing), |t| v.verify(t, now_s())) {
                    Ok(id) => Some(Box::new(id)),
                    Err(e) => {
                        self.stats.refused(auth_reason(&e));
                        return Err(HandshakeError { status: 401, reason: e.to_string() });
                    }
                }
            }
            None => None,
        };
        let anon_id = if identity.is_none() { self.rng.u64(..) } else { 0 };
        // The position's fields are read strictly, like SSE's `Last-Event-ID`: a value given
        // twice (which one did the client mean?) or malformed is refused with the reason, not
        // read as some other position (a malformed epoch read as another numbering earned the
        // client a `reset` it did not cause).
        for name in ["room", "since", "epoch"] {
            if query.iter().filter(|(k, _)| k == name).nth(1).is_some() {
                return Err(bad(&format!("bad {name}: given more than once")));
            }
        }
        let epoch = match param("epoch").map(parse_epoch) {
            Some(Ok(e)) => Some(e),
            Some(Err(why)) => return Err(bad(&format!("bad epoch: {why}"))),
            None => None,
        };
        let room = match param("room") {
            Some(r) => match validate_room(r) {
                Ok(()) if !identity.as_ref().is_none_or(|id| id.may_join(r)) => {
                    self.stats.refused("room_forbidden");
                    return Err(HandshakeError {
                        status: 403,
                        reason: format!("room {r} is not allowed by your token"),
                    });
                }
                Ok(()) if !self.bans.is_empty() => {
                    // A moderator's ban: refused before the upgrade (an `EventSource` refused
                    // with an HTTP error does not retry).
                    let user = match &identity {
                        Some(id) => id.user.to_string(),
                        None => crate::auth::Identity::anonymous(anon_id).user.to_string(),
                    };
                    if let Some(until) = self.banned(r, &user) {
                        self.stats.refused("banned");
                        let now_ms = crate::bus::now_us() / 1000;
                        return Err(HandshakeError {
                            status: 403,
                            reason: super::moderation::ban_message(r, until, now_ms),
                        });
                    }
                    Some(RoomName::from(r))
                }
                Ok(()) => Some(RoomName::from(r)),
                Err(why) => return Err(bad(&format!("bad room: {why}"))),
            },
            None => None,
        };
        let since = match param("since") {
            Some(s) => match envelope::parse_seq(s) {
                Some(seq) => Some(Since { seq, epoch }),
                None => return Err(bad("bad since: not an unsigned integer (decimal digits)")),
            },
            None => None,
        };
        Ok(Admitted { identity, anon_id, room, since })
    }

    pub(super) fn on_upgrade(&mut self, slot: u32, up: Upgrade, mut rest: Vec<u8>) {
        if !self.cfg.echo && up.path != "/ws" {
            return self.refuse(
                slot,
                &HandshakeError { status: 404, reason: "no such endpoint: connect to /ws?room=ROOM".into() },
            );
        }
        if let Err(e) = self.check_gate(up.origin.as_deref()) {
            return self.refuse(slot, &e);
        }
        let proto = match up.select_subprotocol() {
            Ok(p) => p,
            Err(e) => return self.refuse(slot, &e),
        };
        let Admitted { identity, anon_id, room, since } = match self.admit(&up.query, up.bearer.as_deref()) {
            Ok(a) => a,
            Err(e) => return self.refuse(slot, &e),
        };
        // permessage-deflate: the first offer the edge can honour (malformed offers were refused
        // with 400 by the parser; well-formed ones it cannot honour are passed over).
        let deflate = if self.cfg.ws.permessage_deflate {
            roomcast_proto::deflate::negotiate(&up.extensions, self.cfg.ws.deflate_client_context)
        } else {
            None
        };
        let extensions = deflate.map(|a| a.response_value());
        let response = Bytes::from(handshake::response_101_with(&up.key, proto, extensions.as_deref()));
        let limits = self.limits;
        if deflate.is_some() {
            self.stats.deflate.negotiated.inc();
        }
        {
            let Some(Some(c)) = self.conns.get_mut(slot as usize) else { return };
            c.phase = Phase::Open;
            c.proto = proto.unwrap_or(Subprotocol::Json);
            let mut decoder = Decoder::new(limits);
            if let Some(a) = deflate {
                decoder.enable_deflate(a.client_no_context_takeover);
                c.deflate_bits = a.server_window_bits;
            }
            c.decoder = Some(Box::new(decoder));
            c.identity = identity;
            c.anon_id = anon_id;
            c.push(OutFrame::control(response));
            c.upgrade_unsent = true;
        }
        self.mark_urgent(slot);
        if let Some(room) = room {
            self.join(slot, room, since);
        }
        if !rest.is_empty() {
            let mut actions = std::mem::take(&mut self.actions);
            let r = match self.conns.get_mut(slot as usize) {
                Some(Some(c)) => c.decode(&mut rest, &mut actions),
                _ => Ok(()),
            };
            self.handle_actions(slot, &mut actions, r);
            self.actions = actions;
        }
    }

    pub(super) fn handle_actions(&mut self, slot: u32, actions: &mut Vec<Action>, result: Result<(), CloseReason>) {
        for action in actions.drain(..) {
            if !matches!(self.conns.get(slot as usize), Some(Some(c)) if c.closing == Closing::No) {
                break;
            }
            match action {
                Action::Ping(payload) => self.send_control(slot, ws::encode_frame(OpCode::Pong, &payload)),
                Action::Close(code, reason) => {
                    // Echo the peer's code (RFC 6455 5.5.1), then close the TCP connection.
                    let frame = match code {
                        Some(code) => ws::close_frame(code, std::str::from_utf8(&reason).unwrap_or("")),
                        None => ws::encode_frame(OpCode::Close, &[]),
                    };
                    self.closing_for(slot, CloseWhy::PeerClosed);
                    self.finish_with(slot, Some(Bytes::from(frame)));
                }
                Action::Message(opcode, payload) => {
                    if self.cfg.echo {
                        let frame = self.own_frame(slot, opcode, &payload);
                        self.push_frame(slot, frame);
                    } else {
                        self.on_client_message(slot, opcode, &payload);
                    }
                }
            }
        }
        if let Err(reason) = result {
            self.stats.protocol_errors.inc();
            if self.log_refusal() {
                tracing::info!(shard = self.id, slot, code = reason.code, reason = reason.reason, "protocol violation");
            }
            self.closing_for(slot, CloseWhy::ProtocolError);
            self.close_with(slot, reason.code, reason.reason);
        }
    }

    pub(super) fn on_client_message(&mut self, slot: u32, opcode: OpCode, payload: &[u8]) {
        let now_ms = self.now_ms();
        let (rate, burst) = (self.cfg.ws.signal_rate, self.cfg.ws.signal_burst);
        let Some(Some(c)) = self.conns.get_mut(slot as usize) else { return };
        if !c.take_signal(rate, burst, now_ms) {
            self.stats.signals_refused.inc();
            // A client that keeps going after a burst's worth of refusals is flooding: close
            // it (1008) rather than answer every message with an error.
            if f64::from(c.signals_refused) > burst {
                if self.log_refusal() {
                    tracing::info!(shard = self.id, slot, "closing a signalling flood (1008)");
                }
                self.closing_for(slot, CloseWhy::ProtocolError);
                return self.close_with(slot, 1008, "signalling flood");
            }
            return self.send_error(slot, "rate_limited", "signalling over ws.signal_rate: slow down");
        }
        let Some(Some(c)) = self.conns.get(slot as usize) else { return };
        let parsed = match opcode {
            OpCode::Text => envelope::decode_client_json(payload),
            OpCode::Binary if c.proto == Subprotocol::Rkyv => envelope::decode_client_rkyv(payload),
            _ => {
                return self.send_error(
                    slot,
                    "unsupported",
                    "binary signalling needs roomcast.rkyv.v2; send JSON text",
                );
            }
        };
        let msg = match parsed {
            Ok(m) => m,
            Err(e) => {
                self.stats.signals_refused.inc();
                return self.send_error(slot, "bad_message", &e.to_string());
            }
        };
        match msg {
            ClientMsg::Join { room, since, epoch } => {
                // A malformed epoch is a malformed message, refused as one (the connection stays
                // where it was); read as another numbering it would reset the client. `since`
                // needs no check here: JSON and rkyv decode it as a u64 or refuse the message.
                let epoch = match epoch.as_deref().map(parse_epoch).transpose() {
                    Ok(e) => e,
                    Err(why) => {
                        self.stats.signals_refused.inc();
                        return self.send_error(slot, "bad_message", &format!("bad epoch: {why}"));
                    }
                };
                match validate_room(&room) {
                    Ok(()) if !self.identity(slot).is_none_or(|id| id.may_join(&room)) => {
                        self.stats.refused("room_forbidden");
                        self.send_error(slot, "room_forbidden", "this room is not allowed by your token");
                    }
                    Ok(()) => {
                        if let Some(until) = self.join_banned(slot, &room) {
                            // Refused like a room the token does not allow: the connection stays
                            // where it was.
                            self.stats.refused("banned");
                            let message = super::moderation::ban_message(&room, until, crate::bus::now_us() / 1000);
                            return self.send_error(slot, "banned", &message);
                        }
                        let name = self.rooms.name(&room).unwrap_or_else(|| RoomName::from(room.as_str()));
                        let since = since.map(|seq| Since { seq, epoch });
                        self.join(slot, name, since);
                    }
                    Err(why) => {
                        self.stats.signals_refused.inc();
                        self.send_error(slot, "bad_room", why);
                    }
                }
            }
            ClientMsg::Leave => {
                if let Some(room) = self.leave(slot) {
                    self.send_msg(slot, &ServerMsg::Left { room: room.to_string() });
                } else {
                    self.send_error(slot, "not_in_room", "leave: not in a room");
                }
            }
            ClientMsg::Refresh { token } => self.refresh(slot, &token),
            ClientMsg::Ping => self.send_msg(slot, &ServerMsg::Pong),
            ClientMsg::Publish { kind, user: _, body } => {
                // A join still in flight counts: the join and this publish go to the same engine
                // on the same link, in the order the client sent them.
                let room = match self.conns.get(slot as usize) {
                    Some(Some(c)) => c.joining.clone().or_else(|| c.room.clone()),
                    _ => None,
                };
                let Some(room) = room else {
                    return self.send_error(slot, "not_in_room", "publish: join a room first");
                };
                if let Err(why) = envelope::validate_kind(&kind) {
                    return self.send_error(slot, "bad_kind", why);
                }
                if let Err(why) = envelope::check_body(&body) {
                    self.stats.refused("publish_bad_body");
                    return self.send_error(slot, "bad_body", why);
                }
                // The publish API's bound on a body holds here too, whatever ws.max_message
                // lets through for other signalling.
                if body.len() > self.cfg.ingest.max_body_bytes {
                    self.stats.refused("publish_too_large");
                    return self.send_error(
                        slot,
                        "too_large",
                        &format!("publish body over ingest.max_body_bytes ({})", self.cfg.ingest.max_body_bytes),
                    );
                }
                // Who may publish which kind: the kind's configured publishers, or the token's
                // `pub` claim. Gifts default to the publish API only.
                let for_clients = self.cfg.kinds.get(&kind).is_none_or(|k| k.publishers().clients());
                let Some(Some(c)) = self.conns.get(slot as usize) else { return };
                let (allowed, user) = match c.identity.as_deref() {
                    Some(id) => (id.may_publish(&kind, for_clients), id.user.to_string()),
                    None => (for_clients, crate::auth::Identity::anonymous(c.anon_id).user.to_string()),
                };
                if !allowed {
                    self.stats.refused("publish_forbidden");
                    return self.send_error(
                        slot,
                        "publish_forbidden",
                        &format!("kind {kind} may not be published by you over the socket"),
                    );
                }
                // The user is the connection's identity; whatever the client wrote is ignored.
                let generation = self.conns[slot as usize].as_ref().map_or(0, |c| c.generation);
                let reply = Reply::Conn { shard: self.id, slot, generation };
                self.signal(
                    &room.clone(),
                    EngineCmd::Publish { room, msg: Box::new(NewMessage { kind, user, body, idem: None }), reply },
                );
            }
        }
    }
}

/// A connection's query checked: who it is, and the room (and position) it joins at once.
pub(super) struct Admitted {
    pub identity: Option<Box<crate::auth::Identity>>,
    pub anon_id: u64,
    pub room: Option<RoomName>,
    pub since: Option<Since>,
}

impl Shard {
    /// Until when the connection in `slot` is banned from `room` (None: it may join).
    fn join_banned(&self, slot: u32, room: &str) -> Option<u64> {
        if self.bans.is_empty() {
            return None;
        }
        let c = self.conns.get(slot as usize)?.as_ref()?;
        self.banned(room, &c.user())
    }

    /// The connection's token identity (None: anonymous, or no such connection).
    fn identity(&self, slot: u32) -> Option<&crate::auth::Identity> {
        self.conns.get(slot as usize)?.as_ref()?.identity.as_deref()
    }

    /// `{"op":"refresh","token":...}`: a new token for the same user moves the expiry.
    fn refresh(&mut self, slot: u32, token: &str) {
        let Some(v) = self.auth.clone() else {
            return self.send_error(slot, "refresh_refused", "this edge runs without tokens");
        };
        let Some(current) = self.identity(slot).cloned() else { return };
        match v.verify(token, now_s()) {
            Ok(id) if id.user == current.user => {
                let exp = id.exp.unwrap_or(0);
                if let Some(Some(c)) = self.conns.get_mut(slot as usize) {
                    // The new token's claims apply from now on (rooms already joined stay).
                    c.identity = Some(Box::new(id));
                }
                self.send_msg(slot, &ServerMsg::Refreshed { exp });
            }
            Ok(_) => {
                self.stats.refused("refresh_other_user");
                self.send_error(slot, "refresh_refused", "the new token is for another user");
            }
            Err(e) => {
                self.stats.refused(auth_reason(&e));
                self.send_error(slot, "refresh_refused", &e.to_string());
            }
        }
    }
}

/// Seconds since the Unix epoch (token expiry).
pub(super) fn now_s() -> u64 {
    crate::bus::now_us() / 1_000_000
}

fn auth_reason(e: &crate::auth::AuthError) -> &'static str {
    use crate::auth::AuthError;
    match e {
        AuthError::Missing => "token_missing",
        AuthError::Expired => "token_expired",
        AuthError::Invalid(_) | AuthError::UnknownKid(_) | AuthError::BadSub | AuthError::NotYet => "token_invalid",
    }
}

impl Conn {
    /// Runs the decoder over `data`, collecting what the shard must act on.
    pub(super) fn decode(&mut self, data: &mut [u8], actions: &mut Vec<Action>) -> Result<(), CloseReason> {
        let Some(dec) = self.decoder.as_mut() else { return Ok(()) };
        dec.feed(data, &mut |ev| match ev {
            Event::Text(p) => actions.push(Action::Message(OpCode::Text, p.to_vec())),
            Event::Binary(p) => actions.push(Action::Message(OpCode::Binary, p.to_vec())),
            Event::Ping(p) => actions.push(Action::Ping(p.to_vec())),
            Event::Pong(_) => {}
            Event::Close { code, reason } => actions.push(Action::Close(code, reason.to_vec())),
        })
    }
}
