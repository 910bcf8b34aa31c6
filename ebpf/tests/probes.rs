//! The probes against `ss -tanei` on this kernel, for both sources: sockets are put in known
//! states (CLOSE_WAIT, a peer that never reads, a full accept queue, a SYN retransmitted to it)
//! and every exported figure must equal what `ss` reports for the same sockets at the same
//! moment. Needs root. Nothing is skipped: when the kernel refuses the eBPF programs the eBPF
//! tests fail with its error.

use std::io::Write;
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::process::Command;
use std::time::{Duration, Instant};

use roomcast_ebpf::{Probes, QueueStats, Snapshot, Source, state};
use socket2::{Domain, Protocol, Socket, Type};

/// One socket line of `ss -tanei`.
#[derive(Debug, Clone, PartialEq, Eq)]
struct SsRow {
    state: String,
    recvq: u64,
    sendq: u64,
    local_port: u16,
    /// The second figure of `retrans:a/b` (tcpi_total_retrans), 0 when absent.
    retrans: u64,
}

fn ss(ports: &[u16]) -> Vec<SsRow> {
    let filter = ports.iter().map(|p| format!("sport = :{p}")).collect::<Vec<_>>().join(" or ");
    let out = Command::new("ss").args(["-tanei", &filter]).output().expect("run ss (iproute2)");
    assert!(out.status.success(), "ss failed: {}", String::from_utf8_lossy(&out.stderr));
    let text = String::from_utf8_lossy(&out.stdout);
    let mut rows: Vec<SsRow> = Vec::new();
    for line in text.lines().skip(1) {
        if line.starts_with(char::is_whitespace) {
            if let (Some(last), Some(r)) =
                (rows.last_mut(), line.split_whitespace().find(|w| w.starts_with("retrans:")))
            {
                last.retrans = r.rsplit('/').next().and_then(|n| n.parse().ok()).unwrap_or(0);
            }
            continue;
        }
        let f: Vec<&str> = line.split_whitespace().collect();
        if f.len() < 5 {
            continue;
        }
        let local_port = f[3].rsplit(':').next().unwrap().parse().unwrap();
        rows.push(SsRow {
            state: f[0].to_string(),
            recvq: f[1].parse().unwrap(),
            sendq: f[2].parse().unwrap(),
            local_port,
            retrans: 0,
        });
    }
    rows
}

/// `ss` state names in the snapshot's order.
fn ss_state(name: &str) -> usize {
    match name {
        "ESTAB" => state::ESTABLISHED,
        "SYN-SENT" => state::SYN_SENT,
        "SYN-RECV" => state::SYN_RECV,
        "FIN-WAIT-1" => 4,
        "FIN-WAIT-2" => 5,
        "TIME-WAIT" => state::TIME_WAIT,
        "UNCONN" | "CLOSE" => 7,
        "CLOSE-WAIT" => state::CLOSE_WAIT,
        "LAST-ACK" => 9,
        "LISTEN" => state::LISTEN,
        "CLOSING" => 11,
        other => panic!("unknown ss state {other}"),
    }
}

/// Every figure the snapshot shares with `ss` must be equal.
fn assert_matches_ss(snap: &Snapshot, rows: &[SsRow]) {
    let src = snap.source.as_str();
    let mut states = [0u64; 12];
    let mut sendq = QueueStats::default();
    let mut recvq = QueueStats::default();
    for r in rows {
        let st = ss_state(&r.state);
        states[st] += 1;
        if st == state::LISTEN {
            let l = snap.listeners.iter().find(|l| l.port == r.local_port).expect("listener port watched");
            let _ = l;
        } else if st != state::TIME_WAIT && st != state::SYN_RECV {
            sendq.add(r.sendq);
            recvq.add(r.recvq);
        }
    }
    assert_eq!(snap.states, states, "{src}: sockets per state vs ss {rows:?}");
    assert_eq!(snap.sockets, rows.len() as u64, "{src}: watched sockets");
    assert_eq!(snap.send_queue, sendq, "{src}: Send-Q vs ss {rows:?}");
    assert_eq!(snap.recv_queue, recvq, "{src}: Recv-Q vs ss {rows:?}");
    for l in &snap.listeners {
        let ls: Vec<&SsRow> = rows.iter().filter(|r| r.state == "LISTEN" && r.local_port == l.port).collect();
        assert_eq!(l.sockets, ls.len() as u64, "{src}: listeners on {}", l.port);
        assert_eq!(l.backlog, ls.iter().map(|r| r.recvq).sum::<u64>(), "{src}: accept queue on {}", l.port);
        assert_eq!(l.backlog_max, ls.iter().map(|r| r.sendq).sum::<u64>(), "{src}: backlog limit on {}", l.port);
        let fullest = ls.iter().max_by(|a, b| (a.recvq * b.sendq).cmp(&(b.recvq * a.sendq)));
        assert_eq!(
            (l.fullest, l.fullest_max),
            fullest.map_or((0, 0), |r| (r.recvq, r.sendq)),
            "{src}: fullest listener on {}",
            l.port
        );
    }
    let live: u64 = rows.iter().filter(|r| r.state != "LISTEN").map(|r| r.retrans).sum();
    assert_eq!(snap.retransmits_live, live, "{src}: retransmits of live sockets vs ss");
}

fn open(source: Source, ports: &[u16]) -> Probes {
    match source {
        Source::Ebpf => Probes::open_ebpf(ports).unwrap_or_else(|e| panic!("eBPF probes must load here: {e}")),
        Source::SockDiag => Probes::open_sock_diag(ports).unwrap_or_else(|e| panic!("sock_diag must open: {e}")),
    }
}

/// Takes `ss`, a snapshot and `ss` again until both `ss` agree (nothing moved in between), then
/// compares. Returns the snapshot and the rows.
fn settled(probes: &mut Probes, ports: &[u16]) -> (Snapshot, Vec<SsRow>) {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let before = ss(ports);
        let snap = probes.snapshot().expect("snapshot");
        let after = ss(ports);
        if before == after {
            assert_matches_ss(&snap, &after);
            return (snap, after);
        }
        assert!(Instant::now() < deadline, "sockets never settled: {before:?} / {after:?}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn wait_for(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(15);
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn listener(backlog: i32) -> (Socket, u16) {
    let s = Socket::new(Domain::IPV4, Type::STREAM, Some(Protocol::TCP)).unwrap();
    s.bind(&"127.0.0.1:0".parse::<SocketAddr>().unwrap().into()).unwrap();
    s.listen(backlog).unwrap();
    let port = s.local_addr().unwrap().as_socket().unwrap().port();
    (s, port)
}

fn close_wait(source: Source) {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = l.local_addr().unwrap().port();
    let mut probes = open(source, &[port]);
    let gone = TcpStream::connect(("127.0.0.1", port)).unwrap();
    let (kept_half_closed, _) = l.accept().unwrap();
    let stays = TcpStream::connect(("127.0.0.1", port)).unwrap();
    let (stays_server, _) = l.accept().unwrap();
    drop(gone);
    wait_for("CLOSE-WAIT", || ss(&[port]).iter().any(|r| r.state == "CLOSE-WAIT"));
    let (snap, _) = settled(&mut probes, &[port]);
    assert_eq!(snap.in_state(state::CLOSE_WAIT), 1);
    assert_eq!(snap.in_state(state::ESTABLISHED), 1);
    assert!(snap.visited >= snap.sockets);
    if source == Source::Ebpf {
        assert_eq!(snap.close_wait_entered, Some(1), "transition into CLOSE_WAIT counted");
        assert_eq!(snap.opened, Some(2), "two passive opens");
    }
    drop((kept_half_closed, stays, stays_server));
}

fn send_queue_grows(source: Source) {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = l.local_addr().unwrap().port();
    let mut probes = open(source, &[port]);
    // The peer never reads: the server's writes pile up in its Send-Q.
    let peer = Socket::new(Domain::IPV4, Type::STREAM, Some(Protocol::TCP)).unwrap();
    peer.set_recv_buffer_size(64 * 1024).unwrap();
    peer.connect(&l.local_addr().unwrap().into()).unwrap();
    let (mut server, _) = l.accept().unwrap();
    server.set_nonblocking(true).unwrap();
    let chunk = vec![7u8; 64 * 1024];
    let mut written = 0usize;
    loop {
        match server.write(&chunk) {
            Ok(n) => written += n,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
            Err(e) => panic!("write: {e}"),
        }
    }
    assert!(written > 0);
    wait_for("a Send-Q", || ss(&[port]).iter().any(|r| r.sendq > 0));
    let (snap, rows) = settled(&mut probes, &[port]);
    let sendq = rows.iter().map(|r| r.sendq).max().unwrap();
    assert!(sendq > 64 * 1024, "Send-Q grew: {sendq}");
    assert_eq!(snap.send_queue.max, sendq);
    assert!(snap.send_queue.quantile(0.99) >= sendq / 2);
    drop((peer, server));
}

fn full_backlog_and_syn_retransmits(source: Source) {
    let (l, port) = listener(2);
    // A client whose port is known before it connects, so its SYN-SENT socket can be watched.
    let late = Socket::new(Domain::IPV4, Type::STREAM, Some(Protocol::TCP)).unwrap();
    late.bind(&"127.0.0.1:0".parse::<SocketAddr>().unwrap().into()).unwrap();
    let late_port = late.local_addr().unwrap().as_socket().unwrap().port();
    let mut probes = open(source, &[port, late_port]);
    let overflows_before = probes.snapshot().unwrap().listen_overflows;
    // backlog 2: the accept queue holds 3 (the kernel's limit is "more than backlog").
    let waiting: Vec<TcpStream> = (0..3).map(|_| TcpStream::connect(("127.0.0.1", port)).unwrap()).collect();
    wait_for("a full accept queue", || ss(&[port]).iter().any(|r| r.state == "LISTEN" && r.recvq == 3));
    late.set_nonblocking(true).unwrap();
    let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let _ = late.connect(&addr.into());
    // The listener drops the SYN; the client retransmits it after its initial RTO (1 s).
    wait_for("a SYN retransmit", || ss(&[late_port]).iter().any(|r| r.state == "SYN-SENT" && r.retrans >= 1));
    let (snap, rows) = settled(&mut probes, &[port, late_port]);
    let l0 = &snap.listeners[0];
    assert_eq!((l0.port, l0.backlog, l0.backlog_max), (port, 3, 2));
    assert!((snap.accept_queue_fill() - 1.5).abs() < 1e-9);
    assert_eq!(snap.in_state(state::SYN_SENT), 1);
    let syn_retrans = rows.iter().find(|r| r.state == "SYN-SENT").unwrap().retrans;
    assert!(syn_retrans >= 1);
    // Counted as it happened (eBPF tracepoint) or from the live socket (sock_diag): both equal ss.
    assert_eq!(snap.retransmits, syn_retrans, "{}: retransmits", source.as_str());
    assert_eq!(snap.top_retransmits.first().map(|r| r.retransmits), Some(syn_retrans));
    assert!(snap.listen_overflows > overflows_before, "ListenOverflows moved");
    drop((l, late, waiting));
}

#[test]
fn ebpf_close_wait() {
    close_wait(Source::Ebpf);
}

#[test]
fn sock_diag_close_wait() {
    close_wait(Source::SockDiag);
}

#[test]
fn ebpf_send_queue() {
    send_queue_grows(Source::Ebpf);
}

#[test]
fn sock_diag_send_queue() {
    send_queue_grows(Source::SockDiag);
}

#[test]
fn ebpf_full_backlog_and_syn_retransmits() {
    full_backlog_and_syn_retransmits(Source::Ebpf);
}

#[test]
fn sock_diag_full_backlog_and_syn_retransmits() {
    full_backlog_and_syn_retransmits(Source::SockDiag);
}

/// Two SO_REUSEPORT listeners on one port (as the edge's shards have), neither accepting: the
/// sums and the fullest single queue both equal `ss`.
fn reuseport_listeners(source: Source) {
    let a = Socket::new(Domain::IPV4, Type::STREAM, Some(Protocol::TCP)).unwrap();
    a.set_reuse_port(true).unwrap();
    a.bind(&"127.0.0.1:0".parse::<SocketAddr>().unwrap().into()).unwrap();
    let addr = a.local_addr().unwrap();
    let port = addr.as_socket().unwrap().port();
    a.listen(16).unwrap();
    let b = Socket::new(Domain::IPV4, Type::STREAM, Some(Protocol::TCP)).unwrap();
    b.set_reuse_port(true).unwrap();
    b.bind(&addr).unwrap();
    // Each listener must hold all 6 connections on its own: SO_REUSEPORT picks one by hash,
    // and with `listen(4)` (5 slots) the 1 run in 64 that sent all 6 to `b` blocked the 6th
    // connect until it timed out (seen in a full test run). 16 and 9: no split of 6 gives the
    // two queues the same fill, so "the fullest" is never a tie.
    b.listen(9).unwrap();
    let mut probes = open(source, &[port]);
    let waiting: Vec<TcpStream> = (0..6).map(|_| TcpStream::connect(("127.0.0.1", port)).unwrap()).collect();
    wait_for("queued connections", || {
        ss(&[port]).iter().filter(|r| r.state == "LISTEN").map(|r| r.recvq).sum::<u64>() == 6
    });
    let (snap, _) = settled(&mut probes, &[port]);
    assert_eq!(snap.listeners[0].sockets, 2);
    assert_eq!(snap.listeners[0].backlog, 6);
    assert_eq!(snap.listeners[0].backlog_max, 25);
    drop((a, b, waiting));
}

#[test]
fn ebpf_reuseport_listeners() {
    reuseport_listeners(Source::Ebpf);
}

#[test]
fn sock_diag_reuseport_listeners() {
    reuseport_listeners(Source::SockDiag);
}

#[test]
fn open_prefers_ebpf_and_reports_the_source() {
    let (_l, port) = listener(8);
    let mut p = Probes::open(&[port]).expect("some source");
    assert_eq!(p.source(), Source::Ebpf);
    let snap = p.snapshot().unwrap();
    assert_eq!(snap.source, Source::Ebpf);
    assert_eq!(snap.listeners[0].sockets, 1);
    assert_eq!(snap.listeners[0].backlog_max, 8);
    let json = serde_json::to_value(&snap).unwrap();
    assert_eq!(json["source"], "ebpf");
}

/// Sockets on ports nobody watches (a listener, an established pair and one in CLOSE_WAIT,
/// one with a Send-Q) are walked but not counted: the snapshot holds exactly the watched
/// listener, whatever else the namespace has.
fn unwatched_sockets_are_not_counted(source: Source) {
    let (_watched, port) = listener(8);
    let other = TcpListener::bind("127.0.0.1:0").unwrap();
    let other_port = other.local_addr().unwrap().port();
    let client = TcpStream::connect(("127.0.0.1", other_port)).unwrap();
    let (mut server, _) = other.accept().unwrap();
    let gone = TcpStream::connect(("127.0.0.1", other_port)).unwrap();
    let (half_closed, _) = other.accept().unwrap();
    drop(gone);
    server.write_all(&[1u8; 1000]).unwrap();
    wait_for("the unwatched sockets", || {
        let rows = ss(&[other_port]);
        rows.iter().any(|r| r.state == "CLOSE-WAIT") && rows.iter().any(|r| r.state == "ESTAB")
    });
    let mut probes = open(source, &[port]);
    let (snap, rows) = settled(&mut probes, &[port]);
    assert_eq!(rows.len(), 1, "ss: only the watched listener on {port}: {rows:?}");
    assert_eq!(snap.sockets, 1, "{}: only the watched listener counted", source.as_str());
    assert_eq!(snap.in_state(state::LISTEN), 1);
    assert_eq!(snap.states.iter().sum::<u64>(), 1, "{}: {:?}", source.as_str(), snap.states);
    assert_eq!((snap.in_state(state::CLOSE_WAIT), snap.in_state(state::ESTABLISHED)), (0, 0));
    assert_eq!(snap.send_queue.sockets + snap.recv_queue.sockets, 0, "no queue of an unwatched socket");
    if source == Source::Ebpf {
        // The iterator walks every TCP socket of the namespace: ours at least.
        assert!(snap.visited >= 5, "{}: walked {} sockets", source.as_str(), snap.visited);
    }
    drop((other, client, server, half_closed));
}

#[test]
fn ebpf_unwatched_sockets_are_not_counted() {
    unwatched_sockets_are_not_counted(Source::Ebpf);
}

#[test]
fn sock_diag_unwatched_sockets_are_not_counted() {
    unwatched_sockets_are_not_counted(Source::SockDiag);
}

/// The inode of a socket this process holds, from its /proc/self/fd link.
fn socket_inode(fd: &impl std::os::fd::AsRawFd) -> u64 {
    let link = std::fs::read_link(format!("/proc/self/fd/{}", fd.as_raw_fd())).unwrap();
    let link = link.to_str().unwrap().to_owned();
    link.strip_prefix("socket:[").and_then(|l| l.strip_suffix(']')).unwrap().parse().unwrap()
}

#[test]
fn the_holder_iterator_names_the_processes_holding_a_socket() {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let inode = socket_inode(&l);
    // A child holding a socket of its own, and one inherited copy of nothing else.
    let mut child = Command::new("python3")
        .args(["-c", "import socket,sys,os; s=socket.socket(); print(os.readlink(f'/proc/self/fd/{s.fileno()}'), flush=True); sys.stdin.read()"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("python3");
    let mut line = String::new();
    std::io::BufRead::read_line(&mut std::io::BufReader::new(child.stdout.take().unwrap()), &mut line).unwrap();
    let child_inode: u64 =
        line.trim().strip_prefix("socket:[").and_then(|l| l.strip_suffix(']')).unwrap().parse().unwrap();
    let me = std::process::id();

    let found = roomcast_ebpf::holders::socket_holders(&[inode]).expect("the kernel takes iter/task_file");
    assert_eq!(found, vec![me]);
    let found = roomcast_ebpf::holders::socket_holders(&[inode, child_inode]).unwrap();
    let mut want = vec![me, child.id()];
    want.sort_unstable();
    assert_eq!(found, want);
    // An inode nobody holds (a file of another kind can share the number: only sockets count).
    let found = roomcast_ebpf::holders::socket_holders(&[u64::MAX]).unwrap();
    assert!(found.is_empty(), "{found:?}");
    drop(child.stdin.take());
    child.wait().unwrap();
}

/// Set in the copy of this test binary that [`the_holder_iterator_names_processes_by_their_id_in_a_container`]
/// runs in a pid namespace of its own.
const IN_PID_NS: &str = "ROOMCAST_TEST_IN_PID_NS";

#[test]
fn the_holder_iterator_names_processes_by_their_id_in_a_container() {
    // This test binary again, as the first process of a new pid namespace with its own /proc
    // (a container's view): the ids found must be the ones that /proc lists, not the kernel's
    // global ones (which named "pid 6791 (?)" for an edge that was pid 2 there).
    let exe = std::env::current_exe().unwrap();
    let out = Command::new("unshare")
        .args(["--pid", "--fork", "--mount-proc", "--"])
        .arg(&exe)
        .args(["--exact", "holders_inside_a_pid_namespace", "--nocapture", "--test-threads=1"])
        .env(IN_PID_NS, "1")
        .output()
        .expect("run unshare (util-linux)");
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "in a pid namespace: {text}");
    assert!(text.contains("holders in the pid namespace: ok"), "the inner test did not run: {text}");
}

/// The inside of the test above; does nothing when run on its own.
#[test]
fn holders_inside_a_pid_namespace() {
    if std::env::var_os(IN_PID_NS).is_none() {
        return;
    }
    let me = std::process::id();
    assert!(me < 100, "not the first processes of a new pid namespace: pid {me}");
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let found = roomcast_ebpf::holders::socket_holders(&[socket_inode(&l)]).expect("the kernel takes iter/task_file");
    assert_eq!(found, vec![me], "ids as /proc in the namespace knows them");
    println!("holders in the pid namespace: ok");
}
