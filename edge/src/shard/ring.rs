//! The ring: arming the shard's long-lived operations (multishot accept, multishot recv, the
//! doorbell read) and handling every completion. An operation owns its file and buffer until
//! its last completion arrives.

use std::io;
use std::os::fd::AsRawFd;

use io_uring::cqueue;

use roomcast_proto::Subprotocol;
use roomcast_proto::handshake::HandshakeError;

use super::conn::{Closing, Conn, Phase};
use super::{BGID, LATENCY_SAMPLE, Retry, SENDS_PER_TURN, Shard};
use crate::ipguard::Verdict;
use crate::metrics::{CloseWhy, LingerEnd};
use crate::uring::{OpKind, Sq, Token};

/// Accepts kept in flight on the listener. Single-shot, each with its own address buffer:
/// multishot accept reports no peer address, and the per-address bounds need one. A loop turn
/// takes up to this many new connections; the next turn re-arms them.
pub(super) const ACCEPTS: usize = 16;

/// Where one accept writes its peer's address.
pub(super) struct AcceptBuf {
    addr: libc::sockaddr_storage,
    len: libc::socklen_t,
}

impl Default for AcceptBuf {
    fn default() -> Self {
        Self { addr: crate::sys::sockaddr_storage(), len: 0 }
    }
}

impl Shard {
    pub(super) fn arm_accept(&mut self) {
        if !self.accepting {
            return;
        }
        let Some(fd) = self.listener.as_ref().map(AsRawFd::as_raw_fd) else { return };
        for i in 0..ACCEPTS {
            if self.accepts_armed & (1 << i) != 0 {
                continue;
            }
            let b = &mut self.accepts[i];
            b.len = size_of::<libc::sockaddr_storage>() as libc::socklen_t;
            let (addr, len) = (&raw mut b.addr, &raw mut b.len);
            let tok = Token::new(OpKind::Accept, 0, i as u32);
            // SAFETY: the buffers live in a boxed slice owned by the shard, which outlives the
            // ring's operations; an armed buffer is not touched until its completion.
            match unsafe { Sq::new(&mut self.ring).accept(fd, addr, len, tok) } {
                Ok(()) => self.accepts_armed |= 1 << i,
                Err(_) => return self.retry.push((Retry::Accept, 0)),
            }
        }
    }

    pub(super) fn arm_doorbell(&mut self) {
        let fd = self.doorbell.as_raw_fd();
        let buf: *mut u64 = &raw mut *self.doorbell_buf;
        // SAFETY: `doorbell_buf` is a heap allocation owned by the shard, which outlives the ring's
        // operations (the ring is dropped first); it is only re-armed after the last read completed.
        if unsafe { Sq::new(&mut self.ring).read_eventfd(fd, buf, Token::new(OpKind::Wake, 0, 0)) }.is_err() {
            self.retry.push((Retry::Doorbell, 0));
        }
    }

    pub(super) fn arm_recv(&mut self, slot: u32) {
        let Some(c) = self.conns.get_mut(slot as usize).and_then(Option::as_mut) else { return };
        // A lingering connection reads too (what it reads is discarded).
        if c.recv_armed || !matches!(c.closing, Closing::No | Closing::Lingering { .. }) {
            return;
        }
        let tok = Token::new(OpKind::Recv, c.generation, slot);
        match Sq::new(&mut self.ring).recv_multi(slot, BGID, tok) {
            Ok(()) => c.recv_armed = true,
            Err(_) => self.retry.push((Retry::Recv, slot)),
        }
    }

    pub(super) fn reap(&mut self) {
        let mut cqes = std::mem::take(&mut self.cqes);
        cqes.clear();
        cqes.extend(self.ring.completion().map(|e| (e.user_data(), e.result(), e.flags())));
        for &(ud, res, flags) in &cqes {
            let Some(tok) = Token::decode(ud) else { continue };
            match tok.kind {
                OpKind::Accept => self.on_accept(tok.slot as usize, res),
                OpKind::Recv => self.on_recv(tok, res, flags),
                OpKind::Send => self.on_send(tok, res),
                OpKind::Close => self.on_close(tok, res),
                OpKind::Wake => {
                    if res < 0 && res != -libc::EAGAIN && res != -libc::EINTR {
                        tracing::error!(shard = self.id, error = %io::Error::from_raw_os_error(-res), "doorbell read failed");
                    }
                    self.arm_doorbell();
                }
                OpKind::Shutdown => self.on_shutdown(tok, res),
                OpKind::Cancel => {}
            }
        }
        self.cqes = cqes;
    }

    pub(super) fn on_accept(&mut self, idx: usize, res: i32) {
        self.accepts_armed &= !(1 << idx);
        if self.accepts_armed == 0
            && let Some(l) = self.retiring.take()
        {
            // The accepts' last completion: a retired listener can be closed now.
            drop(l);
            tracing::debug!(shard = self.id, "listener closed");
        }
        if res < 0 {
            self.stats.accept_errors.inc();
            if res == -libc::ENFILE {
                // The kernel took the connection off the queue and closed it (no descriptor to
                // put it in): the client sees it reset. A close like any other, by its reason.
                self.stats.closed.inc(CloseWhy::TableFull);
                if self.log_refusal() {
                    tracing::warn!(
                        shard = self.id,
                        open = self.open,
                        "direct descriptor table full; connection refused"
                    );
                }
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
        let peer = self.accepts.get(idx).and_then(|b| crate::sys::peer_of(&b.addr, b.len)).map(|a| a.ip());
        let verdict = match (&self.ipguard, peer) {
            (Some(g), Some(ip)) => g.admit(ip),
            _ => Verdict::Admit { counted: false },
        };
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
        let mut conn = Conn::new(generation, self.now_ms());
        if let Some(cfg) = &self.tls {
            match super::tls::TlsConn::new(cfg) {
                Ok(t) => conn.tls = Some(t),
                // Not expected (a server session needs nothing but the config): refused below.
                Err(e) => tracing::error!(shard = self.id, error = %e, "cannot start a TLS session"),
            }
        }
        let tls_failed = self.tls.is_some() && conn.tls.is_none();
        conn.peer = peer;
        conn.peer_counted = verdict == Verdict::Admit { counted: true };
        self.conns[idx] = Some(conn);
        self.open += 1;
        self.stats.accepted.inc();
        self.stats.connections.inc();
        if tls_failed {
            self.closing_for(slot, CloseWhy::TlsError);
            self.abort(slot);
            return self.arm_accept();
        }
        match verdict.reason() {
            None => self.arm_recv(slot),
            // Over a per-address bound: answer 429 at once and close, without reading the
            // request (a refused client must not hold a slot while it takes its time).
            Some(reason) => {
                self.stats.refused(reason);
                let why = match verdict {
                    Verdict::TooMany => "too many connections from your address",
                    _ => "connecting too fast from your address",
                };
                self.refuse_as(slot, &HandshakeError { status: 429, reason: why.into() }, false);
            }
        }
        self.arm_accept();
    }

    pub(super) fn on_recv(&mut self, tok: Token, res: i32, flags: u32) {
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
            match c.closing {
                Closing::No if res == -libc::ENOBUFS => {
                    // Every receive buffer is in use: this shard is behind. Re-arm; the buffers
                    // come back as soon as the completions ahead of this one are processed.
                    if !more {
                        self.arm_recv(slot);
                    }
                }
                Closing::No => {
                    // 0: the peer closed; <0: reset or error.
                    self.closing_for(slot, failed_why(res));
                    self.abort(slot);
                }
                // Lingering: the peer's FIN is what it waits for; out of buffers, read on.
                Closing::Lingering { .. } if res == -libc::ENOBUFS => {
                    if !more {
                        self.arm_recv(slot);
                    }
                }
                Closing::Lingering { .. } => {
                    self.end_linger(slot, if res == 0 { LingerEnd::Fin } else { LingerEnd::Error });
                }
                Closing::AfterFlush { deadline_ms, linger } => {
                    // The peer has closed its side (or failed): nothing more can come, so no
                    // lingering once flushed. (Out of buffers: `begin_linger` re-arms.)
                    if linger && res != -libc::ENOBUFS {
                        c.closing = Closing::AfterFlush { deadline_ms, linger: false };
                    }
                    self.maybe_release(slot);
                }
                // Whatever ended the receive (ECANCELED, EOF...), an aborted connection moves
                // on to its release: re-arming is refused, so waiting for anything else here
                // would leak the slot.
                Closing::Abort => self.maybe_release(slot),
            }
            return;
        }
        let Some(bid) = bid else {
            self.closing_for(slot, CloseWhy::PeerReset);
            self.abort(slot);
            return;
        };
        c.last_rx_ms = self.epoch.elapsed().as_millis() as u64;
        match c.closing {
            Closing::No => {}
            Closing::Lingering { deadline_ms, left } => {
                // Read so that the close finds nothing unread; discarded, and bounded: a peer
                // that keeps sending after our close is cut.
                self.bufring.recycle(bid);
                match left.checked_sub(res as u32) {
                    Some(left) => {
                        c.closing = Closing::Lingering { deadline_ms, left };
                        if !more {
                            self.arm_recv(slot);
                        }
                    }
                    None => self.end_linger(slot, LingerEnd::Bytes),
                }
                return;
            }
            Closing::AfterFlush { .. } | Closing::Abort => {
                // Input after we decided to close is ignored (the close handshake is best
                // effort); it is read on while lingering.
                self.bufring.recycle(bid);
                self.maybe_release(slot);
                return;
            }
        }
        if let Some(t) = c.tls.as_mut() {
            // wss: decrypted first, then the same path as below (shard/tls.rs).
            let data = self.bufring.get_mut(bid, res as usize);
            self.tls_plain.clear();
            let fed = t.feed(data, &mut self.tls_plain).map_err(|e| (e, super::tls::looks_like_http(data)));
            self.bufring.recycle(bid);
            self.tls_recv(slot, fed);
            if !more {
                self.arm_recv(slot);
            }
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
            Phase::Open if c.proto == Subprotocol::Sse => {
                // An event stream's client has nothing to say: counted, bounded, not read.
                self.bufring.recycle(bid);
                self.sse_input(slot, res as usize);
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

    pub(super) fn on_send(&mut self, tok: Token, res: i32) {
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
            if let Some(t) = c.tls.as_mut() {
                // The ciphertext is void with its connection.
                t.wire.clear();
                t.wire_off = 0;
            }
            c.drop_unsent(0);
            self.closing_for(slot, failed_why(res));
            self.abort(slot);
            return;
        }
        self.stats.bytes_written.inc_by(res as u64);
        // wss: `res` is ciphertext; the frames count once all of theirs is written.
        let written = if c.tls.is_some() {
            match self.tls_sent(slot, in_flight, res as usize) {
                Some(plain) => plain,
                None => return,
            }
        } else {
            res as usize
        };
        let now_ms = self.epoch.elapsed().as_millis() as u64;
        let Some(Some(c)) = self.conns.get_mut(slot as usize) else { return };
        c.last_tx_ms = now_ms;
        // Delivery latency, sampled: one message frame in LATENCY_SAMPLE at random (a fixed
        // stride aliases with periodic traffic: gifts and chat alternating on 4 members per
        // shard put every 16th frame on chat), the clock read only for those.
        let (stats, rng) = (&self.stats, &mut self.rng);
        let mut now = None;
        let queued_before = c.out_bytes;
        let (frames, messages) = c.consume(written, in_flight, |f| {
            let Some(since) = f.since.filter(|_| f.messages > 0) else { return };
            if rng.u32(..LATENCY_SAMPLE) != 0 {
                return;
            }
            let now = *now.get_or_insert_with(std::time::Instant::now);
            let secs = now.saturating_duration_since(since).as_secs_f64();
            if f.carries_must_deliver() {
                stats.latency_must.observe(secs);
            } else {
                stats.latency_droppable.observe(secs);
            }
            // The same sample per kind, each from its own oldest message in the frame.
            for (kind, since) in f.kind_times() {
                if let Some(h) = stats.latency_kind.get(usize::from(kind)) {
                    h.observe(now.saturating_duration_since(since).as_secs_f64());
                }
            }
        });
        // Frames written whole pay the replay credit back first (the replay was queued
        // ahead). By frames, not bytes: a frame partly written still counts whole in
        // `out_bytes`, and paying for its written part early left a slow reader catching up
        // on a large replay over the bound: closed with 4000 on every attempt.
        let paid = c.replay_credit.min(queued_before - c.out_bytes);
        c.replay_credit -= paid;
        self.replay_held -= paid;
        if c.upgrade_unsent && frames > 0 {
            // The 101 is the first frame a WebSocket connection is sent.
            c.upgrade_unsent = false;
            stats.handshake_seconds.observe(now_ms.saturating_sub(c.opened_ms) as f64 / 1000.0);
        }
        self.stats.frames_written.inc_by(frames);
        self.stats.messages_delivered.inc_by(messages);
        if messages > 0 {
            c.last_data_ms = Some(now_ms);
        }
        if c.closing == Closing::Abort {
            c.drop_unsent(0);
            self.maybe_release(slot);
        } else if !c.out.is_empty() {
            if self.sends_this_turn < SENDS_PER_TURN {
                self.issue_send(slot);
            } else {
                self.mark_dirty(slot);
            }
        } else if c.closing != Closing::No {
            self.maybe_release(slot);
        }
    }

    pub(super) fn on_close(&mut self, tok: Token, res: i32) {
        let slot = tok.slot as usize;
        if res < 0 {
            tracing::warn!(shard = self.id, slot, error = %io::Error::from_raw_os_error(-res), "close failed");
        }
        if let Some(c) = self.conns.get(slot).and_then(Option::as_ref)
            && c.generation == tok.generation
        {
            let mut why = CloseWhy::PeerClosed;
            if let Some(c) = self.conns[slot].take() {
                why = c.why.unwrap_or(CloseWhy::PeerClosed);
                self.replay_held -= c.replay_credit;
                if c.proto == Subprotocol::Sse {
                    self.stats.sse_connections.dec();
                }
                if c.peer_counted
                    && let (Some(g), Some(ip)) = (&self.ipguard, c.peer)
                {
                    g.release(ip);
                }
            }
            self.open -= 1;
            self.stats.connections.dec();
            self.stats.closed.inc(why);
            // A free slot again: if accepting stopped on a full table, resume.
            self.arm_accept();
        }
    }
}

/// Why a receive or send that ended with `res` (0 or a negative errno) ended the connection.
/// ETIMEDOUT is TCP_USER_TIMEOUT (`ws.idle_timeout_ms`): the peer acknowledged none of our
/// bytes for the idle timeout, because it vanished or, on this kernel, held a zero window that
/// long (a reader that stopped): the idle timeout's business, not a reset by the network.
fn failed_why(res: i32) -> CloseWhy {
    match res {
        0 => CloseWhy::PeerClosed,
        r if r == -libc::ETIMEDOUT => CloseWhy::IdleTimeout,
        _ => CloseWhy::PeerReset,
    }
}

#[cfg(test)]
mod failed_why_tests {
    use super::{CloseWhy, failed_why};

    #[test]
    fn a_user_timeout_counts_as_idle_not_as_a_reset() {
        assert_eq!(failed_why(0), CloseWhy::PeerClosed);
        assert_eq!(failed_why(-libc::ETIMEDOUT), CloseWhy::IdleTimeout);
        assert_eq!(failed_why(-libc::ECONNRESET), CloseWhy::PeerReset);
        assert_eq!(failed_why(-libc::EPIPE), CloseWhy::PeerReset);
    }
}
