//! Redis Cluster, the parts that need no socket: which slot a key hashes to, the cluster's
//! topology as `CLUSTER NODES` describes it, and which rooms this edge follows on which node
//! (the subscription state machine the cluster bridge drives).
//!
//! Why the bridge routes its own subscriptions: redis-rs's cluster connection can `SSUBSCRIBE`,
//! but a slot that moves makes Redis push an *unsolicited* `sunsubscribe`, and redis-rs 1.x
//! takes any (s)unsubscribe push for the reply to the oldest command in flight on that
//! connection (valkey-io/valkey#1066 describes the race; rueidis and StackExchange.Redis had to
//! special-case it). A script's answer could then go to the wrong publish. So commands
//! (scripts, XRANGE, WAIT) use redis-rs's cluster connection, which never subscribes and so never
//! receives such a push; subscriptions use one RESP3 connection per primary that carries only
//! `SSUBSCRIBE`/`SUNSUBSCRIBE`, and the state below trusts the pushes, never the replies: a room
//! is live on a node once that node's `ssubscribe` push for its channel arrived, and stops
//! being live when that node pushes `sunsubscribe` (a slot move) or its connection drops.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use super::RoomName;

/// A node's `host:port`.
pub type NodeAddr = std::sync::Arc<str>;

/// Slots in a Redis Cluster.
pub const SLOTS: usize = 16_384;

/// CRC16/XMODEM (polynomial 0x1021, initial 0), as Redis Cluster hashes keys.
fn crc16(data: &[u8]) -> u16 {
    let mut crc: u16 = 0;
    for &b in data {
        crc ^= u16::from(b) << 8;
        for _ in 0..8 {
            crc = if crc & 0x8000 != 0 { (crc << 1) ^ 0x1021 } else { crc << 1 };
        }
    }
    crc
}

/// The slot of a key (or shard channel): the hash of its first non-empty `{...}` tag, else of
/// the whole key.
pub fn slot_of(key: &[u8]) -> u16 {
    let tagged = key
        .iter()
        .position(|&b| b == b'{')
        .and_then(|open| {
            let rest = &key[open + 1..];
            let close = rest.iter().position(|&b| b == b'}')?;
            (close > 0).then(|| &rest[..close])
        })
        .unwrap_or(key);
    crc16(tagged) % SLOTS as u16
}

/// One node as `CLUSTER NODES` lists it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClusterNode {
    /// The node's id (40 hex characters), as replicas name their primary.
    pub id: String,
    /// `host:port` (the client port).
    pub addr: String,
    /// A primary (serves slots) rather than a replica.
    pub primary: bool,
    /// A replica's primary (its node id).
    pub replica_of: Option<String>,
    /// The cluster has flagged it failing (`fail` or `fail?` as seen by the node asked).
    pub failing: bool,
    /// Slot ranges it serves (primaries), inclusive.
    pub slots: Vec<(u16, u16)>,
}

/// The cluster as one node described it: its nodes and the owner of each slot.
#[derive(Debug, Clone)]
pub struct Topology {
    /// Every node listed, primaries and replicas.
    pub nodes: Vec<ClusterNode>,
    /// Index into `nodes` of each slot's primary (`u16::MAX`: unassigned).
    owner: Vec<u16>,
}

impl Default for Topology {
    fn default() -> Self {
        Self { nodes: Vec::new(), owner: vec![u16::MAX; SLOTS] }
    }
}

impl Topology {
    /// Parses the text of `CLUSTER NODES` (one node per line:
    /// `id addr[@cport[,hostname]] flags primary-id ping pong epoch link slot...`).
    pub fn parse(text: &str) -> Result<Self, String> {
        let mut t = Self::default();
        for line in text.lines().map(str::trim).filter(|l| !l.is_empty()) {
            let f: Vec<&str> = line.split_whitespace().collect();
            if f.len() < 8 {
                return Err(format!("short CLUSTER NODES line: {line:?}"));
            }
            let addr = f[1].split(['@', ',']).next().unwrap_or_default();
            let flags: Vec<&str> = f[2].split(',').collect();
            if flags.contains(&"noaddr") || addr.starts_with(':') {
                continue; // a node the cluster knows by id only: nothing to connect to
            }
            let mut slots = Vec::new();
            for s in &f[8..] {
                if s.starts_with('[') {
                    continue; // a slot being migrated or imported: its owner is still the listed one
                }
                let (a, b) = s.split_once('-').unwrap_or((s, s));
                let (a, b) = (a.parse::<u16>(), b.parse::<u16>());
                match (a, b) {
                    (Ok(a), Ok(b)) if a <= b && usize::from(b) < SLOTS => slots.push((a, b)),
                    _ => return Err(format!("bad slot range {s:?} in {line:?}")),
                }
            }
            let node = ClusterNode {
                id: f[0].to_owned(),
                addr: addr.to_owned(),
                primary: flags.contains(&"master"),
                replica_of: (f[3] != "-").then(|| f[3].to_owned()),
                failing: flags.contains(&"fail") || flags.contains(&"fail?"),
                slots,
            };
            let i = t.nodes.len() as u16;
            if node.primary {
                for &(a, b) in &node.slots {
                    for s in a..=b {
                        t.owner[usize::from(s)] = i;
                    }
                }
            }
            t.nodes.push(node);
        }
        if t.nodes.is_empty() {
            return Err("CLUSTER NODES listed no node".into());
        }
        Ok(t)
    }

    /// The primary serving `slot`, if any.
    pub fn owner(&self, slot: u16) -> Option<&ClusterNode> {
        self.nodes.get(usize::from(*self.owner.get(usize::from(slot))?))
    }

    /// Every slot has a primary the cluster does not flag as failing.
    pub fn covered(&self) -> bool {
        self.owner.iter().all(|&i| self.nodes.get(usize::from(i)).is_some_and(|n| !n.failing))
    }

    /// Replicas of a primary the cluster does not flag as failing.
    pub fn live_replicas(&self, primary: &ClusterNode) -> usize {
        self.nodes.iter().filter(|n| n.replica_of.as_deref() == Some(primary.id.as_str()) && !n.failing).count()
    }

    /// Slots a node serves.
    pub fn slot_count(n: &ClusterNode) -> usize {
        n.slots.iter().map(|&(a, b)| usize::from(b - a) + 1).sum()
    }
}

/// Where one followed room's subscription stands.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Sub {
    /// Wanted, not live: an `SSUBSCRIBE` is due at this moment (on the slot's owner).
    Pending { due: Instant },
    /// `SSUBSCRIBE` sent to this node at this moment; its push has not come yet.
    Requested { node: NodeAddr, at: Instant },
    /// The node confirmed it: its messages for the room reach this edge.
    Live { node: NodeAddr },
}

/// What the bridge must do after an event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SubAction {
    /// Read the room's seq again (and let the engine fill what it missed): a subscription
    /// became live.
    Sync(RoomName),
    /// Drop a subscription nobody wants any more on this node.
    Unsubscribe {
        /// The node holding the subscription.
        node: NodeAddr,
        /// The room no longer wanted.
        room: RoomName,
    },
}

/// The rooms this edge follows and where each is subscribed. Pure: callers pass `now`.
#[derive(Debug, Default)]
pub struct Subscriptions {
    rooms: HashMap<RoomName, Sub>,
    /// The rooms not live (what `due` looks at: a tick costs what is waiting, not every room).
    waiting: std::collections::HashSet<RoomName>,
    /// The topology is known to be stale (a slot moved, a node went away, a request failed).
    pub stale: bool,
}

/// How long a request may go without its confirmation before it is sent again.
pub const CONFIRM_TIMEOUT: Duration = Duration::from_secs(3);
/// How long after a failed request the next one goes.
pub const RETRY_AFTER: Duration = Duration::from_millis(200);

impl Subscriptions {
    /// Rooms followed, live or not.
    pub fn len(&self) -> usize {
        self.rooms.len()
    }

    /// True when no room is followed.
    pub fn is_empty(&self) -> bool {
        self.rooms.is_empty()
    }

    /// Whether the room's subscription is confirmed: its messages reach this edge.
    pub fn is_live(&self, room: &str) -> bool {
        matches!(self.rooms.get(room), Some(Sub::Live { .. }))
    }

    /// Every room followed, live or not.
    pub fn rooms(&self) -> impl Iterator<Item = &RoomName> {
        self.rooms.keys()
    }

    /// A first member joined: follow the room.
    pub fn want(&mut self, room: RoomName, now: Instant) {
        if !self.rooms.contains_key(&room) {
            self.rooms.insert(room.clone(), Sub::Pending { due: now });
            self.waiting.insert(room);
        }
    }

    /// The last member left: stop following; unsubscribe where it was (or may be) subscribed.
    pub fn unwant(&mut self, room: &str) -> Option<SubAction> {
        self.waiting.remove(room);
        match self.rooms.remove(room)? {
            Sub::Live { node } | Sub::Requested { node, .. } => {
                Some(SubAction::Unsubscribe { node, room: RoomName::from(room) })
            }
            Sub::Pending { .. } => None,
        }
    }

    /// `node` pushed `ssubscribe` for the room.
    pub fn confirmed(&mut self, node: &NodeAddr, room: &str) -> Option<SubAction> {
        let Some(sub) = self.rooms.get_mut(room) else {
            // Left while the request was in flight.
            return Some(SubAction::Unsubscribe { node: node.clone(), room: RoomName::from(room) });
        };
        *sub = Sub::Live { node: node.clone() };
        self.waiting.remove(room);
        Some(SubAction::Sync(RoomName::from(room)))
    }

    /// `node` pushed `sunsubscribe` for the room: ours (the room was left: nothing to do) or
    /// the server's (its slot moved away from `node`: subscribe again where it is now).
    pub fn unsubscribed(&mut self, node: &NodeAddr, room: &str, now: Instant) {
        if let Some(sub) = self.rooms.get_mut(room)
            && matches!(sub, Sub::Live { node: n } | Sub::Requested { node: n, .. } if n == node)
        {
            *sub = Sub::Pending { due: now };
            self.waiting.insert(RoomName::from(room));
            self.stale = true;
        }
    }

    /// The connection to `node` dropped: whatever was subscribed there is lost.
    pub fn node_lost(&mut self, node: &NodeAddr, now: Instant) {
        for (room, sub) in &mut self.rooms {
            if matches!(sub, Sub::Live { node: n } | Sub::Requested { node: n, .. } if n == node) {
                *sub = Sub::Pending { due: now };
                self.waiting.insert(room.clone());
                self.stale = true;
            }
        }
    }

    /// The request for the room on `node` failed (MOVED, a connection error).
    pub fn failed(&mut self, node: &NodeAddr, room: &str, now: Instant) {
        if let Some(sub) = self.rooms.get_mut(room)
            && matches!(sub, Sub::Requested { node: n, .. } if n == node)
        {
            *sub = Sub::Pending { due: now + RETRY_AFTER };
            self.waiting.insert(RoomName::from(room));
            self.stale = true;
        }
    }

    /// Reading the room's seq failed after it went live: subscribe (and so read) again soon.
    pub fn retry(&mut self, room: &str, now: Instant) {
        if let Some(sub) = self.rooms.get_mut(room) {
            *sub = Sub::Pending { due: now + RETRY_AFTER };
            self.waiting.insert(RoomName::from(room));
        }
    }

    /// The requests due at `now`, each to the room's owner in `topo` (rooms whose slot has no
    /// known owner wait for a fresher topology).
    pub fn due(&mut self, topo: &Topology, now: Instant) -> Vec<(RoomName, NodeAddr)> {
        let mut out = Vec::new();
        for room in &self.waiting {
            let Some(sub) = self.rooms.get_mut(room) else { continue };
            let ready = match sub {
                Sub::Pending { due } => *due <= now,
                Sub::Requested { at, .. } => now.saturating_duration_since(*at) >= CONFIRM_TIMEOUT,
                Sub::Live { .. } => false,
            };
            if !ready {
                continue;
            }
            match topo.owner(slot_of(channel_key(room).as_bytes())) {
                Some(n) if !n.failing => {
                    let node = NodeAddr::from(n.addr.as_str());
                    *sub = Sub::Requested { node: node.clone(), at: now };
                    out.push((room.clone(), node));
                }
                _ => self.stale = true,
            }
        }
        out
    }

    /// Nodes this edge has (or asks for) subscriptions on.
    pub fn nodes(&self) -> Vec<NodeAddr> {
        let mut v: Vec<NodeAddr> = self
            .rooms
            .values()
            .filter_map(|s| match s {
                Sub::Live { node } | Sub::Requested { node, .. } => Some(node.clone()),
                Sub::Pending { .. } => None,
            })
            .collect();
        v.sort();
        v.dedup();
        v
    }
}

/// A room's shard channel (the same name as its pub/sub channel on a single Redis).
pub fn channel_key(room: &str) -> String {
    format!("rc:{{{room}}}:ch")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slots_match_redis() {
        // Values from CLUSTER KEYSLOT on Redis 7.
        assert_eq!(slot_of(b"foo"), 12182);
        assert_eq!(slot_of(b"123456789"), 12739);
        assert_eq!(slot_of(b"{user1000}.following"), slot_of(b"user1000"));
        assert_eq!(slot_of(b"foo{}{bar}"), slot_of(b"foo{}{bar}"), "an empty tag hashes the whole key");
        assert_ne!(slot_of(b"foo{}{bar}"), slot_of(b"bar"));
        assert_eq!(slot_of(b"foo{{bar}}zap"), slot_of(b"{bar"));
        // Every key of a room shares the room's slot.
        assert_eq!(slot_of(b"rc:{lobby}:meta"), slot_of(b"rc:{lobby}:ch"));
        assert_eq!(slot_of(b"rc:{lobby}:meta"), slot_of(b"lobby"));
    }

    const NODES: &str = "\
07c37dfeb235213a872192d90877d0cd55635b91 127.0.0.1:30004@31004,host4 slave e7d1eecce10fd6bb5eb35b9f99a514335d9ba9ca 0 1426238317239 4 connected
67ed2db8d677e59ec4a4cefb06858cf2a1a89fa1 127.0.0.1:30002@31002 master - 0 1426238316232 2 connected 5461-10922
292f8b365bb7edb5e285caf0b7e6ddc7265d2f4f 127.0.0.1:30003@31003 master,fail - 0 1426238318243 3 connected 10923-16383
6ec23923021cf3ffec47632106199cb7f496ce01 127.0.0.1:30005@31005 slave 67ed2db8d677e59ec4a4cefb06858cf2a1a89fa1 0 1426238316232 5 connected
824fe116063bc5fcf9f4ffd895bc17aee7731ac3 127.0.0.1:30006@31006 slave 292f8b365bb7edb5e285caf0b7e6ddc7265d2f4f 0 1426238317741 6 connected
e7d1eecce10fd6bb5eb35b9f99a514335d9ba9ca 127.0.0.1:30001@31001 myself,master - 0 0 1 connected 0-5460 [5461->-67ed2db8d677e59ec4a4cefb06858cf2a1a89fa1]
";

    #[test]
    fn cluster_nodes_parse() {
        let t = Topology::parse(NODES).unwrap();
        assert_eq!(t.nodes.len(), 6);
        assert_eq!(t.owner(0).unwrap().addr, "127.0.0.1:30001");
        assert_eq!(t.owner(5461).unwrap().addr, "127.0.0.1:30002", "a migrating slot stays with its owner");
        assert_eq!(t.owner(16383).unwrap().addr, "127.0.0.1:30003");
        assert!(t.owner(16383).unwrap().failing);
        assert!(!t.covered(), "a failing primary's slots are not served");
        assert_eq!(t.nodes.iter().filter(|n| n.primary).count(), 3);
        assert_eq!(Topology::slot_count(t.owner(0).unwrap()), 5461);
        assert_eq!(t.live_replicas(t.owner(0).unwrap()), 1);
        assert_eq!(t.live_replicas(t.owner(16383).unwrap()), 1);
        assert!(Topology::parse("").is_err());
        assert!(Topology::parse("id 1.2.3.4:5@6 master - 0 0 1 connected 9-x").is_err());
        let ok = NODES.replace("master,fail", "master");
        assert!(Topology::parse(&ok).unwrap().covered());
    }

    fn topo() -> Topology {
        Topology::parse(&NODES.replace("master,fail", "master")).unwrap()
    }

    #[test]
    fn a_room_goes_live_on_its_owner_and_follows_slot_moves() {
        let t = topo();
        let now = Instant::now();
        let mut s = Subscriptions::default();
        let room = RoomName::from("lobby");
        let owner = RoomName::from(t.owner(slot_of(b"lobby")).unwrap().addr.as_str());
        s.want(room.clone(), now);
        assert_eq!(s.due(&t, now), vec![(room.clone(), owner.clone())]);
        assert!(s.due(&t, now).is_empty(), "one request in flight");
        assert_eq!(s.confirmed(&owner, "lobby"), Some(SubAction::Sync(room.clone())));
        assert!(s.is_live("lobby"));
        // Another node's stale push changes nothing.
        s.unsubscribed(&RoomName::from("127.0.0.1:1"), "lobby", now);
        assert!(s.is_live("lobby"));
        // The slot moved: subscribe again, wherever the topology says.
        s.unsubscribed(&owner, "lobby", now);
        assert!(!s.is_live("lobby") && s.stale);
        assert_eq!(s.due(&t, now).len(), 1);
        // The node dropped: every room there is pending again.
        s.confirmed(&owner, "lobby");
        s.node_lost(&owner, now);
        assert_eq!(s.due(&t, now).len(), 1);
        // A failed request waits a little.
        s.failed(&owner, "lobby", now);
        assert!(s.due(&t, now).is_empty());
        assert_eq!(s.due(&t, now + RETRY_AFTER).len(), 1);
        // An unanswered request is sent again.
        assert_eq!(s.due(&t, now + RETRY_AFTER + CONFIRM_TIMEOUT).len(), 1);
        // Leaving unsubscribes where it was requested; a late confirmation is undone too.
        assert_eq!(s.unwant("lobby"), Some(SubAction::Unsubscribe { node: owner.clone(), room: room.clone() }));
        assert_eq!(s.confirmed(&owner, "lobby"), Some(SubAction::Unsubscribe { node: owner, room }));
        assert!(s.is_empty());
    }

    #[test]
    fn rooms_without_a_live_owner_wait() {
        let t = Topology::parse(NODES).unwrap(); // 10923-16383 failing
        let now = Instant::now();
        let mut s = Subscriptions::default();
        let room = (0..100_000).map(|i| format!("r{i}")).find(|r| slot_of(r.as_bytes()) >= 10923).unwrap();
        s.want(RoomName::from(room.as_str()), now);
        assert!(s.due(&t, now).is_empty());
        assert!(s.stale, "asks for a fresher topology");
        assert_eq!(s.due(&topo(), now).len(), 1);
    }
}
