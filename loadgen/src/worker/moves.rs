//! Moves: a member told to go (`goaway`), closed with a code a client comes back from, or whose
//! socket ended, gets its new socket on the worker's own loop, each member on its own, as real
//! clients do.
//!
//! A move is a small state machine:
//! 1. **Waiting** for its due time (the goaway's `reconnect_after_ms`, a resume's jitter, or a
//!    retry's backoff) in a timer heap of `(due, member)`: the loop looks at the earliest only,
//!    never at every member.
//! 2. **Ready**: due, queued (first in, first out) for a place in the window of moves in flight
//!    (`--connect-inflight`, a window apart from the first connects').
//! 3. **In flight**: the dispatch request ([`crate::dispatch::Ask`]) when the URL is an
//!    `http://` dispatch URL, then the connect and upgrade with `since`
//!    ([`crate::connect::Pending`]), both nonblocking sockets on the worker's epoll under the
//!    move's slot token. Upgraded: the member reads its new socket under its own token. Failed:
//!    back to 1 with [`super::move_backoff`], or given up after `--move-give-up` (never with 0).
//!
//! Why not threads: the blocking movers (32 per worker, each holding its move through its
//! backoff sleep) capped a 2x10^5-member restart at ~4,000 reconnects/s
//! (bench-results/2026-12-01-restart-storm-README.md, finding 4). A move waiting costs a heap
//! entry and ~100 bytes here; one in flight, its socket and buffers. TLS members still move on
//! the blocking movers ([`super::Movers`]): their rustls handshake runs inside blocking reads
//! and writes ([`super::open_to`]); only their due times come from the heap here.

use std::cmp::Reverse;
use std::collections::{BTreeMap, BinaryHeap, HashMap, VecDeque};
use std::net::SocketAddr;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::Arc;
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;

use super::{
    Conn, MoveJob, Movers, Reader, Readiness, Sock, WorkerArgs, failure_reason, histogram, move_backoff, source_socket,
    token_param, ws_target,
};
use crate::connect::{MOVE_TOKEN_BASE, Pending, Step, Window};
use crate::dispatch::{self, Ask, AskStep};
use crate::stats::KindTrack;

/// How long a host name the resolver did not know is taken as unknown before it is asked again.
const UNRESOLVED_RETRY: Duration = Duration::from_secs(30);

/// The worker's state a move touches.
pub(super) struct Ctx<'a> {
    pub ep: &'a Readiness,
    pub conns: &'a mut [Conn],
    pub reader: &'a mut Reader,
    /// Scratch space for reading.
    pub tmp: &'a mut [u8],
}

/// What the moves did, for the worker's progress and final figures.
pub(super) struct MoveStats {
    /// Members on their new socket (after a goaway, a close or a lost socket).
    pub reconnects: u64,
    /// Of those, after a close or a lost socket rather than a goaway.
    pub resumed: u64,
    /// Moves given up after `--move-give-up` (the member counts as closed).
    pub gave_up: u64,
    /// Goaway (or loss) to upgraded, µs.
    pub hist: Histogram<u64>,
    /// Failed attempts by reason, every one (retried, or the last of a move given up):
    /// `dispatch_`-prefixed when asking dispatch failed.
    pub errors: BTreeMap<String, u64>,
    /// Attempts past their deadline whose answer had arrived, unread while the worker was busy:
    /// taken, not counted as timeouts (how late the generator itself reads).
    pub late_reads: u64,
    /// Members that joined afresh (no position to resume from) on a new socket.
    pub fresh_starts: u64,
}

impl MoveStats {
    /// Puts member `c` on its new socket (already registered with epoll, unless slow).
    fn installed(&mut self, c: &mut Conn, sock: Sock, got_at: Instant) {
        c.moving = false;
        c.peer = sock.peer_addr().ok();
        c.sock = sock;
        c.buf.clear();
        c.pong.clear();
        c.open = true;
        c.down_since = None;
        // Without a position (its socket was lost before its first `joined`) it joins afresh,
        // as the clients do: what was published before is not owed to it (a trial counted 334
        // gifts "lost" to such members).
        if !c.joined {
            self.fresh_starts += 1;
            c.tracks.iter_mut().flatten().for_each(KindTrack::start_afresh);
        }
        self.reconnects += 1;
        self.resumed += u64::from(std::mem::take(&mut c.resuming));
        let _ = self.hist.record(got_at.elapsed().as_micros().max(1) as u64);
    }
}

/// One member's move, from its due goaway to its new socket.
struct Move {
    /// Where to ask: a dispatch URL (`http://`), or a WebSocket URL used as it is (a resume).
    url: String,
    /// The last seq the member saw, sent as `since` (None: it never got its `joined`, so it
    /// has no position and joins afresh).
    since: Option<u64>,
    /// When the goaway came (or the socket was lost): the start of the reconnect time.
    got_at: Instant,
    /// When its first attempt started: the give-up clock.
    first: Option<Instant>,
    /// Failed attempts so far (the next backoff's exponent).
    attempt: u32,
    /// Waiting in the timers for a retry due then (None: ready or in flight).
    retry_at: Option<Instant>,
}

/// A move in flight, under its slot token.
struct InFlight {
    /// The member's index.
    i: usize,
    stage: Stage,
}

enum Stage {
    /// Asking dispatch where to go.
    Ask(Ask),
    /// Connecting and upgrading there.
    Connect(Pending),
}

impl InFlight {
    fn fd(&self) -> RawFd {
        match &self.stage {
            Stage::Ask(a) => a.fd(),
            Stage::Connect(p) => p.fd(),
        }
    }

    fn expired(&self, now: Instant) -> bool {
        match &self.stage {
            Stage::Ask(a) => a.expired(now),
            Stage::Connect(p) => p.expired(now),
        }
    }
}

/// The worker's moves: timers, the ready queue and the window in flight.
pub(super) struct Moves {
    args: WorkerArgs,
    tokens: Arc<[String]>,
    /// `goaway`s are followed (and lost sockets resumed) at all.
    follow: bool,
    /// Due times: members' pending goaways (`Conn::goaway_listed` says which entry is current)
    /// and moves' retries (`Move::retry_at`). Entries that no longer match are skipped.
    timers: BinaryHeap<Reverse<(Instant, usize)>>,
    /// Members moving (plain members; TLS members' moves are on the blocking movers).
    moving: HashMap<usize, Move>,
    /// Due moves waiting for room in the window.
    ready: VecDeque<usize>,
    window: Window<InFlight>,
    /// Dispatch and edge hosts looked up so far (IPs are parsed, not kept): a name is looked up
    /// once, blocking the loop; one the resolver did not know is not asked again for
    /// [`UNRESOLVED_RETRY`] (when, and what it said), or a resolver that times out would stall
    /// the loop at every attempt of every member.
    hosts: HashMap<String, Result<SocketAddr, (Instant, String)>>,
    last_expiry_check: Instant,
    /// TLS members' movers.
    blocking: Option<Movers>,
    /// How long a move is retried before it is given up (`--move-give-up`); None: never.
    give_up: Option<Duration>,
    /// The lines saying members were given up.
    gave_up_lines: GiveUpLines,
    pub stats: MoveStats,
}

/// How often, at most, a worker says it gave members up, after its first such line.
const GIVE_UP_LINE_EVERY: Duration = Duration::from_secs(5);

/// The stderr lines about members given up: the first at once, then at most one per
/// [`GIVE_UP_LINE_EVERY`] with how many since and the last. An edge killed and never back gave
/// up every member within the same second, each on its own line (2,979 lines for 2,980
/// members; 10^6 at the million's scale); the count is in the results (`reconnect_failed`).
#[derive(Debug)]
struct GiveUpLines {
    /// When the last line went out (None: none yet).
    printed_at: Option<Instant>,
    untold: u64,
}

impl GiveUpLines {
    /// Member `i` was given up at `now` with `error`: the line to print, if one is due.
    fn gave_up(&mut self, now: Instant, i: usize, error: &str) -> Option<String> {
        let Some(at) = self.printed_at else {
            self.printed_at = Some(now);
            return Some(format!(
                "giving up moving connection {i}: {error} (more: one line per {} s)",
                GIVE_UP_LINE_EVERY.as_secs()
            ));
        };
        self.untold += 1;
        if now.duration_since(at) < GIVE_UP_LINE_EVERY {
            return None;
        }
        let line = format!(
            "gave up moving {} more connections in the last {:.0} s; last: connection {i}: {error}",
            self.untold,
            now.duration_since(at).as_secs_f64()
        );
        self.printed_at = Some(now);
        self.untold = 0;
        Some(line)
    }
}

impl Moves {
    /// The moves of a worker with `args`; `tokens`: its connection tokens.
    pub fn new(args: &WorkerArgs, tokens: &Arc<[String]>) -> Self {
        let follow = args.follow_goaway;
        Self {
            args: args.clone(),
            tokens: tokens.clone(),
            follow,
            timers: BinaryHeap::new(),
            moving: HashMap::new(),
            ready: VecDeque::new(),
            window: Window::new(args.connect_inflight, MOVE_TOKEN_BASE),
            hosts: HashMap::new(),
            last_expiry_check: Instant::now(),
            blocking: (follow && args.tls_ca.is_some()).then(|| Movers::start(args, 32, tokens)),
            give_up: args.move_give_up(),
            gave_up_lines: GiveUpLines { printed_at: None, untold: 0 },
            stats: MoveStats {
                reconnects: 0,
                resumed: 0,
                gave_up: 0,
                hist: histogram(),
                errors: BTreeMap::new(),
                late_reads: 0,
                fresh_starts: 0,
            },
        }
    }

    /// The most moves in flight at once so far.
    pub fn peak(&self) -> usize {
        self.window.peak
    }

    /// Puts member `i`'s pending goaway (if any) in the timers, once per due time: again only if
    /// a later goaway moved it earlier (one that moved it later is found when the earlier entry
    /// comes up).
    pub fn watch(&mut self, c: &mut Conn, i: usize) {
        if !self.follow {
            return;
        }
        let Some((_, due, _)) = &c.goaway else { return };
        if c.goaway_listed.is_none_or(|listed| *due < listed) {
            self.timers.push(Reverse((*due, i)));
            c.goaway_listed = Some(*due);
        }
    }

    /// When the loop must next wake for a move (the earliest due time), if any.
    pub fn next_wake(&self) -> Option<Instant> {
        self.timers.peek().map(|Reverse((at, _))| *at)
    }

    /// The loop's turn: due goaways let go of their old socket and become moves, due moves
    /// start as the window has room, moves in flight too long fail, and the blocking movers'
    /// results (TLS members) are installed.
    pub fn turn(&mut self, cx: &mut Ctx<'_>) {
        if !self.follow {
            return;
        }
        let now = Instant::now();
        while let Some(&Reverse((due, i))) = self.timers.peek() {
            if due > now {
                break;
            }
            self.timers.pop();
            if let Some(m) = self.moving.get_mut(&i) {
                if m.retry_at == Some(due) {
                    m.retry_at = None;
                    self.ready.push_back(i);
                }
                continue;
            }
            let c = &mut cx.conns[i];
            if c.goaway_listed != Some(due) {
                continue;
            }
            c.goaway_listed = None;
            let Some((url, at, got_at)) = c.goaway.take() else { continue };
            if at > now {
                // A later goaway put it off.
                c.goaway = Some((url, at, got_at));
                self.watch(c, i);
                continue;
            }
            if c.open && !c.slow {
                cx.ep.del(c.sock.as_raw_fd());
            }
            // The edge closes it right after its goaway; the new socket comes from the move.
            c.release(None);
            c.went_down();
            c.moving = true;
            if let Some(b) = &self.blocking {
                let _ = b.jobs.send(MoveJob { i, slow: c.slow, url, room: c.room, since: c.position(), got_at });
                continue;
            }
            let m = Move { url, since: c.position(), got_at, first: None, attempt: 0, retry_at: None };
            self.moving.insert(i, m);
            self.ready.push_back(i);
        }
        while self.window.has_room()
            && let Some(i) = self.ready.pop_front()
        {
            self.attempt(i, now, cx);
        }
        if self.window.len() > 0 && now.duration_since(self.last_expiry_check) >= Duration::from_millis(100) {
            self.last_expiry_check = now;
            for token in self.window.expired(|f| f.expired(now)) {
                // Take what has arrived first: an answer that came while this worker was
                // reading its members' gifts is the worker's lateness, not the server's (a
                // 10^6 restart counted 170,839 dispatch timeouts without telling them apart).
                self.on_ready(token, cx);
                if !self.window.get_mut(token).is_some_and(|f| f.expired(now)) {
                    self.stats.late_reads += 1;
                    continue;
                }
                let Some(f) = self.window.remove(token) else { continue };
                cx.ep.del(f.fd());
                let (reason, what) = match f.stage {
                    Stage::Ask(_) => ("dispatch_timeout", "no dispatch answer within 5 s"),
                    Stage::Connect(_) => ("timeout", "no upgrade answer within 10 s"),
                };
                let e = std::io::Error::new(std::io::ErrorKind::TimedOut, what);
                self.fail(f.i, reason.to_owned(), &e.into(), now, cx);
            }
        }
        if let Some(b) = &self.blocking {
            while let Ok(done) = b.done.try_recv() {
                let c = &mut cx.conns[done.i];
                c.moving = false;
                for reason in done.errors {
                    *self.stats.errors.entry(reason).or_default() += 1;
                }
                match done.result {
                    Ok(sock) => {
                        if !c.slow {
                            cx.ep.add(sock.as_raw_fd(), done.i);
                        }
                        self.stats.installed(c, sock, done.got_at);
                    }
                    Err(e) => {
                        if let Some(line) = self.gave_up_lines.gave_up(Instant::now(), done.i, &e.to_string()) {
                            eprintln!("{line}");
                        }
                        self.stats.gave_up += 1;
                        cx.reader.closed += 1;
                    }
                }
            }
        }
    }

    /// Starts member `i`'s next attempt: ask dispatch, or (a WebSocket URL) connect at once.
    fn attempt(&mut self, i: usize, now: Instant, cx: &mut Ctx<'_>) {
        let Some(m) = self.moving.get_mut(&i) else { return };
        m.first.get_or_insert(now);
        let (url, since) = (m.url.clone(), m.since);
        let (room, slow) = (cx.conns[i].room, cx.conns[i].slow);
        let stage = if url.starts_with("http://") {
            self.ask(i, &url, room).map(Stage::Ask).map_err(|e| (format!("dispatch_{}", failure_reason(&e)), e))
        } else {
            self.connect(i, &url, room, slow, since).map(Stage::Connect)
        };
        match stage {
            Ok(stage) => {
                let f = InFlight { i, stage };
                let fd = f.fd();
                let token = self.window.insert(f);
                cx.ep.add_connecting(fd, token);
            }
            Err((reason, e)) => self.fail(i, reason, &e, now, cx),
        }
    }

    /// A dispatch request for member `i` (room `room`) to `url`, under way.
    fn ask(&mut self, i: usize, url: &str, room: u32) -> anyhow::Result<Ask> {
        let (authority, req) = dispatch::request(url, room)?;
        let dst = self.host(&authority, Instant::now())?;
        Ask::start(source_socket(&self.args, self.args.first + i, 0)?, dst, req)
    }

    /// The address of `authority` (`host:port`): parsed, or looked up once
    /// ([`dispatch::lookup`]; an unknown name again after [`UNRESOLVED_RETRY`]).
    fn host(&mut self, authority: &str, now: Instant) -> anyhow::Result<SocketAddr> {
        if let Ok(a) = authority.parse() {
            return Ok(a);
        }
        match self.hosts.get(authority) {
            Some(Ok(a)) => return Ok(*a),
            Some(Err((at, detail))) if now.duration_since(*at) < UNRESOLVED_RETRY => {
                return Err(dispatch::Unresolved { authority: authority.to_owned(), detail: detail.clone() }.into());
            }
            _ => {}
        }
        let r = dispatch::lookup(authority);
        let kept = match &r {
            Ok(a) => Ok(*a),
            Err(e) => {
                Err((now, e.downcast_ref::<dispatch::Unresolved>().map_or_else(|| e.to_string(), |u| u.detail.clone())))
            }
        };
        self.hosts.insert(authority.to_owned(), kept);
        r
    }

    /// Member `i`'s connect and upgrade to WebSocket URL `ws` with `since` (and its token),
    /// under way. A URL that does not parse (`dispatch_bad_answer`) or whose host name does not
    /// resolve (`dispatch_unresolved_host`) is counted as the dispatch's failure.
    fn connect(
        &mut self,
        i: usize,
        ws: &str,
        room: u32,
        slow: bool,
        since: Option<u64>,
    ) -> Result<Pending, (String, anyhow::Error)> {
        let as_dispatch = |e: anyhow::Error| (format!("dispatch_{}", failure_reason(&e)), e);
        let (authority, path) = ws_target(ws, room, self.args.sse).map_err(as_dispatch)?;
        let addr = self.host(&authority, Instant::now()).map_err(as_dispatch)?;
        let path = format!("{path}{}{}", super::since_param(since), token_param(&self.tokens, i));
        Pending::start(&self.args, self.args.first + i, addr, &path, slow).map_err(|e| (failure_reason(&e), e))
    }

    /// The move under `token` had its socket ready: takes it as far as it goes.
    pub fn on_ready(&mut self, token: usize, cx: &mut Ctx<'_>) {
        let now = Instant::now();
        let Some(f) = self.window.get_mut(token) else { return };
        let i = f.i;
        match &mut f.stage {
            Stage::Ask(a) => match a.drive(cx.tmp) {
                AskStep::Wait => {}
                AskStep::Done(url) => {
                    cx.ep.del(a.fd());
                    let (room, slow) = (cx.conns[i].room, cx.conns[i].slow);
                    let since = self.moving.get(&i).and_then(|m| m.since);
                    match self.connect(i, &url, room, slow, since) {
                        Ok(p) => {
                            let fd = p.fd();
                            if let Some(f) = self.window.get_mut(token) {
                                // Drops the answered request's socket (deregistered above).
                                f.stage = Stage::Connect(p);
                            }
                            cx.ep.add_connecting(fd, token);
                        }
                        Err((reason, e)) => {
                            self.window.remove(token);
                            self.fail(i, reason, &e, now, cx);
                        }
                    }
                }
                AskStep::Failed(e) => {
                    cx.ep.del(a.fd());
                    self.window.remove(token);
                    self.fail(i, format!("dispatch_{}", failure_reason(&e)), &e, now, cx);
                }
            },
            Stage::Connect(p) => match p.drive(cx.tmp) {
                Step::Wait => {}
                Step::Done => {
                    if let Some(InFlight { stage: Stage::Connect(p), .. }) = self.window.remove(token) {
                        self.arrived(i, p, cx);
                    }
                }
                Step::Failed(e) => {
                    cx.ep.del(p.fd());
                    self.window.remove(token);
                    self.fail(i, failure_reason(&e), &e, now, cx);
                }
            },
        }
    }

    /// Member `i` upgraded on its new socket `p`: it reads it under its own token from now on.
    fn arrived(&mut self, i: usize, p: Pending, cx: &mut Ctx<'_>) {
        let Some(m) = self.moving.remove(&i) else { return };
        let (tcp, rest) = p.finish();
        let c = &mut cx.conns[i];
        if c.slow {
            // Slow readers are read outside epoll.
            cx.ep.del(tcp.as_raw_fd());
        } else {
            cx.ep.modify(tcp.as_raw_fd(), i);
        }
        self.stats.installed(c, Sock::Plain(tcp), m.got_at);
        // What came after the answer (the edge's `joined`, maybe more) is the reading loop's.
        if !rest.is_empty() {
            cx.reader.bytes += rest.len() as u64;
            c.buf = rest;
            let used = cx.reader.frames(c);
            c.buf.drain(..used);
            if !c.open && !c.slow {
                cx.ep.del(c.sock.as_raw_fd());
            }
        }
        self.watch(c, i);
    }

    /// Member `i`'s attempt failed (`reason`: its name in the counts, whatever follows): retried
    /// after its backoff, or given up once the move has been trying for `--move-give-up` (never
    /// when it is 0). The last attempt of a move given up was not counted, so every member given
    /// up after dispatch refused it showed one `dispatch_http_503` fewer than dispatch's own
    /// count of its refusals (`roomcast_dispatch_answers_total`).
    fn fail(&mut self, i: usize, reason: String, e: &anyhow::Error, now: Instant, cx: &mut Ctx<'_>) {
        let Some(m) = self.moving.get_mut(&i) else { return };
        *self.stats.errors.entry(reason).or_default() += 1;
        if let (Some(first), Some(give_up)) = (m.first, self.give_up)
            && now.duration_since(first) >= give_up
        {
            self.moving.remove(&i);
            cx.conns[i].moving = false;
            if let Some(line) = self.gave_up_lines.gave_up(now, i, &e.to_string()) {
                eprintln!("{line}");
            }
            self.stats.gave_up += 1;
            cx.reader.closed += 1;
            return;
        }
        let at = now + move_backoff(m.attempt);
        m.attempt += 1;
        m.retry_at = Some(at);
        self.timers.push(Reverse((at, i)));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every member of a worker given up within seconds (an edge killed and never back): the
    /// first line at once, then one line per 5 s with how many since, not a line each.
    #[test]
    fn members_given_up_are_told_in_a_few_lines() {
        let t0 = Instant::now();
        let mut g = GiveUpLines { printed_at: None, untold: 0 };
        let lines: Vec<String> = (0..3_000u32)
            .filter_map(|i| g.gave_up(t0 + Duration::from_millis(4) * i, i as usize, "Connection refused"))
            .collect();
        assert_eq!(lines.len(), 3, "at 0, 5 and 10 s of 12 s: {lines:#?}");
        assert_eq!(lines[0], "giving up moving connection 0: Connection refused (more: one line per 5 s)");
        assert_eq!(
            lines[1],
            "gave up moving 1250 more connections in the last 5 s; last: connection 1250: Connection refused"
        );
    }
}
