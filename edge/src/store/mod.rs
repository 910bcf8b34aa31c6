//! The durable store of the single-node edge: each room's numbering (epoch, the highest seq
//! that may have been handed out) and its must-deliver history, so that a restart or a long
//! quiet spell continues a room's numbering and `since` still recovers every acknowledged gift.
//!
//! One store thread owns all writes. Engines hand it, once per turn, the records their turn
//! produced, tagged with a token; the thread takes whatever every engine sent since its last
//! commit, writes it in one transaction and makes it durable as `store.fsync` says (one fsync
//! for the whole group: group commit), then tells each engine the highest token now durable.
//! Engines hold must-deliver acknowledgements, and the deliveries of batches that carry them,
//! until then. Reads (a room loaded when an engine first touches it) go straight to the
//! database from the engine's thread: they are rare and short.
//!
//! Seqs are reserved ahead in blocks (`SEQ_RESERVE`): a room's record says the highest seq that
//! may have been used, so the store is written once per block for droppable traffic, and a
//! crash can skip at most a block of numbers but never reuse one. A clean stop writes the
//! exact seq.

pub(crate) mod db;

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, RecvTimeoutError, Sender};
use roomcast_proto::envelope::PushMessage;

use crate::bus::{EngineCmd, Epoch, Mail, Mailbox, RoomName};
use crate::config::{Fsync, StoreConfig};

pub use db::{Db, DbError};

/// Seqs reserved at a time: the store is written once per half to a whole block of a room's
/// messages (beyond its must-deliver messages, which are written one by one: a reservation is
/// renewed once half of it is used), and a crash skips at most this many numbers.
pub const SEQ_RESERVE: u64 = 1024;

/// A room's numbering as stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RoomMeta {
    /// The room's current epoch: a new one means the seq numbering restarted.
    pub epoch: Epoch,
    /// Every seq handed out is at or below it (a reservation while the edge runs; exact after
    /// a clean stop).
    pub seq_hi: u64,
    /// Must-deliver seqs at or below it left history (a `since` below it gets a gap).
    pub evicted_upto: u64,
    /// Last time (Unix seconds) the room was written: rooms untouched for `store.room_ttl_s`
    /// are forgotten.
    pub touched_s: u64,
}

/// What a room has on disk.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Loaded {
    /// Its numbering.
    pub meta: RoomMeta,
    /// Its must-deliver messages, in seq order.
    pub messages: Vec<PushMessage>,
    /// The idempotency keys they were published with (seq, key), in seq order.
    pub keys: Vec<(u64, Box<str>)>,
}

/// One change to the store.
#[derive(Debug, Clone)]
pub enum Record {
    /// The room's numbering. A new epoch also drops whatever the room had under an old one.
    Meta(RoomName, RoomMeta),
    /// A must-deliver message.
    Msg(RoomName, PushMessage),
    /// A must-deliver message published with an idempotency key (kept with it, so that a
    /// retry after a restart is still recognised).
    KeyedMsg(RoomName, PushMessage, Box<str>),
    /// A must-deliver message whose write failed and whose publish was refused: gone, also if
    /// the failed write did reach the journal whole.
    Forget(RoomName, u64),
}

/// How long writes keep failing before the store is reopened (and then between reopens).
const REOPEN_AFTER: Duration = Duration::from_secs(2);

/// How often, at most, `RUN`'s high-water mark of durable batches is brought up to date (a
/// small file written and fsynced: never per batch).
const MARK_EVERY: Duration = Duration::from_secs(1);

/// Why the rooms on disk cannot be trusted to hold everything that was acknowledged, so that
/// every room read back takes a new epoch (clients are reset instead of recovering a history
/// with silent holes, or seqs that meant other messages).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Distrust {
    /// The last run did not stop cleanly under a policy that acknowledges before fsync, and
    /// the machine restarted since (the page cache is gone).
    Reboot,
    /// The database holds fewer record batches than `RUN` recorded as durable: a journal cut
    /// after its fsync (a disk or a virtual disk that lied about it), or database files put
    /// back from an older copy.
    Rollback {
        /// Record batches the database holds.
        found: u64,
        /// Batches `RUN` recorded as durable.
        mark: u64,
    },
    /// `RUN` is not the file the last run wrote (another inode or birth time): the data
    /// directory was copied, or restored from a copy or a backup, which may be older.
    Copied,
    /// `RUN` is missing while the database holds record batches: nothing vouches for it.
    Unmarked {
        /// Record batches the database holds.
        found: u64,
    },
}

impl Distrust {
    /// The label of `roomcast_store_renumbered_total`.
    pub fn label(&self) -> &'static str {
        match self {
            Self::Reboot => "reboot",
            Self::Rollback { .. } => "rollback",
            Self::Copied => "copied",
            Self::Unmarked { .. } => "unmarked",
        }
    }
}

impl std::fmt::Display for Distrust {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Reboot => f.write_str(
                "the last run did not stop cleanly and the machine restarted since, under a policy that acknowledges before fsync: acknowledged gifts may be lost",
            ),
            Self::Rollback { found, mark } => write!(
                f,
                "the database holds {found} record batches but {mark} were durable before (RUN's mark): it came back with less than it acknowledged (a journal cut after fsync, or database files restored from an older copy)",
            ),
            Self::Copied => f.write_str(
                "RUN is not the file the last run wrote (another inode or birth time): the data directory was copied or restored from a copy, which may be older than what clients were given",
            ),
            Self::Unmarked { found } => write!(
                f,
                "RUN is missing but the database holds {found} record batches: nothing vouches that it is the latest state",
            ),
        }
    }
}

/// What an engine sends at the end of a turn.
struct Batch {
    engine: u16,
    token: u64,
    records: Vec<Record>,
}

/// Shared by the store thread and the engines.
pub struct Store {
    /// None only while the store thread reopens it after a write failure (fjall refuses every
    /// write after one failed persist, such as a full disk: only a reopen recovers).
    db: std::sync::RwLock<Option<Db>>,
    cfg: StoreConfig,
    /// At `store.max_bytes`: must-deliver publishes are refused.
    full: AtomicBool,
    /// The last commit failed: must-deliver publishes are refused until one succeeds.
    failed: AtomicBool,
    bytes: AtomicU64,
    gauge: std::sync::OnceLock<prometheus::IntGauge>,
    /// What is on disk may lack acknowledged messages (see `Distrust`): rooms last
    /// written before this second get a new epoch when read back. Kept in `RUN` until then:
    /// a room nobody loads in the first run after the reboot must still be renumbered in a
    /// later one.
    renumber_before: Option<u64>,
    /// Why this run renumbers the rooms it reads back, when it was found at open.
    distrust: Option<Distrust>,
    last_compact: std::sync::Mutex<Option<Instant>>,
    dir: std::path::PathBuf,
}

/// The run marker, `data_dir/RUN`, a few `key=value` lines outside the database:
///
/// - `boot`, `fsync`, `clean`: the boot this store was last opened in, the fsync policy, and
///   whether that run stopped cleanly. A run that did not stop cleanly, under a policy that
///   acknowledges before fsync, followed by a reboot (a power cut or a kernel crash: the page
///   cache is gone), may have lost acknowledged messages; after a mere process crash the kernel
///   still had everything.
/// - `batches`: a high-water mark, record batches known durable (fsynced) when it was written:
///   at open, at most every `MARK_EVERY` while batches are made durable, and at a clean stop.
///   The database counts its batches (`Db::batches`); holding fewer than the mark means it
///   lost batches that were durable.
/// - `file`: the inode and birth time of `RUN` itself, as written (each write is a new file
///   renamed into place). A `RUN` whose own identity differs was not written here: the
///   directory is a copy, or was restored from one, and copies can be older than what clients
///   hold; restoring in place over the current file leaves the old text with the new file's
///   identity, which differs too.
/// - `renumber_before`: rooms last written before this second take a new epoch when read back
///   (renumbering is lazy, per room as it is read, so it is carried on until every such room
///   was read or forgotten).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
struct RunMarker {
    boot: String,
    fsync: String,
    clean: bool,
    batches: Option<u64>,
    file: Option<String>,
    renumber_before: Option<u64>,
}

impl RunMarker {
    fn parse(text: &str) -> Self {
        let field = |k: &str| text.lines().find_map(|l| l.strip_prefix(k)).map(str::to_owned);
        Self {
            boot: field("boot=").unwrap_or_default(),
            fsync: field("fsync=").unwrap_or_default(),
            clean: field("clean=").as_deref() == Some("1"),
            batches: field("batches=").and_then(|v| v.parse().ok()),
            file: field("file="),
            renumber_before: field("renumber_before=").and_then(|v| v.parse().ok()),
        }
    }

    /// Writes it to `path` atomically (a new file, fsynced, renamed into place), with the new
    /// file's own identity in `file`.
    fn write(&self, path: &Path) -> Result<(), DbError> {
        use std::io::Write;
        let tmp = path.with_extension("tmp");
        {
            let mut f = std::fs::File::create(&tmp)?;
            let file = identity(&f.metadata()?);
            write!(f, "boot={}\nfsync={}\nclean={}\nfile={file}\n", self.boot, self.fsync, u8::from(self.clean))?;
            if let Some(b) = self.batches {
                writeln!(f, "batches={b}")?;
            }
            if let Some(b) = self.renumber_before {
                writeln!(f, "renumber_before={b}")?;
            }
            f.sync_all()?;
        }
        std::fs::rename(&tmp, path)?;
        Ok(())
    }
}

/// A file's identity: its inode, and its birth time where the filesystem keeps one
/// (`ino:btime_ns`, or `ino:-`). A copy gets a new one, whatever tool made it.
fn identity(m: &std::fs::Metadata) -> String {
    use std::os::unix::fs::MetadataExt;
    match m.created().ok().and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok()) {
        Some(b) => format!("{}:{}", m.ino(), b.as_nanos()),
        None => format!("{}:-", m.ino()),
    }
}

/// Whether `found` (the file as it is) is the file `recorded` names. Birth times are compared
/// where both sides have one (inode numbers are reused: a directory deleted and copied back
/// can get the same ones); without, the inode alone.
fn same_file(recorded: &str, found: &str) -> bool {
    let split = |s: &str| s.split_once(':').map(|(i, b)| (i.to_owned(), (b != "-").then(|| b.to_owned())));
    match (split(recorded), split(found)) {
        (Some((ri, Some(rb))), Some((fi, Some(fb)))) => ri == fi && rb == fb,
        (Some((ri, _)), Some((fi, _))) => ri == fi,
        _ => false,
    }
}

fn policy_name(fsync: Fsync) -> String {
    match fsync {
        Fsync::Always => "always".to_owned(),
        Fsync::Never => "never".to_owned(),
        Fsync::IntervalMs(ms) => ms.to_string(),
    }
}

fn boot_id() -> String {
    std::fs::read_to_string("/proc/sys/kernel/random/boot_id").unwrap_or_default().trim().to_owned()
}

/// Reads the last run's marker and decides whether the rooms on disk can be trusted (see
/// `Distrust`); `found`: the record batches the database holds now, made durable before this
/// is called. Marks this run as running, with `found` as its first high-water mark.
///
/// Returns why not, if not, and the second before which rooms on disk must be renumbered:
/// `opened_s` when distrusted now, else what an earlier run recorded, else None.
fn check_run(dir: &Path, fsync: Fsync, opened_s: u64, found: u64) -> Result<(Option<Distrust>, Option<u64>), DbError> {
    let path = dir.join("RUN");
    let text = std::fs::read_to_string(&path).ok().filter(|t| !t.trim().is_empty());
    let prev = RunMarker::parse(text.as_deref().unwrap_or(""));
    let boot = boot_id();
    let distrust = match &text {
        // A store made before the database counted its batches has none, and no mark either.
        None if found > 0 => Some(Distrust::Unmarked { found }),
        None => None,
        Some(_) => {
            let lossy = prev.fsync != "always";
            let here = std::fs::metadata(&path).map(|m| identity(&m)).unwrap_or_default();
            if prev.file.as_deref().is_some_and(|f| !same_file(f, &here)) {
                Some(Distrust::Copied)
            } else if let Some(mark) = prev.batches.filter(|&m| m > found) {
                Some(Distrust::Rollback { found, mark })
            } else if !prev.clean && prev.boot != boot && lossy {
                Some(Distrust::Reboot)
            } else {
                None
            }
        }
    };
    let renumber_before = if distrust.is_some() { Some(opened_s) } else { prev.renumber_before };
    let now =
        RunMarker { boot, fsync: policy_name(fsync), clean: false, batches: Some(found), file: None, renumber_before };
    now.write(&path)?;
    Ok((distrust, renumber_before))
}

impl Store {
    /// Opens (or creates) the store in `dir`, which it locks: a second edge on the same
    /// directory is refused.
    pub fn open(dir: &Path, cfg: &StoreConfig) -> Result<Arc<Self>, DbError> {
        let db = Db::open(dir)?;
        tracing::info!(rooms_approx = db.rooms(), "store: rooms on disk (approximate until compaction)");
        // Everything up to the end of this second counts as the last run's (a room this run
        // writes in its first second and reloads at once would only be reset twice).
        let opened_s = crate::bus::now_us() / 1_000_000 + 1;
        // What a process crash left in the page cache is made durable before it is marked so.
        db.sync()?;
        let (distrust, renumber_before) = check_run(dir, cfg.fsync, opened_s, db.batches())?;
        match &distrust {
            Some(Distrust::Reboot) => tracing::warn!(
                "store: {}, so every room starts a new epoch (clients are told with reset); numbering continues above every seq on disk",
                Distrust::Reboot
            ),
            Some(d) => tracing::error!(
                reason = d.label(),
                "store: {d}; every room starts a new epoch (clients are told with reset), numbering continues above every seq on disk"
            ),
            None => {}
        }
        let bytes = db.disk_bytes();
        let s = Arc::new(Self {
            db: std::sync::RwLock::new(Some(db)),
            cfg: cfg.clone(),
            full: AtomicBool::new(false),
            failed: AtomicBool::new(false),
            bytes: AtomicU64::new(bytes),
            gauge: std::sync::OnceLock::new(),
            renumber_before,
            distrust,
            last_compact: std::sync::Mutex::new(None),
            dir: dir.to_owned(),
        });
        s.check_full();
        Ok(s)
    }

    /// Why every room read back in this run takes a new epoch, if that was decided at open
    /// (counted in `roomcast_store_renumbered_total`).
    pub fn distrust(&self) -> Option<&Distrust> {
        self.distrust.as_ref()
    }

    /// For `/healthz`: "ok", "full" (at `store.max_bytes`: must-deliver publishes get 507) or
    /// "failing" (writes fail: they get 503 until a write works again).
    pub fn state(&self) -> &'static str {
        if self.failed.load(Ordering::Relaxed) {
            "failing"
        } else if self.full.load(Ordering::Relaxed) {
            "full"
        } else {
            "ok"
        }
    }

    fn with_db<T>(&self, f: impl FnOnce(&Db) -> Result<T, DbError>) -> Result<T, DbError> {
        let g = self.db.read().unwrap_or_else(std::sync::PoisonError::into_inner);
        match g.as_ref() {
            Some(db) => f(db),
            None => Err(DbError::Open("the store is being reopened after a write failure".into())),
        }
    }

    fn disk_bytes_now(&self) -> u64 {
        self.with_db(|db| Ok(db.disk_bytes())).unwrap_or(0)
    }

    /// Closes and opens the database again (after a failed write: fjall refuses every write
    /// once a persist failed, so a full disk that has room again needs this). What the failed
    /// write left at the journal's tail is cut on open; the store thread then writes the
    /// batches it kept.
    fn reopen(&self) -> Result<(), DbError> {
        let mut g = self.db.write().unwrap_or_else(std::sync::PoisonError::into_inner);
        // The old database goes first: it holds the directory's lock.
        drop(g.take());
        *g = Some(Db::open(&self.dir)?);
        Ok(())
    }

    fn check_full(&self) {
        let mut b = self.disk_bytes_now();
        if b >= self.cfg.max_bytes {
            // Retention deletes by marking: reclaim what it marked before calling it full.
            let mut last = self.last_compact.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
            if last.is_none_or(|t| t.elapsed() >= Duration::from_secs(5)) {
                *last = Some(Instant::now());
                if let Err(e) = self.with_db(Db::compact) {
                    tracing::warn!(error = %e, "store compaction failed");
                }
                b = self.disk_bytes_now();
            }
        }
        self.bytes.store(b, Ordering::Relaxed);
        if let Some(g) = self.gauge.get() {
            g.set(b as i64);
        }
        let full = b >= self.cfg.max_bytes;
        if full != self.full.swap(full, Ordering::Relaxed) {
            if full {
                tracing::error!(
                    bytes = b,
                    max = self.cfg.max_bytes,
                    "store full: must-deliver publishes are refused (507) until retention frees space"
                );
            } else {
                tracing::info!(bytes = b, "store has room again");
            }
        }
    }

    /// Keeps a moderation ban (durably, before it is answered).
    pub fn put_ban(&self, ban: &crate::moderation::Ban) -> Result<(), DbError> {
        self.with_db(|db| db.put_ban(ban))
    }

    /// Forgets a moderation ban.
    pub fn remove_ban(&self, room: &str, user: &str) -> Result<(), DbError> {
        self.with_db(|db| db.remove_ban(room, user))
    }

    /// The moderation bans still in force at `now_ms`.
    pub fn bans(&self, now_ms: u64) -> Result<Vec<crate::moderation::Ban>, DbError> {
        self.with_db(|db| db.bans(now_ms))
    }

    /// This run's marker: `batches` known durable, and whether it stopped cleanly.
    fn marker(&self, clean: bool, batches: u64) -> RunMarker {
        RunMarker {
            boot: boot_id(),
            fsync: policy_name(self.cfg.fsync),
            clean,
            batches: Some(batches),
            file: None,
            renumber_before: self.renumber_before,
        }
    }

    /// Bytes the store uses on disk (sampled after each commit and sweep).
    pub fn bytes(&self) -> u64 {
        self.bytes.load(Ordering::Relaxed)
    }

    /// Starts the store thread. `engines`: every engine's mailbox, by engine id (where the
    /// durable acknowledgements go). Returns the per-engine handles and the thread, which ends
    /// once every handle is dropped and the last records are durable.
    pub fn start(
        self: &Arc<Self>,
        engines: Vec<Mailbox>,
        history_max_age: Duration,
        bytes_gauge: prometheus::IntGauge,
    ) -> std::io::Result<(Vec<StoreHandle>, JoinHandle<()>)> {
        bytes_gauge.set(self.bytes() as i64);
        let _ = self.gauge.set(bytes_gauge);
        let (tx, rx) = crossbeam_channel::unbounded();
        let progress = Arc::new(Progress {
            durable: (0..engines.len()).map(|_| AtomicU64::new(0)).collect(),
            lock: std::sync::Mutex::new(()),
            cond: std::sync::Condvar::new(),
        });
        let handles = (0..engines.len())
            .map(|i| StoreHandle { store: self.clone(), tx: tx.clone(), engine: i as u16, progress: progress.clone() })
            .collect();
        let store = self.clone();
        let h = std::thread::Builder::new().name("roomcast-store".into()).spawn(move || {
            crate::sys::raise_thread_priority();
            store.run(&rx, &engines, &progress, history_max_age);
        })?;
        Ok((handles, h))
    }

    fn run(&self, rx: &Receiver<Batch>, engines: &[Mailbox], progress: &Progress, max_age: Duration) {
        let mut durable = vec![0u64; engines.len()];
        let mut written = vec![0u64; engines.len()];
        // The highest token of each engine whose batch failed, and of those it was told about.
        let (mut failed, mut told) = (vec![0u64; engines.len()], vec![0u64; engines.len()]);
        let mut last_sync = Instant::now();
        let mut dirty = false;
        let mut last_sweep = Instant::now();
        let (mut wrote, mut last_check) = (false, Instant::now());
        let mut pending: Vec<Batch> = Vec::new();
        let (mut failed_since, mut last_reopen): (Option<Instant>, Option<Instant>) = (None, None);
        // RUN's high-water mark: batches known durable, and what RUN says now.
        let mut synced = self.with_db(|db| Ok(db.batches())).unwrap_or(0);
        let (mut marked, mut last_mark, mut mark_ok) = (synced, Instant::now(), true);
        loop {
            let wait = match self.cfg.fsync {
                Fsync::IntervalMs(ms) if dirty => Duration::from_millis(ms).saturating_sub(last_sync.elapsed()),
                _ => Duration::from_secs(1),
            };
            let closed = match rx.recv_timeout(wait) {
                Ok(b) => {
                    pending.push(b);
                    pending.extend(rx.try_iter());
                    false
                }
                Err(RecvTimeoutError::Timeout) => false,
                Err(RecvTimeoutError::Disconnected) => true,
            };
            if !pending.is_empty() {
                let records: Vec<&Record> = pending.iter().flat_map(|b| b.records.iter()).collect();
                // A room's numbering (its seq reservation, its epoch) is fsynced whatever the
                // policy: a reservation lost to a power cut would let the numbering restart
                // below seqs clients already hold.
                let numbering = records.iter().any(|r| matches!(r, Record::Meta(..)));
                let sync_now = matches!(self.cfg.fsync, Fsync::Always) || closed || numbering;
                match self.with_db(|db| db.write(&records, sync_now).map(|()| db.batches())) {
                    Ok(batches) => {
                        if self.failed.swap(false, Ordering::Relaxed) {
                            tracing::info!("store writes again");
                            failed_since = None;
                        }
                        for b in pending.drain(..) {
                            let e = usize::from(b.engine);
                            written[e] = written[e].max(b.token);
                        }
                        wrote = true;
                        dirty = !sync_now;
                        if sync_now {
                            last_sync = Instant::now();
                            synced = batches;
                        }
                    }
                    Err(e) => {
                        if !self.failed.swap(true, Ordering::Relaxed) {
                            tracing::error!(error = %e, "store write failed: must-deliver publishes are refused until it works again");
                            failed_since = Some(Instant::now());
                        }
                        // What the batches numbered stays to be written (a room's numbering
                        // must reach the disk before it goes further); their must-deliver
                        // messages are refused now, not held for as long as the disk is full
                        // (their rooms' deliveries and joins wait for them): each becomes a
                        // deletion, in case the failed write did reach the journal whole.
                        for b in &mut pending {
                            for r in &mut b.records {
                                if let Record::Msg(room, m) | Record::KeyedMsg(room, m, _) = r {
                                    *r = Record::Forget(room.clone(), m.seq);
                                }
                            }
                            let e = usize::from(b.engine);
                            failed[e] = failed[e].max(b.token);
                        }
                        for (e, mb) in engines.iter().enumerate() {
                            if failed[e] > told[e] {
                                told[e] = failed[e];
                                mb.send_blocking(Mail::Engine(EngineCmd::StoreFailed { token: failed[e] }));
                            }
                        }
                        // Keep the batches and try again shortly; every few seconds from a
                        // fresh open (after one failed persist fjall refuses every write).
                        std::thread::sleep(Duration::from_millis(100));
                        if failed_since.is_some_and(|t| t.elapsed() >= REOPEN_AFTER)
                            && last_reopen.is_none_or(|t: Instant| t.elapsed() >= REOPEN_AFTER)
                        {
                            last_reopen = Some(Instant::now());
                            match self.reopen() {
                                Ok(()) => tracing::info!("store reopened after a write failure"),
                                Err(e) => tracing::warn!(error = %e, "store reopen failed; trying again"),
                            }
                        }
                        if !closed {
                            continue;
                        }
                        return;
                    }
                }
            }
            if let Fsync::IntervalMs(ms) = self.cfg.fsync
                && dirty
                && last_sync.elapsed() >= Duration::from_millis(ms)
            {
                match self.with_db(|db| db.sync().map(|()| db.batches())) {
                    Err(e) => tracing::error!(error = %e, "store fsync failed"),
                    Ok(batches) => {
                        dirty = false;
                        last_sync = Instant::now();
                        synced = batches;
                    }
                }
            }
            if synced > marked && last_mark.elapsed() >= MARK_EVERY && !closed {
                last_mark = Instant::now();
                match self.marker(false, synced).write(&self.dir.join("RUN")) {
                    Ok(()) => {
                        marked = synced;
                        mark_ok = true;
                    }
                    Err(e) if mark_ok => {
                        mark_ok = false;
                        tracing::warn!(error = %e, "store: cannot bring RUN's mark of durable batches up to date");
                    }
                    Err(_) => {}
                }
            }
            // Written counts as durable for `interval` and `never` (a process crash loses
            // nothing the kernel has); for `always` it was synced in the same step.
            for (e, mb) in engines.iter().enumerate() {
                if written[e] > durable[e] {
                    durable[e] = written[e];
                    progress.durable[e].store(durable[e], Ordering::Release);
                    mb.send_blocking(Mail::Engine(EngineCmd::Durable { token: durable[e] }));
                }
            }
            {
                let _g = progress.lock.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
                progress.cond.notify_all();
            }
            if last_sweep.elapsed() >= Duration::from_secs(10) || closed {
                last_sweep = Instant::now();
                let now_us = crate::bus::now_us();
                let older = now_us.saturating_sub(max_age.as_micros() as u64);
                let untouched = now_us / 1_000_000 - self.cfg.room_ttl_s.min(now_us / 1_000_000);
                if let Err(e) = self.with_db(|db| db.sweep(older, untouched)) {
                    tracing::warn!(error = %e, "store retention sweep failed");
                }
                self.check_full();
            } else if wrote && last_check.elapsed() >= Duration::from_millis(100) {
                // The bound is looked at as the store grows (at most ten times a second).
                wrote = false;
                last_check = Instant::now();
                self.check_full();
            }
            if closed {
                match self.with_db(|db| db.sync().map(|()| db.batches())) {
                    Err(e) => tracing::error!(error = %e, "store fsync at stop failed"),
                    Ok(batches) => {
                        if let Err(e) = self.marker(true, batches).write(&self.dir.join("RUN")) {
                            tracing::warn!(error = %e, "store: cannot mark the clean stop");
                        }
                    }
                }
                tracing::info!(bytes = self.disk_bytes_now(), "store closed");
                return;
            }
        }
    }
}

/// How far each engine's batches are durable, for an engine that must wait (at its stop).
struct Progress {
    durable: Box<[AtomicU64]>,
    lock: std::sync::Mutex<()>,
    cond: std::sync::Condvar,
}

/// An engine's way to the store.
#[derive(Clone)]
pub struct StoreHandle {
    store: Arc<Store>,
    tx: Sender<Batch>,
    engine: u16,
    progress: Arc<Progress>,
}

impl StoreHandle {
    /// The room as stored, if it is.
    pub fn load(&self, room: &str) -> Result<Option<Loaded>, DbError> {
        self.store.with_db(|db| db.load(room))
    }

    /// Rooms last written before this second must take a new epoch when read back (the disk
    /// may lack acknowledged messages: see `Distrust`); None: no need.
    pub fn renumber_before(&self) -> Option<u64> {
        self.store.renumber_before
    }

    /// Hands a turn's records to the store thread.
    pub fn send(&self, token: u64, records: Vec<Record>) {
        let _ = self.tx.send(Batch { engine: self.engine, token, records });
    }

    /// Waits (at most `timeout`) until this engine's batches up to `token` are durable; returns
    /// the durable token. For the engine's stop only: engines never wait on the store otherwise.
    pub fn wait_durable(&self, token: u64, timeout: Duration) -> u64 {
        let d = &self.progress.durable[usize::from(self.engine)];
        let end = Instant::now() + timeout;
        let mut g = self.progress.lock.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        loop {
            let now = d.load(Ordering::Acquire);
            let left = end.saturating_duration_since(Instant::now());
            if now >= token || left.is_zero() {
                return now;
            }
            g = self
                .progress
                .cond
                .wait_timeout(g, left.min(Duration::from_millis(50)))
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .0;
        }
    }

    /// Whether writes fail now (nothing can be made durable: rooms number no further than
    /// their durable reservation, see `Engine::publish`).
    pub fn failing(&self) -> bool {
        self.store.failed.load(Ordering::Relaxed)
    }

    /// Why must-deliver publishes are refused now, if they are.
    pub fn refusal(&self) -> Option<crate::bus::PublishError> {
        if self.store.failed.load(Ordering::Relaxed) {
            Some(crate::bus::PublishError::StoreUnavailable)
        } else if self.store.full.load(Ordering::Relaxed) {
            Some(crate::bus::PublishError::StoreFull)
        } else {
            None
        }
    }
}

/// A store without its thread, for the engine's tests: they read what the engine sends and
/// answer for the store themselves (`EngineCmd::Durable`, `EngineCmd::StoreFailed`).
#[cfg(test)]
pub(crate) struct Detached {
    pub store: Arc<Store>,
    rx: Receiver<Batch>,
}

#[cfg(test)]
impl Detached {
    /// A store in a fresh directory under `name`, and one engine's handle on it.
    pub(crate) fn new(name: &str) -> (StoreHandle, Self) {
        let dir = roomcast_testsupport::scratch().join(format!(
            "roomcast-detached-{name}-{}-{:?}",
            std::process::id(),
            std::thread::current().id()
        ));
        let _ = std::fs::remove_dir_all(&dir);
        let store = Store::open(&dir, &StoreConfig::default()).expect("store");
        let (tx, rx) = crossbeam_channel::unbounded();
        let progress = Arc::new(Progress {
            durable: vec![AtomicU64::new(0)].into_boxed_slice(),
            lock: std::sync::Mutex::new(()),
            cond: std::sync::Condvar::new(),
        });
        let h = StoreHandle { store: store.clone(), tx, engine: 0, progress };
        (h, Self { store, rx })
    }

    /// The batches sent so far: (token, records).
    pub(crate) fn sent(&self) -> Vec<(u64, Vec<Record>)> {
        self.rx.try_iter().map(|b| (b.token, b.records)).collect()
    }

    /// Writes fail (or work again), as the store thread would say.
    pub(crate) fn set_failing(&self, on: bool) {
        self.store.failed.store(on, Ordering::Relaxed);
    }
}

#[cfg(test)]
impl Drop for Detached {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.store.dir);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tempdir(name: &str) -> std::path::PathBuf {
        let d = roomcast_testsupport::scratch().join(format!(
            "roomcast-store-{name}-{}-{:?}",
            std::process::id(),
            std::thread::current().id()
        ));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    fn gift(room: &str, seq: u64) -> Record {
        let m = PushMessage { seq, ts_us: seq, kind: "gift".into(), user: "u".into(), body: "{}".into() };
        Record::Msg(RoomName::from(room), m)
    }

    #[test]
    fn the_marker_round_trips_and_names_its_own_file() {
        let dir = tempdir("marker");
        let path = dir.join("RUN");
        let m = RunMarker {
            boot: "b".into(),
            fsync: "always".into(),
            clean: true,
            batches: Some(42),
            file: None,
            renumber_before: Some(7),
        };
        m.write(&path).unwrap();
        let back = RunMarker::parse(&std::fs::read_to_string(&path).unwrap());
        let here = identity(&std::fs::metadata(&path).unwrap());
        assert_eq!(back, RunMarker { file: Some(here.clone()), ..m });
        assert!(same_file(back.file.as_deref().unwrap(), &here));
        // Birth times decide where both have one; the inode alone where either lacks it.
        assert!(!same_file("12:100", "12:200"));
        assert!(same_file("12:-", "12:200") && !same_file("12:-", "13:-"));
        assert!(!same_file("", &here));
    }

    /// The decisions at open, one by one: a store that stopped cleanly is trusted; one with
    /// fewer batches than RUN's mark, a RUN that is a copy (a new file, or the old text
    /// written back over the current file), or batches without any RUN are not.
    #[test]
    fn check_run_trusts_only_the_directory_it_left() {
        let dir = tempdir("check");
        let path = dir.join("RUN");
        let check = |found| check_run(&dir, Fsync::Always, 1_000, found).unwrap();
        assert_eq!(check(0), (None, None), "a new store");
        assert_eq!(check(5), (None, None), "as it was left (mark 0)");
        assert_eq!(check(5), (None, None), "as it was left (mark 5)");
        assert_eq!(check(9), (None, None), "more than the mark: written after it");
        assert_eq!(check(3), (Some(Distrust::Rollback { found: 3, mark: 9 }), Some(1_000)));
        // Carried on: rooms last written before that second are still renumbered later.
        assert_eq!(check(3), (None, Some(1_000)));

        // A copy of RUN (what cp, rsync or a restore makes: a new file with the same text).
        let text = std::fs::read_to_string(&path).unwrap();
        std::fs::remove_file(&path).unwrap();
        std::fs::write(&path, &text).unwrap();
        assert_eq!(check(3).0, Some(Distrust::Copied));
        // An older RUN written back over the current file (same inode, old text).
        let older = std::fs::read_to_string(&path).unwrap();
        assert_eq!(check(3).0, None);
        std::fs::write(&path, older).unwrap();
        assert_eq!(check(3).0, Some(Distrust::Copied));

        std::fs::remove_file(&path).unwrap();
        assert_eq!(check(3).0, Some(Distrust::Unmarked { found: 3 }));
        std::fs::write(&path, "").unwrap();
        assert_eq!(check(3).0, Some(Distrust::Unmarked { found: 3 }), "an empty RUN vouches for nothing");
        let _ = std::fs::remove_dir_all(dir);
    }

    /// A journal cut after its batches were fsynced (a disk that lied about fsync): the store
    /// comes back with fewer batches than RUN's mark and says so; a clean reopen does not.
    #[test]
    fn a_journal_cut_after_fsync_is_detected() {
        let dir = tempdir("cut");
        let cfg = StoreConfig::default();
        let mut cut_at = Vec::new();
        {
            let s = Store::open(&dir, &cfg).unwrap();
            assert!(s.distrust().is_none());
            for seq in 1..=6 {
                s.with_db(|db| db.write(&[&gift("r", seq)], true)).unwrap();
                if seq == 3 {
                    cut_at = db::journal_data_ends(&dir.join("db"));
                }
            }
            let batches = s.with_db(|db| Ok(db.batches())).unwrap();
            assert_eq!(batches, 6);
            s.marker(true, batches).write(&dir.join("RUN")).unwrap();
        }
        {
            let s = Store::open(&dir, &cfg).unwrap();
            assert!(s.distrust().is_none(), "a clean reopen is trusted");
        }
        assert_eq!(cut_at.len(), 1, "one journal: {cut_at:?}");
        let (jnl, end) = &cut_at[0];
        std::fs::OpenOptions::new().write(true).open(jnl).unwrap().set_len(*end).unwrap();
        let s = Store::open(&dir, &cfg).unwrap();
        assert_eq!(s.distrust(), Some(&Distrust::Rollback { found: 3, mark: 6 }));
        assert_eq!(s.with_db(|db| db.load("r")).unwrap(), None, "no meta record was written");
        let _ = std::fs::remove_dir_all(dir);
    }
}
