//! Publishing at fixed rates per room and kind, over HTTP (keep-alive, `reqwest` blocking).
//!
//! Each kind is published by `streams` threads of its own (one by default), each paced at its
//! share of the kind's rate and sending one request at a time, so a slow acknowledgement (a gift
//! held until it is fsynced) delays only its own stream, not the other kind nor the other
//! streams. Each body carries its send time, its stream, a per-(room, kind, stream) counter and
//! the run's id ([`run_id`]): `{"t":..,"k":..,"s":..,"r":..,"kind":..}`. Members count only
//! their own run's messages: two runs on the same rooms each counted the other's as losses and
//! duplicates. Within a stream the next message is sent only once the
//! previous one is acknowledged, so `k` follows the room's seq order per stream and receivers
//! check order and loss per stream; across streams the order is not defined.
//!
//! An edge with publish keys wants `Authorization: Bearer KEY` on every publish: the key comes
//! from `ROOMCAST_API_KEY` or `--api-key-file` ([`ApiKey`]), never from the command line (which
//! `ps` shows to every user), and is never printed. A stream whose attempts fail (the edge
//! unreachable) says so on stderr at most once per [`DIGEST_EVERY`] ([`ErrorDigest`]): an
//! outage of 30 s printed ~600 lines per gift stream.
//!
//! A run whose publishes cannot succeed stops early: when every answer a stream got for
//! [`HOPELESS_AFTER`] was a refusal for good (a 401 for a missing key, a `--http` that is not
//! the edge's: see [`is_for_good`]), the publisher stops every stream and says why
//! ([`Outcome::stopped_early`]); a 60 s run refused 401 published (and was refused) for all
//! 60 s. Transient failures (no answer, 429, 503: an edge restarting under a restart
//! benchmark) never stop it.

use std::collections::BTreeMap;
use std::ffi::OsString;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;

use crate::stats::{Pacer, histogram};
use crate::worker::Target;

/// What the stream threads did, merged.
pub struct Outcome {
    /// Messages accepted, per room, kind and stream (the next `k`).
    pub published: Vec<Vec<Vec<u64>>>,
    /// Of the `k`s below `published`, those never accepted, per room, kind and stream: a
    /// batched stream numbers its messages before the edge answers for them, and a droppable
    /// message sent alone that got no answer keeps its number (it may have gone through).
    pub holes: Vec<Vec<Vec<u64>>>,
    /// Of those holes, the ones after the last message accepted, per room, kind and stream:
    /// no member can receive them, so a worker waiting at the end for each stream's last
    /// message waits for the one before them (it waited its full 60 s for a gift given up).
    pub tail_holes: Vec<Vec<Vec<u64>>>,
    /// Messages attempted (accepted, dropped by the server, or given up), per kind.
    pub offered: Vec<u64>,
    /// Refusals (every answer that was not an acceptance, retries included), by "kind status".
    pub refused: BTreeMap<String, u64>,
    /// Messages never accepted, per kind: droppables the server dropped (429/503/202) or that
    /// got no answer (not retried), and must-deliver messages given up after `--gift-give-up`
    /// (or a short grace past the publishing's end, [`GIFT_GRACE_PAST_END`]) or on an answer not
    /// worth retrying. Receivers do not expect them (they take no `k`, or leave a hole).
    pub not_accepted: Vec<u64>,
    /// Must-deliver messages given up (a subset of `not_accepted`), per kind.
    pub gave_up: Vec<u64>,
    /// Send-to-acknowledgement latency of accepted messages (µs), per kind, first attempt to
    /// acceptance (retries included).
    pub ack: Vec<Histogram<u64>>,
    /// Why the publisher stopped before the run's end (every answer a stream got for
    /// [`HOPELESS_AFTER`] was a refusal for good), or None.
    pub stopped_early: Option<String>,
}

impl Outcome {
    /// Nothing published: `rooms` rooms, `kinds` kinds, up to `streams` streams per kind.
    pub fn empty(rooms: u32, kinds: usize, streams: usize) -> Self {
        let (rooms, streams) = (rooms.max(1) as usize, streams.max(1));
        Self {
            published: vec![vec![vec![0; streams]; kinds]; rooms],
            holes: vec![vec![vec![0; streams]; kinds]; rooms],
            tail_holes: vec![vec![vec![0; streams]; kinds]; rooms],
            offered: vec![0; kinds],
            refused: BTreeMap::new(),
            not_accepted: vec![0; kinds],
            gave_up: vec![0; kinds],
            ack: (0..kinds).map(|_| histogram()).collect(),
            stopped_early: None,
        }
    }

    /// Messages of `kind` accepted, all rooms and streams.
    pub fn total(&self, kind: usize) -> u64 {
        let numbered: u64 = self.published.iter().map(|r| r[kind].iter().sum::<u64>()).sum();
        let holes: u64 = self.holes.iter().map(|r| r[kind].iter().sum::<u64>()).sum();
        numbered - holes
    }

    /// Refusals, all kinds and statuses.
    pub fn refused_total(&self) -> u64 {
        self.refused.values().sum()
    }
}

struct Shared {
    outcome: Mutex<Outcome>,
    /// Set by the first stream that fails (`error`) or finds publishing hopeless
    /// (`stopped_early`); the others stop.
    stop: AtomicBool,
    error: Mutex<Option<anyhow::Error>>,
    stopped_early: Mutex<Option<String>>,
}

pub struct Publisher {
    threads: Vec<std::thread::JoinHandle<()>>,
    shared: Arc<Shared>,
}

/// This run's id in every body it publishes (`"r"`), and in its workers' arguments: the time
/// its publishing began, µs (below 2^53, so exact in any JSON reader).
pub fn run_id() -> u64 {
    static ID: std::sync::OnceLock<u64> = std::sync::OnceLock::new();
    *ID.get_or_init(now_us)
}

fn now_us() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_micros() as u64)
}

/// The environment variable holding the publish API key (`Authorization: Bearer KEY`).
pub const API_KEY_ENV: &str = "ROOMCAST_API_KEY";

/// The publish API key sent on every publish, and where it came from. Its `Debug` names the
/// source only: nothing loadgen prints or writes (logs, result.json) carries the key.
pub struct ApiKey {
    /// `Bearer KEY`, marked sensitive (reqwest's `Debug` of it hides the value).
    header: reqwest::header::HeaderValue,
    source: String,
}

impl std::fmt::Debug for ApiKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ApiKey").field("source", &self.source).finish_non_exhaustive()
    }
}

impl ApiKey {
    /// The key from `file` (`--api-key-file`: its first line, trimmed) if given, else from
    /// `env` (the value of [`API_KEY_ENV`]; unset: none). Errors name the source, never the
    /// key: a key is printable ASCII without spaces (what a header carries and the edge's keys
    /// are made of). An empty or blank key is refused, not taken for "no key": a variable set
    /// from a script's empty source (`ROOMCAST_API_KEY=$KEY` with KEY unset) or a file whose
    /// first line is blank is a mistake, which publishing without a key hid behind 401s.
    pub fn load(file: Option<&Path>, env: Option<OsString>) -> anyhow::Result<Option<Self>> {
        let (key, source) = if let Some(path) = file {
            let text = std::fs::read(path).map_err(|e| anyhow::anyhow!("--api-key-file {}: {e}", path.display()))?;
            let text = String::from_utf8(text)
                .map_err(|_| anyhow::anyhow!("--api-key-file {}: not text (UTF-8)", path.display()))?;
            let key = text.lines().next().unwrap_or("").trim().to_owned();
            anyhow::ensure!(
                !key.is_empty(),
                "--api-key-file {}: its first line is empty or blank (the key goes on the first line)",
                path.display()
            );
            (key, format!("--api-key-file {}", path.display()))
        } else {
            let Some(v) = env else { return Ok(None) };
            let v = v.into_string().map_err(|_| anyhow::anyhow!("{API_KEY_ENV}: not text (UTF-8)"))?;
            let key = v.trim().to_owned();
            anyhow::ensure!(
                !key.is_empty(),
                "{API_KEY_ENV} is set but empty or blank: set it to the key, or unset it to publish without one"
            );
            (key, API_KEY_ENV.to_owned())
        };
        if let Some(at) = key.bytes().position(|b| !b.is_ascii_graphic()) {
            anyhow::bail!("{source}: a key is printable ASCII without spaces (character {} is not)", at + 1);
        }
        let mut header = reqwest::header::HeaderValue::from_str(&format!("Bearer {key}"))
            .map_err(|_| anyhow::anyhow!("{source}: the key does not fit in a header"))?;
        header.set_sensitive(true);
        Ok(Some(Self { header, source }))
    }

    /// Where the key came from (`ROOMCAST_API_KEY`, or `--api-key-file PATH`): what the
    /// results record.
    pub fn source(&self) -> &str {
        &self.source
    }

    /// `Bearer KEY`, for the `Authorization` header (marked sensitive: its `Debug` hides it).
    pub fn header(&self) -> reqwest::header::HeaderValue {
        self.header.clone()
    }
}

/// Where the publish API key comes from, for `run` and `pubbench` alike.
#[derive(clap::Args, Clone, Debug)]
pub struct KeyArgs {
    /// The publish API key (an edge with `[[ingest.keys]]` or `ROOMCAST_API_KEYS` answers 401
    /// without one), sent as `Authorization: Bearer KEY` on every publish: this file's first
    /// line, trimmed. Without the flag, the key is taken from the environment variable
    /// ROOMCAST_API_KEY, if set (set but empty or blank is refused, as is a file whose first
    /// line is). Never on the command line (every user's `ps` shows it), never printed: the
    /// results record where it came from, not the key.
    #[arg(long, value_name = "PATH")]
    pub api_key_file: Option<std::path::PathBuf>,
}

impl KeyArgs {
    /// The key from `--api-key-file`, else from [`API_KEY_ENV`] (see [`ApiKey::load`]), and the
    /// line that says where it came from (to print), if there is a key.
    pub fn load(&self) -> anyhow::Result<Option<(ApiKey, String)>> {
        let env = std::env::var_os(API_KEY_ENV);
        let also = if self.api_key_file.is_some() && env.is_some() {
            format!(" ({API_KEY_ENV} is set too, not used)")
        } else {
            String::new()
        };
        let key = ApiKey::load(self.api_key_file.as_deref(), env)?;
        Ok(key.map(|k| {
            let line = format!("publishing with the API key from {}{also}", k.source());
            (k, line)
        }))
    }
}

/// How long every answer a stream gets must be a refusal for good before the run stops early
/// (see [`RefusalSpell`]).
pub const HOPELESS_AFTER: Duration = Duration::from_secs(3);

/// Whether a refusal (`status`: an HTTP status, [`BAD_ANSWER`], or `error` for no answer) is
/// one that retrying or waiting would not change: an answer that is not the edge's, or a 4xx
/// other than 429 (a missing or wrong key, a kind the edge does not know).
pub fn is_for_good(status: &str) -> bool {
    status == BAD_ANSWER || status.parse::<u16>().is_ok_and(|c| (400..500).contains(&c) && c != 429)
}

/// A stream's spell of answers that were all refusals for good ([`is_for_good`]): it begins at
/// the first such answer after the last acceptance and ends at the next acceptance. Answers that
/// are neither (no answer, 429, 503, a sampled-out 202: an edge restarting, or busy) neither
/// extend nor end it. Once it has lasted [`HOPELESS_AFTER`] with at least two refusals, the
/// stream's publishing is hopeless. Takes time as an argument.
#[derive(Debug, Default)]
pub struct RefusalSpell {
    since: Option<Instant>,
    refusals: u64,
}

impl RefusalSpell {
    /// A message was accepted: publishing works.
    pub fn accepted(&mut self) {
        *self = Self::default();
    }

    /// A refusal for good at `now` (`what`: the answer, as "r3 answered 401"): why publishing
    /// is hopeless, once it is.
    pub fn refused(&mut self, now: Instant, what: &str) -> Option<String> {
        let since = *self.since.get_or_insert(now);
        self.refusals += 1;
        let lasted = now.duration_since(since);
        (lasted >= HOPELESS_AFTER && self.refusals >= 2).then(|| {
            format!(
                "every answer for {:.1} s was a refusal for good ({} refusals, nothing accepted; last: {what})",
                lasted.as_secs_f64(),
                self.refusals
            )
        })
    }
}

/// How long past the publishing's end (`--duration`) a gift still unacknowledged is retried,
/// at most, before it is given up (when `--gift-give-up` would retry it longer): long enough for
/// a blip (an edge's accept queue full for a moment, a restart of a small edge), short enough
/// that a run whose edge is gone ends a few seconds after its duration rather than
/// `--gift-give-up` (30 s by default) after it. `--gift-give-up 0` gives it up at the end itself.
pub const GIFT_GRACE_PAST_END: Duration = Duration::from_secs(5);

/// How often, at most, a failing stream says so on stderr (see [`ErrorDigest`]).
pub const DIGEST_EVERY: Duration = Duration::from_secs(5);

/// The lines a stream prints about its failed attempts (transport errors: the endpoint
/// refusing connections or not answering): the first at once, then at most one per
/// [`DIGEST_EVERY`] with how many failed since and the last error, and one when the endpoint
/// answers again. A gift retried every 50 ms through a 30 s outage printed ~600 lines; the
/// counts stay in the results (`publish_refused_by_status`, "error"). Takes time as an
/// argument; returns the line to print, if any.
#[derive(Debug)]
pub struct ErrorDigest {
    /// Who is speaking: `publish gift stream 0`.
    label: String,
    /// What the line that ends a spell of failures says: "answered again" (transport errors),
    /// "accepted again" (refusals).
    back: &'static str,
    /// When the failures began (None: the last attempt was answered).
    failing_since: Option<Instant>,
    /// Failures since then.
    failures: u64,
    /// When the last line was printed, the failures after it and the last one's text.
    printed_at: Instant,
    unprinted: u64,
    last: String,
}

impl ErrorDigest {
    /// The digest of the stream named `label`.
    pub fn new(label: String, now: Instant) -> Self {
        Self {
            label,
            back: "answered again",
            failing_since: None,
            failures: 0,
            printed_at: now,
            unprinted: 0,
            last: String::new(),
        }
    }

    /// The digest of a stream's messages given up on an answer (a 401 to every gift, a 200
    /// that is not the edge's): the endpoint answers, so the spell ends when one is accepted.
    /// One line per gift flooded stderr (a 10 gifts/s run refused 401 printed 600 a minute).
    pub fn for_refusals(label: String, now: Instant) -> Self {
        Self { back: "accepted again", ..Self::new(label, now) }
    }

    /// An attempt failed at `now` with `error`; `then` says what happens to the message
    /// ("retrying", "dropped").
    pub fn failed(&mut self, now: Instant, then: &str, error: &str) -> Option<String> {
        self.failures += 1;
        if self.failing_since.is_none() {
            self.failing_since = Some(now);
            self.printed_at = now;
            self.unprinted = 0;
            return Some(format!(
                "{}: error ({then}): {error} (while it lasts: one line per {} s)",
                self.label,
                DIGEST_EVERY.as_secs()
            ));
        }
        self.unprinted += 1;
        error.clone_into(&mut self.last);
        if now.duration_since(self.printed_at) < DIGEST_EVERY {
            return None;
        }
        let line = self.summary(now, then);
        self.printed_at = now;
        self.unprinted = 0;
        Some(line)
    }

    /// An attempt was answered at `now` (whatever the status): the endpoint is back.
    pub fn answered(&mut self, now: Instant) -> Option<String> {
        let since = self.failing_since.take()?;
        let line = format!(
            "{}: {} after {:.1} s of errors ({} attempts failed)",
            self.label,
            self.back,
            now.duration_since(since).as_secs_f64(),
            self.failures
        );
        self.failures = 0;
        self.unprinted = 0;
        Some(line)
    }

    /// The stream ends at `now`: the failures not yet told, if any.
    pub fn finish(&mut self, now: Instant) -> Option<String> {
        let since = self.failing_since.filter(|_| self.unprinted > 0)?;
        let line = format!(
            "{}: {} more errors in the last {:.0} s, still failing at the end ({:.0} s since the first); last: {}",
            self.label,
            self.unprinted,
            now.duration_since(self.printed_at).as_secs_f64(),
            now.duration_since(since).as_secs_f64(),
            self.last
        );
        self.unprinted = 0;
        Some(line)
    }

    fn summary(&self, now: Instant, then: &str) -> String {
        format!(
            "{}: {} more errors ({then}) in the last {:.0} s, {:.0} s since the first; last: {}",
            self.label,
            self.unprinted,
            now.duration_since(self.printed_at).as_secs_f64(),
            self.failing_since.map_or(0.0, |at| now.duration_since(at).as_secs_f64()),
            self.last
        )
    }
}

/// An error and its causes, `: ` between them (reqwest's own text is "error sending request
/// for url (...)"; the cause, "Connection refused", is in its sources).
fn chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(cause) = source {
        let more = cause.to_string();
        if !text.contains(&more) {
            text.push_str(": ");
            text.push_str(&more);
        }
        source = cause.source();
    }
    text
}

/// One stream: kind `ki`, stream `s` of `streams`, paced at `rate` per second (all rooms).
struct Stream {
    client: reqwest::blocking::Client,
    target: Target,
    base: String,
    rooms: u32,
    kind: String,
    /// The first kind is must-deliver (gifts): refusals are retried, nothing is skipped.
    must_deliver: bool,
    s: usize,
    pad: String,
    published: Vec<u64>,
    /// Numbers taken by messages never accepted, per room: batched messages refused, and
    /// droppable ones that got no answer.
    holes: Vec<u64>,
    /// Of `holes`, those after the room's last accepted message.
    tail_holes: Vec<u64>,
    /// Most messages per request: 1 sends each on its own (`/v1/rooms/{room}/messages`).
    batch: usize,
    refused: BTreeMap<String, u64>,
    not_accepted: u64,
    gave_up: u64,
    offered: u64,
    ack: Histogram<u64>,
    /// Makes this run's idempotency keys its own.
    run_id: u64,
    /// How long a must-deliver message is retried before it is given up (`--gift-give-up`;
    /// None: until the publishing's end).
    give_up: Option<Duration>,
    /// `Authorization: Bearer KEY` (`ROOMCAST_API_KEY`, `--api-key-file`), on every request.
    auth: Option<reqwest::header::HeaderValue>,
    /// Its failed attempts, told on stderr at most every [`DIGEST_EVERY`].
    errors: ErrorDigest,
    /// Messages given up on an answer (see [`ErrorDigest::for_refusals`]).
    refusals: ErrorDigest,
    /// Its answers since the last acceptance, all refusals for good?
    spell: RefusalSpell,
    /// Why its publishing is hopeless, once the spell says so (the run then stops early).
    hopeless: Option<String>,
}

impl Publisher {
    /// Starts one thread per (kind, stream) with a non-zero rate; each publishes from `start`
    /// until `end`. `rates` are per room and second, `streams` the threads per kind; a
    /// must-deliver message is retried for `give_up` (None: until `end`); `key`, if any, goes
    /// on every request.
    #[allow(clippy::too_many_arguments)]
    pub fn start(
        target: Target,
        http: SocketAddr,
        rooms: u32,
        kinds: &[&str],
        pad: usize,
        rates: &[f64],
        streams: &[usize],
        batches: &[usize],
        give_up: Option<Duration>,
        key: Option<&ApiKey>,
        start: Instant,
        end: Instant,
    ) -> anyhow::Result<Self> {
        let rooms = rooms.max(1);
        let max_streams = streams.iter().copied().max().unwrap_or(1).max(1);
        let shared = Arc::new(Shared {
            outcome: Mutex::new(Outcome::empty(rooms, kinds.len(), max_streams)),
            stop: AtomicBool::new(false),
            error: Mutex::new(None),
            stopped_early: Mutex::new(None),
        });
        anyhow::ensure!(
            target == Target::Edge || batches.iter().all(|&b| b <= 1),
            "batched publishing (--chat-batch) is the edge's POST /v1/messages"
        );
        let mut threads = Vec::new();
        for (ki, &rate) in rates.iter().enumerate() {
            let n = streams.get(ki).copied().unwrap_or(1).max(1);
            if rate <= 0.0 {
                continue;
            }
            for s in 0..n {
                // A request not answered in 3 s is sent again (with the same idempotency key,
                // so the edge publishes it once), within the message's give-up time
                // (`--gift-give-up`, 30 s by default).
                let client = reqwest::blocking::Client::builder()
                    .timeout(Duration::from_secs(3))
                    .pool_max_idle_per_host(2)
                    .build()?;
                let mut st = Stream {
                    client,
                    target,
                    base: format!("http://{http}"),
                    rooms,
                    kind: kinds[ki].to_owned(),
                    must_deliver: ki == 0,
                    s,
                    pad: "x".repeat(pad),
                    published: vec![0; rooms as usize],
                    holes: vec![0; rooms as usize],
                    tail_holes: vec![0; rooms as usize],
                    // Must-deliver messages are retried one by one until acknowledged.
                    batch: if ki == 0 { 1 } else { batches.get(ki).copied().unwrap_or(1).max(1) },
                    refused: BTreeMap::new(),
                    not_accepted: 0,
                    gave_up: 0,
                    offered: 0,
                    ack: histogram(),
                    run_id: now_us(),
                    give_up,
                    auth: key.map(|k| k.header.clone()),
                    errors: ErrorDigest::new(format!("publish {} stream {s}", kinds[ki]), Instant::now()),
                    refusals: ErrorDigest::for_refusals(format!("publish {} stream {s}", kinds[ki]), Instant::now()),
                    spell: RefusalSpell::default(),
                    hopeless: None,
                };
                let shared = shared.clone();
                let pacer = Pacer::new(start, rate * f64::from(rooms) / n as f64);
                threads.push(std::thread::spawn(move || {
                    let result = st.run(&pacer, end, &shared.stop);
                    let mut o = shared.outcome.lock().expect("not poisoned");
                    for (room, &k) in st.published.iter().enumerate() {
                        o.published[room][ki][s] = k;
                        o.holes[room][ki][s] = st.holes[room];
                        o.tail_holes[room][ki][s] = st.tail_holes[room];
                    }
                    o.offered[ki] += st.offered;
                    o.not_accepted[ki] += st.not_accepted;
                    o.gave_up[ki] += st.gave_up;
                    for (key, v) in &st.refused {
                        *o.refused.entry(key.clone()).or_default() += v;
                    }
                    o.ack[ki].add(&st.ack).expect("same bounds");
                    drop(o);
                    match result {
                        Ok(()) => {}
                        Err(Stopped::Hopeless(why)) => {
                            let why = format!("publish {} stream {s}: {why}", st.kind);
                            shared.stopped_early.lock().expect("not poisoned").get_or_insert(why);
                            shared.stop.store(true, Ordering::Relaxed);
                        }
                        Err(Stopped::Failed(e)) => {
                            shared.error.lock().expect("not poisoned").get_or_insert(e);
                            shared.stop.store(true, Ordering::Relaxed);
                        }
                    }
                }));
            }
        }
        Ok(Self { threads, shared })
    }

    /// Whether the streams are stopping before the end: one failed, or found publishing
    /// hopeless (the run should stop publishing).
    pub fn stopping(&self) -> bool {
        self.shared.stop.load(Ordering::Relaxed)
    }

    /// Waits for every stream (they stop at `end`, or once one stops the others) and returns
    /// what they did; an error if a stream failed.
    pub fn finish(self) -> anyhow::Result<Outcome> {
        for t in self.threads {
            let _ = t.join();
        }
        if let Some(e) = self.shared.error.lock().expect("not poisoned").take() {
            return Err(e);
        }
        let shared = Arc::try_unwrap(self.shared).map_err(|_| anyhow::anyhow!("publisher still shared"))?;
        let mut outcome = shared.outcome.into_inner().expect("not poisoned");
        outcome.stopped_early = shared.stopped_early.into_inner().expect("not poisoned");
        Ok(outcome)
    }
}

/// Why a stream stopped before the end.
enum Stopped {
    /// Every answer for [`HOPELESS_AFTER`] was a refusal for good: the run stops early, and
    /// still writes its results.
    Hopeless(String),
    /// Something the publisher cannot go on from (a batch answer without results): the run ends
    /// on this error.
    Failed(anyhow::Error),
}

impl From<anyhow::Error> for Stopped {
    fn from(e: anyhow::Error) -> Self {
        Self::Failed(e)
    }
}

impl From<reqwest::Error> for Stopped {
    fn from(e: reqwest::Error) -> Self {
        Self::Failed(e.into())
    }
}

impl Stream {
    fn run(&mut self, pacer: &Pacer, end: Instant, stop: &AtomicBool) -> Result<(), Stopped> {
        let mut n = 0u64;
        loop {
            let due = pacer.due(n);
            // Past the end, messages due before it are not sent late: behind an edge that no
            // longer answers, each would wait out its give-up time (100 chat messages due in a
            // 1 s run took 3,000 s).
            if due >= end || Instant::now() >= end || stop.load(Ordering::Relaxed) || self.hopeless.is_some() {
                for digest in [&mut self.errors, &mut self.refusals] {
                    if let Some(line) = digest.finish(Instant::now()) {
                        eprintln!("{line}");
                    }
                }
                return self.hopeless.take().map_or(Ok(()), |why| Err(Stopped::Hopeless(why)));
            }
            let now = Instant::now();
            if due > now {
                std::thread::sleep(due - now);
            }
            if self.batch > 1 {
                n = self.send_batch(pacer, n, end)?;
                continue;
            }
            let room = (n % u64::from(self.rooms)) as u32;
            n += 1;
            self.offered += 1;
            self.send(room, end, stop);
        }
    }

    /// Sends every message due by now (message `n` onwards, at most `batch`) in one
    /// `POST /v1/messages`; returns the next message's number. Droppable messages only: a
    /// refused one is not sent again. Each is numbered before the answer, so a refused one
    /// leaves a hole in its room's `k`s, which receivers are told about at the end.
    fn send_batch(&mut self, pacer: &Pacer, mut n: u64, end: Instant) -> Result<u64, Stopped> {
        let now = Instant::now();
        let mut items = String::from(r#"{"messages":["#);
        let mut rooms = Vec::with_capacity(self.batch);
        while rooms.len() < self.batch && (rooms.is_empty() || pacer.due(n) <= now) && pacer.due(n) < end {
            let room = (n % u64::from(self.rooms)) as u32;
            n += 1;
            self.offered += 1;
            let k = self.published[room as usize];
            self.published[room as usize] += 1;
            if !rooms.is_empty() {
                items.push(',');
            }
            items.push_str(&format!(
                r#"{{"room":"r{room}","kind":"{kind}","user":"","body":{{"t":{t},"k":{k},"s":{s},"r":{r},"kind":"{kind}","p":"{pad}"}}}}"#,
                kind = self.kind,
                t = now_us(),
                s = self.s,
                r = run_id(),
                pad = self.pad,
            ));
            rooms.push(room);
        }
        items.push_str("]}");
        let first = Instant::now();
        let mut req = self.client.post(format!("{}/v1/messages", self.base)).header("Content-Type", "application/json");
        if let Some(auth) = &self.auth {
            req = req.header(reqwest::header::AUTHORIZATION, auth.clone());
        }
        let resp = req.body(items).send();
        if resp.is_ok()
            && let Some(line) = self.errors.answered(Instant::now())
        {
            eprintln!("{line}");
        }
        let statuses: Vec<u16> = match resp {
            Ok(r) if r.status().is_success() => {
                let text = r.text()?;
                let v: serde_json::Value = serde_json::from_str(&text).map_err(|e| {
                    anyhow::anyhow!("POST /v1/messages: 200 without the edge's answer ({e}): {}", excerpt(&text))
                })?;
                let results =
                    v["results"].as_array().ok_or_else(|| anyhow::anyhow!("batch answer without results: {v}"))?;
                if results.len() != rooms.len() {
                    return Err(
                        anyhow::anyhow!("batch of {} answered with {} results", rooms.len(), results.len()).into()
                    );
                }
                results.iter().map(|x| x["status"].as_u64().map_or(0, |s| s as u16)).collect()
            }
            Ok(r) => vec![r.status().as_u16(); rooms.len()],
            Err(e) => {
                if let Some(line) = self.errors.failed(Instant::now(), "batch dropped", &chain(&e)) {
                    eprintln!("{line}");
                }
                vec![0; rooms.len()]
            }
        };
        let took = first.elapsed().as_micros().max(1) as u64;
        let mut for_good = None;
        for (room, status) in rooms.into_iter().zip(statuses) {
            if status == 200 {
                let _ = self.ack.record(took);
                self.spell.accepted();
                self.tail_holes[room as usize] = 0;
            } else {
                let status_text = if status == 0 { "error".to_owned() } else { status.to_string() };
                if is_for_good(&status_text) {
                    for_good = Some(format!("r{room} answered {status}"));
                }
                self.refusal(&status_text);
                self.not_accepted += 1;
                self.hole(room);
            }
        }
        // One answer, one step of the spell: a batch refused for good whole is one refusal.
        if let Some(what) = for_good {
            self.refused_for_good(&what);
        }
        Ok(n)
    }

    /// A message was accepted: a spell of messages given up on an answer, if any, has ended.
    fn accepted_again(&mut self) {
        self.spell.accepted();
        if let Some(line) = self.refusals.answered(Instant::now()) {
            eprintln!("{line}");
        }
    }

    /// An answer refused a message for good (`what`: "r3 answered 401"): once every answer
    /// for [`HOPELESS_AFTER`] was one, the stream's publishing is hopeless.
    fn refused_for_good(&mut self, what: &str) {
        if self.hopeless.is_none() {
            self.hopeless = self.spell.refused(Instant::now(), what);
        }
    }

    /// A message given up whose fate is unknown (an attempt got no answer) takes its number
    /// and leaves a hole: receivers that got it count it once, and the others do not count it
    /// lost.
    fn take_a_hole_if(&mut self, fate_unknown: bool, room: u32) {
        if fate_unknown {
            self.published[room as usize] += 1;
            self.hole(room);
        }
    }

    /// A number of `room` that no message accepted holds (the number is taken already).
    fn hole(&mut self, room: u32) {
        self.holes[room as usize] += 1;
        self.tail_holes[room as usize] += 1;
    }

    /// Message `published[room]` was accepted: it takes its number.
    fn accepted_as_next(&mut self, room: u32) {
        self.published[room as usize] += 1;
        self.tail_holes[room as usize] = 0;
    }

    fn refusal(&mut self, status: &str) {
        *self.refused.entry(format!("{} {status}", self.kind)).or_default() += 1;
    }

    /// Publishes one message to `room`: a must-deliver one is retried until acknowledged, given
    /// up after `give_up` (or at `run_end` when there is none, and at the latest
    /// [`GIFT_GRACE_PAST_END`] after `run_end`), or when the publisher `stop`s; a droppable one
    /// is sent once.
    fn send(&mut self, room: u32, run_end: Instant, stop: &AtomicBool) {
        let kind = self.kind.clone();
        let k = self.published[room as usize];
        let s = self.s;
        let body =
            format!(r#"{{"t":{},"k":{k},"s":{s},"r":{},"kind":"{kind}","p":"{}"}}"#, now_us(), run_id(), self.pad);
        let (url, payload) = match self.target {
            Target::Edge => (
                format!("{}/v1/rooms/r{room}/messages", self.base),
                format!(r#"{{"kind":"{kind}","user":"","body":{body}}}"#),
            ),
            Target::Nchan => (format!("{}/pub/r{room}", self.base), body),
        };
        // Must-deliver messages are retried while the server says so (429, 503, 507) or does
        // not answer, for up to `give_up` (30 s by default; none: until the publishing ends),
        // with the same Idempotency-Key (a retry of a publish that went through but whose
        // answer was lost is not a second message); a message given up takes no `k`, so the
        // receivers' sequence has no hole the publisher made. Droppable ones refused are
        // dropped by the server: not numbered either (one that got no answer is, below).
        let first = Instant::now();
        // Retried until its give-up time, but not past the publishing's end by more than
        // GIFT_GRACE_PAST_END: a gift retried at the end of --duration against an edge gone
        // held the run up to --gift-give-up (30 s) past it.
        let grace_end = run_end + GIFT_GRACE_PAST_END;
        let end = self.give_up.map_or(run_end, |g| (first + g).min(grace_end));
        let unreachable_for = match self.give_up {
            None => "until the publishing's end (--gift-give-up 0)".to_owned(),
            Some(g) if first + g <= grace_end => format!("for {:.1} s", g.as_secs_f64()),
            Some(_) => format!("the run's end and its {} s grace", GIFT_GRACE_PAST_END.as_secs()),
        };
        // Unique per message offered (a message given up does not take a `k`: the next reuses
        // it), and per run (the edge remembers keys for minutes).
        let idem = format!("lg-{}-{kind}-{s}-{}", self.run_id, self.offered);
        // An attempt sent that got no answer (a timeout, not a refused connect) may have gone
        // through: a gift given up after one takes its number and leaves a hole, as a
        // droppable one does. A 10^6 run gave up a gift after 300 s of timeouts from an
        // overloaded edge that had published it, and the next gift reused its number: 970,369
        // "duplicates", one per member.
        let mut fate_unknown = false;
        loop {
            let mut req = self.client.post(&url).header("Content-Type", "application/json");
            if self.target == Target::Edge {
                req = req.header("Idempotency-Key", &idem);
            }
            if let Some(auth) = &self.auth {
                req = req.header(reqwest::header::AUTHORIZATION, auth.clone());
            }
            let r = req.body(payload.clone()).send();
            if r.is_ok()
                && let Some(line) = self.errors.answered(Instant::now())
            {
                eprintln!("{line}");
            }
            // Nchan answers 201 (delivered to subscribers) or 202 (queued): both accepted. The
            // edge answers 202 only for a droppable message it sampled out.
            let accepted =
                |s: reqwest::StatusCode| s.is_success() && (self.target == Target::Nchan || s.as_u16() != 202);
            // The publisher is stopping (another stream found publishing hopeless, or failed):
            // a message still being retried is given up now rather than at its give-up time.
            let stopping = stop.load(Ordering::Relaxed);
            match r {
                // The edge's 200 carries the message's seq: a 200 without one (a proxy's page, a
                // wrong --http) numbered nothing, and counting it as published blamed the edge
                // for every "lost" delivery of a message it never saw, in a run that exited 0.
                Ok(resp) if self.target == Target::Edge && resp.status().as_u16() == 200 => {
                    let text = resp.text().unwrap_or_default();
                    if is_edge_ack(&text) {
                        self.accepted_as_next(room);
                        let _ = self.ack.record(first.elapsed().as_micros().max(1) as u64);
                        self.accepted_again();
                    } else {
                        self.refusal(BAD_ANSWER);
                        let why = format!("r{room}: 200 without the edge's answer ({})", excerpt(&text));
                        if let Some(line) = self.refusals.failed(Instant::now(), "given up", &why) {
                            eprintln!("{line}");
                        }
                        self.refused_for_good(&why);
                        self.not_accepted += 1;
                        if self.must_deliver {
                            self.gave_up += 1;
                        }
                    }
                    return;
                }
                Ok(resp) if accepted(resp.status()) => {
                    self.accepted_as_next(room);
                    let _ = self.ack.record(first.elapsed().as_micros().max(1) as u64);
                    self.accepted_again();
                    return;
                }
                Ok(resp) => {
                    let code = resp.status().as_u16();
                    self.refusal(&code.to_string());
                    let why = format!("r{room} answered {code}");
                    if is_for_good(&code.to_string()) {
                        self.refused_for_good(&why);
                    }
                    let retriable = matches!(code, 429 | 503 | 507);
                    if !self.must_deliver || code == 202 {
                        self.not_accepted += 1;
                        return;
                    }
                    if !retriable || stopping || Instant::now() >= end {
                        if let Some(line) = self.refusals.failed(Instant::now(), "given up", &why) {
                            eprintln!("{line}");
                        }
                        self.not_accepted += 1;
                        self.gave_up += 1;
                        self.take_a_hole_if(fate_unknown, room);
                        return;
                    }
                    std::thread::sleep(Duration::from_millis(20));
                }
                // A droppable message (chat) is not retried: a client's chat that did not go
                // through is gone, and retrying one held its stream (each retry up to the 3 s
                // timeout, for up to --gift-give-up) while the rest of its messages waited. It
                // takes its number and leaves a hole, as a batched one does: with no answer it
                // may have gone through (a timeout), and a later message reusing its number
                // would then be a duplicate to every member.
                Err(e) if !self.must_deliver => {
                    self.refusal("error");
                    if let Some(line) = self.errors.failed(Instant::now(), "dropped", &chain(&e)) {
                        eprintln!("{line}");
                    }
                    self.published[room as usize] += 1;
                    self.hole(room);
                    self.not_accepted += 1;
                    return;
                }
                Err(e) if Instant::now() < end && !stopping => {
                    fate_unknown |= !e.is_connect();
                    self.refusal("error");
                    if let Some(line) = self.errors.failed(Instant::now(), "retrying", &chain(&e)) {
                        eprintln!("{line}");
                    }
                    std::thread::sleep(Duration::from_millis(50));
                }
                // Unreachable for the whole give-up time (an edge killed and not back): given
                // up as a refused message is, and the run goes on to its report. Failing the
                // run here ended it without results, members' failures by reason included.
                Err(e) => {
                    self.refusal("error");
                    // Counted in the digest (the outage goes on; its line, if due, first), and
                    // told on a line of its own: it costs a message, at most one per give-up time.
                    if let Some(line) = self.errors.failed(Instant::now(), "retrying", &chain(&e)) {
                        eprintln!("{line}");
                    }
                    let when = if stopping { "the publisher stopping".to_owned() } else { unreachable_for.clone() };
                    eprintln!("publish {kind} to r{room}: given up, unreachable ({when}): {}", chain(&e));
                    self.not_accepted += 1;
                    if self.must_deliver {
                        self.gave_up += 1;
                    }
                    self.take_a_hole_if(fate_unknown || !e.is_connect(), room);
                    return;
                }
            }
        }
    }
}

/// The refusal reason of a 200 that is not the edge's acknowledgement (see [`is_edge_ack`]).
pub const BAD_ANSWER: &str = "bad_answer";

/// Whether `body` is the edge's answer to an accepted publish: a JSON object with the
/// message's `seq` (docs/PROTOCOL.md, "The publish API").
fn is_edge_ack(body: &str) -> bool {
    serde_json::from_str::<serde_json::Value>(body).is_ok_and(|v| v["seq"].is_u64())
}

/// The start of an answer for a message: at most 80 characters, control characters escaped.
fn excerpt(body: &str) -> String {
    let cut: String = body.chars().take(80).collect();
    let more = if body.chars().count() > 80 { "..." } else { "" };
    format!("{cut:?}{more}")
}

/// The refusals that retrying or waiting would not have changed, as "kind status: count":
/// answers that are not the edge's (a wrong --http) and 4xx other than 429 (a missing or
/// wrong key, a kind the edge does not know). A run with any of them measured a misconfigured
/// setup, and says so by its exit status.
pub fn refused_for_good(refused: &BTreeMap<String, u64>) -> Vec<String> {
    refused
        .iter()
        .filter(|(key, n)| **n > 0 && is_for_good(key.rsplit(' ').next().unwrap_or("")))
        .map(|(key, n)| format!("{key}: {n}"))
        .collect()
}

/// What a 401 among the refusals for good (as [`refused_for_good`] gives them) says about the
/// key: the edge wants one and none was given, or it refused the one given (named by where it
/// came from). Empty without a 401.
pub fn key_hint(for_good: &[String], key: Option<&ApiKey>) -> String {
    if !for_good.iter().any(|r| r.contains(" 401: ")) {
        return String::new();
    }
    match key {
        None => format!(
            "; a 401 is an edge with publish keys asking for one: give it in {API_KEY_ENV} or in a file named by \
             --api-key-file"
        ),
        Some(k) => format!("; a 401 is the edge refusing the key from {}", k.source()),
    }
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, Instant};

    use std::collections::BTreeMap;
    use std::io::{Read, Write};

    use super::{ApiKey, ErrorDigest, HOPELESS_AFTER, Publisher, RefusalSpell, key_hint, refused_for_good};
    use crate::worker::Target;

    /// An HTTP server on loopback answering every request with `200 OK` and `body`.
    fn answering(body: &'static str) -> std::net::SocketAddr {
        answering_with("200 OK", body)
    }

    /// An HTTP server on loopback answering every request with `status` (`401 Unauthorized`)
    /// and `body`.
    fn answering_with(status: &'static str, body: &'static str) -> std::net::SocketAddr {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        std::thread::spawn(move || {
            for c in l.incoming() {
                let Ok(mut c) = c else { return };
                std::thread::spawn(move || {
                    let mut buf = [0u8; 4096];
                    // One request per connection; its body arrives with its head on loopback.
                    let _ = c.read(&mut buf);
                    let _ = write!(
                        c,
                        "HTTP/1.1 {status}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                        body.len()
                    );
                });
            }
        });
        addr
    }

    /// Gifts at 20/s to the edge target at `http` for at most `secs`, each retried for
    /// `give_up`; what the publisher made of them.
    fn gifts_for(http: std::net::SocketAddr, secs: f64, give_up: Option<Duration>) -> super::Outcome {
        let start = Instant::now();
        let p = Publisher::start(
            Target::Edge,
            http,
            1,
            &["gift", "chat"],
            8,
            &[20.0, 0.0],
            &[1, 1],
            &[1, 1],
            give_up,
            None,
            start,
            start + Duration::from_secs_f64(secs),
        )
        .unwrap();
        p.finish().unwrap()
    }

    /// Gifts at 20/s to the edge target at `http` for 300 ms; what the publisher made of them.
    fn gifts_for_300_ms(http: std::net::SocketAddr) -> super::Outcome {
        gifts_for_300_ms_with(http, None)
    }

    /// As [`gifts_for_300_ms`], with `key` on every publish.
    fn gifts_for_300_ms_with(http: std::net::SocketAddr, key: Option<&ApiKey>) -> super::Outcome {
        let start = Instant::now();
        let p = Publisher::start(
            Target::Edge,
            http,
            1,
            &["gift", "chat"],
            8,
            &[20.0, 0.0],
            &[1, 1],
            &[1, 1],
            Some(Duration::from_secs(5)),
            key,
            start,
            start + Duration::from_millis(300),
        )
        .unwrap();
        p.finish().unwrap()
    }

    /// A 200 that is not the edge's acknowledgement (no `seq`) publishes nothing: the gift is
    /// given up as a `bad_answer`, not counted as published (and then as lost by every member).
    #[test]
    fn a_200_without_the_edges_answer_is_not_a_publish() {
        let http = answering("\u{0}not json {{");
        let o = gifts_for_300_ms(http);
        assert_eq!(o.total(0), 0, "nothing was numbered");
        assert!(o.gave_up[0] >= 1, "{:?}", o.gave_up);
        assert_eq!(o.refused.get("gift bad_answer").copied(), Some(o.gave_up[0]), "{:?}", o.refused);
        assert_eq!(refused_for_good(&o.refused), vec![format!("gift bad_answer: {}", o.gave_up[0])]);

        // The edge's answer is one.
        let http = answering(r#"{"room":"r0","seq":7,"ts_us":1,"replayed":false}"#);
        let o = gifts_for_300_ms(http);
        assert!(o.total(0) >= 1 && o.gave_up[0] == 0, "{:?} {:?}", o.gave_up, o.refused);
    }

    #[test]
    fn refusals_for_good_are_bad_answers_and_4xx_but_429() {
        let refused: BTreeMap<String, u64> = [
            ("gift 401", 20),
            ("gift error", 597),
            ("gift 503", 3),
            ("chat 429", 9),
            ("chat 202", 4),
            ("chat 403", 0),
            ("gift bad_answer", 2),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v))
        .collect();
        assert_eq!(refused_for_good(&refused), vec!["gift 401: 20", "gift bad_answer: 2"]);
        assert!(refused_for_good(&BTreeMap::new()).is_empty());
    }

    /// Publishes gifts only (10 a second to one room, one stream) to `http` for `run_ms`, each
    /// retried for `give_up_ms`; the outcome.
    fn gifts_to(http: std::net::SocketAddr, run_ms: u64, give_up_ms: u64) -> anyhow::Result<super::Outcome> {
        let start = Instant::now();
        let end = start + Duration::from_millis(run_ms);
        let p = Publisher::start(
            Target::Edge,
            http,
            1,
            &["gift", "chat"],
            8,
            &[10.0, 0.0],
            &[1, 1],
            &[1, 1],
            Some(Duration::from_millis(give_up_ms)),
            None,
            start,
            end,
        )?;
        p.finish()
    }

    /// An edge that stops answering for good (killed, not restarted) costs the gifts due
    /// meanwhile, counted as given up; the publisher still ends with its outcome, so the run
    /// writes its report (it used to end the run with the connection error and no results).
    #[test]
    fn an_unreachable_edge_gives_gifts_up_and_the_outcome_stays() {
        // A port nothing listens on: connects are refused.
        let http = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap();
        let o = gifts_to(http, 300, 200).expect("an outcome, not the connection error");
        assert_eq!(o.total(0), 0);
        assert!(o.gave_up[0] >= 1, "gifts given up: {:?}", o.gave_up);
        assert_eq!(o.not_accepted[0], o.gave_up[0]);
        assert!(o.refused.get("gift error").copied().unwrap_or(0) >= o.gave_up[0], "{:?}", o.refused);
    }

    /// A gift given up after attempts that got no answer (an edge that reads the request and
    /// never answers: it may have published it) takes its number and leaves a hole, so the
    /// next gift does not reuse the number (every member that got both counted a duplicate).
    #[test]
    fn a_gift_given_up_unanswered_keeps_its_number_as_a_hole() {
        let silent = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let http = silent.local_addr().unwrap();
        std::thread::spawn(move || {
            let mut held = Vec::new();
            for s in silent.incoming() {
                // Read what comes, never answer.
                let Ok(mut s) = s else { return };
                let mut buf = [0u8; 4096];
                let _ = std::io::Read::read(&mut s, &mut buf);
                held.push(s);
            }
        });
        let o = gifts_to(http, 200, 100).unwrap();
        assert!(o.gave_up[0] >= 1, "{:?}", o.gave_up);
        assert_eq!(o.published[0][0][0], o.gave_up[0], "each took its number: {:?}", o.published);
        assert_eq!(o.total(0), 0, "none counted as published");
        assert_eq!(o.holes[0][0][0], o.gave_up[0], "each left a hole: {:?}", o.holes);
        assert_eq!(o.tail_holes, o.holes, "none accepted after them: all at the tail");
    }

    /// A gift given up unanswered before gifts that were accepted leaves a hole that is not at
    /// the tail: members are owed the accepted gifts after it, so the end waits for them; only
    /// holes after the last accepted gift are skipped by that wait.
    #[test]
    fn a_hole_before_an_accepted_gift_is_not_at_the_tail() {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let http = l.local_addr().unwrap();
        std::thread::spawn(move || {
            let mut held = Vec::new();
            for (i, c) in l.incoming().enumerate() {
                let Ok(mut c) = c else { return };
                if i == 0 {
                    // The first request is read and never answered (its fate unknown).
                    held.push(c);
                    continue;
                }
                std::thread::spawn(move || {
                    let mut buf = [0u8; 4096];
                    let body = r#"{"seq":1,"ts_us":1}"#;
                    while matches!(c.read(&mut buf), Ok(n) if n > 0) {
                        let head = format!("HTTP/1.1 200 OK\r\nContent-Length: {}\r\n\r\n", body.len());
                        if c.write_all(head.as_bytes()).and_then(|()| c.write_all(body.as_bytes())).is_err() {
                            return;
                        }
                    }
                });
            }
        });
        // The first attempt waits for the client's 3 s timeout; the gifts due meanwhile go next.
        let o = gifts_to(http, 3_500, 100).unwrap();
        assert_eq!(o.gave_up[0], 1, "{:?}", o.refused);
        assert_eq!(o.holes[0][0][0], 1);
        assert!(o.total(0) >= 1, "accepted after the hole: {:?}", o.published);
        assert_eq!(o.tail_holes[0][0][0], 0, "the hole is not at the tail");
    }

    /// Chat (droppable) sent to an endpoint nobody listens on is tried once per message and
    /// dropped, never retried: each keeps its pace, each failure is one refusal, one message
    /// not accepted and one hole in the numbering (it got no answer, so it might have gone
    /// through). It was retried like a gift, for the whole give-up time, with the stream's
    /// next messages waiting behind it.
    #[test]
    fn chat_that_gets_no_answer_is_dropped_not_retried() {
        let http = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap();
        let start = Instant::now();
        let p = Publisher::start(
            Target::Edge,
            http,
            1,
            &["gift", "chat"],
            8,
            &[0.0, 40.0],
            &[1, 1],
            &[1, 1],
            Some(Duration::from_secs(30)),
            None,
            start,
            start + Duration::from_millis(500),
        )
        .unwrap();
        let o = p.finish().unwrap();
        // Retries would hold it for the 30 s give-up time; a generous bound on a shared box.
        assert!(start.elapsed() < Duration::from_secs(20), "not held by retries: {:?}", start.elapsed());
        assert!(o.offered[1] >= 15, "every message due was sent: {:?}", o.offered);
        assert_eq!(o.refused.get("chat error").copied(), Some(o.offered[1]), "each tried once: {:?}", o.refused);
        assert_eq!(o.not_accepted[1], o.offered[1]);
        assert_eq!(o.gave_up[1], 0, "droppables are not given up, they are dropped");
        assert_eq!(o.holes[0][1][0], o.offered[1], "each left a hole");
        assert_eq!(o.tail_holes[0][1][0], o.offered[1], "all at the tail");
        assert_eq!(o.total(1), 0);
    }

    /// An outage of 30 s, a failed attempt every 50 ms (600): the first error at once, then at
    /// most one line per 5 s saying how many failed since and the last error, one line when the
    /// endpoint answers again, and nothing more while it does (every failure was one line).
    #[test]
    fn a_long_outage_is_told_in_a_few_lines() {
        let t0 = Instant::now();
        let mut d = ErrorDigest::new("publish gift stream 0".to_owned(), t0);
        let mut lines = Vec::new();
        for i in 0..600u32 {
            let at = t0 + Duration::from_millis(50) * i;
            lines.extend(d.failed(at, "retrying", &format!("connection refused #{i}")));
        }
        assert!(lines.len() <= 1 + 30 / 5, "{} lines: {lines:#?}", lines.len());
        assert!(lines.len() >= 5, "a summary every 5 s: {lines:#?}");
        assert_eq!(
            lines[0],
            "publish gift stream 0: error (retrying): connection refused #0 (while it lasts: one line per 5 s)"
        );
        assert!(
            lines[1].starts_with("publish gift stream 0: 100 more errors (retrying) in the last 5 s"),
            "{lines:#?}"
        );
        // The counts add up: every failure after the first is in one summary or still untold.
        let told: u64 = lines[1..]
            .iter()
            .map(|l| l.split(": ").nth(1).unwrap().split(' ').next().unwrap().parse::<u64>().unwrap())
            .sum();
        let end = t0 + Duration::from_millis(50 * 600);
        let rest = d.finish(end).expect("failures since the last summary");
        assert!(rest.contains("still failing at the end"), "{rest}");
        assert!(rest.ends_with("last: connection refused #599"), "{rest}");
        let untold: u64 = rest.split(": ").nth(1).unwrap().split(' ').next().unwrap().parse().unwrap();
        assert_eq!(told + untold, 599, "{lines:#?} {rest}");
        assert_eq!(d.finish(end), None, "told once");
        let back = d.answered(end).expect("a line when it answers again");
        assert_eq!(back, "publish gift stream 0: answered again after 30.0 s of errors (600 attempts failed)");
        assert_eq!(d.answered(end), None, "nothing while it answers");
        // The next outage starts over with its first error told at once.
        assert!(d.failed(end, "retrying", "reset").is_some_and(|l| l.contains("error (retrying): reset")));
    }

    /// Gifts given up on an answer (10/s refused 401 for 60 s): a few lines, the spell ended by
    /// the first gift accepted, in those words (the endpoint answered all along).
    #[test]
    fn gifts_given_up_on_an_answer_are_told_in_a_few_lines() {
        let t0 = Instant::now();
        let mut d = ErrorDigest::for_refusals("publish gift stream 0".to_owned(), t0);
        let lines: Vec<String> = (0..600u32)
            .filter_map(|i| d.failed(t0 + Duration::from_millis(100) * i, "given up", "r0 answered 401"))
            .collect();
        assert!(lines.len() <= 1 + 60 / 5, "{lines:#?}");
        assert_eq!(
            lines[0],
            "publish gift stream 0: error (given up): r0 answered 401 (while it lasts: one line per 5 s)"
        );
        let back = d.answered(t0 + Duration::from_secs(60)).expect("a line when one is accepted");
        assert_eq!(back, "publish gift stream 0: accepted again after 60.0 s of errors (600 attempts failed)");
    }

    /// The key comes from `--api-key-file` (first line, trimmed) or else `ROOMCAST_API_KEY`;
    /// it is sent as `Bearer KEY`; nothing printable about it (its Debug, an error about it)
    /// carries the key.
    #[test]
    fn the_api_key_comes_from_a_file_or_the_environment_and_is_never_shown() {
        const KEY: &str = "s3cret-publish-key-0123456789";
        let dir = roomcast_testsupport::scratch().join(format!("loadgen-apikey-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("key");
        std::fs::write(&file, format!("  {KEY}  \nsecond line ignored\n")).unwrap();
        let bearer = |k: &ApiKey| k.header.to_str().unwrap().to_owned();

        let k = ApiKey::load(Some(&file), None).unwrap().expect("a key");
        assert_eq!(bearer(&k), format!("Bearer {KEY}"));
        assert_eq!(k.source(), format!("--api-key-file {}", file.display()));
        assert!(!format!("{k:?}").contains(KEY), "{k:?}");
        assert!(!format!("{:?}", k.header).contains(KEY), "reqwest hides a sensitive header");
        // The file wins over the environment.
        let k = ApiKey::load(Some(&file), Some("other-key-0123456789".into())).unwrap().unwrap();
        assert_eq!(bearer(&k), format!("Bearer {KEY}"));
        let k = ApiKey::load(None, Some(KEY.into())).unwrap().unwrap();
        assert_eq!((bearer(&k).as_str(), k.source()), (format!("Bearer {KEY}").as_str(), "ROOMCAST_API_KEY"));
        assert!(ApiKey::load(None, None).unwrap().is_none());

        // Refusals name the source, never the key.
        std::fs::write(&file, "\nkey on the second line\n").unwrap();
        let e = ApiKey::load(Some(&file), None).unwrap_err().to_string();
        assert!(e.contains("--api-key-file") && e.contains("empty"), "{e}");
        let e = ApiKey::load(None, Some(format!("{KEY} with spaces").into())).unwrap_err().to_string();
        assert!(e.starts_with("ROOMCAST_API_KEY: ") && !e.contains(KEY), "{e}");
        let e = ApiKey::load(None, Some(format!("{KEY}\u{7}").into())).unwrap_err().to_string();
        assert!(!e.contains(KEY), "{e}");
        let e = ApiKey::load(Some(&dir.join("missing")), None).unwrap_err().to_string();
        assert!(e.starts_with("--api-key-file ") && e.contains("missing"), "{e}");
        let _ = std::fs::remove_dir_all(&dir);

        // A 401 in the refusals says what to do about the key.
        let for_good = vec!["gift 401: 12".to_owned()];
        assert!(key_hint(&for_good, None).contains("ROOMCAST_API_KEY"), "{}", key_hint(&for_good, None));
        let k = ApiKey::load(None, Some(KEY.into())).unwrap().unwrap();
        assert_eq!(key_hint(&for_good, Some(&k)), "; a 401 is the edge refusing the key from ROOMCAST_API_KEY");
        assert_eq!(key_hint(&["gift bad_answer: 2".to_owned()], None), "");
    }

    /// Every publish carries the key as `Authorization: Bearer KEY`.
    #[test]
    fn every_publish_carries_the_key() {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let http = l.local_addr().unwrap();
        let heads = std::sync::Arc::new(std::sync::Mutex::new(Vec::<String>::new()));
        let seen = heads.clone();
        std::thread::spawn(move || {
            for c in l.incoming() {
                let Ok(mut c) = c else { return };
                let seen = seen.clone();
                std::thread::spawn(move || {
                    let mut buf = [0u8; 4096];
                    let n = c.read(&mut buf).unwrap_or(0);
                    seen.lock().unwrap().push(String::from_utf8_lossy(&buf[..n]).to_lowercase());
                    let body = r#"{"room":"r0","seq":1,"ts_us":1,"replayed":false}"#;
                    let _ = write!(
                        c,
                        "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                        body.len()
                    );
                });
            }
        });
        let key = ApiKey::load(None, Some("k-0123456789abcdef".into())).unwrap().unwrap();
        let o = gifts_for_300_ms_with(http, Some(&key));
        assert!(o.total(0) >= 1, "{:?}", o.refused);
        let heads = heads.lock().unwrap();
        assert_eq!(heads.len() as u64, o.total(0));
        assert!(heads.iter().all(|h| h.contains("\r\nauthorization: bearer k-0123456789abcdef\r\n")), "{heads:?}");
    }

    /// A key variable set but empty or blank (a script's `ROOMCAST_API_KEY=$KEY` with KEY
    /// unset), or a key file whose first line is blank, is refused naming where it came from: it
    /// meant publishing without a key, and a run refused 401 throughout. Unset is no key.
    #[test]
    fn an_empty_or_blank_key_is_refused() {
        for empty in ["", "   ", "\t"] {
            let e = ApiKey::load(None, Some(empty.into())).expect_err("an empty key is refused").to_string();
            assert!(e.starts_with("ROOMCAST_API_KEY is set but empty or blank"), "{e:?}");
        }
        assert!(ApiKey::load(None, None).unwrap().is_none(), "unset: no key");
        let dir = roomcast_testsupport::scratch().join(format!("loadgen-emptykey-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("key");
        for text in ["", "\n", "   \nk-0123456789abcdef\n", " \t \n"] {
            std::fs::write(&file, text).unwrap();
            let e = ApiKey::load(Some(&file), None).expect_err("a blank first line is refused").to_string();
            assert!(e.starts_with(&format!("--api-key-file {}: ", file.display())), "{e:?}");
            assert!(e.contains("first line is empty or blank"), "{e:?}");
            assert!(!e.contains("k-0123456789abcdef"), "{e:?}");
        }
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// `--gift-give-up 0` (None) never gives a gift up before the publishing ends: against an
    /// endpoint refusing every connection, the first gift is retried the whole time and given up
    /// only at the end, where a give-up time gives up one gift after another.
    #[test]
    fn a_gift_never_given_up_is_retried_until_the_publishing_ends() {
        let http = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap();
        let o = gifts_for(http, 0.5, None);
        assert_eq!(o.offered[0], 1, "one gift, retried to the end: {:?}", o.refused);
        assert_eq!(o.gave_up[0], 1, "given up at the end");
        assert!(o.refused.get("gift error").copied().unwrap_or(0) >= 3, "retried: {:?}", o.refused);
        let o = gifts_for(http, 0.5, Some(Duration::from_millis(60)));
        assert!(o.offered[0] >= 2, "given up after 60 ms each: {:?}", o.offered);
    }

    /// A spell of refusals for good ends the stream's hope once it has lasted HOPELESS_AFTER
    /// with two refusals or more; an acceptance ends the spell, and starts it over.
    #[test]
    fn publishing_is_hopeless_after_a_spell_of_refusals_for_good() {
        let t0 = Instant::now();
        let at = |ms: u64| t0 + Duration::from_millis(ms);
        let mut spell = RefusalSpell::default();
        let mut ms = 0;
        while ms < HOPELESS_AFTER.as_millis() as u64 {
            assert_eq!(spell.refused(at(ms), "r0 answered 401"), None, "at {ms} ms");
            ms += 100;
        }
        let why = spell.refused(at(ms), "r0 answered 401").expect("hopeless");
        assert_eq!(
            why,
            "every answer for 3.0 s was a refusal for good (31 refusals, nothing accepted; last: r0 answered 401)"
        );
        // One refusal, then one 3 s later (nothing answered in between: an edge down).
        let mut spell = RefusalSpell::default();
        assert_eq!(spell.refused(at(0), "x"), None);
        assert!(spell.refused(at(3000), "x").is_some());
        // An acceptance in between starts it over.
        let mut spell = RefusalSpell::default();
        assert_eq!(spell.refused(at(0), "x"), None);
        spell.accepted();
        assert_eq!(spell.refused(at(2900), "x"), None);
        assert_eq!(spell.refused(at(5000), "x"), None, "2.1 s since it began again");
        // A lone refusal is not a spell, however late.
        assert_eq!(RefusalSpell::default().refused(at(10_000), "x"), None);
    }

    /// Every gift refused 401: the publisher stops after HOPELESS_AFTER, saying why, instead of
    /// publishing (and being refused) for the whole run. A 503 to every gift (an edge busy or
    /// restarting) is retried and never stops it.
    #[test]
    fn publishes_refused_for_good_stop_the_publisher_and_transient_ones_do_not() {
        let o = gifts_for(answering_with("401 Unauthorized", ""), 30.0, Some(Duration::from_secs(5)));
        let why = o.stopped_early.as_deref().expect("stopped early");
        assert!(why.starts_with("publish gift stream 0: every answer for 3."), "{why}");
        assert!(why.ends_with("last: r0 answered 401)"), "{why}");
        assert!(o.offered[0] < 30 * 20 / 2, "stopped long before its 600 gifts: {}", o.offered[0]);
        assert_eq!(refused_for_good(&o.refused), vec![format!("gift 401: {}", o.offered[0])]);

        let o = gifts_for(answering_with("503 Service Unavailable", ""), 3.5, Some(Duration::from_secs(1)));
        assert_eq!(o.stopped_early, None, "{:?}", o.refused);
        assert!(o.gave_up[0] >= 2, "{:?}", o.gave_up);
    }
}
