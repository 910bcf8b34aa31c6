//! A connection's end, and the shard's: close handshakes, staged release of the direct
//! descriptor, drain (goaway spread over the period) and shutdown, and the timers.

use std::os::fd::AsRawFd;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use roomcast_proto::Subprotocol;
use roomcast_proto::envelope::ServerMsg;
use roomcast_proto::ws::{self, OpCode};

use super::conn::{Closing, OutFrame, Phase};
use super::{CLOSE_FLUSH_TIMEOUT, GOAWAY_MAX_DELAY_MS, LINGER_BYTES, Retry, SHUTDOWN_TIMEOUT, Shard};
use crate::metrics::{CloseWhy, LingerEnd};
use crate::uring::{OpKind, Sq, Token};

impl Shard {
    /// Records why `slot` is about to close, unless a cause was recorded already.
    pub(super) fn closing_for(&mut self, slot: u32, why: CloseWhy) {
        if let Some(Some(c)) = self.conns.get_mut(slot as usize) {
            c.why.get_or_insert(why);
        }
    }

    /// Sends a close frame with `code`, then closes once it is written.
    pub(super) fn close_with(&mut self, slot: u32, code: u16, reason: &str) {
        let Some(Some(c)) = self.conns.get_mut(slot as usize) else { return };
        if c.closing != Closing::No {
            return;
        }
        // The close frame goes after what is queued (the 101 answer among it, possibly). An
        // event stream has no close frame: it ends with the connection (and the browser
        // reconnects with `Last-Event-ID`).
        let frame =
            (c.phase == Phase::Open && c.proto != Subprotocol::Sse).then(|| Bytes::from(ws::close_frame(code, reason)));
        self.finish_with(slot, frame);
    }

    /// Queues `last` (a close frame or an HTTP error), stops decoding, and closes after the
    /// flush, lingering (see `begin_linger`).
    pub(super) fn finish_with(&mut self, slot: u32, last: Option<Bytes>) {
        self.finish(slot, last, true);
    }

    /// `finish_with`, lingering or not. Not: a connection refused at accept, whose request the
    /// edge chose never to read (it must not hold a slot while it takes its time).
    pub(super) fn finish(&mut self, slot: u32, last: Option<Bytes>, linger: bool) {
        self.leave(slot);
        let deadline = self.now_ms() + CLOSE_FLUSH_TIMEOUT.as_millis() as u64;
        let linger = linger && self.cfg.ws.close_linger_ms > 0;
        let Some(Some(c)) = self.conns.get_mut(slot as usize) else { return };
        if c.closing != Closing::No {
            return;
        }
        if let Some(bytes) = last {
            c.push(OutFrame::control(bytes));
        } else if c.tls.as_ref().is_some_and(|t| !t.session.is_handshaking()) && c.out.len() <= usize::from(c.in_flight)
        {
            // Nothing of ours left to encrypt (the end of an event stream, an answer to the
            // peer's close_notify): an empty frame, so that a send carries our close_notify
            // (`tls_issue_send` adds it to a closing connection's last frames).
            c.push(OutFrame::control(Bytes::new()));
        }
        c.closing = Closing::AfterFlush { deadline_ms: deadline, linger };
        c.decoder = None;
        if c.in_flight == 0 && !c.out.is_empty() {
            self.issue_send(slot);
        } else {
            self.maybe_release(slot);
        }
    }

    /// A closing connection's last bytes are written (close frame, HTTP error or end of stream;
    /// over TLS its close_notify last): shut the write side, so a FIN follows them, and keep
    /// reading, discarding, until the peer's FIN (`on_recv`: `LingerEnd::Fin`),
    /// `ws.close_linger_ms` (`tick`) or `LINGER_BYTES` more, whichever comes first.
    ///
    /// Why: Linux resets a connection closed with bytes unread in its receive queue, or that
    /// receives bytes once closed, and a reset can destroy what the peer has not read yet.
    /// A wss client's close_notify after its close frame, and a client's close frame answering
    /// ours (goaway, idle, slow consumer, protocol errors), came in after the edge had stopped
    /// reading: reset. nginx's lingering_close and Apache's do the same for HTTP.
    fn begin_linger(&mut self, slot: u32) {
        let deadline_ms = self.now_ms() + self.cfg.ws.close_linger_ms;
        let Some(Some(c)) = self.conns.get_mut(slot as usize) else { return };
        c.closing = Closing::Lingering { deadline_ms, left: LINGER_BYTES };
        let tok = Token::new(OpKind::Shutdown, c.generation, slot);
        if Sq::new(&mut self.ring).shutdown_write(slot, tok).is_err() {
            // The kernel pushed back: no FIN went out, so the peer has no cue to close. Close
            // now, as without lingering.
            c.closing = Closing::Abort;
            return self.maybe_release(slot);
        }
        c.shutdown_issued = true;
        if !c.recv_armed {
            self.arm_recv(slot);
        }
    }

    /// The lingering close's SHUT_WR completed: the slot may be closed now (`maybe_release`).
    /// Failed (the peer reset meanwhile), no FIN went out: nothing to wait for.
    pub(super) fn on_shutdown(&mut self, tok: Token, res: i32) {
        let slot = tok.slot;
        let Some(Some(c)) = self.conns.get_mut(slot as usize) else { return };
        if c.generation != tok.generation {
            return;
        }
        c.shutdown_issued = false;
        if res < 0 {
            self.end_linger(slot, LingerEnd::Error);
        }
        self.maybe_release(slot);
    }

    /// Ends a lingering close (`end` says how, counted): on to the release.
    pub(super) fn end_linger(&mut self, slot: u32, end: LingerEnd) {
        let Some(Some(c)) = self.conns.get_mut(slot as usize) else { return };
        if !matches!(c.closing, Closing::Lingering { .. }) {
            return;
        }
        self.stats.lingers.inc(end);
        c.closing = Closing::Abort;
        self.maybe_release(slot);
    }

    /// Closes at once: nothing more is sent.
    pub(super) fn abort(&mut self, slot: u32) {
        self.leave(slot);
        let Some(Some(c)) = self.conns.get_mut(slot as usize) else { return };
        c.closing = Closing::Abort;
        c.decoder = None;
        c.drop_unsent(c.in_flight as usize);
        self.maybe_release(slot);
    }

    /// Moves a closing connection along: cancel its operations, then close the descriptor once
    /// none is in flight (an operation owns its file and buffers until it completes).
    pub(super) fn maybe_release(&mut self, slot: u32) {
        let Some(Some(c)) = self.conns.get_mut(slot as usize) else { return };
        // A lingering connection moves on only through `end_linger`.
        if matches!(c.closing, Closing::No | Closing::Lingering { .. }) || c.close_issued {
            return;
        }
        let flushed = c.closing == Closing::Abort || (c.out.is_empty() && c.in_flight == 0);
        if !flushed {
            return;
        }
        if let Closing::AfterFlush { linger: true, .. } = c.closing {
            return self.begin_linger(slot);
        }
        if c.recv_armed || c.in_flight > 0 {
            if !c.cancel_issued {
                c.cancel_issued = true;
                let tok = Token::new(OpKind::Cancel, c.generation, slot);
                // The usual case, a flushed connection with only its multishot recv armed, cancels
                // that recv by its token: the kernel finds it in its cancel hash. Cancelling by
                // descriptor walks every armed poll of the ring, twice with `all` (io_uring's
                // `io_poll_file_find`), so closing n connections of a ring cost O(n^2) kernel
                // time: a drain of 15,400 connections per ring kept 13 shards busy in the kernel
                // for 79 s, past the drain's deadline, and starved every other process on this
                // non-preemptible kernel (bench-results/2026-12-01-restart-storm-README.md).
                // With sends in flight (an abort), by descriptor: every operation on it.
                let r = if c.in_flight == 0 {
                    Sq::new(&mut self.ring).cancel_token(Token::new(OpKind::Recv, c.generation, slot), tok)
                } else {
                    Sq::new(&mut self.ring).cancel_fixed(slot, tok)
                };
                if r.is_err() {
                    c.cancel_issued = false;
                    self.retry.push((Retry::Release, slot));
                }
            }
            return;
        }
        if c.shutdown_issued {
            return; // on_shutdown comes back here
        }
        c.close_issued = true;
        let tok = Token::new(OpKind::Close, c.generation, slot);
        if Sq::new(&mut self.ring).close_fixed(slot, tok).is_err() {
            c.close_issued = false;
            self.retry.push((Retry::Release, slot));
        }
    }

    /// Stops accepting: cancels the accepts and closes the listening socket, so the kernel
    /// sends new connections to the other shards' sockets, or refuses them once all shards are
    /// draining.
    pub(super) fn stop_accepting(&mut self) {
        self.accepting = false;
        let Some(l) = self.listener.take() else { return };
        if self.accepts_armed == 0 {
            return; // nothing in flight owns it: close now
        }
        // Cancel the accepts by the listener's fd and keep the socket open until their last
        // completion (on_accept drops it). Closing the fd first, as this once did, left the
        // cancel nothing to find: the accepts kept the listener alive in the kernel and new
        // connections were accepted and dropped with EOF during a drain.
        let fd = l.as_raw_fd();
        if Sq::new(&mut self.ring).cancel_fd(fd, Token::new(OpKind::Cancel, 0, 0)).is_err() {
            // The SQ is full: submit what is queued and try again once.
            let _ = self.ring.submit();
            let _ = Sq::new(&mut self.ring).cancel_fd(fd, Token::new(OpKind::Cancel, 0, 0));
        }
        self.retiring = Some(l);
    }

    /// The shard's measured capacity, from its own thread's CPU time and run-queue wait: frames
    /// written per CPU-second, the share of the CPU it gets when it wants it (other shards and
    /// other processes take the rest), and its demand (running or waiting to run) as a share of
    /// wall time, all smoothed (EWMA, a few seconds). What the latency controller can spend is
    /// what this machine, under this load, does.
    fn estimate_capacity(&mut self, now: Instant) {
        const ALPHA: f64 = 0.3;
        let perf = self.perf.get_or_insert_with(|| {
            crate::perfcount::ThreadCounters::open_for_this_thread(&format!("shard-{}", self.id), &self.stats.perf)
        });
        perf.publish(&self.stats.perf);
        let cpu = crate::sys::thread_cpu_time();
        let wait = crate::sys::thread_run_delay().unwrap_or_default();
        let frames = self.stats.frames_written.get();
        if let Some((cpu0, wait0, f0, t0)) = self.capacity_at {
            let dcpu = cpu.saturating_sub(cpu0).as_secs_f64();
            let dwait = wait.saturating_sub(wait0).as_secs_f64();
            let dwall = now.saturating_duration_since(t0).as_secs_f64();
            let ewma = |old: f64, new: f64| if old == 0.0 { new } else { old + ALPHA * (new - old) };
            if dwall > 0.0 {
                self.stats.busy.set(ewma(self.stats.busy.get(), ((dcpu + dwait) / dwall).min(1.0)));
            }
            if dcpu + dwait >= 0.02 {
                let got = dcpu / (dcpu + dwait);
                self.stats.cpu_share.set(ewma(self.stats.cpu_share.get(), got));
            }
            // Only a turn with real work says what a CPU-second buys.
            if dcpu >= 0.02 && frames > f0 {
                let fps = (frames - f0) as f64 / dcpu;
                self.stats.frames_per_cpu_s.set(ewma(self.stats.frames_per_cpu_s.get(), fps));
            }
        }
        self.capacity_at = Some((cpu, wait, frames, now));
        self.post_delivery(now);
    }

    /// Once a second: this shard's capacity and its gift p99 over the last second, for the
    /// engines' latency controller (adaptive.rs).
    fn post_delivery(&mut self, now: Instant) {
        use prometheus::core::Metric as _;
        if self.latency_snap.as_ref().is_some_and(|(_, t)| now.saturating_duration_since(*t) < Duration::from_secs(1)) {
            return;
        }
        let m = self.stats.latency_must.metric();
        let h = m.get_histogram();
        let counts: Vec<u64> = h
            .get_bucket()
            .iter()
            .map(prometheus::proto::Bucket::cumulative_count)
            .chain([h.get_sample_count()])
            .collect();
        let bounds: Vec<f64> = h.get_bucket().iter().map(prometheus::proto::Bucket::upper_bound).collect();
        let p99 = self.latency_snap.as_ref().and_then(|(before, _)| {
            let d: Vec<u64> = counts.iter().zip(before).map(|(a, b)| a.saturating_sub(*b)).collect();
            let total = *d.last()?;
            if total == 0 {
                return None;
            }
            let rank = (total as f64 * 0.99).ceil() as u64;
            // Past the last bound: report twice it (the controller only needs "too late").
            let secs = bounds
                .iter()
                .zip(&d)
                .find(|&(_, &c)| c >= rank)
                .map_or(bounds.last().copied().unwrap_or(20.0) * 2.0, |(b, _)| *b);
            Some(Duration::from_secs_f64(secs))
        });
        let share = if self.stats.cpu_share.get() > 0.0 { self.stats.cpu_share.get() } else { 1.0 };
        self.load.set_delivery(self.id, self.stats.frames_per_cpu_s.get(), share, self.stats.busy.get(), p99);
        self.latency_snap = Some((counts, now));
    }

    pub(super) fn begin_drain(&mut self, url: Arc<str>, period_ms: u64) {
        if self.drain_url.is_some() {
            return;
        }
        tracing::info!(shard = self.id, open = self.open, period_ms, "draining");
        self.drain_url = Some(url);
        self.stop_accepting();
        let now = self.now_ms();
        for slot in 0..self.conns.len() {
            let jitter = if period_ms == 0 { 0 } else { self.rng.u64(..period_ms) };
            if let Some(Some(c)) = self.conns.get_mut(slot) {
                c.goaway_at_ms = Some(now + jitter);
            }
        }
    }

    /// Holds the goaways not sent yet, or lets them go again, each as much later as the hold
    /// lasted (the drain's pacing, `main.rs`'s `run_drain`).
    pub(super) fn hold_drain(&mut self, hold: bool) {
        let now = self.now_ms();
        match (hold, self.drain_held_since) {
            (true, None) => self.drain_held_since = Some(now),
            (false, Some(since)) => {
                self.drain_held_since = None;
                let held = now.saturating_sub(since);
                for c in self.conns.iter_mut().flatten() {
                    if let Some(t) = &mut c.goaway_at_ms {
                        *t += held;
                    }
                }
            }
            _ => {}
        }
    }

    pub(super) fn begin_shutdown(&mut self) {
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
                Phase::Open => {
                    self.closing_for(slot, CloseWhy::Shutdown);
                    self.close_with(slot, 1001, "server shutting down");
                }
                Phase::Handshake => {
                    self.closing_for(slot, CloseWhy::Shutdown);
                    self.abort(slot);
                }
            }
        }
    }

    pub(super) fn tick(&mut self) {
        let now = Instant::now();
        if now.duration_since(self.last_sweep) < Duration::from_millis(250) {
            return;
        }
        self.last_sweep = now;
        self.roll_refusal_log();
        self.estimate_capacity(now);
        if let Some(g) = &self.ipguard {
            // The shards take the address table's stripes in turn, one each per sweep.
            g.sweep(self.sweep_stripe);
            self.sweep_stripe = self.sweep_stripe.wrapping_add(self.engines.len().max(1));
        }
        let now_ms = self.now_ms();
        let ws = &self.cfg.ws;
        let (hs_to, idle_to, ping_every) = (ws.handshake_timeout_ms, ws.idle_timeout_ms, ws.ping_interval_ms);
        let mut queued = 0usize;
        let mut to_abort = Vec::new();
        let mut to_close = Vec::new();
        let mut to_ping = Vec::new();
        let mut to_goaway = Vec::new();
        let mut to_expire = Vec::new();
        let mut to_unlinger = Vec::new();
        // Expiry with the same clock-skew leeway the handshake and refresh allow.
        let now_s = super::session::now_s().saturating_sub(self.cfg.auth.leeway_s);
        let held = self.drain_held_since;
        for (slot, c) in self.conns.iter_mut().enumerate() {
            let Some(c) = c else { continue };
            queued += c.out_bytes;
            if c.closing == Closing::No && held.is_none() && c.goaway_at_ms.is_some_and(|t| now_ms >= t) {
                to_goaway.push(slot as u32);
                continue;
            }
            match c.closing {
                Closing::AfterFlush { deadline_ms, .. } if now_ms >= deadline_ms && !c.close_issued => {
                    to_abort.push(slot as u32);
                    continue;
                }
                Closing::Lingering { deadline_ms, .. } if now_ms >= deadline_ms => {
                    to_unlinger.push(slot as u32);
                    continue;
                }
                Closing::No => {}
                _ => continue,
            }
            match c.phase {
                Phase::Handshake if now_ms.saturating_sub(c.opened_ms) >= hs_to => {
                    to_abort.push(slot as u32);
                }
                // An event stream's client never speaks: no idle timeout (a dead peer fails a
                // write: the heartbeats below see to it that there is one). See `is_idle`.
                Phase::Open
                    if c.proto != Subprotocol::Sse
                        && is_idle(
                            now_ms,
                            Activity {
                                rx: c.last_rx_ms,
                                tx: c.last_tx_ms,
                                data: c.last_data_ms,
                                out_bytes: c.out_bytes,
                                in_flight: c.in_flight,
                            },
                            idle_to,
                        ) =>
                {
                    to_close.push(slot as u32);
                }
                Phase::Open if c.identity.as_ref().and_then(|i| i.exp).is_some_and(|exp| exp <= now_s) => {
                    to_expire.push(slot as u32);
                }
                // A member that took a message frame within the interval needs no ping (nor an
                // event stream a heartbeat): the room's traffic keeps NAT and proxies open, and
                // TCP_USER_TIMEOUT fails the connection if those bytes go unacknowledged. At 10^6
                // members, pings every 30 s were 33,000 writes and 33,000 pongs a second beside
                // a gift's 10^6 writes every 10 s. Due one interval after whatever came last of
                // its opening, its last message frame and its last ping: not on a fixed beat, or
                // a room falling quiet just after a skipped beat would get its first ping up to
                // two intervals later, past an idle timeout under twice the interval (a new
                // user's trial: 8 s pings, 9 s timeout, members who answered every ping closed).
                Phase::Open
                    if ping_every > 0
                        && now_ms >= ping_due(c.opened_ms, c.last_data_ms, c.last_ping_ms, ping_every) =>
                {
                    c.last_ping_ms = now_ms;
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
                self.stats.handshake_refusals.inc("timeout");
                self.closing_for(slot, CloseWhy::HandshakeTimeout);
                if self.log_refusal() {
                    let c = self.conns[slot as usize].as_ref();
                    let peer = c.and_then(|c| c.peer).map_or_else(|| "unknown".to_owned(), |p| p.to_string());
                    // With TLS: the TLS handshake and the upgrade together took too long.
                    let tls = c.is_some_and(|c| c.tls.is_some());
                    tracing::info!(shard = self.id, slot, peer = %peer, tls, timeout_ms = hs_to, "handshake timed out: closed");
                }
            }
            self.abort(slot);
        }
        for slot in to_unlinger {
            self.end_linger(slot, LingerEnd::Timeout);
        }
        for slot in to_close {
            self.closing_for(slot, CloseWhy::IdleTimeout);
            self.close_with(slot, 1001, "idle timeout");
        }
        for slot in to_expire {
            // No refresh before `exp`: say so, then close with 4001 (reconnect with a new token).
            self.stats.refused("token_expired");
            self.send_error(slot, "token_expired", "the connection's token expired: reconnect with a new one");
            self.closing_for(slot, CloseWhy::TokenExpired);
            self.close_with(slot, 4001, "token expired");
        }
        for slot in to_ping {
            if matches!(&self.conns[slot as usize], Some(c) if c.proto == Subprotocol::Sse) {
                self.push_frame(slot, Bytes::from_static(roomcast_proto::sse::HEARTBEAT));
            } else {
                self.send_control(slot, ws::encode_frame(OpCode::Ping, b""));
            }
        }
        if let Some(url) = self.drain_url.clone() {
            for slot in to_goaway {
                let (phase, room) = match self.conns[slot as usize].as_ref() {
                    Some(c) => (Some(c.phase), c.room.clone()),
                    None => (None, None),
                };
                if phase == Some(Phase::Open) {
                    let reconnect_after_ms = self.rng.u32(..GOAWAY_MAX_DELAY_MS as u32);
                    let url = goaway_url(&url, room.as_deref());
                    let msg = ServerMsg::Goaway { url, reason: "edge draining".into(), reconnect_after_ms };
                    self.send_msg(slot, &msg);
                    self.stats.goaways.inc();
                    self.closing_for(slot, CloseWhy::Drain);
                    self.close_with(slot, 1001, "edge draining");
                } else {
                    self.closing_for(slot, CloseWhy::Drain);
                    self.abort(slot);
                }
            }
        }
        self.flush_dirty();
    }
}

/// The dispatch URL a draining connection is sent to, with its room in the query, so that
/// asking it answers a WebSocket URL for that room (the client adds `since` and `epoch`).
pub(crate) fn goaway_url(dispatch: &str, room: Option<&str>) -> String {
    match room {
        // Room names are URL-safe (A-Z a-z 0-9 _ . : -): no escaping needed.
        Some(r) => format!("{dispatch}{}room={r}", if dispatch.contains('?') { '&' } else { '?' }),
        None => dispatch.to_owned(),
    }
}

/// When a connection is due its next ping: one interval after the latest of its opening, the
/// last message frame it took and its last ping (see the ping arm in `tick`).
fn ping_due(opened_ms: u64, last_data_ms: Option<u64>, last_ping_ms: u64, ping_every: u64) -> u64 {
    opened_ms.max(last_data_ms.unwrap_or(0)).max(last_ping_ms) + ping_every
}

/// What a connection's idleness is judged by (times in ms since the shard started).
#[derive(Clone, Copy)]
struct Activity {
    /// The peer last sent something (a pong, a message, signalling).
    rx: u64,
    /// A write to it was last issued or last made progress.
    tx: u64,
    /// It last took a whole message frame (None: never).
    data: Option<u64>,
    /// Bytes queued to it, and whether a write to it is in flight.
    out_bytes: usize,
    in_flight: u16,
}

/// Whether an open connection is idle. Not while the peer spoke within `idle_to`, nor while it
/// takes the room's messages: it took a message frame within `idle_to` (a member of a busy
/// room is pinged only when its room falls quiet, so it has nothing to answer; one whose kernel
/// stops acknowledging is failed by TCP_USER_TIMEOUT, set to `idle_to` on the listeners, and one
/// whose reader stops shows as a stalled write). Otherwise idle when nothing is queued to it (a
/// quiet member that did not answer its pings), or when a write to it was issued (or last
/// progressed) `idle_to` ago and is still not taken: stalled. Frames queued that this shard has
/// not issued yet are the shard's own delay, not the peer's (at 10^6 members a gift's fan-out
/// queued pings for tens of seconds, and 898,935 members who were reading were closed as idle).
fn is_idle(now_ms: u64, a: Activity, idle_to: u64) -> bool {
    let silent = now_ms.saturating_sub(a.rx) >= idle_to;
    let taking = a.data.is_some_and(|t| now_ms.saturating_sub(t) < idle_to);
    let stalled = a.in_flight > 0 && now_ms.saturating_sub(a.tx) >= idle_to;
    silent && !taking && (a.out_bytes == 0 || stalled)
}

#[cfg(test)]
mod idle_tests {
    use super::{Activity, is_idle};

    /// The next ping follows the room's traffic, not a fixed beat: a room quiet since 10 s
    /// pings its members at 10 s + the interval (the trial's fixed beat, 8 s pings and a 9 s
    /// idle timeout, pinged up to 16 s after the last message and closed members who answered
    /// every ping), and a connection just opened is not pinged at once.
    #[test]
    fn the_next_ping_is_due_an_interval_after_the_last_traffic() {
        use super::ping_due;
        assert_eq!(ping_due(1_000, None, 0, 8_000), 9_000, "not at once on opening");
        assert_eq!(ping_due(1_000, Some(10_000), 0, 8_000), 18_000, "an interval after the last message");
        assert_eq!(ping_due(1_000, Some(10_000), 18_000, 8_000), 26_000, "then an interval after the ping");
        assert_eq!(ping_due(1_000, Some(30_000), 26_000, 8_000), 38_000, "traffic again pushes it back");
    }

    fn at(rx: u64, tx: u64, data: Option<u64>, out_bytes: usize, in_flight: u16) -> Activity {
        Activity { rx, tx, data, out_bytes, in_flight }
    }

    #[test]
    fn a_peer_still_taking_its_queue_is_not_idle_a_stalled_one_is() {
        // Silent for 100 s with nothing queued: idle.
        assert!(is_idle(100_000, at(0, 0, None, 0, 0), 90_000));
        // Silent as long, but our write to it (its ping behind a gift) moved a second ago.
        assert!(!is_idle(100_000, at(0, 99_000, None, 4096, 1), 90_000));
        // A write issued 91 s ago and still not taken: stalled, idle all the same.
        assert!(is_idle(100_000, at(0, 9_000, None, 4096, 1), 90_000));
        // Frames this shard has not issued yet (its own backlog): not the peer's silence.
        assert!(!is_idle(100_000, at(0, 9_000, None, 4096, 0), 90_000));
        // Heard from recently: never idle.
        assert!(!is_idle(100_000, at(50_000, 0, None, 0, 0), 90_000));
    }

    /// A member of a busy room is not pinged, so it has nothing to answer: taking the room's
    /// messages keeps it. The input: the 10^6 run's members, whose pongs came 60-77 s late
    /// behind the gifts in their receive buffers, closed as idle by the 840,000.
    #[test]
    fn a_peer_taking_the_rooms_messages_is_not_idle() {
        // Silent for 100 s, nothing queued, but it took a gift 5 s ago.
        assert!(!is_idle(100_000, at(0, 95_000, Some(95_000), 0, 0), 90_000));
        // The last message it took was 91 s ago and it never answered the pings since.
        assert!(is_idle(100_000, at(0, 70_000, Some(9_000), 0, 0), 90_000));
        // A message write stalled for 91 s: its last taken frame is as old.
        assert!(is_idle(100_000, at(0, 9_000, Some(9_000), 4096, 1), 90_000));
    }
}
