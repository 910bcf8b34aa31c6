//! The Redis Cluster transport of the bus (`bus = "redis-cluster://host:port,host:port"`).
//!
//! What stays as on one Redis (`bus::redis`): the scripts (every key of a room, and its
//! channel, share the hash tag `{room}`, so each script runs in the room's slot on the primary
//! that owns it), the engines' order and gap handling, fills from the streams.
//!
//! What changes:
//! - **Commands** go through redis-rs's cluster connection: routed by slot, `MOVED` and `ASK`
//!   followed (with `ASKING`), `TRYAGAIN` and `CLUSTERDOWN` retried a few times, the slot map
//!   refreshed when it is stale. Messages are published with `SPUBLISH`: they travel only within
//!   the slot's shard.
//! - **Subscriptions** are routed here (`bus::slots` says why not by redis-rs): one RESP3
//!   connection per primary that this edge follows rooms on, carrying only
//!   `SSUBSCRIBE`/`SUNSUBSCRIBE`; every push is tagged with its node. A room is live once its
//!   owner pushed `ssubscribe` for it, and then its seq is read again (the engine fills what it
//!   missed from the streams, and reports as a `gap` what Redis no longer has). A `sunsubscribe`
//!   the edge did not ask for (the slot moved), or a node's connection dropping (a failover),
//!   makes the room pending: the topology is read again and the room subscribed where its slot
//!   is now, then read and filled. Nothing published meanwhile is lost while the streams hold it.
//! - **Health**: each second the cluster's view (`CLUSTER NODES`, `CLUSTER INFO`) and a `PING`
//!   of every node from this edge: `roomcast_redis_node_up{node,role}`, the list on /healthz.
//!   The bus is up while the cluster says `cluster_state:ok`; publishes to a room whose primary
//!   is failing get 503 (retry) until a replica takes over.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use ::redis::aio::MultiplexedConnection;
use ::redis::cluster_async::ClusterConnection;
use ::redis::{AsyncConnectionConfig, PushInfo, PushKind, Value};
use tokio::sync::mpsc::{UnboundedReceiver, UnboundedSender, unbounded_channel};

use super::redis::{
    BridgeCmd, Conn, MOD_ROOM, ModEvent, ONLINE_LUA, OnlineWire, PUBLISH_LUA, Presence, StreamLimits, apply_event,
    check_history_counts, failed, load_all_bans, offline, parse, report_online, room_of_channel, sync_room,
};
use super::slots::{NodeAddr, SubAction, Subscriptions, Topology, channel_key};
use super::{BusHandle, EngineCmd, RoomName};

/// How a node looks from this edge, for /healthz and /metrics.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct NodeHealth {
    /// Its address as the cluster names it (host:port).
    pub node: String,
    /// "primary" or "replica".
    pub role: &'static str,
    /// This edge reached it (PING) at the last look.
    pub up: bool,
    /// The cluster flags it failing (`fail` / `fail?`).
    pub failing: bool,
    /// Hash slots it serves (0 for a replica).
    pub slots: usize,
    /// A primary's replicas that are up (as the cluster or the sentinels say; 0 for a replica).
    pub replicas: usize,
}

/// The nodes' health as last seen, shared with the HTTP API; empty without a cluster.
#[derive(Clone)]
pub struct NodeBoard {
    nodes: Arc<Mutex<Vec<NodeHealth>>>,
    up: prometheus::IntGaugeVec,
}

impl NodeBoard {
    /// An empty board that sets the `up` gauge, labelled by node, each time it is updated.
    pub fn new(up: prometheus::IntGaugeVec) -> Self {
        Self { nodes: Arc::default(), up }
    }

    /// The nodes as of the last look (a copy), for /healthz.
    pub fn nodes(&self) -> Vec<NodeHealth> {
        self.nodes.lock().unwrap_or_else(PoisonError::into_inner).clone()
    }

    /// Replaces the list; series of nodes (or roles) no longer listed are removed.
    pub(super) fn set(&self, now: Vec<NodeHealth>) {
        let mut cur = self.nodes.lock().unwrap_or_else(PoisonError::into_inner);
        for old in cur.iter() {
            if !now.iter().any(|n| n.node == old.node && n.role == old.role) {
                let _ = self.up.remove_label_values(&[old.node.as_str(), old.role]);
            }
        }
        for n in &now {
            self.up.with_label_values(&[n.node.as_str(), n.role]).set(i64::from(n.up));
        }
        *cur = now;
    }
}

/// The command connection: redis-rs's cluster client with bounded retries, so that a publish
/// during a failover is answered (503, retry) within seconds rather than minutes.
pub async fn command_connection(seeds: &[String]) -> ::redis::RedisResult<ClusterConnection> {
    connection_with(seeds, super::redis::COMMAND_TIMEOUT).await
}

async fn connection_with(seeds: &[String], response_timeout: Duration) -> ::redis::RedisResult<ClusterConnection> {
    ::redis::cluster::ClusterClientBuilder::new(seeds.to_vec())
        .connection_timeout(Duration::from_secs(1))
        .response_timeout(response_timeout)
        .retries(6)
        .min_retry_wait(50)
        .max_retry_wait(1_000)
        .build()?
        .get_async_connection()
        .await
}

/// What the bridge's helpers tell its loop.
enum Internal {
    Topology(Topology, bool),
    /// A subscription request to `node` failed (MOVED to elsewhere, a connection error).
    Failed(NodeAddr, RoomName),
    /// Reading a room's seq after it went live failed: subscribe and read again.
    SyncFailed(RoomName),
}

/// What a node's subscriber task does.
enum NodeCmd {
    Subscribe(RoomName),
    Unsubscribe(RoomName),
}

/// Pushes of one node's subscriber connection, tagged with the node.
struct NodePush {
    node: NodeAddr,
    tx: UnboundedSender<(NodeAddr, PushInfo)>,
}

impl ::redis::aio::AsyncPushSender for NodePush {
    fn send(&self, info: PushInfo) -> Result<(), ::redis::aio::SendError> {
        self.tx.send((self.node.clone(), info)).map_err(|_| ::redis::aio::SendError)
    }
}

/// The seed URL with its address replaced by `node` (credentials and options kept), RESP3.
fn node_url(seed: &str, node: &str) -> String {
    let rest = seed.strip_prefix("redis://").unwrap_or(seed);
    let end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    let (authority, tail) = rest.split_at(end);
    let auth = authority.rsplit_once('@').map(|(u, _)| format!("{u}@")).unwrap_or_default();
    let sep = if tail.contains('?') {
        "&"
    } else if tail.is_empty() {
        "/?"
    } else {
        "?"
    };
    format!("redis://{auth}{node}{tail}{sep}protocol=resp3")
}

/// One primary's subscriber connection: sends the `SSUBSCRIBE`/`SUNSUBSCRIBE` it is given, in
/// order; reconnects when it has to. Replies are not trusted (see `bus::slots`): a failure is
/// reported so the room is retried, a success waits for the node's push.
async fn node_task(
    node: NodeAddr,
    seed: String,
    mut rx: UnboundedReceiver<NodeCmd>,
    pushes: UnboundedSender<(NodeAddr, PushInfo)>,
    internal: UnboundedSender<Internal>,
) {
    let mut conn: Option<MultiplexedConnection> = None;
    while let Some(cmd) = rx.recv().await {
        let (verb, room) = match &cmd {
            NodeCmd::Subscribe(r) => ("SSUBSCRIBE", r.clone()),
            NodeCmd::Unsubscribe(r) => ("SUNSUBSCRIBE", r.clone()),
        };
        if conn.is_none() {
            let config = AsyncConnectionConfig::new()
                .set_connection_timeout(Some(Duration::from_secs(1)))
                .set_response_timeout(Some(Duration::from_secs(3)))
                .set_push_sender(NodePush { node: node.clone(), tx: pushes.clone() });
            let c = match ::redis::Client::open(node_url(&seed, &node)) {
                Ok(client) => client.get_multiplexed_async_connection_with_config(&config).await,
                Err(e) => Err(e),
            };
            match c {
                Ok(c) => conn = Some(c),
                Err(e) => {
                    tracing::debug!(node = %node, error = %e, "redis node unreachable for subscriptions");
                    failed("subscribe");
                    if matches!(cmd, NodeCmd::Subscribe(_)) {
                        let _ = internal.send(Internal::Failed(node.clone(), room));
                    }
                    continue;
                }
            }
        }
        let Some(c) = conn.as_mut() else { continue };
        let r: ::redis::RedisResult<Value> = ::redis::cmd(verb).arg(channel_key(&room)).query_async(c).await;
        if let Err(e) = r {
            tracing::debug!(node = %node, room = %room, error = %e, verb, "redis subscription request failed");
            if e.is_io_error() || e.is_connection_dropped() || e.is_timeout() {
                conn = None;
            }
            if matches!(cmd, NodeCmd::Subscribe(_)) {
                failed("subscribe");
                let _ = internal.send(Internal::Failed(node.clone(), room));
            }
        }
    }
}

/// Each second (or at once when asked): the topology and the cluster's state through the
/// command connection, and a PING of every node from here.
async fn watch(
    mut cm: Conn,
    seed: String,
    board: NodeBoard,
    internal: UnboundedSender<Internal>,
    refresh: Arc<tokio::sync::Notify>,
    min_replicas_acked: u32,
) {
    let mut pings: HashMap<String, MultiplexedConnection> = HashMap::new();
    // Said once per node (persistence) and per primary while it lacks replicas.
    let mut checked: HashSet<String> = HashSet::new();
    let mut short: HashSet<String> = HashSet::new();
    loop {
        let nodes: ::redis::RedisResult<String> = ::redis::cmd("CLUSTER").arg("NODES").query_async(&mut cm).await;
        let info: ::redis::RedisResult<String> = ::redis::cmd("CLUSTER").arg("INFO").query_async(&mut cm).await;
        let ok = info.as_deref().is_ok_and(|i| i.lines().any(|l| l.trim() == "cluster_state:ok"));
        match nodes.map_err(|e| e.to_string()).and_then(|t| Topology::parse(&t)) {
            Ok(topo) => {
                let mut health = Vec::new();
                for n in &topo.nodes {
                    let up = ping(&mut pings, &seed, &n.addr).await;
                    health.push(NodeHealth {
                        node: n.addr.clone(),
                        role: if n.primary { "primary" } else { "replica" },
                        up,
                        failing: n.failing,
                        slots: Topology::slot_count(n),
                        replicas: if n.primary { topo.live_replicas(n) } else { 0 },
                    });
                }
                pings.retain(|addr, _| topo.nodes.iter().any(|n| &n.addr == addr));
                for n in &topo.nodes {
                    if let Some(c) = pings.get_mut(&n.addr)
                        && checked.insert(n.addr.clone())
                    {
                        check_node_persistence(c, &n.addr).await;
                    }
                    if n.primary && !n.slots.is_empty() && min_replicas_acked > 0 {
                        let live = topo.live_replicas(n);
                        if live < min_replicas_acked as usize {
                            if short.insert(n.addr.clone()) {
                                tracing::warn!(node = %n.addr, replicas = live, min_replicas_acked, "redis primary has fewer replicas than bus.min_replicas_acked: gifts to its rooms are refused (503) until one is back");
                            }
                        } else {
                            short.remove(&n.addr);
                        }
                    }
                }
                board.set(health);
                if internal.send(Internal::Topology(topo, ok)).is_err() {
                    return;
                }
            }
            Err(e) => {
                tracing::warn!(error = %e, "cannot read the redis cluster's topology");
                failed("topology");
                let mut seen = board.nodes();
                for n in &mut seen {
                    n.up = ping(&mut pings, &seed, &n.node).await;
                }
                board.set(seen);
                if internal.send(Internal::Topology(Topology::default(), false)).is_err() {
                    return;
                }
            }
        }
        tokio::select! {
            () = tokio::time::sleep(Duration::from_secs(1)) => {}
            () = refresh.notified() => {}
        }
    }
}

/// Says when a node can lose acknowledged writes at a restart (as `check_persistence` does for
/// one Redis): every node, since any may be promoted.
async fn check_node_persistence(c: &mut MultiplexedConnection, addr: &str) {
    let get = |key: &'static str| ::redis::cmd("CONFIG").arg("GET").arg(key).clone();
    let aof: ::redis::RedisResult<Vec<String>> = get("appendonly").query_async(c).await;
    let fsync: ::redis::RedisResult<Vec<String>> = get("appendfsync").query_async(c).await;
    if let (Ok(a), Ok(f)) = (aof, fsync) {
        let (a, f) = (a.get(1).cloned().unwrap_or_default(), f.get(1).cloned().unwrap_or_default());
        if a != "yes" || f != "always" {
            tracing::warn!(node = addr, appendonly = %a, appendfsync = %f, "redis node can lose acknowledged publishes at a restart (only appendonly yes with appendfsync always cannot)");
        }
    }
}

/// PINGs `addr` (a connection kept per node; dropped when it fails).
async fn ping(pings: &mut HashMap<String, MultiplexedConnection>, seed: &str, addr: &str) -> bool {
    if !pings.contains_key(addr) {
        let url = node_url(seed, addr).replace("protocol=resp3", "protocol=resp2");
        let config = AsyncConnectionConfig::new()
            .set_connection_timeout(Some(Duration::from_millis(500)))
            .set_response_timeout(Some(Duration::from_millis(500)));
        let c = match ::redis::Client::open(url) {
            Ok(client) => client.get_multiplexed_async_connection_with_config(&config).await,
            Err(e) => Err(e),
        };
        match c {
            Ok(c) => {
                pings.insert(addr.to_owned(), c);
            }
            Err(_) => return false,
        }
    }
    let Some(c) = pings.get_mut(addr) else { return false };
    let r: ::redis::RedisResult<String> = ::redis::cmd("PING").query_async(c).await;
    if r.is_err() {
        pings.remove(addr);
    }
    r.is_ok()
}

/// The cluster bridge: see the module's documentation.
#[expect(clippy::too_many_arguments, reason = "each is a separate handle the bridge owns")]
pub(super) async fn run(
    seeds: Vec<String>,
    mut rx: UnboundedReceiver<BridgeCmd>,
    bus: BusHandle,
    limits: StreamLimits,
    presence: Presence,
    up: prometheus::IntGauge,
    board: NodeBoard,
    moderation: Arc<crate::moderation::Moderation>,
) {
    let script = ::redis::Script::new(PUBLISH_LUA);
    let online_script = ::redis::Script::new(ONLINE_LUA);
    let presence = Arc::new(presence);
    let mut occupancy: HashMap<RoomName, u64> = HashMap::new();
    let mut order = super::redis::PublishOrder::default();
    // Rooms followed before the first connection.
    let mut early: HashSet<RoomName> = HashSet::new();
    let mut backoff = Duration::from_millis(100);
    up.set(0);
    let cm = loop {
        match command_connection(&seeds).await {
            Ok(c) => break Conn::Cluster(c),
            Err(e) => {
                bus.send_async(EngineCmd::Redis { up: false }).await;
                tracing::warn!(error = %e, retry_in_ms = backoff.as_millis() as u64, "redis cluster unreachable");
                failed("connect");
                let sleep = tokio::time::sleep(backoff);
                tokio::pin!(sleep);
                loop {
                    tokio::select! {
                        () = &mut sleep => break,
                        cmd = rx.recv() => match cmd {
                            None => return,
                            Some(BridgeCmd::Occupancy { room, count }) => {
                                if count > 0 { occupancy.insert(room, count); } else { occupancy.remove(&room); }
                            }
                            Some(cmd) => offline(cmd, &mut early, &bus).await,
                        },
                    }
                }
                backoff = (backoff * 2).min(Duration::from_secs(5));
            }
        }
    };
    tracing::info!(seeds = seeds.len(), "redis cluster bus connected");
    tokio::spawn(check_history_counts(cm.clone(), limits));
    // Waited publishes on connections of their own (WAIT holds its node's connection for a
    // replication round trip).
    let wcm = if limits.min_replicas_acked > 0 {
        match connection_with(&seeds, limits.waited_response_timeout()).await {
            Ok(c) => Conn::Cluster(c),
            Err(_) => cm.clone(),
        }
    } else {
        cm.clone()
    };
    let (itx, mut irx) = unbounded_channel::<Internal>();
    let (ptx, mut prx) = unbounded_channel::<(NodeAddr, PushInfo)>();
    let refresh = Arc::new(tokio::sync::Notify::new());
    let seed = seeds[0].clone();
    tokio::spawn(watch(cm.clone(), seed.clone(), board, itx.clone(), refresh.clone(), limits.min_replicas_acked));
    let mut subs = Subscriptions::default();
    let now = Instant::now();
    // Moderation's channel, followed as a room is (see `MOD_ROOM`).
    subs.want(RoomName::from(MOD_ROOM), now);
    for room in early.drain() {
        subs.want(room, now);
    }
    let mut topo = Topology::default();
    let mut is_up = false;
    let mut nodes: HashMap<NodeAddr, UnboundedSender<NodeCmd>> = HashMap::new();
    let node_cmd = |nodes: &mut HashMap<NodeAddr, UnboundedSender<NodeCmd>>, node: &NodeAddr, cmd: NodeCmd| {
        let tx = nodes.entry(node.clone()).or_insert_with(|| {
            let (tx, rx) = unbounded_channel();
            tokio::spawn(node_task(node.clone(), seed.clone(), rx, ptx.clone(), itx.clone()));
            tx
        });
        let _ = tx.send(cmd);
    };
    let mut last_gc = Instant::now();
    let mut tick = tokio::time::interval(Duration::from_millis(50));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut presence_tick = tokio::time::interval(presence.ttl / 3);
    presence_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    use futures_util::StreamExt;
    loop {
        tokio::select! {
            _ = tick.tick() => {
                let now = Instant::now();
                if std::mem::take(&mut subs.stale) {
                    refresh.notify_one();
                }
                for (room, node) in subs.due(&topo, now) {
                    node_cmd(&mut nodes, &node, NodeCmd::Subscribe(room));
                }
                // Subscriber tasks of nodes that serve no room of ours any more end.
                if now.saturating_duration_since(last_gc) >= Duration::from_secs(1) {
                    last_gc = now;
                    let keep = subs.nodes();
                    nodes.retain(|n, _| keep.contains(n));
                }
            }
            _ = presence_tick.tick() => {
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
            Some((node, push)) = prx.recv() => {
                let now = Instant::now();
                let channel = push.data.first().and_then(|v| match v {
                    Value::BulkString(b) => std::str::from_utf8(b).ok().map(str::to_owned),
                    Value::SimpleString(s) => Some(s.clone()),
                    _ => None,
                });
                let room = channel.as_deref().and_then(room_of_channel).map(RoomName::from);
                match (push.kind, room) {
                    (PushKind::SMessage, Some(room)) => {
                        let Some(Value::BulkString(payload)) = push.data.get(1) else { continue };
                        if &*room == MOD_ROOM {
                            match serde_json::from_slice::<ModEvent>(payload) {
                                Ok(ev) => apply_event(&moderation, ev),
                                Err(_) => tracing::warn!("unreadable message on the moderation channel"),
                            }
                            continue;
                        }
                        match parse(payload) {
                            Some((msg, must_deliver, epoch)) => {
                                bus.send_async(EngineCmd::Remote { room, msg: Box::new(msg), must_deliver, epoch }).await;
                            }
                            None => match serde_json::from_slice::<OnlineWire>(payload) {
                                Ok(o) => bus.send_async(EngineCmd::Online { room, total: o.online }).await,
                                Err(_) => tracing::warn!(room = %room, "unreadable message on the redis channel"),
                            },
                        }
                    }
                    (PushKind::SSubscribe, Some(room)) => match subs.confirmed(&node, &room) {
                        Some(SubAction::Sync(room)) if &*room == MOD_ROOM => {
                            // Events sent while it was not live are lost: the bans in force
                            // are read again (a disconnect meanwhile is not replayed).
                            let (cm, moderation, itx) = (cm.clone(), moderation.clone(), itx.clone());
                            tokio::spawn(async move {
                                if !load_all_bans(cm, moderation).await {
                                    let _ = itx.send(Internal::SyncFailed(room));
                                }
                            });
                        }
                        Some(SubAction::Sync(room)) => {
                            let (cm, bus, itx) = (cm.clone(), bus.clone(), itx.clone());
                            tokio::spawn(async move {
                                if !sync_room(cm, room.clone(), bus).await {
                                    let _ = itx.send(Internal::SyncFailed(room));
                                }
                            });
                        }
                        Some(SubAction::Unsubscribe { node, room }) => node_cmd(&mut nodes, &node, NodeCmd::Unsubscribe(room)),
                        None => {}
                    },
                    (PushKind::SUnsubscribe, Some(room)) => {
                        if subs.is_live(&room) {
                            tracing::info!(room = %room, node = %node, "redis moved the room's slot: following it");
                        }
                        subs.unsubscribed(&node, &room, now);
                    }
                    (PushKind::Disconnection, _) => {
                        tracing::warn!(node = %node, "redis node connection lost: its rooms are subscribed again where their slots are");
                        failed("connection_lost");
                        nodes.remove(&node);
                        subs.node_lost(&node, now);
                    }
                    _ => {}
                }
            }
            Some(ev) = irx.recv() => match ev {
                Internal::Topology(t, ok) => {
                    if !t.nodes.is_empty() {
                        topo = t;
                    }
                    if ok != is_up {
                        is_up = ok;
                        up.set(i64::from(ok));
                        if ok {
                            tracing::info!("redis cluster state ok");
                        } else {
                            tracing::warn!("redis cluster state not ok: publishes are refused (503) until it is");
                        }
                        bus.send_async(EngineCmd::Redis { up: ok }).await;
                    }
                }
                Internal::Failed(node, room) => subs.failed(&node, &room, Instant::now()),
                Internal::SyncFailed(room) => subs.retry(&room, Instant::now()),
            },
            cmd = rx.recv() => {
                let Some(cmd) = cmd else { return };
                match cmd {
                    BridgeCmd::Subscribe(room) => subs.want(room, Instant::now()),
                    BridgeCmd::Unsubscribe(room) => {
                        if let Some(SubAction::Unsubscribe { node, room }) = subs.unwant(&room) {
                            node_cmd(&mut nodes, &node, NodeCmd::Unsubscribe(room));
                        }
                    }
                    other => {
                        let work = super::redis::Work { cm: &cm, wcm: &wcm, script: &script, online: &online_script, bus: &bus, limits, presence: &presence };
                        work.spawn(other, &mut occupancy, &mut order);
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn node_urls_keep_credentials_and_options() {
        assert_eq!(node_url("redis://127.0.0.1:7000", "10.0.0.2:7001"), "redis://10.0.0.2:7001/?protocol=resp3");
        assert_eq!(node_url("redis://:pw@h:1/?x=1", "n:2"), "redis://:pw@n:2/?x=1&protocol=resp3");
        assert_eq!(node_url("redis://u:pw@h:1/0", "n:2"), "redis://u:pw@n:2/0?protocol=resp3");
    }
}
