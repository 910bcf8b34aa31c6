//! Property tests of the engine's promise, on the engine as the shards drive it (`handle`,
//! `publish`, `poll` with an injected `now`, output shipped per shard in order):
//!
//! for any interleaving of joins, switches, leaves, publishes of every kind, `since` joins,
//! time, link delays and slow consumers, every member receives each must-deliver message of its
//! room from its join on exactly once, in seq order, or inside an explicit gap.
//!
//! The shards are simulated as the real ones behave (shard/members.rs, shard/outbox.rs): a
//! member's room index ([`Rooms`]), a bounded queue per connection that sheds droppable frames
//! when full (keeping the must-deliver-only variant of a mixed batch) and closes the connection
//! as a slow consumer when even that does not fit; a closed client reconnects with `since` = the
//! last seq it read, as the clients do.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use proptest::prelude::*;
use proptest::strategy::ValueTree;
use roomcast_proto::Subprotocol;
use roomcast_proto::envelope::{self, ServerMsg};

use super::{Engine, EngineConfig, LoadBoard, Out};
use crate::bus::{EngineCmd, MustDeliver, NewMessage, RoomName, ShardCmd, Since};
use crate::config::Config;
use crate::metrics::Metrics;
use crate::room::{Interest, Rooms};

const SHARDS: usize = 2;
const SLOTS: usize = 4;
const ROOMS: [&str; 2] = ["a", "b"];
/// gift and system are must-deliver by default; chat and like are droppable.
const KINDS: [&str; 4] = ["gift", "system", "chat", "like"];

#[derive(Debug, Clone)]
enum Op {
    /// A publish of `KINDS[kind]` into `ROOMS[room]`, from any producer (straight to the engine).
    Publish {
        room: usize,
        kind: usize,
    },
    /// Connection `slot` of shard `s` joins `ROOMS[room]` (a switch if it is in a room), with
    /// `since` = the room's seq minus `back` if `since`.
    Join {
        s: usize,
        slot: usize,
        room: usize,
        since: bool,
        back: u64,
    },
    Leave {
        s: usize,
        slot: usize,
    },
    /// Time passes; the engine's turn.
    Tick {
        ms: u64,
    },
    /// Links move, each in order: up to `up` commands shard -> engine, `down` engine -> shard.
    Link {
        s: usize,
        up: usize,
        down: usize,
    },
    /// A connection's client reads `n` queued frames (the others are slow).
    Read {
        s: usize,
        slot: usize,
        n: usize,
    },
}

fn op() -> impl Strategy<Value = Op> {
    let s = 0..SHARDS;
    let slot = 0..SLOTS;
    prop_oneof![
        4 => (0..ROOMS.len(), 0..KINDS.len()).prop_map(|(room, kind)| Op::Publish { room, kind }),
        2 => (s.clone(), slot.clone(), 0..ROOMS.len(), any::<bool>(), 0u64..12)
            .prop_map(|(s, slot, room, since, back)| Op::Join { s, slot, room, since, back }),
        1 => (s.clone(), slot.clone()).prop_map(|(s, slot)| Op::Leave { s, slot }),
        2 => (0u64..12).prop_map(|ms| Op::Tick { ms }),
        3 => (s.clone(), 0usize..4, 0usize..6).prop_map(|(s, up, down)| Op::Link { s, up, down }),
        3 => (s, slot, 0usize..4).prop_map(|(s, slot, n)| Op::Read { s, slot, n }),
    ]
}

/// A frame waiting in a connection's queue, with what a slow consumer keeps of it.
struct Queued {
    frame: Bytes,
    must: MustDeliver,
}

/// What one membership of one connection received.
#[derive(Debug, Default, Clone)]
struct Session {
    room: Option<RoomName>,
    /// Must-deliver messages are owed after this seq: the join's `since` if it is not past the
    /// acknowledged seq, else the acknowledged seq.
    from: u64,
    /// Seqs read, every kind, in the order read.
    seen: Vec<u64>,
    /// Explicit gaps (inclusive ranges) read.
    gaps: Vec<(u64, u64)>,
}

#[derive(Default)]
struct Conn {
    joining: Option<(RoomName, Option<u64>)>,
    /// The current membership and this connection's index in its room's member list.
    session: Session,
    idx: u32,
    generation: u32,
    queue: VecDeque<Queued>,
}

impl Conn {
    /// The client's position in its room: the last seq it read, or where its membership began.
    fn position(&self) -> u64 {
        self.session.seen.last().copied().unwrap_or(self.session.from)
    }
}

struct Shard {
    rooms: Rooms,
    conns: Vec<Conn>,
    to_engine: VecDeque<EngineCmd>,
    from_engine: VecDeque<ShardCmd>,
}

struct Sim {
    e: Engine,
    out: Out,
    now: Instant,
    shards: Vec<Shard>,
    /// Must-deliver seqs the engine acknowledged, per room.
    must: HashMap<RoomName, Vec<u64>>,
    /// Finished memberships, with the seq up to which they are owed everything.
    finished: Vec<(Session, u64)>,
    queue_frames: usize,
    slow_closes: usize,
}

fn decode(f: &Bytes) -> ServerMsg {
    // 2-byte header for payloads under 126 bytes, 4 up to 64 KiB.
    let off = if f[1] & 0x7f == 126 { 4 } else { 2 };
    envelope::decode_json(&f[off..]).expect("the engine's frames decode")
}

fn read_into(session: &mut Session, f: &Bytes) {
    match decode(f) {
        ServerMsg::Batch { messages, .. } => session.seen.extend(messages.iter().map(|m| m.seq)),
        ServerMsg::Gap { from, to, .. } => session.gaps.push((from, to)),
        other => panic!("unexpected frame for a member: {other:?}"),
    }
}

impl Sim {
    fn new(history: usize, window_ms: u64, batch: usize, queue_frames: usize, adaptive: bool) -> Self {
        let mut cfg = Config::default();
        cfg.fanout.merge_window_ms = window_ms;
        cfg.adaptive.enabled = adaptive;
        cfg.presence.interval_ms = 0;
        cfg.history.must_deliver = history;
        let mut ec = EngineConfig::from_config(&cfg);
        ec.max_batch_messages = batch;
        let load = Arc::new(LoadBoard::new(SHARDS));
        let now = Instant::now();
        let e = Engine::new(0, 1, SHARDS, ec, Metrics::new().bus.clone(), load, now, 1_700_000_000_000_000);
        let shards = (0..SHARDS)
            .map(|_| Shard {
                rooms: Rooms::default(),
                conns: (0..SLOTS).map(|_| Conn::default()).collect(),
                to_engine: VecDeque::new(),
                from_engine: VecDeque::new(),
            })
            .collect();
        Self {
            e,
            out: Out::new(SHARDS),
            now,
            shards,
            must: HashMap::new(),
            finished: Vec::new(),
            queue_frames,
            slow_closes: 0,
        }
    }

    fn room_seq(&self, room: &str) -> u64 {
        self.e.rooms.get(room).map_or(0, |r| r.seq)
    }

    /// The connection leaves its room (or cancels its join), as shard/members.rs does; the
    /// membership ends owed everything up to what it read.
    fn leave(&mut self, s: usize, slot: usize) {
        let sh = &mut self.shards[s];
        let c = &mut sh.conns[slot];
        if let Some((r, _)) = c.joining.take() {
            sh.to_engine.push_back(EngineCmd::Left { room: r.clone() });
            if sh.rooms.cancel_join(&r, Subprotocol::Json) == Interest::Dropped {
                sh.to_engine.push_back(EngineCmd::NoInterest { room: r, shard: s as u16, proto: Subprotocol::Json });
            }
        }
        if let Some(r) = c.session.room.clone() {
            sh.to_engine.push_back(EngineCmd::Left { room: r.clone() });
            let (interest, moved) = sh.rooms.leave(&r, slot as u32, c.idx, Subprotocol::Json);
            if interest == Interest::Dropped {
                sh.to_engine.push_back(EngineCmd::NoInterest { room: r, shard: s as u16, proto: Subprotocol::Json });
            }
            // Whatever was not read goes with the membership (a leave, or a close).
            c.queue.clear();
            let session = std::mem::take(&mut c.session);
            let upto = session.seen.last().copied().unwrap_or(session.from);
            let idx = c.idx;
            if let Some(mv) = moved {
                sh.conns[mv as usize].idx = idx;
            }
            self.finished.push((session, upto));
        }
    }

    fn join(&mut self, s: usize, slot: usize, room: RoomName, since: Option<u64>) {
        self.leave(s, slot);
        let sh = &mut self.shards[s];
        let c = &mut sh.conns[slot];
        c.generation += 1;
        c.joining = Some((room.clone(), since));
        sh.rooms.begin_join(&room, Subprotocol::Json);
        sh.to_engine.push_back(EngineCmd::Join {
            room,
            shard: s as u16,
            slot: slot as u32,
            generation: c.generation,
            proto: Subprotocol::Json,
            since: since.map(|seq| Since { seq, epoch: None }),
        });
    }

    fn publish(&mut self, room: usize, kind: usize) {
        let room: RoomName = ROOMS[room].into();
        let msg = NewMessage { kind: KINDS[kind].into(), user: String::new(), body: "{\"n\":1}".into(), idem: None };
        // Refused publishes (limits) are not owed to anyone; the publisher was told.
        if let Ok(ack) = self.e.publish(&room, msg, self.now, &mut self.out)
            && kind < 2
        {
            self.must.entry(room).or_default().push(ack.seq);
        }
    }

    /// Engine output reaches shard `s`, `n` commands at most, in order.
    fn deliver(&mut self, s: usize, n: usize) {
        self.shards[s].from_engine.extend(self.out.shard[s].drain(..));
        for _ in 0..n {
            let Some(cmd) = self.shards[s].from_engine.pop_front() else { break };
            self.apply(s, cmd);
        }
    }

    fn apply(&mut self, s: usize, cmd: ShardCmd) {
        match cmd {
            ShardCmd::JoinAck(a) => {
                let crate::bus::JoinAck { slot, generation, room, seq, replay, reset, .. } = *a;
                assert!(reset.is_none(), "no position here is void, yet the join of {room} was reset");
                let sh = &mut self.shards[s];
                let c = &mut sh.conns[slot as usize];
                let Some((want, since)) = c.joining.clone() else { return };
                if c.generation != generation || want != room {
                    return;
                }
                c.joining = None;
                c.idx = sh.rooms.complete_join(&room, slot);
                c.session = Session {
                    room: Some(room),
                    from: since.filter(|&x| x <= seq).unwrap_or(seq),
                    seen: Vec::new(),
                    gaps: Vec::new(),
                };
                // The replay goes out right after `joined`, ahead of any live batch (it is
                // credited against the queue bound: not shed).
                for f in &replay {
                    read_into(&mut c.session, f);
                }
            }
            ShardCmd::Deliver(d) => {
                let Some(members) = self.shards[s].rooms.members(&d.room) else { return };
                let members = members.to_vec();
                let frame = d.frames[Subprotocol::Json.index()].clone().expect("a JSON member wants JSON frames");
                for slot in members {
                    let c = &mut self.shards[s].conns[slot as usize];
                    let mut q = Queued { frame: frame.clone(), must: d.must_deliver.clone() };
                    if c.queue.len() >= self.queue_frames {
                        // Behind: keep only what must be delivered, of the queue and of this frame.
                        c.queue = c.queue.drain(..).filter_map(shed).collect();
                        match shed(q) {
                            Some(kept) => q = kept,
                            None => continue,
                        }
                        if c.queue.len() >= self.queue_frames {
                            // Slow consumer: closed (4000); the client reconnects with `since`.
                            self.slow_closes += 1;
                            let (room, since) = (d.room.clone(), c.position());
                            self.join(s, slot as usize, room, Some(since));
                            continue;
                        }
                    }
                    c.queue.push_back(q);
                }
            }
            ShardCmd::JoinRefused(r) => panic!("join refused: {}", r.reason),
            _ => {}
        }
    }

    fn read(&mut self, s: usize, slot: usize, n: usize) {
        let c = &mut self.shards[s].conns[slot];
        for _ in 0..n {
            let Some(q) = c.queue.pop_front() else { break };
            read_into(&mut c.session, &q.frame);
        }
    }

    fn run(&mut self, ops: &[Op]) {
        for op in ops {
            match *op {
                Op::Publish { room, kind } => self.publish(room, kind),
                Op::Join { s, slot, room, since, back } => {
                    let since = since.then(|| self.room_seq(ROOMS[room]).saturating_sub(back));
                    self.join(s, slot, ROOMS[room].into(), since);
                }
                Op::Leave { s, slot } => self.leave(s, slot),
                Op::Tick { ms } => {
                    self.now += Duration::from_millis(ms);
                    self.e.poll(self.now, &mut self.out);
                }
                Op::Link { s, up, down } => {
                    for _ in 0..up {
                        let Some(cmd) = self.shards[s].to_engine.pop_front() else { break };
                        self.e.handle(cmd, self.now, &mut self.out);
                    }
                    self.deliver(s, down);
                }
                Op::Read { s, slot, n } => self.read(s, slot, n),
            }
        }
        // Everything in flight arrives, the last windows close, every client reads all it has
        // (slow consumers' reconnections included), until nothing moves.
        loop {
            let mut moved = false;
            for s in 0..SHARDS {
                while let Some(cmd) = self.shards[s].to_engine.pop_front() {
                    self.e.handle(cmd, self.now, &mut self.out);
                    moved = true;
                }
            }
            self.now += Duration::from_secs(1);
            self.e.poll(self.now, &mut self.out);
            for s in 0..SHARDS {
                if !self.out.shard[s].is_empty() || !self.shards[s].from_engine.is_empty() {
                    moved = true;
                }
                self.deliver(s, usize::MAX);
                for slot in 0..SLOTS {
                    self.read(s, slot, usize::MAX);
                }
            }
            if !moved {
                break;
            }
        }
        // Members at the end are owed everything up to their room's last seq.
        for s in 0..SHARDS {
            for slot in 0..SLOTS {
                let c = &mut self.shards[s].conns[slot];
                assert!(c.joining.is_none(), "a join was never answered");
                if let Some(room) = c.session.room.clone() {
                    let upto = self.e.rooms[&room].seq;
                    self.finished.push((std::mem::take(&mut c.session), upto));
                }
            }
        }
    }

    /// Every membership: the seqs it read are strictly increasing (no duplicate, in order), its
    /// gaps are in order with them and after its start, and every must-deliver message of its
    /// room after its start and up to `upto` was read or falls inside a gap.
    fn check(&self) -> usize {
        let mut checked = 0;
        for (session, upto) in &self.finished {
            let room = session.room.as_ref().expect("a finished membership has a room");
            let seen = &session.seen;
            for w in seen.windows(2) {
                assert!(w[0] < w[1], "{room}: seq {} read after {} (from {}): {seen:?}", w[1], w[0], session.from);
            }
            let first_live = seen.first().copied().unwrap_or(u64::MAX);
            let mut last_gap = session.from;
            for &(a, b) in &session.gaps {
                assert!(a > last_gap && a <= b, "{room}: gap {a}..={b} out of order (from {})", session.from);
                assert!(b < first_live, "{room}: gap {a}..={b} after a message read ({first_live})");
                last_gap = b;
            }
            let must = self.must.get(room).map_or(&[][..], Vec::as_slice);
            for &m in must.iter().filter(|&&m| m > session.from && m <= *upto) {
                let in_gap = session.gaps.iter().any(|&(a, b)| (a..=b).contains(&m));
                assert!(
                    in_gap || seen.binary_search(&m).is_ok(),
                    "{room}: must-deliver seq {m} neither read nor in a gap (from {}, up to {upto}): read {seen:?}, gaps {:?}",
                    session.from,
                    session.gaps
                );
                checked += 1;
            }
            // Nothing from before the membership's start.
            if let Some(&first) = seen.first() {
                assert!(first > session.from, "{room}: read seq {first}, at or before its start {}", session.from);
            }
        }
        checked
    }
}

/// What a slow consumer keeps of a queued frame: all of it, the must-deliver-only variant, or
/// nothing.
fn shed(q: Queued) -> Option<Queued> {
    match q.must {
        MustDeliver::All => Some(q),
        MustDeliver::None => None,
        MustDeliver::Some { frames, .. } => {
            frames[Subprotocol::Json.index()].clone().map(|frame| Queued { frame, must: MustDeliver::All })
        }
    }
}

proptest! {
    // 1,000 interleavings of up to 400 steps: about a second in a debug build.
    #![proptest_config(ProptestConfig::with_cases(1000))]

    #[test]
    fn every_member_gets_each_must_deliver_message_once_in_order_or_a_gap(
        ops in proptest::collection::vec(op(), 1..400),
        history in prop_oneof![Just(10_000usize), 1usize..8],
        window_ms in 0u64..20,
        batch in 1usize..6,
        queue_frames in 1usize..6,
        adaptive in any::<bool>(),
    ) {
        let mut sim = Sim::new(history, window_ms, batch, queue_frames, adaptive);
        sim.run(&ops);
        sim.check();
    }
}

/// The property's oracle can fail, and the run reaches what it claims to test: one long fixed
/// interleaving checks many deliveries, closes slow consumers and reports gaps.
#[test]
fn the_property_run_exercises_slow_consumers_and_gaps() {
    let mut runner = proptest::test_runner::TestRunner::deterministic();
    let strategy = proptest::collection::vec(op(), 3000);
    let ops = strategy.new_tree(&mut runner).expect("a value").current();
    let mut sim = Sim::new(3, 5, 3, 2, false);
    sim.run(&ops);
    let checked = sim.check();
    let gaps: usize = sim.finished.iter().map(|(s, _)| s.gaps.len()).sum();
    assert!(checked >= 100, "{checked} must-deliver deliveries checked");
    assert!(sim.slow_closes >= 5, "{} slow consumers closed", sim.slow_closes);
    assert!(gaps >= 5, "{gaps} gaps reported");
    // The oracle fails when a must-deliver message is lost: forget one read somewhere.
    let must = sim.must.clone();
    let (victim, at) = sim
        .finished
        .iter()
        .enumerate()
        .find_map(|(i, (s, upto))| {
            let owed = must.get(s.room.as_ref()?)?;
            let at = s.seen.iter().position(|m| m <= upto && owed.contains(m))?;
            s.gaps.is_empty().then_some((i, at))
        })
        .expect("a membership that read a must-deliver message");
    sim.finished[victim].0.seen.remove(at);
    let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| sim.check()));
    assert!(r.is_err(), "the oracle missed a lost must-deliver message");
}
