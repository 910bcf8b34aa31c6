//! The pending batch: a numbered message joins its room's history and batch; the first message
//! arms the room's window; at the deadline (or when the batch is full) the batch is serialized
//! **once per encoding some shard wants**, wrapped once into a complete WebSocket frame (and,
//! for SSE members, once into an event with the batch's `id`), and one `Arc<Delivery>` goes to
//! every interested shard. No per-member work happens here.

use std::cmp::Reverse;
use std::collections::HashMap;
use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use roomcast_proto::Subprotocol;
use roomcast_proto::envelope::{self, PushMessage, ServerMsg};

use super::adaptive::visible_rate;
use super::room::{Pending, ShardSet};
use super::{Engine, Out};
use crate::bus::{Delivery, Epoch, KindSince, KindTimes, MustDeliver, RoomName, ShardCmd, frame_at};

impl Engine {
    /// A numbered message becomes the room's latest: history, then the pending batch.
    pub(super) fn accept(
        &mut self,
        room: &RoomName,
        pm: PushMessage,
        must_deliver: bool,
        idem: Option<Box<str>>,
        now: Instant,
        out: &mut Out,
    ) {
        let Some(r) = self.rooms.get_mut(room) else { return };
        r.seq = pm.seq;
        r.last_active = now;
        if self.remote.is_some() {
            r.bump_rate(now);
        }
        if r.parked.iter().any(|&(_, since, _)| since <= r.seq) {
            self.unpark(room, now, false, out);
        }
        if must_deliver && pm.kind == roomcast_proto::envelope::DELETED_KIND {
            // A moderator's tombstone: the message it names gives way first.
            self.apply_tombstone(room, &pm, now);
        }
        if self.store.is_some() {
            self.store_message(room, &pm, must_deliver, idem, now);
        }
        let conflate = self.conflate(room, &pm);
        let keep_droppable = self.droppable_held < self.cfg.max_droppable_bytes / self.engines;
        let Some(r) = self.rooms.get_mut(room) else { return };
        self.stats.messages_in.with_label_values(&[pm.kind.as_str()]).inc();
        let before = r.history.droppable_bytes;
        r.history.push(pm.clone(), must_deliver, keep_droppable, now, &self.cfg.history);
        self.droppable_held = (self.droppable_held + r.history.droppable_bytes).saturating_sub(before);
        if !r.interested() {
            // No member on any shard: nothing to deliver now; history keeps it for `since`.
            r.flushed_seq = r.seq;
            return;
        }
        let a = &self.cfg.adaptive;
        let visible = visible_rate(a, r.members);
        if !must_deliver
            && conflate.is_none()
            && self.remote.is_some()
            && r.sampling_now(a, super::adaptive::sampling_threshold(self.deliveries_base, a), self.sampling, now)
            && r.fanout_bucket.take(visible, visible, now).is_err()
        {
            // Redis mode: the publishing edge sampled by its own members; this edge's members
            // may be many more. Droppable content beyond this edge's visible rate is not fanned
            // out (it stays in history; seqs of droppable messages may be skipped, as documented).
            if r.pending.is_empty() {
                r.flushed_seq = r.seq;
            }
            self.drop_counted(&pm.kind, "sampled_fanout");
            return;
        }
        if let Some(key) = &conflate
            && let Some(i) = r.pending.iter().position(|p| p.conflate.as_ref() == Some(key) && p.msg.kind == pm.kind)
        {
            // Latest state: the newer message replaces the older in the batch (its seq is
            // skipped for members, as a droppable message's may be).
            let old = r.pending.remove(i);
            r.pending_bytes -= old.msg.body.len() + old.msg.kind.len() + old.msg.user.len() + 32;
            self.stats.messages_dropped.with_label_values(&[pm.kind.as_str(), "conflated"]).inc();
        }
        r.pending_bytes += pm.body.len() + pm.kind.len() + pm.user.len() + 32;
        if r.pending.is_empty() {
            r.opened = Some(now);
            r.must_opened = None;
        }
        if must_deliver && r.must_opened.is_none() {
            r.must_opened = Some(now);
        }
        r.pending.push(Pending { msg: pm, must_deliver, conflate, at: now });
        let full = r.pending.len() >= self.cfg.max_batch_messages || r.pending_bytes >= self.cfg.max_batch_bytes;
        if full {
            self.flush(room, out);
        } else if r.deadline.is_none() {
            let (rate, members) = (r.current_rate(now), r.members);
            let window = self.window_of(rate, members);
            let Some(r) = self.rooms.get_mut(room) else { return };
            if window.is_zero() {
                r.deadline = Some(now);
                self.immediate.push(room.clone());
            } else {
                let d = now + window;
                r.deadline = Some(d);
                self.timers.push(Reverse((d, room.clone())));
            }
        }
    }

    /// With a store: a must-deliver message is written, and the room's reservation of seqs is
    /// renewed once half of it is used. A must-deliver message, or a seq past the reservation
    /// the store has made durable, makes the room's deliveries and joins wait for its batch.
    ///
    /// Renewing at half (not when the block runs out) keeps the reservation off the delivery
    /// path (the next one is durable long before it is needed), and leaves every room at least
    /// half a block to number within when the store starts failing.
    fn store_message(
        &mut self,
        room: &RoomName,
        pm: &PushMessage,
        must_deliver: bool,
        idem: Option<Box<str>>,
        now: Instant,
    ) {
        let token = self.store_sent + 1;
        let durable = self.store_durable;
        let touched_s = self.wall_us(now) / 1_000_000;
        let Some(r) = self.rooms.get_mut(room) else { return };
        let renewing = r.reserve_token > durable;
        if pm.seq > r.seq_hi || (pm.seq + crate::store::SEQ_RESERVE / 2 > r.seq_hi && !renewing) {
            r.reserved_before = r.durable_hi(durable);
            r.seq_hi = pm.seq + crate::store::SEQ_RESERVE - 1;
            r.reserve_token = token;
            r.meta_s = touched_s;
            let meta =
                crate::store::RoomMeta { epoch: r.epoch, seq_hi: r.seq_hi, evicted_upto: r.stored_evicted, touched_s };
            self.store_out.push(crate::store::Record::Meta(room.clone(), meta));
        }
        if pm.seq > r.durable_hi(durable) {
            r.wait_token = r.wait_token.max(r.reserve_token);
        }
        if must_deliver {
            self.store_out.push(match idem {
                Some(key) => crate::store::Record::KeyedMsg(room.clone(), pm.clone(), key),
                None => crate::store::Record::Msg(room.clone(), pm.clone()),
            });
            r.wait_token = token;
        }
    }

    pub(super) fn flush_immediate(&mut self, out: &mut Out) {
        let rooms = std::mem::take(&mut self.immediate);
        for room in &rooms {
            self.flush(room, out);
        }
        self.immediate = rooms;
        self.immediate.clear();
    }

    pub(super) fn flush_due(&mut self, now: Instant, out: &mut Out) {
        while let Some(Reverse((deadline, _))) = self.timers.peek() {
            if *deadline > now {
                break;
            }
            let Reverse((deadline, room)) = self.timers.pop().expect("peeked");
            // A room flushed early (full batch) leaves a stale timer: skip it.
            if self.rooms.get(&room).and_then(|r| r.deadline) == Some(deadline) {
                self.flush(&room, out);
            }
        }
    }

    /// Serializes the room's pending messages once per encoding in use and hands the frames to
    /// every interested shard.
    pub(super) fn flush(&mut self, room: &RoomName, out: &mut Out) {
        if self.rooms.get(room).is_some_and(|r| !r.pending.is_empty()) && self.waits_for_store(room) {
            // Not before the store has what this batch carries: resumed by `durable`.
            let Some(r) = self.rooms.get_mut(room) else { return };
            r.flush_after_store = true;
            r.deadline = None;
            return;
        }
        let Some(r) = self.rooms.get_mut(room) else { return };
        r.deadline = None;
        if r.pending.is_empty() {
            return;
        }
        let pending = std::mem::take(&mut r.pending);
        r.pending_bytes = 0;
        let opened = r.opened.take().unwrap_or(self.now);
        let must_opened = r.must_opened.take();
        let last_seq = pending.last().map_or(r.flushed_seq, |p| p.msg.seq);
        r.flushed_seq = r.flushed_seq.max(last_seq);
        if !r.interested() {
            return;
        }
        let online = self.online_update(room);
        let kinds = kind_times(&pending, &self.cfg.kind_ids);
        let Some(r) = self.rooms.get_mut(room) else { return };
        let count = pending.len() as u32;
        let must = pending.iter().filter(|p| p.must_deliver).count() as u32;
        let must_msgs: Vec<PushMessage> = if must > 0 && must < count {
            pending.iter().filter(|p| p.must_deliver).map(|p| p.msg.clone()).collect()
        } else {
            Vec::new()
        };
        let all = ServerMsg::Batch {
            room: r.name.to_string(),
            messages: pending.into_iter().map(|p| p.msg).collect(),
            online,
        };
        // An SSE member holds the whole batch's position once it has either variant (what a
        // slow consumer sheds is droppable, never recovered).
        let at = (r.epoch, last_seq);
        let frames = encode_frames(&r.name, &r.interest, &all, at);
        let must_deliver = if must == count {
            MustDeliver::All
        } else if must == 0 {
            MustDeliver::None
        } else {
            let only = ServerMsg::Batch { room: r.name.to_string(), messages: must_msgs, online };
            MustDeliver::Some { frames: encode_frames(&r.name, &r.interest, &only, at), messages: must }
        };
        let delivery = Arc::new(Delivery {
            room: r.name.clone(),
            frames,
            messages: count,
            last_seq,
            must_deliver,
            since: opened,
            must_since: must_opened.unwrap_or(opened),
            kinds,
            deflated: crate::deflate::Deflated::default(),
        });
        send_to_shards(out, &r.interest, &delivery);
        self.stats.batches.inc();
        self.stats.batch_messages.inc_by(u64::from(count));
    }

    /// Sends a notice (not a message: no seq of its own) to every member of a room; `must`:
    /// whether a member that is behind keeps it (a reset) or sheds it like chat (a count).
    pub(super) fn notify(&mut self, room: &RoomName, msg: &ServerMsg, must: MustDeliver, out: &mut Out) {
        let Some(r) = self.rooms.get(room) else { return };
        // Every message up to the flushed seq went ahead of it on the same link: a notice (a
        // count, a gap, a reset to seq 0 of a new epoch) leaves an SSE member there.
        let frames = encode_frames(&r.name, &r.interest, msg, (r.epoch, r.flushed_seq));
        let delivery = Arc::new(Delivery {
            room: r.name.clone(),
            frames,
            messages: 0,
            last_seq: r.flushed_seq,
            must_deliver: must,
            since: self.now,
            must_since: self.now,
            kinds: None,
            deflated: crate::deflate::Deflated::default(),
        });
        send_to_shards(out, &r.interest, &delivery);
    }
}

/// Per kind in the batch, when its oldest message (and its oldest must-deliver one) arrived:
/// one short list per batch (a handful of kinds), shared by every shard and member. A kind
/// missing from `ids` (not configured here: another edge's, with a shared bus) is left out.
fn kind_times(pending: &[Pending], ids: &HashMap<String, u16>) -> Option<KindTimes> {
    let mut kinds: Vec<KindSince> = Vec::new();
    for p in pending {
        let Some(&kind) = ids.get(&p.msg.kind) else { continue };
        let must = p.must_deliver.then_some(p.at);
        match kinds.iter_mut().find(|k| k.kind == kind) {
            Some(k) => {
                // Pushed as they arrive, so the first is the oldest; min holds whatever the order.
                k.since = k.since.min(p.at);
                k.must_since = match (k.must_since, must) {
                    (Some(a), Some(b)) => Some(a.min(b)),
                    (a, b) => a.or(b),
                };
            }
            None => kinds.push(KindSince { kind, since: p.at, must_since: must }),
        }
    }
    (!kinds.is_empty()).then(|| KindTimes::from(kinds))
}

fn send_to_shards(out: &mut Out, interest: &[ShardSet; Subprotocol::COUNT], delivery: &Arc<Delivery>) {
    for s in ShardSet::union_of(interest) {
        out.push(s, ShardCmd::Deliver(delivery.clone()));
    }
}

/// One frame per encoding some shard wants. The SSE event carries `id: EPOCH:SEQ` for `at`
/// (where a member stands once it has the frame), and its data is the JSON payload: when JSON
/// members are served too, that payload is serialized once for both framings.
fn encode_frames(
    room: &str,
    interest: &[ShardSet; Subprotocol::COUNT],
    msg: &ServerMsg,
    at: (Epoch, u64),
) -> [Option<Bytes>; Subprotocol::COUNT] {
    let mut frames: [Option<Bytes>; Subprotocol::COUNT] = Default::default();
    let wants = |p: Subprotocol| !interest[p.index()].is_empty();
    if wants(Subprotocol::Json) || wants(Subprotocol::Sse) {
        match envelope::encode(Subprotocol::Json, msg) {
            Ok(json) => {
                for p in [Subprotocol::Json, Subprotocol::Sse].into_iter().filter(|&p| wants(p)) {
                    frames[p.index()] = Some(frame_at(p, &json, Some(at)));
                }
            }
            Err(e) => tracing::error!(room, error = %e, "cannot encode batch"),
        }
    }
    if wants(Subprotocol::Rkyv) {
        match envelope::encode(Subprotocol::Rkyv, msg) {
            Ok(payload) => frames[Subprotocol::Rkyv.index()] = Some(frame_at(Subprotocol::Rkyv, &payload, None)),
            Err(e) => tracing::error!(room, error = %e, "cannot encode batch"),
        }
    }
    frames
}
