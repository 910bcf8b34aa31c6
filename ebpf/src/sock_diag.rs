//! The fallback source: a netlink sock_diag dump, the interface `ss` uses.
//!
//! One dump per address family, filtered in the kernel by local port (inet_diag bytecode, the
//! same programs `ss sport = :P` sends), asking for `tcp_info` so retransmits can be read. The
//! messages are parsed in place from the receive buffer: nothing is allocated per socket except
//! for the few that have retransmitted.

#![forbid(unsafe_code)]

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::time::Instant;

use crate::snapshot::{RemoteRetransmits, Snapshot, Source, state, top_n};
use crate::{ProbeError, TOP_REMOTES};

/// A NETLINK_SOCK_DIAG socket talking to the kernel (port id 0): `netlink-sys` owns the
/// descriptor and makes the syscalls; this retries the ones a signal interrupted.
struct NetlinkSocket(netlink_sys::Socket);

impl NetlinkSocket {
    fn sock_diag() -> std::io::Result<Self> {
        netlink_sys::Socket::new(netlink_sys::protocols::NETLINK_SOCK_DIAG).map(Self)
    }

    /// Sends one request to the kernel.
    fn send(&self, msg: &[u8]) -> std::io::Result<()> {
        let kernel = netlink_sys::SocketAddr::new(0, 0);
        retry_interrupted(|| self.0.send_to(msg, &kernel, 0)).map(drop)
    }

    /// Receives one datagram (one batch of a dump) into `buf`.
    fn recv(&self, buf: &mut [u8]) -> std::io::Result<usize> {
        retry_interrupted(|| self.0.recv(&mut &mut *buf, 0))
    }
}

fn retry_interrupted<T>(mut call: impl FnMut() -> std::io::Result<T>) -> std::io::Result<T> {
    loop {
        match call() {
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            r => return r,
        }
    }
}

const NLMSG_HDRLEN: usize = 16;
const NLMSG_ERROR: u16 = 2;
const NLMSG_DONE: u16 = 3;
const NLM_F_REQUEST: u16 = 0x1;
const NLM_F_DUMP: u16 = 0x300;
const SOCK_DIAG_BY_FAMILY: u16 = 20;
const INET_DIAG_REQ_BYTECODE: u16 = 1;
const INET_DIAG_INFO: u16 = 2;
const INET_DIAG_BC_JMP: u8 = 1;
const INET_DIAG_BC_S_EQ: u8 = 11;
/// sizeof(struct inet_diag_msg)
const DIAG_MSG_LEN: usize = 72;
/// offsetof(struct tcp_info, tcpi_total_retrans)
const TCPI_TOTAL_RETRANS: usize = 100;

/// One socket of the dump, as much as the probes use.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DiagSocket {
    /// TCP state (include/net/tcp_states.h, see [`crate::state`]).
    pub state: u8,
    /// Local port.
    pub sport: u16,
    /// Peer port.
    pub dport: u16,
    /// Local address.
    pub src: IpAddr,
    /// Peer address.
    pub dst: IpAddr,
    /// Recv-Q: bytes received, not yet read (a listener: its accept queue).
    pub rqueue: u32,
    /// Send-Q: bytes sent, not yet acknowledged (a listener: its accept queue limit).
    pub wqueue: u32,
    /// The kernel's socket cookie (stable for the socket's life).
    pub cookie: u64,
    /// `tcp_info.tcpi_total_retrans`, when the kernel sent tcp_info.
    pub total_retrans: Option<u32>,
    /// The socket's owner (the uid of the process that made it).
    pub uid: u32,
    /// The socket's inode: `socket:[inode]` in the /proc/[pid]/fd links of the processes that
    /// hold it; 0 when no file refers to it any more.
    pub inode: u32,
}

/// inet_diag bytecode accepting sockets whose local port is one of `ports`: for each port an
/// `S_EQ` whose failure jumps to the next test, then a `JMP` to the end (accept); failing the
/// last test jumps past the end (reject).
pub fn port_filter(ports: &[u16]) -> Vec<u8> {
    let mut bc = Vec::new();
    for (i, &port) in ports.iter().enumerate() {
        // S_EQ op + its operand: yes = fall through (8), no = skip the test and the JMP (12).
        bc.extend_from_slice(&[INET_DIAG_BC_S_EQ, 8]);
        bc.extend_from_slice(&12u16.to_ne_bytes());
        bc.extend_from_slice(&[0, 0]);
        bc.extend_from_slice(&port.to_ne_bytes());
        if i + 1 < ports.len() {
            let rest = (ports.len() - i - 1) * 12 - 4;
            bc.extend_from_slice(&[INET_DIAG_BC_JMP, 4]);
            bc.extend_from_slice(&((rest + 4) as u16).to_ne_bytes());
        }
    }
    bc
}

/// A dump request for every TCP socket of `family` on `ports`, with tcp_info.
pub fn dump_request(family: u8, ports: &[u16], seq: u32) -> Vec<u8> {
    request(family, ports, seq, u32::MAX, 1 << (INET_DIAG_INFO - 1))
}

/// A dump request for the listening TCP sockets of `family` on `port`, without tcp_info.
///
/// Asking for the LISTEN state alone keeps the kernel to its listening hash: it never walks the
/// established table, which after an edge of 10^6 members was killed still holds their sockets
/// (walking them through /proc/net/tcp took seconds per look).
pub fn listen_request(family: u8, port: u16, seq: u32) -> Vec<u8> {
    request(family, &[port], seq, 1 << state::LISTEN, 0)
}

fn request(family: u8, ports: &[u16], seq: u32, states: u32, ext: u8) -> Vec<u8> {
    let bc = port_filter(ports);
    let attr_len = 4 + bc.len();
    let len = NLMSG_HDRLEN + 56 + attr_len.next_multiple_of(4);
    let mut m = Vec::with_capacity(len);
    m.extend_from_slice(&(len as u32).to_ne_bytes());
    m.extend_from_slice(&SOCK_DIAG_BY_FAMILY.to_ne_bytes());
    m.extend_from_slice(&(NLM_F_REQUEST | NLM_F_DUMP).to_ne_bytes());
    m.extend_from_slice(&seq.to_ne_bytes());
    m.extend_from_slice(&0u32.to_ne_bytes());
    // inet_diag_req_v2: family, protocol, ext (attributes wanted), pad, states (a bit per TCP
    // state), sockid.
    m.extend_from_slice(&[family, libc::IPPROTO_TCP as u8, ext, 0]);
    m.extend_from_slice(&states.to_ne_bytes());
    m.extend_from_slice(&[0u8; 48]);
    m.extend_from_slice(&(attr_len as u16).to_ne_bytes());
    m.extend_from_slice(&INET_DIAG_REQ_BYTECODE.to_ne_bytes());
    m.extend_from_slice(&bc);
    m.resize(len, 0);
    m
}

/// Parses one received batch, calling `each` per socket. Returns `true` at the end of the dump.
pub fn parse_batch(buf: &[u8], seq: u32, mut each: impl FnMut(&DiagSocket)) -> Result<bool, ProbeError> {
    let mut off = 0;
    while off + NLMSG_HDRLEN <= buf.len() {
        let len = u32_at(buf, off) as usize;
        let ty = u16::from_ne_bytes([buf[off + 4], buf[off + 5]]);
        let msg_seq = u32_at(buf, off + 8);
        if len < NLMSG_HDRLEN || off + len > buf.len() {
            return Err(ProbeError::Netlink(format!("truncated message ({len} bytes at {off})")));
        }
        let body = &buf[off + NLMSG_HDRLEN..off + len];
        off += len.next_multiple_of(4);
        if msg_seq != seq {
            continue;
        }
        match ty {
            NLMSG_DONE => return Ok(true),
            NLMSG_ERROR => {
                // `struct nlmsgerr`: a negative errno. Read as what it is, and negated without
                // overflow: i32::MIN has no positive (a kernel never sends it, a test or a
                // corrupt buffer may).
                let errno = if body.len() >= 4 { (u32_at(body, 0) as i32).wrapping_neg() } else { 0 };
                return Err(ProbeError::Io {
                    what: "sock_diag dump",
                    source: std::io::Error::from_raw_os_error(errno),
                });
            }
            SOCK_DIAG_BY_FAMILY => {
                if let Some(s) = parse_socket(body) {
                    each(&s);
                }
            }
            _ => {}
        }
    }
    Ok(false)
}

fn u32_at(b: &[u8], off: usize) -> u32 {
    u32::from_ne_bytes([b[off], b[off + 1], b[off + 2], b[off + 3]])
}

/// One `struct inet_diag_msg` and its attributes.
fn parse_socket(b: &[u8]) -> Option<DiagSocket> {
    if b.len() < DIAG_MSG_LEN {
        return None;
    }
    let family = b[0];
    let sport = u16::from_be_bytes([b[4], b[5]]);
    let dport = u16::from_be_bytes([b[6], b[7]]);
    // Addresses are in network order, four words each; IPv4 uses the first.
    let addr = |raw: &[u8]| -> Option<IpAddr> {
        let raw: [u8; 16] = raw.try_into().ok()?;
        Some(if family == libc::AF_INET6 as u8 {
            IpAddr::V6(Ipv6Addr::from(raw))
        } else {
            IpAddr::V4(Ipv4Addr::new(raw[0], raw[1], raw[2], raw[3]))
        })
    };
    let src = addr(&b[8..24])?;
    let dst = addr(&b[24..40])?;
    let cookie = u64::from(u32_at(b, 44)) | (u64::from(u32_at(b, 48)) << 32);
    let mut total_retrans = None;
    let mut off = DIAG_MSG_LEN;
    while off + 4 <= b.len() {
        let alen = u16::from_ne_bytes([b[off], b[off + 1]]) as usize;
        let aty = u16::from_ne_bytes([b[off + 2], b[off + 3]]) & 0x3fff;
        if alen < 4 || off + alen > b.len() {
            break;
        }
        if aty == INET_DIAG_INFO && alen >= 4 + TCPI_TOTAL_RETRANS + 4 {
            total_retrans = Some(u32_at(b, off + 4 + TCPI_TOTAL_RETRANS));
        }
        off += alen.next_multiple_of(4);
    }
    Some(DiagSocket {
        state: b[1],
        sport,
        dport,
        src,
        dst,
        rqueue: u32_at(b, 56),
        wqueue: u32_at(b, 60),
        cookie,
        total_retrans,
        uid: u32_at(b, 64),
        inode: u32_at(b, 68),
    })
}

/// The listening TCP sockets on `port`, both address families (a netlink sock_diag dump of the
/// LISTEN state only; see [`listen_request`]).
pub fn listeners(port: u16) -> Result<Vec<DiagSocket>, ProbeError> {
    let nl = NetlinkSocket::sock_diag().map_err(|source| ProbeError::Io { what: "netlink socket", source })?;
    // Listeners are few: one batch each family, as a rule.
    let mut buf = vec![0u8; 32 * 1024];
    let mut out = Vec::new();
    for (seq, family) in [(1, libc::AF_INET as u8), (2, libc::AF_INET6 as u8)] {
        nl.send(&listen_request(family, port, seq))
            .map_err(|source| ProbeError::Io { what: "sock_diag request", source })?;
        loop {
            let n = nl.recv(&mut buf).map_err(|source| ProbeError::Io { what: "sock_diag recv", source })?;
            // The kernel filters by state and port; checked again, as it costs nothing.
            let done = parse_batch(&buf[..n], seq, |s| {
                if usize::from(s.state) == state::LISTEN && s.sport == port {
                    out.push(s.clone());
                }
            })?;
            if n == 0 || done {
                break;
            }
        }
    }
    Ok(out)
}

/// The sock_diag probe: a netlink socket, a receive buffer, and what it needs to turn per-socket
/// retransmit totals into a counter that survives sockets closing.
pub struct SockDiag {
    nl: NetlinkSocket,
    ports: Vec<u16>,
    buf: Vec<u8>,
    seq: u32,
    /// total_retrans of each live socket that has retransmitted, by cookie.
    retrans: HashMap<u64, u32>,
    /// Retransmits of sockets that have gone since.
    retrans_gone: u64,
}

impl SockDiag {
    /// Opens the netlink socket for a dump of the sockets on `ports`.
    pub fn open(ports: &[u16]) -> Result<Self, ProbeError> {
        let nl = NetlinkSocket::sock_diag().map_err(|source| ProbeError::Io { what: "netlink socket", source })?;
        Ok(Self {
            nl,
            ports: ports.to_vec(),
            buf: vec![0; 64 * 1024],
            seq: 0,
            retrans: HashMap::new(),
            retrans_gone: 0,
        })
    }

    /// Every watched socket, one callback each (both address families).
    pub fn for_each(&mut self, mut each: impl FnMut(&DiagSocket)) -> Result<(), ProbeError> {
        for family in [libc::AF_INET as u8, libc::AF_INET6 as u8] {
            self.seq = self.seq.wrapping_add(1);
            let req = dump_request(family, &self.ports, self.seq);
            self.nl.send(&req).map_err(|source| ProbeError::Io { what: "sock_diag request", source })?;
            loop {
                let n =
                    self.nl.recv(&mut self.buf).map_err(|source| ProbeError::Io { what: "sock_diag recv", source })?;
                if n == 0 || parse_batch(&self.buf[..n], self.seq, &mut each)? {
                    break;
                }
            }
        }
        Ok(())
    }

    /// One look: both address families dumped and summarised.
    pub fn snapshot(&mut self) -> Result<Snapshot, ProbeError> {
        let started = Instant::now();
        let ports = self.ports.clone();
        let mut snap = Snapshot::empty(Source::SockDiag, &ports);
        let mut live: HashMap<u64, u32> = HashMap::new();
        let mut by_remote: HashMap<IpAddr, u64> = HashMap::new();
        self.for_each(|s| {
            snap.visited += 1;
            snap.sockets += 1;
            let st = usize::from(s.state);
            snap.count_state(st, 1);
            if st == state::LISTEN {
                if let Some(l) = snap.listeners.iter_mut().find(|l| l.port == s.sport) {
                    l.add(u64::from(s.rqueue), u64::from(s.wqueue));
                }
                return;
            }
            let retrans = s.total_retrans.unwrap_or(0);
            if retrans > 0 {
                live.insert(s.cookie, retrans);
                *by_remote.entry(s.dst).or_default() += u64::from(retrans);
            }
            snap.retransmits_live += u64::from(retrans);
            if st == state::TIME_WAIT || st == state::SYN_RECV {
                return;
            }
            snap.send_queue.add(u64::from(s.wqueue));
            snap.recv_queue.add(u64::from(s.rqueue));
        })?;
        // A socket that went away takes its last total with it into the counter.
        for (cookie, n) in &self.retrans {
            match live.get(cookie) {
                Some(now) if now >= n => {}
                _ => self.retrans_gone += u64::from(*n),
            }
        }
        self.retrans = live;
        snap.retransmits = self.retrans_gone + snap.retransmits_live;
        snap.top_retransmits = top_n(
            by_remote.into_iter().map(|(addr, retransmits)| RemoteRetransmits { addr, retransmits }).collect(),
            TOP_REMOTES,
        );
        crate::finish(&mut snap, started)?;
        Ok(snap)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn filter_chains_port_tests() {
        assert_eq!(port_filter(&[80]), vec![11, 8, 12, 0, 0, 0, 80, 0]);
        let bc = port_filter(&[1, 2, 3]);
        assert_eq!(bc.len(), 12 * 3 - 4);
        // The first JMP lands on the end of the program: 8 (test) + 4 + its `no`.
        let jmp_no = u16::from_ne_bytes([bc[10], bc[11]]) as usize;
        assert_eq!(8 + jmp_no, bc.len());
    }

    #[test]
    fn request_is_aligned_and_sized() {
        let r = dump_request(2, &[80, 443], 7);
        assert_eq!(r.len() % 4, 0);
        assert_eq!(u32_at(&r, 0) as usize, r.len());
        assert_eq!(u32_at(&r, 8), 7);
    }

    fn msg(seq: u32, ty: u16, body: &[u8]) -> Vec<u8> {
        let len = NLMSG_HDRLEN + body.len();
        let mut m = Vec::new();
        m.extend_from_slice(&(len as u32).to_ne_bytes());
        m.extend_from_slice(&ty.to_ne_bytes());
        m.extend_from_slice(&0u16.to_ne_bytes());
        m.extend_from_slice(&seq.to_ne_bytes());
        m.extend_from_slice(&0u32.to_ne_bytes());
        m.extend_from_slice(body);
        m.resize(len.next_multiple_of(4), 0);
        m
    }

    #[test]
    fn parses_sockets_errors_and_done() {
        let mut body = vec![0u8; DIAG_MSG_LEN];
        body[0] = 2;
        body[1] = 8;
        body[4..6].copy_from_slice(&8080u16.to_be_bytes());
        body[6..8].copy_from_slice(&5555u16.to_be_bytes());
        body[8..12].copy_from_slice(&[127, 0, 0, 1]);
        body[24..28].copy_from_slice(&[127, 0, 0, 9]);
        body[64..68].copy_from_slice(&1000u32.to_ne_bytes());
        body[68..72].copy_from_slice(&41234u32.to_ne_bytes());
        body[56..60].copy_from_slice(&3u32.to_ne_bytes());
        body[60..64].copy_from_slice(&1000u32.to_ne_bytes());
        let mut info = vec![0u8; 4 + 104];
        info[0..2].copy_from_slice(&(108u16).to_ne_bytes());
        info[2..4].copy_from_slice(&INET_DIAG_INFO.to_ne_bytes());
        info[4 + TCPI_TOTAL_RETRANS..4 + TCPI_TOTAL_RETRANS + 4].copy_from_slice(&6u32.to_ne_bytes());
        body.extend_from_slice(&info);
        let mut buf = msg(1, SOCK_DIAG_BY_FAMILY, &body);
        buf.extend(msg(9, SOCK_DIAG_BY_FAMILY, &body)); // another dump's: ignored
        let mut got = Vec::new();
        assert!(!parse_batch(&buf, 1, |s| got.push(s.clone())).unwrap());
        assert_eq!(got.len(), 1);
        let s = &got[0];
        assert_eq!((s.state, s.sport, s.dport, s.rqueue, s.wqueue), (8, 8080, 5555, 3, 1000));
        assert_eq!(s.dst, "127.0.0.9".parse::<IpAddr>().unwrap());
        assert_eq!(s.src, "127.0.0.1".parse::<IpAddr>().unwrap());
        assert_eq!((s.uid, s.inode), (1000, 41234));
        assert_eq!(s.total_retrans, Some(6));

        assert!(parse_batch(&msg(1, NLMSG_DONE, &[0; 4]), 1, |_| {}).unwrap());
        let e = parse_batch(&msg(1, NLMSG_ERROR, &(-1i32).to_ne_bytes()), 1, |_| {}).unwrap_err();
        assert!(e.to_string().contains("sock_diag"), "{e}");
        // Found by reading the parser for the fuzz target `sock_diag` (its binary panicked on
        // it): an error code with no positive, an error, never a panic.
        let e = parse_batch(&msg(1, NLMSG_ERROR, &i32::MIN.to_ne_bytes()), 1, |_| {}).unwrap_err();
        assert!(e.to_string().contains("sock_diag"), "{e}");
        // A lying length is an error, never a panic.
        let mut bad = msg(1, SOCK_DIAG_BY_FAMILY, &body);
        bad[0] = 0xff;
        assert!(parse_batch(&bad, 1, |_| {}).is_err());
        // A short body is skipped.
        assert!(!parse_batch(&msg(1, SOCK_DIAG_BY_FAMILY, &[1, 2, 3]), 1, |_| panic!()).unwrap());
    }

    /// The inode of a socket this process holds, from its /proc/self/fd link.
    fn inode_of(fd: &impl std::os::fd::AsRawFd) -> u32 {
        let link = std::fs::read_link(format!("/proc/self/fd/{}", fd.as_raw_fd())).unwrap();
        let link = link.to_str().unwrap();
        link.strip_prefix("socket:[").and_then(|l| l.strip_suffix(']')).unwrap().parse().unwrap()
    }

    #[test]
    fn listeners_are_listed_alone_with_their_inodes() {
        let v4 = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = v4.local_addr().unwrap().port();
        // An established pair on the port: the accepted socket has the port as its local one.
        let _c = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
        let _s = v4.accept().unwrap();
        let v6 = std::net::TcpListener::bind(("::1", port)).ok();
        let got = listeners(port).unwrap();
        let mut want = vec![(IpAddr::from([127, 0, 0, 1]), inode_of(&v4))];
        if let Some(v6) = &v6 {
            want.push((IpAddr::V6(Ipv6Addr::LOCALHOST), inode_of(v6)));
        }
        let mut seen: Vec<(IpAddr, u32)> = got.iter().map(|s| (s.src, s.inode)).collect();
        seen.sort();
        want.sort();
        assert_eq!(seen, want, "{got:?}");
        assert!(got.iter().all(|s| usize::from(s.state) == state::LISTEN && s.sport == port));
    }
}
