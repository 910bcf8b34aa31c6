//! Joins: a connection becomes a member when its shard processes the engine's `JoinAck`, which
//! travels on the same link (engine -> shard, FIFO) as the room's deliveries. Every batch
//! flushed before the ack is ahead of it on that link, every batch after it behind: the member
//! receives exactly the batches after the ack's seq, with no gap and no duplicate. A `since`
//! join is answered from history inside the ack, so replay and live meet at the same seq.
//!
//! A position the room cannot honour (an epoch that is not the room's, a `since` ahead of the
//! room) is never answered silently: the ack carries a reset, the client's position becomes 0
//! in the room's epoch, and what history holds of that numbering is replayed.

use std::time::{Duration, Instant};

use bytes::Bytes;
use roomcast_proto::Subprotocol;
use roomcast_proto::envelope::{self, PushMessage, ServerMsg};

use super::{Engine, Out};
use crate::bus::redis::BridgeCmd;
use crate::bus::{Epoch, JoinRetry, PendingJoin, RoomName, ShardCmd, Since, frame_at};

/// Reasons a join's position was void (the `reset` message's `reason`).
pub const RESET_EPOCH: &str = "epoch changed: the room's numbering restarted";
pub const RESET_AHEAD: &str = "since is ahead of the room: its numbering restarted";

/// How long a join whose `since` is ahead of this edge waits for Redis to catch up.
const PARK_FOR: Duration = Duration::from_secs(2);

/// How long a join on a room this edge does not follow yet waits for Redis to give the room's
/// seq and epoch (the bridge reads them again until it does). Past this the join is sent back
/// with 1013, to come again (through dispatch, maybe to an edge whose Redis answers): a client
/// kept waiting without an answer while Redis is frozen sees neither its room nor why. Three
/// of Redis's command timeouts, so a read lost to one slow moment is read again in time.
pub(super) const SYNC_WAIT_FOR: Duration = Duration::from_secs(10);

/// The joins sent back for want of their room's sync, for a log line at most every
/// [`SYNC_WAIT_FOR`] (each join has its own deadline: a line per pass was a line per join, 597
/// in 30 ms in a trial). Those sent back after a line are told by the next one, which comes
/// once the period is over even if no more are sent back (a trial's 500 joins sent back over a
/// few milliseconds were logged as `joins=1`, the rest never).
#[derive(Debug, Default)]
pub(super) struct SentBackLog {
    pending: u64,
    room: Option<RoomName>,
    logged_at: Option<Instant>,
}

impl SentBackLog {
    /// `n` joins of `room` sent back.
    pub(super) fn add(&mut self, room: &RoomName, n: u64) {
        self.pending += n;
        self.room = Some(room.clone());
    }

    /// The line due at `now`, if any: the last room and the joins sent back since the last line.
    pub(super) fn due(&mut self, now: Instant) -> Option<(RoomName, u64)> {
        if self.pending == 0 || self.logged_at.is_some_and(|t| now.duration_since(t) < SYNC_WAIT_FOR) {
            return None;
        }
        self.logged_at = Some(now);
        let joins = std::mem::take(&mut self.pending);
        self.room.take().map(|room| (room, joins))
    }
}

#[cfg(test)]
mod sent_back_tests {
    use super::*;

    /// Every join sent back is told in some line, at most one line per period: the first at
    /// once, those after it when the period ends, whether or not more come.
    #[test]
    fn every_join_sent_back_is_logged_once_the_period_ends() {
        let t0 = Instant::now();
        let room: RoomName = "r".into();
        let mut log = SentBackLog::default();
        assert_eq!(log.due(t0), None, "nothing sent back, nothing to say");
        log.add(&room, 1);
        assert_eq!(log.due(t0), Some((room.clone(), 1)));
        log.add(&room, 499);
        assert_eq!(log.due(t0 + Duration::from_millis(5)), None, "within the period: held");
        assert_eq!(log.due(t0 + Duration::from_millis(9_999)), None);
        assert_eq!(log.due(t0 + SYNC_WAIT_FOR), Some((room.clone(), 499)), "told when the period ends");
        assert_eq!(log.due(t0 + SYNC_WAIT_FOR * 3), None, "and only once");
    }
}

impl Engine {
    pub(super) fn join(
        &mut self,
        room: RoomName,
        join: PendingJoin,
        since: Option<Since>,
        now: Instant,
        out: &mut Out,
    ) {
        if let Err(e) = self.ensure_room(&room, now, true) {
            // Counted (here and as the shard's signals_refused); a client can cause many, so
            // no log line each.
            self.stats.publish_rejected.with_label_values(&["too_many_rooms"]).inc();
            tracing::debug!(room = %room, error = %e, "join refused");
            out.push(
                join.shard,
                ShardCmd::JoinRefused(Box::new(crate::bus::JoinRefused {
                    slot: join.slot,
                    generation: join.generation,
                    room,
                    reason: match e {
                        crate::bus::PublishError::StoreUnavailable => "the edge cannot read this room from its store",
                        _ => "too many rooms on this edge",
                    },
                })),
            );
            return;
        }
        self.presence_changed(&room, now);
        let remote = self.remote.clone();
        let r = self.rooms.get_mut(&room).expect("ensured above");
        let was_interested = r.interested();
        r.members += 1;
        r.interest[join.proto.index()].insert(join.shard);
        r.last_active = now;
        if let Some(bridge) = &remote {
            if !was_interested {
                let _ = bridge.send(BridgeCmd::Subscribe(r.name.clone()));
            }
            if !r.synced {
                r.waiting.push((join, since, now + SYNC_WAIT_FOR));
                if !self.syncing_rooms.contains(&room) {
                    self.syncing_rooms.push(room);
                }
                return;
            }
        }
        self.answer_join(&room, join, since, now, out);
    }

    /// Acknowledges a join on a synced room: from local history, or through a remote recovery
    /// when `since` is older than what this edge has followed.
    pub(super) fn answer_join(
        &mut self,
        room: &RoomName,
        mut join: PendingJoin,
        since: Option<Since>,
        now: Instant,
        out: &mut Out,
    ) {
        if self.waits_for_store(room) {
            // Its latest messages are not durable yet: the join's replay and seam wait with them.
            if let Some(r) = self.rooms.get_mut(room) {
                r.joins_after_store.push((join, since));
            }
            return;
        }
        let Some(r) = self.rooms.get_mut(room) else { return };
        r.history.trim(now, &self.cfg.history);
        // A position in another numbering, or past the end of this one (in local mode; in
        // Redis mode the client may come from an edge that is ahead: wait for it below), is
        // void: reset, and replay this numbering from its start.
        let since = match since {
            // A client at 0 holds nothing of any numbering: no position to void, no reset (a
            // quiet room forgotten and made anew would reset every returning member for
            // nothing).
            Some(s) if s.seq == 0 => Some(0),
            Some(s) if s.epoch.is_some_and(|e| e != r.epoch) => {
                join.reset = Some(RESET_EPOCH);
                Some(0)
            }
            Some(s) if s.seq > r.seq && self.remote.is_none() => {
                join.reset = Some(RESET_AHEAD);
                Some(0)
            }
            Some(s) => Some(s.seq),
            None => None,
        };
        if let Some(since) = since
            && since > r.flushed_seq
        {
            // The client has seen more than this edge has handed out (it comes from another
            // edge, whose window closed earlier). Flush what we have; if even that is not far
            // enough, wait for the rest to arrive from the bus.
            if since <= r.seq {
                self.flush(room, out);
            } else if self.remote.is_some() {
                r.parked.push((join, since, now + PARK_FOR));
                if !self.parked_rooms.contains(room) {
                    self.parked_rooms.push(room.clone());
                }
                return;
            }
        }
        let Some(r) = self.rooms.get_mut(room) else { return };
        if let (Some(bridge), Some(since)) = (&self.remote, since)
            && (since < r.base_seq || since < r.history.must_evicted_upto)
            && since < r.flushed_seq
        {
            let rec = &mut r.recovery;
            match rec.reading {
                Some((from, _)) if since >= from => rec.covered.push((join, since)),
                Some(_) => rec.next.push((join, since)),
                None => {
                    rec.reading = Some((since, r.flushed_seq));
                    rec.covered.push((join, since));
                    self.stats.recovery_reads.inc();
                    let _ = bridge.send(BridgeCmd::Recover { room: r.name.clone(), since, upto: r.flushed_seq });
                }
            }
            return;
        }
        let seq = r.flushed_seq;
        let mut replay = Vec::new();
        // A joiner is shown the room's count at once, in `joined`.
        let online = (!self.cfg.presence_interval.is_zero()).then(|| r.online());
        let messages = match since {
            Some(since) => {
                let rec = r.history.recover(since, seq);
                if let Some((from, to)) = rec.gap {
                    replay.push(ServerMsg::Gap { room: r.name.to_string(), from, to });
                }
                rec.messages
            }
            None => r.history.last(self.cfg.join_last, seq),
        };
        let messages = r.with_latest(messages, since, seq);
        if !messages.is_empty() {
            replay.push(ServerMsg::Batch { room: r.name.to_string(), messages, online: None });
        }
        let name = r.name.clone();
        let replay = encode_replay(join.proto, &replay, (r.epoch, seq));
        ack_join(out, name, join, seq, r.epoch, replay, online);
    }

    /// Redis answered the room's recovery read `(since, upto]`: every join it covers gets
    /// Redis's must-deliver messages above its own `since`, then this edge's own for what was
    /// flushed meanwhile, so each seam is exact; joins that came with an older `since` while it
    /// was read start the next read. A read Redis did not answer is not a gap (Redis still holds
    /// those gifts): its joins are closed with 1013 and come back with the same `since`.
    #[expect(clippy::too_many_arguments, reason = "the fields of EngineCmd::Recovered")]
    pub(super) fn recovered(
        &mut self,
        room: &RoomName,
        since: u64,
        upto: u64,
        messages: Vec<PushMessage>,
        evicted_upto: u64,
        ok: bool,
        now: Instant,
        out: &mut Out,
    ) {
        let Some(r) = self.rooms.get_mut(room) else { return };
        if r.recovery.reading != Some((since, upto)) {
            // Not the read in flight: the room's numbering restarted meanwhile (its joins were
            // answered with a reset then).
            return;
        }
        r.recovery.reading = None;
        let mut covered = std::mem::take(&mut r.recovery.covered);
        let mut next = std::mem::take(&mut r.recovery.next);
        if !ok {
            self.stats.recovery_joins.inc_by((covered.len() + next.len()) as u64);
            for (join, _) in covered.into_iter().chain(next) {
                retry_join(out, r.name.clone(), join, r.flushed_seq, r.epoch, JoinRetry::Recovery);
            }
            return;
        }
        self.stats.recovery_joins.inc_by(covered.len() as u64);
        let seq = r.flushed_seq;
        let local = r.history.recover(upto, seq).messages;
        let online = (!self.cfg.presence_interval.is_zero()).then(|| r.online());
        // Members sent away together share their last seq: one replay is encoded per `since`
        // and encoding, and handed to each of them (the frames are reference-counted).
        covered.sort_by_key(|(join, s)| (*s, join.proto.index()));
        let mut last: Option<((u64, usize), Vec<Bytes>)> = None;
        for (join, s) in covered {
            let key = (s, join.proto.index());
            let replay = match &last {
                Some((k, replay)) if *k == key => replay.clone(),
                _ => {
                    let mut replay = Vec::new();
                    let gap = (s < evicted_upto).then(|| (s + 1, evicted_upto.min(upto)));
                    if let Some((from, to)) = gap.filter(|(a, b)| a <= b) {
                        replay.push(ServerMsg::Gap { room: r.name.to_string(), from, to });
                    }
                    let mut all: Vec<PushMessage> =
                        messages.iter().filter(|m| m.seq > s && m.seq <= upto).cloned().collect();
                    all.extend(local.iter().cloned());
                    let all = r.with_latest(all, Some(s), seq);
                    if !all.is_empty() {
                        replay.push(ServerMsg::Batch { room: r.name.to_string(), messages: all, online: None });
                    }
                    let replay = encode_replay(join.proto, &replay, (r.epoch, seq));
                    last = Some((key, replay.clone()));
                    replay
                }
            };
            ack_join(out, r.name.clone(), join, seq, r.epoch, replay, online);
        }
        // The lowest `since` first: it starts the next read, which covers all the others.
        next.sort_by_key(|&(_, s)| s);
        for (join, s) in next {
            self.answer_join(room, join, Some(Since { seq: s, epoch: None }), now, out);
        }
    }

    /// Answers parked joins whose `since` has been reached (or, with `expire`, whose wait is
    /// over: they are answered with what this edge has).
    pub(super) fn unpark(&mut self, room: &RoomName, now: Instant, expire: bool, out: &mut Out) {
        let Some(r) = self.rooms.get_mut(room) else { return };
        let seq = r.seq;
        let (ready, keep): (Vec<_>, Vec<_>) = std::mem::take(&mut r.parked)
            .into_iter()
            .partition(|&(_, since, at)| since <= seq || (expire && now >= at));
        r.parked = keep;
        for (mut join, since, _) in ready {
            if since > seq {
                // No edge has numbered that far in this epoch: the client's position is void.
                tracing::debug!(room = %room, since, seq, "since is ahead of the bus: reset");
                join.reset = Some(RESET_AHEAD);
                self.answer_join(room, join, Some(Since { seq: 0, epoch: None }), now, out);
                continue;
            }
            self.answer_join(room, join, Some(Since { seq: since, epoch: None }), now, out);
        }
    }

    fn log_sent_back(&mut self, now: Instant) {
        if let Some((room, joins)) = self.sent_back.due(now) {
            tracing::warn!(
                room = %room,
                joins,
                "redis gave no room seq within 10 s of these joins (this room's and others' since the last such line): sent back to come again (1013, room_unavailable)"
            );
        }
    }

    /// Sends back (1013) the joins that waited [`SYNC_WAIT_FOR`] for their room's sync.
    pub(super) fn expire_waiting(&mut self, now: Instant, out: &mut Out) {
        self.log_sent_back(now);
        if self.syncing_rooms.is_empty() {
            return;
        }
        for room in std::mem::take(&mut self.syncing_rooms) {
            let Some(r) = self.rooms.get_mut(&room) else { continue };
            let due = r.waiting.partition_point(|&(_, _, at)| at <= now);
            if due > 0 {
                self.sent_back.add(&room, due as u64);
                self.log_sent_back(now);
            }
            let Some(r) = self.rooms.get_mut(&room) else { continue };
            for (join, _, _) in r.waiting.drain(..due) {
                retry_join(out, r.name.clone(), join, r.flushed_seq, r.epoch, JoinRetry::Sync);
            }
            if !r.waiting.is_empty() {
                self.syncing_rooms.push(room);
            }
        }
    }

    pub(super) fn expire_parked(&mut self, now: Instant, out: &mut Out) {
        if self.parked_rooms.is_empty() {
            return;
        }
        for room in std::mem::take(&mut self.parked_rooms) {
            self.unpark(&room, now, true, out);
            if self.rooms.get(&room).is_some_and(|r| !r.parked.is_empty()) {
                self.parked_rooms.push(room);
            }
        }
    }
}

pub(super) fn ack_join(
    out: &mut Out,
    room: RoomName,
    join: PendingJoin,
    seq: u64,
    epoch: Epoch,
    replay: Vec<Bytes>,
    online: Option<u64>,
) {
    let ack = crate::bus::JoinAck { reset: join.reset, replay, online, ..bare_ack(room, &join, seq, epoch) };
    out.push(join.shard, ShardCmd::JoinAck(Box::new(ack)));
}

/// Answers a join that Redis could not serve now: its shard closes it with 1013 and the client
/// comes back with the same `since` (nothing is declared lost).
pub(super) fn retry_join(out: &mut Out, room: RoomName, join: PendingJoin, seq: u64, epoch: Epoch, why: JoinRetry) {
    let ack = crate::bus::JoinAck { retry: Some(why), ..bare_ack(room, &join, seq, epoch) };
    out.push(join.shard, ShardCmd::JoinAck(Box::new(ack)));
}

/// `join`'s answer at `seq` in `epoch`, with nothing more to say.
fn bare_ack(room: RoomName, join: &PendingJoin, seq: u64, epoch: Epoch) -> crate::bus::JoinAck {
    crate::bus::JoinAck {
        slot: join.slot,
        generation: join.generation,
        room,
        seq,
        epoch,
        reset: None,
        replay: Vec::new(),
        online: None,
        retry: None,
    }
}

/// A room's joins recovering from Redis (their `since` is older than this edge's history): one
/// read in flight per room, shared by every join whose `since` it covers. With a read per join,
/// a restarted edge given 34,674 returning members of one room sent Redis that many `XRANGE`s of
/// the same gifts at once; the answers timed out for 30 s and the joins were told `gap` for
/// gifts Redis held (bench-results/2026-12-01-restart-storm-README.md).
#[derive(Default)]
pub struct Recovery {
    /// The read in flight: `(since, upto]`.
    reading: Option<(u64, u64)>,
    /// Joins it answers, each with its own `since` (at or above the read's).
    covered: Vec<(PendingJoin, u64)>,
    /// Joins whose `since` is below it: the next read's.
    next: Vec<(PendingJoin, u64)>,
}

impl Recovery {
    /// No join waits for a read.
    pub fn is_idle(&self) -> bool {
        self.reading.is_none() && self.covered.is_empty() && self.next.is_empty()
    }

    /// Every waiting join, the read in flight forgotten (its answer is ignored).
    pub fn take_joins(&mut self) -> Vec<PendingJoin> {
        self.reading = None;
        let covered = std::mem::take(&mut self.covered);
        covered.into_iter().chain(std::mem::take(&mut self.next)).map(|(j, _)| j).collect()
    }
}

/// A join's replay (a gap notice and/or recovered messages) in `proto`. For SSE the last event
/// carries `id: EPOCH:SEQ` of the join's seam `at`: a client cut off before it reconnects from
/// where it was, one cut off after it from the seam (the shard puts the id on `joined` when the
/// replay is empty).
pub(super) fn encode_replay(proto: Subprotocol, msgs: &[ServerMsg], at: (Epoch, u64)) -> Vec<Bytes> {
    let mut out = Vec::with_capacity(msgs.len());
    for (i, msg) in msgs.iter().enumerate() {
        match envelope::encode(proto, msg) {
            Ok(payload) => out.push(frame_at(proto, &payload, (i + 1 == msgs.len()).then_some(at))),
            Err(e) => tracing::error!(error = %e, "cannot encode message"),
        }
    }
    out
}
