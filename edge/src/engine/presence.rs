//! The online count (occupancy): how many members a room has, on this edge or on every edge.
//!
//! The engine already counts a room's members (joins in, `Left` out). A change schedules a
//! presence step no sooner than `presence.interval_ms` after the last one, so a reconnect storm
//! of 10^4 joins a second costs one step per room per interval, not one per join. A step:
//! - with a shared bus, reports this edge's count to Redis if it changed (the bridge's script
//!   sums the edges and announces a changed total on the room's channel; the announcement comes
//!   back to every edge serving the room as `EngineCmd::Online`);
//! - shows members the count (the cluster's total once announced, else this edge's) if it
//!   changed since they were last shown it: in the room's next batch when one is pending
//!   (serialized once with it), else in a batch of its own that carries only the count. That
//!   batch is droppable: a member behind sheds it like chat. It is also a write to every
//!   member, so a large silent room gets one at most every members / `presence.max_writes_per_s`
//!   seconds; until then the step comes back each interval (reporting to Redis, and handing
//!   the count to a batch that may have come meanwhile).

use std::cmp::Reverse;
use std::time::{Duration, Instant};

use roomcast_proto::envelope::ServerMsg;

use super::{Engine, Out};
use crate::bus::redis::BridgeCmd;
use crate::bus::{MustDeliver, RoomName};

/// How long after the count was last shown a batch carrying only the count may go: the push
/// interval, or longer for a room whose members that often would cost more than
/// `writes_per_s` writes a second.
fn solo_every(interval: Duration, writes_per_s: f64, members: u64) -> Duration {
    interval.max(Duration::from_secs_f64(members as f64 / writes_per_s.max(1.0)))
}

impl Engine {
    /// How often a room's presence step may run: the push interval, or a second when pushes
    /// are off but a shared bus still wants this edge's count.
    fn presence_every(&self) -> Option<Duration> {
        match self.cfg.presence_interval {
            d if !d.is_zero() => Some(d),
            _ if self.remote.is_some() => Some(Duration::from_secs(1)),
            _ => None,
        }
    }

    /// The room's count changed (a join, a leave, a new total): schedule a presence step.
    pub(super) fn presence_changed(&mut self, room: &RoomName, now: Instant) {
        let Some(every) = self.presence_every() else { return };
        let Some(r) = self.rooms.get_mut(room) else { return };
        if r.presence_due.is_some() {
            return;
        }
        let last = match (r.online_at, r.reported_at) {
            (Some(a), Some(b)) => Some(a.max(b)),
            (a, b) => a.or(b),
        };
        let due = last.map_or(now, |t| (t + every).max(now));
        r.presence_due = Some(due);
        self.presence_timers.push(Reverse((due, room.clone())));
    }

    /// Runs the presence steps that are due.
    pub(super) fn presence_due(&mut self, now: Instant, out: &mut Out) {
        while let Some(Reverse((due, _))) = self.presence_timers.peek() {
            if *due > now {
                break;
            }
            let Reverse((due, room)) = self.presence_timers.pop().expect("peeked");
            let every = self.presence_every();
            let Some(r) = self.rooms.get_mut(&room) else { continue };
            if r.presence_due != Some(due) {
                continue;
            }
            r.presence_due = None;
            if let Some(bridge) = &self.remote
                && r.members != r.reported
                && r.interested()
            {
                r.reported = r.members;
                r.reported_at = Some(now);
                let _ = bridge.send(BridgeCmd::Occupancy { room: room.clone(), count: r.members });
            }
            if !r.pending.is_empty() {
                // The pending batch carries the count when it flushes (`online_update`).
                continue;
            }
            let solo_at = r
                .online_at
                .map(|t| t + solo_every(self.cfg.presence_interval, self.cfg.presence_writes_per_s, r.members));
            match solo_at {
                Some(at) if at > now => {
                    if r.online_shown != Some(r.online())
                        && let Some(every) = every
                    {
                        let next = at.min(now + every);
                        r.presence_due = Some(next);
                        self.presence_timers.push(Reverse((next, room.clone())));
                    }
                }
                _ => self.push_online(&room, out),
            }
        }
    }

    /// The count to put in the room's batch now, if members have not been shown it and the
    /// interval since they were last shown one has passed (recorded as shown).
    pub(super) fn online_update(&mut self, room: &RoomName) -> Option<u64> {
        let every = self.cfg.presence_interval;
        if every.is_zero() {
            return None;
        }
        let now = self.now;
        let r = self.rooms.get_mut(room)?;
        let n = r.online();
        if r.online_shown == Some(n) || r.online_at.is_some_and(|t| now < t + every) {
            return None;
        }
        r.online_shown = Some(n);
        r.online_at = Some(now);
        Some(n)
    }

    /// A batch that carries only the room's count, to every member (droppable).
    fn push_online(&mut self, room: &RoomName, out: &mut Out) {
        let Some(online) = self.online_update(room) else { return };
        let Some(r) = self.rooms.get(room) else { return };
        if !r.interested() {
            return;
        }
        let msg = ServerMsg::Batch { room: r.name.to_string(), messages: Vec::new(), online: Some(online) };
        self.notify(room, &msg, MustDeliver::None, out);
    }
}
