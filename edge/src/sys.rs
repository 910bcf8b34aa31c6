//! Thin wrappers over the few raw syscalls the edge makes outside io_uring. Every one is here,
//! with its safety argument, so the rest of the crate stays safe code.

use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};

use socket2::{Domain, Protocol, SockAddr, Socket, Type};

/// `uname -r`.
pub fn kernel_release() -> String {
    // SAFETY: `utsname` is plain old data; `uname` fills it and we read a NUL-terminated field.
    unsafe {
        let mut u: libc::utsname = std::mem::zeroed();
        if libc::uname(&raw mut u) != 0 {
            return String::from("unknown");
        }
        std::ffi::CStr::from_ptr(u.release.as_ptr()).to_string_lossy().into_owned()
    }
}

/// Raises the soft RLIMIT_NOFILE to the hard limit and returns it. The kernel caps each ring's
/// direct-descriptor table at this value, so it bounds connections per shard.
pub fn raise_nofile() -> io::Result<u64> {
    let mut lim = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: valid pointer to an rlimit.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &raw mut lim) } != 0 {
        return Err(io::Error::last_os_error());
    }
    if lim.rlim_cur < lim.rlim_max {
        lim.rlim_cur = lim.rlim_max;
        // SAFETY: valid pointer to an rlimit.
        if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &raw const lim) } != 0 {
            return Err(io::Error::last_os_error());
        }
    }
    Ok(lim.rlim_cur)
}

/// CPUs this process may run on, in order.
pub fn allowed_cpus() -> Vec<usize> {
    // SAFETY: `cpu_set_t` is plain old data, filled by the kernel.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        if libc::sched_getaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &raw mut set) != 0 {
            return (0..std::thread::available_parallelism().map_or(1, std::num::NonZero::get)).collect();
        }
        (0..libc::CPU_SETSIZE as usize).filter(|&c| libc::CPU_ISSET(c, &set)).collect()
    }
}

/// Pins the calling thread to one CPU.
pub fn pin_current_thread(cpu: usize) -> io::Result<()> {
    // SAFETY: `cpu_set_t` is plain old data; CPU_SET bounds-checks against CPU_SETSIZE.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpu, &mut set);
        if libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &raw const set) != 0 {
            return Err(io::Error::last_os_error());
        }
    }
    Ok(())
}

/// A non-blocking eventfd, the doorbell other threads ring to wake a shard.
pub fn eventfd() -> io::Result<OwnedFd> {
    // SAFETY: eventfd returns a new descriptor or -1.
    let fd = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC | libc::EFD_NONBLOCK) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `fd` is a fresh descriptor that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Adds one to an eventfd. A full counter (EAGAIN) already means "wake up", so it is not an error.
pub fn eventfd_ring(fd: RawFd) {
    let one: u64 = 1;
    // SAFETY: writes 8 bytes from a valid u64.
    let _ = unsafe { libc::write(fd, (&raw const one).cast(), 8) };
}

/// `net.core.somaxconn` of this process's network namespace: the kernel's cap on every
/// listen backlog. None when it cannot be read.
pub fn somaxconn() -> Option<i64> {
    std::fs::read_to_string("/proc/sys/net/core/somaxconn").ok()?.trim().parse().ok()
}

/// Opens the HTTP API's listening socket (tokio takes it with `TcpListener::from_std`) with
/// `backlog`: the listener tokio's own `bind` made had 128 (`ss`), and in a reconnect storm every client asks
/// `/v1/route` on a new connection; at 2x10^5 members those overflowed it 2,709 times
/// (bench-results/2026-12-01-restart-storm-README.md). SO_REUSEADDR as tokio sets it.
pub fn http_listener(addr: SocketAddr, backlog: i32) -> io::Result<std::net::TcpListener> {
    let s = Socket::new(Domain::for_address(addr), Type::STREAM.cloexec(), Some(Protocol::TCP))?;
    s.set_reuse_address(true)?;
    s.set_nonblocking(true)?;
    s.bind(&SockAddr::from(addr))?;
    s.listen(backlog)?;
    Ok(s.into())
}

/// Opens one of the shards' listening sockets: SO_REUSEPORT so each shard has its own accept
/// queue on the same port, TCP_NODELAY (accepted sockets inherit it: they never get a normal fd
/// on which we could set it), and a deep backlog for connection bursts at stream start.
/// `user_timeout` (TCP_USER_TIMEOUT, inherited likewise; `ws.idle_timeout_ms`): the kernel fails
/// a connection whose written bytes stay unacknowledged that long, so a member taking the
/// room's messages needs no ping to be known alive (`shard::lifecycle::is_idle`). On this kernel
/// it also fails a peer that holds a zero window that long (a reader that stopped): counted as
/// an idle timeout, which is what the stall rule would have closed it for.
pub fn listener(
    addr: SocketAddr,
    backlog: i32,
    send_buffer: usize,
    notsent_lowat: usize,
    user_timeout: Option<std::time::Duration>,
) -> io::Result<Socket> {
    let s = Socket::new(Domain::for_address(addr), Type::STREAM.cloexec(), Some(Protocol::TCP))?;
    s.set_reuse_address(true)?;
    s.set_reuse_port(true)?;
    s.set_tcp_nodelay(true)?;
    s.set_tcp_user_timeout(user_timeout)?;
    if send_buffer > 0 {
        s.set_send_buffer_size(send_buffer)?;
    }
    if notsent_lowat > 0 {
        let v = i32::try_from(notsent_lowat).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
        // SAFETY: a valid socket and a pointer to an int of the size given.
        let r = unsafe {
            libc::setsockopt(
                s.as_raw_fd(),
                libc::IPPROTO_TCP,
                libc::TCP_NOTSENT_LOWAT,
                (&raw const v).cast(),
                std::mem::size_of::<i32>() as libc::socklen_t,
            )
        };
        if r != 0 {
            return Err(io::Error::last_os_error());
        }
    }
    s.bind(&SockAddr::from(addr))?;
    s.listen(backlog)?;
    Ok(s)
}

/// Attaches the `tls` upper-layer protocol (kTLS) to a connected loopback TCP socket: the
/// kTLS probe (crate::tls::probe_ktls). ENOENT: no `tls` module (CONFIG_TLS off).
pub fn try_tls_ulp() -> io::Result<()> {
    let l = std::net::TcpListener::bind((Ipv4Addr::LOCALHOST, 0))?;
    let c = std::net::TcpStream::connect(l.local_addr()?)?;
    let _server = l.accept()?;
    // SAFETY: a valid connected socket, and a pointer to the 3 bytes given as the length.
    let r = unsafe { libc::setsockopt(c.as_raw_fd(), libc::SOL_TCP, libc::TCP_ULP, b"tls".as_ptr().cast(), 3) };
    if r != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// The fd of a socket, for io_uring operations that take one.
pub fn raw(s: &Socket) -> RawFd {
    s.as_raw_fd()
}

/// CPU time the calling thread has used (user + system).
/// Raises the calling thread's scheduling priority (nice `PRIORITY_NICE`) where allowed (root,
/// CAP_SYS_NICE); elsewhere it stays where it is. For the short, latency-critical threads: the
/// publish API and the store, which must get the CPU while the shards saturate it with sends
/// (a shard's sends run the whole loopback TCP path in the kernel, and on a CPU shared with a
/// busy process the publish API's thread waited over 10 s for its turn: bench-results,
/// 2026-11-30-100k-budget-1cpu-hog). Returns whether it took effect.
pub fn raise_thread_priority() -> bool {
    // SAFETY: plain syscalls on the calling thread (who = 0 with PRIO_PROCESS on Linux is the
    // calling thread's tid), no pointers.
    unsafe { libc::setpriority(libc::PRIO_PROCESS, 0, PRIORITY_NICE) == 0 }
}

/// The nice value `raise_thread_priority` asks for.
pub const PRIORITY_NICE: i32 = -10;

/// How long the calling thread has waited on a run queue, runnable but not running
/// (/proc/thread-self/schedstat, second field): CPU it wanted and did not get, because other
/// threads (its sibling shards, other processes) had the CPUs. None where the kernel does not
/// keep it.
pub fn thread_run_delay() -> Option<std::time::Duration> {
    let s = std::fs::read_to_string("/proc/thread-self/schedstat").ok()?;
    let ns: u64 = s.split_whitespace().nth(1)?.parse().ok()?;
    Some(std::time::Duration::from_nanos(ns))
}

/// CPU time the calling thread has used (CLOCK_THREAD_CPUTIME_ID); zero if the clock fails.
pub fn thread_cpu_time() -> std::time::Duration {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: `ts` is a valid out-pointer for the call's duration.
    if unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &raw mut ts) } != 0 {
        return std::time::Duration::ZERO;
    }
    std::time::Duration::new(ts.tv_sec as u64, ts.tv_nsec as u32)
}

/// An all-zero `sockaddr_storage`, for the kernel to fill (an accept's peer address).
pub fn sockaddr_storage() -> libc::sockaddr_storage {
    // SAFETY: all-zero is a valid sockaddr_storage (plain data, any bytes allowed).
    unsafe { std::mem::zeroed() }
}

/// The peer address an accept wrote, if it is an IP one.
pub fn peer_of(addr: &libc::sockaddr_storage, len: libc::socklen_t) -> Option<SocketAddr> {
    match i32::from(addr.ss_family) {
        libc::AF_INET if len as usize >= std::mem::size_of::<libc::sockaddr_in>() => {
            // SAFETY: the family says the storage holds a sockaddr_in, and it is long enough.
            let a = unsafe { &*std::ptr::from_ref::<libc::sockaddr_storage>(addr).cast::<libc::sockaddr_in>() };
            let ip = Ipv4Addr::from(u32::from_be(a.sin_addr.s_addr));
            Some(SocketAddr::new(IpAddr::V4(ip), u16::from_be(a.sin_port)))
        }
        libc::AF_INET6 if len as usize >= std::mem::size_of::<libc::sockaddr_in6>() => {
            // SAFETY: as above, for sockaddr_in6.
            let a = unsafe { &*std::ptr::from_ref::<libc::sockaddr_storage>(addr).cast::<libc::sockaddr_in6>() };
            let ip = Ipv6Addr::from(a.sin6_addr.s6_addr);
            Some(SocketAddr::new(IpAddr::V6(ip), u16::from_be(a.sin6_port)))
        }
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Accepted sockets never get a normal fd in the edge, so the listener's options must be
    /// inherited: checked here on a socket accepted the ordinary way.
    #[test]
    fn accepted_sockets_inherit_the_send_buffer_low_water_mark_and_user_timeout() {
        let idle = std::time::Duration::from_millis(90_000);
        let l = listener("127.0.0.1:0".parse().unwrap(), 8, 16 * 1024, 12_345, Some(idle)).unwrap();
        let addr = l.local_addr().unwrap().as_socket().unwrap();
        let _c = std::net::TcpStream::connect(addr).unwrap();
        let (a, _) = l.accept().unwrap();
        let mut v: i32 = 0;
        let mut len = std::mem::size_of::<i32>() as libc::socklen_t;
        // SAFETY: a valid socket, an int and its length.
        let r = unsafe {
            libc::getsockopt(
                a.as_raw_fd(),
                libc::IPPROTO_TCP,
                libc::TCP_NOTSENT_LOWAT,
                (&raw mut v).cast(),
                &raw mut len,
            )
        };
        assert_eq!(r, 0);
        assert_eq!(v, 12_345);
        assert_eq!(a.send_buffer_size().unwrap(), 32 * 1024, "the kernel doubles SO_SNDBUF");
        assert!(a.tcp_nodelay().unwrap());
        assert_eq!(a.tcp_user_timeout().unwrap(), Some(idle), "TCP_USER_TIMEOUT is the idle timeout");
    }

    #[test]
    fn peer_addresses_decode() {
        // SAFETY: all-zero is a valid sockaddr_storage.
        let mut ss: libc::sockaddr_storage = unsafe { std::mem::zeroed() };
        let sin = libc::sockaddr_in {
            sin_family: libc::AF_INET as u16,
            sin_port: 8080u16.to_be(),
            sin_addr: libc::in_addr { s_addr: u32::from(std::net::Ipv4Addr::new(127, 0, 0, 9)).to_be() },
            sin_zero: [0; 8],
        };
        // SAFETY: sockaddr_in fits in sockaddr_storage.
        unsafe { std::ptr::write((&raw mut ss).cast::<libc::sockaddr_in>(), sin) };
        let len = std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t;
        assert_eq!(peer_of(&ss, len), Some("127.0.0.9:8080".parse().unwrap()));
        assert_eq!(peer_of(&ss, 2), None, "too short");
    }
}
