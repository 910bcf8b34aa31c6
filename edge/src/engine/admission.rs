//! Admission: a publish meets, in order, the kind check, the room's must-deliver bucket (which
//! *rejects*: the publisher retries, nothing is silently lost), the room and user buckets for
//! droppable kinds (which *drop*, counted), and sampling when the room is over its delivery
//! budget. Only then does it get a seq: refused messages take none, so a gap always means loss.

use std::time::{Duration, Instant};

use roomcast_proto::envelope::PushMessage;

use super::adaptive::visible_rate;
use super::{Engine, MAX_USERS, Out};
use crate::bus::policy::Bucket;
use crate::bus::{Ack, NewMessage, PublishError, Reply, RoomName, ShardCmd};
use crate::store::StoreHandle;

impl Engine {
    pub(super) fn drop_counted(&self, kind: &str, reason: &str) {
        self.stats.messages_dropped.with_label_values(&[kind, reason]).inc();
    }

    /// Checks kind, limits and sampling; creates the room. Returns whether the kind must be
    /// delivered.
    pub(super) fn admit(&mut self, room: &RoomName, msg: &NewMessage, now: Instant) -> Result<bool, PublishError> {
        let Some(&must_deliver) = self.cfg.kinds.get(&msg.kind) else {
            self.stats.publish_rejected.with_label_values(&["unknown_kind"]).inc();
            return Err(PublishError::UnknownKind(msg.kind.clone()));
        };
        if let Err(e) = self.ensure_room(room, now, false) {
            self.stats.publish_rejected.with_label_values(&["too_many_rooms"]).inc();
            return Err(e);
        }
        let lim = &self.cfg.limits;
        let r = self.rooms.get_mut(room).expect("ensured above");
        let ms = |d: Duration| d.as_millis().max(1) as u64;
        if must_deliver {
            if let Err(wait) = r.must_bucket.take(lim.must_deliver_room_rate, lim.must_deliver_room_burst, now) {
                self.stats.publish_rejected.with_label_values(&["must_deliver_rate"]).inc();
                return Err(PublishError::RateLimited { scope: "room", retry_after_ms: ms(wait), must_deliver: true });
            }
            return Ok(true);
        }
        // The user's own bucket first: a user over its limit must not spend the room's budget,
        // or one spammer starves everyone else in the room.
        if !msg.user.is_empty() {
            if self.users.len() >= MAX_USERS.div_ceil(self.engines) && !self.users.contains_key(&msg.user) {
                let (rate, burst) = (lim.user_rate, lim.user_burst);
                self.users.retain(|_, b| !b.is_full(rate, burst, now));
            }
            let b = self.users.entry(msg.user.clone()).or_insert_with(|| Bucket::full(lim.user_burst, now));
            if let Err(wait) = b.take(lim.user_rate, lim.user_burst, now) {
                self.drop_counted(&msg.kind, "user_rate");
                return Err(PublishError::RateLimited { scope: "user", retry_after_ms: ms(wait), must_deliver: false });
            }
        }
        let r = self.rooms.get_mut(room).expect("ensured above");
        if let Err(wait) = r.droppable_bucket.take(lim.room_rate, lim.room_burst, now) {
            self.drop_counted(&msg.kind, "room_rate");
            return Err(PublishError::RateLimited { scope: "room", retry_after_ms: ms(wait), must_deliver: false });
        }
        let r = self.rooms.get_mut(room).expect("ensured above");
        r.bump_rate(now);
        if self.cfg.conflate.contains_key(&msg.kind) {
            // Latest state is not sampled: conflation already bounds it to one per window.
            return Ok(false);
        }
        let r = self.rooms.get_mut(room).expect("ensured above");
        let a = &self.cfg.adaptive;
        let visible = visible_rate(a, r.members);
        if r.sampling_now(a, super::adaptive::sampling_threshold(self.deliveries_base, a), self.sampling, now)
            && r.visible_bucket.take(visible, visible, now).is_err()
        {
            self.drop_counted(&msg.kind, "sampled");
            return Err(PublishError::Sampled);
        }
        Ok(false)
    }

    /// Local mode: admit, number, accept.
    pub(super) fn publish(
        &mut self,
        room: &RoomName,
        msg: NewMessage,
        now: Instant,
        out: &mut Out,
    ) -> Result<Ack, PublishError> {
        let must_deliver = self.admit(room, &msg, now)?;
        let ts_us = self.wall_us(now);
        let r = self.rooms.get_mut(room).expect("admit creates the room");
        if self.store.as_ref().is_some_and(StoreHandle::failing) && r.seq + 1 > r.durable_hi(self.store_durable) {
            // Writes fail, so no reservation can be made durable: a seq past the durable one
            // could be handed out again after a crash. Refused, not queued without bound
            // behind a disk that may stay full for hours (must-deliver kinds were refused
            // before they got here).
            self.stats.publish_rejected.with_label_values(&["store_unavailable"]).inc();
            return Err(PublishError::StoreUnavailable);
        }
        if must_deliver {
            r.bump_rate(now);
        }
        let ack = Ack { seq: r.seq + 1, ts_us, replayed: false };
        if let Some(key) = &msg.idem {
            r.idem.insert(key.clone(), ack, now, self.cfg.idem_keys);
        }
        let name = r.name.clone();
        let pm = PushMessage { seq: ack.seq, ts_us: ack.ts_us, kind: msg.kind, user: msg.user, body: msg.body };
        self.accept(&name, pm, must_deliver, msg.idem, now, out);
        Ok(ack)
    }

    /// A publish whose idempotency key the room remembers gets the first answer again (after
    /// the store has made it durable, when the first one had to wait for that) and publishes
    /// nothing; any other publish gets its reply back to go on with.
    pub(super) fn replay(
        &mut self,
        room: &RoomName,
        msg: &NewMessage,
        reply: Reply,
        now: Instant,
        out: &mut Out,
    ) -> Option<Reply> {
        let Some(key) = msg.idem.as_deref() else { return Some(reply) };
        if self.ensure_room(room, now, false).is_err() {
            return Some(reply);
        }
        let ttl = self.cfg.idem_ttl;
        let Some(ack) = self.rooms.get_mut(room).and_then(|r| r.idem.get(key, now, ttl)) else { return Some(reply) };
        self.stats.publish_replayed.inc();
        let ack = Ack { replayed: true, ..ack };
        // The first publish may still be on its way to the disk, in this turn's batch or one
        // sent: the replay is answered no sooner.
        let token = if self.store_out.is_empty() { self.store_sent } else { self.store_sent + 1 };
        if self.store.is_some() && token > self.store_durable {
            self.held.push_back((token, reply, room.clone(), ack));
        } else {
            self.answer(out, reply, room, Ok(ack));
        }
        None
    }

    /// Answers a publish: the HTTP handler's oneshot, or the publishing connection's shard.
    #[expect(clippy::unused_self, reason = "one of the engine's steps, called as the others are")]
    pub(super) fn answer(&self, out: &mut Out, reply: Reply, room: &RoomName, result: Result<Ack, PublishError>) {
        match reply {
            Reply::Http(tx) => {
                let _ = tx.send(result);
            }
            Reply::Conn { shard, slot, generation } => {
                let p = crate::bus::Published { slot, generation, room: room.clone(), result };
                out.push(shard, ShardCmd::Published(Box::new(p)));
            }
            Reply::None => {}
        }
    }
}
