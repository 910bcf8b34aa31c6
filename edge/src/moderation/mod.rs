//! Moderation: disconnect a user everywhere, ban a user from a room for a while, delete a
//! message (docs/PROTOCOL.md, "Moderation"; ARCHITECTURE.md says how each travels).
//!
//! - **Disconnect** (`kick`): every shard closes the user's connections (an `error` `kicked`,
//!   then close 4002; SSE streams get the event and end). With Redis, the request goes to
//!   every other edge on the moderation channel ([`crate::bus::redis::MOD_CHANNEL`]).
//! - **Ban**: a table of bans in force ([`Bans`]), shared by the shards, which read it at every
//!   join (the handshake's `?room=` and the `join` signal: a ban is refused before the upgrade
//!   with 403, or with an `error` `banned`); the shards also remove the user's connections from
//!   the room at once. Single node: kept in the store, so a restart does not lift a ban. Redis:
//!   a key per ban with the ban's TTL plus an index every edge loads when it (re)connects, and
//!   the moderation channel for the edges already running.
//! - **Delete**: a room engine's affair (`engine::moderation`), like everything else about a
//!   room's messages; in Redis mode a script ([`crate::bus::redis::delete_message`]).
//!
//! The table is read on the shards' threads at handshakes and joins: one atomic load when no
//! ban is in force, an uncontended read lock otherwise. Writes (a ban, an unban, an expiry
//! sweep) are operator actions, rare by nature.

pub mod api;

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use prometheus::{IntCounterVec, IntGauge};

use crate::bus::{Mail, MailError, Mailbox, ModAction, Moderate, RoomName, ShardCmd};

/// One ban in force: `user` may not join `room` until `until_ms` (ms since the Unix epoch).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Ban {
    /// The room the ban applies to.
    pub room: String,
    /// The banned user, as their token's `sub` names them.
    pub user: String,
    /// When the ban ends, ms since the Unix epoch.
    pub until_ms: u64,
}

/// The table of bans is at its bound (`moderation.max_bans`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("too many bans in force (moderation.max_bans = {0}): lift some, or wait for them to expire")]
pub struct BansFull(pub usize);

/// Room -> user -> the ban's end (ms since the Unix epoch).
type Table = HashMap<Box<str>, HashMap<Box<str>, u64>>;

/// The bans in force, by room then user. Bounded (`max`); expired entries are ignored at once
/// and removed by the next sweep (every insert into a full table sweeps first). Pure but for
/// its lock: callers pass the wall clock.
pub struct Bans {
    map: RwLock<Table>,
    len: AtomicUsize,
    max: usize,
    gauge: Option<IntGauge>,
}

impl Bans {
    /// An empty table holding at most `max` bans (at least one), kept in `gauge` if given.
    pub fn new(max: usize, gauge: Option<IntGauge>) -> Self {
        Self { map: RwLock::new(HashMap::new()), len: AtomicUsize::new(0), max: max.max(1), gauge }
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, Table> {
        self.map.read().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, Table> {
        self.map.write().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn set_len(&self, n: usize) {
        self.len.store(n, Ordering::Relaxed);
        if let Some(g) = &self.gauge {
            g.set(n as i64);
        }
    }

    /// Most bans held (`moderation.max_bans`).
    pub fn max(&self) -> usize {
        self.max
    }

    /// Bans held (expired ones not yet swept included).
    pub fn len(&self) -> usize {
        self.len.load(Ordering::Relaxed)
    }

    /// True when no ban is in force.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Until when `user` is banned from `room` (None: not banned at `now_ms`).
    pub fn check(&self, room: &str, user: &str, now_ms: u64) -> Option<u64> {
        if self.is_empty() {
            return None;
        }
        self.read().get(room)?.get(user).copied().filter(|&until| until > now_ms)
    }

    /// Bans `user` from `room` until `until_ms` (a ban already there takes the new end, earlier
    /// or later: the moderator's latest word holds).
    pub fn insert(&self, room: &str, user: &str, until_ms: u64, now_ms: u64) -> Result<(), BansFull> {
        let mut map = self.write();
        let exists = map.get(room).is_some_and(|u| u.contains_key(user));
        let mut len = self.len();
        if !exists && len >= self.max {
            len = sweep_map(&mut map, now_ms);
            if len >= self.max {
                self.set_len(len);
                return Err(BansFull(self.max));
            }
        }
        map.entry(room.into()).or_default().insert(user.into(), until_ms);
        self.set_len(if exists { len } else { len + 1 });
        Ok(())
    }

    /// Lifts a ban; whether there was one in force.
    pub fn remove(&self, room: &str, user: &str, now_ms: u64) -> bool {
        let mut map = self.write();
        let Some(users) = map.get_mut(room) else { return false };
        let Some(until) = users.remove(user) else { return false };
        if users.is_empty() {
            map.remove(room);
        }
        self.set_len(self.len().saturating_sub(1));
        until > now_ms
    }

    /// Replaces the whole table (what Redis holds, read when the bus (re)connects). Returns the
    /// bans that were not in force here before: their rooms' members must be removed.
    pub fn replace_all(&self, bans: Vec<Ban>, now_ms: u64) -> Vec<Ban> {
        let mut map = self.write();
        let mut next = Table::new();
        let mut added = Vec::new();
        let mut n = 0;
        for b in bans.into_iter().filter(|b| b.until_ms > now_ms).take(self.max) {
            let before = map.get(b.room.as_str()).and_then(|u| u.get(b.user.as_str())).copied();
            if before.is_none_or(|t| t <= now_ms) {
                added.push(b.clone());
            }
            if next.entry(b.room.into()).or_default().insert(b.user.into(), b.until_ms).is_none() {
                n += 1;
            }
        }
        *map = next;
        self.set_len(n);
        added
    }

    /// The bans in force (of one room, or all), sorted by room then user.
    pub fn list(&self, room: Option<&str>, now_ms: u64) -> Vec<Ban> {
        let map = self.read();
        let mut out: Vec<Ban> = map
            .iter()
            .filter(|(r, _)| room.is_none_or(|want| &***r == want))
            .flat_map(|(r, users)| {
                users.iter().filter(|&(_, &until)| until > now_ms).map(move |(u, &until)| Ban {
                    room: r.to_string(),
                    user: u.to_string(),
                    until_ms: until,
                })
            })
            .collect();
        out.sort_by(|a, b| (&a.room, &a.user).cmp(&(&b.room, &b.user)));
        out
    }

    /// Drops expired bans; returns how many are left.
    pub fn sweep(&self, now_ms: u64) -> usize {
        if self.is_empty() {
            return 0;
        }
        let mut map = self.write();
        let n = sweep_map(&mut map, now_ms);
        self.set_len(n);
        n
    }
}

fn sweep_map(map: &mut Table, now_ms: u64) -> usize {
    map.retain(|_, users| {
        users.retain(|_, until| *until > now_ms);
        !users.is_empty()
    });
    map.values().map(HashMap::len).sum()
}

/// Whether a user id is one the edge can know: a token's `sub` (1 to 64 bytes) or an
/// anonymous id.
pub fn check_user(user: &str) -> Result<(), &'static str> {
    crate::auth::check_user_id(user).map_err(|_| "user must be 1 to 64 bytes, without control characters")
}

/// The moderation API's figures.
#[derive(Clone)]
pub struct ModerationStats {
    /// Requests carried out, by action (`disconnect`, `ban`, `unban`, `delete`).
    pub actions: IntCounterVec,
    /// Requests refused, by reason.
    pub refused: IntCounterVec,
}

/// Actions counted in `roomcast_moderation_actions_total`.
pub const ACTIONS: [&str; 4] = ["disconnect", "ban", "unban", "delete"];
/// Reasons counted in `roomcast_moderation_refused_total`.
pub const REFUSALS: [&str; 12] = [
    "no_key",
    "bad_key",
    "key_scope",
    "key_room",
    "bad_request",
    "not_found",
    "not_deletable",
    "bans_full",
    "bus_unavailable",
    "store_unavailable",
    "engine_busy",
    "shutting_down",
];

/// What carries moderation to this edge's connections: the table of bans the shards read, the
/// shards' mailboxes, and the store a single-node edge keeps bans in.
pub struct Moderation {
    /// The bans in force, which the shards check on every join.
    pub bans: Arc<Bans>,
    shards: Vec<Mailbox>,
    store: Option<Arc<crate::store::Store>>,
    /// Requests carried out and refused, counted for /metrics.
    pub stats: ModerationStats,
    /// This process on the moderation channel (its own messages come back to it: skipped).
    pub origin: String,
}

/// How long a request waits for the shards' counts of connections they closed.
const SHARD_ANSWER: Duration = Duration::from_secs(2);

impl Moderation {
    /// Moderation for this edge, with a fresh origin id (unique per process) for the moderation channel.
    pub fn new(
        bans: Arc<Bans>,
        shards: Vec<Mailbox>,
        store: Option<Arc<crate::store::Store>>,
        stats: ModerationStats,
    ) -> Self {
        // Unique per process: the wall clock, the pid and a counter, mixed.
        use std::hash::{BuildHasher, Hasher};
        let mut h = std::collections::hash_map::RandomState::new().build_hasher();
        h.write_u64(crate::bus::now_us());
        h.write_u32(std::process::id());
        let origin = format!("{:016x}", h.finish());
        Self { bans, shards, store, stats, origin }
    }

    /// Reads the bans the store keeps (single node, at start). Expired ones are dropped.
    pub fn load_stored(&self, now_ms: u64) {
        let Some(store) = &self.store else { return };
        match store.bans(now_ms) {
            Ok(bans) => {
                let n = bans.len();
                self.bans.replace_all(bans, now_ms);
                if n > 0 {
                    tracing::info!(bans = n, "moderation: bans in force read back from the store");
                }
            }
            Err(e) => tracing::error!(error = %e, "moderation: cannot read bans from the store"),
        }
    }

    /// Sends `action` to every shard; returns the connections they closed or removed (those
    /// that answered within `SHARD_ANSWER`).
    async fn to_shards(&self, action: ModAction) -> u32 {
        let mut waits = Vec::with_capacity(self.shards.len());
        for mb in &self.shards {
            let (tx, rx) = tokio::sync::oneshot::channel();
            let mut mail =
                Mail::Shard(ShardCmd::Moderate(Box::new(Moderate { action: action.clone(), reply: Some(tx) })));
            let mut wait = Duration::from_micros(200);
            loop {
                match mb.try_send(mail) {
                    Ok(()) => {
                        waits.push(rx);
                        break;
                    }
                    Err((MailError::Full, m)) => {
                        // A shard that is behind takes it a moment later: never dropped.
                        mail = m;
                        tokio::time::sleep(wait).await;
                        wait = (wait * 2).min(Duration::from_millis(50));
                    }
                    Err((MailError::Gone, _)) => break,
                }
            }
        }
        let deadline = tokio::time::Instant::now() + SHARD_ANSWER;
        let mut n = 0;
        for rx in waits {
            if let Ok(Ok(k)) = tokio::time::timeout_at(deadline, rx).await {
                n += k;
            }
        }
        n
    }

    /// Closes every connection of `user` on this edge (4002). Returns how many.
    pub async fn kick_local(&self, user: &str) -> u32 {
        self.to_shards(ModAction::Kick { user: Arc::from(user) }).await
    }

    /// Bans `user` from `room` on this edge until `until_ms`: into the table (and the store, on
    /// a single node, before anything else: a ban answered 200 survives a restart), then the
    /// user's connections leave the room. Returns how many were removed.
    pub async fn ban_local(&self, room: &str, user: &str, until_ms: u64, now_ms: u64) -> Result<u32, BanError> {
        self.bans.insert(room, user, until_ms, now_ms).map_err(BanError::Full)?;
        if let Some(store) = self.store.clone() {
            let ban = Ban { room: room.to_owned(), user: user.to_owned(), until_ms };
            let r = tokio::task::spawn_blocking(move || store.put_ban(&ban)).await;
            if !matches!(r, Ok(Ok(()))) {
                if let Ok(Err(e)) = &r {
                    tracing::error!(error = %e, "moderation: cannot store a ban");
                }
                self.bans.remove(room, user, now_ms);
                return Err(BanError::Store);
            }
        }
        Ok(self.remove_from_room(room, user, until_ms).await)
    }

    /// The user's connections on this edge leave `room` (a ban now in force).
    pub async fn remove_from_room(&self, room: &str, user: &str, until_ms: u64) -> u32 {
        self.to_shards(ModAction::Ban { room: RoomName::from(room), user: Arc::from(user), until_ms }).await
    }

    /// Lifts a ban on this edge (and in the store); whether one was in force.
    pub async fn unban_local(&self, room: &str, user: &str, now_ms: u64) -> Result<bool, BanError> {
        if let Some(store) = self.store.clone() {
            let (r, u) = (room.to_owned(), user.to_owned());
            let res = tokio::task::spawn_blocking(move || store.remove_ban(&r, &u)).await;
            if !matches!(res, Ok(Ok(()))) {
                return Err(BanError::Store);
            }
        }
        Ok(self.bans.remove(room, user, now_ms))
    }
}

/// Why a ban could not be made or lifted.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum BanError {
    /// The table of bans is at its bound.
    #[error(transparent)]
    Full(BansFull),
    /// The store could not write the ban (single-node edge); retrying may succeed.
    #[error("the edge's store cannot write; retry shortly")]
    Store,
    /// Redis could not carry the ban to the other edges; retrying may succeed.
    #[error("the message bus (redis) is unavailable; retry shortly")]
    Bus,
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A user id a moderator names follows the same rule as a token's `sub`: a line break in
    /// one forged lines in the moderation log (found by a new user's trial).
    #[test]
    fn user_ids_are_checked_like_token_subjects() {
        assert!(check_user("alice").is_ok());
        assert!(check_user("caf\u{e9} 42").is_ok());
        assert!(check_user("a\nb").is_err());
        assert!(check_user("a\tb").is_err());
        assert!(check_user("").is_err());
        assert!(check_user(&"u".repeat(65)).is_err());
    }

    #[test]
    fn bans_expire_and_are_bounded() {
        let b = Bans::new(2, None);
        assert!(b.is_empty() && b.check("r", "u", 0).is_none());
        b.insert("r", "u", 1_000, 0).unwrap();
        assert_eq!(b.check("r", "u", 999), Some(1_000));
        assert_eq!(b.check("r", "u", 1_000), None, "over at its end");
        assert_eq!(b.check("r", "v", 0), None);
        assert_eq!(b.check("s", "u", 0), None, "a ban is per room");
        b.insert("s", "u", 5_000, 0).unwrap();
        assert_eq!(b.insert("t", "u", 5_000, 0), Err(BansFull(2)), "bounded");
        // A new end for a ban already there needs no room.
        b.insert("s", "u", 6_000, 0).unwrap();
        assert_eq!(b.check("s", "u", 5_500), Some(6_000));
        // Once one has expired, the full table makes room by sweeping.
        b.insert("t", "u", 9_000, 2_000).unwrap();
        assert_eq!(b.len(), 2);
        assert_eq!(b.list(None, 2_000).iter().map(|b| b.room.as_str()).collect::<Vec<_>>(), vec!["s", "t"]);
        assert!(b.remove("t", "u", 2_000));
        assert!(!b.remove("t", "u", 2_000), "lifted once");
        assert_eq!(b.len(), 1);
        assert_eq!(b.sweep(7_000), 0);
        assert!(b.is_empty());
    }

    #[test]
    fn replace_all_says_what_is_new() {
        let b = Bans::new(10, None);
        b.insert("r", "a", 1_000, 0).unwrap();
        let ban = |room: &str, user: &str, until_ms| Ban { room: room.into(), user: user.into(), until_ms };
        let added = b.replace_all(vec![ban("r", "a", 2_000), ban("r", "b", 2_000), ban("x", "c", 10)], 100);
        assert_eq!(added, vec![ban("r", "b", 2_000)], "already in force, or expired: not new");
        assert_eq!(b.len(), 2);
        assert_eq!(b.check("r", "a", 1_500), Some(2_000));
        assert_eq!(b.list(Some("r"), 100).len(), 2);
        assert!(b.list(Some("x"), 100).is_empty());
    }
}
