//! roomcast load generator.
//!
//! `loadgen run` opens N WebSocket connections to one or more edges (or to Nchan, the peer),
//! spread over R rooms, through worker processes (each holds fewer sockets than RLIMIT_NOFILE),
//! publishes at configured rates per kind, and measures end-to-end latency, loss, throughput and
//! the server's CPU and memory. Results go to `bench-results/<date>-<scenario>/`.
//! `loadgen tokens` signs a connection token (JWT) per connection for `run --tokens`.
//! `loadgen pubbench` finds the publish rate the edge sustains (closed loop, over HTTP).

mod connect;
mod dispatch;
mod pubbench;
mod publish;
mod report;
mod stats;
mod tokens;
mod worker;

use std::io::{BufRead, BufReader, Write};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use anyhow::Context;
use clap::{Parser, Subcommand, ValueEnum};
use hdrhistogram::Histogram;

use stats::{decode_hist, histogram, merge};
use worker::{Final, Progress, Stop, Target, WorkerArgs};

#[derive(Parser)]
#[command(version, about = "roomcast load generator")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Run a load test and write its results.
    Run(Box<RunArgs>),
    /// Sign one connection token (JWT) per connection into a file, for `run --tokens`.
    Tokens(tokens::TokensArgs),
    /// Closed-loop publish benchmark: concurrent clients publishing back to back over HTTP.
    Pubbench(pubbench::PubbenchArgs),
    /// Internal: one worker process (started by `run`).
    #[command(hide = true)]
    Worker { json: String },
}

#[derive(Clone, Copy, ValueEnum, PartialEq, Eq, Debug, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Dist {
    /// Every connection in room 0.
    Hot,
    /// Rooms by a Zipf law (s = 1).
    Zipf,
    /// Round robin.
    Uniform,
}

// Numeric flags take a value with a leading '-' (`allow_negative_numbers`): `--connections -5`
// then gets the flag's own error ("invalid value '-5' for '--connections <CONNECTIONS>'") where
// clap took `-5` for a flag and said only "unexpected argument '-5' found".
#[derive(clap::Args, Clone, Debug)]
struct RunArgs {
    /// What the connections talk to.
    #[arg(long, value_enum, default_value = "edge")]
    target: Target,
    /// WebSocket addresses (host:port), comma separated; connections are spread over them.
    #[arg(long, value_delimiter = ',', required = true)]
    ws: Vec<SocketAddr>,
    /// Publish endpoint (host:port): the edge's HTTP API or Nchan's server.
    #[arg(long)]
    http: SocketAddr,
    /// Members (WebSocket or SSE connections), at least 1.
    #[arg(long, default_value_t = 1000, value_parser = at_least_one::<usize>, allow_negative_numbers = true)]
    connections: usize,
    /// Rooms the members are spread over (`--dist`), and published to, at least 1.
    #[arg(long, default_value_t = 1, value_parser = at_least_one::<u32>, allow_negative_numbers = true)]
    rooms: u32,
    #[arg(long, value_enum, default_value = "hot")]
    dist: Dist,
    /// Connections per second (all workers together; 0: no pacing, as fast as the connect
    /// window allows).
    #[arg(long, default_value_t = 5000.0, value_parser = finite_non_negative, allow_negative_numbers = true)]
    ramp: f64,
    /// Use roomcast.json.v1 instead of roomcast.rkyv.v2.
    #[arg(long)]
    json: bool,
    /// Members follow the room over Server-Sent Events (`GET /sse`, JSON events) instead of
    /// WebSocket (edge only).
    #[arg(long)]
    sse: bool,
    /// Members offer permessage-deflate (as browsers do) and inflate compressed frames: bytes
    /// per delivered message and the edge's CPU per delivery with compression (edge only).
    #[arg(long)]
    deflate: bool,
    /// Gifts per second per room.
    #[arg(long, default_value_t = 10.0, value_parser = finite_non_negative, allow_negative_numbers = true)]
    gift_rate: f64,
    /// Chat messages per second per room.
    #[arg(long, default_value_t = 100.0, value_parser = finite_non_negative, allow_negative_numbers = true)]
    chat_rate: f64,
    /// Publishing duration (seconds), at least 1 (a run that only connects: `--gift-rate 0
    /// --chat-rate 0 --duration 1`).
    #[arg(long, default_value_t = 10, value_parser = clap::value_parser!(u64).range(1..=MAX_DURATION_S), allow_negative_numbers = true)]
    duration: u64,
    /// Body padding, bytes (message size), at most 16 MiB: far past any edge's
    /// `ingest.max_body_bytes` (64 KiB by default); a trial's 99,999,999,999 aborted the
    /// generator on the allocation.
    #[arg(long, default_value_t = 64, value_parser = clap::value_parser!(u64).range(0..=MAX_PAD), allow_negative_numbers = true)]
    pad: u64,
    /// Publishing threads for gifts, each with its own connection and one request in flight
    /// (its share of the rate): with the store on, a gift is acknowledged once fsynced, so one
    /// stream offers at most 1 / (fsync + round trip) gifts a second. Receivers check order and
    /// loss per stream. At least 1 (no gifts: `--gift-rate 0`).
    #[arg(long, default_value_t = 1, value_parser = at_least_one::<usize>, allow_negative_numbers = true)]
    gift_streams: usize,
    /// Publishing threads for chat (as for gifts), at least 1 (no chat: `--chat-rate 0`).
    #[arg(long, default_value_t = 1, value_parser = at_least_one::<usize>, allow_negative_numbers = true)]
    chat_streams: usize,
    /// Chat messages per request, at most (edge only): above 1, each chat stream sends the
    /// messages due in one `POST /v1/messages` batch instead of one request each, as a back
    /// end relaying thousands of chat messages a second would. Gifts are always sent one per
    /// request (each is retried on its own until acknowledged). At least 1.
    #[arg(long, default_value_t = 1, value_parser = at_least_one::<usize>, allow_negative_numbers = true)]
    chat_batch: usize,
    /// Worker processes (0: one per 15,000 connections).
    #[arg(long, default_value_t = 0, allow_negative_numbers = true)]
    workers: usize,
    /// Source addresses per worker (the kernel picks the port per 4-tuple, so each address
    /// gives up to ~28,000 connections to one edge address). No two workers share one. 1 to 253.
    #[arg(long, default_value_t = 8, value_parser = clap::value_parser!(u8).range(1..=253), allow_negative_numbers = true)]
    src_addrs: u8,
    /// Where source addresses come from. `127` (default): loopback's whole 127.0.0.0/8,
    /// worker w taking 127.(w+1).0.2 .. 127.(w+1).0.(1+N) (up to 254 workers). `A.B.C`: a /24
    /// the generator has addresses on (a veth in its own namespace, say), worker w taking
    /// A.B.C.(2 + w*N) .. A.B.C.(1 + (w+1)*N); refused when the workers would not fit.
    #[arg(long, default_value = "127", value_parser = src_net_form)]
    src_net: String,
    /// SO_RCVBUF per connection, like a mobile client's window (0: kernel autotuning, which on
    /// loopback grows to tens of MiB and hides a slow generator's backlog in the kernel).
    #[arg(long, default_value_t = 131072, allow_negative_numbers = true)]
    rcvbuf: usize,
    /// Every n-th connection reads slowly (0: none; 10: one in ten).
    #[arg(long, default_value_t = 0, allow_negative_numbers = true)]
    slow_every: usize,
    /// SO_RCVBUF of the slow readers (a constrained client: what its kernel holds unread is
    /// latency the reader adds itself).
    #[arg(long, default_value_t = 16384, allow_negative_numbers = true)]
    slow_rcvbuf: usize,
    /// Bytes a slow reader reads per half second, at least 1 (0: slow readers that never read).
    #[arg(long, default_value_t = 4096, value_parser = at_least_one::<usize>, allow_negative_numbers = true)]
    slow_bytes: usize,
    /// Server process to measure (CPU, RSS): the edge, or Nchan's worker. Refused when no such
    /// process is running (its figures would all read "not measured").
    #[arg(long, value_parser = process_id, allow_negative_numbers = true)]
    server_pid: Option<u32>,
    /// Results folder root.
    #[arg(long, default_value = "bench-results")]
    out: PathBuf,
    /// Scenario name (folder: `<date>-<scenario>`, the date the run started).
    #[arg(long, default_value = "run")]
    scenario: String,
    /// Replace the results of an earlier run in the run's folder (the same --scenario and --out
    /// on the same day). Without it such a run is refused at its start, before any connection,
    /// naming the folder: it overwrote them silently.
    #[arg(long)]
    replace: bool,
    /// Connect with TLS (`wss://`, `https://` event streams), trusting this PEM CA certificate
    /// (the edge runs with `--tls-cert`). Dispatch and goaway URLs may then be `wss://`.
    #[arg(long, value_name = "FILE")]
    tls_ca: Option<PathBuf>,
    /// Do not follow the edge's `goaway` (by default a connection told to go asks the dispatch
    /// URL in it for another edge and reconnects there with `since`), nor come back with `since`
    /// after a close with 4000 (slow consumer) or 1013 (try again later).
    #[arg(long)]
    no_follow_goaway: bool,
    /// First connects each worker keeps in flight (connect sent, upgrade answer not yet in),
    /// within the ramp: one blocking connect at a time held a worker to 1 / handshake time
    /// (~2,000/s over 67 workers once handshakes took ~30 ms at 8x10^5 members). TLS members
    /// connect one at a time regardless. The same bound, in a window of its own, holds the moves
    /// in flight (a dispatch request, then a connect and upgrade, after a goaway or a lost
    /// socket); moves waiting out their delay or backoff do not count. At least 1.
    #[arg(long, default_value_t = 32, value_parser = at_least_one::<usize>, allow_negative_numbers = true)]
    connect_inflight: usize,
    /// Seconds a gift is retried (the edge refusing or unreachable) before the publisher gives
    /// it up; a gift given up takes no number, so the next one reuses it, unless an attempt got
    /// no answer (it may have been published): then it keeps its number as a hole. 0: never (as
    /// --move-give-up 0): a gift is retried until acknowledged or until the publishing ends
    /// (--duration), when the one still retried is given up. Above 0, any time up to a year
    /// is taken as given (0.5 is half a second). An edge restart longer than this (a 10^6 edge
    /// after SIGKILL answered again after 32 s) makes a gift whose first attempt did reach the
    /// old edge's store but was refused afterwards and its successor share a number, which the
    /// receivers count as a duplicate: benchmarks of restarts set it above the outage. Whatever it says, a gift is
    /// not retried more than 5 s past the publishing's end (--duration): a run whose edge is
    /// gone ends soon after its duration. Chat is never retried: one that fails is dropped.
    #[arg(long, value_name = "SECS", default_value_t = 30.0, value_parser = seconds, allow_negative_numbers = true)]
    gift_give_up: f64,
    /// Seconds a member's move (after a goaway, a close it comes back from, or a lost socket)
    /// keeps retrying, with its backoff capped at 5 s, before it is given up and the member
    /// counts as closed. 0: never (as a real client): the member retries until the run ends,
    /// and then counts as still reconnecting. A 10^6-member restart takes minutes to bring every
    /// member back: benchmarks of restarts set it above that.
    #[arg(long, value_name = "SECS", default_value_t = worker::DEFAULT_MOVE_GIVE_UP_S, value_parser = seconds, allow_negative_numbers = true)]
    move_give_up: f64,
    /// Seconds the connect phase may take before the run gives up, above 0 (default: twice the
    /// ramp's time, plus 30 s; with --ramp 0, as for a 1,000/s ramp).
    #[arg(long, value_name = "SECS", value_parser = positive_seconds, allow_negative_numbers = true)]
    connect_deadline: Option<f64>,
    /// Members whose first connect may fail (refused, reset, timed out, answered 503 or 401,
    /// closed in the handshake: never established) without failing the run: a number (`25`) or
    /// a share of --connections (`0.5%`). By default none may: a run whose members did not all
    /// connect did not do what was asked, and exits non-zero (after writing its results, with
    /// the failures by reason). A run none of whose members connected fails whatever this says.
    #[arg(long, value_name = "N|P%", default_value = "0", value_parser = Allowance::parse, allow_hyphen_values = true)]
    allow_connect_failures: Allowance,
    /// Free text recorded in the summary (the command that started the server, say).
    #[arg(long, default_value = "")]
    note: String,
    /// Connection tokens (JWT), one per line (`loadgen tokens` writes such a file): connection N
    /// sends line N as `&token=` (edge target). A refused upgrade (401) counts as failed.
    #[arg(long)]
    tokens: Option<PathBuf>,
    #[command(flatten)]
    key: publish::KeyArgs,
}

impl RunArgs {
    /// How long a gift is retried before it is given up (`--gift-give-up`); None: never (0).
    fn gift_give_up(&self) -> Option<Duration> {
        (self.gift_give_up > 0.0).then(|| Duration::from_secs_f64(self.gift_give_up))
    }

    /// Seconds the connect phase may take (`--connect-deadline`): by default twice the ramp's
    /// time plus 30 s. An unpaced ramp (`--ramp 0`: as fast as each worker's connect window
    /// allows) has no time of its own: connections / 0 made the default infinite (clamped to
    /// 10^9 s), so a stalled connect phase never ended. It gets the default of a ramp of
    /// [`UNPACED_RATE_FOR_DEADLINE`] instead. At most a year, as every time here.
    fn connect_deadline_s(&self) -> f64 {
        let rate = if self.ramp > 0.0 { self.ramp } else { UNPACED_RATE_FOR_DEADLINE };
        let s = self.connect_deadline.unwrap_or(self.connections as f64 / rate * 2.0 + 30.0);
        s.min(MAX_DURATION_S as f64)
    }
}

/// The connect rate the default `--connect-deadline` assumes for an unpaced run (`--ramp 0`),
/// per second: well below what first connects reach unpaced on a 2-vCPU box shared with the
/// edge (~10^4/s at 10^6 members), so a slower box still fits, while a stalled connect phase of
/// 10^6 members ends after ~34 minutes rather than never.
const UNPACED_RATE_FOR_DEADLINE: f64 = 1000.0;

/// How many members' first connects may fail without failing the run
/// (`--allow-connect-failures`): a number, or a share of the members asked for.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Allowance {
    /// At most this many.
    Members(u64),
    /// At most this percentage of `--connections` (rounded down).
    Percent(f64),
}

impl Allowance {
    /// `N` (members) or `P%` (0 to 100, fractions taken).
    fn parse(s: &str) -> Result<Self, String> {
        let s = s.trim();
        if let Some(p) = s.strip_suffix('%') {
            let v: f64 = p.trim().parse().map_err(|e| format!("{e}: a number of members, or a percentage (0.5%)"))?;
            return if v.is_finite() && (0.0..=100.0).contains(&v) {
                Ok(Self::Percent(v))
            } else {
                Err(format!("a percentage from 0% to 100%, not {s}"))
            };
        }
        s.parse().map(Self::Members).map_err(|e| format!("{e}: a number of members (25), or a percentage (0.5%)"))
    }

    /// The members allowed to fail out of `asked`.
    fn of(self, asked: u64) -> u64 {
        match self {
            Self::Members(n) => n,
            Self::Percent(p) => (asked as f64 * p / 100.0).floor() as u64,
        }
    }
}

impl std::fmt::Display for Allowance {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Members(n) => write!(f, "{n}"),
            Self::Percent(p) => write!(f, "{p}%"),
        }
    }
}

const KINDS: [&str; 2] = ["gift", "chat"];

/// The longest `--duration`, in seconds (a year): the run's end is an `Instant` that far ahead,
/// and u64::MAX seconds overflowed it (a panic after every member had connected).
const MAX_DURATION_S: u64 = 365 * 86_400;

/// The largest `--pad` (bytes).
const MAX_PAD: u64 = 16 * 1024 * 1024;

/// Rates and times in seconds: finite and not negative. NaN got past every clamp and panicked
/// the run when it became a `Duration` (`--ramp NaN` at the start, `--gift-give-up NaN` once
/// every member had connected), and `--ramp inf` reached the workers as JSON `null`, which
/// killed every one of them.
fn finite_non_negative(s: &str) -> Result<f64, String> {
    let v: f64 = s.trim().parse().map_err(|e| format!("{e}"))?;
    if v.is_finite() && v >= 0.0 { Ok(v) } else { Err(format!("must be a finite number, 0 or above, not {s}")) }
}

/// A count that must be 1 or more. Zeros used to be taken silently: `--connections 0` ran no
/// member, published to nobody for its whole --duration and exited 0; `--rooms 0`,
/// `--gift-streams 0`, `--src-addrs 0`, `--connect-inflight 0`, ... were quietly run as 1; and
/// `--slow-bytes 0` made slow readers that never read.
pub(crate) fn at_least_one<T>(s: &str) -> Result<T, String>
where
    T: std::str::FromStr + PartialEq + From<u8>,
    T::Err: std::fmt::Display,
{
    let v: T = s.trim().parse().map_err(|e: T::Err| e.to_string())?;
    if v == T::from(0) { Err("at least 1, not 0".to_owned()) } else { Ok(v) }
}

/// `--src-net`'s form, checked with the other flags (a usage error, before anything starts):
/// `127`, or three octets `A.B.C`. It was checked once the workers were planned, after the
/// results folder, and failed with status 1.
fn src_net_form(s: &str) -> Result<String, String> {
    let parts: Result<Vec<u8>, _> = s.split('.').map(str::parse::<u8>).collect();
    match parts.as_deref() {
        Ok([127] | [_, _, _]) => Ok(s.to_owned()),
        _ => Err("127 (loopback, 127.0.0.0/8), or three octets A.B.C".to_owned()),
    }
}

/// A process to measure (`--server-pid`): one that is running now. A pid with no process (0,
/// a typo, an edge that already exited) was taken, and every server figure of the run read
/// "not measured".
pub(crate) fn process_id(s: &str) -> Result<u32, String> {
    let pid: u32 = at_least_one(s)?;
    match std::fs::metadata(format!("/proc/{pid}/stat")) {
        Ok(_) => Ok(pid),
        Err(_) => Err(format!("no process {pid} is running (its CPU and memory could not be measured)")),
    }
}

/// A number of seconds a flag gives: finite, 0 or above, at most a year (a `Duration` made
/// from NaN, infinity or 10^20 s panics).
pub(crate) fn seconds(s: &str) -> Result<f64, String> {
    let v = finite_non_negative(s)?;
    if v <= MAX_DURATION_S as f64 { Ok(v) } else { Err(format!("at most {MAX_DURATION_S} s (a year), not {s}")) }
}

/// A number of seconds above 0 (as [`seconds`]): `--connect-deadline 0` left the connect phase
/// no time at all, and the run failed at once with a count taken before any worker reported.
pub(crate) fn positive_seconds(s: &str) -> Result<f64, String> {
    let v = seconds(s)?;
    if v > 0.0 { Ok(v) } else { Err(format!("must be above 0 seconds, not {s} (leave the flag out for the default)")) }
}

pub fn room_of(i: usize, rooms: u32, dist: Dist) -> u32 {
    match dist {
        Dist::Hot => 0,
        Dist::Uniform => (i as u32) % rooms.max(1),
        Dist::Zipf => {
            // Deterministic Zipf(1) by inverse CDF on a low-discrepancy sequence.
            let n = rooms.max(1) as usize;
            let h: f64 = (1..=n).map(|k| 1.0 / k as f64).sum();
            let u = ((i as f64) * 0.618_033_988_749_895).fract() * h;
            let mut acc = 0.0;
            for k in 1..=n {
                acc += 1.0 / k as f64;
                if u <= acc {
                    return (k - 1) as u32;
                }
            }
            (n - 1) as u32
        }
    }
}

/// The edge's /metrics text.
fn edge_metrics(http: std::net::SocketAddr, timeout: Duration) -> Option<String> {
    reqwest::blocking::Client::new().get(format!("http://{http}/metrics")).timeout(timeout).send().ok()?.text().ok()
}

/// The edge's CPU time per thread from its perf counters (`roomcast_thread_cpu_seconds_total`
/// on /metrics): task-clock, kernel included, per shard thread.
pub fn edge_thread_cpu(http: std::net::SocketAddr) -> Option<std::collections::BTreeMap<String, f64>> {
    let text = edge_metrics(http, Duration::from_secs(5))?;
    let m: std::collections::BTreeMap<String, f64> = text
        .lines()
        .filter_map(|l| {
            let rest = l.strip_prefix("roomcast_thread_cpu_seconds_total{thread=\"")?;
            let (thread, value) = rest.split_once("\"} ")?;
            Some((thread.to_owned(), value.trim().parse().ok()?))
        })
        .collect();
    (!m.is_empty()).then_some(m)
}

/// How long the edge has been up, seconds (`uptime_s` of its /healthz answer).
fn edge_uptime_s(http: std::net::SocketAddr) -> Option<u64> {
    let text = reqwest::blocking::Client::new()
        .get(format!("http://{http}/healthz"))
        .timeout(Duration::from_secs(5))
        .send()
        .ok()?
        .text()
        .ok()?;
    serde_json::from_str::<serde_json::Value>(&text).ok()?["uptime_s"].as_u64()
}

/// Bytes the edge still holds for its members (every shard's send queues), from /metrics.
pub fn edge_send_queue_bytes(http: std::net::SocketAddr) -> Option<u64> {
    let text = edge_metrics(http, Duration::from_secs(2))?;
    let mut total = 0.0;
    let mut found = false;
    for l in text.lines().filter(|l| l.starts_with("roomcast_send_queue_bytes{")) {
        total += l.rsplit_once(' ')?.1.trim().parse::<f64>().ok()?;
        found = true;
    }
    found.then_some(total as u64)
}

pub fn proc_cpu_rss(pid: u32) -> Option<(f64, u64)> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let f: Vec<&str> = stat.rsplit(')').next()?.split_whitespace().collect();
    let t = |i: usize| f.get(i).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let rss_kb: u64 = status.lines().find(|l| l.starts_with("VmRSS:"))?.split_whitespace().nth(1)?.parse().ok()?;
    Some(((t(11) + t(12)) / 100.0, rss_kb * 1024))
}

/// A worker that says nothing (no progress, no final report) this long after the stop is
/// stuck: killed, reported as dead.
const WORKER_SILENT_AFTER: Duration = Duration::from_secs(90);
/// A worker reports every second: one not heard for this long is named in the per-second
/// lines (its figures there are its last).
const SILENT_IN_LINES: Duration = Duration::from_secs(5);
/// A worker whose final report has not come this long after the stop is killed, reported as
/// dead.
const WORKER_FINAL_WITHIN: Duration = Duration::from_secs(300);

struct WorkerProc {
    child: Child,
    stdin: std::process::ChildStdin,
    /// Its connections: global indexes `first..first + count`.
    first: usize,
    count: usize,
}

/// The worker processes of a run. Dropping it (the run ended, by success or by an error) kills
/// and reaps every worker still running: nothing outlives the coordinator. A coordinator killed
/// outright (SIGTERM, SIGINT, SIGKILL) takes them too, by the kernel's parent-death signal
/// each worker is started with ([`spawn_worker`]).
struct Workers {
    procs: Vec<WorkerProc>,
    /// Last progress of each.
    progress: Vec<Progress>,
    /// Progress reports each has sent (the connect phase's lines wait for them).
    reports: Vec<u64>,
    /// When each last sent a report (progress or final).
    heard: Vec<Instant>,
    /// Final reports, by worker.
    finals: Vec<Option<Final>>,
    died: Vec<report::WorkerDeath>,
    start: Instant,
}

impl Workers {
    /// Takes in what the workers said; a worker whose output ended before its final report
    /// has died: reaped, reported on stderr and kept in `died`.
    fn pump(&mut self, rx: &mpsc::Receiver<Msg>) {
        while let Ok(m) = rx.try_recv() {
            self.on(m);
        }
    }

    fn on(&mut self, m: Msg) {
        match m {
            Msg::Progress(p) => {
                let id = p.id;
                if let Some(slot) = self.progress.get_mut(id) {
                    *slot = p;
                    self.reports[id] += 1;
                    self.heard[id] = Instant::now();
                }
            }
            Msg::Final(f) => {
                let id = f.id;
                if let Some(slot) = self.finals.get_mut(id) {
                    *slot = Some(*f);
                    self.heard[id] = Instant::now();
                }
            }
            Msg::Eof(id) => {
                if self.finals.get(id).is_some_and(Option::is_some) || self.is_dead(id) {
                    return;
                }
                let Some(p) = self.procs.get_mut(id) else { return };
                let status = reap(&mut p.child);
                self.dead(id, status);
            }
        }
    }

    /// Records worker `id` as dead (`status`: how it ended): reported on stderr and kept in
    /// `died`, its members out of the figures from now on.
    fn dead(&mut self, id: usize, status: String) {
        let p = &self.procs[id];
        let d = report::WorkerDeath {
            id,
            first: p.first,
            count: p.count,
            connected: self.progress[id].connected,
            status,
            at_s: self.start.elapsed().as_secs_f64(),
        };
        eprintln!(
            "loadgen: worker {id} (connections {}..{}) died ({}) at {:.1} s holding {} connections; \
             they are out of the results",
            d.first,
            d.first + d.count,
            d.status,
            d.at_s,
            d.connected
        );
        self.died.push(d);
        // Its members are gone: the per-second lines and samples no longer count them
        // as connected or open, nor its last latencies (a 2-of-3 trial kept printing
        // open=4000 for the rest of the run). Deliveries stay: they are a running total.
        let slot = &mut self.progress[id];
        (slot.connected, slot.open, slot.pending) = (0, 0, 0);
        (slot.p50_us, slot.p99_us, slot.first_kind_p99_us) = (0, 0, 0);
    }

    /// Kills every worker that has neither sent its final report nor died and has said nothing
    /// for `silent_for` (or at all, with `Duration::ZERO`), and records each as dead: its
    /// members are out of the results, which the others' figures still make. A 10^6 run whose
    /// workers stalled under the kernel's TCP memory pressure ended with "67/67 workers neither
    /// reported nor died within 90 s" and wrote no results at all.
    fn kill_the_silent(&mut self, silent_for: Duration, why: &str) -> usize {
        let silent = self.silent(silent_for);
        for &i in &silent {
            let child = &mut self.procs[i].child;
            let _ = child.kill();
            let _ = child.wait();
            self.dead(i, format!("{why}: killed"));
        }
        silent.len()
    }

    /// Workers still running (no final report) that have said nothing for `for_`.
    fn silent(&self, for_: Duration) -> Vec<usize> {
        (0..self.procs.len())
            .filter(|&i| self.finals[i].is_none() && !self.is_dead(i) && self.heard[i].elapsed() >= for_)
            .collect()
    }

    fn is_dead(&self, id: usize) -> bool {
        self.died.iter().any(|d| d.id == id)
    }

    /// For each worker, the progress reports it has sent, or None if it died.
    fn reports_of_the_living(&self) -> Vec<Option<u64>> {
        (0..self.procs.len()).map(|i| (!self.is_dead(i)).then_some(self.reports[i])).collect()
    }

    /// Workers that have neither reported their final figures nor died.
    fn running(&self) -> usize {
        (0..self.procs.len()).filter(|&i| self.finals[i].is_none() && !self.is_dead(i)).count()
    }

    /// Connections attempted so far (a dead worker's whole share counts as settled), failed
    /// attempts by reason, and connected.
    fn connect_state(&self) -> (u64, std::collections::BTreeMap<String, u64>, u64) {
        let mut settled = 0;
        let mut by = std::collections::BTreeMap::new();
        let mut connected = 0;
        for (i, p) in self.progress.iter().enumerate() {
            if self.is_dead(i) {
                settled += self.procs[i].count as u64;
            } else {
                settled += p.connected + p.failed;
                connected += p.connected;
            }
            for (k, v) in &p.failed_by {
                *by.entry(k.clone()).or_default() += v;
            }
        }
        (settled, by, connected)
    }
}

impl Drop for Workers {
    fn drop(&mut self) {
        // Every kill first, then every wait: a worker takes seconds to close 15,000 sockets,
        // and one at a time the 67 workers of a 10^6 run took minutes to go.
        for p in &mut self.procs {
            if matches!(p.child.try_wait(), Ok(None)) {
                let _ = p.child.kill();
            }
        }
        for p in &mut self.procs {
            let _ = p.child.wait();
        }
    }
}

/// Waits for a worker whose output ended (at most 5 s, then kills it) and says how it ended.
fn reap(child: &mut Child) -> String {
    use std::os::unix::process::ExitStatusExt;
    let until = Instant::now() + Duration::from_secs(5);
    let status = loop {
        match child.try_wait() {
            Ok(Some(s)) => break Some(s),
            Ok(None) if Instant::now() < until => std::thread::sleep(Duration::from_millis(20)),
            Ok(None) => {
                let _ = child.kill();
                break child.wait().ok();
            }
            Err(_) => break None,
        }
    };
    match status {
        Some(s) => match (s.code(), s.signal()) {
            (Some(c), _) => format!("exit status {c}"),
            (None, Some(sig)) => format!("signal {sig}"),
            _ => format!("{s}"),
        },
        None => "unknown".into(),
    }
}

/// Starts one worker. It gets SIGKILL when the coordinator dies (PR_SET_PDEATHSIG), however
/// that happens, so no worker is left holding its sockets (the 10^6 trial in #19 left 67).
/// The signal follows the *thread* that forked: workers are spawned from the main thread,
/// which lives as long as the process.
fn spawn_worker(exe: &std::path::Path, json: &str) -> std::io::Result<Child> {
    use std::os::unix::process::CommandExt;
    let parent = std::process::id();
    let mut cmd = Command::new(exe);
    cmd.args(["worker", json]).stdin(Stdio::piped()).stdout(Stdio::piped()).stderr(Stdio::piped());
    // SAFETY: the closure runs in the child between fork and exec and calls only
    // async-signal-safe functions (prctl, getppid, _exit); it allocates nothing.
    unsafe {
        cmd.pre_exec(move || {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            // The coordinator died before the prctl: nobody will ever stop this worker.
            if u32::try_from(libc::getppid()).ok() != Some(parent) {
                libc::_exit(1);
            }
            Ok(())
        });
    }
    cmd.spawn()
}

/// Copies worker `id`'s stderr (`from`) to `to` a line at a time, each line prefixed `w{id}: `
/// and written with one `write_all` (to our stderr: one write, under its lock), so lines from
/// several workers never mix. Workers used to write to the terminal themselves, and `eprintln!`
/// writes a line in pieces: two workers' pieces came out interleaved mid-line. A last line
/// without its newline gets one; what `to` refuses is dropped, and reading goes on (a worker
/// must never block on a full pipe).
fn relay_lines(id: usize, mut from: impl BufRead, mut to: impl Write) {
    let prefix = format!("w{id}: ");
    let mut line = Vec::with_capacity(256);
    loop {
        line.clear();
        line.extend_from_slice(prefix.as_bytes());
        match from.read_until(b'\n', &mut line) {
            Ok(0) | Err(_) => return,
            Ok(_) => {}
        }
        if !line.ends_with(b"\n") {
            line.push(b'\n');
        }
        let _ = to.write_all(&line);
    }
}

/// When the connect phase's per-second line is due, and the connect rate it shows. Workers
/// report once a second on their own clocks: a line printed on the coordinator's first second
/// came before any report and read 0/s (and a later one, with two reports of a worker in, twice
/// the rate). So a line waits until every living worker has reported since the last one (the
/// first: since the start), at least a second after it, or for [`ConnectLines::AT_MOST`] when
/// one is silent (a worker inside a blocking TLS handshake); the rate is over the time since
/// the last line. Takes time as an argument.
struct ConnectLines {
    last_at: Instant,
    last_connected: u64,
    /// Each worker's reports when the last line went out.
    seen: Vec<u64>,
}

impl ConnectLines {
    /// The longest wait for a silent worker's report.
    const AT_MOST: Duration = Duration::from_secs(3);

    /// Lines of a phase started at `start` with `workers` workers.
    fn new(start: Instant, workers: usize) -> Self {
        Self { last_at: start, last_connected: 0, seen: vec![0; workers] }
    }

    /// At `now`, with each worker's reports so far (None: it died) and `connected` members in
    /// them: the rate to print if a line is due.
    fn due(&mut self, now: Instant, reports: &[Option<u64>], connected: u64) -> Option<f64> {
        let since = now.duration_since(self.last_at);
        let all_in = reports.iter().zip(&self.seen).all(|(r, seen)| r.is_none_or(|r| r > *seen));
        if since < Duration::from_secs(1) || (!all_in && since < Self::AT_MOST) {
            return None;
        }
        let rate = connected.saturating_sub(self.last_connected) as f64 / since.as_secs_f64();
        self.last_at = now;
        self.last_connected = connected;
        for (seen, r) in self.seen.iter_mut().zip(reports) {
            *seen = r.unwrap_or(*seen);
        }
        Some(rate)
    }
}

enum Msg {
    Progress(Progress),
    Final(Box<Final>),
    /// The worker's output ended (it exited, or died).
    Eof(usize),
}

/// Per-second sample for the plots.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Sample {
    pub t_s: f64,
    /// The edge's merge window and sampling for room r0 (edge target only).
    pub window_ms: Option<u64>,
    pub sampling_visible_rate: Option<f64>,
    pub connected: u64,
    pub deliveries_per_s: f64,
    pub p50_ms: f64,
    pub p99_ms: f64,
    /// p99 of gifts alone in this second.
    pub gift_p99_ms: f64,
    /// Connections moved to another edge after a goaway, so far.
    pub reconnects: u64,
    /// Members open at this moment (not between a goaway or a lost connection and their new
    /// socket), and messages delivered so far.
    pub open: u64,
    pub deliveries: u64,
    /// `gap` and `reset` messages the members received so far.
    pub gaps: u64,
    pub resets: u64,
}

/// Expected errors (a flag or a key refused, a run that did not do what was asked) are told
/// as their message and causes on one line, `Error: what: why`, and exit 1. `main` returning
/// the `anyhow::Result` printed its `Debug`, which under RUST_BACKTRACE=1 (set on this box)
/// added a backtrace of where the error was made to every such message; panics, which are
/// bugs, keep theirs.
fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    let result = match cli.cmd {
        Cmd::Worker { json } => serde_json::from_str(&json).map_err(anyhow::Error::from).and_then(worker::run),
        Cmd::Run(a) => run(*a),
        Cmd::Tokens(a) => tokens::sign(&a),
        Cmd::Pubbench(a) => pubbench::run(&a),
    };
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("Error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

fn run(a: RunArgs) -> anyhow::Result<()> {
    // The folder is named, and checked, before anything else: a run of hours must not learn at
    // its end that it would overwrite (or, as it did, silently overwrote) an earlier run's
    // results.
    let dir = report::folder(&a.out, &a.scenario);
    let earlier = report::earlier_results(&dir);
    if !earlier.is_empty() {
        anyhow::ensure!(
            a.replace,
            "{} holds an earlier run's results ({}): pass --replace to replace them, or give another --scenario \
             or --out",
            dir.display(),
            earlier.join(", ")
        );
        eprintln!(
            "loadgen: --replace: this run's results will replace the earlier run's in {} ({})",
            dir.display(),
            earlier.join(", ")
        );
    }
    let workers = if a.workers == 0 { a.connections.div_ceil(15_000).max(1) } else { a.workers };
    // Read before any connection: a key that cannot be read fails the run at once.
    let key = a.key.load()?.map(|(k, line)| {
        println!("{line}");
        k
    });
    if let Some(path) = &a.tokens {
        anyhow::ensure!(a.target == Target::Edge, "--tokens: the edge target only");
        tokens::load(path, 0, a.connections)?;
    }
    let exe = std::env::current_exe()?;
    let (tx, rx) = mpsc::channel::<Msg>();
    let server_before = a.server_pid.and_then(proc_cpu_rss);
    let per = a.connections.div_ceil(workers);
    let spawned = (0..workers).filter(|w| w * per < a.connections).count();
    let sources = source_addrs(&a.src_net, spawned, a.src_addrs)?;
    let mut sup = Workers {
        procs: Vec::new(),
        progress: Vec::new(),
        reports: Vec::new(),
        heard: Vec::new(),
        finals: Vec::new(),
        died: Vec::new(),
        start: Instant::now(),
    };
    for (w, src) in sources.into_iter().enumerate() {
        let lo = w * per;
        let hi = ((w + 1) * per).min(a.connections);
        if lo >= hi {
            break;
        }
        let wa = WorkerArgs {
            id: w,
            target: a.target,
            addrs: a.ws.clone(),
            first: lo,
            count: hi - lo,
            rooms: a.rooms,
            dist: a.dist,
            rkyv: !a.json && !a.sse,
            sse: a.sse && a.target == Target::Edge,
            deflate: a.deflate && !a.sse && a.target == Target::Edge,
            ramp: a.ramp / workers as f64,
            src,
            kinds: KINDS.iter().map(|k| (*k).to_owned()).collect(),
            rcvbuf: a.rcvbuf,
            slow_rcvbuf: a.slow_rcvbuf,
            slow_every: a.slow_every,
            slow_bytes: a.slow_bytes,
            follow_goaway: !a.no_follow_goaway && a.target == Target::Edge,
            tokens: a.tokens.clone(),
            streams: vec![a.gift_streams, a.chat_streams],
            tls_ca: a.tls_ca.clone(),
            connect_inflight: a.connect_inflight,
            move_give_up_s: a.move_give_up,
            run: publish::run_id(),
        };
        let mut child = spawn_worker(&exe, &serde_json::to_string(&wa)?).context("spawn worker")?;
        let stdout = child.stdout.take().expect("piped");
        let stdin = child.stdin.take().expect("piped");
        let stderr = child.stderr.take().expect("piped");
        std::thread::spawn(move || relay_lines(w, BufReader::new(stderr), std::io::stderr()));
        let tx = tx.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                let Ok(v) = serde_json::from_str::<serde_json::Value>(&line) else { continue };
                let msg = match v["type"].as_str() {
                    Some("progress") => serde_json::from_value(v["data"].clone()).ok().map(Msg::Progress),
                    Some("final") => serde_json::from_value(v["data"].clone()).ok().map(|f| Msg::Final(Box::new(f))),
                    _ => None,
                };
                if let Some(m) = msg
                    && tx.send(m).is_err()
                {
                    return;
                }
            }
            let _ = tx.send(Msg::Eof(w));
        });
        sup.procs.push(WorkerProc { child, stdin, first: lo, count: hi - lo });
        sup.progress.push(Progress { id: w, ..Progress::default() });
        sup.reports.push(0);
        sup.heard.push(Instant::now());
        sup.finals.push(None);
    }
    drop(tx);
    let n_workers = sup.procs.len();
    // Every worker is up: start the ramp on all at once.
    for p in &mut sup.procs {
        // A worker that died already is reported by its reader thread.
        let _ = writeln!(p.stdin, "go").and_then(|()| p.stdin.flush());
    }
    let start = Instant::now();
    sup.start = start;
    let mut samples = Vec::new();

    // 1. Connect, with a line a second: connected, rate, failures by reason.
    let deadline_s = a.connect_deadline_s();
    let connect_deadline = Instant::now() + Duration::from_secs_f64(deadline_s);
    let mut lines = ConnectLines::new(start, n_workers);
    let mut last_rate = 0.0f64;
    let connected_after_connects = loop {
        sup.pump(&rx);
        let (settled, failed_by, connected) = sup.connect_state();
        let failed: u64 = failed_by.values().sum();
        let by = || failed_by.iter().map(|(k, v)| format!("{k}: {v}")).collect::<Vec<_>>().join(", ");
        if settled >= a.connections as u64 {
            println!(
                "connected {connected} (failed {failed}{}{}) in {:.1}s",
                if failed > 0 { format!(": {}", by()) } else { String::new() },
                if sup.died.is_empty() { String::new() } else { format!("; {} workers died", sup.died.len()) },
                start.elapsed().as_secs_f64()
            );
            break connected;
        }
        if let Some(rate) = lines.due(Instant::now(), &sup.reports_of_the_living(), connected) {
            println!(
                "connecting t={:.0}s connected={connected}/{} ({rate:.0}/s) failed={failed}{} reconnected={} workers={}/{}",
                start.elapsed().as_secs_f64(),
                a.connections,
                if failed > 0 { format!(" ({})", by()) } else { String::new() },
                sup.progress.iter().map(|p| p.reconnects).sum::<u64>(),
                n_workers - sup.died.len(),
                n_workers
            );
            last_rate = rate;
        }
        if Instant::now() >= connect_deadline {
            let pending: u64 = sup.progress.iter().map(|p| p.pending).sum();
            anyhow::bail!(
                "connect phase timed out after {deadline_s:.0} s: {connected} of {} connected, {failed} failed{}, \
                 {pending} not yet connected ({} s at the last second's rate); give it longer with \
                 --connect-deadline SECS",
                a.connections,
                if failed > 0 { format!(" ({})", by()) } else { String::new() },
                if last_rate > 0.0 { format!("~{:.0}", pending as f64 / last_rate) } else { "unknown".to_owned() },
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let connect_s = start.elapsed().as_secs_f64();
    std::thread::sleep(Duration::from_millis(500));
    let server_connected = a.server_pid.and_then(proc_cpu_rss);
    let threads_connected = (a.target == Target::Edge).then(|| edge_thread_cpu(a.http)).flatten();
    let uptime_connected = (a.target == Target::Edge).then(|| edge_uptime_s(a.http)).flatten();
    let gen_cpu_before: f64 = sup.progress.iter().map(|p| p.cpu_s).sum::<f64>() + worker::own_cpu_s();

    // 2. Publish (stream threads), sampling progress every second on this thread. A run none of
    // whose members connected (no edge there, every upgrade refused) stops here: publishing for
    // its whole --duration to nobody measured nothing. One whose publishes are all refused for
    // good stops once the publisher says so (see publish::RefusalSpell). Both still write their
    // results and exit non-zero.
    let nobody = connected_after_connects == 0;
    let rates = [a.gift_rate, a.chat_rate];
    let streams = [a.gift_streams, a.chat_streams];
    let pub_start = Instant::now();
    let end = if nobody { pub_start } else { pub_start + Duration::from_secs(a.duration) };
    let publisher = if nobody {
        None
    } else {
        Some(publish::Publisher::start(
            a.target,
            a.http,
            a.rooms,
            &KINDS,
            a.pad as usize,
            &rates,
            &streams,
            &[1, a.chat_batch],
            a.gift_give_up(),
            key.as_ref(),
            pub_start,
            end,
        )?)
    };
    let deliveries_before: u64 = sup.progress.iter().map(|p| p.deliveries).sum();
    let mut last_sample = Instant::now();
    let mut last_deliveries = deliveries_before;
    let sample = |sup: &Workers, last_deliveries: &mut u64, last_sample: &mut Instant, samples: &mut Vec<Sample>| {
        let (progress, silent) = (&sup.progress, sup.silent(SILENT_IN_LINES).len());
        let d: u64 = progress.iter().map(|p| p.deliveries).sum();
        let dt = last_sample.elapsed().as_secs_f64().max(1e-3);
        let p50 = progress.iter().map(|p| p.p50_us).max().unwrap_or(0) as f64 / 1000.0;
        let p99 = progress.iter().map(|p| p.p99_us).max().unwrap_or(0) as f64 / 1000.0;
        let gift_p99 = progress.iter().map(|p| p.first_kind_p99_us).max().unwrap_or(0) as f64 / 1000.0;
        let stats: Option<serde_json::Value> = (a.target == Target::Edge)
            .then(|| {
                reqwest::blocking::Client::new()
                    .get(format!("http://{}/v1/rooms/r0", a.http))
                    .timeout(Duration::from_millis(500))
                    .send()
                    .ok()?
                    .text()
                    .ok()
                    .and_then(|t| serde_json::from_str(&t).ok())
            })
            .flatten();
        let s = Sample {
            window_ms: stats.as_ref().and_then(|v| v["window_ms"].as_u64()),
            sampling_visible_rate: stats.as_ref().and_then(|v| v["sampling_visible_rate"].as_f64()),
            t_s: pub_start.elapsed().as_secs_f64(),
            connected: progress.iter().map(|p| p.connected).sum(),
            deliveries_per_s: (d - *last_deliveries) as f64 / dt,
            p50_ms: p50,
            p99_ms: p99,
            gift_p99_ms: gift_p99,
            reconnects: progress.iter().map(|p| p.reconnects).sum(),
            open: progress.iter().map(|p| p.open).sum(),
            deliveries: d,
            gaps: progress.iter().map(|p| p.gaps).sum(),
            resets: progress.iter().map(|p| p.resets).sum(),
        };
        // A frozen worker's figures stay at its last report: say so, or its members look open.
        let silent = if silent > 0 { format!(" silent_workers={silent} (their last figures)") } else { String::new() };
        println!(
            "t={:5.1}s conns={} deliveries/s={:.0} p50={:.1}ms p99={:.1}ms gift_p99={:.1}ms moved={} open={} delivered={} \
             gaps={} resets={}{silent}",
            s.t_s,
            s.connected,
            s.deliveries_per_s,
            s.p50_ms,
            s.p99_ms,
            s.gift_p99_ms,
            s.reconnects,
            s.open,
            d,
            s.gaps,
            s.resets,
        );
        samples.push(s);
        *last_deliveries = d;
        *last_sample = Instant::now();
    };
    while Instant::now() < end && !publisher.as_ref().is_some_and(publish::Publisher::stopping) {
        sup.pump(&rx);
        if last_sample.elapsed() >= Duration::from_secs(1) {
            sample(&sup, &mut last_deliveries, &mut last_sample, &mut samples);
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    // Streams stop at `end`; a gift still retried then is given up at most
    // publish::GIFT_GRACE_PAST_END (5 s) later, plus the attempt under way (3 s at most).
    let outcome = match publisher {
        Some(p) => p.finish()?,
        None => publish::Outcome::empty(a.rooms, KINDS.len(), streams.iter().copied().max().unwrap_or(1)),
    };
    let pub_secs = pub_start.elapsed().as_secs_f64();
    let stopped_early = if nobody {
        Some("no member connected in the connect phase: nothing was published".to_owned())
    } else {
        outcome
            .stopped_early
            .clone()
            .map(|why| format!("stopped publishing at {pub_secs:.1} s of {} s: {why}", a.duration))
    };
    if let Some(why) = &stopped_early {
        eprintln!("loadgen: stopping early: {why}");
    }
    // 3. Let everything in flight arrive (until deliveries and bytes stop moving for 3 s, at
    // most 60 s), then stop the workers with the published counts: late is not lost. Bytes
    // too: a slow reader spends seconds inside one large replay frame, delivering nothing.
    // Nothing is in flight to nobody.
    let settle_end = Instant::now() + if nobody { Duration::ZERO } else { Duration::from_secs(60) };
    let mut quiet_since = Instant::now();
    let moved = |progress: &[Progress]| {
        progress.iter().map(|p| (p.deliveries, p.bytes)).fold((0, 0), |a, b| (a.0 + b.0, a.1 + b.1))
    };
    // Quiet readers alone do not mean the edge is done: a shard starved of CPU (one CPU shared
    // with a busy loop, a non-preemptible kernel) can stall for longer than 3 s with frames
    // queued. So the edge's own send queues must also be empty when it is the target.
    let mut seen = moved(&sup.progress);
    let mut edge_queued = None;
    let mut queue_checked = Instant::now().checked_sub(Duration::from_secs(1)).unwrap();
    while Instant::now() < settle_end
        && (quiet_since.elapsed() < Duration::from_secs(3) || edge_queued.is_some_and(|b| b > 0))
    {
        sup.pump(&rx);
        let now_seen = moved(&sup.progress);
        if now_seen != seen {
            seen = now_seen;
            quiet_since = Instant::now();
        }
        if a.target == Target::Edge && queue_checked.elapsed() >= Duration::from_millis(500) {
            edge_queued = edge_send_queue_bytes(a.http);
            queue_checked = Instant::now();
        }
        if last_sample.elapsed() >= Duration::from_secs(1) {
            sample(&sup, &mut last_deliveries, &mut last_sample, &mut samples);
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let server_after = a.server_pid.and_then(proc_cpu_rss);
    let mut threads_after = (a.target == Target::Edge).then(|| edge_thread_cpu(a.http)).flatten();
    // An edge up for less time than at the connect: restarted meanwhile (RESTART runs), so its
    // thread counters are another process's; CPU per delivery from them would mix the two.
    let uptime_after = (a.target == Target::Edge).then(|| edge_uptime_s(a.http)).flatten();
    if let (Some(was), Some(now)) = (uptime_connected, uptime_after)
        && now < was
    {
        eprintln!(
            "loadgen: the edge at {} restarted during the run: its CPU per delivery per thread is not reported",
            a.http
        );
        threads_after = None;
    }
    let stop = Stop {
        published: outcome.published.clone(),
        holes: outcome.holes.clone(),
        tail_holes: outcome.tail_holes.clone(),
    };
    let line = serde_json::to_string(&stop)?;
    for (i, p) in sup.procs.iter_mut().enumerate() {
        // A dead worker's pipe is closed; it is reported already.
        if let Err(e) = writeln!(p.stdin, "{line}").and_then(|()| p.stdin.flush())
            && !sup.died.iter().any(|d| d.id == i)
        {
            eprintln!("loadgen: cannot stop worker {i}: {e}");
        }
    }
    let run_secs = start.elapsed().as_secs_f64();
    // A worker takes up to ~63 s to its final report (60 s for the last gifts, 3 s of closes),
    // longer on a saturated box, and reports its progress each second meanwhile: one that says
    // nothing for WORKER_SILENT_AFTER is stuck, and one not done in WORKER_FINAL_WITHIN is
    // given up; either is killed and reported as dead.
    let deadline = Instant::now() + WORKER_FINAL_WITHIN;
    while sup.running() > 0 && Instant::now() < deadline {
        match rx.recv_timeout(Duration::from_millis(200)) {
            Ok(m) => sup.on(m),
            Err(mpsc::RecvTimeoutError::Timeout) => {}
            Err(mpsc::RecvTimeoutError::Disconnected) => break,
        }
        sup.kill_the_silent(
            WORKER_SILENT_AFTER,
            &format!("said nothing for {} s (checked from the stop on)", WORKER_SILENT_AFTER.as_secs()),
        );
    }
    sup.kill_the_silent(
        Duration::ZERO,
        &format!("sent no final report within {} s of the stop", WORKER_FINAL_WITHIN.as_secs()),
    );
    anyhow::ensure!(!sup.finals.iter().all(Option::is_none), "no worker sent its final figures: there are no results");
    let finals: Vec<Final> = sup.finals.iter_mut().filter_map(Option::take).collect();
    let died = std::mem::take(&mut sup.died);
    // Reaps them all (they exit after their final report).
    drop(sup);

    // 4. Merge and report.
    let mut hists: Vec<Histogram<u64>> = KINDS.iter().map(|_| histogram()).collect();
    let mut hists_fast: Vec<Histogram<u64>> = KINDS.iter().map(|_| histogram()).collect();
    let mut hists_slow: Vec<Histogram<u64>> = KINDS.iter().map(|_| histogram()).collect();
    let mut connect_hist = histogram();
    let mut reconnect_hist = histogram();
    let mut reconnect_attempts_failed_by: std::collections::BTreeMap<String, u64> = std::collections::BTreeMap::new();
    let (mut reconnects, mut reconnect_failed, mut resumed, mut move_answers_read_late) = (0u64, 0u64, 0u64, 0u64);
    let mut closes_by_code: std::collections::BTreeMap<String, u64> = std::collections::BTreeMap::new();
    let mut sockets_lost: std::collections::BTreeMap<String, u64> = std::collections::BTreeMap::new();
    let mut failed_by_reason: std::collections::BTreeMap<String, u64> = std::collections::BTreeMap::new();
    let mut lost = [0u64; 2];
    let mut fast_lost = [0u64; 2];
    let mut slow = 0u64;
    let (mut corrupt, mut partial) = (0u64, 0u64);
    let mut dup = [0u64; 2];
    let mut received = [0u64; 2];
    let mut not_owed = [0u64; 2];
    let mut fresh_starts = 0u64;
    let mut foreign = 0u64;
    let (mut deliveries, mut frames, mut bytes, mut connected, mut failed, mut closed, mut gen_cpu) =
        (0u64, 0u64, 0u64, 0u64, 0u64, 0u64, worker::own_cpu_s());
    let mut compressed_frames = 0u64;
    let (mut gaps, mut gap_seqs, mut resets) = (0u64, 0u64, 0u64);
    let (mut open_at_end, mut moving_at_end, mut reconnecting_at_end) = (0u64, 0u64, 0u64);
    let (mut closed_by_generator_at_end, mut close_unanswered_at_end) = (0u64, 0u64);
    for f in &finals {
        for k in 0..KINDS.len() {
            let (fast, slow) = (decode_hist(&f.hist[k])?, decode_hist(&f.hist_slow[k])?);
            merge(&mut hists[k], &fast);
            merge(&mut hists[k], &slow);
            merge(&mut hists_fast[k], &fast);
            merge(&mut hists_slow[k], &slow);
            lost[k] += f.lost[k];
            fast_lost[k] += f.fast_lost[k];
            dup[k] += f.dup[k];
            received[k] += f.received[k];
            not_owed[k] += f.not_owed.get(k).copied().unwrap_or(0);
        }
        fresh_starts += f.fresh_starts;
        foreign += f.foreign;
        merge(&mut connect_hist, &decode_hist(&f.connect_hist)?);
        merge(&mut reconnect_hist, &decode_hist(&f.reconnect_hist)?);
        reconnects += f.reconnects;
        for (reason, n) in &f.reconnect_attempts_failed_by {
            *reconnect_attempts_failed_by.entry(reason.clone()).or_default() += n;
        }
        resumed += f.resumed;
        move_answers_read_late += f.move_answers_read_late;
        reconnect_failed += f.reconnect_failed;
        slow += f.slow;
        corrupt += f.corrupt;
        partial += f.partial;
        deliveries += f.deliveries;
        frames += f.frames;
        compressed_frames += f.compressed_frames;
        (gaps, gap_seqs, resets) = (gaps + f.gaps, gap_seqs + f.gap_seqs, resets + f.resets);
        bytes += f.bytes;
        connected += f.connected;
        failed += f.failed;
        closed += f.closed;
        open_at_end += f.open_at_end;
        moving_at_end += f.moving_at_end;
        reconnecting_at_end += f.reconnecting_at_end;
        closed_by_generator_at_end += f.closed_by_generator_at_end;
        close_unanswered_at_end += f.close_unanswered_at_end;
        for (reason, n) in &f.failed_by {
            *failed_by_reason.entry(reason.clone()).or_default() += n;
        }
        for (code, n) in &f.close_codes {
            let k = if *code == 0 { "none".to_owned() } else { code.to_string() };
            *closes_by_code.entry(k).or_default() += n;
        }
        for (how, n) in &f.sockets_lost {
            *sockets_lost.entry(how.clone()).or_default() += n;
        }
        gen_cpu += f.cpu_s;
    }
    let measured_deliveries = deliveries.saturating_sub(deliveries_before);
    // What the run did not do that it was asked to, if anything: in the results, in the
    // summary, and as the error it exits with once they are written.
    let mut run_errors = Vec::new();
    // A run that lost workers wrote what it measured, and says it is not whole.
    if !died.is_empty() {
        run_errors.push(format!(
            "{} of {n_workers} workers died ({})",
            died.len(),
            died.iter().map(|d| format!("worker {}: {}", d.id, d.status)).collect::<Vec<_>>().join(", ")
        ));
    }
    // A run none of whose members connected measured nothing (it exited 0 with every connect
    // refused); one some of whose members never connected measured fewer than it was asked
    // to (it exited 0 too), unless the user accepted that (--allow-connect-failures).
    let allowed = a.allow_connect_failures.of(a.connections as u64);
    if let Some(why) = nothing_connected(connected, &failed_by_reason) {
        run_errors.push(why);
    } else if let Some(why) =
        connect_failures_beyond(failed, a.connections as u64, &failed_by_reason, a.allow_connect_failures)
    {
        run_errors.push(why);
    } else if failed > 0 {
        println!(
            "{failed} of {} members never connected ({}): accepted, within --allow-connect-failures {} ({allowed})",
            a.connections,
            by_reason(&failed_by_reason),
            a.allow_connect_failures
        );
    }
    // So does a run whose members did not last (an edge that died and never came back): its
    // figures describe fewer members than it says it held.
    let end_counts =
        EndCounts { connected, open: open_at_end, moving: moving_at_end, reconnecting: reconnecting_at_end };
    if let Some(why) = end_counts.not_connected(reconnect_failed, closed, a.move_give_up) {
        run_errors.push(why);
    }
    // And one whose publishes were refused for good (a 401 for a missing key, a --http that is
    // not the edge's): its members "lost" what was never published.
    let for_good = publish::refused_for_good(&outcome.refused);
    if !for_good.is_empty() {
        run_errors.push(format!(
            "publishes refused for good ({}: not retried, given up; see publish_refused_by_status){}",
            for_good.join(", "),
            publish::key_hint(&for_good, key.as_ref())
        ));
    }
    // Gifts are must-deliver: a run that measured one lost broke the promise it measures, and
    // exited 0 (a 10^6 restart lost 130,950 deliveries and said so only in its figures).
    let gift = KINDS.iter().position(|k| *k == "gift").unwrap_or(0);
    if lost[gift] > 0 {
        run_errors.push(format!(
            "{} gift deliveries lost (must-deliver: none may be; members given up, if any, are told above)",
            lost[gift]
        ));
    }
    // A gift given up was never acknowledged, so no member was owed it and it is not "lost";
    // but the run did not deliver what it was asked to (a trial's run whose --http pointed at
    // nothing exited 0, "did what it was asked", with every gift given up).
    if outcome.gave_up[gift] > 0 {
        run_errors.push(format!(
            "gifts given up unacknowledged: {} (the publish endpoint did not take them in time; see publish_refused_by_status)",
            outcome.gave_up[gift]
        ));
    }
    // A publisher that stopped early says why (a run with nobody connected has said so above).
    if outcome.stopped_early.is_some()
        && let Some(why) = &stopped_early
    {
        run_errors.push(format!("the run stopped early: {why}"));
    }
    let deflate = if a.deflate { "+deflate" } else { "" };
    let r = report::Report {
        scenario: a.scenario.clone(),
        target: a.target,
        connections: connected,
        failed_connections: failed,
        failed_by_reason,
        workers_died: died.clone(),
        closed_during_run: closed,
        members_open_at_end: open_at_end,
        members_moving_at_end: moving_at_end,
        members_reconnecting_at_end: reconnecting_at_end,
        closed_by_generator_at_end,
        close_unanswered_at_end,
        closes_by_code,
        sockets_lost_by_reason: sockets_lost,
        rooms: a.rooms,
        dist: format!("{:?}", a.dist).to_lowercase(),
        encoding: if a.sse {
            "sse".to_owned()
        } else if a.json {
            format!("json{deflate}")
        } else {
            format!("rkyv{deflate}")
        },
        workers: n_workers,
        connect_s,
        connect_deadline_s: deadline_s,
        connect_per_s: connected as f64 / connect_s.max(1e-3),
        publish_secs: pub_secs,
        published: KINDS.iter().enumerate().map(|(k, name)| ((*name).to_owned(), outcome.total(k))).collect(),
        publish_refused: outcome.refused_total(),
        publish_offered: KINDS.iter().enumerate().map(|(k, n)| ((*n).to_owned(), outcome.offered[k])).collect(),
        publish_offered_per_s: KINDS
            .iter()
            .enumerate()
            .map(|(k, n)| ((*n).to_owned(), outcome.offered[k] as f64 / pub_secs.max(1e-3)))
            .collect(),
        publish_refused_by_status: outcome.refused.clone(),
        publish_not_accepted: KINDS
            .iter()
            .enumerate()
            .map(|(k, n)| ((*n).to_owned(), outcome.not_accepted[k]))
            .collect(),
        publish_gave_up: KINDS.iter().enumerate().map(|(k, n)| ((*n).to_owned(), outcome.gave_up[k])).collect(),
        publish_ack_ms: KINDS
            .iter()
            .enumerate()
            .map(|(k, n)| ((*n).to_owned(), report::Percentiles::of(&outcome.ack[k])))
            .collect(),
        publish_streams: KINDS
            .iter()
            .zip([a.gift_streams, a.chat_streams])
            .map(|(n, s)| ((*n).to_owned(), s))
            .collect(),
        deliveries,
        deliveries_per_s: measured_deliveries as f64 / pub_secs,
        frames,
        compressed_frames,
        bytes,
        received: KINDS.iter().enumerate().map(|(k, n)| ((*n).to_owned(), received[k])).collect(),
        lost: KINDS.iter().enumerate().map(|(k, n)| ((*n).to_owned(), lost[k])).collect(),
        lost_fast_readers: KINDS.iter().enumerate().map(|(k, n)| ((*n).to_owned(), fast_lost[k])).collect(),
        slow_readers: slow,
        corrupt_streams: corrupt,
        partial_frames_at_end: partial,
        duplicates: KINDS.iter().enumerate().map(|(k, n)| ((*n).to_owned(), dup[k])).collect(),
        fresh_starts,
        foreign_messages: foreign,
        not_owed: KINDS.iter().enumerate().map(|(k, n)| ((*n).to_owned(), not_owed[k])).collect(),
        gaps_and_resets: [("gap".to_owned(), gaps), ("reset".to_owned(), resets)].into_iter().collect(),
        gap_seqs,
        latency_ms: KINDS
            .iter()
            .enumerate()
            .map(|(k, n)| ((*n).to_owned(), report::Percentiles::of(&hists[k])))
            .collect(),
        latency_fast_readers_ms: KINDS
            .iter()
            .enumerate()
            .map(|(k, n)| ((*n).to_owned(), report::Percentiles::of(&hists_fast[k])))
            .collect(),
        latency_slow_readers_ms: KINDS
            .iter()
            .enumerate()
            .map(|(k, n)| ((*n).to_owned(), report::Percentiles::of(&hists_slow[k])))
            .collect(),
        handshake_ms: report::Percentiles::of(&connect_hist),
        connect_inflight: if a.tls_ca.is_some() { 1 } else { a.connect_inflight },
        connect_inflight_peak: finals.iter().map(|f| f.connect_inflight_peak).max().unwrap_or(0),
        move_inflight_peak: finals.iter().map(|f| f.move_inflight_peak).max().unwrap_or(0),
        reconnects,
        reconnect_failed,
        reconnect_attempts_failed_by_reason: reconnect_attempts_failed_by,
        resumed_after_close: resumed,
        move_answers_read_late,
        reconnect_ms: report::Percentiles::of(&reconnect_hist),
        server: report::ServerFigures::new(
            server_before,
            server_connected,
            server_after,
            connected,
            measured_deliveries,
        )
        .with_threads(threads_connected.as_ref(), threads_after.as_ref(), measured_deliveries),
        generator_cpu_s: gen_cpu - gen_cpu_before.min(gen_cpu),
        generator_max_worker_core_share: finals.iter().map(|f| f.cpu_s / run_secs).fold(0.0, f64::max),
        samples,
        note: a.note.clone(),
        args: format!("{a:?}"),
        publish_api_key: key.as_ref().map(|k| k.source().to_owned()),
        connect_failures_allowed: allowed,
        stopped_early,
        run_errors,
    };
    report::write(&dir, &r)?;
    println!("{}", serde_json::to_string_pretty(&r.summary_json())?);
    println!("results in {}", dir.display());
    anyhow::ensure!(r.run_errors.is_empty(), "{}; results in {}", r.run_errors.join("; "), dir.display());
    Ok(())
}

/// `reason: count, ...`, or `none`.
fn by_reason(by: &std::collections::BTreeMap<String, u64>) -> String {
    if by.is_empty() {
        return "none".to_owned();
    }
    by.iter().map(|(k, v)| format!("{k}: {v}")).collect::<Vec<_>>().join(", ")
}

/// Why a run failed when more of the `asked` members' first connects failed (`failed`, by
/// reason) than `allow` (`--allow-connect-failures`) accepts, or None. Each failed first connect
/// is a member never established: first connects are not retried.
fn connect_failures_beyond(
    failed: u64,
    asked: u64,
    by: &std::collections::BTreeMap<String, u64>,
    allow: Allowance,
) -> Option<String> {
    let allowed = allow.of(asked);
    (failed > allowed).then(|| {
        let limit = if allow == Allowance::Members(0) {
            "a run fails when any does, unless --allow-connect-failures (N, or P%) accepts some".to_owned()
        } else {
            format!("more than the {allowed} that --allow-connect-failures {allow} accepts")
        };
        format!("{failed} of {asked} members never connected (first connects failed: {}); {limit}", by_reason(by))
    })
}

/// Why a run failed when none of its members connected (every attempt failed: by reason), or
/// None.
fn nothing_connected(connected: u64, failed_by_reason: &std::collections::BTreeMap<String, u64>) -> Option<String> {
    let failed: u64 = failed_by_reason.values().sum();
    (connected == 0 && failed > 0).then(|| {
        format!(
            "no member connected ({failed} failed: {})",
            failed_by_reason.iter().map(|(k, v)| format!("{k}: {v}")).collect::<Vec<_>>().join(", ")
        )
    })
}

/// The members at a run's end: of those that `connected`, the ones `open`, `moving` (without a
/// socket for less than 10 s: on their way back) and `reconnecting` (without one for longer).
struct EndCounts {
    connected: u64,
    open: u64,
    moving: u64,
    reconnecting: u64,
}

impl EndCounts {
    /// Why the run failed when members were down at its end (neither open nor on their way),
    /// or None: how many were still reconnecting (an edge that never came back leaves every
    /// member retrying), how many moves were given up (`gave_up`), and how many were closed
    /// and not followed (`closed` counts those and the given up: `--no-follow-goaway`, a close
    /// code a client does not come back from, or a target whose members do not follow).
    /// `give_up_s`: the run's `--move-give-up` (0: moves are never given up).
    fn not_connected(&self, gave_up: u64, closed: u64, give_up_s: f64) -> Option<String> {
        let down = self.connected.saturating_sub(self.open + self.moving);
        let after =
            if give_up_s > 0.0 { format!("after {give_up_s} s") } else { "(never: --move-give-up 0)".to_owned() };
        (down > 0).then(|| {
            format!(
                "{down} of {} members were not connected at the end ({} still reconnecting 10 s or more after \
                 losing their socket, {gave_up} moves given up {after}, {} closed and not followed)",
                self.connected,
                self.reconnecting,
                closed.saturating_sub(gave_up)
            )
        })
    }
}

/// Each worker's source addresses, no two workers sharing one (see `--src-net`).
fn source_addrs(net: &str, workers: usize, per: u8) -> anyhow::Result<Vec<Vec<std::net::Ipv4Addr>>> {
    use std::net::Ipv4Addr;
    let parts: Vec<u8> =
        net.split('.').map(str::parse).collect::<Result<_, _>>().context("--src-net: 127, or three octets A.B.C")?;
    let per = usize::from(per.max(1));
    match parts[..] {
        [127] => {
            anyhow::ensure!(workers <= 254, "--src-net 127: at most 254 workers (127.1 .. 127.254), not {workers}");
            anyhow::ensure!(per <= 253, "--src-addrs: at most 253 per worker");
            Ok((0..workers)
                .map(|w| (0..per).map(|j| Ipv4Addr::new(127, (w + 1) as u8, 0, (2 + j) as u8)).collect())
                .collect())
        }
        [a, b, c] => {
            anyhow::ensure!(
                2 + workers * per <= 255,
                "--src-net {net}: {workers} workers x {per} addresses do not fit in one /24 without sharing \
                 (at most 253 addresses): lower --src-addrs or --workers"
            );
            Ok((0..workers)
                .map(|w| (0..per).map(|j| Ipv4Addr::new(a, b, c, (2 + w * per + j) as u8)).collect())
                .collect())
        }
        _ => anyhow::bail!("--src-net: 127 (loopback, 127.0.0.0/8), or three octets A.B.C"),
    }
}

#[cfg(test)]
mod tests {
    use super::source_addrs;

    /// Rates and times that cannot be honoured are refused by the parser, with the flag named,
    /// instead of panicking the run (NaN, a duration past what an `Instant` holds) or killing its
    /// workers (inf, which JSON carries as null).
    #[test]
    fn odd_rates_and_times_are_refused_up_front() {
        use clap::Parser;
        let parse = |extra: &[&str]| {
            let mut argv = vec!["loadgen", "run", "--ws", "127.0.0.1:1", "--http", "127.0.0.1:2"];
            argv.extend_from_slice(extra);
            super::Cli::try_parse_from(argv).map(|_| ()).map_err(|e| e.to_string())
        };
        for flag in ["--ramp", "--gift-rate", "--chat-rate", "--gift-give-up", "--move-give-up", "--connect-deadline"] {
            for bad in ["NaN", "inf", "-1"] {
                let e = parse(&[&format!("{flag}={bad}")]).expect_err(&format!("{flag}={bad} refused"));
                assert!(e.contains(flag), "{flag}={bad}: {e}");
            }
            if flag == "--connect-deadline" {
                // No time at all for the connect phase is refused (see positive_seconds).
                let e = parse(&[flag, "0"]).expect_err("--connect-deadline 0 refused");
                assert!(e.contains("--connect-deadline") && e.contains("above 0"), "{e}");
            } else {
                parse(&[flag, "0"]).unwrap_or_else(|e| panic!("{flag} 0 is taken: {e}"));
            }
            parse(&[flag, "2.5"]).unwrap_or_else(|e| panic!("{flag} 2.5 is taken: {e}"));
            // A negative number written apart from its flag is the flag's value (and refused
            // by the flag's parser), not an unknown flag.
            let e = parse(&[flag, "-1"]).expect_err(&format!("{flag} -1 refused"));
            assert!(e.contains(&format!("invalid value '-1' for '{flag} <")), "{flag} -1: {e}");
        }
        assert!(parse(&["--duration", "18446744073709551615"]).is_err());
        parse(&["--duration", "31536000"]).expect("a year is taken");
        // pubbench's seconds likewise (a Duration from NaN, inf or 1e20 s panics).
        let pubbench = |extra: &[&str]| {
            let mut argv = vec!["loadgen", "pubbench", "--http", "127.0.0.1:2"];
            argv.extend_from_slice(extra);
            super::Cli::try_parse_from(argv).map(|_| ()).map_err(|e| e.to_string())
        };
        for flag in ["--duration", "--warmup"] {
            for bad in ["NaN", "inf", "-1", "1e20"] {
                let e = pubbench(&[&format!("{flag}={bad}")]).expect_err(&format!("pubbench {flag}={bad} refused"));
                assert!(e.contains(flag), "{flag}={bad}: {e}");
            }
            pubbench(&[flag, "2.5"]).unwrap_or_else(|e| panic!("pubbench {flag} 2.5 is taken: {e}"));
        }
    }

    /// A run ends in error when members were down at its end, saying how many and why; one
    /// whose members all came back (an edge restarted under them) does not.
    #[test]
    fn members_down_at_the_end_fail_the_run() {
        let end = |open, moving, reconnecting| super::EndCounts { connected: 1000, open, moving, reconnecting };
        assert_eq!(end(1000, 0, 0).not_connected(0, 0, 120.0), None);
        // Members closed a moment ago (an edge closing idle members every second) are on their way.
        assert_eq!(end(990, 10, 0).not_connected(0, 0, 120.0), None);
        let why = end(0, 0, 1000).not_connected(0, 0, 120.0).expect("an edge that died");
        assert!(
            why.starts_with("1000 of 1000 members were not connected at the end (1000 still reconnecting"),
            "{why}"
        );
        let why = end(993, 2, 1).not_connected(2, 4, 120.0).unwrap();
        assert_eq!(
            why,
            "5 of 1000 members were not connected at the end (1 still reconnecting 10 s or more after losing their \
             socket, 2 moves given up after 120 s, 2 closed and not followed)"
        );
        // The give-up named is the run's (`--move-give-up`), not a constant.
        let why = end(993, 2, 1).not_connected(2, 4, 2.5).unwrap();
        assert!(why.contains(", 2 moves given up after 2.5 s, "), "{why}");
        let why = end(0, 0, 1000).not_connected(0, 0, 0.0).unwrap();
        assert!(why.contains(", 0 moves given up (never: --move-give-up 0), "), "{why}");
    }

    /// A run none of whose members connected fails, naming why they did not; one with any
    /// member in does not on this count.
    #[test]
    fn a_run_with_no_member_connected_fails() {
        let by: std::collections::BTreeMap<String, u64> =
            [("refused".to_owned(), 1990), ("timeout".to_owned(), 10)].into_iter().collect();
        assert_eq!(
            super::nothing_connected(0, &by).as_deref(),
            Some("no member connected (2000 failed: refused: 1990, timeout: 10)")
        );
        assert_eq!(super::nothing_connected(1, &by), None);
        assert_eq!(super::nothing_connected(0, &std::collections::BTreeMap::new()), None);
    }

    /// `--gift-give-up 0` is "never", as `--move-give-up 0` is (it silently meant 1 s); any
    /// other time up to a year is taken as given, not clamped to [1 s, 1 day]; what no time can
    /// be is refused naming the flag.
    #[test]
    fn gift_give_up_zero_is_never_and_other_times_are_as_given() {
        use clap::Parser;
        let give_up = |v: &str| -> Result<Option<std::time::Duration>, String> {
            let flag = format!("--gift-give-up={v}");
            let argv = ["loadgen", "run", "--ws", "127.0.0.1:1", "--http", "127.0.0.1:2", &flag];
            match super::Cli::try_parse_from(argv).map_err(|e| e.to_string())?.cmd {
                super::Cmd::Run(a) => Ok(a.gift_give_up()),
                _ => unreachable!(),
            }
        };
        assert_eq!(give_up("0"), Ok(None));
        assert_eq!(give_up("0.25"), Ok(Some(std::time::Duration::from_millis(250))));
        assert_eq!(give_up("100000"), Ok(Some(std::time::Duration::from_secs(100_000))));
        for bad in ["-1", "NaN", "1e20"] {
            let e = give_up(bad).expect_err(bad);
            assert!(e.contains("--gift-give-up"), "{e}");
        }
    }

    /// The connect phase's default deadline is twice the ramp's time plus 30 s; an unpaced run
    /// (`--ramp 0`) gets a 1,000/s ramp's, not connections / 0 (10^9 s once clamped); a deadline
    /// given is taken as it is.
    #[test]
    fn the_default_connect_deadline_is_finite_even_unpaced() {
        use clap::Parser;
        let deadline = |extra: &[&str]| {
            let mut argv = vec!["loadgen", "run", "--ws", "127.0.0.1:1", "--http", "127.0.0.1:2"];
            argv.extend_from_slice(extra);
            match super::Cli::try_parse_from(argv).expect("parses").cmd {
                super::Cmd::Run(a) => a.connect_deadline_s(),
                _ => unreachable!(),
            }
        };
        let near = |a: f64, b: f64| (a - b).abs() < 1e-9;
        assert!(near(deadline(&["--connections", "10000", "--ramp", "1000"]), 50.0));
        assert!(near(deadline(&["--connections", "1000000", "--ramp", "0"]), 2030.0));
        assert!(near(deadline(&["--connections", "20", "--ramp", "0"]), 30.04));
        assert!(near(deadline(&["--ramp", "0", "--connect-deadline", "7.5"]), 7.5));
        // A ramp so slow that its time overflows is held to a year, as every time here.
        assert_eq!(deadline(&["--ramp", "1e-300"]), super::MAX_DURATION_S as f64);
    }

    /// `--allow-connect-failures` takes a number of members or a percentage of --connections;
    /// by default none may fail.
    #[test]
    fn connect_failures_allowed_are_a_number_or_a_share() {
        use super::Allowance;
        assert_eq!(Allowance::parse("0"), Ok(Allowance::Members(0)));
        assert_eq!(Allowance::parse("25"), Ok(Allowance::Members(25)));
        assert_eq!(Allowance::parse("0.5%"), Ok(Allowance::Percent(0.5)));
        assert_eq!(Allowance::Percent(0.5).of(1_000_000), 5000);
        assert_eq!(Allowance::Percent(50.0).of(21), 10, "rounded down");
        assert_eq!(Allowance::Percent(1.0).of(30), 0);
        assert_eq!(Allowance::Members(7).of(3), 7);
        for bad in ["-1", "x", "101%", "-1%", "NaN%", "1.5"] {
            assert!(Allowance::parse(bad).is_err(), "{bad}");
        }
        use clap::Parser;
        let argv = ["loadgen", "run", "--ws", "127.0.0.1:1", "--http", "127.0.0.1:2", "--allow-connect-failures", "2x"];
        let e = super::Cli::try_parse_from(argv).map(|_| ()).unwrap_err().to_string();
        assert!(e.contains("--allow-connect-failures"), "{e}");
    }

    /// Some members never connected: the run fails saying how many and why, unless the
    /// allowance covers them; the allowance named is the run's.
    #[test]
    fn members_that_never_connected_fail_the_run_unless_allowed() {
        use super::{Allowance, connect_failures_beyond};
        let by: std::collections::BTreeMap<String, u64> =
            [("refused".to_owned(), 10), ("http_503".to_owned(), 2)].into_iter().collect();
        assert_eq!(
            connect_failures_beyond(12, 40, &by, Allowance::Members(0)).as_deref(),
            Some(
                "12 of 40 members never connected (first connects failed: http_503: 2, refused: 10); a run fails \
                 when any does, unless --allow-connect-failures (N, or P%) accepts some"
            )
        );
        assert_eq!(
            connect_failures_beyond(12, 40, &by, Allowance::Percent(25.0)).as_deref(),
            Some(
                "12 of 40 members never connected (first connects failed: http_503: 2, refused: 10); more than \
                 the 10 that --allow-connect-failures 25% accepts"
            )
        );
        assert_eq!(connect_failures_beyond(12, 40, &by, Allowance::Members(12)), None);
        assert_eq!(connect_failures_beyond(12, 40, &by, Allowance::Percent(30.0)), None);
        assert_eq!(connect_failures_beyond(0, 40, &std::collections::BTreeMap::new(), Allowance::Members(0)), None);
    }

    /// `--connections 0` is refused naming the flag: it ran no member, published to nobody for
    /// its whole --duration, and exited 0.
    #[test]
    fn a_run_of_no_members_is_refused_up_front() {
        use clap::Parser;
        let argv = ["loadgen", "run", "--ws", "127.0.0.1:1", "--http", "127.0.0.1:2", "--connections", "0"];
        let e = super::Cli::try_parse_from(argv).map(|_| ()).unwrap_err().to_string();
        assert!(e.contains("--connections") && e.contains("at least 1"), "{e}");
    }

    /// The connect phase's first line waits for every living worker's first report (at the
    /// coordinator's first second, none had come: 0/s), and each next one for a report of every
    /// worker since; a silent worker holds a line back for at most 3 s. The rate is over the
    /// time since the last line.
    #[test]
    fn connect_lines_wait_for_the_workers_reports() {
        use super::ConnectLines;
        use std::time::Duration;
        let t0 = std::time::Instant::now();
        let at = |ms: u64| t0 + Duration::from_millis(ms);
        let mut lines = ConnectLines::new(t0, 2);
        assert_eq!(lines.due(at(500), &[Some(0), Some(0)], 0), None, "under a second");
        assert_eq!(lines.due(at(1000), &[Some(0), Some(0)], 0), None, "no report yet: no 0/s line");
        assert_eq!(lines.due(at(1010), &[Some(1), Some(0)], 400), None, "one of two reported");
        assert_eq!(lines.due(at(1020), &[Some(1), Some(1)], 1020), Some(1000.0));
        assert_eq!(lines.due(at(2020), &[Some(1), Some(1)], 1020), None, "no new report");
        assert_eq!(lines.due(at(2040), &[Some(2), Some(2)], 3060), Some(2000.0));
        // A dead worker (None) is not waited for; a silent one for 3 s at most.
        assert_eq!(lines.due(at(3050), &[None, Some(3)], 4000), Some(940.0 / 1.01));
        assert_eq!(lines.due(at(5000), &[Some(3), Some(3)], 4000), None);
        assert_eq!(lines.due(at(6050), &[Some(3), Some(3)], 4300), Some(100.0));
    }

    /// Each line a worker writes to its stderr comes out whole, prefixed with the worker, in
    /// one write (what makes lines from several workers never mix), however its bytes arrive.
    #[test]
    fn worker_lines_are_relayed_whole_and_prefixed() {
        /// Records each write.
        struct Writes(Vec<Vec<u8>>);
        impl std::io::Write for Writes {
            fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
                self.0.push(b.to_vec());
                Ok(b.len())
            }
            fn flush(&mut self) -> std::io::Result<()> {
                Ok(())
            }
        }
        /// Gives its bytes a few at a time.
        struct Dribble(std::io::Cursor<Vec<u8>>);
        impl std::io::Read for Dribble {
            fn read(&mut self, b: &mut [u8]) -> std::io::Result<usize> {
                let n = b.len().min(3);
                self.0.read(&mut b[..n])
            }
        }
        let text = b"connection 7 failed (refused): Connection refused (os error 111)\n\nError: last\xff words";
        let mut out = Writes(Vec::new());
        let from = std::io::BufReader::with_capacity(4, Dribble(std::io::Cursor::new(text.to_vec())));
        super::relay_lines(3, from, &mut out);
        let writes: Vec<String> = out.0.iter().map(|w| String::from_utf8_lossy(w).into_owned()).collect();
        assert_eq!(
            writes,
            [
                "w3: connection 7 failed (refused): Connection refused (os error 111)\n",
                "w3: \n",
                "w3: Error: last\u{fffd} words\n"
            ]
        );
    }

    /// No two workers share a source address, on loopback's /8 as in a /24; what does not fit
    /// is refused rather than wrapped around onto another worker's addresses.
    #[test]
    fn source_addresses_never_overlap() {
        let all = source_addrs("127", 67, 48).unwrap();
        let flat: Vec<_> = all.iter().flatten().collect();
        let set: std::collections::HashSet<_> = flat.iter().collect();
        assert_eq!(set.len(), 67 * 48);
        assert_eq!(all[0][0], std::net::Ipv4Addr::new(127, 1, 0, 2));
        assert_eq!(all[66][47], std::net::Ipv4Addr::new(127, 67, 0, 49));
        let net = source_addrs("10.77.0", 3, 16).unwrap();
        assert_eq!(net[2][15], std::net::Ipv4Addr::new(10, 77, 0, 49));
        assert_eq!(net.iter().flatten().collect::<std::collections::HashSet<_>>().len(), 48);
        assert!(source_addrs("10.77.0", 67, 48).is_err(), "67 x 48 cannot fit in a /24");
        assert!(source_addrs("127", 255, 1).is_err());
        assert!(source_addrs("127.0", 1, 1).is_err());
    }
}
