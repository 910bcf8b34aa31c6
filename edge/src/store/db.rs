//! The store's database: fjall (an LSM tree with a checksummed journal), two keyspaces.
//!
//! - `meta`: room name -> epoch, seq_hi, evicted_upto, touched_s (four little-endian u64);
//!   and `BATCHES_KEY` (0x00 first: no room name holds it) -> how many record batches the
//!   store has committed (u64 LE), written with each batch: what `RUN`'s high-water mark is
//!   compared with on open.
//! - `msgs`: room name, 0x00, seq (big-endian u64) -> ts_us (u64), kind, user (u16-length
//!   prefixed), body. Room names never hold 0x00, so a room's messages are one key range in
//!   seq order.
//! - `bans`: room name, 0x00, user -> the ban's end (ms since the Unix epoch, u64 LE):
//!   moderation's bans, so that a restart does not lift them. Written by the HTTP runtime
//!   directly (rare, and independent of the rooms' message order), fsynced.
//!
//! Why fjall (bench-results/2026-11-30-store-choice): writes go to its journal, which reaches
//! the kernel at each commit (a process crash loses nothing written) and is fsynced only when
//! asked, which is exactly the `store.fsync` policies; a torn batch at the journal's tail is
//! detected by checksum and cut off on open. FIFO deletes are tombstones that compaction drops.

use std::fs::File;
use std::path::{Path, PathBuf};

use fjall::{Database, Keyspace, KeyspaceCreateOptions, PersistMode};
use roomcast_proto::envelope::PushMessage;

use super::{Loaded, Record, RoomMeta};

/// What can go wrong opening, reading or writing the room store.
#[derive(Debug, thiserror::Error)]
pub enum DbError {
    /// The storage engine (fjall) failed.
    #[error("{0}")]
    Db(#[from] fjall::Error),
    /// A file operation on the data directory failed.
    #[error("{0}")]
    Io(#[from] std::io::Error),
    /// Another process holds the directory's LOCK file.
    #[error("in use by another edge (lock {0}): give each edge its own data_dir")]
    Locked(PathBuf),
    /// A stored record for the room does not decode: the data is damaged.
    #[error("unreadable record for room {0}")]
    Corrupt(String),
    /// fjall could not open the database (damaged): the message says how to start empty.
    #[error("cannot open the store: {0}")]
    Open(String),
}

/// The room store on disk: room numbering, must-deliver messages and bans, in a fjall database.
pub struct Db {
    db: Database,
    meta: Keyspace,
    msgs: Keyspace,
    bans: Keyspace,
    /// Record batches committed (the value under `BATCHES_KEY`, as of the last commit).
    batches: std::sync::atomic::AtomicU64,
    /// Held for the process's life: one edge per directory.
    _lock: File,
    /// Where the sweep's walk over the rooms resumes.
    cursor: std::sync::Mutex<Vec<u8>>,
}

/// The key of the committed-batch count in `meta` (room names never hold 0x00).
const BATCHES_KEY: &[u8] = b"\0batches";

/// Rooms the retention sweep visits per call (it runs every few seconds; a walk over very many
/// rooms is spread over several calls).
const SWEEP_ROOMS: usize = 20_000;

impl Db {
    /// Opens (creating it if needed) the database in `dir`, taking its LOCK file for the process's life.
    pub fn open(dir: &Path) -> Result<Self, DbError> {
        std::fs::create_dir_all(dir)?;
        let lock_path = dir.join("LOCK");
        let lock = File::options().create(true).truncate(false).write(true).open(&lock_path)?;
        // flock(LOCK_EX | LOCK_NB) on Linux; held until `lock` is dropped with the Db.
        if lock.try_lock().is_err() {
            return Err(DbError::Locked(lock_path));
        }
        let path = dir.join("db");
        let before = journal_data_ends(&path);
        // Two workers are plenty for a store written by one thread: flushes and compaction.
        // Journals are flushed into tables by 128 MiB (fjall's default lets them reach 512 MiB,
        // which would count against store.max_bytes long after retention deleted their data).
        let db = Database::builder(&path).worker_threads(2).max_journaling_size(128 << 20).open().map_err(|e| {
            DbError::Open(format!(
                "{e}: if the data directory is damaged, move it aside; the edge then starts empty and every room takes a new epoch (clients are told with reset)"
            ))
        })?;
        // fjall checks each journal batch's checksum on open and cuts the file after the last
        // whole one. Journals are preallocated with zeros, so a cut over zeros is just an
        // unclean stop; a cut over written bytes is a torn (or corrupt) write: say so.
        let mut torn = 0;
        for (file, data_end) in before {
            if let Ok(m) = std::fs::metadata(&file) {
                torn += data_end.saturating_sub(m.len());
            }
        }
        if torn > 0 {
            tracing::warn!(
                dropped_bytes = torn,
                "store: a torn write at the journal's tail (a crash, or a write that failed, such as on a full disk) was detected and cut off; every batch before it is kept"
            );
        }
        let meta = db.keyspace("meta", KeyspaceCreateOptions::default)?;
        let msgs = db.keyspace("msgs", KeyspaceCreateOptions::default)?;
        let bans = db.keyspace("bans", KeyspaceCreateOptions::default)?;
        let batches = meta.get(BATCHES_KEY)?.and_then(|v| Some(u64::from_le_bytes(v.get(..8)?.try_into().ok()?)));
        Ok(Self {
            db,
            meta,
            msgs,
            bans,
            batches: std::sync::atomic::AtomicU64::new(batches.unwrap_or(0)),
            _lock: lock,
            cursor: std::sync::Mutex::new(Vec::new()),
        })
    }

    /// Record batches committed so far (over the store's life: what it holds).
    pub fn batches(&self) -> u64 {
        self.batches.load(std::sync::atomic::Ordering::Acquire)
    }

    /// Bytes the database takes on disk (0 if unknown).
    pub fn disk_bytes(&self) -> u64 {
        self.db.disk_space().unwrap_or(0)
    }

    /// Applies `records` atomically; with `sync`, fsynced (fdatasync) before returning, else
    /// handed to the kernel.
    pub fn write(&self, records: &[&Record], sync: bool) -> Result<(), DbError> {
        let mut batch =
            self.db.batch().durability(Some(if sync { PersistMode::SyncData } else { PersistMode::Buffer }));
        for r in records {
            match r {
                Record::Meta(room, m) => {
                    let prev = self.meta.get(room.as_bytes())?.and_then(|v| decode_meta(&v));
                    match prev {
                        // A new numbering (or a first record while messages of a forgotten
                        // numbering linger): the old messages are void.
                        None => {
                            for k in self.msgs.prefix(room_prefix(room)).map(fjall::Guard::key) {
                                batch.remove(&self.msgs, k?);
                            }
                        }
                        Some(p) if p.epoch != m.epoch => {
                            for k in self.msgs.prefix(room_prefix(room)).map(fjall::Guard::key) {
                                batch.remove(&self.msgs, k?);
                            }
                        }
                        Some(p) if m.evicted_upto > p.evicted_upto => {
                            // From past the last eviction: what lies below is tombstones, and
                            // walking them on every eviction made each one slower than the last
                            // until a compaction (0.3-0.5 s stalls every 10 s at 38k gifts/s).
                            let from = msg_key(room, p.evicted_upto.saturating_add(1));
                            let to = msg_key(room, m.evicted_upto);
                            for k in self.msgs.range(from..=to).map(fjall::Guard::key) {
                                batch.remove(&self.msgs, k?);
                            }
                        }
                        _ => {}
                    }
                    batch.insert(&self.meta, room.as_bytes(), encode_meta(m));
                }
                Record::Msg(room, msg) => batch.insert(&self.msgs, msg_key(room, msg.seq), encode_msg(msg, None)),
                Record::KeyedMsg(room, msg, key) => {
                    batch.insert(&self.msgs, msg_key(room, msg.seq), encode_msg(msg, Some(key)));
                }
                Record::Forget(room, seq) => batch.remove(&self.msgs, msg_key(room, *seq)),
            }
        }
        // Only the store thread writes: no other commit comes between the read and the store.
        let n = self.batches() + 1;
        batch.insert(&self.meta, BATCHES_KEY, n.to_le_bytes());
        batch.commit()?;
        self.batches.store(n, std::sync::atomic::Ordering::Release);
        Ok(())
    }

    /// Keeps a ban (replacing one for the same room and user), durably.
    pub fn put_ban(&self, ban: &crate::moderation::Ban) -> Result<(), DbError> {
        let mut batch = self.db.batch().durability(Some(PersistMode::SyncData));
        batch.insert(&self.bans, ban_key(&ban.room, &ban.user), ban.until_ms.to_le_bytes());
        batch.commit()?;
        Ok(())
    }

    /// Forgets a ban, durably.
    pub fn remove_ban(&self, room: &str, user: &str) -> Result<(), DbError> {
        let mut batch = self.db.batch().durability(Some(PersistMode::SyncData));
        batch.remove(&self.bans, ban_key(room, user));
        batch.commit()?;
        Ok(())
    }

    /// The bans still in force at `now_ms`; expired ones are deleted on the way.
    pub fn bans(&self, now_ms: u64) -> Result<Vec<crate::moderation::Ban>, DbError> {
        let (mut out, mut expired) = (Vec::new(), Vec::new());
        for kv in self.bans.iter() {
            let (k, v) = kv.into_inner()?;
            let until = v.get(..8).and_then(|b| b.try_into().ok()).map(u64::from_le_bytes);
            let split = k.iter().position(|&b| b == 0);
            match (until, split) {
                (Some(until), Some(i)) if until > now_ms => out.push(crate::moderation::Ban {
                    room: String::from_utf8_lossy(&k[..i]).into_owned(),
                    user: String::from_utf8_lossy(&k[i + 1..]).into_owned(),
                    until_ms: until,
                }),
                _ => expired.push(k),
            }
        }
        if !expired.is_empty() {
            let mut batch = self.db.batch();
            for k in expired {
                batch.remove(&self.bans, k);
            }
            batch.commit()?;
        }
        Ok(out)
    }

    /// Rewrites the tables without what retention deleted (tombstones take space until a
    /// compaction reaches them): what `store.max_bytes` needs when it is reached.
    pub fn compact(&self) -> Result<(), DbError> {
        self.db.persist(PersistMode::SyncData)?;
        self.meta.rotate_memtable_and_wait()?;
        self.msgs.rotate_memtable_and_wait()?;
        self.meta.major_compact()?;
        self.msgs.major_compact()?;
        Ok(())
    }

    /// Rooms on disk (approximate).
    pub fn rooms(&self) -> usize {
        self.meta.approximate_len()
    }

    /// Makes everything written so far durable (fsync of the journal).
    pub fn sync(&self) -> Result<(), DbError> {
        self.db.persist(PersistMode::SyncData)?;
        Ok(())
    }

    /// The room as stored.
    pub fn load(&self, room: &str) -> Result<Option<Loaded>, DbError> {
        let Some(meta) = self.meta.get(room.as_bytes())? else { return Ok(None) };
        let meta = decode_meta(&meta).ok_or_else(|| DbError::Corrupt(room.to_owned()))?;
        let (mut messages, mut keys) = (Vec::new(), Vec::new());
        let from = msg_key(room, meta.evicted_upto.saturating_add(1));
        for kv in self.msgs.range(from..=msg_key(room, u64::MAX)) {
            let (k, v) = kv.into_inner()?;
            let seq = seq_of(&k).ok_or_else(|| DbError::Corrupt(room.to_owned()))?;
            let (m, key) = decode_msg(seq, &v).ok_or_else(|| DbError::Corrupt(room.to_owned()))?;
            if let Some(key) = key {
                keys.push((seq, key));
            }
            messages.push(m);
        }
        Ok(Some(Loaded { meta, messages, keys }))
    }

    /// Retention on disk: messages older than `older_than_us` go (the room's `evicted_upto`
    /// follows, so a `since` below them gets a gap), and rooms untouched since `untouched_s`
    /// go whole. Walks up to `SWEEP_ROOMS` rooms from where the last call stopped.
    pub fn sweep(&self, older_than_us: u64, untouched_s: u64) -> Result<(), DbError> {
        let mut cursor = self.cursor.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        let mut batch = self.db.batch();
        let mut next = Vec::new();
        for (seen, kv) in self.meta.range(cursor.clone()..).enumerate() {
            let (room, v) = kv.into_inner()?;
            if seen == SWEEP_ROOMS {
                next = room.to_vec();
                break;
            }
            if room.first() == Some(&0) {
                continue;
            }
            let Some(mut m) = decode_meta(&v) else { continue };
            let name = String::from_utf8_lossy(&room).into_owned();
            if m.touched_s < untouched_s {
                for k in self.msgs.prefix(room_prefix(&name)).map(fjall::Guard::key) {
                    batch.remove(&self.msgs, k?);
                }
                batch.remove(&self.meta, room.clone());
                continue;
            }
            let mut evicted = m.evicted_upto;
            let from = msg_key(&name, m.evicted_upto.saturating_add(1));
            let to = msg_key(&name, u64::MAX);
            for kv in self.msgs.range(from..=to) {
                let (k, v) = kv.into_inner()?;
                let (Some(seq), Some(ts)) =
                    (seq_of(&k), v.get(..8).map(|b| u64::from_le_bytes(b.try_into().unwrap_or([0; 8]))))
                else {
                    break;
                };
                if ts >= older_than_us {
                    break;
                }
                batch.remove(&self.msgs, k);
                evicted = evicted.max(seq);
            }
            if evicted > m.evicted_upto {
                m.evicted_upto = evicted;
                batch.insert(&self.meta, room, encode_meta(&m));
            }
        }
        *cursor = next;
        batch.commit()?;
        Ok(())
    }
}

/// Each journal file under `path` and where its written bytes end (past the last non-zero
/// byte: journals are preallocated with zeros).
pub(super) fn journal_data_ends(path: &Path) -> Vec<(PathBuf, u64)> {
    fn data_end(file: &Path) -> std::io::Result<u64> {
        use std::io::{Read, Seek, SeekFrom};
        let mut f = File::open(file)?;
        let mut end = f.metadata()?.len();
        let mut buf = vec![0u8; 64 * 1024];
        while end > 0 {
            let n = (end as usize).min(buf.len());
            f.seek(SeekFrom::Start(end - n as u64))?;
            f.read_exact(&mut buf[..n])?;
            if let Some(i) = buf[..n].iter().rposition(|&b| b != 0) {
                return Ok(end - n as u64 + i as u64 + 1);
            }
            end -= n as u64;
        }
        Ok(0)
    }
    fn walk(p: &Path, out: &mut Vec<(PathBuf, u64)>) {
        let Ok(rd) = std::fs::read_dir(p) else { return };
        for e in rd.flatten() {
            let p = e.path();
            if p.is_dir() {
                walk(&p, out);
            } else if p.extension().is_some_and(|x| x == "jnl")
                && let Ok(end) = data_end(&p)
            {
                out.push((p, end));
            }
        }
    }
    let mut out = Vec::new();
    walk(path, &mut out);
    out
}

fn room_prefix(room: &str) -> Vec<u8> {
    let mut k = Vec::with_capacity(room.len() + 1);
    k.extend_from_slice(room.as_bytes());
    k.push(0);
    k
}

fn ban_key(room: &str, user: &str) -> Vec<u8> {
    let mut k = room_prefix(room);
    k.extend_from_slice(user.as_bytes());
    k
}

pub(crate) fn msg_key(room: &str, seq: u64) -> Vec<u8> {
    let mut k = room_prefix(room);
    k.extend_from_slice(&seq.to_be_bytes());
    k
}

pub(crate) fn seq_of(key: &[u8]) -> Option<u64> {
    let b: [u8; 8] = key.get(key.len().checked_sub(8)?..)?.try_into().ok()?;
    Some(u64::from_be_bytes(b))
}

pub(crate) fn encode_meta(m: &RoomMeta) -> Vec<u8> {
    let mut v = Vec::with_capacity(32);
    for x in [m.epoch, m.seq_hi, m.evicted_upto, m.touched_s] {
        v.extend_from_slice(&x.to_le_bytes());
    }
    v
}

pub(crate) fn decode_meta(v: &[u8]) -> Option<RoomMeta> {
    let u = |i: usize| Some(u64::from_le_bytes(v.get(i * 8..i * 8 + 8)?.try_into().ok()?));
    Some(RoomMeta { epoch: u(0)?, seq_hi: u(1)?, evicted_upto: u(2)?, touched_s: u(3)? })
}

/// Set in the kind's length field when an idempotency key follows the user (kinds are at most
/// 32 bytes, so values written before keys existed never have it).
const KEYED: u16 = 0x8000;

/// ts (u64 LE), kind and user (u16 LE length, bytes each; the kind's length carries `KEYED`),
/// the key if any (u16 LE length, bytes), then the body.
pub(crate) fn encode_msg(m: &PushMessage, key: Option<&str>) -> Vec<u8> {
    let extra = key.map_or(0, |k| 2 + k.len());
    let mut v = Vec::with_capacity(12 + m.kind.len() + m.user.len() + m.body.len() + extra);
    v.extend_from_slice(&m.ts_us.to_le_bytes());
    for (i, s) in [m.kind.as_str(), m.user.as_str()].into_iter().chain(key).enumerate() {
        // Kinds are at most 32 bytes, users and keys 64 (validated before they get here).
        let n = s.len().min(usize::from(u16::MAX >> 1));
        let flag = if i == 0 && key.is_some() { KEYED } else { 0 };
        v.extend_from_slice(&(n as u16 | flag).to_le_bytes());
        v.extend_from_slice(&s.as_bytes()[..n]);
    }
    v.extend_from_slice(m.body.as_bytes());
    v
}

pub(crate) fn decode_msg(seq: u64, v: &[u8]) -> Option<(PushMessage, Option<Box<str>>)> {
    let ts_us = u64::from_le_bytes(v.get(..8)?.try_into().ok()?);
    let mut at = 8;
    let mut text = |mask: u16| {
        let n = u16::from_le_bytes(v.get(at..at + 2)?.try_into().ok()?);
        let len = usize::from(n & !mask);
        let s = std::str::from_utf8(v.get(at + 2..at + 2 + len)?).ok()?.to_owned();
        at += 2 + len;
        Some((s, n & mask != 0))
    };
    let (kind, keyed) = text(KEYED)?;
    let (user, _) = text(0)?;
    let key = if keyed { Some(text(0)?.0.into_boxed_str()) } else { None };
    let body = std::str::from_utf8(v.get(at..)?).ok()?.to_owned();
    Some((PushMessage { seq, ts_us, kind, user, body }, key))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bus::RoomName;

    fn msg(seq: u64, ts_us: u64) -> PushMessage {
        PushMessage { seq, ts_us, kind: "gift".into(), user: "alice".into(), body: format!("{{\"n\":{seq}}}") }
    }

    fn meta(epoch: u64, seq_hi: u64, evicted_upto: u64) -> RoomMeta {
        RoomMeta { epoch, seq_hi, evicted_upto, touched_s: 1_800_000_000 }
    }

    #[test]
    fn rooms_round_trip_and_survive_a_reopen() {
        let dir = tempdir("roundtrip");
        let room = RoomName::from("show-1");
        {
            let db = Db::open(&dir).unwrap();
            assert!(db.load("show-1").unwrap().is_none());
            let recs = [
                Record::Meta(room.clone(), meta(7, 1024, 0)),
                Record::Msg(room.clone(), msg(1, 10)),
                Record::Msg(room.clone(), msg(2, 20)),
            ];
            db.write(&recs.iter().collect::<Vec<_>>(), true).unwrap();
            // Another room with a prefix of this one's name stays apart.
            let other = RoomName::from("show");
            db.write(&[&Record::Meta(other.clone(), meta(8, 5, 0)), &Record::Msg(other, msg(3, 30))], true).unwrap();
        }
        let db = Db::open(&dir).unwrap();
        let l = db.load("show-1").unwrap().unwrap();
        assert_eq!(l.meta, meta(7, 1024, 0));
        assert_eq!(l.messages, vec![msg(1, 10), msg(2, 20)]);
        assert_eq!(db.load("show").unwrap().unwrap().messages, vec![msg(3, 30)]);
    }

    #[test]
    fn a_second_edge_on_the_same_directory_is_refused() {
        let dir = tempdir("lock");
        let _a = Db::open(&dir).unwrap();
        assert!(matches!(Db::open(&dir), Err(DbError::Locked(_))));
    }

    #[test]
    fn eviction_and_new_epochs_drop_messages() {
        let dir = tempdir("evict");
        let db = Db::open(&dir).unwrap();
        let room = RoomName::from("r");
        let mut recs = vec![Record::Meta(room.clone(), meta(1, 1024, 0))];
        recs.extend((1..=5).map(|s| Record::Msg(room.clone(), msg(s, s * 10))));
        db.write(&recs.iter().collect::<Vec<_>>(), false).unwrap();
        db.write(&[&Record::Meta(room.clone(), meta(1, 1024, 3))], false).unwrap();
        assert_eq!(db.load("r").unwrap().unwrap().messages.iter().map(|m| m.seq).collect::<Vec<_>>(), vec![4, 5]);
        db.write(&[&Record::Meta(room.clone(), meta(2, 0, 0))], false).unwrap();
        assert!(db.load("r").unwrap().unwrap().messages.is_empty(), "a new epoch starts empty");
    }

    /// Messages left under a room whose record is gone (forgotten by the ttl sweep while
    /// still written to) must not come back inside the next numbering of that room.
    #[test]
    fn a_first_record_drops_orphaned_messages() {
        let dir = tempdir("orphans");
        let db = Db::open(&dir).unwrap();
        let room = RoomName::from("o");
        db.write(&[&Record::Msg(room.clone(), msg(4, 40)), &Record::Msg(room.clone(), msg(5, 50))], false).unwrap();
        db.write(&[&Record::Meta(room.clone(), meta(9, 1024, 0)), &Record::Msg(room.clone(), msg(1, 60))], false)
            .unwrap();
        assert_eq!(db.load("o").unwrap().unwrap().messages, vec![msg(1, 60)]);
    }

    #[test]
    fn sweep_ages_messages_out_and_forgets_untouched_rooms() {
        let dir = tempdir("sweep");
        let db = Db::open(&dir).unwrap();
        let (a, b) = (RoomName::from("a"), RoomName::from("b"));
        let mut recs = vec![Record::Meta(a.clone(), meta(1, 1024, 0))];
        recs.extend((1..=4).map(|s| Record::Msg(a.clone(), msg(s, s * 100))));
        let mut old = meta(2, 9, 0);
        old.touched_s = 10;
        recs.push(Record::Meta(b.clone(), old));
        recs.push(Record::Msg(b, msg(1, 1)));
        db.write(&recs.iter().collect::<Vec<_>>(), false).unwrap();
        db.sweep(250, 1_000).unwrap();
        let l = db.load("a").unwrap().unwrap();
        assert_eq!(l.messages.iter().map(|m| m.seq).collect::<Vec<_>>(), vec![3, 4]);
        assert_eq!(l.meta.evicted_upto, 2, "a since below the aged-out messages gets a gap");
        assert!(db.load("b").unwrap().is_none(), "untouched past the ttl: forgotten");
    }

    /// A message's idempotency key is kept with it and read back; values written before keys
    /// existed (no flag) read as before.
    #[test]
    fn idempotency_keys_are_kept_with_their_messages() {
        let dir = tempdir("keys");
        let db = Db::open(&dir).unwrap();
        let room = RoomName::from("k");
        let recs = [
            Record::Meta(room.clone(), meta(1, 1024, 0)),
            Record::KeyedMsg(room.clone(), msg(1, 10), "order-1".into()),
            Record::Msg(room.clone(), msg(2, 20)),
            Record::KeyedMsg(room.clone(), msg(3, 30), "x".repeat(64).into()),
        ];
        db.write(&recs.iter().collect::<Vec<_>>(), true).unwrap();
        let l = db.load("k").unwrap().unwrap();
        assert_eq!(l.messages, vec![msg(1, 10), msg(2, 20), msg(3, 30)]);
        assert_eq!(l.keys, vec![(1, "order-1".into()), (3, "x".repeat(64).into())]);
        let old = [&[20u8, 0, 0, 0, 0, 0, 0, 0][..], &[4, 0], b"gift", &[1, 0], b"u", b"{}"].concat();
        let (m, key) = decode_msg(7, &old).unwrap();
        assert_eq!((m.kind.as_str(), m.user.as_str(), m.body.as_str(), key), ("gift", "u", "{}", None));
    }

    /// Bans survive a reopen; expired ones are not read back (and are deleted).
    #[test]
    fn bans_are_kept_until_they_expire() {
        use crate::moderation::Ban;
        let dir = tempdir("bans");
        let ban = |room: &str, user: &str, until_ms| Ban { room: room.into(), user: user.into(), until_ms };
        {
            let db = Db::open(&dir).unwrap();
            db.put_ban(&ban("show", "alice", 5_000)).unwrap();
            db.put_ban(&ban("show", "bob\u{0}x", 9_000)).unwrap();
            db.put_ban(&ban("show-2", "alice", 100)).unwrap();
            db.put_ban(&ban("show", "carol", 9_000)).unwrap();
            db.remove_ban("show", "carol").unwrap();
        }
        let db = Db::open(&dir).unwrap();
        assert_eq!(db.bans(1_000).unwrap(), vec![ban("show", "alice", 5_000), ban("show", "bob\u{0}x", 9_000)]);
        assert_eq!(db.bans(6_000).unwrap(), vec![ban("show", "bob\u{0}x", 9_000)]);
        assert_eq!(db.bans(1_000).unwrap().len(), 1, "expired bans were deleted");
    }

    #[test]
    fn corrupt_values_are_errors_not_panics() {
        assert!(decode_msg(1, &[1, 2, 3]).is_none());
        assert!(decode_msg(1, &[0, 0, 0, 0, 0, 0, 0, 0, 9, 0, b'a']).is_none());
        assert!(decode_meta(&[0; 31]).is_none());
    }

    fn tempdir(name: &str) -> PathBuf {
        let d = roomcast_testsupport::scratch().join(format!(
            "roomcast-db-{name}-{}-{:?}",
            std::process::id(),
            std::thread::current().id()
        ));
        let _ = std::fs::remove_dir_all(&d);
        d
    }
}
