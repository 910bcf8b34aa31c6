//! A worker process: opens its share of the connections (spread over source addresses), then
//! reads every frame with one epoll thread, measuring latency and loss per kind. Members told
//! to go, or whose socket ended, move on the same loop ([`moves`]).
//!
//! Workers are separate processes because RLIMIT_NOFILE (20000 here) bounds each process's
//! sockets; the coordinator starts as many as the connection count needs. Each reports progress
//! every second and its final figures on stdout as JSON lines, and takes commands on stdin.
//! What it tells people goes to stderr, a line at a time: the coordinator reads each worker's
//! stderr and prefixes its lines with the worker (`w3: `), so the lines say nothing of which
//! worker they come from.

use std::io::{BufRead, Read, Write};
use std::net::{IpAddr, Ipv4Addr, SocketAddr, TcpStream};
use std::os::fd::{AsRawFd, RawFd};
use std::path::PathBuf;
use std::sync::{Arc, mpsc};
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use mio::unix::SourceFd;
use roomcast_proto::envelope::{self, ArchivedServerMsg};
use roomcast_proto::ws;
use serde::{Deserialize, Serialize};
use socket2::{Domain, Socket, Type};

use crate::connect::{MOVE_TOKEN_BASE, Pending, Step, TOKEN_BASE, Window};
use crate::stats::{KindTrack, body_fields, body_kind, body_run, body_stream, encode_hist, histogram};

mod moves;

/// What the worker connects to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "snake_case")]
pub enum Target {
    /// roomcast edge: `GET /ws?room=R`, envelope batches.
    Edge,
    /// Nchan: `GET /sub/R`, one text frame per message (the body).
    Nchan,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct WorkerArgs {
    pub id: usize,
    pub target: Target,
    /// ws addresses (host:port) to spread over.
    pub addrs: Vec<SocketAddr>,
    /// This worker's connections are global indexes `first..first + count`.
    pub first: usize,
    pub count: usize,
    /// Rooms and how connections are spread over them.
    pub rooms: u32,
    pub dist: crate::Dist,
    pub rkyv: bool,
    /// Members read Server-Sent Events (`GET /sse`) instead of WebSocket frames.
    #[serde(default)]
    pub sse: bool,
    /// Members offer permessage-deflate and inflate compressed frames.
    #[serde(default)]
    pub deflate: bool,
    /// Connections per second (this worker's share).
    pub ramp: f64,
    /// This worker's source addresses (no other worker uses them); connection i binds
    /// `src[i % len]` and lets the kernel pick the port per 4-tuple.
    pub src: Vec<Ipv4Addr>,
    pub kinds: Vec<String>,
    /// SO_RCVBUF of each connection (0: kernel autotuning), and of the slow readers.
    pub rcvbuf: usize,
    pub slow_rcvbuf: usize,
    /// Every n-th connection (0: none) is a slow reader: it reads at most `slow_bytes` twice a
    /// second instead of as fast as data comes.
    pub slow_every: usize,
    pub slow_bytes: usize,
    /// Follow the edge's `goaway`: ask its dispatch URL for another edge and reconnect there with
    /// `since` = the last seq seen, keeping the connection's loss accounting across the move.
    pub follow_goaway: bool,
    /// Connection tokens, one per line; connection N (global index) sends line N as `&token=`.
    pub tokens: Option<PathBuf>,
    /// Publishing streams per kind (`"s"` in the body): order and loss are checked per stream.
    #[serde(default)]
    pub streams: Vec<usize>,
    /// Members connect with TLS, trusting this PEM CA (`--tls-ca`); None: plain.
    #[serde(default)]
    pub tls_ca: Option<PathBuf>,
    /// First connects in flight at once (plain members; TLS members connect one at a time).
    #[serde(default = "one")]
    pub connect_inflight: usize,
    /// Seconds a move keeps retrying before it is given up (`--move-give-up`); 0: never (the
    /// member retries until the run ends, and then counts as still reconnecting).
    #[serde(default = "default_move_give_up")]
    pub move_give_up_s: f64,
    /// The run's id in the bodies it publishes ([`crate::publish::run_id`]): a message with
    /// another is another run's, not counted.
    #[serde(default)]
    pub run: u64,
}

impl WorkerArgs {
    /// How long a move is retried before it is given up; None: never ([`Self::move_give_up_s`] 0).
    pub fn move_give_up(&self) -> Option<Duration> {
        (self.move_give_up_s > 0.0).then(|| Duration::from_secs_f64(self.move_give_up_s))
    }
}

fn one() -> usize {
    1
}

fn default_move_give_up() -> f64 {
    DEFAULT_MOVE_GIVE_UP_S
}

/// Failed first connects: how many, by reason ([`failure_reason`]).
struct Failures {
    total: u64,
    by: std::collections::BTreeMap<String, u64>,
}

impl Failures {
    /// Counts connection `conn`'s (global index) failure; the first of each reason is printed
    /// with its detail.
    fn count(&mut self, e: &anyhow::Error, conn: usize) {
        self.total += 1;
        let reason = failure_reason(e);
        let n = self.by.entry(reason.clone()).or_default();
        *n += 1;
        if *n == 1 {
            eprintln!("connection {conn} failed ({reason}): {e:#}");
        }
    }
}

/// A member's socket: plain, or TLS (rustls over the same nonblocking socket: reads return
/// `WouldBlock` once the socket has nothing and rustls nothing decrypted; what a write leaves
/// in rustls goes out with the next read or write).
pub enum Sock {
    /// ws://
    Plain(TcpStream),
    /// wss://
    Tls(Box<rustls::StreamOwned<rustls::ClientConnection, TcpStream>>),
}

impl Sock {
    fn tcp(&self) -> &TcpStream {
        match self {
            Self::Plain(s) => s,
            Self::Tls(s) => s.get_ref(),
        }
    }

    fn as_raw_fd(&self) -> std::os::fd::RawFd {
        self.tcp().as_raw_fd()
    }

    fn peer_addr(&self) -> std::io::Result<SocketAddr> {
        self.tcp().peer_addr()
    }
}

impl Read for Sock {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        match self {
            Self::Plain(s) => s.read(buf),
            Self::Tls(s) => s.read(buf),
        }
    }
}

impl Write for Sock {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        match self {
            Self::Plain(s) => s.write(buf),
            Self::Tls(s) => s.write(buf),
        }
    }

    fn flush(&mut self) -> std::io::Result<()> {
        match self {
            Self::Plain(s) => s.flush(),
            Self::Tls(s) => s.flush(),
        }
    }
}

/// The worker's TLS client configuration (`--tls-ca`), built once.
fn tls_config(ca: &std::path::Path) -> anyhow::Result<std::sync::Arc<rustls::ClientConfig>> {
    use rustls::pki_types::pem::PemObject;
    static CFG: std::sync::OnceLock<std::sync::Arc<rustls::ClientConfig>> = std::sync::OnceLock::new();
    if let Some(c) = CFG.get() {
        return Ok(c.clone());
    }
    let mut roots = rustls::RootCertStore::empty();
    for cert in rustls::pki_types::CertificateDer::pem_file_iter(ca)
        .map_err(|e| anyhow::anyhow!("--tls-ca {}: {e}", ca.display()))?
    {
        roots.add(cert.map_err(|e| anyhow::anyhow!("--tls-ca {}: {e}", ca.display()))?)?;
    }
    let provider = std::sync::Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let cfg = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(CFG.get_or_init(|| std::sync::Arc::new(cfg)).clone())
}

#[derive(Debug, Default, Serialize, Deserialize)]
pub struct Progress {
    pub id: usize,
    pub connected: u64,
    pub failed: u64,
    /// Failed attempts by reason ([`failure_reason`]).
    #[serde(default)]
    pub failed_by: std::collections::BTreeMap<String, u64>,
    /// Connections still to try.
    #[serde(default)]
    pub pending: u64,
    pub deliveries: u64,
    pub frames: u64,
    pub bytes: u64,
    /// Interval latency percentiles (µs), all kinds.
    pub p50_us: u64,
    pub p99_us: u64,
    /// Interval p99 of the first kind (gifts), µs.
    pub first_kind_p99_us: u64,
    pub reconnects: u64,
    /// Members open now (connected, not closed nor between a goaway and their new socket).
    #[serde(default)]
    pub open: u64,
    /// `gap` and `reset` messages received so far (see [`Final::gaps`]).
    #[serde(default)]
    pub gaps: u64,
    #[serde(default)]
    pub resets: u64,
    pub cpu_s: f64,
}

#[derive(Debug, Default, Serialize, Deserialize)]
pub struct Final {
    /// Connections whose stream does not parse (a server bug), or ends in a partial frame.
    pub corrupt: u64,
    pub partial: u64,
    pub id: usize,
    pub connected: u64,
    pub failed: u64,
    /// Failed attempts by reason ([`failure_reason`]).
    #[serde(default)]
    pub failed_by: std::collections::BTreeMap<String, u64>,
    pub closed: u64,
    /// Close frames received from the server, by close code (0: a close frame without one).
    #[serde(default)]
    pub close_codes: std::collections::BTreeMap<u16, u64>,
    /// Open sockets that ended without a close frame, by how (`eof`, `reset`, ...).
    #[serde(default)]
    pub sockets_lost: std::collections::BTreeMap<String, u64>,
    pub deliveries: u64,
    pub frames: u64,
    /// Of `frames`, those that arrived compressed (permessage-deflate).
    #[serde(default)]
    pub compressed_frames: u64,
    pub bytes: u64,
    /// Per kind: latency histogram (base64 V2) on the full-speed readers, and on the slow
    /// readers; received, lost, duplicates.
    pub hist: Vec<String>,
    pub hist_slow: Vec<String>,
    pub received: Vec<u64>,
    pub lost: Vec<u64>,
    /// Loss on connections that read at full speed.
    pub fast_lost: Vec<u64>,
    /// Slow-reader connections in this worker.
    pub slow: u64,
    pub dup: Vec<u64>,
    /// Members that joined afresh on a new socket (their first was lost before its `joined`,
    /// so they had no position to resume from), and per kind the numbers published before
    /// such a join, which were not owed to them ([`KindTrack::start_afresh`]).
    #[serde(default)]
    pub fresh_starts: u64,
    #[serde(default)]
    pub not_owed: Vec<u64>,
    /// Messages another run published (another `"r"` in the body): in no other figure.
    #[serde(default)]
    pub foreign: u64,
    pub connect_hist: String,
    /// The most first connects this worker had in flight at once (`--connect-inflight`).
    #[serde(default)]
    pub connect_inflight_peak: u64,
    /// The most moves this worker had in flight at once (dispatch request or connect and
    /// upgrade; `--connect-inflight` bounds them).
    #[serde(default)]
    pub move_inflight_peak: u64,
    /// Reconnects after goaway, those that failed, and goaway-to-upgraded times (base64 V2).
    pub reconnects: u64,
    pub reconnect_failed: u64,
    pub reconnect_hist: String,
    /// Failed attempts of the moves by reason, each one (retried, or the last of a move given
    /// up): `dispatch_` prefixed when asking the dispatch URL failed (`dispatch_http_503` while
    /// no edge takes members: as many as dispatch's own count of its refusals).
    #[serde(default)]
    pub reconnect_attempts_failed_by: std::collections::BTreeMap<String, u64>,
    /// Move attempts past their deadline whose answer had arrived and waited for this worker
    /// to read it: taken, not counted as timeouts.
    #[serde(default)]
    pub move_answers_read_late: u64,
    /// Of the reconnects, those after a close with 4000 (slow consumer) or 1013 (try again
    /// later) rather than a goaway: a real client resumes with `since` after those too.
    #[serde(default)]
    pub resumed: u64,
    /// Of `connected`, the members open at the end; those between sockets then for less than
    /// [`MOVES_AT_END`] (on their way back: an edge closing idle members every second); and
    /// those between sockets for longer (retrying: an edge that never came back).
    #[serde(default)]
    pub open_at_end: u64,
    #[serde(default)]
    pub moving_at_end: u64,
    #[serde(default)]
    pub reconnecting_at_end: u64,
    /// Of `open_at_end`, the members the generator closed as a client leaving does
    /// ([`close_at_end`]): a close frame with 1000 written whole (an event stream has none: its
    /// socket shut), then the write side shut. Without it the workers exited with the sockets
    /// open, and the edge counted most of them as resets (`peer_reset`).
    #[serde(default)]
    pub closed_by_generator_at_end: u64,
    /// Of `open_at_end`, those whose server had not closed its side within [`CLOSE_DRAIN`]
    /// (dropped then: the kernel resets a socket closed with bytes unread).
    #[serde(default)]
    pub close_unanswered_at_end: u64,
    /// `gap` messages the members received (seqs `from..=to` of their room cannot be
    /// recovered: a `since` older than history, or lost by the bus), and the seqs they named
    /// in all; `reset` messages (a member's position void: the room's numbering restarted, or
    /// its `since` was ahead of the room). WebSocket (both encodings) and event streams alike.
    #[serde(default)]
    pub gaps: u64,
    #[serde(default)]
    pub gap_seqs: u64,
    #[serde(default)]
    pub resets: u64,
    pub cpu_s: f64,
}

/// Stop: the final `k` published per (room, kind, stream), and of those the ones never
/// accepted (batched streams number a message before the edge answers for it; a droppable
/// message that got no answer keeps its number).
#[derive(Debug, Serialize, Deserialize)]
pub struct Stop {
    pub published: Vec<Vec<Vec<u64>>>,
    #[serde(default)]
    pub holes: Vec<Vec<Vec<u64>>>,
    /// Of `holes`, those after each stream's last accepted message: the end waits for the
    /// message before them.
    #[serde(default)]
    pub tail_holes: Vec<Vec<Vec<u64>>>,
}

impl Stop {
    /// The first `k` of a stream (`room`, first kind, stream `st`) no member can receive:
    /// the stream's next number less its trailing holes. A member with everything below it is
    /// complete.
    pub fn owed_upto(&self, room: usize, st: usize) -> u64 {
        let at = |v: &Vec<Vec<Vec<u64>>>| v.get(room).and_then(|r| r.first()).and_then(|k| k.get(st)).copied();
        at(&self.published).unwrap_or(0).saturating_sub(at(&self.tail_holes).unwrap_or(0))
    }
}

fn now_us() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_micros() as u64)
}

pub fn own_cpu_s() -> f64 {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    let f: Vec<&str> = stat.rsplit(')').next().unwrap_or("").split_whitespace().collect();
    let t = |i: usize| f.get(i).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
    (t(11) + t(12)) / 100.0
}

/// Where connection `i` (this worker's index) first goes: its edge address and request path.
fn first_target(args: &WorkerArgs, i: usize, room: u32, tokens: &[String]) -> (SocketAddr, String) {
    let dst = args.addrs[i % args.addrs.len()];
    let path = match args.target {
        Target::Edge if args.sse => format!("/sse?room=r{room}{}", token_param(tokens, i)),
        Target::Edge => format!("/ws?room=r{room}{}", token_param(tokens, i)),
        Target::Nchan => format!("/sub/r{room}"),
    };
    (dst, path)
}

/// The `since` query parameter for a member's position (none without one).
fn since_param(since: Option<u64>) -> String {
    since.map(|s| format!("&since={s}")).unwrap_or_default()
}

/// `&token=JWT` for this worker's connection `i`, or nothing when the run has no tokens.
fn token_param(tokens: &[String], i: usize) -> String {
    tokens.get(i).map_or_else(String::new, |t| format!("&token={t}"))
}

/// Asks a dispatch URL (`http://HOST:PORT/v1/route`) where room `room` should connect, with a
/// blocking client; a `ws://` URL is used as it is. Returns the address and the request path.
/// Only the blocking movers of TLS members use it; plain members ask with
/// [`crate::dispatch`] on the worker's loop, sending and reading the same.
fn resolve(http: &reqwest::blocking::Client, url: &str, room: u32, sse: bool) -> anyhow::Result<(SocketAddr, String)> {
    let ws = if url.starts_with("http://") {
        // A goaway's URL names the room already; a configured dispatch URL does not.
        let ask = if url.contains("room=") {
            url.to_owned()
        } else {
            format!("{url}{}room=r{room}", if url.contains('?') { '&' } else { '?' })
        };
        let resp = http.get(ask).timeout(crate::dispatch::DISPATCH_TIMEOUT).send()?;
        if !resp.status().is_success() {
            let line = format!("dispatch answered {}", resp.status());
            return Err(Refused { status: resp.status().as_u16(), line }.into());
        }
        crate::dispatch::url_of(resp.text()?.as_bytes())?
    } else {
        url.to_owned()
    };
    let (authority, path) = ws_target(&ws, room, sse)?;
    Ok((crate::dispatch::lookup(&authority)?, path))
}

/// Where a WebSocket URL (from dispatch, or a resume's `ws://PEER/ws?room=R`) sends room
/// `room`'s member: the edge's `HOST:PORT` (an IP, or a name for [`crate::dispatch::lookup`];
/// port 80, or 443 for `wss://`, when none is named) and the request path (`/sse?...` for an
/// SSE member). A URL that is not `ws://` or `wss://` with a host is a
/// [`crate::dispatch::BadAnswer`].
fn ws_target(ws: &str, room: u32, sse: bool) -> anyhow::Result<(String, String)> {
    let bad = |what: &str| anyhow::Error::from(crate::dispatch::BadAnswer(format!("{what}: {ws}")));
    // wss:// when the edge serves TLS (the member then connects with `--tls-ca`).
    let (rest, port) = match (ws.strip_prefix("ws://"), ws.strip_prefix("wss://")) {
        (Some(rest), _) => (rest, 80),
        (_, Some(rest)) => (rest, 443),
        _ => return Err(bad("not a ws:// or wss:// URL")),
    };
    let (host, path) = rest.split_at(rest.find(['/', '?']).unwrap_or(rest.len()));
    if host.is_empty() {
        return Err(bad("no host in WebSocket URL"));
    }
    let addr = crate::dispatch::with_port(host, port);
    let path = if !path.contains("room=") {
        format!("/ws?room=r{room}")
    } else if path.starts_with('?') {
        format!("/{path}")
    } else {
        path.to_owned()
    };
    // Dispatch and goaways name the WebSocket path; an SSE member takes the same edge's /sse.
    let path = match path.strip_prefix("/ws?") {
        Some(query) if sse => format!("/sse?{query}"),
        _ => path,
    };
    Ok((addr, path))
}

/// A new socket for connection `i` (global index): its receive buffer, bound to this worker's
/// source address for it with the port left to the kernel per 4-tuple.
pub(crate) fn member_socket(args: &WorkerArgs, i: usize, slow: bool) -> anyhow::Result<Socket> {
    let rcvbuf = if slow { args.slow_rcvbuf } else { args.rcvbuf };
    source_socket(args, i, rcvbuf)
}

/// A new socket bound to this worker's source address for connection `i` (port left to the
/// kernel per 4-tuple), with receive buffer `rcvbuf` (0: autotuning). Moves' dispatch requests
/// use it too: one connection per request (`Connection: close`), so at 10^6 moves they need
/// the same spread of 4-tuples as the members.
pub(crate) fn source_socket(args: &WorkerArgs, i: usize, rcvbuf: usize) -> anyhow::Result<Socket> {
    let src = args.src.get(i % args.src.len().max(1)).copied().unwrap_or(Ipv4Addr::LOCALHOST);
    let sock = Socket::new(Domain::IPV4, Type::STREAM, None)?;
    if rcvbuf > 0 {
        sock.set_recv_buffer_size(rcvbuf)?;
    }
    // Let the kernel pick the port per 4-tuple, not per source address: with many source
    // addresses this is what lifts the 28k ephemeral-port limit.
    let one: libc::c_int = 1;
    // SAFETY: valid socket fd, option value pointer and length.
    unsafe {
        libc::setsockopt(
            sock.as_raw_fd(),
            libc::IPPROTO_IP,
            libc::IP_BIND_ADDRESS_NO_PORT,
            (&raw const one).cast(),
            std::mem::size_of::<libc::c_int>() as u32,
        );
    }
    sock.bind(&SocketAddr::new(IpAddr::V4(src), 0).into())?;
    Ok(sock)
}

/// What a member sends once connected: the upgrade request (or the event stream's GET) for
/// `path` on `dst`, the key its answer must derive from (None for SSE) and the subprotocol.
pub(crate) fn member_request(
    args: &WorkerArgs,
    dst: SocketAddr,
    path: &str,
) -> anyhow::Result<(Vec<u8>, Option<String>, &'static str)> {
    let proto = match args.target {
        Target::Edge if args.rkyv => "roomcast.rkyv.v2",
        Target::Edge => "roomcast.json.v1",
        Target::Nchan => "",
    };
    if path.starts_with("/sse?") {
        let req = format!("GET {path} HTTP/1.1\r\nHost: {dst}\r\nAccept: text/event-stream\r\n\r\n");
        return Ok((req.into_bytes(), None, proto));
    }
    let (req, key) = upgrade_request(dst, path, proto, args.deflate)?;
    Ok((req, Some(key), proto))
}

/// Checks the answer `head` (up to its blank line) to [`member_request`]: a valid upgrade, or
/// for an event stream a 200.
pub(crate) fn check_answer(head: &[u8], key: Option<&str>, proto: &str) -> anyhow::Result<()> {
    match key {
        Some(key) => check_upgrade(head, key, proto),
        None if head.starts_with(b"HTTP/1.1 200") => Ok(()),
        None => Err(Refused::of(head).into()),
    }
}

/// Connects and upgrades one member, blocking (connect and answer bounded by 10 s each). TLS
/// members use it, for their first connects and (on the blocking movers) their moves: the
/// rustls handshake runs inside the blocking write and read here. Plain members' connects and
/// moves go through [`crate::connect::Pending`] instead, many at a time on the worker's loop.
fn open_to(args: &WorkerArgs, i: usize, dst: SocketAddr, path: &str, slow: bool) -> anyhow::Result<Sock> {
    let sock = member_socket(args, i, slow)?;
    sock.connect_timeout(&dst.into(), Duration::from_secs(10))?;
    let tcp: TcpStream = sock.into();
    tcp.set_read_timeout(Some(Duration::from_secs(10)))?;
    let mut s = match &args.tls_ca {
        // The TLS handshake runs inside the first write and read below (blocking, bounded by
        // the read timeout), before the socket turns nonblocking.
        Some(ca) => {
            let name = rustls::pki_types::ServerName::from(dst.ip());
            Sock::Tls(Box::new(rustls::StreamOwned::new(rustls::ClientConnection::new(tls_config(ca)?, name)?, tcp)))
        }
        None => Sock::Plain(tcp),
    };
    let (req, key, proto) = member_request(args, dst, path)?;
    s.write_all(&req)?;
    let buf = read_head(&mut s)?;
    check_answer(&buf, key.as_deref(), proto)?;
    s.tcp().set_nonblocking(true)?;
    Ok(s)
}

/// Reads the server's answer up to and with its blank line, and nothing after it (what follows,
/// the edge's `joined` at once, is the reading loop's). A plain socket peeks and then takes
/// exactly the answer's bytes: two or three system calls instead of one a byte (~130 per
/// member, 1.3 x 10^8 for a 10^6 run). TLS reads a byte at a time from rustls's plaintext.
fn read_head(s: &mut Sock) -> anyhow::Result<Vec<u8>> {
    const LIMIT: usize = 4096;
    let mut buf = Vec::with_capacity(256);
    match s {
        Sock::Plain(tcp) => {
            let mut peeked = [0u8; 1024];
            // How much of "\r\n\r\n" the bytes so far end with.
            let mut matched = 0usize;
            loop {
                let n = tcp.peek(&mut peeked)?;
                anyhow::ensure!(n > 0, std::io::Error::from(std::io::ErrorKind::UnexpectedEof));
                let mut take = n;
                for (i, &b) in peeked[..n].iter().enumerate() {
                    matched = match (matched, b) {
                        (0 | 2, b'\r') => matched + 1,
                        (1 | 3, b'\n') => matched + 1,
                        (_, b'\r') => 1,
                        _ => 0,
                    };
                    if matched == 4 {
                        take = i + 1;
                        break;
                    }
                }
                let start = buf.len();
                buf.resize(start + take, 0);
                tcp.read_exact(&mut buf[start..])?;
                if matched == 4 {
                    return Ok(buf);
                }
                anyhow::ensure!(buf.len() < LIMIT, "handshake answer too long");
            }
        }
        Sock::Tls(_) => {
            let mut b = [0u8; 1];
            while !buf.ends_with(b"\r\n\r\n") {
                s.read_exact(&mut b)?;
                buf.push(b[0]);
                anyhow::ensure!(buf.len() < LIMIT, "handshake answer too long");
            }
            Ok(buf)
        }
    }
}

/// An upgrade request for `path` on `dst` from tungstenite's client handshake: the headers RFC
/// 6455 §4.1 asks for and a fresh random `Sec-WebSocket-Key`, returned with the request.
/// With `deflate`, it offers permessage-deflate as Chromium does.
fn upgrade_request(dst: SocketAddr, path: &str, proto: &str, deflate: bool) -> anyhow::Result<(Vec<u8>, String)> {
    use tungstenite::client::IntoClientRequest;
    let mut req = format!("ws://{dst}{path}").into_client_request()?;
    if !proto.is_empty() {
        req.headers_mut().insert("Sec-WebSocket-Protocol", tungstenite::http::HeaderValue::from_str(proto)?);
    }
    if deflate {
        req.headers_mut().insert(
            "Sec-WebSocket-Extensions",
            tungstenite::http::HeaderValue::from_static("permessage-deflate; client_max_window_bits"),
        );
    }
    Ok(tungstenite::handshake::client::generate_request(req)?)
}

/// Checks an upgrade answer (`head`: up to its blank line) as RFC 6455 §4.1 tells a client to:
/// 101, `Upgrade: websocket`, `Connection: Upgrade`, the `Sec-WebSocket-Accept` derived from our
/// `key` (tungstenite's `derive_accept_key`), and the subprotocol we offered (none if none).
fn check_upgrade(head: &[u8], key: &str, proto: &str) -> anyhow::Result<()> {
    let mut headers = [httparse::EMPTY_HEADER; 32];
    let mut resp = httparse::Response::new(&mut headers);
    anyhow::ensure!(resp.parse(head)?.is_complete(), "incomplete handshake answer");
    if resp.code != Some(101) {
        return Err(Refused::of(head).into());
    }
    let header = |name: &str| resp.headers.iter().find(|h| h.name.eq_ignore_ascii_case(name)).map(|h| h.value);
    anyhow::ensure!(header("Upgrade").is_some_and(|v| v.eq_ignore_ascii_case(b"websocket")), "no Upgrade: websocket");
    let upgrade_token = |v: &[u8]| v.split(|&b| b == b',').any(|t| t.trim_ascii().eq_ignore_ascii_case(b"upgrade"));
    anyhow::ensure!(header("Connection").is_some_and(upgrade_token), "no Connection: Upgrade");
    let accept = tungstenite::handshake::derive_accept_key(key.as_bytes());
    anyhow::ensure!(header("Sec-WebSocket-Accept") == Some(accept.as_bytes()), "wrong Sec-WebSocket-Accept");
    let offered = Some(proto.as_bytes()).filter(|p| !p.is_empty());
    anyhow::ensure!(header("Sec-WebSocket-Protocol") == offered, "subprotocol {offered:?} not agreed");
    Ok(())
}

/// The server answered the upgrade (or the event stream's GET) with another status.
#[derive(Debug)]
pub struct Refused {
    /// The HTTP status (0: none readable).
    pub status: u16,
    /// The answer's first line.
    pub line: String,
}

impl Refused {
    fn of(head: &[u8]) -> Self {
        let line = String::from_utf8_lossy(head).lines().next().unwrap_or("").to_owned();
        let status = line.split_whitespace().nth(1).and_then(|s| s.parse().ok()).unwrap_or(0);
        Self { status, line }
    }
}

impl std::fmt::Display for Refused {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "refused: {}", self.line)
    }
}

impl std::error::Error for Refused {}

/// Why a connection attempt failed, as a short name for the counts by reason: `refused`
/// (nothing listening, or the accept queue's SYN answered with RST), `reset`, `timeout` (the
/// connect or the handshake's answer took over 10 s: a full accept queue drops SYNs), `http_N`
/// (the edge answered N: 503 overloaded, 401 token...), `closed_in_handshake`, `no_source_port`
/// (the source address's ephemeral ports are used up), `fd_limit`, `tls`, `bad_answer` (a
/// dispatch answer, or a URL in one or in a goaway, that cannot be used), `unresolved_host` (a
/// host name the resolver does not know), `handshake` (an answer that is not a valid upgrade),
/// `io_other`. A fixed set, but for `http_N` (N one of the statuses: at most a few hundred).
pub fn failure_reason(e: &anyhow::Error) -> String {
    for cause in e.chain() {
        if let Some(r) = cause.downcast_ref::<Refused>() {
            return format!("http_{}", r.status);
        }
        if cause.is::<crate::dispatch::BadAnswer>() {
            return "bad_answer".into();
        }
        if cause.is::<crate::dispatch::Unresolved>() {
            return "unresolved_host".into();
        }
        if let Some(io) = cause.downcast_ref::<std::io::Error>() {
            if io.get_ref().is_some_and(<dyn std::error::Error + Send + Sync>::is::<rustls::Error>) {
                return "tls".into();
            }
            return io_reason(io).into();
        }
        if cause.is::<rustls::Error>() {
            return "tls".into();
        }
    }
    "handshake".into()
}

fn io_reason(e: &std::io::Error) -> &'static str {
    use std::io::ErrorKind as K;
    match e.raw_os_error() {
        Some(libc::ECONNREFUSED) => "refused",
        Some(libc::ECONNRESET | libc::EPIPE) => "reset",
        // EAGAIN (= EWOULDBLOCK): the blocking read's timeout.
        Some(libc::ETIMEDOUT | libc::EAGAIN) => "timeout",
        Some(libc::EADDRNOTAVAIL | libc::EADDRINUSE) => "no_source_port",
        Some(libc::EMFILE | libc::ENFILE) => "fd_limit",
        Some(libc::ENOBUFS | libc::ENOMEM) => "no_memory",
        _ => match e.kind() {
            K::TimedOut | K::WouldBlock => "timeout",
            K::UnexpectedEof => "closed_in_handshake",
            K::ConnectionReset | K::BrokenPipe | K::ConnectionAborted => "reset",
            K::ConnectionRefused => "refused",
            _ => "io_other",
        },
    }
}

struct Conn {
    slow: bool,
    sock: Sock,
    buf: Vec<u8>,
    /// Per kind and publishing stream.
    tracks: Vec<Vec<KindTrack>>,
    room: u32,
    open: bool,
    /// Highest seq seen in the room (batches, and the first join), for `since` on reconnect.
    last_seq: u64,
    joined: bool,
    /// A goaway received: where to go and when (its `reconnect_after_ms`), and when it came.
    goaway: Option<(String, Instant, Instant)>,
    /// Moving: its goaway was due, its old socket let go, its new socket is being made.
    moving: bool,
    /// The due time under which its pending goaway is in the moves' timers (see
    /// [`moves::Moves::watch`]).
    goaway_listed: Option<Instant>,
    /// The edge this connection reached (where it resumes after a 4000 or 1013 close).
    peer: Option<SocketAddr>,
    /// The pending move follows a 4000/1013 close, not a goaway.
    resuming: bool,
    /// Pong bytes the socket did not take yet (sent before the next read's frames).
    pong: Vec<u8>,
    /// Since when it has been without a socket (lost, closed or let go after a goaway; None
    /// while open): at the end, a member down for [`MOVES_AT_END`] or more counts as not
    /// connected, one down for less as on its way (an edge closing idle members every second).
    down_since: Option<Instant>,
}

/// Readiness of the connections read in the loop (mio's `Poll`: epoll). mio registers
/// edge-triggered: a ready socket is read until `WouldBlock` (the loop in [`run`] does), and a
/// socket registered with data already waiting is reported at once.
struct Readiness {
    poll: mio::Poll,
    events: mio::Events,
}

impl Readiness {
    fn new() -> std::io::Result<Self> {
        Ok(Self { poll: mio::Poll::new()?, events: mio::Events::with_capacity(1024) })
    }

    fn add(&self, fd: RawFd, token: usize) {
        let r = self.poll.registry().register(&mut SourceFd(&fd), mio::Token(token), mio::Interest::READABLE);
        debug_assert!(r.is_ok(), "register: {r:?}");
    }

    /// A socket whose connect is under way: its token hears writability (connected, or
    /// failed) as well as the answer.
    fn add_connecting(&self, fd: RawFd, token: usize) {
        let interest = mio::Interest::READABLE | mio::Interest::WRITABLE;
        let r = self.poll.registry().register(&mut SourceFd(&fd), mio::Token(token), interest);
        debug_assert!(r.is_ok(), "register: {r:?}");
    }

    /// A connected member's socket, now read under `token`.
    fn modify(&self, fd: RawFd, token: usize) {
        let r = self.poll.registry().reregister(&mut SourceFd(&fd), mio::Token(token), mio::Interest::READABLE);
        debug_assert!(r.is_ok(), "reregister: {r:?}");
    }

    fn del(&self, fd: RawFd) {
        let r = self.poll.registry().deregister(&mut SourceFd(&fd));
        debug_assert!(r.is_ok(), "deregister: {r:?}");
    }

    /// The tokens of the sockets ready within `timeout` (none when a signal cut the wait).
    fn wait(&mut self, out: &mut Vec<usize>, timeout: Duration) {
        out.clear();
        if self.poll.poll(&mut self.events, Some(timeout)).is_ok() {
            out.extend(self.events.iter().map(|e| e.token().0));
        }
    }
}

impl Conn {
    fn new(sock: Sock, slow: bool, room: u32, streams: &[usize]) -> Self {
        Self {
            slow,
            buf: Vec::new(),
            tracks: streams.iter().map(|&n| vec![KindTrack::default(); n.max(1)]).collect(),
            room,
            open: true,
            last_seq: 0,
            joined: false,
            goaway: None,
            moving: false,
            goaway_listed: None,
            peer: sock.peer_addr().ok(),
            resuming: false,
            pong: Vec::new(),
            down_since: None,
            sock,
        }
    }

    /// Where it resumes from: the last seq seen, once its first `joined` said where its stream
    /// starts. A member closed before that (a 1013 while the edge could not read the room) has
    /// no position: `since=0` would ask for the room's whole history (a trial counted 360,300
    /// duplicates on a Redis holding earlier runs' gifts), so it joins afresh, as its first
    /// connection did.
    fn position(&self) -> Option<u64> {
        self.joined.then_some(self.last_seq)
    }

    /// The first join sets where the stream starts; a join after a move (with `since`) does
    /// not, since history after `since` is still to come.
    fn on_joined(&mut self, seq: u64) {
        if !self.joined {
            self.last_seq = self.last_seq.max(seq);
            self.joined = true;
        }
    }

    fn on_goaway(&mut self, url: &str, after_ms: u32) {
        let now = Instant::now();
        self.goaway = Some((url.to_owned(), now + Duration::from_millis(u64::from(after_ms)), now));
    }

    /// Answers a ping with a pong carrying its payload (RFC 6455 5.5.3), masked as a client's
    /// frames must be. What the socket does not take now is written before the next reads.
    fn on_ping(&mut self, payload: &[u8], salt: u64) {
        let mask = (salt as u32 ^ 0x5bd1_e995).to_le_bytes();
        self.pong.extend_from_slice(&ws::encode_client_frame(ws::OpCode::Pong, payload, mask));
        self.flush_pong();
    }

    fn flush_pong(&mut self) {
        while !self.pong.is_empty() {
            match self.sock.write(&self.pong) {
                Ok(0) => return,
                Ok(n) => {
                    self.pong.drain(..n);
                }
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(_) => return,
            }
        }
    }

    /// Lets go of a socket the member no longer uses (the server closed it, it ended, or the
    /// member was told to go): answers a close frame with its code (RFC 6455 5.5.1, masked as
    /// a client's frames are) when `close` has one, then shuts the socket down, so the server
    /// sees it closed now rather than when the member's new socket replaces it. Keeping it
    /// open (CLOSE_WAIT here) held a draining edge until its deadline: 200,000 members whose
    /// only edge was restarting kept their old sockets for the whole restart (the edge exited
    /// after 53 s of a 10 s drain, bench-results/2026-12-01-restart-storm-README.md).
    fn release(&mut self, close: Option<&[u8]>) {
        if let Some(payload) = close {
            let code = payload.get(..2).unwrap_or(&[]);
            let mask = (self.last_seq as u32 ^ 0x2545_f491).to_le_bytes();
            self.pong.extend_from_slice(&ws::encode_client_frame(ws::OpCode::Close, code, mask));
            self.flush_pong();
        }
        self.pong.clear();
        let _ = self.sock.tcp().shutdown(std::net::Shutdown::Both);
    }

    /// Closes an open member at the run's end as a client leaving does: after any pong still
    /// owed (a frame cut in two would corrupt the stream), a close frame with 1000 (normal
    /// closure; masked as a client's frames are), for TLS the close_notify, then the write side
    /// shut (FIN after what is queued). The socket stays open for reading: the server's answer
    /// and close are read by [`close_at_end`] so that nothing is left unread when it is dropped
    /// (that makes the kernel reset it). Nonblocking and best effort: returns whether the close
    /// frame went out whole (`sse`: an event stream has no close frame, and nothing to write
    /// before its FIN).
    fn close_at_end(&mut self, sse: bool) -> bool {
        if !sse {
            let mask = (self.last_seq as u32 ^ 0x6b43_a9b5).to_le_bytes();
            self.pong.extend_from_slice(&ws::encode_client_frame(ws::OpCode::Close, &1000u16.to_be_bytes(), mask));
            self.flush_pong();
        }
        let mut out = self.pong.is_empty();
        if let Sock::Tls(s) = &mut self.sock {
            s.conn.send_close_notify();
            while s.conn.wants_write() {
                match s.conn.write_tls(&mut s.sock) {
                    Ok(n) if n > 0 => {}
                    _ => break,
                }
            }
            out &= !s.conn.wants_write();
        }
        // Fails only when the socket is gone already (ENOTCONN: a server that closes without
        // lingering may reset once it has read the close; roomcast lingers): the close went
        // out all the same.
        let _ = self.sock.tcp().shutdown(std::net::Shutdown::Write);
        out
    }

    /// A close frame: after 4000 (slow consumer) or 1013 (replay budget), come back to the same
    /// edge with `since` after a random delay under a second, as a client would.
    /// Other closes a client would come back from (1001 going away or idle, 1011 server
    /// error, 1012 restart) resume the same way; the rest (a kick, an expired token, a protocol
    /// error) end the member. Returns whether the member is gone for good (counted as closed).
    fn on_close(&mut self, payload: &[u8]) -> bool {
        self.release(Some(payload));
        let was_open = self.went_down();
        let code = payload.get(..2).map(|b| u16::from_be_bytes([b[0], b[1]]));
        if matches!(code, Some(4000 | 1013 | 1001 | 1011 | 1012)) && self.resume() {
            return false;
        }
        was_open && self.goaway.is_none()
    }

    /// Comes back to the same edge with `since` after a random delay under a second (unless a
    /// goaway already says where to go). Returns whether it will.
    fn resume(&mut self) -> bool {
        if self.goaway.is_some() {
            return true;
        }
        let Some(peer) = self.peer else { return false };
        let now = Instant::now();
        let jitter = Duration::from_micros(fastrand::u64(..1_000_000));
        self.goaway = Some((format!("ws://{peer}/ws?room=r{}", self.room), now + jitter, now));
        self.resuming = true;
        true
    }

    /// Lost or sent away, and its new socket not made yet (waiting its delay, retrying, or in
    /// flight).
    fn between_sockets(&self) -> bool {
        !self.open && (self.moving || self.goaway.is_some())
    }

    /// No longer open (from now, if it was): returns whether it was.
    fn went_down(&mut self) -> bool {
        let was_open = std::mem::replace(&mut self.open, false);
        if was_open {
            self.down_since = Some(Instant::now());
        }
        was_open
    }

    /// Between sockets for less than [`MOVES_AT_END`] at `now`: on its way back, not down.
    fn on_its_way(&self, now: Instant) -> bool {
        self.between_sockets() && self.down_since.is_none_or(|at| now.duration_since(at) < MOVES_AT_END)
    }

    /// The socket ended (EOF or error): a client that follows the edge resumes, as real clients
    /// do after any lost connection (a slow consumer whose close frame could not be written is
    /// reset); one that does not counts as closed. Returns whether it counts as closed.
    fn on_lost(&mut self, follow: bool) -> bool {
        self.release(None);
        let was_open = self.went_down();
        if self.moving || self.goaway.is_some() {
            return false;
        }
        if follow && self.resume() {
            return false;
        }
        was_open
    }
}

/// A TLS member to move on the blocking movers: ask `url` (dispatch) where to go, connect there
/// with `since`.
struct MoveJob {
    i: usize,
    slow: bool,
    url: String,
    room: u32,
    since: Option<u64>,
    got_at: Instant,
}

struct MoveDone {
    i: usize,
    result: anyhow::Result<Sock>,
    got_at: Instant,
    /// Why each failed attempt failed, the last of a move given up too ([`failure_reason`];
    /// `dispatch_` prefixed when asking the dispatch URL failed).
    errors: Vec<String>,
}

/// A move's retries: exponential from `MOVE_BACKOFF_BASE`, capped at `MOVE_BACKOFF_CAP`, each
/// wait drawn uniformly below its ceiling (full jitter, as the JavaScript client does), given
/// up after `--move-give-up` ([`DEFAULT_MOVE_GIVE_UP_S`] by default; 0: never, as a real
/// client). Without jitter every member a restarted edge sent away at the same moment retries
/// at the same moments, and the accept queues see waves; a bound of 10 attempts (~19 s) gave up
/// on members whose only edge was still restarting.
const MOVE_BACKOFF_BASE: Duration = Duration::from_millis(100);
const MOVE_BACKOFF_CAP: Duration = Duration::from_secs(5);
/// `--move-give-up`'s default, seconds: above a small edge's restart, below a run's length. A
/// 10^6-member restart takes minutes (241 s after SIGKILL to have every member back), so its
/// benchmarks set more (scripts/bench-million.sh: 600 s with RESTART).
pub(crate) const DEFAULT_MOVE_GIVE_UP_S: f64 = 120.0;
/// How long past the stop a worker waits for members between sockets to land before its final
/// report (a slow reader closed by the last gifts resumes within a second or two); a member
/// without a socket for this long at the end counts as not connected, which fails the run.
const MOVES_AT_END: Duration = Duration::from_secs(10);

/// How long, at most, a worker waits at the run's end for the server to close the members it
/// closed ([`close_at_end`]) before it drops what is left: the edge answers a close frame and
/// closes at once (a few ms at 2,000 members; 15,000 members a worker at 10^6 on a shared box
/// take longer), and a run's end must not wait long on a server that does not.
const CLOSE_DRAIN: Duration = Duration::from_secs(3);

/// What [`close_at_end`] did: members whose close went out whole, and members whose server had
/// not closed its side by the deadline.
struct EndCloses {
    sent: u64,
    unanswered: u64,
}

/// Closes every member open at the run's end ([`Conn::close_at_end`]), then reads their
/// sockets (what the server still sends, its close frame, its FIN) until the server has closed
/// each or [`CLOSE_DRAIN`] has passed. What is read is dropped: the figures are final. Members
/// between sockets have none to close; their moves' sockets go with the process.
fn close_at_end(conns: &mut [Conn], ep: &mut Readiness, tmp: &mut [u8], sse: bool) -> EndCloses {
    let deadline = Instant::now() + CLOSE_DRAIN;
    let mut sent = 0u64;
    let mut draining = vec![false; conns.len()];
    for (i, c) in conns.iter_mut().enumerate().filter(|(_, c)| c.open) {
        sent += u64::from(c.close_at_end(sse));
        // Slow readers are read outside epoll; they too are now read as answers come.
        if c.slow {
            ep.add(c.sock.as_raw_fd(), i);
        }
        draining[i] = true;
    }
    // Whether the server has closed the member's socket (EOF, or an error: nothing more will
    // come), reading what is there.
    let ended = |c: &mut Conn, tmp: &mut [u8]| loop {
        match c.sock.read(tmp) {
            Ok(0) => return true,
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return false,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(_) => return true,
        }
    };
    // Once over all of them (what came before its epoll event was taken), then as epoll says.
    let mut left = 0u64;
    for (i, c) in conns.iter_mut().enumerate() {
        if draining[i] {
            draining[i] = !ended(c, tmp);
            left += u64::from(draining[i]);
        }
    }
    let mut ready = Vec::new();
    while left > 0 {
        let now = Instant::now();
        if now >= deadline {
            break;
        }
        ep.wait(&mut ready, (deadline - now).min(Duration::from_millis(50)));
        for &i in &ready {
            if i < conns.len() && draining[i] && ended(&mut conns[i], tmp) {
                draining[i] = false;
                left -= 1;
            }
        }
    }
    EndCloses { sent, unanswered: left }
}

/// The wait before retry `attempt` (0: the first retry): uniform in [ceiling / 10, ceiling],
/// ceiling = min(cap, base x 2^attempt). The tenth keeps a retry from spinning at 0.
fn move_backoff(attempt: u32) -> Duration {
    let ceiling = MOVE_BACKOFF_BASE.saturating_mul(1 << attempt.min(16)).min(MOVE_BACKOFF_CAP);
    let ceiling_us = ceiling.as_micros() as u64;
    Duration::from_micros(fastrand::u64(ceiling_us / 10..=ceiling_us))
}

/// Threads that make the new sockets of TLS members told to go (plain members move on the
/// worker's loop, [`moves::Moves`]): rustls's handshake runs inside [`open_to`]'s blocking write
/// and read, which the reading loop must not wait for. Each thread holds its move through its
/// backoff too, so 32 per worker bound the moves to 32 at a time: at 2x10^5 plain members that
/// held a restart's reconnects to ~4,000/s (bench-results/2026-12-01-restart-storm-README.md,
/// finding 4), which is why plain members no longer use them.
struct Movers {
    jobs: mpsc::Sender<MoveJob>,
    done: mpsc::Receiver<MoveDone>,
}

impl Movers {
    fn start(args: &WorkerArgs, threads: usize, tokens: &Arc<[String]>) -> Self {
        let (jobs, job_rx) = mpsc::channel::<MoveJob>();
        let (done_tx, done) = mpsc::channel();
        let job_rx = std::sync::Arc::new(std::sync::Mutex::new(job_rx));
        for _ in 0..threads {
            let (job_rx, done_tx, args, tokens) = (job_rx.clone(), done_tx.clone(), args.clone(), tokens.clone());
            std::thread::spawn(move || {
                // One client per thread: keep-alive to dispatch.
                let http = reqwest::blocking::Client::new();
                let give_up = args.move_give_up();
                loop {
                    let Ok(Ok(job)) = job_rx.lock().map(|rx| rx.recv()) else { return };
                    let first = Instant::now();
                    let mut errors = Vec::new();
                    let mut attempt = 0u32;
                    let result = loop {
                        let result = match resolve(&http, &job.url, job.room, args.sse) {
                            Err(e) => Err((format!("dispatch_{}", failure_reason(&e)), e)),
                            Ok((addr, path)) => {
                                let path = format!("{path}{}{}", since_param(job.since), token_param(&tokens, job.i));
                                open_to(&args, args.first + job.i, addr, &path, job.slow)
                                    .map_err(|e| (failure_reason(&e), e))
                            }
                        };
                        match result {
                            Ok(sock) => break Ok(sock),
                            Err((reason, e)) => {
                                errors.push(reason);
                                if give_up.is_some_and(|g| first.elapsed() >= g) {
                                    break Err(e);
                                }
                            }
                        }
                        std::thread::sleep(move_backoff(attempt));
                        attempt += 1;
                    };
                    if done_tx.send(MoveDone { i: job.i, result, got_at: job.got_at, errors }).is_err() {
                        return;
                    }
                }
            });
        }
        Self { jobs, done }
    }
}

struct Reader {
    target: Target,
    kinds: Vec<String>,
    hist: Vec<Histogram<u64>>,
    hist_slow: Vec<Histogram<u64>>,
    interval: Histogram<u64>,
    interval_first: Histogram<u64>,
    deliveries: u64,
    frames: u64,
    bytes: u64,
    /// Of `bytes`, those of pings: they keep coming while a run settles, so "bytes still
    /// moving" (a slow reader inside a large frame) counts the others only.
    ping_bytes: u64,
    /// Close frames received, by code (0: none given).
    close_codes: std::collections::BTreeMap<u16, u64>,
    /// Open sockets that ended without a close frame, by how (`eof`, or the error's reason:
    /// `reset`, `timeout`...): an edge killed, or the kernel resetting a connection.
    lost: std::collections::BTreeMap<&'static str, u64>,
    closed: u64,
    /// Follow goaways and resume after 4000/1013 closes.
    follow: bool,
    /// The stream is Server-Sent Events, not WebSocket frames.
    sse: bool,
    /// permessage-deflate offered: compressed frames (RSV1) are inflated with this (the edge
    /// answers server_no_context_takeover: reset after each message), into `inflated`.
    inflater: Option<roomcast_proto::deflate::Decompress>,
    inflated: Vec<u8>,
    /// Frames that arrived compressed.
    compressed_frames: u64,
    /// `gap` messages, the seqs they named, and `reset` messages received ([`Final::gaps`]).
    gaps: u64,
    gap_seqs: u64,
    resets: u64,
    /// This run's id ([`WorkerArgs::run`]), and the messages of another run received (not
    /// counted in any figure but this).
    run: u64,
    foreign: u64,
}

impl Reader {
    /// Counts `c`'s socket ending without a close frame (`how`: `eof` or an error's reason)
    /// if the member was open on it: the edge killed, a reset, a full descriptor table.
    fn lost_socket(&mut self, c: &Conn, how: &'static str) {
        if c.open {
            *self.lost.entry(how).or_default() += 1;
        }
    }

    /// A `gap`: seqs `from..=to` of the member's room cannot be recovered.
    fn on_gap(&mut self, from: u64, to: u64) {
        self.gaps += 1;
        self.gap_seqs += to.saturating_sub(from).saturating_add(1);
    }

    /// A `reset`: the member's position is void; from now on it is `seq` (of the room's new
    /// numbering), which is what it must resume from, not the old numbering's last seq (a
    /// `since` ahead of the room, reset again at its next move).
    fn on_reset(&mut self, c: &mut Conn, seq: u64) {
        self.resets += 1;
        c.last_seq = seq;
    }

    fn kind_index(&self, kind: &str) -> Option<usize> {
        self.kinds.iter().position(|k| k == kind)
    }

    fn message(&mut self, tracks: &mut [Vec<KindTrack>], slow: bool, kind: &str, body: &[u8], now: u64) {
        let Some(ki) = self.kind_index(kind) else { return };
        let Some((t, k)) = body_fields(body) else { return };
        if body_run(body).is_some_and(|r| r != self.run) {
            self.foreign += 1;
            return;
        }
        let Some(track) = tracks[ki].get_mut(body_stream(body)) else { return };
        track.on_message(k);
        let lat = now.saturating_sub(t).max(1);
        let _ = if slow { self.hist_slow[ki].record(lat) } else { self.hist[ki].record(lat) };
        let _ = self.interval.record(lat);
        if ki == 0 {
            let _ = self.interval_first.record(lat);
        }
        self.deliveries += 1;
    }

    /// One JSON envelope (a WebSocket text frame, or an SSE event's data).
    fn envelope_json(&mut self, c: &mut Conn, payload: &[u8], now: u64) {
        match envelope::decode_json(payload) {
            Ok(roomcast_proto::ServerMsg::Batch { messages, .. }) => {
                for m in messages {
                    c.last_seq = c.last_seq.max(m.seq);
                    self.message(&mut c.tracks, c.slow, &m.kind, m.body.as_bytes(), now);
                }
            }
            Ok(roomcast_proto::ServerMsg::Joined { seq, .. }) => c.on_joined(seq),
            Ok(roomcast_proto::ServerMsg::Gap { from, to, .. }) => self.on_gap(from, to),
            Ok(roomcast_proto::ServerMsg::Reset { seq, .. }) => self.on_reset(c, seq),
            Ok(roomcast_proto::ServerMsg::Goaway { url, reconnect_after_ms, .. }) if self.follow => {
                c.on_goaway(&url, reconnect_after_ms);
            }
            _ => {}
        }
    }

    /// Handles the complete events at the front of `c.buf` (Server-Sent Events: lines up to a
    /// blank line; `data:` lines joined with LF are one JSON envelope; comments, `id:` and
    /// `retry:` are skipped); returns bytes used.
    fn events(&mut self, c: &mut Conn) -> usize {
        let now = now_us();
        let buf = std::mem::take(&mut c.buf);
        let mut off = 0;
        let mut data = Vec::new();
        while let Some(end) = buf[off..].windows(2).position(|w| w == b"\n\n") {
            let event = &buf[off..off + end];
            off += end + 2;
            data.clear();
            for line in event.split(|&b| b == b'\n') {
                if let Some(d) = line.strip_prefix(b"data:") {
                    if !data.is_empty() {
                        data.push(b'\n');
                    }
                    data.extend_from_slice(d.strip_prefix(b" ").unwrap_or(d));
                }
            }
            if data.is_empty() {
                // A heartbeat (a comment, at the edge's ws.ping_interval_ms): counted as pings
                // are, so a run's end sees the stream quiet. Counted as data, heartbeats every
                // 100 ms held each end of a run for the full 60 s twice (the coordinator's
                // settling, then the workers' wait for bytes to stop).
                self.ping_bytes += (end + 2) as u64;
            } else {
                self.frames += 1;
                let payload = std::mem::take(&mut data);
                self.envelope_json(c, &payload, now);
                data = payload;
            }
        }
        c.buf = buf;
        off
    }

    /// Handles the complete frames at the front of `c.buf`; returns bytes used.
    fn frames(&mut self, c: &mut Conn) -> usize {
        if self.sse {
            return self.events(c);
        }
        let now = now_us();
        let mut off = 0;
        let buf = std::mem::take(&mut c.buf);
        let mut inflated = std::mem::take(&mut self.inflated);
        while let Ok(Some(h)) = ws::parse_header(&buf[off..]) {
            let total = h.header_len + h.payload_len as usize;
            if buf.len() - off < total {
                break;
            }
            let mut payload = &buf[off + h.header_len..off + total];
            off += total;
            self.frames += 1;
            if h.rsv1 {
                let Some(d) = self.inflater.as_mut() else { continue };
                let r = roomcast_proto::deflate::inflate(d, payload, 64 << 20, &mut inflated);
                d.reset(false);
                if r.is_err() {
                    continue;
                }
                self.compressed_frames += 1;
                payload = &inflated;
            }
            match (self.target, h.opcode) {
                // A client answers pings as browsers do; without it the edge's idle timeout
                // (ws.idle_timeout_ms, 90 s) closes every member of a longer run.
                (_, ws::OpCode::Ping) => {
                    self.ping_bytes += total as u64;
                    c.on_ping(payload, self.frames);
                }
                (_, ws::OpCode::Close) => {
                    let code = payload.get(..2).map_or(0, |b| u16::from_be_bytes([b[0], b[1]]));
                    *self.close_codes.entry(code).or_default() += 1;
                    let gone = if self.target == Target::Edge && self.follow {
                        c.on_close(payload)
                    } else {
                        c.release(Some(payload));
                        std::mem::replace(&mut c.open, false)
                    };
                    if gone {
                        self.closed += 1;
                    }
                }
                (Target::Nchan, ws::OpCode::Text) => {
                    if let Some(kind) = body_kind(payload) {
                        let kind = kind.to_owned();
                        self.message(&mut c.tracks, c.slow, &kind, payload, now);
                    }
                }
                (Target::Edge, ws::OpCode::Binary) => match envelope::access_rkyv(payload) {
                    Ok(ArchivedServerMsg::Batch { messages, .. }) => {
                        for m in messages.iter() {
                            c.last_seq = c.last_seq.max(m.seq.to_native());
                            self.message(&mut c.tracks, c.slow, m.kind.as_str(), m.body.as_bytes(), now);
                        }
                    }
                    Ok(ArchivedServerMsg::Joined { seq, .. }) => c.on_joined(seq.to_native()),
                    Ok(ArchivedServerMsg::Gap { from, to, .. }) => self.on_gap(from.to_native(), to.to_native()),
                    Ok(ArchivedServerMsg::Reset { seq, .. }) => self.on_reset(c, seq.to_native()),
                    // Not followed (`--no-follow-goaway`): the member is not on its way
                    // anywhere, and its close counts as closed.
                    Ok(ArchivedServerMsg::Goaway { url, reconnect_after_ms, .. }) if self.follow => {
                        c.on_goaway(url.as_str(), reconnect_after_ms.to_native());
                    }
                    _ => {}
                },
                (Target::Edge, ws::OpCode::Text) => self.envelope_json(c, payload, now),
                _ => {}
            }
        }
        self.inflated = inflated;
        c.buf = buf;
        off
    }
}

pub fn run(args: WorkerArgs) -> anyhow::Result<()> {
    let (tx, rx) = mpsc::channel::<String>();
    std::thread::spawn(move || {
        for line in std::io::stdin().lock().lines() {
            let Ok(line) = line else { break };
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let out = std::io::stdout();
    let emit = |v: &dyn erased::Json| {
        let mut o = out.lock();
        let _ = writeln!(o, "{}", v.json());
        let _ = o.flush();
    };
    // Start together: the coordinator says `go` once every worker is up, so the shares of the
    // ramp add up to the asked rate from the first second (a worker started late would
    // otherwise connect its share behind the others). No `go` (the coordinator is gone): stop.
    match rx.recv() {
        Ok(line) if line.trim() == "go" => {}
        _ => {
            eprintln!("no go from the coordinator; stopping");
            std::process::exit(1);
        }
    }
    let mut ep = Readiness::new()?;
    let tokens: Arc<[String]> = match &args.tokens {
        Some(path) => crate::tokens::load(path, args.first, args.count)?.into(),
        None => Arc::from([]),
    };
    let rooms: Vec<u32> =
        (args.first..args.first + args.count).map(|i| crate::room_of(i, args.rooms, args.dist)).collect();
    let streams: Vec<usize> = (0..args.kinds.len()).map(|k| args.streams.get(k).copied().unwrap_or(1).max(1)).collect();
    let mut conns: Vec<Conn> = Vec::with_capacity(rooms.len());
    let mut connect_hist = histogram();
    let mut fails = Failures { total: 0, by: std::collections::BTreeMap::new() };
    let tls = args.tls_ca.is_some();
    let mut window = Window::new(args.connect_inflight, TOKEN_BASE);
    let mut last_expiry_check = Instant::now();
    let mut reader = Reader {
        target: args.target,
        kinds: args.kinds.clone(),
        hist: args.kinds.iter().map(|_| histogram()).collect(),
        hist_slow: args.kinds.iter().map(|_| histogram()).collect(),
        interval: histogram(),
        interval_first: histogram(),
        deliveries: 0,
        frames: 0,
        bytes: 0,
        ping_bytes: 0,
        close_codes: std::collections::BTreeMap::new(),
        lost: std::collections::BTreeMap::new(),
        closed: 0,
        follow: args.follow_goaway,
        sse: args.sse,
        inflater: args.deflate.then(roomcast_proto::deflate::new_inflater),
        inflated: Vec::new(),
        compressed_frames: 0,
        gaps: 0,
        gap_seqs: 0,
        resets: 0,
        run: args.run,
        foreign: 0,
    };
    // The ramp, held: connection n is due one interval after the one before; a worker behind
    // (a connect that blocked up to its 10 s timeout) catches up at most CATCH_UP's worth at
    // once, so neither it nor the sum over workers ever bursts past the asked rate.
    const CATCH_UP: Duration = Duration::from_millis(100);
    let interval = if args.ramp > 0.0 && args.ramp.is_finite() {
        Duration::from_secs_f64((1.0 / args.ramp).min(3600.0))
    } else {
        Duration::ZERO
    };
    let mut next_due = Instant::now();
    let mut last_progress = Instant::now();
    let mut ready = Vec::new();
    let mut tmp = vec![0u8; 256 * 1024];
    let mut next = 0usize;
    let mut stop: Option<Stop> = None;
    let mut stop_at: Option<Instant> = None;
    // Until then, members between sockets at the stop may still land (see MOVES_AT_END).
    let mut moves_until: Option<Instant> = None;
    let mut next_slow_read = Instant::now();
    let mut last_bytes = 0u64;
    let mut last_bytes_at = Instant::now();
    let mut moves = moves::Moves::new(&args, &tokens);
    // The progress line that says the last connection is done goes out at once (the
    // coordinator times the connect phase by it), not at the next whole second.
    let mut connects_reported = false;
    loop {
        // Slow readers: a bounded read twice a second, outside epoll.
        if args.slow_every > 0 && Instant::now() >= next_slow_read {
            next_slow_read = Instant::now() + Duration::from_millis(500);
            for (i, c) in conns.iter_mut().enumerate().filter(|(_, c)| c.slow && c.open) {
                c.flush_pong();
                let budget = args.slow_bytes.min(tmp.len());
                match c.sock.read(&mut tmp[..budget]) {
                    Ok(0) => {
                        reader.lost_socket(c, "eof");
                        if c.on_lost(args.follow_goaway) {
                            reader.closed += 1;
                        }
                    }
                    Ok(n) => {
                        reader.bytes += n as u64;
                        c.buf.extend_from_slice(&tmp[..n]);
                        let used = reader.frames(c);
                        c.buf.drain(..used);
                    }
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                    Err(e) => {
                        reader.lost_socket(c, io_reason(&e));
                        if c.on_lost(args.follow_goaway) {
                            reader.closed += 1;
                        }
                    }
                }
                moves.watch(c, i);
            }
        }
        // Connect what is due: plain members start a nonblocking connect (at most
        // `connect_inflight` in flight; the loop below finishes them), TLS members connect
        // and upgrade blocking, one at a time.
        while next < rooms.len() && next_due <= Instant::now() && (tls || window.has_room()) {
            let slow = args.slow_every > 0 && (args.first + next).is_multiple_of(args.slow_every);
            let (dst, path) = first_target(&args, next, rooms[next], &tokens);
            if tls {
                let started = Instant::now();
                match open_to(&args, next, dst, &path, slow) {
                    Ok(sock) => {
                        let _ = connect_hist.record(started.elapsed().as_micros().max(1) as u64);
                        if !slow {
                            ep.add(sock.as_raw_fd(), conns.len());
                        }
                        conns.push(Conn::new(sock, slow, rooms[next], &streams));
                    }
                    Err(e) => fails.count(&e, args.first + next),
                }
            } else {
                match Pending::start(&args, next, dst, &path, slow) {
                    Ok(p) => {
                        let fd = p.fd();
                        let token = window.insert(p);
                        ep.add_connecting(fd, token);
                    }
                    Err(e) => fails.count(&e, args.first + next),
                }
            }
            next += 1;
            let now = Instant::now();
            next_due = (next_due + interval).max(now.checked_sub(CATCH_UP).unwrap_or(now));
            if last_progress.elapsed() >= Duration::from_secs(1) {
                break;
            }
        }
        // Members whose handshake ran out of time.
        if window.len() > 0 && last_expiry_check.elapsed() >= Duration::from_millis(100) {
            last_expiry_check = Instant::now();
            for token in window.expired(|p| p.expired(last_expiry_check)) {
                if let Some(p) = window.remove(token) {
                    ep.del(p.fd());
                    let e = std::io::Error::new(std::io::ErrorKind::TimedOut, "no upgrade answer within 10 s");
                    fails.count(&e.into(), args.first + p.i);
                }
            }
        }
        let connecting = next < rooms.len() || window.len() > 0;
        let wait = if !connecting && !connects_reported {
            Duration::ZERO
        } else if next < rooms.len() && (tls || window.has_room()) {
            // The next connect's turn (the ramp), within the usual 50 ms.
            next_due.saturating_duration_since(Instant::now()).min(Duration::from_millis(50))
        } else {
            Duration::from_millis(50)
        };
        // Or the next move's turn (a goaway's delay or a retry's backoff run out).
        let wait = moves.next_wake().map_or(wait, |at| wait.min(at.saturating_duration_since(Instant::now())));
        ep.wait(&mut ready, wait);
        for &token in ready.iter().filter(|&&t| t >= MOVE_TOKEN_BASE) {
            moves.on_ready(token, &mut moves::Ctx { ep: &ep, conns: &mut conns, reader: &mut reader, tmp: &mut tmp });
        }
        for &token in ready.iter().filter(|&&t| (TOKEN_BASE..MOVE_TOKEN_BASE).contains(&t)) {
            let Some(p) = window.get_mut(token) else { continue };
            match p.drive(&mut tmp) {
                Step::Wait => {}
                Step::Done => {
                    let p = window.remove(token).expect("in flight");
                    let _ = connect_hist.record(p.started.elapsed().as_micros().max(1) as u64);
                    let (i, slow) = (p.i, p.slow);
                    let (tcp, rest) = p.finish();
                    if slow {
                        ep.del(tcp.as_raw_fd());
                    } else {
                        // Now a member: its index is its token (epoll reports it at once if
                        // more has arrived meanwhile).
                        ep.modify(tcp.as_raw_fd(), conns.len());
                    }
                    let mut c = Conn::new(Sock::Plain(tcp), slow, rooms[i], &streams);
                    if !rest.is_empty() {
                        reader.bytes += rest.len() as u64;
                        c.buf = rest;
                        let used = reader.frames(&mut c);
                        c.buf.drain(..used);
                    }
                    moves.watch(&mut c, conns.len());
                    conns.push(c);
                }
                Step::Failed(e) => {
                    let p = window.remove(token).expect("in flight");
                    ep.del(p.fd());
                    fails.count(&e, args.first + p.i);
                }
            }
        }
        for &i in ready.iter().filter(|&&t| t < TOKEN_BASE) {
            let c = &mut conns[i];
            c.flush_pong();
            loop {
                match c.sock.read(&mut tmp) {
                    Ok(0) => {
                        reader.lost_socket(c, "eof");
                        if c.on_lost(args.follow_goaway) {
                            reader.closed += 1;
                        }
                        break;
                    }
                    Ok(n) => {
                        reader.bytes += n as u64;
                        c.buf.extend_from_slice(&tmp[..n]);
                        let used = reader.frames(c);
                        c.buf.drain(..used);
                    }
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
                    Err(e) => {
                        reader.lost_socket(c, io_reason(&e));
                        if c.on_lost(args.follow_goaway) {
                            reader.closed += 1;
                        }
                        break;
                    }
                }
            }
            if !c.open {
                // Stop watching it (dropping the socket would reuse its fd under epoll's token).
                ep.del(c.sock.as_raw_fd());
            }
            moves.watch(c, i);
        }
        // Follow due goaways and lost sockets: dispatch picks another edge; reconnect there
        // with `since`.
        moves.turn(&mut moves::Ctx { ep: &ep, conns: &mut conns, reader: &mut reader, tmp: &mut tmp });
        let connects_done = next == rooms.len() && window.len() == 0 && !connects_reported;
        if last_progress.elapsed() >= Duration::from_secs(1) || connects_done {
            connects_reported |= connects_done;
            last_progress = Instant::now();
            let p = Progress {
                id: args.id,
                connected: conns.len() as u64,
                failed: fails.total,
                failed_by: fails.by.clone(),
                pending: (rooms.len() - next + window.len()) as u64,
                deliveries: reader.deliveries,
                frames: reader.frames,
                bytes: reader.bytes - reader.ping_bytes,
                p50_us: reader.interval.value_at_quantile(0.5),
                p99_us: reader.interval.value_at_quantile(0.99),
                first_kind_p99_us: reader.interval_first.value_at_quantile(0.99),
                reconnects: moves.stats.reconnects,
                open: conns.iter().filter(|c| c.open).count() as u64,
                gaps: reader.gaps,
                resets: reader.resets,
                cpu_s: own_cpu_s(),
            };
            reader.interval.reset();
            reader.interval_first.reset();
            emit(&erased::Tagged("progress", &p));
        }
        if reader.bytes - reader.ping_bytes != last_bytes {
            last_bytes = reader.bytes - reader.ping_bytes;
            last_bytes_at = Instant::now();
        }
        loop {
            match rx.try_recv() {
                Ok(line) => {
                    if let Ok(s) = serde_json::from_str::<Stop>(&line) {
                        stop = Some(s);
                        // Keep reading until every open connection has the last gift of its
                        // room (what is still queued or in kernel buffers is late, not lost),
                        // at most 60 s.
                        stop_at = Some(Instant::now() + Duration::from_secs(60));
                        moves_until = Some(Instant::now() + MOVES_AT_END);
                    }
                }
                Err(mpsc::TryRecvError::Empty) => break,
                // The coordinator is gone (it ended the run on an error): nobody will read a
                // result, and a worker left behind would hold its 14,000 sockets.
                Err(mpsc::TryRecvError::Disconnected) if stop.is_none() => {
                    eprintln!("the coordinator went away; stopping");
                    std::process::exit(1);
                }
                Err(mpsc::TryRecvError::Disconnected) => break,
            }
        }
        let complete = |s: &Stop, conns: &[Conn]| {
            conns
                .iter()
                .filter(|c| c.open && !c.slow)
                .all(|c| c.tracks[0].iter().enumerate().all(|(st, t)| t.next >= s.owed_upto(c.room as usize, st)))
        };
        let landed = |conns: &[Conn]| {
            !conns.iter().any(Conn::between_sockets) || moves_until.is_some_and(|until| Instant::now() >= until)
        };
        if let (Some(s), Some(at)) = (&stop, stop_at)
            && (Instant::now() >= at
                || (complete(s, &conns) && landed(&conns) && last_bytes_at.elapsed() >= Duration::from_millis(300)))
        {
            let mut lost = vec![0u64; args.kinds.len()];
            let mut dup = vec![0u64; args.kinds.len()];
            let mut received = vec![0u64; args.kinds.len()];
            let mut fast_lost = vec![0u64; args.kinds.len()];
            let mut not_owed = vec![0u64; args.kinds.len()];
            for c in &mut conns {
                for (ki, ts) in c.tracks.iter_mut().enumerate() {
                    for (st, t) in ts.iter_mut().enumerate() {
                        let at = |v: &[Vec<Vec<u64>>]| {
                            v.get(c.room as usize).and_then(|r| r.get(ki)).and_then(|r| r.get(st)).copied().unwrap_or(0)
                        };
                        t.finish(at(&s.published));
                        t.forgive(at(&s.holes));
                        lost[ki] += t.lost;
                        if !c.slow {
                            fast_lost[ki] += t.lost;
                        }
                        dup[ki] += t.dup;
                        received[ki] += t.received;
                        not_owed[ki] += t.not_owed;
                    }
                }
            }
            // Diagnose connections whose stream stopped: a header that does not parse is a
            // corrupt stream; a partial frame is data still arriving.
            let (mut corrupt, mut partial) = (0u64, 0u64);
            for c in &conns {
                match ws::parse_header(&c.buf) {
                    Err(_) => corrupt += 1,
                    Ok(_) if !c.buf.is_empty() => partial += 1,
                    Ok(_) => {}
                }
            }
            if corrupt > 0 {
                eprintln!("{corrupt} connections with a corrupt stream");
            }
            // Who was open, on the way or down is as of now, before the closes below take
            // their time.
            let now = Instant::now();
            let open_at_end = conns.iter().filter(|c| c.open).count() as u64;
            let moving_at_end = conns.iter().filter(|c| c.on_its_way(now)).count() as u64;
            let reconnecting_at_end = conns.iter().filter(|c| c.between_sockets() && !c.on_its_way(now)).count() as u64;
            // Members leave as clients do (a close frame, then FIN), so the server counts them
            // closed by their peer, not reset by it.
            let closes = close_at_end(&mut conns, &mut ep, &mut tmp, args.sse);
            let f = Final {
                corrupt,
                partial,
                id: args.id,
                connected: conns.len() as u64,
                failed: fails.total,
                failed_by: std::mem::take(&mut fails.by),
                connect_inflight_peak: window.peak as u64,
                closed: reader.closed,
                close_codes: std::mem::take(&mut reader.close_codes),
                sockets_lost: std::mem::take(&mut reader.lost).into_iter().map(|(k, v)| (k.to_owned(), v)).collect(),
                deliveries: reader.deliveries,
                frames: reader.frames,
                compressed_frames: reader.compressed_frames,
                bytes: reader.bytes,
                hist: reader.hist.iter().map(encode_hist).collect(),
                hist_slow: reader.hist_slow.iter().map(encode_hist).collect(),
                received,
                lost,
                fast_lost,
                slow: conns.iter().filter(|c| c.slow).count() as u64,
                dup,
                connect_hist: encode_hist(&connect_hist),
                reconnects: moves.stats.reconnects,
                reconnect_failed: moves.stats.gave_up,
                reconnect_hist: encode_hist(&moves.stats.hist),
                reconnect_attempts_failed_by: std::mem::take(&mut moves.stats.errors),
                move_answers_read_late: moves.stats.late_reads,
                fresh_starts: moves.stats.fresh_starts,
                not_owed,
                foreign: reader.foreign,
                resumed: moves.stats.resumed,
                open_at_end,
                moving_at_end,
                reconnecting_at_end,
                closed_by_generator_at_end: closes.sent,
                close_unanswered_at_end: closes.unanswered,
                move_inflight_peak: moves.peak() as u64,
                gaps: reader.gaps,
                gap_seqs: reader.gap_seqs,
                resets: reader.resets,
                cpu_s: own_cpu_s(),
            };
            emit(&erased::Tagged("final", &f));
            return Ok(());
        }
    }
}

/// JSON lines tagged with a type, without boxing serde traits.
mod erased {
    pub trait Json {
        fn json(&self) -> String;
    }

    pub struct Tagged<'a, T>(pub &'static str, pub &'a T);

    impl<T: serde::Serialize> Json for Tagged<'_, T> {
        fn json(&self) -> String {
            serde_json::json!({ "type": self.0, "data": self.1 }).to_string()
        }
    }
}

#[cfg(test)]
mod tests {
    use roomcast_proto::envelope::Subprotocol;
    use roomcast_proto::handshake::{parse_request, response_101};

    use super::{Sock, Stop, check_upgrade, read_head, upgrade_request};

    /// A member is owed a stream's messages up to its last accepted one: trailing holes (gifts
    /// given up unanswered after it) are not waited for, holes before it are; a stop from a
    /// coordinator without the field owes everything published.
    #[test]
    fn the_end_waits_for_the_last_accepted_message_not_for_trailing_holes() {
        let stop: Stop =
            serde_json::from_str(r#"{"published":[[[5,9]]],"holes":[[[2,1]]],"tail_holes":[[[1,0]]]}"#).unwrap();
        assert_eq!(stop.owed_upto(0, 0), 4, "k=4 given up last: owed up to k=3");
        assert_eq!(stop.owed_upto(0, 1), 9, "its hole is before accepted messages");
        assert_eq!(stop.owed_upto(1, 0), 0, "a room with nothing published");
        let older: Stop = serde_json::from_str(r#"{"published":[[[5]]]}"#).unwrap();
        assert_eq!(older.owed_upto(0, 0), 5);
    }

    /// The answer is taken up to its blank line and not a byte further, even when the blank
    /// line arrives split across writes and the next frame comes in the same segment.
    #[test]
    fn the_answer_is_read_to_its_blank_line_and_no_further() {
        use std::io::{Read, Write};
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let client = std::net::TcpStream::connect(l.local_addr().unwrap()).unwrap();
        let (mut server, _) = l.accept().unwrap();
        let writer = std::thread::spawn(move || {
            server.write_all(b"HTTP/1.1 101 Switching\r\nUpgrade: websocket\r\n\r").unwrap();
            std::thread::sleep(std::time::Duration::from_millis(100));
            server.write_all(b"\nNEXT").unwrap();
            server
        });
        let mut s = Sock::Plain(client);
        let head = read_head(&mut s).unwrap();
        assert_eq!(head, b"HTTP/1.1 101 Switching\r\nUpgrade: websocket\r\n\r\n");
        let _server = writer.join().unwrap();
        let mut rest = [0u8; 4];
        s.read_exact(&mut rest).unwrap();
        assert_eq!(&rest, b"NEXT");
        // "\r\r\n\r\n" ends the head too (a CR before the terminator).
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let client = std::net::TcpStream::connect(l.local_addr().unwrap()).unwrap();
        let (mut server, _) = l.accept().unwrap();
        server.write_all(b"HTTP/1.1 101 X\r\r\n\r\nZ").unwrap();
        assert_eq!(read_head(&mut Sock::Plain(client)).unwrap(), b"HTTP/1.1 101 X\r\r\n\r\n");
    }

    /// A member closed at the run's end sends what a leaving client sends: a masked close frame
    /// with 1000 after the pong it still owed (whole, not cut by the close), then FIN; its
    /// socket still reads what the server sends after that.
    #[test]
    fn a_member_closed_at_the_end_sends_a_close_frame_then_fin() {
        use std::io::{Read, Write};
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let client = std::net::TcpStream::connect(l.local_addr().unwrap()).unwrap();
        let (mut server, _) = l.accept().unwrap();
        client.set_nonblocking(true).unwrap();
        let mut c = super::Conn::new(Sock::Plain(client), false, 0, &[1, 1]);
        c.pong.extend_from_slice(&[0x8a, 0x80, 1, 2, 3, 4]);
        assert!(c.close_at_end(false), "the close frame went out whole");
        let mut got = Vec::new();
        server.read_to_end(&mut got).unwrap();
        assert_eq!(&got[..6], &[0x8a, 0x80, 1, 2, 3, 4], "the pong owed first");
        let close = &got[6..];
        assert_eq!((close[0], close[1], close.len()), (0x88, 0x82, 8), "FIN + close, masked, 2 bytes: {close:?}");
        let code = [close[6] ^ close[2], close[7] ^ close[3]];
        assert_eq!(u16::from_be_bytes(code), 1000);
        // The read side stays open for the server's answer.
        server.write_all(&[0x88, 0x02, 0x03, 0xe8]).unwrap();
        drop(server);
        let mut answer = Vec::new();
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        loop {
            let mut b = [0u8; 16];
            match c.sock.read(&mut b) {
                Ok(0) => break,
                Ok(n) => answer.extend_from_slice(&b[..n]),
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock && std::time::Instant::now() < deadline => {
                    std::thread::sleep(std::time::Duration::from_millis(5));
                }
                Err(e) => panic!("{e}"),
            }
        }
        assert_eq!(answer, [0x88, 0x02, 0x03, 0xe8]);
    }

    /// The request tungstenite builds is one the edge's own parser takes, with a fresh key each
    /// time; the edge's answer to it passes the check, and an answer with another key, without
    /// the offered subprotocol, or refusing, does not.
    #[test]
    fn upgrade_round_trip_against_the_edge_parser() {
        let dst = "127.0.0.1:8080".parse().unwrap();
        let (req, key) = upgrade_request(dst, "/ws?room=r7&token=a.b.c", "roomcast.rkyv.v2", true).unwrap();
        let (up, used) = parse_request(&req).unwrap().unwrap();
        assert_eq!(used, req.len());
        assert_eq!(up.key, key);
        assert_eq!(up.path, "/ws");
        assert_eq!(up.query[0], ("room".to_owned(), "r7".to_owned()));
        assert_eq!(up.select_subprotocol().unwrap(), Some(Subprotocol::Rkyv));
        assert_ne!(upgrade_request(dst, "/ws?room=r7", "", false).unwrap().1, key, "a fresh key per connection");
        // --deflate offers permessage-deflate, which the edge accepts.
        let agreed = roomcast_proto::deflate::negotiate(&up.extensions, false).expect("deflate offered");
        assert_eq!(agreed.server_window_bits, 15);

        let answer = response_101(&key, Some(Subprotocol::Rkyv));
        check_upgrade(&answer, &key, "roomcast.rkyv.v2").unwrap();
        // Another connection's key: the accept key does not match.
        let (_, other) = upgrade_request(dst, "/ws?room=r7", "roomcast.rkyv.v2", false).unwrap();
        assert!(check_upgrade(&response_101(&other, Some(Subprotocol::Rkyv)), &key, "roomcast.rkyv.v2").is_err());
        // Subprotocol offered, none agreed; none offered, one agreed.
        assert!(check_upgrade(&response_101(&key, None), &key, "roomcast.rkyv.v2").is_err());
        assert!(check_upgrade(&answer, &key, "").is_err());
        check_upgrade(&response_101(&key, None), &key, "").unwrap();
        // Not a 101, or not an upgrade.
        assert!(check_upgrade(b"HTTP/1.1 503 Service Unavailable\r\n\r\n", &key, "").is_err());
        let no_upgrade = String::from_utf8(response_101(&key, None)).unwrap().replace("Upgrade: websocket\r\n", "");
        assert!(check_upgrade(no_upgrade.as_bytes(), &key, "").is_err());
    }
}
