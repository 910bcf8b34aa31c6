//! io_uring plumbing: ring set-up, the kernel probe, operation tokens, the provided-buffer ring
//! and SQE builders. This module and `sys` are the only places in the edge with `unsafe`.
//!
//! Ownership rule (after monoio's `driver/op`): an operation in flight owns its file and its
//! buffer until its completion arrives. The builders that take a raw buffer are `unsafe` and
//! say so; the shard discharges the contract by keeping the frame (an `Rc<Bytes>`) at the front
//! of the connection's send queue until the completion for that send is reaped, and by closing
//! a connection's direct descriptor only once no operation on it is in flight.

pub mod bufring;

use std::io;
use std::os::fd::RawFd;
use std::time::Duration;

use io_uring::{IoUring, Probe, opcode, squeue, types};

pub use bufring::BufRing;

/// What an operation is, carried in the top byte of `user_data`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum OpKind {
    /// The multishot accept on the shard's listener (one per shard).
    Accept = 1,
    /// A connection's multishot receive into the buffer ring.
    Recv = 2,
    /// A write of queued frames to a connection.
    Send = 3,
    /// Closing a connection's direct descriptor.
    Close = 4,
    /// Cancelling another operation, or closing a slot whose result nobody waits for.
    Cancel = 5,
    /// The read of the shard's eventfd doorbell: mail has arrived.
    Wake = 6,
    /// A write-side socket shutdown (SHUT_WR: FIN after what is written), which starts a
    /// lingering close. The kernel runs it on an io-wq worker and resolves the direct
    /// descriptor there: the slot stays open until this completes.
    Shutdown = 7,
}

impl OpKind {
    fn from_u8(v: u8) -> Option<Self> {
        Some(match v {
            1 => Self::Accept,
            2 => Self::Recv,
            3 => Self::Send,
            4 => Self::Close,
            5 => Self::Cancel,
            6 => Self::Wake,
            7 => Self::Shutdown,
            _ => return None,
        })
    }
}

/// `user_data` of an operation: kind (8 bits) | generation (24 bits) | slot (32 bits).
/// The generation tells a completion for a connection that has since been replaced in its slot.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Token {
    /// Which operation completed.
    pub kind: OpKind,
    /// The slot's generation when the operation was submitted (low 24 bits).
    pub generation: u32,
    /// The connection slot (direct-descriptor index) it concerns.
    pub slot: u32,
}

impl Token {
    /// The bits of a generation that fit in `user_data`: generations wrap at 2^24.
    pub const GENERATION_MASK: u32 = 0x00ff_ffff;

    /// A token for an operation on `slot`, the generation cut to 24 bits.
    pub fn new(kind: OpKind, generation: u32, slot: u32) -> Self {
        Self { kind, generation: generation & Self::GENERATION_MASK, slot }
    }

    /// Packs the token into a `user_data` value.
    pub fn encode(self) -> u64 {
        (u64::from(self.kind as u8) << 56) | (u64::from(self.generation) << 32) | u64::from(self.slot)
    }

    /// Unpacks a `user_data` value; None if its kind byte is none of ours.
    pub fn decode(v: u64) -> Option<Self> {
        let kind = OpKind::from_u8((v >> 56) as u8)?;
        Some(Self { kind, generation: ((v >> 32) as u32) & Self::GENERATION_MASK, slot: v as u32 })
    }
}

/// Why the data plane cannot run on this kernel.
#[derive(Debug, thiserror::Error)]
pub enum UringError {
    #[error(
        "io_uring_setup failed: {0} (io_uring needs Linux 5.1+, must not be disabled by kernel.io_uring_disabled, and must be allowed by the seccomp profile: container runtimes' default profiles block it, see deploy/)"
    )]
    /// io_uring_setup refused (old kernel, disabled, or blocked by seccomp).
    Setup(#[source] io::Error),
    /// The kernel's probe lacks an opcode the shards use.
    #[error("this kernel lacks io_uring opcode {name}: {needed}")]
    MissingOpcode {
        /// The opcode.
        name: &'static str,
        /// What the edge needs it for.
        needed: &'static str,
    },
    /// The kernel release is older than `MIN_KERNEL`.
    #[error("this kernel ({release}) is too old: roomcast needs {needed}")]
    KernelTooOld {
        /// The running kernel's release (uname).
        release: String,
        /// The features and the release that has them.
        needed: &'static str,
    },
    /// Registering descriptors or buffers with the ring failed.
    #[error("cannot register {what}: {source}")]
    Register {
        /// What was being registered.
        what: &'static str,
        /// The kernel's error.
        #[source]
        source: io::Error,
    },
}

/// The oldest kernel with every feature the shards use: multishot recv with provided-buffer
/// rings (6.0), multishot accept into direct descriptors (5.19), DEFER_TASKRUN (6.1).
pub const MIN_KERNEL: (u32, u32) = (6, 1);

/// Builds one shard's ring: single issuer, deferred task work (completions are processed only
/// when the shard enters the kernel to wait, so nothing interrupts it mid-turn), a CQ sixteen
/// times the SQ (up to the kernel's 65536): every connection's multishot receive may post in
/// the same turn.
pub fn build_ring(sq_entries: u32) -> Result<IoUring, UringError> {
    IoUring::builder()
        .setup_single_issuer()
        .setup_defer_taskrun()
        .setup_coop_taskrun()
        .setup_cqsize((sq_entries * 16).min(65536))
        .build(sq_entries)
        .map_err(UringError::Setup)
}

/// io-wq workers one ring may run for socket operations (its "unbounded" pool, per NUMA
/// node). The shards' only work there is the lingering close's SHUT_WR: io_uring always hands
/// a shutdown to io-wq, which may start a worker for each one no worker is free for, and a
/// drain closes a ring's ~15,000 connections within its period: without a cap, hundreds of
/// kernel threads. A shutdown is quick; two workers keep up.
pub const IOWQ_MAX_UNBOUND: u32 = 2;

/// Caps the ring's io-wq socket workers at [`IOWQ_MAX_UNBOUND`] (Linux 5.15; the bounded
/// pool, for regular files, is left alone). Called on the ring's own thread (SINGLE_ISSUER).
pub fn limit_workers(ring: &IoUring) -> Result<(), UringError> {
    let mut max = [0, IOWQ_MAX_UNBOUND];
    ring.submitter()
        .register_iowq_max_workers(&mut max)
        .map_err(|source| UringError::Register { what: "io-wq worker limits", source })
}

impl UringError {
    /// The kernel was short of memory it charges to this user (ENOMEM: the locked-memory
    /// limit, or the memory cgroup), as opposed to refusing io_uring altogether.
    pub fn short_of_memory(&self) -> bool {
        let (Self::Setup(e) | Self::Register { source: e, .. }) = self else { return false };
        e.raw_os_error() == Some(libc::ENOMEM)
    }
}

/// How long a shard keeps trying to set its ring up while the kernel is short of memory.
pub const SETUP_RETRY_FOR: Duration = Duration::from_secs(60);

/// Runs `setup` (a shard's ring and its registrations) until it succeeds, fails otherwise than
/// short of memory, or has been short of memory for `retry_for`. An edge started on a box whose
/// previous edge just exited finds the kernel still freeing the old rings (their memory is
/// charged until the teardown, which runs after the exit, is done: a 10^6-member edge's took
/// long enough that the new edge's 28th ring got ENOMEM and the restart failed). Said once.
pub fn while_short_of_memory<T>(
    shard: u16,
    retry_for: Duration,
    mut setup: impl FnMut() -> Result<T, UringError>,
) -> Result<T, UringError> {
    let start = std::time::Instant::now();
    let mut said = false;
    loop {
        match setup() {
            Err(e) if e.short_of_memory() && start.elapsed() < retry_for => {
                if !said {
                    tracing::warn!(shard, error = %e, retry_for_s = retry_for.as_secs(), "io_uring is short of memory (an edge that just exited may still be having its rings freed, or RLIMIT_MEMLOCK is low): retrying");
                    said = true;
                }
                std::thread::sleep(Duration::from_millis(200));
            }
            Err(e) if e.short_of_memory() => {
                return Err(UringError::Register {
                    what: "the ring: still short of memory after retrying (raise RLIMIT_MEMLOCK, ulimit -l, or the memory cgroup's limit, or use fewer or smaller shards: uring.sq_entries, uring.recv_buffers)",
                    source: std::io::Error::from_raw_os_error(libc::ENOMEM),
                });
            }
            r => {
                if said {
                    tracing::info!(
                        shard,
                        waited_ms = start.elapsed().as_millis() as u64,
                        "io_uring set up after waiting for memory"
                    );
                }
                return r;
            }
        }
    }
}

/// Checks the running kernel for what the shards need, naming what is missing.
pub fn probe(ring: &IoUring) -> Result<(), UringError> {
    let release = crate::sys::kernel_release();
    if let Some(v) = parse_release(&release)
        && v < MIN_KERNEL
    {
        return Err(UringError::KernelTooOld {
            release,
            needed: "Linux 6.1 (multishot recv with provided-buffer rings, multishot accept into direct descriptors, DEFER_TASKRUN)",
        });
    }
    let mut probe = Probe::new();
    ring.submitter().register_probe(&mut probe).map_err(|source| UringError::Register { what: "probe", source })?;
    let needed: [(u8, &'static str, &'static str); 8] = [
        (opcode::AcceptMulti::CODE, "ACCEPT", "Linux 5.5 (multishot: 5.19)"),
        (opcode::RecvMulti::CODE, "RECV", "Linux 5.6 (multishot: 6.0)"),
        (opcode::Send::CODE, "SEND", "Linux 5.6"),
        (opcode::Writev::CODE, "WRITEV", "Linux 5.1"),
        (opcode::Close::CODE, "CLOSE", "Linux 5.6 (direct descriptors: 5.15)"),
        (opcode::AsyncCancel::CODE, "ASYNC_CANCEL", "Linux 5.5 (by fd: 5.19)"),
        (opcode::Read::CODE, "READ", "Linux 5.6"),
        (opcode::Shutdown::CODE, "SHUTDOWN", "Linux 5.11 (the lingering close's FIN)"),
    ];
    for (code, name, needed) in needed {
        if !probe.is_supported(code) {
            return Err(UringError::MissingOpcode { name, needed });
        }
    }
    Ok(())
}

fn parse_release(release: &str) -> Option<(u32, u32)> {
    let mut it = release.split(|c: char| !c.is_ascii_digit());
    let major = it.next()?.parse().ok()?;
    let minor = it.next()?.parse().ok()?;
    Some((major, minor))
}

/// Pushes SQEs, submitting when the queue is full, so callers never lose an entry.
pub struct Sq<'a> {
    ring: &'a mut IoUring,
}

impl<'a> Sq<'a> {
    /// Wraps the ring for pushing SQEs.
    pub fn new(ring: &'a mut IoUring) -> Self {
        Self { ring }
    }

    /// # Safety
    /// Every buffer and file the entry refers to must stay valid until its completion is reaped.
    unsafe fn push(&mut self, entry: &squeue::Entry) -> io::Result<()> {
        loop {
            // SAFETY: forwarded from the caller.
            if unsafe { self.ring.submission().push(entry) }.is_ok() {
                return Ok(());
            }
            // The SQ is full: hand what is queued to the kernel and retry. If the kernel
            // refuses (EBUSY: completions are backed up), the caller retries next turn, after
            // reaping.
            match self.ring.submit() {
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
    }

    /// Accepts one connection into a direct descriptor, writing the peer's address to
    /// `addr`/`len` (multishot accept cannot: its completions would share one buffer).
    ///
    /// # Safety
    /// `addr` and `len` must stay valid and untouched until the completion of `token` is reaped.
    pub unsafe fn accept(
        &mut self,
        listener: RawFd,
        addr: *mut libc::sockaddr_storage,
        len: *mut libc::socklen_t,
        token: Token,
    ) -> io::Result<()> {
        let e = opcode::Accept::new(types::Fd(listener), addr.cast(), len)
            .file_index(Some(types::DestinationSlot::auto_target()))
            .build()
            .user_data(token.encode());
        // SAFETY: forwarded from the caller; the listener fd outlives the operation.
        unsafe { self.push(&e) }
    }

    /// Cancels every operation on the (normal) file `fd`, e.g. a listener's accepts.
    pub fn cancel_fd(&mut self, fd: RawFd, token: Token) -> io::Result<()> {
        let e =
            opcode::AsyncCancel2::new(types::CancelBuilder::fd(types::Fd(fd)).all()).build().user_data(token.encode());
        // SAFETY: no buffer.
        unsafe { self.push(&e) }
    }

    /// Arms multishot recv on a direct descriptor, picking buffers from group `bgid`.
    pub fn recv_multi(&mut self, fixed: u32, bgid: u16, token: Token) -> io::Result<()> {
        let e = opcode::RecvMulti::new(types::Fixed(fixed), bgid).build().user_data(token.encode());
        // SAFETY: the buffers belong to the shard's `BufRing`, registered for the ring's life.
        unsafe { self.push(&e) }
    }

    /// Sends one buffer on a direct descriptor.
    ///
    /// # Safety
    /// `ptr..ptr+len` must stay valid and unchanged until the completion of `token` is reaped.
    pub unsafe fn send(&mut self, fixed: u32, ptr: *const u8, len: u32, token: Token) -> io::Result<()> {
        let e = opcode::Send::new(types::Fixed(fixed), ptr, len)
            .flags(libc::MSG_NOSIGNAL)
            .build()
            .user_data(token.encode());
        // SAFETY: forwarded from the caller.
        unsafe { self.push(&e) }
    }

    /// Gathers several buffers into one write on a direct descriptor.
    ///
    /// # Safety
    /// The iovec array and every buffer it points to must stay valid and unchanged until the
    /// completion of `token` is reaped.
    pub unsafe fn writev(&mut self, fixed: u32, iov: *const libc::iovec, n: u32, token: Token) -> io::Result<()> {
        let e = opcode::Writev::new(types::Fixed(fixed), iov, n).build().user_data(token.encode());
        // SAFETY: forwarded from the caller.
        unsafe { self.push(&e) }
    }

    /// Cancels every operation on a direct descriptor (its multishot recv, above all).
    pub fn cancel_fixed(&mut self, fixed: u32, token: Token) -> io::Result<()> {
        let e = opcode::AsyncCancel2::new(types::CancelBuilder::fd(types::Fixed(fixed)).all())
            .build()
            .user_data(token.encode());
        // SAFETY: no buffer.
        unsafe { self.push(&e) }
    }

    /// Cancels every operation submitted with `target` as its user_data (the multishot accept:
    /// cancelling by token, not by fd, works whatever the fd's fate, and the caller keeps the
    /// socket until the operation's last completion).
    pub fn cancel_token(&mut self, target: Token, token: Token) -> io::Result<()> {
        let e = opcode::AsyncCancel2::new(types::CancelBuilder::user_data(target.encode()).all())
            .build()
            .user_data(token.encode());
        // SAFETY: no buffer.
        unsafe { self.push(&e) }
    }

    /// Half-closes the write side (FIN after what is queued): a lingering close, once the
    /// close frame is written.
    pub fn shutdown_write(&mut self, fixed: u32, token: Token) -> io::Result<()> {
        let e = opcode::Shutdown::new(types::Fixed(fixed), libc::SHUT_WR).build().user_data(token.encode());
        // SAFETY: no buffer.
        unsafe { self.push(&e) }
    }

    /// Closes a direct descriptor, freeing its slot in the file table.
    pub fn close_fixed(&mut self, fixed: u32, token: Token) -> io::Result<()> {
        let e = opcode::Close::new(types::Fixed(fixed)).build().user_data(token.encode());
        // SAFETY: no buffer.
        unsafe { self.push(&e) }
    }

    /// Reads the shard's wake-up eventfd into `buf`.
    ///
    /// # Safety
    /// `buf` must stay valid until the completion is reaped.
    pub unsafe fn read_eventfd(&mut self, fd: RawFd, buf: *mut u64, token: Token) -> io::Result<()> {
        let e = opcode::Read::new(types::Fd(fd), buf.cast(), 8).build().user_data(token.encode());
        // SAFETY: forwarded from the caller.
        unsafe { self.push(&e) }
    }
}

/// Registers a sparse table of `n` direct descriptors. The kernel caps `n` at RLIMIT_NOFILE.
pub fn register_files(ring: &IoUring, n: u32) -> Result<(), UringError> {
    ring.submitter()
        .register_files_sparse(n)
        .map_err(|source| UringError::Register { what: "sparse file table", source })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A ring set up while the kernel is short of memory (an edge restarted while its
    /// predecessor's rings are still being freed) is tried again until it works; past the
    /// retry time the error says what to raise; any other failure is not retried.
    #[test]
    fn ring_setup_waits_out_a_shortage_of_memory_only() {
        let enomem = || UringError::Setup(io::Error::from_raw_os_error(libc::ENOMEM));
        let mut tries = 0;
        let r = while_short_of_memory(3, Duration::from_secs(10), || {
            tries += 1;
            if tries < 3 { Err(enomem()) } else { Ok(tries) }
        });
        assert_eq!(r.unwrap(), 3);

        let mut tries = 0;
        let r: Result<(), _> = while_short_of_memory(3, Duration::from_millis(300), || {
            tries += 1;
            Err(enomem())
        });
        let e = r.unwrap_err().to_string();
        assert!(e.contains("short of memory") && e.contains("RLIMIT_MEMLOCK"), "{e}");
        assert!(tries >= 2, "tried again before giving up: {tries}");

        let mut tries = 0;
        let r: Result<(), _> = while_short_of_memory(3, Duration::from_secs(10), || {
            tries += 1;
            Err(UringError::Setup(io::Error::from_raw_os_error(libc::EPERM)))
        });
        assert!(matches!(r, Err(UringError::Setup(_))));
        assert_eq!(tries, 1, "a refusal is not retried");
    }

    #[test]
    fn token_round_trip() {
        for kind in [OpKind::Accept, OpKind::Recv, OpKind::Send, OpKind::Close, OpKind::Wake] {
            let t = Token::new(kind, 0x12_3456, 0xdead_beef);
            assert_eq!(Token::decode(t.encode()), Some(t));
        }
        // Generations wrap at 24 bits.
        assert_eq!(Token::new(OpKind::Send, 0x0100_0001, 3).generation, 1);
        assert_eq!(Token::decode(0), None);
    }

    #[test]
    fn release_parsing() {
        assert_eq!(parse_release("6.18.0-1-amd64"), Some((6, 18)));
        assert_eq!(parse_release("5.15.0"), Some((5, 15)));
        assert_eq!(parse_release("garbage"), None);
    }
}
