//! One shard: a thread pinned to a CPU that owns one io_uring, its listening socket (SO_REUSEPORT),
//! its connections (direct descriptors, never normal fds), its part of every room, and the room
//! engine for the rooms that hash to it.
//!
//! The data path through the files: `ring` (accept, recv, send, close completions) ->
//! `session` (upgrade, frames, signalling) -> `members` (joins, fan-out to local members) ->
//! `outbox` (a connection's bounded queue, one send in flight) -> back to `ring`; `sse` is the
//! Server-Sent Events transport's own part (its request, answer and input); `tls` sits between
//! `ring` and the rest for a wss connection (decrypt what is received, encrypt what is sent).
//! `mail` is what
//! crosses threads (the mailbox, the engine's turn, one mail per peer per turn); `lifecycle` is
//! closing, drain, shutdown and the timers; `conn` is one connection's state.
//!
//! A loop turn: drain the mailbox (peers' signalling for this engine, engines' output for these
//! connections), reap completions (accepts, receives, sends, closes), run the engine and ship its
//! output, start a send on every connection that got something to write and has none in flight,
//! run the timers once in a while, then submit everything queued with one `io_uring_enter` that
//! also waits for the next completion or the engine's next deadline.
//!
//! A delivery is one frame shared by every member: the shard wraps it once in an `Rc` (no atomic
//! traffic per member) and each member's queue holds a clone. A connection has at most one send
//! in flight; frames queued behind it go out together in one `writev`. That keeps per-connection
//! order without locks and turns bursts into fewer, fuller writes, which is what the kernel's
//! per-write cost rewards.

mod conn;
mod lifecycle;
mod mail;
mod members;
mod moderation;
mod outbox;
mod ring;
mod session;
mod sse;
mod tls;

use std::io;
use std::os::fd::OwnedFd;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU8, Ordering};
use std::time::{Duration, Instant};

use io_uring::{IoUring, types};
use roomcast_proto::ws::Limits;
use socket2::Socket;

use crate::bus::{EngineCmd, Inbox, Mailbox};
use crate::config::Config;
use crate::engine::{Engine, LoadBoard, Out};
use crate::metrics::ShardStats;
use crate::room::Rooms;
use crate::uring::{BufRing, UringError};

use conn::{Action, Closing, Conn};

/// Buffer group id of the shard's receive buffers.
const BGID: u16 = 0;
/// How long a closing connection may take to flush its close frame before it is cut.
const CLOSE_FLUSH_TIMEOUT: Duration = Duration::from_secs(2);
/// What a peer may still send once the edge has closed its side (lingering close, after its
/// last bytes and FIN) before it is cut: a close frame, a close_notify and a few messages in
/// flight are far less; a peer that keeps sending is not closing.
const LINGER_BYTES: u32 = 64 * 1024;
/// How long shutdown waits for connections to take their 1001 close.
const SHUTDOWN_TIMEOUT: Duration = Duration::from_secs(3);
/// Longest a shard sleeps in the kernel without a completion (drives the timers).
const TICK: Duration = Duration::from_millis(100);
/// Most sends a loop turn hands to the kernel; the rest wait for the next turn, first in line.
/// One `io_uring_enter` runs its sends back to back in the kernel (on loopback each also runs
/// the receiver's TCP path: ~5-10 µs), and a kernel built without preemption (PREEMPT_NONE,
/// this box's) switches threads only where the kernel yields or on the way back to user space.
/// A flush to a shard's ~16k members would otherwise go in as SQ-sized chunks of 4,096;
/// 1,024 bounds a turn's kernel time to ~10 ms at little cost (one enter per 1,024 sends).
const SENDS_PER_TURN: u32 = 1024;
/// Refusals (handshakes, protocol errors, floods) a shard logs per second; the rest are
/// counted in one line a second later (they are all in `roomcast_connections_refused_total` and
/// friends): a storm of bad clients must not become a storm of log lines.
const LOG_BUDGET: u32 = 20;
/// One message frame in this many has its delivery latency recorded.
const LATENCY_SAMPLE: u32 = 16;
/// How soon a shard retries mail a full peer mailbox refused.
const STALLED_RETRY: Duration = Duration::from_millis(1);

/// A goaway tells its client to wait a random time below this before reconnecting, so the
/// clients of one shard's turn do not arrive at dispatch in the same millisecond.
pub const GOAWAY_MAX_DELAY_MS: u64 = 1000;

/// Everything a shard thread needs; built on the main thread.
pub struct ShardSpec {
    /// The shard's index: its place in every mailbox list and its metric label.
    pub id: u16,
    /// CPU to pin the shard's thread to, if any.
    pub cpu: Option<usize>,
    /// Its own SO_REUSEPORT listening socket on the WebSocket port.
    pub listener: Socket,
    /// The whole configuration, shared by every shard.
    pub cfg: Arc<Config>,
    /// This shard's room engine (engine `id`: the rooms that hash to it), or None when the
    /// engines run beside the shards on threads of their own.
    pub engine: Option<Engine>,
    /// Every engine's mailbox, by engine id: the shards' own mailboxes when the shards host
    /// the engines (this one's included).
    pub engines: Vec<Mailbox>,
    /// The backlogs and room count every shard and engine share.
    pub load: Arc<LoadBoard>,
    /// This shard's end of its mailbox (mail from engines, peers and the bus; the publish
    /// API's lane is taken first).
    pub mailbox: Inbox,
    /// The eventfd senders write to wake this shard while it is parked in the kernel.
    pub doorbell: Arc<OwnedFd>,
    /// Set while the shard waits in the kernel, so senders know to ring the doorbell.
    pub parked: Arc<AtomicBool>,
    /// This shard's metric handles.
    pub stats: ShardStats,
    /// Connection slots (registered file descriptors) in this shard's ring.
    pub max_conns: u32,
    /// The health policy's state (crate::health), and whether to refuse handshakes while it is
    /// `overloaded` (2).
    pub health: Arc<AtomicU8>,
    /// Refuse new handshakes while the health state is overloaded.
    pub refuse_when_overloaded: bool,
    /// Token verification; None: anonymous mode.
    pub auth: Option<Arc<crate::auth::Verifier>>,
    /// Per-address connection bounds, shared by every shard; None when off.
    pub ipguard: Option<Arc<crate::ipguard::IpGuard>>,
    /// Moderation's bans in force, shared by every shard (read at every join).
    pub bans: Arc<crate::moderation::Bans>,
    /// `[tls]`: every accepted connection gets a TLS session from this (None: plain ws).
    pub tls: Option<Arc<rustls::ServerConfig>>,
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
    // The hosted engine's last words: exact seqs to the store, held acknowledgements answered.
    if let Some(e) = shard.engine.as_mut() {
        e.shutdown(Instant::now(), &mut shard.out);
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
    /// A listener being retired: kept open until its accepts' last completion (an in-flight
    /// operation owns its file), then closed.
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
    mailbox: Inbox,
    doorbell: Arc<OwnedFd>,
    doorbell_buf: Box<u64>,
    parked: Arc<AtomicBool>,
    stats: ShardStats,
    conns: Vec<Option<Conn>>,
    rooms: Rooms,
    /// Connections waiting for a send: answers of their own first, then room deliveries.
    lines: outbox::SendLines,
    /// Sends issued this loop turn (bounded by SENDS_PER_TURN).
    sends_this_turn: u32,
    cqes: Vec<(u64, i32, u32)>,
    actions: Vec<Action>,
    next_gen: u32,
    /// The accepts kept in flight, each with its own peer-address buffer; which are armed.
    accepts: Box<[ring::AcceptBuf]>,
    accepts_armed: u32,
    accepting: bool,
    /// Per-address connection bounds (shared by the shards), None when off.
    ipguard: Option<Arc<crate::ipguard::IpGuard>>,
    /// Refusal log lines left in this second, and how many were not written.
    log_budget: u32,
    log_window_ms: u64,
    log_suppressed: u64,
    sweep_stripe: usize,
    /// Replay bytes not yet written, all connections (bounded by `send.max_replay_bytes`).
    replay_held: usize,
    /// The capacity estimate's last reading: thread CPU time and frames written at a time.
    capacity_at: Option<(Duration, Duration, u64, Instant)>,
    /// This shard's thread's perf counters, opened on its first capacity tick (on its thread).
    perf: Option<crate::perfcount::ThreadCounters>,
    /// The gift-latency histogram's cumulative bucket counts a second ago (the controller
    /// reads the p99 of the last second from the difference).
    latency_snap: Option<(Vec<u64>, Instant)>,
    shutdown_at: Option<Instant>,
    epoch: Instant,
    last_sweep: Instant,
    open: u32,
    /// Draining: where `goaway` sends clients.
    drain_url: Option<Arc<str>>,
    /// Draining: goaways are held since this moment (ms, the shard's clock).
    drain_held_since: Option<u64>,
    health: Arc<AtomicU8>,
    refuse_when_overloaded: bool,
    auth: Option<Arc<crate::auth::Verifier>>,
    bans: Arc<crate::moderation::Bans>,
    /// Random draws: the latency sample, goaway and SSE retry jitter, anonymous member ids.
    rng: fastrand::Rng,
    /// Operations the SQ could not take this turn (the kernel pushed back): retried next turn.
    retry: Vec<(Retry, u32)>,
    /// `wss`: the TLS configuration new sessions are made from (None: plain ws).
    tls: Option<Arc<rustls::ServerConfig>>,
    /// Decrypted bytes of one receive (reused).
    tls_plain: Vec<u8>,
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
        let (ring, bufring) = crate::uring::while_short_of_memory(spec.id, crate::uring::SETUP_RETRY_FOR, || {
            let ring = crate::uring::build_ring(spec.cfg.uring.sq_entries)?;
            crate::uring::probe(&ring)?;
            crate::uring::register_files(&ring, spec.max_conns)?;
            crate::uring::limit_workers(&ring)?;
            let bufring = BufRing::new(&ring, BGID, spec.cfg.uring.recv_buffers, spec.cfg.uring.recv_buffer_size)?;
            Ok((ring, bufring))
        })?;
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
            lines: outbox::SendLines::default(),
            sends_this_turn: 0,
            cqes: Vec::with_capacity(1024),
            actions: Vec::new(),
            next_gen: 1,
            accepts: (0..ring::ACCEPTS).map(|_| ring::AcceptBuf::default()).collect(),
            accepts_armed: 0,
            accepting: true,
            ipguard: spec.ipguard,
            log_budget: LOG_BUDGET,
            log_window_ms: 0,
            log_suppressed: 0,
            sweep_stripe: usize::from(spec.id),
            replay_held: 0,
            capacity_at: None,
            perf: None,
            latency_snap: None,
            shutdown_at: None,
            epoch: now,
            last_sweep: now,
            open: 0,
            drain_url: None,
            drain_held_since: None,
            health: spec.health,
            refuse_when_overloaded: spec.refuse_when_overloaded,
            auth: spec.auth,
            bans: spec.bans,
            retry: Vec::new(),
            rng: fastrand::Rng::new(),
            tls: spec.tls,
            tls_plain: Vec::new(),
        })
    }

    fn run(&mut self) -> io::Result<()> {
        self.arm_accept();
        self.arm_doorbell();
        tracing::debug!(shard = self.id, "shard running");
        loop {
            self.sends_this_turn = 0;
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
            let ts = if self.mailbox.is_empty() && !own_sig && self.lines.is_empty() {
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

    /// Once a second: the summary of what was not logged, and a fresh budget. Called on each
    /// refusal and from the timers, so the summary comes even when the refusals stop.
    fn roll_refusal_log(&mut self) {
        let now = self.now_ms();
        if now.saturating_sub(self.log_window_ms) < 1000 {
            return;
        }
        if self.log_suppressed > 0 {
            tracing::info!(
                shard = self.id,
                not_logged = self.log_suppressed,
                "more refusals in the last second (counted in /metrics)"
            );
        }
        self.log_window_ms = now;
        self.log_budget = LOG_BUDGET;
        self.log_suppressed = 0;
    }

    /// Whether to log one more refusal now (LOG_BUDGET a second; then one summary line).
    fn log_refusal(&mut self) -> bool {
        self.roll_refusal_log();
        if self.log_budget > 0 {
            self.log_budget -= 1;
            true
        } else {
            self.log_suppressed += 1;
            false
        }
    }

    fn live(&self, slot: u32, generation: u32) -> bool {
        matches!(self.conns.get(slot as usize), Some(Some(c)) if c.generation == generation && c.closing == Closing::No)
    }
}
