//! Members' first connects, many in flight per worker, without blocking its loop.
//!
//! A worker keeps up to `--connect-inflight` members between their `connect` and their upgrade
//! answer. Each is a nonblocking socket registered with the worker's own epoll (the one that
//! reads the members): the connect completes as writability, the request goes out, the answer
//! comes in as readability, and the member then joins the reading loop under its own token.
//! Why this rather than connector threads: a member in flight costs its socket, its request
//! and the answer read so far (a few hundred bytes, freed once it is a member), where a thread
//! costs a stack and a scheduler entity, and still waits on one socket at a time; the loop
//! already has the epoll. One blocking connect at a time per worker held the 10^6 attempt to
//! 2,000 connects/s once a handshake took ~30 ms on the loaded box (bench-results/
//! 2026-11-30-million-README.md). TLS members keep the blocking path (`open_to`: rustls's
//! handshake inside a blocking write and read), one at a time.
//!
//! Moves (after a goaway or a lost socket) end in the same [`Pending`] connect and upgrade, in a
//! window of their own ([`MOVE_TOKEN_BASE`]; see the worker's `moves` module).

use std::io::Read;
use std::net::{SocketAddr, TcpStream};
use std::os::fd::{AsRawFd, RawFd};
use std::time::{Duration, Instant};

use socket2::Socket;

use crate::worker::{WorkerArgs, check_answer, member_request, member_socket};

/// How long a member may take from its connect to the end of its upgrade answer (the blocking
/// path allows 10 s for each; a SYN dropped by a full accept queue is resent after 1 s, 3 s...).
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// The longest upgrade answer taken.
const ANSWER_LIMIT: usize = 4096;

/// Writes what is left of `req` (from `*sent`) to a nonblocking socket whose connect may still
/// be under way: true once all of it is written, false to wait for writability, an error for a
/// failed connect (the socket's pending error: refused, reset, unreachable) or write.
pub(crate) fn send_request(sock: &Socket, req: &[u8], sent: &mut usize) -> anyhow::Result<bool> {
    use std::io::ErrorKind as K;
    if let Some(e) = sock.take_error()? {
        return Err(e.into());
    }
    while *sent < req.len() {
        match sock.send(&req[*sent..]) {
            Ok(n) => *sent += n,
            // Still connecting (EAGAIN; ENOTCONN on some kernels), or no room yet.
            Err(e) if e.kind() == K::WouldBlock || e.raw_os_error() == Some(libc::ENOTCONN) => return Ok(false),
            Err(e) if e.kind() == K::Interrupted => {}
            Err(e) => return Err(e.into()),
        }
    }
    Ok(true)
}

/// One member between its connect and its upgrade answer.
pub struct Pending {
    sock: Socket,
    /// This worker's connection index.
    pub i: usize,
    /// A slow reader (read outside epoll once upgraded).
    pub slow: bool,
    /// When its connect started.
    pub started: Instant,
    req: Vec<u8>,
    sent: usize,
    key: Option<String>,
    proto: &'static str,
    /// The answer so far.
    head: Vec<u8>,
}

/// Where a pending member stands after its socket was ready.
pub enum Step {
    /// Waiting for the socket (connect, room to write, the rest of the answer).
    Wait,
    /// Upgraded: take it out of the window and [`Pending::finish`] it.
    Done,
    /// Refused, reset, or not a valid answer.
    Failed(anyhow::Error),
}

impl Pending {
    /// Starts connection `i` to `dst` (nonblocking: the connect is under way when this returns).
    pub fn start(args: &WorkerArgs, i: usize, dst: SocketAddr, path: &str, slow: bool) -> anyhow::Result<Self> {
        let started = Instant::now();
        let sock = member_socket(args, i, slow)?;
        sock.set_nonblocking(true)?;
        match sock.connect(&dst.into()) {
            Ok(()) => {}
            Err(e) if e.raw_os_error() == Some(libc::EINPROGRESS) => {}
            Err(e) => return Err(e.into()),
        }
        let (req, key, proto) = member_request(args, dst, path)?;
        Ok(Self { sock, i, slow, started, req, sent: 0, key, proto, head: Vec::new() })
    }

    /// Its socket, for epoll.
    pub fn fd(&self) -> RawFd {
        self.sock.as_raw_fd()
    }

    /// Whether it has been in flight longer than [`HANDSHAKE_TIMEOUT`].
    pub fn expired(&self, now: Instant) -> bool {
        now.duration_since(self.started) > HANDSHAKE_TIMEOUT
    }

    /// Takes it as far as its socket allows now (`tmp`: scratch space for reading).
    pub fn drive(&mut self, tmp: &mut [u8]) -> Step {
        match self.advance(tmp) {
            Ok(false) => Step::Wait,
            Ok(true) => Step::Done,
            Err(e) => Step::Failed(e),
        }
    }

    /// An upgraded member's stream (nonblocking) and the bytes that came after the answer (the
    /// edge's `joined` may arrive in the same segment), which are the reading loop's.
    pub fn finish(mut self) -> (TcpStream, Vec<u8>) {
        let rest = self.head.split_off(self.answer_len());
        (self.sock.into(), rest)
    }

    /// The answer's length once complete (`head` ends with its blank line or goes past it).
    fn answer_len(&self) -> usize {
        self.head.windows(4).position(|w| w == b"\r\n\r\n").map_or(self.head.len(), |p| p + 4)
    }

    /// Returns whether the answer is complete and valid.
    fn advance(&mut self, tmp: &mut [u8]) -> anyhow::Result<bool> {
        use std::io::ErrorKind as K;
        if !send_request(&self.sock, &self.req, &mut self.sent)? {
            return Ok(false);
        }
        loop {
            match (&self.sock).read(tmp) {
                Ok(0) => return Err(std::io::Error::from(K::UnexpectedEof).into()),
                Ok(n) => {
                    let from = self.head.len().saturating_sub(3);
                    self.head.extend_from_slice(&tmp[..n]);
                    if self.head[from..].windows(4).any(|w| w == b"\r\n\r\n") {
                        let end = self.answer_len();
                        check_answer(&self.head[..end], self.key.as_deref(), self.proto)?;
                        return Ok(true);
                    }
                    anyhow::ensure!(self.head.len() < ANSWER_LIMIT, "handshake answer too long");
                }
                Err(e) if e.kind() == K::WouldBlock => return Ok(false),
                Err(e) if e.kind() == K::Interrupted => {}
                Err(e) => return Err(e.into()),
            }
        }
    }
}

/// Up to `cap` sockets in flight, each under a slot number: its epoll token is the window's
/// base + slot, apart from members' tokens, which are their indexes. Pending first connects use
/// [`TOKEN_BASE`]; moves ([`crate::worker`]'s dispatch request then connect) [`MOVE_TOKEN_BASE`].
pub struct Window<T> {
    /// Slots made so far: grown one at a time up to `cap`, never made up front, so a large
    /// `--connect-inflight` costs only the slots actually used (made up front, 10^12 of them
    /// aborted every worker on allocation, and 10^7 would have taken GiBs per worker).
    slots: Vec<Option<T>>,
    /// Made slots now empty.
    free: Vec<usize>,
    cap: usize,
    base: usize,
    /// The most in flight at once so far (reported: shows the window was used).
    pub peak: usize,
}

/// Epoll tokens from here on are pending members' slots.
pub const TOKEN_BASE: usize = 1 << 40;

/// Epoll tokens from here on are moves' slots (above every pending member's).
pub const MOVE_TOKEN_BASE: usize = 1 << 41;

impl<T> Window<T> {
    /// A window of `cap` (at least 1) whose tokens start at `base`.
    pub fn new(cap: usize, base: usize) -> Self {
        Self { slots: Vec::new(), free: Vec::new(), cap: cap.max(1), base, peak: 0 }
    }

    /// Sockets in flight.
    pub fn len(&self) -> usize {
        self.slots.len() - self.free.len()
    }

    /// Whether another may start.
    pub fn has_room(&self) -> bool {
        !self.free.is_empty() || self.slots.len() < self.cap
    }

    /// Puts `p` in a free slot (a new one if none is free); returns its token. Call only with
    /// room.
    pub fn insert(&mut self, p: T) -> usize {
        let slot = match self.free.pop() {
            Some(slot) => slot,
            None => {
                assert!(self.slots.len() < self.cap, "Window::insert without room");
                self.slots.push(None);
                self.slots.len() - 1
            }
        };
        self.slots[slot] = Some(p);
        self.peak = self.peak.max(self.len());
        self.base + slot
    }

    /// The one under `token`, if still in flight.
    pub fn get_mut(&mut self, token: usize) -> Option<&mut T> {
        self.slots.get_mut(token.checked_sub(self.base)?)?.as_mut()
    }

    /// Takes the one under `token` out.
    pub fn remove(&mut self, token: usize) -> Option<T> {
        let slot = token.checked_sub(self.base)?;
        let p = self.slots.get_mut(slot)?.take()?;
        self.free.push(slot);
        Some(p)
    }

    /// Tokens of those for which `expired` holds (run out of time).
    pub fn expired(&self, expired: impl Fn(&T) -> bool) -> Vec<usize> {
        self.slots
            .iter()
            .enumerate()
            .filter(|(_, p)| p.as_ref().is_some_and(&expired))
            .map(|(slot, _)| self.base + slot)
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::{TOKEN_BASE, Window};

    /// A window holds at most `cap`, reuses freed slots (tokens stay below the next base), and
    /// makes no slot before it is used: `--connect-inflight` far above what a worker ever has
    /// in flight (usize::MAX here) is a bound, not an allocation.
    #[test]
    fn a_window_makes_slots_as_they_are_used_up_to_its_cap() {
        let mut w: Window<u32> = Window::new(usize::MAX, TOKEN_BASE);
        assert_eq!(w.slots.capacity(), 0, "nothing made up front");
        let tokens: Vec<usize> = (0..3).map(|i| w.insert(i)).collect();
        assert_eq!(tokens, [TOKEN_BASE, TOKEN_BASE + 1, TOKEN_BASE + 2]);
        assert_eq!((w.len(), w.peak, w.slots.len()), (3, 3, 3));
        assert_eq!(w.remove(TOKEN_BASE + 1), Some(1));
        assert_eq!(w.insert(7), TOKEN_BASE + 1, "a freed slot is used before a new one");
        assert_eq!(w.slots.len(), 3);

        let mut w: Window<u32> = Window::new(2, TOKEN_BASE);
        assert!(w.has_room());
        let a = w.insert(1);
        w.insert(2);
        assert!(!w.has_room(), "at its cap");
        assert_eq!(w.remove(a), Some(1));
        assert!(w.has_room());
        assert_eq!(w.insert(3), a);
        assert_eq!(w.expired(|v| *v == 3), vec![a]);
        // 0 means 1.
        let mut w: Window<u32> = Window::new(0, TOKEN_BASE);
        w.insert(1);
        assert!(!w.has_room());
    }
}
