//! Redis mode: Redis numbers messages; the engine accepts them strictly in seq order. A message
//! ahead of a gap waits while the bridge fills the gap from the room's streams; what Redis no
//! longer has is announced to members as an explicit `gap`.

use std::time::Instant;

use roomcast_proto::envelope::{PushMessage, ServerMsg};

use super::joins::RESET_EPOCH;
use super::{Engine, Out};
use crate::bus::policy::History;
use crate::bus::redis::BridgeCmd;
use crate::bus::{Epoch, MustDeliver, RoomName, Since, epoch_text};

impl Engine {
    /// The room's seq and epoch in Redis, right after (re)subscribing.
    pub(super) fn synced(
        &mut self,
        room: &RoomName,
        seq: u64,
        epoch: Epoch,
        latest: Vec<PushMessage>,
        now: Instant,
        out: &mut Out,
    ) {
        let Some(r) = self.rooms.get_mut(room) else { return };
        if !r.interested() {
            return;
        }
        if !r.synced {
            // Latest state as Redis holds it (other edges may have published it before this
            // one followed the room), before the waiting joins are answered.
            self.apply_latest(room, latest);
            let Some(r) = self.rooms.get_mut(room) else { return };
            r.synced = true;
            r.epoch = epoch;
            r.seq = seq;
            r.flushed_seq = seq;
            r.base_seq = seq;
            r.ahead.retain(|&s, _| s > seq);
            let waiting = std::mem::take(&mut r.waiting);
            for (join, since, _) in waiting {
                self.answer_join(room, join, since, now, out);
            }
            self.drain_ahead(room, now, out);
        } else if epoch == r.epoch && seq < r.seq {
            // Same epoch, lower seq: Redis lost its last writes. Numbering on from here would
            // hand out seqs clients already hold, under the epoch they hold them in: a new
            // epoch first (the resync that follows resets members).
            if let Some(bridge) = &self.remote {
                let _ = bridge.send(BridgeCmd::Renumber { room: room.clone(), epoch, below: r.seq });
            }
        } else if epoch != r.epoch || seq < r.seq {
            // Redis came back without the room's state (emptied, or no persistence): a new
            // numbering. Follow it from its start, and say so.
            self.restart_numbering(room, epoch, now, out);
            self.apply_latest(room, latest);
            if seq > 0 {
                self.request_fill(room, 1, seq);
            }
        } else if seq > r.seq {
            // Reconnected after missing messages: fetch them.
            let from = r.seq + 1;
            self.request_fill(room, from, seq);
        }
    }

    /// Conflated kinds' latest messages read from Redis become the room's (a newer one that
    /// arrives live replaces its entry).
    fn apply_latest(&mut self, room: &RoomName, latest: Vec<PushMessage>) {
        for m in &latest {
            self.conflate(room, m);
        }
    }

    /// The room's numbering restarted in Redis under `epoch`: what is pending goes out, history
    /// of the old numbering is dropped, members get a `reset` (position 0 in `epoch`), and joins
    /// waiting for a seq of the old numbering are answered with a reset too. Messages of the
    /// new numbering then arrive (or are filled) from seq 1.
    fn restart_numbering(&mut self, room: &RoomName, epoch: Epoch, now: Instant, out: &mut Out) {
        self.flush(room, out);
        let Some(r) = self.rooms.get_mut(room) else { return };
        tracing::error!(room = %room, old_seq = r.seq, old_epoch = %epoch_text(r.epoch), epoch = %epoch_text(epoch), "redis lost this room's numbering (run redis with appendonly): members are reset");
        r.epoch = epoch;
        r.seq = 0;
        r.flushed_seq = 0;
        r.base_seq = 0;
        r.history = History::default();
        r.ahead.clear();
        r.latest.clear();
        r.filling = false;
        r.fill_want = 0;
        let parked = std::mem::take(&mut r.parked);
        let recovering = r.recovery.take_joins();
        let notice =
            ServerMsg::Reset { room: r.name.to_string(), epoch: epoch_text(epoch), seq: 0, reason: RESET_EPOCH.into() };
        self.notify(room, &notice, MustDeliver::All, out);
        for mut join in parked.into_iter().map(|(j, _, _)| j).chain(recovering) {
            join.reset = Some(RESET_EPOCH);
            self.answer_join(room, join, Some(Since { seq: 0, epoch: None }), now, out);
        }
    }

    fn request_fill(&mut self, room: &RoomName, from: u64, to: u64) {
        let Some(r) = self.rooms.get_mut(room) else { return };
        if from > to {
            return;
        }
        if r.filling {
            // One fill at a time: this range is fetched when the one in flight is back.
            r.fill_want = r.fill_want.max(to);
            return;
        }
        r.filling = true;
        if let Some(bridge) = &self.remote {
            let _ = bridge.send(BridgeCmd::Fill { room: room.clone(), from, to });
        }
    }

    /// A message numbered by Redis. Accepted in seq order; ahead of a gap it waits while the
    /// gap is filled.
    pub(super) fn remote_msg(
        &mut self,
        room: &RoomName,
        msg: PushMessage,
        must_deliver: bool,
        epoch: Epoch,
        now: Instant,
        out: &mut Out,
    ) {
        let Some(r) = self.rooms.get_mut(room) else { return };
        if !r.interested() {
            return;
        }
        if !r.synced {
            r.ahead.insert(msg.seq, (msg, must_deliver));
            return;
        }
        if epoch != r.epoch {
            // Redis was emptied under us: this message is of a new numbering.
            self.restart_numbering(room, epoch, now, out);
        }
        let Some(r) = self.rooms.get_mut(room) else { return };
        if msg.seq <= r.seq {
            return; // duplicate (already filled)
        }
        if msg.seq == r.seq + 1 && r.ahead.is_empty() {
            self.accept(room, msg, must_deliver, None, now, out);
            return;
        }
        let from = r.seq + 1;
        let to = msg.seq - 1;
        r.ahead.insert(msg.seq, (msg, must_deliver));
        self.drain_ahead(room, now, out);
        if let Some(r) = self.rooms.get(room)
            && !r.ahead.is_empty()
        {
            self.request_fill(room, from, to);
        }
    }

    /// Accepts every message that is next in line.
    fn drain_ahead(&mut self, room: &RoomName, now: Instant, out: &mut Out) {
        loop {
            let Some(r) = self.rooms.get_mut(room) else { return };
            let next = r.seq + 1;
            let Some((msg, md)) = r.ahead.remove(&next) else { return };
            self.accept(room, msg, md, None, now, out);
        }
    }

    /// The fill of `from..=to` came back. What it lacks is announced as a gap.
    #[expect(clippy::too_many_arguments, reason = "the fields of EngineCmd::Filled")]
    pub(super) fn filled(
        &mut self,
        room: &RoomName,
        from: u64,
        to: u64,
        messages: Vec<(PushMessage, bool)>,
        ok: bool,
        now: Instant,
        out: &mut Out,
    ) {
        let Some(r) = self.rooms.get_mut(room) else { return };
        r.filling = false;
        if !ok {
            tracing::warn!(room = %room, from, to, "gap could not be filled from redis");
        }
        for (m, md) in messages {
            if m.seq > r.seq {
                r.ahead.insert(m.seq, (m, md));
            }
        }
        loop {
            self.drain_ahead(room, now, out);
            let Some(r) = self.rooms.get_mut(room) else { return };
            // Whatever this fill covered and is still missing (up to `to`, or to the next
            // message held) is lost. Not beyond `to`: a range this fill did not read may well
            // be in Redis (a gift waiting for its replica while later chat arrived live).
            let next_held = r.ahead.keys().next().copied();
            let missing_to = match next_held {
                Some(h) => (h - 1).min(to),
                None if to > r.seq => to,
                None => break,
            };
            if missing_to <= r.seq {
                break;
            }
            let gap_from = r.seq + 1;
            r.seq = missing_to;
            self.flush(room, out);
            let r = self.rooms.get_mut(room).expect("present");
            r.flushed_seq = missing_to;
            let notice = ServerMsg::Gap { room: r.name.to_string(), from: gap_from, to: missing_to };
            self.notify(room, &notice, MustDeliver::All, out);
            if next_held.is_none() {
                break;
            }
        }
        // What is still missing before a message held, or was asked for meanwhile: fetched.
        let Some(r) = self.rooms.get_mut(room) else { return };
        let want = std::mem::take(&mut r.fill_want);
        let upto = r.ahead.keys().next().map_or(want, |&h| (h - 1).max(want));
        let from = r.seq + 1;
        self.request_fill(room, from, upto);
    }
}
