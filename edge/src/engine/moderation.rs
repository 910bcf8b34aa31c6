//! Moderation's delete: a message leaves its room. Two things happen, both in seq order with
//! everything else of the room, because the room's engine does them:
//!
//! - a **tombstone in place**: history (and the pending batch, and the store) keeps, at the
//!   deleted message's seq, a message of kind `deleted` naming that seq, so a `since` replay
//!   never returns the message and its seqs stay as dense as before (no false `gap`);
//! - a **live tombstone**: a must-deliver message of kind `deleted` with the next seq, whose
//!   body names the deleted seq, so members that have the message remove it, and members that
//!   reconnect with `since` get the tombstone like any gift.
//!
//! In Redis mode the script that deletes (`bus::redis::delete_message`) publishes the live
//! tombstone; every edge that follows the room puts the tombstone in place in its own history
//! when that message arrives, through the same [`Engine::apply_tombstone`].

use std::time::Instant;

use roomcast_proto::envelope::{self, DELETED_KIND, PushMessage};

use super::{Engine, OUT_BOUND, Out};
use crate::bus::{Ack, DeleteError, DeleteReply, Deleted, PublishError, RoomName};
use crate::store::{Record, StoreHandle};

impl Engine {
    /// Deletes message `seq` of `room` (single node). Answered once the tombstone is durable.
    pub(super) fn delete_message(&mut self, room: RoomName, seq: u64, reply: DeleteReply, now: Instant, out: &mut Out) {
        let refuse = |reply: DeleteReply, e: DeleteError| {
            let _ = reply.send(Err(e));
        };
        if self.remote.is_some() {
            // The publish API deletes through Redis itself in this mode.
            return refuse(reply, DeleteError::Publish(PublishError::BusUnavailable));
        }
        if out.backlog() > OUT_BOUND {
            return refuse(reply, DeleteError::Publish(PublishError::Busy { retry_after_ms: 100 }));
        }
        if let Some(e) = self.store.as_ref().and_then(StoreHandle::refusal) {
            return refuse(reply, DeleteError::Publish(e));
        }
        let known = self.rooms.contains_key(&room);
        if let Err(e) = self.ensure_room(&room, now, false) {
            return refuse(reply, DeleteError::Publish(e));
        }
        let Some(r) = self.rooms.get_mut(&room) else { return };
        if seq == 0 || seq > r.seq {
            if !known {
                // Read (or made) only to look: a room with nothing leaves at once.
                self.forget_if_unused(&room);
            }
            return refuse(reply, DeleteError::NotFound);
        }
        let held = r.pending.iter().map(|p| &p.msg).find(|m| m.seq == seq).or_else(|| r.history.get(seq));
        let in_history = held.is_some();
        if let Some(m) = held
            && m.kind == DELETED_KIND
        {
            return if envelope::deleted_seq(m) == Some(seq) {
                // Deleted already (a moderator's retry): nothing is published again.
                let _ = reply.send(Ok(Deleted { tombstone: None, in_history: true }));
            } else {
                refuse(reply, DeleteError::Tombstone);
            };
        }
        let ack = Ack { seq: r.seq + 1, ts_us: self.wall_us(now), replayed: false };
        let tombstone = PushMessage {
            seq: ack.seq,
            ts_us: ack.ts_us,
            kind: DELETED_KIND.to_owned(),
            user: String::new(),
            body: envelope::tombstone_body(seq),
        };
        // Numbered and delivered like a gift (never sampled, kept in history and the store),
        // past the room's publish limits: moderation is not a publisher to slow down.
        self.accept(&room, tombstone, true, None, now, out);
        let done = Deleted { tombstone: Some(ack), in_history };
        if self.store.is_some() {
            self.held_deletes.push_back((self.store_sent + 1, reply, done));
        } else {
            let _ = reply.send(Ok(done));
        }
    }

    /// A live tombstone (`msg`, kind `deleted`, naming an earlier seq) is being accepted: the
    /// message it names gives way, in place, to a tombstone of its own seq: in the pending
    /// batch (members never get it), in history (replays never return it), in the store (nor
    /// after a restart), and as the room's latest state.
    pub(super) fn apply_tombstone(&mut self, room: &RoomName, msg: &PushMessage, now: Instant) {
        let Some(target) = envelope::deleted_seq(msg).filter(|&t| t < msg.seq) else { return };
        let token = self.store_sent + 1;
        let Some(r) = self.rooms.get_mut(room) else { return };
        for p in r.pending.iter_mut().filter(|p| p.msg.seq == target && p.msg.kind != DELETED_KIND) {
            p.msg = envelope::tombstone_in_place(&p.msg);
            p.conflate = None;
        }
        r.latest.retain(|e| e.msg.seq != target);
        let Some(old) = r.history.get(target).filter(|m| m.kind != DELETED_KIND) else { return };
        let in_place = envelope::tombstone_in_place(old);
        let must = r.history.replace(target, in_place.clone());
        if must == Some(true) && self.store.is_some() {
            // Written over the message (with its idempotency key, so that a retry of the deleted
            // publish after a restart is still recognised and not published again).
            let rec = match r.idem.key_of(target) {
                Some(key) => Record::KeyedMsg(room.clone(), in_place, key),
                None => Record::Msg(room.clone(), in_place),
            };
            self.store_out.push(rec);
            r.wait_token = token;
        }
        r.last_active = now;
    }

    /// Forgets a room that holds nothing (no seq, no history, no member, nothing waiting).
    pub(super) fn forget_if_unused(&mut self, room: &RoomName) {
        let unused = self.rooms.get(room).is_some_and(|r| {
            r.seq == 0
                && !r.interested()
                && r.history.len() == (0, 0)
                && r.waiting.is_empty()
                && r.parked.is_empty()
                && r.joins_after_store.is_empty()
                && r.wait_token <= self.store_durable
        });
        if unused {
            self.rooms.remove(room);
            self.load.remove_rooms(1);
            self.stats.rooms.dec();
        }
    }
}
