//! Refuses to share the WebSocket port with another process by accident.
//!
//! Every shard listens with SO_REUSEPORT, so the kernel lets a second edge (or any process of the
//! same user that sets SO_REUSEPORT) bind the same port, and then quietly gives it part of the new
//! connections. Before the first listener is bound, [`check_port`] binds a probe socket *without*
//! SO_REUSEPORT (with SO_REUSEADDR, so TIME_WAIT sockets do not count): EADDRINUSE means some
//! listener already holds the port. That listener is then looked up with a netlink sock_diag
//! dump of the port's LISTEN sockets (an overlapping address; /proc/net/tcp{,6} when netlink is
//! refused, which lists every socket as text and takes seconds beside 10^6 of them) and its
//! process found by the socket's inode: by an eBPF iterator over every open file
//! (`roomcast_ebpf::holders`), or, where the kernel refuses it, among the /proc/[pid]/fd links.
//! Starting anyway takes an explicit `takeover` (a rolling restart: the new edge starts, then the
//! old one drains).
//!
//! The /proc text is parsed by pure functions ([`parse_proc_net_tcp`], [`listening_inodes`],
//! [`socket_inode`], [`cmdline_text`]); only [`check_port`] and the readers below it do I/O.

use std::fmt;
use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use socket2::{Domain, Protocol, SockAddr, Socket, Type};

/// The `st` column of /proc/net/tcp for a listening socket (`TCP_LISTEN`).
pub const TCP_LISTEN: u8 = 0x0A;

/// How long a start waits for a listener no process owns to go away (see [`check_port`]).
const ORPHAN_WAIT: std::time::Duration = std::time::Duration::from_secs(120);

/// The most of a holder's command line kept for messages, in characters.
const CMDLINE_MAX_CHARS: usize = 200;

/// One socket line of /proc/net/tcp or /proc/net/tcp6.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TcpEntry {
    /// The socket's local address (the port a listener would take).
    pub local: SocketAddr,
    /// Kernel TCP state (`TCP_ESTABLISHED` = 0x01 ... [`TCP_LISTEN`] = 0x0A).
    pub state: u8,
    /// The socket's inode: `socket:[inode]` in the owner's /proc/[pid]/fd links. 0 for sockets
    /// no file refers to any more (TIME_WAIT, orphans).
    pub inode: u64,
}

/// A process holding a listening socket on the port.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Holder {
    /// The holding process's id.
    pub pid: u32,
    /// /proc/[pid]/comm ("?" when unreadable).
    pub comm: String,
    /// /proc/[pid]/cmdline with spaces for NULs, cut to 200 characters (empty when unreadable).
    pub cmdline: String,
}

impl fmt::Display for Holder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.cmdline.is_empty() {
            write!(f, "pid {} ({})", self.pid, self.comm)
        } else {
            write!(f, "pid {} ({}: {})", self.pid, self.comm, self.cmdline)
        }
    }
}

/// Who listens on the port, as far as this process can see.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Holders {
    /// The processes with one of the listening sockets open, by pid. Empty when none is visible
    /// (another user's process without the privilege to read its fds, another PID namespace, or
    /// /proc not readable).
    pub procs: Vec<Holder>,
    /// Inodes of the listening sockets found in /proc/net/tcp{,6}.
    pub inodes: Vec<u64>,
    /// Why a holder may have gone unseen, when the search could not look at every process
    /// (the eBPF iterator refused and some /proc/[pid]/fd unreadable); None when it could, so
    /// that no holder means none exists (a listener being torn down).
    pub unseen: Option<String>,
}

impl fmt::Display for Holders {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.procs.is_empty() {
            f.write_str("an unknown process")?;
            match (self.inodes.first(), &self.unseen) {
                (Some(inode), Some(why)) => write!(f, " (listening socket inode {inode}; not found: {why})")?,
                (Some(inode), None) => write!(
                    f,
                    " (listening socket inode {inode} is in no /proc/*/fd this process can read: \
                     another user or PID namespace)"
                )?,
                (None, _) => {}
            }
            return Ok(());
        }
        for (i, p) in self.procs.iter().enumerate() {
            if i > 0 {
                f.write_str(", ")?;
            }
            write!(f, "{p}")?;
        }
        Ok(())
    }
}

/// Why the edge will not start listening on its port.
#[derive(Debug, thiserror::Error)]
pub enum GuardError {
    /// Another listener holds the port and no takeover was asked for.
    #[error(
        "port {addr} is already served by {holders}; refusing to share it (SO_REUSEPORT would split \
         new connections between the two). Stop that process, or pass --takeover for a rolling restart"
    )]
    PortHeld {
        /// The address asked for.
        addr: SocketAddr,
        /// The processes listening on it.
        holders: Holders,
    },
    /// Another process's listener holds the port and does not share it (no SO_REUSEPORT, or
    /// another user's): no edge can start beside it, `takeover` or not.
    #[error(
        "port {addr} is held by {holders}, which does not share it (its listener has no SO_REUSEPORT, or is \
         another user's): stop that process (--takeover cannot start beside it)"
    )]
    PortTaken {
        /// The address asked for.
        addr: SocketAddr,
        /// The processes listening on it.
        holders: Holders,
    },
    /// Not even a probe socket could be made, so whether the port is free is unknown.
    #[error("cannot check whether {addr} is free (listen): probe socket: {source}")]
    Probe {
        /// The address that was to be checked.
        addr: SocketAddr,
        /// Why the probe socket failed.
        #[source]
        source: io::Error,
    },
}

/// Checks that no other process listens on `addr` before the shards bind it with SO_REUSEPORT.
///
/// - Port 0, or the port is free: `Ok(None)`.
/// - Held, `takeover` false: [`GuardError::PortHeld`], naming the holders.
/// - Held, `takeover` true: `Ok(Some(holders))`, for the caller to log that it shares the port.
/// - Held by a named process whose listener would not share the port (no SO_REUSEPORT, or
///   another user's): [`GuardError::PortTaken`] either way; `takeover` ended in the shards' bind
///   failing with a bare "Address already in use" and no name.
///
/// A probe bind failing for another reason than EADDRINUSE (a privileged port, an address that is
/// not local) is left to the real bind, which fails the same way with its own message. A probe
/// EADDRINUSE with no listener in /proc/net/tcp{,6} (an outgoing connection using the port, say)
/// is also left to it: there is nothing to take over.
pub fn check_port(addr: SocketAddr, takeover: bool) -> Result<Option<Holders>, GuardError> {
    // A listener held by no process is one being torn down (a process just killed: its
    // io_uring lets go of the sockets after it exits, in a kernel worker that closes every
    // connection the rings held: milliseconds for a few, more than 5 s for an edge of 10^6
    // members, whose restart after SIGKILL failed here). A supervisor restarting at once meets
    // it: look again for up to ORPHAN_WAIT before calling the port held (only a holder in
    // another user's or PID namespace's process waits that long), and say so once.
    let start = std::time::Instant::now();
    let mut told = false;
    // Listening sockets found held by no process (with why the search may have missed one). A socket does not gain a holder later (short
    // of fd passing), so while the port's listeners are all among these, a look needs no new walk
    // of every /proc/[pid]/fd: that walk readlinks every descriptor of every process (10^6 of
    // them in a load generator beside the edge: seconds a walk), and this loop looks every 50 ms.
    let mut orphans = Orphans::default();
    loop {
        match check_port_once(addr, takeover, &mut orphans) {
            Err(GuardError::PortHeld { holders, .. }) if holders.procs.is_empty() && start.elapsed() < ORPHAN_WAIT => {
                if !told && start.elapsed() >= std::time::Duration::from_secs(1) {
                    told = true;
                    match &holders.unseen {
                        // Without the eBPF iterator or the right to read every process's
                        // descriptors, a live holder (another user's, a process with more
                        // privileges) looks the same as a dead one: this said "no process owns"
                        // of a running edge and waited 120 s before naming nobody.
                        Some(why) => tracing::warn!(
                            %addr,
                            wait_s = ORPHAN_WAIT.as_secs(),
                            why = why.as_str(),
                            "the port is held by a listener this edge cannot name (a process it cannot see, or one being \
                             torn down after a crash): waiting for it to go; with CAP_BPF and CAP_PERFMON (or \
                             CAP_SYS_PTRACE) it could tell"
                        ),
                        None => tracing::warn!(
                            %addr,
                            wait_s = ORPHAN_WAIT.as_secs(),
                            "the port is held by a listener no process owns (one being torn down, as after a crash): waiting for it to go"
                        ),
                    }
                }
                drop(holders);
                std::thread::sleep(std::time::Duration::from_millis(50));
            }
            other => {
                if told {
                    tracing::info!(%addr, waited_ms = start.elapsed().as_millis() as u64, "the orphaned listener is gone");
                }
                return other;
            }
        }
    }
}

/// Listening sockets a look found held by no process it could see, and why it may have missed
/// the holder (see [`Holders::unseen`]).
#[derive(Default)]
struct Orphans {
    inodes: Vec<u64>,
    unseen: Option<String>,
}

fn check_port_once(addr: SocketAddr, takeover: bool, orphans: &mut Orphans) -> Result<Option<Holders>, GuardError> {
    if addr.port() == 0 {
        return Ok(None);
    }
    let started = std::time::Instant::now();
    let probed = probe(addr)?;
    let probe_ms = started.elapsed().as_millis() as u64;
    match probed {
        Probe::Free => return Ok(None),
        Probe::Other(e) => {
            tracing::debug!(%addr, error = %e, "listen guard: probe bind failed; the real bind will say why");
            return Ok(None);
        }
        Probe::InUse => {}
    }
    let found = listeners(addr);
    let listeners_ms = started.elapsed().as_millis() as u64 - probe_ms;
    let holders = match found {
        Some(inodes) if inodes.is_empty() => {
            tracing::debug!(%addr, "listen guard: port in use but no listener on it");
            return Ok(None);
        }
        Some(inodes) if inodes.iter().all(|i| orphans.inodes.contains(i)) => {
            Holders { procs: Vec::new(), inodes, unseen: orphans.unseen.clone() }
        }
        Some(inodes) => {
            let (procs, unseen) = processes_holding(&inodes);
            if procs.is_empty() {
                orphans.inodes.extend_from_slice(&inodes);
                orphans.unseen.clone_from(&unseen);
            }
            Holders { procs, inodes, unseen }
        }
        None => Holders::default(),
    };
    // A named holder whose listener the shards could not join: say so, and by name, whatever
    // `takeover` asks (a python http.server on the port got "pass --takeover", and with it a
    // bare EADDRINUSE from the shards' bind).
    if !holders.procs.is_empty() && !shares(addr) {
        return Err(GuardError::PortTaken { addr, holders });
    }
    // A look takes milliseconds; after a crash at 10^6 members one took seconds: say where.
    let took_ms = started.elapsed().as_millis() as u64;
    if took_ms >= 1000 {
        tracing::info!(%addr, took_ms, probe_ms, listeners_ms, holders_ms = took_ms - probe_ms - listeners_ms, "listen guard: a slow look at the port");
    }
    if takeover { Ok(Some(holders)) } else { Err(GuardError::PortHeld { addr, holders }) }
}

/// Who listens on `addr`, for a port this process failed to bind with EADDRINUSE and does not
/// share (the HTTP API's): one look, no waiting for orphans. None when no listener overlaps it
/// (an outgoing connection on the port, say) or the socket tables cannot be read.
pub fn holders_of(addr: SocketAddr) -> Option<Holders> {
    let inodes = listeners(addr)?;
    if inodes.is_empty() {
        return None;
    }
    let (procs, unseen) = processes_holding(&inodes);
    Some(Holders { procs, inodes, unseen })
}

enum Probe {
    Free,
    InUse,
    Other(io::Error),
}

/// Binds and listens on `addr` without SO_REUSEPORT, then closes the socket at once.
fn probe(addr: SocketAddr) -> Result<Probe, GuardError> {
    let s = Socket::new(Domain::for_address(addr), Type::STREAM.cloexec(), Some(Protocol::TCP))
        .map_err(|source| GuardError::Probe { addr, source })?;
    s.set_reuse_address(true).map_err(|source| GuardError::Probe { addr, source })?;
    let r = s.bind(&SockAddr::from(addr)).and_then(|()| s.listen(1));
    drop(s);
    Ok(match r {
        Ok(()) => Probe::Free,
        Err(e) if e.kind() == io::ErrorKind::AddrInUse => Probe::InUse,
        Err(e) => Probe::Other(e),
    })
}

/// Whether a listener the shards make (SO_REUSEPORT, this user) could bind `addr` beside the
/// ones there: a bind without listen, so the probe never joins the group and takes no
/// connection. An error other than EADDRINUSE says nothing: taken as sharing, for the real bind
/// to report.
fn shares(addr: SocketAddr) -> bool {
    let Ok(s) = Socket::new(Domain::for_address(addr), Type::STREAM.cloexec(), Some(Protocol::TCP)) else {
        return true;
    };
    if s.set_reuse_address(true).and_then(|()| s.set_reuse_port(true)).is_err() {
        return true;
    }
    !matches!(s.bind(&SockAddr::from(addr)), Err(e) if e.kind() == io::ErrorKind::AddrInUse)
}

/// Inodes of the listening sockets that overlap `addr`, from a sock_diag dump of the port's
/// listeners; from /proc/net/tcp{,6} when netlink is not available (a seccomp profile that
/// forbids it, say). None if neither could be read.
fn listeners(addr: SocketAddr) -> Option<Vec<u64>> {
    match roomcast_ebpf::sock_diag::listeners(addr.port()) {
        Ok(sockets) => {
            let entries: Vec<TcpEntry> = sockets
                .iter()
                .map(|s| TcpEntry {
                    local: SocketAddr::new(s.src, s.sport),
                    state: TCP_LISTEN,
                    inode: u64::from(s.inode),
                })
                .collect();
            let mut inodes = listening_inodes(&entries, addr);
            inodes.sort_unstable();
            inodes.dedup();
            Some(inodes)
        }
        Err(e) => {
            tracing::debug!(%addr, error = %e, "listen guard: sock_diag failed; reading /proc/net/tcp");
            listeners_in_proc(addr)
        }
    }
}

/// Inodes of the listening sockets that overlap `addr`, from /proc/net/tcp{,6} (every socket
/// of the namespace, read as text: slow with many connections open); None if neither table
/// could be read.
fn listeners_in_proc(addr: SocketAddr) -> Option<Vec<u64>> {
    let mut read_any = false;
    let mut inodes = Vec::new();
    for path in ["/proc/net/tcp", "/proc/net/tcp6"] {
        match std::fs::read_to_string(path) {
            Ok(text) => {
                read_any = true;
                inodes.extend(listening_inodes(&parse_proc_net_tcp(&text), addr));
            }
            // tcp6 is absent when IPv6 is disabled.
            Err(e) => tracing::debug!(path, error = %e, "listen guard: cannot read"),
        }
    }
    inodes.sort_unstable();
    inodes.dedup();
    read_any.then_some(inodes)
}

#[cfg(test)]
thread_local! {
    /// Walks of /proc/*/fd made on this thread, for the tests.
    static PROC_WALKS: std::cell::Cell<u64> = const { std::cell::Cell::new(0) };
}

/// The processes with any of `inodes` among their open files. A socket can be open in several
/// processes (inherited over fork), so every process is looked at: by an eBPF iterator over
/// every open file where the kernel allows it, else by a walk of every /proc/[pid]/fd. With
/// them, why a holder may have been missed (see [`Holders::unseen`]).
fn processes_holding(inodes: &[u64]) -> (Vec<Holder>, Option<String>) {
    #[cfg(test)]
    PROC_WALKS.with(|w| w.set(w.get() + 1));
    let started = std::time::Instant::now();
    let ebpf_refused = match roomcast_ebpf::holders::socket_holders(inodes) {
        Ok(pids) => {
            tracing::debug!(
                took_ms = started.elapsed().as_millis() as u64,
                "listen guard: holders from the eBPF file iterator"
            );
            let procs =
                pids.into_iter().map(|pid| holder(pid, &std::path::Path::new("/proc").join(pid.to_string()))).collect();
            return (procs, None);
        }
        Err(e) => {
            tracing::debug!(error = %e, "listen guard: no eBPF file iterator; walking /proc/*/fd");
            e.to_string()
        }
    };
    let (walked, unreadable) = walk_proc_fds(inodes);
    let took = started.elapsed();
    // Seconds beside a process holding 10^6 descriptors on a busy box: say where a slow start went.
    if took >= std::time::Duration::from_secs(1) {
        tracing::info!(
            took_ms = took.as_millis() as u64,
            "listen guard: walked every /proc/[pid]/fd to name the port's holder"
        );
    }
    let unseen = (unreadable > 0).then(|| unseen_why(&ebpf_refused, unreadable));
    (walked, unseen)
}

/// Why a search for a holder may have missed it: the iterator's refusal, and how many
/// processes' descriptors could not be read.
fn unseen_why(ebpf_refused: &str, unreadable: usize) -> String {
    format!(
        "no eBPF file iterator ({ebpf_refused}), and the descriptors of {unreadable} processes are unreadable \
         (another user's, or more privileged: CAP_SYS_PTRACE reads them)"
    )
}

/// A process's name and command line for messages.
fn holder(pid: u32, dir: &std::path::Path) -> Holder {
    let comm = std::fs::read_to_string(dir.join("comm")).map_or_else(|_| "?".to_owned(), |c| c.trim_end().to_owned());
    let cmdline = std::fs::read(dir.join("cmdline")).map(|c| cmdline_text(&c)).unwrap_or_default();
    Holder { pid, comm, cmdline }
}

/// [`processes_holding`] through /proc: every /proc/[pid]/fd link read. With the holders, how
/// many processes' descriptors could not be read (all of them when /proc cannot be).
fn walk_proc_fds(inodes: &[u64]) -> (Vec<Holder>, usize) {
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return (Vec::new(), usize::MAX);
    };
    let mut out = Vec::new();
    let mut unreadable = 0;
    for entry in dir.flatten() {
        let Some(pid) = entry.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else {
            continue;
        };
        // Unreadable for other users' processes without CAP_SYS_PTRACE; they stay unknown, and
        // are counted (a process gone meanwhile is not).
        let fds = match std::fs::read_dir(entry.path().join("fd")) {
            Ok(fds) => fds,
            Err(e) => {
                if e.kind() != io::ErrorKind::NotFound {
                    unreadable += 1;
                }
                continue;
            }
        };
        // The directory of a more privileged process of the same user lists, but its links do
        // not read (ptrace access): that process is unseen too.
        let mut denied = false;
        let holds = fds.flatten().any(|fd| match std::fs::read_link(fd.path()) {
            Ok(link) => link.to_str().and_then(socket_inode).is_some_and(|inode| inodes.contains(&inode)),
            Err(e) => {
                denied |= e.kind() == io::ErrorKind::PermissionDenied;
                false
            }
        });
        if denied && !holds {
            unreadable += 1;
        }
        if holds {
            out.push(holder(pid, &entry.path()));
        }
    }
    out.sort_by_key(|h| h.pid);
    (out, unreadable)
}

/// Parses the text of /proc/net/tcp or /proc/net/tcp6; the header and malformed lines are
/// skipped.
///
/// A line is `sl: local rem st tx_queue:rx_queue tr:tm->when retrnsmt uid timeout inode ...`.
/// Addresses are `IP:PORT` in hex: the port as a number, the IP as the kernel prints its
/// network-order bytes, one native-endian 32-bit word at a time (8 hex digits for IPv4, 32 for
/// IPv6), so `0100007F` is 127.0.0.1 on a little-endian machine.
pub fn parse_proc_net_tcp(text: &str) -> Vec<TcpEntry> {
    text.lines().filter_map(parse_tcp_line).collect()
}

fn parse_tcp_line(line: &str) -> Option<TcpEntry> {
    let mut fields = line.split_whitespace();
    if !fields.next()?.ends_with(':') {
        return None;
    }
    let local = parse_hex_addr(fields.next()?)?;
    let _remote = fields.next()?;
    let state = u8::from_str_radix(fields.next()?, 16).ok()?;
    // tx_queue:rx_queue, tr:tm->when, retrnsmt, uid, timeout, then the inode.
    let inode = fields.nth(5)?.parse().ok()?;
    Some(TcpEntry { local, state, inode })
}

fn parse_hex_addr(s: &str) -> Option<SocketAddr> {
    let (ip, port) = s.split_once(':')?;
    if !ip.bytes().all(|b| b.is_ascii_hexdigit()) || !port.bytes().all(|b| b.is_ascii_hexdigit()) {
        return None;
    }
    let port = u16::from_str_radix(port, 16).ok()?;
    let ip = match ip.len() {
        8 => IpAddr::V4(Ipv4Addr::from(hex_word(ip)?)),
        32 => {
            let mut bytes = [0u8; 16];
            for (i, chunk) in bytes.chunks_exact_mut(4).enumerate() {
                chunk.copy_from_slice(&hex_word(&ip[i * 8..i * 8 + 8])?);
            }
            IpAddr::V6(Ipv6Addr::from(bytes))
        }
        _ => return None,
    };
    Some(SocketAddr::new(ip, port))
}

/// Eight hex digits printed from a native-endian u32 holding four address bytes: those bytes.
fn hex_word(hex: &str) -> Option<[u8; 4]> {
    Some(u32::from_str_radix(hex, 16).ok()?.to_ne_bytes())
}

/// The inodes of LISTEN sockets whose address overlaps `want` (see [`overlaps`]).
pub fn listening_inodes(entries: &[TcpEntry], want: SocketAddr) -> Vec<u64> {
    entries
        .iter()
        .filter(|e| e.state == TCP_LISTEN && e.inode != 0 && overlaps(want, e.local))
        .map(|e| e.inode)
        .collect()
}

/// Whether a listener on `held` takes connections that a listener on `want` would: same port,
/// and the same address or a wildcard on either side. An IPv6 wildcard is taken as dual-stack
/// (the default) and IPv4-mapped IPv6 addresses as their IPv4 address.
pub fn overlaps(want: SocketAddr, held: SocketAddr) -> bool {
    if want.port() != held.port() {
        return false;
    }
    let (a, b) = (want.ip().to_canonical(), held.ip().to_canonical());
    if a.is_ipv4() == b.is_ipv4() {
        a.is_unspecified() || b.is_unspecified() || a == b
    } else {
        let v6_any = |ip: IpAddr| ip.is_ipv6() && ip.is_unspecified();
        v6_any(a) || v6_any(b)
    }
}

/// The inode in an fd link's target `socket:[12345]`; None for other files.
pub fn socket_inode(link: &str) -> Option<u64> {
    link.strip_prefix("socket:[")?.strip_suffix(']')?.parse().ok()
}

/// /proc/[pid]/cmdline (arguments separated by NULs) as one line, cut to 200 characters.
pub fn cmdline_text(raw: &[u8]) -> String {
    let joined =
        raw.split(|&b| b == 0).filter(|a| !a.is_empty()).map(String::from_utf8_lossy).collect::<Vec<_>>().join(" ");
    match joined.char_indices().nth(CMDLINE_MAX_CHARS) {
        Some((cut, _)) => format!("{}...", &joined[..cut]),
        None => joined,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::{Duration, Instant};

    // Lines as a little-endian x86_64 kernel prints them.
    const TCP4: &str = "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode
   0: 0100007F:1F90 00000000:0000 0A 00000000:00000000 00:00000000 00000000  1000        0 41234 1 0000000000000000 100 0 0 10 0
   1: 00000000:07E8 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 1060 1 000000002fa96050 100 0 0 10 0
   2: 0100007F:1F90 0100007F:C350 01 00000000:00000000 00:00000000 00000000  1000        0 41240 1 0000000000000000 20 4 30 10 -1
   3: 0100007F:1F91 0100007F:C352 06 00000000:00000000 03:00001770 00000000     0        0 0 3 0000000000000000
";
    const TCP6: &str = "  sl  local_address                         remote_address                        st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode
   0: 00000000000000000000000001000000:1F90 00000000000000000000000000000000:0000 0A 00000000:00000000 00:00000000 00000000  1000        0 52001 1 0000000000000000 100 0 0 10 0
   1: 00000000000000000000000000000000:0050 00000000000000000000000000000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 52002 1 0000000000000000 100 0 0 10 0
   2: 0000000000000000FFFF00000100007F:1F90 0000000000000000FFFF00000100007F:D431 01 00000000:00000000 00:00000000 00000000  1000        0 52003 1 0000000000000000 20 4 30 10 -1
";

    fn sa(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    #[test]
    #[cfg(target_endian = "little")]
    fn parses_ipv4_lines() {
        let e = parse_proc_net_tcp(TCP4);
        assert_eq!(e.len(), 4, "the header is skipped: {e:?}");
        assert_eq!(e[0], TcpEntry { local: sa("127.0.0.1:8080"), state: TCP_LISTEN, inode: 41234 });
        assert_eq!(e[1], TcpEntry { local: sa("0.0.0.0:2024"), state: TCP_LISTEN, inode: 1060 });
        assert_eq!(e[2], TcpEntry { local: sa("127.0.0.1:8080"), state: 0x01, inode: 41240 });
        assert_eq!(e[3], TcpEntry { local: sa("127.0.0.1:8081"), state: 0x06, inode: 0 });
    }

    #[test]
    #[cfg(target_endian = "little")]
    fn parses_ipv6_lines() {
        let e = parse_proc_net_tcp(TCP6);
        assert_eq!(e.len(), 3, "{e:?}");
        assert_eq!(e[0], TcpEntry { local: sa("[::1]:8080"), state: TCP_LISTEN, inode: 52001 });
        assert_eq!(e[1], TcpEntry { local: sa("[::]:80"), state: TCP_LISTEN, inode: 52002 });
        assert_eq!(e[2], TcpEntry { local: sa("[::ffff:127.0.0.1]:8080"), state: 0x01, inode: 52003 });
    }

    #[test]
    fn port_is_plain_hex_whatever_the_byte_order() {
        let line = "   0: 00000000:FFFF 00000000:0000 0A 00000000:00000000 00:00000000 00000000 0 0 7 1";
        assert_eq!(parse_proc_net_tcp(line)[0].local.port(), 65535);
        let line = "   0: 00000000:0001 00000000:0000 0A 00000000:00000000 00:00000000 00000000 0 0 7 1";
        assert_eq!(parse_proc_net_tcp(line)[0].local.port(), 1);
    }

    #[test]
    fn malformed_lines_are_skipped() {
        for line in [
            "",
            "garbage",
            "   0: 0100007F 00000000:0000 0A",
            "   0: 0100007G:1F90 00000000:0000 0A 00000000:00000000 00:00000000 00000000 0 0 7 1",
            "   0: 0100007F:1F90 00000000:0000 0A 00000000:00000000 00:00000000 00000000 0 0",
            "   0: 01007F:1F90 00000000:0000 0A 00000000:00000000 00:00000000 00000000 0 0 7 1",
            "   0: 0100007F:11F90 00000000:0000 0A 00000000:00000000 00:00000000 00000000 0 0 7 1",
            "   0: 0100007F:+F90 00000000:0000 0A 00000000:00000000 00:00000000 00000000 0 0 7 1",
        ] {
            assert!(parse_proc_net_tcp(line).is_empty(), "{line:?}");
        }
    }

    #[test]
    #[cfg(target_endian = "little")]
    fn only_overlapping_listeners_count() {
        let mut e = parse_proc_net_tcp(TCP4);
        e.extend(parse_proc_net_tcp(TCP6));
        // 127.0.0.1:8080: its own listener and the IPv6 ::1 one does not overlap; the
        // established socket on 8080 and the TIME_WAIT one on 8081 are no listeners.
        assert_eq!(listening_inodes(&e, sa("127.0.0.1:8080")), vec![41234]);
        // The IPv4 wildcard overlaps every IPv4 listener on the port, not IPv6 ::1.
        assert_eq!(listening_inodes(&e, sa("0.0.0.0:8080")), vec![41234]);
        // A dual-stack IPv6 wildcard overlaps both.
        assert_eq!(listening_inodes(&e, sa("[::]:8080")), vec![41234, 52001]);
        assert_eq!(listening_inodes(&e, sa("10.1.2.3:2024")), vec![1060]);
        assert_eq!(listening_inodes(&e, sa("10.1.2.3:80")), vec![52002]);
        assert!(listening_inodes(&e, sa("127.0.0.1:8081")).is_empty());
        assert!(listening_inodes(&e, sa("10.1.2.3:8080")).is_empty());
    }

    #[test]
    fn overlap_rules() {
        assert!(overlaps(sa("127.0.0.1:1"), sa("127.0.0.1:1")));
        assert!(!overlaps(sa("127.0.0.1:1"), sa("127.0.0.1:2")));
        assert!(!overlaps(sa("127.0.0.1:1"), sa("127.0.0.2:1")));
        assert!(overlaps(sa("0.0.0.0:1"), sa("127.0.0.2:1")));
        assert!(overlaps(sa("127.0.0.2:1"), sa("0.0.0.0:1")));
        assert!(overlaps(sa("127.0.0.1:1"), sa("[::ffff:127.0.0.1]:1")));
        assert!(overlaps(sa("127.0.0.1:1"), sa("[::]:1")));
        assert!(!overlaps(sa("0.0.0.0:1"), sa("[::1]:1")));
    }

    #[test]
    fn socket_links() {
        assert_eq!(socket_inode("socket:[41234]"), Some(41234));
        assert_eq!(socket_inode("pipe:[41234]"), None);
        assert_eq!(socket_inode("/dev/null"), None);
        assert_eq!(socket_inode("socket:[]"), None);
    }

    #[test]
    fn cmdlines_are_joined_and_cut() {
        assert_eq!(cmdline_text(b"/usr/bin/edge\0--listen\x000.0.0.0:8080\0"), "/usr/bin/edge --listen 0.0.0.0:8080");
        assert_eq!(cmdline_text(b""), "");
        let long = "é".repeat(300);
        let cut = cmdline_text(long.as_bytes());
        assert_eq!(cut.chars().count(), CMDLINE_MAX_CHARS + 3);
        assert!(cut.ends_with("..."));
    }

    #[test]
    fn messages_name_the_holder() {
        let holders = Holders {
            procs: vec![Holder { pid: 1234, comm: "edge".into(), cmdline: "/path/edge --listen 0.0.0.0:8080".into() }],
            inodes: vec![41234],
            unseen: None,
        };
        let e = GuardError::PortHeld { addr: sa("127.0.0.1:8080"), holders }.to_string();
        assert!(
            e.starts_with(
                "port 127.0.0.1:8080 is already served by pid 1234 (edge: /path/edge --listen 0.0.0.0:8080); \
                 refusing to share it (SO_REUSEPORT would split new connections between the two)."
            ),
            "{e}"
        );
        assert!(e.ends_with("pass --takeover for a rolling restart"), "{e}");
        let unknown = Holders { procs: Vec::new(), inodes: vec![7], unseen: None }.to_string();
        assert!(unknown.starts_with("an unknown process (listening socket inode 7"), "{unknown}");
        let unseen = Holders { procs: Vec::new(), inodes: vec![7], unseen: Some(unseen_why("EPERM", 3)) }.to_string();
        assert_eq!(
            unseen,
            "an unknown process (listening socket inode 7; not found: no eBPF file iterator (EPERM), and the \
             descriptors of 3 processes are unreadable (another user's, or more privileged: CAP_SYS_PTRACE reads them))"
        );
        assert_eq!(Holders::default().to_string(), "an unknown process");
    }

    #[test]
    fn port_zero_is_not_checked() {
        assert!(check_port(sa("127.0.0.1:0"), false).unwrap().is_none());
    }

    #[test]
    fn a_held_port_names_this_process() {
        // A listener that shares the port (SO_REUSEPORT), as an edge's shards do.
        let s = Socket::new(Domain::IPV4, Type::STREAM, Some(Protocol::TCP)).unwrap();
        s.set_reuse_port(true).unwrap();
        s.bind(&SockAddr::from(sa("127.0.0.1:0"))).unwrap();
        s.listen(8).unwrap();
        let l: std::net::TcpListener = s.into();
        let addr = l.local_addr().unwrap();
        let me = std::process::id();
        match check_port(addr, false) {
            Err(GuardError::PortHeld { addr: a, holders }) => {
                assert_eq!(a, addr);
                assert!(holders.procs.iter().any(|h| h.pid == me), "{holders:?}");
                let msg = GuardError::PortHeld { addr, holders }.to_string();
                assert!(msg.contains(&format!("pid {me} (")), "{msg}");
            }
            other => panic!("expected PortHeld, got {other:?}"),
        }
        // The wildcard address overlaps the loopback listener (the kernel says so).
        let any = SocketAddr::new(Ipv4Addr::UNSPECIFIED.into(), addr.port());
        assert!(matches!(check_port(any, false), Err(GuardError::PortHeld { .. })));
        let taken = check_port(addr, true).unwrap().expect("holders with takeover");
        assert!(taken.procs.iter().any(|h| h.pid == me), "{taken:?}");
        // The probe closed its socket: the listener still works.
        let _c = std::net::TcpStream::connect(addr).unwrap();
        drop(l.accept().unwrap());
    }

    #[test]
    fn netlink_and_proc_see_the_same_listeners() {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        // An established connection on the port is no listener to either.
        let _c = std::net::TcpStream::connect(addr).unwrap();
        let _s = l.accept().unwrap();
        let from_netlink = listeners(addr).unwrap();
        assert_eq!(from_netlink.len(), 1, "{from_netlink:?}");
        assert_eq!(Some(from_netlink), listeners_in_proc(addr));
    }

    #[test]
    fn the_file_iterator_and_the_proc_walk_name_the_same_holders() {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let inodes = listeners(l.local_addr().unwrap()).unwrap();
        let (walked, _unreadable) = walk_proc_fds(&inodes);
        assert!(walked.iter().any(|h| h.pid == std::process::id()), "{walked:?}");
        let pids = roomcast_ebpf::holders::socket_holders(&inodes).expect("this kernel takes iter/task_file");
        assert_eq!(pids, walked.iter().map(|h| h.pid).collect::<Vec<_>>());
        // The iterator sees every process: nothing is unseen.
        assert_eq!(processes_holding(&inodes), (walked, None));
    }

    /// A listener no process holds, as after a crash: a ring's registered file is its only
    /// reference (what a killed edge's rings leave while the kernel tears them down).
    #[test]
    fn an_orphaned_listener_is_waited_for_with_one_walk_of_proc() {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        let ring = io_uring::IoUring::new(4).unwrap();
        ring.submitter().register_files(&[std::os::fd::AsRawFd::as_raw_fd(&l)]).unwrap();
        drop(l);
        // The ring goes (and the listener with it) after several of the guard's looks.
        let dropper = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(600));
            drop(ring);
        });
        PROC_WALKS.with(|w| w.set(0));
        let started = Instant::now();
        assert!(check_port(addr, false).unwrap().is_none(), "the port is free once the ring is gone");
        dropper.join().unwrap();
        assert!(started.elapsed() >= Duration::from_millis(500), "it waited for the orphan");
        // One walk of every /proc/[pid]/fd found no holder; the later looks did not walk again.
        assert_eq!(PROC_WALKS.with(std::cell::Cell::get), 1);
    }

    /// A listener without SO_REUSEPORT (a python http.server, say) cannot be shared: the
    /// guard names it and refuses even with takeover; a SO_REUSEPORT one is taken over.
    #[test]
    fn a_holder_that_does_not_share_is_refused_even_with_takeover() {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        let me = std::process::id();
        for takeover in [false, true] {
            match check_port(addr, takeover) {
                Err(e @ GuardError::PortTaken { .. }) => {
                    let msg = e.to_string();
                    assert!(msg.contains(&format!("pid {me} (")), "{msg}");
                    assert!(msg.contains("does not share it"), "{msg}");
                }
                other => panic!("takeover {takeover}: expected PortTaken, got {other:?}"),
            }
        }
        // A sharing listener, as an edge's shards are.
        let s = Socket::new(Domain::IPV4, Type::STREAM, Some(Protocol::TCP)).unwrap();
        s.set_reuse_port(true).unwrap();
        s.bind(&SockAddr::from(sa("127.0.0.1:0"))).unwrap();
        s.listen(8).unwrap();
        let shared = s.local_addr().unwrap().as_socket().unwrap();
        assert!(matches!(check_port(shared, false), Err(GuardError::PortHeld { .. })));
        let taken = check_port(shared, true).unwrap().expect("holders with takeover");
        assert!(taken.procs.iter().any(|h| h.pid == me), "{taken:?}");
    }

    #[test]
    fn a_free_port_passes() {
        let addr = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap();
        assert!(check_port(addr, false).unwrap().is_none());
        assert!(check_port(addr, true).unwrap().is_none());
    }

    #[test]
    fn time_wait_sockets_do_not_hold_the_port() {
        use std::io::Read;
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        let mut client = std::net::TcpStream::connect(addr).unwrap();
        // The server side closes first, so its socket (local port = addr's) ends in TIME_WAIT.
        drop(l.accept().unwrap());
        drop(l);
        assert_eq!(client.read(&mut [0u8; 1]).unwrap(), 0);
        drop(client);
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let text = std::fs::read_to_string("/proc/net/tcp").unwrap();
            if parse_proc_net_tcp(&text).iter().any(|e| e.local == addr && e.state == 0x06) {
                break;
            }
            assert!(Instant::now() < deadline, "no TIME_WAIT socket on {addr}");
            std::thread::sleep(Duration::from_millis(10));
        }
        assert!(check_port(addr, false).unwrap().is_none());
    }
}
