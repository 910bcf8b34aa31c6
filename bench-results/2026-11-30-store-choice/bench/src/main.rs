//! Storage-engine bench for roomcast's durable room history (issue #11).
//!
//! One "store thread" (this thread) commits groups of gift records (plus the rooms' meta:
//! epoch + seq_hi reservation) to one of three engines: redb, fjall, or a plain
//! append-only segmented log ([len u32][crc32 u32][payload], fdatasync per group).
//!
//! Usage:
//!   store-choice-bench [--dir DIR] [--engines redb,fjall,log] [--phases all|PHASE,...]
//!   store-choice-bench crash-child ENGINE DIR      (internal: used by the crash phase)
//!
//! Phases: throughput, churn (includes restore), crash, torn.

// Single-engine builds (used to time compiles) leave some shared helpers unused.
#![cfg_attr(
    not(all(feature = "redb", feature = "fjall", feature = "log")),
    allow(dead_code, unused_imports)
)]

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::fs;
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

// ---------------------------------------------------------------------------------------------
// Workload
// ---------------------------------------------------------------------------------------------

const ROOMS: u32 = 1_000;
const SEQ_RESERVE: u64 = 1_024;
/// Target size of one stored record (key + value), bytes.
const RECORD_BYTES: usize = 200;

fn splitmix64(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
    x = (x ^ (x >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    x ^ (x >> 31)
}

fn room_name(r: u32) -> String {
    format!("room-{r:05}")
}

/// Message key: [room len u8][room bytes][seq u64 BE] -> per-room FIFO order in a sorted store.
fn msg_key(room: &str, seq: u64) -> Vec<u8> {
    let mut k = Vec::with_capacity(1 + room.len() + 8);
    k.push(room.len() as u8);
    k.extend_from_slice(room.as_bytes());
    k.extend_from_slice(&seq.to_be_bytes());
    k
}

fn split_msg_key(k: &[u8]) -> (&[u8], u64) {
    let n = k[0] as usize;
    let room = &k[1..1 + n];
    let seq = u64::from_be_bytes(k[1 + n..1 + n + 8].try_into().unwrap());
    (room, seq)
}

/// Value: [ts_us u64 LE][kind len u8][kind][user len u8][user][JSON body]
fn msg_value(ts_us: u64, user: &str, i: u64, key_len: usize) -> Vec<u8> {
    let mut v = Vec::with_capacity(RECORD_BYTES);
    v.extend_from_slice(&ts_us.to_le_bytes());
    v.push(4);
    v.extend_from_slice(b"gift");
    v.push(user.len() as u8);
    v.extend_from_slice(user.as_bytes());
    const GIFTS: [&str; 4] = ["rose", "rocket", "castle", "heart"];
    let mut body = format!(
        "{{\"gift\":\"{}\",\"count\":{},\"value\":{},\"msg\":\"",
        GIFTS[(i % 4) as usize],
        1 + i % 9,
        (i * 37) % 10_000
    );
    // Pseudo-random text for the rest, so LZ4 (fjall) gets no unfair help from padding.
    const ALNUM: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789 ";
    let want = RECORD_BYTES - key_len - v.len() - 2;
    let mut x = i;
    while body.len() < want {
        x = splitmix64(x);
        body.push(ALNUM[(x % ALNUM.len() as u64) as usize] as char);
    }
    body.push_str("\"}");
    v.extend_from_slice(body.as_bytes());
    v
}

#[derive(Clone)]
struct Rec {
    room: u32,
    seq: u64,
    key: Vec<u8>,
    val: Vec<u8>,
}

/// Meta value: [epoch u64 LE][seq_hi u64 LE]
type Meta = [u8; 16];

fn meta_value(epoch: u64, seq_hi: u64) -> Meta {
    let mut m = [0u8; 16];
    m[..8].copy_from_slice(&epoch.to_le_bytes());
    m[8..].copy_from_slice(&seq_hi.to_le_bytes());
    m
}

/// One commit group as the store thread would receive it from the room engines.
#[derive(Default)]
struct Group {
    puts: Vec<Rec>,
    metas: Vec<(u32, Meta)>,
    dels: Vec<(u32, u64)>,
}

struct Workload {
    seq: Vec<u64>,
    seq_hi: Vec<u64>,
    retained: Vec<VecDeque<u64>>,
    keep: Option<usize>,
    i: u64,
    names: Vec<String>,
}

impl Workload {
    fn new(keep: Option<usize>) -> Self {
        Workload {
            seq: vec![0; ROOMS as usize],
            seq_hi: vec![0; ROOMS as usize],
            retained: vec![VecDeque::new(); ROOMS as usize],
            keep,
            i: 0,
            names: (0..ROOMS).map(room_name).collect(),
        }
    }

    fn next_group(&mut self, n: usize) -> Group {
        let mut g = Group::default();
        for _ in 0..n {
            self.i += 1;
            let r = (splitmix64(self.i) % ROOMS as u64) as u32;
            let ri = r as usize;
            self.seq[ri] += 1;
            let seq = self.seq[ri];
            if seq > self.seq_hi[ri] {
                self.seq_hi[ri] += SEQ_RESERVE;
                let epoch = splitmix64(0xE90C ^ r as u64);
                g.metas.push((r, meta_value(epoch, self.seq_hi[ri])));
            }
            let key = msg_key(&self.names[ri], seq);
            let user = format!("user-{:07}", splitmix64(self.i ^ 0xABCD) % 10_000_000);
            let ts = 1_764_460_800_000_000 + self.i * 1_000;
            let val = msg_value(ts, &user, self.i, key.len());
            g.puts.push(Rec { room: r, seq, key, val });
            if let Some(keep) = self.keep {
                self.retained[ri].push_back(seq);
                if self.retained[ri].len() > keep {
                    let old = self.retained[ri].pop_front().unwrap();
                    g.dels.push((r, old));
                }
            }
        }
        g
    }
}

// ---------------------------------------------------------------------------------------------
// Engines
// ---------------------------------------------------------------------------------------------

#[derive(Default, Debug)]
struct Restored {
    rooms_with_meta: usize,
    msgs: usize,
    bytes: usize,
}

/// What the edge would rebuild at start: per room its meta and retained messages, in seq order.
#[derive(Default)]
struct RoomState {
    meta: Option<Meta>,
    msgs: Vec<(u64, Vec<u8>)>,
}

fn summarize(rooms: HashMap<Vec<u8>, RoomState>, keep: Option<usize>) -> Restored {
    let mut out = Restored::default();
    for (_, mut st) in rooms {
        if st.meta.is_some() {
            out.rooms_with_meta += 1;
        }
        st.msgs.sort_unstable_by_key(|m| m.0);
        if let Some(k) = keep
            && st.msgs.len() > k
        {
            st.msgs.drain(..st.msgs.len() - k);
        }
        out.msgs += st.msgs.len();
        out.bytes += st.msgs.iter().map(|m| m.1.len()).sum::<usize>();
    }
    out
}

trait Engine: Sized {
    const NAME: &'static str;
    fn open(dir: &Path, durable: bool) -> Self;
    fn commit(&mut self, g: &Group);
    /// Read everything back (meta + messages); `keep` re-applies the count bound (log only
    /// needs it: the B-tree/LSM stores had the deletes applied).
    fn restore(&mut self, keep: Option<usize>) -> Restored;
    /// Optional space reclamation after churn (redb compact, fjall flush+major compaction).
    fn reclaim(&mut self) {}
    fn close(self);
}

// ----- redb ---------------------------------------------------------------------------------

#[cfg(feature = "redb")]
mod redb_engine {
    use super::*;
    use redb::{Database, Durability, ReadableDatabase, ReadableTable, TableDefinition};

    const MSGS: TableDefinition<&[u8], &[u8]> = TableDefinition::new("msgs");
    const META: TableDefinition<&[u8], &[u8]> = TableDefinition::new("meta");

    pub struct Redb {
        db: Database,
        durable: bool,
        names: Vec<String>,
    }

    impl Engine for Redb {
        const NAME: &'static str = "redb";
        fn open(dir: &Path, durable: bool) -> Self {
            fs::create_dir_all(dir).unwrap();
            let db = Database::create(dir.join("history.redb")).unwrap();
            Redb { db, durable, names: (0..ROOMS).map(room_name).collect() }
        }
        fn commit(&mut self, g: &Group) {
            let mut tx = self.db.begin_write().unwrap();
            tx.set_durability(if self.durable { Durability::Immediate } else { Durability::None })
                .unwrap();
            {
                let mut t = tx.open_table(MSGS).unwrap();
                for r in &g.puts {
                    t.insert(r.key.as_slice(), r.val.as_slice()).unwrap();
                }
                for &(room, seq) in &g.dels {
                    let k = msg_key(&self.names[room as usize], seq);
                    t.remove(k.as_slice()).unwrap();
                }
                if !g.metas.is_empty() {
                    let mut m = tx.open_table(META).unwrap();
                    for (room, v) in &g.metas {
                        m.insert(self.names[*room as usize].as_bytes(), v.as_slice()).unwrap();
                    }
                }
            }
            tx.commit().unwrap();
        }
        fn restore(&mut self, keep: Option<usize>) -> Restored {
            let tx = self.db.begin_read().unwrap();
            let mut rooms: HashMap<Vec<u8>, RoomState> = HashMap::new();
            if let Ok(m) = tx.open_table(META) {
                for e in m.iter().unwrap() {
                    let (k, v) = e.unwrap();
                    rooms.entry(k.value().to_vec()).or_default().meta =
                        Some(v.value().try_into().unwrap());
                }
            }
            if let Ok(t) = tx.open_table(MSGS) {
                for e in t.iter().unwrap() {
                    let (k, v) = e.unwrap();
                    let (room, seq) = split_msg_key(k.value());
                    rooms.entry(room.to_vec()).or_default().msgs.push((seq, v.value().to_vec()));
                }
            }
            summarize(rooms, keep)
        }
        fn reclaim(&mut self) {
            while self.db.compact().unwrap() {}
        }
        fn close(self) {
            drop(self.db);
        }
    }
}

// ----- fjall --------------------------------------------------------------------------------

#[cfg(feature = "fjall")]
mod fjall_engine {
    use super::*;
    use fjall::{Database, Keyspace, KeyspaceCreateOptions, PersistMode};

    pub struct Fjall {
        db: Database,
        msgs: Keyspace,
        meta: Keyspace,
        durable: bool,
        names: Vec<String>,
    }

    impl Engine for Fjall {
        const NAME: &'static str = "fjall";
        fn open(dir: &Path, durable: bool) -> Self {
            let db = Database::builder(dir).open().unwrap();
            let msgs = db.keyspace("msgs", KeyspaceCreateOptions::default).unwrap();
            let meta = db.keyspace("meta", KeyspaceCreateOptions::default).unwrap();
            Fjall { db, msgs, meta, durable, names: (0..ROOMS).map(room_name).collect() }
        }
        fn commit(&mut self, g: &Group) {
            // Default batch durability is PersistMode::Buffer (write() to the OS, no fsync).
            let mut b = self.db.batch();
            if self.durable {
                b = b.durability(Some(PersistMode::SyncData));
            }
            for r in &g.puts {
                b.insert(&self.msgs, r.key.as_slice(), r.val.as_slice());
            }
            for &(room, seq) in &g.dels {
                b.remove(&self.msgs, msg_key(&self.names[room as usize], seq));
            }
            for (room, v) in &g.metas {
                b.insert(&self.meta, self.names[*room as usize].as_bytes(), v.as_slice());
            }
            b.commit().unwrap();
        }
        fn restore(&mut self, keep: Option<usize>) -> Restored {
            let mut rooms: HashMap<Vec<u8>, RoomState> = HashMap::new();
            for e in self.meta.iter() {
                let (k, v) = e.into_inner().unwrap();
                rooms.entry(k.to_vec()).or_default().meta = Some((&*v).try_into().unwrap());
            }
            for e in self.msgs.iter() {
                let (k, v) = e.into_inner().unwrap();
                let (room, seq) = split_msg_key(&k);
                rooms.entry(room.to_vec()).or_default().msgs.push((seq, v.to_vec()));
            }
            summarize(rooms, keep)
        }
        fn reclaim(&mut self) {
            self.msgs.rotate_memtable_and_wait().unwrap();
            self.meta.rotate_memtable_and_wait().unwrap();
            self.msgs.major_compact().unwrap();
            self.db.persist(PersistMode::SyncAll).unwrap();
        }
        fn close(self) {
            drop(self.msgs);
            drop(self.meta);
            drop(self.db);
        }
    }
}

// ----- append-only segmented log ------------------------------------------------------------

#[cfg(feature = "log")]
mod log_engine {
    use super::*;
    use std::fs::{File, OpenOptions};
    use std::io::Read;
    use std::os::unix::fs::FileExt;

    const SEGMENT_BYTES: u64 = 4 << 20;
    const T_MSG: u8 = 1;
    const T_META: u8 = 2;

    /// Where each live record is, so the store can tell which records of an old segment are
    /// still live (the retention index: ~16 B per retained message) and how many live bytes
    /// each segment has.
    #[derive(Default)]
    struct RoomIdx {
        msgs: VecDeque<(u64, u32, u32)>, // seq, segment, framed len
        meta: Option<(Meta, u32, u32)>,  // value, segment, framed len
    }

    pub struct Log {
        dir: PathBuf,
        durable: bool,
        pub compaction: bool,
        /// Size new segments to SEGMENT_BYTES up front (sparse set_len, as fjall does with its
        /// journal): appends then stay under i_size, so fdatasync has no size to journal.
        prealloc: bool,
        active: File,
        active_id: u32,
        active_len: u64,
        /// Per segment: (total bytes, live bytes).
        segs: BTreeMap<u32, (u64, u64)>,
        idx: Vec<RoomIdx>,
        names: Vec<String>,
        buf: Vec<u8>,
        pub rewritten_bytes: u64,
        pub compactions: u64,
        pub compaction_time: Duration,
    }

    fn seg_path(dir: &Path, id: u32) -> PathBuf {
        dir.join(format!("seg-{id:08}.log"))
    }

    fn frame(buf: &mut Vec<u8>, payload_parts: &[&[u8]]) -> u32 {
        let len: usize = payload_parts.iter().map(|p| p.len()).sum();
        let mut h = crc32fast::Hasher::new();
        for p in payload_parts {
            h.update(p);
        }
        buf.extend_from_slice(&(len as u32).to_le_bytes());
        buf.extend_from_slice(&h.finalize().to_le_bytes());
        for p in payload_parts {
            buf.extend_from_slice(p);
        }
        (8 + len) as u32
    }

    fn open_segment(path: &Path, prealloc: bool) -> File {
        let f = OpenOptions::new()
            .create(true)
            .truncate(false)
            .read(true)
            .write(true)
            .open(path)
            .unwrap();
        if prealloc && f.metadata().unwrap().len() == 0 {
            f.set_len(SEGMENT_BYTES).unwrap();
        }
        f
    }

    fn fsync_dir(dir: &Path) {
        File::open(dir).unwrap().sync_all().unwrap();
    }

    /// Parse one segment: calls `f(offset, payload)` per valid record; returns the offset of
    /// the end of the last valid record and whether it stopped on a bad/torn record.
    pub fn scan(data: &[u8], mut f: impl FnMut(u64, &[u8])) -> (u64, bool) {
        let mut off = 0usize;
        while off + 8 <= data.len() {
            let len = u32::from_le_bytes(data[off..off + 4].try_into().unwrap()) as usize;
            let crc = u32::from_le_bytes(data[off + 4..off + 8].try_into().unwrap());
            if len == 0 && data[off..].iter().all(|&b| b == 0) {
                return (off as u64, false); // preallocated, never written
            }
            if len == 0 || off + 8 + len > data.len() {
                return (off as u64, true);
            }
            let p = &data[off + 8..off + 8 + len];
            if crc32fast::hash(p) != crc {
                return (off as u64, true);
            }
            f(off as u64, p);
            off += 8 + len;
        }
        (off as u64, off != data.len())
    }

    impl Log {
        fn roll(&mut self) {
            if self.prealloc {
                self.active.set_len(self.active_len).unwrap(); // trim the sealed segment
            }
            self.active.sync_data().unwrap();
            self.active_id += 1;
            self.active = open_segment(&seg_path(&self.dir, self.active_id), self.prealloc);
            fsync_dir(&self.dir);
            self.active_len = 0;
            self.segs.insert(self.active_id, (0, 0));
        }

        fn append_buf(&mut self) {
            self.active.write_all_at(&self.buf, self.active_len).unwrap();
            self.active_len += self.buf.len() as u64;
            self.buf.clear();
        }

        /// Rewrite the live records of sealed segments that are less than half live, then
        /// unlink them. Bound: disk <= 2 x live bytes + one active segment + one being written.
        fn maybe_compact(&mut self) {
            let victims: Vec<u32> = self
                .segs
                .iter()
                .filter(|(id, (tot, live))| **id != self.active_id && *live * 2 < *tot)
                .map(|(id, _)| *id)
                .collect();
            if victims.is_empty() {
                return;
            }
            let t0 = Instant::now();
            for id in victims {
                let data = fs::read(seg_path(&self.dir, id)).unwrap();
                // Which (room, seq) of this segment are live: from the index.
                let mut moved: Vec<(usize, Option<u64>, u32)> = Vec::new(); // room, seq|meta, len
                let base = self.buf.len();
                let (_, bad) = scan(&data, |_, p| {
                    let t = p[0];
                    let rl = p[1] as usize;
                    let room = std::str::from_utf8(&p[2..2 + rl]).unwrap();
                    let r: usize = room[5..].parse().unwrap();
                    let ri = &self.idx[r];
                    if t == T_MSG {
                        let seq = u64::from_be_bytes(p[2 + rl..2 + rl + 8].try_into().unwrap());
                        // The room's retained seqs are sorted: binary search.
                        let live = ri
                            .msgs
                            .binary_search_by_key(&seq, |m| m.0)
                            .is_ok_and(|at| ri.msgs[at].1 == id);
                        if live {
                            let n = frame(&mut self.buf, &[p]);
                            moved.push((r, Some(seq), n));
                        }
                    } else if t == T_META && matches!(ri.meta, Some((_, s, _)) if s == id) {
                        let n = frame(&mut self.buf, &[p]);
                        moved.push((r, None, n));
                    }
                });
                assert!(!bad, "sealed segment {id} has a bad record");
                self.rewritten_bytes += (self.buf.len() - base) as u64;
                let new_id = self.active_id;
                for (r, seq, n) in moved {
                    match seq {
                        Some(seq) => {
                            let q = &mut self.idx[r].msgs;
                            if let Ok(at) = q.binary_search_by_key(&seq, |m| m.0) {
                                q[at].1 = new_id;
                                q[at].2 = n;
                            }
                        }
                        None => {
                            let m = self.idx[r].meta.as_mut().unwrap();
                            m.1 = new_id;
                            m.2 = n;
                        }
                    }
                    let e = self.segs.get_mut(&new_id).unwrap();
                    e.0 += n as u64;
                    e.1 += n as u64;
                }
                self.append_buf();
                // The copies must be durable before the old segment goes.
                self.active.sync_data().unwrap();
                fs::remove_file(seg_path(&self.dir, id)).unwrap();
                self.segs.remove(&id);
                self.compactions += 1;
            }
            fsync_dir(&self.dir);
            self.compaction_time += t0.elapsed();
        }

        fn dec_live(&mut self, seg: u32, n: u32) {
            if let Some(e) = self.segs.get_mut(&seg) {
                e.1 -= n as u64;
            }
        }

        pub fn disk_accounting(&self) -> (u64, u64) {
            self.segs.values().fold((0, 0), |a, v| (a.0 + v.0, a.1 + v.1))
        }
    }

    impl Engine for Log {
        const NAME: &'static str = "log";
        fn open(dir: &Path, durable: bool) -> Self {
            Log::open_with(dir, durable, false)
        }
        fn commit(&mut self, g: &Group) {
            self.commit_group(g)
        }
        fn restore(&mut self, keep: Option<usize>) -> Restored {
            self.restore_all(keep)
        }
        fn close(self) {
            self.active.sync_all().unwrap();
        }
    }

    /// The same log with preallocated segments.
    pub struct LogPre(pub Log);
    impl Engine for LogPre {
        const NAME: &'static str = "log-pre";
        fn open(dir: &Path, durable: bool) -> Self {
            LogPre(Log::open_with(dir, durable, true))
        }
        fn commit(&mut self, g: &Group) {
            self.0.commit_group(g)
        }
        fn restore(&mut self, keep: Option<usize>) -> Restored {
            self.0.restore_all(keep)
        }
        fn close(self) {
            self.0.active.sync_all().unwrap();
        }
    }

    impl Log {
        fn open_with(dir: &Path, durable: bool, prealloc: bool) -> Self {
            fs::create_dir_all(dir).unwrap();
            let mut ids: Vec<u32> = fs::read_dir(dir)
                .unwrap()
                .filter_map(|e| {
                    let n = e.unwrap().file_name().into_string().unwrap();
                    n.strip_prefix("seg-")?.strip_suffix(".log")?.parse().ok()
                })
                .collect();
            ids.sort();
            let active_id = ids.last().copied().unwrap_or(1);
            let path = seg_path(dir, active_id);
            let active = open_segment(&path, prealloc);
            // Where the next record goes: the end of the last valid record (restore truncates
            // a torn tail; a preallocated segment is longer than its data).
            let (active_len, _) = scan(&fs::read(&path).unwrap(), |_, _| {});
            let mut segs = BTreeMap::new();
            for id in &ids {
                let l = if *id == active_id {
                    active_len
                } else {
                    fs::metadata(seg_path(dir, *id)).unwrap().len()
                };
                segs.insert(*id, (l, l)); // live unknown until restore; assume all live
            }
            segs.entry(active_id).or_insert((0, 0));
            fsync_dir(dir);
            Log {
                dir: dir.to_path_buf(),
                durable,
                compaction: true,
                prealloc,
                active,
                active_id,
                active_len,
                segs,
                idx: (0..ROOMS).map(|_| RoomIdx::default()).collect(),
                names: (0..ROOMS).map(room_name).collect(),
                buf: Vec::with_capacity(1 << 20),
                rewritten_bytes: 0,
                compactions: 0,
                compaction_time: Duration::ZERO,
            }
        }

        fn commit_group(&mut self, g: &Group) {
            let id = self.active_id;
            let mut added = 0u64;
            // Metas first: a torn tail drops a suffix, so a surviving message always has
            // its seq reservation.
            for (room, v) in &g.metas {
                let name = self.names[*room as usize].as_bytes();
                let n = frame(&mut self.buf, &[&[T_META, name.len() as u8], name, v]);
                if let Some((_, s, l)) = self.idx[*room as usize].meta.replace((*v, id, n)) {
                    self.dec_live(s, l);
                }
                added += n as u64;
            }
            for r in &g.puts {
                let name = self.names[r.room as usize].as_bytes();
                let n = frame(
                    &mut self.buf,
                    &[&[T_MSG, name.len() as u8], name, &r.seq.to_be_bytes(), &r.val],
                );
                self.idx[r.room as usize].msgs.push_back((r.seq, id, n));
                added += n as u64;
            }
            let e = self.segs.get_mut(&id).unwrap();
            e.0 += added;
            e.1 += added;
            self.append_buf();
            if self.durable {
                self.active.sync_data().unwrap();
            }
            // Deletes write nothing: they only drop index entries (retention is re-applied
            // on restore); space comes back when a mostly-dead segment is compacted.
            for &(room, seq) in &g.dels {
                let q = &mut self.idx[room as usize].msgs;
                while let Some(&(s, seg, n)) = q.front() {
                    if s > seq {
                        break;
                    }
                    q.pop_front();
                    if let Some(e) = self.segs.get_mut(&seg) {
                        e.1 -= n as u64;
                    }
                }
            }
            if self.active_len >= SEGMENT_BYTES {
                self.roll();
                if self.compaction {
                    self.maybe_compact();
                }
            }
        }

        fn restore_all(&mut self, keep: Option<usize>) -> Restored {
            let mut rooms: HashMap<Vec<u8>, RoomState> = HashMap::new();
            let ids: Vec<u32> = self.segs.keys().copied().collect();
            let last = *ids.last().unwrap();
            for id in ids {
                let path = seg_path(&self.dir, id);
                let mut data = Vec::new();
                File::open(&path).unwrap().read_to_end(&mut data).unwrap();
                let (end, bad) = scan(&data, |_, p| {
                    let rl = p[1] as usize;
                    let room = &p[2..2 + rl];
                    let st = rooms.entry(room.to_vec()).or_default();
                    match p[0] {
                        T_MSG => {
                            let seq =
                                u64::from_be_bytes(p[2 + rl..2 + rl + 8].try_into().unwrap());
                            st.msgs.push((seq, p[2 + rl + 8..].to_vec()));
                        }
                        _ => st.meta = Some(p[2 + rl..2 + rl + 16].try_into().unwrap()),
                    }
                });
                if bad {
                    if id == last {
                        // Torn tail: drop everything from the first bad record on.
                        eprintln!(
                            "  log: torn tail in segment {id} at {end} of {} bytes: truncated",
                            data.len()
                        );
                        let f = OpenOptions::new().write(true).open(&path).unwrap();
                        f.set_len(end).unwrap();
                        if self.prealloc {
                            f.set_len(SEGMENT_BYTES.max(end)).unwrap(); // a hole again
                        }
                        f.sync_all().unwrap();
                        self.active_len = end;
                    } else {
                        panic!("bad record in sealed segment {id} at {end}");
                    }
                }
            }
            // The B-trees had their deletes applied; here dedupe (a record may have been
            // copied by a compaction that crashed before unlinking) and re-apply the bound.
            for st in rooms.values_mut() {
                st.msgs.sort_by_key(|m| m.0);
                st.msgs.dedup_by_key(|m| m.0);
            }
            summarize(rooms, keep)
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Measurement helpers
// ---------------------------------------------------------------------------------------------

fn threads() -> usize {
    fs::read_dir("/proc/self/task").unwrap().count()
}

/// (apparent bytes, allocated bytes) of every file under `dir`.
fn du(dir: &Path) -> (u64, u64) {
    use std::os::unix::fs::MetadataExt;
    let mut a = (0, 0);
    for e in fs::read_dir(dir).unwrap() {
        let e = e.unwrap();
        let m = e.metadata().unwrap();
        if m.is_dir() {
            let s = du(&e.path());
            a.0 += s.0;
            a.1 += s.1;
        } else {
            a.0 += m.len();
            a.1 += m.blocks() * 512;
        }
    }
    a
}

/// Bytes this process dirtied for storage (/proc/self/io write_bytes: page granularity).
fn io_write_bytes() -> u64 {
    let s = fs::read_to_string("/proc/self/io").unwrap();
    s.lines()
        .find_map(|l| l.strip_prefix("write_bytes: "))
        .unwrap()
        .trim()
        .parse()
        .unwrap()
}

fn phase_probe(base: &Path) {
    let p = base.join("probe.bin");
    let mut f = fs::File::create(&p).unwrap();
    let rec = [0x5Au8; 210];
    let mut lat = Vec::new();
    for _ in 0..300 {
        let t = Instant::now();
        f.write_all(&rec).unwrap();
        f.sync_data().unwrap();
        lat.push(t.elapsed().as_secs_f64() * 1e6);
    }
    println!(
        "RESULT probe append210+fdatasync p50_us={:.0} p99_us={:.0}",
        pct(&mut lat, 0.5),
        pct(&mut lat, 0.99)
    );
    drop(f);
    let _ = fs::remove_file(&p);
}

fn pct(v: &mut [f64], p: f64) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v[((v.len() as f64 - 1.0) * p).round() as usize]
}

fn mib(b: u64) -> f64 {
    b as f64 / (1024.0 * 1024.0)
}

fn fresh(base: &Path, name: &str) -> PathBuf {
    let d = base.join(name);
    let _ = fs::remove_dir_all(&d);
    fs::create_dir_all(&d).unwrap();
    d
}

// ---------------------------------------------------------------------------------------------
// Phases
// ---------------------------------------------------------------------------------------------

fn phase_throughput<E: Engine>(base: &Path, durabilities: &[bool]) {
    for &durable in durabilities {
        for group in [1usize, 16, 256] {
            // fdatasync costs ~4 ms on this disk: 1-record groups durable get 1,000 records.
            let n = if durable && group == 1 { 1_000 } else { 20_000 };
            let dir = fresh(base, &format!("{}-tp", E::NAME));
            let mut wl = Workload::new(None);
            let groups: Vec<Group> = (0..n / group).map(|_| wl.next_group(group)).collect();
            let t_before = threads();
            let mut e = E::open(&dir, durable);
            let t_open = threads();
            let mut lat = Vec::with_capacity(groups.len());
            let io0 = io_write_bytes();
            let t0 = Instant::now();
            for g in &groups {
                let s = Instant::now();
                e.commit(g);
                lat.push(s.elapsed().as_secs_f64() * 1e6);
            }
            let total = t0.elapsed().as_secs_f64();
            let io = io_write_bytes() - io0;
            let t_after = threads();
            let recs = (groups.len() * group) as f64;
            let (p50, p99) = (pct(&mut lat, 0.5), pct(&mut lat, 0.99));
            let mean = total * 1e6 / groups.len() as f64;
            e.close();
            let (app, alloc) = du(&dir);
            println!(
                "RESULT throughput engine={} durable={} group={} records={} recs_per_s={:.0} \
                 commit_us_mean={:.0} p50={:.0} p99={:.0} threads_added_open={} \
                 threads_added_after={} dirtied_kib_per_commit={:.1} disk_apparent_mib={:.1} \
                 disk_alloc_mib={:.1}",
                E::NAME,
                durable,
                group,
                recs,
                recs / total,
                mean,
                p50,
                p99,
                t_open - t_before,
                t_after - t_before,
                io as f64 / 1024.0 / groups.len() as f64,
                mib(app),
                mib(alloc)
            );
            let _ = fs::remove_dir_all(&dir);
        }
    }
}

/// Object-safe view of an engine, to drive several side by side.
trait DynEngine {
    fn name(&self) -> &'static str;
    fn commit_dyn(&mut self, g: &Group);
}
impl<E: Engine> DynEngine for E {
    fn name(&self) -> &'static str {
        E::NAME
    }
    fn commit_dyn(&mut self, g: &Group) {
        self.commit(g)
    }
}

/// A raw append + fdatasync of the same bytes the log would write, as the disk's floor.
struct RawProbe(fs::File);
impl DynEngine for RawProbe {
    fn name(&self) -> &'static str {
        "raw-fdatasync"
    }
    fn commit_dyn(&mut self, g: &Group) {
        let n: usize = g.puts.iter().map(|r| 8 + 2 + 10 + 8 + r.val.len()).sum();
        self.0.write_all(&vec![0x5A; n]).unwrap();
        self.0.sync_data().unwrap();
    }
}

/// Durable group commits with all engines open at once, taking turns commit by commit (order
/// rotated every commit), so every engine sees the same disk: on this shared box the latency
/// of one fdatasync drifts between ~0.1 and ~4 ms from minute to minute.
fn phase_interleaved(base: &Path, engines: &[String]) {
    for group in [1usize, 16, 256] {
        let n = if group == 1 { 1_000 } else { 20_000 };
        let mut wl = Workload::new(None);
        let groups: Vec<Group> = (0..n / group).map(|_| wl.next_group(group)).collect();
        let mut es: Vec<Box<dyn DynEngine>> = Vec::new();
        for e in engines {
            let dir = fresh(base, &format!("{e}-il"));
            match e.as_str() {
                #[cfg(feature = "redb")]
                "redb" => es.push(Box::new(redb_engine::Redb::open(&dir, true))),
                #[cfg(feature = "fjall")]
                "fjall" => es.push(Box::new(fjall_engine::Fjall::open(&dir, true))),
                #[cfg(feature = "log")]
                "log" => es.push(Box::new(log_engine::Log::open(&dir, true))),
                #[cfg(feature = "log")]
                "log-pre" => es.push(Box::new(log_engine::LogPre::open(&dir, true))),
                "raw" => es.push(Box::new(RawProbe(fs::File::create(dir.join("raw.bin")).unwrap()))),
                _ => {}
            }
        }
        let k = es.len();
        let mut lat: Vec<Vec<f64>> = vec![Vec::with_capacity(groups.len()); k];
        for (i, g) in groups.iter().enumerate() {
            for j in 0..k {
                let e = (i + j) % k;
                let t = Instant::now();
                es[e].commit_dyn(g);
                lat[e].push(t.elapsed().as_secs_f64() * 1e6);
            }
        }
        for (e, l) in es.iter().zip(lat.iter_mut()) {
            let sum: f64 = l.iter().sum();
            println!(
                "RESULT interleaved engine={} durable=true group={} records={} recs_per_s={:.0} \
                 commit_us_mean={:.0} p50={:.0} p90={:.0} p99={:.0}",
                e.name(),
                group,
                groups.len() * group,
                (groups.len() * group) as f64 / (sum / 1e6),
                sum / l.len() as f64,
                pct(l, 0.5),
                pct(l, 0.9),
                pct(l, 0.99)
            );
        }
        drop(es);
        for e in engines {
            let _ = fs::remove_dir_all(base.join(format!("{e}-il")));
        }
    }
}

const CHURN_N: usize = 200_000;
const CHURN_GROUP: usize = 256;
const CHURN_KEEP: usize = 100;

fn phase_churn<E: Engine + 'static>(base: &Path, mut tweak: impl FnMut(&mut E)) {
    let dir = fresh(base, &format!("{}-churn", E::NAME));
    let mut wl = Workload::new(Some(CHURN_KEEP));
    let mut e = E::open(&dir, true);
    tweak(&mut e);
    let t0 = Instant::now();
    let mut commit_time = Duration::ZERO;
    let mut done = 0;
    while done < CHURN_N {
        let g = wl.next_group(CHURN_GROUP.min(CHURN_N - done));
        done += g.puts.len();
        let s = Instant::now();
        e.commit(&g);
        commit_time += s.elapsed();
    }
    let wall = t0.elapsed();
    let threads_live = threads();
    let (app, alloc) = du(&dir);
    println!(
        "RESULT churn engine={} appends={} keep_per_room={} commit_s={:.2} wall_s={:.2} \
         recs_per_s={:.0} disk_apparent_mib={:.1} disk_alloc_mib={:.1} threads_total={}",
        E::NAME,
        CHURN_N,
        CHURN_KEEP,
        commit_time.as_secs_f64(),
        wall.as_secs_f64(),
        CHURN_N as f64 / commit_time.as_secs_f64(),
        mib(app),
        mib(alloc),
        threads_live
    );
    extra_churn_report(&e);
    e.close();
    let (app_closed, _) = du(&dir);
    println!("RESULT churn-closed engine={} disk_apparent_mib={:.1}", E::NAME, mib(app_closed));

    // Restore: cold-ish (page cache warm: same box), reopen + read everything.
    for round in 0..3 {
        let t0 = Instant::now();
        let mut e = E::open(&dir, true);
        let t_open = t0.elapsed();
        let r = e.restore(Some(CHURN_KEEP));
        let total = t0.elapsed();
        println!(
            "RESULT restore engine={} round={} open_ms={:.1} total_ms={:.1} rooms_meta={} msgs={} \
             value_bytes={}",
            E::NAME,
            round,
            t_open.as_secs_f64() * 1e3,
            total.as_secs_f64() * 1e3,
            r.rooms_with_meta,
            r.msgs,
            r.bytes
        );
        assert_eq!(r.msgs, ROOMS as usize * CHURN_KEEP);
        assert_eq!(r.rooms_with_meta, ROOMS as usize);
        if round == 2 {
            let t = Instant::now();
            e.reclaim();
            let (app, alloc) = du(&dir);
            println!(
                "RESULT reclaim engine={} ms={:.0} disk_apparent_mib={:.1} disk_alloc_mib={:.1}",
                E::NAME,
                t.elapsed().as_secs_f64() * 1e3,
                mib(app),
                mib(alloc)
            );
        }
        e.close();
    }
    // Restore after dropping the page cache for this dir's files (posix_fadvise DONTNEED).
    drop_cache(&dir);
    let t0 = Instant::now();
    let mut e = E::open(&dir, true);
    let r = e.restore(Some(CHURN_KEEP));
    println!(
        "RESULT restore-uncached engine={} total_ms={:.1} msgs={}",
        E::NAME,
        t0.elapsed().as_secs_f64() * 1e3,
        r.msgs
    );
    e.close();
    if std::env::var_os("KEEP").is_none() {
        let _ = fs::remove_dir_all(&dir);
    }
}

fn drop_cache(dir: &Path) {
    use std::os::fd::AsRawFd;
    for e in fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            drop_cache(&p);
        } else if let Ok(f) = fs::File::open(&p) {
            f.sync_all().ok();
            // SAFETY: valid fd owned by `f` for the duration of the call.
            unsafe { libc::posix_fadvise(f.as_raw_fd(), 0, 0, libc::POSIX_FADV_DONTNEED) };
        }
    }
}

fn extra_churn_report<E: Engine + 'static>(e: &E) {
    // Only the log has internal accounting worth printing.
    #[cfg(feature = "log")]
    {
        let any = e as &dyn std::any::Any;
        let log = any
            .downcast_ref::<log_engine::Log>()
            .or_else(|| any.downcast_ref::<log_engine::LogPre>().map(|l| &l.0));
        if let Some(l) = log {
            let (tot, live) = l.disk_accounting();
            println!(
                "RESULT log-accounting compaction={} compactions={} rewritten_mib={:.1} \
                 compaction_s={:.2} segments_mib={:.1} live_mib={:.1}",
                l.compaction,
                l.compactions,
                mib(l.rewritten_bytes),
                l.compaction_time.as_secs_f64(),
                mib(tot),
                mib(live)
            );
        }
    }
    let _ = e;
}

// ----- crash: SIGKILL a writer mid-stream, reopen, check every acknowledged record -----------

const CRASH_PRELOAD: usize = 100_000;
const CRASH_GROUP: usize = 16;

fn crash_child<E: Engine>(dir: &Path) {
    let mut wl = Workload::new(None);
    let mut e = E::open(dir, true);
    // Preload (one durable commit per 4096) so recovery has something to walk.
    let mut done = 0;
    while done < CRASH_PRELOAD {
        let g = wl.next_group(4096.min(CRASH_PRELOAD - done));
        done += g.puts.len();
        e.commit(&g);
    }
    let out = std::io::stdout();
    let mut out = out.lock();
    writeln!(out, "ready {done}").unwrap();
    out.flush().unwrap();
    loop {
        let g = wl.next_group(CRASH_GROUP);
        done += g.puts.len();
        e.commit(&g);
        writeln!(out, "acked {done}").unwrap();
        out.flush().unwrap();
    }
}

fn phase_crash<E: Engine>(base: &Path) {
    let dir = fresh(base, &format!("{}-crash", E::NAME));
    let exe = std::env::current_exe().unwrap();
    let mut child = std::process::Command::new(exe)
        .args(["crash-child", E::NAME, dir.to_str().unwrap()])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let first = lines.next().unwrap().unwrap();
    assert!(first.starts_with("ready"), "{first}");
    let t = Instant::now();
    let mut acked = 0usize;
    for l in lines.by_ref() {
        let l = l.unwrap();
        if let Some(n) = l.strip_prefix("acked ") {
            acked = n.parse().unwrap();
        }
        if t.elapsed() > Duration::from_millis(1_500) {
            break;
        }
    }
    // SAFETY: plain kill(2) on our own child's pid.
    unsafe { libc::kill(child.id() as i32, libc::SIGKILL) };
    child.wait().unwrap();
    // Any acks printed between our last read and the kill count too.
    for l in lines {
        if let Ok(l) = l
            && let Some(n) = l.strip_prefix("acked ")
        {
            acked = n.parse().unwrap();
        }
    }
    let t0 = Instant::now();
    let mut e = E::open(&dir, true);
    let t_open = t0.elapsed();
    let r = e.restore(None);
    let total = t0.elapsed();
    println!(
        "RESULT crash engine={} acked={} recovered={} ok={} reopen_ms={:.1} reopen_and_read_ms={:.1}",
        E::NAME,
        acked,
        r.msgs,
        r.msgs >= acked && r.msgs <= acked + CRASH_GROUP,
        t_open.as_secs_f64() * 1e3,
        total.as_secs_f64() * 1e3
    );
    e.close();
    let _ = fs::remove_dir_all(&dir);
}

// ----- torn tail: cut or corrupt the end of the newest log/journal file --------------------

fn newest_file(dir: &Path, pred: &dyn Fn(&Path) -> bool) -> Option<PathBuf> {
    let mut best: Option<(std::time::SystemTime, PathBuf)> = None;
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in fs::read_dir(&d).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                stack.push(p);
            } else if pred(&p) && fs::metadata(&p).unwrap().len() > 0 {
                let m = fs::metadata(&p).unwrap().modified().unwrap();
                if best.as_ref().is_none_or(|b| m >= b.0) {
                    best = Some((m, p));
                }
            }
        }
    }
    best.map(|b| b.1)
}

fn phase_torn<E: Engine>(base: &Path, target: &dyn Fn(&Path) -> bool) {
    for mode in ["cut-7-bytes", "flip-byte-in-last-record", "append-garbage-64"] {
        let dir = fresh(base, &format!("{}-torn", E::NAME));
        // A child writes 10 durable groups of 16 and exits without closing anything.
        let st = std::process::Command::new(std::env::current_exe().unwrap())
            .args(["torn-child", E::NAME, dir.to_str().unwrap()])
            .status()
            .unwrap();
        assert!(st.success());
        let Some(f) = newest_file(&dir, target) else {
            println!("RESULT torn engine={} mode={mode} no-target-file", E::NAME);
            continue;
        };
        // The data ends at the last non-zero byte (fjall's journal is a sparse 64 MiB file).
        let mut d = fs::read(&f).unwrap();
        let len = d.len();
        let end = d.iter().rposition(|&b| b != 0).map_or(0, |p| p + 1);
        match mode {
            "cut-7-bytes" => d[end - 7..end].fill(0),
            "flip-byte-in-last-record" => d[end - 40] ^= 0xFF,
            _ => {
                if end + 64 > d.len() {
                    d.resize(end + 64, 0);
                }
                d[end..end + 64].fill(0xA5);
            }
        }
        if mode == "cut-7-bytes" && end == len {
            d.truncate(end - 7);
        }
        fs::write(&f, d).unwrap();
        let res = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            let mut e = E::open(&dir, true);
            let r = e.restore(None);
            e.close();
            (r.msgs, r.rooms_with_meta)
        }));
        match res {
            Ok((n, m)) => println!(
                "RESULT torn engine={} mode={mode} file={} opened=yes msgs={n} of 160, rooms_meta={m}",
                E::NAME,
                f.file_name().unwrap().to_string_lossy()
            ),
            Err(_) => println!(
                "RESULT torn engine={} mode={mode} file={} opened=NO (error)",
                E::NAME,
                f.file_name().unwrap().to_string_lossy()
            ),
        }
        let _ = fs::remove_dir_all(&dir);
    }
}

// ---------------------------------------------------------------------------------------------

fn run_engine<E: Engine + 'static>(
    base: &Path,
    phases: &[String],
    torn_target: &dyn Fn(&Path) -> bool,
    churn_tweak: impl FnMut(&mut E),
) {
    let has = |p: &str| phases.iter().any(|x| x == p || x == "all");
    let t = Instant::now();
    if has("probe") {
        phase_probe(base);
    }
    if has("throughput") {
        phase_throughput::<E>(base, &[true, false]);
    } else if phases.iter().any(|p| p == "throughput-nd") {
        phase_throughput::<E>(base, &[false]);
    }
    if has("churn") {
        phase_churn::<E>(base, churn_tweak);
    }
    if has("crash") {
        phase_crash::<E>(base);
    }
    if has("torn") {
        phase_torn::<E>(base, torn_target);
    }
    println!("ENGINE {} done in {:.1}s", E::NAME, t.elapsed().as_secs_f64());
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if args.get(1).map(String::as_str) == Some("torn-child") {
        let dir = PathBuf::from(&args[3]);
        fn child<E: Engine>(dir: &Path) {
            let mut wl = Workload::new(None);
            let mut e = E::open(dir, true);
            for _ in 0..10 {
                e.commit(&wl.next_group(16));
            }
            std::process::exit(0); // no destructors: no clean shutdown
        }
        match args[2].as_str() {
            #[cfg(feature = "redb")]
            "redb" => child::<redb_engine::Redb>(&dir),
            #[cfg(feature = "fjall")]
            "fjall" => child::<fjall_engine::Fjall>(&dir),
            #[cfg(feature = "log")]
            "log" => child::<log_engine::Log>(&dir),
            #[cfg(feature = "log")]
            "log-pre" => child::<log_engine::LogPre>(&dir),
            e => panic!("unknown engine {e}"),
        }
        return;
    }
    if args.get(1).map(String::as_str) == Some("crash-child") {
        let dir = PathBuf::from(&args[3]);
        match args[2].as_str() {
            #[cfg(feature = "redb")]
            "redb" => crash_child::<redb_engine::Redb>(&dir),
            #[cfg(feature = "fjall")]
            "fjall" => crash_child::<fjall_engine::Fjall>(&dir),
            #[cfg(feature = "log")]
            "log" | "log-nocompact" => crash_child::<log_engine::Log>(&dir),
            #[cfg(feature = "log")]
            "log-pre" => crash_child::<log_engine::LogPre>(&dir),
            e => panic!("unknown engine {e}"),
        }
        return;
    }
    let mut base = PathBuf::from("/tmp/store-choice");
    let mut engines = vec!["redb".to_string(), "fjall".into(), "log".into(), "log-nocompact".into()];
    let mut phases = vec!["all".to_string()];
    let mut i = 1;
    while i < args.len() {
        match args[i].as_str() {
            "--dir" => base = PathBuf::from(&args[i + 1]),
            "--engines" => engines = args[i + 1].split(',').map(String::from).collect(),
            "--phases" => phases = args[i + 1].split(',').map(String::from).collect(),
            a => panic!("unknown arg {a}"),
        }
        i += 2;
    }
    fs::create_dir_all(&base).unwrap();
    println!("base dir {}", base.display());
    if phases.iter().any(|p| p == "interleaved") {
        let mut es: Vec<String> = engines.iter().filter(|e| *e != "log-nocompact").cloned().collect();
        es.push("raw".into());
        phase_interleaved(&base, &es);
        return;
    }
    for e in &engines {
        match e.as_str() {
            #[cfg(feature = "redb")]
            "redb" => run_engine::<redb_engine::Redb>(&base, &phases, &|p| p.extension().is_some_and(|x| x == "redb"), |_| {}),
            #[cfg(feature = "fjall")]
            "fjall" => run_engine::<fjall_engine::Fjall>(
                &base,
                &phases,
                &|p| p.extension().is_some_and(|x| x == "jnl"),
                |_| {},
            ),
            #[cfg(feature = "log")]
            "log" => run_engine::<log_engine::Log>(&base, &phases, &|p| p.extension().is_some_and(|x| x == "log"), |_| {}),
            #[cfg(feature = "log")]
            "log-pre" => run_engine::<log_engine::LogPre>(
                &base,
                &phases,
                &|p| p.extension().is_some_and(|x| x == "log"),
                |_| {},
            ),
            #[cfg(feature = "log")]
            "log-nocompact" => {
                // Churn only: the same log with compaction off (disk = every append).
                let only_churn: Vec<String> =
                    if phases.iter().any(|p| p == "all" || p == "churn") { vec!["churn".into()] } else { vec![] };
                run_engine::<log_engine::Log>(
                    &base,
                    &only_churn,
                    &|_| false,
                    |l: &mut log_engine::Log| l.compaction = false,
                )
            }
            e => panic!("unknown or disabled engine {e}"),
        }
    }
}
