//! The in-process bus: one thread that owns every room's publish state.
//!
//! Per room it keeps the next seq, the last seq flushed to members, which shards want which
//! encoding (a bit per shard), and the messages waiting for the current merge window. A flush
//! serializes the batch once per encoding that some shard wants, wraps it into one frame and
//! sends one `Arc<Delivery>` to each interested shard: no per-member work happens here.
//!
//! Windows all have the same length, so deadlines are reached in the order rooms opened them:
//! a FIFO of (deadline, room) is the whole timer structure.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, RecvTimeoutError};
use roomcast_proto::envelope::{self, PushMessage, ServerMsg};
use roomcast_proto::Subprotocol;

use super::{Ack, BusCmd, Delivery, Mailbox, NewMessage, PublishError, Reply, RoomName, ShardCmd, frame, now_us};
use crate::metrics::BusStats;

/// Rooms idle this long with no member anywhere are forgotten (their seq restarts).
const ROOM_IDLE_TTL: Duration = Duration::from_secs(600);
/// Upper bound on rooms, so publishers cannot grow memory without limit.
pub const MAX_ROOMS: usize = 1_000_000;
/// Commands handled before flushing due rooms, so a flood cannot starve the timers.
const MAX_CMDS_PER_TURN: usize = 4096;

#[derive(Debug, Clone)]
pub struct BusConfig {
    pub window: Duration,
    pub max_batch_messages: usize,
    pub max_batch_bytes: usize,
}

struct Room {
    name: RoomName,
    /// Last seq assigned.
    seq: u64,
    /// Last seq handed to shards (members that join now see seqs above it).
    flushed_seq: u64,
    /// Bit `s` of `interest[p]`: shard `s` has members (or joins in flight) wanting encoding `p`.
    interest: [u64; 2],
    pending: Vec<PushMessage>,
    pending_bytes: usize,
    deadline: Option<Instant>,
    last_active: Instant,
}

impl Room {
    fn new(name: RoomName, now: Instant) -> Self {
        Self {
            name,
            seq: 0,
            flushed_seq: 0,
            interest: [0; 2],
            pending: Vec::new(),
            pending_bytes: 0,
            deadline: None,
            last_active: now,
        }
    }

    fn interested(&self) -> bool {
        self.interest[0] | self.interest[1] != 0
    }
}

pub struct LocalBus {
    rx: Receiver<BusCmd>,
    shards: Vec<Mailbox>,
    cfg: BusConfig,
    stats: BusStats,
    rooms: HashMap<RoomName, Room>,
    timers: VecDeque<(Instant, RoomName)>,
    immediate: Vec<RoomName>,
    last_sweep: Instant,
}

impl LocalBus {
    pub fn new(rx: Receiver<BusCmd>, shards: Vec<Mailbox>, cfg: BusConfig, stats: BusStats) -> Self {
        Self {
            rx,
            shards,
            cfg,
            stats,
            rooms: HashMap::new(),
            timers: VecDeque::new(),
            immediate: Vec::new(),
            last_sweep: Instant::now(),
        }
    }

    /// Runs until `BusCmd::Shutdown` or every sender is gone.
    pub fn run(mut self) {
        loop {
            let now = Instant::now();
            let first = match self.timers.front() {
                Some(&(deadline, _)) => self.rx.recv_timeout(deadline.saturating_duration_since(now)),
                None => self.rx.recv().map_err(|_| RecvTimeoutError::Disconnected),
            };
            match first {
                Ok(BusCmd::Shutdown) | Err(RecvTimeoutError::Disconnected) => break,
                Ok(cmd) => {
                    self.handle(cmd);
                    for _ in 0..MAX_CMDS_PER_TURN {
                        match self.rx.try_recv() {
                            Ok(BusCmd::Shutdown) => {
                                self.flush_all();
                                return;
                            }
                            Ok(cmd) => self.handle(cmd),
                            Err(_) => break,
                        }
                    }
                }
                Err(RecvTimeoutError::Timeout) => {}
            }
            self.flush_immediate();
            self.flush_due(Instant::now());
            self.sweep();
        }
        self.flush_all();
    }

    fn handle(&mut self, cmd: BusCmd) {
        match cmd {
            BusCmd::Publish { room, msg, reply } => {
                let result = self.publish(room, msg);
                self.answer(reply, result);
            }
            BusCmd::Join { room, shard, slot, generation, proto } => {
                let now = Instant::now();
                let r = self.rooms.entry(room.clone()).or_insert_with(|| Room::new(room.clone(), now));
                r.interest[proto.index()] |= 1u64 << shard;
                r.last_active = now;
                let seq = r.flushed_seq;
                let name = r.name.clone();
                self.stats.rooms.set(self.rooms.len() as i64);
                if let Some(mb) = self.shards.get(usize::from(shard)) {
                    mb.send(ShardCmd::JoinAck { slot, generation, room: name, seq });
                }
            }
            BusCmd::NoInterest { room, shard, proto } => {
                if let Some(r) = self.rooms.get_mut(&room) {
                    r.interest[proto.index()] &= !(1u64 << shard);
                    r.last_active = Instant::now();
                }
            }
            BusCmd::Shutdown => {}
        }
    }

    fn answer(&self, reply: Reply, result: Result<(RoomName, Ack), PublishError>) {
        match reply {
            Reply::Http(tx) => {
                let _ = tx.send(result.map(|(_, ack)| ack));
            }
            Reply::Conn { shard, slot, generation } => {
                if let (Some(mb), Ok((room, ack))) = (self.shards.get(usize::from(shard)), &result) {
                    mb.send(ShardCmd::Published { slot, generation, room: room.clone(), result: Ok(*ack) });
                } else if let (Some(mb), Err(e)) = (self.shards.get(usize::from(shard)), &result) {
                    mb.send(ShardCmd::Published {
                        slot,
                        generation,
                        room: RoomName::from(""),
                        result: Err(e.clone()),
                    });
                }
            }
            Reply::None => {}
        }
    }

    fn publish(&mut self, room: RoomName, msg: NewMessage) -> Result<(RoomName, Ack), PublishError> {
        let now = Instant::now();
        if !self.rooms.contains_key(&room) {
            if self.rooms.len() >= MAX_ROOMS {
                self.stats.publish_rejected.with_label_values(&["too_many_rooms"]).inc();
                return Err(PublishError::TooManyRooms(MAX_ROOMS));
            }
            self.rooms.insert(room.clone(), Room::new(room.clone(), now));
            self.stats.rooms.set(self.rooms.len() as i64);
        }
        let r = self.rooms.get_mut(&room).expect("inserted above");
        r.seq += 1;
        r.last_active = now;
        let ack = Ack { seq: r.seq, ts_us: now_us() };
        self.stats.messages_in.with_label_values(&[msg.kind.as_str()]).inc();
        let name = r.name.clone();
        if !r.interested() {
            // No member on any shard: nothing to deliver. (History, for `since`, keeps it
            // once that lands; until then the seq still advances so gaps stay visible.)
            r.flushed_seq = r.seq;
            return Ok((name, ack));
        }
        r.pending_bytes += msg.body.len() + msg.kind.len() + msg.user.len() + 32;
        r.pending.push(PushMessage {
            seq: ack.seq,
            ts_us: ack.ts_us,
            kind: msg.kind,
            user: msg.user,
            body: msg.body,
        });
        let full = r.pending.len() >= self.cfg.max_batch_messages || r.pending_bytes >= self.cfg.max_batch_bytes;
        if full {
            self.flush(&name);
        } else if r.deadline.is_none() {
            if self.cfg.window.is_zero() {
                r.deadline = Some(now);
                self.immediate.push(name.clone());
            } else {
                let d = now + self.cfg.window;
                r.deadline = Some(d);
                self.timers.push_back((d, name.clone()));
            }
        }
        Ok((name, ack))
    }

    fn flush_immediate(&mut self) {
        let rooms = std::mem::take(&mut self.immediate);
        for room in &rooms {
            self.flush(room);
        }
        self.immediate = rooms;
        self.immediate.clear();
    }

    fn flush_due(&mut self, now: Instant) {
        while let Some(&(deadline, _)) = self.timers.front() {
            if deadline > now {
                break;
            }
            let (deadline, room) = self.timers.pop_front().expect("front exists");
            // A room flushed early (full batch) leaves a stale timer: skip it.
            if self.rooms.get(&room).and_then(|r| r.deadline) == Some(deadline) {
                self.flush(&room);
            }
        }
    }

    fn flush_all(&mut self) {
        let names: Vec<RoomName> = self.rooms.keys().cloned().collect();
        for n in names {
            self.flush(&n);
        }
    }

    /// Serializes the room's pending messages once per encoding in use and hands the frames to
    /// every interested shard.
    fn flush(&mut self, room: &RoomName) {
        let Some(r) = self.rooms.get_mut(room) else { return };
        r.deadline = None;
        if r.pending.is_empty() {
            return;
        }
        let messages = std::mem::take(&mut r.pending);
        r.pending_bytes = 0;
        let last_seq = messages.last().map_or(r.flushed_seq, |m| m.seq);
        r.flushed_seq = last_seq;
        if !r.interested() {
            return;
        }
        let count = messages.len() as u32;
        let msg = ServerMsg::Batch { room: r.name.to_string(), messages };
        let mut frames: [Option<bytes::Bytes>; 2] = [None, None];
        for proto in Subprotocol::ALL {
            if r.interest[proto.index()] == 0 {
                continue;
            }
            match envelope::encode(proto, &msg) {
                Ok(payload) => frames[proto.index()] = Some(frame(proto, &payload)),
                Err(e) => tracing::error!(room = %r.name, error = %e, "cannot encode batch"),
            }
        }
        let delivery = Arc::new(Delivery { room: r.name.clone(), frames, messages: count, last_seq });
        let mut shards = r.interest[0] | r.interest[1];
        while shards != 0 {
            let s = shards.trailing_zeros() as usize;
            shards &= shards - 1;
            if let Some(mb) = self.shards.get(s) {
                mb.send(ShardCmd::Deliver(delivery.clone()));
            }
        }
        self.stats.batches.inc();
        self.stats.batch_messages.inc_by(u64::from(count));
    }

    fn sweep(&mut self) {
        let now = Instant::now();
        if now.duration_since(self.last_sweep) < Duration::from_secs(10) {
            return;
        }
        self.last_sweep = now;
        self.rooms.retain(|_, r| {
            r.interested() || !r.pending.is_empty() || now.duration_since(r.last_active) < ROOM_IDLE_TTL
        });
        self.stats.rooms.set(self.rooms.len() as i64);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::metrics::Metrics;
    use std::sync::atomic::AtomicBool;

    fn setup(window_ms: u64) -> (LocalBus, crossbeam_channel::Receiver<ShardCmd>) {
        let (_btx, brx) = crossbeam_channel::unbounded();
        let (stx, srx) = crossbeam_channel::unbounded();
        let fd = Arc::new(crate::sys::eventfd().unwrap());
        let mb = Mailbox::new(stx, fd, Arc::new(AtomicBool::new(false)));
        let cfg = BusConfig {
            window: Duration::from_millis(window_ms),
            max_batch_messages: 3,
            max_batch_bytes: 1 << 20,
        };
        (LocalBus::new(brx, vec![mb], cfg, Metrics::new().bus.clone()), srx)
    }

    fn msg(kind: &str, n: u32) -> NewMessage {
        NewMessage { kind: kind.into(), user: "u".into(), body: format!("{{\"n\":{n}}}") }
    }

    fn decode_batch(d: &Delivery) -> Vec<u64> {
        let f = d.frames[0].as_ref().unwrap();
        // 2-byte header for payloads under 126 bytes, else 4.
        let off = if f[1] & 0x7f == 126 { 4 } else { 2 };
        match envelope::decode_json(&f[off..]).unwrap() {
            ServerMsg::Batch { messages, .. } => messages.iter().map(|m| m.seq).collect(),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn join_ack_then_batches_in_seq_order_and_merged() {
        let (mut bus, srx) = setup(50);
        let room: RoomName = "r".into();
        // Published before anyone joined: numbered, not delivered.
        assert_eq!(bus.publish(room.clone(), msg("chat", 0)).unwrap().1.seq, 1);
        bus.handle(BusCmd::Join { room: room.clone(), shard: 0, slot: 5, generation: 1, proto: Subprotocol::Json });
        match srx.try_recv().unwrap() {
            ShardCmd::JoinAck { slot, seq, .. } => assert_eq!((slot, seq), (5, 1)),
            _ => panic!("expected JoinAck"),
        }
        for n in 1..=2 {
            bus.publish(room.clone(), msg("gift", n)).unwrap();
        }
        // Still inside the window: nothing sent yet.
        assert!(srx.try_recv().is_err());
        bus.flush_due(Instant::now() + Duration::from_millis(60));
        match srx.try_recv().unwrap() {
            ShardCmd::Deliver(d) => {
                assert_eq!(d.messages, 2);
                assert_eq!(decode_batch(&d), vec![2, 3]);
                assert!(d.frames[1].is_none(), "no rkyv member: rkyv not serialized");
            }
            _ => panic!("expected Deliver"),
        }
    }

    #[test]
    fn full_batch_flushes_early_and_window_zero_flushes_per_turn() {
        let (mut bus, srx) = setup(1000);
        let room: RoomName = "r".into();
        bus.handle(BusCmd::Join { room: room.clone(), shard: 0, slot: 1, generation: 1, proto: Subprotocol::Rkyv });
        let _ack = srx.try_recv().unwrap();
        for n in 0..3 {
            bus.publish(room.clone(), msg("chat", n)).unwrap();
        }
        let ShardCmd::Deliver(d) = srx.try_recv().unwrap() else { panic!("expected Deliver") };
        assert_eq!(d.messages, 3);
        assert!(d.frames[0].is_none() && d.frames[1].is_some());

        let (mut bus, srx) = setup(0);
        bus.handle(BusCmd::Join { room: room.clone(), shard: 0, slot: 1, generation: 1, proto: Subprotocol::Json });
        let _ack = srx.try_recv().unwrap();
        bus.publish(room.clone(), msg("chat", 0)).unwrap();
        bus.flush_immediate();
        bus.publish(room.clone(), msg("chat", 1)).unwrap();
        bus.flush_immediate();
        let seqs: Vec<Vec<u64>> = srx
            .try_iter()
            .map(|c| match c {
                ShardCmd::Deliver(d) => decode_batch(&d),
                _ => panic!("expected Deliver"),
            })
            .collect();
        assert_eq!(seqs, vec![vec![1], vec![2]]);
    }

    #[test]
    fn no_interest_stops_deliveries() {
        let (mut bus, srx) = setup(0);
        let room: RoomName = "r".into();
        bus.handle(BusCmd::Join { room: room.clone(), shard: 0, slot: 1, generation: 1, proto: Subprotocol::Json });
        let _ack = srx.try_recv().unwrap();
        bus.handle(BusCmd::NoInterest { room: room.clone(), shard: 0, proto: Subprotocol::Json });
        bus.publish(room.clone(), msg("chat", 0)).unwrap();
        bus.flush_immediate();
        assert!(srx.try_recv().is_err());
    }
}
