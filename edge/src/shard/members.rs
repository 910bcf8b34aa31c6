//! Room membership on this shard: joins and their acknowledgements, leaves, and fan-out of a
//! delivery to the local members (one shared frame, an `Rc` clone per member).

use std::rc::Rc;

use bytes::Bytes;

use roomcast_proto::Subprotocol;
use roomcast_proto::envelope::ServerMsg;

use super::Shard;
use super::conn::{Closing, Keep, OutFrame};
use crate::bus::{Delivery, EngineCmd, JoinAck, JoinRefused, JoinRetry, MustDeliver, RoomName, Since, epoch_text};
use crate::metrics::CloseWhy;
use crate::room::Interest;

/// The compressed form of `plain` (the delivery's frame in encoding `p`) for window `bits`, with
/// its must-deliver part compressed too: made once for the edge (`Delivery::deflated`), by
/// whichever shard asks first. `made` counts the compressions this call did.
fn deflated_frame(d: &Delivery, plain: &Rc<OutFrame>, p: usize, bits: u8, made: &mut u64) -> Option<Rc<OutFrame>> {
    let (frame, must, fresh) = d.deflated.get_or_make(p, bits, || {
        let frame = d.frames[p].as_deref().and_then(|f| crate::deflate::compress_frame(f, bits));
        let must = match &d.must_deliver {
            MustDeliver::Some { frames, .. } => {
                frames[p].as_deref().and_then(|f| crate::deflate::compress_frame(f, bits))
            }
            _ => None,
        };
        (frame, must)
    });
    if fresh {
        *made += u64::from(frame.is_some()) + u64::from(must.is_some());
    }
    let bytes = frame?;
    let must = match &plain.must {
        Keep::Whole => Keep::Whole,
        Keep::Nothing => Keep::Nothing,
        Keep::Instead(g) => Keep::Instead(match must {
            Some(bytes) => Rc::new(OutFrame {
                bytes,
                messages: g.messages,
                must: Keep::Whole,
                queued_ms: g.queued_ms,
                since: g.since,
                kinds: g.kinds.clone(),
                must_part: true,
            }),
            None => g.clone(),
        }),
    };
    Some(Rc::new(OutFrame {
        bytes,
        messages: plain.messages,
        must,
        queued_ms: plain.queued_ms,
        since: plain.since,
        kinds: plain.kinds.clone(),
        must_part: false,
    }))
}

impl Shard {
    pub(super) fn deliver(&mut self, d: &Delivery) {
        let now_ms = self.now_ms();
        let Some(members) = self.rooms.members(&d.room) else { return };
        let frames: [Option<Rc<OutFrame>>; Subprotocol::COUNT] = std::array::from_fn(|p| {
            let bytes = d.frames[p].clone()?;
            let must = match &d.must_deliver {
                MustDeliver::All => Keep::Whole,
                MustDeliver::None => Keep::Nothing,
                MustDeliver::Some { frames, messages } => match &frames[p] {
                    Some(b) => Keep::Instead(Rc::new(OutFrame {
                        bytes: b.clone(),
                        messages: *messages,
                        must: Keep::Whole,
                        queued_ms: now_ms,
                        since: Some(d.must_since),
                        kinds: d.kinds.clone(),
                        must_part: true,
                    })),
                    None => Keep::Nothing,
                },
            };
            // A frame carrying must-deliver messages is timed from the oldest of those.
            let since = if matches!(d.must_deliver, MustDeliver::None) { d.since } else { d.must_since };
            Some(Rc::new(OutFrame {
                bytes,
                messages: d.messages,
                must,
                queued_ms: now_ms,
                since: Some(since),
                kinds: d.kinds.clone(),
                must_part: false,
            }))
        });
        let max_bytes = self.cfg.send.max_queue_bytes;
        let max_frames = self.cfg.send.max_queue_frames;
        let max_delay = self.cfg.send.max_queue_delay_ms;
        let mut slow = Vec::new();
        // permessage-deflate: the compressed frame of each (encoding, window) in use among this
        // shard's members, fetched once per delivery from the edge-wide cache (which compresses
        // it once for every shard). None: compression did not pay, members get the plain frame.
        let mut compressed: Vec<(usize, u8, Option<Rc<OutFrame>>)> = Vec::new();
        let (mut z_sent, mut z_plain, mut z_made) = (0u64, 0u64, 0u64);
        for &slot in members {
            let Some(Some(c)) = self.conns.get_mut(slot as usize) else { continue };
            if c.closing != Closing::No {
                continue;
            }
            let p = c.proto.index();
            let Some(plain) = &frames[p] else { continue };
            let mut f = plain.clone();
            if c.deflate_bits != 0 {
                let bits = c.deflate_bits;
                let z = if let Some((_, _, z)) = compressed.iter().find(|v| v.0 == p && v.1 == bits) {
                    z.clone()
                } else {
                    let z = deflated_frame(d, plain, p, bits, &mut z_made);
                    compressed.push((p, bits, z.clone()));
                    z
                };
                z_plain += plain.bytes.len() as u64;
                if let Some(z) = z {
                    f = z;
                }
                z_sent += f.bytes.len() as u64;
            }
            // Behind by bytes, by frames, or by time (the oldest unsent frame waited too long:
            // its reader cannot keep up, and gifts must not queue behind seconds of chat).
            let late = c.oldest_unsent_ms().is_some_and(|t| now_ms.saturating_sub(t) > max_delay);
            let max_bytes = max_bytes + c.replay_credit;
            if late || c.out_bytes + f.bytes.len() > max_bytes || c.out.len() >= max_frames {
                // Behind: keep only what must be delivered, of the queue and of this frame.
                let shed = c.shed();
                self.stats.shed_bytes.inc_by(shed as u64);
                f = match &f.must {
                    Keep::Whole => f,
                    Keep::Nothing => continue,
                    Keep::Instead(g) => g.clone(),
                };
                if c.out_bytes + f.bytes.len() > max_bytes || c.out.len() >= max_frames {
                    slow.push(slot);
                    continue;
                }
            }
            c.push(f);
            if !c.dirty && c.in_flight == 0 {
                c.dirty = true;
                self.lines.deliveries.push(slot);
            }
        }
        if z_plain > 0 {
            let s = &self.stats.deflate;
            s.compressions.inc_by(z_made);
            s.bytes_compressed.inc_by(z_sent);
            s.bytes_uncompressed.inc_by(z_plain);
        }
        for slot in slow {
            self.stats.slow_consumer_closes.inc();
            tracing::info!(shard = self.id, slot, "closing slow consumer (4000)");
            // The close frame replaces whatever was not yet handed to the kernel: the client
            // recovers it with `since`.
            if let Some(Some(c)) = self.conns.get_mut(slot as usize) {
                c.drop_unsent(c.in_flight as usize);
            }
            self.closing_for(slot, crate::metrics::CloseWhy::SlowConsumer);
            self.close_with(slot, 4000, "slow consumer: reconnect with since");
        }
    }

    /// Joins `room`, leaving the current one first. Membership starts when the room's engine acknowledges.
    pub(super) fn join(&mut self, slot: u32, room: RoomName, since: Option<Since>) {
        // `left` only for a room the client was told it `joined`: a join still in flight is
        // cancelled silently (its `joined` never comes either).
        let was_member = matches!(self.conns.get(slot as usize), Some(Some(c)) if c.room.is_some());
        if let Some(old) = self.leave(slot)
            && was_member
        {
            self.send_msg(slot, &ServerMsg::Left { room: old.to_string() });
        }
        let Some(Some(c)) = self.conns.get_mut(slot as usize) else { return };
        let proto = c.proto;
        let generation = c.generation;
        c.joining = Some(room.clone());
        self.rooms.begin_join(&room, proto);
        self.signal(&room.clone(), EngineCmd::Join { room, shard: self.id, slot, generation, proto, since });
    }

    pub(super) fn join_ack(&mut self, ack: JoinAck) {
        let JoinAck { slot, generation, room, seq, epoch, reset, replay, online, retry } = ack;
        let waiting = matches!(
            self.conns.get(slot as usize),
            Some(Some(c)) if c.generation == generation && c.closing == Closing::No
                && c.joining.as_deref() == Some(&*room)
        );
        if !waiting {
            // The connection left, switched or closed while the join was in flight. Its
            // cancel_join already ran (leave/close), so there is nothing to undo here.
            return;
        }
        let idx = self.rooms.complete_join(&room, slot);
        self.stats.rooms.set(self.rooms.len() as i64);
        if let Some(Some(c)) = self.conns.get_mut(slot as usize) {
            c.joining = None;
            c.room = Some(room.clone());
            c.room_idx = idx;
        }
        if let Some(why) = retry {
            // Redis did not answer (the read of what it missed, or the room's seq): not lost,
            // so not a `gap`; it comes back with the same `since` (members so closed leave the
            // room as any other).
            let (close, text) = match why {
                JoinRetry::Recovery => {
                    (CloseWhy::RecoveryUnavailable, "cannot read your since now: reconnect with the same since shortly")
                }
                JoinRetry::Sync => (CloseWhy::RoomUnavailable, "cannot read this room now: reconnect shortly"),
            };
            self.stats.refused(close.as_str());
            self.closing_for(slot, close);
            return self.close_with(slot, 1013, text);
        }
        // The replay (a `since` catching up) may go past the queue bound as credit, within the
        // shard's replay budget; past the budget the join is closed with 1013 (try again).
        let replay_len: usize = replay.iter().map(Bytes::len).sum();
        if replay_len > 0 {
            if self.replay_held + replay_len > self.cfg.send.max_replay_bytes {
                self.stats.refused("replay_budget");
                self.closing_for(slot, crate::metrics::CloseWhy::ReplayBudget);
                return self.close_with(slot, 1013, "busy replaying: reconnect with the same since shortly");
            }
            self.replay_held += replay_len;
            if let Some(Some(c)) = self.conns.get_mut(slot as usize) {
                c.replay_credit += replay_len;
            }
        }
        // Where an SSE member stands once it has `joined`, when nothing follows in the replay
        // (else the replay's last event says so).
        let at = replay.is_empty().then_some((epoch, seq));
        let epoch = epoch_text(epoch);
        if let Some(reason) = reset {
            // The client's position is void: said before anything else of the room.
            self.stats.resets.inc();
            let reset =
                ServerMsg::Reset { room: room.to_string(), epoch: epoch.clone(), seq: 0, reason: reason.into() };
            self.send_msg(slot, &reset);
        }
        self.send_msg_at(slot, &ServerMsg::Joined { room: room.to_string(), seq, epoch, online }, at);
        for f in replay {
            // Recovered must-deliver messages: kept whole if the connection falls behind, and
            // let in whatever the queue holds (their size is bounded by the history limits).
            if let Some(Some(c)) = self.conns.get_mut(slot as usize) {
                c.push(OutFrame::control(f));
            }
        }
        self.mark_urgent(slot);
    }

    /// The engine refused a join (the edge is at its room bound): undo it and tell the client.
    pub(super) fn join_refused(&mut self, refused: &JoinRefused) {
        let JoinRefused { slot, generation, ref room, reason } = *refused;
        let Some(Some(c)) = self.conns.get_mut(slot as usize) else { return };
        if c.generation != generation || c.joining.as_deref() != Some(&**room) {
            return;
        }
        c.joining = None;
        let proto = c.proto;
        // The engine created nothing for this join: only the local count is undone.
        let _ = self.rooms.cancel_join(room, proto);
        self.stats.rooms.set(self.rooms.len() as i64);
        self.stats.signals_refused.inc();
        if c.closing == Closing::No {
            self.send_error(slot, "join_refused", reason);
        }
    }

    /// Leaves the current room (or cancels a join in flight). Returns the room left.
    pub(super) fn leave(&mut self, slot: u32) -> Option<RoomName> {
        let Some(Some(c)) = self.conns.get_mut(slot as usize) else { return None };
        let proto = c.proto;
        let mut left = None;
        if let Some(room) = c.joining.take() {
            self.signal(&room, EngineCmd::Left { room: room.clone() });
            if self.rooms.cancel_join(&room, proto) == Interest::Dropped {
                self.signal(&room, EngineCmd::NoInterest { room: room.clone(), shard: self.id, proto });
            }
            left = Some(room);
        }
        let Some(Some(c)) = self.conns.get_mut(slot as usize) else { return left };
        if let Some(room) = c.room.take() {
            let idx = c.room_idx;
            self.signal(&room, EngineCmd::Left { room: room.clone() });
            let (interest, moved) = self.rooms.leave(&room, slot, idx, proto);
            if let Some(m) = moved
                && let Some(Some(mc)) = self.conns.get_mut(m as usize)
            {
                mc.room_idx = idx;
            }
            if interest == Interest::Dropped {
                self.signal(&room, EngineCmd::NoInterest { room: room.clone(), shard: self.id, proto });
            }
            left = Some(room);
        }
        self.stats.rooms.set(self.rooms.len() as i64);
        left
    }
}
