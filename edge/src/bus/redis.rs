//! The Redis bus: several edges share rooms through one Redis (or one Redis Cluster slot per
//! room).
//!
//! The room engines (`crate::engine`, one per shard) stay the room engines on every edge:
//! merging, interest, serialize-once frames, history cache. What changes in Redis mode is who numbers messages and
//! where they come from:
//!
//! - **Publish** (any edge): one atomic script: `INCR` the room's seq, `XADD` the message to the
//!   room's must-deliver or droppable stream (bounded; evicted must-deliver seqs are remembered
//!   so recovery can report a gap), `PUBLISH` it on the room's channel, return seq and Redis's
//!   clock. Every key of a room carries the hash tag `{room}`, so the script is also valid on
//!   Redis Cluster (one slot per room).
//! - **Interest:** an edge subscribes to a room's channel when its first member (on any shard)
//!   joins and unsubscribes when the last leaves: edges receive only rooms they serve.
//! - **Order and gaps:** the engine expects seq `n + 1` after `n`. A message further ahead
//!   triggers a fill from the streams (`XRANGE`); what the streams no longer hold is announced
//!   to members as an explicit `gap`.
//! - **Faults:** if Redis goes away, connections keep being served; publishes are refused (503)
//!   until it is back: Redis is the seq authority, and numbering locally would fork the room's
//!   seq space between edges. On reconnect the bridge resubscribes and re-reads every room's
//!   seq; the engine fills whatever it missed.
//!
//! On a Redis Cluster (`redis-cluster://host:port,host:port`) the same scripts run in the
//! room's slot (every key, and the channel, carry the hash tag `{room}`), messages go out with
//! `SPUBLISH` and edges follow rooms with `SSUBSCRIBE` on the primary that owns the slot:
//! `bus::cluster` runs that transport, `bus::slots` holds its pure parts.

use std::collections::HashSet;
use std::time::Duration;

use ::redis::AsyncCommands;
use ::redis::aio::ConnectionManager;
use roomcast_proto::envelope::PushMessage;
use serde::Deserialize;
use serde_json::value::RawValue;
use std::sync::Arc;

use tokio::sync::mpsc::{UnboundedReceiver, UnboundedSender};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use super::{Ack, BusHandle, EngineCmd, Epoch, NewMessage, PublishError, Reply, RoomName};

/// What the engine asks of Redis.
pub enum BridgeCmd {
    /// Start following the room: subscribe to its channel.
    Subscribe(RoomName),
    /// Stop following the room: nobody here wants it any more.
    Unsubscribe(RoomName),
    /// Publish a message to the room (numbered by the Redis script); the answer goes to `reply`.
    Publish {
        /// The room.
        room: RoomName,
        /// The message as the publisher sent it.
        msg: NewMessage,
        /// Its kind is must-deliver: it goes to the must-deliver stream.
        must_deliver: bool,
        /// A conflated kind's entry key: the message is also the room's latest of its kind and
        /// key in Redis (what edges give joiners).
        conflate: Option<String>,
        /// Where the publisher's answer (seq or error) goes.
        reply: Reply,
        /// Held until Redis answers: bounds publishes in flight.
        permit: Option<OwnedSemaphorePermit>,
    },
    /// Fetch seqs `from..=to` of `room` (both streams).
    Fill {
        /// The room.
        room: RoomName,
        /// First seq wanted.
        from: u64,
        /// Last seq wanted.
        to: u64,
    },
    /// Fetch must-deliver messages after `since` up to `upto` for the room's joining
    /// connections (the engine holds the joins; one read per room at a time).
    Recover {
        /// The room.
        room: RoomName,
        /// The lowest of the joiners' last seen seqs: fetch what follows it.
        since: u64,
        /// Last seq to fetch.
        upto: u64,
    },
    /// Redis holds `room` under the epoch this edge knows but below a seq it handed out
    /// (Redis lost its last writes: AOF without `appendfsync always`, or a lagging replica
    /// promoted): numbering on would reuse seqs clients hold. Start a new epoch in Redis (if
    /// the room is still in that state), then read the room again.
    Renumber {
        /// The room.
        room: RoomName,
        /// The epoch this edge knows.
        epoch: Epoch,
        /// A seq this edge handed out, above what Redis holds.
        below: u64,
    },
    /// This edge's members of `room` (0: none left): written to the room's online hash, kept
    /// fresh by the bridge until it says 0.
    Occupancy {
        /// The room.
        room: RoomName,
        /// This edge's members of the room.
        count: u64,
    },
}

/// Publishes waiting for Redis beyond which the engines refuse more (503, Retry-After).
pub const MAX_PUBLISHES_IN_FLIGHT: usize = 16_384;

/// The engines' handle on the bridge. Publishes, whose volume is the publishers', are bounded
/// (a full queue refuses the publish); subscriptions, fills and recoveries are bounded by the
/// engines themselves (one state change, at most one fill in flight per room; one recovery per
/// joining connection), so they never wait behind a publish flood.
#[derive(Clone)]
pub struct Bridge {
    tx: UnboundedSender<BridgeCmd>,
    publishes: Arc<Semaphore>,
}

impl Bridge {
    /// Sends `cmd`; a publish over the bound is handed back so the engine can refuse it.
    #[expect(clippy::result_large_err, reason = "the command itself comes back, unboxed, on the rare refusal")]
    pub fn send(&self, cmd: BridgeCmd) -> Result<(), BridgeCmd> {
        if let BridgeCmd::Publish { permit, .. } = &cmd
            && permit.is_none()
        {
            let Ok(p) = self.publishes.clone().try_acquire_owned() else { return Err(cmd) };
            let BridgeCmd::Publish { room, msg, must_deliver, conflate, reply, .. } = cmd else { unreachable!() };
            return self
                .tx
                .send(BridgeCmd::Publish { room, msg, must_deliver, conflate, reply, permit: Some(p) })
                .map_err(|e| e.0);
        }
        self.tx.send(cmd).map_err(|e| e.0)
    }

    /// A bridge whose commands go to `tx` (tests drive the engine's Redis mode without Redis).
    #[cfg(test)]
    pub(crate) fn to_channel(tx: UnboundedSender<BridgeCmd>) -> Self {
        Self::to_channel_holding(tx, MAX_PUBLISHES_IN_FLIGHT)
    }

    /// As [`Bridge::to_channel`], holding at most `publishes` publishes in flight.
    #[cfg(test)]
    pub(crate) fn to_channel_holding(tx: UnboundedSender<BridgeCmd>, publishes: usize) -> Self {
        Self { tx, publishes: Arc::new(Semaphore::new(publishes)) }
    }
}

/// Limits the bridge applies to the room streams.
#[derive(Debug, Clone, Copy)]
pub struct StreamLimits {
    /// Must-deliver messages a room's stream keeps (trimmed beyond).
    pub must_deliver: usize,
    /// Droppable messages a room's stream keeps (trimmed beyond).
    pub droppable: usize,
    /// How long a publish's idempotency key is remembered (`ingest.idempotency_ttl_s`).
    pub idempotency_ttl_s: u64,
    /// `bus.min_replicas_acked`: replicas that must hold a must-deliver message before it is
    /// acknowledged (0: none).
    pub min_replicas_acked: u32,
    /// `bus.replicas_timeout_ms`: how long to wait for them.
    pub replicas_timeout_ms: u64,
}

impl StreamLimits {
    /// How long a waited publish's connection waits for an answer: WAIT's own timeout and
    /// room for the script and the round trip.
    pub fn waited_response_timeout(&self) -> Duration {
        Duration::from_millis(self.replicas_timeout_ms + 2_000)
    }
}

/// How far a room's seq moves on at the first script after a failover (`fence_lua!`): past
/// every seq the lost primary can have handed out without its replica getting it. That is at
/// most what one room publishes in the window a primary may number alone: with
/// `min-replicas-max-lag` (10 s by default) plus the failover time, 10^6 covers a room at
/// 10^4 messages/s for 100 s. What the skipped range held (droppable messages, gifts that
/// were never acknowledged) is announced to members as a `gap`.
pub const FAILOVER_SEQ_SKIP: u64 = 1_000_000;

/// The failover fence every script that numbers or reads a room's seq runs first, as
/// `rc_fence(meta key)`. A room's meta remembers the replication history (`master_replid`)
/// that last numbered or read it. A replica promoted to primary (Cluster failover, Sentinel)
/// keeps its old primary's history as `master_replid2`: writes the old primary numbered and
/// never replicated are gone, and numbering on from the seq the replica holds would hand
/// their seqs out again, to messages that edges and clients which saw the lost ones skip as
/// already seen (a gift silently lost: measured in the failover benchmark before this fence).
/// So on a promoted primary the room's seq first moves on by `FAILOVER_SEQ_SKIP`. A restart
/// of a primary that never had replicas (a new history) or a slot migration (`MIGRATE` copies
/// everything the old owner numbered) only records the new history; a primary that had
/// replicas keeps its old history as `master_replid2` across a restart from its RDB, and is
/// fenced as a promoted one would be (needed if the snapshot lacks the last writes).
macro_rules! fence_lua {
    () => {
        r"
local function rc_fence(meta)
  local info = redis.call('INFO', 'replication')
  local rid = string.match(info, 'master_replid:(%x+)')
  if not rid then return end
  local had = redis.call('HGET', meta, 'rid')
  if had == rid then return end
  if had and had == string.match(info, 'master_replid2:(%x+)') and redis.call('HEXISTS', meta, 'seq') == 1 then
    redis.call('HINCRBY', meta, 'seq', 1000000)
  end
  redis.call('HSET', meta, 'rid', rid)
end
"
    };
}

pub(super) const PUBLISH_LUA: &str = concat!(
    fence_lua!(),
    r#"
-- KEYS: meta (hash: seq, epoch), must-deliver stream, droppable stream, channel, evicted-seq key,
--       latest hash, idempotency key (rc:{room}:idem:KEY, or the meta key when there is none),
--       tombstones in place (hash: seq -> message)
-- ARGV: kind, user, body (raw JSON), must_deliver (0|1), md_max, dr_max, conflate (0|1), entry key,
--       idempotency TTL in seconds (0: no key), publish command (PUBLISH, or SPUBLISH on a cluster),
--       publish now (1), or leave it to the caller (0: it publishes once replicas hold the message)
-- Returns {seq, ts_us, replayed (0|1)}, and the message when the caller publishes it.
rc_fence(KEYS[1])
if ARGV[9] ~= '0' then
  local prev = redis.call('GET', KEYS[7])
  if prev then
    local s, t0 = string.match(prev, '^(%d+):(%d+)$')
    if ARGV[11] == '0' then
      -- The first attempt may never have been published (its replicas were late): the caller
      -- publishes it now, from the stream (members ignore a seq they have).
      local e = redis.call('XRANGE', KEYS[2], s .. '-0', s .. '-0')
      local m = ''
      if #e > 0 then m = e[1][2][2] end
      return {tonumber(s), tonumber(t0), 1, m}
    end
    return {tonumber(s), tonumber(t0), 1}
  end
end
local t = redis.call('TIME')
local ts = tonumber(t[1]) * 1000000 + tonumber(t[2])
local ep = redis.call('HGET', KEYS[1], 'epoch')
if not ep then
  -- A new numbering (first publish, or Redis lost the room): a new epoch, and whatever the
  -- old numbering left is void.
  ep = string.format('%d', ts)
  redis.call('HSET', KEYS[1], 'epoch', ep)
  redis.call('DEL', KEYS[2], KEYS[3], KEYS[5], KEYS[6], KEYS[8])
end
local seq = redis.call('HINCRBY', KEYS[1], 'seq', 1)
local msg = '{"ep":' .. ep .. ',"seq":' .. string.format('%d', seq) .. ',"ts_us":' .. string.format('%d', ts)
  .. ',"kind":' .. cjson.encode(ARGV[1]) .. ',"user":' .. cjson.encode(ARGV[2])
  .. ',"md":' .. ARGV[4] .. ',"body":' .. ARGV[3] .. '}'
local id = string.format('%d', seq) .. '-0'
if ARGV[4] == '1' then
  redis.call('XADD', KEYS[2], id, 'm', msg)
  local over = redis.call('XLEN', KEYS[2]) - tonumber(ARGV[5])
  if over > 0 then
    local old = redis.call('XRANGE', KEYS[2], '-', '+', 'COUNT', over)
    local last = string.match(old[#old][1], '^(%d+)')
    redis.call('SET', KEYS[5], last)
    redis.call('XTRIM', KEYS[2], 'MAXLEN', tonumber(ARGV[5]))
  end
else
  redis.call('XADD', KEYS[3], 'MAXLEN', '~', tonumber(ARGV[6]), id, 'm', msg)
end
if ARGV[7] == '1' then
  redis.call('HSET', KEYS[6], ARGV[1] .. '\n' .. ARGV[8], msg)
  if redis.call('HLEN', KEYS[6]) > 256 then
    -- Bounded: what a publisher inventing keys can make every joiner receive.
    local f = redis.call('HRANDFIELD', KEYS[6])
    if f ~= ARGV[1] .. '\n' .. ARGV[8] then redis.call('HDEL', KEYS[6], f) end
  end
end
if ARGV[11] == '1' then
  redis.call(ARGV[10], KEYS[4], msg)
end
if ARGV[9] ~= '0' then
  redis.call('SET', KEYS[7], string.format('%d', seq) .. ':' .. string.format('%d', ts), 'EX', tonumber(ARGV[9]))
end
if ARGV[11] == '0' then
  return {seq, ts, 0, msg}
end
return {seq, ts, 0}
"#
);

/// Reads a room's seq and epoch, making the epoch if the room has none yet (so a member that
/// joins before the first publish is told the numbering the first publish will use).
const SYNC_LUA: &str = concat!(
    fence_lua!(),
    r"
-- KEYS: meta (hash: seq, epoch), must-deliver stream, droppable stream, evicted-seq key,
--       latest hash, tombstones in place
rc_fence(KEYS[1])
local ep = redis.call('HGET', KEYS[1], 'epoch')
if not ep then
  local t = redis.call('TIME')
  ep = string.format('%d', tonumber(t[1]) * 1000000 + tonumber(t[2]))
  redis.call('HSET', KEYS[1], 'epoch', ep)
  redis.call('DEL', KEYS[2], KEYS[3], KEYS[4], KEYS[5], KEYS[6])
end
return {redis.call('HGET', KEYS[1], 'seq') or '0', ep, redis.call('HVALS', KEYS[5])}
"
);

/// A new epoch for a room whose seq in Redis went below what an edge handed out under the
/// same epoch (Redis lost writes). Only if it is still so: another edge may have done it.
const RENUMBER_LUA: &str = concat!(
    fence_lua!(),
    r"
-- KEYS: meta (hash: seq, epoch), must-deliver stream, droppable stream, evicted-seq key,
--       latest hash, tombstones in place
-- ARGV: the epoch seen, the seq handed out under it
rc_fence(KEYS[1])
local ep = redis.call('HGET', KEYS[1], 'epoch')
local seq = tonumber(redis.call('HGET', KEYS[1], 'seq') or '0')
if ep == ARGV[1] and seq < tonumber(ARGV[2]) then
  local t = redis.call('TIME')
  redis.call('HSET', KEYS[1], 'epoch', string.format('%d', tonumber(t[1]) * 1000000 + tonumber(t[2])), 'seq', 0)
  redis.call('DEL', KEYS[2], KEYS[3], KEYS[4], KEYS[5], KEYS[6])
  return 1
end
return 0
"
);

/// Moderation's delete (docs/PROTOCOL.md, "Moderation"): the message leaves its stream and a
/// tombstone takes its place (in the `deleted` hash: a stream cannot take an entry under an id
/// it has passed), it stops being the room's latest state, and a live tombstone is numbered,
/// added to the must-deliver stream and published like a gift, in one script: atomic with the
/// room's numbering, so every edge puts the tombstone in place before it sees a later message.
const DELETE_LUA: &str = concat!(
    fence_lua!(),
    r#"
-- KEYS: meta (hash: seq, epoch), must-deliver stream, droppable stream, channel, evicted-seq key,
--       latest hash, tombstones in place (hash: seq -> message)
-- ARGV: the seq to delete, md_max, publish command (PUBLISH, or SPUBLISH on a cluster)
-- Returns {status, tombstone seq, tombstone ts_us, in history (0|1)}; status 0: no such seq,
-- 1: deleted, 2: deleted already (nothing published), 3: it is a tombstone (not deletable).
rc_fence(KEYS[1])
local ep = redis.call('HGET', KEYS[1], 'epoch')
local cur = tonumber(redis.call('HGET', KEYS[1], 'seq') or '0')
local n = tonumber(ARGV[1])
if (not ep) or (not n) or n < 1 or n > cur then return {0, 0, 0, 0} end
if redis.call('HEXISTS', KEYS[7], ARGV[1]) == 1 then return {2, 0, 0, 1} end
local id = ARGV[1] .. '-0'
local found, md, ts0 = 0, '0', '0'
for i, key in ipairs({KEYS[2], KEYS[3]}) do
  local e = redis.call('XRANGE', key, id, id)
  if #e > 0 then
    local m = e[1][2][2]
    if string.match(m, '^{"ep":%d+,"seq":%d+,"ts_us":%d+,"kind":"deleted",') then return {3, 0, 0, 1} end
    ts0 = string.match(m, '^{"ep":%d+,"seq":%d+,"ts_us":(%d+),')
    redis.call('XDEL', key, id)
    found = 1
    if i == 1 then md = '1' end
    break
  end
end
local body = '{"seq":' .. ARGV[1] .. '}'
if found == 1 then
  redis.call('HSET', KEYS[7], ARGV[1], '{"ep":' .. ep .. ',"seq":' .. ARGV[1] .. ',"ts_us":' .. ts0
    .. ',"kind":"deleted","user":"","md":' .. md .. ',"body":' .. body .. '}')
end
local latest = redis.call('HGETALL', KEYS[6])
for i = 1, #latest, 2 do
  if string.match(latest[i + 1], '^{"ep":%d+,"seq":(%d+),') == ARGV[1] then redis.call('HDEL', KEYS[6], latest[i]) end
end
local t = redis.call('TIME')
local ts = tonumber(t[1]) * 1000000 + tonumber(t[2])
local seq = redis.call('HINCRBY', KEYS[1], 'seq', 1)
local msg = '{"ep":' .. ep .. ',"seq":' .. string.format('%d', seq) .. ',"ts_us":' .. string.format('%d', ts)
  .. ',"kind":"deleted","user":"","md":1,"body":' .. body .. '}'
redis.call('XADD', KEYS[2], string.format('%d', seq) .. '-0', 'm', msg)
local over = redis.call('XLEN', KEYS[2]) - tonumber(ARGV[2])
if over > 0 then
  local old = redis.call('XRANGE', KEYS[2], '-', '+', 'COUNT', over)
  local last = string.match(old[#old][1], '^(%d+)')
  redis.call('SET', KEYS[5], last)
  redis.call('XTRIM', KEYS[2], 'MAXLEN', tonumber(ARGV[2]))
end
if redis.call('HLEN', KEYS[7]) > 256 then
  -- Tombstones in place of seqs both streams have let go of serve nobody: bounded.
  local floor = seq
  for _, key in ipairs({KEYS[2], KEYS[3]}) do
    local first = redis.call('XRANGE', key, '-', '+', 'COUNT', 1)
    if #first > 0 then floor = math.min(floor, tonumber(string.match(first[1][1], '^(%d+)'))) end
  end
  for _, f in ipairs(redis.call('HKEYS', KEYS[7])) do
    if tonumber(f) < floor then redis.call('HDEL', KEYS[7], f) end
  end
end
redis.call(ARGV[3], KEYS[4], msg)
return {1, seq, ts, found}
"#
);

/// Deletes message `seq` of `room` (Redis mode): see `DELETE_LUA`.
pub async fn delete_message(
    cm: &mut Conn,
    room: &str,
    seq: u64,
    limits: StreamLimits,
) -> ::redis::RedisResult<Result<super::Deleted, super::DeleteError>> {
    let k = keys(room);
    let (status, tseq, ts_us, found): (u8, u64, u64, u8) = ::redis::Script::new(DELETE_LUA)
        .key(&k[0])
        .key(&k[1])
        .key(&k[2])
        .key(&k[3])
        .key(&k[4])
        .key(&k[5])
        .key(&k[6])
        .arg(seq)
        .arg(limits.must_deliver.max(1))
        .arg(cm.publish_command())
        .invoke_async(cm)
        .await
        .inspect_err(|_| failed("delete"))?;
    Ok(match status {
        1 => Ok(super::Deleted { tombstone: Some(Ack { seq: tseq, ts_us, replayed: false }), in_history: found == 1 }),
        2 => Ok(super::Deleted { tombstone: None, in_history: true }),
        3 => Err(super::DeleteError::Tombstone),
        _ => Err(super::DeleteError::NotFound),
    })
}

/// The channel every edge subscribes to for moderation that reaches beyond rooms it follows: a
/// user's disconnect (every edge may hold a connection of theirs) and bans (every edge checks
/// them at joins). Classic pub/sub on one Redis; a cluster uses [`MOD_ROOM`]'s channel instead.
pub const MOD_CHANNEL: &str = "rc:mod";
/// On a Redis Cluster, moderation events travel on this pseudo-room's channel (`rc:{#mod}:ch`,
/// sharded pub/sub in its slot), which every edge follows as it follows a room: subscribed on
/// the slot's owner, followed across slot moves and failovers, and each time it goes live the
/// bans in force are read again. `#` cannot be in a room's name, so no room can take it.
pub const MOD_ROOM: &str = "#mod";
/// Every ban in force: members `ROOM\nUSER`, scored by the ban's end (ms since the Unix epoch),
/// pruned of expired bans as it is used. What an edge loads when it (re)connects. One key, so
/// on a cluster every pipeline on it runs on one node.
const BANS_KEY: &str = "rc:bans";

/// What travels on [`MOD_CHANNEL`]. `from`: the edge that took the request (it has applied it
/// already and skips its own message).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum ModEvent {
    /// Close every connection of `user` on every edge.
    Kick {
        /// The user, as their token's `sub` names them.
        user: String,
        /// The edge that took the request.
        from: String,
    },
    /// Ban `user` from `room` and remove them from it.
    Ban {
        /// The room.
        room: String,
        /// The user, as their token's `sub` names them.
        user: String,
        /// When the ban ends, ms since the Unix epoch.
        until_ms: u64,
        /// The edge that took the request.
        from: String,
    },
    /// Lift the ban of `user` from `room`.
    Unban {
        /// The room.
        room: String,
        /// The user, as their token's `sub` names them.
        user: String,
        /// The edge that took the request.
        from: String,
    },
}

/// Publishes a moderation event to every edge; returns how many received it (edges whose bus
/// is up, this one included).
pub async fn publish_event(cm: &mut Conn, ev: &ModEvent) -> ::redis::RedisResult<u64> {
    let text = serde_json::to_string(ev).unwrap_or_default();
    let r = if cm.is_cluster() {
        // Every edge is subscribed on the owner of the pseudo-room's slot: SPUBLISH counts them.
        ::redis::cmd("SPUBLISH").arg(super::slots::channel_key(MOD_ROOM)).arg(text).query_async(cm).await
    } else {
        cm.publish(MOD_CHANNEL, text).await
    };
    r.inspect_err(|_| failed("moderation"))
}

/// Why Redis refused a ban.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BanOutcome {
    /// Banned; the event reached this many edges (this one included).
    Done {
        /// Edges that received the ban event.
        edges: u64,
    },
    /// The table of bans is at its bound (`moderation.max_bans`).
    Full,
}

/// Bans `user` from `room` until `until_ms` in Redis (the index, pruned of expired bans first,
/// at most `max` bans in force) and tells every edge.
pub async fn ban(cm: &mut Conn, ev: &ModEvent, now_ms: u64, max: usize) -> ::redis::RedisResult<BanOutcome> {
    let ModEvent::Ban { room, user, until_ms, .. } = ev else { return Ok(BanOutcome::Full) };
    let member = format!("{room}\n{user}");
    let (n, exists): (u64, Option<f64>) = ::redis::pipe()
        .cmd("ZREMRANGEBYSCORE")
        .arg(BANS_KEY)
        .arg("-inf")
        .arg(now_ms)
        .ignore()
        .zcard(BANS_KEY)
        .zscore(BANS_KEY, &member)
        .query_async(cm)
        .await
        .inspect_err(|_| failed("moderation"))?;
    if exists.is_none() && n >= max as u64 {
        return Ok(BanOutcome::Full);
    }
    let () = ::redis::pipe()
        .zadd(BANS_KEY, &member, *until_ms)
        .ignore()
        .query_async(cm)
        .await
        .inspect_err(|_| failed("moderation"))?;
    Ok(BanOutcome::Done { edges: publish_event(cm, ev).await? })
}

/// Lifts a ban in Redis and tells every edge; returns how many received it.
pub async fn unban(cm: &mut Conn, ev: &ModEvent) -> ::redis::RedisResult<u64> {
    let ModEvent::Unban { room, user, .. } = ev else { return Ok(0) };
    let () = ::redis::pipe()
        .zrem(BANS_KEY, format!("{room}\n{user}"))
        .ignore()
        .query_async(cm)
        .await
        .inspect_err(|_| failed("moderation"))?;
    publish_event(cm, ev).await
}

/// Every ban in force in Redis, at most `max`.
pub async fn load_bans(cm: &mut Conn, now_ms: u64, max: usize) -> ::redis::RedisResult<Vec<crate::moderation::Ban>> {
    // A read only (expired bans are pruned by the next ban): a primary that refuses writes
    // (`min-replicas-to-write` with its replica gone) still lets edges load the bans in force.
    let all: Vec<(String, f64)> = ::redis::cmd("ZRANGE")
        .arg(BANS_KEY)
        .arg(format!("({now_ms}"))
        .arg("+inf")
        .arg("BYSCORE")
        .arg("LIMIT")
        .arg(0)
        .arg(max)
        .arg("WITHSCORES")
        .query_async(cm)
        .await?;
    Ok(all
        .into_iter()
        .filter_map(|(member, until)| {
            let (room, user) = member.split_once('\n')?;
            Some(crate::moderation::Ban { room: room.to_owned(), user: user.to_owned(), until_ms: until as u64 })
        })
        .collect())
}

/// One edge's count of a room's members, and the room's total over every edge.
///
/// The room's online hash holds `e:<edge>` = `<count>:<expiry ms>` per edge and `total`, the
/// last total announced. The script writes this edge's field (or deletes it at 0), sums the
/// fields not expired (deleting expired ones: a crashed edge's members leave the total within
/// the TTL, at the next report of any edge), and publishes `{"online":N}` on the room's channel
/// only when the total changed. Cost per call: O(edges serving the room).
pub(super) const ONLINE_LUA: &str = r#"
-- KEYS: online hash, channel
-- ARGV: edge id, count, ttl ms, publish command (PUBLISH, or SPUBLISH on a cluster)
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local field = 'e:' .. ARGV[1]
if tonumber(ARGV[2]) > 0 then
  redis.call('HSET', KEYS[1], field, ARGV[2] .. ':' .. string.format('%d', now + tonumber(ARGV[3])))
else
  redis.call('HDEL', KEYS[1], field)
end
local total = 0
local all = redis.call('HGETALL', KEYS[1])
for i = 1, #all, 2 do
  local f = all[i]
  if string.sub(f, 1, 2) == 'e:' then
    local c, e = string.match(all[i + 1], '^(%d+):(%d+)$')
    if c and tonumber(e) > now then
      total = total + tonumber(c)
    else
      redis.call('HDEL', KEYS[1], f)
    end
  end
end
local prev = redis.call('HGET', KEYS[1], 'total')
if prev ~= string.format('%d', total) then
  redis.call('HSET', KEYS[1], 'total', total)
  redis.call(ARGV[4], KEYS[2], '{"online":' .. string.format('%d', total) .. '}')
end
redis.call('PEXPIRE', KEYS[1], tonumber(ARGV[3]) * 2)
return total
"#;

/// The online hash of `room` (beside its other keys, same hash tag).
pub fn online_key(room: &str) -> String {
    format!("rc:{{{room}}}:online")
}

/// A room's members per edge and in total, as the online hash holds them at `now_ms` (expired
/// fields left out): for `GET /v1/rooms/{room}` on any edge.
pub async fn online(cm: &mut Conn, room: &str, now_ms: u64) -> ::redis::RedisResult<(u64, Vec<(String, u64)>)> {
    let all: Vec<(String, String)> = cm.hgetall(online_key(room)).await?;
    let mut edges = Vec::new();
    for (field, value) in all {
        let Some(edge) = field.strip_prefix("e:") else { continue };
        let Some((count, expiry)) = value.split_once(':') else { continue };
        if let (Ok(count), Ok(expiry)) = (count.parse::<u64>(), expiry.parse::<u64>())
            && expiry > now_ms
        {
            edges.push((edge.to_owned(), count));
        }
    }
    edges.sort();
    Ok((edges.iter().map(|(_, c)| c).sum(), edges))
}

/// A room's seq and epoch as Redis holds them (None: Redis has no such room).
pub async fn room_meta(cm: &mut Conn, room: &str) -> ::redis::RedisResult<Option<(u64, String)>> {
    let (seq, epoch): (Option<u64>, Option<String>) =
        ::redis::cmd("HMGET").arg(&keys(room)[0]).arg("seq").arg("epoch").query_async(cm).await?;
    Ok(epoch.map(|e| (seq.unwrap_or(0), e)))
}

pub(super) fn keys(room: &str) -> [String; 7] {
    [
        format!("rc:{{{room}}}:meta"),
        format!("rc:{{{room}}}:md"),
        format!("rc:{{{room}}}:dr"),
        format!("rc:{{{room}}}:ch"),
        format!("rc:{{{room}}}:evicted"),
        // Latest state: conflated kinds' newest message per kind and key.
        format!("rc:{{{room}}}:latest"),
        // Moderation: tombstones in place of deleted messages (seq -> message), which the
        // streams cannot hold (an entry cannot be written again under its id once deleted).
        format!("rc:{{{room}}}:deleted"),
    ]
}

pub(crate) fn room_of_channel(ch: &str) -> Option<&str> {
    ch.strip_prefix("rc:{")?.strip_suffix("}:ch")
}

/// A message as the script writes it.
#[derive(Deserialize)]
struct Wire<'a> {
    ep: u64,
    seq: u64,
    ts_us: u64,
    kind: String,
    user: String,
    md: u8,
    #[serde(borrow)]
    body: &'a RawValue,
}

/// A presence announcement on a room's channel (ONLINE_LUA).
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct OnlineWire {
    pub(crate) online: u64,
}

/// A message as the script wrote it: the message, whether it must be delivered, its epoch.
pub(crate) fn parse(bytes: &[u8]) -> Option<(PushMessage, bool, Epoch)> {
    let w: Wire<'_> = serde_json::from_slice(bytes).ok()?;
    Some((
        PushMessage { seq: w.seq, ts_us: w.ts_us, kind: w.kind, user: w.user, body: w.body.get().to_owned() },
        w.md == 1,
        w.ep,
    ))
}

/// Starts the bridge on the current tokio runtime: one Redis (`redis://`), a Redis Cluster
/// (`redis-cluster://host:port,host:port`, see `bus::cluster`) or one Redis under Sentinel
/// (`redis-sentinel://host:port,host:port/NAME`, see `bus::sentinel`).
#[expect(clippy::too_many_arguments, reason = "each is a separate handle the bridge owns")]
pub fn start(
    url: &str,
    bus: BusHandle,
    limits: StreamLimits,
    presence: Presence,
    up: prometheus::IntGauge,
    errors: prometheus::IntCounterVec,
    moderation: Arc<crate::moderation::Moderation>,
    nodes: super::cluster::NodeBoard,
    replication: prometheus::Histogram,
) -> Result<Bridge, ::redis::RedisError> {
    let _ = ERRORS.set(errors);
    let _ = REPLICATION.set(replication);
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    match BusUrl::parse(url)
        .map_err(|e| ::redis::RedisError::from((::redis::ErrorKind::InvalidClientConfig, "bus", e)))?
    {
        BusUrl::Single(url) => {
            let client = ::redis::Client::open(url)?;
            tokio::spawn(run(Target::Fixed(client), rx, bus, limits, presence, up, moderation));
        }
        BusUrl::Sentinel(t) => {
            ::redis::Client::open(t.node_url("h:1"))?;
            tokio::spawn(super::sentinel::watch_nodes(t.clone(), nodes));
            tokio::spawn(run(Target::Sentinel(t), rx, bus, limits, presence, up, moderation));
        }
        BusUrl::Cluster(seeds) => {
            // Fail early on a malformed seed, as `Client::open` does for one Redis.
            for s in &seeds {
                ::redis::Client::open(s.as_str())?;
            }
            tokio::spawn(super::cluster::run(seeds, rx, bus, limits, presence, up, nodes, moderation));
        }
    }
    Ok(Bridge { tx, publishes: Arc::new(Semaphore::new(MAX_PUBLISHES_IN_FLIGHT)) })
}

/// Where the bus is, from its URL.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BusUrl {
    /// `redis://` or `rediss://`: one Redis (or a primary behind a stable address).
    Single(String),
    /// `redis-cluster://[user:password@]host:port,host:port[/?query]`: a Redis Cluster, given
    /// by seed nodes (any few; the rest are discovered), each as a `redis://` URL.
    Cluster(Vec<String>),
    /// `redis-sentinel://[user:password@]host:port,host:port/MASTER`: one Redis and its
    /// replicas, whose master the sentinels name (`bus::sentinel`).
    Sentinel(super::sentinel::SentinelTarget),
}

impl BusUrl {
    /// Reads a bus URL by its scheme; the error names what is wrong.
    pub fn parse(url: &str) -> Result<Self, String> {
        if url.starts_with("redis://") || url.starts_with("rediss://") {
            return Ok(Self::Single(url.to_owned()));
        }
        if let Some(rest) = url.strip_prefix("redis-sentinel://") {
            let (authority, name) = rest.split_once('/').unwrap_or((rest, ""));
            let name = name.trim_end_matches('/');
            if name.is_empty() || name.contains(['/', '?', '#']) {
                return Err(
                    "redis-sentinel:// needs the master's name: redis-sentinel://HOST:PORT,HOST:PORT/NAME".into()
                );
            }
            let (auth, hosts) = match authority.rsplit_once('@') {
                Some((u, h)) => (format!("{u}@"), h),
                None => (String::new(), authority),
            };
            let sentinels = hosts_of(hosts)?;
            return Ok(Self::Sentinel(super::sentinel::SentinelTarget { sentinels, master: name.to_owned(), auth }));
        }
        let Some(rest) = url.strip_prefix("redis-cluster://") else {
            return Err(
                "must be redis://HOST:PORT, redis-cluster://HOST:PORT,HOST:PORT,... or redis-sentinel://HOST:PORT,.../MASTER"
                    .into(),
            );
        };
        let end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
        let (authority, tail) = rest.split_at(end);
        let (userinfo, hosts) = match authority.rsplit_once('@') {
            Some((u, h)) => (Some(u), h),
            None => (None, authority),
        };
        let auth = userinfo.map(|u| format!("{u}@")).unwrap_or_default();
        let seeds = hosts_of(hosts)?.into_iter().map(|h| format!("redis://{auth}{h}{tail}")).collect();
        Ok(Self::Cluster(seeds))
    }
}

/// `host:port,host:port` (at least one).
fn hosts_of(hosts: &str) -> Result<Vec<String>, String> {
    let mut out = Vec::new();
    for h in hosts.split(',').map(str::trim).filter(|h| !h.is_empty()) {
        let Some((host, port)) = h.rsplit_once(':') else {
            return Err(format!("node {h:?}: HOST:PORT expected"));
        };
        if host.is_empty() || port.parse::<u16>().is_err() {
            return Err(format!("node {h:?}: HOST:PORT expected"));
        }
        out.push(h.to_owned());
    }
    if out.is_empty() {
        return Err("at least one node HOST:PORT is needed".into());
    }
    Ok(out)
}

/// Where the single-Redis bridge connects: a fixed address, or the master Sentinel names.
enum Target {
    Fixed(::redis::Client),
    Sentinel(super::sentinel::SentinelTarget),
}

/// A command connection to the bus. One Redis: redis-rs's `ConnectionManager` (reconnects by
/// itself). A cluster: redis-rs's cluster connection, which routes each command by its first
/// key's slot, follows `MOVED` and `ASK` and refreshes the slot map; it never subscribes (see
/// `bus::slots` for why), so no push can be taken for a command's reply.
#[derive(Clone)]
pub enum Conn {
    /// One Redis.
    Single(ConnectionManager),
    /// A Redis Cluster.
    Cluster(::redis::cluster_async::ClusterConnection),
    /// One Redis whose master Sentinels name.
    Sentinel(super::sentinel::SentinelConn),
}

/// How long a command connection waits for a reply (single Redis, Sentinel's master, every
/// cluster node). Not redis-rs's 500 ms default: on a saturated edge the runtime can poll a
/// reply Redis sent in microseconds later than that, and a reply taken for lost is a load
/// report missed (two in a row and dispatch skips the edge: 4,262 and 26,223 refused routes in
/// two 10^6 rolling restarts whose only edge taking members was reporting), a publish answered
/// 503 although numbered, or a read retried on a box with no time to spare.
pub const COMMAND_TIMEOUT: Duration = Duration::from_secs(3);

/// A command connection to one Redis (`redis://`), replies awaited up to [`COMMAND_TIMEOUT`].
pub(super) async fn single(client: ::redis::Client) -> ::redis::RedisResult<ConnectionManager> {
    let config = ::redis::aio::ConnectionManagerConfig::new().set_response_timeout(Some(COMMAND_TIMEOUT));
    ConnectionManager::new_with_config(client, config).await
}

impl Conn {
    /// Connects to the bus at `url` (publishers' load reports, dispatch, room figures).
    pub async fn connect(url: &str) -> ::redis::RedisResult<Self> {
        match BusUrl::parse(url)
            .map_err(|e| ::redis::RedisError::from((::redis::ErrorKind::InvalidClientConfig, "bus", e)))?
        {
            BusUrl::Single(url) => {
                let mut cm = single(::redis::Client::open(url)?).await?;
                // A cluster node answers keys of its own slots only: as one Redis, publishes to
                // every other slot would get 503 while the bus looked up (a trial found it).
                let info: String = ::redis::cmd("INFO").arg("cluster").query_async(&mut cm).await.unwrap_or_default();
                if info.lines().any(|l| l.trim() == "cluster_enabled:1") {
                    return Err(::redis::RedisError::from((
                        ::redis::ErrorKind::InvalidClientConfig,
                        "bus",
                        "this Redis is a Redis Cluster node: use redis-cluster://host:port,host:port as the bus"
                            .to_owned(),
                    )));
                }
                Ok(Self::Single(cm))
            }
            BusUrl::Cluster(seeds) => super::cluster::command_connection(&seeds).await.map(Self::Cluster),
            BusUrl::Sentinel(t) => {
                let c = super::sentinel::SentinelConn::new(t, COMMAND_TIMEOUT);
                // Fail now, as the others do, when no sentinel names a reachable master.
                let _: String = ::redis::cmd("PING").query_async(&mut c.clone()).await?;
                Ok(Self::Sentinel(c))
            }
        }
    }

    /// Whether this is a cluster connection (keys of one command must share a slot).
    pub fn is_cluster(&self) -> bool {
        matches!(self, Self::Cluster(_))
    }

    /// How a room's channel is published to: sharded pub/sub on a cluster (the message stays
    /// within the slot's shard instead of crossing every node's bus).
    pub fn publish_command(&self) -> &'static str {
        if self.is_cluster() { "SPUBLISH" } else { "PUBLISH" }
    }
}

impl ::redis::aio::ConnectionLike for Conn {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a ::redis::Cmd) -> ::redis::RedisFuture<'a, ::redis::Value> {
        match self {
            Self::Single(c) => c.req_packed_command(cmd),
            Self::Cluster(c) => c.req_packed_command(cmd),
            Self::Sentinel(c) => c.req_packed_command(cmd),
        }
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        cmd: &'a ::redis::Pipeline,
        offset: usize,
        count: usize,
    ) -> ::redis::RedisFuture<'a, Vec<::redis::Value>> {
        match self {
            Self::Single(c) => c.req_packed_commands(cmd, offset, count),
            Self::Cluster(c) => c.req_packed_commands(cmd, offset, count),
            Self::Sentinel(c) => c.req_packed_commands(cmd, offset, count),
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            Self::Single(c) => c.get_db(),
            Self::Cluster(c) => c.get_db(),
            Self::Sentinel(c) => c.get_db(),
        }
    }
}

/// `roomcast_redis_errors_total{op}` (one bridge per process; set when it starts).
static ERRORS: std::sync::OnceLock<prometheus::IntCounterVec> = std::sync::OnceLock::new();

/// Counts a failed Redis operation.
pub(super) fn failed(op: &str) {
    if let Some(e) = ERRORS.get() {
        e.with_label_values(&[op]).inc();
    }
}

/// Who this edge is in the rooms' online hashes, and how long its counts live there.
#[derive(Debug, Clone)]
pub struct Presence {
    /// This edge's field in the rooms' online hashes.
    pub edge_id: String,
    /// How long this edge's counts live without a refresh (a stopped edge's counts expire).
    pub ttl: Duration,
}

/// Writes this edge's count of `room` and lets the script announce a changed total.
pub(super) async fn report_online(
    mut cm: Conn,
    script: ::redis::Script,
    room: RoomName,
    count: u64,
    presence: Arc<Presence>,
) {
    let k = keys(&room);
    let r: ::redis::RedisResult<u64> = script
        .key(online_key(&room))
        .key(&k[3])
        .arg(&presence.edge_id)
        .arg(count)
        .arg(presence.ttl.as_millis() as u64)
        .arg(cm.publish_command())
        .invoke_async(&mut cm)
        .await;
    if let Err(e) = r {
        tracing::debug!(room = %room, error = %e, "online count not written");
        failed("online");
    }
}

/// A moderation event from another edge, applied here: the table of bans at once (in the
/// order events arrive), the shards' part in a task of its own.
pub(super) fn apply_event(moderation: &Arc<crate::moderation::Moderation>, ev: ModEvent) {
    let now_ms = super::now_us() / 1000;
    match ev {
        ModEvent::Kick { from, .. } | ModEvent::Ban { from, .. } | ModEvent::Unban { from, .. }
            if from == moderation.origin => {}
        ModEvent::Kick { user, .. } => {
            let m = moderation.clone();
            tokio::spawn(async move { m.kick_local(&user).await });
        }
        ModEvent::Ban { room, user, until_ms, .. } => {
            if let Err(e) = moderation.bans.insert(&room, &user, until_ms, now_ms) {
                tracing::warn!(room, error = %e, "moderation: a ban from another edge does not fit here");
            }
            let m = moderation.clone();
            tokio::spawn(async move { m.remove_from_room(&room, &user, until_ms).await });
        }
        ModEvent::Unban { room, user, .. } => {
            moderation.bans.remove(&room, &user, now_ms);
        }
    }
}

/// After (re)connecting: the bans in force as Redis holds them replace this edge's (some may
/// have come or gone while it was away); members of rooms newly banned leave them.
pub(super) async fn load_all_bans(mut cm: Conn, moderation: Arc<crate::moderation::Moderation>) -> bool {
    let now_ms = super::now_us() / 1000;
    match load_bans(&mut cm, now_ms, moderation.bans.max()).await {
        Ok(bans) => {
            for b in moderation.bans.replace_all(bans, now_ms) {
                moderation.remove_from_room(&b.room, &b.user, b.until_ms).await;
            }
            true
        }
        Err(e) => {
            tracing::warn!(error = %e, "moderation: cannot read the bans in force from redis");
            failed("moderation");
            false
        }
    }
}

/// Publishes to one room go to Redis one after another, in the order the engine handed them
/// over: each waits until the room's previous one is answered. Redis numbers a room's messages
/// in the order its scripts run, and with a task per publish racing to the connection a
/// `POST /v1/messages` batch's messages to one room came out numbered `[2,3,4,1]` (a trial;
/// the runtime tends to poll the newest task first), while the edge promises the batch's
/// order. Rooms are independent of each other; a room's rate is then bounded by its round
/// trip to Redis, which the per-room limits sit far below.
#[derive(Default)]
pub(super) struct PublishOrder {
    /// Per room, the signal its newest publish gives once answered.
    last: std::collections::HashMap<RoomName, tokio::sync::oneshot::Receiver<()>>,
    /// Entries above which the answered ones are swept.
    sweep_at: usize,
}

impl PublishOrder {
    /// For a publish to `room`: what to wait for first (the room's previous publish, if one
    /// was handed over) and the signal to give once answered.
    pub(super) fn next(
        &mut self,
        room: &RoomName,
    ) -> (Option<tokio::sync::oneshot::Receiver<()>>, tokio::sync::oneshot::Sender<()>) {
        let (done, wait) = tokio::sync::oneshot::channel();
        let previous = self.last.insert(room.clone(), wait);
        if self.last.len() > self.sweep_at.max(1024) {
            // Rooms whose newest publish is answered need no entry.
            self.last.retain(|_, w| matches!(w.try_recv(), Err(tokio::sync::oneshot::error::TryRecvError::Empty)));
            self.sweep_at = 2 * self.last.len();
        }
        (previous, done)
    }

    /// Rooms with an entry (tests).
    #[cfg(test)]
    pub(super) fn rooms(&self) -> usize {
        self.last.len()
    }
}

/// What both bridges (one Redis or Sentinel, and a cluster) need to carry out the commands they
/// handle alike: publish, fill, recover, renumber and the online count, each on a task of its own.
pub(super) struct Work<'a> {
    pub cm: &'a Conn,
    /// The connection for publishes that wait for replicas (`WAIT` must see only their writes).
    pub wcm: &'a Conn,
    pub script: &'a ::redis::Script,
    pub online: &'a ::redis::Script,
    pub bus: &'a BusHandle,
    pub limits: StreamLimits,
    pub presence: &'a Arc<Presence>,
}

impl Work<'_> {
    /// Starts `cmd`'s work. Subscriptions are each bridge's own: they are ignored here.
    pub(super) fn spawn(
        &self,
        cmd: BridgeCmd,
        occupancy: &mut std::collections::HashMap<RoomName, u64>,
        order: &mut PublishOrder,
    ) {
        let (cm, bus) = (self.cm, self.bus);
        match cmd {
            BridgeCmd::Publish { room, msg, must_deliver, conflate, reply, permit } => {
                let c = if must_deliver { self.wcm.clone() } else { cm.clone() };
                let (script, limits) = (self.script.clone(), self.limits);
                let (previous, done) = order.next(&room);
                let bus = bus.clone();
                tokio::spawn(async move {
                    if let Some(previous) = previous {
                        // Answered or dropped (its task gone): either way its turn is over.
                        let _ = previous.await;
                    }
                    let job = Publish { room, msg, must_deliver, conflate, reply, permit };
                    publish(c, script, job, bus, limits, done).await;
                });
            }
            BridgeCmd::Fill { room, from, to } => {
                tokio::spawn(fill(cm.clone(), self.wcm.clone(), room, from, to, bus.clone(), self.limits));
            }
            BridgeCmd::Recover { room, since, upto } => {
                tokio::spawn(recover(cm.clone(), self.wcm.clone(), room, since, upto, bus.clone(), self.limits));
            }
            BridgeCmd::Renumber { room, epoch, below } => {
                tokio::spawn(renumber(cm.clone(), room, epoch, below, bus.clone()));
            }
            BridgeCmd::Occupancy { room, count } => {
                if count > 0 {
                    occupancy.insert(room.clone(), count);
                } else {
                    occupancy.remove(&room);
                }
                let (online, presence) = (self.online.clone(), self.presence.clone());
                tokio::spawn(report_online(cm.clone(), online, room, count, presence));
            }
            BridgeCmd::Subscribe(_) | BridgeCmd::Unsubscribe(_) => {}
        }
    }
}

async fn run(
    target: Target,
    mut rx: UnboundedReceiver<BridgeCmd>,
    bus: BusHandle,
    limits: StreamLimits,
    presence: Presence,
    up: prometheus::IntGauge,
    moderation: Arc<crate::moderation::Moderation>,
) {
    let script = ::redis::Script::new(PUBLISH_LUA);
    let online_script = ::redis::Script::new(ONLINE_LUA);
    let presence = Arc::new(presence);
    // This edge's last count per room with members here: re-reported every third of the TTL
    // (and after a reconnect) so that the counts of live edges never expire.
    let mut occupancy: std::collections::HashMap<RoomName, u64> = std::collections::HashMap::new();
    let mut order = PublishOrder::default();
    let mut rooms: HashSet<RoomName> = HashSet::new();
    // Rooms whose read of seq and epoch Redis did not answer, to read again.
    let (resync_tx, mut resync_rx) = tokio::sync::mpsc::unbounded_channel::<RoomName>();
    let mut backoff = Duration::from_millis(100);
    loop {
        // (Re)connect: a command connection and a subscriber connection.
        let conn = async {
            let (client, master) = match &target {
                Target::Fixed(c) => (c.clone(), None),
                Target::Sentinel(t) => {
                    let addr = t.master().await?;
                    (::redis::Client::open(t.node_url(&addr))?, Some(addr))
                }
            };
            let cm = Conn::Single(single(client.clone()).await?);
            // Waited publishes on a connection of their own: WAIT holds its connection (and
            // so everything queued behind it) for a replication round trip.
            let wcm = if limits.min_replicas_acked > 0 {
                let config = ::redis::aio::ConnectionManagerConfig::new()
                    .set_response_timeout(Some(limits.waited_response_timeout()));
                Conn::Single(ConnectionManager::new_with_config(client.clone(), config).await?)
            } else {
                cm.clone()
            };
            let ps = client.get_async_pubsub().await?;
            Ok::<_, ::redis::RedisError>((cm, wcm, ps, master))
        }
        .await;
        let (cm, wcm, ps, master) = match conn {
            Ok(c) => c,
            Err(e) => {
                up.set(0);
                bus.send_async(EngineCmd::Redis { up: false }).await;
                tracing::warn!(error = %e, retry_in_ms = backoff.as_millis() as u64, "redis unreachable");
                failed("connect");
                // Keep answering commands (publishes get 503) while we wait.
                let sleep = tokio::time::sleep(backoff);
                tokio::pin!(sleep);
                loop {
                    tokio::select! {
                        () = &mut sleep => break,
                        cmd = rx.recv() => match cmd {
                            None => return,
                            Some(BridgeCmd::Occupancy { room, count }) => {
                                // Written when Redis is back (the refresh after connecting).
                                if count > 0 { occupancy.insert(room, count); } else { occupancy.remove(&room); }
                            }
                            Some(cmd) => offline(cmd, &mut rooms, &bus).await,
                        },
                    }
                }
                backoff = (backoff * 2).min(Duration::from_secs(5));
                continue;
            }
        };
        backoff = Duration::from_millis(100);
        let (mut sink, mut stream) = ps.split();
        // Resubscribe everything, then re-read each room's seq: the engine fills any gap.
        let mut ok = true;
        if let Err(e) = sink.subscribe(MOD_CHANNEL).await {
            tracing::warn!(error = %e, "redis subscribe (moderation) failed");
            failed("subscribe");
            continue;
        }
        for room in &rooms {
            if let Err(e) = sink.subscribe(&keys(room)[3]).await {
                tracing::warn!(error = %e, "redis resubscribe failed");
                failed("subscribe");
                ok = false;
                break;
            }
        }
        if !ok {
            continue;
        }
        up.set(1);
        bus.send_async(EngineCmd::Redis { up: true }).await;
        // Rooms followed already are read once here (a read lost now is made good by the
        // fills that follow live messages); rooms whose first read failed are read again.
        for room in rooms.clone() {
            tokio::spawn(sync_room(cm.clone(), room, bus.clone()));
        }
        tracing::info!(rooms = rooms.len(), "redis bus connected");
        tokio::spawn(check_persistence(cm.clone()));
        tokio::spawn(check_history_counts(cm.clone(), limits));
        tokio::spawn(load_all_bans(cm.clone(), moderation.clone()));
        // Sentinel: ask each second which node is the master; another answer is a failover.
        let (moved_tx, mut moved) = tokio::sync::oneshot::channel::<String>();
        // Held here when nobody watches, so that `moved` stays pending.
        let mut moved_tx = Some(moved_tx);
        let watcher = match (&target, master, moved_tx.take()) {
            (Target::Sentinel(t), Some(current), Some(moved_tx)) => {
                tracing::info!(master = %current, "sentinel names the redis master");
                let t = t.clone();
                Some(tokio::spawn(async move {
                    loop {
                        tokio::time::sleep(Duration::from_secs(1)).await;
                        if let Ok(addr) = t.master().await
                            && addr != current
                        {
                            let _ = moved_tx.send(addr);
                            return;
                        }
                    }
                }))
            }
            (_, _, tx) => {
                moved_tx = tx;
                None
            }
        };
        let _watcher = AbortOnDrop(watcher);
        let _keep = moved_tx;
        use futures_util::StreamExt;
        let mut refresh = tokio::time::interval(presence.ttl / 3);
        refresh.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                Ok(addr) = &mut moved => {
                    tracing::warn!(master = %addr, "sentinel announced a failover: following the new master");
                    failed("connection_lost");
                    up.set(0);
                    bus.send_async(EngineCmd::Redis { up: false }).await;
                    break;
                }
                Some(room) = resync_rx.recv() => {
                    // Still followed: read again (a reconnect meanwhile read it already; a
                    // second answer of the same state changes nothing).
                    if rooms.contains(&room) {
                        tokio::spawn(sync_or_again(cm.clone(), room, bus.clone(), resync_tx.clone()));
                    }
                }
                _ = refresh.tick() => {
                    // One task walks every room with members here, a bounded number of scripts
                    // in flight: the counts of a live edge never expire.
                    let (cm, script, presence) = (cm.clone(), online_script.clone(), presence.clone());
                    let todo: Vec<(RoomName, u64)> = occupancy.iter().map(|(r, c)| (r.clone(), *c)).collect();
                    tokio::spawn(async move {
                        let mut calls = futures_util::stream::iter(todo.into_iter().map(|(room, count)| {
                            report_online(cm.clone(), script.clone(), room, count, presence.clone())
                        }))
                        .buffer_unordered(64);
                        while calls.next().await.is_some() {}
                    });
                }
                msg = stream.next() => match msg {
                    Some(m) => {
                        if m.get_channel_name() == MOD_CHANNEL {
                            match serde_json::from_slice::<ModEvent>(m.get_payload_bytes()) {
                                Ok(ev) => apply_event(&moderation, ev),
                                Err(_) => tracing::warn!("unreadable message on the moderation channel"),
                            }
                            continue;
                        }
                        let Some(room) = room_of_channel(m.get_channel_name()) else { continue };
                        match parse(m.get_payload_bytes()) {
                            Some((msg, must_deliver, epoch)) => {
                                let room = RoomName::from(room);
                                bus.send_async(EngineCmd::Remote { room, msg: Box::new(msg), must_deliver, epoch }).await;
                            }
                            None => match serde_json::from_slice::<OnlineWire>(m.get_payload_bytes()) {
                                Ok(o) => bus.send_async(EngineCmd::Online { room: RoomName::from(room), total: o.online }).await,
                                Err(_) => tracing::warn!(room, "unreadable message on the redis channel"),
                            },
                        }
                    }
                    None => {
                        tracing::warn!("redis subscriber connection lost; reconnecting");
                        failed("connection_lost");
                        up.set(0);
                bus.send_async(EngineCmd::Redis { up: false }).await;
                        break;
                    }
                },
                cmd = rx.recv() => {
                    let Some(cmd) = cmd else { return };
                    match cmd {
                        BridgeCmd::Subscribe(room) => {
                            if rooms.insert(room.clone()) {
                                if let Err(e) = sink.subscribe(&keys(&room)[3]).await {
                                    tracing::warn!(error = %e, "redis subscribe failed");
                failed("subscribe");
                                }
                                // Read the seq only once subscribed: nothing after it is missed.
                                tokio::spawn(sync_or_again(cm.clone(), room, bus.clone(), resync_tx.clone()));
                            }
                        }
                        BridgeCmd::Unsubscribe(room) => {
                            if rooms.remove(&room) {
                                let _ = sink.unsubscribe(&keys(&room)[3]).await;
                            }
                        }
                        other => {
                            let work = Work { cm: &cm, wcm: &wcm, script: &script, online: &online_script, bus: &bus, limits, presence: &presence };
                            work.spawn(other, &mut occupancy, &mut order);
                        }
                    }
                }
            }
        }
    }
}

/// Ends a task when its owner goes (the sentinel watcher of one connection).
struct AbortOnDrop(Option<tokio::task::JoinHandle<()>>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        if let Some(h) = self.0.take() {
            h.abort();
        }
    }
}

/// While Redis is away: track interest, refuse publishes, fail fills and recoveries explicitly.
pub(super) async fn offline(cmd: BridgeCmd, rooms: &mut HashSet<RoomName>, bus: &BusHandle) {
    match cmd {
        BridgeCmd::Subscribe(room) => {
            rooms.insert(room);
        }
        BridgeCmd::Unsubscribe(room) => {
            rooms.remove(&room);
        }
        BridgeCmd::Publish { room, reply, .. } => {
            bus.send_async(EngineCmd::PublishDone { room, reply, result: Err(PublishError::BusUnavailable) }).await;
        }
        BridgeCmd::Fill { room, from, to } => {
            bus.send_async(EngineCmd::Filled { room, from, to, messages: Vec::new(), ok: false }).await;
        }
        BridgeCmd::Recover { room, since, upto } => {
            bus.send_async(recovery_failed(room, since, upto)).await;
        }
        // Done when Redis is back: the resync after reconnecting sees the same state again.
        BridgeCmd::Occupancy { .. } | BridgeCmd::Renumber { .. } => {}
    }
}

/// Says (once per connection) when Redis can lose acknowledged writes at a restart: only
/// `appendonly yes` with `appendfsync always` keeps every acknowledged gift (with `everysec`,
/// up to a second of them; edges then start a new epoch and reset members, see `Renumber`).
pub(super) async fn check_persistence(mut cm: Conn) {
    let get = |key: &'static str| ::redis::cmd("CONFIG").arg("GET").arg(key).clone();
    let aof: ::redis::RedisResult<Vec<String>> = get("appendonly").query_async(&mut cm).await;
    let fsync: ::redis::RedisResult<Vec<String>> = get("appendfsync").query_async(&mut cm).await;
    match (aof, fsync) {
        (Ok(a), Ok(f)) => {
            let (a, f) = (a.get(1).cloned().unwrap_or_default(), f.get(1).cloned().unwrap_or_default());
            if a != "yes" || f != "always" {
                tracing::warn!(appendonly = %a, appendfsync = %f, "redis can lose acknowledged publishes at a restart (only appendonly yes with appendfsync always cannot): rooms that lose writes take a new epoch and their members are reset");
            }
        }
        _ => tracing::info!(
            "redis persistence settings unreadable (CONFIG GET refused): make sure it runs with appendonly yes and appendfsync always"
        ),
    }
}

/// Where each edge leaves, at connect, the `[history]` counts it trims the shared streams to.
const HISTORY_KEY: &str = "rc:history";

/// The `[history]` counts as this edge applies them to the shared streams.
fn history_counts(limits: StreamLimits) -> String {
    format!("must_deliver={} droppable={}", limits.must_deliver.max(1), limits.droppable.max(1))
}

/// Says (once per connection) when the edge that connected before this one trims the shared
/// room streams to other `[history]` counts. The streams are the fleet's and every publish
/// trims them to the counts of the edge that took it, so the smallest `must_deliver` in the
/// fleet is all that `since` recovery can count on, on every edge. One command: it sees only
/// the previous edge to connect (which may have left the fleet since), not every edge.
pub(super) async fn check_history_counts(mut cm: Conn, limits: StreamLimits) {
    let mine = history_counts(limits);
    let previous: ::redis::RedisResult<Option<String>> =
        ::redis::cmd("SET").arg(HISTORY_KEY).arg(&mine).arg("GET").query_async(&mut cm).await;
    match previous {
        Ok(Some(theirs)) if theirs != mine => tracing::warn!(
            this_edge = %mine,
            other_edge = %theirs,
            "the last edge to connect to this redis before this one (another edge, or this one's previous run) had other [history] counts: each publish trims the shared redis streams to the counts of the edge that took it, so since recovery can count only on the smallest must_deliver; give every edge the same [history] must_deliver and droppable"
        ),
        Ok(_) => {}
        Err(e) => tracing::debug!(error = %e, "cannot compare [history] counts with the fleet's"),
    }
}

pub(super) async fn renumber(mut cm: Conn, room: RoomName, epoch: Epoch, below: u64, bus: BusHandle) {
    let k = keys(&room);
    let r: ::redis::RedisResult<u8> = ::redis::Script::new(RENUMBER_LUA)
        .key(&k[0])
        .key(&k[1])
        .key(&k[2])
        .key(&k[4])
        .key(&k[5])
        .key(&k[6])
        .arg(epoch)
        .arg(below)
        .invoke_async(&mut cm)
        .await;
    match r {
        Ok(1) => {
            tracing::error!(room = %room, old_epoch = %super::ShowEpoch(epoch), below, "redis lost writes of this room (its seq went back under the same epoch): a new epoch is started so that no seq is reused; members are reset (run redis with appendonly yes and appendfsync always)");
        }
        Ok(_) => {}
        Err(e) => {
            tracing::warn!(room = %room, error = %e, "cannot start a new epoch in redis");
            failed("renumber");
        }
    }
    sync_room(cm, room, bus).await;
}

/// Redis could not answer a recovery: the engine sends its joins away to come back with the
/// same `since` (Redis still holds what they missed: not a gap).
fn recovery_failed(room: RoomName, since: u64, upto: u64) -> EngineCmd {
    EngineCmd::Recovered { room, since, upto, messages: Vec::new(), evicted_upto: 0, ok: false }
}

/// How long after an unanswered read of a room's seq it is read again.
const RESYNC_AFTER: Duration = Duration::from_secs(1);

/// Reads the room's seq, epoch and latest state for its engine; if Redis does not answer, hands
/// the room back to be read again after [`RESYNC_AFTER`]. Without it, a read that timed out
/// while the connection stayed up (a frozen or saturated Redis) was never made again: the joins
/// of a room this edge did not follow yet waited for it without end.
async fn sync_or_again(cm: Conn, room: RoomName, bus: BusHandle, again: tokio::sync::mpsc::UnboundedSender<RoomName>) {
    if !sync_room(cm, room.clone(), bus).await {
        tokio::time::sleep(RESYNC_AFTER).await;
        let _ = again.send(room);
    }
}

/// Reads the room's seq, epoch and latest state for its engine; false if Redis did not answer.
pub(super) async fn sync_room(mut cm: Conn, room: RoomName, bus: BusHandle) -> bool {
    let k = keys(&room);
    let r: Result<(u64, u64, Vec<Vec<u8>>), _> = ::redis::Script::new(SYNC_LUA)
        .key(&k[0])
        .key(&k[1])
        .key(&k[2])
        .key(&k[4])
        .key(&k[5])
        .key(&k[6])
        .invoke_async(&mut cm)
        .await;
    match r {
        Ok((seq, epoch, latest)) => {
            // The latest state of this numbering (an entry of another epoch is void).
            let latest = latest
                .iter()
                .filter_map(|b| parse(b))
                .filter(|(m, _, ep)| *ep == epoch && m.seq <= seq)
                .map(|(m, _, _)| m)
                .collect();
            bus.send_async(EngineCmd::Synced { room, seq, epoch, latest }).await;
            true
        }
        Err(e) => {
            tracing::warn!(room = %room, error = %e, "cannot read room seq");
            failed("sync");
            false
        }
    }
}

/// One publish for Redis, as the engine handed it over.
pub(super) struct Publish {
    room: RoomName,
    msg: NewMessage,
    must_deliver: bool,
    conflate: Option<String>,
    reply: Reply,
    permit: Option<OwnedSemaphorePermit>,
}

/// Runs one publish; `done` is signalled once Redis answered (the room's next publish may go),
/// before the answer travels back through the engine.
pub(super) async fn publish(
    mut cm: Conn,
    script: ::redis::Script,
    job: Publish,
    bus: BusHandle,
    limits: StreamLimits,
    done: tokio::sync::oneshot::Sender<()>,
) {
    let Publish { room, msg, must_deliver, conflate, reply, permit } = job;
    let k = keys(&room);
    // The key's own name, in the room's hash slot; with no key the script does not read it.
    let idem = msg.idem.as_deref().map_or_else(|| k[0].clone(), |key| format!("rc:{{{room}}}:idem:{key}"));
    let ttl = if msg.idem.is_some() { limits.idempotency_ttl_s } else { 0 };
    use ::redis::ToRedisArgs;
    let mut keys_: Vec<Vec<u8>> = k[..6].iter().map(|k| k.clone().into_bytes()).collect();
    keys_.push(idem.into_bytes());
    keys_.push(k[6].clone().into_bytes());
    let mut args: Vec<Vec<u8>> = Vec::with_capacity(10);
    for a in [&msg.kind, &msg.user, &msg.body] {
        args.extend(a.to_redis_args());
    }
    args.extend((if must_deliver { "1" } else { "0" }).to_redis_args());
    args.extend(limits.must_deliver.max(1).to_redis_args());
    args.extend(limits.droppable.max(1).to_redis_args());
    args.extend((if conflate.is_some() { "1" } else { "0" }).to_redis_args());
    args.extend(conflate.unwrap_or_default().to_redis_args());
    args.extend(ttl.to_redis_args());
    args.extend(cm.publish_command().to_redis_args());
    let waited = must_deliver && limits.min_replicas_acked > 0;
    // A waited message goes to members only once replicas hold it: published by `replicated`.
    args.extend((if waited { "0" } else { "1" }).to_redis_args());
    let result = if waited {
        replicated(&mut cm, &script, &keys_, &args, &k[3], &msg, limits).await
    } else {
        let mut invocation = script.prepare_invoke();
        for key in &keys_ {
            invocation.key(key);
        }
        for a in &args {
            invocation.arg(a);
        }
        match invocation.invoke_async::<(u64, u64, u8)>(&mut cm).await {
            Ok((seq, ts_us, replayed)) => Ok(Ack { seq, ts_us, replayed: replayed == 1 }),
            Err(e) => {
                tracing::warn!(error = %e, "redis publish failed");
                failed("publish");
                Err(PublishError::BusUnavailable)
            }
        }
    };
    let _ = done.send(());
    drop(permit);
    bus.send_async(EngineCmd::PublishDone { room, reply, result }).await;
}

/// Runs the publish script and `WAIT` in one pipeline: the same connection, so `WAIT` counts
/// the replicas that hold this script's writes (on a cluster the pipeline goes to the room's
/// primary; a `MOVED` sends it whole to the new owner). Too few within the timeout: not
/// acknowledged (503); the publisher's retry with its Idempotency-Key gets the same seq and
/// waits again. The script does not publish the message: it goes on the room's channel only
/// once the replicas hold it, so what members saw live is what a failover keeps (Sentinel's
/// switchover showed why: an old primary still answers for a moment after its replica took
/// over, and members of a gift it numbered then were reset). A script Redis has not cached yet
/// is loaded (on every node) and the pipeline sent again: `NOSCRIPT` means it did not run.
async fn replicated(
    cm: &mut Conn,
    script: &::redis::Script,
    keys: &[Vec<u8>],
    args: &[Vec<u8>],
    channel: &str,
    msg: &NewMessage,
    limits: StreamLimits,
) -> Result<Ack, PublishError> {
    let mut evalsha = ::redis::cmd("EVALSHA");
    evalsha.arg(script.get_hash()).arg(keys.len()).arg(keys).arg(args);
    let mut wait = ::redis::cmd("WAIT");
    wait.arg(limits.min_replicas_acked).arg(limits.replicas_timeout_ms);
    let mut pipe = ::redis::pipe();
    pipe.add_command(evalsha).add_command(wait);
    let started = std::time::Instant::now();
    let mut loaded = false;
    loop {
        match pipe.query_async::<((u64, u64, u8, Vec<u8>), u32)>(cm).await {
            Ok(((seq, ts_us, replayed, text), acked)) => {
                if let Some(h) = REPLICATION.get() {
                    h.observe(started.elapsed().as_secs_f64());
                }
                if acked >= limits.min_replicas_acked {
                    // Now members may see it: a message they saw is one a failover keeps.
                    if !text.is_empty() {
                        let r: ::redis::RedisResult<::redis::Value> =
                            ::redis::cmd(cm.publish_command()).arg(channel).arg(&text).query_async(cm).await;
                        if let Err(e) = r {
                            // Members get it from the stream with the room's next message or
                            // the next re-read.
                            tracing::warn!(seq, error = %e, "cannot publish a replicated gift on its channel");
                            failed("publish");
                        }
                    }
                    return Ok(Ack { seq, ts_us, replayed: replayed == 1 });
                }
                tracing::warn!(
                    seq,
                    acked,
                    wanted = limits.min_replicas_acked,
                    idempotency_key = msg.idem.is_some(),
                    "gift not acknowledged: too few redis replicas hold it in time"
                );
                failed("not_replicated");
                return Err(PublishError::NotReplicated { acked, wanted: limits.min_replicas_acked });
            }
            Err(e) if !loaded && e.to_string().to_ascii_uppercase().contains("NOSCRIPT") => {
                loaded = true;
                let r: ::redis::RedisResult<::redis::Value> =
                    ::redis::cmd("SCRIPT").arg("LOAD").arg(PUBLISH_LUA).query_async(cm).await;
                if let Err(e) = r {
                    tracing::warn!(error = %e, "cannot load the publish script");
                }
            }
            Err(e) => {
                tracing::warn!(error = %e, "redis publish failed");
                failed("publish");
                return Err(PublishError::BusUnavailable);
            }
        }
    }
}

/// `roomcast_redis_replication_seconds`: a waited publish, script and `WAIT` together.
static REPLICATION: std::sync::OnceLock<prometheus::Histogram> = std::sync::OnceLock::new();

/// Reads `from..=to` from a stream (ids are `seq-0`).
async fn range(cm: &mut Conn, key: &str, from: u64, to: u64) -> ::redis::RedisResult<Vec<(PushMessage, bool)>> {
    let reply: ::redis::streams::StreamRangeReply = cm.xrange(key, format!("{from}-0"), format!("{to}-0")).await?;
    let mut out = Vec::with_capacity(reply.ids.len());
    for id in reply.ids {
        if let Some(::redis::Value::BulkString(b)) = id.map.get("m")
            && let Some((m, md, _)) = parse(b)
        {
            // The streams hold one numbering: the scripts empty them when the epoch changes.
            out.push((m, md));
        }
    }
    Ok(out)
}

/// The tombstones in place of deleted messages with seqs in `from..=to` (both classes), as
/// (message, must-deliver).
async fn tombstones(cm: &mut Conn, key: &str, from: u64, to: u64) -> ::redis::RedisResult<Vec<(PushMessage, bool)>> {
    // Bounded: the delete script drops those the streams no longer cover.
    let all: Vec<(u64, Vec<u8>)> = cm.hgetall(key).await?;
    Ok(all
        .into_iter()
        .filter(|(seq, _)| (from..=to).contains(seq))
        .filter_map(|(_, b)| parse(&b).map(|(m, md, _)| (m, md)))
        .collect())
}

/// How long a fill or a recovery keeps trying (Redis not answering, a primary failing over, or
/// replicas not holding what was read yet) before it gives up: the engine then reports a
/// fill's range to live members as a gap (the room's stream cannot wait longer), and sends a
/// recovery's joins back to retry with their `since` (1013). A failed read is not an answer
/// that the range is gone.
const SETTLE_FOR: Duration = Duration::from_secs(30);

/// With `bus.min_replicas_acked = N`, whether what this edge read from the room's primary
/// before the call is held by N replicas: a small write in the room's slot (`rc:{room}:rd`),
/// then `WAIT N` on the same connection, which waits for the replication offset after that
/// write and so for every write the reads saw (a primary's replication stream is one order).
/// Fills and recoveries deliver from the streams only once it says so: a gift numbered but
/// not acknowledged yet (its publish still waiting for its replica) could otherwise reach
/// members from a fill, be lost with its primary, and come again under another seq when the
/// publisher retries it (a duplicate). `wcm`, the waited publishes' connection: `WAIT` holds
/// it for a replication round trip. Always true with N = 0.
async fn settled(wcm: &mut Conn, room: &str, limits: StreamLimits) -> bool {
    if limits.min_replicas_acked == 0 {
        return true;
    }
    let r: ::redis::RedisResult<(u32,)> = ::redis::pipe()
        .cmd("SET")
        .arg(format!("rc:{{{room}}}:rd"))
        .arg(1)
        .arg("EX")
        .arg(60)
        .ignore()
        .cmd("WAIT")
        .arg(limits.min_replicas_acked)
        .arg(limits.replicas_timeout_ms)
        .query_async(wcm)
        .await;
    matches!(r, Ok((acked,)) if acked >= limits.min_replicas_acked)
}

/// Reads `from..=to` of the room from its streams and tombstones for the engine, once what was
/// read is replicated (`settled`); retried while it is not, for up to `SETTLE_FOR`.
pub(super) async fn fill(
    mut cm: Conn,
    mut wcm: Conn,
    room: RoomName,
    from: u64,
    to: u64,
    bus: BusHandle,
    limits: StreamLimits,
) {
    let k = keys(&room);
    let end = tokio::time::Instant::now() + SETTLE_FOR;
    loop {
        let md = range(&mut cm, &k[1], from, to).await;
        let dr = range(&mut cm, &k[2], from, to).await;
        let gone = tombstones(&mut cm, &k[6], from, to).await;
        match (md, dr, gone) {
            (Ok(mut a), Ok(b), Ok(c)) => {
                if !settled(&mut wcm, &room, limits).await {
                    if tokio::time::Instant::now() < end {
                        tokio::time::sleep(Duration::from_millis(200)).await;
                        continue;
                    }
                    tracing::warn!(room = %room, from, to, "redis fill: replicas do not hold what was read");
                    failed("fill");
                    bus.send_async(EngineCmd::Filled { room, from, to, messages: Vec::new(), ok: false }).await;
                    return;
                }
                // A deleted message's seq is filled by its tombstone: no false gap.
                a.extend(b);
                a.extend(c);
                a.sort_by_key(|(m, _)| m.seq);
                bus.send_async(EngineCmd::Filled { room, from, to, messages: a, ok: true }).await;
                return;
            }
            (Err(e), ..) | (_, Err(e), _) | (.., Err(e)) => {
                // Not an answer that the range is gone: a primary failing over, a connection
                // being made again. Retried; only a Redis that stays away makes it a gap.
                failed("fill");
                if tokio::time::Instant::now() < end {
                    tracing::debug!(room = %room, error = %e, "redis fill failed: retrying");
                    tokio::time::sleep(Duration::from_millis(200)).await;
                    continue;
                }
                tracing::warn!(room = %room, error = %e, "redis fill failed");
                bus.send_async(EngineCmd::Filled { room, from, to, messages: Vec::new(), ok: false }).await;
                return;
            }
        }
    }
}

/// Reads what joiners with `since` (the lowest of them) missed, up to `upto`, once replicated (as `fill`).
pub(super) async fn recover(
    mut cm: Conn,
    mut wcm: Conn,
    room: RoomName,
    since: u64,
    upto: u64,
    bus: BusHandle,
    limits: StreamLimits,
) {
    let k = keys(&room);
    let end = tokio::time::Instant::now() + SETTLE_FOR;
    loop {
        let md = if since < upto { range(&mut cm, &k[1], since + 1, upto).await } else { Ok(Vec::new()) };
        let gone = if since < upto { tombstones(&mut cm, &k[6], since + 1, upto).await } else { Ok(Vec::new()) };
        let evicted: ::redis::RedisResult<Option<u64>> = cm.get(&k[4]).await;
        match (md.and_then(|md| gone.map(|g| (md, g))), evicted) {
            (Ok((mut md, gone)), Ok(ev)) => {
                if !settled(&mut wcm, &room, limits).await {
                    if tokio::time::Instant::now() < end {
                        tokio::time::sleep(Duration::from_millis(200)).await;
                        continue;
                    }
                    tracing::warn!(room = %room, since, upto, "redis recovery: replicas do not hold what was read");
                    failed("recover");
                    bus.send_async(recovery_failed(room, since, upto)).await;
                    return;
                }
                // A deleted gift's place holds its tombstone (deleted chat is not replayed anyway).
                md.extend(gone.into_iter().filter(|(_, must)| *must));
                md.sort_by_key(|(m, _)| m.seq);
                bus.send_async(EngineCmd::Recovered {
                    room,
                    since,
                    upto,
                    messages: md.into_iter().map(|(m, _)| m).collect(),
                    evicted_upto: ev.unwrap_or(0),
                    ok: true,
                })
                .await;
                return;
            }
            (Err(e), _) | (_, Err(e)) => {
                failed("recover");
                if tokio::time::Instant::now() < end {
                    tracing::debug!(room = %room, error = %e, "redis recovery failed: retrying");
                    tokio::time::sleep(Duration::from_millis(200)).await;
                    continue;
                }
                tracing::warn!(room = %room, error = %e, "redis recovery failed");
                bus.send_async(recovery_failed(room, since, upto)).await;
                return;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A room's publishes wait each for the one before (rooms apart do not), a publish whose
    /// task is gone does not hold its room, and rooms whose last publish is answered are swept.
    #[test]
    fn a_rooms_publishes_wait_in_turn_and_answered_rooms_are_swept() {
        let mut order = PublishOrder::default();
        let (a, b): (RoomName, RoomName) = ("a".into(), "b".into());
        let (none, first) = order.next(&a);
        assert!(none.is_none(), "nothing before the first");
        let (wait, second) = order.next(&a);
        let mut wait = wait.expect("the second waits for the first");
        assert!(matches!(wait.try_recv(), Err(tokio::sync::oneshot::error::TryRecvError::Empty)));
        assert!(order.next(&b).0.is_none(), "another room does not wait");
        first.send(()).unwrap();
        assert!(wait.try_recv().is_ok(), "its turn once the first is answered");
        let (wait, _third) = order.next(&a);
        drop(second);
        assert!(wait.unwrap().try_recv().is_err_and(|e| e == tokio::sync::oneshot::error::TryRecvError::Closed));
        // 2,000 rooms, each answered but the last 10: the sweep keeps only those still waiting.
        let mut pending = Vec::new();
        for i in 0..2000 {
            let (_, done) = order.next(&format!("r{i}").as_str().into());
            if i >= 1990 { pending.push(done) } else { done.send(()).unwrap() }
        }
        assert!(order.rooms() < 1100, "swept: {}", order.rooms());
        drop(pending);
    }

    #[test]
    fn bus_urls_parse() {
        assert_eq!(BusUrl::parse("redis://h:1"), Ok(BusUrl::Single("redis://h:1".into())));
        assert_eq!(
            BusUrl::parse("redis-cluster://:pw@10.0.0.1:7000, 10.0.0.2:7001/?x=1"),
            Ok(BusUrl::Cluster(vec!["redis://:pw@10.0.0.1:7000/?x=1".into(), "redis://:pw@10.0.0.2:7001/?x=1".into()]))
        );
        assert!(BusUrl::parse("redis-cluster://").is_err());
        assert!(BusUrl::parse("redis-cluster://h").is_err());
        assert!(BusUrl::parse("redis-cluster://h:x").is_err());
        assert!(BusUrl::parse("http://h:1").is_err());
        assert_eq!(
            BusUrl::parse("redis-sentinel://:pw@s1:26379,s2:26379/main"),
            Ok(BusUrl::Sentinel(crate::bus::sentinel::SentinelTarget {
                sentinels: vec!["s1:26379".into(), "s2:26379".into()],
                master: "main".into(),
                auth: ":pw@".into(),
            }))
        );
        assert!(BusUrl::parse("redis-sentinel://s1:26379").is_err(), "the master's name is needed");
    }

    #[test]
    fn channel_names_round_trip() {
        let k = keys("lobby-1");
        assert_eq!(k[3], "rc:{lobby-1}:ch");
        assert_eq!(room_of_channel(&k[3]), Some("lobby-1"));
        assert_eq!(room_of_channel("other"), None);
    }

    /// A script that publishes with a fixed `PUBLISH` reaches nobody on a cluster (edges
    /// follow rooms with `SSUBSCRIBE` there): each takes the command as an argument. The
    /// delete script did not (its live tombstone never reached a cluster's members).
    #[test]
    fn no_script_hardcodes_its_publish_command() {
        for (name, lua) in [("publish", PUBLISH_LUA), ("delete", DELETE_LUA), ("online", ONLINE_LUA)] {
            let upper = lua.to_ascii_uppercase();
            assert!(!upper.contains("'PUBLISH'") && !upper.contains("\"PUBLISH\""), "{name} hardcodes PUBLISH");
            assert!(!upper.contains("'SPUBLISH'") && !upper.contains("\"SPUBLISH\""), "{name} hardcodes SPUBLISH");
        }
    }

    /// Every script that numbers or reads a room's seq runs the failover fence first, and the
    /// fence moves the seq on by `FAILOVER_SEQ_SKIP`.
    #[test]
    fn scripts_that_number_run_the_failover_fence() {
        for (name, lua) in
            [("publish", PUBLISH_LUA), ("sync", SYNC_LUA), ("renumber", RENUMBER_LUA), ("delete", DELETE_LUA)]
        {
            let body = lua.split_once("\nend\n").map_or("", |(_, b)| b);
            assert!(body.contains("rc_fence(KEYS[1])"), "{name} runs the fence");
            let fence_at = body.find("rc_fence(KEYS[1])").unwrap();
            let seq_at = body.find("'seq'").unwrap_or(usize::MAX);
            assert!(fence_at < seq_at, "{name}: the fence runs before the seq is read");
        }
        assert!(fence_lua!().contains(&format!("'seq', {FAILOVER_SEQ_SKIP})")));
    }

    #[test]
    fn moderation_events_round_trip() {
        let ev = ModEvent::Ban { room: "r".into(), user: "a\"b".into(), until_ms: 5, from: "x".into() };
        let text = serde_json::to_string(&ev).unwrap();
        assert_eq!(text, r#"{"op":"ban","room":"r","user":"a\"b","until_ms":5,"from":"x"}"#);
        assert_eq!(serde_json::from_str::<ModEvent>(&text).unwrap(), ev);
        assert_eq!(room_of_channel(MOD_CHANNEL), None, "never taken for a room's channel");
        assert_eq!(room_of_channel(&super::super::slots::channel_key(MOD_ROOM)), Some(MOD_ROOM));
        assert!(roomcast_proto::envelope::validate_room(MOD_ROOM).is_err(), "no room can take its name");
    }

    #[test]
    fn wire_messages_parse() {
        let (m, md, ep) = parse(
            br#"{"ep":1764000000000001,"seq":7,"ts_us":12,"kind":"gift","user":"a\"b","md":1,"body":{"x":[1,2]}}"#,
        )
        .unwrap();
        assert!(md);
        assert_eq!(ep, 1_764_000_000_000_001);
        assert_eq!(
            (m.seq, m.ts_us, m.kind.as_str(), m.user.as_str(), m.body.as_str()),
            (7, 12, "gift", "a\"b", r#"{"x":[1,2]}"#)
        );
        assert!(parse(b"{").is_none());
    }
}
