//! Engine fan-out benchmark: N connections in one room on loopback, the edge's CPU per delivered
//! message at merge window 0 and at the default, next to the kernel floor: a plain blocking
//! `write` loop over the same number of sockets, writing the same frames.
//!
//! Run: `cargo bench -p edge --bench fanout` (env: `CONNS`, `SECS`, `RATE`, `OUT`). It starts the
//! release `edge` binary, opens the connections from this process (raw TCP + a real upgrade,
//! `roomcast.rkyv.v2`), publishes `RATE` messages/s for `SECS` seconds over HTTP, counts every
//! message received, and reads the edge's CPU (user and system) from /proc. The floor runs in a
//! child process (the fd limit: 20000 per process) and measures itself with getrusage.
//!
//! Results are printed as JSON and written to `$OUT/result.json` when `OUT` is set (an absolute
//! path: cargo runs benches from the package directory).

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use roomcast_proto::envelope::{self, ArchivedServerMsg, PushMessage, ServerMsg};
use roomcast_proto::ws;

fn env<T: std::str::FromStr>(name: &str, default: T) -> T {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

fn cpu_of(pid: u32) -> (f64, f64) {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let after = stat.rsplit(')').next().unwrap_or("");
    let f: Vec<&str> = after.split_whitespace().collect();
    let tick = 100.0; // USER_HZ on Linux
    let ut = f.get(11).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0) / tick;
    let st = f.get(12).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0) / tick;
    (ut, st)
}

fn self_cpu() -> (f64, f64) {
    cpu_of(std::process::id())
}

const KEY: &str = "dGhlIHNhbXBsZSBub25jZQ==";

/// Connects and upgrades; returns the stream positioned after the 101 answer.
fn connect(addr: SocketAddr, path: &str) -> TcpStream {
    let mut s = TcpStream::connect(addr).expect("connect");
    let req = format!(
        "GET {path} HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Key: {KEY}\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Protocol: roomcast.rkyv.v2\r\n\r\n"
    );
    s.write_all(req.as_bytes()).unwrap();
    let mut buf = Vec::new();
    let mut b = [0u8; 1];
    while !buf.ends_with(b"\r\n\r\n") {
        s.read_exact(&mut b).expect("101");
        buf.push(b[0]);
    }
    assert!(buf.starts_with(b"HTTP/1.1 101"), "{}", String::from_utf8_lossy(&buf));
    s
}

/// Reads frames from every connection (epoll, one thread per share), counting messages.
fn readers(
    conns: Vec<TcpStream>,
    threads: usize,
    delivered: Arc<AtomicU64>,
    stop: Arc<AtomicU64>,
) -> Vec<std::thread::JoinHandle<()>> {
    let per = conns.len().div_ceil(threads);
    let mut conns = conns;
    let mut hs = Vec::new();
    while !conns.is_empty() {
        let part: Vec<TcpStream> = conns.drain(..per.min(conns.len())).collect();
        let delivered = delivered.clone();
        let stop = stop.clone();
        hs.push(std::thread::spawn(move || {
            // One epoll set per thread.
            let mut ep = Readiness::new(&part);
            let mut bufs: Vec<Vec<u8>> = part.iter().map(|_| Vec::new()).collect();
            let mut part = part;
            let mut tmp = vec![0u8; 64 * 1024];
            while stop.load(Ordering::Relaxed) == 0 {
                for i in ep.wait(Duration::from_millis(100)) {
                    let s = &mut part[i];
                    loop {
                        match s.read(&mut tmp) {
                            Ok(0) => break,
                            Ok(n) => {
                                bufs[i].extend_from_slice(&tmp[..n]);
                                let used = count(&bufs[i], &delivered);
                                bufs[i].drain(..used);
                            }
                            Err(_) => break,
                        }
                    }
                }
            }
        }));
    }
    hs
}

/// Counts messages in the complete frames at the front of `buf`; returns bytes used.
fn count(buf: &[u8], delivered: &AtomicU64) -> usize {
    let mut off = 0;
    let mut n = 0;
    while let Ok(Some(h)) = ws::parse_header(&buf[off..]) {
        let total = h.header_len + h.payload_len as usize;
        if buf.len() - off < total {
            break;
        }
        let payload = &buf[off + h.header_len..off + total];
        if let Ok(ArchivedServerMsg::Batch { messages, .. }) = envelope::access_rkyv(payload) {
            n += messages.len() as u64;
        }
        off += total;
    }
    if n > 0 {
        delivered.fetch_add(n, Ordering::Relaxed);
    }
    off
}

/// Readiness for thousands of sockets on one thread: mio's `Poll` (epoll, edge-triggered: a
/// ready socket is read until it would block, as [`readers`] does).
struct Readiness {
    poll: mio::Poll,
    events: mio::Events,
}

impl Readiness {
    fn new(socks: &[TcpStream]) -> Self {
        let poll = mio::Poll::new().expect("epoll");
        for (i, s) in socks.iter().enumerate() {
            s.set_nonblocking(true).unwrap();
            poll.registry()
                .register(&mut mio::unix::SourceFd(&s.as_raw_fd()), mio::Token(i), mio::Interest::READABLE)
                .expect("register");
        }
        Self { poll, events: mio::Events::with_capacity(512) }
    }

    /// Indexes of readable sockets (waits up to `timeout`; none when a signal cut the wait).
    fn wait(&mut self, timeout: Duration) -> Vec<usize> {
        match self.poll.poll(&mut self.events, Some(timeout)) {
            Ok(()) => self.events.iter().map(|e| e.token().0).collect(),
            Err(_) => Vec::new(),
        }
    }
}

fn publish(http: SocketAddr, room: &str, n: u64, t0: Instant) {
    let body = format!(r#"{{"kind":"gift","body":{{"n":{n},"t":{}}}}}"#, t0.elapsed().as_micros());
    let mut s = TcpStream::connect(http).unwrap();
    let req = format!(
        "POST /v1/rooms/{room}/messages HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    s.write_all(req.as_bytes()).unwrap();
    let mut resp = String::new();
    let _ = s.read_to_string(&mut resp);
    assert!(resp.starts_with("HTTP/1.1 200"), "{resp}");
}

struct Run {
    label: String,
    window_ms: Option<u64>,
    published: u64,
    delivered: u64,
    user_s: f64,
    sys_s: f64,
    wall_s: f64,
}

impl Run {
    fn json(&self) -> String {
        let total = self.user_s + self.sys_s;
        format!(
            r#"{{"label":"{}","window_ms":{},"published":{},"delivered":{},"deliveries_per_s":{:.0},"cpu_user_s":{:.3},"cpu_sys_s":{:.3},"cpu_us_per_delivery":{:.3},"user_share":{:.3}}}"#,
            self.label,
            self.window_ms.map_or("null".into(), |w| w.to_string()),
            self.published,
            self.delivered,
            self.delivered as f64 / self.wall_s,
            self.user_s,
            self.sys_s,
            total * 1e6 / self.delivered.max(1) as f64,
            self.user_s / total.max(1e-9),
        )
    }
}

fn edge_run(conns: usize, secs: u64, rate: u64, window: u64) -> Run {
    // The edge on its own data directory, its addresses from its ready line.
    let window_s = window.to_string();
    let mut edge = roomcast_testsupport::EdgeProc::start(&[
        "--shards",
        "1",
        "--merge-window-ms",
        &window_s,
        "--max-queue-bytes",
        "16777216",
    ]);
    let (wsa, http) = (edge.ws, edge.http);
    let socks: Vec<TcpStream> = (0..conns).map(|_| connect(wsa, "/ws?room=bench")).collect();
    let delivered = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(AtomicU64::new(0));
    let hs = readers(socks, 1, delivered.clone(), stop.clone());
    std::thread::sleep(Duration::from_millis(500));
    let (u0, s0) = cpu_of(edge.child.id());
    let d0 = delivered.load(Ordering::Relaxed);
    let t0 = Instant::now();
    let total = secs * rate;
    for n in 0..total {
        let due = t0 + Duration::from_micros(n * 1_000_000 / rate);
        if let Some(w) = due.checked_duration_since(Instant::now()) {
            std::thread::sleep(w);
        }
        publish(http, "bench", n, t0);
    }
    // Wait until everything arrived (or 10 s).
    let want = d0 + total * conns as u64;
    let end = Instant::now() + Duration::from_secs(10);
    while delivered.load(Ordering::Relaxed) < want && Instant::now() < end {
        std::thread::sleep(Duration::from_millis(10));
    }
    let wall = t0.elapsed().as_secs_f64();
    let (u1, s1) = cpu_of(edge.child.id());
    stop.store(1, Ordering::Relaxed);
    for h in hs {
        let _ = h.join();
    }
    let _ = Command::new("kill").args(["-INT", &edge.child.id().to_string()]).status();
    let _ = edge.wait_exit(Duration::from_secs(30));
    Run {
        label: format!("edge window={window}ms"),
        window_ms: Some(window),
        published: total,
        delivered: delivered.load(Ordering::Relaxed) - d0,
        user_s: u1 - u0,
        sys_s: s1 - s0,
        wall_s: wall,
    }
}

/// The floor, as a child process: accept `conns` upgrades, then for every line on stdin write
/// one frame (the same bytes) to every socket with blocking writes; report own CPU.
fn floor_child(conns: usize) {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    println!("{}", l.local_addr().unwrap());
    let mut socks = Vec::with_capacity(conns);
    for _ in 0..conns {
        let (mut s, _) = l.accept().unwrap();
        let mut buf = Vec::new();
        let mut b = [0u8; 1];
        while !buf.ends_with(b"\r\n\r\n") {
            s.read_exact(&mut b).unwrap();
            buf.push(b[0]);
        }
        let resp = roomcast_proto::handshake::response_101(KEY, Some(roomcast_proto::Subprotocol::Rkyv));
        s.write_all(&resp).unwrap();
        s.set_nodelay(true).unwrap();
        socks.push(s);
    }
    println!("ready");
    let stdin = std::io::stdin();
    let (u0, s0) = self_cpu();
    let mut frames = 0u64;
    for line in stdin.lock().lines() {
        let Ok(line) = line else { break };
        if line == "end" {
            break;
        }
        let n: u64 = line.parse().unwrap_or(0);
        let msg = ServerMsg::Batch {
            room: "bench".into(),
            messages: vec![PushMessage {
                seq: n + 1,
                ts_us: 0,
                kind: "gift".into(),
                user: String::new(),
                body: format!(r#"{{"n":{n},"t":0}}"#),
            }],
            online: None,
        };
        let payload = envelope::encode_rkyv(&msg).unwrap();
        let frame = ws::encode_frame(ws::OpCode::Binary, &payload);
        for s in &mut socks {
            s.write_all(&frame).unwrap();
            frames += 1;
        }
    }
    let (u1, s1) = self_cpu();
    println!("{} {} {}", u1 - u0, s1 - s0, frames);
}

fn floor_run(conns: usize, secs: u64, rate: u64) -> Run {
    let exe = std::env::current_exe().unwrap();
    let mut child = Command::new(exe)
        .env("FANOUT_ROLE", "floor")
        .env("CONNS", conns.to_string())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut out = BufReader::new(child.stdout.take().unwrap());
    let mut line = String::new();
    out.read_line(&mut line).unwrap();
    let addr: SocketAddr = line.trim().parse().unwrap();
    let socks: Vec<TcpStream> = (0..conns).map(|_| connect(addr, "/")).collect();
    line.clear();
    out.read_line(&mut line).unwrap();
    let delivered = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(AtomicU64::new(0));
    let hs = readers(socks, 1, delivered.clone(), stop.clone());
    let mut stdin = child.stdin.take().unwrap();
    let t0 = Instant::now();
    let total = secs * rate;
    for n in 0..total {
        let due = t0 + Duration::from_micros(n * 1_000_000 / rate);
        if let Some(w) = due.checked_duration_since(Instant::now()) {
            std::thread::sleep(w);
        }
        writeln!(stdin, "{n}").unwrap();
    }
    writeln!(stdin, "end").unwrap();
    line.clear();
    out.read_line(&mut line).unwrap();
    let want = total * conns as u64;
    let end = Instant::now() + Duration::from_secs(10);
    while delivered.load(Ordering::Relaxed) < want && Instant::now() < end {
        std::thread::sleep(Duration::from_millis(10));
    }
    let wall = t0.elapsed().as_secs_f64();
    let f: Vec<f64> = line.split_whitespace().filter_map(|v| v.parse().ok()).collect();
    stop.store(1, Ordering::Relaxed);
    for h in hs {
        let _ = h.join();
    }
    let _ = child.wait();
    Run {
        label: "floor: blocking write loop".into(),
        window_ms: None,
        published: total,
        delivered: delivered.load(Ordering::Relaxed),
        user_s: f[0],
        sys_s: f[1],
        wall_s: wall,
    }
}

fn main() {
    // `cargo bench` passes `--bench`; ignore arguments.
    let conns: usize = env("CONNS", 10_000);
    if std::env::var("FANOUT_ROLE").as_deref() == Ok("floor") {
        floor_child(conns);
        return;
    }
    let secs: u64 = env("SECS", 10);
    let rate: u64 = env("RATE", 20);
    let mut runs = vec![floor_run(conns, secs, rate)];
    runs.push(edge_run(conns, secs, rate, 0));
    // The default window, with ten times the message rate: merging packs ~RATE*10/10 per frame.
    runs.push(edge_run(conns, secs, rate * 10, 100));
    let json = format!(
        "{{\"conns\":{conns},\"secs\":{secs},\"rate\":{rate},\"runs\":[{}]}}",
        runs.iter().map(Run::json).collect::<Vec<_>>().join(",")
    );
    println!("{json}");
    if let Ok(dir) = std::env::var("OUT") {
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(format!("{dir}/result.json"), &json).unwrap();
    }
}
