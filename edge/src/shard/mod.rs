//! One shard: a thread pinned to a CPU that owns one io_uring, its listening socket (SO_REUSEPORT),
//! its connections (direct descriptors, never normal fds) and its part of every room.
//!
//! A loop turn: drain the mailbox (deliveries, join acks), reap completions (accepts, receives,
//! sends, closes), start a send on every connection that got something to write and has none in
//! flight, run the timers once in a while, then submit everything queued with one
//! `io_uring_enter` that also waits for the next completion.
//!
//! A delivery is one frame shared by every member: the shard wraps it once in an `Rc` (no atomic
//! traffic per member) and each member's queue holds a clone. A connection has at most one send
//! in flight; frames queued behind it go out together in one `writev`. That keeps per-connection
//! order without locks and turns bursts into fewer, fuller writes, which is what the kernel's
//! per-write cost rewards.

mod conn;

use std::io;
use std::os::fd::{AsRawFd, OwnedFd};
use std::rc::Rc;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU8, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use crossbeam_channel::Receiver;
use io_uring::{IoUring, cqueue, types};
use roomcast_proto::envelope::{self, ClientMsg, ServerMsg};
use roomcast_proto::handshake::{self, HandshakeError, Upgrade};
use roomcast_proto::ws::{self, CloseReason, Decoder, Event, Limits, OpCode};
use roomcast_proto::{Subprotocol, envelope::validate_room};
use socket2::Socket;

use crate::bus::{
    Delivery, EngineCmd, Mail, MailError, Mailbox, MustDeliver, NewMessage, Reply, RoomName, ShardCmd, engine_of,
};
use crate::config::Config;
use crate::engine::{Engine, LoadBoard, Out};
use crate::metrics::ShardStats;
use crate::room::{Interest, Rooms};
use crate::uring::{BufRing, OpKind, Sq, Token, UringError};

use conn::{Action, Closing, Conn, Keep, OutFrame, Phase};

/// Buffer group id of the shard's receive buffers.
const BGID: u16 = 0;
/// How long a closing connection may take to flush its close frame before it is cut.
const CLOSE_FLUSH_TIMEOUT: Duration = Duration::from_secs(2);
/// How long shutdown waits for connections to take their 1001 close.
const SHUTDOWN_TIMEOUT: Duration = Duration::from_secs(3);
/// Longest a shard sleeps in the kernel without a completion (drives the timers).
const TICK: Duration = Duration::from_millis(100);
/// How soon a shard retries mail a full peer mailbox refused.
const STALLED_RETRY: Duration = Duration::from_millis(1);

/// A goaway tells its client to wait a random time below this before reconnecting, so the
/// clients of one shard's turn do not arrive at dispatch in the same millisecond.
pub const GOAWAY_MAX_DELAY_MS: u64 = 1000;

/// Everything a shard thread needs; built on the main thread.
pub struct ShardSpec {
    pub id: u16,
    pub cpu: Option<usize>,
    pub listener: Socket,
    pub cfg: Arc<Config>,
    /// This shard's room engine (engine `id`: the rooms that hash to it), or None when the
    /// engines run beside the shards on threads of their own.
    pub engine: Option<Engine>,
    /// Every engine's mailbox, by engine id: the shards' own mailboxes when the shards host
    /// the engines (this one's included).
    pub engines: Vec<Mailbox>,
    pub load: Arc<LoadBoard>,
    pub mailbox: Receiver<Mail>,
    pub doorbell: Arc<OwnedFd>,
    pub parked: Arc<AtomicBool>,
    pub stats: ShardStats,
    pub max_conns: u32,
    /// The health policy's state (crate::health), and whether to refuse handshakes while it is
    /// `overloaded` (2).
    pub health: Arc<AtomicU8>,
    pub refuse_when_overloaded: bool,
}

/// Builds the ring, probes it and registers its tables. Done on the shard thread itself
/// (SINGLE_ISSUER ties the ring to the thread that creates it), but errors come back to `main`
/// through `ready` so a missing kernel feature fails the start with a clear message.
pub fn run(spec: ShardSpec, ready: std::sync::mpsc::Sender<Result<(), UringError>>) {
    if let Some(cpu) = spec.cpu
        && let Err(e) = crate::sys::pin_current_thread(cpu)
    {
        tracing::warn!(shard = spec.id, cpu, error = %e, "cannot pin shard thread");
    }
    let mut shard = match Shard::new(spec) {
        Ok(s) => {
            let _ = ready.send(Ok(()));
            s
        }
        Err(e) => {
            let _ = ready.send(Err(e));
            return;
        }
    };
    if let Err(e) = shard.run() {
        tracing::error!(shard = shard.id, error = %e, "shard stopped on an io_uring error");
    }
}

struct Shard {
    // Field order matters: the ring is dropped before the buffers it may still point into.
    ring: IoUring,
    bufring: BufRing,
    id: u16,
    cfg: Arc<Config>,
    limits: Limits,
    /// Dropped (closed) when draining starts.
    listener: Option<Socket>,
    /// A listener being retired: kept open until its multishot accept's last completion (an
    /// in-flight operation owns its file), then closed.
    retiring: Option<Socket>,
    engine: Option<Engine>,
    /// The engine's output, per shard; what a full mailbox refused waits here.
    out: Out,
    /// Connections' signalling for each engine, gathered during the turn.
    sig: Vec<Vec<EngineCmd>>,
    engines: Vec<Mailbox>,
    load: Arc<LoadBoard>,
    /// A peer's mailbox was full this turn: come back soon to retry.
    stalled: bool,
    mailbox: Receiver<Mail>,
    doorbell: Arc<OwnedFd>,
    doorbell_buf: Box<u64>,
    parked: Arc<AtomicBool>,
    stats: ShardStats,
    conns: Vec<Option<Conn>>,
    rooms: Rooms,
    dirty: Vec<u32>,
    cqes: Vec<(u64, i32, u32)>,
    actions: Vec<Action>,
    next_gen: u32,
    accept_armed: bool,
    accepting: bool,
    shutdown_at: Option<Instant>,
    epoch: Instant,
    last_sweep: Instant,
    open: u32,
    /// Draining: where `goaway` sends clients.
    drain_url: Option<Arc<str>>,
    health: Arc<AtomicU8>,
    refuse_when_overloaded: bool,
    rng: u64,
    /// Operations the SQ could not take this turn (the kernel pushed back): retried next turn.
    retry: Vec<(Retry, u32)>,
}

/// An operation to queue again next turn.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Retry {
    Send,
    Recv,
    Release,
    Accept,
    Doorbell,
}

impl Shard {
    fn new(spec: ShardSpec) -> Result<Self, UringError> {
        let ring = crate::uring::build_ring(spec.cfg.uring.sq_entries)?;
        crate::uring::probe(&ring)?;
        crate::uring::register_files(&ring, spec.max_conns)?;
        let bufring = BufRing::new(&ring, BGID, spec.cfg.uring.recv_buffers, spec.cfg.uring.recv_buffer_size)?;
        let limits = Limits { max_frame: spec.cfg.ws.max_message, max_message: spec.cfg.ws.max_message };
        let now = Instant::now();
        Ok(Self {
            ring,
            bufring,
            id: spec.id,
            cfg: spec.cfg,
            limits,
            listener: Some(spec.listener),
            retiring: None,
            engine: spec.engine,
            out: Out::new(spec.engines.len()),
            sig: (0..spec.engines.len()).map(|_| Vec::new()).collect(),
            engines: spec.engines,
            load: spec.load,
            stalled: false,
            mailbox: spec.mailbox,
            doorbell: spec.doorbell,
            doorbell_buf: Box::new(0),
            parked: spec.parked,
            stats: spec.stats,
            conns: Vec::new(),
            rooms: Rooms::default(),
            dirty: Vec::new(),
            cqes: Vec::with_capacity(1024),
            actions: Vec::new(),
            next_gen: 1,
            accept_armed: false,
            accepting: true,
            shutdown_at: None,
            epoch: now,
            last_sweep: now,
            open: 0,
            drain_url: None,
            health: spec.health,
            refuse_when_overloaded: spec.refuse_when_overloaded,
            retry: Vec::new(),
            rng: (u64::from(spec.id) << 32)
                ^ (now.elapsed().as_nanos() as u64)
                ^ 0x9e37_79b9_7f4a_7c15
                ^ std::process::id() as u64,
        })
    }

    fn run(&mut self) -> io::Result<()> {
        self.arm_accept();
        self.arm_doorbell();
        tracing::debug!(shard = self.id, "shard running");
        loop {
            self.drain_mailbox();
            self.reap();
            self.run_retries();
            self.engine_turn();
            self.flush_dirty();
            self.tick();
            if let Some(at) = self.shutdown_at
                && (self.open == 0 || Instant::now() >= at)
            {
                tracing::info!(shard = self.id, left = self.open, "shard stopped");
                return Ok(());
            }
            // Park: announce it, then re-check the mailbox so a message sent just before the
            // announcement is not missed (the sender rings the doorbell only if it saw us parked).
            self.parked.store(true, Ordering::SeqCst);
            // Always enter with GETEVENTS (want = 1): with DEFER_TASKRUN that is the only way
            // completions get posted. With mail waiting, the timeout is zero: just a poll.
            let own_sig = self.engine.is_some() && !self.sig[usize::from(self.id)].is_empty();
            let ts = if self.mailbox.is_empty() && !own_sig {
                let mut wait = TICK;
                if let Some(at) = self.engine.as_ref().and_then(Engine::poll_timeout) {
                    wait = wait.min(at.saturating_duration_since(Instant::now()));
                }
                if self.stalled {
                    wait = wait.min(STALLED_RETRY);
                }
                types::Timespec::from(wait)
            } else {
                self.parked.store(false, Ordering::SeqCst);
                types::Timespec::new()
            };
            let args = types::SubmitArgs::new().timespec(&ts);
            match self.ring.submitter().submit_with_args(1, &args) {
                Ok(_) => {}
                Err(e) if matches!(e.raw_os_error(), Some(libc::ETIME | libc::EINTR | libc::EBUSY)) => {}
                Err(e) if matches!(e.raw_os_error(), Some(libc::EAGAIN | libc::ENOMEM)) => {
                    // The kernel is short of resources: back off a little, keep serving.
                    tracing::warn!(shard = self.id, error = %e, "io_uring_enter pushed back");
                    std::thread::sleep(Duration::from_millis(1));
                }
                Err(e) => return Err(e),
            }
            self.parked.store(false, Ordering::SeqCst);
        }
    }

    fn run_retries(&mut self) {
        if self.retry.is_empty() {
            return;
        }
        for (what, slot) in std::mem::take(&mut self.retry) {
            match what {
                Retry::Send => {
                    let ready = matches!(self.conns.get(slot as usize), Some(Some(c))
                        if c.in_flight == 0 && !c.out.is_empty() && c.closing != Closing::Abort && !c.close_issued);
                    if ready {
                        self.issue_send(slot);
                    }
                }
                Retry::Recv => self.arm_recv(slot),
                Retry::Release => self.maybe_release(slot),
                Retry::Accept => self.arm_accept(),
                Retry::Doorbell => self.arm_doorbell(),
            }
        }
    }

    fn now_ms(&self) -> u64 {
        self.epoch.elapsed().as_millis() as u64
    }

    // ---- arming -------------------------------------------------------------------------------

    fn arm_accept(&mut self) {
        if self.accept_armed || !self.accepting {
            return;
        }
        let Some(fd) = self.listener.as_ref().map(AsRawFd::as_raw_fd) else { return };
        match Sq::new(&mut self.ring).accept_multi(fd, Token::new(OpKind::Accept, 0, 0)) {
            Ok(()) => self.accept_armed = true,
            Err(_) => self.retry.push((Retry::Accept, 0)),
        }
    }

    fn arm_doorbell(&mut self) {
        let fd = self.doorbell.as_raw_fd();
        let buf: *mut u64 = &mut *self.doorbell_buf;
        // SAFETY: `doorbell_buf` is a heap allocation owned by the shard, which outlives the ring's
        // operations (the ring is dropped first); it is only re-armed after the last read completed.
        if unsafe { Sq::new(&mut self.ring).read_eventfd(fd, buf, Token::new(OpKind::Wake, 0, 0)) }.is_err() {
            self.retry.push((Retry::Doorbell, 0));
        }
    }

    fn arm_recv(&mut self, slot: u32) {
        let Some(c) = self.conns.get_mut(slot as usize).and_then(Option::as_mut) else { return };
        if c.recv_armed || c.closing != Closing::No {
            return;
        }
        let tok = Token::new(OpKind::Recv, c.generation, slot);
        match Sq::new(&mut self.ring).recv_multi(slot, BGID, tok) {
            Ok(()) => c.recv_armed = true,
            Err(_) => self.retry.push((Retry::Recv, slot)),
        }
    }

    // ---- mailbox ------------------------------------------------------------------------------

    fn drain_mailbox(&mut self) {
        let now = Instant::now();
        while let Ok(mail) = self.mailbox.try_recv() {
            match mail {
                Mail::Turn { engine, shard } => {
                    if let Some(e) = self.engine.as_mut() {
                        for cmd in engine {
                            e.handle(cmd, now, &mut self.out);
                        }
                    }
                    for cmd in shard {
                        self.apply(cmd);
                    }
                }
                Mail::Engine(cmd) => {
                    if let Some(e) = self.engine.as_mut() {
                        e.handle(cmd, now, &mut self.out);
                    }
                }
                Mail::Shard(cmd) => self.apply(cmd),
            }
        }
    }

    /// One engine turn: this shard's own signalling for its engine, what is due, then the
    /// output: applied here for this shard, one mail per peer for the others.
    fn engine_turn(&mut self) {
        let now = Instant::now();
        let me = usize::from(self.id);
        let hosted = self.engine.is_some();
        if let Some(e) = self.engine.as_mut() {
            for cmd in std::mem::take(&mut self.sig[me]) {
                e.handle(cmd, now, &mut self.out);
            }
            e.poll(now, &mut self.out);
            for cmd in std::mem::take(&mut self.out.shard[me]) {
                self.apply(cmd);
            }
        }
        self.stalled = false;
        for d in 0..self.engines.len() {
            if (hosted && d == me) || (self.sig[d].is_empty() && self.out.shard[d].is_empty()) {
                continue;
            }
            // Hosted: engine d lives on shard d, so this one mail carries both our signalling for
            // its engine and our engine's output for its connections. Beside: only signalling.
            let mail =
                Mail::Turn { engine: std::mem::take(&mut self.sig[d]), shard: std::mem::take(&mut self.out.shard[d]) };
            match self.engines[d].try_send(mail) {
                Ok(()) => {}
                Err((MailError::Full, Mail::Turn { engine, shard })) => {
                    // The peer is behind: keep the mail (in order) for the next turn.
                    self.sig[d] = engine;
                    self.out.shard[d] = shard;
                    self.stalled = true;
                }
                Err(_) => {}
            }
        }
    }

    /// Sends a connection's signalling to the engine that owns `room` (this turn's mail).
    fn signal(&mut self, room: &str, cmd: EngineCmd) {
        let e = engine_of(room, self.engines.len());
        self.sig[e].push(cmd);
    }

    fn apply(&mut self, cmd: ShardCmd) {
        {
            match cmd {
                ShardCmd::Deliver(d) => self.deliver(&d),
                ShardCmd::JoinAck { slot, generation, room, seq, replay } => {
                    self.join_ack(slot, generation, room, seq, replay);
                }
                ShardCmd::Published { slot, generation, room, result } => {
                    let msg = match result {
                        Ok(ack) => ServerMsg::Published { room: room.to_string(), seq: ack.seq, ts_us: ack.ts_us },
                        Err(e) => ServerMsg::Error { code: "publish_refused".into(), message: e.to_string() },
                    };
                    if self.live(slot, generation) {
                        self.send_msg(slot, &msg);
                    }
                }
                ShardCmd::JoinRefused { slot, generation, room, reason } => {
                    self.join_refused(slot, generation, &room, reason);
                }
                ShardCmd::Drain { url, period_ms } => self.begin_drain(url, period_ms),
                ShardCmd::Shutdown => self.begin_shutdown(),
            }
        }
    }

    fn live(&self, slot: u32, generation: u32) -> bool {
        matches!(self.conns.get(slot as usize), Some(Some(c)) if c.generation == generation && c.closing == Closing::No)
    }

    fn deliver(&mut self, d: &Delivery) {
        let now_ms = self.now_ms();
        let Some(members) = self.rooms.members(&d.room) else { return };
        let frames: [Option<Rc<OutFrame>>; 2] = std::array::from_fn(|p| {
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
                    })),
                    None => Keep::Nothing,
                },
            };
            Some(Rc::new(OutFrame { bytes, messages: d.messages, must, queued_ms: now_ms }))
        });
        let max_bytes = self.cfg.send.max_queue_bytes;
        let max_frames = self.cfg.send.max_queue_frames;
        let max_delay = self.cfg.send.max_queue_delay_ms;
        let mut slow = Vec::new();
        for &slot in members {
            let Some(Some(c)) = self.conns.get_mut(slot as usize) else { continue };
            if c.closing != Closing::No {
                continue;
            }
            let Some(f) = &frames[c.proto.index()] else { continue };
            let mut f = f.clone();
            // Behind by bytes, by frames, or by time (the oldest unsent frame waited too long:
            // its reader cannot keep up, and gifts must not queue behind seconds of chat).
            let late = c.oldest_unsent_ms().is_some_and(|t| now_ms.saturating_sub(t) > max_delay);
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
                self.dirty.push(slot);
            }
        }
        for slot in slow {
            self.stats.slow_consumer_closes.inc();
            tracing::info!(shard = self.id, slot, "closing slow consumer (4000)");
            // The close frame replaces whatever was not yet handed to the kernel: the client
            // recovers it with `since`.
            if let Some(Some(c)) = self.conns.get_mut(slot as usize) {
                c.drop_unsent(c.in_flight as usize);
            }
            self.close_with(slot, 4000, "slow consumer: reconnect with since");
        }
    }

    // ---- completions --------------------------------------------------------------------------

    fn reap(&mut self) {
        let mut cqes = std::mem::take(&mut self.cqes);
        cqes.clear();
        cqes.extend(self.ring.completion().map(|e| (e.user_data(), e.result(), e.flags())));
        for &(ud, res, flags) in &cqes {
            let Some(tok) = Token::decode(ud) else { continue };
            match tok.kind {
                OpKind::Accept => self.on_accept(res, flags),
                OpKind::Recv => self.on_recv(tok, res, flags),
                OpKind::Send => self.on_send(tok, res),
                OpKind::Close => self.on_close(tok, res),
                OpKind::Wake => {
                    if res < 0 && res != -libc::EAGAIN && res != -libc::EINTR {
                        tracing::error!(shard = self.id, error = %io::Error::from_raw_os_error(-res), "doorbell read failed");
                    }
                    self.arm_doorbell();
                }
                OpKind::Cancel | OpKind::Shutdown => {}
            }
        }
        self.cqes = cqes;
    }

    fn on_accept(&mut self, res: i32, flags: u32) {
        if !cqueue::more(flags) {
            self.accept_armed = false;
            // The accept's last completion: a retired listener can be closed now.
            if let Some(l) = self.retiring.take() {
                drop(l);
                tracing::debug!(shard = self.id, "listener closed");
            }
        }
        if res < 0 {
            self.stats.accept_errors.inc();
            if res == -libc::ENFILE {
                tracing::warn!(shard = self.id, open = self.open, "direct descriptor table full; connection refused");
            } else if res != -libc::ECANCELED {
                tracing::warn!(shard = self.id, error = %io::Error::from_raw_os_error(-res), "accept failed");
            }
            if res != -libc::ECANCELED {
                self.arm_accept();
            }
            return;
        }
        let slot = res as u32;
        if !self.accepting {
            // Shutting down: the connection got in before the cancel. Close it.
            let _ = Sq::new(&mut self.ring).close_fixed(slot, Token::new(OpKind::Cancel, 0, slot));
            return;
        }
        let generation = self.next_gen;
        self.next_gen = (self.next_gen + 1) & Token::GENERATION_MASK;
        if self.next_gen == 0 {
            self.next_gen = 1;
        }
        let idx = slot as usize;
        if idx >= self.conns.len() {
            self.conns.resize_with(idx + 1, || None);
        }
        debug_assert!(self.conns[idx].is_none(), "kernel reused a slot we have not released");
        self.conns[idx] = Some(Conn::new(generation, self.now_ms()));
        self.open += 1;
        self.stats.accepted.inc();
        self.stats.connections.inc();
        self.arm_recv(slot);
        if !self.accept_armed {
            self.arm_accept();
        }
    }

    fn on_recv(&mut self, tok: Token, res: i32, flags: u32) {
        let slot = tok.slot;
        let more = cqueue::more(flags);
        let bid = cqueue::buffer_select(flags);
        let Some(Some(c)) = self.conns.get_mut(slot as usize) else {
            if let Some(bid) = bid {
                self.bufring.recycle(bid);
            }
            return;
        };
        if c.generation != tok.generation {
            if let Some(bid) = bid {
                self.bufring.recycle(bid);
            }
            return;
        }
        if !more {
            c.recv_armed = false;
        }
        if res <= 0 {
            if let Some(bid) = bid {
                self.bufring.recycle(bid);
            }
            if c.closing != Closing::No {
                // Whatever ended the receive (ECANCELED, ENOBUFS, EOF...), a closing
                // connection moves on to its release: re-arming is refused while closing, so
                // waiting for anything else here would leak the slot.
                self.maybe_release(slot);
            } else if res == -libc::ENOBUFS {
                // Every receive buffer is in use: this shard is behind. Re-arm; the buffers
                // come back as soon as the completions ahead of this one are processed.
                if !more {
                    self.arm_recv(slot);
                }
            } else {
                // 0: the peer closed; <0: reset or error.
                self.abort(slot);
            }
            return;
        }
        let Some(bid) = bid else {
            self.abort(slot);
            return;
        };
        c.last_rx_ms = self.epoch.elapsed().as_millis() as u64;
        if c.closing != Closing::No {
            // Input after we decided to close is ignored (the close handshake is best effort).
            self.bufring.recycle(bid);
            self.maybe_release(slot);
            return;
        }
        let data = self.bufring.get_mut(bid, res as usize);
        match c.phase {
            Phase::Handshake => {
                // Bounded: the parser refuses (431) a request that passes MAX_REQUEST without
                // ending, so `hs` never holds more than that plus one receive buffer.
                c.hs.extend_from_slice(data);
                self.bufring.recycle(bid);
                self.on_handshake_bytes(slot);
            }
            Phase::Open => {
                let mut actions = std::mem::take(&mut self.actions);
                let r = c.decode(data, &mut actions);
                self.bufring.recycle(bid);
                self.handle_actions(slot, &mut actions, r);
                self.actions = actions;
            }
        }
        if !more {
            self.arm_recv(slot);
        }
    }

    fn on_send(&mut self, tok: Token, res: i32) {
        let slot = tok.slot;
        let Some(Some(c)) = self.conns.get_mut(slot as usize) else { return };
        if c.generation != tok.generation {
            return;
        }
        let in_flight = c.in_flight;
        c.in_flight = 0;
        if res <= 0 {
            if res != -libc::ECANCELED {
                self.stats.send_errors.inc();
            }
            c.drop_unsent(0);
            self.abort(slot);
            return;
        }
        let (frames, messages) = c.consume(res as usize, in_flight);
        self.stats.bytes_written.inc_by(res as u64);
        self.stats.frames_written.inc_by(frames);
        self.stats.messages_delivered.inc_by(messages);
        if c.closing == Closing::Abort {
            c.drop_unsent(0);
            self.maybe_release(slot);
        } else if !c.out.is_empty() {
            self.issue_send(slot);
        } else if c.closing != Closing::No {
            self.maybe_release(slot);
        }
    }

    fn on_close(&mut self, tok: Token, res: i32) {
        let slot = tok.slot as usize;
        if res < 0 {
            tracing::warn!(shard = self.id, slot, error = %io::Error::from_raw_os_error(-res), "close failed");
        }
        if let Some(c) = self.conns.get(slot).and_then(Option::as_ref)
            && c.generation == tok.generation
        {
            self.conns[slot] = None;
            self.open -= 1;
            self.stats.connections.dec();
            self.stats.closed.inc();
            // A free slot again: if accepting stopped on a full table, resume.
            self.arm_accept();
        }
    }

    // ---- WebSocket ----------------------------------------------------------------------------

    fn on_handshake_bytes(&mut self, slot: u32) {
        let Some(Some(c)) = self.conns.get_mut(slot as usize) else { return };
        match handshake::parse_request(&c.hs) {
            Ok(None) => {}
            Ok(Some((up, consumed))) => {
                let rest = c.hs.split_off(consumed);
                c.hs = Vec::new();
                self.on_upgrade(slot, up, rest);
            }
            Err(e) => self.refuse(slot, &e),
        }
    }

    fn refuse(&mut self, slot: u32, e: &HandshakeError) {
        self.stats.handshake_failures.inc();
        tracing::info!(shard = self.id, slot, status = e.status, reason = %e.reason, "handshake refused");
        let bytes = Bytes::from(handshake::error_response(e));
        self.finish_with(slot, Some(bytes));
    }

    fn on_upgrade(&mut self, slot: u32, up: Upgrade, mut rest: Vec<u8>) {
        let bad = |reason: &str| HandshakeError { status: 400, reason: reason.to_owned() };
        if !self.cfg.echo && up.path != "/ws" {
            return self.refuse(
                slot,
                &HandshakeError { status: 404, reason: "no such endpoint: connect to /ws?room=ROOM".into() },
            );
        }
        if self.refuse_when_overloaded && self.health.load(Ordering::Relaxed) >= 2 {
            return self.refuse(
                slot,
                &HandshakeError {
                    status: 503,
                    reason: "edge overloaded: ask dispatch (GET /v1/route) for another edge".into(),
                },
            );
        }
        let proto = match up.select_subprotocol() {
            Ok(p) => p,
            Err(e) => return self.refuse(slot, &e),
        };
        let room = match up.query_param("room") {
            Some(r) => match validate_room(r) {
                Ok(()) => Some(RoomName::from(r)),
                Err(why) => return self.refuse(slot, &bad(&format!("bad room: {why}"))),
            },
            None => None,
        };
        let since = match up.query_param("since") {
            Some(s) => match s.parse::<u64>() {
                Ok(v) => Some(v),
                Err(_) => return self.refuse(slot, &bad("bad since: not an unsigned integer")),
            },
            None => None,
        };
        let response = Bytes::from(handshake::response_101(&up.key, proto));
        let limits = self.limits;
        {
            let Some(Some(c)) = self.conns.get_mut(slot as usize) else { return };
            c.phase = Phase::Open;
            c.proto = proto.unwrap_or(Subprotocol::Json);
            c.decoder = Some(Box::new(Decoder::new(limits)));
            c.push(OutFrame::control(response));
        }
        self.mark_dirty(slot);
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

    fn handle_actions(&mut self, slot: u32, actions: &mut Vec<Action>, result: Result<(), CloseReason>) {
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
                    self.finish_with(slot, Some(Bytes::from(frame)));
                }
                Action::Message(opcode, payload) => {
                    if self.cfg.echo {
                        self.send_control(slot, ws::encode_frame(opcode, &payload));
                    } else {
                        self.on_client_message(slot, opcode, &payload);
                    }
                }
            }
        }
        if let Err(reason) = result {
            self.stats.protocol_errors.inc();
            tracing::info!(shard = self.id, slot, code = reason.code, reason = reason.reason, "protocol violation");
            self.close_with(slot, reason.code, reason.reason);
        }
    }

    fn on_client_message(&mut self, slot: u32, opcode: OpCode, payload: &[u8]) {
        let now_ms = self.now_ms();
        let (rate, burst) = (self.cfg.ws.signal_rate, self.cfg.ws.signal_burst);
        let Some(Some(c)) = self.conns.get_mut(slot as usize) else { return };
        if !c.take_signal(rate, burst, now_ms) {
            self.stats.signals_refused.inc();
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
                    "binary signalling needs roomcast.rkyv.v1; send JSON text",
                );
            }
        };
        let msg = match parsed {
            Ok(m) => m,
            Err(e) => return self.send_error(slot, "bad_message", &e.to_string()),
        };
        match msg {
            ClientMsg::Join { room, since } => match validate_room(&room) {
                Ok(()) => {
                    let name = self.rooms.name(&room).unwrap_or_else(|| RoomName::from(room.as_str()));
                    self.join(slot, name, since);
                }
                Err(why) => self.send_error(slot, "bad_room", why),
            },
            ClientMsg::Leave => {
                if let Some(room) = self.leave(slot) {
                    self.send_msg(slot, &ServerMsg::Left { room: room.to_string() });
                } else {
                    self.send_error(slot, "not_in_room", "leave: not in a room");
                }
            }
            ClientMsg::Publish { kind, user, body } => {
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
                let generation = self.conns[slot as usize].as_ref().map_or(0, |c| c.generation);
                let reply = Reply::Conn { shard: self.id, slot, generation };
                self.signal(&room.clone(), EngineCmd::Publish { room, msg: NewMessage { kind, user, body }, reply });
            }
        }
    }

    /// Joins `room`, leaving the current one first. Membership starts when the bus acknowledges.
    fn join(&mut self, slot: u32, room: RoomName, since: Option<u64>) {
        if let Some(old) = self.leave(slot) {
            self.send_msg(slot, &ServerMsg::Left { room: old.to_string() });
        }
        let Some(Some(c)) = self.conns.get_mut(slot as usize) else { return };
        let proto = c.proto;
        let generation = c.generation;
        c.joining = Some(room.clone());
        self.rooms.begin_join(&room, proto);
        self.signal(&room.clone(), EngineCmd::Join { room, shard: self.id, slot, generation, proto, since });
    }

    fn join_ack(&mut self, slot: u32, generation: u32, room: RoomName, seq: u64, replay: Vec<Bytes>) {
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
        self.send_msg(slot, &ServerMsg::Joined { room: room.to_string(), seq });
        for f in replay {
            // Recovered must-deliver messages: kept whole if the connection falls behind, and
            // let in whatever the queue holds (their size is bounded by the history limits).
            if let Some(Some(c)) = self.conns.get_mut(slot as usize) {
                c.push(OutFrame::control(f));
            }
        }
        self.mark_dirty(slot);
    }

    /// The engine refused a join (the edge is at its room bound): undo it and tell the client.
    fn join_refused(&mut self, slot: u32, generation: u32, room: &RoomName, reason: &str) {
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
    fn leave(&mut self, slot: u32) -> Option<RoomName> {
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

    // ---- sending ------------------------------------------------------------------------------

    fn send_msg(&mut self, slot: u32, msg: &ServerMsg) {
        let Some(Some(c)) = self.conns.get(slot as usize) else { return };
        let proto = c.proto;
        match envelope::encode(proto, msg) {
            Ok(payload) => {
                let frame = crate::bus::frame(proto, &payload);
                self.push_frame(slot, frame);
            }
            Err(e) => tracing::error!(shard = self.id, error = %e, "cannot encode message"),
        }
    }

    fn send_error(&mut self, slot: u32, code: &str, message: &str) {
        self.send_msg(slot, &ServerMsg::Error { code: code.into(), message: message.into() });
    }

    fn send_control(&mut self, slot: u32, frame: Vec<u8>) {
        self.push_frame(slot, Bytes::from(frame));
    }

    /// Queues a frame of the connection's own (101 answer, pong, joined, published, error,
    /// replay...). It counts against `send.max_queue_bytes` / `max_queue_frames` like any
    /// delivery: a client that sends pings and never reads fills its own queue, is shed, and
    /// is closed as a slow consumer (4000) rather than growing the edge.
    fn push_frame(&mut self, slot: u32, bytes: Bytes) {
        let (max_bytes, max_frames) = (self.cfg.send.max_queue_bytes, self.cfg.send.max_queue_frames);
        let Some(Some(c)) = self.conns.get_mut(slot as usize) else { return };
        if c.closing != Closing::No {
            return;
        }
        let over = |c: &Conn| c.out_bytes + bytes.len() > max_bytes || c.out.len() >= max_frames;
        if over(c) {
            let shed = c.shed();
            self.stats.shed_bytes.inc_by(shed as u64);
            if over(c) {
                self.stats.slow_consumer_closes.inc();
                tracing::info!(
                    shard = self.id,
                    slot,
                    "closing slow consumer (4000): its own frames over the queue bound"
                );
                c.drop_unsent(c.in_flight as usize);
                return self.close_with(slot, 4000, "slow consumer: reconnect with since");
            }
        }
        c.push(OutFrame::control(bytes));
        self.mark_dirty(slot);
    }

    fn mark_dirty(&mut self, slot: u32) {
        if let Some(Some(c)) = self.conns.get_mut(slot as usize)
            && !c.dirty
            && c.in_flight == 0
        {
            c.dirty = true;
            self.dirty.push(slot);
        }
    }

    fn flush_dirty(&mut self) {
        let mut dirty = std::mem::take(&mut self.dirty);
        for &slot in &dirty {
            if let Some(Some(c)) = self.conns.get_mut(slot as usize) {
                c.dirty = false;
                if c.in_flight == 0 && !c.out.is_empty() && c.closing != Closing::Abort {
                    self.issue_send(slot);
                }
            }
        }
        dirty.clear();
        self.dirty = dirty;
    }

    fn issue_send(&mut self, slot: u32) {
        let max_iov = self.cfg.send.max_iov;
        let Some(Some(c)) = self.conns.get_mut(slot as usize) else { return };
        debug_assert_eq!(c.in_flight, 0);
        let tok = Token::new(OpKind::Send, c.generation, slot);
        let n = c.out.len().min(max_iov);
        let r = if n == 1 {
            let (ptr, len) = c.head_slice();
            // SAFETY: the frame is the front of `c.out` and stays there (not popped, not
            // mutated: `Bytes` is immutable) until `on_send` reaps this token's completion.
            unsafe { Sq::new(&mut self.ring).send(slot, ptr, len as u32, tok) }
        } else {
            c.fill_iov(n);
            // SAFETY: `c.iov` and the first `n` frames of `c.out` are left untouched while
            // `in_flight > 0`, i.e. until `on_send` reaps this token's completion.
            unsafe { Sq::new(&mut self.ring).writev(slot, c.iov.as_ptr(), n as u32, tok) }
        };
        match r {
            Ok(()) => c.in_flight = n as u16,
            // The SQ is full and the kernel pushed back: the frames stay queued; next turn.
            Err(_) => self.retry.push((Retry::Send, slot)),
        }
    }

    // ---- closing ------------------------------------------------------------------------------

    /// Sends a close frame with `code`, then closes once it is written.
    fn close_with(&mut self, slot: u32, code: u16, reason: &str) {
        let Some(Some(c)) = self.conns.get_mut(slot as usize) else { return };
        if c.closing != Closing::No {
            return;
        }
        // The close frame goes after what is queued (the 101 answer among it, possibly).
        let frame = (c.phase == Phase::Open).then(|| Bytes::from(ws::close_frame(code, reason)));
        self.finish_with(slot, frame);
    }

    /// Queues `last` (a close frame or an HTTP error), stops reading, and closes after the flush.
    fn finish_with(&mut self, slot: u32, last: Option<Bytes>) {
        self.leave(slot);
        let deadline = self.now_ms() + CLOSE_FLUSH_TIMEOUT.as_millis() as u64;
        let Some(Some(c)) = self.conns.get_mut(slot as usize) else { return };
        if c.closing != Closing::No {
            return;
        }
        if let Some(bytes) = last {
            c.push(OutFrame::control(bytes));
        }
        c.closing = Closing::AfterFlush { deadline_ms: deadline };
        c.decoder = None;
        if c.in_flight == 0 && !c.out.is_empty() {
            self.issue_send(slot);
        } else {
            self.maybe_release(slot);
        }
    }

    /// Closes at once: nothing more is sent.
    fn abort(&mut self, slot: u32) {
        self.leave(slot);
        let Some(Some(c)) = self.conns.get_mut(slot as usize) else { return };
        c.closing = Closing::Abort;
        c.decoder = None;
        c.drop_unsent(c.in_flight as usize);
        self.maybe_release(slot);
    }

    /// Moves a closing connection along: cancel its operations, then close the descriptor once
    /// none is in flight (an operation owns its file and buffers until it completes).
    fn maybe_release(&mut self, slot: u32) {
        let Some(Some(c)) = self.conns.get_mut(slot as usize) else { return };
        if c.closing == Closing::No || c.close_issued {
            return;
        }
        let flushed = c.closing == Closing::Abort || (c.out.is_empty() && c.in_flight == 0);
        if !flushed {
            return;
        }
        if c.recv_armed || c.in_flight > 0 {
            if !c.cancel_issued {
                c.cancel_issued = true;
                let tok = Token::new(OpKind::Cancel, c.generation, slot);
                if Sq::new(&mut self.ring).cancel_fixed(slot, tok).is_err() {
                    c.cancel_issued = false;
                    self.retry.push((Retry::Release, slot));
                }
            }
            return;
        }
        c.close_issued = true;
        let tok = Token::new(OpKind::Close, c.generation, slot);
        if Sq::new(&mut self.ring).close_fixed(slot, tok).is_err() {
            c.close_issued = false;
            self.retry.push((Retry::Release, slot));
        }
    }

    /// Stops accepting: cancels the multishot accept and closes the listening socket, so the
    /// kernel sends new connections to the other shards' sockets, or refuses them once all
    /// shards are draining.
    fn stop_accepting(&mut self) {
        self.accepting = false;
        let Some(l) = self.listener.take() else { return };
        if !self.accept_armed {
            return; // nothing in flight owns it: close now
        }
        // Cancel the multishot accept by its token and keep the socket open until the accept's
        // last completion (on_accept drops it). Closing the fd first, as this once did, left
        // the cancel nothing to find by fd: the accept kept the listener alive in the kernel
        // and new connections were accepted and dropped with EOF during a drain.
        let accept = Token::new(OpKind::Accept, 0, 0);
        if Sq::new(&mut self.ring).cancel_token(accept, Token::new(OpKind::Cancel, 0, 0)).is_err() {
            // The SQ is full: submit what is queued and try again once.
            let _ = self.ring.submit();
            let _ = Sq::new(&mut self.ring).cancel_token(accept, Token::new(OpKind::Cancel, 0, 0));
        }
        self.retiring = Some(l);
    }

    fn next_random(&mut self) -> u64 {
        // xorshift64*: good enough to spread goaways, no dependency.
        let mut x = self.rng;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.rng = x;
        x.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    fn begin_drain(&mut self, url: Arc<str>, period_ms: u64) {
        if self.drain_url.is_some() {
            return;
        }
        tracing::info!(shard = self.id, open = self.open, period_ms, "draining");
        self.drain_url = Some(url);
        self.stop_accepting();
        let now = self.now_ms();
        for slot in 0..self.conns.len() {
            let jitter = if period_ms == 0 { 0 } else { self.next_random() % period_ms };
            if let Some(Some(c)) = self.conns.get_mut(slot) {
                c.goaway_at_ms = Some(now + jitter);
            }
        }
    }

    fn begin_shutdown(&mut self) {
        if self.shutdown_at.is_some() {
            return;
        }
        self.shutdown_at = Some(Instant::now() + SHUTDOWN_TIMEOUT);
        self.stop_accepting();
        for slot in 0..self.conns.len() as u32 {
            let phase = match &self.conns[slot as usize] {
                Some(c) if c.closing == Closing::No => c.phase,
                _ => continue,
            };
            match phase {
                Phase::Open => self.close_with(slot, 1001, "server shutting down"),
                Phase::Handshake => self.abort(slot),
            }
        }
    }

    // ---- timers -------------------------------------------------------------------------------

    fn tick(&mut self) {
        let now = Instant::now();
        if now.duration_since(self.last_sweep) < Duration::from_millis(250) {
            return;
        }
        self.last_sweep = now;
        let now_ms = self.now_ms();
        let ws = &self.cfg.ws;
        let (hs_to, idle_to, ping_every) = (ws.handshake_timeout_ms, ws.idle_timeout_ms, ws.ping_interval_ms);
        let mut queued = 0usize;
        let mut to_abort = Vec::new();
        let mut to_close = Vec::new();
        let mut to_ping = Vec::new();
        let mut to_goaway = Vec::new();
        for (slot, c) in self.conns.iter_mut().enumerate() {
            let Some(c) = c else { continue };
            queued += c.out_bytes;
            if c.closing == Closing::No && c.goaway_at_ms.is_some_and(|t| now_ms >= t) {
                to_goaway.push(slot as u32);
                continue;
            }
            match c.closing {
                Closing::AfterFlush { deadline_ms } if now_ms >= deadline_ms && !c.close_issued => {
                    to_abort.push(slot as u32);
                    continue;
                }
                Closing::No => {}
                _ => continue,
            }
            match c.phase {
                Phase::Handshake if now_ms.saturating_sub(c.opened_ms) >= hs_to => {
                    to_abort.push(slot as u32);
                }
                Phase::Open if now_ms.saturating_sub(c.last_rx_ms) >= idle_to => {
                    to_close.push(slot as u32);
                }
                Phase::Open if ping_every > 0 && now_ms >= c.next_ping_ms => {
                    c.next_ping_ms = now_ms + ping_every;
                    to_ping.push(slot as u32);
                }
                _ => {}
            }
        }
        self.stats.send_queue_bytes.set(queued as i64);
        self.load.set(self.id, queued);
        for slot in to_abort {
            if matches!(&self.conns[slot as usize], Some(c) if c.phase == Phase::Handshake && c.closing == Closing::No)
            {
                self.stats.handshake_failures.inc();
            }
            self.abort(slot);
        }
        for slot in to_close {
            self.close_with(slot, 1001, "idle timeout");
        }
        for slot in to_ping {
            self.send_control(slot, ws::encode_frame(OpCode::Ping, b""));
        }
        if let Some(url) = self.drain_url.clone() {
            for slot in to_goaway {
                let phase = self.conns[slot as usize].as_ref().map(|c| c.phase);
                if phase == Some(Phase::Open) {
                    let reconnect_after_ms = (self.next_random() % GOAWAY_MAX_DELAY_MS) as u32;
                    let msg =
                        ServerMsg::Goaway { url: url.to_string(), reason: "edge draining".into(), reconnect_after_ms };
                    self.send_msg(slot, &msg);
                    self.stats.goaways.inc();
                    self.close_with(slot, 1001, "edge draining");
                } else {
                    self.abort(slot);
                }
            }
        }
        self.flush_dirty();
    }
}

impl Conn {
    /// Runs the decoder over `data`, collecting what the shard must act on.
    fn decode(&mut self, data: &mut [u8], actions: &mut Vec<Action>) -> Result<(), CloseReason> {
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
